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
    /// that falls this far behind is disconnected (close 1008). Default 512.
    pub outbound_queue: usize,
    /// Bytes that may wait in one connection's outbound queue (frames
    /// queued and not yet written to the socket). A client that falls this
    /// far behind is disconnected (close 1008); one frame is always
    /// accepted into an empty queue, whatever its size. Default 262,144.
    pub outbound_queue_bytes: usize,
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
            outbound_queue: 512,
            outbound_queue_bytes: 256 << 10,
        }
    }
}

/// A configuration that cannot work, found before the port opens.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A size, count or duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// Two values contradict each other.
    #[error("{0}")]
    Inconsistent(String),
    /// The TLS certificate or key cannot be used.
    #[error("cannot use the TLS certificate and key")]
    Tls(#[from] crate::tls::TlsError),
    /// The upload directory cannot be used.
    #[error("cannot use upload directory {path}: {cause}")]
    UploadDir {
        /// The configured directory.
        path: PathBuf,
        /// What went wrong.
        cause: String,
    },
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
        "limits",
        "http",
        "rate_limit",
        "metrics",
        "tls",
        "auth",
    ];

    /// Checks that the configuration can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ws = &self.websocket;
        let positive = [
            ("protocol.max_username_chars", self.protocol.max_username_chars),
            ("protocol.max_room_chars", self.protocol.max_room_chars),
            ("protocol.max_text_chars", self.protocol.max_text_chars),
            ("websocket.max_message_bytes", ws.max_message_bytes),
            ("websocket.max_frame_bytes", ws.max_frame_bytes),
            ("websocket.outbound_queue", ws.outbound_queue),
            ("websocket.outbound_queue_bytes", ws.outbound_queue_bytes),
            ("delivery.dedupe_capacity", self.delivery.dedupe_capacity),
            ("uploads.max_parked", self.uploads.max_parked),
            ("uploads.max_uploads_per_owner", self.uploads.max_uploads_per_owner),
            ("protocol.max_file_name_chars", self.protocol.max_file_name_chars),
            ("protocol.max_transfer_id_chars", self.protocol.max_transfer_id_chars),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        // A chat connection's greeting alone queues two frames, and joining a
        // room two more; anything smaller would drop every client at once.
        if ws.outbound_queue < MIN_OUTBOUND_QUEUE {
            return Err(ConfigError::Inconsistent(format!(
                "websocket.outbound_queue must be at least {MIN_OUTBOUND_QUEUE}"
            )));
        }
        for (name, value) in [
            ("auth.auth_timeout", self.auth.auth_timeout),
            ("auth.expiry_warning", self.auth.expiry_warning),
            ("shutdown_drain", self.shutdown_drain),
            ("http.header_read_timeout", self.http.header_read_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Zero(name));
            }
        }
        // A connection over its upload rate stops reading for one chunk's
        // worth of time; its heartbeat pongs wait unread meanwhile, so that
        // pause must stay well inside the heartbeat timeout.
        if self.uploads.rate_bytes_per_sec > 0 {
            let pause = self.uploads.max_chunk_size as f64 / self.uploads.rate_bytes_per_sec as f64;
            if pause > self.heartbeat.timeout.as_secs_f64() / 4.0 {
                return Err(ConfigError::Inconsistent(format!(
                    "uploads.rate_bytes_per_sec ({}) is too low for uploads.max_chunk_size ({}): one chunk \
                     would pause reading for {pause:.1} s, more than a quarter of heartbeat.timeout",
                    self.uploads.rate_bytes_per_sec, self.uploads.max_chunk_size
                )));
            }
        }
        if let Some(tls) = &self.tls {
            if tls.handshake_timeout.is_zero() {
                return Err(ConfigError::Zero("tls.handshake_timeout"));
            }
            if tls.max_pending_handshakes == 0 {
                return Err(ConfigError::Zero("tls.max_pending_handshakes"));
            }
        }
        if self.close_timeout.is_zero() {
            return Err(ConfigError::Zero("close_timeout"));
        }
        let rl = &self.rate_limit;
        for (name, rate) in [
            ("chat_per_sec", rl.chat_per_sec),
            ("typing_per_sec", rl.typing_per_sec),
            ("room_per_sec", rl.room_per_sec),
            ("control_per_sec", rl.control_per_sec),
            ("address_connections_per_sec", rl.address_connections_per_sec),
            ("address_chat_per_sec", rl.address_chat_per_sec),
            ("address_lobby_per_sec", rl.address_lobby_per_sec),
        ] {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(ConfigError::Inconsistent(format!(
                    "rate_limit.{name} must be a positive number"
                )));
            }
        }
        for (name, burst) in [
            ("rate_limit.chat_burst", rl.chat_burst),
            ("rate_limit.typing_burst", rl.typing_burst),
            ("rate_limit.room_burst", rl.room_burst),
            ("rate_limit.control_burst", rl.control_burst),
            ("rate_limit.flood_strikes", rl.flood_strikes),
            ("rate_limit.address_connections_burst", rl.address_connections_burst),
            ("rate_limit.address_chat_burst", rl.address_chat_burst),
            ("rate_limit.address_lobby_burst", rl.address_lobby_burst),
        ] {
            if burst == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if rl.lobby_bytes_per_sec == 0 {
            return Err(ConfigError::Zero("rate_limit.lobby_bytes_per_sec"));
        }
        // A lobby burst must fit a reader's queue with room to spare, or the
        // limit meant to protect readers would itself drop them.
        if rl.lobby_burst_bytes == 0 || rl.lobby_burst_bytes > (ws.outbound_queue_bytes / 2) as u64 {
            return Err(ConfigError::Inconsistent(format!(
                "rate_limit.lobby_burst_bytes ({}) must be between 1 and half of websocket.outbound_queue_bytes ({})",
                rl.lobby_burst_bytes, ws.outbound_queue_bytes
            )));
        }
        if rl.flood_window.is_zero() {
            return Err(ConfigError::Zero("rate_limit.flood_window"));
        }
        if self.heartbeat.interval.is_zero() {
            return Err(ConfigError::Zero("heartbeat.interval"));
        }
        if self.heartbeat.timeout.is_zero() {
            return Err(ConfigError::Zero("heartbeat.timeout"));
        }
        self.uploads
            .transfer_limits()
            .validate()
            .map_err(|err| ConfigError::Inconsistent(format!("uploads: {err}")))?;
        // Otherwise a file of the largest allowed size could never be sent.
        if self.uploads.max_reserved_bytes_per_owner < self.uploads.max_file_size {
            return Err(ConfigError::Inconsistent(format!(
                "uploads.max_reserved_bytes_per_owner ({}) must be at least uploads.max_file_size ({})",
                self.uploads.max_reserved_bytes_per_owner, self.uploads.max_file_size
            )));
        }
        let chunk_frame = self.uploads.max_chunk_size as usize + hubbub_protocol::chunk::HEADER_LEN;
        if chunk_frame > ws.max_message_bytes {
            return Err(ConfigError::Inconsistent(format!(
                "uploads.max_chunk_size ({}) plus its 4-byte index does not fit websocket.max_message_bytes ({})",
                self.uploads.max_chunk_size, ws.max_message_bytes
            )));
        }
        if ws.max_frame_bytes > ws.max_message_bytes {
            return Err(ConfigError::Inconsistent(format!(
                "websocket.max_frame_bytes ({}) exceeds websocket.max_message_bytes ({})",
                ws.max_frame_bytes, ws.max_message_bytes
            )));
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

    #[test]
    fn contradictions_are_refused() {
        let mut config = Config::default();
        config.websocket.outbound_queue = 0;
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "websocket.outbound_queue must be greater than zero"
        );
        let mut config = Config::default();
        config.websocket.max_frame_bytes = config.websocket.max_message_bytes + 1;
        assert!(config.validate().unwrap_err().to_string().contains("exceeds websocket.max_message_bytes"));
        let mut config = Config::default();
        config.uploads.max_uploads_per_owner = 0;
        assert!(config.validate().unwrap_err().to_string().contains("uploads.max_uploads_per_owner"));
        let mut config = Config::default();
        config.uploads.max_reserved_bytes_per_owner = config.uploads.max_file_size - 1;
        assert!(
            config.validate().unwrap_err().to_string().contains("must be at least uploads.max_file_size")
        );
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
