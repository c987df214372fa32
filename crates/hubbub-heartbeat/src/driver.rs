//! A thin tokio driver for [`Heartbeat`]: one timer per connection, reset to
//! the machine's next deadline, so the heartbeat costs O(1) per connection per
//! interval and nothing while the timer sleeps.

use tokio::time::{Instant, Sleep, sleep_until};

use crate::{Action, Heartbeat, HeartbeatConfig, Latency};

/// Drives a [`Heartbeat`] with tokio's clock (paused time in tests included).
///
/// Use [`Monitor::next_action`] as one branch of the connection's
/// `tokio::select!`, and report pongs with [`Monitor::on_pong`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// use std::time::Duration;
/// use hubbub_heartbeat::{Action, HeartbeatConfig, Monitor};
///
/// let config = HeartbeatConfig { interval: Duration::from_secs(25), timeout: Duration::from_secs(35) };
/// let mut monitor = Monitor::new(config);
/// let Action::SendPing(token) = monitor.next_action().await else { panic!() };
/// // ... send an app-level `ping {timestamp: token}`; its `pong` arrives:
/// monitor.on_pong(token);
/// assert!(monitor.latency().is_some());
/// // With no further pongs, the link is declared dead.
/// assert_eq!(monitor.next_action().await, Action::SendPing(token + 1));
/// assert_eq!(monitor.next_action().await, Action::PeerDead);
/// # }
/// ```
#[derive(Debug)]
pub struct Monitor {
    /// The state machine.
    heartbeat: Heartbeat,
    /// Sleeps until the machine's next deadline. Boxed so the monitor can
    /// move freely; allocated once per connection.
    timer: std::pin::Pin<Box<Sleep>>,
}

impl Monitor {
    /// A monitor whose first ping is due `config.interval` from now.
    pub fn new(config: HeartbeatConfig) -> Self {
        let now = Instant::now();
        let heartbeat = Heartbeat::new(config, now.into_std());
        let timer = Box::pin(sleep_until(deadline(&heartbeat, now)));
        Self { heartbeat, timer }
    }

    /// Waits until the machine has something to do and returns it. Cancel
    /// safe: dropping the future loses nothing. Once the peer is dead it
    /// returns [`Action::PeerDead`] at once, every time.
    pub async fn next_action(&mut self) -> Action {
        loop {
            if self.heartbeat.is_dead() {
                return Action::PeerDead;
            }
            self.timer.as_mut().await;
            let now = Instant::now();
            let action = self.heartbeat.poll_action(now.into_std());
            let next = deadline(&self.heartbeat, now);
            self.timer.as_mut().reset(next);
            if let Some(action) = action {
                return action;
            }
        }
    }

    /// A pong carrying `token` arrived.
    pub fn on_pong(&mut self, token: u64) {
        self.heartbeat.on_pong(Instant::now().into_std(), token);
        self.rearm();
    }

    /// Some other frame arrived (recorded as activity only).
    pub fn on_frame_received(&mut self) {
        self.heartbeat.on_frame_received(Instant::now().into_std());
    }

    /// The round-trip time, once a pong has been measured.
    pub fn latency(&self) -> Option<Latency> {
        self.heartbeat.latency()
    }

    /// The state machine, for inspection.
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heartbeat
    }

    /// A pong may move the next deadline (to the next ping), so re-arm.
    fn rearm(&mut self) {
        let next = deadline(&self.heartbeat, Instant::now());
        if next != self.timer.deadline() {
            self.timer.as_mut().reset(next);
        }
    }
}

/// The machine's next deadline as a tokio instant; far in the future when it
/// has none (dead, or a deadline beyond what `Instant` can hold).
fn deadline(heartbeat: &Heartbeat, now: Instant) -> Instant {
    match heartbeat.poll_timeout() {
        // `at` came from tokio's clock (see `Monitor::new`), so this is exact.
        Some(at) => Instant::from_std(at),
        None => now + FAR_FUTURE,
    }
}

/// "Never", for a timer that must exist: about 30 years.
const FAR_FUTURE: std::time::Duration = std::time::Duration::from_secs(86_400 * 365 * 30);

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn config() -> HeartbeatConfig {
        HeartbeatConfig { interval: Duration::from_secs(30), timeout: Duration::from_secs(35) }
    }

    #[tokio::test(start_paused = true)]
    async fn pings_on_schedule_and_declares_a_silent_peer_dead() {
        let start = Instant::now();
        let mut monitor = Monitor::new(config());
        assert_eq!(monitor.next_action().await, Action::SendPing(1));
        assert_eq!(Instant::now() - start, Duration::from_secs(30));
        tokio::time::advance(Duration::from_millis(20)).await;
        monitor.on_pong(1);
        assert_eq!(monitor.latency().unwrap().last, Duration::from_millis(20));
        assert_eq!(monitor.next_action().await, Action::SendPing(2));
        assert_eq!(Instant::now() - start, Duration::from_secs(60));
        assert_eq!(monitor.next_action().await, Action::PeerDead);
        assert_eq!(Instant::now() - start, Duration::from_secs(95));
        assert_eq!(monitor.next_action().await, Action::PeerDead);
    }

    #[tokio::test(start_paused = true)]
    async fn next_action_is_cancel_safe() {
        let mut monitor = Monitor::new(config());
        let early = tokio::time::timeout(Duration::from_secs(10), monitor.next_action()).await;
        assert!(early.is_err(), "nothing is due after 10 s");
        assert_eq!(monitor.next_action().await, Action::SendPing(1));
    }
}
