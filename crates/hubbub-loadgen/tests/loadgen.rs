//! The `hubbub-loadgen` binary against an in-process `hubbub-server` on
//! 127.0.0.1:0: a one-second load of 20 clients, the same spread over two
//! servers, and a refused address.

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
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["closed"], 0, "{report}");
    assert!(report["deliveriesPerSec"].as_f64().unwrap() > 0.0, "{report}");
    let latency = &report["latencyMs"];
    assert!(latency["p50"].as_f64().unwrap() <= latency["max"].as_f64().unwrap(), "{report}");
    assert!(report["server"]["rssBytes"].as_u64().unwrap() > 0, "{report}");
    assert!(report["server"]["cpuPercent"].as_f64().unwrap() > 0.0, "{report}");
}

/// Two servers given as a cluster: clients go round robin, so with two
/// rooms each room lives on one server (client i joins room i % 2 on
/// server i % 2) and everything is delivered without the servers sharing
/// anything. Both pids are this process's, so the nodes' sum is twice one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_spread_over_several_addresses_and_every_node_is_sampled() {
    let (first, second) =
        (TestServer::start("node-0", |_| {}).await, TestServer::start("node-1", |_| {}).await);
    let pid = std::process::id();
    let args = format!(
        "--addr {} --addr {} --clients 20 --rooms 2 --senders 4 --window 4 --seconds 1 \
         --server-pid {pid} --server-pid {pid} --redis-pid {pid} --setup-timeout 20 --json",
        first.addr, second.addr
    );
    let args: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
    let out = tokio::task::spawn_blocking(move || loadgen(&args)).await.unwrap();
    // Half the clients go to the second address: one that takes only 5
    // connections refuses the other 5 of them.
    let full = TestServer::start("node-full", |config| config.limits.max_connections = 5).await;
    let args =
        format!("--addr {} --addr {} --clients 20 --seconds 1 --setup-timeout 20", first.addr, full.addr);
    let args: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
    let refused = tokio::task::spawn_blocking(move || loadgen(&args)).await.unwrap();
    for server in [first, second, full] {
        server.stop().await;
    }
    assert!(!refused.status.success());
    let refused = String::from_utf8_lossy(&refused.stderr);
    assert!(refused.contains("5 of 20 connections failed"), "{refused}");

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "hubbub-loadgen failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(report["clients"], 20, "{report}");
    assert_eq!(report["delivered"], report["expected"], "{report}");
    assert!(report["sent"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["addr"].as_str().unwrap().split(',').count(), 2, "{report}");
    let nodes = report["nodes"].as_array().expect("one sample per node");
    assert_eq!(nodes.len(), 2, "{report}");
    let node_cpu: f64 = nodes.iter().map(|n| n["cpuPercent"].as_f64().unwrap()).sum();
    assert!((report["server"]["cpuPercent"].as_f64().unwrap() - node_cpu).abs() < 1e-9, "{report}");
    assert!(report["redis"]["rssBytes"].as_u64().unwrap() > 0, "{report}");
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
