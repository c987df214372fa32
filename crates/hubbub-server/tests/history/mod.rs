//! Room history through real sockets (issue 17): offsets, recovery on
//! rejoin, scrollback, dedupe and epochs across restarts. Each server has
//! its own scratch directory, so its history file is its own; the restart
//! tests start a second server on the same file.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Value, json};

use super::{ChatClients, Client, TestServer};
use hubbub_server::{Config, HistoryStore};

/// The offsets of `messages`.
fn offsets(messages: &[Value]) -> Vec<u64> {
    messages.iter().map(|m| m["offset"].as_u64().unwrap_or_else(|| panic!("no offset in {m}"))).collect()
}

/// Sends `count` messages with ids from `client`, reading each ack; returns
/// the acks.
async fn send_acked(client: &mut Client, prefix: &str, count: usize) -> Vec<Value> {
    let mut acks = Vec::new();
    for i in 0..count {
        client
            .send(json!({"type": "chatMessage", "text": format!("{prefix}{i}"), "clientMsgId": uuid::Uuid::new_v4()}))
            .await;
        // Others' joins and messages may come first.
        loop {
            let msg = client.recv().await;
            match msg["type"].as_str().unwrap() {
                "messageAck" => break acks.push(msg),
                "userJoined" | "userLeft" | "chatMessage" => {}
                other => panic!("unexpected {other}: {msg}"),
            }
        }
    }
    acks
}

/// Reads `count` chat messages (skipping presence events).
async fn read_messages(client: &mut Client, count: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < count {
        let msg = client.recv().await;
        match msg["type"].as_str().unwrap() {
            "chatMessage" | "fileShared" => got.push(msg),
            "userJoined" | "userLeft" | "userTyping" => {}
            other => panic!("unexpected {other}: {msg}"),
        }
    }
    got
}

/// Joins `room` with `since` and returns `roomJoined`.
async fn rejoin(client: &mut Client, room: &str, epoch: &str, offset: u64) -> Value {
    client.send(json!({"type": "joinRoom", "room": room, "since": {"epoch": epoch, "offset": offset}})).await;
    client.recv_type("userJoined").await;
    client.recv_type("roomJoined").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_contiguous_per_room_under_concurrent_senders() {
    let server = TestServer::start().await;
    let mut listener = server.in_room("listener", "r").await;
    let mut senders = Vec::new();
    for i in 0..4 {
        let sender = server.in_room(&format!("s{i}"), "r").await;
        senders.push(sender);
    }
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, mut sender)| {
            tokio::spawn(async move { send_acked(&mut sender, &format!("{i}:"), 25).await })
        })
        .collect();
    let mut acked = BTreeSet::new();
    for task in tasks {
        for ack in task.await.unwrap() {
            assert!(acked.insert(ack["offset"].as_u64().unwrap()), "an offset acked twice");
        }
    }
    let got = read_messages(&mut listener, 100).await;
    assert_eq!(offsets(&got), (1..=100).collect::<Vec<_>>(), "delivered in offset order, no gaps");
    assert_eq!(acked, (1..=100).collect::<BTreeSet<_>>());
    // Another room counts from 1.
    let mut other = server.in_room("other", "elsewhere").await;
    let ack = send_acked(&mut other, "x", 1).await;
    assert_eq!(ack[0]["offset"], 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_away_while_others_send_recovers_exactly_what_it_missed() {
    let server = TestServer::start().await;
    let mut ada = server.in_room("ada", "r").await;
    let mut bob = server.in_room("bob", "r").await;
    ada.recv_type("userJoined").await;
    send_acked(&mut ada, "before ", 5).await;
    let seen = read_messages(&mut bob, 5).await;
    let last = *offsets(&seen).last().unwrap();
    // Bob learns the epoch from a join; he is in the room already, so ask.
    bob.send(json!({"type": "joinRoom", "room": "r"})).await;
    let epoch = bob.recv_type("roomJoined").await["epoch"].as_str().unwrap().to_owned();
    drop(bob);
    ada.recv_type("userLeft").await;
    send_acked(&mut ada, "while away ", 10).await;
    // A third member keeps sending while Bob comes back.
    let mut cy = server.in_room("cy", "r").await;
    let sending = tokio::spawn(async move {
        send_acked(&mut cy, "during ", 30).await;
        cy
    });
    let mut bob = server.named("bob").await;
    let joined = rejoin(&mut bob, "r", &epoch, last).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    let missed = joined["missed"].as_u64().unwrap();
    assert!(missed >= 10, "{joined}");
    assert_eq!(joined["offset"].as_u64().unwrap(), last + missed);
    let _cy = sending.await.unwrap();
    // Replay, then live: every offset after `last` exactly once, in order.
    let got = read_messages(&mut bob, 40).await;
    let expected: Vec<u64> = (last + 1..=last + 40).collect();
    assert_eq!(offsets(&got), expected);
    assert!(got[0]["text"].as_str().unwrap().starts_with("while away "));
    bob.expect_nothing_pending().await;
    server.shutdown().await;
}

#[tokio::test]
async fn recovery_is_refused_beyond_max_recover_and_for_an_unknown_epoch() {
    let mut config = TestServer::config();
    config.history.max_recover = 5;
    let server = TestServer::with(config).await;
    let mut ada = server.in_room("ada", "r").await;
    send_acked(&mut ada, "m", 10).await;
    let mut bob = server.named("bob").await;
    bob.send(json!({"type": "joinRoom", "room": "r"})).await;
    bob.recv_type("userJoined").await;
    let epoch = bob.recv_type("roomJoined").await["epoch"].as_str().unwrap().to_owned();
    bob.send(json!({"type": "leaveRoom"})).await;
    bob.recv_type("roomLeft").await;
    // 10 missed, 5 allowed.
    let joined = rejoin(&mut bob, "r", &epoch, 0).await;
    assert_eq!((&joined["recovered"], &joined["offset"]), (&json!(false), &json!(10)), "{joined}");
    assert!(joined.get("missed").is_none());
    bob.expect_nothing_pending().await;
    bob.send(json!({"type": "leaveRoom"})).await;
    bob.recv_type("roomLeft").await;
    // 4 missed: recovered.
    let joined = rejoin(&mut bob, "r", &epoch, 6).await;
    assert_eq!((&joined["recovered"], &joined["missed"]), (&json!(true), &json!(4)), "{joined}");
    assert_eq!(offsets(&read_messages(&mut bob, 4).await), [7, 8, 9, 10]);
    bob.send(json!({"type": "leaveRoom"})).await;
    bob.recv_type("roomLeft").await;
    // Another epoch, or an offset beyond the newest: not recovered.
    for (epoch, offset) in [("not-this-one", 3), (epoch.as_str(), 11)] {
        let joined = rejoin(&mut bob, "r", epoch, offset).await;
        assert_eq!(joined["recovered"], false, "{joined}");
        bob.send(json!({"type": "leaveRoom"})).await;
        bob.recv_type("roomLeft").await;
    }
    // A malformed since is invalidFields.
    bob.send(json!({"type": "joinRoom", "room": "r", "since": {"epoch": 5}})).await;
    assert_eq!(bob.recv_type("error").await["code"], "invalidFields");
    server.shutdown().await;
}

#[tokio::test]
async fn history_pages_back_to_the_first_message() {
    let mut config = TestServer::config();
    // 120 messages at once.
    config.rate_limit.enabled = false;
    let server = TestServer::with(config).await;
    let mut ada = server.in_room("ada", "r").await;
    ada.send(json!({"type": "history"})).await;
    let empty = ada.recv_type("history").await;
    assert_eq!((&empty["messages"], &empty["hasMore"]), (&json!([]), &json!(false)));
    send_acked(&mut ada, "m", 120).await;
    let mut pages = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let mut request = json!({"type": "history"});
        if let Some(before) = before {
            request["before"] = json!(before);
        }
        ada.send(request).await;
        let page = ada.recv_type("history").await;
        assert_eq!(page["room"], "r");
        let messages = page["messages"].as_array().unwrap().clone();
        before = messages.first().map(|m| m["offset"].as_u64().unwrap());
        pages.push(offsets(&messages));
        if page["hasMore"] == false {
            break;
        }
    }
    assert_eq!(pages[0], (71..=120).collect::<Vec<_>>(), "the newest 50 first, oldest first within");
    assert_eq!(pages[1], (21..=70).collect::<Vec<_>>());
    assert_eq!(pages[2], (1..=20).collect::<Vec<_>>());
    assert_eq!(pages.len(), 3);
    // Each message exactly as it was broadcast.
    ada.send(json!({"type": "history", "before": 2, "limit": 1})).await;
    let first = &ada.recv_type("history").await["messages"][0];
    assert_eq!(
        (&first["type"], &first["user"], &first["text"], &first["offset"]),
        (&json!("chatMessage"), &json!("ada"), &json!("m0"), &json!(1))
    );
    // Bad limits and the lobby are refused.
    ada.send(json!({"type": "history", "limit": 0})).await;
    assert_eq!(ada.recv_type("error").await["code"], "invalidFields");
    ada.send(json!({"type": "history", "limit": 101})).await;
    assert_eq!(ada.recv_type("error").await["code"], "invalidFields");
    let mut lobby = server.named("lobby").await;
    lobby.send(json!({"type": "history"})).await;
    assert_eq!(lobby.recv_type("error").await["code"], "notInRoom");
    server.shutdown().await;
}

/// A configuration whose history file is `path`.
fn on_file(path: &Path) -> Config {
    let mut config = TestServer::config();
    config.history.path = Some(path.to_path_buf());
    config
}

#[tokio::test]
async fn a_restart_keeps_the_epoch_the_offsets_and_the_dedupe() {
    let dir = std::env::temp_dir().join(format!("hubbub-history-test-{}", uuid::Uuid::new_v4().simple()));
    let path = dir.join("history.redb");
    let id = uuid::Uuid::new_v4();
    let server = TestServer::with(on_file(&path)).await;
    let mut ada = server.in_room("ada", "r").await;
    send_acked(&mut ada, "m", 3).await;
    ada.send(json!({"type": "chatMessage", "text": "once", "clientMsgId": id})).await;
    let first_ack = ada.recv_type("messageAck").await;
    assert_eq!(first_ack["offset"], 4);
    ada.send(json!({"type": "joinRoom", "room": "r"})).await;
    let epoch = ada.recv_type("roomJoined").await["epoch"].clone();
    server.shutdown().await;

    let server = TestServer::with(on_file(&path)).await;
    let mut bob = server.named("bob").await;
    let joined = rejoin(&mut bob, "r", epoch.as_str().unwrap(), 1).await;
    assert_eq!(
        (&joined["epoch"], &joined["offset"], &joined["recovered"]),
        (&epoch, &json!(4), &json!(true))
    );
    assert_eq!(offsets(&read_messages(&mut bob, 3).await), [2, 3, 4]);
    let mut ada = server.in_room("ada", "r").await;
    bob.recv_type("userJoined").await;
    // The resend after the restart is recognised: the original offset and
    // timestamp, and Bob does not get it twice.
    ada.send(json!({"type": "chatMessage", "text": "once", "clientMsgId": id})).await;
    let again = ada.recv_type("messageAck").await;
    assert_eq!((&again["offset"], &again["timestamp"]), (&json!(4), &first_ack["timestamp"]));
    // Offsets continue.
    assert_eq!(send_acked(&mut ada, "after", 1).await[0]["offset"], 5);
    assert_eq!(offsets(&read_messages(&mut bob, 1).await), [5]);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_memory_store_starts_a_new_epoch_at_each_start() {
    let mut config = TestServer::config();
    config.history.store = HistoryStore::Memory;
    let server = TestServer::with(config.clone()).await;
    let mut ada = server.in_room("ada", "r").await;
    send_acked(&mut ada, "m", 2).await;
    ada.send(json!({"type": "joinRoom", "room": "r"})).await;
    let epoch = ada.recv_type("roomJoined").await["epoch"].as_str().unwrap().to_owned();
    server.shutdown().await;
    let server = TestServer::with(config).await;
    let mut ada = server.named("ada").await;
    let joined = rejoin(&mut ada, "r", &epoch, 2).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_ne!(joined["epoch"], epoch);
    assert_eq!(joined["offset"], 0);
    server.shutdown().await;
}

#[tokio::test]
async fn with_history_off_messages_carry_no_offset() {
    let mut config = TestServer::config();
    config.history.store = HistoryStore::Off;
    let server = TestServer::with(config).await;
    let mut ada = server.in_room("ada", "r").await;
    let mut bob = server.in_room("bob", "r").await;
    ada.recv_type("userJoined").await;
    let ack = send_acked(&mut ada, "m", 1).await;
    assert!(ack[0].get("offset").is_none(), "{}", ack[0]);
    let got = read_messages(&mut bob, 1).await;
    assert!(got[0].get("offset").is_none());
    bob.send(json!({"type": "history"})).await;
    assert_eq!(bob.recv_type("error").await["code"], "historyDisabled");
    server.shutdown().await;
}
