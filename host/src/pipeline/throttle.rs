//! The denial throttle: a token (root `jti`) or a tenant that keeps being refused is refused
//! up front, before any check runs, until its window ends, and those refusals are audited as
//! one aggregated event per token (or tenant) and window, with their count.
//!
//! Without it a token with `rate_limit: 1` could produce unlimited denials, each costing plugin
//! CPU and a durable audit row: a cheap way to burn the gateway and flood the chain. The
//! counters live in memory (per replica) and are bounded: at most [`DenialLimits::max_tokens`]
//! tokens and [`DenialLimits::max_tenants`] tenants are tracked; entries of past windows are
//! swept when the map is full, and a token that still finds no room is left to its tenant's
//! limit (the tenant map is small). Counts are never lost: a throttled call is counted into a
//! pending summary until the summary is in the audit chain.
//!
//! This module must never run a check, never block on I/O while holding its lock, and never
//! grow without bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use crate::audit::{AuditEvent, AuditLog, Decision};

/// Event kind of an aggregated record of throttled calls.
pub const THROTTLED_KIND: &str = "intentgate.denials_throttled";

/// How many denials a token and a tenant may produce per window before they are throttled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenialLimits {
    /// Length of a window.
    pub window: Duration,
    /// Denials of one root token per window; the next call of that token is throttled.
    pub per_token: u32,
    /// Denials of one tenant per window; the next call of that tenant is throttled.
    pub per_tenant: u32,
    /// Tokens tracked at once.
    pub max_tokens: usize,
    /// Tenants tracked at once.
    pub max_tenants: usize,
}

impl Default for DenialLimits {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            per_token: 30,
            per_tenant: 600,
            max_tokens: 65_536,
            max_tenants: 4_096,
        }
    }
}

/// Which counter refused the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Token,
    Tenant,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Token => "token",
            Scope::Tenant => "tenant",
        }
    }
}

/// A call refused by the throttle: by which counter, and for how long still.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    pub scope: Scope,
    pub limit: u32,
    pub retry_after_secs: u64,
}

/// Who a summary is about (copied from the first throttled call).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Subject {
    agent_id: String,
    jti: String,
    root_jti: String,
}

/// One counter: denials and throttled calls in the current window.
#[derive(Debug, Default)]
struct Entry {
    window: u64,
    denials: u32,
    throttled: u64,
    subject: Subject,
}

/// A count of throttled calls not yet in the audit chain.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Summary {
    tenant: String,
    scope: Scope,
    subject: Subject,
    first_window: u64,
    last_window: u64,
    count: u64,
}

type TokenKey = (String, String);

#[derive(Default)]
struct State {
    tokens: HashMap<TokenKey, Entry>,
    tenants: HashMap<String, Entry>,
    /// Counts of ended windows (or of a flush), waiting for the audit log.
    pending: Vec<Summary>,
}

/// The throttle of one pipeline. Cheap to share.
pub struct Throttle {
    limits: DenialLimits,
    state: Mutex<State>,
    audit: AuditLog,
    flusher: AtomicBool,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Throttle {
    pub fn new(limits: DenialLimits, audit: AuditLog) -> Arc<Self> {
        Arc::new(Self {
            limits: DenialLimits {
                window: limits.window.max(Duration::from_millis(1)),
                ..limits
            },
            state: Mutex::new(State::default()),
            audit,
            flusher: AtomicBool::new(false),
        })
    }

    pub fn limits(&self) -> DenialLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn window_of(&self, now_ms: i64) -> u64 {
        let ms = self.limits.window.as_millis().max(1) as u64;
        u64::try_from(now_ms).unwrap_or(0) / ms
    }

    fn retry_after(&self, now_ms: i64) -> u64 {
        let ms = self.limits.window.as_millis().max(1) as u64;
        let now = u64::try_from(now_ms).unwrap_or(0);
        let end = (now / ms + 1) * ms;
        (end - now).div_ceil(1000)
    }

    /// Whether a call of this token may run its checks. A refusal is counted (for the
    /// aggregated audit event) and answered without touching anything else.
    pub fn admit(
        self: &Arc<Self>,
        tenant: &str,
        root_jti: &str,
        subject: impl FnOnce() -> (String, String),
        now_ms: i64,
    ) -> Result<(), Throttled> {
        let window = self.window_of(now_ms);
        let mut st = self.lock();
        let st = &mut *st;
        let key = (tenant.to_owned(), root_jti.to_owned());
        let token_over = match st.tokens.get_mut(&key) {
            Some(e) => {
                roll(e, window, tenant, Scope::Token, &mut st.pending);
                e.denials >= self.limits.per_token
            }
            None => false,
        };
        let tenant_over = match st.tenants.get_mut(tenant) {
            Some(e) => {
                roll(e, window, tenant, Scope::Tenant, &mut st.pending);
                e.denials >= self.limits.per_tenant
            }
            None => false,
        };
        let (scope, limit, entry) = if token_over {
            (Scope::Token, self.limits.per_token, st.tokens.get_mut(&key))
        } else if tenant_over {
            (
                Scope::Tenant,
                self.limits.per_tenant,
                st.tenants.get_mut(tenant),
            )
        } else {
            return Ok(());
        };
        if let Some(e) = entry {
            if e.throttled == 0 && scope == Scope::Token {
                let (agent_id, jti) = subject();
                e.subject = Subject {
                    agent_id,
                    jti,
                    root_jti: root_jti.to_owned(),
                };
            }
            e.throttled += 1;
        }
        self.start_flusher();
        Err(Throttled {
            scope,
            limit,
            retry_after_secs: self.retry_after(now_ms),
        })
    }

    /// Counts one denial of this token (and its tenant).
    pub fn note_denial(&self, tenant: &str, root_jti: &str, now_ms: i64) {
        let window = self.window_of(now_ms);
        let mut st = self.lock();
        let st = &mut *st;
        let key = (tenant.to_owned(), root_jti.to_owned());
        if !st.tokens.contains_key(&key) && st.tokens.len() >= self.limits.max_tokens {
            sweep(
                &mut st.tokens,
                |(t, _)| t.as_str(),
                window,
                Scope::Token,
                &mut st.pending,
            );
        }
        if st.tokens.contains_key(&key) || st.tokens.len() < self.limits.max_tokens {
            let e = st.tokens.entry(key).or_insert_with(|| Entry {
                window,
                ..Entry::default()
            });
            roll(e, window, tenant, Scope::Token, &mut st.pending);
            e.denials = e.denials.saturating_add(1);
        }
        if !st.tenants.contains_key(tenant) && st.tenants.len() >= self.limits.max_tenants {
            sweep(
                &mut st.tenants,
                |t| t.as_str(),
                window,
                Scope::Tenant,
                &mut st.pending,
            );
        }
        if st.tenants.contains_key(tenant) || st.tenants.len() < self.limits.max_tenants {
            let e = st
                .tenants
                .entry(tenant.to_owned())
                .or_insert_with(|| Entry {
                    window,
                    ..Entry::default()
                });
            roll(e, window, tenant, Scope::Tenant, &mut st.pending);
            e.denials = e.denials.saturating_add(1);
        }
    }

    /// Takes every count of throttled calls, of ended windows and of the current ones, as
    /// audit events; the counters of current windows keep throttling.
    fn take_summaries(&self) -> Vec<Summary> {
        let mut st = self.lock();
        let st = &mut *st;
        let mut out = std::mem::take(&mut st.pending);
        for ((tenant, _), e) in st.tokens.iter_mut() {
            take_count(e, tenant, Scope::Token, &mut out);
        }
        for (tenant, e) in st.tenants.iter_mut() {
            take_count(e, tenant, Scope::Tenant, &mut out);
        }
        out
    }

    /// Writes the aggregated events of throttled calls to the audit chain now. Returns how
    /// many events were written; what could not be written is kept for the next flush.
    pub async fn flush(&self) -> usize {
        let summaries = self.take_summaries();
        let mut written = 0;
        let mut failed = Vec::new();
        for s in summaries {
            match self.audit.append(self.event(&s)).await {
                Ok(_) => written += 1,
                Err(e) => {
                    tracing::warn!(tenant = %s.tenant, error = %e, "could not audit throttled calls; retrying");
                    failed.push(s);
                }
            }
        }
        if !failed.is_empty() {
            let mut st = self.lock();
            let newer = std::mem::take(&mut st.pending);
            for s in failed.into_iter().chain(newer) {
                push_summary(&mut st.pending, s);
            }
        }
        written
    }

    fn event(&self, s: &Summary) -> AuditEvent {
        let secs = self.limits.window.as_secs().max(1);
        let limit = match s.scope {
            Scope::Token => self.limits.per_token,
            Scope::Tenant => self.limits.per_tenant,
        };
        let window_ms = self.limits.window.as_millis().max(1) as u64;
        let at = |w: u64| {
            crate::audit::time::format_rfc3339_ms(i64::try_from(w * window_ms).unwrap_or(0))
        };
        let mut e = AuditEvent::new(THROTTLED_KIND, s.tenant.clone());
        e.decision = Some(Decision::Block);
        e.check = "throttle".to_owned();
        e.reason = format!(
            "{} calls refused unheard between {} and {}: the {} had {limit} denied calls in a {secs} s window",
            s.count,
            at(s.first_window),
            at(s.last_window + 1),
            s.scope.as_str()
        );
        e.agent_id = s.subject.agent_id.clone();
        e.jti = s.subject.jti.clone();
        e.root_jti = s.subject.root_jti.clone();
        e.count = Some(s.count);
        e
    }

    /// Clears the flusher flag when nothing is left to write. Under the lock: an `admit` that
    /// counts after this sees the flag clear and starts a new flusher.
    fn stop_flusher_if_idle(&self) -> bool {
        let st = self.lock();
        let idle = st.pending.is_empty()
            && st.tokens.values().all(|e| e.throttled == 0)
            && st.tenants.values().all(|e| e.throttled == 0);
        if idle {
            self.flusher.store(false, Ordering::Release);
        }
        idle
    }

    /// Starts the task that writes summaries once their window ends, unless it runs already.
    /// It holds the throttle weakly and ends when nothing is left to write.
    fn start_flusher(self: &Arc<Self>) {
        if self.flusher.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.flusher.store(false, Ordering::Release);
            return;
        };
        let weak: Weak<Self> = Arc::downgrade(self);
        let period = self.limits.window;
        handle.spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(throttle) = weak.upgrade() else {
                    break;
                };
                throttle.flush().await;
                if throttle.stop_flusher_if_idle() {
                    break;
                }
            }
        });
    }
}

/// Moves an entry forward to `window`, keeping the count of the window it leaves. Never back:
/// a denial noted with the time its call started (before its commit, maybe in the window
/// before) counts in the current window instead of resetting it.
fn roll(e: &mut Entry, window: u64, tenant: &str, scope: Scope, pending: &mut Vec<Summary>) {
    if window > e.window {
        take_count(e, tenant, scope, pending);
        e.window = window;
        e.denials = 0;
    }
}

fn take_count(e: &mut Entry, tenant: &str, scope: Scope, out: &mut Vec<Summary>) {
    if e.throttled == 0 {
        return;
    }
    push_summary(
        out,
        Summary {
            tenant: tenant.to_owned(),
            scope,
            subject: e.subject.clone(),
            first_window: e.window,
            last_window: e.window,
            count: e.throttled,
        },
    );
    e.throttled = 0;
}

/// Drops the entries of past windows (their counts go to `pending`).
fn sweep<K>(
    map: &mut HashMap<K, Entry>,
    tenant_of: impl Fn(&K) -> &str,
    window: u64,
    scope: Scope,
    pending: &mut Vec<Summary>,
) {
    map.retain(|k, e| {
        // A later window than the caller's (a denial noted late) is current, not past.
        if e.window >= window {
            return true;
        }
        take_count(e, tenant_of(k), scope, pending);
        false
    });
}

/// Most summaries kept before counts are merged per tenant (the audit store may be down for a
/// while; memory must stay bounded and no count may be lost).
const MAX_PENDING: usize = 8192;

fn push_summary(out: &mut Vec<Summary>, s: Summary) {
    if out.len() >= MAX_PENDING
        && let Some(same) = out.iter_mut().rev().find(|p| p.tenant == s.tenant)
    {
        same.count += s.count;
        same.first_window = same.first_window.min(s.first_window);
        same.last_window = same.last_window.max(s.last_window);
        if same.subject != s.subject {
            // Counts of several tokens merged: no one token to name.
            same.scope = Scope::Tenant;
            same.subject = Subject::default();
        }
        return;
    }
    out.push(s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditConfig, LogKey};
    use crate::store::{self, StoreConfig};

    async fn throttle(limits: DenialLimits) -> (Arc<Throttle>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store::connect(&StoreConfig::Sqlite {
            path: dir.path().join("t.sqlite3"),
        })
        .await
        .expect("store");
        let key = LogKey::from_seed("gw", [7; 32]).expect("key");
        let audit = AuditLog::open(store.db(), key, AuditConfig::default())
            .await
            .expect("audit");
        (Throttle::new(limits, audit), dir)
    }

    fn limits() -> DenialLimits {
        DenialLimits {
            window: Duration::from_secs(60),
            per_token: 2,
            per_tenant: 5,
            max_tokens: 4,
            max_tenants: 2,
        }
    }

    fn who() -> (String, String) {
        ("agent".into(), "jti".into())
    }

    const T0: i64 = 1_700_000_040_000; // inside one 60 s window

    #[tokio::test]
    async fn a_token_is_throttled_after_its_denials_until_the_window_ends() {
        let (t, _dir) = throttle(limits()).await;
        assert!(t.admit("acme", "a", who, T0).is_ok());
        t.note_denial("acme", "a", T0);
        assert!(t.admit("acme", "a", who, T0).is_ok());
        t.note_denial("acme", "a", T0);
        let refused = t.admit("acme", "a", who, T0 + 1000).expect_err("throttled");
        assert_eq!(refused.scope, Scope::Token);
        assert!((1..=60).contains(&refused.retry_after_secs));
        assert!(t.admit("acme", "a", who, T0 + 2000).is_err());
        // Another token of the tenant is not affected; the next window starts afresh.
        assert!(t.admit("acme", "b", who, T0).is_ok());
        assert!(t.admit("acme", "a", who, T0 + 60_000).is_ok());
        // The two refused calls are one summary with their count.
        let s = t.take_summaries();
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!((s[0].count, s[0].scope), (2, Scope::Token));
        assert_eq!(s[0].subject.root_jti, "a");
        assert!(t.take_summaries().is_empty(), "taken once");
    }

    /// A denial noted late, with its call's start in the window before, counts in the
    /// current window instead of resetting it (each late one would reset it again).
    #[tokio::test]
    async fn a_late_denial_of_the_window_before_does_not_reset_the_current_one() {
        let (t, _dir) = throttle(limits()).await;
        let next = T0 + 60_000;
        t.note_denial("acme", "a", next);
        t.note_denial("acme", "a", T0);
        assert!(
            t.admit("acme", "a", who, next + 1000).is_err(),
            "two denials in the current window"
        );
        // With the token table full, a late denial of a new token sweeps past windows only.
        let (t, _dir) = throttle(limits()).await;
        t.note_denial("acme", "a", next);
        t.note_denial("acme", "a", next);
        for token in ["b", "c", "d"] {
            t.note_denial("globex", token, next);
        }
        // (acme's 3 denials stay under its tenant limit of 5.)
        t.note_denial("acme", "e", T0);
        assert!(
            t.admit("acme", "a", who, next + 1000).is_err(),
            "a's denials of the current window kept"
        );
    }

    #[tokio::test]
    async fn a_tenant_is_throttled_after_its_denials_across_tokens() {
        let (t, _dir) = throttle(limits()).await;
        for (i, token) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            assert!(t.admit("acme", token, who, T0).is_ok(), "{i}");
            t.note_denial("acme", token, T0);
        }
        let refused = t
            .admit("acme", "fresh", who, T0)
            .expect_err("tenant throttled");
        assert_eq!(refused.scope, Scope::Tenant);
        assert!(
            t.admit("globex", "x", who, T0).is_ok(),
            "other tenants unaffected"
        );
        let s = t.take_summaries();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].count, s[0].scope), (1, Scope::Tenant));
    }

    #[tokio::test]
    async fn memory_is_bounded_and_counts_are_kept() {
        let (t, _dir) = throttle(limits()).await;
        // Fill the token map in one window, throttle one token.
        for token in ["a", "b", "c", "d"] {
            t.note_denial("acme", token, T0);
            t.note_denial("acme", token, T0);
        }
        assert!(t.admit("acme", "a", who, T0).is_err());
        // A fifth token in the same window finds no room (its tenant still counts it).
        t.note_denial("zeta", "e", T0);
        assert_eq!(t.lock().tokens.len(), 4);
        // In a later window the old entries are swept to make room, the count survives.
        t.note_denial("zeta", "e", T0 + 60_000);
        let st = t.lock();
        assert!(st.tokens.len() <= 4 && st.tenants.len() <= 2);
        assert_eq!(st.pending.iter().map(|s| s.count).sum::<u64>(), 1);
    }

    #[tokio::test]
    async fn flush_writes_one_event_per_summary_with_its_count() {
        let (t, _dir) = throttle(limits()).await;
        let now = crate::audit::time::now_ms();
        t.note_denial("acme", "a", now);
        t.note_denial("acme", "a", now);
        for _ in 0..7 {
            assert!(t.admit("acme", "a", who, now).is_err());
        }
        assert_eq!(t.flush().await, 1);
        assert_eq!(t.flush().await, 0, "nothing left");
        let page = crate::audit::query::list(
            t.audit.db(),
            &crate::audit::AuditFilter {
                tenant: Some("acme".into()),
                ..Default::default()
            },
            None,
            10,
        )
        .await
        .expect("list");
        assert_eq!(page.items.len(), 1);
        let body: serde_json::Value =
            serde_json::from_str(&page.items[0].body).expect("event json");
        assert_eq!(body["event"], THROTTLED_KIND);
        assert_eq!(body["count"], 7);
        assert_eq!(body["capability_token_id"], "jti");
    }
}
