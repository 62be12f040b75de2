//! `GET /metrics`: on the main listener ([`handle`], routed by `server.rs`), or on a separate
//! plain-HTTP listener when `INTENTGATE_METRICS_ADDR` is set ([`serve`]); 404 on the main
//! listener when metrics are off or served elsewhere.
//!
//! Who may scrape: by default a bearer token, the metrics token (`INTENTGATE_METRICS_TOKEN`,
//! which opens nothing else) or the superadmin token, compared in constant time; a tenant
//! admin may not (the metrics cover every tenant). Without a token only when the operator
//! asked for it (`INTENTGATE_METRICS_AUTH=none`), which the configuration accepts only for a
//! separate listener on a loopback address. This module must never answer a scrape it has not
//! authorized, and never read a request body.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::Metrics;
use crate::admin::Principal;
use crate::gateway::Gateway;
use crate::http::{self, Body};

/// Connections the separate metrics listener serves at once (scrapers are few).
const METRICS_CONNECTIONS: usize = 16;

impl Gateway {
    /// This gateway's metrics.
    pub fn metrics(&self) -> &Metrics {
        self.pipeline.metrics()
    }
}

/// Which listener a scrape came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Main,
    Separate,
}

/// Whether the main listener routes `/metrics` here (on, and not on a listener of its own).
pub fn on_main_listener(gw: &Gateway) -> bool {
    let m = &gw.config.telemetry.metrics;
    m.enabled && m.addr.is_none()
}

/// Answers one request for `/metrics`.
pub fn handle<B>(gw: &Gateway, req: &Request<B>, listener: Listener) -> Response<Body> {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut resp = http::status(StatusCode::METHOD_NOT_ALLOWED);
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    if !authorized(gw, req.headers(), listener) {
        let mut resp = http::json(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "a bearer token is required: INTENTGATE_METRICS_TOKEN or the superadmin token"}),
        );
        resp.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"intentgate-metrics\""),
        );
        return resp;
    }
    let body = if req.method() == Method::HEAD {
        String::new()
    } else {
        super::collect::render(gw)
    };
    let mut resp = Response::new(http::full(body));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(super::exposition::CONTENT_TYPE),
    );
    resp
}

fn authorized(gw: &Gateway, headers: &hyper::HeaderMap, listener: Listener) -> bool {
    let m = &gw.config.telemetry.metrics;
    if m.open && listener == Listener::Separate {
        return true;
    }
    // The separate listener is plain HTTP: where it is reachable from the network the
    // superadmin token, which can do everything, is not taken there (a scraper set up with it
    // would send it in clear on every scrape); the metrics token, which can do only this, is.
    let cleartext_network =
        listener == Listener::Separate && m.addr.is_some_and(|a| !a.ip().is_loopback());
    let superadmin =
        !cleartext_network && gw.admin.authenticate(headers) == Some(Principal::Superadmin);
    let scraper = match (http::bearer(headers), &m.token) {
        (Some(presented), Some(token)) => {
            crate::secrets::BearerSecret::new(token).matches(presented)
        }
        _ => false,
    };
    superadmin | scraper
}

/// Serves `/metrics` alone on `listener` (plain HTTP) until `shutdown` resolves.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(gw.config.header_timeout)
        .max_buf_size(16 * 1024)
        // One scrape per connection: an idle scraper connection holds no slot.
        .keep_alive(false);
    let open = Arc::new(Semaphore::new(METRICS_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        // Over the cap the connection is closed unanswered: scrapers retry.
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            continue;
        };
        let gw = Arc::clone(&gw);
        let builder = builder.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req: Request<Incoming>| {
                let gw = Arc::clone(&gw);
                async move {
                    let resp = match req.uri().path() {
                        "/metrics" => handle(&gw, &req, Listener::Separate),
                        _ => http::json(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            if let Err(e) = builder
                .serve_connection(
                    TokioIo::new(crate::stall::Stalling::new(
                        stream,
                        crate::http::CLIENT_STALL,
                    )),
                    service,
                )
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

/// The separate metrics listener while it runs; dropping it stops it.
#[derive(Debug)]
pub struct MetricsListener {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MetricsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why the separate metrics listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics listener: {0}")]
    Serve(std::io::Error),
}

/// Binds and serves the separate metrics listener when `INTENTGATE_METRICS_ADDR` is set, and
/// says in the log where (and whether) `/metrics` is served.
pub async fn start_listener(gw: &Arc<Gateway>) -> Result<Option<MetricsListener>, ListenError> {
    let m = &gw.config.telemetry.metrics;
    let auth = if m.open {
        "no token (loopback only)"
    } else {
        "bearer token required"
    };
    let Some(addr) = m.addr.filter(|_| m.enabled) else {
        if m.enabled {
            tracing::info!(
                auth,
                "Prometheus metrics at GET /metrics on the main listener"
            );
        }
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(ListenError::Serve)?;
    let gw = Arc::clone(gw);
    let task = tokio::spawn(async move {
        if let Err(e) = serve(gw, listener, std::future::pending()).await {
            tracing::error!(error = %e, "metrics listener stopped");
        }
    });
    tracing::info!(%local, auth, "Prometheus metrics at GET /metrics on their own listener (plain HTTP)");
    Ok(Some(MetricsListener { addr: local, task }))
}
