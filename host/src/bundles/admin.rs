//! The bundle and plugin part of the admin API, as a handler the admin router calls after it
//! authenticated the caller and resolved the tenant (`/v1/admin/plugins*`, `/v1/admin/bundles*`,
//! and the IntentGate `/v1/admin/policies/*` shorthand for the policy stage's Rego).
//!
//! | method and path | what |
//! |---|---|
//! | `GET /v1/admin/plugins`, `GET …/plugins/{digest}` | uploaded components |
//! | `POST /v1/admin/plugins?name=N&world=check-plugin` | upload (raw wasm, or JSON `{name, wasm_base64}`); 422 unless it implements the world (default `check-plugin`) |
//! | `GET /v1/admin/bundles` | `{status: {active, previous, …}, drafts}` |
//! | `POST /v1/admin/bundles` | `{name, spec}` → a validated draft (201), its digest is its id |
//! | `GET/DELETE /v1/admin/bundles/{digest}` | one draft |
//! | `POST /v1/admin/bundles/{digest}/promote`, `POST /v1/admin/bundles/rollback` | swap |
//! | `POST /v1/admin/bundles/{digest}/dry-run` | `{calls: [RecordedCall], sample: "last-24h"}` → counts + transition matrix |
//! | `GET /v1/admin/bundles/history` | promotions and rollbacks |
//! | `/v1/admin/policies/{drafts,drafts/{id},active,rollback,dry-run}` | the IntentGate shapes, on the policy stage |
//!
//! It never authenticates, never decides tenant scope and never writes the audit chain itself:
//! every state change returns an [`AdminEvent`] that the caller must audit. Slow work (compile,
//! instantiate) runs in `spawn_blocking`.

use super::registry::{BundleError, ComponentInfo, DraftInfo, RecordedCall, Registry, SwapOutcome};
use super::spec::BundleSpec;
use crate::plugins::{CheckInput, PluginError, Stage, VerdictKind, World};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

/// One admin request, already authenticated and scoped to `tenant`.
#[derive(Clone, Copy, Debug)]
pub struct AdminCall<'a> {
    /// HTTP method.
    pub method: &'a hyper::Method,
    /// Path, e.g. `/v1/admin/bundles/sha256:…/promote`.
    pub path: &'a str,
    /// Raw query string (without `?`).
    pub query: Option<&'a str>,
    /// The tenant the caller acts on.
    pub tenant: &'a str,
    /// Who (for the audit event).
    pub actor: &'a str,
    /// Request body.
    pub body: &'a [u8],
}

/// A state change the caller must write to the audit chain.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AdminEvent {
    /// e.g. `bundle.promote`, `plugin.upload`.
    pub action: &'static str,
    /// Tenant.
    pub tenant: String,
    /// Who.
    pub actor: String,
    /// What.
    pub detail: Value,
}

/// The reply: status, JSON body (`{"error": …}` on errors), and the event to audit.
#[derive(Clone, Debug, PartialEq)]
pub struct AdminReply {
    /// HTTP status.
    pub status: u16,
    /// JSON body (`Value::Null` for 204).
    pub body: Value,
    /// Audit this when present.
    pub event: Option<Box<AdminEvent>>,
}

fn reply(status: u16, body: Value) -> AdminReply {
    AdminReply {
        status,
        body,
        event: None,
    }
}

fn error(status: u16, message: impl std::fmt::Display) -> AdminReply {
    reply(status, json!({"error": message.to_string()}))
}

fn event(call: &AdminCall<'_>, action: &'static str, detail: Value) -> Option<Box<AdminEvent>> {
    Some(Box::new(AdminEvent {
        action,
        tenant: call.tenant.to_string(),
        actor: call.actor.to_string(),
        detail,
    }))
}

fn bundle_error(e: BundleError) -> AdminReply {
    match &e {
        BundleError::UnknownBundle(_) => error(404, e),
        BundleError::NoPrevious(_)
        | BundleError::TooManyDrafts { .. }
        | BundleError::TooManyComponents { .. } => error(409, e),
        BundleError::Plugin(PluginError::Busy(_)) => error(503, e),
        BundleError::TooManyChecks { .. }
        | BundleError::Invalid {
            error: PluginError::TenantQuota { .. },
            ..
        } => error(422, e),
        _ => error(400, e),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AdminReply> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| error(500, format!("worker failed: {e}")))
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, AdminReply> {
    serde_json::from_slice(body).map_err(|e| error(400, format!("invalid JSON body: {e}")))
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v)
    })
}

/// Handle the request when the path is ours; `None` otherwise.
pub async fn handle(registry: &Registry, call: AdminCall<'_>) -> Option<AdminReply> {
    let path = call.path.trim_end_matches('/');
    let rest = path.strip_prefix("/v1/admin/")?;
    let segments: Vec<&str> = rest.split('/').collect();
    let method = call.method.as_str();
    let reply = match (method, segments.as_slice()) {
        (_, ["plugins", ..]) => plugins(registry, &call, &segments[1..]).await,
        (_, ["bundles", ..]) => bundles(registry, &call, &segments[1..]).await,
        (_, ["policies", ..]) => policies(registry, &call, &segments[1..]).await,
        _ => return None,
    };
    Some(match reply {
        Ok(r) | Err(r) => r,
    })
}

/// Store the component (uploaded by `tenant`) when a store is attached.
async fn store_component(
    registry: &Registry,
    tenant: &str,
    info: &ComponentInfo,
    actor: &str,
) -> Result<(), AdminReply> {
    let (Some(persist), Some(wasm)) = (registry.persist(), registry.component_bytes(&info.digest))
    else {
        return Ok(());
    };
    persist
        .save_component(tenant, info, &wasm, actor)
        .await
        .map_err(|e| error(503, e))
}

fn draft_exists(registry: &Registry, tenant: &str, digest: &str) -> bool {
    registry.drafts(tenant).iter().any(|d| d.digest == digest)
}

/// Store the draft when a store is attached. When the store refuses it, a draft this request
/// created is dropped again (`existed`: it was there before, and stays).
async fn store_draft(
    registry: &Registry,
    tenant: &str,
    draft: &DraftInfo,
    actor: &str,
    existed: bool,
) -> Result<(), AdminReply> {
    let Some(persist) = registry.persist() else {
        return Ok(());
    };
    persist
        .save_bundle(tenant, draft, actor)
        .await
        .map_err(|e| {
            if !existed {
                registry.delete_draft(tenant, &draft.digest);
            }
            error(503, e)
        })
}

/// Mark the draft deleted when a store is attached.
async fn store_delete(registry: &Registry, tenant: &str, digest: &str) -> Result<(), AdminReply> {
    let Some(persist) = registry.persist() else {
        return Ok(());
    };
    persist
        .delete_bundle(tenant, digest)
        .await
        .map_err(|e| error(503, e))
}

/// Store (again) the bundles a pointer is about to name and their uploaded components, so a
/// stored pointer never names a bundle the other replicas (or this one restarting) cannot load:
/// a draft or component whose store write failed when it was made may still be in memory.
/// Every write is idempotent.
async fn store_pointed(
    registry: &Registry,
    persist: &super::persist::Persist,
    tenant: &str,
    actor: &str,
) -> Result<(), super::persist::PersistError> {
    let status = registry.status(tenant);
    let drafts = registry.drafts(tenant);
    let builtin: Vec<String> = registry
        .components()
        .into_iter()
        .filter(|c| c.builtin)
        .map(|c| c.digest)
        .collect();
    let default = registry.default_spec().digest();
    for digest in std::iter::once(&status.active).chain(status.previous.as_ref()) {
        if *digest == default {
            continue;
        }
        let Some(draft) = drafts.iter().find(|d| d.digest == *digest) else {
            continue;
        };
        for component in draft.spec.component_digests() {
            if builtin.iter().any(|b| b == component) {
                continue;
            }
            let info = registry
                .components()
                .into_iter()
                .find(|c| c.digest == component);
            if let (Some(info), Some(wasm)) = (info, registry.component_bytes(component)) {
                persist.save_component(tenant, &info, &wasm, actor).await?;
            }
        }
        persist.save_bundle(tenant, draft, actor).await?;
    }
    Ok(())
}

/// Make a swap (`promote` or `rollback`) and store the tenant's new pointer, which the other
/// replicas follow. Both happen under the registry's swap gate, so this replica's follower
/// cannot interleave an older pointer. The bundles the pointer names are stored first. When the
/// store refuses either the swap is undone and the caller gets 503: a swap is either on every
/// replica or on none. The pointer is a compare-and-set on the `seq` this replica runs: when
/// another replica swapped meanwhile, the swap here is undone too and the caller gets 409 (this
/// replica's follower brings it up to date; then a retry works).
async fn swap_and_store(
    registry: &Registry,
    tenant: &str,
    actor: &str,
    swap: impl FnOnce(&Registry) -> Result<SwapOutcome, BundleError> + Send + 'static,
) -> Result<SwapOutcome, AdminReply> {
    let _gate = registry.swap_gate().lock().await;
    let before = registry.status(tenant);
    let r2 = registry.clone();
    let outcome = blocking(move || swap(&r2)).await?.map_err(bundle_error)?;
    let Some(persist) = registry.persist() else {
        return Ok(outcome);
    };
    let stored = match store_pointed(registry, persist, tenant, actor).await {
        Ok(()) => {
            persist
                .set_pointer(
                    &registry.stored_status(tenant),
                    actor,
                    registry.pointer_seq(tenant),
                )
                .await
        }
        Err(e) => Err(e),
    };
    let e = match stored {
        Ok(seq) => {
            registry.set_pointer_seq(tenant, seq);
            return Ok(outcome);
        }
        Err(e) => e,
    };
    let conflict = matches!(e, super::persist::PersistError::Conflict(_));
    let (r2, t) = (registry.clone(), tenant.to_string());
    let undo = blocking(move || r2.install(&t, &before.active, before.previous.as_deref())).await;
    Err(match undo {
        Ok(Ok(_)) if conflict => error(
            409,
            "this tenant's bundle was changed on another replica; retry",
        ),
        Ok(Ok(_)) => error(
            503,
            format!(
                "not swapped: the store did not record it ({e}); the running bundle is unchanged"
            ),
        ),
        Ok(Err(u)) => error(
            500,
            format!(
                "the store did not record the swap ({e}) and undoing it failed ({u}): this replica runs a bundle the others do not"
            ),
        ),
        Err(join) => join,
    })
}

#[derive(Deserialize)]
struct UploadJson {
    name: String,
    wasm_base64: String,
}

async fn plugins(
    registry: &Registry,
    call: &AdminCall<'_>,
    rest: &[&str],
) -> Result<AdminReply, AdminReply> {
    match (call.method.as_str(), rest) {
        ("GET", []) => Ok(reply(200, json!(registry.components_of(call.tenant)))),
        ("GET", [digest]) => registry
            .components_of(call.tenant)
            .into_iter()
            .find(|c| c.digest == *digest)
            .map(|c| reply(200, json!(c)))
            .ok_or_else(|| error(404, format!("unknown component {digest}"))),
        ("POST", []) => {
            let (name, wasm) = if call.body.starts_with(b"\0asm") {
                let name = query_param(call.query, "name")
                    .unwrap_or("uploaded")
                    .to_string();
                (name, call.body.to_vec())
            } else {
                let upload: UploadJson = parse(call.body)?;
                let wasm = base64::engine::general_purpose::STANDARD
                    .decode(upload.wasm_base64.as_bytes())
                    .map_err(|e| error(400, format!("wasm_base64: {e}")))?;
                (upload.name, wasm)
            };
            let expect = match query_param(call.query, "world").unwrap_or("check-plugin") {
                "check-plugin" => World::CheckPlugin,
                "siem-formatter" => World::SiemFormatter,
                other => return Err(error(400, format!("unknown world {other:?}"))),
            };
            registry
                .component_room(&crate::plugins::runtime::digest_of(&wasm))
                .map_err(bundle_error)?;
            let known: Vec<String> = registry
                .components()
                .into_iter()
                .map(|c| c.digest)
                .collect();
            let r2 = registry.clone();
            let info = blocking(move || r2.upload_component(&name, &wasm, expect))
                .await?
                .map_err(|e| error(422, e))?;
            let detail = json!({"digest": info.digest, "world": info.world, "name": info.name});
            let newly_owned = registry.add_component_owner(&info.digest, call.tenant);
            if let Err(e) = store_component(registry, call.tenant, &info, call.actor).await {
                // Not stored, so not kept: a bundle naming it could not be loaded elsewhere.
                if newly_owned {
                    registry.remove_component_owner(&info.digest, call.tenant);
                }
                if !known.contains(&info.digest) {
                    registry.remove_component(&info.digest);
                }
                return Err(e);
            }
            Ok(AdminReply {
                status: 201,
                body: json!(info),
                event: event(call, "plugin.upload", detail),
            })
        }
        _ => Err(error(405, "method not allowed")),
    }
}

#[derive(Deserialize)]
struct DraftCreate {
    #[serde(default)]
    name: String,
    spec: BundleSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DryRunBody {
    #[serde(default)]
    calls: Vec<RecordedCall>,
    /// `last-24h` and the like: the tenant's recorded decisions of that window.
    #[serde(default)]
    sample: Option<String>,
}

/// Most per-call rows a dry-run lists (the counts and the matrix always cover every call).
const MAX_LISTED: usize = 1000;

/// The calls to replay: those given, plus the tenant's recorded ones when a sample is named.
async fn replay_set(
    registry: &Registry,
    tenant: &str,
    mut calls: Vec<RecordedCall>,
    sample: Option<&str>,
) -> Result<Vec<RecordedCall>, AdminReply> {
    if let Some(name) = sample {
        let window = super::sample::window_ms(name).map_err(|e| error(400, e))?;
        let persist = registry
            .persist()
            .ok_or_else(|| error(400, "sample: this gateway has no audit store to read"))?;
        let now = crate::audit::time::now_ms();
        let recorded = super::sample::recorded_calls(persist.db(), tenant, window, now)
            .await
            .map_err(|e| error(503, e))?;
        calls.extend(recorded);
    }
    Ok(calls)
}

async fn bundles(
    registry: &Registry,
    call: &AdminCall<'_>,
    rest: &[&str],
) -> Result<AdminReply, AdminReply> {
    let tenant = call.tenant.to_string();
    match (call.method.as_str(), rest) {
        ("GET", []) => Ok(reply(
            200,
            json!({"status": registry.status(&tenant), "drafts": registry.drafts(&tenant)}),
        )),
        ("GET", ["history"]) => {
            let history: Vec<SwapOutcome> = registry
                .history()
                .into_iter()
                .filter(|h| h.tenant == tenant)
                .collect();
            Ok(reply(200, json!(history)))
        }
        ("POST", []) => {
            let body: DraftCreate = parse(call.body)?;
            // A tenant builds bundles from the built-ins and the components it uploaded.
            if let Some(foreign) = body.spec.component_digests().find(|d| {
                registry.components().iter().any(|c| c.digest == *d)
                    && !registry.may_use_component(&tenant, d)
            }) {
                return Err(error(
                    422,
                    format!(
                        "component {foreign} was not uploaded by tenant {tenant}: upload it as this tenant first"
                    ),
                ));
            }
            let existed = draft_exists(registry, &tenant, &body.spec.digest());
            registry
                .draft_room(&tenant, Some(&body.spec.digest()))
                .map_err(bundle_error)?;
            let r2 = registry.clone();
            let t = tenant.clone();
            let draft = blocking(move || r2.create_draft(&t, &body.name, body.spec))
                .await?
                .map_err(bundle_error)?;
            let detail = json!({"digest": draft.digest, "name": draft.name});
            store_draft(registry, call.tenant, &draft, call.actor, existed).await?;
            Ok(AdminReply {
                status: 201,
                body: json!(draft),
                event: event(call, "bundle.draft", detail),
            })
        }
        ("GET", [digest]) => registry
            .drafts(&tenant)
            .into_iter()
            .find(|d| d.digest == *digest)
            .map(|d| reply(200, json!(d)))
            .ok_or_else(|| error(404, format!("unknown bundle {digest}"))),
        ("DELETE", [digest]) => {
            if registry.delete_draft(&tenant, digest) {
                store_delete(registry, call.tenant, digest).await?;
                Ok(AdminReply {
                    status: 204,
                    body: Value::Null,
                    event: event(call, "bundle.delete", json!({"digest": digest})),
                })
            } else {
                Err(error(404, format!("unknown or active bundle {digest}")))
            }
        }
        ("POST", ["rollback"]) => {
            let outcome = swap_and_store(registry, call.tenant, call.actor, move |r| {
                r.rollback(&tenant)
            })
            .await?;
            Ok(AdminReply {
                status: 200,
                body: json!(outcome),
                event: event(call, "bundle.rollback", json!(outcome)),
            })
        }
        ("POST", [digest, "promote"]) => {
            let digest = digest.to_string();
            let outcome = swap_and_store(registry, call.tenant, call.actor, move |r| {
                r.promote(&tenant, &digest)
            })
            .await?;
            Ok(AdminReply {
                status: 200,
                body: json!(outcome),
                event: event(call, "bundle.promote", json!(outcome)),
            })
        }
        ("POST", [digest, "dry-run"]) => {
            let body: DryRunBody = parse(call.body)?;
            let calls = replay_set(registry, &tenant, body.calls, body.sample.as_deref()).await?;
            let (r2, digest) = (registry.clone(), digest.to_string());
            let report = blocking(move || r2.dry_run(&tenant, &digest, &calls))
                .await?
                .map_err(bundle_error)?;
            Ok(reply(200, json!(report)))
        }
        _ => Err(error(405, "method not allowed")),
    }
}

/// The Rego text of a bundle's policy stage (first check), as given.
fn rego_of(spec: &BundleSpec) -> String {
    let config = spec
        .checks(Stage::Policy)
        .first()
        .map(|c| c.config.clone())
        .unwrap_or_default();
    if config.trim_start().starts_with('{')
        && let Ok(v) = serde_json::from_str::<Value>(&config)
        && let Some(modules) = v.get("modules").and_then(Value::as_object)
    {
        return modules
            .values()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("\n");
    }
    config
}

fn rego_sha256(spec: &BundleSpec) -> String {
    crate::plugins::runtime::digest_of(rego_of(spec).as_bytes())
        .trim_start_matches("sha256:")
        .to_string()
}

/// RFC 3339 UTC from unix seconds.
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn draft_json(tenant: &str, d: &DraftInfo, with_source: bool) -> Value {
    let mut v = json!({
        "id": d.digest,
        "name": d.name,
        "tenant": tenant,
        "created_at": rfc3339(d.created_at),
        "rego_sha256": rego_sha256(&d.spec),
        "bundle_digest": d.digest,
    });
    if let (true, Some(obj)) = (with_source, v.as_object_mut()) {
        obj.insert("rego_source".into(), json!(rego_of(&d.spec)));
    }
    v
}

fn active_json(registry: &Registry, tenant: &str) -> Value {
    let status = registry.status(tenant);
    let snapshot = registry.snapshot(tenant);
    let name = registry
        .drafts(tenant)
        .into_iter()
        .find(|d| d.digest == status.active)
        .map(|d| d.name)
        .unwrap_or_else(|| {
            if status.is_default {
                "default".into()
            } else {
                String::new()
            }
        });
    let promoted_at = registry
        .history()
        .into_iter()
        .rev()
        .find(|h| h.tenant == tenant)
        .map(|h| rfc3339(h.at));
    json!({
        "draft_id": status.active,
        "name": name,
        "tenant": tenant,
        "promoted_at": promoted_at,
        "rego_sha256": rego_sha256(snapshot.spec()),
        "bundle_digest": status.active,
        "previous": status.previous,
    })
}

#[derive(Deserialize)]
struct PolicyDraftCreate {
    rego_source: String,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct PromoteRequest {
    draft_id: String,
}

/// A synthetic call in the shape of the Rego input: `{tool, args, agent_id, intent_prompt,
/// usage}`; everything but `tool` may be left out. The tenant is the caller's.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SyntheticInput {
    tool: String,
    #[serde(default)]
    args: serde_json::Map<String, Value>,
    #[serde(default)]
    agent_id: String,
    #[serde(default)]
    intent_prompt: Option<String>,
    #[serde(default)]
    usage: crate::plugins::Usage,
}

impl SyntheticInput {
    fn into_check_input(self, tenant: &str) -> CheckInput {
        CheckInput {
            tenant: tenant.to_string(),
            token: crate::plugins::TokenInput {
                subject: self.agent_id.clone(),
                ..Default::default()
            },
            agent_id: self.agent_id,
            tool: self.tool,
            arguments: Value::Object(self.args).to_string(),
            intent_prompt: self.intent_prompt,
            usage: self.usage,
        }
    }
}

#[derive(Deserialize)]
struct PolicyDryRun {
    rego_source: String,
    /// One synthetic call (IntentGate: exclusive with `sample`).
    #[serde(default)]
    input: Option<SyntheticInput>,
    /// `last-24h` and the like: the tenant's recorded decisions of that window.
    #[serde(default)]
    sample: Option<String>,
    #[serde(default)]
    calls: Vec<RecordedCall>,
}

async fn policies(
    registry: &Registry,
    call: &AdminCall<'_>,
    rest: &[&str],
) -> Result<AdminReply, AdminReply> {
    let tenant = call.tenant.to_string();
    match (call.method.as_str(), rest) {
        ("GET", ["drafts"]) => {
            let drafts: Vec<Value> = registry
                .drafts(&tenant)
                .iter()
                .map(|d| draft_json(&tenant, d, false))
                .collect();
            Ok(reply(200, json!(drafts)))
        }
        ("POST", ["drafts"]) => {
            let body: PolicyDraftCreate = parse(call.body)?;
            let name = body.name.unwrap_or_else(|| "policy".into());
            let existed = registry.drafts(&tenant);
            registry.draft_room(&tenant, None).map_err(bundle_error)?;
            let (registry2, t) = (registry.clone(), tenant.clone());
            let draft = blocking(move || registry2.draft_policy(&t, &name, body.rego_source))
                .await?
                .map_err(|e| error(400, e))?;
            let existed = existed.iter().any(|d| d.digest == draft.digest);
            let detail = json!({"id": draft.digest, "name": draft.name});
            store_draft(registry, call.tenant, &draft, call.actor, existed).await?;
            Ok(AdminReply {
                status: 201,
                body: draft_json(&tenant, &draft, true),
                event: event(call, "policy.draft", detail),
            })
        }
        ("GET", ["drafts", id]) => registry
            .drafts(&tenant)
            .iter()
            .find(|d| d.digest == *id)
            .map(|d| reply(200, draft_json(&tenant, d, true)))
            .ok_or_else(|| error(404, format!("unknown draft {id}"))),
        ("DELETE", ["drafts", id]) => {
            if registry.delete_draft(&tenant, id) {
                store_delete(registry, call.tenant, id).await?;
                Ok(AdminReply {
                    status: 204,
                    body: Value::Null,
                    event: event(call, "policy.draft.delete", json!({"id": id})),
                })
            } else {
                Err(error(404, format!("unknown or active draft {id}")))
            }
        }
        ("GET", ["active"]) => Ok(reply(200, active_json(registry, &tenant))),
        ("POST", ["active"]) => {
            let body: PromoteRequest = parse(call.body)?;
            let t = tenant.clone();
            let outcome = swap_and_store(registry, call.tenant, call.actor, move |r| {
                r.promote(&t, &body.draft_id)
            })
            .await?;
            Ok(AdminReply {
                status: 200,
                body: active_json(registry, &tenant),
                event: event(call, "policy.promote", json!(outcome)),
            })
        }
        ("DELETE", ["active"]) => {
            // Back to the default bundle: deny by default (fail closed).
            let t = tenant.clone();
            let outcome = swap_and_store(registry, call.tenant, call.actor, move |r| {
                r.promote(&t, "default")
            })
            .await?;
            Ok(AdminReply {
                status: 204,
                body: Value::Null,
                event: event(call, "policy.clear", json!(outcome)),
            })
        }
        ("POST", ["rollback"]) => {
            let t = tenant.clone();
            let outcome =
                swap_and_store(registry, call.tenant, call.actor, move |r| r.rollback(&t)).await?;
            Ok(AdminReply {
                status: 200,
                body: active_json(registry, &tenant),
                event: event(call, "policy.rollback", json!(outcome)),
            })
        }
        ("POST", ["dry-run"]) => {
            let body: PolicyDryRun = parse(call.body)?;
            if body.input.is_some() && body.sample.is_some() {
                return Err(error(400, "give either input or sample, not both"));
            }
            if body.input.is_none() && body.sample.is_none() && body.calls.is_empty() {
                return Err(error(
                    400,
                    "nothing to replay: give input (one call) or sample (e.g. \"last-24h\")",
                ));
            }
            let mut calls =
                replay_set(registry, &tenant, body.calls, body.sample.as_deref()).await?;
            if let Some(input) = body.input {
                calls.push(RecordedCall {
                    input: input.into_check_input(&tenant),
                    decision: VerdictKind::Block,
                    id: Some("input".into()),
                });
            }
            let (registry2, t) = (registry.clone(), tenant.clone());
            let report = blocking(move || {
                let spec = registry2
                    .active_spec(&t)
                    .with_policy_config(body.rego_source);
                // Evaluated as is, never inserted among the drafts: an operator's draft of the
                // same content must survive the dry-run.
                let report = registry2.dry_run_spec(&t, &spec, &calls);
                report.map(|r| (r, calls))
            })
            .await?
            .map_err(|e| error(400, e))?;
            let (report, calls) = report;
            // Every call when few; otherwise the ones whose decision changes come first.
            let mut order: Vec<usize> = (0..calls.len()).collect();
            if calls.len() > MAX_LISTED {
                order.sort_by_key(|&i| report.candidates.get(i) == Some(&calls[i].decision));
                order.truncate(MAX_LISTED);
                order.sort_unstable();
            }
            let decisions: Vec<Value> = order
                .iter()
                .map(|&i| {
                    let c = &calls[i];
                    let synthetic = c.id.as_deref() == Some("input");
                    json!({
                        "id": c.id,
                        "input": c.input,
                        "candidate_decision": report.candidates.get(i),
                        "actual_decision": (!synthetic).then_some(c.decision),
                    })
                })
                .collect();
            let mut body = json!(report);
            if let Some(obj) = body.as_object_mut() {
                obj.insert("decisions".into(), json!(decisions));
                obj.insert(
                    "decisions_truncated".into(),
                    json!(calls.len() > decisions.len()),
                );
            }
            Ok(reply(200, body))
        }
        _ => Err(error(405, "method not allowed")),
    }
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
