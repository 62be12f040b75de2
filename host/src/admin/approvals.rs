//! `GET /v1/admin/approvals` (the queue, a page at a time) and
//! `POST /v1/admin/approvals/{id}/decide` (`{decision: approve|reject, decided_by, note}`).
//!
//! A decision is written with its audit event in one transaction, conditional on the approval
//! still being pending: of two racing deciders exactly one wins, the other gets `409` with the
//! approval as it now is. Another tenant's id is `404`, as an unknown one. Self-approval (the
//! `decided_by` is the agent the approval was issued to) is refused. This module must never
//! decide an approval outside the caller's tenant scope, nor wake a held call before the
//! decision is durable.

use hyper::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AdminService;
use super::{AdminError, AdminRequest, ok};
use crate::approvals::{self, ApprovalWrite, Status, query};
use crate::audit::{self, Decision};
use crate::http::{self, Body};

const DEFAULT_LIMIT: i64 = 100;

impl From<query::QueryError> for AdminError {
    fn from(e: query::QueryError) -> Self {
        match e {
            query::QueryError::Invalid(what) => Self::BadRequest(format!("invalid {what}")),
            other => {
                tracing::error!(error = %other, "admin: approval store error");
                Self::Unavailable("approval store unavailable".into())
            }
        }
    }
}

/// `GET /v1/admin/approvals?tenant&status&limit&cursor`: pending approvals by default
/// (`status=all` for every status), oldest first.
pub async fn list(svc: &AdminService, req: &AdminRequest) -> Result<Response<Body>, AdminError> {
    let tenant = req.principal.scope(req.param("tenant"))?;
    let status = match req.param("status").unwrap_or("pending") {
        "all" => None,
        s => Some(Status::parse(s).ok_or_else(|| {
            AdminError::BadRequest(format!(
                "status must be pending, approved, rejected, expired, consumed or all, not {s:?}"
            ))
        })?),
    };
    let limit = match req.param("limit") {
        None => DEFAULT_LIMIT,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=query::MAX_LIMIT).contains(l))
            .ok_or_else(|| {
                AdminError::BadRequest(format!("limit must be 1-{}", query::MAX_LIMIT))
            })?,
    };
    let after = match req.param("cursor") {
        None => None,
        Some(c) => Some(
            query::decode_cursor(c)
                .ok_or_else(|| AdminError::BadRequest("invalid cursor".into()))?,
        ),
    };
    let filter = query::ListFilter {
        tenant,
        status,
        limit,
        after,
    };
    let now = audit::time::now_ms();
    let (rows, next) = query::list(svc.pipeline.audit().db(), &filter, now).await?;
    let items: Vec<Value> = rows.iter().map(|a| a.to_json(now)).collect();
    Ok(ok(json!({
        "items": items,
        "next_cursor": next.as_ref().map(query::encode_cursor),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    decision: String,
    decided_by: String,
    #[serde(default, alias = "reason")]
    note: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
}

/// `POST /v1/admin/approvals/{id}/decide`.
pub async fn decide(
    svc: &AdminService,
    req: &AdminRequest,
    id: &str,
) -> Result<Response<Body>, AdminError> {
    let body: DecideBody = req.json()?;
    let approve = match body.decision.as_str() {
        "approve" => true,
        "reject" => false,
        other => {
            return Err(AdminError::BadRequest(format!(
                "decision must be approve or reject, not {other:?}"
            )));
        }
    };
    let decided_by = body.decided_by.trim();
    if decided_by.is_empty() || decided_by.len() > 256 || decided_by.chars().any(char::is_control) {
        return Err(AdminError::BadRequest(
            "decided_by must name who decides (1-256 characters, none a control character)".into(),
        ));
    }
    let note = body.note.unwrap_or_default();
    if note.len() > 4096 {
        return Err(AdminError::BadRequest(
            "note must be at most 4096 bytes".into(),
        ));
    }
    if note
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(AdminError::BadRequest(
            "note must not contain control characters (other than line breaks and tabs)".into(),
        ));
    }
    let scope = req
        .principal
        .scope(req.tenant_named(body.tenant.as_deref())?)?;
    let db = svc.pipeline.audit().db();
    // Another tenant's approval is as unknown as a missing one.
    let Some(a) = query::get(db, scope.as_deref(), id).await? else {
        return Err(AdminError::NotFound);
    };
    let now = audit::time::now_ms();
    if a.status_at(now) != Status::Pending {
        return Ok(conflict(&a, now));
    }
    if decided_by.eq_ignore_ascii_case(&a.agent_id) {
        return Err(AdminError::Forbidden(
            "self-approval refused: decided_by is the agent the approval was issued to".into(),
        ));
    }
    let mut e = req.event("approvals/decide", &a.tenant);
    e.kind = audit::kinds::APPROVAL_DECIDED.to_owned();
    e.decision = Some(if approve {
        Decision::Allow
    } else {
        Decision::Block
    });
    e.check = "approval".to_owned();
    // `decided_by` is the operator's name as the console sends it (the wire contract); the
    // credential that made the decision is recorded beside it, so a claimed name never stands
    // alone in the chain.
    let verdict = if approve { "approved" } else { "rejected" };
    e.reason = format!("{verdict} with credential {}", req.principal.label());
    if !note.is_empty() {
        e.reason = format!(
            "{}: {}",
            e.reason,
            note.chars().take(1024).collect::<String>()
        );
    }
    e.decided_by = decided_by.to_owned();
    e.pending_id = a.pending_id.clone();
    e.agent_id = a.agent_id.clone();
    e.tool = a.tool.clone();
    e.jti = a.capability_token_id.clone();
    e.root_jti = a.root_capability_token_id.clone();
    e.requires_step_up = a.requires_step_up;
    let timeout = svc.pipeline.approvals().timeout.as_millis() as i64;
    let write = ApprovalWrite::Decide {
        id: a.pending_id.clone(),
        approve,
        by: decided_by.to_owned(),
        note,
        at_ms: now,
        resume_until_ms: now.saturating_add(timeout),
    };
    let appended = svc
        .pipeline
        .audit()
        .append_with(e, Vec::new(), Some(write))
        .await?;
    if appended.refused.is_some() {
        // Decided (or expired) by someone else between the read and the commit.
        let now = audit::time::now_ms();
        return match query::get(db, Some(&a.tenant), id).await? {
            Some(current) => Ok(conflict(&current, now)),
            None => Err(AdminError::NotFound),
        };
    }
    svc.approvals.announce(db, &a.tenant, &a.pending_id).await;
    let current = query::get(db, Some(&a.tenant), id)
        .await?
        .ok_or(AdminError::NotFound)?;
    Ok(ok(json!({
        "approval": current.to_json(audit::time::now_ms()),
        "event_id": appended.id,
    })))
}

fn conflict(current: &approvals::Approval, now: i64) -> Response<Body> {
    http::json(
        StatusCode::CONFLICT,
        &json!({"error": "already decided", "current": current.to_json(now)}),
    )
}
