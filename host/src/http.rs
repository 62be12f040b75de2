//! Small HTTP helpers shared by the endpoints: the response body type, bounded body reads,
//! JSON replies and the JSON nesting guard.
//!
//! Nothing here may buffer without a bound: every read goes through [`read_body`].

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};

/// Every response body the gateway sends: whole buffers or streams (audit export).
pub type Body = BoxBody<Bytes, std::io::Error>;

/// A whole-buffer body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// A response with a JSON body.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    json_bytes(status, serde_json::to_vec(value).unwrap_or_default())
}

/// A response with an already-encoded JSON body.
pub fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A response with a status and no body.
pub fn status(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = status;
    resp
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("request body could not be read: {0}")]
    Read(String),
    #[error("request body not received within {} ms", .0.as_millis())]
    Timeout(std::time::Duration),
}

/// [`read_body`] with a deadline for the whole body: a client that sends its body slowly (or
/// never) cannot hold the request open longer than `deadline`.
pub async fn read_body_within<B>(
    body: B,
    limit: usize,
    deadline: std::time::Duration,
) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    tokio::time::timeout(deadline, read_body(body, limit))
        .await
        .unwrap_or(Err(BodyError::Timeout(deadline)))
}

/// Reads a body completely, refusing more than `limit` bytes (checked against `Content-Length`
/// first, then while reading).
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    if let Some(upper) = body.size_hint().exact()
        && upper > limit as u64
    {
        return Err(BodyError::TooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge { limit }),
        Err(e) => Err(BodyError::Read(e.to_string())),
    }
}

/// True when the JSON text nests objects and arrays no deeper than `max_depth`.
///
/// Runs before parsing so a hostile body cannot make any parser recurse deeply. Brackets inside
/// strings are skipped; the text need not be valid JSON (the parser judges that afterwards).
pub fn json_depth_within(text: &[u8], max_depth: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0usize;
    while i < text.len() {
        match text[i] {
            b'"' => {
                // A string's content cannot nest: skip it whole, escapes included.
                i += 1;
                loop {
                    let Some(at) = quote_or_backslash(&text[i..]) else {
                        return true; // unterminated: the parser refuses it
                    };
                    i += at;
                    if text[i] != b'\\' {
                        break;
                    }
                    i += 2;
                    if i >= text.len() {
                        return true;
                    }
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return false;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    true
}

/// Where the first `"` or `\\` of `s` is, eight bytes at a time (a large argument is mostly
/// string content, which this skips).
fn quote_or_backslash(s: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // Whether a byte of `x` is zero (the classic bit trick: exact in its lowest set byte).
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut chunks = s.chunks_exact(8);
    let mut offset = 0usize;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        let hits =
            zero_byte(x ^ (ONES * u64::from(b'"'))) | zero_byte(x ^ (ONES * u64::from(b'\\')));
        if hits != 0 {
            return Some(offset + (hits.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    let rest = chunks.remainder();
    rest.iter()
        .position(|b| *b == b'"' || *b == b'\\')
        .map(|p| offset + p)
}

/// The bearer credential of an `Authorization` header, if well formed.
pub fn bearer(headers: &hyper::HeaderMap) -> Option<&str> {
    let value = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim();
    (!token.is_empty()).then_some(token)
}

/// A header's value as text, when present and printable.
pub fn header_str<'a>(headers: &'a hyper::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A streamed response body: the chunks a producer task sends, ended when it drops its sender.
/// When the client goes, hyper drops the body and the producer's `Sender::closed` resolves.
pub struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// How long a response stream waits for its client to take the next bytes. A client that
/// stops reading (its socket's window full) would otherwise hold the stream's task, the call
/// behind it and its upstream connection for as long as its TCP connection lives.
pub const CLIENT_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// Sends `v` to the body of a response stream ([`channel`]); `false` when the client is gone
/// or took nothing for [`CLIENT_STALL`] (the stream should end: dropping its sender does).
pub async fn to_client<T>(tx: &tokio::sync::mpsc::Sender<T>, v: T) -> bool {
    send_within(tx, v, CLIENT_STALL).await
}

async fn send_within<T>(
    tx: &tokio::sync::mpsc::Sender<T>,
    v: T,
    stall: std::time::Duration,
) -> bool {
    tx.send_timeout(v, stall).await.is_ok()
}

/// A [`Body`] fed by `rx`.
pub fn channel(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Body {
    ChannelBody { rx }.boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream whose client stopped reading gives up after its stall bound, not never.
    #[tokio::test]
    async fn a_client_that_stops_reading_is_given_up_on() {
        let stall = std::time::Duration::from_millis(50);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        assert!(send_within(&tx, Bytes::from_static(b"a"), stall).await);
        let started = std::time::Instant::now();
        assert!(!send_within(&tx, Bytes::from_static(b"b"), stall).await);
        assert!(started.elapsed() >= stall);
        assert_eq!(rx.recv().await.as_deref(), Some(&b"a"[..]));
        drop(rx);
        assert!(!to_client(&tx, Bytes::from_static(b"c")).await);
    }

    /// The byte-at-a-time guard the fast one must agree with.
    fn depth_within_bytewise(text: &[u8], max_depth: usize) -> bool {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for &b in text {
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    depth += 1;
                    if depth > max_depth {
                        return false;
                    }
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        true
    }

    #[test]
    fn the_fast_depth_guard_agrees_with_the_bytewise_one() {
        // Texts over a small alphabet of structural bytes, quotes and escapes, at every
        // alignment of the eight-byte search.
        let alphabet = b"[]{}\"\\ax";
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for n in 0..20_000usize {
            let len = n % 40;
            let text: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    alphabet[(seed % alphabet.len() as u64) as usize]
                })
                .collect();
            for max in [0, 1, 2, 4] {
                assert_eq!(
                    json_depth_within(&text, max),
                    depth_within_bytewise(&text, max),
                    "{:?} at depth {max}",
                    String::from_utf8_lossy(&text)
                );
            }
        }
    }

    #[test]
    fn depth_guard_counts_only_structure() {
        assert!(json_depth_within(br#"{"a":[1,{"b":2}]}"#, 3));
        assert!(!json_depth_within(br#"{"a":[1,{"b":2}]}"#, 2));
        assert!(json_depth_within(br#"{"a":"[[[[[[[[[[\"[[["}"#, 1));
        let deep = "[".repeat(100_000);
        assert!(!json_depth_within(deep.as_bytes(), 64));
    }

    #[test]
    fn bearer_parsing() {
        let mut h = hyper::HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert("authorization", HeaderValue::from_static("Bearer abc"));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert("authorization", HeaderValue::from_static("bearer   xyz "));
        assert_eq!(bearer(&h), Some("xyz"));
        h.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }

    #[tokio::test]
    async fn body_limit_enforced() {
        let b = Full::new(Bytes::from(vec![b'x'; 100]));
        assert!(matches!(
            read_body(b, 10).await,
            Err(BodyError::TooLarge { limit: 10 })
        ));
        let b = Full::new(Bytes::from_static(b"ok"));
        assert_eq!(
            read_body(b, 10).await.expect("fits"),
            Bytes::from_static(b"ok")
        );
    }
}
