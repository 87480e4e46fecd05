//! Arbitrary bytes as a command body on the built-in example domain: JSON
//! parsing, schema validation and the CEL rules, emits and event handlers
//! must answer or reject, never panic. The first byte picks the command and
//! the state it runs against, so rules see open, closed and fresh accounts.
#![no_main]

use std::sync::LazyLock;

use cqrsd::domain::{CommandContext, Domain, EXAMPLE_DOMAIN};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

static DOMAIN: LazyLock<Domain> =
    LazyLock::new(|| Domain::from_toml_str(EXAMPLE_DOMAIN).expect("the example domain loads"));

const COMMANDS: [&str; 5] = ["open", "deposit", "withdraw", "close", "no-such-command"];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    // The HTTP layer parses bodies with serde_json; so does this target.
    let Ok(body) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let account = DOMAIN.aggregate("account").expect("the example has accounts");
    let command = COMMANDS[usize::from(selector) % COMMANDS.len()];
    let states = [
        account.initial_state().clone(),
        json!({"balance": 10, "status": "open", "owner": "Ada"}),
        json!({"balance": 0.5, "status": "open", "owner": "Ada"}),
        json!({"balance": 0, "status": "closed", "owner": "Ada"}),
    ];
    let state = &states[usize::from(selector / 8) % states.len()];
    let ctx = CommandContext {
        aggregate_id: "fuzz-1".to_owned(),
        version: u64::from(selector),
        now: chrono::DateTime::UNIX_EPOCH,
        meta: json!({}),
    };
    if let Ok(decision) = account.execute(command, state, &body, &ctx) {
        // An accepted command's events must fold to the state it reported.
        let mut folded = state.clone();
        for (i, event) in decision.events.iter().enumerate() {
            let input = cqrsd::domain::EventInput {
                event_type: &event.event_type,
                data: &event.data,
                aggregate_id: &ctx.aggregate_id,
                version: ctx.version + i as u64 + 1,
                timestamp: ctx.now,
            };
            folded = account.apply(&folded, &input).expect("a decided event applies");
        }
        assert_eq!(folded, decision.new_state);
    }
});
