//! The delivery worker: finds lanes with due rows, claims each (one worker per lane across
//! replicas), formats its next batch, sends it, and records the outcome: delivered rows are
//! deleted; a failure sets the lane's back-off (exponential with jitter, never earlier than
//! the destination's `Retry-After`); a failing batch older than the dead-letter age is set
//! aside so the lane moves on.
//!
//! It wakes when a commit wrote outbox rows (the router's bell), when a back-off may have
//! passed (a poll), and keeps at most [`OutboxConfig::concurrency`] lanes in flight. Memory is
//! bounded by the batch size times that concurrency, whatever the backlog. This module must
//! never delete a row before its destination answered 2xx, and never hold a lane while another
//! worker delivers it.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER, USER_AGENT};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::address::Resolver;
use super::destination::{Destination, Source, Target};
use super::format::Oversize;
use super::store::{self, Lane, Outcome, Pending};
use super::{Kind, Live, Outbox, format, s3, sentinel, sign};
use crate::audit::time::now_ms;

type HttpClient = Client<HttpsConnector<HttpConnector<Resolver>>, Full<Bytes>>;

/// Batches one lane task delivers before it gives its slot to other lanes.
const BATCHES_PER_TURN: usize = 32;
/// How often the stored destinations are checked for changes made by another replica.
const RELOAD_EVERY: Duration = Duration::from_secs(5);
/// How often the backlog is counted (for the alarm and `/metrics`).
const COUNT_EVERY: Duration = Duration::from_secs(2);
/// The poll while nothing is pending (no row waits, none in flight): new rows of this process
/// ring the worker at once, so the poll only finds another replica's orphaned lanes.
const IDLE_POLL: Duration = RELOAD_EVERY;
/// Attempts in a row after which one event whose payload the destination refuses (400, 422)
/// is set aside as a dead letter, the lane's back-off between them.
const REFUSED_ATTEMPTS: i64 = 3;

/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A failed delivery: what to record, the destination's `Retry-After`, if any, and whether the
/// batch's size is the cause.
#[derive(Debug)]
pub struct Failure {
    pub error: String,
    pub retry_after: Option<Duration>,
    pub oversize: Oversize,
}

impl Failure {
    fn new(error: impl Into<String>) -> Self {
        Failure {
            error: error.into(),
            retry_after: None,
            oversize: Oversize::No,
        }
    }
}

impl From<format::FormatError> for Failure {
    fn from(e: format::FormatError) -> Self {
        Failure {
            error: e.message,
            retry_after: None,
            oversize: e.oversize,
        }
    }
}

/// The clients deliveries use: pooled, http or https (system roots); `public` connects only to
/// public addresses (`address.rs`), `open` to any.
#[derive(Clone)]
struct Clients {
    public: HttpClient,
    open: HttpClient,
    allow_private: bool,
}

impl Clients {
    fn new(cfg: &super::OutboxConfig) -> Self {
        Clients {
            public: client(cfg.timeout, Resolver { public_only: true }),
            open: client(cfg.timeout, Resolver { public_only: false }),
            allow_private: cfg.allow_private_networks,
        }
    }

    /// The client for `dest`, or why it may not be reached: a destination from the admin API
    /// reaches only public addresses unless the operator allowed private networks.
    fn for_destination(&self, dest: &Destination) -> Result<&HttpClient, Failure> {
        if self.allow_private || dest.source == Source::Env {
            return Ok(&self.open);
        }
        match super::address::refused_destination(dest) {
            Some(why) => Err(Failure::new(why)),
            None => Ok(&self.public),
        }
    }
}

/// A pooled client over `resolver`.
fn client(timeout: Duration, resolver: Resolver) -> HttpClient {
    let tls = crate::tls::client_config(&crate::config::UpstreamTls::default())
        .or_else(|_| crate::tls::plaintext_only());
    let tls = match tls {
        Ok(t) => Arc::unwrap_or_clone(t),
        Err(e) => {
            tracing::error!(error = %e, "outbox: no TLS client configuration; https destinations will fail");
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map(|b| {
                b.with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            })
            .unwrap_or_else(|_| unreachable_tls())
        }
    };
    let mut connector = HttpConnector::new_with_resolver(resolver);
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(timeout));
    connector.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

#[cold]
fn unreachable_tls() -> rustls::ClientConfig {
    panic!("rustls refused its default protocol versions")
}

/// The worker loop.
pub async fn run(outbox: Outbox) {
    let http = Clients::new(&outbox.inner.cfg);
    let inflight: Arc<Mutex<HashSet<Lane>>> = Arc::default();
    let paused: Arc<Mutex<Paused>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let mut reloaded = Instant::now();
    let mut counted: Option<Instant> = None;
    let cfg = outbox.inner.cfg.clone();
    // Nothing was pending at the last look: the poll slows down (an idle gateway reads its
    // store a few times a minute, not every `poll`).
    let mut idle = false;
    loop {
        let nap = if idle {
            cfg.poll.max(IDLE_POLL)
        } else {
            cfg.poll
        };
        tokio::select! {
            () = outbox.inner.router.rung() => {
                // Let the ringing commit (and its neighbours) land before looking.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            () = tokio::time::sleep(nap) => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
        while tasks.try_join_next().is_some() {}
        if reloaded.elapsed() >= RELOAD_EVERY {
            reloaded = Instant::now();
            if let Err(e) = outbox.reload(false).await {
                tracing::warn!(error = %e, "outbox: reloading destinations failed");
            }
        }
        if counted.is_none_or(|t| t.elapsed() >= COUNT_EVERY) {
            counted = Some(Instant::now());
            count(&outbox).await;
        }
        idle = false;
        let room = cfg.concurrency.saturating_sub(tasks.len());
        if room == 0 {
            continue;
        }
        let lanes = match store::due_lanes(&outbox.inner.db, now_ms(), 256).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "outbox: looking for due lanes failed");
                continue;
            }
        };
        // Idle only when no row waits at all (a lane in its backoff still counts): a retry is
        // never left to the slow poll.
        if lanes.is_empty() && tasks.is_empty() {
            idle = matches!(store::backlog(&outbox.inner.db).await, Ok(0));
        }
        let mut started = 0;
        for lane in lanes {
            if started == room {
                break;
            }
            if lock(&paused).holds(&lane, Instant::now()) {
                continue;
            }
            let fresh = lock(&inflight).insert(lane.clone());
            if !fresh {
                continue;
            }
            started += 1;
            let (outbox, http, inflight, paused) = (
                outbox.clone(),
                http.clone(),
                inflight.clone(),
                paused.clone(),
            );
            tasks.spawn(async move {
                // Out of the in-flight set however the task ends (a panic too), or the lane
                // would never be delivered again until a restart.
                let _held = Held {
                    set: &inflight,
                    lane: &lane,
                };
                // A lane whose bookkeeping failed waits before it is taken again: its batch
                // may have been sent and not recorded, and must not go out again every few
                // milliseconds while the store refuses.
                match deliver_lane(&outbox, &http, &lane).await {
                    Ok(()) => lock(&paused).clear(&lane),
                    Err(e) => {
                        let wait = lock(&paused).strike(&lane, Instant::now());
                        tracing::warn!(destination = %lane.0, tenant = %lane.1, error = %e, retry_in_ms = wait.as_millis() as u64, "outbox: delivery bookkeeping failed; the lane is retried");
                    }
                }
                drop(_held);
                // Another lane may be waiting for this slot.
                outbox.inner.router.ring();
            });
        }
    }
}

/// Lanes whose last turn failed in the gateway's own bookkeeping (the store refused a claim or
/// a record, or durability could not be confirmed), each with when it may be taken again:
/// 1 s after a first failure, doubling to [`MAX_PAUSE`]. Bounded by the lanes there are.
#[derive(Default)]
struct Paused(std::collections::HashMap<Lane, (Instant, u32)>);

/// The longest pause of a lane whose bookkeeping keeps failing.
const MAX_PAUSE: Duration = Duration::from_secs(60);

impl Paused {
    fn holds(&self, lane: &Lane, now: Instant) -> bool {
        self.0.get(lane).is_some_and(|(until, _)| *until > now)
    }

    /// Records a failure; returns how long the lane waits.
    fn strike(&mut self, lane: &Lane, now: Instant) -> Duration {
        let strikes = self.0.get(lane).map_or(0, |(_, n)| *n);
        let wait = Duration::from_secs(1)
            .saturating_mul(1 << strikes.min(6))
            .min(MAX_PAUSE);
        self.0
            .insert(lane.clone(), (now + wait, strikes.saturating_add(1)));
        wait
    }

    fn clear(&mut self, lane: &Lane) {
        self.0.remove(lane);
    }
}

/// A lane in the in-flight set, taken out when dropped.
struct Held<'a> {
    set: &'a Mutex<HashSet<Lane>>,
    lane: &'a Lane,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(self.lane);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads the backlog and dead letters, and sets the alarm.
async fn count(outbox: &Outbox) {
    let db = &outbox.inner.db;
    let stats = &outbox.inner.stats;
    if let (Ok(backlog), Ok(dead)) = (store::backlog(db).await, store::dead_letters(db).await) {
        stats.backlog.store(backlog, Ordering::Relaxed);
        stats.dead_letters.store(dead, Ordering::Relaxed);
        let over = backlog as u64 > outbox.inner.cfg.backlog_alarm;
        let was = stats.alarm.swap(over, Ordering::Relaxed);
        if over && !was {
            tracing::error!(
                backlog,
                threshold = outbox.inner.cfg.backlog_alarm,
                "outbox: backlog over its alarm threshold (INTENTGATE_OUTBOX_BACKLOG_ALARM); events are kept and delivered when destinations recover"
            );
        }
    }
}

/// Delivers batches of one lane until it is empty, fails, or has had its turn.
async fn deliver_lane(
    outbox: &Outbox,
    http: &Clients,
    lane: &Lane,
) -> Result<(), super::OutboxError> {
    let cfg = &outbox.inner.cfg;
    // A batch refused for its size is sent again at once as its first half, down to one
    // event; an event too large on its own is set aside as a dead letter, so it never holds
    // its lane (and the events behind it) until the dead-letter age.
    let mut shrunk: Option<i64> = None;
    for _ in 0..BATCHES_PER_TURN {
        let live = outbox.live();
        let dest = live.by_id.get(lane.0.as_str()).cloned();
        let limit = dest.as_ref().map_or(1, |d| d.dest.batch_limit(cfg.batch)) as i64;
        let limit = shrunk.map_or(limit, |n| n.min(limit));
        let lease = store::Lease {
            owner: &outbox.inner.replica,
            ms: lease_ms(cfg.timeout),
        };
        let Some((claim, failures, rows)) =
            store::claim(&outbox.inner.db, lane, now_ms(), limit, lease).await?
        else {
            return Ok(());
        };
        // A row a power cut could still take back is not sent: the commit that wrote it may
        // not be durable yet (SQLite syncs its log beside the writer).
        if let Err(e) = outbox.inner.router.durable().covering().await {
            store::release(claim, lane).await?;
            return Err(super::OutboxError::NotDurable(e.to_string()));
        }
        let bound = delivery_bound(cfg.timeout);
        let sent = match &dest {
            None => Err(Failure::new(format!(
                "destination {} is not configured",
                lane.0
            ))),
            Some(d) => match http.for_destination(&d.dest) {
                Ok(client) => {
                    tokio::time::timeout(bound, send(client, d, &lane.1, &rows, cfg.timeout))
                        .await
                        .unwrap_or_else(|_| {
                            Err(Failure::new(format!(
                                "the delivery took longer than {} s",
                                bound.as_secs()
                            )))
                        })
                }
                Err(refused) => Err(refused),
            },
        };
        let now = now_ms();
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let outcome = match sent {
            Ok(()) => Outcome::Delivered,
            Err(f) if f.oversize != Oversize::No && rows.len() > 1 => {
                tracing::info!(destination = %lane.0, tenant = %lane.1, events = rows.len(), error = %f.error, "outbox: batch too large for its destination; sending its first half");
                shrunk = Some(rows.len() as i64 / 2);
                // Nothing recorded: the claim is given back and the lane taken again.
                store::release(claim, lane).await?;
                continue;
            }
            Err(f) if f.oversize == Oversize::Refused && failures >= REFUSED_ATTEMPTS - 1 => {
                shrunk = None;
                Outcome::Dead {
                    error: format!(
                        "{} (this event was refused {REFUSED_ATTEMPTS} times in a row)",
                        f.error
                    ),
                    aged_before: None,
                    retry_at_ms: None,
                }
            }
            Err(f) if f.oversize == Oversize::Yes => {
                shrunk = None;
                Outcome::Dead {
                    error: format!(
                        "{} (this event alone is too large for the destination)",
                        f.error
                    ),
                    aged_before: None,
                    retry_at_ms: None,
                }
            }
            Err(f) => {
                // Every row of the lane past the dead-letter age is set aside at once (not one
                // failed request each); the rest wait for their own (a re-driven row's age
                // starts again at its re-drive). Either way the lane waits out its back-off
                // and the destination's `Retry-After`: the destination is failing.
                let dead_before = now.saturating_sub(cfg.dead_after.as_millis() as i64);
                let wait = backoff(cfg.retry_base, cfg.retry_max, failures, f.retry_after);
                let retry_at_ms = now + wait.as_millis() as i64;
                if rows.iter().any(|r| r.created_ms <= dead_before) {
                    Outcome::Dead {
                        error: f.error,
                        aged_before: Some(dead_before),
                        retry_at_ms: Some(retry_at_ms),
                    }
                } else {
                    Outcome::Retry {
                        error: f.error,
                        retry_at_ms,
                    }
                }
            }
        };
        let counted = store::finish(claim, lane, &ids, &outcome, now).await?;
        let stats = &outbox.inner.stats;
        match &outcome {
            Outcome::Delivered => {
                stats.delivered.fetch_add(counted, Ordering::Relaxed);
            }
            Outcome::Retry { error, .. } => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(destination = %lane.0, tenant = %lane.1, error = %error, "outbox: delivery failed; retrying after back-off");
                return Ok(());
            }
            Outcome::Dead {
                error, retry_at_ms, ..
            } => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                stats.dead_lettered.fetch_add(counted, Ordering::Relaxed);
                tracing::error!(destination = %lane.0, tenant = %lane.1, events = counted, error = %error, "outbox: undeliverable past the dead-letter age, or too large; kept as dead letters");
                if retry_at_ms.is_some() {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// The longest one batch's delivery may take: a few exchanges (an S3 batch spans hours, a
/// Sentinel one several calls and a token), each bounded by `timeout`.
fn delivery_bound(timeout: Duration) -> Duration {
    timeout.saturating_mul(4).max(Duration::from_secs(1))
}

/// How long a claim holds its lane (PostgreSQL): past the delivery's bound, so a lease runs
/// out only when its replica is gone or stalled.
fn lease_ms(timeout: Duration) -> i64 {
    (delivery_bound(timeout) + Duration::from_secs(60)).as_millis() as i64
}

/// The wait before the next attempt after `failures` earlier consecutive failures:
/// `base·2^failures` capped at `max`, with jitter (uniform in its upper half), and never less
/// than the destination's `Retry-After`.
pub fn backoff(
    base: Duration,
    max: Duration,
    failures: i64,
    retry_after: Option<Duration>,
) -> Duration {
    let exp = base.saturating_mul(1u32 << failures.clamp(0, 20) as u32);
    let capped = exp.min(max);
    let mut r = [0u8; 8];
    let jitter = match getrandom::fill(&mut r) {
        Ok(()) => u64::from_le_bytes(r) as f64 / u64::MAX as f64,
        Err(_) => 0.5,
    };
    let jittered = capped.mul_f64(0.5 + 0.5 * jitter);
    match retry_after {
        Some(ra) => jittered.max(ra.min(MAX_RETRY_AFTER)),
        None => jittered,
    }
}

/// The idempotency key of a delivery: stable across retries (the events' audit ids).
pub fn delivery_id(rows: &[Pending]) -> String {
    match (rows.first(), rows.last()) {
        (Some(a), Some(b)) if a.event_id != b.event_id => {
            format!("msg_{}_{}", a.event_id, b.event_id)
        }
        (Some(a), _) => format!("msg_{}", a.event_id),
        _ => "msg_".to_owned(),
    }
}

/// Formats and sends one batch; `Ok` only when every request it takes got a 2xx answer.
async fn send(
    http: &HttpClient,
    live: &Live,
    tenant: &str,
    rows: &[Pending],
    timeout: Duration,
) -> Result<(), Failure> {
    let formatter = live
        .formatter
        .as_ref()
        .map_err(|e| Failure::new(e.clone()))?;
    match &live.dest.target {
        Target::S3(t) => send_s3(http, live, formatter, t, tenant, rows, timeout).await,
        Target::Sentinel(t) => send_sentinel(http, live, formatter, t, rows, timeout).await,
        Target::Http => send_http(http, live, formatter, rows, timeout).await,
    }
}

fn user_agent() -> HeaderValue {
    HeaderValue::from_static(concat!("intentgate/", env!("CARGO_PKG_VERSION")))
}

/// A webhook, notification channel or HTTP SIEM: one POST of the formatted batch.
async fn send_http(
    http: &HttpClient,
    live: &Live,
    formatter: &format::Bound,
    rows: &[Pending],
    timeout: Duration,
) -> Result<(), Failure> {
    let events = rows.iter().map(|r| r.body.clone()).collect();
    let req = formatter.format(events).await?;
    let id = delivery_id(rows);
    let mut builder = hyper::Request::post(live.dest.url.clone())
        .header(CONTENT_TYPE, req.content_type)
        .header(USER_AGENT, user_agent());
    for (k, v) in req.headers {
        builder = builder.header(k, v);
    }
    if live.dest.kind == Kind::Webhook {
        match live.dest.spec.secret.as_deref().filter(|s| !s.is_empty()) {
            Some(secret) => {
                for (k, v) in sign::headers(secret, &id, now_ms() / 1000, &req.body) {
                    builder = builder.header(k, v);
                }
            }
            None => {
                builder = builder
                    .header("webhook-id", id.as_str())
                    .header("webhook-timestamp", (now_ms() / 1000).to_string());
            }
        }
    } else {
        builder = builder.header("x-intentgate-delivery-id", id.as_str());
    }
    let request = builder
        .body(Full::new(req.body))
        .map_err(|e| Failure::new(format!("request: {e}")))?;
    exchange(http, request, timeout, &live.dest.shown_endpoint())
        .await?
        .ok()
}

/// S3: one gzipped object per hour of event time, PUT and signed with SigV4.
async fn send_s3(
    http: &HttpClient,
    live: &Live,
    formatter: &format::Bound,
    t: &s3::S3Target,
    tenant: &str,
    rows: &[Pending],
    timeout: Duration,
) -> Result<(), Failure> {
    let secret = live.dest.spec.secret.as_deref().unwrap_or("");
    let url = &live.dest.url;
    let scheme = url.scheme_str().unwrap_or("https");
    let host = url.authority().map(|a| a.as_str()).unwrap_or("");
    let host = host.rsplit('@').next().unwrap_or(host);
    let base = url.path().trim_end_matches('/');
    for (partition, range) in s3::by_hour(rows, &s3::partition_of_ms(now_ms())) {
        let part = &rows[range];
        let events = part.iter().map(|r| r.body.clone()).collect();
        let req = formatter.format(events).await?;
        let key = s3::object_key(
            &t.prefix,
            &partition,
            tenant,
            part,
            req.content_type.to_str().unwrap_or(""),
        );
        let body = s3::gzip(&req.body).map_err(|e| Failure::new(format!("gzip: {e}")))?;
        let hash = s3::sha256_hex(&body);
        let path = format!("{base}/{}", s3::encode_key(&key));
        let amz_date = s3::amz_date(now_ms());
        let extra: Vec<(String, String)> = req
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let mut signed: Vec<(&str, &str)> = vec![
            ("content-type", "application/gzip"),
            ("host", host),
            ("x-amz-content-sha256", &hash),
            ("x-amz-date", &amz_date),
        ];
        signed.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let authorization = s3::authorization(
            &s3::ToSign {
                method: "PUT",
                path: &path,
                query: "",
                headers: &signed,
                payload_sha256: &hash,
            },
            &t.access_key_id,
            secret,
            &t.region,
            &amz_date,
        );
        let mut builder = hyper::Request::put(format!("{scheme}://{host}{path}"))
            .header(USER_AGENT, user_agent())
            .header(AUTHORIZATION, authorization);
        for (k, v) in &signed {
            builder = builder.header(*k, *v);
        }
        let request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Failure::new(format!("request: {e}")))?;
        exchange(http, request, timeout, &live.dest.shown_endpoint())
            .await?
            .ok()?;
    }
    Ok(())
}

/// Microsoft Sentinel: the formatted JSON array, split under the API's 1 MB, POSTed to the
/// Logs Ingestion API with an Entra bearer token.
async fn send_sentinel(
    http: &HttpClient,
    live: &Live,
    formatter: &format::Bound,
    t: &sentinel::SentinelTarget,
    rows: &[Pending],
    timeout: Duration,
) -> Result<(), Failure> {
    let events = rows.iter().map(|r| r.body.clone()).collect();
    let req = formatter.format(events).await?;
    let id = delivery_id(rows);
    for body in sentinel::split_array(&req.body)? {
        let token = sentinel_token(http, live, t, timeout).await?;
        let mut builder = hyper::Request::post(t.ingest.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(USER_AGENT, user_agent())
            .header("x-intentgate-delivery-id", id.as_str())
            .header(AUTHORIZATION, format!("Bearer {token}"));
        for (k, v) in &req.headers {
            builder = builder.header(k, v);
        }
        let request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Failure::new(format!("request: {e}")))?;
        let answer = exchange(http, request, timeout, &live.dest.shown_endpoint()).await?;
        if answer.status == 401 {
            // Revoked or expired early: the next attempt asks for a new one.
            live.tokens.clear();
        }
        answer.ok()?;
    }
    Ok(())
}

/// The cached Entra token of a Sentinel destination, or a new one (client credentials).
async fn sentinel_token(
    http: &HttpClient,
    live: &Live,
    t: &sentinel::SentinelTarget,
    timeout: Duration,
) -> Result<String, Failure> {
    if let Some(token) = live.tokens.get() {
        return Ok(token);
    }
    let _one_request = live.tokens.fetching().await;
    if let Some(token) = live.tokens.get() {
        return Ok(token);
    }
    let secret = live.dest.spec.secret.as_deref().unwrap_or("");
    let request = hyper::Request::post(t.token_url.clone())
        .header(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        )
        .header(ACCEPT, HeaderValue::from_static("application/json"))
        .header(USER_AGENT, user_agent())
        .body(Full::new(Bytes::from(t.token_form(secret))))
        .map_err(|e| Failure::new(format!("token request: {e}")))?;
    let shown = format!(
        "{}://{}{}",
        t.token_url.scheme_str().unwrap_or("https"),
        t.token_url.host().unwrap_or(""),
        t.token_url.path()
    );
    let answer = exchange(http, request, timeout, &shown).await?;
    if !(200..300).contains(&answer.status) {
        return Err(Failure {
            error: sentinel::token_error(answer.status, &answer.body),
            retry_after: answer.retry_after,
            oversize: Oversize::No,
        });
    }
    let (token, expires_in) = sentinel::parse_token(&answer.body).map_err(Failure::new)?;
    live.tokens.put(token.clone(), expires_in);
    Ok(token)
}

/// An HTTP answer: its status, a bounded look at its body, and its `Retry-After`.
struct Answer {
    status: u16,
    body: Bytes,
    retry_after: Option<Duration>,
}

impl Answer {
    /// `Ok` on 2xx, else the failure to record (status and the start of the body).
    fn ok(self) -> Result<(), Failure> {
        if (200..300).contains(&self.status) {
            return Ok(());
        }
        let snippet: String = String::from_utf8_lossy(&self.body)
            .chars()
            .take(200)
            .collect();
        Err(Failure {
            error: format!("HTTP {}: {}", self.status, snippet.trim()),
            retry_after: self.retry_after,
            // 413 Content Too Large: the same request is refused the same way every time. 400
            // and 422: the payload is refused, not the destination down (401, 403, 404 and 429
            // are the destination's settings or state, waited out like a 5xx).
            oversize: match self.status {
                413 => Oversize::Yes,
                400 | 422 => Oversize::Refused,
                _ => Oversize::No,
            },
        })
    }
}

/// One HTTP exchange within `timeout`; network errors and timeouts are failures, any answer
/// is returned.
async fn exchange(
    http: &HttpClient,
    request: hyper::Request<Full<Bytes>>,
    timeout: Duration,
    shown: &str,
) -> Result<Answer, Failure> {
    let exchange = async {
        let resp = http
            .request(request)
            .await
            .map_err(|e| Failure::new(format!("{shown}: {}", chain(&e))))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        // A bounded look at the answer (for the error text), then the connection is reused.
        let body = Limited::new(resp.into_body(), 64 << 10)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok(Answer {
            status,
            body,
            retry_after,
        })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(Failure::new(format!(
            "{shown}: no answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

/// An error and its sources, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `Retry-After`: delay-seconds or an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = parse_imf_fixdate(v)?;
    let now = now_ms() / 1000;
    Some(Duration::from_secs(at.saturating_sub(now).max(0) as u64))
}

fn parse_imf_fixdate(v: &str) -> Option<i64> {
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let rest = v.split_once(", ")?.1;
    let parts: Vec<&str> = rest.split(' ').collect();
    if parts.len() != 5 || parts[4] != "GMT" {
        return None;
    }
    let day: i64 = parts[0].parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[1])? as i64
        + 1;
    let year: i64 = parts[2].parse().ok()?;
    let hms: Vec<i64> = parts[3]
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    // A destination's header: bounded before any arithmetic (an absurd year overflowed).
    if hms.len() != 3
        || !(1970..=9999).contains(&year)
        || !(1..=31).contains(&day)
        || !(0..24).contains(&hms[0])
        || !(0..60).contains(&hms[1])
        || !(0..61).contains(&hms[2])
    {
        return None;
    }
    // Days from civil (Howard Hinnant).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_jitters_and_honours_retry_after() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for failures in 0..30 {
            let d = backoff(base, max, failures, None);
            let full = base
                .saturating_mul(1u32 << failures.clamp(0, 20) as u32)
                .min(max);
            assert!(d >= full / 2 && d <= full, "{failures}: {d:?} vs {full:?}");
        }
        let d = backoff(base, max, 0, Some(Duration::from_secs(7)));
        assert!(d >= Duration::from_secs(7));
        let d = backoff(base, max, 0, Some(Duration::from_secs(1 << 30)));
        assert_eq!(d, MAX_RETRY_AFTER);
    }

    #[test]
    fn a_failing_lane_waits_longer_each_time_up_to_a_minute() {
        let lane: Lane = ("d".into(), "t".into());
        let other: Lane = ("d".into(), "u".into());
        let mut p = Paused::default();
        let t0 = Instant::now();
        assert!(!p.holds(&lane, t0));
        let waits: Vec<u64> = (0..9).map(|_| p.strike(&lane, t0).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert!(p.holds(&lane, t0 + Duration::from_secs(59)));
        assert!(!p.holds(&lane, t0 + Duration::from_secs(60)));
        assert!(!p.holds(&other, t0), "another lane is not held");
        p.clear(&lane);
        assert!(!p.holds(&lane, t0));
        assert_eq!(
            p.strike(&lane, t0),
            Duration::from_secs(1),
            "a success starts over"
        );
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_imf_fixdate("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        // A destination's absurd date is no date (it overflowed before).
        for absurd in [
            "Sun, 06 Nov 9223372036854775807 08:49:37 GMT",
            "Sun, 99999999999 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 9223372036854775807:49:37 GMT",
        ] {
            assert_eq!(parse_retry_after(absurd), None, "{absurd}");
        }
    }

    #[test]
    fn delivery_ids_are_stable_per_batch() {
        let p = |event_id| Pending {
            id: 1,
            event_id,
            created_ms: 0,
            body: String::new(),
        };
        assert_eq!(delivery_id(&[p(7)]), "msg_7");
        assert_eq!(delivery_id(&[p(7), p(9)]), "msg_7_9");
    }
}
