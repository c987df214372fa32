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

use crate::measure;

/// The criterion benches: (package, bench target, features it needs).
const BENCHES: &[(&str, &str, &str)] = &[
    ("hubbub-protocol", "codec", ""),
    ("hubbub-transfer", "assembly", ""),
    ("hubbub-server", "fanout", "internals"),
];

pub(crate) fn bench(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let mut quick = false;
    let mut load = true;
    for arg in args {
        match arg.as_str() {
            "--quick" => quick = true,
            "--no-load" => load = false,
            other => bail!("unknown option {other} (bench takes --quick and --no-load)"),
        }
    }
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
    let results = collect(&root.join("target/criterion"), started)?;
    if results.is_empty() {
        bail!("criterion wrote no estimates under target/criterion");
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

    if load {
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
    /// Bytes or elements per iteration, if the bench declared them.
    per_iteration: Option<(String, f64)>,
}

impl Estimate {
    fn throughput(&self) -> String {
        let Some((unit, amount)) = &self.per_iteration else { return String::new() };
        let per_sec = amount / (self.mean_ns / 1e9);
        match unit.as_str() {
            "Bytes" => format!("{:.1} MiB/s", per_sec / (1024.0 * 1024.0)),
            _ => format!("{:.1} M elements/s", per_sec / 1e6),
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

fn read_estimate(estimates: &Path) -> anyhow::Result<Estimate> {
    let text = std::fs::read_to_string(estimates)?;
    let mean_ns = number_after(&text, "\"mean\"", "\"point_estimate\":")
        .with_context(|| format!("no mean in {}", estimates.display()))?;
    let dir: PathBuf = estimates.parent().and_then(Path::parent).context("estimates path")?.to_path_buf();
    let benchmark = std::fs::read_to_string(dir.join("new/benchmark.json")).unwrap_or_default();
    let id = string_after(&benchmark, "\"full_id\":").unwrap_or_else(|| dir.display().to_string());
    let per_iteration = ["Bytes", "Elements"].iter().find_map(|unit| {
        number_after(&benchmark, "\"throughput\"", &format!("\"{unit}\":")).map(|n| ((*unit).to_owned(), n))
    });
    Ok(Estimate { id, mean_ns, per_iteration })
}

/// The number after `key`, searching from the first `anchor`.
fn number_after(text: &str, anchor: &str, key: &str) -> Option<f64> {
    let from = text.find(anchor)?;
    let at = from + text[from..].find(key)? + key.len();
    let digits: String = text[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
        .collect();
    digits.parse().ok()
}

/// The JSON string after `key`.
fn string_after(text: &str, key: &str) -> Option<String> {
    let at = text.find(key)? + key.len();
    let rest = text[at..].trim_start().strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_owned())
}
