//! `cargo xtask loadtest`: end-to-end load scenarios against a freshly
//! started release `hubbub`, and with `--compare node-ws,uws` against the
//! reference servers in `bench/peers/` in the same run: `node-ws` (Node's
//! `ws`) and `uws` (uWebSockets.js), both speaking the same chat protocol.
//! Servers alternate on fresh processes so the ratios hold on a noisy
//! machine.
//!
//! With `--cluster N` (issue 18) the scenarios also run against N `hubbub`
//! nodes sharing one fresh `redis-server`, the clients spread over the
//! nodes round robin, beside single-node Hubbub in the same run; and
//! `--compare node-ws-redis` runs N processes of the Node `ws` tutorial's
//! server scaled with Redis pub/sub (`bench/peers/node-ws-redis`). The
//! tables then give the nodes' CPU and Redis's apart.
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
//! This file is orchestration and reporting only: which servers, which
//! sizes, in what order, and the tables. Running the clients and measuring
//! (latency, deliveries, CPU and RSS from /proc) is the `hubbub-loadgen`
//! library's [`run::run`] and [`churn::run`], the same code the `hubbub-loadgen`
//! binary runs; `--json` prints their summaries. Every run is bounded in
//! time and count, and all traffic goes to 127.0.0.1.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::ValueEnum;
use clap::builder::PossibleValue;
use hubbub_loadgen::{Plan, Sending, churn, format_mib, format_ms, run};
use serde::Serialize;

use crate::measure::{self, ServerProcess};
use crate::redis::{self, RedisServer, TempDir};

/// How long a fresh server gets to finish starting before its baseline is
/// read.
const START_PAUSE: Duration = Duration::from_millis(300);
/// The longest wait, after the window, for deliveries still in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The window over which `idle` measures the server's CPU, after its pause.
const IDLE_CPU_WINDOW: Duration = Duration::from_secs(1);
/// `churn`'s unmeasured warm-up, and the pause after it.
const CHURN_WARMUP: Duration = Duration::from_secs(1);
const CHURN_PAUSE: Duration = Duration::from_secs(2);
/// How long after `churn` its RSS and connection count are read again.
const CHURN_AFTER: Duration = Duration::from_secs(5);
/// The longest one churn cycle may wait for the greeting or the close.
const CHURN_CYCLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A churn loop's pause after a failed cycle.
const CHURN_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// A named scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    Fanout,
    Fixed,
    Rooms,
    Idle,
    Churn,
}

impl Scenario {
    /// The scenarios `--cluster` runs when none is named, as issue 18 asks.
    const CLUSTER: &[Self] = &[Self::Fanout, Self::Rooms];
    /// The scenarios a cluster can run: those of long-lived clients that
    /// send.
    const CLUSTER_CAN: &[Self] = &[Self::Fanout, Self::Fixed, Self::Rooms];

    fn name(self) -> &'static str {
        match self {
            Self::Fanout => "fanout",
            Self::Fixed => "fixed",
            Self::Rooms => "rooms",
            Self::Idle => "idle",
            Self::Churn => "churn",
        }
    }
}

/// What the command line names: one scenario, or `all`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Selection {
    One(Scenario),
    All,
}

impl Selection {
    const EVERY: [Self; 6] = [
        Self::One(Scenario::Fanout),
        Self::One(Scenario::Fixed),
        Self::One(Scenario::Rooms),
        Self::One(Scenario::Idle),
        Self::One(Scenario::Churn),
        Self::All,
    ];
}

impl ValueEnum for Selection {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::EVERY
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        match self {
            Self::One(scenario) => scenario.to_possible_value(),
            Self::All => Some(PossibleValue::new("all").help("every scenario")),
        }
    }
}

/// A server the scenarios run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ServerKind {
    /// Always run; not a `--compare` choice.
    #[value(skip)]
    Hubbub,
    /// `bench/peers/node-ws/`: Node's `ws`.
    NodeWs,
    /// `bench/peers/uws/`: uWebSockets.js.
    Uws,
    /// `bench/peers/node-ws-redis/`: Node's `ws` with Redis pub/sub between
    /// processes; N of them with `--cluster N`.
    NodeWsRedis,
    /// Hubbub with its room history off (`HUBBUB_HISTORY_STORE=off`): what
    /// keeping history costs, by difference with the default `hubbub` row.
    HubbubNoHistory,
}

impl ServerKind {
    fn name(self) -> &'static str {
        match self {
            Self::Hubbub => "hubbub",
            Self::NodeWs => "node-ws",
            Self::Uws => "uws",
            Self::NodeWsRedis => "node-ws-redis",
            Self::HubbubNoHistory => "hubbub-no-history",
        }
    }

    /// Whether it is the `hubbub` binary (with or without history).
    fn is_hubbub(self) -> bool {
        matches!(self, Self::Hubbub | Self::HubbubNoHistory)
    }

    /// Whether its processes can share a Redis and serve one chat
    /// together (a cluster keeps its history in Redis, so not without it).
    fn clusters(self) -> bool {
        matches!(self, Self::Hubbub | Self::NodeWsRedis)
    }

    /// Whether it cannot run without a Redis, even as one process.
    fn needs_redis(self) -> bool {
        self == Self::NodeWsRedis
    }

    /// A reference peer's folder, holding its `package.json` and
    /// `server.js`; Hubbub has none.
    fn peer_dir(self) -> Option<&'static str> {
        match self {
            Self::Hubbub | Self::HubbubNoHistory => None,
            Self::NodeWs => Some("bench/peers/node-ws"),
            Self::Uws => Some("bench/peers/uws"),
            Self::NodeWsRedis => Some("bench/peers/node-ws-redis"),
        }
    }
}

/// What one run starts: some processes of one server kind, and whether
/// they share a fresh Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Target {
    kind: ServerKind,
    /// Processes started; client `i` connects to the `(i mod nodes)`-th.
    nodes: usize,
    /// Whether a fresh `redis-server` is started and every process pointed
    /// at it.
    redis: bool,
}

impl Target {
    /// One process of `kind`, with the Redis it cannot do without.
    fn single(kind: ServerKind) -> Self {
        Self { kind, nodes: 1, redis: kind.needs_redis() }
    }

    /// The name its rows and ratio lines carry: the kind's name, and the
    /// number of nodes when it runs as a cluster (`hubbub (3 nodes)`).
    fn label(self) -> String {
        if self == Self::single(self.kind) {
            return self.kind.name().to_owned();
        }
        let plural = if self.nodes == 1 { "" } else { "s" };
        format!("{} ({} node{plural})", self.kind.name(), self.nodes)
    }
}

/// Size knobs; each one left out takes the scenario's default.
#[derive(Clone, Debug, Default, clap::Args)]
struct Scale {
    /// Clients to connect.
    #[arg(long, value_name = "N")]
    clients: Option<usize>,
    /// Rooms the clients are spread over.
    #[arg(long, value_name = "N")]
    rooms: Option<usize>,
    /// Clients that send (fanout, fixed).
    #[arg(long, value_name = "N")]
    senders: Option<usize>,
    /// Undelivered messages each fanout sender may have, 1 to 64.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    window: Option<u32>,
    /// Deliveries per second (fixed) or messages per client per second (rooms).
    #[arg(long, value_name = "R")]
    rate: Option<f64>,
    /// Length of the measured window (for idle: the pause before it).
    #[arg(long, value_name = "S")]
    seconds: Option<f64>,
    /// Concurrent connect-close loops (churn).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Generator threads (default 2 for churn, 1 for the others).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Source addresses 127.0.0.1 ... 127.0.0.N.
    #[arg(long, value_name = "N")]
    sources: Option<usize>,
    /// Bytes of padding in each chat message.
    #[arg(long, value_name = "BYTES")]
    padding: Option<usize>,
    /// Clients offer permessage-deflate (as browsers do).
    #[arg(long)]
    deflate: bool,
}

/// Load scenarios against release hubbub and the reference peers in
/// `bench/peers`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Scenarios to run; all of them when none is named.
    #[arg(value_name = "SCENARIO")]
    scenarios: Vec<Selection>,
    /// A scenario to run, as the positional form (may repeat).
    #[arg(long = "scenario", value_name = "SCENARIO")]
    scenario_flags: Vec<Selection>,
    /// Reference peers to run beside hubbub: a comma-separated list, or the
    /// flag repeated.
    #[arg(long, value_name = "PEERS", value_delimiter = ',')]
    compare: Vec<ServerKind>,
    /// Also run N hubbub nodes sharing a fresh redis-server (and N
    /// processes of each peer that can: node-ws-redis), clients spread over
    /// the nodes; scenarios fanout, fixed and rooms (fanout and rooms by
    /// default).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16))]
    cluster: Option<u16>,
    #[command(flatten)]
    scale: Scale,
    /// Divide every default size by 10 and run windows of at most 3 s.
    #[arg(long)]
    quick: bool,
    /// Runs of each server per scenario, alternating which goes first.
    #[arg(long, value_name = "N", default_value_t = 1)]
    rounds: usize,
    /// Print every run's summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Rewrite the load benchmark section of docs/BENCHMARKS.md.
    #[arg(long)]
    write_docs: bool,
}

impl Options {
    /// The scenarios named, in order and each once; all when none is (with
    /// `--cluster`, all those a cluster runs: see [`Scenario::CLUSTER`]).
    fn scenarios(&self) -> Vec<Scenario> {
        let every = if self.cluster.is_some() { Scenario::CLUSTER } else { Scenario::value_variants() };
        let mut scenarios: Vec<Scenario> = Vec::new();
        for selection in self.scenarios.iter().chain(&self.scenario_flags) {
            let named = match selection {
                Selection::One(scenario) => std::slice::from_ref(scenario),
                Selection::All => every,
            };
            for &scenario in named {
                if !scenarios.contains(&scenario) {
                    scenarios.push(scenario);
                }
            }
        }
        if scenarios.is_empty() {
            scenarios = every.to_vec();
        }
        scenarios
    }

    /// What runs, in order: with `--cluster N`, N hubbub nodes first; then
    /// single-node hubbub; then each peer to compare, once, as N processes
    /// if it can run as a cluster.
    fn targets(&self) -> Vec<Target> {
        let cluster = self.cluster.map(usize::from);
        let mut targets = Vec::new();
        if let Some(nodes) = cluster {
            targets.push(Target { kind: ServerKind::Hubbub, nodes, redis: true });
        }
        targets.push(Target::single(ServerKind::Hubbub));
        for &peer in &self.compare {
            let target = match cluster {
                Some(nodes) if peer.clusters() => Target { nodes, ..Target::single(peer) },
                _ => Target::single(peer),
            };
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
        targets
    }

    /// Refuses what a cluster cannot run: `idle` and `churn` measure one
    /// process.
    fn check(&self) -> anyhow::Result<()> {
        if self.cluster.is_some()
            && let Some(scenario) = self.scenarios().into_iter().find(|s| !Scenario::CLUSTER_CAN.contains(s))
        {
            bail!("--cluster runs fanout, fixed and rooms, not {}", scenario.name());
        }
        Ok(())
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
    deflate: bool,
    /// Nodes of the clusters (`--cluster`), for the heading.
    cluster: Option<usize>,
}

impl Params {
    fn new(scenario: Scenario, scale: &Scale, quick: bool, cluster: Option<usize>) -> Self {
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
            // Churn's generator does most of the TCP work of a cycle (on
            // loopback the kernel handles a segment's receipt in the
            // sender's system call): with one thread it, not the server,
            // bounds the result. Two threads gave every server as much or
            // more (issue 19); the load scenarios' clients cost little.
            threads: scale.threads.unwrap_or(if scenario == Scenario::Churn { 2 } else { 1 }).max(1),
            // One source address per 10,000 connections keeps far from the
            // 28,232 ephemeral ports of one address; churn spreads wider so
            // closed connections' ports rest.
            sources: scale.sources.unwrap_or(match scenario {
                Scenario::Churn => 8,
                _ => clients.div_ceil(10_000).max(1),
            }),
            padding: scale.padding.unwrap_or(0),
            deflate: scale.deflate,
            cluster,
        }
    }

    fn describe(&self, scenario: Scenario) -> String {
        let sizes = self.sizes(scenario);
        match self.cluster {
            Some(nodes) => format!("{sizes}; clusters of {nodes} node(s) and one Redis"),
            None => sizes,
        }
    }

    fn sizes(&self, scenario: Scenario) -> String {
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
            Scenario::Churn => format!(
                "{} concurrent connect-close loops, {} s, {} generator thread(s)",
                self.workers, self.seconds, self.threads
            ),
        }
    }
}

/// What one run of one scenario against one server measured: the
/// generator's summary, labelled. `--json` prints a list of these.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    scenario: &'static str,
    /// The target's label: `hubbub`, `node-ws`, `hubbub (3 nodes)`.
    server: String,
    /// Processes of the server the clients were spread over.
    nodes: usize,
    /// The scenario's sizes, as the tables' headings give them.
    params: String,
    #[serde(flatten)]
    measured: Measured,
}

/// A load's summary, or churn's.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
enum Measured {
    /// `fanout`, `fixed`, `rooms` and `idle`.
    Load(run::Summary),
    /// `churn`.
    Churn(ChurnReport),
}

/// Churn's summary and what was read after it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ChurnReport {
    #[serde(flatten)]
    summary: churn::Summary,
    /// The server's RSS a few seconds after the run.
    rss_after_bytes: u64,
    /// Hubbub's open connections a few seconds after the run (`None` for a
    /// peer, which has no status endpoint).
    connections_after: Option<u64>,
}

/// The server's RSS growth per client of an idle run, in bytes.
fn rss_per_connection(summary: &run::Summary) -> f64 {
    let server = summary.server.unwrap_or_default();
    if summary.clients == 0 {
        return 0.0;
    }
    server.rss_bytes.saturating_sub(server.rss_base_bytes) as f64 / summary.clients as f64
}

/// Runs `args` (a `loadtest` command line) in an optimised build of xtask.
/// `cargo xtask` builds xtask without optimisation, and an unoptimised load
/// generator would measure itself, not the server.
pub(crate) fn reexec_release(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let mut full = vec!["run", "--release", "--quiet", "--package", "xtask", "--"];
    full.extend(args.iter().map(String::as_str));
    crate::run(root, "cargo", &full)
}

/// The command; `args` is its command line after `loadtest`, to re-run it
/// optimised and to quote it in the docs.
pub(crate) fn loadtest(root: &Path, options: &Options, args: &[String]) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        let mut full = vec!["loadtest".to_owned()];
        full.extend(args.iter().cloned());
        return reexec_release(root, &full);
    }
    let command = format!("cargo xtask loadtest {}", args.join(" ")).trim_end().to_owned();
    run_loadtest(root, options, &command)
}

fn run_loadtest(root: &Path, options: &Options, command: &str) -> anyhow::Result<()> {
    options.check()?;
    // Read before anything of this command runs: what else the machine
    // was doing.
    let load = measure::load_average();
    let targets = prepare(root, &options.targets())?;
    let labels: Vec<String> = targets.iter().map(|t| t.label()).collect();
    let cluster = options.cluster.map(usize::from);
    let mut results: Vec<(Scenario, Params, Vec<Report>)> = Vec::new();
    for scenario in options.scenarios() {
        let params = Params::new(scenario, &options.scale, options.quick, cluster);
        eprintln!("\nxtask loadtest: {} — {}", scenario.name(), params.describe(scenario));
        if let Some(nodes) = cluster.filter(|&n| gcd(n, params.rooms) > 1) {
            eprintln!(
                "  note: with {} rooms over {nodes} nodes each room's members are on {} node(s) only \
                 (client i joins room i % rooms on node i % nodes)",
                params.rooms,
                nodes / gcd(nodes, params.rooms)
            );
        }
        let mut reports = Vec::new();
        for round in 0..options.rounds.max(1) {
            // Alternate which server goes first, so neither always gets the
            // machine just after the other has warmed or fragmented it.
            let mut order = targets.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for &target in &order {
                let report = run_one(root, scenario, &params, target)
                    .with_context(|| format!("{} against {}", scenario.name(), target.label()))?;
                eprintln!("  {}", one_line(scenario, &report));
                reports.push(report);
            }
        }
        print_table(scenario, &params, &reports, &labels);
        results.push((scenario, params, reports));
    }
    if options.json {
        let reports: Vec<&Report> = results.iter().flat_map(|(_, _, reports)| reports).collect();
        let json = serde_json::to_string(&reports).context("encoding the reports")?;
        #[allow(clippy::print_stdout)] // asked for with --json
        {
            println!("{json}");
        }
    }
    if options.write_docs {
        let (date, commit) = measure::date_and_commit(root);
        let body = docs_section(command, &date, &commit, &results, &labels, &load);
        let docs = root.join("docs/BENCHMARKS.md");
        match cluster {
            Some(_) => measure::replace_section(&docs, "cluster", "## Cluster", &body)?,
            None => measure::replace_section(&docs, "loadtest", "## Load benchmark", &body)?,
        }
    }
    Ok(())
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Builds the release server, installs the compared Node peers' packages,
/// and checks that what the targets need is there; returns the targets that
/// can run (N hubbub nodes only if this hubbub has a cluster mode).
fn prepare(root: &Path, targets: &[Target]) -> anyhow::Result<Vec<Target>> {
    crate::run(root, "cargo", &["build", "--release", "--package", "hubbub"])?;
    let mut installed = Vec::new();
    for target in targets {
        let Some(dir) = target.kind.peer_dir() else { continue };
        if installed.contains(&dir) {
            continue;
        }
        installed.push(dir);
        if Command::new("npm").arg("--version").output().is_err() {
            bail!(
                "--compare {} needs Node.js and npm (on Debian: apt-get install -y nodejs npm)",
                target.kind.name()
            );
        }
        npm_ci(&root.join(dir))?;
    }
    if targets.iter().any(|t| t.redis) {
        redis::check_installed()?;
    }
    let hubbub = hubbub_binary(root);
    let help = measure::output(root, &hubbub.to_string_lossy(), &["--help"])?;
    let has_cluster_mode = help.contains("--redis-url");
    let mut runnable = Vec::new();
    for &target in targets {
        if target.kind == ServerKind::Hubbub && target.redis && !has_cluster_mode {
            eprintln!(
                "xtask loadtest: this hubbub has no cluster mode (no --redis-url in `hubbub --help`): \
                 {} is left out",
                target.label()
            );
            continue;
        }
        runnable.push(target);
    }
    Ok(runnable)
}

/// `npm ci` in a peer's folder, unless its `node_modules` was installed
/// from the `package-lock.json` there now (npm's own record of that install,
/// `node_modules/.package-lock.json`, is not older than the lock file).
fn npm_ci(dir: &Path) -> anyhow::Result<()> {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let installed = modified(&dir.join("node_modules/.package-lock.json"));
    let locked = modified(&dir.join("package-lock.json"));
    if let (Some(installed), Some(locked)) = (installed, locked)
        && installed >= locked
    {
        return Ok(());
    }
    crate::run(dir, "npm", &["ci", "--no-audit", "--no-fund"])
}

/// The release binary `prepare` built, wherever CARGO_TARGET_DIR put it.
fn hubbub_binary(root: &Path) -> PathBuf {
    crate::target_dir(root).join("release/hubbub")
}

/// The processes of one run, killed when dropped: the nodes first, then
/// Redis, then their temporary directory is removed.
struct Deployment {
    /// The server, or a cluster's nodes, in the order clients are spread
    /// over them.
    nodes: Vec<ServerProcess>,
    /// The Redis the nodes share.
    redis: Option<RedisServer>,
    /// Redis's directory, the shared uploads and each node's own data.
    _dir: Option<TempDir>,
}

impl Deployment {
    /// Fails if a node or Redis has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            node.check_alive().with_context(|| format!("node {i}"))?;
        }
        self.redis.as_mut().map_or(Ok(()), |redis| redis.check_alive().context("Redis"))
    }
}

/// Starts what `target` names: one server on its own as before, or a
/// fresh Redis and then the nodes, one after the other, each on a free
/// loopback port.
fn start(root: &Path, target: Target) -> anyhow::Result<Deployment> {
    if !target.redis {
        let mut command = server_command(root, target.kind);
        if target.kind.is_hubbub() {
            let data = crate::target_dir(root).join("loadtest");
            command.arg("--upload-dir").arg(data.join("uploads"));
        }
        command.current_dir(root);
        let server = ServerProcess::start(command)?;
        // Let the process finish starting before its baseline is read.
        std::thread::sleep(START_PAUSE);
        return Ok(Deployment { nodes: vec![server], redis: None, _dir: None });
    }
    let dir = TempDir::new("loadtest-cluster")?;
    let redis_dir = dir.path().join("redis");
    std::fs::create_dir_all(&redis_dir).context("creating Redis's directory")?;
    let redis = redis::start(&redis_dir)?;
    let mut deployment = Deployment { nodes: Vec::new(), redis: None, _dir: None };
    for node in 0..target.nodes {
        let mut command = server_command(root, target.kind);
        let own = dir.path().join(format!("node-{node}"));
        std::fs::create_dir_all(&own).with_context(|| format!("creating {}", own.display()))?;
        match target.kind {
            ServerKind::Hubbub => {
                // One upload directory for the cluster, as the nodes behind
                // one address need; anything else a node keeps goes to its
                // own working directory (history is in Redis).
                command
                    .arg("--upload-dir")
                    .arg(dir.path().join("uploads"))
                    .arg("--redis-url")
                    .arg(redis.url())
                    .env("HUBBUB_CLUSTER_NODE_NAME", format!("loadtest-{node}"));
            }
            _ => {
                command.env("REDIS_URL", redis.url());
            }
        }
        command.current_dir(&own);
        deployment.nodes.push(ServerProcess::start(command).with_context(|| format!("node {node}"))?);
    }
    (deployment.redis, deployment._dir) = (Some(redis), Some(dir));
    std::thread::sleep(START_PAUSE);
    Ok(deployment)
}

/// The command line of one process of `kind` on 127.0.0.1:0, without
/// where it keeps data.
fn server_command(root: &Path, kind: ServerKind) -> Command {
    match kind.peer_dir() {
        None => {
            let mut command = Command::new(hubbub_binary(root));
            if kind == ServerKind::HubbubNoHistory {
                command.env("HUBBUB_HISTORY_STORE", "off");
            }
            command
                .args(["--listen", "127.0.0.1:0", "--no-rate-limit", "--log", "warn"])
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
    }
}

fn run_one(root: &Path, scenario: Scenario, params: &Params, target: Target) -> anyhow::Result<Report> {
    let mut deployment = start(root, target)?;
    let measured = match scenario {
        Scenario::Churn => Measured::Churn(churn(&deployment.nodes[0], params, target.kind)?),
        _ => Measured::Load(clients(&mut deployment, scenario, params)?),
    };
    deployment.check_alive()?;
    Ok(Report {
        scenario: scenario.name(),
        server: target.label(),
        nodes: target.nodes,
        params: params.describe(scenario),
        measured,
    })
}

/// Runs the scenarios made of long-lived clients: fanout, fixed, rooms, idle.
fn clients(deployment: &mut Deployment, scenario: Scenario, params: &Params) -> anyhow::Result<run::Summary> {
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
    let (first, others) = deployment.nodes.split_first().context("no server was started")?;
    let plan = Plan {
        addr: first.addr,
        more_addrs: others.iter().map(|node| node.addr).collect(),
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
        deflate: params.deflate,
    };
    let seconds = Duration::from_secs_f64(params.seconds);
    let idle = scenario == Scenario::Idle;
    let options = run::Options {
        // Idle connections are measured after a pause of `seconds`, over a
        // short window.
        seconds: if idle { IDLE_CPU_WINDOW } else { seconds },
        setup_timeout: run::default_setup_timeout(params.clients),
        drain_timeout: DRAIN_TIMEOUT,
        settle: if idle { seconds } else { Duration::ZERO },
        // RSS per connection is still worth knowing if some could not
        // connect; a load with clients missing is not.
        allow_failed_connections: idle,
        server_pid: Some(first.pid()),
        more_server_pids: others.iter().map(ServerProcess::pid).collect(),
        redis_pid: deployment.redis.as_ref().and_then(RedisServer::pid),
        // Where one write per delivery is the question (issue 19); perf's
        // count costs a little per system call, so not in fanout, and it
        // follows one process, so not for a cluster.
        count_writes: scenario == Scenario::Rooms && others.is_empty(),
    };
    let summary = run::run(plan, &options);
    // A server that died explains a failed run better than its symptoms.
    deployment.check_alive()?;
    let summary = summary?;
    if summary.failed > 0 {
        let first = summary.first_error.as_deref().unwrap_or_default();
        eprintln!("  {} of {} connections failed; first error: {first}", summary.failed, params.clients);
    }
    Ok(summary)
}

/// `churn`: `workers` loops of connect, greeting, close, for `seconds`,
/// after an unmeasured warm-up; then RSS and connections after a pause.
fn churn(server: &ServerProcess, params: &Params, kind: ServerKind) -> anyhow::Result<ChurnReport> {
    let plan = Plan {
        addr: server.addr,
        more_addrs: Vec::new(),
        clients: 0,
        rooms: 1,
        sending: Sending::Nobody,
        threads: params.threads,
        sources: params.sources,
        read_buffer: 1024,
        connect_concurrency: params.workers,
        padding: 0,
        deflate: false,
    };
    let warmup = churn::Options {
        workers: params.workers,
        seconds: CHURN_WARMUP,
        cycle_timeout: CHURN_CYCLE_TIMEOUT,
        retry_pause: CHURN_RETRY_PAUSE,
        server_pid: None,
    };
    let warm = churn::run(&plan, &warmup)?;
    if warm.cycles == 0 {
        let first = warm.first_error.unwrap_or_default();
        bail!("no connection completed during the warm-up ({} failures; first: {first})", warm.failures);
    }
    std::thread::sleep(CHURN_PAUSE);
    let options = churn::Options {
        seconds: Duration::from_secs_f64(params.seconds),
        server_pid: Some(server.pid()),
        ..warmup
    };
    let summary = churn::run(&plan, &options)?;
    if let Some(first) = &summary.first_error {
        eprintln!("  churn: {} failures; first: {first}", summary.failures);
    }
    std::thread::sleep(CHURN_AFTER);
    let rss_after_bytes = server.rss()?;
    // Only Hubbub reports its connections (`/api/status`).
    let connections_after = if kind.is_hubbub() {
        measure::api_status(server.addr).ok().and_then(|s| s["connections"].as_u64())
    } else {
        None
    };
    Ok(ChurnReport { summary, rss_after_bytes, connections_after })
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

/// The progress line of one run.
fn one_line(scenario: Scenario, r: &Report) -> String {
    match &r.measured {
        Measured::Churn(c) => {
            let (s, server) = (&c.summary, c.summary.server.unwrap_or_default());
            format!(
                "{}: {} connects/s ({} cycles, {} failures), RSS {} -> {} -> {} after 5 s",
                r.server,
                rate(s.connects_per_sec),
                s.cycles,
                s.failures,
                format_mib(server.rss_base_bytes),
                format_mib(server.rss_bytes),
                format_mib(c.rss_after_bytes)
            )
        }
        Measured::Load(s) if scenario == Scenario::Idle => {
            let server = s.server.unwrap_or_default();
            format!(
                "{}: {} connections, RSS {} -> {} ({:.2} KB per connection), CPU idle {:.1} %",
                r.server,
                s.clients,
                format_mib(server.rss_base_bytes),
                format_mib(server.rss_bytes),
                rss_per_connection(s) / 1000.0,
                server.cpu_percent
            )
        }
        Measured::Load(s) => {
            let l = s.latency_ms.unwrap_or_default();
            let redis =
                s.redis.map(|redis| format!(", Redis CPU {:.0} %", redis.cpu_percent)).unwrap_or_default();
            format!(
                "{}: {} deliveries, p50 {} p99 {} max {}, lost {}, server CPU {}{redis}, generator CPU {:.0} %",
                r.server,
                rate(s.deliveries_per_sec),
                format_ms(l.p50),
                format_ms(l.p99),
                format_ms(l.max),
                lost(s),
                nodes_cpu(s),
                s.generator_cpu_percent
            )
        }
    }
}

/// Deliveries lost, and the error replies that announced some of them
/// (`54 (6 errors)`): a message the server refused with `unavailable` is
/// lost with notice, since the generator does not resend.
fn lost(s: &run::Summary) -> String {
    match s.errors {
        0 => s.lost.to_string(),
        errors => format!("{} ({errors} errors)", s.lost),
    }
}

/// The server's CPU, or a cluster's nodes' together and one by one:
/// `215 % (72 + 70 + 73)`.
fn nodes_cpu(s: &run::Summary) -> String {
    let all = s.server.unwrap_or_default().cpu_percent;
    if s.nodes.is_empty() {
        return format!("{all:.0} %");
    }
    let each: Vec<String> = s.nodes.iter().map(|node| format!("{:.0}", node.cpu_percent)).collect();
    format!("{all:.0} % ({})", each.join(" + "))
}

/// Whether a scenario's table needs the cluster's columns: some run had
/// several nodes or a Redis.
fn clustered(reports: &[Report]) -> bool {
    reports.iter().any(|r| r.nodes > 1 || matches!(&r.measured, Measured::Load(s) if s.redis.is_some()))
}

/// The table heading of a scenario's runs.
fn header(scenario: Scenario, clustered: bool) -> &'static str {
    match scenario {
        Scenario::Fanout | Scenario::Fixed | Scenario::Rooms if clustered => {
            "| server | nodes | setup | deliveries/s | p50 | p90 | p99 | p99.9 | max | lost | closed | nodes' CPU | Redis CPU | generator CPU | nodes' RSS |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        }
        Scenario::Idle => {
            "| server | connections | setup | server RSS before | server RSS with clients | RSS per connection | server CPU idle |\n| --- | --- | --- | --- | --- | --- | --- |"
        }
        Scenario::Churn => {
            "| server | connects/s | cycle p50 | cycle p99 | failures | server CPU | generator CPU | RSS baseline | RSS at end | RSS 5 s later | connections 5 s later |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        }
        Scenario::Fanout | Scenario::Fixed => {
            "| server | setup | deliveries/s | p50 | p90 | p99 | p99.9 | max | lost | closed | server CPU | CPU per delivery | generator CPU | server RSS |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        }
        Scenario::Rooms => {
            "| server | setup | deliveries/s | p50 | p90 | p99 | p99.9 | max | lost | closed | server CPU | CPU per delivery | writes per delivery | generator CPU | server RSS |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        }
    }
}

/// One run's table row, and the figures the ratio lines compare: for idle
/// the RSS per connection, for churn the connects per second, otherwise
/// deliveries per second, p50, p99 and server CPU (in a cluster's table,
/// the nodes' and Redis's together).
fn row(scenario: Scenario, r: &Report, clustered: bool) -> (String, Vec<f64>) {
    match &r.measured {
        Measured::Load(s) if clustered && scenario != Scenario::Idle => {
            let (server, l) = (s.server.unwrap_or_default(), s.latency_ms.unwrap_or_default());
            let redis_cpu = s.redis.map_or(0.0, |redis| redis.cpu_percent);
            let row = format!(
                "| {} | {} | {:.1} s | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} % | {} |",
                r.server,
                r.nodes,
                s.setup_seconds,
                s.deliveries_per_sec,
                format_ms(l.p50),
                format_ms(l.p90),
                format_ms(l.p99),
                format_ms(l.p999),
                format_ms(l.max),
                lost(s),
                s.closed,
                nodes_cpu(s),
                s.redis.map_or_else(|| "none".to_owned(), |redis| format!("{:.0} %", redis.cpu_percent)),
                s.generator_cpu_percent,
                format_mib(server.rss_bytes)
            );
            let cpu = server.cpu_percent + redis_cpu;
            let per_delivery =
                if s.deliveries_per_sec > 0.0 { cpu / 100.0 / s.deliveries_per_sec * 1e6 } else { f64::NAN };
            (row, vec![s.deliveries_per_sec, l.p50, l.p99, cpu, per_delivery])
        }
        Measured::Churn(c) => {
            let (s, server) = (&c.summary, c.summary.server.unwrap_or_default());
            let l = s.cycle_ms.unwrap_or_default();
            let row = format!(
                "| {} | {:.0} | {} | {} | {} | {:.0} % | {:.0} % | {} | {} | {} | {} |",
                r.server,
                s.connects_per_sec,
                format_ms(l.p50),
                format_ms(l.p99),
                s.failures,
                server.cpu_percent,
                s.generator_cpu_percent,
                format_mib(server.rss_base_bytes),
                format_mib(server.rss_bytes),
                format_mib(c.rss_after_bytes),
                c.connections_after.map_or_else(|| "n/a".to_owned(), |c| c.to_string())
            );
            (row, vec![s.connects_per_sec])
        }
        Measured::Load(s) if scenario == Scenario::Idle => {
            let server = s.server.unwrap_or_default();
            let row = format!(
                "| {} | {} | {:.1} s | {} | {} | {:.2} KB | {:.1} % |",
                r.server,
                s.clients,
                s.setup_seconds,
                format_mib(server.rss_base_bytes),
                format_mib(server.rss_bytes),
                rss_per_connection(s) / 1000.0,
                server.cpu_percent
            );
            (row, vec![rss_per_connection(s)])
        }
        Measured::Load(s) => {
            let (server, l) = (s.server.unwrap_or_default(), s.latency_ms.unwrap_or_default());
            let per_delivery = cpu_per_delivery_us(s);
            let writes = if scenario == Scenario::Rooms {
                let writes =
                    server.writes_per_delivery.map_or_else(|| "n/a".to_owned(), |w| format!("{w:.2}"));
                format!(" {writes} |")
            } else {
                String::new()
            };
            let row = format!(
                "| {} | {:.1} s | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.0} % | {} |{writes} {:.0} % | {} |",
                r.server,
                s.setup_seconds,
                s.deliveries_per_sec,
                format_ms(l.p50),
                format_ms(l.p90),
                format_ms(l.p99),
                format_ms(l.p999),
                format_ms(l.max),
                lost(s),
                s.closed,
                server.cpu_percent,
                per_delivery.map_or_else(|| "n/a".to_owned(), |us| format!("{us:.2} µs")),
                s.generator_cpu_percent,
                format_mib(server.rss_bytes)
            );
            (
                row,
                vec![
                    s.deliveries_per_sec,
                    l.p50,
                    l.p99,
                    server.cpu_percent,
                    per_delivery.unwrap_or(f64::NAN),
                ],
            )
        }
    }
}

/// The server's CPU time per delivery over the window, in microseconds.
fn cpu_per_delivery_us(s: &run::Summary) -> Option<f64> {
    let server = s.server?;
    (s.deliveries_per_sec > 0.0).then(|| server.cpu_percent / 100.0 / s.deliveries_per_sec * 1e6)
}

/// A Markdown table of one scenario's runs, with the first target's
/// advantage over each other one (times better: >1 means the first is
/// ahead) from the first round. `labels` are the targets' labels in the
/// order they were set up: Hubbub (with `--cluster`, its cluster) first.
fn table(scenario: Scenario, reports: &[Report], labels: &[String]) -> String {
    let mut out = String::new();
    let clustered = clustered(reports);
    let rows: Vec<(String, Vec<f64>)> = reports.iter().map(|r| row(scenario, r, clustered)).collect();
    let _ = writeln!(out, "{}", header(scenario, clustered));
    for (row, _) in &rows {
        let _ = writeln!(out, "{row}");
    }
    // Ratios: the first target's first run against each other's first run.
    let first = |label: &str| reports.iter().position(|r| r.server == label).map(|i| &rows[i].1);
    let Some((base, others)) = labels.split_first() else { return out };
    let Some(hub) = first(base) else { return out };
    let mut name = base.clone();
    if let Some(initial) = name.get_mut(..1) {
        initial.make_ascii_uppercase();
    }
    for other_label in others {
        let Some(other) = first(other_label) else { continue };
        let _ = writeln!(out, "\n{name} vs {other_label}: {}.", ratios(scenario, hub, other, clustered));
    }
    out
}

/// The ratio line's text for Hubbub's figures `hub` against a peer's.
fn ratios(scenario: Scenario, hub: &[f64], other: &[f64], clustered: bool) -> String {
    let times = |h: f64, o: f64| {
        let x = h / o;
        if x.is_finite() { format!("×{x:.1}") } else { "n/a".to_owned() }
    };
    // For a figure where less is better: "×2.0 lower" when Hubbub's is
    // lower, "×1.5 higher" when it is not.
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
    match scenario {
        Scenario::Idle => format!("RSS per connection {}", less(hub[0], other[0], "smaller", "larger")),
        Scenario::Churn => format!("{} the connects per second", times(hub[0], other[0])),
        Scenario::Fanout | Scenario::Fixed | Scenario::Rooms => format!(
            "deliveries/s {}, p50 {}, p99 {}, {} {}, CPU per delivery {}",
            times(hub[0], other[0]),
            less(hub[1], other[1], "lower", "higher"),
            less(hub[2], other[2], "lower", "higher"),
            if clustered { "CPU (nodes + Redis)" } else { "server CPU" },
            less(hub[3], other[3], "lower", "higher"),
            less(hub[4], other[4], "lower", "higher")
        ),
    }
}

fn print_table(scenario: Scenario, params: &Params, reports: &[Report], labels: &[String]) {
    eprintln!(
        "\n### {} — {}\n\n{}",
        scenario.name(),
        params.describe(scenario),
        table(scenario, reports, labels)
    );
}

fn docs_section(
    command: &str,
    date: &str,
    commit: &str,
    results: &[(Scenario, Params, Vec<Report>)],
    labels: &[String],
    load: &str,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "```sh\n{command}\n```\n");
    let _ = writeln!(
        out,
        "Run on {date}, commit `{commit}`, {}, load average {load} when it began; the generator (one process, {} thread(s) unless the scenario says otherwise) on the same machine.\n",
        measure::machine(),
        results
            .iter()
            .find(|(s, _, _)| *s != Scenario::Churn)
            .or(results.first())
            .map_or(1, |(_, p, _)| p.threads)
    );
    for (scenario, params, reports) in results {
        let _ = writeln!(
            out,
            "### {} — {}\n\n{}",
            scenario.name(),
            params.describe(*scenario),
            table(*scenario, reports, labels)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use hubbub_loadgen::run::{Latency, ServerSample};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        options: Options,
    }

    fn options(line: &str) -> Options {
        Cli::parse_from(std::iter::once("loadtest").chain(line.split_whitespace())).options
    }

    fn labels(targets: &[Target]) -> Vec<String> {
        targets.iter().map(|t| t.label()).collect()
    }

    #[test]
    fn scenarios_and_peers_are_named_once_each() {
        let o = options("fanout --scenario idle fanout --compare node-ws,uws --compare uws --quick");
        assert_eq!(o.scenarios(), [Scenario::Fanout, Scenario::Idle]);
        assert_eq!(labels(&o.targets()), ["hubbub", "node-ws", "uws"]);
        assert!(o.quick);
        assert_eq!(options("all").scenarios(), Scenario::value_variants());
        assert_eq!(options("--json").scenarios(), Scenario::value_variants());
        assert_eq!(labels(&options("").targets()), ["hubbub"]);
        let hubbub_is_not_a_peer = Cli::try_parse_from(["loadtest", "--compare", "hubbub"]);
        assert!(hubbub_is_not_a_peer.is_err());
    }

    #[test]
    fn a_cluster_runs_beside_single_node_hubbub_and_the_peers_that_can_cluster() {
        let o = options("--cluster 3 --compare node-ws-redis,node-ws");
        assert_eq!(o.scenarios(), [Scenario::Fanout, Scenario::Rooms]);
        assert_eq!(options("all --cluster 3").scenarios(), [Scenario::Fanout, Scenario::Rooms]);
        assert_eq!(
            labels(&o.targets()),
            ["hubbub (3 nodes)", "hubbub", "node-ws-redis (3 nodes)", "node-ws"]
        );
        let targets = o.targets();
        assert!(targets[0].redis && !targets[1].redis && targets[2].redis && !targets[3].redis);
        assert_eq!(targets.iter().map(|t| t.nodes).collect::<Vec<_>>(), [3, 1, 3, 1]);
        // The Redis peer needs its Redis even as one process.
        let single = options("--compare node-ws-redis").targets();
        assert_eq!(labels(&single), ["hubbub", "node-ws-redis"]);
        assert!(single[1].redis && single[1].nodes == 1);
        assert_eq!(labels(&options("--cluster 1").targets()), ["hubbub (1 node)", "hubbub"]);
        assert!(options("fixed rooms --cluster 2").check().is_ok());
        let err = options("churn --cluster 2").check().unwrap_err().to_string();
        assert!(err.contains("not churn"), "{err}");
        assert!(options("idle churn").check().is_ok());
    }

    fn sample(cpu_percent: f64, rss_base_mib: f64, rss_mib: f64) -> Option<ServerSample> {
        let mib = |m: f64| (m * 1024.0 * 1024.0) as u64;
        Some(ServerSample {
            pid: 1,
            cpu_percent,
            rss_base_bytes: mib(rss_base_mib),
            rss_bytes: mib(rss_mib),
            writes_per_delivery: None,
        })
    }

    fn load(server: &str, deliveries_per_sec: f64, p50: f64, cpu: f64) -> Report {
        let latency = Latency { p50, p90: 39.68, p99: 2.0 * p50, p999: 76.29, max: 91.88 };
        let summary = run::Summary {
            addr: "127.0.0.1:1".to_owned(),
            clients: 1000,
            failed: 0,
            first_error: None,
            rooms: 1,
            senders: 10,
            sending: "window 8".to_owned(),
            threads: 1,
            setup_seconds: 0.5,
            seconds: 10.0,
            sent: 1,
            expected: 999,
            delivered: 999,
            lost: 0,
            errors: 0,
            delivery_ratio: Some(1.0),
            deliveries_per_sec,
            bytes_per_delivery: None,
            closed: 0,
            latency_ms: Some(latency),
            generator_cpu_percent: 61.0,
            server: sample(cpu, 6.0, 12.8),
            nodes: Vec::new(),
            redis: None,
        };
        let measured = Measured::Load(summary);
        Report { scenario: "fanout", server: server.to_owned(), nodes: 1, params: String::new(), measured }
    }

    /// The tables in docs/BENCHMARKS.md keep their columns and formats.
    #[test]
    fn tables_keep_the_documented_format() {
        let reports = [load("hubbub", 1_771_498.0, 23.17, 114.0), load("node-ws", 80_865.0, 938.0, 100.0)];
        let table = table(Scenario::Fanout, &reports, &["hubbub".to_owned(), "node-ws".to_owned()]);
        let expected = "\
| server | setup | deliveries/s | p50 | p90 | p99 | p99.9 | max | lost | closed | server CPU | CPU per delivery | generator CPU | server RSS |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| hubbub | 0.5 s | 1771498 | 23.17 ms | 39.68 ms | 46.34 ms | 76.29 ms | 91.88 ms | 0 | 0 | 114 % | 0.64 µs | 61 % | 12.8 MiB |
| node-ws | 0.5 s | 80865 | 938 ms | 39.68 ms | 1876 ms | 76.29 ms | 91.88 ms | 0 | 0 | 100 % | 12.37 µs | 61 % | 12.8 MiB |

Hubbub vs node-ws: deliveries/s ×21.9, p50 ×40.5 lower, p99 ×40.5 lower, server CPU ×1.1 higher, CPU per delivery ×19.2 lower.
";
        assert_eq!(table, expected);

        // rooms also has the server's writes per delivery, when perf counted them.
        let Measured::Load(mut rooms) = load("hubbub", 90_000.0, 12.0, 117.0).measured else {
            unreachable!()
        };
        if let Some(server) = rooms.server.as_mut() {
            server.writes_per_delivery = Some(0.694);
        }
        let rooms = Report { measured: Measured::Load(rooms), ..load("hubbub", 0.0, 0.0, 0.0) };
        let (rooms_row, _) = row(Scenario::Rooms, &rooms, false);
        assert_eq!(
            rooms_row,
            "| hubbub | 0.5 s | 90000 | 12.00 ms | 39.68 ms | 24.00 ms | 76.29 ms | 91.88 ms | 0 | 0 | 117 % | 13.00 µs | 0.69 | 61 % | 12.8 MiB |"
        );

        let Measured::Load(mut idle) = load("hubbub", 0.0, 0.0, 0.0).measured else { unreachable!() };
        (idle.clients, idle.setup_seconds, idle.server) = (19_000, 2.3, sample(0.0, 6.8, 41.5));
        let idle = Report { measured: Measured::Load(idle), ..load("hubbub", 0.0, 0.0, 0.0) };
        let (idle_row, _) = row(Scenario::Idle, &idle, false);
        assert_eq!(idle_row, "| hubbub | 19000 | 2.3 s | 6.8 MiB | 41.5 MiB | 1.92 KB | 0.0 % |");

        let churn = churn::Summary {
            addr: "127.0.0.1:1".to_owned(),
            workers: 64,
            threads: 1,
            seconds: 10.0,
            cycles: 129_100,
            failures: 0,
            first_error: None,
            connects_per_sec: 12_910.0,
            cycle_ms: Some(Latency { p50: 4.7, p90: 8.0, p99: 10.05, p999: 12.0, max: 20.0 }),
            generator_cpu_percent: 88.0,
            server: sample(88.0, 7.5, 7.6),
        };
        let measured = Measured::Churn(ChurnReport {
            summary: churn,
            rss_after_bytes: (7.6 * 1024.0 * 1024.0) as u64,
            connections_after: Some(0),
        });
        let churn = Report {
            scenario: "churn",
            server: "hubbub".to_owned(),
            nodes: 1,
            params: String::new(),
            measured,
        };
        let (churn_row, _) = row(Scenario::Churn, &churn, false);
        assert_eq!(
            churn_row,
            "| hubbub | 12910 | 4.70 ms | 10.05 ms | 0 | 88 % | 88 % | 7.5 MiB | 7.6 MiB | 7.6 MiB | 0 |"
        );
    }

    /// A cluster's table: its nodes, their CPU together and one by one,
    /// Redis's CPU apart, and the ratios against single-node Hubbub and the
    /// peer counting Redis's CPU with the nodes'.
    #[test]
    fn cluster_tables_give_the_nodes_and_redis_apart() {
        let cluster = |label: &str, deliveries_per_sec: f64, p50: f64, nodes: [f64; 3], redis: f64| {
            let mut report = load(label, deliveries_per_sec, p50, 0.0);
            let Measured::Load(summary) = &mut report.measured else { unreachable!() };
            summary.nodes = nodes.iter().map(|&cpu| sample(cpu, 6.0, 12.0).unwrap()).collect();
            summary.server = ServerSample::sum(&summary.nodes);
            summary.redis = sample(redis, 3.0, 4.0);
            report.nodes = 3;
            report
        };
        let mut refused = cluster("hubbub (3 nodes)", 900_000.0, 30.0, [40.0, 41.0, 42.0], 30.0);
        if let Measured::Load(summary) = &mut refused.measured {
            (summary.lost, summary.errors) = (54, 6);
        }
        assert!(row(Scenario::Fanout, &refused, true).0.contains("| 54 (6 errors) | 0 |"));
        let reports = [
            cluster("hubbub (3 nodes)", 900_000.0, 30.0, [40.0, 41.0, 42.0], 30.0),
            load("hubbub", 1_500_000.0, 20.0, 110.0),
            cluster("node-ws-redis (3 nodes)", 60_000.0, 900.0, [35.0, 36.0, 37.0], 50.0),
        ];
        let labels = ["hubbub (3 nodes)", "hubbub", "node-ws-redis (3 nodes)"].map(str::to_owned);
        let table = table(Scenario::Fanout, &reports, &labels);
        let expected = "\
| server | nodes | setup | deliveries/s | p50 | p90 | p99 | p99.9 | max | lost | closed | nodes' CPU | Redis CPU | generator CPU | nodes' RSS |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| hubbub (3 nodes) | 3 | 0.5 s | 900000 | 30.00 ms | 39.68 ms | 60.00 ms | 76.29 ms | 91.88 ms | 0 | 0 | 123 % (40 + 41 + 42) | 30 % | 61 % | 36.0 MiB |
| hubbub | 1 | 0.5 s | 1500000 | 20.00 ms | 39.68 ms | 40.00 ms | 76.29 ms | 91.88 ms | 0 | 0 | 110 % | none | 61 % | 12.8 MiB |
| node-ws-redis (3 nodes) | 3 | 0.5 s | 60000 | 900 ms | 39.68 ms | 1800 ms | 76.29 ms | 91.88 ms | 0 | 0 | 108 % (35 + 36 + 37) | 50 % | 61 % | 36.0 MiB |

Hubbub (3 nodes) vs hubbub: deliveries/s ×0.6, p50 ×1.5 higher, p99 ×1.5 higher, CPU (nodes + Redis) ×1.4 higher, CPU per delivery ×2.3 higher.

Hubbub (3 nodes) vs node-ws-redis (3 nodes): deliveries/s ×15.0, p50 ×30.0 lower, p99 ×30.0 lower, CPU (nodes + Redis) ×1.0 lower, CPU per delivery ×15.5 lower.
";
        assert_eq!(table, expected);
    }

    #[test]
    fn json_carries_the_loadgen_summaries() {
        let json = serde_json::to_value([load("hubbub", 1000.0, 1.0, 50.0)]).unwrap();
        let report = &json[0];
        assert_eq!(report["scenario"], "fanout");
        assert_eq!(report["server"], "hubbub");
        assert_eq!(report["load"]["deliveriesPerSec"], 1000.0);
        assert_eq!(report["load"]["latencyMs"]["p50"], 1.0);
        assert_eq!(report["load"]["server"]["cpuPercent"], 50.0);
    }
}
