//! Text log lines that a client cannot forge: every field value is written
//! with its control characters escaped.
//!
//! Log fields carry what clients send (usernames, room names, a token's
//! header quoted in an error, an unknown message type). Written raw, a
//! newline in one starts a line of the client's making at column 0, and an
//! escape sequence drives the terminal of whoever reads the log. The JSON
//! format escapes by construction; this does the same for the text format,
//! for every field of every event and span, whoever logs it.

use std::fmt::{self, Write as _};

use tracing::field::Field;
use tracing_subscriber::field::MakeExt as _;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{Writer, debug_fn};

/// The text format's field formatter: `name=value` separated by spaces, the
/// message alone, every value with its control characters escaped.
pub(crate) fn escaped_fields() -> impl for<'writer> FormatFields<'writer> + 'static {
    debug_fn(write_field).delimited(" ")
}

/// Writes one field, escaped.
fn write_field(writer: &mut Writer<'_>, field: &Field, value: &dyn fmt::Debug) -> fmt::Result {
    let mut text = String::new();
    write!(text, "{value:?}")?;
    if field.name() != "message" {
        write!(writer, "{}=", field.name())?;
    }
    writer.write_str(&escape_controls(&text))
}

/// `text` with every control character (newlines and the escape character
/// included) written as a Rust escape, `\n` or `\u{1b}`.
pub(crate) fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escape_controls("ada"), "ada");
        assert_eq!(escape_controls("a\nb"), "a\\nb");
        assert_eq!(escape_controls("X\n<fake line>\u{1b}[2J"), "X\\n<fake line>\\u{1b}[2J");
        assert_eq!(escape_controls("tab\there\r"), "tab\\there\\r");
        // Text that is not a control character passes unchanged.
        assert_eq!(escape_controls("naïve €"), "naïve €");
    }
}
