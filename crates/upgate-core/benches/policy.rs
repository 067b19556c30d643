//! Microbenchmark: the cost of authenticating a request (key digest, lookup among 1000
//! tenants' keys, dialect grant) per request, against baselines measured in the same run:
//! a bare sha256 of the key, and hashing a 1 KiB upload (work every upload does anyway).
//! The limits that follow (governor bucket, concurrency slots) are the `limits` module's,
//! counted per upload by `bench/instructions.sh`.
//!
//! Run: `cargo bench -p upgate-core --bench policy`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};
use upgate_core::{Config, DialectName, Policy};

fn policy(rate_limited: bool, tenants: usize) -> Arc<Policy> {
    let rate = if rate_limited {
        "    rate_limit: { requests_per_second: 1000000, burst: 1000000 }\n"
    } else {
        ""
    };
    let mut text = format!(
        "server: {{ listen: 127.0.0.1:0 }}\nplans:\n  p:\n    max_file_size: 1MiB\n    max_concurrent_uploads: 64\n{rate}providers:\n  disk: {{ plugin: local }}\ntenants:\n"
    );
    for tenant in 0..tenants {
        text.push_str(&format!(
            "  t{tenant}: {{ plan: p, provider: disk, keys: [key-{tenant}], dialects: [dify, kore] }}\n"
        ));
    }
    let config = Config::parse(&text, Path::new("bench.yaml")).expect("valid config");
    Arc::new(Policy::new(config, BTreeMap::new()))
}

/// Nanoseconds per call of `work`, best of 5 rounds of `n` calls.
fn measure(n: u32, mut work: impl FnMut(u32)) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        for i in 0..n {
            work(i);
        }
        best = best.min(started.elapsed().as_nanos() as f64 / f64::from(n));
    }
    best
}

fn main() {
    const N: u32 = 200_000;
    let keys: Vec<String> = (0..1000).map(|i| format!("key-{i}")).collect();
    let plain = policy(false, 1000);
    let limited = policy(true, 1000);
    let upload = vec![7u8; 1024];

    let hash_key = measure(N, |i| {
        black_box(Sha256::digest(keys[i as usize % keys.len()].as_bytes()));
    });
    let hash_upload = measure(N, |_| {
        black_box(Sha256::digest(black_box(&upload)));
    });
    let admit_plain = measure(N, |i| {
        black_box(
            plain
                .authenticate(DialectName::Dify, &keys[i as usize % keys.len()])
                .is_ok(),
        );
    });
    let admit_limited = measure(N, |i| {
        black_box(
            limited
                .authenticate(DialectName::Dify, &keys[i as usize % keys.len()])
                .is_ok(),
        );
    });
    let refused = measure(N, |i| {
        black_box(
            plain
                .authenticate(DialectName::Dify, if i % 2 == 0 { "unknown" } else { "nope" })
                .is_err(),
        );
    });

    println!("policy check, 1000 tenants, per call (best of 5 x {N}):");
    println!("  {:<44} {:>8.0} ns", "baseline: sha256 of the key", hash_key);
    println!(
        "  {:<44} {:>8.0} ns",
        "baseline: sha256 of a 1 KiB upload", hash_upload
    );
    println!(
        "  {:<44} {:>8.0} ns  ({:.2}x the 1 KiB hash)",
        "authenticate, plan without a rate limit",
        admit_plain,
        admit_plain / hash_upload
    );
    println!(
        "  {:<44} {:>8.0} ns  ({:.2}x the 1 KiB hash)",
        "authenticate, plan with a rate limit",
        admit_limited,
        admit_limited / hash_upload
    );
    println!(
        "  {:<44} {:>8.0} ns  ({:.2}x the 1 KiB hash)",
        "refuse an unknown key",
        refused,
        refused / hash_upload
    );
}
