//! The host imports a plugin may use: log, clock, budget counters, verdict hints.
//!
//! In a component (wasm32) these call the gateway; natively (unit tests) they read and write
//! the [`crate::testing`] harness state of the current thread. Nothing here touches the
//! filesystem, the network or the environment.

/// Log levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Debug detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something odd.
    Warn,
    /// Something wrong.
    Error,
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::Level;
    use crate::bindings::check::intentgate::plugin::{clock, counters, hints, log};

    pub fn log(level: Level, message: &str) {
        let level = match level {
            Level::Debug => log::Level::Debug,
            Level::Info => log::Level::Info,
            Level::Warn => log::Level::Warn,
            Level::Error => log::Level::Error,
        };
        log::log(level, message);
    }

    pub fn now_unix_ms() -> u64 {
        clock::now_unix_ms()
    }

    pub fn counter(key: &str, window_start: u64) -> u64 {
        counters::get(key, window_start)
    }

    pub fn approval_mode(mode: &str) {
        hints::approval_mode(mode);
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::Level;
    use crate::testing::STATE;

    pub fn log(level: Level, message: &str) {
        STATE.with(|s| s.borrow_mut().logs.push((level, message.to_string())));
    }

    pub fn now_unix_ms() -> u64 {
        STATE.with(|s| s.borrow().now_ms)
    }

    pub fn counter(key: &str, window_start: u64) -> u64 {
        STATE.with(|s| {
            s.borrow()
                .counters
                .get(&(key.to_string(), window_start))
                .copied()
                .unwrap_or(0)
        })
    }

    pub fn approval_mode(mode: &str) {
        STATE.with(|s| s.borrow_mut().approval_mode = Some(mode.to_string()));
    }
}

/// Write a line to the gateway's log.
pub fn log(level: Level, message: &str) {
    imp::log(level, message)
}

/// The host's wall clock, milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    imp::now_unix_ms()
}

/// Tell the host how an escalation of the current call is answered: `"sync"` (held until a
/// person decides) or `"async"` (answered "approval pending" at once). Call it during
/// `evaluate`, before returning an escalate verdict; other values are ignored by the host.
pub fn approval_mode(mode: &str) {
    imp::approval_mode(mode)
}

/// The current value of a host-owned budget counter.
pub fn counter(key: &str, window_start: u64) -> u64 {
    imp::counter(key, window_start)
}
