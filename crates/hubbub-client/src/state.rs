//! The client's state, sans-IO: what the server has been told, what waits to
//! be sent, what waits for an ack, and what came back.
//!
//! The connection task feeds it commands, server messages and link changes,
//! stamped with a `now` from its clock, and writes out what it asks to send.
//! Nothing here touches a socket or reads a clock, so the unit tests below
//! drive reconnections, restores, resends and recoveries directly.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use hubbub_protocol::{ClientMessage, Limits, ServerMessage};
use uuid::Uuid;

use crate::error::{ClientError, Result};
use crate::history::{HistoryPage, Joined, Streams, room_event};
use crate::upload::{Prepared, Send, Uploads};
use crate::{Event, SendRate};

/// What the application asked for (the command half of the handle).
#[derive(Debug)]
pub(crate) enum Op {
    SetUsername(String),
    JoinRoom(String),
    LeaveRoom,
    SendMessage(String),
    Typing,
    LobbyChat(String),
    Ping,
    SendFile(Prepared),
    History { before: Option<u64>, limit: u32 },
}

/// The answer to an [`Op`].
#[derive(Debug, PartialEq)]
pub(crate) enum Reply {
    Done,
    MessageId(Uuid),
    TransferId(String),
    /// The answer comes later, from [`ClientState::poll_answer`] with this
    /// token.
    Pending(u64),
    History(HistoryPage),
}

/// What the server should know about this client: restored on a new link.
#[derive(Clone, Debug, Default, PartialEq)]
struct Session {
    username: Option<String>,
    room: Option<String>,
}

/// A command kept until it can be written.
#[derive(Debug)]
enum Queued {
    SetUsername(String),
    JoinRoom(String),
    LeaveRoom,
    Chat {
        id: Uuid,
        text: String,
    },
    LobbyChat(String),
    /// Queued only behind paced chat on a live link, so that it reaches the
    /// room the commands before it lead to.
    History {
        token: u64,
        before: Option<u64>,
        limit: u32,
    },
}

impl Queued {
    /// Chat messages are paced; other commands only wait their turn.
    fn is_chat(&self) -> bool {
        matches!(self, Self::Chat { .. } | Self::LobbyChat(_))
    }
}

/// A chat message written but not acknowledged.
#[derive(Debug)]
struct Unacked {
    id: Uuid,
    text: String,
    /// The room it was written to, so a resend goes to the same room.
    room: Option<String>,
    /// The link it was last written on and its place there, to tell which
    /// messages a barrier covers.
    written: (u64, u64),
}

/// Where the current link stands.
#[derive(Debug)]
enum Phase {
    /// No link.
    Offline,
    /// Linked; waiting for `connected {clientId}`.
    Greeting,
    /// The session was sent again; waiting for this many replies.
    Restoring { client_id: Uuid, replies_due: usize, room: Option<String> },
    /// Restored: commands go straight out.
    Live,
}

/// Ids of recently received messages, oldest forgotten first.
#[derive(Debug)]
struct SeenIds {
    capacity: usize,
    order: VecDeque<Uuid>,
    set: HashSet<Uuid>,
}

impl SeenIds {
    fn new(capacity: usize) -> Self {
        Self { capacity, order: VecDeque::new(), set: HashSet::new() }
    }

    /// Records `id`; false when it was already there.
    fn insert(&mut self, id: Uuid) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
        true
    }
}

/// Tokens for the application's own pings start here, far above the
/// heartbeat's (which count from 1), so a pong is never taken for the other
/// kind.
const USER_PING_BASE: u64 = 1 << 48;

/// Tokens of history requests start here; each is also the token of the
/// ping written after the request (see [`PendingHistory`]).
const HISTORY_BASE: u64 = 1 << 50;

/// Tokens of barrier pings (see [`Barrier`]) start here.
const BARRIER_BASE: u64 = 1 << 52;

/// The error code of a message the server dropped for its rate limit.
const RATE_LIMITED: &str = "rateLimited";

/// The error code of a message the server could not store (its history
/// store cannot write): like [`RATE_LIMITED`], try again after the delay.
const UNAVAILABLE: &str = "unavailable";

/// A `history` request written and not answered. A ping with the same token
/// follows it: the server answers in order, so a pong that comes first
/// means the request was answered with an `error` instead.
#[derive(Debug)]
struct PendingHistory {
    token: u64,
    /// The first `error` that came while the request waited, to tell the
    /// application why it was refused.
    error: Option<String>,
}

/// A ping sent after an `error` while messages await their acks. The server
/// answers every message in order, and a `chatMessage` with an ack or an
/// error, so when the barrier's pong comes back, a message written before it
/// and still unacknowledged got an error.
#[derive(Debug)]
struct Barrier {
    token: u64,
    /// The place on the link of the last message written before it.
    upto: u64,
}

/// Paces chat writes with a token bucket, and holds them while the server
/// asks the client to slow down.
#[derive(Debug)]
struct Pacer {
    rate: Option<SendRate>,
    tokens: f64,
    updated: Option<Instant>,
    paused_until: Option<Instant>,
}

impl Pacer {
    fn new(rate: Option<SendRate>) -> Self {
        let tokens = rate.map_or(0.0, |r| f64::from(r.burst));
        Self { rate, tokens, updated: None, paused_until: None }
    }

    /// `None` when a message may go now, else when one may.
    fn ready_at(&mut self, now: Instant) -> Option<Instant> {
        if let Some(until) = self.paused_until {
            if until > now {
                return Some(until);
            }
            self.paused_until = None;
        }
        let rate = self.rate?;
        if let Some(updated) = self.updated {
            let earned = now.saturating_duration_since(updated).as_secs_f64() * rate.per_second;
            self.tokens = (self.tokens + earned).min(f64::from(rate.burst));
        }
        self.updated = Some(now);
        if self.tokens >= 1.0 {
            return None;
        }
        let wait = Duration::try_from_secs_f64((1.0 - self.tokens) / rate.per_second)
            .unwrap_or(Duration::from_secs(1));
        Some(now + wait)
    }

    fn take(&mut self) {
        if self.rate.is_some() {
            self.tokens -= 1.0;
        }
    }

    fn pause_until(&mut self, until: Instant) {
        self.paused_until = Some(self.paused_until.map_or(until, |at| at.max(until)));
    }
}

/// The limits a [`ClientState`] enforces.
#[derive(Clone, Debug)]
pub(crate) struct StateLimits {
    pub(crate) queue_capacity: usize,
    pub(crate) upload_queue: usize,
    pub(crate) seen_message_ids: usize,
    pub(crate) chunk_size: u32,
    pub(crate) send_rate: Option<SendRate>,
    pub(crate) protocol: Limits,
}

/// Everything the client remembers across links.
#[derive(Debug)]
pub(crate) struct ClientState {
    limits: StateLimits,
    phase: Phase,
    /// The username and room per what was written on links so far: what a
    /// new link must restore before anything else is sent.
    session: Session,
    /// The username and room once every accepted command has taken effect:
    /// what new commands are checked against.
    intended: Session,
    /// Commands not yet written, in order: accepted while the link was
    /// down, or held by the pacer.
    queue: VecDeque<Queued>,
    /// Paces chat writes.
    pacer: Pacer,
    /// When the pacer lets the queue move again, if it is waiting.
    wake_at: Option<Instant>,
    /// The outstanding barrier ping, if any.
    barrier: Option<Barrier>,
    next_barrier: u64,
    /// Whether a `rateLimited` or `unavailable` error came since the last
    /// barrier: the messages it finds unanswered are then sent again, not
    /// given up.
    retry_later: bool,
    /// Messages written and not acknowledged, in the order written.
    unacked: VecDeque<Unacked>,
    /// Received message ids, to drop a message seen before.
    seen: SeenIds,
    /// Where the client's copy of each room's stream ends.
    streams: Streams,
    /// History requests written, oldest first.
    history: VecDeque<PendingHistory>,
    next_history: u64,
    /// Answers to [`Reply::Pending`] commands, in order.
    answers: VecDeque<(u64, Result<Reply>)>,
    /// File uploads.
    uploads: Uploads,
    /// The application's pings awaiting their pong: token -> when sent.
    pings: HashMap<u64, Instant>,
    next_ping: u64,
    /// Counts links, to tell which link a message was written on.
    link: u64,
    /// The server URL of the current (or last) link, for [`Event::Connected`].
    url: String,
    /// Counts messages written on the current link.
    written: u64,
    /// Frames to write, in order.
    outgoing: VecDeque<Send>,
    /// Events to emit, in order.
    events: VecDeque<Event>,
}

impl ClientState {
    pub(crate) fn new(limits: StateLimits) -> Self {
        Self {
            phase: Phase::Offline,
            session: Session::default(),
            intended: Session::default(),
            queue: VecDeque::new(),
            pacer: Pacer::new(limits.send_rate),
            wake_at: None,
            barrier: None,
            next_barrier: BARRIER_BASE,
            retry_later: false,
            unacked: VecDeque::new(),
            seen: SeenIds::new(limits.seen_message_ids),
            streams: Streams::default(),
            history: VecDeque::new(),
            next_history: HISTORY_BASE,
            answers: VecDeque::new(),
            uploads: Uploads::new(limits.chunk_size),
            pings: HashMap::new(),
            next_ping: USER_PING_BASE,
            link: 0,
            url: String::new(),
            written: 0,
            outgoing: VecDeque::new(),
            events: VecDeque::new(),
            limits,
        }
    }

    /// True once the session is restored on the current link.
    pub(crate) fn is_live(&self) -> bool {
        matches!(self.phase, Phase::Live)
    }

    /// The next frame to write.
    pub(crate) fn poll_send(&mut self) -> Option<Send> {
        self.outgoing.pop_front()
    }

    /// The next event to emit.
    pub(crate) fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next late answer to a command that got [`Reply::Pending`].
    pub(crate) fn poll_answer(&mut self) -> Option<(u64, Result<Reply>)> {
        self.answers.pop_front()
    }

    /// When [`ClientState::on_timeout`] should be called: the pacer will let
    /// a queued message go.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        if self.is_live() { self.wake_at } else { None }
    }

    /// The time from [`ClientState::poll_timeout`] has come.
    pub(crate) fn on_timeout(&mut self, now: Instant) {
        self.drain(now);
    }

    /// Whether an upload has a chunk (or a control message) to send.
    pub(crate) fn wants_upload_send(&self) -> bool {
        self.is_live() && self.uploads.wants_to_send()
    }

    /// Queues the next upload frame; call when the link has room.
    pub(crate) fn upload_step(&mut self) {
        if self.is_live()
            && let Some(send) = self.uploads.next_send()
        {
            self.outgoing.push_back(send);
        }
    }

    /// A new link to the server at `url` is open; the server greets first.
    pub(crate) fn on_link_up(&mut self, url: &str) {
        self.phase = Phase::Greeting;
        url.clone_into(&mut self.url);
        self.link += 1;
        self.written = 0;
    }

    /// The link is gone. Unsent frames are dropped: everything that matters
    /// is still held (session, queue, unacked messages, uploads).
    pub(crate) fn on_link_lost(&mut self) {
        self.phase = Phase::Offline;
        self.outgoing.clear();
        self.pings.clear();
        self.barrier = None;
        self.retry_later = false;
        self.wake_at = None;
        self.uploads.on_link_lost();
        self.streams.on_link_lost();
        // History requests are not carried over to the next link: the
        // application asks again if it still wants the page.
        for pending in std::mem::take(&mut self.history) {
            self.answers.push_back((pending.token, Err(ClientError::NotConnected)));
        }
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for queued in std::mem::take(&mut self.queue) {
            match queued {
                Queued::History { token, .. } => {
                    self.answers.push_back((token, Err(ClientError::NotConnected)))
                }
                other => kept.push_back(other),
            }
        }
        self.queue = kept;
    }

    /// A command from the application.
    pub(crate) fn command(&mut self, op: Op, now: Instant) -> Result<Reply> {
        let limits = &self.limits.protocol;
        match op {
            Op::SetUsername(name) => {
                let name = limits.username(name)?;
                self.admit(false)?;
                self.intended.username = Some(name.clone());
                self.submit(Queued::SetUsername(name), now);
            }
            Op::JoinRoom(room) => {
                let room = limits.room(room)?;
                self.admit(false)?;
                self.intended.room = Some(room.clone());
                self.submit(Queued::JoinRoom(room), now);
            }
            Op::LeaveRoom => {
                if self.intended.room.is_none() {
                    return Err(ClientError::NotInRoom);
                }
                self.admit(false)?;
                self.intended.room = None;
                self.submit(Queued::LeaveRoom, now);
            }
            Op::SendMessage(text) => {
                let text = limits.text(text)?;
                if self.intended.room.is_none() {
                    return Err(ClientError::NotInRoom);
                }
                self.admit(true)?;
                let id = Uuid::new_v4();
                self.submit(Queued::Chat { id, text }, now);
                return Ok(Reply::MessageId(id));
            }
            Op::Typing => {
                if !self.is_live() {
                    return Err(ClientError::NotConnected);
                }
                if self.intended.room.is_none() {
                    return Err(ClientError::NotInRoom);
                }
                self.send(ClientMessage::Typing {});
            }
            Op::LobbyChat(text) => {
                let text = limits.text(text)?;
                self.admit(false)?;
                self.submit(Queued::LobbyChat(text), now);
            }
            Op::Ping => {
                if !self.is_live() {
                    return Err(ClientError::NotConnected);
                }
                if self.pings.len() >= self.limits.queue_capacity {
                    return Err(ClientError::QueueFull { capacity: self.limits.queue_capacity });
                }
                let token = self.next_ping;
                self.next_ping += 1;
                self.pings.insert(token, now);
                self.send(ClientMessage::Ping { timestamp: token.into() });
            }
            Op::SendFile(upload) => {
                limits.file_name(upload.name.clone())?;
                if self.uploads.len() >= self.limits.upload_queue {
                    return Err(ClientError::QueueFull { capacity: self.limits.upload_queue });
                }
                let transfer_id = upload.transfer_id.clone();
                self.uploads.push(upload);
                return Ok(Reply::TransferId(transfer_id));
            }
            Op::History { before, limit } => {
                if !(1..=hubbub_protocol::MAX_HISTORY_LIMIT).contains(&limit) {
                    return Err(ClientError::InvalidHistoryLimit {
                        limit,
                        max: hubbub_protocol::MAX_HISTORY_LIMIT,
                    });
                }
                if !self.is_live() {
                    return Err(ClientError::NotConnected);
                }
                if self.intended.room.is_none() {
                    return Err(ClientError::NotInRoom);
                }
                let waiting = self.queue.iter().filter(|q| matches!(q, Queued::History { .. })).count();
                if self.history.len() + waiting >= self.limits.queue_capacity {
                    return Err(ClientError::QueueFull { capacity: self.limits.queue_capacity });
                }
                let token = self.next_history;
                self.next_history += 1;
                self.submit(Queued::History { token, before, limit }, now);
                return Ok(Reply::Pending(token));
            }
        }
        Ok(Reply::Done)
    }

    /// Refuses a command the client would have to hold when it holds as
    /// many as it may. `ack_needed` marks chat messages, which are held
    /// until acknowledged even on a live link.
    fn admit(&self, ack_needed: bool) -> Result<()> {
        let held = !self.is_live() || ack_needed;
        let capacity = self.limits.queue_capacity;
        if held && self.queue.len() + self.unacked.len() >= capacity {
            return Err(ClientError::QueueFull { capacity });
        }
        Ok(())
    }

    /// Queues a command behind those already waiting, and writes what may
    /// go now.
    fn submit(&mut self, command: Queued, now: Instant) {
        self.queue.push_back(command);
        self.drain(now);
    }

    /// On a live link, writes queued commands in order for as long as the
    /// pacer lets chat messages go.
    fn drain(&mut self, now: Instant) {
        self.wake_at = None;
        if !self.is_live() {
            return;
        }
        while let Some(front) = self.queue.front() {
            if front.is_chat() {
                if let Some(at) = self.pacer.ready_at(now) {
                    self.wake_at = Some(at);
                    return;
                }
                self.pacer.take();
            }
            if let Some(command) = self.queue.pop_front() {
                self.write(command);
            }
        }
    }

    /// Writes a command, tracking what it changes.
    fn write(&mut self, command: Queued) {
        let msg = match command {
            Queued::SetUsername(username) => {
                self.session.username = Some(username.clone());
                ClientMessage::SetUsername { username }
            }
            Queued::JoinRoom(room) => {
                self.session.room = Some(room.clone());
                let since = self.streams.since(&room);
                ClientMessage::JoinRoom { room, since }
            }
            Queued::LeaveRoom => {
                self.session.room = None;
                ClientMessage::LeaveRoom {}
            }
            Queued::Chat { id, text } => {
                let written = self.next_written();
                let room = self.session.room.clone();
                self.unacked.push_back(Unacked { id, text: text.clone(), room, written });
                ClientMessage::ChatMessage { text, client_msg_id: Some(id.into()) }
            }
            Queued::LobbyChat(text) => ClientMessage::Chat { user: self.session.username.clone(), text },
            Queued::History { token, before, limit } => {
                self.history.push_back(PendingHistory { token, error: None });
                self.send(ClientMessage::History { before, limit: Some(limit) });
                ClientMessage::Ping { timestamp: token.into() }
            }
        };
        self.send(msg);
    }

    fn next_written(&mut self) -> (u64, u64) {
        self.written += 1;
        (self.link, self.written)
    }

    fn send(&mut self, msg: ClientMessage) {
        self.outgoing.push_back(Send::Message(msg));
    }

    fn emit(&mut self, event: Event) {
        self.events.push_back(event);
    }

    /// A message from the server.
    pub(crate) fn on_message(&mut self, msg: ServerMessage, now: Instant) {
        if let Phase::Restoring { replies_due, .. } = &mut self.phase
            && matches!(
                msg,
                ServerMessage::UsernameSet { .. }
                    | ServerMessage::RoomJoined { .. }
                    | ServerMessage::Error { .. }
            )
        {
            *replies_due = replies_due.saturating_sub(1);
        }
        self.handle(msg, now);
        if let Phase::Restoring { replies_due: 0, .. } = self.phase {
            self.go_live(now);
        }
    }

    fn handle(&mut self, msg: ServerMessage, now: Instant) {
        match msg {
            ServerMessage::Welcome { .. } => {}
            ServerMessage::Connected { client_id } => {
                if matches!(self.phase, Phase::Greeting) {
                    self.restore(client_id, now);
                }
            }
            ServerMessage::Error { message, code, retry_after_ms } => {
                let upload = self.uploads.on_message(ServerMessage::Error {
                    message: message.clone(),
                    code: code.clone(),
                    retry_after_ms,
                });
                if matches!(code.as_deref(), Some(RATE_LIMITED | UNAVAILABLE)) {
                    self.retry_later = true;
                    self.pacer.pause_until(now + Duration::from_millis(retry_after_ms.unwrap_or(1000)));
                }
                if let Some(pending) = self.history.front_mut() {
                    pending.error.get_or_insert_with(|| message.clone());
                }
                self.emit(Event::Error { message, code });
                if let Some(event) = upload {
                    self.emit(event);
                }
                self.raise_barrier();
            }
            ServerMessage::UsernameSet { username } => self.emit(Event::UsernameSet { username }),
            ServerMessage::UserJoined { user, room, user_count } => {
                self.emit(Event::UserJoined { user, room, user_count });
            }
            ServerMessage::RoomJoined { room, user_count, epoch, offset, recovered, missed } => {
                let joined = self.streams.on_joined(&room, epoch.clone(), offset, recovered);
                let missed = if recovered == Some(true) { missed.unwrap_or(0) } else { 0 };
                self.emit(Event::RoomJoined { room: room.clone(), user_count, epoch, offset, missed });
                if let Joined::RecoveryFailed { epoch, offset } = joined {
                    self.emit(Event::RecoveryFailed { room, epoch, offset });
                }
            }
            ServerMessage::Resync { room, epoch, offset } => {
                self.streams.on_resync(&room, epoch.clone(), offset);
                self.emit(Event::Resync { room, epoch, offset });
            }
            ServerMessage::UserLeft { user, user_count, room } => {
                self.emit(Event::UserLeft { user, room, user_count });
            }
            ServerMessage::RoomLeft { room } => {
                self.streams.on_left();
                self.emit(Event::RoomLeft { room });
            }
            ServerMessage::UserRenamed { user, previous, room } => {
                self.emit(Event::UserRenamed { user, previous, room });
            }
            msg @ (ServerMessage::ChatMessage { .. } | ServerMessage::FileShared { .. }) => {
                if let Some(event) = room_event(msg) {
                    self.on_room_message(event);
                }
            }
            ServerMessage::MessageAck { client_msg_id, timestamp, offset } => {
                self.on_ack(client_msg_id.uuid(), timestamp, offset);
            }
            ServerMessage::History { room, epoch, messages, has_more } => {
                let Some(pending) = self.history.pop_front() else {
                    tracing::debug!(%room, "history nobody asked for");
                    return;
                };
                let page = HistoryPage::from_reply(room, epoch, messages, has_more);
                self.answers.push_back((pending.token, Ok(Reply::History(page))));
            }
            ServerMessage::UserTyping { user } => self.emit(Event::UserTyping { user }),
            ServerMessage::Chat { user, text } => self.emit(Event::LobbyChat { user, text }),
            ServerMessage::Pong { timestamp, .. } => {
                let Some(token) = timestamp.as_u64() else { return };
                if let Some(sent) = self.pings.remove(&token) {
                    self.emit(Event::Latency { rtt: now.saturating_duration_since(sent) });
                } else if self.barrier.as_ref().is_some_and(|b| b.token == token) {
                    self.on_barrier(now);
                } else if let Some(at) = self.history.iter().position(|p| p.token == token)
                    && let Some(pending) = self.history.remove(at)
                {
                    // The request was answered with an error, not a page.
                    let message = pending.error.unwrap_or_else(|| "no answer".to_owned());
                    self.answers.push_back((pending.token, Err(ClientError::HistoryRefused { message })));
                }
            }
            msg @ (ServerMessage::FileAccepted { .. }
            | ServerMessage::FileError { .. }
            | ServerMessage::FileProgress { .. }
            | ServerMessage::FileSaved { .. }
            | ServerMessage::FileResumeState { .. }) => {
                // The room has this client's share at that offset: a replay
                // need not bring it back.
                if let ServerMessage::FileSaved { offset: Some(offset), .. } = &msg {
                    let room = self.session.room.clone();
                    self.streams.on_ack(room.as_deref(), Some(*offset));
                }
                if let Some(event) = self.uploads.on_message(msg) {
                    self.emit(event);
                }
            }
            ServerMessage::Authenticated { user, expires_at } => {
                self.emit(Event::Authenticated { user, expires_at });
            }
            ServerMessage::AuthExpiring { expires_at } => self.emit(Event::AuthExpiring { expires_at }),
            // The notification feed's messages (not sent on the chat
            // endpoint), and whatever later protocol versions add.
            other => tracing::debug!(kind = ?other, "server message not acted on"),
        }
    }

    /// A room message, live or replayed: delivered unless the client has
    /// delivered it (by offset in the room's epoch, or by id) already. One
    /// of this client's own messages (a replay brings them back) is not
    /// delivered, but settles the message if its ack was lost.
    fn on_room_message(&mut self, event: Event) {
        let (client_msg_id, offset, timestamp) = match &event {
            Event::Message { client_msg_id, offset, timestamp, .. } => (*client_msg_id, *offset, *timestamp),
            Event::FileShared { offset, .. } => (None, *offset, 0),
            _ => return,
        };
        if let Some(id) = client_msg_id
            && self.is_own(id)
        {
            self.streams.deliver(offset);
            self.on_ack(id, timestamp, offset);
            return;
        }
        if !self.streams.deliver(offset) {
            tracing::debug!(?offset, "message already delivered");
            return;
        }
        if let Some(id) = client_msg_id
            && !self.seen.insert(id)
        {
            tracing::debug!(%id, "duplicate message dropped");
            return;
        }
        self.emit(event);
    }

    /// Whether `id` is one of this client's messages still waiting for
    /// its ack (written, or queued to be written again).
    fn is_own(&self, id: Uuid) -> bool {
        self.unacked.iter().any(|u| u.id == id)
            || self.queue.iter().any(|q| matches!(q, Queued::Chat { id: queued, .. } if *queued == id))
    }

    /// An ack (or the message itself, replayed): the message is done.
    fn on_ack(&mut self, id: Uuid, timestamp: u64, offset: Option<u64>) {
        if let Some(position) = self.unacked.iter().position(|u| u.id == id)
            && let Some(unacked) = self.unacked.remove(position)
        {
            self.streams.on_ack(unacked.room.as_deref(), offset);
        } else if let Some(position) =
            self.queue.iter().position(|q| matches!(q, Queued::Chat { id: queued, .. } if *queued == id))
        {
            // Written on an earlier link and queued to go again: no need.
            self.queue.remove(position);
        } else {
            // An ack for a message already acked (a resend crossed the ack).
            return;
        }
        self.emit(Event::MessageAcked { client_msg_id: id, timestamp, offset });
    }

    /// After an `error`, finds out whether it answered a chat message.
    fn raise_barrier(&mut self) {
        let link = self.link;
        if self.barrier.is_some() || !self.unacked.iter().any(|u| u.written.0 == link) {
            return;
        }
        let token = self.next_barrier;
        self.next_barrier += 1;
        self.barrier = Some(Barrier { token, upto: self.written });
        self.send(ClientMessage::Ping { timestamp: token.into() });
    }

    /// The barrier's pong: messages written before it and still unacked got
    /// an error. Dropped by the rate limiter, they go again (first in the
    /// queue, paced); refused for another reason, they are given up.
    fn on_barrier(&mut self, now: Instant) {
        let Some(barrier) = self.barrier.take() else { return };
        let link = self.link;
        let (answered, waiting): (VecDeque<Unacked>, VecDeque<Unacked>) = std::mem::take(&mut self.unacked)
            .into_iter()
            .partition(|u| u.written.0 == link && u.written.1 <= barrier.upto);
        self.unacked = waiting;
        if std::mem::take(&mut self.retry_later) {
            for unacked in answered.into_iter().rev() {
                self.queue.push_front(Queued::Chat { id: unacked.id, text: unacked.text });
            }
            self.drain(now);
        } else {
            for unacked in answered {
                self.emit(Event::MessageRejected { client_msg_id: unacked.id });
            }
        }
    }

    /// The server greeted a new link: send the session again, first the
    /// username and the room of the oldest unacknowledged message (or the
    /// session's room), and wait for their replies.
    fn restore(&mut self, client_id: Uuid, now: Instant) {
        let room = self.unacked.front().map_or_else(|| self.session.room.clone(), |u| u.room.clone());
        let mut replies_due = 0;
        if let Some(username) = self.session.username.clone() {
            self.send(ClientMessage::SetUsername { username });
            replies_due += 1;
        }
        if let Some(room) = room.clone() {
            let since = self.streams.since(&room);
            self.send(ClientMessage::JoinRoom { room, since });
            replies_due += 1;
        }
        self.phase = Phase::Restoring { client_id, replies_due, room };
        if replies_due == 0 {
            self.go_live(now);
        }
    }

    /// The session is back. What was not acknowledged goes first, in its
    /// own room (switching rooms if it was written in another, then back to
    /// the session's), then what was queued: all through the queue, so the
    /// pacer applies to resends too.
    fn go_live(&mut self, now: Instant) {
        let Phase::Restoring { client_id, room, .. } = std::mem::replace(&mut self.phase, Phase::Live) else {
            return;
        };
        let target = std::mem::replace(&mut self.session.room, room.clone());
        let mut current = room;
        let mut replay = VecDeque::with_capacity(self.unacked.len() + self.queue.len());
        for unacked in self.unacked.drain(..) {
            if unacked.room != current {
                current = unacked.room.clone();
                replay.push_back(room_change(current.clone()));
            }
            replay.push_back(Queued::Chat { id: unacked.id, text: unacked.text });
        }
        if current != target {
            replay.push_back(room_change(target));
        }
        replay.append(&mut self.queue);
        self.queue = replay;
        self.emit(Event::Connected { client_id, url: self.url.clone() });
        self.drain(now);
    }
}

fn room_change(room: Option<String>) -> Queued {
    match room {
        Some(room) => Queued::JoinRoom(room),
        None => Queued::LeaveRoom,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(queue_capacity: usize) -> ClientState {
        ClientState::new(StateLimits {
            queue_capacity,
            upload_queue: 2,
            seen_message_ids: 2,
            chunk_size: 1024,
            send_rate: None,
            protocol: Limits::default(),
        })
    }

    fn sent(state: &mut ClientState) -> Vec<ClientMessage> {
        std::iter::from_fn(|| state.poll_send())
            .map(|send| match send {
                Send::Message(msg) => msg,
                Send::Chunk(_) => panic!("no chunks here"),
            })
            .collect()
    }

    fn events(state: &mut ClientState) -> Vec<Event> {
        std::iter::from_fn(|| state.poll_event()).collect()
    }

    /// The URL the tests' links go to.
    const URL: &str = "ws://node-1.test/ws/chat";

    fn connect(state: &mut ClientState) -> Uuid {
        let client_id = Uuid::new_v4();
        state.on_link_up(URL);
        state.on_message(ServerMessage::Connected { client_id }, Instant::now());
        client_id
    }

    fn id(reply: Result<Reply>) -> Uuid {
        match reply.unwrap() {
            Reply::MessageId(id) => id,
            other => panic!("expected an id, got {other:?}"),
        }
    }

    /// A `roomJoined` from a server that keeps no history.
    fn joined(room: &str, user_count: usize) -> ServerMessage {
        ServerMessage::RoomJoined {
            room: room.into(),
            user_count,
            epoch: None,
            offset: None,
            recovered: None,
            missed: None,
        }
    }

    fn chat(text: &str, id: Uuid) -> ClientMessage {
        ClientMessage::ChatMessage { text: text.into(), client_msg_id: Some(id.into()) }
    }

    #[test]
    fn restore_comes_before_resends_and_resends_before_the_queue() {
        let now = Instant::now();
        let mut s = state(10);
        connect(&mut s);
        assert!(s.is_live(), "nothing to restore on a first link");
        s.command(Op::SetUsername("ada".into()), now).unwrap();
        s.command(Op::JoinRoom("general".into()), now).unwrap();
        let unacked = id(s.command(Op::SendMessage("one".into()), now));
        sent(&mut s);
        s.on_link_lost();
        let queued = id(s.command(Op::SendMessage("two".into()), now));
        assert!(sent(&mut s).is_empty(), "nothing is written while offline");

        let client_id = connect(&mut s);
        assert_eq!(
            sent(&mut s),
            [
                ClientMessage::SetUsername { username: "ada".into() },
                ClientMessage::JoinRoom { room: "general".into(), since: None }
            ]
        );
        s.on_message(ServerMessage::UsernameSet { username: "ada".into() }, now);
        assert!(!s.is_live() && sent(&mut s).is_empty(), "waits for the room too");
        s.on_message(joined("general", 2), now);
        assert!(s.is_live());
        assert_eq!(sent(&mut s), [chat("one", unacked), chat("two", queued)]);
        assert!(events(&mut s).contains(&Event::Connected { client_id, url: URL.into() }));
    }

    #[test]
    fn a_resend_goes_to_the_room_it_was_written_in() {
        let now = Instant::now();
        let mut s = state(10);
        connect(&mut s);
        s.command(Op::JoinRoom("a".into()), now).unwrap();
        let first = id(s.command(Op::SendMessage("in a".into()), now));
        s.command(Op::JoinRoom("b".into()), now).unwrap();
        sent(&mut s);
        s.on_link_lost();
        connect(&mut s);
        assert_eq!(sent(&mut s), [ClientMessage::JoinRoom { room: "a".into(), since: None }]);
        s.on_message(joined("a", 1), now);
        assert_eq!(
            sent(&mut s),
            [chat("in a", first), ClientMessage::JoinRoom { room: "b".into(), since: None }]
        );
    }

    /// The barrier ping the state sends after an error, and its pong.
    fn barrier_pong(state: &mut ClientState) -> ServerMessage {
        let pings: Vec<_> = sent(state)
            .into_iter()
            .filter_map(|msg| match msg {
                ClientMessage::Ping { timestamp } => Some(timestamp),
                _ => None,
            })
            .collect();
        let [timestamp] = &pings[..] else { panic!("one barrier ping, got {pings:?}") };
        ServerMessage::Pong { timestamp: timestamp.clone(), server_time: 0 }
    }

    #[test]
    fn acks_settle_messages_and_a_refused_one_is_given_up_after_the_barrier() {
        let now = Instant::now();
        let mut s = state(10);
        connect(&mut s);
        s.command(Op::JoinRoom("r".into()), now).unwrap();
        let refused = id(s.command(Op::SendMessage("refused".into()), now));
        let fine = id(s.command(Op::SendMessage("fine".into()), now));
        sent(&mut s);
        events(&mut s);
        s.on_message(ServerMessage::error("nope", "x"), now);
        // The id spelled otherwise (upper-case, as Swift writes it) is the
        // same id; so is a second ack.
        let upper = fine.hyphenated().to_string().to_uppercase();
        let upper = hubbub_protocol::ClientMsgId::parse(&upper).unwrap();
        s.on_message(ServerMessage::MessageAck { client_msg_id: upper, timestamp: 7, offset: None }, now);
        s.on_message(
            ServerMessage::MessageAck { client_msg_id: fine.into(), timestamp: 7, offset: None },
            now,
        );
        let pong = barrier_pong(&mut s);
        s.on_message(pong, now);
        assert_eq!(
            events(&mut s)[1..],
            [
                Event::MessageAcked { client_msg_id: fine, timestamp: 7, offset: None },
                Event::MessageRejected { client_msg_id: refused }
            ]
        );
        s.on_link_lost();
        connect(&mut s);
        s.on_message(joined("r", 1), now);
        assert_eq!(
            sent(&mut s),
            [ClientMessage::JoinRoom { room: "r".into(), since: None }],
            "nothing left to resend"
        );
    }

    #[test]
    fn a_message_dropped_for_the_rate_limit_or_an_unavailable_store_goes_again_after_the_pause() {
        for code in [RATE_LIMITED, UNAVAILABLE] {
            let now = Instant::now();
            let mut s = state(10);
            connect(&mut s);
            s.command(Op::JoinRoom("r".into()), now).unwrap();
            let dropped = id(s.command(Op::SendMessage("dropped".into()), now));
            sent(&mut s);
            let refused = ServerMessage::Error {
                message: "not now".into(),
                code: Some(code.into()),
                retry_after_ms: Some(500),
            };
            s.on_message(refused, now);
            let pong = barrier_pong(&mut s);
            s.on_message(pong, now + Duration::from_millis(10));
            assert!(sent(&mut s).is_empty(), "{code}: held while the server asks to wait");
            let later = s.poll_timeout().expect("a wake-up when the pause ends");
            assert_eq!(later, now + Duration::from_millis(500));
            s.on_timeout(later);
            assert_eq!(sent(&mut s), [chat("dropped", dropped)], "{code}");
            assert!(!events(&mut s).iter().any(|e| matches!(e, Event::MessageRejected { .. })), "{code}");
        }
    }

    #[test]
    fn chat_is_paced_and_keeps_its_order() {
        let now = Instant::now();
        let mut s = ClientState::new(StateLimits {
            queue_capacity: 10,
            upload_queue: 1,
            seen_message_ids: 10,
            chunk_size: 1024,
            send_rate: Some(SendRate { per_second: 4.0, burst: 2 }),
            protocol: Limits::default(),
        });
        connect(&mut s);
        s.command(Op::JoinRoom("r".into()), now).unwrap();
        let ids: Vec<Uuid> = (0..3).map(|n| id(s.command(Op::SendMessage(format!("{n}")), now))).collect();
        s.command(Op::LeaveRoom, now).unwrap();
        assert_eq!(
            sent(&mut s),
            [ClientMessage::JoinRoom { room: "r".into(), since: None }, chat("0", ids[0]), chat("1", ids[1])]
        );
        let next = s.poll_timeout().expect("the third waits for a token");
        assert_eq!(next, now + Duration::from_millis(250));
        s.on_timeout(next);
        assert_eq!(sent(&mut s), [chat("2", ids[2]), ClientMessage::LeaveRoom {}]);
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn the_queue_is_bounded_and_room_commands_need_a_room() {
        let now = Instant::now();
        let mut s = state(2);
        assert!(matches!(s.command(Op::SendMessage("x".into()), now), Err(ClientError::NotInRoom)));
        assert!(matches!(s.command(Op::LeaveRoom, now), Err(ClientError::NotInRoom)));
        s.command(Op::JoinRoom("r".into()), now).unwrap();
        s.command(Op::SendMessage("1".into()), now).unwrap();
        assert!(matches!(
            s.command(Op::SendMessage("2".into()), now),
            Err(ClientError::QueueFull { capacity: 2 })
        ));
        assert!(matches!(s.command(Op::Typing, now), Err(ClientError::NotConnected)));
        assert!(matches!(s.command(Op::Ping, now), Err(ClientError::NotConnected)));
        assert!(matches!(s.command(Op::JoinRoom(" ".into()), now), Err(ClientError::Invalid(_))));
    }

    #[test]
    fn a_message_seen_twice_is_shown_once() {
        let now = Instant::now();
        let mut s = state(2);
        connect(&mut s);
        let message = |id: Uuid| ServerMessage::ChatMessage {
            user: "bob".into(),
            text: "hi".into(),
            timestamp: 1,
            client_msg_id: Some(id.into()),
            offset: None,
        };
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        for id in [a, b, a, c, a] {
            s.on_message(message(id), now);
        }
        let ids: Vec<_> = events(&mut s)
            .into_iter()
            .filter_map(|e| match e {
                Event::Message { client_msg_id, .. } => client_msg_id,
                _ => None,
            })
            .collect();
        // `a` was forgotten after two newer ids (capacity 2), so it shows again.
        assert_eq!(ids, [a, b, c, a]);
    }

    #[test]
    fn pings_measure_latency_and_ignore_foreign_pongs() {
        let now = Instant::now();
        let mut s = state(2);
        connect(&mut s);
        s.command(Op::Ping, now).unwrap();
        let [ClientMessage::Ping { timestamp }] = &sent(&mut s)[..] else { panic!("one ping") };
        let later = now + std::time::Duration::from_millis(30);
        s.on_message(ServerMessage::Pong { timestamp: 1.into(), server_time: 0 }, later);
        s.on_message(ServerMessage::Pong { timestamp: timestamp.clone(), server_time: 0 }, later);
        assert_eq!(events(&mut s)[1..], [Event::Latency { rtt: std::time::Duration::from_millis(30) }]);
    }

    // ----- recovery and history ---------------------------------------------------

    /// A `roomJoined` from a server that keeps history; `recovered` and
    /// `missed` as it sends them after a join with `since`.
    fn joined_at(room: &str, epoch: &str, offset: u64, recovery: Option<(bool, u64)>) -> ServerMessage {
        ServerMessage::RoomJoined {
            room: room.into(),
            user_count: 2,
            epoch: Some(epoch.into()),
            offset: Some(offset),
            recovered: recovery.map(|(recovered, _)| recovered),
            missed: recovery.map(|(_, missed)| missed),
        }
    }

    fn broadcast(user: &str, text: &str, offset: u64) -> ServerMessage {
        ServerMessage::ChatMessage {
            user: user.into(),
            text: text.into(),
            timestamp: 1000 + offset,
            client_msg_id: Some(Uuid::new_v4().into()),
            offset: Some(offset),
        }
    }

    fn since(epoch: &str, offset: u64) -> Option<hubbub_protocol::Since> {
        Some(hubbub_protocol::Since { epoch: epoch.into(), offset })
    }

    /// The texts of the `Message` events among `events`.
    fn texts(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Message { text, .. } => Some(text.clone()),
                _ => None,
            })
            .collect()
    }

    /// A client that set its name, joined `general` at offset 3 of epoch
    /// `e1`, and read everything since.
    fn in_general() -> ClientState {
        let now = Instant::now();
        let mut s = state(10);
        connect(&mut s);
        s.command(Op::SetUsername("ada".into()), now).unwrap();
        s.command(Op::JoinRoom("general".into()), now).unwrap();
        sent(&mut s);
        s.on_message(ServerMessage::UsernameSet { username: "ada".into() }, now);
        s.on_message(joined_at("general", "e1", 3, None), now);
        events(&mut s);
        s
    }

    #[test]
    fn a_reconnect_rejoins_with_since_and_the_missed_messages_arrive_once_in_order() {
        let now = Instant::now();
        let mut s = in_general();
        s.on_message(broadcast("bob", "four", 4), now);
        s.on_message(broadcast("bob", "five", 5), now);
        let mine = id(s.command(Op::SendMessage("six".into()), now));
        sent(&mut s);
        s.on_message(
            ServerMessage::MessageAck { client_msg_id: mine.into(), timestamp: 9, offset: Some(6) },
            now,
        );
        assert_eq!(texts(&events(&mut s)), ["four", "five"]);

        s.on_link_lost();
        let client_id = connect(&mut s);
        assert_eq!(
            sent(&mut s),
            [
                ClientMessage::SetUsername { username: "ada".into() },
                ClientMessage::JoinRoom { room: "general".into(), since: since("e1", 6) }
            ],
            "the newest delivered offset, its own ack included"
        );
        s.on_message(ServerMessage::UsernameSet { username: "ada".into() }, now);
        s.on_message(joined_at("general", "e1", 9, Some((true, 3))), now);
        // The replay, then live messages; the server (or a race) repeats
        // some, which the client drops by offset, whatever their id.
        for (text, offset) in [("seven", 7), ("eight", 8), ("nine", 9), ("five", 5), ("nine", 9), ("ten", 10)]
        {
            s.on_message(broadcast("bob", text, offset), now);
        }
        let events = events(&mut s);
        assert_eq!(
            events[..2],
            [
                Event::UsernameSet { username: "ada".into() },
                Event::RoomJoined {
                    room: "general".into(),
                    user_count: 2,
                    epoch: Some("e1".into()),
                    offset: Some(9),
                    missed: 3
                },
            ]
        );
        assert_eq!(events[2], Event::Connected { client_id, url: URL.into() });
        assert_eq!(texts(&events), ["seven", "eight", "nine", "ten"]);
        assert!(!events.iter().any(|e| matches!(e, Event::RecoveryFailed { .. })));

        s.on_link_lost();
        connect(&mut s);
        assert_eq!(
            sent(&mut s)[1],
            ClientMessage::JoinRoom { room: "general".into(), since: since("e1", 10) }
        );
    }

    #[test]
    fn its_own_message_in_the_replay_stands_for_the_lost_ack() {
        let now = Instant::now();
        let mut s = in_general();
        let mine = id(s.command(Op::SendMessage("mine".into()), now));
        sent(&mut s);
        // The server stored it, and the link broke before the ack came.
        s.on_link_lost();
        connect(&mut s);
        sent(&mut s);
        s.on_message(ServerMessage::UsernameSet { username: "ada".into() }, now);
        s.on_message(joined_at("general", "e1", 4, Some((true, 1))), now);
        assert_eq!(sent(&mut s), [chat("mine", mine)], "resent before the replay is read");
        let replayed = ServerMessage::ChatMessage {
            user: "ada".into(),
            text: "mine".into(),
            timestamp: 77,
            client_msg_id: Some(mine.into()),
            offset: Some(4),
        };
        s.on_message(replayed, now);
        // The server acks the resend as a duplicate: nothing new.
        s.on_message(
            ServerMessage::MessageAck { client_msg_id: mine.into(), timestamp: 77, offset: Some(4) },
            now,
        );
        let events = events(&mut s);
        assert!(texts(&events).is_empty(), "its own message is not shown to it: {events:?}");
        let acks: Vec<_> = events.iter().filter(|e| matches!(e, Event::MessageAcked { .. })).collect();
        assert_eq!(acks, [&Event::MessageAcked { client_msg_id: mine, timestamp: 77, offset: Some(4) }]);
    }

    #[test]
    fn a_recovery_the_server_refuses_is_reported_and_the_new_epoch_is_followed() {
        let now = Instant::now();
        let mut s = in_general();
        s.on_message(broadcast("bob", "four", 4), now);
        assert_eq!(texts(&events(&mut s)), ["four"]);
        s.on_link_lost();
        connect(&mut s);
        assert_eq!(
            sent(&mut s)[1],
            ClientMessage::JoinRoom { room: "general".into(), since: since("e1", 4) }
        );
        s.on_message(ServerMessage::UsernameSet { username: "ada".into() }, now);
        // The server lost the room's history: a new epoch, one message in it.
        s.on_message(joined_at("general", "e2", 1, Some((false, 0))), now);
        s.on_message(broadcast("bob", "one of e2", 1), now);
        s.on_message(broadcast("bob", "two of e2", 2), now);
        let events = events(&mut s);
        assert!(
            events.contains(&Event::RecoveryFailed { room: "general".into(), epoch: "e2".into(), offset: 1 }),
            "{events:?}"
        );
        assert!(events.iter().any(|e| matches!(e, Event::RoomJoined { missed: 0, .. })));
        // Offset 1 of e2 is below e1's 4, but it is another epoch; the join
        // said 1 was there before, so only 2 is news.
        assert_eq!(texts(&events), ["two of e2"]);
        s.on_link_lost();
        connect(&mut s);
        assert_eq!(
            sent(&mut s)[1],
            ClientMessage::JoinRoom { room: "general".into(), since: since("e2", 2) }
        );
    }

    #[test]
    fn a_resync_is_told_and_the_next_join_asks_from_the_new_position() {
        let now = Instant::now();
        let mut s = in_general();
        s.on_message(broadcast("bob", "four", 4), now);
        // The room's history was lost in the cluster: a new epoch, two
        // messages in it that this client never got.
        let resync = ServerMessage::Resync { room: "general".into(), epoch: "e2".into(), offset: 2 };
        s.on_message(resync, now);
        // Live messages continue above the new offset; one at or below it
        // (the server promised none) is not news.
        s.on_message(broadcast("bob", "two of e2", 2), now);
        s.on_message(broadcast("bob", "three of e2", 3), now);
        let told = events(&mut s);
        assert_eq!(
            told[1],
            Event::Resync { room: "general".into(), epoch: "e2".into(), offset: 2 },
            "{told:?}"
        );
        assert_eq!(texts(&told), ["four", "three of e2"]);
        assert!(sent(&mut s).is_empty(), "a resync needs no answer");

        // The next join, after a reconnect to whichever node, asks from there.
        s.on_link_lost();
        connect(&mut s);
        assert_eq!(
            sent(&mut s)[1],
            ClientMessage::JoinRoom { room: "general".into(), since: since("e2", 3) }
        );
        s.on_message(ServerMessage::UsernameSet { username: "ada".into() }, now);
        s.on_message(joined_at("general", "e2", 4, Some((true, 1))), now);
        s.on_message(broadcast("bob", "four of e2", 4), now);
        let told = events(&mut s);
        assert!(!told.iter().any(|e| matches!(e, Event::RecoveryFailed { .. })), "{told:?}");
        assert_eq!(texts(&told), ["four of e2"]);

        // A resync for a room the client has left still moves its position,
        // so going back asks from the new one.
        s.command(Op::JoinRoom("other".into()), now).unwrap();
        s.on_message(joined_at("other", "o1", 0, None), now);
        let resync = ServerMessage::Resync { room: "general".into(), epoch: "e3".into(), offset: 9 };
        s.on_message(resync, now);
        s.command(Op::JoinRoom("general".into()), now).unwrap();
        assert_eq!(
            sent(&mut s).last(),
            Some(&ClientMessage::JoinRoom { room: "general".into(), since: since("e3", 9) })
        );
    }

    #[test]
    fn messages_of_the_room_being_left_count_for_that_room() {
        let now = Instant::now();
        let mut s = in_general();
        s.command(Op::JoinRoom("other".into()), now).unwrap();
        sent(&mut s);
        // Said in general before the server took the join.
        s.on_message(broadcast("bob", "late in general", 4), now);
        s.on_message(joined_at("other", "o1", 10, None), now);
        s.on_message(broadcast("carol", "in other", 11), now);
        assert_eq!(texts(&events(&mut s)), ["late in general", "in other"]);
        // Back to general: what was said there meanwhile is asked for.
        s.command(Op::JoinRoom("general".into()), now).unwrap();
        assert_eq!(sent(&mut s), [ClientMessage::JoinRoom { room: "general".into(), since: since("e1", 4) }]);
    }

    /// A history answer from the server.
    fn page(texts: &[(&str, u64)], has_more: bool) -> ServerMessage {
        let messages = texts
            .iter()
            .map(|(text, offset)| {
                serde_json::json!({"type": "chatMessage", "user": "bob", "text": text,
                                                      "timestamp": 1, "offset": offset})
            })
            .collect();
        ServerMessage::History { room: "general".into(), epoch: "e1".into(), messages, has_more }
    }

    fn pending(reply: Result<Reply>) -> u64 {
        match reply.unwrap() {
            Reply::Pending(token) => token,
            other => panic!("expected a pending reply, got {other:?}"),
        }
    }

    #[test]
    fn history_requests_are_answered_in_order_and_a_refusal_is_found_by_its_ping() {
        let now = Instant::now();
        let mut s = in_general();
        let first = pending(s.command(Op::History { before: None, limit: 2 }, now));
        let second = pending(s.command(Op::History { before: Some(3), limit: 1 }, now));
        assert_eq!(
            sent(&mut s),
            [
                ClientMessage::History { before: None, limit: Some(2) },
                ClientMessage::Ping { timestamp: first.into() },
                ClientMessage::History { before: Some(3), limit: Some(1) },
                ClientMessage::Ping { timestamp: second.into() },
            ]
        );
        assert!(matches!(
            s.command(Op::History { before: None, limit: 101 }, now),
            Err(ClientError::InvalidHistoryLimit { limit: 101, max: 100 })
        ));

        s.on_message(page(&[("two", 2), ("three", 3)], true), now);
        s.on_message(ServerMessage::Pong { timestamp: first.into(), server_time: 0 }, now);
        let Some((token, Ok(Reply::History(answer)))) = s.poll_answer() else { panic!("the first page") };
        assert_eq!(token, first);
        assert_eq!(texts(&answer.messages), ["two", "three"]);
        assert_eq!(answer.next_before(), Some(2));
        assert!(s.poll_answer().is_none(), "its ping settles nothing more");

        s.on_message(ServerMessage::error("history is off", "unavailable"), now);
        s.on_message(ServerMessage::Pong { timestamp: second.into(), server_time: 0 }, now);
        let Some((token, Err(ClientError::HistoryRefused { message }))) = s.poll_answer() else {
            panic!("the second is refused")
        };
        assert_eq!((token, message.as_str()), (second, "history is off"));
        assert!(texts(&events(&mut s)).is_empty(), "history is not delivered as live messages");

        let third = pending(s.command(Op::History { before: None, limit: 5 }, now));
        s.on_link_lost();
        assert!(matches!(s.poll_answer(), Some((token, Err(ClientError::NotConnected))) if token == third));
        assert!(matches!(
            s.command(Op::History { before: None, limit: 5 }, now),
            Err(ClientError::NotConnected)
        ));
    }
}
