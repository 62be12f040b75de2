//! SIEM formatter components (world `siem-formatter`): a batch of canonical audit events in, an
//! HTTP request body and headers out. The host does the I/O; a formatter never sees the network.
//!
//! Batches are rare compared with tool calls, so each batch runs on a fresh instance (no pool),
//! under the same deadline and memory limits as checks.

use super::bindings::siem as sb;
use super::counters::MemoryCounters;
use super::host_state::{self, HostState};
use super::runtime::Runtime;
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
    pre: sb::SiemFormatterPre<HostState>,
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
        let bindings = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| PluginError::Instantiate {
                stage,
                detail: format!("{e:#}"),
            })?;
        let api = bindings.intentgate_plugin_formatter();
        match api.call_configure(&mut store, &self.config) {
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
        host_state::arm(&mut store, limits.call_deadline, false);
        match api.call_format(&mut store, events) {
            Ok(Ok(r)) => Ok(FormattedRequest {
                content_type: r.content_type,
                headers: r.headers,
                body: r.body,
            }),
            Ok(Err(detail)) => Err(PluginError::Malformed { stage, detail }),
            Err(e) => Err(self.runtime.classify(
                stage,
                e,
                store.data().limiter.exceeded,
                limits.call_deadline,
            )),
        }
    }
}
