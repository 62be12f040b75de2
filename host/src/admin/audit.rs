//! Audit endpoints of the admin API: `GET /v1/admin/audit` (filtered, keyset-paged list),
//! `/audit/verify` (chain walk, always 200), `/audit/export` (streamed CSV or NDJSON),
//! `/audit/checkpoints` (signed checkpoint history) and `/audit/public-key` (the log key that
//! signs them).
//!
//! Tenant scoping comes from [`Principal::scope`](super::Principal::scope): a per-tenant admin
//! sees only its own tenant (naming another is 403); the superadmin may list and export across
//! tenants, and verifies one tenant at a time (`default` when none is named).
//! These handlers must never widen a query beyond the caller's scope, never buffer a whole
//! export, and never answer an export that was not itself recorded in the audit chain.

use http_body_util::BodyExt as _;
use hyper::header::{CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{Value, json};

use super::AdminService;
use super::{AdminError, AdminRequest, audit_action, ok};
use crate::audit::export::{self, Format};
use crate::audit::{self, AuditError, AuditFilter, checkpoint, query, time, verify};
use crate::http::{self, Body};

/// Default and largest page of `GET /v1/admin/audit`.
const DEFAULT_LIMIT: u32 = 100;

/// The filter from the query string, with the tenant forced to the caller's scope.
fn scoped_filter(req: &AdminRequest) -> Result<AuditFilter, AdminError> {
    let tenant = req.principal.chain_scope(req.param("tenant"))?;
    let mut filter =
        AuditFilter::from_params(req.query.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
    filter.tenant = tenant;
    Ok(filter)
}

/// `limit` (1..=1000, default 100): anything else is a 400 naming it.
fn page_limit(req: &AdminRequest) -> Result<u32, AdminError> {
    match req.param("limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| AdminError::BadRequest("limit must be within 1..=1000".into())),
    }
}

fn bad_checkpoint(e: AuditError) -> AdminError {
    match e {
        AuditError::InvalidCheckpoint(m) | AuditError::Key(m) => {
            AdminError::BadRequest(format!("checkpoint: {m}"))
        }
        other => other.into(),
    }
}

/// `GET /v1/admin/audit`: `{items: [event + id, hash, prev_hash], next_cursor}`, newest first.
/// Query: the filters of [`AuditFilter::from_params`], `limit` (1..=1000, default 100), `cursor`.
pub async fn list(svc: &AdminService, req: &AdminRequest) -> Result<Response<Body>, AdminError> {
    let filter = scoped_filter(req)?;
    let limit = page_limit(req)?;
    let page = query::list(
        svc.pipeline.audit().db(),
        &filter,
        req.param("cursor"),
        limit,
    )
    .await?;
    durable(svc).await?;
    // Spliced, not re-encoded: each item carries its stored canonical bytes unchanged.
    let mut body = String::from("{\"items\":[");
    for (i, rec) in page.items.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&rec.to_json_line());
    }
    body.push_str("],\"next_cursor\":");
    body.push_str(&Value::from(page.next_cursor).to_string());
    body.push('}');
    Ok(http::json_bytes(StatusCode::OK, body.into_bytes()))
}

/// Waits until what the request read is durable (SQLite makes a commit visible a moment
/// before its log is synced): evidence handed out is never taken back by a power cut.
async fn durable(svc: &AdminService) -> Result<(), AdminError> {
    let log = svc.pipeline.audit();
    log.outbox_router().durable().covering().await.map_err(|e| {
        tracing::error!(error = %e, "admin: the audit log is not durable");
        AdminError::Unavailable("audit log unavailable".into())
    })
}

/// `GET /v1/admin/audit/verify?tenant=&checkpoint=`: the [`verify::VerifyReport`], always 200
/// when the walk ran. `checkpoint` is a signed note kept outside the database (URL-encoded).
pub async fn verify(svc: &AdminService, req: &AdminRequest) -> Result<Response<Body>, AdminError> {
    let tenant = req.principal.one_chain(req.param("tenant"))?;
    let log = svc.pipeline.audit();
    let report = verify::verify_chain(log.db(), &tenant, &log.verifier(), req.param("checkpoint"))
        .await
        .map_err(bad_checkpoint)?;
    Ok(ok(serde_json::to_value(&report).unwrap_or(Value::Null)))
}

/// `GET /v1/admin/audit/export?format=csv|json&<filters>`: streamed attachment.
pub async fn export(svc: &AdminService, req: &AdminRequest) -> Result<Response<Body>, AdminError> {
    let filter = scoped_filter(req)?;
    let format = Format::from_param(req.param("format"))?;
    let now = time::now_ms();
    // The export itself is an audited admin action (evidence leaving the gateway).
    let chain = super::chain_of(filter.tenant.as_deref());
    let mut event = req.event("audit_export", &chain);
    event.reason = format!(
        "format={} scope={}",
        format.extension(),
        filter.tenant.as_deref().unwrap_or("*")
    );
    audit_action(svc, event).await?;

    let log = svc.pipeline.audit();
    let durable = log.outbox_router().durable().clone();
    let body = export::stream_durable(log.db().clone(), filter.clone(), format, durable)
        .map_err(std::io::Error::other)
        .boxed();
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let disposition = export::content_disposition(filter.tenant.as_deref(), now, format);
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// `GET /v1/admin/audit/checkpoints?tenant=&limit=&cursor=`: signed checkpoints, newest first,
/// `{tenant, origin, items: [{size, root_hash, key_name, created_at, checkpoint}], next_cursor}`.
/// With `format=note`, the newest checkpoint's note as `text/plain` (to keep outside).
pub async fn checkpoints(
    svc: &AdminService,
    req: &AdminRequest,
) -> Result<Response<Body>, AdminError> {
    let tenant = req.principal.one_chain(req.param("tenant"))?;
    let log = svc.pipeline.audit();
    if req.param("format") == Some("note") {
        let Some(row) = query::latest_checkpoint(log.db(), &tenant).await? else {
            return Err(AdminError::NotFound);
        };
        // A note kept outside must not sign what a power cut could still take back.
        durable(svc).await?;
        let mut resp = Response::new(http::full(row.note));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return Ok(resp);
    }
    let limit = page_limit(req)?;
    let before = match req.param("cursor") {
        None => None,
        Some(c) => Some(
            c.parse::<i64>()
                .map_err(|_| AdminError::BadRequest("cursor is not one this API gave".into()))?,
        ),
    };
    let rows = query::checkpoints(log.db(), &tenant, before, limit + 1).await?;
    durable(svc).await?;
    let more = rows.len() > limit as usize;
    let items: Vec<Value> = rows
        .iter()
        .take(limit as usize)
        .map(|r| {
            json!({
                "size": r.size,
                "root_hash": r.root_hash,
                "key_name": r.key_name,
                "created_at": time::format_rfc3339_ms(r.created_ms),
                "checkpoint": r.note,
            })
        })
        .collect();
    let next_cursor = more
        .then(|| rows.get(limit as usize - 1).map(|r| r.size.to_string()))
        .flatten();
    Ok(ok(json!({
        "tenant": tenant,
        "origin": checkpoint::origin_for(log.key().name(), &tenant),
        "items": items,
        "next_cursor": next_cursor,
    })))
}

/// `GET /v1/admin/audit/public-key`: the key that signs checkpoints, as a signed-note verifier
/// key (what `intentgate audit verify --public-key` takes) and as raw base64.
pub async fn public_key(
    svc: &AdminService,
    req: &AdminRequest,
) -> Result<Response<Body>, AdminError> {
    let log = svc.pipeline.audit();
    let v = log.verifier();
    let tenant = req.principal.chain_scope(req.param("tenant"))?;
    Ok(ok(json!({
        "algorithm": "ed25519",
        "name": v.name(),
        "key_id": v.key_id().iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "public_key": v.public_key_base64(),
        "verifier_key": v.to_string(),
        "origin": tenant.map(|t| checkpoint::origin_for(v.name(), &t)),
        "schema_version": audit::SCHEMA_VERSION,
    })))
}
