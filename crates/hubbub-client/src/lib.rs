//! The Rust client for Hubbub.
//!
//! This crate will hold the reconnecting client a Rust program uses to talk
//! to a Hubbub server: a command handle (set a username, join and leave rooms,
//! send messages, typing notices and files), a stream of typed events built on
//! `hubbub-protocol`, reconnection with exponential backoff and jitter, session
//! restore, a bounded offline queue and acknowledged, de-duplicated delivery.
//! The `hubbub-chat` terminal client will live here too.
//!
//! Until then, the server's integration tests talk to the server with
//! `tokio-tungstenite` directly.
