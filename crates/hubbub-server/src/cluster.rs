//! Cluster mode: several `hubbub` processes act as one server through Redis.
//!
//! Each node keeps its own connections and rooms (the hub), and Redis is
//! where they meet:
//!
//! - **Kept messages** (`chatMessage`, `fileShared`) are published by the
//!   Redis history engine: one script assigns the room's offset, appends to
//!   the room's stream and publishes on the room's channel. Every node with
//!   members in the room is subscribed to that channel and delivers what it
//!   receives, in offset order, to its members: the publishing node too (it
//!   does not deliver from the publish's callback), so all nodes deliver in
//!   one order. A message that does not follow the last one delivered starts
//!   a repair: the missing ones are read from the stream first
//!   ([`Room::feed`], [`repair`]).
//! - **Events** (`userJoined`, `userLeft`, `userRenamed`, `userTyping`) go on
//!   the same channel as `~` followed by JSON ([`Event`]); nodes skip their
//!   own. The lobby `chat` has a channel of its own, and room creations and
//!   removals come on a notifications channel from the script that counts
//!   members ([`COUNT`]).
//! - **Presence**: a hash per room of every member on every node
//!   (`<node> <member>` → name), and a hash of member counts per room for
//!   `/api/rooms`. Nodes hold leases in a sorted set; a node whose lease ran
//!   out is cleaned up by the first node that notices (its members removed,
//!   the rooms told with `userLeft`).
//!
//! Failures: when the subscription drops, the node reconnects, subscribes
//! again and compares every room with Redis, delivering what it missed in
//! order; a periodic check ([`ClusterSettings::check_interval`]) does the same
//! for a lost last message, a lost epoch (`resync`), and a subscription that
//! silently stopped (messages Redis had one check ago still missing: the node
//! reconnects). While Redis cannot be reached, `/ready` answers 503, room
//! messages are refused with `unavailable` (by the history engine) and events
//! to other nodes are dropped.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::StreamExt as _;
use hubbub_history::{ChannelMessage, Engine as _, Epoch, Position, RedisEngine};
use hubbub_protocol::ServerMessage;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::config::ClusterSettings;
use crate::hub::{Checked, Others, Room};
use crate::link::ClientId;
use crate::sync::lock;
use crate::{Shared, ws};

/// Adds `ARGV[2]` to room `ARGV[1]`'s member count in the hash `KEYS[1]`,
/// removes the room at zero, and tells the notifications channel `ARGV[3]`
/// when the room came to exist (`+room`) or emptied (`-room`) in the whole
/// cluster. Answers the new count.
const COUNT: &str = r"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
local delta = tonumber(ARGV[2])
if n <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  if n - delta > 0 then redis.call('PUBLISH', ARGV[3], '-' .. ARGV[1]) end
elseif delta > 0 and n == delta then
  redis.call('PUBLISH', ARGV[3], '+' .. ARGV[1])
end
return n
";

/// An event on a room's channel, after `~`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "lowercase")]
enum Event {
    /// A member joined on node `n`.
    Joined { n: String, m: String, u: String },
    /// A member left on node `n`.
    Left { n: String, m: String },
    /// A member on node `n` changed its name from `p` to `u`.
    Renamed { n: String, m: String, u: String, p: String },
    /// A member on node `n` is typing.
    Typing { n: String, u: String },
    /// Node `n` is gone (its lease ran out, or it shut down): its members left.
    Gone { n: String },
}

impl Event {
    fn node(&self) -> &str {
        match self {
            Self::Joined { n, .. }
            | Self::Left { n, .. }
            | Self::Renamed { n, .. }
            | Self::Typing { n, .. }
            | Self::Gone { n } => n,
        }
    }
}

/// Something to write to Redis, in the order it happened here.
#[derive(Debug)]
enum Outgoing {
    /// `PUBLISH channel payload`.
    Publish { channel: String, payload: String },
    /// A member of this node joined `room`.
    Joined { room: Arc<str>, member: ClientId, user: String },
    /// A member of this node left `room`; `last`: no member of this node is
    /// left in it.
    Left { room: Arc<str>, member: ClientId, last: bool },
    /// A member of this node changed its name.
    Renamed { room: Arc<str>, member: ClientId, user: String },
    /// Make Redis's presence of this node's members match what is here
    /// (after writes failed).
    Reconcile,
}

/// A request to the subscription task.
#[derive(Debug)]
enum Command {
    /// Subscribe to the room's channel; answers once subscribed.
    Subscribe(Arc<str>, oneshot::Sender<bool>),
    /// Drop the connection and subscribe again (it looks stuck).
    Reconnect,
}

/// One node of a cluster.
pub(crate) struct Cluster {
    /// This node's id: its name and a random suffix.
    pub(crate) node: Arc<str>,
    /// History in Redis (also `Shared::history`).
    pub(crate) engine: Arc<RedisEngine>,
    /// Where the connections go.
    client: redis::Client,
    /// The configuration.
    settings: ClusterSettings,
    /// Whether this node can use Redis now (subscribed, answering).
    up: AtomicBool,
    /// Live nodes at the last check, this one included.
    nodes: AtomicUsize,
    /// The connection for commands, once made.
    conn: OnceLock<ConnectionManager>,
    /// To the subscription task.
    commands: mpsc::UnboundedSender<Command>,
    /// Its receiving end, until the task takes it.
    commands_rx: Mutex<Option<mpsc::UnboundedReceiver<Command>>>,
    /// To the writer task.
    outgoing: mpsc::UnboundedSender<Outgoing>,
    /// Its receiving end, until the task takes it.
    outgoing_rx: Mutex<Option<mpsc::UnboundedReceiver<Outgoing>>>,
    /// This node's members by room: member id → name (for reconciling
    /// presence after an outage).
    local: Mutex<HashMap<Arc<str>, HashMap<ClientId, String>>>,
    /// Joins under way per room, whose subscription must stay.
    interest: Mutex<HashMap<Arc<str>, usize>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.node).finish_non_exhaustive()
    }
}

/// A join under way: keeps the room's subscription until dropped.
pub(crate) struct Interest {
    cluster: Arc<Cluster>,
    room: Arc<str>,
}

impl Drop for Interest {
    fn drop(&mut self) {
        let mut interest = lock(&self.cluster.interest);
        if let Some(count) = interest.get_mut(&self.room) {
            *count -= 1;
            if *count == 0 {
                interest.remove(&self.room);
            }
        }
    }
}

/// What a join reads before it takes the hub's locks.
pub(crate) struct Prepared {
    /// Keeps the subscription while the join completes.
    pub(crate) _interest: Interest,
    /// The room's position, if Redis answered.
    pub(crate) position: Option<Position>,
    /// The room's members on other nodes, if Redis answered.
    pub(crate) others: Option<Others>,
}

/// How long a Redis round trip of the cluster's own may take.
const TIMEOUT: Duration = Duration::from_secs(2);
/// The pause between attempts to reach Redis.
const RETRY: Duration = Duration::from_millis(500);

impl Cluster {
    /// Connects to Redis (which must be reachable now) and opens the history
    /// engine on it; the subscription starts with [`run`].
    pub(crate) fn connect(
        settings: &ClusterSettings,
        url: &str,
        options: hubbub_history::Options,
    ) -> Result<Self, String> {
        let config = hubbub_history::RedisConfig::new(url).prefix(settings.prefix.clone());
        let engine = RedisEngine::connect(config, options).map_err(|err| {
            let at = without_password(url);
            match err {
                hubbub_history::Error::Unavailable(why) => format!("{why} (at {at})"),
                other => format!("{other} (at {at})"),
            }
        })?;
        let client = redis::Client::open(url).map_err(|err| err.to_string())?;
        let name = settings.node_name.clone().unwrap_or_else(host_name);
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (outgoing, outgoing_rx) = mpsc::unbounded_channel();
        Ok(Self {
            node: format!("{name}-{suffix}").into(),
            engine: Arc::new(engine),
            client,
            settings: settings.clone(),
            up: AtomicBool::new(false),
            nodes: AtomicUsize::new(1),
            conn: OnceLock::new(),
            commands,
            commands_rx: Mutex::new(Some(commands_rx)),
            outgoing,
            outgoing_rx: Mutex::new(Some(outgoing_rx)),
            local: Mutex::default(),
            interest: Mutex::default(),
        })
    }

    /// Whether this node can publish and receive now (for `/ready`).
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Live nodes at the last check.
    pub(crate) fn nodes(&self) -> usize {
        self.nodes.load(Ordering::Acquire)
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.settings.prefix)
    }

    fn lobby_channel(&self) -> String {
        self.key("lobby")
    }

    fn notify_channel(&self) -> String {
        self.key("notify")
    }

    fn counts_key(&self) -> String {
        self.key("rooms")
    }

    fn nodes_key(&self) -> String {
        self.key("nodes")
    }

    fn node_rooms_key(&self, node: &str) -> String {
        self.key(&format!("node:{node}:rooms"))
    }

    fn presence_key(&self, room: &str) -> String {
        self.engine.room_key(room, "presence")
    }

    fn field(&self, member: ClientId) -> String {
        format!("{} {}", self.node, member.simple())
    }

    fn send(&self, out: Outgoing) {
        // The writer task ends only at shutdown.
        let _ = self.outgoing.send(out);
    }

    fn publish_event(&self, room: &str, event: &Event) {
        let Ok(json) = serde_json::to_string(event) else { return };
        self.send(Outgoing::Publish { channel: self.engine.channel(room), payload: format!("~{json}") });
    }

    /// Before a join: subscribes to the room's channel and reads its position
    /// and its members elsewhere, so the join itself waits for nothing.
    pub(crate) async fn prepare(self: &Arc<Self>, room: &str) -> Prepared {
        let room: Arc<str> = room.into();
        *lock(&self.interest).entry(room.clone()).or_default() += 1;
        let interest = Interest { cluster: self.clone(), room: room.clone() };
        let (position, others) = if self.is_up() { self.read_room(&room).await } else { (None, None) };
        Prepared { _interest: interest, position, others }
    }

    async fn read_room(self: &Arc<Self>, room: &Arc<str>) -> (Option<Position>, Option<Others>) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Subscribe(room.clone(), tx)).is_err() {
            return (None, None);
        }
        if !matches!(tokio::time::timeout(TIMEOUT, rx).await, Ok(Ok(true))) {
            return (None, None);
        }
        let engine = self.engine.clone();
        let name = room.clone();
        let position = tokio::task::spawn_blocking(move || engine.position(&name)).await;
        let position = match position {
            Ok(Ok(position)) => Some(position),
            _ => None,
        };
        let others = match self.presence(room).await {
            Ok(others) => Some(others),
            Err(err) => {
                tracing::warn!(%room, cause = %err, "cannot read the room's members on other nodes");
                None
            }
        };
        (position, others)
    }

    /// The command connection, once [`run`] has made it.
    fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        self.conn
            .get()
            .cloned()
            .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::Io, "not connected yet")))
    }

    /// `HMGET` of a room's epoch and newest offset, answered as
    /// `(Option<String>, Option<u64>)`.
    fn meta(&self, room: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.engine.room_key(room, "meta")).arg("epoch").arg("newest");
        cmd
    }

    /// The room's members on other nodes, as Redis holds them.
    async fn presence(&self, room: &str) -> redis::RedisResult<Others> {
        let mut conn = self.connection()?;
        let all: HashMap<String, String> =
            redis::cmd("HGETALL").arg(self.presence_key(room)).query_async(&mut conn).await?;
        Ok(self.others_of(all))
    }

    fn others_of(&self, all: HashMap<String, String>) -> Others {
        let mut others = Others::new();
        for (field, user) in all {
            let Some((node, member)) = field.split_once(' ') else { continue };
            if node != &*self.node {
                others.entry(node.into()).or_default().insert(member.into(), user.into());
            }
        }
        others
    }

    /// After a room came into being here: messages published between the
    /// read of its position and its creation reached no room here; if Redis
    /// has any, they are read from the stream and delivered now.
    pub(crate) fn settle(self: &Arc<Self>, shared: &Arc<Shared>, room: Arc<Room>) {
        let Ok(mut conn) = self.connection() else { return };
        let (shared, cluster) = (shared.clone(), self.clone());
        tokio::spawn(async move {
            let meta: redis::RedisResult<(Option<String>, Option<u64>)> =
                cluster.meta(&room.name).query_async(&mut conn).await;
            if let Ok((Some(epoch), newest)) = meta
                && room.check(Some(&epoch), newest.unwrap_or(0), true) != Checked::Fine
            {
                repair(shared, cluster, room).await;
            }
        });
    }

    /// A member of this node joined `room`.
    pub(crate) fn joined(&self, room: &Arc<str>, member: ClientId, user: &str) {
        lock(&self.local).entry(room.clone()).or_default().insert(member, user.to_owned());
        self.send(Outgoing::Joined { room: room.clone(), member, user: user.to_owned() });
        let event =
            Event::Joined { n: self.node.to_string(), m: member.simple().to_string(), u: user.to_owned() };
        self.publish_event(room, &event);
    }

    /// A member of this node left `room`.
    pub(crate) fn left(&self, room: &Arc<str>, member: ClientId) {
        let last = {
            let mut local = lock(&self.local);
            let members = local.get_mut(room);
            let last = members.is_none_or(|members| {
                members.remove(&member);
                members.is_empty()
            });
            if last {
                local.remove(room);
            }
            last
        };
        self.send(Outgoing::Left { room: room.clone(), member, last });
        self.publish_event(room, &Event::Left { n: self.node.to_string(), m: member.simple().to_string() });
    }

    /// A member of this node in `room` changed its name.
    pub(crate) fn renamed(&self, room: &Arc<str>, member: ClientId, user: &str, previous: &str) {
        if let Some(name) = lock(&self.local).get_mut(room).and_then(|m| m.get_mut(&member)) {
            user.clone_into(name);
        }
        self.send(Outgoing::Renamed { room: room.clone(), member, user: user.to_owned() });
        let event = Event::Renamed {
            n: self.node.to_string(),
            m: member.simple().to_string(),
            u: user.to_owned(),
            p: previous.to_owned(),
        };
        self.publish_event(room, &event);
    }

    /// A member of this node in `room` is typing.
    pub(crate) fn typing(&self, room: &str, user: &str) {
        if self.is_up() {
            self.publish_event(room, &Event::Typing { n: self.node.to_string(), u: user.to_owned() });
        }
    }

    /// A lobby `chat`, already delivered here, for the other nodes.
    pub(crate) fn lobby(&self, json: &str) {
        if self.is_up() {
            self.send(Outgoing::Publish {
                channel: self.lobby_channel(),
                payload: format!("{}\n{json}", self.node),
            });
        }
    }

    /// Every room with members anywhere in the cluster, with their counts.
    pub(crate) async fn room_counts(&self) -> redis::RedisResult<Vec<(String, usize)>> {
        let mut conn = self.connection()?;
        let counts: HashMap<String, i64> =
            redis::cmd("HGETALL").arg(self.counts_key()).query_async(&mut conn).await?;
        let mut list: Vec<(String, usize)> = counts
            .into_iter()
            .filter_map(|(room, n)| usize::try_from(n).ok().filter(|n| *n > 0).map(|n| (room, n)))
            .collect();
        list.sort();
        Ok(list)
    }
}

/// `url` without the password it may carry, for messages.
fn without_password(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://***{}", &url[at..]),
        _ => url.to_owned(),
    }
}

/// The host's name, for a node's default name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().chars().filter(char::is_ascii_graphic).take(32).collect::<String>())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "node".to_owned())
}

/// Runs the cluster's tasks until shutdown: the command connection, the
/// writer, the subscription and the periodic check.
pub(crate) async fn run(shared: Arc<Shared>, cluster: Arc<Cluster>) {
    let manager = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    let conn = loop {
        match ConnectionManager::new_with_config(cluster.client.clone(), manager.clone()).await {
            Ok(conn) => break conn,
            Err(err) => {
                tracing::warn!(cause = %err, "cannot reach the cluster's redis; retrying");
                tokio::select! {
                    () = shared.shutdown.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    };
    let _ = cluster.conn.set(conn.clone());
    let writer = tokio::spawn(write(cluster.clone(), conn.clone()));
    let checker = tokio::spawn(check(shared.clone(), cluster.clone(), conn.clone()));
    subscribe(shared.clone(), cluster.clone()).await;
    checker.abort();
    // Leave the cluster: this node's members leave every room.
    let _ =
        tokio::time::timeout(TIMEOUT, remove_node(&cluster, &mut conn.clone(), &cluster.node.clone())).await;
    writer.abort();
}

/// Writes [`Outgoing`] items to Redis in order, a batch at a time.
async fn write(cluster: Arc<Cluster>, mut conn: ConnectionManager) {
    let Some(mut rx) = lock(&cluster.outgoing_rx).take() else { return };
    let mut batch = Vec::new();
    let mut dirty = false;
    while rx.recv_many(&mut batch, 256).await > 0 {
        let mut pipe = redis::pipe();
        let mut reconcile = false;
        let mut commands = 0;
        for out in batch.drain(..) {
            commands += usize::from(!matches!(out, Outgoing::Reconcile));
            match out {
                Outgoing::Publish { channel, payload } => {
                    pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
                }
                Outgoing::Joined { room, member, user } => {
                    pipe.cmd("HSET")
                        .arg(cluster.presence_key(&room))
                        .arg(cluster.field(member))
                        .arg(user)
                        .ignore();
                    pipe.cmd("SADD").arg(cluster.node_rooms_key(&cluster.node)).arg(&*room).ignore();
                    count(&mut pipe, &cluster, &room, 1);
                }
                Outgoing::Left { room, member, last } => {
                    pipe.cmd("HDEL").arg(cluster.presence_key(&room)).arg(cluster.field(member)).ignore();
                    count(&mut pipe, &cluster, &room, -1);
                    if last {
                        pipe.cmd("SREM").arg(cluster.node_rooms_key(&cluster.node)).arg(&*room).ignore();
                    }
                }
                Outgoing::Renamed { room, member, user } => {
                    pipe.cmd("HSET")
                        .arg(cluster.presence_key(&room))
                        .arg(cluster.field(member))
                        .arg(user)
                        .ignore();
                }
                Outgoing::Reconcile => reconcile = true,
            }
        }
        if commands > 0
            && let Err(err) = pipe.query_async::<()>(&mut conn).await
        {
            if !dirty {
                tracing::warn!(cause = %err, "cannot write to the cluster's redis; presence is reconciled once it answers");
            }
            dirty = true;
            continue;
        }
        if reconcile || dirty {
            match reconcile_presence(&cluster, &mut conn).await {
                Ok(()) => dirty = false,
                Err(err) => {
                    tracing::warn!(cause = %err, "cannot reconcile presence with the cluster's redis")
                }
            }
        }
    }
}

/// Adds a member count change to `pipe`.
fn count(pipe: &mut redis::Pipeline, cluster: &Cluster, room: &str, delta: i64) {
    pipe.cmd("EVAL")
        .arg(COUNT)
        .arg(1)
        .arg(cluster.counts_key())
        .arg(room)
        .arg(delta)
        .arg(cluster.notify_channel())
        .ignore();
}

/// Makes Redis's record of this node's members match this node's.
async fn reconcile_presence(cluster: &Cluster, conn: &mut ConnectionManager) -> redis::RedisResult<()> {
    let local = lock(&cluster.local).clone();
    let recorded: Vec<String> =
        redis::cmd("SMEMBERS").arg(cluster.node_rooms_key(&cluster.node)).query_async(conn).await?;
    let rooms: HashSet<Arc<str>> =
        local.keys().cloned().chain(recorded.iter().map(|room| Arc::from(room.as_str()))).collect();
    let own = format!("{} ", cluster.node);
    for room in rooms {
        let all: HashMap<String, String> =
            redis::cmd("HGETALL").arg(cluster.presence_key(&room)).query_async(conn).await?;
        let present: HashSet<&str> = all.keys().filter(|f| f.starts_with(&own)).map(String::as_str).collect();
        let wanted: HashMap<String, &String> = local
            .get(&room)
            .into_iter()
            .flatten()
            .map(|(member, user)| (cluster.field(*member), user))
            .collect();
        let mut pipe = redis::pipe();
        let mut delta = 0i64;
        for (field, user) in &wanted {
            if !present.contains(field.as_str()) {
                delta += 1;
            }
            pipe.cmd("HSET").arg(cluster.presence_key(&room)).arg(field).arg(*user).ignore();
        }
        for field in present.iter().filter(|f| !wanted.contains_key(**f)) {
            delta -= 1;
            pipe.cmd("HDEL").arg(cluster.presence_key(&room)).arg(*field).ignore();
        }
        if delta != 0 {
            count(&mut pipe, cluster, &room, delta);
        }
        if wanted.is_empty() {
            pipe.cmd("SREM").arg(cluster.node_rooms_key(&cluster.node)).arg(&*room).ignore();
        } else {
            pipe.cmd("SADD").arg(cluster.node_rooms_key(&cluster.node)).arg(&*room).ignore();
        }
        pipe.query_async::<()>(conn).await?;
    }
    Ok(())
}

/// Removes `node`'s members from every room it was in, tells the rooms, and
/// forgets the node.
async fn remove_node(cluster: &Cluster, conn: &mut ConnectionManager, node: &str) -> redis::RedisResult<()> {
    let rooms: Vec<String> =
        redis::cmd("SMEMBERS").arg(cluster.node_rooms_key(node)).query_async(conn).await?;
    let prefix = format!("{node} ");
    for room in rooms {
        let fields: Vec<String> =
            redis::cmd("HKEYS").arg(cluster.presence_key(&room)).query_async(conn).await?;
        let gone: Vec<&String> = fields.iter().filter(|f| f.starts_with(&prefix)).collect();
        let mut pipe = redis::pipe();
        if !gone.is_empty() {
            pipe.cmd("HDEL").arg(cluster.presence_key(&room)).arg(&gone).ignore();
            count(&mut pipe, cluster, &room, -(gone.len() as i64));
        }
        let event = serde_json::to_string(&Event::Gone { n: node.to_owned() }).unwrap_or_default();
        pipe.cmd("PUBLISH").arg(cluster.engine.channel(&room)).arg(format!("~{event}")).ignore();
        pipe.query_async::<()>(conn).await?;
    }
    redis::pipe()
        .cmd("DEL")
        .arg(cluster.node_rooms_key(node))
        .ignore()
        .cmd("ZREM")
        .arg(cluster.nodes_key())
        .arg(node)
        .ignore()
        .query_async::<()>(conn)
        .await
}

/// Every `check_interval`: renews this node's lease, removes nodes whose
/// lease ran out, and compares every room here with Redis.
async fn check(shared: Arc<Shared>, cluster: Arc<Cluster>, mut conn: ConnectionManager) {
    let interval = cluster.settings.check_interval;
    let lease = cluster.settings.node_timeout.saturating_sub(interval);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut registered = false;
    loop {
        ticks.tick().await;
        let now = crate::chat::now_ms();
        let nodes: redis::RedisResult<(usize, Vec<String>, usize)> = redis::pipe()
            .cmd("ZADD")
            .arg(cluster.nodes_key())
            .arg(now + lease.as_millis() as u64)
            .arg(&*cluster.node)
            .cmd("ZRANGEBYSCORE")
            .arg(cluster.nodes_key())
            .arg("-inf")
            .arg(now)
            .cmd("ZCOUNT")
            .arg(cluster.nodes_key())
            .arg(now)
            .arg("+inf")
            .query_async(&mut conn)
            .await;
        let (added, dead, live) = match nodes {
            Ok(nodes) => nodes,
            Err(err) => {
                tracing::debug!(cause = %err, "cluster check: redis does not answer");
                continue;
            }
        };
        if added == 1 && registered {
            // Another node took this one for dead (it was silent longer than
            // the lease, or Redis lost the list): write its members again.
            tracing::warn!("this node's lease had run out; registering its members again");
            let _ = cluster.outgoing.send(Outgoing::Reconcile);
        }
        registered = true;
        cluster.nodes.store(live, Ordering::Release);
        for node in dead {
            // The node that removes it from the set cleans up after it.
            let removed: redis::RedisResult<i64> =
                redis::cmd("ZREM").arg(cluster.nodes_key()).arg(&node).query_async(&mut conn).await;
            if matches!(removed, Ok(1)) {
                tracing::info!(%node, "a cluster node stopped renewing its lease; removing its members");
                if let Err(err) = remove_node(&cluster, &mut conn, &node).await {
                    tracing::warn!(%node, cause = %err, "cannot remove a dead node's members");
                }
            }
        }
        if cluster.is_up() && check_rooms(&shared, &cluster, &mut conn, false).await {
            tracing::warn!(
                "messages the cluster's redis had at the last check never arrived; subscribing again"
            );
            let _ = cluster.commands.send(Command::Reconnect);
        }
    }
}

/// Compares every room here with Redis: repairs the rooms behind, corrects
/// what this node knows of the members elsewhere. With `now`, a room behind
/// is repaired at once (after a reconnect); otherwise only once the check
/// before saw it too. True if some room was stale (its subscription looks
/// stuck).
async fn check_rooms(
    shared: &Arc<Shared>,
    cluster: &Arc<Cluster>,
    conn: &mut ConnectionManager,
    now: bool,
) -> bool {
    let rooms = shared.hub.all_rooms();
    let mut stale = false;
    for chunk in rooms.chunks(100) {
        let mut pipe = redis::pipe();
        for room in chunk {
            pipe.add_command(cluster.meta(&room.name));
            pipe.cmd("HGETALL").arg(cluster.presence_key(&room.name));
        }
        let sent = std::time::Instant::now();
        let answers: Vec<redis::Value> = match pipe.query_async(conn).await {
            Ok(answers) => answers,
            Err(err) => {
                tracing::debug!(cause = %err, "cluster check: redis does not answer");
                return false;
            }
        };
        for (room, pair) in chunk.iter().zip(answers.chunks(2)) {
            let [meta, presence] = pair else { continue };
            let (epoch, newest): (Option<String>, Option<u64>) =
                redis::from_redis_value(meta.clone()).unwrap_or((None, None));
            let verdict = room.check(epoch.as_deref(), newest.unwrap_or(0), now);
            match verdict {
                Checked::Fine => {}
                Checked::Behind | Checked::Stale => {
                    stale |= verdict == Checked::Stale;
                    tokio::spawn(repair(shared.clone(), cluster.clone(), room.clone()));
                }
            }
            if let Ok(all) = redis::from_redis_value::<HashMap<String, String>>(presence.clone()) {
                room.set_others(cluster.others_of(all), sent);
            }
        }
    }
    stale
}

/// Delivers what `room`'s members missed, reading it from the stream, until
/// the room is back in step (or removed).
pub(crate) async fn repair(shared: Arc<Shared>, cluster: Arc<Cluster>, room: Arc<Room>) {
    let max = shared.config.history.max_recover.min(shared.config.websocket.outbound_queue / 2);
    loop {
        if room.is_removed() || shared.shutdown.is_cancelled() {
            return;
        }
        let (epoch, delivered) = room.stream_position();
        let since = Position { epoch: epoch.unwrap_or_else(|| Epoch::new("")), offset: delivered };
        let (engine, name) = (cluster.engine.clone(), room.name.clone());
        let read = tokio::task::spawn_blocking(move || engine.since(&name, &since, max)).await;
        match read {
            Ok(Ok(recovery)) => {
                if room.repaired(recovery) {
                    return;
                }
            }
            Ok(Err(err)) => {
                tracing::debug!(room = %room.name, cause = %err, "cannot read the room's stream to repair; retrying");
                tokio::select! {
                    () = shared.shutdown.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
            Err(_) => return,
        }
    }
}

/// The subscription: (re)connects, subscribes to the lobby, the
/// notifications and every room here, and hands what arrives to the hub.
async fn subscribe(shared: Arc<Shared>, cluster: Arc<Cluster>) {
    let Some(mut commands) = lock(&cluster.commands_rx).take() else { return };
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                () = shared.shutdown.cancelled() => return,
                () = tokio::time::sleep(RETRY) => {}
            }
        }
        first = false;
        let pubsub = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            connected = tokio::time::timeout(TIMEOUT, cluster.client.get_async_pubsub()) => connected,
        };
        let Ok(Ok(pubsub)) = pubsub else {
            cluster.up.store(false, Ordering::Release);
            continue;
        };
        let (mut sink, mut stream) = pubsub.split();
        let mut channels: HashMap<String, Arc<str>> = HashMap::new();
        let mut wanted: Vec<Arc<str>> = shared.hub.all_rooms().iter().map(|room| room.name.clone()).collect();
        wanted.extend(lock(&cluster.interest).keys().cloned());
        for room in wanted {
            channels.insert(cluster.engine.channel(&room), room);
        }
        let mut names: Vec<String> = channels.keys().cloned().collect();
        names.push(cluster.lobby_channel());
        names.push(cluster.notify_channel());
        if !matches!(tokio::time::timeout(TIMEOUT, sink.subscribe(&names)).await, Ok(Ok(()))) {
            continue;
        }
        let was_down = !cluster.up.swap(true, Ordering::AcqRel);
        tracing::info!(node = %cluster.node, rooms = channels.len(), "subscribed to the cluster's redis");
        if was_down {
            // Whatever was published while this node was not listening is
            // delivered now, in order, before what follows.
            let _ = cluster.outgoing.send(Outgoing::Reconcile);
            if let Some(conn) = cluster.conn.get() {
                let (shared, cluster, mut conn) = (shared.clone(), cluster.clone(), conn.clone());
                tokio::spawn(async move { check_rooms(&shared, &cluster, &mut conn, true).await });
            }
        }
        let mut ticks = tokio::time::interval(cluster.settings.check_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                () = shared.shutdown.cancelled() => return,
                message = stream.next() => {
                    let Some(message) = message else {
                        tracing::warn!("lost the subscription to the cluster's redis; reconnecting");
                        break;
                    };
                    receive(&shared, &cluster, &channels, &message);
                }
                command = commands.recv() => match command {
                    Some(Command::Subscribe(room, reply)) => {
                        let channel = cluster.engine.channel(&room);
                        if channels.contains_key(&channel) {
                            let _ = reply.send(true);
                            continue;
                        }
                        let done = tokio::time::timeout(TIMEOUT, sink.subscribe(&channel)).await;
                        let ok = matches!(done, Ok(Ok(())));
                        let _ = reply.send(ok);
                        if !ok {
                            break;
                        }
                        channels.insert(channel, room);
                    }
                    Some(Command::Reconnect) => break,
                    None => return,
                },
                _ = ticks.tick() => {
                    // A ping proves the connection still answers; rooms gone
                    // from here for a whole interval are unsubscribed.
                    if !matches!(tokio::time::timeout(TIMEOUT, sink.ping::<redis::Value>()).await, Ok(Ok(_))) {
                        tracing::warn!("the cluster's redis does not answer on the subscription; reconnecting");
                        break;
                    }
                    let here: HashSet<Arc<str>> = shared.hub.all_rooms().iter().map(|room| room.name.clone()).collect();
                    let interest = lock(&cluster.interest).keys().cloned().collect::<HashSet<_>>();
                    let gone: Vec<String> = channels
                        .iter()
                        .filter(|(_, room)| !here.contains(*room) && !interest.contains(*room))
                        .map(|(channel, _)| channel.clone())
                        .collect();
                    if !gone.is_empty() {
                        if !matches!(tokio::time::timeout(TIMEOUT, sink.unsubscribe(&gone)).await, Ok(Ok(()))) {
                            break;
                        }
                        for channel in gone {
                            channels.remove(&channel);
                        }
                    }
                }
            }
        }
        cluster.up.store(false, Ordering::Release);
    }
}

/// Hands one message from Redis to the hub.
fn receive(
    shared: &Arc<Shared>,
    cluster: &Arc<Cluster>,
    channels: &HashMap<String, Arc<str>>,
    message: &redis::Msg,
) {
    let channel = message.get_channel_name();
    let payload = message.get_payload_bytes();
    if let Some(room) = channels.get(channel) {
        let Some(room) = shared.hub.room(room) else { return };
        if let Some(kept) = ChannelMessage::parse(payload) {
            let frame = ws::encode(ws::OpCode::Text, kept.bytes);
            let except = kept.origin.and_then(|origin| uuid::Uuid::try_parse(origin).ok());
            if room.feed(kept.epoch, kept.offset, &frame, except) {
                tokio::spawn(repair(shared.clone(), cluster.clone(), room));
            }
            return;
        }
        let Some(json) = payload.strip_prefix(b"~") else { return };
        let Ok(event) = serde_json::from_slice::<Event>(json) else {
            tracing::debug!(%channel, "unreadable event on a room channel");
            return;
        };
        if event.node() == &*cluster.node {
            return;
        }
        match event {
            Event::Joined { n, m, u } => room.remote_joined(&n, &m, &u),
            Event::Left { n, m } => room.remote_left(&n, Some(&m)),
            Event::Renamed { n, m, u, p } => room.remote_renamed(&n, &m, &u, &p),
            Event::Typing { u, .. } => {
                room.broadcast(&crate::link::encode(&ServerMessage::UserTyping { user: u }), None);
            }
            Event::Gone { n } => room.remote_left(&n, None),
        }
    } else if channel == cluster.lobby_channel() {
        let Some(newline) = payload.iter().position(|&b| b == b'\n') else { return };
        if &payload[..newline] == cluster.node.as_bytes() {
            return;
        }
        shared.hub.lobby.broadcast(&ws::encode(ws::OpCode::Text, &payload[newline + 1..]));
    } else if channel == cluster.notify_channel() {
        let Ok(text) = std::str::from_utf8(payload) else { return };
        let event = match text.split_at_checked(1) {
            Some(("+", room)) => ServerMessage::RoomCreated { room: room.to_owned() },
            Some(("-", room)) => ServerMessage::RoomRemoved { room: room.to_owned() },
            _ => return,
        };
        shared.hub.notify(&event);
    }
}
