//! Content checks: what a file's bytes say it is, against what its name says.
//!
//! What flows through here: the extension of the client's filename, the first bytes of the
//! file (sniffed with the `infer` crate's magic numbers), a streaming UTF-8 validator fed
//! every chunk, and, for the types whose structure is cheap to check (JSON, PNG, GIF, PDF,
//! OOXML), the spooled file re-read in a blocking task with bounded memory. Out comes the
//! MIME type upgate records and returns (never the client's claim), or a [`ContentError`]
//! explaining the contradiction.
//!
//! Extensions are the filename's last one: `backup.tar.gz` is a `gz` file (checked as gzip,
//! allowed by a plan that allows `gz`), as `.tgz` is.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
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
    /// The signature matched but the structure behind it does not hold (truncated, bad
    /// checksum, data after the end, a zip that is not the declared OOXML type).
    #[error("the content does not look like a .{extension} file: {detail}")]
    Malformed { extension: String, detail: String },
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
    // Archives, by signature. A compound name is checked by its last extension: `a.tar.gz`
    // is gzip (`gz`), `a.tgz` too.
    binary(&["gz", "tgz"], "application/gzip", &["gz"]),
    binary(&["tar"], "application/x-tar", &["tar"]),
    binary(&["7z"], "application/x-7z-compressed", &["7z"]),
    binary(&["bz2", "tbz2", "tbz"], "application/x-bzip2", &["bz2"]),
    binary(&["xz", "txz"], "application/x-xz", &["xz"]),
    binary(&["zst", "tzst"], "application/zstd", &["zst"]),
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
        // Text whose first letters happen to be a short binary signature ("BC Hydro", "BMW",
        // "MZ", "ID3"): valid UTF-8 with no NUL is text, not that binary type.
        (Some(expected), Some(_)) if expected.text && utf8_ok && looks_like_text(head) => {
            text_verdict(expected)
        }
        (_, Some(kind)) if verify => Err(mismatch(format!(
            "{} ({})",
            describe(kind.extension()),
            kind.mime_type()
        ))),
        // A binary type without its signature, an empty file included, is not that type.
        (Some(_), None) if verify => Err(ContentError::NotRecognised {
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

/// Whether a file needs [`verify_file`] after it is spooled (when `verify_content` is on).
pub(crate) fn needs_file_check(extension: &str) -> bool {
    matches!(extension, "json" | "jsonl" | "ndjson" | "png" | "gif" | "pdf")
        || ooxml_main_part(extension).is_some()
}

/// The part every OOXML document of a type holds (where Office and LibreOffice put it).
fn ooxml_main_part(extension: &str) -> Option<&'static str> {
    match extension {
        "docx" => Some("word/document.xml"),
        "xlsx" => Some("xl/workbook.xml"),
        "pptx" => Some("ppt/presentation.xml"),
        _ => None,
    }
}

/// Checks a spooled file's structure against its declared type, for the types
/// [`needs_file_check`] names (others pass): a `json` file parses, each line of a `jsonl`
/// does; a PNG's chunks (with their CRCs) run from IHDR to IEND and nothing follows; a GIF's
/// blocks run from its header to the trailer, the last byte; a PDF starts with `%PDF-` and
/// ends with `%%EOF` (then only whitespace); an OOXML file is a zip whose central directory
/// lists `[Content_Types].xml` and the type's main part. Reads with bounded memory (streamed,
/// or a seek to the tail): run it on a blocking thread. A read failure is
/// [`ContentError::Io`], never a refusal of the content.
pub(crate) fn verify_file(extension: &str, path: &Path) -> Result<(), ContentError> {
    let file = File::open(path).map_err(io_error)?;
    match extension {
        "json" | "jsonl" | "ndjson" => verify_json(extension, file),
        "png" => Walk::new(extension, file).png(),
        "gif" => Walk::new(extension, file).gif(),
        "pdf" => verify_pdf(extension, file),
        _ => match ooxml_main_part(extension) {
            Some(main_part) => verify_ooxml(extension, file, main_part),
            None => Ok(()),
        },
    }
}

fn io_error(error: std::io::Error) -> ContentError {
    ContentError::Io(error.to_string())
}

fn malformed(extension: &str, detail: impl Into<String>) -> ContentError {
    ContentError::Malformed {
        extension: extension.to_owned(),
        detail: detail.into(),
    }
}

/// A `json` file parses as one value, or each non-blank line of a `jsonl` file does. Both
/// are parsed as they are read, a line too: memory stays bounded however long a line is.
fn verify_json(extension: &str, file: File) -> Result<(), ContentError> {
    let invalid = |detail: String| ContentError::InvalidJson {
        extension: extension.to_owned(),
        detail,
    };
    let one_value = |reader: &mut dyn Read| {
        let mut deserializer = serde_json::Deserializer::from_reader(reader);
        serde::de::IgnoredAny::deserialize_from(&mut deserializer)?;
        deserializer.end()
    };
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    if extension == "json" {
        return one_value(&mut reader).map_err(|error| invalid(error.to_string()));
    }
    for number in 1.. {
        // Blanks before the line's first byte; a blank line is skipped, the end is the end.
        loop {
            match reader.fill_buf().map_err(io_error)?.first() {
                None => return Ok(()),
                Some(b' ' | b'\t' | b'\r' | b'\n') => reader.consume(1),
                Some(_) => break,
            }
        }
        let mut line = Line {
            reader: &mut reader,
            ended: false,
        };
        one_value(&mut line).map_err(|error| invalid(format!("line {number}: {error}")))?;
    }
    Ok(())
}

/// One line of a reader (its bytes up to the next `\n`, which is consumed and not given),
/// read as it is asked for.
struct Line<'r, R> {
    reader: &'r mut R,
    ended: bool,
}

impl<R: BufRead> Read for Line<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.ended || out.is_empty() {
            return Ok(0);
        }
        let available = self.reader.fill_buf()?;
        let offered = &available[..available.len().min(out.len())];
        let (len, newline) = match offered.iter().position(|&byte| byte == b'\n') {
            Some(at) => (at, true),
            None => (offered.len(), false),
        };
        out[..len].copy_from_slice(&offered[..len]);
        self.ended = newline || available.is_empty();
        self.reader.consume(len + usize::from(newline));
        Ok(len)
    }
}

const PNG_SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";

/// A forward-only walk through a file's structure: a file that ends too soon is refused
/// (`truncated` says how), any other read error is the disk's ([`ContentError::Io`]).
struct Walk<'a, R> {
    extension: &'a str,
    reader: R,
    truncated: &'static str,
}

impl<'a> Walk<'a, BufReader<File>> {
    fn new(extension: &'a str, file: File) -> Self {
        Walk {
            extension,
            reader: BufReader::with_capacity(64 * 1024, file),
            truncated: "it is truncated",
        }
    }
}

impl<R: BufRead> Walk<'_, R> {
    fn malformed(&self, detail: impl Into<String>) -> ContentError {
        malformed(self.extension, detail)
    }

    fn read_error(&self, error: std::io::Error) -> ContentError {
        if error.kind() == std::io::ErrorKind::UnexpectedEof {
            self.malformed(self.truncated)
        } else {
            io_error(error)
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ContentError> {
        let mut bytes = [0u8; N];
        self.reader
            .read_exact(&mut bytes)
            .map_err(|error| self.read_error(error))?;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, ContentError> {
        Ok(self.array::<1>()?[0])
    }

    fn vec(&mut self, length: usize) -> Result<Vec<u8>, ContentError> {
        let mut bytes = vec![0u8; length];
        self.reader
            .read_exact(&mut bytes)
            .map_err(|error| self.read_error(error))?;
        Ok(bytes)
    }

    /// Passes the next `length` bytes to `each`, a buffer at a time.
    fn feed(&mut self, mut length: u64, mut each: impl FnMut(&[u8])) -> Result<(), ContentError> {
        while length > 0 {
            let buffer = self.reader.fill_buf().map_err(io_error)?;
            if buffer.is_empty() {
                return Err(self.malformed(self.truncated));
            }
            let take = length.min(buffer.len() as u64) as usize;
            each(&buffer[..take]);
            self.reader.consume(take);
            length -= take as u64;
        }
        Ok(())
    }

    fn skip(&mut self, length: u64) -> Result<(), ContentError> {
        self.feed(length, |_| {})
    }

    fn at_end(&mut self) -> Result<bool, ContentError> {
        Ok(self.reader.fill_buf().map_err(io_error)?.is_empty())
    }

    /// Signature, then chunks (length, type, data, CRC-32 of type and data) from IHDR
    /// through at least one IDAT to IEND, the end of the file.
    fn png(mut self) -> Result<(), ContentError> {
        if self.array::<8>()? != *PNG_SIGNATURE {
            return Err(self.malformed("no PNG signature"));
        }
        let mut first = true;
        let mut image_data = false;
        loop {
            let header = self.array::<8>()?;
            let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
            let kind = [header[4], header[5], header[6], header[7]];
            let name = std::str::from_utf8(&kind).unwrap_or("(not text)");
            if length > i32::MAX as u32 {
                return Err(self.malformed(format!("chunk {name} is longer than 2^31-1 bytes")));
            }
            if !kind.iter().all(u8::is_ascii_alphabetic) {
                return Err(self.malformed("a chunk type is not four letters"));
            }
            if first && (&kind != b"IHDR" || length != 13) {
                return Err(self.malformed("the first chunk is not IHDR"));
            }
            first = false;
            let mut crc = crc32_update(!0, &kind);
            self.feed(u64::from(length), |bytes| crc = crc32_update(crc, bytes))?;
            if u32::from_be_bytes(self.array::<4>()?) != !crc {
                return Err(self.malformed(format!("the CRC of chunk {name} does not match")));
            }
            match &kind {
                b"IDAT" => image_data = true,
                b"IEND" if length != 0 || !image_data => {
                    return Err(self.malformed("IEND comes without image data (IDAT) or with data"));
                }
                b"IEND" if !self.at_end()? => return Err(self.malformed("data follows the IEND chunk")),
                b"IEND" => return Ok(()),
                _ => {}
            }
        }
    }

    /// Header, logical screen (and its colour table), then extension and image blocks
    /// (their sub-blocks skipped by length) to the trailer `;`, the last byte of the file.
    fn gif(mut self) -> Result<(), ContentError> {
        let header = self.array::<6>()?;
        if &header != b"GIF87a" && &header != b"GIF89a" {
            return Err(self.malformed("no GIF87a or GIF89a header"));
        }
        let screen = self.array::<7>()?;
        self.colour_table(screen[4])?;
        loop {
            match self.byte()? {
                0x21 => {
                    self.byte()?; // the extension's label
                    self.sub_blocks()?;
                }
                0x2c => {
                    let descriptor = self.array::<9>()?;
                    self.colour_table(descriptor[8])?;
                    self.byte()?; // LZW minimum code size
                    self.sub_blocks()?;
                }
                0x3b if self.at_end()? => return Ok(()),
                0x3b => return Err(self.malformed("data follows the GIF trailer")),
                other => return Err(self.malformed(format!("an unknown GIF block 0x{other:02x}"))),
            }
        }
    }

    fn colour_table(&mut self, flags: u8) -> Result<(), ContentError> {
        if flags & 0x80 != 0 {
            self.skip(3 << ((flags & 7) + 1))?;
        }
        Ok(())
    }

    fn sub_blocks(&mut self) -> Result<(), ContentError> {
        loop {
            match self.byte()? {
                0 => return Ok(()),
                size => self.skip(u64::from(size))?,
            }
        }
    }
}

/// Bytes PDF counts as white space (NUL, tab, LF, FF, CR, space).
fn is_pdf_whitespace(byte: u8) -> bool {
    matches!(byte, 0 | b'\t' | b'\n' | 0x0c | b'\r' | b' ')
}

/// `%PDF-` at the start, and `%%EOF` in the last KiB with only white space after it.
fn verify_pdf(extension: &str, mut file: File) -> Result<(), ContentError> {
    let mut head = Vec::with_capacity(5);
    (&mut file).take(5).read_to_end(&mut head).map_err(io_error)?;
    if head != b"%PDF-" {
        return Err(malformed(extension, "it does not start with %PDF-"));
    }
    let length = file.metadata().map_err(io_error)?.len();
    file.seek(SeekFrom::Start(length.saturating_sub(1024)))
        .map_err(io_error)?;
    let mut tail = Vec::with_capacity(1024);
    file.take(1024).read_to_end(&mut tail).map_err(io_error)?;
    let end = tail
        .iter()
        .rposition(|&byte| !is_pdf_whitespace(byte))
        .map_or(0, |last| last + 1);
    if !tail[..end].ends_with(b"%%EOF") {
        return Err(malformed(extension, "it does not end with %%EOF"));
    }
    Ok(())
}

/// The fixed part of a zip's end of central directory record.
const EOCD_LEN: usize = 22;

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// A zip (one disk, not zip64) whose end record closes the file, whose central directory
/// ends where the end record starts, and whose entries (names only, nothing is decompressed)
/// include `[Content_Types].xml` and `main_part`.
fn verify_ooxml(extension: &str, mut file: File, main_part: &str) -> Result<(), ContentError> {
    let refuse = |detail: &str| malformed(extension, detail);
    let length = file.metadata().map_err(io_error)?.len();
    // The end record and its comment, at most 64 KiB.
    let tail_length = length.min((EOCD_LEN + usize::from(u16::MAX)) as u64);
    if tail_length < EOCD_LEN as u64 {
        return Err(refuse("it is not a zip archive"));
    }
    let tail_start = length - tail_length;
    file.seek(SeekFrom::Start(tail_start)).map_err(io_error)?;
    let mut tail = vec![0u8; tail_length as usize];
    file.read_exact(&mut tail).map_err(io_error)?;
    let at = (0..=tail.len() - EOCD_LEN)
        .rev()
        .find(|&at| {
            tail[at..at + 4] == *b"PK\x05\x06"
                && at + EOCD_LEN + usize::from(u16_at(&tail, at + 20)) == tail.len()
        })
        .ok_or_else(|| refuse("no zip end of central directory record closes it"))?;
    let record = &tail[at..at + EOCD_LEN];
    let (disk, directory_disk) = (u16_at(record, 4), u16_at(record, 6));
    let (entries_here, entries) = (u16_at(record, 8), u16_at(record, 10));
    let (size, offset) = (u32_at(record, 12), u32_at(record, 16));
    let zip64_locator = at >= 20 && tail[at - 20..at - 16] == *b"PK\x06\x07";
    if zip64_locator || entries == u16::MAX || size == u32::MAX || offset == u32::MAX {
        return Err(refuse("a zip64 archive is not checked, so not accepted"));
    }
    if disk != 0 || directory_disk != 0 || entries_here != entries {
        return Err(refuse("a multi-disk zip archive"));
    }
    if u64::from(offset) + u64::from(size) != tail_start + at as u64 {
        return Err(refuse(
            "its zip central directory is not where its end record says",
        ));
    }
    file.seek(SeekFrom::Start(u64::from(offset))).map_err(io_error)?;
    let mut walk = Walk {
        extension,
        reader: BufReader::with_capacity(64 * 1024, file.take(u64::from(size))),
        truncated: "its zip central directory is malformed",
    };
    let (mut content_types, mut main) = (false, false);
    for _ in 0..entries {
        let entry = walk.array::<46>()?;
        if entry[..4] != *b"PK\x01\x02" || u32_at(&entry, 42) >= offset {
            return Err(refuse("its zip central directory is malformed"));
        }
        let name = walk.vec(usize::from(u16_at(&entry, 28)))?;
        content_types |= name.eq_ignore_ascii_case(b"[Content_Types].xml");
        main |= name.eq_ignore_ascii_case(main_part.as_bytes());
        walk.skip(u64::from(u16_at(&entry, 30)) + u64::from(u16_at(&entry, 32)))?;
    }
    if !walk.at_end()? {
        return Err(refuse("its zip central directory is malformed"));
    }
    if !content_types {
        return Err(refuse(
            "a zip without [Content_Types].xml, not an Office Open XML document",
        ));
    }
    if !main {
        return Err(malformed(
            extension,
            format!("an Office Open XML package without {main_part}"),
        ));
    }
    Ok(())
}

/// CRC-32 as PNG and zip use it (reflected, polynomial 0xEDB88320), a byte at a time from
/// a table built at compile time. Start with `!0`, finish with `!`.
fn crc32_update(mut crc: u32, bytes: &[u8]) -> u32 {
    for &byte in bytes {
        crc = CRC_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut index = 0;
    while index < 256 {
        let mut crc = index as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                0xedb8_8320 ^ (crc >> 1)
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[index] = crc;
        index += 1;
    }
    table
};

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

    /// False once an invalid sequence was fed (a character split at the end is not one).
    pub(crate) fn valid_so_far(&self) -> bool {
        !self.invalid
    }

    /// True when everything fed so far is complete, valid UTF-8.
    pub(crate) fn finish(&self) -> bool {
        !self.invalid && self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests;
