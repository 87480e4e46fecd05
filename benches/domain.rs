//! Micro-benchmarks of the pure command path: JSON-Schema validation, CEL
//! rules and emit, and folding the new events, on the bank example.

use cqrsd::domain::{CommandContext, Domain, EXAMPLE_DOMAIN};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;

fn decide(c: &mut Criterion) {
    let domain = Domain::from_toml_str(EXAMPLE_DOMAIN).expect("the example domain loads");
    let account = domain
        .aggregate("account")
        .expect("the example has accounts");
    let state = json!({ "balance": 1_000_000, "status": "open", "owner": "Ada" });
    let body = json!({ "amount": 25 });
    let context = CommandContext {
        aggregate_id: "acc-1".to_owned(),
        version: 7,
        now: chrono::Utc::now(),
        meta: json!({}),
    };
    c.bench_function("withdraw: schema + rules + emit + fold", |b| {
        b.iter(|| {
            account
                .execute("withdraw", &state, &body, &context)
                .expect("accepted")
        });
    });
    let overdraft = json!({ "amount": 2_000_000 });
    c.bench_function("withdraw rejected by a rule", |b| {
        b.iter(|| {
            account
                .execute("withdraw", &state, &overdraft, &context)
                .unwrap_err()
        });
    });
}

criterion_group!(benches, decide);
criterion_main!(benches);
