//! Which network addresses a destination added over the admin API may reach.
//!
//! A tenant admin writes a destination's URL, and the worker then sends that tenant's events
//! there (and reports the status and the first bytes of a refusal back over the API). Without
//! a bound, the URL could name the gateway's own loopback services, the cloud's metadata
//! endpoint (`169.254.169.254`) or anything else on the private network behind the gateway.
//! Unless `INTENTGATE_OUTBOX_ALLOW_PRIVATE_NETWORKS` is set, such a destination may reach only
//! public addresses: an IP literal or `localhost` is refused when the destination is saved,
//! and a host name is resolved here, at every connection, and connected to only at its public
//! addresses, so a name that later resolves elsewhere (DNS rebinding) reaches nothing new.
//! Destinations from the operator's environment (`INTENTGATE_WEBHOOK_*`, `INTENTGATE_SIEM_*`)
//! are the operator's own and reach anything.
//!
//! This module must never let a restricted destination connect to an address it did not
//! check.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;

/// What a refusal says, so the operator knows the switch.
const HINT: &str =
    "set INTENTGATE_OUTBOX_ALLOW_PRIVATE_NETWORKS=true to allow destinations on private networks";

/// Whether `ip` is an address on the public internet: not loopback, private, link-local,
/// shared (carrier-grade NAT), unspecified, multicast, broadcast, reserved or documentation,
/// in either family (an IPv4-mapped IPv6 address is judged as its IPv4 address).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (b & 0xc0) == 64)
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b & 0xfe) == 18)
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x64 && s[1] == 0xff9b)
                || (s[0] == 0x2001 && s[1] == 0x0db8))
        }
    }
}

/// Why a restricted destination may not use `uri`'s host as written (an IP literal that is
/// not public, or `localhost`); `None` when it may (a host name is checked at connection).
pub fn refused_host(uri: &hyper::Uri) -> Option<String> {
    let host = uri.host()?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let local =
        bare.eq_ignore_ascii_case("localhost") || bare.to_ascii_lowercase().ends_with(".localhost");
    let private = bare.parse::<IpAddr>().is_ok_and(|ip| !is_public(ip));
    (local || private).then(|| {
        format!("{host} is a loopback, private or link-local address, which a destination may not reach; {HINT}")
    })
}

/// Why `dest` may not be reached as written when restricted: its URL's (or its Sentinel token
/// endpoint's) host is refused by [`refused_host`].
pub fn refused_destination(dest: &super::destination::Destination) -> Option<String> {
    let token_url = match &dest.target {
        super::destination::Target::Sentinel(t) => Some(&t.token_url),
        _ => None,
    };
    std::iter::once(&dest.url)
        .chain(token_url)
        .find_map(refused_host)
}

/// The outbox's resolver: every address of a name, or (`public_only`) only its public ones,
/// and an error when none is left.
#[derive(Clone, Copy, Debug)]
pub struct Resolver {
    pub public_only: bool,
}

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let public_only = self.public_only;
        Box::pin(async move {
            let host = name.as_str();
            let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
            if public_only {
                addrs.retain(|a| is_public(a.ip()));
                if addrs.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "{host} resolves only to loopback, private or link-local addresses; {HINT}"
                        ),
                    ));
                }
            }
            Ok(addrs.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_loopback_link_local_and_reserved_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(!is_public(ip.parse().expect("ip")), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip.parse().expect("ip")), "{ip}");
        }
    }

    #[test]
    fn a_private_literal_or_localhost_is_refused_a_name_is_left_to_the_resolver() {
        let refused = |u: &str| refused_host(&u.parse().expect("uri")).is_some();
        assert!(refused("http://127.0.0.1:8080/hook"));
        assert!(refused("http://169.254.169.254/latest/meta-data/"));
        assert!(refused("http://[::1]:9000/"));
        assert!(refused("https://LOCALHOST/x"));
        assert!(refused("https://api.localhost/x"));
        assert!(!refused("https://hooks.example.com/x"));
        assert!(!refused("https://93.184.216.34/x"));
    }

    #[tokio::test]
    async fn a_name_that_resolves_only_to_loopback_reaches_nothing_when_restricted() {
        use tower_service::Service;
        let name: Name = "localhost".parse().expect("name");
        let refused = Resolver { public_only: true }.call(name.clone()).await;
        let e = refused.expect_err("loopback only");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(
            e.to_string()
                .contains("INTENTGATE_OUTBOX_ALLOW_PRIVATE_NETWORKS"),
            "{e}"
        );
        let open = Resolver { public_only: false }
            .call(name)
            .await
            .expect("resolves");
        assert!(open.into_iter().all(|a| a.ip().is_loopback()));
    }
}
