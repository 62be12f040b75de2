//! Microsoft Sentinel through the Azure Monitor Logs Ingestion API: a batch is a JSON array
//! POSTed to `{DCE}/dataCollectionRules/{DCR immutable id}/streams/{stream}?api-version=2023-01-01`
//! with `Authorization: Bearer <token>`, the token coming from a Microsoft Entra
//! client-credentials flow (form POST of `grant_type=client_credentials`, `client_id`,
//! `client_secret`, `scope=https://monitor.azure.com//.default` to the token URL), cached
//! until shortly before it expires and dropped when the API answers 401.
//!
//! The destination's URL is the data collection endpoint (or the DCR's logs ingestion
//! endpoint). Settings: `dcr_immutable_id` and `stream` (required), `client_id` (required),
//! `tenant_id` (the token URL is then Entra's `…/{tenant_id}/oauth2/v2.0/token`) or
//! `token_url` (any token endpoint: sovereign clouds, a local test). The destination's secret
//! is the client secret. A call carries at most 1 MB; a larger batch is split.
//!
//! This module must never log or return a token or the client secret, and never send the
//! client secret anywhere but the configured token URL.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::OutboxError;
use super::format::{FormatError, Oversize};

/// The Logs Ingestion API version used.
pub const API_VERSION: &str = "2023-01-01";
/// The scope of a token for the Logs Ingestion API.
pub const SCOPE: &str = "https://monitor.azure.com//.default";
/// Largest body of one call (the API refuses more than 1 MB).
pub const MAX_CALL: usize = 1 << 20;
/// Entra's token endpoint for a directory.
pub const ENTRA_TOKEN_URL: &str = "https://login.microsoftonline.com/{tenant_id}/oauth2/v2.0/token";

/// A Sentinel destination's target: where to post and how to get a token.
#[derive(Debug, Clone)]
pub struct SentinelTarget {
    /// The full ingestion URL.
    pub ingest: hyper::Uri,
    pub token_url: hyper::Uri,
    pub client_id: String,
}

fn path_segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl SentinelTarget {
    /// From the destination's URL (the DCE) and settings; names the missing or bad setting.
    pub fn new(dce: &hyper::Uri, settings: &Map<String, Value>) -> Result<Self, OutboxError> {
        let get = |k: &str| {
            settings
                .get(k)
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
        };
        let need = |k: &str| {
            get(k).ok_or_else(|| {
                OutboxError::Invalid(format!("a sentinel destination needs settings.{k}"))
            })
        };
        let dcr = need("dcr_immutable_id")?;
        let stream = need("stream")?;
        for (k, v) in [("dcr_immutable_id", dcr), ("stream", stream)] {
            if !path_segment_ok(v) {
                return Err(OutboxError::Invalid(format!(
                    "settings.{k} must be [A-Za-z0-9._-], not {v:?}"
                )));
            }
        }
        let client_id = need("client_id")?.to_owned();
        let token_url = match (get("token_url"), get("tenant_id")) {
            (Some(u), _) => u.to_owned(),
            (None, Some(t)) if path_segment_ok(t) => ENTRA_TOKEN_URL.replace("{tenant_id}", t),
            (None, Some(t)) => {
                return Err(OutboxError::Invalid(format!(
                    "settings.tenant_id {t:?} is not a directory id"
                )));
            }
            (None, None) => {
                return Err(OutboxError::Invalid(
                    "a sentinel destination needs settings.tenant_id or settings.token_url".into(),
                ));
            }
        };
        let token_url: hyper::Uri = token_url
            .parse()
            .ok()
            .filter(|u: &hyper::Uri| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            })
            .ok_or_else(|| {
                OutboxError::Invalid("settings.token_url must be an absolute http(s) URL".into())
            })?;
        let base = format!(
            "{}://{}{}",
            dce.scheme_str().unwrap_or("https"),
            dce.authority().map(|a| a.as_str()).unwrap_or(""),
            dce.path().trim_end_matches('/')
        );
        let ingest =
            format!("{base}/dataCollectionRules/{dcr}/streams/{stream}?api-version={API_VERSION}")
                .parse()
                .map_err(|e| OutboxError::Invalid(format!("sentinel ingestion URL: {e}")))?;
        Ok(SentinelTarget {
            ingest,
            token_url,
            client_id,
        })
    }

    /// The form body of the client-credentials token request.
    pub fn token_form(&self, client_secret: &str) -> String {
        form_urlencoded(&[
            ("grant_type", "client_credentials"),
            ("client_id", &self.client_id),
            ("client_secret", client_secret),
            ("scope", SCOPE),
        ])
    }
}

/// `application/x-www-form-urlencoded` of `pairs`.
pub fn form_urlencoded(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                    out.push(b as char)
                }
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
        out
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// An access token and when to stop using it.
struct Cached {
    token: String,
    until: Instant,
}

/// The longest a cached access token is used, whatever its endpoint says.
const MOST_TOKEN_LIFE: Duration = Duration::from_secs(86_400);

/// The token cache of one destination.
#[derive(Default)]
pub struct TokenCache {
    inner: Mutex<Option<Cached>>,
    /// Held while a token is requested, so lanes waiting for one share a single request.
    fetch: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCache(<redacted>)")
    }
}

impl TokenCache {
    /// The cached token if it is still good.
    pub fn get(&self) -> Option<String> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref()
            .filter(|c| Instant::now() < c.until)
            .map(|c| c.token.clone())
    }

    /// Caches `token`, valid for `expires_in` from now: it is used until a minute before that
    /// (half its life when it is shorter than two minutes).
    pub fn put(&self, token: String, expires_in: Duration) {
        // The token endpoint's number is not trusted to be sane: a day at most, and never an
        // `Instant` past what the clock can hold (an overflow would end the lane's task).
        let expires_in = expires_in.min(MOST_TOKEN_LIFE);
        let margin = if expires_in >= Duration::from_secs(120) {
            Duration::from_secs(60)
        } else {
            expires_in / 2
        };
        let now = Instant::now();
        let until = now
            .checked_add(expires_in.saturating_sub(margin))
            .unwrap_or(now);
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = Some(Cached { token, until });
    }

    /// Waits for the right to request a token (then check [`TokenCache::get`] again: the
    /// previous holder may have got one).
    pub async fn fetching(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.fetch.lock().await
    }

    /// Forgets the token (the API refused it).
    pub fn clear(&self) {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Reads a token endpoint's answer: `access_token` and `expires_in` (seconds, a number or a
/// string as older endpoints send it; one hour when absent).
pub fn parse_token(body: &[u8]) -> Result<(String, Duration), String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|_| "token endpoint answered no JSON".to_owned())?;
    let token = v
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| "token endpoint answered no access_token".to_owned())?;
    let secs = match v.get("expires_in") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => Some(3600),
    }
    .unwrap_or(3600);
    Ok((token.to_owned(), Duration::from_secs(secs)))
}

/// The error text of a refused token request: Entra's `error` code and description (which
/// never carry the secret), bounded.
pub fn token_error(status: u16, body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let code = v.get("error").and_then(Value::as_str).unwrap_or("");
    let desc: String = v
        .get("error_description")
        .and_then(Value::as_str)
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    format!("token endpoint: HTTP {status} {code} {desc}")
        .trim()
        .to_owned()
}

/// The most records one formatted batch may hold: a formatter's body (at most
/// `format::MAX_BODY`) of tiny records must not make the host hold millions of them.
pub const MAX_RECORDS: usize = 50_000;

/// Splits a JSON array body into bodies of at most [`MAX_CALL`] bytes (whole records, as the
/// formatter wrote them; a single record over the limit is an error). The records are
/// counted before they are kept, and kept as slices of `body`, so the split holds little
/// more than the body twice, whatever the formatter wrote.
pub fn split_array(body: &[u8]) -> Result<Vec<Vec<u8>>, FormatError> {
    if body.len() <= MAX_CALL {
        return Ok(vec![body.to_vec()]);
    }
    let not_array = || {
        FormatError::oversize(
            "the sentinel formatter did not return a JSON array",
            Oversize::No,
        )
    };
    // A vector of a zero-sized type allocates nothing per record.
    let count = serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(body)
        .map_err(|_| not_array())?
        .len();
    if count > MAX_RECORDS {
        return Err(FormatError::oversize(
            format!(
                "the sentinel formatter returned {count} records for one batch; at most {MAX_RECORDS}"
            ),
            Oversize::No,
        ));
    }
    let records: Vec<&serde_json::value::RawValue> =
        serde_json::from_slice(body).map_err(|_| not_array())?;
    let mut out = Vec::new();
    let mut cur: Vec<u8> = vec![b'['];
    for r in records {
        let rec = r.get().trim().as_bytes();
        if rec.len() + 2 > MAX_CALL {
            return Err(FormatError::oversize(
                format!(
                    "one record is {} bytes; a Logs Ingestion call takes at most {MAX_CALL}",
                    rec.len()
                ),
                Oversize::Yes,
            ));
        }
        if cur.len() + rec.len() + 2 > MAX_CALL {
            cur.push(b']');
            out.push(std::mem::replace(&mut cur, vec![b'[']));
        }
        if cur.len() > 1 {
            cur.push(b',');
        }
        cur.extend_from_slice(rec);
    }
    if cur.len() > 1 {
        cur.push(b']');
        out.push(cur);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    /// A token endpoint answering an absurd `expires_in` gets a day at most, and no panic.
    #[test]
    fn an_absurd_token_life_is_capped_not_a_panic() {
        let cache = TokenCache::default();
        cache.put("t".into(), Duration::from_secs(u64::MAX));
        assert_eq!(cache.get().as_deref(), Some("t"));
        let until = cache
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.until);
        assert!(until.is_some_and(|u| u <= Instant::now() + MOST_TOKEN_LIFE));
    }

    #[test]
    fn target_urls() {
        let dce: hyper::Uri = "https://my-dce-abcd.eastus-1.ingest.monitor.azure.com/"
            .parse()
            .expect("uri");
        let t = SentinelTarget::new(
            &dce,
            &settings(serde_json::json!({
                "dcr_immutable_id": "dcr-000a00a000a00000a000000aa000a0aa",
                "stream": "Custom-IntentGate_CL", "client_id": "app", "tenant_id": "contoso-dir"
            })),
        )
        .expect("target");
        assert_eq!(
            t.ingest.to_string(),
            "https://my-dce-abcd.eastus-1.ingest.monitor.azure.com/dataCollectionRules/dcr-000a00a000a00000a000000aa000a0aa/streams/Custom-IntentGate_CL?api-version=2023-01-01"
        );
        assert_eq!(
            t.token_url.to_string(),
            "https://login.microsoftonline.com/contoso-dir/oauth2/v2.0/token"
        );
        assert_eq!(
            t.token_form("a b&c"),
            "grant_type=client_credentials&client_id=app&client_secret=a+b%26c&scope=https%3A%2F%2Fmonitor.azure.com%2F%2F.default"
        );
        let missing = SentinelTarget::new(&dce, &settings(serde_json::json!({"stream": "s"})));
        assert!(missing.is_err());
        let bad = SentinelTarget::new(
            &dce,
            &settings(
                serde_json::json!({"dcr_immutable_id": "a/../b", "stream": "s",
                                         "client_id": "c", "tenant_id": "t"}),
            ),
        );
        assert!(bad.is_err());
    }

    #[test]
    fn tokens_are_cached_until_shortly_before_expiry() {
        let c = TokenCache::default();
        assert_eq!(c.get(), None);
        c.put("t1".into(), Duration::from_secs(3600));
        assert_eq!(c.get().as_deref(), Some("t1"));
        c.clear();
        assert_eq!(c.get(), None);
        c.put("t2".into(), Duration::ZERO);
        assert_eq!(c.get(), None, "an expired token is not used");
        assert_eq!(
            parse_token(br#"{"token_type":"Bearer","expires_in":"3599","access_token":"x"}"#),
            Ok(("x".to_owned(), Duration::from_secs(3599)))
        );
        assert!(parse_token(br#"{"error":"invalid_client"}"#).is_err());
    }

    #[test]
    fn large_batches_are_split_under_the_call_limit() {
        let rec = format!("{{\"m\":\"{}\"}}", "x".repeat(300_000));
        let body = format!("[{rec},{rec},{rec},{rec},{rec}]");
        let parts = split_array(body.as_bytes()).expect("split");
        assert!(parts.len() >= 2);
        let mut n = 0;
        for p in &parts {
            assert!(p.len() <= MAX_CALL);
            let v: Vec<Value> = serde_json::from_slice(p).expect("array");
            n += v.len();
        }
        assert_eq!(n, 5);
        let huge = format!("[{{\"m\":\"{}\"}}]", "x".repeat(MAX_CALL + 10));
        assert!(split_array(huge.as_bytes()).is_err());
    }

    /// A formatter's body of millions of tiny records is refused, not held record by record;
    /// as many records as a batch could mean are split, and kept as the formatter wrote them.
    #[test]
    fn a_body_of_countless_tiny_records_is_refused() {
        let zeros = format!("[{}0]", "0,".repeat(2_600_000));
        let e = split_array(zeros.as_bytes()).expect_err("too many records");
        assert!(e.message.contains("records"), "{}", e.message);
        let rec = format!("{{ \"m\": \"{}\" }}", "y".repeat(40));
        let body = format!("[{}]", vec![rec.as_str(); MAX_RECORDS].join(", "));
        assert!(body.len() > MAX_CALL);
        let parts = split_array(body.as_bytes()).expect("split");
        let mut n = 0;
        for p in &parts {
            assert!(p.len() <= MAX_CALL);
            let v: Vec<Value> = serde_json::from_slice(p).expect("array");
            n += v.len();
        }
        assert_eq!(n, MAX_RECORDS);
        assert!(String::from_utf8_lossy(&parts[0]).starts_with(&format!("[{rec},")));
    }
}
