//! The policy plugin's evaluation compiled natively (no wasm, no component boundary), on the
//! input and policy `intentgate-bench micro plugin` uses (with the intent stage's record, as the
//! pipeline passes it), so the two figures compare the same work. Prints, per evaluation, the
//! median of 7 batches of >= 100 ms: on-CPU time of this thread (what the micro bench reports)
//! and wall time.

use std::hint::black_box;
use std::time::{Duration, Instant};

use intentgate_plugin_sdk::IntentRecord;
use intentgate_plugin_sdk::testing::{Harness, call};
use intentgate_policy_rego::{Fields, InputKeys, Policy, input_document, input_value};

/// This thread's CPU time (Linux `CLOCK_THREAD_CPUTIME_ID`).
#[cfg(target_os = "linux")]
fn cpu_now() -> Duration {
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    unsafe extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(not(target_os = "linux"))]
fn cpu_now() -> Duration {
    Duration::ZERO
}

/// (on-CPU, wall) per call of `f`.
fn per_op(mut f: impl FnMut()) -> (Duration, Duration) {
    let (mut cpu, mut wall) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let (t, c, mut n) = (Instant::now(), cpu_now(), 0u32);
        while t.elapsed() < Duration::from_millis(100) {
            f();
            n += 1;
        }
        cpu.push((cpu_now() - c) / n);
        wall.push(t.elapsed() / n);
    }
    cpu.sort();
    wall.sort();
    (cpu[3], wall[3])
}

fn main() {
    let rego = include_str!("../../../policies/examples/token_scope.rego");
    let harness = Harness::<Policy>::new(rego).expect("the token-scope policy loads");
    let c = call("echo")
        .arg("text", "hello from intentgate-bench")
        .build();
    // What the built-in intent stage returns for the bench call (no prompt).
    let intent = IntentRecord {
        summary: "no intent given".into(),
        allowed_tools: vec![],
        forbidden_tools: vec![],
        confidence: 0.0,
        rationale: "no rule keyword found in the prompt".into(),
    };
    let intent = Some(&intent);
    let keys = InputKeys::default();
    let fields = Fields::used_by([rego]);
    let rows = [
        (
            "input document as JSON (the definition; the old path built this, then converted it)",
            per_op(|| {
                black_box(input_document(black_box(&c), intent));
            }),
        ),
        (
            "input value, every field",
            per_op(|| {
                black_box(input_value(&keys, Fields::ALL, black_box(&c), intent));
            }),
        ),
        (
            "input value, the fields the policy names (what evaluate builds)",
            per_op(|| {
                black_box(input_value(&keys, fields, black_box(&c), intent));
            }),
        ),
        (
            "whole evaluate, no intent record",
            per_op(|| {
                black_box(harness.evaluate(black_box(&c), None));
            }),
        ),
        (
            "whole evaluate (input + regorus + verdict)",
            per_op(|| {
                black_box(harness.evaluate(black_box(&c), intent));
            }),
        ),
    ];
    println!("| native (this machine, release) | on-CPU per call | wall per call |");
    println!("|---|---:|---:|");
    for (label, (cpu, wall)) in rows {
        println!("| {label} | {cpu:?} | {wall:?} |");
    }
}
