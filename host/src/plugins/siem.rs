//! Formatter components (world `intentgate:plugin/formatter`, or `siem-formatter` as it was
//! named before): a batch of canonical audit events in, an HTTP request body and headers out.
//! The host does the I/O; a formatter never sees the network.
//!
//! Batches are rare compared with tool calls, so each batch runs on a fresh instance (no pool),
//! under the same deadline and memory limits as checks.

use super::counters::MemoryCounters;
use super::host_state::{self, HostState};
use super::runtime::{Runtime, SiemPre};
use super::{PluginError, Stage};
use std::sync::Arc;

/// What a formatter produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormattedRequest {
    /// `Content-Type` of the body.
    pub content_type: String,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// A compiled formatter with its configuration.
pub struct Formatter {
    runtime: Arc<Runtime>,
    pre: SiemPre,
    config: Arc<str>,
    digest: Arc<str>,
}

impl Formatter {
    /// Compile and link; refuses components of another world.
    pub fn new(runtime: Arc<Runtime>, wasm: &[u8], config: &str) -> Result<Self, PluginError> {
        let (digest, component) = runtime.compile(wasm)?;
        let pre = runtime.siem_pre(&component)?;
        Ok(Self {
            runtime,
            pre,
            config: config.into(),
            digest: digest.into(),
        })
    }

    /// Format one batch (canonical JSON events, oldest first).
    pub fn format(&self, events: &[String]) -> Result<FormattedRequest, PluginError> {
        let stage = Stage::Siem;
        let _slot = self.runtime.reserve(None)?;
        let _awake = self.runtime.awake();
        let limits = &self.runtime.limits;
        let state = HostState::new(
            limits.max_memory_bytes,
            Arc::new(MemoryCounters::default()),
            "-".into(),
            Some(stage),
            self.digest.clone(),
        );
        let mut store = state.into_store(self.runtime.engine());
        host_state::arm(&mut store, limits.configure_deadline, false);
        let instantiate_error = |e: wasmtime::Error| PluginError::Instantiate {
            stage,
            detail: format!("{e:#}"),
        };
        // The two worlds differ only in the export's name; the calls are the same.
        macro_rules! run {
            ($api:expr) => {{
                let api = $api;
                let configured = api.call_configure(&mut store, &self.config);
                match configured {
                    Ok(Ok(())) => {
                        host_state::arm(&mut store, limits.call_deadline, false);
                        let formatted = api.call_format(&mut store, events);
                        (Ok(Ok(())), Some(formatted))
                    }
                    other => (other, None),
                }
            }};
        }
        let (configured, formatted) = match &self.pre {
            SiemPre::Current(pre) => {
                let b = pre.instantiate(&mut store).map_err(instantiate_error)?;
                run!(b.intentgate_plugin_format())
            }
            SiemPre::Legacy(pre) => {
                let b = pre.instantiate(&mut store).map_err(instantiate_error)?;
                run!(b.intentgate_plugin_formatter())
            }
        };
        match configured {
            Ok(Ok(())) => {}
            Ok(Err(message)) => return Err(PluginError::Configure { stage, message }),
            Err(e) => {
                return Err(self.runtime.classify(
                    stage,
                    e,
                    store.data().limiter.exceeded,
                    limits.configure_deadline,
                ));
            }
        }
        match formatted {
            Some(Ok(Ok(r))) => Ok(FormattedRequest {
                content_type: r.content_type,
                headers: r.headers,
                body: r.body,
            }),
            Some(Ok(Err(detail))) => Err(PluginError::Malformed { stage, detail }),
            Some(Err(e)) => Err(self.runtime.classify(
                stage,
                e,
                store.data().limiter.exceeded,
                limits.call_deadline,
            )),
            None => Err(PluginError::Malformed {
                stage,
                detail: "formatter was not configured".into(),
            }),
        }
    }
}
