//! Process tests of cluster mode (issue 18): real `hubbub` nodes sharing a
//! real `redis-server` that each test starts for itself (never the system's
//! instance), with short cluster timings. Clients are blocking WebSockets
//! that record what they see of their room; one checker then judges every
//! room: each client's offsets are gap-free unless it got `resync`, all
//! clients saw the same message at each position, and every acknowledged
//! message exists exactly once (in what clients saw and in the history).
//!
//! Without `redis-server` on the PATH the tests print one line and pass,
//! except under `CI=true`, where they fail (CI installs it).

mod member;
mod rig;

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{Value, json};

use super::chat::Chat;
use member::{Member, Seen, check, lobby, sentinel, three_talking};
use rig::{NODE_TIMEOUT, Node, Persistence, Proxy, get, redis, test_dir};

#[test]
fn nodes_share_rooms_counts_events_the_lobby_and_notifications() {
    let dir = test_dir("delivery");
    let Some(redis) = redis(&dir, Persistence::None) else { return };
    let (a, b, c) = (
        Node::start(&dir, "a", &redis.url()),
        Node::start(&dir, "b", &redis.url()),
        Node::start(&dir, "c", &redis.url()),
    );
    for node in [&a, &b, &c] {
        let status = node.wait_nodes(3);
        assert!(
            status["cluster"]["node"].as_str().unwrap().starts_with(&format!("{}-", node.name)),
            "{status}"
        );
        assert_eq!(status["cluster"]["redis"], "up", "{status}");
    }
    let mut feeds = [Chat::open(a.port, "/ws/notifications"), Chat::open(c.port, "/ws/notifications")];
    for feed in &mut feeds {
        feed.round_trip();
    }
    let mut lurker = Member::connect(c.port, "lurker", "z");

    // Joins: counts are the cluster's, and each node's members hear of joins elsewhere.
    let mut ada = Member::connect(a.port, "ada", "r");
    let joined = ada.join();
    assert_eq!((&joined["userCount"], &joined["offset"]), (&json!(1), &json!(0)), "{joined}");
    assert!(joined["epoch"].is_string(), "{joined}");
    b.wait_rooms(&[("r", 1)]);
    let mut bob = Member::connect(b.port, "bob", "r");
    assert_eq!(bob.join()["userCount"], 2);
    // The joiner hears its own join too, before roomJoined.
    assert_eq!(ada.log[1], json!({"type": "userJoined", "user": "ada", "room": "r", "userCount": 1}));
    assert_eq!(bob.log[1], json!({"type": "userJoined", "user": "bob", "room": "r", "userCount": 2}));
    assert_eq!(
        ada.expect("userJoined"),
        json!({"type": "userJoined", "user": "bob", "room": "r", "userCount": 2})
    );
    c.wait_rooms(&[("r", 2)]);
    let mut cy = Member::connect(c.port, "cy", "r");
    assert_eq!(cy.join()["userCount"], 3);
    for member in [&mut ada, &mut bob] {
        assert_eq!(
            member.expect("userJoined"),
            json!({"type": "userJoined", "user": "cy", "room": "r", "userCount": 3})
        );
    }
    for node in [&a, &b, &c] {
        node.wait_rooms(&[("r", 3)]);
    }

    // Room messages from three nodes at once, with and without clientMsgId.
    for _ in 0..10 {
        ada.say();
        bob.say_plain();
        cy.say();
    }
    // Bob's messages have no ack: they are all kept once ada has them.
    ada.wait_kept_from("bob", 10);
    let last = sentinel(&mut ada, &mut [&mut bob, &mut cy]);
    assert_eq!(last, 31, "every message kept once, offsets from 1");

    // Typing reaches the other members on every node, not the typist.
    ada.send(&json!({"type": "typing"}));
    assert_eq!(bob.expect("userTyping")["user"], "ada");
    assert_eq!(cy.expect("userTyping")["user"], "ada");

    // The lobby: every chat connection on every node, the sender included, once and in order.
    bob.send(&json!({"type": "chat", "text": "lobby-1"}));
    bob.send(&json!({"type": "chat", "text": "lobby-2"}));
    for member in [&mut ada, &mut bob, &mut cy, &mut lurker] {
        assert_eq!(lobby(member, 2), ["lobby-1", "lobby-2"], "{}", member.user);
    }

    // Leaving: counts go down everywhere; the last leave removes the room, once.
    cy.send(&json!({"type": "leaveRoom"}));
    cy.expect("roomLeft");
    for member in [&mut ada, &mut bob] {
        assert_eq!(
            member.expect("userLeft"),
            json!({"type": "userLeft", "user": "cy", "room": "r", "userCount": 2})
        );
    }
    a.wait_rooms(&[("r", 2)]);
    bob.disconnect();
    assert_eq!(
        ada.expect("userLeft"),
        json!({"type": "userLeft", "user": "bob", "room": "r", "userCount": 1})
    );
    c.wait_rooms(&[("r", 1)]);
    ada.send(&json!({"type": "leaveRoom"}));
    ada.expect("roomLeft");
    b.wait_rooms(&[]);
    assert!(ada.log.iter().all(|e| e["type"] != "userTyping"), "the typist heard itself");

    // One roomCreated and one roomRemoved per room in the cluster: a later
    // room's creation is the next thing each feed gets.
    lurker.join();
    for feed in &mut feeds {
        let got: Vec<Value> = (0..3).map(|_| feed.recv()).collect();
        assert_eq!(
            got,
            [
                json!({"type": "roomCreated", "room": "r"}),
                json!({"type": "roomRemoved", "room": "r"}),
                json!({"type": "roomCreated", "room": "z"})
            ]
        );
    }
    check(c.port, &[&ada, &bob, &cy]);
}

#[test]
fn an_upload_to_one_node_is_shared_with_the_room_and_downloadable_from_another() {
    let dir = test_dir("upload");
    let Some(redis) = redis(&dir, Persistence::None) else { return };
    let (a, b) = (Node::start(&dir, "a", &redis.url()), Node::start(&dir, "b", &redis.url()));
    let mut ada = Member::connect(a.port, "ada", "r");
    let mut bob = Member::connect(b.port, "bob", "r");
    ada.join();
    bob.join();
    ada.say();
    sentinel(&mut bob, &mut [&mut ada]);

    // Kept like a chat message: fileSaved to the uploader and fileShared
    // to the room carry the next offset. A node that starts meanwhile on
    // the same upload directory leaves the upload alone.
    let data: Vec<u8> = (0..10_000_u32).map(|i| (i * 7 % 251) as u8).collect();
    let chunks: Vec<Vec<u8>> = data
        .chunks(4096)
        .enumerate()
        .map(|(index, chunk)| [&(index as u32).to_be_bytes()[..], chunk].concat())
        .collect();
    let start = json!({"type": "fileStart", "name": "notes.txt", "size": data.len(), "chunkSize": 4096});
    ada.send(&start);
    ada.expect("fileAccepted");
    ada.chat().send_binary(&chunks[0]);
    ada.expect("fileProgress");
    let c = Node::start(&dir, "c", &redis.url());
    for chunk in &chunks[1..] {
        ada.chat().send_binary(chunk);
    }
    ada.send(&json!({"type": "fileEnd"}));
    let saved = ada.expect("fileSaved");
    assert_eq!(saved["offset"], 3, "{saved}");
    bob.wait_holds(3);
    check(b.port, &[&ada, &bob]);

    // The nodes share the upload directory: each serves what node a took.
    let url = saved["url"].as_str().unwrap();
    for node in [&a, &b, &c] {
        let (status, body) = get(node.port, url);
        assert_eq!(status, 200, "{url} from node {}: {}", node.name, String::from_utf8_lossy(&body));
        assert!(body == data, "the download from node {} is not the upload to node a", node.name);
    }
}

#[test]
fn a_client_reconnecting_to_another_node_recovers_exactly_what_it_missed() {
    let dir = test_dir("recovery");
    let Some(redis) = redis(&dir, Persistence::None) else { return };
    let (a, b) = (Node::start(&dir, "a", &redis.url()), Node::start(&dir, "b", &redis.url()));
    let (mut ada, mut bob, mut cy) = three_talking(a.port, b.port);
    bob.settle();
    let last_of_ada = ada.say();
    sentinel(&mut ada, &mut [&mut bob, &mut cy]);
    let acked_at = ada.acked[ada.texts.iter().find(|(_, t)| **t == last_of_ada).unwrap().0];

    // Ada goes away; the others go on.
    ada.disconnect();
    for member in [&mut bob, &mut cy] {
        assert_eq!(
            member.expect("userLeft"),
            json!({"type": "userLeft", "user": "ada", "room": "r", "userCount": 2})
        );
    }
    for _ in 0..4 {
        bob.say();
        cy.say();
    }
    let last = sentinel(&mut bob, &mut [&mut cy]);

    // She comes back to the other node: exactly what she missed, in order.
    let (epoch, since) = ada.position();
    let seen_before = ada.view.seen.len();
    let joined = ada.rejoin(b.port);
    assert_eq!(
        (&joined["epoch"], &joined["offset"], &joined["recovered"], &joined["missed"]),
        (&json!(epoch), &json!(last), &json!(true), &json!(last - since)),
        "{joined}"
    );
    ada.wait_holds(last);
    let replayed = ada.kept_after(seen_before);
    let sent: BTreeMap<u64, String> = [&bob, &cy]
        .iter()
        .flat_map(|m| m.view.seen.iter())
        .filter_map(|seen| match seen {
            Seen::Acked { offset, text, .. } if *offset > since => Some((*offset, text.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(replayed, sent.into_iter().collect::<Vec<_>>());

    // A resend of a message acknowledged through node a, sent to node b:
    // the same offset, and nobody receives it again.
    let ack = ada.resend(&last_of_ada);
    assert_eq!(ack["offset"], acked_at, "{ack}");
    let next = sentinel(&mut bob, &mut [&mut cy, &mut ada]);
    assert_eq!(next, last + 1, "the resend took an offset");
    check(a.port, &[&ada, &bob, &cy]);
}

#[test]
fn a_killed_nodes_members_leave_and_its_clients_recover_on_another_node() {
    let dir = test_dir("sigkill");
    let Some(redis) = redis(&dir, Persistence::None) else { return };
    let (mut a, b) = (Node::start(&dir, "a", &redis.url()), Node::start(&dir, "b", &redis.url()));
    b.wait_nodes(2);
    let mut a1 = Member::connect(a.port, "a1", "r");
    let mut a2 = Member::connect(a.port, "a2", "r");
    let mut b1 = Member::connect(b.port, "b1", "r");
    let mut b2 = Member::connect(b.port, "b2", "r");
    for member in [&mut a1, &mut a2, &mut b1, &mut b2] {
        member.join();
        member.say();
    }
    for member in [&mut a1, &mut a2, &mut b1] {
        member.settle();
    }
    sentinel(&mut b2, &mut [&mut a1, &mut a2, &mut b1]);

    // Node a's clients pour messages in; it is killed while they flow.
    for _ in 0..60 {
        a1.say();
        a2.say();
    }
    for _ in 0..20 {
        b1.say();
    }
    let before = b2.view.seen.len();
    while b2.kept_after(before).len() < 20 {
        b2.read();
    }
    a.kill();
    let killed = Instant::now();
    a1.read_until_closed();
    a2.read_until_closed();

    // Node b's members hear that a's left, within node_timeout or so.
    for member in [&mut b2, &mut b1] {
        let mut left = Vec::new();
        while left.len() < 2 {
            let event = member.expect("userLeft");
            left.push((event["user"].as_str().unwrap().to_owned(), event["userCount"].as_u64().unwrap()));
        }
        left.sort();
        assert!(
            left == [("a1".to_owned(), 2), ("a2".to_owned(), 3)]
                || left == [("a1".to_owned(), 3), ("a2".to_owned(), 2)],
            "{}: {left:?}",
            member.user
        );
    }
    let elapsed = killed.elapsed();
    assert!(elapsed < NODE_TIMEOUT * 2, "the dead node's members left after {elapsed:?}");
    b.wait_rooms(&[("r", 2)]);
    b1.settle();

    // Its clients come back to node b, recover, and resend what was not acknowledged.
    for member in [&mut a1, &mut a2] {
        let joined = member.rejoin(b.port);
        assert_eq!(joined["recovered"], true, "{}: {joined}", member.user);
        member.resend_unacked();
        member.settle();
    }
    sentinel(&mut b1, &mut [&mut a1, &mut a2, &mut b2]);
    let stream = check(b.port, &[&a1, &a2, &b1, &b2]);
    assert_eq!(stream.len(), 4 + 1 + 60 + 60 + 20 + 1, "every message sent exactly once");
}

#[test]
fn redis_restarted_without_persistence_means_unavailable_then_resync() {
    let dir = test_dir("redis-lost");
    let Some(mut redis) = redis(&dir, Persistence::None) else { return };
    let (a, b) = (Node::start(&dir, "a", &redis.url()), Node::start(&dir, "b", &redis.url()));
    let mut ada = Member::connect(a.port, "ada", "r");
    let mut bob = Member::connect(b.port, "bob", "r");
    ada.join();
    bob.join();
    for _ in 0..2 {
        ada.say();
        bob.say();
    }
    ada.settle();
    let last = sentinel(&mut bob, &mut [&mut ada]);
    let old = ada.position();
    assert_eq!(old.1, last);

    // Redis goes away: not ready, room messages refused, connections open.
    redis.kill();
    a.wait_ready(503);
    b.wait_ready(503);
    assert_eq!(
        serde_json::from_slice::<Value>(&get(a.port, "/api/status").1).unwrap()["cluster"]["redis"],
        "down"
    );
    ada.say();
    let refused = ada.expect_refusal();
    assert!(refused["retryAfterMs"].as_u64().is_some_and(|ms| ms > 0), "{refused}");
    bob.say();
    bob.expect_refusal();
    ada.send(&json!({"type": "ping", "timestamp": 1}));
    assert_eq!(ada.expect("pong")["timestamp"], 1);
    // A join works, without a position in the history.
    let mut dan = Member::connect(a.port, "dan", "r");
    let joined = dan.join();
    assert!(joined.get("epoch").is_none() && joined["userCount"] == 3, "{joined}");

    // It comes back empty: ready again, and every member is told to resync.
    redis.start_again().expect("redis-server starts again on its port");
    a.wait_ready(200);
    b.wait_ready(200);
    let resync = ada.expect("resync");
    assert_ne!(resync["epoch"], old.0.as_str(), "{resync}");
    assert_eq!(bob.expect("resync"), resync, "both nodes agree on the new epoch");
    assert_eq!(dan.expect("resync"), resync, "the member who joined meanwhile learns the epoch");
    a.wait_rooms(&[("r", 3)]);

    // The refused messages, sent again, are kept in the new epoch.
    ada.settle();
    bob.settle();
    sentinel(&mut ada, &mut [&mut bob, &mut dan]);
    let mut cy = Member::connect(b.port, "cy", "r");
    let joined = cy.join_since(old);
    assert_eq!(
        (&joined["recovered"], &joined["epoch"], joined.get("missed")),
        (&json!(false), &resync["epoch"], None),
        "{joined}"
    );
    let stream = check(a.port, &[&ada, &bob, &cy, &dan]);
    let new_epoch = resync["epoch"].as_str().unwrap();
    assert_eq!(stream.keys().filter(|(epoch, _)| epoch == new_epoch).count(), 3);
}

#[test]
fn redis_restarted_with_aof_always_loses_no_acknowledged_message() {
    let dir = test_dir("redis-aof");
    let Some(mut redis) = redis(&dir, Persistence::Aof) else { return };
    let (a, b) = (Node::start(&dir, "a", &redis.url()), Node::start(&dir, "b", &redis.url()));
    let (mut ada, mut bob, mut cy) = three_talking(a.port, b.port);
    ada.settle();
    sentinel(&mut bob, &mut [&mut ada, &mut cy]);
    cy.disconnect();

    // Redis is killed while messages flow, and started again on its files.
    for _ in 0..100 {
        ada.say();
        bob.say();
    }
    while ada.acked.len() < 3 + 1 + 10 {
        ada.read();
    }
    redis.kill();
    a.wait_ready(503);
    b.wait_ready(503);
    redis.start_again().expect("redis-server starts again on its port");
    a.wait_ready(200);
    b.wait_ready(200);

    // Senders resend what was refused; cy recovers exactly from its position.
    ada.settle();
    bob.settle();
    sentinel(&mut ada, &mut [&mut bob]);
    let joined = cy.rejoin(b.port);
    assert_eq!(joined["recovered"], true, "{joined}");
    let last = sentinel(&mut bob, &mut [&mut ada, &mut cy]);
    for member in [&ada, &bob, &cy] {
        let resyncs: Vec<&Value> = member.log.iter().filter(|e| e["type"] == "resync").collect();
        assert!(resyncs.is_empty(), "{}: resync after a restart that lost nothing: {resyncs:?}", member.user);
    }
    let stream = check(b.port, &[&ada, &bob, &cy]);
    assert_eq!(stream.len() as u64, last);
    assert_eq!(last, 6 + 1 + 200 + 1 + 1, "every message sent kept exactly once");
}

#[test]
fn a_node_cut_from_redis_catches_up_in_order_once_it_is_back() {
    let dir = test_dir("cut");
    let Some(redis) = redis(&dir, Persistence::None) else { return };
    let proxy = Proxy::start(redis.port());
    let (a, b) = (Node::start(&dir, "a", &redis.url()), Node::start(&dir, "b", &proxy.url()));
    let mut a1 = Member::connect(a.port, "a1", "r");
    let mut a2 = Member::connect(a.port, "a2", "r");
    let mut b1 = Member::connect(b.port, "b1", "r");
    let mut b2 = Member::connect(b.port, "b2", "r");
    for member in [&mut a1, &mut a2, &mut b1, &mut b2] {
        member.join();
        member.say();
    }
    for member in [&mut a1, &mut a2, &mut b1] {
        member.settle();
    }
    sentinel(&mut b2, &mut [&mut a1, &mut a2, &mut b1]);
    let seen_before = b2.view.seen.len();

    // Node b loses Redis; node a's members go on.
    proxy.cut();
    b.wait_ready(503);
    a.wait_ready(200);
    b1.say();
    b1.expect_refusal();
    for _ in 0..15 {
        a1.say();
        a2.say();
    }
    a1.settle();
    a2.settle();

    // Back: b's members get every message they missed, in order, then new ones.
    proxy.restore();
    b.wait_ready(200);
    for _ in 0..5 {
        a1.say();
    }
    a1.settle();
    b1.settle();
    let last = sentinel(&mut a2, &mut [&mut a1, &mut b1, &mut b2]);
    let caught_up: Vec<u64> = b2.kept_after(seen_before).iter().map(|(offset, _)| *offset).collect();
    assert_eq!(caught_up, (seen_before_offset(&b2, seen_before) + 1..=last).collect::<Vec<_>>());
    check(b.port, &[&a1, &a2, &b1, &b2]);
}

/// The newest offset `member` held after its first `n` things seen.
fn seen_before_offset(member: &Member, n: usize) -> u64 {
    member.view.seen[..n]
        .iter()
        .filter_map(|seen| match seen {
            Seen::Kept { offset, .. } | Seen::Acked { offset, .. } => Some(*offset),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn a_node_cut_for_longer_than_max_recover_tells_its_members_to_resync() {
    let dir = test_dir("cut-resync");
    let Some(redis) = redis(&dir, Persistence::None) else { return };
    let proxy = Proxy::start(redis.port());
    let a = Node::start(&dir, "a", &redis.url());
    let b = Node::start_with(&dir, "b", &proxy.url(), &[("HUBBUB_HISTORY_MAX_RECOVER", "10")]);
    let mut ada = Member::connect(a.port, "ada", "r");
    let mut bob = Member::connect(b.port, "bob", "r");
    ada.join();
    bob.join();
    bob.say();
    sentinel(&mut ada, &mut [&mut bob]);

    // More than node b may replay is published while it is cut off.
    proxy.cut();
    b.wait_ready(503);
    for _ in 0..11 {
        ada.say();
    }
    ada.settle();
    let newest = ada.position();
    proxy.restore();
    b.wait_ready(200);
    let resync = bob.expect("resync");
    assert_eq!(resync, json!({"type": "resync", "room": "r", "epoch": newest.0, "offset": newest.1}));
    // Live messages go on after the position it gave.
    let last = sentinel(&mut ada, &mut [&mut bob]);
    assert_eq!(last, newest.1 + 1);
    check(a.port, &[&ada, &bob]);
}

#[test]
fn a_node_stopped_with_sigterm_takes_its_members_out_at_once() {
    let dir = test_dir("sigterm");
    let Some(redis) = redis(&dir, Persistence::None) else { return };
    let (a, mut b) = (Node::start(&dir, "a", &redis.url()), Node::start(&dir, "b", &redis.url()));
    a.wait_nodes(2);
    let mut ada = Member::connect(a.port, "ada", "r");
    let mut bob = Member::connect(b.port, "bob", "r");
    let mut bea = Member::connect(b.port, "bea", "r");
    for member in [&mut ada, &mut bob, &mut bea] {
        member.join();
    }
    a.wait_rooms(&[("r", 3)]);

    // No lease runs out: the node leaves the cluster as it stops.
    let stopped = Instant::now();
    b.terminate();
    let mut left: Vec<Value> = (0..2).map(|_| ada.expect("userLeft")).collect();
    let elapsed = stopped.elapsed();
    left.sort_by_key(|event| event["user"].as_str().unwrap().to_owned());
    let counts: Vec<(&str, u64)> =
        left.iter().map(|e| (e["user"].as_str().unwrap(), e["userCount"].as_u64().unwrap())).collect();
    assert!(counts == [("bea", 2), ("bob", 1)] || counts == [("bea", 1), ("bob", 2)], "{counts:?}");
    assert!(elapsed < NODE_TIMEOUT - rig::CHECK_INTERVAL, "the members left {elapsed:?} after SIGTERM");
    a.wait_rooms(&[("r", 1)]);
    a.wait_nodes(1);
}
