//! A chat client that records what it sees of its room (a [`View`]) and
//! resends what was not acknowledged, as a real client's offline queue
//! does; and the checker that judges what all the clients of a room saw.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::super::WAIT;
use super::super::chat::{Chat, Next};

/// One thing a client saw of its room.
#[derive(Clone, Debug)]
pub(super) enum Seen {
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
pub(super) struct View {
    pub(super) user: String,
    pub(super) seen: Vec<Seen>,
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
pub(super) struct Member {
    pub(super) user: String,
    pub(super) room: String,
    chat: Option<Chat>,
    pub(super) view: View,
    /// Messages other than kept ones, acks and refusals, not yet taken by the test.
    events: VecDeque<Value>,
    /// Every message but kept ones and acks, for assertions after the fact.
    pub(super) log: Vec<Value>,
    /// The room's epoch as this client knows it ("" before it knows).
    epoch: String,
    /// Where the current run of offsets started, and the offsets held since.
    pub(super) run: (u64, BTreeSet<u64>),
    /// Sent with a `clientMsgId` and not acknowledged: id and text, in order.
    pub(super) unacked: Vec<(String, String)>,
    /// Texts by id, of every message sent with one.
    pub(super) texts: HashMap<String, String>,
    /// Offsets by id, from the first acknowledgement.
    pub(super) acked: HashMap<String, u64>,
    /// Refusals (`error` with code `unavailable`), in order.
    pub(super) refusals: Vec<Value>,
    /// Messages sent and neither acknowledged nor refused yet.
    outstanding: usize,
    /// Messages sent so far, for their texts.
    sent: u32,
    /// The `since` of the join under way.
    asked: Option<(String, u64)>,
}

impl Member {
    /// Connects to `port` and sets the name; joins nothing yet.
    pub(super) fn connect(port: u16, user: &str, room: &str) -> Self {
        let mut member = Self {
            user: user.to_owned(),
            room: room.to_owned(),
            chat: None,
            view: View { user: user.to_owned(), ..View::default() },
            events: VecDeque::new(),
            log: Vec::new(),
            epoch: String::new(),
            run: (0, BTreeSet::new()),
            unacked: Vec::new(),
            texts: HashMap::new(),
            acked: HashMap::new(),
            refusals: Vec::new(),
            outstanding: 0,
            sent: 0,
            asked: None,
        };
        member.reconnect(port);
        member
    }

    pub(super) fn chat(&mut self) -> &mut Chat {
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
    pub(super) fn disconnect(&mut self) {
        self.chat = None;
        self.outstanding = 0;
    }

    pub(super) fn send(&mut self, value: &Value) {
        self.chat().send(value);
    }

    /// Joins the room without `since`; returns `roomJoined`.
    pub(super) fn join(&mut self) -> Value {
        let room = self.room.clone();
        self.send(&json!({"type": "joinRoom", "room": room}));
        self.expect("roomJoined")
    }

    /// Joins the room with `since` at `position`; returns `roomJoined`.
    pub(super) fn join_since(&mut self, position: (String, u64)) -> Value {
        let room = self.room.clone();
        self.send(
            &json!({"type": "joinRoom", "room": room, "since": {"epoch": position.0, "offset": position.1}}),
        );
        self.asked = Some(position);
        self.expect("roomJoined")
    }

    /// Connects to `port` again and rejoins with `since` where its copy of
    /// the room ends; returns `roomJoined`.
    pub(super) fn rejoin(&mut self, port: u16) -> Value {
        self.reconnect(port);
        let position = self.position();
        self.join_since(position)
    }

    /// The epoch and the newest offset up to which this client holds every
    /// message.
    pub(super) fn position(&self) -> (String, u64) {
        let (mut end, held) = (self.run.0, &self.run.1);
        while held.contains(&(end + 1)) {
            end += 1;
        }
        (self.epoch.clone(), end)
    }

    /// Sends a `chatMessage` with a new `clientMsgId`; returns its text.
    pub(super) fn say(&mut self) -> String {
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
    pub(super) fn say_plain(&mut self) -> String {
        self.sent += 1;
        let text = format!("{}-{}", self.user, self.sent);
        self.view.plain.insert(text.clone());
        self.send(&json!({"type": "chatMessage", "text": text}));
        text
    }

    /// Sends again, with the same ids, every message not acknowledged yet.
    pub(super) fn resend_unacked(&mut self) {
        for (id, text) in self.unacked.clone() {
            self.outstanding += 1;
            self.send(&json!({"type": "chatMessage", "text": text, "clientMsgId": id}));
        }
    }

    /// Sends `text` again with the id it had; returns the acknowledgement.
    pub(super) fn resend(&mut self, text: &str) -> Value {
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
    pub(super) fn read(&mut self) -> Value {
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
    pub(super) fn read_until_closed(&mut self) {
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
                // An answer to a message sent, like an ack: the sending side
                // deals with it, not the events.
                self.outstanding = self.outstanding.saturating_sub(1);
                self.refusals.push(msg.clone());
                self.log.push(msg.clone());
                return;
            }
            _ => {}
        }
        self.events.push_back(msg.clone());
        self.log.push(msg.clone());
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
    pub(super) fn expect(&mut self, kind: &str) -> Value {
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
    /// asked for, as a client's offline queue does.
    pub(super) fn settle(&mut self) {
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
    }

    /// Reads until the next refusal of a message sent (`error` with code
    /// `unavailable`) and returns it.
    pub(super) fn expect_refusal(&mut self) -> Value {
        let seen = self.refusals.len();
        while self.refusals.len() == seen {
            self.read();
        }
        self.refusals[seen].clone()
    }

    /// Reads until this client holds a message at `offset` or above (by the
    /// room's order, everything below has arrived by then).
    pub(super) fn wait_holds(&mut self, offset: u64) {
        while self.run.1.last().is_none_or(|newest| *newest < offset) {
            self.read();
        }
    }

    /// Reads until this client has received `n` kept messages from `user`.
    pub(super) fn wait_kept_from(&mut self, user: &str, n: usize) {
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
    pub(super) fn kept_after(&self, n: usize) -> Vec<(u64, String)> {
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

/// Checks the room's history, read by a new client on `port`, against what
/// clients saw: its offsets are gap-free, it holds exactly the messages
/// they saw in its epoch, and every message acknowledged in that epoch is
/// in it exactly once.
fn check_history(port: u16, room: &str, stream: &BTreeMap<Position, Entry>, views: &[&View]) {
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
    for (at, entry) in stream.range((epoch.clone(), 0)..=(epoch.clone(), u64::MAX)) {
        assert!(stored.contains_key(&at.1), "{entry:?}, seen at {}, not in the history", at.1);
    }
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
}

/// Runs [`check_room`] and [`check_history`] over `members`.
pub(super) fn check(port: u16, members: &[&Member]) -> BTreeMap<Position, Entry> {
    let views: Vec<&View> = members.iter().map(|m| &m.view).collect();
    let stream = check_room(&views);
    check_history(port, &members[0].room, &stream, &views);
    stream
}

/// Once every member's messages are acknowledged, sends one last message
/// from `from` (which must not have sent messages without `clientMsgId`)
/// and waits until every member holds it: by the room's order, then
/// everyone has everything before it. Returns its offset.
pub(super) fn sentinel(from: &mut Member, others: &mut [&mut Member]) -> u64 {
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
pub(super) fn lobby(member: &mut Member, n: usize) -> Vec<String> {
    (0..n).map(|_| member.expect("chat")["text"].as_str().unwrap().to_owned()).collect()
}

/// Ada and Cy on the node at `a`, Bob on the node at `b`, all in room `r`,
/// once Ada and Bob have each said three things (sent, not yet settled).
pub(super) fn three_talking(a: u16, b: u16) -> (Member, Member, Member) {
    let mut ada = Member::connect(a, "ada", "r");
    let mut bob = Member::connect(b, "bob", "r");
    let mut cy = Member::connect(a, "cy", "r");
    for member in [&mut ada, &mut bob, &mut cy] {
        member.join();
    }
    for _ in 0..3 {
        ada.say();
        bob.say();
    }
    (ada, bob, cy)
}
