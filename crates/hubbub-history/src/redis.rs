//! The Redis engine: rooms' streams in Redis (≥ 7), so that several server processes share one
//! history. Per batch of a room's publishes, one Lua script reads the room (epoch, newest offset,
//! dedupe records) and one appends, records ids, publishes and trims, atomically.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::time::Duration;

use bytes::Bytes;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::runtime::{Handle, Runtime};
use uuid::Uuid;

use crate::core::{self, Reader, RoomMeta, StoreError, StoreResult};
use crate::{
    Assigned, Engine, Epoch, Error, History, OnDone, Options, Position, Publish, Published, Recovery, Result,
    StoredMessage,
};

/// Where the Redis engine connects and how it names its keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisConfig {
    /// The server: `redis://host:port/db` or `rediss://` for TLS (if the `redis` crate was
    /// built with TLS).
    pub url: String,
    /// Put before every key and channel, so several deployments (or tests) can share one Redis.
    /// Must not contain `{` or `}` (the room's hash tag must be the first). Default `hubbub:`.
    pub prefix: String,
    /// How long a command may take before it fails (and the publish with it). Default 2 s.
    pub response_timeout: Duration,
    /// How long connecting may take. Default 1 s.
    pub connection_timeout: Duration,
    /// Most publishes of one room sent in one script. Default 256.
    pub max_batch: usize,
}

impl RedisConfig {
    /// The defaults, for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "hubbub:".into(),
            response_timeout: Duration::from_secs(2),
            connection_timeout: Duration::from_secs(1),
            max_batch: 256,
        }
    }

    /// Sets the key prefix.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
}

/// Reads a room for `position`, `since` and `history`, creating it if needed: answers its epoch
/// and newest and oldest kept offsets.
///
/// KEYS: meta, stream, dedupe, dedupe_age. ARGV: the epoch for a new room.
const PREPARE: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'newest', 0)
end
local newest = tonumber(redis.call('HGET', KEYS[1], 'newest')) or 0
local first = newest + 1
local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #head > 0 then
  first = tonumber(string.match(head[1][1], '-(%d+)$'))
end
return {epoch, newest, first}
";

/// Appends a batch to a room, atomically: per message, unless its id is kept already (within
/// the dedupe window), the room's next offset, spliced into the message's bytes between the
/// prefix and suffix the engine sent (or not, for bytes that do not contain their offset); the
/// stream entry, the dedupe record, and a message on the room's channel. Then trims messages
/// by count and age and dedupe records by age and count. Creates the room (a new epoch) if it
/// has no meta hash. Answers `{epoch, results}`, per message its new offset, or the kept
/// record `<offset> <timestamp> <recorded>` of a duplicate.
///
/// KEYS: meta, stream, dedupe, dedupe_age. ARGV: now, forget ids recorded at or before, ttl
/// cutoff, max messages, dedupe capacity, channel, the epoch for a new room, then per message
/// its dedupe field (`''` for none), timestamp, origin (`-` for none), `1` if the offset goes
/// between prefix and suffix (else `0`), prefix and suffix.
const COMMIT: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[7]
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'newest', 0)
end
local newest = tonumber(redis.call('HGET', KEYS[1], 'newest')) or 0
local now = ARGV[1]
local forget_before = tonumber(ARGV[2])
local results = {}
for i = 8, #ARGV, 6 do
  local field, ts, origin = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local kept = nil
  if field ~= '' then
    kept = redis.call('HGET', KEYS[3], field)
    if kept and tonumber(string.match(kept, '(%d+)$')) <= forget_before then
      kept = nil
    end
  end
  if kept then
    results[#results + 1] = kept
  else
    newest = newest + 1
    local bytes = ARGV[i + 4]
    if ARGV[i + 3] == '1' then
      bytes = bytes .. newest .. ARGV[i + 5]
    end
    redis.call('XADD', KEYS[2], '0-' .. newest, 't', ts, 'd', bytes)
    if field ~= '' then
      redis.call('HSET', KEYS[3], field, newest .. ' ' .. ts .. ' ' .. now)
      redis.call('ZADD', KEYS[4], now, field)
    end
    redis.call('PUBLISH', ARGV[6], epoch .. ' ' .. newest .. ' ' .. ts .. ' ' .. origin .. '\n' .. bytes)
    results[#results + 1] = tostring(newest)
  end
end
redis.call('HSET', KEYS[1], 'newest', newest)

redis.call('XTRIM', KEYS[2], 'MAXLEN', ARGV[4])
local cutoff = tonumber(ARGV[3])
-- The oldest entry first: most of the time it has not expired, and nothing more is read.
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local expiring = false
if #oldest > 0 then
  local fields = oldest[1][2]
  for j = 1, #fields, 2 do
    if fields[j] == 't' and tonumber(fields[j + 1]) < cutoff then expiring = true end
  end
end
while expiring do
  local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 100)
  local expired = 0
  for _, entry in ipairs(head) do
    local fields, ts = entry[2], nil
    for j = 1, #fields, 2 do
      if fields[j] == 't' then ts = tonumber(fields[j + 1]) end
    end
    if ts == nil or ts >= cutoff then break end
    redis.call('XDEL', KEYS[2], entry[1])
    expired = expired + 1
  end
  if expired == 0 or expired < #head then break end
end

local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[2])
for _, field in ipairs(old) do
  redis.call('HDEL', KEYS[3], field)
end
if #old > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[2])
end
local extra = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[5])
if extra > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[4], extra)
  for j = 1, #popped, 2 do
    redis.call('HDEL', KEYS[3], popped[j])
  end
end
return {epoch, results}
";

/// History in Redis, shared by every process connected to the same Redis.
///
/// # Keys
///
/// Every key of a room shares the hash tag `{room}` (the room's name with `%`, `{` and `}`
/// percent-encoded), so a room's scripts touch one slot and Redis Cluster works:
///
/// | key | type | what |
/// | --- | --- | --- |
/// | `<prefix>{room}:meta` | hash | `epoch` (random, made when the hash is created) and `newest` (the last offset) |
/// | `<prefix>{room}:stream` | stream | one entry per kept message, id `0-<offset>`, fields `t` (timestamp ms) and `d` (bytes) |
/// | `<prefix>{room}:dedupe` | hash | `<len>:<sender>:<clientMsgId>` → `<offset> <timestamp> <recorded>` |
/// | `<prefix>{room}:dedupe_age` | sorted set | the same fields by when they were recorded |
/// | `<prefix>{room}:ch` | channel | every kept message, as `<epoch> <offset> <timestamp> <origin>\n<bytes>` (origin `-` for none); other publishers may use it for messages that start with `~` |
///
/// If the meta hash is missing (Redis lost its data, or it was evicted), the next script that
/// reads it makes a new epoch and deletes whatever is left of the room's other keys, so offsets
/// start again at 1 in a stream nobody can mistake for the old one.
///
/// # One script per batch, offsets spliced in
///
/// [`Publish::build`] makes the stored bytes from the assigned offset, which only Redis knows
/// while the script runs. So the engine builds each message twice with two probe offsets and
/// finds where the offset goes (the bytes must hold it at most once, in decimal, and otherwise
/// not depend on it: true of the server's JSON), and sends the bytes before and after it; the
/// `COMMIT` script assigns the offsets, splices them in, skips ids already kept, appends,
/// records, publishes and trims, atomically. Processes publishing to one room at once take
/// turns in Redis itself: no lock, no retry, a stalled process holds up nobody. The engine then
/// builds each new message once more with its real offset, for the caller.
///
/// # Time
///
/// Timestamps, the ttl and the dedupe window come from [`Options::clock`] and are passed to the
/// scripts as arguments (not Redis `TIME`), so that every node and the tests agree on them.
///
/// # Threads
///
/// The engine runs its Redis I/O on a small tokio runtime of its own (one worker thread), so
/// the synchronous [`Engine`] calls work from any thread, an async task's included. Publishes
/// are queued per room; one task per room with publishes waiting sends them in batches (all
/// rooms' scripts share one multiplexed connection). Callbacks run on one completion thread in
/// the order the batches committed, so a room's callbacks run in offset order and never
/// concurrently, and a callback may call the engine again (reads block on the runtime, which
/// the completion thread is not part of).
///
/// If Redis cannot be reached, publishes fail with [`Error::Unavailable`] (no offset used) and
/// reads with [`Error::Read`]; the connection is re-established in the background. A `COMMIT`
/// whose answer was lost (a timeout) may have been applied although its publishes failed: a
/// resend with the same `clientMsgId` is then recognised as a duplicate, with the kept offset.
///
/// Operate Redis with `maxmemory-policy noeviction` (an evicted room starts a new epoch) and,
/// for history that survives a Redis restart, with AOF persistence (`appendfsync always` for
/// no acknowledged message lost).
///
/// # Example
///
/// ```no_run
/// use hubbub_history::{Engine, Options, Publish, RedisConfig, RedisEngine, publish_and_wait};
///
/// let config = RedisConfig::new("redis://127.0.0.1:6379/").prefix("chat:");
/// let engine = RedisEngine::connect(config, Options::default())?;
/// let published = publish_and_wait(&engine, Publish::new("general", "ada", |assigned| {
///     format!(r#"{{"text":"hi","offset":{}}}"#, assigned.offset).into()
/// }))?;
/// assert_eq!(engine.position("general")?.offset, published.offset);
/// # Ok::<(), hubbub_history::Error>(())
/// ```
pub struct RedisEngine {
    /// What the runtime's tasks share.
    inner: Arc<Inner>,
    /// Where tasks are spawned.
    handle: Handle,
    /// The runtime, shut down (without waiting) when the engine is dropped.
    runtime: Option<Runtime>,
}

impl std::fmt::Debug for RedisEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEngine")
            .field("url", &self.inner.config.url)
            .field("prefix", &self.inner.config.prefix)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// Retention, clock and fault switch.
    options: Options,
    /// Connection settings and key prefix.
    config: RedisConfig,
    /// One multiplexed connection that reconnects by itself.
    conn: ConnectionManager,
    /// The two scripts, sent by hash (`EVALSHA`, loaded on first use).
    prepare: Script,
    commit: Script,

    /// Publishes waiting per room; a room is present exactly while a task works on it.
    rooms: Mutex<HashMap<Arc<str>, VecDeque<Queued>>>,
    /// The completion thread's queue.
    done: mpsc::Sender<(OnDone, Result<Published>)>,
}

struct Queued {
    request: Publish,
    completer: Completer,
}

/// An `on_done` that is called exactly once: with the outcome, or with [`Error::Closed`] if it
/// is dropped first (the engine shut down with the publish in flight).
struct Completer {
    on_done: Option<OnDone>,
    done: mpsc::Sender<(OnDone, Result<Published>)>,
}

impl Completer {
    fn complete(mut self, result: Result<Published>) {
        self.send(result);
    }

    fn send(&mut self, result: Result<Published>) {
        let Some(on_done) = self.on_done.take() else { return };
        if let Err(mpsc::SendError((on_done, result))) = self.done.send((on_done, result)) {
            // The completion thread is gone only once every sender is: call it here.
            on_done(result);
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        self.send(Err(Error::Closed));
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The queues are consistent whenever the lock is released: no user code runs under it.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn unavailable(err: &redis::RedisError) -> Error {
    Error::Unavailable(format!("redis: {err}"))
}

/// A room's keys and channel.
struct RoomKeys {
    meta: String,
    stream: String,
    dedupe: String,
    dedupe_age: String,
    channel: String,
}

impl RoomKeys {
    fn new(prefix: &str, room: &str) -> Self {
        let mut tag = String::with_capacity(room.len() + 2);
        tag.push('{');
        for c in room.chars() {
            match c {
                '%' => tag.push_str("%25"),
                '{' => tag.push_str("%7B"),
                '}' => tag.push_str("%7D"),
                c => tag.push(c),
            }
        }
        tag.push('}');
        Self {
            meta: format!("{prefix}{tag}:meta"),
            stream: format!("{prefix}{tag}:stream"),
            dedupe: format!("{prefix}{tag}:dedupe"),
            dedupe_age: format!("{prefix}{tag}:dedupe_age"),
            channel: format!("{prefix}{tag}:ch"),
        }
    }
}

/// A kept message as published on its room's channel (see [`RedisEngine::channel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelMessage<'a> {
    /// The room's epoch.
    pub epoch: &'a str,
    /// The message's offset.
    pub offset: u64,
    /// Its timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The publish's [`Publish::origin`], if it had one.
    pub origin: Option<&'a str>,
    /// The stored bytes.
    pub bytes: &'a [u8],
}

impl<'a> ChannelMessage<'a> {
    /// Reads a room channel's payload; `None` if it is not a kept message (it starts with `~`,
    /// or is malformed).
    pub fn parse(payload: &'a [u8]) -> Option<Self> {
        let newline = payload.iter().position(|&b| b == b'\n')?;
        let header = std::str::from_utf8(&payload[..newline]).ok()?;
        let mut parts = header.split(' ');
        let epoch = parts.next().filter(|e| !e.is_empty() && !e.starts_with('~'))?;
        let offset = parts.next()?.parse().ok()?;
        let timestamp_ms = parts.next()?.parse().ok()?;
        let origin = match parts.next() {
            None | Some("-") => None,
            Some(origin) => Some(origin),
        };
        Some(Self { epoch, offset, timestamp_ms, origin, bytes: &payload[newline + 1..] })
    }
}

/// Whether `origin` can go in a channel message's header: short, no whitespace, not empty.
fn valid_origin(origin: &str) -> bool {
    !origin.is_empty() && origin.len() <= 64 && !origin.contains(char::is_whitespace)
}

/// The dedupe field of a sender's message id; the length prefix keeps any sender unambiguous.
fn dedupe_field(sender: &str, id: Uuid) -> String {
    format!("{}:{sender}:{}", sender.len(), id.simple())
}

/// What `PREPARE` answered.
struct Prepared {
    epoch: Epoch,
    newest: u64,
    first: u64,
}

fn parse_seen(raw: &str) -> Option<(u64, u64, u64)> {
    let mut parts = raw.split(' ').map(str::parse::<u64>);
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(offset)), Some(Ok(timestamp)), Some(Ok(recorded))) => Some((offset, timestamp, recorded)),
        _ => None,
    }
}

/// One publish of a batch, while the batch is being committed.
struct Slot {
    request: Publish,
    completer: Completer,
    /// Its dedupe field, if it has a `clientMsgId`.
    field: Option<String>,
    /// Its timestamp.
    timestamp_ms: u64,
    /// What it comes to, once known.
    outcome: Option<Result<Published>>,
}

/// Offsets the engine builds a message with to find where its offset goes: the same number of
/// digits, every digit different between the two.
const PROBES: [u64; 2] = [1_111_111_111_111_111_111, 2_222_222_222_222_222_222];

/// A message's bytes around its offset: built with two different offsets, the bytes must be
/// the same but for one decimal offset. `None` if they are not (the offset is written twice,
/// or the bytes depend on it otherwise).
struct Template {
    /// The bytes before the offset (all of them if the offset is not in the bytes).
    prefix: Vec<u8>,
    /// The bytes after it.
    suffix: Vec<u8>,
    /// Whether the offset goes between them.
    spliced: bool,
}

impl Template {
    fn of(build: &crate::Build, timestamp_ms: u64) -> Option<Self> {
        let [one, two] = PROBES.map(|offset| build(Assigned { offset, timestamp_ms }));
        if one == two {
            return Some(Self { prefix: one.to_vec(), suffix: Vec::new(), spliced: false });
        }
        if one.len() != two.len() {
            return None;
        }
        let first = one.iter().zip(two.iter()).position(|(a, b)| a != b)?;
        let last = one.len() - 1 - one.iter().rev().zip(two.iter().rev()).position(|(a, b)| a != b)?;
        let digits = PROBES.map(|probe| probe.to_string());
        let (a, b) = (&one[first..=last], &two[first..=last]);
        (a == digits[0].as_bytes() && b == digits[1].as_bytes()).then(|| Self {
            prefix: one[..first].to_vec(),
            suffix: one[last + 1..].to_vec(),
            spliced: true,
        })
    }
}

impl Inner {
    /// Reads the room, creating it if needed.
    async fn prepare(&self, keys: &RoomKeys) -> redis::RedisResult<Prepared> {
        let mut invocation = self.prepare.key(&keys.meta);
        invocation.key(&keys.stream).key(&keys.dedupe).key(&keys.dedupe_age).arg(Epoch::random().as_str());
        let mut conn = self.conn.clone();
        let (epoch, newest, first): (String, u64, u64) = invocation.invoke_async(&mut conn).await?;
        Ok(Prepared { epoch: Epoch::new(epoch), newest, first })
    }

    /// Publishes one batch of a room's queue and completes each of its publishes, in order.
    async fn publish_batch(&self, room: &Arc<str>, batch: Vec<Queued>) {
        if self.options.faults.failing() {
            for queued in batch {
                queued.completer.complete(Err(Error::Unavailable("injected write failure".into())));
            }
            return;
        }
        let now_ms = self.options.clock.now_ms();
        let mut slots: Vec<Slot> = batch
            .into_iter()
            .map(|Queued { request, completer }| {
                let field = request.client_msg_id.map(|id| dedupe_field(&request.sender, id));
                let timestamp_ms = request.timestamp_ms.unwrap_or(now_ms);
                Slot { request, completer, field, timestamp_ms, outcome: None }
            })
            .collect();
        if let Err(err) = self.commit(room, &mut slots, now_ms).await {
            tracing::warn!(room = &**room, cause = %err, "history publish to redis failed");
            for slot in &mut slots {
                slot.outcome.get_or_insert_with(|| Err(err.clone()));
            }
        }
        for slot in slots {
            slot.completer.complete(slot.outcome.unwrap_or(Err(Error::Closed)));
        }
    }

    /// Sends the batch's templates in one `COMMIT` and leaves each slot's outcome.
    async fn commit(&self, room: &str, slots: &mut [Slot], now_ms: u64) -> Result<()> {
        let retention = &self.options.retention;
        let forget_before = now_ms.saturating_sub(millis(retention.dedupe_window));
        let keys = RoomKeys::new(&self.config.prefix, room);
        let mut commit = self.commit.key(&keys.meta);
        commit
            .key(&keys.stream)
            .key(&keys.dedupe)
            .key(&keys.dedupe_age)
            .arg(now_ms)
            .arg(forget_before)
            .arg(core::ttl_cutoff(retention, now_ms))
            .arg(retention.max_messages)
            .arg(retention.dedupe_capacity)
            .arg(&keys.channel)
            .arg(Epoch::random().as_str());
        let mut sent = Vec::with_capacity(slots.len());
        for (index, slot) in slots.iter_mut().enumerate() {
            // Nothing is sent before the bytes exist, so a panicking builder leaves no trace.
            let build = &slot.request.build;
            let template = match catch_unwind(AssertUnwindSafe(|| Template::of(build, slot.timestamp_ms))) {
                Ok(Some(template)) => template,
                Ok(None) => {
                    let why = "the message's bytes must hold its offset at most once, in decimal";
                    slot.outcome = Some(Err(Error::Unavailable(why.into())));
                    continue;
                }
                Err(_) => {
                    slot.outcome = Some(Err(Error::BuildPanicked));
                    continue;
                }
            };
            let origin = slot.request.origin.as_deref().filter(|o| valid_origin(o)).unwrap_or("-");
            commit
                .arg(slot.field.as_deref().unwrap_or(""))
                .arg(slot.timestamp_ms)
                .arg(origin)
                .arg(if template.spliced { "1" } else { "0" })
                .arg(template.prefix)
                .arg(template.suffix);
            sent.push(index);
        }
        if sent.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let (epoch, results): (String, Vec<String>) =
            commit.invoke_async(&mut conn).await.map_err(|err| unavailable(&err))?;
        if results.len() != sent.len() {
            return Err(Error::Unavailable("redis: unexpected answer to a publish".into()));
        }
        let epoch = Epoch::new(epoch);
        for (index, result) in sent.into_iter().zip(results) {
            let slot = &mut slots[index];
            let published = if let Ok(offset) = result.parse::<u64>() {
                let assigned = Assigned { offset, timestamp_ms: slot.timestamp_ms };
                // The bytes Redis made by splicing, made again here for the caller.
                let build = &slot.request.build;
                let bytes = catch_unwind(AssertUnwindSafe(|| build(assigned))).ok();
                Published {
                    epoch: epoch.clone(),
                    offset,
                    timestamp_ms: slot.timestamp_ms,
                    duplicate: false,
                    bytes,
                }
            } else if let Some((offset, timestamp_ms, _)) = parse_seen(&result) {
                Published { epoch: epoch.clone(), offset, timestamp_ms, duplicate: true, bytes: None }
            } else {
                slot.outcome = Some(Err(Error::Unavailable("redis: unexpected answer to a publish".into())));
                continue;
            };
            slot.outcome = Some(Ok(published));
        }
        Ok(())
    }

    /// A room's kept messages in `low..=high`, at most `limit`, from the high end if
    /// `newest_first`.
    async fn messages(
        &self,
        keys: &RoomKeys,
        low: u64,
        high: u64,
        newest_first: bool,
        limit: usize,
    ) -> redis::RedisResult<Vec<StoredMessage>> {
        let (low, high) = (format!("0-{low}"), format!("0-{high}"));
        let mut cmd = if newest_first { redis::cmd("XREVRANGE") } else { redis::cmd("XRANGE") };
        cmd.arg(&keys.stream);
        if newest_first {
            cmd.arg(&high).arg(&low);
        } else {
            cmd.arg(&low).arg(&high);
        }
        cmd.arg("COUNT").arg(limit);
        let mut conn = self.conn.clone();
        let reply: redis::Value = cmd.query_async(&mut conn).await?;
        parse_entries(reply).ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Parse, "unexpected stream entry from redis"))
        })
    }
}

/// Stream entries `[[id, [field, value, ...]], ...]` as messages.
fn parse_entries(reply: redis::Value) -> Option<Vec<StoredMessage>> {
    use redis::Value;
    let Value::Array(entries) = reply else { return None };
    let text = |value: &Value| match value {
        Value::BulkString(bytes) => Some(bytes.clone()),
        Value::SimpleString(text) => Some(text.clone().into_bytes()),
        _ => None,
    };
    entries
        .into_iter()
        .map(|entry| {
            let Value::Array(parts) = entry else { return None };
            let [id, Value::Array(fields)] = parts.as_slice() else { return None };
            let id = String::from_utf8(text(id)?).ok()?;
            let offset = id.rsplit('-').next()?.parse().ok()?;
            let (mut timestamp_ms, mut bytes) = (None, None);
            for pair in fields.chunks(2) {
                let [name, value] = pair else { return None };
                match text(name)?.as_slice() {
                    b"t" => timestamp_ms = String::from_utf8(text(value)?).ok()?.parse().ok(),
                    b"d" => bytes = Some(Bytes::from(text(value)?)),
                    _ => {}
                }
            }
            Some(StoredMessage { offset, timestamp_ms: timestamp_ms?, bytes: bytes? })
        })
        .collect()
}

/// Works on one room's queue until it is empty.
async fn run_room(inner: Arc<Inner>, room: Arc<str>) {
    loop {
        let batch: Vec<Queued> = {
            let mut rooms = lock(&inner.rooms);
            let Some(queue) = rooms.get_mut(&room) else { return };
            if queue.is_empty() {
                rooms.remove(&room);
                return;
            }
            let take = queue.len().min(inner.config.max_batch.max(1));
            queue.drain(..take).collect()
        };
        inner.publish_batch(&room, batch).await;
    }
}

impl RedisEngine {
    /// Connects to Redis (failing if it cannot be reached now) and starts the engine's runtime
    /// and completion thread.
    pub fn connect(config: RedisConfig, options: Options) -> Result<Self> {
        if config.prefix.contains(['{', '}']) {
            return Err(Error::Unavailable(format!(
                "redis key prefix {:?} must not contain braces",
                config.prefix
            )));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hubbub-history-redis")
            .enable_all()
            .build()
            .map_err(|err| Error::Unavailable(format!("starting the redis engine's runtime: {err}")))?;
        let handle = runtime.handle().clone();
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connection_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let connected =
            redis::Client::open(config.url.as_str()).map_err(|err| unavailable(&err)).and_then(|client| {
                wait(&handle, async move { ConnectionManager::new_with_config(client, manager).await })?
                    .map_err(|err| unavailable(&err))
            });
        let conn = match connected {
            Ok(conn) => conn,
            Err(err) => {
                // Dropping a runtime may block, which panics inside another runtime (the
                // server's, when it connects at startup).
                runtime.shutdown_background();
                return Err(err);
            }
        };
        let (done, completions) = mpsc::channel::<(OnDone, Result<Published>)>();
        std::thread::Builder::new()
            .name("hubbub-history-redis-done".into())
            .spawn(move || {
                // Ends when the engine and every publish in flight are gone.
                for (on_done, result) in completions {
                    if catch_unwind(AssertUnwindSafe(|| on_done(result))).is_err() {
                        tracing::error!("a history completion callback panicked");
                    }
                }
            })
            .map_err(|err| Error::Unavailable(format!("starting the completion thread: {err}")))?;
        let inner = Arc::new(Inner {
            options,
            config,
            conn,
            prepare: Script::new(PREPARE),
            commit: Script::new(COMMIT),
            rooms: Mutex::new(HashMap::new()),
            done,
        });
        Ok(Self { inner, handle, runtime: Some(runtime) })
    }

    /// The channel on which each of the room's kept messages is published, as
    /// `<epoch> <offset> <timestamp> <origin>\n<bytes>` (see [`Publish::origin`]; `-` for
    /// none). Other publishers may share the channel with messages that start with `~`, which
    /// no epoch does.
    pub fn channel(&self, room: &str) -> String {
        RoomKeys::new(&self.inner.config.prefix, room).channel
    }

    /// The key `<prefix>{room}:<suffix>`: in the room's hash slot, beside its other keys, for
    /// whatever else a server keeps per room (presence, for example).
    pub fn room_key(&self, room: &str, suffix: &str) -> String {
        let mut key = RoomKeys::new(&self.inner.config.prefix, room).meta;
        key.truncate(key.len() - "meta".len());
        key.push_str(suffix);
        key
    }

    /// The key prefix every key and channel starts with.
    pub fn prefix(&self) -> &str {
        &self.inner.config.prefix
    }

    /// Runs `fut` on the engine's runtime and waits for it on this thread.
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> Result<T> {
        wait(&self.handle, fut)
    }

    fn prepared(&self, room: &str) -> Result<Prepared> {
        let inner = self.inner.clone();
        let keys = RoomKeys::new(&inner.config.prefix, room);
        let prepared = self.run(async move { inner.prepare(&keys).await })?;
        prepared.map_err(|err| Error::Read(format!("redis: {err}")))
    }
}

/// Runs `fut` on `handle`'s runtime and blocks this thread (which must not be one of that
/// runtime's) until it finishes. Works from inside another runtime, unlike `Handle::block_on`.
fn wait<T: Send + 'static>(handle: &Handle, fut: impl Future<Output = T> + Send + 'static) -> Result<T> {
    let (tx, rx) = mpsc::sync_channel(1);
    handle.spawn(async move {
        // The waiter is gone only if its thread panicked.
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| Error::Closed)
}

impl Drop for RedisEngine {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Publishes still queued or in flight complete with `Error::Closed` as their
            // tasks are dropped.
            runtime.shutdown_background();
        }
        for (_, queue) in lock(&self.inner.rooms).drain() {
            drop(queue);
        }
    }
}

/// A room as `PREPARE` found it, with its messages read on demand, for the shared rules in
/// `core`.
struct Snapshot<'a> {
    engine: &'a RedisEngine,
    keys: Arc<RoomKeys>,
    meta: RoomMeta,
}

impl Reader for Snapshot<'_> {
    fn meta(&self, _room: &str) -> StoreResult<Option<RoomMeta>> {
        Ok(Some(self.meta))
    }

    fn messages(
        &self,
        _room: &str,
        low: u64,
        high: u64,
        newest_first: bool,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        let (inner, keys) = (self.engine.inner.clone(), self.keys.clone());
        let read =
            self.engine.run(async move { inner.messages(&keys, low, high, newest_first, limit).await });
        match read {
            Ok(Ok(messages)) => Ok(messages),
            Ok(Err(err)) => Err(StoreError(format!("redis: {err}"))),
            Err(err) => Err(StoreError(err.to_string())),
        }
    }
}

impl RedisEngine {
    fn snapshot(&self, room: &str) -> Result<(Epoch, Snapshot<'_>)> {
        let prepared = self.prepared(room)?;
        let meta = RoomMeta { newest: prepared.newest, first: prepared.first, dedupe_len: 0 };
        let keys = Arc::new(RoomKeys::new(&self.inner.config.prefix, room));
        Ok((prepared.epoch, Snapshot { engine: self, keys, meta }))
    }
}

impl Engine for RedisEngine {
    fn publish(&self, request: Publish, on_done: OnDone) {
        let room = request.room.clone();
        let completer = Completer { on_done: Some(on_done), done: self.inner.done.clone() };
        let queued = Queued { request, completer };
        let mut rooms = lock(&self.inner.rooms);
        if let Some(queue) = rooms.get_mut(&room) {
            queue.push_back(queued);
            return;
        }
        rooms.insert(room.clone(), VecDeque::from([queued]));
        drop(rooms);
        self.handle.spawn(run_room(self.inner.clone(), room));
    }

    fn position(&self, room: &str) -> Result<Position> {
        let prepared = self.prepared(room)?;
        Ok(Position { epoch: prepared.epoch, offset: prepared.newest })
    }

    fn since(&self, room: &str, since: &Position, max: usize) -> Result<Recovery> {
        let now_ms = self.inner.options.clock.now_ms();
        let (epoch, snapshot) = self.snapshot(room)?;
        core::since(&snapshot, &self.inner.options.retention, &epoch, now_ms, room, since, max)
            .map_err(|err| Error::Read(err.0))
    }

    fn history(&self, room: &str, before: Option<u64>, limit: usize) -> Result<History> {
        let now_ms = self.inner.options.clock.now_ms();
        let (epoch, snapshot) = self.snapshot(room)?;
        core::history(&snapshot, &self.inner.options.retention, &epoch, now_ms, room, before, limit)
            .map_err(|err| Error::Read(err.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_is_one_hash_tag_whatever_its_name() {
        let keys = RoomKeys::new("p:", "a}b{c%");
        assert_eq!(keys.meta, "p:{a%7Db%7Bc%25}:meta");
        assert_eq!(keys.channel, "p:{a%7Db%7Bc%25}:ch");
    }

    #[test]
    fn channel_messages_are_read_back() {
        let message = ChannelMessage::parse(b"e1 7 1700 ab12\n{\"x\":1}\n").unwrap();
        assert_eq!(
            message,
            ChannelMessage {
                epoch: "e1",
                offset: 7,
                timestamp_ms: 1700,
                origin: Some("ab12"),
                bytes: b"{\"x\":1}\n"
            }
        );
        assert_eq!(ChannelMessage::parse(b"e1 7 1700 -\nx").unwrap().origin, None);
        assert_eq!(ChannelMessage::parse(b"~node\n{}"), None);
        assert_eq!(ChannelMessage::parse(b"e1 x 1700 -\n{}"), None);
        assert_eq!(ChannelMessage::parse(b"no newline"), None);
        assert!(valid_origin("a1") && !valid_origin("a b") && !valid_origin(""));
    }

    #[test]
    fn a_template_finds_the_one_place_of_the_offset() {
        let build: crate::Build = Box::new(|at: Assigned| {
            Bytes::from(format!(r#"{{"text":"1111 {}","offset":{}}}"#, at.timestamp_ms, at.offset))
        });
        let template = Template::of(&build, 1111).unwrap();
        assert!(template.spliced);
        assert_eq!(template.prefix, br#"{"text":"1111 1111","offset":"#);
        assert_eq!(template.suffix, b"}");
        let fixed: crate::Build = Box::new(|_| Bytes::from_static(b"no offset"));
        let template = Template::of(&fixed, 0).unwrap();
        assert_eq!((template.spliced, template.prefix.as_slice()), (false, &b"no offset"[..]));
        let twice: crate::Build =
            Box::new(|at: Assigned| Bytes::from(format!("{} {}", at.offset, at.offset)));
        assert!(Template::of(&twice, 0).is_none());
        let hex: crate::Build = Box::new(|at: Assigned| Bytes::from(format!("{:x}", at.offset)));
        assert!(Template::of(&hex, 0).is_none());
    }

    #[test]
    fn dedupe_fields_do_not_collide() {
        let id = Uuid::nil();
        assert_ne!(dedupe_field("a:b", id), dedupe_field("a", id));
        assert_eq!(parse_seen("3 1700 1701"), Some((3, 1700, 1701)));
        assert_eq!(parse_seen(""), None);
    }
}
