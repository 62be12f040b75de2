//! The admin HTTP API under `/v1/admin/`: authentication (superadmin or per-tenant admin,
//! compared in constant time), tenant scoping, routing, and the `{"error": ...}` error shape.
//!
//! Every handler receives an [`AdminRequest`] whose [`Principal`] decides which tenants it may
//! touch; a per-tenant admin naming another tenant gets 403. A route that names a tenant takes
//! it from the body or the `?tenant=` query ([`AdminRequest::tenant_named`]): both given and
//! different is 400, never a silent pick of one.
//!
//! Audit comes first: every state change is recorded in the audit chain BEFORE it is applied
//! (an event that a change was made; when applying it then fails, a `….failed` event follows).
//! An action whose event the audit log refuses is not applied and the caller gets 503, so a
//! change can never be live without its event. A retry after the store recovers applies and
//! audits it. This module must never answer a request before authenticating it, never log a
//! token, and never apply an admin action before its event is committed.

mod approvals;
#[path = "audit.rs"]
mod audit_api;
mod integrations;
mod tokens;

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::secrets::BearerSecret;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use crate::audit::{self, AuditEvent};
use crate::config::valid_tenant_name;
use crate::http::{self, Body};

/// Errors of the admin API, mapped once to a status and `{"error": ...}`.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid admin token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body too large")]
    TooLarge,
    #[error("{0}")]
    Unavailable(String),
}

impl AdminError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn into_response(self) -> Response<Body> {
        http::json(self.status(), &json!({"error": self.to_string()}))
    }
}

impl From<crate::store::StoreError> for AdminError {
    /// A value the store refused is the caller's mistake (400 naming the field), a row it
    /// contradicts is 409; only a store that failed is 503 (and logged).
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::InvalidInput { .. } => Self::BadRequest(e.to_string()),
            StoreError::Conflict(m) => Self::Conflict(m),
            other => {
                tracing::error!(error = %other, "admin: store error");
                Self::Unavailable("store unavailable".into())
            }
        }
    }
}

impl From<audit::AuditError> for AdminError {
    fn from(e: audit::AuditError) -> Self {
        match e {
            audit::AuditError::InvalidQuery(m) => Self::BadRequest(m),
            other => {
                tracing::error!(error = %other, "admin: audit error");
                Self::Unavailable("audit log unavailable".into())
            }
        }
    }
}

/// Who is calling the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Superadmin,
    TenantAdmin(String),
}

impl Principal {
    /// The tenant an operation applies to: a tenant admin is pinned to its tenant (naming
    /// another is 403); the superadmin gets what it named, or `None` for all tenants.
    pub fn scope(&self, requested: Option<&str>) -> Result<Option<String>, AdminError> {
        if let Some(t) = requested
            && !valid_tenant_name(t)
        {
            return Err(AdminError::BadRequest(format!("invalid tenant name {t:?}")));
        }
        match (self, requested) {
            (Self::Superadmin, r) => Ok(r.map(str::to_owned)),
            (Self::TenantAdmin(own), None) => Ok(Some(own.clone())),
            (Self::TenantAdmin(own), Some(r)) if r == own => Ok(Some(own.clone())),
            (Self::TenantAdmin(own), Some(r)) => Err(AdminError::Forbidden(format!(
                "admin of tenant {own:?} cannot act on tenant {r:?}"
            ))),
        }
    }

    /// Like [`Self::scope`], for the audit read API: the superadmin may also name
    /// [`audit::GLOBAL_CHAIN`], where its actions on every tenant are recorded.
    pub fn chain_scope(&self, requested: Option<&str>) -> Result<Option<String>, AdminError> {
        match (self, requested) {
            (Self::Superadmin, Some(audit::GLOBAL_CHAIN)) => Ok(Some(audit::GLOBAL_CHAIN.into())),
            _ => self.scope(requested),
        }
    }

    /// Like [`Self::chain_scope`] but always one chain (`default` for the superadmin).
    pub fn one_chain(&self, requested: Option<&str>) -> Result<String, AdminError> {
        Ok(self
            .chain_scope(requested)?
            .unwrap_or_else(|| "default".to_owned()))
    }

    /// Like [`Self::scope`] but always one tenant (`default` for the superadmin).
    pub fn one_tenant(&self, requested: Option<&str>) -> Result<String, AdminError> {
        Ok(self
            .scope(requested)?
            .unwrap_or_else(|| "default".to_owned()))
    }

    /// How the audit log names this principal (`decided_by`).
    pub fn label(&self) -> String {
        match self {
            Self::Superadmin => "superadmin".into(),
            Self::TenantAdmin(t) => format!("tenant-admin:{t}"),
        }
    }
}

/// The chain an action on `tenant` is recorded in: the tenant's own, or
/// [`audit::GLOBAL_CHAIN`] for an action on every tenant (`None`).
pub fn chain_of(tenant: Option<&str>) -> String {
    tenant.unwrap_or(audit::GLOBAL_CHAIN).to_owned()
}

/// The admin credentials.
pub struct AdminAuth {
    superadmin: BearerSecret,
    tenants: Vec<(String, BearerSecret)>,
}

impl AdminAuth {
    pub fn new(superadmin: String, tenants: Vec<(String, String)>) -> Self {
        Self {
            superadmin: BearerSecret::new(&superadmin),
            tenants: tenants
                .into_iter()
                .map(|(t, k)| (t, BearerSecret::new(&k)))
                .collect(),
        }
    }

    /// Compares the presented token with every configured one in constant time (no early exit,
    /// so timing does not reveal which entry matched or how much of one).
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<Principal> {
        let presented = http::bearer(headers)?;
        let mut found = None;
        if self.superadmin.matches(presented) {
            found = Some(Principal::Superadmin);
        }
        for (tenant, key) in &self.tenants {
            if key.matches(presented) && found.is_none() {
                found = Some(Principal::TenantAdmin(tenant.clone()));
            }
        }
        found
    }
}

/// One authenticated admin request.
pub struct AdminRequest {
    pub principal: Principal,
    pub method: Method,
    pub path: String,
    pub query: HashMap<String, String>,
    pub raw_query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub remote: SocketAddr,
}

impl AdminRequest {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// The tenant this request names: `body` (the body's `tenant` field, when the route has
    /// one) or the `?tenant=` query. Both given and different is a 400: an operator's change
    /// must never land on a tenant other than the one written.
    pub fn tenant_named<'a>(
        &'a self,
        body: Option<&'a str>,
    ) -> Result<Option<&'a str>, AdminError> {
        let body = body.filter(|t| !t.is_empty());
        match (body, self.param("tenant")) {
            (Some(b), Some(q)) if b != q => Err(AdminError::BadRequest(format!(
                "tenant {b:?} in the body and tenant {q:?} in the query differ"
            ))),
            (Some(b), _) => Ok(Some(b)),
            (None, q) => Ok(q),
        }
    }

    /// The body as JSON of type `T`, with a clear error naming what is wrong.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, AdminError> {
        if self.body.is_empty() {
            return Err(AdminError::BadRequest("request body is required".into()));
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| AdminError::BadRequest(format!("invalid JSON body: {e}")))
    }

    /// An audit event for this admin action, with principal, elevation id and caller address.
    pub fn event(&self, action: &str, tenant: &str) -> AuditEvent {
        let mut e = AuditEvent::new(format!("{}{action}", audit::kinds::ADMIN_PREFIX), tenant);
        e.decision = Some(audit::Decision::Allow);
        e.decided_by = self.principal.label();
        e.remote_ip = self.remote.ip().to_string();
        e.elevation_id = http::header_str(&self.headers, "x-intentgate-elevation-id")
            .unwrap_or_default()
            .chars()
            .take(128)
            .collect();
        e
    }
}

/// Parses `a=b&c=d` with percent-decoding; repeated keys keep the last value.
pub fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in q.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(percent_decode(k), percent_decode(v));
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the admin API reads of the configuration.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub max_body_bytes: usize,
    pub body_timeout: std::time::Duration,
    pub max_json_depth: usize,
    pub max_components_per_tenant: usize,
    /// The tenants that have a tenant admin configured (never their tokens).
    pub admin_tenants: Vec<String>,
}

impl AdminSettings {
    pub fn of(config: &crate::config::Config) -> Self {
        Self {
            max_body_bytes: config.max_body_bytes,
            body_timeout: config.body_timeout,
            max_json_depth: config.max_json_depth,
            max_components_per_tenant: config.max_components_per_tenant,
            admin_tenants: config
                .tenant_admins
                .iter()
                .map(|(t, _)| t.clone())
                .collect(),
        }
    }
}

/// The admin endpoint's service, built once at start-up ([`crate::gateway`]): exactly the
/// shared parts the admin API uses.
pub struct AdminService {
    pub auth: AdminAuth,
    pub settings: AdminSettings,
    /// Mints tokens.
    pub master_key: crate::capability::MasterKey,
    /// A revocation made here is applied to this replica's set at once.
    pub revocations: std::sync::Arc<crate::capability::RevocationSet>,
    pub store: std::sync::Arc<dyn crate::store::Store>,
    /// The audit log, the bundle registry and the approval settings.
    pub pipeline: std::sync::Arc<crate::pipeline::Pipeline>,
    /// Wakes held requests when an approval is decided here.
    pub approvals: crate::approvals::Waiters,
    pub outbox: crate::outbox::Outbox,
}

impl AdminService {
    /// Who presents these headers' admin token, if anyone (the metrics endpoint asks too).
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<Principal> {
        self.auth.authenticate(headers)
    }

    /// Authenticates, reads the body (bounded) and routes one admin request.
    pub async fn handle(&self, req: Request<Incoming>, remote: SocketAddr) -> Response<Body> {
        handle(self, req, remote).await
    }
}

/// Authenticates, reads the body (bounded) and routes one admin request.
async fn handle(svc: &AdminService, req: Request<Incoming>, remote: SocketAddr) -> Response<Body> {
    let Some(principal) = svc.auth.authenticate(req.headers()) else {
        return AdminError::Unauthorized.into_response();
    };
    let (parts, body) = req.into_parts();
    let body =
        match http::read_body_within(body, svc.settings.max_body_bytes, svc.settings.body_timeout)
            .await
        {
            Ok(b) => b,
            Err(http::BodyError::TooLarge { .. }) => return AdminError::TooLarge.into_response(),
            Err(e @ http::BodyError::Timeout(_)) => {
                return http::json(
                    StatusCode::REQUEST_TIMEOUT,
                    &json!({"error": e.to_string()}),
                );
            }
            Err(e) => return AdminError::BadRequest(e.to_string()).into_response(),
        };
    // A raw WebAssembly upload is not JSON: its bytes would count as brackets.
    if !body.is_empty()
        && !body.starts_with(b"\0asm")
        && !http::json_depth_within(&body, svc.settings.max_json_depth)
    {
        return AdminError::BadRequest("JSON nesting too deep".into()).into_response();
    }
    let req = AdminRequest {
        principal,
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: parse_query(parts.uri.query()),
        raw_query: parts.uri.query().map(str::to_owned),
        headers: parts.headers,
        body,
        remote,
    };
    match route(svc, &req).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn route(svc: &AdminService, req: &AdminRequest) -> Result<Response<Body>, AdminError> {
    let path = req.path.trim_end_matches('/');
    match (&req.method, path) {
        (&Method::POST, "/v1/admin/mint") => tokens::mint(svc, req).await,
        (&Method::POST, "/v1/admin/revoke") => tokens::revoke(svc, req).await,
        (&Method::GET, "/v1/admin/revocations") => tokens::revocations(svc, req).await,
        (&Method::GET, "/v1/admin/tenants") => tokens::tenants(svc, req).await,
        (&Method::GET, "/v1/admin/approvals") => approvals::list(svc, req).await,
        (_, "/v1/admin/approvals") => Err(AdminError::MethodNotAllowed),
        (method, p) if p.starts_with("/v1/admin/approvals/") => {
            match p["/v1/admin/approvals/".len()..].split_once('/') {
                Some((id, "decide")) if method == Method::POST => {
                    approvals::decide(svc, req, id).await
                }
                Some((_, "decide")) => Err(AdminError::MethodNotAllowed),
                _ => Err(AdminError::NotFound),
            }
        }
        (&Method::GET, "/v1/admin/audit") => audit_api::list(svc, req).await,
        (&Method::GET, "/v1/admin/audit/verify") => audit_api::verify(svc, req).await,
        (&Method::GET, "/v1/admin/audit/export") => audit_api::export(svc, req).await,
        (&Method::GET, "/v1/admin/audit/checkpoints") => audit_api::checkpoints(svc, req).await,
        (&Method::GET, "/v1/admin/audit/public-key") => audit_api::public_key(svc, req).await,
        (
            _,
            "/v1/admin/audit"
            | "/v1/admin/audit/verify"
            | "/v1/admin/audit/export"
            | "/v1/admin/audit/checkpoints"
            | "/v1/admin/audit/public-key",
        ) => Err(AdminError::MethodNotAllowed),
        (
            _,
            "/v1/admin/mint" | "/v1/admin/revoke" | "/v1/admin/revocations" | "/v1/admin/tenants",
        ) => Err(AdminError::MethodNotAllowed),
        (_, p) if p.starts_with("/v1/admin/integrations") => integrations::handle(svc, req).await,
        _ => bundles(svc, req).await,
    }
}

/// Plugins, bundles and the `/v1/admin/policies/*` shorthand (the bundles module's API). The
/// tenant comes from the body's `tenant` field or the query; the handler records each state
/// change in the audit chain through [`ChainAudit`] before it applies it.
async fn bundles(svc: &AdminService, req: &AdminRequest) -> Result<Response<Body>, AdminError> {
    let body_tenant = body_tenant(&req.body)?;
    let tenant = req
        .principal
        .one_tenant(req.tenant_named(body_tenant.as_deref())?)?;
    let actor = req.principal.label();
    let call = crate::bundles::admin::AdminCall {
        method: &req.method,
        path: &req.path,
        query: req.raw_query.as_deref(),
        tenant: &tenant,
        actor: &actor,
        body: &req.body,
    };
    // A component a destination formats with stays while the destination names it (its
    // events would otherwise stop at the next reload): refused when this tenant's hold is the
    // last one (another tenant's hold keeps the component; a tenant that holds none gets the
    // handler's 404 and learns no destination's name).
    if req.method == hyper::Method::DELETE
        && let Some(digest) = req
            .path
            .trim_end_matches('/')
            .strip_prefix("/v1/admin/plugins/")
        && !digest.contains('/')
        && svc.pipeline.registry().sole_holder(&tenant, digest)
    {
        let user = crate::outbox::store::formatter_user(svc.outbox.db(), &tenant, digest)
            .await
            .map_err(|_| AdminError::Unavailable("outbox store unavailable".into()))?;
        if let Some(by) = user {
            return Ok(http::json(
                StatusCode::CONFLICT,
                &serde_json::json!({"error": format!("component {digest} is in use by {by} as its formatter")}),
            ));
        }
    }
    let audit = ChainAudit { svc, req };
    let options = crate::bundles::admin::AdminOptions {
        audit: &audit,
        max_components_per_tenant: svc.settings.max_components_per_tenant,
    };
    let Some(reply) =
        crate::bundles::admin::handle_with(svc.pipeline.registry(), call, &options).await
    else {
        return Err(AdminError::NotFound);
    };
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok(if reply.body.is_null() {
        http::status(status)
    } else {
        http::json(status, &reply.body)
    })
}

/// The `tenant` member of a JSON object body, if any (a raw wasm upload or an empty body has
/// none). A `tenant` that is not a string is a 400 naming it.
fn body_tenant(body: &[u8]) -> Result<Option<String>, AdminError> {
    if body.is_empty() || body.starts_with(b"\0asm") {
        return Ok(None);
    }
    // An unparsable body is the handler's to refuse, with its own message.
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return Ok(None);
    };
    match map.get("tenant") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(t)) => Ok(Some(t.clone())),
        Some(_) => Err(AdminError::BadRequest("tenant must be a string".into())),
    }
}

/// Records the bundle handler's events in the audit chain, as this request's principal.
struct ChainAudit<'a> {
    svc: &'a AdminService,
    req: &'a AdminRequest,
}

impl crate::bundles::admin::AdminAudit for ChainAudit<'_> {
    fn record<'a>(
        &'a self,
        ev: &'a crate::bundles::admin::AdminEvent,
    ) -> crate::store::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut event = self.req.event(ev.action, &ev.tenant);
            event.reason = ev.detail.to_string().chars().take(1024).collect();
            audit_action(self.svc, event)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn failed<'a>(
        &'a self,
        ev: &'a crate::bundles::admin::AdminEvent,
        error: &'a str,
    ) -> crate::store::BoxFuture<'a, ()> {
        Box::pin(async move {
            audit_failed(
                self.svc,
                self.req,
                ev.action,
                &ev.tenant,
                &json!({"error": error, "detail": ev.detail}).to_string(),
            )
            .await;
        })
    }
}

/// Appends an admin action's event. Called BEFORE the action is applied: when this fails the
/// action must not be applied (the caller answers the error, 503).
pub async fn audit_action(svc: &AdminService, event: AuditEvent) -> Result<(), AdminError> {
    svc.pipeline.audit().append(event).await?;
    Ok(())
}

/// Records that an action whose event was appended then failed to apply (`admin/ACTION.failed`).
/// Best effort: the caller already answers an error; a refusal here is logged.
pub async fn audit_failed(
    svc: &AdminService,
    req: &AdminRequest,
    action: &str,
    tenant: &str,
    why: &str,
) {
    let mut event = req.event(&format!("{action}.failed"), tenant);
    event.decision = Some(audit::Decision::Block);
    event.reason = why.chars().take(1024).collect();
    if let Err(e) = svc.pipeline.audit().append(event).await {
        tracing::error!(error = %e, action, tenant, "admin: the failure of an audited action was not recorded");
    }
}

/// A JSON 200 response.
pub fn ok(value: Value) -> Response<Body> {
    http::json(StatusCode::OK, &value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::{AUTHORIZATION, HeaderValue};

    fn headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
        h
    }

    #[test]
    fn principals_and_scopes() {
        let auth = AdminAuth::new(
            "super-secret-token-1".into(),
            vec![("acme".into(), "acme-secret-token-1".into())],
        );
        assert_eq!(
            auth.authenticate(&headers("super-secret-token-1")),
            Some(Principal::Superadmin)
        );
        let acme = auth
            .authenticate(&headers("acme-secret-token-1"))
            .expect("acme");
        assert_eq!(acme, Principal::TenantAdmin("acme".into()));
        assert_eq!(auth.authenticate(&headers("super-secret-token-")), None);
        assert_eq!(auth.authenticate(&HeaderMap::new()), None);
        assert_eq!(acme.scope(None).expect("own"), Some("acme".into()));
        assert!(matches!(
            acme.scope(Some("globex")),
            Err(AdminError::Forbidden(_))
        ));
        assert_eq!(Principal::Superadmin.scope(None).expect("all"), None);
        assert!(matches!(
            Principal::Superadmin.scope(Some("bad name")),
            Err(AdminError::BadRequest(_))
        ));
        // The global chain is readable by the superadmin only, and is no tenant.
        let global = Some(audit::GLOBAL_CHAIN);
        assert_eq!(
            Principal::Superadmin.one_chain(global).expect("global"),
            audit::GLOBAL_CHAIN
        );
        assert!(matches!(
            Principal::Superadmin.one_tenant(global),
            Err(AdminError::BadRequest(_))
        ));
        let default = Principal::TenantAdmin("default".into());
        assert!(matches!(
            default.chain_scope(global),
            Err(AdminError::BadRequest(_))
        ));
        assert_eq!(default.one_chain(None).expect("own"), "default");
        assert_eq!(chain_of(None), audit::GLOBAL_CHAIN);
        assert_eq!(chain_of(Some("acme")), "acme");
    }

    #[test]
    fn query_decoding() {
        let q = parse_query(Some("tenant=acme%2Dcorp&tool=a+b&x=%zz&y=%4"));
        assert_eq!(q["tenant"], "acme-corp");
        assert_eq!(q["tool"], "a b");
        assert_eq!(q["x"], "%zz");
        assert_eq!(q["y"], "%4");
    }
}
