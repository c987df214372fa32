//! `hubbub-chat` as a user meets it: the real binary, its stdout and stderr
//! read line by line, against the in-process server. Every wait is for a
//! line, with a timeout.

use std::process::{ExitStatus, Stdio};

use tokio::io::AsyncBufRead;
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use super::*;

/// Which of the process's outputs a line came from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Out {
    Stdout,
    Stderr,
}

/// A running `hubbub-chat` whose output lines are kept as they arrive.
struct Chat {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<(Out, String)>,
    /// Every line read so far, in order of arrival per output.
    seen: Vec<(Out, String)>,
}

impl Chat {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hubbub-chat"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        forward(Out::Stdout, tokio::io::BufReader::new(child.stdout.take().unwrap()), tx.clone());
        forward(Out::Stderr, tokio::io::BufReader::new(child.stderr.take().unwrap()), tx);
        Self { stdin: child.stdin.take(), child, lines, seen: Vec::new() }
    }

    /// Types `line`.
    async fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("input is still open");
        stdin.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        stdin.flush().await.unwrap();
    }

    /// Reads until a line on `out` equals `wanted`.
    async fn expect(&mut self, out: Out, wanted: &str) {
        let found = timeout(WAIT, async {
            loop {
                let Some(line) = self.lines.recv().await else { return false };
                let hit = line.0 == out && line.1 == wanted;
                self.seen.push(line);
                if hit {
                    return true;
                }
            }
        })
        .await;
        assert!(matches!(found, Ok(true)), "no {out:?} line {wanted:?} in time; saw {:#?}", self.seen);
    }

    /// Ends input, waits for the exit, and reads what is left of the output.
    async fn finish(mut self) -> (ExitStatus, Vec<(Out, String)>) {
        drop(self.stdin.take());
        let status = timeout(WAIT, self.child.wait()).await.expect("exits in time").unwrap();
        while let Some(line) = timeout(WAIT, self.lines.recv()).await.expect("output ends") {
            self.seen.push(line);
        }
        (status, self.seen)
    }

    /// What it prints on stderr (status lines and errors, with stdout not a
    /// terminal).
    fn stderr(seen: &[(Out, String)]) -> Vec<&str> {
        seen.iter().filter(|(out, _)| *out == Out::Stderr).map(|(_, line)| line.as_str()).collect()
    }
}

fn forward(
    out: Out,
    reader: impl AsyncBufRead + Unpin + Send + 'static,
    tx: mpsc::UnboundedSender<(Out, String)>,
) {
    tokio::spawn(async move {
        let mut lines = reader.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send((out, line)).is_err() {
                return;
            }
        }
    });
}

/// The position of `line` in `lines`, which must hold it.
fn position(lines: &[&str], line: &str) -> usize {
    lines.iter().position(|l| *l == line).unwrap_or_else(|| panic!("no {line:?} in {lines:#?}"))
}

// ----- item by item -----------------------------------------------------------------

#[tokio::test]
async fn its_own_join_is_said_once_and_connected_comes_first_after_a_reconnect() {
    let server = TestServer::start().await;
    let addr = server.addr;
    let mut chat = Chat::start(&[
        &server.chat_url(),
        "--name",
        "ada",
        "--room",
        "general",
        "--reconnect-attempts",
        "unlimited",
    ]);
    chat.expect(Out::Stderr, "* joined #general (1 here)").await;
    // Someone else's join is still shown.
    let (bob, _bob_events) = member(&server.chat_url(), "bob", "general", fast()).await;
    chat.expect(Out::Stderr, "* bob joined #general").await;

    // The server restarts on the same address; the client restores its
    // session on the new one (bob has gone, so the count is known).
    bob.disconnect().await;
    chat.expect(Out::Stderr, "* bob left").await;
    server.shutdown().await;
    let server = TestServer::on(addr).await;
    chat.expect(Out::Stderr, "* joined #general (1 here)").await;
    let (status, seen) = chat.finish().await;
    assert!(status.success(), "{status:?}");

    let lines = Chat::stderr(&seen);
    let start = ["* connected", "* you are ada", "* joined #general (1 here)", "* bob joined #general"];
    assert_eq!(lines[..4], start, "connected first, the own join once: {lines:#?}");
    let again = position(&lines[4..], "* connected") + 4;
    assert!(lines[4..again].iter().any(|l| l.starts_with("* disconnected (1001")), "{lines:#?}");
    assert_eq!(lines[again + 1], "* joined #general (1 here)", "after connected, the room: {lines:#?}");
    assert!(!lines.iter().any(|l| l.contains("ada joined")), "{lines:#?}");
    assert_eq!(
        lines.iter().filter(|l| **l == "* you are ada").count(),
        1,
        "the name is not news: {lines:#?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn typing_leaves_no_line_in_a_line_mode_client() {
    let server = TestServer::start().await;
    let mut chat = Chat::start(&[&server.chat_url(), "--name", "ada", "--room", "general"]);
    chat.expect(Out::Stderr, "* joined #general (1 here)").await;
    let (webby, _webby_events) = member(&server.chat_url(), "webby", "general", fast()).await;
    chat.expect(Out::Stderr, "* webby joined #general").await;

    for _ in 0..3 {
        webby.send_typing().await.unwrap();
    }
    webby.send_message("typed it").await.unwrap();
    // The room delivers in order: the typing notices came before this.
    chat.expect(Out::Stdout, "webby: typed it").await;
    let (status, seen) = chat.finish().await;
    assert!(status.success(), "{status:?}");
    assert!(!seen.iter().any(|(_, line)| line.contains("typing")), "{seen:#?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_rename_is_announced_both_ways() {
    let server = TestServer::start().await;
    let mut chat = Chat::start(&[&server.chat_url(), "--name", "ada", "--room", "general"]);
    chat.expect(Out::Stderr, "* joined #general (1 here)").await;
    let (bob, mut bob_events) = member(&server.chat_url(), "bob", "general", fast()).await;
    chat.expect(Out::Stderr, "* bob joined #general").await;

    bob.set_username("robert").await.unwrap();
    chat.expect(Out::Stderr, "* bob is now known as robert").await;

    chat.type_line("/nick lovelace").await;
    chat.expect(Out::Stderr, "* you are lovelace").await;
    let renamed = bob_events
        .until("UserRenamed", |e| match e {
            Event::UserRenamed { user, previous, room } => {
                Some((user.clone(), previous.clone(), room.clone()))
            }
            _ => None,
        })
        .await;
    assert_eq!(renamed, ("lovelace".to_owned(), "ada".to_owned(), "general".to_owned()));
    let (status, _) = chat.finish().await;
    assert!(status.success(), "{status:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn an_unknown_command_is_named_and_the_exit_status_is_what_help_says() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_hubbub-chat")).arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for promise in [
        "0  input ended (or /quit) and the server acknowledged every message and",
        "1  a message or upload was refused or not delivered (a line sent while in",
        "Unknown commands and refused /nick, /join, /leave or /ping are reported but do",
    ] {
        assert!(help.contains(promise), "--help says {promise:?}: {help}");
    }
    let server = TestServer::start().await;

    // Mistyped commands and a refused /leave are shown and do not count.
    let mut chat = Chat::start(&[&server.chat_url(), "--name", "ada", "--room", "general"]);
    chat.expect(Out::Stderr, "* joined #general (1 here)").await;
    chat.type_line("/bogus now").await;
    chat.type_line("/join").await;
    chat.type_line("delivered").await;
    chat.type_line("/leave").await;
    chat.type_line("/leave").await;
    chat.type_line("/quit").await;
    let (status, seen) = chat.finish().await;
    let lines = Chat::stderr(&seen);
    assert!(
        lines.iter().any(|l| l.starts_with("* unknown command /bogus; commands: /nick NAME")),
        "{lines:#?}"
    );
    assert!(lines.contains(&"* usage: /join ROOM"), "{lines:#?}");
    assert!(lines.contains(&"* error: not in a room: join one first"), "{lines:#?}");
    assert_eq!(status.code(), Some(0), "everything sent was delivered: {lines:#?}");

    // A line refused before /quit makes it 1, as --help says.
    let mut chat = Chat::start(&[&server.chat_url(), "--name", "ada"]);
    chat.expect(Out::Stderr, "* you are ada").await;
    chat.type_line("nobody hears this").await;
    chat.type_line("/quit").await;
    let (status, seen) = chat.finish().await;
    let lines = Chat::stderr(&seen);
    assert!(lines.contains(&"* not sent (not in a room: join one first): nobody hears this"), "{lines:#?}");
    assert_eq!(status.code(), Some(1), "{lines:#?}");
    server.shutdown().await;
}

#[tokio::test]
async fn file_links_are_absolute_urls_that_work() {
    let server = TestServer::start().await;
    let mut chat = Chat::start(&[&server.chat_url(), "--name", "ada", "--room", "general"]);
    chat.expect(Out::Stderr, "* joined #general (1 here)").await;
    let (bob, _bob_events) = member(&server.chat_url(), "bob", "general", fast()).await;
    chat.expect(Out::Stderr, "* bob joined #general").await;

    bob.send_file(FileUpload::from_bytes("notes.txt", b"shared bytes".to_vec())).await.unwrap();
    let prefix = format!("* bob shared notes.txt (12 bytes): http://{}/files/", server.addr);
    let line = timeout(WAIT, async {
        loop {
            let (out, line) = chat.lines.recv().await.expect("output goes on");
            chat.seen.push((out, line.clone()));
            if line.contains(" shared ") {
                return line;
            }
        }
    })
    .await
    .expect("the shared file in time");
    assert!(line.starts_with(&prefix), "{line:?} starts with {prefix:?}");

    // The link is one a browser or curl can open.
    let path = &line[prefix.len() - "/files/".len()..];
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("shared bytes"), "{response}");
    let _ = chat.finish().await;
    server.shutdown().await;
}

#[tokio::test]
async fn missed_messages_are_shown_under_a_mark_and_history_pages_back() {
    let server = TestServer::start().await;
    let (bob, mut bob_events) = member(&server.chat_url(), "bob", "general", fast()).await;
    say(&bob, &mut bob_events, &["old one", "old two", "old three"]).await;

    let proxy = Proxy::start(server.addr).await;
    let mut chat = Chat::start(&[
        &proxy.url(),
        "--name",
        "ada",
        "--room",
        "general",
        "--reconnect-attempts",
        "unlimited",
    ]);
    chat.expect(Out::Stderr, "* joined #general (2 here)").await;
    say(&bob, &mut bob_events, &["hello"]).await;
    chat.expect(Out::Stdout, "bob: hello").await;

    // Away: the link breaks, the server sees it go, Bob talks meanwhile.
    proxy.cut_and_close();
    server.wait_for_connections(1).await;
    say(&bob, &mut bob_events, &["missed one", "missed two"]).await;
    proxy.rules().closed = false;
    chat.expect(Out::Stderr, "* — while you were away —").await;
    chat.expect(Out::Stdout, "bob: missed two").await;
    say(&bob, &mut bob_events, &["live again"]).await;
    chat.expect(Out::Stdout, "bob: live again").await;

    // Scrollback: before what it has shown, page by page, to the start.
    chat.type_line("/history 2").await;
    chat.expect(Out::Stderr, "* — 2 earlier messages in #general —").await;
    chat.expect(Out::Stdout, "bob: old three").await;
    chat.type_line("/history").await;
    chat.expect(Out::Stderr, "* — the beginning of #general —").await;
    chat.type_line("/history 0").await;
    let (status, seen) = chat.finish().await;
    assert!(status.success(), "{status:?}: {seen:#?}");

    let stdout: Vec<&str> =
        seen.iter().filter(|(out, _)| *out == Out::Stdout).map(|(_, line)| line.as_str()).collect();
    assert_eq!(
        stdout,
        [
            "bob: hello",
            "bob: missed one",
            "bob: missed two",
            "bob: live again",
            "bob: old two",
            "bob: old three",
            "bob: old one"
        ],
        "each message once, in order"
    );
    let stderr = Chat::stderr(&seen);
    assert_eq!(stderr.iter().filter(|l| l.contains("while you were away")).count(), 1, "{stderr:#?}");
    assert!(stderr.contains(&"* — 1 earlier message in #general —"), "{stderr:#?}");
    assert!(stderr.contains(&"* usage: /history [N], N from 1 to 100"), "{stderr:#?}");
    assert!(!stderr.iter().any(|l| l.contains("could not be recovered")), "{stderr:#?}");
    server.shutdown().await;
}

// ----- several servers, and a restarted history --------------------------------------

#[tokio::test]
async fn given_several_urls_it_skips_a_dead_one_and_moves_on_when_its_server_goes() {
    let a = TestServer::start().await;
    let b = TestServer::start().await;
    let dead = closed_port_url().await;
    let mut chat = Chat::start(&[
        &dead,
        &a.chat_url(),
        &b.chat_url(),
        "--name",
        "ada",
        "--room",
        "general",
        "--reconnect-attempts",
        "unlimited",
    ]);
    chat.expect(Out::Stderr, &format!("* connected to {}", a.chat_url())).await;
    chat.expect(Out::Stderr, "* joined #general (1 here)").await;
    let (bob, mut bob_events) = member(&b.chat_url(), "bob", "general", fast()).await;

    // A goes away: the next in the list after it is B, where bob is.
    a.shutdown().await;
    chat.expect(Out::Stderr, &format!("* connected to {}", b.chat_url())).await;
    chat.expect(Out::Stderr, "* joined #general (2 here)").await;
    bob.send_message("hello on b").await.unwrap();
    chat.expect(Out::Stdout, "bob: hello on b").await;
    chat.type_line("hi bob").await;
    bob_events.message("hi bob").await;
    let (status, seen) = chat.finish().await;
    assert!(status.success(), "{status:?}: {seen:#?}");
    b.shutdown().await;
}

/// A chat server played by hand for one session: it greets, takes the name,
/// puts the joiner in `general` at offset 1 of epoch `e1`, sends one
/// message, then `resync`s the room to offset 2 of epoch `e2`, and answers
/// a `history` request with e2's two messages. It sends one more live
/// message when `go_on` is notified, and passes on every client message it
/// reads.
async fn server_that_resyncs(
    go_on: Arc<tokio::sync::Notify>,
) -> (String, mpsc::UnboundedReceiver<ClientMessage>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws/chat", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let message = |text: &str, offset: u64| ServerMessage::ChatMessage {
            user: "bob".into(),
            text: text.into(),
            timestamp: 1_700_000_000_000 + offset,
            client_msg_id: None,
            offset: Some(offset),
        };
        let history = |text: &str, offset: u64| serde_json::json!({"type": "chatMessage", "user": "bob", "text": text, "timestamp": 1, "offset": offset});
        let mut replies = vec![
            ServerMessage::Welcome { message: "hi".into() },
            ServerMessage::Connected { client_id: hubbub_client::Uuid::new_v4() },
        ];
        loop {
            for reply in replies.drain(..) {
                ws.send(Message::text(reply.to_json())).await.unwrap();
            }
            let frame = tokio::select! {
                frame = ws.next() => frame,
                () = go_on.notified() => {
                    replies.push(message("after the restart", 3));
                    continue;
                }
            };
            let msg = match frame {
                Some(Ok(Message::Text(text))) => decode_client(&text),
                // Reading on answers a close.
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return,
            };
            match &msg {
                ClientMessage::SetUsername { username } => {
                    replies.push(ServerMessage::UsernameSet { username: username.clone() });
                }
                ClientMessage::JoinRoom { room, .. } => replies.extend([
                    ServerMessage::UserJoined { user: "ada".into(), room: room.clone(), user_count: 2 },
                    ServerMessage::RoomJoined {
                        room: room.clone(),
                        user_count: 2,
                        epoch: Some("e1".into()),
                        offset: Some(1),
                        recovered: None,
                        missed: None,
                    },
                    message("before the restart", 2),
                    ServerMessage::Resync { room: room.clone(), epoch: "e2".into(), offset: 2 },
                ]),
                ClientMessage::History { .. } => replies.push(ServerMessage::History {
                    room: "general".into(),
                    epoch: "e2".into(),
                    messages: vec![history("one of e2", 1), history("two of e2", 2)],
                    has_more: false,
                }),
                ClientMessage::Ping { timestamp } => {
                    replies.push(ServerMessage::Pong { timestamp: timestamp.clone(), server_time: 0 });
                }
                _ => {}
            }
            let _ = tx.send(msg);
        }
    });
    (url, rx)
}

#[tokio::test]
async fn a_resync_says_the_history_restarted_and_shows_the_room_again() {
    let go_on = Arc::new(tokio::sync::Notify::new());
    let (url, mut received) = server_that_resyncs(go_on.clone()).await;
    let mut chat = Chat::start(&[&url, "--name", "ada", "--room", "general"]);
    // Stdout and stderr are read apart, so only the order within each is known.
    chat.expect(Out::Stdout, "bob: two of e2").await;
    go_on.notify_one();
    chat.expect(Out::Stdout, "bob: after the restart").await;
    let (status, seen) = chat.finish().await;
    assert!(status.success(), "{status:?}: {seen:#?}");

    let stdout: Vec<&str> =
        seen.iter().filter(|(out, _)| *out == Out::Stdout).map(|(_, line)| line.as_str()).collect();
    assert_eq!(
        stdout,
        ["bob: before the restart", "bob: one of e2", "bob: two of e2", "bob: after the restart"],
        "the room as it is after the restart, then live"
    );
    let stderr = Chat::stderr(&seen);
    let restarted = position(&stderr, "* — history restarted —");
    let page = position(&stderr, "* — 2 earlier messages in #general —");
    assert!(restarted < page, "{stderr:#?}");
    assert!(stderr.contains(&"* — the beginning of #general —"), "{stderr:#?}");
    // The page asked for is the one up to the new position.
    let mut asked = Vec::new();
    while let Ok(msg) = received.try_recv() {
        if let ClientMessage::History { before, limit } = msg {
            asked.push((before, limit));
        }
    }
    assert_eq!(asked, [(Some(3), Some(20))]);
}

// ----- errors: one line, each cause once --------------------------------------------

/// Runs `hubbub-chat` to its end with no input; its exit code and stderr.
async fn run_to_error(args: &[&str]) -> (Option<i32>, String) {
    let output = timeout(
        WAIT,
        Command::new(env!("CARGO_BIN_EXE_hubbub-chat")).args(args).stdin(Stdio::null()).output(),
    )
    .await
    .expect("exits in time")
    .unwrap();
    (output.status.code(), String::from_utf8(output.stderr).unwrap())
}

#[tokio::test]
async fn a_refused_connection_is_one_line_that_says_each_thing_once() {
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let url = format!("ws://127.0.0.1:{port}/ws/chat");
    let (code, stderr) = run_to_error(&[&url, "--name", "ada"]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr,
        format!("hubbub-chat: could not connect to {url}: Connection refused (os error 111)\n")
    );
}

#[tokio::test]
async fn a_url_that_is_not_a_websocket_url_is_refused_with_the_fix() {
    for (url, fix) in [
        ("127.0.0.1:8080/ws/chat", "use ws://127.0.0.1:8080/ws/chat"),
        ("http://127.0.0.1:8080/ws/chat", "use ws://127.0.0.1:8080/ws/chat"),
        ("https://chat.example.com/ws/chat", "use wss://chat.example.com/ws/chat"),
    ] {
        let (code, stderr) = run_to_error(&[url, "--name", "ada"]).await;
        assert_eq!(code, Some(2), "a usage error: {stderr}");
        assert_eq!(stderr.matches(fix).count(), 1, "{stderr}");
        assert!(!stderr.contains("scheme not supported"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_certificate_served_as_the_server_certificate_is_explained() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let dir = std::env::temp_dir().join(format!("hubbub-chat-tls-{}", uuid()));
    std::fs::create_dir_all(&dir).unwrap();
    // What `openssl req -x509 -nodes …` makes: self-signed, CA:TRUE.
    let mut ca_params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("ca.key"), ca_key.serialize_pem()).unwrap();
    // What the README says to make instead: a leaf signed by that CA.
    let leaf_key = KeyPair::generate().unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf =
        CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
    std::fs::write(dir.join("leaf.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("leaf.key"), leaf_key.serialize_pem()).unwrap();

    let tls_server = |cert: &str, key: &str| {
        let mut config = TestServer::config();
        config.tls = Some(hubbub_server::TlsSettings {
            cert: dir.join(cert),
            key: dir.join(key),
            handshake_timeout: Duration::from_secs(5),
            max_pending_handshakes: 64,
        });
        async move {
            let server = TestServer::with(config).await;
            (format!("wss://localhost:{}/ws/chat", server.addr.port()), server)
        }
    };
    let ca_file = dir.join("ca.pem").display().to_string();

    let (url, server) = tls_server("ca.pem", "ca.key").await;
    let (code, stderr) = run_to_error(&[&url, "--name", "ada", "--ca-file", &ca_file]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "hubbub-chat: could not connect to {url}: the server's certificate is a CA certificate"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("leaf certificate signed by that CA") && stderr.contains("--ca-file"),
        "{stderr}"
    );
    assert!(!stderr.contains("CaUsedAsEndEntity"), "{stderr}");
    server.shutdown().await;

    // The advice works; without the CA the leaf is refused, with a hint.
    let (url, server) = tls_server("leaf.pem", "leaf.key").await;
    let (code, stderr) = run_to_error(&[&url, "--name", "ada"]).await;
    assert_eq!(code, Some(1), "{stderr}");
    let unknown = "the server's certificate is not signed by a trusted authority: pass the CA that signed it with --ca-file";
    assert!(stderr.contains(unknown), "{stderr}");
    let mut chat = Chat::start(&[&url, "--name", "ada", "--room", "tls", "--ca-file", &ca_file]);
    chat.expect(Out::Stderr, "* joined #tls (1 here)").await;
    let (status, _) = chat.finish().await;
    assert!(status.success(), "{status:?}");
    server.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}
