//! Who may connect: the origin check and the connection caps.
//!
//! An upgrade is refused before the handshake completes: `403` for an origin
//! that is not allowed, `503` when the server or the client's address already
//! holds as many WebSocket connections as configured. The same counting caps
//! the HTTP connections that have not upgraded (TLS handshakes included),
//! which are closed at once when over. An admitted connection holds a
//! [`Slot`] until it ends; dropping the slot gives the place back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::http::{HeaderMap, header};

use crate::Config;

/// How many connections an [`Admission`] lets in; 0 means no cap.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Caps {
    /// From every address together.
    pub(crate) total: usize,
    /// From one address.
    pub(crate) per_ip: usize,
}

/// Open connections, in total and per client address.
#[derive(Debug, Default)]
pub(crate) struct Admission {
    /// Open WebSocket connections on every endpoint.
    total: AtomicUsize,
    /// Open connections per client address; entries at zero are removed.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Why an upgrade was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The server holds as many as its total cap already.
    ServerFull,
    /// The client's address holds as many as the per-address cap already.
    AddressFull,
}

/// An admitted connection's place; released on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Admission {
    /// Open connections.
    pub(crate) fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Takes a place for a connection from `ip`, if the caps allow.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr, caps: Caps) -> Result<Slot, Refusal> {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
        // Zero means no cap.
        let over = |count: usize, max: usize| max != 0 && count >= max;
        if over(self.total.load(Ordering::Relaxed), caps.total) {
            return Err(Refusal::ServerFull);
        }
        let count = per_ip.entry(ip).or_insert(0);
        if over(*count, caps.per_ip) {
            if *count == 0 {
                per_ip.remove(&ip);
            }
            return Err(Refusal::AddressFull);
        }
        *count += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(Slot { admission: self.clone(), ip })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_ip = self.admission.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
        self.admission.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether a browser's `Origin` may open a WebSocket here: no `Origin` at
/// all (not a browser), the server's own host, or one of
/// `allowed_origins` (`*` allows any). Returns the refused origin.
pub(crate) fn check_origin(headers: &HeaderMap, config: &Config) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else { return Ok(()) };
    let origin = String::from_utf8_lossy(origin.as_bytes()).into_owned();
    if config.allowed_origins.iter().any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(&origin)) {
        return Ok(());
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let same_host = match (origin.split_once("://"), host) {
        (Some((scheme, origin_host)), Some(host)) => {
            without_default_port(scheme, origin_host).eq_ignore_ascii_case(without_default_port(scheme, host))
        }
        _ => false,
    };
    if same_host { Ok(()) } else { Err(origin) }
}

/// `host:443` for https (`host:80` for http) is the same as `host`.
fn without_default_port<'a>(scheme: &str, host: &'a str) -> &'a str {
    let default = if scheme.eq_ignore_ascii_case("https") { ":443" } else { ":80" };
    host.strip_suffix(default).unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(origin) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        }
        h
    }

    #[test]
    fn origins_are_checked_against_the_host_and_the_allow_list() {
        let mut config = Config::default();
        assert!(check_origin(&headers(None, "chat.example:8080"), &config).is_ok());
        assert!(
            check_origin(&headers(Some("https://chat.example:8080"), "chat.example:8080"), &config).is_ok()
        );
        assert_eq!(
            check_origin(&headers(Some("https://evil.example"), "chat.example:8080"), &config),
            Err("https://evil.example".to_owned())
        );
        assert!(check_origin(&headers(Some("null"), "chat.example"), &config).is_err());
        assert!(check_origin(&headers(Some("https://chat.example:443"), "chat.example"), &config).is_ok());
        assert!(check_origin(&headers(Some("http://chat.example"), "chat.example:80"), &config).is_ok());
        assert!(check_origin(&headers(Some("https://chat.example:444"), "chat.example"), &config).is_err());
        config.allowed_origins = vec!["https://app.example".into()];
        assert!(check_origin(&headers(Some("https://app.example"), "chat.example"), &config).is_ok());
        config.allowed_origins = vec!["*".into()];
        assert!(check_origin(&headers(Some("https://evil.example"), "chat.example"), &config).is_ok());
    }

    #[test]
    fn slots_are_capped_and_given_back() {
        let caps = Caps { total: 3, per_ip: 2 };
        let admission = Arc::new(Admission::default());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = admission.admit(a, caps).unwrap();
        let _a2 = admission.admit(a, caps).unwrap();
        assert_eq!(admission.admit(a, caps).unwrap_err(), Refusal::AddressFull);
        let _b1 = admission.admit(b, caps).unwrap();
        assert_eq!(admission.admit(b, caps).unwrap_err(), Refusal::ServerFull);
        drop(a1);
        assert_eq!(admission.open(), 2);
        assert!(admission.admit(a, caps).is_ok());
    }
}
