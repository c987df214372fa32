//! The server's configuration: every limit, size and interval, with defaults.
//!
//! The binary layers defaults, a TOML file, `HUBBUB_*` environment variables
//! and command-line flags into one [`Config`], then calls
//! [`Config::validate`] before it binds the port.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use hubbub_heartbeat::HeartbeatConfig;
use hubbub_protocol::Limits;
use hubbub_transfer::TransferLimits;

use crate::tls::TlsSettings;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Everything the server can be configured with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on. Default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// Serve HTTPS and `wss://` with this certificate and key. Default: none
    /// (plain HTTP and `ws://`).
    pub tls: Option<TlsSettings>,
    /// Proxies whose `X-Forwarded-For` header is believed, as addresses or
    /// CIDR blocks (`10.0.0.0/8`). Default: none, so the TCP peer address is
    /// the client's address.
    pub trusted_proxies: Vec<IpNet>,
    /// Whether `/ws/echo` is served. Default true.
    pub echo_enabled: bool,
    /// Browser origins, besides the server's own, that may open WebSockets
    /// (`https://app.example`), or `*` for any. Default: none.
    pub allowed_origins: Vec<String>,
    /// On shutdown, how long to wait for connections to finish their closing
    /// handshake before exiting anyway. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_drain: Duration,
    /// How long a connection's writer may spend sending its close frame (and
    /// what is queued before it, on shutdown). Default 2 s.
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    /// Limits on what clients may send in chat messages.
    pub protocol: Limits,
    /// WebSocket transport sizes and queues.
    pub websocket: WebSocketLimits,
    /// Protocol-level pings that find and reap dead connections.
    pub heartbeat: HeartbeatSettings,
    /// Acknowledged, de-duplicated delivery of chat messages.
    pub delivery: DeliverySettings,
    /// File uploads over the chat socket.
    pub uploads: UploadSettings,
    /// Room history: where it is kept and for how long.
    pub history: HistorySettings,
    /// Several servers acting as one through Redis.
    pub cluster: ClusterSettings,
    /// Caps on connections.
    pub limits: ConnectionLimits,
    /// HTTP connections before (or without) a WebSocket upgrade.
    pub http: HttpSettings,
    /// Per-connection message rates.
    pub rate_limit: RateLimitSettings,
    /// The Prometheus endpoint.
    pub metrics: MetricsSettings,
    /// Token authentication for chat connections.
    pub auth: AuthSettings,
}

/// JWT authentication. Off unless `secret` or `public_key` is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Shared secret for HS256 tokens (at least 32 bytes).
    pub secret: Option<String>,
    /// PEM public key file for RS256 or ES256 tokens.
    pub public_key: Option<PathBuf>,
    /// How long a connection without a token on its URL or headers has to
    /// send `auth {token}`. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// How long before a token's expiry the client gets `authExpiring`.
    /// Default 30 s.
    #[serde(with = "humantime_serde")]
    pub expiry_warning: Duration,
    /// Tokens must name this audience in `aud` (a string, or a list that
    /// holds it). Default: none, and `aud` is not checked.
    pub audience: Option<String>,
    /// Tokens must carry this `iss`. Default: none, and `iss` is not checked.
    pub issuer: Option<String>,
    /// How far ahead a token's `nbf` may be, in whole seconds, for an issuer
    /// whose clock runs fast. `exp` has no leeway. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            secret: None,
            public_key: None,
            auth_timeout: Duration::from_secs(10),
            expiry_warning: Duration::from_secs(30),
            audience: None,
            issuer: None,
            leeway: Duration::from_secs(5),
        }
    }
}

/// Where `/metrics` is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Whether `/metrics` is served at all. Default true.
    pub enabled: bool,
    /// Serve `/metrics` on this separate address (e.g. `127.0.0.1:9090`)
    /// instead of the main port. Default: the main port.
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self { enabled: true, listen: None }
    }
}

/// HTTP connections: every TCP (or TLS) connection is one until it upgrades
/// to a WebSocket, and counts against these caps meanwhile. Beyond a cap a
/// new connection is closed at once, before anything is read from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Longest a client may take to send a request's headers, counted from
    /// when the connection opens or its previous response was sent; so it
    /// is also how long an idle keep-alive connection stays open. Default
    /// 10 s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Connections not upgraded to WebSocket, from every address together
    /// (TLS handshakes included); 0 means no cap. Default 10,000.
    pub max_connections: usize,
    /// Connections not upgraded to WebSocket from one TCP peer address;
    /// trusted proxies are exempt; 0 means no cap. Default 64.
    pub max_connections_per_ip: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_connections_per_ip: 64,
        }
    }
}

/// Caps on open WebSocket connections. Beyond them an upgrade gets `503`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionLimits {
    /// Open connections on every endpoint together; 0 means no cap.
    /// Default 50,000.
    pub max_connections: usize,
    /// Open connections from one client address (see `trusted_proxies`);
    /// 0 means no cap. Default 1,000.
    pub max_connections_per_ip: usize,
}

impl ConnectionLimits {
    /// The caps as the admission counter takes them.
    pub(crate) fn caps(&self) -> crate::admission::Caps {
        crate::admission::Caps { total: self.max_connections, per_ip: self.max_connections_per_ip }
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self { max_connections: 50_000, max_connections_per_ip: 1_000 }
    }
}

/// Token buckets per connection. Over a limit the client gets
/// `error {code: "rateLimited", retryAfterMs}` and the message is dropped;
/// a client that goes on flooding is closed with 1008.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Whether limits apply. Default true; `--no-rate-limit` turns them off.
    pub enabled: bool,
    /// Sustained `chatMessage` + lobby `chat` per second. Default 30.
    pub chat_per_sec: f64,
    /// Chat messages allowed in a burst. Default 60.
    pub chat_burst: u32,
    /// Sustained `typing` per second. Default 5.
    pub typing_per_sec: f64,
    /// Typing notices in a burst. Default 10.
    pub typing_burst: u32,
    /// Sustained `joinRoom` + `leaveRoom` + `setUsername` per second. Default 5.
    pub room_per_sec: f64,
    /// Room changes in a burst. Default 20.
    pub room_burst: u32,
    /// Sustained `ping`, `auth`, file messages and undecodable frames per
    /// second. Default 10.
    pub control_per_sec: f64,
    /// Such messages in a burst. Default 40.
    pub control_burst: u32,
    /// Refused messages tolerated per `flood_window` before the connection
    /// is closed with 1008. Default 100.
    pub flood_strikes: u32,
    /// The window for `flood_strikes`. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub flood_window: Duration,
    /// Sustained new WebSocket connections per second from one client
    /// address (see `trusted_proxies`); beyond it an upgrade gets `429` with
    /// `Retry-After`. Default 10.
    pub address_connections_per_sec: f64,
    /// New connections from one address in a burst. Default 50.
    pub address_connections_burst: u32,
    /// Sustained `chatMessage` + lobby `chat` + echoed frames per second
    /// from all connections of one address together, and of one
    /// authenticated user together. Default 60.
    pub address_chat_per_sec: f64,
    /// Such messages from one address (or user) in a burst. Default 120.
    pub address_chat_burst: u32,
    /// Sustained lobby `chat` per second from one address (or user).
    /// Default 2.
    pub address_lobby_per_sec: f64,
    /// Lobby messages from one address (or user) in a burst. Default 10.
    pub address_lobby_burst: u32,
    /// Lobby bytes per second the whole server broadcasts (every lobby
    /// reader receives every one). Default 65,536.
    pub lobby_bytes_per_sec: u64,
    /// Lobby bytes in a burst, server-wide; at most half of
    /// `websocket.outbound_queue_bytes`, so a reader with nothing else
    /// queued is never dropped for a lobby burst. Default 131,072.
    pub lobby_burst_bytes: u64,
    /// Least time between two `userTyping` broadcasts for one member of a
    /// room, whatever the client sends (applies even with limits off).
    /// Default 2 s.
    #[serde(with = "humantime_serde")]
    pub typing_broadcast_interval: Duration,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            chat_per_sec: 30.0,
            chat_burst: 60,
            typing_per_sec: 5.0,
            typing_burst: 10,
            room_per_sec: 5.0,
            room_burst: 20,
            control_per_sec: 10.0,
            control_burst: 40,
            flood_strikes: 100,
            flood_window: Duration::from_secs(10),
            address_connections_per_sec: 10.0,
            address_connections_burst: 50,
            address_chat_per_sec: 60.0,
            address_chat_burst: 120,
            address_lobby_per_sec: 2.0,
            address_lobby_burst: 10,
            lobby_bytes_per_sec: 64 << 10,
            lobby_burst_bytes: 128 << 10,
            typing_broadcast_interval: Duration::from_secs(2),
        }
    }
}

/// File uploads: where they go and what they may cost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UploadSettings {
    /// Whether `fileStart` is accepted at all. Default true.
    pub enabled: bool,
    /// The upload directory. Default `./data/uploads`.
    pub dir: PathBuf,
    /// Largest file, in bytes. Default 104,857,600 (100 MiB).
    pub max_file_size: u64,
    /// Most bytes the upload directory may hold, finished and unfinished
    /// uploads together. Default 5 GiB.
    pub quota_bytes: u64,
    /// How long an interrupted upload is kept for `fileResume`. Default 10 min.
    #[serde(with = "humantime_serde")]
    pub resume_ttl: Duration,
    /// Most interrupted uploads kept at once, server-wide. Default 1,000.
    pub max_parked: usize,
    /// How long an interrupted upload that received no bytes at all is kept
    /// for `fileResume`; 0 drops it, and its reservation, at once. Default 0.
    #[serde(with = "humantime_serde")]
    pub empty_resume_ttl: Duration,
    /// Most bytes one owner's unfinished uploads (active and interrupted)
    /// may reserve together, so that nobody can reserve the whole quota.
    /// The owner is the authenticated user, or the client's address (an
    /// IPv6 client's /64) when authentication is off. At least
    /// `max_file_size`. Default 268,435,456 (256 MiB).
    pub max_reserved_bytes_per_owner: u64,
    /// Most unfinished uploads (active and interrupted) one owner may have.
    /// Default 4.
    pub max_uploads_per_owner: usize,
    /// Upload bytes per second per connection; 0 means unlimited. Default 0.
    pub rate_bytes_per_sec: u64,
    /// Chunk size when `fileStart` names none. Default 65,536.
    pub default_chunk_size: u32,
    /// Smallest chunk size a client may choose. Default 4,096.
    pub min_chunk_size: u32,
    /// Largest chunk size a client may choose; a chunk frame must fit
    /// `websocket.max_message_bytes`. Default 65,536.
    pub max_chunk_size: u32,
    /// Chunk bytes an upload gathers before writing them to disk in one
    /// job on the blocking pool; an upload holds about twice this in
    /// memory. Default 262,144 (256 KiB, four 64 KiB chunks).
    pub write_batch_bytes: usize,
}

impl Default for UploadSettings {
    fn default() -> Self {
        let limits = TransferLimits::default();
        Self {
            enabled: true,
            dir: PathBuf::from("./data/uploads"),
            max_file_size: limits.max_file_size,
            quota_bytes: 5 << 30,
            resume_ttl: Duration::from_secs(600),
            max_parked: 1000,
            empty_resume_ttl: Duration::ZERO,
            max_reserved_bytes_per_owner: 256 << 20,
            max_uploads_per_owner: 4,
            rate_bytes_per_sec: 0,
            default_chunk_size: limits.default_chunk_size,
            min_chunk_size: limits.min_chunk_size,
            max_chunk_size: limits.max_chunk_size,
            write_batch_bytes: 256 << 10,
        }
    }
}

impl UploadSettings {
    /// The transfer crate's view of these limits.
    pub fn transfer_limits(&self) -> TransferLimits {
        TransferLimits {
            max_file_size: self.max_file_size,
            default_chunk_size: self.default_chunk_size,
            min_chunk_size: self.min_chunk_size,
            max_chunk_size: self.max_chunk_size,
        }
    }
}

/// Where room history is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HistoryStore {
    /// In a file (redb), durable: what was acknowledged survives a crash.
    Disk,
    /// In memory: lost at every restart (each start is a new epoch).
    Memory,
    /// Not kept: messages carry no offset and nothing can be recovered.
    Off,
}

/// Room history: every `chatMessage` and `fileShared` gets the room's next
/// offset and is kept, so that clients recover what they missed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistorySettings {
    /// `disk` (default), `memory` or `off`.
    pub store: HistoryStore,
    /// The history file, with `store = "disk"`. Default: `history.redb` in
    /// the directory that holds `uploads.dir` (so `./data/history.redb`).
    pub path: Option<PathBuf>,
    /// Most messages kept per room; the oldest go first. Default 1,000.
    pub max_messages: u64,
    /// How long a message is kept. Default 30 days.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Most missed messages a rejoin with `since` is given; beyond, it gets
    /// `recovered: false` and fetches what it wants with `history`.
    /// Default 500.
    pub max_recover: usize,
    /// What a client is told to wait (`retryAfterMs`) when the store cannot
    /// write. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
}

impl Default for HistorySettings {
    fn default() -> Self {
        Self {
            store: HistoryStore::Disk,
            path: None,
            max_messages: 1_000,
            ttl: Duration::from_secs(30 * 86_400),
            max_recover: 500,
            retry_after: Duration::from_secs(1),
        }
    }
}

impl HistorySettings {
    /// Checks the section on its own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_messages == 0 {
            return Err(ConfigError::Zero("history.max_messages"));
        }
        if self.max_recover == 0 {
            return Err(ConfigError::Zero("history.max_recover"));
        }
        if self.ttl.is_zero() {
            return Err(ConfigError::Zero("history.ttl"));
        }
        if self.retry_after.is_zero() {
            return Err(ConfigError::Zero("history.retry_after"));
        }
        Ok(())
    }
}

impl Config {
    /// The history file in effect: `history.path`, or `history.redb` beside
    /// the upload directory.
    pub fn history_path(&self) -> PathBuf {
        self.history.path.clone().unwrap_or_else(|| {
            let parent = self.uploads.dir.parent().filter(|p| !p.as_os_str().is_empty());
            parent.unwrap_or_else(|| std::path::Path::new(".")).join("history.redb")
        })
    }
}

/// Cluster mode: with `redis_url` set, this server is one node of several
/// that share rooms, history, presence and the lobby through Redis.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// `redis://HOST:PORT[/DB]` (or `rediss://` for TLS); unset: a single
    /// server with its own history store.
    pub redis_url: Option<String>,
    /// A name for this node in logs and `/api/status`; a random suffix is
    /// added at every start. Default: the host's name.
    pub node_name: Option<String>,
    /// Put before every Redis key and channel, so several clusters can share
    /// one Redis. Default `hubbub:`.
    pub prefix: String,
    /// How long a node that stopped renewing its lease (killed, cut off)
    /// still counts: then its members are removed and the rooms hear
    /// `userLeft`. Default 15 s.
    #[serde(with = "humantime_serde")]
    pub node_timeout: Duration,
    /// How often a node compares each of its rooms with Redis (newest
    /// offset, epoch, members elsewhere) and renews its lease. Default 3 s.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            redis_url: None,
            node_name: None,
            prefix: "hubbub:".to_owned(),
            node_timeout: Duration::from_secs(15),
            check_interval: Duration::from_secs(3),
        }
    }
}

impl ClusterSettings {
    /// Checks the section on its own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return Err(ConfigError::Invalid {
                key: "cluster.redis_url",
                why: format!("{url:?} is not a redis:// or rediss:// URL"),
            });
        }
        if self.prefix.contains(['{', '}']) || self.prefix.contains(char::is_whitespace) {
            return Err(ConfigError::Invalid {
                key: "cluster.prefix",
                why: format!("{:?} must not contain braces or spaces", self.prefix),
            });
        }
        if let Some(name) = &self.node_name
            && (name.is_empty() || name.len() > 40 || !name.chars().all(|c| c.is_ascii_graphic()))
        {
            return Err(ConfigError::Invalid {
                key: "cluster.node_name",
                why: format!("{name:?} must be 1 to 40 printable ASCII characters without spaces"),
            });
        }
        zero_duration("cluster.node_timeout", self.node_timeout)?;
        zero_duration("cluster.check_interval", self.check_interval)?;
        if self.check_interval * 2 > self.node_timeout {
            return Err(ConfigError::Invalid {
                key: "cluster.check_interval",
                why: "must be at most half of cluster.node_timeout, so a live node renews its lease in time"
                    .to_owned(),
            });
        }
        Ok(())
    }
}

/// How long and how many message ids each room remembers, so that a message
/// resent after a reconnect (its `clientMsgId` already seen) is acknowledged
/// again but delivered only once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliverySettings {
    /// How long a message id is remembered. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub dedupe_window: Duration,
    /// Most ids remembered per room; the oldest are forgotten first.
    /// Default 10,000 (about 0.5 MB for a busy room).
    pub dedupe_capacity: usize,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self { dedupe_window: Duration::from_secs(300), dedupe_capacity: 10_000 }
    }
}

/// How often every connection is pinged, and how long it has to answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatSettings {
    /// Time between WebSocket Ping frames to each connection. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How long after a ping its Pong may take before the connection is
    /// declared dead and dropped without a closing handshake. Default 35 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for HeartbeatSettings {
    fn default() -> Self {
        let defaults = HeartbeatConfig::default();
        Self { interval: defaults.interval, timeout: defaults.timeout }
    }
}

impl From<HeartbeatSettings> for HeartbeatConfig {
    fn from(settings: HeartbeatSettings) -> Self {
        Self { interval: settings.interval, timeout: settings.timeout }
    }
}

/// Sizes of the WebSocket layer. Every per-connection buffer is bounded by
/// these: an idle connection holds none, a frame being received at most
/// `max_frame_bytes`, a fragmented message at most `max_message_bytes`, and
/// the outbound queue `outbound_queue` frames.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketLimits {
    /// Largest message a client may send, in bytes; a larger one closes the
    /// connection with 1009. Default 65,540: a 64 KiB file chunk plus its
    /// 4-byte index.
    pub max_message_bytes: usize,
    /// Largest single frame, in bytes. Default 65,540.
    pub max_frame_bytes: usize,
    /// Frames that may wait in one connection's outbound queue. A client
    /// that falls this far behind is disconnected (close 1008). Default
    /// 1,024 (a rejoin's replay of up to `history.max_recover` messages
    /// takes at most half).
    pub outbound_queue: usize,
    /// Bytes that may wait in one connection's outbound queue (frames
    /// queued and not yet written to the socket). A client that falls this
    /// far behind is disconnected (close 1008); one frame is always
    /// accepted into an empty queue, whatever its size. Default 262,144.
    pub outbound_queue_bytes: usize,
    /// Whether permessage-deflate (RFC 7692) is negotiated with clients
    /// that offer it, on every WebSocket endpoint. Default on. It costs no
    /// memory per connection (no context is kept between messages: the
    /// server answers with `server_no_context_takeover` and
    /// `client_no_context_takeover`); it costs CPU once per broadcast, not
    /// once per recipient, and once per compressed message a client sends.
    pub compression: bool,
    /// Messages shorter than this many bytes go uncompressed even to a
    /// client that negotiated compression: below it, deflate saves too few
    /// bytes for its CPU. Default 256.
    pub compression_min_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            tls: None,
            trusted_proxies: Vec::new(),
            echo_enabled: true,
            allowed_origins: Vec::new(),
            shutdown_drain: Duration::from_secs(5),
            close_timeout: Duration::from_secs(2),
            protocol: Limits::default(),
            websocket: WebSocketLimits::default(),
            heartbeat: HeartbeatSettings::default(),
            delivery: DeliverySettings::default(),
            uploads: UploadSettings::default(),
            history: HistorySettings::default(),
            cluster: ClusterSettings::default(),
            limits: ConnectionLimits::default(),
            http: HttpSettings::default(),
            rate_limit: RateLimitSettings::default(),
            metrics: MetricsSettings::default(),
            auth: AuthSettings::default(),
        }
    }
}

impl Default for WebSocketLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 65_540,
            max_frame_bytes: 65_540,
            outbound_queue: 1024,
            outbound_queue_bytes: 256 << 10,
            compression: true,
            compression_min_bytes: 256,
        }
    }
}

/// A configuration that cannot work, found before the port opens.
///
/// Every message names the keys it speaks of as they are written in the
/// config file (`websocket.outbound_queue`), and [`ConfigError::keys`] lists
/// them, so that the binary can say how the user set each one.
///
/// The variants that carry another crate's validation error (`Protocol`,
/// `Heartbeat`, `Uploads`) keep it typed, and restate it with full keys
/// (`uploads.min_chunk_size` where the transfer crate says
/// `min_chunk_size`). Because their message already says all the inner
/// error says, they do not also return it as `source()`: an error chain
/// printed with `{:#}` would say it twice.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A size, count or duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    Zero(
        /// The key, as in the config file.
        &'static str,
    ),
    /// A rate that must be a finite number above zero is not.
    #[error("{key} must be a positive number, not {value}")]
    NotPositive {
        /// The key, as in the config file.
        key: &'static str,
        /// The configured value.
        value: f64,
    },
    /// A value below the least that can work.
    #[error("{key} must be at least {min} {unit} (it is {value})")]
    TooSmall {
        /// The key, as in the config file.
        key: &'static str,
        /// The configured value (for a string, its length).
        value: u64,
        /// The least allowed.
        min: u64,
        /// What `value` and `min` count: `frames`, `bytes`.
        unit: &'static str,
    },
    /// A string that must say something is empty.
    #[error("{key} must not be empty")]
    Empty {
        /// The key, as in the config file.
        key: &'static str,
    },
    /// Two keys whose values contradict each other: `{key} ({value}) {why}
    /// {other} ({other_value})`.
    #[error("{key} ({value}) {why} {other} ({other_value})")]
    Conflict {
        /// The key that should change, as in the config file.
        key: &'static str,
        /// Its value.
        value: u64,
        /// The key it contradicts.
        other: &'static str,
        /// That key's value.
        other_value: u64,
        /// The rule, as the words between the two: `must not exceed`.
        why: &'static str,
    },
    /// Two keys that may not both be set.
    #[error("set {key} or {other}, not both")]
    Exclusive {
        /// One key, as in the config file.
        key: &'static str,
        /// The other.
        other: &'static str,
    },
    /// An upload rate so low that reading one chunk at that rate would
    /// starve the heartbeat: a connection over its rate stops reading for
    /// one chunk's worth of time, and its pongs wait unread meanwhile.
    #[error(
        "uploads.rate_bytes_per_sec ({rate}) is too low for uploads.max_chunk_size ({chunk}): one chunk \
         would pause reading for {pause:.1} s, more than a quarter of heartbeat.timeout ({timeout:?})",
        pause = upload_pause_secs(.chunk, .rate)
    )]
    UploadStall {
        /// `uploads.rate_bytes_per_sec`.
        rate: u64,
        /// `uploads.max_chunk_size`.
        chunk: u32,
        /// `heartbeat.timeout`.
        timeout: Duration,
    },
    /// The `[protocol]` section, as `hubbub-protocol` judged it.
    #[error("protocol.{}", .0)]
    Protocol(hubbub_protocol::LimitsError),
    /// The `[heartbeat]` section, as `hubbub-heartbeat` judged it.
    #[error("heartbeat.{} must be greater than zero", heartbeat_key(.0))]
    Heartbeat(hubbub_heartbeat::ConfigError),
    /// The chunk sizes and file size of `[uploads]`, as `hubbub-transfer`
    /// judged them.
    #[error("{}", transfer_message(.0))]
    Uploads(hubbub_transfer::LimitsError),
    /// The TLS certificate or key cannot be used.
    #[error("cannot use the TLS certificate and key")]
    Tls(#[from] crate::tls::TlsError),
    /// The history store cannot be opened.
    #[error("{0}")]
    History(String),
    /// A value of the wrong form: `{key} {why}`.
    #[error("{key} {why}")]
    Invalid {
        /// The key, as in the config file.
        key: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// The cluster's Redis cannot be used.
    #[error("cannot use the cluster's redis: {0}")]
    Cluster(String),
    /// The upload directory cannot be used.
    #[error("cannot use upload directory {path}: {cause}")]
    UploadDir {
        /// The configured directory.
        path: PathBuf,
        /// What went wrong.
        cause: String,
    },
    /// The `auth.public_key` file cannot be read.
    #[error("cannot read auth.public_key {}", path.display())]
    AuthKeyUnreadable {
        /// The configured file.
        path: PathBuf,
        /// Why.
        #[source]
        cause: std::io::Error,
    },
    /// The `auth.public_key` file holds no RSA or EC public key in PEM.
    #[error("auth.public_key {} is no RSA or EC public key", path.display())]
    AuthKeyInvalid {
        /// The configured file.
        path: PathBuf,
        /// What the EC parser said (the RSA parser was tried first).
        #[source]
        cause: jsonwebtoken::errors::Error,
    },
}

impl ConfigError {
    /// The config keys this error concerns, as in the config file, the one
    /// to change first.
    ///
    /// ```
    /// use hubbub_server::Config;
    ///
    /// let mut config = Config::default();
    /// config.websocket.max_frame_bytes = config.websocket.max_message_bytes + 1;
    /// let err = config.validate().unwrap_err();
    /// assert_eq!(err.keys(), ["websocket.max_frame_bytes", "websocket.max_message_bytes"]);
    /// ```
    pub fn keys(&self) -> Vec<String> {
        use hubbub_transfer::LimitsError as Transfer;
        let keys: &[&str] = match self {
            Self::Zero(key)
            | Self::NotPositive { key, .. }
            | Self::TooSmall { key, .. }
            | Self::Empty { key }
            | Self::Invalid { key, .. } => &[key],
            Self::Conflict { key, other, .. } | Self::Exclusive { key, other } => &[key, other],
            Self::UploadStall { .. } => {
                &["uploads.rate_bytes_per_sec", "uploads.max_chunk_size", "heartbeat.timeout"]
            }
            Self::Protocol(hubbub_protocol::LimitsError::Zero { field }) => {
                return vec![format!("protocol.{field}")];
            }
            Self::Heartbeat(err) => return vec![format!("heartbeat.{}", heartbeat_key(err))],
            Self::Uploads(Transfer::ZeroMinChunkSize) => &["uploads.min_chunk_size"],
            Self::Uploads(Transfer::MinAboveMax { .. }) => {
                &["uploads.min_chunk_size", "uploads.max_chunk_size"]
            }
            Self::Uploads(Transfer::DefaultOutOfRange { .. }) => {
                &["uploads.default_chunk_size", "uploads.min_chunk_size", "uploads.max_chunk_size"]
            }
            Self::Uploads(Transfer::TooManyChunks { .. }) => {
                &["uploads.max_file_size", "uploads.min_chunk_size"]
            }
            Self::Tls(_) => &["tls.cert", "tls.key"],
            Self::UploadDir { .. } => &["uploads.dir"],
            Self::History(_) => &["history.path"],
            Self::Cluster(_) => &["cluster.redis_url"],
            Self::AuthKeyUnreadable { .. } | Self::AuthKeyInvalid { .. } => &["auth.public_key"],
        };
        keys.iter().map(|key| (*key).to_owned()).collect()
    }
}

/// The `[heartbeat]` key a heartbeat config error is about.
fn heartbeat_key(err: &hubbub_heartbeat::ConfigError) -> &'static str {
    match err {
        hubbub_heartbeat::ConfigError::ZeroInterval => "interval",
        hubbub_heartbeat::ConfigError::ZeroTimeout => "timeout",
    }
}

/// A transfer limits error in the config file's words: the transfer crate
/// names its fields, the config file has them under `uploads.`.
fn transfer_message(err: &hubbub_transfer::LimitsError) -> String {
    use hubbub_transfer::LimitsError as Transfer;
    match err {
        Transfer::ZeroMinChunkSize => "uploads.min_chunk_size must be at least 1 byte".to_owned(),
        Transfer::MinAboveMax { min, max } => {
            format!("uploads.min_chunk_size ({min}) must not be larger than uploads.max_chunk_size ({max})")
        }
        Transfer::DefaultOutOfRange { default, min, max } => format!(
            "uploads.default_chunk_size ({default}) must be between uploads.min_chunk_size ({min}) and \
             uploads.max_chunk_size ({max})"
        ),
        Transfer::TooManyChunks { max_file_size, min_chunk_size } => format!(
            "uploads.max_file_size ({max_file_size}) needs more than 4,294,967,295 chunks of \
             uploads.min_chunk_size ({min_chunk_size}) bytes"
        ),
    }
}

impl Config {
    /// The names of the config file's sections, for mapping flat
    /// `HUBBUB_SECTION_KEY` environment variables onto nested keys.
    pub const SECTIONS: &'static [&'static str] = &[
        "protocol",
        "websocket",
        "heartbeat",
        "delivery",
        "uploads",
        "history",
        "cluster",
        "limits",
        "http",
        "rate_limit",
        "metrics",
        "tls",
        "auth",
    ];

    /// Checks that the configuration can work: each section by itself,
    /// then the rules that span sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [("shutdown_drain", self.shutdown_drain), ("close_timeout", self.close_timeout)] {
            zero_duration(key, value)?;
        }
        self.protocol.validate().map_err(ConfigError::Protocol)?;
        self.websocket.validate()?;
        self.heartbeat.validate()?;
        self.delivery.validate()?;
        self.uploads.validate()?;
        self.history.validate()?;
        self.cluster.validate()?;
        self.limits.validate()?;
        self.http.validate()?;
        self.rate_limit.validate()?;
        self.metrics.validate()?;
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        self.auth.validate()?;

        let ws = &self.websocket;
        let uploads = &self.uploads;
        // A chunk frame is a message; one that cannot arrive cannot be sent.
        let chunk_frame = uploads.transfer_limits().max_frame_len();
        if chunk_frame > ws.max_message_bytes {
            return Err(ConfigError::Conflict {
                key: "uploads.max_chunk_size",
                value: uploads.max_chunk_size.into(),
                why: "plus its 4-byte index must fit",
                other: "websocket.max_message_bytes",
                other_value: ws.max_message_bytes as u64,
            });
        }
        // A connection over its upload rate stops reading for one chunk's
        // worth of time; its heartbeat pongs wait unread meanwhile, so that
        // pause must stay well inside the heartbeat timeout.
        if uploads.rate_bytes_per_sec > 0 {
            let pause = upload_pause_secs(&uploads.max_chunk_size, &uploads.rate_bytes_per_sec);
            if pause > self.heartbeat.timeout.as_secs_f64() / 4.0 {
                return Err(ConfigError::UploadStall {
                    rate: uploads.rate_bytes_per_sec,
                    chunk: uploads.max_chunk_size,
                    timeout: self.heartbeat.timeout,
                });
            }
        }
        // A lobby burst must fit a reader's queue with room to spare, or the
        // limit meant to protect readers would itself drop them.
        let half_queue = (ws.outbound_queue_bytes / 2) as u64;
        if self.rate_limit.lobby_burst_bytes > half_queue {
            return Err(ConfigError::Conflict {
                key: "rate_limit.lobby_burst_bytes",
                value: self.rate_limit.lobby_burst_bytes,
                why: "must be at most half of",
                other: "websocket.outbound_queue_bytes",
                other_value: ws.outbound_queue_bytes as u64,
            });
        }
        Ok(())
    }

    /// Whether `X-Forwarded-For` from this peer is believed.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

/// Smallest useful outbound queue: a greeting plus a room join.
const MIN_OUTBOUND_QUEUE: usize = 8;

/// Shortest HS256 secret: RFC 7518 section 3.2 asks for a key at least as
/// long as the hash, 256 bits.
const MIN_SECRET_BYTES: usize = 32;

// Each section's own rules. `Config::validate` calls them all, then checks
// the rules that span sections; a section's rules can be read, and tested,
// without the rest of the configuration.

/// `Err(Zero)` when `value` is zero.
fn zero(key: &'static str, value: u64) -> Result<(), ConfigError> {
    if value == 0 { Err(ConfigError::Zero(key)) } else { Ok(()) }
}

/// `Err(Zero)` when `value` is zero.
fn zero_duration(key: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() { Err(ConfigError::Zero(key)) } else { Ok(()) }
}

/// Seconds a connection stops reading after a chunk of `chunk` bytes when
/// held to `rate` bytes per second.
fn upload_pause_secs(chunk: &u32, rate: &u64) -> f64 {
    f64::from(*chunk) / *rate as f64
}

impl WebSocketLimits {
    /// Every size positive, a frame no larger than a message, and an
    /// outbound queue that holds at least a greeting and a room join.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("websocket.max_message_bytes", self.max_message_bytes),
            ("websocket.max_frame_bytes", self.max_frame_bytes),
            ("websocket.outbound_queue", self.outbound_queue),
            ("websocket.outbound_queue_bytes", self.outbound_queue_bytes),
        ] {
            zero(key, value as u64)?;
        }
        // A chat connection's greeting alone queues two frames, and joining a
        // room two more; anything smaller would drop every client at once.
        if self.outbound_queue < MIN_OUTBOUND_QUEUE {
            return Err(ConfigError::TooSmall {
                key: "websocket.outbound_queue",
                value: self.outbound_queue as u64,
                min: MIN_OUTBOUND_QUEUE as u64,
                unit: "frames",
            });
        }
        if self.max_frame_bytes > self.max_message_bytes {
            return Err(ConfigError::Conflict {
                key: "websocket.max_frame_bytes",
                value: self.max_frame_bytes as u64,
                why: "must not exceed",
                other: "websocket.max_message_bytes",
                other_value: self.max_message_bytes as u64,
            });
        }
        Ok(())
    }
}

impl HeartbeatSettings {
    /// The heartbeat crate's own rules: both durations positive.
    pub fn validate(&self) -> Result<(), ConfigError> {
        HeartbeatConfig::from(*self).validate().map_err(ConfigError::Heartbeat)
    }
}

impl DeliverySettings {
    /// Room for at least one remembered id.
    pub fn validate(&self) -> Result<(), ConfigError> {
        zero("delivery.dedupe_capacity", self.dedupe_capacity as u64)
    }
}

impl UploadSettings {
    /// The transfer crate's rules for the chunk and file sizes, room for at
    /// least one parked upload and one upload per owner, and an owner's
    /// reservation large enough for the largest file.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.transfer_limits().validate().map_err(ConfigError::Uploads)?;
        zero("uploads.max_parked", self.max_parked as u64)?;
        zero("uploads.write_batch_bytes", self.write_batch_bytes as u64)?;
        zero("uploads.max_uploads_per_owner", self.max_uploads_per_owner as u64)?;
        // Otherwise a file of the largest allowed size could never be sent.
        if self.max_reserved_bytes_per_owner < self.max_file_size {
            return Err(ConfigError::Conflict {
                key: "uploads.max_reserved_bytes_per_owner",
                value: self.max_reserved_bytes_per_owner,
                why: "must be at least",
                other: "uploads.max_file_size",
                other_value: self.max_file_size,
            });
        }
        Ok(())
    }
}

impl ConnectionLimits {
    /// Nothing to refuse: every cap, 0 included (no cap), can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

impl HttpSettings {
    /// A positive header timeout; the caps may be 0 (no cap).
    pub fn validate(&self) -> Result<(), ConfigError> {
        zero_duration("http.header_read_timeout", self.header_read_timeout)
    }
}

impl RateLimitSettings {
    /// Every rate a positive number, every burst and window positive. They
    /// are checked even when `enabled` is false, so that turning limits on
    /// cannot make a configuration invalid.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("rate_limit.chat_per_sec", self.chat_per_sec),
            ("rate_limit.typing_per_sec", self.typing_per_sec),
            ("rate_limit.room_per_sec", self.room_per_sec),
            ("rate_limit.control_per_sec", self.control_per_sec),
            ("rate_limit.address_connections_per_sec", self.address_connections_per_sec),
            ("rate_limit.address_chat_per_sec", self.address_chat_per_sec),
            ("rate_limit.address_lobby_per_sec", self.address_lobby_per_sec),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(ConfigError::NotPositive { key, value });
            }
        }
        for (key, value) in [
            ("rate_limit.chat_burst", self.chat_burst),
            ("rate_limit.typing_burst", self.typing_burst),
            ("rate_limit.room_burst", self.room_burst),
            ("rate_limit.control_burst", self.control_burst),
            ("rate_limit.flood_strikes", self.flood_strikes),
            ("rate_limit.address_connections_burst", self.address_connections_burst),
            ("rate_limit.address_chat_burst", self.address_chat_burst),
            ("rate_limit.address_lobby_burst", self.address_lobby_burst),
        ] {
            zero(key, value.into())?;
        }
        zero("rate_limit.lobby_bytes_per_sec", self.lobby_bytes_per_sec)?;
        zero("rate_limit.lobby_burst_bytes", self.lobby_burst_bytes)?;
        zero_duration("rate_limit.flood_window", self.flood_window)
    }
}

impl MetricsSettings {
    /// Nothing to refuse here: whether `listen` can be bound is found when
    /// the server binds it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

impl AuthSettings {
    /// Positive timeouts; at most one key, a secret long enough for HS256,
    /// and no empty audience or issuer. Whether `public_key` holds a usable
    /// key is found when the server loads it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        zero_duration("auth.auth_timeout", self.auth_timeout)?;
        zero_duration("auth.expiry_warning", self.expiry_warning)?;
        if self.secret.is_some() && self.public_key.is_some() {
            return Err(ConfigError::Exclusive { key: "auth.secret", other: "auth.public_key" });
        }
        if let Some(secret) = &self.secret
            && secret.len() < MIN_SECRET_BYTES
        {
            // Its length only: the secret itself is not for logs.
            return Err(ConfigError::TooSmall {
                key: "auth.secret",
                value: secret.len() as u64,
                min: MIN_SECRET_BYTES as u64,
                unit: "bytes",
            });
        }
        for (key, value) in [("auth.audience", &self.audience), ("auth.issuer", &self.issuer)] {
            if value.as_deref() == Some("") {
                return Err(ConfigError::Empty { key });
            }
        }
        Ok(())
    }
}

impl TlsSettings {
    /// A positive handshake timeout and room for at least one handshake.
    /// Whether the files hold a usable certificate and key is found when the
    /// server loads them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        zero_duration("tls.handshake_timeout", self.handshake_timeout)?;
        zero("tls.max_pending_handshakes", self.max_pending_handshakes as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml_shape() {
        let config = Config::default();
        config.validate().unwrap();
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["shutdown_drain"], "5s");
        let back: Config = serde_json::from_value(json).unwrap();
        assert_eq!(back, config);
    }

    /// The message of `config`'s first error, and the keys it names.
    fn refusal(config: &Config) -> (String, Vec<String>) {
        let err = config.validate().expect_err("the configuration should be refused");
        (err.to_string(), err.keys())
    }

    #[test]
    fn top_level_durations_must_be_positive() {
        for key in ["shutdown_drain", "close_timeout"] {
            let mut config = Config::default();
            match key {
                "shutdown_drain" => config.shutdown_drain = Duration::ZERO,
                _ => config.close_timeout = Duration::ZERO,
            }
            assert_eq!(refusal(&config), (format!("{key} must be greater than zero"), vec![key.to_owned()]));
        }
    }

    #[test]
    fn protocol_section_reuses_the_protocol_crates_rules() {
        let protocol = Limits { max_room_chars: 0, ..Limits::default() };
        let config = Config { protocol, ..Config::default() };
        let err = config.validate().unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Protocol(hubbub_protocol::LimitsError::Zero { field: "max_room_chars" })
        ));
        assert_eq!(err.to_string(), "protocol.max_room_chars must be greater than zero");
        assert_eq!(err.keys(), ["protocol.max_room_chars"]);
    }

    #[test]
    fn websocket_section() {
        let ok = WebSocketLimits::default();
        ok.validate().unwrap();
        for key in ["max_message_bytes", "max_frame_bytes", "outbound_queue", "outbound_queue_bytes"] {
            let mut ws = ok.clone();
            match key {
                "max_message_bytes" => ws.max_message_bytes = 0,
                "max_frame_bytes" => ws.max_frame_bytes = 0,
                "outbound_queue" => ws.outbound_queue = 0,
                _ => ws.outbound_queue_bytes = 0,
            }
            let err = ws.validate().unwrap_err();
            assert_eq!(err.to_string(), format!("websocket.{key} must be greater than zero"));
        }
        let small = WebSocketLimits { outbound_queue: MIN_OUTBOUND_QUEUE - 1, ..ok.clone() };
        let err = small.validate().unwrap_err();
        assert!(matches!(
            err,
            ConfigError::TooSmall { key: "websocket.outbound_queue", value: 7, min: 8, .. }
        ));
        assert_eq!(err.to_string(), "websocket.outbound_queue must be at least 8 frames (it is 7)");
        WebSocketLimits { outbound_queue: MIN_OUTBOUND_QUEUE, ..ok.clone() }.validate().unwrap();
        let frame = WebSocketLimits { max_frame_bytes: ok.max_message_bytes + 1, ..ok.clone() };
        let err = frame.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "websocket.max_frame_bytes (65541) must not exceed websocket.max_message_bytes (65540)"
        );
        assert_eq!(err.keys(), ["websocket.max_frame_bytes", "websocket.max_message_bytes"]);
    }

    #[test]
    fn heartbeat_section_reuses_the_heartbeat_crates_rules() {
        HeartbeatSettings::default().validate().unwrap();
        for (key, settings) in [
            ("interval", HeartbeatSettings { interval: Duration::ZERO, ..HeartbeatSettings::default() }),
            ("timeout", HeartbeatSettings { timeout: Duration::ZERO, ..HeartbeatSettings::default() }),
        ] {
            let err = settings.validate().unwrap_err();
            assert!(matches!(err, ConfigError::Heartbeat(_)), "{err:?}");
            assert_eq!(err.to_string(), format!("heartbeat.{key} must be greater than zero"));
            assert_eq!(err.keys(), [format!("heartbeat.{key}")]);
        }
    }

    #[test]
    fn delivery_section() {
        DeliverySettings::default().validate().unwrap();
        let none = DeliverySettings { dedupe_capacity: 0, ..DeliverySettings::default() };
        assert_eq!(
            none.validate().unwrap_err().to_string(),
            "delivery.dedupe_capacity must be greater than zero"
        );
    }

    #[test]
    fn uploads_section_reuses_the_transfer_crates_rules() {
        let ok = UploadSettings::default();
        ok.validate().unwrap();
        let inverted = UploadSettings {
            min_chunk_size: 8192,
            max_chunk_size: 4096,
            default_chunk_size: 4096,
            ..ok.clone()
        };
        let err = inverted.validate().unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Uploads(hubbub_transfer::LimitsError::MinAboveMax { min: 8192, max: 4096 })
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "uploads.min_chunk_size (8192) must not be larger than uploads.max_chunk_size (4096)"
        );
        assert_eq!(err.keys(), ["uploads.min_chunk_size", "uploads.max_chunk_size"]);
        let zero = UploadSettings { min_chunk_size: 0, ..ok.clone() };
        assert_eq!(
            zero.validate().unwrap_err().to_string(),
            "uploads.min_chunk_size must be at least 1 byte"
        );
        let odd = UploadSettings { default_chunk_size: 1, ..ok.clone() };
        assert_eq!(odd.validate().unwrap_err().keys()[0], "uploads.default_chunk_size");
        let huge =
            UploadSettings { max_file_size: u64::MAX, max_reserved_bytes_per_owner: u64::MAX, ..ok.clone() };
        assert!(huge.validate().unwrap_err().to_string().starts_with("uploads.max_file_size ("));

        for key in ["max_parked", "max_uploads_per_owner"] {
            let mut uploads = ok.clone();
            match key {
                "max_parked" => uploads.max_parked = 0,
                _ => uploads.max_uploads_per_owner = 0,
            }
            assert_eq!(
                uploads.validate().unwrap_err().to_string(),
                format!("uploads.{key} must be greater than zero")
            );
        }
        let stingy = UploadSettings { max_reserved_bytes_per_owner: ok.max_file_size - 1, ..ok.clone() };
        let err = stingy.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "uploads.max_reserved_bytes_per_owner (104857599) must be at least uploads.max_file_size (104857600)"
        );
        assert_eq!(err.keys(), ["uploads.max_reserved_bytes_per_owner", "uploads.max_file_size"]);
    }

    #[test]
    fn connection_and_metrics_sections_accept_any_value() {
        ConnectionLimits { max_connections: 0, max_connections_per_ip: 0 }.validate().unwrap();
        MetricsSettings { enabled: false, listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))) }
            .validate()
            .unwrap();
    }

    #[test]
    fn http_section() {
        HttpSettings { max_connections: 0, max_connections_per_ip: 0, ..HttpSettings::default() }
            .validate()
            .unwrap();
        let instant = HttpSettings { header_read_timeout: Duration::ZERO, ..HttpSettings::default() };
        assert_eq!(instant.validate().unwrap_err().keys(), ["http.header_read_timeout"]);
    }

    #[test]
    fn rate_limit_section() {
        let ok = RateLimitSettings::default();
        ok.validate().unwrap();
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let rates = RateLimitSettings { address_lobby_per_sec: bad, ..ok };
            let err = rates.validate().unwrap_err();
            assert!(matches!(err, ConfigError::NotPositive { key: "rate_limit.address_lobby_per_sec", .. }));
            assert_eq!(
                err.to_string(),
                format!("rate_limit.address_lobby_per_sec must be a positive number, not {bad}")
            );
        }
        // Checked with limits off too, so that turning them on cannot fail.
        let off = RateLimitSettings { enabled: false, chat_per_sec: 0.0, ..ok };
        assert_eq!(off.validate().unwrap_err().keys(), ["rate_limit.chat_per_sec"]);
        for (key, settings) in [
            ("chat_burst", RateLimitSettings { chat_burst: 0, ..ok }),
            ("flood_strikes", RateLimitSettings { flood_strikes: 0, ..ok }),
            ("address_chat_burst", RateLimitSettings { address_chat_burst: 0, ..ok }),
            ("lobby_bytes_per_sec", RateLimitSettings { lobby_bytes_per_sec: 0, ..ok }),
            ("lobby_burst_bytes", RateLimitSettings { lobby_burst_bytes: 0, ..ok }),
            ("flood_window", RateLimitSettings { flood_window: Duration::ZERO, ..ok }),
        ] {
            assert_eq!(
                settings.validate().unwrap_err().to_string(),
                format!("rate_limit.{key} must be greater than zero")
            );
        }
    }

    #[test]
    fn auth_section() {
        let ok = AuthSettings::default();
        ok.validate().unwrap();
        let secret = "s".repeat(MIN_SECRET_BYTES);
        AuthSettings { secret: Some(secret.clone()), ..ok.clone() }.validate().unwrap();
        let short = AuthSettings { secret: Some(secret[1..].to_owned()), ..ok.clone() };
        let err = short.validate().unwrap_err();
        assert_eq!(err.to_string(), "auth.secret must be at least 32 bytes (it is 31)");
        assert!(!err.to_string().contains(&secret[1..]), "the secret is not for logs");
        let both = AuthSettings { secret: Some(secret), public_key: Some("key.pem".into()), ..ok.clone() };
        let err = both.validate().unwrap_err();
        assert_eq!(err.to_string(), "set auth.secret or auth.public_key, not both");
        assert_eq!(err.keys(), ["auth.secret", "auth.public_key"]);
        for key in ["audience", "issuer"] {
            let mut empty = ok.clone();
            match key {
                "audience" => empty.audience = Some(String::new()),
                _ => empty.issuer = Some(String::new()),
            }
            assert_eq!(empty.validate().unwrap_err().to_string(), format!("auth.{key} must not be empty"));
        }
        for (key, settings) in [
            ("auth_timeout", AuthSettings { auth_timeout: Duration::ZERO, ..ok.clone() }),
            ("expiry_warning", AuthSettings { expiry_warning: Duration::ZERO, ..ok.clone() }),
        ] {
            assert_eq!(settings.validate().unwrap_err().keys(), [format!("auth.{key}")]);
        }
    }

    #[test]
    fn tls_section() {
        let ok = TlsSettings {
            cert: "c".into(),
            key: "k".into(),
            handshake_timeout: Duration::from_secs(1),
            max_pending_handshakes: 1,
        };
        ok.validate().unwrap();
        let instant = TlsSettings { handshake_timeout: Duration::ZERO, ..ok.clone() };
        assert_eq!(
            instant.validate().unwrap_err().to_string(),
            "tls.handshake_timeout must be greater than zero"
        );
        let none = TlsSettings { max_pending_handshakes: 0, ..ok.clone() };
        let config = Config { tls: Some(none), ..Config::default() };
        assert_eq!(refusal(&config).1, ["tls.max_pending_handshakes"]);
    }

    #[test]
    fn a_chunk_frame_must_fit_a_message() {
        let mut config = Config::default();
        config.websocket.max_message_bytes = 65_539;
        config.websocket.max_frame_bytes = 65_539;
        let (message, keys) = refusal(&config);
        assert_eq!(
            message,
            "uploads.max_chunk_size (65536) plus its 4-byte index must fit websocket.max_message_bytes (65539)"
        );
        assert_eq!(keys, ["uploads.max_chunk_size", "websocket.max_message_bytes"]);
        config.uploads.max_chunk_size = 65_535;
        config.uploads.default_chunk_size = 65_535;
        config.validate().unwrap();
    }

    #[test]
    fn an_upload_rate_must_not_starve_the_heartbeat() {
        let mut config = Config::default();
        // A 64 KiB chunk at 4 KiB/s pauses reading for 16 s; the timeout is 35 s.
        config.uploads.rate_bytes_per_sec = 4096;
        let (message, keys) = refusal(&config);
        assert_eq!(
            message,
            "uploads.rate_bytes_per_sec (4096) is too low for uploads.max_chunk_size (65536): one chunk would \
             pause reading for 16.0 s, more than a quarter of heartbeat.timeout (35s)"
        );
        assert_eq!(keys, ["uploads.rate_bytes_per_sec", "uploads.max_chunk_size", "heartbeat.timeout"]);
        config.heartbeat.timeout = Duration::from_secs(64);
        config.validate().unwrap();
    }

    #[test]
    fn a_lobby_burst_must_fit_half_a_queue() {
        let mut config = Config::default();
        config.rate_limit.lobby_burst_bytes = config.websocket.outbound_queue_bytes as u64 / 2 + 1;
        let (message, keys) = refusal(&config);
        assert_eq!(
            message,
            "rate_limit.lobby_burst_bytes (131073) must be at most half of websocket.outbound_queue_bytes (262144)"
        );
        assert_eq!(keys, ["rate_limit.lobby_burst_bytes", "websocket.outbound_queue_bytes"]);
        config.websocket.outbound_queue_bytes += 2;
        config.validate().unwrap();
    }

    #[test]
    fn every_section_is_listed_for_environment_variables() {
        let json = serde_json::to_value(Config {
            tls: Some(TlsSettings {
                cert: "c".into(),
                key: "k".into(),
                handshake_timeout: Duration::from_secs(1),
                max_pending_handshakes: 1,
            }),
            ..Config::default()
        })
        .unwrap();
        let sections: Vec<&str> = json
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, v)| v.is_object())
            .map(|(k, _)| k.as_str())
            .collect();
        let mut listed = Config::SECTIONS.to_vec();
        listed.sort_unstable();
        let mut found = sections.clone();
        found.sort_unstable();
        assert_eq!(listed, found);
    }

    #[test]
    fn trusted_proxies_match_cidrs() {
        let config = Config { trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()], ..Config::default() };
        assert!(config.is_trusted_proxy("10.1.2.3".parse().unwrap()));
        assert!(!config.is_trusted_proxy("192.168.1.1".parse().unwrap()));
    }
}
