//! The Rust client for Hubbub: a connection to a chat server that survives
//! the server going away, and the `hubbub-chat` terminal client built on it.
//!
//! [`Client::connect`] gives a [`Client`] handle for commands and an
//! [`EventStream`] of typed [`Event`]s. Behind them, one background task
//! owns the WebSocket and:
//!
//! - **reconnects** with exponential backoff and jitter when the server goes
//!   away (close 1001 or 1012), the link breaks (1006) or the heartbeat finds
//!   it dead ([`ReconnectPolicy`]; by default 1 s, doubling, 5 attempts), but
//!   never after [`Client::disconnect`];
//! - **moves between servers**: given the nodes of a cluster
//!   ([`Client::connect_any`]), it takes the next one in the list whenever a
//!   connect fails or the link is lost, and backs off only once it has tried
//!   them all;
//! - **restores the session** on every new link: the username and the room
//!   are set again, and their replies awaited, before anything else is sent;
//! - **queues** commands given while the link is down, in order, up to
//!   [`ClientConfig::queue_capacity`]; past that a command fails with
//!   [`ClientError::QueueFull`] instead of being dropped;
//! - **delivers each message once**: every message carries a `clientMsgId`
//!   and is resent after a reconnect until the server acknowledges it; the
//!   server acknowledges a resend without delivering it again, and the
//!   client drops a received message whose id it has already seen;
//! - **recovers what it missed**: it remembers how far it has read each
//!   room's stream (`{epoch, offset}`) and rejoins with it after every
//!   reconnect; the server replays the missed messages, which arrive as
//!   ordinary [`Event::Message`]s, once each and in order. When the server
//!   cannot replay them, [`Event::RecoveryFailed`] says so, and
//!   [`Client::history`] fetches earlier messages page by page; when a
//!   room's stream restarts under it, [`Event::Resync`] says so and the
//!   client follows the new position;
//! - **uploads files** in chunks ([`Client::send_file`]), resuming an upload
//!   cut by a reconnect where the server stopped;
//! - **pings** at the application level ([`LinkMonitor`]) to find a dead link.
//!
//! ```no_run
//! use hubbub_client::{Client, ClientConfig, Event};
//!
//! # async fn demo() -> Result<(), hubbub_client::ClientError> {
//! let (client, mut events) = Client::connect("ws://localhost:8080/ws/chat", ClientConfig::default()).await?;
//! client.set_username("ada").await?;
//! client.join_room("general").await?;
//! let id = client.send_message("Hello!").await?;
//! while let Some(event) = events.recv().await {
//!     match event {
//!         Event::Message { user, text, .. } => println!("{user}: {text}"),
//!         Event::MessageAcked { client_msg_id, .. } if client_msg_id == id => println!("delivered"),
//!         Event::Reconnecting { attempt, delay } => println!("reconnecting in {delay:?} (attempt {attempt})"),
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Mistakes are errors at the call, before anything is sent: a
//! configuration that cannot work, a URL that is not one, a name or text
//! that breaks the protocol's limits.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use hubbub_client::{Client, ClientConfig, ClientError};
//!
//! let no_queue = ClientConfig { queue_capacity: 0, ..ClientConfig::default() };
//! let err = Client::connect("ws://localhost:8080/ws/chat", no_queue).await.unwrap_err();
//! assert_eq!(err.to_string(), "invalid client configuration: queue_capacity must be greater than zero");
//!
//! let err = Client::connect("localhost:8080", ClientConfig::default()).await.unwrap_err();
//! assert!(matches!(err, ClientError::InvalidUrl { .. }));
//! assert!(err.to_string().contains("ws://localhost:8080"), "suggests the fix: {err}");
//! # }
//! ```
//!
//! `wss://` URLs work with rustls and Mozilla's root certificates; trust a
//! self-signed deployment with [`ClientConfig::extra_ca_file`].

mod client;
mod config;
mod error;
mod event;
mod history;
mod monitor;
mod servers;
mod state;
mod upload;

pub use client::{Client, validate_url};
pub use config::{ClientConfig, ConfigError, ReconnectPolicy, SendRate};
pub use error::{ClientError, Result};
pub use event::{Event, EventStream};
pub use history::HistoryPage;
pub use hubbub_heartbeat::{HeartbeatConfig, Latency};
pub use monitor::{LinkEvent, LinkMonitor};
pub use upload::FileUpload;
/// Re-exported: message ids are UUIDs.
pub use uuid::Uuid;
