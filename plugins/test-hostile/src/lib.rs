//! Test-only hostile check. Its configuration names the misbehaviour on `evaluate`:
//! `loop` (spins forever), `alloc` (allocates without bound), `trap` (panics → unreachable),
//! `garbage` (returns a malformed result), `slow:<ms>` (busy-waits on the host clock), `ok`
//! (allows), `configure-loop` (spins in configure), `configure-fail` (refuses configuration),
//! `sometimes-trap:<n>` (traps on every n-th call of an instance, allows otherwise),
//! `sleep:<ms>` (sleeps in `evaluate` with `std::thread::sleep`, i.e. a WASI monotonic-clock
//! subscription polled with `wasi:io/poll`: a wait in the host), `configure-sleep:<ms>` (the same
//! in configure), `huge-reason:<bytes>` (allows with a reason of that many bytes), `step-up`
//! (allows, asking for a step-up).
//! It must never be part of a production bundle.

use intentgate_plugin_sdk::{Charge, Check, CheckResult, IntentRecord, ToolCall, Verdict, host};
use std::cell::Cell;
use std::time::Duration;

/// The milliseconds of a `<prefix><ms>` mode.
fn millis(mode: &str, prefix: &str) -> Option<Duration> {
    mode.strip_prefix(prefix)
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_millis)
}

struct Hostile {
    mode: String,
    calls: Cell<u64>,
}

impl Check for Hostile {
    fn configure(config: &str) -> Result<Self, String> {
        if let Some(pause) = millis(config, "configure-sleep:") {
            std::thread::sleep(pause);
        }
        match config {
            "configure-loop" => loop {
                std::hint::black_box(0u8);
            },
            "configure-fail" => Err("refused on purpose".into()),
            _ => Ok(Self {
                mode: config.to_string(),
                calls: Cell::new(0),
            }),
        }
    }

    fn evaluate(&self, call: &ToolCall, _intent: Option<&IntentRecord>) -> CheckResult {
        self.calls.set(self.calls.get() + 1);
        let mode = self.mode.as_str();
        if mode == "loop" {
            let mut x = 0u64;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        if mode == "alloc" {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        if mode == "trap" {
            panic!("trap on purpose for {}", call.tool);
        }
        if let Some(bytes) = mode
            .strip_prefix("huge-reason:")
            .and_then(|s| s.parse::<usize>().ok())
        {
            return Verdict::allow("x".repeat(bytes)).into();
        }
        if mode == "step-up" {
            return Verdict::allow("allowed with a fresh factor")
                .with_step_up()
                .into();
        }
        if mode == "garbage" {
            return CheckResult {
                verdict: Verdict::allow("x".repeat(1 << 20)),
                intent: Some(IntentRecord {
                    summary: String::new(),
                    allowed_tools: vec![],
                    forbidden_tools: vec![],
                    confidence: f32::NAN,
                    rationale: String::new(),
                }),
                charges: vec![Charge {
                    key: String::new(),
                    window_start: 0,
                    amount: u64::MAX,
                    limit: 0,
                }],
            };
        }
        if let Some(ms) = mode
            .strip_prefix("slow:")
            .and_then(|s| s.parse::<u64>().ok())
        {
            let until = host::now_unix_ms() + ms;
            while host::now_unix_ms() < until {}
            return Verdict::allow("slow but fine").into();
        }
        if let Some(pause) = millis(mode, "sleep:") {
            std::thread::sleep(pause);
            return Verdict::allow("slept").into();
        }
        if let Some(n) = mode
            .strip_prefix("sometimes-trap:")
            .and_then(|s| s.parse::<u64>().ok())
            && n > 0
            && self.calls.get().is_multiple_of(n)
        {
            panic!("periodic trap");
        }
        Verdict::allow(format!(
            "hostile plugin in mode {mode} allowed {}",
            call.tool
        ))
        .into()
    }
}

intentgate_plugin_sdk::export_check!(Hostile);
