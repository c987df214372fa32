//! `/ws/notifications`: the feed of server-wide events (rooms created and
//! removed, the shutdown notice) for whoever subscribes.

use std::sync::Arc;

use bytes::Bytes;

use crate::Shared;
use crate::conn::Handler;
use crate::link::Peer;
use crate::ws::Text;

/// `/ws/notifications`: a feed of server events; what the client sends is
/// ignored.
pub(crate) struct Subscriber {
    /// Server-wide state.
    pub(crate) shared: Arc<Shared>,
    /// This connection's id in the subscriber set.
    pub(crate) peer: Peer,
}

impl Subscriber {
    /// Adds a subscriber to the feed.
    pub(crate) fn start(shared: Arc<Shared>, peer: Peer) -> Self {
        shared.hub.subscribers.insert(peer.clone());
        Self { shared, peer }
    }
}

impl Handler for Subscriber {
    async fn on_text(&mut self, _text: Text) {}

    async fn on_binary(&mut self, _data: Bytes) {}

    fn on_close(&mut self) {
        self.shared.hub.subscribers.remove(&self.peer.id());
    }
}
