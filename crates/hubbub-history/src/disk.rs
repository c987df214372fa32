//! The disk engine: history in one redb file and its journal, written by one thread with
//! group commit.
//!
//! Every publish goes into a queue. The writer thread takes everything waiting at that moment
//! (up to `max_batch`), applies it over what is kept, appends the batch's changes to the
//! journal with one flush, and only then calls the callbacks, in queue order. One writer and
//! one queue make offsets contiguous and completions ordered without any lock on the publish
//! path. The journal's changes stay in memory (an overlay that every read consults before the
//! file) until the checkpoint thread writes them into redb, in one commit per second or so;
//! see the [`journal`](crate::journal) module. At open, changes the journal holds beyond the
//! last checkpoint are written into redb first.
//!
//! The file has five tables (format version [`FORMAT_VERSION`]):
//! `store` (the epoch, the format version and the last checkpointed journal generation),
//! `rooms` (each room's counters),
//! `messages` (`(room, offset)` → 8-byte big-endian timestamp, then the bytes),
//! `dedupe` (`(room, sender, id)` → offset, timestamp, time remembered) and
//! `dedupe_age` (`(room, time remembered, sender, id)`, to forget the oldest first).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::backends::FileBackend;
use redb::{
    Builder, Database, DatabaseError, ReadOnlyTable, ReadTransaction, ReadableTable, StorageBackend,
    StorageError, Table, TableDefinition, TableHandle, WriteTransaction,
};

use crate::core::{self, Dedupe, DedupeAge, Reader, RoomMeta, StoreError, StoreResult, Tables};
use crate::journal::{self, Change, Journal, Kept, Layers, Overlay};
use crate::{
    BatchScope, Engine, Epoch, Error, FaultInjector, History, OnDone, Options, Position, Publish, Published,
    Recovery, Result, StoredMessage,
};

/// The version of this crate's layout of tables; a file with another is refused at open.
pub(crate) const FORMAT_VERSION: u64 = 1;

const STORE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("store");
const ROOMS: TableDefinition<'_, &str, (u64, u64, u64)> = TableDefinition::new("rooms");
const MESSAGES: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("messages");
const DEDUPE: TableDefinition<'_, (&str, &str, u128), (u64, u64, u64)> = TableDefinition::new("dedupe");
const DEDUPE_AGE: TableDefinition<'_, (&str, u64, &str, u128), ()> = TableDefinition::new("dedupe_age");

const EPOCH_KEY: &str = "epoch";
const FORMAT_KEY: &str = "format";
/// The newest journal generation whose changes are all in the file (8 bytes big-endian).
const JOURNAL_KEY: &str = "journal";

/// Where the disk engine keeps its file and how it batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The store file; created with its directory if missing.
    pub path: PathBuf,
    /// Most publishes committed in one transaction. Default 1,024.
    pub max_batch: usize,
    /// Memory for redb's page cache, in bytes. Default 32 MiB.
    pub cache_bytes: usize,
    /// How long the writer waits before opening the file again after a failed write, while no
    /// publish asks it to. Default 1 s.
    pub reopen_interval: Duration,
    /// Longest time a change stays only in the journal (and in memory) before a checkpoint
    /// starts writing it into the redb file. Default 1 s.
    pub checkpoint_interval: Duration,
    /// Journal bytes after which a checkpoint starts, however recent the oldest change. Bounds
    /// the memory the journal's changes take. Default 8 MiB.
    pub checkpoint_bytes: u64,
    /// The checkpoint thread's nice value (Linux, where nice is per thread; ignored elsewhere):
    /// a checkpoint is background work, and on a busy machine the threads that deliver
    /// messages should run first. Default 10; 0 keeps the process's priority.
    pub checkpoint_nice: i32,
}

impl DiskConfig {
    /// The defaults for a file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_batch: 1_024,
            cache_bytes: 32 << 20,
            reopen_interval: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(1),
            checkpoint_bytes: 8 << 20,
            checkpoint_nice: 10,
        }
    }
}

/// A store file that cannot be used; names the file.
#[derive(Debug, thiserror::Error)]
#[error("cannot open history store {}: {failure}", path.display())]
pub struct OpenError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub failure: OpenFailure,
}

/// Why a store file cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenFailure {
    /// Another process (or another engine in this one) has the file open.
    #[error("it is locked by another process (is another server running with the same data directory?)")]
    Locked,
    /// The file is not a readable redb database, or its contents are damaged.
    #[error("it is damaged or not a history store: {0}")]
    Corrupt(String),
    /// The file is a redb database but holds something other than Hubbub history.
    #[error("it is a database but not a Hubbub history store")]
    NotAHistoryStore,
    /// The file was written in a format this version does not read.
    #[error("its format version is {found}, this version reads {supported}")]
    Version {
        /// The file's format.
        found: String,
        /// The format this version reads.
        supported: String,
    },
    /// The file or its directory could not be opened or created.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The journal beside the file could not be read or written into the file.
    #[error("its journal could not be recovered: {0}")]
    Journal(String),
}

/// Counters of the writer, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Batches written to the journal (each one flush).
    pub commits: u64,
    /// Publishes completed successfully (duplicates included).
    pub published: u64,
    /// Batches that failed to write.
    pub failed_batches: u64,
    /// Checkpoints written into the redb file (each one commit).
    pub checkpoints: u64,
    /// Checkpoints that failed (and were tried again).
    pub failed_checkpoints: u64,
}

/// History in one redb file and its journal: durable before completion, one flush per batch.
///
/// See the [crate docs](crate) for the guarantees. Reads run on the calling thread in their
/// own read transaction and never wait for the writer's flush. Dropping the engine completes
/// every publish already queued, writes the journal's changes into the file, then closes it.
pub struct DiskEngine {
    /// State shared with the writer thread.
    shared: Arc<Shared>,
    /// The writer's queue; `None` once dropping.
    queue: Option<Sender<(Publish, OnDone)>>,
    /// The writer thread, joined on drop.
    writer: Option<JoinHandle<()>>,
}

struct Shared {
    config: DiskConfig,
    options: Options,
    /// The open file; `None` while it is reopened after a failed write.
    handle: RwLock<Option<Arc<Handle>>>,
    /// Serialises reopening between the writer and the checkpointer.
    reopening: Mutex<()>,
    /// The journal's changes not yet in the file.
    pending: RwLock<Pending>,
    commits: AtomicU64,
    published: AtomicU64,
    failed_batches: AtomicU64,
    checkpoints: AtomicU64,
    failed_checkpoints: AtomicU64,
    /// Set when the engine is dropped: a failing checkpoint stops trying (the journal keeps its
    /// changes for the next open).
    closing: AtomicBool,
    /// The thread that runs the completion callbacks, once started.
    completer: std::sync::OnceLock<std::thread::ThreadId>,
}

/// Changes in the journal and not yet in the file, newest first when read.
#[derive(Default)]
struct Pending {
    /// Changes of the segment being appended to.
    active: Overlay,
    /// Changes of the previous segment while the checkpointer writes them into the file.
    frozen: Option<Arc<Overlay>>,
}

impl Pending {
    fn layers(&self) -> Layers<'_> {
        Layers([Some(&self.active), self.frozen.as_deref(), None])
    }
}

/// A segment's changes for the checkpointer, and the segment's generation.
type Checkpoint = (Arc<Overlay>, u64);

/// A committed (or failed) batch's completions, in commit order.
type Completions = Vec<(OnDone, Result<Published>)>;

/// An open database and its epoch.
struct Handle {
    db: Database,
    epoch: Epoch,
}

impl std::fmt::Debug for DiskEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskEngine").field("path", &self.shared.config.path).finish_non_exhaustive()
    }
}

impl DiskEngine {
    /// Opens (or creates) the store file, writes into it what its journal holds beyond the last
    /// checkpoint, and starts the writer and checkpoint threads.
    ///
    /// A new file gets a new epoch. A file that is locked, damaged, of another format or not a
    /// history store is an error naming it; nothing is ever overwritten.
    pub fn open(config: DiskConfig, options: Options) -> Result<Self, OpenError> {
        let fail = |failure| OpenError { path: config.path.clone(), failure };
        let handle = open_handle(&config, &options.faults)?;
        let generation = recover(&config.path, &handle).map_err(fail)?;
        let journal = Journal::start(&config.path, &handle.epoch, generation, options.faults.clone())
            .map_err(|err| fail(OpenFailure::Journal(err.to_string())))?;
        let shared = Arc::new(Shared {
            config,
            options,
            handle: RwLock::new(Some(Arc::new(handle))),
            reopening: Mutex::new(()),
            pending: RwLock::new(Pending::default()),
            commits: AtomicU64::new(0),
            published: AtomicU64::new(0),
            failed_batches: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            failed_checkpoints: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            completer: std::sync::OnceLock::new(),
        });
        let spawn_failed =
            |err: io::Error| OpenError { path: shared.config.path.clone(), failure: err.into() };
        let (checkpoints, jobs) = mpsc::channel::<Checkpoint>();
        let checkpoint_shared = shared.clone();
        let checkpointer = std::thread::Builder::new()
            .name("hubbub-history-checkpoint".into())
            .spawn(move || run_checkpointer(&checkpoint_shared, &jobs))
            .map_err(spawn_failed)?;
        let (queue, requests) = mpsc::channel();
        let writer_shared = shared.clone();
        let writer = Writer::new(writer_shared, journal, checkpoints, checkpointer);
        let writer = std::thread::Builder::new()
            .name("hubbub-history-writer".into())
            .spawn(move || writer.run_with_completer(&requests))
            .map_err(spawn_failed)?;
        Ok(Self { shared, queue: Some(queue), writer: Some(writer) })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.shared.config.path
    }

    /// The writer's counters so far.
    pub fn stats(&self) -> DiskStats {
        let count = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        DiskStats {
            commits: count(&self.shared.commits),
            published: count(&self.shared.published),
            failed_batches: count(&self.shared.failed_batches),
            checkpoints: count(&self.shared.checkpoints),
            failed_checkpoints: count(&self.shared.failed_checkpoints),
        }
    }

    fn read<T>(&self, f: impl FnOnce(&View<'_>, &Epoch, u64) -> StoreResult<T>) -> Result<T> {
        let Some(handle) = self.shared.handle() else {
            return Err(Error::Unavailable("the store is being reopened after a failed write".into()));
        };
        let now_ms = self.shared.options.clock.now_ms();
        let run = || -> StoreResult<T> {
            // The journal's changes first, then the file: a checkpoint that lands in between
            // is then read twice (the same state), never missed.
            let pending = self.shared.pending.read().unwrap_or_else(PoisonError::into_inner);
            let txn = handle.db.begin_read()?;
            let file = FileTables::open(&txn, false)?;
            f(&View { layers: pending.layers(), file: &file }, &handle.epoch, now_ms)
        };
        run().map_err(|err| Error::Read(err.0))
    }
}

impl Drop for DiskEngine {
    fn drop(&mut self) {
        self.queue = None;
        if let Some(writer) = self.writer.take() {
            // A callback that held the last reference drops the engine on the completer
            // thread (or the writer's): the writer exits once the queue is gone, and waits
            // for the completer, so neither may wait for it here.
            let current = std::thread::current().id();
            let on_own_thread =
                writer.thread().id() == current || self.shared.completer.get() == Some(&current);
            if !on_own_thread && writer.join().is_err() {
                tracing::error!("the history writer thread panicked");
            }
        }
    }
}

impl Engine for DiskEngine {
    fn publish(&self, request: Publish, on_done: OnDone) {
        let Some(queue) = &self.queue else { return on_done(Err(Error::Closed)) };
        if let Err(mpsc::SendError((_, on_done))) = queue.send((request, on_done)) {
            on_done(Err(Error::Closed));
        }
    }

    fn position(&self, room: &str) -> Result<Position> {
        self.read(|tables, epoch, _| core::position(tables, epoch, room))
    }

    fn since(&self, room: &str, since: &Position, max: usize) -> Result<Recovery> {
        let retention = self.shared.options.retention;
        self.read(|tables, epoch, now| core::since(tables, &retention, epoch, now, room, since, max))
    }

    fn history(&self, room: &str, before: Option<u64>, limit: usize) -> Result<History> {
        let retention = self.shared.options.retention;
        self.read(|tables, epoch, now| core::history(tables, &retention, epoch, now, room, before, limit))
    }
}

impl Shared {
    fn handle(&self) -> Option<Arc<Handle>> {
        self.handle.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Whether a checkpoint is still writing (or retrying) the previous segment's changes.
    fn checkpoint_in_flight(&self) -> bool {
        self.pending.read().unwrap_or_else(PoisonError::into_inner).frozen.is_some()
    }

    /// Closes the file and opens it again: redb refuses every operation after an I/O error
    /// until then, and that also drops whatever a failed transaction left in memory.
    fn reopen(&self) {
        let _reopening = self.reopening.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.handle.write().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(old) = old {
            // The file lock is released only when the last reader lets go of the database;
            // reads are short, so wait for them, for a bounded time.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(old);
        }
        self.open_if_closed();
    }

    fn ensure_open(&self) {
        if self.handle().is_some() {
            return;
        }
        let _reopening = self.reopening.lock().unwrap_or_else(PoisonError::into_inner);
        self.open_if_closed();
    }

    fn open_if_closed(&self) {
        if self.handle().is_some() {
            return;
        }
        match open_handle(&self.config, &self.options.faults) {
            Ok(handle) => {
                tracing::info!(path = %self.config.path.display(), "history store reopened");
                *self.handle.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(handle));
            }
            Err(err) => tracing::warn!(cause = %err, "history store could not be reopened"),
        }
    }
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    /// The segment being appended to.
    journal: Journal,
    /// When the oldest change not yet handed to a checkpoint was made.
    oldest_change: Option<Instant>,
    /// Timestamps of messages read from the file: each publish checks its room's oldest
    /// message against the ttl, and a kept message's timestamp never changes.
    times: TimeCache,
    /// The checkpointer's queue.
    checkpoints: Sender<Checkpoint>,
    /// The checkpoint thread, joined when the writer ends.
    checkpointer: JoinHandle<()>,
    /// When every room is next swept, by the engine's clock.
    next_sweep_ms: u64,
}

impl Writer {
    fn new(
        shared: Arc<Shared>,
        journal: Journal,
        checkpoints: Sender<Checkpoint>,
        checkpointer: JoinHandle<()>,
    ) -> Self {
        let next_sweep_ms = shared.options.clock.now_ms();
        Self {
            shared,
            journal,
            oldest_change: None,
            times: TimeCache::default(),
            checkpoints,
            checkpointer,
            next_sweep_ms,
        }
    }

    /// Runs the writer with a second thread for the completions: while the
    /// callbacks of one batch run (a server delivers each message to every
    /// member of its room there), the next batch is already being written.
    /// One thread runs them all, in commit order, so a room's callbacks keep
    /// their order and never run at the same time.
    fn run_with_completer(self, requests: &Receiver<(Publish, OnDone)>) {
        let (done, completions) = mpsc::channel::<Completions>();
        let shared = self.shared.clone();
        let completer =
            std::thread::Builder::new().name("hubbub-history-completer".into()).spawn(move || {
                let _ = shared.completer.set(std::thread::current().id());
                for batch in completions {
                    complete_batch(&shared.options.batch, batch);
                }
            });
        let completer = match completer {
            Ok(completer) => Some(completer),
            Err(err) => {
                // Without a second thread the writer completes batches itself.
                tracing::warn!(cause = %err, "no completer thread; the writer runs the callbacks");
                None
            }
        };
        let done = completer.as_ref().map(|_| done);
        self.run(requests, done.as_ref());
        drop(done);
        if let Some(completer) = completer
            && completer.join().is_err()
        {
            tracing::error!("the history completer thread panicked");
        }
    }

    fn run(mut self, requests: &Receiver<(Publish, OnDone)>, done: Option<&Sender<Completions>>) {
        let mut batch = Vec::new();
        loop {
            let mut wait = if self.shared.handle().is_some() {
                self.shared.options.retention.sweep_interval
            } else {
                self.shared.config.reopen_interval
            };
            if let Some(oldest) = self.oldest_change {
                let interval = self.shared.config.checkpoint_interval;
                let until_due = (oldest + interval).saturating_duration_since(Instant::now());
                // While the previous checkpoint runs (or retries after a failure) this one cannot
                // start: look again an interval later rather than spin on a deadline passed.
                let in_flight = self.shared.checkpoint_in_flight();
                wait = wait.min(if in_flight { interval.max(Duration::from_millis(10)) } else { until_due });
            }
            match requests.recv_timeout(wait) {
                Ok(first) => batch.push(first),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // Group commit: everything waiting now goes into this batch.
            while batch.len() < self.shared.config.max_batch.max(1) {
                match requests.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            self.shared.ensure_open();
            self.maybe_sweep();
            if !batch.is_empty() {
                let completions = self.commit(&mut batch);
                match done {
                    Some(done) => {
                        if let Err(mpsc::SendError(completions)) = done.send(completions) {
                            complete_batch(&self.shared.options.batch, completions);
                        }
                    }
                    None => complete_batch(&self.shared.options.batch, completions),
                }
            }
            self.maybe_checkpoint();
        }
        self.finish();
    }

    /// Writes the journal's last changes into the file and waits for the checkpointer.
    fn finish(self) {
        let Self { shared, journal, oldest_change, checkpoints, checkpointer, .. } = self;
        if oldest_change.is_some() {
            // Nothing reads the engine any more: the active changes can leave the overlay.
            let active =
                std::mem::take(&mut shared.pending.write().unwrap_or_else(PoisonError::into_inner).active);
            let _ = checkpoints.send((Arc::new(active), journal.generation()));
        }
        shared.closing.store(true, Ordering::SeqCst);
        drop(checkpoints);
        if checkpointer.join().is_err() {
            tracing::error!("the history checkpoint thread panicked");
        }
    }

    /// Applies a batch; returns its completions, in order.
    fn commit(&mut self, batch: &mut Vec<(Publish, OnDone)>) -> Completions {
        let now_ms = self.shared.options.clock.now_ms();
        let retention = self.shared.options.retention;
        let (requests, callbacks): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
        let outcome = self.apply(|tables, epoch| {
            let mut results = Vec::with_capacity(requests.len());
            for request in requests {
                results.push(core::publish(tables, &retention, epoch, now_ms, request)?);
            }
            Ok(results)
        });
        match outcome {
            Ok(results) => {
                let ok = results.iter().filter(|r| r.is_ok()).count();
                self.shared.published.fetch_add(ok as u64, Ordering::Relaxed);
                callbacks.into_iter().zip(results).collect()
            }
            Err(err) => {
                self.shared.failed_batches.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(cause = %err.0, count = callbacks.len(), "history write failed");
                let failed =
                    callbacks.into_iter().map(|on_done| (on_done, Err(Error::Unavailable(err.0.clone()))));
                failed.collect()
            }
        }
    }

    /// Runs `f` over the store as it is, collecting what it changes; appends the changes to the
    /// journal with one flush, then makes them visible. Nothing is visible or kept on error.
    fn apply<T>(&mut self, f: impl FnOnce(&mut BatchTables<'_>, &Epoch) -> StoreResult<T>) -> StoreResult<T> {
        let handle = self
            .shared
            .handle()
            .ok_or_else(|| StoreError("the store could not be reopened after a failed write".into()))?;
        let (value, changes, payload) = {
            let pending = self.shared.pending.read().unwrap_or_else(PoisonError::into_inner);
            let txn = handle.db.begin_read()?;
            let file = FileTables::open(&txn, true)?;
            let mut tables = BatchTables {
                times: &mut self.times,
                below: pending.layers(),
                file: &file,
                batch: Overlay::default(),
                payload: Vec::new(),
            };
            let value = f(&mut tables, &handle.epoch)?;
            (value, tables.batch, tables.payload)
        };
        if !changes.is_empty() {
            self.journal.append(&payload)?;
            self.shared.commits.fetch_add(1, Ordering::Relaxed);
            self.oldest_change.get_or_insert_with(Instant::now);
            self.shared.pending.write().unwrap_or_else(PoisonError::into_inner).active.merge(changes);
        }
        Ok(value)
    }

    /// Hands the active segment's changes to the checkpointer and moves to the next segment,
    /// once they are old or large enough and the previous checkpoint is done.
    fn maybe_checkpoint(&mut self) {
        let Some(oldest) = self.oldest_change else { return };
        let config = &self.shared.config;
        let due =
            oldest.elapsed() >= config.checkpoint_interval || self.journal.used() >= config.checkpoint_bytes;
        if !due || self.shared.checkpoint_in_flight() {
            return;
        }
        let generation = self.journal.generation();
        // The next segment reuses the file of the one before this, already checkpointed.
        if let Err(err) = self.journal.rotate() {
            tracing::warn!(cause = %err, "history journal could not move to its next segment");
            return;
        }
        let frozen = {
            let mut pending = self.shared.pending.write().unwrap_or_else(PoisonError::into_inner);
            let frozen = Arc::new(std::mem::take(&mut pending.active));
            pending.frozen = Some(frozen.clone());
            frozen
        };
        self.oldest_change = None;
        // The checkpointer lives as long as the writer.
        let _ = self.checkpoints.send((frozen, generation));
    }

    /// Removes expired messages and ids of every room, once per sweep interval.
    fn maybe_sweep(&mut self) {
        let now_ms = self.shared.options.clock.now_ms();
        if now_ms < self.next_sweep_ms {
            return;
        }
        let interval =
            u64::try_from(self.shared.options.retention.sweep_interval.as_millis()).unwrap_or(u64::MAX);
        self.next_sweep_ms = now_ms.saturating_add(interval);
        let retention = self.shared.options.retention;
        let swept = self.apply(|tables, _| {
            for room in tables.rooms()? {
                core::sweep_room(tables, &retention, now_ms, &room)?;
            }
            Ok(())
        });
        if let Err(err) = swept {
            tracing::warn!(cause = %err.0, "history sweep failed");
        }
    }
}

/// The checkpoint thread: writes each segment's changes into the file in one commit, in order,
/// then lets readers forget them. A failed checkpoint is tried again (after reopening the file)
/// until it succeeds or the engine closes; a later one never runs before it.
fn run_checkpointer(shared: &Shared, jobs: &Receiver<Checkpoint>) {
    lower_priority(shared.config.checkpoint_nice);
    for (changes, generation) in jobs {
        loop {
            let written = match shared.handle() {
                Some(handle) => write_checkpoint(&handle.db, &changes, generation),
                None => Err(StoreError("the store is being reopened".into())),
            };
            match written {
                Ok(()) => {
                    shared.checkpoints.fetch_add(1, Ordering::Relaxed);
                    let mut pending = shared.pending.write().unwrap_or_else(PoisonError::into_inner);
                    if pending.frozen.as_ref().is_some_and(|frozen| Arc::ptr_eq(frozen, &changes)) {
                        pending.frozen = None;
                    }
                    break;
                }
                Err(err) => {
                    shared.failed_checkpoints.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(cause = %err.0, "history checkpoint failed; the journal keeps its changes");
                    shared.reopen();
                    if shared.closing.load(Ordering::SeqCst) {
                        // The journal holds this segment and the ones after it for the next
                        // open; a later checkpoint must not mark them written.
                        return;
                    }
                    std::thread::sleep(shared.config.reopen_interval);
                }
            }
        }
    }
}

/// Lowers the calling thread's priority by `nice` (Linux only).
fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    if nice != 0
        && let Err(err) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice)
    {
        tracing::debug!(cause = %err, nice, "the checkpoint thread keeps its priority");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// Writes a segment's changes into the file, with the segment's generation, in one commit.
fn write_checkpoint(db: &Database, changes: &Overlay, generation: u64) -> StoreResult<()> {
    let txn = db.begin_write()?;
    {
        let mut tables = WriteTables::open(&txn)?;
        for (room, room_changes) in &changes.rooms {
            let room: &str = room;
            if let Some(meta) = room_changes.meta {
                tables.rooms.insert(room, (meta.newest, meta.first, meta.dedupe_len))?;
            }
            for (offset, kept) in &room_changes.messages {
                match kept {
                    Some(kept) => {
                        let value = &mut tables.value;
                        value.clear();
                        value.extend_from_slice(&kept.timestamp_ms.to_be_bytes());
                        value.extend_from_slice(&kept.bytes);
                        tables.messages.insert((room, *offset), value.as_slice())?;
                    }
                    None => {
                        tables.messages.remove((room, *offset))?;
                    }
                }
            }
            for (id, senders) in &room_changes.dedupe {
                for (sender, entry) in senders {
                    let key = (room, &**sender, *id);
                    match entry {
                        Some(entry) => {
                            tables
                                .dedupe
                                .insert(key, (entry.offset, entry.timestamp_ms, entry.recorded_ms))?;
                        }
                        None => {
                            tables.dedupe.remove(key)?;
                        }
                    }
                }
            }
            for ((recorded_ms, sender, id), present) in &room_changes.ages {
                let key = (room, *recorded_ms, &**sender, *id);
                if *present {
                    tables.dedupe_age.insert(key, ())?;
                } else {
                    tables.dedupe_age.remove(key)?;
                }
            }
        }
        let mut store = txn.open_table(STORE)?;
        store.insert(JOURNAL_KEY, generation.to_be_bytes().as_slice())?;
    }
    txn.commit()?;
    Ok(())
}

/// Writes into the file whatever the journal holds beyond its last checkpoint; returns the
/// generation to start the journal at.
fn recover(path: &Path, handle: &Handle) -> Result<u64, OpenFailure> {
    let db = &handle.db;
    let failure = |err: &dyn std::fmt::Display| OpenFailure::Journal(err.to_string());
    let checkpointed = {
        let txn = db.begin_read().map_err(|e| failure(&e))?;
        let store = txn.open_table(STORE).map_err(|e| failure(&e))?;
        let value = store.get(JOURNAL_KEY).map_err(|e| failure(&e))?;
        value.and_then(|v| <[u8; 8]>::try_from(v.value()).ok()).map_or(0, u64::from_be_bytes)
    };
    let mut segments = Vec::new();
    for slot in 0..2 {
        segments.push(journal::read_segment(path, &handle.epoch, slot).map_err(|e| failure(&e))?);
    }
    let newest = segments.iter().map(|segment| segment.generation).max().unwrap_or(0).max(checkpointed);
    segments.retain(|segment| segment.generation > checkpointed && !segment.records.is_empty());
    segments.sort_by_key(|segment| segment.generation);
    // A segment starts only once the one before it holds a record, and is reused only once
    // that one is checkpointed: this file's journal goes on from its checkpoint without a gap.
    // One that does not (a file restored from a backup beside a later journal) is not this
    // file's, and replaying it would mix two states.
    for (segment, expected) in segments.iter().zip(checkpointed + 1..) {
        if segment.generation != expected {
            return Err(OpenFailure::Journal(format!(
                "{} holds generation {} but the file was checkpointed at generation {checkpointed}: \
                 it is not this file's journal; move the journal files aside to open the file without it",
                journal::segment_path(path, segment.generation % 2).display(),
                segment.generation,
            )));
        }
    }
    if let Some(last) = segments.last().map(|segment| segment.generation) {
        let mut changes = Overlay::default();
        for record in segments.iter().flat_map(|segment| &segment.records) {
            for change in Change::decode_all(record).map_err(|e| failure(&e.0))? {
                changes.apply(change);
            }
        }
        write_checkpoint(db, &changes, last).map_err(|e| failure(&e.0))?;
        tracing::info!(path = %path.display(), generation = last, "history journal recovered into the store");
    }
    Ok(newest + 1)
}

/// Runs one commit's completions, in order, inside the engine's [`BatchScope`].
fn complete_batch(scope: &BatchScope, completions: Completions) {
    let mut completions = Some(completions);
    scope.run(|| {
        completions.take().into_iter().flatten().for_each(|(on_done, result)| complete(on_done, result))
    });
}

fn complete(on_done: OnDone, result: Result<Published>) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| on_done(result))).is_err() {
        tracing::error!("a history completion callback panicked");
    }
}

/// Opens the file, checks it is a history store of this format, and creates its tables if new.
fn open_handle(config: &DiskConfig, faults: &FaultInjector) -> Result<Handle, OpenError> {
    let fail = |failure| OpenError { path: config.path.clone(), failure };
    if let Some(dir) = config.path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|err| fail(err.into()))?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&config.path)
        .map_err(|err| fail(err.into()))?;
    let backend = FileBackend::new(file).map_err(|err| fail(database_failure(err)))?;
    let db = Builder::new()
        .set_cache_size(config.cache_bytes)
        .create_with_file_format_v3(true)
        .create_with_backend(FaultyBackend { inner: backend, faults: faults.clone() })
        .map_err(|err| fail(database_failure(err)))?;
    let epoch = init_store(&db).map_err(fail)?;
    Ok(Handle { db, epoch })
}

fn database_failure(err: DatabaseError) -> OpenFailure {
    match err {
        DatabaseError::DatabaseAlreadyOpen => OpenFailure::Locked,
        DatabaseError::UpgradeRequired(version) => OpenFailure::Version {
            found: format!("redb file format {version}"),
            supported: "redb file formats 2 and 3".into(),
        },
        // redb reads a header that is not its own as invalid data, a short file as an early end.
        DatabaseError::Storage(StorageError::Io(err))
            if !matches!(err.kind(), io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof) =>
        {
            OpenFailure::Io(err)
        }
        other => OpenFailure::Corrupt(other.to_string()),
    }
}

/// Reads the epoch of a history store, or makes an empty file one.
fn init_store(db: &Database) -> Result<Epoch, OpenFailure> {
    let corrupt = |err: &dyn std::fmt::Display| OpenFailure::Corrupt(err.to_string());
    let read = db.begin_read().map_err(|e| corrupt(&e))?;
    let names: Vec<String> =
        read.list_tables().map_err(|e| corrupt(&e))?.map(|table| table.name().to_owned()).collect();
    if names.iter().any(|name| name == STORE.name()) {
        let store = read.open_table(STORE).map_err(|e| corrupt(&e))?;
        let format = store.get(FORMAT_KEY).map_err(|e| corrupt(&e))?.map(|v| v.value().to_vec());
        let format = format
            .as_deref()
            .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
            .map(u64::from_be_bytes)
            .ok_or(OpenFailure::NotAHistoryStore)?;
        if format != FORMAT_VERSION {
            return Err(OpenFailure::Version {
                found: format!("history format {format}"),
                supported: format!("history format {FORMAT_VERSION}"),
            });
        }
        let epoch = store.get(EPOCH_KEY).map_err(|e| corrupt(&e))?.ok_or(OpenFailure::NotAHistoryStore)?;
        let epoch = std::str::from_utf8(epoch.value()).map_err(|_| OpenFailure::NotAHistoryStore)?;
        return Ok(Epoch::new(epoch));
    }
    if !names.is_empty() {
        return Err(OpenFailure::NotAHistoryStore);
    }
    drop(read);
    let epoch = Epoch::random();
    let created = (|| -> StoreResult<()> {
        let txn = db.begin_write()?;
        {
            let mut store = txn.open_table(STORE)?;
            store.insert(FORMAT_KEY, FORMAT_VERSION.to_be_bytes().as_slice())?;
            store.insert(EPOCH_KEY, epoch.as_str().as_bytes())?;
        }
        WriteTables::open(&txn)?;
        txn.commit()?;
        Ok(())
    })();
    created.map_err(|err| OpenFailure::Io(io::Error::other(err.0)))?;
    Ok(epoch)
}

/// The tables of one write transaction.
struct WriteTables<'txn> {
    rooms: Table<'txn, &'static str, (u64, u64, u64)>,
    messages: Table<'txn, (&'static str, u64), &'static [u8]>,
    dedupe: Table<'txn, (&'static str, &'static str, u128), (u64, u64, u64)>,
    dedupe_age: Table<'txn, (&'static str, u64, &'static str, u128), ()>,
    /// A message's value while it is being inserted, reused across the batch.
    value: Vec<u8>,
}

impl<'txn> WriteTables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> StoreResult<Self> {
        Ok(Self {
            rooms: txn.open_table(ROOMS)?,
            messages: txn.open_table(MESSAGES)?,
            dedupe: txn.open_table(DEDUPE)?,
            dedupe_age: txn.open_table(DEDUPE_AGE)?,
            value: Vec::new(),
        })
    }
}

fn meta_from((newest, first, dedupe_len): (u64, u64, u64)) -> RoomMeta {
    RoomMeta { newest, first, dedupe_len }
}

/// A stored message value: the timestamp, 8 bytes big-endian, then the bytes.
fn decode_message(offset: u64, value: &[u8]) -> StoreResult<StoredMessage> {
    let (timestamp_ms, bytes) = decode_time(value)?;
    Ok(StoredMessage { offset, timestamp_ms, bytes: Bytes::copy_from_slice(bytes) })
}

/// A stored message value's timestamp, and the bytes after it, uncopied.
fn decode_time(value: &[u8]) -> StoreResult<(u64, &[u8])> {
    let too_short = || StoreError("message record too short".into());
    let (time, bytes) = value.split_first_chunk::<8>().ok_or_else(too_short)?;
    Ok((u64::from_be_bytes(*time), bytes))
}

/// The file's tables in one read transaction; the dedupe tables only for the writer.
struct FileTables {
    rooms: ReadOnlyTable<&'static str, (u64, u64, u64)>,
    messages: ReadOnlyTable<(&'static str, u64), &'static [u8]>,
    dedupe: Option<DedupeTables>,
}

struct DedupeTables {
    ids: ReadOnlyTable<(&'static str, &'static str, u128), (u64, u64, u64)>,
    ages: ReadOnlyTable<(&'static str, u64, &'static str, u128), ()>,
}

impl FileTables {
    fn open(txn: &ReadTransaction, with_dedupe: bool) -> StoreResult<Self> {
        let dedupe = if with_dedupe {
            Some(DedupeTables { ids: txn.open_table(DEDUPE)?, ages: txn.open_table(DEDUPE_AGE)? })
        } else {
            None
        };
        Ok(Self { rooms: txn.open_table(ROOMS)?, messages: txn.open_table(MESSAGES)?, dedupe })
    }

    fn dedupe(&self) -> StoreResult<&DedupeTables> {
        self.dedupe.as_ref().ok_or_else(|| StoreError("dedupe tables not opened for reading".into()))
    }

    /// A room's counters: the journal's, else the file's.
    fn meta_under(&self, layers: Layers<'_>, room: &str) -> StoreResult<Option<RoomMeta>> {
        match layers.meta(room) {
            Some(meta) => Ok(Some(meta)),
            None => Ok(self.rooms.get(room)?.map(|v| meta_from(v.value()))),
        }
    }
}

/// What a read sees: the journal's changes over the file.
struct View<'a> {
    layers: Layers<'a>,
    file: &'a FileTables,
}

impl Reader for View<'_> {
    fn meta(&self, room: &str) -> StoreResult<Option<RoomMeta>> {
        self.file.meta_under(self.layers, room)
    }

    fn messages(
        &self,
        room: &str,
        low: u64,
        high: u64,
        newest_first: bool,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        if low > high {
            return Ok(Vec::new());
        }
        let changed = self.layers.messages(room, low, high);
        let range = self.file.messages.range((room, low)..=(room, high))?;
        let decode = |entry: Result<_, StorageError>| -> StoreResult<StoredMessage> {
            let (key, value): (redb::AccessGuard<'_, (&str, u64)>, redb::AccessGuard<'_, &[u8]>) = entry?;
            decode_message(key.value().1, value.value())
        };
        if newest_first {
            merge(range.rev().map(decode), changed.into_iter().rev(), |a, b| a > b, limit)
        } else {
            merge(range.map(decode), changed.into_iter(), |a, b| a < b, limit)
        }
    }
}

/// Up to `limit` messages from the file's and the journal's, in the order `before` gives
/// offsets; where both have an offset, the journal's state wins (and a removal hides it).
fn merge<'k>(
    file: impl Iterator<Item = StoreResult<StoredMessage>>,
    changed: impl Iterator<Item = (u64, Option<&'k Kept>)>,
    before: impl Fn(u64, u64) -> bool,
    limit: usize,
) -> StoreResult<Vec<StoredMessage>> {
    let mut file = file.peekable();
    let mut changed = changed.peekable();
    let mut out = Vec::new();
    while out.len() < limit {
        let next_file = match file.peek() {
            Some(Ok(message)) => Some(message.offset),
            Some(Err(_)) => {
                return Err(file.next().and_then(Result::err).unwrap_or(StoreError("read".into())));
            }
            None => None,
        };
        let next_changed = changed.peek().map(|(offset, _)| *offset);
        let from_file = match (next_file, next_changed) {
            (None, None) => break,
            (Some(at), Some(changed_at)) => before(at, changed_at),
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        if from_file {
            if let Some(Ok(message)) = file.next() {
                out.push(message);
            }
            continue;
        }
        if next_file == next_changed {
            // The journal's state of this offset replaces the file's.
            file.next();
        }
        if let Some((offset, Some(kept))) = changed.next() {
            out.push(StoredMessage { offset, timestamp_ms: kept.timestamp_ms, bytes: kept.bytes.clone() });
        }
    }
    Ok(out)
}

/// Timestamps of the oldest messages of rooms, as read from the file, a run of offsets per room.
///
/// A room at its message limit trims its oldest message at every publish and then checks the
/// next one's age: reading the next [`TimeCache::RUN`] timestamps in one range scan turns that
/// many B-tree lookups into one.
#[derive(Default)]
struct TimeCache(HashMap<Arc<str>, TimeRun>);

/// The timestamps of consecutive offsets from `first` on (a room's kept messages have no gaps).
struct TimeRun {
    first: u64,
    times: Vec<u64>,
}

impl TimeCache {
    /// Rooms remembered at most; past that the cache starts again empty.
    const ROOMS: usize = 1 << 12;
    /// Timestamps read at once, from the offset asked for on.
    const RUN: usize = 16;

    fn get(&self, room: &str, offset: u64) -> Option<u64> {
        let run = self.0.get(room)?;
        run.times.get(usize::try_from(offset.checked_sub(run.first)?).ok()?).copied()
    }

    fn insert(&mut self, room: &str, run: TimeRun) {
        if let Some(entry) = self.0.get_mut(room) {
            *entry = run;
            return;
        }
        if self.0.len() >= Self::ROOMS {
            self.0.clear();
        }
        self.0.insert(Arc::from(room), run);
    }
}

/// One batch's storage for the writer: reads see the batch's own changes, then the journal's,
/// then the file; writes are collected, and encoded for the journal, as they are made.
struct BatchTables<'a> {
    times: &'a mut TimeCache,
    below: Layers<'a>,
    file: &'a FileTables,
    /// The batch's changes.
    batch: Overlay,
    /// The batch's changes, encoded for the journal.
    payload: Vec<u8>,
}

impl BatchTables<'_> {
    fn layers(&self) -> Layers<'_> {
        let [active, frozen, _] = self.below.0;
        Layers([Some(&self.batch), active, frozen])
    }

    /// The room's name, shared with an entry that has it already.
    fn room_key(&self, room: &str) -> Arc<str> {
        self.layers().room_key(room).unwrap_or_else(|| Arc::from(room))
    }

    fn record(&mut self, change: Change) {
        change.encode(&mut self.payload);
        self.batch.apply(change);
    }

    /// Every room with counters, in the file or the journal.
    fn rooms(&self) -> StoreResult<Vec<Arc<str>>> {
        let mut rooms = self.layers().rooms();
        for entry in self.file.rooms.iter()? {
            rooms.push(Arc::from(entry?.0.value()));
        }
        rooms.sort_unstable();
        rooms.dedup();
        Ok(rooms)
    }
}

impl Tables for BatchTables<'_> {
    fn meta(&mut self, room: &str) -> StoreResult<Option<RoomMeta>> {
        self.file.meta_under(self.layers(), room)
    }

    fn set_meta(&mut self, room: &str, meta: RoomMeta) -> StoreResult<()> {
        self.record(Change::Meta { room: self.room_key(room), meta });
        Ok(())
    }

    fn append(&mut self, room: &str, offset: u64, timestamp_ms: u64, bytes: &Bytes) -> StoreResult<()> {
        let kept = Kept { timestamp_ms, bytes: bytes.clone() };
        self.record(Change::Message { room: self.room_key(room), offset, kept: Some(kept) });
        Ok(())
    }

    fn message_time(&mut self, room: &str, offset: u64) -> StoreResult<Option<u64>> {
        if let Some(changed) = self.layers().message(room, offset) {
            return Ok(changed.map(|kept| kept.timestamp_ms));
        }
        if let Some(timestamp_ms) = self.times.get(room, offset) {
            return Ok(Some(timestamp_ms));
        }
        let mut times = Vec::with_capacity(TimeCache::RUN);
        for entry in self.file.messages.range((room, offset)..=(room, u64::MAX))?.take(TimeCache::RUN) {
            let (key, value) = entry?;
            if key.value().1 != offset + times.len() as u64 {
                break;
            }
            times.push(decode_time(value.value())?.0);
        }
        let found = times.first().copied();
        if found.is_some() {
            self.times.insert(room, TimeRun { first: offset, times });
        }
        Ok(found)
    }

    fn remove_message(&mut self, room: &str, offset: u64) -> StoreResult<()> {
        self.record(Change::Message { room: self.room_key(room), offset, kept: None });
        Ok(())
    }

    fn dedupe_find(&mut self, room: &str, sender: &str, id: u128) -> StoreResult<Option<Dedupe>> {
        if let Some(changed) = self.layers().dedupe(room, sender, id) {
            return Ok(changed);
        }
        Ok(self.file.dedupe()?.ids.get((room, sender, id))?.map(|v| {
            let (offset, timestamp_ms, recorded_ms) = v.value();
            Dedupe { offset, timestamp_ms, recorded_ms }
        }))
    }

    fn dedupe_insert(&mut self, room: &str, sender: &str, id: u128, entry: Dedupe) -> StoreResult<()> {
        let (room, sender) = (self.room_key(room), Arc::from(sender));
        self.record(Change::Dedupe { room, sender, id, recorded_ms: entry.recorded_ms, entry: Some(entry) });
        Ok(())
    }

    fn dedupe_oldest(&mut self, room: &str) -> StoreResult<Option<DedupeAge>> {
        let changed = self.layers().ages(room);
        let mut changed = changed.into_iter().peekable();
        let mut file = self.file.dedupe()?.ages.range((room, 0, "", 0)..)?;
        let mut next_file = || -> StoreResult<Option<(u64, String, u128)>> {
            let Some(entry) = file.next() else { return Ok(None) };
            let key = entry?.0;
            let (found_room, recorded_ms, sender, id) = key.value();
            Ok((found_room == room).then(|| (recorded_ms, sender.to_owned(), id)))
        };
        let mut file_head = next_file()?;
        loop {
            let changed_head = changed.peek().map(|(key, present)| (*key, *present));
            let from_file = match (&file_head, changed_head) {
                (None, None) => return Ok(None),
                (Some((recorded_ms, sender, id)), Some((key, _))) => {
                    (*recorded_ms, sender.as_str(), *id) < key
                }
                (Some(_), None) => true,
                (None, Some(_)) => false,
            };
            if from_file {
                return Ok(file_head.map(|(recorded_ms, sender, id)| DedupeAge { recorded_ms, sender, id }));
            }
            let Some(((recorded_ms, sender, id), present)) = changed.next() else { return Ok(None) };
            if file_head.as_ref().is_some_and(|(r, s, i)| (*r, s.as_str(), *i) == (recorded_ms, sender, id)) {
                // The journal's state of this id replaces the file's.
                file_head = next_file()?;
            }
            if present {
                return Ok(Some(DedupeAge { recorded_ms, sender: sender.to_owned(), id }));
            }
        }
    }

    fn dedupe_remove(&mut self, room: &str, age: &DedupeAge) -> StoreResult<()> {
        let (room, sender) = (self.room_key(room), Arc::from(age.sender.as_str()));
        self.record(Change::Dedupe { room, sender, id: age.id, recorded_ms: age.recorded_ms, entry: None });
        Ok(())
    }
}

/// The file, with writes that fail while a [`FaultInjector`] says so.
#[derive(Debug)]
struct FaultyBackend {
    inner: FileBackend,
    faults: FaultInjector,
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.inner.read(offset, len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.faults.check_write()?;
        self.inner.set_len(len)
    }

    fn sync_data(&self, eventual: bool) -> io::Result<()> {
        self.faults.check_write()?;
        self.inner.sync_data(eventual)
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.faults.check_write()?;
        self.inner.write(offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::message;

    #[test]
    fn a_journal_that_does_not_follow_the_files_checkpoint_is_refused() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("h.redb");
        let epoch = {
            // No checkpoint before the close: the journal stays at generation 1.
            let config =
                DiskConfig { checkpoint_interval: Duration::from_secs(3600), ..DiskConfig::new(&path) };
            let engine = DiskEngine::open(config, Options::default()).expect("opens");
            crate::publish_and_wait(&engine, message("a", "ada", "one")).expect("publishes").epoch
        };
        // The clean close checkpointed generation 1; a segment of generation 4 cannot follow it.
        let mut change = Vec::new();
        Change::Meta { room: "a".into(), meta: RoomMeta { newest: 9, first: 9, dedupe_len: 0 } }
            .encode(&mut change);
        let mut journal = Journal::start(&path, &epoch, 4, FaultInjector::default()).expect("starts");
        journal.append(&change).expect("appends");
        drop(journal);
        let err = DiskEngine::open(DiskConfig::new(&path), Options::default()).expect_err("refused");
        assert!(matches!(err.failure, OpenFailure::Journal(_)), "{err}");
        assert!(err.to_string().contains("journal-0"), "{err}");

        // The same change as the generation after the checkpoint is replayed.
        let mut journal = Journal::start(&path, &epoch, 2, FaultInjector::default()).expect("starts");
        journal.append(&change).expect("appends");
        drop(journal);
        let engine = DiskEngine::open(DiskConfig::new(&path), Options::default()).expect("opens");
        assert_eq!(engine.position("a").expect("position").offset, 9);
    }
}
