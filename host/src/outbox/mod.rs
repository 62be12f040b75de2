//! The outbox: audit events leave the box for webhooks, notification channels and SIEMs,
//! durably and in order.
//!
//! - **Written with the event.** The audit commit writes one `outbox` row per (event,
//!   destination) in the transaction that records the event ([`store::enqueue!`], called from
//!   `audit/commit.rs`), choosing destinations from the arc-swapped [`Router`]. An event is
//!   delivered if and only if it was recorded, and the rows live on disk: a slow or dead
//!   destination costs disk, never memory, and never a call's latency.
//! - **Delivered by a worker** ([`worker`]): at least once, in id order per lane (destination,
//!   tenant), with an idempotency key per delivery (`webhook-id`), exponential back-off with
//!   jitter on network errors and non-2xx answers (honouring `Retry-After`), dead letters after
//!   [`OutboxConfig::dead_after`] (kept, listed and re-driven over the admin API). On
//!   PostgreSQL replicas share lanes through leases on the lane rows ([`store::claim`]).
//! - **Formatted by components** ([`format`]): every destination's request is produced by a
//!   formatter component (world `intentgate:plugin/formatter`), the built-in one or an
//!   uploaded one.
//! - **Signed** ([`sign`]): Standard Webhooks plus the original's `X-IntentGate-Signature`;
//!   S3 objects with SigV4 ([`s3`]); Sentinel calls with an Entra token ([`sentinel`]).
//! - **Configured** ([`destination`]): per tenant or global, through the admin API (stored,
//!   secrets write-only) and the original's environment variables.
//!
//! Over [`OutboxConfig::backlog_alarm`] undelivered rows the outbox raises an alarm (`/healthz`
//! and `/metrics`) and keeps every row. This module must never block or fail a call because a
//! destination is slow or down, and never drop a recorded event without making it a dead
//! letter.

pub mod address;
pub mod destination;
pub mod format;
pub mod s3;
pub mod sealed;
pub mod sentinel;
pub mod sign;
pub mod store;
pub mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

pub use destination::{Destination, DestinationSpec, Kind, Router, Source};

use crate::bundles::Registry;
use crate::plugins::Runtime;
use crate::store::Db;

/// Errors of the outbox layer.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// A destination or filter that cannot be used; names what is wrong.
    #[error("{0}")]
    Invalid(String),
    #[error("outbox store: {0}")]
    Store(#[from] sqlx::Error),
    /// A stored row that cannot be read back.
    #[error("outbox store holds a corrupt row: {0}")]
    Corrupt(String),
    /// The audit log cannot say the rows are durable (its log failed to sync): nothing is sent.
    #[error("outbox: the audit log is not durable: {0}")]
    NotDurable(String),
    /// A delivery outlived its lane's lease (PostgreSQL): nothing of it was recorded, and the
    /// lane's rows are delivered again (at least once).
    #[error("outbox: the lane's lease ran out during the delivery; nothing recorded")]
    LeaseLost,
}

/// Tuning of delivery (`INTENTGATE_OUTBOX_*`).
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Destinations from the original's environment variables (global, read-only).
    pub env_destinations: Vec<DestinationSpec>,
    /// Most events in one SIEM request (notifications always take one).
    pub batch: usize,
    /// Lanes delivered at once by this process.
    pub concurrency: usize,
    /// How often the worker looks for due lanes when nothing rang (other replicas' rows,
    /// back-off expiries).
    pub poll: Duration,
    /// Bound of one HTTP exchange.
    pub timeout: Duration,
    /// First back-off after a failure; doubled per consecutive failure…
    pub retry_base: Duration,
    /// …up to this.
    pub retry_max: Duration,
    /// A failing batch older than this becomes dead letters.
    pub dead_after: Duration,
    /// Undelivered rows beyond which the alarm is raised.
    pub backlog_alarm: u64,
    /// Destinations added over the admin API may reach private networks (`address.rs`).
    pub allow_private_networks: bool,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            env_destinations: Vec::new(),
            batch: 100,
            concurrency: 8,
            poll: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            dead_after: Duration::from_secs(72 * 3600),
            backlog_alarm: 100_000,
            allow_private_networks: false,
        }
    }
}

/// A destination as the worker uses it: validated, with its formatter bound (or why not).
pub struct Live {
    pub dest: Destination,
    pub formatter: Result<format::Bound, String>,
    /// The Entra token cache (Sentinel destinations), kept across reloads while the
    /// destination is unchanged.
    pub tokens: Arc<sentinel::TokenCache>,
}

/// The destinations in force.
#[derive(Default)]
pub struct LiveSet {
    pub list: Vec<Arc<Live>>,
    pub by_id: HashMap<Arc<str>, Arc<Live>>,
    /// Stored destinations that cannot be used (listed, deletable, replaceable).
    pub broken: Vec<store::Broken>,
}

/// Counters of this process's deliveries and the last backlog reading.
#[derive(Default)]
pub struct Stats {
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub backlog: AtomicI64,
    pub dead_letters: AtomicI64,
    pub alarm: AtomicBool,
}

/// The outbox handle: cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    /// Seals the stored destinations' secrets.
    seal: sealed::SecretSeal,
    router: Router,
    cfg: OutboxConfig,
    runtime: Arc<Runtime>,
    registry: Registry,
    env: Vec<Destination>,
    live: ArcSwap<LiveSet>,
    stats: Stats,
    version: tokio::sync::Mutex<Option<(i64, i64)>>,
    /// This process's name in the lanes' leases (PostgreSQL).
    replica: String,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("destinations", &self.inner.live.load().list.len())
            .finish_non_exhaustive()
    }
}

/// A random name for this process's leases: a restarted replica never mistakes a lease of its
/// previous life for its own.
fn replica_name() -> String {
    let mut b = [0u8; 12];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Outbox {
    /// Validates the environment's destinations, loads the stored ones and installs them in
    /// `router` (the audit log's). Start the worker with [`Outbox::spawn_worker`].
    pub async fn open(
        db: Db,
        router: Router,
        cfg: OutboxConfig,
        registry: Registry,
        seal: sealed::SecretSeal,
    ) -> Result<Self, OutboxError> {
        let env = cfg
            .env_destinations
            .iter()
            .map(|spec| Destination::new(spec.clone(), None, Source::Env))
            .collect::<Result<Vec<_>, _>>()?;
        let outbox = Outbox {
            inner: Arc::new(Inner {
                db,
                seal,
                router,
                runtime: registry.runtime().clone(),
                registry,
                cfg,
                env,
                live: ArcSwap::default(),
                stats: Stats::default(),
                version: tokio::sync::Mutex::new(None),
                replica: replica_name(),
            }),
        };
        outbox.reload(true).await?;
        Ok(outbox)
    }

    pub fn config(&self) -> &OutboxConfig {
        &self.inner.cfg
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// The seal of the stored destinations' secrets.
    pub fn seal(&self) -> &sealed::SecretSeal {
        &self.inner.seal
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// The destinations in force.
    pub fn live(&self) -> Arc<LiveSet> {
        self.inner.live.load_full()
    }

    /// Whether the backlog is over its alarm threshold (last reading).
    pub fn alarm(&self) -> bool {
        self.inner.stats.alarm.load(Ordering::Relaxed)
    }

    /// Starts the delivery worker; it runs until the returned task is aborted.
    pub fn spawn_worker(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(worker::run(self.clone()))
    }

    /// Re-reads the stored destinations (when they changed, or always with `force`), binds
    /// their formatters and swaps them in: the next audit batch routes with them and the
    /// worker delivers with them.
    pub async fn reload(&self, force: bool) -> Result<(), OutboxError> {
        let mut seen = self.inner.version.lock().await;
        let version = store::destinations_version(&self.inner.db).await?;
        // A destination whose formatter did not bind is tried again on every reload: its
        // component may have been uploaded on another replica since.
        let unbound = self.live().list.iter().any(|l| l.formatter.is_err());
        if !force && *seen == Some(version) && !unbound {
            return Ok(());
        }
        let stored = store::load_destinations(&self.inner.db, &self.inner.seal).await?;
        let mut dests = self.inner.env.clone();
        let mut broken = Vec::new();
        for row in stored {
            let made = row.and_then(|(id, tenant, spec)| {
                let (name, kind) = (spec.name.clone(), spec.kind.clone());
                Destination::new(spec, tenant.clone(), Source::Admin).map_err(|e| store::Broken {
                    id,
                    tenant,
                    name,
                    kind,
                    error: e.to_string(),
                })
            });
            match made {
                Ok(d) => dests.push(d),
                Err(b) => {
                    tracing::error!(destination = %b.id, error = %b.error, "outbox: stored destination cannot be used; it receives nothing until it is replaced or deleted");
                    broken.push(b);
                }
            }
        }
        // A formatter uploaded on another replica (or before a restart) is in the store.
        let persist = crate::bundles::persist::Persist::new(self.inner.db.clone());
        for d in &dests {
            let Some(digest) = d.spec.formatter.as_deref().filter(|f| !f.is_empty()) else {
                continue;
            };
            if self.inner.registry.component_bytes(digest).is_none()
                && let Err(e) = persist.load_component(&self.inner.registry, digest).await
            {
                tracing::warn!(destination = %d.id, component = %digest, error = %e, "outbox: the destination's formatter is not loadable");
            }
        }
        let runtime = self.inner.runtime.clone();
        let registry = self.inner.registry.clone();
        let previous = self.inner.live.load_full();
        let live =
            tokio::task::spawn_blocking(move || bind_all(&runtime, &registry, dests, &previous))
                .await
                .map_err(|e| OutboxError::Invalid(format!("binding formatters: {e}")))?;
        let mut live = live;
        live.broken = broken;
        let list: Vec<Destination> = live.list.iter().map(|l| l.dest.clone()).collect();
        self.inner.live.store(Arc::new(live));
        self.inner.router.install(&list);
        *seen = Some(version);
        Ok(())
    }
}

/// Binds every destination's formatter (compiles are cached by digest).
fn bind_all(
    runtime: &Arc<Runtime>,
    registry: &Registry,
    dests: Vec<Destination>,
    previous: &LiveSet,
) -> LiveSet {
    let mut set = LiveSet::default();
    for dest in dests {
        let formatter = match dest.spec.formatter.as_deref().filter(|d| !d.is_empty()) {
            None => format::Bound::new(
                runtime.clone(),
                crate::plugins::artifacts::SIEM_JSON,
                &dest.formatter_config(),
            )
            .map_err(|e| e.to_string()),
            Some(digest) => match registry.component_bytes(digest) {
                None => Err(format!("formatter component {digest} is not uploaded")),
                Some(wasm) => format::Bound::new(runtime.clone(), &wasm, &dest.formatter_config())
                    .map_err(|e| e.to_string()),
            },
        };
        if let Err(e) = &formatter {
            tracing::warn!(destination = %dest.id, error = %e, "outbox: destination has no usable formatter; its deliveries fail until fixed");
        }
        // An unchanged destination keeps its token (a reload must not cost a new one).
        let same = |old: &Live| {
            old.dest.spec.secret == dest.spec.secret
                && serde_json::to_string(&old.dest.spec).ok()
                    == serde_json::to_string(&dest.spec).ok()
        };
        let tokens = match previous.by_id.get(&dest.id) {
            Some(old) if same(old) => Arc::clone(&old.tokens),
            _ => Arc::default(),
        };
        let live = Arc::new(Live {
            dest,
            formatter,
            tokens,
        });
        set.by_id.insert(live.dest.id.clone(), live.clone());
        set.list.push(live);
    }
    set
}
