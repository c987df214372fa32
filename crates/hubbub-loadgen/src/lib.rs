//! Hubbub's load generator: many lean WebSocket chat clients on a few
//! threads, each thread a single-threaded tokio runtime.
//!
//! The library is what `cargo xtask loadtest` runs and measures with, and
//! the `hubbub-loadgen` binary is a thin command line over it: [`run`] is
//! one measured load of long-lived clients against a server that is already
//! running, [`churn`] is loops of connect, greet and close, and
//! [`process`] reads a process's CPU time and RSS from /proc, for the
//! generator's own CPU beside the server's. [`Histogram`] holds the
//! latencies, and [`format_ms`] and [`format_mib`] print them as every
//! report does.
//!
//! A client is a raw `TcpStream` with a hand-written RFC 6455 client: it
//! sends a fixed upgrade request, masks what it sends, and parses the
//! server's frames in place in one read buffer, without decoding JSON. A
//! delivered chat message is recognised by the marker its sender put in the
//! text, `~SENDER~SLOT~MICROS~`: the receiver finds the first `~`, reads the
//! three numbers, and records the latency from the send time. Everything else
//! the server sends is only classified by its first bytes (`userJoined`,
//! `roomJoined`) while the clients set up. That keeps the generator's cost
//! per delivery to a few dozen instructions plus its share of a `read`, so
//! it stays below the server's CPU.
//!
//! Senders send either at a fixed rate or as fast as a window allows: with
//! a window of W, a sender has at most W messages that have not yet reached
//! every other member of its room. Each window slot is an atomic countdown
//! of recipients; the receiver that brings it to zero frees the slot and
//! wakes the sender. A message is complete only when every recipient has it,
//! so the server's queues never fill faster than all clients read them.
//!
//! All traffic goes to the [`Plan`]'s address, or, for a cluster of
//! servers, to its addresses round robin by client index (with more than one
//! source, from 127.0.0.1, 127.0.0.2, ...); [`run::run`] and the binary
//! accept only loopback addresses. Latency and deliveries are measured the
//! same way whichever server a sender and its recipients are connected to.

pub mod churn;
pub mod process;
pub mod run;

use std::cell::RefCell;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore};

/// Phases of a run, in order. Senders send only in [`Phase::Run`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Connecting, naming and joining.
    Setup = 0,
    /// The measured window: senders send.
    Run = 1,
    /// Senders stopped; deliveries in flight still count.
    Drain = 2,
    /// Every client task ends.
    Stop = 3,
}

/// How the chosen senders send.
#[derive(Clone, Copy, Debug)]
pub enum Sending {
    /// Nobody sends (idle connections).
    Nobody,
    /// The first `senders` clients send as fast as a window of `window`
    /// undelivered messages each allows (at most 64).
    Window {
        /// How many clients send: the first ones.
        senders: usize,
        /// Messages each sender may have on the way, 1 to 64.
        window: u32,
    },
    /// The first `senders` clients each send one message every `period`.
    Rate {
        /// How many clients send: the first ones.
        senders: usize,
        /// The time between two messages of one sender.
        period: Duration,
    },
}

/// What to run: who connects where, and who sends.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The server under test; with [`Plan::more_addrs`], the first node of
    /// a cluster.
    pub addr: SocketAddr,
    /// The other nodes of a cluster under test, empty for one server:
    /// client `i` connects to entry `i % n` of `addr` followed by these
    /// (see [`Plan::addr_of`]).
    pub more_addrs: Vec<SocketAddr>,
    /// Number of clients.
    pub clients: usize,
    /// Client `i` joins room `i % rooms`.
    pub rooms: usize,
    /// Who sends, and how.
    pub sending: Sending,
    /// Generator threads.
    pub threads: usize,
    /// Source addresses 127.0.0.1, 127.0.0.2, ... used round robin, so more
    /// connections than one address's ephemeral ports allow can be opened.
    pub sources: usize,
    /// Initial read buffer per client, in bytes; grown for larger frames.
    pub read_buffer: usize,
    /// Handshakes in progress at once, per thread.
    pub connect_concurrency: usize,
    /// Bytes of padding added to each chat message's text.
    pub padding: usize,
    /// Offer permessage-deflate (RFC 7692) in the handshake, and inflate
    /// the compressed frames the server then sends.
    pub deflate: bool,
}

impl Plan {
    /// Every server under test: `addr`, then `more_addrs`.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        std::iter::once(self.addr).chain(self.more_addrs.iter().copied())
    }

    /// The server client `id` connects to: the servers round robin by
    /// client index. Room `r`'s members are the clients `i` with
    /// `i % rooms == r`, so with N servers they spread over all N when N
    /// and the number of rooms have no common divisor (3 nodes and 1 or
    /// 1,000 rooms), and over N / gcd(N, rooms) of them otherwise.
    pub fn addr_of(&self, id: usize) -> SocketAddr {
        match id % (1 + self.more_addrs.len()) {
            0 => self.addr,
            n => self.more_addrs[n - 1],
        }
    }

    /// Members of room `room`.
    pub fn room_size(&self, room: usize) -> usize {
        self.clients / self.rooms + usize::from(room < self.clients % self.rooms)
    }

    /// The `userJoined` events every client together receives while the
    /// rooms fill: each join is announced to the members so far, joiner
    /// included, so a room of n members sees n(n+1)/2.
    pub fn expected_join_events(&self) -> u64 {
        (0..self.rooms).map(|r| self.room_size(r) as u64).map(|n| n * (n + 1) / 2).sum()
    }

    /// Clients that send: the first `senders`, at most all of them.
    pub fn senders(&self) -> usize {
        match self.sending {
            Sending::Nobody => 0,
            Sending::Window { senders, .. } | Sending::Rate { senders, .. } => senders.min(self.clients),
        }
    }
}

/// One sender's window: a countdown of recipients per slot, a mask of free
/// slots, and the sender's wake-up.
struct Window {
    /// Bit `k` is set while slot `k` is free to send into.
    free: AtomicU64,
    /// Recipients that have not yet received the message in each slot.
    remaining: Vec<AtomicU32>,
    /// Woken when a slot frees.
    notify: Notify,
}

/// State shared by every thread of a run and the thread that drives it.
pub struct Shared {
    /// The current [`Phase`].
    phase: AtomicU8,
    /// Clients that have joined their room (seen `roomJoined`).
    pub ready: AtomicUsize,
    /// Clients that could not connect.
    pub failed: AtomicUsize,
    /// The first connection error, for the report.
    pub first_error: Mutex<Option<String>>,
    /// Clients whose connection the server closed or dropped after setup.
    pub closed: AtomicUsize,
    /// `userJoined` events received.
    pub join_events: AtomicU64,
    /// `error` replies received (a chat message the server refused, for
    /// one: a cluster node that cannot keep it answers `unavailable`).
    pub errors: AtomicU64,
    /// Chat messages sent in the run.
    pub sent: AtomicU64,
    /// Deliveries the sent messages should make (recipients per message).
    pub expected: AtomicU64,
    /// Chat messages received.
    pub delivered: AtomicU64,
    /// Bytes read from the server after setup, frames and headers (what
    /// the wire carried, compressed or not).
    pub bytes_in: AtomicU64,
    /// Per sender, in window mode.
    windows: Vec<Window>,
    /// The zero of the send timestamps in messages.
    epoch: Instant,
}

impl Shared {
    /// The state for a run of `plan`, in [`Phase::Setup`].
    pub fn new(plan: &Plan) -> Arc<Self> {
        let windows = match plan.sending {
            Sending::Window { window, .. } => (0..plan.senders())
                .map(|_| Window {
                    free: AtomicU64::new(0),
                    remaining: (0..window).map(|_| AtomicU32::new(0)).collect(),
                    notify: Notify::new(),
                })
                .collect(),
            _ => Vec::new(),
        };
        Arc::new(Self {
            phase: AtomicU8::new(Phase::Setup as u8),
            ready: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            first_error: Mutex::new(None),
            closed: AtomicUsize::new(0),
            join_events: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            windows,
            epoch: Instant::now(),
        })
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Setup,
            1 => Phase::Run,
            2 => Phase::Drain,
            _ => Phase::Stop,
        }
    }

    /// Moves the run to `phase`. Entering [`Phase::Run`] opens every window.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
        if phase == Phase::Run {
            for window in &self.windows {
                let all =
                    if window.remaining.len() >= 64 { u64::MAX } else { (1 << window.remaining.len()) - 1 };
                window.free.store(all, Ordering::Release);
                window.notify.notify_one();
            }
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn fail(&self, err: &anyhow::Error) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(PoisonError::into_inner);
        first.get_or_insert_with(|| format!("{err:#}"));
    }
}

/// Runs the clients of `plan` (see [`spawn`]) while `phases` drives the run
/// from this thread; then sets [`Phase::Stop`], waits for every client
/// thread and merges their latencies. The clients stop whatever `phases`
/// returns.
pub fn run_clients<T>(
    plan: &Arc<Plan>,
    shared: &Arc<Shared>,
    phases: impl FnOnce() -> T,
) -> anyhow::Result<(T, Histogram)> {
    let threads = spawn(plan, shared);
    let outcome = phases();
    shared.set_phase(Phase::Stop);
    let mut histogram = Histogram::new();
    for thread in threads {
        let part = thread.join().map_err(|_| anyhow::anyhow!("a generator thread panicked"))?;
        histogram.merge(&part);
    }
    Ok((outcome, histogram))
}

/// A latency in milliseconds, with the precision its size deserves.
pub fn format_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 1.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.3} ms")
    }
}

/// A size in MiB.
pub fn format_mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Runs every client of `plan` on `plan.threads` threads until the phase
/// becomes [`Phase::Stop`]; returns the latencies they measured.
pub fn spawn(plan: &Arc<Plan>, shared: &Arc<Shared>) -> Vec<std::thread::JoinHandle<Histogram>> {
    (0..plan.threads.max(1))
        .map(|thread| {
            let (plan, shared) = (plan.clone(), shared.clone());
            std::thread::Builder::new()
                .name(format!("loadgen-{thread}"))
                .spawn(move || worker(&plan, &shared, thread))
                .expect("spawning a generator thread")
        })
        .collect()
}

fn worker(plan: &Arc<Plan>, shared: &Arc<Shared>, thread: usize) -> Histogram {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread tokio runtime");
    let local = tokio::task::LocalSet::new();
    let histogram = Rc::new(RefCell::new(Histogram::new()));
    local.block_on(&runtime, async {
        let gate = Rc::new(Semaphore::new(plan.connect_concurrency.max(1)));
        let threads = plan.threads.max(1);
        for id in (thread..plan.clients).step_by(threads) {
            let client = Client::new(id, plan.clone(), shared.clone(), histogram.clone());
            tokio::task::spawn_local(client.run(gate.clone()));
        }
        while shared.phase() != Phase::Stop {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    // Dropping the LocalSet and the runtime closes every client's socket.
    drop(local);
    histogram.take()
}

/// One chat client.
struct Client {
    id: usize,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    histogram: Rc<RefCell<Histogram>>,
    /// Masks for what this client sends, from a per-client xorshift.
    rng: u64,
}

impl Client {
    fn new(id: usize, plan: Arc<Plan>, shared: Arc<Shared>, histogram: Rc<RefCell<Histogram>>) -> Self {
        let rng = (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        Self { id, plan, shared, histogram, rng }
    }

    async fn run(mut self, gate: Rc<Semaphore>) {
        let permit = gate.acquire().await;
        let connected = connect(&self.plan, self.id).await;
        drop(permit);
        let (stream, buf, filled) = match connected {
            Ok(connected) => connected,
            Err(err) => return self.shared.fail(&err),
        };
        if let Err(err) = self.session(stream, buf, filled).await {
            // Only a server that closes a working connection lands here.
            if self.shared.phase() != Phase::Stop {
                self.shared.closed.fetch_add(1, Ordering::Relaxed);
                tracing_line(self.id, &err);
            }
        }
    }

    fn mask(&mut self) -> [u8; 4] {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng as u32).to_le_bytes()
    }

    /// Names the client, joins its room, then reads (and sends, if it is a
    /// sender) until the run stops or the server closes.
    async fn session(
        &mut self,
        mut stream: TcpStream,
        mut buf: Vec<u8>,
        mut end: usize,
    ) -> anyhow::Result<()> {
        let mut out = Vec::with_capacity(512);
        let room = self.id % self.plan.rooms;
        let hello = [
            format!(r#"{{"type":"setUsername","username":"u{}"}}"#, self.id),
            format!(r#"{{"type":"joinRoom","room":"r{room}"}}"#),
        ];
        for text in &hello {
            let mask = self.mask();
            push_frame(&mut out, OP_TEXT, text.as_bytes(), mask);
        }
        stream.write_all(&out).await.context("sending setUsername and joinRoom")?;
        out.clear();

        let sender = self.id < self.plan.senders();
        let recipients = self.plan.room_size(room).saturating_sub(1) as u32;
        let mut ticker = match self.plan.sending {
            Sending::Rate { period, .. } if sender => {
                // Spread the senders' ticks over the period.
                let offset = period.mul_f64((self.id as f64 + 0.5) / self.plan.senders() as f64);
                let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                Some(ticker)
            }
            _ => None,
        };
        let shared = self.shared.clone();
        let window = if sender { shared.windows.get(self.id) } else { None };
        let mut start = 0;
        let mut text = String::with_capacity(64 + self.plan.padding);
        loop {
            // Everything complete in the buffer, parsed in place.
            let now = self.shared.now_us();
            let mut tally = Tally::default();
            while let Some(frame) = parse_frame(&buf[start..end])? {
                let payload = &buf[start + frame.payload.start..start + frame.payload.end];
                match frame.opcode {
                    OP_TEXT if frame.compressed => {
                        let inflated = inflate_prefix(payload, INFLATE_PREFIX)?;
                        self.on_text(&inflated, now, &mut tally);
                    }
                    OP_TEXT | OP_CONTINUATION => self.on_text(payload, now, &mut tally),
                    OP_PING => {
                        let mask = self.mask();
                        push_frame(&mut out, OP_PONG, payload, mask);
                    }
                    OP_CLOSE => bail!("the server closed the connection"),
                    _ => {}
                }
                start += frame.len;
            }
            tally.flush(&self.shared);
            if !out.is_empty() {
                stream.write_all(&out).await.context("answering pings")?;
                out.clear();
            }
            if start == end {
                (start, end) = (0, 0);
            } else if end == buf.len() {
                buf.copy_within(start..end, 0);
                (start, end) = (0, end - start);
                if end == buf.len() {
                    // One frame larger than the buffer: grow to fit it.
                    let len = buf.len();
                    buf.resize(len * 2, 0);
                }
            }

            tokio::select! {
                // Sends first: they are bounded by the window or the rate,
                // while a busy socket is almost always readable.
                biased;
                slots = next_slots(window, &shared), if window.is_some() => {
                    let window = window.context("window")?;
                    for slot in (0..64).filter(|k| slots & (1 << k) != 0) {
                        window.remaining[slot].store(recipients, Ordering::Release);
                        self.chat_frame(&mut out, &mut text, slot);
                    }
                    let count = u64::from(slots.count_ones());
                    self.shared.sent.fetch_add(count, Ordering::Relaxed);
                    self.shared.expected.fetch_add(count * u64::from(recipients), Ordering::Relaxed);
                    stream.write_all(&out).await.context("sending")?;
                    out.clear();
                },
                _ = tick(&mut ticker), if ticker.is_some() => {
                    if self.shared.phase() == Phase::Run {
                        self.chat_frame(&mut out, &mut text, 0);
                        self.shared.sent.fetch_add(1, Ordering::Relaxed);
                        self.shared.expected.fetch_add(u64::from(recipients), Ordering::Relaxed);
                        stream.write_all(&out).await.context("sending")?;
                        out.clear();
                    }
                },
                read = stream.read(&mut buf[end..]) => match read {
                    Ok(0) => bail!("the server closed the TCP connection"),
                    Ok(n) => {
                        end += n;
                        self.shared.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(err) => return Err(err).context("reading"),
                },
            }
        }
    }

    /// Appends a masked `chatMessage` frame whose text carries the marker.
    fn chat_frame(&mut self, out: &mut Vec<u8>, text: &mut String, slot: usize) {
        text.clear();
        let now = self.shared.now_us();
        let _ = write!(text, r#"{{"type":"chatMessage","text":"~{}~{slot}~{now}~"#, self.id);
        text.extend(std::iter::repeat_n('x', self.plan.padding));
        text.push_str("\"}");
        let mask = self.mask();
        push_frame(out, OP_TEXT, text.as_bytes(), mask);
    }

    fn on_text(&self, payload: &[u8], now: u64, tally: &mut Tally) {
        if let Some(at) = payload.iter().position(|&b| b == b'~') {
            let Some((sender, slot, sent_at)) = parse_marker(&payload[at + 1..]) else { return };
            tally.delivered += 1;
            self.histogram.borrow_mut().record(now.saturating_sub(sent_at));
            if let Some(window) = self.shared.windows.get(sender)
                && let Some(remaining) = window.remaining.get(slot)
                && remaining.fetch_sub(1, Ordering::AcqRel) == 1
            {
                window.free.fetch_or(1 << slot, Ordering::AcqRel);
                window.notify.notify_one();
            }
        } else if payload.starts_with(br#"{"type":"userJoined""#) {
            tally.join_events += 1;
        } else if payload.starts_with(br#"{"type":"error""#) {
            tally.errors += 1;
        } else if payload.starts_with(br#"{"type":"roomJoined""#) {
            self.shared.ready.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counts gathered over one buffer's frames and added to the shared
/// counters once, to keep atomic traffic per read, not per message.
#[derive(Default)]
struct Tally {
    delivered: u64,
    join_events: u64,
    errors: u64,
}

impl Tally {
    fn flush(&self, shared: &Shared) {
        if self.delivered > 0 {
            shared.delivered.fetch_add(self.delivered, Ordering::Relaxed);
        }
        if self.join_events > 0 {
            shared.join_events.fetch_add(self.join_events, Ordering::Relaxed);
        }
        if self.errors > 0 {
            shared.errors.fetch_add(self.errors, Ordering::Relaxed);
        }
    }
}

/// Waits until some window slots are free during the run; returns them, now
/// taken.
async fn next_slots(window: Option<&Window>, shared: &Shared) -> u64 {
    let Some(window) = window else { return std::future::pending().await };
    loop {
        if shared.phase() == Phase::Run {
            let slots = window.free.swap(0, Ordering::AcqRel);
            if slots != 0 {
                return slots;
            }
        }
        window.notify.notified().await;
    }
}

async fn tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(ticker) => {
            ticker.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Reads `SENDER~SLOT~MICROS~` (the part after the first `~`).
fn parse_marker(text: &[u8]) -> Option<(usize, usize, u64)> {
    let mut numbers = [0_u64; 3];
    let mut field = 0;
    let mut digits = 0;
    for &byte in text {
        match byte {
            b'0'..=b'9' => {
                numbers[field] = numbers[field].checked_mul(10)?.checked_add(u64::from(byte - b'0'))?;
                digits += 1;
            }
            b'~' if digits > 0 => {
                field += 1;
                digits = 0;
                if field == numbers.len() {
                    let [sender, slot, micros] = numbers;
                    return Some((usize::try_from(sender).ok()?, usize::try_from(slot).ok()?, micros));
                }
            }
            _ => return None,
        }
    }
    None
}

/// A log line for an unexpected close, to stderr (only the first few, so a
/// mass disconnect does not flood the terminal).
#[allow(clippy::print_stderr)] // the generator's only diagnostic
fn tracing_line(id: usize, err: &anyhow::Error) {
    static SHOWN: AtomicUsize = AtomicUsize::new(0);
    if SHOWN.fetch_add(1, Ordering::Relaxed) < 5 {
        eprintln!("loadgen: client {id}: {err:#}");
    }
}

/// Opens a TCP connection (from source address `id % sources`) and performs
/// the WebSocket handshake; returns the stream and a read buffer holding
/// whatever followed the response head. Source addresses apply to IPv4 only;
/// an IPv6 server is reached from the system's choice.
pub async fn connect(plan: &Plan, id: usize) -> anyhow::Result<(TcpStream, Vec<u8>, usize)> {
    connect_with(plan, id, true).await
}

/// [`connect`], with TCP_NODELAY only if `nodelay`. A client that writes
/// only once the server has answered everything it wrote before (churn: the
/// request, then the close after the greeting) never has a write held back
/// by Nagle's algorithm, so for it the option is a system call per
/// connection for nothing.
pub async fn connect_with(
    plan: &Plan,
    id: usize,
    nodelay: bool,
) -> anyhow::Result<(TcpStream, Vec<u8>, usize)> {
    let addr = plan.addr_of(id);
    let socket = if addr.is_ipv6() { TcpSocket::new_v6() } else { TcpSocket::new_v4() };
    let socket = socket.context("socket")?;
    if plan.sources > 1 && addr.is_ipv4() {
        let source = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 1)) + (id % plan.sources) as u32);
        socket.bind(SocketAddr::new(source.into(), 0)).with_context(|| format!("binding {source}"))?;
    }
    let mut stream = socket.connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    if nodelay {
        stream.set_nodelay(true).context("TCP_NODELAY")?;
    }
    let offer = if plan.deflate { "Sec-WebSocket-Extensions: permessage-deflate\r\n" } else { "" };
    let request = format!(
        "GET /ws/chat HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    );
    stream.write_all(request.as_bytes()).await.context("sending the upgrade request")?;
    let mut buf = vec![0_u8; plan.read_buffer.max(1024)];
    let mut filled = 0;
    let head_end = loop {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf[filled..]))
            .await
            .context("no handshake response within 30 s")?
            .context("reading the handshake response")?;
        if n == 0 {
            bail!("the server closed the connection during the handshake");
        }
        filled += n;
        if let Some(at) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if filled == buf.len() {
            bail!("handshake response too long");
        }
    };
    if !buf.starts_with(b"HTTP/1.1 101") {
        let line = String::from_utf8_lossy(&buf[..head_end]);
        bail!("upgrade refused: {}", line.lines().next().unwrap_or_default());
    }
    buf.copy_within(head_end..filled, 0);
    Ok((stream, buf, filled - head_end))
}

/// Opcode of a continuation frame.
pub const OP_CONTINUATION: u8 = 0x0;
/// Opcode of a text frame.
pub const OP_TEXT: u8 = 0x1;
/// Opcode of a close frame.
pub const OP_CLOSE: u8 = 0x8;
/// Opcode of a ping frame.
pub const OP_PING: u8 = 0x9;
/// Opcode of a pong frame.
pub const OP_PONG: u8 = 0xA;

/// Where one complete frame lies at the start of a buffer.
pub struct FrameRef {
    /// The frame's opcode (`OP_*`).
    pub opcode: u8,
    /// RSV1: the payload is compressed (permessage-deflate).
    pub compressed: bool,
    /// The payload's byte range, relative to the frame's start.
    pub payload: std::ops::Range<usize>,
    /// The whole frame's length.
    pub len: usize,
}

/// Parses the frame at the start of `buf`, if it is complete. Server frames
/// are not masked; a masked one is refused, as RFC 6455 requires.
pub fn parse_frame(buf: &[u8]) -> anyhow::Result<Option<FrameRef>> {
    let [first, second, ..] = *buf else { return Ok(None) };
    if second & 0x80 != 0 {
        bail!("the server sent a masked frame");
    }
    let (len, header) = match second & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().context("length")?), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let len = usize::try_from(len).context("frame too large")?;
    let total = header + len;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(FrameRef {
        opcode: first & 0x0f,
        compressed: first & 0x40 != 0,
        payload: header..total,
        len: total,
    }))
}

thread_local! {
    /// This generator thread's inflater, reset for each message: the
    /// server takes no context over between messages.
    static INFLATER: std::cell::RefCell<flate2::Decompress> =
        std::cell::RefCell::new(flate2::Decompress::new(false));
}

/// How much of a compressed message the generator inflates: enough for
/// the event's type and the marker, which come first. Inflating the rest
/// would measure the generator, not the server; the bytes on the wire are
/// counted whole.
const INFLATE_PREFIX: usize = 256;

/// Inflates the first `max` bytes of one compressed message (RFC 7692: the
/// payload, then `00 00 ff ff`), or all of it if it is shorter.
pub fn inflate_prefix(payload: &[u8], max: usize) -> anyhow::Result<Vec<u8>> {
    INFLATER.with_borrow_mut(|inflater| {
        inflater.reset(false);
        let mut out = Vec::with_capacity(max);
        for input in [payload, &[0, 0, 0xff, 0xff]] {
            let before = inflater.total_in();
            inflater
                .decompress_vec(input, &mut out, flate2::FlushDecompress::Sync)
                .context("the server sent invalid compressed data")?;
            let consumed = inflater.total_in() - before;
            if out.len() == out.capacity() || consumed < input.len() as u64 {
                break;
            }
        }
        Ok(out)
    })
}

/// Appends a final, masked client frame.
pub fn push_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, byte) in out[start..].iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Latencies in microseconds, in log-linear buckets: exact below 128 µs,
/// then 64 buckets per power of two (under 1.6 % error).
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
const HALF: u64 = SUB / 2;

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self { counts: vec![0; (SUB + 64 * HALF) as usize], total: 0, max: 0 }
    }

    fn index(value: u64) -> usize {
        if value < SUB {
            return value as usize;
        }
        let msb = 63 - u64::from(value.leading_zeros());
        let shift = msb - u64::from(SUB_BITS - 1);
        let mantissa = value >> shift;
        (SUB + (shift - 1) * HALF + (mantissa - HALF)) as usize
    }

    /// The middle of bucket `index`.
    fn value(index: usize) -> u64 {
        let index = index as u64;
        if index < SUB {
            return index;
        }
        let k = index - SUB;
        let shift = k / HALF + 1;
        let low = (HALF + k % HALF) << shift;
        low + (1 << shift) / 2
    }

    /// Adds one latency, in microseconds.
    pub fn record(&mut self, micros: u64) {
        if let Some(count) = self.counts.get_mut(Self::index(micros)) {
            *count += 1;
        }
        self.total += 1;
        self.max = self.max.max(micros);
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Self) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The number of samples.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The largest sample, exactly.
    pub fn max(&self) -> Duration {
        Duration::from_micros(self.max)
    }

    /// The latency below which a fraction `q` of the samples fall.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Duration::from_micros(Self::value(index).min(self.max));
            }
        }
        Duration::from_micros(self.max)
    }

    /// p50, p90, p99, p99.9 and the maximum.
    pub fn summary(&self) -> [Duration; 5] {
        [self.quantile(0.5), self.quantile(0.9), self.quantile(0.99), self.quantile(0.999), self.max()]
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn frames_round_trip_through_the_parser() {
        let mut out = Vec::new();
        push_frame(&mut out, OP_TEXT, b"hello", [0, 0, 0, 0]);
        // Masked with a zero key the payload is unchanged; clear the mask bit
        // and drop the key to read it as a server frame.
        let mut server = vec![out[0], out[1] & 0x7f];
        server.extend_from_slice(&out[6..]);
        let frame = parse_frame(&server).unwrap().unwrap();
        assert_eq!((frame.opcode, &server[frame.payload.clone()], frame.len), (OP_TEXT, &b"hello"[..], 7));
        assert!(parse_frame(&server[..4]).unwrap().is_none());
        let mut long = vec![0x81, 126, 0x01, 0x00];
        long.extend(std::iter::repeat_n(b'a', 256));
        assert_eq!(parse_frame(&long).unwrap().unwrap().len, 260);
        assert!(parse_frame(&[0x81, 0x85, 0, 0, 0, 0]).is_err(), "masked server frames are refused");
    }

    #[test]
    fn masks_apply_to_the_payload() {
        let mut out = Vec::new();
        push_frame(&mut out, OP_TEXT, b"abcd", [1, 2, 3, 4]);
        assert_eq!(&out[..2], &[0x81, 0x84]);
        assert_eq!(&out[6..], &[b'a' ^ 1, b'b' ^ 2, b'c' ^ 3, b'd' ^ 4]);
    }

    #[test]
    fn markers_are_read_from_the_text() {
        assert_eq!(parse_marker(b"12~3~456~xx\"}"), Some((12, 3, 456)));
        assert_eq!(parse_marker(b"12~3~"), None);
        assert_eq!(parse_marker(b"a~1~2~"), None);
    }

    #[test]
    fn histogram_quantiles_are_close() {
        let mut h = Histogram::new();
        for v in 1..=100_000 {
            h.record(v);
        }
        let p50 = h.quantile(0.5).as_micros() as f64;
        let p99 = h.quantile(0.99).as_micros() as f64;
        assert!((p50 / 50_000.0 - 1.0).abs() < 0.02, "p50 {p50}");
        assert!((p99 / 99_000.0 - 1.0).abs() < 0.02, "p99 {p99}");
        assert_eq!(h.max(), Duration::from_micros(100_000));
        assert_eq!(Histogram::index(127), 127);
        assert!(Histogram::value(Histogram::index(1_000_000)).abs_diff(1_000_000) < 16_000);
    }

    #[test]
    fn room_sizes_add_up() {
        let plan = Plan {
            addr: "127.0.0.1:1".parse().unwrap(),
            more_addrs: Vec::new(),
            clients: 25,
            rooms: 10,
            sending: Sending::Nobody,
            threads: 1,
            sources: 1,
            read_buffer: 4096,
            connect_concurrency: 1,
            padding: 0,
            deflate: false,
        };
        assert_eq!((0..10).map(|r| plan.room_size(r)).sum::<usize>(), 25);
        assert_eq!(plan.room_size(0), 3);
        assert_eq!(plan.room_size(9), 2);
        assert_eq!(plan.expected_join_events(), 5 * 6 + 5 * 3);
    }
}
