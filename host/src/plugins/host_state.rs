//! What a plugin instance may reach, and nothing more: logging (bounded, tagged), the wall
//! clock, read-only budget counters (namespaced by tenant), and an empty WASI context for Rust
//! std (no preopened dirs, no env, no args, no sockets, no stdin; output discarded).
//!
//! Host functions here must never panic into the guest: the counters view is called under
//! `catch_unwind` and a panic reads as "exhausted".

use super::Stage;
use super::bindings::{check as cb, siem as sb};
use super::counters::Counters;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// Bytes of log output one instance may write per call before lines are dropped.
const LOG_BUDGET_PER_CALL: usize = 16 * 1024;

/// Memory limiter that remembers it refused a growth (so a trap can be reported as OOM).
///
/// The limit is on the instance, not on each of its memories: a component made of several core
/// instances has a memory each (the pool allows a few), and every one is counted against the
/// same `max_bytes`.
pub(crate) struct MemoryLimiter {
    max_bytes: usize,
    /// Bytes of every memory of the store, as approved so far (memories only grow).
    total: usize,
    /// The last approved growth, taken back if the growth then failed.
    pending: usize,
    pub(crate) exceeded: bool,
}

impl MemoryLimiter {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            total: 0,
            pending: 0,
            exceeded: false,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Also called when a memory is created (`current` 0, `desired` its initial size).
        let growth = desired.saturating_sub(current);
        match self.total.checked_add(growth) {
            Some(total) if total <= self.max_bytes => {
                self.total = total;
                self.pending = growth;
                Ok(true)
            }
            _ => {
                self.exceeded = true;
                Ok(false)
            }
        }
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.total = self.total.saturating_sub(std::mem::take(&mut self.pending));
        self.exceeded = true;
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// Per-store host state.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    counters: Arc<dyn Counters>,
    tenant: Arc<str>,
    stage: Option<Stage>,
    plugin: Arc<str>,
    log_budget: usize,
    /// When the current guest call must have returned (checked at every epoch tick).
    deadline: Instant,
    /// The current call runs under `call_async`: at every tick it yields to the executor.
    yielding: bool,
    /// What the current `evaluate` said through `hints.approval-mode` (reset at each call).
    pub(crate) approval_mode: Option<String>,
}

/// Bytes a check's crossing may lift out of its guest (its result's strings and lists).
pub(crate) const CHECK_HOSTCALL_BYTES: usize = 2 << 20;
/// Bytes a formatter's crossing may lift: its body (at most 5 MiB) and its headers.
pub(crate) const FORMATTER_HOSTCALL_BYTES: usize = 16 << 20;

/// Host resources (WASI pollables, streams, network handles) one instance may hold at once.
/// Their memory is the host's, outside the plugin's memory limit, and an instance lives for
/// many calls: unbounded (wasmtime's default is a million), a plugin that never drops its
/// handles could grow the gateway's heap by gigabytes. Rust's `std` holds a handful.
pub(crate) const MAX_HOST_RESOURCES: usize = 256;

fn bounded_table() -> ResourceTable {
    let mut table = ResourceTable::new();
    table.set_max_capacity(MAX_HOST_RESOURCES);
    table
}

impl HostState {
    pub(crate) fn new(
        max_memory_bytes: usize,
        counters: Arc<dyn Counters>,
        tenant: Arc<str>,
        stage: Option<Stage>,
        plugin: Arc<str>,
    ) -> Self {
        let wasi = WasiCtxBuilder::new()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: bounded_table(),
            limiter: MemoryLimiter::new(max_memory_bytes),
            counters,
            tenant,
            stage,
            plugin,
            log_budget: LOG_BUDGET_PER_CALL,
            deadline: Instant::now(),
            yielding: false,
            approval_mode: None,
        }
    }

    /// Reset per-call budgets before a call.
    pub(crate) fn begin_call(&mut self) {
        self.limiter.exceeded = false;
        self.log_budget = LOG_BUDGET_PER_CALL;
    }

    /// A store for this state: the memory limiter, and an epoch callback that interrupts the
    /// guest once the call's deadline passed and otherwise, in an async call, yields to the
    /// executor at every tick (so a plugin never holds a runtime worker for more than a tick).
    pub(crate) fn into_store(self, engine: &Engine) -> Store<HostState> {
        let check = self.stage.is_some();
        let mut store = Store::new(engine, self);
        store.limiter(|s| &mut s.limiter);
        // What the host may allocate for one crossing's values lifted out of the guest (its
        // result, an import's arguments), before any of our checks of their sizes run: a few
        // KiB serve a check, a formatted batch is at most `format::MAX_BODY`. Wasmtime's
        // default, 128 MiB a crossing, let a small guest make the host hold that much.
        store.set_hostcall_fuel(if check {
            CHECK_HOSTCALL_BYTES
        } else {
            FORMATTER_HOSTCALL_BYTES
        });
        store.epoch_deadline_callback(|ctx| {
            let state = ctx.data();
            Ok(if Instant::now() >= state.deadline {
                UpdateDeadline::Interrupt
            } else if state.yielding {
                UpdateDeadline::Yield(1)
            } else {
                UpdateDeadline::Continue(1)
            })
        });
        store
    }
}

/// Arm the deadline of the next guest call on `store`: `limit` from now, yielding at every
/// tick when the call is made with `call_async`.
pub(crate) fn arm(store: &mut Store<HostState>, limit: Duration, yielding: bool) {
    let state = store.data_mut();
    state.begin_call();
    state.deadline = Instant::now() + limit;
    state.yielding = yielding;
    state.approval_mode = None;
    store.set_epoch_deadline(1);
}

impl HostState {
    fn log_line(&mut self, level: u8, message: &str) {
        if self.log_budget == 0 {
            return;
        }
        let mut end = message.len().min(self.log_budget).min(2048);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.log_budget = self.log_budget.saturating_sub(end.max(1));
        let text = &message[..end];
        let stage = self.stage.map(Stage::as_str).unwrap_or("-");
        let (tenant, plugin) = (&*self.tenant, &*self.plugin);
        match level {
            0 => tracing::debug!(target: "intentgate::plugin", tenant, stage, plugin, "{text}"),
            1 => tracing::info!(target: "intentgate::plugin", tenant, stage, plugin, "{text}"),
            2 => tracing::warn!(target: "intentgate::plugin", tenant, stage, plugin, "{text}"),
            _ => tracing::error!(target: "intentgate::plugin", tenant, stage, plugin, "{text}"),
        }
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl cb::intentgate::plugin::types::Host for HostState {}

impl cb::intentgate::plugin::log::Host for HostState {
    fn log(&mut self, level: cb::intentgate::plugin::log::Level, message: String) {
        use cb::intentgate::plugin::log::Level;
        let level = match level {
            Level::Debug => 0,
            Level::Info => 1,
            Level::Warn => 2,
            Level::Error => 3,
        };
        self.log_line(level, &message);
    }
}

impl cb::intentgate::plugin::clock::Host for HostState {
    fn now_unix_ms(&mut self) -> u64 {
        now_unix_ms()
    }
}

impl cb::intentgate::plugin::hints::Host for HostState {
    fn approval_mode(&mut self, mode: String) {
        // Bounded: only the two known values are kept.
        if matches!(mode.as_str(), "sync" | "async") {
            self.approval_mode = Some(mode);
        }
    }
}

impl cb::intentgate::plugin::counters::Host for HostState {
    fn get(&mut self, key: String, window_start: u64) -> u64 {
        // A key with '/' could name another namespace through this tenant's prefix (a tenant
        // named `usage` reading `acme/agent/tool` would read the pipeline's usage counters of
        // tenant acme). No charge may carry one either (`check.rs`): it reads as exhausted.
        if key.contains('/') {
            return u64::MAX;
        }
        let key = format!("{}/{}", self.tenant, key);
        let counters = self.counters.clone();
        catch_unwind(AssertUnwindSafe(|| counters.get(&key, window_start))).unwrap_or(u64::MAX)
    }
}

impl sb::intentgate::plugin::types::Host for HostState {}

impl sb::intentgate::plugin::log::Host for HostState {
    fn log(&mut self, level: sb::intentgate::plugin::log::Level, message: String) {
        use sb::intentgate::plugin::log::Level;
        let level = match level {
            Level::Debug => 0,
            Level::Info => 1,
            Level::Warn => 2,
            Level::Error => 3,
        };
        self.log_line(level, &message);
    }
}

impl sb::intentgate::plugin::clock::Host for HostState {
    fn now_unix_ms(&mut self) -> u64 {
        now_unix_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::MemoryCounters;
    use cb::intentgate::plugin::counters::Host as _;

    #[test]
    fn a_plugins_host_resources_are_bounded() {
        let counters = Arc::new(MemoryCounters::default());
        let mut state = HostState::new(1 << 20, counters, "t".into(), None, "p".into());
        for _ in 0..MAX_HOST_RESOURCES {
            state.table.push(0u64).expect("within the bound");
        }
        assert!(
            state.table.push(0u64).is_err(),
            "a plugin could hold host memory without bound"
        );
    }

    #[test]
    fn a_plugin_reads_only_its_own_tenants_counters() {
        let counters = Arc::new(MemoryCounters::default());
        let charge = |key: &str| crate::plugins::Charge {
            key: key.to_owned(),
            window_start: 0,
            amount: 3,
            limit: 100,
        };
        // The pipeline's usage counter of tenant acme, and a counter of tenant `usage`.
        counters
            .charge_all(&[charge("usage/acme/agent-7"), charge("usage/mine")])
            .expect("charged");
        let mut state = HostState::new(1 << 20, counters, "usage".into(), None, "p".into());
        assert_eq!(state.get("mine".into(), 0), 3, "its own counter");
        assert_eq!(
            state.get("acme/agent-7".into(), 0),
            u64::MAX,
            "another namespace"
        );
    }
}
