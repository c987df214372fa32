//! What the client tells the application: everything the server said that
//! matters, and what happened to the connection.

use std::time::Duration;

use futures_util::Stream;
use tokio::sync::mpsc;
use uuid::Uuid;

/// One thing that happened, in the order it happened.
///
/// Connection events come from the client itself; the others are the
/// server's messages, typed. New variants may be added, so match with a
/// wildcard arm.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The link is up and, after a reconnect, the username and room are
    /// restored; queued commands are being sent. Emitted for the first
    /// connection and after every reconnection.
    Connected {
        /// The id the server gave this connection.
        client_id: Uuid,
        /// The server URL the client is connected to: one of those given to
        /// [`Client::connect_any`](crate::Client::connect_any), which may
        /// differ from one connection to the next.
        url: String,
    },
    /// The link went down: the server closed it (`code` from its close
    /// frame), it broke (1006), the heartbeat found it dead (1006), or
    /// [`Client::disconnect`](crate::Client::disconnect) closed it (1000).
    Disconnected {
        /// The WebSocket close code; 1006 when there was no close frame.
        code: u16,
        /// The close reason, or what broke.
        reason: String,
    },
    /// A reconnect attempt will be made after `delay`. With several server
    /// URLs, an attempt tries each of them once, in turn, without waiting
    /// in between.
    Reconnecting {
        /// The attempt's number since the link was lost, from 1.
        attempt: u32,
        /// How long the client waits before the attempt.
        delay: Duration,
    },
    /// Every reconnect attempt allowed by the policy failed; the client has
    /// stopped and the event stream ends.
    GaveUp {
        /// How many attempts were made.
        attempts: u32,
    },
    /// The server confirmed the username.
    UsernameSet {
        /// The name as the server stored it (trimmed).
        username: String,
    },
    /// This client joined a room (also again after every reconnect).
    RoomJoined {
        /// The room.
        room: String,
        /// Its members, this client included.
        user_count: usize,
        /// The room's epoch, when the server keeps history: offsets are only
        /// comparable within one epoch.
        epoch: Option<String>,
        /// The newest offset the room had at the join (0 for none), when the
        /// server keeps history. Messages with an offset up to this one that
        /// follow the event are missed ones being replayed; live messages
        /// have greater offsets.
        offset: Option<u64>,
        /// How many missed messages the server replays right after this
        /// event (0 when nothing was missed or nothing could be recovered).
        /// Replayed messages this client has already seen, its own
        /// included, are left out, so fewer may arrive.
        missed: u64,
    },
    /// The client rejoined a room it had been in, but the server could not
    /// replay what it missed (too much of it, history trimmed or lost: a new
    /// epoch). Follows [`Event::RoomJoined`]. Messages between what the
    /// client delivered and the join are not delivered; fetch them with
    /// [`Client::history`](crate::Client::history).
    RecoveryFailed {
        /// The room.
        room: String,
        /// The room's epoch now; different from before when its history was
        /// lost.
        epoch: String,
        /// The room's newest offset at the join; live messages follow it.
        offset: u64,
    },
    /// The server restarted a room's stream under this client: what
    /// follows is no longer continuous with the messages it delivered (in a
    /// cluster, the room's history was lost and a new epoch began, or the
    /// node could not replay everything the client missed). The client now
    /// counts from `{epoch, offset}`: live messages with offsets above
    /// `offset` follow, and a later rejoin asks for what came after it.
    /// Messages up to `offset` were not all delivered; an application that
    /// shows history fetches it again with
    /// [`Client::history`](crate::Client::history) (the newest page is
    /// `history(Some(offset + 1), …)`).
    Resync {
        /// The room.
        room: String,
        /// The room's epoch from now on.
        epoch: String,
        /// The room's newest offset now; live messages follow it.
        offset: u64,
    },
    /// This client left its room.
    RoomLeft {
        /// The room.
        room: String,
    },
    /// Someone (this client included) joined the room.
    UserJoined {
        /// Who.
        user: String,
        /// The room.
        room: String,
        /// Members after the join.
        user_count: usize,
    },
    /// Someone left the room or disconnected.
    UserLeft {
        /// Who.
        user: String,
        /// The room, when the server says.
        room: Option<String>,
        /// Members after the departure.
        user_count: usize,
    },
    /// Another member of the room changed its name.
    UserRenamed {
        /// The new name.
        user: String,
        /// The name it had before.
        previous: String,
        /// The room.
        room: String,
    },
    /// Someone in the room is typing.
    UserTyping {
        /// Who.
        user: String,
    },
    /// A room message from another member, live or replayed after a
    /// reconnect. Each is delivered once: a message whose `client_msg_id`
    /// or (within the room's epoch) `offset` was already delivered is not
    /// delivered again.
    Message {
        /// The sender's name.
        user: String,
        /// The text, verbatim.
        text: String,
        /// When the server received it, in milliseconds since the Unix epoch.
        timestamp: u64,
        /// The sender's id for the message, when it gave one.
        client_msg_id: Option<Uuid>,
        /// The message's place in the room's stream, when the server keeps
        /// history.
        offset: Option<u64>,
    },
    /// The server accepted one of this client's messages; it will not be
    /// resent.
    MessageAcked {
        /// The id [`Client::send_message`](crate::Client::send_message) returned.
        client_msg_id: Uuid,
        /// When the room received it.
        timestamp: u64,
        /// The message's place in the room's stream, when the server keeps
        /// history.
        offset: Option<u64>,
    },
    /// The server answered one of this client's messages with an `error`
    /// (reported as [`Event::Error`] before this) instead of an ack; it will
    /// not be resent.
    MessageRejected {
        /// The id [`Client::send_message`](crate::Client::send_message) returned.
        client_msg_id: Uuid,
    },
    /// A lobby broadcast, sent to every connected client.
    LobbyChat {
        /// The sender's name.
        user: String,
        /// The text.
        text: String,
    },
    /// The answer to [`Client::ping`](crate::Client::ping).
    Latency {
        /// The round-trip time, measured with the monotonic clock.
        rtt: Duration,
    },
    /// The server refused something this client sent.
    Error {
        /// What went wrong, for humans.
        message: String,
        /// A stable machine-readable code, when the server gives one.
        code: Option<String>,
    },
    /// How far an upload has come, as the server counts stored bytes.
    FileProgress {
        /// The id [`Client::send_file`](crate::Client::send_file) returned.
        transfer_id: String,
        /// Bytes the server has stored.
        received_bytes: u64,
        /// The file's size.
        size: u64,
    },
    /// An upload is complete, verified and downloadable.
    FileSaved {
        /// The id [`Client::send_file`](crate::Client::send_file) returned.
        transfer_id: String,
        /// The stored file's id.
        file_id: String,
        /// The file's name as stored.
        name: String,
        /// Size in bytes.
        size: u64,
        /// Media type it is served with.
        mime_type: String,
        /// Lower-case hex SHA-256 of the stored bytes.
        sha256: String,
        /// Server-relative download URL.
        url: String,
    },
    /// An upload failed and will not be retried.
    FileFailed {
        /// The id [`Client::send_file`](crate::Client::send_file) returned.
        transfer_id: String,
        /// Why, for humans.
        message: String,
    },
    /// The server accepted the token given in the URL (`?token=`); on a
    /// server that requires tokens, it names this client.
    Authenticated {
        /// The username the token grants.
        user: String,
        /// When the token expires, in milliseconds since the Unix epoch.
        expires_at: u64,
    },
    /// The token expires soon; the server closes the connection then.
    AuthExpiring {
        /// When the token expires, in milliseconds since the Unix epoch.
        expires_at: u64,
    },
    /// Someone in the room shared a file.
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
        /// The share's place in the room's stream, when the server keeps
        /// history.
        offset: Option<u64>,
    },
}

/// The client's events, in order. Ends when the client stops for good:
/// after [`Client::disconnect`](crate::Client::disconnect), after a close it
/// does not retry, or after [`Event::GaveUp`].
///
/// Read it steadily: when [`ClientConfig::event_buffer`](crate::ClientConfig::event_buffer)
/// events are waiting, the client stops reading from the server. It is also
/// a [`Stream`].
#[derive(Debug)]
pub struct EventStream {
    /// Filled by the connection task.
    rx: mpsc::Receiver<Event>,
}

impl EventStream {
    pub(crate) fn new(rx: mpsc::Receiver<Event>) -> Self {
        Self { rx }
    }

    /// The next event, or `None` once the client has stopped. Cancel safe.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl Stream for EventStream {
    type Item = Event;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}
