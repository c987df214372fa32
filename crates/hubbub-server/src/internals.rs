//! Socket-free handles on the server's real types, for the project's own
//! benchmarks (`benches/fanout.rs`) and fuzz targets (`fuzz/`) only.
//!
//! This module exists behind the `internals` feature, off by default, and is
//! hidden from the documentation: it is **not** a stable API, and may change
//! with any commit. Each item is a thin wrapper that builds and drives the
//! types the server itself runs (`hub::Hub` and `hub::Room`, `link::Peer`,
//! `chat::ChatSession`, the HTTP router) the way a connection's task does,
//! minus the socket; it adds no behaviour of its own. So a benchmark or a
//! fuzz target measures or checks the code that serves clients, not a copy
//! of it that could drift.
//!
//! - [`BenchRoom`]: one room of a hub with its members, for fan-out.
//! - [`ChatServer`] and [`ChatClient`]: chat sessions on one server's state,
//!   fed text and binary messages directly, their replies read off their
//!   queues.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use bytes::Bytes;
use hubbub_protocol::ServerMessage;
use tower::ServiceExt as _;
use uuid::Uuid;

use crate::chat::ChatSession;
use crate::conn::Handler as _;
use crate::deflate::Deflate;
use crate::hub::{Hub, Room};
use crate::link::{CloseReason, Frame, Peer, encode};
use crate::metrics::Stats;
use crate::ws::{CloseCode, Text};
use crate::{Config, ConfigError, Server, Shared};

/// Takes everything queued for `peer` as its connection's task does before
/// a write (the queue swapped whole for an empty deque), and counts it as
/// written, as the task does once the socket took it.
fn take_written(peer: &Peer) -> VecDeque<Frame> {
    let mut taken = VecDeque::new();
    peer.take_queued(&mut taken);
    let bytes = taken.iter().map(|frame| frame.len()).sum();
    peer.written(u32::try_from(taken.len()).unwrap_or(u32::MAX), bytes);
    taken
}

/// The opcode and payload of one complete server frame (server frames are
/// never masked; a queued [`Frame`] is always exactly one frame).
fn split(frame: &[u8]) -> (u8, &[u8]) {
    let header = match frame.get(1).map(|len| len & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    let opcode = frame.first().map_or(0, |first| first & 0x0f);
    (opcode, frame.get(header..).unwrap_or_default())
}

/// One room of a real [`Hub`]: a sender and `recipients` other members, each
/// a [`Peer`] with the server's default queue limits, who joined through
/// `Hub::join` as chat clients do.
pub struct BenchRoom {
    /// Keeps the room's hub (and its stats) alive.
    _hub: Hub,
    /// The room every member is in.
    room: Arc<Room>,
    /// The member whose messages the others receive.
    sender: Peer,
    /// The other members.
    recipients: Vec<Peer>,
    /// The offset of the last message delivered.
    offset: AtomicU64,
}

impl BenchRoom {
    /// A room of `recipients + 1` members. Their join announcements are
    /// taken off their queues as they join, so every queue starts empty.
    pub fn new(recipients: usize) -> Self {
        let hub = Hub::new(Arc::new(Stats::new()));
        let limits = Config::default().websocket;
        let peer = || Peer::new(limits.outbound_queue, limits.outbound_queue_bytes, Deflate::OFF);
        let sender = peer();
        let room = hub.join(&sender, "sender", "bench", None).room;
        take_written(&sender);
        let mut members = vec![sender.clone()];
        for i in 0..recipients {
            let member = peer();
            hub.join(&member, &format!("member{i}"), "bench", None);
            members.push(member);
            // Every join is announced to every member: empty the queues
            // well before they reach the limit of frames.
            if members.len() % 64 == 0 || i + 1 == recipients {
                members.iter().for_each(|member| drop(take_written(member)));
            }
        }
        assert!(members.iter().all(|member| !member.is_closing()), "no member fell behind while joining");
        members.remove(0);
        Self { _hub: hub, room, sender, recipients: members, offset: AtomicU64::new(0) }
    }

    /// Members besides the sender.
    pub fn recipients(&self) -> usize {
        self.recipients.len()
    }

    /// Encodes `msg` once and delivers it to every member but the sender as
    /// the room's next kept message (`Room::deliver`), as a `chatMessage`
    /// goes out once the history store has kept it.
    pub fn deliver(&self, msg: &ServerMessage) {
        let offset = self.offset.fetch_add(1, Ordering::Relaxed) + 1;
        self.room.deliver(offset, &encode(msg), Some(self.sender.id()));
    }

    /// Takes each recipient's queue whole and counts it written, as each
    /// connection's task does around its write; returns the frames taken.
    pub fn take_all(&self) -> usize {
        self.recipients.iter().map(|peer| take_written(peer).len()).sum()
    }

    /// Whether any recipient has been closed (a queue overflowed).
    pub fn any_closing(&self) -> bool {
        self.recipients.iter().any(Peer::is_closing)
    }
}

/// A server's state without a listener: chat sessions are started on it
/// directly, each with its own [`Peer`] and no socket.
pub struct ChatServer {
    /// What every request and connection of a running server shares.
    shared: Arc<Shared>,
    /// The server's HTTP routes over `shared`, built once.
    router: axum::Router,
}

/// The address every session of a [`ChatServer`] comes from.
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

impl ChatServer {
    /// The state `Server::new(config)` builds (which validates `config` and
    /// opens its upload directory); nothing is bound or spawned.
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        let shared = Server::new(config)?.shared;
        Ok(Self { router: crate::http::router(shared.clone()), shared })
    }

    /// Starts a chat session from 127.0.0.1, as an upgrade to `/ws/chat`
    /// without a token does: its queue gets `welcome` and `connected`.
    pub fn connect(&self) -> ChatClient {
        let limits = &self.shared.config.websocket;
        let peer = Peer::new(limits.outbound_queue, limits.outbound_queue_bytes, Deflate::OFF);
        let session = ChatSession::start(self.shared.clone(), peer.clone(), LOOPBACK, None);
        ChatClient { session, peer }
    }

    /// The rooms and their member counts, sorted by name (`Hub::rooms`).
    pub fn rooms(&self) -> Vec<(String, usize)> {
        self.shared.hub.rooms().into_iter().map(|(name, count)| (name.to_string(), count)).collect()
    }

    /// Chat sessions in the lobby (every session started and not closed).
    pub fn lobby_len(&self) -> usize {
        self.shared.hub.lobby.len()
    }

    /// The body of `GET /api/rooms`, from the server's own router (no
    /// socket), parsed as JSON.
    ///
    /// # Panics
    ///
    /// If the route does not answer 200 with JSON: a finding.
    pub async fn api_rooms(&self) -> serde_json::Value {
        let request = axum::http::Request::get("/api/rooms").body(Body::empty());
        // A fixed, valid URI and method.
        #[expect(clippy::unwrap_used, reason = "a constant request")]
        let request = request.unwrap();
        let response = match self.router.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        assert_eq!(response.status(), axum::http::StatusCode::OK, "GET /api/rooms");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await;
        let body = body.unwrap_or_else(|err| panic!("GET /api/rooms: {err}"));
        serde_json::from_slice(&body).unwrap_or_else(|err| panic!("GET /api/rooms: {err}"))
    }
}

/// One chat session of a [`ChatServer`], driven as its connection's task
/// drives it, minus the socket.
pub struct ChatClient {
    /// The session, as the endpoint's handler.
    session: ChatSession,
    /// Its connection's shared half, where its replies and broadcasts queue.
    peer: Peer,
}

impl ChatClient {
    /// The session's `clientId`.
    pub fn id(&self) -> Uuid {
        self.peer.id()
    }

    /// A text message arrived (`Handler::on_text`); returns once the session
    /// has acted on it.
    pub async fn text(&mut self, text: &str) {
        self.session.on_text(Text::from(text)).await;
    }

    /// A binary message arrived (`Handler::on_binary`).
    pub async fn binary(&mut self, data: &[u8]) {
        self.session.on_binary(Bytes::copy_from_slice(data)).await;
    }

    /// Takes what is queued for the session, as its task would write it,
    /// and parses each frame as JSON, in order.
    ///
    /// # Panics
    ///
    /// If a queued frame is not a text frame of JSON: nothing else is ever
    /// queued for a chat client without a socket (pongs and heartbeat pings
    /// come from the connection's task and the sweeper).
    pub fn take_json(&self) -> Vec<serde_json::Value> {
        take_written(&self.peer)
            .iter()
            .map(|frame| {
                let (opcode, payload) = split(frame);
                assert_eq!(opcode, 0x1, "a chat client is sent text frames only");
                serde_json::from_slice(payload)
                    .unwrap_or_else(|err| panic!("a frame that is not JSON: {err}"))
            })
            .collect()
    }

    /// Whether the session's connection has been asked to close (a slow
    /// consumer, a flood, a refused token).
    pub fn is_closing(&self) -> bool {
        self.peer.is_closing()
    }

    /// The connection ends, as its task ends it: the close reason recorded
    /// first (the client's close frame when `clean`, a vanished transport
    /// otherwise), then `Handler::on_close`.
    pub fn close(mut self, clean: bool) {
        let reason = if clean {
            CloseReason { code: CloseCode::NORMAL, reason: "", drain_queue: false }
        } else {
            CloseReason::ABNORMAL
        };
        self.peer.close(reason);
        self.session.on_close();
    }
}

/// Inflates one compressed client message as the server's decoder does
/// (permessage-deflate, the trailing `00 00 ff ff` removed), into at most
/// `limit` bytes: `None` when the server would refuse it (1009 past the
/// limit, 1007 for bad data). For the `inflate` fuzz target.
pub fn inflate(compressed: &[u8], limit: usize) -> Option<Vec<u8>> {
    crate::deflate::inflate(compressed, limit).ok()
}

/// Compresses one message as the server does for a broadcast: `None` when
/// it would go uncompressed because compressing does not make it smaller.
pub fn compress(message: &[u8]) -> Option<Vec<u8>> {
    crate::deflate::compress(message)
}
