//! `/ws/echo`: every frame back to its sender, for conformance and latency
//! tests, within the limits every connection has.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::Shared;
use crate::conn::Handler;
use crate::link::Peer;
use crate::ratelimit::{AddressLimit, Key, Kind, Limiter, Verdict, enforce};
use crate::ws::{self, Text};

/// `/ws/echo`: every text and binary frame comes back unchanged, within
/// the same limits as chat messages: each frame counts as a chat message
/// against the connection's and its address's rates, and the outbound
/// queue's limits apply as to every connection.
pub(crate) struct Echo {
    /// Server-wide state.
    shared: Arc<Shared>,
    /// This connection's queue.
    peer: Peer,
    /// The client's address, for the limits its connections share.
    ip: IpAddr,
    /// Rate limits, unless turned off.
    limiter: Option<Limiter>,
}

impl Echo {
    /// A new echo connection.
    pub(crate) fn new(shared: Arc<Shared>, peer: Peer, ip: IpAddr) -> Self {
        let limiter =
            shared.config.rate_limit.enabled.then(|| Limiter::new(&shared.config.rate_limit, Instant::now()));
        Self { shared, peer, ip, limiter }
    }

    /// Whether a frame may be echoed; a refused one is answered with a
    /// `rateLimited` error, and a connection that keeps flooding is closed.
    fn allowed(&mut self) -> bool {
        let Some(limiter) = self.limiter.as_mut() else { return true };
        let settings = &self.shared.config.rate_limit;
        let now = Instant::now();
        let verdict = match limiter.check(settings, Kind::Chat, now) {
            Verdict::Allow => {
                match self.shared.limits.check(settings, &Key::address(self.ip), AddressLimit::Chat, now) {
                    Ok(()) => Verdict::Allow,
                    Err(wait) => limiter.refused_elsewhere(settings, wait, now),
                }
            }
            verdict => verdict,
        };
        enforce(verdict, &self.peer, &self.shared.hub.stats, "echo")
    }
}

impl Handler for Echo {
    async fn on_text(&mut self, text: Text) {
        if self.allowed() {
            self.peer.send(ws::encode(ws::OpCode::Text, text.as_bytes()));
        }
    }

    async fn on_binary(&mut self, data: Bytes) {
        if self.allowed() {
            self.peer.send(ws::encode(ws::OpCode::Binary, &data));
        }
    }

    fn on_close(&mut self) {}
}
