//! Tests of the spool writer over the local spool.

use super::*;
use crate::spool::local::LocalSpool;

#[tokio::test]
async fn spool_writer_hashes_limits_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalSpool::open(dir.path(), Durability::PowerLoss).unwrap();
    let spool: Arc<dyn Spool> = Arc::new(local.clone());
    let data: Vec<u8> = (0..(WRITE_SLICE * 2 + 17)).map(|i| (i % 251) as u8).collect();
    let mut writer = SpoolWriter::new(&spool, &IntakeBudget::new(1 << 20), "u1", data.len() as u64, false);
    for chunk in data.chunks(7000) {
        writer.write(chunk).await.unwrap();
    }
    let (path, size, sha256, head, _) = writer.finish().await.unwrap();
    assert_eq!(size, data.len() as u64);
    assert_eq!(sha256, hex::encode(Sha256::digest(&data)));
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(head.len(), SNIFF_LEN);

    let mut writer = SpoolWriter::new(&spool, &IntakeBudget::new(1 << 20), "u2", 10, false);
    writer.write(b"0123456789").await.unwrap();
    assert_eq!(writer.write(b"x").await, Err(ApiError::TooLarge { limit: 10 }));
    drop(writer);
    let mut writer = SpoolWriter::new(&spool, &IntakeBudget::new(1 << 20), "u3", u64::MAX, false);
    writer.write(&data).await.unwrap();
    drop(writer);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let left: Vec<_> = std::fs::read_dir(local.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("u1.part")],
        "only the finished file is left"
    );
}

#[test]
fn chunk_paths_are_numbers_under_the_session() {
    let local = LocalSpool::open(&std::env::temp_dir(), Durability::ProcessCrash).unwrap();
    let path = local.chunk_path("0f8c1f4e-3f43-4a55-9b9c-6b2f1d0e8a11", 7);
    assert_eq!(
        path,
        std::env::temp_dir().join("sessions/0f8c1f4e-3f43-4a55-9b9c-6b2f1d0e8a11/7")
    );
}
