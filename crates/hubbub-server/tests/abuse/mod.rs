//! What a hostile client can no longer do to everyone else (issue 14): each
//! test reproduces one finding through real sockets and checks the limit
//! that now stops it. Extra client addresses are other loopback addresses
//! (127.0.0.2 and up), which Linux routes to the same host.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use super::{ChatClients, Client, TestServer, WAIT, http_get, raw_peer};

/// A TCP connection to `addr` from the loopback address `from`.
async fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// A chat client connected from the loopback address `from`, greeted.
pub(super) async fn chat_from(from: &str, addr: SocketAddr) -> Client {
    let tcp = connect_from(from, addr).await;
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws/chat"), MaybeTlsStream::Plain(tcp))
        .await
        .unwrap();
    let mut client = Client { ws };
    client.greeting().await;
    client
}

/// Whether the server closes `tcp` (end of stream or reset) within `limit`.
async fn ends_within(tcp: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0_u8; 512];
    timeout(limit, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

// Finding 1: the outbound queue is bounded in bytes, not only in frames.
#[tokio::test]
async fn a_member_that_never_reads_is_dropped_once_its_queue_holds_too_many_bytes() {
    let mut config = TestServer::config();
    // Frames alone would allow 10,000 messages of 4 KB (40 MB) to wait.
    config.websocket.outbound_queue = 10_000;
    config.websocket.outbound_queue_bytes = 64 << 10;
    config.rate_limit.lobby_burst_bytes = 32 << 10;
    config.rate_limit.enabled = false;
    let server = TestServer::with(config).await;
    let mut slow = Client::connect_small_window(server.addr, "/ws/chat").await;
    slow.greeting().await;
    slow.send(json!({"type": "joinRoom", "room": "r"})).await;
    slow.recv_type("userJoined").await;
    slow.recv_type("roomJoined").await;
    let mut sender = server.in_room("sender", "r").await;
    let text = "x".repeat(4000);
    let mut sent = 0;
    // The sender hears `userLeft` once the slow member is dropped; the only
    // other frames it gets are the echoes of nothing (it is the sender).
    let dropped = loop {
        sender.send(json!({"type": "chatMessage", "text": text})).await;
        sent += 1;
        if sent % 16 == 0 {
            sender.send(json!({"type": "ping", "timestamp": sent})).await;
            let reply = sender.recv().await;
            if reply["type"] == "userLeft" {
                break sent;
            }
            assert_eq!(reply["type"], "pong", "{reply}");
        }
        assert!(sent < 2_000, "the member that never reads was not dropped after {sent} messages of 4 KB");
    };
    // 64 KiB of queue plus what the sockets hold; far below 10,000 frames.
    assert!(dropped < 2_000);
    let status = server.status().await;
    assert_eq!(status["slowConsumersDropped"], 1, "{status}");
    server.shutdown().await;
}

// Finding 9: a client that reads promptly is not dropped for a burst of
// frames that each get a reply.
#[tokio::test]
async fn a_burst_of_pings_from_a_client_that_reads_everything_is_answered_in_full() {
    let server = TestServer::start().await;
    let mut tcp = raw_peer(server.addr, &[]).await;
    const PINGS: usize = 3_000;
    // Empty masked pings (FIN + ping, mask bit, zero key), in one write.
    let burst: Vec<u8> = (0..PINGS).flat_map(|_| [0x89_u8, 0x80, 0, 0, 0, 0]).collect();
    tcp.write_all(&burst).await.unwrap();
    let mut pongs = 0;
    let mut buf = vec![0_u8; 64 << 10];
    let mut pending = Vec::new();
    while pongs < PINGS {
        let n = timeout(WAIT, tcp.read(&mut buf)).await.expect("frames in time").unwrap();
        assert!(n > 0, "the server closed the connection after {pongs} pongs");
        pending.extend_from_slice(&buf[..n]);
        // Walk whole frames: every server frame here is short (< 126).
        let mut at = 0;
        while pending.len() >= at + 2 && pending.len() >= at + 2 + usize::from(pending[at + 1]) {
            let (opcode, len) = (pending[at] & 0x0f, usize::from(pending[at + 1]));
            assert_ne!(opcode, 0x8, "closed after {pongs} pongs: {:?}", &pending[at..at + 2 + len]);
            if opcode == 0xa {
                pongs += 1;
            }
            at += 2 + len;
        }
        pending.drain(..at);
    }
    assert_eq!(pongs, PINGS);
    server.shutdown().await;
}

// Finding 9: binary frames with no upload are charged to the control limit.
#[tokio::test]
async fn binary_frames_without_an_upload_are_rate_limited() {
    let mut config = TestServer::config();
    // The burst (40) and, however slow the machine, no refill.
    config.rate_limit.control_per_sec = 0.001;
    let server = TestServer::with(config).await;
    let mut c = server.chat().await;
    c.greeting().await;
    for _ in 0..60 {
        c.ws.send(Message::Binary(Bytes::from_static(&[0, 0, 0, 0, 1, 2, 3]))).await.unwrap();
    }
    let (mut no_upload, mut limited) = (0, 0);
    while no_upload + limited < 60 {
        let msg = c.recv_type("error").await;
        match msg["code"].as_str().unwrap() {
            "noUpload" => no_upload += 1,
            "rateLimited" => limited += 1,
            other => panic!("unexpected error {other}"),
        }
    }
    // The default control burst is 40.
    assert_eq!(no_upload, 40);
    assert_eq!(limited, 20);
    server.shutdown().await;
}

// Finding 2: connections that never send a request are closed, and the caps
// keep one address from taking every descriptor.
#[tokio::test]
async fn silent_connections_are_capped_per_address_and_timed_out() {
    let mut config = TestServer::config();
    config.http.header_read_timeout = Duration::from_secs(2);
    config.http.max_connections_per_ip = 5;
    let server = TestServer::with(config).await;
    // Each silent connection is watched from the moment it opens: when does
    // the server close it?
    let opened = tokio::time::Instant::now();
    let mut watchers = Vec::new();
    for _ in 0..10 {
        let mut tcp = connect_from("127.0.0.2", server.addr).await;
        watchers.push(tokio::spawn(async move {
            assert!(ends_within(&mut tcp, WAIT).await, "a silent connection outlived the header timeout");
            opened.elapsed()
        }));
    }
    // While they hold their places, another address is served.
    let (status, body) = http_get(server.addr, "/health").await;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "OK"));
    let mut chat = server.named("ada").await;
    // Beyond the per-address cap, connections are closed at once; the rest
    // after the header timeout (2 s): well apart, whatever the machine's load.
    let mut lifetimes = Vec::new();
    for watcher in watchers {
        lifetimes.push(watcher.await.unwrap());
    }
    let at_once = lifetimes.iter().filter(|t| **t < Duration::from_secs(1)).count();
    assert_eq!(at_once, 5, "the connections over the per-address cap are closed at once: {lifetimes:?}");
    assert!(lifetimes.iter().all(|t| *t < Duration::from_secs(1) || *t >= Duration::from_millis(1900)));
    // A request dribbled slower than the timeout is cut off too.
    let mut dribble = connect_from("127.0.0.3", server.addr).await;
    let started = tokio::time::Instant::now();
    let request = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n";
    let mut closed = false;
    for byte in request {
        if dribble.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        if ends_within(&mut dribble, Duration::from_millis(100)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "a dribbled request was served");
    assert!(started.elapsed() < WAIT);
    // An idle keep-alive connection is closed after the same timeout.
    let mut idle = connect_from("127.0.0.4", server.addr).await;
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
    assert!(ends_within(&mut idle, WAIT).await, "an idle keep-alive connection stayed open");
    // The chat connection upgraded before the timeout and is unaffected.
    chat.expect_nothing_pending().await;
    let metrics = http_get(server.addr, "/metrics").await.1;
    assert!(metrics.contains("hubbub_connections_refused_total{reason=\"address_full\"} 5"), "{metrics}");
    server.shutdown().await;
}

// Finding 3: one address flooding silent TLS connections cannot lock other
// clients out of the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_flood_from_one_address_leaves_room_for_others() {
    let dir = super::tls_dir();
    let (cert, key, ca) = super::self_signed(&dir);
    let mut config = TestServer::config();
    config.tls = Some(hubbub_server::TlsSettings {
        cert,
        key,
        handshake_timeout: Duration::from_secs(5),
        max_pending_handshakes: 16,
    });
    config.http.max_connections_per_ip = 8;
    let server = TestServer::with(config).await;
    let mut flood = Vec::new();
    for _ in 0..40 {
        flood.push(connect_from("127.0.0.2", server.addr).await);
    }
    for _ in 0..5 {
        let (mut client, _) = super::connect_tls(server.addr, "/ws/chat", &ca).await;
        client.greeting().await;
    }
    drop(flood);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

// Finding 5: a lobby flood is refused at its source; readers that keep up
// are never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lobby_flood_is_refused_at_its_source_and_readers_stay() {
    let server = TestServer::start().await;
    const READERS: usize = 20;
    let mut readers = Vec::new();
    for i in 0..READERS {
        readers.push(server.named(&format!("reader{i}")).await);
    }
    // 4,000 characters (the most a message may hold) of 3 bytes each.
    let text = "€".repeat(4_000);
    let mut flooders = Vec::new();
    for _ in 0..10 {
        flooders.push(chat_from("127.0.0.2", server.addr).await);
    }
    for flooder in &mut flooders {
        for _ in 0..30 {
            flooder.send(json!({"type": "chat", "text": text})).await;
        }
    }
    // A flooder's answers (`rateLimited` errors) come before the pong to a
    // ping sent after its burst; lobby broadcasts may come in between.
    let (mut delivered, mut limited) = (0, 0);
    for flooder in &mut flooders {
        if flooder.ws.send(Message::text(json!({"type": "ping", "timestamp": 1}).to_string())).await.is_err()
        {
            continue;
        }
        loop {
            match timeout(WAIT, flooder.ws.next()).await.expect("an answer in time") {
                Some(Ok(Message::Text(text))) => {
                    let msg: Value = serde_json::from_str(&text).unwrap();
                    match msg["type"].as_str().unwrap() {
                        "chat" => {}
                        "pong" => break,
                        "error" => {
                            assert_eq!(msg["code"], "rateLimited", "{msg}");
                            limited += 1;
                        }
                        other => panic!("unexpected {other}"),
                    }
                }
                // A flooder may be closed for flooding (1008): the point.
                Some(Ok(Message::Close(frame))) => {
                    assert_eq!(frame.unwrap().code, CloseCode::Policy);
                    break;
                }
                Some(Ok(_)) => {}
                other => panic!("flooder connection failed: {other:?}"),
            }
        }
    }
    assert!(limited > 0, "nothing was rate limited");
    // Every reader got the lobby messages that went out, and is still open.
    for reader in &mut readers {
        reader.send(json!({"type": "ping", "timestamp": 7})).await;
        loop {
            let msg = reader.recv().await;
            match msg["type"].as_str().unwrap() {
                "chat" => delivered += 1,
                "pong" => break,
                other => panic!("unexpected {other}"),
            }
        }
    }
    assert!(delivered <= READERS * 10, "more went out than the lobby budget allows: {delivered}");
    let status = server.status().await;
    assert_eq!(status["slowConsumersDropped"], 0, "{status}");
    server.shutdown().await;
}

// Finding 7: limits that hold per address, whatever the connections.
#[tokio::test]
async fn chat_limits_hold_per_address_across_reconnects() {
    let mut config = TestServer::config();
    config.rate_limit.address_chat_burst = 100;
    config.rate_limit.address_chat_per_sec = 0.05;
    let server = TestServer::with(config).await;
    let mut accepted = 0;
    let mut limited = 0;
    // Connect, send a burst of 50 (within one connection's burst of 60),
    // close; four times from the same address.
    for round in 0..4 {
        let mut c = chat_from("127.0.0.2", server.addr).await;
        // A room per round: the last round's departure is announced once
        // its kept messages are out, which may be after this join.
        c.send(json!({"type": "joinRoom", "room": format!("r{round}")})).await;
        c.recv_type("userJoined").await;
        c.recv_type("roomJoined").await;
        for i in 0..50 {
            c.send(json!({"type": "chatMessage", "text": format!("{round}:{i}"), "clientMsgId": uuid::Uuid::new_v4()}))
                .await;
        }
        let mut answered = 0;
        while answered < 50 {
            let msg = c.recv().await;
            match msg["type"].as_str().unwrap() {
                "messageAck" => accepted += 1,
                "error" => {
                    assert_eq!(msg["code"], "rateLimited", "{msg}");
                    assert!(msg["retryAfterMs"].as_u64().unwrap() > 0);
                    limited += 1;
                }
                other => panic!("unexpected {other}"),
            }
            answered += 1;
        }
        c.ws.close(None).await.unwrap();
    }
    // The address's burst (100) and a little refill, not 4 × 50.
    assert!((100..=103).contains(&accepted), "accepted {accepted}");
    assert_eq!(accepted + limited, 200);
    // Another address is not affected. (In another room: the last round's
    // departure from `r` may be announced after it joins.)
    let mut other = chat_from("127.0.0.3", server.addr).await;
    other.send(json!({"type": "joinRoom", "room": "elsewhere"})).await;
    other.recv_type("userJoined").await;
    other.recv_type("roomJoined").await;
    other.send(json!({"type": "chatMessage", "text": "hi", "clientMsgId": uuid::Uuid::new_v4()})).await;
    other.recv_type("messageAck").await;
    server.shutdown().await;
}

// Finding 7: new connections per second per address, refused with 429.
#[tokio::test]
async fn new_connections_per_address_are_rate_limited_with_429() {
    let mut config = TestServer::config();
    config.rate_limit.address_connections_burst = 5;
    config.rate_limit.address_connections_per_sec = 0.1;
    let server = TestServer::with(config).await;
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(chat_from("127.0.0.2", server.addr).await);
    }
    let tcp = connect_from("127.0.0.2", server.addr).await;
    let refused =
        tokio_tungstenite::client_async(format!("ws://{}/ws/chat", server.addr), MaybeTlsStream::Plain(tcp))
            .await
            .unwrap_err();
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), 429);
            let retry: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=10).contains(&retry), "Retry-After {retry}");
        }
        other => panic!("expected 429, got {other}"),
    }
    // Other addresses connect as usual.
    chat_from("127.0.0.3", server.addr).await;
    server.shutdown().await;
}

// Finding 1: echo obeys the chat limits.
#[tokio::test]
async fn echo_frames_count_against_the_chat_rate() {
    let mut config = TestServer::config();
    // The burst (60) and, however slow the machine, no refill.
    config.rate_limit.chat_per_sec = 0.001;
    let server = TestServer::with(config).await;
    let mut echo = Client::connect(&server.url("/ws/echo")).await;
    for i in 0..70 {
        echo.send_text(&format!("{i}")).await;
    }
    let (mut echoed, mut limited) = (0, 0);
    while echoed + limited < 70 {
        match timeout(WAIT, echo.ws.next()).await.unwrap().unwrap().unwrap() {
            Message::Text(text) if text.starts_with('{') => {
                let msg: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(msg["code"], "rateLimited", "{msg}");
                limited += 1;
            }
            Message::Text(_) => echoed += 1,
            _ => {}
        }
    }
    // The chat burst is 60.
    assert_eq!((echoed, limited), (60, 10));
    server.shutdown().await;
}
