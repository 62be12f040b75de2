//! Integrations of the admin API: outbox destinations and their health.
//!
//! - `GET /v1/admin/integrations`: per destination, last success, last error, backlog, oldest
//!   undelivered, dead letters (the original's `IntegrationStatus` fields kept: `name`,
//!   `configured`, `endpoint`, `last_flush_ts`, `events_flushed`, `events_dropped`,
//!   `last_error`).
//! - `GET/POST /v1/admin/integrations/destinations`, `DELETE …/destinations/{name}`:
//!   destinations of a tenant (`tenant`) or of every tenant (`"global": true`, superadmin
//!   only). The secret is write-only: a replacement without one keeps the stored one.
//! - `GET /v1/admin/integrations/dead-letters`, `POST /v1/admin/integrations/redrive`.
//!
//! A tenant admin sees its own destinations and the global ones, with the counts of its own
//! tenant only, and changes only its own. Every change is recorded in the audit chain before it
//! is applied. These handlers must never return a secret, and never widen a query beyond the
//! caller's scope.

use std::collections::BTreeMap;

use hyper::{Method, Response};
use serde_json::{Value, json};

use super::AdminService;
use super::{AdminError, AdminRequest, Principal, audit_action, audit_failed, ok};
use crate::audit::time::format_rfc3339_ms;
use crate::http::Body;
use crate::outbox::store::{self, LaneStatus};
use crate::outbox::{Destination, DestinationSpec, Kind, OutboxError, Source};

impl From<OutboxError> for AdminError {
    fn from(e: OutboxError) -> Self {
        match e {
            OutboxError::Invalid(m) => Self::BadRequest(m),
            other => {
                tracing::error!(error = %other, "admin: outbox error");
                Self::Unavailable("outbox store unavailable".into())
            }
        }
    }
}

/// Routes `/v1/admin/integrations…`.
pub async fn handle(svc: &AdminService, req: &AdminRequest) -> Result<Response<Body>, AdminError> {
    let path = req.path.trim_end_matches('/');
    const DEST: &str = "/v1/admin/integrations/destinations";
    match (&req.method, path) {
        (&Method::GET, "/v1/admin/integrations") => status(svc, req).await,
        (&Method::GET, DEST) => list(svc, req).await,
        (&Method::POST, DEST) => put(svc, req).await,
        (&Method::DELETE, p) if destination_named(p).is_some() => {
            delete(svc, req, destination_named(p).unwrap_or_default()).await
        }
        (&Method::GET, "/v1/admin/integrations/dead-letters") => dead_letters(svc, req).await,
        (&Method::POST, "/v1/admin/integrations/redrive") => redrive(svc, req).await,
        (
            _,
            "/v1/admin/integrations"
            | "/v1/admin/integrations/dead-letters"
            | "/v1/admin/integrations/redrive",
        )
        | (_, DEST) => Err(AdminError::MethodNotAllowed),
        _ => Err(AdminError::NotFound),
    }
}

/// The name in `/v1/admin/integrations/destinations/{name}` (`None` for any other path: never a
/// byte index into a path that may hold any UTF-8).
fn destination_named(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/admin/integrations/destinations/")
        .filter(|name| !name.is_empty())
}

fn ts(ms: i64) -> Value {
    if ms > 0 {
        format_rfc3339_ms(ms).into()
    } else {
        Value::Null
    }
}

/// A destination's configuration, without its secret.
fn describe(d: &Destination) -> Value {
    json!({
        "id": d.id.as_ref(),
        "name": d.spec.name,
        "kind": d.kind.as_str(),
        "tenant": d.tenant,
        "global": d.tenant.is_none(),
        "source": match d.source { Source::Env => "env", Source::Admin => "admin" },
        "endpoint": d.shown_endpoint(),
        "secret_set": d.spec.secret.as_deref().is_some_and(|s| !s.is_empty()),
        "events": d.spec.events,
        "decisions": d.spec.decisions,
        "min_severity": d.spec.min_severity,
        "settings": shown_settings(&d.spec.settings),
        "formatter": d.spec.formatter.clone().unwrap_or_else(|| "builtin".into()),
    })
}

/// A destination's settings as shown: a URL among them (Sentinel's `token_url`, say) without
/// its userinfo and query, which may carry a credential.
fn shown_settings(settings: &serde_json::Map<String, Value>) -> Value {
    let shown = settings.iter().map(|(k, v)| {
        let v = match v.as_str().map(str::parse::<hyper::Uri>) {
            Some(Ok(u)) if matches!(u.scheme_str(), Some("http" | "https")) => {
                Value::from(crate::config::redact_url(&u))
            }
            _ => v.clone(),
        };
        (k.clone(), v)
    });
    Value::Object(shown.collect())
}

/// Whether the caller (scoped to `scope`, `None` = every tenant) sees `d`.
fn visible(d: &Destination, scope: Option<&str>) -> bool {
    match scope {
        None => true,
        Some(t) => d.serves(t),
    }
}

/// `GET /v1/admin/integrations`.
async fn status(svc: &AdminService, req: &AdminRequest) -> Result<Response<Body>, AdminError> {
    let scope = req.principal.scope(req.param("tenant"))?;
    let lanes = store::lane_status(svc.outbox.db(), scope.as_deref()).await?;
    let mut by_dest: BTreeMap<&str, Vec<&LaneStatus>> = BTreeMap::new();
    for l in &lanes {
        by_dest.entry(l.destination.as_str()).or_default().push(l);
    }
    let live = svc.outbox.live();
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for l in &live.list {
        if !visible(&l.dest, scope.as_deref()) {
            continue;
        }
        seen.insert(l.dest.id.to_string());
        let mut v = describe(&l.dest);
        health(
            &mut v,
            by_dest.get(l.dest.id.as_ref()).map_or(&[][..], |v| v),
            l.formatter.as_ref().err(),
        );
        v["configured"] = true.into();
        out.push(v);
    }
    // Stored destinations that cannot be used: listed, so their operator sees why.
    for b in &live.broken {
        let serves = match (scope.as_deref(), b.tenant.as_deref()) {
            (None, _) | (_, None) => true,
            (Some(s), Some(t)) => s == t,
        };
        if !serves {
            continue;
        }
        seen.insert(b.id.clone());
        let mut v = json!({
            "id": b.id, "name": b.name, "kind": b.kind, "tenant": b.tenant,
            "global": b.tenant.is_none(), "source": "admin", "configured": true,
            "usable": false,
        });
        health(
            &mut v,
            by_dest.get(b.id.as_str()).map_or(&[][..], |v| v),
            Some(&b.error),
        );
        out.push(v);
    }
    // Lanes of destinations no longer configured still hold their rows.
    for (id, lanes) in &by_dest {
        if seen.contains(*id) {
            continue;
        }
        let mut v = json!({"id": id, "name": id, "configured": false});
        health(&mut v, lanes, None);
        out.push(v);
    }
    Ok(ok(Value::Array(out)))
}

fn health(v: &mut Value, lanes: &[&LaneStatus], formatter_error: Option<&String>) {
    let delivered: i64 = lanes.iter().map(|l| l.delivered).sum();
    let backlog: i64 = lanes.iter().map(|l| l.backlog).sum();
    let dead: i64 = lanes.iter().map(|l| l.dead).sum();
    let last_success = lanes.iter().map(|l| l.last_success_ms).max().unwrap_or(0);
    let oldest = lanes.iter().filter_map(|l| l.oldest_ms).min().unwrap_or(0);
    let last_error = lanes
        .iter()
        .filter(|l| l.last_error_ms > 0)
        .max_by_key(|l| l.last_error_ms);
    let failing = formatter_error.is_some() || lanes.iter().any(|l| l.failures > 0);
    let error_text = formatter_error
        .cloned()
        .or_else(|| last_error.map(|l| l.last_error.clone()));
    v["failing"] = failing.into();
    v["backlog"] = backlog.into();
    v["oldest_undelivered_ts"] = ts(oldest);
    v["dead_letters"] = dead.into();
    v["delivered"] = delivered.into();
    v["events_flushed"] = delivered.into();
    v["events_dropped"] = 0.into();
    v["last_success_ts"] = ts(last_success);
    v["last_flush_ts"] = ts(last_success);
    v["last_error"] = error_text.map_or(Value::Null, Value::from);
    v["last_error_ts"] = ts(last_error.map_or(0, |l| l.last_error_ms));
    v["tenants"] = lanes
        .iter()
        .map(|l| {
            json!({
                "tenant": l.tenant,
                "backlog": l.backlog,
                "dead_letters": l.dead,
                "delivered": l.delivered,
                "failures": l.failures,
                "next_attempt_ts": ts(l.next_ms),
            })
        })
        .collect::<Vec<_>>()
        .into();
}

/// `GET /v1/admin/integrations/destinations`.
async fn list(svc: &AdminService, req: &AdminRequest) -> Result<Response<Body>, AdminError> {
    let scope = req.principal.scope(req.param("tenant"))?;
    let live = svc.outbox.live();
    let items: Vec<Value> = live
        .list
        .iter()
        .filter(|l| visible(&l.dest, scope.as_deref()))
        .map(|l| describe(&l.dest))
        .collect();
    Ok(ok(json!({ "items": items })))
}

/// The tenant a change applies to: `None` for a global destination (superadmin only).
fn target(
    req: &AdminRequest,
    tenant: Option<&str>,
    global: bool,
) -> Result<Option<String>, AdminError> {
    if global {
        if req.principal != Principal::Superadmin {
            return Err(AdminError::Forbidden(
                "only the superadmin manages global destinations".into(),
            ));
        }
        if tenant.is_some() {
            return Err(AdminError::BadRequest(
                "a global destination names no tenant".into(),
            ));
        }
        return Ok(None);
    }
    Ok(Some(req.principal.one_tenant(req.tenant_named(tenant)?)?))
}

/// `POST /v1/admin/integrations/destinations`: creates or replaces one destination.
async fn put(svc: &AdminService, req: &AdminRequest) -> Result<Response<Body>, AdminError> {
    let mut body: serde_json::Map<String, Value> = req.json()?;
    let tenant = match body.remove("tenant") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(t),
        Some(_) => return Err(AdminError::BadRequest("tenant must be a string".into())),
    };
    let global = match body.remove("global") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err(AdminError::BadRequest("global must be a boolean".into())),
    };
    let spec: DestinationSpec = serde_json::from_value(Value::Object(body))
        .map_err(|e| AdminError::BadRequest(format!("invalid destination: {e}")))?;
    let tenant = target(req, tenant.as_deref(), global)?;
    // A replacement without a secret keeps the stored one (checked before it is audited), as
    // long as it sends it where the stored destination did. Merged before the destination is
    // validated: most kinds need their secret.
    let mut spec = spec;
    if spec.secret.as_deref().is_none_or(str::is_empty) {
        let id = match &tenant {
            Some(t) => format!("{t}/{}", spec.name),
            None => format!("*/{}", spec.name),
        };
        let stored = store::stored_secret(svc.outbox.db(), svc.outbox.seal(), &id, &spec);
        if let Some((kept, same)) = stored.await? {
            if !same {
                return Err(AdminError::BadRequest(
                    "secret: this destination has a secret; a replacement that changes its kind, url, formatter or settings must send the secret again".into(),
                ));
            }
            spec.secret = Some(kept);
        }
    }
    let dest = Destination::new(spec, tenant.clone(), Source::Admin)?;
    if let Some(s) = dest.spec.secret.as_deref()
        && dest.kind == Kind::Webhook
        && !crate::outbox::sign::valid_secret(s)
    {
        return Err(AdminError::BadRequest(
            "secret: a whsec_ secret must be followed by base64".into(),
        ));
    }
    if !svc.outbox.config().allow_private_networks
        && let Some(why) = crate::outbox::address::refused_destination(&dest)
    {
        return Err(AdminError::BadRequest(format!("url: {why}")));
    }
    if let Some(digest) = dest.spec.formatter.as_deref().filter(|d| !d.is_empty()) {
        let registry = svc.pipeline.registry();
        let usable = match &tenant {
            Some(t) => registry.may_use_component(t, digest),
            None => registry.component_bytes(digest).is_some(),
        };
        if !usable {
            return Err(AdminError::BadRequest(format!(
                "formatter {digest} is not an uploaded component this tenant may use"
            )));
        }
    }
    let audit_tenant = super::chain_of(tenant.as_deref());
    let mut event = req.event("destination.put", &audit_tenant);
    event.reason = json!({"id": dest.id.as_ref(), "kind": dest.kind.as_str(), "endpoint": dest.shown_endpoint(), "global": tenant.is_none()})
        .to_string();
    audit_action(svc, event).await?;
    let applied = async {
        store::save_destination(
            svc.outbox.db(),
            svc.outbox.seal(),
            &dest.id,
            tenant.as_deref(),
            &dest.spec,
        )
        .await?;
        svc.outbox.reload(true).await
    }
    .await;
    if let Err(e) = applied {
        audit_failed(svc, req, "destination.put", &audit_tenant, &e.to_string()).await;
        return Err(e.into());
    }
    Ok(ok(describe(&dest)))
}

/// `DELETE /v1/admin/integrations/destinations/{name}` (`?tenant=` or `?global=true`).
async fn delete(
    svc: &AdminService,
    req: &AdminRequest,
    name: &str,
) -> Result<Response<Body>, AdminError> {
    let global = req.param("global") == Some("true");
    let tenant = target(req, None, global)?;
    let id = match &tenant {
        Some(t) => format!("{t}/{name}"),
        None => format!("*/{name}"),
    };
    let live = svc.outbox.live();
    if !live.by_id.contains_key(id.as_str()) && !live.broken.iter().any(|b| b.id == id) {
        return Err(AdminError::NotFound);
    }
    let audit_tenant = super::chain_of(tenant.as_deref());
    let mut event = req.event("destination.delete", &audit_tenant);
    event.reason = json!({"id": id}).to_string();
    audit_action(svc, event).await?;
    let applied = async {
        store::delete_destination(svc.outbox.db(), &id).await?;
        svc.outbox.reload(true).await
    }
    .await;
    if let Err(e) = applied {
        audit_failed(
            svc,
            req,
            "destination.delete",
            &audit_tenant,
            &e.to_string(),
        )
        .await;
        return Err(e.into());
    }
    Ok(ok(json!({"deleted": id})))
}

/// `GET /v1/admin/integrations/dead-letters` (`destination`, `tenant`, `after`, `limit`).
async fn dead_letters(
    svc: &AdminService,
    req: &AdminRequest,
) -> Result<Response<Body>, AdminError> {
    let scope = req.principal.scope(req.param("tenant"))?;
    let limit = match req.param("limit") {
        None => 100,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| AdminError::BadRequest("limit must be within 1..=1000".into()))?,
    };
    let after = match req.param("after") {
        None => 0,
        Some(v) => v
            .parse::<i64>()
            .map_err(|_| AdminError::BadRequest("after must be an integer".into()))?,
    };
    let rows = store::list_dead(
        svc.outbox.db(),
        scope.as_deref(),
        req.param("destination"),
        after,
        limit,
    )
    .await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "destination": r.destination,
                "tenant": r.tenant,
                "event_id": r.event_id,
                "created_ts": ts(r.created_ms),
                "dead_ts": ts(r.dead_ms),
                "attempts": r.attempts,
                "last_error": r.last_error,
            })
        })
        .collect();
    Ok(ok(json!({"items": items, "next_after": next})))
}

/// `POST /v1/admin/integrations/redrive` `{destination, tenant?}`: puts dead letters back.
async fn redrive(svc: &AdminService, req: &AdminRequest) -> Result<Response<Body>, AdminError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        destination: String,
        #[serde(default)]
        tenant: Option<String>,
    }
    let body: Body = req.json()?;
    let scope = req
        .principal
        .scope(req.tenant_named(body.tenant.as_deref())?)?;
    let audit_tenant = super::chain_of(scope.as_deref());
    let mut event = req.event("outbox.redrive", &audit_tenant);
    event.reason = json!({"destination": body.destination, "tenant": scope}).to_string();
    audit_action(svc, event).await?;
    let n = match store::redrive(svc.outbox.db(), &body.destination, scope.as_deref()).await {
        Ok(n) => n,
        Err(e) => {
            audit_failed(svc, req, "outbox.redrive", &audit_tenant, &e.to_string()).await;
            return Err(e.into());
        }
    };
    svc.pipeline.audit().outbox_router().ring();
    Ok(ok(json!({"redriven": n})))
}

#[cfg(test)]
mod tests {
    use super::destination_named;

    /// A destination's name is what follows `destinations/`; any other path (a longer word, a
    /// multi-byte character right after the prefix) names none and panics nothing.
    #[test]
    fn only_a_destinations_own_path_names_one() {
        assert_eq!(
            destination_named("/v1/admin/integrations/destinations/siem"),
            Some("siem")
        );
        assert_eq!(
            destination_named("/v1/admin/integrations/destinationsXsiem"),
            None
        );
        assert_eq!(
            destination_named("/v1/admin/integrations/destinationsé"),
            None
        );
        assert_eq!(
            destination_named("/v1/admin/integrations/destinations/"),
            None
        );
    }
}
