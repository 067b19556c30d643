//! Tests of the spool writer over the local spool.

use super::*;
use crate::spool::local::LocalSpool;

#[tokio::test]
async fn spool_writer_hashes_limits_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalSpool::open(dir.path(), Durability::PowerLoss).unwrap();
    let spool: Arc<dyn Spool> = Arc::new(local.clone());
    let data: Vec<u8> = (0..(WRITE_SLICE * 2 + 17)).map(|i| (i % 251) as u8).collect();
    let mut writer = SpoolWriter::new(
        &spool,
        &IntakeBudget::new(1 << 20),
        "u1",
        data.len() as u64,
        false,
    );
    for chunk in data.chunks(7000) {
        writer.write(chunk).await.unwrap();
    }
    let (path, size, sha256, head, _) = writer.finish().await.unwrap();
    assert_eq!(size, data.len() as u64);
    assert_eq!(sha256, hex::encode(Sha256::digest(&data)));
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(head.len(), SNIFF_LEN);
    // Without a share of the budget, in small slices: the same bytes.
    let mut writer = SpoolWriter::new(&spool, &IntakeBudget::new(0), "small", data.len() as u64, false);
    for chunk in data.chunks(100_000) {
        writer.write(chunk).await.unwrap();
    }
    let (small, _, small_sha256, _, _) = writer.finish().await.unwrap();
    assert_eq!(small_sha256, sha256);
    std::fs::remove_file(small).unwrap();

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
    let fetched = local
        .fetch_chunk("0f8c1f4e-3f43-4a55-9b9c-6b2f1d0e8a11", 7, 0)
        .unwrap();
    assert_eq!(
        fetched.path(),
        std::env::temp_dir().join("sessions/0f8c1f4e-3f43-4a55-9b9c-6b2f1d0e8a11/7")
    );
}

#[test]
fn the_intake_budget_gives_large_slices_while_it_has_room() {
    // Room for one writer's large slices.
    let budget = IntakeBudget::new(((PIPELINE_DEPTH + 2) * WRITE_SLICE) as u64);
    let mut first = SliceSize::new(&budget);
    assert_eq!(first.get(0), SMALL_SLICE, "small until one is filled");
    assert_eq!(first.get(SMALL_SLICE), WRITE_SLICE);
    let mut second = SliceSize::new(&budget);
    assert_eq!(second.get(SMALL_SLICE), SMALL_SLICE, "the budget is taken");
    drop(first);
    assert_eq!(second.get(SMALL_SLICE), SMALL_SLICE, "a writer asks once");
    let mut third = SliceSize::new(&budget);
    assert_eq!(
        third.get(SMALL_SLICE),
        WRITE_SLICE,
        "given back when the first ended"
    );
}

#[tokio::test]
async fn many_slices_go_through_the_pipeline_in_order_and_in_place_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalSpool::open(dir.path(), Durability::ProcessCrash).unwrap();
    let spool: Arc<dyn Spool> = Arc::new(local);
    // Enough slices that both threads fall behind the sender and buffers come back.
    let data: Vec<u8> = (0..(WRITE_SLICE * 37 + 5)).map(|i| (i * 7 % 253) as u8).collect();
    let mut writer = SpoolWriter::new(&spool, &IntakeBudget::new(1 << 20), "many", u64::MAX, false);
    for chunk in data.chunks(65_521) {
        writer.write(chunk).await.unwrap();
    }
    let (path, size, sha256, _, _) = writer.finish().await.unwrap();
    assert_eq!(size, data.len() as u64);
    assert_eq!(sha256, hex::encode(Sha256::digest(&data)));
    assert_eq!(std::fs::read(&path).unwrap(), data);

    // In place: a second writer goes on in the same file, its hash from the first's.
    let (first, second) = data.split_at(WRITE_SLICE * 5 + 3);
    let target = dir.path().join("in-place");
    let file = std::fs::File::create(&target).unwrap();
    let mut writer = SpoolWriter::in_place(
        &spool,
        &IntakeBudget::new(1 << 20),
        file,
        target.clone(),
        u64::MAX,
        Sha256::new(),
    );
    writer.write(first).await.unwrap();
    let (_, _, hasher, _, _) = writer.finish_open().await.unwrap();
    let file = std::fs::OpenOptions::new().append(true).open(&target).unwrap();
    let mut writer = SpoolWriter::in_place(
        &spool,
        &IntakeBudget::new(0),
        file,
        target.clone(),
        u64::MAX,
        hasher,
    );
    writer.write(second).await.unwrap();
    let (_, _, hasher, _, _) = writer.finish_open().await.unwrap();
    assert_eq!(hex::encode(hasher.finalize()), sha256);
    assert_eq!(std::fs::read(&target).unwrap(), data);
}

#[tokio::test]
async fn a_disk_error_in_the_pipeline_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalSpool::open(dir.path(), Durability::ProcessCrash).unwrap();
    let spool: Arc<dyn Spool> = Arc::new(local.clone());
    // The part file cannot be created: its directory is gone.
    std::fs::remove_dir_all(local.dir()).unwrap();
    let data = vec![7u8; WRITE_SLICE * 8];
    let mut writer = SpoolWriter::new(&spool, &IntakeBudget::new(1 << 20), "lost", u64::MAX, false);
    let mut refused = None;
    for chunk in data.chunks(WRITE_SLICE / 2) {
        if let Err(error) = writer.write(chunk).await {
            refused = Some(error);
            break;
        }
    }
    let error = match refused {
        Some(error) => error,
        None => writer.finish().await.expect_err("nothing could be written"),
    };
    assert_eq!(
        error,
        ApiError::from(std::io::Error::from(std::io::ErrorKind::NotFound))
    );
}

/// A session's file is not cut, written again or linked while a handle of an earlier writer
/// (a dropped request's thread, still writing the slices it had queued) holds it: its stale
/// bytes land first and are cut, never over the new ones.
#[test]
fn a_session_file_waits_for_the_writer_still_holding_it() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let spool = LocalSpool::open(dir.path(), Durability::ProcessCrash).unwrap();
    let in_place = spool.in_place_path("kore-a").unwrap();
    type Opener = fn(&LocalSpool) -> std::fs::File;
    let openers: [(Opener, PathBuf); 2] = [
        (
            |spool| spool.open_append("tus-a", 0).unwrap().file.unwrap(),
            dir.path().join("sessions/tus-a/0"),
        ),
        (
            |spool| spool.open_in_place("kore-a", 0).unwrap().unwrap().0,
            in_place,
        ),
    ];
    for (open, path) in openers {
        let mut stale = open(&spool);
        let (held, holding) = std::sync::mpsc::channel();
        let zombie = std::thread::spawn(move || {
            held.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            stale.write_all(b"stale bytes of a dropped request").unwrap();
        });
        holding.recv().unwrap();
        let mut fresh = open(&spool);
        fresh.write_all(b"fresh").unwrap();
        drop(fresh);
        zombie.join().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"fresh", "{}", path.display());
    }
    // Linking a complete upload waits too, and takes only its acknowledged bytes.
    let mut stale = spool.open_append("tus-b", 0).unwrap().file.unwrap();
    stale.write_all(b"0123456789").unwrap();
    let zombie = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        stale.write_all(b"tail never acknowledged").unwrap();
    });
    let part = spool.link_part("tus-b", 10, "u-b").unwrap();
    zombie.join().unwrap();
    assert_eq!(std::fs::read(&part).unwrap(), b"0123456789");
    assert!(
        spool.link_part("tus-b", 11, "u-c").is_err(),
        "fewer bytes than acknowledged"
    );
}

/// An id read back from the store is checked before it names a file: one that is a path
/// (another node's or a restored database's bad row) reaches nothing outside its place.
#[test]
fn ids_that_are_paths_name_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalSpool::open(dir.path(), Durability::ProcessCrash).unwrap();
    let outside = dir.path().join("outside");
    std::fs::write(&outside, b"keep me").unwrap();
    std::fs::create_dir_all(dir.path().join("sessions")).unwrap();
    for bad in ["../outside", "/etc/passwd", "a/b", "..", "", "a\u{0}b"] {
        assert!(local.fetch(bad, 0).is_err(), "{bad:?}");
        assert!(local.remove(bad).is_err(), "{bad:?}");
        assert!(local.chunk_layout(bad).is_err(), "{bad:?}");
        local.remove_session(bad);
        local.remove_chunk(bad, 0);
    }
    local.remove_session("..");
    assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");
    assert!(dir.path().join("spool").is_dir() && dir.path().join("sessions").is_dir());
    // A plain id is a name in its place.
    assert_eq!(
        local.fetch("0123456789abcdef01234567", 0).unwrap(),
        dir.path().join("spool").join("0123456789abcdef01234567")
    );
}
