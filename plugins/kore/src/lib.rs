//! Provider plugin `kore`: forwards a stored upload to the Kore.ai agent platform's public
//! files API.
//!
//! Flow: the host hands over a [`PutRequest`]; auth is `X-api-key: KEY`.
//! - Up to `single_upload_limit` bytes, the spooled file streams from disk as the `file` part
//!   of `POST {base_url}/api/public/files` with `fileContext` → 200 `{fileId, url}`.
//! - Larger files go in chunks of `chunk_size` bytes, each read from its byte range of the
//!   spooled file: `POST /api/public/files/session/start` (JSON `{fileContext, totalChunks,
//!   fileExtension, fileName, fileSize}`) → `{sessionId}`; per chunk, `POST
//!   /api/public/files/session/{sessionId}` with `chunkNumber` (0-based) and `file` → the
//!   same `{chunkNumber, sessionId}` back; then `POST .../{sessionId}/complete` → `{fileId,
//!   url}`.
//!
//! `fileId` becomes the remote id and `url` the URL. `fileContext` is the request's
//! `fileContext` metadata, else the `file_context` setting, else `bulkImport`. A failed step
//! fails the put (the host retries the whole upload). Kore has no delete API.
//!
//! Settings: the common upstream keys (see `upgate_upstream::UpstreamSettings`),
//! `file_context`, `single_upload_limit` (bytes or "25MB"; default 25 000 000) and
//! `chunk_size` (default "8MiB").
#![deny(unsafe_code)]

use serde_json::{Value, json};
use upgate_plugin_api::{DeleteRequest, InitContext, PluginError, Provider, PutRequest, PutResult};
use upgate_upstream::{
    Auth, FileRange, Multipart, Reply, Upstream, UpstreamSettings, is_path_segment, metadata_str,
    no_delete_api, upload_form, upload_range,
};

const VENDOR: &str = "kore";
const DEFAULT_SINGLE_UPLOAD_LIMIT: u64 = 25_000_000;
const DEFAULT_CHUNK_SIZE: u64 = 8 << 20;

/// The kore provider.
#[derive(Debug)]
pub struct Kore {
    upstream: Upstream,
    file_context: String,
    single_upload_limit: u64,
    chunk_size: u64,
}

impl Provider for Kore {
    fn init(context: &InitContext, settings: Value) -> Result<Self, PluginError> {
        let settings = UpstreamSettings::parse(
            context,
            settings,
            &["file_context", "single_upload_limit", "chunk_size"],
        )?;
        let file_context = settings.string_or("file_context", "bulkImport")?;
        let single_upload_limit =
            settings.byte_size_or("single_upload_limit", DEFAULT_SINGLE_UPLOAD_LIMIT)?;
        let chunk_size = settings.byte_size_or("chunk_size", DEFAULT_CHUNK_SIZE)?;
        let upstream = Upstream::new(VENDOR, settings, Auth::header("x-api-key"))?;
        Ok(Self {
            upstream,
            file_context,
            single_upload_limit,
            chunk_size,
        })
    }

    fn put(&self, request: PutRequest) -> Result<PutResult, PluginError> {
        let file_context = metadata_str(&request, "fileContext").unwrap_or(&self.file_context);
        let reply = if request.size <= self.single_upload_limit {
            let form = upload_form(&request, "file")?.text("fileContext", file_context);
            self.upstream
                .post_multipart("upload", "/api/public/files", &[], form)?
        } else {
            self.put_chunked(&request, file_context)?
        };
        reply.into_put_result("", "fileId", &["url"])
    }

    fn delete(&self, _request: DeleteRequest) -> Result<(), PluginError> {
        Err(no_delete_api(VENDOR))
    }

    fn health(&self) -> Result<(), PluginError> {
        self.upstream.health()
    }
}

impl Kore {
    /// The session protocol; returns the `complete` answer.
    fn put_chunked(&self, request: &PutRequest, file_context: &str) -> Result<Reply, PluginError> {
        let whole = upload_range(request)?;
        let total_chunks = whole.len.div_ceil(self.chunk_size);
        let start = json!({
            "fileContext": file_context,
            "totalChunks": total_chunks,
            "fileExtension": request.extension,
            "fileName": request.filename,
            "fileSize": whole.len,
        });
        let started =
            self.upstream
                .post_json("session start", "/api/public/files/session/start", &[], &start)?;
        let session_id = started.require_str("sessionId")?;
        if !is_path_segment(session_id) {
            return Err(started.unexpected("`sessionId` is not a plain id"));
        }
        let session_path = format!("/api/public/files/session/{session_id}");

        for number in 0..total_chunks {
            let offset = number * self.chunk_size;
            let len = self.chunk_size.min(whole.len - offset);
            let form = Multipart::new().text("chunkNumber", &number.to_string()).file(
                "file",
                &request.filename,
                &request.mime_type,
                FileRange::range(&whole.path, offset, len),
            );
            let reply = self
                .upstream
                .post_multipart(&format!("chunk {number}"), &session_path, &[], form)?;
            let echoed_number = match reply.body.get("chunkNumber") {
                Some(Value::Number(n)) => n.as_u64(),
                Some(Value::String(n)) => n.parse().ok(),
                _ => None,
            };
            if echoed_number != Some(number) || reply.str_field("sessionId") != Some(session_id) {
                return Err(reply.unexpected(&format!(
                    "chunk acknowledgement does not match chunk {number} of session {session_id}"
                )));
            }
        }
        self.upstream
            .post_empty("session complete", &format!("{session_path}/complete"), &[])
    }
}

upgate_plugin_api::export_provider!(Kore, "kore");
