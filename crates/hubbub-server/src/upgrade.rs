//! The WebSocket opening handshake on top of axum/hyper, handing the
//! upgraded socket to our own framing (`ws`, driven by `conn`).
//!
//! We do the handshake ourselves rather than through axum's `ws` extractor
//! so the server owns the raw upgraded stream: `conn` reads and writes it
//! directly, without per-connection buffers while the connection is idle.
//!
//! Hyper writes the `101` response itself. [`Coalesce`], below hyper, holds
//! that response back and writes it with the connection's first frames (a
//! chat client's greeting), so opening a connection costs one write and one
//! TCP segment instead of two.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::FutureExt as _;
use futures_util::future::Either;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use sha1::{Digest as _, Sha1};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

use crate::deflate::{self, Deflate};

/// The byte stream of an accepted WebSocket, after the handshake.
///
/// Plain TCP is taken back out of hyper's upgraded stream
/// ([`Upgraded::downcast`]): the connection then holds the `TcpStream`
/// itself (in the [`Coalesce`] that may still hold the `101`), smaller than
/// hyper's stream, which also keeps it in a heap allocation of its own.
/// Anything else (TLS) stays hyper's stream, boxed so the common case stays
/// small.
pub(crate) enum Socket {
    /// A plain TCP connection.
    Tcp(Coalesce<TcpStream>),
    /// Whatever else hyper upgraded.
    Upgraded(Box<TokioIo<Upgraded>>),
}

impl Socket {
    /// The stream and the bytes hyper read past the request (a client that
    /// did not wait for the `101`), which come before anything read from
    /// the stream. Only plain TCP can have them: hyper's own stream gives
    /// them back itself.
    fn from_upgraded(upgraded: Upgraded) -> (Self, Bytes) {
        match upgraded.downcast::<TokioIo<Coalesce<TcpStream>>>() {
            Ok(parts) => (Self::Tcp(parts.io.into_inner()), parts.read_buf),
            Err(upgraded) => (Self::Upgraded(Box::new(TokioIo::new(upgraded))), Bytes::new()),
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(io) => Pin::new(io).poll_read(cx, buf),
            Self::Upgraded(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(io) => io.poll_send(cx, &[IoSlice::new(buf)]),
            Self::Upgraded(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(io) => io.poll_send(cx, bufs),
            Self::Upgraded(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(io) => io.is_write_vectored(),
            Self::Upgraded(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(io) => Pin::new(io).poll_flush(cx),
            Self::Upgraded(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            Self::Upgraded(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// Writes to a plain TCP socket with `send` (one buffer) or `sendmsg`
/// (several), which go straight to the socket. On Linux, `write` and
/// `writev` on a socket go through the file layer first (the file position
/// lock, permission hooks); every delivery is one of these calls, and in
/// `rooms` that layer was about 6 % of the server's samples.
fn send(stream: &TcpStream, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            let socket = socket2::SockRef::from(stream);
            match bufs {
                [one] => socket.send(one),
                _ => socket.send_vectored(bufs),
            }
        });
        match sent {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            other => return Poll::Ready(other),
        }
    }
}

/// True when the request asks to switch to another protocol, whether or not
/// it is a well-formed WebSocket upgrade.
pub(crate) fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
}

/// Answers a WebSocket upgrade request: `101` and, once hyper has switched
/// protocols, `on_socket` runs with the socket, the bytes that arrived
/// before it (see [`Socket::from_upgraded`]) and what permessage-deflate
/// was negotiated (only if `compression` is on and the client offered it).
/// A request that is not a valid WebSocket upgrade gets a 4xx and
/// `on_socket` never runs. The connection's task is tracked by `tasks`, so
/// shutdown can wait for it.
pub(crate) fn accept<F, Fut>(
    mut req: Request,
    tasks: &TaskTracker,
    compression: bool,
    on_socket: F,
) -> Response
where
    F: FnOnce(Socket, Bytes, Deflate) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let headers = req.headers();
    if req.method() != Method::GET {
        return (StatusCode::METHOD_NOT_ALLOWED, "WebSocket upgrades must use GET\n").into_response();
    }
    if !header_has_token(headers, header::CONNECTION, "upgrade")
        || !header_has_token(headers, header::UPGRADE, "websocket")
    {
        let mut response =
            (StatusCode::UPGRADE_REQUIRED, "This endpoint speaks WebSocket only\n").into_response();
        response.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        return response;
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        let mut response =
            (StatusCode::UPGRADE_REQUIRED, "Unsupported WebSocket version; use 13\n").into_response();
        response.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return response;
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let (Some(key), None) = (keys.next(), keys.next()) else {
        return (StatusCode::BAD_REQUEST, "Exactly one Sec-WebSocket-Key is required\n").into_response();
    };
    if !is_websocket_key(key.as_bytes()) {
        return (StatusCode::BAD_REQUEST, "Sec-WebSocket-Key must be 16 bytes in base64\n").into_response();
    }
    let accept_key = derive_accept_key(key.as_bytes());
    let negotiated = if compression {
        deflate::negotiate(
            headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS).iter().filter_map(|v| v.to_str().ok()),
        )
    } else {
        None
    };
    let deflate = negotiated.as_ref().map_or(Deflate::OFF, |(deflate, _)| *deflate);
    let Some(on_upgrade) = req.extensions_mut().remove::<OnUpgrade>() else {
        // Only hyper's HTTP/1 server provides the upgrade hook.
        return (StatusCode::BAD_REQUEST, "Connection cannot be upgraded\n").into_response();
    };

    // `then`, not an `async` block: a block would keep `on_socket`'s
    // captures, and the result it matched on, beside the connection's
    // future for the connection's whole life; `then` holds one or the other.
    let connection = on_upgrade.then(move |upgraded| match upgraded {
        Ok(upgraded) => {
            let (socket, early) = Socket::from_upgraded(upgraded);
            Either::Left(on_socket(socket, early, deflate))
        }
        Err(err) => {
            tracing::debug!(cause = %err, "upgrade failed after 101");
            Either::Right(std::future::ready(()))
        }
    });
    tasks.spawn(connection);

    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    // The accept key is base64, always a valid header value.
    if let Ok(value) = HeaderValue::from_str(&accept_key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    // Made of our own ASCII text, always a valid header value.
    if let Some(Ok(value)) = negotiated.map(|(_, response)| HeaderValue::from_str(&response)) {
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, value);
    }
    response
}

/// What a `101` response written by hyper starts with.
const SWITCHING: &[u8] = b"HTTP/1.1 101 ";
/// Most slices [`Coalesce`] hands to one vectored write: the held response
/// and the caller's (`conn` passes at most 64).
const MAX_SLICES: usize = 65;

/// A connection's byte stream as hyper sees it, which holds a `101
/// Switching Protocols` back until the upgraded connection writes, and then
/// writes it in the same system call as the connection's first frames.
///
/// Only a `101` that is the connection's first write is held: the first
/// response on a fresh connection, which is how WebSocket clients connect.
/// Anything else passes straight through. Hyper flushes once after writing
/// the response; that flush is the one not passed on. Every later write,
/// flush or shutdown writes the held bytes first, so they always go out
/// before anything else, and an upgraded connection that writes nothing
/// sends them at its first flush (`conn` flushes on its first poll).
pub(crate) struct Coalesce<S> {
    /// The underlying stream (TCP, or TLS over TCP).
    io: S,
    /// The `101` response, or what is left of it, not yet written.
    held: Option<Box<[u8]>>,
    /// Nothing has been written yet: the next write may be held.
    fresh: bool,
    /// Hyper's flush after the held response has been let through.
    flushed: bool,
}

impl<S> Coalesce<S> {
    /// Wraps a freshly accepted stream.
    pub(crate) fn new(io: S) -> Self {
        Self { io, held: None, fresh: true, flushed: false }
    }
}

impl Coalesce<TcpStream> {
    /// Writes through [`send`] once no `101` is held.
    fn poll_send(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        if self.held.is_some() {
            return Pin::new(self).poll_write_vectored(cx, bufs);
        }
        send(&self.io, cx, bufs)
    }
}

impl<S: AsyncWrite + Unpin> Coalesce<S> {
    /// Writes the held response, if any, by itself.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(held) = &self.held {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held = (n < held.len()).then(|| held[n..].into());
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if std::mem::take(&mut this.fresh)
            && bufs.iter().find(|b| !b.is_empty()).is_some_and(|b| b.starts_with(SWITCHING))
        {
            let len = bufs.iter().map(|b| b.len()).sum();
            let mut held = Vec::with_capacity(len);
            for buf in bufs {
                held.extend_from_slice(buf);
            }
            this.held = Some(held.into_boxed_slice());
            return Poll::Ready(Ok(len));
        }
        while let Some(held) = &this.held {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            slices[0] = IoSlice::new(held);
            let mut count = 1;
            for (slot, buf) in slices[1..].iter_mut().zip(bufs) {
                *slot = *buf;
                count += 1;
            }
            let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, &slices[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n < held.len() {
                this.held = Some(held[n..].into());
                continue;
            }
            let written = n - held.len();
            this.held = None;
            // Reporting 0 bytes would read as a closed stream: go on and
            // write the caller's bytes.
            if written > 0 || bufs.iter().all(|b| b.is_empty()) {
                return Poll::Ready(Ok(written));
            }
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.held.is_some() && !std::mem::replace(&mut this.flushed, true) {
            // Hyper's flush of the response it just wrote: the upgraded
            // connection's first write takes it along.
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 section 4.2.2): the base64 of
/// the SHA-1 of the key followed by the protocol's GUID.
fn derive_accept_key(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let digest = Sha1::new().chain_update(key).chain_update(GUID).finalize();
    base64(&digest)
}

/// Standard base64 with padding (RFC 4648 section 4).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0_u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Whether `key` is what RFC 6455 section 4.1 asks of `Sec-WebSocket-Key`:
/// 16 bytes in base64, which is 22 characters of the base64 alphabet and
/// `==`. The last character's unused low bits are not checked, so a key
/// made of random characters decodes (leniently) and is accepted.
fn is_websocket_key(key: &[u8]) -> bool {
    let Some((data, b"==")) = key.split_at_checked(22) else {
        return false;
    };
    data.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

/// Whether a comma-separated header contains `token`, case-insensitively.
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_the_one_rfc_6455_gives() {
        // The worked example of RFC 6455 section 1.3.
        assert_eq!(derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }

    /// Reads what is available on `side` now, without waiting.
    async fn available(side: &mut tokio::io::DuplexStream) -> Vec<u8> {
        use tokio::io::AsyncReadExt as _;
        let mut out = Vec::new();
        let mut buf = [0; 256];
        while let Ok(Ok(n @ 1..)) =
            tokio::time::timeout(std::time::Duration::from_millis(1), side.read(&mut buf)).await
        {
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_switching_response_goes_out_with_the_first_frames() {
        use tokio::io::AsyncWriteExt as _;
        let (inner, mut client) = tokio::io::duplex(1024);
        let mut io = Coalesce::new(inner);
        let response = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n";
        io.write_all(response).await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(available(&mut client).await, b"", "held until the connection writes");
        io.write_all(b"greeting").await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(available(&mut client).await, [&response[..], b"greeting"].concat());
        io.write_all(b"more").await.unwrap();
        assert_eq!(available(&mut client).await, b"more");
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_response_goes_out_at_the_second_flush_or_shutdown() {
        use tokio::io::AsyncWriteExt as _;
        let response = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        let (inner, mut client) = tokio::io::duplex(1024);
        let mut io = Coalesce::new(inner);
        io.write_all(response).await.unwrap();
        io.flush().await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(available(&mut client).await, response);

        let (inner, mut client) = tokio::io::duplex(1024);
        let mut io = Coalesce::new(inner);
        io.write_all(response).await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(available(&mut client).await, response);
    }

    #[tokio::test(start_paused = true)]
    async fn other_responses_and_later_ones_pass_straight_through() {
        use tokio::io::AsyncWriteExt as _;
        let (inner, mut client) = tokio::io::duplex(1024);
        let mut io = Coalesce::new(inner);
        io.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        assert_eq!(available(&mut client).await, b"HTTP/1.1 200 OK\r\n\r\n");
        // Not the connection's first write: never held.
        io.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").await.unwrap();
        assert_eq!(available(&mut client).await, b"HTTP/1.1 101 Switching Protocols\r\n\r\n");
    }

    #[test]
    fn websocket_keys_are_16_bytes_in_base64() {
        for good in ["dGhlIHNhbXBsZSBub25jZQ==", "AAAAAAAAAAAAAAAAAAAAAA==", "+/+/+/+/+/+/+/+/+/+/+/=="] {
            assert!(is_websocket_key(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            "x",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZQ=",
            "dGhlIHNhbXBsZSBub25jZQ===",
            "dGhlIHNhbXBsZSBub25jZSE=",
            "dGhlIHNhbXBsZSBub25jZSEh",
            "dGhlIHNhbXBsZSBub25j-Q==",
            "dGhlIHNhbXBsZSBub25jZ Q==",
            "dGhlIHNhbXBsZSBub25jZQ==dGhlIHNhbXBsZSBub25jZQ==",
        ] {
            assert!(!is_websocket_key(bad.as_bytes()), "{bad}");
        }
    }
}
