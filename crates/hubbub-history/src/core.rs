//! The rules every engine applies, written once over two small storage traits: dedupe, offset
//! assignment, trimming by count and age, and what `since` and `history` may answer.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use bytes::Bytes;

use crate::{
    Assigned, Epoch, Error, History, Position, Publish, Published, Recovery, Retention, StoredMessage,
};

/// A storage failure that aborts a whole batch (the disk engine's transaction).
#[derive(Debug)]
pub(crate) struct StoreError(pub(crate) String);

impl<E: std::fmt::Display> From<E> for StoreError {
    fn from(err: E) -> Self {
        Self(err.to_string())
    }
}

pub(crate) type StoreResult<T> = Result<T, StoreError>;

/// A room's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RoomMeta {
    /// The newest offset assigned; 0 before the first message.
    pub(crate) newest: u64,
    /// The oldest offset still kept; `newest + 1` when none is.
    pub(crate) first: u64,
    /// How many message ids are remembered for dedupe.
    pub(crate) dedupe_len: u64,
}

impl RoomMeta {
    pub(crate) const EMPTY: Self = Self { newest: 0, first: 1, dedupe_len: 0 };
}

/// A remembered message id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dedupe {
    pub(crate) offset: u64,
    pub(crate) timestamp_ms: u64,
    /// When the id was remembered, by the engine's clock; the window counts from here.
    pub(crate) recorded_ms: u64,
}

/// The key of a remembered id in its room's age order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DedupeAge {
    pub(crate) recorded_ms: u64,
    pub(crate) sender: String,
    pub(crate) id: u128,
}

/// Writable storage for one batch (a transaction, or a room under its lock).
pub(crate) trait Tables {
    fn meta(&mut self, room: &str) -> StoreResult<Option<RoomMeta>>;
    fn set_meta(&mut self, room: &str, meta: RoomMeta) -> StoreResult<()>;
    fn append(&mut self, room: &str, offset: u64, timestamp_ms: u64, bytes: &Bytes) -> StoreResult<()>;
    /// The timestamp of a kept message.
    fn message_time(&mut self, room: &str, offset: u64) -> StoreResult<Option<u64>>;
    fn remove_message(&mut self, room: &str, offset: u64) -> StoreResult<()>;
    fn dedupe_find(&mut self, room: &str, sender: &str, id: u128) -> StoreResult<Option<Dedupe>>;
    fn dedupe_insert(&mut self, room: &str, sender: &str, id: u128, entry: Dedupe) -> StoreResult<()>;
    /// The room's oldest remembered id.
    fn dedupe_oldest(&mut self, room: &str) -> StoreResult<Option<DedupeAge>>;
    fn dedupe_remove(&mut self, room: &str, age: &DedupeAge) -> StoreResult<()>;
}

/// Readable storage.
pub(crate) trait Reader {
    fn meta(&self, room: &str) -> StoreResult<Option<RoomMeta>>;
    /// Kept messages with offsets in `low..=high`, at most `limit`, taken from the high end
    /// when `newest_first` (and returned newest first then).
    fn messages(
        &self,
        room: &str,
        low: u64,
        high: u64,
        newest_first: bool,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>>;
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The oldest timestamp a kept message may have at `now`.
pub(crate) fn ttl_cutoff(retention: &Retention, now_ms: u64) -> u64 {
    now_ms.saturating_sub(millis(retention.ttl))
}

/// Applies one publish. The outer error aborts the batch; the inner one is this publish's own.
pub(crate) fn publish<T: Tables>(
    tables: &mut T,
    retention: &Retention,
    epoch: &Epoch,
    now_ms: u64,
    request: Publish,
) -> StoreResult<Result<Published, Error>> {
    let Publish { room, sender, client_msg_id, timestamp_ms, build, origin: _ } = request;
    let mut meta = tables.meta(&room)?.unwrap_or(RoomMeta::EMPTY);
    let window = millis(retention.dedupe_window);
    let id = client_msg_id.map(|id| id.as_u128());
    if let Some(id) = id
        && let Some(seen) = tables.dedupe_find(&room, &sender, id)?
    {
        if seen.recorded_ms.saturating_add(window) > now_ms {
            return Ok(Ok(Published {
                epoch: epoch.clone(),
                offset: seen.offset,
                timestamp_ms: seen.timestamp_ms,
                duplicate: true,
                bytes: None,
            }));
        }
        // Remembered too long ago: forget it, and keep this one as a new message.
        let age = DedupeAge { recorded_ms: seen.recorded_ms, sender: sender.to_string(), id };
        tables.dedupe_remove(&room, &age)?;
        meta.dedupe_len = meta.dedupe_len.saturating_sub(1);
    }

    let assigned = Assigned { offset: meta.newest + 1, timestamp_ms: timestamp_ms.unwrap_or(now_ms) };
    // Nothing is written before the bytes exist, so a panicking builder leaves no trace.
    let Ok(bytes) = catch_unwind(AssertUnwindSafe(|| build(assigned))) else {
        return Ok(Err(Error::BuildPanicked));
    };
    tables.append(&room, assigned.offset, assigned.timestamp_ms, &bytes)?;
    meta.newest = assigned.offset;
    if let Some(id) = id {
        let entry =
            Dedupe { offset: assigned.offset, timestamp_ms: assigned.timestamp_ms, recorded_ms: now_ms };
        tables.dedupe_insert(&room, &sender, id, entry)?;
        meta.dedupe_len += 1;
    }
    trim(tables, retention, now_ms, &room, &mut meta)?;
    tables.set_meta(&room, meta)?;
    Ok(Ok(Published {
        epoch: epoch.clone(),
        offset: assigned.offset,
        timestamp_ms: assigned.timestamp_ms,
        duplicate: false,
        bytes: Some(bytes),
    }))
}

/// Trims a room's messages by count and age, and its remembered ids by age and count.
pub(crate) fn trim<T: Tables>(
    tables: &mut T,
    retention: &Retention,
    now_ms: u64,
    room: &str,
    meta: &mut RoomMeta,
) -> StoreResult<()> {
    while meta.newest + 1 - meta.first > retention.max_messages {
        tables.remove_message(room, meta.first)?;
        meta.first += 1;
    }
    let cutoff = ttl_cutoff(retention, now_ms);
    while meta.first <= meta.newest {
        match tables.message_time(room, meta.first)? {
            Some(at) if at >= cutoff => break,
            Some(_) => tables.remove_message(room, meta.first)?,
            None => {}
        }
        meta.first += 1;
    }
    let forget_before = now_ms.saturating_sub(millis(retention.dedupe_window));
    // `dedupe_len` counts the room's remembered ids, so a room that sends without ids (most
    // do) skips the lookup.
    while meta.dedupe_len > 0
        && let Some(oldest) = tables.dedupe_oldest(room)?
    {
        // Kept while a resend would still be recognised (see `publish`) and within capacity.
        if oldest.recorded_ms > forget_before && meta.dedupe_len <= retention.dedupe_capacity {
            break;
        }
        tables.dedupe_remove(room, &oldest)?;
        meta.dedupe_len = meta.dedupe_len.saturating_sub(1);
    }
    Ok(())
}

/// Sweeps one room of expired messages and ids.
pub(crate) fn sweep_room<T: Tables>(
    tables: &mut T,
    retention: &Retention,
    now_ms: u64,
    room: &str,
) -> StoreResult<()> {
    let Some(mut meta) = tables.meta(room)? else { return Ok(()) };
    let before = meta;
    trim(tables, retention, now_ms, room, &mut meta)?;
    if meta != before {
        tables.set_meta(room, meta)?;
    }
    Ok(())
}

/// The room's position.
pub(crate) fn position<R: Reader>(reader: &R, epoch: &Epoch, room: &str) -> StoreResult<Position> {
    let meta = reader.meta(room)?.unwrap_or(RoomMeta::EMPTY);
    Ok(Position { epoch: epoch.clone(), offset: meta.newest })
}

/// Everything after `since`, or why not.
pub(crate) fn since<R: Reader>(
    reader: &R,
    retention: &Retention,
    epoch: &Epoch,
    now_ms: u64,
    room: &str,
    since: &Position,
    max: usize,
) -> StoreResult<Recovery> {
    let meta = reader.meta(room)?.unwrap_or(RoomMeta::EMPTY);
    let position = Position { epoch: epoch.clone(), offset: meta.newest };
    let refuse = |position| Ok(Recovery::NotRecoverable { position });
    if since.epoch != *epoch || since.offset > meta.newest {
        return refuse(position);
    }
    let missed = meta.newest - since.offset;
    if missed > u64::try_from(max).unwrap_or(u64::MAX) {
        return refuse(position);
    }
    if missed == 0 {
        return Ok(Recovery::Recovered { position, messages: Vec::new() });
    }
    let wanted = since.offset + 1;
    if wanted < meta.first {
        return refuse(position);
    }
    let messages = reader.messages(room, wanted, meta.newest, false, max)?;
    let cutoff = ttl_cutoff(retention, now_ms);
    let complete = u64::try_from(messages.len()).ok() == Some(missed)
        && messages.iter().zip(wanted..).all(|(m, offset)| m.offset == offset && m.timestamp_ms >= cutoff);
    if !complete {
        return refuse(position);
    }
    Ok(Recovery::Recovered { position, messages })
}

/// A page of scrollback.
pub(crate) fn history<R: Reader>(
    reader: &R,
    retention: &Retention,
    epoch: &Epoch,
    now_ms: u64,
    room: &str,
    before: Option<u64>,
    limit: usize,
) -> StoreResult<History> {
    let meta = reader.meta(room)?.unwrap_or(RoomMeta::EMPTY);
    let position = Position { epoch: epoch.clone(), offset: meta.newest };
    let high = before.map_or(meta.newest, |before| before.saturating_sub(1).min(meta.newest));
    if high < meta.first {
        return Ok(History { position, messages: Vec::new(), has_more: false });
    }
    // One more than asked tells whether older ones exist.
    let mut messages = reader.messages(room, meta.first, high, true, limit.saturating_add(1))?;
    // Expired messages are gone even before a sweep removes them; the oldest go first.
    let cutoff = ttl_cutoff(retention, now_ms);
    if let Some(expired) = messages.iter().position(|m| m.timestamp_ms < cutoff) {
        messages.truncate(expired);
    }
    let has_more = messages.len() > limit;
    messages.truncate(limit);
    messages.reverse();
    Ok(History { position, messages, has_more })
}
