//! The hub fed an arbitrary sequence of client commands, through the
//! server's own chat sessions without sockets
//! (`hubbub_server::internals`): one server state for the whole fuzzing
//! run, up to four chat sessions on it, each fed its frames as its
//! connection's task would feed them (`on_text`, `on_binary`, `on_close`),
//! and a small model of rooms and members that says what each session must
//! have queued.
//!
//! After every command, each session's queue is taken as its task would
//! write it, and what each holds must equal what the model expects, event
//! for event (server clocks left out); no session may have been told to
//! close; the hub's rooms and member counts must equal the model's, and the
//! lobby must hold exactly the connected sessions. After the sequence,
//! `GET /api/rooms` (the server's router, called without a socket) must
//! list exactly the model's rooms with their member counts; then every
//! session closes, those who remain are told as the model says, and the
//! server must come back to no rooms and an empty lobby.
//!
//! The harness turns rate limits, uploads and room history off (a
//! `joinRoom`'s `since` is then ignored) and sets the typing broadcast
//! interval to an hour, so every run is deterministic.
//!
//! Invariants this checks: a client is in at most one room (it never hears
//! from two), member counts in every event, in the hub and in `/api/rooms`
//! match the members, no empty room survives a leave or a disconnect,
//! broadcasts reach the other members and never the sender, nothing a
//! client sends closes its session or anyone else's.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::Arbitrary;
use hubbub_protocol::{ClientMessage, Limits, ProtocolError, decode_client};
use hubbub_server::internals::{ChatClient, ChatServer};
use hubbub_server::{Config, HistoryStore};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

/// Clients per sequence.
const CLIENTS: usize = 4;
/// Commands per sequence; more adds little but time.
const MAX_OPS: usize = 64;
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
    /// A close frame, or a transport that vanished (`abrupt`).
    Disconnect {
        abrupt: bool,
    },
    SetUsername(Name),
    JoinRoom(Name),
    LeaveRoom,
    ChatMessage {
        text: Text,
        id: Option<u8>,
    },
    Typing,
    Lobby {
        user: Option<Name>,
        text: Text,
    },
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

/// What a client sends for an action.
enum Frame {
    Text(String),
    Binary(Vec<u8>),
}

impl Action {
    /// The frame a client sends for this action, if it sends one.
    fn frame(&self) -> Option<Frame> {
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
            Self::Binary(data) => return Some(Frame::Binary(data.clone())),
            Self::Raw(text) => return Some(Frame::Text(text.clone())),
        };
        Some(Frame::Text(json.to_string()))
    }
}

/// The server's state, built once for the whole run, and a single-threaded
/// runtime that runs the sessions' handlers while an input is tried.
struct Harness {
    runtime: tokio::runtime::Runtime,
    server: ChatServer,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

fn harness() -> &'static Harness {
    HARNESS.get_or_init(|| {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a tokio runtime");
        let mut config = Config::default();
        config.rate_limit.enabled = false;
        // One `userTyping` per member per join: deterministic, whatever the
        // speed of the run.
        config.rate_limit.typing_broadcast_interval = Duration::from_secs(3600);
        config.uploads.enabled = false;
        // No offsets, no recovery: the model knows rooms, not streams.
        config.history.store = HistoryStore::Off;
        config.uploads.dir = std::env::temp_dir().join(format!("hubbub-fuzz-{}", std::process::id()));
        let server = ChatServer::new(config).expect("the fuzz config is valid");
        Harness { runtime, server }
    })
}

fuzz_target!(|input: Input| {
    let harness = harness();
    harness.runtime.block_on(run(&harness.server, &input));
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
    /// Message ids seen, with the name of whoever sent each first: an id
    /// is a resend only from the same name.
    ids: BTreeMap<String, String>,
}

/// Rooms and members as a correct hub keeps them.
#[derive(Debug, Default)]
struct Model {
    clients: [Option<Member>; CLIENTS],
    rooms: BTreeMap<String, Room>,
}

/// What each client must have queued, normalized.
type Expect = [Vec<Value>; CLIENTS];

fn push(out: &mut Expect, client: usize, msg: Value) {
    out[client].push(normalize(msg));
}

fn push_error(out: &mut Expect, client: usize, code: &str) {
    push(out, client, json!({"type": "error", "code": code}));
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

    /// The other members of `client`'s room.
    fn others(&self, client: usize, room: &str) -> Vec<usize> {
        self.rooms[room].members.iter().copied().filter(|&m| m != client).collect()
    }

    fn apply(&mut self, client: usize, decoded: Result<ClientMessage, ProtocolError>, out: &mut Expect) {
        let msg = match decoded {
            Ok(msg) => msg,
            Err(err) => {
                let event = serde_json::to_value(err.to_event()).expect("server messages serialize");
                return push(out, client, event);
            }
        };
        match msg {
            ClientMessage::SetUsername { username } => {
                push(out, client, json!({"type": "usernameSet", "username": username}));
                let previous = self.name(client);
                if let Some(room) = self.member(client).room.clone()
                    && previous != username
                {
                    let renamed =
                        json!({"type": "userRenamed", "user": username, "previous": previous, "room": room});
                    for m in self.others(client, &room) {
                        push(out, m, renamed.clone());
                    }
                }
                self.member(client).username = Some(username);
            }
            ClientMessage::JoinRoom { room, .. } => {
                if self.member(client).room.as_deref() == Some(room.as_str()) {
                    let user_count = self.rooms[&room].members.len();
                    return push(
                        out,
                        client,
                        json!({"type": "roomJoined", "room": room, "userCount": user_count}),
                    );
                }
                self.leave(client, out);
                let user = self.name(client);
                let members = &mut self.rooms.entry(room.clone()).or_default().members;
                members.insert(client);
                let user_count = members.len();
                let joined =
                    json!({"type": "userJoined", "user": user, "room": room, "userCount": user_count});
                for &m in members.iter() {
                    push(out, m, joined.clone());
                }
                push(out, client, json!({"type": "roomJoined", "room": room, "userCount": user_count}));
                let member = self.member(client);
                member.room = Some(room);
                member.typed = false;
            }
            ClientMessage::LeaveRoom {} => match self.leave(client, out) {
                Some(room) => push(out, client, json!({"type": "roomLeft", "room": room})),
                None => push_error(out, client, "notInRoom"),
            },
            ClientMessage::ChatMessage { text, client_msg_id } => {
                let Some(name) = self.member(client).room.clone() else {
                    return push_error(out, client, "notInRoom");
                };
                let user = self.name(client);
                let spelled = client_msg_id.map(|id| serde_json::to_value(id).expect("ids serialize"));
                let ack = spelled.clone().map(|id| json!({"type": "messageAck", "clientMsgId": id}));
                if let Some(id) = client_msg_id {
                    let ids = &mut self.rooms.get_mut(&name).expect("a member's room exists").ids;
                    let key = id.uuid().to_string();
                    match ids.get(&key) {
                        // A resend: acknowledged again, delivered once.
                        Some(first) if *first == user => {
                            return push(out, client, ack.expect("an id was given"));
                        }
                        // Another name's id: delivered; the first entry stays.
                        Some(_) => {}
                        None => {
                            ids.insert(key, user.clone());
                        }
                    }
                }
                let mut msg = json!({"type": "chatMessage", "user": user, "text": text});
                if let Some(id) = spelled {
                    msg["clientMsgId"] = id;
                }
                for m in self.others(client, &name) {
                    push(out, m, msg.clone());
                }
                if let Some(ack) = ack {
                    push(out, client, ack);
                }
            }
            ClientMessage::Typing {} => {
                let user = self.name(client);
                let member = self.member(client);
                let Some(name) = member.room.clone().filter(|_| !member.typed) else { return };
                member.typed = true;
                for m in self.others(client, &name) {
                    push(out, m, json!({"type": "userTyping", "user": user}));
                }
            }
            ClientMessage::Chat { user, text } => {
                let user = self.member(client).username.clone().or(user).unwrap_or_else(|| ANONYMOUS.into());
                let msg = json!({"type": "chat", "user": user, "text": text});
                for m in (0..CLIENTS).filter(|&m| self.clients[m].is_some()) {
                    push(out, m, msg.clone());
                }
            }
            ClientMessage::Ping { timestamp } => {
                push(out, client, json!({"type": "pong", "timestamp": timestamp}));
            }
            ClientMessage::FileStart { .. } | ClientMessage::FileResume { .. } => {
                push_error(out, client, "uploadsDisabled");
            }
            ClientMessage::FileEnd { .. } => push_error(out, client, "noUpload"),
            // The harness runs without token authentication.
            ClientMessage::Auth { .. } => push_error(out, client, "authDisabled"),
            // ... and without history.
            ClientMessage::History { .. } => {
                let code = if self.member(client).room.is_some() { "historyDisabled" } else { "notInRoom" };
                push_error(out, client, code);
            }
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
            let msg = json!({"type": "userLeft", "user": user, "userCount": user_count, "room": name});
            for &m in room.members.iter() {
                push(out, m, msg.clone());
            }
        }
        Some(name)
    }

    fn disconnect(&mut self, client: usize, out: &mut Expect) {
        self.leave(client, out);
        self.clients[client] = None;
    }
}

async fn run(server: &ChatServer, input: &Input) {
    let mut model = Model::default();
    let mut sessions: [Option<ChatClient>; CLIENTS] = Default::default();
    let initial = usize::from(input.initial).clamp(1, CLIENTS);
    for (session, member) in sessions.iter_mut().zip(model.clients.iter_mut()).take(initial) {
        *session = Some(connect(server));
        *member = Some(Member::default());
    }
    for op in input.ops.iter().take(MAX_OPS) {
        let client = usize::from(op.client) % CLIENTS;
        let mut expect = Expect::default();
        match &op.action {
            Action::Connect => {
                if sessions[client].is_some() {
                    continue;
                }
                sessions[client] = Some(connect(server));
                model.clients[client] = Some(Member::default());
            }
            Action::Disconnect { abrupt } => {
                let Some(session) = sessions[client].take() else { continue };
                session.close(!abrupt);
                model.disconnect(client, &mut expect);
            }
            action => {
                let Some(session) = sessions[client].as_mut() else { continue };
                match action.frame() {
                    Some(Frame::Text(text)) if text.len() <= MAX_FRAME => {
                        let decoded = decode_client(&text, &Limits::default());
                        session.text(&text).await;
                        model.apply(client, decoded, &mut expect);
                    }
                    Some(Frame::Binary(data)) if data.len() <= MAX_FRAME => {
                        session.binary(&data).await;
                        // Uploads are off, so no upload is ever in progress.
                        push_error(&mut expect, client, "noUpload");
                    }
                    _ => continue,
                }
            }
        }
        check(server, &sessions, &model, &expect, op);
    }

    let rooms: Vec<Value> = model
        .rooms
        .iter()
        .map(|(name, room)| json!({"name": name, "userCount": room.members.len()}))
        .collect();
    assert_eq!(server.api_rooms().await, Value::Array(rooms), "/api/rooms disagrees with the model");

    for client in 0..CLIENTS {
        let Some(session) = sessions[client].take() else { continue };
        let mut expect = Expect::default();
        session.close(client % 2 == 0);
        model.disconnect(client, &mut expect);
        check(server, &sessions, &model, &expect, &format!("the end: client {client} closed"));
    }
    assert_eq!(server.api_rooms().await, json!([]), "rooms left after every session closed");
}

/// Starts a session and checks its greeting.
fn connect(server: &ChatServer) -> ChatClient {
    let session = server.connect();
    let greeting = session.take_json();
    assert_eq!(greeting.len(), 2, "welcome and connected: {greeting:?}");
    assert_eq!(greeting[0]["type"], "welcome");
    assert_eq!(greeting[1], json!({"type": "connected", "clientId": session.id()}));
    session
}

/// What must hold after every command: each session queued what the model
/// expects and was not told to close, the hub's rooms are the model's, and
/// the lobby holds exactly the connected sessions.
fn check(
    server: &ChatServer,
    sessions: &[Option<ChatClient>; CLIENTS],
    model: &Model,
    expect: &Expect,
    after: &dyn std::fmt::Debug,
) {
    for (client, session) in sessions.iter().enumerate() {
        let Some(session) = session else {
            assert!(expect[client].is_empty(), "model expects frames for disconnected client {client}");
            continue;
        };
        let got: Vec<Value> = session.take_json().into_iter().map(normalize).collect();
        assert_eq!(got, expect[client], "client {client} after {after:?}");
        assert!(!session.is_closing(), "client {client} was told to close after {after:?}");
    }
    let rooms: Vec<(String, usize)> =
        model.rooms.iter().map(|(name, room)| (name.clone(), room.members.len())).collect();
    assert_eq!(server.rooms(), rooms, "the hub's rooms after {after:?}");
    assert_eq!(server.lobby_len(), model.connected(), "the lobby after {after:?}");
}
