//! `ca_file` end to end: a TLS upstream on loopback whose certificate is signed by a private
//! CA. With the CA in `ca_file` the handshake succeeds and the request arrives; without it
//! the connection is refused as untrusted (the Mozilla roots do not know that CA).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use upgate_plugin_api::{ErrorKind, InitContext};
use upgate_upstream::{Auth, Upstream, UpstreamSettings};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Serves `connections` TLS connections on loopback, answering each request with 200 `{}`
/// and sending back the request heads it read.
fn tls_upstream(connections: usize) -> (String, std::sync::mpsc::Receiver<String>) {
    let certs = CertificateDer::pem_file_iter(fixtures().join("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(fixtures().join("server.key")).unwrap();
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (heads, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(connections) {
            let Ok(stream) = stream else { continue };
            let connection = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(connection, stream);
            let mut head = String::new();
            let mut reader = BufReader::new(&mut tls);
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line == "\r\n" => break,
                    Ok(_) => head.push_str(&line),
                }
            }
            if head.is_empty() {
                continue; // the client gave up during the handshake
            }
            let _ = tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}");
            let _ = tls.flush();
            let _ = heads.send(head);
        }
    });
    (format!("https://127.0.0.1:{}", address.port()), received)
}

fn upstream(base_url: &str, ca_file: Option<PathBuf>) -> Upstream {
    let mut settings =
        json!({"base_url": base_url, "api_key": "tls-key", "connect_timeout": "5s", "timeout": "10s"});
    if let Some(path) = ca_file {
        settings["ca_file"] = json!(path);
    }
    let settings = UpstreamSettings::parse(&InitContext::default(), settings, &[]).unwrap();
    Upstream::new("test", settings, Auth::bearer()).unwrap()
}

#[test]
fn a_private_ca_in_ca_file_is_trusted_and_nothing_else_is() {
    let (base_url, heads) = tls_upstream(2);
    let trusting = upstream(&base_url, Some(fixtures().join("ca.pem")));
    let reply = trusting.post_empty("probe", "/files/upload", &[], None).unwrap();
    assert_eq!(reply.status, 200);
    let head = heads.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    assert!(head.starts_with("POST /files/upload HTTP/1.1"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("authorization: bearer tls-key"),
        "{head}"
    );

    let untrusting = upstream(&base_url, None);
    let error = untrusting
        .post_empty("probe", "/files/upload", &[], None)
        .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Unavailable, "{error}");
    assert!(error.message.to_lowercase().contains("certificate"), "{error}");
    assert!(!error.message.contains("tls-key"), "{error}");
}
