//! Bundles in the store, and replicas following each other's promotions.
//!
//! Components, bundles and the per-tenant active pointer live in the tables of
//! `migrations/*/0003_bundles.sql`. Every swap bumps the tenant's pointer `seq`; on PostgreSQL
//! the same transaction sends `NOTIFY intentgate_bundles`. [`Follower`] makes a registry follow
//! the pointers: woken by `LISTEN` on PostgreSQL, by polling on SQLite (and as a fallback on
//! PostgreSQL), it loads what it lacks (components are validated again, never trusted) and
//! swaps. It never writes a pointer itself, and a bundle it cannot load leaves the running one
//! in place (logged) so a bad row cannot take a replica down.

use super::registry::{BundleError, BundleStatus, ComponentInfo, DraftInfo, Registry};
use super::spec::BundleSpec;
use crate::plugins::World;
use crate::store::Db;
use crate::store::owner::{self, Change};
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The PostgreSQL notification channel of bundle swaps (payload: the tenant).
pub const CHANNEL: &str = "intentgate_bundles";

/// Errors of bundle persistence.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The database failed.
    #[error("bundle store: {0}")]
    Db(#[from] sqlx::Error),
    /// A stored bundle or component did not load.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// A stored row is unreadable.
    #[error("stored {what} {id} is unreadable: {detail}")]
    Corrupt {
        /// Kind of row.
        what: &'static str,
        /// Its id.
        id: String,
        /// Why.
        detail: String,
    },
    /// A blocking task failed.
    #[error("worker failed: {0}")]
    Join(String),
    /// The stored pointer is not the one this replica runs: another replica swapped meanwhile.
    #[error("the stored pointer of tenant {0} moved on another replica")]
    Conflict(String),
}

/// One tenant's pointer row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pointer {
    /// Tenant.
    pub tenant: String,
    /// Active digest.
    pub active: String,
    /// Rollback target.
    pub previous: Option<String>,
    /// Bumped on every swap.
    pub seq: i64,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn world_name(world: World) -> &'static str {
    match world {
        World::CheckPlugin => "check-plugin",
        World::SiemFormatter => "siem-formatter",
    }
}

fn world_of(name: &str) -> Option<World> {
    match name {
        "check-plugin" => Some(World::CheckPlugin),
        // Stored as `siem-formatter` (the world's earlier name); `formatter` read as well.
        "siem-formatter" | "formatter" => Some(World::SiemFormatter),
        _ => None,
    }
}

const BUNDLES: Change = Change::BundlePointers;

/// Bundle persistence over the store's pool.
#[derive(Clone, Debug)]
pub struct Persist {
    db: Db,
}

macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

impl Persist {
    /// Over this pool (the migrations must have run: `store::connect` does).
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The pool (the dry-run reads recorded calls from the audit tables through it).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Store an uploaded component and that `tenant` uploaded it (idempotent).
    pub async fn save_component(
        &self,
        tenant: &str,
        info: &ComponentInfo,
        wasm: &[u8],
        actor: &str,
    ) -> Result<(), PersistError> {
        let owner = "INSERT INTO plugin_component_tenants (digest, tenant, created_by, created_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (digest, tenant) DO NOTHING";
        let sql = "INSERT INTO plugin_components (digest, name, world, size, wasm, created_by, created_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (digest) DO NOTHING";
        on_db!(&self.db, pool => {
            sqlx::query(sql)
                .bind(&info.digest)
                .bind(&info.name)
                .bind(world_name(info.world))
                .bind(info.size as i64)
                .bind(wasm)
                .bind(actor)
                .bind(now())
                .execute(pool)
                .await?;
            sqlx::query(owner)
                .bind(&info.digest)
                .bind(tenant)
                .bind(actor)
                .bind(now())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Drop `tenant`'s hold on a component, and the component's row when no tenant holds it
    /// any more, in one transaction (idempotent).
    pub async fn delete_component(&self, tenant: &str, digest: &str) -> Result<(), PersistError> {
        let owner = "DELETE FROM plugin_component_tenants WHERE digest = $1 AND tenant = $2";
        let orphan = "DELETE FROM plugin_components WHERE digest = $1 AND NOT EXISTS \
                      (SELECT 1 FROM plugin_component_tenants WHERE digest = $1)";
        macro_rules! delete {
            ($tx:expr) => {{
                sqlx::query(owner)
                    .bind(digest)
                    .bind(tenant)
                    .execute(&mut *$tx)
                    .await?;
                sqlx::query(orphan).bind(digest).execute(&mut *$tx).await?;
            }};
        }
        match &self.db {
            Db::Sqlite(pool) => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                delete!(tx);
                tx.commit().await?;
            }
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                delete!(tx);
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Store a bundle of a tenant (idempotent; un-deletes).
    pub async fn save_bundle(
        &self,
        tenant: &str,
        draft: &DraftInfo,
        actor: &str,
    ) -> Result<(), PersistError> {
        let spec = serde_json::to_string(&draft.spec).map_err(|e| PersistError::Corrupt {
            what: "bundle",
            id: draft.digest.clone(),
            detail: e.to_string(),
        })?;
        let sql = "INSERT INTO bundles (tenant, digest, name, spec, created_by, created_at) \
                   VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant, digest) DO UPDATE SET deleted_at = NULL";
        on_db!(&self.db, pool => {
            sqlx::query(sql)
                .bind(tenant)
                .bind(&draft.digest)
                .bind(&draft.name)
                .bind(&spec)
                .bind(actor)
                .bind(now())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Mark a bundle deleted (rows are never removed: decisions refer to digests).
    pub async fn delete_bundle(&self, tenant: &str, digest: &str) -> Result<(), PersistError> {
        let sql = "UPDATE bundles SET deleted_at = $1 WHERE tenant = $2 AND digest = $3";
        on_db!(&self.db, pool => {
            sqlx::query(sql).bind(now()).bind(tenant).bind(digest).execute(pool).await?;
        });
        Ok(())
    }

    /// Write the tenant's pointer after a swap, as a compare-and-set: only when the stored
    /// pointer is still at `expected` (the `seq` this replica last applied or wrote; `None`: the
    /// tenant has no stored pointer yet). Returns the new `seq`, or [`PersistError::Conflict`]
    /// when another replica moved the pointer meanwhile. On PostgreSQL the same transaction
    /// notifies the other replicas.
    pub async fn set_pointer(
        &self,
        status: &BundleStatus,
        actor: &str,
        expected: Option<i64>,
    ) -> Result<i64, PersistError> {
        let sql = match expected {
            Some(_) => {
                "UPDATE bundle_pointers SET active_digest = $2, previous_digest = $3, seq = seq + 1, \
                 updated_by = $4, updated_at = $5 WHERE tenant = $1 AND seq = $6 RETURNING seq"
            }
            None => {
                "INSERT INTO bundle_pointers (tenant, active_digest, previous_digest, seq, updated_by, updated_at) \
                 VALUES ($1, $2, $3, 1, $4, $5) ON CONFLICT (tenant) DO NOTHING RETURNING seq"
            }
        };
        macro_rules! write_pointer {
            ($tx:expr) => {{
                let mut q = sqlx::query_scalar(sql)
                    .bind(&status.tenant)
                    .bind(&status.active)
                    .bind(&status.previous)
                    .bind(actor)
                    .bind(now());
                if let Some(seq) = expected {
                    q = q.bind(seq);
                }
                q.fetch_optional(&mut *$tx).await?
            }};
        }
        let seq: Option<i64> = match &self.db {
            Db::Sqlite(pool) => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                let seq = write_pointer!(tx);
                tx.commit().await?;
                if seq.is_some() {
                    // The other gateways of this process on the file follow at once.
                    owner::ring(pool.connect_options().get_filename(), BUNDLES);
                }
                seq
            }
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                let seq = write_pointer!(tx);
                if seq.is_some() {
                    sqlx::query("SELECT pg_notify($1, $2)")
                        .bind(CHANNEL)
                        .bind(&status.tenant)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                seq
            }
        };
        seq.ok_or_else(|| PersistError::Conflict(status.tenant.clone()))
    }

    /// Every tenant's pointer.
    pub async fn pointers(&self) -> Result<Vec<Pointer>, PersistError> {
        let sql = "SELECT tenant, active_digest, previous_digest, seq FROM bundle_pointers";
        let rows: Vec<(String, String, Option<String>, i64)> =
            on_db!(&self.db, pool => sqlx::query_as(sql).fetch_all(pool).await?);
        Ok(rows
            .into_iter()
            .map(|(tenant, active, previous, seq)| Pointer {
                tenant,
                active,
                previous,
                seq,
            })
            .collect())
    }

    /// One tenant's pointer, if it has one.
    pub async fn pointer(&self, tenant: &str) -> Result<Option<Pointer>, PersistError> {
        let sql = "SELECT tenant, active_digest, previous_digest, seq FROM bundle_pointers WHERE tenant = $1";
        let row: Option<(String, String, Option<String>, i64)> = on_db!(&self.db, pool => {
            sqlx::query_as(sql).bind(tenant).fetch_optional(pool).await?
        });
        Ok(row.map(|(tenant, active, previous, seq)| Pointer {
            tenant,
            active,
            previous,
            seq,
        }))
    }

    /// A stored bundle: its name and spec.
    pub async fn bundle(
        &self,
        tenant: &str,
        digest: &str,
    ) -> Result<Option<(String, BundleSpec)>, PersistError> {
        let sql = "SELECT name, spec FROM bundles WHERE tenant = $1 AND digest = $2";
        let row: Option<(String, String)> = on_db!(&self.db, pool => sqlx::query_as(sql).bind(tenant).bind(digest).fetch_optional(pool).await?);
        let Some((name, spec)) = row else {
            return Ok(None);
        };
        let spec: BundleSpec = serde_json::from_str(&spec).map_err(|e| PersistError::Corrupt {
            what: "bundle",
            id: digest.to_string(),
            detail: e.to_string(),
        })?;
        if spec.digest() != digest {
            return Err(PersistError::Corrupt {
                what: "bundle",
                id: digest.into(),
                detail: "digest mismatch".into(),
            });
        }
        Ok(Some((name, spec)))
    }

    /// Every stored component's owners: `(digest, tenant, name, world)` (not the bytes).
    pub async fn component_owners(
        &self,
    ) -> Result<Vec<(String, String, String, String)>, PersistError> {
        let sql = "SELECT t.digest, t.tenant, c.name, c.world FROM plugin_component_tenants t \
                   JOIN plugin_components c ON c.digest = t.digest";
        Ok(on_db!(&self.db, pool => sqlx::query_as(sql).fetch_all(pool).await?))
    }

    /// Every stored bundle not deleted: `(tenant, digest)`.
    pub async fn live_bundles(&self) -> Result<Vec<(String, String)>, PersistError> {
        let sql = "SELECT tenant, digest FROM bundles WHERE deleted_at IS NULL";
        Ok(on_db!(&self.db, pool => sqlx::query_as(sql).fetch_all(pool).await?))
    }

    /// Loads one stored component into `registry` (validated again, as an upload is).
    pub async fn load_component(
        &self,
        registry: &Registry,
        digest: &str,
    ) -> Result<(), PersistError> {
        let (name, world, wasm) =
            self.component(digest)
                .await?
                .ok_or_else(|| PersistError::Corrupt {
                    what: "component",
                    id: digest.into(),
                    detail: "named but not stored".into(),
                })?;
        let registry = registry.clone();
        let info =
            tokio::task::spawn_blocking(move || registry.upload_component(&name, &wasm, world))
                .await
                .map_err(|e| PersistError::Join(e.to_string()))??;
        if info.digest != digest {
            return Err(PersistError::Corrupt {
                what: "component",
                id: digest.into(),
                detail: "digest mismatch".into(),
            });
        }
        Ok(())
    }

    /// A stored component: name, world, bytes.
    pub async fn component(
        &self,
        digest: &str,
    ) -> Result<Option<(String, World, Vec<u8>)>, PersistError> {
        let sql = "SELECT name, world, wasm FROM plugin_components WHERE digest = $1";
        let row: Option<(String, String, Vec<u8>)> =
            on_db!(&self.db, pool => sqlx::query_as(sql).bind(digest).fetch_optional(pool).await?);
        let Some((name, world, wasm)) = row else {
            return Ok(None);
        };
        let world = world_of(&world).ok_or_else(|| PersistError::Corrupt {
            what: "component",
            id: digest.into(),
            detail: format!("unknown world {world}"),
        })?;
        Ok(Some((name, world, wasm)))
    }
}

/// What a stored pointer says for "the default bundle of whichever replica reads it".
pub const DEFAULT: &str = "default";

/// Makes a registry follow the stored pointers.
pub struct Follower {
    registry: Registry,
    persist: Persist,
    seen: HashMap<String, i64>,
    /// Stored components (by digest) and drafts (`"{tenant} {digest}"`) that did not load.
    unloadable: std::collections::HashSet<String>,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

impl Follower {
    /// A follower that has seen nothing yet (its first poll loads every tenant's pointer).
    pub fn new(registry: Registry, persist: Persist) -> Self {
        Self {
            registry,
            persist,
            seen: HashMap::new(),
            unloadable: Default::default(),
        }
    }

    /// Note a pointer this replica wrote itself, so it is not reloaded.
    pub fn saw(&mut self, tenant: &str, seq: i64) {
        self.seen.insert(tenant.to_string(), seq);
    }

    /// Apply every pointer that moved since the last poll; returns the tenants swapped. A
    /// pointer that fails to load is logged, left for the next poll, and the running bundle
    /// stays.
    pub async fn poll(&mut self) -> Result<Vec<String>, PersistError> {
        self.sync(false).await
    }

    /// Start-up: apply every stored pointer. A replica must not serve a tenant on the default
    /// bundle because the tenant's own bundle failed to load: such a tenant's calls are all
    /// refused instead (see `sync`); only a failing store fails the start.
    pub async fn load_all(&mut self) -> Result<Vec<String>, PersistError> {
        self.sync(true).await
    }

    async fn sync(&mut self, strict: bool) -> Result<Vec<String>, PersistError> {
        self.library().await?;
        let mut changed = Vec::new();
        for listed in self.persist.pointers().await? {
            if self.seen.get(&listed.tenant) == Some(&listed.seq) {
                continue;
            }
            // Read the pointer again under the gate: a swap made on this replica meanwhile has
            // stored a newer one, and applying the listed one would undo it.
            let gate = self.registry.swap_gate(&listed.tenant);
            let _gate = gate.lock().await;
            let Some(pointer) = self.persist.pointer(&listed.tenant).await? else {
                continue;
            };
            match self.install(&pointer).await {
                Ok(swapped) => {
                    self.seen.insert(pointer.tenant.clone(), pointer.seq);
                    // Swaps made here from now on compare-and-set against this pointer.
                    self.registry.set_pointer_seq(&pointer.tenant, pointer.seq);
                    if swapped {
                        changed.push(pointer.tenant.clone());
                    }
                }
                // At start a store that fails stops the start; a bundle that does not load
                // stops only its tenant: every call of it is refused (never decided by the
                // default bundle) until the bundle loads, tried again at every poll. Swaps
                // made here compare-and-set against the stored pointer, so promoting another
                // bundle mends the tenant.
                Err(e @ PersistError::Db(_)) if strict => return Err(e),
                Err(e) if strict => {
                    tracing::error!(tenant = %pointer.tenant, bundle = %pointer.active, "bundle sync: the tenant's stored bundle does not load ({e}); every call of this tenant is refused until it loads or another bundle is promoted");
                    self.registry.refuse_all(&pointer.tenant);
                    self.registry.set_pointer_seq(&pointer.tenant, pointer.seq);
                }
                Err(e) => {
                    tracing::warn!(tenant = %pointer.tenant, "bundle sync: cannot load {}: {e}", pointer.active)
                }
            }
        }
        Ok(changed)
    }

    /// Loads the stored components (with their owners) and drafts this registry lacks: an
    /// uploaded formatter, which no bundle names, and a draft not promoted yet must outlive a
    /// restart and reach every replica, like a promoted bundle. One that no longer loads is
    /// logged and skipped (for as long as this process runs: what is stored is content
    /// addressed, so it would fail the same way again); only a failing store is an error.
    async fn library(&mut self) -> Result<(), PersistError> {
        let known: std::collections::HashSet<String> = self
            .registry
            .components()
            .into_iter()
            .map(|c| c.digest)
            .collect();
        let builtin_names = super::spec::builtin_components().map(|(name, _)| name);
        for (digest, tenant, name, world) in self.persist.component_owners().await? {
            // Named like a built-in, a check is most likely an earlier build of one, stored
            // with a bundle that named it: loaded (a compile each, the Rego one's over a
            // second) only when a stored bundle names it, below. Formatters, which no bundle
            // names, and other uploads are loaded now.
            let older_builtin = builtin_names.contains(&name.as_str())
                && world_of(&world) == Some(World::CheckPlugin);
            if older_builtin || self.unloadable.contains(&digest) {
                self.registry.add_component_owner(&digest, &tenant);
                continue;
            }
            if !known.contains(&digest) && self.registry.component_bytes(&digest).is_none() {
                match self.persist.load_component(&self.registry, &digest).await {
                    Ok(()) => {}
                    Err(e @ PersistError::Db(_)) => return Err(e),
                    Err(e) => {
                        self.unloadable.insert(digest.clone());
                        tracing::warn!(tenant = %tenant, component = %digest, "bundle sync: cannot load a stored component: {e}");
                        continue;
                    }
                }
            }
            self.registry.add_component_owner(&digest, &tenant);
        }
        // What each tenant has already (read once a tenant, not once a draft).
        let mut have: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
        for (tenant, digest) in self.persist.live_bundles().await? {
            let known = have.entry(tenant.clone()).or_insert_with(|| {
                self.registry
                    .drafts(&tenant)
                    .into_iter()
                    .map(|d| d.digest)
                    .collect()
            });
            let key = format!("{tenant} {digest}");
            if known.contains(&digest) || self.unloadable.contains(&key) {
                continue;
            }
            match self.ensure(&tenant, &digest).await {
                Ok(()) => {}
                Err(e @ PersistError::Db(_)) => return Err(e),
                Err(e) => {
                    self.unloadable.insert(key);
                    tracing::warn!(tenant = %tenant, bundle = %digest, "bundle sync: cannot load a stored draft: {e}")
                }
            }
        }
        Ok(())
    }

    async fn ensure(&self, tenant: &str, digest: &str) -> Result<(), PersistError> {
        if digest == self.registry.default_spec().digest()
            || self
                .registry
                .drafts(tenant)
                .iter()
                .any(|d| d.digest == digest)
        {
            return Ok(());
        }
        let (name, spec) =
            self.persist
                .bundle(tenant, digest)
                .await?
                .ok_or_else(|| PersistError::Corrupt {
                    what: "bundle",
                    id: digest.into(),
                    detail: "pointer names a bundle that is not stored".into(),
                })?;
        let known: Vec<String> = self
            .registry
            .components()
            .into_iter()
            .map(|c| c.digest)
            .collect();
        for component in spec.component_digests() {
            // A component a stored bundle of the tenant names is the tenant's.
            self.registry.add_component_owner(component, tenant);
            if known.iter().any(|k| k == component) {
                continue;
            }
            self.persist
                .load_component(&self.registry, component)
                .await?;
            self.registry.add_component_owner(component, tenant);
        }
        let (registry, tenant) = (self.registry.clone(), tenant.to_string());
        tokio::task::spawn_blocking(move || registry.create_draft(&tenant, &name, spec))
            .await
            .map_err(|e| PersistError::Join(e.to_string()))??;
        Ok(())
    }

    async fn install(&self, p: &Pointer) -> Result<bool, PersistError> {
        // `default` names whatever default bundle this replica was started with (its policy
        // file may differ from the one of the replica that stored the pointer).
        let default = self.registry.default_spec().digest();
        let resolve = |d: &str| {
            if d == DEFAULT {
                default.clone()
            } else {
                d.to_string()
            }
        };
        let mut p = Pointer {
            active: resolve(&p.active),
            previous: p.previous.as_deref().map(resolve),
            ..p.clone()
        };
        self.ensure(&p.tenant, &p.active).await?;
        if let Some(previous) = &p.previous
            && let Err(e) = self.ensure(&p.tenant, previous).await
        {
            // Only the rollback target is lost; the active bundle is what must load.
            tracing::warn!(tenant = %p.tenant, "bundle sync: rollback target {previous} not loaded: {e}");
            p.previous = None;
        }
        let registry = self.registry.clone();
        let swapped = tokio::task::spawn_blocking(move || {
            registry.install(&p.tenant, &p.active, p.previous.as_deref())
        })
        .await
        .map_err(|e| PersistError::Join(e.to_string()))??;
        Ok(swapped)
    }

    /// Follow until `shutdown` resolves: woken by `LISTEN` on PostgreSQL and by this process's
    /// signal on SQLite (only this process writes a SQLite file: `store::owner`), and polling
    /// every `interval` on both backends as a fallback.
    pub async fn run(
        mut self,
        interval: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut listener = match &self.persist.db {
            Db::Postgres(pool) => match sqlx::postgres::PgListener::connect_with(pool).await {
                Ok(mut l) => match l.listen(CHANNEL).await {
                    Ok(()) => Some(l),
                    Err(e) => {
                        tracing::warn!("bundle sync: LISTEN failed, polling only: {e}");
                        None
                    }
                },
                Err(e) => {
                    tracing::warn!("bundle sync: LISTEN connection failed, polling only: {e}");
                    None
                }
            },
            Db::Sqlite(_) => None,
        };
        let mut rung = match &self.persist.db {
            Db::Sqlite(pool) => {
                owner::signal(pool.connect_options().get_filename(), BUNDLES).map(|s| s.subscribe())
            }
            Db::Postgres(_) => None,
        };
        loop {
            if let Err(e) = self.poll().await {
                tracing::warn!("bundle sync: {e}");
            }
            let wake = async {
                match (listener.as_mut(), rung.as_mut()) {
                    (Some(l), _) => {
                        let _ = tokio::time::timeout(interval, l.recv()).await;
                    }
                    (None, Some(r)) => {
                        let _ = tokio::time::timeout(interval, r.changed()).await;
                    }
                    (None, None) => tokio::time::sleep(interval).await,
                }
            };
            tokio::select! {
                () = &mut shutdown => return,
                () = wake => {}
            }
        }
    }
}
