//! One WebSocket connection: a reader loop that hands frames to an endpoint
//! handler, and a writer task that drains the connection's bounded queue.
//!
//! The writer feeds every frame waiting in the queue into tungstenite's write
//! buffer and flushes once per batch, so a burst of broadcasts costs one
//! socket write, not one per message. Either side can close the connection
//! through the peer's cancellation token; the close frame is always written
//! by the writer, with a time limit, so a peer that stopped reading cannot
//! hold its tasks forever.
//!
//! The reader loop also drives the connection's heartbeat: one timer per
//! connection, reset to the next deadline, pings sent through the same queue
//! as everything else. A connection that does not answer a ping in time is
//! dropped without a closing handshake and counted as reaped.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use hubbub_heartbeat::{Action, Monitor, decode_token, encode_token};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Shared;
use crate::hub::{CloseReason, Mailbox, Peer};
use crate::metrics::code_label;
use crate::upgrade::Socket;

/// What an endpoint does with the frames its client sends.
pub(crate) trait Handler: Send {
    /// A text frame arrived.
    fn on_text(&mut self, text: Utf8Bytes) -> impl Future<Output = ()> + Send;
    /// A binary frame arrived.
    fn on_binary(&mut self, data: Bytes) -> impl Future<Output = ()> + Send;
    /// The connection is over (whatever the reason); release what it holds.
    fn on_close(&mut self);
    /// When [`Handler::on_deadline`] should next run, if ever.
    fn deadline(&self) -> Option<tokio::time::Instant> {
        None
    }
    /// The deadline passed.
    fn on_deadline(&mut self) {}
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
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
    fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Notifications => "notifications",
            Self::Echo => "echo",
        }
    }
}

/// Runs a connection to its end. `make_handler` builds the endpoint's handler
/// once the connection's [`Peer`] exists.
pub(crate) async fn run<H: Handler>(
    socket: Socket,
    shared: Arc<Shared>,
    endpoint: Endpoint,
    ip: IpAddr,
    make_handler: impl FnOnce(Peer) -> H,
) {
    let (peer, mailbox) = Peer::new(shared.config.websocket.outbound_queue, &shared.shutdown);
    let span = tracing::info_span!(
        "conn",
        client = %peer.id,
        peer = %ip,
        endpoint = endpoint.name(),
        user = tracing::field::Empty
    );
    drive(socket, shared, peer, mailbox, endpoint, make_handler).instrument(span).await;
}

async fn drive<H: Handler>(
    socket: Socket,
    shared: Arc<Shared>,
    peer: Peer,
    mailbox: Mailbox,
    endpoint: Endpoint,
    make_handler: impl FnOnce(Peer) -> H,
) {
    let stats = &shared.hub.stats;
    stats.accepted.with_label_values(&[endpoint.name()]).inc();
    let open = stats.open.with_label_values(&[endpoint.name()]);
    open.inc();
    tracing::info!("connected");

    let close_timeout = shared.config.close_timeout;
    let batch_limit = shared.config.websocket.outbound_queue;
    let (sink, mut stream) = socket.split();
    let Mailbox { rx, token } = mailbox;
    let writer = tokio::spawn(
        write_loop(sink, rx, token.clone(), peer.clone(), close_timeout, batch_limit).in_current_span(),
    );
    let mut handler = make_handler(peer.clone());

    // The code the peer closed with, if it sent a close frame.
    let mut peer_code: Option<CloseCode> = None;
    let mut heartbeat = Monitor::new(shared.config.heartbeat.into());
    loop {
        tokio::select! {
            biased;
            () = token.cancelled() => break,
            () = sleep_until(handler.deadline()) => handler.on_deadline(),
            action = heartbeat.next_action() => match action {
                Action::SendPing(token) => {
                    tracing::debug!(token, "heartbeat ping");
                    peer.send(Message::Ping(Bytes::copy_from_slice(&encode_token(token))), stats);
                }
                Action::PeerDead => {
                    stats.dead_reaped.inc();
                    tracing::info!(timeout = ?shared.config.heartbeat.timeout, "dead connection: no pong in time");
                    peer.close(CloseReason { code: CloseCode::Abnormal, reason: "heartbeat timeout", drain_queue: false });
                    break;
                }
            },
            next = stream.next() => match next {
                // A handler may wait (a disk write, an upload's rate limit);
                // closing the connection does not wait for it.
                Some(Ok(frame @ (Message::Text(_) | Message::Binary(_)))) => {
                    stats.received.inc();
                    stats.bytes_in.inc_by(frame.len() as u64);
                    let handled = async {
                        match frame {
                            Message::Text(text) => handler.on_text(text).await,
                            Message::Binary(data) => handler.on_binary(data).await,
                            _ => {}
                        }
                    };
                    tokio::select! {
                        biased;
                        () = token.cancelled() => break,
                        () = handled => {}
                    }
                }
                Some(Ok(Message::Pong(payload))) => {
                    if let Some(token) = decode_token(&payload) {
                        heartbeat.on_pong(token);
                        if let Some(latency) = heartbeat.latency() {
                            tracing::debug!(token, last = ?latency.last, smoothed = ?latency.smoothed, "heartbeat pong");
                        }
                    }
                }
                // tungstenite answers pings itself.
                Some(Ok(Message::Ping(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map_or(CloseCode::Status, |f| f.code);
                    peer_code = Some(code);
                    // Our writer's close completes the handshake tungstenite
                    // began by queueing its reply.
                    peer.close(CloseReason { code: CloseCode::Normal, reason: "", drain_queue: false });
                    break;
                }
                Some(Err(err)) => {
                    peer.close(close_for(&err));
                    tracing::debug!(cause = %err, "read failed");
                    break;
                }
                None => {
                    peer_code = Some(CloseCode::Abnormal);
                    peer.close(CloseReason { code: CloseCode::Abnormal, reason: "", drain_queue: false });
                    break;
                }
            },
        }
    }

    // Every way out of the loop has cancelled the token, so the writer is
    // already closing; with no reason recorded, the server is shutting down.
    handler.on_close();
    drop(handler);
    let ours = peer.close_reason();
    if writer.await.is_err() {
        tracing::error!("connection writer panicked");
    }
    // When we closed first, give the peer a moment to answer our close frame
    // so the handshake completes; whatever it still sends is discarded. A
    // dead or vanished peer gets no handshake and no wait.
    if peer_code.is_none() && ours.code != CloseCode::Abnormal {
        let _ = tokio::time::timeout(close_timeout, async { while stream.next().await.is_some() {} }).await;
    }
    let code = u16::from(peer_code.unwrap_or(ours.code));
    open.dec();
    stats.closed.with_label_values(&[code_label(code)]).inc();
    tracing::info!(code, by_peer = peer_code.is_some(), reason = ours.reason, "disconnected");
}

/// The close frame that answers a read error.
fn close_for(err: &WsError) -> CloseReason {
    let (code, reason) = match err {
        // The peer dropped TCP without a close frame: nothing left to tell it.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => (CloseCode::Abnormal, ""),
        WsError::Capacity(_) => (CloseCode::Size, "Message too big"),
        WsError::Protocol(_) => (CloseCode::Protocol, "Protocol error"),
        WsError::Utf8(_) => (CloseCode::Invalid, "Text frame is not valid UTF-8"),
        _ => (CloseCode::Abnormal, ""),
    };
    // Replies to what the peer sent before its bad frame are already queued;
    // they go out before the close frame (found by Autobahn 3.*, 4.*, 5.15).
    CloseReason { code, reason, drain_queue: code != CloseCode::Abnormal }
}

/// Drains the queue into the socket, one flush per batch, until the token is
/// cancelled; then sends the close frame (after what is queued, on shutdown).
async fn write_loop(
    mut sink: SplitSink<Socket, Message>,
    mut rx: mpsc::Receiver<Message>,
    token: CancellationToken,
    peer: Peer,
    close_timeout: Duration,
    batch_limit: usize,
) {
    loop {
        let first = tokio::select! {
            biased;
            () = token.cancelled() => break,
            next = rx.recv() => match next {
                Some(frame) => frame,
                None => break,
            },
        };
        let batch = async {
            sink.feed(first).await?;
            for _ in 1..batch_limit {
                match rx.try_recv() {
                    Ok(frame) => sink.feed(frame).await?,
                    Err(_) => break,
                }
            }
            sink.flush().await
        };
        let result = tokio::select! {
            biased;
            () = token.cancelled() => break,
            result = batch => result,
        };
        if let Err(err) = result {
            tracing::debug!(cause = %err, "write failed");
            peer.close(CloseReason { code: CloseCode::Abnormal, reason: "", drain_queue: false });
            break;
        }
    }

    let reason = peer.close_reason();
    if reason.code == CloseCode::Abnormal {
        // The transport is gone (or the peer vanished): nothing to say.
        return;
    }
    let closing = async {
        if reason.drain_queue {
            while let Ok(frame) = rx.try_recv() {
                if sink.feed(frame).await.is_err() {
                    return;
                }
            }
        }
        // After the peer's own close this only flushes tungstenite's reply.
        let _ = sink.send(Message::Close(Some(reason.frame()))).await;
        let _ = sink.close().await;
    };
    if tokio::time::timeout(close_timeout, closing).await.is_err() {
        tracing::debug!("close frame not delivered in time");
    }
}
