//! The chat endpoint: one session per connection, acting on decoded client
//! messages. The session's state (name, room) is owned by its connection's
//! task, so it needs no lock.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hubbub_history::{Assigned, Error as HistoryError, Publish, Published};
use hubbub_protocol::{ClientMessage, ClientMsgId, ServerMessage, decode_client};

use crate::Shared;
use crate::auth::{Identity, until};
use crate::conn::Handler;
use crate::hub::{Recall, Remembered, Room};
use crate::link::{CloseReason, Peer, encode};
use crate::ratelimit::{AddressLimit, Key, Kind, Limiter, Verdict, enforce};
use crate::upload::{Outcome, Uploads};
use crate::ws::{self, CloseCode, Text};
use hubbub_transfer::NewUpload;
use std::net::IpAddr;
use std::time::Instant;
use tokio::time::Instant as TokioInstant;

/// Most messages of one connection waiting for the history store at once.
const MAX_IN_FLIGHT: usize = 32;

/// The refusal of a message the store could not keep: no ack, no delivery;
/// send it again after `retry_after_ms`.
fn unavailable(retry_after_ms: u64) -> ServerMessage {
    ServerMessage::Error {
        message: "The message could not be stored; send it again later".to_owned(),
        code: Some("unavailable".to_owned()),
        retry_after_ms: Some(retry_after_ms),
    }
}

/// A connection's messages waiting for the history store.
#[derive(Debug, Default)]
struct InFlight {
    /// How many.
    count: std::sync::atomic::AtomicUsize,
    /// Woken whenever one completes.
    changed: tokio::sync::Notify,
}

impl InFlight {
    fn begin(&self) {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    fn end(&self) {
        self.count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// Whether none is in flight.
    fn is_idle(&self) -> bool {
        self.count.load(std::sync::atomic::Ordering::Acquire) == 0
    }

    /// Waits until fewer than `max` are in flight.
    async fn below(&self, max: usize) {
        loop {
            // Created before the check, so a completion in between wakes it.
            let changed = self.changed.notified();
            if self.count.load(std::sync::atomic::Ordering::Acquire) < max {
                return;
            }
            changed.await;
        }
    }
}

/// Messages a `history` request gets when it names no `limit`.
const DEFAULT_HISTORY_LIMIT: usize = 50;

/// The name used for a client that never set one.
const ANONYMOUS: &str = "Anonymous";

/// One chat connection's state.
pub(crate) struct ChatSession {
    /// Server-wide state.
    shared: Arc<Shared>,
    /// This connection's queue.
    peer: Peer,
    /// The name set with `setUsername` (or proved by a token), if any;
    /// shared with the connection's log context.
    username: Option<Arc<str>>,
    /// The room this connection is in, if any. Holding the `Arc` lets room
    /// messages skip the hub's rooms map.
    room: Option<Arc<Room>>,
    /// File uploads on this connection.
    uploads: Uploads,
    /// Message rate limits, unless turned off.
    limiter: Option<Limiter>,
    /// The client's address, for the limits its connections share.
    ip: IpAddr,
    /// Messages waiting for the history store, made on the first one.
    in_flight: Option<Arc<InFlight>>,
    /// When this member's last `userTyping` went out, in the current room.
    last_typing: Option<Instant>,
    /// Where the connection stands with token authentication.
    auth: AuthState,
}

/// Where a chat connection stands with token authentication.
enum AuthState {
    /// The server does not use tokens.
    Off,
    /// Waiting for `auth {token}` until this instant.
    Awaiting(TokioInstant),
    /// Authenticated until `expires`; `warned` once `authExpiring` went out.
    /// (The identity is boxed to keep an unauthenticated session small.)
    Authenticated { identity: Box<Identity>, expires: TokioInstant, warned: bool },
}

/// Close code for a token that expired (documented in PROTOCOL.md).
const CLOSE_TOKEN_EXPIRED: u16 = 4001;
/// Close code for a missing or invalid token.
const CLOSE_UNAUTHENTICATED: u16 = 4003;

impl ChatSession {
    /// Greets a new chat connection and, once it is authenticated (at once
    /// when the server uses no tokens, or when the upgrade carried a valid
    /// one), registers it with the hub.
    pub(crate) fn start(shared: Arc<Shared>, peer: Peer, ip: IpAddr, identity: Option<Identity>) -> Self {
        let limiter =
            shared.config.rate_limit.enabled.then(|| Limiter::new(&shared.config.rate_limit, Instant::now()));
        let auth = match shared.auth {
            None => AuthState::Off,
            Some(_) => AuthState::Awaiting(TokioInstant::now() + shared.config.auth.auth_timeout),
        };
        let mut session = Self {
            shared,
            peer,
            username: None,
            room: None,
            uploads: Uploads::default(),
            limiter,
            ip,
            in_flight: None,
            last_typing: None,
            auth,
        };
        session.reply(&ServerMessage::Welcome { message: "Welcome to Hubbub chat!".to_owned() });
        session.reply(&ServerMessage::Connected { client_id: session.peer.id() });
        match (&session.auth, identity) {
            (AuthState::Off, _) => session.shared.hub.lobby.insert(session.peer.clone()),
            (_, Some(identity)) => session.authenticate(identity),
            (_, None) => {}
        }
        session
    }

    /// A valid token arrived: bind the username, join the lobby.
    fn authenticate(&mut self, identity: Identity) {
        let expires = TokioInstant::now() + until(identity.expires_at_ms, now_ms());
        let first = !matches!(self.auth, AuthState::Authenticated { .. });
        let user: Arc<str> = identity.user.as_str().into();
        crate::connlog::record_user(&user);
        tracing::debug!(user = %identity.user, "authenticated");
        self.reply(&ServerMessage::Authenticated {
            user: identity.user.clone(),
            expires_at: identity.expires_at_ms,
        });
        self.username = Some(user);
        self.auth = AuthState::Authenticated { identity: Box::new(identity), expires, warned: false };
        if first {
            self.shared.hub.lobby.insert(self.peer.clone());
        }
    }

    /// Refuses the connection's authentication: error event, then close.
    fn reject(&self, message: &str, code: u16) {
        self.error(message, "unauthenticated");
        self.peer.close(CloseReason {
            code: CloseCode::from(code),
            reason: "Authentication required",
            drain_queue: true,
        });
    }

    fn on_auth(&mut self, token: &str) {
        let Some(authenticator) = &self.shared.auth else {
            return self.error("This server does not use tokens", "authDisabled");
        };
        let verified = authenticator.verify(token, &self.shared.config.protocol);
        match (&self.auth, verified) {
            (AuthState::Awaiting(_), Ok(identity)) => self.authenticate(identity),
            (AuthState::Awaiting(_), Err(err)) => {
                tracing::info!(cause = %err, "token refused");
                self.reject(&format!("Authentication failed: {err}"), CLOSE_UNAUTHENTICATED);
            }
            (AuthState::Authenticated { identity: current, .. }, Ok(identity)) => {
                if identity.user == current.user {
                    self.authenticate(identity);
                } else {
                    self.error("The new token is for another user", "authFailed");
                }
            }
            (AuthState::Authenticated { .. }, Err(err)) => {
                // The current token stays valid until it expires.
                self.error(&format!("Token refused: {err}"), "authFailed");
            }
            (AuthState::Off, _) => self.error("This server does not use tokens", "authDisabled"),
        }
    }

    fn reply(&self, msg: &ServerMessage) {
        self.peer.reply(msg, &self.shared.hub.stats);
    }

    fn error(&self, message: &str, code: &str) {
        self.reply(&ServerMessage::error(message, code));
    }

    /// The name others see for this connection.
    fn name(&self) -> &str {
        self.username.as_deref().unwrap_or(ANONYMOUS)
    }

    async fn handle(&mut self, msg: ClientMessage) {
        // Replies go out in the order of what they answer: anything but a
        // room message waits until the connection's earlier room messages
        // have their ack (or refusal), which the store's callback sends.
        if !matches!(msg, ClientMessage::ChatMessage { .. })
            && let Some(in_flight) = &self.in_flight
        {
            in_flight.below(1).await;
        }
        let hub = &self.shared.hub;
        match msg {
            ClientMessage::SetUsername { username } => {
                if let AuthState::Authenticated { identity, .. } = &self.auth
                    && identity.user != username
                {
                    return self.error("Your username is set by your token", "usernameLocked");
                }
                let user: Arc<str> = username.as_str().into();
                crate::connlog::record_user(&user);
                tracing::debug!(%username, "username set");
                self.reply(&ServerMessage::UsernameSet { username: username.clone() });
                let previous = self.name().to_owned();
                if let Some(room) = &self.room
                    && previous != username
                {
                    // The room's other members learn the new name before any
                    // message that carries it.
                    let renamed = encode(&ServerMessage::UserRenamed {
                        user: username.clone(),
                        previous,
                        room: room.name.to_string(),
                    });
                    room.broadcast(&renamed, Some(self.peer.id()));
                    if let Some(cluster) = &self.shared.cluster {
                        cluster.renamed(&room.name, self.peer.id(), &username, self.name());
                    }
                }
                self.username = Some(user);
            }
            ClientMessage::JoinRoom { room, since } => {
                if let AuthState::Authenticated { identity, .. } = &self.auth
                    && !identity.may_join(&room)
                {
                    return self.error("Your token does not allow joining this room", "roomForbidden");
                }
                if let Some(current) = &self.room
                    && *current.name == *room
                {
                    // Already there: confirm without a leave/join round that
                    // would tell everyone else twice.
                    let readable = self.shared.cluster.as_ref().is_none_or(|cluster| cluster.is_up());
                    let position = self
                        .shared
                        .history
                        .as_ref()
                        .filter(|_| readable)
                        .and_then(|engine| engine.position(&room).ok());
                    self.reply(&ServerMessage::RoomJoined {
                        room,
                        user_count: current.len(),
                        epoch: position.as_ref().map(|p| p.epoch.as_str().to_owned()),
                        offset: position.map(|p| p.offset),
                        recovered: None,
                        missed: None,
                    });
                    return;
                }
                self.leave_room();
                self.last_typing = None;
                // In a cluster, what the join needs from Redis is read first,
                // so the hub's locks never wait for it.
                let prepared = match &self.shared.cluster {
                    Some(cluster) => Some(cluster.prepare(&room).await),
                    None => None,
                };
                let config = &self.shared.config;
                let (position, others) =
                    prepared.as_ref().map_or((None, None), |p| (p.position.clone(), p.others.clone()));
                let readable = prepared.is_none() || position.is_some();
                let recall = self.shared.history.as_deref().map(|engine| Recall {
                    engine,
                    since: since.as_ref(),
                    // The replay must fit the joiner's queue with room to spare.
                    max_messages: config.history.max_recover.min(config.websocket.outbound_queue / 2),
                    max_bytes: config.websocket.outbound_queue_bytes / 2,
                    position,
                    others,
                    readable,
                });
                let hub = &self.shared.hub;
                let joined = if self.shared.cluster.is_some()
                    && since.is_some()
                    && tokio::runtime::Handle::current().runtime_flavor()
                        == tokio::runtime::RuntimeFlavor::MultiThread
                {
                    // The replay is read from Redis under the room's lock:
                    // let the runtime move other tasks off this thread.
                    tokio::task::block_in_place(|| hub.join(&self.peer, self.name(), &room, recall))
                } else {
                    hub.join(&self.peer, self.name(), &room, recall)
                };
                tracing::debug!(%room, members = joined.user_count, "joined room");
                if let Some(cluster) = &self.shared.cluster {
                    cluster.joined(&joined.room.name, self.peer.id(), self.name());
                    if joined.created {
                        cluster.settle(&self.shared, joined.room.clone());
                    }
                }
                drop(prepared);
                self.room = Some(joined.room);
            }
            ClientMessage::LeaveRoom {} => match self.leave_room() {
                Some(room) => self.reply(&ServerMessage::RoomLeft { room: room.to_string() }),
                None => self.error("You are not in a room", "notInRoom"),
            },
            ClientMessage::ChatMessage { text, client_msg_id } => {
                let Some(room) = self.room.clone() else {
                    return self.error("Join a room before sending messages", "notInRoom");
                };
                if self.shared.history.is_some() {
                    // Several messages of one connection may wait for the
                    // store at once (so one group commit takes many), up to
                    // a bound that keeps the store's queue bounded too.
                    let in_flight = self.in_flight.get_or_insert_with(Arc::default).clone();
                    in_flight.below(MAX_IN_FLIGHT).await;
                    let user = self.name().to_owned();
                    let (peer, stats) = (self.peer.clone(), self.shared.hub.stats.clone());
                    let retry_after_ms = self.retry_after_ms();
                    // Built again if a cluster's Redis engine must give it another
                    // offset, hence the clones.
                    let build = move |at: Assigned| ServerMessage::ChatMessage {
                        user: user.clone(),
                        text: text.clone(),
                        timestamp: at.timestamp_ms,
                        client_msg_id,
                        offset: Some(at.offset),
                    };
                    in_flight.begin();
                    // The ack (or the refusal) goes out from the store's
                    // callback, after the delivery, in the room's order.
                    self.publish(
                        &room,
                        client_msg_id.as_ref().map(ClientMsgId::uuid),
                        build,
                        move |result| {
                            match (result, client_msg_id) {
                                (Ok(published), Some(id)) => {
                                    peer.reply(
                                        &ServerMessage::MessageAck {
                                            client_msg_id: id,
                                            timestamp: published.timestamp_ms,
                                            offset: Some(published.offset),
                                        },
                                        &stats,
                                    );
                                }
                                (Ok(_), None) => {}
                                (Err(err), _) => {
                                    tracing::warn!(cause = %err, "a message could not be kept");
                                    peer.reply(&unavailable(retry_after_ms), &stats);
                                }
                            }
                            in_flight.end();
                        },
                    );
                    return;
                }
                let mut timestamp = now_ms();
                if let Some(id) = client_msg_id {
                    let delivery = &self.shared.config.delivery;
                    let sender = self.name();
                    // Resends are recognised by the UUID, whatever its
                    // spelling; the replies carry the spelling just sent.
                    match room.remember(
                        id.uuid(),
                        sender,
                        timestamp,
                        delivery.dedupe_window,
                        delivery.dedupe_capacity,
                    ) {
                        Remembered::New => {}
                        Remembered::Duplicate(original) => {
                            // A resend whose ack was lost: ack again, deliver once.
                            tracing::debug!(id = %id.uuid(), "duplicate message acknowledged again");
                            timestamp = original;
                            self.reply(&ServerMessage::MessageAck {
                                client_msg_id: id,
                                timestamp,
                                offset: None,
                            });
                            return;
                        }
                    }
                }
                let frame = encode(&ServerMessage::ChatMessage {
                    user: self.name().to_owned(),
                    text,
                    timestamp,
                    client_msg_id,
                    offset: None,
                });
                room.broadcast(&frame, Some(self.peer.id()));
                if let Some(id) = client_msg_id {
                    self.reply(&ServerMessage::MessageAck { client_msg_id: id, timestamp, offset: None });
                }
            }
            ClientMessage::Typing {} => {
                // At most one broadcast per interval, whatever the client sends.
                let now = Instant::now();
                let interval = self.shared.config.rate_limit.typing_broadcast_interval;
                if self.last_typing.is_some_and(|at| now.saturating_duration_since(at) < interval) {
                    return;
                }
                // Typing outside a room has no audience; it is not an error.
                if let Some(room) = &self.room {
                    self.last_typing = Some(now);
                    let frame = encode(&ServerMessage::UserTyping { user: self.name().to_owned() });
                    room.broadcast(&frame, Some(self.peer.id()));
                    if let Some(cluster) = &self.shared.cluster {
                        cluster.typing(&room.name, self.name());
                    }
                }
            }
            ClientMessage::Chat { user, text } => {
                let user = match (&self.username, user) {
                    (Some(name), _) => name.to_string(),
                    (None, Some(claimed)) => claimed,
                    (None, None) => ANONYMOUS.to_owned(),
                };
                let message = ServerMessage::Chat { user, text };
                let frame = encode(&message);
                // Every lobby reader receives every lobby message: the
                // server-wide budget keeps their queues within reach.
                let budget = self.shared.limits.lobby_bytes(
                    &self.shared.config.rate_limit,
                    frame.len(),
                    Instant::now(),
                );
                if let Err(wait) = budget {
                    self.refuse_shared(wait, "lobby chat");
                    return;
                }
                hub.lobby.broadcast(&frame);
                if let Some(cluster) = &self.shared.cluster {
                    cluster.lobby(&message.to_json());
                }
            }
            ClientMessage::Ping { timestamp } => {
                self.reply(&ServerMessage::Pong { timestamp, server_time: now_ms() });
            }
            ClientMessage::FileStart { name, size, mime_type, sha256, chunk_size, transfer_id } => {
                if !self.shared.config.uploads.enabled {
                    return self.error("File uploads are not enabled on this server", "uploadsDisabled");
                }
                let transfer_id = transfer_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
                let owner = self.username.as_deref().map(str::to_owned);
                // The quota share is charged to what the client cannot pick:
                // its verified user, else its address.
                let account = crate::upload::account(&match &self.auth {
                    AuthState::Authenticated { identity, .. } => Key::User(identity.user.as_str().into()),
                    _ => Key::address(self.ip),
                });
                let request =
                    NewUpload { name, size, mime_type, sha256, chunk_size, transfer_id, owner, account };
                let shared = self.shared.clone();
                let outcome = self.uploads.start(&shared.store, &shared.config.uploads, request).await;
                self.act(outcome);
            }
            ClientMessage::FileEnd { .. } => {
                let outcome = self.uploads.end().await;
                self.act(outcome);
            }
            ClientMessage::Auth { token } => self.on_auth(&token),
            ClientMessage::History { before, limit } => self.history(before, limit),
            ClientMessage::FileResume { transfer_id } => {
                if !self.shared.config.uploads.enabled {
                    return self.error("File uploads are not enabled on this server", "uploadsDisabled");
                }
                let outcome = self.uploads.resume(&self.shared.store, transfer_id, self.username.as_deref());
                self.act(outcome);
            }
        }
    }

    /// Applies the rate limits; false if the message must be dropped.
    fn within_limits(&mut self, msg: &ClientMessage) -> bool {
        let kind = match msg {
            ClientMessage::ChatMessage { .. } | ClientMessage::Chat { .. } => Kind::Chat,
            ClientMessage::Typing {} => Kind::Typing,
            ClientMessage::JoinRoom { .. }
            | ClientMessage::LeaveRoom {}
            | ClientMessage::SetUsername { .. } => Kind::Room,
            ClientMessage::Ping { .. }
            | ClientMessage::Auth { .. }
            | ClientMessage::FileStart { .. }
            | ClientMessage::FileEnd { .. }
            | ClientMessage::FileResume { .. }
            | ClientMessage::History { .. } => Kind::Control,
        };
        if !self.limit(kind, msg.kind()) {
            return false;
        }
        match msg {
            ClientMessage::ChatMessage { .. } => self.limit_shared(&[AddressLimit::Chat], msg.kind()),
            ClientMessage::Chat { .. } => {
                self.limit_shared(&[AddressLimit::Chat, AddressLimit::Lobby], msg.kind())
            }
            _ => true,
        }
    }

    /// Applies the limits shared by every connection of this address and,
    /// when authenticated, of this user; false if the message must be
    /// dropped.
    fn limit_shared(&mut self, limits: &[AddressLimit], what: &str) -> bool {
        if self.limiter.is_none() {
            return true;
        }
        let now = Instant::now();
        let settings = &self.shared.config.rate_limit;
        let user = match &self.auth {
            AuthState::Authenticated { identity, .. } => Some(Key::User(identity.user.as_str().into())),
            _ => None,
        };
        let keys = std::iter::once(Key::address(self.ip)).chain(user);
        let mut refused = None;
        for key in keys {
            for &limit in limits {
                if let Err(wait) = self.shared.limits.check(settings, &key, limit, now) {
                    refused = Some(refused.map_or(wait, |longest: std::time::Duration| longest.max(wait)));
                }
            }
        }
        match refused {
            None => true,
            Some(wait) => self.refuse_shared(wait, what),
        }
    }

    /// Answers a message refused by a shared limit (this address's, this
    /// user's or the server's): `rateLimited`, and a strike against the
    /// connection, which is closed if it keeps on. Always false.
    fn refuse_shared(&mut self, wait: std::time::Duration, what: &str) -> bool {
        let verdict = match self.limiter.as_mut() {
            Some(limiter) => limiter.refused_elsewhere(&self.shared.config.rate_limit, wait, Instant::now()),
            None => Verdict::Refuse(wait),
        };
        enforce(verdict, &self.peer, &self.shared.hub.stats, what)
    }

    /// Applies the limit of `kind`; false if the message must be dropped.
    fn limit(&mut self, kind: Kind, what: &str) -> bool {
        let Some(limiter) = self.limiter.as_mut() else { return true };
        let verdict = limiter.check(&self.shared.config.rate_limit, kind, Instant::now());
        enforce(verdict, &self.peer, &self.shared.hub.stats, what)
    }

    /// Carries out what an upload step asked for.
    fn act(&mut self, outcome: Outcome) {
        let stats = &self.shared.hub.stats;
        match outcome {
            Outcome::Reply(msg) => {
                match msg {
                    ServerMessage::FileAccepted { .. } => stats.uploads_started.inc(),
                    ServerMessage::FileError { .. } => stats.uploads_failed.inc(),
                    _ => {}
                }
                self.reply(&msg);
            }
            Outcome::Quiet => {}
            Outcome::Saved(file, transfer_id) => {
                stats.uploads_finished.inc();
                stats.upload_bytes_stored.inc_by(file.size);
                let url = format!("/files/{}", file.id);
                let saved = ServerMessage::FileSaved {
                    file_id: file.id.clone(),
                    name: file.name.clone(),
                    size: file.size,
                    mime_type: file.mime_type.clone(),
                    sha256: file.sha256,
                    url: url.clone(),
                    transfer_id,
                    offset: None,
                };
                let Some(room) = self.room.clone() else { return self.reply(&saved) };
                let user = self.name().to_owned();
                let share = move |offset| ServerMessage::FileShared {
                    user: user.clone(),
                    file_id: file.id.clone(),
                    name: file.name.clone(),
                    size: file.size,
                    mime_type: file.mime_type.clone(),
                    url: url.clone(),
                    offset,
                };
                if self.shared.history.is_none() {
                    self.reply(&saved);
                    return room.broadcast(&encode(&share(None)), Some(self.peer.id()));
                }
                // Kept like a chat message; `fileSaved` goes out once the
                // share is kept, with its offset, and like an ack it counts
                // as in flight until then (the file itself is stored
                // whatever the history store answers).
                let in_flight = self.in_flight.get_or_insert_with(Arc::default).clone();
                in_flight.begin();
                let (peer, stats) = (self.peer.clone(), self.shared.hub.stats.clone());
                self.publish(
                    &room,
                    None,
                    move |at| share(Some(at.offset)),
                    move |result| {
                        let mut saved = saved;
                        match result {
                            Ok(published) => {
                                if let ServerMessage::FileSaved { offset, .. } = &mut saved {
                                    *offset = Some(published.offset);
                                }
                            }
                            Err(err) => {
                                tracing::warn!(cause = %err, "a shared file could not be kept; not announced")
                            }
                        }
                        peer.reply(&saved, &stats);
                        in_flight.end();
                    },
                );
            }
        }
    }

    /// Keeps a room message in the history store; once it is kept
    /// (durably, with the disk store) the store's callback delivers it to the
    /// room's other members, in offset order, then runs `then` with what the
    /// store answered. A resend of a kept message is not delivered again.
    fn publish(
        &self,
        room: &Arc<Room>,
        client_msg_id: Option<uuid::Uuid>,
        build: impl Fn(Assigned) -> ServerMessage + Send + 'static,
        then: impl FnOnce(&Result<Published, HistoryError>) + Send + 'static,
    ) {
        let Some(engine) = self.shared.history.clone() else {
            return then(&Err(HistoryError::Closed));
        };
        let mut request = Publish::new(room.name.clone(), self.name(), move |at: Assigned| {
            Bytes::from(build(at).to_json())
        })
        .timestamp_ms(now_ms());
        if let Some(id) = client_msg_id {
            request = request.client_msg_id(id);
        }
        if self.shared.cluster.is_some() {
            // So the nodes delivering it from Redis can skip its sender.
            request = request.origin(self.peer.id().simple().to_string());
        }
        let (shared, room, sender) = (self.shared.clone(), room.clone(), self.peer.id());
        // In a cluster every node, this one included, delivers from its
        // subscription to the room's channel, in the one order Redis gives.
        let deliver_here = self.shared.cluster.is_none();
        engine.publish(
            request,
            Box::new(move |result| {
                if deliver_here
                    && let Ok(published) = &result
                    && let Some(bytes) = &published.bytes
                {
                    let frame = ws::encode(ws::OpCode::Text, bytes);
                    // A room that emptied meanwhile may have been made
                    // again; its members are the ones to tell.
                    let room = if room.is_removed() { shared.hub.room(&room.name) } else { Some(room) };
                    if let Some(room) = room {
                        room.deliver(published.offset, &frame, Some(sender));
                    }
                }
                then(&result);
            }),
        );
    }

    /// What a sender is told to wait when the store cannot keep or read:
    /// `history.retry_after`, in milliseconds.
    fn retry_after_ms(&self) -> u64 {
        u64::try_from(self.shared.config.history.retry_after.as_millis()).unwrap_or(u64::MAX)
    }

    /// Answers `history`: up to `limit` messages of the current room below
    /// `before`, oldest first, each exactly as it was broadcast.
    fn history(&self, before: Option<u64>, limit: Option<u32>) {
        let Some(room) = &self.room else {
            return self.error("Join a room before asking for its history", "notInRoom");
        };
        let Some(engine) = &self.shared.history else {
            return self.error("This server keeps no history", "historyDisabled");
        };
        let limit = limit.map_or(DEFAULT_HISTORY_LIMIT, |limit| limit as usize);
        let page = match engine.history(&room.name, before, limit) {
            Ok(page) => page,
            Err(err) => {
                tracing::warn!(cause = %err, "history could not be read");
                return self.reply(&unavailable(self.retry_after_ms()));
            }
        };
        // The stored messages are JSON already: they are spliced in as
        // they are, not parsed and encoded again.
        let mut json =
            String::with_capacity(64 + page.messages.iter().map(|m| m.bytes.len() + 1).sum::<usize>());
        json.push_str(r#"{"type":"history","room":"#);
        json.push_str(&serde_json::Value::from(&*room.name).to_string());
        json.push_str(r#","epoch":"#);
        json.push_str(&serde_json::Value::from(page.position.epoch.as_str()).to_string());
        json.push_str(r#","messages":["#);
        for (i, message) in page.messages.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(std::str::from_utf8(&message.bytes).unwrap_or("null"));
        }
        json.push_str(r#"],"hasMore":"#);
        json.push_str(if page.has_more { "true}" } else { "false}" });
        let frame = ws::encode(ws::OpCode::Text, json.as_bytes());
        let len = frame.len();
        if self.peer.send(frame) {
            let stats = &self.shared.hub.stats;
            stats.delivered.inc();
            stats.bytes_out.inc_by(len as u64);
        }
    }

    /// Leaves the current room, if any; returns its name.
    fn leave_room(&mut self) -> Option<Arc<str>> {
        let room = self.room.take()?;
        self.shared.hub.leave(&self.peer, self.name(), &room);
        if let Some(cluster) = &self.shared.cluster {
            cluster.left(&room.name, self.peer.id());
        }
        tracing::debug!(room = %room.name, "left room");
        Some(room.name.clone())
    }
}

impl Handler for ChatSession {
    async fn on_text(&mut self, text: Text) {
        match decode_client(text.as_str(), &self.shared.config.protocol) {
            Ok(msg) => {
                if matches!(self.auth, AuthState::Awaiting(_)) && !matches!(msg, ClientMessage::Auth { .. }) {
                    return self
                        .reject("Authentication required: send auth {token} first", CLOSE_UNAUTHENTICATED);
                }
                if self.within_limits(&msg) {
                    self.handle(msg).await;
                }
            }
            Err(err) => {
                tracing::debug!(error = %err, "refused client message");
                // Error replies count against the control limit, so garbage
                // cannot make the server write without bound.
                if self.limit(Kind::Control, "invalid") {
                    self.reply(&err.to_event());
                }
            }
        }
    }

    async fn on_binary(&mut self, data: Bytes) {
        if matches!(self.auth, AuthState::Awaiting(_)) {
            return self.reject("Authentication required: send auth {token} first", CLOSE_UNAUTHENTICATED);
        }
        let shared = self.shared.clone();
        match self.uploads.chunk(&shared.config.uploads, data).await {
            Some(outcome) => self.act(outcome),
            // Error replies count against the control limit, like every
            // other reply to something the client got wrong.
            None => {
                if self.limit(Kind::Control, "binary") {
                    self.error("No file upload in progress", "noUpload");
                }
            }
        }
    }

    fn on_close(&mut self) {
        self.uploads.close(&self.shared.store);
        if self.shared.shutdown.is_cancelled() {
            // The server is going away, not the member: nobody is told that
            // everyone else left (they reconnect once the server is back).
            if let Some(room) = self.room.take() {
                self.shared.hub.leave_quietly(&self.peer, &room);
            }
        }
        // Messages still waiting for the store are delivered first: the
        // room hears of the departure after the member's last words.
        let waiting = self.in_flight.take().filter(|f| !f.is_idle());
        if let Some(in_flight) = waiting
            && let Some(room) = self.room.take()
        {
            let (shared, peer, name) = (self.shared.clone(), self.peer.clone(), self.name().to_owned());
            self.shared.tasks.spawn(async move {
                in_flight.below(1).await;
                shared.hub.leave(&peer, &name, &room);
                if let Some(cluster) = &shared.cluster {
                    cluster.left(&room.name, peer.id());
                }
            });
        }
        self.leave_room();
        self.shared.hub.lobby.remove(&self.peer.id());
    }

    fn deadline(&self) -> Option<TokioInstant> {
        match &self.auth {
            AuthState::Off => None,
            AuthState::Awaiting(deadline) => Some(*deadline),
            AuthState::Authenticated { expires, warned: true, .. } => Some(*expires),
            AuthState::Authenticated { expires, warned: false, .. } => {
                Some(expires.checked_sub(self.shared.config.auth.expiry_warning).unwrap_or(*expires))
            }
        }
    }

    fn on_deadline(&mut self) {
        match &mut self.auth {
            AuthState::Off => {}
            AuthState::Awaiting(_) => self.reject("Authentication timed out", CLOSE_UNAUTHENTICATED),
            AuthState::Authenticated { identity, warned, .. } if !*warned => {
                *warned = true;
                let expires_at = identity.expires_at_ms;
                self.reply(&ServerMessage::AuthExpiring { expires_at });
            }
            AuthState::Authenticated { .. } => {
                tracing::info!("token expired; closing");
                self.error("Your token expired", "tokenExpired");
                self.peer.close(CloseReason {
                    code: CloseCode::from(CLOSE_TOKEN_EXPIRED),
                    reason: "Token expired",
                    drain_queue: true,
                });
            }
        }
    }
}

/// Milliseconds since the Unix epoch, by the server's clock.
pub(crate) fn now_ms() -> u64 {
    // A clock before 1970 is a broken host; report 0 rather than fail a chat.
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::json;

    use super::*;
    use crate::Config;
    use crate::testing::{drain, shared};

    /// A chat session with no socket: what it queues is read from its peer.
    fn session(shared: &Arc<Shared>) -> (ChatSession, Peer) {
        let peer = Peer::new(64, 1 << 20, crate::deflate::Deflate::OFF);
        let session = ChatSession::start(shared.clone(), peer.clone(), "127.0.0.1".parse().unwrap(), None);
        let greeting = drain(&peer);
        assert_eq!(greeting[0]["type"], "welcome");
        assert_eq!(greeting[1], json!({"type": "connected", "clientId": peer.id()}));
        (session, peer)
    }

    /// Hands `msg` to the session and waits until what it answers is queued
    /// (a room message's ack comes from the store's callback).
    async fn say(session: &mut ChatSession, msg: serde_json::Value) {
        session.on_text(Text::from(msg.to_string().as_str())).await;
        if let Some(in_flight) = &session.in_flight {
            in_flight.below(1).await;
        }
    }

    #[tokio::test]
    async fn two_sessions_meet_chat_and_part_without_a_socket() {
        let shared = shared(Config::default());
        let (mut ada, ada_q) = session(&shared);
        let (mut bob, bob_q) = session(&shared);
        say(&mut ada, json!({"type": "setUsername", "username": " ada "})).await;
        assert_eq!(drain(&ada_q), [json!({"type": "usernameSet", "username": "ada"})]);
        say(&mut ada, json!({"type": "joinRoom", "room": "r"})).await;
        say(&mut bob, json!({"type": "joinRoom", "room": "r"})).await;
        drain(&ada_q);
        drain(&bob_q);

        let id = "6F1C2A9E-3B0D-4C55-9A57-2F8E4D1B7C10";
        say(&mut ada, json!({"type": "chatMessage", "text": "hi", "clientMsgId": id})).await;
        let ack = drain(&ada_q);
        assert_eq!(ack.len(), 1, "the sender gets its ack and not its own message: {ack:?}");
        assert_eq!(ack[0]["type"], "messageAck");
        assert_eq!(ack[0]["clientMsgId"], id, "the id comes back as sent");
        let got = drain(&bob_q);
        assert_eq!(got.len(), 1);
        assert_eq!((&got[0]["user"], &got[0]["text"]), (&json!("ada"), &json!("hi")));
        assert_eq!(got[0]["timestamp"], ack[0]["timestamp"]);

        // A resend is acknowledged again with the first timestamp, and not
        // delivered twice.
        say(&mut ada, json!({"type": "chatMessage", "text": "hi", "clientMsgId": id.to_lowercase()})).await;
        let again = drain(&ada_q);
        assert_eq!(again[0]["timestamp"], ack[0]["timestamp"]);
        assert!(drain(&bob_q).is_empty());

        // A rename is announced to the room; closing is leaving.
        say(&mut ada, json!({"type": "setUsername", "username": "ada2"})).await;
        assert_eq!(
            drain(&bob_q),
            [json!({"type": "userRenamed", "user": "ada2", "previous": "ada", "room": "r"})]
        );
        ada.on_close();
        assert_eq!(drain(&bob_q), [json!({"type": "userLeft", "user": "ada2", "userCount": 1, "room": "r"})]);
    }

    #[tokio::test]
    async fn a_store_that_cannot_write_answers_unavailable_and_recovers() {
        use hubbub_history::{FaultInjector, MemoryEngine, Options};
        let faults = FaultInjector::default();
        let engine = MemoryEngine::new(Options { faults: faults.clone(), ..Options::default() });
        let shared = crate::testing::shared_with_history(Config::default(), Arc::new(engine));
        let (mut ada, ada_q) = session(&shared);
        let (mut bob, bob_q) = session(&shared);
        say(&mut ada, json!({"type": "joinRoom", "room": "r"})).await;
        say(&mut bob, json!({"type": "joinRoom", "room": "r"})).await;
        drain(&ada_q);
        drain(&bob_q);
        let id = "6f1c2a9e-3b0d-4c55-9a57-2f8e4d1b7c10";
        faults.fail_writes(true);
        say(&mut ada, json!({"type": "chatMessage", "text": "hi", "clientMsgId": id})).await;
        let refused = drain(&ada_q);
        assert_eq!(refused.len(), 1, "no ack: {refused:?}");
        assert_eq!((&refused[0]["code"], &refused[0]["retryAfterMs"]), (&json!("unavailable"), &json!(1000)));
        assert!(drain(&bob_q).is_empty(), "nothing delivered that was not kept");
        // The store writes again: the resend is kept, acked and delivered,
        // with the first offset (the failure used none).
        faults.fail_writes(false);
        say(&mut ada, json!({"type": "chatMessage", "text": "hi", "clientMsgId": id})).await;
        let ack = drain(&ada_q);
        assert_eq!((&ack[0]["type"], &ack[0]["offset"]), (&json!("messageAck"), &json!(1)));
        let got = drain(&bob_q);
        assert_eq!((&got[0]["text"], &got[0]["offset"]), (&json!("hi"), &json!(1)));
    }

    #[tokio::test]
    async fn bad_input_is_answered_and_limited_without_a_socket() {
        let mut config = Config::default();
        // The burst and, however slow the machine, no refill.
        config.rate_limit.control_per_sec = 0.001;
        let shared = shared(config);
        let (mut c, q) = session(&shared);
        c.on_text(Text::from("not json")).await;
        assert_eq!(
            drain(&q)[0],
            json!({"type": "error", "message": "Invalid message format", "code": "invalidFormat"})
        );
        say(&mut c, json!({"type": "chatMessage", "text": "x"})).await;
        assert_eq!(drain(&q)[0]["code"], "notInRoom");
        // Binary frames with no upload are charged to the control bucket
        // (40 in a burst, one of them taken by the undecodable frame).
        for _ in 0..45 {
            c.on_binary(Bytes::from_static(&[0, 0, 0, 0, 1])).await;
        }
        let answers = drain(&q);
        assert_eq!(answers.iter().filter(|m| m["code"] == "noUpload").count(), 39);
        assert_eq!(answers.iter().filter(|m| m["code"] == "rateLimited").count(), 6);
    }
}
