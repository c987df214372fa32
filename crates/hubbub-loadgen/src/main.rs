//! `hubbub-loadgen`: one bounded load against a Hubbub chat server that is
//! already running on this machine. It connects `--clients` clients spread
//! over `--rooms` rooms, lets `--senders` of them send for `--seconds`, and
//! prints connect time, deliveries per second, end-to-end latency, the
//! delivery ratio and its own CPU, plus the server's CPU and RSS with
//! `--server-pid`: as a table, or as one JSON object with `--json`.
//!
//! Against a cluster, `--addr` repeats (clients are spread over the nodes
//! round robin by client index), `--server-pid` repeats in the same order
//! (the nodes' CPU and RSS are reported summed and one by one), and
//! `--redis-pid` samples the Redis they share.
//!
//! Only loopback addresses are accepted, and every wait is bounded.

// Progress and errors go to stderr, the report to stdout.
#![allow(clippy::print_stderr, clippy::print_stdout)]

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use hubbub_loadgen::process::{cpu_time, raise_fd_limit};
use hubbub_loadgen::run::{Options, ServerSample, Summary, default_setup_timeout, loopback_target, run};
use hubbub_loadgen::{Plan, Sending, format_mib, format_ms};

/// Runs one load against a chat server on this machine (loopback only) and
/// reports connect time, deliveries/s, latency, delivery ratio and CPU.
///
/// Start the server without rate limits and per-address caps, e.g.
/// `hubbub --listen 127.0.0.1:0 --no-rate-limit` with
/// `HUBBUB_LIMITS_MAX_CONNECTIONS_PER_IP=0` and `HUBBUB_HTTP_MAX_CONNECTIONS_PER_IP=0`.
#[derive(Debug, Parser)]
#[command(name = "hubbub-loadgen", version)]
struct Args {
    /// The server, as IP:PORT (or localhost:PORT) on 127.0.0.0/8 or [::1];
    /// repeated for the nodes of a cluster, which client i reaches as the
    /// (i mod N)-th.
    #[arg(long, value_name = "HOST:PORT", required_unless_present = "url", conflicts_with = "url")]
    addr: Vec<String>,
    /// The server, as ws://HOST:PORT[/ws/chat] on loopback.
    #[arg(long)]
    url: Option<String>,
    /// Clients to connect.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Rooms: client i joins room i % ROOMS.
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Clients that send (the first ones); 0 for idle connections.
    #[arg(long, default_value_t = 10)]
    senders: usize,
    /// Each sender sends as fast as W messages not yet received by every
    /// other member of its room allow (1 to 64; the default, with W = 8).
    #[arg(long, value_name = "W", conflicts_with = "rate", value_parser = clap::value_parser!(u32).range(1..=64))]
    window: Option<u32>,
    /// Each sender sends this many messages per second instead.
    #[arg(long, value_name = "MSGS_PER_SEC_PER_SENDER")]
    rate: Option<f64>,
    /// Length of the sending window, at most 3600.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Generator threads, each a single-threaded tokio runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Source addresses 127.0.0.1 ... 127.0.0.N, round robin (IPv4 only);
    /// default one per 10,000 clients.
    #[arg(long)]
    sources: Option<usize>,
    /// Offer permessage-deflate, as browsers do: the server then sends
    /// messages of at least `websocket.compression_min_bytes` compressed.
    #[arg(long)]
    deflate: bool,
    /// Bytes of padding added to each chat message's text.
    #[arg(long, default_value_t = 0)]
    padding: usize,
    /// The server's process id: sample its CPU and RSS from /proc; repeated
    /// for a cluster's nodes.
    #[arg(long, value_name = "PID")]
    server_pid: Vec<u32>,
    /// The process id of the Redis a cluster's nodes share: sample its CPU
    /// and RSS too.
    #[arg(long, value_name = "PID")]
    redis_pid: Option<u32>,
    /// With --server-pid: count the (first) server's write system calls
    /// during the window with `perf stat` (needs perf and the right to
    /// trace it).
    #[arg(long, requires = "server_pid")]
    count_writes: bool,
    /// Longest wait for every client to connect and join, in seconds
    /// (default 60 plus 4 ms per client).
    #[arg(long, value_name = "SECONDS")]
    setup_timeout: Option<f64>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    match try_main(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("hubbub-loadgen: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main(args: &Args) -> anyhow::Result<()> {
    let (plan, options) = plan(args)?;
    for pid in options.server_pid.iter().chain(&options.more_server_pids) {
        cpu_time(*pid).with_context(|| format!("no server process {pid} to sample"))?;
    }
    if let Some(pid) = options.redis_pid {
        cpu_time(pid).with_context(|| format!("no Redis process {pid} to sample"))?;
    }
    match raise_fd_limit() {
        Ok(limit) if (limit as usize) < plan.clients + 64 => bail!(
            "{} clients need more open files than the limit of {limit}; raise it (ulimit -n)",
            plan.clients
        ),
        Ok(_) => {}
        Err(err) => eprintln!("hubbub-loadgen: {err:#}; going on with the current limit"),
    }
    let addrs: Vec<String> = plan.addrs().map(|addr| addr.to_string()).collect();
    eprintln!(
        "hubbub-loadgen: {} clients in {} room(s) on {}, {} sender(s), {} s",
        plan.clients,
        plan.rooms,
        addrs.join(", "),
        plan.senders(),
        options.seconds.as_secs_f64()
    );
    let summary = run(plan, &options)?;
    if args.json {
        println!("{}", serde_json::to_string(&summary).context("encoding the report")?);
    } else {
        print!("{}", table(&summary));
    }
    Ok(())
}

fn seconds(value: f64, what: &str, max: f64) -> anyhow::Result<Duration> {
    if !(value > 0.0 && value <= max) {
        bail!("{what} must be above 0 and at most {max}");
    }
    Ok(Duration::from_secs_f64(value))
}

fn plan(args: &Args) -> anyhow::Result<(Plan, Options)> {
    let specs: Vec<&str> = args.addr.iter().map(String::as_str).chain(args.url.as_deref()).collect();
    let addrs = specs.into_iter().map(loopback_target).collect::<anyhow::Result<Vec<_>>>()?;
    let (&addr, more_addrs) = addrs.split_first().context("--addr or --url is required")?;
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let senders = args.senders.min(args.clients);
    let sending = match (args.window, args.rate) {
        _ if senders == 0 => Sending::Nobody,
        (_, Some(rate)) => {
            if !(rate.is_finite() && rate > 0.0 && rate <= 1e6) {
                bail!("--rate must be above 0 and at most 1000000 messages per second");
            }
            Sending::Rate { senders, period: Duration::from_secs_f64(1.0 / rate) }
        }
        (window, None) => Sending::Window { senders, window: window.unwrap_or(8) },
    };
    let sources = args.sources.unwrap_or_else(|| args.clients.div_ceil(10_000)).max(1);
    if sources > 1 && addrs.iter().any(std::net::SocketAddr::is_ipv6) {
        bail!("--sources works with an IPv4 server only");
    }
    if sources > 254 {
        bail!("--sources must be at most 254");
    }
    if args.server_pid.len() > addrs.len() {
        bail!("--server-pid is given more often than --addr");
    }
    let plan = Plan {
        addr,
        more_addrs: more_addrs.to_vec(),
        clients: args.clients,
        rooms: args.rooms.clamp(1, args.clients),
        sending,
        threads: args.threads.clamp(1, 64),
        sources,
        // Busy receivers read in large gulps; many idle ones hold little.
        read_buffer: if senders == 0 { 1024 } else { 64 * 1024 },
        connect_concurrency: 64,
        padding: args.padding,
        deflate: args.deflate,
    };
    let setup_timeout = match args.setup_timeout {
        Some(value) => seconds(value, "--setup-timeout", 3600.0)?,
        None => default_setup_timeout(args.clients),
    };
    let options = Options {
        seconds: seconds(args.seconds, "--seconds", 3600.0)?,
        setup_timeout,
        drain_timeout: Duration::from_secs(10),
        settle: Duration::ZERO,
        allow_failed_connections: false,
        server_pid: args.server_pid.first().copied(),
        more_server_pids: args.server_pid.iter().skip(1).copied().collect(),
        redis_pid: args.redis_pid,
        count_writes: args.count_writes,
    };
    Ok((plan, options))
}

/// The report as a two-column Markdown table.
fn table(s: &Summary) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("server", s.addr.clone()),
        ("clients", format!("{} in {} room(s), {} thread(s)", s.clients, s.rooms, s.threads)),
        ("senders", format!("{}, {}", s.senders, s.sending)),
        ("connect (setup)", format!("{:.2} s", s.setup_seconds)),
        ("window", format!("{:.1} s", s.seconds)),
        ("deliveries/s", format!("{:.0}", s.deliveries_per_sec)),
        (
            "bytes in per delivery",
            s.bytes_per_delivery.map_or_else(|| "n/a".to_owned(), |b| format!("{b:.1}")),
        ),
    ];
    let latency = s.latency_ms.map(|l| [l.p50, l.p90, l.p99, l.p999, l.max].map(format_ms));
    for (i, name) in
        ["latency p50", "latency p90", "latency p99", "latency p99.9", "latency max"].into_iter().enumerate()
    {
        rows.push((name, latency.as_ref().map_or_else(|| "n/a".to_owned(), |l| l[i].clone())));
    }
    rows.extend([
        ("sent", s.sent.to_string()),
        ("delivered / expected", format!("{} / {} (lost {})", s.delivered, s.expected, s.lost)),
        ("error replies", s.errors.to_string()),
        ("delivery ratio", s.delivery_ratio.map_or_else(|| "n/a".to_owned(), |r| format!("{r:.6}"))),
        ("closed by the server", s.closed.to_string()),
        ("generator CPU", format!("{:.0} % of one core", s.generator_cpu_percent)),
    ]);
    let cpu = |p: &ServerSample| format!("{:.0} % of one core (pid {})", p.cpu_percent, p.pid);
    let rss = |p: &ServerSample| format!("{} -> {}", format_mib(p.rss_base_bytes), format_mib(p.rss_bytes));
    if let Some(server) = &s.server {
        if s.nodes.is_empty() {
            rows.extend([("server CPU", cpu(server)), ("server RSS", rss(server))]);
            rows.extend([
                (
                    "server CPU per delivery",
                    if s.deliveries_per_sec > 0.0 {
                        format!("{:.2} µs", server.cpu_percent / 100.0 / s.deliveries_per_sec * 1e6)
                    } else {
                        "n/a".to_owned()
                    },
                ),
                (
                    "server writes per delivery",
                    server.writes_per_delivery.map_or_else(|| "n/a".to_owned(), |w| format!("{w:.3}")),
                ),
            ]);
        } else {
            let all = format!("{:.0} % of one core, {} nodes", server.cpu_percent, s.nodes.len());
            rows.extend([("nodes' CPU", all), ("nodes' RSS", rss(server))]);
            for node in &s.nodes {
                rows.push(("node CPU, RSS", format!("{}, {}", cpu(node), rss(node))));
            }
        }
    }
    if let Some(redis) = &s.redis {
        rows.extend([("Redis CPU", cpu(redis)), ("Redis RSS", rss(redis))]);
    }
    let mut out = String::from("| measure | value |\n| --- | --- |\n");
    for (name, value) in rows {
        let _ = writeln!(out, "| {name} | {value} |");
    }
    if s.generator_cpu_percent > 90.0 * s.threads as f64 {
        out.push_str(
            "\nThe generator was saturated: add --threads, or these numbers measure it, not the server.\n",
        );
    }
    out
}
