//! Check components and their instance pools.
//!
//! A [`CheckComponent`] is compiled and pre-linked once per digest. A [`CheckPool`] belongs to
//! one (tenant, bundle, stage, check): it hands out configured instances, takes them back after
//! a successful call, and drops them after a bounded number of calls or on any error (a store
//! that trapped is never entered again). Every call runs under the epoch deadline and the memory
//! limit, and its result is validated before the caller sees it.
//!
//! [`CheckPool::evaluate_async`] is the request path: the guest runs on a fiber and yields to
//! the tokio runtime at every epoch tick, so a slow check never holds a worker for long and
//! dropping the future (a deadline) abandons the call. [`CheckPool::evaluate`] runs the same
//! code inline, for callers that are already off the runtime (dry-runs, benchmarks).
//!
//! A configuration's self-tests (the top-level `tests` member of a JSON configuration, as the
//! Rego plugin takes them) run once, in the instance [`CheckPool::warm`] configures when a
//! bundle is drafted or promoted. The instances that serve calls are configured without them:
//! a test suite is not run again for every fresh instance on the request path.

use super::bindings::check as cb;
use super::bindings::check::intentgate::plugin::types as wit;
use super::counters::Counters;
use super::host_state::{self, HostState};
use super::runtime::{Limits, LiveSlot, Runtime};
use super::{
    Charge, CheckInput, CheckOutput, IntentRecord, PluginError, Stage, Verdict, VerdictKind,
};
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use wasmtime::Store;
use wasmtime::component::Component;

/// A compiled, pre-linked check component. Cheap to clone.
#[derive(Clone)]
pub struct CheckComponent {
    digest: Arc<str>,
    pre: cb::CheckPluginPre<HostState>,
}

impl std::fmt::Debug for CheckComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckComponent")
            .field("digest", &self.digest)
            .finish()
    }
}

impl CheckComponent {
    /// Compile and link `wasm` as a check; refuses components of another world.
    /// Slow: call off the request path.
    pub fn new(runtime: &Runtime, wasm: &[u8]) -> Result<Self, PluginError> {
        let (digest, component) = runtime.compile(wasm)?;
        Self::from_component(runtime, digest, &component)
    }

    pub(crate) fn from_component(
        runtime: &Runtime,
        digest: String,
        component: &Component,
    ) -> Result<Self, PluginError> {
        let pre = runtime.check_pre(component)?;
        Ok(Self {
            digest: digest.into(),
            pre,
        })
    }

    /// `sha256:<hex>` of the component bytes.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

struct Instance {
    store: Store<HostState>,
    bindings: cb::CheckPlugin,
    uses: u64,
    /// The thread that last ran it ([`this_thread`]): its memory is warm in that core's caches.
    home: u32,
    _slot: LiveSlot,
}

/// The idle instance `me` ran last, else the one given back last (LIFO either way).
fn take_warm<T>(idle: &mut Vec<T>, home: impl Fn(&T) -> u32, me: u32) -> Option<T> {
    match idle.iter().rposition(|i| home(i) == me) {
        Some(at) => Some(idle.remove(at)),
        None => idle.pop(),
    }
}

/// A small number naming the calling thread, for [`Instance::home`].
fn this_thread() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    thread_local! {
        static ME: u32 = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    ME.with(|me| *me)
}

/// Pooled, configured instances of one check for one tenant and bundle.
pub struct CheckPool {
    runtime: Arc<Runtime>,
    component: CheckComponent,
    /// The whole configuration, self-tests included: what [`CheckPool::warm`] configures.
    config: Arc<str>,
    /// The configuration without its self-tests: what the request path's instances get.
    serving_config: Arc<str>,
    stage: Stage,
    tenant: Arc<str>,
    counters: Arc<dyn Counters>,
    require_intent: bool,
    idle: Arc<IdleList>,
}

/// A pool's idle instances.
type IdleList = Mutex<Vec<Instance>>;

/// Every pool's idle list, by runtime and tenant. Idle instances hold their tenant's slots:
/// a call refused for its tenant's quota takes an idle instance of the tenant's other pools
/// out (freeing its slot) and tries once more, so the instances one check kept after a burst
/// never shut the tenant's other checks out. Dead lists are dropped as they are met.
type IdleLists = std::collections::HashMap<(usize, Arc<str>), Vec<std::sync::Weak<IdleList>>>;

static IDLE_LISTS: std::sync::LazyLock<Mutex<IdleLists>> = std::sync::LazyLock::new(Mutex::default);

fn idle_lists() -> std::sync::MutexGuard<'static, IdleLists> {
    IDLE_LISTS.lock().unwrap_or_else(|p| p.into_inner())
}

fn runtime_key(runtime: &Arc<Runtime>) -> usize {
    Arc::as_ptr(runtime) as usize
}

/// Drops one idle instance of `tenant`'s pools other than `mine`; whether one went.
fn evict_idle_elsewhere(runtime: &Arc<Runtime>, tenant: &Arc<str>, mine: &Arc<IdleList>) -> bool {
    let lists: Vec<Arc<IdleList>> = {
        let mut all = idle_lists();
        let Some(weak) = all.get_mut(&(runtime_key(runtime), tenant.clone())) else {
            return false;
        };
        weak.retain(|w| w.strong_count() > 0);
        weak.iter().filter_map(std::sync::Weak::upgrade).collect()
    };
    for list in lists.iter().filter(|l| !Arc::ptr_eq(l, mine)) {
        let evicted = list.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if evicted.is_some() {
            return true;
        }
    }
    false
}

impl std::fmt::Debug for CheckPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckPool")
            .field("component", &self.component.digest)
            .field("stage", &self.stage)
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl CheckPool {
    /// A pool for this check. Does not instantiate: call [`CheckPool::warm`] to validate the
    /// configuration (and keep one instance ready).
    pub fn new(
        runtime: Arc<Runtime>,
        component: CheckComponent,
        config: impl Into<Arc<str>>,
        stage: Stage,
        tenant: impl Into<Arc<str>>,
        counters: Arc<dyn Counters>,
    ) -> Self {
        let config: Arc<str> = config.into();
        Self {
            runtime,
            component,
            serving_config: without_self_tests(&config),
            config,
            stage,
            tenant: tenant.into(),
            counters,
            require_intent: stage == Stage::Intent,
            idle: Arc::default(),
        }
        .registered()
    }

    /// Lists this pool's idle instances where its tenant's other pools find them.
    fn registered(self) -> Self {
        let mut all = idle_lists();
        // Pools come and go with bundles (a swap, a draft): dead lists leave here.
        all.retain(|_, lists| {
            lists.retain(|w| w.strong_count() > 0);
            !lists.is_empty()
        });
        all.entry((runtime_key(&self.runtime), self.tenant.clone()))
            .or_default()
            .push(Arc::downgrade(&self.idle));
        drop(all);
        self
    }

    /// Whether results must carry an intent record (default: in the intent stage). Custom
    /// checks after the first one of the intent stage need not.
    #[must_use]
    pub fn with_intent_required(mut self, required: bool) -> Self {
        self.require_intent = required;
        self
    }

    /// The component digest.
    pub fn component_digest(&self) -> &str {
        self.component.digest()
    }

    /// The stage.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// Instantiate and configure one instance now (so a bad configuration is reported at load,
    /// not at the first call) and keep it idle.
    pub fn warm(&self) -> Result<(), PluginError> {
        let instance = now_or_never(self.instantiate(Exec::Inline, &self.config), self.stage)?;
        self.give_back(instance);
        Ok(())
    }

    /// Drop every idle instance (e.g. when this bundle stops being active).
    pub fn trim(&self) {
        self.lock_idle().clear();
    }

    /// Idle instances right now.
    pub fn idle_count(&self) -> usize {
        self.lock_idle().len()
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Instance>> {
        match self.idle.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    async fn instantiate(&self, exec: Exec, config: &str) -> Result<Instance, PluginError> {
        let slot = self.runtime.reserve(Some(&self.tenant))?;
        let _awake = self.runtime.awake();
        let limits = &self.runtime.limits;
        let state = HostState::new(
            limits.max_memory_bytes,
            self.counters.clone(),
            self.tenant.clone(),
            Some(self.stage),
            self.component.digest.clone(),
        );
        let mut store = state.into_store(self.runtime.engine());
        host_state::arm(&mut store, limits.configure_deadline, exec == Exec::Async);
        let stage = self.stage;
        let pre = &self.component.pre;
        let bindings = match exec {
            Exec::Inline => pre.instantiate(&mut store),
            Exec::Async => pre.instantiate_async(&mut store).await,
        }
        .map_err(|e| PluginError::Instantiate {
            stage,
            detail: format!("{e:#}"),
        })?;
        let api = bindings.intentgate_plugin_check();
        let configured = match exec {
            Exec::Inline => api.call_configure(&mut store, config),
            Exec::Async => api
                .func_configure()
                .call_async(&mut store, (config,))
                .await
                .map(|(r,)| r),
        };
        match configured {
            Ok(Ok(())) => Ok(Instance {
                store,
                bindings,
                uses: 0,
                home: this_thread(),
                _slot: slot,
            }),
            Ok(Err(message)) => Err(PluginError::Configure {
                stage,
                message: truncate(message, 2048),
            }),
            Err(e) => {
                let oom = store.data().limiter.exceeded;
                let inner = self
                    .runtime
                    .classify(stage, e, oom, limits.configure_deadline);
                Err(PluginError::Configure {
                    stage,
                    message: inner.to_string(),
                })
            }
        }
    }

    fn give_back(&self, instance: Instance) {
        let limits = &self.runtime.limits;
        if instance.uses >= limits.max_uses_per_instance {
            return;
        }
        let mut idle = self.lock_idle();
        if idle.len() < self.runtime.idle_per_pool() {
            idle.push(instance);
        }
    }

    /// Run `evaluate` once on a pooled (or fresh) instance and validate the result, inline on
    /// this thread (never suspends). For callers off the async runtime; the request path uses
    /// [`CheckPool::evaluate_async`].
    pub fn evaluate(
        &self,
        input: &CheckInput,
        intent: Option<&IntentRecord>,
    ) -> Result<CheckOutput, PluginError> {
        now_or_never(self.run(input, intent, Exec::Inline), self.stage)
    }

    /// Run `evaluate` once, asynchronously: the guest yields to the executor at every epoch
    /// tick. Dropping the future abandons the call and its instance.
    pub async fn evaluate_async(
        &self,
        input: &CheckInput,
        intent: Option<&IntentRecord>,
    ) -> Result<CheckOutput, PluginError> {
        self.run(input, intent, Exec::Async).await
    }

    pub(crate) async fn run(
        &self,
        input: &CheckInput,
        intent: Option<&IntentRecord>,
        exec: Exec,
    ) -> Result<CheckOutput, PluginError> {
        let _awake = self.runtime.awake();
        let me = this_thread();
        let pooled = {
            // The instance this thread ran last, when it is idle: its linear memory and the
            // policy's data are still in this core's caches (taking the one another worker
            // just gave back made every evaluation run on cold caches).
            take_warm(&mut self.lock_idle(), |i| i.home, me)
        };
        let mut instance = match pooled {
            Some(instance) => instance,
            None => match self.instantiate(exec, &self.serving_config).await {
                Err(PluginError::TenantQuota { .. })
                    if evict_idle_elsewhere(&self.runtime, &self.tenant, &self.idle) =>
                {
                    self.instantiate(exec, &self.serving_config).await?
                }
                other => other?,
            },
        };
        let limits = &self.runtime.limits;
        host_state::arm(
            &mut instance.store,
            limits.call_deadline,
            exec == Exec::Async,
        );
        let call = input.to_wit();
        let intent = intent.map(IntentRecord::to_wit);
        let api = instance.bindings.intentgate_plugin_check();
        let result = match exec {
            Exec::Inline => api.call_evaluate(&mut instance.store, &call, intent.as_ref()),
            Exec::Async => api
                .func_evaluate()
                .call_async(&mut instance.store, (&call, intent.as_ref()))
                .await
                .map(|(r,)| r),
        };
        match result {
            Ok(raw) => {
                instance.uses += 1;
                instance.home = me;
                let approval_mode = instance.store.data_mut().approval_mode.take();
                // A malformed result drops its instance like any other error: whatever state
                // made it would make the next call's too.
                let validated = validate(self.stage, raw, limits, self.require_intent);
                if validated.is_ok() {
                    self.give_back(instance);
                }
                let mut out = validated?;
                out.verdict.approval_mode = approval_mode;
                Ok(out)
            }
            Err(e) => {
                let oom = instance.store.data().limiter.exceeded;
                // `instance` is dropped here: a store that trapped is never entered again.
                Err(self
                    .runtime
                    .classify(self.stage, e, oom, limits.call_deadline))
            }
        }
    }
}

/// `config` without its top-level `tests` member (unchanged when it is not a JSON object or
/// has none): self-tests run once per bundle, in the validating instance.
fn without_self_tests(config: &Arc<str>) -> Arc<str> {
    if !config.trim_start().starts_with('{') {
        return config.clone();
    }
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(config) {
        Ok(mut object) if object.contains_key("tests") => {
            object.remove("tests");
            serde_json::Value::Object(object).to_string().into()
        }
        _ => config.clone(),
    }
}

/// How a guest call is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exec {
    /// On the caller's thread, to completion (the future never suspends).
    Inline,
    /// On a fiber that yields to the executor at every epoch tick.
    Async,
}

/// Poll a future that never suspends ([`Exec::Inline`] code) to its end. Should it suspend
/// anyway, the call fails closed rather than blocking.
pub(crate) fn now_or_never<T>(
    future: impl Future<Output = Result<T, PluginError>>,
    stage: Stage,
) -> Result<T, PluginError> {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(out) => out,
        Poll::Pending => Err(PluginError::Trap {
            stage,
            detail: "an inline plugin call suspended".into(),
        }),
    }
}

impl Drop for CheckPool {
    fn drop(&mut self) {
        self.trim();
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

const MAX_LIST: usize = 256;
const MAX_CHARGES: usize = 16;
const MAX_KEY_BYTES: usize = 256;
const MAX_SUMMARY_BYTES: usize = 1024;

/// Accept only well-formed results: bounded strings and lists, an intent record from the intent
/// stage with a finite confidence in [0, 1], charges only from the budget stage and only with
/// an allow.
fn validate(
    stage: Stage,
    raw: wit::CheckResult,
    limits: &Limits,
    require_intent: bool,
) -> Result<CheckOutput, PluginError> {
    let bad = |detail: String| PluginError::Malformed { stage, detail };
    let verdict = raw.verdict;
    if verdict.reason.len() > limits.max_reason_bytes {
        return Err(bad(format!(
            "reason of {} bytes (max {})",
            verdict.reason.len(),
            limits.max_reason_bytes
        )));
    }
    let kind = match verdict.kind {
        wit::VerdictKind::Allow => VerdictKind::Allow,
        wit::VerdictKind::Block => VerdictKind::Block,
        wit::VerdictKind::Escalate => VerdictKind::Escalate,
    };
    let verdict = Verdict {
        kind,
        reason: verdict.reason,
        requires_step_up: verdict.requires_step_up,
        approval_mode: None,
    };

    let intent = match (require_intent, raw.intent) {
        (true, None) => return Err(bad("the intent stage returned no intent record".into())),
        (_, Some(r)) if stage == Stage::Intent => {
            if !r.confidence.is_finite() || !(0.0..=1.0).contains(&r.confidence) {
                return Err(bad(format!(
                    "intent confidence {} is not in [0, 1]",
                    r.confidence
                )));
            }
            if r.summary.len() > MAX_SUMMARY_BYTES || r.rationale.len() > limits.max_reason_bytes {
                return Err(bad("intent summary or rationale too long".into()));
            }
            let lists = [&r.allowed_tools, &r.forbidden_tools];
            if lists
                .iter()
                .any(|l| l.len() > MAX_LIST || l.iter().any(|t| t.len() > MAX_KEY_BYTES))
            {
                return Err(bad("intent tool lists too long".into()));
            }
            Some(IntentRecord {
                summary: r.summary,
                allowed_tools: r.allowed_tools,
                forbidden_tools: r.forbidden_tools,
                confidence: r.confidence,
                rationale: r.rationale,
            })
        }
        (_, _) => None,
    };

    if !raw.charges.is_empty() {
        if stage != Stage::Budget {
            return Err(bad("only the budget stage may charge".into()));
        }
        if verdict.kind != VerdictKind::Allow {
            return Err(bad("charges on a verdict that is not allow".into()));
        }
        if raw.charges.len() > MAX_CHARGES {
            return Err(bad(format!(
                "{} charges (max {MAX_CHARGES})",
                raw.charges.len()
            )));
        }
    }
    let mut charges = Vec::with_capacity(raw.charges.len());
    for c in raw.charges {
        if c.key.is_empty() || c.key.len() > MAX_KEY_BYTES || c.key.contains('/') {
            return Err(bad("charge key empty, too long, or containing '/'".into()));
        }
        if c.amount == 0 {
            return Err(bad(format!("charge {} has amount 0", c.key)));
        }
        charges.push(Charge {
            key: c.key,
            window_start: c.window_start,
            amount: c.amount,
            limit: c.limit,
        });
    }
    Ok(CheckOutput {
        verdict,
        intent,
        charges,
    })
}

#[cfg(test)]
mod tests {
    use super::{take_warm, this_thread};

    #[test]
    fn a_thread_gets_back_the_instance_it_ran_last() {
        // (name, home): given back in this order, the last one on top.
        let mut idle = vec![("a", 1), ("b", 2), ("c", 1), ("d", 2)];
        let home = |i: &(&str, u32)| i.1;
        assert_eq!(take_warm(&mut idle, home, 1), Some(("c", 1)));
        assert_eq!(take_warm(&mut idle, home, 1), Some(("a", 1)));
        // None of its own left: the one given back last, whoever ran it.
        assert_eq!(take_warm(&mut idle, home, 1), Some(("d", 2)));
        assert_eq!(take_warm(&mut idle, home, 3), Some(("b", 2)));
        assert_eq!(take_warm(&mut idle, home, 3), None);
    }

    #[test]
    fn threads_are_told_apart() {
        let here = this_thread();
        assert_eq!(here, this_thread());
        let there = std::thread::spawn(this_thread)
            .join()
            .expect("the thread ends");
        assert_ne!(here, there);
    }
}
