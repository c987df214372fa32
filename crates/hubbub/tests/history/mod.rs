//! Room history across a crash of the real binary: a server killed with
//! SIGKILL and started again on the same data directory loses no
//! acknowledged message, keeps its epoch and continues the offsets.

use std::process::Command;

use serde_json::json;

use super::chat::Chat;
use super::{Running, banner_port, hubbub, scratch};

/// Starts `hubbub` in `dir` and returns it with its port.
fn start(dir: &std::path::Path) -> (Running, u16) {
    let mut command = hubbub(dir);
    command.args(["--listen", "127.0.0.1:0"]);
    let server = Running::start(command);
    let banner = Running::until(&server.stdout, |l| l.contains("/api/status"));
    let port = banner_port(&banner);
    (server, port)
}

#[test]
fn a_server_killed_with_sigkill_keeps_every_acknowledged_message() {
    let dir = scratch("history-sigkill");
    let (server, port) = start(&dir);
    let mut ada = Chat::connect(port);
    ada.send(&json!({"type": "setUsername", "username": "ada"}));
    ada.recv_type("usernameSet");
    ada.send(&json!({"type": "joinRoom", "room": "r"}));
    let epoch = ada.recv_type("roomJoined")["epoch"].as_str().unwrap().to_owned();
    let mut acked = Vec::new();
    for i in 0..40 {
        ada.send(&json!({"type": "chatMessage", "text": format!("m{i}"), "clientMsgId": uuid_v4(i)}));
        let ack = ada.recv_type("messageAck");
        acked.push((ack["offset"].as_u64().unwrap(), format!("m{i}")));
    }
    // No shutdown: the process is killed.
    let status = Command::new("kill").args(["-KILL", &server.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut child = server.child;
    child.wait().unwrap();
    drop(ada);

    let (server, port) = start(&dir);
    let mut bob = Chat::connect(port);
    bob.send(&json!({"type": "joinRoom", "room": "r", "since": {"epoch": epoch, "offset": 0}}));
    let joined = bob.recv_type("roomJoined");
    assert_eq!(
        (&joined["epoch"], &joined["recovered"], &joined["missed"]),
        (&json!(epoch), &json!(true), &json!(40))
    );
    let recovered: Vec<(u64, String)> = (0..40)
        .map(|_| {
            let msg = bob.recv_type("chatMessage");
            (msg["offset"].as_u64().unwrap(), msg["text"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(recovered, acked, "every acknowledged message, with its offset, in order");
    // Offsets continue after the crash.
    bob.send(&json!({"type": "chatMessage", "text": "after", "clientMsgId": uuid_v4(99)}));
    assert_eq!(bob.recv_type("messageAck")["offset"], 41);
    let _ = server.stop();
}

/// A fixed, valid v4-shaped UUID per `n`.
fn uuid_v4(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

#[test]
fn a_history_file_that_cannot_be_opened_stops_the_server_naming_it() {
    let dir = scratch("history-damaged");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/history.redb"), b"not a database").unwrap();
    let mut command = hubbub(&dir);
    command.args(["--listen", "127.0.0.1:0"]);
    let output = super::run_to_exit(command);
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("./data/history.redb") && lines[0].contains("move it aside"), "{stderr}");
    // The file is left as it was.
    assert_eq!(std::fs::read(dir.join("data/history.redb")).unwrap(), b"not a database");
    assert!(output.stdout.is_empty(), "the port never opened");
}
