//! Reading the audit tables: filtered listing with keyset pagination, chain walks by position,
//! chain heads and the checkpoint history.
//!
//! Pagination is always keyset (`id < cursor` / `id > cursor`), never OFFSET over a live table.
//! On SQLite, the token, agent, tool and tenant-and-time filters read the lookup tables of `facets.rs`
//! and the events above their mark (`records_sql`).
//! This module must never write, and never widen a query beyond the tenant it was given: tenant
//! scoping is decided by the caller (the admin API) and passed in [`AuditFilter::tenant`].

use serde_json::Value;

use super::event::Decision;
use super::facets::{Facet, MARK};
use super::{AuditError, Db, time};
use crate::store::page::read_bounded;

/// Longest value of one filter parameter (longer than any stored field can be).
pub const MAX_FILTER_BYTES: usize = 1024;

/// Most bytes of stored events one page of a list, an export or a verification holds in
/// memory (an event's body can be as large as a request, with raw argument values on). A page
/// that reaches it ends early and says where to go on.
pub use crate::store::page::MAX_PAGE_BYTES;

/// What a read row holds in memory, near enough to bound a page by.
trait Weight {
    fn weight(&self) -> usize;
}

impl Weight for AuditRecord {
    fn weight(&self) -> usize {
        64 + self.tenant.len() + self.body.len() + self.prev_hash.len() + self.hash.len()
    }
}

impl Weight for ChainRow {
    fn weight(&self) -> usize {
        self.record.weight()
            + [
                &self.event,
                &self.decision,
                &self.check_name,
                &self.agent_id,
                &self.tool,
                &self.jti,
                &self.root_jti,
                &self.elevation_id,
            ]
            .iter()
            .map(|s| s.len())
            .sum::<usize>()
    }
}

fn weighed<T: Weight>(row: T) -> Result<(T, usize), AuditError> {
    let w = row.weight();
    Ok((row, w))
}

/// Filters of `GET /v1/admin/audit` and the export. `tenant: None` means every tenant (only a
/// superadmin may ask for that; the admin API decides).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditFilter {
    pub tenant: Option<String>,
    /// Inclusive lower bound on the event time, unix ms.
    pub from_ms: Option<i64>,
    /// Inclusive upper bound on the event time, unix ms.
    pub to_ms: Option<i64>,
    pub agent_id: Option<String>,
    pub tool: Option<String>,
    pub decision: Option<Decision>,
    pub check: Option<String>,
    /// Matches the token id or the root token id, so a root jti finds its whole delegation tree.
    pub jti: Option<String>,
    pub elevation_id: Option<String>,
    /// One event by row id.
    pub id: Option<i64>,
    /// The event kind (`event`: `intentgate.tool_call`, `admin/mint`, …).
    pub event: Option<String>,
    /// Only events after this row id (resuming an export where it broke off).
    pub after_id: Option<i64>,
}

impl AuditFilter {
    /// Reads the filter from query parameters (`tenant, from, to, agent_id, tool, decision, check,
    /// jti, elevation_id, id, event, after_id`; `since`/`until`/`subject` are accepted as aliases
    /// of `from`/`to`/`agent_id`). Unknown parameters are ignored; bad values are errors
    /// ([`AuditError::InvalidQuery`] naming the parameter), checked here so that no value the
    /// database would refuse (a NUL byte on PostgreSQL) reaches it as a store failure.
    pub fn from_params<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, AuditError> {
        let mut f = AuditFilter::default();
        let text = |v: &str| (!v.is_empty()).then(|| v.to_owned());
        for (k, v) in params {
            if v.len() > MAX_FILTER_BYTES {
                return Err(AuditError::InvalidQuery(format!(
                    "{k} is longer than {MAX_FILTER_BYTES} bytes"
                )));
            }
            if v.chars().any(char::is_control) {
                return Err(AuditError::InvalidQuery(format!(
                    "{k} must not contain control characters"
                )));
            }
            match k {
                "tenant" => f.tenant = text(v),
                // Two names of one bound, both given: which wins would depend on the order
                // the query was read in, so neither does.
                "from" | "since" | "to" | "until" | "agent_id" | "subject"
                    if !v.is_empty()
                        && match k {
                            "from" | "since" => f.from_ms.is_some(),
                            "to" | "until" => f.to_ms.is_some(),
                            _ => f.agent_id.is_some(),
                        } =>
                {
                    return Err(AuditError::InvalidQuery(format!(
                        "{k} repeats a bound already given (from/since, to/until, agent_id/subject name the same one)"
                    )));
                }
                "from" | "since" if !v.is_empty() => {
                    f.from_ms = Some(time::parse_rfc3339(v).ok_or_else(|| {
                        AuditError::InvalidQuery(format!("{k} must be an RFC 3339 time"))
                    })?)
                }
                "to" | "until" if !v.is_empty() => {
                    let ms = time::parse_rfc3339(v).ok_or_else(|| {
                        AuditError::InvalidQuery(format!("{k} must be an RFC 3339 time"))
                    })?;
                    // A bound covers the whole of its last written unit: a day, a second, or
                    // a tenth or hundredth of one (`.5` ends at `.599`).
                    let whole = if v.len() == 10 {
                        86_399_999
                    } else {
                        match fraction_digits(v) {
                            0 => 999,
                            1 => 99,
                            2 => 9,
                            _ => 0,
                        }
                    };
                    f.to_ms = Some(ms + whole);
                }
                "agent_id" | "subject" => f.agent_id = text(v),
                "tool" => f.tool = text(v),
                "decision" if !v.is_empty() => f.decision = Some(v.parse()?),
                "check" => f.check = text(v),
                "jti" => f.jti = text(v),
                "elevation_id" => f.elevation_id = text(v),
                "event" => f.event = text(v),
                "after_id" if !v.is_empty() => {
                    f.after_id = Some(v.parse().map_err(|_| {
                        AuditError::InvalidQuery("after_id must be an integer".into())
                    })?)
                }
                "id" if !v.is_empty() => {
                    f.id =
                        Some(v.parse().map_err(|_| {
                            AuditError::InvalidQuery("id must be an integer".into())
                        })?)
                }
                _ => {}
            }
        }
        Ok(f)
    }

    /// SQL conditions (joined with AND, starting with `WHERE 1=1`) and their parameters.
    fn where_sql(&self, params: &mut Vec<Param>) -> String {
        let mut sql = String::from(" WHERE 1=1");
        let eq = |col: &str, v: Param, params: &mut Vec<Param>, sql: &mut String| {
            params.push(v);
            sql.push_str(&format!(" AND {col} = ${}", params.len()));
        };
        if let Some(t) = &self.tenant {
            eq("tenant", Param::S(t.clone()), params, &mut sql);
        }
        if let Some(v) = self.from_ms {
            params.push(Param::I(v));
            sql.push_str(&format!(" AND ts_ms >= ${}", params.len()));
        }
        if let Some(v) = self.to_ms {
            params.push(Param::I(v));
            sql.push_str(&format!(" AND ts_ms <= ${}", params.len()));
        }
        if let Some(v) = &self.agent_id {
            eq("agent_id", Param::S(v.clone()), params, &mut sql);
        }
        if let Some(v) = &self.tool {
            eq("tool", Param::S(v.clone()), params, &mut sql);
        }
        if let Some(v) = self.decision {
            eq("decision", Param::S(v.as_str().into()), params, &mut sql);
        }
        if let Some(v) = &self.check {
            eq("check_name", Param::S(v.clone()), params, &mut sql);
        }
        if let Some(v) = &self.jti {
            params.push(Param::S(v.clone()));
            let n = params.len();
            // `jti = v OR root_jti = v`, spelled so that each branch names the condition of
            // its partial index on PostgreSQL (migrations 0002 and 0007; SQLite reads the
            // token lookup table instead, migration 0009): a root token's own events
            // (root_jti = jti) are found by the first branch alone.
            sql.push_str(&format!(
                " AND ((jti = ${n} AND jti <> '') OR (root_jti = ${n} AND root_jti <> '' AND root_jti <> jti))"
            ));
        }
        if let Some(v) = &self.elevation_id {
            eq("elevation_id", Param::S(v.clone()), params, &mut sql);
        }
        if let Some(v) = self.id {
            eq("id", Param::I(v), params, &mut sql);
        }
        if let Some(v) = &self.event {
            eq("event", Param::S(v.clone()), params, &mut sql);
        }
        if let Some(v) = self.after_id {
            params.push(Param::I(v));
            sql.push_str(&format!(" AND id > ${}", params.len()));
        }
        sql
    }
}

#[derive(Debug, Clone)]
enum Param {
    S(String),
    I(i64),
}

#[cfg(test)]
impl std::fmt::Display for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Param::S(s) => f.write_str(s),
            Param::I(i) => write!(f, "{i}"),
        }
    }
}

/// The statement `list` runs for `filter`'s first page of 100, and its parameters as text.
#[cfg(test)]
pub(crate) fn records_sql_for_test(db: &Db, filter: &AuditFilter, out: &mut Vec<String>) -> String {
    let mut params = Vec::new();
    let sql = records_sql(db, filter, &[], Order::NewestFirst, 101, &mut params);
    out.extend(params.iter().map(ToString::to_string));
    sql
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditRecord {
    pub id: i64,
    pub tenant: String,
    pub seq: i64,
    pub ts_ms: i64,
    /// The canonical event JSON exactly as hashed.
    pub body: String,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRecord {
    /// The event as one JSON object: the hashed body's members plus `id`, `hash` and `prev_hash`
    /// in front. Built by splicing text, so the body's bytes (numbers included) are exactly the
    /// stored ones; the offline verifier drops those three members and re-canonicalizes.
    pub fn to_json_line(&self) -> String {
        let rest = self.body.strip_prefix('{').unwrap_or("}");
        let mut line = String::with_capacity(self.body.len() + 170);
        line.push_str(&format!(
            "{{\"id\":{},\"hash\":\"{}\",\"prev_hash\":\"{}\"",
            self.id,
            json_safe_hex(&self.hash),
            json_safe_hex(&self.prev_hash)
        ));
        if rest != "}" {
            line.push(',');
        }
        line.push_str(rest);
        line
    }

    /// The body as a JSON value (for CSV and display; not for hashing).
    pub fn body_value(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// Stored hashes are hex; anything else (a tampered row) is shown with its non-hex characters
/// replaced, so it can never break out of the JSON string.
fn json_safe_hex(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '?' })
        .collect()
}

/// A page of events, newest first, and the cursor for the next (older) page.
#[derive(Debug, Clone)]
pub struct Page {
    pub items: Vec<AuditRecord>,
    pub next_cursor: Option<String>,
}

/// The lookup half's columns: the id is the table's `event_id` (equal to the event's), so a
/// table read in `event_id` order (one value of one tenant) gives the page's order as read, and
/// the page stops after its rows; naming the event's `id` made SQLite sort every entry first.
const RECORD_FIELDS: &str = "SELECT event_id AS id, tenant, seq, ts_ms, body, prev_hash, hash";

const RECORD_COLS: &str = "SELECT id, tenant, seq, ts_ms, body, prev_hash, hash FROM audit_events";

/// Which way a query walks the events.
#[derive(Debug, Clone, Copy)]
enum Order {
    NewestFirst,
    OldestFirst,
}

/// The `SELECT` of the records matching `filter` and `bounds` (conditions on the event id:
/// `("<", cursor)`), in `order`, at most `limit`.
///
/// On SQLite a token, agent, tool or a tenant's time filter is answered in two halves, merged in id
/// order: the events above the lookup tables' mark, read by id (`NOT INDEXED`: never through a
/// tenant index that would walk the whole tenant), and the rest through the table
/// (`facets.rs`). The id bounds are put on the table's own `event_id`, so a page starts where
/// its cursor points.
fn records_sql(
    db: &Db,
    filter: &AuditFilter,
    bounds: &[(&str, i64)],
    order: Order,
    limit: i64,
    params: &mut Vec<Param>,
) -> String {
    let conds = filter.where_sql(params);
    let mut ids: Vec<(&str, usize)> = Vec::with_capacity(bounds.len());
    for (op, v) in bounds {
        params.push(Param::I(*v));
        ids.push((op, params.len()));
    }
    let on = |col: &str| -> String {
        ids.iter()
            .map(|(op, n)| format!(" AND {col} {op} ${n}"))
            .collect()
    };
    params.push(Param::I(limit));
    let limit_at = params.len();
    let direction = match order {
        Order::NewestFirst => "DESC",
        Order::OldestFirst => "ASC",
    };
    let tail = format!(" ORDER BY id {direction} LIMIT ${limit_at}");
    let facet = match db {
        Db::Sqlite(_) => Facet::driving(filter),
        Db::Postgres(_) => None,
    };
    let Some(facet) = facet else {
        return format!("{RECORD_COLS}{conds}{}{tail}", on("id"));
    };
    let mut keyed = String::new();
    let mut key = |col: &str, op: &str, v: Param, params: &mut Vec<Param>| {
        params.push(v);
        keyed.push_str(&format!(" AND {col} {op} ${}", params.len()));
    };
    match facet {
        Facet::Token(value) | Facet::Agent(value) | Facet::Tool(value) => {
            key("value", "=", Param::S(value.to_owned()), params);
            if let Some(tenant) = &filter.tenant {
                key("scope", "=", Param::S(tenant.clone()), params);
            }
        }
        Facet::Time => {
            if let Some(tenant) = &filter.tenant {
                key("scope", "=", Param::S(tenant.clone()), params);
            }
            if let Some(from) = filter.from_ms {
                key("value", ">=", Param::I(from), params);
            }
            if let Some(to) = filter.to_ms {
                key("value", "<=", Param::I(to), params);
            }
        }
    }
    let above = format!(
        "{RECORD_COLS} NOT INDEXED{conds}{} AND id > {MARK}",
        on("id")
    );
    let table = facet.table();
    if !answered_by_key(filter, facet) {
        return format!(
            "{above} UNION ALL \
             {RECORD_FIELDS} FROM {table} CROSS JOIN audit_events ON id = event_id{conds}{keyed} \
             AND event_id <= {MARK}{}{tail}",
            on("event_id"),
        );
    }
    // The table's key answers every condition: the page's ids are chosen from its entries
    // alone, and only those events are read. (Joined first, a time window, or a value across
    // every tenant, read every event it holds, and sorted them, before a page of 100.)
    if let Some(after) = filter.after_id {
        key("event_id", ">", Param::I(after), params);
    }
    format!(
        "{above} UNION ALL \
         {RECORD_FIELDS} FROM (SELECT event_id FROM {table} WHERE 1=1{keyed} \
         AND event_id <= {MARK}{} ORDER BY event_id {direction} LIMIT ${limit_at}) \
         CROSS JOIN audit_events ON id = event_id{conds}{tail}",
        on("event_id"),
    )
}

/// Whether the key of `facet`'s table answers every condition of `filter` (the facet's own
/// value, the tenant, and for the time table the window), so that the table's entries alone
/// decide which events a page holds.
fn answered_by_key(filter: &AuditFilter, facet: Facet<'_>) -> bool {
    let window = filter.from_ms.is_some() || filter.to_ms.is_some();
    let others = filter.decision.is_none()
        && filter.check.is_none()
        && filter.elevation_id.is_none()
        && filter.id.is_none()
        && filter.event.is_none();
    others
        && match facet {
            Facet::Token(_) => filter.agent_id.is_none() && filter.tool.is_none() && !window,
            Facet::Agent(_) => filter.jti.is_none() && filter.tool.is_none() && !window,
            Facet::Tool(_) => filter.jti.is_none() && filter.agent_id.is_none() && !window,
            Facet::Time => {
                filter.jti.is_none() && filter.agent_id.is_none() && filter.tool.is_none()
            }
        }
}

macro_rules! fetch_all {
    ($db:expr, $T:ty, $sql:expr, $params:expr) => {{
        let sql: &str = $sql;
        let params: &[Param] = $params;
        match $db {
            Db::Sqlite(pool) => {
                let mut q = sqlx::query_as::<_, $T>(sql);
                for p in params {
                    q = match p {
                        Param::S(s) => q.bind(s.as_str()),
                        Param::I(i) => q.bind(*i),
                    };
                }
                q.fetch_all(pool).await?
            }
            Db::Postgres(pool) => {
                let mut q = sqlx::query_as::<_, $T>(sql);
                for p in params {
                    q = match p {
                        Param::S(s) => q.bind(s.as_str()),
                        Param::I(i) => q.bind(*i),
                    };
                }
                q.fetch_all(pool).await?
            }
        }
    }};
}

/// As `fetch_all!`, for pages of events: at most [`MAX_PAGE_BYTES`] of them; gives
/// `(rows, cut_short)`.
macro_rules! fetch_page {
    ($db:expr, $T:ty, $sql:expr, $params:expr) => {{
        let sql: &str = $sql;
        let params: &[Param] = $params;
        match $db {
            Db::Sqlite(pool) => {
                let mut q = sqlx::query_as::<_, $T>(sql);
                for p in params {
                    q = match p {
                        Param::S(s) => q.bind(s.as_str()),
                        Param::I(i) => q.bind(*i),
                    };
                }
                read_bounded(q.fetch(pool), weighed).await?
            }
            Db::Postgres(pool) => {
                let mut q = sqlx::query_as::<_, $T>(sql);
                for p in params {
                    q = match p {
                        Param::S(s) => q.bind(s.as_str()),
                        Param::I(i) => q.bind(*i),
                    };
                }
                read_bounded(q.fetch(pool), weighed).await?
            }
        }
    }};
}

/// Events matching `filter`, newest first, older than `cursor` (an id from `next_cursor`).
pub async fn list(
    db: &Db,
    filter: &AuditFilter,
    cursor: Option<&str>,
    limit: u32,
) -> Result<Page, AuditError> {
    let limit = limit.clamp(1, 1000);
    let mut bounds = Vec::new();
    if let Some(c) = cursor.filter(|c| !c.is_empty()) {
        let before: i64 = c
            .parse()
            .map_err(|_| AuditError::InvalidQuery("cursor is not one this API gave".into()))?;
        bounds.push(("<", before));
    }
    let mut params = Vec::new();
    let sql = records_sql(
        db,
        filter,
        &bounds,
        Order::NewestFirst,
        i64::from(limit) + 1,
        &mut params,
    );
    let (mut items, cut_short): (Vec<AuditRecord>, bool) =
        fetch_page!(db, AuditRecord, &sql, &params);
    let next_cursor = if items.len() > limit as usize || cut_short {
        items.truncate(limit as usize);
        items.last().map(|r| r.id.to_string())
    } else {
        None
    };
    Ok(Page { items, next_cursor })
}

/// Events matching `filter` with `after < id <= upto`, oldest first (the export's pages; a
/// page may end before `limit` at [`MAX_PAGE_BYTES`], so only an empty one is the last).
pub async fn scan(
    db: &Db,
    filter: &AuditFilter,
    after: i64,
    upto: i64,
    limit: u32,
) -> Result<Vec<AuditRecord>, AuditError> {
    let mut params = Vec::new();
    let sql = records_sql(
        db,
        filter,
        &[(">", after), ("<=", upto)],
        Order::OldestFirst,
        i64::from(limit.max(1)),
        &mut params,
    );
    let (rows, _): (Vec<AuditRecord>, bool) = fetch_page!(db, AuditRecord, &sql, &params);
    Ok(rows)
}

/// The largest event id now (the export's fixed upper bound), 0 when empty.
pub async fn max_id(db: &Db) -> Result<i64, AuditError> {
    let rows: Vec<(Option<i64>,)> =
        fetch_all!(db, (Option<i64>,), "SELECT MAX(id) FROM audit_events", &[]);
    Ok(rows.first().and_then(|r| r.0).unwrap_or(0))
}

/// On SQLite, how many events the lookup tables of `facets.rs` lag behind the audit table:
/// what a filtered query reads from the table itself. `None` on PostgreSQL (plain indexes).
pub async fn lookup_lag(db: &Db) -> Result<Option<i64>, AuditError> {
    let Db::Sqlite(pool) = db else {
        return Ok(None);
    };
    let lag: i64 = sqlx::query_scalar(&format!(
        "SELECT COALESCE(MAX(id), 0) - {MARK} FROM audit_events"
    ))
    .fetch_one(pool)
    .await?;
    Ok(Some(lag))
}

/// An event the lookup tables of `facets.rs` cover (its id is at or below their mark) but
/// hold no entry for under one of its filters: a filtered list would not show it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Unlisted {
    pub id: i64,
    pub seq: i64,
    /// The filter that would miss it: `agent_id`, `tool`, `time`, `jti` or `root_jti`.
    pub filter: String,
}

/// On SQLite, the first of `tenant`'s events with `after_seq < seq <= upto_seq` that the lookup
/// tables cover but lack an entry for (`None` on PostgreSQL, whose indexes are the database's
/// own). One statement: the mark and the tables are read from one snapshot, so an event the
/// lookup writer enters meanwhile is either above the mark or entered.
pub async fn first_unlisted(
    db: &Db,
    tenant: &str,
    after_seq: i64,
    upto_seq: i64,
) -> Result<Option<Unlisted>, AuditError> {
    let Db::Sqlite(pool) = db else {
        return Ok(None);
    };
    let lacks = |table: &str, value: &str| {
        format!(
            "NOT EXISTS (SELECT 1 FROM facets.{table} f \
             WHERE f.value = {value} AND f.scope = e.tenant AND f.event_id = e.id)"
        )
    };
    let sql = format!(
        "SELECT id, seq, filter FROM (SELECT e.id AS id, e.seq AS seq, CASE \
         WHEN e.agent_id <> '' AND {agent} THEN 'agent_id' \
         WHEN e.tool <> '' AND {tool} THEN 'tool' \
         WHEN {time} THEN 'time' \
         WHEN e.jti <> '' AND {jti} THEN 'jti' \
         WHEN e.root_jti <> '' AND e.root_jti <> e.jti AND {root} THEN 'root_jti' \
         END AS filter FROM audit_events e \
         WHERE e.tenant = $1 AND e.seq > $2 AND e.seq <= $3 AND e.id <= {MARK}) \
         WHERE filter IS NOT NULL ORDER BY seq LIMIT 1",
        agent = lacks("audit_agent_facet", "e.agent_id"),
        tool = lacks("audit_tool_facet", "e.tool"),
        time = lacks("audit_time_facet", "e.ts_ms"),
        jti = lacks("audit_token_facet", "e.jti"),
        root = lacks("audit_token_facet", "e.root_jti"),
    );
    Ok(sqlx::query_as::<_, Unlisted>(&sql)
        .bind(tenant)
        .bind(after_seq)
        .bind(upto_seq)
        .fetch_optional(pool)
        .await?)
}

/// A stored event with the indexed columns that the verifier compares against its body.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ChainRow {
    #[sqlx(flatten)]
    pub record: AuditRecord,
    pub event: String,
    pub decision: String,
    pub check_name: String,
    pub agent_id: String,
    pub tool: String,
    pub jti: String,
    pub root_jti: String,
    pub elevation_id: String,
}

/// A tenant's events with `after_seq < seq <= upto_seq`, in chain order (the verifier's pages;
/// a page may end before `limit` at [`MAX_PAGE_BYTES`], so only an empty one is the last).
pub async fn chain_page(
    db: &Db,
    tenant: &str,
    after_seq: i64,
    upto_seq: i64,
    limit: u32,
) -> Result<Vec<ChainRow>, AuditError> {
    let sql = "SELECT id, tenant, seq, ts_ms, body, prev_hash, hash, event, decision, check_name, \
               agent_id, tool, jti, root_jti, elevation_id FROM audit_events \
               WHERE tenant = $1 AND seq > $2 AND seq <= $3 ORDER BY seq ASC LIMIT $4";
    let params = [
        Param::S(tenant.to_owned()),
        Param::I(after_seq),
        Param::I(upto_seq),
        Param::I(i64::from(limit.max(1))),
    ];
    let (rows, _): (Vec<ChainRow>, bool) = fetch_page!(db, ChainRow, sql, &params);
    Ok(rows)
}

/// How many events of `tenant` have `seq > after_seq`.
pub async fn count_after(db: &Db, tenant: &str, after_seq: i64) -> Result<i64, AuditError> {
    let params = [Param::S(tenant.to_owned()), Param::I(after_seq)];
    let rows: Vec<(i64,)> = fetch_all!(
        db,
        (i64,),
        "SELECT COUNT(*) FROM audit_events WHERE tenant = $1 AND seq > $2",
        &params
    );
    Ok(rows.first().map(|r| r.0).unwrap_or(0))
}

/// How many of a tenant's rows claim a place up to `upto` in its chain (`seq <= upto`, a row
/// below 1 included): the chain's writer writes exactly `upto` of them.
pub async fn count_upto(db: &Db, tenant: &str, upto: i64) -> Result<i64, AuditError> {
    let params = [Param::S(tenant.to_owned()), Param::I(upto)];
    let rows: Vec<(i64,)> = fetch_all!(
        db,
        (i64,),
        "SELECT COUNT(*) FROM audit_events WHERE tenant = $1 AND seq <= $2",
        &params
    );
    Ok(rows.first().map(|r| r.0).unwrap_or(0))
}

/// How many digits the fraction of an RFC 3339 time's seconds has (0 without one).
fn fraction_digits(v: &str) -> usize {
    v.split_once('.').map_or(0, |(_, rest)| {
        rest.bytes().take_while(u8::is_ascii_digit).count()
    })
}

/// A tenant's chain head row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct HeadRow {
    pub seq: i64,
    pub hash: String,
    pub checkpoint_size: i64,
    pub event_id: i64,
    pub ts_ms: i64,
}

pub async fn head(db: &Db, tenant: &str) -> Result<Option<HeadRow>, AuditError> {
    let params = [Param::S(tenant.to_owned())];
    let rows: Vec<HeadRow> = fetch_all!(
        db,
        HeadRow,
        "SELECT seq, hash, checkpoint_size, event_id, ts_ms FROM audit_chain_heads WHERE tenant = $1",
        &params
    );
    Ok(rows.into_iter().next())
}

/// The highest position of any row of `tenant`'s chain (0 when it has none).
pub async fn max_seq(db: &Db, tenant: &str) -> Result<i64, AuditError> {
    let params = [Param::S(tenant.to_owned())];
    let rows: Vec<(i64,)> = fetch_all!(
        db,
        (i64,),
        "SELECT COALESCE(MAX(seq), 0) FROM audit_events WHERE tenant = $1",
        &params
    );
    Ok(rows.first().map(|r| r.0).unwrap_or(0))
}

/// Tenants that have a chain.
pub async fn tenants(db: &Db) -> Result<Vec<String>, AuditError> {
    let rows: Vec<(String,)> = fetch_all!(
        db,
        (String,),
        "SELECT tenant FROM audit_chain_heads ORDER BY tenant",
        &[]
    );
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// One signed checkpoint from the history.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CheckpointRow {
    pub tenant: String,
    pub size: i64,
    /// Hex of the chain hash at `size` (the note carries it in base64).
    pub root_hash: String,
    pub key_name: String,
    /// The signed note text.
    pub note: String,
    pub created_ms: i64,
}

const CHECKPOINT_COLS: &str =
    "SELECT tenant, size, root_hash, key_name, note, created_ms FROM audit_checkpoints";

/// A tenant's checkpoints, newest first, smaller than `before_size` when given.
/// The most checkpoints one page lists.
pub const MAX_CHECKPOINT_PAGE: u32 = 1000;

pub async fn checkpoints(
    db: &Db,
    tenant: &str,
    before_size: Option<i64>,
    limit: u32,
) -> Result<Vec<CheckpointRow>, AuditError> {
    let sql =
        format!("{CHECKPOINT_COLS} WHERE tenant = $1 AND size < $2 ORDER BY size DESC LIMIT $3");
    let params = [
        Param::S(tenant.to_owned()),
        Param::I(before_size.unwrap_or(i64::MAX)),
        // A page of the most a caller may ask for, and one more to tell whether more follow.
        Param::I(i64::from(limit.clamp(1, MAX_CHECKPOINT_PAGE + 1))),
    ];
    Ok(fetch_all!(db, CheckpointRow, &sql, &params))
}

/// A tenant's newest checkpoint.
pub async fn latest_checkpoint(db: &Db, tenant: &str) -> Result<Option<CheckpointRow>, AuditError> {
    Ok(checkpoints(db, tenant, None, 1).await?.into_iter().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_from_params() {
        let f = AuditFilter::from_params([
            ("tenant", "acme"),
            ("from", "2026-05-01"),
            ("to", "2026-05-01T10:00:00Z"),
            ("decision", "block"),
            ("jti", "j1"),
            ("other", "x"),
        ])
        .expect("filter");
        assert_eq!(f.tenant.as_deref(), Some("acme"));
        assert_eq!(f.from_ms, time::parse_rfc3339("2026-05-01"));
        assert_eq!(
            f.to_ms,
            time::parse_rfc3339("2026-05-01T10:00:00.999Z"),
            "a whole-second bound covers the second"
        );
        assert_eq!(f.decision, Some(Decision::Block));
        for (to, end) in [
            ("2026-05-01T10:00:00.5Z", "2026-05-01T10:00:00.599Z"),
            ("2026-05-01T10:00:00.25Z", "2026-05-01T10:00:00.259Z"),
            ("2026-05-01T10:00:00.125Z", "2026-05-01T10:00:00.125Z"),
        ] {
            let f = AuditFilter::from_params([("to", to)]).expect("filter");
            assert_eq!(f.to_ms, time::parse_rfc3339(end), "{to}");
        }
        let mut params = Vec::new();
        let sql = f.where_sql(&mut params);
        assert_eq!(
            sql,
            " WHERE 1=1 AND tenant = $1 AND ts_ms >= $2 AND ts_ms <= $3 AND decision = $4 AND ((jti = $5 AND jti <> '') OR (root_jti = $5 AND root_jti <> '' AND root_jti <> jti))"
        );
        assert!(AuditFilter::from_params([("from", "yesterday")]).is_err());
        for pair in [("from", "since"), ("until", "to"), ("subject", "agent_id")] {
            let v = if pair.0 == "subject" {
                "a"
            } else {
                "2026-05-01"
            };
            assert!(
                AuditFilter::from_params([(pair.0, v), (pair.1, v)]).is_err(),
                "{pair:?}"
            );
        }
        assert!(AuditFilter::from_params([("decision", "maybe")]).is_err());
        for (k, v) in [("tool", "a\0b"), ("agent_id", "\u{7}")] {
            match AuditFilter::from_params([(k, v)]) {
                Err(AuditError::InvalidQuery(m)) => assert!(m.starts_with(k), "{m}"),
                other => panic!("{k}: expected InvalidQuery, got {other:?}"),
            }
        }
        let long = "x".repeat(MAX_FILTER_BYTES + 1);
        assert!(AuditFilter::from_params([("tool", long.as_str())]).is_err());
    }

    /// A full page of checkpoints says that more follow: the page and the one more that tells.
    #[tokio::test]
    async fn a_full_page_of_checkpoints_says_more_follow() {
        let pool = sqlx::SqlitePool::connect("sqlite::memory:")
            .await
            .expect("sqlite");
        sqlx::raw_sql(include_str!("../../../migrations/sqlite/0002_audit.sql"))
            .execute(&pool)
            .await
            .expect("schema");
        for size in 1..=1002i64 {
            sqlx::query(
                "INSERT INTO audit_checkpoints (tenant, size, root_hash, key_name, note, created_ms) \
                 VALUES ('t', ?1, 'ab', 'k', 'n', 0)",
            )
            .bind(size)
            .execute(&pool)
            .await
            .expect("insert");
        }
        let db = Db::Sqlite(pool);
        let page = MAX_CHECKPOINT_PAGE;
        let rows = checkpoints(&db, "t", None, page + 1).await.expect("read");
        assert_eq!(rows.len(), page as usize + 1);
        assert_eq!(rows[0].size, 1002);
        let rows = checkpoints(&db, "t", None, u32::MAX).await.expect("read");
        assert_eq!(
            rows.len(),
            page as usize + 1,
            "never more than a page and one"
        );
    }

    #[test]
    fn json_line_splices_the_body() {
        let r = AuditRecord {
            id: 9,
            tenant: "t".into(),
            seq: 1,
            ts_ms: 0,
            body: r#"{"a":1.5,"seq":1}"#.into(),
            prev_hash: "00".into(),
            hash: "ab".into(),
        };
        assert_eq!(
            r.to_json_line(),
            r#"{"id":9,"hash":"ab","prev_hash":"00","a":1.5,"seq":1}"#
        );
    }

    /// The token filter can use the token indexes PostgreSQL keeps (SQLite's planner on the
    /// same partial indexes, before migration 0009 replaced them there by a lookup table): on
    /// a table the planner has statistics for (after `ANALYZE`), a token's events are looked up
    /// in `audit_events_jti` and `audit_events_delegated_root_jti`, not found by scanning the
    /// tenant's events.
    #[test]
    fn the_token_filter_is_answered_from_the_token_indexes() {
        let conn = rusqlite::Connection::open_in_memory().expect("sqlite");
        for migration in [
            include_str!("../../../migrations/sqlite/0002_audit.sql"),
            include_str!("../../../migrations/sqlite/0007_audit_token_index.sql"),
        ] {
            conn.execute_batch(migration).expect("migration");
        }
        // 20,000 events of one tenant from 500 root tokens, a third by delegated tokens.
        let tx = conn.unchecked_transaction().expect("tx");
        for i in 0..20_000i64 {
            let root = format!("root-{}", i % 500);
            let jti = if i % 3 == 0 {
                format!("child-{i}")
            } else {
                root.clone()
            };
            tx.execute(
                "INSERT INTO audit_events (tenant, seq, ts_ms, event, jti, root_jti, body, prev_hash, hash) \
                 VALUES ('acme', ?1, ?1, 'tool_call', ?2, ?3, '{}', '', '')",
                rusqlite::params![i + 1, jti, root],
            )
            .expect("insert");
        }
        tx.commit().expect("commit");
        conn.execute_batch("ANALYZE").expect("analyze");

        let f = AuditFilter::from_params([("tenant", "acme"), ("jti", "root-7")]).expect("f");
        let mut params = Vec::new();
        let sql = format!(
            "EXPLAIN QUERY PLAN SELECT id FROM audit_events{} ORDER BY id DESC LIMIT 101",
            f.where_sql(&mut params)
        );
        let mut stmt = conn.prepare(&sql).expect("prepare");
        let values: Vec<String> = params
            .iter()
            .map(|p| match p {
                Param::S(s) => s.clone(),
                Param::I(i) => i.to_string(),
            })
            .collect();
        let plan: Vec<String> = stmt
            .query_map(rusqlite::params_from_iter(values.iter()), |r| r.get(3))
            .expect("plan")
            .collect::<Result<_, _>>()
            .expect("rows");
        let plan = plan.join("\n");
        assert!(
            plan.contains("audit_events_jti") && plan.contains("audit_events_delegated_root_jti"),
            "the token filter scans instead of using the token indexes:\n{plan}"
        );

        // And it finds what `jti = v OR root_jti = v` finds.
        let count = |sql: &str| -> i64 {
            conn.query_row(sql, rusqlite::params_from_iter(values.iter()), |r| r.get(0))
                .expect("count")
        };
        let ours = count(&format!(
            "SELECT count(*) FROM audit_events{}",
            f.where_sql(&mut Vec::new())
        ));
        let plain = count(
            "SELECT count(*) FROM audit_events WHERE tenant = $1 AND (jti = $2 OR root_jti = $2)",
        );
        assert_eq!(
            ours, 40,
            "root-7 made 40 calls, 13 of them through delegated tokens"
        );
        assert_eq!(ours, plain);
    }
}
