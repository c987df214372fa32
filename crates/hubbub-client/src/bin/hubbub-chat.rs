//! `hubbub-chat`: a line-oriented terminal chat client over `hubbub-client`.
//!
//! Typed lines are messages; `/nick`, `/join`, `/leave`, `/send PATH`,
//! `/ping` and `/quit` are commands. It is scriptable: piped lines are sent
//! in order and, at the end of input, it waits until the server has
//! acknowledged every message and upload before it exits; when stdout is not
//! a terminal each received message is one plain `NAME: TEXT` line, and
//! everything else goes to stderr.

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use hubbub_client::{
    Client, ClientConfig, ClientError, Event, EventStream, FileUpload, ReconnectPolicy, Uuid,
};
use tokio::io::AsyncBufReadExt;
use tokio::time::{Instant, sleep_until};

/// A terminal chat client for Hubbub servers.
///
/// Type a line to send it to the room. Commands: /nick NAME, /join ROOM,
/// /leave, /send PATH, /ping, /quit (a line starting with // sends the rest
/// as a message starting with /).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The server's chat endpoint, e.g. ws://localhost:8080/ws/chat.
    url: String,
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
    /// public ones (a self-signed server).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<std::path::PathBuf>,
}

/// `--reconnect-attempts`: a number, or `None` for unlimited.
#[derive(Clone, Copy, Debug)]
struct Attempts(Option<u32>);

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
    let _ = writeln!(std::io::stderr(), "hubbub-chat: {err:#}");
    ExitCode::FAILURE
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = ClientConfig {
        reconnect: ReconnectPolicy { max_attempts: args.reconnect_attempts.0, ..ReconnectPolicy::default() },
        extra_ca_file: args.ca_file.clone(),
        ..ClientConfig::default()
    };
    let ui = Ui::new(args.reconnect_attempts.0);
    let (client, events) = Client::connect(&args.url, config)
        .await
        .with_context(|| format!("cannot connect to {}", args.url))?;
    client.set_username(&args.name).await.context("invalid --name")?;
    if let Some(room) = &args.room {
        client.join_room(room).await.context("invalid --room")?;
    }
    let mut chat =
        Chat { client, events, ui, outstanding: HashSet::new(), uploads: HashMap::new(), failed: false };
    let finished = chat.interact().await?;
    if finished {
        chat.drain(args.drain_timeout).await;
    }
    chat.client.disconnect().await;
    Ok(if chat.failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// The session: the client, what it waits for, and the screen.
struct Chat {
    client: Client,
    events: EventStream,
    ui: Ui,
    /// Messages sent and not yet acknowledged.
    outstanding: HashSet<Uuid>,
    /// Uploads not yet finished: transfer id -> file name.
    uploads: HashMap<String, String>,
    /// Something was lost or refused: exit with a failure.
    failed: bool,
}

/// What one line of input asks for.
enum Line {
    Message(String),
    Nick(String),
    Join(String),
    Leave,
    Send(String),
    Ping,
    Quit,
    Help,
    Nothing,
}

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
        "nick" if !arg.is_empty() => Line::Nick(arg),
        "join" if !arg.is_empty() => Line::Join(arg),
        "leave" => Line::Leave,
        "send" if !arg.is_empty() => Line::Send(arg),
        "ping" => Line::Ping,
        "quit" | "exit" => Line::Quit,
        _ => Line::Help,
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
                () = self.ui.countdown_tick() => self.ui.show_countdown(),
            }
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
        let result = match line {
            Line::Nick(name) => self.client.set_username(name).await,
            Line::Join(room) => self.client.join_room(room).await,
            Line::Leave => self.client.leave_room().await,
            Line::Ping => self.client.ping().await,
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
                self.ui.info("commands: /nick NAME, /join ROOM, /leave, /send PATH, /ping, /quit");
                Ok(())
            }
            Line::Message(_) | Line::Quit | Line::Nothing => Ok(()),
        };
        if let Err(err) = result {
            self.failed |= matches!(err, ClientError::QueueFull { .. } | ClientError::ReadFile { .. });
            self.ui.info(&format!("error: {err}"));
        }
    }

    /// Waits until every message is acknowledged and every upload finished,
    /// showing events meanwhile.
    async fn drain(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.outstanding.is_empty() || !self.uploads.is_empty() {
            tokio::select! {
                event = self.events.recv() => match event {
                    Some(event) => self.show(event),
                    None => break,
                },
                () = self.ui.countdown_tick() => self.ui.show_countdown(),
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

    fn show(&mut self, event: Event) {
        let ui = &mut self.ui;
        match event {
            Event::Message { user, text, .. } => ui.message(&user, &text),
            Event::LobbyChat { user, text } => ui.message(&format!("[lobby] {user}"), &text),
            Event::MessageAcked { client_msg_id, .. } => {
                self.outstanding.remove(&client_msg_id);
            }
            Event::MessageRejected { client_msg_id } => {
                self.outstanding.remove(&client_msg_id);
                self.failed = true;
            }
            Event::Connected { .. } => ui.connected(),
            Event::Disconnected { code, reason } => {
                let reason = if reason.is_empty() { String::new() } else { format!(": {reason}") };
                ui.info(&format!("disconnected ({code}{reason})"));
            }
            Event::Reconnecting { attempt, delay } => ui.reconnecting(attempt, delay),
            Event::GaveUp { attempts } => {
                self.failed = true;
                ui.info(&format!("gave up after {attempts} reconnect attempt(s)"));
            }
            Event::UsernameSet { username } => ui.info(&format!("you are {username}")),
            Event::RoomJoined { room, user_count } => ui.info(&format!("joined #{room} ({user_count} here)")),
            Event::RoomLeft { room } => ui.info(&format!("left #{room}")),
            Event::UserJoined { user, room, .. } => ui.info(&format!("{user} joined #{room}")),
            Event::UserLeft { user, .. } => ui.info(&format!("{user} left")),
            Event::UserTyping { user } => ui.info(&format!("{user} is typing…")),
            Event::Latency { rtt } => ui.info(&format!("latency {:.1} ms", rtt.as_secs_f64() * 1000.0)),
            Event::Error { message, .. } => ui.info(&format!("server: {message}")),
            Event::FileProgress { transfer_id, received_bytes, size } => {
                let name = self.uploads.get(&transfer_id).map_or("file", String::as_str);
                ui.progress(name, received_bytes, size);
            }
            Event::FileSaved { transfer_id, name, size, url, .. } => {
                self.uploads.remove(&transfer_id);
                ui.info(&format!("uploaded {name} ({size} bytes): {url}"));
            }
            Event::FileFailed { transfer_id, message } => {
                let name = self.uploads.remove(&transfer_id).unwrap_or_default();
                self.failed = true;
                ui.info(&format!("upload of {name} failed: {message}"));
            }
            Event::FileShared { user, name, size, url, .. } => {
                ui.info(&format!("{user} shared {name} ({size} bytes): {url}"));
            }
            Event::Authenticated { user, .. } => ui.info(&format!("authenticated as {user}")),
            Event::AuthExpiring { .. } => {
                ui.info("the access token expires soon; reconnect with a fresh one")
            }
            other => tracing::debug!(?other, "event not shown"),
        }
    }
}

/// The screen: plain lines when stdout is not a terminal, a little status
/// styling (and a live countdown and progress bar) when it is.
struct Ui {
    /// Whether stdout is a terminal.
    tty: bool,
    /// The policy's attempt limit, for "attempt 2/5".
    max_attempts: Option<u32>,
    /// While reconnecting: when the next attempt is due, and its number.
    countdown: Option<(Instant, u32)>,
    /// A status line (countdown, progress bar) is on screen without a
    /// newline and must be cleared before the next line.
    status_shown: bool,
}

impl Ui {
    fn new(max_attempts: Option<u32>) -> Self {
        Self { tty: std::io::stdout().is_terminal(), max_attempts, countdown: None, status_shown: false }
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
    }

    /// Anything but a message: dimmed on a terminal, on stderr otherwise so
    /// stdout carries messages only.
    fn info(&mut self, line: &str) {
        self.clear_status();
        if self.tty {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "\x1b[2m* {line}\x1b[0m");
            let _ = out.flush();
        } else {
            let _ = writeln!(std::io::stderr().lock(), "* {line}");
        }
    }

    fn connected(&mut self) {
        self.countdown = None;
        self.info("connected");
    }

    fn reconnecting(&mut self, attempt: u32, delay: Duration) {
        let of = self.max_attempts.map_or_else(String::new, |max| format!("/{max}"));
        if self.tty {
            self.countdown = Some((Instant::now() + delay, attempt));
            self.show_countdown();
        } else {
            self.info(&format!("reconnecting in {:.1}s (attempt {attempt}{of})", delay.as_secs_f64()));
        }
    }

    /// Fires every second while a countdown is on screen.
    async fn countdown_tick(&self) {
        match self.countdown {
            Some(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            None => std::future::pending().await,
        }
    }

    fn show_countdown(&mut self) {
        let Some((due, attempt)) = self.countdown else { return };
        let left = due.saturating_duration_since(Instant::now()).as_secs_f64().ceil();
        let of = self.max_attempts.map_or_else(String::new, |max| format!("/{max}"));
        let line = if left > 0.0 {
            format!("reconnecting in {left:.0}s (attempt {attempt}{of})")
        } else {
            format!("reconnecting (attempt {attempt}{of})…")
        };
        self.status(&line);
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
        }
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
        assert!(matches!(parse_line("/join"), Line::Help));
        assert!(matches!(parse_line("   "), Line::Nothing));
        assert!(matches!(parse_line("/quit"), Line::Quit));
    }
}
