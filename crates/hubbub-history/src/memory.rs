//! The memory engine: history in RAM, a room per lock, completions delivered in offset order.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use bytes::Bytes;

use crate::core::{self, Dedupe, DedupeAge, Reader, RoomMeta, StoreResult, Tables};
use crate::{
    BatchScope, Engine, Epoch, Error, History, OnDone, Options, Position, Publish, Published, Recovery,
    Result, StoredMessage,
};

/// History kept in RAM, lost at exit: every start is a new [`Epoch`].
///
/// Each room has its own lock, held while a message is stored (the build closure runs under
/// it). Completions are queued under the same lock in offset order and delivered by whichever
/// publisher finds no delivery in progress, so `on_done` callbacks of one room never run
/// concurrently and always run in offset order, and a callback may publish again.
pub struct MemoryEngine {
    /// The epoch of every room: history lives as long as this value.
    epoch: Epoch,
    /// Retention, clock and fault switch.
    options: Options,
    /// Rooms by name; a room is added at its first publish and never removed (its counters
    /// keep its offsets going after every message has expired).
    rooms: RwLock<HashMap<Arc<str>, Arc<MemRoom>>>,
    /// When the next sweep of every room is due, by the engine's clock.
    next_sweep_ms: AtomicU64,
}

impl std::fmt::Debug for MemoryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryEngine").field("epoch", &self.epoch).finish_non_exhaustive()
    }
}

/// One room.
#[derive(Default)]
struct MemRoom {
    /// The stored stream and the completions waiting to be delivered.
    state: Mutex<RoomState>,
    /// Set while a thread delivers this room's completions.
    delivering: AtomicBool,
}

#[derive(Default)]
struct RoomState {
    /// Counters; `None` until the first publish.
    meta: Option<RoomMeta>,
    /// Kept messages, oldest first: `messages[i]` has offset `meta.first + i`.
    messages: VecDeque<StoredMessage>,
    /// Remembered ids by (sender, id).
    dedupe: HashMap<(Arc<str>, u128), Dedupe>,
    /// The same ids by age, oldest first.
    dedupe_age: BTreeSet<(u64, Arc<str>, u128)>,
    /// Completions in offset order, waiting for their callback.
    pending: VecDeque<(OnDone, Result<Published>)>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves consistent data: every mutation is
    // finished before user code (the build closure, callbacks) can run or is caught.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemoryEngine {
    /// An empty engine with a new epoch.
    pub fn new(options: Options) -> Self {
        let next_sweep_ms = options.clock.now_ms();
        Self {
            epoch: Epoch::random(),
            options,
            rooms: RwLock::new(HashMap::new()),
            next_sweep_ms: AtomicU64::new(next_sweep_ms),
        }
    }

    fn room(&self, name: &str) -> Option<Arc<MemRoom>> {
        self.rooms.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
    }

    fn room_or_insert(&self, name: &Arc<str>) -> Arc<MemRoom> {
        if let Some(room) = self.room(name) {
            return room;
        }
        let mut rooms = self.rooms.write().unwrap_or_else(PoisonError::into_inner);
        rooms.entry(name.clone()).or_default().clone()
    }

    /// Trims every room by age, at most once per sweep interval.
    fn maybe_sweep(&self, now_ms: u64) {
        let due = self.next_sweep_ms.load(Ordering::Relaxed);
        let interval = u64::try_from(self.options.retention.sweep_interval.as_millis()).unwrap_or(u64::MAX);
        if now_ms < due
            || self
                .next_sweep_ms
                .compare_exchange(due, now_ms.saturating_add(interval), Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let rooms: Vec<_> = {
            let rooms = self.rooms.read().unwrap_or_else(PoisonError::into_inner);
            rooms.iter().map(|(name, room)| (name.clone(), room.clone())).collect()
        };
        for (name, room) in rooms {
            let mut state = lock(&room.state);
            // Memory tables cannot fail.
            let _ = core::sweep_room(&mut *state, &self.options.retention, now_ms, &name);
        }
    }

    fn read<T>(&self, room: &str, f: impl FnOnce(&RoomState) -> StoreResult<T>) -> Result<T> {
        let result = match self.room(room) {
            Some(room) => f(&lock(&room.state)),
            None => f(&RoomState::default()),
        };
        result.map_err(|err| Error::Read(err.0))
    }
}

impl MemRoom {
    /// Delivers queued completions unless another thread is; see [`MemoryEngine`].
    fn deliver(&self, scope: &BatchScope) {
        loop {
            if self.delivering.swap(true, Ordering::SeqCst) {
                // The thread delivering will see what this one queued: it checks the queue
                // again after it stops.
                return;
            }
            // What is queued now is one batch.
            scope.run(|| {
                loop {
                    let next = lock(&self.state).pending.pop_front();
                    let Some((on_done, result)) = next else { break };
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| on_done(result))).is_err() {
                        tracing::error!("a history completion callback panicked");
                    }
                }
            });
            self.delivering.store(false, Ordering::SeqCst);
            if lock(&self.state).pending.is_empty() {
                return;
            }
        }
    }
}

impl Engine for MemoryEngine {
    fn publish(&self, request: Publish, on_done: OnDone) {
        let now_ms = self.options.clock.now_ms();
        self.maybe_sweep(now_ms);
        let room = self.room_or_insert(&request.room);
        {
            let mut state = lock(&room.state);
            let result = if self.options.faults.failing() {
                Err(Error::Unavailable("injected write failure".into()))
            } else {
                match core::publish(&mut *state, &self.options.retention, &self.epoch, now_ms, request) {
                    Ok(result) => result,
                    Err(err) => Err(Error::Unavailable(err.0)),
                }
            };
            state.pending.push_back((on_done, result));
        }
        room.deliver(&self.options.batch);
    }

    fn position(&self, room: &str) -> Result<Position> {
        self.read(room, |state| core::position(state, &self.epoch, room))
    }

    fn since(&self, room: &str, since: &Position, max: usize) -> Result<Recovery> {
        let now_ms = self.options.clock.now_ms();
        self.read(room, |state| {
            core::since(state, &self.options.retention, &self.epoch, now_ms, room, since, max)
        })
    }

    fn history(&self, room: &str, before: Option<u64>, limit: usize) -> Result<History> {
        let now_ms = self.options.clock.now_ms();
        self.read(room, |state| {
            core::history(state, &self.options.retention, &self.epoch, now_ms, room, before, limit)
        })
    }
}

impl RoomState {
    /// Where a kept offset is in `messages`: offsets there are contiguous from the front's.
    fn index(&self, offset: u64) -> Option<usize> {
        let first = self.messages.front()?.offset;
        offset.checked_sub(first).and_then(|i| usize::try_from(i).ok())
    }
}

// The room is already chosen by the lock taken; the `room` arguments are the same room.
impl Tables for RoomState {
    fn meta(&mut self, _room: &str) -> StoreResult<Option<RoomMeta>> {
        Ok(self.meta)
    }

    fn set_meta(&mut self, _room: &str, meta: RoomMeta) -> StoreResult<()> {
        self.meta = Some(meta);
        Ok(())
    }

    fn append(&mut self, _room: &str, offset: u64, timestamp_ms: u64, bytes: &Bytes) -> StoreResult<()> {
        self.messages.push_back(StoredMessage { offset, timestamp_ms, bytes: bytes.clone() });
        Ok(())
    }

    fn message_time(&mut self, _room: &str, offset: u64) -> StoreResult<Option<u64>> {
        let found = self.index(offset).and_then(|i| self.messages.get(i));
        Ok(found.map(|m| m.timestamp_ms))
    }

    fn remove_message(&mut self, _room: &str, offset: u64) -> StoreResult<()> {
        // Messages are only ever removed from the oldest end.
        if self.messages.front().is_some_and(|m| m.offset == offset) {
            self.messages.pop_front();
        }
        Ok(())
    }

    fn dedupe_find(&mut self, _room: &str, sender: &str, id: u128) -> StoreResult<Option<Dedupe>> {
        Ok(self.dedupe.get(&(Arc::from(sender), id)).copied())
    }

    fn dedupe_insert(&mut self, _room: &str, sender: &str, id: u128, entry: Dedupe) -> StoreResult<()> {
        let sender: Arc<str> = Arc::from(sender);
        self.dedupe_age.insert((entry.recorded_ms, sender.clone(), id));
        self.dedupe.insert((sender, id), entry);
        Ok(())
    }

    fn dedupe_oldest(&mut self, _room: &str) -> StoreResult<Option<DedupeAge>> {
        Ok(self.dedupe_age.first().map(|(recorded_ms, sender, id)| DedupeAge {
            recorded_ms: *recorded_ms,
            sender: sender.to_string(),
            id: *id,
        }))
    }

    fn dedupe_remove(&mut self, _room: &str, age: &DedupeAge) -> StoreResult<()> {
        let sender: Arc<str> = Arc::from(age.sender.as_str());
        self.dedupe_age.remove(&(age.recorded_ms, sender.clone(), age.id));
        self.dedupe.remove(&(sender, age.id));
        Ok(())
    }
}

impl Reader for RoomState {
    fn meta(&self, _room: &str) -> StoreResult<Option<RoomMeta>> {
        Ok(self.meta)
    }

    fn messages(
        &self,
        _room: &str,
        low: u64,
        high: u64,
        newest_first: bool,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        let Some(front) = self.messages.front().map(|m| m.offset) else { return Ok(Vec::new()) };
        let (Some(start), Some(end)) = (self.index(low.max(front)), self.index(high)) else {
            return Ok(Vec::new());
        };
        let end = end.min(self.messages.len().saturating_sub(1));
        if start > end {
            return Ok(Vec::new());
        }
        let range = self.messages.range(start..=end);
        Ok(if newest_first {
            range.rev().take(limit).cloned().collect()
        } else {
            range.take(limit).cloned().collect()
        })
    }
}
