//! The hub: which rooms exist, who is in them and in the lobby, and fan-out.
//! It knows connections only as [`Peer`] handles (`link`); it builds no
//! WebSocket frame itself beyond encoding a message once.
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hubbub_protocol::ServerMessage;
use uuid::Uuid;

use hubbub_history::{Engine, Epoch, Position, Recovery, StoredMessage};
use hubbub_protocol::Since;

use crate::link::{ClientId, Frame, Peer, encode};
use crate::metrics::Stats;
use crate::sync::{lock, read, write};
use crate::ws;

/// Queues `frame` to every peer of `peers` but `except`, and records the
/// broadcast: the one place fan-out happens and is counted.
fn fan_out<'a>(
    peers: impl IntoIterator<Item = &'a Peer>,
    frame: &Frame,
    except: Option<ClientId>,
    stats: &Stats,
) {
    let started = Instant::now();
    let mut sent = 0;
    for peer in peers {
        if Some(peer.id()) != except {
            sent += u64::from(peer.send(frame.clone()));
        }
    }
    stats.broadcast(sent, frame.len(), started);
}

/// Peers by id: each entry is the peer's pointer alone (8 bytes, where a
/// map from id to peer took 24), since a `Peer` hashes and compares by its
/// id and can be looked up by it.
type Peers = HashSet<Peer>;

/// A set of peers that receives broadcasts, split into shards so that
/// joining and leaving do not contend with each other or with delivery.
#[derive(Debug)]
pub(crate) struct PeerSet {
    /// Each peer lives in the shard its id selects.
    shards: Box<[RwLock<Peers>]>,
    /// Where broadcasts are counted.
    stats: Arc<Stats>,
}

impl PeerSet {
    /// A set with `shards` shards (at least one).
    pub(crate) fn new(shards: usize, stats: Arc<Stats>) -> Self {
        Self { shards: (0..shards.max(1)).map(|_| RwLock::default()).collect(), stats }
    }

    fn shard(&self, id: &ClientId) -> &RwLock<Peers> {
        // Ids are random v4 UUIDs, so their low bits spread evenly.
        let index = (id.as_u128() as usize) % self.shards.len();
        &self.shards[index]
    }

    /// Adds a peer.
    pub(crate) fn insert(&self, peer: Peer) {
        write(self.shard(&peer.id())).insert(peer);
    }

    /// Removes a peer.
    pub(crate) fn remove(&self, id: &ClientId) {
        write(self.shard(id)).remove(id);
    }

    /// Number of peers, shard by shard (for `internals`).
    #[cfg(feature = "internals")]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|shard| read(shard).len()).sum()
    }

    /// Queues `frame` to every peer.
    pub(crate) fn broadcast(&self, frame: &Frame) {
        for shard in &self.shards {
            fan_out(read(shard).iter(), frame, None, &self.stats);
        }
    }
}

/// A room: a name and its members.
#[derive(Debug)]
pub(crate) struct Room {
    /// The room's name, as validated (trimmed).
    pub(crate) name: Arc<str>,
    /// Members by connection id. Written only under the hub's rooms lock.
    members: RwLock<Peers>,
    /// Ids of recent messages, so a resend is delivered once.
    recent: Mutex<RecentIds>,
    /// Where broadcasts are counted.
    stats: Arc<Stats>,
    /// The offset of the newest kept message delivered to the members
    /// (0 for none; from the store when the room came into being here).
    /// Written only under the member lock, read by joins under its write
    /// lock: a joiner is replayed what is at or below it and receives what
    /// is above it live, so it never misses or doubles a message.
    delivered: AtomicU64,
    /// Set once the room has been removed from the hub (it emptied).
    removed: AtomicBool,
    /// Cluster mode: where this node stands with the room's stream in Redis.
    feed: Mutex<Feed>,
    /// Cluster mode: the room's members on other nodes.
    others: Mutex<Remote>,
    /// How many members `others` holds, for counts without its lock
    /// (written only under it).
    remote: AtomicUsize,
}

/// Cluster mode: a room's members on other nodes, from their events and
/// from the periodic reads of Redis's presence. A read is older than the
/// events handled while it was on its way, so it changes only what no event
/// touched since it was sent.
#[derive(Debug, Default)]
struct Remote {
    /// Node, then member id: name, and when an event or a read last said so.
    members: HashMap<Box<str>, HashMap<Box<str>, Seen>>,
    /// Members whose departure an event told, and when (until a read sent
    /// after it no longer lists them).
    departed: HashMap<(Box<str>, Box<str>), Instant>,
}

/// A member elsewhere's name, and when an event or a read last told of it.
type Seen = (Box<str>, Instant);

impl Remote {
    fn count(&self) -> usize {
        self.members.values().map(HashMap::len).sum()
    }
}

/// The room's members on other nodes of a cluster: node, then member id,
/// then name.
pub(crate) type Others = HashMap<Box<str>, HashMap<Box<str>, Box<str>>>;

/// Cluster mode: where this node stands with a room's stream. Kept
/// messages arrive from Redis in offset order; one that does not follow
/// `delivered` starts a repair (the missing ones are read from the stream),
/// and what arrives meanwhile waits in `pending`.
#[derive(Debug, Default)]
struct Feed {
    /// The room's epoch as this node knows it; `None` before it knows.
    epoch: Option<Epoch>,
    /// A repair is under way.
    repairing: bool,
    /// Kept messages that arrived during a repair, in arrival order.
    pending: Vec<Pending>,
    /// The newest offset Redis had at the previous position check.
    checked: u64,
}

/// A kept message waiting for a repair to finish.
#[derive(Debug)]
struct Pending {
    epoch: Epoch,
    offset: u64,
    frame: Frame,
    except: Option<ClientId>,
}

/// What a position check found for a room (cluster mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Checked {
    /// Nothing missing (or a repair is already under way).
    Fine,
    /// Messages are missing: repair.
    Behind,
    /// Messages Redis had at the previous check still have not arrived:
    /// repair, and the subscription is suspect.
    Stale,
}

/// What a join asks of the room's history.
pub(crate) struct Recall<'a> {
    /// The store.
    pub(crate) engine: &'a dyn Engine,
    /// Where the joiner's copy of the room ends, if it says.
    pub(crate) since: Option<&'a Since>,
    /// Most messages to replay.
    pub(crate) max_messages: usize,
    /// Most bytes to replay, so the replay fits the joiner's queue.
    pub(crate) max_bytes: usize,
    /// The room's position read before the join (cluster mode, so that no
    /// Redis round trip happens under the hub's locks); `None`: ask the
    /// engine.
    pub(crate) position: Option<Position>,
    /// The room's members on other nodes, read before the join (cluster
    /// mode); used when the room comes into being here.
    pub(crate) others: Option<Others>,
    /// Whether the engine may be asked during the join; false in a cluster
    /// whose Redis did not answer just before (the join must not wait for
    /// it under the hub's locks).
    pub(crate) readable: bool,
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
    pub(crate) fn broadcast(&self, frame: &Frame, except: Option<ClientId>) {
        fan_out(read(&self.members).iter(), frame, except, &self.stats);
    }

    /// Delivers the kept message at `offset` to every member but `except`,
    /// unless members already have it (a joiner was replayed it). Called in
    /// offset order, one at a time per room (the history engine's promise).
    pub(crate) fn deliver(&self, offset: u64, frame: &Frame, except: Option<ClientId>) {
        let members = read(&self.members);
        if offset <= self.delivered.load(Ordering::Acquire) {
            return;
        }
        fan_out(members.iter(), frame, except, &self.stats);
        self.delivered.store(offset, Ordering::Release);
    }

    /// Whether the room has emptied and left the hub.
    pub(crate) fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Current number of members, on every node of a cluster.
    pub(crate) fn len(&self) -> usize {
        read(&self.members).len() + self.remote.load(Ordering::Acquire)
    }

    /// Cluster mode: delivers the kept message at `offset` of `epoch` if it
    /// is the next one, skips it if members have it, and otherwise keeps it
    /// for a repair; true if a repair must start.
    pub(crate) fn feed(&self, epoch: &str, offset: u64, frame: &Frame, except: Option<ClientId>) -> bool {
        let members = read(&self.members);
        let mut feed = lock(&self.feed);
        let pending = |feed: &mut Feed| {
            feed.pending.push(Pending { epoch: Epoch::new(epoch), offset, frame: frame.clone(), except });
        };
        if feed.repairing {
            pending(&mut feed);
            return false;
        }
        if feed.epoch.is_none() {
            feed.epoch = Some(Epoch::new(epoch));
        }
        let delivered = self.delivered.load(Ordering::Acquire);
        let same_epoch = feed.epoch.as_ref().is_some_and(|known| known.as_str() == epoch);
        if same_epoch && offset <= delivered {
            return false;
        }
        if same_epoch && offset == delivered + 1 {
            fan_out(members.iter(), frame, except, &self.stats);
            self.delivered.store(offset, Ordering::Release);
            return false;
        }
        pending(&mut feed);
        feed.repairing = true;
        true
    }

    /// Cluster mode: the room's epoch as this node knows it, and the newest
    /// offset its members have had: where a repair reads from.
    pub(crate) fn stream_position(&self) -> (Option<Epoch>, u64) {
        let _members = read(&self.members);
        let feed = lock(&self.feed);
        (feed.epoch.clone(), self.delivered.load(Ordering::Acquire))
    }

    /// Cluster mode: finishes a repair with what the stream answered:
    /// delivers the missed messages, or tells the members to `resync` when
    /// they cannot all be given, then what waited meanwhile. False if
    /// another gap showed up and the repair must go on.
    pub(crate) fn repaired(&self, recovery: Recovery) -> bool {
        let members = read(&self.members);
        let mut feed = lock(&self.feed);
        let mut delivered = self.delivered.load(Ordering::Acquire);
        match recovery {
            Recovery::Recovered { position, messages } => {
                if feed.epoch.as_ref() != Some(&position.epoch) {
                    // Only a room whose epoch was unknown recovers in another.
                    feed.epoch = Some(position.epoch);
                }
                for message in messages {
                    if message.offset == delivered + 1 {
                        let frame = ws::encode(ws::OpCode::Text, &message.bytes);
                        fan_out(members.iter(), &frame, None, &self.stats);
                        delivered = message.offset;
                    }
                }
            }
            Recovery::NotRecoverable { position } => {
                let resync = encode(&ServerMessage::Resync {
                    room: self.name.to_string(),
                    epoch: position.epoch.as_str().to_owned(),
                    offset: position.offset,
                });
                fan_out(members.iter(), &resync, None, &self.stats);
                delivered = position.offset;
                feed.epoch = Some(position.epoch);
            }
        }
        let pending = std::mem::take(&mut feed.pending);
        let mut rest = pending.into_iter();
        let epoch = feed.epoch.clone();
        let mut gap = false;
        for message in rest.by_ref() {
            if epoch.as_ref() != Some(&message.epoch) || message.offset <= delivered {
                // Of an epoch gone by, or had already.
                continue;
            }
            if message.offset == delivered + 1 {
                fan_out(members.iter(), &message.frame, message.except, &self.stats);
                delivered = message.offset;
            } else {
                feed.pending.push(message);
                gap = true;
                break;
            }
        }
        feed.pending.extend(rest);
        self.delivered.store(delivered, Ordering::Release);
        feed.repairing = gap;
        !gap
    }

    /// Cluster mode: compares what Redis has (`None`: the room's keys are
    /// gone) with what members have had; a room found behind is marked as
    /// repairing, for the caller to repair. Messages newer than what members
    /// have may still be on their way: unless `now` (just after subscribing
    /// again), a room is repaired only when messages Redis already had at
    /// the previous check are missing (`Stale`), or its epoch changed.
    pub(crate) fn check(&self, epoch: Option<&str>, newest: u64, now: bool) -> Checked {
        let _members = read(&self.members);
        let mut feed = lock(&self.feed);
        if feed.repairing {
            return Checked::Fine;
        }
        let delivered = self.delivered.load(Ordering::Acquire);
        let previous = std::mem::replace(&mut feed.checked, newest);
        let same_epoch = matches!((epoch, &feed.epoch), (Some(now), Some(known)) if now == known.as_str());
        let verdict = if !same_epoch || (now && newest > delivered) {
            Checked::Behind
        } else if previous > delivered && newest > delivered {
            Checked::Stale
        } else {
            Checked::Fine
        };
        if verdict != Checked::Fine {
            feed.repairing = true;
        }
        verdict
    }

    /// Cluster mode: a member joined on another node; tells the members
    /// here with `userJoined` (unless a read of Redis already did).
    pub(crate) fn remote_joined(&self, node: &str, member: &str, user: &str) {
        let members = read(&self.members);
        let count = {
            let mut remote = lock(&self.others);
            remote.departed.remove(&(node.into(), member.into()));
            let known = remote
                .members
                .entry(node.into())
                .or_default()
                .insert(member.into(), (user.into(), Instant::now()));
            if known.is_some() {
                return;
            }
            let count = remote.count();
            self.remote.store(count, Ordering::Release);
            count
        };
        let joined = encode(&ServerMessage::UserJoined {
            user: user.to_owned(),
            room: self.name.to_string(),
            user_count: members.len() + count,
        });
        fan_out(members.iter(), &joined, None, &self.stats);
    }

    /// Cluster mode: members left on another node (or the node is gone:
    /// `member` `None`); tells the members here with `userLeft` (unless a
    /// read of Redis already did).
    pub(crate) fn remote_left(&self, node: &str, member: Option<&str>) {
        let members = read(&self.members);
        let (gone, count) = {
            let mut remote = lock(&self.others);
            let now = Instant::now();
            let mut gone = Vec::new();
            match member {
                Some(member) => {
                    remote.departed.insert((node.into(), member.into()), now);
                    if let Some(of_node) = remote.members.get_mut(node)
                        && let Some((user, _)) = of_node.remove(member)
                    {
                        gone.push(user);
                        if of_node.is_empty() {
                            remote.members.remove(node);
                        }
                    }
                }
                None => {
                    for (member, (user, _)) in remote.members.remove(node).unwrap_or_default() {
                        remote.departed.insert((node.into(), member), now);
                        gone.push(user);
                    }
                }
            }
            let count = remote.count();
            self.remote.store(count, Ordering::Release);
            (gone, count)
        };
        self.announce_left(&members, gone, count);
    }

    /// Tells the members here that `gone` left, counting down to `count`
    /// members elsewhere.
    #[expect(
        clippy::mutable_key_type,
        reason = "a Peer hashes and compares by its id, which never changes; its queue takes no part"
    )]
    fn announce_left(&self, members: &Peers, gone: Vec<Box<str>>, count: usize) {
        let total = gone.len();
        for (i, user) in gone.into_iter().enumerate() {
            let left = encode(&ServerMessage::UserLeft {
                user: user.into(),
                user_count: members.len() + count + (total - 1 - i),
                room: Some(self.name.to_string()),
            });
            fan_out(members.iter(), &left, None, &self.stats);
        }
    }

    /// Cluster mode: a member on another node changed its name.
    pub(crate) fn remote_renamed(&self, node: &str, member: &str, user: &str, previous: &str) {
        let members = read(&self.members);
        if let Some(entry) = lock(&self.others).members.get_mut(node).and_then(|n| n.get_mut(member)) {
            *entry = (user.into(), Instant::now());
        }
        let renamed = encode(&ServerMessage::UserRenamed {
            user: user.to_owned(),
            previous: previous.to_owned(),
            room: self.name.to_string(),
        });
        fan_out(members.iter(), &renamed, None, &self.stats);
    }

    /// Cluster mode: corrects what this node knows of the members elsewhere
    /// with what Redis held when a read was sent at `sent`: members it lists
    /// that no event told of join (`userJoined`), members it no longer lists
    /// that no event told of leave (`userLeft`); what an event changed after
    /// `sent` stays as the event left it.
    pub(crate) fn set_others(&self, listed: Others, sent: Instant) {
        let members = read(&self.members);
        let (joined, left, count) = {
            let mut remote = lock(&self.others);
            let mut left = Vec::new();
            for (node, of_node) in &mut remote.members {
                of_node.retain(|member, (user, at)| {
                    let keep = *at >= sent || listed.get(node).is_some_and(|l| l.contains_key(member));
                    if !keep {
                        left.push(user.clone());
                    }
                    keep
                });
            }
            remote.members.retain(|_, of_node| !of_node.is_empty());
            let mut joined = Vec::new();
            for (node, of_node) in listed {
                for (member, user) in of_node {
                    let key = (node.clone(), member.clone());
                    if remote.departed.get(&key).is_some_and(|at| *at >= sent) {
                        continue;
                    }
                    let of_node = remote.members.entry(node.clone()).or_default();
                    if let std::collections::hash_map::Entry::Vacant(entry) = of_node.entry(member) {
                        entry.insert((user.clone(), sent));
                        joined.push(user);
                    }
                }
            }
            remote.departed.retain(|_, at| *at >= sent);
            let count = remote.count();
            self.remote.store(count, Ordering::Release);
            (joined, left, count)
        };
        // The departures first, counting down to what remains before the
        // arrivals, which count up to `count`.
        self.announce_left(&members, left, count - joined.len());
        for (i, user) in joined.iter().enumerate() {
            let message = encode(&ServerMessage::UserJoined {
                user: user.to_string(),
                room: self.name.to_string(),
                user_count: members.len() + count - (joined.len() - 1 - i),
            });
            fan_out(members.iter(), &message, None, &self.stats);
        }
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
    pub(crate) stats: Arc<Stats>,
    /// Whether rooms made and removed here are announced to the
    /// notification subscribers; off in a cluster, where Redis tells every
    /// node when a room comes to exist or empties anywhere.
    pub(crate) announce_rooms: bool,
}

impl Recall<'_> {
    /// The room's position: as read before the join, else from the engine
    /// if it may be asked.
    fn position(&self, name: &str) -> hubbub_history::Result<Position> {
        match &self.position {
            Some(position) => Ok(position.clone()),
            None if !self.readable => Err(hubbub_history::Error::Unavailable("not reachable now".to_owned())),
            None => self.engine.position(name),
        }
    }

    /// The joiner's `roomJoined` and the messages to replay after it, for
    /// a room whose members have had everything up to `delivered`.
    fn answer(&self, name: &str, user_count: usize, delivered: u64) -> (ServerMessage, Vec<StoredMessage>) {
        let position = match self.position(name) {
            Ok(position) => position,
            Err(err) => {
                tracing::warn!(room = %name, cause = %err, "cannot read the room's history position");
                let reply = ServerMessage::RoomJoined {
                    room: name.to_owned(),
                    user_count,
                    epoch: None,
                    offset: None,
                    recovered: self.since.map(|_| false),
                    missed: None,
                };
                return (reply, Vec::new());
            }
        };
        let epoch = position.epoch.as_str().to_owned();
        let mut reply = ServerMessage::RoomJoined {
            room: name.to_owned(),
            user_count,
            epoch: Some(epoch),
            offset: Some(delivered),
            recovered: None,
            missed: None,
        };
        let Some(since) = self.since else { return (reply, Vec::new()) };
        let replay = self.missed(name, since, &position, delivered);
        if let ServerMessage::RoomJoined { recovered, missed, .. } = &mut reply {
            *recovered = Some(replay.is_some());
            *missed = replay.as_ref().map(|replay| replay.len() as u64);
        }
        (reply, replay.unwrap_or_default())
    }

    /// The messages after `since` up to `delivered`, if the store still
    /// holds every one of them and they fit the limits.
    fn missed(
        &self,
        name: &str,
        since: &Since,
        position: &Position,
        delivered: u64,
    ) -> Option<Vec<StoredMessage>> {
        if since.epoch != position.epoch.as_str() || since.offset > delivered {
            return None;
        }
        let wanted = Position { epoch: position.epoch.clone(), offset: since.offset };
        let messages = match self.engine.since(name, &wanted, self.max_messages) {
            Ok(Recovery::Recovered { messages, .. }) => messages,
            Ok(Recovery::NotRecoverable { .. }) => return None,
            Err(err) => {
                tracing::warn!(room = %name, cause = %err, "cannot read the room's history");
                return None;
            }
        };
        let replay: Vec<StoredMessage> = messages.into_iter().filter(|m| m.offset <= delivered).collect();
        let bytes: usize = replay.iter().map(|m| m.bytes.len()).sum();
        (bytes <= self.max_bytes).then_some(replay)
    }
}

/// What [`Hub::join`] tells the joiner.
pub(crate) struct Joined {
    /// The room now joined.
    pub(crate) room: Arc<Room>,
    /// Members after the join.
    pub(crate) user_count: usize,
    /// Whether the room came into being here with this join.
    pub(crate) created: bool,
}

/// Shards for the lobby and subscriber sets: enough that joins on a few
/// cores rarely meet, few enough that a broadcast's walk stays cheap.
const SHARDS: usize = 16;

impl Hub {
    /// An empty hub, counting into `stats`.
    pub(crate) fn new(stats: Arc<Stats>) -> Self {
        Self {
            rooms: Mutex::default(),
            lobby: PeerSet::new(SHARDS, stats.clone()),
            subscribers: PeerSet::new(SHARDS, stats.clone()),
            stats,
            announce_rooms: true,
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

    /// The room `name`, if it exists.
    pub(crate) fn room(&self, name: &str) -> Option<Arc<Room>> {
        lock(&self.rooms).get(name).cloned()
    }

    /// Adds `peer` to the room `name` (creating it if new) and tells every
    /// member, the joiner included, with `userJoined`; then tells the joiner
    /// `roomJoined` with the room's position in its history and, when the
    /// joiner says where its copy ends and the store still holds what it
    /// missed, those messages. The caller must have left any previous room.
    pub(crate) fn join(&self, peer: &Peer, user: &str, name: &str, recall: Option<Recall<'_>>) -> Joined {
        let mut rooms = lock(&self.rooms);
        let (room, created) = match rooms.get(name) {
            Some(room) => (room.clone(), false),
            None => {
                // Messages kept before the room came into being here were
                // delivered to whoever was there: count them as delivered.
                let position = recall.as_ref().and_then(|recall| {
                    recall
                        .position(name)
                        .inspect_err(|err| {
                            tracing::warn!(room = %name, cause = %err, "cannot read the room's history position");
                        })
                        .ok()
                });
                let others = recall.as_ref().and_then(|recall| recall.others.clone()).unwrap_or_default();
                let now = Instant::now();
                let others = Remote {
                    members: others
                        .into_iter()
                        .map(|(node, members)| {
                            (node, members.into_iter().map(|(member, user)| (member, (user, now))).collect())
                        })
                        .collect(),
                    departed: HashMap::new(),
                };
                let remote = others.count();
                let room = Arc::new(Room {
                    name: Arc::from(name),
                    members: RwLock::default(),
                    recent: Mutex::default(),
                    stats: self.stats.clone(),
                    delivered: AtomicU64::new(position.as_ref().map_or(0, |p| p.offset)),
                    removed: AtomicBool::new(false),
                    feed: Mutex::new(Feed { epoch: position.map(|p| p.epoch), ..Feed::default() }),
                    others: Mutex::new(others),
                    remote: AtomicUsize::new(remote),
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
        if created && self.announce_rooms {
            // Under the rooms lock, so subscribers see creations and removals
            // in the order they happened.
            self.notify(&ServerMessage::RoomCreated { room: name.to_owned() });
        }
        drop(rooms);
        members.insert(peer.clone());
        let user_count = members.len() + room.remote.load(Ordering::Acquire);
        let joined =
            encode(&ServerMessage::UserJoined { user: user.to_owned(), room: name.to_owned(), user_count });
        fan_out(members.iter(), &joined, None, &self.stats);
        // Under the member lock, no kept message is delivered meanwhile:
        // what is at or below `delivered` is replayed, what is above comes
        // live after the replay.
        let delivered = room.delivered.load(Ordering::Acquire);
        let (reply, replay) = match recall {
            None => (
                ServerMessage::RoomJoined {
                    room: name.to_owned(),
                    user_count,
                    epoch: None,
                    offset: None,
                    recovered: None,
                    missed: None,
                },
                Vec::new(),
            ),
            Some(recall) => recall.answer(name, user_count, delivered),
        };
        peer.reply(&reply, &self.stats);
        for message in replay {
            peer.send(ws::encode(ws::OpCode::Text, &message.bytes));
        }
        drop(members);
        Joined { room, user_count, created }
    }

    /// Removes `peer` from `room`, tells those who remain with `userLeft`, and
    /// removes the room if it is now empty here.
    pub(crate) fn leave(&self, peer: &Peer, user: &str, room: &Room) {
        let mut rooms = lock(&self.rooms);
        let mut members = write(&room.members);
        members.remove(&peer.id());
        let user_count = members.len() + room.remote.load(Ordering::Acquire);
        let removed = members.is_empty();
        if removed {
            room.removed.store(true, Ordering::Release);
            rooms.remove(&room.name);
            self.stats.rooms.set(rooms.len() as i64);
            if self.announce_rooms {
                self.notify(&ServerMessage::RoomRemoved { room: room.name.to_string() });
            }
        }
        drop(rooms);
        if !removed {
            let left = encode(&ServerMessage::UserLeft {
                user: user.to_owned(),
                user_count,
                room: Some(room.name.to_string()),
            });
            fan_out(members.iter(), &left, None, &self.stats);
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
            room.removed.store(true, Ordering::Release);
            rooms.remove(&room.name);
            self.stats.rooms.set(rooms.len() as i64);
        }
    }

    /// Every room here, for the cluster's checks.
    pub(crate) fn all_rooms(&self) -> Vec<Arc<Room>> {
        lock(&self.rooms).values().cloned().collect()
    }

    /// Sends a server event to every notification subscriber.
    pub(crate) fn notify(&self, event: &ServerMessage) {
        self.subscribers.broadcast(&encode(event));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::drain;
    use serde_json::json;

    fn peer() -> Peer {
        Peer::new(64, 1 << 20, crate::deflate::Deflate::OFF)
    }

    #[test]
    fn joins_and_leaves_are_announced_in_order_and_empty_rooms_go() {
        let hub = Hub::new(Arc::new(Stats::new()));
        let feed = peer();
        hub.subscribers.insert(feed.clone());
        let (ada, bob) = (peer(), peer());

        let joined = hub.join(&ada, "ada", "r", None);
        assert_eq!(joined.user_count, 1);
        assert_eq!(
            drain(&ada),
            [
                json!({"type": "userJoined", "user": "ada", "room": "r", "userCount": 1}),
                json!({"type": "roomJoined", "room": "r", "userCount": 1}),
            ]
        );
        assert_eq!(drain(&feed), [json!({"type": "roomCreated", "room": "r"})]);

        let room = hub.join(&bob, "bob", "r", None).room;
        // Everyone, the joiner included, hears the join; only the joiner
        // gets roomJoined, after it.
        assert_eq!(drain(&ada), [json!({"type": "userJoined", "user": "bob", "room": "r", "userCount": 2})]);
        assert_eq!(
            drain(&bob),
            [
                json!({"type": "userJoined", "user": "bob", "room": "r", "userCount": 2}),
                json!({"type": "roomJoined", "room": "r", "userCount": 2}),
            ]
        );
        // A room message skips its sender.
        room.broadcast(&encode(&ServerMessage::UserTyping { user: "ada".into() }), Some(ada.id()));
        assert!(drain(&ada).is_empty());
        assert_eq!(drain(&bob), [json!({"type": "userTyping", "user": "ada"})]);

        hub.leave(&ada, "ada", &room);
        assert!(drain(&ada).is_empty(), "the leaver is not told of its own departure");
        assert_eq!(drain(&bob), [json!({"type": "userLeft", "user": "ada", "userCount": 1, "room": "r"})]);
        assert!(drain(&feed).is_empty());
        assert_eq!(hub.rooms(), [(Arc::from("r"), 1)]);

        hub.leave(&bob, "bob", &room);
        assert_eq!(drain(&feed), [json!({"type": "roomRemoved", "room": "r"})]);
        assert_eq!(hub.room_count(), 0);
    }

    #[test]
    fn a_quiet_leave_tells_nobody() {
        let hub = Hub::new(Arc::new(Stats::new()));
        let (ada, bob) = (peer(), peer());
        let room = hub.join(&ada, "ada", "r", None).room;
        hub.join(&bob, "bob", "r", None);
        drain(&ada);
        hub.leave_quietly(&bob, &room);
        assert!(drain(&ada).is_empty());
        assert_eq!(room.len(), 1);
    }

    #[test]
    fn a_slow_member_is_closed_and_the_others_still_receive() {
        let hub = Hub::new(Arc::new(Stats::new()));
        let slow = Peer::new(8, 1 << 20, crate::deflate::Deflate::OFF);
        let fast = peer();
        let room = hub.join(&slow, "slow", "r", None).room;
        hub.join(&fast, "fast", "r", None);
        drain(&fast);
        for i in 0..20 {
            room.broadcast(&encode(&ServerMessage::UserTyping { user: format!("{i}") }), None);
            drain(&fast);
        }
        assert!(slow.is_closing());
        assert!(slow.close_reason().is_slow_consumer());
        assert!(!fast.is_closing());
    }

    /// A kept message's frame, as the cluster receives it.
    fn kept(offset: u64) -> Frame {
        encode(&ServerMessage::UserTyping { user: format!("m{offset}") })
    }

    fn offsets(peer: &Peer) -> Vec<String> {
        drain(peer)
            .into_iter()
            .map(|m| match m["type"].as_str() {
                Some("userTyping") => m["user"].as_str().unwrap().to_owned(),
                Some("resync") => format!("resync {} {}", m["epoch"].as_str().unwrap(), m["offset"]),
                _ => String::new(),
            })
            .filter(|m| !m.is_empty())
            .collect()
    }

    fn cluster_room(hub: &Hub, peers: &[&Peer], epoch: &str, offset: u64) -> Arc<Room> {
        let engine = hubbub_history::MemoryEngine::new(hubbub_history::Options::default());
        let recall = || Recall {
            engine: &engine,
            since: None,
            max_messages: 100,
            max_bytes: 1 << 20,
            position: Some(Position { epoch: Epoch::new(epoch), offset }),
            others: None,
            readable: true,
        };
        let room = hub.join(peers[0], "a", "r", Some(recall())).room;
        for peer in &peers[1..] {
            hub.join(peer, "b", "r", Some(recall()));
        }
        for peer in peers {
            drain(peer);
        }
        room
    }

    #[test]
    fn a_cluster_room_delivers_in_order_and_repairs_a_gap_from_the_stream() {
        let hub = Hub::new(Arc::new(Stats::new()));
        let (ada, bob) = (peer(), peer());
        let room = cluster_room(&hub, &[&ada, &bob], "e1", 4);
        // The next offset goes out, an old one is skipped, the sender is skipped.
        assert!(!room.feed("e1", 5, &kept(5), Some(ada.id())));
        assert!(!room.feed("e1", 5, &kept(5), None));
        assert!(!room.feed("e1", 3, &kept(3), None));
        assert_eq!((offsets(&ada), offsets(&bob)), (vec![], vec!["m5".to_owned()]));
        // 6 and 7 were lost on the way; 8 starts a repair, 9 waits for it.
        assert!(room.feed("e1", 8, &kept(8), None));
        assert!(!room.feed("e1", 9, &kept(9), Some(bob.id())));
        assert!(offsets(&bob).is_empty(), "nothing out of order");
        let (epoch, delivered) = room.stream_position();
        assert_eq!((epoch.unwrap().as_str(), delivered), ("e1", 5));
        let stored = |offset: u64| StoredMessage {
            offset,
            timestamp_ms: 0,
            bytes: bytes::Bytes::from(format!(r#"{{"type":"userTyping","user":"m{offset}"}}"#)),
        };
        let position = Position { epoch: Epoch::new("e1"), offset: 8 };
        assert!(
            room.repaired(Recovery::Recovered { position, messages: vec![stored(6), stored(7), stored(8)] })
        );
        assert_eq!(offsets(&ada), ["m6", "m7", "m8", "m9"]);
        assert_eq!(offsets(&bob), ["m6", "m7", "m8"], "the pending message keeps its sender skipped");
        assert_eq!(room.stream_position().1, 9);
    }

    #[test]
    fn a_cluster_room_that_cannot_recover_tells_its_members_to_resync() {
        let hub = Hub::new(Arc::new(Stats::new()));
        let ada = peer();
        let room = cluster_room(&hub, &[&ada], "e1", 10);
        // Redis lost the room: a message of a new epoch arrives.
        assert!(room.feed("e2", 2, &kept(2), None));
        assert!(offsets(&ada).is_empty());
        let position = Position { epoch: Epoch::new("e2"), offset: 1 };
        assert!(room.repaired(Recovery::NotRecoverable { position }));
        assert_eq!(offsets(&ada), ["resync e2 1", "m2"]);
        assert!(!room.feed("e2", 3, &kept(3), None));
        assert_eq!(offsets(&ada), ["m3"]);
    }

    #[test]
    fn a_position_check_waits_one_round_before_calling_a_subscription_stale() {
        let hub = Hub::new(Arc::new(Stats::new()));
        let ada = peer();
        let room = cluster_room(&hub, &[&ada], "e1", 3);
        assert_eq!(room.check(Some("e1"), 3, false), Checked::Fine);
        // Offset 4 may be on its way: not yet.
        assert_eq!(room.check(Some("e1"), 4, false), Checked::Fine);
        // It arrives: fine.
        assert!(!room.feed("e1", 4, &kept(4), None));
        assert_eq!(room.check(Some("e1"), 5, false), Checked::Fine);
        // 5 never arrives: a round later the subscription is stale.
        assert_eq!(room.check(Some("e1"), 5, false), Checked::Stale);
        // The repair is under way: no second one.
        assert_eq!(room.check(Some("e1"), 5, false), Checked::Fine);
        let position = Position { epoch: Epoch::new("e1"), offset: 5 };
        assert!(room.repaired(Recovery::Recovered { position, messages: vec![] }));
        // Just after subscribing again, behind is repaired at once; a lost
        // epoch always is.
        assert_eq!(room.check(Some("e1"), 6, true), Checked::Behind);
        assert!(room.repaired(Recovery::Recovered {
            position: Position { epoch: Epoch::new("e1"), offset: 6 },
            messages: vec![]
        }));
        assert_eq!(room.check(None, 0, false), Checked::Behind);
    }

    #[test]
    fn members_on_other_nodes_count_and_are_announced() {
        let hub = Hub::new(Arc::new(Stats::new()));
        let ada = peer();
        let room = cluster_room(&hub, &[&ada], "e1", 0);
        room.remote_joined("n2", "m1", "bob");
        room.remote_joined("n2", "m2", "cy");
        room.remote_joined("n3", "m3", "di");
        assert_eq!(room.len(), 4);
        let joined = drain(&ada);
        assert_eq!(joined[2], json!({"type": "userJoined", "user": "di", "room": "r", "userCount": 4}));
        room.remote_renamed("n2", "m1", "bobby", "bob");
        assert_eq!(
            drain(&ada),
            [json!({"type": "userRenamed", "user": "bobby", "previous": "bob", "room": "r"})]
        );
        room.remote_left("n3", Some("m3"));
        assert_eq!(drain(&ada), [json!({"type": "userLeft", "user": "di", "userCount": 3, "room": "r"})]);
        // Node n2 is gone: each of its members leaves.
        room.remote_left("n2", None);
        let mut left: Vec<_> = drain(&ada).iter().map(|m| m["user"].as_str().unwrap().to_owned()).collect();
        left.sort();
        assert_eq!(left, ["bobby", "cy"]);
        assert_eq!(room.len(), 1);
        // A read of Redis sent before the last events changes nothing they
        // told: bobby and cy stay gone, di too.
        let sent = Instant::now() - Duration::from_secs(1);
        let listed = |entries: &[(&str, &str, &str)]| {
            let mut others = Others::new();
            for (node, member, user) in entries {
                others.entry((*node).into()).or_default().insert((*member).into(), (*user).into());
            }
            others
        };
        room.set_others(listed(&[("n2", "m1", "bobby"), ("n2", "m2", "cy"), ("n3", "m3", "di")]), sent);
        assert_eq!(room.len(), 1);
        assert!(drain(&ada).is_empty());
        // A later read tells of a member whose join event was missed, and of
        // one whose departure was: both are announced, once.
        room.remote_joined("n5", "m5", "fay");
        drain(&ada);
        let later = Instant::now() + Duration::from_millis(1);
        room.set_others(listed(&[("n4", "m9", "eve")]), later);
        assert_eq!(
            drain(&ada),
            [
                json!({"type": "userLeft", "user": "fay", "userCount": 1, "room": "r"}),
                json!({"type": "userJoined", "user": "eve", "room": "r", "userCount": 2}),
            ]
        );
        room.set_others(listed(&[("n4", "m9", "eve")]), later);
        assert!(drain(&ada).is_empty());
        assert_eq!(room.len(), 2);
    }

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
