//! A streaming `multipart/form-data` body: text fields and one file part read from disk.
//!
//! The body is a chain of readers (an in-memory head with the text fields and the file
//! part's headers, the file range, an in-memory tail), so a file of any size goes out
//! without being held in memory, and its exact length is known before the first byte.

use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use upgate_plugin_api::{Body, ErrorKind, PluginError};

/// An upload's metadata, string to string.
pub type Metadata = serde_json::Map<String, serde_json::Value>;

/// Which bytes of which file make up the file part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRange {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
}

impl FileRange {
    /// The whole file, its length taken from the file system now.
    pub fn whole(path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        let len = std::fs::metadata(&path)?.len();
        Ok(Self { path, offset: 0, len })
    }

    /// `len` bytes from `offset` (a chunk).
    pub fn range(path: impl Into<PathBuf>, offset: u64, len: u64) -> Self {
        Self {
            path: path.into(),
            offset,
            len,
        }
    }
}

#[derive(Debug, Clone)]
struct FilePart {
    name: String,
    filename: String,
    content_type: String,
    source: FileRange,
}

/// A `multipart/form-data` body under construction. Text fields go first, in the order
/// added, then the single file part.
#[derive(Debug, Clone)]
pub struct Multipart {
    boundary: String,
    fields: Vec<(String, String)>,
    file: Option<FilePart>,
}

impl Default for Multipart {
    fn default() -> Self {
        Self::new()
    }
}

impl Multipart {
    /// An empty form with a random boundary.
    pub fn new() -> Self {
        Self::with_boundary(format!("upgate-{}", uuid::Uuid::new_v4().simple()))
    }

    /// An empty form with a given boundary (tests). The boundary must be 1 to 70 characters
    /// that cannot occur in the headers this builder writes.
    pub fn with_boundary(boundary: impl Into<String>) -> Self {
        let boundary = boundary.into();
        assert!(
            (1..=70).contains(&boundary.len())
                && boundary
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"'()+_,-./:=?".contains(&b)),
            "invalid multipart boundary"
        );
        Self {
            boundary,
            fields: Vec::new(),
            file: None,
        }
    }

    /// Adds a text field.
    pub fn text(mut self, name: &str, value: &str) -> Self {
        self.fields.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the file part (replacing any earlier one). A `content_type` that is not a plain
    /// header value becomes `application/octet-stream`.
    pub fn file(mut self, name: &str, filename: &str, content_type: &str, source: FileRange) -> Self {
        let content_type =
            if !content_type.is_empty() && content_type.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                content_type.to_owned()
            } else {
                "application/octet-stream".to_owned()
            };
        self.file = Some(FilePart {
            name: name.to_owned(),
            filename: filename.to_owned(),
            content_type,
            source,
        });
        self
    }

    pub fn boundary(&self) -> &str {
        &self.boundary
    }

    /// The `Content-Type` header value.
    pub fn content_type(&self) -> String {
        format!("multipart/form-data; boundary={}", self.boundary)
    }

    fn head(&self) -> Vec<u8> {
        let mut head = Vec::new();
        for (name, value) in &self.fields {
            head.extend_from_slice(b"--");
            head.extend_from_slice(self.boundary.as_bytes());
            head.extend_from_slice(b"\r\nContent-Disposition: form-data; name=\"");
            push_quoted(&mut head, name);
            head.extend_from_slice(b"\"\r\n\r\n");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        if let Some(file) = &self.file {
            head.extend_from_slice(b"--");
            head.extend_from_slice(self.boundary.as_bytes());
            head.extend_from_slice(b"\r\nContent-Disposition: form-data; name=\"");
            push_quoted(&mut head, &file.name);
            head.extend_from_slice(b"\"; filename=\"");
            push_quoted(&mut head, &file.filename);
            head.extend_from_slice(b"\"; filename*=UTF-8''");
            push_percent_encoded(&mut head, &file.filename);
            head.extend_from_slice(b"\r\nContent-Type: ");
            head.extend_from_slice(file.content_type.as_bytes());
            head.extend_from_slice(b"\r\n\r\n");
        }
        head
    }

    fn tail(&self) -> Vec<u8> {
        let mut tail = Vec::new();
        if self.file.is_some() {
            tail.extend_from_slice(b"\r\n");
        }
        tail.extend_from_slice(b"--");
        tail.extend_from_slice(self.boundary.as_bytes());
        tail.extend_from_slice(b"--\r\n");
        tail
    }

    /// The exact number of bytes [`Multipart::into_reader`] produces.
    pub fn content_length(&self) -> u64 {
        let file_len = self.file.as_ref().map_or(0, |file| file.source.len);
        self.head().len() as u64 + file_len + self.tail().len() as u64
    }

    /// Opens the file and returns the body as a reader. Fails now if the file cannot be
    /// opened or is shorter than the range.
    pub fn into_reader(self) -> io::Result<MultipartBody> {
        let head = Cursor::new(self.head());
        let tail = Cursor::new(self.tail());
        let failure = Arc::new(OnceLock::new());
        let file = match &self.file {
            Some(part) => FileReader::open(&part.source, failure.clone())?,
            None => FileReader::empty(failure.clone()),
        };
        let len = self.content_length();
        Ok(MultipartBody {
            inner: head.chain(file).chain(tail),
            len,
            failure,
        })
    }
}

/// Writes `text` for a quoted header parameter: UTF-8 bytes as they are, `"` and `\`
/// backslash-escaped, control characters percent-encoded (as browsers do), so the value
/// can never end the header.
fn push_quoted(out: &mut Vec<u8>, text: &str) {
    for &byte in text.as_bytes() {
        match byte {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', byte]),
            0x00..=0x1f | 0x7f => out.extend_from_slice(format!("%{byte:02X}").as_bytes()),
            _ => out.push(byte),
        }
    }
}

/// RFC 8187 `value-chars`: attr-char as is, every other byte as `%XX`.
fn push_percent_encoded(out: &mut Vec<u8>, text: &str) {
    for &byte in text.as_bytes() {
        if byte.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&byte) {
            out.push(byte);
        } else {
            out.extend_from_slice(format!("%{byte:02X}").as_bytes());
        }
    }
}

/// Head (fields and file part headers), file content, tail (closing boundary).
type BodyChain = io::Chain<io::Chain<Cursor<Vec<u8>>, FileReader>, Cursor<Vec<u8>>>;

/// The body of a [`Multipart`], as a reader of exactly [`MultipartBody::len`] bytes.
pub struct MultipartBody {
    inner: BodyChain,
    len: u64,
    failure: Arc<OnceLock<String>>,
}

impl MultipartBody {
    /// The exact body length (the `Content-Length`).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Set when reading the local file failed while the body was being sent, so a send
    /// error can be told apart from a network error.
    pub fn failure_slot(&self) -> Arc<OnceLock<String>> {
        self.failure.clone()
    }
}

impl Read for MultipartBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

/// Reads exactly `len` bytes of a file from `offset`; a short file is an error.
struct FileReader {
    file: Option<io::Take<File>>,
    remaining: u64,
    path: PathBuf,
    failure: Arc<OnceLock<String>>,
}

impl FileReader {
    fn open(range: &FileRange, failure: Arc<OnceLock<String>>) -> io::Result<Self> {
        let mut file = File::open(&range.path)?;
        let available = file.metadata()?.len();
        if range
            .offset
            .checked_add(range.len)
            .is_none_or(|end| end > available)
        {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} has {available} bytes, fewer than {} + {}",
                    range.path.display(),
                    range.offset,
                    range.len
                ),
            ));
        }
        file.seek(SeekFrom::Start(range.offset))?;
        Ok(Self {
            file: Some(file.take(range.len)),
            remaining: range.len,
            path: range.path.clone(),
            failure,
        })
    }

    fn empty(failure: Arc<OnceLock<String>>) -> Self {
        Self {
            file: None,
            remaining: 0,
            path: PathBuf::new(),
            failure,
        }
    }

    fn fail(&self, error: io::Error) -> io::Error {
        let _ = self
            .failure
            .set(format!("reading {}: {error}", display(&self.path)));
        error
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

impl Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(file) = self.file.as_mut() else {
            return Ok(0);
        };
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        match file.read(buf) {
            Ok(0) => {
                let error = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("file ended {} bytes early", self.remaining),
                );
                Err(self.fail(error))
            }
            Ok(read) => {
                self.remaining -= read as u64;
                Ok(read)
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => Err(error),
            Err(error) => Err(self.fail(error)),
        }
    }
}

/// The text fields of a streamed upload, known once its body has ended (from the final
/// metadata), or why they cannot be sent.
pub type LateFields<'f> =
    Box<dyn FnOnce(&Metadata) -> Result<Vec<(String, String)>, PluginError> + Send + 'f>;

/// A `multipart/form-data` body whose file part is an upload still arriving: the file part's
/// headers, the body as the host hands it over, then the text fields (computed from the final
/// metadata once the body has ended) and the closing boundary. Its length is unknown: it goes
/// out chunked. A read fails when the host aborts the upload or the fields cannot be made;
/// [`StreamedMultipart::failure`] then says why.
pub struct StreamedMultipart<'b, 'h, 'f> {
    boundary: String,
    head: Cursor<Vec<u8>>,
    body: &'b mut Body<'h>,
    fields: Option<LateFields<'f>>,
    tail: Option<Cursor<Vec<u8>>>,
    failure: Option<PluginError>,
}

impl<'b, 'h, 'f> StreamedMultipart<'b, 'h, 'f> {
    /// The file part `name` (`filename`, `content_type`) read from `body`, then `fields`.
    pub fn new(
        name: &str,
        filename: &str,
        content_type: &str,
        body: &'b mut Body<'h>,
        fields: LateFields<'f>,
    ) -> Self {
        let form = Multipart::new().file(name, filename, content_type, FileRange::range("", 0, 0));
        Self {
            head: Cursor::new(form.head()),
            boundary: form.boundary,
            body,
            fields: Some(fields),
            tail: None,
            failure: None,
        }
    }

    /// The `Content-Type` header value.
    pub fn content_type(&self) -> String {
        format!("multipart/form-data; boundary={}", self.boundary)
    }

    /// Why the body could not be sent to its end (the host's abort, the late fields'
    /// error), if it could not.
    pub fn failure(&mut self) -> Option<PluginError> {
        if self.body.aborted() {
            return Some(PluginError::new(
                ErrorKind::Internal,
                "the host aborted the upload",
            ));
        }
        self.failure.take()
    }

    fn tail(&mut self) -> io::Result<&mut Cursor<Vec<u8>>> {
        if self.tail.is_none() {
            let metadata = self.body.metadata().unwrap_or_default();
            let fields = self
                .fields
                .take()
                .map(|fields| fields(&metadata))
                .unwrap_or(Ok(Vec::new()));
            let fields = match fields {
                Ok(fields) => fields,
                Err(error) => {
                    let message = error.message.clone();
                    self.failure = Some(error);
                    return Err(io::Error::other(message));
                }
            };
            let form = fields.iter().fold(
                Multipart::with_boundary(self.boundary.clone()),
                |form, (name, value)| form.text(name, value),
            );
            let mut tail = b"\r\n".to_vec();
            tail.extend_from_slice(&form.head());
            tail.extend_from_slice(&form.tail());
            self.tail = Some(Cursor::new(tail));
        }
        Ok(self.tail.as_mut().expect("set above"))
    }
}

impl Read for StreamedMultipart<'_, '_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.head.read(buf)?;
        if read > 0 || buf.is_empty() {
            return Ok(read);
        }
        if self.tail.is_none() {
            let read = self.body.read(buf)?;
            if read > 0 {
                return Ok(read);
            }
        }
        self.tail()?.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(bytes).unwrap();
        file.flush().unwrap();
        file
    }

    fn produce(form: Multipart) -> (u64, Vec<u8>) {
        let declared = form.content_length();
        let mut body = form.into_reader().unwrap();
        assert_eq!(body.len(), declared);
        let mut bytes = Vec::new();
        body.read_to_end(&mut bytes).unwrap();
        (declared, bytes)
    }

    #[test]
    fn small_file_exact_bytes() {
        let file = file_with(b"hello\r\n--x");
        let form = Multipart::with_boundary("BOUNDARY")
            .text("user", "alice")
            .file(
                "file",
                "a.txt",
                "text/plain",
                FileRange::whole(file.path()).unwrap(),
            )
            .text("n", "1");
        assert_eq!(form.content_type(), "multipart/form-data; boundary=BOUNDARY");
        let (declared, bytes) = produce(form);
        let expected = b"--BOUNDARY\r\n\
Content-Disposition: form-data; name=\"user\"\r\n\r\n\
alice\r\n\
--BOUNDARY\r\n\
Content-Disposition: form-data; name=\"n\"\r\n\r\n\
1\r\n\
--BOUNDARY\r\n\
Content-Disposition: form-data; name=\"file\"; filename=\"a.txt\"; filename*=UTF-8''a.txt\r\n\
Content-Type: text/plain\r\n\r\n\
hello\r\n--x\r\n\
--BOUNDARY--\r\n";
        assert_eq!(String::from_utf8_lossy(&bytes), String::from_utf8_lossy(expected));
        assert_eq!(declared, bytes.len() as u64);
    }

    #[test]
    fn non_ascii_and_quoted_filenames() {
        let file = file_with(b"x");
        let name = "報告 \"q\"\\b.xls";
        let form = Multipart::with_boundary("B").file(
            "file",
            name,
            "application/vnd.ms-excel",
            FileRange::whole(file.path()).unwrap(),
        );
        let (declared, bytes) = produce(form);
        let mut disposition = b"filename=\"".to_vec();
        disposition.extend_from_slice("報告 \\\"q\\\"\\\\b.xls".as_bytes());
        disposition.extend_from_slice(b"\"; filename*=UTF-8''%E5%A0%B1%E5%91%8A%20%22q%22%5Cb.xls\r\n");
        assert!(
            bytes
                .windows(disposition.len())
                .any(|window| window == disposition)
        );
        assert_eq!(declared, bytes.len() as u64);

        let (_, bytes) = produce(Multipart::with_boundary("B").file(
            "file",
            "a\r\nb",
            "text/plain\r\nX: y",
            FileRange::whole(file.path()).unwrap(),
        ));
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("filename=\"a%0D%0Ab\""), "{text}");
        assert!(
            text.contains("Content-Type: application/octet-stream\r\n"),
            "{text}"
        );
    }

    #[test]
    fn byte_range_of_a_file() {
        let file = file_with(b"0123456789");
        let form = Multipart::with_boundary("B").text("chunkNumber", "1").file(
            "file",
            "f",
            "a/b",
            FileRange::range(file.path(), 3, 4),
        );
        let (declared, bytes) = produce(form);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("\r\n\r\n3456\r\n--B--\r\n"), "{text}");
        assert_eq!(declared, bytes.len() as u64);
    }

    #[test]
    fn fields_only_and_empty_file() {
        let (declared, bytes) = produce(Multipart::with_boundary("B").text("a", "1"));
        assert_eq!(
            bytes,
            b"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--B--\r\n"
        );
        assert_eq!(declared, bytes.len() as u64);

        let empty = file_with(b"");
        let (declared, bytes) = produce(Multipart::with_boundary("B").file(
            "file",
            "e",
            "text/plain",
            FileRange::whole(empty.path()).unwrap(),
        ));
        assert!(bytes.ends_with(b"\r\n\r\n\r\n--B--\r\n"));
        assert_eq!(declared, bytes.len() as u64);
    }

    #[test]
    fn short_or_missing_file_is_an_error() {
        let file = file_with(b"abc");
        let form = Multipart::new().file("file", "f", "a/b", FileRange::range(file.path(), 2, 5));
        assert_eq!(
            form.into_reader().err().unwrap().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let form = Multipart::new().file("file", "f", "a/b", FileRange::range("/nonexistent/x", 0, 1));
        assert!(form.into_reader().is_err());

        // The file shrinks after the body was opened: the read fails and says so.
        let form = Multipart::new().file("file", "f", "a/b", FileRange::whole(file.path()).unwrap());
        let mut body = form.into_reader().unwrap();
        file.as_file().set_len(1).unwrap();
        let mut sink = Vec::new();
        assert!(body.read_to_end(&mut sink).is_err());
        assert!(body.failure_slot().get().unwrap().contains("early"));
    }

    #[test]
    fn random_boundaries_differ() {
        assert_ne!(Multipart::new().boundary(), Multipart::new().boundary());
    }
}
