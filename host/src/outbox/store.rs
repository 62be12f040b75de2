//! The outbox tables (`migrations/*/0006_outbox.sql`): writing rows inside the audit batch
//! ([`enqueue!`]), claiming a lane for delivery, recording what a delivery did, and the
//! queries of the admin API (health per lane, dead letters, re-drive, stored destinations).
//!
//! A lane is one (destination, tenant): rows are delivered in id order within it, by one
//! worker at a time. On PostgreSQL the claim is a lease on the lane row (`lease_owner`,
//! `lease_until`), taken in one statement when the last lease has run out, so replicas share
//! lanes and never deliver one twice at once, without a transaction or a pooled connection
//! held while a destination answers; a replica that dies releases its lanes when their leases
//! run out, and a replica that outlived its lease records nothing (another may have taken the
//! lane). On SQLite one process owns the file and its worker keeps its lanes apart in memory.
//!
//! This module must never delete a row that was not delivered, never write outside the lane
//! it claimed, and never return a stored secret to the admin API.

use std::collections::BTreeSet;

use super::OutboxError;
use super::destination::DestinationSpec;
use crate::store::Db;

/// Runs `$body` with `$pool` bound to the pool of either backend.
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

/// Writes the outbox rows of a batch inside the open audit transaction `$tx`: for each entry
/// of `$entries` (a `&[Entry]`, after budget settling) and its row id in `$appended`, one row
/// per destination the routing table (`$router`, a [`super::Router`]) sends it to, plus the
/// lanes they fall in. Two statements at most per batch (more only beyond 1000 rows), none
/// when no destination is configured. Evaluates to `Result<bool, AuditError>`: whether rows
/// were written (the caller rings the worker after the commit).
macro_rules! enqueue {
    ($db:ty, $tx:expr, $router:expr, $tenant:expr, $entries:expr, $appended:expr) => {{
        let router: &$crate::outbox::Router = $router;
        let tenant: &str = $tenant;
        let routes = router.routes();
        let mut rows: Vec<(&str, i64)> = Vec::new();
        if !routes.is_empty() {
            for (entry, appended) in $entries.iter().zip($appended.iter()) {
                for id in
                    $crate::outbox::destination::destinations_for(&routes, tenant, &entry.event)
                {
                    rows.push((id.as_ref(), appended.id));
                }
            }
        }
        if rows.is_empty() {
            Ok::<bool, AuditError>(false)
        } else {
            let now = $crate::audit::time::now_ms();
            for chunk in rows.chunks(1000) {
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO outbox (destination, tenant, event_id, created_ms) ",
                );
                qb.push_values(chunk.iter(), |mut b, (dest, id)| {
                    b.push_bind(*dest)
                        .push_bind(tenant)
                        .push_bind(*id)
                        .push_bind(now);
                });
                qb.build().execute(&mut *$tx).await?;
            }
            let lanes: std::collections::BTreeSet<&str> = rows.iter().map(|(d, _)| *d).collect();
            let mut qb =
                sqlx::QueryBuilder::<$db>::new("INSERT INTO outbox_lanes (destination, tenant) ");
            qb.push_values(lanes.iter(), |mut b, dest| {
                b.push_bind(*dest).push_bind(tenant);
            });
            qb.push(" ON CONFLICT (destination, tenant) DO NOTHING");
            qb.build().execute(&mut *$tx).await?;
            Ok(true)
        }
    }};
}
pub(crate) use enqueue;

/// [`enqueue!`] on the SQLite writer's own connection (`crate::audit::committer`).
pub(crate) fn enqueue_sqlite(
    tx: &rusqlite::Transaction<'_>,
    router: &super::Router,
    tenant: &str,
    entries: &[crate::audit::Entry],
    appended: &[crate::audit::Appended],
) -> Result<bool, crate::audit::AuditError> {
    let routes = router.routes();
    if routes.is_empty() {
        return Ok(false);
    }
    let now = crate::audit::time::now_ms();
    let mut lanes: BTreeSet<&str> = BTreeSet::new();
    for (entry, appended) in entries.iter().zip(appended) {
        for id in super::destination::destinations_for(&routes, tenant, &entry.event) {
            tx.prepare_cached(
                "INSERT INTO outbox (destination, tenant, event_id, created_ms) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(rusqlite::params![id.as_ref(), tenant, appended.id, now])?;
            lanes.insert(id.as_ref());
        }
    }
    for dest in &lanes {
        tx.prepare_cached(
            "INSERT INTO outbox_lanes (destination, tenant) VALUES (?1, ?2) \
             ON CONFLICT (destination, tenant) DO NOTHING",
        )?
        .execute(rusqlite::params![dest, tenant])?;
    }
    Ok(!lanes.is_empty())
}

/// One row to deliver, with the recorded event (its canonical JSON, as hashed).
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: i64,
    pub event_id: i64,
    pub created_ms: i64,
    pub body: String,
}

/// A lane: (destination id, tenant).
pub type Lane = (String, String);

/// Lanes with undelivered rows whose back-off has passed, oldest due first.
pub async fn due_lanes(db: &Db, now: i64, limit: i64) -> Result<Vec<Lane>, OutboxError> {
    let sql = "SELECT l.destination, l.tenant FROM outbox_lanes l WHERE l.next_ms <= $1 \
               AND l.lease_until <= $1 AND EXISTS (SELECT 1 FROM outbox o WHERE o.destination = l.destination \
               AND o.tenant = l.tenant AND o.dead_ms = 0) ORDER BY l.next_ms LIMIT $2";
    Ok(on_db!(db, pool => sqlx::query_as(sql).bind(now).bind(limit).fetch_all(pool).await?))
}

const BATCH_SELECT: &str = "SELECT o.id, o.event_id, o.created_ms, e.body FROM outbox o \
     JOIN audit_events e ON e.id = o.event_id \
     WHERE o.destination = $1 AND o.tenant = $2 AND o.dead_ms = 0 ORDER BY o.id LIMIT $3";

fn pending_of<R: sqlx::Row>(rows: Vec<R>) -> Result<Vec<Pending>, sqlx::Error>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    usize: sqlx::ColumnIndex<R>,
{
    rows.into_iter()
        .map(|r| {
            Ok(Pending {
                id: r.try_get(0)?,
                event_id: r.try_get(1)?,
                created_ms: r.try_get(2)?,
                body: r.try_get(3)?,
            })
        })
        .collect()
}

/// A claimed lane: on PostgreSQL its lease (this replica's name and the lease's end, which
/// together say the lease is still this claim's).
pub enum Claim {
    Postgres {
        pool: sqlx::PgPool,
        owner: String,
        until: i64,
    },
    Sqlite(sqlx::SqlitePool),
}

/// Who claims, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Lease<'a> {
    /// This replica's name (random per process).
    pub owner: &'a str,
    /// How long a claim holds the lane; a delivery must end well within it.
    pub ms: i64,
}

const TAKE_LEASE: &str = "UPDATE outbox_lanes SET lease_owner = $4, lease_until = $5 \
     WHERE destination = $1 AND tenant = $2 AND next_ms <= $3 \
     AND (lease_until <= $3 OR lease_owner = $4) RETURNING failures";

const END_LEASE: &str = "UPDATE outbox_lanes SET lease_owner = '', lease_until = 0 \
     WHERE destination = $1 AND tenant = $2 AND lease_owner = $3 AND lease_until = $4";

/// Claims `lane` if its back-off has passed and no other replica holds it, and reads its
/// next batch (at most `limit` rows, in id order) with the lane's consecutive failures.
/// `None`: taken elsewhere, not due, or empty.
pub async fn claim(
    db: &Db,
    lane: &Lane,
    now: i64,
    limit: i64,
    lease: Lease<'_>,
) -> Result<Option<(Claim, i64, Vec<Pending>)>, OutboxError> {
    let (dest, tenant) = lane;
    match db {
        Db::Postgres(pool) => {
            // Past the last lease's end: unique per claim, so a late finish of an older claim
            // of this replica cannot pass for this one.
            let until = now.saturating_add(lease.ms.max(1));
            let taken: Option<(i64,)> = sqlx::query_as(TAKE_LEASE)
                .bind(dest)
                .bind(tenant)
                .bind(now)
                .bind(lease.owner)
                .bind(until)
                .fetch_optional(pool)
                .await?;
            let Some((failures,)) = taken else {
                return Ok(None);
            };
            let claim = Claim::Postgres {
                pool: pool.clone(),
                owner: lease.owner.to_owned(),
                until,
            };
            let rows = sqlx::query(BATCH_SELECT)
                .bind(dest)
                .bind(tenant)
                .bind(limit)
                .fetch_all(pool)
                .await;
            let rows = match rows.map(pending_of) {
                Ok(Ok(rows)) if !rows.is_empty() => rows,
                Ok(Ok(_)) => {
                    release(claim, lane).await?;
                    return Ok(None);
                }
                Ok(Err(e)) | Err(e) => {
                    release(claim, lane).await?;
                    return Err(e.into());
                }
            };
            Ok(Some((claim, failures, rows)))
        }
        Db::Sqlite(pool) => {
            let due: Option<(i64,)> = sqlx::query_as(
                "SELECT failures FROM outbox_lanes WHERE destination = $1 AND tenant = $2 \
                 AND next_ms <= $3",
            )
            .bind(dest)
            .bind(tenant)
            .bind(now)
            .fetch_optional(pool)
            .await?;
            let Some((failures,)) = due else {
                return Ok(None);
            };
            let rows = sqlx::query(BATCH_SELECT)
                .bind(dest)
                .bind(tenant)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            let rows = pending_of(rows)?;
            if rows.is_empty() {
                return Ok(None);
            }
            Ok(Some((Claim::Sqlite(pool.clone()), failures, rows)))
        }
    }
}

/// What one delivery attempt of a batch came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Failed; retry the lane at `retry_at_ms`.
    Retry {
        error: String,
        retry_at_ms: i64,
    },
    /// Failed, and what failed is set aside as dead letters.
    Dead {
        error: String,
        /// Every undelivered row of the lane created at or before this time is set aside (the
        /// dead-letter age passed), in one statement; `None`: the batch's rows only (an event
        /// too large on its own).
        aged_before: Option<i64>,
        /// When the lane is tried again: `None` at once (what stopped it is set aside), or a
        /// failing destination's back-off, which setting rows aside does not cut short.
        retry_at_ms: Option<i64>,
    },
}

macro_rules! write_outcome {
    ($db:ty, $conn:expr, $lane:expr, $ids:expr, $outcome:expr, $now:expr) => {{
        let (dest, tenant) = $lane;
        let conn = $conn;
        let ids: &[i64] = $ids;
        let push_ids = |qb: &mut sqlx::QueryBuilder<'_, $db>| {
            qb.push(" WHERE id IN (");
            let mut sep = qb.separated(", ");
            for id in ids {
                sep.push_bind(*id);
            }
            qb.push(")");
        };
        match $outcome {
            Outcome::Delivered => {
                let mut qb = sqlx::QueryBuilder::<$db>::new("DELETE FROM outbox");
                push_ids(&mut qb);
                let n = qb.build().execute(&mut *conn).await?.rows_affected();
                sqlx::query(
                    "UPDATE outbox_lanes SET failures = 0, next_ms = $2, delivered = delivered + $1, \
                     last_success_ms = $2 WHERE destination = $3 AND tenant = $4",
                )
                .bind(ids.len() as i64)
                .bind($now)
                .bind(dest)
                .bind(tenant)
                .execute(&mut *conn)
                .await?;
                n
            }
            Outcome::Retry { error, retry_at_ms } => {
                let error = error_text(error);
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = ",
                );
                qb.push_bind(error.clone());
                push_ids(&mut qb);
                qb.build().execute(&mut *conn).await?;
                sqlx::query(
                    "UPDATE outbox_lanes SET failures = failures + 1, next_ms = $1, last_error = $2, \
                     last_error_ms = $3 WHERE destination = $4 AND tenant = $5",
                )
                .bind(*retry_at_ms)
                .bind(error)
                .bind($now)
                .bind(dest)
                .bind(tenant)
                .execute(&mut *conn)
                .await?;
                0
            }
            Outcome::Dead {
                error,
                aged_before,
                retry_at_ms,
            } => {
                let error = error_text(error);
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "UPDATE outbox SET attempts = attempts + 1, dead_ms = ",
                );
                qb.push_bind($now);
                qb.push(", last_error = ");
                qb.push_bind(error.clone());
                match aged_before {
                    Some(before) => {
                        qb.push(" WHERE destination = ");
                        qb.push_bind(dest);
                        qb.push(" AND tenant = ");
                        qb.push_bind(tenant);
                        qb.push(" AND dead_ms = 0 AND created_ms <= ");
                        qb.push_bind(*before);
                    }
                    None => push_ids(&mut qb),
                }
                let set_aside = qb.build().execute(&mut *conn).await?.rows_affected();
                let lane = match retry_at_ms {
                    Some(_) => "UPDATE outbox_lanes SET failures = failures + 1, next_ms = $1, \
                                last_error = $2, last_error_ms = $3 \
                                WHERE destination = $4 AND tenant = $5",
                    None => "UPDATE outbox_lanes SET failures = 0, next_ms = $1, last_error = $2, \
                             last_error_ms = $3 WHERE destination = $4 AND tenant = $5",
                };
                sqlx::query(lane)
                    .bind(retry_at_ms.unwrap_or(0))
                    .bind(error)
                    .bind($now)
                    .bind(dest)
                    .bind(tenant)
                    .execute(&mut *conn)
                    .await?;
                set_aside
            }
        }
    }};
}

fn error_text(e: &str) -> String {
    e.chars().take(1024).collect()
}

/// Gives a claim back without recording anything (the lane is due again at once).
pub async fn release(claim: Claim, lane: &Lane) -> Result<(), OutboxError> {
    if let Claim::Postgres { pool, owner, until } = claim {
        sqlx::query(END_LEASE)
            .bind(&lane.0)
            .bind(&lane.1)
            .bind(owner)
            .bind(until)
            .execute(&pool)
            .await?;
    }
    Ok(())
}

/// Records `outcome` for the batch `ids` of `lane`, and releases the claim; returns the rows
/// delivered or set aside. On PostgreSQL
/// nothing is recorded when the lease is no longer this claim's ([`OutboxError::LeaseLost`]):
/// another replica may have taken the lane since, and delivers the rows itself.
pub async fn finish(
    claim: Claim,
    lane: &Lane,
    ids: &[i64],
    outcome: &Outcome,
    now: i64,
) -> Result<u64, OutboxError> {
    Ok(match claim {
        Claim::Postgres { pool, owner, until } => {
            let mut tx = pool.begin().await?;
            let held = sqlx::query(END_LEASE)
                .bind(&lane.0)
                .bind(&lane.1)
                .bind(&owner)
                .bind(until)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if held != 1 {
                tx.rollback().await?;
                return Err(OutboxError::LeaseLost);
            }
            let n = write_outcome!(sqlx::Postgres, &mut *tx, lane, ids, outcome, now);
            tx.commit().await?;
            n
        }
        Claim::Sqlite(pool) => {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
            let n = write_outcome!(sqlx::Sqlite, &mut *tx, lane, ids, outcome, now);
            tx.commit().await?;
            n
        }
    })
}

/// Undelivered rows (not dead letters) over every lane.
pub async fn backlog(db: &Db) -> Result<i64, OutboxError> {
    let sql = "SELECT COUNT(*) FROM outbox WHERE dead_ms = 0";
    Ok(on_db!(db, pool => sqlx::query_scalar(sql).fetch_one(pool).await?))
}

/// Dead letters over every lane.
pub async fn dead_letters(db: &Db) -> Result<i64, OutboxError> {
    let sql = "SELECT COUNT(*) FROM outbox WHERE dead_ms <> 0";
    Ok(on_db!(db, pool => sqlx::query_scalar(sql).fetch_one(pool).await?))
}

/// The health of one lane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaneStatus {
    pub destination: String,
    pub tenant: String,
    pub delivered: i64,
    pub last_success_ms: i64,
    pub last_error: String,
    pub last_error_ms: i64,
    pub failures: i64,
    pub next_ms: i64,
    pub backlog: i64,
    pub oldest_ms: Option<i64>,
    pub dead: i64,
}

/// Lanes of `tenant` (every tenant when `None`).
pub async fn lane_status(db: &Db, tenant: Option<&str>) -> Result<Vec<LaneStatus>, OutboxError> {
    let sql = "SELECT l.destination, l.tenant, l.delivered, l.last_success_ms, l.last_error, \
               l.last_error_ms, l.failures, l.next_ms, \
               (SELECT COUNT(*) FROM outbox o WHERE o.destination = l.destination AND o.tenant = l.tenant AND o.dead_ms = 0), \
               (SELECT MIN(o.created_ms) FROM outbox o WHERE o.destination = l.destination AND o.tenant = l.tenant AND o.dead_ms = 0), \
               (SELECT COUNT(*) FROM outbox o WHERE o.destination = l.destination AND o.tenant = l.tenant AND o.dead_ms <> 0) \
               FROM outbox_lanes l WHERE ($1 = '' OR l.tenant = $1) ORDER BY l.destination, l.tenant";
    type R = (
        String,
        String,
        i64,
        i64,
        String,
        i64,
        i64,
        i64,
        i64,
        Option<i64>,
        i64,
    );
    let rows: Vec<R> =
        on_db!(db, pool => sqlx::query_as(sql).bind(tenant.unwrap_or("")).fetch_all(pool).await?);
    Ok(rows
        .into_iter()
        .map(|r| LaneStatus {
            destination: r.0,
            tenant: r.1,
            delivered: r.2,
            last_success_ms: r.3,
            last_error: r.4,
            last_error_ms: r.5,
            failures: r.6,
            next_ms: r.7,
            backlog: r.8,
            oldest_ms: r.9,
            dead: r.10,
        })
        .collect())
}

/// A dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: i64,
    pub destination: String,
    pub tenant: String,
    pub event_id: i64,
    pub created_ms: i64,
    pub attempts: i64,
    pub dead_ms: i64,
    pub last_error: String,
}

/// Dead letters of `tenant` (all when `None`) and `destination` (all when `None`), by id,
/// after `after`.
pub async fn list_dead(
    db: &Db,
    tenant: Option<&str>,
    destination: Option<&str>,
    after: i64,
    limit: i64,
) -> Result<Vec<DeadLetter>, OutboxError> {
    let sql = "SELECT id, destination, tenant, event_id, created_ms, attempts, dead_ms, last_error \
               FROM outbox WHERE dead_ms <> 0 AND ($1 = '' OR tenant = $1) \
               AND ($2 = '' OR destination = $2) AND id > $3 ORDER BY id LIMIT $4";
    type R = (i64, String, String, i64, i64, i64, i64, String);
    let rows: Vec<R> = on_db!(db, pool => sqlx::query_as(sql)
        .bind(tenant.unwrap_or(""))
        .bind(destination.unwrap_or(""))
        .bind(after)
        .bind(limit)
        .fetch_all(pool)
        .await?);
    Ok(rows
        .into_iter()
        .map(|r| DeadLetter {
            id: r.0,
            destination: r.1,
            tenant: r.2,
            event_id: r.3,
            created_ms: r.4,
            attempts: r.5,
            dead_ms: r.6,
            last_error: r.7,
        })
        .collect())
}

/// Puts the dead letters of `destination` (and `tenant`, all tenants when `None`) back in
/// their lanes, due at once, their age counted again from now (so one failed attempt does not
/// set them aside again). Returns how many.
pub async fn redrive(db: &Db, destination: &str, tenant: Option<&str>) -> Result<u64, OutboxError> {
    let t = tenant.unwrap_or("");
    let rows = "UPDATE outbox SET dead_ms = 0, attempts = 0, created_ms = $3 WHERE dead_ms <> 0 \
                AND destination = $1 AND ($2 = '' OR tenant = $2)";
    let lanes = "UPDATE outbox_lanes SET next_ms = 0, failures = 0 WHERE destination = $1 \
                 AND ($2 = '' OR tenant = $2)";
    Ok(on_db!(db, pool => {
        let mut tx = pool.begin().await?;
        let n = sqlx::query(rows).bind(destination).bind(t).bind(crate::audit::time::now_ms()).execute(&mut *tx).await?.rows_affected();
        // Only a lane given rows back is tried at once: a redrive of nothing must not reset a
        // failing destination's back-off (a tenant looping on it would hammer a shared SIEM).
        if n > 0 {
            sqlx::query(lanes).bind(destination).bind(t).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        n
    }))
}

/// A stored destination row: (id, tenant or '' for global, spec with its secret).
pub type StoredDestination = (String, Option<String>, DestinationSpec);

/// Reads every stored destination (those configured through the admin API). A row that cannot be read (its secret sealed under another
/// master key, its settings unreadable) is returned as [`Broken`], not as an error: one such
/// row must not stop the gateway from starting, nor the other destinations from loading.
pub async fn load_destinations(
    db: &Db,
    seal: &super::sealed::SecretSeal,
) -> Result<Vec<Result<StoredDestination, Broken>>, OutboxError> {
    let sql = "SELECT id, tenant, name, kind, url, settings, secret, formatter \
               FROM outbox_destinations ORDER BY id";
    type R = (
        String,
        String,
        String,
        String,
        String,
        String,
        String,
        String,
    );
    let rows: Vec<R> = on_db!(db, pool => sqlx::query_as(sql).fetch_all(pool).await?);
    Ok(rows
        .into_iter()
        .map(
            |(id, tenant, name, kind, url, settings, secret, formatter)| {
                let tenant = (!tenant.is_empty()).then_some(tenant);
                let broken = |error: String| Broken {
                    id: id.clone(),
                    tenant: tenant.clone(),
                    name: name.clone(),
                    kind: kind.clone(),
                    error,
                };
                let stored: Settings = serde_json::from_str(&settings)
                    .map_err(|e| broken(format!("its stored settings are unreadable: {e}")))?;
                let secret = if secret.is_empty() {
                    secret
                } else {
                    seal.open(&id, &secret).map_err(|e| {
                        broken(format!(
                            "its secret cannot be opened ({e}); sealed under another master key? \
                             set it again with PUT"
                        ))
                    })?
                };
                let spec = DestinationSpec {
                    name,
                    kind,
                    url,
                    secret: (!secret.is_empty()).then_some(secret),
                    events: stored.events,
                    decisions: stored.decisions,
                    min_severity: stored.min_severity,
                    settings: stored.settings,
                    formatter: (!formatter.is_empty()).then_some(formatter),
                };
                Ok((id, tenant, spec))
            },
        )
        .collect())
}

/// A stored destination that cannot be used; it receives nothing until it is replaced or
/// deleted, and is listed with its error.
#[derive(Clone, Debug)]
pub struct Broken {
    pub id: String,
    pub tenant: Option<String>,
    pub name: String,
    pub kind: String,
    pub error: String,
}

/// A destination, global or of `tenant`, whose formatter is the component `digest`: what a
/// tenant's deletion of that component would break (`None` when none is). Another tenant's
/// destinations are never named.
pub async fn formatter_user(
    db: &Db,
    tenant: &str,
    digest: &str,
) -> Result<Option<String>, OutboxError> {
    let sql = "SELECT tenant, name FROM outbox_destinations \
               WHERE formatter = $1 AND (tenant = '' OR tenant = $2) ORDER BY id LIMIT 1";
    let row: Option<(String, String)> = on_db!(db, pool => sqlx::query_as(sql)
        .bind(digest)
        .bind(tenant)
        .fetch_optional(pool)
        .await?);
    Ok(row.map(|(owner, name)| match owner.as_str() {
        "" => format!("the global destination {name:?}"),
        _ => format!("the destination {name:?}"),
    }))
}

/// The `settings` column: the spec without name, kind, url, secret and formatter.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Settings {
    #[serde(default)]
    events: Vec<String>,
    #[serde(default)]
    decisions: Vec<String>,
    #[serde(default)]
    min_severity: Option<String>,
    #[serde(default)]
    settings: serde_json::Map<String, serde_json::Value>,
}

/// Stores (creates or replaces) a destination. A spec without a secret keeps the stored one.
pub async fn save_destination(
    db: &Db,
    seal: &super::sealed::SecretSeal,
    id: &str,
    tenant: Option<&str>,
    spec: &DestinationSpec,
) -> Result<(), OutboxError> {
    let settings = serde_json::to_string(&Settings {
        events: spec.events.clone(),
        decisions: spec.decisions.clone(),
        min_severity: spec.min_severity.clone(),
        settings: spec.settings.clone(),
    })
    .map_err(|e| OutboxError::Invalid(e.to_string()))?;
    let sql = "INSERT INTO outbox_destinations (id, tenant, name, kind, url, settings, secret, formatter, updated_ms) \
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO UPDATE SET \
               kind = excluded.kind, url = excluded.url, settings = excluded.settings, \
               secret = CASE WHEN excluded.secret = '' THEN outbox_destinations.secret ELSE excluded.secret END, \
               formatter = excluded.formatter, updated_ms = CASE \
               WHEN excluded.updated_ms > outbox_destinations.updated_ms THEN excluded.updated_ms \
               ELSE outbox_destinations.updated_ms + 1 END";
    let now = crate::audit::time::now_ms();
    let secret = match spec.secret.as_deref() {
        Some(s) if !s.is_empty() => seal.seal(id, s)?,
        _ => String::new(),
    };
    on_db!(db, pool => {
        sqlx::query(sql)
            .bind(id)
            .bind(tenant.unwrap_or(""))
            .bind(&spec.name)
            .bind(&spec.kind)
            .bind(&spec.url)
            .bind(settings)
            .bind(secret)
            .bind(spec.formatter.as_deref().unwrap_or(""))
            .bind(now)
            .execute(pool)
            .await?;
    });
    Ok(())
}

/// The stored secret of a destination (to keep it when a replacement omits it), and whether
/// `spec` sends it where the stored destination did: the same kind, URL, formatter and
/// formatter settings (a token URL is one). A replacement that changes any of them must
/// carry the secret itself, or a tenant could point a secret it cannot read at itself.
pub async fn stored_secret(
    db: &Db,
    seal: &super::sealed::SecretSeal,
    id: &str,
    spec: &DestinationSpec,
) -> Result<Option<(String, bool)>, OutboxError> {
    let sql =
        "SELECT secret, kind, url, settings, formatter FROM outbox_destinations WHERE id = $1";
    let row: Option<(String, String, String, String, String)> =
        on_db!(db, pool => sqlx::query_as(sql).bind(id).fetch_optional(pool).await?);
    let Some((stored, kind, url, settings, formatter)) = row.filter(|r| !r.0.is_empty()) else {
        return Ok(None);
    };
    let settings: Settings = serde_json::from_str(&settings)
        .map_err(|e| OutboxError::Corrupt(format!("destination {id}: {e}")))?;
    let same = kind == spec.kind
        && url == spec.url
        && formatter == spec.formatter.as_deref().unwrap_or("")
        && settings.settings == spec.settings;
    let kept = seal.open(id, &stored).map_err(|_| {
        OutboxError::Invalid(
            "secret: the stored secret cannot be opened (sealed under another master key?); send the secret again"
                .into(),
        )
    })?;
    Ok(Some((kept, same)))
}

/// Deletes a stored destination; its undelivered rows stay (visible as backlog) until it is
/// configured again or they are dead-lettered. Returns whether it existed.
pub async fn delete_destination(db: &Db, id: &str) -> Result<bool, OutboxError> {
    let sql = "DELETE FROM outbox_destinations WHERE id = $1";
    let n = on_db!(db, pool => sqlx::query(sql).bind(id).execute(pool).await?.rows_affected());
    Ok(n > 0)
}

/// A cheap fingerprint of the stored destinations (to reload only on change). A row's
/// `updated_ms` grows at every change whatever the writing replica's clock says, so the sum
/// moves with any change; the latest time alone would miss a change stamped by a clock behind
/// another replica's.
pub async fn destinations_version(db: &Db) -> Result<(i64, i64), OutboxError> {
    let sql =
        "SELECT COUNT(*), CAST(COALESCE(SUM(updated_ms), 0) AS BIGINT) FROM outbox_destinations";
    Ok(on_db!(db, pool => sqlx::query_as(sql).fetch_one(pool).await?))
}

/// The distinct destinations referenced by undelivered rows (for lanes whose destination is
/// gone).
pub async fn referenced_destinations(db: &Db) -> Result<BTreeSet<String>, OutboxError> {
    let sql = "SELECT DISTINCT destination FROM outbox_lanes";
    let v: Vec<String> = on_db!(db, pool => sqlx::query_scalar(sql).fetch_all(pool).await?);
    Ok(v.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{self, StoreConfig};

    const LEASE: Lease<'static> = Lease {
        owner: "me",
        ms: 60_000,
    };

    async fn sqlite() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = store::connect(&StoreConfig::Sqlite {
            path: dir.path().join("a.db"),
        })
        .await
        .expect("store")
        .db();
        (dir, db)
    }

    fn spec(url: &str) -> DestinationSpec {
        DestinationSpec {
            name: "hook".into(),
            kind: "webhook".into(),
            url: url.into(),
            secret: None,
            events: Vec::new(),
            decisions: Vec::new(),
            min_severity: None,
            settings: serde_json::Map::new(),
            formatter: None,
        }
    }

    async fn exec(db: &Db, sql: &str) {
        on_db!(db, pool => { sqlx::query(sql).execute(pool).await.expect(sql); });
    }

    /// A change stamped by a clock behind the one that stamped another destination still
    /// changes the fingerprint replicas reload on.
    #[tokio::test]
    async fn a_change_from_a_clock_behind_another_is_seen() {
        let (_dir, db) = sqlite().await;
        let seal = super::super::sealed::SecretSeal::derive(b"k");
        save_destination(&db, &seal, "a", None, &spec("https://a.example/1"))
            .await
            .expect("save");
        save_destination(&db, &seal, "b", None, &spec("https://b.example/1"))
            .await
            .expect("save");
        // `b` was written by a replica whose clock runs an hour ahead.
        exec(
            &db,
            "UPDATE outbox_destinations SET updated_ms = updated_ms + 3600000 WHERE id = 'b'",
        )
        .await;
        let before = destinations_version(&db).await.expect("version");
        save_destination(&db, &seal, "a", None, &spec("https://a.example/2"))
            .await
            .expect("save");
        assert_ne!(destinations_version(&db).await.expect("version"), before);
        // And a row written again by a clock behind its own stamp moves forward.
        let before = destinations_version(&db).await.expect("version");
        save_destination(&db, &seal, "b", None, &spec("https://b.example/2"))
            .await
            .expect("save");
        assert_ne!(destinations_version(&db).await.expect("version"), before);
    }

    /// A lane that just delivered goes behind the lanes that have waited; re-driven dead
    /// letters count their age from the re-drive.
    #[tokio::test]
    async fn delivery_takes_turns_and_a_redrive_starts_the_age_again() {
        let (_dir, db) = sqlite().await;
        exec(
            &db,
            "INSERT INTO audit_events (id, tenant, seq, ts_ms, event, body, prev_hash, hash) \
             VALUES (1, 'a', 1, 0, 'e', '{}', '', 'h1'), (2, 'b', 1, 0, 'e', '{}', '', 'h2')",
        )
        .await;
        exec(
            &db,
            "INSERT INTO outbox (destination, tenant, event_id, created_ms) \
             VALUES ('d', 'a', 1, 5), ('d', 'b', 2, 5)",
        )
        .await;
        exec(
            &db,
            "INSERT INTO outbox_lanes (destination, tenant) VALUES ('d', 'a'), ('d', 'b')",
        )
        .await;
        let lane_a: Lane = ("d".into(), "a".into());
        let (held, _, rows) = claim(&db, &lane_a, 1_000, 10, LEASE)
            .await
            .expect("claim")
            .expect("due");
        // A second event of lane a arrives meanwhile.
        exec(
            &db,
            "INSERT INTO audit_events (id, tenant, seq, ts_ms, event, body, prev_hash, hash) \
             VALUES (3, 'a', 2, 0, 'e', '{}', '', 'h3')",
        )
        .await;
        exec(
            &db,
            "INSERT INTO outbox (destination, tenant, event_id, created_ms) VALUES ('d', 'a', 3, 6)",
        )
        .await;
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        finish(held, &lane_a, &ids, &Outcome::Delivered, 1_000)
            .await
            .expect("finish");
        let due = due_lanes(&db, 2_000, 10).await.expect("due");
        assert_eq!(due, vec![("d".into(), "b".into()), lane_a.clone()]);

        let (held, _, rows) = claim(&db, &lane_a, 2_000, 10, LEASE)
            .await
            .expect("claim")
            .expect("due");
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let dead = Outcome::Dead {
            error: "HTTP 500".into(),
            aged_before: None,
            retry_at_ms: None,
        };
        finish(held, &lane_a, &ids, &dead, 2_000)
            .await
            .expect("finish");
        let before = crate::audit::time::now_ms();
        assert_eq!(redrive(&db, "d", Some("a")).await.expect("redrive"), 1);
        let (_, _, rows) = claim(&db, &lane_a, 3_000, 10, LEASE)
            .await
            .expect("claim")
            .expect("due");
        assert!(rows.iter().all(|r| r.created_ms >= before), "{rows:?}");

        // A failing lane with nothing dead keeps its back-off through a redrive of nothing.
        exec(
            &db,
            "UPDATE outbox_lanes SET failures = 4, next_ms = 9000000 WHERE tenant = 'b'",
        )
        .await;
        assert_eq!(redrive(&db, "d", Some("b")).await.expect("redrive"), 0);
        let due = due_lanes(&db, 10_000, 10).await.expect("due");
        assert!(
            !due.contains(&("d".into(), "b".into())),
            "a redrive of nothing reset the lane's back-off: {due:?}"
        );
    }

    /// On PostgreSQL a lane is held by a lease, not a transaction: another replica cannot take
    /// it while the lease runs; a claim whose lease ran out and was taken by another records
    /// nothing; a released claim is due again at once.
    #[tokio::test]
    async fn a_lease_holds_a_lane_for_one_replica() {
        let url = tokio::task::spawn_blocking(|| {
            crate::testkit::PgServer::shared().and_then(|s| s.fresh_database())
        })
        .await
        .expect("join")
        .expect("postgres");
        let db = store::connect(&StoreConfig::Postgres { url })
            .await
            .expect("store")
            .db();
        exec(
            &db,
            "INSERT INTO audit_events (tenant, seq, ts_ms, event, body, prev_hash, hash) \
             VALUES ('a', 1, 0, 'e', '{}', '', 'h1')",
        )
        .await;
        exec(
            &db,
            "INSERT INTO outbox (destination, tenant, event_id, created_ms) \
             SELECT 'd', 'a', id, 5 FROM audit_events",
        )
        .await;
        exec(
            &db,
            "INSERT INTO outbox_lanes (destination, tenant) VALUES ('d', 'a')",
        )
        .await;
        let lane: Lane = ("d".into(), "a".into());
        let (one, two) = (
            Lease {
                owner: "one",
                ms: 1_000,
            },
            Lease {
                owner: "two",
                ms: 1_000,
            },
        );
        let (held, _, rows) = claim(&db, &lane, 10_000, 10, one)
            .await
            .expect("claim")
            .expect("due");
        assert_eq!(rows.len(), 1);
        assert!(
            claim(&db, &lane, 10_500, 10, two)
                .await
                .expect("claim")
                .is_none()
        );
        assert!(due_lanes(&db, 10_500, 10).await.expect("due").is_empty());
        // One's lease runs out; two takes the lane; one's late finish records nothing.
        let (taken, _, _) = claim(&db, &lane, 11_001, 10, two)
            .await
            .expect("claim")
            .expect("taken over");
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        assert!(matches!(
            finish(held, &lane, &ids, &Outcome::Delivered, 11_002).await,
            Err(OutboxError::LeaseLost)
        ));
        assert_eq!(backlog(&db).await.expect("backlog"), 1, "nothing deleted");
        // Two gives it back: due again at once, for anyone.
        release(taken, &lane).await.expect("release");
        let (held, _, _) = claim(&db, &lane, 11_003, 10, one)
            .await
            .expect("claim")
            .expect("due again");
        finish(held, &lane, &ids, &Outcome::Delivered, 11_004)
            .await
            .expect("finish");
        assert_eq!(backlog(&db).await.expect("backlog"), 0);
    }
}
