//! `cargo xtask fuzz [TARGET] [--time SECS] [--build-only]`: builds the
//! libFuzzer targets in `fuzz/` with the stable toolchain and runs them.
//!
//! `cargo fuzz` needs a nightly compiler for its `-Z` flags. The stable
//! compiler has the same sanitizer and coverage support, and it accepts `-Z`
//! flags when `RUSTC_BOOTSTRAP=1` is set, so this command builds the targets
//! with exactly the flags `cargo fuzz build` uses (AddressSanitizer,
//! SanitizerCoverage with inline 8-bit counters, comparison tracing, debug
//! assertions) for the host triple only, which keeps the flags off build
//! scripts and proc macros. The fuzz crate stays a plain `cargo fuzz`
//! crate, so `cargo fuzz run hub` works too on a nightly toolchain.
//!
//! `--build-only` (what `cargo xtask ci` runs) builds with the dev profile
//! and no debug info instead of release: the same instrumentation, the same
//! compile and link against libFuzzer, in a fraction of the time and disk
//! an optimised build takes; only running the targets needs the speed.
//!
//! Each target runs with a working corpus in `target/fuzz/corpus/TARGET`
//! (new inputs land there) seeded from the committed `fuzz/seeds/TARGET`.
//! A crash leaves its input in `target/fuzz/artifacts/TARGET/` and fails the
//! command; docs/FUZZING.md says how to reproduce and minimise it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// Every target in `fuzz/Cargo.toml`, in the order they run without a name.
pub(crate) const TARGETS: &[&str] =
    &["protocol_text", "protocol_binary", "transfer_assembler", "hub", "inflate"];

/// Seconds per target when every target runs.
const SHORT_RUN_SECS: u64 = 30;
/// Seconds for one named target.
const DEFAULT_RUN_SECS: u64 = 120;

/// Options of the command.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// One target to run; each in turn when none is named.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    target: Option<String>,
    /// Seconds per target (default: 120 for one target, 30 each for all).
    #[arg(long, value_name = "SECS")]
    time: Option<u64>,
    /// A quick unoptimised build that checks the targets compile and link;
    /// nothing runs.
    #[arg(long)]
    build_only: bool,
    /// Extra libFuzzer flags.
    #[arg(last = true, value_name = "LIBFUZZER_FLAGS")]
    extra: Vec<String>,
}

impl Options {
    /// What `ci` runs: every target built, none run.
    pub(crate) fn build_only() -> Self {
        Self { target: None, time: None, build_only: true, extra: Vec::new() }
    }
}

pub(crate) fn fuzz(root: &Path, options: &Options) -> anyhow::Result<()> {
    let (targets, secs): (Vec<&str>, u64) = match &options.target {
        Some(target) => (vec![target.as_str()], options.time.unwrap_or(DEFAULT_RUN_SECS)),
        None => (TARGETS.to_vec(), options.time.unwrap_or(SHORT_RUN_SECS)),
    };
    let binaries = build(root, &targets, options.build_only)?;
    if options.build_only {
        eprintln!("xtask fuzz: built {} in {}", targets.join(", "), binaries.display());
        return Ok(());
    }
    let mut failed = Vec::new();
    for target in targets {
        if let Err(err) = run_target(root, &binaries, target, secs, &options.extra) {
            eprintln!("xtask fuzz: {target}: {err:#}");
            failed.push(target);
        }
    }
    if !failed.is_empty() {
        bail!("fuzz targets failed: {} (inputs in target/fuzz/artifacts/)", failed.join(", "));
    }
    eprintln!("xtask fuzz: no finding");
    Ok(())
}

/// The RUSTFLAGS `cargo fuzz build` passes (cargo-fuzz 0.12, default
/// options: ASan, `-Cpasses=sancov-module`, 8-bit counters, PC table, trace
/// compares, debug assertions), and `--cfg fuzzing`.
const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg",
    "fuzzing",
    "-Zsanitizer=address",
    "-Cdebug-assertions",
    "-Coverflow-checks",
    "-Cforce-frame-pointers",
];

/// Builds `targets`, optimised to be run or unoptimised to check that they
/// build (`check_only`); returns the folder the binaries are in.
fn build(root: &Path, targets: &[&str], check_only: bool) -> anyhow::Result<PathBuf> {
    if Command::new("c++").arg("--version").output().is_err() {
        bail!("a C++ compiler is needed to build libFuzzer (on Debian: apt-get install -y g++)");
    }
    let host = host_triple()?;
    let target_dir = root.join("target/fuzz");
    let manifest = root.join("fuzz/Cargo.toml");
    let target_dir_arg = target_dir.to_string_lossy().into_owned();
    let manifest_arg = manifest.to_string_lossy().into_owned();
    let (profile, profile_dir) = if check_only { ("dev", "debug") } else { ("release", "release") };
    let mut args = vec![
        "build",
        "--profile",
        profile,
        "--manifest-path",
        &manifest_arg,
        "--target",
        &host,
        "--target-dir",
        &target_dir_arg,
    ];
    for target in targets {
        args.extend(["--bin", target]);
    }
    let flags = RUSTFLAGS.join(" ");
    // RUSTC_BOOTSTRAP lets the stable compiler take the `-Z` flag; nothing
    // else in the build changes. The fuzz crate is a workspace of its own
    // with its own target folder, so the profile setting reaches nothing else.
    let mut env = vec![("RUSTC_BOOTSTRAP", "1"), ("RUSTFLAGS", flags.as_str())];
    if check_only {
        env.push(("CARGO_PROFILE_DEV_DEBUG", "false"));
    }
    crate::measure::run_env(root, "cargo", &args, &env)?;
    Ok(target_dir.join(host).join(profile_dir))
}

fn host_triple() -> anyhow::Result<String> {
    let out = crate::measure::command("rustc").arg("-vV").output().context("running rustc -vV")?;
    let text = String::from_utf8(out.stdout).context("rustc -vV output")?;
    text.lines()
        .find_map(|line| line.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV printed no host triple")
}

fn run_target(root: &Path, binaries: &Path, target: &str, secs: u64, extra: &[String]) -> anyhow::Result<()> {
    let corpus = root.join("target/fuzz/corpus").join(target);
    let artifacts = root.join("target/fuzz/artifacts").join(target);
    let seeds = root.join("fuzz/seeds").join(target);
    for dir in [&corpus, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut command = Command::new(binaries.join(target));
    command
        .arg(format!("-max_total_time={secs}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .arg("-rss_limit_mb=4096")
        .args(default_flags(target))
        .args(extra)
        .arg(&corpus);
    if seeds.is_dir() {
        command.arg(&seeds);
    }
    eprintln!("xtask fuzz: {target} for {secs} s (corpus {}, seeds {})", corpus.display(), seeds.display());
    let status = command.current_dir(root).status().with_context(|| format!("running {target}"))?;
    if !status.success() {
        bail!("{target} stopped with {status}: see the crash input in {}", artifacts.display());
    }
    Ok(())
}

/// Flags a target needs by default. `hub` tries about a hundred inputs a
/// second, too few for libFuzzer's slow growth of input lengths to reach
/// long command sequences in a run of minutes, so it starts at full length.
fn default_flags(target: &str) -> &'static [&'static str] {
    match target {
        "hub" => &["-len_control=0", "-max_len=1024"],
        _ => &[],
    }
}
