//! The WebSocket opening handshake on top of axum/hyper, handing the
//! upgraded socket to our own framing (`ws`, driven by `conn`).
//!
//! We do the handshake ourselves rather than through axum's `ws` extractor
//! so the server owns the raw upgraded stream: `conn` reads and writes it
//! directly, without per-connection buffers while the connection is idle.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

use crate::deflate::{self, Deflate};

/// The byte stream of an accepted WebSocket, after the handshake.
///
/// Plain TCP is taken back out of hyper's upgraded stream
/// ([`Upgraded::downcast`]): the connection then holds the `TcpStream`
/// itself, 16 bytes smaller than hyper's stream, which also keeps it in a
/// heap allocation of its own. Anything else (TLS) stays hyper's stream,
/// boxed so the common case stays small.
#[derive(Debug)]
pub(crate) enum Socket {
    /// A plain TCP connection.
    Tcp(TcpStream),
    /// Whatever else hyper upgraded.
    Upgraded(Box<TokioIo<Upgraded>>),
}

impl Socket {
    /// The stream and the bytes hyper read past the request (a client that
    /// did not wait for the `101`), which come before anything read from
    /// the stream. Only plain TCP can have them: hyper's own stream gives
    /// them back itself.
    fn from_upgraded(upgraded: Upgraded) -> (Self, Bytes) {
        match upgraded.downcast::<TokioIo<TcpStream>>() {
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
            Self::Tcp(io) => Pin::new(io).poll_write(cx, buf),
            Self::Upgraded(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(io) => Pin::new(io).poll_write_vectored(cx, bufs),
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
