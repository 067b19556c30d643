//! The SeaweedFS harness itself, against the real `weed server`: an object put with a
//! SigV4-signed request is listed (ListObjectsV2 under a prefix) with its size and read
//! back byte for byte, while unsigned and wrongly signed requests are refused; a stop and
//! start again keeps the bucket and the object, and S3 answers again.

use std::time::Instant;

use upgate_e2e::seaweedfs::S3Server;

/// Bytes that are not text, so a body mangled on the way (trimmed, re-encoded) shows.
fn payload() -> Vec<u8> {
    (0..70_000u32).map(|i| (i.wrapping_mul(31) % 251) as u8).collect()
}

#[test]
fn signed_requests_put_list_and_get_unsigned_ones_are_refused() {
    let started = Instant::now();
    let s3 = S3Server::start();
    eprintln!("SeaweedFS started in {:?}", started.elapsed());
    let body = payload();
    assert_eq!(s3.put("spool/a/one.bin", &body), 200, "{}", s3.log());
    assert_eq!(s3.put("elsewhere/two.bin", b"other"), 200, "{}", s3.log());

    assert_eq!(
        s3.objects("spool/"),
        vec![("spool/a/one.bin".to_owned(), body.len() as u64)]
    );
    assert_eq!(s3.objects("").len(), 2, "{:?}", s3.objects(""));
    assert_eq!(s3.get("spool/a/one.bin").as_deref(), Some(&body[..]));
    assert_eq!(s3.get("spool/a/none.bin"), None);

    let key = "/upgate/spool/a/one.bin";
    let (status, answer) = s3.curl_as(None, &[], key, None);
    assert_eq!(status, 403, "unsigned GET: {}", String::from_utf8_lossy(&answer));
    let wrong = format!("{}:not-the-secret", s3.access_key_id());
    let (status, answer) = s3.curl_as(Some(&wrong), &[], key, None);
    assert_eq!(
        status,
        403,
        "wrongly signed GET: {}",
        String::from_utf8_lossy(&answer)
    );
    let (status, answer) = s3.curl_as(Some(&wrong), &["-X", "PUT"], "/upgate/spool/b.bin", Some(b"no"));
    assert_eq!(
        status,
        403,
        "wrongly signed PUT: {}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(
        s3.objects("spool/").len(),
        1,
        "a refused PUT wrote: {:?}",
        s3.objects("spool/")
    );

    let yaml = s3.spool_yaml("uploads");
    assert!(
        yaml.starts_with("  spool:\n    url: s3://upgate/uploads/\n"),
        "{yaml}"
    );
    assert!(
        yaml.contains(&format!("    endpoint: {}\n", s3.endpoint())),
        "{yaml}"
    );
}

#[test]
fn objects_outlive_a_stop_and_start_again() {
    let mut s3 = S3Server::start();
    let body = payload();
    assert_eq!(s3.put("kept/object.bin", &body), 200, "{}", s3.log());

    s3.stop();
    let (status, _) = s3.curl(&[], "/", None);
    assert_eq!(status, 0, "S3 answers after stop");

    let started = Instant::now();
    s3.start_again();
    eprintln!("SeaweedFS started again in {:?}", started.elapsed());
    assert_eq!(
        s3.objects("kept/"),
        vec![("kept/object.bin".to_owned(), body.len() as u64)]
    );
    assert_eq!(
        s3.get("kept/object.bin").as_deref(),
        Some(&body[..]),
        "{}",
        s3.log()
    );
    assert_eq!(s3.put("kept/after.bin", b"after"), 200, "{}", s3.log());
    assert_eq!(s3.get("kept/after.bin").as_deref(), Some(&b"after"[..]));
}
