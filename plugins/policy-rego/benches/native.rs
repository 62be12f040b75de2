//! The policy plugin's evaluation compiled natively (no wasm, no component boundary), on the
//! input and policy `intentgate-bench micro plugin` uses, so the two figures compare the same
//! work. Prints on-CPU-equivalent wall time per evaluation (median of 7 batches of >= 100 ms).

use std::hint::black_box;
use std::time::{Duration, Instant};

use intentgate_plugin_sdk::testing::{Harness, call};
use intentgate_policy_rego::{Policy, input_document};

fn per_op(mut f: impl FnMut()) -> Duration {
    let mut batches = Vec::new();
    for _ in 0..7 {
        let (t, mut n) = (Instant::now(), 0u32);
        while t.elapsed() < Duration::from_millis(100) {
            f();
            n += 1;
        }
        batches.push(t.elapsed() / n);
    }
    batches.sort();
    batches[3]
}

fn main() {
    let rego = include_str!("../../../policies/examples/token_scope.rego");
    let harness = Harness::<Policy>::new(rego).expect("the token-scope policy loads");
    let c = call("echo")
        .arg("text", "hello from intentgate-bench")
        .build();
    let evaluate = per_op(|| {
        black_box(harness.evaluate(black_box(&c), None));
    });
    let document = per_op(|| {
        black_box(input_document(black_box(&c), None));
    });
    println!("| native (this machine, release) | per evaluation |");
    println!("|---|---:|");
    println!("| input document (serde_json) | {document:?} |");
    println!("| whole evaluate (document + regorus) | {evaluate:?} |");
}
