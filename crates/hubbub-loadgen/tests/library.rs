//! The library as `cargo xtask loadtest` drives it, against an in-process
//! `hubbub-server` on 127.0.0.1:0: idle clients measured after a pause with
//! some connections refused, and connection churn.

mod common;

use std::time::Duration;

use common::TestServer;
use hubbub_loadgen::{Plan, Sending, churn, run};

fn plan(addr: std::net::SocketAddr, clients: usize, rooms: usize) -> Plan {
    Plan {
        addr,
        more_addrs: Vec::new(),
        clients,
        rooms,
        sending: Sending::Nobody,
        threads: 2,
        sources: 1,
        read_buffer: 1024,
        connect_concurrency: 4,
        padding: 0,
        deflate: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_measured_with_the_refused_ones_counted() {
    // Six connections fit; the other four get 503 at the upgrade.
    let server = TestServer::start("idle", |config| config.limits.max_connections = 6).await;
    let plan = plan(server.addr, 10, 2);
    let options = run::Options {
        seconds: Duration::from_millis(200),
        setup_timeout: Duration::from_secs(20),
        drain_timeout: Duration::from_secs(1),
        settle: Duration::from_millis(100),
        allow_failed_connections: true,
        server_pid: Some(std::process::id()),
        more_server_pids: Vec::new(),
        redis_pid: None,
        count_writes: false,
    };
    let strict = run::Options { allow_failed_connections: false, ..options.clone() };
    let (summary, refused) = tokio::task::spawn_blocking(move || {
        let summary = run::run(plan.clone(), &options);
        (summary, run::run(plan, &strict))
    })
    .await
    .unwrap();
    server.stop().await;

    let summary = summary.unwrap();
    assert_eq!((summary.clients, summary.failed), (6, 4), "{summary:?}");
    assert!(summary.first_error.as_deref().is_some_and(|e| e.contains("503")), "{summary:?}");
    assert_eq!((summary.sent, summary.expected, summary.delivered), (0, 0, 0));
    assert!(summary.latency_ms.is_none());
    // The window is measured after the pause, not from the end of setup.
    assert!(summary.seconds >= 0.2 && summary.seconds < 1.0, "{summary:?}");
    let sample = summary.server.unwrap();
    assert!(sample.rss_base_bytes > 0 && sample.rss_bytes > 0, "{sample:?}");

    let err = refused.unwrap_err().to_string();
    assert!(err.contains("4 of 10 connections failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_cycles_connections_and_times_them() {
    let server = TestServer::start("churn", |_| {}).await;
    let plan = plan(server.addr, 0, 1);
    let options = churn::Options {
        workers: 4,
        seconds: Duration::from_millis(500),
        cycle_timeout: Duration::from_secs(5),
        retry_pause: Duration::from_millis(10),
        server_pid: Some(std::process::id()),
    };
    let summary = tokio::task::spawn_blocking(move || churn::run(&plan, &options)).await.unwrap().unwrap();
    server.stop().await;

    assert!(summary.cycles > 0, "{summary:?}");
    assert_eq!(summary.failures, 0, "{summary:?}");
    assert!(summary.first_error.is_none());
    assert!(summary.seconds >= 0.5, "{summary:?}");
    let cycle = summary.cycle_ms.unwrap();
    assert!(cycle.p50 > 0.0 && cycle.p50 <= cycle.max, "{cycle:?}");
    assert!((summary.connects_per_sec - summary.cycles as f64 / summary.seconds).abs() < 1e-6);
    assert!(summary.server.unwrap().cpu_percent > 0.0, "{summary:?}");
}
