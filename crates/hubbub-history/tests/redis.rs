//! The Redis engine against real `redis-server` processes that the tests start (never the
//! system's instance): the conformance suite, and what happens when Redis restarts or stops.
//!
//! Without `redis-server` on the PATH the tests print one line and pass, except under
//! `CI=true`, where they fail (CI installs it: see `.ci/run`).
#![cfg(feature = "redis")]

use std::process::Command;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hubbub_history::conformance::{Guarded, Rig, message};
use hubbub_history::{
    Engine, Error, Options, Position, Recovery, RedisConfig, RedisEngine, Retention, publish_and_wait,
};
use hubbub_testkit::{self as testkit, Persistence};
use tempfile::TempDir;

/// A `redis-server` without persistence in a temporary directory, which goes once the server
/// is gone (the fields drop in order).
struct RedisServer {
    redis: testkit::RedisServer,
    _dir: TempDir,
}

impl RedisServer {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let redis = testkit::RedisServer::start(dir.path(), Persistence::None).expect("redis-server starts");
        Self { redis, _dir: dir }
    }

    fn url(&self) -> String {
        self.redis.url()
    }

    /// Kills it (SIGKILL); without persistence it loses everything.
    fn kill(&mut self) {
        self.redis.kill();
    }

    /// Starts it again on the same port.
    fn start_again(&mut self) {
        self.redis.start_again().expect("redis-server starts again on its port");
    }
}

/// True (after one line on stderr) when `redis-server` is missing and the tests should pass
/// without running; under `CI=true` a missing server is a failure.
fn skip() -> bool {
    testkit::skip_without_redis("the Redis engine tests")
}

/// An engine on its own new `redis-server`.
fn fresh(options: Options) -> Guarded<RedisEngine, RedisServer> {
    let server = RedisServer::start();
    let config = RedisConfig::new(server.url()).prefix("test:");
    let engine = RedisEngine::connect(config, options).expect("connects to the new redis-server");
    Guarded { engine, guard: server }
}

mod conformance {
    hubbub_history::conformance_tests!(super::fresh, skip_if: super::skip());
}

/// Publishes until one succeeds, for a Redis that is coming back.
fn publish_eventually(engine: &RedisEngine, text: &str) -> hubbub_history::Published {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match publish_and_wait(engine, message("a", "ada", text)) {
            Ok(published) => return published,
            Err(Error::Unavailable(cause)) => {
                assert!(Instant::now() < deadline, "redis did not come back: {cause}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(err) => panic!("unexpected error: {err}"),
        }
    }
}

/// Redis restarted without persistence has lost the history: the room has a new epoch, the old
/// one is not recoverable, and offsets start again at 1.
#[test]
fn redis_restarted_without_persistence_is_a_new_epoch() {
    if skip() {
        return;
    }
    let mut server = RedisServer::start();
    let rig = Rig::new(Retention::default());
    let engine = RedisEngine::connect(RedisConfig::new(server.url()), rig.options.clone()).expect("connects");
    publish_and_wait(&engine, message("a", "ada", "1")).expect("publishes");
    let before = publish_and_wait(&engine, message("a", "ada", "2")).expect("publishes");
    assert_eq!(before.offset, 2);

    server.kill();
    server.start_again();
    let after = publish_eventually(&engine, "3");
    assert_ne!(after.epoch, before.epoch);
    assert_eq!(after.offset, 1);
    let stale = Position { epoch: before.epoch.clone(), offset: 2 };
    match engine.since("a", &stale, 100).expect("since") {
        Recovery::NotRecoverable { position } => {
            assert_eq!(position, Position { epoch: after.epoch.clone(), offset: 1 });
        }
        recovered => panic!("the old epoch must not recover: {recovered:?}"),
    }
}

/// While Redis is stopped every publish fails with `Unavailable` and reads fail; once it is
/// back, publishes succeed again by themselves (on the same engine).
#[test]
fn redis_stopped_is_unavailable_until_it_is_back() {
    if skip() {
        return;
    }
    let mut server = RedisServer::start();
    let rig = Rig::new(Retention::default());
    let engine = RedisEngine::connect(RedisConfig::new(server.url()), rig.options.clone()).expect("connects");
    assert_eq!(publish_and_wait(&engine, message("a", "ada", "1")).expect("publishes").offset, 1);

    server.kill();
    for i in 0..3 {
        let result = publish_and_wait(&engine, message("a", "ada", &format!("lost{i}")));
        assert!(matches!(result, Err(Error::Unavailable(_))), "{result:?}");
    }
    assert!(matches!(engine.position("a"), Err(Error::Read(_))));

    server.start_again();
    let back = publish_eventually(&engine, "2");
    assert_eq!(back.offset, 1, "a restarted Redis without persistence starts the room again");
    let next = publish_and_wait(&engine, message("a", "ada", "3")).expect("publishes");
    assert_eq!((next.offset, next.epoch), (2, back.epoch));
}

/// Two engines (two server processes) on one Redis share the rooms: offsets continue across
/// them, dedupe recognises a resend to the other one, and each sees the other's messages.
#[test]
fn two_engines_share_one_history() {
    if skip() {
        return;
    }
    let server = RedisServer::start();
    let rig = Rig::new(Retention::default());
    let connect =
        || RedisEngine::connect(RedisConfig::new(server.url()), rig.options.clone()).expect("connects");
    let (one, two) = (connect(), connect());
    let id = uuid::Uuid::new_v4();
    let first = publish_and_wait(&one, message("a", "ada", "1").client_msg_id(id)).expect("publishes");
    let second = publish_and_wait(&two, message("a", "bob", "2")).expect("publishes");
    assert_eq!((first.offset, second.offset), (1, 2));
    assert_eq!(first.epoch, second.epoch);
    let resend = publish_and_wait(&two, message("a", "ada", "1").client_msg_id(id)).expect("publishes");
    assert!(resend.duplicate);
    assert_eq!(resend.offset, 1);
    let history = one.history("a", None, 10).expect("history");
    assert_eq!(history.messages.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![1, 2]);
}

/// A Redis that stops answering (the process frozen with SIGSTOP) fails publishes with
/// `Unavailable`. A publish whose answer timed out may still have been kept (Redis runs it when
/// it resumes), so senders resend with their `clientMsgId`: once Redis answers again, each
/// resend is kept once (or recognised as kept), the room goes on in the same epoch, and its
/// offsets stay contiguous.
#[test]
fn redis_not_answering_fails_publishes_and_resends_keep_each_once() {
    if skip() {
        return;
    }
    let server = RedisServer::start();
    let rig = Rig::new(Retention::default());
    let mut config = RedisConfig::new(server.url());
    config.response_timeout = Duration::from_millis(300);
    let engine = RedisEngine::connect(config, rig.options.clone()).expect("connects");
    let first = publish_and_wait(&engine, message("a", "ada", "1")).expect("publishes");

    signal(&server, "-STOP");
    let ids = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()];
    for (i, id) in ids.iter().enumerate() {
        let result = publish_and_wait(&engine, message("a", "ada", &format!("lost{i}")).client_msg_id(*id));
        assert!(matches!(result, Err(Error::Unavailable(_))), "{result:?}");
    }
    signal(&server, "-CONT");

    let mut offsets = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let text = format!("lost{i}");
        let resent = (0..100)
            .find_map(|_| match publish_and_wait(&engine, message("a", "ada", &text).client_msg_id(*id)) {
                Ok(published) => Some(published),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(50));
                    None
                }
            })
            .expect("redis answers again");
        assert_eq!(resent.epoch, first.epoch);
        offsets.push(resent.offset);
    }
    assert_eq!(offsets, [2, 3], "kept once each, in order, after the first");
    let history = engine.history("a", None, 10).expect("history");
    let kept: Vec<_> = history.messages.iter().map(|m| m.offset).collect();
    assert_eq!(kept, [1, 2, 3], "contiguous offsets, nothing kept twice");
}

fn signal(server: &RedisServer, signal: &str) {
    let pid = server.redis.pid().expect("redis-server runs");
    let status = Command::new("kill").args([signal, &pid.to_string()]).status().expect("kill runs");
    assert!(status.success(), "kill {signal} failed");
}

/// Two engines publishing to one room at the same time: the room's lock makes them take turns,
/// so every message is kept, with its own offset, no gaps, each engine's in its own order.
#[test]
fn two_engines_publishing_at_once_take_turns() {
    if skip() {
        return;
    }
    let server = RedisServer::start();
    let rig = Rig::new(Retention::default());
    let connect =
        || RedisEngine::connect(RedisConfig::new(server.url()), rig.options.clone()).expect("connects");
    let engines = [Arc::new(connect()), Arc::new(connect())];
    let (tx, rx) = mpsc::channel();
    for (n, engine) in engines.iter().enumerate() {
        for i in 0..100 {
            let tx = tx.clone();
            engine.publish(
                message("a", &format!("e{n}"), &format!("{n}-{i}")),
                Box::new(move |result| tx.send(result).expect("the test waits")),
            );
        }
    }
    let mut kept: Vec<(u64, Bytes)> = (0..200)
        .filter_map(|_| {
            let result = rx.recv_timeout(Duration::from_secs(20)).expect("every publish completes");
            match result {
                Ok(published) => Some((published.offset, published.bytes.expect("a new message"))),
                Err(Error::Unavailable(_)) => None,
                Err(err) => panic!("unexpected error: {err}"),
            }
        })
        .collect();
    assert_eq!(kept.len(), 200, "no publish failed");
    // `kept` is in completion order; each engine's texts `<engine>-<i>` must come in order of i.
    for n in 0..2 {
        let own: Vec<u64> = kept
            .iter()
            .filter_map(|(_, bytes)| {
                let text = std::str::from_utf8(bytes).ok()?.split_once(':')?.1;
                let (engine, i) = text.split_once('-')?;
                (engine == n.to_string()).then(|| i.parse::<u64>().ok()).flatten()
            })
            .collect();
        assert_eq!(own, (0..100).collect::<Vec<_>>(), "engine {n}'s messages in its publish order");
    }
    kept.sort();
    let offsets: Vec<u64> = kept.iter().map(|(offset, _)| *offset).collect();
    assert_eq!(offsets, (1..=kept.len() as u64).collect::<Vec<_>>());
    let history = engines[0].history("a", None, 1_000).expect("history");
    let stored: Vec<(u64, Bytes)> = history.messages.into_iter().map(|m| (m.offset, m.bytes)).collect();
    assert_eq!(stored, kept);
}
