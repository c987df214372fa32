//! Connection churn against a server that is already running: loops that
//! each open a connection, read the greeting, close and start over, for a
//! fixed time. What `cargo xtask loadtest churn` measures: connects per
//! second, the time one cycle takes, and the CPU of both sides.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::process::own_cpu_time;
use crate::run::{Latency, ServerSample, percent, server_cpu, server_rss};
use crate::{Histogram, OP_CLOSE, OP_TEXT, Plan, connect_with, parse_frame, push_frame};

/// How a churn run goes.
#[derive(Clone, Debug)]
pub struct Options {
    /// Connect-close loops running at once, spread over the plan's threads.
    pub workers: usize,
    /// How long the loops run.
    pub seconds: Duration,
    /// The longest one cycle may wait for the greeting, and then for the
    /// server to finish the close.
    pub cycle_timeout: Duration,
    /// The pause of a loop after a failed cycle, so a refusing server is
    /// not hammered.
    pub retry_pause: Duration,
    /// The server's process id, to sample its CPU and RSS from /proc.
    pub server_pid: Option<u32>,
}

/// What a churn run measured. Serialised with camelCase names.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// The server's address.
    pub addr: String,
    /// Loops that ran at once.
    pub workers: usize,
    /// Generator threads.
    pub threads: usize,
    /// How long the loops ran.
    pub seconds: f64,
    /// Cycles completed: connected, greeted and closed.
    pub cycles: u64,
    /// Cycles that failed.
    pub failures: u64,
    /// The first failure, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Completed cycles per second.
    pub connects_per_sec: f64,
    /// How long a completed cycle took; `None` when none completed.
    pub cycle_ms: Option<Latency>,
    /// The generator's CPU over the run, in % of one core.
    pub generator_cpu_percent: f64,
    /// The server's CPU over the run, its RSS before and at the end, when
    /// its process id was given.
    pub server: Option<ServerSample>,
}

/// Runs `options.workers` connect-close loops against `plan.addr`, from
/// `plan.sources` source addresses on `plan.threads` threads, for
/// `options.seconds`; then reports. Only the plan's address, threads and
/// sources matter. A failed cycle is counted, not fatal.
pub fn run(plan: &Plan, options: &Options) -> anyhow::Result<Summary> {
    let pid = options.server_pid;
    let rss_base = pid.map(server_rss).transpose()?;
    let (cpu0, gen0) = (server_cpu(pid)?, own_cpu_time()?);
    let started = Instant::now();
    let (counts, histogram) = run_loops(plan, options, started + options.seconds)?;
    let elapsed = started.elapsed();
    let (cpu1, gen1) = (server_cpu(pid)?, own_cpu_time()?);
    let server = match (pid, rss_base) {
        (Some(pid), Some(rss_base_bytes)) => Some(ServerSample {
            pid,
            cpu_percent: percent(cpu1.saturating_sub(cpu0), elapsed),
            rss_base_bytes,
            rss_bytes: server_rss(pid)?,
            writes_per_delivery: None,
        }),
        _ => None,
    };
    let cycles = counts.done.load(Ordering::Relaxed);
    Ok(Summary {
        addr: plan.addr.to_string(),
        workers: options.workers,
        threads: plan.threads.max(1),
        seconds: elapsed.as_secs_f64(),
        cycles,
        failures: counts.failed.load(Ordering::Relaxed),
        first_error: counts.first_error.lock().unwrap_or_else(PoisonError::into_inner).take(),
        connects_per_sec: cycles as f64 / elapsed.as_secs_f64().max(1e-9),
        cycle_ms: (histogram.count() > 0).then(|| Latency::new(&histogram)),
        generator_cpu_percent: percent(gen1.saturating_sub(gen0), elapsed),
        server,
    })
}

/// Counters every loop adds to.
#[derive(Default)]
struct Counts {
    done: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counts {
    fn fail(&self, err: &anyhow::Error) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(PoisonError::into_inner);
        first.get_or_insert_with(|| format!("{err:#}"));
    }
}

/// The loops, on `plan.threads` threads each with a single-threaded
/// runtime, until `deadline`; returns the counts and the cycle times.
fn run_loops(plan: &Plan, options: &Options, deadline: Instant) -> anyhow::Result<(Arc<Counts>, Histogram)> {
    let counts = Arc::new(Counts::default());
    let threads = plan.threads.max(1);
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let loops = Loops {
                plan: plan.clone(),
                options: options.clone(),
                counts: counts.clone(),
                histogram: RefCell::new(Histogram::new()),
            };
            std::thread::Builder::new()
                .name(format!("churn-{thread}"))
                .spawn(move || thread_loops(loops, thread, deadline))
                .context("spawning a churn thread")
        })
        .collect::<anyhow::Result<_>>()?;
    let mut histogram = Histogram::new();
    for handle in handles {
        let part = handle.join().map_err(|_| anyhow::anyhow!("a churn thread panicked"))??;
        histogram.merge(&part);
    }
    Ok((counts, histogram))
}

/// What the loops of one thread share.
struct Loops {
    plan: Plan,
    options: Options,
    counts: Arc<Counts>,
    /// Cycle times, merged with the other threads' at the end.
    histogram: RefCell<Histogram>,
}

/// The loops of one thread: workers `thread`, `thread + threads`, ...
fn thread_loops(loops: Loops, thread: usize, deadline: Instant) -> anyhow::Result<Histogram> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    let (workers, threads) = (loops.options.workers, loops.plan.threads.max(1));
    let loops = Rc::new(loops);
    local.block_on(&runtime, async {
        let tasks: Vec<_> = (thread..workers)
            .step_by(threads)
            .map(|worker| tokio::task::spawn_local(one_loop(loops.clone(), worker, deadline)))
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    });
    Ok(loops.histogram.take())
}

/// One connect-close loop until `deadline`. Its connections take ids
/// `worker`, `worker + workers`, ...: consecutive cycles rotate over the
/// source addresses.
async fn one_loop(loops: Rc<Loops>, worker: usize, deadline: Instant) {
    let Loops { plan, options, counts, histogram } = &*loops;
    for id in (worker..).step_by(options.workers.max(1)) {
        if Instant::now() >= deadline {
            break;
        }
        match churn_once(plan, id, options.cycle_timeout).await {
            Ok(took) => {
                counts.done.fetch_add(1, Ordering::Relaxed);
                histogram.borrow_mut().record(took.as_micros() as u64);
            }
            Err(err) => {
                counts.fail(&err);
                tokio::time::sleep(options.retry_pause).await;
            }
        }
    }
}

/// Opens a connection, reads the two greeting frames, closes with 1000 and
/// waits for the server to finish the close: one cycle of churn. Each wait
/// is bounded by `timeout`. Returns the time the cycle took.
pub async fn churn_once(plan: &Plan, id: usize, timeout: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let (mut stream, mut buf, mut end) = connect_with(plan, id, false).await?;
    let mut texts = 0;
    let mut start = 0;
    while texts < 2 {
        while let Some(frame) = parse_frame(&buf[start..end])? {
            if frame.opcode == OP_TEXT {
                texts += 1;
            }
            start += frame.len;
        }
        if texts >= 2 {
            break;
        }
        if end == buf.len() {
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
        }
        let n = tokio::time::timeout(timeout, stream.read(&mut buf[end..]))
            .await
            .with_context(|| format!("no greeting within {timeout:?}"))??;
        if n == 0 {
            bail!("closed before the greeting");
        }
        end += n;
    }
    let mut out = Vec::with_capacity(16);
    push_frame(&mut out, OP_CLOSE, &1000_u16.to_be_bytes(), [0x5a, 0x17, 0xc3, 0x9e]);
    stream.write_all(&out).await.context("sending close")?;
    // The server answers the close and ends the TCP connection first, so the
    // client side keeps no TIME_WAIT entry.
    let drained =
        tokio::time::timeout(timeout, async { while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {} })
            .await;
    drained.with_context(|| format!("the server did not finish the close within {timeout:?}"))?;
    Ok(started.elapsed())
}
