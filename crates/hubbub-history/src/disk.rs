//! The disk engine: history in one redb file, written by one thread with group commit.
//!
//! Every publish goes into a queue. The writer thread takes everything waiting at that moment
//! (up to `max_batch`), applies it in one write transaction, commits it with one fsync, and only
//! then calls the callbacks, in queue order. One writer and one queue make offsets contiguous
//! and completions ordered without any lock on the publish path.
//!
//! The file has five tables (format version [`FORMAT_VERSION`]):
//! `store` (the epoch and the format version), `rooms` (each room's counters),
//! `messages` (`(room, offset)` → 8-byte big-endian timestamp, then the bytes),
//! `dedupe` (`(room, sender, id)` → offset, timestamp, time remembered) and
//! `dedupe_age` (`(room, time remembered, sender, id)`, to forget the oldest first).

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::backends::FileBackend;
use redb::{
    Builder, Database, DatabaseError, ReadOnlyTable, ReadableTable, StorageBackend, StorageError, Table,
    TableDefinition, TableHandle, WriteTransaction,
};

use crate::core::{self, Dedupe, DedupeAge, Reader, RoomMeta, StoreError, StoreResult, Tables};
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
}

impl DiskConfig {
    /// The defaults for a file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_batch: 1_024,
            cache_bytes: 32 << 20,
            reopen_interval: Duration::from_secs(1),
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
}

/// Counters of the writer, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Transactions committed (each one fsync).
    pub commits: u64,
    /// Publishes completed successfully (duplicates included).
    pub published: u64,
    /// Batches that failed to write.
    pub failed_batches: u64,
}

/// History in one redb file: durable before completion, one fsync per batch.
///
/// See the [crate docs](crate) for the guarantees. Reads run on the calling thread in their
/// own read transaction and never wait for the writer. Dropping the engine completes every
/// publish already queued, then closes the file.
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
    /// The open file; `None` while the writer reopens it after a failed write.
    handle: RwLock<Option<Arc<Handle>>>,
    commits: AtomicU64,
    published: AtomicU64,
    failed_batches: AtomicU64,
    /// The thread that runs the completion callbacks, once started.
    completer: std::sync::OnceLock<std::thread::ThreadId>,
}

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
    /// Opens (or creates) the store file and starts the writer thread.
    ///
    /// A new file gets a new epoch. A file that is locked, damaged, of another format or not a
    /// history store is an error naming it; nothing is ever overwritten.
    pub fn open(config: DiskConfig, options: Options) -> Result<Self, OpenError> {
        let handle = open_handle(&config, &options.faults)?;
        let shared = Arc::new(Shared {
            config,
            options,
            handle: RwLock::new(Some(Arc::new(handle))),
            commits: AtomicU64::new(0),
            published: AtomicU64::new(0),
            failed_batches: AtomicU64::new(0),
            completer: std::sync::OnceLock::new(),
        });
        let (queue, requests) = mpsc::channel();
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("hubbub-history-writer".into())
            .spawn(move || Writer::new(writer_shared).run_with_completer(&requests))
            .map_err(|err| OpenError { path: shared.config.path.clone(), failure: err.into() })?;
        Ok(Self { shared, queue: Some(queue), writer: Some(writer) })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.shared.config.path
    }

    /// The writer's counters so far.
    pub fn stats(&self) -> DiskStats {
        DiskStats {
            commits: self.shared.commits.load(Ordering::Relaxed),
            published: self.shared.published.load(Ordering::Relaxed),
            failed_batches: self.shared.failed_batches.load(Ordering::Relaxed),
        }
    }

    fn read<T>(&self, f: impl FnOnce(&ReadTables, &Epoch, u64) -> StoreResult<T>) -> Result<T> {
        let handle = self.shared.handle.read().unwrap_or_else(PoisonError::into_inner).clone();
        let Some(handle) = handle else {
            return Err(Error::Unavailable("the store is being reopened after a failed write".into()));
        };
        let now_ms = self.shared.options.clock.now_ms();
        let run = || -> StoreResult<T> {
            let txn = handle.db.begin_read()?;
            let tables = ReadTables { rooms: txn.open_table(ROOMS)?, messages: txn.open_table(MESSAGES)? };
            f(&tables, &handle.epoch, now_ms)
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

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    /// When every room is next swept, by the engine's clock.
    next_sweep_ms: u64,
}

impl Writer {
    fn new(shared: Arc<Shared>) -> Self {
        let next_sweep_ms = shared.options.clock.now_ms();
        Self { shared, next_sweep_ms }
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
            let wait = if self.handle().is_some() {
                self.shared.options.retention.sweep_interval
            } else {
                self.shared.config.reopen_interval
            };
            match requests.recv_timeout(wait) {
                Ok(first) => batch.push(first),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // Group commit: everything waiting now goes into this transaction.
            while batch.len() < self.shared.config.max_batch.max(1) {
                match requests.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            self.ensure_open();
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
        }
    }

    fn handle(&self) -> Option<Arc<Handle>> {
        self.shared.handle.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Commits a batch; returns its completions, in order.
    fn commit(&mut self, batch: &mut Vec<(Publish, OnDone)>) -> Completions {
        let now_ms = self.shared.options.clock.now_ms();
        let retention = self.shared.options.retention;
        let (requests, callbacks): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
        let outcome = match self.handle() {
            None => Err(StoreError("the store could not be reopened after a failed write".into())),
            Some(handle) => (|| {
                let txn = handle.db.begin_write()?;
                let results = {
                    let mut tables = WriteTables::open(&txn)?;
                    let mut results = Vec::with_capacity(requests.len());
                    for request in requests {
                        results.push(core::publish(&mut tables, &retention, &handle.epoch, now_ms, request)?);
                    }
                    results
                };
                txn.commit()?;
                Ok(results)
            })(),
        };
        match outcome {
            Ok(results) => {
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                let ok = results.iter().filter(|r| r.is_ok()).count();
                self.shared.published.fetch_add(ok as u64, Ordering::Relaxed);
                callbacks.into_iter().zip(results).collect()
            }
            Err(err) => {
                self.shared.failed_batches.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(cause = %err.0, count = callbacks.len(), "history write failed");
                let failed =
                    callbacks.into_iter().map(|on_done| (on_done, Err(Error::Unavailable(err.0.clone()))));
                let failed = failed.collect();
                // redb refuses every operation after an I/O error until the file is opened
                // again; that also drops whatever the failed transaction left in memory.
                self.reopen();
                failed
            }
        }
    }

    /// Closes the file and opens it again.
    fn reopen(&mut self) {
        let old = self.shared.handle.write().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(old) = old {
            // The file lock is released only when the last reader lets go of the database;
            // reads are short, so wait for them, for a bounded time.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(old);
        }
        self.ensure_open();
    }

    fn ensure_open(&mut self) {
        if self.handle().is_some() {
            return;
        }
        match open_handle(&self.shared.config, &self.shared.options.faults) {
            Ok(handle) => {
                tracing::info!(path = %self.shared.config.path.display(), "history store reopened");
                *self.shared.handle.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(handle));
            }
            Err(err) => tracing::warn!(cause = %err, "history store could not be reopened"),
        }
    }

    /// Removes expired messages and ids of every room, once per sweep interval.
    fn maybe_sweep(&mut self) {
        let now_ms = self.shared.options.clock.now_ms();
        if now_ms < self.next_sweep_ms {
            return;
        }
        let Some(handle) = self.handle() else { return };
        let interval =
            u64::try_from(self.shared.options.retention.sweep_interval.as_millis()).unwrap_or(u64::MAX);
        self.next_sweep_ms = now_ms.saturating_add(interval);
        let retention = self.shared.options.retention;
        let swept = (|| -> StoreResult<()> {
            let txn = handle.db.begin_write()?;
            {
                let mut tables = WriteTables::open(&txn)?;
                let mut rooms = Vec::new();
                for entry in tables.rooms.iter()? {
                    rooms.push(entry?.0.value().to_owned());
                }
                for room in rooms {
                    core::sweep_room(&mut tables, &retention, now_ms, &room)?;
                }
            }
            txn.commit()?;
            Ok(())
        })();
        if let Err(err) = swept {
            tracing::warn!(cause = %err.0, "history sweep failed");
            drop(handle);
            self.reopen();
        }
    }
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

impl Tables for WriteTables<'_> {
    fn meta(&mut self, room: &str) -> StoreResult<Option<RoomMeta>> {
        Ok(self.rooms.get(room)?.map(|v| meta_from(v.value())))
    }

    fn set_meta(&mut self, room: &str, meta: RoomMeta) -> StoreResult<()> {
        self.rooms.insert(room, (meta.newest, meta.first, meta.dedupe_len))?;
        Ok(())
    }

    fn append(&mut self, room: &str, offset: u64, timestamp_ms: u64, bytes: &Bytes) -> StoreResult<()> {
        let value = &mut self.value;
        value.clear();
        value.extend_from_slice(&timestamp_ms.to_be_bytes());
        value.extend_from_slice(bytes);
        self.messages.insert((room, offset), value.as_slice())?;
        Ok(())
    }

    fn message_time(&mut self, room: &str, offset: u64) -> StoreResult<Option<u64>> {
        match self.messages.get((room, offset))? {
            Some(value) => Ok(Some(decode_time(value.value())?.0)),
            None => Ok(None),
        }
    }

    fn remove_message(&mut self, room: &str, offset: u64) -> StoreResult<()> {
        self.messages.remove((room, offset))?;
        Ok(())
    }

    fn dedupe_find(&mut self, room: &str, sender: &str, id: u128) -> StoreResult<Option<Dedupe>> {
        Ok(self.dedupe.get((room, sender, id))?.map(|v| {
            let (offset, timestamp_ms, recorded_ms) = v.value();
            Dedupe { offset, timestamp_ms, recorded_ms }
        }))
    }

    fn dedupe_insert(&mut self, room: &str, sender: &str, id: u128, entry: Dedupe) -> StoreResult<()> {
        self.dedupe.insert((room, sender, id), (entry.offset, entry.timestamp_ms, entry.recorded_ms))?;
        self.dedupe_age.insert((room, entry.recorded_ms, sender, id), ())?;
        Ok(())
    }

    fn dedupe_oldest(&mut self, room: &str) -> StoreResult<Option<DedupeAge>> {
        let mut range = self.dedupe_age.range((room, 0, "", 0)..)?;
        let Some(entry) = range.next() else { return Ok(None) };
        let (key, _) = entry?;
        let (found_room, recorded_ms, sender, id) = key.value();
        if found_room != room {
            return Ok(None);
        }
        Ok(Some(DedupeAge { recorded_ms, sender: sender.to_owned(), id }))
    }

    fn dedupe_remove(&mut self, room: &str, age: &DedupeAge) -> StoreResult<()> {
        self.dedupe_age.remove((room, age.recorded_ms, age.sender.as_str(), age.id))?;
        self.dedupe.remove((room, age.sender.as_str(), age.id))?;
        Ok(())
    }
}

/// The tables of one read transaction.
struct ReadTables {
    rooms: ReadOnlyTable<&'static str, (u64, u64, u64)>,
    messages: ReadOnlyTable<(&'static str, u64), &'static [u8]>,
}

impl Reader for ReadTables {
    fn meta(&self, room: &str) -> StoreResult<Option<RoomMeta>> {
        Ok(self.rooms.get(room)?.map(|v| meta_from(v.value())))
    }

    fn messages(
        &self,
        room: &str,
        low: u64,
        high: u64,
        newest_first: bool,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        let range = self.messages.range((room, low)..=(room, high))?;
        let decode = |entry: Result<_, StorageError>| -> StoreResult<StoredMessage> {
            let (key, value): (redb::AccessGuard<'_, (&str, u64)>, redb::AccessGuard<'_, &[u8]>) = entry?;
            decode_message(key.value().1, value.value())
        };
        if newest_first {
            range.rev().take(limit).map(decode).collect()
        } else {
            range.take(limit).map(decode).collect()
        }
    }
}

/// The file, with writes that fail while a [`FaultInjector`] says so.
#[derive(Debug)]
struct FaultyBackend {
    inner: FileBackend,
    faults: FaultInjector,
}

impl FaultyBackend {
    fn check(&self) -> io::Result<()> {
        if self.faults.failing() {
            Err(io::Error::new(io::ErrorKind::StorageFull, "injected write failure"))
        } else {
            Ok(())
        }
    }
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.inner.read(offset, len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check()?;
        self.inner.set_len(len)
    }

    fn sync_data(&self, eventual: bool) -> io::Result<()> {
        self.check()?;
        self.inner.sync_data(eventual)
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check()?;
        self.inner.write(offset, data)
    }
}
