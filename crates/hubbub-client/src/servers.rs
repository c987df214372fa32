//! The servers a client may connect to, and which one it tries next.
//!
//! A cluster runs several `hubbub` nodes that share their rooms' history,
//! so a client given all their URLs can move to another node when its own
//! goes away. The order is round robin: every connect goes to the URL after
//! the one tried before, so a node that is down costs one failed connect,
//! not a backoff delay.

use crate::client::validate_url;
use crate::error::{ClientError, Result};

/// The server URLs, in the order they are tried, and where the client is
/// in that order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Servers {
    /// Checked with [`validate_url`]; never empty.
    urls: Vec<String>,
    /// The index of the URL the next connect goes to.
    next: usize,
}

impl Servers {
    /// The list, checked: at least one URL, and each a WebSocket URL.
    pub(crate) fn new(urls: Vec<String>) -> Result<Self> {
        if urls.is_empty() {
            return Err(ClientError::NoServerUrl);
        }
        for url in &urls {
            validate_url(url)?;
        }
        Ok(Self { urls, next: 0 })
    }

    /// How many URLs there are: the connects in one round.
    pub(crate) fn len(&self) -> usize {
        self.urls.len()
    }

    /// The URL to connect to now; the next call gives the one after it.
    pub(crate) fn take(&mut self) -> &str {
        let at = self.next;
        self.next = (at + 1) % self.urls.len();
        &self.urls[at]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_taken_in_turn_and_wrap_around() {
        let mut servers = Servers::new(vec!["ws://a/".into(), "ws://b/".into(), "ws://c/".into()]).unwrap();
        assert_eq!(servers.len(), 3);
        let order: Vec<String> = (0..7).map(|_| servers.take().to_owned()).collect();
        assert_eq!(order, ["ws://a/", "ws://b/", "ws://c/", "ws://a/", "ws://b/", "ws://c/", "ws://a/"]);

        let mut one = Servers::new(vec!["ws://only/".into()]).unwrap();
        assert_eq!(one.take(), "ws://only/");
        assert_eq!(one.take(), "ws://only/");
    }

    #[test]
    fn an_empty_list_or_a_bad_url_is_refused() {
        assert!(matches!(Servers::new(Vec::new()), Err(ClientError::NoServerUrl)));
        let bad = Servers::new(vec!["ws://a/".into(), "http://b/ws/chat".into()]).unwrap_err();
        assert!(matches!(&bad, ClientError::InvalidUrl { url, .. } if url == "http://b/ws/chat"), "{bad}");
    }
}
