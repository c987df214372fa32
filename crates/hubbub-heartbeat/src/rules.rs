//! The liveness rules, once, for any representation of time.
//!
//! [`Heartbeat`](crate::Heartbeat) runs them on `Instant`s for one peer;
//! [`HeartbeatTable`](crate::HeartbeatTable) runs them on millisecond
//! offsets for many peers packed in a small entry each. Both hold a
//! [`Phase`] (or something that decodes to one) and change it only through
//! the methods here, so the two cannot drift apart.

use std::time::{Duration, Instant};

use crate::{Action, HeartbeatConfig};

/// A point in time the rules can compare and move forward.
pub(crate) trait Time: Copy + Ord {
    /// `self + duration`, or `None` when that cannot be represented: such a
    /// time is never reached.
    fn after(self, duration: Duration) -> Option<Self>;
}

impl Time for Instant {
    fn after(self, duration: Duration) -> Option<Self> {
        self.checked_add(duration)
    }
}

/// Where one peer stands in the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase<T> {
    /// No ping is outstanding; the next one is due at `due` (`None`: never).
    Idle {
        /// When the next ping is due.
        due: Option<T>,
    },
    /// A ping is outstanding.
    Waiting {
        /// The token its pong must carry.
        token: u64,
        /// When it was sent: its deadline counts from here, and so does the
        /// next ping's due time.
        sent: T,
    },
    /// The peer let a ping go unanswered until its deadline. Final.
    Dead,
}

impl<T: Time> Phase<T> {
    /// A peer first seen at `now`: its first ping is due an interval later.
    pub(crate) fn start(config: &HeartbeatConfig, now: T) -> Self {
        Self::Idle { due: now.after(config.interval) }
    }

    /// When the phase next changes by itself: the outstanding ping's
    /// deadline, or the next ping's due time. `None` when dead or never.
    pub(crate) fn next_change(&self, config: &HeartbeatConfig) -> Option<T> {
        match *self {
            Self::Idle { due } => due,
            Self::Waiting { sent, .. } => sent.after(config.timeout),
            Self::Dead => None,
        }
    }

    /// Moves to [`Phase::Dead`] if the outstanding ping's deadline has been
    /// reached at `now`. Returns whether the peer died in this call.
    pub(crate) fn expire(&mut self, config: &HeartbeatConfig, now: T) -> bool {
        let overdue = matches!(self, Self::Waiting { .. }) && reached(now, self.next_change(config));
        if overdue {
            *self = Self::Dead;
        }
        overdue
    }

    /// Advances the schedule to `now`: the peer dies if its deadline has
    /// passed, or a ping goes out (with the token `next_token` hands out) if
    /// one is due and none is outstanding. Returns what changed; a peer
    /// already dead yields nothing.
    pub(crate) fn poll(
        &mut self,
        config: &HeartbeatConfig,
        now: T,
        next_token: impl FnOnce() -> u64,
    ) -> Option<Action> {
        if self.expire(config, now) {
            return Some(Action::PeerDead);
        }
        match *self {
            Self::Idle { due } if reached(now, due) => {
                let token = next_token();
                *self = Self::Waiting { token, sent: now };
                Some(Action::SendPing(token))
            }
            _ => None,
        }
    }

    /// A pong carrying `token` arrived at `now`. It answers the outstanding
    /// ping if it carries that ping's token and arrives before the deadline;
    /// then the next ping is due an interval after that ping was sent, and
    /// the send time is returned (for a latency sample).
    ///
    /// A late pong changes nothing here, not even to mark the peer dead:
    /// the owner learns of the death from [`poll`](Self::poll), or calls
    /// [`expire`](Self::expire) itself.
    pub(crate) fn answer(&mut self, config: &HeartbeatConfig, now: T, token: u64) -> Option<T> {
        match *self {
            Self::Waiting { token: expected, sent }
                if expected == token && !reached(now, self.next_change(config)) =>
            {
                *self = Self::Idle { due: sent.after(config.interval) };
                Some(sent)
            }
            _ => None,
        }
    }

    /// Records that the outstanding ping was written at `now`, later than
    /// the poll that asked for it. Earlier stamps, and stamps with nothing
    /// outstanding, are ignored.
    pub(crate) fn restamp(&mut self, now: T) {
        if let Self::Waiting { sent, .. } = self
            && now > *sent
        {
            *sent = now;
        }
    }
}

/// Whether `now` is at or after `at`; `None` stands for a time too far away
/// to represent, which is never reached.
fn reached<T: Time>(now: T, at: Option<T>) -> bool {
    at.is_some_and(|at| now >= at)
}
