//! The text log format's field formatter: the same output as tracing-subscriber's
//! `DefaultFields`, written directly for the common fields.
//!
//! Every message has a span (handler, subject, trace id, attempt, then its outcome), and the
//! text format renders a span's fields when the span is created and when a field is
//! recorded, whether or not anything is logged inside it. `DefaultFields` writes each one
//! through `format!` machinery: a string value is escaped character by character (`{:?}`),
//! and the name goes through an ANSI style even when colours are off. For a plain value (a
//! string of printable ASCII without quotes or backslashes, an integer, a boolean) the
//! escaped form is the value between quotes, so this writes that at once; every other field
//! (the `message`, errors, debug values, any value needing escapes), and every field when
//! colours are on, goes to `DefaultVisitor` itself. About half a microsecond a message
//! (bench/HISTORY.md, session 14). The direct writes of one call are gathered on the stack
//! and reach the span's string in one write, so it is allocated once, not regrown field by
//! field (session 15).

use std::fmt;
use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

/// The text format's fields: see the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fields;

impl<'writer> FormatFields<'writer> for Fields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = Visitor { writer, empty: true, result: Ok(()), buf: Buf::default() };
        fields.record(&mut visitor);
        visitor.flush();
        visitor.result
    }
}

/// What the direct writes of one `format_fields` call gather before they reach the
/// span's string: there, every `write_str` may grow the string, so a span's fields written
/// piece by piece reallocate it several times over; gathered, they are one write.
struct Buf {
    bytes: [u8; BUF],
    len: usize,
}

/// A message span's fields fit with room to spare.
const BUF: usize = 256;

impl Default for Buf {
    fn default() -> Self {
        Buf { bytes: [0; BUF], len: 0 }
    }
}

struct Visitor<'a> {
    writer: Writer<'a>,
    /// Nothing written yet: no separator before the next field.
    empty: bool,
    result: fmt::Result,
    buf: Buf,
}

/// A string whose `{:?}` form is itself between quotes.
fn plain(value: &str) -> bool {
    value.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// The direct writes: into the buffer, through to the writer when it is full.
struct Direct<'v, 'a>(&'v mut Visitor<'a>);

impl fmt::Write for Direct<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let v = &mut *self.0;
        if v.buf.len + s.len() > BUF {
            v.flush();
            v.result?;
            if s.len() > BUF {
                return v.writer.write_str(s);
            }
        }
        v.buf.bytes[v.buf.len..v.buf.len + s.len()].copy_from_slice(s.as_bytes());
        v.buf.len += s.len();
        Ok(())
    }
}

impl Visitor<'_> {
    /// Whether `field` may be written here rather than by `DefaultVisitor`: a named field
    /// (not the event's message, not a raw identifier, not a `log` crate field), colours off.
    fn direct(&self, field: &Field) -> bool {
        let name = field.name();
        self.result.is_ok()
            && !self.writer.has_ansi_escapes()
            && name != "message"
            && !name.starts_with("r#")
            && !name.starts_with("log.")
    }

    /// Hands what the buffer holds to the writer.
    fn flush(&mut self) {
        if self.buf.len == 0 || self.result.is_err() {
            return;
        }
        // Whole `&str`s were copied in, so the bytes are UTF-8.
        self.result = match std::str::from_utf8(&self.buf.bytes[..self.buf.len]) {
            Ok(s) => self.writer.write_str(s),
            Err(_) => Err(fmt::Error),
        };
        self.buf.len = 0;
    }

    fn write(&mut self, field: &Field, value: impl FnOnce(&mut Direct<'_, '_>) -> fmt::Result) {
        let first = self.empty;
        self.empty = false;
        let w = &mut Direct(self);
        let result = (|| {
            if !first {
                w.write_char(' ')?;
            }
            w.write_str(field.name())?;
            w.write_char('=')?;
            value(w)
        })();
        self.result = self.result.and(result);
    }

    fn delegate(&mut self, visit: impl FnOnce(&mut DefaultVisitor<'_>)) {
        self.flush();
        if self.result.is_err() {
            return;
        }
        let mut inner = DefaultVisitor::new(self.writer.by_ref(), self.empty);
        visit(&mut inner);
        self.result = inner.finish();
        self.empty = false;
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.direct(field) && plain(value) {
            self.write(field, |w| {
                w.write_char('"')?;
                w.write_str(value)?;
                w.write_char('"')
            });
        } else {
            self.delegate(|v| v.record_str(field, value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.direct(field) {
            self.write(field, |w| write!(w, "{value}"));
        } else {
            self.delegate(|v| v.record_u64(field, value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.direct(field) {
            self.write(field, |w| write!(w, "{value}"));
        } else {
            self.delegate(|v| v.record_i64(field, value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.direct(field) {
            self.write(field, |w| w.write_str(if value { "true" } else { "false" }));
        } else {
            self.delegate(|v| v.record_bool(field, value));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.delegate(|v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.delegate(|v| v.record_debug(field, value));
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    /// Logs a span with every kind of field, records into it, and logs events inside it.
    fn scene() {
        let error = io::Error::other("disk on fire");
        let span = tracing::info_span!(
            "message",
            handler = "orders",
            subject = "orders.eu.\u{1b}[31mred\"quoted\\",
            trace_id = "",
            attempt = 3u32,
            delta = -7i64,
            first = true,
            r#type = "raw",
            long = &*"x".repeat(300),
            longer = &*"y".repeat(200),
            outcome = tracing::field::Empty,
        );
        let _in = span.enter();
        span.record("outcome", "succeeded");
        span.record("attempt", 4u32);
        tracing::info!(kind = %"trap", reason = ?"line\nbreak", count = 2u64, "giving up: {}", "why");
        tracing::warn!(error = &error as &(dyn std::error::Error + 'static), plain = "a b=c", "multi\nline");
    }

    fn render(fast: bool, ansi: bool) -> String {
        let buffer = Buffer::default();
        let layer = tracing_subscriber::fmt::layer().with_ansi(ansi).without_time().with_writer(buffer.clone());
        if fast {
            tracing::subscriber::with_default(tracing_subscriber::registry().with(layer.fmt_fields(Fields)), scene);
        } else {
            tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), scene);
        }
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn the_output_is_the_default_formatters_byte_for_byte() {
        for ansi in [false, true] {
            let default = render(false, ansi);
            if !ansi {
                assert!(default.contains("message{handler=\"orders\" subject=\"orders.eu.\\u{1b}"), "{default}");
                assert!(default.contains("outcome=\"succeeded\" attempt=4}"), "{default}");
            }
            assert_eq!(render(true, ansi), default, "ansi {ansi}");
        }
    }

    #[test]
    fn only_plain_strings_skip_the_escaping() {
        assert!(plain("orders.eu.1"));
        assert!(plain(""));
        assert!(!plain("a\"b"));
        assert!(!plain("a\\b"));
        assert!(!plain("a\nb"));
        assert!(!plain("\u{1b}[31m"));
        assert!(!plain("café"));
    }
}
