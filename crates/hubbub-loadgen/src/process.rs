//! Processes as Linux's /proc shows them: CPU time and RSS, of the server
//! under test and of the generator itself; the server's write system calls,
//! counted by `perf stat`; and this process's limit on open files, raised so
//! that one process can hold many connections.

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
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

/// The system calls a server sends bytes with: `write` and `writev` (Tokio,
/// libuv), `sendto` and `sendmsg` (uSockets, whose `send` is `sendto`).
const WRITE_EVENTS: &str =
    "syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg";

/// How long `perf stat` gets to attach before the window it counts starts.
const PERF_ATTACH: Duration = Duration::from_millis(200);

/// Counts another process's write system calls (every thread) from `start`
/// to `stop`, with `perf stat` on the kernel's syscall tracepoints: any
/// server, whatever it is written in, with the kernel's own count and
/// almost no overhead (unlike `strace`). Needs `perf` and the permission to
/// trace the process (root, or `kernel.perf_event_paranoid` allowing it);
/// without them there is no count, and the run goes on.
#[derive(Debug)]
pub struct WriteCounter {
    perf: Child,
}

impl WriteCounter {
    /// Starts counting the writes of process `pid`; `None` if `perf` cannot
    /// be started.
    pub fn start(pid: u32) -> Option<Self> {
        let perf = Command::new("perf")
            .args(["stat", "--no-big-num", "-x", ",", "-e", WRITE_EVENTS, "-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        std::thread::sleep(PERF_ATTACH);
        Some(Self { perf })
    }

    /// Stops counting: the writes since `start`, or `None` if `perf` could
    /// not count them (no tracepoints, not allowed, the process gone).
    pub fn stop(mut self) -> Option<u64> {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.perf.id()).ok()?)?;
        // `perf stat` prints its counts when interrupted.
        if rustix::process::kill_process(pid, rustix::process::Signal::INT).is_err() {
            let _ = self.perf.kill();
        }
        let mut report = String::new();
        self.perf.stderr.take()?.read_to_string(&mut report).ok()?;
        let _ = self.perf.wait();
        parse_perf_counts(&report)
    }
}

/// The sum of `perf stat -x ,` counts: `None` if any event was not counted.
fn parse_perf_counts(report: &str) -> Option<u64> {
    let mut total = 0;
    let mut events = 0;
    for line in report.lines().filter(|line| line.contains("syscalls:")) {
        total += line.split(',').next()?.trim().parse::<u64>().ok()?;
        events += 1;
    }
    (events > 0).then_some(total)
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
    fn perf_counts_are_summed_and_an_uncounted_event_is_no_count() {
        let report = "# started on Sun Dec  6 15:36:02 2026\n\n\
            10,,syscalls:sys_enter_write,2998478776,100.00,,\n\
            214402,,syscalls:sys_enter_writev,2998439377,100.00,,\n\
            0,,syscalls:sys_enter_sendto,2998470273,100.00,,\n";
        assert_eq!(parse_perf_counts(report), Some(214_412));
        let unsupported = "<not supported>,,syscalls:sys_enter_write,0,100.00,,\n";
        assert_eq!(parse_perf_counts(unsupported), None);
        assert_eq!(parse_perf_counts("perf: command failed\n"), None);
    }

    #[test]
    fn the_fd_limit_is_at_least_what_it_was() {
        let before =
            rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX);
        assert!(raise_fd_limit().unwrap() >= before);
    }
}
