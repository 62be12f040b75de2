//! The running gateway: start-up ([`Gateway::start`]), the accept loop ([`serve`]) with its
//! request limits, and routing to the MCP, admin and health endpoints.
//!
//! Start-up checks everything it can before the listener accepts (secrets, store, migrations,
//! audit key, TLS files) and refuses to start with a clear error. The accept loop serves plain
//! HTTP or TLS (the certificate follows its files, see [`crate::tls`]) and at most
//! `INTENTGATE_MAX_CONNECTIONS` connections at once: one more is answered 503 with
//! `Retry-After` and closed. It must never let a slow client hold a connection open without
//! sending headers (header read timeout, which also bounds the TLS handshake), and never read
//! a body without a bound.

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

use crate::admin::AdminAuth;
use crate::audit::{AuditLog, LogKey};
use crate::bundles::persist::{Follower, Persist};
use crate::bundles::{BundleSpec, Registry};
use crate::capability::{CapabilityError, Grant, MasterKey, RevocationSet, Verifier};
use crate::config::{Config, StoreChoice};
use crate::http::{self, Body};
use crate::mcp::{self, Endpoint, session::SessionKeys};
use crate::pipeline::Pipeline;
use crate::secrets;
use crate::store::{self, Db, Store, StoreConfig};
use crate::upstream::Upstream;
use crate::upstreams::Upstreams;

/// How often a replica polls the stored bundle pointers. PostgreSQL wakes it at once through
/// `LISTEN`, so there the poll is only a fallback for a lost notification; on SQLite a
/// promotion made by this process is applied directly, and the poll is how another process
/// sharing the file follows (SQLite has no cross-process notification), so it stays short: one
/// indexed read a second, measured at well under 0.1 % of a core on an idle gateway.
fn bundle_sync_interval(db: &Db) -> Duration {
    match db {
        Db::Postgres(_) => Duration::from_secs(30),
        Db::Sqlite(_) => Duration::from_secs(1),
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Secrets(#[from] secrets::SecretsError),
    #[error("INTENTGATE_MASTER_KEY: {0}")]
    MasterKey(String),
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    #[error("audit: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("plugins: {0}")]
    Plugins(String),
    #[error("demo upstream: {0}")]
    Demo(std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("outbox: {0}")]
    Outbox(#[from] crate::outbox::OutboxError),
}

/// Everything a request needs, shared by all connections.
pub struct Gateway {
    pub config: Config,
    pub master_key: MasterKey,
    pub verifier: Verifier,
    pub revocations: Arc<RevocationSet>,
    pub store: Arc<dyn Store>,
    pub pipeline: Pipeline,
    /// Every upstream by name (none, one, or several behind this one endpoint).
    pub upstreams: Upstreams,
    /// Wakes held requests when their approval is decided (here or on another replica).
    pub approvals: crate::approvals::Waiters,
    /// Upstream requests relayed to agents, waiting for their replies.
    pub relays: Arc<crate::mcp::relay::Relays>,
    /// Client sessions' `GET /v1/mcp` streams and resource subscriptions.
    pub streams: Arc<crate::streams::Hub>,
    pub sessions: SessionKeys,
    pub admin: AdminAuth,
    /// Webhooks, notification channels and SIEM sinks (see [`crate::outbox`]).
    pub outbox: crate::outbox::Outbox,
    /// Where generated secrets live, when they were generated.
    pub secrets_file: Option<std::path::PathBuf>,
    /// The listener's TLS (its certificate reloaded when the files change), when configured.
    pub tls: Option<crate::tls::ServerTls>,
    /// How calls are traced, and the OTLP exporter of sampled traces (see [`crate::telemetry`]).
    pub tracer: crate::telemetry::Tracer,
    background: Vec<tokio::task::JoinHandle<()>>,
    /// `--watch DIR`: dropping it stops watching.
    _watch: Option<crate::bundles::watch::WatchHandle>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for task in &self.background {
            task.abort();
        }
    }
}

impl Gateway {
    /// Loads secrets, opens the store and the audit log, starts the revocation feed and (with
    /// `--demo`) the demo upstream.
    pub async fn start(mut config: Config) -> Result<Arc<Gateway>, StartError> {
        let secrets = secrets::load_or_create(
            &config.data_dir,
            config.master_key.as_deref(),
            config.admin_token.as_deref(),
        )?;
        let master_key = MasterKey::from_base64(&secrets.master_key)
            .map_err(|e| StartError::MasterKey(e.to_string()))?;
        let store_cfg = match &config.store {
            StoreChoice::Sqlite(path) => StoreConfig::Sqlite { path: path.clone() },
            StoreChoice::Postgres(url) => StoreConfig::Postgres { url: url.clone() },
        };
        let store = store::connect(&store_cfg).await?;
        let log_key = LogKey::from_env_or_dir(&config.data_dir)?;
        let audit = AuditLog::open(store.db(), log_key, config.audit_config()).await?;

        let mut background = Vec::new();
        if config.demo && config.upstreams.is_empty() {
            let (uri, task) = crate::demo::spawn("127.0.0.1:0")
                .await
                .map_err(StartError::Demo)?;
            background.push(task);
            let demo = crate::config::NamedUpstream::with_globals(
                config.upstream_name.clone(),
                uri.clone(),
                &config.upstream_globals(),
            );
            config.upstreams.push(demo);
            config.upstream_url = Some(uri);
        }
        // TLS is set up once, here: each https upstream's client configuration (one per
        // distinct set of TLS files, shared by the upstreams that use the same) and the
        // listener's certificate.
        let mut client_tls: Vec<(&crate::config::UpstreamTls, Arc<rustls::ClientConfig>)> =
            Vec::new();
        let mut entries = Vec::with_capacity(config.upstreams.len());
        for u in &config.upstreams {
            let tls = if u.uri.scheme_str() == Some("https") {
                let same = |t: &crate::config::UpstreamTls| {
                    t.ca_file == u.tls.ca_file && t.client_identity == u.tls.client_identity
                };
                match client_tls.iter().find(|(t, _)| same(t)) {
                    Some((_, c)) => Arc::clone(c),
                    None => {
                        let c = crate::tls::client_config(&u.tls)?;
                        client_tls.push((&u.tls, Arc::clone(&c)));
                        c
                    }
                }
            } else {
                crate::tls::plaintext_only()?
            };
            let server_name = match &u.tls.server_name {
                Some(n) => Some(crate::tls::server_name(n)?),
                None => None,
            };
            let options = crate::upstream::Options {
                timeout: u.timeout,
                connect_timeout: u.connect_timeout,
                max_response: u.max_response_bytes,
                revision: u.revision,
                server_name,
            };
            entries.push((
                u.name.clone(),
                Upstream::with_options(u.uri.clone(), options, tls),
            ));
        }
        let upstreams = Upstreams::new(entries, config.upstream_separator.clone());
        let tls = match &config.listener_tls {
            Some(files) => Some(crate::tls::ServerTls::start(files)?),
            None => None,
        };
        let revocations = Arc::new(RevocationSet::new(config.revocation_max_staleness));
        background.push(tokio::spawn(revocation_feed(
            Arc::clone(&store),
            Arc::clone(&revocations),
            config.revocation_max_staleness,
        )));
        // Compiling the built-in components takes a moment: keep it off the runtime's threads.
        let default_spec = match &config.policy {
            Some(policy) => BundleSpec::builtin().with_policy_config(policy.to_config()),
            None => BundleSpec::builtin(),
        };
        crate::plugins::Runtime::shared_with(crate::plugins::Limits {
            call_deadline: config.plugin_deadline,
            call_checks_deadline: config.call_checks_deadline,
            max_checks_per_bundle: config.max_checks_per_bundle,
            max_instances_per_tenant: config.max_instances_per_tenant,
            ..crate::plugins::Limits::default()
        })
        .map_err(|e| StartError::Plugins(format!("INTENTGATE_PLUGIN_*: {e}")))?
        // Every worker evaluating at once must find a pooled instance (issue 13).
        .size_pools_for_workers(tokio::runtime::Handle::current().metrics().num_workers());
        let registry =
            tokio::task::spawn_blocking(move || Registry::builtin_with_default(default_spec))
                .await
                .map_err(|e| StartError::Plugins(e.to_string()))?
                .map_err(|e| StartError::Plugins(e.to_string()))?;
        // Bundles promoted through the admin API are stored; this replica starts on the stored
        // pointers (before it accepts a call) and follows them: PostgreSQL wakes it through
        // LISTEN/NOTIFY, both backends poll.
        registry.attach_store(Persist::new(store.db()));
        let mut follower = Follower::new(registry.clone(), Persist::new(store.db()));
        follower
            .load_all()
            .await
            .map_err(|e| StartError::Plugins(format!("loading the stored bundles: {e}")))?;
        background.push(tokio::spawn(
            follower.run(bundle_sync_interval(&store.db()), std::future::pending()),
        ));
        let watch = match config.watch.clone() {
            None => None,
            Some((dir, tenants)) => {
                let registry = registry.clone();
                let handle = tokio::task::spawn_blocking(move || {
                    crate::bundles::watch::watch(registry, dir, tenants)
                })
                .await
                .map_err(|e| StartError::Plugins(e.to_string()))?
                .map_err(|e| StartError::Plugins(format!("--watch: {e}")))?;
                Some(handle)
            }
        };
        let counters = registry
            .memory_counters()
            .ok_or_else(|| StartError::Plugins("registry without local counters".into()))?;
        // Destinations route inside the audit commit; the worker delivers what was committed.
        let outbox = crate::outbox::Outbox::open(
            store.db(),
            audit.outbox_router().clone(),
            config.outbox.clone(),
            registry.clone(),
            crate::outbox::sealed::SecretSeal::derive(secrets.master_key.as_bytes()),
        )
        .await?;
        background.push(outbox.spawn_worker());
        let pipeline = Pipeline::new(
            audit,
            registry,
            counters,
            config.arg_values,
            config.upstream_name.clone(),
        )
        .with_approvals(config.approvals)
        .with_upstream_names(&upstreams.iter().map(|(n, _)| n).collect::<Vec<_>>());
        let approvals = crate::approvals::Waiters::default();
        background.push(tokio::spawn(crate::approvals::wait::listen(
            store.db(),
            approvals.clone(),
        )));
        background.push(tokio::spawn(crate::approvals::sweep::run(
            pipeline.audit().clone(),
        )));
        let admin = AdminAuth::new(secrets.admin_token.clone(), config.tenant_admins.clone());
        let tracing = &config.telemetry.tracing;
        let tracer = match &tracing.export {
            Some(settings) => {
                let tls = if settings.endpoint.scheme_str() == Some("https") {
                    crate::tls::client_config(&crate::config::UpstreamTls::default())?
                } else {
                    crate::tls::plaintext_only()?
                };
                let (exporter, task) = crate::telemetry::Exporter::start(settings.clone(), tls);
                background.push(task);
                crate::telemetry::Tracer::new(tracing.sampler, Some(exporter))
            }
            None => crate::telemetry::Tracer::off(),
        };
        // What upstreams announce outside any call goes to the client sessions' streams.
        let streams = Arc::new(crate::streams::Hub::new(crate::streams::Limits::default()));
        for (name, up) in upstreams.iter() {
            let hub = Arc::clone(&streams);
            let (name, namespaced) = (name.to_owned(), upstreams.namespaced());
            up.on_notifications(Arc::new(move |message| {
                hub.from_upstream(&name, message, |uri| {
                    crate::upstreams::expose_uri_as(&name, uri, namespaced)
                });
            }));
        }
        Ok(Arc::new_cyclic(|gw| {
            background.push(tokio::spawn(crate::streams::listen::sweep(gw.clone())));
            Gateway {
                sessions: SessionKeys::derive(secrets.master_key.as_bytes()),
                verifier: Verifier::new(master_key.clone(), config.clock_leeway_secs as i64),
                master_key,
                revocations,
                store,
                pipeline,
                upstreams,
                approvals,
                relays: Arc::default(),
                streams,
                admin,
                outbox,
                secrets_file: secrets.file,
                tls,
                tracer,
                config,
                background,
                _watch: watch,
            }
        }))
    }

    /// Authenticates a bearer capability token (signature, time, revocation; no tool yet).
    pub fn authenticate(&self, token: &str) -> Result<Grant, CapabilityError> {
        let started = std::time::Instant::now();
        let grant = self.verifier.authenticate(
            token,
            crate::audit::time::now_ms() / 1000,
            &self.revocations,
        );
        (self.metrics().stages).since(crate::metrics::Stage::Token, started);
        grant
    }
}

/// The channel a revocation is announced on (PostgreSQL `NOTIFY`), so every replica's feed
/// reads it at once instead of polling for it.
pub const REVOCATIONS_CHANNEL: &str = "intentgate_revocations";

/// Keeps the in-memory revocation set current. It reads the store when woken: on PostgreSQL
/// by `LISTEN` (another replica revoked), and on both backends by a fallback poll a third of
/// the staleness limit apart (a revocation made in this process is applied to the set
/// directly). Each successful read marks the set synced; when reads fail the set goes stale
/// and token checks fail closed until it recovers. An idle gateway does no more than the
/// fallback poll.
async fn revocation_feed(store: Arc<dyn Store>, set: Arc<RevocationSet>, max_staleness: Duration) {
    let fallback = (max_staleness / 3).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut listener = match store.db() {
        Db::Postgres(pool) => match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(mut l) => match l.listen(REVOCATIONS_CHANNEL).await {
                Ok(()) => Some(l),
                Err(e) => {
                    tracing::warn!("revocation feed: LISTEN failed, polling only: {e}");
                    None
                }
            },
            Err(e) => {
                tracing::warn!("revocation feed: LISTEN connection failed, polling only: {e}");
                None
            }
        },
        Db::Sqlite(_) => None,
    };
    let mut after = 0i64;
    loop {
        loop {
            match store.revocations_since(after, 1000).await {
                Ok(rows) => {
                    let full = rows.len() == 1000;
                    if let Some((seq, _)) = rows.last() {
                        after = *seq;
                    }
                    set.extend(rows.into_iter().map(|(_, jti)| jti));
                    if !full {
                        set.mark_synced();
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "revocation feed: store unavailable");
                    break;
                }
            }
        }
        match listener.as_mut() {
            Some(l) => match tokio::time::timeout(fallback, l.recv()).await {
                // A notification or the fallback poll's turn: read now.
                Ok(Ok(_)) | Err(_) => {}
                // The connection dropped (it reconnects on the next recv): pause so a down
                // database is not hammered, then read (notifications may have been missed).
                Ok(Err(e)) => {
                    tracing::warn!("revocation feed: LISTEN connection lost: {e}");
                    tokio::time::sleep(fallback.min(Duration::from_millis(500))).await;
                }
            },
            None => tokio::time::sleep(fallback).await,
        }
    }
}

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
            crate::telemetry::trace::scope(trace, mcp::handle(gw, req, remote, endpoint)).await
        }
        "/healthz" if req.method() == Method::GET => health(gw),
        "/metrics" if crate::metrics::endpoint::on_main_listener(gw) => {
            crate::metrics::endpoint::handle(gw, &req, crate::metrics::endpoint::Listener::Main)
        }
        p if p.starts_with("/v1/admin/") => crate::admin::handle(gw, req, remote).await,
        _ => http::json(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
    }
}

fn health(gw: &Gateway) -> Response<Body> {
    let fresh = gw.revocations.check_fresh().is_ok();
    let status = if fresh {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    http::json(
        status,
        &json!({
            "status": if fresh { "ok" } else { "degraded" },
            "version": env!("CARGO_PKG_VERSION"),
            "revocations_fresh": fresh,
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
