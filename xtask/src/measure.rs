//! Helpers shared by the measuring commands (`fuzz`, `autobahn`, `bench`,
//! `loadtest`) and `ci`: running programs (every child cargo goes through
//! [`command`]), starting a server under test and reading
//! its address, reading a process's CPU time and RSS from /proc (with
//! `hubbub-loadgen`'s code), describing the machine, and replacing a
//! generated section of a Markdown file.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, bail};

/// A command for `program` without the variables `cargo run` set for xtask
/// itself (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...). Every child cargo is
/// built here: inherited, they differ from what a plain `cargo build` sees,
/// and build scripts that declare `rerun-if-env-changed` on them (ring's
/// does) would rerun and rebuild ring, rustls and everything above them on
/// each switch between `cargo xtask` and plain `cargo`. Variables a user
/// sets to configure cargo (`CARGO_TARGET_DIR`, `CARGO_HOME`, `RUSTFLAGS`,
/// ...) are kept.
pub(crate) fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(set_by_cargo_for_a_crate) {
            command.env_remove(key);
        }
    }
    command
}

/// Whether `key` is one of the variables cargo sets for the crate it builds
/// or runs, as opposed to one that configures cargo.
fn set_by_cargo_for_a_crate(key: &str) -> bool {
    const PREFIXES: &[&str] =
        &["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CFG_", "CARGO_FEATURE_", "CARGO_BIN_EXE_"];
    const NAMES: &[&str] = &[
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    PREFIXES.iter().any(|prefix| key.starts_with(prefix)) || NAMES.contains(&key)
}

/// Runs `program args` in `dir` with extra environment variables; fails
/// unless it exits successfully.
pub(crate) fn run_env(dir: &Path, program: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
    let shown: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v:?} ")).collect();
    eprintln!("xtask: {}{program} {}", shown.concat(), args.join(" "));
    let status = command(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed with {status}", args.join(" "));
    }
    Ok(())
}

/// Runs a program and returns its standard output, trimmed.
pub(crate) fn output(dir: &Path, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = command(program)
        .args(args)
        .current_dir(dir)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!("`{program} {}` failed with {}", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A server under test, killed when dropped.
pub(crate) struct ServerProcess {
    /// The running process.
    child: Child,
    /// The address it listens on, from its first lines of output.
    pub(crate) addr: std::net::SocketAddr,
}

impl ServerProcess {
    /// Starts `command`, whose standard output must print a line containing
    /// `listening on ADDR` (Hubbub's first line; the Node peer prints the
    /// same). The rest of its output is read and dropped so the server never
    /// blocks on a full pipe.
    pub(crate) fn start(mut command: Command) -> anyhow::Result<Self> {
        let mut child = command
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {:?}", command.get_program()))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let Some(line) = lines.next() else {
                let status = child.wait().ok();
                bail!("{:?} exited before it was listening ({status:?})", command.get_program());
            };
            let line = line.context("reading server output")?;
            if let Some((_, addr)) = line.split_once("listening on ") {
                break addr.trim().parse().with_context(|| format!("address in {line:?}"))?;
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Ok(Self { child, addr })
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's resident set size, in bytes.
    pub(crate) fn rss(&self) -> anyhow::Result<u64> {
        rss_bytes(self.pid())
    }

    /// Fails if the server has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the server exited during the run with {status}");
        }
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Hubbub's `GET /api/status`, as JSON.
pub(crate) fn api_status(addr: std::net::SocketAddr) -> anyhow::Result<serde_json::Value> {
    use std::io::{Read as _, Write as _};
    let mut tcp = std::net::TcpStream::connect(addr).context("connecting for /api/status")?;
    tcp.set_read_timeout(Some(STATUS_TIMEOUT))?;
    tcp.write_all(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    tcp.read_to_string(&mut response).context("reading /api/status")?;
    let (_, body) = response.split_once("\r\n\r\n").context("no body in the /api/status response")?;
    serde_json::from_str(body).with_context(|| format!("/api/status is not JSON: {body:?}"))
}

/// The longest wait for `/api/status` to answer.
const STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

// Reading a process's CPU time and RSS from /proc is shared with the
// `hubbub-loadgen` binary.
pub(crate) use hubbub_loadgen::process::{cpu_time, rss_bytes};

/// One line about the machine, for benchmark tables: CPU model, cores,
/// memory, kernel.
pub(crate) fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim()))
        .unwrap_or("unknown CPU")
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cores} cores, {mem_gib:.0} GiB, Linux {}", kernel.trim())
}

/// The load averages over 1, 5 and 15 minutes (`/proc/loadavg`), for
/// benchmark tables measured on a machine that may be busy.
pub(crate) fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let fields: Vec<&str> = text.split_whitespace().take(3).collect();
    if fields.len() == 3 { fields.join(" / ") } else { "unknown".to_owned() }
}

/// Today's date (UTC) and the commit, for benchmark tables.
pub(crate) fn date_and_commit(root: &Path) -> (String, String) {
    let date = output(root, "date", &["-u", "+%Y-%m-%d"]).unwrap_or_else(|_| "unknown date".into());
    let commit = output(root, "git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|_| "unknown".into());
    (date, commit)
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`
/// in `file` with `body`; appends the section, under `heading`, if the
/// markers are not there yet.
pub(crate) fn replace_section(file: &Path, name: &str, heading: &str, body: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let (begin, end) = (format!("<!-- {name}:begin -->"), format!("<!-- {name}:end -->"));
    let section = format!("{begin}\n{}\n{end}", body.trim_end());
    let updated = match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) if b < e => format!("{}{section}{}", &text[..b], &text[e + end.len()..]),
        _ => format!("{}\n\n{heading}\n\n{section}\n", text.trim_end()),
    };
    std::fs::write(file, updated).with_context(|| format!("writing {}", file.display()))?;
    eprintln!("xtask: wrote the {name} table to {}", file.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_commands_drop_what_cargo_set_for_xtask_and_keep_cargo_configuration() {
        assert!(set_by_cargo_for_a_crate("CARGO_MANIFEST_DIR"));
        assert!(set_by_cargo_for_a_crate("CARGO_PKG_VERSION_MAJOR"));
        assert!(set_by_cargo_for_a_crate("CARGO_CRATE_NAME"));
        for kept in ["CARGO", "CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_BUILD_JOBS", "RUSTFLAGS", "PATH"] {
            assert!(!set_by_cargo_for_a_crate(kept), "{kept} must be kept");
        }
        // `cargo test` sets CARGO_MANIFEST_DIR for this test, as `cargo run`
        // does for xtask: the command must remove it.
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        let command = command("cargo");
        let removed = command.get_envs().any(|(key, value)| key == "CARGO_MANIFEST_DIR" && value.is_none());
        assert!(removed, "CARGO_MANIFEST_DIR is passed on to child cargo commands");
    }
}
