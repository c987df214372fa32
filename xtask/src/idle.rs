//! `cargo xtask heartbeat-cost`: what heartbeats cost the server for many
//! idle, healthy connections.
//!
//! Runs the release `hubbub` twice on loopback with the same number of idle
//! chat clients: once with heartbeats effectively off (an interval of an
//! hour) and once with the interval under test. Each client reads its socket,
//! so tungstenite answers every ping. The server's CPU time (user + system,
//! from /proc) over the same window gives the difference the heartbeat makes.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

use crate::measure::cpu_time;

/// Options of the command.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Idle connections to hold open.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub(crate) clients: usize,
    /// Measurement window, in seconds.
    #[arg(long = "seconds", value_name = "S", default_value = "20", value_parser = whole_seconds)]
    pub(crate) window: Duration,
    /// Heartbeat interval under test, e.g. `1s` or `500ms`.
    #[arg(long, value_name = "D", default_value = "1s", value_parser = humantime::parse_duration)]
    pub(crate) interval: Duration,
}

fn whole_seconds(value: &str) -> Result<Duration, std::num::ParseIntError> {
    value.parse().map(Duration::from_secs)
}

/// One measured run.
struct Run {
    cpu: Duration,
    pings: u64,
}

pub(crate) fn heartbeat_cost(root: &Path, options: &Options) -> anyhow::Result<()> {
    crate::run(root, "cargo", &["build", "--release", "--package", "hubbub"])?;
    // Wherever CARGO_TARGET_DIR put it.
    let binary = crate::target_dir(root).join("release/hubbub");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let off = Duration::from_secs(3600);
        let baseline = measure(&binary, options, off).await.context("baseline run")?;
        let with = measure(&binary, options, options.interval).await.context("heartbeat run")?;
        report(options, &baseline, &with);
        Ok(())
    })
}

async fn measure(binary: &Path, options: &Options, interval: Duration) -> anyhow::Result<Run> {
    let interval_arg = humantime::format_duration(interval).to_string();
    let timeout_arg = humantime::format_duration(interval + Duration::from_secs(5)).to_string();
    let mut server = Command::new(binary)
        // Thousands of connections a second from one address are the
        // setup, not an attack.
        .args(["--listen", "127.0.0.1:0", "--log", "warn", "--no-rate-limit"])
        .args(["--heartbeat-interval", &interval_arg, "--heartbeat-timeout", &timeout_arg])
        // Every client comes from 127.0.0.1: lift the per-address cap.
        .env("HUBBUB_LIMITS_MAX_CONNECTIONS_PER_IP", "0")
        .env("HUBBUB_HTTP_MAX_CONNECTIONS_PER_IP", "0")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting hubbub")?;
    let addr = listening_address(&mut server).await?;
    let pid = server.id().context("server pid")?;

    let pings = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::with_capacity(options.clients);
    for _ in 0..options.clients {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/chat")).await?;
        let pings = pings.clone();
        clients.push(tokio::spawn(async move {
            let mut ws = ws;
            while let Some(Ok(msg)) = ws.next().await {
                if matches!(msg, Message::Ping(_)) {
                    pings.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Let connection setup settle before the window opens.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu_before, pings_before, started) = (cpu_time(pid)?, pings.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(options.window).await;
    let cpu = cpu_time(pid)? - cpu_before;
    let pings = pings.load(Ordering::Relaxed) - pings_before;
    let elapsed = started.elapsed();
    eprintln!(
        "interval {interval_arg}: {} clients, {pings} pings in {elapsed:.1?}, server CPU {cpu:?}",
        options.clients
    );
    let at: std::net::SocketAddr = addr.parse().with_context(|| format!("server address {addr:?}"))?;
    let status = tokio::task::spawn_blocking(move || crate::measure::api_status(at)).await??;
    anyhow::ensure!(status["deadConnectionsReaped"] == 0, "healthy clients were reaped: {status}");
    for client in clients {
        client.abort();
    }
    server.kill().await.ok();
    Ok(Run { cpu, pings })
}

async fn listening_address(server: &mut Child) -> anyhow::Result<String> {
    let stdout = server.stdout.take().context("server stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    while let Some(line) = lines.next_line().await? {
        if let Some((_, addr)) = line.split_once(" listening on ") {
            return Ok(addr.trim().to_owned());
        }
    }
    bail!("hubbub exited before it was listening")
}

fn report(options: &Options, baseline: &Run, with: &Run) {
    let window = options.window.as_secs_f64();
    let percent = |run: &Run| run.cpu.as_secs_f64() / window * 100.0;
    let extra = with.cpu.saturating_sub(baseline.cpu);
    let per_ping = if with.pings > 0 { extra.as_secs_f64() / with.pings as f64 * 1e6 } else { f64::NAN };
    eprintln!();
    eprintln!(
        "| idle clients | heartbeat interval | pings in window | server CPU, heartbeats off | server CPU, heartbeats on | cost per ping |"
    );
    eprintln!("| --- | --- | --- | --- | --- | --- |");
    eprintln!(
        "| {} | {} | {} in {:.0} s | {:.2} % of a core | {:.2} % of a core | {:.1} µs |",
        options.clients,
        humantime::format_duration(options.interval),
        with.pings,
        window,
        percent(baseline),
        percent(with),
        per_ping
    );
}
