//! A minimal HTTP/1.1 client for tests (hyper's client, one connection per request), so tests
//! can send exactly the bytes and headers they mean to.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Sends a request and returns status, headers and body bytes.
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, hyper::HeaderMap, Bytes) {
    let (status, headers, body) = open(method, url, headers, body).await;
    let body = body.collect().await.expect("body").to_bytes();
    (status, headers, body)
}

/// Sends a request and returns status, headers and the body still arriving, for a test that
/// reads a stream while it is being written.
pub async fn open(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, hyper::HeaderMap, hyper::body::Incoming) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body))).expect("request");
    let resp = client.request(req).await.expect("request sent");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.into_body())
}

/// POSTs JSON with an optional bearer token; returns status and the JSON answer (or Null).
pub async fn post_json(url: &str, bearer: Option<&str>, body: &Value) -> (u16, Value) {
    let auth = bearer.map(|b| format!("Bearer {b}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let (status, _, bytes) = send(
        "POST",
        url,
        &headers,
        serde_json::to_vec(body).expect("json"),
    )
    .await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// GETs JSON with a bearer token.
pub async fn get_json(url: &str, bearer: &str) -> (u16, Value) {
    let auth = format!("Bearer {bearer}");
    let (status, _, bytes) = send("GET", url, &[("authorization", &auth)], Vec::new()).await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A JSON upstream on loopback: every POST body is handed to `answer` (the body as text, the
/// request's URI) and its return is the `application/json` answer. For tests that need an
/// upstream whose bytes they control exactly.
pub async fn json_upstream(answer: fn(&[u8], &str) -> String) -> std::net::SocketAddr {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let uri = req.uri().to_string();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let text = answer(&body.unwrap_or_default(), &uri);
                        let mut resp = hyper::Response::new(Full::new(Bytes::from(text)));
                        resp.headers_mut().insert(
                            "content-type",
                            hyper::header::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}
