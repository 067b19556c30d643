//! Turning an upstream's answer into a JSON value or a [`PluginError`] of the right kind.

use serde_json::{Map, Value};
use upgate_plugin_api::{ErrorKind, PluginError, PutResult};

/// Longest upstream reason kept in an error message, in characters.
pub const MAX_REASON_CHARS: usize = 200;

/// A successful (2xx) answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// The JSON body; `Null` when the body was empty.
    pub body: Value,
    /// `"<vendor> <what>"`, for error messages about this answer.
    pub(crate) context: String,
}

impl Reply {
    /// A non-empty string field of the top-level object.
    pub fn str_field(&self, key: &str) -> Option<&str> {
        json_str(&self.body, key)
    }

    /// A non-empty string field of the top-level object, or an error saying it is missing.
    pub fn require_str(&self, key: &str) -> Result<&str, PluginError> {
        self.str_field(key)
            .ok_or_else(|| self.unexpected(&format!("no `{key}` in the answer")))
    }

    /// The [`PutResult`] of a vendor's file record: the record is the answer itself
    /// (`record` = `""`) or a part of it (a JSON pointer, e.g. `/0` for the first element of
    /// an array); its `id_key` is the remote id, the first of `url_keys` present the URL, and
    /// the record is kept as `raw` (the host checks the id and the URL, and keeps neither
    /// `raw` nor an id that is not a plain one).
    pub fn into_put_result(
        self,
        record: &str,
        id_key: &str,
        url_keys: &[&str],
    ) -> Result<PutResult, PluginError> {
        let found = self
            .body
            .pointer(record)
            .ok_or_else(|| self.unexpected("no file record in the answer"))?;
        let remote_id = json_str(found, id_key)
            .ok_or_else(|| self.unexpected(&format!("no `{id_key}` in the file record")))?
            .to_owned();
        let url = url_keys
            .iter()
            .find_map(|key| json_str(found, key))
            .map(str::to_owned);
        Ok(PutResult {
            remote_id,
            url,
            raw: found.clone(),
            consumed_file: false,
        })
    }

    /// An error for a 2xx answer whose body is not what the vendor documents.
    pub fn unexpected(&self, detail: &str) -> PluginError {
        let mut error = PluginError::new(
            ErrorKind::Internal,
            format!(
                "{}: unexpected answer (HTTP {}): {detail}",
                self.context, self.status
            ),
        );
        error.status = Some(self.status);
        error
    }
}

/// `value[key]` when it is a non-empty string.
pub fn json_str<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value
        .get(key)
        .and_then(Value::as_str)
        .filter(|text| !text.is_empty())
}

/// Removes control characters, trims, and cuts to `max_chars` characters (marking the cut).
pub fn sanitize(text: &str, max_chars: usize) -> String {
    let cleaned: String = text
        .chars()
        .map(|c| {
            if c == '\n' || c == '\r' || c == '\t' {
                ' '
            } else {
                c
            }
        })
        .filter(|c| !c.is_control())
        .collect();
    let cleaned = cleaned.split_whitespace().collect::<Vec<_>>().join(" ");
    if cleaned.chars().count() <= max_chars {
        cleaned
    } else {
        let mut cut: String = cleaned.chars().take(max_chars.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// The upstream's human-readable reason in an error body: `message`, `detail`, `error`,
/// `errors[0].msg`, a Django REST framework field map (`{"file": ["..."]}`) or plain text.
/// Sanitized and cut to [`MAX_REASON_CHARS`].
pub fn extract_reason(body: &[u8]) -> Option<String> {
    extract_reason_without(body, "")
}

/// [`extract_reason`] with `secret` replaced before the reason is cut (a secret the upstream
/// echoed across the cut would otherwise keep its first characters).
fn extract_reason_without(body: &[u8], secret: &str) -> Option<String> {
    let reason = match serde_json::from_slice::<Value>(body) {
        Ok(value) => reason_in(&value),
        Err(_) => std::str::from_utf8(body).ok().map(str::to_owned),
    }?;
    // Cleaned before the secret is looked for: a secret echoed with a control character
    // inside would otherwise pass the redaction and be made whole by the cleaning.
    let reason = sanitize(&redact(sanitize(&reason, usize::MAX), secret), MAX_REASON_CHARS);
    (!reason.is_empty()).then_some(reason)
}

fn reason_in(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => (!text.trim().is_empty()).then(|| text.clone()),
        Value::Array(items) => items.iter().find_map(reason_in),
        Value::Object(map) => reason_in_object(map),
        _ => None,
    }
}

fn reason_in_object(map: &Map<String, Value>) -> Option<String> {
    for key in [
        "message",
        "detail",
        "error_description",
        "error",
        "msg",
        "errors",
        "non_field_errors",
    ] {
        if let Some(reason) = map.get(key).and_then(reason_in) {
            return Some(reason);
        }
    }
    // Django REST framework validation errors: {"field": ["reason", ...], ...}.
    map.iter().find_map(|(field, value)| match value {
        Value::Array(items) => items
            .iter()
            .find_map(|item| item.as_str().filter(|text| !text.trim().is_empty()))
            .map(|reason| format!("{field}: {reason}")),
        _ => None,
    })
}

/// Parses `Retry-After`: delay-seconds, or an HTTP-date (seconds from now until then,
/// rounded up; a date in the past is 0). Anything else gives `None`.
pub fn parse_retry_after(value: Option<&str>) -> Option<u64> {
    let value = value?.trim();
    if let Ok(seconds) = value.parse() {
        return Some(seconds);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let wait = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
}

/// Replaces the secret, when it is long enough to be recognizable, in upstream text.
pub(crate) fn redact(text: String, secret: &str) -> String {
    if secret.len() >= 4 && text.contains(secret) {
        text.replace(secret, "[redacted]")
    } else {
        text
    }
}

/// Maps an answer to a [`Reply`] (2xx) or an error: 425, 429 and 5xx are `Unavailable`,
/// 404 is `NotFound`, 408 is `Timeout` (the retryable ones with their `Retry-After`), any
/// other status is `Rejected` with the upstream's reason. `context` is `"<vendor> <what>"`; `secret` is kept out of messages.
pub fn classify(
    context: &str,
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    secret: &str,
) -> Result<Reply, PluginError> {
    if (200..300).contains(&status) {
        let body = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(body).map_err(|error| {
                let mut error = PluginError::new(
                    ErrorKind::Internal,
                    format!("{context}: HTTP {status} with a body that is not JSON ({error})"),
                );
                error.status = Some(status);
                error
            })?
        };
        return Ok(Reply {
            status,
            body,
            context: context.to_owned(),
        });
    }
    let kind = match status {
        425 | 429 | 500..=599 => ErrorKind::Unavailable,
        404 => ErrorKind::NotFound,
        408 => ErrorKind::Timeout,
        _ => ErrorKind::Rejected,
    };
    let reason = extract_reason_without(body, secret);
    let message = match reason {
        Some(reason) => format!("{context}: HTTP {status}: {reason}"),
        None => format!("{context}: HTTP {status}"),
    };
    let mut error = PluginError::new(kind, message);
    error.status = Some(status);
    if matches!(kind, ErrorKind::Unavailable | ErrorKind::Timeout) {
        error.retry_after_secs = parse_retry_after(retry_after);
    }
    Err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_echoed_across_the_cut_is_redacted_whole() {
        let secret = "sk-0123456789abcdef";
        let body = format!(
            "{{\"message\": \"{}{secret} is not a valid key\"}}",
            "x".repeat(190)
        );
        let error = classify("vendor put", 401, None, body.as_bytes(), secret).unwrap_err();
        assert!(!error.message.contains("sk-01"), "{}", error.message);
        let early = classify("vendor put", 425, Some("7"), b"{}", secret).unwrap_err();
        assert_eq!(
            (early.kind, early.retry_after_secs),
            (ErrorKind::Unavailable, Some(7))
        );
        let gateway = classify("vendor put", 502, Some("9"), b"{}", secret).unwrap_err();
        assert_eq!(gateway.retry_after_secs, Some(9));
        // Echoed with a control character inside: the cleaning must not make it whole.
        let body = r#"{"message": "bad key sk-0123\u0000456789abcdef"}"#;
        let error = classify("vendor put", 400, None, body.as_bytes(), secret).unwrap_err();
        assert!(!error.message.contains("sk-0123456789"), "{}", error.message);
        assert!(error.message.contains("[redacted]"), "{}", error.message);
    }

    fn reason(body: &str) -> Option<String> {
        extract_reason(body.as_bytes())
    }

    #[test]
    fn reasons_in_each_vendor_shape() {
        // dify
        let dify = r#"{"code":"unauthorized","message":"Access token is invalid","status":401}"#;
        assert_eq!(reason(dify).as_deref(), Some("Access token is invalid"));
        // maiagent (DRF)
        assert_eq!(
            reason(r#"{"detail":"Invalid API key format."}"#).as_deref(),
            Some("Invalid API key format.")
        );
        assert_eq!(
            reason(r#"{"file":["This field is required."]}"#).as_deref(),
            Some("file: This field is required.")
        );
        assert_eq!(
            reason(r#"["Non-field problem."]"#).as_deref(),
            Some("Non-field problem.")
        );
        // kore / korexo
        assert_eq!(
            reason(r#"{"errors":[{"msg":"fileContext is required","code":400}]}"#).as_deref(),
            Some("fileContext is required")
        );
        // beam (NestJS), message as string or list
        assert_eq!(
            reason(r#"{"statusCode":400,"message":"Unexpected field","error":"Bad Request"}"#).as_deref(),
            Some("Unexpected field")
        );
        assert_eq!(
            reason(r#"{"statusCode":400,"message":["threadId must be a UUID"],"error":"Bad Request"}"#)
                .as_deref(),
            Some("threadId must be a UUID")
        );
        assert_eq!(
            reason(r#"{"error":"invalid_token"}"#).as_deref(),
            Some("invalid_token")
        );
        assert_eq!(
            reason(r#"{"error":{"message":"nested"}}"#).as_deref(),
            Some("nested")
        );
        // plain text, nothing, and bodies with no reason
        assert_eq!(reason("Bad gateway\r\n").as_deref(), Some("Bad gateway"));
        assert_eq!(reason(""), None);
        assert_eq!(reason(r#"{"status":400}"#), None);
        assert_eq!(extract_reason(&[0xff, 0xfe]), None);
    }

    #[test]
    fn reasons_are_cleaned_and_cut() {
        let body = format!(r#"{{"message":"a\u0000b\u001b[31mc\nd{}"}}"#, "x".repeat(500));
        let reason = reason(&body).unwrap();
        assert!(reason.starts_with("ab[31mc d"), "{reason}");
        assert_eq!(reason.chars().count(), MAX_REASON_CHARS);
        assert!(reason.ends_with('…'));
        assert!(!reason.chars().any(char::is_control));
    }

    #[test]
    fn statuses_map_to_kinds() {
        let error = |status, retry: Option<&str>, body: &str| {
            classify("v upload", status, retry, body.as_bytes(), "secret-key").unwrap_err()
        };
        let e = error(429, Some("7"), r#"{"detail":"Request was throttled."}"#);
        assert_eq!(
            (e.kind, e.status, e.retry_after_secs),
            (ErrorKind::Unavailable, Some(429), Some(7))
        );
        assert_eq!(e.message, "v upload: HTTP 429: Request was throttled.");
        // An HTTP-date: in the past is "now", in the future the seconds until then.
        let e = error(429, Some("Wed, 21 Oct 2015 07:28:00 GMT"), "");
        assert_eq!(
            (e.retry_after_secs, e.message.as_str()),
            (Some(0), "v upload: HTTP 429")
        );
        let later =
            httpdate::fmt_http_date(std::time::SystemTime::now() + std::time::Duration::from_secs(30));
        let wait = error(503, Some(&later), "").retry_after_secs.unwrap();
        assert!((29..=30).contains(&wait), "{wait}");
        assert_eq!(error(429, Some("soon"), "").retry_after_secs, None);
        assert_eq!(error(502, None, "").kind, ErrorKind::Unavailable);
        assert_eq!(error(404, None, "").kind, ErrorKind::NotFound);
        assert_eq!(error(408, None, "").kind, ErrorKind::Timeout);
        let e = error(401, None, r#"{"message":"key secret-key is invalid"}"#);
        assert_eq!(e.kind, ErrorKind::Rejected);
        assert!(!e.message.contains("secret-key"), "{}", e.message);
        assert_eq!(error(301, None, "").kind, ErrorKind::Rejected);

        let reply = classify("v upload", 201, None, br#"{"id":"x","url":""}"#, "k").unwrap();
        assert_eq!(reply.str_field("id"), Some("x"));
        assert_eq!(reply.str_field("url"), None);
        assert_eq!(reply.require_str("url").unwrap_err().kind, ErrorKind::Internal);
        assert_eq!(classify("v", 200, None, b"", "k").unwrap().body, Value::Null);
        assert_eq!(
            classify("v", 200, None, b"<html>", "k").unwrap_err().kind,
            ErrorKind::Internal
        );
    }
}
