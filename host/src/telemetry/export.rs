//! The background export of sampled traces over OTLP/HTTP with protobuf
//! (`POST {endpoint}/v1/traces`, `Content-Type: application/x-protobuf`).
//!
//! A call hands its finished trace to a bounded queue with `try_send` and goes on; when the
//! queue is full the trace is dropped and its spans counted
//! (`intentgate_trace_spans_dropped_total`). One task batches the queue (up to
//! `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` spans, or every `OTEL_BSP_SCHEDULE_DELAY`), encodes the
//! batch ([`super::otlp`]) and posts it; a failed export is counted and logged (at most once a
//! minute), not retried. [`Exporter::flush`] sends what is queued, at shutdown. This module must
//! never make a call wait on the collector, and never log the export headers (they may carry
//! credentials).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{mpsc, oneshot};

use super::trace::FinishedTrace;

/// Where and how traces are exported (from [`crate::config::TracingConfig`]).
#[derive(Clone)]
pub struct ExportSettings {
    /// The full traces URL (`…/v1/traces`).
    pub endpoint: Uri,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub service_name: String,
    pub max_queue: usize,
    pub max_batch: usize,
    pub delay: Duration,
    pub timeout: Duration,
}

enum Msg {
    Trace(FinishedTrace),
    Flush(oneshot::Sender<()>),
}

/// The exporter's queue and counters.
#[derive(Debug)]
pub struct Exporter {
    tx: mpsc::Sender<Msg>,
    /// Spans dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Spans accepted by the collector.
    pub exported: AtomicU64,
    /// Spans of exports that failed.
    pub failed: AtomicU64,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl Exporter {
    /// Starts the export task; `tls` is used for an https endpoint.
    pub fn start(
        settings: ExportSettings,
        tls: Arc<rustls::ClientConfig>,
    ) -> (Arc<Exporter>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(settings.max_queue.max(1));
        let exporter = Arc::new(Exporter {
            tx,
            dropped: AtomicU64::new(0),
            exported: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let task = tokio::spawn(run(Arc::clone(&exporter), settings, tls, rx));
        (exporter, task)
    }

    /// Queues a finished trace, or drops and counts it when the queue is full. Never waits.
    pub fn submit(&self, trace: FinishedTrace) {
        let spans = trace.spans.len() as u64;
        if self.tx.try_send(Msg::Trace(trace)).is_err() {
            self.dropped.fetch_add(spans, Relaxed);
        }
    }

    /// Exports everything queued so far; waits at most `limit`.
    pub async fn flush(&self, limit: Duration) {
        let (done, wait) = oneshot::channel();
        let flushed = async {
            if self.tx.send(Msg::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        };
        if tokio::time::timeout(limit, flushed).await.is_err() {
            tracing::warn!("traces not all exported within {limit:?} at shutdown");
        }
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

async fn run(
    exporter: Arc<Exporter>,
    settings: ExportSettings,
    tls: Arc<rustls::ClientConfig>,
    mut rx: mpsc::Receiver<Msg>,
) {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.timeout));
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(Arc::unwrap_or_clone(tls))
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client: HttpsClient = Client::builder(TokioExecutor::new()).build(connector);
    let warned = Mutex::new(None::<Instant>);
    let mut batch: Vec<FinishedTrace> = Vec::new();
    let mut spans = 0usize;
    loop {
        // Wait for the first trace of a batch, then at most the schedule delay for more.
        let deadline = tokio::time::Instant::now() + settings.delay;
        let mut flush = None;
        loop {
            let msg = if batch.is_empty() {
                rx.recv().await
            } else {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(m) => m,
                    Err(_) => break,
                }
            };
            match msg {
                Some(Msg::Trace(t)) => {
                    spans += t.spans.len();
                    batch.push(t);
                    if spans >= settings.max_batch {
                        break;
                    }
                }
                Some(Msg::Flush(done)) => {
                    flush = Some(done);
                    break;
                }
                None => break,
            }
        }
        if !batch.is_empty() {
            let traces = std::mem::take(&mut batch);
            let n = std::mem::take(&mut spans) as u64;
            match post(&client, &settings, &traces).await {
                Ok(()) => exporter.exported.fetch_add(n, Relaxed),
                Err(e) => {
                    let mut last = warned.lock().unwrap_or_else(|p| p.into_inner());
                    if last.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        *last = Some(Instant::now());
                        tracing::warn!(
                            endpoint = %crate::config::redact_url(&settings.endpoint),
                            error = %e,
                            "trace export failed ({n} spans dropped)"
                        );
                    }
                    exporter.failed.fetch_add(n, Relaxed)
                }
            };
        }
        if let Some(done) = flush {
            let _ = done.send(());
        }
        if rx.is_closed() && rx.is_empty() {
            return;
        }
    }
}

async fn post(
    client: &HttpsClient,
    settings: &ExportSettings,
    traces: &[FinishedTrace],
) -> Result<(), String> {
    let body = super::otlp::encode_request(&settings.service_name, traces);
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(settings.endpoint.clone())
        .header(CONTENT_TYPE, "application/x-protobuf");
    for (name, value) in &settings.headers {
        req = req.header(name, value.clone());
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        // Read the (small) answer so the connection can be reused; a collector that sends
        // more is not read to its end.
        let _ = http_body_util::Limited::new(resp.into_body(), 64 << 10)
            .collect()
            .await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("collector answered HTTP {status}"))
        }
    };
    tokio::time::timeout(settings.timeout, exchange)
        .await
        .map_err(|_| format!("timed out after {:?}", settings.timeout))?
}
