//! The client's view of link health: app-level pings and their pongs.

use hubbub_heartbeat::{Action, HeartbeatConfig, Latency, Monitor};
use hubbub_protocol::{ClientMessage, Number, ServerMessage};

/// What the link monitor asks of the client.
#[derive(Clone, Debug, PartialEq)]
pub enum LinkEvent {
    /// Send this `ping` to the server now.
    SendPing(ClientMessage),
    /// No `pong` came back in time: the link is dead; reconnect.
    Dead,
}

/// Watches a connection to a Hubbub server with application-level pings.
///
/// The monitor sends `ping {timestamp}` every `interval` (25 s by default,
/// [`HeartbeatConfig::client_default`]) and declares the link dead when a
/// ping's `pong` has not come back within `timeout` (35 s by default). The
/// `timestamp` it sends is a token the server echoes unchanged; latency is
/// measured with the monotonic clock, so it is right even when the client's
/// and the server's wall clocks disagree.
///
/// Use [`LinkMonitor::next_event`] as one branch of the client's
/// `tokio::select!`, and hand every decoded server message to
/// [`LinkMonitor::on_message`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// use hubbub_client::{HeartbeatConfig, LinkEvent, LinkMonitor};
/// use hubbub_protocol::{ClientMessage, ServerMessage};
///
/// let mut link = LinkMonitor::new(HeartbeatConfig::client_default());
/// let LinkEvent::SendPing(ping) = link.next_event().await else { panic!("first a ping") };
/// // The server answers: `pong` echoes the timestamp.
/// let ClientMessage::Ping { timestamp } = ping else { unreachable!() };
/// link.on_message(&ServerMessage::Pong { timestamp, server_time: 0 });
/// assert!(link.latency().is_some());
/// # }
/// ```
#[derive(Debug)]
pub struct LinkMonitor {
    /// The heartbeat machine and its timer.
    monitor: Monitor,
}

impl LinkMonitor {
    /// A monitor whose first ping is due one interval from now.
    pub fn new(config: HeartbeatConfig) -> Self {
        Self { monitor: Monitor::new(config) }
    }

    /// Waits for the next thing to do. Cancel safe.
    pub async fn next_event(&mut self) -> LinkEvent {
        match self.monitor.next_action().await {
            Action::SendPing(token) => LinkEvent::SendPing(ClientMessage::Ping { timestamp: token.into() }),
            Action::PeerDead => LinkEvent::Dead,
        }
    }

    /// Feeds a message from the server; only `pong`s matter here. A pong
    /// whose timestamp is not one of ours (another ping's, or one the
    /// application sent itself) is ignored.
    pub fn on_message(&mut self, message: &ServerMessage) {
        if let ServerMessage::Pong { timestamp, .. } = message
            && let Some(token) = token_of(timestamp)
        {
            self.monitor.on_pong(token);
        }
    }

    /// The round-trip time to the server: the last sample and a smoothed
    /// value, once a pong has come back.
    pub fn latency(&self) -> Option<Latency> {
        self.monitor.latency()
    }
}

fn token_of(timestamp: &Number) -> Option<u64> {
    timestamp.as_u64()
}
