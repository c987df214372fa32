//! The hub fed an arbitrary sequence of client commands, through its public
//! behaviour: a real `hubbub_server::Server` on 127.0.0.1:0 in this process
//! (one for the whole fuzzing run), up to four WebSocket clients, and a small
//! model of rooms and members that says what each client must receive.
//!
//! After every command each connected client sends a `ping` and reads up to
//! its `pong`: the server handles a connection's frames in order and queues a
//! broadcast before it handles the next frame, so everything the command
//! caused is in front of that `pong`. What each client read must equal what
//! the model expects, event for event (server clocks left out). After the
//! sequence, `GET /api/rooms` must list exactly the model's rooms with their
//! member counts; then every client disconnects and the server must come back
//! to no connections and no rooms.
//!
//! Invariants this checks: a client is in at most one room (it never hears
//! from two), member counts in every event and in `/api/rooms` match the
//! members, no empty room survives a leave or a disconnect, broadcasts reach
//! the other members and never the sender, nothing a client sends breaks its
//! connection or anyone else's.
//!
//! The hub's internals are crate-private, so this drives them through
//! sockets, which costs a few hundred microseconds per command. A
//! socket-free hook would make this target far faster; docs/FUZZING.md
//! describes the one to add.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::Arbitrary;
use futures_util::{SinkExt, StreamExt};
use hubbub_protocol::{ClientMessage, Limits, ProtocolError, ServerMessage, decode_client};
use hubbub_server::{Config, Server};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Clients per sequence.
const CLIENTS: usize = 4;
/// Commands per sequence; more adds little but time.
const MAX_OPS: usize = 64;
/// How long the server may take to answer anything. Reaching it is a finding.
const WAIT: Duration = Duration::from_secs(10);
/// Frames larger than this would be refused by the server's size limit, which
/// closes the connection; that path is the transport's, not the hub's.
const MAX_FRAME: usize = 60_000;
/// The name of a client that set none.
const ANONYMOUS: &str = "Anonymous";

#[derive(Debug, Arbitrary)]
struct Input {
    /// Clients connected before the first command (at least one).
    initial: u8,
    ops: Vec<Op>,
}

#[derive(Debug, Arbitrary)]
struct Op {
    /// Which client acts, modulo [`CLIENTS`].
    client: u8,
    action: Action,
}

#[derive(Debug, Arbitrary)]
enum Action {
    Connect,
    Disconnect { abrupt: bool },
    SetUsername(Name),
    JoinRoom(Name),
    LeaveRoom,
    ChatMessage { text: Text, id: Option<u8> },
    Typing,
    Lobby { user: Option<Name>, text: Text },
    Ping(i32),
    FileEnd,
    Binary(Vec<u8>),
    Raw(String),
}

/// Names: mostly a few that collide, so rooms fill up; any string sometimes.
#[derive(Debug, Arbitrary)]
enum Name {
    Ada,
    Bob,
    General,
    Padded,
    Blank,
    Other(String),
}

impl Name {
    fn as_str(&self) -> &str {
        match self {
            Self::Ada => "ada",
            Self::Bob => "bob",
            Self::General => "general",
            Self::Padded => "  general ",
            Self::Blank => " ",
            Self::Other(s) => s,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Text {
    Hello,
    Blank,
    Other(String),
}

impl Text {
    fn as_str(&self) -> &str {
        match self {
            Self::Hello => "hello",
            Self::Blank => "\n ",
            Self::Other(s) => s,
        }
    }
}

impl Action {
    /// The frame a client sends for this action, if it sends one.
    fn frame(&self) -> Option<Message> {
        let json = match self {
            Self::Connect | Self::Disconnect { .. } => return None,
            Self::SetUsername(name) => json!({"type": "setUsername", "username": name.as_str()}),
            Self::JoinRoom(room) => json!({"type": "joinRoom", "room": room.as_str()}),
            Self::LeaveRoom => json!({"type": "leaveRoom"}),
            Self::ChatMessage { text, id } => {
                let mut msg = json!({"type": "chatMessage", "text": text.as_str()});
                if let Some(id) = id {
                    msg["clientMsgId"] = json!(format!("00000000-0000-4000-8000-{id:012x}"));
                }
                msg
            }
            Self::Typing => json!({"type": "typing"}),
            Self::Lobby { user, text } => match user {
                Some(user) => json!({"type": "chat", "user": user.as_str(), "text": text.as_str()}),
                None => json!({"type": "chat", "text": text.as_str()}),
            },
            Self::Ping(timestamp) => json!({"type": "ping", "timestamp": timestamp}),
            Self::FileEnd => json!({"type": "fileEnd"}),
            Self::Binary(data) => return Some(Message::Binary(data.clone().into())),
            Self::Raw(text) => return Some(Message::Text(text.clone().into())),
        };
        Some(Message::Text(json.to_string().into()))
    }
}

/// The server, started once for the whole run on a single-threaded runtime
/// that only runs while an input is being tried.
struct Harness {
    runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

fn harness() -> &'static Harness {
    HARNESS.get_or_init(|| {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        let addr = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
            let addr = listener.local_addr().expect("bound address");
            let mut config = Config::default();
            config.rate_limit.enabled = false;
            // One `userTyping` per member per join: deterministic, whatever
            // the speed of the run.
            config.rate_limit.typing_broadcast_interval = Duration::from_secs(3600);
            config.uploads.enabled = false;
            config.uploads.dir = std::env::temp_dir().join(format!("hubbub-fuzz-{}", std::process::id()));
            config.limits.max_connections_per_ip = 0;
            config.close_timeout = Duration::from_millis(200);
            let server = Server::new(config).expect("the fuzz config is valid");
            tokio::spawn(server.run(listener, std::future::pending()));
            addr
        });
        Harness { runtime, addr }
    })
}

fuzz_target!(|input: Input| {
    let harness = harness();
    harness.runtime.block_on(run(harness.addr, &input));
});

/// What one client's session holds, in the model.
#[derive(Debug, Default)]
struct Member {
    username: Option<String>,
    room: Option<String>,
    /// Whether a `userTyping` went out since the last join.
    typed: bool,
}

#[derive(Debug, Default)]
struct Room {
    members: BTreeSet<usize>,
    /// Message ids seen, for de-duplication.
    ids: BTreeSet<String>,
}

/// Rooms and members as a correct hub keeps them.
#[derive(Debug, Default)]
struct Model {
    clients: [Option<Member>; CLIENTS],
    rooms: BTreeMap<String, Room>,
}

/// What each client must receive next, normalized.
type Expect = [Vec<Value>; CLIENTS];

fn push(out: &mut Expect, client: usize, msg: &ServerMessage) {
    out[client].push(normalize(serde_json::to_value(msg).expect("server messages serialize")));
}

/// Leaves out what depends on the server's clock and wording: timestamps,
/// `serverTime`, the text of errors (their `code` stays).
fn normalize(mut value: Value) -> Value {
    let Some(object) = value.as_object_mut() else { return value };
    match object.get("type").and_then(Value::as_str) {
        Some("chatMessage" | "messageAck") => {
            object.remove("timestamp");
        }
        Some("pong") => {
            object.remove("serverTime");
        }
        Some("error") => {
            object.retain(|key, _| key == "type" || key == "code");
        }
        _ => {}
    }
    value
}

impl Model {
    fn member(&mut self, client: usize) -> &mut Member {
        self.clients[client].as_mut().expect("only connected clients act")
    }

    fn name(&self, client: usize) -> String {
        let member = self.clients[client].as_ref().expect("only connected clients act");
        member.username.clone().unwrap_or_else(|| ANONYMOUS.to_owned())
    }

    fn connected(&self) -> usize {
        self.clients.iter().flatten().count()
    }

    fn apply(&mut self, client: usize, decoded: Result<ClientMessage, ProtocolError>, out: &mut Expect) {
        let msg = match decoded {
            Ok(msg) => msg,
            Err(err) => return push(out, client, &err.to_event()),
        };
        match msg {
            ClientMessage::SetUsername { username } => {
                push(out, client, &ServerMessage::UsernameSet { username: username.clone() });
                self.member(client).username = Some(username);
            }
            ClientMessage::JoinRoom { room } => {
                if self.member(client).room.as_deref() == Some(room.as_str()) {
                    let user_count = self.rooms[&room].members.len();
                    return push(out, client, &ServerMessage::RoomJoined { room, user_count });
                }
                self.leave(client, out);
                let user = self.name(client);
                let members = &mut self.rooms.entry(room.clone()).or_default().members;
                members.insert(client);
                let user_count = members.len();
                let joined = ServerMessage::UserJoined { user, room: room.clone(), user_count };
                for &m in members.iter() {
                    push(out, m, &joined);
                }
                push(out, client, &ServerMessage::RoomJoined { room: room.clone(), user_count });
                let member = self.member(client);
                member.room = Some(room);
                member.typed = false;
            }
            ClientMessage::LeaveRoom {} => match self.leave(client, out) {
                Some(room) => push(out, client, &ServerMessage::RoomLeft { room }),
                None => push(out, client, &ServerMessage::error("", "notInRoom")),
            },
            ClientMessage::ChatMessage { text, client_msg_id } => {
                let Some(name) = self.member(client).room.clone() else {
                    return push(out, client, &ServerMessage::error("", "notInRoom"));
                };
                let user = self.name(client);
                let room = self.rooms.get_mut(&name).expect("a member's room exists");
                let ack =
                    client_msg_id.map(|id| ServerMessage::MessageAck { client_msg_id: id, timestamp: 0 });
                if let Some(id) = client_msg_id
                    && !room.ids.insert(id.uuid().to_string())
                {
                    // A resend: acknowledged again, delivered once.
                    return push(out, client, &ack.expect("an id was given"));
                }
                let msg = ServerMessage::ChatMessage { user, text, timestamp: 0, client_msg_id };
                for &m in room.members.iter().filter(|&&m| m != client) {
                    push(out, m, &msg);
                }
                if let Some(ack) = ack {
                    push(out, client, &ack);
                }
            }
            ClientMessage::Typing {} => {
                let user = self.name(client);
                let member = self.member(client);
                let Some(name) = member.room.clone().filter(|_| !member.typed) else { return };
                member.typed = true;
                let msg = ServerMessage::UserTyping { user };
                for &m in self.rooms[&name].members.iter().filter(|&&m| m != client) {
                    push(out, m, &msg);
                }
            }
            ClientMessage::Chat { user, text } => {
                let user = self.member(client).username.clone().or(user).unwrap_or_else(|| ANONYMOUS.into());
                let msg = ServerMessage::Chat { user, text };
                for m in (0..CLIENTS).filter(|&m| self.clients[m].is_some()) {
                    push(out, m, &msg);
                }
            }
            ClientMessage::Ping { timestamp } => {
                push(out, client, &ServerMessage::Pong { timestamp, server_time: 0 });
            }
            ClientMessage::FileStart { .. } | ClientMessage::FileResume { .. } => {
                push(out, client, &ServerMessage::error("", "uploadsDisabled"));
            }
            ClientMessage::FileEnd { .. } => push(out, client, &ServerMessage::error("", "noUpload")),
            // The harness runs without token authentication.
            ClientMessage::Auth { .. } => push(out, client, &ServerMessage::error("", "authDisabled")),
        }
    }

    /// Takes `client` out of its room, telling those who remain; returns the
    /// room's name.
    fn leave(&mut self, client: usize, out: &mut Expect) -> Option<String> {
        let user = self.name(client);
        let name = self.member(client).room.take()?;
        let room = self.rooms.get_mut(&name).expect("a member's room exists");
        room.members.remove(&client);
        let user_count = room.members.len();
        if user_count == 0 {
            self.rooms.remove(&name);
        } else {
            let msg = ServerMessage::UserLeft { user, user_count, room: Some(name.clone()) };
            for &m in room.members.iter() {
                push(out, m, &msg);
            }
        }
        Some(name)
    }

    fn disconnect(&mut self, client: usize, out: &mut Expect) {
        self.leave(client, out);
        self.clients[client] = None;
    }
}

async fn run(addr: SocketAddr, input: &Input) {
    let mut model = Model::default();
    let mut sockets: [Option<Ws>; CLIENTS] = Default::default();
    let mut barrier = Barrier { round: 0 };
    let initial = usize::from(input.initial).clamp(1, CLIENTS);
    for (socket, member) in sockets.iter_mut().zip(model.clients.iter_mut()).take(initial) {
        *socket = Some(connect(addr).await);
        *member = Some(Member::default());
    }
    for op in input.ops.iter().take(MAX_OPS) {
        let client = usize::from(op.client) % CLIENTS;
        let mut expect = Expect::default();
        match &op.action {
            Action::Connect => {
                if sockets[client].is_some() {
                    continue;
                }
                sockets[client] = Some(connect(addr).await);
                model.clients[client] = Some(Member::default());
            }
            Action::Disconnect { abrupt } => {
                let Some(ws) = sockets[client].take() else { continue };
                close(ws, *abrupt).await;
                model.disconnect(client, &mut expect);
                wait_for(addr, model.connected(), None).await;
            }
            action => {
                let Some(ws) = sockets[client].as_mut() else { continue };
                let Some(frame) = action.frame().filter(|f| f.len() <= MAX_FRAME) else { continue };
                let decoded = match &frame {
                    Message::Text(text) => decode_client(text, &Limits::default()),
                    // Uploads are off, so no upload is ever in progress.
                    _ => Err(ProtocolError::InvalidFormat),
                };
                let binary = frame.is_binary();
                ws.send(frame).await.expect("the server accepts the frame");
                if binary {
                    push(&mut expect, client, &ServerMessage::error("", "noUpload"));
                } else {
                    model.apply(client, decoded, &mut expect);
                }
            }
        }
        barrier.check(&mut sockets, &expect, op).await;
    }

    let rooms: Vec<Value> = model
        .rooms
        .iter()
        .map(|(name, room)| json!({"name": name, "userCount": room.members.len()}))
        .collect();
    let listed = http_json(addr, "/api/rooms").await;
    assert_eq!(listed, Value::Array(rooms), "/api/rooms disagrees with the model");

    for (client, socket) in sockets.iter_mut().enumerate() {
        if let Some(ws) = socket.take() {
            close(ws, client % 2 == 0).await;
        }
    }
    wait_for(addr, 0, Some(0)).await;
}

/// The ping round trip that follows every command.
struct Barrier {
    round: u64,
}

impl Barrier {
    async fn check(&mut self, sockets: &mut [Option<Ws>; CLIENTS], expect: &Expect, op: &Op) {
        self.round += 1;
        // Outside the range of the fuzzed pings (i32), so never confused.
        let token = 1_000_000_000_000 + self.round;
        let ping = Message::Text(json!({"type": "ping", "timestamp": token}).to_string().into());
        for ws in sockets.iter_mut().flatten() {
            ws.send(ping.clone()).await.expect("the server accepts the ping");
        }
        for (client, socket) in sockets.iter_mut().enumerate() {
            let Some(ws) = socket else {
                assert!(expect[client].is_empty(), "model expects frames for disconnected client {client}");
                continue;
            };
            let mut got = Vec::new();
            loop {
                let frame = tokio::time::timeout(WAIT, ws.next())
                    .await
                    .unwrap_or_else(|_| panic!("client {client}: no pong within {WAIT:?} after {op:?}"))
                    .unwrap_or_else(|| panic!("client {client}: connection ended after {op:?}"))
                    .unwrap_or_else(|err| panic!("client {client}: {err} after {op:?}"));
                let text = match frame {
                    Message::Text(text) => text,
                    Message::Ping(_) | Message::Pong(_) => continue,
                    other => panic!("client {client}: unexpected {other:?} after {op:?}"),
                };
                let value: Value = serde_json::from_str(&text).expect("the server sends JSON");
                if value["type"] == "pong" && value["timestamp"] == json!(token) {
                    break;
                }
                got.push(normalize(value));
            }
            assert_eq!(got, expect[client], "client {client} after {op:?}");
        }
    }
}

async fn connect(addr: SocketAddr) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/chat"))
        .await
        .expect("the server accepts a chat connection");
    for want in ["welcome", "connected"] {
        let frame = tokio::time::timeout(WAIT, ws.next()).await.expect("greeting in time");
        let text = frame.expect("greeting").expect("greeting").into_text().expect("greetings are text");
        let value: Value = serde_json::from_str(&text).expect("the server sends JSON");
        assert_eq!(value["type"], want);
    }
    ws
}

async fn close(mut ws: Ws, abrupt: bool) {
    if abrupt {
        return drop(ws);
    }
    ws.close(None).await.expect("close frame sent");
    let drained = tokio::time::timeout(WAIT, async { while ws.next().await.is_some() {} }).await;
    assert!(drained.is_ok(), "the server did not finish the closing handshake");
}

/// Waits until the server reports `connections` open connections (and, if
/// given, `rooms` rooms): a disconnect is handled after the socket closes.
async fn wait_for(addr: SocketAddr, connections: usize, rooms: Option<usize>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = http_json(addr, "/api/status").await;
        let open = status["connections"].as_u64() == Some(connections as u64);
        let rooms_ok = rooms.is_none_or(|r| status["rooms"].as_u64() == Some(r as u64));
        if open && rooms_ok {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server still reports {status} {WAIT:?} after disconnects; wanted {connections} connections, rooms {rooms:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn http_json(addr: SocketAddr, path: &str) -> Value {
    let mut tcp = TcpStream::connect(addr).await.expect("connect for HTTP");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.expect("HTTP request");
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut response))
        .await
        .expect("HTTP answer in time")
        .expect("HTTP");
    let response = String::from_utf8(response).expect("UTF-8 response");
    let (_, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    serde_json::from_str(body).unwrap_or_else(|err| panic!("{path}: {err}: {body}"))
}
