//! The client handle and the one background task that owns the socket.
//!
//! [`Client::connect`] opens the first connection and spawns the task. The
//! task owns the WebSocket and the [`ClientState`]; handles send it commands
//! over a channel, each with a one-shot reply, and it sends events back
//! over a bounded channel. Everything it does is in one `select!` loop per
//! link: commands, frames from the server, the heartbeat, delivering events
//! and upload chunks. Between links it waits out the backoff delay and
//! connects again, to each of its servers in turn until one answers, still
//! answering commands (they are queued).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::config::jitter_sample;
use crate::servers::Servers;
use crate::state::{ClientState, Op, Reply, StateLimits};
use crate::upload::{Prepared, Send};
use crate::{
    ClientConfig, ClientError, Event, EventStream, FileUpload, HistoryPage, LinkEvent, LinkMonitor, Result,
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Commands waiting for the task. The task answers each at once (it never
/// waits on the application), so this only smooths bursts.
const COMMAND_BUFFER: usize = 64;

/// The close code for a link that ended without a close frame.
const ABNORMAL: u16 = 1006;

/// A connection to a Hubbub server that survives the server going away.
///
/// `Client` is a cheap, cloneable handle; the connection itself lives in a
/// background task. Commands return once the client has taken them: sent
/// on the live link, or queued while it reconnects. What the server makes
/// of them arrives as [`Event`]s on the [`EventStream`].
///
/// See the [crate documentation](crate) for an example.
#[derive(Clone, Debug)]
pub struct Client {
    /// To the connection task.
    commands: mpsc::Sender<Command>,
}

/// What a handle asks of the task.
#[derive(Debug)]
enum Command {
    Do { op: Op, reply: oneshot::Sender<Result<Reply>> },
    Disconnect { done: oneshot::Sender<()> },
}

impl Client {
    /// Connects to a Hubbub chat endpoint (`ws://host:8080/ws/chat`) and
    /// starts the client.
    ///
    /// Returns once the WebSocket is open; [`Event::Connected`] follows when
    /// the server has greeted it. A failure of this first connection is an
    /// error; later ones are retried per [`ClientConfig::reconnect`].
    ///
    /// The same as [`Client::connect_any`] with one URL.
    pub async fn connect(url: impl Into<String>, config: ClientConfig) -> Result<(Client, EventStream)> {
        Self::connect_any([url], config).await
    }

    /// Connects to the first of several servers that answers, such as the
    /// nodes of a cluster behind one name, and starts the client.
    ///
    /// The URLs are tried in order, once each; the client starts with the
    /// first that connects. Afterwards, whenever a connect fails or the link
    /// is lost, the next connect goes to the next URL in the list, wrapping
    /// around, so a node that is down does not strand the client. A link
    /// lost before the session was restored on it counts as a failed
    /// connect. One
    /// reconnect attempt ([`Event::Reconnecting`],
    /// [`ReconnectPolicy::max_attempts`](crate::ReconnectPolicy::max_attempts))
    /// is one round through the list: the backoff delay comes before each
    /// round, not before each URL. [`Event::Connected`] says which URL the
    /// client is connected to. The session, the offline queue, unacknowledged
    /// messages and room positions carry over from one server to the next:
    /// nodes that share their history replay what the client missed.
    ///
    /// Fails with [`ClientError::NoServerUrl`] for an empty list, with
    /// [`ClientError::InvalidUrl`] (before anything is tried) for a URL that
    /// is not a WebSocket URL, and, when no server can be reached, with the
    /// one URL's error or [`ClientError::Unreachable`] listing every URL's.
    ///
    /// ```no_run
    /// use hubbub_client::{Client, ClientConfig, Event};
    ///
    /// # async fn demo() -> Result<(), hubbub_client::ClientError> {
    /// let nodes = ["ws://chat-1.internal:8080/ws/chat", "ws://chat-2.internal:8080/ws/chat"];
    /// let (client, mut events) = Client::connect_any(nodes, ClientConfig::default()).await?;
    /// client.join_room("general").await?;
    /// while let Some(event) = events.recv().await {
    ///     if let Event::Connected { url, .. } = event {
    ///         println!("connected to {url}");
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_any<I>(urls: I, config: ClientConfig) -> Result<(Client, EventStream)>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        config.validate()?;
        let mut servers = Servers::new(urls.into_iter().map(Into::into).collect())?;
        let tls = tls_config(config.extra_ca_file.as_deref())?;
        let mut failures = Vec::new();
        let mut linked = None;
        let mut left = servers.len();
        while left > 0 {
            left -= 1;
            let url = servers.take().to_owned();
            match open(url.clone(), config.connect_timeout, tls.clone()).await {
                Ok(ws) => {
                    linked = Some((ws, url));
                    break;
                }
                Err(err) => {
                    tracing::debug!(%url, cause = %err, "connect failed");
                    failures.push(err);
                }
            }
        }
        let Some((ws, url)) = linked else {
            return Err(match <[ClientError; 1]>::try_from(failures) {
                Ok([only]) => only,
                Err(failures) => ClientError::Unreachable { failures },
            });
        };
        let (commands, command_rx) = mpsc::channel(COMMAND_BUFFER);
        let (event_tx, event_rx) = mpsc::channel(config.event_buffer);
        let state = ClientState::new(StateLimits {
            queue_capacity: config.queue_capacity,
            upload_queue: config.upload_queue,
            seen_message_ids: config.seen_message_ids,
            chunk_size: config.chunk_size,
            send_rate: config.send_rate,
            protocol: config.limits.clone(),
        });
        let task = Task {
            servers,
            config,
            tls,
            commands: command_rx,
            events: Outbox::new(event_tx),
            state,
            waiting: HashMap::new(),
        };
        tokio::spawn(task.run(ws, url, left));
        Ok((Client { commands }, EventStream::new(event_rx)))
    }

    async fn call(&self, op: Op) -> Result<Reply> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Do { op, reply }).await.map_err(|_| ClientError::Closed)?;
        answer.await.map_err(|_| ClientError::Closed)?
    }

    /// Sets the name shown on this client's messages; the server confirms
    /// with [`Event::UsernameSet`]. Restored after every reconnect.
    pub async fn set_username(&self, username: impl Into<String>) -> Result<()> {
        self.call(Op::SetUsername(username.into())).await.map(drop)
    }

    /// Joins a room (leaving the current one); the server confirms with
    /// [`Event::RoomJoined`]. Restored after every reconnect.
    pub async fn join_room(&self, room: impl Into<String>) -> Result<()> {
        self.call(Op::JoinRoom(room.into())).await.map(drop)
    }

    /// Leaves the room; the server confirms with [`Event::RoomLeft`].
    pub async fn leave_room(&self) -> Result<()> {
        self.call(Op::LeaveRoom).await.map(drop)
    }

    /// Sends a message to the room and returns its id. The message is
    /// resent after a reconnect until the server acknowledges it
    /// ([`Event::MessageAcked`] with this id); the server and the other
    /// clients drop copies, so the room sees it once.
    pub async fn send_message(&self, text: impl Into<String>) -> Result<Uuid> {
        match self.call(Op::SendMessage(text.into())).await? {
            Reply::MessageId(id) => Ok(id),
            // The task answers `SendMessage` with an id, always.
            other => unreachable!("send_message answered with {other:?}"),
        }
    }

    /// Tells the room this user is typing. Not queued: fails with
    /// [`ClientError::NotConnected`] while reconnecting.
    pub async fn send_typing(&self) -> Result<()> {
        self.call(Op::Typing).await.map(drop)
    }

    /// Sends a lobby broadcast to every connected client (the tutorial's
    /// `chat` message).
    pub async fn send_lobby_chat(&self, text: impl Into<String>) -> Result<()> {
        self.call(Op::LobbyChat(text.into())).await.map(drop)
    }

    /// Measures the round-trip time; the answer is an [`Event::Latency`].
    /// Not queued: fails with [`ClientError::NotConnected`] while
    /// reconnecting.
    pub async fn ping(&self) -> Result<()> {
        self.call(Op::Ping).await.map(drop)
    }

    /// Uploads a file to the room and returns its transfer id. Uploads go
    /// one at a time, in order, while chat goes on; progress arrives as
    /// [`Event::FileProgress`], the end as [`Event::FileSaved`] or
    /// [`Event::FileFailed`]. An upload cut by a reconnect resumes where
    /// the server stopped.
    pub async fn send_file(&self, file: FileUpload) -> Result<String> {
        // Hashing a large file takes a while: keep it off the async threads.
        let prepared = tokio::task::spawn_blocking(move || Prepared::new(file))
            .await
            .map_err(|_| ClientError::Closed)?;
        match self.call(Op::SendFile(prepared)).await? {
            Reply::TransferId(id) => Ok(id),
            // The task answers `SendFile` with a transfer id, always.
            other => unreachable!("send_file answered with {other:?}"),
        }
    }

    /// Fetches a page of the current room's earlier messages: up to `limit`
    /// (1 to 100) with an offset below `before`, or the newest when
    /// `before` is `None`. Returns once the server has answered; keep
    /// reading the [`EventStream`] meanwhile (from another task), since the
    /// client stops reading the server while its events wait.
    ///
    /// Page back with [`HistoryPage::next_before`]. After
    /// [`Event::RecoveryFailed`], `history(Some(offset + 1), …)` with the
    /// event's offset fetches what was said before the rejoin.
    ///
    /// Not queued: fails with [`ClientError::NotConnected`] while
    /// reconnecting (or if the link is lost before the answer),
    /// [`ClientError::NotInRoom`] outside a room, and
    /// [`ClientError::HistoryRefused`] when the server answers with an
    /// error (a server that keeps no history, for one).
    pub async fn history(&self, before: Option<u64>, limit: u32) -> Result<HistoryPage> {
        match self.call(Op::History { before, limit }).await? {
            Reply::History(page) => Ok(page),
            // The task answers `History` with a page, always.
            other => unreachable!("history answered with {other:?}"),
        }
    }

    /// Closes the connection (code 1000) and stops the client for good: no
    /// reconnect, and queued commands and unacknowledged messages are
    /// dropped. Returns once the connection is closed; the event stream then
    /// ends. Calling it again does nothing.
    pub async fn disconnect(&self) {
        let (done, closed) = oneshot::channel();
        if self.commands.send(Command::Disconnect { done }).await.is_ok() {
            let _ = closed.await;
        }
    }

    /// Whether the client has stopped.
    pub fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }
}

/// Checks that `url` is a WebSocket URL the client can connect to: `ws://`
/// or `wss://`, a host, and nothing malformed. The error says what is wrong
/// and, for a URL without a scheme or with `http(s)://`, the URL meant.
///
/// [`Client::connect`] calls it first; a program can call it earlier, while
/// it checks its other input.
///
/// ```
/// use hubbub_client::validate_url;
///
/// assert!(validate_url("wss://chat.example.com/ws/chat").is_ok());
/// let err = validate_url("http://localhost:8080/ws/chat").unwrap_err();
/// assert!(err.to_string().contains("use ws://localhost:8080/ws/chat"), "{err}");
/// ```
pub fn validate_url(url: &str) -> Result<()> {
    use tungstenite::client::IntoClientRequest as _;
    let invalid = |reason: String| ClientError::InvalidUrl { url: url.to_owned(), reason };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(invalid(format!("it has no scheme; use ws://{url} (or wss:// for TLS)")));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "ws" | "wss" => {}
        "http" => return Err(invalid(format!("the chat speaks WebSocket: use ws://{rest}"))),
        "https" => return Err(invalid(format!("the chat speaks WebSocket: use wss://{rest}"))),
        other => return Err(invalid(format!("unsupported scheme {other}://; use ws:// or wss://"))),
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    if host.is_empty() || host.starts_with(':') {
        return Err(invalid("it has no host".to_owned()));
    }
    url.into_client_request().map(drop).map_err(|err| invalid(err.to_string()))
}

/// The TLS client settings for `wss://`: Mozilla's root certificates, plus
/// the authorities in `extra_ca_file`.
fn tls_config(extra_ca_file: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = extra_ca_file {
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|err| ClientError::Tls(format!("cannot read {}: {err}", path.display())))?;
        if certs.is_empty() {
            return Err(ClientError::Tls(format!("no PEM certificate in {}", path.display())));
        }
        for cert in certs {
            roots.add(cert).map_err(|err| ClientError::Tls(format!("{}: {err}", path.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| ClientError::Tls(err.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Opens a WebSocket (`ws://` or `wss://`), within `limit`.
async fn open(url: String, limit: Duration, tls: Arc<rustls::ClientConfig>) -> Result<Ws> {
    let connector = tokio_tungstenite::Connector::Rustls(tls);
    let connecting =
        tokio_tungstenite::connect_async_tls_with_config(url.as_str(), None, true, Some(connector));
    match timeout(limit, connecting).await {
        Ok(Ok((ws, _response))) => Ok(ws),
        Ok(Err(source)) => Err(ClientError::Connect { url, source }),
        Err(_) => Err(ClientError::ConnectTimeout { url }),
    }
}

/// Whether a link closed with `code` is worth reconnecting: the server went
/// away or restarts (1001, 1012), failed or is overloaded (1011, 1013, 1014),
/// or the link broke (1006). A normal close, a protocol error or a policy
/// decision (1000, 1002, 1003, 1007–1010) would only happen again.
pub(crate) fn should_reconnect(code: u16) -> bool {
    matches!(code, 1001 | 1006 | 1011 | 1012 | 1013 | 1014)
}

/// Events on their way to the application. When the channel is full they
/// wait here, and the task stops reading the server until they are taken.
#[derive(Debug)]
struct Outbox {
    tx: mpsc::Sender<Event>,
    backlog: VecDeque<Event>,
}

impl Outbox {
    fn new(tx: mpsc::Sender<Event>) -> Self {
        Self { tx, backlog: VecDeque::new() }
    }

    fn push(&mut self, event: Event) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(event);
            return;
        }
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => self.backlog.push_back(event),
            // Nobody listens any more; the application still has handles.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn is_blocked(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Hands one waiting event over once the application makes room.
    async fn deliver(&mut self) {
        match self.tx.reserve().await {
            Ok(permit) => {
                if let Some(event) = self.backlog.pop_front() {
                    permit.send(event);
                }
            }
            Err(_) => self.backlog.clear(),
        }
    }

    /// Delivers everything, before the task ends.
    async fn flush(&mut self) {
        while let Some(event) = self.backlog.pop_front() {
            if self.tx.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// How a link ended.
#[derive(Debug)]
enum LinkEnd {
    /// The application disconnected or dropped every handle.
    Stop,
    /// The link was lost.
    Lost { code: u16, reason: String, was_live: bool },
}

/// What woke the link loop.
enum Input {
    Command(Option<Command>),
    Frame(Option<std::result::Result<Message, tungstenite::Error>>),
    Link(LinkEvent),
    RestoreTimeout,
    Paced,
    Delivered,
    Upload,
}

/// What one reconnect attempt came to.
enum Round {
    /// A server answered: the new link, and its URL.
    Linked(Box<Ws>, String),
    /// No server answered.
    Failed,
    /// The application disconnected meanwhile.
    Stopped,
}

/// The background task.
struct Task {
    /// The servers, and which one to connect to next.
    servers: Servers,
    config: ClientConfig,
    /// TLS settings for `wss://`, built once.
    tls: Arc<rustls::ClientConfig>,
    commands: mpsc::Receiver<Command>,
    events: Outbox,
    state: ClientState,
    /// Commands whose answer comes from the server (history requests): the
    /// state's token -> where the answer goes.
    waiting: HashMap<u64, oneshot::Sender<Result<Reply>>>,
}

impl Task {
    /// Serves the first link, `ws` to `url`, and then reconnects for as long
    /// as the policy allows and the application wants. `left` counts the
    /// servers the first connection's round did not try.
    async fn run(mut self, ws: Ws, url: String, mut left: usize) {
        let mut link = Some((ws, url));
        // Failed attempts (rounds through the servers) since the last live link.
        let mut attempt = 0;
        // `left` is what the current round has yet to try. A link lost
        // before it was live (the server closed it at once, or never
        // restored the session) counts as a failed connect: the round goes
        // on to the next server without a delay.
        loop {
            if let Some((ws, url)) = link.take() {
                match self.serve(ws, &url).await {
                    LinkEnd::Stop => break,
                    LinkEnd::Lost { code, reason, was_live } => {
                        self.state.on_link_lost();
                        self.answer_waiting();
                        if was_live {
                            attempt = 0;
                            left = 0;
                        }
                        tracing::info!(%url, code, %reason, "link lost");
                        self.events.push(Event::Disconnected { code, reason });
                        if !should_reconnect(code) {
                            break;
                        }
                    }
                }
            }
            if left == 0 {
                attempt += 1;
                let policy = &self.config.reconnect;
                if !policy.allows(attempt) {
                    self.events.push(Event::GaveUp { attempts: attempt - 1 });
                    break;
                }
                let delay = policy.delay(attempt, jitter_sample());
                self.events.push(Event::Reconnecting { attempt, delay });
                if self.offline(sleep(delay)).await.is_none() {
                    break;
                }
                left = self.servers.len();
            }
            match self.round(attempt, &mut left).await {
                Round::Stopped => break,
                Round::Linked(ws, url) => link = Some((*ws, url)),
                Round::Failed => {}
            }
        }
        // Dropping the receiver first makes handles fail fast with `Closed`.
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            if let Command::Do { reply, .. } = command {
                let _ = reply.send(Err(ClientError::Closed));
            }
        }
        self.events.flush().await;
    }

    /// The rest of a reconnect attempt: the `left` servers not yet tried,
    /// in turn from the one after the server tried last, without waiting in
    /// between; each one tried counts down `left`.
    async fn round(&mut self, attempt: u32, left: &mut usize) -> Round {
        while *left > 0 {
            *left -= 1;
            let url = self.servers.take().to_owned();
            // Boxed: a TLS connection in progress is large.
            let connecting = Box::pin(open(url.clone(), self.config.connect_timeout, self.tls.clone()));
            match self.offline(connecting).await {
                None => return Round::Stopped,
                Some(Ok(ws)) => return Round::Linked(Box::new(ws), url),
                Some(Err(err)) => tracing::debug!(attempt, %url, cause = %err, "reconnect attempt failed"),
            }
        }
        Round::Failed
    }

    /// Answers the commands whose answer has come.
    fn answer_waiting(&mut self) {
        while let Some((token, answer)) = self.state.poll_answer() {
            if let Some(reply) = self.waiting.remove(&token) {
                let _ = reply.send(answer);
            }
        }
    }

    /// Takes a command's immediate reply: passed on, or kept until the
    /// answer comes.
    fn reply(&mut self, reply: oneshot::Sender<Result<Reply>>, result: Result<Reply>) {
        match result {
            Ok(Reply::Pending(token)) => {
                self.waiting.insert(token, reply);
            }
            other => {
                let _ = reply.send(other);
            }
        }
    }

    /// Runs `work` while answering commands (they queue) and delivering
    /// events. `None` when the application disconnected meanwhile.
    async fn offline<T>(&mut self, work: impl Future<Output = T>) -> Option<T> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return Some(out),
                command = self.commands.recv() => match command {
                    Some(Command::Do { op, reply }) => {
                        let result = self.state.command(op, Instant::now().into_std());
                        self.reply(reply, result);
                    }
                    Some(Command::Disconnect { done }) => {
                        let _ = done.send(());
                        return None;
                    }
                    None => return None,
                },
                () = self.events.deliver(), if self.events.is_blocked() => {}
            }
        }
    }

    /// Drives one link, to the server at `url`, until it ends.
    async fn serve(&mut self, mut ws: Ws, url: &str) -> LinkEnd {
        tracing::info!(%url, "linked");
        self.state.on_link_up(url);
        let restore_deadline = Instant::now() + self.config.restore_timeout;
        let mut monitor = self.config.heartbeat.map(LinkMonitor::new);
        loop {
            while let Some(event) = self.state.poll_event() {
                self.events.push(event);
            }
            self.answer_waiting();
            if let Err(err) = self.write_pending(&mut ws).await {
                return self.lost(ABNORMAL, format!("write failed: {err}"));
            }
            let paced = self.state.poll_timeout().map(Instant::from_std);
            let input = tokio::select! {
                command = self.commands.recv() => Input::Command(command),
                frame = ws.next(), if !self.events.is_blocked() => Input::Frame(frame),
                link = link_event(&mut monitor) => Input::Link(link),
                () = sleep_until(restore_deadline), if !self.state.is_live() => Input::RestoreTimeout,
                () = sleep_until_some(paced), if paced.is_some() => Input::Paced,
                () = self.events.deliver(), if self.events.is_blocked() => Input::Delivered,
                () = std::future::ready(()), if self.state.wants_upload_send() => Input::Upload,
            };
            let now = Instant::now().into_std();
            match input {
                Input::Command(Some(Command::Do { op, reply })) => {
                    let result = self.state.command(op, now);
                    self.reply(reply, result);
                }
                Input::Command(Some(Command::Disconnect { done })) => {
                    self.close(&mut ws).await;
                    self.events.push(Event::Disconnected {
                        code: 1000,
                        reason: "disconnected by the client".into(),
                    });
                    let _ = done.send(());
                    return LinkEnd::Stop;
                }
                Input::Command(None) => {
                    self.close(&mut ws).await;
                    return LinkEnd::Stop;
                }
                Input::Frame(Some(Ok(Message::Text(text)))) => match hubbub_protocol::decode_server(&text) {
                    Ok(msg) => {
                        if let Some(monitor) = &mut monitor {
                            monitor.on_message(&msg);
                        }
                        self.state.on_message(msg, now);
                    }
                    Err(err) => tracing::warn!(cause = %err, "ignored a frame the client cannot decode"),
                },
                Input::Frame(Some(Ok(Message::Close(frame)))) => {
                    let (code, reason) =
                        frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                    // Reading on lets tungstenite send its reply to the close.
                    let _ = timeout(self.config.close_timeout, async { while ws.next().await.is_some() {} })
                        .await;
                    return self.lost(code, reason);
                }
                // Pings are answered by tungstenite; nothing else is expected.
                Input::Frame(Some(Ok(_))) => {}
                Input::Frame(Some(Err(err))) => return self.lost(ABNORMAL, err.to_string()),
                Input::Frame(None) => return self.lost(ABNORMAL, "the connection closed".into()),
                Input::Link(LinkEvent::SendPing(ping)) => {
                    if let Err(err) = ws.send(Message::text(ping.to_json())).await {
                        return self.lost(ABNORMAL, format!("write failed: {err}"));
                    }
                }
                Input::Link(LinkEvent::Dead) => {
                    return self.lost(ABNORMAL, "the server stopped answering pings".into());
                }
                Input::RestoreTimeout => {
                    return self.lost(ABNORMAL, "the server did not restore the session in time".into());
                }
                Input::Paced => self.state.on_timeout(now),
                Input::Delivered => {}
                Input::Upload => self.state.upload_step(),
            }
        }
    }

    fn lost(&self, code: u16, reason: String) -> LinkEnd {
        LinkEnd::Lost { code, reason, was_live: self.state.is_live() }
    }

    /// Writes what the state wants sent, flushing once.
    async fn write_pending(&mut self, ws: &mut Ws) -> std::result::Result<(), tungstenite::Error> {
        let mut fed = false;
        while let Some(send) = self.state.poll_send() {
            let frame = match send {
                Send::Message(msg) => Message::text(msg.to_json()),
                Send::Chunk(bytes) => Message::binary(bytes),
            };
            ws.feed(frame).await?;
            fed = true;
        }
        if fed {
            ws.flush().await?;
        }
        Ok(())
    }

    /// Closes the link with 1000 and waits (briefly) for the server's reply.
    async fn close(&mut self, ws: &mut Ws) {
        let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
        let closing = async {
            ws.close(Some(frame)).await?;
            while ws.next().await.transpose()?.is_some() {}
            Ok::<(), tungstenite::Error>(())
        };
        if let Ok(Err(err)) = timeout(self.config.close_timeout, closing).await {
            tracing::debug!(cause = %err, "closing handshake incomplete");
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The heartbeat's next event, or never when it is off.
async fn link_event(monitor: &mut Option<LinkMonitor>) -> LinkEvent {
    match monitor {
        Some(monitor) => monitor.next_event().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_on_going_away_and_breakage_only() {
        for code in [1001, 1006, 1011, 1012, 1013, 1014] {
            assert!(should_reconnect(code), "{code}");
        }
        for code in [1000, 1002, 1003, 1005, 1007, 1008, 1009, 1010, 4000] {
            assert!(!should_reconnect(code), "{code}");
        }
    }

    #[test]
    fn urls_are_checked_with_the_fix_in_the_message() {
        for good in ["ws://localhost:8080/ws/chat", "wss://chat.example.com", "WS://[::1]:80/"] {
            assert!(validate_url(good).is_ok(), "{good}");
        }
        let cases = [
            (
                "localhost:8080/ws/chat",
                "it has no scheme; use ws://localhost:8080/ws/chat (or wss:// for TLS)",
            ),
            ("http://h:1/ws/chat", "the chat speaks WebSocket: use ws://h:1/ws/chat"),
            ("https://h/ws/chat", "the chat speaks WebSocket: use wss://h/ws/chat"),
            ("ftp://h/", "unsupported scheme ftp://; use ws:// or wss://"),
            ("ws:///ws/chat", "it has no host"),
            ("ws://:8080/", "it has no host"),
        ];
        for (url, reason) in cases {
            let err = validate_url(url).unwrap_err();
            assert_eq!(err.to_string(), format!("invalid server URL {url:?}: {reason}"));
        }
        assert!(validate_url("ws://bad host/").is_err());
    }
}
