//! Per-connection rate limits: token buckets for chat messages, typing
//! notices and room changes, and a strike bucket that closes a connection
//! that keeps flooding after it was told to slow down.

use std::time::{Duration, Instant};

use crate::config::RateLimitSettings;

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub(crate) fn new(rate: f64, burst: u32, now: Instant) -> Self {
        Self { tokens: f64::from(burst), rate, burst: f64::from(burst), last: now }
    }

    /// Takes one token, or says how long until one is there.
    pub(crate) fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if self.rate > 0.0 {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
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

/// A connection's limits.
#[derive(Debug)]
pub(crate) struct Limiter {
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

impl Limiter {
    /// Limits per the configuration, all buckets full.
    pub(crate) fn new(settings: &RateLimitSettings, now: Instant) -> Self {
        let window = settings.flood_window.as_secs_f64().max(0.001);
        Self {
            chat: Bucket::new(settings.chat_per_sec, settings.chat_burst, now),
            typing: Bucket::new(settings.typing_per_sec, settings.typing_burst, now),
            room: Bucket::new(settings.room_per_sec, settings.room_burst, now),
            control: Bucket::new(settings.control_per_sec, settings.control_burst, now),
            strikes: Bucket::new(f64::from(settings.flood_strikes) / window, settings.flood_strikes, now),
        }
    }

    /// Checks one message of `kind`.
    pub(crate) fn check(&mut self, kind: Kind, now: Instant) -> Verdict {
        let bucket = match kind {
            Kind::Chat => &mut self.chat,
            Kind::Typing => &mut self.typing,
            Kind::Room => &mut self.room,
            Kind::Control => &mut self.control,
        };
        match bucket.take(now) {
            Ok(()) => Verdict::Allow,
            Err(wait) => match self.strikes.take(now) {
                Ok(()) => Verdict::Refuse(wait),
                Err(_) => Verdict::Close,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_allow_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut bucket = Bucket::new(2.0, 3, t0);
        for _ in 0..3 {
            assert!(bucket.take(t0).is_ok());
        }
        assert_eq!(bucket.take(t0), Err(Duration::from_millis(500)));
        assert!(bucket.take(t0 + Duration::from_millis(500)).is_ok());
        assert!(bucket.take(t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn a_flood_is_refused_then_closed() {
        let t0 = Instant::now();
        let settings = RateLimitSettings { chat_burst: 2, flood_strikes: 3, ..RateLimitSettings::default() };
        let mut limiter = Limiter::new(&settings, t0);
        assert_eq!(limiter.check(Kind::Chat, t0), Verdict::Allow);
        assert_eq!(limiter.check(Kind::Chat, t0), Verdict::Allow);
        for _ in 0..3 {
            assert!(matches!(limiter.check(Kind::Chat, t0), Verdict::Refuse(_)));
        }
        assert_eq!(limiter.check(Kind::Chat, t0), Verdict::Close);
        // Other kinds have their own budget.
        let mut limiter = Limiter::new(&settings, t0);
        limiter.check(Kind::Chat, t0);
        limiter.check(Kind::Chat, t0);
        assert_eq!(limiter.check(Kind::Typing, t0), Verdict::Allow);
    }
}
