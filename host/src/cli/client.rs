//! The CLI's HTTP client of the admin API: one request per call, the admin token as a bearer,
//! the tenant as `?tenant=`, JSON in and out, and every failure turned into a [`CliError`] that
//! says what to do next. It must never log or print the token.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::CliError;
use super::profile::{Output, Target};

/// Longest wait for a gateway answer (an export streams for longer: only its start is bounded).
const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Client {
    target: Target,
    http: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// A request body.
pub enum Payload<'a> {
    None,
    Json(&'a Value),
    Wasm(Vec<u8>),
}

impl Client {
    /// A client for `target`: plain http, or https verified against the system's roots or
    /// only `ca_file` (a gateway with its own CA, e.g. `INTENTGATE_TLS_CERT_FILE` self-signed).
    pub fn new(target: Target) -> Result<Client, CliError> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.enforce_http(false);
        let tls = crate::tls::client_config(&crate::config::UpstreamTls {
            ca_file: target.ca_file.clone(),
            ..Default::default()
        })
        .map_err(|e| CliError::Usage(format!("TLS toward the gateway: {e}")))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(std::sync::Arc::unwrap_or_clone(tls))
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        if let Some(host) = cleartext_remote(&target.url) {
            eprintln!(
                "intentgate: warning: the admin token goes to {host} over plain http, readable on \
                 the network; use an https:// gateway URL (loopback addresses are not warned about)"
            );
        }
        Ok(Client {
            target,
            http: HyperClient::builder(TokioExecutor::new()).build(connector),
        })
    }

    pub fn output(&self) -> Output {
        self.target.output
    }

    pub fn tenant(&self) -> Option<&str> {
        self.target.tenant.as_deref()
    }

    fn uri(&self, path: &str, query: &[(&str, String)]) -> String {
        let mut q: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        if let Some(t) = &self.target.tenant
            && !query.iter().any(|(k, _)| *k == "tenant")
        {
            q.push(format!("tenant={}", encode(t)));
        }
        if q.is_empty() {
            format!("{}{path}", self.target.url)
        } else {
            format!("{}{path}?{}", self.target.url, q.join("&"))
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        payload: Payload<'_>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, CliError> {
        let uri = self.uri(path, query);
        let (content_type, body) = match payload {
            Payload::None => (None, Bytes::new()),
            Payload::Json(v) => (Some("application/json"), Bytes::from(v.to_string())),
            Payload::Wasm(w) => (Some("application/wasm"), Bytes::from(w)),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(&uri)
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.target.token),
            )
            .header(
                header::USER_AGENT,
                concat!("intentgate-cli/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| CliError::Usage(format!("bad request to {uri}: {e}")))?;
        match tokio::time::timeout(TIMEOUT, self.http.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(CliError::Unreachable {
                url: self.target.url.clone(),
                detail: error_chain(&e),
            }),
            Err(_) => Err(CliError::Unreachable {
                url: self.target.url.clone(),
                detail: format!("no answer within {} s", TIMEOUT.as_secs()),
            }),
        }
    }

    /// One request whose answer is JSON (or empty, as `Value::Null`); a non-2xx answer is a
    /// [`CliError::Refused`] carrying the API's `error` text and a hint.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        payload: Payload<'_>,
    ) -> Result<Value, CliError> {
        let resp = self.send(method, path, query, payload).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CliError::Unreachable {
                url: self.target.url.clone(),
                detail: format!("the answer broke off: {e}"),
            })?
            .to_bytes();
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        if status.is_success() {
            Ok(value)
        } else {
            Err(refusal(status, &value, self.tenant()))
        }
    }

    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, CliError> {
        self.call(Method::GET, path, query, Payload::None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        self.call(Method::POST, path, &[], Payload::Json(body))
            .await
    }

    /// A streamed GET: `sink` gets the body's chunks as they arrive.
    pub async fn stream(
        &self,
        path: &str,
        query: &[(&str, String)],
        mut sink: impl FnMut(&[u8]) -> Result<(), CliError>,
    ) -> Result<(), CliError> {
        let resp = self.send(Method::GET, path, query, Payload::None).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(refusal(status, &value, self.tenant()));
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| CliError::Unreachable {
                url: self.target.url.clone(),
                detail: format!("the stream broke off: {e}"),
            })?;
            if let Some(data) = frame.data_ref() {
                sink(data)?;
            }
        }
        Ok(())
    }
}

/// A refused answer, with what to do next.
fn refusal(status: StatusCode, body: &Value, tenant: Option<&str>) -> CliError {
    let detail = body
        .get("error")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| match body {
            Value::Null => String::new(),
            other => other.to_string(),
        });
    let hint = match status.as_u16() {
        401 => "\n  hint: the admin token was not accepted; check INTENTGATE_ADMIN_TOKEN, --token-file or the profile's token".to_owned(),
        403 => format!(
            "\n  hint: this admin token may not act for tenant {:?}; use the tenant's own admin token or the superadmin token",
            tenant.unwrap_or("default")
        ),
        404 => "\n  hint: check the id or digest (list them with the matching `list` verb)".into(),
        409 => "\n  hint: the state changed under you or something still uses it; list and retry".into(),
        503 => "\n  hint: the gateway's store is unavailable; retry when /healthz is ok".into(),
        _ => String::new(),
    };
    CliError::Refused(format!("refused ({status}): {detail}{hint}"))
}

/// The error and its sources, for an unreachable gateway.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Percent-encodes a query value.
pub fn encode(v: &str) -> String {
    escape(v, b"-_.~")
}

/// Percent-encodes one path segment; `:` stays as it is (a digest is `sha256:…`, and the admin
/// API matches segments as sent).
pub fn segment(v: &str) -> String {
    escape(v, b"-_.~:@")
}

fn escape(v: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The host of a plain `http://` gateway URL that is not a loopback address, if `url` is one.
fn cleartext_remote(url: &str) -> Option<String> {
    let uri: hyper::Uri = url.parse().ok()?;
    if uri.scheme_str() != Some("http") || super::profile::is_loopback(url) {
        return None;
    }
    Some(
        uri.host()?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_to_another_host_is_cleartext() {
        assert_eq!(
            cleartext_remote("http://gw.example.com:8080").as_deref(),
            Some("gw.example.com")
        );
        assert_eq!(
            cleartext_remote("http://10.0.0.5").as_deref(),
            Some("10.0.0.5")
        );
        for quiet in [
            "https://gw.example.com",
            "http://127.0.0.1:8080",
            "http://localhost:8080",
            "http://[::1]:8080",
        ] {
            assert_eq!(cleartext_remote(quiet), None, "{quiet}");
        }
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(encode("last-24h"), "last-24h");
        assert_eq!(segment("sha256:ab/c d"), "sha256:ab%2Fc%20d");
    }

    #[test]
    fn refusals_carry_the_api_error_and_a_hint() {
        let e = refusal(
            StatusCode::FORBIDDEN,
            &serde_json::json!({"error": "tenant mismatch"}),
            Some("acme"),
        );
        let text = e.to_string();
        assert!(
            text.contains("tenant mismatch") && text.contains("\"acme\""),
            "{text}"
        );
        assert_eq!(e.exit_code(), 1);
    }
}
