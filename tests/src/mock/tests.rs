//! The mocks' own rules, driven by hand-written requests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};

use super::{ChunkInfo, MockUpstream, Vendor, sha256_hex};

/// One part of a hand-built form: (name, filename, content).
type Part<'a> = (&'a str, Option<&'a str>, &'a [u8]);

fn form(parts: &[Part<'_>]) -> (String, Vec<u8>) {
    let boundary = "----mocktest";
    let mut body = Vec::new();
    for (name, filename, content) in parts {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"").as_bytes(),
        );
        if let Some(filename) = filename {
            body.extend_from_slice(
                format!("; filename=\"{filename}\"\r\nContent-Type: text/plain").as_bytes(),
            );
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Sends one request on a fresh connection; `chunked` sends the body in 7-byte chunks.
fn send(
    mock: &MockUpstream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    chunked: bool,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(mock.addr()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: mock\r\nconnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if chunked {
        head.push_str("transfer-encoding: chunked\r\n\r\n");
    } else {
        head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    }
    stream.write_all(head.as_bytes()).unwrap();
    if chunked {
        for piece in body.chunks(7) {
            stream
                .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                .unwrap();
            stream.write_all(piece).unwrap();
            stream.write_all(b"\r\n").unwrap();
        }
        stream.write_all(b"0\r\n\r\n").unwrap();
    } else {
        stream.write_all(body).unwrap();
    }
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer);
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn post_form(mock: &MockUpstream, path: &str, headers: &[(&str, &str)], parts: &[Part<'_>]) -> (u16, Value) {
    let (content_type, body) = form(parts);
    let mut headers = headers.to_vec();
    headers.push(("content-type", &content_type));
    send(mock, "POST", path, &headers, &body, false)
}

#[test]
fn dify_rules_and_shapes() {
    let mock = MockUpstream::start(Vendor::Dify, "k1");
    let auth = [("authorization", "Bearer k1")];
    let file: Part<'_> = ("file", Some("a.txt"), b"hello");

    let (status, body) = post_form(&mock, "/v1/files/upload", &[], &[file]);
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    assert!(body["message"].as_str().unwrap().contains("Bearer"));
    let (status, body) = post_form(
        &mock,
        "/v1/files/upload",
        &[("authorization", "Bearer nope")],
        &[file],
    );
    assert_eq!(
        (status, body["message"].as_str()),
        (401, Some("Access token is invalid"))
    );
    let (status, body) = post_form(&mock, "/v1/files/upload", &auth, &[("user", None, b"u")]);
    assert_eq!((status, body["code"].as_str()), (400, Some("no_file_uploaded")));
    let (status, body) = post_form(&mock, "/v1/files/upload", &auth, &[file, file]);
    assert_eq!((status, body["code"].as_str()), (400, Some("too_many_files")));
    let (status, _) = post_form(&mock, "/v1/other", &auth, &[file]);
    assert_eq!(status, 404);

    // Both the /v1 path and the bare one; a chunked request body.
    let (content_type, body) = form(&[("user", None, b"bob"), file]);
    let (status, answer) = send(
        &mock,
        "POST",
        "/files/upload",
        &[auth[0], ("content-type", &content_type)],
        &body,
        true,
    );
    assert_eq!(status, 201);
    for key in [
        "id",
        "name",
        "size",
        "extension",
        "mime_type",
        "created_by",
        "created_at",
    ] {
        assert!(!answer[key].is_null(), "{key} in {answer}");
    }
    assert_eq!(
        (answer["name"].as_str(), answer["size"].as_u64()),
        (Some("a.txt"), Some(5))
    );
    let received = mock.received().pop().unwrap();
    assert_eq!(received.field("user"), Some("bob"));
    assert_eq!(received.file().unwrap().sha256, sha256_hex(b"hello"));
    assert_eq!(received.body_bytes, body.len() as u64);
}

#[test]
fn kore_sessions_take_chunks_in_any_order_and_name_missing_ones() {
    let mock = MockUpstream::start(Vendor::Kore, "k2");
    let auth = [("x-api-key", "k2")];
    let start = json!({"fileContext": "bulkImport", "totalChunks": 3, "fileExtension": "mp3",
                       "fileName": "a.mp3", "fileSize": 9});
    let start = serde_json::to_vec(&start).unwrap();
    let (status, session) = send(
        &mock,
        "POST",
        "/api/public/files/session/start",
        &[auth[0], ("content-type", "application/json")],
        &start,
        false,
    );
    assert_eq!(status, 200, "{session}");
    let id = session["sessionId"].as_str().unwrap().to_owned();
    assert!(session["expirationDate"].as_str().unwrap().ends_with('Z'));
    let chunk_path = format!("/api/public/files/session/{id}");
    let complete_path = format!("{chunk_path}/complete");
    let chunk = |number: &str, bytes: &[u8]| {
        post_form(
            &mock,
            &chunk_path,
            &auth,
            &[
                ("chunkNumber", None, number.as_bytes()),
                ("file", Some("a.mp3"), bytes),
            ],
        )
    };

    assert_eq!(chunk("2", b"ghi").0, 200);
    assert_eq!(chunk("0", b"XXX").0, 200);
    let (status, body) = send(&mock, "POST", &complete_path, &auth, b"", false);
    assert_eq!(status, 400);
    assert_eq!(body["errors"][0]["msg"], json!("missing chunks: 1"));
    assert_eq!(mock.open_sessions(), 1);
    assert_eq!(chunk("3", b"jkl").0, 400);
    assert_eq!(chunk("0", b"abc").0, 200); // re-sent: the last copy wins
    let (status, body) = chunk("1", b"def");
    assert_eq!(
        (status, &body),
        (200, &json!({"chunkNumber": 1, "sessionId": id}))
    );
    assert_eq!(
        mock.received().pop().unwrap().chunk,
        Some(ChunkInfo {
            session_id: id.clone(),
            chunk_number: 1
        })
    );
    let (status, body) = send(&mock, "POST", &complete_path, &auth, b"", false);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["fileId"].as_str().unwrap().len(), 24);
    assert_eq!(mock.stored()[0].sha256, sha256_hex(b"abcdefghi"));
    assert_eq!(mock.open_sessions(), 0);
    assert_eq!(send(&mock, "POST", &complete_path, &auth, b"", false).0, 404);

    let (status, body) = post_form(
        &mock,
        "/api/public/files",
        &auth,
        &[("file", Some("a.png"), b"x")],
    );
    assert_eq!(
        (status, &body["errors"][0]["msg"]),
        (400, &json!("fileContext is required"))
    );
    let (status, _) = post_form(&mock, "/api/public/files", &[("x-api-key", "bad")], &[]);
    assert_eq!(status, 401);
    // Single uploads stop at the limit (25 MB unless a test sets one).
    mock.limit_single_upload(4);
    let single = |bytes: &[u8]| {
        post_form(
            &mock,
            "/api/public/files",
            &auth,
            &[
                ("fileContext", None, b"bulkImport"),
                ("file", Some("a.mp3"), bytes),
            ],
        )
    };
    assert_eq!(single(b"four").0, 200);
    let (status, body) = single(b"fives");
    assert_eq!(status, 413, "{body}");
    assert!(
        body["errors"][0]["msg"]
            .as_str()
            .unwrap()
            .contains("upload session")
    );
}

#[test]
fn maiagent_korexo_and_beam_rules() {
    let mai = MockUpstream::start(Vendor::Maiagent, "k3");
    let (status, body) = post_form(&mai, "/api/v1/attachments-upload/", &[], &[]);
    assert_eq!(
        (status, &body),
        (
            401,
            &json!({"detail": "Authentication credentials were not provided."})
        )
    );
    let (status, body) = post_form(
        &mai,
        "/api/v1/attachments-upload/",
        &[("authorization", "k3")],
        &[],
    );
    assert_eq!(
        (status, &body),
        (401, &json!({"detail": "Invalid API key format."}))
    );
    let (status, body) = post_form(
        &mai,
        "/api/v1/attachments-upload/",
        &[("authorization", "Api-Key k3")],
        &[],
    );
    assert_eq!(
        (status, &body),
        (400, &json!({"file": ["This field is required."]}))
    );

    let xo = MockUpstream::start(Vendor::Korexo, "k4");
    let path = "/api/v2/apps/a1/environments/dev/attachments/upload";
    let auth = [("x-api-key", "k4")];
    let file: Part<'_> = ("file", Some("f.pdf"), b"%PDF");
    let (status, body) = post_form(&xo, path, &auth, &[file, ("uploadType", None, b"runtime")]);
    assert_eq!(
        (status, &body["errors"][0]["msg"]),
        (400, &json!("userReference is required"))
    );
    let (status, _) = post_form(
        &xo,
        path,
        &auth,
        &[file, ("userReference", None, b"u"), ("uploadType", None, b"x")],
    );
    assert_eq!(status, 400);
    let (status, body) = post_form(
        &xo,
        path,
        &auth,
        &[
            file,
            ("userReference", None, b"u"),
            ("uploadType", None, b"runtime"),
        ],
    );
    assert_eq!(status, 200);
    let file_id = body["fileId"].as_str().unwrap();
    assert_eq!(body["filePath"], json!(format!("AppFileSystem/{file_id}.pdf")));
    // Another app cannot delete it.
    let other = format!("/api/v2/apps/a2/environments/dev/attachments/{file_id}");
    assert_eq!(send(&xo, "DELETE", &other, &auth, b"", false).0, 404);
    let own = format!("/api/v2/apps/a1/environments/dev/attachments/{file_id}");
    let (status, body) = send(&xo, "DELETE", &own, &auth, b"", false);
    assert_eq!((status, body["success"].as_str()), (200, Some("true")));

    let beam = MockUpstream::start(Vendor::Beam, "k5");
    let thread = (
        "threadId",
        None,
        b"1a2036c0-d533-4636-8f51-2a811763ef5c".as_slice(),
    );
    let files: Part<'_> = ("files", Some("a.txt"), b"a");
    let (status, body) = post_form(
        &beam,
        "/agent-setup/upload",
        &[("x-api-key", "no")],
        &[thread, files],
    );
    assert_eq!(
        (status, &body),
        (401, &json!({"message": "Unauthorized", "statusCode": 401}))
    );
    let auth = [("x-api-key", "k5"), ("current-workspace-id", "w")];
    let (status, _) = post_form(&beam, "/agent-setup/upload", &auth[..1], &[thread, files]);
    assert_eq!(status, 400);
    let (status, body) = post_form(
        &beam,
        "/agent-setup/upload",
        &auth,
        &[("threadId", None, b"x"), files],
    );
    assert_eq!(
        (status, &body["message"]),
        (400, &json!(["threadId must be a UUID"]))
    );
    let eleven: Vec<Part<'_>> = std::iter::once(thread)
        .chain(std::iter::repeat_n(files, 11))
        .collect();
    let (status, body) = post_form(&beam, "/agent-setup/upload", &auth, &eleven);
    assert_eq!((status, &body["message"]), (400, &json!("Unexpected field")));
    let (status, body) = post_form(&beam, "/agent-setup/upload", &auth, &[thread, files, files]);
    assert_eq!(status, 201);
    assert_eq!(body.as_array().unwrap().len(), 2);
    assert_eq!(body[0]["uploadSource"], json!("file_upload"));
}

#[test]
fn large_bodies_stream_and_faults_are_counted() {
    let mock = MockUpstream::start(Vendor::Maiagent, "k6");
    let content: Vec<u8> = (0..8_000_000u32).map(|i| (i ^ (i >> 9)) as u8).collect();
    let auth = [("authorization", "Api-Key k6")];
    let (status, _) = post_form(
        &mock,
        "/api/v1/attachments-upload/",
        &auth,
        &[("file", Some("big.bin"), &content)],
    );
    assert_eq!(status, 201);
    let stored = &mock.stored()[0];
    assert_eq!(
        (stored.size, stored.sha256.clone()),
        (8_000_000, sha256_hex(&content))
    );

    mock.fail_next(2, 503);
    mock.rate_limit_next(1, 9);
    let small: Part<'_> = ("file", Some("s.txt"), b"s");
    assert_eq!(
        post_form(&mock, "/api/v1/attachments-upload/", &auth, &[small]).0,
        503
    );
    assert_eq!(
        post_form(&mock, "/api/v1/attachments-upload/", &auth, &[small]).0,
        503
    );
    assert_eq!(
        post_form(&mock, "/api/v1/attachments-upload/", &auth, &[small]).0,
        429
    );
    assert_eq!(
        post_form(&mock, "/api/v1/attachments-upload/", &auth, &[small]).0,
        201
    );
    let statuses: Vec<u16> = mock.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [201, 503, 503, 429, 201]);
    assert_eq!(mock.stored().len(), 2);
}
