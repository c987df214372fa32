//! A connection's shared half: what the rest of the server may touch of a
//! connection (its id, its bounded outbound queue and its close switch), as
//! a [`Peer`] handle that costs one pointer.
//!
//! Whoever sends to a connection (a broadcast, a reply, the heartbeat
//! sweeper) queues a complete [`Frame`] with [`Peer::send`], which never
//! waits: a connection whose queue is full, in frames or in bytes, is closed
//! as a slow consumer instead. The connection's own task (`conn`) takes the
//! queue whole, writes it, and counts down what it wrote; it is also the
//! only one that writes the close frame, for the first [`CloseReason`]
//! recorded.

use std::borrow::Borrow;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;

use futures_util::task::AtomicWaker;
use hubbub_protocol::ServerMessage;
use uuid::Uuid;

use crate::deflate::Deflate;
use crate::metrics::Stats;
use crate::sync::lock;
pub(crate) use crate::ws::Frame;
use crate::ws::{self, CloseCode};

/// A connection's id, sent to chat clients in `connected {clientId}`.
pub(crate) type ClientId = Uuid;

/// Encodes a message once, as a text frame, for any number of recipients.
pub(crate) fn encode(msg: &ServerMessage) -> Frame {
    ws::encode(ws::OpCode::Text, msg.to_json().as_bytes())
}

/// Why a connection is closing, chosen by whoever closes it first.
#[derive(Clone, Debug)]
pub(crate) struct CloseReason {
    /// The close code sent to the peer.
    pub(crate) code: CloseCode,
    /// The close frame's reason text.
    pub(crate) reason: &'static str,
    /// Whether frames already queued are sent before the close frame.
    pub(crate) drain_queue: bool,
}

impl CloseReason {
    /// The server shuts down (what is recorded when nobody recorded
    /// anything else): frames already queued go first.
    pub(crate) const GOING_AWAY: Self =
        Self { code: CloseCode::AWAY, reason: "Server shutting down", drain_queue: true };
    /// The connection fell too far behind: what is queued is dropped.
    pub(crate) const SLOW_CONSUMER: Self =
        Self { code: CloseCode::POLICY, reason: "Slow consumer: outbound queue full", drain_queue: false };
    /// The transport is gone or must be dropped: no close frame at all.
    pub(crate) const ABNORMAL: Self = Self { code: CloseCode::ABNORMAL, reason: "", drain_queue: false };
    /// A client that keeps flooding after being told to slow down.
    pub(crate) const FLOODING: Self =
        Self { code: CloseCode::POLICY, reason: "Rate limit exceeded", drain_queue: true };

    /// The close frame to send for this reason.
    pub(crate) fn frame(&self) -> Frame {
        ws::encode_close(self.code, self.reason)
    }

    /// Whether this is the slow-consumer close.
    pub(crate) fn is_slow_consumer(&self) -> bool {
        self.code == Self::SLOW_CONSUMER.code && self.reason == Self::SLOW_CONSUMER.reason
    }
}

/// The part of a connection that others may touch: its id, its outbound
/// queue and its close switch. One pointer: cloning is a reference count,
/// and the hub's sets hold 8 bytes per member.
#[derive(Clone, Debug)]
pub(crate) struct Peer {
    /// Shared with the connection's task.
    link: Arc<Link>,
}

/// What a connection shares with those who send to it.
#[derive(Debug)]
struct Link {
    /// The connection's id.
    id: ClientId,
    /// Frames waiting for the connection's task, and the close reason,
    /// under one lock (which also spares the reason a lock of its own).
    queue: Mutex<Queue>,
    /// Most frames that may wait, queued or taken by the task but not yet
    /// written.
    capacity: u32,
    /// Most bytes that may wait, likewise.
    max_bytes: u32,
    /// Frames queued and not yet written, counted down by the task as it
    /// writes them.
    backlog_frames: AtomicU32,
    /// Bytes queued and not yet written.
    backlog_bytes: AtomicU32,
    /// Wakes the connection's task: frames queued, or a close asked for.
    waker: AtomicWaker,
    /// Set once the connection must close; nothing more is queued after.
    closing: AtomicBool,
    /// What permessage-deflate the connection negotiated (`Deflate`'s
    /// byte): the one thing compression keeps per connection. It sits in
    /// what was padding after `closing`, so the link is no larger.
    deflate: u8,
}

/// What a connection's senders leave for its task.
#[derive(Debug, Default)]
struct Queue {
    /// Frames waiting for the connection's task, in order. The vector is
    /// handed to the task whole and starts unallocated again, so an idle
    /// connection holds no queue memory.
    frames: Vec<Frame>,
    /// The first close reason recorded wins.
    reason: Option<CloseReason>,
}

/// Peers are told apart by their ids, so a set of peers can be looked up by
/// id without storing the id beside each (the hub's member sets).
impl PartialEq for Peer {
    fn eq(&self, other: &Self) -> bool {
        self.link.id == other.link.id
    }
}

impl Eq for Peer {}

impl Hash for Peer {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.link.id.hash(state);
    }
}

impl Borrow<ClientId> for Peer {
    fn borrow(&self) -> &ClientId {
        &self.link.id
    }
}

impl Peer {
    /// A new connection's shared half, whose queue holds `capacity` frames
    /// and `max_bytes` bytes (limits past `u32::MAX` count as `u32::MAX`),
    /// for a connection that negotiated `deflate`.
    pub(crate) fn new(capacity: usize, max_bytes: usize, deflate: Deflate) -> Self {
        let link = Link {
            id: Uuid::new_v4(),
            queue: Mutex::new(Queue::default()),
            capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            max_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX),
            backlog_frames: AtomicU32::new(0),
            backlog_bytes: AtomicU32::new(0),
            waker: AtomicWaker::new(),
            closing: AtomicBool::new(false),
            deflate: deflate.to_byte(),
        };
        Self { link: Arc::new(link) }
    }

    /// The connection's id.
    pub(crate) fn id(&self) -> ClientId {
        self.link.id
    }

    /// What permessage-deflate the connection negotiated: which form of a
    /// shared frame its task writes (`Frame::wire`).
    pub(crate) fn deflate(&self) -> Deflate {
        Deflate::from_byte(self.link.deflate)
    }

    /// Queues a frame without waiting. Returns false if the connection is
    /// closing or its queue was full, in frames or in bytes (in which case
    /// it is now closing). A frame always fits a queue with nothing waiting.
    pub(crate) fn send(&self, frame: Frame) -> bool {
        let link = &*self.link;
        let mut queue = lock(&link.queue);
        if link.closing.load(Ordering::Acquire) {
            return false;
        }
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        let frames = link.backlog_frames.load(Ordering::Acquire);
        let bytes = link.backlog_bytes.load(Ordering::Acquire);
        if frames > 0 && (frames >= link.capacity || bytes.saturating_add(len) > link.max_bytes) {
            drop(queue);
            // Counted by the connection's task when it ends (`conn`).
            if self.close(CloseReason::SLOW_CONSUMER) {
                tracing::warn!(
                    client = %self.id(),
                    frames,
                    bytes,
                    "slow consumer: outbound queue full, disconnecting"
                );
            }
            return false;
        }
        // Counted under the queue's lock, so two senders cannot both pass
        // the check with the last place.
        link.backlog_frames.fetch_add(1, Ordering::AcqRel);
        link.backlog_bytes.fetch_add(len, Ordering::AcqRel);
        let was_empty = queue.frames.is_empty();
        queue.frames.push(frame);
        drop(queue);
        // A non-empty queue has already woken the task (or will, at the end
        // of a batch), which empties the queue before it sleeps again.
        if was_empty {
            wake_or_defer(self);
        }
        true
    }

    /// Queues a message for this peer alone, counted as delivered.
    pub(crate) fn reply(&self, msg: &ServerMessage, stats: &Stats) -> bool {
        let frame = encode(msg);
        let len = frame.len();
        let sent = self.send(frame);
        if sent {
            stats.delivered.inc();
            stats.bytes_out.inc_by(len as u64);
        }
        sent
    }

    /// Asks the connection to close. Returns true if this call decided the
    /// reason, false if the connection was already closing.
    pub(crate) fn close(&self, reason: CloseReason) -> bool {
        let first = {
            let mut queue = lock(&self.link.queue);
            let first = queue.reason.is_none();
            if first {
                queue.reason = Some(reason);
            }
            first
        };
        self.link.closing.store(true, Ordering::Release);
        self.link.waker.wake();
        first
    }

    /// The task wrote (or dropped) these frames: they no longer count
    /// against the queue's limits.
    pub(crate) fn written(&self, frames: u32, bytes: usize) {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        // Saturating: frames the task writes itself (the close frame) were
        // never counted.
        let _ = self
            .link
            .backlog_frames
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(frames)));
        let _ = self
            .link
            .backlog_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(bytes)));
    }

    /// Whether so much waits to be written that the connection should stop
    /// reading (and so stop making replies) until its client catches up:
    /// half of either limit.
    pub(crate) fn backlogged(&self) -> bool {
        let link = &*self.link;
        link.backlog_frames.load(Ordering::Acquire) >= link.capacity / 2
            || link.backlog_bytes.load(Ordering::Acquire) >= link.max_bytes / 2
    }

    /// Whether the connection has been asked to close.
    pub(crate) fn is_closing(&self) -> bool {
        self.link.closing.load(Ordering::Acquire)
    }

    /// The close frame to send, once the connection is closing (shutdown
    /// when nobody recorded a reason).
    pub(crate) fn close_reason(&self) -> CloseReason {
        lock(&self.link.queue).reason.clone().unwrap_or(CloseReason::GOING_AWAY)
    }

    /// Registers the connection task's waker, before it looks at the queue
    /// and the close switch.
    pub(crate) fn register(&self, waker: &Waker) {
        self.link.waker.register(waker);
    }

    /// Moves every queued frame into `out`, which must be empty: `out`
    /// takes the queue's buffer (without copying it), and the queue starts
    /// unallocated again.
    pub(crate) fn take_queued(&self, out: &mut VecDeque<Frame>) {
        debug_assert!(out.is_empty());
        let frames = std::mem::take(&mut lock(&self.link.queue).frames);
        *out = VecDeque::from(frames);
    }

    /// Discards what is queued; later sends are refused.
    pub(crate) fn discard_queued(&self) {
        self.link.closing.store(true, Ordering::Release);
        drop(std::mem::take(&mut lock(&self.link.queue).frames));
    }
}

thread_local! {
    /// The peers whose first frame this thread queued inside
    /// [`with_deferred_wakes`], to wake when it ends; `None` outside.
    static DEFERRED: RefCell<Option<Vec<Peer>>> = const { RefCell::new(None) };
}

/// Wakes `peer`'s task now, or at the end of this thread's batch.
fn wake_or_defer(peer: &Peer) {
    let deferred = DEFERRED.with_borrow_mut(|deferred| match deferred {
        Some(peers) => {
            peers.push(peer.clone());
            true
        }
        None => false,
    });
    if !deferred {
        peer.link.waker.wake();
    }
}

/// Runs `batch` (the deliveries of one history commit), holding the
/// wake-ups of the connections it queues frames for until it is done. A
/// connection's task woken at the first of its frames would write that one
/// at once, while the next ones of the same batch are still being queued:
/// woken at the end, it writes all of them in one system call. The wait is
/// the time to queue one batch (microseconds per message), on a path that
/// has already waited for the disk. Nested calls join the outer batch.
pub(crate) fn with_deferred_wakes(batch: &mut dyn FnMut()) {
    /// Wakes what was held even if the batch unwinds.
    struct Flush;
    impl Drop for Flush {
        fn drop(&mut self) {
            if let Some(peers) = DEFERRED.with_borrow_mut(Option::take) {
                for peer in peers {
                    peer.link.waker.wake();
                }
            }
        }
    }
    if DEFERRED.with_borrow(Option::is_some) {
        return batch();
    }
    DEFERRED.set(Some(Vec::new()));
    let _flush = Flush;
    batch();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::take;

    fn text(n: usize) -> Frame {
        ws::encode(ws::OpCode::Text, &vec![b'x'; n])
    }

    #[test]
    fn a_queue_full_in_frames_closes_the_peer_as_a_slow_consumer() {
        let peer = Peer::new(3, 1 << 20, Deflate::OFF);
        for _ in 0..3 {
            assert!(peer.send(text(1)));
        }
        assert!(!peer.is_closing());
        assert!(!peer.send(text(1)), "the fourth frame does not fit");
        assert!(peer.is_closing());
        assert!(peer.close_reason().is_slow_consumer());
        // Nothing is queued once closing, whatever the room.
        take(&peer);
        assert!(!peer.send(text(1)));
    }

    #[test]
    fn a_queue_full_in_bytes_closes_the_peer_and_one_frame_always_fits_an_empty_queue() {
        let peer = Peer::new(100, 1000, Deflate::OFF);
        // Larger than the whole budget, but the queue is empty.
        assert!(peer.send(text(5000)));
        assert!(peer.backlogged());
        // Written: the budget is free again.
        take(&peer);
        assert!(!peer.backlogged());
        assert!(peer.send(text(400)));
        assert!(peer.send(text(400)));
        assert!(!peer.send(text(400)), "1,200 bytes do not fit 1,000");
        assert!(peer.close_reason().is_slow_consumer());
    }

    #[test]
    fn a_link_fits_in_144_bytes_of_heap() {
        // With the `Arc`'s two counts, 136 bytes: glibc's 144-byte chunk.
        // The deflate byte sits in what was padding after `closing`; the
        // close reason shares the queue's lock.
        assert!(std::mem::size_of::<Link>() <= 120, "{}", std::mem::size_of::<Link>());
        let peer = Peer::new(8, 1 << 10, Deflate::FULL);
        assert_eq!(peer.deflate(), Deflate::FULL);
    }

    /// A waker that counts its wake-ups.
    struct Count(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_batch_wakes_each_connection_once_at_its_end() {
        let count = Arc::new(Count(0.into()));
        let peers = [Peer::new(8, 1 << 10, Deflate::OFF), Peer::new(8, 1 << 10, Deflate::OFF)];
        for peer in &peers {
            peer.register(&Waker::from(count.clone()));
        }
        let woken = || count.0.load(Ordering::SeqCst);
        with_deferred_wakes(&mut || {
            for peer in peers.iter().chain(&peers) {
                assert!(peer.send(text(1)));
            }
            with_deferred_wakes(&mut || assert!(peers[0].send(text(1))));
            assert_eq!(woken(), 0, "nothing is woken inside the batch, nested or not");
        });
        assert_eq!(woken(), 2, "each connection once, when the batch ends");
        // Outside a batch, the first frame wakes at once (the task, having
        // emptied its queue, registered its waker again).
        take(&peers[0]);
        peers[0].register(&Waker::from(count.clone()));
        assert!(peers[0].send(text(1)));
        assert_eq!(woken(), 3);
    }

    #[test]
    fn the_first_close_reason_wins_and_shutdown_is_the_default() {
        let peer = Peer::new(8, 1 << 10, Deflate::OFF);
        assert_eq!(peer.close_reason().code, CloseCode::AWAY);
        assert!(peer.close(CloseReason::FLOODING));
        assert!(!peer.close(CloseReason::SLOW_CONSUMER));
        assert_eq!(peer.close_reason().reason, "Rate limit exceeded");
    }
}
