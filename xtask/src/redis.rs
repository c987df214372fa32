//! A throwaway `redis-server` for the cluster load scenarios
//! (`hubbub-testkit`'s, which the tests use too): started on a free loopback
//! port with its files in a temporary directory, nothing saved, and killed
//! when dropped. Also the temporary directory itself, which a cluster's
//! nodes share.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context as _, bail};
use hubbub_testkit::Persistence;

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

/// The throwaway `redis-server` the tests use too: nothing saved, on a
/// free loopback port, killed when dropped.
pub(crate) use hubbub_testkit::RedisServer;

/// Fails with what to install when `redis-server` is not on the PATH.
pub(crate) fn check_installed() -> anyhow::Result<()> {
    if !RedisServer::installed() {
        bail!(
            "the cluster scenarios start their own Redis, and redis-server is not installed \
             (on Debian: apt-get install -y redis-server)"
        );
    }
    Ok(())
}

/// Starts `redis-server` without persistence on a free port of 127.0.0.1
/// with `dir` as its working directory (its log goes to `dir/redis.log`);
/// returns once it answers `PING`.
pub(crate) fn start(dir: &Path) -> anyhow::Result<RedisServer> {
    RedisServer::start(dir, Persistence::None).context("starting redis-server")
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
}
