//! Start-up: [`Gateway::start`] checks and opens everything the gateway runs on (secrets,
//! store, migrations, audit key, plugins and bundles, upstreams, TLS files, background tasks)
//! and builds each endpoint's service once ([`McpService`], [`AdminService`]), each holding
//! exactly the shared parts it needs.
//!
//! It refuses to start with a clear error naming what is wrong. The started [`Gateway`] is what
//! the accept loop ([`crate::server`]) routes with; dropping it stops its background tasks.
//! This module must never serve a request itself, and no endpoint may reach into it: an
//! endpoint gets its service.

use std::sync::Arc;
use std::time::Duration;

use crate::admin::{AdminAuth, AdminService};
use crate::audit::{AuditLog, LogKey};
use crate::bundles::persist::{Follower, Persist};
use crate::bundles::{BundleSpec, Registry};
use crate::capability::{MasterKey, RevocationSet, Verifier};
use crate::config::{Config, StoreChoice};
use crate::mcp::session::SessionKeys;
use crate::pipeline::Pipeline;
use crate::proxy::McpService;
use crate::secrets;
use crate::store::{self, Db, Store, StoreConfig};
use crate::upstream::Upstream;
use crate::upstreams::Upstreams;

/// How often a replica polls the stored bundle pointers when nothing woke it: a fallback on
/// both backends. PostgreSQL wakes it at once through `LISTEN`; on SQLite only this process
/// writes the file (`store::owner`), and a promotion by any gateway of the process rings the
/// others at once.
const BUNDLE_SYNC_FALLBACK: Duration = Duration::from_secs(30);

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

/// The started gateway: the shared parts, and the service of each endpoint built from them.
/// The accept loop routes to the services; health, metrics and tests read the shared parts.
pub struct Gateway {
    pub config: Config,
    pub revocations: Arc<RevocationSet>,
    pub store: Arc<dyn Store>,
    pub pipeline: Arc<Pipeline>,
    /// Every upstream by name (none, one, or several behind this one endpoint).
    pub upstreams: Arc<Upstreams>,
    /// Webhooks, notification channels and SIEM sinks (see [`crate::outbox`]).
    pub outbox: crate::outbox::Outbox,
    /// `POST /v1/mcp` and `POST /v1/tool-call`.
    pub mcp: Arc<McpService>,
    /// `/v1/admin/`.
    pub admin: AdminService,
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
        // Said once at start: an empty INTENTGATE_POSTGRES_URL means SQLite, and an operator
        // should see which store answers (the DSN's password is never shown).
        tracing::info!(store = ?config.store, "state store opened");
        let log_key = match config.audit_log_key.clone() {
            Some(key) => key,
            None => LogKey::load_or_create(&config.data_dir)?,
        };
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
        if let crate::store::Db::Sqlite(pool) = store.db() {
            background.push(tokio::spawn(crate::store::keep_statistics(
                pool,
                crate::store::STATISTICS_REFRESH,
            )));
        }
        background.push(tokio::spawn(crate::store::retention::prune_counters(
            Arc::clone(&store),
        )));
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
        // LISTEN/NOTIFY, SQLite through this process's signal, both with a slow fallback poll.
        registry.attach_store(Persist::new(store.db()));
        let mut follower = Follower::new(registry.clone(), Persist::new(store.db()));
        follower
            .load_all()
            .await
            .map_err(|e| StartError::Plugins(format!("loading the stored bundles: {e}")))?;
        background.push(tokio::spawn(
            follower.run(BUNDLE_SYNC_FALLBACK, std::future::pending()),
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
            crate::outbox::sealed::SecretSeal::derive(secrets.master_key.as_bytes())
                .with_legacy(secrets.legacy_master_key.as_deref().map(str::as_bytes)),
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
        .with_revocations(Arc::clone(&revocations))
        .with_upstream_names(&upstreams.iter().map(|(n, _)| n).collect::<Vec<_>>());
        let pipeline = if upstreams.namespaced() {
            pipeline.with_namespacing(upstreams.separator())
        } else {
            pipeline
        };
        let approvals = crate::approvals::Waiters::new(config.approvals.poll);
        background.push(tokio::spawn(crate::approvals::wait::listen(
            store.db(),
            approvals.clone(),
        )));
        background.push(tokio::spawn(crate::approvals::sweep::run(
            pipeline.audit().clone(),
            config.approvals.retention_days,
        )));
        let admin_auth = AdminAuth::new(secrets.admin_token.clone(), config.tenant_admins.clone());
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
        let pipeline = Arc::new(pipeline);
        // What upstreams announce outside any call goes to the client sessions' streams.
        let streams = Arc::new(crate::streams::Hub::new(config.streams));
        for (name, up) in upstreams.iter() {
            let hub = Arc::clone(&streams);
            let (name, namespaced) = (name.to_owned(), upstreams.namespaced());
            up.on_notifications(Arc::new(move |message| {
                hub.from_upstream(&name, message, |uri| {
                    crate::upstreams::expose_uri_as(&name, uri, namespaced)
                });
            }));
        }
        let upstreams = Arc::new(upstreams);
        // Each endpoint's service, holding exactly the shared parts it uses.
        let mcp = Arc::new_cyclic(|mcp| {
            // Ends the streams and subscriptions of revoked or expired tokens and ended sessions.
            background.push(tokio::spawn(crate::streams::listen::sweep(mcp.clone())));
            McpService {
                settings: crate::proxy::McpSettings::of(&config),
                verifier: Verifier::new(master_key.clone(), config.clock_leeway_secs as i64),
                revocations: Arc::clone(&revocations),
                store: Arc::clone(&store),
                pipeline: Arc::clone(&pipeline),
                upstreams: Arc::clone(&upstreams),
                approvals: approvals.clone(),
                relays: {
                    let relays = Arc::new(crate::mcp::relay::Relays::default());
                    // Held calls nobody resumes end on time, not at the next hold.
                    background.push(tokio::spawn(crate::mcp::relay::sweep(Arc::downgrade(
                        &relays,
                    ))));
                    relays
                },
                streams,
                sessions: SessionKeys::derive(secrets.master_key.as_bytes()),
                in_flight: Default::default(),
                step_ups: crate::proxy::step_up::StepUps::new(Arc::clone(&store)),
            }
        });
        let admin = AdminService {
            auth: admin_auth,
            settings: crate::admin::AdminSettings::of(&config),
            master_key,
            revocations: Arc::clone(&revocations),
            store: Arc::clone(&store),
            pipeline: Arc::clone(&pipeline),
            approvals,
            outbox: outbox.clone(),
        };
        Ok(Arc::new(Gateway {
            revocations,
            store,
            pipeline,
            upstreams,
            outbox,
            mcp,
            admin,
            secrets_file: secrets.file,
            tls,
            tracer,
            config,
            background,
            _watch: watch,
        }))
    }
}

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
            Ok(mut l) => match l.listen(store::REVOCATIONS_CHANNEL).await {
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
        // Read to the end, then add what was read at once: the set is copied on every change
        // (readers never wait), so adding a page at a time would copy it once per page, and a
        // start over many revocations would take time quadratic in their number.
        let mut read: Vec<String> = Vec::new();
        let caught_up = loop {
            match store.revocations_since(after, 1000).await {
                Ok(rows) => {
                    let full = rows.len() == 1000;
                    if let Some((seq, _)) = rows.last() {
                        after = *seq;
                    }
                    read.extend(rows.into_iter().map(|(_, jti)| jti));
                    if !full {
                        break true;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "revocation feed: store unavailable");
                    break false;
                }
            }
        };
        set.extend(read);
        if caught_up {
            set.mark_synced();
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
