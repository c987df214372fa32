//! Hubbub's server core: one port for HTTP and WebSocket, rooms, fan-out.
//!
//! [`Server`] runs on a listener the caller has bound, until a shutdown
//! future completes; then it stops accepting, closes every WebSocket with
//! 1001 (Going Away) after what is already queued for it, and waits up to the
//! configured drain time. Tests bind `127.0.0.1:0` and run it in-process:
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use hubbub_server::{Config, Server};
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let server = Server::new(Config::default()).expect("default config is valid");
//! server.run(listener, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
//!
//! Layout: `http` routes requests, `upgrade` performs the WebSocket
//! handshake, `conn` drives a connection (one task: reads, handler calls,
//! vectored writes of its queue), `ws` is the RFC 6455 framing, `chat` holds
//! the endpoint handlers, `hub` owns rooms and fan-out.

mod admission;
mod auth;
mod chat;
mod cluster;
mod config;
mod conn;
mod connlog;
mod deflate;
mod echo;
mod feed;
mod http;
mod hub;
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod internals;
mod link;
mod metrics;
mod net;
mod ratelimit;
mod serve;
mod sweeper;
mod sync;
#[cfg(feature = "test-support")]
#[doc(hidden)]
pub mod test_support;
mod tls;
mod upgrade;
mod upload;
mod ws;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use hubbub_protocol::ServerMessage;
use hubbub_transfer::{Store, StoreConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{
    ClusterSettings, Config, ConfigError, ConnectionLimits, DeliverySettings, HeartbeatSettings,
    HistorySettings, HistoryStore, RateLimitSettings, UploadSettings, WebSocketLimits,
};
pub use connlog::ConnectionSpans;
pub use tls::{TlsError, TlsReloader, TlsSettings};

/// State shared by every request and connection.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The validated configuration.
    pub(crate) config: Config,
    /// Rooms, peers and counters.
    pub(crate) hub: hub::Hub,
    /// Every connection, for the heartbeat sweeper.
    pub(crate) beats: sweeper::Registry,
    /// When the server was created, for `uptime`.
    pub(crate) started: Instant,
    /// Cancelled when shutdown begins; the heartbeat sweeper then closes
    /// every connection (`sweeper::Registry::close_all`).
    pub(crate) shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them to finish.
    pub(crate) tasks: TaskTracker,
    /// The upload directory.
    pub(crate) store: Store,
    /// Open WebSocket connections, against `limits`.
    pub(crate) admission: Arc<admission::Admission>,
    /// Open HTTP connections not upgraded, against `http`'s caps.
    pub(crate) http_admission: Arc<admission::Admission>,
    /// TLS handshakes in progress, against `tls.max_pending_handshakes`.
    pub(crate) handshakes: Arc<admission::Admission>,
    /// Rate limits shared by the connections of one address or user, and
    /// the server-wide lobby budget.
    pub(crate) limits: ratelimit::AddressLimits,
    /// Verifies tokens, when authentication is on.
    pub(crate) auth: Option<auth::Authenticator>,
    /// Room history, unless `history.store = "off"`; in Redis in a cluster.
    pub(crate) history: Option<HistoryHandle>,
    /// This node of a cluster, when `cluster.redis_url` is set.
    pub(crate) cluster: Option<Arc<cluster::Cluster>>,
}

/// A Hubbub server, ready to run on a listener.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    /// The certificate in use, when serving TLS.
    tls: Option<TlsReloader>,
}

impl Server {
    /// Creates a server from a configuration, which is validated first.
    /// Opens (creating if needed) the upload directory.
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        config.validate()?;
        let uploads = &config.uploads;
        let store = Store::open(StoreConfig {
            dir: uploads.dir.clone(),
            quota_bytes: uploads.quota_bytes,
            resume_ttl: uploads.resume_ttl,
            empty_resume_ttl: uploads.empty_resume_ttl,
            max_parked: uploads.max_parked,
            account_reserved_bytes: uploads.max_reserved_bytes_per_owner,
            account_max_uploads: uploads.max_uploads_per_owner,
            limits: uploads.transfer_limits(),
            // The nodes of a cluster share the directory (CLUSTER.md).
            shared: config.cluster.redis_url.is_some(),
            write_batch_bytes: uploads.write_batch_bytes,
        })
        .map_err(|err| ConfigError::UploadDir { path: uploads.dir.clone(), cause: err.to_string() })?;
        let tls = config.tls.clone().map(TlsReloader::load).transpose()?;
        let auth = auth::Authenticator::from_settings(&config.auth)?;
        let limits = ratelimit::AddressLimits::new(&config.rate_limit, Instant::now());
        let (history, cluster) = match &config.cluster.redis_url {
            Some(url) => {
                let cluster = cluster::Cluster::connect(&config.cluster, url, history_options(&config))
                    .map_err(ConfigError::Cluster)?;
                let engine: Arc<dyn hubbub_history::Engine> = cluster.engine.clone();
                (Some(HistoryHandle(engine)), Some(Arc::new(cluster)))
            }
            None => (open_history(&config)?, None),
        };
        let mut hub = hub::Hub::new(Arc::new(metrics::Stats::new()));
        hub.announce_rooms = cluster.is_none();
        Ok(Self {
            tls,
            shared: Arc::new(Shared {
                // Before `config` moves in.
                beats: sweeper::Registry::new(config.heartbeat.into()),
                config,
                hub,
                started: Instant::now(),
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
                store,
                admission: Arc::default(),
                http_admission: Arc::default(),
                handshakes: Arc::default(),
                limits,
                auth,
                history,
                cluster,
            }),
        })
    }

    /// The configuration in effect.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The TLS certificate's reloader, when the server serves TLS; call
    /// [`TlsReloader::reload`] on SIGHUP.
    pub fn tls(&self) -> Option<&TlsReloader> {
        self.tls.as_ref()
    }

    /// Serves on `listener` until `shutdown` completes, then closes every
    /// connection and returns once they are gone or the drain time is up.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let shared = self.shared;
        if let (true, Some(addr)) = (shared.config.metrics.enabled, shared.config.metrics.listen) {
            let metrics_listener = TcpListener::bind(addr).await?;
            tracing::info!(%addr, "serving /metrics on its own address");
            shared.tasks.spawn(serve::metrics_only(metrics_listener, shared.clone()));
        }
        let app = http::router(shared.clone());
        let mut server = tokio::spawn(serve::serve(listener, self.tls, app, shared.clone()));
        let token = shared.shutdown.clone();

        // Tracked like the connections, so that when `run` returns nothing
        // holds the shared state any more: the history file is closed and
        // another server may open it at once.
        shared.tasks.spawn(sweep_uploads(shared.clone()));
        shared.tasks.spawn(sweep_limits(shared.clone()));
        shared.tasks.spawn(sweeper::sweeper(shared.clone()));
        if let Some(cluster) = &shared.cluster {
            tracing::info!(node = %cluster.node, "serving as a node of a cluster");
            shared.tasks.spawn(cluster::run(shared.clone(), cluster.clone()));
        }
        let notice = {
            let shared = shared.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: closing connections with 1001");
                shared.hub.notify(&ServerMessage::ServerShutdown {
                    message: "The server is shutting down".to_owned(),
                });
            }
        };
        tokio::select! {
            () = notice => {}
            result = &mut server => {
                // The accept loop only ends when told to; report why.
                token.cancel();
                return result.map_err(std::io::Error::other);
            }
        }
        token.cancel();
        shared.tasks.close();
        let drain = shared.config.shutdown_drain;
        let drained = tokio::time::timeout(drain, async {
            let served = server.await;
            shared.tasks.wait().await;
            served
        })
        .await;
        match drained {
            Ok(Ok(())) => Ok(()),
            Ok(Err(join)) => Err(std::io::Error::other(join)),
            Err(_) => {
                tracing::warn!(remaining = shared.tasks.len(), ?drain, "drain time elapsed; exiting anyway");
                Ok(())
            }
        }
    }
}

/// Forgets the shared rate limits' idle entries now and then, so that
/// their memory follows the addresses active lately, until shutdown.
async fn sweep_limits(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(10));
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = ticks.tick() => {
                let remaining = shared.limits.forget_idle(&shared.config.rate_limit, Instant::now());
                tracing::trace!(remaining, "rate limit entries");
            }
        }
    }
}

/// Opens the history store the configuration names. A file that cannot be
/// opened (damaged, of another format, locked by another process) is an
/// error naming it: history is never silently discarded.
fn open_history(config: &Config) -> Result<Option<HistoryHandle>, ConfigError> {
    use hubbub_history::{DiskConfig, DiskEngine, MemoryEngine};
    let settings = &config.history;
    let options = history_options(config);
    Ok(match settings.store {
        HistoryStore::Off => None,
        HistoryStore::Memory => Some(HistoryHandle(Arc::new(MemoryEngine::new(options)))),
        HistoryStore::Disk => {
            let path = config.history_path();
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|err| {
                    ConfigError::History(format!("cannot create the directory of {}: {err}", path.display()))
                })?;
            }
            let engine = DiskEngine::open(DiskConfig::new(path), options).map_err(|err| {
                ConfigError::History(format!(
                    "{err} (the file is left as it is: move it aside to start with an empty history, \
                     or set history.path)"
                ))
            })?;
            Some(HistoryHandle(Arc::new(engine)))
        }
    })
}

/// Retention and dedupe as configured, for any history engine.
fn history_options(config: &Config) -> hubbub_history::Options {
    use hubbub_history::{BatchScope, Options, Retention};
    let settings = &config.history;
    Options {
        retention: Retention {
            max_messages: settings.max_messages,
            ttl: settings.ttl,
            dedupe_window: config.delivery.dedupe_window,
            dedupe_capacity: config.delivery.dedupe_capacity as u64,
            ..Retention::default()
        },
        // A recipient with several messages in one commit writes them at once.
        batch: BatchScope::new(link::with_deferred_wakes),
        ..Options::default()
    }
}

/// The history store, shared by every chat session.
#[derive(Clone)]
pub(crate) struct HistoryHandle(Arc<dyn hubbub_history::Engine>);

impl std::ops::Deref for HistoryHandle {
    type Target = dyn hubbub_history::Engine;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl std::fmt::Debug for HistoryHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HistoryHandle")
    }
}

/// Deletes interrupted uploads whose resume time is up, until shutdown.
async fn sweep_uploads(shared: Arc<Shared>) {
    let uploads = &shared.config.uploads;
    // The shorter of the two resume times sets the pace (zero means none).
    let ttl = [uploads.resume_ttl, uploads.empty_resume_ttl]
        .into_iter()
        .filter(|ttl| !ttl.is_zero())
        .min()
        .unwrap_or(uploads.resume_ttl);
    let period = (ttl / 4).clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(60));
    let mut ticks = tokio::time::interval(period);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = ticks.tick() => {
                let swept = shared.store.sweep(Instant::now());
                if swept > 0 {
                    tracing::info!(swept, "deleted interrupted uploads past their resume time");
                }
            }
        }
    }
}

/// What the unit tests share: a server's state without a listener, and a
/// look into a connection's queue without a socket.
#[cfg(test)]
pub(crate) mod testing {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::VecDeque;
    use std::sync::Arc;

    use crate::link::Peer;
    use crate::{Config, Server, Shared};

    /// A server's shared state, its upload directory fresh under the
    /// system's temporary directory.
    pub(crate) fn shared(mut config: Config) -> Arc<Shared> {
        let scratch = std::env::temp_dir().join(format!("hubbub-unit-{}", uuid::Uuid::new_v4().simple()));
        config.uploads.dir = scratch.join("uploads");
        Server::new(config).expect("a valid test configuration").shared
    }

    /// A server's shared state whose history store is `engine`.
    pub(crate) fn shared_with_history(
        mut config: Config,
        engine: Arc<dyn hubbub_history::Engine>,
    ) -> Arc<Shared> {
        config.history.store = crate::HistoryStore::Off;
        let scratch = std::env::temp_dir().join(format!("hubbub-unit-{}", uuid::Uuid::new_v4().simple()));
        config.uploads.dir = scratch.join("uploads");
        let mut server = Server::new(config).expect("a valid test configuration");
        Arc::get_mut(&mut server.shared).expect("nobody else holds it yet").history =
            Some(crate::HistoryHandle(engine));
        server.shared
    }

    /// The payload of each complete server frame in `bytes`, with its
    /// opcode, in order (server frames are never masked).
    pub(crate) fn frames(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 2 <= bytes.len() {
            let (opcode, len7) = (bytes[at] & 0x0f, usize::from(bytes[at + 1] & 0x7f));
            let (header, len) = match len7 {
                126 => (4, usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]))),
                127 => (10, u64::from_be_bytes(bytes[at + 2..at + 10].try_into().unwrap()) as usize),
                len => (2, len),
            };
            if at + header + len > bytes.len() {
                break;
            }
            out.push((opcode, bytes[at + header..at + header + len].to_vec()));
            at += header + len;
        }
        out
    }

    /// Takes everything queued for `peer`, as its task would write it.
    pub(crate) fn take(peer: &Peer) -> VecDeque<crate::link::Frame> {
        let mut queued = VecDeque::new();
        peer.take_queued(&mut queued);
        let bytes: usize = queued.iter().map(|f| f.len()).sum();
        peer.written(u32::try_from(queued.len()).unwrap(), bytes);
        queued
    }

    /// Takes everything queued for `peer` and decodes its text frames as
    /// JSON, in order.
    pub(crate) fn drain(peer: &Peer) -> Vec<serde_json::Value> {
        take(peer)
            .iter()
            .flat_map(|frame| frames(frame))
            .filter(|(opcode, _)| *opcode == 0x1)
            .map(|(_, payload)| serde_json::from_slice(&payload).unwrap())
            .collect()
    }
}
