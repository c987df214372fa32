//! Validation of user-chosen names and texts against configurable limits.

use serde::{Deserialize, Serialize};

/// The limits every decoded client message is checked against.
///
/// Lengths count Unicode scalar values (what a person calls characters), not
/// bytes. The defaults are the documented protocol limits; servers may
/// configure others.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Longest username after trimming. Default 32.
    pub max_username_chars: usize,
    /// Longest room name after trimming. Default 64.
    pub max_room_chars: usize,
    /// Longest chat text (room and lobby messages). Default 4,096.
    pub max_text_chars: usize,
    /// Longest file name a `fileStart` may carry. Default 255.
    pub max_file_name_chars: usize,
    /// Longest client-chosen `transferId`. Default 64.
    pub max_transfer_id_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_username_chars: 32,
            max_room_chars: 64,
            max_text_chars: 4096,
            max_file_name_chars: 255,
            max_transfer_id_chars: 64,
        }
    }
}

/// Why a name or a text was refused. The display form is the message the
/// client receives in an `error` event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// Empty, or only whitespace.
    #[error("Invalid {field}: must not be empty")]
    Empty {
        /// Which field: `username`, `room name` or `message text`.
        field: &'static str,
    },
    /// Longer than the configured maximum.
    #[error("Invalid {field}: must be at most {max} characters")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// The configured maximum.
        max: usize,
    },
    /// Contains a control character (newline, tab, NUL, ...).
    #[error("Invalid {field}: must not contain control characters")]
    ControlCharacter {
        /// Which field.
        field: &'static str,
    },
}

impl Limits {
    /// Checks a username; returns it trimmed.
    pub fn username(&self, raw: String) -> Result<String, ValidationError> {
        name(raw, "username", self.max_username_chars)
    }

    /// Checks a room name; returns it trimmed.
    pub fn room(&self, raw: String) -> Result<String, ValidationError> {
        name(raw, "room name", self.max_room_chars)
    }

    /// Checks a file name: not blank, bounded. Path separators and the like
    /// are the store's business; it sanitizes names before using them.
    pub fn file_name(&self, raw: String) -> Result<String, ValidationError> {
        let field = "file name";
        if raw.trim().is_empty() {
            return Err(ValidationError::Empty { field });
        }
        if exceeds(&raw, self.max_file_name_chars) {
            return Err(ValidationError::TooLong { field, max: self.max_file_name_chars });
        }
        Ok(raw)
    }

    /// Checks a transfer id: like a username, with its own length limit.
    pub fn transfer_id(&self, raw: String) -> Result<String, ValidationError> {
        name(raw, "transfer id", self.max_transfer_id_chars)
    }

    /// Checks a chat text. Texts keep their whitespace and may span lines,
    /// but may not be blank.
    pub fn text(&self, raw: String) -> Result<String, ValidationError> {
        let field = "message text";
        if raw.trim().is_empty() {
            return Err(ValidationError::Empty { field });
        }
        if exceeds(&raw, self.max_text_chars) {
            return Err(ValidationError::TooLong { field, max: self.max_text_chars });
        }
        Ok(raw)
    }
}

fn name(raw: String, field: &'static str, max: usize) -> Result<String, ValidationError> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(ValidationError::Empty { field });
    }
    if exceeds(trimmed, max) {
        return Err(ValidationError::TooLong { field, max });
    }
    if trimmed.chars().any(char::is_control) {
        return Err(ValidationError::ControlCharacter { field });
    }
    // Reuse the allocation when there was nothing to trim.
    if trimmed.len() == raw.len() { Ok(raw) } else { Ok(trimmed.to_owned()) }
}

/// True when `s` has more than `max` characters, without counting past `max`.
fn exceeds(s: &str, max: usize) -> bool {
    // A string of at most `max` bytes cannot have more than `max` chars.
    s.len() > max && s.chars().nth(max).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_bounded() {
        let l = Limits::default();
        assert_eq!(l.username("  ada ".into()).unwrap(), "ada");
        assert_eq!(l.username("é".repeat(32)).unwrap(), "é".repeat(32));
        assert_eq!(
            l.username("é".repeat(33)).unwrap_err(),
            ValidationError::TooLong { field: "username", max: 32 }
        );
        assert_eq!(l.username("   ".into()).unwrap_err(), ValidationError::Empty { field: "username" });
        assert_eq!(
            l.room("a\u{0}b".into()).unwrap_err(),
            ValidationError::ControlCharacter { field: "room name" }
        );
        assert!(l.room("r".repeat(64)).is_ok());
        assert!(l.room("r".repeat(65)).is_err());
    }

    #[test]
    fn texts_keep_whitespace_but_not_blank() {
        let l = Limits { max_text_chars: 5, ..Limits::default() };
        assert_eq!(l.text(" a\nb ".into()).unwrap(), " a\nb ");
        assert!(l.text("123456".into()).is_err());
        assert_eq!(
            l.text("\n\t ".into()).unwrap_err().to_string(),
            "Invalid message text: must not be empty"
        );
    }
}
