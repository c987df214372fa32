//! One WebSocket connection, driven by a single task.
//!
//! The task owns the socket and does everything for it: it reads and
//! decodes frames (`ws`), hands messages to the endpoint's [`Handler`],
//! answers pings, records pongs for the heartbeat sweeper (`sweeper`), runs the
//! handler's deadline (when it has one) on a timer, and writes what others
//! queued for it.
//!
//! Writing: the [`Peer`]'s queue holds complete frames, shared by reference
//! count with the other recipients of a broadcast. The task takes the whole
//! queue at once and writes it with vectored writes, so a burst of
//! broadcasts costs one system call and no copy. While a handler waits (a
//! disk write, an upload's rate limit), the task goes on writing.
//!
//! Memory: an idle connection holds no buffer. Reads go through a buffer on
//! the task's stack; the decoder keeps only what is left of a frame that has
//! not fully arrived, and the queue's deque is released once written.
//!
//! Closing: whoever closes first records the reason on the peer. The task
//! then sends what is queued if the reason says so, the close frame, waits
//! briefly for the client's close frame when it closed first, and shuts the
//! socket, all within `close_timeout`, so a peer that stopped reading cannot
//! hold the task. A connection that does not answer a heartbeat ping in time
//! is dropped without a closing handshake and counted as reaped.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hubbub_heartbeat::decode_token;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::ws::{CloseCode, Text};

use crate::Shared;
use crate::connlog::{InConnection, LogContext};
use crate::deflate::Deflate;
use crate::link::{CloseReason, Frame, Peer};
use crate::metrics::code_label;
use crate::ws::{self, Decoder, Incoming, ReadError};

/// The byte stream a connection runs on: the upgraded socket in the
/// server, an in-memory pipe (`tokio::io::duplex`) in tests.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for S {}

/// What an endpoint does with the frames its client sends.
pub(crate) trait Handler: Send {
    /// A text frame arrived.
    fn on_text(&mut self, text: Text) -> impl Future<Output = ()> + Send;
    /// A binary frame arrived.
    fn on_binary(&mut self, data: Bytes) -> impl Future<Output = ()> + Send;
    /// The connection is over (whatever the reason); release what it holds.
    fn on_close(&mut self);
    /// When [`Handler::on_deadline`] should next run, if ever.
    fn deadline(&self) -> Option<Instant> {
        None
    }
    /// The deadline passed.
    fn on_deadline(&mut self) {}
}

/// Which endpoint a connection came in on, for logs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Endpoint {
    /// `/ws/chat` and `/`.
    Chat,
    /// `/ws/notifications`.
    Notifications,
    /// `/ws/echo`.
    Echo,
}

impl Endpoint {
    /// The endpoint's name in logs and metrics.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Notifications => "notifications",
            Self::Echo => "echo",
        }
    }
}

/// Sets up a connection and returns the future that runs it to its end.
/// `early` is what the client sent before the socket was handed over (read
/// first), `deflate` what the handshake negotiated. `make_handler` builds the
/// endpoint's handler once the connection's [`Peer`] exists (a chat session
/// greets its client there).
///
/// Everything is built here, synchronously, and moved into one `async`
/// block that uses it in place: an `async fn` would keep a second copy of
/// its arguments in its state for the connection's whole life.
///
/// What the connection logs, here and in its task, carries its id, address,
/// endpoint and user (`connlog`).
pub(crate) fn run<S: Stream, H: Handler, M: FnOnce(Peer) -> H>(
    socket: S,
    early: &[u8],
    shared: Arc<Shared>,
    endpoint: Endpoint,
    ip: IpAddr,
    deflate: Deflate,
    make_handler: M,
) -> impl Future<Output = ()> + use<S, H, M> {
    let limits = &shared.config.websocket;
    let peer = Peer::new(limits.outbound_queue, limits.outbound_queue_bytes, deflate);
    let mut log = LogContext::new(&peer, ip, endpoint);
    let (wire, handler) = log.scope(|| {
        shared.hub.stats.accepted.with_label_values(&[endpoint.name()]).inc();
        shared.hub.stats.open.with_label_values(&[endpoint.name()]).inc();
        tracing::info!("connected");
        let limits = &shared.config.websocket;
        let mut decoder = Decoder::new(
            ws::FrameLimits { max_frame: limits.max_frame_bytes, max_message: limits.max_message_bytes },
            deflate,
        );
        decoder.preload(early);
        let wire = Wire { io: socket, decoder, sending: VecDeque::new(), offset: 0 };
        (wire, make_handler(peer.clone()))
    });
    InConnection::new(log, drive(wire, handler, shared, peer, endpoint))
}

/// Bytes read from the socket at a time, into a buffer on the stack.
const READ_CHUNK: usize = 8192;
/// Most frames handed to one vectored write.
const MAX_SLICES: usize = 64;

/// What woke the connection's task.
enum Event {
    /// The peer was asked to close (by the hub, a handler, a reaper, or
    /// the sweeper at shutdown).
    Closing,
    /// The handler's deadline passed.
    Timer,
    /// Writing failed: the transport is gone.
    WriteFailed(io::Error),
    /// A message, the end of the stream (`None`), or a read failure.
    Read(Result<Option<Incoming>, ReadFailure>),
}

/// Why reading stopped.
enum ReadFailure {
    /// The client broke the protocol.
    Ws(ReadError),
    /// The transport failed.
    Io(io::Error),
}

impl From<ReadError> for ReadFailure {
    fn from(err: ReadError) -> Self {
        Self::Ws(err)
    }
}

/// The socket side of a connection: framing, reading and writing.
struct Wire<S> {
    /// The byte stream.
    io: S,
    decoder: Decoder,
    /// Frames taken from the peer's queue, being written.
    sending: VecDeque<Frame>,
    /// Bytes of `sending[0]` already written.
    offset: usize,
}

impl<S: Stream> Wire<S> {
    /// Polls everything the idle connection waits for, in priority order.
    fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
        peer: &Peer,
        min_bytes: usize,
        timer: Option<Pin<&mut Sleep>>,
    ) -> Poll<Event> {
        peer.register(cx.waker());
        if peer.is_closing() {
            return Poll::Ready(Event::Closing);
        }
        if timer.is_some_and(|timer| timer.poll(cx).is_ready()) {
            return Poll::Ready(Event::Timer);
        }
        match self.poll_write(cx, peer, min_bytes) {
            Poll::Ready(Err(err)) => return Poll::Ready(Event::WriteFailed(err)),
            // Reading waits while much is left to write: every message read
            // may queue a reply, and a client that sends faster than it reads
            // (or the runtime's budget pausing our writes while the decoder
            // still holds frames) must not make the queue grow until the
            // connection is dropped as a slow consumer. The socket's
            // readiness or the budget's wake-up brings the task back.
            Poll::Pending if peer.backlogged() => return Poll::Pending,
            _ => {}
        }
        self.poll_read(cx).map(Event::Read)
    }

    /// Writes everything queued, then flushes. Ready once nothing is left.
    /// Each frame goes in the form the peer negotiated: compressed when it
    /// asked for permessage-deflate and the message has at least
    /// `min_bytes` (`Frame::wire`).
    fn poll_write(&mut self, cx: &mut Context<'_>, peer: &Peer, min_bytes: usize) -> Poll<io::Result<()>> {
        let deflate = peer.deflate();
        loop {
            if self.sending.is_empty() {
                // Release a deque that grew for a burst, then take the queue.
                if self.sending.capacity() > 0 {
                    self.sending = VecDeque::new();
                }
                peer.take_queued(&mut self.sending);
                if self.sending.is_empty() {
                    return Pin::new(&mut self.io).poll_flush(cx);
                }
            }
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut count = 0;
            for (slot, frame) in slices.iter_mut().zip(&self.sending) {
                let bytes = frame.wire(deflate, min_bytes);
                *slot = IoSlice::new(if count == 0 { &bytes[self.offset..] } else { bytes });
                count += 1;
            }
            let written = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(written, peer, min_bytes);
        }
    }

    /// Drops what a write consumed, and tells the peer's queue limits
    /// (which count plain frames, as they were queued).
    fn advance(&mut self, written: usize, peer: &Peer, min_bytes: usize) {
        let deflate = peer.deflate();
        let mut left_over = written;
        let mut frames = 0;
        let mut bytes = 0;
        while let Some(front) = self.sending.front() {
            let left = front.wire(deflate, min_bytes).len() - self.offset;
            if left_over < left {
                self.offset += left_over;
                break;
            }
            left_over -= left;
            self.offset = 0;
            frames += 1;
            bytes += front.len();
            self.sending.pop_front();
        }
        if frames > 0 {
            peer.written(frames, bytes);
        }
    }

    /// Reads until a message is complete: `None` at the end of the stream.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Incoming>, ReadFailure>> {
        loop {
            if self.decoder.has_buffered()
                && let Some(message) = self.decoder.next_buffered()?
            {
                return Poll::Ready(Ok(Some(message)));
            }
            // The rest of a large frame is read straight into its buffer,
            // and not a byte further.
            if self.decoder.has_buffered()
                && let Some(remaining) = self.decoder.large_frame_remaining(READ_CHUNK)
            {
                let mut limited = bytes::BufMut::limit(self.decoder.buffer(), remaining);
                let read = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut limited))
                    .map_err(ReadFailure::Io)?;
                if read == 0 {
                    return Poll::Ready(Ok(None));
                }
                continue;
            }
            let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut buf = ReadBuf::uninit(&mut chunk);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf)).map_err(ReadFailure::Io)?;
            let filled = buf.filled_mut();
            if filled.is_empty() {
                return Poll::Ready(Ok(None));
            }
            if let Some(message) = self.decoder.feed(filled)? {
                return Poll::Ready(Ok(Some(message)));
            }
        }
    }

    /// Writes everything queued (or left to write) to the socket.
    async fn write_all(&mut self, peer: &Peer, min_bytes: usize) -> io::Result<()> {
        poll_fn(|cx| self.poll_write(cx, peer, min_bytes)).await
    }
}

/// Hands a text or binary message to the handler.
async fn dispatch<H: Handler>(handler: &mut H, message: Incoming) {
    match message {
        Incoming::Text(text) => handler.on_text(text).await,
        Incoming::Binary(data) => handler.on_binary(data).await,
        Incoming::Ping(_) | Incoming::Pong(_) | Incoming::Close(_) => {}
    }
}

/// Runs a handler's future to its end while the connection goes on writing.
/// False if the connection must stop meanwhile.
///
/// A plain function returning the `poll_fn`, not an `async fn`: an
/// `async fn` would keep its arguments and the closure's copies of them,
/// and this future is part of every connection's task (`drive`).
fn handle<'a, S: Stream, F: Future<Output = ()> + 'a>(
    wire: &'a mut Wire<S>,
    peer: &'a Peer,
    min_bytes: usize,
    mut handled: Pin<Box<F>>,
) -> impl Future<Output = bool> + 'a {
    poll_fn(move |cx| {
        peer.register(cx.waker());
        // A closing connection (shutdown included) does not wait for its
        // handler.
        if peer.is_closing() {
            return Poll::Ready(false);
        }
        if handled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(true);
        }
        if let Poll::Ready(Err(err)) = wire.poll_write(cx, peer, min_bytes) {
            tracing::debug!(cause = %err, "write failed");
            peer.close(CloseReason::ABNORMAL);
            return Poll::Ready(false);
        }
        Poll::Pending
    })
}

#[expect(clippy::manual_async_fn, reason = "an async fn would store its arguments twice; see `run`")]
fn drive<S: Stream, H: Handler>(
    mut wire: Wire<S>,
    mut handler: H,
    shared: Arc<Shared>,
    peer: Peer,
    endpoint: Endpoint,
) -> impl Future<Output = ()> {
    // The state of this block is most of a connection's memory for its whole
    // life: what is live across an `.await` here is kept small on purpose
    // (an event is taken apart before any handler runs; see `handle`).
    async move {
        let beat = shared.beats.insert(&peer);
        // Shutdown closes every registered connection (`sweeper`); one that
        // registered after that sees the token. No connection waits on the
        // token itself: each poll of it would take a lock all connections
        // share.
        if shared.shutdown.is_cancelled() {
            peer.close(CloseReason::GOING_AWAY);
        }
        // Boxed, and only while the handler has a deadline (chat waiting
        // for a token, or a token's expiry): most connections need no timer.
        let mut timer: Option<Pin<Box<Sleep>>> =
            handler.deadline().map(|at| Box::pin(tokio::time::sleep_until(at)));

        // The client's close frame, if it sent one: `Some(None)` for a close
        // frame without a code.
        let mut client_close: Option<Option<CloseCode>> = None;
        // Set when the client broke the protocol: the connection is failed, so
        // nothing more is read from it, not even a close frame.
        let mut failed = false;
        loop {
            let carry_on = {
                // Decided without an `.await`, so the event is not kept while the
                // handler runs.
                let event = poll_fn(|cx| {
                    wire.poll_event(
                        cx,
                        &peer,
                        shared.config.websocket.compression_min_bytes,
                        timer.as_mut().map(Pin::as_mut),
                    )
                });
                let handled = match event.await {
                    Event::Closing => break,
                    Event::Timer => {
                        let now = Instant::now();
                        if handler.deadline().is_some_and(|at| at <= now) {
                            handler.on_deadline();
                        }
                        None
                    }
                    Event::WriteFailed(err) => {
                        tracing::debug!(cause = %err, "write failed");
                        peer.close(CloseReason::ABNORMAL);
                        break;
                    }
                    Event::Read(Ok(Some(message))) => match message {
                        Incoming::Text(_) | Incoming::Binary(_) => {
                            let stats = &shared.hub.stats;
                            stats.received.inc();
                            stats.bytes_in.inc_by(message.data_len() as u64);
                            Some(Box::pin(dispatch(&mut handler, message)))
                        }
                        Incoming::Ping(payload) => {
                            peer.send(ws::encode(ws::OpCode::Pong, &payload));
                            None
                        }
                        Incoming::Pong(payload) => {
                            if let Some(token) = decode_token(&payload) {
                                let rtt = shared.beats.on_pong(beat, token);
                                tracing::trace!(token, ?rtt, "heartbeat pong");
                            }
                            None
                        }
                        Incoming::Close(frame) => {
                            client_close = Some(frame.map(|(code, _)| code));
                            peer.close(CloseReason {
                                code: CloseCode::NORMAL,
                                reason: "",
                                drain_queue: false,
                            });
                            break;
                        }
                    },
                    Event::Read(Ok(None)) => {
                        // The client dropped TCP without a close frame.
                        peer.close(CloseReason::ABNORMAL);
                        break;
                    }
                    Event::Read(Err(ReadFailure::Io(err))) => {
                        tracing::debug!(cause = %err, "read failed");
                        peer.close(CloseReason::ABNORMAL);
                        break;
                    }
                    Event::Read(Err(ReadFailure::Ws(err))) => {
                        tracing::debug!(cause = %err, "bad frame from the client");
                        // Replies to what the client sent before its bad frame are
                        // already queued; they go out before the close frame (found
                        // by Autobahn 3.*, 4.*, 5.15).
                        peer.close(CloseReason {
                            code: err.close_code(),
                            reason: err.close_reason(),
                            drain_queue: true,
                        });
                        failed = true;
                        break;
                    }
                };
                match handled {
                    Some(handled) => {
                        handle(&mut wire, &peer, shared.config.websocket.compression_min_bytes, handled).await
                    }
                    None => true,
                }
            };
            if !carry_on {
                break;
            }
            match (handler.deadline(), timer.as_mut()) {
                (None, _) => timer = None,
                (Some(at), Some(timer)) if timer.deadline() != at => timer.as_mut().reset(at),
                (Some(_), Some(_)) => {}
                (Some(at), None) => timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }

        shared.beats.remove(beat);
        let stats = &shared.hub.stats;
        // Counted here rather than where the queue overflowed, so that the
        // code that queues frames needs no metrics; before `on_close`, so a
        // room hears of the departure after the count moved.
        if peer.close_reason().is_slow_consumer() {
            stats.slow_consumers.inc();
        }
        handler.on_close();
        drop(handler);
        // Made in a block, so the reason is not kept while the handshake runs.
        let (code, reason, closing) = {
            // With no reason recorded, the server is shutting down; recording
            // it now also refuses anything queued from here on.
            let ours = peer.close_reason();
            peer.close(ours.clone());
            let code = client_close.map_or(ours.code, |code| code.unwrap_or(CloseCode::NO_STATUS)).get();
            let reason = ours.reason;
            // 1006 that the client did not send: the transport is gone, or
            // the peer is dead; nothing is sent.
            let vanished = client_close.is_none() && ours.code == CloseCode::ABNORMAL;
            let min_bytes = shared.config.websocket.compression_min_bytes;
            // Boxed: the handshake runs once, at the end, and its state would
            // otherwise enlarge every connection's task for its whole life.
            let closing = (!vanished).then(|| {
                Box::pin(tokio::time::timeout(
                    shared.config.close_timeout,
                    close(&mut wire, &peer, min_bytes, ours, client_close, failed),
                ))
            });
            (code, reason, closing)
        };
        if let Some(closing) = closing
            && closing.await.is_err()
        {
            tracing::debug!("closing handshake not completed in time");
        }
        let stats = &shared.hub.stats;
        stats.open.with_label_values(&[endpoint.name()]).dec();
        stats.closed.with_label_values(&[code_label(code)]).inc();
        tracing::info!(code, by_peer = client_close.is_some(), reason, "disconnected");
    }
}

/// The closing handshake: what is queued (if the reason says so), the close
/// frame, then, when the server closed first on a healthy connection, the
/// client's close frame; then the server closes TCP, as RFC 6455 prefers.
async fn close<S: Stream>(
    wire: &mut Wire<S>,
    peer: &Peer,
    min_bytes: usize,
    ours: CloseReason,
    client_close: Option<Option<CloseCode>>,
    failed: bool,
) {
    let frame = match client_close {
        // Echo the client's code, as RFC 6455 suggests.
        Some(Some(code)) => ws::encode_close(code, ""),
        Some(None) => ws::encode(ws::OpCode::Close, &[]),
        None => ours.frame(),
    };
    if client_close.is_none() && ours.drain_queue {
        if wire.write_all(peer, min_bytes).await.is_err() {
            return;
        }
    } else {
        peer.discard_queued();
        // A frame cut short would corrupt the stream: finish it, drop the rest.
        wire.sending.truncate(usize::from(wire.offset > 0));
    }
    wire.sending.push_back(frame);
    if wire.write_all(peer, min_bytes).await.is_err() {
        return;
    }
    if client_close.is_none() && !failed {
        // Whatever the client still sends before its close frame is dropped.
        loop {
            match poll_fn(|cx| wire.poll_read(cx)).await {
                Ok(Some(Incoming::Close(_)) | None) | Err(_) => break,
                Ok(Some(_)) => {}
            }
        }
    }
    let _ = poll_fn(|cx| Pin::new(&mut wire.io).poll_shutdown(cx)).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream, duplex};

    use super::*;
    use crate::Config;
    use crate::echo::Echo;
    use crate::testing::{frames, shared};

    /// A client frame: FIN, `opcode`, masked with an all-zero key.
    fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        match payload.len() {
            len @ 0..=125 => out.push(0x80 | len as u8),
            len => {
                out.push(0x80 | 126);
                out.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
            }
        }
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(payload);
        out
    }

    /// Starts an echo connection on an in-memory pipe; returns the client's
    /// end, the connection's peer handle and its task.
    fn echo(shared: &Arc<Shared>, pipe: usize) -> (DuplexStream, Peer, tokio::task::JoinHandle<()>) {
        let (client, server) = duplex(pipe);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let (handle, peer) = std::sync::mpsc::channel();
        let state = shared.clone();
        let connection = run(server, &[], shared.clone(), Endpoint::Echo, ip, Deflate::OFF, move |p| {
            handle.send(p.clone()).unwrap();
            Echo::new(state, p, ip)
        });
        (client, peer.recv().unwrap(), tokio::spawn(connection))
    }

    /// Reads frames until `done` accepts what has been read; returns every
    /// frame read.
    async fn read_until(
        client: &mut DuplexStream,
        done: impl Fn(&[(u8, Vec<u8>)]) -> bool,
    ) -> Vec<(u8, Vec<u8>)> {
        let mut bytes = Vec::new();
        let mut buf = vec![0; 64 << 10];
        loop {
            let got = frames(&bytes);
            if done(&got) {
                return got;
            }
            let n =
                tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "the connection ended after {} frames", got.len());
            bytes.extend_from_slice(&buf[..n]);
        }
    }

    fn has(op: u8) -> impl Fn(&[(u8, Vec<u8>)]) -> bool {
        move |got| got.iter().any(|(o, _)| *o == op)
    }

    #[tokio::test]
    async fn echo_and_shutdown_over_an_in_memory_pipe() {
        let shared = shared(Config::default());
        // What tells connections of shutdown.
        tokio::spawn(crate::sweeper::sweeper(shared.clone()));
        let (mut client, _peer, task) = echo(&shared, 64 << 10);
        client.write_all(&masked(0x1, b"hello")).await.unwrap();
        let got = read_until(&mut client, has(0x1)).await;
        assert_eq!(got, [(0x1, b"hello".to_vec())]);
        shared.shutdown.cancel();
        let got = read_until(&mut client, has(0x8)).await;
        let (_, close) = got.last().unwrap();
        assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1001);
        // The client answers the close; the task ends.
        client.write_all(&masked(0x8, &1001_u16.to_be_bytes())).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_burst_of_pings_from_a_reading_client_is_answered_in_full() {
        let shared = shared(Config::default());
        let (mut client, peer, _task) = echo(&shared, 64 << 10);
        const PINGS: usize = 3_000;
        let burst: Vec<u8> = (0..PINGS).flat_map(|_| masked(0x9, b"")).collect();
        // 18 KB: the pipe takes it whole, so the decoder holds many frames
        // at once while replies are written.
        client.write_all(&burst).await.unwrap();
        let got = read_until(&mut client, |got| got.iter().filter(|(o, _)| *o == 0xA).count() == PINGS).await;
        assert!(got.iter().all(|(o, _)| *o == 0xA), "only pongs, no close");
        assert!(!peer.is_closing());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_no_longer_read_then_dropped_as_a_slow_consumer() {
        let mut config = Config::default();
        config.rate_limit.enabled = false;
        config.websocket.outbound_queue_bytes = 16 << 10;
        config.rate_limit.lobby_burst_bytes = 8 << 10;
        let shared = shared(config);
        let (mut client, peer, task) = echo(&shared, 4 << 10);
        // The client writes echo frames and never reads: once the pipe and
        // half the queue are full, the server stops reading, so the
        // client's writes stall instead of the queue growing.
        let frame = masked(0x2, &[7; 1000]);
        let stalled = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                client.write_all(&frame).await.unwrap();
            }
        })
        .await;
        assert!(stalled.is_err(), "the server kept reading");
        assert!(!peer.is_closing(), "backpressure, not a drop");
        // Others' frames (a broadcast) still arrive: past the byte limit the
        // connection is closed as a slow consumer and its task ends.
        while peer.send(crate::ws::encode(crate::ws::OpCode::Text, &[b'x'; 1000])) {}
        assert!(peer.close_reason().is_slow_consumer());
        tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
        assert_eq!(shared.hub.stats.slow_consumers.get(), 1);
    }
}
