//! A TLS front for the mock upstreams: it terminates TLS on loopback with the test-only
//! certificate in `crates/upgate-upstream/tests/fixtures` (for 127.0.0.1, signed by a private
//! CA whose key was discarded) and relays the plaintext, both ways, to a mock's address. The
//! whole daemon → plugin → upstream path then runs over TLS while the faithful mock behind
//! the front still checks every request it receives.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Bytes moved per read, in either direction.
const RELAY_BUFFER: usize = 64 << 10;
/// How long an idle relay sleeps before it looks at both sockets again.
const IDLE_PAUSE: Duration = Duration::from_millis(1);

/// The test-only TLS material every TLS server of the tests uses: `ca.pem`, and `server.pem`
/// / `server.key`, a certificate for 127.0.0.1 and localhost signed by that CA.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crates/upgate-upstream/tests/fixtures")
}

/// The private CA that signed the test servers' certificate (for a provider's `ca_file`,
/// PostgreSQL's `sslrootcert`, Redis's `ca_file`).
pub fn ca_file() -> PathBuf {
    fixtures().join("ca.pem")
}

/// A TLS listener on 127.0.0.1 relaying every connection to one backend. Its threads end
/// with the test process.
pub struct TlsFront {
    addr: SocketAddr,
}

impl TlsFront {
    /// Starts a front on a free port relaying to `backend`.
    ///
    /// # Panics
    /// If the fixtures cannot be read or no socket can be had.
    pub fn start(backend: SocketAddr) -> TlsFront {
        let certs = CertificateDer::pem_file_iter(fixtures().join("server.pem"))
            .expect("server.pem")
            .collect::<Result<Vec<_>, _>>()
            .expect("server.pem certificates");
        let key = PrivateKeyDer::from_pem_file(fixtures().join("server.key")).expect("server.key");
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .expect("server certificate");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind TLS front");
        let addr = listener.local_addr().expect("TLS front address");
        std::thread::Builder::new()
            .name("tls-front-accept".into())
            .spawn(move || {
                for client in listener.incoming().flatten() {
                    let config = config.clone();
                    std::thread::spawn(move || {
                        // A relay ends when either side closes or a handshake fails (an
                        // untrusting client gives up): nothing to report in either case.
                        let _ = relay(config, client, backend);
                    });
                }
            })
            .expect("spawn TLS front");
        TlsFront { addr }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn origin(&self) -> String {
        format!("https://{}", self.addr)
    }
}

/// Moves bytes between one TLS client and the plaintext backend until either side closes.
fn relay(config: Arc<rustls::ServerConfig>, mut client: TcpStream, backend: SocketAddr) -> io::Result<()> {
    let mut tls = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
    // Whatever the backend answers is buffered whole (answers here are small).
    tls.set_buffer_limit(None);
    let mut server = TcpStream::connect(backend)?;
    client.set_nonblocking(true)?;
    server.set_nonblocking(true)?;
    let _ = server.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let mut buffer = vec![0u8; RELAY_BUFFER];
    loop {
        let mut moved = false;
        match tls.read_tls(&mut client) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                moved = true;
                if let Err(error) = tls.process_new_packets() {
                    // Tell the client why (an alert), then give up.
                    let _ = tls.write_tls(&mut client);
                    return Err(io::Error::other(error));
                }
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
        loop {
            match tls.reader().read(&mut buffer) {
                Ok(0) => return Ok(()), // close_notify
                Ok(read) => {
                    moved = true;
                    write_all_nonblocking(&mut server, &buffer[..read])?;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(error),
            }
        }
        match server.read(&mut buffer) {
            Ok(0) => {
                tls.send_close_notify();
                flush_tls(&mut tls, &mut client)?;
                return Ok(());
            }
            Ok(read) => {
                moved = true;
                tls.writer().write_all(&buffer[..read])?;
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
        while tls.wants_write() {
            match tls.write_tls(&mut client) {
                Ok(_) => moved = true,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(error),
            }
        }
        if !moved {
            std::thread::sleep(IDLE_PAUSE);
        }
    }
}

fn write_all_nonblocking(stream: &mut TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => bytes = &bytes[written..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(IDLE_PAUSE),
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

fn flush_tls(tls: &mut rustls::ServerConnection, client: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        match tls.write_tls(client) {
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(IDLE_PAUSE),
            Err(error) => return Err(error),
        }
    }
    Ok(())
}
