//! `cargo xtask`: the project's own automation, in Rust so contributors need
//! nothing but cargo (and, for the interop tests, Node and npm).
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

// Progress lines go to stderr, as cargo's own do.
#![allow(clippy::print_stderr)]

mod autobahn;
mod bench;
mod browser;
mod fuzz;
mod idle;
mod loadtest;
mod measure;
mod upload_bench;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::bail;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("ci") => ci(&root),
        Some("test") => test(&root),
        Some("browser") => browser::browser(&root, Hubbub::Build),
        Some("heartbeat-cost") => idle::heartbeat_cost(&root, &idle::Options::parse(&args[1..])?),
        Some("fuzz") => fuzz::fuzz(&root, &fuzz::Options::parse(&args[1..])?),
        Some("autobahn") => autobahn::autobahn(&root, Hubbub::Build),
        Some("bench") => bench::bench(&root, &args[1..]),
        Some("loadtest") => loadtest::loadtest(&root, &args[1..]),
        Some("upload-bench") => upload_bench::upload_bench(&root, &args[1..]),
        Some("help" | "--help" | "-h") | None => {
            usage();
            Ok(())
        }
        Some(other) => {
            usage();
            bail!("unknown command `{other}`")
        }
    }
}

fn usage() {
    {
        eprintln!(
            "usage: cargo xtask <command>\n\n\
             commands:\n  \
             ci     fmt check, clippy -D warnings, all tests, browser e2e, rustdoc -D warnings,\n         \
             the fuzz targets' build, and the Autobahn TestSuite\n  \
             test   install test dependencies (npm) and run all tests\n  \
             browser  end-to-end tests of the chat page in headless Chromium\n  \
             heartbeat-cost [--clients N] [--seconds S] [--interval D]\n         \
             server CPU for heartbeats on N idle connections\n  \
             fuzz [TARGET] [--time SECS] [--build-only] [-- LIBFUZZER_FLAGS]\n         \
             build the fuzz targets (stable toolchain) and run one or each\n         \
             (--build-only: a quick unoptimised build that checks they compile and link)\n  \
             autobahn  Autobahn TestSuite: server /ws/echo (debug hubbub) and the tokio-tungstenite client\n  \
             bench [--quick] [--no-load]  criterion micro-benchmarks, then the load benchmark\n  \
             loadtest [SCENARIO|all] [--compare node-ws,uws] [--quick] [--clients N] [--rooms N]\n         \
             [--senders N] [--window N] [--rate R] [--seconds S] [--workers N] [--threads N]\n         \
             [--sources N] [--padding BYTES] [--rounds N] [--json] [--write-docs]\n         \
             load scenarios fanout, fixed, rooms, idle, churn against release hubbub\n         \
             (and the reference peers in bench/peers: node-ws, uws)\n  \
             upload-bench [--size-mib N] [--chat-size-mib M]\n         \
             upload throughput and peak RSS vs sha256sum; chat latency during an upload"
        );
    }
}

fn ci(root: &Path) -> anyhow::Result<()> {
    run(root, "cargo", &["fmt", "--all", "--", "--check"])?;
    run(root, "cargo", &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    test(root)?;
    browser::browser(root, Hubbub::AsTested)?;
    measure::run_env(
        root,
        "cargo",
        &["doc", "--workspace", "--no-deps"],
        &[("RUSTDOCFLAGS", "-D warnings")],
    )?;
    fuzz::fuzz(root, &fuzz::Options::parse(&["--build-only".to_owned()])?)?;
    autobahn::autobahn(root, Hubbub::AsTested)?;
    eprintln!("xtask ci: all checks passed");
    Ok(())
}

fn test(root: &Path) -> anyhow::Result<()> {
    install_interop_deps(root)?;
    run(root, "cargo", &["test", "--workspace", "--all-targets"])?;
    run(root, "cargo", &["test", "--workspace", "--doc"])
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
