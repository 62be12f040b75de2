//! `Host` and `Origin` validation for the MCP endpoints (DNS rebinding protection, as the MCP
//! transport requires of servers).
//!
//! A web page on `evil.example` whose name is made to resolve to 127.0.0.1 can reach a gateway
//! on a loopback listener from the victim's browser; its requests then carry `Host:
//! evil.example` and `Origin: http://evil.example`. So:
//! - the `Host` must be an allowed host: the configured list (`INTENTGATE_ALLOWED_HOSTS`), or,
//!   when none is configured, a loopback name (`localhost`, a loopback address) on a loopback
//!   listener and any name on other listeners (whose names the gateway cannot know);
//! - an `Origin`, when present, must be a configured origin (`INTENTGATE_ALLOWED_ORIGINS`), or,
//!   when none is configured, one whose host passes the host rule. A request without `Origin`
//!   does not come from a browser page and is not affected.
//!
//! A refusal is HTTP 403 with JSON-RPC `-32600`, before the body is read or the token is
//! looked at. This module only reads headers; it must never let a missing `Host` pass a
//! restricted listener.

use std::net::IpAddr;

use serde_json::Value;

use super::jsonrpc::{RpcError, code};

/// A host or authority (`name`, `name:port`, `[v6]:port`, `v6`) split into its lowercase-able
/// host (IPv6 without brackets) and port; `None` when it is not one.
pub fn split_host(authority: &str) -> Option<(&str, Option<u16>)> {
    if authority.is_empty()
        || authority
            .bytes()
            .any(|b| !b.is_ascii_graphic() || matches!(b, b'/' | b'@' | b'?' | b'#'))
    {
        return None;
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        match after {
            "" => (v6, None),
            p => (v6, Some(p.strip_prefix(':')?)),
        }
    } else if authority.matches(':').count() > 1 {
        (authority, None) // a bare IPv6 address
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok()?),
    };
    Some((host, port))
}

/// An origin `scheme://host[:port]` split into scheme, host and port; `None` otherwise.
pub fn parse_origin(origin: &str) -> Option<(&str, &str, Option<u16>)> {
    let (scheme, authority) = origin.split_once("://")?;
    let scheme_ok = !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return None;
    }
    let (host, port) = split_host(authority)?;
    Some((scheme, host, port))
}

fn is_loopback_name(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether `host`/`port` is allowed: by the configured list, or by the listener's default.
fn host_allowed(listen: IpAddr, allowed: &[String], host: &str, port: Option<u16>) -> bool {
    if allowed.is_empty() {
        return !listen.is_loopback() || is_loopback_name(host);
    }
    allowed.iter().any(|entry| {
        entry == "*"
            || match split_host(entry) {
                Some((h, None)) => h.eq_ignore_ascii_case(host),
                Some((h, Some(p))) => h.eq_ignore_ascii_case(host) && Some(p) == port,
                None => false,
            }
    })
}

fn refused(why: String) -> RpcError {
    RpcError::new(code::INVALID_REQUEST, "Invalid Request").with_data(Value::from(why))
}

/// Checks a request's `Host` (or HTTP/2 `:authority`) and `Origin` against the configuration
/// (`allowed_hosts`, `allowed_origins`: lowercased, as [`crate::config::Config`] holds them)
/// for a listener on `listen`.
pub fn check(
    listen: IpAddr,
    allowed_hosts: &[String],
    allowed_origins: &[String],
    host: Option<&str>,
    origin: Option<&str>,
) -> Result<(), RpcError> {
    let restricted = listen.is_loopback() || !allowed_hosts.is_empty();
    match host.map(|h| (h, split_host(h))) {
        Some((_, Some((name, port)))) if host_allowed(listen, allowed_hosts, name, port) => {}
        None if !restricted => {}
        Some((raw, _)) => {
            let shown: String = raw.chars().take(128).collect();
            return Err(refused(format!(
                "Host {shown:?} is not an allowed host of this gateway (INTENTGATE_ALLOWED_HOSTS)"
            )));
        }
        None => return Err(refused("the request has no Host".into())),
    }
    let Some(origin) = origin else {
        return Ok(());
    };
    let shown: String = origin.chars().take(128).collect();
    let allowed = if allowed_origins.is_empty() {
        match parse_origin(origin) {
            Some((_, name, port)) => host_allowed(listen, allowed_hosts, name, port),
            // `null` (a sandboxed page, a file) and anything unreadable.
            None => !restricted,
        }
    } else {
        allowed_origins
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    };
    if allowed {
        Ok(())
    } else {
        Err(refused(format!(
            "Origin {shown:?} is not an allowed origin of this gateway (INTENTGATE_ALLOWED_ORIGINS)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const ANY: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

    fn list(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn authorities_split() {
        assert_eq!(split_host("localhost"), Some(("localhost", None)));
        assert_eq!(
            split_host("127.0.0.1:8080"),
            Some(("127.0.0.1", Some(8080)))
        );
        assert_eq!(split_host("[::1]:80"), Some(("::1", Some(80))));
        assert_eq!(split_host("[::1]"), Some(("::1", None)));
        assert_eq!(split_host("::1"), Some(("::1", None)));
        for bad in [
            "", ":80", "a:b", "a b", "[::1", "[::1]x", "u@h", "h/p", "h:99999",
        ] {
            assert_eq!(split_host(bad), None, "{bad}");
        }
        assert_eq!(
            parse_origin("http://localhost:3000"),
            Some(("http", "localhost", Some(3000)))
        );
        assert_eq!(parse_origin("null"), None);
    }

    #[test]
    fn loopback_listener_answers_loopback_names_only() {
        let ok = |h: &str, o: Option<&str>| check(LOOP, &[], &[], Some(h), o).is_ok();
        assert!(ok("127.0.0.1:8080", None));
        assert!(ok("localhost:8080", Some("http://localhost:3000")));
        assert!(ok("LOCALHOST", None));
        assert!(ok("[::1]:8080", Some("http://127.0.0.1")));
        assert!(!ok("evil.example:8080", None), "DNS rebinding");
        assert!(!ok("127.0.0.1:8080", Some("http://evil.example")));
        assert!(!ok("127.0.0.1:8080", Some("null")));
        let e = check(LOOP, &[], &[], None, None).expect_err("no host");
        assert_eq!(e.code, code::INVALID_REQUEST);
    }

    #[test]
    fn other_listeners_and_configured_lists() {
        assert!(
            check(
                ANY,
                &[],
                &[],
                Some("gw.example"),
                Some("https://app.example")
            )
            .is_ok()
        );
        assert!(check(ANY, &[], &[], None, None).is_ok());
        let hosts = list(&["gw.example", "localhost:9000"]);
        assert!(check(ANY, &hosts, &[], Some("GW.example:443"), None).is_ok());
        assert!(check(ANY, &hosts, &[], Some("localhost:9000"), None).is_ok());
        assert!(check(ANY, &hosts, &[], Some("localhost:9001"), None).is_err());
        assert!(check(ANY, &hosts, &[], Some("other.example"), None).is_err());
        assert!(check(ANY, &hosts, &[], None, None).is_err());
        // Configured hosts replace the loopback default.
        assert!(check(LOOP, &hosts, &[], Some("127.0.0.1"), None).is_err());
        assert!(check(LOOP, &list(&["*"]), &[], Some("any.example"), None).is_ok());
        let origins = list(&["https://app.example"]);
        assert!(
            check(
                ANY,
                &hosts,
                &origins,
                Some("gw.example"),
                Some("https://app.example")
            )
            .is_ok()
        );
        assert!(
            check(
                ANY,
                &hosts,
                &origins,
                Some("gw.example"),
                Some("https://gw.example")
            )
            .is_err(),
            "a configured origin list is the whole list"
        );
    }
}
