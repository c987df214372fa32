//! Rate limits: per connection, token buckets for chat messages, typing
//! notices, room changes and control messages, and a strike bucket that
//! closes a connection that keeps flooding after it was told to slow down;
//! shared by every connection of one address (or one authenticated user),
//! buckets for new connections, chat and lobby messages, so that opening
//! more connections or reconnecting in a loop buys no more; and one
//! server-wide budget of lobby bytes, so that the lobby's readers, who
//! receive every lobby message, are never sent more than they can read.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hubbub_protocol::ServerMessage;

use crate::config::RateLimitSettings;
use crate::link::{CloseReason, Peer};
use crate::metrics::Stats;
use crate::sync::lock;

/// A token bucket's rate: `per_sec` tokens per second, at most `burst`
/// saved up. It comes from the settings at each check, so a connection
/// stores only its buckets' levels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rate {
    per_sec: f64,
    burst: f64,
}

impl Rate {
    fn new(per_sec: f64, burst: u32) -> Self {
        Self { per_sec, burst: f64::from(burst) }
    }
}

/// A token bucket's level: 8 bytes per bucket and connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bucket {
    tokens: f32,
    /// When it was last filled, in milliseconds since its limiter's epoch.
    last_ms: u32,
}

impl Bucket {
    /// A full bucket at the epoch.
    pub(crate) fn full(rate: Rate) -> Self {
        Self { tokens: rate.burst as f32, last_ms: 0 }
    }

    /// Takes one token at `now_ms`, or says how long until one is there.
    pub(crate) fn take(&mut self, rate: Rate, now_ms: u32) -> Result<(), Duration> {
        let elapsed = f64::from(now_ms.saturating_sub(self.last_ms)) / 1000.0;
        self.last_ms = now_ms;
        let (tokens, verdict) = refill_and_take(f64::from(self.tokens), elapsed, rate, 1.0);
        self.tokens = tokens as f32;
        verdict
    }
}

/// The token bucket's arithmetic, shared by every bucket: refills `tokens`
/// for `elapsed_secs` at `rate`, then takes `cost` if there is as much.
/// Returns the new level and, when refused, how long until `cost` is there
/// (a cost above the burst waits for a full bucket).
fn refill_and_take(tokens: f64, elapsed_secs: f64, rate: Rate, cost: f64) -> (f64, Result<(), Duration>) {
    let tokens = (tokens + elapsed_secs * rate.per_sec).min(rate.burst);
    let cost = cost.min(rate.burst);
    if tokens >= cost {
        return (tokens - cost, Ok(()));
    }
    let wait = if rate.per_sec > 0.0 {
        Duration::try_from_secs_f64((cost - tokens) / rate.per_sec).unwrap_or(Duration::MAX)
    } else {
        Duration::MAX
    };
    (tokens, Err(wait))
}

/// What kind of message a limit applies to.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    /// `chatMessage` and the lobby `chat`.
    Chat,
    /// `typing`.
    Typing,
    /// `joinRoom`, `leaveRoom`, `setUsername`.
    Room,
    /// Everything else a client sends that the server answers: `ping`,
    /// `auth`, the file messages, and frames that do not decode.
    Control,
}

/// A connection's limits: 56 bytes, rates read from the settings.
#[derive(Debug)]
pub(crate) struct Limiter {
    /// What the buckets' times count from; moved forward now and then so
    /// they fit 32 bits however long the connection lives.
    epoch: Instant,
    chat: Bucket,
    typing: Bucket,
    room: Bucket,
    control: Bucket,
    /// Refused messages allowed before the connection is closed.
    strikes: Bucket,
}

/// The verdict on one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Go ahead.
    Allow,
    /// Drop it; the client may retry after this long.
    Refuse(Duration),
    /// Drop it and close the connection (1008): it keeps flooding.
    Close,
}

/// Bucket times past this many milliseconds (about 24 days) move the epoch.
const REBASE_MS: u128 = 1 << 31;

impl Limiter {
    /// Limits per the configuration, all buckets full.
    pub(crate) fn new(settings: &RateLimitSettings, now: Instant) -> Self {
        let full = |kind| Bucket::full(rate(settings, kind));
        Self {
            epoch: now,
            chat: full(Some(Kind::Chat)),
            typing: full(Some(Kind::Typing)),
            room: full(Some(Kind::Room)),
            control: full(Some(Kind::Control)),
            strikes: full(None),
        }
    }

    /// Checks one message of `kind` against `settings` (the same settings
    /// the limiter was made with).
    pub(crate) fn check(&mut self, settings: &RateLimitSettings, kind: Kind, now: Instant) -> Verdict {
        let mut since = now.saturating_duration_since(self.epoch).as_millis();
        if since >= REBASE_MS {
            let shift = REBASE_MS as u32 / 2;
            self.epoch += Duration::from_millis(u64::from(shift));
            for bucket in
                [&mut self.chat, &mut self.typing, &mut self.room, &mut self.control, &mut self.strikes]
            {
                bucket.last_ms = bucket.last_ms.saturating_sub(shift);
            }
            since -= u128::from(shift);
        }
        let now_ms = u32::try_from(since).unwrap_or(u32::MAX);
        let bucket = match kind {
            Kind::Chat => &mut self.chat,
            Kind::Typing => &mut self.typing,
            Kind::Room => &mut self.room,
            Kind::Control => &mut self.control,
        };
        match bucket.take(rate(settings, Some(kind)), now_ms) {
            Ok(()) => Verdict::Allow,
            Err(wait) => match self.strikes.take(rate(settings, None), now_ms) {
                Ok(()) => Verdict::Refuse(wait),
                Err(_) => Verdict::Close,
            },
        }
    }
}

impl Limiter {
    /// Counts a message refused by a limit other than this connection's
    /// own (its address's, or the server's) as a strike: the verdict is to
    /// refuse it, or to close a connection refused too often.
    pub(crate) fn refused_elsewhere(
        &mut self,
        settings: &RateLimitSettings,
        wait: Duration,
        now: Instant,
    ) -> Verdict {
        let now_ms = u32::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u32::MAX);
        match self.strikes.take(rate(settings, None), now_ms) {
            Ok(()) => Verdict::Refuse(wait),
            Err(_) => Verdict::Close,
        }
    }
}

/// What a shared limit applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AddressLimit {
    /// New WebSocket connections from one address.
    Connections,
    /// `chatMessage`, lobby `chat` and echoed frames from one address (or
    /// one authenticated user).
    Chat,
    /// Lobby `chat` from one address (or one authenticated user).
    Lobby,
}

/// Who a shared limit counts: a client address (IPv6 addresses by their
/// /64, which one host usually holds whole), or an authenticated user.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// A client address.
    Address(IpAddr),
    /// An authenticated user's name.
    User(Box<str>),
}

impl Key {
    /// The key for a client address.
    pub(crate) fn address(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::Address(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::Address(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self::Address(IpAddr::V6(prefix.into()))
                }
            },
        }
    }
}

/// A bucket of a shared limit: its level and when it was last filled, in
/// milliseconds since the limiter's start.
#[derive(Clone, Copy, Debug)]
struct SharedBucket {
    tokens: f64,
    last_ms: u64,
}

impl SharedBucket {
    fn full(rate: Rate) -> Self {
        Self { tokens: rate.burst, last_ms: 0 }
    }

    fn take(&mut self, rate: Rate, now_ms: u64, cost: f64) -> Result<(), Duration> {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.last_ms = self.last_ms.max(now_ms);
        let (tokens, verdict) = refill_and_take(self.tokens, elapsed, rate, cost);
        self.tokens = tokens;
        verdict
    }
}

/// One address's (or user's) buckets.
#[derive(Debug)]
struct Entry {
    connections: SharedBucket,
    chat: SharedBucket,
    lobby: SharedBucket,
    /// When any bucket was last used, to forget idle entries.
    last_ms: u64,
}

/// Limits shared by every connection of one address or one user, and the
/// server-wide lobby budget. Entries are forgotten once idle long enough
/// that their buckets would be full again ([`AddressLimits::forget_idle`]).
#[derive(Debug)]
pub(crate) struct AddressLimits {
    /// What the millisecond times count from.
    epoch: Instant,
    /// Entries by key, in shards so that connections rarely contend.
    shards: Box<[Mutex<HashMap<Key, Entry>>]>,
    /// Lobby bytes the whole server may still broadcast.
    lobby_bytes: Mutex<SharedBucket>,
}

/// Shards of [`AddressLimits`].
const SHARDS: usize = 16;

impl AddressLimits {
    /// Empty limits, every bucket full.
    pub(crate) fn new(settings: &RateLimitSettings, now: Instant) -> Self {
        Self {
            epoch: now,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            lobby_bytes: Mutex::new(SharedBucket::full(lobby_bytes_rate(settings))),
        }
    }

    fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn shard(&self, key: &Key) -> &Mutex<HashMap<Key, Entry>> {
        let mut hasher = std::hash::DefaultHasher::new();
        key.hash(&mut hasher);
        &self.shards[(hasher.finish() as usize) % self.shards.len()]
    }

    /// Takes one token from `key`'s bucket of `what`, or says how long to
    /// wait. Always allows when the limits are off.
    pub(crate) fn check(
        &self,
        settings: &RateLimitSettings,
        key: &Key,
        what: AddressLimit,
        now: Instant,
    ) -> Result<(), Duration> {
        if !settings.enabled {
            return Ok(());
        }
        let now_ms = self.millis(now);
        let mut shard = lock(self.shard(key));
        let entry = shard.entry(key.clone()).or_insert_with(|| Entry {
            connections: SharedBucket::full(shared_rate(settings, AddressLimit::Connections)),
            chat: SharedBucket::full(shared_rate(settings, AddressLimit::Chat)),
            lobby: SharedBucket::full(shared_rate(settings, AddressLimit::Lobby)),
            last_ms: now_ms,
        });
        entry.last_ms = now_ms;
        let bucket = match what {
            AddressLimit::Connections => &mut entry.connections,
            AddressLimit::Chat => &mut entry.chat,
            AddressLimit::Lobby => &mut entry.lobby,
        };
        bucket.take(shared_rate(settings, what), now_ms, 1.0)
    }

    /// Takes `bytes` from the server-wide lobby budget, or says how long to
    /// wait. Always allows when the limits are off.
    pub(crate) fn lobby_bytes(
        &self,
        settings: &RateLimitSettings,
        bytes: usize,
        now: Instant,
    ) -> Result<(), Duration> {
        if !settings.enabled {
            return Ok(());
        }
        let now_ms = self.millis(now);
        lock(&self.lobby_bytes).take(lobby_bytes_rate(settings), now_ms, bytes as f64)
    }

    /// Forgets entries that have been idle long enough for every bucket to
    /// be full again: they would allow exactly what a fresh entry allows.
    /// Returns how many remain.
    pub(crate) fn forget_idle(&self, settings: &RateLimitSettings, now: Instant) -> usize {
        let refill_secs = [AddressLimit::Connections, AddressLimit::Chat, AddressLimit::Lobby]
            .into_iter()
            .map(|what| {
                let rate = shared_rate(settings, what);
                rate.burst / rate.per_sec.max(f64::MIN_POSITIVE)
            })
            .fold(0.0_f64, f64::max);
        let idle_ms = (refill_secs * 1000.0).ceil().min(u64::MAX as f64) as u64;
        let now_ms = self.millis(now);
        let mut remaining = 0;
        for shard in &self.shards {
            let mut shard = lock(shard);
            shard.retain(|_, entry| now_ms.saturating_sub(entry.last_ms) < idle_ms);
            remaining += shard.len();
        }
        remaining
    }
}

fn shared_rate(settings: &RateLimitSettings, what: AddressLimit) -> Rate {
    match what {
        AddressLimit::Connections => {
            Rate::new(settings.address_connections_per_sec, settings.address_connections_burst)
        }
        AddressLimit::Chat => Rate::new(settings.address_chat_per_sec, settings.address_chat_burst),
        AddressLimit::Lobby => Rate::new(settings.address_lobby_per_sec, settings.address_lobby_burst),
    }
}

fn lobby_bytes_rate(settings: &RateLimitSettings) -> Rate {
    Rate { per_sec: settings.lobby_bytes_per_sec as f64, burst: settings.lobby_burst_bytes as f64 }
}

/// Carries out a rate limit's verdict on a message: `rateLimited` with
/// `retryAfterMs` for a refusal, close 1008 for a connection that keeps
/// flooding. True if the message may go ahead.
pub(crate) fn enforce(verdict: Verdict, peer: &Peer, stats: &Stats, what: &str) -> bool {
    match verdict {
        Verdict::Allow => true,
        Verdict::Refuse(wait) => {
            stats.rate_limited.inc();
            let retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
            peer.reply(
                &ServerMessage::Error {
                    message: format!("Too many {what} messages; slow down"),
                    code: Some("rateLimited".to_owned()),
                    retry_after_ms: Some(retry_after_ms),
                },
                stats,
            );
            false
        }
        Verdict::Close => {
            stats.rate_limited.inc();
            tracing::warn!("closing a connection that keeps flooding");
            peer.close(CloseReason::FLOODING);
            false
        }
    }
}

/// The configured rate of a kind's bucket, or of the strikes (`None`).
fn rate(settings: &RateLimitSettings, kind: Option<Kind>) -> Rate {
    match kind {
        Some(Kind::Chat) => Rate::new(settings.chat_per_sec, settings.chat_burst),
        Some(Kind::Typing) => Rate::new(settings.typing_per_sec, settings.typing_burst),
        Some(Kind::Room) => Rate::new(settings.room_per_sec, settings.room_burst),
        Some(Kind::Control) => Rate::new(settings.control_per_sec, settings.control_burst),
        None => {
            let window = settings.flood_window.as_secs_f64().max(0.001);
            Rate::new(f64::from(settings.flood_strikes) / window, settings.flood_strikes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_allow_the_burst_then_the_rate() {
        let rate = Rate::new(2.0, 3);
        let mut bucket = Bucket::full(rate);
        for _ in 0..3 {
            assert!(bucket.take(rate, 0).is_ok());
        }
        assert_eq!(bucket.take(rate, 0), Err(Duration::from_millis(500)));
        assert!(bucket.take(rate, 500).is_ok());
        assert!(bucket.take(rate, 500).is_err());
    }

    #[test]
    fn limits_keep_working_on_a_connection_older_than_32_bits_of_milliseconds() {
        let t0 = Instant::now();
        let settings = RateLimitSettings { chat_burst: 1, chat_per_sec: 1.0, ..RateLimitSettings::default() };
        let mut limiter = Limiter::new(&settings, t0);
        for days in [0, 30, 60, 90] {
            let at = t0 + Duration::from_secs(days * 86_400);
            assert_eq!(limiter.check(&settings, Kind::Chat, at), Verdict::Allow, "day {days}");
            assert!(matches!(limiter.check(&settings, Kind::Chat, at), Verdict::Refuse(_)), "day {days}");
            let refilled = at + Duration::from_secs(1);
            assert_eq!(limiter.check(&settings, Kind::Chat, refilled), Verdict::Allow, "day {days}");
        }
    }

    #[test]
    fn a_flood_is_refused_then_closed() {
        let t0 = Instant::now();
        let settings = RateLimitSettings { chat_burst: 2, flood_strikes: 3, ..RateLimitSettings::default() };
        let mut limiter = Limiter::new(&settings, t0);
        assert_eq!(limiter.check(&settings, Kind::Chat, t0), Verdict::Allow);
        assert_eq!(limiter.check(&settings, Kind::Chat, t0), Verdict::Allow);
        for _ in 0..3 {
            assert!(matches!(limiter.check(&settings, Kind::Chat, t0), Verdict::Refuse(_)));
        }
        assert_eq!(limiter.check(&settings, Kind::Chat, t0), Verdict::Close);
        // Other kinds have their own budget.
        let mut limiter = Limiter::new(&settings, t0);
        limiter.check(&settings, Kind::Chat, t0);
        limiter.check(&settings, Kind::Chat, t0);
        assert_eq!(limiter.check(&settings, Kind::Typing, t0), Verdict::Allow);
    }
}
