//! Intake: a multipart request body streamed into spool files at constant memory.
//!
//! What flows through here: the request body, part by part. Text fields are read into small
//! bounded strings; each file part is checked (filename, extension allowlist) before its
//! first byte is stored, then streamed through a [`SpoolWriter`]: bytes are counted against
//! the plan's size limit as they arrive (413 mid-stream, nothing kept), hashed with sha256
//! and written to `<data_dir>/spool/<id>.part` on a blocking thread in 512 KiB slices
//! (small files by the worker itself), while the first bytes are kept for content sniffing
//! and text is checked as UTF-8. A file that must outlive the request is then renamed
//! atomically to `<data_dir>/spool/<id>`. Any error, a stalled body (idle timeout) or a
//! dropped connection removes what was written.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actix_multipart::{Field, Multipart, MultipartError};
use actix_web::http::header::HeaderMap;
use actix_web::web::Payload;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use crate::config::Durability;
use crate::content::{self, SNIFF_LEN, Utf8Validator};
use crate::error::ApiError;
use crate::policy::Plan;

/// Bytes gathered before one write to disk.
const WRITE_SLICE: usize = 512 * 1024;
/// Files up to this size are written by the async worker itself (see `finish`).
const INLINE_WRITE: usize = 64 * 1024;
/// Largest text field.
const MAX_TEXT_FIELD: usize = 64 * 1024;
/// Largest total of all non-file parts of one request.
const MAX_NON_FILE_BYTES: usize = 1024 * 1024;

/// Names are metadata only; these rules keep them safe to store, log and forward.
pub fn validate_filename(name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::EmptyFilename);
    }
    if name.len() > 255 {
        return Err(ApiError::InvalidFilename(
            "the filename is longer than 255 bytes".into(),
        ));
    }
    if name.contains(['/', '\\']) {
        return Err(ApiError::InvalidFilename(
            "the filename may not contain `/` or `\\`".into(),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::InvalidFilename(
            "the filename may not contain control characters".into(),
        ));
    }
    if name == "." || name == ".." {
        return Err(ApiError::InvalidFilename(
            "the filename may not be `.` or `..`".into(),
        ));
    }
    Ok(())
}

/// The lower-case last extension of a filename, without the dot; empty when there is none
/// (a leading dot does not start an extension: `.env` has none).
pub fn extension_of(name: &str) -> String {
    match name.rsplit_once('.') {
        Some((stem, extension)) if !stem.is_empty() => extension.to_ascii_lowercase(),
        _ => String::new(),
    }
}

/// What a dialect's upload form looks like.
#[derive(Debug, Clone, Copy)]
pub struct FormSpec {
    /// The names file parts may have: the documented one first, then aliases that the
    /// vendor's own generated examples use (Beam's `files.items`).
    pub file_fields: &'static [&'static str],
    /// Most file parts the dialect allows.
    pub max_files: usize,
    /// Text fields kept as metadata; others are drained and ignored.
    pub text_fields: &'static [&'static str],
}

/// Limits and settings for one request's intake.
pub struct IntakeLimits<'a> {
    pub plan: &'a Plan,
    pub max_files: usize,
    pub idle_timeout: Duration,
}

/// The spool directory.
#[derive(Debug, Clone)]
pub struct Spool {
    pub dir: PathBuf,
    pub durability: Durability,
}

impl Spool {
    /// Creates `<data_dir>/spool` and removes `.part` files left by a crash.
    pub fn open(data_dir: &Path, durability: Durability) -> std::io::Result<Self> {
        let dir = data_dir.join("spool");
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "part") {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(Self { dir, durability })
    }

    /// Removes spooled files that belong to no upload in `keep`: uploads whose sync delivery
    /// the daemon did not live to finish (never acknowledged). Returns how many went.
    pub fn remove_orphans(&self, keep: &std::collections::HashSet<String>) -> std::io::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let orphan = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|name| !keep.contains(name));
            if orphan && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Where upload `id` is spooled. Ids are generated by upgate (hex, uuid), never taken
    /// from a client, so they are safe as file names.
    pub fn path_of(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Total bytes in spooled files (for the spool gauge).
    pub fn bytes_on_disk(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// A file fully received into the spool. Removed from disk when dropped, unless
/// [`SpooledFile::keep`] was called.
#[derive(Debug)]
pub struct SpooledFile {
    pub upload_id: String,
    pub filename: String,
    pub extension: String,
    pub mime: String,
    pub size: u64,
    pub sha256: String,
    pub path: PathBuf,
    keep: bool,
}

impl SpooledFile {
    /// Gives the complete file its durable spool name, `<data_dir>/spool/<id>`, with an
    /// atomic rename (and, with `durability: power_loss`, an fsync of the directory): for
    /// files that outlive the request (async delivery).
    pub fn persist(&mut self, spool: &Spool) -> std::io::Result<()> {
        let durable_path = spool.path_of(&self.upload_id);
        std::fs::rename(&self.path, &durable_path)?;
        self.path = durable_path;
        if spool.durability == Durability::PowerLoss {
            std::fs::File::open(&spool.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// The file now belongs to a record: do not remove it on drop.
    pub fn keep(mut self) -> PathBuf {
        self.keep = true;
        std::mem::take(&mut self.path)
    }
}

impl Drop for SpooledFile {
    fn drop(&mut self) {
        if !self.keep && !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What a multipart request carried.
#[derive(Debug, Default)]
pub struct Received {
    pub files: Vec<SpooledFile>,
    pub fields: BTreeMap<String, String>,
}

type Sink = (Option<std::fs::File>, Sha256);
/// A slice written on a blocking thread: the sink, and the emptied buffer to fill again.
type WrittenSlice = JoinHandle<std::io::Result<(Sink, Vec<u8>)>>;

/// Streams one file into the spool (see the module docs).
pub struct SpoolWriter {
    spool: Spool,
    part_path: PathBuf,
    sink: Option<Sink>,
    /// The slice being written on a blocking thread; it comes back with the sink, emptied,
    /// to be filled again (two buffers alternate: no allocation per slice).
    pending: Option<WrittenSlice>,
    buffer: Vec<u8>,
    spare: Option<Vec<u8>>,
    size: u64,
    max_size: u64,
    head: Vec<u8>,
    utf8: Option<Utf8Validator>,
    finished: bool,
}

impl SpoolWriter {
    /// Starts a spool file for upload `upload_id`. `check_utf8` turns on the streaming
    /// UTF-8 validator.
    pub fn new(spool: &Spool, upload_id: &str, max_size: u64, check_utf8: bool) -> Self {
        Self {
            spool: spool.clone(),
            part_path: spool.dir.join(format!("{upload_id}.part")),
            sink: Some((None, Sha256::new())),
            pending: None,
            buffer: Vec::new(),
            spare: None,
            size: 0,
            max_size,
            head: Vec::new(),
            utf8: check_utf8.then(Utf8Validator::default),
            finished: false,
        }
    }

    /// Adds bytes; refuses them once the total passes the limit.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), ApiError> {
        self.size += bytes.len() as u64;
        if self.size > self.max_size {
            return Err(ApiError::TooLarge { limit: self.max_size });
        }
        if self.head.len() < SNIFF_LEN {
            let take = (SNIFF_LEN - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..take]);
        }
        if let Some(validator) = &mut self.utf8 {
            validator.feed(bytes);
        }
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= WRITE_SLICE {
            self.flush().await?;
        }
        Ok(())
    }

    async fn sink(&mut self) -> Result<Sink, ApiError> {
        if let Some(pending) = self.pending.take() {
            let (sink, mut written) = pending
                .await
                .map_err(|_| ApiError::Internal)?
                .map_err(spool_io_error)?;
            written.clear();
            self.spare = Some(written);
            return Ok(sink);
        }
        self.sink.take().ok_or(ApiError::Internal)
    }

    /// Hands the buffer to a blocking thread that hashes and writes it, after the previous
    /// slice is done (at most two slices in memory).
    async fn flush(&mut self) -> Result<(), ApiError> {
        let sink = self.sink().await?;
        let next = self
            .spare
            .take()
            .unwrap_or_else(|| Vec::with_capacity(WRITE_SLICE));
        let slice = std::mem::replace(&mut self.buffer, next);
        let path = self.part_path.clone();
        self.pending = Some(tokio::task::spawn_blocking(move || {
            let sink = write_slice(sink, &path, &slice)?;
            Ok((sink, slice))
        }));
        Ok(())
    }

    /// Writes the rest and returns the complete `.part` file's path, size and sha256, the
    /// first bytes and the UTF-8 verdict. The file keeps its `.part` name until it must
    /// outlive the request ([`SpooledFile::persist`]): a sync delivery reads it (or the local
    /// provider renames it into place) straight away.
    pub async fn finish(mut self) -> Result<(PathBuf, u64, String, Vec<u8>, bool), ApiError> {
        let sink = self.sink().await?;
        let slice = std::mem::take(&mut self.buffer);
        let part_path = self.part_path.clone();
        let durable = self.spool.durability == Durability::PowerLoss;
        // A small file that never needed a disk write so far is written right here: a few
        // microseconds of page-cache work cost less than handing it to another thread. Large
        // files, and anything that must be fsynced, stay off the async worker.
        let inline = sink.0.is_none() && slice.len() <= INLINE_WRITE && !durable;
        let path = part_path.clone();
        let finish = move || -> std::io::Result<String> {
            let (file, hasher) = write_slice(sink, &path, &slice)?;
            let file = match file {
                Some(file) => file,
                None => std::fs::File::create(&path)?,
            };
            if durable {
                file.sync_all()?;
            }
            Ok(hex::encode(hasher.finalize()))
        };
        let sha256 = if inline {
            finish()
        } else {
            tokio::task::spawn_blocking(finish)
                .await
                .map_err(|_| ApiError::Internal)?
        }
        .map_err(spool_io_error)?;
        self.finished = true;
        // Without a validator (not a text extension) the first bytes decide.
        let utf8_ok = match &self.utf8 {
            Some(validator) => validator.finish(),
            None => content::looks_like_text(&self.head),
        };
        Ok((
            part_path,
            self.size,
            sha256,
            std::mem::take(&mut self.head),
            utf8_ok,
        ))
    }
}

fn write_slice(sink: Sink, path: &Path, slice: &[u8]) -> std::io::Result<Sink> {
    let (file, mut hasher) = sink;
    if slice.is_empty() {
        return Ok((file, hasher));
    }
    let mut file = match file {
        Some(file) => file,
        None => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?,
    };
    hasher.update(slice);
    file.write_all(slice)?;
    Ok((Some(file), hasher))
}

fn spool_io_error(error: std::io::Error) -> ApiError {
    if error.raw_os_error() == Some(libc::ENOSPC) {
        ApiError::InsufficientStorage
    } else {
        tracing::error!(%error, "spool write failed");
        ApiError::Internal
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Abandoned (error or dropped connection): remove the part file, after any write
        // still running on a blocking thread.
        let path = std::mem::take(&mut self.part_path);
        match (self.pending.take(), tokio::runtime::Handle::try_current()) {
            (Some(pending), Ok(runtime)) => {
                runtime.spawn(async move {
                    let _ = pending.await;
                    let _ = tokio::fs::remove_file(path).await;
                });
            }
            _ => {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Turns the spooled bytes of one file into a [`SpooledFile`]: content classified and, for
/// JSON types, parsed.
pub async fn complete_file(
    writer: SpoolWriter,
    upload_id: String,
    filename: String,
    extension: String,
    verify_content: bool,
) -> Result<SpooledFile, ApiError> {
    let (path, size, sha256, head, utf8_ok) = writer.finish().await?;
    let mut file = SpooledFile {
        upload_id,
        filename,
        extension,
        mime: String::new(),
        size,
        sha256,
        path,
        keep: false,
    };
    file.mime = content::classify(&file.extension, &head, utf8_ok, verify_content)
        .map_err(|error| ApiError::ContentMismatch(error.to_string()))?;
    if verify_content && content::needs_json_check(&file.extension) {
        let (extension, path) = (file.extension.clone(), file.path.clone());
        tokio::task::spawn_blocking(move || content::verify_json_file(&extension, &path))
            .await
            .map_err(|_| ApiError::Internal)?
            .map_err(|error| ApiError::ContentMismatch(error.to_string()))?;
    }
    Ok(file)
}

/// Waits for the next item of a body stream, dropping a client that stalls.
pub async fn next_or_stall<S, T>(stream: &mut S, idle: Duration) -> Result<Option<T>, ApiError>
where
    S: Stream<Item = T> + Unpin,
{
    tokio::time::timeout(idle, stream.next())
        .await
        .map_err(|_| ApiError::BodyTimeout)
}

/// The client-facing error for a broken multipart body.
pub(crate) fn multipart_error(error: MultipartError) -> ApiError {
    match error {
        MultipartError::ContentTypeMissing
        | MultipartError::ContentTypeParse
        | MultipartError::ContentTypeIncompatible
        | MultipartError::BoundaryMissing => ApiError::NoFile,
        other => ApiError::Malformed(format!("multipart body: {other}")),
    }
}

/// Reads a whole multipart body per `spec`, spooling file parts. `new_id` names each file.
pub async fn receive_multipart(
    headers: &HeaderMap,
    payload: Payload,
    spec: &FormSpec,
    limits: &IntakeLimits<'_>,
    spool: &Spool,
    new_id: &dyn Fn() -> String,
) -> Result<Received, ApiError> {
    let mut multipart = Multipart::new(headers, payload);
    let mut received = Received::default();
    let mut file_parts = 0usize;
    let mut non_file_bytes = 0usize;
    while let Some(field) = next_or_stall(&mut multipart, limits.idle_timeout).await? {
        let mut field = field.map_err(multipart_error)?;
        let (name, filename) = part_names(&field);
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
                    drain(&mut field, limits.idle_timeout, &mut non_file_bytes).await?;
                    continue;
                }
                received
                    .files
                    .push(receive_file(&mut field, filename, limits, spool, new_id()).await?);
            }
            None => {
                let value = read_text(&mut field, limits.idle_timeout, &mut non_file_bytes).await?;
                if let Some(name) = name.filter(|name| spec.text_fields.contains(&name.as_str())) {
                    received.fields.insert(name, value);
                }
            }
        }
    }
    Ok(received)
}

/// The request's declared body length, if any.
pub(crate) fn content_length(request: &actix_web::HttpRequest) -> Option<u64> {
    request
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The part's field name and, for file parts, its filename (RFC 5987 `filename*` first).
fn part_names(field: &Field) -> (Option<String>, Option<String>) {
    let Some(disposition) = field.content_disposition() else {
        return (None, None);
    };
    let name = disposition.get_name().map(str::to_owned);
    let filename = disposition
        .get_filename_ext()
        .and_then(|ext| String::from_utf8(ext.value.clone()).ok())
        .or_else(|| disposition.get_filename().map(str::to_owned));
    (name, filename)
}

async fn receive_file(
    field: &mut Field,
    filename: String,
    limits: &IntakeLimits<'_>,
    spool: &Spool,
    upload_id: String,
) -> Result<SpooledFile, ApiError> {
    validate_filename(&filename)?;
    let extension = extension_of(&filename);
    limits.plan.check_extension(&extension)?;
    let mut writer = SpoolWriter::new(
        spool,
        &upload_id,
        limits.plan.max_file_size(),
        content::is_text_extension(&extension),
    );
    while let Some(chunk) = next_or_stall(field, limits.idle_timeout).await? {
        let chunk: Bytes = chunk.map_err(multipart_error)?;
        writer.write(&chunk).await?;
    }
    complete_file(
        writer,
        upload_id,
        filename,
        extension,
        limits.plan.config.verify_content,
    )
    .await
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
mod tests {
    use super::*;

    #[test]
    fn filenames() {
        assert!(validate_filename("report 2024.pdf").is_ok());
        assert!(validate_filename("產品說明書.pdf").is_ok());
        assert_eq!(validate_filename(""), Err(ApiError::EmptyFilename));
        assert!(matches!(
            validate_filename("../etc/passwd"),
            Err(ApiError::InvalidFilename(_))
        ));
        assert!(matches!(
            validate_filename("a\\b.txt"),
            Err(ApiError::InvalidFilename(_))
        ));
        assert!(matches!(
            validate_filename("a\0b"),
            Err(ApiError::InvalidFilename(_))
        ));
        assert!(matches!(
            validate_filename("line\nbreak.txt"),
            Err(ApiError::InvalidFilename(_))
        ));
        assert!(matches!(
            validate_filename(".."),
            Err(ApiError::InvalidFilename(_))
        ));
        assert!(matches!(
            validate_filename(&"a".repeat(256)),
            Err(ApiError::InvalidFilename(_))
        ));
        assert!(validate_filename(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn extensions() {
        assert_eq!(extension_of("a.tar.GZ"), "gz");
        assert_eq!(extension_of("README"), "");
        assert_eq!(extension_of(".env"), "");
        assert_eq!(extension_of("a."), "");
    }

    #[tokio::test]
    async fn spool_writer_hashes_limits_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), Durability::PowerLoss).unwrap();
        let data: Vec<u8> = (0..(WRITE_SLICE * 2 + 17)).map(|i| (i % 251) as u8).collect();
        let mut writer = SpoolWriter::new(&spool, "u1", data.len() as u64, false);
        for chunk in data.chunks(7000) {
            writer.write(chunk).await.unwrap();
        }
        let (path, size, sha256, head, _) = writer.finish().await.unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(sha256, hex::encode(Sha256::digest(&data)));
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(head.len(), SNIFF_LEN);

        let mut writer = SpoolWriter::new(&spool, "u2", 10, false);
        writer.write(b"0123456789").await.unwrap();
        assert_eq!(writer.write(b"x").await, Err(ApiError::TooLarge { limit: 10 }));
        drop(writer);
        let mut writer = SpoolWriter::new(&spool, "u3", u64::MAX, false);
        writer.write(&data).await.unwrap();
        drop(writer);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let left: Vec<_> = std::fs::read_dir(&spool.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("u1.part")],
            "only the finished file is left"
        );
    }
}
