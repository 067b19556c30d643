//! In-process tests of each dialect's error table: the app built as the daemon builds it,
//! requests sent with `actix_web::test`, and every refusal answered before delivery (key,
//! grant, form, extension, size, rate, unknown paths) checked for its status, its headers
//! and its exact body in the dialect's shape. No provider is loaded. The end-to-end crate
//! (`tests/`) covers the same gateway through the real binary and real plugins.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, LazyLock};

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::test::{TestRequest, call_service, init_service, read_body};
use actix_web::{App, web};
use serde_json::{Value, json};

use crate::config::Config;
use crate::limits::local::LocalLimiter;
use crate::policy::Policy;
use crate::spool::local::LocalSpool;
use crate::store::sqlite::SqliteStore;
use crate::upload::Gateway;
use crate::vocab::DialectName;

/// The largest file the test plans allow.
const LIMIT: usize = 1024;
/// [`LIMIT`] as the dialects' messages name it.
const LIMIT_TEXT: &str = "1KiB";
const BOUNDARY: &str = "upgate-test-boundary-7MA4YWxkTrZu0gW";
/// The rate-limited plan's rate: one request every 1000 seconds, so the second request of
/// a burst of 1 waits.
const SLOW_PERIOD_SECS: u64 = 1000;

/// The config every test runs under: one tenant per dialect, allowed that dialect only
/// (`key-<dialect>`), and a rate-limited tenant allowed every dialect, with a key per
/// dialect (`slow-<dialect>`) so that each dialect's burst is its own.
fn config_text(data_dir: &Path) -> String {
    let mut text = format!(
        "server:\n  listen: 127.0.0.1:0\n  data_dir: {}\n\
         plans:\n\
         \x20 open:\n    max_file_size: {LIMIT}\n    allowed_extensions: [txt]\n\
         \x20 slow:\n    max_file_size: {LIMIT}\n    allowed_extensions: [txt]\n    \
         rate_limit: {{ requests_per_second: {}, burst: 1 }}\n\
         providers:\n  nowhere: {{ plugin: nowhere }}\n\
         tenants:\n\
         \x20 slow:\n    plan: slow\n    provider: nowhere\n    keys: [{}]\n",
        data_dir.display(),
        1.0 / SLOW_PERIOD_SECS as f64,
        DialectName::ALL.map(slow_key_of).join(", "),
    );
    for dialect in DialectName::ALL {
        let name = dialect.as_str();
        text += &format!(
            "  only-{name}:\n    plan: open\n    provider: nowhere\n    keys: [key-{name}]\n    \
             dialects: [{name}]\n"
        );
    }
    text
}

/// The key of the tenant that may use `dialect` only.
fn key_of(dialect: DialectName) -> String {
    format!("key-{}", dialect.as_str())
}

/// The rate-limited tenant's key for requests of `dialect`.
fn slow_key_of(dialect: DialectName) -> String {
    format!("slow-{}", dialect.as_str())
}

/// What the app answered.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).map(|value| value.to_str().unwrap())
    }
}

/// The gateway every test here shares, over a temporary data directory, built once and never
/// dropped (nor is its directory removed): one store for the whole run instead of one per
/// request keeps these tests quick. Tests sharing it do not meet: no plan limits concurrency,
/// and each dialect has its own rate-limited key.
fn gateway() -> web::Data<Gateway> {
    static GATEWAY: LazyLock<web::Data<Gateway>> = LazyLock::new(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let config = Config::parse(&config_text(&dir), &dir.join("config.yaml")).unwrap();
        let durability = config.server.durability;
        let store = Arc::new(SqliteStore::open(&dir, durability).unwrap());
        let spool = LocalSpool::open(&dir, durability).unwrap();
        let limiter = Arc::new(LocalLimiter::new(store.clone()));
        web::Data::new(Gateway::new(
            Policy::new(config, BTreeMap::new()),
            store,
            Arc::new(spool),
            limiter,
        ))
    });
    GATEWAY.clone()
}

/// Sends `requests` in order to an app built as the daemon builds it, over the shared
/// [`gateway`].
async fn exchange(requests: Vec<TestRequest>) -> Vec<Answer> {
    let app = init_service(
        App::new()
            .app_data(gateway())
            .wrap(actix_web::middleware::from_fn(super::body_rate::enforce))
            .wrap(actix_web::middleware::from_fn(super::cors::cors))
            .wrap(actix_web::middleware::from_fn(super::request_log::observe))
            .configure(super::routes),
    )
    .await;
    let mut answers = Vec::new();
    for request in requests {
        let response = call_service(&app, request.to_request()).await;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = read_body(response).await;
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            panic!(
                "{status}: not JSON ({error}): {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        answers.push(Answer {
            status,
            headers,
            body,
        });
    }
    answers
}

async fn exchange_one(request: TestRequest) -> Answer {
    exchange(vec![request]).await.remove(0)
}

/// One part of a multipart body.
enum Part<'a> {
    Text(&'a str, &'a str),
    File {
        field: &'a str,
        filename: &'a str,
        bytes: &'a [u8],
    },
}

/// A `multipart/form-data` body of `parts`, delimited by [`BOUNDARY`].
fn multipart(parts: &[Part<'_>]) -> Vec<u8> {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match part {
            Part::Text(name, value) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}").as_bytes(),
                );
            }
            Part::File {
                field,
                filename,
                bytes,
            } => {
                body.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n\
                         Content-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                );
                body.extend_from_slice(bytes);
            }
        }
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// Which key a request presents.
#[derive(Clone, Copy)]
enum Key {
    Missing,
    /// The dialect's key header, present but not acceptable as a key.
    Malformed,
    /// A key no tenant has.
    Unknown,
    /// The key of a tenant granted another dialect only.
    OtherDialect,
    /// The key of the tenant granted this dialect only.
    Own,
    /// The rate-limited tenant's key for this dialect.
    Slow,
    /// The dialect's key header twice: the tenant's own key, then one no tenant has.
    Twice,
}

/// Which file parts a request carries.
#[derive(Clone, Copy)]
enum File {
    None,
    Fine,
    Extension,
    TooLarge,
    /// One more file part than the dialect allows.
    TooMany,
    EmptyName,
    /// A backslash in the filename.
    BadName,
}

/// One dialect: where its uploads go, how its clients send keys and forms, and the bodies
/// it must answer with. The bodies are written out literally, the vendor-exact table.
struct Dialect {
    name: DialectName,
    upload: &'static str,
    /// The key header and its value for a key.
    key: fn(&str) -> (&'static str, String),
    /// The key header with a value the dialect refuses as malformed.
    malformed: (&'static str, &'static [u8]),
    /// Headers a valid upload needs besides the key.
    headers: &'static [(&'static str, &'static str)],
    /// Text fields a valid upload needs.
    fields: &'static [(&'static str, &'static str)],
    file_field: &'static str,
    /// Most file parts in one upload.
    max_files: usize,
    /// Paths under the dialect's prefixes that no route serves.
    unknown_paths: &'static [&'static str],
    www_authenticate: Option<&'static str>,
    missing_key: Value,
    malformed_key: Value,
    unknown_key: Value,
    forbidden: Value,
    no_file: Value,
    extension: Value,
    too_large: Value,
    too_many_files: Value,
    empty_filename: Value,
    bad_filename: Value,
    /// The 429 body for a wait of n seconds.
    throttled: fn(u64) -> Value,
    not_found: Value,
}

/// The `{"errors": [{"msg", "code"}]}` body of kore and korexo.
fn errors(message: &str, code: u16) -> Value {
    json!({ "errors": [{ "msg": message, "code": code }] })
}

/// Beam's NestJS body for a status other than 401.
fn nest(status: u16, message: &str, error: &str) -> Value {
    json!({ "statusCode": status, "message": message, "error": error })
}

fn dify(code: &str, message: &str, status: u16) -> Value {
    json!({ "code": code, "message": message, "status": status })
}

/// What every dialect says of a filename with a backslash.
const BAD_NAME: &str = "Invalid filename: the filename may not contain `/` or `\\`.";

fn dialects() -> Vec<Dialect> {
    let too_large = format!("File too large: the limit is {LIMIT_TEXT}.");
    let kore_like =
        |name: DialectName, upload: &'static str, unknown_paths: &'static [&'static str]| Dialect {
            name,
            upload,
            key: |key| ("x-api-key", key.to_owned()),
            malformed: ("x-api-key", b"\xffkey"),
            headers: &[],
            fields: &[],
            file_field: "file",
            max_files: 1,
            unknown_paths,
            www_authenticate: None,
            missing_key: errors("API key missing.", 401),
            malformed_key: errors("API key header malformed.", 401),
            unknown_key: errors("Invalid API key.", 401),
            forbidden: errors("This API key may not use this API.", 403),
            no_file: errors("file is required.", 400),
            extension: errors("File type not allowed: .exe.", 415),
            too_large: errors(&too_large, 413),
            too_many_files: errors("Only one file is allowed per request.", 400),
            empty_filename: errors("The filename is empty.", 400),
            bad_filename: errors(BAD_NAME, 400),
            throttled: |n| errors(&format!("Too many requests. Retry after {n} seconds."), 429),
            not_found: errors("No such endpoint.", 404),
        };
    vec![
        Dialect {
            name: DialectName::Dify,
            upload: "/v1/files/upload",
            key: |key| ("authorization", format!("Bearer {key}")),
            malformed: ("authorization", b"Basic a2V5"),
            headers: &[],
            fields: &[("user", "abc-123")],
            file_field: "file",
            max_files: 1,
            unknown_paths: &["/v1/files/nothing", "/v1/files/upload/more"],
            www_authenticate: Some("Bearer realm=\"api\""),
            missing_key: dify(
                "unauthorized",
                "Authorization header must be provided and start with 'Bearer'",
                401,
            ),
            malformed_key: dify(
                "unauthorized",
                "Authorization header must be provided and start with 'Bearer'",
                401,
            ),
            unknown_key: dify("unauthorized", "Access token is invalid", 401),
            forbidden: dify("forbidden", "This API key may not use the Dify API.", 403),
            no_file: dify("no_file_uploaded", "Please upload your file.", 400),
            extension: dify("unsupported_file_type", "File type not allowed.", 415),
            too_large: dify(
                "file_too_large",
                &format!("File size exceeded. The limit is {LIMIT_TEXT}."),
                413,
            ),
            too_many_files: dify("too_many_files", "Only one file is allowed.", 400),
            empty_filename: dify(
                "filename_not_exists_error",
                "The specified filename does not exist.",
                400,
            ),
            bad_filename: dify("invalid_param", BAD_NAME, 400),
            throttled: |n| {
                dify(
                    "too_many_requests",
                    &format!("Too many requests. Retry after {n} seconds."),
                    429,
                )
            },
            not_found: dify("not_found", "No such endpoint.", 404),
        },
        Dialect {
            fields: &[("fileContext", "bulkImport")],
            ..kore_like(
                DialectName::Kore,
                "/api/public/files",
                &["/api/public/files/nothing", "/api/public/files/session/a/b/c"],
            )
        },
        Dialect {
            name: DialectName::Maiagent,
            upload: "/api/v1/attachments-upload/",
            key: |key| ("authorization", format!("Api-Key {key}")),
            malformed: ("authorization", b"Bearer key"),
            headers: &[],
            fields: &[],
            file_field: "file",
            max_files: 1,
            unknown_paths: &["/api/v1/attachments-upload/nothing"],
            www_authenticate: None,
            missing_key: json!({ "detail": "Authentication credentials were not provided." }),
            malformed_key: json!({ "detail": "Invalid API key format." }),
            unknown_key: json!({ "detail": "Invalid API key format." }),
            forbidden: json!({ "detail": "You do not have permission to perform this action." }),
            no_file: json!({ "file": ["This field is required."] }),
            extension: json!({ "detail": "File type not allowed: .exe." }),
            too_large: json!({ "detail": too_large }),
            too_many_files: json!({ "file": ["Only one file may be uploaded per request."] }),
            empty_filename: json!({ "file": ["No filename could be determined."] }),
            bad_filename: json!({ "file": [BAD_NAME] }),
            throttled: |n| json!({ "detail": format!("Request was throttled. Expected available in {n} seconds.") }),
            not_found: json!({ "detail": "No such endpoint." }),
        },
        Dialect {
            fields: &[("userReference", "user-1"), ("uploadType", "runtime")],
            ..kore_like(
                DialectName::Korexo,
                "/api/v2/apps/app-1/environments/dev/attachments/upload",
                &[
                    "/api/v2/apps/app-1/environments/dev/nothing",
                    "/api/v2/apps/app-1/environments/dev/attachments/upload/more",
                ],
            )
        },
        Dialect {
            name: DialectName::Beam,
            upload: "/agent-setup/upload",
            key: |key| ("x-api-key", key.to_owned()),
            malformed: ("x-api-key", b"\xffkey"),
            headers: &[("current-workspace-id", "workspace-1")],
            fields: &[("threadId", "0b7e6c1e-64a3-4d5e-9f7a-3c2b1a0f9e8d")],
            file_field: "files",
            max_files: 10,
            unknown_paths: &["/agent-setup/nothing", "/agent-setup/upload/more"],
            www_authenticate: None,
            missing_key: json!({ "message": "Unauthorized", "statusCode": 401 }),
            malformed_key: json!({ "message": "Unauthorized", "statusCode": 401 }),
            unknown_key: json!({ "message": "Unauthorized", "statusCode": 401 }),
            forbidden: nest(403, "Forbidden resource", "Forbidden"),
            no_file: nest(
                400,
                "No files uploaded: send 1 to 10 file parts named `files`.",
                "Bad Request",
            ),
            extension: nest(415, "File type not allowed: .exe.", "Unsupported Media Type"),
            too_large: nest(413, "File too large", "Payload Too Large"),
            too_many_files: nest(400, "Unexpected field", "Bad Request"),
            empty_filename: nest(400, "The filename is empty.", "Bad Request"),
            bad_filename: nest(400, BAD_NAME, "Bad Request"),
            throttled: |n| {
                nest(
                    429,
                    &format!("Too many requests. Retry after {n} seconds."),
                    "Too Many Requests",
                )
            },
            not_found: nest(404, "No such endpoint.", "Not Found"),
        },
    ]
}

impl Dialect {
    /// An upload request with the dialect's headers and fields, `key` and `file`.
    fn upload(&self, key: Key, file: File) -> TestRequest {
        let mut request = TestRequest::post().uri(self.upload);
        for &(name, value) in self.headers {
            request = request.insert_header((name, value));
        }
        let other = DialectName::ALL
            .into_iter()
            .find(|other| *other != self.name)
            .unwrap();
        request = match key {
            Key::Missing => request,
            Key::Malformed => request.insert_header((
                self.malformed.0,
                HeaderValue::from_bytes(self.malformed.1).unwrap(),
            )),
            Key::Unknown => request.insert_header((self.key)("no-such-key")),
            Key::OtherDialect => request.insert_header((self.key)(&key_of(other))),
            Key::Own => request.insert_header((self.key)(&key_of(self.name))),
            Key::Slow => request.insert_header((self.key)(&slow_key_of(self.name))),
            Key::Twice => request
                .append_header((self.key)(&key_of(self.name)))
                .append_header((self.key)("no-such-key")),
        };
        let hello: &[u8] = b"hello";
        let large = vec![b'a'; LIMIT + 1];
        let files: Vec<(&str, &[u8])> = match file {
            File::None => vec![],
            File::Fine => vec![("notes.txt", hello)],
            File::Extension => vec![("tool.exe", hello)],
            File::TooLarge => vec![("big.txt", &large)],
            File::TooMany => vec![("notes.txt", hello); self.max_files + 1],
            File::EmptyName => vec![("", hello)],
            File::BadName => vec![("a\\b.txt", hello)],
        };
        let fields = self.fields.iter().map(|&(name, value)| Part::Text(name, value));
        let files = files.into_iter().map(|(filename, bytes)| Part::File {
            field: self.file_field,
            filename,
            bytes,
        });
        let parts: Vec<Part<'_>> = fields.chain(files).collect();
        request
            .insert_header((
                header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={BOUNDARY}"),
            ))
            .set_payload(multipart(&parts))
    }

    /// Asserts the status, the exact body, and the headers every error carries: JSON,
    /// `WWW-Authenticate` on 401 exactly when the dialect sends one, `Retry-After` on 429 only.
    fn assert_answer(&self, what: &str, answer: &Answer, status: StatusCode, body: &Value) {
        let context = format!("{} {what}", self.name.as_str());
        assert_eq!(answer.status, status, "{context}: {answer:?}");
        assert_eq!(&answer.body, body, "{context}");
        assert_eq!(
            answer.header(header::CONTENT_TYPE),
            Some("application/json"),
            "{context}"
        );
        let challenge = self
            .www_authenticate
            .filter(|_| status == StatusCode::UNAUTHORIZED);
        assert_eq!(answer.header(header::WWW_AUTHENTICATE), challenge, "{context}");
        if status != StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(answer.header(header::RETRY_AFTER), None, "{context}");
        }
    }
}

/// One refusal every dialect answers: which request, which status, which of the table's
/// bodies.
struct Refusal {
    what: &'static str,
    key: Key,
    file: File,
    status: StatusCode,
    body: fn(&Dialect) -> &Value,
}

const REFUSALS: &[Refusal] = &[
    Refusal {
        what: "missing key",
        key: Key::Missing,
        file: File::Fine,
        status: StatusCode::UNAUTHORIZED,
        body: |dialect| &dialect.missing_key,
    },
    Refusal {
        what: "malformed key",
        key: Key::Malformed,
        file: File::Fine,
        status: StatusCode::UNAUTHORIZED,
        body: |dialect| &dialect.malformed_key,
    },
    Refusal {
        what: "the key header twice (the first one valid)",
        key: Key::Twice,
        file: File::Fine,
        status: StatusCode::UNAUTHORIZED,
        body: |dialect| &dialect.malformed_key,
    },
    Refusal {
        what: "unknown key",
        key: Key::Unknown,
        file: File::Fine,
        status: StatusCode::UNAUTHORIZED,
        body: |dialect| &dialect.unknown_key,
    },
    Refusal {
        what: "key of a tenant granted another dialect",
        key: Key::OtherDialect,
        file: File::Fine,
        status: StatusCode::FORBIDDEN,
        body: |dialect| &dialect.forbidden,
    },
    Refusal {
        what: "no file part",
        key: Key::Own,
        file: File::None,
        status: StatusCode::BAD_REQUEST,
        body: |dialect| &dialect.no_file,
    },
    Refusal {
        what: "extension outside the plan's allowlist",
        key: Key::Own,
        file: File::Extension,
        status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
        body: |dialect| &dialect.extension,
    },
    Refusal {
        what: "file over the plan's max_file_size",
        key: Key::Own,
        file: File::TooLarge,
        status: StatusCode::PAYLOAD_TOO_LARGE,
        body: |dialect| &dialect.too_large,
    },
    Refusal {
        what: "one file part more than the dialect takes",
        key: Key::Own,
        file: File::TooMany,
        status: StatusCode::BAD_REQUEST,
        body: |dialect| &dialect.too_many_files,
    },
    Refusal {
        what: "empty filename",
        key: Key::Own,
        file: File::EmptyName,
        status: StatusCode::BAD_REQUEST,
        body: |dialect| &dialect.empty_filename,
    },
    Refusal {
        what: "backslash in the filename",
        key: Key::Own,
        file: File::BadName,
        status: StatusCode::BAD_REQUEST,
        body: |dialect| &dialect.bad_filename,
    },
];

#[actix_web::test]
async fn each_dialect_refuses_in_its_own_shape() {
    for dialect in dialects() {
        for refusal in REFUSALS {
            let answer = exchange_one(dialect.upload(refusal.key, refusal.file)).await;
            dialect.assert_answer(refusal.what, &answer, refusal.status, (refusal.body)(&dialect));
        }
    }
}

#[actix_web::test]
async fn each_dialect_throttles_with_retry_after() {
    for dialect in dialects() {
        let request = || dialect.upload(Key::Slow, File::None);
        let answers = exchange(vec![request(), request()]).await;
        // The first request takes the burst of 1 (and fails on its form); the second waits.
        dialect.assert_answer(
            "first of a burst of 1",
            &answers[0],
            StatusCode::BAD_REQUEST,
            &dialect.no_file,
        );
        let throttled = &answers[1];
        let retry_after: u64 = throttled
            .header(header::RETRY_AFTER)
            .unwrap_or_else(|| panic!("{:?}: no Retry-After: {throttled:?}", dialect.name))
            .parse()
            .unwrap();
        assert!(
            (SLOW_PERIOD_SECS - 5..=SLOW_PERIOD_SECS).contains(&retry_after),
            "{:?}: Retry-After {retry_after}",
            dialect.name
        );
        dialect.assert_answer(
            "second of a burst of 1",
            throttled,
            StatusCode::TOO_MANY_REQUESTS,
            &(dialect.throttled)(retry_after),
        );
    }
}

#[actix_web::test]
async fn unknown_paths_under_a_prefix_get_that_dialects_404() {
    for dialect in dialects() {
        for path in dialect.unknown_paths {
            for request in [TestRequest::post(), TestRequest::get()] {
                let answer = exchange_one(request.uri(path)).await;
                dialect.assert_answer(path, &answer, StatusCode::NOT_FOUND, &dialect.not_found);
            }
        }
    }
}

#[actix_web::test]
async fn paths_outside_every_prefix_get_the_plain_404() {
    for path in [
        "/",
        "/nowhere",
        "/v1/other",
        "/api/public",
        "/api/v1/other",
        "/agent-setup",
    ] {
        let answer = exchange_one(TestRequest::post().uri(path)).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            answer.body,
            json!({ "message": "no such endpoint", "status": 404 }),
            "{path}"
        );
        assert_eq!(
            answer.header(header::CONTENT_TYPE),
            Some("application/json"),
            "{path}"
        );
        assert_eq!(answer.header(header::WWW_AUTHENTICATE), None, "{path}");
    }
}
