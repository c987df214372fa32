//! `cargo xtask browser`: the chat page and the browser client, end to end in
//! headless Chromium.
//!
//! Builds the debug `hubbub` binary (in `ci`, the one the tests built),
//! installs the tests' one npm dependency
//! (`playwright-core`, pinned in `web/tests/package-lock.json`), starts the
//! server on a free loopback port with a fresh upload directory, runs
//! `web/tests/e2e.mjs` against it and stops the server. The script also gets
//! the binary, the server's pid and the upload directory, so its restart test
//! can kill the server and start another on the same address.
//!
//! The tests drive Debian's Chromium (`/usr/bin/chromium`): Playwright's own
//! browser download is not used. Without Chromium the tests are reported as
//! skipped with the command that installs it, except under CI (`CI=true`),
//! where a missing browser is a failure. Screenshots, and the server's log,
//! are left in `target/browser-artifacts/`.

use std::fs::File;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};

/// Where Debian's `chromium` package puts the browser.
const CHROMIUM: &str = "/usr/bin/chromium";

/// What the server prints first, before its address.
const LISTENING: &str = " listening on ";

pub(crate) fn browser(root: &Path, hubbub: crate::Hubbub) -> anyhow::Result<()> {
    if !Path::new(CHROMIUM).exists() {
        let how = "install it with `sudo apt-get install -y chromium` (Debian and Ubuntu)";
        if std::env::var("CI").is_ok_and(|ci| ci == "true") {
            bail!("the browser tests need Chromium at {CHROMIUM}: {how}");
        }
        eprintln!("xtask browser: SKIPPED: the browser tests need Chromium at {CHROMIUM}: {how}");
        return Ok(());
    }
    let binary = crate::debug_hubbub(root, hubbub)?;
    let tests = root.join("web/tests");
    crate::run(&tests, "npm", &["ci", "--no-audit", "--no-fund"])?;

    let artifacts = crate::target_dir(root).join("browser-artifacts");
    std::fs::create_dir_all(&artifacts).with_context(|| format!("cannot create {}", artifacts.display()))?;
    // The server's data: uploads, and the history file beside them.
    let data = TempDir::new("hubbub-browser-data")?;
    let uploads = data.0.join("uploads");
    let server = Server::start(&binary, &uploads, &artifacts.join("server.log"))?;

    let started = Instant::now();
    let url = format!("http://{}", server.addr);
    eprintln!("xtask: node e2e.mjs {url}");
    let status = Command::new("node")
        .arg("e2e.mjs")
        .arg(&url)
        .env("E2E_SERVER_BIN", &binary)
        .env("E2E_SERVER_PID", server.child.id().to_string())
        .env("E2E_UPLOAD_DIR", &uploads)
        .env("E2E_ARTIFACTS", &artifacts)
        .current_dir(&tests)
        .status()
        .context("cannot run node (install Node.js: on Debian, apt-get install -y nodejs npm)")?;
    drop(server);
    if !status.success() {
        bail!(
            "the browser tests failed ({status}); screenshots and the server log are in {}",
            artifacts.display()
        );
    }
    eprintln!("xtask browser: passed in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// A running `hubbub`, killed when dropped (the restart test may have killed
/// it already; that is fine).
struct Server {
    child: Child,
    /// The address it listens on, from its first line of output.
    addr: String,
}

impl Server {
    fn start(binary: &Path, uploads: &Path, log: &Path) -> anyhow::Result<Self> {
        let mut log = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let stderr = log.try_clone().context("cannot share the log file")?;
        let mut child = Command::new(binary)
            .args(["--listen", "127.0.0.1:0", "--upload-dir"])
            .arg(uploads)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = match lines.next() {
            Some(Ok(line)) => match line.split_once(LISTENING) {
                Some((_, addr)) => addr.trim().to_owned(),
                None => {
                    let _ = child.kill();
                    bail!("hubbub printed {line:?} instead of its address");
                }
            },
            _ => {
                let status = child.wait()?;
                bail!("hubbub exited ({status}) before it was listening; see the log");
            }
        };
        // The server logs to stdout; keep draining it into the log file so
        // it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if writeln!(log, "{line}").is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, addr })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh, empty directory, removed with its contents when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> anyhow::Result<Self> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        // `create_dir`, not `create_dir_all`: it fails rather than reuse.
        std::fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
