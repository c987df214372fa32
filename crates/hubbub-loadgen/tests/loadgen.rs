//! The `hubbub-loadgen` binary against an in-process `hubbub-server` on
//! 127.0.0.1:0: a one-second load of 20 clients, and a refused address.

mod common;

use std::process::{Command, Output};

use common::TestServer;
use serde_json::Value;

fn loadgen<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hubbub-loadgen")).args(args).output().expect("running hubbub-loadgen")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_load_delivers_everything_and_reports_json() {
    let server = TestServer::start("binary", |_| {}).await;
    let addr = server.addr;

    // The server runs in this process, so its pid is ours.
    let pid = std::process::id();
    let args = format!(
        "--addr {addr} --clients 20 --rooms 2 --senders 4 --window 4 --seconds 1 \
         --server-pid {pid} --setup-timeout 20 --json"
    );
    let args: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
    let out = tokio::task::spawn_blocking(move || loadgen(&args)).await.unwrap();
    server.stop().await;

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "hubbub-loadgen failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(report["clients"], 20, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert!(report["sent"].as_u64().unwrap() > 0, "{report}");
    assert!(report["expected"].as_u64().unwrap() >= report["sent"].as_u64().unwrap() * 9, "{report}");
    assert_eq!(report["delivered"], report["expected"], "{report}");
    assert_eq!(report["deliveryRatio"], 1.0, "{report}");
    assert_eq!(report["closed"], 0, "{report}");
    assert!(report["deliveriesPerSec"].as_f64().unwrap() > 0.0, "{report}");
    let latency = &report["latencyMs"];
    assert!(latency["p50"].as_f64().unwrap() <= latency["max"].as_f64().unwrap(), "{report}");
    assert!(report["server"]["rssBytes"].as_u64().unwrap() > 0, "{report}");
    assert!(report["server"]["cpuPercent"].as_f64().unwrap() > 0.0, "{report}");
}

#[test]
fn addresses_off_loopback_are_refused() {
    for addr in ["10.0.0.1:80", "192.168.0.1:8080", "ws://8.8.8.8:80/ws/chat"] {
        let flag = if addr.starts_with("ws:") { "--url" } else { "--addr" };
        let out = loadgen(&[flag, addr, "--seconds", "1"]);
        assert!(!out.status.success(), "{addr} was accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"), "{addr}");
    }
}
