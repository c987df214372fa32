//! What can go wrong when connecting or giving the client a command.

use std::path::PathBuf;

use hubbub_protocol::ValidationError;
use hubbub_transfer::TransferError;
use tokio_tungstenite::tungstenite;

use crate::ConfigError;

/// An error from [`Client::connect`](crate::Client::connect) or one of the
/// [`Client`](crate::Client)'s commands.
///
/// A variant that wraps a cause returns it from
/// [`source`](std::error::Error::source) and does not repeat it in its own
/// message, so printing the chain (anyhow's `{:#}`, for one) shows each
/// cause once.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration cannot work.
    #[error("invalid client configuration: {0}")]
    Config(#[from] ConfigError),
    /// The server URL is not a WebSocket URL (`ws://` or `wss://` with a
    /// host); nothing was tried.
    #[error("invalid server URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong, with the likely fix.
        reason: String,
    },
    /// No server URL was given to
    /// [`Client::connect_any`](crate::Client::connect_any).
    #[error("no server URL given: pass at least one")]
    NoServerUrl,
    /// The first connection failed: refused, a TLS failure, or a failed
    /// WebSocket handshake. Later connections are retried instead.
    #[error("could not connect to {url}")]
    Connect {
        /// The URL connected to.
        url: String,
        /// What the WebSocket layer reported.
        #[source]
        source: tungstenite::Error,
    },
    /// The first connection took longer than
    /// [`ClientConfig::connect_timeout`](crate::ClientConfig::connect_timeout).
    #[error("timed out connecting to {url}")]
    ConnectTimeout {
        /// The URL connected to.
        url: String,
    },
    /// Given several server URLs, the first connection failed with every
    /// one of them ([`ClientError::Connect`] or
    /// [`ClientError::ConnectTimeout`] each, in the order tried). With one
    /// URL, its own error is returned instead.
    #[error("no server could be reached: {}", summary(failures))]
    Unreachable {
        /// Why each URL failed, in the order they were tried.
        failures: Vec<ClientError>,
    },
    /// A name or text breaks the protocol's limits; nothing was sent.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A room command (message, typing, leave) while not in a room, counting
    /// the joins and leaves already issued.
    #[error("not in a room: join one first")]
    NotInRoom,
    /// A command that only makes sense on a live link (typing, ping,
    /// history) while the client is reconnecting, or a history request whose
    /// link was lost before the answer came. Such commands are not queued:
    /// by the time the link is back they would be stale.
    #[error("not connected to the server")]
    NotConnected,
    /// A history page was asked for with a `limit` the protocol does not
    /// allow; nothing was sent.
    #[error("a history page holds 1 to {max} messages, not {limit}")]
    InvalidHistoryLimit {
        /// The limit asked for.
        limit: u32,
        /// The protocol's maximum.
        max: u32,
    },
    /// The server answered a history request with an error (for example
    /// when it keeps no history, or its store is unavailable).
    #[error("the server refused the history request: {message}")]
    HistoryRefused {
        /// The server's error message.
        message: String,
    },
    /// The client already holds as many commands and unacknowledged messages
    /// as [`ClientConfig::queue_capacity`](crate::ClientConfig::queue_capacity)
    /// allows (or as many uploads as `upload_queue`); nothing was queued.
    #[error("the client's queue is full ({capacity} waiting); try again once the connection is back")]
    QueueFull {
        /// The configured capacity that was reached.
        capacity: usize,
    },
    /// The client has stopped: after [`Client::disconnect`](crate::Client::disconnect),
    /// a close it does not retry, or its last reconnect attempt.
    #[error("the client is closed")]
    Closed,
    /// The TLS settings for `wss://` could not be built (e.g. an unreadable
    /// or empty `extra_ca_file`).
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// A file to upload could not be read.
    #[error("cannot read {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file cannot be uploaded in chunks (too many chunks of this size).
    #[error(transparent)]
    Transfer(#[from] TransferError),
}

/// The result of a client operation.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// The failures of [`ClientError::Unreachable`] on one line: each error
/// with its innermost cause (the one that says what went wrong, such as
/// `Connection refused`), which the layers between repeat or only label.
fn summary(failures: &[ClientError]) -> String {
    let described: Vec<String> = failures
        .iter()
        .map(|failure| {
            let outer = failure.to_string();
            let mut innermost = None;
            let mut cause = std::error::Error::source(failure);
            while let Some(inner) = cause {
                innermost = Some(inner);
                cause = inner.source();
            }
            match innermost.map(ToString::to_string) {
                Some(inner) if !outer.contains(&inner) => format!("{outer}: {inner}"),
                _ => outer,
            }
        })
        .collect();
    described.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_says_each_url_with_what_went_wrong_once() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let failures = vec![
            ClientError::Connect { url: "ws://a/ws/chat".into(), source: tungstenite::Error::Io(refused) },
            ClientError::ConnectTimeout { url: "ws://b/ws/chat".into() },
        ];
        assert_eq!(
            ClientError::Unreachable { failures }.to_string(),
            "no server could be reached: could not connect to ws://a/ws/chat: Connection refused; \
             timed out connecting to ws://b/ws/chat"
        );
    }
}
