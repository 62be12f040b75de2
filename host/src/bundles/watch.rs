//! Development mode (`intentgate serve --watch DIR`): saving a `.rego` or `.wasm` file in DIR
//! reloads the bundle of the watched tenants, without restart.
//!
//! The folder becomes one bundle: the default bundle with the policy stage's Rego replaced by
//! every `*.rego` file (files ending in `_test.rego` are its tests, which must pass), and every
//! `*.wasm` file added as a custom check of the policy stage (configured by `<stem>.json` when
//! present). A save that does not load (Rego error, failing test, bad component) is logged and
//! the running bundle stays. It never writes into DIR and is not meant for production.

use super::registry::{BundleError, Registry, SwapOutcome};
use super::spec::CheckSpec;
use crate::plugins::{Stage, World};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// How long the folder must be quiet before a reload (editors save in several steps).
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Errors of watch mode.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The folder could not be read.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
    /// The file watcher failed.
    #[error("watching {0}")]
    Notify(#[from] notify::Error),
    /// The folder does not make a valid bundle.
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// Keeps the watch alive; dropping it stops watching.
pub struct WatchHandle {
    _watcher: RecommendedWatcher,
}

impl std::fmt::Debug for WatchHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchHandle").finish_non_exhaustive()
    }
}

/// Build the folder's bundle and promote it for every tenant in `tenants` (synchronous, slow).
pub fn apply_dir(
    registry: &Registry,
    dir: &Path,
    tenants: &[String],
) -> Result<Vec<SwapOutcome>, WatchError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WatchError::Io { path, source }
    };
    let mut modules = BTreeMap::new();
    let mut tests = BTreeMap::new();
    let mut components = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        match path.extension().and_then(|e| e.to_str()) {
            Some("rego") => {
                let text = std::fs::read_to_string(&path).map_err(io(&path))?;
                if name.ends_with("_test.rego") {
                    tests.insert(name, text);
                } else {
                    modules.insert(name, text);
                }
            }
            Some("wasm") => {
                let wasm = std::fs::read(&path).map_err(io(&path))?;
                let config_path = path.with_extension("json");
                let config = if config_path.is_file() {
                    std::fs::read_to_string(&config_path).map_err(io(&config_path))?
                } else {
                    String::new()
                };
                components.push((name, wasm, config));
            }
            _ => {}
        }
    }
    let mut spec = registry.default_spec().clone();
    if !modules.is_empty() {
        let config = serde_json::json!({"modules": modules, "tests": tests});
        spec = spec.with_policy_config(config.to_string());
    }
    for (name, wasm, config) in components {
        let info = registry.upload_component(&name, &wasm, World::CheckPlugin)?;
        spec.stages
            .entry(Stage::Policy)
            .or_default()
            .push(CheckSpec {
                component: info.digest,
                config,
            });
    }
    let mut outcomes = Vec::new();
    for tenant in tenants {
        let draft = registry.create_draft(tenant, "watch", spec.clone())?;
        if registry.status(tenant).active != draft.digest {
            outcomes.push(registry.promote(tenant, &draft.digest)?);
        }
    }
    Ok(outcomes)
}

/// Apply the folder now, then again after every change (debounced), on a thread of its own.
/// An initial failure is returned; later ones are logged and the running bundle stays.
pub fn watch(
    registry: Registry,
    dir: PathBuf,
    tenants: Vec<String>,
) -> Result<WatchHandle, WatchError> {
    apply_dir(&registry, &dir, &tenants)?;
    let (tx, rx) = mpsc::channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(tx)?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let spawned = std::thread::Builder::new().name("intentgate-watch".into()).spawn(move || {
        // Ends when the watcher (and so the sender) is dropped.
        while let Ok(first) = rx.recv() {
            let mut relevant = is_relevant(&first);
            while let Ok(next) = rx.recv_timeout(DEBOUNCE) {
                relevant |= is_relevant(&next);
            }
            if !relevant {
                continue;
            }
            match apply_dir(&registry, &dir, &tenants) {
                Ok(outcomes) => {
                    for o in outcomes {
                        tracing::info!(tenant = %o.tenant, from = %o.from, to = %o.to, "watch: bundle reloaded");
                    }
                }
                Err(e) => tracing::warn!(dir = %dir.display(), "watch: reload refused, keeping the running bundle: {e}"),
            }
        }
    });
    spawned.map_err(|source| WatchError::Io {
        path: PathBuf::from("<watch thread>"),
        source,
    })?;
    Ok(WatchHandle { _watcher: watcher })
}

fn is_relevant(event: &notify::Result<notify::Event>) -> bool {
    match event {
        Ok(e) => e.paths.iter().any(|p| {
            matches!(
                p.extension().and_then(|x| x.to_str()),
                Some("rego" | "wasm" | "json")
            )
        }),
        Err(_) => false,
    }
}
