//! Decoding client frames: typed errors for every way a frame can be wrong.

use crate::{ClientMessage, Limits, ServerMessage, ValidationError};

/// Why a client's text frame was refused. None of these closes the
/// connection: the server answers with [`ProtocolError::to_event`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The frame is not a JSON object (the tutorial's wording, kept exactly).
    #[error("Invalid message format")]
    InvalidFormat,
    /// A JSON object without a string `type` field.
    #[error("Missing message type")]
    MissingType,
    /// A `type` this server does not know.
    #[error("Unknown message type: {0}")]
    UnknownType(String),
    /// A known `type` whose fields are missing or of the wrong kind.
    #[error("Invalid {kind} message: {detail}")]
    InvalidFields {
        /// The message's `type`.
        kind: &'static str,
        /// What serde found wrong, e.g. ``missing field `room` ``.
        detail: String,
    },
    /// Well-formed, but a value breaks a configured limit.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

/// Most messages one `history` request may ask for.
pub const MAX_HISTORY_LIMIT: u32 = 100;

/// Longest `since.epoch` a `joinRoom` may carry.
pub const MAX_EPOCH_BYTES: usize = 64;

/// Longest piece of an unknown `type` echoed back in an error, so a peer
/// cannot make error replies as large as its frames.
const MAX_ECHOED_TYPE_CHARS: usize = 64;

impl ProtocolError {
    /// A stable, machine-readable name for the error, sent as `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidFormat => "invalidFormat",
            Self::MissingType => "missingType",
            Self::UnknownType(_) => "unknownType",
            Self::InvalidFields { .. } => "invalidFields",
            Self::Invalid(_) => "invalidValue",
        }
    }

    /// The `error` event that tells the client about this error.
    pub fn to_event(&self) -> ServerMessage {
        ServerMessage::error(self.to_string(), self.code())
    }
}

/// Decodes and validates one text frame from a client.
///
/// Names are returned trimmed. The result is either a message the server can
/// act on without further checks, or the error to report.
pub fn decode_client(text: &str, limits: &Limits) -> Result<ClientMessage, ProtocolError> {
    // serde reads an internally tagged enum from an array too (the tag
    // first: `["setUsername","ada"]`); the protocol takes objects only.
    if !text.trim_start_matches([' ', '\t', '\n', '\r']).starts_with('{') {
        return Err(ProtocolError::InvalidFormat);
    }
    let msg = match serde_json::from_str::<ClientMessage>(text) {
        Ok(msg) => msg,
        Err(err) => return Err(classify(text, &err)),
    };
    Ok(match msg {
        ClientMessage::SetUsername { username } => {
            ClientMessage::SetUsername { username: limits.username(username)? }
        }
        ClientMessage::JoinRoom { room, since } => {
            // Epochs the server hands out are short; anything longer cannot
            // be one of them, and is not worth keeping.
            if since.as_ref().is_some_and(|since| since.epoch.len() > MAX_EPOCH_BYTES) {
                return Err(ProtocolError::InvalidFields {
                    kind: "joinRoom",
                    detail: format!("since.epoch must be at most {MAX_EPOCH_BYTES} bytes"),
                });
            }
            ClientMessage::JoinRoom { room: limits.room(room)?, since }
        }
        ClientMessage::History { before, limit } => {
            if limit.is_some_and(|limit| !(1..=MAX_HISTORY_LIMIT).contains(&limit)) {
                return Err(ProtocolError::InvalidFields {
                    kind: "history",
                    detail: format!("limit must be between 1 and {MAX_HISTORY_LIMIT}"),
                });
            }
            ClientMessage::History { before, limit }
        }
        ClientMessage::ChatMessage { text, client_msg_id } => {
            ClientMessage::ChatMessage { text: limits.text(text)?, client_msg_id }
        }
        ClientMessage::Chat { user, text } => ClientMessage::Chat {
            user: user.map(|u| limits.username(u)).transpose()?,
            text: limits.text(text)?,
        },
        ClientMessage::FileStart { name, size, mime_type, sha256, chunk_size, transfer_id } => {
            ClientMessage::FileStart {
                name: limits.file_name(name)?,
                size,
                mime_type,
                sha256,
                chunk_size,
                transfer_id: transfer_id.map(|id| limits.transfer_id(id)).transpose()?,
            }
        }
        ClientMessage::FileEnd { transfer_id } => {
            ClientMessage::FileEnd { transfer_id: transfer_id.map(|id| limits.transfer_id(id)).transpose()? }
        }
        ClientMessage::FileResume { transfer_id } => {
            ClientMessage::FileResume { transfer_id: limits.transfer_id(transfer_id)? }
        }
        other @ (ClientMessage::LeaveRoom {}
        | ClientMessage::Typing {}
        | ClientMessage::Ping { .. }
        | ClientMessage::Auth { .. }) => other,
    })
}

/// Decodes a server frame, for clients. No limits apply: clients trust the
/// server they chose to connect to, but a malformed frame is still an error,
/// never a panic.
pub fn decode_server(text: &str) -> Result<ServerMessage, ProtocolError> {
    serde_json::from_str(text).map_err(|_| ProtocolError::InvalidFormat)
}

/// Works out why a frame failed to decode as a [`ClientMessage`]. This is the
/// slow path, taken only for bad frames; it re-parses the frame generically.
fn classify(text: &str, err: &serde_json::Error) -> ProtocolError {
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(_) => return ProtocolError::InvalidFormat,
    };
    let Some(object) = value.as_object() else {
        return ProtocolError::InvalidFormat;
    };
    let Some(kind) = object.get("type").and_then(|t| t.as_str()) else {
        return ProtocolError::MissingType;
    };
    match ClientMessage::TYPES.iter().find(|known| **known == kind) {
        Some(known) => ProtocolError::InvalidFields { kind: known, detail: strip_position(err) },
        None => ProtocolError::UnknownType(kind.chars().take(MAX_ECHOED_TYPE_CHARS).collect()),
    }
}

/// serde_json appends " at line L column C", which means nothing to a client
/// that sent a one-line frame.
fn strip_position(err: &serde_json::Error) -> String {
    let text = err.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(text: &str) -> Result<ClientMessage, ProtocolError> {
        decode_client(text, &Limits::default())
    }

    #[test]
    fn tutorial_messages_decode() {
        assert_eq!(
            decode(r#"{"type":"setUsername","username":"ada"}"#).unwrap(),
            ClientMessage::SetUsername { username: "ada".into() }
        );
        assert_eq!(decode(r#"{"type":"leaveRoom"}"#).unwrap(), ClientMessage::LeaveRoom {});
        assert_eq!(decode(r#"{"type":"typing","isTyping":true}"#).unwrap(), ClientMessage::Typing {});
        assert_eq!(
            decode(r#"{"type":"chat","user":"bob","text":"hi"}"#).unwrap(),
            ClientMessage::Chat { user: Some("bob".into()), text: "hi".into() }
        );
        assert_eq!(
            decode(r#"{"type":"ping","timestamp":1700000000000}"#).unwrap(),
            ClientMessage::Ping { timestamp: 1_700_000_000_000_u64.into() }
        );
        assert_eq!(
            decode(r#"{"type":"fileStart","name":"a.txt","size":3,"mimeType":"text/plain"}"#).unwrap(),
            ClientMessage::FileStart {
                name: "a.txt".into(),
                size: 3,
                mime_type: "text/plain".into(),
                sha256: None,
                chunk_size: None,
                transfer_id: None
            }
        );
        assert_eq!(decode(r#"{"type":"fileEnd"}"#).unwrap(), ClientMessage::FileEnd { transfer_id: None });
    }

    #[test]
    fn every_kind_of_bad_frame_has_its_error() {
        for bad in ["", "nope", "[1,2]", "42", "\"text\"", "null", "{\"type\":", r#"["setUsername","ada"]"#] {
            assert_eq!(decode(bad).unwrap_err(), ProtocolError::InvalidFormat, "{bad:?}");
        }
        assert_eq!(decode(r#"{"text":"x"}"#).unwrap_err(), ProtocolError::MissingType);
        assert_eq!(decode(r#"{"type":7}"#).unwrap_err(), ProtocolError::MissingType);
        let unknown = decode(r#"{"type":"dance"}"#).unwrap_err();
        assert_eq!(unknown.to_string(), "Unknown message type: dance");
        assert_eq!(
            decode(r#"{"type":"joinRoom"}"#).unwrap_err().to_string(),
            "Invalid joinRoom message: missing field `room`"
        );
        assert_eq!(
            decode(r#"{"type":"setUsername","username":"  "}"#).unwrap_err().to_string(),
            "Invalid username: must not be empty"
        );
        let long_type = format!(r#"{{"type":"{}"}}"#, "x".repeat(1000));
        match decode(&long_type).unwrap_err() {
            ProtocolError::UnknownType(t) => assert_eq!(t.len(), MAX_ECHOED_TYPE_CHARS),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn error_events_carry_message_and_code() {
        assert_eq!(
            ProtocolError::InvalidFormat.to_event().to_json(),
            r#"{"type":"error","message":"Invalid message format","code":"invalidFormat"}"#
        );
    }
}
