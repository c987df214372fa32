//! An in-process `hubbub-server` on 127.0.0.1:0 for the generator's tests,
//! without rate limits or per-address caps (all load comes from one address).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hubbub_server::{Config, Server};

/// A running server; [`TestServer::stop`] shuts it down and removes its data.
pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    data: PathBuf,
}

impl TestServer {
    /// Starts a server; `tune` adjusts its configuration first.
    pub(crate) async fn start(name: &str, tune: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::default();
        config.rate_limit.enabled = false;
        config.limits.max_connections_per_ip = 0;
        config.http.max_connections_per_ip = 0;
        // Uploads and, beside them, the history file, in a directory of its own.
        let data = std::env::temp_dir().join(format!("hubbub-loadgen-{name}-{}", std::process::id()));
        config.uploads.dir = data.join("uploads");
        tune(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("the listener's address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task =
            tokio::spawn(Server::new(config).expect("a valid test configuration").run(listener, async {
                let _ = stopped.await;
            }));
        Self { addr, stop, task, data }
    }

    /// Shuts the server down and waits for it, then removes its data.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        let stopped = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        stopped.expect("the server stops within 10 s").expect("the server task").expect("the server's run");
        let _ = std::fs::remove_dir_all(&self.data);
    }
}
