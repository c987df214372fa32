//! What a cluster test runs on: its own `redis-server` (without persistence,
//! or with AOF and `appendfsync always`), a TCP proxy that can cut one
//! node's link to it, `hubbub` nodes with short cluster timings, and HTTP
//! polling with a deadline.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hubbub_testkit::{self as testkit, RedisServer};
use serde_json::{Value, json};

pub(super) use hubbub_testkit::Persistence;

use super::super::{Running, WAIT, banner_port, hubbub};

/// `cluster.node_timeout` in these tests: a killed node's members are gone
/// within about this long.
pub(super) const NODE_TIMEOUT: Duration = Duration::from_secs(3);
/// `cluster.check_interval` in these tests.
pub(super) const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How often an HTTP state is polled while waiting for it.
const POLL: Duration = Duration::from_millis(25);

/// Starts the test's own `redis-server` in `dir/redis`; `None` (after one
/// line on stderr) when `redis-server` is missing and the test should pass
/// without running (a failure under `CI=true`).
pub(super) fn redis(dir: &Path, persistence: Persistence) -> Option<RedisServer> {
    if testkit::skip_without_redis("the cluster tests") {
        return None;
    }
    Some(RedisServer::start(&dir.join("redis"), persistence).expect("redis-server starts"))
}

/// A fresh directory for one test, with the upload directory its nodes share.
pub(super) fn test_dir(name: &str) -> PathBuf {
    let dir = super::super::scratch(&format!("cluster-{name}"));
    std::fs::create_dir_all(dir.join("uploads")).unwrap();
    dir
}

/// A TCP proxy between one node and Redis, on a thread of the test: `cut`
/// closes every proxied connection and refuses new ones until `restore`.
pub(super) struct Proxy {
    pub(super) port: u16,
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
    pub(super) fn start(upstream: u16) -> Self {
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

    pub(super) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Closes every proxied connection and refuses new ones.
    pub(super) fn cut(&self) {
        let open = self.state.open.lock().unwrap().take().unwrap_or_default();
        for stream in open {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Proxies new connections again.
    pub(super) fn restore(&self) {
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

/// One `hubbub` node of a test's cluster; killed on drop, printing its log
/// when the test failed.
pub(super) struct Node {
    pub(super) name: &'static str,
    pub(super) port: u16,
    server: Running,
}

impl Node {
    /// Starts node `name` of the cluster on `redis_url`, working in
    /// `dir/name`, with the test's shared upload directory, and waits until
    /// it is ready.
    pub(super) fn start(dir: &Path, name: &'static str, redis_url: &str) -> Self {
        Self::start_with(dir, name, redis_url, &[])
    }

    /// [`Node::start`] with more `HUBBUB_*` variables.
    pub(super) fn start_with(dir: &Path, name: &'static str, redis_url: &str, env: &[(&str, &str)]) -> Self {
        let own = dir.join(name);
        std::fs::create_dir_all(&own).unwrap();
        let mut command = hubbub(&own);
        command
            .args(["--listen", "127.0.0.1:0", "--no-rate-limit", "--redis-url", redis_url])
            .arg("--upload-dir")
            .arg(dir.join("uploads"))
            .env("HUBBUB_CLUSTER_NODE_NAME", name)
            .env("HUBBUB_CLUSTER_NODE_TIMEOUT", format!("{}ms", NODE_TIMEOUT.as_millis()))
            .env("HUBBUB_CLUSTER_CHECK_INTERVAL", format!("{}ms", CHECK_INTERVAL.as_millis()))
            .envs(env.iter().copied());
        let server = Running::start(command);
        let banner = Running::until(&server.stdout, |line| line.contains("/api/status"));
        let node = Self { name, port: banner_port(&banner), server };
        node.wait_ready(200);
        node
    }

    /// Kills the process with SIGKILL and waits for it.
    pub(super) fn kill(&mut self) {
        let _ = self.server.child.kill();
        let _ = self.server.child.wait();
    }

    /// Stops the process with SIGTERM and waits until it has exited, with
    /// success.
    pub(super) fn terminate(&mut self) {
        let pid = self.server.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.server.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "node {} did not stop on SIGTERM", self.name);
            std::thread::sleep(POLL);
        };
        assert!(status.success(), "node {}: {status}", self.name);
    }

    /// Waits until `GET /ready` answers `code`.
    pub(super) fn wait_ready(&self, code: u16) {
        poll(self.port, "/ready", &format!("{}: /ready {code}", self.name), |status, _| status == code);
    }

    /// Waits until `GET /api/status` says the cluster has `nodes` live nodes.
    pub(super) fn wait_nodes(&self, nodes: usize) -> Value {
        let body = poll(self.port, "/api/status", &format!("{}: {nodes} nodes", self.name), |_, body| {
            serde_json::from_slice::<Value>(body).is_ok_and(|status| status["cluster"]["nodes"] == nodes)
        });
        serde_json::from_slice(&body).unwrap()
    }

    /// Waits until `GET /api/rooms` answers `rooms` (name → members).
    pub(super) fn wait_rooms(&self, rooms: &[(&str, usize)]) {
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
pub(super) fn get(port: u16, path: &str) -> (u16, Vec<u8>) {
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
