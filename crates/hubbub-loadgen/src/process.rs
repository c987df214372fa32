//! Processes as Linux's /proc shows them: CPU time and RSS, of the server
//! under test and of the generator itself; and this process's limit on open
//! files, raised so that one process can hold many connections.

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context as _;

/// A process's user + system CPU time, from /proc/PID/stat (Linux).
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// This process's CPU time, all threads.
pub fn own_cpu_time() -> anyhow::Result<Duration> {
    stat_cpu("/proc/self/stat")
}

fn stat_cpu(path: &str) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // The fields after the command name, which is in parentheses and may
    // hold spaces; utime and stime are fields 14 and 15, 12 and 13 after it.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields.get(11).context("utime")?.parse::<u64>()? + fields.get(12).context("stime")?.parse::<u64>()?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// Clock ticks per second for /proc times (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// A process's resident set size in bytes, from /proc/PID/status.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    status_bytes(pid, "VmRSS")
}

/// The largest resident set size a process has had so far, in bytes (its
/// high-water mark, `VmHWM` in /proc/PID/status).
pub fn peak_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    status_bytes(pid, "VmHWM")
}

/// A size field of /proc/PID/status, which gives them in kB.
fn status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading /proc/PID/status")?;
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|rest| rest.strip_prefix(':')))
        .with_context(|| format!("no {field}"))?;
    let kb: u64 = value.split_whitespace().next().with_context(|| format!("{field} value"))?.parse()?;
    Ok(kb * 1024)
}

/// Raises this process's soft limit on open files (`RLIMIT_NOFILE`) to its
/// hard limit, which needs no privilege; returns the soft limit now in
/// force. Each client holds one descriptor.
pub fn raise_fd_limit() -> anyhow::Result<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // `None` is "unlimited"; Linux refuses an unlimited soft limit for open
    // files, so aim at its default ceiling (`fs.nr_open`) then.
    let target = limit.maximum.unwrap_or(1 << 20);
    if let Some(current) = limit.current
        && current < target
    {
        setrlimit(Resource::Nofile, Rlimit { current: Some(target), maximum: limit.maximum })
            .map_err(std::io::Error::from)
            .context("raising the open-file limit (RLIMIT_NOFILE)")?;
    }
    Ok(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_measured() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() > 0);
        // The current size first: the other tests' threads may grow the
        // process between the two reads, and the peak read second covers that.
        let current = rss_bytes(pid).unwrap();
        assert!(peak_rss_bytes(pid).unwrap() >= current, "the peak is at least the current");
        let (by_pid, own) = (cpu_time(pid).unwrap(), own_cpu_time().unwrap());
        assert!(own >= by_pid, "CPU time does not go back");
        assert!(cpu_time(u32::MAX).is_err(), "no such process");
    }

    #[test]
    fn the_fd_limit_is_at_least_what_it_was() {
        let before =
            rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX);
        assert!(raise_fd_limit().unwrap() >= before);
    }
}
