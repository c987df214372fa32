//! Liveness for WebSocket peers, sans-IO: when to ping, when to give up.
//!
//! [`Heartbeat`] is a small state machine in the style of quinn-proto's
//! keep-alive and idle timers. It owns no clock, no socket and no runtime:
//! the driver tells it what happened, stamped with a `now` the driver read
//! from its own clock, and asks it what to do next and when to wake up.
//!
//! - [`Heartbeat::poll_action`] says what to do: send a ping, declare the
//!   peer dead, or nothing.
//! - [`Heartbeat::poll_timeout`] says when `poll_action` may next have an
//!   answer, so the driver can sleep until then (or until a frame arrives).
//! - [`Heartbeat::on_pong`] and [`Heartbeat::on_frame_received`] report what
//!   arrived; [`Heartbeat::on_ping_sent`] corrects the send time of a ping.
//!
//! [`HeartbeatTable`] runs the same rules (the same code) for many peers at
//! once, in 16 bytes per peer, for a driver that sweeps them all on one
//! timer instead of keeping a timer per peer: that is how the server uses
//! it. The rules below hold for both; `docs/PROTOCOL.md` states them for
//! clients.
//!
//! # Schedule
//!
//! The first ping is due [`HeartbeatConfig::interval`] after
//! [`Heartbeat::new`], each later one `interval` after the previous ping was
//! sent. After a ping the peer has [`HeartbeatConfig::timeout`] to answer with
//! a pong carrying the same token, or it is dead for good. Only one ping is
//! outstanding at a time: while one waits for its pong no other is sent, even
//! if the next one is already due.
//!
//! # A late pong does not count
//!
//! A pong that arrives at or after its ping's deadline does not revive the
//! peer, even if the driver has not yet looked at the clock since the
//! deadline passed: the peer is dead from the deadline on. So the outcome
//! depends only on when the pong arrived, never on when the driver happened
//! to poll or sweep.
//!
//! # Tokens and send time
//!
//! The machine picks the tokens itself (a counter), and `poll_action`
//! returning [`Action::SendPing`] counts as sending that ping at the `now`
//! passed to it: there is nothing else to call. A driver that writes the ping
//! noticeably later (say, after a slow flush) calls
//! [`Heartbeat::on_ping_sent`] once it is written, so that neither the
//! deadline nor the latency sample charges the peer for our own delay.
//!
//! # Only a pong answers a ping
//!
//! Other frames are recorded ([`Heartbeat::last_activity`]) but do not answer
//! an outstanding ping. This is deliberate: a peer that keeps writing but
//! never reads what we send must still be reaped, and only a pong proves that
//! it reads. Pongs with an unknown or stale token, including the unsolicited
//! pongs RFC 6455 allows, are ignored.
//!
//! # Server and client
//!
//! The server sends WebSocket Ping frames whose payload is the token
//! ([`encode_token`], [`decode_token`]), with [`HeartbeatConfig::default`],
//! from a [`HeartbeatTable`] per shard of its connections.
//! A client uses the application-level `ping` message instead, with
//! [`HeartbeatConfig::client_default`]: it puts the token in the `timestamp`
//! field, which the server echoes unchanged in its `pong`. The field needs no
//! clock reading because the machine measures latency itself, with monotonic
//! instants.
//!
//! # The driver loop
//!
//! A tokio driver selects between sleeping until `poll_timeout` and reading
//! the next frame; after either, it calls `poll_action` and acts on the
//! answer. This example plays the peer itself, in virtual time: it answers
//! three pings after 40 ms each, then falls silent.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use hubbub_heartbeat::{Action, Heartbeat, HeartbeatConfig, decode_token, encode_token};
//!
//! let config = HeartbeatConfig::default();
//! config.validate().expect("the defaults are valid");
//! // A real driver reads its runtime's clock; the machine never does.
//! let t0 = Instant::now();
//! let mut heartbeat = Heartbeat::new(config, t0);
//!
//! let mut now = t0;
//! let mut pings = 0;
//! loop {
//!     // Sleep until the machine's next deadline, then ask it what to do.
//!     now = heartbeat.poll_timeout().expect("a live peer always has a next deadline");
//!     match heartbeat.poll_action(now) {
//!         Some(Action::SendPing(token)) => {
//!             // Write a WebSocket Ping frame with this payload.
//!             let payload = encode_token(token);
//!             pings += 1;
//!             if pings <= 3 {
//!                 // The peer's Pong echoes the payload.
//!                 now += Duration::from_millis(40);
//!                 if let Some(token) = decode_token(&payload) {
//!                     heartbeat.on_pong(now, token);
//!                 }
//!             }
//!         }
//!         // Close the connection.
//!         Some(Action::PeerDead) => break,
//!         None => {}
//!     }
//! }
//! assert_eq!(pings, 4);
//! assert_eq!(now, t0 + 4 * config.interval + config.timeout);
//! let latency = heartbeat.latency().expect("three pongs arrived");
//! assert_eq!(latency.smoothed, Duration::from_millis(40));
//! ```

#[cfg(feature = "tokio")]
mod driver;
mod rules;
mod table;

#[cfg(feature = "tokio")]
pub use driver::Monitor;
pub use table::{HeartbeatTable, Key, Sweep};

use std::fmt;
use std::time::{Duration, Instant};

use rules::Phase;

/// How often to ping and how long to wait for the pong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// Time from one ping being sent to the next being due. Default 30 s.
    pub interval: Duration,
    /// Time the peer has to answer a ping before it is declared dead.
    /// Default 35 s.
    pub timeout: Duration,
}

impl Default for HeartbeatConfig {
    /// The server's settings: a WebSocket ping every 30 s, dead after 35 s
    /// without the pong.
    fn default() -> Self {
        Self { interval: Duration::from_secs(30), timeout: Duration::from_secs(35) }
    }
}

impl HeartbeatConfig {
    /// The client's settings: an application-level `ping` every 25 s, dead
    /// after 35 s without the `pong`.
    pub fn client_default() -> Self {
        Self { interval: Duration::from_secs(25), timeout: Duration::from_secs(35) }
    }

    /// Checks that both durations are positive. A zero interval would ping
    /// in a busy loop and a zero timeout would declare every peer dead, so a
    /// driver should refuse such a config at startup.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interval.is_zero() {
            return Err(ConfigError::ZeroInterval);
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::ZeroTimeout);
        }
        Ok(())
    }
}

/// Why a [`HeartbeatConfig`] was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigError {
    /// `interval` is zero.
    ZeroInterval,
    /// `timeout` is zero.
    ZeroTimeout,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ZeroInterval => "heartbeat interval must be greater than zero",
            Self::ZeroTimeout => "heartbeat timeout must be greater than zero",
        })
    }
}

impl std::error::Error for ConfigError {}

/// What the driver should do, as answered by [`Heartbeat::poll_action`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send a ping carrying this token: as a WebSocket Ping payload
    /// ([`encode_token`]) or as the `timestamp` of an application `ping`.
    SendPing(u64),
    /// The peer did not answer a ping in time: close the connection.
    PeerDead,
}

/// Round-trip time measured from pings and their pongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    /// The most recent sample.
    pub last: Duration,
    /// An average over recent samples, smoothed like TCP's SRTT (RFC 6298):
    /// the first sample sets it, each later one moves it by an eighth of the
    /// difference.
    pub smoothed: Duration,
}

impl Latency {
    fn first(sample: Duration) -> Self {
        Self { last: sample, smoothed: sample }
    }

    fn update(self, sample: Duration) -> Self {
        // 7/8 old + 1/8 new, written so that it cannot overflow.
        let smoothed = self.smoothed - self.smoothed / 8 + sample / 8;
        Self { last: sample, smoothed }
    }
}

/// The liveness state machine for one connection. See the [crate docs](crate).
#[derive(Debug, Clone)]
pub struct Heartbeat {
    /// The schedule.
    config: HeartbeatConfig,
    /// Where the peer stands: waiting for the next ping (due an interval
    /// after the previous one was sent, or after creation before the first),
    /// waiting for a pong, or dead.
    phase: Phase<Instant>,
    /// The token for the next ping. A counter makes stale pongs easy to tell
    /// from the current one.
    next_token: u64,
    /// When the last frame of any kind arrived, for the driver's logs and
    /// metrics.
    last_activity: Option<Instant>,
    /// Round-trip time, once a pong has answered a ping.
    latency: Option<Latency>,
}

impl Heartbeat {
    /// Starts watching a peer whose connection opened at `now`. The first
    /// ping will be due `config.interval` later.
    ///
    /// The config is taken as is; check it with [`HeartbeatConfig::validate`]
    /// when it is loaded.
    pub fn new(config: HeartbeatConfig, now: Instant) -> Self {
        Self {
            config,
            phase: Phase::start(&config, now),
            // Starts at 1 so that a peer echoing an all-zero payload never
            // answers a ping by accident.
            next_token: 1,
            last_activity: None,
            latency: None,
        }
    }

    /// Says what to do at `now`, if anything.
    ///
    /// [`Action::SendPing`] counts as sending the ping at `now`; call
    /// [`on_ping_sent`](Self::on_ping_sent) if it is written noticeably
    /// later. Once [`Action::PeerDead`] has been returned it is returned for
    /// every later call.
    pub fn poll_action(&mut self, now: Instant) -> Option<Action> {
        if self.phase == Phase::Dead {
            return Some(Action::PeerDead);
        }
        let next_token = &mut self.next_token;
        self.phase.poll(&self.config, now, || {
            let token = *next_token;
            *next_token = next_token.wrapping_add(1);
            token
        })
    }

    /// Records that the outstanding ping was actually written at `now`, later
    /// than the `poll_action` that asked for it. Its deadline, its latency
    /// sample and the next ping all count from `now` instead.
    ///
    /// Ignored if no ping is outstanding (it was already answered, or the
    /// peer is dead) and if `now` is earlier than the recorded send time.
    pub fn on_ping_sent(&mut self, now: Instant) {
        self.phase.restamp(now);
    }

    /// Records a pong carrying `token` that arrived at `now`.
    ///
    /// If it answers the outstanding ping in time it yields a latency sample
    /// and the next ping is due `interval` after that ping was sent. A pong
    /// arriving at or after the deadline does not revive the peer: from the
    /// deadline on it is dead, whenever the driver notices. Pongs with any
    /// other token are ignored. Either way the pong counts as activity, so
    /// the driver need not also call
    /// [`on_frame_received`](Self::on_frame_received).
    pub fn on_pong(&mut self, now: Instant, token: u64) {
        self.on_frame_received(now);
        self.phase.expire(&self.config, now);
        let Some(sent) = self.phase.answer(&self.config, now, token) else {
            return;
        };
        let sample = now.saturating_duration_since(sent);
        self.latency = Some(match self.latency {
            None => Latency::first(sample),
            Some(latency) => latency.update(sample),
        });
    }

    /// Records that a frame arrived at `now`.
    ///
    /// This does not answer an outstanding ping: see the
    /// [crate docs](crate#only-a-pong-answers-a-ping).
    pub fn on_frame_received(&mut self, now: Instant) {
        self.last_activity = Some(now);
    }

    /// The instant at which [`poll_action`](Self::poll_action) may next
    /// return something: the pong deadline while a ping is outstanding,
    /// otherwise the time the next ping is due. It may be in the past, in
    /// which case the driver should poll at once.
    ///
    /// `None` once the peer is dead (`poll_action` then always says so), or
    /// if the configured durations are too large to represent an instant.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.phase.next_change(&self.config)
    }

    /// Round-trip time, once at least one pong has answered a ping.
    pub fn latency(&self) -> Option<Latency> {
        self.latency
    }

    /// Whether the peer missed a pong deadline. Like
    /// [`poll_action`](Self::poll_action), this only learns about a deadline
    /// passing when told a `now` at or after it.
    pub fn is_dead(&self) -> bool {
        self.phase == Phase::Dead
    }

    /// When the last frame of any kind (pongs included) arrived, if any has.
    pub fn last_activity(&self) -> Option<Instant> {
        self.last_activity
    }

    /// The config this machine was created with.
    pub fn config(&self) -> &HeartbeatConfig {
        &self.config
    }
}

/// Encodes a ping token as a WebSocket Ping payload: 8 bytes, big-endian.
pub fn encode_token(token: u64) -> [u8; 8] {
    token.to_be_bytes()
}

/// Decodes a WebSocket Pong payload made by [`encode_token`]. Any payload
/// that is not exactly 8 bytes gives `None`: it cannot answer our ping.
pub fn decode_token(payload: &[u8]) -> Option<u64> {
    payload.try_into().ok().map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: Duration = Duration::from_nanos(1);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A machine with the server defaults, and the time it was created.
    fn started() -> (Heartbeat, Instant) {
        let t0 = Instant::now();
        (Heartbeat::new(HeartbeatConfig::default(), t0), t0)
    }

    /// Polls at `at` and returns the ping token, failing the test otherwise.
    fn ping(heartbeat: &mut Heartbeat, at: Instant) -> u64 {
        match heartbeat.poll_action(at) {
            Some(Action::SendPing(token)) => token,
            other => panic!("expected a ping at {at:?}, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let server = HeartbeatConfig::default();
        assert_eq!((server.interval, server.timeout), (secs(30), secs(35)));
        let client = HeartbeatConfig::client_default();
        assert_eq!((client.interval, client.timeout), (secs(25), secs(35)));
    }

    #[test]
    fn validate_rejects_zero_durations() {
        assert_eq!(HeartbeatConfig::default().validate(), Ok(()));
        assert_eq!(HeartbeatConfig::client_default().validate(), Ok(()));
        let zero_interval = HeartbeatConfig { interval: Duration::ZERO, ..HeartbeatConfig::default() };
        assert_eq!(zero_interval.validate(), Err(ConfigError::ZeroInterval));
        let zero_timeout = HeartbeatConfig { timeout: Duration::ZERO, ..HeartbeatConfig::default() };
        assert_eq!(zero_timeout.validate(), Err(ConfigError::ZeroTimeout));
        assert_eq!(ConfigError::ZeroTimeout.to_string(), "heartbeat timeout must be greater than zero");
    }

    #[test]
    fn first_ping_is_due_one_interval_after_new() {
        let (mut hb, t0) = started();
        assert_eq!(hb.poll_timeout(), Some(t0 + secs(30)));
        assert_eq!(hb.poll_action(t0), None);
        assert_eq!(hb.poll_action(t0 + secs(30) - NS), None);
        assert_eq!(hb.poll_action(t0 + secs(30)), Some(Action::SendPing(1)));
        // The ping is outstanding: nothing more until its deadline.
        assert_eq!(hb.poll_action(t0 + secs(30)), None);
        assert_eq!(hb.poll_timeout(), Some(t0 + secs(65)));
    }

    #[test]
    fn pong_in_time_records_latency_and_schedules_from_the_previous_ping() {
        let (mut hb, t0) = started();
        let sent = t0 + secs(30);
        let token = ping(&mut hb, sent);
        hb.on_pong(sent + ms(120), token);

        assert!(!hb.is_dead());
        let latency = hb.latency().expect("the pong answered the ping");
        assert_eq!((latency.last, latency.smoothed), (ms(120), ms(120)));
        assert_eq!(hb.last_activity(), Some(sent + ms(120)));
        assert_eq!(hb.poll_timeout(), Some(sent + secs(30)));
        assert_eq!(hb.poll_action(sent + secs(30) - NS), None);
        assert_eq!(ping(&mut hb, sent + secs(30)), token + 1);
    }

    #[test]
    fn no_pong_means_dead_exactly_at_the_deadline_and_for_good() {
        let (mut hb, t0) = started();
        let sent = t0 + secs(30);
        ping(&mut hb, sent);
        let deadline = sent + secs(35);
        assert_eq!(hb.poll_timeout(), Some(deadline));
        assert_eq!(hb.poll_action(deadline - NS), None);
        assert!(!hb.is_dead());
        assert_eq!(hb.poll_action(deadline), Some(Action::PeerDead));
        assert!(hb.is_dead());
        assert_eq!(hb.poll_timeout(), None);
        assert_eq!(hb.poll_action(deadline + secs(100)), Some(Action::PeerDead));
    }

    #[test]
    fn a_late_pong_does_not_revive_the_peer() {
        let (mut hb, t0) = started();
        let sent = t0 + secs(30);
        let token = ping(&mut hb, sent);
        // The driver had not polled since the deadline when the pong came.
        hb.on_pong(sent + secs(35), token);
        assert!(hb.is_dead());
        assert_eq!(hb.latency(), None);
        assert_eq!(hb.poll_action(sent + secs(35)), Some(Action::PeerDead));
        // Nor does one arriving after the driver saw the death.
        hb.on_pong(sent + secs(36), token);
        assert_eq!(hb.poll_action(sent + secs(36)), Some(Action::PeerDead));
        assert_eq!(hb.latency(), None);
    }

    #[test]
    fn other_frames_are_recorded_but_do_not_answer_a_ping() {
        let (mut hb, t0) = started();
        let sent = t0 + secs(30);
        ping(&mut hb, sent);
        for second in 31..65 {
            hb.on_frame_received(t0 + secs(second));
            assert_eq!(hb.poll_action(t0 + secs(second)), None);
        }
        assert_eq!(hb.last_activity(), Some(t0 + secs(64)));
        assert_eq!(hb.poll_action(sent + secs(35)), Some(Action::PeerDead));
    }

    #[test]
    fn stale_and_unknown_tokens_are_ignored() {
        let (mut hb, t0) = started();
        // An unsolicited pong before any ping.
        hb.on_pong(t0 + secs(1), 1);
        assert_eq!(hb.latency(), None);
        assert_eq!(hb.last_activity(), Some(t0 + secs(1)));

        let first = ping(&mut hb, t0 + secs(30));
        hb.on_pong(t0 + secs(31), first);
        let second = ping(&mut hb, t0 + secs(60));
        // A duplicate of the first pong, then a token we never sent.
        hb.on_pong(t0 + secs(61), first);
        hb.on_pong(t0 + secs(62), second + 1000);
        assert_eq!(hb.latency().map(|l| l.last), Some(secs(1)));
        assert_eq!(hb.poll_timeout(), Some(t0 + secs(95)));
        assert_eq!(hb.poll_action(t0 + secs(95)), Some(Action::PeerDead));
    }

    #[test]
    fn a_due_ping_waits_while_the_previous_one_is_unanswered() {
        let (mut hb, t0) = started();
        let token = ping(&mut hb, t0 + secs(30));
        // At 60 s the next ping would be due, but the first is still out.
        assert_eq!(hb.poll_action(t0 + secs(60)), None);
        // Answered late but in time: the next ping is overdue, so at once.
        hb.on_pong(t0 + secs(62), token);
        assert_eq!(hb.poll_timeout(), Some(t0 + secs(60)));
        assert_eq!(ping(&mut hb, t0 + secs(62)), token + 1);
        assert_eq!(hb.poll_timeout(), Some(t0 + secs(62 + 35)));
    }

    #[test]
    fn on_ping_sent_restamps_the_outstanding_ping() {
        let (mut hb, t0) = started();
        let token = ping(&mut hb, t0 + secs(30));
        let written = t0 + secs(32);
        hb.on_ping_sent(written);
        // An earlier stamp cannot be right and is ignored.
        hb.on_ping_sent(t0 + secs(31));
        assert_eq!(hb.poll_timeout(), Some(written + secs(35)));
        hb.on_pong(written + ms(50), token);
        assert_eq!(hb.latency().map(|l| l.last), Some(ms(50)));
        assert_eq!(hb.poll_timeout(), Some(written + secs(30)));
        // With nothing outstanding there is nothing to re-stamp.
        hb.on_ping_sent(written + secs(1));
        assert_eq!(hb.poll_timeout(), Some(written + secs(30)));
    }

    #[test]
    fn latency_is_smoothed_like_tcp_srtt() {
        let (mut hb, t0) = started();
        let mut sent = t0 + secs(30);
        // Each row: the sample in ms, then smoothed = 7/8 old + 1/8 sample,
        // in ns. These values divide exactly, so no rounding hides an error.
        for (sample, smoothed) in [(100, 100_000_000), (200, 112_500_000), (100, 110_937_500)] {
            let token = ping(&mut hb, sent);
            hb.on_pong(sent + ms(sample), token);
            let latency = hb.latency().expect("the pong answered the ping");
            assert_eq!(latency.last, ms(sample));
            assert_eq!(latency.smoothed, Duration::from_nanos(smoothed));
            sent += secs(30);
        }
    }

    #[test]
    fn tokens_are_big_endian_and_exactly_eight_bytes() {
        let payload = encode_token(0x0102_0304_0506_0708);
        assert_eq!(payload, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(decode_token(&payload), Some(0x0102_0304_0506_0708));
        assert_eq!(decode_token(&payload[..7]), None);
        assert_eq!(decode_token(&[0; 9]), None);
        assert_eq!(decode_token(&[]), None);
    }

    #[test]
    fn durations_too_large_for_an_instant_mean_never() {
        let t0 = Instant::now();
        let config = HeartbeatConfig { interval: Duration::MAX, timeout: Duration::MAX };
        let mut hb = Heartbeat::new(config, t0);
        assert_eq!(hb.poll_timeout(), None);
        assert_eq!(hb.poll_action(t0 + secs(1_000_000)), None);
        assert!(!hb.is_dead());
    }
}
