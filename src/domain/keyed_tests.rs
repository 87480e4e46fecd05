//! Keyed and multi-source views (DESIGN.md §3.1): what the loader reports
//! and which document an event changes.

use chrono::{TimeZone, Utc};
use serde_json::{Value as Json, json};

use super::tests::problems;
use super::*;

const SHOP: &str = r#"
[aggregates.customer]
state = { name = "" }
[aggregates.customer.commands.register]
emit = [ { event = "CustomerRegistered", data = { name = "command.name" } } ]
[aggregates.customer.events.CustomerRegistered]
set = { name = "event.name" }

[aggregates.order]
state = { customer = "" }
[aggregates.order.commands.place]
emit = [ { event = "OrderPlaced", data = { customer = "command.customer", total = "command.total" } } ]
[aggregates.order.events.OrderPlaced]
set = { customer = "event.customer" }

[projections.customer_orders]
kind = "view"
source = ["order", "customer"]
key = "event.customer"
indexes = ["orders"]
[projections.customer_orders.on.OrderPlaced]
set = { orders = "(has(doc.orders) ? doc.orders : 0) + 1", last_order = "event.aggregate_id" }
[projections.customer_orders.on.CustomerRegistered]
key = "event.aggregate_id"
set = { name = "event.name" }
"#;

fn view<'d>(domain: &'d Domain, name: &str) -> &'d ViewDef {
    match domain.projection(name).map(|p| p.kind()) {
        Some(ProjectionKind::View(def)) => def,
        _ => panic!("no view {name}"),
    }
}

fn input<'a>(event_type: &'a str, id: &'a str, data: &'a Json) -> EventInput<'a> {
    EventInput {
        event_type,
        data,
        aggregate_id: id,
        version: 1,
        timestamp: Utc.with_ymd_and_hms(2026, 11, 26, 13, 0, 0).unwrap(),
    }
}

#[test]
fn documents_are_keyed_by_the_handlers_key_else_the_views_else_the_aggregate_id() {
    let domain = Domain::from_toml_str(SHOP).unwrap();
    let projection = domain.projection("customer_orders").unwrap();
    assert_eq!(projection.sources(), ["order", "customer"]);
    let def = view(&domain, "customer_orders");
    assert!(def.is_keyed());
    let placed = json!({"customer": "c-1", "total": 5});
    assert_eq!(
        def.key(&input("OrderPlaced", "o-1", &placed), "order")
            .unwrap(),
        "c-1"
    );
    let registered = json!({"name": "Ada"});
    assert_eq!(
        def.key(&input("CustomerRegistered", "c-1", &registered), "customer")
            .unwrap(),
        "c-1"
    );
    // A number is its decimal text.
    let numbered = json!({"customer": 42, "total": 5});
    assert_eq!(
        def.key(&input("OrderPlaced", "o-2", &numbered), "order")
            .unwrap(),
        "42"
    );
    // Views without a key expression key by aggregate id, without a copy.
    let bank = Domain::from_toml_str(EXAMPLE_DOMAIN).unwrap();
    let accounts = view(&bank, "accounts");
    assert!(!accounts.is_keyed());
    let empty = json!({});
    let key = accounts
        .key(&input("AccountOpened", "acc-1", &empty), "account")
        .unwrap();
    assert!(matches!(key, std::borrow::Cow::Borrowed("acc-1")));
}

/// The read side skips the read of a document for an aggregate's first event
/// only where no other aggregate can have written under that key.
#[test]
fn only_an_unkeyed_view_of_one_aggregate_type_finds_no_document_on_a_first_event() {
    let bank = Domain::from_toml_str(EXAMPLE_DOMAIN).unwrap();
    let fresh = |domain: &Domain, name: &str| {
        domain
            .projection(name)
            .unwrap()
            .first_event_finds_no_document()
    };
    assert!(fresh(&bank, "accounts"));
    assert!(!fresh(&bank, "daily_flows"));
    assert!(!fresh(&bank, "account_search"));
    // Keyed: orders of many aggregates meet in one customer's document.
    let shop = Domain::from_toml_str(SHOP).unwrap();
    assert!(!fresh(&shop, "customer_orders"));
    // Unkeyed over two aggregate types: an order and a customer may share an id.
    let both = format!(
        "{SHOP}\n[projections.activity]\nkind = \"view\"\nsource = [\"order\", \"customer\"]\n\
         [projections.activity.on.OrderPlaced]\nset = {{ seen = \"true\" }}\n\
         [projections.activity.on.CustomerRegistered]\nset = {{ seen = \"true\" }}\n"
    );
    let both = Domain::from_toml_str(&both).unwrap();
    assert!(!view(&both, "activity").is_keyed());
    assert!(!fresh(&both, "activity"));
}

#[test]
fn a_key_that_fails_or_is_not_a_string_or_number_is_an_error_with_its_place() {
    let domain = Domain::from_toml_str(SHOP).unwrap();
    let def = view(&domain, "customer_orders");
    for (data, reason) in [
        (json!({"total": 5}), "customer"),
        (json!({"customer": true, "total": 5}), "string or a number"),
        (
            json!({"customer": {"id": 1}, "total": 5}),
            "string or a number",
        ),
        (json!({"customer": "", "total": 5}), "1 to 512 bytes"),
        (
            json!({"customer": "x".repeat(513), "total": 5}),
            "1 to 512 bytes",
        ),
    ] {
        let error = def
            .key(&input("OrderPlaced", "o-1", &data), "order")
            .unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with("projections.customer_orders.key") && text.contains(reason),
            "{data}: {text}"
        );
    }
    let error = def
        .key(&input("CustomerRegistered", "c", &json!({})), "customer")
        .map(|k| k.into_owned());
    assert_eq!(error.unwrap(), "c");
}

#[test]
fn source_may_be_one_name_or_a_list_and_keys_are_checked_at_load() {
    let one = SHOP.replace(r#"source = ["order", "customer"]"#, r#"source = "order""#);
    // A handler of a customer event is then no longer known.
    let found = problems(&one);
    assert!(
        found
            .iter()
            .any(|(p, _)| p == "projections.customer_orders.on.CustomerRegistered"),
        "{found:#?}"
    );
    assert_eq!(found.len(), 1, "{found:#?}");
    let number = SHOP.replace(r#"source = ["order", "customer"]"#, "source = 3");
    assert!(
        problems(&number)
            .iter()
            .any(|(p, r)| p == "projections.customer_orders.source" && r.contains("integer")),
        "{:#?}",
        problems(&number)
    );
    let mixed = SHOP.replace(
        r#"source = ["order", "customer"]"#,
        r#"source = ["order", 3]"#,
    );
    assert!(
        problems(&mixed)
            .iter()
            .any(|(p, _)| p == "projections.customer_orders.source[1]"),
        "{:#?}",
        problems(&mixed)
    );
    // A key cannot read the document it picks, and must compile.
    let doc_key = SHOP.replace(r#"key = "event.customer""#, r#"key = "doc.customer""#);
    assert!(
        problems(&doc_key)
            .iter()
            .any(|(p, r)| p == "projections.customer_orders.key" && r.contains("doc")),
        "{:#?}",
        problems(&doc_key)
    );
    let broken = SHOP.replace(
        r#"key = "event.aggregate_id""#,
        r#"key = "event.aggregate_id +""#,
    );
    assert!(
        problems(&broken)
            .iter()
            .any(|(p, _)| p == "projections.customer_orders.on.CustomerRegistered.key"),
        "{:#?}",
        problems(&broken)
    );
}

/// The shop example has what the README walks through: a per-customer view
/// over two sources (one handler keyed its own way) and an event type at
/// version 2 with its upcaster.
#[test]
fn the_shop_example_has_a_keyed_view_over_two_sources_and_a_versioned_event() {
    let shop = Domain::from_toml_str(include_str!("../../examples/shop.toml"))
        .unwrap_or_else(|e| panic!("examples/shop.toml: {e}"));
    let projection = shop.projection("customer_orders").unwrap();
    assert_eq!(projection.sources(), ["order", "customer"]);
    let def = view(&shop, "customer_orders");

    let item = shop.aggregate("item").unwrap();
    assert_eq!(item.event_version("StockAdded"), 2);
    let added = json!({"quantity": 5});
    let upcast = shop
        .upcast("item", &input("StockAdded", "apple", &added), 1)
        .unwrap()
        .unwrap();
    assert_eq!(upcast, json!({"qty": 5}));

    let order = json!({"item": "apple", "qty": 3, "customer": "ada"});
    let placed = input("OrderPlaced", "o-1", &order);
    assert_eq!(def.key(&placed, "order").unwrap(), "ada");
    let customer = json!({"name": "Ada", "email": "ada@example.com"});
    let registered = input("CustomerRegistered", "ada", &customer);
    assert_eq!(def.key(&registered, "customer").unwrap(), "ada");
    let mut doc = None;
    def.apply_in_place(&mut doc, &placed, "order").unwrap();
    def.apply_in_place(&mut doc, &registered, "customer")
        .unwrap();
    assert_eq!(
        doc,
        Some(json!({"orders": 1, "ordered_qty": 3, "name": "Ada"}))
    );
}
