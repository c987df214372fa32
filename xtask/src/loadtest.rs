//! `cargo xtask loadtest`: end-to-end load scenarios against a freshly
//! started release `hubbub`, and with `--compare node-ws,uws` against the
//! reference servers in `bench/peers/` in the same run: `node-ws` (Node's
//! `ws`) and `uws` (uWebSockets.js), both speaking the same chat protocol.
//! Servers alternate on fresh processes so the ratios hold on a noisy
//! machine.
//!
//! Scenarios (issue 8's names, so results compare over time):
//! - `fanout`: 1,000 clients in one room, 10 senders, each as fast as a
//!   window of 8 undelivered messages allows: deliveries per second, latency.
//! - `fixed`: the same room at a fixed 30,000 deliveries per second: latency.
//! - `rooms`: 10,000 clients in 1,000 rooms of 10, each sending 1 message per
//!   second: latency, server CPU and RSS.
//! - `idle`: 19,000 idle connections joined to rooms of 10: server RSS per
//!   connection.
//! - `churn`: connections opened, greeted and closed continuously: connects
//!   per second, and whether RSS and the connection count return to their
//!   baseline.
//!
//! Every run is bounded in time and count, and all traffic goes to 127.0.0.1.
//! The generator (the `hubbub-loadgen` crate) reports its own CPU beside the
//! server's.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hubbub_loadgen::{self as loadgen, Histogram, Phase, Plan, Sending, Shared, format_mib};

use crate::measure::{self, ServerProcess};

/// A named scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scenario {
    Fanout,
    Fixed,
    Rooms,
    Idle,
    Churn,
}

impl Scenario {
    const ALL: [Self; 5] = [Self::Fanout, Self::Fixed, Self::Rooms, Self::Idle, Self::Churn];

    fn name(self) -> &'static str {
        match self {
            Self::Fanout => "fanout",
            Self::Fixed => "fixed",
            Self::Rooms => "rooms",
            Self::Idle => "idle",
            Self::Churn => "churn",
        }
    }

    fn parse(name: &str) -> anyhow::Result<Vec<Self>> {
        if name == "all" {
            return Ok(Self::ALL.to_vec());
        }
        Self::ALL.into_iter().find(|s| s.name() == name).map(|s| vec![s]).with_context(|| {
            format!("unknown scenario `{name}`; scenarios: fanout, fixed, rooms, idle, churn, all")
        })
    }
}

/// A server the scenarios run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ServerKind {
    Hubbub,
    /// `bench/peers/node-ws/`: Node's `ws`.
    NodeWs,
    /// `bench/peers/uws/`: uWebSockets.js.
    Uws,
}

impl ServerKind {
    /// The reference peers `--compare` takes.
    const PEERS: [Self; 2] = [Self::NodeWs, Self::Uws];

    fn name(self) -> &'static str {
        match self {
            Self::Hubbub => "hubbub",
            Self::NodeWs => "node-ws",
            Self::Uws => "uws",
        }
    }

    /// A reference peer's folder, holding its `package.json` and
    /// `server.js`; Hubbub has none.
    fn peer_dir(self) -> Option<&'static str> {
        match self {
            Self::Hubbub => None,
            Self::NodeWs => Some("bench/peers/node-ws"),
            Self::Uws => Some("bench/peers/uws"),
        }
    }
}

/// Size knobs; `None` takes the scenario's default.
#[derive(Clone, Debug, Default)]
struct Scale {
    clients: Option<usize>,
    rooms: Option<usize>,
    senders: Option<usize>,
    window: Option<u32>,
    rate: Option<f64>,
    seconds: Option<f64>,
    workers: Option<usize>,
    threads: Option<usize>,
    sources: Option<usize>,
    padding: Option<usize>,
}

/// Options of the command.
pub(crate) struct Options {
    scenarios: Vec<Scenario>,
    compare: Vec<ServerKind>,
    scale: Scale,
    /// Divide every default size by 10 and run 3 s windows.
    quick: bool,
    /// Runs of each server per scenario, alternating.
    rounds: usize,
    json: bool,
    write_docs: bool,
    /// The command line, for the docs.
    command: String,
}

impl Options {
    pub(crate) fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut options = Self {
            scenarios: Vec::new(),
            compare: Vec::new(),
            scale: Scale::default(),
            quick: false,
            rounds: 1,
            json: false,
            write_docs: false,
            command: format!("cargo xtask loadtest {}", args.join(" ")).trim_end().to_owned(),
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
            let scale = &mut options.scale;
            match arg.as_str() {
                "--scenario" => options.scenarios.extend(Scenario::parse(value("--scenario")?)?),
                // A comma-separated list; the flag may also be repeated.
                "--compare" => {
                    for peer in value("--compare")?.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                        let Some(kind) = ServerKind::PEERS.into_iter().find(|k| k.name() == peer) else {
                            let names: Vec<&str> = ServerKind::PEERS.iter().map(|k| k.name()).collect();
                            bail!("unknown peer `{peer}`; peers: {}", names.join(", "));
                        };
                        if !options.compare.contains(&kind) {
                            options.compare.push(kind);
                        }
                    }
                }
                "--clients" => scale.clients = Some(value(arg)?.parse().context("--clients")?),
                "--rooms" => scale.rooms = Some(value(arg)?.parse().context("--rooms")?),
                "--senders" => scale.senders = Some(value(arg)?.parse().context("--senders")?),
                "--window" => scale.window = Some(value(arg)?.parse().context("--window")?),
                "--rate" => scale.rate = Some(value(arg)?.parse().context("--rate")?),
                "--seconds" => scale.seconds = Some(value(arg)?.parse().context("--seconds")?),
                "--workers" => scale.workers = Some(value(arg)?.parse().context("--workers")?),
                "--threads" => scale.threads = Some(value(arg)?.parse().context("--threads")?),
                "--sources" => scale.sources = Some(value(arg)?.parse().context("--sources")?),
                "--padding" => scale.padding = Some(value(arg)?.parse().context("--padding")?),
                "--rounds" => options.rounds = value(arg)?.parse().context("--rounds")?,
                "--quick" => options.quick = true,
                "--json" => options.json = true,
                "--write-docs" => options.write_docs = true,
                name if !name.starts_with('-') => options.scenarios.extend(Scenario::parse(name)?),
                other => bail!("unknown option {other}"),
            }
        }
        if options.scenarios.is_empty() {
            options.scenarios = Scenario::ALL.to_vec();
        }
        if options.scale.window.is_some_and(|w| !(1..=64).contains(&w)) {
            bail!("--window must be between 1 and 64");
        }
        options.rounds = options.rounds.max(1);
        Ok(options)
    }
}

/// One scenario's sizes after defaults and knobs.
#[derive(Clone, Debug)]
struct Params {
    clients: usize,
    rooms: usize,
    senders: usize,
    window: u32,
    /// Deliveries per second (`fixed`) or messages per client per second
    /// (`rooms`).
    rate: f64,
    seconds: f64,
    workers: usize,
    threads: usize,
    sources: usize,
    padding: usize,
}

impl Params {
    fn new(scenario: Scenario, scale: &Scale, quick: bool) -> Self {
        let div = if quick { 10 } else { 1 };
        let (clients, rooms, senders, rate, seconds) = match scenario {
            Scenario::Fanout => (1000 / div, 1, 10, 0.0, 10.0),
            Scenario::Fixed => (1000 / div, 1, 10, 30_000.0 / div as f64, 10.0),
            Scenario::Rooms => (10_000 / div, 1000 / div, 10_000 / div, 1.0, 10.0),
            Scenario::Idle => (19_000 / div, 1900 / div, 0, 0.0, 3.0),
            Scenario::Churn => (0, 0, 0, 0.0, 10.0),
        };
        let seconds: f64 = if quick { f64::min(seconds, 3.0) } else { seconds };
        let clients = scale.clients.unwrap_or(clients);
        let rooms = scale.rooms.unwrap_or(rooms).clamp(1, clients.max(1));
        // Every client of `rooms` sends; elsewhere the first ones do.
        let senders = match scenario {
            Scenario::Rooms => clients,
            _ => scale.senders.unwrap_or(senders).min(clients),
        };
        Self {
            clients,
            rooms,
            senders,
            window: scale.window.unwrap_or(8),
            rate: scale.rate.unwrap_or(rate),
            seconds: scale.seconds.unwrap_or(seconds),
            workers: scale.workers.unwrap_or(if quick { 16 } else { 64 }),
            threads: scale.threads.unwrap_or(1).max(1),
            // One source address per 10,000 connections keeps far from the
            // 28,232 ephemeral ports of one address; churn spreads wider so
            // closed connections' ports rest.
            sources: scale.sources.unwrap_or(match scenario {
                Scenario::Churn => 8,
                _ => clients.div_ceil(10_000).max(1),
            }),
            padding: scale.padding.unwrap_or(0),
        }
    }

    fn describe(&self, scenario: Scenario) -> String {
        match scenario {
            Scenario::Fanout => format!(
                "{} clients in {} room(s), {} senders, window {}, {} s",
                self.clients, self.rooms, self.senders, self.window, self.seconds
            ),
            Scenario::Fixed => format!(
                "{} clients in {} room(s), {} senders, {} deliveries/s, {} s",
                self.clients, self.rooms, self.senders, self.rate, self.seconds
            ),
            Scenario::Rooms => format!(
                "{} clients in {} rooms, each {} msg/s, {} s",
                self.clients, self.rooms, self.rate, self.seconds
            ),
            Scenario::Idle => {
                format!(
                    "{} idle clients in {} rooms, measured {} s after setup",
                    self.clients, self.rooms, self.seconds
                )
            }
            Scenario::Churn => format!("{} concurrent connect-close loops, {} s", self.workers, self.seconds),
        }
    }
}

/// What one run of one scenario against one server measured.
#[derive(Clone, Debug, Default)]
struct Report {
    server: &'static str,
    /// Connections set up (joined) or churned.
    connections: usize,
    connect: Duration,
    deliveries_per_sec: f64,
    sent: u64,
    expected: u64,
    delivered: u64,
    /// Connections the server closed during the run.
    closed: usize,
    latency: Option<[Duration; 5]>,
    server_cpu: f64,
    generator_cpu: f64,
    rss_base: u64,
    rss: u64,
    rss_after: Option<u64>,
    connects_per_sec: f64,
    failures: u64,
    connections_after: Option<u64>,
}

impl Report {
    fn lost(&self) -> i128 {
        i128::from(self.expected) - i128::from(self.delivered)
    }

    fn rss_per_connection(&self) -> f64 {
        if self.connections == 0 {
            return 0.0;
        }
        self.rss.saturating_sub(self.rss_base) as f64 / self.connections as f64
    }
}

/// Runs `args` (a `loadtest` command line) in an optimised build of xtask.
/// `cargo xtask` builds xtask without optimisation, and an unoptimised load
/// generator would measure itself, not the server.
pub(crate) fn reexec_release(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let mut full = vec!["run", "--release", "--quiet", "--package", "xtask", "--"];
    full.extend(args.iter().map(String::as_str));
    crate::run(root, "cargo", &full)
}

pub(crate) fn loadtest(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let options = Options::parse(args)?;
    if cfg!(debug_assertions) {
        let mut full = vec!["loadtest".to_owned()];
        full.extend(args.iter().cloned());
        return reexec_release(root, &full);
    }
    run_loadtest(root, &options)
}

pub(crate) fn run_loadtest(root: &Path, options: &Options) -> anyhow::Result<()> {
    let mut servers = vec![ServerKind::Hubbub];
    servers.extend(options.compare.iter().copied().filter(|k| *k != ServerKind::Hubbub));
    prepare(root, &servers)?;
    let mut results: Vec<(Scenario, Params, Vec<Report>)> = Vec::new();
    for &scenario in &options.scenarios {
        let params = Params::new(scenario, &options.scale, options.quick);
        eprintln!("\nxtask loadtest: {} — {}", scenario.name(), params.describe(scenario));
        let mut reports = Vec::new();
        for round in 0..options.rounds {
            // Alternate which server goes first, so neither always gets the
            // machine just after the other has warmed or fragmented it.
            let mut order = servers.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for &server in &order {
                let report = run_one(root, scenario, &params, server)
                    .with_context(|| format!("{} against {}", scenario.name(), server.name()))?;
                eprintln!("  {}", one_line(scenario, &report));
                reports.push(report);
            }
        }
        print_table(scenario, &params, &reports, &servers);
        results.push((scenario, params, reports));
    }
    if options.json {
        #[allow(clippy::print_stdout)] // asked for with --json
        {
            println!("{}", json(&results));
        }
    }
    if options.write_docs {
        let (date, commit) = measure::date_and_commit(root);
        let body = docs_section(&options.command, &date, &commit, &results, &servers);
        measure::replace_section(&root.join("docs/BENCHMARKS.md"), "loadtest", "## Load benchmark", &body)?;
    }
    Ok(())
}

/// Builds the release server and installs the compared Node peers'
/// packages.
fn prepare(root: &Path, servers: &[ServerKind]) -> anyhow::Result<()> {
    crate::run(root, "cargo", &["build", "--release", "--package", "hubbub"])?;
    for &kind in servers {
        let Some(dir) = kind.peer_dir() else { continue };
        if Command::new("npm").arg("--version").output().is_err() {
            bail!(
                "--compare {} needs Node.js and npm (on Debian: apt-get install -y nodejs npm)",
                kind.name()
            );
        }
        crate::run(&root.join(dir), "npm", &["ci", "--no-audit", "--no-fund"])?;
    }
    Ok(())
}

fn start(root: &Path, kind: ServerKind) -> anyhow::Result<ServerProcess> {
    let mut command = match kind.peer_dir() {
        None => {
            // The binary `prepare` built, wherever CARGO_TARGET_DIR put it.
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| root.join("target"), |dir| root.join(dir));
            let uploads = target.join("loadtest/uploads");
            let mut command = Command::new(target.join("release/hubbub"));
            command
                .args(["--listen", "127.0.0.1:0", "--no-rate-limit", "--log", "warn", "--upload-dir"])
                .arg(uploads)
                // All the load comes from 127.0.0.x.
                .env("HUBBUB_LIMITS_MAX_CONNECTIONS_PER_IP", "0")
                .env("HUBBUB_HTTP_MAX_CONNECTIONS_PER_IP", "0");
            command
        }
        // Each peer prints `... listening on HOST:PORT` as Hubbub does.
        Some(dir) => {
            let mut command = Command::new("node");
            command.arg(root.join(dir).join("server.js")).env("HOST", "127.0.0.1").env("PORT", "0");
            command
        }
    };
    command.current_dir(root);
    let server = ServerProcess::start(command)?;
    // Let the process finish starting before its baseline is read.
    std::thread::sleep(Duration::from_millis(300));
    Ok(server)
}

fn run_one(root: &Path, scenario: Scenario, params: &Params, kind: ServerKind) -> anyhow::Result<Report> {
    let mut server = start(root, kind)?;
    let mut report = match scenario {
        Scenario::Churn => churn(&mut server, params, kind)?,
        _ => clients(&mut server, scenario, params)?,
    };
    report.server = kind.name();
    server.check_alive()?;
    Ok(report)
}

/// Runs the scenarios made of long-lived clients: fanout, fixed, rooms, idle.
fn clients(server: &mut ServerProcess, scenario: Scenario, params: &Params) -> anyhow::Result<Report> {
    let sending = match scenario {
        Scenario::Fanout => Sending::Window { senders: params.senders, window: params.window },
        Scenario::Fixed => {
            // Each message reaches the room's other members.
            let recipients = (params.clients / params.rooms).saturating_sub(1).max(1) as f64;
            let per_sender = params.rate / recipients / params.senders.max(1) as f64;
            Sending::Rate { senders: params.senders, period: Duration::from_secs_f64(1.0 / per_sender) }
        }
        Scenario::Rooms => {
            Sending::Rate { senders: params.senders, period: Duration::from_secs_f64(1.0 / params.rate) }
        }
        Scenario::Idle | Scenario::Churn => Sending::Nobody,
    };
    let plan = Arc::new(Plan {
        addr: server.addr,
        clients: params.clients,
        rooms: params.rooms,
        sending,
        threads: params.threads,
        sources: params.sources,
        // Idle clients hold little; busy receivers read in large gulps.
        read_buffer: match scenario {
            Scenario::Idle => 1024,
            Scenario::Rooms => 4096,
            _ => 64 * 1024,
        },
        connect_concurrency: 64,
        padding: params.padding,
    });
    let shared = Shared::new(&plan);
    let rss_base = server.rss()?;
    let started = Instant::now();
    let (outcome, histogram) =
        loadgen::run_clients(&plan, &shared, || drive(server, scenario, params, &plan, &shared, started))?;
    let mut report = outcome?;
    report.rss_base = rss_base;
    if histogram.count() > 0 {
        let q = |q| histogram.quantile(q);
        report.latency = Some([q(0.5), q(0.9), q(0.99), q(0.999), histogram.max()]);
    }
    Ok(report)
}

/// The phases of a client scenario, from the main thread.
fn drive(
    server: &mut ServerProcess,
    scenario: Scenario,
    params: &Params,
    plan: &Plan,
    shared: &Shared,
    started: Instant,
) -> anyhow::Result<Report> {
    // Everyone connected (or failed), then every join announced.
    let limit = Duration::from_secs(60) + Duration::from_millis(params.clients as u64 * 4);
    wait_until(limit, "clients to connect and join", || {
        shared.ready.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) >= plan.clients
    })?;
    let failed = shared.failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first = shared.first_error.lock().map(|e| e.clone()).unwrap_or_default().unwrap_or_default();
        let message = format!("{failed} of {} connections failed; first error: {first}", plan.clients);
        if scenario != Scenario::Idle {
            bail!(message);
        }
        eprintln!("  {message}");
    }
    if failed == 0 {
        let want = plan.expected_join_events();
        wait_until(Duration::from_secs(60), "every userJoined to arrive", || {
            shared.join_events.load(Ordering::Relaxed) >= want
        })?;
    }
    let connect = started.elapsed();
    server.check_alive()?;
    let mut report =
        Report { connections: shared.ready.load(Ordering::Relaxed), connect, ..Report::default() };

    if scenario == Scenario::Idle {
        std::thread::sleep(Duration::from_secs_f64(params.seconds));
        let (cpu0, t0) = (server.cpu()?, Instant::now());
        std::thread::sleep(Duration::from_secs(1));
        report.server_cpu = percent(server.cpu()? - cpu0, t0.elapsed());
        report.rss = server.rss()?;
        report.closed = shared.closed.load(Ordering::Relaxed);
        return Ok(report);
    }

    let (cpu0, gen0, delivered0) =
        (server.cpu()?, measure::own_cpu_time()?, shared.delivered.load(Ordering::Relaxed));
    let t0 = Instant::now();
    shared.set_phase(Phase::Run);
    std::thread::sleep(Duration::from_secs_f64(params.seconds));
    shared.set_phase(Phase::Drain);
    let window = t0.elapsed();
    let (cpu1, gen1, delivered1) =
        (server.cpu()?, measure::own_cpu_time()?, shared.delivered.load(Ordering::Relaxed));
    report.rss = server.rss()?;
    // What was sent must arrive; give it a little time.
    let _ = wait_until(Duration::from_secs(10), "deliveries to drain", || {
        shared.delivered.load(Ordering::Relaxed) >= shared.expected.load(Ordering::Relaxed)
    });
    report.deliveries_per_sec = (delivered1 - delivered0) as f64 / window.as_secs_f64();
    report.server_cpu = percent(cpu1 - cpu0, window);
    report.generator_cpu = percent(gen1 - gen0, window);
    report.sent = shared.sent.load(Ordering::Relaxed);
    report.expected = shared.expected.load(Ordering::Relaxed);
    report.delivered = shared.delivered.load(Ordering::Relaxed);
    report.closed = shared.closed.load(Ordering::Relaxed);
    Ok(report)
}

fn percent(cpu: Duration, window: Duration) -> f64 {
    cpu.as_secs_f64() / window.as_secs_f64().max(1e-9) * 100.0
}

fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// `churn`: `workers` loops of connect, greeting, close, for `seconds`,
/// after a one-second warm-up; then RSS and connections after a pause.
fn churn(server: &mut ServerProcess, params: &Params, kind: ServerKind) -> anyhow::Result<Report> {
    let plan = Plan {
        addr: server.addr,
        clients: 0,
        rooms: 1,
        sending: Sending::Nobody,
        threads: params.threads,
        sources: params.sources,
        read_buffer: 1024,
        connect_concurrency: params.workers,
        padding: 0,
    };
    let warmup = run_churn(&plan, params.workers, Duration::from_secs(1))?;
    if warmup.0 == 0 {
        bail!("no connection completed during the warm-up ({} failures)", warmup.1);
    }
    std::thread::sleep(Duration::from_secs(2));
    let rss_base = server.rss()?;
    let (cpu0, gen0, t0) = (server.cpu()?, measure::own_cpu_time()?, Instant::now());
    let (done, failures, histogram) =
        run_churn(&plan, params.workers, Duration::from_secs_f64(params.seconds))?;
    let elapsed = t0.elapsed();
    let (cpu1, gen1) = (server.cpu()?, measure::own_cpu_time()?);
    let rss = server.rss()?;
    std::thread::sleep(Duration::from_secs(5));
    let rss_after = server.rss()?;
    let connections_after = match kind {
        ServerKind::Hubbub => http_status_connections(server.addr).ok(),
        ServerKind::NodeWs | ServerKind::Uws => None,
    };
    Ok(Report {
        connections: done as usize,
        connects_per_sec: done as f64 / elapsed.as_secs_f64(),
        failures,
        latency: (histogram.count() > 0).then(|| {
            [
                histogram.quantile(0.5),
                histogram.quantile(0.9),
                histogram.quantile(0.99),
                histogram.quantile(0.999),
                histogram.max(),
            ]
        }),
        server_cpu: percent(cpu1 - cpu0, elapsed),
        generator_cpu: percent(gen1 - gen0, elapsed),
        rss_base,
        rss,
        rss_after: Some(rss_after),
        connections_after,
        ..Report::default()
    })
}

/// Runs the churn loops for `length`; returns cycles done, failures, and the
/// cycle times.
fn run_churn(plan: &Plan, workers: usize, length: Duration) -> anyhow::Result<(u64, u64, Histogram)> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + length;
    let threads = plan.threads.max(1);
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let (plan, done, failed) = (plan.clone(), done.clone(), failed.clone());
            std::thread::spawn(move || -> anyhow::Result<Histogram> {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                let local = tokio::task::LocalSet::new();
                let histogram = std::rc::Rc::new(std::cell::RefCell::new(Histogram::new()));
                local.block_on(&runtime, async {
                    let mut tasks = Vec::new();
                    for worker in (thread..workers).step_by(threads) {
                        let (plan, done, failed, histogram) =
                            (plan.clone(), done.clone(), failed.clone(), histogram.clone());
                        tasks.push(tokio::task::spawn_local(async move {
                            let mut id = worker;
                            while Instant::now() < deadline {
                                match loadgen::churn::churn_once(&plan, id, Duration::from_secs(10)).await {
                                    Ok(took) => {
                                        done.fetch_add(1, Ordering::Relaxed);
                                        histogram.borrow_mut().record(took.as_micros() as u64);
                                    }
                                    Err(err) => {
                                        if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                                            eprintln!("  churn: {err:#}");
                                        }
                                        tokio::time::sleep(Duration::from_millis(10)).await;
                                    }
                                }
                                id += workers;
                            }
                        }));
                    }
                    for task in tasks {
                        let _ = task.await;
                    }
                });
                Ok(histogram.take())
            })
        })
        .collect();
    let mut histogram = Histogram::new();
    for handle in handles {
        let part = handle.join().map_err(|_| anyhow::anyhow!("a churn thread panicked"))??;
        histogram.merge(&part);
    }
    Ok((done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed), histogram))
}

/// `connections` from Hubbub's `GET /api/status`.
fn http_status_connections(addr: std::net::SocketAddr) -> anyhow::Result<u64> {
    let mut tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.write_all(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    tcp.read_to_string(&mut body)?;
    let at = body.find("\"connections\":").context("no connections in /api/status")?;
    let digits: String = body[at + 14..].chars().take_while(char::is_ascii_digit).collect();
    Ok(digits.parse()?)
}

fn ms(d: Duration) -> String {
    loadgen::format_ms(d.as_secs_f64() * 1000.0)
}

fn rate(per_sec: f64) -> String {
    if per_sec >= 1e6 {
        format!("{:.2} M/s", per_sec / 1e6)
    } else if per_sec >= 1e3 {
        format!("{:.1} k/s", per_sec / 1e3)
    } else {
        format!("{per_sec:.1}/s")
    }
}

fn one_line(scenario: Scenario, r: &Report) -> String {
    match scenario {
        Scenario::Idle => format!(
            "{}: {} connections, RSS {} -> {} ({:.2} KB per connection), CPU idle {:.1} %",
            r.server,
            r.connections,
            format_mib(r.rss_base),
            format_mib(r.rss),
            r.rss_per_connection() / 1000.0,
            r.server_cpu
        ),
        Scenario::Churn => format!(
            "{}: {} connects/s ({} cycles, {} failures), RSS {} -> {} -> {} after 5 s",
            r.server,
            rate(r.connects_per_sec),
            r.connections,
            r.failures,
            format_mib(r.rss_base),
            format_mib(r.rss),
            format_mib(r.rss_after.unwrap_or_default())
        ),
        _ => {
            let p = r.latency.map(|l| l.map(ms)).unwrap_or_default();
            format!(
                "{}: {} deliveries, p50 {} p99 {} max {}, lost {}, server CPU {:.0} %, generator CPU {:.0} %",
                r.server,
                rate(r.deliveries_per_sec),
                p[0],
                p[2],
                p[4],
                r.lost(),
                r.server_cpu,
                r.generator_cpu
            )
        }
    }
}

/// A Markdown table of one scenario's runs, with Hubbub's advantage over
/// each peer (times better: >1 means Hubbub is ahead) from the first round.
fn table(scenario: Scenario, reports: &[Report], servers: &[ServerKind]) -> String {
    let mut out = String::new();
    let (header, rows): (&str, Vec<(String, Vec<f64>)>) = match scenario {
        Scenario::Idle => (
            "| server | connections | setup | server RSS before | server RSS with clients | RSS per connection | server CPU idle |\n| --- | --- | --- | --- | --- | --- | --- |",
            reports
                .iter()
                .map(|r| {
                    let row = format!(
                        "| {} | {} | {:.1} s | {} | {} | {:.2} KB | {:.1} % |",
                        r.server,
                        r.connections,
                        r.connect.as_secs_f64(),
                        format_mib(r.rss_base),
                        format_mib(r.rss),
                        r.rss_per_connection() / 1000.0,
                        r.server_cpu
                    );
                    (row, vec![r.rss_per_connection()])
                })
                .collect(),
        ),
        Scenario::Churn => (
            "| server | connects/s | cycle p50 | cycle p99 | failures | server CPU | generator CPU | RSS baseline | RSS at end | RSS 5 s later | connections 5 s later |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            reports
                .iter()
                .map(|r| {
                    let l = r.latency.unwrap_or_default();
                    let row = format!(
                        "| {} | {:.0} | {} | {} | {} | {:.0} % | {:.0} % | {} | {} | {} | {} |",
                        r.server,
                        r.connects_per_sec,
                        ms(l[0]),
                        ms(l[2]),
                        r.failures,
                        r.server_cpu,
                        r.generator_cpu,
                        format_mib(r.rss_base),
                        format_mib(r.rss),
                        format_mib(r.rss_after.unwrap_or_default()),
                        r.connections_after.map_or_else(|| "n/a".to_owned(), |c| c.to_string())
                    );
                    (row, vec![r.connects_per_sec])
                })
                .collect(),
        ),
        _ => (
            "| server | setup | deliveries/s | p50 | p90 | p99 | p99.9 | max | lost | closed | server CPU | generator CPU | server RSS |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            reports
                .iter()
                .map(|r| {
                    let l = r.latency.unwrap_or_default();
                    let row = format!(
                        "| {} | {:.1} s | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.0} % | {:.0} % | {} |",
                        r.server,
                        r.connect.as_secs_f64(),
                        r.deliveries_per_sec,
                        ms(l[0]),
                        ms(l[1]),
                        ms(l[2]),
                        ms(l[3]),
                        ms(l[4]),
                        r.lost(),
                        r.closed,
                        r.server_cpu,
                        r.generator_cpu,
                        format_mib(r.rss)
                    );
                    (row, vec![r.deliveries_per_sec, l[0].as_secs_f64(), l[2].as_secs_f64(), r.server_cpu])
                })
                .collect(),
        ),
    };
    let _ = writeln!(out, "{header}");
    for (row, _) in &rows {
        let _ = writeln!(out, "{row}");
    }
    // Ratios: Hubbub's first run against each peer's first run.
    let first = |name: &str| reports.iter().position(|r| r.server == name).map(|i| &rows[i].1);
    if let Some(hub) = first(ServerKind::Hubbub.name()) {
        for peer in servers.iter().filter(|s| **s != ServerKind::Hubbub) {
            let Some(other) = first(peer.name()) else { continue };
            let times = |h: f64, o: f64, higher_better: bool| {
                let x = if higher_better { h / o } else { o / h };
                if x.is_finite() { format!("×{x:.1}") } else { "n/a".to_owned() }
            };
            // For a figure where less is better: "×2.0 lower" when Hubbub's
            // is lower, "×1.5 higher" when it is not.
            let less = |h: f64, o: f64, lower: &str, higher: &str| {
                let x = o / h;
                if !x.is_finite() || x == 0.0 {
                    "n/a".to_owned()
                } else if x >= 1.0 {
                    format!("×{x:.1} {lower}")
                } else {
                    format!("×{:.1} {higher}", 1.0 / x)
                }
            };
            let line = match scenario {
                Scenario::Idle => format!(
                    "\nHubbub vs {}: RSS per connection {}.",
                    peer.name(),
                    less(hub[0], other[0], "smaller", "larger")
                ),
                Scenario::Churn => {
                    format!(
                        "\nHubbub vs {}: {} the connects per second.",
                        peer.name(),
                        times(hub[0], other[0], true)
                    )
                }
                _ => format!(
                    "\nHubbub vs {}: deliveries/s {}, p50 {}, p99 {}, server CPU {}.",
                    peer.name(),
                    times(hub[0], other[0], true),
                    less(hub[1], other[1], "lower", "higher"),
                    less(hub[2], other[2], "lower", "higher"),
                    less(hub[3], other[3], "lower", "higher")
                ),
            };
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

fn print_table(scenario: Scenario, params: &Params, reports: &[Report], servers: &[ServerKind]) {
    eprintln!(
        "\n### {} — {}\n\n{}",
        scenario.name(),
        params.describe(scenario),
        table(scenario, reports, servers)
    );
}

fn docs_section(
    command: &str,
    date: &str,
    commit: &str,
    results: &[(Scenario, Params, Vec<Report>)],
    servers: &[ServerKind],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "```sh\n{command}\n```\n");
    let _ = writeln!(
        out,
        "Run on {date}, commit `{commit}`, {}; the generator (one process, {} thread(s)) on the same machine.\n",
        measure::machine(),
        results.first().map_or(1, |(_, p, _)| p.threads)
    );
    for (scenario, params, reports) in results {
        let _ = writeln!(
            out,
            "### {} — {}\n\n{}",
            scenario.name(),
            params.describe(*scenario),
            table(*scenario, reports, servers)
        );
    }
    out
}

fn json(results: &[(Scenario, Params, Vec<Report>)]) -> String {
    let mut out = String::from("[");
    for (scenario, params, reports) in results {
        for r in reports {
            if out.len() > 1 {
                out.push(',');
            }
            let l = r.latency.unwrap_or_default().map(|d| d.as_secs_f64() * 1000.0);
            let _ = write!(
                out,
                r#"{{"scenario":"{}","server":"{}","params":"{}","connections":{},"setupSeconds":{:.3},"deliveriesPerSec":{:.1},"sent":{},"expected":{},"delivered":{},"lost":{},"closed":{},"latencyMs":{{"p50":{:.3},"p90":{:.3},"p99":{:.3},"p999":{:.3},"max":{:.3}}},"serverCpuPercent":{:.1},"generatorCpuPercent":{:.1},"rssBaseBytes":{},"rssBytes":{},"rssAfterBytes":{},"rssPerConnectionBytes":{:.0},"connectsPerSec":{:.1},"failures":{},"connectionsAfter":{}}}"#,
                scenario.name(),
                r.server,
                params.describe(*scenario),
                r.connections,
                r.connect.as_secs_f64(),
                r.deliveries_per_sec,
                r.sent,
                r.expected,
                r.delivered,
                r.lost(),
                r.closed,
                l[0],
                l[1],
                l[2],
                l[3],
                l[4],
                r.server_cpu,
                r.generator_cpu,
                r.rss_base,
                r.rss,
                r.rss_after.map_or_else(|| "null".to_owned(), |v| v.to_string()),
                r.rss_per_connection(),
                r.connects_per_sec,
                r.failures,
                r.connections_after.map_or_else(|| "null".to_owned(), |v| v.to_string()),
            );
        }
    }
    out.push(']');
    out
}
