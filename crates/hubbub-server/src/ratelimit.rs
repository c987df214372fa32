//! Per-connection rate limits: token buckets for chat messages, typing
//! notices and room changes, and a strike bucket that closes a connection
//! that keeps flooding after it was told to slow down.

use std::time::{Duration, Instant};

use crate::config::RateLimitSettings;

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
        let tokens = (f64::from(self.tokens) + elapsed * rate.per_sec).min(rate.burst);
        if tokens >= 1.0 {
            self.tokens = (tokens - 1.0) as f32;
            return Ok(());
        }
        self.tokens = tokens as f32;
        if rate.per_sec > 0.0 {
            Err(Duration::from_secs_f64((1.0 - tokens) / rate.per_sec))
        } else {
            Err(Duration::MAX)
        }
    }
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
#[derive(Debug, PartialEq, Eq)]
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
