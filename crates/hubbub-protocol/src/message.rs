//! The message types of the chat protocol, one enum per direction.
//!
//! The JSON shape is fixed by serde attributes: the variant name in camelCase
//! is the `type` tag, fields are camelCase. Optional fields that Hubbub adds
//! to the tutorial's messages are skipped when absent, so the encoded form of
//! a tutorial message is exactly what the tutorial sends.

use serde::{Deserialize, Serialize};
use serde_json::Number;
use uuid::Uuid;

use crate::ClientMsgId;

/// A position in a room's stream: the newest offset a client has, in an
/// epoch (Hubbub addition).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Since {
    /// The room's epoch, as the server sent it.
    pub epoch: String,
    /// The newest offset the client has (0 for none).
    pub offset: u64,
}

/// A message a chat client sends to the server (a text frame on `/ws/chat`).
///
/// Unknown fields are ignored, so clients may send more than listed here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum ClientMessage {
    /// Choose the name shown on this connection's messages.
    SetUsername {
        /// The requested name; trimmed and validated by [`crate::decode_client`].
        username: String,
    },
    /// Join a room, leaving the current one first; the room is created if new.
    JoinRoom {
        /// The room's name; trimmed and validated like a username.
        room: String,
        /// Where the client's copy of the room ends, to get what it missed
        /// (Hubbub addition).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<Since>,
    },
    /// Leave the current room.
    LeaveRoom {},
    /// Send a message to the other members of the current room.
    ChatMessage {
        /// The message text.
        text: String,
        /// A client-chosen id (Hubbub addition). When present, the server
        /// answers with [`ServerMessage::MessageAck`] and delivers a message
        /// resent with the same id only once. Any spelling of a UUID; it
        /// comes back spelled the same.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<ClientMsgId>,
    },
    /// Tell the other members of the room that this user is typing.
    Typing {},
    /// The tutorial's lobby broadcast: sent to every connected chat client.
    Chat {
        /// The sender's name as the client sees it; the server prefers the
        /// name set with `setUsername` when there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// The message text.
        text: String,
    },
    /// Application-level ping; answered with [`ServerMessage::Pong`].
    Ping {
        /// The client's clock reading, echoed back unchanged.
        timestamp: Number,
    },
    /// Begin a file upload; binary chunk frames follow.
    FileStart {
        /// The file's name as the user chose it.
        name: String,
        /// The file's size in bytes.
        size: u64,
        /// The file's media type; browsers send an empty string when unknown.
        #[serde(default)]
        mime_type: String,
        /// Lower- or upper-case hex SHA-256 of the whole file, checked at
        /// `fileEnd` (Hubbub addition).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
        /// Size of every chunk but the last (Hubbub addition; default 65,536).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        chunk_size: Option<u32>,
        /// A client-chosen id, to resume the upload after a reconnect
        /// (Hubbub addition). The server makes one up when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transfer_id: Option<String>,
    },
    /// Complete the current file upload.
    FileEnd {
        /// Which upload, for clients that name it (Hubbub addition).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transfer_id: Option<String>,
    },
    /// Present a token (JWT) when the server requires one, as the first
    /// message, or later to refresh an expiring one (Hubbub addition).
    Auth {
        /// The token.
        token: String,
    },
    /// Ask for earlier messages of the current room (Hubbub addition).
    History {
        /// Only messages with an offset below this one; the newest when
        /// absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        /// How many, 1 to 100; 50 when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Ask where an interrupted upload stands, to continue it on this
    /// connection (Hubbub addition). Binary frames that follow belong to it.
    FileResume {
        /// The id the upload was started with.
        transfer_id: String,
    },
}

impl ClientMessage {
    /// Every `type` tag a client may send, in the order of the protocol table.
    pub const TYPES: &'static [&'static str] = &[
        "setUsername",
        "joinRoom",
        "leaveRoom",
        "chatMessage",
        "typing",
        "chat",
        "ping",
        "fileStart",
        "fileEnd",
        "fileResume",
        "auth",
        "history",
    ];

    /// The message's `type` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::SetUsername { .. } => "setUsername",
            Self::JoinRoom { .. } => "joinRoom",
            Self::LeaveRoom {} => "leaveRoom",
            Self::ChatMessage { .. } => "chatMessage",
            Self::Typing {} => "typing",
            Self::Chat { .. } => "chat",
            Self::Ping { .. } => "ping",
            Self::FileStart { .. } => "fileStart",
            Self::FileEnd { .. } => "fileEnd",
            Self::FileResume { .. } => "fileResume",
            Self::Auth { .. } => "auth",
            Self::History { .. } => "history",
        }
    }

    /// Encodes the message as the JSON text a client sends.
    pub fn to_json(&self) -> String {
        // Serialization cannot fail: every field is a string, a number or a
        // unit, and there are no maps with non-string keys.
        serde_json::to_string(self).expect("client messages always serialize")
    }
}

/// A message the server sends to a client, on `/ws/chat` or
/// `/ws/notifications`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum ServerMessage {
    /// The first frame on a new chat connection.
    Welcome {
        /// A greeting for humans.
        message: String,
    },
    /// Sent right after `welcome`: the id the server gave this connection.
    Connected {
        /// A random (v4) UUID, unique per connection.
        client_id: Uuid,
    },
    /// Something the client sent was refused. The connection stays open.
    Error {
        /// What went wrong, for humans. `Invalid message format` for a frame
        /// that is not a JSON object, as in the tutorial.
        message: String,
        /// A stable machine-readable code (Hubbub addition).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
        /// With code `rateLimited`: how long to wait before sending again
        /// (Hubbub addition).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// Reply to `setUsername`, with the name as stored (trimmed).
    UsernameSet {
        /// The name now in effect.
        username: String,
    },
    /// Someone joined the room; sent to every member, the joiner included.
    UserJoined {
        /// The joiner's name.
        user: String,
        /// The room joined.
        room: String,
        /// Members after the join.
        user_count: usize,
    },
    /// Sent to the joiner after `userJoined`.
    RoomJoined {
        /// The room joined.
        room: String,
        /// Members after the join.
        user_count: usize,
        /// The room's epoch, when the server keeps history (Hubbub addition).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
        /// The newest kept offset at the join, 0 for none (Hubbub addition).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        /// With `since`: whether the missed messages follow (Hubbub addition).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        /// With `recovered: true`: how many missed messages follow.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        missed: Option<u64>,
    },
    /// Someone left the room (or disconnected); sent to those who remain.
    UserLeft {
        /// The leaver's name.
        user: String,
        /// Members after the departure.
        user_count: usize,
        /// The room left (Hubbub addition).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        room: Option<String>,
    },
    /// A member of the room changed its name with `setUsername`; sent to
    /// the room's other members (Hubbub addition).
    UserRenamed {
        /// The name now in effect.
        user: String,
        /// The name the member had before.
        previous: String,
        /// The room the member is in.
        room: String,
    },
    /// The room's history was lost and started again (a cluster's Redis
    /// restarted without persistence), or a member's node could not give it
    /// every message it missed: what the member holds of the room is no longer
    /// continuous with what follows. Clients drop their position, take
    /// `{epoch, offset}` as the new one and fetch the room's history again
    /// (Hubbub addition).
    Resync {
        /// The room.
        room: String,
        /// The room's epoch from now on.
        epoch: String,
        /// The newest offset delivered before live messages continue.
        offset: u64,
    },
    /// Reply to `leaveRoom` for the leaver (Hubbub addition).
    RoomLeft {
        /// The room left.
        room: String,
    },
    /// A room message, delivered to the room's members except its sender.
    ChatMessage {
        /// The sender's name.
        user: String,
        /// The message text.
        text: String,
        /// When the server received it, in milliseconds since the Unix epoch.
        timestamp: u64,
        /// The sender's id for the message, when it gave one (Hubbub
        /// addition), so receivers can drop a copy they have already shown.
        /// Spelled as the sender spelled it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<ClientMsgId>,
        /// The message's place in the room's stream (Hubbub addition).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
    },
    /// Tells the sender its `chatMessage` with this id was accepted (Hubbub
    /// addition). Sent again, with the same timestamp, for a resend.
    MessageAck {
        /// The id from the `chatMessage`, spelled as it was there.
        client_msg_id: ClientMsgId,
        /// The timestamp the room received with the message.
        timestamp: u64,
        /// The message's offset in the room's stream (Hubbub addition).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
    },
    /// A member of the room is typing.
    UserTyping {
        /// Who is typing.
        user: String,
    },
    /// A lobby broadcast, delivered to every chat client.
    Chat {
        /// The sender's name.
        user: String,
        /// The message text.
        text: String,
    },
    /// Reply to `ping`.
    Pong {
        /// The client's timestamp, echoed unchanged.
        timestamp: Number,
        /// The server's clock, in milliseconds since the Unix epoch.
        server_time: u64,
    },
    /// Answer to `fileStart` or `fileResume`: send the chunks (Hubbub
    /// addition).
    FileAccepted {
        /// The upload's id (the client's, or one the server made up).
        transfer_id: String,
        /// Size of every chunk but the last.
        chunk_size: u32,
        /// Largest file the server accepts, in bytes.
        max_size: u64,
    },
    /// An upload failed or was refused; the connection and its chat go on
    /// (Hubbub addition).
    FileError {
        /// The upload's id, when one was known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transfer_id: Option<String>,
        /// What went wrong, for humans.
        message: String,
    },
    /// How far an upload has come; at most every 10 % or every second
    /// (Hubbub addition).
    FileProgress {
        /// The upload's id.
        transfer_id: String,
        /// Bytes stored so far.
        received_bytes: u64,
        /// The declared size.
        size: u64,
    },
    /// Answer to `fileEnd`: the file is stored, verified and downloadable
    /// (Hubbub addition).
    FileSaved {
        /// The stored file's id.
        file_id: String,
        /// The file's name, made safe.
        name: String,
        /// Size in bytes.
        size: u64,
        /// Media type it is served with.
        mime_type: String,
        /// Lower-case hex SHA-256 of the stored bytes.
        sha256: String,
        /// Server-relative download URL, `/files/{fileId}`.
        url: String,
        /// The upload's id.
        transfer_id: String,
        /// The offset of the room's `fileShared` for this file, when the
        /// uploader is in a room and the server keeps history (Hubbub
        /// addition), so the uploader counts its own share as received.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
    },
    /// A member of the room shared a file (Hubbub addition).
    FileShared {
        /// Who uploaded it.
        user: String,
        /// The stored file's id.
        file_id: String,
        /// The file's name.
        name: String,
        /// Size in bytes.
        size: u64,
        /// Media type.
        mime_type: String,
        /// Server-relative download URL.
        url: String,
        /// The share's place in the room's stream (Hubbub addition).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
    },
    /// Answer to `history`: earlier messages of the room, oldest first,
    /// each exactly as it was broadcast (Hubbub addition).
    History {
        /// The room.
        room: String,
        /// The room's epoch.
        epoch: String,
        /// The messages, oldest first.
        messages: Vec<serde_json::Value>,
        /// Whether there are older ones.
        has_more: bool,
    },
    /// Answer to `fileResume`: which chunks the server already has, as
    /// half-open ranges `[start, end)` of chunk indices (Hubbub addition).
    FileResumeState {
        /// The upload's id.
        transfer_id: String,
        /// Size of every chunk but the last.
        chunk_size: u32,
        /// Chunk index ranges already stored, sorted and disjoint.
        received_chunks: Vec<[u32; 2]>,
    },
    /// The token was accepted (Hubbub addition).
    Authenticated {
        /// The username the token grants.
        user: String,
        /// When the token expires, in milliseconds since the Unix epoch.
        expires_at: u64,
    },
    /// The token expires soon: send a fresh `auth {token}` or be closed
    /// with 4001 at `expiresAt` (Hubbub addition).
    AuthExpiring {
        /// When the token expires, in milliseconds since the Unix epoch.
        expires_at: u64,
    },
    /// Notification feed: a room came into existence.
    RoomCreated {
        /// The new room.
        room: String,
    },
    /// Notification feed: the last member left a room and it was removed.
    RoomRemoved {
        /// The removed room.
        room: String,
    },
    /// Notification feed: the server is about to shut down.
    ServerShutdown {
        /// A notice for humans.
        message: String,
    },
}

impl ServerMessage {
    /// Builds an `error` event from anything displayable, with a code.
    pub fn error(message: impl Into<String>, code: &str) -> Self {
        Self::Error { message: message.into(), code: Some(code.to_owned()), retry_after_ms: None }
    }

    /// Encodes the message as JSON text.
    pub fn to_json(&self) -> String {
        // Serialization cannot fail: see `ClientMessage::to_json`.
        serde_json::to_string(self).expect("server messages always serialize")
    }
}
