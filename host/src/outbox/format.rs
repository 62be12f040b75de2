//! Formatting a batch for its destination through a formatter component (world
//! `intentgate:plugin/formatter`, or its earlier name `siem-formatter`): the built-in one (the embedded
//! `siem-json` component, configured with the destination kind's `format`) or one a platform
//! team uploaded (`/v1/admin/plugins`) and bound to the destination by digest.
//!
//! The component runs off the async runtime (`spawn_blocking`) under the plugin deadline and
//! memory limit; what it returns is checked before it reaches the network: a bounded body, a
//! valid content type, and only headers that are valid and that the host does not own
//! (framing, `Host`, the signature headers). A formatter that traps, loops or returns garbage
//! is a failed delivery of its own destination only. This module must never send what a
//! formatter returned without these checks.

use std::sync::Arc;

use hyper::header::{HeaderName, HeaderValue};

use crate::plugins::siem::{FormattedRequest, Formatter};
use crate::plugins::{PluginError, Runtime};

/// Largest request body a formatter may produce (Datadog's intake takes 5 MB).
pub const MAX_BODY: usize = 5 << 20;
/// Most extra headers a formatter may set.
const MAX_HEADERS: usize = 32;

/// Headers the host sets itself.
const HOST_OWNED: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "x-intentgate-signature",
];

/// Whether a batch's size is why it could not be formatted or sent: the worker then sends a
/// smaller batch, and an event that is too large on its own is set aside as a dead letter
/// instead of holding its lane until the dead-letter age.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Oversize {
    /// Not a question of size (or not known to be).
    #[default]
    No,
    /// Possibly: the formatter ran out of memory or time (a smaller batch may pass; one event
    /// alone is retried as any failure).
    Perhaps,
    /// Certainly: the destination takes no request this large, so the same batch fails the
    /// same way every time.
    Yes,
    /// The destination refused the payload itself (HTTP 400 or 422): one of the batch's events,
    /// likely. A smaller batch isolates it; one event refused on several attempts in a row is
    /// set aside as a dead letter, so it does not hold its lane until the dead-letter age.
    Refused,
}

/// Why a batch could not be formatted: the text recorded as the delivery's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError {
    pub message: String,
    pub oversize: Oversize,
}

impl FormatError {
    fn new(message: impl Into<String>) -> Self {
        FormatError {
            message: message.into(),
            oversize: Oversize::No,
        }
    }

    /// An error of one batch's size, `Yes` or `Perhaps`.
    pub fn oversize(message: impl Into<String>, oversize: Oversize) -> Self {
        FormatError {
            message: message.into(),
            oversize,
        }
    }
}

/// A checked request, ready to send.
#[derive(Debug, Clone)]
pub struct Request {
    pub content_type: HeaderValue,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: bytes::Bytes,
}

/// A destination's compiled formatter with its configuration.
#[derive(Clone)]
pub struct Bound {
    formatter: Arc<Formatter>,
}

impl Bound {
    /// Compiles (cached by digest) and links `wasm`; refuses a component of another world.
    pub fn new(runtime: Arc<Runtime>, wasm: &[u8], config: &str) -> Result<Self, PluginError> {
        Ok(Bound {
            formatter: Arc::new(Formatter::new(runtime, wasm, config)?),
        })
    }

    /// Formats `events` (canonical JSON, oldest first) off the async runtime and checks the
    /// result. Errors are the text recorded as the delivery's error.
    pub async fn format(&self, events: Vec<String>) -> Result<Request, FormatError> {
        let formatter = self.formatter.clone();
        let out = tokio::task::spawn_blocking(move || formatter.format(&events))
            .await
            .map_err(|e| FormatError::new(format!("formatter task failed: {e}")))?
            .map_err(|e| {
                let oversize = match e {
                    PluginError::OutOfMemory { .. } | PluginError::Timeout { .. } => {
                        Oversize::Perhaps
                    }
                    _ => Oversize::No,
                };
                FormatError::oversize(format!("formatter: {e}"), oversize)
            })?;
        check(out)
    }
}

/// Checks a formatter's answer.
pub fn check(out: FormattedRequest) -> Result<Request, FormatError> {
    if out.body.len() > MAX_BODY {
        return Err(FormatError::oversize(
            format!(
                "formatter returned a {} byte body (limit {MAX_BODY})",
                out.body.len()
            ),
            Oversize::Yes,
        ));
    }
    check_rest(out).map_err(FormatError::new)
}

fn check_rest(out: FormattedRequest) -> Result<Request, String> {
    let content_type = HeaderValue::from_str(&out.content_type)
        .ok()
        .filter(|v| !v.is_empty() && out.content_type.contains('/'))
        .ok_or_else(|| "formatter returned an invalid content type".to_owned())?;
    if out.headers.len() > MAX_HEADERS {
        return Err(format!(
            "formatter returned {} headers (limit {MAX_HEADERS})",
            out.headers.len()
        ));
    }
    let mut headers = Vec::with_capacity(out.headers.len());
    for (name, value) in out.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| "formatter returned an invalid header name".to_owned())?;
        if HOST_OWNED.contains(&name.as_str()) || name.as_str().starts_with("proxy-") {
            return Err(format!(
                "formatter may not set the {name} header (the host owns it)"
            ));
        }
        let value = HeaderValue::from_str(&value)
            .map_err(|_| format!("formatter returned an invalid value for {name}"))?;
        headers.push((name, value));
    }
    Ok(Request {
        content_type,
        headers,
        body: out.body.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ct: &str, headers: &[(&str, &str)], body: usize) -> FormattedRequest {
        FormattedRequest {
            content_type: ct.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: vec![b'x'; body],
        }
    }

    #[test]
    fn garbage_is_refused() {
        assert!(
            check(req(
                "application/json",
                &[("authorization", "Splunk t")],
                10
            ))
            .is_ok()
        );
        assert!(check(req("", &[], 1)).is_err());
        assert!(check(req("text\nplain", &[], 1)).is_err());
        assert!(check(req("application/json", &[("host", "evil")], 1)).is_err());
        assert!(check(req("application/json", &[("webhook-signature", "v1,x")], 1)).is_err());
        assert!(check(req("application/json", &[("bad name", "v")], 1)).is_err());
        assert!(check(req("application/json", &[("x-a", "line\r\nbreak")], 1)).is_err());
        assert_eq!(
            check(req("application/json", &[], MAX_BODY + 1))
                .expect_err("too large")
                .oversize,
            Oversize::Yes
        );
        assert_eq!(
            check(req("", &[], 1)).expect_err("no type").oversize,
            Oversize::No
        );
    }
}
