//! The conformance suite every [`Engine`] must pass, generic over a factory of engines.
//!
//! Each check is a function taking `make: impl Fn(Options) -> E` and panicking (through
//! `assert!`) on a violation. Each call of `make` must return an engine with no history and
//! a new epoch (a fresh file, a fresh key prefix), using the [`Options`] given: the suite's
//! [`ManualClock`] and [`FaultInjector`] drive time and failures. [`conformance_tests!`](crate::conformance_tests)
//! turns the whole list into one `#[test]` per check:
//!
//! ```
//! hubbub_history::conformance_tests!(hubbub_history::MemoryEngine::new);
//! # fn main() {}
//! ```
//!
//! An engine that needs something kept alive beside it (a temporary directory) returns a
//! [`Guarded`].

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use uuid::Uuid;

use crate::{
    Engine, Epoch, FaultInjector, History, ManualClock, OnDone, Options, Position, Publish, Published,
    Recovery, Result, Retention, StoredMessage, publish_and_wait,
};

/// The suite's start time: 2023-11-14T22:13:20Z.
pub const START_MS: u64 = 1_700_000_000_000;

/// An engine with something that must live as long as it (dropped after it).
#[derive(Debug)]
pub struct Guarded<E, G> {
    /// The engine.
    pub engine: E,
    /// Dropped after the engine, for example a temporary directory.
    pub guard: G,
}

impl<E: Engine, G: Send + Sync> Engine for Guarded<E, G> {
    fn publish(&self, request: Publish, on_done: OnDone) {
        self.engine.publish(request, on_done);
    }
    fn position(&self, room: &str) -> Result<Position> {
        self.engine.position(room)
    }
    fn since(&self, room: &str, since: &Position, max: usize) -> Result<Recovery> {
        self.engine.since(room, since, max)
    }
    fn history(&self, room: &str, before: Option<u64>, limit: usize) -> Result<History> {
        self.engine.history(room, before, limit)
    }
}

/// The clock, fault switch and options one check builds its engine with.
#[derive(Debug)]
pub struct Rig {
    /// The time the engine sees.
    pub clock: Arc<ManualClock>,
    /// The engine's fault switch.
    pub faults: FaultInjector,
    /// The options handed to the factory.
    pub options: Options,
}

impl Rig {
    /// A rig with the given retention, at [`START_MS`], no faults.
    pub fn new(retention: Retention) -> Self {
        let clock = Arc::new(ManualClock::new(START_MS));
        let faults = FaultInjector::default();
        let options =
            Options { retention, clock: clock.clone(), faults: faults.clone(), ..Options::default() };
        Self { clock, faults, options }
    }
}

/// The bytes the suite stores for a message: its room, offset and text, so that every replay
/// can be checked against what was assigned.
pub fn body(room: &str, offset: u64, text: &str) -> Bytes {
    Bytes::from(format!("{room}#{offset}:{text}"))
}

/// A publish whose bytes are [`body`].
pub fn message(room: &str, sender: &str, text: &str) -> Publish {
    let (room_name, text) = (room.to_owned(), text.to_owned());
    Publish::new(room, sender, move |assigned| body(&room_name, assigned.offset, &text))
}

fn publish<E: Engine>(engine: &E, request: Publish) -> Published {
    match publish_and_wait(engine, request) {
        Ok(published) => published,
        Err(err) => panic!("publish failed: {err}"),
    }
}

fn recovered(recovery: Recovery) -> Vec<StoredMessage> {
    match recovery {
        Recovery::Recovered { messages, .. } => messages,
        Recovery::NotRecoverable { position } => panic!("expected recovery, refused at {position:?}"),
    }
}

fn refused(recovery: &Recovery) -> bool {
    matches!(recovery, Recovery::NotRecoverable { .. })
}

fn offsets(messages: &[StoredMessage]) -> Vec<u64> {
    messages.iter().map(|m| m.offset).collect()
}

/// Offsets start at 1 in every room, go up by one, and rooms do not share them.
pub fn offsets_start_at_one_per_room<E: Engine>(make: impl Fn(Options) -> E) {
    let rig = Rig::new(Retention::default());
    let engine = make(rig.options.clone());
    for expected in 1..=3 {
        assert_eq!(publish(&engine, message("a", "ada", "x")).offset, expected);
    }
    assert_eq!(publish(&engine, message("b", "ada", "x")).offset, 1);
    assert_eq!(publish(&engine, message("a", "bob", "x")).offset, 4);
    assert_eq!(engine.position("a").expect("position").offset, 4);
    assert_eq!(engine.position("b").expect("position").offset, 1);
}

/// A room nobody published to is at offset 0 of the engine's epoch.
pub fn unknown_room_is_at_zero<E: Engine>(make: impl Fn(Options) -> E) {
    let rig = Rig::new(Retention::default());
    let engine = make(rig.options.clone());
    let published = publish(&engine, message("a", "ada", "x"));
    assert_eq!(published.offset, 1);
    // Epochs are per room: an engine may share one among rooms (memory, disk) or give each room
    // its own (Redis), but a room's epoch must not change between its first position and its
    // first message, or a member who joined it empty could not recover its first messages.
    let position = engine.position("never").expect("position");
    assert_eq!(position.offset, 0);
    assert_eq!(engine.position("never").expect("position"), position);
    let recovery = engine.since("never", &position, 10).expect("since");
    assert!(recovered(recovery).is_empty());
    let history = engine.history("never", None, 10).expect("history");
    assert!(history.messages.is_empty() && !history.has_more);
    assert_eq!(history.position, position);
    let first = publish(&engine, message("never", "ada", "x"));
    assert_eq!(Position { epoch: first.epoch, offset: first.offset }, Position { offset: 1, ..position });
}

/// Stored bytes come back exactly as built from the assigned offset and timestamp; the caller's
/// timestamp is kept, or the clock's is assigned.
pub fn bytes_and_timestamps_are_kept<E: Engine>(make: impl Fn(Options) -> E) {
    let rig = Rig::new(Retention::default());
    let engine = make(rig.options.clone());
    let seen = Arc::new(Mutex::new(None));
    let slot = seen.clone();
    let request = Publish::new("a", "ada", move |assigned| {
        *slot.lock().expect("not poisoned") = Some(assigned);
        Bytes::from(format!("{{\"offset\":{},\"timestamp\":{}}}", assigned.offset, assigned.timestamp_ms))
    });
    let first = publish(&engine, request);
    assert_eq!(first.timestamp_ms, START_MS);
    let assigned = seen.lock().expect("not poisoned").expect("build was called");
    assert_eq!((assigned.offset, assigned.timestamp_ms), (1, START_MS));
    let expected = Bytes::from(format!("{{\"offset\":1,\"timestamp\":{START_MS}}}"));
    assert_eq!(first.bytes.as_ref(), Some(&expected));

    let second = publish(&engine, message("a", "ada", "late").timestamp_ms(START_MS - 5));
    assert_eq!(second.timestamp_ms, START_MS - 5);

    let history = engine.history("a", None, 10).expect("history");
    assert_eq!(history.messages[0].bytes, expected);
    assert_eq!(history.messages[0].timestamp_ms, START_MS);
    assert_eq!(history.messages[1].bytes, body("a", 2, "late"));
    assert_eq!(history.messages[1].timestamp_ms, START_MS - 5);
}

/// Many threads publishing to a few rooms at once get gap-free offsets per room, and each
/// room's completions run in offset order, never two at once.
pub fn concurrent_publishers_get_contiguous_ordered_offsets<E: Engine + 'static>(
    make: impl Fn(Options) -> E,
) {
    const THREADS: usize = 6;
    const EACH: usize = 40;
    const ROOMS: [&str; 2] = ["r0", "r1"];
    let rig = Rig::new(Retention::default());
    let engine = Arc::new(make(rig.options.clone()));
    // Per room: the offsets in the order their callbacks ran, and a flag to catch overlap.
    let order: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let running: Arc<HashMap<&str, Mutex<()>>> =
        Arc::new(ROOMS.iter().map(|room| (*room, Mutex::new(()))).collect());
    let (done_tx, done_rx) = mpsc::channel();
    let threads: Vec<_> = (0..THREADS)
        .map(|thread| {
            let (engine, order, running, done_tx) =
                (engine.clone(), order.clone(), running.clone(), done_tx.clone());
            std::thread::spawn(move || {
                for i in 0..EACH {
                    let room = ROOMS[(thread + i) % ROOMS.len()];
                    let (order, running, done_tx) = (order.clone(), running.clone(), done_tx.clone());
                    let on_done: OnDone = Box::new(move |result| {
                        let published = result.expect("publish succeeds");
                        let _alone = running[room].try_lock().expect("callbacks of one room never overlap");
                        order
                            .lock()
                            .expect("not poisoned")
                            .entry(room.to_owned())
                            .or_default()
                            .push(published.offset);
                        done_tx.send(()).expect("the test waits");
                    });
                    engine.publish(message(room, &format!("t{thread}"), &format!("{i}")), on_done);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("publisher thread");
    }
    for _ in 0..THREADS * EACH {
        done_rx.recv_timeout(Duration::from_secs(20)).expect("every publish completes");
    }
    let order = order.lock().expect("not poisoned");
    let mut total = 0;
    for room in ROOMS {
        let seen = &order[room];
        let expected: Vec<u64> = (1..=seen.len() as u64).collect();
        assert_eq!(seen, &expected, "room {room}: completions in offset order, no gaps");
        let history = engine.history(room, None, 1_000).expect("history");
        assert_eq!(offsets(&history.messages), expected);
        for m in &history.messages {
            assert!(m.bytes.starts_with(format!("{room}#{}:", m.offset).as_bytes()));
        }
        total += seen.len();
    }
    assert_eq!(total, THREADS * EACH);
}

/// A resend (same room, sender and id) within the window gets the original offset and
/// timestamp and stores nothing (the Redis engine may build it before it learns it is a
/// duplicate; what it builds is not kept); other senders, rooms and expired ids do not match.
pub fn dedupe_returns_the_original<E: Engine>(make: impl Fn(Options) -> E) {
    let rig = Rig::new(Retention::default());
    let engine = make(rig.options.clone());
    let id = Uuid::new_v4();
    let first = publish(&engine, message("a", "ada", "hello").client_msg_id(id));
    assert!(!first.duplicate);
    publish(&engine, message("a", "bob", "between"));
    rig.clock.advance(Duration::from_secs(10));
    let resend = Publish::new("a", "ada", |_| Bytes::from_static(b"never kept")).client_msg_id(id);
    let again = publish(&engine, resend);
    assert!(again.duplicate);
    assert_eq!((again.offset, again.timestamp_ms, again.bytes), (1, START_MS, None));
    assert_eq!(engine.position("a").expect("position").offset, 2);
    let kept = engine.history("a", None, 10).expect("history");
    assert!(kept.messages.iter().all(|m| m.bytes != "never kept"), "a duplicate's bytes are not kept");

    // The same id from another sender, or in another room, is another message.
    assert_eq!(publish(&engine, message("a", "bob", "x").client_msg_id(id)).offset, 3);
    assert!(!publish(&engine, message("b", "ada", "x").client_msg_id(id)).duplicate);
    // No id, no dedupe.
    assert_eq!(publish(&engine, message("a", "ada", "x")).offset, 4);
    assert_eq!(publish(&engine, message("a", "ada", "x")).offset, 5);

    // After the window the id is forgotten.
    rig.clock.advance(rig.options.retention.dedupe_window);
    let late = publish(&engine, message("a", "ada", "hello").client_msg_id(id));
    assert!(!late.duplicate);
    assert_eq!(late.offset, 6);
    // And the new one is remembered in its turn.
    let again = publish(&engine, message("a", "ada", "hello").client_msg_id(id));
    assert!(again.duplicate);
    assert_eq!(again.offset, 6);
}

/// Two publishes with the same id racing each other: one message, both get its offset.
pub fn dedupe_holds_under_concurrency<E: Engine + 'static>(make: impl Fn(Options) -> E) {
    let rig = Rig::new(Retention::default());
    let engine = Arc::new(make(rig.options.clone()));
    let id = Uuid::new_v4();
    let (tx, rx) = mpsc::channel();
    for _ in 0..8 {
        let tx = tx.clone();
        engine.publish(
            message("a", "ada", "once").client_msg_id(id),
            Box::new(move |result| tx.send(result).expect("the test waits")),
        );
    }
    let results: Vec<Published> = (0..8)
        .map(|_| rx.recv_timeout(Duration::from_secs(10)).expect("completes").expect("succeeds"))
        .collect();
    assert!(results.iter().all(|p| p.offset == 1));
    assert_eq!(results.iter().filter(|p| !p.duplicate).count(), 1);
    assert_eq!(engine.position("a").expect("position").offset, 1);
}

/// `since` gives exactly the missed messages in order, and refuses another epoch, an offset
/// beyond the newest and more than `max`.
pub fn since_recovers_or_refuses<E: Engine>(make: impl Fn(Options) -> E) {
    let rig = Rig::new(Retention::default());
    let engine = make(rig.options.clone());
    let mut epoch = None;
    for i in 1..=10 {
        epoch = Some(publish(&engine, message("a", "ada", &format!("m{i}"))).epoch);
    }
    let epoch = epoch.expect("published");
    let at = |offset| Position { epoch: epoch.clone(), offset };

    let all = recovered(engine.since("a", &at(0), 500).expect("since"));
    assert_eq!(offsets(&all), (1..=10).collect::<Vec<_>>());
    assert_eq!(all[6].bytes, body("a", 7, "m7"));
    let rest = recovered(engine.since("a", &at(7), 500).expect("since"));
    assert_eq!(offsets(&rest), vec![8, 9, 10]);
    assert!(recovered(engine.since("a", &at(10), 500).expect("since")).is_empty());
    // Exactly `max` missed is fine; one more is not.
    assert_eq!(recovered(engine.since("a", &at(7), 3).expect("since")).len(), 3);
    let too_many = engine.since("a", &at(6), 3).expect("since");
    assert!(refused(&too_many));
    assert_eq!(too_many, Recovery::NotRecoverable { position: at(10) });
    assert!(refused(&engine.since("a", &at(11), 500).expect("since")));
    let other = Position { epoch: Epoch::new("not-this-one"), offset: 3 };
    let refusal = engine.since("a", &other, 500).expect("since");
    assert_eq!(refusal, Recovery::NotRecoverable { position: at(10) });
}

/// `history` pages back to the first message, oldest first, with `hasMore` right.
pub fn history_pages_to_the_first_message<E: Engine>(make: impl Fn(Options) -> E) {
    let rig = Rig::new(Retention::default());
    let engine = make(rig.options.clone());
    for i in 1..=7 {
        publish(&engine, message("a", "ada", &format!("m{i}")));
    }
    let newest = engine.history("a", None, 3).expect("history");
    assert_eq!(offsets(&newest.messages), vec![5, 6, 7]);
    assert!(newest.has_more);
    assert_eq!(newest.position.offset, 7);
    let mut pages = vec![newest.messages];
    let mut before = 5;
    loop {
        let page = engine.history("a", Some(before), 3).expect("history");
        before = page.messages.first().map_or(before, |m| m.offset);
        let more = page.has_more;
        pages.push(page.messages);
        if !more {
            break;
        }
    }
    let all: Vec<u64> = pages.iter().rev().flat_map(|page| offsets(page)).collect();
    assert_eq!(all, (1..=7).collect::<Vec<_>>());
    assert_eq!(offsets(&engine.history("a", Some(3), 3).expect("history").messages), vec![1, 2]);
    let none = engine.history("a", Some(1), 3).expect("history");
    assert!(none.messages.is_empty() && !none.has_more);
    let beyond = engine.history("a", Some(100), 2).expect("history");
    assert_eq!(offsets(&beyond.messages), vec![6, 7]);
    let exact = engine.history("a", None, 7).expect("history");
    assert_eq!(exact.messages.len(), 7);
    assert!(!exact.has_more);
    assert_eq!(exact.messages[0].bytes, body("a", 1, "m1"));
}

/// A room keeps at most `max_messages`; the oldest go, offsets continue, and recovery from
/// before the oldest kept is refused.
pub fn trims_by_count<E: Engine>(make: impl Fn(Options) -> E) {
    let rig = Rig::new(Retention { max_messages: 5, ..Retention::default() });
    let engine = make(rig.options.clone());
    let mut epoch = None;
    for _ in 0..8 {
        epoch = Some(publish(&engine, message("a", "ada", "x")).epoch);
    }
    let epoch = epoch.expect("published");
    let history = engine.history("a", None, 100).expect("history");
    assert_eq!(offsets(&history.messages), vec![4, 5, 6, 7, 8]);
    assert!(!history.has_more);
    let at = |offset| Position { epoch: epoch.clone(), offset };
    assert_eq!(offsets(&recovered(engine.since("a", &at(3), 100).expect("since"))), vec![4, 5, 6, 7, 8]);
    assert!(refused(&engine.since("a", &at(2), 100).expect("since")));
    assert!(refused(&engine.since("a", &at(0), 100).expect("since")));
    assert_eq!(publish(&engine, message("a", "ada", "x")).offset, 9);
    assert_eq!(offsets(&engine.history("a", None, 100).expect("history").messages), vec![5, 6, 7, 8, 9]);
}

/// Messages older than the ttl are gone from history and recovery (even before any sweep),
/// the position stays, and offsets continue.
pub fn trims_by_age<E: Engine>(make: impl Fn(Options) -> E) {
    let ttl = Duration::from_secs(3600);
    let rig = Rig::new(Retention { ttl, ..Retention::default() });
    let engine = make(rig.options.clone());
    let epoch = publish(&engine, message("a", "ada", "old1")).epoch;
    publish(&engine, message("a", "ada", "old2"));
    rig.clock.advance(ttl / 2);
    publish(&engine, message("a", "ada", "young"));
    rig.clock.advance(ttl / 2 + Duration::from_millis(1));
    let at = |offset| Position { epoch: epoch.clone(), offset };

    let history = engine.history("a", None, 100).expect("history");
    assert_eq!(offsets(&history.messages), vec![3]);
    assert!(!history.has_more);
    assert!(refused(&engine.since("a", &at(1), 100).expect("since")));
    assert_eq!(offsets(&recovered(engine.since("a", &at(2), 100).expect("since"))), vec![3]);
    assert_eq!(engine.position("a").expect("position").offset, 3);

    // A publish (which also trims) continues the offsets.
    assert_eq!(publish(&engine, message("a", "ada", "new")).offset, 4);
    assert_eq!(offsets(&engine.history("a", None, 100).expect("history").messages), vec![3, 4]);
    // Everything expires: the room is empty but keeps its place.
    rig.clock.advance(ttl * 2);
    let history = engine.history("a", None, 100).expect("history");
    assert!(history.messages.is_empty() && !history.has_more);
    assert_eq!(history.position.offset, 4);
    assert!(recovered(engine.since("a", &at(4), 100).expect("since")).is_empty());
    assert!(refused(&engine.since("a", &at(3), 100).expect("since")));
    assert_eq!(publish(&engine, message("b", "ada", "elsewhere")).offset, 1);
    assert_eq!(publish(&engine, message("a", "ada", "again")).offset, 5);
}

/// A new engine (history lost) has a new epoch: offsets from the old one are refused.
pub fn lost_history_is_a_new_epoch<E: Engine>(make: impl Fn(Options) -> E) {
    let rig = Rig::new(Retention::default());
    let old = make(rig.options.clone());
    let before = publish(&old, message("a", "ada", "x"));
    drop(old);
    let new = make(Rig::new(Retention::default()).options);
    let position = new.position("a").expect("position");
    assert_ne!(position.epoch, before.epoch);
    assert_eq!(position.offset, 0);
    let stale = Position { epoch: before.epoch.clone(), offset: 0 };
    assert!(refused(&new.since("a", &stale, 100).expect("since")));
    let again = publish(&new, message("a", "ada", "x"));
    assert_eq!((again.offset, again.epoch), (1, position.epoch));
}

/// While writes fail, every publish fails and uses no offset; then the engine works again.
pub fn failed_writes_use_no_offset<E: Engine + 'static>(make: impl Fn(Options) -> E) {
    let rig = Rig::new(Retention::default());
    let engine = Arc::new(make(rig.options.clone()));
    let id = Uuid::new_v4();
    publish(&*engine, message("a", "ada", "1"));
    publish(&*engine, message("a", "ada", "2"));

    rig.faults.fail_writes(true);
    let (tx, rx) = mpsc::channel();
    for i in 0..5 {
        let tx = tx.clone();
        let request = message("a", "ada", &format!("lost{i}"));
        let request = if i == 0 { request.client_msg_id(id) } else { request };
        engine.publish(request, Box::new(move |result| tx.send(result).expect("the test waits")));
    }
    for _ in 0..5 {
        let result = rx.recv_timeout(Duration::from_secs(10)).expect("completes");
        assert!(matches!(result, Err(crate::Error::Unavailable(_))), "{result:?}");
    }
    rig.faults.fail_writes(false);

    // The failed id was not remembered; offsets go on from the last kept one.
    let retry = publish(&*engine, message("a", "ada", "lost0").client_msg_id(id));
    assert!(!retry.duplicate);
    assert_eq!(retry.offset, 3);
    assert_eq!(publish(&*engine, message("a", "ada", "4")).offset, 4);
    let history = engine.history("a", None, 100).expect("history");
    assert_eq!(offsets(&history.messages), vec![1, 2, 3, 4]);
    assert_eq!(history.messages[2].bytes, body("a", 3, "lost0"));
}

/// A callback may publish again (to the same room) without deadlock, and its publish
/// completes after it, in order.
pub fn callbacks_may_publish_again<E: Engine + 'static>(make: impl Fn(Options) -> E) {
    let rig = Rig::new(Retention::default());
    let engine = Arc::new(make(rig.options.clone()));
    let (tx, rx) = mpsc::channel();
    let (inner_engine, inner_tx) = (engine.clone(), tx.clone());
    engine.publish(
        message("a", "ada", "first"),
        Box::new(move |result| {
            let offset = result.expect("publishes").offset;
            inner_engine.publish(
                message("a", "ada", "second"),
                Box::new(move |result| inner_tx.send(result.map(|p| p.offset)).expect("the test waits")),
            );
            tx.send(Ok(offset)).expect("the test waits");
        }),
    );
    let first = rx.recv_timeout(Duration::from_secs(10)).expect("completes").expect("succeeds");
    let second = rx.recv_timeout(Duration::from_secs(10)).expect("completes").expect("succeeds");
    assert_eq!((first, second), (1, 2));
}

/// Declares one `#[test]` per conformance check for the engines `$make` builds.
///
/// `$make` is an expression of type `impl Fn(Options) -> E` where `E: Engine + 'static`.
/// With `skip_if: $skip`, each test first evaluates `$skip` (a `bool`) and passes without
/// running the check when it is true: for engines that need an outside server the machine may
/// not have.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!($make, skip_if: false);
    };
    ($make:expr, skip_if: $skip:expr) => {
        $crate::conformance_tests!(@each $make, $skip;
            offsets_start_at_one_per_room,
            unknown_room_is_at_zero,
            bytes_and_timestamps_are_kept,
            concurrent_publishers_get_contiguous_ordered_offsets,
            dedupe_returns_the_original,
            dedupe_holds_under_concurrency,
            since_recovers_or_refuses,
            history_pages_to_the_first_message,
            trims_by_count,
            trims_by_age,
            lost_history_is_a_new_epoch,
            failed_writes_use_no_offset,
            callbacks_may_publish_again,
        );
    };
    (@each $make:expr, $skip:expr; $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                if $skip {
                    return;
                }
                $crate::conformance::$check($make);
            }
        )*
    };
}
