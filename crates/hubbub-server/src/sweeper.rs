//! Heartbeats for every connection, from one task.
//!
//! The rules are `hubbub_heartbeat`'s (stated for clients in
//! `docs/PROTOCOL.md#heartbeat`), run by its `HeartbeatTable`: this module
//! is only the driver. Every WebSocket connection is registered here for its
//! life, in one of 16 tables. A sweeper task wakes on ticks of an eighth of
//! the heartbeat interval (at most a second) and sweeps every table: a
//! connection whose ping is due gets one (a WebSocket ping carrying the
//! token, queued like any other frame); a connection whose ping went
//! unanswered until its deadline is closed without a handshake (1006) and
//! counted as reaped. The connection's own task reports each pong it reads,
//! with the time it read it, so a pong that came too late does not count
//! however soon the next sweep runs.
//!
//! This keeps heartbeats off the connections: an idle connection owns no
//! timer and no heartbeat state besides its table entry (16 bytes), and an
//! idle server wakes a few times per interval, sending many pings per
//! wake-up, instead of once per connection. A ping goes out at most one tick
//! late, and a dead peer is found at most one tick after its deadline.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hubbub_heartbeat::{Action, HeartbeatConfig, HeartbeatTable, Key, encode_token};
use tokio::time::Instant;

use crate::Shared;
use crate::link::{CloseReason, Peer};
use crate::metrics::Stats;
use crate::sync::lock;
use crate::ws::{self, CloseCode};

/// Shards of the registry: registering, pongs and sweeping rarely meet.
const SHARDS: usize = 16;

/// Where a connection's entry is, for [`Registry::on_pong`] and
/// [`Registry::remove`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Place {
    /// Which table.
    shard: u32,
    /// The entry in that table.
    key: Key,
}

/// Every connection, for the heartbeat sweeper.
#[derive(Debug)]
pub(crate) struct Registry {
    /// The tables, each behind its own lock; a connection's table is chosen
    /// by its id.
    shards: Box<[Mutex<HeartbeatTable<Peer>>]>,
}

/// Tokio's clock as the table takes it (paused time in tests included).
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

impl Registry {
    /// An empty registry pinging on `config`'s schedule.
    pub(crate) fn new(config: HeartbeatConfig) -> Self {
        let start = now();
        Self { shards: (0..SHARDS).map(|_| Mutex::new(HeartbeatTable::new(config, start))).collect() }
    }

    /// Registers a connection; its first ping is due an interval from now.
    pub(crate) fn insert(&self, peer: &Peer) -> Place {
        let shard = (peer.id().as_u128() % SHARDS as u128) as usize;
        let key = lock(&self.shards[shard]).insert(peer.clone(), now());
        // `shard` is below `SHARDS`.
        Place { shard: shard as u32, key }
    }

    /// A pong carrying `token` arrived on the connection at `slot`, now.
    /// Returns the round trip if it answered the outstanding ping in time.
    pub(crate) fn on_pong(&self, slot: Place, token: u64) -> Option<Duration> {
        lock(&self.shards[slot.shard as usize]).on_pong(slot.key, now(), token)
    }

    /// Asks every registered connection to close because the server is
    /// shutting down (1001, after what is queued). This is how connections
    /// learn of shutdown: each already waits on its own waker, so none of
    /// them also waits on the shared cancellation token, whose every poll
    /// takes one lock shared by all connections. A connection that
    /// registers after this ran sees the token cancelled (`conn`).
    pub(crate) fn close_all(&self) {
        for shard in &self.shards {
            for peer in lock(shard).peers() {
                peer.close(CloseReason::GOING_AWAY);
            }
        }
    }

    /// Forgets a connection.
    pub(crate) fn remove(&self, slot: Place) {
        let peer = lock(&self.shards[slot.shard as usize]).remove(slot.key);
        drop(peer);
    }

    /// One pass at `now`: pings what is due, closes what missed its
    /// deadline.
    fn sweep(&self, now: Instant, stats: &Stats) {
        let now = now.into_std();
        for shard in &self.shards {
            let mut table = lock(shard);
            let timeout = table.config().timeout;
            for (peer, action) in table.sweep(now) {
                match action {
                    Action::SendPing(token) => {
                        peer.send(ws::encode(ws::OpCode::Ping, &encode_token(token)));
                    }
                    Action::PeerDead => {
                        stats.dead_reaped.inc();
                        tracing::info!(client = %peer.id(), ?timeout, "dead connection: no pong in time");
                        peer.close(CloseReason {
                            code: CloseCode::ABNORMAL,
                            reason: "heartbeat timeout",
                            drain_queue: false,
                        });
                    }
                }
            }
        }
    }
}

/// The sweeper's tick for a heartbeat interval.
pub(crate) fn tick(interval: Duration) -> Duration {
    (interval / 8).clamp(Duration::from_millis(1), Duration::from_secs(1))
}

/// Sweeps the registry on every tick until shutdown, then closes every
/// connection.
pub(crate) async fn sweeper(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(tick(shared.config.heartbeat.interval));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return shared.beats.close_all(),
            now = ticks.tick() => shared.beats.sweep(now, &shared.hub.stats),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use hubbub_heartbeat::decode_token;

    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    /// A connection as the sweeper sees it, and what it was sent.
    struct Conn {
        peer: Peer,
        slot: Place,
        /// Whether it answers pings.
        answers: bool,
    }

    impl Conn {
        fn new(registry: &Registry, answers: bool) -> Self {
            let peer = Peer::new(64, 1 << 20, crate::deflate::Deflate::OFF);
            let slot = registry.insert(&peer);
            Self { peer, slot, answers }
        }

        /// How many pings were queued since the last call; each is answered
        /// at once if this connection answers.
        fn pings(&self, registry: &Registry) -> usize {
            let mut queued = VecDeque::new();
            self.peer.take_queued(&mut queued);
            for frame in &queued {
                assert_eq!(frame[..2], [0x89, 8], "a ping with an 8-byte payload");
                let token = decode_token(&frame[2..]).expect("8 bytes");
                if self.answers {
                    assert!(registry.on_pong(self.slot, token).is_some(), "an answer in time counts");
                }
            }
            queued.len()
        }
    }

    /// Five minutes of the sweeper's ticks (a second each at the default
    /// interval) from now, with a connection that answers and a new one
    /// that never does: the pings the first got, and whether the second was
    /// closed as dead.
    async fn five_minutes(registry: &Registry, stats: &Stats, live: &Conn) -> (usize, bool) {
        let silent = Conn::new(registry, false);
        let mut pings = 0;
        for _ in 0..300 {
            tokio::time::advance(tick(HeartbeatConfig::default().interval)).await;
            registry.sweep(Instant::now(), stats);
            pings += live.pings(registry);
            silent.pings(registry);
            assert!(!live.peer.is_closing(), "a peer that answers is never closed");
        }
        let reason = silent.peer.is_closing().then(|| silent.peer.close_reason());
        if let Some(reason) = &reason {
            assert_eq!((reason.code, reason.reason), (CloseCode::ABNORMAL, "heartbeat timeout"));
        }
        registry.remove(silent.slot);
        (pings, reason.is_some())
    }

    /// The 49.7-day case: with u32 milliseconds that saturated, on day 50
    /// a silent peer was never closed and a live one was pinged every tick.
    #[tokio::test(start_paused = true)]
    async fn after_fifty_days_a_silent_peer_is_still_reaped_and_a_live_one_pinged_once_per_interval() {
        let stats = Stats::new();
        let registry = Registry::new(HeartbeatConfig::default());
        let live = Conn::new(&registry, true);
        assert_eq!(five_minutes(&registry, &stats, &live).await, (10, true));
        assert_eq!(stats.dead_reaped.get(), 1);
        tokio::time::advance(50 * DAY).await;
        assert_eq!(five_minutes(&registry, &stats, &live).await, (10, true));
        assert_eq!(stats.dead_reaped.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_closes_every_registered_connection_with_1001_and_only_those() {
        let registry = Registry::new(HeartbeatConfig::default());
        let conns: Vec<Conn> = (0..40).map(|_| Conn::new(&registry, true)).collect();
        registry.remove(conns[0].slot);
        registry.close_all();
        assert!(!conns[0].peer.is_closing(), "a connection that left is not touched");
        for conn in &conns[1..] {
            assert!(conn.peer.is_closing());
            assert_eq!(conn.peer.close_reason().code, CloseCode::AWAY);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_pong_read_after_the_deadline_does_not_count_though_no_sweep_saw_it() {
        let stats = Stats::new();
        let config = HeartbeatConfig::default();
        let registry = Registry::new(config);
        let conn = Conn::new(&registry, false);
        tokio::time::advance(config.interval).await;
        registry.sweep(Instant::now(), &stats);
        let mut queued = VecDeque::new();
        conn.peer.take_queued(&mut queued);
        let token = decode_token(&queued[0][2..]).expect("a ping");
        tokio::time::advance(config.timeout).await;
        assert_eq!(registry.on_pong(conn.slot, token), None);
        registry.sweep(Instant::now(), &stats);
        assert!(conn.peer.is_closing());
        assert_eq!(stats.dead_reaped.get(), 1);
    }
}
