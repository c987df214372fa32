//! The Rust client for Hubbub.
//!
//! Today this crate holds [`LinkMonitor`], the client side of the heartbeat:
//! application-level `ping`s on a schedule, latency from their `pong`s, and
//! the verdict that the link is dead when pongs stop, so the client can
//! reconnect.
//!
//! It will grow into the reconnecting client a Rust program uses to talk to a
//! Hubbub server: a command handle (set a username, join and leave rooms, send
//! messages, typing notices and files), a stream of typed events built on
//! `hubbub-protocol`, reconnection with exponential backoff and jitter,
//! session restore, a bounded offline queue and acknowledged, de-duplicated
//! delivery, and the `hubbub-chat` terminal client.

mod monitor;

pub use hubbub_heartbeat::{HeartbeatConfig, Latency};
pub use monitor::{LinkEvent, LinkMonitor};
