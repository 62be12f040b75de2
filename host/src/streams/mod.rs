//! The server-initiated side of a handshake-era session: its `GET /v1/mcp` event stream and the
//! resource subscriptions whose updates that stream carries.
//!
//! The upstream sees one session (the gateway's, shared by every agent on this replica), so
//! the gateway keeps who subscribed to what itself. The [`Hub`] holds, per client session,
//! its subscriptions (as the agent named the URIs), a bounded window of its recent events for
//! resumption (`Last-Event-ID`), and the sender of its live stream, if one is open. What the
//! upstream announces is routed here ([`Hub::from_upstream`]):
//! - `notifications/resources/updated` reaches only the sessions subscribed to that URI;
//! - `notifications/{tools,prompts,resources}/list_changed` reaches every session whose token
//!   reaches that upstream (each lists again, filtered to its token).
//!
//! A handshake-era session's subscription to a stateless upstream (which has no subscribe pair)
//! is bridged: the gateway holds a `subscriptions/listen` of that URI upstream ([`bridge`]).
//!
//! A stateless client's `subscriptions/listen` stream whose upstream speaks the handshake era
//! takes an entry here too, under a key of its own (`listen:<n>`, never a signed session id),
//! fed and ended by [`crate::proxy`]'s `listen.rs`.
//!
//! Every buffer is bounded: a session's window ([`Limits::window`] events), its live channel
//! ([`Limits::live`]; a client that does not read is disconnected, and may resume from the
//! window), the subscriptions of a session and the number of sessions. A session's entry
//! carries the token that opened it, re-checked by the stream and the sweeper
//! ([`listen::sweep`]): a revoked or expired token, or an ended session, ends the stream and the
//! subscriptions. This module must never deliver an update to a session that did not subscribe
//! to it, never let one slow client grow memory, and never log a token or a session id.

pub mod bridge;
pub mod listen;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::capability::{Grant, Kind};

/// The bounds of the hub.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Events kept per session for a client resuming with `Last-Event-ID`.
    pub window: usize,
    /// Events queued toward a live stream before its client counts as too slow.
    pub live: usize,
    /// Sessions with an entry (a stream, subscriptions or a resumable window) on this replica.
    pub sessions: usize,
    /// Of those, the most one tenant may hold: one tenant's sessions (a subscription keeps
    /// its session's entry) must not shut every other tenant out.
    pub sessions_per_tenant: usize,
    /// Live streams one tenant may hold open at once on this replica: each holds a
    /// connection for as long as its token lives, so one tenant must not take every
    /// connection the listener accepts (`INTENTGATE_MAX_CONNECTIONS`, of which it gets half).
    pub live_per_tenant: usize,
    /// Subscriptions per session.
    pub subscriptions: usize,
    /// Distinct URIs subscribed on this replica: each holds an upstream subscription (or, to a
    /// stateless upstream, a listen stream and its task).
    pub uris: usize,
    /// Of those, the most one tenant's sessions may subscribe to: one tenant must not take
    /// every upstream subscription this replica can hold.
    pub uris_per_tenant: usize,
    /// How long a session without a stream or subscriptions keeps its window.
    pub linger: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            window: 256,
            live: 64,
            sessions: 10_000,
            sessions_per_tenant: 5_000,
            live_per_tenant: 512,
            subscriptions: 256,
            uris: 4_096,
            uris_per_tenant: 2_048,
            linger: Duration::from_secs(300),
        }
    }
}

/// Why the hub refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HubError {
    #[error("too many open sessions with streams or subscriptions on this gateway (limit {0})")]
    TooManySessions(usize),
    #[error(
        "too many open sessions with streams or subscriptions for this tenant on this gateway (limit {0})"
    )]
    TooManySessionsForTenant(usize),
    #[error("too many subscriptions in this session (limit {0})")]
    TooManySubscriptions(usize),
    #[error("too many resources subscribed to on this gateway (limit {0})")]
    TooManyUris(usize),
    #[error("too many resources subscribed to for this tenant on this gateway (limit {0})")]
    TooManyUrisForTenant(usize),
    #[error("too many open streams for this tenant on this gateway (limit {0})")]
    TooManyStreamsForTenant(usize),
}

/// One request a tenant holds open ([`Hub::hold`]); its place is given back on drop.
pub struct HeldSlot {
    hub: std::sync::Arc<Hub>,
    tenant: String,
}

impl Drop for HeldSlot {
    fn drop(&mut self) {
        let mut inner = self.hub.lock();
        if let Some(n) = inner.held.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.held.remove(&self.tenant);
            }
        }
    }
}

/// What the hub knows of one client session.
struct Entry {
    grant: Grant,
    /// The token that opened the session: re-checked so that revoking it ends the session's
    /// stream and subscriptions. Never logged.
    token: String,
    uris: HashSet<String>,
    window: VecDeque<(u64, Bytes)>,
    next_id: u64,
    live: Option<mpsc::Sender<Bytes>>,
    touched: Instant,
}

impl Entry {
    /// Numbers, frames and keeps one event, and hands it to the live stream; a client whose
    /// queue is full is disconnected (its stream ends; it can resume from the window).
    fn push(&mut self, message: &Value, window: usize) {
        self.next_id += 1;
        let id = self.next_id;
        let event = Bytes::from(format!("id: {id}\nevent: message\ndata: {message}\n\n"));
        if window > 0 {
            if self.window.len() >= window {
                self.window.pop_front();
            }
            self.window.push_back((id, event.clone()));
        }
        if let Some(tx) = &self.live
            && tx.try_send(event).is_err()
        {
            self.live = None;
            self.touched = Instant::now();
        }
    }

    fn idle(&self, now: Instant, linger: Duration) -> bool {
        self.uris.is_empty()
            && self.live.as_ref().is_none_or(mpsc::Sender::is_closed)
            && now.duration_since(self.touched) >= linger
    }
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<String, Entry>,
    /// Subscribed URI → the sessions subscribed to it.
    by_uri: HashMap<String, HashSet<String>>,
    /// Tenant → subscribed URI → how many of its sessions subscribe to it.
    tenant_uris: HashMap<String, HashMap<String, usize>>,
    /// Requests held open per tenant (a synchronous approval's wait, [`HeldSlot`]): each
    /// holds a connection as a live stream does, and counts toward the same share.
    held: HashMap<String, usize>,
}

impl Inner {
    /// Removes a session; returns the URIs no session subscribes to any more.
    fn remove(&mut self, session: &str) -> Vec<String> {
        let Some(entry) = self.sessions.remove(session) else {
            return Vec::new();
        };
        let mut orphaned = Vec::new();
        for uri in entry.uris {
            self.untenant(&entry.grant.tenant, &uri);
            if let Some(set) = self.by_uri.get_mut(&uri) {
                set.remove(session);
                if set.is_empty() {
                    self.by_uri.remove(&uri);
                    orphaned.push(uri);
                }
            }
        }
        orphaned
    }

    /// One fewer session of `tenant` subscribes to `uri`.
    fn untenant(&mut self, tenant: &str, uri: &str) {
        if let Some(uris) = self.tenant_uris.get_mut(tenant) {
            if let Some(n) = uris.get_mut(uri) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    uris.remove(uri);
                }
            }
            if uris.is_empty() {
                self.tenant_uris.remove(tenant);
            }
        }
    }
}

/// Every client session's stream and subscriptions on this replica.
pub struct Hub {
    inner: Mutex<Inner>,
    limits: Limits,
    /// Signalled when a session gets an entry (wakes the parked sweeper).
    entered: tokio::sync::Notify,
    /// The listens held for subscriptions to stateless upstreams, by URI ([`bridge`]).
    bridges: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// The listens held for stateless upstreams' list changes, by upstream ([`bridge`]).
    list_bridges: Mutex<HashMap<String, tokio::task::AbortHandle>>,
}

impl Drop for Hub {
    /// The held listens end with the hub (their upstream connections close).
    fn drop(&mut self) {
        for map in [&self.bridges, &self.list_bridges] {
            if let Ok(m) = map.lock() {
                m.values().for_each(tokio::task::AbortHandle::abort);
            }
        }
    }
}

/// A live stream just opened: its events, the ones replayed first.
pub struct Opened {
    pub replay: Vec<Bytes>,
    pub events: mpsc::Receiver<Bytes>,
}

impl Hub {
    pub fn new(limits: Limits) -> Self {
        Hub {
            inner: Mutex::new(Inner::default()),
            limits,
            entered: tokio::sync::Notify::new(),
            bridges: Mutex::new(HashMap::new()),
            list_bridges: Mutex::new(HashMap::new()),
        }
    }

    /// The hub's bounds (a `subscriptions/listen` stream keeps the same ones).
    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves maps that are still consistent enough to
        // route (each operation is a few inserts and removes).
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The session's entry, made when it has none (within the session limit).
    fn entry<'a>(
        &self,
        inner: &'a mut Inner,
        session: &str,
        grant: &Grant,
        token: &str,
    ) -> Result<&'a mut Entry, HubError> {
        if !inner.sessions.contains_key(session) {
            let per_tenant = self.limits.sessions_per_tenant.min(self.limits.sessions);
            let tenants = |inner: &Inner| {
                (inner.sessions.values())
                    .filter(|e| e.grant.tenant == grant.tenant)
                    .count()
            };
            if inner.sessions.len() >= self.limits.sessions || tenants(inner) >= per_tenant {
                let now = Instant::now();
                let linger = self.limits.linger;
                inner.sessions.retain(|_, e| !e.idle(now, linger));
                if inner.sessions.len() >= self.limits.sessions {
                    return Err(HubError::TooManySessions(self.limits.sessions));
                }
                if tenants(inner) >= per_tenant {
                    return Err(HubError::TooManySessionsForTenant(per_tenant));
                }
            }
            self.entered.notify_one();
            inner.sessions.insert(
                session.to_owned(),
                Entry {
                    grant: grant.clone(),
                    token: token.to_owned(),
                    uris: HashSet::new(),
                    window: VecDeque::new(),
                    next_id: 0,
                    live: None,
                    touched: Instant::now(),
                },
            );
        }
        let entry = inner
            .sessions
            .get_mut(session)
            .ok_or(HubError::TooManySessions(self.limits.sessions))?;
        // The session's token may have been replaced by an attenuated child of the same id:
        // the newest presented is the one re-checked, and what the window kept under the
        // previous token is not replayed to it (updates are pushed only for URIs the current
        // token may read, see `resource_updated`).
        if entry.token != token {
            entry.token = token.to_owned();
            entry.grant = grant.clone();
            entry.window.clear();
        }
        Ok(entry)
    }

    /// Opens the session's live stream (a stream already open for it ends), with the events
    /// after `last_event_id` still in its window.
    pub fn open(
        &self,
        session: &str,
        grant: &Grant,
        token: &str,
        last_event_id: Option<u64>,
    ) -> Result<Opened, HubError> {
        let mut inner = self.lock();
        let live = self.limits.live;
        let streaming = (inner.sessions.iter())
            .filter(|(s, e)| {
                e.grant.tenant == grant.tenant
                    && s.as_str() != session
                    && e.live.as_ref().is_some_and(|tx| !tx.is_closed())
            })
            .count();
        let held = inner.held.get(&grant.tenant).copied().unwrap_or(0);
        if streaming + held >= self.limits.live_per_tenant {
            return Err(HubError::TooManyStreamsForTenant(
                self.limits.live_per_tenant,
            ));
        }
        let entry = self.entry(&mut inner, session, grant, token)?;
        let replay = match last_event_id {
            Some(last) => (entry.window.iter())
                .filter(|(id, _)| *id > last)
                .map(|(_, e)| e.clone())
                .collect(),
            None => Vec::new(),
        };
        let (tx, events) = mpsc::channel(live);
        entry.live = Some(tx);
        entry.touched = Instant::now();
        Ok(Opened { replay, events })
    }

    /// Connections `tenant` holds open for long now: its live streams and its held requests.
    fn held_by(inner: &Inner, tenant: &str) -> usize {
        let streaming = (inner.sessions.values())
            .filter(|e| {
                e.grant.tenant == tenant && e.live.as_ref().is_some_and(|tx| !tx.is_closed())
            })
            .count();
        streaming + inner.held.get(tenant).copied().unwrap_or(0)
    }

    /// Whether `tenant` may hold one more request open (see [`Hub::hold`]).
    pub fn can_hold(&self, tenant: &str) -> bool {
        Self::held_by(&self.lock(), tenant) < self.limits.live_per_tenant
    }

    /// Takes one of `tenant`'s long-held connections for a request held open (a synchronous
    /// approval's wait), until the slot is dropped; `None` when the tenant already holds its
    /// share, live streams and held requests together.
    pub fn hold(self: &std::sync::Arc<Self>, tenant: &str) -> Option<HeldSlot> {
        let mut inner = self.lock();
        if Self::held_by(&inner, tenant) >= self.limits.live_per_tenant {
            return None;
        }
        *inner.held.entry(tenant.to_owned()).or_default() += 1;
        Some(HeldSlot {
            hub: std::sync::Arc::clone(self),
            tenant: tenant.to_owned(),
        })
    }

    /// Records a subscription; `true` when it is the first on this replica for that URI.
    pub fn subscribe(
        &self,
        session: &str,
        grant: &Grant,
        token: &str,
        uri: &str,
    ) -> Result<bool, HubError> {
        let mut inner = self.lock();
        let max = self.limits.subscriptions;
        let (uris, per_tenant) = (self.limits.uris, self.limits.uris_per_tenant);
        let tenant_has = |inner: &Inner| {
            inner
                .tenant_uris
                .get(&grant.tenant)
                .map_or((false, 0), |u| (u.contains_key(uri), u.len()))
        };
        let (tenant_holds, tenant_count) = tenant_has(&inner);
        let entry = self.entry(&mut inner, session, grant, token)?;
        if entry.uris.contains(uri) {
            entry.touched = Instant::now();
            return Ok(inner.by_uri.get(uri).map_or(0, HashSet::len) == 1);
        }
        if entry.uris.len() >= max {
            return Err(HubError::TooManySubscriptions(max));
        }
        if !tenant_holds && tenant_count >= per_tenant {
            return Err(HubError::TooManyUrisForTenant(per_tenant));
        }
        if !inner.by_uri.contains_key(uri) && inner.by_uri.len() >= uris {
            return Err(HubError::TooManyUris(uris));
        }
        let Some(entry) = inner.sessions.get_mut(session) else {
            return Ok(false);
        };
        entry.uris.insert(uri.to_owned());
        entry.touched = Instant::now();
        *inner
            .tenant_uris
            .entry(grant.tenant.clone())
            .or_default()
            .entry(uri.to_owned())
            .or_default() += 1;
        let set = inner.by_uri.entry(uri.to_owned()).or_default();
        set.insert(session.to_owned());
        Ok(set.len() == 1)
    }

    /// Drops a subscription; `true` only when this session held it and no session on this
    /// replica subscribes to the URI any more (so the upstream may stop sending its updates).
    /// A session that never subscribed undoes nothing: the upstream's subscription serves the
    /// sessions that did.
    pub fn unsubscribe(&self, session: &str, uri: &str) -> bool {
        let mut inner = self.lock();
        let held = match inner.sessions.get_mut(session) {
            Some(entry) => {
                entry.touched = Instant::now();
                let held = entry.uris.remove(uri);
                let tenant = entry.grant.tenant.clone();
                if held {
                    inner.untenant(&tenant, uri);
                }
                held
            }
            None => false,
        };
        let Some(set) = inner.by_uri.get_mut(uri) else {
            return false;
        };
        set.remove(session);
        let last = set.is_empty();
        if last {
            inner.by_uri.remove(uri);
        }
        held && last
    }

    /// Ends a session's stream and subscriptions; returns the URIs no session subscribes to
    /// any more.
    pub fn end(&self, session: &str) -> Vec<String> {
        self.lock().remove(session)
    }

    /// Routes a notification the upstream `upstream` sent outside any call; `expose` gives a
    /// URI as agents know it.
    pub fn from_upstream(
        &self,
        upstream: &str,
        mut message: Value,
        expose: impl Fn(&str) -> String,
    ) {
        let method = message.get("method").and_then(Value::as_str).unwrap_or("");
        match method {
            "notifications/resources/updated" => {
                let Some(uri) = message.pointer("/params/uri").and_then(Value::as_str) else {
                    return;
                };
                let exposed = expose(uri);
                message["params"]["uri"] = Value::from(exposed.as_str());
                self.resource_updated(&exposed, &message);
            }
            "notifications/resources/list_changed"
            | "notifications/tools/list_changed"
            | "notifications/prompts/list_changed" => self.list_changed(upstream, &message),
            other => tracing::debug!(
                method = other,
                upstream,
                "upstream notification outside a call not relayed"
            ),
        }
    }

    /// Sends an update to the sessions subscribed to `uri`.
    pub fn resource_updated(&self, uri: &str, message: &Value) {
        let mut inner = self.lock();
        let window = self.limits.window;
        let Some(subscribers) = inner.by_uri.get(uri).cloned() else {
            return;
        };
        for s in subscribers {
            if let Some(entry) = inner.sessions.get_mut(&s)
                && entry.grant.allows(Kind::Resource, uri)
            {
                entry.push(message, window);
            }
        }
    }

    /// Sends a list change to every session whose token reaches `upstream`.
    pub fn list_changed(&self, upstream: &str, message: &Value) {
        let mut inner = self.lock();
        let window = self.limits.window;
        for entry in inner.sessions.values_mut() {
            if entry.grant.reaches(upstream) {
                entry.push(message, window);
            }
        }
    }

    /// Each session with the token it was opened with, to be re-checked by the sweeper.
    fn tokens(&self) -> Vec<(String, String, String)> {
        let inner = self.lock();
        (inner.sessions.iter())
            .map(|(s, e)| (s.clone(), e.token.clone(), e.grant.jti.clone()))
            .collect()
    }

    /// Forgets idle sessions (no stream, no subscription, window older than the linger).
    fn forget_idle(&self) {
        let now = Instant::now();
        let linger = self.limits.linger;
        self.lock().sessions.retain(|_, e| !e.idle(now, linger));
    }

    /// Resolves once a session has an entry (at once if one got one since the last wait).
    pub async fn first_entry(&self) {
        if self.counts().0 == 0 {
            self.entered.notified().await;
        }
    }

    /// How many sessions have an entry, and how many subscriptions in all (for tests and
    /// `/healthz`-style introspection).
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        let subs = inner.sessions.values().map(|e| e.uris.len()).sum();
        (inner.sessions.len(), subs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capability::{
        DEFAULT_LEEWAY_SECS, MasterKey, MintRequest, RevocationSet, Verifier, mint,
    };
    use serde_json::json;

    fn grant_of(req: MintRequest) -> Grant {
        let key = MasterKey::from_bytes(b"0123456789abcdef0123456789abcdef")
            .unwrap_or_else(|e| panic!("{e}"));
        let now = 1_700_000_000;
        let minted = mint(&key, &req, now).unwrap_or_else(|e| panic!("{e}"));
        Verifier::new(key, DEFAULT_LEEWAY_SECS)
            .authenticate(&minted.token, now, &RevocationSet::always_fresh())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn grant() -> Grant {
        grant_of(MintRequest {
            subject: "agent".into(),
            ..MintRequest::default()
        })
    }

    fn grant_for(resources: &[&str]) -> Grant {
        grant_of(MintRequest {
            subject: "agent".into(),
            resources: resources.iter().map(|r| r.to_string()).collect(),
            ..MintRequest::default()
        })
    }

    fn grant_in(tenant: &str) -> Grant {
        grant_of(MintRequest {
            subject: "agent".into(),
            tenant: Some(tenant.into()),
            ..MintRequest::default()
        })
    }

    /// One tenant's live streams take at most their share; a session reopening its stream is
    /// not another one, and a stream that ended frees its place.
    #[test]
    fn a_tenant_holds_at_most_its_share_of_live_streams() {
        let hub = Hub::new(Limits {
            live_per_tenant: 2,
            ..Limits::default()
        });
        let g = grant();
        let a = hub.open("a", &g, "t", None).expect("first");
        let _b = hub.open("b", &g, "t", None).expect("second");
        assert_eq!(
            hub.open("c", &g, "t", None).err(),
            Some(HubError::TooManyStreamsForTenant(2))
        );
        // The same session reopening is not another stream.
        let a = {
            drop(a);
            hub.open("a", &g, "t", None).expect("reopened")
        };
        drop(a);
        hub.open("c", &g, "t", None)
            .expect("a closed stream frees its place");
    }

    /// Requests held open (synchronous approvals) and live streams share a tenant's place:
    /// neither can take every connection, and a released slot frees its place.
    #[test]
    fn held_requests_and_streams_share_a_tenants_place() {
        let hub = std::sync::Arc::new(Hub::new(Limits {
            live_per_tenant: 2,
            ..Limits::default()
        }));
        let g = grant();
        let slot = hub.hold(&g.tenant).expect("first held request");
        let stream = hub.open("a", &g, "t", None).expect("a stream beside it");
        assert!(!hub.can_hold(&g.tenant));
        assert!(hub.hold(&g.tenant).is_none(), "the share is taken");
        assert_eq!(
            hub.open("b", &g, "t", None).err(),
            Some(HubError::TooManyStreamsForTenant(2))
        );
        assert!(
            hub.can_hold("another-tenant"),
            "other tenants are not held back"
        );
        drop(slot);
        let _b = hub
            .open("b", &g, "t", None)
            .expect("a released slot frees its place");
        drop(stream);
        assert!(
            hub.hold(&g.tenant).is_some(),
            "a closed stream frees its place"
        );
    }

    /// A session presented with a narrower token (an attenuated child of the same id) gets
    /// neither what the window kept under the previous token nor updates of URIs it may not
    /// read.
    #[test]
    fn a_narrower_token_on_the_session_gets_only_its_own_uris() {
        let hub = Hub::new(Limits::default());
        let wide = grant();
        let narrow = grant_for(&["note://a"]);
        hub.subscribe("s", &wide, "wide", "note://secret")
            .expect("hub");
        hub.subscribe("s", &wide, "wide", "note://a").expect("hub");
        hub.resource_updated("note://secret", &updated("note://secret"));
        let opened = hub.open("s", &narrow, "narrow", Some(0)).expect("hub");
        assert!(opened.replay.is_empty(), "the wide token's window");
        let mut rx = opened.events;
        hub.resource_updated("note://secret", &updated("note://secret"));
        hub.resource_updated("note://a", &updated("note://a"));
        let got = drain(&mut rx);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains("note://a"), "{}", got[0]);
    }

    fn updated(uri: &str) -> Value {
        json!({"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": uri}})
    }

    fn drain(rx: &mut mpsc::Receiver<Bytes>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(b) = rx.try_recv() {
            out.push(String::from_utf8_lossy(&b).into_owned());
        }
        out
    }

    #[test]
    fn updates_reach_only_subscribers_with_the_exposed_uri() {
        let hub = Hub::new(Limits::default());
        let g = grant();
        let mut a = hub.open("a", &g, "t", None).expect("hub").events;
        let mut b = hub.open("b", &g, "t", None).expect("hub").events;
        assert!(hub.subscribe("a", &g, "t", "db+file:///x").expect("hub"));
        let expose = |u: &str| format!("db+{u}");
        hub.from_upstream("db", updated("file:///x"), expose);
        hub.from_upstream("db", updated("file:///y"), expose);
        let got = drain(&mut a);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].starts_with("id: 1\n"), "{}", got[0]);
        assert!(got[0].contains(r#""uri":"db+file:///x""#), "{}", got[0]);
        assert!(drain(&mut b).is_empty());
    }

    /// Each distinct subscribed URI holds an upstream subscription or listen: one tenant takes
    /// at most its share of them, the replica at most its limit, and unsubscribing or ending
    /// a session gives places back.
    #[test]
    fn subscribed_uris_are_bounded_per_tenant_and_per_replica() {
        let hub = Hub::new(Limits {
            uris: 3,
            uris_per_tenant: 2,
            ..Limits::default()
        });
        let (a, b) = (grant_in("acme"), grant_in("globex"));
        assert!(hub.subscribe("s1", &a, "t", "u1").expect("first"));
        assert!(hub.subscribe("s2", &a, "t", "u2").expect("second"));
        assert_eq!(
            hub.subscribe("s1", &a, "t", "u3").err(),
            Some(HubError::TooManyUrisForTenant(2))
        );
        // A URI the tenant subscribes to already is no new one, in any of its sessions.
        assert!(!hub.subscribe("s3", &a, "t", "u1").expect("shared"));
        assert!(hub.subscribe("s4", &b, "t", "u3").expect("another tenant"));
        assert_eq!(
            hub.subscribe("s4", &b, "t", "u4").err(),
            Some(HubError::TooManyUris(3))
        );
        assert!(
            !hub.subscribe("s4", &b, "t", "u1")
                .expect("a URI held already")
        );
        assert_eq!(
            hub.subscribe("s5", &b, "t", "u2").err(),
            Some(HubError::TooManyUrisForTenant(2))
        );
        hub.unsubscribe("s2", "u2");
        assert!(hub.subscribe("s1", &a, "t", "u5").expect("u2's place"));
        let _ = hub.end("s1");
        let _ = hub.end("s3");
        // acme holds nothing now (globex still holds u1 and u3).
        assert!(
            hub.subscribe("s6", &a, "t", "u6")
                .expect("acme's places are back")
        );
        assert!(!hub.subscribe("s6", &a, "t", "u1").expect("held by globex"));
    }

    #[test]
    fn last_unsubscribe_and_end_report_orphans() {
        let hub = Hub::new(Limits::default());
        let g = grant();
        assert!(hub.subscribe("a", &g, "t", "u1").expect("hub"));
        assert!(!hub.subscribe("b", &g, "t", "u1").expect("hub"));
        assert!(hub.subscribe("b", &g, "t", "u2").expect("hub"));
        assert!(!hub.unsubscribe("a", "u1"), "b still subscribes");
        let mut orphans = hub.end("b");
        orphans.sort();
        assert_eq!(orphans, ["u1", "u2"]);
        assert_eq!(hub.counts(), (1, 0));
    }

    #[test]
    fn a_slow_client_is_cut_off_and_resumes_from_the_window() {
        let limits = Limits {
            window: 4,
            live: 2,
            ..Limits::default()
        };
        let hub = Hub::new(limits);
        let g = grant();
        let mut rx = hub.open("a", &g, "t", None).expect("hub").events;
        hub.subscribe("a", &g, "t", "u").expect("hub");
        for _ in 0..6 {
            hub.resource_updated("u", &updated("u"));
        }
        // Two queued, then the stream was dropped: the channel ends after them.
        assert_eq!(drain(&mut rx).len(), 2);
        assert!(rx.try_recv().is_err() && rx.is_closed());
        // The window kept the last four (3..=6); resuming after 4 replays 5 and 6.
        let resumed = hub.open("a", &g, "t", Some(4)).expect("hub");
        let ids: Vec<&str> = resumed
            .replay
            .iter()
            .map(|b| {
                std::str::from_utf8(b)
                    .expect("utf-8")
                    .lines()
                    .next()
                    .expect("a line")
            })
            .map(|l| l.trim_start_matches("id: "))
            .collect();
        assert_eq!(ids, ["5", "6"]);
    }

    #[test]
    fn limits_are_enforced() {
        let limits = Limits {
            sessions: 1,
            subscriptions: 1,
            ..Limits::default()
        };
        let hub = Hub::new(limits);
        let g = grant();
        hub.subscribe("a", &g, "t", "u").expect("hub");
        assert_eq!(
            hub.subscribe("a", &g, "t", "v"),
            Err(HubError::TooManySubscriptions(1))
        );
        assert_eq!(
            hub.open("b", &g, "t", None).err(),
            Some(HubError::TooManySessions(1))
        );
    }

    /// One tenant's sessions stop at its share; another tenant still gets in.
    #[test]
    fn one_tenant_cannot_take_every_session() {
        let limits = Limits {
            sessions: 4,
            sessions_per_tenant: 2,
            ..Limits::default()
        };
        let hub = Hub::new(limits);
        let a = grant();
        hub.subscribe("a1", &a, "t", "u").expect("first");
        hub.subscribe("a2", &a, "t", "u").expect("second");
        assert_eq!(
            hub.subscribe("a3", &a, "t", "u"),
            Err(HubError::TooManySessionsForTenant(2))
        );
        let mut other = grant();
        other.tenant = format!("{}-other", other.tenant);
        hub.subscribe("b1", &other, "t2", "u")
            .expect("another tenant is not shut out");
    }

    #[test]
    fn list_changes_reach_every_session_whose_token_reaches_the_upstream() {
        let hub = Hub::new(Limits::default());
        let g = grant();
        let mut a = hub.open("a", &g, "t", None).expect("hub").events;
        let msg = json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"});
        hub.from_upstream("db", msg, str::to_owned);
        assert_eq!(drain(&mut a).len(), 1);
    }
}
