//! The log on stderr: tracing's formatter, with upgate's own writer of fields for text.
//!
//! What flows through here: every log event (one per request, from the request log, and the
//! daemon's own). JSON lines are tracing's. Text lines keep tracing's layout (time, level,
//! `message name=value ...`) but their fields are written by [`PlainFields`]: tracing's
//! default writer styles every name and `=` through its ANSI painter even with colours off,
//! which was the larger part of the request log's cost per small upload. Values are written
//! as before: strings quoted and escaped (`Debug`), `%` values as their `Display`, numbers
//! and booleans bare, the message unquoted with its control and bidirectional-override
//! characters escaped (nothing from a client can start a line of its own, a terminal
//! sequence, or reorder what the line shows).

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

use crate::config::LogFormat;
use crate::vocab::is_unseen_control;

/// Starts the log in `format` (once per process; later calls keep the first).
pub(super) fn init(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(false).fmt_fields(PlainFields).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Writes an event's or a span's fields as `message name=value ...` without styling.
pub(crate) struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = PlainVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// Writes the separator and the field's name and `=` (nothing for the message); false
    /// when the field is not written at all.
    fn start(&mut self, field: &Field) -> bool {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return false;
        }
        if !std::mem::replace(&mut self.first, false) {
            self.result = self.writer.write_char(' ');
        }
        if name != "message" {
            self.result = self
                .result
                .and_then(|()| self.writer.write_str(written_name(field)))
                .and_then(|()| self.writer.write_char('='));
        }
        self.result.is_ok()
    }

    fn write_message(&mut self, text: &str) {
        self.result = self
            .result
            .and_then(|()| Escaped(&mut self.writer).write_str(text));
    }
}

/// A writer that escapes what could break or forge a log line (controls, line and
/// paragraph separators, bidirectional overrides: [`is_unseen_control`]) in whatever is
/// written through it: a message, or a field's value however it formats itself (a `%`
/// field's `Display` is written as it is, and may carry an engine's or a plugin's text).
struct Escaped<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Escaped<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for piece in text.split_inclusive(is_unseen_control) {
            let (plain, control) = match piece.chars().last() {
                Some(last) if is_unseen_control(last) => {
                    (&piece[..piece.len() - last.len_utf8()], Some(last))
                }
                _ => (piece, None),
            };
            self.0.write_str(plain)?;
            if let Some(control) = control {
                write!(self.0, "{}", control.escape_debug())?;
            }
        }
        Ok(())
    }
}

/// A field's name as the line shows it (a raw identifier without its `r#`).
fn written_name(field: &Field) -> &'static str {
    let name = field.name();
    name.strip_prefix("r#").unwrap_or(name)
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.start(field) {
            return;
        }
        if field.name() == "message" {
            self.write_message(value);
        } else {
            self.result = write!(self.writer, "{value:?}");
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field) {
            self.result = write!(self.writer, "{value}");
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field) {
            self.result = write!(self.writer, "{value}");
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field) {
            self.result = self.writer.write_str(if value { "true" } else { "false" });
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !self.start(field) {
            return;
        }
        self.write_message(&value.to_string());
        let mut source = value.source();
        if source.is_some() {
            let name = written_name(field);
            self.result = self
                .result
                .and_then(|()| write!(self.writer, " {name}.sources=["));
            let mut first = true;
            while let Some(error) = source {
                if !std::mem::replace(&mut first, false) {
                    self.result = self.result.and_then(|()| self.writer.write_str(", "));
                }
                self.write_message(&error.to_string());
                source = error.source();
            }
            self.result = self.result.and_then(|()| self.writer.write_char(']'));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.start(field) {
            return;
        }
        if field.name() == "message" {
            // A formatted message (`info!("... {x}")`): escaped like any other message.
            let text = format!("{value:?}");
            self.write_message(&text);
        } else {
            self.result = write!(Escaped(&mut self.writer), "{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(fields: bool, emit: impl FnOnce()) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let builder = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_target(false)
            .with_ansi(false)
            .without_time();
        if fields {
            tracing::subscriber::with_default(builder.fmt_fields(PlainFields).finish(), emit);
        } else {
            tracing::subscriber::with_default(builder.finish(), emit);
        }
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    fn request_line() {
        let route = "/v1/files/upload";
        tracing::info!(
            method = %"POST",
            route = %route,
            dialect = "dify",
            status = 201u16,
            bytes = 1194u64,
            upload_ids = %"a,b",
            tenant = %"",
            error = String::new(),
            offset = -3i64,
            done = true,
            "request"
        );
        tracing::warn!(r#type = "x", "a {} message", "formatted");
    }

    #[test]
    fn text_lines_are_what_tracings_default_fields_wrote() {
        let ours = logged(true, request_line);
        assert_eq!(ours, logged(false, request_line));
        assert!(ours.contains(
            " INFO request method=POST route=/v1/files/upload dialect=\"dify\" status=201 bytes=1194 upload_ids=a,b tenant= error=\"\" offset=-3 done=true\n"
        ), "{ours}");
        assert!(ours.contains(" WARN a formatted message type=\"x\"\n"), "{ours}");
    }

    #[test]
    fn control_characters_never_reach_the_line_raw() {
        let line = logged(true, || {
            let name = "evil\nINFO forged\u{1b}[31m";
            tracing::info!(filename = name, "got {name}");
            tracing::info!("{}", name);
            tracing::info!(filename = "a\u{202e}fdp.exe", "got a\u{202e}fdp.exe");
        });
        assert_eq!(line.lines().count(), 3, "{line}");
        assert!(!line.contains('\u{1b}') && !line.contains('\u{202e}'), "{line}");
        assert!(
            line.contains("filename=\"evil\\nINFO forged\\u{1b}[31m\""),
            "{line}"
        );
        assert!(line.contains("got evil\\nINFO forged\\u{1b}[31m"), "{line}");
        // A `%` field is written by its Display, which may carry an engine's or a plugin's
        // text: escaped as well.
        let line = logged(true, || {
            let answer = "503\nINFO forged\u{2028}x";
            tracing::warn!(error = %answer, "the spool failed");
        });
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(line.contains("error=503\\nINFO forged\\u{2028}x"), "{line}");
    }

    #[derive(Debug)]
    struct Outer(Inner);
    #[derive(Debug)]
    struct Inner;
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer failed")
        }
    }
    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("inner cause")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    impl std::error::Error for Inner {}

    #[test]
    fn errors_list_their_sources() {
        let emit = || {
            let error = Outer(Inner);
            tracing::error!(error = &error as &(dyn std::error::Error + 'static), "failed");
        };
        let ours = logged(true, emit);
        assert_eq!(ours, logged(false, emit));
        assert!(
            ours.contains("failed error=outer failed error.sources=[inner cause]"),
            "{ours}"
        );
    }
}
