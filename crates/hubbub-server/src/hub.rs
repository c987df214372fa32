//! The hub: who is connected, which rooms exist, and fan-out.
//!
//! A broadcast is encoded once into a [`Frame`] (the complete WebSocket
//! frame, header included) and the same bytes are handed to every
//! recipient's bounded queue by reference count; the connection writes them
//! to its socket as they are, with no copy per recipient. Delivery never
//! waits: a recipient whose queue is full is told to close (1008) and is
//! dropped, so one slow reader cannot hold up a room or grow memory.
//!
//! Locking: the rooms map is a short `std::sync::Mutex` taken only to join
//! or leave. Each room's member list has its own `RwLock`; broadcasts take it
//! for reading, so messages to different rooms never contend and messages to
//! one room proceed in parallel. A connection keeps an `Arc` to its room, so
//! a room message never touches the rooms map. No lock is held across an
//! `.await` (there is no `.await` in this module).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::ws::CloseCode;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use hubbub_protocol::ServerMessage;

pub(crate) use crate::metrics::Stats;
use crate::ws;
use uuid::Uuid;

/// A connection's id, sent to chat clients in `connected {clientId}`.
pub(crate) type ClientId = Uuid;

/// A complete WebSocket frame, header included, ready for the socket and
/// shared by reference count among its recipients.
pub(crate) type Frame = Bytes;

/// Encodes a message once, as a text frame, for any number of recipients.
pub(crate) fn encode(msg: &ServerMessage) -> Frame {
    ws::encode(ws::OpCode::Text, msg.to_json().as_bytes())
}

/// Why a connection is closing, chosen by whoever closes it first.
#[derive(Clone, Debug)]
pub(crate) struct CloseReason {
    /// The close code sent to the peer.
    pub(crate) code: CloseCode,
    /// The close frame's reason text.
    pub(crate) reason: &'static str,
    /// Whether frames already queued are sent before the close frame.
    pub(crate) drain_queue: bool,
}

/// The close sent when the server shuts down with nothing else recorded.
const GOING_AWAY: CloseReason =
    CloseReason { code: CloseCode::AWAY, reason: "Server shutting down", drain_queue: true };

/// The part of a connection that others may touch: its id, its outbound
/// queue and its close switch. One pointer: cloning is a reference count,
/// and the hub's maps hold 8 bytes per member besides the key.
#[derive(Clone, Debug)]
pub(crate) struct Peer {
    /// Shared with the connection's task.
    link: Arc<Link>,
}

/// What a connection shares with those who send to it.
#[derive(Debug)]
struct Link {
    /// The connection's id.
    id: ClientId,
    /// Frames waiting for the connection's task, in order. The deque is
    /// handed to the task whole and starts unallocated again, so an idle
    /// connection holds no queue memory.
    queue: Mutex<VecDeque<Frame>>,
    /// Most frames that may wait, queued or taken by the task but not yet
    /// written.
    capacity: u32,
    /// Most bytes that may wait, likewise.
    max_bytes: u32,
    /// Frames queued and not yet written, counted down by the task as it
    /// writes them.
    backlog_frames: AtomicU32,
    /// Bytes queued and not yet written.
    backlog_bytes: AtomicU32,
    /// Wakes the connection's task: frames queued, or a close asked for.
    waker: AtomicWaker,
    /// Set once the connection must close; nothing more is queued after.
    closing: AtomicBool,
    /// The token of the last heartbeat pong, for the sweeper (`beat`).
    last_pong: AtomicU32,
    /// The first close reason recorded wins.
    reason: OnceLock<CloseReason>,
}

impl Peer {
    /// A new connection's shared half, whose queue holds `capacity` frames
    /// and `max_bytes` bytes (limits past `u32::MAX` count as `u32::MAX`).
    pub(crate) fn new(capacity: usize, max_bytes: usize) -> Self {
        let link = Link {
            id: Uuid::new_v4(),
            queue: Mutex::new(VecDeque::new()),
            capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            max_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX),
            backlog_frames: AtomicU32::new(0),
            backlog_bytes: AtomicU32::new(0),
            waker: AtomicWaker::new(),
            closing: AtomicBool::new(false),
            last_pong: AtomicU32::new(0),
            reason: OnceLock::new(),
        };
        Self { link: Arc::new(link) }
    }

    /// The connection's id.
    pub(crate) fn id(&self) -> ClientId {
        self.link.id
    }

    /// Queues a frame without waiting. Returns false if the connection is
    /// closing or its queue was full, in frames or in bytes (in which case
    /// it is now closing). A frame always fits a queue with nothing waiting.
    pub(crate) fn send(&self, frame: Frame, stats: &Stats) -> bool {
        let link = &*self.link;
        let mut queue = lock(&link.queue);
        if link.closing.load(Ordering::Acquire) {
            return false;
        }
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        let frames = link.backlog_frames.load(Ordering::Acquire);
        let bytes = link.backlog_bytes.load(Ordering::Acquire);
        if frames > 0 && (frames >= link.capacity || bytes.saturating_add(len) > link.max_bytes) {
            drop(queue);
            let reason = CloseReason {
                code: CloseCode::POLICY,
                reason: "Slow consumer: outbound queue full",
                drain_queue: false,
            };
            if self.close(reason) {
                stats.slow_consumers.inc();
                tracing::warn!(
                    client = %self.id(),
                    frames,
                    bytes,
                    "slow consumer: outbound queue full, disconnecting"
                );
            }
            return false;
        }
        // Counted under the queue's lock, so two senders cannot both pass
        // the check with the last place.
        link.backlog_frames.fetch_add(1, Ordering::AcqRel);
        link.backlog_bytes.fetch_add(len, Ordering::AcqRel);
        let was_empty = queue.is_empty();
        queue.push_back(frame);
        drop(queue);
        // A non-empty queue has already woken the task, which empties the
        // queue before it sleeps again.
        if was_empty {
            self.link.waker.wake();
        }
        true
    }

    /// Queues an encoded frame shared with other recipients.
    pub(crate) fn send_text(&self, frame: &Frame, stats: &Stats) -> bool {
        self.send(frame.clone(), stats)
    }

    /// Queues a message for this peer alone.
    pub(crate) fn reply(&self, msg: &ServerMessage, stats: &Stats) -> bool {
        let frame = encode(msg);
        let len = frame.len();
        let sent = self.send(frame, stats);
        if sent {
            stats.delivered.inc();
            stats.bytes_out.inc_by(len as u64);
        }
        sent
    }

    /// Asks the connection to close. Returns true if this call decided the
    /// reason, false if the connection was already closing.
    pub(crate) fn close(&self, reason: CloseReason) -> bool {
        let first = self.link.reason.set(reason).is_ok();
        self.link.closing.store(true, Ordering::Release);
        self.link.waker.wake();
        first
    }

    /// Records a heartbeat pong's token (tokens the sweeper sends fit 32
    /// bits; any other pong is ignored).
    pub(crate) fn record_pong(&self, token: u64) {
        if let Ok(token) = u32::try_from(token) {
            self.link.last_pong.store(token, Ordering::Release);
        }
    }

    /// The token of the last heartbeat pong, 0 before any.
    pub(crate) fn last_pong(&self) -> u32 {
        self.link.last_pong.load(Ordering::Acquire)
    }

    /// The task wrote (or dropped) these frames: they no longer count
    /// against the queue's limits.
    pub(crate) fn written(&self, frames: u32, bytes: usize) {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        // Saturating: frames the task writes itself (the close frame) were
        // never counted.
        let _ = self
            .link
            .backlog_frames
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(frames)));
        let _ = self
            .link
            .backlog_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(bytes)));
    }

    /// Whether so much waits to be written that the connection should stop
    /// reading (and so stop making replies) until its client catches up:
    /// half of either limit.
    pub(crate) fn backlogged(&self) -> bool {
        let link = &*self.link;
        link.backlog_frames.load(Ordering::Acquire) >= link.capacity / 2
            || link.backlog_bytes.load(Ordering::Acquire) >= link.max_bytes / 2
    }

    /// Whether the connection has been asked to close.
    pub(crate) fn is_closing(&self) -> bool {
        self.link.closing.load(Ordering::Acquire)
    }

    /// The close frame to send, once the connection is closing (shutdown
    /// when nobody recorded a reason).
    pub(crate) fn close_reason(&self) -> CloseReason {
        self.link.reason.get().cloned().unwrap_or(GOING_AWAY)
    }

    /// Registers the connection task's waker, before it looks at the queue
    /// and the close switch.
    pub(crate) fn register(&self, waker: &Waker) {
        self.link.waker.register(waker);
    }

    /// Moves every queued frame into `out`, which must be empty: the two
    /// deques swap, so the queue keeps `out`'s (usually unallocated) buffer.
    pub(crate) fn take_queued(&self, out: &mut VecDeque<Frame>) {
        debug_assert!(out.is_empty());
        std::mem::swap(&mut *lock(&self.link.queue), out);
    }

    /// Discards what is queued; later sends are refused.
    pub(crate) fn discard_queued(&self) {
        self.link.closing.store(true, Ordering::Release);
        drop(std::mem::take(&mut *lock(&self.link.queue)));
    }
}

impl CloseReason {
    /// The close frame to send for this reason.
    pub(crate) fn frame(&self) -> Frame {
        ws::encode_close(self.code, self.reason)
    }
}

/// A set of peers that receives broadcasts, split into shards so that
/// joining and leaving do not contend with each other or with delivery.
#[derive(Debug)]
pub(crate) struct PeerSet {
    /// Each peer lives in the shard its id selects.
    shards: Box<[RwLock<HashMap<ClientId, Peer>>]>,
}

impl PeerSet {
    /// A set with `shards` shards (at least one).
    pub(crate) fn new(shards: usize) -> Self {
        Self { shards: (0..shards.max(1)).map(|_| RwLock::default()).collect() }
    }

    fn shard(&self, id: &ClientId) -> &RwLock<HashMap<ClientId, Peer>> {
        // Ids are random v4 UUIDs, so their low bits spread evenly.
        let index = (id.as_u128() as usize) % self.shards.len();
        &self.shards[index]
    }

    /// Adds a peer.
    pub(crate) fn insert(&self, peer: Peer) {
        write(self.shard(&peer.id())).insert(peer.id(), peer);
    }

    /// Removes a peer.
    pub(crate) fn remove(&self, id: &ClientId) {
        write(self.shard(id)).remove(id);
    }

    /// Queues `frame` to every peer.
    pub(crate) fn broadcast(&self, frame: &Frame, stats: &Stats) {
        let started = Instant::now();
        let mut sent = 0;
        for shard in &self.shards {
            for peer in read(shard).values() {
                sent += u64::from(peer.send_text(frame, stats));
            }
        }
        stats.broadcast(sent, frame.len(), started);
    }
}

/// A room: a name and its members.
#[derive(Debug)]
pub(crate) struct Room {
    /// The room's name, as validated (trimmed).
    pub(crate) name: Arc<str>,
    /// Members by connection id. Written only under the hub's rooms lock.
    members: RwLock<HashMap<ClientId, Peer>>,
    /// Ids of recent messages, so a resend is delivered once.
    recent: Mutex<RecentIds>,
}

/// What [`Room::remember`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Remembered {
    /// A new id, now remembered with this timestamp.
    New,
    /// Seen before, delivered with this timestamp.
    Duplicate(u64),
}

/// Recently seen message ids of one room, bounded in age and in number.
#[derive(Debug, Default)]
pub(crate) struct RecentIds {
    /// Timestamp each id was delivered with, and who sent it: an id counts
    /// as a resend only from the same sender.
    by_id: HashMap<Uuid, (u64, Box<str>)>,
    /// Ids in the order they arrived, for expiry.
    order: VecDeque<(Instant, Uuid)>,
}

impl RecentIds {
    /// Remembers `id` unless it is already known; forgets ids older than
    /// `window` and, beyond `capacity`, the oldest.
    pub(crate) fn remember(
        &mut self,
        id: Uuid,
        sender: &str,
        timestamp: u64,
        now: Instant,
        window: Duration,
        capacity: usize,
    ) -> Remembered {
        // Forget what has aged out of the window.
        while let Some(&(at, old)) = self.order.front() {
            if now.saturating_duration_since(at) <= window {
                break;
            }
            self.order.pop_front();
            self.by_id.remove(&old);
        }
        match self.by_id.get(&id) {
            Some((original, from)) if **from == *sender => return Remembered::Duplicate(*original),
            // Someone else's id: deliver, but keep the first sender's entry.
            Some(_) => return Remembered::New,
            None => {}
        }
        // Make room: beyond capacity, the oldest go first.
        while self.order.len() >= capacity.max(1) {
            if let Some((_, old)) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
        self.by_id.insert(id, (timestamp, sender.into()));
        self.order.push_back((now, id));
        Remembered::New
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_are_bounded_in_age_and_number() {
        let mut recent = RecentIds::default();
        let t0 = Instant::now();
        let window = Duration::from_secs(60);
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        assert_eq!(recent.remember(a, "ada", 100, t0, window, 2), Remembered::New);
        assert_eq!(recent.remember(a, "ada", 999, t0, window, 2), Remembered::Duplicate(100));
        // The same id from someone else is not a resend.
        assert_eq!(recent.remember(a, "eve", 999, t0, window, 2), Remembered::New);
        assert_eq!(recent.remember(b, "ada", 200, t0, window, 2), Remembered::New);
        // Capacity 2: remembering c forgets a, the oldest.
        assert_eq!(recent.remember(c, "ada", 300, t0, window, 2), Remembered::New);
        assert_eq!(recent.remember(a, "ada", 400, t0, window, 2), Remembered::New);
        // Past the window everything is forgotten.
        let later = t0 + window + Duration::from_millis(1);
        assert_eq!(recent.remember(c, "ada", 500, later, window, 2), Remembered::New);
        assert_eq!(recent.by_id.len(), recent.order.len());
        assert_eq!(recent.by_id.len(), 1);
    }
}

impl Room {
    /// Checks a message id against the room's recent ids.
    pub(crate) fn remember(
        &self,
        id: Uuid,
        sender: &str,
        timestamp: u64,
        window: Duration,
        capacity: usize,
    ) -> Remembered {
        lock(&self.recent).remember(id, sender, timestamp, Instant::now(), window, capacity)
    }

    /// Queues `frame` to every member but `except`.
    pub(crate) fn broadcast(&self, frame: &Frame, except: Option<ClientId>, stats: &Stats) {
        let started = Instant::now();
        let mut sent = 0;
        for (id, peer) in read(&self.members).iter() {
            if Some(*id) != except {
                sent += u64::from(peer.send_text(frame, stats));
            }
        }
        stats.broadcast(sent, frame.len(), started);
    }

    /// Current number of members.
    pub(crate) fn len(&self) -> usize {
        read(&self.members).len()
    }
}

/// Rooms, the lobby of chat clients, and the notification subscribers.
#[derive(Debug)]
pub(crate) struct Hub {
    /// Rooms by name. Locked only to join or leave.
    rooms: Mutex<HashMap<Arc<str>, Arc<Room>>>,
    /// Every chat connection, for the lobby `chat` broadcast.
    pub(crate) lobby: PeerSet,
    /// Every `/ws/notifications` subscriber.
    pub(crate) subscribers: PeerSet,
    /// Counters.
    pub(crate) stats: Stats,
}

/// What [`Hub::join`] tells the joiner.
pub(crate) struct Joined {
    /// The room now joined.
    pub(crate) room: Arc<Room>,
    /// Members after the join.
    pub(crate) user_count: usize,
}

/// Shards for the lobby and subscriber sets: enough that joins on a few
/// cores rarely meet, few enough that a broadcast's walk stays cheap.
const SHARDS: usize = 16;

impl Hub {
    /// An empty hub.
    pub(crate) fn new() -> Self {
        Self {
            rooms: Mutex::default(),
            lobby: PeerSet::new(SHARDS),
            subscribers: PeerSet::new(SHARDS),
            stats: Stats::new(),
        }
    }

    /// Number of rooms.
    pub(crate) fn room_count(&self) -> usize {
        lock(&self.rooms).len()
    }

    /// Names of the rooms with their member counts, sorted by name.
    pub(crate) fn rooms(&self) -> Vec<(Arc<str>, usize)> {
        let rooms: Vec<Arc<Room>> = lock(&self.rooms).values().cloned().collect();
        let mut out: Vec<_> = rooms.iter().map(|r| (r.name.clone(), r.len())).collect();
        out.sort();
        out
    }

    /// Adds `peer` to the room `name` (creating it if new) and tells every
    /// member, the joiner included, with `userJoined`; then tells the joiner
    /// `roomJoined`. The caller must have left any previous room.
    pub(crate) fn join(&self, peer: &Peer, user: &str, name: &str) -> Joined {
        let mut rooms = lock(&self.rooms);
        let (room, created) = match rooms.get(name) {
            Some(room) => (room.clone(), false),
            None => {
                let room = Arc::new(Room {
                    name: Arc::from(name),
                    members: RwLock::default(),
                    recent: Mutex::default(),
                });
                rooms.insert(room.name.clone(), room.clone());
                self.stats.rooms.set(rooms.len() as i64);
                (room, true)
            }
        };
        // Lock order: rooms map, then room. The member list is updated and the
        // join announced under the room's write lock, so every member sees
        // `userJoined` before any later message in the room.
        let mut members = write(&room.members);
        if created {
            // Under the rooms lock, so subscribers see creations and removals
            // in the order they happened.
            self.notify(&ServerMessage::RoomCreated { room: name.to_owned() });
        }
        drop(rooms);
        members.insert(peer.id(), peer.clone());
        let user_count = members.len();
        let joined =
            encode(&ServerMessage::UserJoined { user: user.to_owned(), room: name.to_owned(), user_count });
        let started = Instant::now();
        let sent: u64 = members.values().map(|m| u64::from(m.send_text(&joined, &self.stats))).sum();
        self.stats.broadcast(sent, joined.len(), started);
        peer.reply(&ServerMessage::RoomJoined { room: name.to_owned(), user_count }, &self.stats);
        drop(members);
        Joined { room, user_count }
    }

    /// Removes `peer` from `room`, tells those who remain with `userLeft`, and
    /// removes the room if it is now empty.
    pub(crate) fn leave(&self, peer: &Peer, user: &str, room: &Room) {
        let mut rooms = lock(&self.rooms);
        let mut members = write(&room.members);
        members.remove(&peer.id());
        let user_count = members.len();
        let removed = user_count == 0;
        if removed {
            rooms.remove(&room.name);
            self.stats.rooms.set(rooms.len() as i64);
            self.notify(&ServerMessage::RoomRemoved { room: room.name.to_string() });
        }
        drop(rooms);
        if !removed {
            let left = encode(&ServerMessage::UserLeft {
                user: user.to_owned(),
                user_count,
                room: Some(room.name.to_string()),
            });
            let started = Instant::now();
            let sent: u64 = members.values().map(|m| u64::from(m.send_text(&left, &self.stats))).sum();
            self.stats.broadcast(sent, left.len(), started);
        }
        drop(members);
    }

    /// Removes `peer` from `room` without telling the other members, for a
    /// server shutdown; the room goes when it is empty, as with
    /// [`Hub::leave`].
    pub(crate) fn leave_quietly(&self, peer: &Peer, room: &Room) {
        let mut rooms = lock(&self.rooms);
        let mut members = write(&room.members);
        members.remove(&peer.id());
        if members.is_empty() {
            rooms.remove(&room.name);
            self.stats.rooms.set(rooms.len() as i64);
        }
    }

    /// Sends a server event to every notification subscriber.
    pub(crate) fn notify(&self, event: &ServerMessage) {
        self.subscribers.broadcast(&encode(event), &self.stats);
    }
}

// A poisoned lock means a panic elsewhere while it was held; the maps stay
// structurally valid (every update is a single insert or remove), so carry on
// rather than turn one bug into a server-wide outage.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}
