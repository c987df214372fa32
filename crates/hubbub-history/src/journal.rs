//! The disk engine's journal: what each batch changed, appended to a log file with one flush,
//! and held in memory (an [`Overlay`] over the redb file) until a checkpoint writes it into redb.
//!
//! A batch of publishes changes a few keys of a few rooms. Written into redb's B-trees, each
//! message dirties its room's leaf and branch pages, and redb writes every dirty page at every
//! commit: about 20 scattered page writes and one flush per batch. Written here instead, a batch
//! is one sequential write and one flush; the checkpoint, once a second or so on its own thread,
//! puts a whole second of changes into redb in one commit, where each touched page is written
//! once for all the messages it gained.
//!
//! Two segment files take turns (`<store>-journal-0` and `-1`): the writer appends to one while
//! the other's changes are being checkpointed. Each record names its segment's generation, so a
//! segment reused for a later generation can never be read as holding an older one's records,
//! and carries a CRC, so a record torn by a crash ends the segment. Segments are reused rather
//! than recreated, and grow by zeroed blocks written ahead: a flush then writes data, not the
//! file's size.
//!
//! Changes are absolute ("this key now holds this", "this key is gone"), so applying a segment's
//! changes again, in order, over a store that already has some of them gives the same store.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::core::{Dedupe, RoomMeta, StoreError, StoreResult};
use crate::{Epoch, FaultInjector};

/// The first four bytes of every record.
const MAGIC: u32 = u32::from_le_bytes(*b"HBJ1");
/// A record's header: magic, payload length, generation, CRC.
const HEADER: usize = 4 + 4 + 8 + 4;
/// How far ahead of the write position a segment is zeroed, at least.
const ZERO_AHEAD: u64 = 1 << 20;

/// A kept message as the overlay holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Kept {
    pub(crate) timestamp_ms: u64,
    pub(crate) bytes: Bytes,
}

/// One change to the store: what a key now holds, or that it is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// A room's counters.
    Meta { room: Arc<str>, meta: RoomMeta },
    /// A message kept (`Some`) or removed (`None`).
    Message { room: Arc<str>, offset: u64, kept: Option<Kept> },
    /// A message id remembered (`Some`) or forgotten (`None`), with its place in the room's
    /// age order (`recorded_ms`).
    Dedupe { room: Arc<str>, sender: Arc<str>, id: u128, recorded_ms: u64, entry: Option<Dedupe> },
}

const TAG_META: u8 = 1;
const TAG_PUT: u8 = 2;
const TAG_REMOVE: u8 = 3;
const TAG_REMEMBER: u8 = 4;
const TAG_FORGET: u8 = 5;

impl Change {
    /// Appends the change's encoding to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Meta { room, meta } => {
                out.push(TAG_META);
                put_str(out, room);
                for n in [meta.newest, meta.first, meta.dedupe_len] {
                    out.extend_from_slice(&n.to_le_bytes());
                }
            }
            Self::Message { room, offset, kept: Some(kept) } => {
                out.push(TAG_PUT);
                put_str(out, room);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&kept.timestamp_ms.to_le_bytes());
                put_bytes(out, &kept.bytes);
            }
            Self::Message { room, offset, kept: None } => {
                out.push(TAG_REMOVE);
                put_str(out, room);
                out.extend_from_slice(&offset.to_le_bytes());
            }
            Self::Dedupe { room, sender, id, recorded_ms, entry } => {
                out.push(if entry.is_some() { TAG_REMEMBER } else { TAG_FORGET });
                put_str(out, room);
                put_str(out, sender);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&recorded_ms.to_le_bytes());
                if let Some(entry) = entry {
                    out.extend_from_slice(&entry.offset.to_le_bytes());
                    out.extend_from_slice(&entry.timestamp_ms.to_le_bytes());
                }
            }
        }
    }

    /// Decodes every change of a record's payload.
    pub(crate) fn decode_all(payload: &[u8]) -> StoreResult<Vec<Change>> {
        let mut input = Input(payload);
        let mut changes = Vec::new();
        while !input.0.is_empty() {
            changes.push(Self::decode(&mut input)?);
        }
        Ok(changes)
    }

    fn decode(input: &mut Input<'_>) -> StoreResult<Self> {
        let tag = input.take::<1>()?[0];
        let room: Arc<str> = input.str()?.into();
        Ok(match tag {
            TAG_META => {
                let meta = RoomMeta { newest: input.u64()?, first: input.u64()?, dedupe_len: input.u64()? };
                Self::Meta { room, meta }
            }
            TAG_PUT => {
                let offset = input.u64()?;
                let timestamp_ms = input.u64()?;
                let bytes = Bytes::copy_from_slice(input.bytes()?);
                Self::Message { room, offset, kept: Some(Kept { timestamp_ms, bytes }) }
            }
            TAG_REMOVE => Self::Message { room, offset: input.u64()?, kept: None },
            TAG_REMEMBER | TAG_FORGET => {
                let sender: Arc<str> = input.str()?.into();
                let id = u128::from_le_bytes(input.take::<16>()?);
                let recorded_ms = input.u64()?;
                let entry = if tag == TAG_REMEMBER {
                    Some(Dedupe { offset: input.u64()?, timestamp_ms: input.u64()?, recorded_ms })
                } else {
                    None
                };
                Self::Dedupe { room, sender, id, recorded_ms, entry }
            }
            other => return Err(StoreError(format!("unknown journal change {other}"))),
        })
    }
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    put_bytes(out, text.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // A message is far below 4 GiB: the server's frame limits bound it.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&bytes[..len as usize]);
}

/// A payload being decoded.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take<const N: usize>(&mut self) -> StoreResult<[u8; N]> {
        let (head, rest) =
            self.0.split_first_chunk::<N>().ok_or_else(|| StoreError("journal record cut short".into()))?;
        self.0 = rest;
        Ok(*head)
    }

    fn u64(&mut self) -> StoreResult<u64> {
        Ok(u64::from_le_bytes(self.take::<8>()?))
    }

    fn bytes(&mut self) -> StoreResult<&'a [u8]> {
        let len = u32::from_le_bytes(self.take::<4>()?) as usize;
        if len > self.0.len() {
            return Err(StoreError("journal record cut short".into()));
        }
        let (bytes, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(bytes)
    }

    fn str(&mut self) -> StoreResult<&'a str> {
        std::str::from_utf8(self.bytes()?).map_err(|_| StoreError("journal text is not UTF-8".into()))
    }
}

/// The senders that used one message id, and what is remembered for each (`None`: forgotten).
pub(crate) type Senders = Vec<(Arc<str>, Option<Dedupe>)>;

/// One room's changes.
#[derive(Debug, Default)]
pub(crate) struct RoomChanges {
    /// The room's counters, if changed.
    pub(crate) meta: Option<RoomMeta>,
    /// Messages kept (`Some`) or removed (`None`), by offset.
    pub(crate) messages: BTreeMap<u64, Option<Kept>>,
    /// Remembered (`Some`) or forgotten (`None`) ids, by id, then sender.
    pub(crate) dedupe: HashMap<u128, Senders>,
    /// The age order of remembered ids: present (`true`) or removed (`false`).
    pub(crate) ages: BTreeMap<(u64, Arc<str>, u128), bool>,
}

/// Changes not yet in the redb file, by room: each key's newest state.
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    pub(crate) rooms: HashMap<Arc<str>, RoomChanges>,
}

impl Overlay {
    pub(crate) fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    /// Records a change.
    pub(crate) fn apply(&mut self, change: Change) {
        match change {
            Change::Meta { room, meta } => self.rooms.entry(room).or_default().meta = Some(meta),
            Change::Message { room, offset, kept } => {
                self.rooms.entry(room).or_default().messages.insert(offset, kept);
            }
            Change::Dedupe { room, sender, id, recorded_ms, entry } => {
                let changes = self.rooms.entry(room).or_default();
                changes.ages.insert((recorded_ms, sender.clone(), id), entry.is_some());
                set_sender(changes.dedupe.entry(id).or_default(), sender, entry);
            }
        }
    }

    /// Puts `newer`'s changes over this overlay's.
    pub(crate) fn merge(&mut self, newer: Overlay) {
        for (room, changes) in newer.rooms {
            let mine = self.rooms.entry(room).or_default();
            if changes.meta.is_some() {
                mine.meta = changes.meta;
            }
            mine.messages.extend(changes.messages);
            mine.ages.extend(changes.ages);
            for (id, senders) in changes.dedupe {
                let known = mine.dedupe.entry(id).or_default();
                for (sender, entry) in senders {
                    set_sender(known, sender, entry);
                }
            }
        }
    }
}

/// Records what is now remembered for `sender` among an id's senders.
fn set_sender(senders: &mut Senders, sender: Arc<str>, entry: Option<Dedupe>) {
    match senders.iter_mut().find(|(known, _)| *known == sender) {
        Some((_, slot)) => *slot = entry,
        None => senders.push((sender, entry)),
    }
}

/// Overlays from newest to oldest, read in that order before the redb file.
#[derive(Clone, Copy)]
pub(crate) struct Layers<'a>(pub(crate) [Option<&'a Overlay>; 3]);

impl<'a> Layers<'a> {
    fn each(&self) -> impl DoubleEndedIterator<Item = &'a Overlay> + '_ {
        self.0.iter().flatten().copied()
    }

    fn room<'s>(&'s self, room: &'s str) -> impl DoubleEndedIterator<Item = &'a RoomChanges> + 's {
        self.each().filter_map(move |layer| layer.rooms.get(room))
    }

    /// The room's name as an overlay holds it, to share rather than allocate.
    pub(crate) fn room_key(&self, room: &str) -> Option<Arc<str>> {
        self.each().find_map(|layer| layer.rooms.get_key_value(room).map(|(key, _)| key.clone()))
    }

    /// The room's counters, if an overlay changed them.
    pub(crate) fn meta(&self, room: &str) -> Option<RoomMeta> {
        self.room(room).find_map(|changes| changes.meta)
    }

    /// A message's state, if an overlay changed it: `Some(None)` when removed.
    pub(crate) fn message(&self, room: &str, offset: u64) -> Option<Option<&'a Kept>> {
        self.room(room).find_map(|changes| changes.messages.get(&offset).map(Option::as_ref))
    }

    /// The overlays' changes to messages `low..=high` of a room, newest state of each.
    pub(crate) fn messages(&self, room: &str, low: u64, high: u64) -> BTreeMap<u64, Option<&'a Kept>> {
        let mut merged = BTreeMap::new();
        if low > high {
            return merged;
        }
        for changes in self.room(room).rev() {
            for (offset, kept) in changes.messages.range(low..=high) {
                merged.insert(*offset, kept.as_ref());
            }
        }
        merged
    }

    /// A remembered id's state, if an overlay changed it.
    pub(crate) fn dedupe(&self, room: &str, sender: &str, id: u128) -> Option<Option<Dedupe>> {
        self.room(room).find_map(|changes| {
            let senders = changes.dedupe.get(&id)?;
            senders.iter().find(|(known, _)| &**known == sender).map(|(_, entry)| *entry)
        })
    }

    /// The overlays' changes to a room's age order, newest state of each.
    pub(crate) fn ages(&self, room: &str) -> BTreeMap<(u64, &'a str, u128), bool> {
        let mut merged = BTreeMap::new();
        for changes in self.room(room).rev() {
            for ((recorded_ms, sender, id), present) in &changes.ages {
                merged.insert((*recorded_ms, &**sender, *id), *present);
            }
        }
        merged
    }

    /// Every room an overlay changed.
    pub(crate) fn rooms(&self) -> Vec<Arc<str>> {
        let mut rooms: Vec<Arc<str>> = self.each().flat_map(|layer| layer.rooms.keys().cloned()).collect();
        rooms.sort_unstable();
        rooms.dedup();
        rooms
    }
}

/// The journal's file for a slot: `<store>-journal-<slot>`.
pub(crate) fn segment_path(store: &Path, slot: u64) -> PathBuf {
    let mut name = store.file_name().unwrap_or_default().to_os_string();
    name.push(format!("-journal-{slot}"));
    store.with_file_name(name)
}

/// The segment being appended to.
pub(crate) struct Journal {
    store: PathBuf,
    /// The store's epoch, which every record's CRC covers.
    epoch: Epoch,
    faults: FaultInjector,
    file: File,
    /// The generation of the segment's records.
    generation: u64,
    /// Where the next record goes.
    position: u64,
    /// How much of the file is written (zeros ahead of `position`).
    length: u64,
    /// The record being written, reused.
    record: Vec<u8>,
}

impl Journal {
    /// Starts generation `generation` in its slot's file, reusing what is there.
    pub(crate) fn start(
        store: &Path,
        epoch: &Epoch,
        generation: u64,
        faults: FaultInjector,
    ) -> io::Result<Self> {
        let file = open_segment(store, generation % 2)?;
        let length = file.metadata()?.len();
        // A newly opened file is written from its start: the first record overwrites the
        // start of whatever generation was here, so that recovery never reads this segment
        // as an old one's even if it stopped short.
        Ok(Self {
            store: store.to_owned(),
            epoch: epoch.clone(),
            faults,
            file,
            generation,
            position: 0,
            length,
            record: Vec::new(),
        })
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// How much of the current segment holds records.
    pub(crate) fn used(&self) -> u64 {
        self.position
    }

    /// Moves to the next generation, in the other slot's file. That file's records must
    /// already be in redb.
    pub(crate) fn rotate(&mut self) -> io::Result<()> {
        *self = Self::start(&self.store, &self.epoch, self.generation + 1, self.faults.clone())?;
        Ok(())
    }

    /// Appends a record with `payload` and flushes it to the disk.
    ///
    /// On failure the position stays where it was, so the next record overwrites whatever
    /// part of this one was written.
    pub(crate) fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        let result = self.write_record(payload);
        if result.is_err() {
            // Best effort: a record whose flush failed may still have reached the disk, and
            // must not be read back as kept; the next record starts here again.
            let _ = self.file.seek(SeekFrom::Start(self.position));
            if !self.faults.failing() && self.file.write_all(&[0; HEADER]).is_ok() {
                let _ = self.file.sync_data();
            }
            let _ = self.file.seek(SeekFrom::Start(self.position));
        }
        result
    }

    fn write_record(&mut self, payload: &[u8]) -> io::Result<()> {
        self.faults.check_write()?;
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "journal record over 4 GiB"))?;
        let record = &mut self.record;
        record.clear();
        record.extend_from_slice(&MAGIC.to_le_bytes());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&self.generation.to_le_bytes());
        record.extend_from_slice(&checksum(self.epoch.as_str(), len, self.generation, payload).to_le_bytes());
        record.extend_from_slice(payload);
        let end = self.position + record.len() as u64;
        if end > self.length {
            // Zeros ahead, in the same flush as the record: later records then change no
            // file size, and a flush writes only their blocks.
            let grown = end + ZERO_AHEAD;
            record.resize((grown - self.position) as usize, 0);
            self.file.write_all(record)?;
            self.length = grown;
            self.file.seek(SeekFrom::Start(end))?;
        } else {
            self.file.write_all(record)?;
        }
        self.file.sync_data()?;
        self.position = end;
        Ok(())
    }
}

fn open_segment(store: &Path, slot: u64) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(segment_path(store, slot))
}

/// A record's CRC. It covers the store's epoch too, so a journal left beside a store file that
/// was deleted and created anew is never read as the new store's.
fn checksum(epoch: &str, len: u32, generation: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(epoch.as_bytes());
    hasher.update(&len.to_le_bytes());
    hasher.update(&generation.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// A segment's records, as found on disk.
#[derive(Debug, Default)]
pub(crate) struct Segment {
    /// The generation of its first record (0 when it has none).
    pub(crate) generation: u64,
    /// Each record's payload, in order.
    pub(crate) records: Vec<Vec<u8>>,
}

/// Reads a slot's segment: records of one generation, from the start, up to the first that is
/// torn, of another generation, or not a record at all.
pub(crate) fn read_segment(store: &Path, epoch: &Epoch, slot: u64) -> io::Result<Segment> {
    let path = segment_path(store, slot);
    let mut file = match File::open(&path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Segment::default()),
        Err(err) => return Err(err),
    };
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    Ok(parse_segment(epoch, &data))
}

/// The records at the start of a segment's bytes; see [`read_segment`].
pub(crate) fn parse_segment(epoch: &Epoch, data: &[u8]) -> Segment {
    let mut segment = Segment::default();
    let mut rest = data;
    while let Some((header, after)) = rest.split_first_chunk::<HEADER>() {
        let field =
            |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
        let (magic, len) = (field(0), field(4));
        let mut generation = [0; 8];
        generation.copy_from_slice(&header[8..16]);
        let generation = u64::from_le_bytes(generation);
        let crc = field(16);
        let Some(payload) = after.get(..len as usize) else { break };
        let expected = if segment.records.is_empty() { generation } else { segment.generation };
        if magic != MAGIC
            || generation == 0
            || generation != expected
            || checksum(epoch.as_str(), len, generation, payload) != crc
        {
            break;
        }
        segment.generation = generation;
        segment.records.push(payload.to_vec());
        rest = &after[len as usize..];
    }
    segment
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes() -> Vec<Change> {
        let room: Arc<str> = "room".into();
        vec![
            Change::Meta { room: room.clone(), meta: RoomMeta { newest: 3, first: 2, dedupe_len: 1 } },
            Change::Message {
                room: room.clone(),
                offset: 3,
                kept: Some(Kept { timestamp_ms: 77, bytes: Bytes::from_static(b"{\"text\":\"hi\"}") }),
            },
            Change::Message { room: room.clone(), offset: 1, kept: None },
            Change::Dedupe {
                room: room.clone(),
                sender: "ada".into(),
                id: u128::MAX - 5,
                recorded_ms: 70,
                entry: Some(Dedupe { offset: 3, timestamp_ms: 77, recorded_ms: 70 }),
            },
            Change::Dedupe { room, sender: "bob".into(), id: 9, recorded_ms: 12, entry: None },
        ]
    }

    #[test]
    fn changes_decode_as_encoded() {
        let mut payload = Vec::new();
        for change in changes() {
            change.encode(&mut payload);
        }
        assert_eq!(Change::decode_all(&payload).expect("decodes"), changes());
        // Any cut is an error, never a panic.
        for cut in 0..payload.len() {
            let _ = Change::decode_all(&payload[..cut]);
        }
    }

    fn epoch() -> Epoch {
        Epoch::new("0123456789abcdef")
    }

    fn record(generation: u64, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&generation.to_le_bytes());
        out.extend_from_slice(&checksum(epoch().as_str(), len, generation, payload).to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn a_segment_ends_at_a_torn_record_or_another_generation() {
        let mut data =
            [record(7, b"one"), record(7, b"two"), record(5, b"old"), record(7, b"stale")].concat();
        let segment = parse_segment(&epoch(), &data);
        assert_eq!(segment.generation, 7);
        assert_eq!(segment.records, [b"one".to_vec(), b"two".to_vec()]);
        // Every shorter prefix reads as a prefix of the records.
        let full = record(7, b"one").len() + record(7, b"two").len();
        for cut in 0..full {
            let records = parse_segment(&epoch(), &data[..cut]).records;
            assert!(records.len() <= 2 && records.iter().zip([b"one", b"two"]).all(|(r, w)| r == w));
        }
        // A flipped bit in the second record ends the segment after the first.
        data[record(7, b"one").len() + HEADER] ^= 1;
        assert_eq!(parse_segment(&epoch(), &data).records, [b"one".to_vec()]);
        assert!(parse_segment(&epoch(), &[0; 64]).records.is_empty());
    }

    #[test]
    fn a_reused_segment_is_read_as_its_new_generation_only() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = dir.path().join("h.redb");
        let mut journal = Journal::start(&store, &epoch(), 2, FaultInjector::default()).expect("starts");
        for text in ["a", "bb", "ccc"] {
            journal.append(text.as_bytes()).expect("appends");
        }
        let mut journal =
            Journal::start(&store, &epoch(), 4, FaultInjector::default()).expect("reuses slot 0");
        journal.append(b"dddd").expect("appends");
        let segment = read_segment(&store, &epoch(), 0).expect("reads");
        assert_eq!((segment.generation, segment.records), (4, vec![b"dddd".to_vec()]));
        assert_eq!(read_segment(&store, &epoch(), 1).expect("reads").records.len(), 0);

        let faults = FaultInjector::default();
        let mut journal = Journal::start(&store, &epoch(), 6, faults.clone()).expect("starts");
        faults.fail_writes(true);
        assert!(journal.append(b"lost").is_err());
        faults.fail_writes(false);
        journal.append(b"kept").expect("appends");
        assert_eq!(read_segment(&store, &epoch(), 0).expect("reads").records, [b"kept".to_vec()]);
    }
}
