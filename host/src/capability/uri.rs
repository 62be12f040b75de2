//! Resource URIs the gateway refuses to decide on because an upstream could read them as
//! another URI: a `resource_allow ["file:///public/*"]` must not let `file:///public/../etc/passwd`
//! through to a server that resolves dot segments (RFC 3986 §5.2.4), nor a `resource_deny`
//! be dodged by `%2e%2e`, an encoded `/` or a `\`. The gateway forwards the URI as written,
//! so it decides only on URIs whose every reading is the same.
//!
//! This module only judges a URI; it must never rewrite one (what is forwarded is what was
//! decided).

/// Why `uri` could be read as another URI, if it could: a dot segment (`.` or `..`, plain or
/// percent-encoded) in its path, an encoded `/` or `\` there, a `\`, or a scheme not written
/// in lower case (schemes compare case-insensitively, the caveats' patterns do not).
pub fn ambiguity(uri: &str) -> Option<&'static str> {
    // The path ends at the query or the fragment; what follows is not resolved.
    let path = uri.split(['?', '#']).next().unwrap_or(uri);
    if let Some((scheme, _)) = path.split_once(':')
        && is_scheme(scheme)
        && scheme.bytes().any(|b| b.is_ascii_uppercase())
    {
        return Some("its scheme must be written in lower case");
    }
    if path.contains('\\') {
        return Some("it holds a backslash, which some servers read as /");
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") {
        return Some("it holds an encoded / or \\ in its path");
    }
    let dot_segment = lower.split('/').any(|segment| {
        let decoded = segment.replace("%2e", ".");
        decoded == "." || decoded == ".."
    });
    dot_segment.then_some("it holds a dot segment (. or ..) in its path, which servers resolve")
}

/// RFC 3986 §3.1: `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`.
fn is_scheme(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::ambiguity;

    #[test]
    fn uris_an_upstream_could_resolve_elsewhere_are_refused() {
        for uri in [
            "file:///public/../etc/passwd",
            "file:///public/x/../secret.txt",
            "file:///public/%2e%2e/%2E%2e/etc/passwd",
            "file:///public/./secret.txt",
            "file:///public/..",
            "file:///public/%2fetc",
            "file:///public/%5C..",
            "file:///public\\..\\etc",
            "FILE:///public/secret.txt",
            "File:///x",
        ] {
            assert!(ambiguity(uri).is_some(), "{uri} was taken");
        }
    }

    #[test]
    fn ordinary_uris_are_taken() {
        for uri in [
            "file:///public/report.txt",
            "file:///public/a.b/c..d/...",
            "db://orders/{id}",
            "https://Example.com/a%20b",
            "ui://widget/view.html?path=../x#../y",
            "memo://insights",
            "test://static/resource/1",
            "urn:isbn:0451450523",
        ] {
            assert_eq!(ambiguity(uri), None, "{uri}");
        }
    }
}
