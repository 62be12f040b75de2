//! The one wasmtime engine of the process, its linkers (our imports + an empty WASI whose
//! blocking calls trap), the limits every call runs under, the epoch ticker, the compile cache,
//! and the live-instance slots (process-wide and per tenant).
//!
//! The epoch ticker runs only while guest calls come ([`Runtime::awake`]), and parks a few ticks
//! after the last: an idle gateway must cost nothing, and a tick is only a chance for the epoch
//! callback to look at the call's wall-clock deadline, so there is nothing to tick for when no
//! guest runs. The linger keeps a busy request path from waking it with a system call per call.
//!
//! Compiling is slow (milliseconds to seconds): callers on the async runtime do it in
//! `spawn_blocking`, never on the request path. Nothing here runs guest code. A plugin must
//! never be able to wait inside the host: every WASI function that could block (`wasi:io/poll`)
//! is linked as a trap, because epoch interruption cannot fire while the host waits.

use super::bindings::{check as cb, siem as sb};
use super::host_state::HostState;
use super::{PluginError, Stage};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;
use wasmtime::StoreContextMut;
use wasmtime::component::types::ComponentFunc;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::component::{LinkerInstance, Val};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the ticker advances the engine's epoch.
pub const EPOCH_TICK: Duration = Duration::from_millis(2);

/// Bounds for every plugin call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock deadline of one `evaluate` (epoch based).
    pub call_deadline: Duration,
    /// Deadline of `configure` (parsing Rego, etc.), once per instance.
    pub configure_deadline: Duration,
    /// Linear memory ceiling per instance.
    pub max_memory_bytes: usize,
    /// Live instances across the process (the pooling allocator's size).
    pub max_instances: usize,
    /// An instance is recycled after this many calls.
    pub max_uses_per_instance: u64,
    /// Idle instances kept per pool (per tenant, bundle and check).
    pub max_idle_per_pool: usize,
    /// Longest verdict reason accepted.
    pub max_reason_bytes: usize,
    /// Live instances one tenant may hold (`INTENTGATE_MAX_INSTANCES_PER_TENANT`), so one
    /// tenant's bundle cannot take the whole pool.
    pub max_instances_per_tenant: usize,
    /// Checks one bundle may hold across its stages (`INTENTGATE_MAX_CHECKS_PER_BUNDLE`),
    /// refused when the draft is made.
    pub max_checks_per_bundle: usize,
    /// Deadline of all the checks of one call together (`INTENTGATE_CALL_CHECKS_DEADLINE_MS`):
    /// the pipeline denies a call whose checks have not all answered by then.
    pub call_checks_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            call_deadline: Duration::from_millis(50),
            configure_deadline: Duration::from_secs(2),
            max_memory_bytes: 64 << 20,
            // Three stages per tenant bundle: room for ~340 tenants with bundles of their own.
            max_instances: 1024,
            max_uses_per_instance: 10_000,
            max_idle_per_pool: 4,
            max_reason_bytes: 4096,
            // 16 tenants at their quota fill the pool; idle pooled instances count, so a busy
            // tenant with a 3-check bundle keeps room for ~20 calls evaluating at once.
            max_instances_per_tenant: 1024 / 16,
            max_checks_per_bundle: 16,
            call_checks_deadline: Duration::from_millis(200),
        }
    }
}

/// The version of the WIT package `intentgate:plugin` this host speaks (`wit/types.wit`).
pub const WIT_VERSION: &str = "0.2.0";

/// A linked formatter component.
pub(crate) enum SiemPre {
    /// World `formatter` (interface `format`).
    Current(sb::FormatterPre<HostState>),
    /// World `siem-formatter` (interface `formatter`), as built before the rename.
    Legacy(super::bindings::siem_legacy::SiemFormatterPre<HostState>),
}

/// Which world a component implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum World {
    /// `intentgate:plugin/check-plugin@0.2.0`
    CheckPlugin,
    /// `intentgate:plugin/formatter@0.2.0` (earlier `siem-formatter`, still loaded and read)
    #[serde(rename = "formatter", alias = "siem-formatter")]
    SiemFormatter,
}

impl World {
    /// The fully qualified world name.
    pub fn name(self) -> &'static str {
        match self {
            World::CheckPlugin => "intentgate:plugin/check-plugin@0.2.0",
            World::SiemFormatter => "intentgate:plugin/formatter@0.2.0",
        }
    }
}

struct Ticker {
    gate: Arc<TickGate>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.gate.stop.store(true, Ordering::Release);
        self.gate.wake();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Ticks the ticker goes on making after it last saw a call, before it parks. Calls that come
/// closer together than this find it awake, so the request path never makes a system call to
/// wake it (before, three guest calls a request meant three `futex` wakes); an idle gateway
/// still parks it within [`EPOCH_TICK`] × this.
const TICKER_LINGER_TICKS: u32 = 10;

/// What wakes the ticker: the number of guest calls in flight. The hot path touches only the
/// atomics; it takes the mutex only when a call starts while the ticker is parked, and the
/// ticker parks only after [`TICKER_LINGER_TICKS`] ticks without a call.
#[derive(Default)]
struct TickGate {
    in_flight: AtomicUsize,
    /// Set by a call that starts with none in flight, cleared by the ticker at each tick: a
    /// call that begins and ends between two ticks still counts as activity.
    started: AtomicBool,
    /// The ticker is parked (or about to): a starting call must wake it.
    parked: AtomicBool,
    /// Epoch increments so far (how tests and metrics see that an idle ticker is parked).
    ticks: AtomicU64,
    /// Times a starting call had to wake the parked ticker.
    wakes: AtomicU64,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake_up: Condvar,
}

impl TickGate {
    fn wake(&self) {
        // Taking the lock orders this notify after the ticker's check-then-wait.
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.wake_up.notify_one();
    }

    /// A guest call starts.
    fn enter(&self) {
        // SeqCst on both sides (here: `in_flight` then `parked`; the ticker: `parked` then
        // `in_flight`): either this call sees the ticker parked and wakes it, or the ticker
        // sees the call and does not park.
        if self.in_flight.fetch_add(1, Ordering::SeqCst) == 0 {
            self.started.store(true, Ordering::SeqCst);
            if self.parked.load(Ordering::SeqCst) {
                self.wakes.fetch_add(1, Ordering::Relaxed);
                self.wake();
            }
        }
    }

    /// The ticker thread: advances the epoch every tick while calls come, and parks (no
    /// wake-ups at all) once none has come for [`TICKER_LINGER_TICKS`] ticks.
    fn run(&self, engine: &Engine) {
        let mut quiet_ticks = TICKER_LINGER_TICKS;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            if quiet_ticks >= TICKER_LINGER_TICKS {
                let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
                self.parked.store(true, Ordering::SeqCst);
                // `started` too: a call that woke the ticker may be over before the ticker
                // runs again. Waiting on `in_flight` alone lost that wake, so the ticker stayed
                // parked and every following call had to wake it once more.
                while self.in_flight.load(Ordering::SeqCst) == 0
                    && !self.started.load(Ordering::SeqCst)
                    && !self.stop.load(Ordering::Acquire)
                {
                    guard = self.wake_up.wait(guard).unwrap_or_else(|p| p.into_inner());
                }
                self.parked.store(false, Ordering::SeqCst);
                drop(guard);
                quiet_ticks = 0;
                continue;
            }
            std::thread::sleep(EPOCH_TICK);
            engine.increment_epoch();
            self.ticks.fetch_add(1, Ordering::Relaxed);
            // Both read, whatever the first says: `started` must be cleared at every tick.
            let started = self.started.swap(false, Ordering::Relaxed);
            let busy = started || self.in_flight.load(Ordering::Acquire) > 0;
            quiet_ticks = if busy { 0 } else { quiet_ticks + 1 };
        }
    }
}

/// Keeps the epoch ticker running while held: hold one across every guest call (instantiate,
/// configure, evaluate, format), or the call's deadline is never looked at.
pub(crate) struct Awake {
    gate: Arc<TickGate>,
}

impl Drop for Awake {
    fn drop(&mut self) {
        self.gate.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Compiled components by digest; a cell per digest so one compilation serves every caller.
type CompileCache = HashMap<String, Arc<OnceLock<Result<Component, PluginError>>>>;

/// The plugin runtime: engine + linkers + limits. Share it as `Arc<Runtime>`.
pub struct Runtime {
    engine: Engine,
    pub(crate) check_linker: Linker<HostState>,
    pub(crate) siem_linker: Linker<HostState>,
    pub(crate) limits: Limits,
    pub(crate) live: AtomicUsize,
    /// Idle instances kept per pool: `max_idle_per_pool`, raised to the request path's worker
    /// count ([`Runtime::size_pools_for_workers`]) so that every worker evaluating at once
    /// finds a configured instance instead of paying `instantiate` + `configure`.
    idle_per_pool: AtomicUsize,
    /// Live instances per tenant (entries leave at zero).
    per_tenant: Mutex<HashMap<Arc<str>, usize>>,
    compiled: Mutex<CompileCache>,
    ticker: Ticker,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Hex SHA-256 of bytes, prefixed `sha256:`.
pub fn digest_of(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for b in hash {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

static SHARED: OnceLock<Result<Arc<Runtime>, PluginError>> = OnceLock::new();

impl Runtime {
    /// Build a runtime with these limits (starts the epoch ticker thread).
    pub fn new(limits: Limits) -> Result<Arc<Self>, PluginError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.parallel_compilation(true);
        let slots = u32::try_from(limits.max_instances).unwrap_or(u32::MAX);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(16))
            // Our components have one linear memory each; address space is reserved per slot.
            .total_memories(slots.saturating_mul(2))
            .total_tables(slots.saturating_mul(8))
            .max_core_instances_per_component(16)
            .max_memories_per_component(4)
            .max_tables_per_component(8)
            .max_memory_size(limits.max_memory_bytes)
            .max_unused_warm_slots(16)
            // An instance's store keeps the fiber stack of its last async call (the request
            // path evaluates asynchronously), so there is one stack per live instance.
            .total_stacks(slots);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        // Reserve the whole 32-bit space per memory slot (address space only, never committed)
        // so that Cranelift elides the bounds check of every load and store: explicit checks
        // made the Rego plugin measurably slower. The memory limit is still
        // `max_memory_size` above, enforced at growth.
        config.memory_reservation(1 << 32);
        config.memory_guard_size(32 << 20);
        config.memory_reservation_for_growth(0);
        let engine = Engine::new(&config)
            .map_err(|e| PluginError::InvalidComponent(format!("engine: {e}")))?;

        let mut check_linker = Linker::<HostState>::new(&engine);
        link_wasi(&mut check_linker)
            .map_err(|e| PluginError::InvalidComponent(format!("linking WASI: {e}")))?;
        cb::CheckPlugin::add_to_linker::<_, HasSelf<_>>(&mut check_linker, |s| s)
            .map_err(|e| PluginError::InvalidComponent(format!("linking host imports: {e}")))?;
        let mut siem_linker = Linker::<HostState>::new(&engine);
        link_wasi(&mut siem_linker)
            .map_err(|e| PluginError::InvalidComponent(format!("linking WASI: {e}")))?;
        sb::Formatter::add_to_linker::<_, HasSelf<_>>(&mut siem_linker, |s| s)
            .map_err(|e| PluginError::InvalidComponent(format!("linking host imports: {e}")))?;

        let gate = Arc::new(TickGate::default());
        let ticker_engine = engine.clone();
        let ticker_gate = gate.clone();
        let handle = std::thread::Builder::new()
            .name("intentgate-epoch".into())
            .spawn(move || ticker_gate.run(&ticker_engine))
            .map_err(|e| PluginError::InvalidComponent(format!("epoch ticker: {e}")))?;

        let idle_per_pool = limits.max_idle_per_pool;
        Ok(Arc::new(Self {
            engine,
            check_linker,
            siem_linker,
            limits,
            live: AtomicUsize::new(0),
            idle_per_pool: AtomicUsize::new(idle_per_pool),
            per_tenant: Mutex::new(HashMap::new()),
            compiled: Mutex::new(HashMap::new()),
            ticker: Ticker {
                gate,
                handle: Some(handle),
            },
        }))
    }

    /// The process-wide runtime (default limits unless [`Runtime::shared_with`] came first).
    pub fn shared() -> Result<Arc<Self>, PluginError> {
        SHARED
            .get_or_init(|| Runtime::new(Limits::default()))
            .clone()
    }

    /// The process-wide runtime with these limits (the `INTENTGATE_PLUGIN_*` settings). One
    /// engine serves the process, so second, different limits are refused rather than
    /// silently ignored.
    pub fn shared_with(limits: Limits) -> Result<Arc<Self>, PluginError> {
        let runtime = SHARED
            .get_or_init(|| Runtime::new(limits.clone()))
            .clone()?;
        if runtime.limits != limits {
            return Err(PluginError::InvalidComponent(format!(
                "the plugin limits are process-wide and already {:?} (asked for {limits:?})",
                runtime.limits
            )));
        }
        Ok(runtime)
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Keep at least `workers` idle instances per pool (never fewer than the limits say; only
    /// grows, since the runtime is process-wide and serves every server in the process).
    pub fn size_pools_for_workers(&self, workers: usize) {
        // A tenant's quota bounds what its pools may hold anyway; beyond it, idle slots
        // would only be refused.
        let cap = self.limits.max_instances_per_tenant.max(1);
        self.idle_per_pool
            .fetch_max(workers.min(cap), Ordering::AcqRel);
    }

    /// Idle instances kept per pool right now.
    pub fn idle_per_pool(&self) -> usize {
        self.idle_per_pool.load(Ordering::Acquire)
    }

    /// Keep the epoch ticker running until the returned guard drops (see [`Awake`]).
    pub(crate) fn awake(&self) -> Awake {
        let gate = &self.ticker.gate;
        gate.enter();
        Awake { gate: gate.clone() }
    }

    /// Guest calls in flight right now (what keeps the epoch ticker running).
    pub fn calls_in_flight(&self) -> usize {
        self.ticker.gate.in_flight.load(Ordering::Acquire)
    }

    /// Epoch ticks so far: it stays put while the ticker is parked (no guest call for
    /// [`TICKER_LINGER_TICKS`] ticks).
    pub fn epoch_ticks(&self) -> u64 {
        self.ticker.gate.ticks.load(Ordering::Relaxed)
    }

    /// The ticker is parked with no call to wake it: no epoch tick happens until the next guest
    /// call starts (how tests see that it parked, instead of guessing how long that takes).
    pub fn ticker_parked(&self) -> bool {
        let gate = &self.ticker.gate;
        // The calls' marks first: a call that woke the parked ticker leaves `started` set until
        // the ticker has run again, so `parked` alone may still read true for a ticker about to
        // tick. With neither mark set, a `parked` read after them is a ticker that waits (until
        // a call starts).
        gate.in_flight.load(Ordering::SeqCst) == 0
            && !gate.started.load(Ordering::SeqCst)
            && gate.parked.load(Ordering::SeqCst)
    }

    /// Times a starting guest call had to wake the parked ticker (a system call on the
    /// request path): rare while calls keep coming.
    pub fn ticker_wakes(&self) -> u64 {
        self.ticker.gate.wakes.load(Ordering::Relaxed)
    }

    /// Instances alive right now (pooled idle ones included).
    pub fn live_instances(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Instances `tenant` holds right now (pooled idle ones included).
    pub fn tenant_instances(&self, tenant: &str) -> usize {
        self.tenants().get(tenant).copied().unwrap_or(0)
    }

    fn tenants(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, usize>> {
        match self.per_tenant.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Compile a component (cached by digest; concurrent callers of one digest wait for a
    /// single compilation). Slow: call off the request path.
    pub fn compile(&self, wasm: &[u8]) -> Result<(String, Component), PluginError> {
        let digest = digest_of(wasm);
        let cell = self.cache().entry(digest.clone()).or_default().clone();
        let compiled = cell.get_or_init(|| {
            if !is_component(wasm) {
                return Err(PluginError::InvalidComponent(
                    "not a component (core module or garbage)".into(),
                ));
            }
            Component::new(&self.engine, wasm)
                .map_err(|e| PluginError::InvalidComponent(format!("{e:#}")))
        });
        if compiled.is_err() {
            // Do not keep failures: garbage uploads must not grow the cache.
            self.cache().remove(&digest);
        }
        compiled.clone().map(|component| (digest, component))
    }

    /// Drops a compiled component from the cache (a component refused at upload, or one no
    /// tenant holds any more): the cache keeps only what the registry may still use, so
    /// uploads cannot grow it without bound.
    pub fn forget(&self, digest: &str) {
        self.cache().remove(digest);
    }

    /// Components compiled and kept (for tests of what the cache holds).
    #[cfg(test)]
    pub(crate) fn compiled_len(&self) -> usize {
        self.cache().len()
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, CompileCache> {
        match self.compiled.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Which world this component implements (imports satisfiable by the host, exports of the
    /// right types), or why none.
    pub fn validate(&self, wasm: &[u8]) -> Result<World, PluginError> {
        let (_, component) = self.compile(wasm)?;
        let check = self.check_pre(&component);
        if check.is_ok() {
            return Ok(World::CheckPlugin);
        }
        if self.siem_pre(&component).is_ok() {
            return Ok(World::SiemFormatter);
        }
        match check {
            Err(e) => Err(e),
            Ok(_) => Ok(World::CheckPlugin),
        }
    }

    pub(crate) fn check_pre(
        &self,
        component: &Component,
    ) -> Result<cb::CheckPluginPre<HostState>, PluginError> {
        let wrong = |e: wasmtime::Error| PluginError::WrongWorld {
            world: World::CheckPlugin.name(),
            detail: format!("{e:#}"),
        };
        self.refuse_other_wit_version(component, World::CheckPlugin)?;
        let pre = self
            .check_linker
            .instantiate_pre(component)
            .map_err(wrong)?;
        cb::CheckPluginPre::new(pre).map_err(wrong)
    }

    /// Links a formatter component: of the world `formatter`, or of its earlier name
    /// `siem-formatter` (same imports, the interface then named `formatter`).
    pub(crate) fn siem_pre(&self, component: &Component) -> Result<SiemPre, PluginError> {
        let wrong = |e: wasmtime::Error| PluginError::WrongWorld {
            world: World::SiemFormatter.name(),
            detail: format!("{e:#}"),
        };
        self.refuse_other_wit_version(component, World::SiemFormatter)?;
        let pre = self.siem_linker.instantiate_pre(component).map_err(wrong)?;
        match sb::FormatterPre::new(pre.clone()) {
            Ok(current) => Ok(SiemPre::Current(current)),
            Err(e) => match super::bindings::siem_legacy::SiemFormatterPre::new(pre) {
                Ok(legacy) => Ok(SiemPre::Legacy(legacy)),
                Err(_) => Err(wrong(e)),
            },
        }
    }

    /// A component built against another version of our WIT package would fail to link with
    /// a type mismatch deep in some record; name the versions instead, so its author knows to
    /// rebuild it with the current SDK.
    fn refuse_other_wit_version(
        &self,
        component: &Component,
        world: World,
    ) -> Result<(), PluginError> {
        let ty = component.component_type();
        let names = ty
            .imports(&self.engine)
            .map(|(name, _)| name)
            .chain(ty.exports(&self.engine).map(|(name, _)| name));
        for name in names {
            if let Some(version) = other_wit_version(name) {
                return Err(PluginError::WrongWorld {
                    world: world.name(),
                    detail: format!(
                        "built for intentgate:plugin@{version} ({name}); this gateway speaks \
                         intentgate:plugin@{WIT_VERSION}: rebuild the plugin with the current SDK"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Reserve one live-instance slot for `tenant` (`None`: the process's own, e.g. a SIEM
    /// formatter), or `TenantQuota` when the tenant holds its share, or `Busy` when the pool is
    /// full. A tenant at its quota is refused without touching the process-wide count.
    pub(crate) fn reserve(
        self: &Arc<Self>,
        tenant: Option<&Arc<str>>,
    ) -> Result<LiveSlot, PluginError> {
        if let Some(tenant) = tenant {
            let quota = self.limits.max_instances_per_tenant;
            let mut tenants = self.tenants();
            let held = tenants.entry(tenant.clone()).or_insert(0);
            if *held >= quota {
                return Err(PluginError::TenantQuota {
                    tenant: tenant.to_string(),
                    limit: quota,
                });
            }
            *held += 1;
        }
        let max = self.limits.max_instances;
        let global = self
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(PluginError::Busy);
        let slot = LiveSlot {
            runtime: self.clone(),
            tenant: tenant.cloned(),
            counted: global.is_ok(),
        };
        // On `Busy` the slot drops here and gives the tenant's count back.
        global.map(|_| slot)
    }

    fn release(&self, tenant: Option<&Arc<str>>, counted: bool) {
        if counted {
            self.live.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(tenant) = tenant {
            let mut tenants = self.tenants();
            if let Some(held) = tenants.get_mut(tenant) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    tenants.remove(tenant);
                }
            }
        }
    }

    /// Map a wasmtime error from a guest call to a typed error.
    pub(crate) fn classify(
        &self,
        stage: Stage,
        error: wasmtime::Error,
        oom: bool,
        deadline: Duration,
    ) -> PluginError {
        if oom {
            return PluginError::OutOfMemory { stage };
        }
        if let Some(trap) = error.downcast_ref::<wasmtime::Trap>()
            && *trap == wasmtime::Trap::Interrupt
        {
            return PluginError::Timeout {
                stage,
                deadline_ms: deadline.as_millis() as u64,
            };
        }
        PluginError::Trap {
            stage,
            detail: format!("{error:#}").chars().take(512).collect(),
        }
    }
}

/// A reserved live-instance slot; released on drop.
pub(crate) struct LiveSlot {
    runtime: Arc<Runtime>,
    tenant: Option<Arc<str>>,
    counted: bool,
}

impl Drop for LiveSlot {
    fn drop(&mut self) {
        self.runtime.release(self.tenant.as_ref(), self.counted);
    }
}

/// The WASI a plugin gets: the p2 set Rust's `std` links against (over an empty context: no
/// files, sockets, environment or input; output discarded), except that every function that
/// can wait in the host traps instead. A wait (`std::thread::sleep`, a subscription to a clock
/// polled with `wasi:io/poll`) would happen in the host, where the epoch deadline cannot
/// interrupt it: it would hold a runtime worker, or the promotion gate during `configure`.
/// With no files and no sockets, `wasi:io/poll` is the only way to wait (stdin is empty and
/// stdout a sink, so the blocking stream calls return at once).
fn link_wasi(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    linker.allow_shadowing(true);
    {
        let mut poll: LinkerInstance<'_, HostState> = linker.instance(WASI_POLL)?;
        for name in ["poll", "[method]pollable.block", "[method]pollable.ready"] {
            poll.func_new(name, refuse_wait(name))?;
        }
    }
    // No standard streams either. wasmtime-wasi's sync stream calls (blocking writes, even a
    // stream's drop) enter tokio with `Handle::block_on`, which panics on the async request path
    // and would drop the connection without an audit. A plugin writes to stderr when it panics,
    // so without this every panicking plugin took its caller down; now it traps here, which is
    // a denied, audited call. Plugins log through `intentgate:plugin/log`.
    for (instance, name) in WASI_STDIO {
        let mut stdio: LinkerInstance<'_, HostState> = linker.instance(instance)?;
        stdio.func_new(name, refuse_stdio(name))?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

/// The `wasi:io/poll` instance of the WASI the host links (components importing an older
/// 0.2.x resolve to it).
const WASI_POLL: &str = "wasi:io/poll@0.2.12";

/// The standard stream getters of the WASI the host links.
const WASI_STDIO: [(&str, &str); 3] = [
    ("wasi:cli/stdin@0.2.12", "get-stdin"),
    ("wasi:cli/stdout@0.2.12", "get-stdout"),
    ("wasi:cli/stderr@0.2.12", "get-stderr"),
];

fn refuse_stdio(
    name: &'static str,
) -> impl Fn(StoreContextMut<'_, HostState>, ComponentFunc, &[Val], &mut [Val]) -> wasmtime::Result<()>
+ Send
+ Sync
+ 'static {
    move |_, _, _, _| {
        Err(wasmtime::format_err!(
            "plugins have no standard streams: wasi:cli {name} is not available (log through \
             intentgate:plugin/log; a Rust plugin that panics writes its message to stderr)"
        ))
    }
}

fn refuse_wait(
    name: &'static str,
) -> impl Fn(StoreContextMut<'_, HostState>, ComponentFunc, &[Val], &mut [Val]) -> wasmtime::Result<()>
+ Send
+ Sync
+ 'static {
    move |_, _, _, _| {
        Err(wasmtime::format_err!(
            "plugins may not wait: wasi:io/poll {name} is not available (a sleep or a blocking \
             poll cannot be interrupted by the deadline)"
        ))
    }
}

/// The version in an import or export name of our package (`intentgate:plugin/log@0.1.0`),
/// when it is not the one this host speaks.
fn other_wit_version(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("intentgate:plugin/")?;
    let (_, version) = rest.split_once('@')?;
    (version != WIT_VERSION).then_some(version)
}

/// A component binary starts with `\0asm`, then version 0x0d and layer 1.
fn is_component(wasm: &[u8]) -> bool {
    wasm.len() >= 8 && wasm[0..4] == *b"\0asm" && wasm[6..8] == [1, 0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A component of `n` core instances of one module, each with a memory of `pages`.
    fn with_memories(n: usize, pages: u64) -> Vec<u8> {
        use wasm_encoder::{
            Component, InstanceSection, MemorySection, MemoryType, Module, ModuleArg, ModuleSection,
        };
        let mut m = Module::new();
        let mut mems = MemorySection::new();
        mems.memory(MemoryType {
            minimum: pages,
            maximum: None,
            memory64: false,
            shared: false,
            page_size_log2: None,
        });
        m.section(&mems);
        let mut c = Component::new();
        c.section(&ModuleSection(&m));
        let mut inst = InstanceSection::new();
        for _ in 0..n {
            inst.instantiate(0, std::iter::empty::<(&str, ModuleArg)>());
        }
        c.section(&inst);
        c.finish()
    }

    #[test]
    fn the_memory_limit_holds_for_an_instance_of_several_memories() {
        let runtime = Runtime::new(Limits::default()).expect("runtime");
        let pages = (runtime.limits.max_memory_bytes / 65536) as u64;
        let instantiate = |n: usize, pages: u64| {
            let (_, component) = runtime.compile(&with_memories(n, pages)).expect("compiles");
            let state = HostState::new(
                runtime.limits.max_memory_bytes,
                Arc::new(crate::plugins::MemoryCounters::default()),
                "t".into(),
                None,
                "x".into(),
            );
            let mut store = state.into_store(runtime.engine());
            let linker = wasmtime::component::Linker::<HostState>::new(runtime.engine());
            let ok = linker.instantiate(&mut store, &component).is_ok();
            (ok, store.data().limiter.exceeded)
        };
        assert_eq!(
            instantiate(4, pages / 4),
            (true, false),
            "within the limit together"
        );
        assert_eq!(
            instantiate(1, pages),
            (true, false),
            "one memory of the whole limit"
        );
        // Each memory alone is within the limit; together they are not.
        assert_eq!(instantiate(4, pages / 4 + 1), (false, true));
        assert_eq!(instantiate(2, pages), (false, true));
    }

    #[test]
    fn other_wit_versions_are_named() {
        assert_eq!(
            other_wit_version("intentgate:plugin/log@0.1.0"),
            Some("0.1.0")
        );
        assert_eq!(other_wit_version("intentgate:plugin/check@0.2.0"), None);
        assert_eq!(other_wit_version("wasi:io/poll@0.2.0"), None);
        assert_eq!(other_wit_version("intentgate:plugin/log"), None);
    }

    #[test]
    fn the_shared_limits_cannot_be_changed_silently() {
        let default = Limits::default();
        let runtime = Runtime::shared_with(default.clone()).expect("the default limits");
        assert_eq!(runtime.limits(), &default);
        let other = Limits {
            call_deadline: default.call_deadline + Duration::from_millis(1),
            ..default
        };
        let Err(e) = Runtime::shared_with(other) else {
            panic!("second limits must be refused");
        };
        assert!(e.to_string().contains("process-wide"), "{e}");
    }

    /// A call that wakes the parked ticker and is over before the ticker runs again still
    /// wakes it: before, the ticker saw nothing in flight, waited again and stayed parked, so
    /// every following call paid a wake (what made the close-succession test fail on a busy
    /// machine).
    #[test]
    fn a_wake_by_a_call_that_already_ended_is_not_lost() {
        let gate = Arc::new(TickGate::default());
        let engine = Engine::default();
        let thread = {
            let (gate, engine) = (gate.clone(), engine.clone());
            std::thread::spawn(move || gate.run(&engine))
        };
        let parked = |gate: &TickGate| {
            // The ticker holds the lock from setting `parked` until it waits.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !gate.parked.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(gate.lock.lock().unwrap_or_else(|p| p.into_inner()));
        };
        parked(&gate);
        let before = gate.ticks.load(Ordering::Relaxed);
        {
            // The whole call, wake included, happens while the ticker waits for the lock.
            let _lock = gate.lock.lock().unwrap_or_else(|p| p.into_inner());
            gate.in_flight.fetch_add(1, Ordering::SeqCst);
            gate.started.store(true, Ordering::SeqCst);
            gate.wake_up.notify_one();
            gate.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.ticks.load(Ordering::Relaxed) == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let ticked = gate.ticks.load(Ordering::Relaxed) > before;
        gate.stop.store(true, Ordering::Release);
        gate.wake();
        thread.join().expect("the ticker ends");
        assert!(ticked, "the woken ticker went back to sleep without a tick");
    }
}
