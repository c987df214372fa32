//! The disk engine beyond the conformance suite: what survives a reopen, which files it
//! refuses to open (naming them, touching nothing), and that concurrent publishes share commits.

use std::sync::Arc;
use std::time::Duration;

use hubbub_history::conformance::{START_MS, body, message};
use hubbub_history::{
    DiskConfig, DiskEngine, Engine, ManualClock, OpenFailure, Options, Position, Recovery, publish_and_wait,
};
use uuid::Uuid;

fn options(clock: &Arc<ManualClock>) -> Options {
    Options { clock: clock.clone(), ..Options::default() }
}

#[test]
fn reopen_keeps_epoch_offsets_and_dedupe() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("data").join("history.redb");
    let clock = Arc::new(ManualClock::new(START_MS));
    let id = Uuid::new_v4();
    let first = {
        let engine = DiskEngine::open(DiskConfig::new(&path), options(&clock)).expect("creates");
        let first =
            publish_and_wait(&engine, message("a", "ada", "one").client_msg_id(id)).expect("publishes");
        clock.advance(Duration::from_millis(7));
        publish_and_wait(&engine, message("a", "bob", "two")).expect("publishes");
        publish_and_wait(&engine, message("b", "bob", "elsewhere")).expect("publishes");
        first
    };
    clock.advance(Duration::from_secs(60));
    let engine = DiskEngine::open(DiskConfig::new(&path), options(&clock)).expect("reopens");
    let position = engine.position("a").expect("position");
    assert_eq!(position, Position { epoch: first.epoch.clone(), offset: 2 });
    let since = Position { epoch: first.epoch.clone(), offset: 0 };
    let Recovery::Recovered { messages, .. } = engine.since("a", &since, 10).expect("since") else {
        panic!("recoverable across a restart");
    };
    assert_eq!(
        messages.iter().map(|m| m.bytes.clone()).collect::<Vec<_>>(),
        [body("a", 1, "one"), body("a", 2, "two")]
    );
    assert_eq!(messages[1].timestamp_ms, START_MS + 7);

    let resend = publish_and_wait(&engine, message("a", "ada", "one").client_msg_id(id)).expect("publishes");
    assert!(resend.duplicate);
    assert_eq!((resend.offset, resend.timestamp_ms), (1, START_MS));
    assert_eq!(publish_and_wait(&engine, message("a", "ada", "three")).expect("publishes").offset, 3);
    assert_eq!(publish_and_wait(&engine, message("b", "ada", "x")).expect("publishes").offset, 2);
}

#[test]
fn a_recreated_file_is_a_new_epoch() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("history.redb");
    let open = || DiskEngine::open(DiskConfig::new(&path), Options::default()).expect("opens");
    let old = publish_and_wait(&open(), message("a", "ada", "x")).expect("publishes").epoch;
    assert_eq!(open().position("a").expect("position").epoch, old);
    std::fs::remove_file(&path).expect("removes");
    let engine = open();
    let position = engine.position("a").expect("position");
    assert_ne!(position.epoch, old);
    assert_eq!(position.offset, 0);
}

#[test]
fn a_file_in_use_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("history.redb");
    let _first = DiskEngine::open(DiskConfig::new(&path), Options::default()).expect("opens");
    let err = DiskEngine::open(DiskConfig::new(&path), Options::default()).expect_err("locked");
    assert!(matches!(err.failure, OpenFailure::Locked), "{err}");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

#[test]
fn a_damaged_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("history.redb");
    let garbage: Vec<u8> = (0..10_000_u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &garbage).expect("writes");
    let err = DiskEngine::open(DiskConfig::new(&path), Options::default()).expect_err("refused");
    assert!(matches!(err.failure, OpenFailure::Corrupt(_)), "{err:?}");
    assert!(err.to_string().starts_with(&format!("cannot open history store {}", path.display())), "{err}");
    assert_eq!(std::fs::read(&path).expect("reads"), garbage);
}

#[test]
fn another_database_or_format_is_refused() {
    const STORE: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("store");
    const OTHER: redb::TableDefinition<'_, u64, u64> = redb::TableDefinition::new("other");
    let dir = tempfile::tempdir().expect("temporary directory");

    let foreign = dir.path().join("foreign.redb");
    {
        let db = redb::Database::create(&foreign).expect("creates");
        let txn = db.begin_write().expect("writes");
        txn.open_table(OTHER).expect("table").insert(1, 2).expect("inserts");
        txn.commit().expect("commits");
    }
    let err = DiskEngine::open(DiskConfig::new(&foreign), Options::default()).expect_err("refused");
    assert!(matches!(err.failure, OpenFailure::NotAHistoryStore), "{err}");

    let newer = dir.path().join("newer.redb");
    {
        let db = redb::Database::create(&newer).expect("creates");
        let txn = db.begin_write().expect("writes");
        {
            let mut store = txn.open_table(STORE).expect("table");
            store.insert("format", 99_u64.to_be_bytes().as_slice()).expect("inserts");
            store.insert("epoch", b"e".as_slice()).expect("inserts");
        }
        txn.commit().expect("commits");
    }
    let err = DiskEngine::open(DiskConfig::new(&newer), Options::default()).expect_err("refused");
    assert!(matches!(err.failure, OpenFailure::Version { .. }), "{err}");
    assert!(err.to_string().contains("99"), "{err}");
}

#[test]
fn concurrent_publishes_share_commits() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let engine = Arc::new(
        DiskEngine::open(DiskConfig::new(dir.path().join("h.redb")), Options::default()).expect("opens"),
    );
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                for i in 0..8 {
                    publish_and_wait(&*engine, message("a", &format!("t{t}"), &format!("{i}")))
                        .expect("publishes");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("publisher");
    }
    let stats = engine.stats();
    assert_eq!(stats.published, 128);
    // One writer, one fsync per batch: 16 publishers waiting at once share transactions.
    assert!(stats.commits < stats.published / 2, "{stats:?}");
    assert_eq!(engine.position("a").expect("position").offset, 128);
}

#[test]
fn reads_answer_or_fail_cleanly_while_writes_fail() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let options = Options::default();
    let faults = options.faults.clone();
    let engine = DiskEngine::open(DiskConfig::new(dir.path().join("h.redb")), options).expect("opens");
    publish_and_wait(&engine, message("a", "ada", "kept")).expect("publishes");
    faults.fail_writes(true);
    assert!(publish_and_wait(&engine, message("a", "ada", "lost")).is_err());
    // While the disk refuses writes, a read either sees the kept message or says the store is
    // unavailable; it never sees the lost one.
    match engine.history("a", None, 10) {
        Ok(history) => assert_eq!(history.messages.len(), 1),
        Err(err) => assert!(matches!(err, hubbub_history::Error::Unavailable(_)), "{err}"),
    }
    faults.fail_writes(false);
    assert_eq!(publish_and_wait(&engine, message("a", "ada", "again")).expect("publishes").offset, 2);
    let history = engine.history("a", None, 10).expect("history");
    assert_eq!(history.messages[1].bytes, body("a", 2, "again"));
    assert_eq!(engine.stats().failed_batches, 1);
}
