//! A throwaway `redis-server` for the cluster load scenarios: started on a
//! free loopback port with its files in a temporary directory, nothing
//! saved (`--save '' --appendonly no`), and killed when dropped. Also the
//! temporary directory itself, which a cluster's nodes share.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The longest wait for a fresh `redis-server` to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause between two `PING`s while it starts.
const READY_POLL: Duration = Duration::from_millis(20);
/// Starts tried before giving up: another process may take the free port
/// between the moment it is found and the moment Redis binds it.
const START_ATTEMPTS: usize = 3;

/// A directory under the system's temporary directory, removed with what
/// it holds when dropped.
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `hubbub-PREFIX-PID-N` under the temporary directory.
    pub(crate) fn new(prefix: &str) -> anyhow::Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("hubbub-{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        // A directory left by a killed earlier run of the same pid.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running `redis-server`, killed when dropped.
pub(crate) struct RedisServer {
    /// The process.
    child: Child,
    /// Where it listens: 127.0.0.1 and a port that was free.
    addr: SocketAddr,
}

impl RedisServer {
    /// Fails with what to install when `redis-server` is not on the PATH.
    pub(crate) fn check_installed() -> anyhow::Result<()> {
        match Command::new("redis-server").arg("--version").output() {
            Ok(out) if out.status.success() => Ok(()),
            _ => bail!(
                "the cluster scenarios start their own Redis, and redis-server is not installed \
                 (on Debian: apt-get install -y redis-server)"
            ),
        }
    }

    /// Starts `redis-server` on a free port of 127.0.0.1 with `dir` as its
    /// working directory (its log goes to `dir/redis.log`); returns once it
    /// answers `PING`.
    pub(crate) fn start(dir: &Path) -> anyhow::Result<Self> {
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(dir) {
                Ok(redis) => return Ok(redis),
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    fn try_start(dir: &Path) -> anyhow::Result<Self> {
        let port = free_port()?;
        let log = std::fs::File::create(dir.join("redis.log")).context("creating redis.log")?;
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log)
            .spawn()
            .context("starting redis-server")?;
        let mut redis = Self { child, addr: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port) };
        let deadline = Instant::now() + READY_TIMEOUT;
        while !redis.answers_ping() {
            if let Some(status) = redis.child.try_wait()? {
                let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
                bail!("redis-server exited with {status}: {}", log.trim());
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer PING on {} within {READY_TIMEOUT:?}", redis.addr);
            }
            std::thread::sleep(READY_POLL);
        }
        Ok(redis)
    }

    fn answers_ping(&self) -> bool {
        let Ok(mut tcp) = TcpStream::connect_timeout(&self.addr, READY_POLL * 10) else { return false };
        let _ = tcp.set_read_timeout(Some(READY_POLL * 10));
        let mut reply = [0_u8; 7];
        tcp.write_all(b"PING\r\n").is_ok() && tcp.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
    }

    /// `redis://127.0.0.1:PORT`.
    pub(crate) fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if Redis has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("redis-server exited during the run with {status}");
        }
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on right now.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_directories_are_removed_when_dropped() {
        let dir = TempDir::new("test").unwrap();
        let path = dir.path().to_owned();
        std::fs::write(path.join("file"), b"x").unwrap();
        drop(dir);
        assert!(!path.exists());
    }

    /// Where redis-server is installed; without it the test says so and
    /// passes, except under `CI=true` (CI installs it, as the history's
    /// Redis tests do).
    #[test]
    fn redis_starts_answers_and_is_killed_when_dropped() {
        if let Err(err) = RedisServer::check_installed() {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{err:#}");
            eprintln!("redis-server not found: skipping the throwaway Redis test");
            return;
        }
        let dir = TempDir::new("test-redis").unwrap();
        let redis = RedisServer::start(dir.path()).unwrap();
        assert!(redis.answers_ping());
        assert!(redis.url().starts_with("redis://127.0.0.1:"));
        let pid = redis.pid();
        drop(redis);
        assert!(crate::measure::cpu_time(pid).is_err(), "redis-server {pid} still runs");
    }
}
