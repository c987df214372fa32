//! Liveness for WebSocket peers, sans-IO.
//!
//! This crate will hold the heartbeat state machine shared by the server and
//! the clients: it is told what happened (a ping was sent, a pong or any other
//! frame arrived, all stamped with a caller-supplied `now`) and answers what to
//! do next (send a ping, declare the peer dead, nothing) and when to wake up.
//! It measures round-trip latency. It owns no clock, no socket and no runtime;
//! a small tokio driver will sit behind a cargo feature.
//!
//! Until the heartbeat issue lands, the server relies on TCP and the peers'
//! own close frames to notice departures.
