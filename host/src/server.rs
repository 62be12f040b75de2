//! The accept loop ([`serve`]) with its request limits, and routing: `/v1/mcp` and
//! `/v1/tool-call` to the MCP service, `/v1/admin/` to the admin service, `/healthz` and
//! `/metrics`. [`run`] starts the gateway ([`crate::gateway`]) and serves it.
//!
//! The accept loop serves plain HTTP or TLS (the certificate follows its files, see
//! [`crate::tls`]) and at most `INTENTGATE_MAX_CONNECTIONS` connections at once: one more is
//! answered 503 with `Retry-After` and closed. It must never let a slow client hold a
//! connection open without sending headers (header read timeout, which also bounds the TLS
//! handshake), and never read a body without a bound. It handles no endpoint's requests
//! itself beyond the health answer: each endpoint is its service's.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::Config;
use crate::gateway::{Gateway, StartError};
use crate::http::{self, Body};
use crate::proxy::Endpoint;

/// At most this many refusals (cap reached) are being written at once; beyond, a connection
/// is closed without an answer.
const REFUSALS_IN_FLIGHT: usize = 64;

/// How often the "connection cap reached" warning may be logged.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Serves HTTP (or HTTPS, when the gateway has a listener certificate) on `listener` until
/// `shutdown` resolves, then drains open connections.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(gw.config.header_timeout)
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    let acceptor = gw.tls.as_ref().map(crate::tls::ServerTls::acceptor);
    let max_connections = gw.config.max_connections;
    let open = Arc::new(Semaphore::new(max_connections));
    let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
    let mut refusal_log = RefusalLog::default();
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // The permit lives as long as the connection.
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            refusal_log.refused(max_connections);
            if let Ok(slot) = Arc::clone(&refusals).try_acquire_owned() {
                let acceptor = acceptor.clone();
                let timeout = gw.config.header_timeout;
                tokio::spawn(async move {
                    let _slot = slot;
                    refuse(stream, acceptor, max_connections, timeout).await;
                });
            }
            continue;
        };
        // A peer that stops taking the answers gives its slot back (see `stall`).
        let stream = crate::stall::Stalling::new(stream, http::CLIENT_STALL);
        let gw = Arc::clone(&gw);
        let service = {
            let gw = Arc::clone(&gw);
            service_fn(move |req| {
                let gw = Arc::clone(&gw);
                async move { Ok::<_, Infallible>(route(&gw, req, remote).await) }
            })
        };
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        let open_connection = gw.metrics().server.connection();
        tokio::spawn(async move {
            let _permit = (permit, open_connection);
            let ended = match acceptor {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(gw.config.header_timeout, acceptor.accept(stream))
                            .await;
                    let tls = match handshake {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %remote, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                    let conn = builder.serve_connection(TokioIo::new(tls), service);
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(10)) => {
            tracing::warn!("connections still open after 10 s; closing");
        }
    }
    // Each upstream's shared session is ended there (the upstreams are asked at once, and
    // waited for at most 2 s in all).
    let mut ending = tokio::task::JoinSet::new();
    for (name, _) in gw.upstreams.iter() {
        if let Some(u) = gw.upstreams.shared(name) {
            ending.spawn(async move { u.end_session(Duration::from_secs(2)).await });
        }
    }
    let all = async { while ending.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_secs(2), all).await;
    // Denials the throttle counted in this window are recorded, then the audit writers
    // record what is late and sign their final checkpoints, before the runtime ends.
    gw.pipeline.flush_throttled().await;
    gw.pipeline.audit().shutdown(Duration::from_secs(5)).await;
    // Sampled traces still queued are sent before the process goes.
    if let Some(exporter) = gw.tracer.exporter() {
        exporter.flush(Duration::from_secs(5)).await;
    }
    Ok(())
}

/// Counts refused connections and logs at most once per [`REFUSAL_LOG_INTERVAL`] (a flood
/// must not become a flood of log lines).
#[derive(Default)]
struct RefusalLog {
    last: Option<std::time::Instant>,
    unlogged: u64,
}

impl RefusalLog {
    fn refused(&mut self, max_connections: usize) {
        self.unlogged += 1;
        if self
            .last
            .is_some_and(|t| t.elapsed() < REFUSAL_LOG_INTERVAL)
        {
            return;
        }
        tracing::warn!(
            max_connections,
            refused = self.unlogged,
            "connection cap reached (INTENTGATE_MAX_CONNECTIONS): refusing new connections with 503"
        );
        self.last = Some(std::time::Instant::now());
        self.unlogged = 0;
    }
}

/// Answers a connection over the cap: `503` with a JSON body and `Retry-After`, then closes.
/// The client's request is read and discarded for a moment after the answer, so closing with
/// unread data does not reset the connection before the client has read the refusal.
async fn refuse(
    stream: TcpStream,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    max_connections: usize,
    timeout: Duration,
) {
    let body = json!({
        "error": "too many connections",
        "max_connections": max_connections,
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(timeout, async move {
        match acceptor {
            None => write_and_linger(stream, answer.as_bytes()).await,
            Some(acceptor) => {
                if let Ok(tls) = acceptor.accept(stream).await {
                    write_and_linger(tls, answer.as_bytes()).await;
                }
            }
        }
    })
    .await;
}

async fn write_and_linger<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, answer: &[u8]) {
    if stream.write_all(answer).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut drained = 0usize;
    while drained < 64 << 10 {
        match stream.read(&mut sink).await {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

async fn route(gw: &Arc<Gateway>, req: Request<Incoming>, remote: SocketAddr) -> Response<Body> {
    let path = req.uri().path();
    match path {
        "/v1/mcp" | "/v1/tool-call" => {
            let endpoint = if path == "/v1/mcp" {
                Endpoint::Mcp
            } else {
                Endpoint::ToolCall
            };
            // The request's trace (continuing the agent's W3C trace context) and its log span.
            let trace = gw.tracer.start(
                http::header_str(req.headers(), "traceparent"),
                http::header_str(req.headers(), "tracestate"),
            );
            crate::telemetry::trace::scope(
                trace,
                crate::proxy::handle(&gw.mcp, req, remote, endpoint),
            )
            .await
        }
        "/healthz" if req.method() == Method::GET => health(gw),
        "/metrics" if crate::metrics::endpoint::on_main_listener(gw) => {
            crate::metrics::endpoint::handle(gw, &req, crate::metrics::endpoint::Listener::Main)
        }
        // Boxed: the admin API's future is the largest of all (about 29 KiB); nested here, it
        // would size (and hyper would move) every MCP request's future too.
        p if p.starts_with("/v1/admin/") => Box::pin(gw.admin.handle(req, remote)).await,
        _ => http::json(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
    }
}

fn health(gw: &Gateway) -> Response<Body> {
    let fresh = gw.revocations.check_fresh().is_ok();
    // A failed sync of the audit log's WAL refuses every call until a restart (which is what
    // a 503 here asks an orchestrator for).
    let durable = !gw.pipeline.audit().outbox_router().durable().failed();
    let status = if fresh && durable {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    http::json(
        status,
        &json!({
            "status": if fresh && durable { "ok" } else { "degraded" },
            "version": env!("CARGO_PKG_VERSION"),
            "revocations_fresh": fresh,
            "audit_durable": durable,
            // Unauthenticated: whether an upstream is configured, never its URL (it may carry
            // credentials in its userinfo or query).
            "upstream_configured": !gw.upstreams.is_empty(),
            // Their names only (what tokens' `mcp_allow` name), never their URLs, with what
            // the last exchange with each showed (`unknown`, `up`, `down`). An upstream down
            // is not a 503: this gateway still serves the others.
            "upstreams": gw.upstreams.health()
                .map(|(name, h)| json!({"name": name, "status": h.as_str()}))
                .collect::<Vec<_>>(),
            // Over INTENTGATE_OUTBOX_BACKLOG_ALARM undelivered events: raised, never a 503 (a
            // restart would not deliver them sooner).
            "outbox_backlog_alarm": gw.outbox.alarm(),
        }),
    )
}

/// Why `intentgate serve` stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::endpoint::ListenError),
}

/// Starts the gateway on the configured address and serves until `shutdown`.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let addr = config.addr;
    let gw = Gateway::start(config).await?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(RunError::Serve)?;
    let scheme = if gw.tls.is_some() { "https" } else { "http" };
    tracing::info!(%local, scheme, "IntentGate listening (MCP endpoint POST /v1/mcp)");
    match &gw.secrets_file {
        Some(f) => tracing::info!(
            file = %f.display(),
            "master key and superadmin token are in this file (mode 0600)"
        ),
        None => tracing::info!("master key and superadmin token come from the environment"),
    }
    if gw.upstreams.is_empty() {
        tracing::warn!(
            "no INTENTGATE_UPSTREAM_URL, INTENTGATE_UPSTREAMS or INTENTGATE_UPSTREAMS_FILE: allowed calls answer -32018 upstream unavailable"
        );
    }
    for (name, u) in gw.upstreams.iter() {
        if gw.config.demo {
            tracing::info!(upstream = %u.redacted_uri(), "demo tool server running as the upstream");
        } else {
            tracing::info!(%name, upstream = %u.redacted_uri(), revision = u.revision().as_str(), "forwarding allowed calls");
        }
    }
    if gw.upstreams.namespaced() {
        tracing::info!(
            separator = %gw.upstreams.separator(),
            "several upstreams: tools and prompts are named UPSTREAM, separator, NAME; resource URIs UPSTREAM+URI"
        );
    }
    let _metrics = crate::metrics::endpoint::start_listener(&gw).await?;
    serve(gw, listener, shutdown).await.map_err(RunError::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Size of the future an async fn returns, for arguments borrowed for `'a`.
    fn future_size<'a, F, Fut>(_: F) -> usize
    where
        F: FnOnce(&'a Arc<Gateway>, Request<Incoming>, SocketAddr) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// hyper moves each request's future (a copy of all of it) as it takes it in: the routing
    /// future must hold its endpoints' deep futures behind pointers, not inline (it was about
    /// 29 KiB with the admin API's future nested in it).
    #[test]
    fn a_requests_routing_future_stays_small() {
        let bytes = future_size(route);
        assert!(bytes <= 4096, "route's future is {bytes} bytes");
    }
}
