//! `cargo xtask bench [--quick] [--no-load]`: the criterion micro-benchmarks
//! (protocol encode and decode, upload assembly, fan-out of one frame to N
//! queues), then the load benchmark (`cargo xtask loadtest`, every scenario,
//! against the Node `ws` reference too when Node is installed). Both write
//! their tables, with the machine, the date and the commit, to
//! `docs/BENCHMARKS.md`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context as _, bail};
use hubbub_loadgen::format_mib;
use serde::Deserialize;

use crate::measure;

/// The criterion benches: (package, bench target, features it needs).
const BENCHES: &[(&str, &str, &str)] = &[
    ("hubbub-protocol", "codec", ""),
    ("hubbub-transfer", "assembly", ""),
    ("hubbub-server", "fanout", "internals"),
];

/// Options of the command.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Shorter criterion runs, and the load benchmark at a tenth of its
    /// size.
    #[arg(long)]
    quick: bool,
    /// Only the micro-benchmarks.
    #[arg(long)]
    no_load: bool,
}

pub(crate) fn bench(root: &Path, options: &Options) -> anyhow::Result<()> {
    let Options { quick, no_load } = *options;
    let started = SystemTime::now();
    let timing: &[&str] = if quick {
        &["--warm-up-time", "1", "--measurement-time", "2"]
    } else {
        &["--warm-up-time", "3", "--measurement-time", "5"]
    };
    for (package, bench, features) in BENCHES {
        let mut cargo_args =
            vec!["bench", "--package", package, "--bench", bench, "--features", features, "--"];
        cargo_args.extend(timing);
        crate::run(root, "cargo", &cargo_args)?;
    }
    // Criterion writes under cargo's target directory, wherever CARGO_TARGET_DIR put it.
    let estimates = crate::target_dir(root).join("criterion");
    let results = collect(&estimates, started)?;
    if results.is_empty() {
        bail!("criterion wrote no estimates under {}", estimates.display());
    }
    let (date, commit) = measure::date_and_commit(root);
    let mut body = String::new();
    let _ = writeln!(body, "```sh\ncargo xtask bench{}\n```\n", if quick { " --quick" } else { "" });
    let _ = writeln!(body, "Run on {date}, commit `{commit}`, {}.\n", measure::machine());
    let _ = writeln!(body, "| benchmark | time (mean) | throughput |\n| --- | --- | --- |");
    for result in &results {
        let _ = writeln!(body, "| `{}` | {} | {} |", result.id, time(result.mean_ns), result.throughput());
    }
    eprintln!("\n{body}");
    measure::replace_section(&root.join("docs/BENCHMARKS.md"), "micro", "## Micro-benchmarks", &body)?;

    if !no_load {
        let node = Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
        let mut args: Vec<String> = vec!["loadtest".into(), "all".into()];
        if node {
            args.extend(["--compare".into(), "node-ws,uws".into()]);
        } else {
            eprintln!("xtask bench: Node.js not found; the load benchmark runs against hubbub alone");
        }
        if quick {
            args.push("--quick".into());
        }
        args.push("--write-docs".into());
        crate::loadtest::reexec_release(root, &args)?;
    }
    Ok(())
}

/// One criterion benchmark's result.
struct Estimate {
    id: String,
    mean_ns: f64,
    /// What one iteration processes, if the bench declared it.
    throughput: Option<Throughput>,
}

/// What one iteration processes, as criterion records it.
#[derive(Clone, Copy, Debug, Deserialize)]
enum Throughput {
    Bytes(f64),
    Elements(f64),
}

impl Estimate {
    fn throughput(&self) -> String {
        let per_sec = |amount: f64| amount / (self.mean_ns / 1e9);
        match self.throughput {
            Some(Throughput::Bytes(bytes)) => format!("{}/s", format_mib(per_sec(bytes) as u64)),
            Some(Throughput::Elements(elements)) => format!("{:.1} M elements/s", per_sec(elements) / 1e6),
            None => String::new(),
        }
    }
}

fn time(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

/// Every `new/estimates.json` under `dir` written since `since`, sorted.
fn collect(dir: &Path, since: SystemTime) -> anyhow::Result<Vec<Estimate>> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.ends_with("new/estimates.json") {
                let fresh = path.metadata()?.modified()? >= since;
                if fresh {
                    found.push(read_estimate(&path)?);
                }
            }
        }
    }
    found.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(found)
}

/// The parts of criterion's `new/estimates.json` read here.
#[derive(Deserialize)]
struct Estimates {
    mean: PointEstimate,
}

#[derive(Deserialize)]
struct PointEstimate {
    point_estimate: f64,
}

/// The parts of criterion's `new/benchmark.json` read here.
#[derive(Default, Deserialize)]
struct Benchmark {
    full_id: Option<String>,
    /// Any other kind of throughput (criterion has a few) is not reported.
    #[serde(default, deserialize_with = "known_throughput")]
    throughput: Option<Throughput>,
}

fn known_throughput<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Throughput>, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(value).ok())
}

fn read_estimate(estimates: &Path) -> anyhow::Result<Estimate> {
    let read =
        |path: &Path| std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()));
    let mean: Estimates = serde_json::from_str(&read(estimates)?)
        .with_context(|| format!("no mean in {}", estimates.display()))?;
    let dir: PathBuf = estimates.parent().and_then(Path::parent).context("estimates path")?.to_path_buf();
    let benchmark: Benchmark = read(&dir.join("new/benchmark.json"))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    let id = benchmark.full_id.unwrap_or_else(|| dir.display().to_string());
    Ok(Estimate { id, mean_ns: mean.mean.point_estimate, throughput: benchmark.throughput })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criterion_results_are_read_and_formatted() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-test-{}", std::process::id()));
        let new = dir.join("codec/decode/new");
        std::fs::create_dir_all(&new).unwrap();
        let estimates = new.join("estimates.json");
        std::fs::write(&estimates, r#"{"mean":{"point_estimate":2000.0,"standard_error":1.0},"median":{}}"#)
            .unwrap();
        std::fs::write(
            new.join("benchmark.json"),
            r#"{"full_id":"codec/decode","throughput":{"Bytes":1048576},"title":"x"}"#,
        )
        .unwrap();
        let bytes = read_estimate(&estimates).unwrap();
        std::fs::write(new.join("benchmark.json"), r#"{"full_id":"codec/decode","throughput":null}"#)
            .unwrap();
        let none = read_estimate(&estimates).unwrap();
        let _ = std::fs::remove_dir_all(&dir);

        assert_eq!((bytes.id.as_str(), time(bytes.mean_ns)), ("codec/decode", "2.00 µs".to_owned()));
        // 1 MiB every 2 µs.
        assert_eq!(bytes.throughput(), "500000.0 MiB/s");
        assert_eq!(none.throughput(), "");
        let elements = Estimate { throughput: Some(Throughput::Elements(100.0)), ..none };
        assert_eq!(elements.throughput(), "50.0 M elements/s");
        assert_eq!(
            (time(61.5), time(9_817.9), time(2_500_000.0)),
            ("61.5 ns".into(), "9.82 µs".into(), "2.50 ms".into())
        );
    }
}
