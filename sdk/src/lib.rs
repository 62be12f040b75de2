//! IntentGate plugin SDK: write a check plugin as a plain Rust type, test it natively with
//! `cargo test`, build it with `cargo build --release --target wasm32-wasip2`.
//!
//! ```ignore
//! use intentgate_plugin_sdk::{Check, CheckResult, IntentRecord, ToolCall, Verdict};
//!
//! struct NoWeekendDeletes;
//!
//! impl Check for NoWeekendDeletes {
//!     fn configure(_config: &str) -> Result<Self, String> { Ok(Self) }
//!     fn evaluate(&self, call: &ToolCall, _intent: Option<&IntentRecord>) -> CheckResult {
//!         if call.tool.starts_with("delete_") { Verdict::block("no deletes").into() }
//!         else { Verdict::allow("ok").into() }
//!     }
//! }
//!
//! intentgate_plugin_sdk::export_check!(NoWeekendDeletes);
//! ```
//!
//! # Layout
//!
//! | module | what |
//! |---|---|
//! | [`bindings`] | the wit-bindgen output for the `intentgate:plugin@0.2.0` worlds |
//! | [`host`] | the host imports (log, clock, counters), routed to the test harness natively |
//! | [`testing`] | the native test harness and a tool-call builder |
//!
//! The SDK never performs I/O of its own: a plugin gets only what the host grants.

pub mod bindings;
pub mod host;
pub mod testing;

use std::cell::RefCell;

pub use bindings::check::intentgate::plugin::types::{
    Charge, CheckResult, FormattedRequest, IntentRecord, TokenInfo, ToolCall, Usage, Verdict,
    VerdictKind,
};
pub use serde_json;

/// A check plugin. `configure` runs once per instance with the stage's configuration text;
/// `evaluate` runs once per tool call and must be fast and deterministic.
pub trait Check: 'static {
    /// Parse the configuration. An error refuses the bundle at load time.
    fn configure(config: &str) -> Result<Self, String>
    where
        Self: Sized;

    /// Decide one call. `intent` is the intent stage's record (absent in the intent stage).
    fn evaluate(&self, call: &ToolCall, intent: Option<&IntentRecord>) -> CheckResult;
}

/// A formatter plugin (world `intentgate:plugin/formatter`): a batch of canonical JSON audit
/// events in, an HTTP request out.
pub trait Formatter: 'static {
    /// Parse the configuration.
    fn configure(config: &str) -> Result<Self, String>
    where
        Self: Sized;

    /// Format one batch of events (canonical JSON texts, oldest first).
    fn format(&self, events: &[String]) -> Result<FormattedRequest, String>;
}

impl Verdict {
    /// Allow the call.
    pub fn allow(reason: impl Into<String>) -> Self {
        Self {
            kind: VerdictKind::Allow,
            reason: reason.into(),
            requires_step_up: false,
        }
    }

    /// Block the call.
    pub fn block(reason: impl Into<String>) -> Self {
        Self {
            kind: VerdictKind::Block,
            reason: reason.into(),
            requires_step_up: false,
        }
    }

    /// Send the call to human review.
    pub fn escalate(reason: impl Into<String>) -> Self {
        Self {
            kind: VerdictKind::Escalate,
            reason: reason.into(),
            requires_step_up: false,
        }
    }

    /// Require a step-up (fresh approval) for this call.
    #[must_use]
    pub fn with_step_up(mut self) -> Self {
        self.requires_step_up = true;
        self
    }

    /// True when the verdict allows the call.
    pub fn is_allow(&self) -> bool {
        matches!(self.kind, VerdictKind::Allow)
    }
}

impl From<Verdict> for CheckResult {
    fn from(verdict: Verdict) -> Self {
        CheckResult {
            verdict,
            intent: None,
            charges: Vec::new(),
        }
    }
}

impl CheckResult {
    /// Attach an intent record (the intent stage must).
    #[must_use]
    pub fn with_intent(mut self, intent: IntentRecord) -> Self {
        self.intent = Some(intent);
        self
    }

    /// Attach budget charges (only the budget stage may).
    #[must_use]
    pub fn with_charges(mut self, charges: Vec<Charge>) -> Self {
        self.charges = charges;
        self
    }
}

impl ToolCall {
    /// The call arguments as a JSON object (empty when the arguments are not an object).
    pub fn args(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::from_str::<serde_json::Value>(&self.arguments) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        }
    }

    /// One argument, deserialized into `T`; `None` when missing or of another shape.
    pub fn arg<T: serde::de::DeserializeOwned>(&self, name: &str) -> Option<T> {
        let value = self.args().remove(name)?;
        serde_json::from_value(value).ok()
    }

    /// One string argument.
    pub fn arg_str(&self, name: &str) -> Option<String> {
        self.arg::<String>(name)
    }

    /// One numeric argument, as a tool server would read it: `Ok(None)` when missing or null,
    /// a JSON number or a string holding one (pydantic and zod coerce `"5000"` to 5000), and
    /// an error when it is there but no number. A check that skipped a limit whenever the
    /// value was not a JSON number would let `"amount": "5000"` through: treat the error as a
    /// reason to block or escalate, never to allow.
    pub fn arg_number(&self, name: &str) -> Result<Option<f64>, String> {
        match self.args().remove(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Number(n)) => n
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("{name} is not a finite number")),
            Some(serde_json::Value::String(s)) => match s.trim().parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(Some(v)),
                _ => Err(format!("{name} is a string that is not a number")),
            },
            Some(_) => Err(format!("{name} is not a number")),
        }
    }
}

/// Shell-style glob match on tool names: `*` matches any run of characters, `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0usize, 0usize);
    let (mut star, mut mark) = (None::<usize>, 0usize);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

thread_local! {
    static CHECK: RefCell<Option<Box<dyn Check>>> = const { RefCell::new(None) };
    static FORMATTER: RefCell<Option<Box<dyn Formatter>>> = const { RefCell::new(None) };
}

#[doc(hidden)]
pub mod __private {
    //! Glue used by the export macros; not a public API.
    use super::*;

    pub use bindings::check::exports::intentgate::plugin::check::Guest as CheckGuest;
    #[cfg(feature = "siem")]
    pub use bindings::siem::exports::intentgate::plugin::format::Guest as FormatterGuest;
    #[cfg(feature = "siem")]
    pub use bindings::siem::intentgate::plugin::types::FormattedRequest as SiemRequest;

    pub fn configure<T: Check>(config: String) -> Result<(), String> {
        let check = T::configure(&config)?;
        CHECK.with(|slot| *slot.borrow_mut() = Some(Box::new(check)));
        Ok(())
    }

    pub fn evaluate(call: ToolCall, intent: Option<IntentRecord>) -> CheckResult {
        CHECK.with(|slot| match slot.borrow().as_ref() {
            Some(check) => check.evaluate(&call, intent.as_ref()),
            None => Verdict::block("plugin evaluated before configure").into(),
        })
    }

    pub fn configure_formatter<T: Formatter>(config: String) -> Result<(), String> {
        let formatter = T::configure(&config)?;
        FORMATTER.with(|slot| *slot.borrow_mut() = Some(Box::new(formatter)));
        Ok(())
    }

    pub fn format(events: Vec<String>) -> Result<FormattedRequest, String> {
        FORMATTER.with(|slot| match slot.borrow().as_ref() {
            Some(formatter) => formatter.format(&events),
            None => Err("formatter used before configure".to_string()),
        })
    }
}

/// Export a [`Check`] implementation as the component's `check` interface.
#[macro_export]
macro_rules! export_check {
    ($ty:ty) => {
        #[doc(hidden)]
        pub struct __IntentgateCheckExport;

        impl $crate::__private::CheckGuest for __IntentgateCheckExport {
            fn configure(config: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                $crate::__private::configure::<$ty>(config)
            }

            fn evaluate(
                call: $crate::ToolCall,
                intent: ::core::option::Option<$crate::IntentRecord>,
            ) -> $crate::CheckResult {
                $crate::__private::evaluate(call, intent)
            }
        }

        #[cfg(target_arch = "wasm32")]
        $crate::bindings::check::__export_check_world!(__IntentgateCheckExport with_types_in $crate::bindings::check);
    };
}

/// Export a [`Formatter`] implementation as the component's `format` interface, making it a
/// component of the world `intentgate:plugin/formatter` (needs the SDK's `siem` feature).
#[cfg(feature = "siem")]
#[macro_export]
macro_rules! export_formatter {
    ($ty:ty) => {
        #[doc(hidden)]
        pub struct __IntentgateFormatterExport;

        impl $crate::__private::FormatterGuest for __IntentgateFormatterExport {
            fn configure(config: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                $crate::__private::configure_formatter::<$ty>(config)
            }

            fn format(
                events: ::std::vec::Vec<::std::string::String>,
            ) -> ::core::result::Result<$crate::__private::SiemRequest, ::std::string::String> {
                $crate::__private::format(events).map(|r| $crate::__private::SiemRequest {
                    content_type: r.content_type,
                    headers: r.headers,
                    body: r.body,
                })
            }
        }

        #[cfg(target_arch = "wasm32")]
        $crate::bindings::siem::__export_siem_world!(__IntentgateFormatterExport with_types_in $crate::bindings::siem);
    };
}
