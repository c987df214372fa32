//! The client crate against real sockets on loopback: the in-process
//! `hubbub-server`, small fake servers, and a WebSocket proxy that can refuse
//! connections, swallow acks or cut the link. Every wait is for an event,
//! with a timeout; timers run on paused time where the test is about them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hubbub_client::{
    Client, ClientConfig, ClientError, Event, EventStream, FileUpload, HeartbeatConfig, LinkEvent,
    LinkMonitor, ReconnectPolicy,
};
use hubbub_protocol::{ClientMessage, ServerMessage, decode_server};
use hubbub_server::test_support::TestServer;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// How long any single expected event may take before the test fails.
const WAIT: Duration = Duration::from_secs(10);

/// `hubbub-chat`, the terminal client, run as a process.
mod hubbub_chat;

fn uuid() -> String {
    hubbub_client::Uuid::new_v4().simple().to_string()
}

// ----- clients and their events ---------------------------------------------------

/// Reconnects quickly and forever, without jitter: what tests need.
fn fast() -> ClientConfig {
    ClientConfig {
        reconnect: ReconnectPolicy {
            initial_delay: Duration::from_millis(20),
            multiplier: 2.0,
            max_delay: Duration::from_millis(100),
            max_attempts: None,
            jitter: 0.0,
        },
        ..ClientConfig::default()
    }
}

/// An event stream that keeps everything it has read, so a test can wait
/// for one event and still check the others afterwards.
struct Recorder {
    events: EventStream,
    seen: Vec<Event>,
}

impl Recorder {
    /// Reads until an event matches `pick`, and returns what it picked.
    async fn until<T>(&mut self, what: &str, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
        let found = timeout(WAIT, async {
            loop {
                let event =
                    self.events.recv().await.unwrap_or_else(|| panic!("the stream ended before {what}"));
                let picked = pick(&event);
                self.seen.push(event);
                if let Some(picked) = picked {
                    return picked;
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no {what} in time; saw {:#?}", self.seen))
    }

    /// Waits for `Connected`; the URL it connected to.
    async fn connected(&mut self) -> String {
        self.until("Connected", |e| match e {
            Event::Connected { url, .. } => Some(url.clone()),
            _ => None,
        })
        .await
    }

    async fn joined(&mut self, room: &str) {
        self.until("RoomJoined", |e| {
            matches!(e, Event::RoomJoined { room: r, .. } if r == room).then_some(())
        })
        .await;
    }

    async fn acked(&mut self, id: hubbub_client::Uuid) {
        self.until("MessageAcked", |e| {
            matches!(e, Event::MessageAcked { client_msg_id, .. } if *client_msg_id == id).then_some(())
        })
        .await;
    }

    async fn disconnected(&mut self) -> u16 {
        self.until("Disconnected", |e| match e {
            Event::Disconnected { code, .. } => Some(*code),
            _ => None,
        })
        .await
    }

    async fn message(&mut self, text: &str) {
        self.until(text, |e| matches!(e, Event::Message { text: t, .. } if t == text).then_some(())).await;
    }

    /// Every room message seen so far, as `user: text`.
    fn messages(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter_map(|e| match e {
                Event::Message { user, text, .. } => Some(format!("{user}: {text}")),
                _ => None,
            })
            .collect()
    }
}

/// A client that has set its name and joined `room`.
async fn member(url: &str, name: &str, room: &str, config: ClientConfig) -> (Client, Recorder) {
    let (client, events) = Client::connect(url, config).await.unwrap();
    let mut recorder = Recorder { events, seen: Vec::new() };
    client.set_username(name).await.unwrap();
    client.join_room(room).await.unwrap();
    recorder.joined(room).await;
    (client, recorder)
}

// ----- a WebSocket proxy that misbehaves on request -----------------------------------

/// What the proxy does.
#[derive(Default)]
struct ProxyRules {
    /// Refuse new connections (accept the TCP connection and drop it).
    closed: bool,
    /// Drop `messageAck` frames on their way to the client.
    swallow_acks: bool,
    /// Cut the link, once, instead of forwarding the next `messageAck`.
    cut_on_ack: bool,
    /// Cut the link, once, after forwarding this many binary frames.
    cut_after_binary: Option<usize>,
    /// Binary frames forwarded to the server, in total.
    binary_forwarded: usize,
}

/// Sits between a client and the server, relaying WebSocket messages.
struct Proxy {
    addr: SocketAddr,
    rules: Arc<Mutex<ProxyRules>>,
    /// Bumped to cut every link relayed at the moment.
    cuts: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let rules = Arc::new(Mutex::new(ProxyRules::default()));
        let shared = rules.clone();
        let (cuts, cut) = tokio::sync::watch::channel(0);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                if shared.lock().unwrap().closed {
                    continue;
                }
                tokio::spawn(relay(tcp, upstream, shared.clone(), cut.clone()));
            }
        });
        Self { addr, rules, cuts }
    }

    /// Cuts every relayed link (without a close frame: 1006 for the
    /// client) and refuses new ones until `rules().closed` is cleared.
    fn cut_and_close(&self) {
        self.rules().closed = true;
        self.cuts.send_modify(|n| *n += 1);
    }

    fn url(&self) -> String {
        format!("ws://{}/ws/chat", self.addr)
    }

    fn rules(&self) -> std::sync::MutexGuard<'_, ProxyRules> {
        self.rules.lock().unwrap()
    }
}

async fn relay(
    tcp: tokio::net::TcpStream,
    upstream: SocketAddr,
    rules: Arc<Mutex<ProxyRules>>,
    mut cut: tokio::sync::watch::Receiver<u64>,
) {
    cut.mark_unchanged();
    let Ok(mut client) = tokio_tungstenite::accept_async(tcp).await else { return };
    let Ok((mut server, _)) = tokio_tungstenite::connect_async(format!("ws://{upstream}/ws/chat")).await
    else {
        return;
    };
    loop {
        tokio::select! {
            Ok(()) = cut.changed() => return,
            msg = client.next() => {
                let Some(Ok(msg)) = msg else { return };
                let binary = msg.is_binary();
                if !(msg.is_text() || binary || msg.is_close()) || server.send(msg).await.is_err() {
                    continue;
                }
                if binary {
                    let mut rules = rules.lock().unwrap();
                    rules.binary_forwarded += 1;
                    if rules.cut_after_binary == Some(rules.binary_forwarded) {
                        rules.cut_after_binary = None;
                        rules.closed = true;
                        return;
                    }
                }
            }
            msg = server.next() => {
                let Some(Ok(msg)) = msg else { return };
                if let Message::Text(text) = &msg && text.contains("\"messageAck\"") {
                    let mut rules = rules.lock().unwrap();
                    if rules.swallow_acks {
                        continue;
                    }
                    if std::mem::take(&mut rules.cut_on_ack) {
                        return;
                    }
                }
                if (msg.is_text() || msg.is_binary() || msg.is_close()) && client.send(msg).await.is_err() {
                    return;
                }
            }
        }
    }
}

// ----- delivery across reconnects -------------------------------------------------------

#[tokio::test]
async fn a_server_restart_loses_no_message_and_doubles_none() {
    let server = TestServer::start().await;
    let addr = server.addr;
    // Alice talks through the proxy, so the test decides when she is back.
    let proxy = Proxy::start(addr).await;
    let (_bob, mut bob) = member(&server.chat_url(), "bob", "general", fast()).await;
    let (alice, mut alice_events) = member(&proxy.url(), "alice", "general", fast()).await;

    // Acknowledged before the restart.
    for text in ["one", "two"] {
        let id = alice.send_message(text).await.unwrap();
        alice_events.acked(id).await;
    }
    // Delivered, but their acks never reach Alice: she must resend them, and
    // the new server has never seen their ids.
    proxy.rules().swallow_acks = true;
    let three = alice.send_message("three").await.unwrap();
    let four = alice.send_message("four").await.unwrap();
    bob.message("four").await;

    proxy.rules().closed = true;
    server.shutdown().await;
    assert_eq!(alice_events.disconnected().await, 1001);
    assert_eq!(bob.disconnected().await, 1001);
    // Typed while the server is down: queued.
    let five = alice.send_message("five").await.unwrap();
    let six = alice.send_message("six").await.unwrap();

    let server = TestServer::on(addr).await;
    assert_eq!(server.addr, addr);
    // Bob comes back on his own and is in the room again before Alice is.
    let since = bob.seen.len();
    bob.connected().await;
    assert!(
        bob.seen[since..]
            .iter()
            .any(|e| matches!(e, Event::RoomJoined { room, user_count: 1, .. } if room == "general")),
        "bob's room is restored before Connected: {:?}",
        &bob.seen[since..]
    );
    {
        let mut rules = proxy.rules();
        rules.swallow_acks = false;
        rules.closed = false;
    }
    let since = alice_events.seen.len();
    alice_events.connected().await;
    let restored = &alice_events.seen[since..];
    assert!(restored.contains(&Event::UsernameSet { username: "alice".into() }), "{restored:?}");
    assert!(restored.iter().any(|e| matches!(e, Event::RoomJoined { room, .. } if room == "general")));
    for id in [three, four, five, six] {
        alice_events.acked(id).await;
    }
    bob.message("six").await;
    // The server delivered the resent "three" and "four" again (it forgot
    // their ids); Bob's client showed them once.
    let expected: Vec<String> =
        ["one", "two", "three", "four", "five", "six"].iter().map(|t| format!("alice: {t}")).collect();
    assert_eq!(bob.messages(), expected);
    server.shutdown().await;
}

#[tokio::test]
async fn a_lost_ack_means_a_resend_that_the_room_sees_once() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    // Bob is a plain WebSocket client, so he sees exactly what the server
    // delivers, without the client library's de-duplication.
    let (mut bob, _) = tokio_tungstenite::connect_async(server.chat_url()).await.unwrap();
    for msg in [
        ClientMessage::SetUsername { username: "bob".into() },
        ClientMessage::JoinRoom { room: "general".into(), since: None },
    ] {
        bob.send(Message::text(msg.to_json())).await.unwrap();
    }
    let (alice, mut alice_events) = member(&proxy.url(), "alice", "general", fast()).await;

    // The server takes the message and acks it; the proxy cuts the link
    // instead of passing the ack on.
    proxy.rules().cut_on_ack = true;
    let id = alice.send_message("only once").await.unwrap();
    assert_eq!(alice_events.disconnected().await, 1006);
    alice_events.connected().await;
    alice_events.acked(id).await;
    let after = alice.send_message("after").await.unwrap();
    alice_events.acked(after).await;

    let mut texts = Vec::new();
    timeout(WAIT, async {
        while texts.last().map(String::as_str) != Some("after") {
            let Some(Ok(Message::Text(frame))) = bob.next().await else { continue };
            if let Ok(ServerMessage::ChatMessage { text, client_msg_id, .. }) = decode_server(&frame) {
                if text == "only once" {
                    assert_eq!(client_msg_id.map(|i| i.uuid()), Some(id), "the resend keeps its id");
                }
                texts.push(text);
            }
        }
    })
    .await
    .expect("bob got both messages");
    assert_eq!(texts, ["only once", "after"]);
    server.shutdown().await;
}

// ----- recovery and history --------------------------------------------------------------

/// Sends `texts` and waits for each one's ack: the room has kept them.
async fn say(client: &Client, events: &mut Recorder, texts: &[&str]) {
    for text in texts {
        let id = client.send_message(*text).await.unwrap();
        events.acked(id).await;
    }
}

/// The latest `RoomJoined` for `room` that `events` has seen: its
/// `(missed, epoch)`.
fn last_join(events: &Recorder, room: &str) -> (u64, Option<String>) {
    events
        .seen
        .iter()
        .rev()
        .find_map(|e| match e {
            Event::RoomJoined { room: r, missed, epoch, .. } if r == room => Some((*missed, epoch.clone())),
            _ => None,
        })
        .expect("a RoomJoined")
}

#[tokio::test]
async fn a_member_away_while_others_send_gets_exactly_what_it_missed_in_order_once() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    let (bob, mut bob_events) = member(&server.chat_url(), "bob", "general", fast()).await;
    let (_alice, mut alice) = member(&proxy.url(), "alice", "general", fast()).await;
    say(&bob, &mut bob_events, &["before"]).await;
    alice.message("before").await;

    proxy.cut_and_close();
    assert_eq!(alice.disconnected().await, 1006);
    // The server has seen her go: what follows is missed, not delivered.
    server.wait_for_connections(1).await;
    let missed: Vec<String> = (1..=5).map(|n| format!("missed {n}")).collect();
    say(&bob, &mut bob_events, &missed.iter().map(String::as_str).collect::<Vec<_>>()).await;

    // She comes back while Bob keeps talking.
    let live: Vec<String> = (1..=10).map(|n| format!("live {n}")).collect();
    let talking = {
        let (bob, live) = (bob.clone(), live.clone());
        tokio::spawn(async move {
            for text in live {
                bob.send_message(text).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    proxy.rules().closed = false;
    alice.connected().await;
    alice.message("live 10").await;
    talking.await.unwrap();

    let (replayed, _) = last_join(&alice, "general");
    assert!(replayed >= 5, "the five missed ones at least are replayed: {replayed}");
    assert!(!alice.seen.iter().any(|e| matches!(e, Event::RecoveryFailed { .. })), "{:#?}", alice.seen);
    let expected: Vec<String> = std::iter::once("before")
        .chain(missed.iter().map(String::as_str))
        .chain(live.iter().map(String::as_str))
        .map(|t| format!("bob: {t}"))
        .collect();
    assert_eq!(alice.messages(), expected, "each once, in order");
    // Offsets are the room's, one after the other.
    let offsets: Vec<u64> = alice
        .seen
        .iter()
        .filter_map(|e| match e {
            Event::Message { offset, .. } => *offset,
            _ => None,
        })
        .collect();
    assert_eq!(offsets, (1..=16).collect::<Vec<u64>>());
    server.shutdown().await;
}

#[tokio::test]
async fn recovery_survives_a_restart_on_the_same_history_and_a_lost_one_is_reported() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    let (bob, mut bob_events) = member(&server.chat_url(), "bob", "general", fast()).await;
    let (alice_client, mut alice) = member(&proxy.url(), "alice", "general", fast()).await;
    say(&bob, &mut bob_events, &["one"]).await;
    alice.message("one").await;
    let (_, epoch) = last_join(&alice, "general");

    // The server restarts on its history while Alice stays away; Bob talks.
    proxy.cut_and_close();
    let server = server.restart().await;
    bob_events.connected().await;
    say(&bob, &mut bob_events, &["two"]).await;
    proxy.rules().closed = false;
    alice.connected().await;
    alice.message("two").await;
    let (missed, same_epoch) = last_join(&alice, "general");
    assert_eq!((missed, &same_epoch), (1, &epoch), "recovered across the restart");
    assert_eq!(alice.messages(), ["bob: one", "bob: two"]);

    // A server that starts on a new, empty history: another epoch, and
    // recovery fails; the application is told, and can fetch what there is.
    proxy.cut_and_close();
    let addr = server.addr;
    server.shutdown().await;
    let server = TestServer::on(addr).await;
    bob_events.connected().await;
    say(&bob, &mut bob_events, &["three"]).await;
    proxy.rules().closed = false;
    let failed = alice
        .until("RecoveryFailed", |e| match e {
            Event::RecoveryFailed { room, epoch, offset } => Some((room.clone(), epoch.clone(), *offset)),
            _ => None,
        })
        .await;
    assert_eq!(failed.0, "general");
    assert_ne!(Some(failed.1), epoch, "a new epoch");
    assert_eq!(failed.2, 1, "bob's one message is there");
    alice.connected().await;
    let page = alice_client.history(Some(failed.2 + 1), 10).await.unwrap();
    assert_eq!(page.messages.len(), 1);
    assert!(matches!(&page.messages[0], Event::Message { text, .. } if text == "three"));
    assert!(!page.has_more);
    say(&bob, &mut bob_events, &["four"]).await;
    alice.message("four").await;
    assert_eq!(alice.messages(), ["bob: one", "bob: two", "bob: four"], "three came by history only");
    server.shutdown().await;
}

#[tokio::test]
async fn history_pages_back_to_the_first_message() {
    let server = TestServer::start().await;
    let (bob, mut bob_events) = member(&server.chat_url(), "bob", "general", fast()).await;
    let texts: Vec<String> = (1..=7).map(|n| format!("m{n}")).collect();
    say(&bob, &mut bob_events, &texts.iter().map(String::as_str).collect::<Vec<_>>()).await;

    let (alice, _alice_events) = member(&server.chat_url(), "alice", "general", fast()).await;
    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let page = alice.history(before, 3).await.unwrap();
        assert_eq!(page.room, "general");
        let texts: Vec<String> = page
            .messages
            .iter()
            .map(|e| match e {
                Event::Message { text, .. } => text.clone(),
                other => panic!("only messages here: {other:?}"),
            })
            .collect();
        pages.push(texts);
        match page.next_before() {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, [vec!["m5", "m6", "m7"], vec!["m2", "m3", "m4"], vec!["m1"]]);

    assert!(matches!(alice.history(None, 0).await, Err(ClientError::InvalidHistoryLimit { .. })));
    alice.leave_room().await.unwrap();
    assert!(matches!(alice.history(None, 5).await, Err(ClientError::NotInRoom)));
    server.shutdown().await;
}

// ----- reconnect policy, disconnect, offline queue --------------------------------------

/// A server that greets one client, closes it with 1001, and from then on
/// drops every connection before the WebSocket handshake. Counts the
/// connections it dropped.
async fn server_that_goes_away() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws/chat", listener.local_addr().unwrap());
    let dropped = Arc::new(AtomicUsize::new(0));
    let count = dropped.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let hello = [
            ServerMessage::Welcome { message: "hi".into() },
            ServerMessage::Connected { client_id: hubbub_client::Uuid::new_v4() },
        ];
        for msg in hello {
            ws.send(Message::text(msg.to_json())).await.unwrap();
        }
        ws.close(Some(CloseFrame { code: CloseCode::Away, reason: "bye".into() })).await.unwrap();
        while ws.next().await.is_some() {}
        drop(ws);
        drop_every_connection(listener, count).await;
    });
    (url, dropped)
}

/// Accepts connections and drops them at once (the WebSocket handshake
/// fails), counting them.
async fn drop_every_connection(listener: TcpListener, count: Arc<AtomicUsize>) {
    while let Ok((tcp, _)) = listener.accept().await {
        count.fetch_add(1, Ordering::SeqCst);
        drop(tcp);
    }
}

/// The reconnect policy of the backoff tests: 1 s doubling up to 5 s, five
/// attempts, no jitter.
fn five_attempts() -> ClientConfig {
    ClientConfig {
        reconnect: ReconnectPolicy {
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(5),
            max_attempts: Some(5),
            jitter: 0.0,
        },
        heartbeat: None,
        ..ClientConfig::default()
    }
}

/// Reads events to the end of the stream, each with when it came (from the
/// first), and checks them against the schedule of [`five_attempts`].
async fn assert_five_attempts_schedule(events: &mut EventStream) {
    let mut schedule = Vec::new();
    let start = Instant::now();
    while let Some(event) = events.recv().await {
        schedule.push((event, Instant::now() - start));
    }
    let secs = Duration::from_secs;
    let reconnecting = |attempt, delay| Event::Reconnecting { attempt, delay: secs(delay) };
    assert_eq!(
        schedule,
        [
            (reconnecting(1, 1), secs(0)),
            (reconnecting(2, 2), secs(1)),
            (reconnecting(3, 4), secs(3)),
            (reconnecting(4, 5), secs(7)),
            (reconnecting(5, 5), secs(12)),
            (Event::GaveUp { attempts: 5 }, secs(17)),
        ],
        "each attempt waits its delay, and the stream ends after the last"
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_delays_follow_the_policy() {
    let (url, dropped) = server_that_goes_away().await;
    let (_client, mut events) = Client::connect(url, five_attempts()).await.unwrap();
    assert!(matches!(events.recv().await, Some(Event::Connected { .. })));
    assert_eq!(events.recv().await, Some(Event::Disconnected { code: 1001, reason: "bye".into() }));
    assert_five_attempts_schedule(&mut events).await;
    assert_eq!(dropped.load(Ordering::SeqCst), 5, "one connect per attempt");
}

#[tokio::test]
async fn a_full_offline_queue_is_an_error_and_disconnect_stops_the_retries() {
    let (url, _) = server_that_goes_away().await;
    let config = ClientConfig {
        // The first attempt is far away: the client stays offline.
        reconnect: ReconnectPolicy {
            initial_delay: Duration::from_secs(600),
            max_delay: Duration::from_secs(600),
            ..fast().reconnect
        },
        queue_capacity: 3,
        ..ClientConfig::default()
    };
    let (client, events) = Client::connect(url, config).await.unwrap();
    let mut events = Recorder { events, seen: Vec::new() };
    assert_eq!(events.disconnected().await, 1001);
    events.until("Reconnecting", |e| matches!(e, Event::Reconnecting { attempt: 1, .. }).then_some(())).await;

    client.join_room("general").await.unwrap();
    client.send_message("one").await.unwrap();
    client.send_message("two").await.unwrap();
    let full = client.send_message("three").await.unwrap_err();
    assert!(matches!(full, ClientError::QueueFull { capacity: 3 }), "{full:?}");
    assert!(matches!(client.send_typing().await, Err(ClientError::NotConnected)));

    client.disconnect().await;
    assert_eq!(timeout(WAIT, events.events.recv()).await.unwrap(), None, "no more attempts");
    assert!(client.is_closed());
    assert!(matches!(client.send_message("late").await, Err(ClientError::Closed)));
}

#[tokio::test]
async fn disconnect_closes_normally_and_never_reconnects() {
    let server = TestServer::start().await;
    let (client, mut events) = member(&server.chat_url(), "ada", "general", fast()).await;
    client.ping().await.unwrap();
    let rtt =
        events.until("Latency", |e| if let Event::Latency { rtt } = e { Some(*rtt) } else { None }).await;
    assert!(rtt < WAIT);
    client.disconnect().await;
    assert_eq!(events.disconnected().await, 1000);
    assert_eq!(timeout(WAIT, events.events.recv()).await.unwrap(), None, "the stream ends");
    server.wait_for_connections(0).await;
    assert!(client.is_closed());
    server.shutdown().await;
}

// ----- several servers ------------------------------------------------------------------

/// A URL on loopback where nothing listens: connects are refused at once.
async fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws/chat", listener.local_addr().unwrap());
    drop(listener);
    url
}

/// A server that greets every connection (`welcome`, `connected`) and then
/// only reads: enough for a client with nothing to restore to be connected.
async fn greeter() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws/chat", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { return };
                let hello = [
                    ServerMessage::Welcome { message: "hi".into() },
                    ServerMessage::Connected { client_id: hubbub_client::Uuid::new_v4() },
                ];
                for msg in hello {
                    if ws.send(Message::text(msg.to_json())).await.is_err() {
                        return;
                    }
                }
                while let Some(Ok(_)) = ws.next().await {}
            });
        }
    });
    url
}

#[tokio::test]
async fn a_client_given_a_dead_server_first_connects_to_the_live_one() {
    let server = TestServer::start().await;
    let dead = closed_port_url().await;
    let (client, events) = Client::connect_any([dead.clone(), server.chat_url()], fast()).await.unwrap();
    let mut events = Recorder { events, seen: Vec::new() };
    assert_eq!(events.connected().await, server.chat_url());
    client.set_username("ada").await.unwrap();
    client.join_room("general").await.unwrap();
    events.joined("general").await;
    let id = client.send_message("through the live one").await.unwrap();
    events.acked(id).await;

    // No server answers: one error that says why for each, in order.
    let other = closed_port_url().await;
    let err = Client::connect_any([dead.clone(), other.clone()], fast()).await.unwrap_err();
    let ClientError::Unreachable { failures } = &err else { panic!("{err:?}") };
    assert!(
        matches!(&failures[..], [ClientError::Connect { url: a, .. }, ClientError::Connect { url: b, .. }]
            if *a == dead && *b == other),
        "{failures:?}"
    );
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("no server could be reached: could not connect to {dead}: ")),
        "{message}"
    );
    assert!(message.contains(&format!("; could not connect to {other}: ")), "{message}");
    // One URL keeps its own error; none at all is a mistake.
    let err = Client::connect_any([dead.clone()], fast()).await.unwrap_err();
    assert!(matches!(&err, ClientError::Connect { url, .. } if *url == dead), "{err:?}");
    let err = Client::connect_any(Vec::<String>::new(), fast()).await.unwrap_err();
    assert!(matches!(err, ClientError::NoServerUrl), "{err:?}");
    let err = Client::connect_any([server.chat_url(), "localhost:1".into()], fast()).await.unwrap_err();
    assert!(matches!(&err, ClientError::InvalidUrl { url, .. } if url == "localhost:1"), "{err:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_whose_server_shuts_down_moves_to_the_next_one_and_rejoins() {
    // Two nodes that do not share history: this is about the move and the
    // rejoin, not about recovering messages across nodes.
    let a = TestServer::start().await;
    let b = TestServer::start().await;
    let (_bob, mut bob) = member(&b.chat_url(), "bob", "general", fast()).await;
    let (alice, events) = Client::connect_any([a.chat_url(), b.chat_url()], fast()).await.unwrap();
    let mut alice_events = Recorder { events, seen: Vec::new() };
    assert_eq!(alice_events.connected().await, a.chat_url());
    alice.set_username("alice").await.unwrap();
    alice.join_room("general").await.unwrap();
    alice_events.joined("general").await;

    a.shutdown().await;
    assert_eq!(alice_events.disconnected().await, 1001);
    // Written while she moves (or just after): delivered on B either way.
    let id = alice.send_message("moved to b").await.unwrap();
    let since = alice_events.seen.len();
    assert_eq!(alice_events.connected().await, b.chat_url());
    let restored = &alice_events.seen[since..];
    assert!(restored.contains(&Event::UsernameSet { username: "alice".into() }), "{restored:?}");
    assert!(
        restored
            .iter()
            .any(|e| matches!(e, Event::RoomJoined { room, user_count: 2, .. } if room == "general")),
        "back in the room, on B with bob, before Connected: {restored:?}"
    );
    alice_events.acked(id).await;
    bob.until("alice joining", |e| {
        matches!(e, Event::UserJoined { user, .. } if user == "alice").then_some(())
    })
    .await;
    bob.message("moved to b").await;
    b.shutdown().await;
}

/// A server that accepts WebSocket connections and closes each at once
/// with 1013 (try again later), before any greeting: overloaded.
async fn server_that_turns_everyone_away() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws/chat", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { return };
                let busy = CloseFrame { code: CloseCode::Again, reason: "busy".into() };
                if ws.close(Some(busy)).await.is_ok() {
                    while ws.next().await.is_some() {}
                }
            });
        }
    });
    url
}

#[tokio::test(start_paused = true)]
async fn a_dead_server_in_the_list_costs_a_failed_connect_not_a_backoff() {
    let (going, _) = server_that_goes_away().await;
    let (dead, busy, live) =
        (closed_port_url().await, server_that_turns_everyone_away().await, greeter().await);
    let (_client, mut events) =
        Client::connect_any([going.clone(), dead, busy, live.clone()], five_attempts()).await.unwrap();
    assert!(matches!(events.recv().await, Some(Event::Connected { url, .. }) if url == going));
    assert_eq!(events.recv().await, Some(Event::Disconnected { code: 1001, reason: "bye".into() }));
    let start = Instant::now();
    let delay = Duration::from_secs(1);
    assert_eq!(events.recv().await, Some(Event::Reconnecting { attempt: 1, delay }));
    // The next in the list is dead, and the one after it closes the link
    // before it is live; the last one answers, all in the same attempt,
    // with no second delay.
    assert_eq!(events.recv().await, Some(Event::Disconnected { code: 1013, reason: "busy".into() }));
    let connected = events.recv().await;
    assert!(matches!(&connected, Some(Event::Connected { url, .. }) if *url == live), "{connected:?}");
    assert_eq!(Instant::now() - start, delay);
}

#[tokio::test(start_paused = true)]
async fn the_backoff_comes_once_per_round_through_the_servers() {
    let (going, going_dropped) = server_that_goes_away().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dropping = format!("ws://{}/ws/chat", listener.local_addr().unwrap());
    let dropping_dropped = Arc::new(AtomicUsize::new(0));
    tokio::spawn(drop_every_connection(listener, dropping_dropped.clone()));
    let (_client, mut events) = Client::connect_any([going, dropping], five_attempts()).await.unwrap();
    assert!(matches!(events.recv().await, Some(Event::Connected { .. })));
    assert_eq!(events.recv().await, Some(Event::Disconnected { code: 1001, reason: "bye".into() }));
    // The same schedule as with one server: two servers down cost no more
    // waiting than one.
    assert_five_attempts_schedule(&mut events).await;
    let tries = (going_dropped.load(Ordering::SeqCst), dropping_dropped.load(Ordering::SeqCst));
    assert_eq!(tries, (5, 5), "each attempt tried each server once");
}

// ----- file upload ------------------------------------------------------------------------

#[tokio::test]
async fn an_upload_cut_by_a_lost_link_resumes_with_the_missing_chunks() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    let (_bob, mut bob) = member(&server.chat_url(), "bob", "general", fast()).await;
    let (alice, mut alice_events) = member(&proxy.url(), "alice", "general", fast()).await;

    // Five 64 KiB chunks (the last one short); the link is cut after two.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
    proxy.rules().cut_after_binary = Some(2);
    let transfer = alice.send_file(FileUpload::from_bytes("photo.png", data.clone())).await.unwrap();
    assert_eq!(alice_events.disconnected().await, 1006);
    // The server parks the upload when it sees the connection go.
    server.wait_for_connections(1).await;
    proxy.rules().closed = false;

    let saved = alice_events
        .until("FileSaved", |e| match e {
            Event::FileSaved { transfer_id, sha256, size, name, .. } => {
                Some((transfer_id.clone(), sha256.clone(), *size, name.clone()))
            }
            Event::FileFailed { message, .. } => panic!("upload failed: {message}"),
            _ => None,
        })
        .await;
    let expected_sha = {
        use sha2::Digest;
        sha2::Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    assert_eq!(saved, (transfer, expected_sha, 300_000, "photo.png".to_owned()));
    assert_eq!(proxy.rules().binary_forwarded, 5, "only the three missing chunks were sent again");
    let shared = bob
        .until("FileShared", |e| match e {
            Event::FileShared { user, name, .. } => Some((user.clone(), name.clone())),
            _ => None,
        })
        .await;
    assert_eq!(shared, ("alice".to_owned(), "photo.png".to_owned()));
    server.shutdown().await;
}

// ----- the terminal client --------------------------------------------------------------

#[tokio::test]
async fn the_terminal_client_chats_and_uploads_through_pipes() {
    let server = TestServer::start().await;
    let (bob, mut bob_events) = member(&server.chat_url(), "bob", "general", fast()).await;
    let file = std::env::temp_dir().join(format!("hubbub-chat-{}.txt", uuid()));
    std::fs::write(&file, "file contents\n".repeat(100)).unwrap();

    let mut chat = tokio::process::Command::new(env!("CARGO_BIN_EXE_hubbub-chat"))
        .args([&server.chat_url(), "--name", "carol", "--room", "general"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = chat.stdin.take().unwrap();
    let mut stdout = tokio::io::BufReader::new(chat.stdout.take().unwrap()).lines();
    bob_events
        .until("carol joining", |e| {
            matches!(e, Event::UserJoined { user, .. } if user == "carol").then_some(())
        })
        .await;

    let input = format!("hello from a pipe\n  spaced:  text \n/send {}\n//slash\n", file.display());
    stdin.write_all(input.as_bytes()).await.unwrap();
    bob_events.message("/slash").await;
    let expected = ["carol: hello from a pipe", "carol:   spaced:  text ", "carol: /slash"];
    assert_eq!(bob_events.messages(), expected);
    let file_shared = |e: &Event| match e {
        Event::FileShared { user, size, .. } => Some((user.clone(), *size)),
        _ => None,
    };
    // The upload and the last line race to the room; either may be first.
    let shared = match bob_events.seen.iter().find_map(file_shared) {
        Some(shared) => shared,
        None => bob_events.until("FileShared", file_shared).await,
    };
    assert_eq!(shared, ("carol".to_owned(), 1400));

    bob.send_message("hi carol: colons: kept").await.unwrap();
    let line = timeout(WAIT, stdout.next_line()).await.expect("a line in time").unwrap();
    assert_eq!(line.as_deref(), Some("bob: hi carol: colons: kept"), "plain NAME: TEXT, no escapes");

    drop(stdin);
    let status = timeout(WAIT, chat.wait()).await.expect("exits after input ends").unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(timeout(WAIT, stdout.next_line()).await.unwrap().unwrap(), None, "nothing else on stdout");
    let _ = std::fs::remove_file(&file);
    server.shutdown().await;
}

// ----- the heartbeat monitor ---------------------------------------------------------------

/// A fake server that answers the first `answered` app-level pings with a
/// `pong`, then keeps the connection open but answers nothing.
async fn fake_server(answered: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws/chat", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let mut seen = 0;
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(text) = msg else { continue };
            let ping = decode_client(&text);
            if let ClientMessage::Ping { timestamp } = ping {
                seen += 1;
                if seen <= answered {
                    let pong = ServerMessage::Pong { timestamp, server_time: 0 };
                    ws.send(Message::text(pong.to_json())).await.unwrap();
                }
            }
        }
    });
    url
}

#[tokio::test]
async fn a_link_the_heartbeat_finds_dead_is_reconnected() {
    // The server greets nobody and stops answering pings after the first.
    let url = fake_server(1).await;
    let heartbeat =
        HeartbeatConfig { interval: Duration::from_millis(50), timeout: Duration::from_millis(200) };
    let config = ClientConfig { heartbeat: Some(heartbeat), ..fast() };
    let (_client, events) = Client::connect(url, config).await.unwrap();
    let mut events = Recorder { events, seen: Vec::new() };
    let reason = events
        .until("Disconnected", |e| match e {
            Event::Disconnected { code: 1006, reason } => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert_eq!(reason, "the server stopped answering pings");
    events.until("Reconnecting", |e| matches!(e, Event::Reconnecting { attempt: 1, .. }).then_some(())).await;
}

fn decode_client(text: &str) -> ClientMessage {
    hubbub_protocol::decode_client(text, &hubbub_protocol::Limits::default()).unwrap()
}

#[tokio::test]
async fn the_monitor_declares_the_link_dead_when_pongs_stop() {
    let url = fake_server(3).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let config = HeartbeatConfig { interval: Duration::from_millis(50), timeout: Duration::from_millis(200) };
    let mut link = LinkMonitor::new(config);
    let mut pings = 0;
    let verdict = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            tokio::select! {
                event = link.next_event() => match event {
                    LinkEvent::SendPing(ping) => {
                        pings += 1;
                        ws.send(Message::text(ping.to_json())).await.unwrap();
                    }
                    LinkEvent::Dead => return,
                },
                Some(Ok(Message::Text(text))) = ws.next() => {
                    link.on_message(&decode_server(&text).unwrap());
                }
            }
        }
    })
    .await;
    assert!(verdict.is_ok(), "the dead link was noticed");
    assert_eq!(pings, 4, "three pings answered, the fourth never");
    let latency = link.latency().expect("answered pings were measured");
    assert!(latency.last < Duration::from_millis(200));
}

// ----- wss:// --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_works_with_an_extra_trusted_certificate_authority() {
    let dir = std::env::temp_dir().join(format!("hubbub-client-tls-{}", uuid()));
    std::fs::create_dir_all(&dir).unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).unwrap();

    let mut config = TestServer::config();
    config.tls = Some(hubbub_server::TlsSettings {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        handshake_timeout: Duration::from_secs(5),
        max_pending_handshakes: 64,
    });
    let server = TestServer::with(config).await;
    let url = format!("wss://localhost:{}/ws/chat", server.addr.port());

    // Without the extra authority the self-signed certificate is refused.
    let refused = Client::connect(&url, fast()).await.unwrap_err();
    assert!(matches!(refused, hubbub_client::ClientError::Connect { .. }), "{refused}");

    let trusting = ClientConfig { extra_ca_file: Some(dir.join("cert.pem")), ..fast() };
    let (ada, _ada_events) = member(&url, "ada", "tls", trusting.clone()).await;
    let (_bob, mut bob_events) = member(&url, "bob", "tls", trusting).await;
    ada.send_message("over TLS").await.unwrap();
    bob_events.message("over TLS").await;

    let missing = ClientConfig { extra_ca_file: Some(dir.join("nope.pem")), ..fast() };
    let err = Client::connect(&url, missing).await.unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");

    server.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}
