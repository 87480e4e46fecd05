//! Event versions and upcasting (DESIGN.md §3.3): what the loader reports
//! and what the steps do to stored events.

use chrono::{TimeZone, Utc};
use serde_json::{Value as Json, json};

use super::tests::{assert_problem, problems};
use super::*;

/// An account whose deposits moved from `amount` (version 1) through
/// `amount_cents` (version 2) to `cents` with a `currency` (version 3).
const VERSIONED: &str = r#"
[aggregates.account]
state = { balance = 0 }
[aggregates.account.commands.deposit]
emit = [ { event = "MoneyDeposited", data = { cents = "command.cents", currency = "'EUR'" } } ]
[aggregates.account.events.MoneyDeposited]
version = 3
set = { balance = "state.balance + event.cents" }
[aggregates.account.events.MoneyDeposited.upcast.1]
set = { amount_cents = "int(event.amount * 100)" }
remove = ["amount"]
[aggregates.account.events.MoneyDeposited.upcast.2]
set = { cents = "event.amount_cents", currency = "'EUR'" }
remove = ["amount_cents"]
"#;

/// The versioned domain with the event type's section replaced.
fn with_event(section: &str) -> String {
    let head = VERSIONED
        .split("[aggregates.account.events.MoneyDeposited]")
        .next()
        .unwrap();
    format!("{head}{section}")
}

fn input<'a>(data: &'a Json) -> EventInput<'a> {
    EventInput {
        event_type: "MoneyDeposited",
        data,
        aggregate_id: "acc-1",
        version: 4,
        timestamp: Utc.with_ymd_and_hms(2026, 11, 26, 13, 0, 0).unwrap(),
    }
}

#[test]
fn steps_run_in_order_from_the_stored_version_to_the_current_one() {
    let domain = Domain::from_toml_str(VERSIONED).unwrap();
    assert!(domain.has_versions());
    let account = domain.aggregate("account").unwrap();
    assert_eq!(account.event_version("MoneyDeposited"), 3);
    let v1 = json!({"amount": 12.5, "note": "kept"});
    let upcast = domain.upcast("account", &input(&v1), 1).unwrap();
    assert_eq!(
        upcast,
        Some(json!({"cents": 1250, "currency": "EUR", "note": "kept"}))
    );
    let v2 = json!({"amount_cents": 7});
    assert_eq!(
        domain.upcast("account", &input(&v2), 2).unwrap(),
        Some(json!({"cents": 7, "currency": "EUR"}))
    );
    // Current data is left alone, without a copy.
    let v3 = json!({"cents": 7, "currency": "EUR"});
    assert_eq!(domain.upcast("account", &input(&v3), 3).unwrap(), None);
    // The upcast data folds like data written at version 3.
    let state = account
        .apply(
            account.initial_state(),
            &input(&upcast.clone().unwrap_or_default()),
        )
        .unwrap();
    assert_eq!(state["balance"], json!(1250));
}

#[test]
fn an_event_from_a_newer_domain_or_a_failing_step_is_an_error_with_its_place() {
    let domain = Domain::from_toml_str(VERSIONED).unwrap();
    let data = json!({"cents": 1});
    let newer = domain.upcast("account", &input(&data), 4).unwrap_err();
    assert!(newer.to_string().contains("version 4"), "{newer}");
    let zero = domain.upcast("account", &input(&data), 0).unwrap_err();
    assert!(zero.to_string().contains("version 0"), "{zero}");
    // Version 1 data without `amount`: the step's expression fails.
    let failing = domain
        .upcast("account", &input(&json!({"other": 1})), 1)
        .unwrap_err();
    assert!(
        failing
            .to_string()
            .starts_with("aggregates.account.events.MoneyDeposited.upcast.1.set.amount_cents"),
        "{failing}"
    );
}

#[test]
fn a_domain_without_versions_upcasts_nothing() {
    let bank = Domain::from_toml_str(EXAMPLE_DOMAIN).unwrap();
    assert!(!bank.has_versions());
    let data = json!({"amount": 1});
    assert_eq!(bank.upcast("account", &input(&data), 1).unwrap(), None);
    assert_eq!(
        bank.aggregate("account")
            .unwrap()
            .event_version("MoneyDeposited"),
        1
    );
}

#[test]
fn a_missing_step_is_reported() {
    let source = with_event(
        r#"
[aggregates.account.events.MoneyDeposited]
version = 3
set = { balance = "state.balance + event.cents" }
[aggregates.account.events.MoneyDeposited.upcast.1]
set = { cents = "int(event.amount * 100)" }
remove = ["amount"]
"#,
    );
    assert_problem(
        &source,
        "aggregates.account.events.MoneyDeposited.upcast",
        "no step [aggregates.account.events.MoneyDeposited.upcast.2] to turn version 2 into version 3",
    );
}

#[test]
fn a_step_beyond_the_version_is_reported() {
    let source = with_event(
        r#"
[aggregates.account.events.MoneyDeposited]
set = { balance = "state.balance + event.cents" }
[aggregates.account.events.MoneyDeposited.upcast.1]
set = { cents = "1" }
"#,
    );
    assert_problem(
        &source,
        "aggregates.account.events.MoneyDeposited.upcast.1",
        "the event is at version 1",
    );
}

#[test]
fn bad_versions_step_names_and_empty_steps_are_reported() {
    let source = with_event(
        r#"
[aggregates.account.events.MoneyDeposited]
version = 0
set = { balance = "state.balance + event.cents" }
[aggregates.account.events.MoneyDeposited.upcast.one]
set = { cents = "1" }
[aggregates.account.events.MoneyDeposited.upcast.2]
"#,
    );
    let found = problems(&source);
    let places: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
    assert!(
        places.contains(&"aggregates.account.events.MoneyDeposited.version"),
        "{found:#?}"
    );
    assert!(
        places.contains(&"aggregates.account.events.MoneyDeposited.upcast.one"),
        "{found:#?}"
    );
    assert_problem(
        &source,
        "aggregates.account.events.MoneyDeposited.upcast.2",
        "a step needs",
    );
}

#[test]
fn cel_errors_and_reserved_or_contradictory_fields_are_reported_with_their_place() {
    let source = with_event(
        r#"
[aggregates.account.events.MoneyDeposited]
version = 2
set = { balance = "state.balance + event.cents" }
[aggregates.account.events.MoneyDeposited.upcast.1]
set = { cents = "event.amount *", version = "1", currency = "state.x" }
remove = ["currency"]
"#,
    );
    let at = "aggregates.account.events.MoneyDeposited.upcast.1.set";
    let found = problems(&source);
    assert!(
        found.iter().any(|(p, _)| p == &format!("{at}.cents")),
        "{found:#?}"
    );
    assert_problem(&source, &format!("{at}.version"), "reserved");
    assert_problem(&source, &format!("{at}.currency"), "both set and removed");
    // `state` is not a variable of an upcast step: only the old event is.
    assert_problem(&source, &format!("{at}.currency"), "state");
}

#[test]
fn a_step_naming_fields_its_input_or_the_current_version_cannot_have_is_reported() {
    let source = with_event(
        r#"
[aggregates.account.events.MoneyDeposited]
version = 3
set = { balance = "state.balance + event.cents" }
[aggregates.account.events.MoneyDeposited.upcast.1]
set = { cent = "int(event.amount * 100)" }
remove = ["amount"]
[aggregates.account.events.MoneyDeposited.upcast.2]
set = { cents = "event.cent" }
remove = ["amount", "cent"]
"#,
    );
    // Set by step 1 and removed by step 2: fine, although no emit gives it.
    assert!(
        !problems(&source)
            .iter()
            .any(|(p, _)| p.ends_with("upcast.1.set.cent")),
        "{:#?}",
        problems(&source)
    );
    // Step 1 removed `amount`, so version 2 events cannot have it.
    assert_problem(
        &source,
        "aggregates.account.events.MoneyDeposited.upcast.2.remove[0]",
        "an earlier step removed it",
    );
    // A field no current event has, and no later step removes.
    let typo = with_event(
        r#"
[aggregates.account.events.MoneyDeposited]
version = 2
set = { balance = "state.balance + event.cents" }
[aggregates.account.events.MoneyDeposited.upcast.1]
set = { cents = "1", centz = "2" }
"#,
    );
    assert_problem(
        &typo,
        "aggregates.account.events.MoneyDeposited.upcast.1.set.centz",
        "events at version 2 have no field `centz`",
    );
}
