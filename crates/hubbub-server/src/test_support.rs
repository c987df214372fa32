//! A Hubbub server run in-process, for the project's own integration tests
//! (this crate's and `hubbub-client`'s) only.
//!
//! This module exists behind the `test-support` feature, off by default, and
//! is hidden from the documentation: it is **not** a stable API, and may
//! change with any commit. It starts the real [`Server`] on a loopback
//! listener with a scratch data directory, and stops it the way the binary
//! does, so that both test suites start servers one way.
//!
//! Every failure here panics: in a test harness, a server that cannot start
//! or stop in time is the test's failure, reported where it happened.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::{Config, ConfigError, Server, TlsReloader};

/// How long the server may take to start (a predecessor's history file
/// released) or to stop, and the connection count to settle.
const WAIT: Duration = Duration::from_secs(10);

/// What every scratch directory's name starts with: only such a directory,
/// directly under the system's temporary directory, is ever removed.
const SCRATCH_PREFIX: &str = "hubbub-test-";

/// A server running in-process on a loopback address, until
/// [`TestServer::shutdown`].
///
/// Its data directory (see [`TestServer::data_dir`]) is a fresh scratch
/// directory when the configuration comes from [`TestServer::config`]; that
/// directory is removed at shutdown, or when the value is dropped (a test
/// that panicked), but not by [`TestServer::restart`].
#[derive(Debug)]
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The configuration it runs, for a restart.
    config: Config,
    /// The scratch directory to remove when done, if the harness made it.
    scratch: Option<PathBuf>,
    /// Sent (or dropped) to begin the shutdown.
    stop: Option<oneshot::Sender<()>>,
    /// `Server::run`, which returns once the server has let go of
    /// everything (connections, history file).
    task: JoinHandle<std::io::Result<()>>,
    /// The certificate reloader, when serving TLS.
    tls: Option<TlsReloader>,
}

impl TestServer {
    /// The configuration tests start from: the defaults, a fresh scratch
    /// directory for uploads (`<scratch>/uploads`) and the history file
    /// (`<scratch>/history.redb`, beside them), and short close and drain
    /// times, because tests' clients often stop reading before the server
    /// closes them and waiting the default times would only slow tests.
    pub fn config() -> Config {
        let scratch = std::env::temp_dir().join(format!("{SCRATCH_PREFIX}{}", uuid::Uuid::new_v4().simple()));
        let mut config = Config {
            close_timeout: Duration::from_millis(300),
            shutdown_drain: Duration::from_secs(2),
            ..Config::default()
        };
        config.uploads.dir = scratch.join("uploads");
        config
    }

    /// A server with the test configuration on a free port of 127.0.0.1.
    pub async fn start() -> Self {
        Self::with(Self::config()).await
    }

    /// A server with `config` on a free port of 127.0.0.1.
    pub async fn with(config: Config) -> Self {
        Self::serve(config, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// A server with the test configuration (its history empty) on `addr`,
    /// which may be the address of one that just stopped.
    pub async fn on(addr: SocketAddr) -> Self {
        Self::serve(Self::config(), addr).await
    }

    /// A server with `config` on `addr`. The socket is bound with
    /// SO_REUSEADDR, so `addr` may be that of a server that just stopped,
    /// its connections still in TIME_WAIT.
    pub async fn serve(config: Config, addr: SocketAddr) -> Self {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr).unwrap_or_else(|err| panic!("cannot bind {addr}: {err}"));
        // Some tests open hundreds of connections at once.
        let listener = socket.listen(1024).unwrap();
        let addr = listener.local_addr().unwrap();
        // `run` has closed the history file by the time it returns, unless
        // its drain time ran out with a connection still open; then a
        // successor on the same data waits for the file to be released.
        let server = timeout(WAIT, async {
            loop {
                match Server::new(config.clone()) {
                    Err(ConfigError::History(why)) if why.contains("locked") => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    other => return other.expect("a valid test configuration"),
                }
            }
        })
        .await
        .expect("the history file is released in time");
        let tls = server.tls().cloned();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(listener, async {
            let _ = stopped.await;
        }));
        let scratch = scratch_of(&config);
        Self { addr, config, scratch, stop: Some(stop), task, tls }
    }

    /// The directory holding the upload directory, and the history file
    /// unless the configuration puts it elsewhere.
    pub fn data_dir(&self) -> &Path {
        self.config.uploads.dir.parent().unwrap_or_else(|| Path::new("."))
    }

    /// `ws://` and the address, then `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// The chat endpoint's URL.
    pub fn chat_url(&self) -> String {
        self.url("/ws/chat")
    }

    /// The certificate reloader, when the server serves TLS.
    pub fn tls(&self) -> Option<&TlsReloader> {
        self.tls.as_ref()
    }

    /// `GET /api/status`, parsed.
    pub async fn status(&self) -> serde_json::Value {
        let mut tcp = TcpStream::connect(self.addr).await.unwrap();
        tcp.write_all(b"GET /api/status HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut response = String::new();
        timeout(WAIT, tcp.read_to_string(&mut response)).await.expect("a status reply in time").unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        serde_json::from_str(body).unwrap()
    }

    /// Waits until the server counts `n` open connections: a connection's
    /// room and upload are released before it stops counting.
    pub async fn wait_for_connections(&self, n: u64) {
        let counted = timeout(WAIT, async {
            while self.status().await["connections"].as_u64() != Some(n) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        counted.unwrap_or_else(|_| panic!("the server did not come to {n} connections in time"));
    }

    /// Stops the server as a signal would, waits until `run` has returned
    /// (every connection closed, the history file released), and removes
    /// the scratch directory.
    pub async fn shutdown(mut self) {
        self.stop_and_wait().await;
        self.remove_scratch();
    }

    /// Shuts the server down and starts another with the same configuration
    /// on the same address: what an operator's restart does. The data
    /// directory, history included, carries over.
    pub async fn restart(mut self) -> Self {
        self.stop_and_wait().await;
        // The successor owns the scratch directory now.
        self.scratch = None;
        Self::serve(self.config.clone(), self.addr).await
    }

    async fn stop_and_wait(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let returned = timeout(WAIT, &mut self.task).await.expect("the server stops in time");
        returned.expect("the server's task does not panic").expect("the server runs without an IO error");
    }

    fn remove_scratch(&mut self) {
        if let Some(scratch) = self.scratch.take() {
            let _ = std::fs::remove_dir_all(scratch);
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.remove_scratch();
    }
}

/// The data directory of `config`, if it is a scratch directory made by
/// [`TestServer::config`] (and so safe to remove).
fn scratch_of(config: &Config) -> Option<PathBuf> {
    let dir = config.uploads.dir.parent()?;
    let made_here = dir.parent() == Some(std::env::temp_dir().as_path())
        && dir.file_name().is_some_and(|name| name.to_string_lossy().starts_with(SCRATCH_PREFIX));
    made_here.then(|| dir.to_path_buf())
}
