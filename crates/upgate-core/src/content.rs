//! Content checks: what a file's bytes say it is, against what its name says.
//!
//! What flows through here: the extension of the client's filename, the first bytes of the
//! file (sniffed with the `infer` crate's magic numbers), a streaming UTF-8 validator fed
//! every chunk, and, for `json`/`jsonl`, the spooled file re-read in a blocking task. Out
//! comes the MIME type upgate records and returns (never the client's claim), or a
//! [`ContentError`] explaining the contradiction.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// How many leading bytes are kept for sniffing.
pub(crate) const SNIFF_LEN: usize = 8192;

/// Why content was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentError {
    #[error("the content is {detected}, not .{extension}")]
    Mismatch { extension: String, detected: String },
    #[error("the content does not look like a .{extension} file")]
    NotRecognised { extension: String },
    #[error("a .{extension} file must be UTF-8 text")]
    NotUtf8 { extension: String },
    #[error("a .{extension} file must hold valid JSON: {detail}")]
    InvalidJson { extension: String, detail: String },
    #[error("cannot read the spooled file: {0}")]
    Io(String),
}

/// What upgate knows of an extension: its MIME type and which sniffed kinds (by `infer`'s
/// extension name) are consistent with it. Text kinds have `text: true` and no magic.
struct KnownType {
    extensions: &'static [&'static str],
    mime: &'static str,
    sniffed_as: &'static [&'static str],
    text: bool,
}

const fn binary(
    extensions: &'static [&'static str],
    mime: &'static str,
    sniffed_as: &'static [&'static str],
) -> KnownType {
    KnownType {
        extensions,
        mime,
        sniffed_as,
        text: false,
    }
}

const fn text(extensions: &'static [&'static str], mime: &'static str) -> KnownType {
    KnownType {
        extensions,
        mime,
        sniffed_as: &["html", "xml", "sh"],
        text: true,
    }
}

/// OLE compound files (doc, xls, ppt) sniff as `msi` without infer's `cfb` feature.
const OLE: &[&str] = &["doc", "xls", "ppt", "msi"];
/// OOXML files are zip containers: infer sees either the specific kind or plain zip.
const fn ooxml(kind: &'static str) -> [&'static str; 2] {
    [kind, "zip"]
}

static KNOWN: &[KnownType] = &[
    binary(&["png"], "image/png", &["png"]),
    binary(&["jpg", "jpeg"], "image/jpeg", &["jpg"]),
    binary(&["gif"], "image/gif", &["gif"]),
    binary(&["webp"], "image/webp", &["webp"]),
    binary(&["bmp"], "image/bmp", &["bmp"]),
    binary(&["tif", "tiff"], "image/tiff", &["tif"]),
    binary(&["heif", "heic"], "image/heif", &["heif", "avif"]),
    binary(&["pdf"], "application/pdf", &["pdf"]),
    binary(&["zip"], "application/zip", &["zip"]),
    binary(
        &["docx"],
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        &ooxml("docx"),
    ),
    binary(
        &["xlsx"],
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        &ooxml("xlsx"),
    ),
    binary(
        &["pptx"],
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        &ooxml("pptx"),
    ),
    binary(&["doc"], "application/msword", OLE),
    binary(&["xls"], "application/vnd.ms-excel", OLE),
    binary(&["ppt"], "application/vnd.ms-powerpoint", OLE),
    binary(&["mp3", "mpga"], "audio/mpeg", &["mp3"]),
    binary(&["m4a"], "audio/mp4", &["m4a", "mp4"]),
    binary(&["wav"], "audio/wav", &["wav"]),
    binary(&["amr"], "audio/amr", &["amr"]),
    binary(&["mp4"], "video/mp4", &["mp4", "m4v", "m4a", "mov"]),
    binary(&["webm"], "video/webm", &["webm", "mkv"]),
    binary(&["mov"], "video/quicktime", &["mov", "mp4"]),
    binary(&["mpeg", "mpg"], "video/mpeg", &["mpg", "mp3"]),
    text(&["txt", "text", "log"], "text/plain"),
    text(&["csv"], "text/csv"),
    text(&["md", "markdown"], "text/markdown"),
    text(&["json"], "application/json"),
    text(&["jsonl", "ndjson"], "application/jsonl"),
    text(&["svg"], "image/svg+xml"),
    text(&["html", "htm"], "text/html"),
    text(&["xml"], "application/xml"),
];

fn known(extension: &str) -> Option<&'static KnownType> {
    KNOWN.iter().find(|known| known.extensions.contains(&extension))
}

/// True when the file must be checked as UTF-8 while it streams.
pub(crate) fn is_text_extension(extension: &str) -> bool {
    known(extension).is_some_and(|known| known.text)
}

/// The family a MIME type belongs to, as MaiAgent's `type` field names it. Documents are
/// the vendor's "Documents" group (doc, docx, pdf and their open kin); spreadsheets and
/// presentations are `other`, as the vendor's own example answers for an `.xls`.
pub(crate) fn family(mime: &str, extension: &str) -> &'static str {
    let top = mime.split('/').next().unwrap_or("");
    match top {
        "audio" => "audio",
        "image" => "image",
        "video" => "video",
        "text" => "text",
        _ => match extension {
            "pdf" | "doc" | "docx" | "odt" | "rtf" => "document",
            "json" | "jsonl" | "ndjson" | "xml" => "text",
            _ => "other",
        },
    }
}

/// Decides the MIME type of a file from its extension and first bytes, refusing
/// contradictions when `verify` is on. `utf8_ok` is the streaming validator's verdict.
pub(crate) fn classify(
    extension: &str,
    head: &[u8],
    utf8_ok: bool,
    verify: bool,
) -> Result<String, ContentError> {
    let sniffed = infer::get(head);
    let expected = known(extension);
    let mismatch = |detected: String| ContentError::Mismatch {
        extension: extension.to_owned(),
        detected,
    };
    // A text type is UTF-8 whatever its first bytes look like (`#!/bin/sh`, `<?xml`, none).
    let text_verdict = |expected: &KnownType| {
        if verify && !utf8_ok {
            Err(ContentError::NotUtf8 {
                extension: extension.to_owned(),
            })
        } else {
            Ok(expected.mime.to_owned())
        }
    };
    match (expected, sniffed) {
        (Some(expected), Some(kind)) if expected.sniffed_as.contains(&kind.extension()) => {
            if expected.text {
                text_verdict(expected)
            } else {
                Ok(expected.mime.to_owned())
            }
        }
        (Some(expected), None) if expected.text => text_verdict(expected),
        (_, Some(kind)) if verify => Err(mismatch(format!(
            "{} ({})",
            describe(kind.extension()),
            kind.mime_type()
        ))),
        (Some(_), None) if verify && !head.is_empty() => Err(ContentError::NotRecognised {
            extension: extension.to_owned(),
        }),
        (Some(expected), _) => Ok(expected.mime.to_owned()),
        (None, Some(kind)) => Ok(kind.mime_type().to_owned()),
        (None, None) if utf8_ok && !head.is_empty() => Ok("text/plain".to_owned()),
        (None, None) => Ok("application/octet-stream".to_owned()),
    }
}

fn describe(kind: &str) -> &str {
    match kind {
        "elf" | "exe" | "dll" | "mach" | "obj" => "an executable",
        "zip" => "a zip archive",
        _ => kind,
    }
}

/// Checks that a spooled `json` file parses, or each line of a `jsonl` file does. Reads the
/// file with bounded memory: run it on a blocking thread.
pub(crate) fn verify_json_file(extension: &str, path: &Path) -> Result<(), ContentError> {
    let invalid = |detail: String| ContentError::InvalidJson {
        extension: extension.to_owned(),
        detail,
    };
    let file = std::fs::File::open(path).map_err(|error| ContentError::Io(error.to_string()))?;
    match extension {
        "json" => {
            let reader = BufReader::with_capacity(64 * 1024, file);
            let mut deserializer = serde_json::Deserializer::from_reader(reader);
            serde::de::IgnoredAny::deserialize_from(&mut deserializer)
                .map_err(|error| invalid(error.to_string()))?;
            deserializer.end().map_err(|error| invalid(error.to_string()))
        }
        "jsonl" | "ndjson" => {
            let reader = BufReader::with_capacity(64 * 1024, file);
            for (index, line) in reader.split(b'\n').enumerate() {
                let line = line.map_err(|error| ContentError::Io(error.to_string()))?;
                let trimmed = line.trim_ascii();
                if trimmed.is_empty() {
                    continue;
                }
                serde_json::from_slice::<serde::de::IgnoredAny>(trimmed)
                    .map_err(|error| invalid(format!("line {}: {error}", index + 1)))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

trait DeserializeFrom {
    fn deserialize_from<R: Read>(
        deserializer: &mut serde_json::Deserializer<serde_json::de::IoRead<R>>,
    ) -> serde_json::Result<()>;
}

impl DeserializeFrom for serde::de::IgnoredAny {
    fn deserialize_from<R: Read>(
        deserializer: &mut serde_json::Deserializer<serde_json::de::IoRead<R>>,
    ) -> serde_json::Result<()> {
        serde::Deserialize::deserialize(deserializer).map(|_: serde::de::IgnoredAny| ())
    }
}

/// Whether the first bytes of a file look like UTF-8 text (a character cut at the end of
/// the sample is fine; NUL bytes are not text).
pub(crate) fn looks_like_text(head: &[u8]) -> bool {
    !head.contains(&0)
        && match std::str::from_utf8(head) {
            Ok(_) => true,
            Err(error) => error.error_len().is_none() && head.len() - error.valid_up_to() < 4,
        }
}

/// Whether a file needs [`verify_json_file`] after it is spooled.
pub(crate) fn needs_json_check(extension: &str) -> bool {
    matches!(extension, "json" | "jsonl" | "ndjson")
}

/// Streaming UTF-8 validation across chunk boundaries, holding at most 3 pending bytes.
#[derive(Debug, Default)]
pub(crate) struct Utf8Validator {
    pending: Vec<u8>,
    invalid: bool,
}

impl Utf8Validator {
    pub(crate) fn feed(&mut self, mut chunk: &[u8]) {
        if self.invalid {
            return;
        }
        if !self.pending.is_empty() {
            // Finish the character split across the previous chunk with this one's first bytes.
            let held = self.pending.len();
            let mut joined = std::mem::take(&mut self.pending);
            joined.extend_from_slice(&chunk[..chunk.len().min(4)]);
            let valid = match std::str::from_utf8(&joined) {
                Ok(_) => joined.len(),
                Err(error) if error.error_len().is_some() && error.valid_up_to() < held => {
                    self.invalid = true;
                    return;
                }
                Err(error) => error.valid_up_to(),
            };
            if valid < held {
                // Still incomplete: this chunk was too short to finish the character.
                self.pending = joined;
                return;
            }
            chunk = &chunk[valid - held..];
        }
        match std::str::from_utf8(chunk) {
            Ok(_) => {}
            Err(error) if error.error_len().is_some() => self.invalid = true,
            Err(error) => self.pending = chunk[error.valid_up_to()..].to_vec(),
        }
    }

    /// True when everything fed so far is complete, valid UTF-8.
    pub(crate) fn finish(&self) -> bool {
        !self.invalid && self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests;
