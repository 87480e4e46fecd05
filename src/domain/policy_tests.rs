//! Policies: loading (every mistake with its place) and planning.

use chrono::Utc;
use serde_json::json;

use super::{Domain, EventInput, PlannedCommand};

const SHOP: &str = include_str!("../../examples/shop.toml");

fn errors(source: &str) -> Vec<(String, String)> {
    match Domain::from_toml_str(source) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.0.into_iter().map(|e| (e.place, e.reason)).collect(),
    }
}

fn places(source: &str) -> Vec<String> {
    errors(source).into_iter().map(|(place, _)| place).collect()
}

/// The shop with one policy replaced by `policy` (TOML of `[policies.p]`).
fn shop_with(policy: &str) -> String {
    format!("{SHOP}\n{policy}")
}

#[test]
fn the_shop_loads_with_its_three_policies() {
    let domain = Domain::from_toml_str(SHOP).unwrap();
    let names: Vec<&str> = domain.policies().map(|p| p.name()).collect();
    assert_eq!(names, ["confirm_order", "request_payment", "reserve_stock"]);
    let reserve = domain.policy("reserve_stock").unwrap();
    assert_eq!(reserve.sources(), ["order"]);
    assert!(reserve.handles("OrderPlaced"));
    assert!(!reserve.handles("OrderCancelled"));
    assert!(reserve.has_on_rejected());
}

#[test]
fn a_policy_plans_its_sends_and_its_compensation() {
    let domain = Domain::from_toml_str(SHOP).unwrap();
    let policy = domain.policy("reserve_stock").unwrap();
    let data = json!({"item": "apple", "qty": 3, "customer": "ada"});
    let event = EventInput {
        event_type: "OrderPlaced",
        data: &data,
        aggregate_id: "o-1",
        version: 1,
        timestamp: Utc::now(),
    };
    assert_eq!(
        policy.plan(&event, "order").unwrap(),
        [PlannedCommand {
            aggregate: "item".into(),
            id: "apple".into(),
            command: "reserve".into(),
            body: json!({"qty": 3, "order": "o-1"}),
        }]
    );
    let rejection = json!({"status": 422, "detail": "not enough stock", "aggregate": "item", "id": "apple", "command": "reserve"});
    assert_eq!(
        policy.plan_rejected(&event, "order", &rejection).unwrap(),
        [PlannedCommand {
            aggregate: "order".into(),
            id: "o-1".into(),
            command: "cancel".into(),
            body: json!({"reason": "not enough stock"}),
        }]
    );
    // `when` says no: nothing is sent.
    let none = json!({"item": "apple", "qty": 0, "customer": "ada"});
    let event = EventInput {
        data: &none,
        ..event
    };
    assert_eq!(policy.plan(&event, "order").unwrap(), []);
    // An id that is not a string or an integer is an error with its place.
    let odd = json!({"item": ["apple"], "qty": 1, "customer": "ada"});
    let event = EventInput {
        data: &odd,
        ..event
    };
    let error = policy.plan(&event, "order").unwrap_err().to_string();
    assert!(
        error.starts_with("policies.reserve_stock.send[0].id"),
        "{error}"
    );
}

#[test]
fn nested_body_tables_are_objects() {
    let source = r#"
[aggregates.a]
state = { n = 0 }
[aggregates.a.commands.go]
emit = [ { event = "Went", data = { n = "command.inner.n" } } ]
[aggregates.a.events.Went]
set = { n = "event.n" }
[policies.p]
source = ["a"]
on = ["Went"]
[[policies.p.send]]
aggregate = "a"
id = "'other'"
command = "go"
body = { inner = { n = "event.n + 1", tag = "'x'" } }
"#;
    let domain = Domain::from_toml_str(source).unwrap();
    let data = json!({"n": 1});
    let event = EventInput {
        event_type: "Went",
        data: &data,
        aggregate_id: "a-1",
        version: 1,
        timestamp: Utc::now(),
    };
    let planned = domain.policy("p").unwrap().plan(&event, "a").unwrap();
    assert_eq!(planned[0].body, json!({"inner": {"n": 2, "tag": "x"}}));
}

#[test]
fn every_mistake_in_a_policy_is_reported_with_its_place() {
    let bad = shop_with(
        r#"
[policies.bad]
source = ["order", "nothing"]
on = ["OrderPlaced", "NoSuchEvent"]
when = "state.qty > 0"
[[policies.bad.send]]
aggregate = "item"
id = "event.item"
command = "teleport"
body = { qty = "event.qty" }
[[policies.bad.send]]
aggregate = "warehouse"
id = "event.item"
command = "reserve"
[[policies.bad.send]]
aggregate = "item"
id = "rejection.id"
command = "reserve"
body = { qty = "event.qty", order = "event.aggregate_id", colour = "'red'", n = 3 }
[[policies.bad.on_rejected]]
aggregate = "order"
id = "event.aggregate_id"
command = "cancel"
body = { reason = "rejection.detail + doc.x" }
"#,
    );
    let mut found = places(&bad);
    found.sort();
    let mut expected = vec![
        "policies.bad.source[1]",
        "policies.bad.on[1]",
        "policies.bad.when",
        "policies.bad.send[0].command",
        "policies.bad.send[1].aggregate",
        "policies.bad.send[2].id",
        "policies.bad.send[2].body.colour",
        "policies.bad.send[2].body.n",
        "policies.bad.send[2].body.n",
        "policies.bad.on_rejected[0].body.reason",
    ];
    expected.sort();
    assert_eq!(found, expected, "{:#?}", errors(&bad));
    let reasons = errors(&bad);
    let reason = |place: &str| {
        reasons
            .iter()
            .find(|(p, _)| p == place)
            .map(|(_, r)| r.clone())
            .unwrap()
    };
    assert!(reason("policies.bad.send[0].command").contains("no command `teleport`"));
    assert!(reason("policies.bad.when").contains("`state` is not available"));
    assert!(reason("policies.bad.send[2].id").contains("`rejection` is not available"));
    assert!(reason("policies.bad.send[2].body.colour").contains("no field `colour`"));
}

#[test]
fn a_policy_needs_sends_events_and_required_fields_and_its_own_name() {
    let bad = shop_with(
        r#"
[policies.empty]
source = ["order"]
on = []
[policies.short]
source = ["order"]
on = ["OrderPlaced"]
[[policies.short.send]]
aggregate = "item"
id = "event.item"
command = "reserve"
body = { qty = "event.qty" }
"#,
    );
    let found = errors(&bad);
    assert!(found.contains(&(
        "policies.empty.on".into(),
        "at least one event type is needed".into()
    )));
    assert!(found.iter().any(|(p, _)| p == "policies.empty.send"));
    assert!(found.contains(&(
        "policies.short.send[0].body".into(),
        "the command's schema requires field `order`".into()
    )));
    // A policy and a projection may not share a name.
    let clash = format!(
        "{}\n[projections.reserve_stock]\nkind = \"view\"\nsource = [\"order\"]\n[projections.reserve_stock.on.OrderPlaced]\nset = {{ qty = \"event.qty\" }}\n",
        SHOP.replace("# --- views ---", "")
    );
    assert_eq!(places(&clash), ["policies.reserve_stock"]);
}
