//! The client's address behind trusted proxies.
//!
//! A node behind a load balancer sees the balancer as the peer of every connection. The
//! balancer passes the client's address on in `X-Forwarded-For`, but anyone can send that
//! header: a node reads it only when the TCP peer is a proxy it was told to trust
//! (`--trusted-proxies`), and then takes the right-most address of the chain that is not itself
//! a trusted proxy. Everything else a client wrote into the header is ignored, so per-IP limits
//! and logs cannot be spoofed.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use axum::http::HeaderMap;

/// An address or network, as `10.0.0.1`, `10.0.0.0/8`, `::1` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside this network. IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, what
    /// a dual-stack listener reports for IPv4 peers) count as their IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let network = addr
            .parse::<IpAddr>()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR (e.g. 10.0.0.0/8)"))?
            .to_canonical();
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Self { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// One entry of `X-Forwarded-For`: an address, optionally with a port (`1.2.3.4:5678`,
/// `[2001:db8::1]:443`), as some proxies write it.
fn forwarded_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

/// The client's address: `peer` itself unless `peer` is a trusted proxy; then the right-most
/// address of `X-Forwarded-For` that is not a trusted proxy. When every address of the chain
/// is trusted, the left-most one; when the chain holds something that is not an address, the
/// last trusted hop before it (the proxy that passed it on).
pub fn client_ip(trusted: &[Cidr], peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    // Several header lines form one list, in order.
    let mut chain: Vec<&str> = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(value) = value.to_str() else {
            return peer;
        };
        chain.extend(value.split(',').map(str::trim).filter(|e| !e.is_empty()));
    }
    let mut client = peer;
    for entry in chain.iter().rev() {
        let Some(ip) = forwarded_entry(entry) else {
            return client;
        };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", v.parse().unwrap());
        }
        headers
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_and_match() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains(ip("10.1.200.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(net.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped IPv6");
        assert!(!net.contains(ip("fd00::1")));

        let one: Cidr = "192.0.2.7".parse().unwrap();
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
        assert_eq!(one.to_string(), "192.0.2.7/32");

        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fdab::1")) && !v6.contains(ip("fe80::1")));
        let any: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(any.contains(ip("203.0.113.1")));
        let mapped: Cidr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(mapped.contains(ip("127.0.0.1")));

        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/x",
            "example.com",
            "10.0.0/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let trusted = nets(&["10.0.0.0/8"]);
        let headers = xff(&["203.0.113.9"]);
        assert_eq!(
            client_ip(&trusted, ip("198.51.100.1"), &headers),
            ip("198.51.100.1")
        );
        // Nothing trusted: the header never counts.
        assert_eq!(client_ip(&[], ip("10.0.0.1"), &headers), ip("10.0.0.1"));
    }

    #[test]
    fn a_trusted_peer_names_the_right_most_untrusted_address() {
        let trusted = nets(&["10.0.0.0/8", "192.168.1.1"]);
        let peer = ip("10.0.0.2");
        // nginx appends the address it saw: `client, proxy-before-nginx`.
        assert_eq!(
            client_ip(&trusted, peer, &xff(&["203.0.113.9"])),
            ip("203.0.113.9")
        );
        // A client that sends its own header cannot push its claim past the proxies: the
        // right-most untrusted entry is what the first trusted proxy saw.
        assert_eq!(
            client_ip(
                &trusted,
                peer,
                &xff(&["1.1.1.1, 203.0.113.9, 192.168.1.1, 10.9.9.9"])
            ),
            ip("203.0.113.9")
        );
        // Several header lines are one list.
        assert_eq!(
            client_ip(&trusted, peer, &xff(&["1.1.1.1", "203.0.113.9, 10.1.1.1"])),
            ip("203.0.113.9")
        );
        // Ports and IPv6.
        assert_eq!(
            client_ip(&trusted, peer, &xff(&["[2001:db8::5]:4711"])),
            ip("2001:db8::5")
        );
        assert_eq!(
            client_ip(&trusted, peer, &xff(&["203.0.113.9:1234"])),
            ip("203.0.113.9")
        );
        // The peer is trusted through its IPv4-mapped form too.
        assert_eq!(
            client_ip(&trusted, ip("::ffff:10.0.0.2"), &xff(&["203.0.113.9"])),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn odd_chains_fall_back_to_a_trusted_hop() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.2");
        // No header: the proxy itself.
        assert_eq!(client_ip(&trusted, peer, &HeaderMap::new()), peer);
        assert_eq!(client_ip(&trusted, peer, &xff(&[" , "])), peer);
        // Every hop trusted: the left-most.
        assert_eq!(
            client_ip(&trusted, peer, &xff(&["10.5.5.5, 10.6.6.6"])),
            ip("10.5.5.5")
        );
        // Garbage stops the walk at the hop that passed it on.
        assert_eq!(
            client_ip(&trusted, peer, &xff(&["203.0.113.9, unknown, 10.6.6.6"])),
            ip("10.6.6.6")
        );
        assert_eq!(client_ip(&trusted, peer, &xff(&["unknown"])), peer);
    }
}
