//! `cargo xtask`: the project's own automation, in Rust so contributors need
//! nothing but cargo (and, for the interop tests, Node and npm). Its command
//! line is parsed by clap: `cargo xtask help` and `cargo xtask COMMAND --help`
//! list every option.
//!
//! - `cargo xtask ci` — what CI runs: installs the interop test's npm
//!   dependency, checks formatting, runs clippy with warnings denied on every
//!   target, runs every test and the browser tests, builds the docs with
//!   warnings denied, builds the fuzz targets and runs the Autobahn
//!   TestSuite. It builds each thing once: the browser tests and Autobahn
//!   run the `hubbub` binary the tests built (see [`Hubbub`]).
//! - `cargo xtask test` — prepares the interop dependency and runs the tests.
//! - `cargo xtask browser` — end-to-end tests of the chat page in headless
//!   Chromium (also part of `ci`).
//! - `cargo xtask heartbeat-cost [--clients N] [--seconds S] [--interval D]`
//!   — measures the server CPU that heartbeats cost for idle connections.
//! - `cargo xtask fuzz [TARGET] [--time SECS] [--build-only] [-- FLAGS]` —
//!   builds the libFuzzer targets with the stable toolchain and runs them
//!   (`--build-only`, part of `ci`: checks they compile and link).
//! - `cargo xtask autobahn` — the Autobahn TestSuite against the server's
//!   `/ws/echo` and the tokio-tungstenite client (also part of `ci`).
//! - `cargo xtask bench [--quick] [--no-load]` — the criterion
//!   micro-benchmarks, then the load benchmark; both tables go to
//!   `docs/BENCHMARKS.md`.
//! - `cargo xtask loadtest [SCENARIO|all]... [--compare node-ws,uws]
//!   [--cluster N] [--quick] [--json] [--write-docs] [sizes]` — end-to-end
//!   load scenarios against the release server and the reference peers, run
//!   and measured by the `hubbub-loadgen` library; `--cluster N` adds N
//!   nodes sharing a fresh redis-server (`--compare node-ws-redis`: the Node
//!   peer scaled the same way); `--compare hubbub-no-history` adds Hubbub
//!   with its room history off, to show what keeping history costs.
//! - `cargo xtask upload-bench [--size-mib N] [--chat-size-mib M]` — upload
//!   throughput and peak RSS against `sha256sum`, and chat latency during an
//!   upload.

// Progress lines go to stderr, as cargo's own do.
#![allow(clippy::print_stderr)]

mod autobahn;
mod bench;
mod browser;
mod fuzz;
mod idle;
mod loadtest;
mod measure;
mod redis;
mod upload_bench;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::bail;
use clap::{CommandFactory as _, Parser, Subcommand};

/// The project's automation: checks, tests, benchmarks and load tests.
#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Option<Task>,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// What CI runs: fmt check, clippy -D warnings, all tests, browser
    /// e2e, rustdoc -D warnings, the fuzz targets' build, and the Autobahn
    /// TestSuite.
    Ci,
    /// Install test dependencies (npm) and run all tests.
    Test,
    /// End-to-end tests of the chat page in headless Chromium.
    Browser,
    /// Server CPU for heartbeats on N idle connections.
    HeartbeatCost(idle::Options),
    /// Build the fuzz targets (stable toolchain) and run one or each.
    Fuzz(fuzz::Options),
    /// Autobahn TestSuite: server /ws/echo (debug hubbub) and the
    /// tokio-tungstenite client.
    Autobahn,
    /// Criterion micro-benchmarks, then the load benchmark.
    Bench(bench::Options),
    /// Load scenarios fanout, fixed, rooms, idle, churn against release
    /// hubbub (and the reference peers in bench/peers: node-ws, uws,
    /// node-ws-redis); --cluster N for N nodes sharing one Redis.
    Loadtest(loadtest::Options),
    /// Upload throughput and peak RSS vs sha256sum; chat latency during an
    /// upload.
    UploadBench(upload_bench::Options),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Some(Task::Ci) => ci(&root),
        Some(Task::Test) => test(&root),
        Some(Task::Browser) => browser::browser(&root, Hubbub::Build),
        Some(Task::HeartbeatCost(options)) => idle::heartbeat_cost(&root, &options),
        Some(Task::Fuzz(options)) => fuzz::fuzz(&root, &options),
        Some(Task::Autobahn) => autobahn::autobahn(&root, Hubbub::Build),
        Some(Task::Bench(options)) => bench::bench(&root, &options),
        Some(Task::Loadtest(options)) => {
            // The command line after `loadtest`, to re-run it optimised and
            // to quote it in the docs.
            let args: Vec<String> = std::env::args().skip_while(|arg| arg != "loadtest").skip(1).collect();
            loadtest::loadtest(&root, &options, &args)
        }
        Some(Task::UploadBench(options)) => upload_bench::upload_bench(&root, &options),
        None => {
            eprintln!("{}", Cli::command().render_help());
            Ok(())
        }
    }
}

fn ci(root: &Path) -> anyhow::Result<()> {
    run(root, "cargo", &["fmt", "--all", "--", "--check"])?;
    // With the server's `internals` feature, so the fan-out bench (which
    // requires it) and `internals.rs` are linted too, and the history's
    // `redis` feature, so the Redis engine and its tests are.
    let features = "--features=hubbub-server/internals,hubbub-history/redis";
    run(root, "cargo", &["clippy", "--workspace", "--all-targets", features, "--", "-D", "warnings"])?;
    test(root)?;
    browser::browser(root, Hubbub::AsTested)?;
    measure::run_env(
        root,
        "cargo",
        &["doc", "--workspace", "--no-deps"],
        &[("RUSTDOCFLAGS", "-D warnings")],
    )?;
    fuzz::fuzz(root, &fuzz::Options::build_only())?;
    autobahn::autobahn(root, Hubbub::AsTested)?;
    eprintln!("xtask ci: all checks passed");
    Ok(())
}

fn test(root: &Path) -> anyhow::Result<()> {
    install_interop_deps(root)?;
    run(root, "cargo", &["test", "--workspace", "--all-targets"])?;
    run(root, "cargo", &["test", "--workspace", "--doc"])?;
    // The Redis engine against its own redis-server (`.ci/run` installs it;
    // without it, and without CI=true, these tests say so and pass).
    run(root, "cargo", &["test", "--package", "hubbub-history", "--features", "redis"])
}

/// The server's interop test runs a Node client built on the `ws` package.
fn install_interop_deps(root: &Path) -> anyhow::Result<()> {
    let dir = root.join("crates/hubbub-server/tests/interop");
    if Command::new("npm").arg("--version").output().is_err() {
        bail!(
            "npm is needed for the interop tests: install Node.js and npm (on Debian: apt-get install -y nodejs npm)"
        );
    }
    run(&dir, "npm", &["ci", "--no-audit", "--no-fund"])
}

/// How a command that runs the debug `hubbub` binary (`browser`,
/// `autobahn`) has cargo bring it up to date.
#[derive(Clone, Copy)]
pub(crate) enum Hubbub {
    /// `cargo build --package hubbub`: the least to build for a command run
    /// on its own.
    Build,
    /// `cargo build --workspace --bin hubbub --tests`: every member and
    /// its tests are selected, as `cargo xtask test` selects them, so cargo resolves
    /// the same dependency features and, after the tests (in `ci`), has at
    /// most the binary itself to link (nothing when `hubbub`'s own tests
    /// built it). `--package hubbub` alone resolves fewer features (no
    /// dev-dependencies, no other members) and would build some 40 crates,
    /// tokio, hyper and axum among them, a second time; `--all-targets`
    /// would also relink xtask and an example.
    AsTested,
}

/// Brings the debug `hubbub` binary up to date; returns its path.
pub(crate) fn debug_hubbub(root: &Path, how: Hubbub) -> anyhow::Result<PathBuf> {
    let args: &[&str] = match how {
        Hubbub::Build => &["build", "--package", "hubbub"],
        Hubbub::AsTested => &["build", "--workspace", "--bin", "hubbub", "--tests"],
    };
    run(root, "cargo", args)?;
    Ok(target_dir(root).join("debug/hubbub"))
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace
/// root) or `target/`.
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |dir| root.join(dir))
}

/// Runs `program args` in `dir`; fails unless it succeeds.
pub(crate) fn run(dir: &Path, program: &str, args: &[&str]) -> anyhow::Result<()> {
    measure::run_env(dir, program, args, &[])
}

fn workspace_root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_parses() {
        for line in [
            "ci",
            "test",
            "browser",
            "heartbeat-cost --clients 10 --seconds 2 --interval 500ms",
            "fuzz hub --time 5 -- -max_len=100",
            "fuzz --build-only",
            "autobahn",
            "bench --quick --no-load",
            "loadtest fanout --quick",
            "loadtest fanout rooms --cluster 3 --compare node-ws-redis",
            "upload-bench --size-mib 8 --chat-size-mib 2",
        ] {
            let args = std::iter::once("xtask").chain(line.split_whitespace());
            if let Err(err) = Cli::try_parse_from(args) {
                panic!("`{line}` does not parse: {err}");
            }
        }
        for wrong in [
            "fuzz nope",
            "heartbeat-cost --interval soon",
            "bench --slow",
            "loadtest --window 65",
            "loadtest --cluster 0",
        ] {
            let args = std::iter::once("xtask").chain(wrong.split_whitespace());
            assert!(Cli::try_parse_from(args).is_err(), "`{wrong}` was accepted");
        }
    }
}
