//! upgate patch: the body of an answer to a request refused before it reached the service.
//!
//! Upstream answers a request head that does not parse (400), one that is too large (431)
//! and one that does not arrive in time (408) with an empty body. An embedding server
//! registers one function per process ([`set_rejection_body`]); the dispatcher gives it the
//! status and the start of the request target (from the head's first line, when it has one)
//! and sends the body and content type it returns.

use std::sync::OnceLock;

use bytes::Bytes;
use http::StatusCode;

use crate::{header::HeaderMap, Response};

/// Given the status and the request target's first [`RequestTarget::CAPACITY`] bytes (when
/// the head had a complete request line of visible ASCII), the body and the headers that go
/// with it (its content type, and any the protocol of the path wants on every answer), or
/// `None` for an empty body.
pub type RejectionBody = fn(StatusCode, Option<&str>) -> Option<(HeaderMap, Bytes)>;

static REJECTION_BODY: OnceLock<RejectionBody> = OnceLock::new();

/// Registers the process's rejection body; `false` if one was registered already (the first
/// stays).
pub fn set_rejection_body(render: RejectionBody) -> bool {
    REJECTION_BODY.set(render).is_ok()
}

/// The start of a request head's target, copied before the head is decoded (a head whose
/// headers fail to parse is consumed from the read buffer first).
#[derive(Clone, Copy)]
pub(crate) struct RequestTarget {
    bytes: [u8; Self::CAPACITY],
    len: u8,
}

impl RequestTarget {
    /// Enough for every route prefix; a longer target is cut here.
    pub(crate) const CAPACITY: usize = 96;

    pub(crate) const NONE: Self = Self {
        bytes: [0; Self::CAPACITY],
        len: 0,
    };

    /// The target of the request line at the start of `head`: `METHOD SP target SP`, the
    /// method a token of letters, the target of visible ASCII only; [`Self::NONE`]
    /// otherwise, and for a `HEAD` request (whose answer has no body).
    pub(crate) fn peek(head: &[u8]) -> Self {
        let window = &head[..head.len().min(2048)];
        let Some(start) = window.iter().position(|&byte| byte == b' ') else {
            return Self::NONE;
        };
        let method = &window[..start];
        if method.is_empty() || !method.iter().all(u8::is_ascii_alphabetic) || method == b"HEAD" {
            return Self::NONE;
        }
        let rest = &window[start + 1..];
        let Some(end) = rest.iter().position(|&byte| byte == b' ') else {
            return Self::NONE;
        };
        let target = &rest[..end];
        if target.is_empty() || !target.iter().all(u8::is_ascii_graphic) {
            return Self::NONE;
        }
        let kept = target.len().min(Self::CAPACITY);
        let mut bytes = [0; Self::CAPACITY];
        bytes[..kept].copy_from_slice(&target[..kept]);
        Self {
            bytes,
            len: kept as u8,
        }
    }

    fn as_str(&self) -> Option<&str> {
        let target = &self.bytes[..usize::from(self.len)];
        (!target.is_empty())
            .then(|| std::str::from_utf8(target).ok())
            .flatten()
    }
}

/// The answer to a request refused with `status` before it reached the service (an empty
/// body when none is registered or it has none for this target).
pub(crate) fn response(status: StatusCode, target: &RequestTarget) -> (Response<()>, Bytes) {
    let mut response = Response::with_body(status, ());
    let body = REJECTION_BODY
        .get()
        .and_then(|render| render(status, target.as_str()));
    match body {
        Some((headers, bytes)) => {
            for (name, value) in headers.iter() {
                response.headers_mut().insert(name.clone(), value.clone());
            }
            (response, bytes)
        }
        None => (response, Bytes::new()),
    }
}
