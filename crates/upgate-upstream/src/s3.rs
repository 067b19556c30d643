//! S3-compatible object storage over blocking HTTP: the shared spool's engine, and the
//! client a future S3 provider plugin reuses.
//!
//! What flows through here: whole local files going up as objects (one `PUT` up to
//! [`PART_SIZE`], a multipart upload of [`PART_SIZE`] parts above it, each part streamed from
//! its range of the file, [`PARALLEL_PARTS`] at once: never buffered whole), objects coming
//! down into local files or as their first bytes, listings and deletes. Requests are signed by `rusty-s3` (SigV4 in the
//! query string, payload unsigned) and sent by ureq. A transport failure, a 5xx or a 429 is
//! retried with backoff ([`ATTEMPTS`] attempts), then reported as [`S3Error::Unavailable`];
//! every other refusal is [`S3Error::Refused`] with the service's error code. The secret key
//! never appears in an error or a `Debug`.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use rusty_s3::actions::list_objects_v2::ListObjectsV2Response;
use rusty_s3::actions::{CreateMultipartUpload, ListObjectsV2, S3Action};
use rusty_s3::{Bucket, Credentials, UrlStyle};
use ureq::http::{Method, Request, Response};
use ureq::{Agent, Body, SendBody};

/// Files up to this size go up in one `PUT`; larger ones as multipart parts of this size
/// (the memory a part costs is ureq's send buffer, not the part).
pub const PART_SIZE: u64 = 16 << 20;
/// The most parts S3 takes in one multipart upload.
const MAX_PARTS: u64 = 10_000;
/// The largest part S3 takes (so the largest object: 10,000 of them, about 48.8 TiB; S3's
/// own limit for an object, 5 TiB, comes first).
const MAX_PART_SIZE: u64 = 5 << 30;
/// Parts of one multipart upload in flight at once.
pub const PARALLEL_PARTS: u64 = 4;
/// Attempts per request before the storage counts as unavailable.
pub const ATTEMPTS: u32 = 3;
/// The wait before the second attempt; it grows fourfold per attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(150);
/// How long a signed URL stays valid (it is used at once).
const SIGNATURE_LIFETIME: Duration = Duration::from_secs(600);
/// Largest listing or error document read.
const MAX_DOCUMENT_BYTES: u64 = 8 << 20;
/// The slowest average rate a transfer may keep: an exchange gets its connect and answer
/// timeouts plus its bytes at this rate, in all (a 16 MiB part: 64 s more). A service
/// that trickles (each read and write within the per-read timeout, but a few bytes at a
/// time) fails the call instead of holding a request, a delivery or a sweep for hours;
/// a busy link (several parts of several uploads sharing it) stays well above it.
const SLOWEST_RATE: u64 = 256 << 10;
/// What a document exchange (a listing page, a multipart start, an error) is given time
/// for: a page of 1,000 keys is about 300 KiB.
const DOCUMENT_ALLOWANCE: u64 = 512 << 10;

/// Where the objects are and who may touch them.
#[derive(Clone)]
pub struct S3Settings {
    /// `http(s)://host:port` of the service (path-style requests).
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Connecting, and waiting for an answer's headers after the request was sent.
    pub connect_timeout: Duration,
    pub answer_timeout: Duration,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// Why an object operation failed.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The service did not answer, or answered 5xx/429, every attempt.
    #[error("object storage unavailable ({what}): {detail}")]
    Unavailable { what: String, detail: String },
    /// The service refused the request (credentials, bucket, policy).
    #[error("object storage refused {what}: HTTP {status} {code}")]
    Refused { what: String, status: u16, code: String },
    #[error("no such object: {0}")]
    NotFound(String),
    /// The local side of a transfer failed (the file being sent or written).
    #[error("local file: {0}")]
    Local(#[from] io::Error),
    #[error("object storage settings: {0}")]
    Settings(String),
}

impl S3Error {
    /// `true` when trying again later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// As an `io::Error` for callers whose interface is I/O: unavailable storage is
/// `NotConnected` (the kind a caller maps to "try again later"), a missing object
/// `NotFound`, a full local disk keeps its own error.
impl From<S3Error> for io::Error {
    fn from(error: S3Error) -> Self {
        match error {
            S3Error::Local(local) => local,
            S3Error::NotFound(_) => io::Error::new(io::ErrorKind::NotFound, error.to_string()),
            other => io::Error::new(io::ErrorKind::NotConnected, other.to_string()),
        }
    }
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEntry {
    pub key: String,
    pub size: u64,
    /// RFC 3339, as the service gave it.
    pub last_modified: String,
}

/// A bucket and the credentials to use it. Shared by all threads that use it.
pub struct ObjectStore {
    bucket: Bucket,
    credentials: Credentials,
    agent: Agent,
    connect_timeout: Duration,
    answer_timeout: Duration,
}

impl std::fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStore")
            .field("bucket", &self.bucket.name())
            .field("endpoint", &self.bucket.base_url().as_str())
            .finish_non_exhaustive()
    }
}

/// What one attempt came to.
enum Outcome<T> {
    Done(T),
    /// Worth another attempt.
    Transient(String),
    Failed(S3Error),
}

impl ObjectStore {
    pub fn new(settings: &S3Settings) -> Result<Self, S3Error> {
        let endpoint = url::Url::parse(&settings.endpoint)
            .map_err(|error| S3Error::Settings(format!("endpoint {:?}: {error}", settings.endpoint)))?;
        let bucket = Bucket::new(
            endpoint,
            UrlStyle::Path,
            settings.bucket.clone(),
            settings.region.clone(),
        )
        .map_err(|error| S3Error::Settings(format!("bucket {:?}: {error}", settings.bucket)))?;
        let config = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_resolve(Some(settings.connect_timeout))
            .timeout_connect(Some(settings.connect_timeout))
            .timeout_recv_response(Some(settings.answer_timeout))
            // Whole objects take as long as their size needs, but no single write or read
            // may wait longer than an answer: a peer gone silent (a partition, a proxy that
            // dropped the connection) fails the call instead of holding its thread for good.
            .timeout_per_write(Some(settings.answer_timeout))
            .timeout_per_read(Some(settings.answer_timeout))
            .user_agent(concat!("upgate/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Self {
            bucket,
            credentials: Credentials::new(settings.access_key_id.clone(), settings.secret_access_key.clone()),
            agent: config.new_agent(),
            connect_timeout: settings.connect_timeout,
            answer_timeout: settings.answer_timeout,
        })
    }

    pub fn bucket_name(&self) -> &str {
        self.bucket.name()
    }

    /// The bucket exists and the credentials may list it.
    pub fn check(&self) -> Result<(), S3Error> {
        let mut list = self.bucket.list_objects_v2(Some(&self.credentials));
        list.with_max_keys(1);
        let url = list.sign(SIGNATURE_LIFETIME);
        self.with_retries("list the bucket", || {
            let response = self.send(
                Method::GET,
                url.as_str(),
                &[],
                SendBody::none(),
                DOCUMENT_ALLOWANCE,
            )?;
            Ok(response.map(|_| ()))
        })
    }

    /// Uploads the whole of the local file `path` as `key`, replacing any earlier object.
    pub fn put_file(&self, key: &str, path: &Path) -> Result<u64, S3Error> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        if len <= PART_SIZE {
            self.put_range(key, &mut file, 0, len, None)?;
        } else {
            drop(file);
            self.put_multipart(key, path, len)?;
        }
        Ok(len)
    }

    /// Uploads `len` bytes of `file` from `start` as `key`: as part `part` of multipart upload
    /// `upload_id` when given; returns the ETag.
    fn put_range(
        &self,
        key: &str,
        file: &mut std::fs::File,
        start: u64,
        len: u64,
        part: Option<(u16, &str)>,
    ) -> Result<String, S3Error> {
        let url = match part {
            Some((number, upload_id)) => self
                .bucket
                .upload_part(Some(&self.credentials), key, number, upload_id)
                .sign(SIGNATURE_LIFETIME),
            None => self
                .bucket
                .put_object(Some(&self.credentials), key)
                .sign(SIGNATURE_LIFETIME),
        };
        self.with_retries(&format!("put {key}"), || {
            file.seek(SeekFrom::Start(start)).map_err(S3Error::Local)?;
            let mut range = Read::take(&mut *file, len);
            let body = SendBody::from_reader(&mut range);
            let length = len.to_string();
            let response = self.send(
                Method::PUT,
                url.as_str(),
                &[("content-length", length.as_str())],
                body,
                len,
            )?;
            Ok(response.map(|response| {
                response
                    .headers()
                    .get("etag")
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            }))
        })
    }

    /// A multipart upload of `path`: [`PARALLEL_PARTS`] threads put its parts at once, each
    /// streaming its range from its own handle of the file.
    fn put_multipart(&self, key: &str, path: &Path, len: u64) -> Result<(), S3Error> {
        let part_size = part_size(len);
        let parts = len.div_ceil(part_size);
        if part_size > MAX_PART_SIZE {
            return Err(S3Error::Settings(format!(
                "{key} is larger than an object may be ({len} bytes)"
            )));
        }
        let url = self
            .bucket
            .create_multipart_upload(Some(&self.credentials), key)
            .sign(SIGNATURE_LIFETIME);
        let what = format!("start a multipart upload of {key}");
        let document = self.document(&what, Method::POST, url.as_str())?;
        let created =
            CreateMultipartUpload::parse_response(&document).map_err(|error| unreadable(&what, error))?;
        let upload_id = created.upload_id().to_owned();
        let next = std::sync::atomic::AtomicU64::new(0);
        let etags = std::sync::Mutex::new(vec![String::new(); parts as usize]);
        let failure: std::sync::Mutex<Option<S3Error>> = std::sync::Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..PARALLEL_PARTS.min(parts) {
                scope.spawn(|| {
                    let mut file = match std::fs::File::open(path) {
                        Ok(file) => file,
                        Err(error) => {
                            failure
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(S3Error::Local(error));
                            return;
                        }
                    };
                    loop {
                        let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let failed = failure.lock().unwrap_or_else(|e| e.into_inner()).is_some();
                        if index >= parts || failed {
                            return;
                        }
                        let start = index * part_size;
                        let part_len = part_size.min(len - start);
                        let number = (index + 1) as u16;
                        match self.put_range(key, &mut file, start, part_len, Some((number, &upload_id))) {
                            Ok(etag) => {
                                etags.lock().unwrap_or_else(|e| e.into_inner())[index as usize] = etag
                            }
                            Err(error) => {
                                failure
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .get_or_insert(error);
                                return;
                            }
                        }
                    }
                });
            }
        });
        let sent = match failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(error) => Err(error),
            None => Ok(etags.into_inner().unwrap_or_else(|e| e.into_inner())),
        };
        let completed = sent.and_then(|etags| {
            let action = self.bucket.complete_multipart_upload(
                Some(&self.credentials),
                key,
                &upload_id,
                etags.iter().map(String::as_str),
            );
            let url = action.sign(SIGNATURE_LIFETIME);
            let body = action.body();
            self.with_retries(&format!("complete the multipart upload of {key}"), || {
                let length = body.len().to_string();
                let response = self.send(
                    Method::POST,
                    url.as_str(),
                    &[("content-length", length.as_str())],
                    SendBody::from_reader(&mut io::Cursor::new(body.as_bytes())),
                    DOCUMENT_ALLOWANCE,
                )?;
                // A 200 can still carry an error document (the service failed while joining).
                Ok(match response {
                    Outcome::Done(response) => match read_document(response) {
                        Ok(document) if document.contains("<Error>") => {
                            Outcome::Transient(error_code(&document))
                        }
                        Ok(_) => Outcome::Done(()),
                        Err(error) => Outcome::Transient(error.to_string()),
                    },
                    Outcome::Transient(why) => Outcome::Transient(why),
                    Outcome::Failed(error) => Outcome::Failed(error),
                })
            })
        });
        if completed.is_err() {
            // Its parts are stored (and billed) until aborted: tried as often as any call. One
            // that still fails is left to the bucket's AbortIncompleteMultipartUpload rule.
            let url = self
                .bucket
                .abort_multipart_upload(Some(&self.credentials), key, &upload_id)
                .sign(SIGNATURE_LIFETIME);
            let _ = self.with_retries(&format!("abort the multipart upload of {key}"), || {
                Ok(self
                    .send(
                        Method::DELETE,
                        url.as_str(),
                        &[],
                        SendBody::none(),
                        DOCUMENT_ALLOWANCE,
                    )?
                    .map(drop))
            });
        }
        completed
    }

    /// Downloads object `key`, expected to hold `size` bytes, into a new local file at `path`
    /// (created, or replaced); returns how many bytes it holds: at most one more than
    /// `size` is read, so a larger object is told apart without filling the disk.
    pub fn get_to_file(&self, key: &str, path: &Path, size: u64) -> Result<u64, S3Error> {
        let url = self
            .bucket
            .get_object(Some(&self.credentials), key)
            .sign(SIGNATURE_LIFETIME);
        self.with_retries(&format!("get {key}"), || {
            let response = match self.send(Method::GET, url.as_str(), &[], SendBody::none(), size)? {
                Outcome::Done(response) => response,
                Outcome::Transient(why) => return Ok(Outcome::Transient(why)),
                Outcome::Failed(error) => return Ok(Outcome::Failed(error)),
            };
            let mut file = std::fs::File::create(path).map_err(S3Error::Local)?;
            let mut body = response.into_body();
            match io::copy(&mut body.as_reader().take(size.saturating_add(1)), &mut file) {
                Ok(copied) => Ok(Outcome::Done(copied)),
                // The service broke off: the next attempt starts the file again.
                Err(error) if error.raw_os_error().is_none() => Ok(Outcome::Transient(error.to_string())),
                Err(error) => Err(S3Error::Local(error)),
            }
        })
    }

    /// The first `len` bytes of object `key` (fewer when it is shorter).
    pub fn get_head(&self, key: &str, len: u64) -> Result<Vec<u8>, S3Error> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let url = self
            .bucket
            .get_object(Some(&self.credentials), key)
            .sign(SIGNATURE_LIFETIME);
        let range = format!("bytes=0-{}", len - 1);
        self.with_retries(&format!("get {key}"), || {
            let response = match self.send(
                Method::GET,
                url.as_str(),
                &[("range", range.as_str())],
                SendBody::none(),
                len,
            )? {
                Outcome::Done(response) => response,
                Outcome::Transient(why) => return Ok(Outcome::Transient(why)),
                Outcome::Failed(error) => return Ok(Outcome::Failed(error)),
            };
            let mut bytes = Vec::new();
            let mut body = response.into_body();
            match body.as_reader().take(len).read_to_end(&mut bytes) {
                Ok(_) => Ok(Outcome::Done(bytes)),
                Err(error) => Ok(Outcome::Transient(error.to_string())),
            }
        })
    }

    /// Deletes object `key`; a missing object counts as deleted.
    pub fn delete(&self, key: &str) -> Result<(), S3Error> {
        let url = self
            .bucket
            .delete_object(Some(&self.credentials), key)
            .sign(SIGNATURE_LIFETIME);
        self.with_retries(&format!("delete {key}"), || {
            match self.send(
                Method::DELETE,
                url.as_str(),
                &[],
                SendBody::none(),
                DOCUMENT_ALLOWANCE,
            )? {
                Outcome::Failed(S3Error::NotFound(_)) => Ok(Outcome::Done(())),
                other => Ok(other.map(|_| ())),
            }
        })
    }

    /// Every object whose key starts with `prefix`, in key order.
    pub fn list(&self, prefix: &str) -> Result<Vec<ObjectEntry>, S3Error> {
        let mut entries = Vec::new();
        self.list_pages(prefix, None, |page| {
            entries.extend(page.contents.into_iter().map(|content| ObjectEntry {
                key: url_decoded(content.key),
                size: content.size,
                last_modified: content.last_modified,
            }));
        })?;
        Ok(entries)
    }

    /// The names one level below `prefix` (up to the next `/`), without listing every object
    /// under them: `PREFIX/sessions/` gives each session's id once.
    pub fn list_names(&self, prefix: &str) -> Result<Vec<String>, S3Error> {
        let mut names = Vec::new();
        self.list_pages(prefix, Some("/"), |page| {
            names.extend(page.common_prefixes.into_iter().filter_map(|common| {
                let name = url_decoded(common.prefix);
                Some(name.strip_prefix(prefix)?.trim_end_matches('/').to_owned())
            }));
        })?;
        Ok(names)
    }

    /// Each page of a listing of `prefix` (grouped by `delimiter` when given), in order. A
    /// service that hands a continuation token back a second time, or pages without end
    /// (more than [`MAX_LIST_PAGES`]), is an error, not a loop.
    fn list_pages(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        mut each: impl FnMut(ListObjectsV2Response),
    ) -> Result<(), S3Error> {
        let mut token: Option<String> = None;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..MAX_LIST_PAGES {
            let mut action: ListObjectsV2<'_> = self.bucket.list_objects_v2(Some(&self.credentials));
            action.with_prefix(prefix);
            if let Some(delimiter) = delimiter {
                action.with_delimiter(delimiter.to_owned());
            }
            if let Some(token) = &token {
                action.with_continuation_token(token.clone());
            }
            let url = action.sign(SIGNATURE_LIFETIME);
            let what = format!("list {prefix}");
            let document = self.document(&what, Method::GET, url.as_str())?;
            let mut page =
                ListObjectsV2::parse_response(&document).map_err(|error| unreadable(&what, error))?;
            let next = page.next_continuation_token.take();
            each(page);
            match next {
                Some(next) if !next.is_empty() && seen.insert(next.clone()) => token = Some(next),
                Some(next) if !next.is_empty() => {
                    return Err(S3Error::Unavailable {
                        what,
                        detail: "the listing repeats a page".into(),
                    });
                }
                _ => return Ok(()),
            }
        }
        Err(S3Error::Unavailable {
            what: format!("list {prefix}"),
            detail: format!("the listing goes on past {MAX_LIST_PAGES} pages"),
        })
    }

    /// Deletes every object under `prefix`; how many.
    pub fn delete_prefix(&self, prefix: &str) -> Result<usize, S3Error> {
        let entries = self.list(prefix)?;
        for entry in &entries {
            self.delete(&entry.key)?;
        }
        Ok(entries.len())
    }

    /// The XML document a bodiless request to `url` answers, with retries.
    fn document(&self, what: &str, method: Method, url: &str) -> Result<String, S3Error> {
        self.with_retries(what, || {
            Ok(
                match self.send(method.clone(), url, &[], SendBody::none(), DOCUMENT_ALLOWANCE)? {
                    Outcome::Done(response) => read_document(response)
                        .map_or_else(|error| Outcome::Transient(error.to_string()), Outcome::Done),
                    Outcome::Transient(why) => Outcome::Transient(why),
                    Outcome::Failed(error) => Outcome::Failed(error),
                },
            )
        })
    }

    /// Runs `attempt` until it is done, failed for good, or out of attempts.
    fn with_retries<T>(
        &self,
        what: &str,
        mut attempt: impl FnMut() -> Result<Outcome<T>, S3Error>,
    ) -> Result<T, S3Error> {
        let mut wait = FIRST_BACKOFF;
        let mut last = String::new();
        for number in 1..=ATTEMPTS {
            match attempt()? {
                Outcome::Done(value) => return Ok(value),
                Outcome::Failed(S3Error::Refused { status, code, .. }) => {
                    return Err(S3Error::Refused {
                        what: what.to_owned(),
                        status,
                        code,
                    });
                }
                Outcome::Failed(S3Error::NotFound(_)) => return Err(S3Error::NotFound(what.to_owned())),
                Outcome::Failed(error) => return Err(error),
                Outcome::Transient(why) => last = why,
            }
            if number < ATTEMPTS {
                std::thread::sleep(wait);
                wait *= 4;
            }
        }
        Err(S3Error::Unavailable {
            what: what.to_owned(),
            detail: last,
        })
    }

    /// How long one exchange that moves `bytes` (sent or received) may take in all, its
    /// answer's body read included.
    fn exchange_limit(&self, bytes: u64) -> Duration {
        self.connect_timeout + self.answer_timeout * 2 + Duration::from_secs(bytes.div_ceil(SLOWEST_RATE))
    }

    /// Sends one signed request that moves `bytes` (its body's, or its answer's), within
    /// [`ObjectStore::exchange_limit`]; sorts the answer into done, transient or failed.
    fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: SendBody<'_>,
        bytes: u64,
    ) -> Result<Outcome<Response<Body>>, S3Error> {
        let mut builder = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder
            .body(body)
            .map_err(|error| S3Error::Settings(error.to_string()))?;
        let request = self
            .agent
            .configure_request(request)
            .timeout_global(Some(self.exchange_limit(bytes)))
            .build();
        let response = match self.agent.run(request) {
            Ok(response) => response,
            Err(ureq::Error::Io(error)) if error.raw_os_error().is_some_and(is_local_errno) => {
                return Err(S3Error::Local(error));
            }
            Err(error) => return Ok(Outcome::Transient(error.to_string())),
        };
        let status = response.status().as_u16();
        Ok(match status {
            200..=299 => Outcome::Done(response),
            // Only a missing object (or multipart upload) is one that is not there; a
            // missing bucket, or a proxy's 404 page, is storage that is not what it should be
            // (unavailable: nothing is given up for good because of it). A 404 without a
            // body (an answer to HEAD) is the object's.
            404 => {
                let code = read_document(response)
                    .map(|document| error_code(&document))
                    .unwrap_or_default();
                match code.as_str() {
                    "" | "NoSuchKey" | "NoSuchUpload" => Outcome::Failed(S3Error::NotFound(String::new())),
                    _ => Outcome::Failed(S3Error::Refused {
                        what: String::new(),
                        status,
                        code,
                    }),
                }
            }
            429 | 500..=599 => Outcome::Transient(format!("HTTP {status}")),
            _ => {
                let code = read_document(response)
                    .map(|document| error_code(&document))
                    .unwrap_or_default();
                Outcome::Failed(S3Error::Refused {
                    what: String::new(),
                    status,
                    code,
                })
            }
        })
    }
}

impl<T> Outcome<T> {
    fn map<U>(self, change: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Self::Done(value) => Outcome::Done(change(value)),
            Self::Transient(why) => Outcome::Transient(why),
            Self::Failed(error) => Outcome::Failed(error),
        }
    }
}

/// Errors of the local side of a transfer (the file being read), as opposed to the network.
fn is_local_errno(errno: i32) -> bool {
    // EIO, ENOSPC, EBADF: a disk or a file, never a socket.
    matches!(errno, 5 | 9 | 28)
}

/// A 200 whose document does not parse.
fn unreadable(what: &str, error: impl std::fmt::Display) -> S3Error {
    S3Error::Refused {
        what: what.to_owned(),
        status: 200,
        code: format!("unreadable answer: {error}"),
    }
}

fn read_document(response: Response<Body>) -> io::Result<String> {
    let mut text = String::new();
    response
        .into_body()
        .as_reader()
        .take(MAX_DOCUMENT_BYTES)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// An error document's `<Code>`, as it may be logged and shown (`/readyz`): at most 64
/// letters, digits and dots; without one, `unreadable`, or nothing for an empty body.
fn error_code(document: &str) -> String {
    let between = |open: &str, close: &str| {
        let start = document.find(open)? + open.len();
        let end = document[start..].find(close)? + start;
        Some(&document[start..end])
    };
    let plain = |code: &str| {
        !code.is_empty() && code.len() <= 64 && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')
    };
    match between("<Code>", "</Code>") {
        Some(code) if plain(code) => code.to_owned(),
        _ if document.trim().is_empty() => String::new(),
        _ => "unreadable".to_owned(),
    }
}

/// The most pages a listing is followed for (1,000 keys a page: a million objects under one
/// prefix, far more than upgate ever keeps there).
const MAX_LIST_PAGES: usize = 1_000;

/// The part size of a multipart upload of `len` bytes: [`PART_SIZE`], or larger for a file
/// above 156 GiB (S3 takes at most 10,000 parts).
fn part_size(len: u64) -> u64 {
    PART_SIZE.max(len.div_ceil(MAX_PARTS))
}

/// A key from a listing: rusty-s3 asks for `encoding-type=url`, and services differ in what
/// they then encode (AWS and MinIO leave `/` as it is, others send `%2F`). upgate's keys hold
/// no `%` of their own, so every `%XX` is an escape. A key that does not decode to UTF-8 is
/// kept as it came.
fn url_decoded(key: String) -> String {
    if !key.contains('%') {
        return key;
    }
    let bytes = key.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let escaped = (bytes[at] == b'%')
            .then(|| bytes.get(at + 1..at + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                at += 3;
            }
            None => {
                decoded.push(bytes[at]);
                at += 1;
            }
        }
    }
    String::from_utf8(decoded).unwrap_or(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings for a service on 127.0.0.1:`port`, the secret `very-secret`, 1 s timeouts.
    fn settings_at(port: u16) -> S3Settings {
        S3Settings {
            endpoint: format!("http://127.0.0.1:{port}"),
            region: "us-east-1".into(),
            bucket: "b".into(),
            access_key_id: "AKID".into(),
            secret_access_key: "very-secret".into(),
            connect_timeout: Duration::from_secs(1),
            answer_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_multipart_upload_never_needs_more_than_ten_thousand_parts() {
        assert_eq!(part_size(1 << 30), PART_SIZE);
        for len in [156 << 30, 157 << 30, 1 << 40, 5 << 40] {
            let size = part_size(len);
            assert!(len.div_ceil(size) <= MAX_PARTS, "{len}");
            assert!(size <= MAX_PART_SIZE, "{len}");
        }
    }

    #[test]
    fn listed_keys_are_decoded_whatever_the_service_escapes() {
        assert_eq!(url_decoded("p/sessions/a/0".into()), "p/sessions/a/0");
        assert_eq!(url_decoded("p%2Fsessions%2Fa%2F0".into()), "p/sessions/a/0");
        assert_eq!(url_decoded("p%2fx%20y".into()), "p/x y");
        assert_eq!(url_decoded("odd%2".into()), "odd%2", "an unfinished escape stays");
        assert_eq!(
            url_decoded("bad%ff".into()),
            "bad%ff",
            "not UTF-8: kept as it came"
        );
    }

    #[test]
    fn error_code_reads_the_code_element() {
        let document =
            "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>x</Message></Error>";
        assert_eq!(error_code(document), "SignatureDoesNotMatch");
        assert_eq!(error_code("not xml"), "unreadable");
        assert_eq!(
            error_code("<Error><Code>a\nINFO forged</Code></Error>"),
            "unreadable"
        );
        assert_eq!(
            error_code(&format!("<Code>{}</Code>", "A".repeat(65))),
            "unreadable"
        );
        assert_eq!(error_code(""), "");
    }

    #[test]
    fn settings_never_show_the_secret() {
        let settings = settings_at(1);
        assert!(!format!("{settings:?}").contains("very-secret"));
        let store = ObjectStore::new(&settings).expect("valid settings");
        assert!(!format!("{store:?}").contains("very-secret"));
    }

    #[test]
    fn an_unreachable_service_is_unavailable_after_its_attempts() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let store = ObjectStore::new(&settings_at(port)).expect("valid settings");
        let error = store.delete("k").expect_err("nothing listens");
        assert!(error.is_unavailable(), "{error}");
        assert_eq!(io::Error::from(error).kind(), io::ErrorKind::NotConnected);
    }

    /// A service that sends an answer's head and then nothing more (a peer gone silent):
    /// the download fails within its attempts instead of waiting for good.
    #[test]
    fn a_service_that_stops_mid_answer_fails_the_call() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let port = listener.local_addr().expect("bound").port();
        let mut held = Vec::new();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head);
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nten bytes.");
                held.push(stream);
            }
        });
        let store = ObjectStore::new(&settings_at(port)).expect("valid settings");
        let dir = tempfile::tempdir().expect("a temp dir");
        let target = dir.path().join("object");
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(store.get_to_file("k", &target, 1000).map(|_| ()));
        });
        let result = finished
            .recv_timeout(Duration::from_secs(30))
            .expect("the download returned instead of waiting for good");
        assert!(result.is_err(), "{result:?}");
    }

    /// A service that answers a byte at a time, each well within the per-read timeout (a
    /// listing of 1,000 bytes would take 100 s): the call fails within its attempts' limits,
    /// as unavailable storage.
    #[test]
    fn a_service_that_trickles_fails_the_call_within_its_limit() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let port = listener.local_addr().expect("bound").port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                std::thread::spawn(move || {
                    let mut head = [0u8; 4096];
                    let _ = stream.read(&mut head);
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
                    for _ in 0..1000 {
                        std::thread::sleep(Duration::from_millis(100));
                        if stream.write_all(b" ").is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let settings = S3Settings {
            connect_timeout: Duration::from_millis(300),
            answer_timeout: Duration::from_millis(300),
            ..settings_at(port)
        };
        let store = ObjectStore::new(&settings).expect("valid settings");
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(store.list("p/").map(drop));
        });
        let result = finished
            .recv_timeout(Duration::from_secs(30))
            .expect("the listing returned instead of trickling on");
        let error = result.expect_err("a trickle is no answer");
        assert!(error.is_unavailable(), "{error}");
    }
}
