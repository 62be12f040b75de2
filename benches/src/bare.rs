//! The bare reverse proxy: the physical limit of proxying with this stack. Same hyper 1 server
//! settings as `intentgate::serve` (http1, keep-alive, header read timeout, 64 KiB buffers,
//! TCP_NODELAY), same upstream client as `intentgate::upstream::Upstream` (hyper-util legacy
//! pooled client, nodelay, 256 idle connections per host), and the same buffering: the request
//! body is read whole under a size bound before forwarding, and the upstream's answer is read
//! whole under a size bound before replying (the gateway must do both, to decide on the body
//! and to audit the outcome; a proxy that streamed would be measuring something else).
//!
//! It does no checks at all: no JSON parsing, no token, no audit. Whatever the gateway costs
//! above this is the price of the decision.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

const MAX_BODY: usize = 1 << 20;
const MAX_RESPONSE: usize = 8 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);

struct Proxy {
    upstream: Uri,
    client: Client<HttpConnector, Full<Bytes>>,
}

fn status(s: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = s;
    r
}

const PASSED: [HeaderName; 2] = [CONTENT_TYPE, ACCEPT];
/// The MCP transport and routing headers, passed as they are (a proxy with no checks).
const MCP_HEADERS: [&str; 4] = [
    "mcp-session-id",
    "mcp-protocol-version",
    "mcp-method",
    "mcp-name",
];

async fn forward(p: &Proxy, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return status(StatusCode::PAYLOAD_TOO_LARGE),
    };
    let mut out = Request::builder()
        .method(Method::POST)
        .uri(p.upstream.clone());
    for h in PASSED.iter() {
        if let Some(v) = parts.headers.get(h) {
            out = out.header(h, v);
        }
    }
    for h in MCP_HEADERS {
        if let Some(v) = parts.headers.get(h) {
            out = out.header(h, v);
        }
    }
    let Ok(out) = out.body(Full::new(body)) else {
        return status(StatusCode::BAD_REQUEST);
    };
    let answer = tokio::time::timeout(TIMEOUT, async {
        let resp = p
            .client
            .request(out)
            .await
            .map_err(|_| StatusCode::BAD_GATEWAY)?;
        let (parts, body) = resp.into_parts();
        let bytes = Limited::new(body, MAX_RESPONSE)
            .collect()
            .await
            .map_err(|_| StatusCode::BAD_GATEWAY)?
            .to_bytes();
        Ok::<_, StatusCode>((parts, bytes))
    })
    .await;
    match answer {
        Ok(Ok((parts, bytes))) => {
            let mut r = Response::new(Full::new(bytes));
            *r.status_mut() = parts.status;
            for h in [CONTENT_TYPE] {
                if let Some(v) = parts.headers.get(&h) {
                    r.headers_mut().insert(h, v.clone());
                }
            }
            if let Some(v) = parts.headers.get("mcp-session-id") {
                r.headers_mut().insert(
                    HeaderName::from_static("mcp-session-id"),
                    HeaderValue::clone(v),
                );
            }
            r
        }
        Ok(Err(s)) => status(s),
        Err(_) => status(StatusCode::GATEWAY_TIMEOUT),
    }
}

/// Proxies every request on `listener` to `upstream` forever.
pub async fn serve(listener: TcpListener, upstream: Uri) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(TIMEOUT));
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(connector);
    let proxy = Arc::new(Proxy { upstream, client });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5))
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let proxy = Arc::clone(&proxy);
        let service = service_fn(move |req| {
            let proxy = Arc::clone(&proxy);
            async move { Ok::<_, Infallible>(forward(&proxy, req).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
