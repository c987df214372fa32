//! Process tests of what a hostile client can no longer do (issue 14) where
//! it shows only from outside the process: the server's memory under a
//! flood of stalled echo connections, and text log lines a client tries to
//! forge.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::{Running, WAIT, banner_port, hubbub, scratch};

/// The server's resident memory, in KiB, from `/proc`.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Opens a WebSocket on `path` by hand and returns the stream after the
/// `101` response head (read byte by byte, so no frame is consumed).
pub(super) fn upgrade(port: u16, path: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0_u8; 1];
        tcp.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    tcp
}

/// A masked binary frame (all-zero key) of `len` bytes.
fn binary_frame(len: usize) -> Vec<u8> {
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(len as u64).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.resize(frame.len() + len, 7);
    frame
}

/// Waits until `/api/status` reports `connections` open WebSockets.
fn wait_for_connections(port: u16, connections: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        write!(tcp, "GET /api/status HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
        let mut response = String::new();
        let _ = tcp.read_to_string(&mut response);
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        let status: serde_json::Value = serde_json::from_str(body).unwrap();
        if status["connections"] == connections {
            return;
        }
        assert!(Instant::now() < deadline, "connections never reached {connections}: {status}");
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

// Finding 1: 20 echo connections that each send 500 frames of 64 KiB and
// never read took the server from 7 MiB to 573 MiB. Now each connection's
// queue holds at most 256 KiB and reading stops while half of it waits.
#[test]
fn stalled_echo_connections_cannot_grow_the_server_and_it_shrinks_back() {
    let dir = scratch("stalled-echo");
    let mut command = hubbub(&dir);
    // The queue's bound is what is tested, not the rate limits.
    command.args(["--listen", "127.0.0.1:0", "--no-rate-limit"]);
    let server = Running::start(command);
    let banner = Running::until(&server.stdout, |l| l.contains("/api/status"));
    let port = banner_port(&banner);
    let pid = server.child.id();
    wait_for_connections(port, 0);
    let baseline = rss_kib(pid);

    const CONNECTIONS: usize = 20;
    let frame = binary_frame(64 << 10);
    let writers: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let mut tcp = upgrade(port, "/ws/echo");
            let frame = frame.clone();
            std::thread::spawn(move || {
                // Writes until the server stops reading (a write stalls), or
                // all 500 frames (32 MiB) are sent.
                tcp.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut sent = 0;
                while sent < 500 && tcp.write_all(&frame).is_ok() {
                    sent += 1;
                }
                (tcp, sent)
            })
        })
        .collect();
    let stalled: Vec<(TcpStream, usize)> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let peak = rss_kib(pid);
    let sent: usize = stalled.iter().map(|(_, sent)| sent).sum();
    // The kernel's socket buffers hold some frames; the server's queues
    // and read buffers the rest: a few MiB, not hundreds.
    assert!(
        peak < baseline + 64 * 1024,
        "RSS grew from {baseline} KiB to {peak} KiB with {CONNECTIONS} stalled connections ({sent} frames sent)"
    );
    drop(stalled);
    wait_for_connections(port, 0);
    let after = rss_kib(pid);
    assert!(
        after < baseline + 32 * 1024,
        "RSS stayed at {after} KiB after the attack (baseline {baseline} KiB)"
    );
    eprintln!("RSS baseline {baseline} KiB, during {peak} KiB, after {after} KiB; {sent} frames sent");
    let (_, _) = server.stop();
}

// Finding 6: a client-supplied string in a text log line is escaped: a
// token whose header names an algorithm with a newline and a terminal
// escape cannot start a line of its own or drive the reader's terminal.
#[test]
fn client_strings_in_text_logs_are_escaped() {
    let dir = scratch("log-injection");
    let mut command = hubbub(&dir);
    command.args(["--listen", "127.0.0.1:0"]).env("HUBBUB_AUTH_SECRET", "0123456789abcdef0123456789abcdef");
    let server = Running::start(command);
    let banner = Running::until(&server.stdout, |l| l.contains("/api/status"));
    let port = banner_port(&banner);
    // `{"alg":"X\n<fake line>\u001b[2J"}`, base64url without padding.
    let header = r#"{"alg":"X\n<fake line>\u001b[2J"}"#;
    let token = format!("{}.e30.c2ln", base64url(header.as_bytes()));
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        tcp,
        "GET /ws/chat?token={token} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    let _ = tcp.read_to_end(&mut response);
    assert!(response.starts_with(b"HTTP/1.1 401"), "{}", String::from_utf8_lossy(&response));
    let seen = Running::until(&server.stderr, |l| l.contains("upgrade refused"));
    let refused = seen.last().unwrap();
    assert!(refused.contains(r"X\n<fake line>\u{1b}[2J"), "{refused}");
    let (_, rest) = server.stop();
    for line in seen.iter().chain(&rest) {
        assert!(!line.starts_with("<fake line>"), "a forged line: {line}");
        assert!(!line.contains('\u{1b}'), "a terminal escape reached the log: {line:?}");
    }
}

/// Base64url without padding (RFC 4648 §5), as JWTs use.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0_u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// `hubbub` run by a shell that first lowers its descriptor limit to
/// `nofile`, with `args`.
fn hubbub_with_nofile(dir: &std::path::Path, nofile: u32, args: &[&str]) -> std::process::Command {
    let plain = hubbub(dir);
    let mut command = std::process::Command::new("sh");
    command.arg("-c").arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\"")).arg(plain.get_program());
    command.args(args).current_dir(dir).stdin(std::process::Stdio::null());
    for (name, value) in plain.get_envs() {
        match value {
            Some(value) => command.env(name, value),
            None => command.env_remove(name),
        };
    }
    command
}

/// `count` TCP connections to `port` from the loopback address `from`
/// (the standard library cannot bind before connecting, so tokio's socket
/// does it), each of which sends nothing. Connections the server closed at
/// once are in the list too: reading them gives the end of the stream.
fn silent_from(from: &str, port: u16, count: usize) -> Vec<std::net::TcpStream> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    let from: std::net::IpAddr = from.parse().unwrap();
    (0..count)
        .filter_map(|_| {
            runtime.block_on(async {
                let socket = tokio::net::TcpSocket::new_v4().ok()?;
                socket.bind(std::net::SocketAddr::new(from, 0)).ok()?;
                let stream = socket.connect(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await.ok()?;
                let stream = stream.into_std().ok()?;
                stream.set_nonblocking(false).ok()?;
                Some(stream)
            })
        })
        .collect()
}

/// The value of one metric line, e.g. `hubbub_accept_errors_total`.
fn metric(port: u16, name: &str) -> f64 {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    write!(tcp, "GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    let _ = tcp.read_to_string(&mut response);
    let line = response.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

// Finding 2: connections that never send a byte from a few addresses took
// every descriptor; /health and upgrades then timed out. Now each address
// holds at most `http.max_connections_per_ip` until the header timeout, so
// the server goes on serving; and where descriptors do run out, failed
// accepts are logged at most once a second and counted.
#[test]
fn a_silent_connection_flood_leaves_the_server_serving_and_descriptor_exhaustion_is_logged_once_a_second() {
    let dir = scratch("silent-flood");
    // 3 addresses × 200 silent connections against 256 descriptors: without
    // the per-address cap (64) they would take them all.
    let server = Running::start(hubbub_with_nofile(&dir, 256, &["--listen", "127.0.0.1:0"]));
    let banner = Running::until(&server.stdout, |l| l.contains("/api/status"));
    let port = banner_port(&banner);
    let flood: Vec<_> =
        ["127.0.0.2", "127.0.0.3", "127.0.0.4"].iter().flat_map(|a| silent_from(a, port, 200)).collect();
    assert_eq!(super::http_status(port, "/health"), "HTTP/1.0 200 OK");
    let _chat = upgrade(port, "/ws/chat");
    assert!(metric(port, "hubbub_connections_refused_total{reason=\"address_full\"}") >= 3.0 * 136.0);
    assert_eq!(metric(port, "hubbub_accept_errors_total"), 0.0);
    drop(flood);
    let _ = server.stop();

    // With 48 descriptors the per-address cap is no help: accepts fail.
    let dir = scratch("descriptor-exhaustion");
    let server = Running::start(hubbub_with_nofile(&dir, 48, &["--listen", "127.0.0.1:0"]));
    let banner = Running::until(&server.stdout, |l| l.contains("/api/status"));
    let port = banner_port(&banner);
    let flood: Vec<_> = ["127.0.0.2", "127.0.0.3"].iter().flat_map(|a| silent_from(a, port, 40)).collect();
    // Wait for the first logged failure, then let the flood go: the header
    // timeout is not needed, closing them frees the descriptors.
    let seen = Running::until(&server.stderr, |l| l.contains("accept failed"));
    let started = Instant::now();
    drop(flood);
    // Served again once descriptors are free.
    let deadline = Instant::now() + WAIT;
    while super::http_status(port, "/health") != "HTTP/1.0 200 OK" {
        assert!(Instant::now() < deadline, "never served again");
        std::thread::park_timeout(Duration::from_millis(50));
    }
    let errors = metric(port, "hubbub_accept_errors_total");
    let elapsed = started.elapsed().as_secs_f64();
    let (_, rest) = server.stop();
    let logged = seen.iter().chain(&rest).filter(|l| l.contains("accept failed")).count();
    assert!(errors >= 1.0, "accept errors not counted");
    // At most one line a second (plus the first), however many failures.
    assert!((logged as f64) <= elapsed + 2.0, "{logged} lines in {elapsed:.1} s for {errors} failed accepts");
}
