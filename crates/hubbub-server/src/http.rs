//! The HTTP routes: WebSocket endpoints, health, status and the page.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get};
use futures_util::FutureExt as _;
use futures_util::future::Either;
use serde::Serialize;

use crate::Shared;
use crate::admission::{Refusal, Slot, check_origin};
use crate::auth::Identity;
use crate::auth::token_from_request;
use crate::chat::ChatSession;
use crate::conn::{self, Endpoint};
use crate::deflate::Deflate;
use crate::echo::Echo;
use crate::feed::Subscriber;
use crate::net::client_ip;
use crate::ratelimit::{AddressLimit, Key};
use crate::upgrade::{Socket, accept, wants_upgrade};

/// The chat page served at `GET /`.
const INDEX_HTML: &str = include_str!("../../../web/index.html");

/// The page's script, stylesheet and the browser client module, embedded so
/// the binary needs no files beside it.
const ASSETS: &[(&str, &str, &str)] = &[
    ("/client.js", "text/javascript; charset=utf-8", include_str!("../../../web/client.js")),
    ("/app.js", "text/javascript; charset=utf-8", include_str!("../../../web/app.js")),
    ("/style.css", "text/css; charset=utf-8", include_str!("../../../web/style.css")),
];

/// Builds the router over the server's shared state.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", any(root))
        .route("/ws/chat", any(chat))
        .route("/ws/notifications", any(notifications))
        .route("/ws/echo", any(echo))
        .route("/health", get(|| async { "OK" }))
        .route("/ready", get(ready))
        .route("/client.js", get(asset))
        .route("/app.js", get(asset))
        .route("/style.css", get(asset))
        .route("/api/status", get(status))
        .route("/api/rooms", get(rooms))
        .route("/metrics", get(metrics))
        .route("/files/{file_id}", get(download))
        .fallback(not_found)
        .layer(axum::middleware::map_response(security_headers))
        .with_state(shared)
}

/// Headers every HTTP response carries: a Content-Security-Policy the chat
/// page satisfies (no inline script or style, connections to this origin
/// only), no MIME sniffing, no referrer leaks.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    // Downloads bring their own, stricter policy.
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            header::HeaderValue::from_static(
                "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; object-src 'none'; \
                 base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
            ),
        );
    }
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, header::HeaderValue::from_static("no-referrer"));
    response
}

async fn root(State(shared): State<Arc<Shared>>, peer: ConnectInfo<SocketAddr>, req: Request) -> Response {
    if wants_upgrade(req.headers()) {
        return upgrade(shared, peer, req, Endpoint::Chat);
    }
    Html(INDEX_HTML).into_response()
}

async fn chat(State(shared): State<Arc<Shared>>, peer: ConnectInfo<SocketAddr>, req: Request) -> Response {
    upgrade(shared, peer, req, Endpoint::Chat)
}

async fn notifications(
    State(shared): State<Arc<Shared>>,
    peer: ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    upgrade(shared, peer, req, Endpoint::Notifications)
}

async fn echo(State(shared): State<Arc<Shared>>, peer: ConnectInfo<SocketAddr>, req: Request) -> Response {
    if !shared.config.echo_enabled {
        return not_found().await.into_response();
    }
    upgrade(shared, peer, req, Endpoint::Echo)
}

/// Accepts an upgrade on `endpoint` and runs the connection.
fn upgrade(
    shared: Arc<Shared>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    req: Request,
    endpoint: Endpoint,
) -> Response {
    let ip = client_ip(addr, req.headers(), &shared.config);
    if let Err(origin) = check_origin(req.headers(), &shared.config) {
        shared.hub.stats.refused.with_label_values(&["origin"]).inc();
        tracing::warn!(%origin, peer = %ip, "upgrade refused: origin not allowed");
        return (StatusCode::FORBIDDEN, "Origin not allowed\n").into_response();
    }
    // New connections per second from one address: reconnecting in a loop
    // buys no more than keeping a connection open.
    let key = Key::address(ip);
    if let Err(wait) = shared.limits.check(
        &shared.config.rate_limit,
        &key,
        AddressLimit::Connections,
        std::time::Instant::now(),
    ) {
        shared.hub.stats.refused.with_label_values(&["rate_limited"]).inc();
        if let Some(count) = shared.hub.stats.refusals_logged.due() {
            tracing::warn!(peer = %ip, count, "upgrades refused: too many new connections from one address");
        }
        let retry_after = wait.as_secs().saturating_add(u64::from(wait.subsec_nanos() > 0)).max(1);
        let mut response =
            (StatusCode::TOO_MANY_REQUESTS, "Too many new connections; try again later\n").into_response();
        if let Ok(value) = header::HeaderValue::from_str(&retry_after.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return response;
    }
    let slot = match shared.admission.admit(ip, shared.config.limits.caps()) {
        Ok(slot) => slot,
        Err(refusal) => {
            let reason = match refusal {
                Refusal::ServerFull => "server_full",
                Refusal::AddressFull => "address_full",
            };
            shared.hub.stats.refused.with_label_values(&[reason]).inc();
            if let Some(count) = shared.hub.stats.refusals_logged.due() {
                tracing::warn!(?refusal, peer = %ip, count, "upgrades refused: too many connections");
            }
            let mut response =
                (StatusCode::SERVICE_UNAVAILABLE, "Too many connections; try again later\n").into_response();
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            return response;
        }
    };
    // A token on the upgrade request is checked before the handshake. Echo
    // connections need one when tokens are on: they have no other way to
    // authenticate.
    let mut identity = None;
    if let (Endpoint::Chat | Endpoint::Echo, Some(authenticator)) = (endpoint, &shared.auth) {
        let refused = match token_from_request(req.uri(), req.headers()) {
            Some(token) => match authenticator.verify(&token, &shared.config.protocol) {
                Ok(valid) => {
                    identity = Some(valid);
                    None
                }
                Err(err) => Some(err.to_string()),
            },
            // A chat client may send `auth {token}` as its first message.
            None if matches!(endpoint, Endpoint::Chat) => None,
            None => Some("A token is required".to_owned()),
        };
        if let Some(err) = refused {
            tracing::info!(peer = %ip, cause = %err, "upgrade refused: bad token");
            let mut response = (StatusCode::UNAUTHORIZED, format!("{err}\n")).into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    // Boxed while it waits for the handshake to complete.
    let tasks = shared.tasks.clone();
    let compression = shared.config.websocket.compression;
    let accepted = Accepted { shared, endpoint, ip, identity: identity.map(Box::new), slot };
    accept(req, &tasks, compression, move |socket, early, deflate| {
        accepted.connection(socket, &early, deflate)
    })
}

/// An upgrade that was let in, waiting for hyper to hand over its socket.
struct Accepted {
    shared: Arc<Shared>,
    endpoint: Endpoint,
    /// The client's address.
    ip: IpAddr,
    /// What the token on the upgrade request proved, if it had one.
    identity: Option<Box<Identity>>,
    /// The admission slot, held for the connection's life; dropping it
    /// frees the place.
    slot: Slot,
}

impl Accepted {
    /// The connection's future, which is most of its memory: see the test
    /// `an_idle_chat_connection_task_fits_in_640_bytes`.
    fn connection(self, socket: Socket, early: &[u8], deflate: Deflate) -> impl Future<Output = ()> + use<> {
        let Self { shared, endpoint, ip, identity, slot } = self;
        let state = shared.clone();
        let connection = match endpoint {
            Endpoint::Chat => {
                Either::Left(conn::run(socket, early, shared, endpoint, ip, deflate, move |peer| {
                    ChatSession::start(state, peer, ip, identity.map(|identity| *identity))
                }))
            }
            Endpoint::Echo => Either::Right(Either::Left(conn::run(
                socket,
                early,
                shared,
                endpoint,
                ip,
                deflate,
                move |peer| Echo::new(state, peer, ip),
            ))),
            Endpoint::Notifications => Either::Right(Either::Right(conn::run(
                socket,
                early,
                shared,
                endpoint,
                ip,
                deflate,
                |peer| Subscriber::start(state, peer),
            ))),
        };
        connection.map(move |()| drop(slot))
    }
}

/// One of the embedded [`ASSETS`], by path.
async fn asset(uri: axum::http::Uri) -> Response {
    match ASSETS.iter().find(|(path, _, _)| *path == uri.path()) {
        Some((_, content_type, body)) => ([(header::CONTENT_TYPE, *content_type)], *body).into_response(),
        None => not_found().await.into_response(),
    }
}

/// Unknown paths, upgrade or not: 404 and no upgrade.
async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "Not Found\n")
}

/// The body of `GET /api/status`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    /// Open WebSocket connections, every endpoint.
    connections: usize,
    /// Rooms that exist.
    rooms: usize,
    /// Seconds since the server started.
    uptime: u64,
    /// In a cluster: this node, the live nodes, and whether Redis answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<ClusterStatus>,
    /// The server's version.
    version: &'static str,
    /// WebSocket connections accepted since start.
    connections_accepted: u64,
    /// Connections dropped for not reading fast enough.
    slow_consumers_dropped: u64,
    /// Connections dropped for not answering heartbeat pings.
    dead_connections_reaped: u64,
    /// Messages refused by a rate limit.
    rate_limited: u64,
    /// Upgrades refused (origin, connection caps).
    upgrades_refused: u64,
}

/// `GET /ready`: 200 while this server can take chat traffic; in a cluster,
/// 503 while it cannot reach Redis (so a load balancer sends clients to the
/// nodes that can).
async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    match &shared.cluster {
        Some(cluster) if !cluster.is_up() => {
            (StatusCode::SERVICE_UNAVAILABLE, "cannot reach the cluster's redis\n").into_response()
        }
        _ => "OK".into_response(),
    }
}

/// The `cluster` field of `GET /api/status`.
#[derive(Serialize)]
struct ClusterStatus {
    /// This node's id.
    node: String,
    /// Live nodes at the last check, this one included.
    nodes: usize,
    /// `up` or `down`.
    redis: &'static str,
}

async fn status(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let stats = &shared.hub.stats;
    axum::Json(Status {
        cluster: shared.cluster.as_ref().map(|cluster| ClusterStatus {
            node: cluster.node.to_string(),
            nodes: cluster.nodes(),
            redis: if cluster.is_up() { "up" } else { "down" },
        }),
        connections: shared.admission.open(),
        rooms: shared.hub.room_count(),
        uptime: shared.started.elapsed().as_secs(),
        version: env!("CARGO_PKG_VERSION"),
        connections_accepted: ["chat", "notifications", "echo"]
            .iter()
            .map(|e| stats.accepted.with_label_values(&[e]).get())
            .sum(),
        slow_consumers_dropped: stats.slow_consumers.get(),
        dead_connections_reaped: stats.dead_reaped.get(),
        rate_limited: stats.rate_limited.get(),
        upgrades_refused: ["origin", "server_full", "address_full", "rate_limited"]
            .iter()
            .map(|r| stats.refused.with_label_values(&[r]).get())
            .sum(),
    })
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    if !shared.config.metrics.enabled || shared.config.metrics.listen.is_some() {
        return not_found().await.into_response();
    }
    render_metrics(&shared)
}

/// The metrics as a response, for either listener.
pub(crate) fn render_metrics(shared: &Shared) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], shared.hub.stats.render())
        .into_response()
}

/// One entry of `GET /api/rooms`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RoomInfo {
    /// The room's name.
    name: String,
    /// Its members.
    user_count: usize,
}

async fn rooms(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if let Some(cluster) = &shared.cluster {
        // Every node's members; this node's own view if Redis is away.
        match cluster.room_counts().await {
            Ok(counts) => {
                let list: Vec<RoomInfo> =
                    counts.into_iter().map(|(name, user_count)| RoomInfo { name, user_count }).collect();
                return axum::Json(list);
            }
            Err(err) => {
                tracing::debug!(cause = %err, "cannot read the cluster's rooms; answering this node's")
            }
        }
    }
    let list: Vec<RoomInfo> = shared
        .hub
        .rooms()
        .into_iter()
        .map(|(name, user_count)| RoomInfo { name: name.to_string(), user_count })
        .collect();
    axum::Json(list)
}

/// The policy of every download: were one ever rendered as a document (an
/// old browser ignoring `attachment`, a user opening it in a tab), it runs in
/// a unique opaque origin and may load nothing.
const DOWNLOAD_POLICY: &str = "sandbox; default-src 'none'";

/// Types a download keeps when it was uploaded with one of them: media a
/// browser only ever shows, never runs. Everything else (JavaScript, HTML,
/// SVG, XML, CSS, JSON, WebAssembly...) is served as
/// `application/octet-stream`, which with `nosniff` no browser will run as a
/// script, apply as a stylesheet or render as a page.
const INERT_TYPES: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "image/avif",
    "image/bmp",
    "audio/mpeg",
    "audio/ogg",
    "audio/wav",
    "audio/webm",
    "audio/aac",
    "audio/flac",
    "audio/mp4",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/quicktime",
    "application/pdf",
    "text/plain",
];

/// The type a download is served with: its stored type if inert, else
/// `application/octet-stream`.
fn served_type(stored: &str) -> mime::Mime {
    match stored.parse::<mime::Mime>() {
        Ok(mime) if INERT_TYPES.iter().any(|inert| mime.essence_str().eq_ignore_ascii_case(inert)) => mime,
        _ => mime::APPLICATION_OCTET_STREAM,
    }
}

/// `GET /files/{fileId}`: a saved upload, always as an attachment (so an
/// uploaded HTML file is never rendered on our origin), with its length,
/// range requests, and its stored type only if that is inert. The page's
/// `script-src 'self'` would run an uploaded script under our origin, so a
/// download is never served as anything a browser executes, carries a
/// sandboxing policy of its own, and may not be embedded by other sites.
async fn download(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(file_id): axum::extract::Path<String>,
    req: Request,
) -> Response {
    if !hubbub_transfer::is_file_id(&file_id) {
        return not_found().await.into_response();
    }
    // Off the runtime: in a cluster, a file another node saved is read from disk.
    let (store, id) = (shared.store.clone(), file_id.clone());
    let Ok(Some(file)) = tokio::task::spawn_blocking(move || store.get(&id)).await else {
        return not_found().await.into_response();
    };
    let mime = served_type(&file.mime_type);
    let service = tower_http::services::ServeFile::new_with_mime(shared.store.path_of(&file), &mime);
    let mut response = match tower::ServiceExt::oneshot(service, req).await {
        Ok(response) => response.map(axum::body::Body::new),
        Err(err) => {
            tracing::warn!(cause = %err, file = %file_id, "cannot serve file");
            return (StatusCode::INTERNAL_SERVER_ERROR, "Cannot read the file\n").into_response();
        }
    };
    let headers = response.headers_mut();
    if let Ok(value) = content_disposition(&file.name).parse() {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_SECURITY_POLICY, header::HeaderValue::from_static(DOWNLOAD_POLICY));
    headers.insert(
        header::HeaderName::from_static("cross-origin-resource-policy"),
        header::HeaderValue::from_static("same-origin"),
    );
    response
}

/// `attachment` with an ASCII fallback name and the exact UTF-8 name
/// (RFC 6266 / RFC 8187).
fn content_disposition(name: &str) -> String {
    let fallback: String = name
        .chars()
        .map(|c| if (c.is_ascii_graphic() && c != '"' && c != '\\') || c == ' ' { c } else { '_' })
        .collect();
    let mut encoded = String::new();
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::Config;
    use crate::admission::Caps;
    use crate::testing::shared;

    /// Tokio keeps a task in one allocation: 112 bytes of its own (header,
    /// scheduler, id, stage, trailer) and the future, aligned to 128 bytes.
    /// A chat connection's future of at most 528 bytes (504 when this test
    /// was written, with `upgrade::accept`'s `then`, which adds nothing to
    /// it) makes a 640-byte task; 24 bytes more would make it 768, and each
    /// of 19,000 idle connections 128 bytes larger.
    #[tokio::test]
    async fn an_idle_chat_connection_task_fits_in_640_bytes() {
        let shared = shared(Config::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, addr) = listener.accept().await.unwrap();
        let slot = shared.admission.admit(addr.ip(), Caps { total: 0, per_ip: 0 }).unwrap();
        let accepted = Accepted {
            shared: shared.clone(),
            endpoint: Endpoint::Chat,
            ip: addr.ip(),
            identity: None,
            slot,
        };
        let connection =
            accepted.connection(Socket::Tcp(crate::upgrade::Coalesce::new(server)), &[], Deflate::OFF);
        let size = std::mem::size_of_val(&connection);
        assert!(size <= 528, "a chat connection's future is {size} bytes");
        drop((connection, client));
    }

    #[test]
    fn only_inert_types_are_served_as_stored() {
        for inert in ["image/png", "IMAGE/PNG", "text/plain", "application/pdf", "video/mp4"] {
            assert_eq!(super::served_type(inert).essence_str(), inert.to_ascii_lowercase());
        }
        for active in [
            "text/javascript",
            "application/javascript",
            "text/html",
            "image/svg+xml",
            "application/xhtml+xml",
            "text/xml",
            "text/css",
            "application/json",
            "application/wasm",
            "text/plain+evil",
            "",
        ] {
            assert_eq!(super::served_type(active), mime::APPLICATION_OCTET_STREAM, "{active}");
        }
    }

    #[test]
    fn content_disposition_is_safe_for_any_name() {
        assert_eq!(
            super::content_disposition("résumé \"final\".pdf"),
            "attachment; filename=\"r_sum_ _final_.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%22final%22.pdf"
        );
    }
}
