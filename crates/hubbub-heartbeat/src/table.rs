//! Heartbeats for many peers in one compact table, swept on a timer.
//! The details are on [`HeartbeatTable`].

use std::time::{Duration, Instant};

use crate::rules::{Phase, Time};
use crate::{Action, HeartbeatConfig};

/// Where a peer's entry is in its [`HeartbeatTable`], from
/// [`HeartbeatTable::insert`] until [`HeartbeatTable::remove`]. After the
/// removal the key may be handed out again, to another peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(u32);

/// The liveness rules of [`Heartbeat`](crate::Heartbeat) for many peers at
/// once.
///
/// A server with thousands of idle connections should not keep a timer and a
/// [`Heartbeat`](crate::Heartbeat) per connection. [`HeartbeatTable`] holds
/// the same rules for every peer in a small entry each (16 bytes when the
/// caller's handle is a pointer), and one task sweeps it on a timer:
/// [`HeartbeatTable::sweep`] walks every entry and yields what to do, a ping
/// for each peer whose ping is due and [`Action::PeerDead`] (once) for each
/// peer whose ping went unanswered until its deadline. Pongs are reported
/// with their arrival time ([`HeartbeatTable::on_pong`]), so whether a pong
/// came in time does not depend on when the next sweep runs.
///
/// Like the rest of the crate it reads no clock: every call takes `now`.
///
/// # Time
///
/// Entries keep their times as milliseconds after an epoch of the table's
/// own, in 32 bits. The epoch moves forward as time passes (every 24 days or
/// so, at the first call that finds it far behind, the table shifts every
/// entry by the same amount), so the table runs for any length of time and
/// nothing ever saturates. What it costs is a resolution of a millisecond,
/// and a cap on the durations: an `interval` or `timeout` longer than
/// [`HeartbeatTable::MAX_DURATION`] (about 12 days) counts as that.
///
/// `P` is whatever the driver needs to act on a peer (a handle to its
/// connection); the table only stores it and hands it back with each action.
///
/// ```
/// use std::time::{Duration, Instant};
/// use hubbub_heartbeat::{Action, HeartbeatConfig, HeartbeatTable};
///
/// let config = HeartbeatConfig { interval: Duration::from_secs(30), timeout: Duration::from_secs(35) };
/// let t0 = Instant::now();
/// let mut table = HeartbeatTable::new(config, t0);
/// let alice = table.insert("alice", t0);
/// let bob = table.insert("bob", t0);
///
/// // One sweep, once the first pings are due: both get one.
/// let at = t0 + config.interval;
/// let pings: Vec<_> = table.sweep(at).collect();
/// assert_eq!(pings, [(&"alice", Action::SendPing(1)), (&"bob", Action::SendPing(2))]);
///
/// // Alice answers; Bob never does, and is reported dead once.
/// assert_eq!(table.on_pong(alice, at + Duration::from_millis(40), 1), Some(Duration::from_millis(40)));
/// let deadline = at + config.timeout;
/// assert_eq!(table.sweep(deadline).collect::<Vec<_>>(), [(&"alice", Action::SendPing(3)), (&"bob", Action::PeerDead)]);
/// assert_eq!(table.sweep(deadline + Duration::from_secs(1)).count(), 0);
/// assert_eq!(table.remove(bob), Some("bob"));
/// ```
#[derive(Debug)]
pub struct HeartbeatTable<P> {
    /// The schedule, durations capped at [`Self::MAX_DURATION`].
    config: HeartbeatConfig,
    /// Entries' times count from here. Moves forward; see [`Self::millis`].
    epoch: Instant,
    /// The peers, by [`Key`]; `None` where a peer was removed.
    entries: Vec<Option<Entry<P>>>,
    /// Keys of the `None` entries, to be reused first.
    free: Vec<u32>,
    /// The last token handed out. Never 0 after the first ping, since 0
    /// marks an entry with no ping outstanding.
    last_token: u32,
}

/// One peer: its handle and its [`Phase`], packed in 8 bytes.
#[derive(Debug)]
struct Entry<P> {
    /// The caller's handle.
    peer: P,
    /// The outstanding ping's token, or 0 when none is outstanding.
    token: u32,
    /// With a ping outstanding, when it was sent; otherwise when the next is
    /// due, or [`NEVER`] once the peer is dead. In milliseconds after the
    /// table's epoch.
    at: u32,
}

/// `Entry::at` of a dead peer. No live entry gets there: see
/// [`HeartbeatTable::millis`].
const NEVER: u32 = u32::MAX;

/// Once `now` is this many milliseconds past the epoch (about 24.9 days),
/// the epoch moves forward...
const REBASE_AT: u64 = 1 << 31;

/// ...to this many milliseconds before `now` (about 12.4 days). Times
/// further back than this only ever belong to pings overdue and pings
/// already missed, which stay so when moved up to the new epoch.
const KEEP: u64 = 1 << 30;

/// A time in the table: milliseconds after its epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Millis(u64);

impl Time for Millis {
    fn after(self, duration: Duration) -> Option<Self> {
        self.0.checked_add(whole_millis(duration)).map(Millis)
    }
}

impl<P> Entry<P> {
    fn phase(&self) -> Phase<Millis> {
        match (self.token, self.at) {
            (0, NEVER) => Phase::Dead,
            (0, due) => Phase::Idle { due: Some(Millis(due.into())) },
            (token, sent) => Phase::Waiting { token: token.into(), sent: Millis(sent.into()) },
        }
    }

    fn set(&mut self, phase: Phase<Millis>) {
        (self.token, self.at) = match phase {
            // A due time that cannot be represented cannot happen with the
            // capped durations; were it to, it would mean what dead means
            // here: nothing more to do for this peer.
            Phase::Dead | Phase::Idle { due: None } => (0, NEVER),
            Phase::Idle { due: Some(due) } => (0, stored(due)),
            // Tokens come from the table's 32-bit counter.
            Phase::Waiting { token, sent } => (u32::try_from(token).unwrap_or(u32::MAX), stored(sent)),
        };
    }
}

/// A time as an entry stores it. Times in the table stay below
/// `REBASE_AT + MAX_DURATION`, far below [`NEVER`], so this never clamps.
fn stored(at: Millis) -> u32 {
    u32::try_from(at.0).unwrap_or(NEVER - 1).min(NEVER - 1)
}

/// A duration in whole milliseconds, rounded up so that a short non-zero
/// duration does not become zero.
fn whole_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

impl<P> HeartbeatTable<P> {
    /// The longest `interval` and `timeout` the table keeps: 2^30 ms, about
    /// 12.4 days. Longer ones count as this.
    pub const MAX_DURATION: Duration = Duration::from_millis(KEEP);

    /// An empty table, at `now`. The config is taken as is (check it with
    /// [`HeartbeatConfig::validate`] when it is loaded), its durations capped
    /// at [`Self::MAX_DURATION`].
    pub fn new(config: HeartbeatConfig, now: Instant) -> Self {
        let config = HeartbeatConfig {
            interval: config.interval.min(Self::MAX_DURATION),
            timeout: config.timeout.min(Self::MAX_DURATION),
        };
        Self { config, epoch: now, entries: Vec::new(), free: Vec::new(), last_token: 0 }
    }

    /// The config in use, durations capped.
    pub fn config(&self) -> &HeartbeatConfig {
        &self.config
    }

    /// How many peers the table holds.
    pub fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    /// Whether the table holds no peer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts watching `peer`, first seen at `now`: its first ping is due an
    /// interval later.
    pub fn insert(&mut self, peer: P, now: Instant) -> Key {
        let now = self.millis(now);
        let mut entry = Entry { peer, token: 0, at: NEVER };
        entry.set(Phase::start(&self.config, now));
        match self.free.pop() {
            Some(index) => {
                self.entries[index as usize] = Some(entry);
                Key(index)
            }
            None => {
                self.entries.push(Some(entry));
                // More than 4 billion peers in one table would not fit in
                // memory first.
                Key(u32::try_from(self.entries.len() - 1).unwrap_or(u32::MAX))
            }
        }
    }

    /// Stops watching the peer at `key` and gives its handle back. `None`
    /// if there is none (it was removed already).
    pub fn remove(&mut self, key: Key) -> Option<P> {
        let entry = self.entries.get_mut(key.0 as usize)?.take()?;
        self.free.push(key.0);
        // Give memory back after a crowd has gone.
        if self.free.len() == self.entries.len() && self.entries.capacity() > 64 {
            self.entries = Vec::new();
            self.free = Vec::new();
        }
        Some(entry.peer)
    }

    /// The peer at `key`, if it is there.
    pub fn get(&self, key: Key) -> Option<&P> {
        self.entries.get(key.0 as usize)?.as_ref().map(|entry| &entry.peer)
    }

    /// Every peer in the table, in no particular order: for a driver that
    /// must tell them all something (a server shutting down).
    pub fn peers(&self) -> impl Iterator<Item = &P> {
        self.entries.iter().flatten().map(|entry| &entry.peer)
    }

    /// Records a pong carrying `token` from the peer at `key`, which arrived
    /// at `now`.
    ///
    /// If it answers the peer's outstanding ping before that ping's deadline,
    /// the next ping is due an interval after that ping was sent, and the
    /// round trip (to the millisecond) is returned. A pong at or after the
    /// deadline does not revive the peer, even if no sweep has noticed the
    /// deadline yet: the next sweep reports it dead. Any other pong (another
    /// token, nothing outstanding, no such key) is ignored.
    pub fn on_pong(&mut self, key: Key, now: Instant, token: u64) -> Option<Duration> {
        let now = self.millis(now);
        let entry = self.entries.get_mut(key.0 as usize)?.as_mut()?;
        let mut phase = entry.phase();
        let sent = phase.answer(&self.config, now, token)?;
        entry.set(phase);
        Some(Duration::from_millis(now.0.saturating_sub(sent.0)))
    }

    /// Advances every peer to `now` and yields what to do: the ping to send
    /// to each peer whose ping is due and that has none outstanding, and
    /// [`Action::PeerDead`] once for each peer whose outstanding ping reached
    /// its deadline unanswered. The ping counts as sent at `now`.
    ///
    /// A ping goes out at the first sweep at or after its due time, and a
    /// death is found at the first sweep at or after the deadline, so the
    /// sweep period is how late either can be. The work is done as the
    /// iterator is consumed; entries it does not reach wait for the next
    /// sweep.
    pub fn sweep(&mut self, now: Instant) -> Sweep<'_, P> {
        let now = self.millis(now);
        Sweep {
            config: &self.config,
            now,
            entries: self.entries.iter_mut(),
            last_token: &mut self.last_token,
        }
    }

    /// `now` in the table's time, moving the epoch forward first if `now`
    /// is far past it. Afterwards `now` is less than `REBASE_AT` after the
    /// epoch, so every time an entry stores (now, or a due time at most
    /// [`Self::MAX_DURATION`] later) fits below [`NEVER`].
    fn millis(&mut self, now: Instant) -> Millis {
        let elapsed =
            u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX);
        if elapsed < REBASE_AT {
            return Millis(elapsed);
        }
        let shift = elapsed - KEEP;
        // `epoch + shift` is at most `now`, so it can be represented.
        self.epoch = self.epoch.checked_add(Duration::from_millis(shift)).unwrap_or(now);
        let shift = u32::try_from(shift).unwrap_or(u32::MAX);
        for entry in self.entries.iter_mut().flatten() {
            if entry.at != NEVER {
                entry.at = entry.at.saturating_sub(shift);
            }
        }
        Millis(KEEP)
    }
}

/// The actions of one [`HeartbeatTable::sweep`], as `(peer, action)`.
#[derive(Debug)]
#[must_use = "a sweep does its work as it is iterated"]
pub struct Sweep<'a, P> {
    /// The table's schedule.
    config: &'a HeartbeatConfig,
    /// The sweep's time.
    now: Millis,
    /// The entries not yet swept.
    entries: std::slice::IterMut<'a, Option<Entry<P>>>,
    /// The table's token counter.
    last_token: &'a mut u32,
}

impl<'a, P> Iterator for Sweep<'a, P> {
    type Item = (&'a P, Action);

    fn next(&mut self) -> Option<Self::Item> {
        for entry in self.entries.by_ref().flatten() {
            let mut phase = entry.phase();
            let last_token = &mut *self.last_token;
            let next_token = || {
                // 0 marks "none outstanding", so it is skipped.
                *last_token = last_token.wrapping_add(1).max(1);
                u64::from(*last_token)
            };
            let Some(action) = phase.poll(self.config, self.now, next_token) else {
                continue;
            };
            entry.set(phase);
            let entry: &'a Entry<P> = entry;
            return Some((&entry.peer, action));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn config() -> HeartbeatConfig {
        HeartbeatConfig::default()
    }

    /// Sweeps at `now` and returns the actions by peer name.
    fn sweep(table: &mut HeartbeatTable<&'static str>, now: Instant) -> Vec<(&'static str, Action)> {
        table.sweep(now).map(|(peer, action)| (*peer, action)).collect()
    }

    #[test]
    fn an_entry_is_two_words_with_a_pointer_handle() {
        assert_eq!(size_of::<Option<Entry<Arc<()>>>>(), 16);
    }

    #[test]
    fn pings_are_due_an_interval_after_insert_and_after_the_previous_ping() {
        let t0 = Instant::now();
        let mut table = HeartbeatTable::new(config(), t0);
        let a = table.insert("a", t0);
        assert_eq!(sweep(&mut table, t0 + secs(30) - Duration::from_millis(1)), []);
        assert_eq!(sweep(&mut table, t0 + secs(30)), [("a", Action::SendPing(1))]);
        // Outstanding: nothing more, even when the next would be due.
        assert_eq!(sweep(&mut table, t0 + secs(31)), []);
        assert_eq!(table.on_pong(a, t0 + secs(31), 1), Some(secs(1)));
        assert_eq!(sweep(&mut table, t0 + secs(59)), []);
        assert_eq!(sweep(&mut table, t0 + secs(60)), [("a", Action::SendPing(2))]);
    }

    #[test]
    fn a_silent_peer_is_reported_dead_once_at_its_deadline() {
        let t0 = Instant::now();
        let mut table = HeartbeatTable::new(config(), t0);
        let a = table.insert("a", t0);
        assert_eq!(sweep(&mut table, t0 + secs(30)), [("a", Action::SendPing(1))]);
        assert_eq!(sweep(&mut table, t0 + secs(65) - Duration::from_millis(1)), []);
        assert_eq!(sweep(&mut table, t0 + secs(65)), [("a", Action::PeerDead)]);
        assert_eq!(sweep(&mut table, t0 + secs(1000)), []);
        // A pong for a dead peer changes nothing.
        assert_eq!(table.on_pong(a, t0 + secs(1001), 1), None);
        assert_eq!(sweep(&mut table, t0 + secs(2000)), []);
        assert_eq!(table.remove(a), Some("a"));
        assert!(table.is_empty());
    }

    #[test]
    fn a_late_pong_does_not_revive_the_peer_even_before_the_sweep() {
        let t0 = Instant::now();
        let mut table = HeartbeatTable::new(config(), t0);
        let a = table.insert("a", t0);
        let b = table.insert("b", t0);
        assert_eq!(sweep(&mut table, t0 + secs(30)).len(), 2);
        // Both pongs arrive between the deadline (65 s) and the next sweep:
        // a just before it, b at it.
        assert_eq!(
            table.on_pong(a, t0 + secs(65) - Duration::from_millis(1), 1),
            Some(secs(35) - Duration::from_millis(1))
        );
        assert_eq!(table.on_pong(b, t0 + secs(65), 2), None);
        assert_eq!(sweep(&mut table, t0 + secs(66)), [("a", Action::SendPing(3)), ("b", Action::PeerDead)]);
    }

    #[test]
    fn only_the_outstanding_token_answers() {
        let t0 = Instant::now();
        let mut table = HeartbeatTable::new(config(), t0);
        let a = table.insert("a", t0);
        // Unsolicited, before any ping.
        assert_eq!(table.on_pong(a, t0 + secs(1), 0), None);
        assert_eq!(table.on_pong(a, t0 + secs(1), 1), None);
        sweep(&mut table, t0 + secs(30));
        for wrong in [0, 2, u64::from(u32::MAX) + 2] {
            assert_eq!(table.on_pong(a, t0 + secs(31), wrong), None);
        }
        assert_eq!(sweep(&mut table, t0 + secs(65)), [("a", Action::PeerDead)]);
    }

    #[test]
    fn removed_keys_are_reused_and_stale_keys_find_nothing() {
        let t0 = Instant::now();
        let mut table = HeartbeatTable::new(config(), t0);
        let a = table.insert("a", t0);
        let b = table.insert("b", t0);
        assert_eq!(table.remove(a), Some("a"));
        assert_eq!(table.remove(a), None);
        assert_eq!(table.get(a), None);
        let c = table.insert("c", t0 + secs(10));
        assert_eq!(c, a);
        assert_eq!((table.get(b), table.get(c), table.len()), (Some(&"b"), Some(&"c"), 2));
        assert_eq!(sweep(&mut table, t0 + secs(30)), [("b", Action::SendPing(1))]);
        assert_eq!(sweep(&mut table, t0 + secs(40)), [("c", Action::SendPing(2))]);
    }

    #[test]
    fn fifty_days_on_a_dead_peer_is_still_reaped_and_a_live_one_pinged_once_per_interval() {
        // Five minutes of sweeps every second, as the server's are with the
        // default interval, at the start and again fifty days later, with a
        // sweep a day in between (so the table's epoch has to move on its
        // own). The live peer answers every ping in 20 ms; a peer that never
        // answers joins at the start of each window.
        let t0 = Instant::now();
        let mut table = HeartbeatTable::new(config(), t0);
        let live = table.insert("live", t0);
        let answer = |table: &mut HeartbeatTable<&'static str>, now: Instant| {
            let mut counts = (0, 0);
            for (peer, action) in sweep(table, now) {
                match (peer, action) {
                    ("live", Action::SendPing(token)) => {
                        counts.0 += 1;
                        let rtt = table.on_pong(live, now + Duration::from_millis(20), token);
                        assert_eq!(rtt, Some(Duration::from_millis(20)));
                    }
                    ("dead", Action::PeerDead) => counts.1 += 1,
                    ("dead", Action::SendPing(_)) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            counts
        };
        let window = |table: &mut HeartbeatTable<&'static str>, start: Instant| {
            table.insert("dead", start);
            let (mut pings, mut deaths) = (0, 0);
            for second in 1..=300 {
                let (p, d) = answer(table, start + secs(second));
                pings += p;
                deaths += d;
            }
            (pings, deaths)
        };
        assert_eq!(window(&mut table, t0), (10, 1));
        for day in 1..50 {
            answer(&mut table, t0 + day * DAY);
        }
        assert_eq!(window(&mut table, t0 + 50 * DAY), (10, 1));
    }

    #[test]
    fn the_epoch_moves_without_losing_an_entry() {
        // A peer inserted just before the epoch moves, swept just after.
        let t0 = Instant::now();
        let mut table = HeartbeatTable::new(config(), t0);
        let before_move = t0 + Duration::from_millis(REBASE_AT) - secs(10);
        table.insert("a", before_move);
        assert_eq!(sweep(&mut table, before_move + secs(30) - Duration::from_millis(1)), []);
        assert_eq!(sweep(&mut table, before_move + secs(30)), [("a", Action::SendPing(1))]);
        assert_eq!(sweep(&mut table, before_move + secs(65) - Duration::from_millis(1)), []);
        assert_eq!(sweep(&mut table, before_move + secs(65)), [("a", Action::PeerDead)]);

        // Nothing for years, then a sweep: an idle peer is due at once, an
        // outstanding ping is missed.
        let mut table = HeartbeatTable::new(config(), t0);
        table.insert("idle", t0);
        assert_eq!(sweep(&mut table, t0 + secs(30)), [("idle", Action::SendPing(1))]);
        table.insert("new", t0 + secs(30));
        let years = t0 + 3 * 365 * DAY;
        assert_eq!(sweep(&mut table, years), [("idle", Action::PeerDead), ("new", Action::SendPing(2))]);
    }

    #[test]
    fn durations_past_the_cap_count_as_the_cap() {
        let t0 = Instant::now();
        let huge = HeartbeatConfig { interval: Duration::MAX, timeout: 100 * DAY };
        let mut table = HeartbeatTable::new(huge, t0);
        let cap = HeartbeatTable::<&str>::MAX_DURATION;
        assert_eq!(*table.config(), HeartbeatConfig { interval: cap, timeout: cap });
        table.insert("a", t0);
        assert_eq!(sweep(&mut table, t0 + cap - Duration::from_millis(1)), []);
        assert_eq!(sweep(&mut table, t0 + cap), [("a", Action::SendPing(1))]);
        assert_eq!(sweep(&mut table, t0 + 2 * cap), [("a", Action::PeerDead)]);
    }

    #[test]
    fn a_sub_millisecond_interval_is_one_millisecond_not_zero() {
        let t0 = Instant::now();
        let tiny =
            HeartbeatConfig { interval: Duration::from_micros(300), timeout: Duration::from_micros(300) };
        let mut table = HeartbeatTable::new(tiny, t0);
        table.insert("a", t0);
        assert_eq!(sweep(&mut table, t0), []);
        assert_eq!(sweep(&mut table, t0 + Duration::from_millis(1)), [("a", Action::SendPing(1))]);
    }
}
