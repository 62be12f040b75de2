//! The bundle and plugin part of the admin API, as a handler the admin router calls after it
//! authenticated the caller and resolved the tenant (`/v1/admin/plugins*`, `/v1/admin/bundles*`,
//! and the IntentGate `/v1/admin/policies/*` shorthand for the policy stage's Rego).
//!
//! | method and path | what |
//! |---|---|
//! | `GET /v1/admin/plugins`, `GET …/plugins/{digest}` | uploaded components |
//! | `POST /v1/admin/plugins?name=N&world=check-plugin` | upload (raw wasm, or JSON `{name, wasm_base64}`); 422 unless it implements the world (default `check-plugin`); 409 past the tenant's quota |
//! | `DELETE /v1/admin/plugins/{digest}` | drop a component no bundle of the tenant uses (204; 409 naming the user) |
//! | `GET /v1/admin/bundles` | `{status: {active, previous, …}, drafts}` |
//! | `POST /v1/admin/bundles` | `{name, spec}` → a validated draft (201), its digest is its id |
//! | `GET/DELETE /v1/admin/bundles/{digest}` | one draft |
//! | `POST /v1/admin/bundles/{digest}/promote`, `POST /v1/admin/bundles/rollback` | swap |
//! | `POST /v1/admin/bundles/{digest}/dry-run` | `{calls: [RecordedCall], sample: "last-24h"}` → counts + transition matrix |
//! | `GET /v1/admin/bundles/history` | promotions and rollbacks |
//! | `/v1/admin/policies/{drafts,drafts/{id},active,rollback,dry-run}` | the IntentGate shapes, on the policy stage |
//!
//! It never authenticates and never decides tenant scope. Every state change is first validated,
//! then recorded through the caller's [`AdminAudit`] and only then applied: an event the audit
//! log refuses means the change is not made (503), and a change that fails after its event was
//! recorded is followed by a `failed` event. JSON bodies refuse unknown fields (400 naming
//! them). Slow work (compile, instantiate) runs in `spawn_blocking`.

use super::registry::{
    BundleError, ComponentInfo, DraftInfo, MAX_COMPONENTS_PER_TENANT, RecordedCall, Registry,
    SwapOutcome,
};
use super::spec::BundleSpec;
use crate::plugins::{CheckInput, PluginError, Stage, VerdictKind, World};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

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

/// The reply: status, JSON body (`{"error": …}` on errors), and the event that was audited.
#[derive(Clone, Debug, PartialEq)]
pub struct AdminReply {
    /// HTTP status.
    pub status: u16,
    /// JSON body (`Value::Null` for 204).
    pub body: Value,
    /// The event recorded (before the change was applied) when the request changed state.
    pub event: Option<Box<AdminEvent>>,
}

/// Where the handler records state changes, before it applies them.
pub trait AdminAudit: Sync {
    /// Record `event` durably. `Err` (why) means it was not recorded: the change is not made.
    fn record<'a>(
        &'a self,
        event: &'a AdminEvent,
    ) -> crate::store::BoxFuture<'a, Result<(), String>>;
    /// Record that the change of `event`, recorded by [`AdminAudit::record`], then failed to
    /// apply (best effort: the caller gets an error either way).
    fn failed<'a>(
        &'a self,
        event: &'a AdminEvent,
        error: &'a str,
    ) -> crate::store::BoxFuture<'a, ()>;
}

/// Records nothing: for a registry without an audit chain (tests, tools). The gateway's admin
/// API always passes its audit log.
#[derive(Clone, Copy, Debug, Default)]
pub struct Unaudited;

impl AdminAudit for Unaudited {
    fn record<'a>(&'a self, _: &'a AdminEvent) -> crate::store::BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    fn failed<'a>(&'a self, _: &'a AdminEvent, _: &'a str) -> crate::store::BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// What the handler needs besides the request: the audit hook and the per-tenant limits.
pub struct AdminOptions<'a> {
    /// Records each state change before it is applied.
    pub audit: &'a dyn AdminAudit,
    /// Most uploaded components one tenant holds.
    pub max_components_per_tenant: usize,
}

impl Default for AdminOptions<'_> {
    fn default() -> Self {
        Self {
            audit: &Unaudited,
            max_components_per_tenant: MAX_COMPONENTS_PER_TENANT,
        }
    }
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

/// Record the event of a change about to be applied. When the audit log refuses it, nothing is
/// applied and the caller gets 503.
async fn audit_first(
    opts: &AdminOptions<'_>,
    call: &AdminCall<'_>,
    action: &'static str,
    detail: Value,
) -> Result<Box<AdminEvent>, AdminReply> {
    let event = Box::new(AdminEvent {
        action,
        tenant: call.tenant.to_string(),
        actor: call.actor.to_string(),
        detail,
    });
    match opts.audit.record(&event).await {
        Ok(()) => Ok(event),
        Err(e) => Err(error(
            503,
            format!("not applied: the audit log did not record it ({e})"),
        )),
    }
}

/// After a recorded change failed to apply: record that, and pass the reply on.
async fn applied_failed(
    opts: &AdminOptions<'_>,
    event: &AdminEvent,
    reply: AdminReply,
) -> AdminReply {
    let message = reply
        .body
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("failed")
        .to_string();
    opts.audit.failed(event, &message).await;
    reply
}

/// A name or other free text of a body: at most `max` bytes, no control characters (a NUL
/// would otherwise reach the store and fail there).
fn check_text(field: &str, v: &str, max: usize) -> Result<(), AdminReply> {
    if v.len() > max {
        return Err(error(400, format!("{field} is longer than {max} bytes")));
    }
    if v.chars().any(char::is_control) {
        return Err(error(
            400,
            format!("{field} must not contain control characters"),
        ));
    }
    Ok(())
}

/// A route without a documented body takes none, `{}`, or only `{"tenant": …}` (which the
/// router resolved); anything else is a 400 naming the field.
fn no_body_fields(body: &[u8]) -> Result<(), AdminReply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TenantOnly {
        #[serde(default, rename = "tenant")]
        _tenant: Option<String>,
    }
    parse::<TenantOnly>(body).map(|_| ())
}

fn bundle_error(e: BundleError) -> AdminReply {
    match &e {
        BundleError::UnknownBundle(_) | BundleError::NotTenantComponent(_) => error(404, e),
        BundleError::NoPrevious(_)
        | BundleError::TooManyDrafts { .. }
        | BundleError::TooManyComponents { .. }
        | BundleError::TenantComponentQuota { .. }
        | BundleError::ComponentInUse { .. } => error(409, e),
        BundleError::Plugin(PluginError::Busy(_))
        | BundleError::Invalid {
            error: PluginError::Busy(_),
            ..
        } => error(503, e),
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

/// Handle the request when the path is ours; `None` otherwise. Records nothing in an audit
/// chain ([`Unaudited`]) and applies the default limits: for a registry without a gateway.
pub async fn handle(registry: &Registry, call: AdminCall<'_>) -> Option<AdminReply> {
    handle_with(registry, call, &AdminOptions::default()).await
}

/// Handle the request when the path is ours (`None` otherwise), recording every state change
/// through `opts.audit` before applying it.
pub async fn handle_with(
    registry: &Registry,
    call: AdminCall<'_>,
    opts: &AdminOptions<'_>,
) -> Option<AdminReply> {
    let path = call.path.trim_end_matches('/');
    let rest = path.strip_prefix("/v1/admin/")?;
    let segments: Vec<&str> = rest.split('/').collect();
    let method = call.method.as_str();
    let reply = match (method, segments.as_slice()) {
        (_, ["plugins", ..]) => plugins(registry, &call, opts, &segments[1..]).await,
        (_, ["bundles", ..]) => bundles(registry, &call, opts, &segments[1..]).await,
        (_, ["policies", ..]) => policies(registry, &call, opts, &segments[1..]).await,
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

/// Store (again) the bundles a pointer is about to name and their components, so a stored
/// pointer never names a bundle the other replicas (or this one restarting) cannot load: a
/// draft or component whose store write failed when it was made may still be in memory. The
/// built-in components a bundle names are stored too: another build of the gateway (an
/// upgrade, a rolling one) has other built-ins, and loads the bundle with these bytes.
/// Every write is idempotent.
async fn store_pointed(
    registry: &Registry,
    persist: &super::persist::Persist,
    tenant: &str,
    actor: &str,
) -> Result<(), super::persist::PersistError> {
    let status = registry.status(tenant);
    let drafts = registry.drafts(tenant);
    let default = registry.default_spec().digest();
    for digest in std::iter::once(&status.active).chain(status.previous.as_ref()) {
        if *digest == default {
            continue;
        }
        let Some(draft) = drafts.iter().find(|d| d.digest == *digest) else {
            continue;
        };
        for component in draft.spec.component_digests() {
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

/// A component's compile, as its upload request and the compiling thread share it.
#[derive(Default)]
struct Compiling {
    /// The request went away: the compile undoes its entry when it ends.
    abandoned: bool,
    /// The compile ended and its entry is the request's to keep or undo.
    done: bool,
}

/// Marks a compile abandoned when its request is dropped before it was answered, and undoes
/// the entry of a compile that ended meanwhile.
struct AbandonCompile {
    compiling: Arc<std::sync::Mutex<Compiling>>,
    registry: Registry,
    digest: String,
    /// The component was there before this upload: never undone here.
    known: bool,
    armed: bool,
}

impl AbandonCompile {
    /// The request got the compile's answer: its entry is the request's now.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for AbandonCompile {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut c = self.compiling.lock().unwrap_or_else(|p| p.into_inner());
        c.abandoned = true;
        if std::mem::take(&mut c.done) && !self.known {
            self.registry.remove_component(&self.digest);
        }
    }
}

/// Uploads in this process, one at a time (see the upload handler).
static UPLOADS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An uploaded component not yet recorded, owned and stored: dropped before [`Self::keep`],
/// it gives up the ownership it added and removes a component that was not there before.
struct PendingUpload<'a> {
    registry: &'a Registry,
    digest: String,
    /// The component was there before this upload (another tenant's, or a built-in).
    known: bool,
    /// The tenant this upload made an owner.
    owner: Option<String>,
}

impl PendingUpload<'_> {
    fn keep(mut self) {
        self.known = true;
        self.owner = None;
    }
}

impl Drop for PendingUpload<'_> {
    fn drop(&mut self) {
        if let Some(tenant) = self.owner.take() {
            self.registry.remove_component_owner(&self.digest, &tenant);
        }
        if !self.known {
            self.registry.remove_component(&self.digest);
        }
    }
}

/// Make a swap (`promote` or `rollback`) and store the tenant's new pointer, which the other
/// replicas follow. Both happen under the registry's swap gate, so this replica's follower
/// cannot interleave an older pointer. The bundles the pointer names are stored first. When the
/// store refuses either the swap is undone and the caller gets 503: a swap is either on every
/// replica or on none. The pointer is a compare-and-set on the `seq` this replica runs: when
/// another replica swapped meanwhile, the swap here is undone too and the caller gets 409 (this
/// replica's follower brings it up to date; then a retry works).
///
/// It runs as a task of its own: a client that goes away mid-swap (its request dropped) must
/// not leave the swap made here and its pointer never stored, nor release the gate while the
/// swap still runs.
async fn swap_and_store(
    registry: &Registry,
    tenant: &str,
    actor: &str,
    gate: Gate,
    swap: impl FnOnce(&Registry) -> Result<SwapOutcome, BundleError> + Send + 'static,
) -> Result<SwapOutcome, AdminReply> {
    let (registry, tenant, actor) = (registry.clone(), tenant.to_owned(), actor.to_owned());
    tokio::spawn(async move {
        let _gate = gate;
        swap_and_store_whole(&registry, &tenant, &actor, swap).await
    })
    .await
    .unwrap_or_else(|e| Err(error(500, format!("the swap's task failed: {e}"))))
}

/// The tenant's swap gate ([`Registry::swap_gate`]), held.
type Gate = tokio::sync::OwnedMutexGuard<()>;

/// Makes the swap and stores its pointer; the caller holds the tenant's swap gate.
async fn swap_and_store_whole(
    registry: &Registry,
    tenant: &str,
    actor: &str,
    swap: impl FnOnce(&Registry) -> Result<SwapOutcome, BundleError> + Send + 'static,
) -> Result<SwapOutcome, AdminReply> {
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

/// Record a swap, then make it (see [`swap_and_store`]); when it then fails, record that.
///
/// The tenant's swap gate is held from the plan (`plan` gives the event's detail, `{from,
/// to}`) to the stored pointer, so the event says what the swap does: two rollbacks at once
/// are recorded as the two swaps they make, not twice as the first.
async fn audited_swap(
    registry: &Registry,
    call: &AdminCall<'_>,
    opts: &AdminOptions<'_>,
    action: &'static str,
    plan: impl FnOnce(&Registry) -> Result<Value, AdminReply>,
    swap: impl FnOnce(&Registry) -> Result<SwapOutcome, BundleError> + Send + 'static,
) -> Result<(SwapOutcome, Box<AdminEvent>), AdminReply> {
    let gate = registry.swap_gate(call.tenant).lock_owned().await;
    let detail = plan(registry)?;
    let event = audit_first(opts, call, action, detail).await?;
    match swap_and_store(registry, call.tenant, call.actor, gate, swap).await {
        Ok(outcome) => Ok((outcome, event)),
        Err(r) => Err(applied_failed(opts, &event, r).await),
    }
}

/// The checks a promotion can fail cheaply, before its event is recorded: the bundle exists.
/// Returns the event detail `{from, to}` (what the swap will do).
fn promotion(registry: &Registry, tenant: &str, digest: &str) -> Result<Value, AdminReply> {
    if !registry.has_bundle(tenant, digest) {
        return Err(error(404, format!("unknown bundle {digest}")));
    }
    let to = if digest == "default" {
        registry.default_spec().digest()
    } else {
        digest.to_string()
    };
    Ok(json!({"from": registry.status(tenant).active, "to": to}))
}

/// Likewise for a rollback: there is a target.
fn rollback_target(registry: &Registry, tenant: &str) -> Result<Value, AdminReply> {
    let status = registry.status(tenant);
    let Some(previous) = status.previous else {
        return Err(bundle_error(BundleError::NoPrevious(tenant.to_string())));
    };
    Ok(json!({"from": status.active, "to": previous}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadJson {
    name: String,
    wasm_base64: String,
    /// Resolved by the router (body or query); accepted here.
    #[serde(default, rename = "tenant")]
    _tenant: Option<String>,
}

async fn plugins(
    registry: &Registry,
    call: &AdminCall<'_>,
    opts: &AdminOptions<'_>,
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
            check_text("name", &name, 128)?;
            let expect = match query_param(call.query, "world").unwrap_or("check-plugin") {
                "check-plugin" => World::CheckPlugin,
                // `formatter` is the world's name; `siem-formatter` its earlier one.
                "formatter" | "siem-formatter" => World::SiemFormatter,
                other => return Err(error(400, format!("unknown world {other:?}"))),
            };
            // One upload at a time in this process, from the quota's check to the component's
            // owner: parallel uploads must not all pass the check before any is counted.
            let _gate = UPLOADS.lock().await;
            registry
                .component_room(
                    &crate::plugins::runtime::digest_of(&wasm),
                    call.tenant,
                    opts.max_components_per_tenant,
                )
                .map_err(bundle_error)?;
            let digest = crate::plugins::runtime::digest_of(&wasm);
            let known = registry.components().iter().any(|c| c.digest == digest);
            // Compiled (and so validated) before its event is recorded; no tenant may use it
            // until it is recorded, stored and owned below. The compile runs on to its end
            // even when this request is dropped meanwhile; then it undoes its own entry.
            let compiling = Arc::new(std::sync::Mutex::new(Compiling::default()));
            let abandon = AbandonCompile {
                compiling: Arc::clone(&compiling),
                registry: registry.clone(),
                known,
                digest,
                armed: true,
            };
            let (r2, c2) = (registry.clone(), Arc::clone(&compiling));
            let info = blocking(move || {
                let info = r2.upload_component(&name, &wasm, expect)?;
                let mut c = c2.lock().unwrap_or_else(|p| p.into_inner());
                if c.abandoned {
                    if !known {
                        r2.remove_component(&info.digest);
                    }
                } else {
                    c.done = true;
                }
                Ok(info)
            })
            .await?
            .map_err(|e: BundleError| error(422, e))?;
            abandon.disarm();
            // Until it is recorded, owned and stored, the component is undone however this
            // ends: an error, or the request dropped (a client gone) between two awaits.
            let mut pending = PendingUpload {
                registry,
                digest: info.digest.clone(),
                known,
                owner: None,
            };
            let detail = json!({"digest": info.digest, "world": info.world, "name": info.name});
            let event = audit_first(opts, call, "plugin.upload", detail).await?;
            if registry.add_component_owner(&info.digest, call.tenant) {
                pending.owner = Some(call.tenant.to_owned());
            }
            if let Err(e) = store_component(registry, call.tenant, &info, call.actor).await {
                // Not stored, so not kept: a bundle naming it could not be loaded elsewhere.
                drop(pending);
                return Err(applied_failed(opts, &event, e).await);
            }
            pending.keep();
            Ok(AdminReply {
                status: 201,
                body: json!(info),
                event: Some(event),
            })
        }
        ("DELETE", [digest]) => {
            if !registry.holds_component(call.tenant, digest) {
                return Err(bundle_error(BundleError::NotTenantComponent(
                    digest.to_string(),
                )));
            }
            if let Some(by) = registry.component_user(call.tenant, digest) {
                return Err(bundle_error(BundleError::ComponentInUse {
                    digest: digest.to_string(),
                    by,
                }));
            }
            let event = audit_first(opts, call, "plugin.delete", json!({"digest": digest})).await?;
            if let Some(persist) = registry.persist()
                && let Err(e) = persist.delete_component(call.tenant, digest).await
            {
                return Err(applied_failed(opts, &event, error(503, e)).await);
            }
            registry.release_component(call.tenant, digest);
            Ok(AdminReply {
                status: 204,
                body: Value::Null,
                event: Some(event),
            })
        }
        _ => Err(error(405, "method not allowed")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DraftCreate {
    #[serde(default)]
    name: String,
    spec: BundleSpec,
    /// Resolved by the router (body or query); accepted here.
    #[serde(default, rename = "tenant")]
    _tenant: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DryRunBody {
    #[serde(default)]
    calls: Vec<RecordedCall>,
    /// `last-24h` and the like: the tenant's recorded decisions of that window.
    #[serde(default)]
    sample: Option<String>,
    /// Resolved by the router (body or query); accepted here.
    #[serde(default, rename = "tenant")]
    _tenant: Option<String>,
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
    // Each call is replayed through every check of the candidate: as many as a sample holds.
    let most = super::sample::MAX_SAMPLE;
    if calls.len() > most {
        return Err(error(
            400,
            format!(
                "at most {most} calls in one dry run ({} given)",
                calls.len()
            ),
        ));
    }
    if let Some(name) = sample {
        let room = most - calls.len();
        let window = super::sample::window_ms(name).map_err(|e| error(400, e))?;
        let persist = registry
            .persist()
            .ok_or_else(|| error(400, "sample: this gateway has no audit store to read"))?;
        let now = crate::audit::time::now_ms();
        let recorded = super::sample::recorded_calls(persist.db(), tenant, window, now)
            .await
            .map_err(|e| error(503, e))?;
        // The newest first: given and sampled calls together stay within the bound.
        calls.extend(recorded.into_iter().take(room));
    }
    Ok(calls)
}

/// How long a dry-run waits for its place before it is refused (429).
const DRY_RUN_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A dry-run's place ([`Registry::dry_run_place`]), or 429 once it waited [`DRY_RUN_WAIT`].
async fn dry_run_place(
    registry: &Registry,
    tenant: &str,
) -> Result<impl Send + 'static, AdminReply> {
    registry
        .dry_run_place(tenant, DRY_RUN_WAIT)
        .await
        .ok_or_else(|| {
            error(
                429,
                "too many dry runs at once (one a tenant, two a gateway); retry when one ends",
            )
        })
}

/// Delete a draft (not the active bundle nor the rollback target: 409): 404 unless it exists,
/// then its event, then the store, then memory (so a store that refuses leaves the draft
/// everywhere).
async fn delete_draft(
    registry: &Registry,
    call: &AdminCall<'_>,
    opts: &AdminOptions<'_>,
    digest: &str,
    action: &'static str,
    detail: Value,
) -> Result<Box<AdminEvent>, AdminReply> {
    let tenant = call.tenant;
    // Under the tenant's swap gate: a promote of this draft under way finishes first (and the
    // draft, then active, is refused below), rather than running a bundle no draft names.
    let gate = registry.swap_gate(tenant);
    let _gate = gate.lock().await;
    if !draft_exists(registry, tenant, digest) {
        return Err(error(404, format!("unknown draft {digest}")));
    }
    let status = registry.status(tenant);
    if status.active == digest {
        return Err(error(409, format!("draft {digest} is the active bundle")));
    }
    if status.previous.as_deref() == Some(digest) {
        return Err(error(
            409,
            format!("draft {digest} is the rollback target; promote another bundle first"),
        ));
    }
    let event = audit_first(opts, call, action, detail).await?;
    if let Err(r) = store_delete(registry, tenant, digest).await {
        return Err(applied_failed(opts, &event, r).await);
    }
    registry.delete_draft(tenant, digest);
    Ok(event)
}

async fn bundles(
    registry: &Registry,
    call: &AdminCall<'_>,
    opts: &AdminOptions<'_>,
    rest: &[&str],
) -> Result<AdminReply, AdminReply> {
    let tenant = call.tenant.to_string();
    match (call.method.as_str(), rest) {
        ("GET", []) => Ok(reply(
            200,
            json!({"status": registry.status(&tenant), "drafts": registry.drafts(&tenant)}),
        )),
        ("GET", ["history"]) => {
            let history: Vec<SwapOutcome> = registry.history(&tenant);
            Ok(reply(200, json!(history)))
        }
        ("POST", []) => {
            let body: DraftCreate = parse(call.body)?;
            check_text("name", &body.name, 128)?;
            // A tenant builds bundles from the built-ins and the components it uploaded.
            // A component of the tenant's that is stored but not loaded (an earlier build of a
            // built-in, loaded only when a bundle names it) is loaded now.
            if let Some(persist) = registry.persist() {
                for d in body.spec.component_digests() {
                    if registry.component_bytes(d).is_none()
                        && registry.may_use_component(&tenant, d)
                        && let Err(e) = persist.load_component(registry, d).await
                    {
                        tracing::warn!(component = %d, error = %e, "bundles: a stored component does not load");
                    }
                }
            }
            // One answer whether another tenant uploaded it or nobody did: a tenant must not
            // learn which components other tenants hold.
            if let Some(foreign) = body
                .spec
                .component_digests()
                .find(|d| !registry.may_use_component(&tenant, d))
            {
                return Err(error(
                    422,
                    format!(
                        "component {foreign} is not a built-in nor one tenant {tenant} uploaded: upload it as this tenant first"
                    ),
                ));
            }
            let existed = draft_exists(registry, &tenant, &body.spec.digest());
            registry
                .draft_room(&tenant, Some(&body.spec.digest()))
                .map_err(bundle_error)?;
            let r2 = registry.clone();
            let t = tenant.clone();
            let draft = blocking(move || r2.check_draft(&t, &body.name, body.spec))
                .await?
                .map_err(bundle_error)?;
            let detail = json!({"digest": draft.digest, "name": draft.name});
            let event = audit_first(opts, call, "bundle.draft", detail).await?;
            let draft = registry.insert_draft(&tenant, draft);
            if let Err(r) = store_draft(registry, call.tenant, &draft, call.actor, existed).await {
                return Err(applied_failed(opts, &event, r).await);
            }
            Ok(AdminReply {
                status: 201,
                body: json!(draft),
                event: Some(event),
            })
        }
        ("GET", [digest]) => {
            if let Some(d) = registry
                .drafts(&tenant)
                .into_iter()
                .find(|d| d.digest == *digest)
            {
                return Ok(reply(200, json!(d)));
            }
            // Every bundle the tenant runs can be fetched, the built-in default included, so
            // an operator can copy it and change it (`intentgate bundle new --from active`).
            let status = registry.status(&tenant);
            let default = registry.default_spec();
            let spec = if *digest == default.digest() {
                Some(default.clone())
            } else if *digest == status.active {
                Some(registry.active_spec(&tenant))
            } else {
                None
            };
            spec.map(|spec| {
                let is_default = spec.digest() == default.digest();
                reply(
                    200,
                    json!({
                        "digest": digest,
                        "name": if is_default { "default" } else { "active" },
                        "created_at": null,
                        "spec": spec,
                        "builtin": is_default,
                    }),
                )
            })
            .ok_or_else(|| error(404, format!("unknown bundle {digest}")))
        }
        ("DELETE", [digest]) => {
            let event = delete_draft(
                registry,
                call,
                opts,
                digest,
                "bundle.delete",
                json!({"digest": digest}),
            )
            .await?;
            Ok(AdminReply {
                status: 204,
                body: Value::Null,
                event: Some(event),
            })
        }
        ("POST", ["rollback"]) => {
            no_body_fields(call.body)?;
            let plan = |r: &Registry| rollback_target(r, &tenant);
            let t = tenant.clone();
            let (outcome, event) =
                audited_swap(registry, call, opts, "bundle.rollback", plan, move |r| {
                    r.rollback(&t)
                })
                .await?;
            Ok(AdminReply {
                status: 200,
                body: json!(outcome),
                event: Some(event),
            })
        }
        ("POST", [digest, "promote"]) => {
            no_body_fields(call.body)?;
            let plan = |r: &Registry| promotion(r, &tenant, digest);
            let (t, digest) = (tenant.clone(), digest.to_string());
            let (outcome, event) =
                audited_swap(registry, call, opts, "bundle.promote", plan, move |r| {
                    r.promote(&t, &digest)
                })
                .await?;
            Ok(AdminReply {
                status: 200,
                body: json!(outcome),
                event: Some(event),
            })
        }
        ("POST", [digest, "dry-run"]) => {
            let body: DryRunBody = parse(call.body)?;
            let slot = dry_run_place(registry, &tenant).await?;
            let calls = replay_set(registry, &tenant, body.calls, body.sample.as_deref()).await?;
            let (r2, digest) = (registry.clone(), digest.to_string());
            // The slot goes with the replay: a client that leaves does not free it early.
            let report = blocking(move || {
                let _slot = slot;
                r2.dry_run(&tenant, &digest, &calls)
            })
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
    let promoted_at = registry.history(tenant).last().map(|h| rfc3339(h.at));
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

/// IntentGate's `DraftCreate`. `description` and `created_by` are recorded in the audit event
/// (and echoed); the authenticated principal stays the event's actor.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyDraftCreate {
    rego_source: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    created_by: Option<String>,
    /// Resolved by the router (body or query); accepted here.
    #[serde(default, rename = "tenant")]
    _tenant: Option<String>,
}

/// IntentGate's `PromoteRequest`. `promoted_by` is recorded in the audit event (and echoed).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteRequest {
    draft_id: String,
    #[serde(default)]
    promoted_by: Option<String>,
    /// Resolved by the router (body or query); accepted here.
    #[serde(default, rename = "tenant")]
    _tenant: Option<String>,
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
#[serde(deny_unknown_fields)]
struct PolicyDryRun {
    rego_source: String,
    /// Resolved by the router (body or query); accepted here.
    #[serde(default, rename = "tenant")]
    _tenant: Option<String>,
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
    opts: &AdminOptions<'_>,
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
            check_text("name", &name, 128)?;
            let description = body.description.unwrap_or_default();
            check_text("description", &description, 1024)?;
            let created_by = body.created_by.unwrap_or_default();
            check_text("created_by", &created_by, 256)?;
            registry.draft_room(&tenant, None).map_err(bundle_error)?;
            let (registry2, t) = (registry.clone(), tenant.clone());
            let draft = blocking(move || {
                let spec = registry2
                    .active_spec(&t)
                    .with_policy_config(body.rego_source);
                registry2.check_draft(&t, &name, spec)
            })
            .await?
            .map_err(|e| error(400, e))?;
            let existed = draft_exists(registry, &tenant, &draft.digest);
            let detail = json!({"id": draft.digest, "name": draft.name,
                "description": description, "created_by": created_by});
            let event = audit_first(opts, call, "policy.draft", detail).await?;
            let draft = registry.insert_draft(&tenant, draft);
            if let Err(r) = store_draft(registry, call.tenant, &draft, call.actor, existed).await {
                return Err(applied_failed(opts, &event, r).await);
            }
            let mut body = draft_json(&tenant, &draft, true);
            if let Some(obj) = body.as_object_mut() {
                obj.insert("description".into(), json!(description));
                obj.insert("created_by".into(), json!(created_by));
            }
            Ok(AdminReply {
                status: 201,
                body,
                event: Some(event),
            })
        }
        ("GET", ["drafts", id]) => registry
            .drafts(&tenant)
            .iter()
            .find(|d| d.digest == *id)
            .map(|d| reply(200, draft_json(&tenant, d, true)))
            .ok_or_else(|| error(404, format!("unknown draft {id}"))),
        ("PUT", ["drafts", _]) => Err(error(
            405,
            "drafts are content-addressed and immutable: POST /v1/admin/policies/drafts a new one",
        )),
        ("DELETE", ["drafts", id]) => {
            let event = delete_draft(
                registry,
                call,
                opts,
                id,
                "policy.draft.delete",
                json!({"id": id}),
            )
            .await?;
            Ok(AdminReply {
                status: 204,
                body: Value::Null,
                event: Some(event),
            })
        }
        ("GET", ["active"]) => Ok(reply(200, active_json(registry, &tenant))),
        ("POST", ["active"]) => {
            let body: PromoteRequest = parse(call.body)?;
            let promoted_by = body.promoted_by.unwrap_or_default();
            check_text("promoted_by", &promoted_by, 256)?;
            let plan = |r: &Registry| {
                let mut detail = promotion(r, &tenant, &body.draft_id)?;
                if let Some(obj) = detail.as_object_mut() {
                    obj.insert("promoted_by".into(), json!(promoted_by));
                }
                Ok(detail)
            };
            let (t, draft_id) = (tenant.clone(), body.draft_id.clone());
            let (_, event) = audited_swap(registry, call, opts, "policy.promote", plan, move |r| {
                r.promote(&t, &draft_id)
            })
            .await?;
            let mut body = active_json(registry, &tenant);
            if let Some(obj) = body.as_object_mut() {
                obj.insert("promoted_by".into(), json!(promoted_by));
            }
            Ok(AdminReply {
                status: 200,
                body,
                event: Some(event),
            })
        }
        ("DELETE", ["active"]) => {
            // Back to the default bundle: deny by default (fail closed).
            let plan = |r: &Registry| promotion(r, &tenant, "default");
            let t = tenant.clone();
            let (_, event) = audited_swap(registry, call, opts, "policy.clear", plan, move |r| {
                r.promote(&t, "default")
            })
            .await?;
            Ok(AdminReply {
                status: 204,
                body: Value::Null,
                event: Some(event),
            })
        }
        ("POST", ["rollback"]) => {
            no_body_fields(call.body)?;
            let plan = |r: &Registry| rollback_target(r, &tenant);
            let t = tenant.clone();
            let (_, event) =
                audited_swap(registry, call, opts, "policy.rollback", plan, move |r| {
                    r.rollback(&t)
                })
                .await?;
            Ok(AdminReply {
                status: 200,
                body: active_json(registry, &tenant),
                event: Some(event),
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
            let slot = dry_run_place(registry, &tenant).await?;
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
                let _slot = slot;
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
