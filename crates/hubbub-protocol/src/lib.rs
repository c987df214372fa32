//! Hubbub's wire protocol: every message a chat client and the server
//! exchange, as Rust types, with their JSON codec and validation.
//!
//! The protocol is a superset of the classic Node.js `ws` chat tutorial's:
//! every frame is a JSON object with a `type` tag and camelCase fields, and a
//! client written for that tutorial works unchanged. Everything Hubbub adds is
//! a new optional field or a new message type, which such clients ignore.
//!
//! This crate does no IO and reads no clock: it turns text into
//! [`ClientMessage`]s (checking them against configurable [`Limits`]) and
//! [`ServerMessage`]s into text. The server and the clients drive it.
//!
//! ```
//! use hubbub_protocol::{decode_client, ClientMessage, Limits, ServerMessage};
//!
//! let limits = Limits::default();
//! let msg = decode_client(r#"{"type":"joinRoom","room":"  general "}"#, &limits).unwrap();
//! assert_eq!(msg, ClientMessage::JoinRoom { room: "general".into(), since: None });
//!
//! // Hubbub's additions are left out when absent: this is the tutorial's shape.
//! let reply = ServerMessage::RoomJoined {
//!     room: "general".into(),
//!     user_count: 1,
//!     epoch: None,
//!     offset: None,
//!     recovered: None,
//!     missed: None,
//! };
//! assert_eq!(reply.to_json(), r#"{"type":"roomJoined","room":"general","userCount":1}"#);
//!
//! let err = decode_client("not json", &limits).unwrap_err();
//! assert_eq!(err.to_string(), "Invalid message format");
//! ```

pub mod chunk;
mod decode;
mod id;
mod limits;
mod message;

pub use decode::{MAX_EPOCH_BYTES, MAX_HISTORY_LIMIT, ProtocolError, decode_client, decode_server};
pub use id::{ClientMsgId, InvalidClientMsgId};
pub use limits::{Limits, LimitsError, ValidationError, is_bidi_control};
pub use message::{ClientMessage, ServerMessage, Since};

/// Re-exported so users of the protocol types need not depend on `serde_json`
/// just to build a `ping` timestamp.
pub use serde_json::Number;
