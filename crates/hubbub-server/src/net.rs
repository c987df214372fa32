//! Working out a client's real address behind trusted proxies.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;

use crate::Config;

/// The client's address: the TCP peer's, unless the peer is a trusted proxy,
/// in which case `X-Forwarded-For` is walked from the right (the hop nearest
/// to us) past every trusted proxy to the first address we do not trust.
/// Entries a client put there itself sit further left and are never reached
/// unless every hop after them is trusted.
pub(crate) fn client_ip(peer: SocketAddr, headers: &HeaderMap, config: &Config) -> IpAddr {
    let mut ip = peer.ip();
    if !config.is_trusted_proxy(ip) {
        return ip;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(hop_ip) => {
                ip = hop_ip;
                if !config.is_trusted_proxy(hop_ip) {
                    break;
                }
            }
            // A garbled entry: the last address we could verify stands.
            Err(_) => break,
        }
    }
    ip
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(xff: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_str(xff).unwrap());
        h
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let config = Config { trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()], ..Config::default() };
        let proxy: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let stranger: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();

        assert_eq!(client_ip(stranger, &headers("1.2.3.4"), &config), ip("203.0.113.9"));
        assert_eq!(client_ip(proxy, &headers("1.2.3.4"), &config), ip("1.2.3.4"));
        // A spoofed left-most entry is skipped: the first untrusted hop wins.
        assert_eq!(client_ip(proxy, &headers("6.6.6.6, 1.2.3.4, 10.0.0.7"), &config), ip("1.2.3.4"));
        assert_eq!(client_ip(proxy, &headers("garbage, 10.0.0.7"), &config), ip("10.0.0.7"));
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &config), ip("10.0.0.1"));
    }
}
