//! A streaming `multipart/form-data` parser. File parts go through sha256 (and optionally to
//! a spool file) as they arrive: the parser holds one fixed window of the body, whatever
//! the size of the upload.

use std::io::{self, Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// Window over the body; a delimiter is at most 74 bytes, so this is plenty.
const WINDOW: usize = 256 << 10;
/// Largest text field kept.
const MAX_FIELD_BYTES: usize = 1 << 20;
/// Largest header block of one part.
const MAX_PART_HEAD: usize = 16 << 10;

/// A file part as received: its name and content reduced to size and sha256.
#[derive(Debug)]
pub(crate) struct FilePart {
    pub field: String,
    /// `filename*` decoded when present, else `filename`, as bytes.
    pub filename: Vec<u8>,
    /// The quoted `filename` parameter, unescaped, as bytes (empty when absent).
    pub filename_raw: Vec<u8>,
    pub content_type: Option<String>,
    pub size: u64,
    pub sha256: String,
    /// The bytes on disk, when the caller asked for spooling.
    pub spooled: Option<tempfile::TempPath>,
}

#[derive(Debug, Default)]
pub(crate) struct Form {
    pub fields: Vec<(String, String)>,
    pub files: Vec<FilePart>,
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// The `boundary` parameter of a `multipart/form-data` content type.
pub(crate) fn boundary_of(content_type: &str) -> Option<String> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|param| {
        let (name, value) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let value = value.trim().trim_matches('"');
        (!value.is_empty() && value.len() <= 200).then(|| value.to_owned())
    })
}

struct Window<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl<R: Read> Window<R> {
    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Reads more; false at the end of the body.
    fn fill(&mut self) -> io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        if self.start > 0 && (self.end == self.buf.len() || self.start > self.buf.len() / 2) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Err(invalid("multipart line too long"));
        }
        let read = self.inner.read(&mut self.buf[self.end..])?;
        if read == 0 {
            self.eof = true;
            return Ok(false);
        }
        self.end += read;
        Ok(true)
    }

    fn ensure(&mut self, n: usize) -> io::Result<bool> {
        while self.end - self.start < n {
            if !self.fill()? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Passes everything before `pattern` to `sink` and consumes the pattern. Errors if the
    /// body ends first.
    fn until(&mut self, pattern: &[u8], sink: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        loop {
            if let Some(at) = find(self.data(), pattern) {
                sink(&self.buf[self.start..self.start + at])?;
                self.start += at + pattern.len();
                return Ok(());
            }
            let safe = (self.end - self.start).saturating_sub(pattern.len() - 1);
            if safe > 0 {
                sink(&self.buf[self.start..self.start + safe])?;
                self.start += safe;
            }
            if !self.fill()? {
                return Err(invalid("multipart body ended before its closing boundary"));
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle[0];
    let last_start = haystack.len().checked_sub(needle.len())?;
    let mut at = 0;
    while at <= last_start {
        at += haystack[at..=last_start].iter().position(|b| *b == first)?;
        if &haystack[at..at + needle.len()] == needle {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// Parses a whole multipart body. File parts are hashed; when `spool_dir` is given they are
/// also written there. Format errors are `InvalidData`; other errors come from `body`.
pub(crate) fn parse(body: impl Read, boundary: &str, spool_dir: Option<&Path>) -> io::Result<Form> {
    // A virtual CRLF in front makes the first delimiter look like all the others.
    let mut buf = vec![0; WINDOW];
    buf[..2].copy_from_slice(b"\r\n");
    let mut window = Window {
        inner: body,
        buf,
        start: 0,
        end: 2,
        eof: false,
    };
    let delimiter = format!("\r\n--{boundary}").into_bytes();
    let mut form = Form::default();

    window.until(&delimiter, &mut |_| Ok(()))?; // preamble
    loop {
        if !window.ensure(2)? {
            return Err(invalid("multipart body ended after a boundary"));
        }
        if window.data().starts_with(b"--") {
            window.start += 2;
            // Drain the epilogue so the connection stays usable.
            while window.fill()? {
                window.start = window.end;
            }
            return Ok(form);
        }
        // Transport padding, then CRLF.
        while window.ensure(1)? && matches!(window.data()[0], b' ' | b'\t') {
            window.start += 1;
        }
        if !window.ensure(2)? || !window.data().starts_with(b"\r\n") {
            return Err(invalid("malformed multipart boundary line"));
        }
        window.start += 2;

        let mut head = Vec::new();
        if window.ensure(2)? && window.data().starts_with(b"\r\n") {
            window.start += 2; // a part without headers
        } else {
            window.until(b"\r\n\r\n", &mut |bytes| {
                head.extend_from_slice(bytes);
                if head.len() > MAX_PART_HEAD {
                    Err(invalid("multipart part headers too large"))
                } else {
                    Ok(())
                }
            })?;
        }
        let headers = PartHeaders::parse(&head)?;
        let Some(field) = headers.name.clone() else {
            return Err(invalid("multipart part without a name"));
        };
        if headers.filename.is_some() || headers.filename_star.is_some() {
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut spool = match spool_dir {
                Some(dir) => Some(tempfile::NamedTempFile::new_in(dir)?),
                None => None,
            };
            window.until(&delimiter, &mut |bytes| {
                hasher.update(bytes);
                size += bytes.len() as u64;
                if let Some(file) = spool.as_mut() {
                    file.write_all(bytes)?;
                }
                Ok(())
            })?;
            let spooled = match spool {
                Some(file) => {
                    file.as_file().sync_data()?;
                    Some(file.into_temp_path())
                }
                None => None,
            };
            let filename_raw = headers.filename.clone().unwrap_or_default();
            let filename = headers
                .filename_star
                .clone()
                .unwrap_or_else(|| filename_raw.clone());
            form.files.push(FilePart {
                field,
                filename,
                filename_raw,
                content_type: headers.content_type.clone(),
                size,
                sha256: hex::encode(hasher.finalize()),
                spooled,
            });
        } else {
            let mut value = Vec::new();
            window.until(&delimiter, &mut |bytes| {
                value.extend_from_slice(bytes);
                if value.len() > MAX_FIELD_BYTES {
                    Err(invalid("form field too large"))
                } else {
                    Ok(())
                }
            })?;
            let value =
                String::from_utf8(value).map_err(|_| invalid(format!("form field {field} is not UTF-8")))?;
            form.fields.push((field, value));
        }
    }
}

#[derive(Debug, Default)]
struct PartHeaders {
    name: Option<String>,
    filename: Option<Vec<u8>>,
    filename_star: Option<Vec<u8>>,
    content_type: Option<String>,
}

impl PartHeaders {
    fn parse(head: &[u8]) -> io::Result<Self> {
        let mut headers = Self::default();
        for line in head.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            let colon = line
                .iter()
                .position(|b| *b == b':')
                .ok_or_else(|| invalid("malformed part header"))?;
            let name = String::from_utf8_lossy(&line[..colon])
                .trim()
                .to_ascii_lowercase();
            let value = &line[colon + 1..];
            match name.as_str() {
                "content-disposition" => {
                    let params = disposition_params(value)?;
                    for (key, value) in params {
                        match key.as_str() {
                            "name" => headers.name = Some(String::from_utf8_lossy(&value).into_owned()),
                            "filename" => headers.filename = Some(value),
                            "filename*" => headers.filename_star = decode_ext_value(&value),
                            _ => {}
                        }
                    }
                }
                "content-type" => {
                    headers.content_type = Some(String::from_utf8_lossy(value).trim().to_owned())
                }
                _ => {}
            }
        }
        Ok(headers)
    }
}

/// `form-data; name="a"; filename="b \"c\""` → [("name", b"a"), ("filename", b"b \"c\"")].
fn disposition_params(value: &[u8]) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut params = Vec::new();
    let mut at = value.iter().position(|b| *b == b';').unwrap_or(value.len());
    let kind = String::from_utf8_lossy(&value[..at]).trim().to_ascii_lowercase();
    if kind != "form-data" {
        return Err(invalid("part is not form-data"));
    }
    while at < value.len() {
        at += 1; // ';'
        while at < value.len() && matches!(value[at], b' ' | b'\t') {
            at += 1;
        }
        if at >= value.len() {
            break;
        }
        let eq = value[at..]
            .iter()
            .position(|b| *b == b'=')
            .ok_or_else(|| invalid("parameter without ="))?;
        let key = String::from_utf8_lossy(&value[at..at + eq])
            .trim()
            .to_ascii_lowercase();
        at += eq + 1;
        let mut parsed = Vec::new();
        if value.get(at) == Some(&b'"') {
            at += 1;
            loop {
                match value.get(at) {
                    None => return Err(invalid("unterminated quoted parameter")),
                    Some(b'"') => {
                        at += 1;
                        break;
                    }
                    Some(b'\\') if at + 1 < value.len() => {
                        parsed.push(value[at + 1]);
                        at += 2;
                    }
                    Some(byte) => {
                        parsed.push(*byte);
                        at += 1;
                    }
                }
            }
            while at < value.len() && value[at] != b';' {
                at += 1;
            }
        } else {
            let end = value[at..]
                .iter()
                .position(|b| *b == b';')
                .map_or(value.len(), |p| at + p);
            parsed.extend_from_slice(value[at..end].trim_ascii());
            at = end;
        }
        params.push((key, parsed));
    }
    Ok(params)
}

/// RFC 8187 `charset'lang'pct-encoded`; only the bytes are kept.
fn decode_ext_value(value: &[u8]) -> Option<Vec<u8>> {
    let mut parts = value.splitn(3, |b| *b == b'\'');
    let (_charset, _lang, encoded) = (parts.next()?, parts.next()?, parts.next()?);
    let mut out = Vec::with_capacity(encoded.len());
    let mut at = 0;
    while at < encoded.len() {
        if encoded[at] == b'%' {
            let hex = std::str::from_utf8(encoded.get(at + 1..at + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            at += 3;
        } else {
            out.push(encoded[at]);
            at += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds the body a few bytes at a time, to cross every window edge.
    struct Trickle<'a>(&'a [u8], usize);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn parses_fields_and_files() {
        let body = "preamble\r\n--XY\r\nContent-Disposition: form-data; name=\"user\"\r\n\r\nbob\r\n\
--XY  \r\nContent-Disposition: form-data; name=\"file\"; filename=\"\u{5831} \\\"q\\\".txt\"; \
filename*=UTF-8''%E5%A0%B1%20%22q%22.txt\r\nContent-Type: text/plain\r\n\r\nhello\r\n--X\r\n--XY--\r\nepilogue";
        for step in [1, 3, 7, 1000] {
            let form = parse(Trickle(body.as_bytes(), step), "XY", None).unwrap();
            assert_eq!(form.fields, vec![("user".to_owned(), "bob".to_owned())]);
            let file = &form.files[0];
            assert_eq!(file.field, "file");
            assert_eq!(file.filename_raw, "\u{5831} \"q\".txt".as_bytes());
            assert_eq!(file.filename, "\u{5831} \"q\".txt".as_bytes());
            assert_eq!(file.size, 10);
            assert_eq!(file.sha256, hex::encode(Sha256::digest(b"hello\r\n--X")));
            assert_eq!(file.content_type.as_deref(), Some("text/plain"));
        }
    }

    #[test]
    fn rejects_malformed_bodies() {
        let truncated = "--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nvalue";
        assert_eq!(
            parse(truncated.as_bytes(), "B", None).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let nameless = "--B\r\nContent-Disposition: form-data\r\n\r\nv\r\n--B--\r\n";
        assert!(parse(nameless.as_bytes(), "B", None).is_err());
        assert_eq!(
            boundary_of("multipart/form-data; boundary=\"abc\"").as_deref(),
            Some("abc")
        );
        assert_eq!(boundary_of("application/json"), None);
    }

    #[test]
    fn spools_file_parts() {
        let dir = tempfile::tempdir().unwrap();
        let body =
            "--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c\"\r\n\r\nchunk\r\n--B--\r\n";
        let form = parse(body.as_bytes(), "B", Some(dir.path())).unwrap();
        let path = form.files[0].spooled.as_ref().unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"chunk");
    }
}
