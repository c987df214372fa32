//! End-to-end tests: a real server on 127.0.0.1:0, real WebSocket clients.
//!
//! Every row of the protocol table is driven here with the JSON a client of
//! the classic `ws` chat tutorial sends, plus the bad-input rows, the slow
//! consumer, the endpoints and shutdown. Waits are for events, each with a
//! timeout; nothing sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hubbub_protocol::ServerMessage;
use hubbub_server::test_support::TestServer;
use hubbub_server::{Config, Server};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expected event may take before the test fails.
const WAIT: Duration = Duration::from_secs(10);

mod abuse;
mod compression;
mod history;

/// Chat clients of a test server, as the classic tutorial's client would
/// start: connected, named, in a room.
trait ChatClients {
    /// A client of `/ws/chat` that has not read its greeting yet.
    async fn chat(&self) -> Client;
    /// A chat client that has read its greeting and set its name.
    async fn named(&self, name: &str) -> Client;
    /// A named client that has joined `room` (and read its own join events).
    async fn in_room(&self, name: &str, room: &str) -> Client;
}

impl ChatClients for TestServer {
    async fn chat(&self) -> Client {
        Client::connect(&self.chat_url()).await
    }

    async fn named(&self, name: &str) -> Client {
        let mut c = self.chat().await;
        c.greeting().await;
        c.send(json!({"type": "setUsername", "username": name})).await;
        assert_eq!(c.recv().await, json!({"type": "usernameSet", "username": name}));
        c
    }

    async fn in_room(&self, name: &str, room: &str) -> Client {
        let mut c = self.named(name).await;
        c.send(json!({"type": "joinRoom", "room": room})).await;
        let joined = c.recv().await;
        assert_eq!(joined["type"], "userJoined");
        assert_eq!(joined["user"], name);
        assert_eq!(c.recv().await["type"], "roomJoined");
        c
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct Client {
    ws: Ws,
}

impl Client {
    async fn connect(url: &str) -> Self {
        let (ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(url)).await.unwrap().unwrap();
        Self { ws }
    }

    /// Connects over a socket with a tiny receive buffer, so that a client
    /// that does not read pushes back on the server quickly.
    async fn connect_small_window(addr: SocketAddr, path: &str) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let url = format!("ws://{addr}{path}");
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await.unwrap();
        Self { ws }
    }

    async fn send(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    /// The next frame, which must be text holding a JSON object.
    async fn recv(&mut self) -> Value {
        loop {
            let msg = timeout(WAIT, self.ws.next()).await.expect("a frame in time").unwrap().unwrap();
            match msg {
                Message::Text(text) => {
                    // Every server frame also decodes as a typed message.
                    hubbub_protocol::decode_server(&text).unwrap();
                    return serde_json::from_str(&text).unwrap();
                }
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    async fn recv_type(&mut self, kind: &str) -> Value {
        let value = self.recv().await;
        assert_eq!(value["type"], kind, "{value}");
        value
    }

    async fn greeting(&mut self) -> String {
        let welcome = self.recv_type("welcome").await;
        assert!(welcome["message"].as_str().unwrap().len() > 3);
        let connected = self.recv_type("connected").await;
        let id = connected["clientId"].as_str().unwrap().to_owned();
        assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);
        id
    }

    /// Proves nothing else is queued for this client: a ping's pong must be
    /// the very next frame.
    async fn expect_nothing_pending(&mut self) {
        self.send(json!({"type": "ping", "timestamp": 1})).await;
        let next = self.recv().await;
        assert_eq!(next["type"], "pong", "unexpected frame {next}");
    }

    /// The next frame, which must be the server's close frame: its code.
    async fn closed_next(&mut self) -> CloseCode {
        loop {
            match timeout(WAIT, self.ws.next()).await.expect("close in time") {
                Some(Ok(Message::Close(frame))) => return frame.map_or(CloseCode::Status, |f| f.code),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected the close frame, got {other:?}"),
            }
        }
    }

    /// Reads until the server's close frame and returns its code.
    async fn closed(&mut self) -> CloseCode {
        loop {
            match timeout(WAIT, self.ws.next()).await.expect("close in time") {
                Some(Ok(Message::Close(frame))) => {
                    return frame.map_or(CloseCode::Status, |f| f.code);
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => panic!("connection failed instead of closing: {err}"),
                None => panic!("connection ended without a close frame"),
            }
        }
    }
}

/// A server message without the fields room history adds (`epoch`,
/// `offset`, `recovered`, `missed`): the shape the tutorial's clients see.
fn tutorial_fields(mut value: Value) -> Value {
    if let Some(object) = value.as_object_mut() {
        for field in ["epoch", "offset", "recovered", "missed"] {
            object.remove(field);
        }
    }
    value
}

/// A minimal HTTP/1.1 GET over a fresh connection: (status line, body).
async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    http_request(addr, &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")).await
}

async fn http_request(addr: SocketAddr, request: &str) -> (String, String) {
    let (head, body) = http_raw(addr, request).await;
    (head.lines().next().unwrap().to_owned(), String::from_utf8(body).unwrap())
}

/// Sends a raw request; returns the whole response head and the body bytes.
async fn http_raw(addr: SocketAddr, request: &str) -> (String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut raw)).await.unwrap().unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    (head, raw[split + 4..].to_vec())
}

// ----- connection and the protocol table -------------------------------------

#[tokio::test]
async fn connect_greets_with_welcome_and_a_fresh_client_id() {
    let server = TestServer::start().await;
    let mut a = server.chat().await;
    let mut b = server.chat().await;
    let (id_a, id_b) = (a.greeting().await, b.greeting().await);
    assert_ne!(id_a, id_b);
    // `/` upgrades to the same chat protocol.
    let mut root = Client::connect(&server.url("/")).await;
    root.greeting().await;
    server.shutdown().await;
}

#[tokio::test]
async fn set_username_replies_with_the_trimmed_name() {
    let server = TestServer::start().await;
    let mut c = server.chat().await;
    c.greeting().await;
    c.send(json!({"type": "setUsername", "username": "  ada  "})).await;
    assert_eq!(c.recv().await, json!({"type": "usernameSet", "username": "ada"}));
    server.shutdown().await;
}

#[tokio::test]
async fn join_room_announces_to_everyone_including_the_joiner() {
    let server = TestServer::start().await;
    let mut ada = server.named("ada").await;
    ada.send(json!({"type": "joinRoom", "room": "general"})).await;
    assert_eq!(
        ada.recv().await,
        json!({"type": "userJoined", "user": "ada", "room": "general", "userCount": 1})
    );
    assert_eq!(
        tutorial_fields(ada.recv().await),
        json!({"type": "roomJoined", "room": "general", "userCount": 1})
    );

    let mut bob = server.named("bob").await;
    bob.send(json!({"type": "joinRoom", "room": "general"})).await;
    let joined = json!({"type": "userJoined", "user": "bob", "room": "general", "userCount": 2});
    assert_eq!(bob.recv().await, joined);
    assert_eq!(
        tutorial_fields(bob.recv().await),
        json!({"type": "roomJoined", "room": "general", "userCount": 2})
    );
    assert_eq!(ada.recv().await, joined);
    assert_eq!(server.status().await["rooms"], 1);
    server.shutdown().await;
}

#[tokio::test]
async fn chat_message_reaches_the_others_in_the_room_but_not_the_sender() {
    let server = TestServer::start().await;
    let mut ada = server.in_room("ada", "r").await;
    let mut bob = server.in_room("bob", "r").await;
    ada.recv_type("userJoined").await;
    let mut eve = server.in_room("eve", "elsewhere").await;

    let before = now_ms();
    ada.send(json!({"type": "chatMessage", "text": "hello <b>bob</b>"})).await;
    let msg = bob.recv().await;
    assert_eq!(msg["type"], "chatMessage");
    assert_eq!(msg["user"], "ada");
    assert_eq!(msg["text"], "hello <b>bob</b>");
    let ts = msg["timestamp"].as_u64().unwrap();
    assert!(ts >= before && ts <= now_ms(), "timestamp {ts} is server time in ms");

    ada.expect_nothing_pending().await;
    eve.expect_nothing_pending().await;
    server.shutdown().await;
}

#[tokio::test]
async fn messages_with_an_id_are_acknowledged_and_a_resend_is_delivered_once() {
    let server = TestServer::start().await;
    let mut ada = server.in_room("ada", "r").await;
    let mut bob = server.in_room("bob", "r").await;
    ada.recv_type("userJoined").await;
    let id = "6f1c9a4e-2b7d-4c1e-9f3a-1d2e3f4a5b6c";
    let send = json!({"type": "chatMessage", "text": "once", "clientMsgId": id});

    ada.send(send.clone()).await;
    let delivered = bob.recv_type("chatMessage").await;
    assert_eq!(delivered["clientMsgId"], id);
    let ack = ada.recv_type("messageAck").await;
    assert_eq!(ack["clientMsgId"], id);
    assert_eq!(ack["timestamp"], delivered["timestamp"]);

    // The ack was "lost": the same message comes again, even from another
    // connection of the same user after a reconnect.
    let mut ada_again = server.in_room("ada", "r").await;
    bob.recv_type("userJoined").await;
    ada.recv_type("userJoined").await;
    ada_again.send(send).await;
    let again = ada_again.recv_type("messageAck").await;
    assert_eq!(again, ack, "acknowledged again with the original timestamp");
    bob.expect_nothing_pending().await;
    ada.expect_nothing_pending().await;

    // A malformed id is refused like any other bad field.
    ada.send(json!({"type": "chatMessage", "text": "x", "clientMsgId": "not-a-uuid"})).await;
    assert_eq!(ada.recv_type("error").await["code"], "invalidFields");
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_msg_id_comes_back_spelled_as_sent_and_resends_match_any_spelling() {
    let server = TestServer::start().await;
    let mut ada = server.in_room("ada", "r").await;
    let mut bob = server.in_room("bob", "r").await;
    ada.recv_type("userJoined").await;
    for id in [
        "6F1C9A4E-2B7D-4C1E-9F3A-1D2E3F4A5B6C",
        "{0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d}",
        "urn:uuid:1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e",
        "2C3D4E5F6A7B4C8D9E0F1A2B3C4D5E6F",
    ] {
        ada.send(json!({"type": "chatMessage", "text": "hi", "clientMsgId": id})).await;
        assert_eq!(bob.recv_type("chatMessage").await["clientMsgId"], id);
        assert_eq!(ada.recv_type("messageAck").await["clientMsgId"], id);
    }
    // A resend spelled otherwise is still the same message: acknowledged
    // again, in the resend's own spelling, and not delivered twice.
    let resend = "6f1c9a4e2b7d4c1e9f3a1d2e3f4a5b6c";
    ada.send(json!({"type": "chatMessage", "text": "hi", "clientMsgId": resend})).await;
    assert_eq!(ada.recv_type("messageAck").await["clientMsgId"], resend);
    bob.expect_nothing_pending().await;
    server.shutdown().await;
}

#[tokio::test]
async fn typing_reaches_the_others_in_the_room() {
    let server = TestServer::start().await;
    let mut ada = server.in_room("ada", "r").await;
    let mut bob = server.in_room("bob", "r").await;
    ada.recv_type("userJoined").await;
    bob.send(json!({"type": "typing"})).await;
    assert_eq!(ada.recv().await, json!({"type": "userTyping", "user": "bob"}));
    bob.expect_nothing_pending().await;
    server.shutdown().await;
}

#[tokio::test]
async fn leave_room_tells_those_who_remain_and_removes_empty_rooms() {
    let server = TestServer::start().await;
    let mut notes = Client::connect(&server.url("/ws/notifications")).await;
    let mut ada = server.in_room("ada", "r").await;
    assert_eq!(notes.recv().await, json!({"type": "roomCreated", "room": "r"}));
    let mut bob = server.in_room("bob", "r").await;
    ada.recv_type("userJoined").await;

    bob.send(json!({"type": "leaveRoom"})).await;
    let left = ada.recv().await;
    assert_eq!(left["type"], "userLeft");
    assert_eq!(left["user"], "bob");
    assert_eq!(left["userCount"], 1);
    assert_eq!(bob.recv().await, json!({"type": "roomLeft", "room": "r"}));
    // Bob no longer hears the room.
    ada.send(json!({"type": "chatMessage", "text": "anyone?"})).await;
    bob.expect_nothing_pending().await;

    ada.send(json!({"type": "leaveRoom"})).await;
    ada.recv_type("roomLeft").await;
    assert_eq!(notes.recv().await, json!({"type": "roomRemoved", "room": "r"}));
    assert_eq!(server.status().await["rooms"], 0);

    // Leaving when in no room is an error, not a disconnect.
    ada.send(json!({"type": "leaveRoom"})).await;
    assert_eq!(ada.recv_type("error").await["code"], "notInRoom");
    ada.expect_nothing_pending().await;
    server.shutdown().await;
}

#[tokio::test]
async fn joining_another_room_leaves_the_current_one_first() {
    let server = TestServer::start().await;
    let mut ada = server.in_room("ada", "one").await;
    let mut bob = server.in_room("bob", "one").await;
    ada.recv_type("userJoined").await;
    bob.send(json!({"type": "joinRoom", "room": "two"})).await;
    assert_eq!(ada.recv().await["type"], "userLeft");
    assert_eq!(bob.recv().await, json!({"type": "userJoined", "user": "bob", "room": "two", "userCount": 1}));
    assert_eq!(
        tutorial_fields(bob.recv().await),
        json!({"type": "roomJoined", "room": "two", "userCount": 1})
    );
    // Rejoining the room one is in just confirms it.
    bob.send(json!({"type": "joinRoom", "room": "two"})).await;
    assert_eq!(
        tutorial_fields(bob.recv().await),
        json!({"type": "roomJoined", "room": "two", "userCount": 1})
    );
    assert_eq!(server.status().await["rooms"], 2);
    server.shutdown().await;
}

#[tokio::test]
async fn a_disconnect_counts_as_leaving_the_room() {
    let server = TestServer::start().await;
    let mut ada = server.in_room("ada", "r").await;
    let mut bob = server.in_room("bob", "r").await;
    ada.recv_type("userJoined").await;
    bob.ws.close(None).await.unwrap();
    let left = ada.recv().await;
    assert_eq!(
        (left["type"].as_str(), left["user"].as_str(), left["userCount"].as_u64()),
        (Some("userLeft"), Some("bob"), Some(1))
    );

    // An abrupt drop (no close frame) counts too.
    let carol = server.in_room("carol", "r").await;
    ada.recv_type("userJoined").await;
    drop(carol);
    assert_eq!(ada.recv().await["user"], "carol");
    server.shutdown().await;
}

#[tokio::test]
async fn lobby_chat_reaches_every_chat_client_with_the_server_side_name() {
    let server = TestServer::start().await;
    let mut ada = server.in_room("ada", "r").await;
    let mut anon = server.chat().await;
    anon.greeting().await;
    // With a username set, the server's name wins over the claimed one.
    ada.send(json!({"type": "chat", "user": "mallory", "text": "hi all"})).await;
    let expected = json!({"type": "chat", "user": "ada", "text": "hi all"});
    assert_eq!(ada.recv().await, expected);
    assert_eq!(anon.recv().await, expected);
    // Without one, the client's own name is used, as in the tutorial.
    anon.send(json!({"type": "chat", "user": "guest", "text": "hey"})).await;
    let expected = json!({"type": "chat", "user": "guest", "text": "hey"});
    assert_eq!(ada.recv().await, expected);
    assert_eq!(anon.recv().await, expected);
    server.shutdown().await;
}

#[tokio::test]
async fn ping_is_answered_with_the_timestamp_and_server_time() {
    let server = TestServer::start().await;
    let mut c = server.chat().await;
    c.greeting().await;
    c.send(json!({"type": "ping", "timestamp": 1_700_000_000_123_u64})).await;
    let pong = c.recv_type("pong").await;
    assert_eq!(pong["timestamp"], 1_700_000_000_123_u64);
    assert!(pong["serverTime"].as_u64().unwrap() >= 1_700_000_000_000);
    server.shutdown().await;
}

// ----- bad input --------------------------------------------------------------

#[tokio::test]
async fn bad_input_gets_an_error_and_the_connection_stays_open() {
    let server = TestServer::start().await;
    let mut c = server.named("ada").await;
    let cases: &[(&str, &str)] = &[
        ("this is not json", "Invalid message format"),
        ("[1, 2, 3]", "Invalid message format"),
        (r#"{"type": "teleport"}"#, "Unknown message type: teleport"),
        (r#"{"text": "no type"}"#, "Missing message type"),
        (r#"{"type": "joinRoom"}"#, "Invalid joinRoom message: missing field `room`"),
        (r#"{"type": "setUsername", "username": "   "}"#, "Invalid username: must not be empty"),
        (
            r#"{"type": "setUsername", "username": "tab\there"}"#,
            "Invalid username: must not contain control characters",
        ),
        (
            r#"{"type": "joinRoom", "room": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#,
            "Invalid room name: must be at most 64 characters",
        ),
        (r#"{"type": "chatMessage", "text": "no room yet"}"#, "Join a room before sending messages"),
    ];
    for (frame, message) in cases {
        c.send_text(frame).await;
        let err = c.recv_type("error").await;
        assert_eq!(err["message"], *message, "for {frame}");
    }
    let long_name = json!({"type": "setUsername", "username": "x".repeat(33)});
    c.send(long_name).await;
    assert_eq!(c.recv_type("error").await["message"], "Invalid username: must be at most 32 characters");
    c.send(json!({"type": "chat", "text": "y".repeat(4097)})).await;
    assert_eq!(
        c.recv_type("error").await["message"],
        "Invalid message text: must be at most 4096 characters"
    );

    // A binary frame with no upload in progress.
    c.ws.send(Message::Binary(Bytes::from_static(&[0, 0, 0, 0, 1, 2, 3]))).await.unwrap();
    assert_eq!(c.recv_type("error").await["message"], "No file upload in progress");

    // Still a working chat connection, with the name it had.
    c.send(json!({"type": "joinRoom", "room": "ok"})).await;
    assert_eq!(c.recv_type("userJoined").await["user"], "ada");
    server.shutdown().await;
}

#[tokio::test]
async fn an_oversized_frame_closes_only_that_connection_with_1009() {
    let server = TestServer::start().await;
    let mut ada = server.in_room("ada", "r").await;
    let mut bob = server.in_room("bob", "r").await;
    ada.recv_type("userJoined").await;
    let mut big = server.in_room("big", "r").await;
    ada.recv_type("userJoined").await;
    bob.recv_type("userJoined").await;

    // A ping just before the oversized frame is still answered: what was
    // queued goes out before the close frame.
    big.send(json!({"type": "ping", "timestamp": 7})).await;
    let huge = format!(r#"{{"type":"chatMessage","text":"{}"}}"#, "z".repeat(70_000));
    big.send_text(&huge).await;
    assert_eq!(big.recv_type("pong").await["timestamp"], 7);
    assert_eq!(big.closed().await, CloseCode::Size);

    // The others see the departure and keep chatting.
    assert_eq!(ada.recv().await["user"], "big");
    assert_eq!(bob.recv().await["user"], "big");
    ada.send(json!({"type": "chatMessage", "text": "still here"})).await;
    assert_eq!(bob.recv().await["text"], "still here");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_dropped_and_nobody_else_notices() {
    let mut config = TestServer::config();
    config.websocket.outbound_queue = 32;
    // The sender outpaces any human on purpose.
    config.rate_limit.enabled = false;
    let server = TestServer::with(config).await;
    let mut slow = Client::connect_small_window(server.addr, "/ws/chat").await;
    slow.greeting().await;
    slow.send(json!({"type": "joinRoom", "room": "busy"})).await;
    slow.recv_type("userJoined").await;
    slow.recv_type("roomJoined").await;
    let mut sender = server.in_room("sender", "busy").await;
    let mut reader = server.in_room("reader", "busy").await;
    sender.recv_type("userJoined").await;

    // The slow client never reads again. The sender chats, keeping at most
    // `WINDOW` messages ahead of the reader, until the server gives up on the
    // slow client; the reader must get every message, in order.
    const WINDOW: u64 = 8;
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0_u64);
    let reader_task = tokio::spawn(async move {
        let mut next = 0_u64;
        loop {
            let msg = reader.recv().await;
            match msg["type"].as_str().unwrap() {
                "chatMessage" => {
                    let index = msg["text"].as_str().unwrap().split(':').next().unwrap();
                    assert_eq!(index, next.to_string(), "messages arrive in order, none lost");
                    next += 1;
                    progress_tx.send_replace(next);
                }
                "userLeft" => {
                    assert_eq!(msg["user"], "Anonymous");
                    return (reader, next);
                }
                other => panic!("unexpected {other}"),
            }
        }
    });
    let text = "m".repeat(2000);
    let mut sent = 0_u64;
    loop {
        if sent >= WINDOW {
            let wanted = sent - WINDOW;
            // The reader stops (dropping `progress_tx`) once it hears that
            // the slow client left the room.
            match timeout(WAIT, progress.wait_for(|received| *received >= wanted)).await.unwrap() {
                Ok(_) => {}
                Err(_) => break,
            }
        }
        sender.send(json!({"type": "chatMessage", "text": format!("{sent}:{text}")})).await;
        sent += 1;
        assert!(sent < 100_000, "the slow consumer was never dropped");
    }
    let (mut reader, received) = timeout(WAIT, reader_task).await.unwrap().unwrap();
    // What was sent after the departure was announced follows it, in order.
    for expected in received..sent {
        let msg = reader.recv_type("chatMessage").await;
        assert!(msg["text"].as_str().unwrap().starts_with(&format!("{expected}:")));
    }
    reader.expect_nothing_pending().await;
    // The slow client, reading at last, finds its backlog and then the end.
    let ended = timeout(WAIT, async {
        // Reading past the close frame sends the close reply and waits for
        // the server to end the TCP connection.
        while let Some(Ok(_)) = slow.ws.next().await {}
    });
    ended.await.expect("the server closed the slow connection");
    let status = server.status().await;
    assert_eq!(status["connections"], 2, "{status}");
    assert_eq!(status["slowConsumersDropped"], 1, "{status}");
    server.shutdown().await;
}

// ----- other endpoints ----------------------------------------------------------

#[tokio::test]
async fn echo_returns_text_and_binary_frames_unchanged() {
    let server = TestServer::start().await;
    let mut echo = Client::connect(&server.url("/ws/echo")).await;
    echo.ws.send(Message::text("héllo")).await.unwrap();
    echo.ws.send(Message::Binary(Bytes::from_static(&[0, 255, 7]))).await.unwrap();
    let first = timeout(WAIT, echo.ws.next()).await.unwrap().unwrap().unwrap();
    let second = timeout(WAIT, echo.ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first, Message::text("héllo"));
    assert_eq!(second, Message::Binary(Bytes::from_static(&[0, 255, 7])));
    server.shutdown().await;

    let server = TestServer::with(Config { echo_enabled: false, ..TestServer::config() }).await;
    let err = tokio_tungstenite::connect_async(server.url("/ws/echo")).await.unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_paths_get_404_and_no_upgrade() {
    let server = TestServer::start().await;
    let err = tokio_tungstenite::connect_async(server.url("/ws/nope")).await.unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    let (status, _) = http_get(server.addr, "/nope").await;
    assert!(status.contains("404"), "{status}");
    // A plain GET on a WebSocket endpoint is told to upgrade.
    let (status, _) = http_get(server.addr, "/ws/chat").await;
    assert!(status.contains("426"), "{status}");
    server.shutdown().await;
}

#[tokio::test]
async fn health_status_and_page_are_served_over_http() {
    let server = TestServer::start().await;
    let (status, body) = http_get(server.addr, "/health").await;
    assert!(status.contains("200"));
    assert_eq!(body, "OK");

    let mut a = server.chat().await;
    a.greeting().await;
    let _echo = Client::connect(&server.url("/ws/echo")).await;
    let status = server.status().await;
    assert_eq!(status["connections"], 2, "{status}");
    assert_eq!(status["rooms"], 0);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["uptime"].is_u64());

    let (status, body) = http_get(server.addr, "/").await;
    assert!(status.contains("200"));
    assert!(body.contains("<html"));
    server.shutdown().await;
}

#[tokio::test]
async fn rooms_are_listed_with_their_member_counts() {
    let server = TestServer::start().await;
    let _a = server.in_room("ada", "beta").await;
    let _b = server.in_room("bob", "alpha").await;
    let (_, body) = http_get(server.addr, "/api/rooms").await;
    let rooms: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(rooms, json!([{"name": "alpha", "userCount": 1}, {"name": "beta", "userCount": 1}]));
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_notifies_subscribers_and_closes_everyone_with_1001() {
    let server = TestServer::start().await;
    let mut notes = Client::connect(&server.url("/ws/notifications")).await;
    let mut ada = server.in_room("ada", "r").await;
    notes.recv_type("roomCreated").await;
    let mut echo = Client::connect(&server.url("/ws/echo")).await;
    let addr = server.addr;
    server.shutdown().await;

    assert_eq!(
        notes.recv().await,
        json!({"type": "serverShutdown", "message": "The server is shutting down"})
    );
    assert_eq!(notes.closed().await, CloseCode::Away);
    assert_eq!(ada.closed().await, CloseCode::Away);
    assert_eq!(echo.closed().await, CloseCode::Away);
    // The port no longer accepts.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn a_shutdown_does_not_announce_members_as_leaving() {
    let server = TestServer::start().await;
    let mut ada = server.in_room("ada", "r").await;
    let mut bob = server.in_room("bob", "r").await;
    ada.recv_type("userJoined").await;
    server.shutdown().await;
    // Each sees the close frame next: no `userLeft` for the other first.
    assert_eq!(ada.closed_next().await, CloseCode::Away);
    assert_eq!(bob.closed_next().await, CloseCode::Away);
}

#[tokio::test]
async fn a_rename_in_a_room_is_announced_to_the_other_members() {
    let server = TestServer::start().await;
    let mut ada = server.in_room("ada", "r").await;
    let mut bob = server.in_room("bob", "r").await;
    ada.recv_type("userJoined").await;
    ada.send(json!({"type": "setUsername", "username": "ada2"})).await;
    assert_eq!(ada.recv().await, json!({"type": "usernameSet", "username": "ada2"}));
    assert_eq!(
        bob.recv().await,
        json!({"type": "userRenamed", "user": "ada2", "previous": "ada", "room": "r"})
    );
    // The same name again is no news; outside a room nobody is told.
    ada.send(json!({"type": "setUsername", "username": "ada2"})).await;
    ada.recv_type("usernameSet").await;
    bob.expect_nothing_pending().await;
    server.shutdown().await;
}

#[tokio::test]
async fn client_messages_decode_as_the_protocol_crate_encodes_them() {
    // The typed client API and the JSON on the wire agree end to end.
    let server = TestServer::start().await;
    let mut c = server.chat().await;
    c.greeting().await;
    let ping = hubbub_protocol::ClientMessage::Ping { timestamp: 42.into() };
    c.send_text(&ping.to_json()).await;
    let pong: ServerMessage = serde_json::from_value(c.recv().await).unwrap();
    assert!(matches!(pong, ServerMessage::Pong { timestamp, .. } if timestamp == 42.into()));
    server.shutdown().await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

// ----- a client from another ecosystem -----------------------------------------

/// The folder of the Node interop clients (`tests/interop`), with their one
/// npm dependency (`ws`) installed, or `None` when Node.js is not installed.
///
/// The first test to ask runs `npm ci` there unless it already ran for the
/// current `package-lock.json`, so plain `cargo test` works on a fresh clone.
/// Without Node.js the interop tests pass as skipped, after one line on
/// stderr naming what to install; under CI (`CI=true`) that is a failure
/// instead, so CI never skips them. A failed `npm ci` fails the test with
/// npm's own message: a missing dependency never shows up as a timeout.
fn node_interop() -> Option<std::path::PathBuf> {
    static PREPARED: std::sync::OnceLock<Result<Option<std::path::PathBuf>, String>> =
        std::sync::OnceLock::new();
    match PREPARED.get_or_init(prepare_node_interop) {
        Ok(dir) => dir.clone(),
        Err(message) => panic!("{message}"),
    }
}

fn prepare_node_interop() -> Result<Option<std::path::PathBuf>, String> {
    use std::io::Write as _;
    use std::process::Command;

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    // Written to the stderr handle, not with `eprintln!`, so that the test
    // harness does not capture it: the reader must see why tests were skipped
    // or why the run paused.
    let say = |line: String| {
        let _ = writeln!(std::io::stderr(), "{line}");
    };
    let install = "install Node.js and npm (Debian: apt-get install -y nodejs npm)";
    if Command::new("node").arg("--version").output().is_err() {
        if std::env::var("CI").is_ok_and(|ci| ci == "true") {
            return Err(format!("the Node interop tests need `node` on PATH under CI: {install}"));
        }
        say(format!("SKIPPED the Node interop tests (hubbub-server tests/server.rs): no `node`; {install}"));
        return Ok(None);
    }
    // `npm ci` leaves its own copy of the lock file in node_modules; one at
    // least as new as the committed lock means the install is current.
    let modified = |path: std::path::PathBuf| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let installed = modified(dir.join("node_modules/.package-lock.json"));
    let locked = modified(dir.join("package-lock.json"));
    if dir.join("node_modules/ws").is_dir() && installed.is_some() && installed >= locked {
        return Ok(Some(dir));
    }
    say(format!("installing the Node interop tests' dependency: npm ci in {}", dir.display()));
    let output = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .output()
        .map_err(|err| format!("the Node interop tests need npm to install `ws` ({err}): {install}"))?;
    if !output.status.success() {
        return Err(format!(
            "`npm ci` in {} failed ({}), so the Node interop tests lack Node's `ws` package:\n{}{}",
            dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(Some(dir))
}

/// How a Node client ended and what it printed, for failure messages.
fn node_said(output: &std::process::Output) -> String {
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    format!("{}\n{stdout}{stderr}", output.status)
}

/// A client written as the classic Node `ws` tutorial writes one, run with
/// Node against `/` (a plain `new WebSocket("ws://host:port")`). Its npm
/// dependency is installed by [`node_interop`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_ws_tutorial_client_works_unchanged() {
    let Some(dir) = node_interop() else { return };
    let server = TestServer::start().await;
    let output = tokio::process::Command::new("node")
        .arg(dir.join("tutorial_client.mjs"))
        .arg(format!("ws://{}/", server.addr))
        .kill_on_drop(true)
        .output();
    let output = timeout(Duration::from_secs(30), output).await.unwrap().expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "node client failed: {stdout}{stderr}");
    assert_eq!(stdout.trim(), "ok");
    server.shutdown().await;
}

// ----- heartbeat ----------------------------------------------------------------

fn heartbeat_config(interval_ms: u64, timeout_ms: u64) -> Config {
    let mut config = TestServer::config();
    config.heartbeat.interval = Duration::from_millis(interval_ms);
    config.heartbeat.timeout = Duration::from_millis(timeout_ms);
    config
}

/// A WebSocket peer made by hand over raw TCP: it completes the handshake,
/// sends what it is told, and never reads again (its kernel keeps
/// acknowledging whatever the server sends, up to the buffer).
async fn raw_peer(addr: SocketAddr, frames: &[Value]) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = "GET /ws/chat HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    tcp.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut tcp).await;
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    for frame in frames {
        let payload = frame.to_string().into_bytes();
        assert!(payload.len() < 126, "short frames only");
        // FIN + text; masked (as clients must) with an all-zero key.
        let mut bytes = vec![0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0];
        bytes.extend_from_slice(&payload);
        tcp.write_all(&bytes).await.unwrap();
    }
    tcp
}

/// Sends an upgrade request for `path` with `key_headers` (each a whole
/// `Sec-WebSocket-Key: …\r\n` line, or none); returns the response's status
/// line and the socket, positioned after the response head.
async fn raw_upgrade(addr: SocketAddr, path: &str, key_headers: &str) -> (String, TcpStream) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         {key_headers}Sec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let head = String::from_utf8(read_head(&mut tcp).await).unwrap();
    (head.lines().next().unwrap().to_owned(), tcp)
}

/// Reads an HTTP response head, byte by byte so that no frame after it is
/// consumed.
async fn read_head(tcp: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0_u8; 1];
        timeout(WAIT, tcp.read_exact(&mut byte)).await.unwrap().unwrap();
        head.push(byte[0]);
    }
    head
}

/// Reads server frames (never masked) until a close frame; returns its payload.
async fn raw_close_payload(tcp: &mut TcpStream) -> Vec<u8> {
    loop {
        let (opcode, payload) = raw_frame(tcp).await;
        if opcode == 0x8 {
            return payload;
        }
    }
}

/// Reads the next server frame (never masked): its opcode and payload.
async fn raw_frame(tcp: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut start = [0_u8; 2];
    timeout(WAIT, tcp.read_exact(&mut start)).await.unwrap().unwrap();
    let len = match start[1] & 0x7F {
        126 => u64::from(tcp.read_u16().await.unwrap()),
        127 => tcp.read_u64().await.unwrap(),
        len => u64::from(len),
    };
    let mut payload = vec![0; usize::try_from(len).unwrap()];
    timeout(WAIT, tcp.read_exact(&mut payload)).await.unwrap().unwrap();
    (start[0] & 0x0F, payload)
}

/// A client that does not wait for the `101` before sending frames: what
/// hyper read past the request is decoded before anything read later,
/// including a frame cut in two by the end of that read.
#[tokio::test]
async fn frames_sent_right_behind_the_upgrade_request_are_read_first() {
    let server = TestServer::start().await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let text = |payload: &[u8]| {
        // FIN + text, masked with an all-zero key.
        let mut bytes = vec![0x81, 0x80 | u8::try_from(payload.len()).unwrap(), 0, 0, 0, 0];
        bytes.extend_from_slice(payload);
        bytes
    };
    let mut sent = b"GET /ws/echo HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .to_vec();
    sent.extend(text(b"first"));
    let second = text(b"second");
    sent.extend_from_slice(&second[..4]);
    tcp.write_all(&sent).await.unwrap();
    let head = read_head(&mut tcp).await;
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    assert_eq!(raw_frame(&mut tcp).await, (0x1, b"first".to_vec()));
    tcp.write_all(&second[4..]).await.unwrap();
    assert_eq!(raw_frame(&mut tcp).await, (0x1, b"second".to_vec()));
}

#[tokio::test]
async fn a_sec_websocket_key_must_be_one_16_byte_base64_value() {
    let server = TestServer::start().await;
    let valid = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let (status, _) = raw_upgrade(server.addr, "/ws/echo", valid).await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    for bad in [
        "",
        "Sec-WebSocket-Key: \r\n",
        "Sec-WebSocket-Key: x\r\n",
        // 15 and 17 bytes, unpadded, and not base64.
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j\r\n",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZSEh\r\n",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ\r\n",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j*Q==\r\n",
        // Two keys, even two valid ones.
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    ] {
        let (status, _) = raw_upgrade(server.addr, "/ws/echo", bad).await;
        assert!(status.starts_with("HTTP/1.1 400"), "{bad:?}: {status}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn close_code_1014_is_echoed_not_refused() {
    let server = TestServer::start().await;
    for (code, answer) in [(1014_u16, 1014_u16), (1015, 1002), (1004, 1002)] {
        let (status, mut tcp) =
            raw_upgrade(server.addr, "/ws/echo", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n").await;
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
        // A masked close frame (all-zero mask) with the code and no reason.
        let [hi, lo] = code.to_be_bytes();
        tcp.write_all(&[0x88, 0x82, 0, 0, 0, 0, hi, lo]).await.unwrap();
        let payload = raw_close_payload(&mut tcp).await;
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), answer, "close {code}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_peer_that_never_answers_pings_is_reaped_and_its_room_told() {
    let server = TestServer::with(heartbeat_config(100, 200)).await;
    // Joined before the silent peer, so it hears the departure.
    let mut ada = server.chat().await;
    ada.greeting().await;
    ada.send(json!({"type": "setUsername", "username": "ada"})).await;
    ada.send(json!({"type": "joinRoom", "room": "r"})).await;
    ada.recv_type("usernameSet").await;
    ada.recv_type("userJoined").await;
    ada.recv_type("roomJoined").await;

    let _silent = raw_peer(
        server.addr,
        &[json!({"type": "setUsername", "username": "ghost"}), json!({"type": "joinRoom", "room": "r"})],
    )
    .await;
    assert_eq!(ada.recv_type("userJoined").await["user"], "ghost");
    // ada answers pings (tungstenite does, as she reads); the ghost cannot.
    let left = ada.recv_type("userLeft").await;
    assert_eq!((left["user"].as_str(), left["userCount"].as_u64()), (Some("ghost"), Some(1)));
    let status = server.status().await;
    assert_eq!(status["deadConnectionsReaped"], 1, "{status}");
    assert_eq!(status["connections"], 1, "{status}");
    server.shutdown().await;
}

#[tokio::test]
async fn healthy_peers_on_every_endpoint_are_pinged_and_never_reaped() {
    let server = TestServer::with(heartbeat_config(50, 500)).await;
    let mut chat = server.chat().await;
    let mut echo = Client::connect(&server.url("/ws/echo")).await;
    let mut notes = Client::connect(&server.url("/ws/notifications")).await;
    // Twenty intervals: every client sees twenty pings, and reading them
    // lets tungstenite answer each with a pong. All three read at once; a
    // client left unread for a whole timeout would rightly be reaped.
    async fn read_pings(client: &mut Client, count: usize) {
        let mut pings = 0;
        while pings < count {
            match timeout(WAIT, client.ws.next()).await.unwrap().unwrap().unwrap() {
                Message::Ping(payload) => {
                    assert_eq!(payload.len(), 8, "the payload is the heartbeat token");
                    pings += 1;
                }
                Message::Text(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    tokio::join!(read_pings(&mut chat, 20), read_pings(&mut echo, 20), read_pings(&mut notes, 20));
    chat.expect_nothing_pending().await;
    let status = server.status().await;
    assert_eq!(status["deadConnectionsReaped"], 0, "{status}");
    assert_eq!(status["connections"], 3, "{status}");
    server.shutdown().await;
}

// ----- file uploads -------------------------------------------------------------

/// Deterministic test bytes.
fn file_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn chunk_frame(index: u32, data: &[u8]) -> Message {
    Message::Binary(Bytes::from(hubbub_protocol::chunk::frame(index, data)))
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

impl Client {
    async fn send_binary(&mut self, msg: Message) {
        self.ws.send(msg).await.unwrap();
    }

    /// Skips `fileAccepted` and `fileProgress` until a message of `kind`.
    async fn recv_skipping_progress(&mut self, kind: &str) -> Value {
        loop {
            let msg = self.recv().await;
            match msg["type"].as_str() {
                Some("fileAccepted" | "fileProgress") if kind != msg["type"] => {}
                _ => {
                    assert_eq!(msg["type"], kind, "{msg}");
                    return msg;
                }
            }
        }
    }
}

async fn download(addr: SocketAddr, url: &str, extra: &str) -> (String, Vec<u8>) {
    http_raw(addr, &format!("GET {url} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}\r\n")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tutorial_upload_sequence_saves_a_byte_identical_file() {
    let server = TestServer::start().await;
    let mut ada = server.in_room("ada", "r").await;
    let mut bob = server.in_room("bob", "r").await;
    ada.recv_type("userJoined").await;

    // fileStart, then every 64 KiB chunk in order without waiting, then fileEnd.
    let data = file_bytes(300_000);
    ada.send(json!({"type": "fileStart", "name": "photo.png", "size": data.len(), "mimeType": "image/png"}))
        .await;
    for (i, chunk) in data.chunks(65_536).enumerate() {
        ada.send_binary(chunk_frame(i as u32, chunk)).await;
    }
    ada.send(json!({"type": "fileEnd"})).await;

    let accepted = ada.recv_type("fileAccepted").await;
    assert_eq!(accepted["chunkSize"], 65_536);
    let mut progress = Vec::new();
    let saved = loop {
        let msg = ada.recv().await;
        match msg["type"].as_str().unwrap() {
            "fileProgress" => progress.push(msg["receivedBytes"].as_u64().unwrap()),
            "fileSaved" => break msg,
            other => panic!("unexpected {other}: {msg}"),
        }
    };
    assert!(progress.windows(2).all(|w| w[0] < w[1]), "progress only grows: {progress:?}");
    assert_eq!(saved["name"], "photo.png");
    assert_eq!(saved["size"], data.len());
    assert_eq!(saved["mimeType"], "image/png");
    assert_eq!(saved["sha256"], sha256_hex(&data));
    let url = saved["url"].as_str().unwrap().to_owned();
    assert_eq!(url, format!("/files/{}", saved["fileId"].as_str().unwrap()));

    let shared = bob.recv_type("fileShared").await;
    assert_eq!((shared["user"].as_str(), shared["url"].as_str()), (Some("ada"), Some(url.as_str())));

    let (head, body) = download(server.addr, &url, "").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: image/png"), "{head}");
    assert!(head.contains("attachment; filename=\"photo.png\""), "{head}");
    assert_eq!(body, data);

    // Range requests work too.
    let (head, body) = download(server.addr, &url, "Range: bytes=10-19\r\n").await;
    assert!(head.starts_with("HTTP/1.1 206"), "{head}");
    assert_eq!(body, &data[10..20]);
    server.shutdown().await;
}

#[tokio::test]
async fn out_of_order_chunks_with_a_checksum_are_verified() {
    let server = TestServer::start().await;
    let mut c = server.named("ada").await;
    let data = file_bytes(20_000);
    let start = json!({"type": "fileStart", "name": "a.bin", "size": data.len(), "mimeType": "",
                       "chunkSize": 4096, "sha256": sha256_hex(&data), "transferId": "t-1"});
    c.send(start).await;
    assert_eq!(c.recv_type("fileAccepted").await["transferId"], "t-1");
    let chunks: Vec<&[u8]> = data.chunks(4096).collect();
    for i in [4, 0, 3, 1, 2, 0] {
        c.send_binary(chunk_frame(i, chunks[i as usize])).await;
    }
    c.send(json!({"type": "fileEnd", "transferId": "t-1"})).await;
    let saved = c.recv_skipping_progress("fileSaved").await;
    assert_eq!(saved["mimeType"], "application/octet-stream");
    let (_, body) = download(server.addr, saved["url"].as_str().unwrap(), "").await;
    assert_eq!(body, data);
    server.shutdown().await;
}

#[tokio::test]
async fn bad_uploads_fail_alone_and_the_chat_goes_on() {
    let server = TestServer::start().await;
    let mut c = server.in_room("ada", "r").await;
    let mut bob = server.in_room("bob", "r").await;
    c.recv_type("userJoined").await;
    let data = file_bytes(10_000);

    // A wrong checksum.
    c.send(json!({"type": "fileStart", "name": "x", "size": data.len(), "sha256": "ab".repeat(32)})).await;
    c.send_binary(chunk_frame(0, &data)).await;
    c.send(json!({"type": "fileEnd"})).await;
    let err = c.recv_skipping_progress("fileError").await;
    assert!(err["message"].as_str().unwrap().contains("SHA-256"), "{err}");

    // More bytes than declared: the last chunk is too long. The chunks the
    // client keeps streaming after the failure are dropped quietly.
    c.send(json!({"type": "fileStart", "name": "x", "size": 100})).await;
    c.recv_type("fileAccepted").await;
    c.send_binary(chunk_frame(0, &data[..200])).await;
    let err = c.recv_type("fileError").await;
    assert!(err["message"].as_str().unwrap().contains("exactly 100 bytes"), "{err}");
    c.send_binary(chunk_frame(1, &data[..200])).await;
    c.send(json!({"type": "fileEnd"})).await;
    assert_eq!(c.recv_type("fileError").await["message"], "The upload had already failed; start it again.");

    // Fewer bytes than declared: fileEnd reports what is missing.
    c.send(json!({"type": "fileStart", "name": "x", "size": 70_000})).await;
    c.recv_type("fileAccepted").await;
    c.send_binary(chunk_frame(0, &file_bytes(65_536))).await;
    c.send(json!({"type": "fileEnd"})).await;
    let err = c.recv_skipping_progress("fileError").await;
    assert!(err["message"].as_str().unwrap().contains("chunks missing: 1"), "{err}");

    // A chunk index out of range.
    c.send(json!({"type": "fileStart", "name": "x", "size": 10})).await;
    c.recv_type("fileAccepted").await;
    c.send_binary(chunk_frame(7, b"0123456789")).await;
    assert!(c.recv_type("fileError").await["message"].as_str().unwrap().contains("Chunk 7"));

    // Too large for the server.
    c.send(json!({"type": "fileStart", "name": "x", "size": 200u64 << 20})).await;
    assert!(c.recv_type("fileError").await["message"].as_str().unwrap().contains("too large"));

    // Through all of it the connection stayed open and the chat works.
    c.send(json!({"type": "chatMessage", "text": "still here"})).await;
    assert_eq!(bob.recv_type("chatMessage").await["text"], "still here");
    server.shutdown().await;
}

#[tokio::test]
async fn an_upload_abandoned_by_a_disconnect_resumes_on_another_connection() {
    let server = TestServer::start().await;
    let data = file_bytes(50_000);
    let chunks: Vec<&[u8]> = data.chunks(8192).collect();
    let mut first = server.named("ada").await;
    first
        .send(json!({"type": "fileStart", "name": "big.bin", "size": data.len(), "chunkSize": 8192,
                      "transferId": "resume-me", "sha256": sha256_hex(&data)}))
        .await;
    first.recv_type("fileAccepted").await;
    for i in [0, 1, 2, 5] {
        first.send_binary(chunk_frame(i, chunks[i as usize])).await;
    }
    // A ping's pong comes after the server has handled every chunk before it.
    first.send(json!({"type": "ping", "timestamp": 1})).await;
    first.recv_skipping_progress("pong").await;
    drop(first);

    let mut second = server.named("ada").await;
    let state = loop {
        second.send(json!({"type": "fileResume", "transferId": "resume-me"})).await;
        let msg = second.recv().await;
        if msg["type"] == "fileResumeState" {
            break msg;
        }
        // The first connection's end may not have been processed yet.
        assert_eq!(msg["type"], "fileError", "{msg}");
    };
    assert_eq!(state["chunkSize"], 8192);
    assert_eq!(state["receivedChunks"], json!([[0, 3], [5, 6]]));
    for i in [3, 4, 6] {
        second.send_binary(chunk_frame(i, chunks[i as usize])).await;
    }
    second.send(json!({"type": "fileEnd"})).await;
    let saved = second.recv_skipping_progress("fileSaved").await;
    let (_, body) = download(server.addr, saved["url"].as_str().unwrap(), "").await;
    assert_eq!(body, data);
    server.shutdown().await;
}

#[tokio::test]
async fn a_path_traversal_name_is_stored_safely_under_its_id() {
    let server = TestServer::start().await;
    let mut c = server.named("ada").await;
    c.send(json!({"type": "fileStart", "name": "../../etc/passwd", "size": 4, "mimeType": "text/html"}))
        .await;
    c.send_binary(chunk_frame(0, b"root")).await;
    c.send(json!({"type": "fileEnd"})).await;
    let saved = c.recv_skipping_progress("fileSaved").await;
    assert_eq!(saved["name"], "passwd");
    let id = saved["fileId"].as_str().unwrap();
    assert!(id.len() == 32 && id.chars().all(|ch| ch.is_ascii_hexdigit()));
    let (head, body) = download(server.addr, saved["url"].as_str().unwrap(), "").await;
    assert!(head.contains("attachment; filename=\"passwd\""), "{head}");
    assert!(head.to_ascii_lowercase().contains("x-content-type-options: nosniff"), "{head}");
    assert_eq!(body, b"root");
    // Ids that are not ours are simply not found.
    let (head, _) = download(server.addr, "/files/..%2F..%2Fetc%2Fpasswd", "").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    server.shutdown().await;
}

#[tokio::test]
async fn bidi_controls_are_removed_from_file_names_usernames_and_room_names() {
    let server = TestServer::start().await;
    let mut bob = server.in_room("bob", "general").await;
    // A right-to-left override would show this name as "evilexe.png".
    let mut ada = server.chat().await;
    ada.greeting().await;
    ada.send(json!({"type": "setUsername", "username": "\u{202E}ada\u{2066}"})).await;
    assert_eq!(ada.recv_type("usernameSet").await["username"], "ada");
    ada.send(json!({"type": "joinRoom", "room": "gen\u{200F}eral\u{202C}"})).await;
    let joined = ada.recv_type("userJoined").await;
    assert_eq!((joined["room"].as_str(), joined["userCount"].as_u64()), (Some("general"), Some(2)));
    ada.recv_type("roomJoined").await;
    bob.recv_type("userJoined").await;

    ada.send(json!({"type": "fileStart", "name": "evil\u{202E}gnp.exe", "size": 4, "mimeType": ""})).await;
    ada.send_binary(chunk_frame(0, b"MZ!!")).await;
    ada.send(json!({"type": "fileEnd"})).await;
    let saved = ada.recv_skipping_progress("fileSaved").await;
    assert_eq!(saved["name"], "evilgnp.exe");
    assert_eq!(bob.recv_type("fileShared").await["name"], "evilgnp.exe");
    let (head, _) = download(server.addr, saved["url"].as_str().unwrap(), "").await;
    assert!(
        head.contains("evilgnp.exe") && !head.contains('\u{202E}') && !head.contains("%E2%80%AE"),
        "{head}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn the_upload_quota_is_enforced() {
    let mut config = TestServer::config();
    config.uploads.quota_bytes = 10_000;
    let server = TestServer::with(config).await;
    let mut c = server.named("ada").await;
    c.send(json!({"type": "fileStart", "name": "a", "size": 6_000})).await;
    c.recv_type("fileAccepted").await;
    c.send_binary(chunk_frame(0, &file_bytes(6_000))).await;
    c.send(json!({"type": "fileEnd"})).await;
    c.recv_skipping_progress("fileSaved").await;
    c.send(json!({"type": "fileStart", "name": "b", "size": 6_000})).await;
    let err = c.recv_type("fileError").await;
    assert!(err["message"].as_str().unwrap().contains("upload space is full"), "{err}");

    // An interrupted upload holds its reservation; starting again under the
    // same id replaces it rather than counting it twice.
    c.send(json!({"type": "fileStart", "name": "c", "size": 3_000, "transferId": "again"})).await;
    c.recv_type("fileAccepted").await;
    drop(c);
    let mut c = server.named("ada").await;
    let start = json!({"type": "fileStart", "name": "c", "size": 3_000, "transferId": "again"});
    let accepted = loop {
        c.send(start.clone()).await;
        let msg = c.recv().await;
        if msg["type"] == "fileAccepted" {
            break msg;
        }
        // Until the first connection's end is processed, its upload is
        // still active there and the quota holds it.
        assert_eq!(msg["type"], "fileError", "{msg}");
        c.send(json!({"type": "fileEnd"})).await;
        c.recv().await;
    };
    assert_eq!(accepted["transferId"], "again");
    server.shutdown().await;
}

/// A named chat client whose connection comes from `local` (any 127.x.y.z
/// reaches the server on loopback), so per-address limits see another owner.
async fn named_from(server: &TestServer, local: &str, name: &str) -> Client {
    let mut c = abuse::chat_from(local, server.addr).await;
    c.send(json!({"type": "setUsername", "username": name})).await;
    c.recv_type("usernameSet").await;
    c
}

/// Uploads `data` whole; returns the server's answer to `fileEnd` (or to
/// `fileStart`, when that is refused).
async fn upload_small(c: &mut Client, data: &[u8]) -> Value {
    c.send(json!({"type": "fileStart", "name": "small.txt", "size": data.len(), "mimeType": "text/plain"}))
        .await;
    let reply = c.recv().await;
    if reply["type"] != "fileAccepted" {
        return reply;
    }
    c.send_binary(chunk_frame(0, data)).await;
    c.send(json!({"type": "fileEnd"})).await;
    c.recv_skipping_progress("fileSaved").await
}

impl Client {
    /// The next message that is not `fileProgress`.
    async fn recv_past_progress(&mut self) -> Value {
        loop {
            let msg = self.recv().await;
            if msg["type"] != "fileProgress" {
                return msg;
            }
        }
    }
}

const MIB_100: u64 = 100 << 20;

#[tokio::test]
async fn uploads_that_never_send_a_byte_do_not_hold_the_quota() {
    // Room for two 100 MiB files and a small one.
    let mut config = TestServer::config();
    config.uploads.quota_bytes = 2 * MIB_100 + 10;
    let server = TestServer::with(config).await;
    // Ten fileStarts that send nothing: each interrupts the previous, empty
    // upload, which is dropped at once with its reservation.
    let mut mallory = server.named("mallory").await;
    for i in 0..10 {
        let id = format!("hog-{i}");
        mallory.send(json!({"type": "fileStart", "name": "x", "size": MIB_100, "transferId": id})).await;
        let reply = mallory.recv().await;
        assert_eq!(
            (reply["type"].as_str(), reply["transferId"].as_str()),
            (Some("fileAccepted"), Some(&*id))
        );
    }
    mallory.send(json!({"type": "fileResume", "transferId": "hog-0"})).await;
    let err = mallory.recv_type("fileError").await;
    assert!(err["message"].as_str().unwrap().contains("no interrupted upload"), "{err}");
    let mut ada = named_from(&server, "127.0.0.2", "ada").await;
    let saved = upload_small(&mut ada, b"0123456789").await;
    assert_eq!(saved["type"], "fileSaved", "{saved}");

    // Its last empty upload goes with its connection. (The server has run
    // the connection's end once it answers the close.)
    mallory.ws.close(None).await.unwrap();
    mallory.closed_or_ended().await;
    let mut bob = named_from(&server, "127.0.0.3", "bob").await;
    bob.send(json!({"type": "fileStart", "name": "x", "size": MIB_100, "transferId": "b1"})).await;
    bob.recv_type("fileAccepted").await;
    bob.send_binary(chunk_frame(0, &file_bytes(65_536))).await;
    // b1 has bytes, so it stays reserved while b2 takes the rest.
    bob.send(json!({"type": "fileStart", "name": "x", "size": MIB_100, "transferId": "b2"})).await;
    let reply = bob.recv_past_progress().await;
    assert_eq!(reply["type"], "fileAccepted", "{reply}");
    server.shutdown().await;
}

#[tokio::test]
async fn one_address_cannot_reserve_the_whole_upload_quota() {
    let mut config = TestServer::config();
    config.uploads.quota_bytes = 10 * MIB_100;
    let server = TestServer::with(config).await;
    let mut mallory = server.named("mallory").await;
    // Each upload gets its first chunk, so it is kept for resume when the
    // next one starts.
    let chunk = file_bytes(65_536);
    let mut accepted = 0;
    let refusal = loop {
        let id = format!("big-{accepted}");
        mallory.send(json!({"type": "fileStart", "name": "x", "size": MIB_100, "transferId": id})).await;
        let reply = mallory.recv_past_progress().await;
        if reply["type"] != "fileAccepted" {
            break reply;
        }
        accepted += 1;
        assert!(accepted < 10, "one address reserved the whole quota");
        mallory.send_binary(chunk_frame(0, &chunk)).await;
    };
    assert_eq!((accepted, refusal["type"].as_str()), (2, Some("fileError")), "{refusal}");
    let message = refusal["message"].as_str().unwrap();
    assert!(message.contains("one user may reserve"), "{message}");

    // Small ones too, up to a handful of uploads in flight.
    let refusal = loop {
        let id = format!("small-{accepted}");
        mallory.send(json!({"type": "fileStart", "name": "x", "size": 100_000, "transferId": id})).await;
        let reply = mallory.recv_past_progress().await;
        if reply["type"] != "fileAccepted" {
            break reply;
        }
        accepted += 1;
        assert!(accepted < 10, "one address has {accepted} uploads in flight");
        mallory.send_binary(chunk_frame(0, &chunk)).await;
    };
    assert_eq!(accepted, 4, "{refusal}");
    assert!(refusal["message"].as_str().unwrap().contains("4 unfinished uploads"), "{refusal}");

    // Meanwhile another address uploads as usual.
    let mut ada = named_from(&server, "127.0.0.2", "ada").await;
    let saved = upload_small(&mut ada, b"0123456789").await;
    assert_eq!(saved["type"], "fileSaved", "{saved}");
    server.shutdown().await;
}

#[tokio::test]
async fn downloads_are_never_served_as_something_a_browser_runs() {
    let server = TestServer::start().await;
    let mut c = server.named("ada").await;
    let script = b"document.title = 'pwned';";
    for (mime, served) in [
        ("text/javascript", "application/octet-stream"),
        ("text/html", "application/octet-stream"),
        ("image/svg+xml", "application/octet-stream"),
        ("text/css", "application/octet-stream"),
        ("image/png", "image/png"),
        ("text/plain", "text/plain"),
    ] {
        c.send(json!({"type": "fileStart", "name": "f", "size": script.len(), "mimeType": mime})).await;
        c.recv_type("fileAccepted").await;
        c.send_binary(chunk_frame(0, script)).await;
        c.send(json!({"type": "fileEnd"})).await;
        let saved = c.recv_skipping_progress("fileSaved").await;
        let (head, body) = download(server.addr, saved["url"].as_str().unwrap(), "").await;
        assert_eq!(body, script);
        let head = head.to_ascii_lowercase();
        assert!(head.contains(&format!("\r\ncontent-type: {served}\r\n")), "{mime}: {head}");
        // Its own policy, not the page's: no origin, nothing loads.
        assert!(head.contains("\r\ncontent-security-policy: sandbox; default-src 'none'\r\n"), "{head}");
        assert_eq!(head.matches("content-security-policy").count(), 1, "{head}");
        assert!(head.contains("\r\ncross-origin-resource-policy: same-origin\r\n"), "{head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    }
    server.shutdown().await;
}

// ----- admission and limits -----------------------------------------------------

async fn connect_with_origin(server: &TestServer, origin: &str) -> Result<Client, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = server.url("/ws/chat").into_client_request().unwrap();
    request.headers_mut().insert("origin", origin.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(Client { ws }),
        Err(err) => Err(err.to_string()),
    }
}

#[tokio::test]
async fn browser_origins_are_checked() {
    let mut config = TestServer::config();
    config.allowed_origins = vec!["https://app.example".into()];
    let server = TestServer::with(config).await;
    // Its own origin, an allowed one, and none at all are accepted.
    connect_with_origin(&server, &format!("http://{}", server.addr)).await.unwrap().greeting().await;
    connect_with_origin(&server, "https://app.example").await.unwrap().greeting().await;
    server.chat().await.greeting().await;
    let refused = connect_with_origin(&server, "https://evil.example").await.err().unwrap();
    assert!(refused.contains("403"), "{refused}");
    server.shutdown().await;
}

#[tokio::test]
async fn connection_caps_refuse_with_503_and_free_places_on_close() {
    let mut config = TestServer::config();
    config.limits.max_connections_per_ip = 2;
    let server = TestServer::with(config).await;
    let mut a = server.chat().await;
    a.greeting().await;
    let mut b = server.chat().await;
    b.greeting().await;
    let refused = tokio_tungstenite::connect_async(server.url("/ws/chat")).await.unwrap_err();
    assert!(refused.to_string().contains("503"), "{refused}");
    a.ws.close(None).await.unwrap();
    a.closed_or_ended().await;
    // The place is free again once the server has seen the close.
    let mut c = loop {
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(server.url("/ws/chat")).await {
            break Client { ws };
        }
        tokio::task::yield_now().await;
    };
    c.greeting().await;
    server.shutdown().await;

    let mut config = TestServer::config();
    config.limits.max_connections = 1;
    let server = TestServer::with(config).await;
    let _only = server.chat().await;
    let refused = tokio_tungstenite::connect_async(server.url("/ws/echo")).await.unwrap_err();
    assert!(refused.to_string().contains("503"), "{refused}");
    server.shutdown().await;
}

impl Client {
    /// Reads until the connection ends, whatever arrives.
    async fn closed_or_ended(&mut self) {
        timeout(WAIT, async { while let Some(Ok(_)) = self.ws.next().await {} }).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_limited_then_closed_and_nobody_else_notices() {
    let mut config = TestServer::config();
    config.rate_limit.chat_burst = 5;
    config.rate_limit.flood_strikes = 20;
    let server = TestServer::with(config).await;
    let mut flood = server.in_room("flood", "r").await;
    let mut calm = server.in_room("calm", "r").await;
    flood.recv_type("userJoined").await;
    let mut reader = server.in_room("reader", "r").await;
    flood.recv_type("userJoined").await;
    calm.recv_type("userJoined").await;

    for i in 0..100 {
        if flood
            .ws
            .send(Message::text(json!({"type": "chatMessage", "text": format!("spam {i}")}).to_string()))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut limited = 0;
    let code = loop {
        match timeout(WAIT, flood.ws.next()).await.unwrap() {
            Some(Ok(Message::Text(text))) => {
                let msg: Value = serde_json::from_str(&text).unwrap();
                if msg["code"] == "rateLimited" {
                    assert!(msg["retryAfterMs"].as_u64().unwrap() > 0);
                    limited += 1;
                }
            }
            Some(Ok(Message::Close(frame))) => break frame.unwrap().code,
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, CloseCode::Policy);
    // Strikes refill slowly (20 per 10 s), so a fast flood gets about 20.
    assert!((20..=25).contains(&limited), "every refusal is reported until the close: {limited}");

    // The room got the burst (and what the refill allowed), in order, then
    // the flooder's departure; the calm member chats as usual.
    let mut delivered = 0;
    loop {
        let msg = reader.recv().await;
        match msg["type"].as_str().unwrap() {
            "chatMessage" => {
                assert_eq!(msg["text"], format!("spam {delivered}"));
                delivered += 1;
            }
            "userLeft" => break,
            other => panic!("unexpected {other}"),
        }
    }
    assert!((5..100 - 20).contains(&delivered), "the burst and no more: {delivered}");
    calm.send(json!({"type": "chatMessage", "text": "hello"})).await;
    assert_eq!(reader.recv_type("chatMessage").await["text"], "hello");
    assert_eq!(server.status().await["rateLimited"], limited + 1);
    server.shutdown().await;
}

#[tokio::test]
async fn typing_is_broadcast_at_most_once_per_interval() {
    let server = TestServer::start().await;
    let mut ada = server.in_room("ada", "r").await;
    let mut bob = server.in_room("bob", "r").await;
    ada.recv_type("userJoined").await;
    for _ in 0..5 {
        bob.send(json!({"type": "typing"})).await;
    }
    assert_eq!(ada.recv_type("userTyping").await["user"], "bob");
    ada.expect_nothing_pending().await;
    server.shutdown().await;
}

#[tokio::test]
async fn http_responses_carry_security_headers() {
    let server = TestServer::start().await;
    let (head, _) = http_raw(server.addr, "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").await;
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-security-policy: default-src 'self'"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert!(head.contains("referrer-policy: no-referrer"), "{head}");
    server.shutdown().await;
}

// ----- metrics ------------------------------------------------------------------

/// Parses Prometheus text format strictly enough to catch a malformed line:
/// returns `name{labels}` -> value.
fn parse_prometheus(text: &str) -> std::collections::HashMap<String, f64> {
    let mut samples = std::collections::HashMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            let kind = words.next().unwrap();
            assert!(kind == "HELP" || kind == "TYPE", "bad comment line {line:?}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') && !name.is_empty(),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels in {line:?}");
        }
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        samples.insert(series.to_owned(), value);
    }
    samples
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let server = TestServer::start().await;
    let scrape = || async {
        let (status, body) = http_get(server.addr, "/metrics").await;
        assert!(status.contains("200"), "{status}");
        parse_prometheus(&body)
    };
    let before = scrape().await;
    let mut ada = server.in_room("ada", "r").await;
    let mut bob = server.in_room("bob", "r").await;
    ada.recv_type("userJoined").await;
    ada.send(json!({"type": "chatMessage", "text": "counted"})).await;
    bob.recv_type("chatMessage").await;
    let after = scrape().await;

    let get = |m: &std::collections::HashMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    assert_eq!(get(&after, "hubbub_connections_open{endpoint=\"chat\"}"), 2.0);
    assert_eq!(get(&after, "hubbub_connections_accepted_total{endpoint=\"chat\"}"), 2.0);
    assert_eq!(get(&after, "hubbub_rooms"), 1.0);
    assert!(
        get(&after, "hubbub_messages_received_total") >= get(&before, "hubbub_messages_received_total") + 5.0
    );
    assert!(get(&after, "hubbub_messages_delivered_total") > get(&before, "hubbub_messages_delivered_total"));
    assert!(get(&after, "hubbub_bytes_received_total") > 0.0);
    assert!(get(&after, "hubbub_broadcast_fanout_seconds_count") >= 3.0);
    server.shutdown().await;

    let mut config = TestServer::config();
    config.metrics.enabled = false;
    let server = TestServer::with(config).await;
    let (status, _) = http_get(server.addr, "/metrics").await;
    assert!(status.contains("404"), "{status}");
    server.shutdown().await;
}

// ----- TLS ----------------------------------------------------------------------

/// A self-signed certificate for localhost and 127.0.0.1, written as PEM
/// files into a fresh directory: (dir, cert path, key path, cert DER).
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (cert, key, certified.cert.der().to_vec())
}

fn tls_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("hubbub-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Connects over TLS trusting `ca_der`; returns the client and the
/// certificate the server presented.
async fn connect_tls(addr: SocketAddr, path: &str, ca_der: &[u8]) -> (Client, Vec<u8>) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from(ca_der.to_vec())).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let url = format!("wss://localhost:{}{path}", addr.port());
    let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Rustls(tls)).await.unwrap();
    (Client { ws }, presented)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_chat_works_with_a_node_client_and_survives_a_certificate_reload() {
    let Some(interop) = node_interop() else { return };
    let dir = tls_dir();
    let (cert, key, der) = self_signed(&dir);
    let mut config = TestServer::config();
    config.tls = Some(hubbub_server::TlsSettings {
        cert: cert.clone(),
        key: key.clone(),
        handshake_timeout: Duration::from_secs(5),
        max_pending_handshakes: 64,
    });
    let server = TestServer::with(config).await;

    let (mut ada, presented) = connect_tls(server.addr, "/ws/chat", &der).await;
    assert_eq!(presented, der);
    ada.greeting().await;
    ada.send(json!({"type": "setUsername", "username": "ada"})).await;
    ada.send(json!({"type": "joinRoom", "room": "tls"})).await;
    ada.recv_type("usernameSet").await;
    ada.recv_type("userJoined").await;
    ada.recv_type("roomJoined").await;

    // A Node `ws` client that trusts the certificate joins and chats.
    let node = tokio::process::Command::new("node")
        .arg(interop.join("wss_client.mjs"))
        .arg(format!("wss://localhost:{}/ws/chat", server.addr.port()))
        .arg(&cert)
        .kill_on_drop(true)
        .output();
    let mut node = tokio::spawn(timeout(Duration::from_secs(30), node));
    // Until it has joined, the client ending (a refused certificate, a
    // missing module) is the failure to report, not ada's wait for it.
    let joined = tokio::select! {
        joined = ada.recv_type("userJoined") => joined,
        exited = &mut node => {
            let output = exited.unwrap().expect("the node client ends within 30 s").expect("node runs");
            panic!("the node client ended before joining: {}", node_said(&output))
        }
    };
    assert_eq!(joined["user"], "node");
    assert_eq!(ada.recv_type("chatMessage").await["text"], "hello over TLS");
    ada.send(json!({"type": "chatMessage", "text": "hello node"})).await;
    let output = node.await.unwrap().unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "node: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout.trim(), "ok");

    // A new certificate, reloaded: new connections get it, ada stays.
    let (_, _, new_der) = self_signed(&dir);
    server.tls().unwrap().reload().unwrap();
    let (mut bob, presented) = connect_tls(server.addr, "/ws/chat", &new_der).await;
    assert_eq!(presented, new_der);
    bob.greeting().await;
    bob.send(json!({"type": "setUsername", "username": "bob"})).await;
    bob.send(json!({"type": "joinRoom", "room": "tls"})).await;
    assert_eq!(ada.recv_type("userLeft").await["user"], "node");
    assert_eq!(ada.recv_type("userJoined").await["user"], "bob");
    bob.recv_type("usernameSet").await;
    bob.recv_type("userJoined").await;
    bob.recv_type("roomJoined").await;
    bob.send(json!({"type": "chatMessage", "text": "after reload"})).await;
    assert_eq!(ada.recv_type("chatMessage").await["text"], "after reload");
    server.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_bad_certificate_is_an_error_before_the_port_opens() {
    let dir = tls_dir();
    let (cert, _, _) = self_signed(&dir);
    std::fs::write(dir.join("garbage.pem"), "not a key").unwrap();
    let mut config = TestServer::config();
    // No `TestServer` runs to remove its scratch directory, and the upload
    // directory is made before the certificate is read: keep it in `dir`.
    config.uploads.dir = dir.join("uploads");
    config.tls = Some(hubbub_server::TlsSettings {
        cert,
        key: dir.join("garbage.pem"),
        handshake_timeout: Duration::from_secs(5),
        max_pending_handshakes: 64,
    });
    // The whole chain, as the binary prints it with `{:#}`.
    let chain = |err: hubbub_server::ConfigError| {
        let mut text = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        text
    };
    let err = chain(Server::new(config.clone()).unwrap_err());
    assert!(err.contains("private key"), "{err}");
    config.tls.as_mut().unwrap().cert = dir.join("missing.pem");
    let err = chain(Server::new(config).unwrap_err());
    assert!(err.contains("missing.pem"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

// ----- token authentication -----------------------------------------------------

const SECRET: &str = "a test secret that is at least thirty-two bytes long";

#[allow(clippy::needless_pass_by_value)] // callers build the claims inline
fn token(claims: Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
}

fn now_secs() -> u64 {
    now_ms() / 1000
}

fn auth_config() -> Config {
    let mut config = TestServer::config();
    config.auth.secret = Some(SECRET.to_owned());
    config
}

#[tokio::test]
async fn a_token_on_the_url_or_header_binds_the_username_and_rooms() {
    let server = TestServer::with(auth_config()).await;
    let valid = token(json!({"sub": "ada", "exp": now_secs() + 600, "rooms": ["allowed"]}));
    let mut ada = Client::connect(&format!("{}?token={valid}", server.url("/ws/chat"))).await;
    ada.greeting().await;
    assert_eq!(ada.recv_type("authenticated").await["user"], "ada");
    // The token's name wins; setUsername cannot change it.
    ada.send(json!({"type": "setUsername", "username": "mallory"})).await;
    assert_eq!(ada.recv_type("error").await["code"], "usernameLocked");
    ada.send(json!({"type": "joinRoom", "room": "secret"})).await;
    assert_eq!(ada.recv_type("error").await["code"], "roomForbidden");
    ada.send(json!({"type": "joinRoom", "room": "allowed"})).await;
    assert_eq!(ada.recv_type("userJoined").await["user"], "ada");

    // Authorization: Bearer works too, and `name` beats `sub`.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = server.url("/ws/chat").into_client_request().unwrap();
    let bearer = token(json!({"sub": "u-42", "name": "bob", "exp": now_secs() + 600}));
    request.headers_mut().insert("authorization", format!("Bearer {bearer}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut bob = Client { ws };
    bob.greeting().await;
    assert_eq!(bob.recv_type("authenticated").await["user"], "bob");
    server.shutdown().await;
}

#[tokio::test]
async fn bad_tokens_are_refused() {
    let server = TestServer::with(auth_config()).await;
    let forged = {
        let key = jsonwebtoken::EncodingKey::from_secret(b"some other secret, also thirty-two bytes");
        let claims = json!({"sub": "ada", "exp": now_secs() + 600});
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
    };
    let expired = token(json!({"sub": "ada", "exp": now_secs() - 10}));
    for bad in [forged, expired, "not.a.token".to_owned()] {
        let err = tokio_tungstenite::connect_async(format!("{}?token={bad}", server.url("/ws/chat")))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("401"), "{err}");
    }
    // Without a token the first message must be `auth`.
    let mut c = server.chat().await;
    c.greeting().await;
    c.send(json!({"type": "setUsername", "username": "ada"})).await;
    assert_eq!(c.recv_type("error").await["code"], "unauthenticated");
    assert_eq!(c.closed().await, CloseCode::from(4003));
    server.shutdown().await;
}

#[tokio::test]
async fn tokens_not_yet_valid_or_for_another_audience_or_issuer_are_refused() {
    let upgrade = |server: &TestServer, claims: Value| {
        let url = format!("{}?token={}", server.url("/ws/chat"), token(claims));
        async move { tokio_tungstenite::connect_async(url).await.map(|_| ()).map_err(|e| e.to_string()) }
    };
    let exp = now_secs() + 600;
    let server = TestServer::with(auth_config()).await;
    let err =
        upgrade(&server, json!({"sub": "ada", "exp": exp, "nbf": now_secs() + 3600})).await.unwrap_err();
    assert!(err.contains("401"), "{err}");
    upgrade(&server, json!({"sub": "ada", "exp": exp, "nbf": now_secs() - 5})).await.unwrap();
    server.shutdown().await;

    let mut config = auth_config();
    config.auth.audience = Some("hubbub".to_owned());
    config.auth.issuer = Some("https://id.example".to_owned());
    config.auth.leeway = Duration::from_secs(120);
    let server = TestServer::with(config).await;
    // Within the leeway, with the right audience and issuer.
    let good = json!({"sub": "ada", "exp": exp, "nbf": now_secs() + 60, "aud": "hubbub", "iss": "https://id.example"});
    upgrade(&server, good).await.unwrap();
    for bad in [
        json!({"sub": "ada", "exp": exp, "iss": "https://id.example"}),
        json!({"sub": "ada", "exp": exp, "aud": "elsewhere", "iss": "https://id.example"}),
        json!({"sub": "ada", "exp": exp, "aud": "hubbub", "iss": "https://evil.example"}),
        json!({"sub": "ada", "exp": exp, "aud": "hubbub", "iss": "https://id.example", "nbf": now_secs() + 600}),
    ] {
        let err = upgrade(&server, bad.clone()).await.unwrap_err();
        assert!(err.contains("401"), "{bad}: {err}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_token_can_come_as_the_first_message_and_be_refreshed_before_it_expires() {
    let mut config = auth_config();
    config.auth.expiry_warning = Duration::from_millis(1500);
    let server = TestServer::with(config).await;
    let mut c = server.chat().await;
    c.greeting().await;
    // exp has whole-second resolution: this token expires in 2 to 3 s.
    let soon = now_secs() + 3;
    c.send(json!({"type": "auth", "token": token(json!({"sub": "ada", "exp": soon}))})).await;
    assert_eq!(c.recv_type("authenticated").await["expiresAt"], soon * 1000);
    let warning = c.recv_type("authExpiring").await;
    assert_eq!(warning["expiresAt"], soon * 1000);
    // Refreshed in place: the connection stays, with the new expiry.
    let later = now_secs() + 600;
    c.send(json!({"type": "auth", "token": token(json!({"sub": "ada", "exp": later}))})).await;
    assert_eq!(c.recv_type("authenticated").await["expiresAt"], later * 1000);
    // A token for someone else does not replace it.
    c.send(json!({"type": "auth", "token": token(json!({"sub": "eve", "exp": later}))})).await;
    assert_eq!(c.recv_type("error").await["code"], "authFailed");
    c.send(json!({"type": "joinRoom", "room": "r"})).await;
    assert_eq!(c.recv_type("userJoined").await["user"], "ada");
    server.shutdown().await;
}

#[tokio::test]
async fn an_expired_token_closes_the_connection_with_4001_after_a_warning() {
    let mut config = auth_config();
    config.auth.expiry_warning = Duration::from_millis(500);
    let server = TestServer::with(config).await;
    let exp = now_secs() + 2;
    let mut c = Client::connect(&format!(
        "{}?token={}",
        server.url("/ws/chat"),
        token(json!({"sub": "ada", "exp": exp}))
    ))
    .await;
    c.greeting().await;
    c.recv_type("authenticated").await;
    c.recv_type("authExpiring").await;
    assert_eq!(c.recv_type("error").await["code"], "tokenExpired");
    assert_eq!(c.closed().await, CloseCode::from(4001));
    assert!(now_ms() >= exp * 1000, "not closed before the expiry");
    server.shutdown().await;
}

#[tokio::test]
async fn es256_tokens_are_verified_with_a_public_key() {
    let dir = tls_dir();
    let key_pair = rcgen::KeyPair::generate().unwrap();
    std::fs::write(dir.join("public.pem"), key_pair.public_key_pem()).unwrap();
    let mut config = TestServer::config();
    config.auth.public_key = Some(dir.join("public.pem"));
    let server = TestServer::with(config).await;
    let encoding = jsonwebtoken::EncodingKey::from_ec_pem(key_pair.serialize_pem().as_bytes()).unwrap();
    let signed = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &json!({"sub": "ada", "exp": now_secs() + 600}),
        &encoding,
    )
    .unwrap();
    let mut c = Client::connect(&format!("{}?token={signed}", server.url("/ws/chat"))).await;
    c.greeting().await;
    assert_eq!(c.recv_type("authenticated").await["user"], "ada");
    // An HS256 token is refused by an ES256 server.
    let hs = token(json!({"sub": "ada", "exp": now_secs() + 600}));
    assert!(
        tokio_tungstenite::connect_async(format!("{}?token={hs}", server.url("/ws/chat"))).await.is_err()
    );
    server.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}
