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

/// Why a [`Limits`] value is unusable. Reported at startup, so the messages
/// name the config fields.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// A maximum is zero, so every name or text of that kind would be
    /// refused.
    #[error("{field} must be greater than zero")]
    Zero {
        /// The field, as in the config section: `max_username_chars`, ...
        field: &'static str,
    },
}

impl Limits {
    /// Checks that every maximum is at least 1.
    ///
    /// ```
    /// use hubbub_protocol::{Limits, LimitsError};
    ///
    /// assert_eq!(Limits::default().validate(), Ok(()));
    /// let mute = Limits { max_text_chars: 0, ..Limits::default() };
    /// assert_eq!(mute.validate(), Err(LimitsError::Zero { field: "max_text_chars" }));
    /// ```
    pub fn validate(&self) -> Result<(), LimitsError> {
        for (field, max) in [
            ("max_username_chars", self.max_username_chars),
            ("max_room_chars", self.max_room_chars),
            ("max_text_chars", self.max_text_chars),
            ("max_file_name_chars", self.max_file_name_chars),
            ("max_transfer_id_chars", self.max_transfer_id_chars),
        ] {
            if max == 0 {
                return Err(LimitsError::Zero { field });
            }
        }
        Ok(())
    }

    /// Checks a username; returns it without bidirectional controls (see
    /// [`is_bidi_control`]) and trimmed.
    pub fn username(&self, raw: String) -> Result<String, ValidationError> {
        name(strip_bidi_controls(raw), "username", self.max_username_chars)
    }

    /// Checks a room name; returns it without bidirectional controls and
    /// trimmed.
    pub fn room(&self, raw: String) -> Result<String, ValidationError> {
        name(strip_bidi_controls(raw), "room name", self.max_room_chars)
    }

    /// Checks a file name: not blank, bounded; returns it without
    /// bidirectional controls. Path separators and the like are the store's
    /// business; it sanitizes names before using them.
    pub fn file_name(&self, raw: String) -> Result<String, ValidationError> {
        let raw = strip_bidi_controls(raw);
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

/// Whether `c` is a Unicode bidirectional control: the embeddings and
/// overrides U+202A–U+202E, the isolates U+2066–U+2069, and the marks
/// U+200E, U+200F and U+061C.
///
/// They are invisible, and they reorder what follows them when displayed: a
/// file named `evil\u{202E}gnp.exe` shows as `evilexe.png`. Names are shown
/// to other people, so the protocol removes these from usernames, room names
/// and file names (texts keep them: writing in right-to-left scripts needs
/// them there).
///
/// ```
/// use hubbub_protocol::{Limits, is_bidi_control};
///
/// assert!(is_bidi_control('\u{202E}'));
/// assert!(!is_bidi_control('\u{05D0}')); // Hebrew alef: a letter, not a control
/// let name = Limits::default().file_name("evil\u{202E}gnp.exe".into()).unwrap();
/// assert_eq!(name, "evilgnp.exe");
/// ```
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// `raw` without its bidirectional controls; allocates only when it has some.
fn strip_bidi_controls(raw: String) -> String {
    if raw.chars().any(is_bidi_control) {
        raw.chars().filter(|c| !is_bidi_control(*c)).collect()
    } else {
        raw
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
    fn bidi_controls_are_removed_from_names_but_kept_in_texts() {
        let l = Limits::default();
        assert_eq!(l.file_name("evil\u{202E}gnp.exe".into()).unwrap(), "evilgnp.exe");
        assert_eq!(l.username("\u{202E} ada\u{2066}\u{2069} ".into()).unwrap(), "ada");
        assert_eq!(l.room("gen\u{200E}er\u{061C}al\u{200F}".into()).unwrap(), "general");
        for c in
            ['\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}', '\u{2066}', '\u{2067}', '\u{2068}']
        {
            assert_eq!(l.username(format!("a{c}b")).unwrap(), "ab", "{c:?}");
        }
        // Nothing but controls is nothing.
        assert_eq!(
            l.username("\u{202E}\u{202C}".into()).unwrap_err(),
            ValidationError::Empty { field: "username" }
        );
        assert_eq!(
            l.file_name("\u{202E}".into()).unwrap_err(),
            ValidationError::Empty { field: "file name" }
        );
        // Right-to-left letters are not controls.
        assert_eq!(l.username("שלום".into()).unwrap(), "שלום");
        assert_eq!(l.text("a\u{202E}b".into()).unwrap(), "a\u{202E}b");
    }

    #[test]
    fn every_maximum_must_be_positive() {
        assert_eq!(Limits::default().validate(), Ok(()));
        let zeroed = [
            ("max_username_chars", Limits { max_username_chars: 0, ..Limits::default() }),
            ("max_room_chars", Limits { max_room_chars: 0, ..Limits::default() }),
            ("max_text_chars", Limits { max_text_chars: 0, ..Limits::default() }),
            ("max_file_name_chars", Limits { max_file_name_chars: 0, ..Limits::default() }),
            ("max_transfer_id_chars", Limits { max_transfer_id_chars: 0, ..Limits::default() }),
        ];
        for (field, limits) in zeroed {
            assert_eq!(limits.validate(), Err(LimitsError::Zero { field }));
        }
        assert_eq!(
            LimitsError::Zero { field: "max_room_chars" }.to_string(),
            "max_room_chars must be greater than zero"
        );
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
