//! One measured load against a server that is already running (or the nodes
//! of a cluster, with the Redis they share): set up every client, let the
//! server settle if asked, send for a fixed time, wait for what is in
//! flight, and report. This is what the `hubbub-loadgen` binary
//! does and what `cargo xtask loadtest` runs for its client scenarios; every
//! wait in it is bounded, so a run always ends by itself.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::process::{WriteCounter, cpu_time, own_cpu_time, rss_bytes};
use crate::{Histogram, Phase, Plan, Sending, Shared, run_clients};

/// How long a run lasts, and what else it samples.
#[derive(Clone, Debug)]
pub struct Options {
    /// The sending window: how long senders send.
    pub seconds: Duration,
    /// The longest wait for every client to connect, join its room and see
    /// every `userJoined` of its room.
    pub setup_timeout: Duration,
    /// The longest wait after the window for the deliveries still in flight.
    pub drain_timeout: Duration,
    /// A pause between setup and the window, so that what the server does
    /// once its clients are in (freeing setup buffers, say) stays out of the
    /// measured CPU. Zero for none.
    pub settle: Duration,
    /// Go on with the clients that did connect when some could not, instead
    /// of failing the run; [`Summary::failed`] counts them. Meant for idle
    /// connections, where the connections that work are still worth
    /// measuring.
    pub allow_failed_connections: bool,
    /// The server's process id, to sample its CPU and RSS from /proc; for
    /// a cluster, the first node's.
    pub server_pid: Option<u32>,
    /// The process ids of a cluster's other nodes, sampled like
    /// `server_pid`: [`Summary::server`] is then the nodes' sum and
    /// [`Summary::nodes`] lists each. Empty for one server.
    pub more_server_pids: Vec<u32>,
    /// The process id of the Redis a cluster's nodes share, sampled on its
    /// own into [`Summary::redis`].
    pub redis_pid: Option<u32>,
    /// Count the server's write system calls over the window
    /// ([`WriteCounter`]); needs `server_pid`.
    pub count_writes: bool,
}

impl Options {
    /// The server's process and a cluster's other nodes, in that order.
    fn node_pids(&self) -> Vec<u32> {
        self.server_pid.into_iter().chain(self.more_server_pids.iter().copied()).collect()
    }
}

/// The setup timeout a run of `clients` gets unless told otherwise: 60 s
/// plus 4 ms per client.
pub fn default_setup_timeout(clients: usize) -> Duration {
    Duration::from_secs(60)
        + Duration::from_millis(4).saturating_mul(u32::try_from(clients).unwrap_or(u32::MAX))
}

/// What a run measured. Serialised with camelCase names for `--json`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// The server's address; for a cluster, every node's, comma-separated.
    pub addr: String,
    /// Clients connected and joined.
    pub clients: usize,
    /// Clients that could not connect (only with
    /// [`Options::allow_failed_connections`]; otherwise the run fails).
    pub failed: usize,
    /// The first connection error, when some client could not connect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Rooms they were spread over.
    pub rooms: usize,
    /// Clients that sent.
    pub senders: usize,
    /// How they sent: `window W`, `rate R/s` or `none`.
    pub sending: String,
    /// Generator threads.
    pub threads: usize,
    /// From the first connect until every client had joined and seen every
    /// join of its room.
    pub setup_seconds: f64,
    /// The measured sending window.
    pub seconds: f64,
    /// Chat messages sent.
    pub sent: u64,
    /// Deliveries the sent messages should make: one per other member.
    pub expected: u64,
    /// Deliveries that arrived, the drain included.
    pub delivered: u64,
    /// `expected - delivered`.
    pub lost: i64,
    /// `error` replies the clients received, setup included. The generator
    /// never resends, so a chat message the server refused (`unavailable`
    /// with `retryAfterMs`, say) counts here once and in `lost` once per
    /// recipient: lost with notice, not silently.
    pub errors: u64,
    /// `delivered / expected`; `None` when nothing was sent.
    pub delivery_ratio: Option<f64>,
    /// Deliveries per second over the sending window.
    pub deliveries_per_sec: f64,
    /// Bytes the clients read during the window per delivery in it: what
    /// one delivered chat message costs on the wire (pings included).
    pub bytes_per_delivery: Option<f64>,
    /// Connections the server closed during the run.
    pub closed: usize,
    /// End-to-end latency from the send time each message carries to its
    /// receipt; `None` when nothing was delivered.
    pub latency_ms: Option<Latency>,
    /// The generator's CPU over the window, in % of one core.
    pub generator_cpu_percent: f64,
    /// The server's CPU and memory, when its process id was given; for a
    /// cluster, the sum over its nodes (with the first node's pid).
    pub server: Option<ServerSample>,
    /// A cluster's nodes one by one, in the order of the plan's addresses;
    /// empty for one server.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<ServerSample>,
    /// The CPU and memory of the Redis a cluster shares, when its process
    /// id was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<ServerSample>,
}

/// Latency percentiles, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// The largest.
    pub max: f64,
}

impl Latency {
    /// The percentiles of `histogram`, whose samples are microseconds (see
    /// [`Histogram::summary`]).
    pub fn new(histogram: &Histogram) -> Self {
        let [p50, p90, p99, p999, max] = histogram.summary().map(|d| d.as_micros() as f64 / 1000.0);
        Self { p50, p90, p99, p999, max }
    }
}

/// The server process (or a cluster's nodes together, or its Redis),
/// sampled from /proc.
#[derive(Clone, Copy, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerSample {
    /// Its process id.
    pub pid: u32,
    /// Its CPU (user + system) over the window, in % of one core.
    pub cpu_percent: f64,
    /// Its RSS before the first client connected (before the window, for
    /// churn).
    pub rss_base_bytes: u64,
    /// Its RSS at the end of the window.
    pub rss_bytes: u64,
    /// Its write system calls (`write`, `writev`, `sendto`, `sendmsg`) over
    /// the window per delivery in it, when they were counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writes_per_delivery: Option<f64>,
}

impl ServerSample {
    /// Several processes as one: CPU and RSS added up, under the first
    /// one's pid. `None` for no process.
    pub fn sum(samples: &[Self]) -> Option<Self> {
        let first = samples.first()?;
        Some(Self {
            pid: first.pid,
            cpu_percent: samples.iter().map(|s| s.cpu_percent).sum(),
            rss_base_bytes: samples.iter().map(|s| s.rss_base_bytes).sum(),
            rss_bytes: samples.iter().map(|s| s.rss_bytes).sum(),
            // Counted for one process only.
            writes_per_delivery: if samples.len() == 1 { first.writes_per_delivery } else { None },
        })
    }
}

/// Parses where to send the load: `HOST:PORT` or `ws://HOST:PORT[/ws/chat]`,
/// where HOST is an IP address or `localhost`. Refuses every address that is
/// not loopback (127.0.0.0/8 or ::1), and names are never looked up.
pub fn loopback_target(spec: &str) -> anyhow::Result<SocketAddr> {
    let authority = match spec.split_once("://") {
        Some(("ws", rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            if !matches!(path, "" | "/" | "/ws/chat") {
                bail!("the generator always connects to /ws/chat, not {path}");
            }
            authority
        }
        Some((scheme, _)) => bail!("unsupported scheme {scheme}:// (only ws:// on loopback)"),
        None => spec,
    };
    let addr = match authority.strip_prefix("localhost:") {
        Some(port) => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port.parse().context("port")?),
        None => authority.parse().with_context(|| format!("{authority:?} is not IP:PORT"))?,
    };
    if !is_loopback(addr.ip()) {
        bail!("{} is not a loopback address: load goes only to 127.0.0.0/8 or ::1", addr.ip());
    }
    if addr.port() == 0 {
        bail!("port 0 is not a server's port");
    }
    Ok(addr)
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}

/// Runs `plan` against its server: sets every client up, sends for
/// `options.seconds`, drains, stops every client and reports. Fails if a
/// client cannot connect or a wait times out; the clients stop either way.
pub fn run(plan: Plan, options: &Options) -> anyhow::Result<Summary> {
    check(&plan, options)?;
    let plan = Arc::new(plan);
    let shared = Shared::new(&plan);
    let nodes_rss_base: Vec<u64> =
        options.node_pids().into_iter().map(server_rss).collect::<Result<_, _>>()?;
    let redis_rss_base = options.redis_pid.map(server_rss).transpose()?;
    let started = Instant::now();
    let (outcome, histogram) = run_clients(&plan, &shared, || drive(&plan, &shared, options, started))?;
    let mut summary = outcome?;
    for (node, base) in summary.nodes.iter_mut().zip(nodes_rss_base) {
        node.rss_base_bytes = base;
    }
    if let (Some(redis), Some(base)) = (summary.redis.as_mut(), redis_rss_base) {
        redis.rss_base_bytes = base;
    }
    summary.server = ServerSample::sum(&summary.nodes);
    if summary.nodes.len() < 2 {
        summary.nodes.clear();
    }
    summary.latency_ms = (histogram.count() > 0).then(|| Latency::new(&histogram));
    Ok(summary)
}

fn check(plan: &Plan, options: &Options) -> anyhow::Result<()> {
    if plan.clients == 0 || plan.rooms == 0 || plan.rooms > plan.clients {
        bail!("need at least one client and between 1 and {} rooms", plan.clients);
    }
    match plan.sending {
        Sending::Window { window, .. } if !(1..=64).contains(&window) => {
            bail!("the window must be between 1 and 64")
        }
        Sending::Rate { period, .. } if period.is_zero() => bail!("the rate is too high"),
        _ => {}
    }
    if let Some(addr) = plan.addrs().find(|addr| !is_loopback(addr.ip())) {
        bail!("{} is not a loopback address", addr.ip());
    }
    if options.server_pid.is_none() && !options.more_server_pids.is_empty() {
        bail!("a cluster's other nodes are sampled only beside the first one's server_pid");
    }
    if options.seconds.is_zero() {
        bail!("the run needs a sending window longer than zero");
    }
    Ok(())
}

pub(crate) fn server_rss(pid: u32) -> anyhow::Result<u64> {
    rss_bytes(pid).with_context(|| format!("sampling the server, process {pid}"))
}

pub(crate) fn server_cpu(pid: Option<u32>) -> anyhow::Result<Duration> {
    pid.map_or(Ok(Duration::ZERO), |pid| {
        cpu_time(pid).with_context(|| format!("sampling the server, process {pid}"))
    })
}

/// The CPU time of each process of `pids`, in order.
fn cpu_times(pids: &[u32]) -> anyhow::Result<Vec<Duration>> {
    pids.iter().map(|&pid| server_cpu(Some(pid))).collect()
}

/// Each process of `pids` over a window: its CPU between `before` and
/// `after`, and its RSS now (the baseline is filled in by [`run`]).
fn samples(
    pids: &[u32],
    before: &[Duration],
    after: &[Duration],
    window: Duration,
) -> anyhow::Result<Vec<ServerSample>> {
    pids.iter()
        .zip(before.iter().zip(after))
        .map(|(&pid, (before, after))| {
            Ok(ServerSample {
                pid,
                cpu_percent: percent(after.saturating_sub(*before), window),
                rss_base_bytes: 0,
                rss_bytes: server_rss(pid)?,
                writes_per_delivery: None,
            })
        })
        .collect()
}

/// The phases, from the calling thread.
fn drive(plan: &Plan, shared: &Shared, options: &Options, started: Instant) -> anyhow::Result<Summary> {
    let deadline = started + options.setup_timeout;
    wait_until(deadline, "clients to connect and join", || {
        shared.ready.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) >= plan.clients
    })?;
    let failed = shared.failed.load(Ordering::Relaxed);
    let first_error = shared.first_error.lock().map(|e| e.clone()).unwrap_or_default();
    if failed > 0 && !options.allow_failed_connections {
        let first = first_error.unwrap_or_default();
        bail!("{failed} of {} connections failed; first error: {first}", plan.clients);
    }
    // With clients missing, their rooms never see every join.
    if failed == 0 {
        let want = plan.expected_join_events();
        wait_until(deadline, "every userJoined to arrive", || {
            shared.join_events.load(Ordering::Relaxed) >= want
        })?;
    }
    let setup = started.elapsed();
    std::thread::sleep(options.settle);

    let writes = options.server_pid.filter(|_| options.count_writes).and_then(WriteCounter::start);
    let (nodes, redis) = (options.node_pids(), Vec::from_iter(options.redis_pid));
    let (cpu0, redis0) = (cpu_times(&nodes)?, cpu_times(&redis)?);
    let (gen0, delivered0) = (own_cpu_time()?, shared.delivered.load(Ordering::Relaxed));
    let bytes0 = shared.bytes_in.load(Ordering::Relaxed);
    let t0 = Instant::now();
    shared.set_phase(Phase::Run);
    std::thread::sleep(options.seconds);
    shared.set_phase(Phase::Drain);
    let window = t0.elapsed();
    let (cpu1, redis1) = (cpu_times(&nodes)?, cpu_times(&redis)?);
    let (gen1, delivered1) = (own_cpu_time()?, shared.delivered.load(Ordering::Relaxed));
    let writes = writes.and_then(WriteCounter::stop);
    let bytes1 = shared.bytes_in.load(Ordering::Relaxed);
    let mut nodes = samples(&nodes, &cpu0, &cpu1, window)?;
    if let Some(first) = nodes.first_mut() {
        first.writes_per_delivery = writes
            .filter(|_| delivered1 > delivered0)
            .map(|writes| writes as f64 / (delivered1 - delivered0) as f64);
    }
    let redis = samples(&redis, &redis0, &redis1, window)?.pop();
    // What was sent must arrive; give it a little time.
    let _ = wait_until(Instant::now() + options.drain_timeout, "deliveries to drain", || {
        shared.delivered.load(Ordering::Relaxed) >= shared.expected.load(Ordering::Relaxed)
    });
    let (sent, expected, delivered) = (
        shared.sent.load(Ordering::Relaxed),
        shared.expected.load(Ordering::Relaxed),
        shared.delivered.load(Ordering::Relaxed),
    );
    Ok(Summary {
        addr: plan.addrs().map(|addr| addr.to_string()).collect::<Vec<_>>().join(","),
        clients: shared.ready.load(Ordering::Relaxed),
        failed,
        first_error,
        rooms: plan.rooms,
        senders: plan.senders(),
        sending: match plan.sending {
            Sending::Window { window, .. } if plan.senders() > 0 => format!("window {window}"),
            Sending::Rate { period, .. } if plan.senders() > 0 => {
                format!("rate {:.2}/s", 1.0 / period.as_secs_f64())
            }
            _ => "none".to_owned(),
        },
        threads: plan.threads.max(1),
        setup_seconds: setup.as_secs_f64(),
        seconds: window.as_secs_f64(),
        sent,
        expected,
        delivered,
        lost: i64::try_from(i128::from(expected) - i128::from(delivered)).unwrap_or(i64::MAX),
        errors: shared.errors.load(Ordering::Relaxed),
        delivery_ratio: (expected > 0).then(|| delivered as f64 / expected as f64),
        deliveries_per_sec: delivered1.saturating_sub(delivered0) as f64 / window.as_secs_f64(),
        bytes_per_delivery: (delivered1 > delivered0)
            .then(|| bytes1.saturating_sub(bytes0) as f64 / (delivered1 - delivered0) as f64),
        closed: shared.closed.load(Ordering::Relaxed),
        latency_ms: None,
        generator_cpu_percent: percent(gen1.saturating_sub(gen0), window),
        // Filled in by `run`: the nodes' sum.
        server: None,
        nodes,
        redis,
    })
}

/// `cpu` as a percentage of one core over `window`.
pub(crate) fn percent(cpu: Duration, window: Duration) -> f64 {
    cpu.as_secs_f64() / window.as_secs_f64().max(1e-9) * 100.0
}

fn wait_until(deadline: Instant, what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets_are_accepted() {
        let ok = |s: &str| loopback_target(s).unwrap().to_string();
        assert_eq!(ok("127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(ok("127.1.2.3:80"), "127.1.2.3:80");
        assert_eq!(ok("[::1]:9000"), "[::1]:9000");
        assert_eq!(ok("localhost:8080"), "127.0.0.1:8080");
        assert_eq!(ok("ws://127.0.0.1:8080/ws/chat"), "127.0.0.1:8080");
        assert_eq!(ok("ws://[::1]:8080"), "[::1]:8080");
        for refused in [
            "10.0.0.1:80",
            "192.168.1.1:80",
            "8.8.8.8:53",
            "[::ffff:127.0.0.1]:80",
            "[2001:db8::1]:80",
            "0.0.0.0:80",
            "example.com:80",
            "wss://127.0.0.1:443",
            "ws://127.0.0.1:80/ws/echo",
            "127.0.0.1:0",
            "127.0.0.1",
        ] {
            assert!(loopback_target(refused).is_err(), "{refused} must be refused");
        }
    }
}
