//! The server's counters, exported in Prometheus text format at `/metrics`
//! and summarized in `/api/status`.
//!
//! Each server owns its registry (no global recorder), so several servers in
//! one process (as in the tests) keep separate counts. Hot paths add to a
//! counter once per broadcast, not once per recipient.

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every metric the server keeps.
#[derive(Debug)]
pub(crate) struct Stats {
    registry: Registry,
    /// Open WebSocket connections, by endpoint.
    pub(crate) open: IntGaugeVec,
    /// WebSocket connections accepted, by endpoint.
    pub(crate) accepted: IntCounterVec,
    /// WebSocket connections closed, by close code.
    pub(crate) closed: IntCounterVec,
    /// Frames received from clients (text and binary).
    pub(crate) received: IntCounter,
    /// Frames queued to clients.
    pub(crate) delivered: IntCounter,
    /// Payload bytes received.
    pub(crate) bytes_in: IntCounter,
    /// Payload bytes queued to clients.
    pub(crate) bytes_out: IntCounter,
    /// Rooms that exist.
    pub(crate) rooms: IntGauge,
    /// Connections dropped for not answering heartbeat pings.
    pub(crate) dead_reaped: IntCounter,
    /// Connections dropped because their outbound queue was full.
    pub(crate) slow_consumers: IntCounter,
    /// Messages refused by a rate limit.
    pub(crate) rate_limited: IntCounter,
    /// Upgrades refused, by reason (`origin`, `server_full`,
    /// `address_full`, `rate_limited`).
    pub(crate) refused: IntCounterVec,
    /// TCP connections closed at once, before HTTP, by reason
    /// (`server_full`, `address_full`).
    pub(crate) connections_refused: IntCounterVec,
    /// HTTP connections open and not upgraded (TLS handshakes included).
    pub(crate) http_open: IntGauge,
    /// HTTP connections closed for not sending a request's headers in time.
    pub(crate) header_timeouts: IntCounter,
    /// TLS handshakes that failed or timed out.
    pub(crate) tls_handshakes_failed: IntCounter,
    /// Failed `accept` calls (out of descriptors, mostly).
    pub(crate) accept_errors: IntCounter,
    /// When the next warning about refused connections may be logged.
    pub(crate) refusals_logged: Throttle,
    /// When the next warning about failed accepts may be logged.
    pub(crate) accept_errors_logged: Throttle,
    /// Uploads accepted.
    pub(crate) uploads_started: IntCounter,
    /// Uploads saved.
    pub(crate) uploads_finished: IntCounter,
    /// `fileError` events sent.
    pub(crate) uploads_failed: IntCounter,
    /// Bytes of saved uploads.
    pub(crate) upload_bytes_stored: IntCounter,
    /// Time to queue one broadcast to all its recipients.
    pub(crate) fanout_seconds: Histogram,
}

impl Stats {
    /// A fresh registry with every metric at zero.
    pub(crate) fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(format!("hubbub_{name}"), help).expect("valid metric name");
            registry.register(Box::new(c.clone())).expect("metric registered once");
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(format!("hubbub_{name}"), help), &[label])
                .expect("valid metric");
            registry.register(Box::new(c.clone())).expect("metric registered once");
            c
        };
        let open = IntGaugeVec::new(
            Opts::new("hubbub_connections_open", "Open WebSocket connections by endpoint"),
            &["endpoint"],
        )
        .expect("valid metric");
        registry.register(Box::new(open.clone())).expect("metric registered once");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(format!("hubbub_{name}"), help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("metric registered once");
            g
        };
        let rooms = gauge("rooms", "Rooms that exist");
        // From 1 µs to about 1 s: one broadcast to a handful up to tens of
        // thousands of queues.
        let buckets = prometheus::exponential_buckets(1e-6, 4.0, 11).expect("valid buckets");
        let fanout_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "hubbub_broadcast_fanout_seconds",
                "Time to queue one broadcast to every recipient",
            )
            .buckets(buckets),
        )
        .expect("valid metric");
        registry.register(Box::new(fanout_seconds.clone())).expect("metric registered once");
        Self {
            open,
            accepted: counter_vec("connections_accepted_total", "WebSocket connections accepted", "endpoint"),
            closed: counter_vec(
                "connections_closed_total",
                "WebSocket connections closed by close code",
                "code",
            ),
            received: counter("messages_received_total", "Frames received from clients"),
            delivered: counter("messages_delivered_total", "Frames queued to clients"),
            bytes_in: counter("bytes_received_total", "Payload bytes received from clients"),
            bytes_out: counter(
                "bytes_delivered_total",
                "Bytes queued to clients: WebSocket frames, headers included",
            ),
            rooms,
            dead_reaped: counter(
                "dead_connections_reaped_total",
                "Connections dropped for missing heartbeats",
            ),
            slow_consumers: counter("slow_consumers_dropped_total", "Connections dropped for a full queue"),
            rate_limited: counter("rate_limited_total", "Messages refused by a rate limit"),
            refused: counter_vec("upgrades_refused_total", "WebSocket upgrades refused", "reason"),
            connections_refused: counter_vec(
                "connections_refused_total",
                "TCP connections closed at once, over a connection cap",
                "reason",
            ),
            http_open: gauge("http_connections_open", "HTTP connections open and not upgraded"),
            header_timeouts: counter(
                "http_header_timeouts_total",
                "HTTP connections closed for not sending request headers in time",
            ),
            tls_handshakes_failed: counter(
                "tls_handshakes_failed_total",
                "TLS handshakes failed or timed out",
            ),
            accept_errors: counter("accept_errors_total", "Failed accept calls (out of descriptors, mostly)"),
            refusals_logged: Throttle::default(),
            accept_errors_logged: Throttle::default(),
            uploads_started: counter("uploads_started_total", "Uploads accepted"),
            uploads_finished: counter("uploads_finished_total", "Uploads saved"),
            uploads_failed: counter("upload_errors_total", "Upload errors reported to clients (fileError)"),
            upload_bytes_stored: counter("upload_bytes_stored_total", "Bytes of saved uploads"),
            fanout_seconds,
            registry,
        }
    }

    /// Records one broadcast of a `len`-byte frame to `recipients`.
    pub(crate) fn broadcast(&self, recipients: u64, len: usize, started: std::time::Instant) {
        self.delivered.inc_by(recipients);
        self.bytes_out.inc_by(recipients * len as u64);
        self.fanout_seconds.observe(started.elapsed().as_secs_f64());
    }

    /// Every metric in Prometheus text format.
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Keeps a warning that may repeat many times a second (an attack, a
/// descriptor shortage) to one log line per second, which says how many
/// times it happened since the last.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    /// When a line was last logged, and occurrences since.
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl Throttle {
    /// Counts one occurrence; `Some(count)` when a line is due, with the
    /// occurrences it stands for.
    pub(crate) fn due(&self) -> Option<u64> {
        const EVERY: std::time::Duration = std::time::Duration::from_secs(1);
        let now = std::time::Instant::now();
        let mut state = crate::sync::lock(&self.state);
        let (last, count) = &mut *state;
        *count += 1;
        if last.is_some_and(|at| now.saturating_duration_since(at) < EVERY) {
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(count))
    }
}

/// A close code as a label of bounded cardinality: the codes RFC 6455 and
/// the IANA registry define, and `other` for what a peer may make up.
pub(crate) fn code_label(code: u16) -> &'static str {
    match code {
        1000 => "1000",
        1001 => "1001",
        1002 => "1002",
        1003 => "1003",
        1005 => "1005",
        1006 => "1006",
        1007 => "1007",
        1008 => "1008",
        1009 => "1009",
        1010 => "1010",
        1011 => "1011",
        1012 => "1012",
        1013 => "1013",
        _ => "other",
    }
}
