//! What Hubbub's test binaries and `xtask` share, so that each does not
//! carry its own copy: a throwaway `redis-server` ([`RedisServer`]) that a
//! test or a load scenario starts on a free loopback port, with its files in
//! a directory the caller owns, and kills when done. Never a system
//! instance.

use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

/// The longest wait for a starting `redis-server` to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// The pause between two `PING`s while it starts.
const READY_POLL: Duration = Duration::from_millis(20);
/// Starts tried on fresh ports before giving up: another process may take
/// the free port between the moment it is found and the moment Redis binds
/// it.
const START_ATTEMPTS: usize = 5;

/// Whether Redis writes what it holds to disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing (`--save '' --appendonly no`): a restart loses every key.
    #[default]
    None,
    /// The append-only file with `appendfsync always`: a write is on disk
    /// before Redis answers it.
    Aof,
}

/// A running `redis-server` on 127.0.0.1 and a port that was free, with
/// its working directory (and `redis.log`) in a directory of the caller's;
/// killed (SIGKILL) and waited for when dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    persistence: Persistence,
}

impl RedisServer {
    /// Whether `redis-server` can be run from the `PATH`.
    pub fn installed() -> bool {
        Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// Starts one in `dir` (created if missing) and returns once it answers
    /// `PING`, trying another free port if the first was taken meanwhile.
    pub fn start(dir: &Path, persistence: Persistence) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let mut server = Self { child: None, port: free_port()?, dir: dir.to_owned(), persistence };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("redis-server did not start")))
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port it listens on (and listens on again after [`Self::start_again`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its working directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process id while it runs, to signal it (`SIGSTOP`, `SIGCONT`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process (SIGKILL) and waits for it; nothing if it is not
    /// running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again, after [`Self::kill`], on the same port and in the
    /// same directory: what it kept there (with [`Persistence::Aof`]) it
    /// loads again.
    pub fn start_again(&mut self) -> io::Result<()> {
        if self.child.is_some() {
            return Err(io::Error::other("redis-server is still running"));
        }
        self.spawn()
    }

    /// An error if it has exited: a load scenario checks this after its run.
    pub fn check_alive(&mut self) -> io::Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Err(io::Error::other("redis-server was killed"));
        };
        match child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(io::Error::other(format!("redis-server exited with {status}"))),
        }
    }

    fn spawn(&mut self) -> io::Result<()> {
        let log = self.dir.join("redis.log");
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log);
        match self.persistence {
            Persistence::None => command.args(["--appendonly", "no"]),
            Persistence::Aof => command.args(["--appendonly", "yes", "--appendfsync", "always"]),
        };
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = command
            .spawn()
            .map_err(|err| io::Error::new(err.kind(), format!("starting redis-server: {err}")))?;
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.port);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                // Most often: the port was taken meanwhile.
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                let last = said.lines().last().unwrap_or("").trim();
                return Err(io::Error::other(format!("redis-server exited with {status}: {last}")));
            }
            if answers_ping(addr) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("redis-server did not answer PING on {addr} within {READY_TIMEOUT:?}"),
                ));
            }
            std::thread::sleep(READY_POLL);
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a test that needs `redis-server` should pass without running
/// because it is not installed; it then says so once on stderr (naming
/// `what` is skipped). Under `CI=true` a missing server panics instead: CI
/// installs Debian's package.
pub fn skip_without_redis(what: &str) -> bool {
    if RedisServer::installed() {
        return false;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "redis-server is not installed (CI=true): install Debian's redis-server package"
    );
    static SAID: Once = Once::new();
    SAID.call_once(|| {
        // Straight to stderr, past the test harness's capture, so that the skip is seen.
        let _ = writeln!(io::stderr(), "redis-server not found: skipping {what}");
    });
    true
}

/// Whether Redis answers `PING` on `addr` now (not while it loads).
fn answers_ping(addr: SocketAddr) -> bool {
    let Ok(mut tcp) = TcpStream::connect_timeout(&addr, READY_POLL * 10) else { return false };
    let _ = tcp.set_read_timeout(Some(READY_POLL * 10));
    let mut reply = [0_u8; 7];
    tcp.write_all(b"PING\r\n").is_ok() && tcp.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// A loopback port nobody listens on now.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_restarts_and_is_killed_on_drop() {
        if skip_without_redis("the testkit's own test") {
            return;
        }
        let dir = std::env::temp_dir().join(format!("hubbub-testkit-{}", std::process::id()));
        let mut redis = RedisServer::start(&dir, Persistence::Aof).expect("starts");
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), redis.port());
        assert!(answers_ping(addr));
        assert!(redis.url().ends_with(&format!(":{}/", redis.port())));
        redis.check_alive().expect("alive");
        assert!(redis.start_again().is_err(), "refused while it runs");
        redis.kill();
        assert!(redis.check_alive().is_err());
        redis.start_again().expect("starts again on the same port");
        assert!(answers_ping(addr));
        let pid = redis.pid().expect("running");
        drop(redis);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "killed and reaped on drop");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
