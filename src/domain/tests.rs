//! Tests of the domain module as other modules use it, through its public
//! API, plus the expression layer's number and time semantics.

use chrono::{TimeZone, Utc};
use serde_json::{Value as Json, json};

use super::expr::{Expression, Var, Vars};
use super::*;

fn bank() -> Domain {
    Domain::from_toml_str(EXAMPLE_DOMAIN).unwrap()
}

fn ctx(version: u64) -> CommandContext {
    CommandContext {
        aggregate_id: "acc-1".into(),
        version,
        now: Utc.with_ymd_and_hms(2026, 11, 26, 13, 45, 0).unwrap(),
        meta: json!({"user": "tester"}),
    }
}

/// Loads `source` and returns its problems as (place, reason) pairs.
pub(super) fn problems(source: &str) -> Vec<(String, String)> {
    match Domain::from_toml_str(source) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.0.into_iter().map(|e| (e.place, e.reason)).collect(),
    }
}

pub(super) fn assert_problem(source: &str, place: &str, reason_part: &str) {
    let found = problems(source);
    assert!(
        found
            .iter()
            .any(|(p, r)| p == place && r.contains(reason_part)),
        "expected `{place}: ...{reason_part}...`, got {found:#?}"
    );
}

/// A minimal valid aggregate, to which each test adds one mistake.
const BASE: &str = r#"
[aggregates.counter]
state = { n = 0 }
[aggregates.counter.commands.bump]
emit = [ { event = "Bumped", data = { by = "1" } } ]
[aggregates.counter.events.Bumped]
set = { n = "state.n + event.by" }
"#;

fn eval(source: &str) -> Result<Json, String> {
    let state = json!({"balance": 5, "price": 2.5, "big": i64::MAX});
    let vars = Vars {
        state: Some(&state),
        ..Vars::default()
    };
    Expression::compile(source, &[Var::State])?.eval_json(&vars)
}

#[test]
fn the_example_domain_loads_with_everything_it_promises() {
    let domain = bank();
    let account = domain.aggregate("account").unwrap();
    assert_eq!(
        account.command_names().collect::<Vec<_>>(),
        ["close", "deposit", "open", "withdraw"]
    );
    assert_eq!(
        account.event_names().collect::<Vec<_>>(),
        [
            "AccountClosed",
            "AccountOpened",
            "MoneyDeposited",
            "MoneyWithdrawn"
        ]
    );
    assert_eq!(
        account.initial_state(),
        &json!({"balance": 0, "status": "none", "owner": ""})
    );
    let names: Vec<&str> = domain.projections().map(|p| p.name()).collect();
    assert_eq!(names, ["account_search", "accounts", "daily_flows"]);
    let search = domain.projection("account_search").unwrap();
    assert_eq!(search.sources(), ["account"]);
    let ProjectionKind::Search(def) = search.kind() else {
        panic!("not a search")
    };
    assert_eq!(def.view(), "accounts");
    assert_eq!(def.fields().len(), 3);
    assert!(
        def.fields()
            .contains(&("owner".to_owned(), SearchFieldKind::Text))
    );
}

#[test]
fn a_bank_account_lives_through_its_commands() {
    let domain = bank();
    let account = domain.aggregate("account").unwrap();
    let state = account.initial_state().clone();

    let opened = account
        .execute("open", &state, &json!({"owner": "Ada"}), &ctx(0))
        .unwrap();
    assert_eq!(opened.events.len(), 1);
    assert_eq!(opened.events[0].event_type, "AccountOpened");
    assert_eq!(opened.events[0].data, json!({"owner": "Ada"}));
    assert_eq!(
        opened.new_state,
        json!({"balance": 0, "status": "open", "owner": "Ada"})
    );

    let deposited = account
        .execute(
            "deposit",
            &opened.new_state,
            &json!({"amount": 10}),
            &ctx(1),
        )
        .unwrap();
    // An integer stays an integer: 10, not 10.0.
    assert_eq!(deposited.new_state["balance"], json!(10));
    assert!(deposited.new_state["balance"].is_i64());

    let more = account
        .execute(
            "deposit",
            &deposited.new_state,
            &json!({"amount": 0.5}),
            &ctx(2),
        )
        .unwrap();
    assert_eq!(more.new_state["balance"], json!(10.5));

    let err = account
        .execute("withdraw", &more.new_state, &json!({"amount": 11}), &ctx(3))
        .unwrap_err();
    assert_eq!(
        err,
        CommandError::Rejected {
            message: "insufficient funds".into()
        }
    );
    let err = account
        .execute("close", &more.new_state, &json!({}), &ctx(3))
        .unwrap_err();
    assert_eq!(
        err,
        CommandError::Rejected {
            message: "balance must be 0 to close the account".into()
        }
    );

    let emptied = account
        .execute(
            "withdraw",
            &more.new_state,
            &json!({"amount": 10.5}),
            &ctx(3),
        )
        .unwrap();
    assert_eq!(emptied.new_state["balance"], json!(0.0));
    let closed = account
        .execute("close", &emptied.new_state, &json!({}), &ctx(4))
        .unwrap();
    assert_eq!(closed.new_state["status"], json!("closed"));
    assert_eq!(closed.events[0].data, json!({}));
}

#[test]
fn unknown_commands_are_reported() {
    let domain = bank();
    let account = domain.aggregate("account").unwrap();
    assert_eq!(
        account.validate("explode", &json!({})),
        Err(CommandError::UnknownCommand {
            command: "explode".into()
        })
    );
}

#[test]
fn every_schema_violation_is_listed_with_its_json_path() {
    let domain = Domain::from_toml_str(
        r#"
[aggregates.shop]
state = { n = 0 }
[aggregates.shop.commands.order]
schema = { type = "object", required = ["item", "qty"], properties = { item = { type = "string" }, qty = { type = "integer", minimum = 1 }, tags = { type = "array", items = { type = "string" } } } }
emit = [ { event = "Ordered", data = { qty = "command.qty" } } ]
[aggregates.shop.events.Ordered]
set = { n = "state.n + event.qty" }
"#,
    )
    .unwrap();
    let shop = domain.aggregate("shop").unwrap();
    let Err(CommandError::Schema(violations)) =
        shop.validate("order", &json!({"qty": 0, "tags": ["a", 7]}))
    else {
        panic!("expected schema violations");
    };
    let paths: Vec<&str> = violations.iter().map(|v| v.path.as_str()).collect();
    assert!(paths.contains(&""), "{violations:?}"); // "item" is missing
    assert!(paths.contains(&"/qty"), "{violations:?}");
    assert!(paths.contains(&"/tags/1"), "{violations:?}");
    assert_eq!(violations.len(), 3, "{violations:?}");
    assert!(violations.iter().all(|v| !v.message.is_empty()));

    // execute validates first, and not-an-object bodies are reported too.
    let err = shop
        .execute("order", &json!({"n": 0}), &json!([1]), &ctx(0))
        .unwrap_err();
    assert!(matches!(err, CommandError::Schema(_)), "{err:?}");
    assert!(
        shop.validate("order", &json!({"item": "x", "qty": 2}))
            .is_ok()
    );
}

#[test]
fn numbers_behave_as_users_expect() {
    assert_eq!(eval("state.balance + 10").unwrap(), json!(15));
    assert!(eval("state.balance + 10").unwrap().is_i64());
    assert_eq!(eval("0 + 10.5").unwrap(), json!(10.5));
    assert_eq!(eval("0 + 10.5 == 10.5").unwrap(), json!(true));
    assert_eq!(eval("10.5 - 3").unwrap(), json!(7.5));
    assert_eq!(eval("state.balance * state.price").unwrap(), json!(12.5));
    assert_eq!(eval("state.price * 2").unwrap(), json!(5.0));
    assert_eq!(eval("7 / 2").unwrap(), json!(3), "int division stays CEL's");
    assert_eq!(eval("7.0 / 2").unwrap(), json!(3.5));
    assert_eq!(eval("7 % 3").unwrap(), json!(1));
    assert_eq!(eval("1u + 2").unwrap(), json!(3));
    assert_eq!(eval("2u + 3u").unwrap(), json!(5));
    assert_eq!(eval("state.balance < 5.5").unwrap(), json!(true));
    assert_eq!(eval("5.0 == state.balance").unwrap(), json!(true));
    assert_eq!(eval("2u > 1").unwrap(), json!(true));
    assert_eq!(eval("-state.balance").unwrap(), json!(-5));
    // Non-numbers still use CEL's own operators.
    assert_eq!(eval("'a' + 'b'").unwrap(), json!("ab"));
    assert_eq!(eval("[1] + [2.5]").unwrap(), json!([1, 2.5]));
    assert_eq!(eval("[1, 2, 3].map(x, x * 2)").unwrap(), json!([2, 4, 6]));
    assert_eq!(eval("[1, 2, 3].filter(x, x > 1.5)").unwrap(), json!([2, 3]));
    assert_eq!(
        eval("[1, 2, 3].exists_one(x, x == 2)").unwrap(),
        json!(true)
    );
}

#[test]
fn arithmetic_errors_are_errors_not_panics_or_wraps() {
    for source in [
        "state.big + 1",
        "state.big * 2",
        "-9223372036854775807 - 2",
        "0u - 1u",
        "1 / 0",
        "1 % 0",
        "1.5 / 0",
        "1.7976931348623157e308 * 10.0",
        "'a' + 1",
        "state.missing + 1",
    ] {
        assert!(eval(source).is_err(), "{source} should fail");
    }
}

#[test]
fn time_helpers_bucket_timestamps_in_utc() {
    let t = Utc.with_ymd_and_hms(2026, 11, 26, 13, 5, 9).unwrap();
    let vars = Vars {
        now: Some(t),
        ..Vars::default()
    };
    let run = |s: &str| {
        Expression::compile(s, &[Var::Now])
            .unwrap()
            .eval_json(&vars)
            .unwrap()
    };
    assert_eq!(run("hour(now)"), json!("2026-11-26T13"));
    assert_eq!(run("day(now)"), json!("2026-11-26"));
    assert_eq!(run("month(now)"), json!("2026-11"));
    assert_eq!(run("now"), json!("2026-11-26T13:05:09Z"));
    // RFC 3339 strings are accepted and converted to UTC.
    assert_eq!(
        run("hour('2026-11-27T01:30:00+02:00')"),
        json!("2026-11-26T23")
    );
    assert_eq!(run("day('2026-11-27T01:30:00+02:00')"), json!("2026-11-26"));
    let bad = Expression::compile("day('yesterday')", &[]).unwrap();
    assert!(bad.eval(&Vars::default()).is_err());
    let bad = Expression::compile("month(3)", &[]).unwrap();
    assert!(bad.eval(&Vars::default()).is_err());
}

#[test]
fn five_mistakes_are_all_reported_with_their_places() {
    let found = problems(
        r#"
[aggregates.account]
state = { balance = 0 }
[aggregates.account.commands.open]
schema = { type = "objekt" }
rules = [ { require = "state.balance ==", message = "bad" } ]
emit = [ { event = "Opened", data = {} }, { event = "Ghost", data = {} } ]
[aggregates.account.events.Opened]
set = { status = "'open'" }
[aggregates.account.events.Unused]
set = { balance = "command.amount" }

[projections.view1]
kind = "view"
source = ["acount"]
"#,
    );
    let places: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
    for expected in [
        "aggregates.account.commands.open.schema",
        "aggregates.account.commands.open.rules[0].require",
        "aggregates.account.commands.open.emit[1]",
        "aggregates.account.events.Opened.set.status",
        "aggregates.account.events.Unused",
        "aggregates.account.events.Unused.set.balance",
        "projections.view1.source[0]",
    ] {
        assert!(places.contains(&expected), "{expected} missing: {found:#?}");
    }
    // Display gives one problem per line.
    let text = Domain::from_toml_str(
        "[aggregates.a]\nstate = {}\n[aggregates.a.events.E]\nset = {}\n[aggregates.b-c]\n",
    )
    .unwrap_err()
    .to_string();
    assert_eq!(text.lines().count(), 2, "{text}");
}

#[test]
fn each_kind_of_mistake_is_reported() {
    // Unknown event in emit.
    assert_problem(
        &BASE.replace(r#"event = "Bumped""#, r#"event = "Bumpd""#),
        "aggregates.counter.commands.bump.emit[0]",
        "`Bumpd` is not declared",
    );
    // A handler for an event never emitted.
    assert_problem(
        &format!("{BASE}[aggregates.counter.events.Reset]\nset = {{ n = \"0\" }}\n"),
        "aggregates.counter.events.Reset",
        "never emitted",
    );
    // Bad CEL, with the parser's message.
    assert_problem(
        &BASE.replace("state.n + event.by", "state.n +* event.by"),
        "aggregates.counter.events.Bumped.set.n",
        "invalid CEL",
    );
    // Bad JSON schema.
    assert_problem(
        &BASE.replace(
            "emit = [",
            "schema = { type = \"object\", properties = { a = { minimum = \"x\" } } }\nemit = [",
        ),
        "aggregates.counter.commands.bump.schema",
        "invalid JSON Schema",
    );
    // Duplicate keys come back from TOML with their line.
    assert_problem(
        &format!("{BASE}[aggregates.counter.events.Bumped]\nset = {{}}\n"),
        "line 8, column 28",
        "duplicate key",
    );
    // `set` on a field missing from the state.
    assert_problem(
        &BASE.replace("set = { n =", "set = { m ="),
        "aggregates.counter.events.Bumped.set.m",
        "not in the state",
    );
    // Variables not allowed in a place.
    assert_problem(
        &BASE.replace("state.n + event.by", "state.n + command.by"),
        "aggregates.counter.events.Bumped.set.n",
        "`command` is not available here",
    );
    assert_problem(
        &BASE.replace(r#"by = "1""#, r#"by = "doc.x""#),
        "aggregates.counter.commands.bump.emit[0].data.by",
        "`doc` is not available here",
    );
    assert_problem(
        &BASE.replace(r#"by = "1""#, r#"by = "nonsense""#),
        "aggregates.counter.commands.bump.emit[0].data.by",
        "unknown variable `nonsense`",
    );
    // Comprehension variables are not free variables.
    assert!(problems(&BASE.replace(r#"by = "1""#, r#"by = "[1].map(x, x)[0]""#)).is_empty());
    // Names.
    assert_problem(
        &BASE.replace("commands.bump", "commands.bump-it"),
        "aggregates.counter.commands.bump-it",
        "not a valid name",
    );
    // Unknown keys.
    assert_problem(
        &BASE.replace("emit = [", "emitt = []\nemit = ["),
        "aggregates.counter.commands.bump",
        "unknown field `emitt`",
    );
    assert_problem("[aggregatez.x]\n", "", "unknown field `aggregatez`");
    // Reserved event data fields.
    assert_problem(
        &BASE.replace(r#"by = "1""#, r#"by = "1", type = "'x'""#),
        "aggregates.counter.commands.bump.emit[0].data.type",
        "reserved",
    );

    let projection = |p: &str| format!("{BASE}{p}");
    // Unknown source aggregate.
    assert_problem(
        &projection("[projections.v]\nkind = \"view\"\nsource = [\"nope\"]\n"),
        "projections.v.source[0]",
        "no aggregate named `nope`",
    );
    // A projection handler for an event no source emits.
    assert_problem(
        &projection(
            "[projections.v]\nkind = \"view\"\nsource = [\"counter\"]\n[projections.v.on.Other]\ndelete = true\n",
        ),
        "projections.v.on.Other",
        "no source aggregate",
    );
    assert_problem(
        &projection(
            "[projections.a]\nkind = \"aggregation\"\nsource = [\"counter\"]\nevents = [\"Other\"]\nmeasures = { c = \"count\" }\n",
        ),
        "projections.a.events[0]",
        "no source aggregate",
    );
    // Unknown measure kinds.
    assert_problem(
        &projection(
            "[projections.a]\nkind = \"aggregation\"\nsource = [\"counter\"]\nevents = [\"Bumped\"]\nmeasures = { c = \"median(event.by)\" }\n",
        ),
        "projections.a.measures.c",
        "unknown measure",
    );
    // Search over something that is not a view, and over unset fields.
    assert_problem(
        &projection(
            "[projections.a]\nkind = \"aggregation\"\nsource = [\"counter\"]\nevents = [\"Bumped\"]\nmeasures = { c = \"count\" }\n[projections.s]\nkind = \"search\"\nview = \"a\"\nfields = { n = \"text\" }\n",
        ),
        "projections.s.view",
        "is not a view",
    );
    assert_problem(
        &projection(
            "[projections.v]\nkind = \"view\"\nsource = [\"counter\"]\n[projections.v.on.Bumped]\nset = { n = \"event.by\" }\n[projections.s]\nkind = \"search\"\nview = \"v\"\nfields = { m = \"text\", n = \"fuzzy\" }\n",
        ),
        "projections.s.fields.m",
        "never sets field `m`",
    );
    assert_problem(
        &projection(
            "[projections.v]\nkind = \"view\"\nsource = [\"counter\"]\n[projections.v.on.Bumped]\nset = { n = \"event.by\" }\n[projections.s]\nkind = \"search\"\nview = \"v\"\nfields = { n = \"fuzzy\" }\n",
        ),
        "projections.s.fields.n",
        "unknown field kind",
    );
    assert_problem(
        &projection("[projections.x]\nkind = \"cube\"\n"),
        "projections.x.kind",
        "unknown projection kind",
    );
    assert_problem(
        &projection("[projections.x]\nsource = []\n"),
        "projections.x",
        "missing field `kind`",
    );
    // `state` in a projection.
    assert_problem(
        &projection(
            "[projections.v]\nkind = \"view\"\nsource = [\"counter\"]\n[projections.v.on.Bumped]\nset = { n = \"state.n\" }\n",
        ),
        "projections.v.on.Bumped.set.n",
        "`state` is not available here",
    );
}

#[test]
fn hostile_expressions_are_bounded_at_load_time() {
    let too_long = format!("1{}", " + 1".repeat(MAX_EXPRESSION_LEN / 4));
    assert!(
        Expression::compile(&too_long, &[])
            .unwrap_err()
            .contains("limit")
    );
    let deep = format!("{}1{}", "(".repeat(2000), ")".repeat(2000));
    assert!(
        Expression::compile(&deep, &[])
            .unwrap_err()
            .contains("nests")
    );
    let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
    assert!(Expression::compile(&deep, &[]).is_err());
    // Brackets inside strings do not count.
    assert!(Expression::compile(&format!("'{}'", "(".repeat(100)), &[]).is_ok());
    // A long operator chain nests without brackets: the AST depth catches it.
    let chain = format!("1{}", " + 1".repeat(1000));
    assert!(chain.len() <= MAX_EXPRESSION_LEN);
    assert!(
        Expression::compile(&chain, &[])
            .unwrap_err()
            .contains("deep")
    );
    // Long unary chains must not crash the parser or the walk, whatever the
    // verdict.
    for op in ["-", "!"] {
        let unary = format!("{}1", op.repeat(4000));
        let _ = Expression::compile(&unary, &[]);
    }
    assert!(Expression::compile("   ", &[]).is_err());
}

#[test]
fn costly_evaluations_are_stopped() {
    let big: Vec<i64> = (0..1000).collect();
    let command = json!({"l": big, "s": "x".repeat(100_000)});
    let vars = Vars {
        command: Some(&command),
        ..Vars::default()
    };
    let run = |s: &str| Expression::compile(s, &[Var::Command]).unwrap().eval(&vars);
    // 1000 × 1000 iterations exceed the budget.
    let err = run("command.l.map(a, command.l.map(b, a + b)).size()").unwrap_err();
    assert!(err.contains("too costly"), "{err}");
    assert!(run("command.l.all(a, command.l.all(b, b < 5000))").is_err());
    // A single pass is fine.
    assert!(run("command.l.map(a, a * 2).size() == 1000").is_ok());
    // Concatenation cannot grow without bound.
    let err = run("command.l.map(a, command.s + command.s + command.s + command.s + command.s + command.s + command.s + command.s + command.s + command.s + command.s)").unwrap_err();
    assert!(err.contains("too costly"), "{err}");
    // Results are bounded when turned into JSON.
    let err = Expression::compile("command.l.map(a, command.s)", &[Var::Command])
        .unwrap()
        .eval_json(&vars)
        .unwrap_err();
    assert!(err.contains("too costly"), "{err}");
}

fn event<'a>(event_type: &'a str, data: &'a Json, version: u64) -> EventInput<'a> {
    EventInput {
        event_type,
        data,
        aggregate_id: "acc-1",
        version,
        timestamp: Utc.with_ymd_and_hms(2026, 11, 26, 13, 45, 0).unwrap(),
    }
}

#[test]
fn views_set_and_delete_documents() {
    let domain = Domain::from_toml_str(&format!(
        "{EXAMPLE_DOMAIN}\n[projections.open_accounts]\nkind = \"view\"\nsource = [\"account\"]\n[projections.open_accounts.on.AccountOpened]\nset = {{ owner = \"event.owner\", id = \"id\", v = \"event.version\" }}\n[projections.open_accounts.on.AccountClosed]\ndelete = true\n"
    ))
    .unwrap();
    let ProjectionKind::View(accounts) = domain.projection("accounts").unwrap().kind() else {
        panic!("not a view")
    };
    assert_eq!(accounts.indexes(), ["owner", "status"]);
    assert!(accounts.handles("MoneyDeposited"));
    let opened = json!({"owner": "Ada"});
    let ViewChange::Put(doc) = accounts
        .apply(None, &event("AccountOpened", &opened, 1), "account")
        .unwrap()
    else {
        panic!("expected a document")
    };
    assert_eq!(
        doc,
        json!({"owner": "Ada", "status": "open", "balance": 0, "opened_at": "2026-11-26T13:45:00Z"})
    );
    let deposit = json!({"amount": 7});
    let ViewChange::Put(doc) = accounts
        .apply(Some(&doc), &event("MoneyDeposited", &deposit, 2), "account")
        .unwrap()
    else {
        panic!("expected a document")
    };
    assert_eq!(doc["balance"], json!(7));
    assert_eq!(doc["owner"], json!("Ada"), "fields not set are kept");
    // A handler failing on its input is an error, not a panic.
    let err = accounts
        .apply(None, &event("MoneyDeposited", &deposit, 2), "account")
        .unwrap_err();
    assert!(matches!(err, ApplyError::Evaluation { .. }), "{err:?}");

    let ProjectionKind::View(open) = domain.projection("open_accounts").unwrap().kind() else {
        panic!("not a view")
    };
    let ViewChange::Put(doc) = open
        .apply(None, &event("AccountOpened", &opened, 1), "account")
        .unwrap()
    else {
        panic!("expected a document")
    };
    assert_eq!(doc, json!({"owner": "Ada", "id": "acc-1", "v": 1}));
    let closed = json!({});
    assert_eq!(
        open.apply(Some(&doc), &event("AccountClosed", &closed, 9), "account")
            .unwrap(),
        ViewChange::Delete
    );
    assert_eq!(
        open.apply(None, &event("AccountClosed", &closed, 9), "account")
            .unwrap(),
        ViewChange::Unchanged
    );
    assert_eq!(
        open.apply(Some(&doc), &event("MoneyDeposited", &deposit, 3), "account")
            .unwrap(),
        ViewChange::Unchanged
    );
}

/// Applying in place gives what `apply` gives, and a failed handler leaves
/// the document (or the state) as it was.
#[test]
fn handlers_applied_in_place_equal_apply_and_fail_without_a_trace() {
    let domain = Domain::from_toml_str(&format!(
        "{EXAMPLE_DOMAIN}\n[projections.open_accounts]\nkind = \"view\"\nsource = [\"account\"]\n[projections.open_accounts.on.AccountOpened]\nset = {{ owner = \"event.owner\" }}\n[projections.open_accounts.on.AccountClosed]\ndelete = true\n"
    ))
    .unwrap();
    let opened = json!({"owner": "Ada"});
    let deposit = json!({"amount": 7});
    let bad = json!({"amount": "seven"});
    let closed = json!({});
    let events = [
        event("AccountOpened", &opened, 1),
        event("MoneyDeposited", &deposit, 2),
        event("MoneyDeposited", &bad, 3),
        event("AccountClosed", &closed, 4),
        event("MoneyDeposited", &deposit, 5),
    ];
    for name in ["accounts", "open_accounts"] {
        let ProjectionKind::View(view) = domain.projection(name).unwrap().kind() else {
            panic!("not a view")
        };
        let mut in_place: Option<Json> = None;
        let mut applied: Option<Json> = None;
        for event in &events {
            let before = in_place.clone();
            let result = view.apply_in_place(&mut in_place, event, "account");
            match view.apply(applied.as_ref(), event, "account") {
                Ok(ViewChange::Put(doc)) => applied = Some(doc),
                Ok(ViewChange::Delete) => applied = None,
                Ok(ViewChange::Unchanged) => {}
                Err(_) => {
                    assert!(result.is_err(), "{name}: both fail");
                    assert_eq!(in_place, before, "{name}: a failed handler changes nothing");
                }
            }
            assert_eq!(in_place, applied, "{name} after {}", event.event_type);
        }
    }
    let account = domain.aggregate("account").unwrap();
    let mut state = account.initial_state().clone();
    account
        .apply_in_place(&mut state, &event("AccountOpened", &opened, 1))
        .unwrap();
    assert_eq!(
        state,
        account
            .apply(account.initial_state(), &event("AccountOpened", &opened, 1))
            .unwrap()
    );
    let before = state.clone();
    assert!(
        account
            .apply_in_place(&mut state, &event("MoneyDeposited", &bad, 2))
            .is_err()
    );
    assert_eq!(state, before);
}

#[test]
fn aggregations_evaluate_groups_and_measure_inputs() {
    let domain = bank();
    let ProjectionKind::Aggregation(flows) = domain.projection("daily_flows").unwrap().kind()
    else {
        panic!("not an aggregation")
    };
    assert!(flows.handles("MoneyDeposited"));
    assert!(!flows.handles("AccountOpened"));
    assert_eq!(flows.group_fields(), ["day", "flow"]);
    let kinds: Vec<(&str, MeasureKind)> = flows
        .measures()
        .iter()
        .map(|m| (m.name.as_str(), m.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            ("average", MeasureKind::Avg),
            ("count", MeasureKind::Count),
            ("largest", MeasureKind::Max),
            ("total", MeasureKind::Sum)
        ]
    );
    let data = json!({"amount": 12});
    let (group, inputs) = flows
        .evaluate(&event("MoneyDeposited", &data, 2), "account")
        .unwrap();
    assert_eq!(
        Json::Object(group),
        json!({"day": "2026-11-26", "flow": "MoneyDeposited"})
    );
    let twelve = Some(serde_json::Number::from(12));
    assert_eq!(inputs, [twelve.clone(), None, twelve.clone(), twelve]);
    let data = json!({"amount": "twelve"});
    assert!(
        flows
            .evaluate(&event("MoneyDeposited", &data, 2), "account")
            .is_err()
    );
}

#[test]
fn hostile_state_and_bodies_give_errors_not_panics() {
    let domain = bank();
    let account = domain.aggregate("account").unwrap();
    for state in [
        json!(null),
        json!([1]),
        json!({"status": "open"}),
        json!({"status": "open", "balance": "lots"}),
    ] {
        let result = account.execute("deposit", &state, &json!({"amount": 1}), &ctx(0));
        assert!(
            matches!(result, Err(CommandError::Evaluation { .. })),
            "{state}: {result:?}"
        );
    }
    let huge = json!({"status": "open", "balance": i64::MAX, "owner": ""});
    let result = account.execute("deposit", &huge, &json!({"amount": 1}), &ctx(0));
    assert!(
        matches!(result, Err(CommandError::Evaluation { .. })),
        "{result:?}"
    );
    let data = json!({"amount": 1});
    assert!(matches!(
        account.apply(&huge, &event("Nope", &data, 1)),
        Err(ApplyError::UnknownEvent { .. })
    ));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Cmd {
        Open(String),
        Deposit(Json),
        Withdraw(Json),
        Close,
    }

    fn amount() -> impl Strategy<Value = Json> {
        prop_oneof![
            (-5i64..1_000).prop_map(Json::from),
            (0u32..100_000).prop_map(|c| json!(f64::from(c) / 100.0)),
        ]
    }

    fn command() -> impl Strategy<Value = Cmd> {
        prop_oneof![
            "[a-z]{0,5}".prop_map(Cmd::Open),
            amount().prop_map(Cmd::Deposit),
            amount().prop_map(Cmd::Withdraw),
            Just(Cmd::Close),
        ]
    }

    fn is_integral(v: &Json) -> bool {
        v.is_i64() || v.is_u64()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn replaying_the_events_gives_the_decided_state(cmds in proptest::collection::vec(command(), 1..20)) {
            let domain = bank();
            let account = domain.aggregate("account").unwrap();
            let mut state = account.initial_state().clone();
            let mut version = 0u64;
            let mut all_integers = true;
            for cmd in cmds {
                let (name, body) = match &cmd {
                    Cmd::Open(owner) => ("open", json!({"owner": owner})),
                    Cmd::Deposit(a) => ("deposit", json!({"amount": a})),
                    Cmd::Withdraw(a) => ("withdraw", json!({"amount": a})),
                    Cmd::Close => ("close", json!({})),
                };
                if let Cmd::Deposit(a) | Cmd::Withdraw(a) = &cmd {
                    all_integers &= is_integral(a);
                }
                match account.execute(name, &state, &body, &ctx(version)) {
                    Ok(decision) => {
                        prop_assert!(!decision.events.is_empty());
                        let mut replayed = state.clone();
                        for (i, e) in decision.events.iter().enumerate() {
                            let input = EventInput {
                                event_type: &e.event_type,
                                data: &e.data,
                                aggregate_id: "acc-1",
                                version: version + i as u64 + 1,
                                timestamp: ctx(version).now,
                            };
                            replayed = account.apply(&replayed, &input).unwrap();
                        }
                        prop_assert_eq!(&replayed, &decision.new_state);
                        version += decision.events.len() as u64;
                        state = decision.new_state;
                    }
                    Err(CommandError::Rejected { .. }) | Err(CommandError::Schema(_)) => {}
                    Err(other) => prop_assert!(false, "unexpected error {other:?}"),
                }
                if all_integers {
                    prop_assert!(is_integral(&state["balance"]), "balance {}", state["balance"]);
                }
            }
        }

        #[test]
        fn arbitrary_bodies_never_panic(body in any::<(Option<i64>, Option<f64>, Option<String>)>()) {
            let domain = bank();
            let account = domain.aggregate("account").unwrap();
            let open = json!({"balance": 3, "status": "open", "owner": "x"});
            let body = json!({"amount": body.0.map(Json::from).or(body.1.map(Json::from)), "owner": body.2});
            for name in ["open", "deposit", "withdraw", "close"] {
                if let Ok(d) = account.execute(name, &open, &body, &ctx(1)) {
                    prop_assert!(!d.events.is_empty());
                }
            }
        }
    }
}

#[test]
fn emit_when_and_command_variables() {
    let domain = Domain::from_toml_str(
        r#"
[aggregates.door]
state = { opens = 0, last = "" }
[aggregates.door.commands.push]
emit = [
  { event = "Opened", data = { by = "meta.user", at = "now", door = "id" } },
  { event = "Opened", data = { by = "'echo'", at = "now", door = "id" }, when = "command.twice" },
]
[aggregates.door.events.Opened]
set = { opens = "state.opens + 1", last = "event.by + '@' + string(event.version) + '/' + hour(event.timestamp)" }
"#,
    )
    .unwrap();
    let door = domain.aggregate("door").unwrap();
    let state = door.initial_state().clone();
    let once = door
        .execute("push", &state, &json!({"twice": false}), &ctx(4))
        .unwrap();
    assert_eq!(once.events.len(), 1);
    assert_eq!(
        once.events[0].data,
        json!({"by": "tester", "at": "2026-11-26T13:45:00Z", "door": "acc-1"})
    );
    assert_eq!(
        once.new_state,
        json!({"opens": 1, "last": "tester@5/2026-11-26T13"})
    );
    let twice = door
        .execute("push", &state, &json!({"twice": true}), &ctx(4))
        .unwrap();
    assert_eq!(twice.events.len(), 2);
    // Each handler sees the state after the previous event and its own version.
    assert_eq!(
        twice.new_state,
        json!({"opens": 2, "last": "echo@6/2026-11-26T13"})
    );
    let err = door
        .execute("push", &state, &json!({"twice": "yes"}), &ctx(4))
        .unwrap_err();
    assert!(
        matches!(&err, CommandError::Evaluation { place, .. } if place == "aggregates.door.commands.push.emit[1].when"),
        "{err:?}"
    );
}

#[test]
fn emits_name_each_event_its_fields_and_the_command_fields_they_copy() {
    let domain = Domain::from_toml_str(
        r#"
[aggregates.a]
state = { n = 0 }
[aggregates.a.commands.go]
emit = [
  { event = "Went", data = { who = "command.who", twice = " command.n ", sum = "command.n + 1", deep = "command.x.y" } },
  { event = "Noted", data = {}, when = "has(command.note)" },
]
[aggregates.a.events.Went]
set = { n = "state.n + 1" }
[aggregates.a.events.Noted]
set = {}
"#,
    )
    .unwrap();
    let command = domain.aggregate("a").unwrap().command("go").unwrap();
    let emits: Vec<EmitShape<'_>> = command.emits().collect();
    assert_eq!(
        emits,
        [
            EmitShape {
                event: "Went",
                fields: vec![
                    ("deep", None),
                    ("sum", None),
                    ("twice", Some("n")),
                    ("who", Some("who")),
                ],
                conditional: false,
            },
            EmitShape {
                event: "Noted",
                fields: vec![],
                conditional: true,
            },
        ]
    );
}
