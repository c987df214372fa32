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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::chat::{Chat, Next};
use super::{Running, WAIT, banner_port, hubbub};

/// `cluster.node_timeout` in these tests: a killed node's members are gone
/// within about this long.
const NODE_TIMEOUT: Duration = Duration::from_secs(3);
/// `cluster.check_interval` in these tests.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How often an HTTP state is polled while waiting for it.
const POLL: Duration = Duration::from_millis(25);

// ---------------------------------------------------------------------------
// Redis

/// Whether Redis writes to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Persistence {
    /// Nothing: a restart loses every key.
    None,
    /// AOF with `appendfsync always`: a write is on disk before Redis answers.
    Aof,
}

/// A `redis-server` of one test, on a free port, in the test's directory;
/// killed on drop.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    persistence: Persistence,
}

impl Redis {
    /// Starts one in `dir/redis`; `None` (after one line on stderr) when
    /// `redis-server` is missing and the test should pass without running.
    fn start(dir: &Path, persistence: Persistence) -> Option<Self> {
        if skip() {
            return None;
        }
        let dir = dir.join("redis");
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Self { child: None, port: free_port(), dir, persistence };
        redis.spawn();
        Some(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn spawn(&mut self) {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"));
        match self.persistence {
            Persistence::None => command.args(["--appendonly", "no"]),
            Persistence::Aof => command.args(["--appendonly", "yes", "--appendfsync", "always"]),
        };
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        self.child = Some(command.spawn().expect("redis-server starts"));
        // Up once it answers PING (not LOADING).
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", self.port)) {
                tcp.set_read_timeout(Some(WAIT)).unwrap();
                let mut answer = [0_u8; 5];
                if tcp.write_all(b"PING\r\n").is_ok()
                    && tcp.read_exact(&mut answer).is_ok()
                    && &answer == b"+PONG"
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not answer on port {}", self.port);
            std::thread::sleep(POLL);
        }
    }

    /// Kills the process (SIGKILL) and waits for it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory.
    fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// True (after one line on stderr) when `redis-server` is missing and the
/// tests should pass without running; under `CI=true` a missing server is
/// a failure.
fn skip() -> bool {
    let missing = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_or(true, |status| !status.success());
    if missing {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "redis-server is not installed (CI=true): install Debian's redis-server package"
        );
        static SAID: Once = Once::new();
        SAID.call_once(|| {
            // Straight to stderr, past the test harness's capture, so that the skip is seen.
            let _ = writeln!(std::io::stderr(), "redis-server not found: skipping the cluster tests");
        });
    }
    missing
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A fresh directory for one test, with the upload directory its nodes share.
fn test_dir(name: &str) -> PathBuf {
    let dir = super::scratch(&format!("cluster-{name}"));
    std::fs::create_dir_all(dir.join("uploads")).unwrap();
    dir
}

// ---------------------------------------------------------------------------
// A TCP proxy that can be cut

/// A TCP proxy between one node and Redis, on a thread of the test: `cut`
/// closes every proxied connection and refuses new ones until `restore`.
struct Proxy {
    port: u16,
    state: Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    /// Open proxied connections (both sides), or `None` while cut.
    open: Mutex<Option<Vec<TcpStream>>>,
    /// Set on drop: the accepting thread ends.
    stopped: AtomicBool,
}

impl Proxy {
    fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState { open: Mutex::new(Some(Vec::new())), ..ProxyState::default() });
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if shared.stopped.load(Ordering::Acquire) {
                    return;
                }
                let Ok(client) = client else { continue };
                // Under the lock, so a cut cannot miss a connection being made.
                let mut open = shared.open.lock().unwrap();
                let Some(open) = open.as_mut() else {
                    // Cut: refused (closed at once).
                    continue;
                };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                open.push(client.try_clone().unwrap());
                open.push(server.try_clone().unwrap());
                for (mut from, mut to) in
                    [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Self { port, state }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Closes every proxied connection and refuses new ones.
    fn cut(&self) {
        let open = self.state.open.lock().unwrap().take().unwrap_or_default();
        for stream in open {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Proxies new connections again.
    fn restore(&self) {
        self.state.open.lock().unwrap().get_or_insert_with(Vec::new);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.state.stopped.store(true, Ordering::Release);
        // Wakes the accepting thread, which then ends.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

// ---------------------------------------------------------------------------
// Nodes and HTTP

/// One `hubbub` node of a test's cluster; killed on drop, printing its log
/// when the test failed.
struct Node {
    name: &'static str,
    port: u16,
    server: Running,
}

impl Node {
    /// Starts node `name` of the cluster on `redis_url`, working in
    /// `dir/name`, with the test's shared upload directory, and waits until
    /// it is ready.
    fn start(dir: &Path, name: &'static str, redis_url: &str) -> Self {
        let own = dir.join(name);
        std::fs::create_dir_all(&own).unwrap();
        let mut command = hubbub(&own);
        command
            .args(["--listen", "127.0.0.1:0", "--no-rate-limit", "--redis-url", redis_url])
            .arg("--upload-dir")
            .arg(dir.join("uploads"))
            .env("HUBBUB_CLUSTER_NODE_NAME", name)
            .env("HUBBUB_CLUSTER_NODE_TIMEOUT", format!("{}ms", NODE_TIMEOUT.as_millis()))
            .env("HUBBUB_CLUSTER_CHECK_INTERVAL", format!("{}ms", CHECK_INTERVAL.as_millis()));
        let server = Running::start(command);
        let banner = Running::until(&server.stdout, |line| line.contains("/api/status"));
        let node = Self { name, port: banner_port(&banner), server };
        node.wait_ready(200);
        node
    }

    /// Kills the process with SIGKILL and waits for it.
    fn kill(&mut self) {
        let _ = self.server.child.kill();
        let _ = self.server.child.wait();
    }

    /// Waits until `GET /ready` answers `code`.
    fn wait_ready(&self, code: u16) {
        poll(self.port, "/ready", &format!("{}: /ready {code}", self.name), |status, _| status == code);
    }

    /// Waits until `GET /api/status` says the cluster has `nodes` live nodes.
    fn wait_nodes(&self, nodes: usize) -> Value {
        let body = poll(self.port, "/api/status", &format!("{}: {nodes} nodes", self.name), |_, body| {
            serde_json::from_slice::<Value>(body).is_ok_and(|status| status["cluster"]["nodes"] == nodes)
        });
        serde_json::from_slice(&body).unwrap()
    }

    /// Waits until `GET /api/rooms` answers `rooms` (name → members).
    fn wait_rooms(&self, rooms: &[(&str, usize)]) {
        let expected: Vec<Value> =
            rooms.iter().map(|(name, count)| json!({"name": name, "userCount": count})).collect();
        let what = format!("{}: /api/rooms {}", self.name, Value::from(expected.clone()));
        poll(self.port, "/api/rooms", &what, |status, body| {
            status == 200
                && serde_json::from_slice::<Value>(body)
                    .is_ok_and(|rooms| rooms == Value::from(expected.clone()))
        });
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // The pipe closed at exit, so this ends.
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut log = Vec::new();
            while let Ok(line) =
                self.server.stderr.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                log.push(line);
            }
            // Straight to stderr: the harness shows it with the failure.
            let _ = writeln!(
                std::io::stderr(),
                "--- node {} (port {}) log:\n{}",
                self.name,
                self.port,
                log.join("\n")
            );
        }
    }
}

/// `GET path` over HTTP/1.0: the status code and the body.
fn get(port: u16, path: &str) -> (u16, Vec<u8>) {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).unwrap();
    let head_end = response.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&response[..head_end]).into_owned();
    let status =
        head.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("{head}"));
    (status, response[head_end + 4..].to_vec())
}

/// Polls `GET path` until `done` accepts the answer; returns its body.
fn poll(port: u16, path: &str, what: &str, done: impl Fn(u16, &[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = get(port, path);
        if done(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "waited {WAIT:?} for {what}; last answer {status} {}",
            String::from_utf8_lossy(&body)
        );
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------
// Members and what they see

/// One thing a client saw of its room.
#[derive(Clone, Debug)]
enum Seen {
    /// `roomJoined`, with the `since` the join asked with.
    Joined {
        epoch: String,
        offset: u64,
        recovered: Option<bool>,
        missed: Option<u64>,
        since: Option<(String, u64)>,
    },
    /// `resync`.
    Resync { epoch: String, offset: u64 },
    /// A kept message received (`chatMessage`, `fileShared`), in the epoch
    /// the client knew then.
    Kept { epoch: String, offset: u64, user: String, text: String },
    /// An acknowledgement of one of the client's own messages (`messageAck`,
    /// `fileSaved`).
    Acked { epoch: String, offset: u64, text: String },
}

/// What one client saw of one room, across its connections, in order.
#[derive(Clone, Debug, Default)]
struct View {
    user: String,
    seen: Vec<Seen>,
    /// Texts it sent without a `clientMsgId`: it never learns their offsets.
    plain: HashSet<String>,
}

/// Ids for `clientMsgId`, unique in the test process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Presence and other events a test may skip while it waits for another.
const NOISE: &[&str] =
    &["userJoined", "userLeft", "userTyping", "userRenamed", "chat", "fileAccepted", "fileProgress", "pong"];

/// A chat client with a name and a room that records what it sees (as a
/// [`View`]) and keeps its unacknowledged messages to resend, as a real
/// client's offline queue does.
struct Member {
    user: String,
    room: String,
    chat: Option<Chat>,
    view: View,
    /// Messages other than kept ones and acks, not yet taken by the test.
    events: VecDeque<Value>,
    /// Every event ever received, for assertions after the fact.
    history: Vec<Value>,
    /// The room's epoch as this client knows it ("" before it knows).
    epoch: String,
    /// Where the current run of offsets started, and the offsets held since.
    run: (u64, BTreeSet<u64>),
    /// Sent with a `clientMsgId` and not acknowledged: id and text, in order.
    unacked: Vec<(String, String)>,
    /// Texts by id, of every message sent with one.
    texts: HashMap<String, String>,
    /// Offsets by id, from the first acknowledgement.
    acked: HashMap<String, u64>,
    /// Messages sent and neither acknowledged nor refused yet.
    outstanding: usize,
    /// Messages sent so far, for their texts.
    sent: u32,
    /// The `since` of the join under way.
    asked: Option<(String, u64)>,
}

impl Member {
    /// Connects to `port` and sets the name; joins nothing yet.
    fn connect(port: u16, user: &str, room: &str) -> Self {
        let mut member = Self {
            user: user.to_owned(),
            room: room.to_owned(),
            chat: None,
            view: View { user: user.to_owned(), ..View::default() },
            events: VecDeque::new(),
            history: Vec::new(),
            epoch: String::new(),
            run: (0, BTreeSet::new()),
            unacked: Vec::new(),
            texts: HashMap::new(),
            acked: HashMap::new(),
            outstanding: 0,
            sent: 0,
            asked: None,
        };
        member.reconnect(port);
        member
    }

    fn chat(&mut self) -> &mut Chat {
        self.chat.as_mut().unwrap_or_else(|| panic!("{} is not connected", self.user))
    }

    /// A new connection to `port`, named as before.
    fn reconnect(&mut self, port: u16) {
        self.chat = Some(Chat::connect(port));
        let user = self.user.clone();
        self.send(&json!({"type": "setUsername", "username": user}));
        self.expect("usernameSet");
        // Whatever was in flight on the old connection is lost with it.
        self.outstanding = 0;
    }

    /// Closes the connection (its member leaves the room).
    fn disconnect(&mut self) {
        self.chat = None;
        self.outstanding = 0;
    }

    fn send(&mut self, value: &Value) {
        self.chat().send(value);
    }

    /// Joins the room without `since`; returns `roomJoined`.
    fn join(&mut self) -> Value {
        let room = self.room.clone();
        self.send(&json!({"type": "joinRoom", "room": room}));
        self.expect("roomJoined")
    }

    /// Joins the room with `since` at `position`; returns `roomJoined`.
    fn join_since(&mut self, position: (String, u64)) -> Value {
        let room = self.room.clone();
        self.send(
            &json!({"type": "joinRoom", "room": room, "since": {"epoch": position.0, "offset": position.1}}),
        );
        self.asked = Some(position);
        self.expect("roomJoined")
    }

    /// Connects to `port` again and rejoins with `since` where its copy of
    /// the room ends; returns `roomJoined`.
    fn rejoin(&mut self, port: u16) -> Value {
        self.reconnect(port);
        let position = self.position();
        self.join_since(position)
    }

    /// The epoch and the newest offset up to which this client holds every
    /// message.
    fn position(&self) -> (String, u64) {
        let (mut end, held) = (self.run.0, &self.run.1);
        while held.contains(&(end + 1)) {
            end += 1;
        }
        (self.epoch.clone(), end)
    }

    /// Sends a `chatMessage` with a new `clientMsgId`; returns its text.
    fn say(&mut self) -> String {
        self.sent += 1;
        let text = format!("{}-{}", self.user, self.sent);
        let id = format!("c1a5e000-0000-4000-8000-{:012x}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
        self.texts.insert(id.clone(), text.clone());
        self.unacked.push((id.clone(), text.clone()));
        self.outstanding += 1;
        self.send(&json!({"type": "chatMessage", "text": text, "clientMsgId": id}));
        text
    }

    /// Sends a `chatMessage` without `clientMsgId`; returns its text.
    fn say_plain(&mut self) -> String {
        self.sent += 1;
        let text = format!("{}-{}", self.user, self.sent);
        self.view.plain.insert(text.clone());
        self.send(&json!({"type": "chatMessage", "text": text}));
        text
    }

    /// Sends again, with the same ids, every message not acknowledged yet.
    fn resend_unacked(&mut self) {
        for (id, text) in self.unacked.clone() {
            self.outstanding += 1;
            self.send(&json!({"type": "chatMessage", "text": text, "clientMsgId": id}));
        }
    }

    /// Sends `text` again with the id it had; returns the acknowledgement.
    fn resend(&mut self, text: &str) -> Value {
        let id = self.texts.iter().find(|(_, t)| *t == text).map(|(id, _)| id.clone()).unwrap();
        self.outstanding += 1;
        self.send(&json!({"type": "chatMessage", "text": text, "clientMsgId": id}));
        loop {
            let msg = self.read();
            if msg["type"] == "messageAck" && msg["clientMsgId"] == id.as_str() {
                return msg;
            }
        }
    }

    /// Reads one message, records it, and returns it; panics after
    /// [`WAIT`] or if the connection ends.
    fn read(&mut self) -> Value {
        let user = self.user.clone();
        let msg = match self.chat().next(WAIT) {
            Next::Message(msg) => msg,
            Next::Timeout => panic!("{user}: nothing arrived within {WAIT:?}"),
            Next::Closed => panic!("{user}: the connection ended"),
        };
        self.record(&msg);
        msg
    }

    /// Reads what the server still sends until the connection ends (its
    /// node was killed), recording it.
    fn read_until_closed(&mut self) {
        loop {
            match self.chat().next(WAIT) {
                Next::Message(msg) => self.record(&msg),
                Next::Timeout => panic!("{}: the connection did not end", self.user),
                Next::Closed => break,
            }
        }
        self.disconnect();
    }

    /// Records a message: kept messages, acks, joins and resyncs go to the
    /// view; everything but kept messages and acks to the events.
    fn record(&mut self, msg: &Value) {
        let who = &self.user;
        let kind = msg["type"].as_str().unwrap_or_else(|| panic!("{who}: no type: {msg}"));
        let offset = || msg["offset"].as_u64().unwrap_or_else(|| panic!("{who}: no offset: {msg}"));
        match kind {
            "chatMessage" | "fileShared" => {
                let offset = offset();
                let text = content(msg);
                let user = msg["user"].as_str().unwrap().to_owned();
                self.view.seen.push(Seen::Kept { epoch: self.epoch.clone(), offset, user, text });
                self.run.1.insert(offset);
                return;
            }
            "messageAck" => {
                let offset = offset();
                let id = msg["clientMsgId"].as_str().unwrap().to_owned();
                self.unacked.retain(|(unacked, _)| *unacked != id);
                self.outstanding = self.outstanding.saturating_sub(1);
                let text =
                    self.texts.get(&id).unwrap_or_else(|| panic!("{who}: an ack of an unknown id: {msg}"));
                let first = *self.acked.entry(id).or_insert(offset);
                assert_eq!(first, offset, "{who}: {text} acknowledged again with another offset: {msg}");
                self.view.seen.push(Seen::Acked { epoch: self.epoch.clone(), offset, text: text.clone() });
                self.run.1.insert(offset);
                return;
            }
            "fileSaved" => {
                if let Some(offset) = msg["offset"].as_u64() {
                    self.view.seen.push(Seen::Acked {
                        epoch: self.epoch.clone(),
                        offset,
                        text: content(msg),
                    });
                    self.run.1.insert(offset);
                }
            }
            "resync" => {
                assert_eq!(msg["room"], self.room.as_str(), "{who}: {msg}");
                let (epoch, offset) = (msg["epoch"].as_str().unwrap().to_owned(), offset());
                self.view.seen.push(Seen::Resync { epoch: epoch.clone(), offset });
                self.epoch = epoch;
                self.run = (offset, BTreeSet::new());
            }
            "roomJoined" => {
                let epoch = msg["epoch"].as_str().unwrap_or_default().to_owned();
                let offset = msg["offset"].as_u64().unwrap_or(0);
                let recovered = msg["recovered"].as_bool();
                let since = self.asked.take();
                self.view.seen.push(Seen::Joined {
                    epoch: epoch.clone(),
                    offset,
                    recovered,
                    missed: msg["missed"].as_u64(),
                    since,
                });
                if recovered != Some(true) {
                    self.run = (offset, BTreeSet::new());
                }
                self.epoch = epoch;
            }
            "error" if msg["code"] == "unavailable" => {
                self.outstanding = self.outstanding.saturating_sub(1);
            }
            _ => {}
        }
        self.events.push_back(msg.clone());
        self.history.push(msg.clone());
    }

    /// The next event (anything but kept messages and acks).
    fn event(&mut self) -> Value {
        loop {
            if let Some(event) = self.events.pop_front() {
                return event;
            }
            self.read();
        }
    }

    /// The next event of type `kind`, skipping [`NOISE`]; anything else
    /// fails the test.
    fn expect(&mut self, kind: &str) -> Value {
        loop {
            let event = self.event();
            if event["type"] == kind {
                return event;
            }
            assert!(
                NOISE.contains(&event["type"].as_str().unwrap_or_default()),
                "{}: waiting for {kind}, got {event}",
                self.user
            );
        }
    }

    /// Reads until every message sent has been acknowledged, resending
    /// those refused with `unavailable` after the `retryAfterMs` the server
    /// asked for.
    fn settle(&mut self) {
        let deadline = Instant::now() + WAIT;
        while !self.unacked.is_empty() {
            assert!(Instant::now() < deadline, "{}: unacknowledged {:?}", self.user, self.unacked);
            if self.outstanding == 0 {
                self.resend_unacked();
            }
            let msg = self.read();
            if msg["type"] == "error" {
                assert_eq!(msg["code"], "unavailable", "{}: {msg}", self.user);
                let wait = msg["retryAfterMs"].as_u64().unwrap_or_else(|| panic!("no retryAfterMs: {msg}"));
                if self.outstanding == 0 {
                    // The server's own backoff, as a real client waits it.
                    std::thread::sleep(Duration::from_millis(wait));
                }
            }
        }
        // Refusals for resends acknowledged meanwhile are of no interest.
        self.events.retain(|e| !(e["type"] == "error" && e["code"] == "unavailable"));
    }

    /// Reads until this client holds a message at `offset` or above (by the
    /// room's order, everything below has arrived by then).
    fn wait_holds(&mut self, offset: u64) {
        while self.run.1.last().is_none_or(|newest| *newest < offset) {
            self.read();
        }
    }

    /// Reads until this client has received `n` kept messages from `user`.
    fn wait_kept_from(&mut self, user: &str, n: usize) {
        let count = |member: &Self| {
            member
                .view
                .seen
                .iter()
                .filter(|seen| matches!(seen, Seen::Kept { user: from, .. } if from == user))
                .count()
        };
        while count(self) < n {
            self.read();
        }
    }

    /// The kept messages received after the `n`th thing seen, as
    /// (offset, text).
    fn kept_after(&self, n: usize) -> Vec<(u64, String)> {
        self.view.seen[n..]
            .iter()
            .filter_map(|seen| match seen {
                Seen::Kept { offset, text, .. } => Some((*offset, text.clone())),
                _ => None,
            })
            .collect()
    }
}

/// What identifies a kept message's content: a chat message's text, or a
/// shared file's id.
fn content(msg: &Value) -> String {
    match msg["type"].as_str() {
        Some("fileShared" | "fileSaved") => format!("file {}", msg["fileId"].as_str().unwrap()),
        _ => msg["text"].as_str().unwrap().to_owned(),
    }
}

/// A position in a room's stream: epoch and offset.
type Position = (String, u64);
/// What is at a position: author and content.
type Entry = (String, String);

/// Judges what every client saw of one room (every view, across its
/// reconnects) and returns the room's stream as they saw it:
///
/// - on each connection kept messages arrive in increasing offsets (none
///   twice, none out of order), after the position the join or `resync`
///   gave;
/// - each client's offsets are gap-free up to the newest it received,
///   except across a `resync` or a join that did not recover (positions of
///   its own messages sent without `clientMsgId` it cannot know);
/// - a recovered join continues the client's copy exactly (same epoch,
///   `missed` = the messages after `since`);
/// - every client saw the same message at each position, and no message
///   (by its unique text) sits at two positions.
fn check_room(views: &[&View]) -> BTreeMap<Position, Entry> {
    let mut stream: BTreeMap<Position, Entry> = BTreeMap::new();
    let mut place = |who: &str, at: Position, entry: Entry| {
        if let Some(had) = stream.get(&at) {
            assert_eq!(had, &entry, "{who}: two messages at offset {} of epoch {}", at.1, at.0);
        }
        stream.insert(at, entry);
    };
    for view in views {
        let who = view.user.as_str();
        for seen in &view.seen {
            match seen {
                Seen::Kept { epoch, offset, user, text } => {
                    place(who, (epoch.clone(), *offset), (user.clone(), text.clone()))
                }
                Seen::Acked { epoch, offset, text } => {
                    place(who, (epoch.clone(), *offset), (who.to_owned(), text.clone()))
                }
                _ => {}
            }
        }
    }
    let mut positions: HashMap<&str, &Position> = HashMap::new();
    for (at, (_, text)) in &stream {
        if let Some(other) = positions.insert(text, at) {
            panic!("{text:?} is at two positions: {other:?} and {at:?}");
        }
    }
    for view in views {
        check_view(view, &stream);
    }
    stream
}

/// One client's runs: see [`check_room`].
fn check_view(view: &View, stream: &BTreeMap<Position, Entry>) {
    let who = view.user.as_str();
    // The current run: epoch, where it started, offsets held, newest received.
    let mut run: Option<(String, u64, BTreeSet<u64>, u64)> = None;
    // The newest offset on the current connection.
    let mut last = 0;
    let finish = |run: &(String, u64, BTreeSet<u64>, u64)| {
        let (epoch, start, held, newest) = run;
        for offset in start + 1..=*newest {
            let own_plain = stream
                .get(&(epoch.clone(), offset))
                .is_some_and(|(user, text)| user == who && view.plain.contains(text));
            assert!(
                held.contains(&offset) || own_plain,
                "{who}: offset {offset} of epoch {epoch} missing (a gap)"
            );
        }
    };
    for seen in &view.seen {
        match seen {
            Seen::Joined { epoch, offset, recovered: Some(true), missed, since } => {
                let (since_epoch, since) = since.as_ref().expect("recovered without since");
                assert_eq!(since_epoch, epoch, "{who}: recovered into another epoch");
                let current = run.as_ref().expect("recovered without a copy of the room");
                assert_eq!(&current.0, epoch, "{who}: recovered, but its copy is of another epoch");
                assert!(
                    (current.1..=*since).skip(1).all(|o| current.2.contains(&o)),
                    "{who}: asked since {since}, which it does not hold"
                );
                assert_eq!(
                    *missed,
                    Some(offset - since),
                    "{who}: missed is not the number of messages after since"
                );
                last = *since;
            }
            Seen::Joined { epoch, offset, .. } | Seen::Resync { epoch, offset } => {
                if let Some(done) = run.take() {
                    finish(&done);
                }
                run = Some((epoch.clone(), *offset, BTreeSet::new(), *offset));
                last = *offset;
            }
            Seen::Kept { epoch, offset, .. } => {
                let current =
                    run.as_mut().unwrap_or_else(|| panic!("{who}: a room message before roomJoined"));
                assert_eq!(&current.0, epoch);
                assert!(
                    *offset > last,
                    "{who}: offset {offset} after {last} on one connection (twice or out of order)"
                );
                last = *offset;
                current.2.insert(*offset);
                current.3 = current.3.max(*offset);
            }
            Seen::Acked { offset, .. } => {
                if let Some(current) = run.as_mut() {
                    current.2.insert(*offset);
                }
            }
        }
    }
    if let Some(done) = run {
        finish(&done);
    }
}

/// Checks the room's history on `port` against what clients saw: its
/// offsets are gap-free, it agrees with `stream` in its epoch, and every
/// message acknowledged in that epoch is in it exactly once. Returns its
/// epoch and size.
fn check_history(
    port: u16,
    room: &str,
    stream: &BTreeMap<Position, Entry>,
    views: &[&View],
) -> (String, usize) {
    let mut reader = Chat::connect(port);
    reader.send(&json!({"type": "joinRoom", "room": room}));
    let epoch = reader.recv_type("roomJoined")["epoch"].as_str().unwrap().to_owned();
    let mut messages: Vec<Value> = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let mut request = json!({"type": "history", "limit": 100});
        if let Some(before) = before {
            request["before"] = before.into();
        }
        reader.send(&request);
        let page = reader.recv_type("history");
        assert_eq!(page["epoch"], epoch.as_str());
        let mut older = page["messages"].as_array().unwrap().clone();
        before = older.first().map(|m| m["offset"].as_u64().unwrap());
        older.append(&mut messages);
        messages = older;
        if page["hasMore"] != true {
            break;
        }
    }
    let mut texts = HashSet::new();
    for (i, message) in messages.iter().enumerate() {
        let offset = message["offset"].as_u64().unwrap();
        if i > 0 {
            assert_eq!(offset, messages[i - 1]["offset"].as_u64().unwrap() + 1, "a gap in the history");
        }
        let entry = (message["user"].as_str().unwrap().to_owned(), content(message));
        if let Some(seen) = stream.get(&(epoch.clone(), offset)) {
            assert_eq!(seen, &entry, "the history differs from what clients saw at {offset}");
        }
        assert!(texts.insert(entry.1.clone()), "{:?} twice in the history", entry.1);
    }
    let stored: HashMap<u64, &Value> = messages.iter().map(|m| (m["offset"].as_u64().unwrap(), m)).collect();
    for view in views {
        for seen in &view.seen {
            if let Seen::Acked { epoch: acked_in, offset, text } = seen
                && *acked_in == epoch
            {
                let message =
                    stored.get(offset).unwrap_or_else(|| panic!("acknowledged {text:?} not in the history"));
                assert_eq!(&content(message), text, "acknowledged at {offset}");
            }
        }
    }
    (epoch, messages.len())
}

/// Runs [`check_room`] and [`check_history`] over `members`.
fn check(port: u16, members: &[&Member]) -> BTreeMap<Position, Entry> {
    let views: Vec<&View> = members.iter().map(|m| &m.view).collect();
    let stream = check_room(&views);
    check_history(port, &members[0].room, &stream, &views);
    stream
}

/// Once every member's messages are acknowledged, sends one last message
/// from `from` (which must not have sent messages without `clientMsgId`)
/// and waits until every member holds it: by the room's order, then
/// everyone has everything before it. Returns its offset.
fn sentinel(from: &mut Member, others: &mut [&mut Member]) -> u64 {
    for member in others.iter_mut() {
        member.settle();
    }
    from.settle();
    let text = from.say();
    from.settle();
    let id = from.texts.iter().find(|(_, t)| **t == text).map(|(id, _)| id.clone()).unwrap();
    let last = from.acked[&id];
    // Its own ack may come before earlier messages from other nodes.
    while from.position().1 < last {
        from.read();
    }
    for member in others {
        member.wait_holds(last);
    }
    last
}

/// The next `n` lobby `chat` texts `member` receives, skipping other events.
fn lobby(member: &mut Member, n: usize) -> Vec<String> {
    (0..n).map(|_| member.expect("chat")["text"].as_str().unwrap().to_owned()).collect()
}

// ---------------------------------------------------------------------------
// The tests

#[test]
fn nodes_share_rooms_counts_events_the_lobby_and_notifications() {
    let dir = test_dir("delivery");
    let Some(redis) = Redis::start(&dir, Persistence::None) else { return };
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
    assert_eq!(ada.history[1], json!({"type": "userJoined", "user": "ada", "room": "r", "userCount": 1}));
    assert_eq!(bob.history[1], json!({"type": "userJoined", "user": "bob", "room": "r", "userCount": 2}));
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
    assert!(ada.history.iter().all(|e| e["type"] != "userTyping"), "the typist heard itself");

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
    let Some(redis) = Redis::start(&dir, Persistence::None) else { return };
    let (a, b) = (Node::start(&dir, "a", &redis.url()), Node::start(&dir, "b", &redis.url()));
    let mut ada = Member::connect(a.port, "ada", "r");
    let mut bob = Member::connect(b.port, "bob", "r");
    ada.join();
    bob.join();
    ada.say();
    sentinel(&mut bob, &mut [&mut ada]);

    // Kept like a chat message: fileSaved to the uploader and fileShared
    // to the room carry the next offset.
    let data: Vec<u8> = (0..10_000_u32).map(|i| (i * 7 % 251) as u8).collect();
    ada.send(&json!({"type": "fileStart", "name": "notes.txt", "size": data.len(), "mimeType": "text/plain", "chunkSize": 4096}));
    ada.expect("fileAccepted");
    for (index, chunk) in data.chunks(4096).enumerate() {
        let mut frame = (index as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(chunk);
        ada.chat().send_binary(&frame);
    }
    ada.send(&json!({"type": "fileEnd"}));
    let saved = ada.expect("fileSaved");
    assert_eq!(saved["offset"], 3, "{saved}");
    bob.wait_holds(3);
    check(b.port, &[&ada, &bob]);

    // The nodes share the upload directory: node b serves what node a took.
    let url = saved["url"].as_str().unwrap();
    for node in [&a, &b] {
        let (status, body) = get(node.port, url);
        assert_eq!(status, 200, "{url} from node {}: {}", node.name, String::from_utf8_lossy(&body));
        assert!(body == data, "the download from node {} is not the upload to node a", node.name);
    }
}

#[test]
fn a_client_reconnecting_to_another_node_recovers_exactly_what_it_missed() {
    let dir = test_dir("recovery");
    let Some(redis) = Redis::start(&dir, Persistence::None) else { return };
    let (a, b) = (Node::start(&dir, "a", &redis.url()), Node::start(&dir, "b", &redis.url()));
    let mut ada = Member::connect(a.port, "ada", "r");
    let mut bob = Member::connect(b.port, "bob", "r");
    let mut cy = Member::connect(a.port, "cy", "r");
    for member in [&mut ada, &mut bob, &mut cy] {
        member.join();
    }
    for _ in 0..3 {
        ada.say();
        bob.say();
    }
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
    let Some(redis) = Redis::start(&dir, Persistence::None) else { return };
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
    let mut left = Vec::new();
    while left.len() < 2 {
        let event = b2.expect("userLeft");
        left.push((event["user"].as_str().unwrap().to_owned(), event["userCount"].as_u64().unwrap()));
    }
    let elapsed = killed.elapsed();
    left.sort();
    assert!(
        left == [("a1".to_owned(), 2), ("a2".to_owned(), 3)]
            || left == [("a1".to_owned(), 3), ("a2".to_owned(), 2)],
        "{left:?}"
    );
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
    let Some(mut redis) = Redis::start(&dir, Persistence::None) else { return };
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
    let refused = ada.expect("error");
    assert_eq!(refused["code"], "unavailable", "{refused}");
    assert!(refused["retryAfterMs"].as_u64().is_some_and(|ms| ms > 0), "{refused}");
    bob.say();
    assert_eq!(bob.expect("error")["code"], "unavailable");
    ada.send(&json!({"type": "ping", "timestamp": 1}));
    assert_eq!(ada.expect("pong")["timestamp"], 1);

    // It comes back empty: ready again, and every member is told to resync.
    redis.start_again();
    a.wait_ready(200);
    b.wait_ready(200);
    let resync = ada.expect("resync");
    assert_ne!(resync["epoch"], old.0.as_str(), "{resync}");
    assert_eq!(bob.expect("resync"), resync, "both nodes agree on the new epoch");
    a.wait_rooms(&[("r", 2)]);

    // The refused messages, sent again, are kept in the new epoch.
    ada.settle();
    bob.settle();
    sentinel(&mut ada, &mut [&mut bob]);
    let mut cy = Member::connect(b.port, "cy", "r");
    let joined = cy.join_since(old);
    assert_eq!(
        (&joined["recovered"], &joined["epoch"], joined.get("missed")),
        (&json!(false), &resync["epoch"], None),
        "{joined}"
    );
    let stream = check(a.port, &[&ada, &bob, &cy]);
    let new_epoch = resync["epoch"].as_str().unwrap();
    assert_eq!(stream.keys().filter(|(epoch, _)| epoch == new_epoch).count(), 3);
}

#[test]
fn redis_restarted_with_aof_always_loses_no_acknowledged_message() {
    let dir = test_dir("redis-aof");
    let Some(mut redis) = Redis::start(&dir, Persistence::Aof) else { return };
    let (a, b) = (Node::start(&dir, "a", &redis.url()), Node::start(&dir, "b", &redis.url()));
    let mut ada = Member::connect(a.port, "ada", "r");
    let mut bob = Member::connect(b.port, "bob", "r");
    let mut cy = Member::connect(a.port, "cy", "r");
    for member in [&mut ada, &mut bob, &mut cy] {
        member.join();
    }
    for _ in 0..3 {
        ada.say();
        bob.say();
    }
    ada.settle();
    sentinel(&mut bob, &mut [&mut ada, &mut cy]);
    cy.disconnect();

    // Redis is killed while messages flow, and started again on its files.
    for _ in 0..20 {
        ada.say();
        bob.say();
    }
    redis.kill();
    a.wait_ready(503);
    b.wait_ready(503);
    redis.start_again();
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
        let resyncs: Vec<&Value> = member.history.iter().filter(|e| e["type"] == "resync").collect();
        assert!(resyncs.is_empty(), "{}: resync after a restart that lost nothing: {resyncs:?}", member.user);
    }
    let stream = check(b.port, &[&ada, &bob, &cy]);
    assert_eq!(stream.len() as u64, last);
    assert_eq!(last, 6 + 1 + 40 + 1 + 1, "every message sent kept exactly once");
}

#[test]
fn a_node_cut_from_redis_catches_up_in_order_once_it_is_back() {
    let dir = test_dir("cut");
    let Some(redis) = Redis::start(&dir, Persistence::None) else { return };
    let proxy = Proxy::start(redis.port);
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
    assert_eq!(b1.expect("error")["code"], "unavailable");
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
