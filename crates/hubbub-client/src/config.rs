//! How a client connects, reconnects and queues: every limit and interval,
//! with its default.

use std::time::Duration;

use hubbub_heartbeat::HeartbeatConfig;
use hubbub_protocol::Limits;

/// Everything a [`Client`](crate::Client) can be configured with.
///
/// Start from [`ClientConfig::default`] and change what you need:
///
/// ```
/// use std::time::Duration;
/// use hubbub_client::{ClientConfig, ReconnectPolicy};
///
/// let config = ClientConfig {
///     reconnect: ReconnectPolicy { max_attempts: None, ..ReconnectPolicy::default() },
///     queue_capacity: 100,
///     ..ClientConfig::default()
/// };
/// assert!(config.validate().is_ok());
/// assert_eq!(config.reconnect.initial_delay, Duration::from_secs(1));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ClientConfig {
    /// When and how often to reconnect after the link is lost.
    pub reconnect: ReconnectPolicy,
    /// The application-level heartbeat (`ping`/`pong`) that finds a dead
    /// link; `None` turns it off. Default
    /// [`HeartbeatConfig::client_default`]: a ping every 25 s, dead after
    /// 35 s without its pong.
    pub heartbeat: Option<HeartbeatConfig>,
    /// Most commands and chat messages the client holds on to: commands
    /// waiting for the connection (the offline queue) plus messages sent but
    /// not yet acknowledged. Past it, commands fail with
    /// [`ClientError::QueueFull`](crate::ClientError::QueueFull). Default 1,024.
    pub queue_capacity: usize,
    /// Most file uploads waiting, the active one included. Default 16.
    pub upload_queue: usize,
    /// How many ids of received messages are remembered, so a message that
    /// arrives twice is shown once. Default 4,096.
    pub seen_message_ids: usize,
    /// Events buffered for the application. When the application falls this
    /// far behind, the client stops reading from the server until it catches
    /// up (commands are still accepted). Default 256.
    pub event_buffer: usize,
    /// Longest time for the TCP connection and WebSocket handshake, with
    /// each server tried. Default 10 s.
    pub connect_timeout: Duration,
    /// After connecting, how long the server has to greet the client and to
    /// confirm the restored username and room before the link is given up
    /// (and retried). Default 10 s.
    pub restore_timeout: Duration,
    /// How long [`Client::disconnect`](crate::Client::disconnect) waits for
    /// the server's reply to the close frame. Default 2 s.
    pub close_timeout: Duration,
    /// A PEM file of extra certificate authorities to trust for `wss://`,
    /// besides the public ones (for self-signed deployments and tests).
    /// Default: none.
    pub extra_ca_file: Option<std::path::PathBuf>,
    /// The chunk size asked for in `fileStart`; the server may choose
    /// another. Default 65,536 (the protocol's maximum with the default
    /// frame limit).
    pub chunk_size: u32,
    /// How fast chat messages (room and lobby) are written; `None` writes
    /// them as fast as they come. Servers drop messages over their rate
    /// limit, so the client paces itself below the server's default (30 per
    /// second, bursts of 60); messages over the pace wait in the queue, in
    /// order. Default 20 per second, bursts of 40.
    pub send_rate: Option<SendRate>,
    /// Limits that names and texts are checked against before they are
    /// sent, so a mistake is an error at the call, not a late `error` event.
    /// Default: the protocol's default limits, which is what a server with
    /// the default configuration enforces.
    pub limits: Limits,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            reconnect: ReconnectPolicy::default(),
            heartbeat: Some(HeartbeatConfig::client_default()),
            queue_capacity: 1024,
            upload_queue: 16,
            seen_message_ids: 4096,
            event_buffer: 256,
            connect_timeout: Duration::from_secs(10),
            restore_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
            extra_ca_file: None,
            chunk_size: 64 * 1024,
            send_rate: Some(SendRate { per_second: 20.0, burst: 40 }),
            limits: Limits::default(),
        }
    }
}

/// A token bucket: `burst` messages at once, then `per_second`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SendRate {
    /// Sustained messages per second; greater than zero.
    pub per_second: f64,
    /// Messages that may go at once; at least 1.
    pub burst: u32,
}

/// Reconnection with exponential backoff and jitter.
///
/// An attempt is one connect to each server URL in turn (one connect, with
/// one URL); the delay comes before each attempt, so a server that is down
/// costs a failed connect, not a delay, when another one is up. The delay
/// before attempt `n` (counting from 1) is
/// `initial_delay × multiplier^(n−1)`, capped at `max_delay`, then moved by a
/// random amount of up to ± `jitter` of itself (and capped again), so that
/// clients dropped together do not come back together. The defaults are the
/// classic chat tutorial's: 1 s, doubling, 5 attempts (1, 2, 4, 8, 16 s).
///
/// ```
/// use std::time::Duration;
/// use hubbub_client::ReconnectPolicy;
///
/// let policy = ReconnectPolicy { jitter: 0.0, max_delay: Duration::from_secs(5), ..ReconnectPolicy::default() };
/// let delays: Vec<u64> = (1..=5).map(|n| policy.delay(n, 0.5).as_secs()).collect();
/// assert_eq!(delays, [1, 2, 4, 5, 5]);
/// assert!(policy.allows(5) && !policy.allows(6));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ReconnectPolicy {
    /// Delay before the first attempt. Default 1 s.
    pub initial_delay: Duration,
    /// Factor between one delay and the next; at least 1. Default 2.
    pub multiplier: f64,
    /// Longest delay. Default 30 s.
    pub max_delay: Duration,
    /// Attempts after a link is lost before the client gives up; `None`
    /// retries forever, `Some(0)` never reconnects. With several server URLs
    /// ([`Client::connect_any`](crate::Client::connect_any)) an attempt tries
    /// each of them once. The count starts again once a reconnection
    /// succeeds. Default `Some(5)`.
    pub max_attempts: Option<u32>,
    /// Random spread of each delay, as a fraction of it, from 0 (none) to 1.
    /// Default 0.2 (± 20 %).
    pub jitter: f64,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(30),
            max_attempts: Some(5),
            jitter: 0.2,
        }
    }
}

impl ReconnectPolicy {
    /// A policy that never reconnects.
    pub fn never() -> Self {
        Self { max_attempts: Some(0), ..Self::default() }
    }

    /// Whether attempt `attempt` (counting from 1) may be made.
    pub fn allows(&self, attempt: u32) -> bool {
        self.max_attempts.is_none_or(|max| attempt <= max)
    }

    /// The delay before attempt `attempt` (counting from 1), with `random`
    /// a number in `[0, 1)` that picks the jitter: 0.5 means none.
    pub fn delay(&self, attempt: u32, random: f64) -> Duration {
        let max = self.max_delay.as_secs_f64();
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let nominal = (self.initial_delay.as_secs_f64() * self.multiplier.powi(exponent)).min(max);
        let spread = self.jitter.clamp(0.0, 1.0) * (2.0 * random.clamp(0.0, 1.0) - 1.0);
        let jittered = (nominal * (1.0 + spread)).clamp(0.0, max);
        // Only a NaN from a nonsense multiplier can fail here; `validate`
        // refuses those, and the cap is the safe answer anyway.
        Duration::try_from_secs_f64(jittered).unwrap_or(self.max_delay)
    }
}

/// A configuration that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A size or duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// A value outside its allowed range.
    #[error("{0}")]
    OutOfRange(&'static str),
}

impl ClientConfig {
    /// Checks that the configuration can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("queue_capacity", self.queue_capacity),
            ("upload_queue", self.upload_queue),
            ("seen_message_ids", self.seen_message_ids),
            ("event_buffer", self.event_buffer),
            ("chunk_size", self.chunk_size as usize),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        let durations = [
            ("connect_timeout", self.connect_timeout),
            ("restore_timeout", self.restore_timeout),
            ("close_timeout", self.close_timeout),
        ];
        for (name, value) in durations {
            if value.is_zero() {
                return Err(ConfigError::Zero(name));
            }
        }
        if let Some(heartbeat) = &self.heartbeat
            && heartbeat.validate().is_err()
        {
            return Err(ConfigError::Zero("heartbeat interval and timeout"));
        }
        if let Some(rate) = &self.send_rate
            && !(rate.per_second > 0.0 && rate.per_second.is_finite() && rate.burst > 0)
        {
            return Err(ConfigError::OutOfRange(
                "send_rate needs a positive finite rate and a burst of at least 1",
            ));
        }
        let reconnect = &self.reconnect;
        if !(reconnect.multiplier >= 1.0 && reconnect.multiplier.is_finite()) {
            return Err(ConfigError::OutOfRange(
                "reconnect.multiplier must be a finite number of at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&reconnect.jitter) {
            return Err(ConfigError::OutOfRange("reconnect.jitter must be between 0 and 1"));
        }
        if reconnect.max_delay < reconnect.initial_delay {
            return Err(ConfigError::OutOfRange(
                "reconnect.max_delay must be at least reconnect.initial_delay",
            ));
        }
        Ok(())
    }
}

/// A random number in `[0, 1)` for the jitter. A v4 UUID is 122 random bits
/// from the OS generator, which saves a dependency for one number per
/// reconnect attempt.
pub(crate) fn jitter_sample() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u128() >> 75; // 53 bits: an f64's mantissa
    bits as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: f64) -> Duration {
        Duration::from_secs_f64(n)
    }

    #[test]
    fn defaults_follow_the_classic_tutorial() {
        let policy = ReconnectPolicy::default();
        let delays: Vec<Duration> = (1..=5).map(|n| policy.delay(n, 0.5)).collect();
        assert_eq!(delays, [secs(1.0), secs(2.0), secs(4.0), secs(8.0), secs(16.0)]);
        assert!(policy.allows(5));
        assert!(!policy.allows(6));
        assert!(ClientConfig::default().validate().is_ok());
    }

    #[test]
    fn jitter_spreads_within_bounds_and_respects_the_cap() {
        let policy = ReconnectPolicy { jitter: 0.5, ..ReconnectPolicy::default() };
        assert_eq!(policy.delay(2, 0.0), secs(1.0));
        assert_eq!(policy.delay(2, 0.5), secs(2.0));
        assert!(policy.delay(2, 0.999_999) <= secs(3.0));
        // At the cap, jitter can only shorten the delay.
        assert_eq!(policy.delay(30, 0.999), Duration::from_secs(30));
        assert_eq!(policy.delay(30, 0.0), secs(15.0));
        for _ in 0..100 {
            let r = jitter_sample();
            assert!((0.0..1.0).contains(&r), "{r}");
        }
    }

    #[test]
    fn unlimited_and_never() {
        let forever = ReconnectPolicy { max_attempts: None, ..ReconnectPolicy::default() };
        assert!(forever.allows(u32::MAX));
        assert_eq!(forever.delay(u32::MAX, 0.5), Duration::from_secs(30));
        assert!(!ReconnectPolicy::never().allows(1));
    }

    #[test]
    fn nonsense_is_refused() {
        let bad = |reconnect| ClientConfig { reconnect, ..ClientConfig::default() }.validate();
        let base = ReconnectPolicy::default();
        assert!(bad(ReconnectPolicy { multiplier: 0.5, ..base.clone() }).is_err());
        assert!(bad(ReconnectPolicy { multiplier: f64::NAN, ..base.clone() }).is_err());
        assert!(bad(ReconnectPolicy { jitter: 1.5, ..base.clone() }).is_err());
        assert!(bad(ReconnectPolicy { max_delay: Duration::from_millis(1), ..base }).is_err());
        let zero = ClientConfig { queue_capacity: 0, ..ClientConfig::default() };
        assert_eq!(zero.validate().unwrap_err().to_string(), "queue_capacity must be greater than zero");
    }
}
