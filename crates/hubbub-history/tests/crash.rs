//! A child process publishes and prints every acknowledged offset; it is killed with SIGKILL;
//! the store reopened holds every acknowledged message, with the same epoch, and offsets go on.
//!
//! The child is this same test binary, run again with [`CHILD_ENV`] set to the store's path
//! and only the `child_publishes_until_killed` test selected. It is killed twice over: once
//! while every acknowledged message is only in the journal (checkpoints an hour apart), once
//! while checkpoints run after every batch, so that the kill lands anywhere in one.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use hubbub_history::conformance::{body, message};
use hubbub_history::{DiskConfig, DiskEngine, Engine, Epoch, Options, Position, Recovery, Retention};

const CHILD_ENV: &str = "HUBBUB_HISTORY_CRASH_STORE";
/// The child's checkpoint interval, in milliseconds.
const CHECKPOINT_ENV: &str = "HUBBUB_HISTORY_CRASH_CHECKPOINT_MS";
const ROOMS: [&str; 3] = ["r0", "r1", "r2"];
const ACKS_BEFORE_KILL: usize = 300;

fn options() -> Options {
    Options { retention: Retention { max_messages: 1_000_000, ..Retention::default() }, ..Options::default() }
}

/// The child's work; does nothing unless run as the child.
#[test]
fn child_publishes_until_killed() {
    let Some(path) = std::env::var_os(CHILD_ENV) else { return };
    let checkpoint_ms = std::env::var(CHECKPOINT_ENV).ok().and_then(|ms| ms.parse().ok()).unwrap_or(1_000);
    let config =
        DiskConfig { checkpoint_interval: Duration::from_millis(checkpoint_ms), ..DiskConfig::new(path) };
    let engine = Arc::new(DiskEngine::open(config, options()).expect("the child opens the store"));
    let out = Arc::new(Mutex::new(std::io::stdout()));
    // Four publishers, each waiting for its ack: batches of several publishes per commit.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (engine, out) = (engine.clone(), out.clone());
            std::thread::spawn(move || {
                for i in 0.. {
                    let room = ROOMS[(t + i) % ROOMS.len()];
                    let published = hubbub_history::publish_and_wait(
                        &*engine,
                        message(room, "child", &format!("{t}-{i}")),
                    )
                    .expect("the child publishes");
                    let mut out = out.lock().expect("not poisoned");
                    writeln!(out, "ack {room} {} {} {t}-{i}", published.offset, published.epoch)
                        .expect("stdout");
                    out.flush().expect("stdout");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("publisher");
    }
}

#[test]
fn acknowledged_messages_in_the_journal_survive_sigkill() {
    killed_child_keeps_acknowledged(3_600_000);
}

#[test]
fn acknowledged_messages_survive_sigkill_during_checkpoints() {
    killed_child_keeps_acknowledged(0);
}

/// Runs the child with checkpoints `checkpoint_ms` apart, kills it, and checks the store.
fn killed_child_keeps_acknowledged(checkpoint_ms: u64) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("history.redb");
    let mut child = Command::new(std::env::current_exe().expect("this test binary"))
        .args(["--exact", "child_publishes_until_killed", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .env(CHECKPOINT_ENV, checkpoint_ms.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the child starts");
    let stdout = child.stdout.take().expect("piped");
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // room -> (offset -> text) of every acknowledged message.
    let mut acked: HashMap<String, HashMap<u64, String>> = HashMap::new();
    let mut epoch = None;
    let mut count = 0;
    while count < ACKS_BEFORE_KILL {
        let line = lines.recv_timeout(Duration::from_secs(30)).expect("the child keeps acknowledging");
        let fields: Vec<&str> = line.split(' ').collect();
        let ["ack", room, offset, ack_epoch, text] = fields[..] else { continue };
        epoch.get_or_insert_with(|| ack_epoch.to_owned());
        assert_eq!(epoch.as_deref(), Some(ack_epoch));
        acked.entry(room.to_owned()).or_default().insert(offset.parse().expect("an offset"), text.to_owned());
        count += 1;
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("the child is reaped");
    // Acks printed before the kill but not yet read count too.
    while let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
        let fields: Vec<&str> = line.split(' ').collect();
        if let ["ack", room, offset, _, text] = fields[..] {
            acked
                .entry(room.to_owned())
                .or_default()
                .insert(offset.parse().expect("an offset"), text.to_owned());
        }
    }

    let engine =
        DiskEngine::open(DiskConfig::new(&path), options()).expect("the store reopens after SIGKILL");
    let epoch = Epoch::new(epoch.expect("acks seen"));
    for (room, messages) in &acked {
        let position = engine.position(room).expect("position");
        assert_eq!(position.epoch, epoch, "the epoch survives");
        let newest_acked = *messages.keys().max().expect("acked");
        assert!(position.offset >= newest_acked, "{room}: {} < {newest_acked}", position.offset);
        let since = Position { epoch: epoch.clone(), offset: 0 };
        let Recovery::Recovered { messages: kept, .. } =
            engine.since(room, &since, 1_000_000).expect("since")
        else {
            panic!("{room}: everything kept is recoverable");
        };
        let kept_offsets: Vec<u64> = kept.iter().map(|m| m.offset).collect();
        assert_eq!(kept_offsets, (1..=position.offset).collect::<Vec<_>>(), "{room}: no gaps");
        for (offset, text) in messages {
            assert_eq!(kept[(offset - 1) as usize].bytes, body(room, *offset, text), "{room} #{offset}");
        }
        let next =
            hubbub_history::publish_and_wait(&engine, message(room, "after", "restart")).expect("publishes");
        assert_eq!(next.offset, position.offset + 1, "{room}: offsets go on");
        assert_eq!(next.epoch, epoch);
    }
}
