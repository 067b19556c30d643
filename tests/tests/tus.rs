//! The tus 1.0 dialect end to end: the real daemon and the real local plugin, tus spoken over
//! raw HTTP (creation, creation-with-upload, creation-defer-length, termination, checksum,
//! expiration, concatenation), a SIGKILL between two PATCHes, async delivery, and CORS for
//! browser clients.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use upgate_e2e::harness::*;
use upgate_e2e::inbound::b64;
use upgate_e2e::mock::{MockUpstream, Vendor};

const TUS: (&str, &str) = ("Tus-Resumable", "1.0.0");
const OFFSET_STREAM: &str = "application/offset+octet-stream";
const EXTENSIONS: &str =
    "creation,creation-with-upload,creation-defer-length,termination,checksum,expiration,concatenation";
/// The default plan's limit (1MiB).
const DEFAULT_LIMIT: u64 = 1024 * 1024;
/// The `small` plan's limit.
const SMALL_LIMIT: u64 = 1000;
const APP_ORIGIN: &str = "http://app.test";

/// The default config plus: a `small` plan (1000 bytes, png and txt) and its tenant, a
/// second tenant on the default plan, and a tenant granted Dify only.
fn config(dir: &Path) -> String {
    default_config(dir).replace(
        "plans:\n",
        "plans:\n  small:\n    max_file_size: 1000\n    allowed_extensions: [png, txt]\n",
    ) + "  small:\n    plan: small\n    provider: disk\n    keys: [small-key]\n"
        + "  other:\n    plan: default\n    provider: disk\n    keys: [other-key]\n"
        + "  difyonly:\n    plan: default\n    provider: disk\n    keys: [dify-only-key]\n    dialects: [dify]\n"
}

fn with_server(config: String, lines: &str) -> String {
    config.replacen("  idle_timeout: 2s\n", &format!("  idle_timeout: 2s\n{lines}"), 1)
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// `Upload-Metadata` for a filename (and a type).
fn metadata(name: &str) -> String {
    format!(
        "filename {},filetype {}",
        b64(name.as_bytes()),
        b64(b"text/plain")
    )
}

/// A tus request with `Tus-Resumable: 1.0.0` and the key (if any); a body goes as
/// `application/offset+octet-stream`.
fn tus(
    daemon: &Daemon,
    method: &str,
    path: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    let auth = key.map(bearer);
    let mut all: Vec<(&str, &str)> = vec![TUS];
    if let Some(auth) = &auth {
        all.push(("Authorization", auth));
    }
    all.extend_from_slice(headers);
    send(
        method,
        &daemon.url(path),
        &all,
        body.map(|bytes| (OFFSET_STREAM, bytes.to_vec())),
    )
}

/// The upload id in a creation's `Location`, checked to be `/files/<32 lowercase hex>`.
fn location_id(reply: &Reply) -> String {
    let location = reply
        .header("location")
        .unwrap_or_else(|| panic!("no Location: {reply:?}"));
    let id = location
        .strip_prefix("/files/")
        .unwrap_or_else(|| panic!("Location {location}"));
    assert!(
        id.len() == 32
            && id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "Location {location}"
    );
    id.to_owned()
}

/// Creates an upload of `length` bytes named `name` as `key`; returns its id.
fn create(daemon: &Daemon, key: &str, length: u64, name: &str) -> String {
    let length = length.to_string();
    let meta = metadata(name);
    let reply = tus(
        daemon,
        "POST",
        "/files/",
        Some(key),
        &[("Upload-Length", &length), ("Upload-Metadata", &meta)],
        None,
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    location_id(&reply)
}

fn patch(daemon: &Daemon, key: &str, id: &str, offset: u64, bytes: &[u8], extra: &[(&str, &str)]) -> Reply {
    let offset = offset.to_string();
    let mut headers = vec![("Upload-Offset", offset.as_str())];
    headers.extend_from_slice(extra);
    tus(
        daemon,
        "PATCH",
        &format!("/files/{id}"),
        Some(key),
        &headers,
        Some(bytes),
    )
}

/// A PATCH that must be accepted; checks the new offset.
fn patch_ok(daemon: &Daemon, key: &str, id: &str, offset: u64, bytes: &[u8]) -> Reply {
    let reply = patch(daemon, key, id, offset, bytes, &[]);
    assert_eq!(reply.status, 204, "{reply:?}");
    let expected = (offset + bytes.len() as u64).to_string();
    assert_eq!(
        reply.header("upload-offset"),
        Some(expected.as_str()),
        "{reply:?}"
    );
    assert_eq!(reply.header("tus-resumable"), Some("1.0.0"));
    reply
}

/// A PATCH at `offset` announcing the rest of `content` whose connection goes away after
/// `sent` bytes of it.
fn patch_cut_off(daemon: &Daemon, id: &str, offset: usize, content: &[u8], sent: usize) {
    let address = daemon.base_url.trim_start_matches("http://");
    let mut cut = std::net::TcpStream::connect(address).unwrap();
    let head = format!(
        "PATCH /files/{id} HTTP/1.1\r\nHost: {address}\r\nTus-Resumable: 1.0.0\r\nAuthorization: Bearer demo-key\r\n\
Content-Type: {OFFSET_STREAM}\r\nUpload-Offset: {offset}\r\nContent-Length: {}\r\n\r\n",
        content.len() - offset
    );
    cut.write_all(head.as_bytes()).unwrap();
    cut.write_all(&content[offset..offset + sent]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(cut);
}

fn head(daemon: &Daemon, key: &str, id: &str) -> Reply {
    tus(daemon, "HEAD", &format!("/files/{id}"), Some(key), &[], None)
}

/// The offset HEAD reports.
fn offset_of(daemon: &Daemon, key: &str, id: &str) -> u64 {
    let reply = head(daemon, key, id);
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.header("upload-offset").unwrap().parse().unwrap()
}

/// The bytes of an upload in progress, on disk.
/// Waits (up to 5 s) for the sweeper to remove upload `id`'s directory.
fn assert_swept(daemon: &Daemon, id: &str) {
    let dir = daemon.data_dir().join("sessions").join(id);
    assert!(
        eventually(Duration::from_secs(5), || !dir.exists()),
        "the sweeper left {}: {}",
        dir.display(),
        daemon.log()
    );
}

fn session_file(daemon: &Daemon, id: &str) -> PathBuf {
    daemon.data_dir().join("sessions").join(id).join("0")
}

/// The record of a completed upload: (state, size, sha256, dialect, filename).
fn record(daemon: &Daemon, id: &str) -> (String, i64, String, String, String) {
    daemon
        .db()
        .query_row(
            "SELECT state, size, sha256, dialect, filename FROM uploads WHERE id = ?1",
            [id],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)),
        )
        .unwrap_or_else(|e| panic!("record {id}: {e}"))
}

/// Uploads in progress: (rows in the store, directories in data_dir/sessions).
fn open_sessions(daemon: &Daemon) -> (i64, usize) {
    let rows = daemon
        .db()
        .query_row("SELECT COUNT(*) FROM sessions", [], |row| row.get(0))
        .unwrap();
    let dirs = std::fs::read_dir(daemon.data_dir().join("sessions")).map_or(0, |dir| dir.count());
    (rows, dirs)
}

fn uploads(daemon: &Daemon) -> i64 {
    daemon
        .db()
        .query_row("SELECT COUNT(*) FROM uploads", [], |row| row.get(0))
        .unwrap()
}

/// Checks a completing answer's upgate headers, the stored file and its record; returns
/// the record's id.
fn assert_completed(daemon: &Daemon, reply: &Reply, content: &[u8], name: &str) -> String {
    let id = reply
        .header("upgate-upload-id")
        .unwrap_or_else(|| panic!("no Upgate-Upload-Id: {reply:?}"))
        .to_owned();
    let url = reply
        .header("upgate-upload-url")
        .unwrap_or_else(|| panic!("no Upgate-Upload-Url: {reply:?}"));
    assert!(url.starts_with("file://") && url.contains(&id), "{url}");
    assert_eq!(
        std::fs::read(daemon.files_dir().join(&id)).unwrap(),
        content,
        "the stored bytes"
    );
    let (state, size, sha256, dialect, filename) = record(daemon, &id);
    assert_eq!(
        (state.as_str(), size as usize, dialect.as_str(), filename.as_str()),
        ("forwarded", content.len(), "tus", name)
    );
    assert_eq!(sha256, sha256_hex(content));
    id
}

/// Seconds since the epoch of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date_secs(text: &str) -> i64 {
    let parts: Vec<&str> = text.split(' ').collect();
    assert!(
        parts.len() == 6 && parts[0].ends_with(',') && parts[5] == "GMT",
        "not an HTTP date: {text}"
    );
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let day: i64 = parts[1].parse().unwrap();
    let month = months.iter().position(|m| *m == parts[2]).unwrap() as i64 + 1;
    let year: i64 = parts[3].parse().unwrap();
    let hms: Vec<i64> = parts[4].split(':').map(|n| n.parse().unwrap()).collect();
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2]
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// `Upload-Expires` is an HTTP date about `after` seconds from now.
fn assert_expires_in(reply: &Reply, after: i64) {
    let expires = reply
        .header("upload-expires")
        .unwrap_or_else(|| panic!("no Upload-Expires: {reply:?}"));
    let left = http_date_secs(expires) - now_secs();
    assert!((after - 5..=after + 1).contains(&left), "{expires}: {left} s");
}

/// A request written by hand (for what ureq always adds, such as a body's Content-Type, or
/// never sends, such as an empty POST with `Content-Length: 0`); the body goes chunked when
/// `Transfer-Encoding: chunked` is among `headers`.
fn raw(daemon: &Daemon, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let address = daemon.base_url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    let chunked = headers
        .iter()
        .any(|(name, value)| name.eq_ignore_ascii_case("transfer-encoding") && *value == "chunked");
    if chunked {
        request.push_str("\r\n");
    } else {
        request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    }
    stream.write_all(request.as_bytes()).unwrap();
    if chunked {
        if !body.is_empty() {
            stream
                .write_all(format!("{:x}\r\n", body.len()).as_bytes())
                .unwrap();
            stream.write_all(body).unwrap();
            stream.write_all(b"\r\n").unwrap();
        }
        stream.write_all(b"0\r\n\r\n").unwrap();
    } else {
        stream.write_all(body).unwrap();
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        text: body.to_owned(),
    }
}

/// CRC-32 (ISO-HDLC), as PNG chunks carry it.
fn crc32(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |crc, byte| {
        (0..8).fold(crc ^ u32::from(*byte), |crc, _| {
            if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            }
        })
    })
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(&crc32(&[kind.as_slice(), data].concat()).to_be_bytes());
    chunk
}

/// A valid 1x1 PNG of exactly `size` bytes (at least 93): a tEXt chunk pads it, every CRC
/// holds, the IDAT is a zlib stream.
fn png_of(size: usize) -> Vec<u8> {
    let ihdr = [0, 0, 0, 1, 0, 0, 0, 1, 8, 6, 0, 0, 0];
    let scanline = [0u8, 0x20, 0x40, 0x60, 0xff];
    let (a, b) = scanline.iter().fold((1u32, 0u32), |(a, b), byte| {
        let a = (a + u32::from(*byte)) % 65_521;
        (a, (b + a) % 65_521)
    });
    let mut zlib = vec![0x78, 0x01, 0x01, 5, 0, !5, 0xff];
    zlib.extend_from_slice(&scanline);
    zlib.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let fixed = 8 + 25 + 12 + (12 + zlib.len()) + 12;
    assert!(size >= fixed + 8, "a PNG of {size} bytes");
    let mut text = b"Comment\0".to_vec();
    text.extend((0..size - fixed - 8).map(|i| b'a' + (i * 7 % 26) as u8));
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(b"tEXt", &text));
    png.extend(png_chunk(b"IDAT", &zlib));
    png.extend(png_chunk(b"IEND", b""));
    assert_eq!(png.len(), size);
    png
}

/// Text of `size` bytes with a pattern (so a misplaced chunk changes the hash).
fn text_of(size: usize) -> Vec<u8> {
    (0..size).map(|i| b'a' + (i * 7 % 26) as u8).collect()
}

fn has_cors_headers(reply: &Reply) -> bool {
    reply
        .headers
        .iter()
        .any(|(name, _)| name.to_ascii_lowercase().starts_with("access-control-"))
}

fn header_list(reply: &Reply, name: &str) -> Vec<String> {
    reply
        .header(name)
        .unwrap_or_else(|| panic!("no {name}: {reply:?}"))
        .split(',')
        .map(|item| item.trim().to_ascii_lowercase())
        .collect()
}

#[test]
fn options_announces_the_protocol_and_the_plan_limit_to_a_known_key() {
    let daemon = Daemon::start_with(config);
    let options = |headers: &[(&str, &str)]| send("OPTIONS", &daemon.url("/files/"), headers, None);
    let anonymous = options(&[]);
    assert_eq!(anonymous.status, 204, "{anonymous:?}");
    for (name, value) in [
        ("tus-resumable", "1.0.0"),
        ("tus-version", "1.0.0"),
        ("tus-extension", EXTENSIONS),
        ("tus-checksum-algorithm", "sha1,md5,sha256"),
    ] {
        assert_eq!(anonymous.header(name), Some(value), "{name}: {anonymous:?}");
    }
    assert_eq!(anonymous.header("tus-max-size"), None, "{anonymous:?}");
    let wrong = options(&[("Authorization", "Bearer wrong-key")]);
    assert_eq!((wrong.status, wrong.header("tus-max-size")), (204, None));

    let demo = options(&[("Authorization", "Bearer demo-key")]);
    assert_eq!(demo.status, 204);
    assert_eq!(
        demo.header("tus-max-size"),
        Some(DEFAULT_LIMIT.to_string().as_str())
    );
    assert_eq!(demo.header("tus-extension"), Some(EXTENSIONS));
    let small = options(&[("Authorization", "Bearer small-key")]);
    assert_eq!(
        small.header("tus-max-size"),
        Some(SMALL_LIMIT.to_string().as_str())
    );
    // No Tus-Resumable is needed on OPTIONS, and /files answers too.
    assert_eq!(send("OPTIONS", &daemon.url("/files"), &[], None).status, 204);
}

#[test]
fn creation_patches_in_chunks_head_and_completion() {
    let daemon = Daemon::start_with(config);
    let content = text_of(2500);
    let name = "report.txt";
    let meta = metadata(name);
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[("Upload-Length", "2500"), ("Upload-Metadata", &meta)],
        None,
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(reply.header("tus-resumable"), Some("1.0.0"));
    assert_expires_in(&reply, 24 * 3600);
    let id = location_id(&reply);
    assert_eq!(reply.header("upgate-upload-id"), None, "not complete yet");

    let reply = head(&daemon, "demo-key", &id);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("upload-offset"), Some("0"));
    assert_eq!(reply.header("upload-length"), Some("2500"));
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    assert_eq!(reply.header("tus-resumable"), Some("1.0.0"));
    let mut echoed: Vec<&str> = reply.header("upload-metadata").unwrap().split(',').collect();
    echoed.sort_unstable();
    let mut sent: Vec<&str> = meta.split(',').collect();
    sent.sort_unstable();
    assert_eq!(echoed, sent, "Upload-Metadata echoed");

    // Three PATCHes; HEAD follows each.
    let mut offset = 0;
    let mut last = None;
    for piece in [&content[..1000], &content[1000..2000], &content[2000..]] {
        let reply = patch_ok(&daemon, "demo-key", &id, offset, piece);
        assert_expires_in(&reply, 24 * 3600);
        offset += piece.len() as u64;
        assert_eq!(offset_of(&daemon, "demo-key", &id), offset);
        if offset < 2500 {
            assert_eq!(reply.header("upgate-upload-id"), None, "{reply:?}");
            assert_eq!(uploads(&daemon), 0, "nothing recorded before the last byte");
            assert_eq!(
                std::fs::read(session_file(&daemon, &id)).unwrap(),
                &content[..offset as usize]
            );
        }
        last = Some(reply);
    }
    let record_id = assert_completed(&daemon, &last.unwrap(), &content, name);
    // The upload's own copy went; HEAD still tells where it stands and what it became.
    assert!(!daemon.data_dir().join("sessions").join(&id).exists());
    assert_eq!(daemon.spool_files(), 0);
    let reply = head(&daemon, "demo-key", &id);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("upload-offset"), Some("2500"));
    assert_eq!(reply.header("upgate-upload-id"), Some(record_id.as_str()));
    let metadata_json: String = daemon
        .db()
        .query_row(
            "SELECT metadata FROM uploads WHERE id = ?1",
            [&record_id],
            |row| row.get(0),
        )
        .unwrap();
    assert!(metadata_json.contains("text/plain"), "{metadata_json}");
    assert_eq!(uploads(&daemon), 1);
}

#[test]
fn creation_with_upload_and_a_deferred_length() {
    let daemon = Daemon::start_with(config);
    let meta = metadata("first.txt");
    // The POST's body is the first chunk.
    let content = text_of(3000);
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[("Upload-Length", "3000"), ("Upload-Metadata", &meta)],
        Some(&content[..1200]),
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(reply.header("upload-offset"), Some("1200"), "{reply:?}");
    assert_eq!(reply.header("upgate-upload-id"), None);
    let id = location_id(&reply);
    assert_eq!(offset_of(&daemon, "demo-key", &id), 1200);
    let reply = patch_ok(&daemon, "demo-key", &id, 1200, &content[1200..]);
    assert_completed(&daemon, &reply, &content, "first.txt");

    // The whole file in the POST: complete at once.
    let whole = text_of(700);
    let meta = metadata("whole.txt");
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[("Upload-Length", "700"), ("Upload-Metadata", &meta)],
        Some(&whole),
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(reply.header("upload-offset"), Some("700"));
    location_id(&reply);
    assert_completed(&daemon, &reply, &whole, "whole.txt");

    // Deferred: the length comes with a later PATCH.
    let meta = metadata("deferred.txt");
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[("Upload-Defer-Length", "1"), ("Upload-Metadata", &meta)],
        None,
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    let id = location_id(&reply);
    let reply = head(&daemon, "demo-key", &id);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("upload-defer-length"), Some("1"), "{reply:?}");
    assert_eq!(reply.header("upload-length"), None, "{reply:?}");
    let deferred = text_of(1500);
    let reply = patch_ok(&daemon, "demo-key", &id, 0, &deferred[..900]);
    assert_eq!(reply.header("upgate-upload-id"), None);
    let reply = patch(
        &daemon,
        "demo-key",
        &id,
        900,
        &deferred[900..],
        &[("Upload-Length", "1500")],
    );
    assert_eq!(reply.status, 204, "{reply:?}");
    assert_eq!(reply.header("upload-offset"), Some("1500"));
    assert_completed(&daemon, &reply, &deferred, "deferred.txt");
    let reply = head(&daemon, "demo-key", &id);
    assert_eq!(reply.header("upload-length"), Some("1500"), "{reply:?}");
    assert_eq!(reply.header("upload-defer-length"), None);

    // A deferred length given on a PATCH of its own, then the bytes.
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[("Upload-Defer-Length", "1")],
        None,
    );
    let id = location_id(&reply);
    let reply = patch(&daemon, "demo-key", &id, 0, b"", &[("Upload-Length", "5")]);
    assert_eq!(reply.status, 204, "{reply:?}");
    assert_eq!(head(&daemon, "demo-key", &id).header("upload-length"), Some("5"));
    assert!(
        patch_ok(&daemon, "demo-key", &id, 0, b"12345")
            .header("upgate-upload-id")
            .is_some()
    );

    // An empty creation however it is framed: `Content-Length: 0`, or chunked with no
    // Content-Type (how ureq sends every empty POST above); a chunked first chunk.
    let auth = bearer("demo-key");
    let base = [TUS, ("Authorization", auth.as_str()), ("Upload-Length", "6")];
    let reply = raw(&daemon, "POST", "/files/", &base, b"");
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(offset_of(&daemon, "demo-key", &location_id(&reply)), 0);
    let chunked = [&base[..], &[("Transfer-Encoding", "chunked")]].concat();
    let reply = raw(&daemon, "POST", "/files/", &chunked, b"");
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(offset_of(&daemon, "demo-key", &location_id(&reply)), 0);
    let streamed = [&chunked[..], &[("Content-Type", OFFSET_STREAM)]].concat();
    let reply = raw(&daemon, "POST", "/files/", &streamed, b"abc");
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(reply.header("upload-offset"), Some("3"), "{reply:?}");
    assert_eq!(offset_of(&daemon, "demo-key", &location_id(&reply)), 3);

    // Malformed creations.
    for headers in [
        vec![],
        vec![("Upload-Length", "-1")],
        vec![("Upload-Length", "ten")],
        vec![("Upload-Length", "5"), ("Upload-Defer-Length", "1")],
        vec![("Upload-Defer-Length", "2")],
    ] {
        let reply = tus(&daemon, "POST", "/files/", Some("demo-key"), &headers, None);
        assert_eq!(reply.status, 400, "{headers:?}: {reply:?}");
        assert_eq!(reply.header("tus-resumable"), Some("1.0.0"));
    }
}

#[test]
fn the_plan_limit_and_the_declared_length_hold_while_bytes_arrive() {
    let daemon = Daemon::start_with(config);
    let small = "small-key";
    // Upload-Length over the plan at creation.
    let over = (SMALL_LIMIT + 1).to_string();
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some(small),
        &[
            ("Upload-Length", &over),
            ("Upload-Metadata", &metadata("big.txt")),
        ],
        None,
    );
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(reply.header("location"), None);
    // Exactly the limit is fine.
    create(&daemon, small, SMALL_LIMIT, "limit.txt");

    // A deferred length: bytes past the plan are refused and not kept.
    let meta = metadata("deferred.txt");
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some(small),
        &[("Upload-Defer-Length", "1"), ("Upload-Metadata", &meta)],
        None,
    );
    let id = location_id(&reply);
    patch_ok(&daemon, small, &id, 0, &text_of(600));
    let reply = patch(&daemon, small, &id, 600, &text_of(500), &[]);
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(offset_of(&daemon, small, &id), 600);
    assert_eq!(std::fs::metadata(session_file(&daemon, &id)).unwrap().len(), 600);
    // Nor may the length it finally declares exceed the plan.
    let reply = patch(&daemon, small, &id, 600, b"", &[("Upload-Length", &over)]);
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(head(&daemon, small, &id).header("upload-defer-length"), Some("1"));
    // Up to the limit it completes.
    let reply = patch(
        &daemon,
        small,
        &id,
        600,
        &text_of(400),
        &[("Upload-Length", "1000")],
    );
    assert_eq!(reply.status, 204, "{reply:?}");
    assert!(reply.header("upgate-upload-id").is_some(), "{reply:?}");

    // Bytes past Upload-Length.
    let id = create(&daemon, "demo-key", 10, "ten.txt");
    let reply = patch(&daemon, "demo-key", &id, 0, b"0123456789X", &[]);
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(offset_of(&daemon, "demo-key", &id), 0);
    patch_ok(&daemon, "demo-key", &id, 0, b"01234");
    let reply = patch(&daemon, "demo-key", &id, 5, b"567890", &[]);
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(offset_of(&daemon, "demo-key", &id), 5);
    assert_eq!(std::fs::read(session_file(&daemon, &id)).unwrap(), b"01234");
    let reply = patch_ok(&daemon, "demo-key", &id, 5, b"56789");
    assert_completed(&daemon, &reply, b"0123456789", "ten.txt");
    // Creation-with-upload past its own length: refused, and the upload it created goes too
    // (the client never learnt where it was).
    let before = open_sessions(&daemon);
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[("Upload-Length", "3")],
        Some(b"abcd"),
    );
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(reply.header("location"), None);
    assert_eq!(open_sessions(&daemon), before);
    assert_eq!(
        daemon.metric("upgate_rejections_total{dialect=\"tus\",reason=\"size\"}"),
        6.0
    );
}

#[test]
fn protocol_auth_and_ownership_errors() {
    let daemon = Daemon::start_with(config);
    let id = create(&daemon, "demo-key", 100, "mine.txt");
    let path = format!("/files/{id}");

    // Tus-Resumable missing or another version: 412 naming the version spoken.
    for version in [None, Some("0.2.2"), Some("1.0")] {
        for method in ["POST", "HEAD", "PATCH", "DELETE"] {
            let target = if method == "POST" {
                "/files/"
            } else {
                path.as_str()
            };
            let mut headers = vec![("Authorization", "Bearer demo-key"), ("Upload-Length", "5")];
            if let Some(version) = version {
                headers.push(("Tus-Resumable", version));
            }
            let body = (method == "PATCH").then(|| (OFFSET_STREAM, b"x".to_vec()));
            let reply = send(method, &daemon.url(target), &headers, body);
            assert_eq!(reply.status, 412, "{method} {version:?}: {reply:?}");
            assert_eq!(reply.header("tus-version"), Some("1.0.0"), "{method}: {reply:?}");
        }
    }
    assert_eq!(offset_of(&daemon, "demo-key", &id), 0, "no refused PATCH wrote");
    // Sent twice (the version spoken, then another): which copy counts would depend on who
    // reads it, so neither does.
    let reply = raw(
        &daemon,
        "HEAD",
        &path,
        &[
            ("Authorization", "Bearer demo-key"),
            ("Tus-Resumable", "1.0.0"),
            ("Tus-Resumable", "0.2.2"),
        ],
        b"",
    );
    assert_eq!(reply.status, 400, "{reply:?}");

    // 401 without a key, with another scheme, with an unknown key.
    for headers in [
        vec![],
        vec![("Authorization", "demo-key")],
        vec![("Authorization", "Basic demo-key")],
        vec![("Authorization", "Bearer wrong-key")],
    ] {
        let mut all = vec![TUS, ("Upload-Length", "5")];
        all.extend_from_slice(&headers);
        let reply = send("POST", &daemon.url("/files/"), &all, None);
        assert_eq!(reply.status, 401, "{headers:?}: {reply:?}");
        assert!(
            reply
                .header("www-authenticate")
                .is_some_and(|c| c.starts_with("Bearer")),
            "{reply:?}"
        );
        assert_eq!(reply.header("tus-resumable"), Some("1.0.0"));
        let mut all = vec![TUS];
        all.extend_from_slice(&headers);
        assert_eq!(send("HEAD", &daemon.url(&path), &all, None).status, 401);
    }

    // 403: the tenant is not granted tus.
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("dify-only-key"),
        &[("Upload-Length", "5")],
        None,
    );
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(head(&daemon, "dify-only-key", &id).status, 403);

    // 404: another tenant's upload, and ids that are not tus ids.
    assert_eq!(head(&daemon, "other-key", &id).status, 404);
    assert_eq!(patch(&daemon, "other-key", &id, 0, b"stolen", &[]).status, 404);
    assert_eq!(
        tus(&daemon, "DELETE", &path, Some("other-key"), &[], None).status,
        404
    );
    assert_eq!(
        offset_of(&daemon, "demo-key", &id),
        0,
        "the owner's upload is untouched"
    );
    let upper = id.to_ascii_uppercase();
    let unknown = "0".repeat(32);
    let longer = format!("{id}0");
    for bad in [
        "not-an-id",
        &id[..31],
        longer.as_str(),
        upper.as_str(),
        unknown.as_str(),
        "upload",
    ] {
        let path = format!("/files/{bad}");
        let reply = tus(&daemon, "HEAD", &path, Some("demo-key"), &[], None);
        assert_eq!(reply.status, 404, "HEAD {bad}: {reply:?}");
        let reply = tus(
            &daemon,
            "PATCH",
            &path,
            Some("demo-key"),
            &[("Upload-Offset", "0")],
            Some(b"x"),
        );
        assert_eq!(reply.status, 404, "PATCH {bad}: {reply:?}");
    }

    // 409: the offset the client believes in is not the upload's.
    patch_ok(&daemon, "demo-key", &id, 0, b"first");
    for wrong in [0, 3, 6, 100] {
        let reply = patch(&daemon, "demo-key", &id, wrong, b"again", &[]);
        assert_eq!(reply.status, 409, "offset {wrong}: {reply:?}");
        assert_eq!(reply.header("upload-offset"), Some("5"), "{reply:?}");
    }
    assert_eq!(offset_of(&daemon, "demo-key", &id), 5);
    // 400: no or a malformed Upload-Offset.
    let reply = tus(&daemon, "PATCH", &path, Some("demo-key"), &[], Some(b"x"));
    assert_eq!(reply.status, 400, "{reply:?}");
    let reply = tus(
        &daemon,
        "PATCH",
        &path,
        Some("demo-key"),
        &[("Upload-Offset", "-5")],
        Some(b"x"),
    );
    assert_eq!(reply.status, 400, "{reply:?}");

    // 415: a PATCH without the offset stream media type.
    let auth = bearer("demo-key");
    let headers = [TUS, ("Authorization", auth.as_str()), ("Upload-Offset", "5")];
    let reply = send(
        "PATCH",
        &daemon.url(&path),
        &headers,
        Some(("application/octet-stream", b"more".to_vec())),
    );
    assert_eq!(reply.status, 415, "{reply:?}");
    let reply = raw(&daemon, "PATCH", &path, &headers, b"more");
    assert_eq!(reply.status, 415, "no Content-Type: {reply:?}");
    assert_eq!(offset_of(&daemon, "demo-key", &id), 5);
    // The same for a creation's body.
    let reply = send(
        "POST",
        &daemon.url("/files/"),
        &[TUS, ("Authorization", auth.as_str()), ("Upload-Length", "4")],
        Some(("text/plain", b"body".to_vec())),
    );
    assert_eq!(reply.status, 415, "{reply:?}");

    // 415: an extension the plan does not allow, at creation.
    for name in ["tool.exe", "README"] {
        let meta = metadata(name);
        let reply = tus(
            &daemon,
            "POST",
            "/files/",
            Some("small-key"),
            &[("Upload-Length", "10"), ("Upload-Metadata", &meta)],
            None,
        );
        assert_eq!(reply.status, 415, "{name}: {reply:?}");
        assert_eq!(reply.header("location"), None);
    }
    // 400: a name that could be a path, and metadata that is not base64.
    let meta = format!("filename {}", b64(b"../etc/passwd"));
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[("Upload-Length", "10"), ("Upload-Metadata", &meta)],
        None,
    );
    assert_eq!(reply.status, 400, "{reply:?}");
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[("Upload-Length", "10"), ("Upload-Metadata", "filename !!!")],
        None,
    );
    assert_eq!(reply.status, 400, "{reply:?}");
    // Bodies are short plain text.
    assert!(
        reply.header("content-type").unwrap().starts_with("text/plain"),
        "{reply:?}"
    );
    assert!(!reply.text.trim().is_empty());
}

#[test]
fn content_that_contradicts_the_extension_is_refused_when_the_first_bytes_arrive() {
    let daemon = Daemon::start_with(config);
    // The first PATCH carries enough bytes to tell: 415, nothing kept.
    let id = create(&daemon, "demo-key", 20_000, "photo.png");
    let mut fake = ELF.to_vec();
    fake.resize(9000, 0);
    let reply = patch(&daemon, "demo-key", &id, 0, &fake, &[]);
    assert_eq!(reply.status, 415, "{reply:?}");
    assert_eq!(offset_of(&daemon, "demo-key", &id), 0);
    assert_eq!(std::fs::metadata(session_file(&daemon, &id)).unwrap().len(), 0);
    // A real PNG goes through.
    let real = png_of(20_000);
    patch_ok(&daemon, "demo-key", &id, 0, &real[..9000]);
    let reply = patch_ok(&daemon, "demo-key", &id, 9000, &real[9000..]);
    assert!(reply.header("upgate-upload-id").is_some());

    // A short upload is checked whole at its last byte.
    let id = create(&daemon, "small-key", 100, "tiny.png");
    let reply = patch(&daemon, "small-key", &id, 0, &text_of(100), &[]);
    assert_eq!(reply.status, 415, "{reply:?}");
    assert_eq!(offset_of(&daemon, "small-key", &id), 0);
    // Bytes too few to tell are kept; the PATCH that makes them enough is refused whole.
    let id = create(&daemon, "demo-key", 20_000, "later.png");
    patch_ok(&daemon, "demo-key", &id, 0, &text_of(100));
    let reply = patch(&daemon, "demo-key", &id, 100, &text_of(9000), &[]);
    assert_eq!(reply.status, 415, "{reply:?}");
    assert_eq!(offset_of(&daemon, "demo-key", &id), 100);
    assert_eq!(std::fs::metadata(session_file(&daemon, &id)).unwrap().len(), 100);

    // The same in a creation's body: refused, and no upload is left behind.
    let before = open_sessions(&daemon);
    let meta = metadata("posted.png");
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[("Upload-Length", "20000"), ("Upload-Metadata", &meta)],
        Some(&fake),
    );
    assert_eq!(reply.status, 415, "{reply:?}");
    assert_eq!(reply.header("location"), None);
    assert_eq!(open_sessions(&daemon), before);
    assert_eq!(uploads(&daemon), 1);
}

#[test]
fn checksums_are_checked_per_request() {
    let daemon = Daemon::start_with(config);
    let chunks: [&[u8]; 3] = [
        b"tus checksum chunk one\n",
        b"tus checksum chunk two\n",
        b"tus checksum chunk three\n",
    ];
    // Digests computed with openssl: sha1 of the first, md5 of the second, sha256 of the third.
    let sha1_one = "sha1 RE/L3BLPUp/lcaeNLyoOBvXTLEc=";
    let md5_two = "md5 4/fPQ+q3FyKnbKBQgbtjTA==";
    let sha256_three = "sha256 Y2WtClReNMzzK+ORql0jIFV5gfGPvLbdMXW9AZHInwE=";
    assert_eq!(
        format!("sha256 {}", b64(&hex::decode(sha256_hex(chunks[2])).unwrap())),
        sha256_three,
        "the test's own base64"
    );
    let content = chunks.concat();
    let id = create(&daemon, "demo-key", content.len() as u64, "summed.txt");
    let (one, two) = (chunks[0].len() as u64, (chunks[0].len() + chunks[1].len()) as u64);

    let reply = patch(
        &daemon,
        "demo-key",
        &id,
        0,
        chunks[0],
        &[("Upload-Checksum", sha1_one)],
    );
    assert_eq!(reply.status, 204, "{reply:?}");
    assert_eq!(reply.header("upload-offset"), Some(one.to_string().as_str()));

    // A mismatch: 460, the chunk discarded.
    for wrong in [sha1_one, "md5 pqHbfKeGo3YLcCgqxRZecQ==", sha256_three] {
        let reply = patch(
            &daemon,
            "demo-key",
            &id,
            one,
            chunks[1],
            &[("Upload-Checksum", wrong)],
        );
        assert_eq!(reply.status, 460, "{wrong}: {reply:?}");
        assert_eq!(offset_of(&daemon, "demo-key", &id), one);
        assert_eq!(std::fs::read(session_file(&daemon, &id)).unwrap(), chunks[0]);
    }
    // An algorithm not spoken, or a digest that is not one: 400, nothing written.
    for bad in ["crc32 AAAAAA==", "sha1 AAAA", "sha1", "md5 not*base64"] {
        let reply = patch(
            &daemon,
            "demo-key",
            &id,
            one,
            chunks[1],
            &[("Upload-Checksum", bad)],
        );
        assert_eq!(reply.status, 400, "{bad}: {reply:?}");
        assert_eq!(offset_of(&daemon, "demo-key", &id), one);
    }

    let reply = patch(
        &daemon,
        "demo-key",
        &id,
        one,
        chunks[1],
        &[("Upload-Checksum", md5_two)],
    );
    assert_eq!(reply.status, 204, "{reply:?}");
    assert_eq!(reply.header("upload-offset"), Some(two.to_string().as_str()));
    let reply = patch(
        &daemon,
        "demo-key",
        &id,
        two,
        chunks[2],
        &[("Upload-Checksum", sha256_three)],
    );
    assert_eq!(reply.status, 204, "{reply:?}");
    assert_completed(&daemon, &reply, &content, "summed.txt");

    // Creation-with-upload checks the POST's body too; the refused upload does not linger.
    let before = open_sessions(&daemon);
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[("Upload-Length", "100"), ("Upload-Checksum", md5_two)],
        Some(chunks[0]),
    );
    assert_eq!(reply.status, 460, "{reply:?}");
    assert_eq!(open_sessions(&daemon), before);
    assert_eq!(uploads(&daemon), 1);
}

#[test]
fn termination_removes_the_bytes_and_the_upload() {
    let daemon = Daemon::start_with(config);
    let id = create(&daemon, "demo-key", 100, "gone.txt");
    patch_ok(&daemon, "demo-key", &id, 0, &text_of(40));
    assert!(session_file(&daemon, &id).exists());
    let path = format!("/files/{id}");
    let reply = tus(&daemon, "DELETE", &path, Some("demo-key"), &[], None);
    assert_eq!(reply.status, 204, "{reply:?}");
    assert_eq!(reply.header("tus-resumable"), Some("1.0.0"));
    let reply = head(&daemon, "demo-key", &id);
    assert!(matches!(reply.status, 404 | 410), "{reply:?}");
    assert!(!daemon.data_dir().join("sessions").join(&id).exists());
    let reply = patch(&daemon, "demo-key", &id, 40, &text_of(60), &[]);
    assert!(matches!(reply.status, 404 | 410), "{reply:?}");
    let reply = tus(&daemon, "DELETE", &path, Some("demo-key"), &[], None);
    assert!(matches!(reply.status, 404 | 410), "{reply:?}");
    assert_eq!(uploads(&daemon), 0);
}

#[test]
fn an_expired_upload_is_gone_and_swept_from_disk() {
    let daemon =
        Daemon::start_with(|dir| with_server(config(dir), "  session_expiry: 1s\n  sweep_interval: 1s\n"));
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[("Upload-Length", "100")],
        Some(&text_of(30)),
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_expires_in(&reply, 1);
    let id = location_id(&reply);
    assert!(session_file(&daemon, &id).exists());
    assert!(
        eventually(Duration::from_secs(5), || matches!(
            head(&daemon, "demo-key", &id).status,
            404 | 410
        )),
        "{:?}",
        head(&daemon, "demo-key", &id)
    );
    let reply = patch(&daemon, "demo-key", &id, 30, &text_of(70), &[]);
    assert!(matches!(reply.status, 404 | 410), "{reply:?}");
    assert_swept(&daemon, &id);
    assert_eq!(head(&daemon, "demo-key", &id).status, 404);
    assert_eq!(uploads(&daemon), 0);
}

#[test]
fn concatenation_joins_partial_uploads() {
    let daemon = Daemon::start_with(config);
    let partial = |bytes: &[u8]| {
        let length = bytes.len().to_string();
        let reply = tus(
            &daemon,
            "POST",
            "/files/",
            Some("demo-key"),
            &[("Upload-Length", &length), ("Upload-Concat", "partial")],
            None,
        );
        assert_eq!(reply.status, 201, "{reply:?}");
        location_id(&reply)
    };
    let (a_bytes, b_bytes) = (text_of(1500), b"the second part\n".repeat(40));
    let a = partial(&a_bytes);
    let b = partial(&b_bytes);
    patch_ok(&daemon, "demo-key", &a, 0, &a_bytes[..700]);
    patch_ok(&daemon, "demo-key", &a, 700, &a_bytes[700..]);
    // A complete partial is no upload of its own.
    let reply = patch_ok(&daemon, "demo-key", &b, 0, &b_bytes);
    assert_eq!(reply.header("upgate-upload-id"), None);
    assert_eq!(uploads(&daemon), 0);
    assert_eq!(
        head(&daemon, "demo-key", &a).header("upload-concat"),
        Some("partial")
    );

    let final_of = |parts: String, name: &str| {
        let meta = metadata(name);
        tus(
            &daemon,
            "POST",
            "/files/",
            Some("demo-key"),
            &[("Upload-Concat", &parts), ("Upload-Metadata", &meta)],
            None,
        )
    };
    let reply = final_of(format!("final;/files/{a} /files/{b}"), "joined.txt");
    assert_eq!(reply.status, 201, "{reply:?}");
    let joined_id = location_id(&reply);
    let joined = [a_bytes.as_slice(), b_bytes.as_slice()].concat();
    assert_eq!(
        reply.header("upload-offset"),
        Some(joined.len().to_string().as_str())
    );
    assert_completed(&daemon, &reply, &joined, "joined.txt");
    // tus 1.0: a final upload's HEAD names its partial uploads, in order.
    let reply = head(&daemon, "demo-key", &joined_id);
    let named = format!("final;/files/{a} /files/{b}");
    assert_eq!(reply.header("upload-concat"), Some(named.as_str()), "{reply:?}");
    assert_eq!(
        reply.header("upload-length"),
        Some(joined.len().to_string().as_str())
    );
    // The partials are used up: gone with their bytes, so they can be joined no more.
    for part in [&a, &b] {
        assert_eq!(head(&daemon, "demo-key", part).status, 404);
        assert!(!session_file(&daemon, part).exists());
    }
    let reply = final_of(format!("final;/files/{a}"), "again.txt");
    assert_eq!(reply.status, 404, "{reply:?}");

    // The other order, named by absolute URLs.
    let (a, b) = (partial(&a_bytes), partial(&b_bytes));
    patch_ok(&daemon, "demo-key", &a, 0, &a_bytes);
    patch_ok(&daemon, "demo-key", &b, 0, &b_bytes);
    let reply = final_of(
        format!("final;{0}/files/{b} {0}/files/{a}", daemon.base_url),
        "reversed.txt",
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_completed(
        &daemon,
        &reply,
        &[b_bytes.as_slice(), a_bytes.as_slice()].concat(),
        "reversed.txt",
    );

    // A partial that is not complete yet, an upload that is no partial, another tenant's
    // partial, something that is no upload URL, a partial named twice, a final upload with
    // a deferred length: refused, nothing recorded.
    let a = partial(&a_bytes);
    patch_ok(&daemon, "demo-key", &a, 0, &a_bytes);
    let reply = final_of(format!("final;/files/{a} /files/{a}"), "x.txt");
    assert_eq!(reply.status, 400, "{reply:?}");
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[
            ("Upload-Concat", &format!("final;/files/{a}")),
            ("Upload-Defer-Length", "1"),
        ],
        None,
    );
    assert_eq!(reply.status, 400, "{reply:?}");
    let open = partial(b"0123456789");
    patch_ok(&daemon, "demo-key", &open, 0, b"01234");
    let reply = final_of(format!("final;/files/{a} /files/{open}"), "x.txt");
    assert_eq!(reply.status, 400, "{reply:?}");
    let plain = create(&daemon, "demo-key", 5, "plain.txt");
    let reply = final_of(format!("final;/files/{a} /files/{plain}"), "x.txt");
    assert_eq!(reply.status, 400, "{reply:?}");
    let theirs = tus(
        &daemon,
        "POST",
        "/files/",
        Some("other-key"),
        &[("Upload-Length", "3"), ("Upload-Concat", "partial")],
        Some(b"abc"),
    );
    let theirs = location_id(&theirs);
    let reply = final_of(format!("final;/files/{a} /files/{theirs}"), "x.txt");
    assert_eq!(reply.status, 404, "{reply:?}");
    let reply = final_of("final;/files/../../etc/passwd".into(), "x.txt");
    assert_eq!(reply.status, 400, "{reply:?}");
    let reply = final_of("final;".into(), "x.txt");
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(uploads(&daemon), 2);
}

/// How tus-js-client's `parallelUploads` sends file after file: the partials each final
/// upload used up do not count against `max_open_sessions`, so the tenant is never locked
/// out by files it finished.
#[test]
fn joined_partials_no_longer_count_as_open_uploads() {
    let daemon = Daemon::start_with(|dir| {
        config(dir).replacen("  default:\n", "  default:\n    max_open_sessions: 3\n", 1)
    });
    for round in 0..4 {
        let parts: Vec<String> = (0..3)
            .map(|index| {
                let reply = tus(
                    &daemon,
                    "POST",
                    "/files/",
                    Some("demo-key"),
                    &[("Upload-Length", "4"), ("Upload-Concat", "partial")],
                    Some(format!("{round}-{index}.").as_bytes()),
                );
                assert_eq!(reply.status, 201, "round {round}: {reply:?}");
                format!("/files/{}", location_id(&reply))
            })
            .collect();
        let reply = tus(
            &daemon,
            "POST",
            "/files/",
            Some("demo-key"),
            &[
                ("Upload-Concat", &format!("final;{}", parts.join(" "))),
                ("Upload-Metadata", &metadata("joined.txt")),
            ],
            None,
        );
        assert_eq!(reply.status, 201, "round {round}: {reply:?}");
    }
    assert_eq!(uploads(&daemon), 4);
}

#[test]
fn partial_uploads_are_parts_and_only_the_final_upload_is_a_file() {
    // How tus-js-client uploads in parallel: partials with no metadata (the name goes with the
    // final), each holding a slice of the file, its first slice starting with the file's
    // magic number.
    let daemon = Daemon::start_with(config);
    let photo = png_of(900);
    let partial = |key: &str, bytes: &[u8]| {
        let length = bytes.len().to_string();
        let reply = tus(
            &daemon,
            "POST",
            "/files/",
            Some(key),
            &[("Upload-Length", &length), ("Upload-Concat", "partial")],
            Some(bytes),
        );
        assert_eq!(reply.status, 201, "{reply:?}");
        assert_eq!(reply.header("upload-offset"), Some(length.as_str()), "{reply:?}");
        location_id(&reply)
    };
    let final_of = |key: &str, parts: &[String], name: &str| {
        let parts: Vec<String> = parts.iter().map(|id| format!("/files/{id}")).collect();
        let concat = format!("final;{}", parts.join(" "));
        let meta = metadata(name);
        tus(
            &daemon,
            "POST",
            "/files/",
            Some(key),
            &[("Upload-Concat", &concat), ("Upload-Metadata", &meta)],
            None,
        )
    };
    // The small plan allows png and txt only: nameless partials are still parts of a png.
    for key in ["demo-key", "small-key"] {
        let parts = [partial(key, &photo[..300]), partial(key, &photo[300..])];
        let reply = final_of(key, &parts, "photo.png");
        assert_eq!(reply.status, 201, "{key}: {reply:?}");
        assert_completed(&daemon, &reply, &photo, "photo.png");
    }
    // The final upload is checked as the file it is: its name, its content, its size.
    let parts = [
        partial("small-key", &photo[..300]),
        partial("small-key", &photo[300..]),
    ];
    assert_eq!(final_of("small-key", &parts, "photo.exe").status, 415);
    assert_eq!(final_of("small-key", &parts, "photo.txt").status, 415);
    let more = [
        partial("small-key", &photo[..600]),
        partial("small-key", &photo[..600]),
    ];
    assert_eq!(final_of("small-key", &more, "twice.png").status, 413);
    assert_eq!(uploads(&daemon), 2);
}

#[test]
fn x_http_method_override_stands_in_for_patch_head_and_delete() {
    let daemon = Daemon::start_with(config);
    let content = text_of(800);
    let id = create(&daemon, "demo-key", 800, "override.txt");
    let path = format!("/files/{id}");
    let over = |method: &str, headers: &[(&str, &str)], body: Option<&[u8]>| {
        let mut all = vec![("X-HTTP-Method-Override", method)];
        all.extend_from_slice(headers);
        tus(&daemon, "POST", &path, Some("demo-key"), &all, body)
    };
    let reply = over("PATCH", &[("Upload-Offset", "0")], Some(&content[..300]));
    assert_eq!(reply.status, 204, "{reply:?}");
    assert_eq!(reply.header("upload-offset"), Some("300"));
    let reply = over("HEAD", &[], None);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("upload-offset"), Some("300"));
    let reply = over("PATCH", &[("Upload-Offset", "0")], Some(&content[300..]));
    assert_eq!(reply.status, 409, "{reply:?}");
    let reply = over("PATCH", &[("Upload-Offset", "300")], Some(&content[300..]));
    assert_eq!(reply.status, 204, "{reply:?}");
    assert_completed(&daemon, &reply, &content, "override.txt");

    let id = create(&daemon, "demo-key", 800, "cancelled.txt");
    let path = format!("/files/{id}");
    let reply = tus(
        &daemon,
        "POST",
        &path,
        Some("demo-key"),
        &[("X-HTTP-Method-Override", "DELETE")],
        None,
    );
    assert_eq!(reply.status, 204, "{reply:?}");
    assert!(matches!(head(&daemon, "demo-key", &id).status, 404 | 410));
    // A POST on an upload without an override is no request tus knows.
    let id = create(&daemon, "demo-key", 800, "plain.txt");
    let reply = tus(
        &daemon,
        "POST",
        &format!("/files/{id}"),
        Some("demo-key"),
        &[],
        None,
    );
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(offset_of(&daemon, "demo-key", &id), 0);
}

#[test]
fn a_kill_between_two_patches_loses_nothing_acknowledged() {
    let mut daemon = Daemon::start_with(config);
    let content = text_of(200_000);
    let id = create(&daemon, "demo-key", content.len() as u64, "durable.txt");
    patch_ok(&daemon, "demo-key", &id, 0, &content[..120_000]);
    daemon.kill();
    // What a crash mid-request may leave after the acknowledged offset: bytes never
    // acknowledged, which must not become part of the file.
    std::fs::OpenOptions::new()
        .append(true)
        .open(session_file(&daemon, &id))
        .unwrap()
        .write_all(b"torn tail of a request that was never answered")
        .unwrap();

    let daemon = Daemon::spawn(daemon.dir.clone(), daemon.config_path.clone(), &[]);
    assert_eq!(offset_of(&daemon, "demo-key", &id), 120_000);
    let reply = patch(&daemon, "demo-key", &id, 120_047, &content[120_000..], &[]);
    assert_eq!(reply.status, 409, "{reply:?}");
    assert_eq!(reply.header("upload-offset"), Some("120000"));
    patch_ok(&daemon, "demo-key", &id, 120_000, &content[120_000..150_000]);
    let reply = patch_ok(&daemon, "demo-key", &id, 150_000, &content[150_000..]);
    assert_completed(&daemon, &reply, &content, "durable.txt");
}

#[test]
fn async_delivery_completes_a_tus_upload() {
    let daemon = Daemon::start_with(|dir| {
        config(dir).replace(
            "  disk:\n    plugin: local\n",
            "  disk:\n    plugin: local\n    delivery: async\n",
        )
    });
    let content = text_of(5000);
    let id = create(&daemon, "demo-key", 5000, "later.txt");
    patch_ok(&daemon, "demo-key", &id, 0, &content[..2000]);
    let reply = patch_ok(&daemon, "demo-key", &id, 2000, &content[2000..]);
    let record_id = reply
        .header("upgate-upload-id")
        .unwrap_or_else(|| panic!("{reply:?}"))
        .to_owned();
    assert!(
        eventually(Duration::from_secs(10), || record(&daemon, &record_id).0
            == "forwarded"),
        "{:?}\n{}",
        record(&daemon, &record_id),
        daemon.log()
    );
    let (_, size, sha256, dialect, filename) = record(&daemon, &record_id);
    assert_eq!(
        (size, sha256, dialect.as_str(), filename.as_str()),
        (5000, sha256_hex(&content), "tus", "later.txt")
    );
    assert_eq!(
        std::fs::read(daemon.files_dir().join(&record_id)).unwrap(),
        content
    );
    assert!(eventually(Duration::from_secs(5), || daemon.spool_files() == 0));
    assert!(!daemon.data_dir().join("sessions").join(&id).exists());
}

#[test]
fn cors_lets_the_configured_origin_speak_every_dialect() {
    let daemon = Daemon::start_with(|dir| {
        with_server(
            config(dir),
            &format!("  cors:\n    allowed_origins: [\"{APP_ORIGIN}\"]\n"),
        )
    });
    let preflight = |origin: &str, path: &str| {
        send(
            "OPTIONS",
            &daemon.url(path),
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "PATCH"),
                (
                    "Access-Control-Request-Headers",
                    "tus-resumable, upload-offset, content-type, authorization",
                ),
            ],
            None,
        )
    };
    for path in [
        "/files/",
        "/files/0123456789abcdef0123456789abcdef",
        "/v1/files/upload",
    ] {
        let reply = preflight(APP_ORIGIN, path);
        assert_eq!(reply.status, 204, "{path}: {reply:?}");
        assert_eq!(reply.header("access-control-allow-origin"), Some(APP_ORIGIN));
        let methods = header_list(&reply, "access-control-allow-methods");
        for method in ["patch", "post", "head", "delete"] {
            assert!(methods.iter().any(|m| m == method), "{method}: {methods:?}");
        }
        let headers = header_list(&reply, "access-control-allow-headers");
        for name in [
            "tus-resumable",
            "upload-offset",
            "upload-length",
            "upload-metadata",
            "upload-checksum",
            "authorization",
            "x-api-key",
            "content-type",
        ] {
            assert!(headers.iter().any(|h| h == name), "{name}: {headers:?}");
        }
    }

    // Answers, errors included, carry the origin and the headers a browser must read.
    let big = metadata("big.txt");
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("small-key"),
        &[
            ("Origin", APP_ORIGIN),
            ("Upload-Length", "1001"),
            ("Upload-Metadata", &big),
        ],
        None,
    );
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(reply.header("access-control-allow-origin"), Some(APP_ORIGIN));
    let exposed = header_list(&reply, "access-control-expose-headers");
    for name in [
        "location",
        "upload-offset",
        "upload-length",
        "tus-resumable",
        "upgate-upload-id",
    ] {
        assert!(exposed.iter().any(|h| h == name), "{name}: {exposed:?}");
    }
    let form = Form::new().file("file", "big.txt", "text/plain", &text_of(1001));
    let reply = post_form(
        &daemon.url("/v1/files/upload"),
        &[("Authorization", "Bearer small-key"), ("Origin", APP_ORIGIN)],
        &form,
    );
    assert_eq!(reply.status, 413, "{}", reply.text);
    assert_eq!(reply.json()["code"], "file_too_large");
    assert_eq!(reply.header("access-control-allow-origin"), Some(APP_ORIGIN));
    let exposed = header_list(&reply, "access-control-expose-headers");
    assert!(exposed.iter().any(|h| h == "location") && exposed.iter().any(|h| h == "upload-offset"));
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[("Origin", APP_ORIGIN), ("Upload-Length", "4")],
        Some(b"cors"),
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(reply.header("access-control-allow-origin"), Some(APP_ORIGIN));
    let reply = send("HEAD", &daemon.url("/files/x"), &[("Origin", APP_ORIGIN)], None);
    assert_eq!(reply.status, 412, "{reply:?}");
    assert_eq!(reply.header("access-control-allow-origin"), Some(APP_ORIGIN));

    // An origin not listed gets no CORS header at all, preflight or not.
    let reply = preflight("http://evil.test", "/files/");
    assert!(!has_cors_headers(&reply), "{reply:?}");
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("small-key"),
        &[
            ("Origin", "http://evil.test"),
            ("Upload-Length", "1001"),
            ("Upload-Metadata", &big),
        ],
        None,
    );
    assert_eq!(reply.status, 413);
    assert!(!has_cors_headers(&reply), "{reply:?}");
    // But it says the answer depends on the origin, as one without any origin does: a
    // shared cache must not hand it to the listed origin.
    assert_eq!(reply.header("vary"), Some("Origin"), "{reply:?}");
    let reply = tus(
        &daemon,
        "HEAD",
        "/files/0123456789abcdef0123456789abcdef",
        Some("demo-key"),
        &[],
        None,
    );
    assert_eq!(reply.status, 404);
    assert_eq!(reply.header("vary"), Some("Origin"), "{reply:?}");

    // Without server.cors: none either.
    let plain = Daemon::start_with(config);
    let reply = send(
        "OPTIONS",
        &plain.url("/files/"),
        &[("Origin", APP_ORIGIN), ("Access-Control-Request-Method", "PATCH")],
        None,
    );
    assert!(!has_cors_headers(&reply), "{reply:?}");
    let reply = tus(
        &plain,
        "POST",
        "/files/",
        Some("small-key"),
        &[
            ("Origin", APP_ORIGIN),
            ("Upload-Length", "1001"),
            ("Upload-Metadata", &big),
        ],
        None,
    );
    assert_eq!(reply.status, 413);
    assert!(!has_cors_headers(&reply), "{reply:?}");
}

#[test]
fn difys_alias_under_files_still_works_next_to_tus() {
    let daemon = Daemon::start_with(config);
    let reply = post_form(
        &daemon.url("/files/upload"),
        &[("Authorization", "Bearer demo-key")],
        &Form::new().file("file", "a.png", "image/png", &png_of(200)),
    );
    assert_eq!(reply.status, 201, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body["mime_type"], "image/png");
    let id = body["id"].as_str().unwrap();
    assert_eq!(record(&daemon, id).3, "dify");
    // Dify's error shape there, not tus's.
    let reply = post_form(
        &daemon.url("/files/upload"),
        &[],
        &Form::new().file("file", "a.png", "image/png", &png_of(200)),
    );
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["code"], "unauthorized");
    // And tus at /files/ in the same daemon.
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[("Upload-Length", "3")],
        Some(b"abc"),
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    assert!(reply.header("upgate-upload-id").is_some());
    // `upload` is never a tus id.
    assert_eq!(head(&daemon, "demo-key", "upload").status, 404);
}

#[test]
fn two_patches_at_one_offset_are_applied_one_after_the_other() {
    let daemon = Daemon::start_with(config);
    let id = create(&daemon, "demo-key", 2000, "race.txt");
    let first = text_of(1000);
    // A PATCH that pauses halfway through its body...
    let address = daemon.base_url.trim_start_matches("http://");
    let mut slow = std::net::TcpStream::connect(address).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "PATCH /files/{id} HTTP/1.1\r\nHost: {address}\r\nTus-Resumable: 1.0.0\r\nAuthorization: Bearer demo-key\r\n\
Content-Type: {OFFSET_STREAM}\r\nUpload-Offset: 0\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n"
    );
    slow.write_all(head.as_bytes()).unwrap();
    slow.write_all(&first[..500]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    std::thread::scope(|scope| {
        // ...and another at the same offset meanwhile: it waits, then finds the offset moved.
        let racing = scope.spawn(|| patch(&daemon, "demo-key", &id, 0, &[b'X'; 1000], &[]));
        std::thread::sleep(Duration::from_millis(300));
        slow.write_all(&first[500..]).unwrap();
        let (status, answer) = RawUpload::read_answer(&mut slow).unwrap();
        assert_eq!(status, 204, "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("upload-offset: 1000"),
            "{answer}"
        );
        let racing = racing.join().unwrap();
        assert_eq!(racing.status, 409, "{racing:?}");
        assert_eq!(racing.header("upload-offset"), Some("1000"));
    });
    assert_eq!(offset_of(&daemon, "demo-key", &id), 1000);
    assert_eq!(std::fs::read(session_file(&daemon, &id)).unwrap(), first);
}

#[test]
fn a_patch_cut_off_mid_body_keeps_what_arrived_and_resumes_from_there() {
    let daemon = Daemon::start_with(config);
    let content = text_of(600_000);
    let id = create(&daemon, "demo-key", content.len() as u64, "cut.txt");
    patch_cut_off(&daemon, &id, 0, &content, 400_000);
    let kept = || offset_of(&daemon, "demo-key", &id);
    assert!(
        eventually(Duration::from_secs(5), || kept() > 0),
        "nothing of the cut PATCH was kept: {}",
        daemon.log()
    );
    let offset = kept();
    assert!(offset <= 400_000, "{offset}");
    assert_eq!(
        std::fs::read(session_file(&daemon, &id)).unwrap()[..offset as usize],
        content[..offset as usize]
    );
    let done = patch_ok(&daemon, "demo-key", &id, offset, &content[offset as usize..]);
    assert_completed(&daemon, &done, &content, "cut.txt");
}

/// A binary upload's sha256 is kept as its PATCHes arrive (the completion does not read the
/// file again): a refused PATCH, one cut off mid-body and a restart between two PATCHes each
/// leave the kept hash matching exactly the acknowledged bytes.
#[test]
fn the_sha256_kept_across_patches_is_that_of_the_acknowledged_bytes() {
    let mut daemon = Daemon::start_with(config);
    let content = png_of(900_000);
    let id = create(&daemon, "demo-key", content.len() as u64, "running.png");
    patch_ok(&daemon, "demo-key", &id, 0, &content[..300_000]);
    // Other bytes under the right bytes' checksum: refused, and not hashed on.
    let right = format!(
        "sha256 {}",
        b64(&hex::decode(sha256_hex(&content[300_000..600_000])).unwrap())
    );
    let reply = patch(
        &daemon,
        "demo-key",
        &id,
        300_000,
        &[0xaa; 300_000],
        &[("Upload-Checksum", &right)],
    );
    assert_eq!(reply.status, 460, "{reply:?}");
    patch_ok(&daemon, "demo-key", &id, 300_000, &content[300_000..600_000]);
    patch_cut_off(&daemon, &id, 600_000, &content, 150_000);
    let kept = || offset_of(&daemon, "demo-key", &id);
    assert!(
        eventually(Duration::from_secs(5), || kept() > 600_000),
        "nothing of the cut PATCH was kept: {}",
        daemon.log()
    );
    let offset = kept();
    let done = patch_ok(&daemon, "demo-key", &id, offset, &content[offset as usize..]);
    assert_completed(&daemon, &done, &content, "running.png");

    // A restart between two PATCHes: the new process never saw the first bytes.
    let id = create(&daemon, "demo-key", content.len() as u64, "restarted.png");
    patch_ok(&daemon, "demo-key", &id, 0, &content[..400_000]);
    daemon.kill();
    let daemon = Daemon::spawn(daemon.dir.clone(), daemon.config_path.clone(), &[]);
    let done = patch_ok(&daemon, "demo-key", &id, 400_000, &content[400_000..]);
    assert_completed(&daemon, &done, &content, "restarted.png");
}

/// An empty file: complete as soon as it is created (clients send no PATCH for it), as an
/// upload of its own or as an empty partial of a final upload; and a final upload takes no
/// PATCH (403).
#[test]
fn empty_uploads_complete_at_creation_and_a_final_upload_takes_no_patch() {
    let daemon = Daemon::start_with(config);
    let meta = metadata("empty.txt");
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[("Upload-Length", "0"), ("Upload-Metadata", &meta)],
        None,
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(reply.header("upload-offset"), Some("0"));
    assert_completed(&daemon, &reply, b"", "empty.txt");

    let partial = |length: &str| {
        let reply = tus(
            &daemon,
            "POST",
            "/files/",
            Some("demo-key"),
            &[("Upload-Length", length), ("Upload-Concat", "partial")],
            None,
        );
        assert_eq!(reply.status, 201, "{reply:?}");
        location_id(&reply)
    };
    let (empty, full) = (partial("0"), partial("12"));
    patch_ok(&daemon, "demo-key", &full, 0, b"twelve bytes");
    let meta = metadata("joined.txt");
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[
            ("Upload-Concat", &format!("final;/files/{empty} /files/{full}")),
            ("Upload-Metadata", &meta),
        ],
        None,
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_completed(&daemon, &reply, b"twelve bytes", "joined.txt");
    let joined = location_id(&reply);
    let reply = patch(&daemon, "demo-key", &joined, 12, b"", &[]);
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(reply.header("tus-resumable"), Some("1.0.0"));
}

/// A tenant whose day's quota is used up can still look its uploads up and remove them:
/// `HEAD` and `DELETE` add nothing, so the quota and concurrency caps do not apply to them.
#[test]
fn head_and_delete_pass_when_the_quota_is_used_up() {
    let daemon = Daemon::start_with(|dir| {
        config(dir).replace(
            "plans:\n",
            "plans:\n  oneaday:\n    max_file_size: 1MiB\n    daily_uploads: 1\n",
        ) + "  oneaday:\n    plan: oneaday\n    provider: disk\n    keys: [oneaday-key]\n"
    });
    let waiting = create(&daemon, "oneaday-key", 10, "later.txt");
    let done = create(&daemon, "oneaday-key", 4, "done.txt");
    let reply = patch_ok(&daemon, "oneaday-key", &done, 0, b"done");
    assert_completed(&daemon, &reply, b"done", "done.txt");
    // The day's one upload is used: another is refused...
    let reply = patch(&daemon, "oneaday-key", &waiting, 0, b"0123456789", &[]);
    assert_eq!(reply.status, 429, "{reply:?}");
    // ...but the waiting upload can be looked up and terminated.
    assert_eq!(offset_of(&daemon, "oneaday-key", &waiting), 0);
    let reply = tus(
        &daemon,
        "DELETE",
        &format!("/files/{waiting}"),
        Some("oneaday-key"),
        &[],
        None,
    );
    assert_eq!(reply.status, 204, "{reply:?}");
}

/// A final upload whose completion fails (its joined content contradicts its name) is gone
/// with the answer: no PATCH could resume it. Its partials stay, to be joined again.
#[test]
fn a_final_upload_that_fails_to_complete_leaves_only_its_partials() {
    let daemon = Daemon::start_with(config);
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[("Upload-Length", "10"), ("Upload-Concat", "partial")],
        None,
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    let part = location_id(&reply);
    patch_ok(&daemon, "demo-key", &part, 0, b"plain text");
    let before = open_sessions(&daemon);
    let meta = metadata("picture.png");
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[
            ("Upload-Concat", &format!("final;/files/{part}")),
            ("Upload-Metadata", &meta),
        ],
        None,
    );
    assert_eq!(reply.status, 415, "{reply:?}");
    assert_eq!(
        open_sessions(&daemon),
        before,
        "the final upload's row and files went"
    );
    assert_eq!(head(&daemon, "demo-key", &part).status, 200);
    assert_eq!(uploads(&daemon), 0);
}

/// Opens a PATCH of `id` at `offset` announcing `length` bytes and sends `first` of them;
/// the rest is the caller's to send (or not).
fn slow_patch(
    daemon: &Daemon,
    key: &str,
    id: &str,
    offset: u64,
    length: usize,
    first: &[u8],
) -> std::net::TcpStream {
    let address = daemon.base_url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let head = format!(
        "PATCH /files/{id} HTTP/1.1\r\nHost: {address}\r\nTus-Resumable: 1.0.0\r\nAuthorization: Bearer {key}\r\n\
Content-Type: {OFFSET_STREAM}\r\nUpload-Offset: {offset}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(first).unwrap();
    stream
}

#[test]
fn another_tenant_is_answered_404_at_once_while_a_patch_holds_the_upload() {
    let daemon = Daemon::start_with(config);
    let id = create(&daemon, "demo-key", 1000, "held.txt");
    let path = format!("/files/{id}");
    let mut slow = slow_patch(&daemon, "demo-key", &id, 0, 1000, &text_of(100));
    std::thread::sleep(Duration::from_millis(300));
    // Each would have waited for the PATCH's hold before finding the id is not theirs.
    for (method, body) in [("PATCH", Some(&b"x"[..])), ("DELETE", None), ("HEAD", None)] {
        let started = std::time::Instant::now();
        let reply = tus(
            &daemon,
            method,
            &path,
            Some("other-key"),
            &[("Upload-Offset", "0")],
            body,
        );
        assert_eq!(reply.status, 404, "{method}: {reply:?}");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{method} took {:?}",
            started.elapsed()
        );
    }
    slow.write_all(&text_of(1000)[100..]).unwrap();
    let (status, answer) = RawUpload::read_answer(&mut slow).unwrap();
    assert_eq!(status, 204, "{answer}");
}

#[test]
fn a_patch_still_arriving_when_its_upload_expires_is_410_and_the_upload_swept() {
    let daemon = Daemon::start_with(|dir| {
        with_server(
            config(dir),
            "  session_expiry: 2s\n  sweep_interval: 1s\n  min_body_rate: 0\n",
        )
    });
    let id = create(&daemon, "demo-key", 1000, "late.txt");
    let started = std::time::Instant::now();
    let mut slow = slow_patch(&daemon, "demo-key", &id, 0, 1000, &text_of(10));
    // A byte every 400 ms (within idle_timeout): the body would take over six minutes.
    let answer = std::thread::scope(|scope| {
        let mut writer = slow.try_clone().unwrap();
        scope.spawn(move || {
            for _ in 0..25 {
                std::thread::sleep(Duration::from_millis(400));
                if writer.write_all(b"y").is_err() {
                    break;
                }
            }
        });
        let answer = RawUpload::read_answer(&mut slow).unwrap();
        let _ = slow.shutdown(std::net::Shutdown::Both);
        (answer, started.elapsed())
    });
    let ((status, text), answered) = answer;
    assert_eq!(status, 410, "{text}");
    assert!(answered < Duration::from_secs(6), "answered after {answered:?}");
    assert_swept(&daemon, &id);
    assert!(!daemon.log().contains("ERROR"), "{}", daemon.log());
    assert_eq!(head(&daemon, "demo-key", &id).status, 404);
}

#[test]
fn a_patch_on_a_completed_upload_writes_nothing() {
    let daemon = Daemon::start_with(config);
    let content = text_of(5000);
    let length = content.len().to_string();
    let reply = tus(
        &daemon,
        "POST",
        "/files/",
        Some("demo-key"),
        &[
            ("Upload-Length", &length),
            ("Upload-Metadata", &metadata("done.txt")),
        ],
        Some(&content),
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    let id = location_id(&reply);
    let dir = daemon.data_dir().join("sessions").join(&id);
    assert!(
        eventually(Duration::from_secs(2), || !session_file(&daemon, &id).exists()),
        "the completed upload kept its own copy in {}",
        dir.display()
    );
    // At its end, empty: nothing changes.
    let reply = patch(&daemon, "demo-key", &id, 5000, b"", &[]);
    assert_eq!(reply.status, 204, "{reply:?}");
    assert_eq!(reply.header("upload-offset"), Some("5000"));
    // Any byte more is beyond its length.
    let reply = patch(&daemon, "demo-key", &id, 5000, b"more", &[]);
    assert_eq!(reply.status, 413, "{reply:?}");
    assert!(
        !session_file(&daemon, &id).exists(),
        "a PATCH recreated the upload's file"
    );
    assert_eq!(uploads(&daemon), 1);
}

#[test]
fn options_with_a_key_is_admitted_like_any_request() {
    let daemon = Daemon::start_with(|dir| {
        config(dir).replace(
            "  default:\n    max_file_size: 1MiB\n",
            "  default:\n    max_file_size: 1MiB\n    rate_limit: { requests_per_second: 1, burst: 3 }\n",
        )
    });
    let options = || tus(&daemon, "OPTIONS", "/files/", Some("demo-key"), &[], None);
    let first = options();
    assert_eq!(first.status, 204, "{first:?}");
    assert_eq!(first.header("tus-max-size"), Some("1048576"));
    // The key's rate applies: past its burst the limit is left out, as for an unknown key.
    let limited = (0..6)
        .map(|_| options())
        .filter(|reply| reply.header("tus-max-size").is_none())
        .count();
    assert!(limited > 0, "OPTIONS is not rate limited: {}", daemon.log());
    let unknown = tus(&daemon, "OPTIONS", "/files/", Some("nobody-key"), &[], None);
    assert_eq!((unknown.status, unknown.header("tus-max-size")), (204, None));
    assert!(daemon.log().contains("tenant=demo"), "{}", daemon.log());
}

/// `config` with the `demo` tenant forwarding through the `dify` plugin to `mock` (sync,
/// two attempts per delivery).
fn forwarding(dir: &Path, mock: &MockUpstream) -> String {
    config(dir)
        .replace(
            "providers:\n",
            &format!(
                "providers:\n  up:\n    plugin: dify\n    retry: {{ max_attempts: 2, initial_backoff: 20ms, max_backoff: 20ms }}\n    settings:\n      base_url: {}\n      api_key: {}\n",
                mock.base_url(),
                mock.api_key()
            ),
        )
        .replacen("    provider: disk\n", "    provider: up\n", 1)
}

/// tus-js-client resumes a failed last PATCH with a HEAD alone: seeing its offset at the
/// length, it reports success and sends nothing more. So a HEAD of an upload whose bytes
/// are all there but whose completion failed makes the upload then, once; the HEADs and
/// empty PATCHes after it change nothing. The states a failure or a crash leaves are each
/// met: the note taken back (the 502), the note of a failed record left (its take-back
/// failed), the note of a record never written (the daemon died in between), and a record
/// that failed after its upload was made (an async delivery that gave up later), which is
/// the answer and is not made again.
/// An upload whose last PATCH got 502 (its sync delivery refused twice): its id, and the
/// failed record that completion left.
fn failed_last_patch(daemon: &Daemon, mock: &MockUpstream, name: &str, content: &[u8]) -> (String, String) {
    let id = create(daemon, "demo-key", content.len() as u64, name);
    patch_ok(daemon, "demo-key", &id, 0, &content[..1000]);
    mock.fail_next(2, 500);
    let reply = patch(daemon, "demo-key", &id, 1000, &content[1000..], &[]);
    assert_eq!(reply.status, 502, "{reply:?}");
    let noted: Option<String> = daemon
        .db()
        .query_row("SELECT upload_id FROM sessions WHERE id = ?1", [&id], |row| {
            row.get(0)
        })
        .unwrap();
    assert_eq!(noted, None, "the failed completion took its note back");
    let failed: String = daemon
        .db()
        .query_row(
            "SELECT id FROM uploads WHERE state = 'failed' AND filename = ?1",
            [name],
            |row| row.get(0),
        )
        .unwrap();
    (id, failed)
}

#[test]
fn head_completes_an_upload_whose_last_patch_did_not() {
    let mock = MockUpstream::start(Vendor::Dify, "up-key");
    let daemon = Daemon::start_with(|dir| forwarding(dir, &mock));
    let content = text_of(3000);
    let mut made = Vec::new();
    for (case, name) in [
        ("its take-back failed", "a.txt"),
        ("the daemon died before the record", "b.txt"),
    ] {
        let (id, failed) = failed_last_patch(&daemon, &mock, name, &content);
        let noted = match name {
            "a.txt" => failed,
            _ => "0123456789abcdef01234567".to_owned(),
        };
        daemon
            .db()
            .execute("UPDATE sessions SET upload_id = ?2 WHERE id = ?1", [&id, &noted])
            .unwrap();
        let reply = head(&daemon, "demo-key", &id);
        assert_eq!(reply.status, 200, "{case}: {reply:?}\n{}", daemon.log());
        assert_eq!(reply.header("upload-offset"), Some("3000"));
        let record_id = reply
            .header("upgate-upload-id")
            .unwrap_or_else(|| panic!("{case}: no upload made: {reply:?}\n{}", daemon.log()))
            .to_owned();
        assert_ne!(record_id, noted, "{case}");
        let (state, size, sha256, ..) = record(&daemon, &record_id);
        assert_eq!((state.as_str(), size), ("forwarded", 3000), "{case}");
        assert_eq!(sha256, sha256_hex(&content));
        assert!(
            eventually(Duration::from_secs(2), || !session_file(&daemon, &id).exists()),
            "{case}: the completed upload kept its own copy"
        );
        made.push((id, record_id));
    }
    let stored = mock.stored();
    assert_eq!(stored.len(), 2);
    assert!(stored.iter().all(|file| file.sha256 == sha256_hex(&content)));

    // Made once: a HEAD or an empty PATCH at the end answers the same upload, and so they
    // do once its delivery failed later (its bytes gone with its success).
    let (id, record_id) = &made[0];
    for later in ["forwarded", "failed"] {
        daemon
            .db()
            .execute("UPDATE uploads SET state = ?2 WHERE id = ?1", [record_id, later])
            .unwrap();
        let again = head(&daemon, "demo-key", id);
        assert_eq!(
            (again.status, again.header("upgate-upload-id")),
            (200, Some(record_id.as_str())),
            "{later}: {again:?}"
        );
        let reply = patch(&daemon, "demo-key", id, 3000, b"", &[]);
        assert_eq!(
            (reply.status, reply.header("upgate-upload-id")),
            (204, Some(record_id.as_str())),
            "{later}: {reply:?}"
        );
    }
    assert_eq!(mock.stored().len(), 2);
}

/// A HEAD while the last PATCH is still delivering never waits for it, nor makes a second
/// upload: 423 (which tus clients retry), then, once it is done, the upload it made.
#[test]
fn a_head_during_the_last_patchs_delivery_is_423_not_a_second_upload() {
    let mock = MockUpstream::start(Vendor::Dify, "up-key");
    let daemon = Daemon::start_with(|dir| forwarding(dir, &mock));
    let content = text_of(2000);
    let id = create(&daemon, "demo-key", 2000, "slow.txt");
    mock.hang(Duration::from_secs(3));
    std::thread::scope(|scope| {
        let last = scope.spawn(|| patch(&daemon, "demo-key", &id, 0, &content, &[]));
        assert!(
            eventually(Duration::from_secs(5), || !mock.received().is_empty()),
            "the delivery started"
        );
        let started = std::time::Instant::now();
        let reply = head(&daemon, "demo-key", &id);
        assert_eq!(reply.status, 423, "{reply:?}");
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the HEAD waited for the delivery"
        );
        let last = last.join().unwrap();
        assert_eq!(last.status, 204, "{last:?}");
    });
    mock.hang(Duration::ZERO);
    let reply = head(&daemon, "demo-key", &id);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        record(&daemon, reply.header("upgate-upload-id").unwrap()).0,
        "forwarded"
    );
    assert_eq!(mock.stored().len(), 1);

    // A delivery whose daemon died (or another node's) still under its lease: the same.
    let (id, failed) = failed_last_patch(&daemon, &mock, "dead.txt", &text_of(2000));
    let lease = (std::time::SystemTime::now() + Duration::from_secs(600))
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    daemon
        .db()
        .execute_batch(&format!(
            "UPDATE uploads SET state = 'delivering', next_attempt_at = {lease} WHERE id = '{failed}';
             UPDATE sessions SET upload_id = '{failed}' WHERE id = '{id}';"
        ))
        .unwrap();
    let reply = head(&daemon, "demo-key", &id);
    assert_eq!(reply.status, 423, "{reply:?}");
    let reply = patch(&daemon, "demo-key", &id, 2000, b"", &[]);
    assert_eq!(reply.status, 409, "{reply:?}");
    assert_eq!(
        mock.stored().len(),
        1,
        "no second delivery while the first may still land"
    );
}
