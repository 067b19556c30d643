//! A small HTTP/1.1 server core: request heads, `Content-Length` and chunked request bodies,
//! keep-alive, plain JSON answers. Small on purpose, so every fault can be staged exactly.

use std::io::{self, BufRead, Read, Write};

/// Longest request head accepted.
const MAX_HEAD_BYTES: usize = 64 << 10;

/// A request line and its headers (names lower-cased).
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub method: String,
    pub target: String,
    pub http10: bool,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Whether the connection stays open after the answer.
    pub fn keep_alive(&self) -> bool {
        let connection = self.header("connection").unwrap_or_default().to_ascii_lowercase();
        if self.http10 {
            connection.contains("keep-alive")
        } else {
            !connection.contains("close")
        }
    }

    /// The path without the query string.
    pub fn path(&self) -> &str {
        self.target.split(['?', '#']).next().unwrap_or_default()
    }
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Reads one request head. `Ok(None)` when the peer closed the connection between requests.
pub(crate) fn read_head(reader: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut total = 0;
    loop {
        let mut line = Vec::new();
        let read = reader
            .take((MAX_HEAD_BYTES - total + 1) as u64)
            .read_until(b'\n', &mut line)?;
        if read == 0 {
            if lines.is_empty() && total == 0 {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a request head",
            ));
        }
        total += read;
        if total > MAX_HEAD_BYTES {
            return Err(invalid("request head too large"));
        }
        if !line.ends_with(b"\n") {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a request head",
            ));
        }
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        if line.is_empty() {
            if lines.is_empty() {
                continue; // tolerate stray CRLF between requests
            }
            break;
        }
        lines.push(line);
    }
    let request_line = String::from_utf8_lossy(&lines[0]).into_owned();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("malformed request line"));
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(invalid("unsupported HTTP version")),
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) || !target.starts_with('/') {
        return Err(invalid("malformed request line"));
    }
    let mut headers = Vec::new();
    for line in &lines[1..] {
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            return Err(invalid("obsolete header folding"));
        }
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| invalid("header without colon"))?;
        let name = String::from_utf8_lossy(&line[..colon]).to_ascii_lowercase();
        if name.is_empty() || name.contains(|c: char| c.is_whitespace()) {
            return Err(invalid("malformed header name"));
        }
        let value = String::from_utf8_lossy(&line[colon + 1..]).trim().to_owned();
        headers.push((name, value));
    }
    Ok(Some(Head {
        method: method.to_owned(),
        target: target.to_owned(),
        http10,
        headers,
    }))
}

/// How a request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Length(u64),
    Chunked,
}

pub(crate) fn framing(head: &Head) -> io::Result<Framing> {
    if let Some(encoding) = head.header("transfer-encoding") {
        if encoding
            .to_ascii_lowercase()
            .split(',')
            .map(str::trim)
            .next_back()
            == Some("chunked")
        {
            return Ok(Framing::Chunked);
        }
        return Err(invalid("unsupported transfer-encoding"));
    }
    let lengths: Vec<&str> = head
        .headers
        .iter()
        .filter(|(name, _)| name == "content-length")
        .map(|(_, v)| v.as_str())
        .collect();
    match lengths.as_slice() {
        [] => Ok(Framing::Length(0)),
        [one] => one
            .parse()
            .map(Framing::Length)
            .map_err(|_| invalid("bad content-length")),
        [first, rest @ ..] if rest.iter().all(|v| v == first) => first
            .parse()
            .map(Framing::Length)
            .map_err(|_| invalid("bad content-length")),
        _ => Err(invalid("conflicting content-length")),
    }
}

enum BodyState {
    Length(u64),
    ChunkStart,
    Chunk(u64),
    ChunkEnd,
    Done,
}

/// The request body, de-chunked. Malformed chunking is `InvalidData`; a connection that
/// ends early is `UnexpectedEof`.
pub(crate) struct BodyReader<'a, R: BufRead> {
    inner: &'a mut R,
    state: BodyState,
    pub total: u64,
}

impl<'a, R: BufRead> BodyReader<'a, R> {
    pub fn new(inner: &'a mut R, framing: Framing) -> Self {
        let state = match framing {
            Framing::Length(0) => BodyState::Done,
            Framing::Length(len) => BodyState::Length(len),
            Framing::Chunked => BodyState::ChunkStart,
        };
        Self {
            inner,
            state,
            total: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }

    fn line(&mut self) -> io::Result<String> {
        let mut line = Vec::new();
        self.inner.by_ref().take(4096).read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\n") {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "body ended inside chunk framing",
            ));
        }
        Ok(String::from_utf8_lossy(&line)
            .trim_end_matches(['\r', '\n'])
            .to_owned())
    }
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "connection closed inside the request body",
    )
}

impl<R: BufRead> Read for BodyReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                BodyState::Done => return Ok(0),
                BodyState::Length(left) | BodyState::Chunk(left) => {
                    let max = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let read = self.inner.read(&mut buf[..max])?;
                    if read == 0 {
                        return Err(eof());
                    }
                    let left = left - read as u64;
                    self.total += read as u64;
                    self.state = match self.state {
                        BodyState::Length(_) if left == 0 => BodyState::Done,
                        BodyState::Length(_) => BodyState::Length(left),
                        _ if left == 0 => BodyState::ChunkEnd,
                        _ => BodyState::Chunk(left),
                    };
                    return Ok(read);
                }
                BodyState::ChunkEnd => {
                    if !self.line()?.is_empty() {
                        return Err(invalid("chunk not followed by CRLF"));
                    }
                    self.state = BodyState::ChunkStart;
                }
                BodyState::ChunkStart => {
                    let line = self.line()?;
                    let size = line.split(';').next().unwrap_or_default().trim();
                    let size = u64::from_str_radix(size, 16).map_err(|_| invalid("bad chunk size"))?;
                    if size == 0 {
                        while !self.line()?.is_empty() {} // trailers
                        self.state = BodyState::Done;
                    } else {
                        self.state = BodyState::Chunk(size);
                    }
                }
            }
        }
    }
}

/// An answer: status, extra headers and a JSON (or empty) body.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: serde_json::to_vec(body).unwrap_or_default(),
        }
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

pub(crate) fn write_answer(out: &mut impl Write, answer: &Answer, close: bool) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", answer.status, reason_phrase(answer.status));
    if !answer.body.is_empty() {
        head.push_str("content-type: application/json\r\n");
    }
    head.push_str(&format!("content-length: {}\r\n", answer.body.len()));
    for (name, value) in &answer.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if close {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&answer.body);
    out.write_all(&bytes)?;
    out.flush()
}

/// The head of `answer` and the first half of its body, then nothing: the caller closes.
pub(crate) fn write_broken_answer(out: &mut impl Write, answer: &Answer) -> io::Result<()> {
    let mut whole = Vec::new();
    write_answer(&mut whole, answer, true)?;
    let cut = whole.len() - answer.body.len().div_ceil(2);
    out.write_all(&whole[..cut])?;
    out.flush()
}

pub(crate) fn write_continue(out: &mut impl Write) -> io::Result<()> {
    out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn head_and_chunked_body() {
        let raw =
            b"\r\nPOST /a?b=1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-Api-Key:  k \r\n\r\n\
4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: t\r\n\r\nGET / HTTP/1.0\r\n\r\n";
        let mut reader = Cursor::new(raw.to_vec());
        let head = read_head(&mut reader).unwrap().unwrap();
        assert_eq!((head.method.as_str(), head.path()), ("POST", "/a"));
        assert_eq!(head.header("x-api-key"), Some("k"));
        assert!(head.keep_alive());
        assert_eq!(framing(&head).unwrap(), Framing::Chunked);
        let mut body = Vec::new();
        BodyReader::new(&mut reader, Framing::Chunked)
            .read_to_end(&mut body)
            .unwrap();
        assert_eq!(body, b"Wikipedia");
        let next = read_head(&mut reader).unwrap().unwrap();
        assert!(next.http10 && !next.keep_alive());
        assert!(read_head(&mut reader).unwrap().is_none());
    }

    #[test]
    fn bad_requests() {
        let parse = |raw: &[u8]| read_head(&mut Cursor::new(raw.to_vec()));
        assert_eq!(
            parse(b"GARBAGE\r\n\r\n").unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nNoColon\r\n\r\n").unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nA: b").unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let head = parse(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(framing(&head).is_err());
        let mut short = Cursor::new(b"abc".to_vec());
        let mut body = Vec::new();
        let error = BodyReader::new(&mut short, Framing::Length(5))
            .read_to_end(&mut body)
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }
}
