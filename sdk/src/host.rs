//! The host imports a plugin may use: log, clock, budget counters.
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
    use crate::bindings::check::intentgate::plugin::{clock, counters, log};

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
}

/// Write a line to the gateway's log.
pub fn log(level: Level, message: &str) {
    imp::log(level, message)
}

/// The host's wall clock, milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    imp::now_unix_ms()
}

/// The current value of a host-owned budget counter.
pub fn counter(key: &str, window_start: u64) -> u64 {
    imp::counter(key, window_start)
}
