//! `cargo xtask autobahn`: the Autobahn TestSuite against both sides of our
//! WebSocket stack.
//!
//! - `wstest -m fuzzingclient` drives the debug `hubbub`'s `/ws/echo` (in
//!   `ci`, the binary the tests built: no release build just for this, and
//!   debug assertions and overflow checks stay on while Autobahn probes).
//! - `wstest -m fuzzingserver` is driven by a tokio-tungstenite client
//!   configured as `hubbub-client` configures its transport (default
//!   `WebSocketConfig`, Nagle off), which echoes every message back.
//!
//! `wstest` exits 0 whatever the cases did, so this reads each report's
//! `index.json` and fails on any case whose behaviour (or close behaviour)
//! is not OK or INFORMATIONAL, unless `docs/CONFORMANCE.md` lists that case
//! with that result and a reason. The HTML reports are left in
//! `target/autobahn/reports/{server,client}/index.html`.
//!
//! `wstest` (autobahntestsuite) runs on Python 2.7 only, which Debian 12 no
//! longer ships. The first run installs it privately under
//! `target/autobahn/`: Debian 11's CPython 2.7 packages (and the two
//! libraries of that release it links, libssl1.1 and libffi7) fetched with
//! `apt-get download` against a private package list and unpacked with
//! `dpkg-deb -x`; a Python 3 venv holding `virtualenv==20.21.1`, the last
//! release that makes Python 2.7 environments; a 2.7 virtualenv; and
//! `pip install autobahntestsuite==25.10.1` in it, with CFLAGS pointing at
//! the unpacked headers so its C extensions build. Nothing outside
//! `target/autobahn/` changes. Later runs reuse it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

use crate::measure::{self, ServerProcess};

/// The Python 2.7 packages of the previous Debian release, and the libraries
/// of that release they link that Debian 12 no longer has.
const PY27_PACKAGES: &[&str] = &[
    "python2.7",
    "python2.7-minimal",
    "libpython2.7",
    "libpython2.7-minimal",
    "libpython2.7-stdlib",
    "libpython2.7-dev",
    "libssl1.1",
    "libffi7",
];
const DEBIAN_SOURCE: &str = "deb http://deb.debian.org/debian bullseye main";
const VIRTUALENV: &str = "virtualenv==20.21.1";
const AUTOBAHN: &str = "autobahntestsuite==25.10.1";

/// The agent names in the reports.
const SERVER_AGENT: &str = "hubbub";
const CLIENT_AGENT: &str = "hubbub-client";

/// Paths of the private install.
struct Install {
    dir: PathBuf,
}

impl Install {
    fn py27(&self) -> PathBuf {
        self.dir.join("py27")
    }

    fn lib_path(&self) -> String {
        self.py27().join("usr/lib/x86_64-linux-gnu").to_string_lossy().into_owned()
    }

    fn wstest(&self) -> PathBuf {
        self.dir.join("venv27/bin/wstest")
    }

    /// `wstest` with the unpacked libraries on its library path.
    fn command(&self) -> Command {
        let mut command = Command::new(self.wstest());
        command.env("LD_LIBRARY_PATH", self.lib_path());
        command
    }
}

pub(crate) fn autobahn(root: &Path, hubbub: crate::Hubbub) -> anyhow::Result<()> {
    let install = Install { dir: crate::target_dir(root).join("autobahn") };
    ensure_wstest(&install).context("installing wstest (Autobahn TestSuite)")?;
    let binary = crate::debug_hubbub(root, hubbub)?;
    let allowed = Allowed::read(&root.join("docs/CONFORMANCE.md"))?;

    let reports = install.dir.join("reports");
    let server_dir = reports.join("server");
    let client_dir = reports.join("client");
    for dir in [&server_dir, &client_dir] {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    fuzzing_client(&binary, &install, &server_dir).context("wstest -m fuzzingclient against hubbub")?;
    fuzzing_server(&install, &client_dir).context("wstest -m fuzzingserver with the client")?;

    let mut problems = check(&server_dir.join("index.json"), SERVER_AGENT, "server", &allowed)?;
    problems.extend(check(&client_dir.join("index.json"), CLIENT_AGENT, "client", &allowed)?);
    eprintln!("xtask autobahn: reports in");
    eprintln!("  {}", server_dir.join("index.html").display());
    eprintln!("  {}", client_dir.join("index.html").display());
    if !problems.is_empty() {
        for problem in &problems {
            eprintln!("  {problem}");
        }
        bail!("{} Autobahn cases failed or are not accepted in docs/CONFORMANCE.md", problems.len());
    }
    eprintln!("xtask autobahn: every case OK, INFORMATIONAL, or accepted in docs/CONFORMANCE.md");
    Ok(())
}

/// Installs `wstest` under `target/autobahn/` unless it is there and runs.
fn ensure_wstest(install: &Install) -> anyhow::Result<()> {
    let works = |install: &Install| {
        install.wstest().exists()
            && install.command().arg("--autobahnversion").output().is_ok_and(|o| o.status.success())
    };
    if works(install) {
        return Ok(());
    }
    let dir = &install.dir;
    std::fs::create_dir_all(dir)?;
    for tool in ["apt-get", "dpkg-deb", "python3", "cc"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
        if !found.is_ok_and(|o| o.status.success()) {
            bail!(
                "`{tool}` is needed to install wstest (Debian: apt-get install -y apt dpkg python3 python3-venv gcc)"
            );
        }
    }

    // CPython 2.7 from the previous Debian release, through a private
    // package list so the machine's own apt configuration is untouched.
    let apt = dir.join("apt");
    for sub in ["lists/partial", "cache/archives/partial", "debs"] {
        std::fs::create_dir_all(apt.join(sub))?;
    }
    std::fs::write(apt.join("sources.list"), format!("{DEBIAN_SOURCE}\n"))?;
    let apt_options = [
        format!("-oDir::Etc::SourceList={}", apt.join("sources.list").display()),
        "-oDir::Etc::SourceParts=/dev/null".to_owned(),
        format!("-oDir::State::Lists={}", apt.join("lists").display()),
        format!("-oDir::Cache={}", apt.join("cache").display()),
        // Downloads go to a folder of ours, which apt's sandbox user
        // may not be able to write.
        "-oAPT::Sandbox::User=root".to_owned(),
    ];
    let apt_args = |verb: &[&str]| -> Vec<String> {
        apt_options.iter().cloned().chain(verb.iter().map(|s| (*s).to_owned())).collect()
    };
    run_args(&apt, "apt-get", &apt_args(&["update"]), &[])?;
    let mut download = vec!["download"];
    download.extend(PY27_PACKAGES);
    run_args(&apt.join("debs"), "apt-get", &apt_args(&download), &[])?;
    let py27 = install.py27();
    for entry in std::fs::read_dir(apt.join("debs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            let args =
                ["-x".to_owned(), path.to_string_lossy().into_owned(), py27.to_string_lossy().into_owned()];
            run_args(dir, "dpkg-deb", &args, &[])?;
        }
    }
    let python27 = py27.join("usr/bin/python2.7");
    let lib_path = install.lib_path();
    let env = [("LD_LIBRARY_PATH", lib_path.as_str())];
    run_args(
        dir,
        python27.to_string_lossy().as_ref(),
        &["-c".into(), "import ssl, zlib, ctypes".into()],
        &env,
    )
    .context("the unpacked Python 2.7 does not start")?;

    // virtualenv 20.21.1 in a Python 3 venv makes the 2.7 environment.
    let py3 = dir.join("py3venv");
    run_args(dir, "python3", &["-m".into(), "venv".into(), py3.to_string_lossy().into_owned()], &[])?;
    run_args(
        dir,
        &py3.join("bin/pip").to_string_lossy(),
        &["install".into(), "--quiet".into(), VIRTUALENV.into()],
        &[],
    )?;
    let app_data = dir.join("virtualenv-data").to_string_lossy().into_owned();
    let venv27 = dir.join("venv27");
    run_args(
        dir,
        &py3.join("bin/virtualenv").to_string_lossy(),
        &["-p".into(), python27.to_string_lossy().into_owned(), venv27.to_string_lossy().into_owned()],
        &[("LD_LIBRARY_PATH", &lib_path), ("VIRTUALENV_OVERRIDE_APP_DATA", &app_data)],
    )?;

    // Its C extensions (wsaccel, twisted, ...) build against the unpacked
    // headers: Python.h in include/python2.7, pyconfig.h under the
    // multiarch folder it includes relative to include/.
    let include = py27.join("usr/include");
    let cflags = format!("-I{} -I{}", include.display(), include.join("python2.7").display());
    run_args(
        dir,
        &venv27.join("bin/pip").to_string_lossy(),
        &["install".into(), "--quiet".into(), AUTOBAHN.into()],
        &[("LD_LIBRARY_PATH", &lib_path), ("CFLAGS", &cflags)],
    )?;
    if !works(install) {
        bail!("wstest was installed but does not run: try {} --autobahnversion", install.wstest().display());
    }
    Ok(())
}

fn run_args(dir: &Path, program: &str, args: &[String], env: &[(&str, &str)]) -> anyhow::Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    measure::run_env(dir, program, &args, env)
}

/// `wstest -m fuzzingclient` against `/ws/echo` of `binary`.
///
/// The server runs with its message limits raised to 32 MiB: the 9.* cases
/// send messages of up to 16 MiB, which the default 64 KiB limit (sized for
/// chat and upload chunks) refuses with 1009 Message Too Big. Everything else
/// is the default configuration.
fn fuzzing_client(binary: &Path, install: &Install, outdir: &Path) -> anyhow::Result<()> {
    let mut command = Command::new(binary);
    command
        .args(["--listen", "127.0.0.1:0", "--log", "error", "--no-rate-limit", "--upload-dir"])
        .arg(install.dir.join("uploads"))
        .env("HUBBUB_WEBSOCKET_MAX_MESSAGE_BYTES", (32 << 20).to_string())
        .env("HUBBUB_WEBSOCKET_MAX_FRAME_BYTES", (32 << 20).to_string())
        .env("HUBBUB_LIMITS_MAX_CONNECTIONS_PER_IP", "0")
        .env("HUBBUB_HTTP_MAX_CONNECTIONS_PER_IP", "0");
    let server = ServerProcess::start(command)?;
    let spec = format!(
        r#"{{"outdir": "{}", "servers": [{{"agent": "{SERVER_AGENT}", "url": "ws://{}/ws/echo"}}], "cases": ["*"], "exclude-cases": [], "exclude-agent-cases": {{}}}}"#,
        outdir.display(),
        server.addr
    );
    let spec_file = install.dir.join("fuzzingclient.json");
    std::fs::write(&spec_file, spec)?;
    eprintln!("xtask autobahn: wstest -m fuzzingclient against ws://{}/ws/echo", server.addr);
    let status = install
        .command()
        .args(["-m", "fuzzingclient", "-s"])
        .arg(&spec_file)
        .current_dir(&install.dir)
        .stdout(Stdio::null())
        .status()
        .context("running wstest")?;
    if !status.success() {
        bail!("wstest -m fuzzingclient failed with {status}");
    }
    drop(server);
    Ok(())
}

/// `wstest -m fuzzingserver`, and our client running every case against it.
fn fuzzing_server(install: &Install, outdir: &Path) -> anyhow::Result<()> {
    // A free port: bind, read it, release it for wstest.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let spec = format!(
        r#"{{"url": "ws://{addr}", "outdir": "{}", "cases": ["*"], "exclude-cases": [], "exclude-agent-cases": {{}}}}"#,
        outdir.display()
    );
    let spec_file = install.dir.join("fuzzingserver.json");
    std::fs::write(&spec_file, spec)?;
    let wstest = install
        .command()
        .args(["-m", "fuzzingserver", "-s"])
        .arg(&spec_file)
        .current_dir(&install.dir)
        .stdout(Stdio::null())
        .spawn()
        .context("starting wstest -m fuzzingserver")?;
    let mut wstest = KillOnDrop(wstest);
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(addr).is_err() {
        if let Some(status) = wstest.0.try_wait()? {
            bail!("wstest -m fuzzingserver exited with {status} before it listened");
        }
        if Instant::now() > deadline {
            bail!("wstest -m fuzzingserver did not listen on {addr} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("xtask autobahn: tokio-tungstenite client against wstest -m fuzzingserver on {addr}");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run_client_cases(addr))
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects as `hubbub-client` does: tokio-tungstenite's default
/// configuration (64 MiB messages, 16 MiB frames) with Nagle off.
async fn open(url: &str) -> anyhow::Result<Ws> {
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(ws)
}

async fn run_client_cases(addr: SocketAddr) -> anyhow::Result<()> {
    let mut ws = open(&format!("ws://{addr}/getCaseCount")).await?;
    let count: usize = loop {
        match ws.next().await.context("no case count")?? {
            Message::Text(text) => break text.trim().parse().context("case count")?,
            Message::Close(_) => bail!("closed before the case count"),
            _ => {}
        }
    };
    let _ = ws.close(None).await;
    eprintln!("xtask autobahn: {count} cases");
    for case in 1..=count {
        let url = format!("ws://{addr}/runCase?case={case}&agent={CLIENT_AGENT}");
        // A case may end the connection any way it likes; only a hang is
        // our failure, and the report judges the rest.
        let echo = async {
            let Ok(mut ws) = open(&url).await else { return };
            while let Some(Ok(msg)) = ws.next().await {
                let reply = match msg {
                    Message::Text(_) | Message::Binary(_) => msg,
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    break;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(120), echo).await.is_err() {
            eprintln!("xtask autobahn: case {case} did not finish within 120 s");
        }
    }
    let mut ws = open(&format!("ws://{addr}/updateReports?agent={CLIENT_AGENT}")).await?;
    while let Some(Ok(msg)) = ws.next().await {
        if msg.is_close() {
            break;
        }
    }
    Ok(())
}

/// The NON-STRICT and UNIMPLEMENTED results `docs/CONFORMANCE.md` accepts:
/// the rows of its table whose first cell is `server`, `client` or `both`,
/// the second a case id or a prefix ending in `*`, and the third the
/// accepted result.
struct Allowed {
    rows: Vec<(String, String, String)>,
}

impl Allowed {
    fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let rows = text
            .lines()
            .filter_map(|line| {
                let cells: Vec<&str> =
                    line.trim().strip_prefix('|')?.split('|').map(|c| c.trim().trim_matches('`')).collect();
                let (side, pattern, result) = (*cells.first()?, *cells.get(1)?, *cells.get(2)?);
                matches!(side, "server" | "client" | "both")
                    .then(|| (side.to_owned(), pattern.to_owned(), result.to_owned()))
            })
            .collect();
        Ok(Self { rows })
    }

    fn accepts(&self, side: &str, case: &str, result: &str) -> bool {
        self.rows.iter().any(|(s, pattern, accepted)| {
            (s == side || s == "both")
                && accepted == result
                && match pattern.strip_suffix('*') {
                    Some(prefix) => case.starts_with(prefix),
                    None => pattern == case,
                }
        })
    }
}

/// Reads `index.json` (through python3, which wstest needs anyway) and
/// returns a line for every case that is neither OK, INFORMATIONAL, nor
/// accepted.
fn check(index: &Path, agent: &str, side: &str, allowed: &Allowed) -> anyhow::Result<Vec<String>> {
    let script = "import json, sys\n\
                  data = json.load(open(sys.argv[1]))[sys.argv[2]]\n\
                  for case, r in data.items():\n    \
                  print('%s\\t%s\\t%s' % (case, r.get('behavior'), r.get('behaviorClose')))\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(index)
        .arg(agent)
        .output()
        .context("running python3 to read index.json")?;
    if !out.status.success() {
        bail!("cannot read {}: {}", index.display(), String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout)?;
    let mut problems = Vec::new();
    let (mut total, mut tally) = (0, std::collections::BTreeMap::<String, usize>::new());
    for line in text.lines() {
        let mut cells = line.split('\t');
        let (Some(case), Some(behavior), Some(close)) = (cells.next(), cells.next(), cells.next()) else {
            continue;
        };
        total += 1;
        *tally.entry(behavior.to_owned()).or_default() += 1;
        for (what, result) in [("behavior", behavior), ("close behavior", close)] {
            if matches!(result, "OK" | "INFORMATIONAL") || allowed.accepts(side, case, result) {
                continue;
            }
            problems.push(format!("{side} case {case}: {what} {result}"));
        }
    }
    if total == 0 {
        bail!("{} has no cases for agent {agent}", index.display());
    }
    let summary: Vec<String> = tally.iter().map(|(k, v)| format!("{v} {k}")).collect();
    eprintln!("xtask autobahn: {side}: {total} cases: {}", summary.join(", "));
    Ok(problems)
}
