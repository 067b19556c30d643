//! The S3 client against a real SeaweedFS ([`upgate_e2e::seaweedfs::S3Server`]): listings
//! whole, and grouped by `/` (one name per session, not every object under it).

use std::time::Duration;

use upgate_e2e::seaweedfs::S3Server;
use upgate_upstream::s3::{ObjectStore, S3Settings};

#[test]
fn listings_whole_and_by_name_one_level_down() {
    let s3 = S3Server::start();
    let store = ObjectStore::new(&S3Settings {
        endpoint: s3.endpoint(),
        region: s3.region().into(),
        bucket: s3.bucket().into(),
        access_key_id: s3.access_key_id().into(),
        secret_access_key: s3.secret_access_key().into(),
        connect_timeout: Duration::from_secs(2),
        answer_timeout: Duration::from_secs(10),
    })
    .expect("valid settings");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("object");
    std::fs::write(&file, b"bytes").unwrap();
    let mut expected = Vec::new();
    for session in 0..3 {
        for chunk in 0..2 {
            store
                .put_file(&format!("p/sessions/s-{session}/{chunk}"), &file)
                .unwrap();
        }
        expected.push(format!("s-{session}"));
    }
    store.put_file("p/sessions/s-9/tus/0", &file).unwrap();
    expected.push("s-9".into());
    store.put_file("p/uploads/u-1", &file).unwrap();

    let mut names = store.list_names("p/sessions/").unwrap();
    names.sort();
    assert_eq!(names, expected);
    assert_eq!(store.list("p/sessions/").unwrap().len(), 7);
    assert_eq!(store.list_names("p/none/").unwrap(), Vec::<String>::new());
}
