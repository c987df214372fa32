//! Property tests of the store against a model: random publishes (with and without resent
//! ids), clock moves, history pages, recoveries and, on disk, reopens. After every step the
//! engine answers exactly as the model says.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hubbub_history::conformance::{Rig, START_MS};
use hubbub_history::{
    DiskConfig, DiskEngine, Engine, MemoryEngine, Options, Position, Publish, Recovery, Retention,
    StoredMessage, publish_and_wait,
};
use proptest::prelude::*;
use uuid::Uuid;

const ROOMS: [&str; 2] = ["a", "b"];
const RETENTION: Retention = Retention {
    max_messages: 6,
    ttl: Duration::from_millis(1_000),
    dedupe_window: Duration::from_millis(400),
    dedupe_capacity: 3,
    sweep_interval: Duration::from_millis(250),
};

#[derive(Clone, Debug)]
enum Op {
    /// A publish to a room, with one of a few ids (so that resends happen) or none.
    Publish { room: usize, id: Option<u8>, size: usize },
    /// Time passes.
    Advance(u64),
    /// A page of history.
    History { room: usize, before: Option<u64>, limit: usize },
    /// A recovery from an offset.
    Since { room: usize, offset: u64, max: usize },
    /// Close and open the store again (disk only; the memory engine skips it).
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..ROOMS.len(), proptest::option::weighted(0.5, 0..4_u8), 0..64_usize)
            .prop_map(|(room, id, size)| Op::Publish { room, id, size }),
        2 => (0..700_u64).prop_map(Op::Advance),
        2 => (0..ROOMS.len(), proptest::option::of(0..16_u64), 0..5_usize)
            .prop_map(|(room, before, limit)| Op::History { room, before, limit }),
        2 => (0..ROOMS.len(), 0..16_u64, 0..8_usize).prop_map(|(room, offset, max)| Op::Since { room, offset, max }),
        1 => Just(Op::Reopen),
    ]
}

/// What one room should hold.
#[derive(Default)]
struct ModelRoom {
    newest: u64,
    /// Every message ever kept (trimming is applied when reading the model).
    messages: Vec<StoredMessage>,
    /// id -> (offset, timestamp, recorded), in the order remembered.
    ids: Vec<(u8, u64, u64, u64)>,
}

struct Model {
    rooms: HashMap<usize, ModelRoom>,
    now: u64,
}

impl Model {
    fn cutoff(&self) -> u64 {
        self.now - RETENTION.ttl.as_millis() as u64
    }

    /// The kept messages of a room: the newest `max_messages`, none expired.
    fn kept(&self, room: usize) -> Vec<StoredMessage> {
        let Some(r) = self.rooms.get(&room) else { return Vec::new() };
        let skip = r.messages.len().saturating_sub(RETENTION.max_messages as usize);
        let cutoff = self.cutoff();
        r.messages[skip..].iter().filter(|m| m.timestamp_ms >= cutoff).cloned().collect()
    }

    /// Applies a publish; returns (offset, timestamp, duplicate).
    fn publish(&mut self, room: usize, id: Option<u8>, bytes: impl FnOnce(u64) -> Bytes) -> (u64, u64, bool) {
        let now = self.now;
        let window = RETENTION.dedupe_window.as_millis() as u64;
        let r = self.rooms.entry(room).or_default();
        if let Some(id) = id
            && let Some(i) = r.ids.iter().position(|e| e.0 == id)
        {
            let (_, offset, timestamp, recorded) = r.ids[i];
            if recorded + window > now {
                return (offset, timestamp, true);
            }
            r.ids.remove(i);
        }
        r.newest += 1;
        let offset = r.newest;
        r.messages.push(StoredMessage { offset, timestamp_ms: now, bytes: bytes(offset) });
        if let Some(id) = id {
            r.ids.push((id, offset, now, now));
        }
        // Forget ids by age and count, oldest first (ties: the smaller id, as the stores order them).
        while let Some((i, &(_, _, _, recorded))) = r.ids.iter().enumerate().min_by_key(|(_, e)| (e.3, e.0)) {
            if recorded + window > now && r.ids.len() as u64 <= RETENTION.dedupe_capacity {
                break;
            }
            r.ids.remove(i);
        }
        (offset, now, false)
    }
}

fn run(ops: Vec<Op>, mut open: impl FnMut(Options, bool) -> Box<dyn Engine>) -> Result<(), TestCaseError> {
    let rig = Rig::new(RETENTION);
    let mut engine = open(rig.options.clone(), false);
    let epoch = engine.position("a").expect("position").epoch;
    let mut model = Model { rooms: HashMap::new(), now: START_MS };
    for op in ops {
        match op {
            Op::Publish { room, id, size } => {
                let text: String = "x".repeat(size);
                let make = move |offset: u64| Bytes::from(format!("{}#{offset}:{text}", ROOMS[room]));
                let expected = model.publish(room, id, make.clone());
                let mut request = Publish::new(ROOMS[room], "s", move |assigned| make(assigned.offset));
                if let Some(id) = id {
                    request = request.client_msg_id(Uuid::from_u128(u128::from(id) + 1));
                }
                let published = publish_and_wait(&*engine, request).expect("publishes");
                prop_assert_eq!((published.offset, published.timestamp_ms, published.duplicate), expected);
                prop_assert_eq!(&published.epoch, &epoch);
            }
            Op::Advance(ms) => {
                model.now += ms;
                rig.clock.advance(Duration::from_millis(ms));
            }
            Op::History { room, before, limit } => {
                let kept: Vec<StoredMessage> =
                    model.kept(room).into_iter().filter(|m| before.is_none_or(|b| m.offset < b)).collect();
                let expected = &kept[kept.len().saturating_sub(limit)..];
                let history = engine.history(ROOMS[room], before, limit).expect("history");
                prop_assert_eq!(&history.messages[..], expected);
                prop_assert_eq!(history.has_more, kept.len() > limit);
            }
            Op::Since { room, offset, max } => {
                let newest = model.rooms.get(&room).map_or(0, |r| r.newest);
                let kept = model.kept(room);
                let missed: Vec<StoredMessage> = kept.into_iter().filter(|m| m.offset > offset).collect();
                let recoverable = offset <= newest
                    && newest - offset <= max as u64
                    && missed.len() as u64 == newest - offset;
                let position = Position { epoch: epoch.clone(), offset: newest };
                let expected = if recoverable {
                    Recovery::Recovered { position, messages: missed }
                } else {
                    Recovery::NotRecoverable { position }
                };
                let at = Position { epoch: epoch.clone(), offset };
                prop_assert_eq!(engine.since(ROOMS[room], &at, max).expect("since"), expected);
            }
            Op::Reopen => {
                drop(engine);
                engine = open(rig.options.clone(), true);
            }
        }
        for (room, name) in ROOMS.iter().enumerate() {
            let history = engine.history(name, None, 100).expect("history");
            prop_assert_eq!(history.messages, model.kept(room));
            prop_assert_eq!(history.position.offset, model.rooms.get(&room).map_or(0, |r| r.newest));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn memory_engine_matches_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        // The memory engine's history does not outlive it, so a reopen is a no-op here.
        let mut kept: Option<Arc<MemoryEngine>> = None;
        run(ops, |options, reopen| {
            if !reopen || kept.is_none() {
                kept = Some(Arc::new(MemoryEngine::new(options)));
            }
            Box::new(kept.clone().expect("just set"))
        })?;
    }
}

proptest! {
    // Every publish is an fsync: few, short cases.
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn disk_engine_matches_the_model_across_reopens(ops in proptest::collection::vec(op(), 1..30)) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("history.redb");
        run(ops, |options, _| {
            Box::new(DiskEngine::open(DiskConfig::new(&path), options).expect("opens"))
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// A checkpoint after every batch: reads meet messages in the file, in the segment being
    /// checkpointed and in the journal at once.
    #[test]
    fn disk_engine_matches_the_model_while_checkpointing(ops in proptest::collection::vec(op(), 1..30)) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("history.redb");
        run(ops, |options, _| {
            let config = DiskConfig { checkpoint_interval: Duration::ZERO, ..DiskConfig::new(&path) };
            Box::new(DiskEngine::open(config, options).expect("opens"))
        })?;
    }
}
