//! The accept loop: every TCP connection from `accept` to the end of its
//! HTTP exchange, or to its WebSocket upgrade.
//!
//! Nothing here trusts the client to move. Every connection counts against
//! `http.max_connections` and, per TCP peer address, `http.max_connections_per_ip`
//! from the moment it is accepted (a connection over a cap is closed before
//! anything is read from it); a TLS handshake must finish within
//! `tls.handshake_timeout`, and a request's headers must arrive within
//! `http.header_read_timeout` of the connection opening or of the previous
//! response, which also ends idle keep-alive connections. An upgraded
//! connection leaves these caps for the WebSocket ones (`admission`).
//!
//! When `accept` fails (out of descriptors), the loop logs it at most once
//! a second, counts it, and pauses briefly so connections can finish.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::Shared;
use crate::admission::{Caps, Refusal, Slot};
use crate::tls::TlsReloader;
use crate::upgrade::Coalesce;

/// How long the loop pauses after `accept` fails for want of resources.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `app` on `listener` (over TLS when `tls` is given) until shutdown,
/// then lets every connection finish its current request.
pub(crate) async fn serve(listener: TcpListener, tls: Option<TlsReloader>, app: Router, shared: Arc<Shared>) {
    let stats = &shared.hub.stats;
    // Linux gives every accepted socket the listening socket's TCP_NODELAY:
    // one system call here instead of one per connection.
    let inherited =
        cfg!(target_os = "linux") && socket2::SockRef::from(&listener).set_tcp_nodelay(true).is_ok();
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, addr) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                stats.accept_errors.inc();
                if let Some(count) = stats.accept_errors_logged.due() {
                    tracing::warn!(cause = %err, count, "accept failed");
                }
                if !is_per_connection(&err) {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                continue;
            }
        };
        let ip = addr.ip();
        let http = &shared.config.http;
        // A trusted proxy carries many clients' connections: only the total
        // applies to it.
        let per_ip = if shared.config.is_trusted_proxy(ip) { 0 } else { http.max_connections_per_ip };
        let slot = match shared.http_admission.admit(ip, Caps { total: http.max_connections, per_ip }) {
            Ok(slot) => slot,
            Err(refusal) => {
                let reason = match refusal {
                    Refusal::ServerFull => "server_full",
                    Refusal::AddressFull => "address_full",
                };
                stats.connections_refused.with_label_values(&[reason]).inc();
                if let Some(count) = stats.refusals_logged.due() {
                    tracing::warn!(peer = %ip, ?refusal, count, "connections refused: over the HTTP connection caps");
                }
                continue;
            }
        };
        if !inherited {
            let _ = stream.set_nodelay(true);
        }
        let connection = connection(stream, addr, tls.clone(), app.clone(), shared.clone(), slot);
        shared.tasks.spawn(connection);
    }
}

/// Whether an `accept` error concerns only the connection being accepted
/// (the loop goes straight on) rather than the server's resources.
fn is_per_connection(err: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        err.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}

/// One accepted connection: its TLS handshake, if any, then HTTP until it
/// closes or upgrades. `slot` holds its place against the caps meanwhile.
async fn connection(
    stream: TcpStream,
    addr: SocketAddr,
    tls: Option<TlsReloader>,
    app: Router,
    shared: Arc<Shared>,
    slot: Slot,
) {
    let stats = &shared.hub.stats;
    stats.http_open.inc();
    match tls {
        None => http(stream, addr, app, &shared).await,
        Some(tls) => {
            let caps = Caps { total: tls.max_pending_handshakes(), per_ip: 0 };
            let Ok(_handshake) = shared.handshakes.admit(addr.ip(), caps) else {
                stats.connections_refused.with_label_values(&["handshakes_full"]).inc();
                if let Some(count) = stats.refusals_logged.due() {
                    tracing::warn!(peer = %addr, count, "connections refused: too many TLS handshakes in progress");
                }
                stats.http_open.dec();
                return;
            };
            let timeout = tls.handshake_timeout();
            match tokio::time::timeout(timeout, tls.current().accept(stream)).await {
                Ok(Ok(stream)) => http(stream, addr, app, &shared).await,
                Ok(Err(err)) => {
                    stats.tls_handshakes_failed.inc();
                    tracing::debug!(peer = %addr, cause = %err, "TLS handshake failed");
                }
                Err(_) => {
                    stats.tls_handshakes_failed.inc();
                    tracing::debug!(peer = %addr, "TLS handshake timed out");
                }
            }
        }
    }
    stats.http_open.dec();
    drop(slot);
}

/// HTTP/1.1 on an established stream, with the header timeout, until the
/// connection closes or is upgraded, or shutdown lets it finish.
async fn http<I>(io: I, addr: SocketAddr, app: Router, shared: &Shared)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        // What axum's `ConnectInfo` extractor reads.
        req.extensions_mut().insert(ConnectInfo(addr));
        let app = app.clone();
        async move {
            Ok::<_, Infallible>(tower::ServiceExt::oneshot(app, req).await.unwrap_or_else(|e| match e {}))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(shared.config.http.header_read_timeout);
    // `Coalesce` sends a `101` with the upgraded connection's first frames.
    let mut conn = pin!(builder.serve_connection(TokioIo::new(Coalesce::new(io)), service).with_upgrades());
    let served = tokio::select! {
        served = conn.as_mut() => served,
        () = shared.shutdown.cancelled() => {
            // Finish the request in progress, if any, then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = served {
        if err.is_timeout() {
            shared.hub.stats.header_timeouts.inc();
            tracing::debug!(peer = %addr, "request headers not received in time; closing");
        } else {
            tracing::debug!(peer = %addr, cause = %err, "HTTP connection ended with an error");
        }
    }
}

/// The future that serves `/metrics` alone on its own address, with the
/// same caps and timeouts as the main port.
pub(crate) fn metrics_only(listener: TcpListener, shared: Arc<Shared>) -> impl Future<Output = ()> {
    let router = Router::new().route(
        "/metrics",
        axum::routing::get({
            let shared = shared.clone();
            move || std::future::ready(crate::http::render_metrics(&shared))
        }),
    );
    serve(listener, None, router, shared)
}
