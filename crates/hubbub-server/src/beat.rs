//! Heartbeats for every connection, from one task.
//!
//! Every WebSocket connection is registered here for its life. A sweeper
//! task wakes on ticks of an eighth of the heartbeat interval (at most a
//! second) and walks the registry: a connection whose ping is due gets one
//! (a WebSocket ping carrying a token, queued like any other frame); a
//! connection whose outstanding ping went unanswered for the timeout is
//! closed without a handshake (1006) and counted as reaped. The connection's
//! own task only records the token of each pong it reads.
//!
//! This keeps heartbeats off the connections: an idle connection owns no
//! timer and no heartbeat state besides its registry entry (16 bytes) and
//! the last pong's token, and an idle server wakes a few times per interval,
//! sending many pings per wake-up, instead of once per connection.
//!
//! Semantics are those of `hubbub_heartbeat::Heartbeat`: one ping
//! outstanding at a time, only a pong with its token answers it, the next
//! ping is due an interval after the last one was sent. A ping goes out at
//! most one tick late, and a dead peer is found at most one tick after its
//! timeout.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::ws::CloseCode;
use hubbub_heartbeat::encode_token;
use tokio::time::Instant;

use crate::Shared;
use crate::link::{CloseReason, Peer};
use crate::sync::lock;
use crate::ws;

/// Shards of the registry: registering and sweeping rarely meet.
const SHARDS: usize = 16;

/// Where a connection's entry is, for [`Registry::remove`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slot {
    shard: u32,
    index: u32,
}

/// One connection's heartbeat state, owned by the sweeper.
#[derive(Debug)]
struct Entry {
    peer: Peer,
    /// The outstanding ping's token, or 0 when none is.
    token: u32,
    /// When the outstanding ping was sent, or when the next one is due
    /// (when none is outstanding), in milliseconds since the registry's
    /// epoch.
    at_ms: u32,
}

#[derive(Debug, Default)]
struct Shard {
    entries: Vec<Option<Entry>>,
    /// Indexes of empty entries.
    free: Vec<u32>,
    /// The last token handed out in this shard.
    last_token: u32,
}

/// Every connection, for the heartbeat sweeper.
#[derive(Debug)]
pub(crate) struct Registry {
    shards: Box<[Mutex<Shard>]>,
    epoch: Instant,
}

impl Registry {
    /// An empty registry.
    pub(crate) fn new() -> Self {
        Self { shards: (0..SHARDS).map(|_| Mutex::default()).collect(), epoch: Instant::now() }
    }

    fn millis(&self, at: Instant) -> u32 {
        u32::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u32::MAX)
    }

    /// Registers a connection; its first ping is due `interval` from now.
    pub(crate) fn insert(&self, peer: &Peer, interval: Duration) -> Slot {
        let shard_index = (peer.id().as_u128() as usize) % self.shards.len();
        let due = self.millis(Instant::now() + interval);
        let mut shard = lock(&self.shards[shard_index]);
        let entry = Entry { peer: peer.clone(), token: 0, at_ms: due };
        let index = match shard.free.pop() {
            Some(index) => {
                shard.entries[index as usize] = Some(entry);
                index
            }
            None => {
                shard.entries.push(Some(entry));
                u32::try_from(shard.entries.len() - 1).unwrap_or(u32::MAX)
            }
        };
        Slot { shard: shard_index as u32, index }
    }

    /// Forgets a connection.
    pub(crate) fn remove(&self, slot: Slot) {
        let mut shard = lock(&self.shards[slot.shard as usize]);
        if let Some(entry) = shard.entries.get_mut(slot.index as usize)
            && entry.take().is_some()
        {
            shard.free.push(slot.index);
        }
        // Give memory back after a crowd has gone.
        if shard.free.len() == shard.entries.len() && shard.entries.capacity() > 64 {
            shard.entries = Vec::new();
            shard.free = Vec::new();
        }
    }

    /// One pass at `now`: pings what is due, reaps what timed out.
    fn sweep(&self, shared: &Shared, now: Instant) {
        let now_ms = self.millis(now);
        let interval = duration_ms(shared.config.heartbeat.interval);
        let timeout = duration_ms(shared.config.heartbeat.timeout);
        let stats = &shared.hub.stats;
        for shard in &self.shards {
            let mut shard = lock(shard);
            let Shard { entries, last_token, .. } = &mut *shard;
            for entry in entries.iter_mut().flatten() {
                if entry.token != 0 {
                    if entry.peer.last_pong() == entry.token {
                        // Answered: the next ping is due an interval after
                        // this one was sent.
                        entry.token = 0;
                        entry.at_ms = entry.at_ms.saturating_add(interval);
                    } else if now_ms.saturating_sub(entry.at_ms) >= timeout {
                        entry.token = 0;
                        entry.at_ms = u32::MAX;
                        stats.dead_reaped.inc();
                        tracing::info!(client = %entry.peer.id(), timeout = ?shared.config.heartbeat.timeout, "dead connection: no pong in time");
                        entry.peer.close(CloseReason {
                            code: CloseCode::ABNORMAL,
                            reason: "heartbeat timeout",
                            drain_queue: false,
                        });
                        continue;
                    }
                }
                if entry.token == 0 && now_ms >= entry.at_ms {
                    // Tokens are never 0, so 0 can mean "none outstanding".
                    *last_token = last_token.wrapping_add(1).max(1);
                    entry.token = *last_token;
                    entry.at_ms = now_ms;
                    entry.peer.send(ws::encode(ws::OpCode::Ping, &encode_token(u64::from(entry.token))));
                }
            }
        }
    }
}

fn duration_ms(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

/// The sweeper's tick for a heartbeat interval.
pub(crate) fn tick(interval: Duration) -> Duration {
    (interval / 8).clamp(Duration::from_millis(1), Duration::from_secs(1))
}

/// Sweeps the registry on every tick until shutdown.
pub(crate) async fn sweeper(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(tick(shared.config.heartbeat.interval));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            now = ticks.tick() => shared.beats.sweep(&shared, now),
        }
    }
}
