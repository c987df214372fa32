//! `hubbub-chat`: a line-oriented terminal chat client over `hubbub-client`.
//!
//! Typed lines are messages; `/nick`, `/join`, `/leave`, `/send PATH`,
//! `/history [N]`, `/ping` and `/quit` are commands. After a reconnect it
//! shows what was said meanwhile, under a "while you were away" line. Given
//! several server URLs (a cluster's nodes), it moves to the next one when
//! its server cannot be reached.
//!
//! It is scriptable: piped lines are sent in order and, at the end of input,
//! it waits until the server has acknowledged every message and upload
//! before it exits; when stdout is not a terminal each received message is
//! one plain `NAME: TEXT` line, and everything else goes to stderr. The exit
//! status says whether everything sent was delivered ([`EXIT_STATUS`], shown
//! by `--help`).

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use hubbub_client::{
    Client, ClientConfig, ClientError, Event, EventStream, FileUpload, HistoryPage, ReconnectPolicy, Uuid,
};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

/// What the exit status means: shown by `--help`, and what [`run`] returns.
/// The process tests hold the two together.
const EXIT_STATUS: &str = "\
Exit status:
  0  input ended (or /quit) and the server acknowledged every message and
     upload sent
  1  a message or upload was refused or not delivered (a line sent while in
     no room, a file that cannot be read, one the server refused, or one still
     unacknowledged after --drain-timeout), the connection was lost for good,
     or the client could not connect
  2  invalid arguments, a server URL that is not ws:// or wss:// included
Unknown commands and refused /nick, /join, /leave or /ping are reported but do
not change the exit status.";

/// A terminal chat client for Hubbub servers.
///
/// Type a line to send it to the room. Commands: /nick NAME, /join ROOM,
/// /leave, /send PATH, /history N (N optional), /ping, /help, /quit (a line starting
/// with // sends the rest as a message starting with /). After a reconnect,
/// the messages missed meanwhile are shown under "— while you were away —".
#[derive(Debug, Parser)]
#[command(version, after_help = EXIT_STATUS)]
struct Args {
    /// The server's chat endpoint, e.g. ws://localhost:8080/ws/chat
    /// (wss:// for TLS). Give several (the nodes of a cluster) to have the
    /// client try them in turn: it connects to the first that answers, and
    /// moves to the next whenever a connect fails or the connection is lost.
    #[arg(value_name = "URL", required = true, value_parser = parse_url)]
    urls: Vec<String>,
    /// Your name in the chat.
    #[arg(long)]
    name: String,
    /// A room to join at once.
    #[arg(long)]
    room: Option<String>,
    /// Reconnect attempts after the connection is lost, or `unlimited`.
    #[arg(long, default_value = "5", value_parser = parse_attempts)]
    reconnect_attempts: Attempts,
    /// At the end of input (or /quit), how long to wait for the server to
    /// acknowledge what was sent before giving up.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// A PEM file of certificate authorities to trust for wss:// besides the
    /// public ones (your own CA). The server's certificate must be a leaf
    /// signed by one of them, not a CA certificate itself.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<std::path::PathBuf>,
}

/// `--reconnect-attempts`: a number, or `None` for unlimited.
#[derive(Clone, Copy, Debug)]
struct Attempts(Option<u32>);

/// The URL, checked before anything else happens.
fn parse_url(raw: &str) -> Result<String, String> {
    match hubbub_client::validate_url(raw) {
        Ok(()) => Ok(raw.to_owned()),
        // The message names the URL; clap names it too, so give the reason.
        Err(ClientError::InvalidUrl { reason, .. }) => Err(reason),
        Err(err) => Err(err.to_string()),
    }
}

fn parse_attempts(raw: &str) -> Result<Attempts, String> {
    if raw.eq_ignore_ascii_case("unlimited") {
        return Ok(Attempts(None));
    }
    raw.parse()
        .map(|n| Attempts(Some(n)))
        .map_err(|_| format!("expected a number or `unlimited`, got {raw:?}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(&anyhow::Error::new(err).context("cannot start the async runtime")),
    };
    let code = match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(err) => fail(&err),
    };
    // Reading a terminal's stdin blocks a thread that the runtime would wait
    // for on shutdown; the process is done, so leave without waiting.
    std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 });
}

fn fail(err: &anyhow::Error) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "hubbub-chat: {}", causes(err.chain()));
    ExitCode::FAILURE
}

/// An error and its causes on one line, each said once. Some libraries
/// repeat their cause in their own message (`IO error: X`, then `X`): a
/// cause already contained in the message before it is not said again, and
/// when that message is only a `… error:` label in front of it, the label
/// goes.
fn causes<'a>(chain: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>) -> String {
    let mut said: Vec<String> = Vec::new();
    for cause in chain {
        let text = cause.to_string();
        match said.last_mut() {
            _ if text.is_empty() => {}
            Some(last) if last.contains(&text) => {
                let label = last.strip_suffix(&text).map(str::trim_end);
                if label.is_some_and(|label| label.to_ascii_lowercase().ends_with("error:")) {
                    *last = text;
                }
            }
            _ => said.push(text),
        }
    }
    said.join(": ")
}

/// What a failed first connection means for someone at the terminal. A
/// certificate problem gets one line on what to do; anything else keeps its
/// causes.
fn connect_error(err: ClientError) -> anyhow::Error {
    if let ClientError::Connect { url, .. } = &err
        && let Some(advice) = certificate_advice(&err)
    {
        return anyhow::anyhow!("could not connect to {url}: {advice}");
    }
    err.into()
}

/// The rustls certificate error inside a failed `wss://` connection, turned
/// into advice.
fn certificate_advice(err: &ClientError) -> Option<String> {
    use rustls::{CertificateError, Error as TlsError};
    use tokio_tungstenite::tungstenite::Error as WsError;
    let ClientError::Connect { source: WsError::Io(io), .. } = err else { return None };
    let TlsError::InvalidCertificate(cert) = io.get_ref()?.downcast_ref::<TlsError>()? else { return None };
    const SEE: &str = "see \"wss:// with your own certificate authority\" in hubbub-client's README";
    Some(match cert {
        // webpki's error has no variant in rustls; its name is in the text.
        CertificateError::Other(other) if other.to_string().contains("CaUsedAsEndEntity") => format!(
            "the server's certificate is a CA certificate (CA:TRUE, as `openssl req -x509` makes), \
             which cannot identify a server: have the server use a leaf certificate signed by that \
             CA, and pass the CA with --ca-file ({SEE})"
        ),
        CertificateError::UnknownIssuer => format!(
            "the server's certificate is not signed by a trusted authority: pass the CA that \
             signed it with --ca-file ({SEE})"
        ),
        other => format!("the server's certificate was refused: {other}"),
    })
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = ClientConfig {
        reconnect: ReconnectPolicy { max_attempts: args.reconnect_attempts.0, ..ReconnectPolicy::default() },
        extra_ca_file: args.ca_file.clone(),
        ..ClientConfig::default()
    };
    let ui = Ui::new(args.reconnect_attempts.0);
    let several = args.urls.len() > 1;
    // The origin for file links until the first connection says which
    // server it is.
    let files_base = http_origin(args.urls.first().map_or("", String::as_str));
    let (client, events) = Client::connect_any(args.urls, config).await.map_err(connect_error)?;
    client.set_username(&args.name).await.context("invalid --name")?;
    if let Some(room) = &args.room {
        client.join_room(room).await.context("invalid --room")?;
    }
    let mut chat = Chat {
        client,
        events,
        ui,
        several,
        files_base,
        outstanding: HashSet::new(),
        uploads: HashMap::new(),
        me: None,
        own_join: None,
        restoring: Some(Vec::new()),
        failed: false,
        room: None,
        away: None,
        history: History::new(),
    };
    let finished = chat.interact().await?;
    if finished {
        chat.drain(args.drain_timeout).await;
    } else {
        // The client stopped by itself: the connection is lost for good.
        chat.failed = true;
    }
    chat.client.disconnect().await;
    Ok(if chat.failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// The HTTP origin of the server behind a `ws://` or `wss://` URL, for the
/// links to shared files: `ws://host:8080/ws/chat` gives `http://host:8080`.
fn http_origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("ws", url));
    let scheme = if scheme.eq_ignore_ascii_case("wss") { "https" } else { "http" };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    format!("{scheme}://{authority}")
}

/// A file link as the server gives it (`/files/…`), made absolute.
fn file_link(origin: &str, url: &str) -> String {
    if url.contains("://") { url.to_owned() } else { format!("{origin}{url}") }
}

/// The session: the client, what it waits for, and the screen.
struct Chat {
    client: Client,
    events: EventStream,
    ui: Ui,
    /// Whether several server URLs were given: then "connected" says which.
    several: bool,
    /// `http(s)://host:port` of the server connected to, for absolute file
    /// links.
    files_base: String,
    /// Messages sent and not yet acknowledged.
    outstanding: HashSet<Uuid>,
    /// Uploads not yet finished: transfer id -> file name.
    uploads: HashMap<String, String>,
    /// This client's name as the server confirmed it.
    me: Option<String>,
    /// A `UserJoined` naming this client, held back: the server sends the
    /// joiner its own join before `RoomJoined`, which says the same. Shown
    /// only if something else follows it (someone else with the same name).
    own_join: Option<Event>,
    /// Until the link is live (at start, and after a disconnect): the
    /// server's replies to the restored session, held so that `connected`
    /// comes before them.
    restoring: Option<Vec<Event>>,
    /// A message or upload was refused or lost, or the connection was lost
    /// for good: exit with a failure (see [`EXIT_STATUS`]).
    failed: bool,
    /// The room the server last confirmed, for `/history`.
    room: Option<Room>,
    /// After a rejoin that recovers missed messages: offsets up to this one
    /// are missed messages, shown under a "while you were away" line. The
    /// flag says whether that line is out yet.
    away: Option<(u64, bool)>,
    /// `/history` pages on their way.
    history: History,
}

/// The room the client is in, and how far back it has shown it.
struct Room {
    name: String,
    /// The room's epoch, when the server keeps history: `/history` pages of
    /// another epoch (from before a resync) do not move `before`.
    epoch: Option<String>,
    /// `/history` shows the messages before this offset: the oldest one
    /// shown so far, or the newest at the join plus one. `None` when the
    /// server keeps no history (then `/history` shows the newest).
    before: Option<u64>,
}

/// `/history` pages being fetched. A page comes from a task of its own, so
/// events keep being read while the server answers (the client stops reading
/// the server while its events wait).
struct History {
    tx: mpsc::UnboundedSender<hubbub_client::Result<HistoryPage>>,
    rx: mpsc::UnboundedReceiver<hubbub_client::Result<HistoryPage>>,
    /// Whether a request is out: one at a time, since each page starts where
    /// the previous one ended.
    loading: bool,
    /// The request out was made before the room's history restarted: its
    /// page is dropped, and this many of the newest messages are fetched
    /// instead.
    refetch: Option<u32>,
}

impl History {
    fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self { tx, rx, loading: false, refetch: None }
    }

    /// The next page, once one is loading.
    async fn next(&mut self) -> Option<hubbub_client::Result<HistoryPage>> {
        if !self.loading {
            return std::future::pending().await;
        }
        self.rx.recv().await
    }
}

/// Messages `/history` shows when not told how many.
const HISTORY_DEFAULT: u32 = 20;

/// How to use `/history`; the maximum is the protocol's page limit.
const HISTORY_USAGE: &str = "/history [N], N from 1 to 100";

/// What one line of input asks for.
enum Line {
    Message(String),
    Nick(String),
    Join(String),
    Leave,
    Send(String),
    History(u32),
    Ping,
    Quit,
    Help,
    /// A known command without its argument: how to use it.
    Usage(&'static str),
    /// A command that does not exist.
    Unknown(String),
    Nothing,
}

/// The commands, for `/help` and after a mistake.
const COMMANDS: &str = "commands: /nick NAME, /join ROOM, /leave, /send PATH, /history [N], /ping, \
                        /help, /quit (//text sends /text)";

fn parse_line(line: &str) -> Line {
    if let Some(rest) = line.strip_prefix("//") {
        return Line::Message(format!("/{rest}"));
    }
    let Some(command) = line.strip_prefix('/') else {
        return if line.trim().is_empty() { Line::Nothing } else { Line::Message(line.to_owned()) };
    };
    let (name, arg) = command.split_once(char::is_whitespace).unwrap_or((command, ""));
    let arg = arg.trim().to_owned();
    match name {
        "nick" if arg.is_empty() => Line::Usage("/nick NAME"),
        "nick" => Line::Nick(arg),
        "join" if arg.is_empty() => Line::Usage("/join ROOM"),
        "join" => Line::Join(arg),
        "leave" => Line::Leave,
        "send" if arg.is_empty() => Line::Usage("/send PATH"),
        "send" => Line::Send(arg),
        "history" if arg.is_empty() => Line::History(HISTORY_DEFAULT),
        "history" => match arg.parse() {
            // The protocol's page limit, which the usage line repeats.
            Ok(n) if (1..=hubbub_protocol::MAX_HISTORY_LIMIT).contains(&n) => Line::History(n),
            _ => Line::Usage(HISTORY_USAGE),
        },
        "ping" => Line::Ping,
        "quit" | "exit" => Line::Quit,
        "help" | "?" => Line::Help,
        _ => Line::Unknown(format!("/{name}")),
    }
}

impl Chat {
    /// Reads input and shows events until input ends or `/quit` (true), or
    /// the client stops (false).
    async fn interact(&mut self) -> anyhow::Result<bool> {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        // A message refused for a full queue, retried after the next ack.
        let mut blocked: Option<String> = None;
        loop {
            tokio::select! {
                line = lines.next_line(), if blocked.is_none() => {
                    let Some(line) = line.context("cannot read stdin")? else { return Ok(true) };
                    match parse_line(&line) {
                        Line::Quit => return Ok(true),
                        Line::Message(text) => blocked = self.send(text).await,
                        other => self.command(other).await,
                    }
                }
                event = self.events.recv() => {
                    let Some(event) = event else { return Ok(false) };
                    let settled = matches!(event, Event::MessageAcked { .. } | Event::MessageRejected { .. });
                    self.show(event);
                    if settled && let Some(text) = blocked.take() {
                        blocked = self.send(text).await;
                    }
                }
                page = self.history.next() => self.show_history(page),
                () = self.ui.tick() => self.ui.redraw_status(),
            }
        }
    }

    /// Asks for the messages before the oldest one shown.
    fn fetch_history(&mut self, limit: u32) {
        if self.history.loading {
            self.ui.info("earlier messages are on their way");
            return;
        }
        let Some(room) = &self.room else {
            self.ui.info("error: not in a room: join one first");
            return;
        };
        let (client, before, tx) = (self.client.clone(), room.before, self.history.tx.clone());
        self.history.loading = true;
        tokio::spawn(async move {
            let _ = tx.send(client.history(before, limit).await);
        });
    }

    /// Shows a `/history` page: a header line, the messages, and a line at
    /// the room's beginning.
    fn show_history(&mut self, page: Option<hubbub_client::Result<HistoryPage>>) {
        self.history.loading = false;
        if let Some(limit) = self.history.refetch.take() {
            // Asked for before the history restarted: ask again instead.
            self.fetch_history(limit);
            return;
        }
        let page = match page {
            Some(Ok(page)) => page,
            Some(Err(err)) => return self.ui.info(&format!("error: {err}")),
            None => return,
        };
        let HistoryPage { room: name, epoch, messages, has_more } = page;
        let count = messages.len();
        match count {
            0 => self.ui.info(&format!("— no earlier messages in #{name} —")),
            1 => self.ui.info(&format!("— 1 earlier message in #{name} —")),
            n => self.ui.info(&format!("— {n} earlier messages in #{name} —")),
        }
        let oldest = messages.iter().find_map(|event| match event {
            Event::Message { offset, .. } | Event::FileShared { offset, .. } => *offset,
            _ => None,
        });
        for event in messages {
            self.render_room_message(event);
        }
        if !has_more && count > 0 {
            self.ui.info(&format!("— the beginning of #{name} —"));
        }
        if let Some(room) = &mut self.room
            && room.name == name
            && room.epoch.as_ref().is_none_or(|current| *current == epoch)
            && let Some(oldest) = oldest
        {
            room.before = Some(room.before.map_or(oldest, |before| before.min(oldest)));
        }
    }

    /// Sends a message; gives it back when the queue is full, to retry.
    async fn send(&mut self, text: String) -> Option<String> {
        match self.client.send_message(text.clone()).await {
            Ok(id) => {
                self.outstanding.insert(id);
                None
            }
            Err(ClientError::QueueFull { .. }) if !self.outstanding.is_empty() => Some(text),
            Err(err) => {
                self.failed = true;
                self.ui.info(&format!("not sent ({err}): {text}"));
                None
            }
        }
    }

    async fn command(&mut self, line: Line) {
        // Only a refused upload counts against the exit status; the other
        // commands' errors are shown and done with.
        let upload = matches!(line, Line::Send(_));
        let result = match line {
            Line::Nick(name) => self.client.set_username(name).await,
            Line::Join(room) => self.client.join_room(room).await,
            Line::Leave => self.client.leave_room().await,
            Line::Ping => self.client.ping().await,
            Line::History(limit) => {
                self.fetch_history(limit);
                Ok(())
            }
            Line::Send(path) => match FileUpload::from_path(&path).await {
                Ok(file) => {
                    let name = file.name.clone();
                    self.client.send_file(file).await.map(|id| {
                        self.ui.info(&format!("uploading {name}"));
                        self.uploads.insert(id, name);
                    })
                }
                Err(err) => Err(err),
            },
            Line::Help => {
                self.ui.info(COMMANDS);
                Ok(())
            }
            Line::Usage(usage) => {
                self.ui.info(&format!("usage: {usage}"));
                Ok(())
            }
            Line::Unknown(name) => {
                self.ui.info(&format!("unknown command {name}; {COMMANDS}"));
                Ok(())
            }
            Line::Message(_) | Line::Quit | Line::Nothing => Ok(()),
        };
        if let Err(err) = result {
            self.failed |= upload;
            let what = if upload { "not sent" } else { "error" };
            self.ui.info(&format!("{what}: {err}"));
        }
    }

    /// Waits until every message is acknowledged and every upload finished,
    /// showing events meanwhile.
    async fn drain(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.outstanding.is_empty() || !self.uploads.is_empty() || self.history.loading {
            tokio::select! {
                event = self.events.recv() => match event {
                    Some(event) => self.show(event),
                    None => break,
                },
                page = self.history.next() => self.show_history(page),
                () = self.ui.tick() => self.ui.redraw_status(),
                () = sleep_until(deadline) => break,
            }
        }
        if !self.outstanding.is_empty() || !self.uploads.is_empty() {
            self.failed = true;
            self.ui.info(&format!(
                "gave up waiting: {} message(s) not acknowledged, {} upload(s) not finished",
                self.outstanding.len(),
                self.uploads.len()
            ));
        }
    }

    /// Shows an event, in an order that reads well: `connected` before the
    /// replies to the restored session, and this client's own join once.
    fn show(&mut self, event: Event) {
        let connection = matches!(
            event,
            Event::Connected { .. }
                | Event::Disconnected { .. }
                | Event::Reconnecting { .. }
                | Event::GaveUp { .. }
        );
        if let Some(held) = &mut self.restoring
            && !connection
        {
            held.push(event);
            return;
        }
        match event {
            Event::Connected { .. } => {
                self.render(event);
                for held in self.restoring.take().unwrap_or_default() {
                    self.show_reply(held);
                }
            }
            Event::Disconnected { .. } => {
                self.restoring.get_or_insert_with(Vec::new);
                self.render(event);
            }
            other => self.show_reply(other),
        }
    }

    /// Shows what the server said, holding back this client's own
    /// `UserJoined` until it is clear whether `RoomJoined` repeats it.
    fn show_reply(&mut self, event: Event) {
        if let Some(held) = self.own_join.take() {
            let repeated = matches!((&held, &event),
                (Event::UserJoined { room: joined, .. }, Event::RoomJoined { room, .. }) if joined == room);
            if !repeated {
                self.render(held);
            }
        }
        match &event {
            Event::UserJoined { user, .. } if self.me.as_ref() == Some(user) => self.own_join = Some(event),
            Event::UsernameSet { username } if self.me.as_ref() == Some(username) => {
                // A restored session says the name again; nothing changed.
            }
            _ => self.render(event),
        }
    }

    fn render(&mut self, event: Event) {
        let ui = &mut self.ui;
        match event {
            event @ (Event::Message { .. } | Event::FileShared { .. }) => {
                self.mark_missed(&event);
                self.render_room_message(event);
            }
            Event::LobbyChat { user, text } => ui.message(&format!("[lobby] {user}"), &text),
            Event::MessageAcked { client_msg_id, .. } => {
                self.outstanding.remove(&client_msg_id);
            }
            Event::MessageRejected { client_msg_id } => {
                self.outstanding.remove(&client_msg_id);
                self.failed = true;
            }
            Event::Connected { url, .. } => {
                ui.connected(self.several.then_some(url.as_str()));
                self.files_base = http_origin(&url);
            }
            Event::Disconnected { code, reason } => {
                let reason = if reason.is_empty() { String::new() } else { format!(": {reason}") };
                ui.info(&format!("disconnected ({code}{reason})"));
            }
            Event::Reconnecting { attempt, delay } => ui.reconnecting(attempt, delay),
            Event::GaveUp { attempts } => {
                self.failed = true;
                ui.info(&format!("gave up after {attempts} reconnect attempt(s)"));
            }
            Event::UsernameSet { username } => {
                ui.info(&format!("you are {username}"));
                self.me = Some(username);
            }
            Event::RoomJoined { room, user_count, epoch, offset, missed } => {
                ui.info(&format!("joined #{room} ({user_count} here)"));
                // Back in the same room after a reconnect, `/history` goes
                // on from where it was.
                if self.room.as_ref().is_none_or(|r| r.name != room) {
                    self.room = Some(Room { name: room, epoch, before: offset.map(|o| o + 1) });
                }
                self.away = (missed > 0).then_some(offset.map(|o| (o, false))).flatten();
            }
            Event::RecoveryFailed { room, epoch, offset } => {
                ui.info(&format!(
                    "the messages missed in #{room} could not be recovered; /history shows the latest"
                ));
                if let Some(current) = &mut self.room {
                    current.epoch = Some(epoch);
                    current.before = Some(offset + 1);
                }
            }
            Event::Resync { room, epoch, offset } => self.restart_history(&room, epoch, offset),
            Event::RoomLeft { room } => {
                self.room = None;
                ui.info(&format!("left #{room}"));
            }
            Event::UserJoined { user, room, .. } => ui.info(&format!("{user} joined #{room}")),
            Event::UserLeft { user, .. } => {
                ui.stopped_typing(&user);
                ui.info(&format!("{user} left"));
            }
            Event::UserRenamed { user, previous, .. } => {
                ui.stopped_typing(&previous);
                ui.info(&format!("{previous} is now known as {user}"));
            }
            Event::UserTyping { user } => ui.typing(&user),
            Event::Latency { rtt } => ui.info(&format!("latency {:.1} ms", rtt.as_secs_f64() * 1000.0)),
            Event::Error { message, .. } => ui.info(&format!("server: {message}")),
            Event::FileProgress { transfer_id, received_bytes, size } => {
                let name = self.uploads.get(&transfer_id).map_or("file", String::as_str);
                ui.progress(name, received_bytes, size);
            }
            Event::FileSaved { transfer_id, name, size, url, .. } => {
                self.uploads.remove(&transfer_id);
                let link = file_link(&self.files_base, &url);
                ui.info(&format!("uploaded {name} ({size} bytes): {link}"));
            }
            Event::FileFailed { transfer_id, message } => {
                let name = self.uploads.remove(&transfer_id).unwrap_or_default();
                self.failed = true;
                ui.info(&format!("upload of {name} failed: {message}"));
            }
            Event::Authenticated { user, .. } => ui.info(&format!("authenticated as {user}")),
            Event::AuthExpiring { .. } => {
                ui.info("the access token expires soon; reconnect with a fresh one")
            }
            other => tracing::debug!(?other, "event not shown"),
        }
    }

    /// The server restarted the room's stream: say so, and show its newest
    /// messages again, as they are now.
    fn restart_history(&mut self, room: &str, epoch: String, offset: u64) {
        let Some(current) = self.room.as_mut().filter(|current| current.name == room) else {
            // Not the room shown; the client follows the new position.
            return;
        };
        current.epoch = Some(epoch);
        current.before = Some(offset + 1);
        self.away = None;
        self.ui.info("— history restarted —");
        if self.history.loading {
            self.history.refetch = Some(HISTORY_DEFAULT);
        } else {
            self.fetch_history(HISTORY_DEFAULT);
        }
    }

    /// Puts the "while you were away" line before the first missed message
    /// after a rejoin, and stops marking at the first live one.
    fn mark_missed(&mut self, event: &Event) {
        let offset = match event {
            Event::Message { offset, .. } | Event::FileShared { offset, .. } => *offset,
            _ => None,
        };
        match (&mut self.away, offset) {
            (Some((last_missed, marked)), Some(offset)) if offset <= *last_missed => {
                if !std::mem::replace(marked, true) {
                    self.ui.info("— while you were away —");
                }
            }
            _ => self.away = None,
        }
    }

    /// A room message: `NAME: TEXT`, or a shared file with its link.
    fn render_room_message(&mut self, event: Event) {
        match event {
            Event::Message { user, text, .. } => {
                self.ui.stopped_typing(&user);
                self.ui.message(&user, &text);
            }
            Event::FileShared { user, name, size, url, .. } => {
                let link = file_link(&self.files_base, &url);
                self.ui.info(&format!("{user} shared {name} ({size} bytes): {link}"));
            }
            _ => {}
        }
    }
}

/// How long "NAME is typing…" stays up after the last typing notice. The
/// web page sends one every few seconds while its user types.
const TYPING_SHOWN: Duration = Duration::from_secs(4);

/// The screen: plain lines when stdout is not a terminal, a little status
/// styling when it is, with one status line under the scrollback for what is
/// transient (the reconnect countdown, who is typing, an upload's progress).
struct Ui {
    /// Whether stdout is a terminal.
    tty: bool,
    /// The policy's attempt limit, for "attempt 2/5".
    max_attempts: Option<u32>,
    /// While reconnecting: when the next attempt is due, and its number.
    countdown: Option<(Instant, u32)>,
    /// Who is typing, and until when to say so (terminals only: a line-mode
    /// reader would only get a stale line per burst).
    typing: Vec<(String, Instant)>,
    /// A status line is on screen without a newline and must be cleared
    /// before the next line.
    status_shown: bool,
}

impl Ui {
    fn new(max_attempts: Option<u32>) -> Self {
        Self {
            tty: std::io::stdout().is_terminal(),
            max_attempts,
            countdown: None,
            typing: Vec::new(),
            status_shown: false,
        }
    }

    /// A received message: `NAME: TEXT`, verbatim, one flush per line.
    fn message(&mut self, user: &str, text: &str) {
        self.clear_status();
        let mut out = std::io::stdout().lock();
        let _ = if self.tty {
            writeln!(out, "\x1b[1m{user}\x1b[0m: {text}")
        } else {
            writeln!(out, "{user}: {text}")
        };
        let _ = out.flush();
        drop(out);
        self.redraw_status();
    }

    /// Anything but a message: dimmed on a terminal, on stderr otherwise so
    /// stdout carries messages only.
    fn info(&mut self, line: &str) {
        self.clear_status();
        if self.tty {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "\x1b[2m* {line}\x1b[0m");
            let _ = out.flush();
            drop(out);
            self.redraw_status();
        } else {
            let _ = writeln!(std::io::stderr().lock(), "* {line}");
        }
    }

    /// Connected, to `url` when it is worth saying (several were given).
    fn connected(&mut self, url: Option<&str>) {
        self.countdown = None;
        match url {
            Some(url) => self.info(&format!("connected to {url}")),
            None => self.info("connected"),
        }
    }

    fn reconnecting(&mut self, attempt: u32, delay: Duration) {
        let of = self.max_attempts.map_or_else(String::new, |max| format!("/{max}"));
        if self.tty {
            self.countdown = Some((Instant::now() + delay, attempt));
            self.redraw_status();
        } else {
            self.info(&format!("reconnecting in {:.1}s (attempt {attempt}{of})", delay.as_secs_f64()));
        }
    }

    /// Someone is typing: the status line says so for a while.
    fn typing(&mut self, user: &str) {
        if !self.tty {
            return;
        }
        let until = Instant::now() + TYPING_SHOWN;
        match self.typing.iter_mut().find(|(name, _)| name == user) {
            Some(entry) => entry.1 = until,
            None => self.typing.push((user.to_owned(), until)),
        }
        self.redraw_status();
    }

    /// Someone's message arrived, or they left: they are no longer typing.
    fn stopped_typing(&mut self, user: &str) {
        self.typing.retain(|(name, _)| name != user);
    }

    /// Fires every second while the status line has something that changes
    /// with time: a countdown, or a typing notice to take down.
    async fn tick(&self) {
        if self.countdown.is_some() || !self.typing.is_empty() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        } else {
            std::future::pending().await
        }
    }

    /// Puts the status line up to date: the countdown first, else who is
    /// typing, else nothing.
    fn redraw_status(&mut self) {
        let now = Instant::now();
        self.typing.retain(|(_, until)| *until > now);
        let of = self.max_attempts.map_or_else(String::new, |max| format!("/{max}"));
        let line = if let Some((due, attempt)) = self.countdown {
            let left = due.saturating_duration_since(now).as_secs_f64().ceil();
            Some(if left > 0.0 {
                format!("reconnecting in {left:.0}s (attempt {attempt}{of})")
            } else {
                format!("reconnecting (attempt {attempt}{of})…")
            })
        } else {
            typing_line(self.typing.iter().map(|(name, _)| name.as_str()))
        };
        match line {
            Some(line) => self.status(&line),
            None => self.clear_status(),
        }
    }

    fn progress(&mut self, name: &str, received: u64, size: u64) {
        let percent = received.saturating_mul(100).checked_div(size).unwrap_or(100);
        if self.tty {
            const WIDTH: u64 = 30;
            let filled = usize::try_from(percent.min(100) * WIDTH / 100).unwrap_or(0);
            let bar = format!("{}{}", "#".repeat(filled), ".".repeat(WIDTH as usize - filled));
            self.status(&format!("[{bar}] {percent:>3}% {name}"));
        } else {
            self.info(&format!("{name}: {percent}%"));
        }
    }

    /// A line that the next one replaces (terminals only).
    fn status(&mut self, line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\r\x1b[K\x1b[2m* {line}\x1b[0m");
        let _ = out.flush();
        self.status_shown = true;
    }

    fn clear_status(&mut self) {
        if std::mem::take(&mut self.status_shown) {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "\r\x1b[K");
            let _ = out.flush();
        }
    }
}

/// The status line for who is typing, if anyone is.
fn typing_line<'a>(names: impl ExactSizeIterator<Item = &'a str>) -> Option<String> {
    let names: Vec<&str> = names.collect();
    match names.as_slice() {
        [] => None,
        [one] => Some(format!("{one} is typing…")),
        [one, two] => Some(format!("{one} and {two} are typing…")),
        [one, two, three] => Some(format!("{one}, {two} and {three} are typing…")),
        _ => Some("several people are typing…".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_commands() {
        assert!(matches!(parse_line("hello"), Line::Message(t) if t == "hello"));
        assert!(matches!(parse_line("//me waves"), Line::Message(t) if t == "/me waves"));
        assert!(matches!(parse_line("/join  general "), Line::Join(r) if r == "general"));
        assert!(matches!(parse_line("/send a b.txt"), Line::Send(p) if p == "a b.txt"));
        assert!(matches!(parse_line("/join"), Line::Usage("/join ROOM")));
        assert!(matches!(parse_line("/help"), Line::Help));
        assert!(matches!(parse_line("/bogus x"), Line::Unknown(c) if c == "/bogus"));
        assert!(matches!(parse_line("   "), Line::Nothing));
        assert!(matches!(parse_line("/quit"), Line::Quit));
        assert!(matches!(parse_line("/history"), Line::History(HISTORY_DEFAULT)));
        assert!(matches!(parse_line("/history 5"), Line::History(5)));
        assert!(matches!(parse_line("/history 0"), Line::Usage(_)));
        assert!(matches!(parse_line("/history 101"), Line::Usage(_)));
        assert!(matches!(parse_line("/history x"), Line::Usage(_)));
        let max = hubbub_protocol::MAX_HISTORY_LIMIT;
        assert!(HISTORY_USAGE.ends_with(&format!(" to {max}")), "the usage line says the real limit");
    }

    #[test]
    fn typing_reads_as_a_sentence() {
        let line = |names: &[&str]| typing_line(names.iter().copied());
        assert_eq!(line(&[]), None);
        assert_eq!(line(&["webby"]).unwrap(), "webby is typing…");
        assert_eq!(line(&["a", "b"]).unwrap(), "a and b are typing…");
        assert_eq!(line(&["a", "b", "c"]).unwrap(), "a, b and c are typing…");
        assert_eq!(line(&["a", "b", "c", "d"]).unwrap(), "several people are typing…");
    }

    #[test]
    fn file_links_are_absolute_on_the_server_origin() {
        assert_eq!(http_origin("ws://localhost:8080/ws/chat"), "http://localhost:8080");
        assert_eq!(http_origin("WSS://chat.example.com/ws/chat?x=1"), "https://chat.example.com");
        assert_eq!(http_origin("ws://[::1]:9"), "http://[::1]:9");
        assert_eq!(file_link("http://h:1", "/files/abc/x.png"), "http://h:1/files/abc/x.png");
        assert_eq!(file_link("http://h:1", "https://cdn/x.png"), "https://cdn/x.png");
    }

    #[test]
    fn each_cause_is_said_once() {
        #[derive(Debug)]
        struct Wrap(&'static str, Option<Box<Wrap>>);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let refused = "Connection refused (os error 111)";
        let io = Wrap("IO error: Connection refused (os error 111)", Some(Box::new(Wrap(refused, None))));
        let err = anyhow::Error::new(Wrap("could not connect to ws://h/ws/chat", Some(Box::new(io))));
        assert_eq!(causes(err.chain()), format!("could not connect to ws://h/ws/chat: {refused}"));
        let err = anyhow::Error::new(Wrap("cannot read a: b", Some(Box::new(Wrap("b", None)))));
        assert_eq!(causes(err.chain()), "cannot read a: b", "a cause already said is not said again");
    }
}
