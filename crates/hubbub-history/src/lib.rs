//! Room history for Hubbub: every kept message of a room gets the next offset of the room's stream, is stored, and can be replayed.
//!
//! A room is a stream. Each kept message gets the room's next `offset` (1, 2, 3, … with no
//! gaps) within an [`Epoch`], an opaque string that changes whenever the room's history is
//! lost, so that an offset is only ever compared within its epoch. Messages are opaque bytes:
//! the server stores the exact JSON text it broadcast, which already contains the offset, so
//! [`Publish`] carries a closure that builds the bytes from the assigned offset and timestamp.
//!
//! The seam is the [`Engine`] trait, with two implementations and one conformance suite
//! ([`conformance`]) that every implementation must pass:
//!
//! - [`MemoryEngine`]: history in RAM, a new epoch at every start.
//! - [`DiskEngine`]: history in one [redb](https://docs.rs/redb) file and a journal beside it. A
//!   publish completes only once it is durable (fsync), with group commit: one writer thread
//!   appends the changes of every publish waiting at that moment to the journal with one write
//!   and one fsync; a checkpoint thread moves the journal's changes into the redb file about
//!   once a second.
//! - `RedisEngine` (cargo feature `redis`): history in Redis ≥ 7, shared by every server process
//!   connected to it. A publish completes once Redis has run the room's append script (durable
//!   as Redis's persistence settings make it); epochs are per room and change when Redis has lost
//!   the room's keys. See its docs for the key layout.
//!
//! # Guarantees
//!
//! - **Offsets** are contiguous per room: 1 for the first kept message, then +1 each. A failed
//!   publish uses no offset.
//! - **Completion order.** The `on_done` callback of [`Engine::publish`] is invoked exactly once.
//!   For one room, successful completions are invoked in offset order, one after the other
//!   (never concurrently), so a caller that broadcasts from the callback broadcasts in offset
//!   order even when many threads publish to the room at once. With the disk engine the callback
//!   runs on the writer thread after the batch is durable; with the memory engine it runs on a
//!   publishing thread (possibly another publisher's) after the message is stored. Either way it
//!   may run before or after `publish` returns, and it should be short: hand heavy work off
//!   while keeping the order (for example a channel per room). It may call the engine again.
//! - **Visibility.** A message is visible to [`Engine::since`] and [`Engine::history`] at the
//!   latest when its callback runs, possibly a little before. To join a room without skipping or
//!   doubling a message, a server adds the member to the room's live delivery first, then calls
//!   `since`, sends the recovered messages, and drops any live message whose offset is not
//!   greater than the last one it replayed.
//! - **Dedupe.** A publish with the same room, sender and `clientMsgId` as one kept within the
//!   dedupe window completes with the original offset and timestamp and `duplicate: true`, and
//!   stores nothing; with the disk engine also after a restart.
//! - **Epochs** belong to rooms: the memory and disk engines happen to give every room the same
//!   one, the Redis engine gives each room its own. A room's epoch is fixed from its first
//!   [`Engine::position`] on, until its history is lost.
//! - **Failure.** If a write fails (disk full, I/O error, Redis unreachable), every publish of that batch completes
//!   with [`Error::Unavailable`]; nothing of it is kept and no offset is used. The engine keeps
//!   working once writes succeed again. (One exception: a Redis engine's publish whose answer
//!   timed out may have been kept, if Redis ran it late; a resend with its `clientMsgId` is
//!   then recognised as a duplicate.) A store file that cannot be opened is an [`OpenError`]
//!   naming the file; history is never discarded silently.
//! - **Retention** per room, trimming from the oldest: at most [`Retention::max_messages`], none
//!   older than [`Retention::ttl`]. Rooms keep their history when they have no members. A room's
//!   offsets continue after its messages were trimmed, and its epoch stays.
//!
//! # Why redb
//!
//! The disk engine needs crash-safe appends with one fsync per batch, ordered range scans by
//! `(room, offset)`, a stable file format and a lock against a second process.
//! [redb](https://docs.rs/redb) is pure Rust, ACID with copy-on-write B-trees (a commit is
//! durable when `commit` returns; a crash leaves the previous commit), single writer (which is
//! exactly group commit's shape), takes an exclusive file lock and has a stable file format.
//! [fjall](https://docs.rs/fjall), an LSM tree, is built for write-heavy workloads far beyond
//! chat's and brings compaction threads, a journal and a directory of files to operate.
//! SQLite (rusqlite) is the most proven of the three but is C, needs a C toolchain, and its
//! per-connection threading model fits a single writer thread no better than redb does.
//! redb is pinned to 2.6 because 3.x needs Rust 1.89 and the workspace's MSRV is 1.88; files are
//! created in redb's v3 file format, so moving to redb 3 later needs no file upgrade.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use hubbub_history::{Engine, MemoryEngine, Options, Publish, Recovery, publish_and_wait};
//!
//! let engine = MemoryEngine::new(Options::default());
//! let request = Publish::new("general", "ada", |assigned| {
//!     Bytes::from(format!(r#"{{"text":"hi","offset":{}}}"#, assigned.offset))
//! });
//! let published = publish_and_wait(&engine, request).expect("memory engine stores");
//! assert_eq!(published.offset, 1);
//!
//! // A member who had seen nothing of this epoch recovers the message.
//! let since = hubbub_history::Position { epoch: published.epoch.clone(), offset: 0 };
//! let Recovery::Recovered { messages, .. } = engine.since("general", &since, 500)? else {
//!     panic!("one message is recoverable");
//! };
//! assert_eq!(messages[0].bytes, r#"{"text":"hi","offset":1}"#);
//! # Ok::<(), hubbub_history::Error>(())
//! ```

mod clock;
pub mod conformance;
mod core;
mod disk;
mod journal;
mod memory;
#[cfg(feature = "redis")]
mod redis;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use uuid::Uuid;

#[cfg(feature = "redis")]
pub use self::redis::{ChannelMessage, RedisConfig, RedisEngine};
pub use clock::{Clock, ManualClock, SystemClock};
pub use disk::{DiskConfig, DiskEngine, DiskStats, OpenError, OpenFailure};
pub use memory::MemoryEngine;

/// A result whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The identity of a room's stream: offsets are only comparable within one epoch.
///
/// It changes whenever the room's history is lost: at every start of a [`MemoryEngine`], when a
/// [`DiskEngine`]'s file is created anew. Clients treat it as an opaque string.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Epoch(Arc<str>);

impl Epoch {
    /// An epoch with the given text (as received from a client, for example).
    pub fn new(text: impl Into<Arc<str>>) -> Self {
        Self(text.into())
    }

    /// A new random epoch: 16 hexadecimal digits (64 random bits).
    pub fn random() -> Self {
        let hex = Uuid::new_v4().simple().to_string();
        Self(Arc::from(&hex[..16]))
    }

    /// The epoch's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({:?})", &*self.0)
    }
}

/// A place in a room's stream: an offset within an epoch.
///
/// As the answer of [`Engine::position`] it is the newest kept offset (0 for none); as the
/// argument of [`Engine::since`] it is the last offset a client has seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// The stream's epoch.
    pub epoch: Epoch,
    /// An offset in that epoch; 0 is "before the first message".
    pub offset: u64,
}

/// What the engine assigned to a new message, handed to [`Publish::build`] to make its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assigned {
    /// The message's offset in its room.
    pub offset: u64,
    /// The message's timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

/// Builds a message's stored bytes from what the engine assigned.
///
/// Called once by the memory and disk engines. The Redis engine calls it with two probe offsets
/// first, to find where the offset goes (the bytes must hold it at most once, in decimal, and
/// not depend on it otherwise), and once more with the assigned offset.
pub type Build = Box<dyn Fn(Assigned) -> Bytes + Send>;

/// Receives the outcome of a publish; see [`Engine::publish`] for when it runs.
pub type OnDone = Box<dyn FnOnce(Result<Published>) + Send>;

/// A message to keep in a room's stream.
pub struct Publish {
    /// The room.
    pub room: Arc<str>,
    /// Who sent it, as the server identifies senders for dedupe.
    pub sender: Arc<str>,
    /// The client's id for the message; a resend with the same id is recognised as a duplicate.
    pub client_msg_id: Option<Uuid>,
    /// The message's timestamp (milliseconds since the Unix epoch); `None`: the engine's clock.
    pub timestamp_ms: Option<u64>,
    /// Makes the bytes to store once the offset is known. Not called for a duplicate or a
    /// publish that fails before its offset is assigned; may be called more than once (see
    /// [`Build`]), and only the last call's bytes are kept.
    pub build: Build,
    /// A tag published with the message on its room's channel by the Redis engine (the
    /// sending connection, so that the nodes delivering it can skip its sender); not stored,
    /// and unused by the other engines. At most 64 bytes of anything but whitespace.
    pub origin: Option<Arc<str>>,
}

impl Publish {
    /// A publish with no `clientMsgId` and the engine's timestamp.
    pub fn new(
        room: impl Into<Arc<str>>,
        sender: impl Into<Arc<str>>,
        build: impl Fn(Assigned) -> Bytes + Send + 'static,
    ) -> Self {
        Self {
            room: room.into(),
            sender: sender.into(),
            client_msg_id: None,
            timestamp_ms: None,
            build: Box::new(build),
            origin: None,
        }
    }

    /// Sets the tag published with the message (see [`Publish::origin`]).
    #[must_use]
    pub fn origin(mut self, origin: impl Into<Arc<str>>) -> Self {
        self.origin = Some(origin.into());
        self
    }

    /// Sets the client's message id, for dedupe.
    #[must_use]
    pub fn client_msg_id(mut self, id: Uuid) -> Self {
        self.client_msg_id = Some(id);
        self
    }

    /// Sets the timestamp instead of the engine's clock.
    #[must_use]
    pub fn timestamp_ms(mut self, timestamp_ms: u64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }
}

impl fmt::Debug for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publish")
            .field("room", &self.room)
            .field("sender", &self.sender)
            .field("client_msg_id", &self.client_msg_id)
            .field("timestamp_ms", &self.timestamp_ms)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// A publish that completed: the message is kept (durably, with the disk engine).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// The room's epoch.
    pub epoch: Epoch,
    /// The message's offset; for a duplicate, the original's.
    pub offset: u64,
    /// The message's timestamp; for a duplicate, the original's.
    pub timestamp_ms: u64,
    /// True when this was a resend of a message already kept: nothing new was stored.
    pub duplicate: bool,
    /// The bytes stored, as built; `None` for a duplicate.
    pub bytes: Option<Bytes>,
}

/// A kept message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its offset in the room.
    pub offset: u64,
    /// Its timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Its bytes, exactly as built at publish.
    pub bytes: Bytes,
}

/// The answer of [`Engine::since`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Every message after the given offset, in offset order (empty when nothing was missed).
    Recovered {
        /// The room's epoch and newest offset.
        position: Position,
        /// The missed messages, oldest first.
        messages: Vec<StoredMessage>,
    },
    /// The missed messages cannot all be given: another epoch, an offset beyond the newest,
    /// more than `max` missed, or some trimmed away.
    NotRecoverable {
        /// The room's epoch and newest offset.
        position: Position,
    },
}

/// The answer of [`Engine::history`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct History {
    /// The room's epoch and newest offset.
    pub position: Position,
    /// Messages, oldest first.
    pub messages: Vec<StoredMessage>,
    /// True when older messages are kept than the first of `messages`.
    pub has_more: bool,
}

/// How much history each room keeps and how long message ids are remembered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Most messages kept per room; the oldest are trimmed first. Default 1,000.
    pub max_messages: u64,
    /// Messages older than this are trimmed. Default 30 days.
    pub ttl: Duration,
    /// How long a `clientMsgId` is remembered for dedupe. Default 5 min.
    pub dedupe_window: Duration,
    /// Most message ids remembered per room; the oldest are forgotten first. Default 10,000.
    pub dedupe_capacity: u64,
    /// How often every room is swept of expired messages and ids, even rooms nobody writes to.
    /// Reads never return expired messages, whenever the sweep runs. Default 1 min.
    pub sweep_interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_messages: 1_000,
            ttl: Duration::from_secs(30 * 24 * 3600),
            dedupe_window: Duration::from_secs(300),
            dedupe_capacity: 10_000,
            sweep_interval: Duration::from_secs(60),
        }
    }
}

/// What every engine is built with.
#[derive(Clone)]
pub struct Options {
    /// Retention rules.
    pub retention: Retention,
    /// Where time comes from: timestamps, ttl, dedupe window.
    pub clock: Arc<dyn Clock>,
    /// A switch that makes writes fail, for tests; off unless a test turns it on.
    pub faults: FaultInjector,
    /// What the completions of one batch (one commit) run inside, on the thread that runs them.
    pub batch: BatchScope,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            retention: Retention::default(),
            clock: Arc::new(SystemClock),
            faults: FaultInjector::default(),
            batch: BatchScope::default(),
        }
    }
}

/// Runs the completions of one batch, in order, inside a function of the caller's: a server
/// that delivers from its callbacks can hold its recipients' wake-ups until the batch is
/// done, so a recipient with several messages in one commit is woken, and writes, once.
///
/// The function must call the closure it is given exactly once, on the same thread. The
/// default calls it directly.
#[derive(Clone)]
pub struct BatchScope(Arc<ScopeFn>);

/// A function that runs the batch it is given.
type ScopeFn = dyn Fn(&mut dyn FnMut()) + Send + Sync;

impl BatchScope {
    /// A scope that runs each batch inside `scope`.
    pub fn new(scope: impl Fn(&mut dyn FnMut()) + Send + Sync + 'static) -> Self {
        Self(Arc::new(scope))
    }

    /// Runs `batch` inside the scope.
    pub fn run(&self, mut batch: impl FnMut()) {
        (self.0)(&mut batch);
    }
}

impl Default for BatchScope {
    fn default() -> Self {
        Self::new(|batch| batch())
    }
}

impl fmt::Debug for BatchScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BatchScope")
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("retention", &self.retention)
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

/// A test hook: while on, every write fails as if the disk were full.
///
/// The disk engine fails at the storage layer (every write and fsync of the file returns an I/O
/// error), so its real recovery path is what tests exercise. Clones share the switch.
#[derive(Clone, Debug, Default)]
pub struct FaultInjector(Arc<AtomicBool>);

impl FaultInjector {
    /// Turns failing writes on or off.
    pub fn fail_writes(&self, on: bool) {
        self.0.store(on, Ordering::SeqCst);
    }

    /// Whether writes are failing.
    pub fn failing(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// The I/O error a write gets while writes are failing (a full disk).
    pub(crate) fn check_write(&self) -> std::io::Result<()> {
        if self.failing() {
            Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "injected write failure"))
        } else {
            Ok(())
        }
    }
}

/// Why an operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The store could not write (disk full, I/O error): nothing of this publish was kept and
    /// no offset was used. Worth retrying later; the engine recovers by itself.
    #[error("history store unavailable: {0}")]
    Unavailable(String),
    /// A read from the store failed.
    #[error("history store read failed: {0}")]
    Read(String),
    /// The closure that builds the message's bytes panicked; nothing was kept.
    #[error("building the message to store panicked")]
    BuildPanicked,
    /// The engine has shut down.
    #[error("history engine closed")]
    Closed,
}

/// Room history: publish, position, recovery and scrollback.
///
/// Object-safe; a server holds one as `Arc<dyn Engine>`. Reads are synchronous and short (the
/// disk engine reads its page cache or the file; no lock is held while waiting for a write).
pub trait Engine: Send + Sync {
    /// Keeps a message: assigns the room's next offset, builds the bytes with
    /// [`Publish::build`], stores them (durably, with the disk engine), then calls `on_done`.
    ///
    /// `on_done` is called exactly once, in offset order per room (see the crate docs), on this
    /// thread or another, before or after `publish` returns.
    fn publish(&self, request: Publish, on_done: OnDone);

    /// The room's epoch and newest kept offset (0 for none yet).
    fn position(&self, room: &str) -> Result<Position>;

    /// Every kept message after `since.offset`, if `since.epoch` is the room's, no message after
    /// it has been trimmed, `since.offset` is not beyond the newest, and at most `max` were
    /// missed.
    fn since(&self, room: &str, since: &Position, max: usize) -> Result<Recovery>;

    /// Up to `limit` of the newest messages with an offset below `before` (all if `None`),
    /// oldest first, and whether older ones are kept.
    fn history(&self, room: &str, before: Option<u64>, limit: usize) -> Result<History>;
}

impl<E: Engine + ?Sized> Engine for Arc<E> {
    fn publish(&self, request: Publish, on_done: OnDone) {
        (**self).publish(request, on_done);
    }
    fn position(&self, room: &str) -> Result<Position> {
        (**self).position(room)
    }
    fn since(&self, room: &str, since: &Position, max: usize) -> Result<Recovery> {
        (**self).since(room, since, max)
    }
    fn history(&self, room: &str, before: Option<u64>, limit: usize) -> Result<History> {
        (**self).history(room, before, limit)
    }
}

impl<E: Engine + ?Sized> Engine for Box<E> {
    fn publish(&self, request: Publish, on_done: OnDone) {
        (**self).publish(request, on_done);
    }
    fn position(&self, room: &str) -> Result<Position> {
        (**self).position(room)
    }
    fn since(&self, room: &str, since: &Position, max: usize) -> Result<Recovery> {
        (**self).since(room, since, max)
    }
    fn history(&self, room: &str, before: Option<u64>, limit: usize) -> Result<History> {
        (**self).history(room, before, limit)
    }
}

/// Publishes and blocks the calling thread until the publish completes.
///
/// For tests, tools and examples; a server on an async runtime uses the callback instead.
pub fn publish_and_wait<E: Engine + ?Sized>(engine: &E, request: Publish) -> Result<Published> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    engine.publish(
        request,
        Box::new(move |result| {
            // The receiver waits below; it is gone only if this thread panicked.
            let _ = tx.send(result);
        }),
    );
    rx.recv().unwrap_or(Err(Error::Closed))
}
