//! Intake: a multipart request body streamed into the spool at constant memory.
//!
//! What flows through here: the request body, part by part. Text fields are read into small
//! bounded strings; each file part is checked (filename, extension allowlist) before its
//! first byte is stored, then streamed through a [`SpoolWriter`]: bytes are counted against
//! the plan's size limit as they arrive (413 mid-stream, nothing kept), hashed with sha256
//! and written to `<data_dir>/spool/<id>.part` in 128 KiB slices, one blocking thread
//! hashing them while another writes them (small files by the worker itself), while the first bytes are kept for content sniffing
//! and text is checked as UTF-8. A file that must outlive the request is then renamed
//! atomically to `<data_dir>/spool/<id>`. Any error, a stalled body (idle timeout) or a
//! dropped connection removes what was written. With sync delivery to a provider that
//! streams, each file part is also passed through to it as it arrives, once its first bytes
//! have passed the content check ([`pass_through`](super::pass_through)).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix_multipart::{Field, Multipart, MultipartError};
use actix_web::error::PayloadError;
use actix_web::http::header::HeaderMap;
use actix_web::web::Payload;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use crate::content;
use crate::error::ApiError;
use crate::policy::Plan;
use std::path::PathBuf;

use crate::config::Delivery;
use crate::plugins::Provider;
use crate::spool::{FileDigest, IntakeBudget, Spool, SpoolWriter, SpooledFile};
use crate::vocab::{DialectName, is_unseen_control};

use super::admit::Admission;
use super::pass_through::PassThrough;
use super::{Gateway, Metadata};
/// Largest text field.
const MAX_TEXT_FIELD: usize = 64 * 1024;
/// Largest total of all non-file parts of one request.
const MAX_NON_FILE_BYTES: usize = 1024 * 1024;
/// Most parts of one request, of any kind: a form of empty parts costs the parser's work
/// per part while counting no bytes.
const MAX_PARTS: usize = 1000;

/// Names are metadata only; these rules keep them safe to store, log and forward.
pub(crate) fn validate_filename(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() {
        return Err(ApiError::EmptyFilename);
    }
    if name.len() > 255 {
        return Err(ApiError::InvalidFilename(
            "the filename is longer than 255 bytes".into(),
        ));
    }
    if name.contains(['/', '\\']) {
        return Err(slash_in_filename());
    }
    if name.chars().any(is_unseen_control) {
        return Err(ApiError::InvalidFilename(
            "the filename may not contain control or bidirectional-override characters".into(),
        ));
    }
    if name == "." || name == ".." {
        return Err(ApiError::InvalidFilename(
            "the filename may not be `.` or `..`".into(),
        ));
    }
    Ok(())
}

fn slash_in_filename() -> ApiError {
    ApiError::InvalidFilename("the filename may not contain `/` or `\\`".into())
}

/// The lower-case last extension of a filename, without the dot; empty when there is none
/// (a leading dot does not start an extension: `.env` has none). Only the last one counts,
/// for allowlists and content checks alike: `backup.tar.gz` is `gz` (allowed by a plan that
/// allows `gz`, checked as gzip), `backup.tgz` is `tgz` (also gzip). Plans' allowlists are
/// written per last extension, so a compound one (`tar.gz`) never matches: write `gz`.
pub(crate) fn extension_of(name: &str) -> String {
    match name.rsplit_once('.') {
        Some((stem, extension)) if !stem.is_empty() => extension.to_ascii_lowercase(),
        _ => String::new(),
    }
}

/// What a dialect's upload form looks like.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FormSpec {
    /// The names file parts may have: the documented one first, then aliases that the
    /// vendor's own generated examples use (Beam's `files.items`).
    pub file_fields: &'static [&'static str],
    /// Most file parts the dialect allows.
    pub max_files: usize,
    /// Text fields kept as metadata; others are drained and ignored.
    pub text_fields: &'static [&'static str],
}

/// Limits and settings for one request's intake.
pub(crate) struct IntakeLimits<'a> {
    pub plan: &'a Plan,
    pub max_files: usize,
    pub idle_timeout: Duration,
    /// The memory the spool writers of all requests share.
    pub budget: &'a IntakeBudget,
    /// Set when the files may be passed through to their provider as they arrive.
    pub streaming: Option<Streaming<'a>>,
}

/// What a pass-through needs: a streaming provider with sync delivery, and who sends.
pub(crate) struct Streaming<'a> {
    pub gateway: &'a Gateway,
    pub provider: &'a Arc<Provider>,
    pub tenant: &'a str,
    pub dialect: DialectName,
    /// The dialect's metadata known before the body (from the path and headers).
    pub known: &'a Metadata,
    /// The most bytes a file of this request can have (the plan's limit, the body's length).
    pub size_at_most: u64,
}

/// A received file and, when it was passed through to its provider while it arrived, that
/// delivery's first attempt, waiting for the upload to be accepted ([`Gateway::accept`]).
pub(crate) struct Arrived {
    pub file: SpooledFile,
    pub passing: Option<PassThrough>,
}

impl From<SpooledFile> for Arrived {
    fn from(file: SpooledFile) -> Self {
        Self { file, passing: None }
    }
}

impl Gateway {
    /// Receives a multipart body for an admitted request (files spooled, not yet recorded;
    /// passed through to a streaming provider with sync delivery). `known` is the dialect's
    /// metadata known before the body.
    pub(crate) async fn receive(
        &self,
        admission: &Admission,
        headers: &HeaderMap,
        payload: Payload,
        spec: &FormSpec,
        known: &Metadata,
    ) -> Result<Received, ApiError> {
        self.check_disk_floor()?;
        let dialect = admission.dialect;
        let plan = &admission.tenant.plan;
        let max_files = plan.max_files_per_request(spec.max_files);
        let length = content_length(headers);
        // The whole body cannot be legitimate if it exceeds every allowed file plus room for
        // the form's framing: refused at once when its length says so, else once it has.
        let ceiling = plan
            .max_file_size()
            .saturating_mul(max_files as u64)
            .saturating_add(1 << 20);
        let too_large = || ApiError::TooLarge {
            limit: plan.max_file_size(),
        };
        if length.is_some_and(|length| length > ceiling) {
            return Err(too_large());
        }
        let (payload, overflowed) = bounded_body(payload, ceiling);
        let streaming = admission
            .provider()
            .filter(|provider| provider.plugin.streams() && provider.config.delivery == Delivery::Sync)
            .map(|provider| Streaming {
                gateway: self,
                provider,
                tenant: &admission.tenant.name,
                dialect,
                known,
                size_at_most: plan.max_file_size().min(length.unwrap_or(u64::MAX)),
            });
        let limits = IntakeLimits {
            plan,
            max_files,
            idle_timeout: admission.policy.config.server.idle_timeout.0,
            budget: &self.intake_budget,
            streaming,
        };
        let received = receive_multipart(headers, payload, spec, &limits, &self.spool, &|| {
            dialect.new_upload_id()
        })
        .await
        .map_err(|error| if overflowed.get() { too_large() } else { error })?;
        if received.files.is_empty() {
            return Err(ApiError::NoFile);
        }
        Ok(received)
    }
}

/// What a multipart request carried.
#[derive(Default)]
pub(crate) struct Received {
    pub files: Vec<Arrived>,
    pub fields: BTreeMap<String, String>,
}

/// Turns the spooled bytes of one file into a [`SpooledFile`]: content classified by its
/// first bytes and, for the types whose structure is checked (JSON, PNG, GIF, PDF, OOXML),
/// the whole file read again on a blocking thread ([`content::verify_file`]).
pub(crate) async fn complete_file(
    writer: SpoolWriter,
    upload_id: String,
    filename: String,
    extension: String,
    verify_content: bool,
) -> Result<SpooledFile, ApiError> {
    let (path, size, sha256, head, utf8_ok) = writer.finish().await?;
    let digest = FileDigest {
        size,
        sha256,
        head,
        utf8_ok,
    };
    received_file(path, digest, upload_id, filename, extension, verify_content).await
}

/// The spooled file of a complete upload at `path`, whose bytes came to `digest`, with its
/// content checked against its extension (the first bytes, then, for the types that have
/// one, the whole file's structure).
pub(crate) async fn received_file(
    path: PathBuf,
    digest: FileDigest,
    upload_id: String,
    filename: String,
    extension: String,
    verify_content: bool,
) -> Result<SpooledFile, ApiError> {
    let mut file = SpooledFile {
        upload_id,
        filename,
        extension,
        mime: String::new(),
        size: digest.size,
        sha256: digest.sha256,
        path,
        keep: false,
    };
    file.mime = content::classify(&file.extension, &digest.head, digest.utf8_ok, verify_content)?;
    if verify_content && content::needs_file_check(&file.extension) {
        let (extension, path) = (file.extension.clone(), file.path.clone());
        tokio::task::spawn_blocking(move || content::verify_file(&extension, &path)).await??;
    }
    Ok(file)
}

/// Waits for the next item of a body stream, dropping a client that stalls. Each item spends
/// one unit of the task's cooperative budget: a body whose items are always ready (a form
/// whose file is made of `\r\n--`, which the multipart parser hands over 4 bytes at a
/// time) yields to the worker's other connections now and then instead of holding it.
pub(crate) async fn next_or_stall<S, T>(stream: &mut S, idle: Duration) -> Result<Option<T>, ApiError>
where
    S: Stream<Item = T> + Unpin,
{
    tokio::task::coop::consume_budget().await;
    tokio::time::timeout(idle, stream.next())
        .await
        .map_err(|_| ApiError::BodyTimeout)
}

/// The client-facing error for a body that could not be read: a body below the minimum
/// data rate (`http::body_rate`) is a stall (408); anything else a malformed request.
pub(crate) fn body_error(error: PayloadError) -> ApiError {
    match error {
        PayloadError::Io(error) if error.kind() == std::io::ErrorKind::TimedOut => ApiError::BodyTimeout,
        other => ApiError::Malformed(format!("request body: {other}")),
    }
}

/// The client-facing error for a broken multipart body.
pub(crate) fn multipart_error(error: MultipartError) -> ApiError {
    match error {
        MultipartError::Payload(error) => body_error(error),
        MultipartError::ContentTypeMissing
        | MultipartError::ContentTypeParse
        | MultipartError::ContentTypeIncompatible
        | MultipartError::BoundaryMissing => ApiError::NoFile,
        other => ApiError::Malformed(format!("multipart body: {other}")),
    }
}

/// Whether a [`bounded_body`] passed its ceiling.
#[derive(Clone, Default)]
pub(crate) struct Overflowed(Arc<std::sync::atomic::AtomicBool>);

impl Overflowed {
    pub(crate) fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A request body that fails once more than `ceiling` bytes came (as the multipart parser
/// reads it, preamble and framing included), and the flag that says so: a chunked body has
/// no length to refuse up front, and the parser counts only what parts hold.
pub(crate) fn bounded_body(
    payload: Payload,
    ceiling: u64,
) -> (
    impl Stream<Item = Result<Bytes, PayloadError>> + 'static,
    Overflowed,
) {
    let overflowed = Overflowed::default();
    let flag = overflowed.clone();
    let mut seen = 0u64;
    let body = payload.map(move |item| {
        let bytes = item?;
        seen = seen.saturating_add(bytes.len() as u64);
        if seen > ceiling {
            flag.0.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(PayloadError::Overflow);
        }
        Ok(bytes)
    });
    (body, overflowed)
}

/// A header the request sent more than once.
pub(crate) struct SentTwice;

/// The one value of header `name`, `None` when it is absent. Sent twice it is refused, even
/// with equal copies: which copy counts would depend on who reads it (a proxy in front may
/// read the other one). Every header the dialects and the forms read goes through here.
pub(crate) fn header_once(
    headers: &HeaderMap,
    name: impl actix_web::http::header::AsHeaderName,
) -> Result<Option<&actix_web::http::header::HeaderValue>, SentTwice> {
    let mut values = headers.get_all(name);
    let value = values.next();
    match values.next() {
        None => Ok(value),
        Some(_) => Err(SentTwice),
    }
}

/// The multipart form a body holds. Its `Content-Type` sent twice is refused: each copy
/// may name another boundary, and a scanner in front reading the other one would see other
/// files.
pub(crate) fn form_of(
    headers: &HeaderMap,
    payload: impl Stream<Item = Result<Bytes, PayloadError>> + 'static,
) -> Result<Multipart, ApiError> {
    header_once(headers, actix_web::http::header::CONTENT_TYPE)
        .map_err(|SentTwice| ApiError::Malformed("Content-Type is given twice".into()))?;
    Ok(Multipart::new(headers, payload))
}

/// Reads a whole multipart body per `spec`, spooling file parts. `new_id` names each file.
pub(crate) async fn receive_multipart(
    headers: &HeaderMap,
    payload: impl Stream<Item = Result<Bytes, PayloadError>> + 'static,
    spec: &FormSpec,
    limits: &IntakeLimits<'_>,
    spool: &Arc<dyn Spool>,
    new_id: &dyn Fn() -> String,
) -> Result<Received, ApiError> {
    let mut multipart = form_of(headers, payload)?;
    let mut received = Received::default();
    let mut file_parts = 0usize;
    let mut non_file_bytes = 0usize;
    let mut parts = 0usize;
    while let Some(mut field) = next_part(&mut multipart, limits.idle_timeout, &mut parts).await? {
        let (name, filename) = part_names(&field)?;
        match filename {
            Some(filename) => {
                file_parts += 1;
                if file_parts > limits.max_files {
                    return Err(ApiError::TooManyFiles {
                        max: limits.max_files,
                    });
                }
                if !name
                    .as_deref()
                    .is_some_and(|name| spec.file_fields.contains(&name))
                {
                    // A file under a name the dialect does not read (`upload` for `file`): when
                    // it is too large to skip and no file came before it, what the client
                    // hears is that its file is missing, not that a part was too large.
                    match drain(&mut field, limits.idle_timeout, &mut non_file_bytes).await {
                        Err(ApiError::Malformed(_)) if received.files.is_empty() => {
                            return Err(ApiError::NoFile);
                        }
                        drained => drained?,
                    }
                    continue;
                }
                // A file passes through only after files that all do: one delivered from the
                // spool after the body would wait for a delivery slot while a later file's
                // stream holds one, waiting for its end.
                let may_pass = received
                    .files
                    .iter()
                    .all(|file| file.passing.as_ref().is_some_and(PassThrough::is_open));
                // Boxed: a file part's state (spool writer, pass-through) is large, and inline it
                // would be copied with every request's future.
                let arrived = Box::pin(receive_file(
                    &mut field,
                    filename,
                    limits,
                    spool,
                    new_id(),
                    may_pass,
                    &received.fields,
                ))
                .await?;
                received.files.push(arrived);
            }
            None => {
                let value = read_text(&mut field, limits.idle_timeout, &mut non_file_bytes).await?;
                if let Some(name) = name.filter(|name| spec.text_fields.contains(&name.as_str())) {
                    // Which copy counts would depend on who reads it.
                    if received.fields.contains_key(&name) {
                        return Err(ApiError::Malformed(format!(
                            "the form field {name} is given twice"
                        )));
                    }
                    received.fields.insert(name, value);
                }
            }
        }
    }
    Ok(received)
}

/// The next part of a form (`parts` counts them), dropping a client that stalls. Refused:
/// a part past [`MAX_PARTS`], and a part with a `Content-Length` of its own: RFC 7578 says a
/// receiver ignores it, and the multipart parser obeys it (a file cut short, or a boundary
/// taken into its bytes), so a scanner in front and upgate would each see another file.
pub(crate) async fn next_part(
    multipart: &mut Multipart,
    idle: Duration,
    parts: &mut usize,
) -> Result<Option<Field>, ApiError> {
    let Some(field) = next_or_stall(multipart, idle).await? else {
        return Ok(None);
    };
    let field = field.map_err(multipart_error)?;
    *parts += 1;
    if *parts > MAX_PARTS {
        return Err(ApiError::Malformed(format!(
            "the form has more than {MAX_PARTS} parts"
        )));
    }
    if field
        .headers()
        .contains_key(actix_web::http::header::CONTENT_LENGTH)
    {
        return Err(ApiError::Malformed(
            "a form part may not have a Content-Length of its own".into(),
        ));
    }
    Ok(Some(field))
}

/// The request's declared body length, if any.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(actix_web::http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The part's field name and, for file parts, its filename (RFC 5987 `filename*` first). A
/// `filename*` that cannot be read refuses the request: the part is a file all the same, and
/// taking it for a text field would drop the file without a word.
fn part_names(field: &Field) -> Result<(Option<String>, Option<String>), ApiError> {
    let Some(disposition) = field.content_disposition() else {
        return Ok((None, None));
    };
    let name = disposition.get_name().map(str::to_owned);
    let filename = match disposition.get_filename_ext() {
        Some(extended) => Some(decoded_filename(extended)?),
        None => disposition.get_filename().map(str::to_owned),
    };
    Ok((name, filename))
}

/// An RFC 5987 `filename*` as text: UTF-8, or ISO-8859-1 and US-ASCII (which RFC 5987 says
/// every recipient reads); any other charset, or bytes its charset does not allow, is refused.
fn decoded_filename(extended: &actix_web::http::header::ExtendedValue) -> Result<String, ApiError> {
    use actix_web::http::header::Charset;
    let bytes = &extended.value;
    let text = match &extended.charset {
        Charset::Iso_8859_1 => Some(bytes.iter().copied().map(char::from).collect()),
        Charset::Us_Ascii => bytes
            .is_ascii()
            .then(|| String::from_utf8_lossy(bytes).into_owned()),
        Charset::Ext(label) if label.eq_ignore_ascii_case("utf-8") => String::from_utf8(bytes.clone()).ok(),
        _ => {
            return Err(ApiError::InvalidFilename(
                "filename* must be UTF-8 or ISO-8859-1".into(),
            ));
        }
    };
    text.ok_or_else(|| ApiError::InvalidFilename("filename* is not valid in its charset".into()))
}

async fn receive_file(
    field: &mut Field,
    filename: String,
    limits: &IntakeLimits<'_>,
    spool: &Arc<dyn Spool>,
    upload_id: String,
    may_pass: bool,
    fields_so_far: &BTreeMap<String, String>,
) -> Result<Arrived, ApiError> {
    // The multipart parser reads `\` in a quoted filename as an escape and drops it: a name
    // is recorded as the client sent it or refused, so a backslash anywhere in the part's
    // Content-Disposition refuses it, as `validate_filename` refuses one in the name.
    if field
        .headers()
        .get(actix_web::http::header::CONTENT_DISPOSITION)
        .is_some_and(|value| value.as_bytes().contains(&b'\\'))
    {
        return Err(slash_in_filename());
    }
    validate_filename(&filename)?;
    let extension = extension_of(&filename);
    limits.plan.check_extension(&extension)?;
    let mut writer = SpoolWriter::new(
        spool,
        limits.budget,
        &upload_id,
        limits.plan.max_file_size(),
        content::is_text_extension(&extension),
    );
    let verify = limits.plan.config.verify_content;
    // A pass-through starts once the first bytes have passed the content check; the pieces
    // before are held (at most the sniffed bytes and one piece). Every return before
    // `accept` drops it, which aborts it.
    let mut passing: Option<PassThrough> = None;
    let mut held: Vec<Bytes> = Vec::new();
    let mut deciding = may_pass && limits.streaming.is_some();
    while let Some(chunk) = next_or_stall(field, limits.idle_timeout).await? {
        let chunk: Bytes = chunk.map_err(multipart_error)?;
        writer.write(&chunk).await?;
        if let Some(stream) = passing.as_mut().filter(|stream| stream.is_open()) {
            stream.send(chunk).await;
            continue;
        }
        if !deciding {
            continue;
        }
        held.push(chunk);
        let (Some(streaming), Some((head, text))) = (&limits.streaming, writer.sniffed()) else {
            continue;
        };
        deciding = false;
        let upload = (upload_id.as_str(), filename.as_str(), extension.as_str());
        passing = start_passing(
            streaming,
            upload,
            head,
            text,
            verify,
            fields_so_far,
            limits.idle_timeout,
        );
        if let Some(stream) = passing.as_mut() {
            for piece in held.drain(..) {
                stream.send(piece).await;
            }
        }
        held = Vec::new();
    }
    let file = complete_file(writer, upload_id, filename, extension, verify).await?;
    Ok(Arrived { file, passing })
}

/// Starts the pass-through of an upload (`(id, filename, extension)`) whose first bytes are
/// `head`, unless the content check refuses them (the upload is then refused at its end, as
/// without streaming) or no delivery slot is free. Not async, so that none of this is kept
/// in the intake's future.
fn start_passing(
    streaming: &Streaming<'_>,
    (upload_id, filename, extension): (&str, &str, &str),
    head: &[u8],
    text: bool,
    verify: bool,
    fields_so_far: &BTreeMap<String, String>,
    stall: Duration,
) -> Option<PassThrough> {
    let mime = content::classify(extension, head, text, verify).ok()?;
    let mut metadata = streaming.known.clone();
    for (name, value) in fields_so_far {
        metadata.insert(name.clone(), value.clone().into());
    }
    let request = upgate_plugin_api::StreamRequest {
        upload_id: upload_id.to_owned(),
        filename: filename.to_owned(),
        extension: extension.to_owned(),
        mime_type: mime,
        size: None,
        size_at_most: streaming.size_at_most,
        tenant: streaming.tenant.to_owned(),
        dialect: streaming.dialect.as_str().to_owned(),
        metadata,
    };
    PassThrough::start(streaming.gateway, streaming.provider, request, stall)
}

/// Reads a small text part (bounded by [`MAX_TEXT_FIELD`] and, with every other non-file part
/// of the request, by [`MAX_NON_FILE_BYTES`]).
pub(crate) async fn read_text(
    field: &mut Field,
    idle: Duration,
    total: &mut usize,
) -> Result<String, ApiError> {
    let mut value = Vec::new();
    while let Some(chunk) = next_or_stall(field, idle).await? {
        let chunk = chunk.map_err(multipart_error)?;
        *total += chunk.len();
        if value.len() + chunk.len() > MAX_TEXT_FIELD || *total > MAX_NON_FILE_BYTES {
            return Err(ApiError::Malformed("a form field is too long".into()));
        }
        value.extend_from_slice(&chunk);
    }
    String::from_utf8(value).map_err(|_| ApiError::Malformed("a form field is not UTF-8".into()))
}

/// Reads and discards a part nobody asked for (bounded like [`read_text`]).
pub(crate) async fn drain(field: &mut Field, idle: Duration, total: &mut usize) -> Result<(), ApiError> {
    while let Some(chunk) = next_or_stall(field, idle).await? {
        *total += chunk.map_err(multipart_error)?.len();
        if *total > MAX_NON_FILE_BYTES {
            return Err(ApiError::Malformed("unexpected parts are too large".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
