//! The bundle registry: uploaded components (validated at upload), bundle drafts, and per
//! tenant the active snapshot (behind `ArcSwap`), the previous one (rollback target) and the
//! history of swaps.
//!
//! Reads (`snapshot`) are lock-free. Writes (upload, draft, promote, rollback) are slow (they
//! compile and instantiate) and synchronous: call them from `spawn_blocking`. Promotion builds
//! and warms the new snapshot completely before the swap, so a request sees either the old
//! bundle or the new one, never a mix, and after `promote` returns no new request sees the old.
//! Persistence of components, bundles and the active pointer is the store's (see
//! `migrations/*/0003_bundles.sql`); this registry is the in-process state.

use super::snapshot::Snapshot;
use super::spec::{BundleSpec, builtin_components};
use crate::plugins::{
    CheckComponent, CheckInput, Counters, MemoryCounters, PluginError, Runtime, Stage, VerdictKind,
    World,
};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Errors of bundle management.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The component failed validation.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// A check of the bundle failed to load with its configuration.
    #[error("{stage} check #{index}: {error}")]
    Invalid {
        /// Stage.
        stage: Stage,
        /// Index within the stage.
        index: usize,
        /// Why.
        error: PluginError,
    },
    /// A component digest that was never uploaded.
    #[error("unknown component {0}")]
    UnknownComponent(String),
    /// A component of another world than the one expected at upload.
    #[error("component {digest} implements {found:?}, expected {expected:?}")]
    WrongWorld {
        /// Digest.
        digest: String,
        /// Expected.
        expected: World,
        /// Found.
        found: World,
    },
    /// A component of the SIEM world used as a check (or the reverse).
    #[error("component {digest} implements {world:?}, not the check world")]
    NotACheck {
        /// Digest.
        digest: String,
        /// What it is.
        world: World,
    },
    /// No such bundle (draft) for this tenant.
    #[error("unknown bundle {0}")]
    UnknownBundle(String),
    /// Nothing to roll back to.
    #[error("tenant {0} has no previous bundle to roll back to")]
    NoPrevious(String),
    /// The tenant holds the most drafts allowed.
    #[error(
        "tenant {tenant} has {limit} drafts, the most allowed: delete some (DELETE /v1/admin/bundles/{{digest}}) first"
    )]
    TooManyDrafts {
        /// Tenant.
        tenant: String,
        /// The limit.
        limit: usize,
    },
    /// The bundle has more checks than one bundle (or one tenant's instance quota) may hold.
    #[error("the bundle has {count} checks, more than the {limit} allowed ({setting})")]
    TooManyChecks {
        /// Checks in the bundle, across its stages.
        count: usize,
        /// The limit.
        limit: usize,
        /// The setting that sets it.
        setting: &'static str,
    },
    /// The gateway holds the most uploaded components allowed.
    #[error(
        "this gateway holds {limit} uploaded components, the most allowed: no more can be uploaded"
    )]
    TooManyComponents {
        /// The limit.
        limit: usize,
    },
    /// The tenant holds the most uploaded components its quota allows.
    #[error(
        "tenant {tenant} holds {limit} uploaded components, the most allowed: delete unused ones (DELETE /v1/admin/plugins/{{digest}}) first"
    )]
    TenantComponentQuota {
        /// Tenant.
        tenant: String,
        /// The per-tenant limit.
        limit: usize,
    },
    /// A component a bundle of the tenant still uses cannot be deleted.
    #[error("component {digest} is in use by {by}: delete or replace that bundle first")]
    ComponentInUse {
        /// The component.
        digest: String,
        /// What uses it, e.g. `the active bundle sha256:… of tenant acme`.
        by: String,
    },
    /// No uploaded component of that digest is the tenant's.
    #[error("unknown component {0}")]
    NotTenantComponent(String),
}

/// Most drafts a tenant may hold (the active bundle and the rollback target count).
pub const MAX_DRAFTS_PER_TENANT: usize = 256;
/// Most uploaded (non-built-in) components a gateway holds (every tenant together).
pub const MAX_UPLOADED_COMPONENTS: usize = 256;
/// Most uploaded components one tenant holds, unless configured
/// (`INTENTGATE_MAX_COMPONENTS_PER_TENANT`): one tenant cannot fill the gateway's room.
pub const MAX_COMPONENTS_PER_TENANT: usize = 64;
/// Swaps the history keeps per tenant (the oldest go first): one busy tenant's swaps never push
/// out another's.
pub const HISTORY_LEN: usize = 1000;

/// An uploaded component.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ComponentInfo {
    /// `sha256:<hex>`.
    pub digest: String,
    /// The world it implements.
    pub world: World,
    /// Size in bytes.
    pub size: usize,
    /// Name given at upload (informational).
    pub name: String,
    /// True for the embedded built-ins.
    pub builtin: bool,
}

/// A bundle draft of a tenant.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DraftInfo {
    /// The bundle digest (also its id).
    pub digest: String,
    /// Name given by the operator.
    pub name: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The spec.
    pub spec: BundleSpec,
}

/// What a promotion or rollback did (the admin layer audits it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SwapOutcome {
    /// Tenant.
    pub tenant: String,
    /// `promote` or `rollback`.
    pub action: String,
    /// Digest active before.
    pub from: String,
    /// Digest active now.
    pub to: String,
    /// Unix seconds.
    pub at: u64,
}

/// Active and previous bundle of a tenant.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BundleStatus {
    /// Tenant.
    pub tenant: String,
    /// Active digest.
    pub active: String,
    /// Rollback target.
    pub previous: Option<String>,
    /// True when the active bundle is the built-in default.
    pub is_default: bool,
}

/// A recorded call to replay in a dry-run, with the decision it got.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordedCall {
    /// The call as the checks saw it.
    pub input: CheckInput,
    /// The recorded decision.
    pub decision: VerdictKind,
    /// An id to show in the divergent rows (audit event id).
    #[serde(default)]
    pub id: Option<String>,
}

/// One call whose decision would change.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DryRunRow {
    /// Recorded id.
    pub id: Option<String>,
    /// Tool.
    pub tool: String,
    /// Agent.
    pub agent_id: String,
    /// Recorded decision.
    pub from: VerdictKind,
    /// Candidate decision.
    pub to: VerdictKind,
    /// Candidate reason.
    pub reason: String,
}

/// Result of replaying recorded calls against a candidate bundle.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DryRunReport {
    /// Candidate digest.
    pub digest: String,
    /// Calls replayed.
    pub total: usize,
    /// Would allow.
    pub would_allow: usize,
    /// Would block (plugin errors count here: fail closed).
    pub would_block: usize,
    /// Would escalate.
    pub would_escalate: usize,
    /// `"allow->block"` → count, for every (recorded, candidate) pair seen.
    pub transitions: BTreeMap<String, usize>,
    /// Up to 50 calls whose decision changes.
    pub divergent: Vec<DryRunRow>,
    /// The candidate's decision for each call, in the order given (for the per-call listing).
    #[serde(skip)]
    pub candidates: Vec<VerdictKind>,
    /// Why the replay stopped before the last call, if it did (`total` counts the calls
    /// replayed): it ran out of time, or the candidate failed on every call of a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

/// Dry-runs one gateway runs at once (one per tenant at a time).
pub const DRY_RUNS_AT_ONCE: usize = 2;

/// The longest one dry-run replays: its checks run on the gateway's cores, beside the live
/// calls, whose checks have deadlines of their own.
pub const DRY_RUN_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// Failing calls in a row after which a dry-run stops: the candidate is broken (every failed
/// call costs a fresh instance, `configure` included), and the rest would fail alike.
pub const DRY_RUN_FAILURES_IN_A_ROW: usize = 32;

struct TenantSlot {
    active: ArcSwap<Snapshot>,
    previous: Mutex<Option<Arc<Snapshot>>>,
    /// Serializes promote/rollback of this tenant.
    swap: Mutex<()>,
}

struct Inner {
    runtime: Arc<Runtime>,
    counters: Arc<dyn Counters>,
    memory_counters: Option<Arc<MemoryCounters>>,
    default_spec: BundleSpec,
    components: RwLock<HashMap<String, CheckComponent>>,
    infos: RwLock<BTreeMap<String, ComponentInfo>>,
    wasm: RwLock<HashMap<String, Arc<[u8]>>>,
    /// Per uploaded component, the tenants that uploaded it (or whose stored bundle names it).
    owners: RwLock<HashMap<String, std::collections::BTreeSet<String>>>,
    drafts: RwLock<HashMap<String, BTreeMap<String, DraftInfo>>>,
    tenants: ArcSwap<HashMap<String, Arc<TenantSlot>>>,
    history: Mutex<HashMap<String, std::collections::VecDeque<SwapOutcome>>>,
    max_drafts: std::sync::atomic::AtomicUsize,
    max_components: std::sync::atomic::AtomicUsize,
    /// Per tenant, the `seq` of the stored pointer this replica runs (applied by the follower
    /// or written by a swap here): a swap stores its pointer only over that one.
    pointer_seqs: Mutex<HashMap<String, i64>>,
    persist: std::sync::OnceLock<super::persist::Persist>,
    /// Per tenant: held while a swap is made and stored, and while a follower applies a stored
    /// pointer, so a follower can never apply a pointer older than a swap this replica just
    /// made. A tenant's own, so one tenant's slow promote holds up nobody else's.
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Dry-runs of each tenant, one at a time, and of all tenants, [`DRY_RUNS_AT_ONCE`].
    dry_run_gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    dry_runs: Arc<tokio::sync::Semaphore>,
    /// Swaps made in this process by action, [`SWAP_ACTIONS`] order (`/metrics`).
    swaps: [std::sync::atomic::AtomicU64; 3],
}

/// The actions a swap is recorded with.
const SWAP_ACTIONS: [&str; 3] = ["promote", "rollback", "sync"];

/// The bundle registry. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    match lock.read() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    match lock.write() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Registry {
    /// The default bundle only, the process-wide runtime, in-memory counters; no database.
    /// Startup-time: compiles the built-in components (a few seconds in a debug build).
    pub fn builtin() -> Result<Self, BundleError> {
        Self::builtin_with_default(BundleSpec::builtin())
    }

    /// Like [`Registry::builtin`] with another default bundle (e.g. the default spec with the
    /// operator's policy file, `INTENTGATE_POLICY_FILE`). Validated here, at start-up.
    pub fn builtin_with_default(default_spec: BundleSpec) -> Result<Self, BundleError> {
        let counters = Arc::new(MemoryCounters::default());
        Self::build(
            Runtime::shared()?,
            counters.clone(),
            Some(counters),
            default_spec,
        )
    }

    /// A registry over this runtime, reading budget counters from `counters`.
    pub fn new(runtime: Arc<Runtime>, counters: Arc<dyn Counters>) -> Result<Self, BundleError> {
        Self::build(runtime, counters, None, BundleSpec::builtin())
    }

    /// Like [`Registry::builtin`] but with a given runtime (tests with tight limits).
    pub fn with_runtime(runtime: Arc<Runtime>) -> Result<Self, BundleError> {
        let counters = Arc::new(MemoryCounters::default());
        Self::build(
            runtime,
            counters.clone(),
            Some(counters),
            BundleSpec::builtin(),
        )
    }

    fn build(
        runtime: Arc<Runtime>,
        counters: Arc<dyn Counters>,
        memory_counters: Option<Arc<MemoryCounters>>,
        default_spec: BundleSpec,
    ) -> Result<Self, BundleError> {
        let registry = Registry {
            inner: Arc::new(Inner {
                runtime,
                counters,
                memory_counters,
                default_spec,
                components: RwLock::new(HashMap::new()),
                infos: RwLock::new(BTreeMap::new()),
                wasm: RwLock::new(HashMap::new()),
                owners: RwLock::new(HashMap::new()),
                drafts: RwLock::new(HashMap::new()),
                tenants: ArcSwap::from_pointee(HashMap::new()),
                history: Mutex::new(HashMap::new()),
                max_drafts: MAX_DRAFTS_PER_TENANT.into(),
                max_components: MAX_UPLOADED_COMPONENTS.into(),
                pointer_seqs: Mutex::new(HashMap::new()),
                persist: std::sync::OnceLock::new(),
                gates: Mutex::new(HashMap::new()),
                dry_run_gates: Mutex::new(HashMap::new()),
                dry_runs: Arc::new(tokio::sync::Semaphore::new(DRY_RUNS_AT_ONCE)),
                swaps: Default::default(),
            }),
        };
        for (name, wasm) in builtin_components() {
            registry.add_component(name, wasm, true)?;
        }
        // Validate the default bundle once (the default Rego and its tests) at startup.
        Snapshot::build(
            &registry.inner.runtime,
            &read(&registry.inner.components),
            &registry.inner.default_spec,
            "-",
            &registry.inner.counters,
            true,
        )?;
        Ok(registry)
    }

    /// Persist components, bundles and swaps made through the admin API in the store (once;
    /// later calls are ignored). Pair it with a [`super::persist::Follower`] on every replica.
    pub fn attach_store(&self, persist: super::persist::Persist) {
        let _ = self.inner.persist.set(persist);
    }

    /// The attached store, if any.
    pub fn persist(&self) -> Option<&super::persist::Persist> {
        self.inner.persist.get()
    }

    /// The lock that orders `tenant`'s swaps made here (and stored) with its pointers applied
    /// from the store. Hold it across "swap, then store the pointer" and across "read the
    /// pointer, then apply".
    pub fn swap_gate(&self, tenant: &str) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(
            lock(&self.inner.gates)
                .entry(tenant.to_owned())
                .or_default(),
        )
    }

    /// A place for one dry-run of `tenant`: its tenant's gate and one of the
    /// [`DRY_RUNS_AT_ONCE`] places, both held until dropped; waited for at most `within`
    /// (`None` past it). Each dry-run holds a core beside the live calls.
    pub async fn dry_run_place(
        &self,
        tenant: &str,
        within: std::time::Duration,
    ) -> Option<(
        tokio::sync::OwnedMutexGuard<()>,
        tokio::sync::OwnedSemaphorePermit,
    )> {
        let gate = Arc::clone(
            lock(&self.inner.dry_run_gates)
                .entry(tenant.to_owned())
                .or_default(),
        );
        let all = Arc::clone(&self.inner.dry_runs);
        tokio::time::timeout(within, async move {
            let mine = gate.lock_owned().await;
            let place = all.acquire_owned().await.ok()?;
            Some((mine, place))
        })
        .await
        .ok()
        .flatten()
    }

    /// The `seq` of the stored pointer this replica runs for `tenant` (`None`: none applied
    /// or written yet). Read and set under [`Registry::swap_gate`].
    pub fn pointer_seq(&self, tenant: &str) -> Option<i64> {
        lock(&self.inner.pointer_seqs).get(tenant).copied()
    }

    /// Record that this replica runs the stored pointer `seq` of `tenant`.
    pub fn set_pointer_seq(&self, tenant: &str, seq: i64) {
        lock(&self.inner.pointer_seqs).insert(tenant.to_string(), seq);
    }

    /// The runtime.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.inner.runtime
    }

    /// The in-memory counters, when this registry owns them (`builtin`, `with_runtime`): the
    /// pipeline applies charges with [`MemoryCounters::charge_all`] when it has no store.
    pub fn memory_counters(&self) -> Option<Arc<MemoryCounters>> {
        self.inner.memory_counters.clone()
    }

    /// The default bundle's spec.
    pub fn default_spec(&self) -> &BundleSpec {
        &self.inner.default_spec
    }

    /// The active snapshot of `tenant` (the default bundle when none was promoted). Lock-free
    /// after the tenant's first request. Hold the returned `Arc` for the whole request.
    pub fn snapshot(&self, tenant: &str) -> Arc<Snapshot> {
        if let Some(slot) = self.inner.tenants.load().get(tenant) {
            return slot.active.load_full();
        }
        self.slot(tenant).active.load_full()
    }

    fn slot(&self, tenant: &str) -> Arc<TenantSlot> {
        if let Some(slot) = self.inner.tenants.load().get(tenant) {
            return slot.clone();
        }
        let fresh = Arc::new(TenantSlot {
            active: ArcSwap::from_pointee(self.default_snapshot(tenant)),
            previous: Mutex::new(None),
            swap: Mutex::new(()),
        });
        let mut result = fresh.clone();
        self.inner.tenants.rcu(|map| {
            let mut map = HashMap::clone(map);
            match map.get(tenant) {
                Some(existing) => result = existing.clone(),
                None => {
                    map.insert(tenant.to_string(), fresh.clone());
                    result = fresh.clone();
                }
            }
            map
        });
        result
    }

    fn default_snapshot(&self, tenant: &str) -> Snapshot {
        let components = read(&self.inner.components);
        match Snapshot::build(
            &self.inner.runtime,
            &components,
            &self.inner.default_spec,
            tenant,
            &self.inner.counters,
            false,
        ) {
            Ok(s) => s,
            // The default bundle was validated at startup with the same components; an empty
            // spec (deny everything) is the fail-closed fallback should that ever change.
            Err(_) => Snapshot::empty(tenant),
        }
    }

    fn add_component(
        &self,
        name: &str,
        wasm: &[u8],
        builtin: bool,
    ) -> Result<ComponentInfo, BundleError> {
        let runtime = &self.inner.runtime;
        let world = runtime.validate(wasm)?;
        let (digest, component) = runtime.compile(wasm)?;
        if world == World::CheckPlugin {
            let check = CheckComponent::from_component(runtime, digest.clone(), &component)?;
            write(&self.inner.components).insert(digest.clone(), check);
        }
        let info = ComponentInfo {
            digest: digest.clone(),
            world,
            size: wasm.len(),
            name: name.to_string(),
            builtin,
        };
        write(&self.inner.wasm).insert(digest.clone(), Arc::from(wasm));
        write(&self.inner.infos)
            .entry(digest)
            .or_insert_with(|| info.clone());
        Ok(info)
    }

    /// Upload a component: compiled and validated now; refused unless it implements `expect`
    /// (a component of another world, or of none, never enters the registry). Slow: call from
    /// `spawn_blocking`.
    pub fn upload_component(
        &self,
        name: &str,
        wasm: &[u8],
        expect: World,
    ) -> Result<ComponentInfo, BundleError> {
        let refused = |e: BundleError| {
            // What the registry does not hold must not stay compiled.
            let digest = crate::plugins::runtime::digest_of(wasm);
            if !read(&self.inner.infos).contains_key(&digest) {
                self.inner.runtime.forget(&digest);
            }
            e
        };
        let world = self
            .inner
            .runtime
            .validate(wasm)
            .map_err(|e| refused(e.into()))?;
        if world != expect {
            return Err(refused(BundleError::WrongWorld {
                digest: crate::plugins::runtime::digest_of(wasm),
                expected: expect,
                found: world,
            }));
        }
        self.add_component(name, wasm, false).map_err(refused)
    }

    /// Forget an uploaded component (the admin API undoes an upload the store did not record).
    /// Built-ins, components a draft of any tenant names and components a tenant holds (one
    /// that uploaded the same bytes meanwhile) stay. Returns whether it went.
    pub fn remove_component(&self, digest: &str) -> bool {
        let drafts = read(&self.inner.drafts);
        let used = drafts
            .values()
            .flat_map(|d| d.values())
            .any(|d| d.spec.component_digests().any(|c| c == digest));
        let held = read(&self.inner.owners)
            .get(digest)
            .is_some_and(|o| !o.is_empty());
        let mut infos = write(&self.inner.infos);
        if used || held || infos.get(digest).is_none_or(|i| i.builtin) {
            return false;
        }
        infos.remove(digest);
        write(&self.inner.components).remove(digest);
        write(&self.inner.wasm).remove(digest);
        write(&self.inner.owners).remove(digest);
        self.inner.runtime.forget(digest);
        true
    }

    /// Record that `tenant` uploaded the component (it may then list it and build bundles
    /// from it). Returns false when it already had.
    pub fn add_component_owner(&self, digest: &str, tenant: &str) -> bool {
        write(&self.inner.owners)
            .entry(digest.to_string())
            .or_default()
            .insert(tenant.to_string())
    }

    /// Undo [`Registry::add_component_owner`].
    pub fn remove_component_owner(&self, digest: &str, tenant: &str) {
        if let Some(owners) = write(&self.inner.owners).get_mut(digest) {
            owners.remove(tenant);
        }
    }

    /// Whether `tenant` may use the component: a built-in, or one it uploaded.
    pub fn may_use_component(&self, tenant: &str, digest: &str) -> bool {
        read(&self.inner.infos)
            .get(digest)
            .is_some_and(|i| i.builtin)
            || read(&self.inner.owners)
                .get(digest)
                .is_some_and(|o| o.contains(tenant))
    }

    /// The components `tenant` may use: the built-ins and the ones it uploaded.
    pub fn components_of(&self, tenant: &str) -> Vec<ComponentInfo> {
        let owners = read(&self.inner.owners);
        read(&self.inner.infos)
            .values()
            .filter(|i| i.builtin || owners.get(&i.digest).is_some_and(|o| o.contains(tenant)))
            .cloned()
            .collect()
    }

    /// Uploaded components (built-ins included).
    pub fn components(&self) -> Vec<ComponentInfo> {
        read(&self.inner.infos).values().cloned().collect()
    }

    /// The bytes of a component (for persistence and export).
    pub fn component_bytes(&self, digest: &str) -> Option<Arc<[u8]>> {
        read(&self.inner.wasm).get(digest).cloned()
    }

    fn check_spec(&self, spec: &BundleSpec) -> Result<(), BundleError> {
        // Every check holds at least one live instance of the tenant's quota, and runs on
        // every call: both bound the checks of one bundle.
        let limits = self.inner.runtime.limits();
        let count = spec.stages.values().map(Vec::len).sum::<usize>();
        for (limit, setting) in [
            (
                limits.max_checks_per_bundle,
                "INTENTGATE_MAX_CHECKS_PER_BUNDLE",
            ),
            (
                limits.max_instances_per_tenant,
                "INTENTGATE_MAX_INSTANCES_PER_TENANT",
            ),
        ] {
            if count > limit {
                return Err(BundleError::TooManyChecks {
                    count,
                    limit,
                    setting,
                });
            }
        }
        let infos = read(&self.inner.infos);
        for digest in spec.component_digests() {
            match infos.get(digest) {
                None => return Err(BundleError::UnknownComponent(digest.to_string())),
                Some(info) if info.world != World::CheckPlugin => {
                    return Err(BundleError::NotACheck {
                        digest: digest.to_string(),
                        world: info.world,
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Build and warm a snapshot of `spec` for `tenant` without activating it.
    fn prepare(&self, tenant: &str, spec: &BundleSpec) -> Result<Snapshot, BundleError> {
        self.check_spec(spec)?;
        let components = read(&self.inner.components).clone();
        let build = || {
            Snapshot::build(
                &self.inner.runtime,
                &components,
                spec,
                tenant,
                &self.inner.counters,
                true,
            )
        };
        self.within_quota(tenant, build)
    }

    /// Runs `build`, and when the tenant's instance quota refused it, runs it once more after
    /// giving back the idle instances of the tenant's current bundles: they are a cache, and
    /// the tenant must be able to hold the bundle that replaces them.
    fn within_quota<T>(
        &self,
        tenant: &str,
        build: impl Fn() -> Result<T, BundleError>,
    ) -> Result<T, BundleError> {
        match build() {
            Err(BundleError::Invalid {
                error: PluginError::TenantQuota { .. },
                ..
            }) => {
                if let Some(slot) = self.inner.tenants.load().get(tenant) {
                    slot.active.load().trim();
                    if let Some(previous) = lock(&slot.previous).as_ref() {
                        previous.trim();
                    }
                }
                build()
            }
            built => built,
        }
    }

    /// Create a draft: validates the spec (components known and of the check world, every
    /// configuration accepted — Rego compiles and its tests pass). Returns the draft; its
    /// digest is its id. Idempotent for equal content.
    pub fn create_draft(
        &self,
        tenant: &str,
        name: &str,
        spec: BundleSpec,
    ) -> Result<DraftInfo, BundleError> {
        let info = self.check_draft(tenant, name, spec)?;
        Ok(self.insert_draft(tenant, info))
    }

    /// Validate a draft as [`Registry::create_draft`] does, without keeping it: the admin API
    /// records the draft in the audit chain between this and [`Registry::insert_draft`].
    pub fn check_draft(
        &self,
        tenant: &str,
        name: &str,
        spec: BundleSpec,
    ) -> Result<DraftInfo, BundleError> {
        let snapshot = self.prepare(tenant, &spec)?;
        drop(snapshot);
        Ok(DraftInfo {
            digest: spec.digest(),
            name: name.to_string(),
            created_at: now_secs(),
            spec,
        })
    }

    /// Keep a draft that [`Registry::check_draft`] validated (an equal one already kept stays
    /// as it was). Returns the kept draft.
    pub fn insert_draft(&self, tenant: &str, info: DraftInfo) -> DraftInfo {
        write(&self.inner.drafts)
            .entry(tenant.to_string())
            .or_default()
            .entry(info.digest.clone())
            .or_insert(info)
            .clone()
    }

    /// Whether `digest` names a bundle `tenant` can promote: one of its drafts, or the default
    /// (`"default"` or its digest).
    pub fn has_bundle(&self, tenant: &str, digest: &str) -> bool {
        digest == "default"
            || digest == self.inner.default_spec.digest()
            || read(&self.inner.drafts)
                .get(tenant)
                .is_some_and(|d| d.contains_key(digest))
    }

    /// The drafts of a tenant.
    pub fn drafts(&self, tenant: &str) -> Vec<DraftInfo> {
        read(&self.inner.drafts)
            .get(tenant)
            .map(|d| d.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Delete a draft (the active one cannot be deleted). Returns whether it existed.
    pub fn delete_draft(&self, tenant: &str, digest: &str) -> bool {
        let status = self.status(tenant);
        // The rollback target stays too: a rollback, and the undo of a swap the store refused,
        // rebuild from it, and so do the replicas that follow the stored pointer.
        if status.active == digest || status.previous.as_deref() == Some(digest) {
            return false;
        }
        write(&self.inner.drafts)
            .get_mut(tenant)
            .map(|d| d.remove(digest).is_some())
            .unwrap_or(false)
    }

    fn find_spec(&self, tenant: &str, digest: &str) -> Result<BundleSpec, BundleError> {
        if digest == self.inner.default_spec.digest() || digest == "default" {
            return Ok(self.inner.default_spec.clone());
        }
        read(&self.inner.drafts)
            .get(tenant)
            .and_then(|d| d.get(digest))
            .map(|d| d.spec.clone())
            .ok_or_else(|| BundleError::UnknownBundle(digest.to_string()))
    }

    /// Promote a draft (or `"default"`): build and warm it, then swap it in. The previous active
    /// bundle becomes the rollback target. Slow: call from `spawn_blocking`.
    pub fn promote(&self, tenant: &str, digest: &str) -> Result<SwapOutcome, BundleError> {
        let spec = self.find_spec(tenant, digest)?;
        let snapshot = Arc::new(self.prepare(tenant, &spec)?);
        let slot = self.slot(tenant);
        let _serial = lock(&slot.swap);
        let old = slot.active.swap(snapshot.clone());
        old.trim();
        let outcome = SwapOutcome {
            tenant: tenant.to_string(),
            action: "promote".into(),
            from: old.digest().to_string(),
            to: snapshot.digest().to_string(),
            at: now_secs(),
        };
        // Promoting the active bundle again (a retry, a double click) keeps the rollback
        // target: it must not become the bundle itself, leaving nothing to roll back to.
        if outcome.from != outcome.to {
            *lock(&slot.previous) = Some(old);
        }
        self.record(outcome.clone());
        Ok(outcome)
    }

    /// Refuse every call of `tenant` (a bundle without checks: deny by default) until a bundle
    /// is installed: what a replica runs for a tenant whose stored bundle does not load, rather
    /// than the default bundle or a refusal to start for every tenant.
    pub fn refuse_all(&self, tenant: &str) {
        let slot = self.slot(tenant);
        let _serial = lock(&slot.swap);
        let old = slot.active.swap(Arc::new(Snapshot::empty(tenant)));
        old.trim();
    }

    /// Swap the active and previous bundles back, instantly (the previous snapshot is kept
    /// built). Rolling back twice returns to where you were.
    pub fn rollback(&self, tenant: &str) -> Result<SwapOutcome, BundleError> {
        let slot = self.slot(tenant);
        let _serial = lock(&slot.swap);
        let mut previous = lock(&slot.previous);
        let Some(target) = previous.take() else {
            return Err(BundleError::NoPrevious(tenant.to_string()));
        };
        let old = slot.active.swap(target.clone());
        old.trim();
        let outcome = SwapOutcome {
            tenant: tenant.to_string(),
            action: "rollback".into(),
            from: old.digest().to_string(),
            to: target.digest().to_string(),
            at: now_secs(),
        };
        *previous = Some(old);
        drop(previous);
        self.record(outcome.clone());
        Ok(outcome)
    }

    /// Make `active` (and `previous`, the rollback target) current for `tenant`, as a replica
    /// following the stored pointer does. Both must be drafts of the tenant or the default.
    /// Returns false when they already were. Slow: call from `spawn_blocking`.
    pub fn install(
        &self,
        tenant: &str,
        active: &str,
        previous: Option<&str>,
    ) -> Result<bool, BundleError> {
        let status = self.status(tenant);
        if status.active == active && status.previous.as_deref() == previous {
            return Ok(false);
        }
        let components = read(&self.inner.components).clone();
        let build = |digest: &str, warm: bool| -> Result<Arc<Snapshot>, BundleError> {
            let spec = self.find_spec(tenant, digest)?;
            self.check_spec(&spec)?;
            Ok(Arc::new(Snapshot::build(
                &self.inner.runtime,
                &components,
                &spec,
                tenant,
                &self.inner.counters,
                warm,
            )?))
        };
        let next = self.within_quota(tenant, || build(active, true))?;
        let previous = previous
            .map(|d| self.within_quota(tenant, || build(d, false)))
            .transpose()?;
        let slot = self.slot(tenant);
        let _serial = lock(&slot.swap);
        let old = slot.active.swap(next.clone());
        old.trim();
        *lock(&slot.previous) = previous;
        let outcome = SwapOutcome {
            tenant: tenant.to_string(),
            action: "sync".into(),
            from: old.digest().to_string(),
            to: next.digest().to_string(),
            at: now_secs(),
        };
        self.record(outcome);
        Ok(true)
    }

    /// The active and previous bundle of a tenant.
    pub fn status(&self, tenant: &str) -> BundleStatus {
        let slot = self.slot(tenant);
        let active = slot.active.load().digest().to_string();
        let previous = lock(&slot.previous)
            .as_ref()
            .map(|s| s.digest().to_string());
        let is_default = active == self.inner.default_spec.digest();
        BundleStatus {
            tenant: tenant.to_string(),
            active,
            previous,
            is_default,
        }
    }

    /// The tenant's status as the store keeps it: the default bundle is named `default`, not
    /// by its digest, because each replica's default depends on its own policy file.
    pub fn stored_status(&self, tenant: &str) -> BundleStatus {
        let mut status = self.status(tenant);
        let default = self.inner.default_spec.digest();
        let symbolic = |d: &mut String| {
            if *d == default {
                *d = super::persist::DEFAULT.to_string();
            }
        };
        symbolic(&mut status.active);
        if let Some(p) = status.previous.as_mut() {
            symbolic(p);
        }
        status
    }

    /// `tenant`'s promotes, rollbacks and syncs so far (oldest first).
    pub fn history(&self, tenant: &str) -> Vec<SwapOutcome> {
        lock(&self.inner.history)
            .get(tenant)
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Swaps made in this process so far, by action (`promote`, `rollback`, `sync`).
    pub fn swap_counts(&self) -> [(&'static str, u64); 3] {
        let n = |i: usize| self.inner.swaps[i].load(std::sync::atomic::Ordering::Relaxed);
        [0, 1, 2].map(|i| (SWAP_ACTIONS[i], n(i)))
    }

    /// Append to the tenant's history, a ring of its last [`HISTORY_LEN`] swaps.
    fn record(&self, outcome: SwapOutcome) {
        if let Some(i) = SWAP_ACTIONS.iter().position(|a| *a == outcome.action) {
            self.inner.swaps[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut all = lock(&self.inner.history);
        let history = all.entry(outcome.tenant.clone()).or_default();
        while history.len() >= HISTORY_LEN {
            history.pop_front();
        }
        history.push_back(outcome);
    }

    /// Change the limits of [`MAX_DRAFTS_PER_TENANT`] and [`MAX_UPLOADED_COMPONENTS`] (tests).
    pub fn set_limits(&self, max_drafts_per_tenant: usize, max_uploaded_components: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.inner.max_drafts.store(max_drafts_per_tenant, Relaxed);
        self.inner
            .max_components
            .store(max_uploaded_components, Relaxed);
    }

    /// Whether `tenant` may hold one more draft (one equal to `digest`, when given, is not
    /// "more"). The admin API asks before it creates a draft.
    pub fn draft_room(&self, tenant: &str, digest: Option<&str>) -> Result<(), BundleError> {
        let limit = self
            .inner
            .max_drafts
            .load(std::sync::atomic::Ordering::Relaxed);
        let drafts = read(&self.inner.drafts);
        let mine = drafts.get(tenant);
        let held = mine.map_or(0, BTreeMap::len);
        if held < limit || digest.is_some_and(|d| mine.is_some_and(|m| m.contains_key(d))) {
            return Ok(());
        }
        Err(BundleError::TooManyDrafts {
            tenant: tenant.to_string(),
            limit,
        })
    }

    /// Whether `tenant` may upload one more component (of this digest): within the gateway's
    /// cap and the tenant's quota (`per_tenant`). A component the tenant already holds is not
    /// "more". The admin API asks before it compiles an upload.
    pub fn component_room(
        &self,
        digest: &str,
        tenant: &str,
        per_tenant: usize,
    ) -> Result<(), BundleError> {
        let limit = self
            .inner
            .max_components
            .load(std::sync::atomic::Ordering::Relaxed);
        let infos = read(&self.inner.infos);
        let owners = read(&self.inner.owners);
        if owners.get(digest).is_some_and(|o| o.contains(tenant)) {
            return Ok(());
        }
        let held = owners
            .iter()
            .filter(|(d, o)| o.contains(tenant) && infos.get(*d).is_some_and(|i| !i.builtin))
            .count();
        if held >= per_tenant {
            return Err(BundleError::TenantComponentQuota {
                tenant: tenant.to_string(),
                limit: per_tenant,
            });
        }
        let uploaded = infos.values().filter(|i| !i.builtin).count();
        if uploaded < limit || infos.contains_key(digest) {
            return Ok(());
        }
        Err(BundleError::TooManyComponents { limit })
    }

    /// What of `tenant` uses the component: a draft, the active bundle or the rollback target.
    /// `None` when nothing does.
    pub fn component_user(&self, tenant: &str, digest: &str) -> Option<String> {
        let uses = |spec: &BundleSpec| spec.component_digests().any(|c| c == digest);
        let slot = self.slot(tenant);
        let active = slot.active.load_full();
        if uses(active.spec()) {
            return Some(format!(
                "the active bundle {} of tenant {tenant}",
                active.digest()
            ));
        }
        if let Some(previous) = lock(&slot.previous).as_ref()
            && uses(previous.spec())
        {
            return Some(format!(
                "the rollback target {} of tenant {tenant}",
                previous.digest()
            ));
        }
        read(&self.inner.drafts).get(tenant).and_then(|drafts| {
            drafts
                .values()
                .find(|d| uses(&d.spec))
                .map(|d| format!("the draft {} of tenant {tenant}", d.digest))
        })
    }

    /// Whether the uploaded (not built-in) component is one `tenant` holds.
    pub fn holds_component(&self, tenant: &str, digest: &str) -> bool {
        read(&self.inner.infos)
            .get(digest)
            .is_some_and(|i| !i.builtin)
            && read(&self.inner.owners)
                .get(digest)
                .is_some_and(|o| o.contains(tenant))
    }

    /// Whether `tenant` is the only tenant holding the uploaded component `digest` (its
    /// deletion would remove the component itself).
    pub fn sole_holder(&self, tenant: &str, digest: &str) -> bool {
        self.holds_component(tenant, digest)
            && read(&self.inner.owners)
                .get(digest)
                .is_some_and(|o| o.len() == 1)
    }

    /// Drop `tenant`'s hold on an uploaded component (`DELETE /v1/admin/plugins/{digest}`); the
    /// component itself goes when no tenant holds it any more and no bundle uses it. Returns
    /// whether it went entirely.
    pub fn release_component(&self, tenant: &str, digest: &str) -> bool {
        let orphan = {
            let mut owners = write(&self.inner.owners);
            match owners.get_mut(digest) {
                Some(o) => {
                    o.remove(tenant);
                    o.is_empty()
                }
                None => true,
            }
        };
        orphan && self.remove_component(digest)
    }

    /// The spec of the active bundle of a tenant.
    pub fn active_spec(&self, tenant: &str) -> BundleSpec {
        self.snapshot(tenant).spec().clone()
    }

    /// Replay recorded calls against a draft (or `"default"`, or the active digest) without
    /// activating it or charging anything: counts and a transition matrix.
    pub fn dry_run(
        &self,
        tenant: &str,
        digest: &str,
        calls: &[RecordedCall],
    ) -> Result<DryRunReport, BundleError> {
        let active = self.snapshot(tenant);
        let spec = if digest == active.digest() {
            active.spec().clone()
        } else {
            self.find_spec(tenant, digest)?
        };
        self.dry_run_spec(tenant, &spec, calls)
    }

    /// Replay recorded calls against `spec` (validated like a draft, but never kept as one:
    /// the tenant's drafts are not touched) without activating it or charging anything.
    pub fn dry_run_spec(
        &self,
        tenant: &str,
        spec: &BundleSpec,
        calls: &[RecordedCall],
    ) -> Result<DryRunReport, BundleError> {
        let snapshot = self.prepare(tenant, spec)?;
        let mut report = DryRunReport {
            digest: snapshot.digest().to_string(),
            total: calls.len(),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let mut failing = 0;
        for (n, call) in calls.iter().enumerate() {
            let left = calls.len() - n;
            if started.elapsed() > DRY_RUN_TIME {
                report.stopped = Some(format!(
                    "stopped after {}s, {left} calls not replayed: replay fewer calls (a shorter sample)",
                    DRY_RUN_TIME.as_secs()
                ));
                break;
            }
            if failing >= DRY_RUN_FAILURES_IN_A_ROW {
                report.stopped = Some(format!(
                    "stopped: the candidate failed on {failing} calls in a row, {left} calls not replayed"
                ));
                break;
            }
            let (kind, reason) = match snapshot.decide(&call.input) {
                Ok((verdict, _)) => {
                    failing = 0;
                    (verdict.kind, verdict.reason)
                }
                Err(e) => {
                    failing += 1;
                    (VerdictKind::Block, e.to_string())
                }
            };
            report.candidates.push(kind);
            match kind {
                VerdictKind::Allow => report.would_allow += 1,
                VerdictKind::Block => report.would_block += 1,
                VerdictKind::Escalate => report.would_escalate += 1,
            }
            *report
                .transitions
                .entry(format!("{}->{}", name(call.decision), name(kind)))
                .or_insert(0) += 1;
            if kind != call.decision && report.divergent.len() < 50 {
                report.divergent.push(DryRunRow {
                    id: call.id.clone(),
                    tool: call.input.tool.clone(),
                    agent_id: call.input.agent_id.clone(),
                    from: call.decision,
                    to: kind,
                    reason,
                });
            }
        }
        report.total = report.candidates.len();
        Ok(report)
    }

    /// The `/v1/admin/policies` shorthand: a draft equal to the active bundle with the policy
    /// stage's Rego replaced by `config` (Rego text, or JSON with modules/tests/data).
    pub fn draft_policy(
        &self,
        tenant: &str,
        name: &str,
        config: String,
    ) -> Result<DraftInfo, BundleError> {
        let spec = self.active_spec(tenant).with_policy_config(config);
        self.create_draft(tenant, name, spec)
    }
}

fn name(kind: VerdictKind) -> &'static str {
    match kind {
        VerdictKind::Allow => "allow",
        VerdictKind::Block => "block",
        VerdictKind::Escalate => "escalate",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of a component that differ only in a custom section: a new digest each `i`.
    fn variant(wasm: &[u8], i: u8) -> Vec<u8> {
        let mut w = wasm.to_vec();
        w.extend_from_slice(&[0, 3, 1, b'x', i]);
        w
    }

    #[test]
    fn a_follower_installs_a_promotion_when_the_tenant_is_at_its_quota() {
        let runtime = Runtime::new(crate::plugins::Limits {
            max_instances: 16,
            max_instances_per_tenant: 4,
            ..crate::plugins::Limits::default()
        })
        .expect("runtime");
        let registry = Registry::with_runtime(Arc::clone(&runtime)).expect("registry");
        let spec = |pad: &str| {
            registry
                .default_spec()
                .with_policy_config(format!("{}{pad}", crate::bundles::default_policy_config()))
        };
        let a = registry.create_draft("t", "a", spec(" ")).expect("a");
        let b = registry.create_draft("t", "b", spec("  ")).expect("b");
        registry.promote("t", &a.digest).expect("promote a");
        // Traffic leaves the active bundle's instances idle in its pools (a cache).
        let input = CheckInput {
            tenant: "t".into(),
            tool: "x".into(),
            arguments: "{}".into(),
            ..Default::default()
        };
        let _ = registry.snapshot("t").decide(&input);
        assert!(runtime.tenant_instances("t") >= 3);
        // What a replica following the stored pointer {active: b, previous: a} does.
        assert_eq!(
            registry.install("t", &b.digest, Some(&a.digest)).ok(),
            Some(true)
        );
        assert_eq!(registry.status("t").active, b.digest);
    }

    #[test]
    fn refused_and_released_uploads_do_not_stay_compiled() {
        let runtime = Runtime::new(crate::plugins::Limits::default()).expect("runtime");
        let registry = Registry::with_runtime(Arc::clone(&runtime)).expect("registry");
        let before = runtime.compiled_len();
        for i in 0..5 {
            // A formatter offered as a check: refused, and not kept.
            let wasm = variant(crate::plugins::artifacts::SIEM_JSON, i);
            let refused = registry.upload_component("x", &wasm, World::CheckPlugin);
            assert!(
                matches!(refused, Err(BundleError::WrongWorld { .. })),
                "{refused:?}"
            );
            // Not a component at all.
            assert!(
                registry
                    .upload_component("y", &[0, 1, 2, i], World::CheckPlugin)
                    .is_err()
            );
        }
        assert_eq!(runtime.compiled_len(), before);
        // Taken, then released by its only owner: it goes from the cache too.
        let wasm = variant(crate::plugins::artifacts::SIEM_JSON, 9);
        let info = registry
            .upload_component("z", &wasm, World::SiemFormatter)
            .expect("a formatter");
        registry.add_component_owner(&info.digest, "acme");
        assert_eq!(runtime.compiled_len(), before + 1);
        assert!(registry.release_component("acme", &info.digest));
        assert_eq!(runtime.compiled_len(), before);
        // An upload undone (its event could not be recorded) while another tenant holds the same
        // bytes leaves that tenant's component in place.
        let info = registry
            .upload_component("z", &wasm, World::SiemFormatter)
            .expect("again");
        registry.add_component_owner(&info.digest, "globex");
        assert!(!registry.remove_component(&info.digest));
        assert!(registry.may_use_component("globex", &info.digest));
        assert!(registry.release_component("globex", &info.digest));
        assert!(!registry.may_use_component("globex", &info.digest));
    }
}
