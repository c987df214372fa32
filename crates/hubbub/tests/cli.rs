//! Process tests of the `hubbub` binary: where its logs and banner go, what
//! the banner lists, `--print-config` loading back, and configuration errors
//! in one line. Every server listens on `127.0.0.1:0`; every wait is for a
//! line or an exit, with a timeout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long any expected line or exit may take.
const WAIT: Duration = Duration::from_secs(20);

mod abuse;
mod chat;
mod cluster;
mod history;

/// A fresh directory for one test, under cargo's scratch space.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `hubbub` with none of the caller's `HUBBUB_*` or `NO_COLOR` variables,
/// working in `dir` (where its upload directory goes).
fn hubbub(dir: &Path) -> Command {
    isolated(Command::new(env!("CARGO_BIN_EXE_hubbub")), dir)
}

/// `command` without the caller's `HUBBUB_*` or `NO_COLOR` variables,
/// working in `dir`.
fn isolated(mut command: Command, dir: &Path) -> Command {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("HUBBUB_") || name == "NO_COLOR" {
            command.env_remove(name);
        }
    }
    command.current_dir(dir).stdin(Stdio::null());
    command
}

/// Runs a `hubbub` that is expected to exit by itself, within [`WAIT`]
/// (else it is killed and the test fails).
fn run_to_exit(mut command: Command) -> Output {
    let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id().to_string();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            panic!("hubbub did not exit in time");
        }
    }
}

/// A running server whose output is read line by line on threads.
struct Running {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

/// Sends each line of `stream` down a channel until it closes.
fn lines(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Running {
    fn start(mut command: Command) -> Self {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        Self { child, stdout, stderr }
    }

    /// The lines of `rx` up to and including the first that `done` accepts.
    fn until(rx: &mpsc::Receiver<String>, done: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let last = done(&line);
                    seen.push(line);
                    if last {
                        return seen;
                    }
                }
                Err(err) => panic!("no such line ({err}); saw {seen:#?}"),
            }
        }
    }

    /// Sends SIGTERM and returns what stdout and stderr carried after the
    /// lines already read, once the process has exited with success.
    fn stop(self) -> (Vec<String>, Vec<String>) {
        let (status, stdout, stderr) = self.terminate();
        assert!(status.success(), "{status}");
        (stdout, stderr)
    }

    /// Sends SIGTERM and returns the exit status and what stdout and stderr
    /// carried after the lines already read.
    fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>, Vec<String>) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let (tx, rx) = mpsc::channel();
        let mut child = self.child;
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = rx.recv_timeout(WAIT).expect("hubbub did not stop on SIGTERM").unwrap();
        // The pipes close at exit, so these end.
        let rest = |rx: &mut mpsc::Receiver<String>| {
            let deadline = Instant::now() + WAIT;
            let mut out = Vec::new();
            while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                out.push(line);
            }
            out
        };
        (status, rest(&mut self.stdout), rest(&mut self.stderr))
    }
}

/// The port of a banner's first line, `Hubbub X listening on 127.0.0.1:PORT`.
fn banner_port(banner: &[String]) -> u16 {
    let first = &banner[0];
    let addr = first.rsplit(' ').next().unwrap();
    addr.parse::<std::net::SocketAddr>().unwrap_or_else(|_| panic!("{first}")).port()
}

/// Fetches `path` over plain HTTP/1.0 and returns the status line.
fn http_status(port: u16, path: &str) -> String {
    use std::io::Write as _;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn logs_go_to_stderr_uncoloured_and_the_banner_to_stdout() {
    let dir = scratch("logs");
    let mut command = hubbub(&dir);
    command.args(["--listen", "127.0.0.1:0"]);
    let server = Running::start(command);

    let banner = Running::until(&server.stdout, |line| line.contains("/metrics"));
    let port = banner_port(&banner);
    let started = Running::until(&server.stderr, |line| line.contains("listening"));
    let text = banner.join("\n");
    let base = format!("http://127.0.0.1:{port}");
    for url in [
        format!("{base}/health"),
        format!("{base}/api/status"),
        format!("{base}/api/rooms"),
        format!("{base}/metrics"),
        format!("ws://127.0.0.1:{port}/ws/chat"),
    ] {
        assert!(text.contains(&url), "{url} missing from the banner:\n{text}");
    }
    // What the banner lists is served.
    assert!(http_status(port, "/api/rooms").contains(" 200 "));
    assert!(http_status(port, "/metrics").contains(" 200 "));

    let (stdout, stderr) = server.stop();
    let stderr: Vec<String> = started.into_iter().chain(stderr).collect();
    assert!(stderr.iter().any(|line| line.contains("stopped")), "{stderr:#?}");
    for line in &stderr {
        assert!(!line.contains('\x1b'), "a colour code in a log line written to a pipe: {line:?}");
    }
    assert!(
        stdout.iter().chain(&banner).all(|line| !line.contains("INFO")),
        "log lines on stdout: {stdout:#?}"
    );
}

/// Every line a connection logs is in its `conn` span: the id the client
/// was sent, its address, the endpoint and, once set, the user; in the text
/// format and in JSON (`span`, `spans`), as when each connection held the
/// span for its whole life. (The binary opens the span per event.)
#[test]
fn a_connections_log_lines_carry_its_id_address_endpoint_and_user() {
    for format in ["text", "json"] {
        let dir = scratch(&format!("conn-logs-{format}"));
        let mut command = hubbub(&dir);
        command.args(["--listen", "127.0.0.1:0", "--log-format", format]);
        let server = Running::start(command);
        let port = banner_port(&Running::until(&server.stdout, |line| line.contains("/metrics")));

        let mut chat = chat::Chat::open(port, "/ws/chat");
        assert_eq!(chat.recv()["type"], "welcome");
        let connected = chat.recv();
        let client = connected["clientId"].as_str().unwrap().to_owned();
        chat.send(&serde_json::json!({"type": "setUsername", "username": "ada"}));
        chat.recv_type("usernameSet");
        drop(chat);
        let seen = Running::until(&server.stderr, |line| line.contains("disconnected"));
        server.stop();

        let line = |message: &str| {
            let quoted = format!("\"{message}\"");
            seen.iter()
                .find(|line| line.contains(&format!(": {message}")) || line.contains(&quoted))
                .unwrap_or_else(|| panic!("no {message} line in {seen:#?}"))
                .clone()
        };
        let (connected, disconnected) = (line("connected"), line("disconnected"));
        if format == "text" {
            let span = format!("conn{{client={client} peer=127.0.0.1 endpoint=\"chat\"");
            assert!(connected.contains(&format!("{span}}}: hubbub_server::conn: connected")), "{connected}");
            assert!(
                disconnected.contains(&format!("{span} user=\"ada\"}}: hubbub_server::conn: disconnected")),
                "{disconnected}"
            );
        } else {
            let span = |line: &str| {
                let line: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(line["spans"], serde_json::json!([line["span"]]), "{line}");
                line["span"].clone()
            };
            let mut expected = serde_json::json!({"name": "conn", "client": client, "peer": "127.0.0.1", "endpoint": "chat"});
            assert_eq!(span(&connected), expected);
            expected["user"] = "ada".into();
            assert_eq!(span(&disconnected), expected);
        }
    }
}

/// At `--log warn` too, a connection's warning is in its `conn` span (a
/// span held per connection would be at `info`, and off).
#[test]
fn at_warn_a_connections_warning_carries_its_span() {
    let dir = scratch("conn-logs-warn");
    let mut command = hubbub(&dir);
    command.args(["--listen", "127.0.0.1:0", "--log", "warn"]).env("HUBBUB_RATE_LIMIT_FLOOD_STRIKES", "1");
    let server = Running::start(command);
    let port = banner_port(&Running::until(&server.stdout, |line| line.contains("/metrics")));

    let mut chat = chat::Chat::open(port, "/ws/chat");
    assert_eq!(chat.recv()["type"], "welcome");
    let client = chat.recv()["clientId"].as_str().unwrap().to_owned();
    // Past `control_burst` (40) pings, one refusal is a strike, and one
    // strike (as configured) closes the connection for flooding.
    for timestamp in 0..60 {
        if chat.try_send(&serde_json::json!({"type": "ping", "timestamp": timestamp})).is_err() {
            break;
        }
    }
    let seen = Running::until(&server.stderr, |line| line.contains("keeps flooding"));
    server.stop();
    let line = seen.last().unwrap();
    let span =
        format!("WARN conn{{client={client} peer=127.0.0.1 endpoint=\"chat\"}}: hubbub_server::ratelimit: ");
    assert!(line.contains(&span), "{line}");
}

/// On a terminal (util-linux `script` gives the server one) log lines are
/// coloured, unless `NO_COLOR` is set.
#[test]
fn logs_on_a_terminal_are_coloured_unless_no_color_is_set() {
    let dir = scratch("terminal");
    for (no_color, coloured) in [(None, true), (Some("1"), false), (Some(""), true)] {
        let server = format!("exec '{}' --listen 127.0.0.1:0", env!("CARGO_BIN_EXE_hubbub"));
        let mut command = isolated(Command::new("script"), &dir);
        command.args(["-qec", &server, "/dev/null"]);
        if let Some(value) = no_color {
            command.env("NO_COLOR", value);
        }
        let server = Running::start(command);
        let seen =
            Running::until(&server.stdout, |line| line.contains("listening") && line.contains("addr="));
        let log = seen.last().unwrap();
        assert_eq!(log.contains('\x1b'), coloured, "NO_COLOR={no_color:?}: {log:?}");
        // script passes SIGTERM on to the server.
        server.terminate();
    }
}

#[test]
fn the_banner_shows_metrics_where_they_are() {
    let dir = scratch("metrics");
    let mut command = hubbub(&dir);
    command.args(["--listen", "127.0.0.1:0"]).env("HUBBUB_METRICS_ENABLED", "false");
    let server = Running::start(command);
    let banner = Running::until(&server.stdout, |line| line.contains("metrics"));
    let port = banner_port(&banner);
    assert!(banner.last().unwrap().contains("off"), "{banner:#?}");
    assert!(http_status(port, "/metrics").contains(" 404 "));
    server.stop();

    let mut command = hubbub(&dir);
    command.args(["--listen", "127.0.0.1:0", "--no-echo"]).env("HUBBUB_METRICS_LISTEN", "127.0.0.1:0");
    let server = Running::start(command);
    let banner = Running::until(&server.stdout, |line| line.contains("metrics"));
    let text = banner.join("\n");
    assert!(text.contains("metrics        http://127.0.0.1:PORT/metrics  (metrics.listen"), "{text}");
    assert!(!text.contains("/ws/echo"), "{text}");
    assert!(http_status(banner_port(&banner), "/metrics").contains(" 404 "));
    server.stop();
}

#[test]
fn print_config_loads_back_to_the_same_configuration() {
    let dir = scratch("print-config");
    let mut command = hubbub(&dir);
    command
        .args(["--print-config", "--listen", "127.0.0.1:7001", "--heartbeat-interval", "1500ms"])
        .args(["--tls-cert", "cert.pem", "--tls-key", "key.pem"])
        .env("HUBBUB_PROTOCOL_MAX_TEXT_CHARS", "100")
        .env("HUBBUB_TRUSTED_PROXIES", "[10.0.0.0/8]")
        .env("HUBBUB_RATE_LIMIT_CHAT_PER_SEC", "2.5");
    let first = run_to_exit(command);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let first = String::from_utf8(first.stdout).unwrap();
    assert!(first.contains("\n[tls]\n"), "{first}");
    assert!(first.contains("\ncert = \"cert.pem\"\n"), "{first}");
    assert!(first.contains("\n#listen = \"127.0.0.1:9090\"\n"), "unset metrics.listen: {first}");
    std::fs::write(dir.join("printed.toml"), &first).unwrap();

    let mut command = hubbub(&dir);
    command.args(["--config", "printed.toml", "--print-config"]);
    let second = run_to_exit(command);
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    assert_eq!(String::from_utf8(second.stdout).unwrap(), first);

    // The defaults' printout, with [tls] commented out, loads too, and the
    // server runs on it.
    let defaults = run_to_exit({
        let mut command = hubbub(&dir);
        command.arg("--print-config");
        command
    });
    let defaults = String::from_utf8(defaults.stdout).unwrap();
    assert!(defaults.contains("\n#[tls]\n"), "{defaults}");
    std::fs::write(dir.join("defaults.toml"), &defaults).unwrap();
    let mut command = hubbub(&dir);
    command.args(["--config", "defaults.toml", "--listen", "127.0.0.1:0"]);
    let server = Running::start(command);
    Running::until(&server.stdout, |line| line.contains("listening on 127.0.0.1:"));
    server.stop();
}

/// Runs `hubbub` expecting a configuration error and returns stderr, which
/// must be one line.
fn config_error(dir: &Path, setup: impl FnOnce(&mut Command)) -> String {
    let mut command = hubbub(dir);
    setup(&mut command);
    let output = run_to_exit(command);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "{}", String::from_utf8_lossy(&output.stdout));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(!stderr.contains("default.") && !stderr.contains("``"), "figment's words: {stderr}");
    stderr
}

#[test]
fn configuration_errors_name_the_key_as_written_its_value_and_what_is_allowed() {
    let dir = scratch("errors");
    std::fs::write(dir.join("typo.toml"), "[heartbeat]\nintervall = \"10s\"\n").unwrap();
    let err = config_error(&dir, |c| {
        c.args(["--config", "typo.toml"]);
    });
    assert!(err.contains("heartbeat.intervall = \"10s\" in typo.toml"), "{err}");
    assert!(err.contains("did you mean heartbeat.interval?"), "{err}");
    assert!(err.contains("[heartbeat] has: interval, timeout"), "{err}");

    let err = config_error(&dir, |c| {
        c.env("HUBBUB_WEBSOCKET_OUTBOUND_QUEUE", "-5");
    });
    assert!(err.contains("HUBBUB_WEBSOCKET_OUTBOUND_QUEUE=-5: expected a whole number, 0 or more"), "{err}");

    std::fs::write(dir.join("listen.toml"), "listen = \"nonsense\"\n").unwrap();
    let err = config_error(&dir, |c| {
        c.args(["--config", "listen.toml"]);
    });
    assert!(err.contains("listen = \"nonsense\" in listen.toml"), "{err}");
    assert!(err.contains("such as 0.0.0.0:8080"), "{err}");

    let err = config_error(&dir, |c| {
        c.args(["--heartbeat-interval", "0s"]);
    });
    assert!(err.contains("--heartbeat-interval 0s: heartbeat.interval must be greater than zero"), "{err}");

    let err = config_error(&dir, |c| {
        c.env("HUBBUB_HEARTBEAT_TIMEOUT", "5x");
    });
    assert!(err.contains("HUBBUB_HEARTBEAT_TIMEOUT=5x: unknown time unit"), "{err}");

    // An address in use, for the main port and for metrics.listen.
    let hold = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = hold.local_addr().unwrap();
    let err = config_error(&dir, |c| {
        c.env("HUBBUB_LISTEN", taken.to_string());
    });
    assert!(err.contains(&format!("cannot listen on HUBBUB_LISTEN={taken}: ")), "{err}");
    let err = config_error(&dir, |c| {
        c.args(["--listen", "127.0.0.1:0"]).env("HUBBUB_METRICS_LISTEN", taken.to_string());
    });
    assert!(err.contains(&format!("cannot listen on HUBBUB_METRICS_LISTEN={taken}: ")), "{err}");
    drop(hold);

    let err = config_error(&dir, |c| {
        c.args(["--log", "hubbub=verbose"]);
    });
    assert!(err.contains("--log hubbub=verbose: "), "{err}");
    assert_eq!(err.matches("expected one of").count(), 1, "said twice: {err}");
    let err = config_error(&dir, |c| {
        c.env("HUBBUB_LOG", "hubbub=verbose");
    });
    assert!(err.contains("HUBBUB_LOG=hubbub=verbose: "), "{err}");
}
