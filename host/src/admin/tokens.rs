//! Token lifecycle and tenant inventory: `mint`, `revoke`, `revocations`, `tenants`.
//!
//! A minted token is returned once and never stored; its `jti` is recorded in the tenant's
//! audit chain, which is also how a per-tenant admin's revoke is checked to be within its
//! tenant. Each action's event is appended before the action takes effect (see the module
//! docs of `admin`). These handlers must never log or audit a token value.

use hyper::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AdminService;
use super::{AdminError, AdminRequest, Principal, audit_action, audit_failed, ok};
use crate::audit::{self, AuditFilter};
use crate::capability::{self, MintRequest};
use crate::http::{self, Body};
use crate::store::NewRevocation;

/// The mint body: IntentGate's fields plus the caveats this gateway enforces.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MintBody {
    subject: String,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    tools: Vec<String>,
    #[serde(default)]
    max_calls: Option<u64>,
    /// IntentGate: stamp a fresh step-up time that policies read as `capability.step_up_at`.
    #[serde(default)]
    step_up: bool,
    #[serde(default)]
    servers: Vec<String>,
    #[serde(default)]
    rate_per_min: Option<u64>,
    #[serde(default)]
    max_cents: Option<u64>,
    #[serde(default)]
    risk_max: Option<u64>,
    #[serde(default)]
    callees: Vec<String>,
    #[serde(default)]
    callee_zones: Vec<String>,
    #[serde(default)]
    with_memory_signing_key: bool,
    /// `resource_allow` globs over resource URIs.
    #[serde(default)]
    resources: Vec<String>,
    /// `prompt_allow` globs over prompt names.
    #[serde(default)]
    prompts: Vec<String>,
}

pub async fn mint(svc: &AdminService, req: &AdminRequest) -> Result<Response<Body>, AdminError> {
    let body: MintBody = req.json()?;
    let tenant = req
        .principal
        .one_tenant(req.tenant_named(body.tenant.as_deref())?)?;
    if body.with_memory_signing_key {
        return Err(AdminError::BadRequest(
            "with_memory_signing_key is not supported by this gateway".into(),
        ));
    }
    if let Some(iss) = &body.issuer
        && iss != "intentgate"
    {
        return Err(AdminError::BadRequest(
            "issuer must be \"intentgate\"".into(),
        ));
    }
    let now = audit::time::now_ms() / 1000;
    let request = MintRequest {
        subject: body.subject,
        tenant: Some(tenant.clone()),
        zone: body.zone,
        ttl_seconds: body.ttl_seconds,
        tools: body.tools,
        max_calls: body.max_calls,
        servers: body.servers,
        rate_per_min: body.rate_per_min,
        max_cents: body.max_cents,
        risk_max: body.risk_max,
        step_up_at: body.step_up.then_some(now as u64),
        callees: body.callees,
        callee_zones: body.callee_zones,
        resources: body.resources,
        prompts: body.prompts,
        ..MintRequest::default()
    };
    let minted = capability::mint(&svc.master_key, &request, now)
        .map_err(|e| AdminError::BadRequest(e.to_string()))?;
    let mut event = req.event("mint", &tenant);
    event.agent_id = minted.subject.clone();
    event.jti = minted.jti.clone();
    event.root_jti = minted.root_jti.clone();
    event.tool = request.tools.join(",");
    // Recorded before the token leaves the gateway: no token exists without its event.
    audit_action(svc, event).await?;
    if let Err(e) = svc.store.ensure_tenant(&tenant).await {
        let e = AdminError::from(e);
        audit_failed(svc, req, "mint", &tenant, &e.to_string()).await;
        return Err(e);
    }
    // The only proof of a step-up: a `step_up` caveat alone is one its holder could have
    // appended (`proxy/step_up.rs`). Recorded before the token leaves the gateway.
    if let Some(at) = request.step_up_at {
        let at = i64::try_from(at).unwrap_or(i64::MAX);
        if let Err(e) = svc
            .store
            .record_step_up(&tenant, &minted.root_jti, at)
            .await
        {
            let e = AdminError::from(e);
            audit_failed(svc, req, "mint", &tenant, &e.to_string()).await;
            return Err(e);
        }
    }
    Ok(ok(json!({
        "token": minted.token,
        "jti": minted.jti,
        "subject": minted.subject,
        "tenant": tenant,
        "expires_at": minted.expires_at.map(|s| audit::time::format_rfc3339_ms(s * 1000)),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    jti: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    tenant: Option<String>,
}

/// Whether `jti` is a token id this gateway could have minted or recorded: 1-128 visible ASCII
/// characters (what the store accepts), so a bad one is a 400 naming it, never a store error.
fn check_jti(jti: &str) -> Result<(), AdminError> {
    if jti.is_empty() || jti.len() > 128 || !jti.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(AdminError::BadRequest(
            "jti must be 1-128 visible ASCII characters".into(),
        ));
    }
    Ok(())
}

pub async fn revoke(svc: &AdminService, req: &AdminRequest) -> Result<Response<Body>, AdminError> {
    let body: RevokeBody = req.json()?;
    let jti = body.jti.trim();
    check_jti(jti)?;
    if body.reason.len() > 1024 {
        return Err(AdminError::BadRequest(
            "reason is longer than 1024 bytes".into(),
        ));
    }
    if body
        .reason
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(AdminError::BadRequest(
            "reason must not contain control characters".into(),
        ));
    }
    let named = req.tenant_named(body.tenant.as_deref())?;
    let tenant = match &req.principal {
        Principal::Superadmin if named.is_none() => {
            // The tenant whose chain records the token's mint: its revocation is that tenant's
            // business (its chain and revocation list say so), not `default`'s. A token this
            // gateway never minted (an original gateway's) stays `default`'s, as before.
            let filter = AuditFilter {
                jti: Some(jti.to_owned()),
                ..AuditFilter::default()
            };
            let page = audit::query::list(svc.pipeline.audit().db(), &filter, None, 1).await?;
            page.items
                .first()
                .map(|r| r.tenant.clone())
                .filter(|t| crate::config::valid_tenant_name(t))
                .unwrap_or_else(|| "default".to_owned())
        }
        Principal::Superadmin => req.principal.one_tenant(named)?,
        p @ Principal::TenantAdmin(_) => {
            let own = p.one_tenant(named)?;
            // A tenant admin may only revoke tokens minted in its tenant: the mint is in
            // that tenant's audit chain.
            let filter = AuditFilter {
                tenant: Some(own.clone()),
                jti: Some(jti.to_owned()),
                ..AuditFilter::default()
            };
            let page = audit::query::list(svc.pipeline.audit().db(), &filter, None, 1).await?;
            if page.items.is_empty() {
                return Err(AdminError::Forbidden(format!(
                    "no token with this jti was minted in tenant {own:?}"
                )));
            }
            own
        }
    };
    // The event first: a revocation never takes effect unrecorded, and a retry after a
    // refused event is recorded (the store answers an existing revocation idempotently).
    let mut event = req.event("revoke", &tenant);
    event.jti = jti.to_owned();
    event.reason = body.reason.clone();
    audit_action(svc, event).await?;
    let revoked = svc
        .store
        .revoke(NewRevocation {
            tenant: tenant.clone(),
            jti: jti.to_owned(),
            reason: body.reason.clone(),
            revoked_by: req.principal.label(),
        })
        .await;
    if let Err(e) = revoked {
        let e = AdminError::from(e);
        audit_failed(svc, req, "revoke", &tenant, &e.to_string()).await;
        return Err(e);
    }
    // Take effect on this replica now, not at the next feed poll.
    svc.revocations.extend(std::iter::once(jti.to_owned()));
    // Wake every other replica's feed (PostgreSQL). If the notification is lost, their
    // fallback poll reads the revocation within a third of the staleness limit.
    if let crate::store::Db::Postgres(pool) = svc.store.db() {
        let notified = sqlx::query("SELECT pg_notify($1, '')")
            .bind(crate::store::REVOCATIONS_CHANNEL)
            .execute(&pool)
            .await;
        if let Err(e) = notified {
            tracing::warn!("revoke: could not notify the other replicas: {e}");
        }
    }
    Ok(http::status(StatusCode::NO_CONTENT))
}

pub async fn revocations(
    svc: &AdminService,
    req: &AdminRequest,
) -> Result<Response<Body>, AdminError> {
    let scope = req.principal.scope(req.param("tenant"))?;
    let limit = match req.param("limit") {
        None => 100,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| AdminError::BadRequest("limit must be 1-1000".into()))?,
    };
    // Keyset paging: the cursor is the feed position of the last row of the previous page.
    let before = match req.param("cursor") {
        None => i64::MAX,
        Some(c) => c
            .parse::<i64>()
            .ok()
            .filter(|c| *c > 0)
            .ok_or_else(|| AdminError::BadRequest("cursor is not one this API gave".into()))?,
    };
    let mut rows = svc
        .store
        .list_revocations_before(scope.as_deref(), before, limit + 1)
        .await?;
    let next_cursor = (rows.len() > limit as usize).then(|| {
        rows.truncate(limit as usize);
        rows.last().map(|r| r.seq.to_string())
    });
    let items: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            json!({
                "jti": r.jti,
                "tenant": r.tenant,
                "reason": r.reason,
                "revoked_by": r.revoked_by,
                "revoked_at": audit::time::format_rfc3339_ms(r.revoked_at * 1000),
            })
        })
        .collect();
    Ok(ok(
        json!({"items": items, "next_cursor": next_cursor.flatten()}),
    ))
}

pub async fn tenants(svc: &AdminService, req: &AdminRequest) -> Result<Response<Body>, AdminError> {
    let mut names: Vec<String> = svc
        .store
        .list_tenants()
        .await?
        .into_iter()
        .map(|t| t.name)
        .collect();
    names.extend(svc.settings.admin_tenants.iter().cloned());
    names.push("default".into());
    names.sort();
    names.dedup();
    let now = crate::audit::time::now_ms();
    let mut visible = Vec::new();
    for name in names.into_iter().filter(|n| match &req.principal {
        Principal::Superadmin => true,
        Principal::TenantAdmin(own) => own == n,
    }) {
        // The console's badge (the original's `Tenant.pending_approvals`).
        let pending =
            crate::approvals::query::pending_count(svc.pipeline.audit().db(), &name, now).await?;
        visible.push(json!({"name": name, "pending_approvals": pending}));
    }
    Ok(ok(Value::Array(visible)))
}
