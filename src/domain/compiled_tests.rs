//! The compiled evaluator against cel: a differential property test over the
//! compiled subset, and checks that the shapes real domain files use are
//! compiled and answered without cel.

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{Value as Json, json};

use super::aggregate::EventInput;
use super::compiled::Miss;
use super::expr::{EventVar, Expression, Var, Vars, to_json};
use super::projection::{ProjectionKind, ViewHandler};
use super::{Domain, EXAMPLE_DOMAIN};

/// Leaves of generated expressions: literals of every kind, with the
/// numbers at the edges of their ranges, and paths into every variable,
/// present and missing.
const LEAVES: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "7",
    "9223372036854775807",
    "-9223372036854775807",
    "0u",
    "1u",
    "18446744073709551615u",
    "0.0",
    "1.5",
    "-2.5",
    "10.0",
    "1e308",
    "''",
    "'a'",
    "'é'",
    "'2026-11-26T13:05:09Z'",
    "'2026-11-27T01:30:00+02:00'",
    "true",
    "false",
    "null",
    "state",
    "state.a",
    "state.b",
    "state.s",
    "state.l",
    "state.o",
    "state.o.a",
    "state.missing",
    "command.a",
    "command.l",
    "command.s",
    "doc",
    "doc.a",
    "doc.b",
    "doc.o",
    "meta.user",
    "event",
    "event.a",
    "event.s",
    "event.l",
    "event.type",
    "event.version",
    "event.timestamp",
    "event.aggregate_id",
    "event.aggregate_type",
    "event.missing",
    "id",
    "now",
];

const BINARY: &[&str] = &[
    "+", "-", "*", "/", "%", "==", "!=", "<", "<=", ">", ">=", "&&", "||", "in",
];

const PRESENCE: &[&str] = &[
    "has(state.a)",
    "has(state.o.a)",
    "has(state.missing)",
    "has(state.s.a)",
    "has(state.l.a)",
    "has(doc.a)",
    "has(event.a)",
    "has(event.type)",
    "has(event.missing)",
    "has(meta.user)",
];

fn pick(options: &'static [&'static str]) -> impl Strategy<Value = String> + Clone {
    proptest::sample::select(options).prop_map(str::to_owned)
}

/// `(a) op (b)` for an operator of `ops`.
fn binary<A, B>(a: A, ops: &'static [&'static str], b: B) -> impl Strategy<Value = String>
where
    A: Strategy<Value = String>,
    B: Strategy<Value = String>,
{
    (a, pick(ops), b).prop_map(|(a, op, b)| format!("({a}) {op} ({b})"))
}

/// `(c) ? (a) : (b)`.
fn conditional<C, A, B>(c: C, a: A, b: B) -> impl Strategy<Value = String>
where
    C: Strategy<Value = String>,
    A: Strategy<Value = String>,
    B: Strategy<Value = String>,
{
    (c, a, b).prop_map(|(c, a, b)| format!("({c}) ? ({a}) : ({b})"))
}

fn expression() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![8 => pick(LEAVES), 1 => pick(PRESENCE)];
    leaf.prop_recursive(4, 24, 3, |inner| {
        prop_oneof![
            6 => binary(inner.clone(), BINARY, inner.clone()),
            1 => inner.clone().prop_map(|a| format!("!({a})")),
            1 => inner.clone().prop_map(|a| format!("-({a})")),
            2 => conditional(inner.clone(), inner.clone(), inner.clone()),
            1 => inner.clone().prop_map(|a| format!("size({a})")),
            1 => inner.clone().prop_map(|a| format!("({a}).size()")),
            1 => (pick(&["hour", "day", "month"]), inner.clone())
                .prop_map(|(f, a)| format!("{f}({a})")),
            1 => proptest::collection::vec(inner, 0..3)
                .prop_map(|items| format!("[{}]", items.join(", "))),
        ]
    })
}

/// Expressions built by type, so that most of them have a value rather
/// than a type error: numbers, strings, booleans and lists, `depth` deep.
fn typed(depth: u32) -> BoxedStrategy<String> {
    prop_oneof![num(depth), string(depth), boolean(depth), list(depth)].boxed()
}

fn num(depth: u32) -> BoxedStrategy<String> {
    let leaf = pick(&[
        "0",
        "1",
        "-1",
        "2",
        "7",
        "9223372036854775807",
        "-9223372036854775807",
        "1u",
        "18446744073709551615u",
        "0.0",
        "1.5",
        "-2.5",
        "1e308",
        "state.a",
        "state.b",
        "command.a",
        "doc.a",
        "doc.b",
        "event.a",
        "event.version",
        "size(state.s)",
        "size(state.l)",
        "state.o.a",
    ]);
    if depth == 0 {
        return leaf.boxed();
    }
    let inner = || num(depth - 1);
    prop_oneof![
        2 => leaf,
        4 => binary(inner(), &["+", "-", "*", "/", "%"], inner()),
        1 => inner().prop_map(|a| format!("-({a})")),
        1 => conditional(boolean(depth - 1), inner(), inner()),
        1 => typed(depth - 1).prop_map(|a| format!("size({a})")),
    ]
    .boxed()
}

fn string(depth: u32) -> BoxedStrategy<String> {
    let leaf = pick(&[
        "''",
        "'a'",
        "'é'",
        "'2026-11-26T13:05:09Z'",
        "state.s",
        "command.s",
        "event.s",
        "event.type",
        "event.aggregate_id",
        "id",
        "meta.user",
        "day(event.timestamp)",
        "hour(now)",
        "month(state.s)",
    ]);
    if depth == 0 {
        return leaf.boxed();
    }
    prop_oneof![
        2 => leaf,
        2 => (string(depth - 1), string(depth - 1)).prop_map(|(a, b)| format!("({a}) + ({b})")),
        1 => (pick(&["hour", "day", "month"]), string(depth - 1))
            .prop_map(|(f, a)| format!("{f}({a})")),
        1 => conditional(boolean(depth - 1), string(depth - 1), string(depth - 1)),
    ]
    .boxed()
}

fn boolean(depth: u32) -> BoxedStrategy<String> {
    let leaf = pick(&[
        "true",
        "false",
        "has(state.a)",
        "has(state.o.a)",
        "has(doc.missing)",
        "has(event.a)",
        "has(event.type)",
        "state.a == doc.a",
        "event.timestamp < now",
    ]);
    if depth == 0 {
        return leaf.boxed();
    }
    const CMP: &[&str] = &["==", "!=", "<", "<=", ">", ">="];
    prop_oneof![
        2 => leaf,
        2 => binary(num(depth - 1), CMP, num(depth - 1)),
        1 => binary(string(depth - 1), CMP, string(depth - 1)),
        1 => binary(typed(depth - 1), &["==", "!="], typed(depth - 1)),
        2 => binary(boolean(depth - 1), &["&&", "||"], boolean(depth - 1)),
        1 => boolean(depth - 1).prop_map(|a| format!("!({a})")),
        1 => (typed(depth - 1), list(depth - 1)).prop_map(|(a, b)| format!("({a}) in ({b})")),
        1 => string(depth - 1).prop_map(|a| format!("({a}) in (state.o)")),
    ]
    .boxed()
}

fn list(depth: u32) -> BoxedStrategy<String> {
    let leaf = pick(&[
        "[]",
        "state.l",
        "command.l",
        "event.l",
        "[1, 'a']",
        "[state.a]",
    ]);
    if depth == 0 {
        return leaf.boxed();
    }
    prop_oneof![
        2 => leaf,
        1 => (list(depth - 1), list(depth - 1)).prop_map(|(a, b)| format!("({a}) + ({b})")),
        1 => proptest::collection::vec(typed(depth - 1), 0..3)
            .prop_map(|items| format!("[{}]", items.join(", "))),
    ]
    .boxed()
}

fn scalar() -> impl Strategy<Value = Json> {
    prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::from),
        (-3i64..4).prop_map(Json::from),
        proptest::sample::select(&[i64::MAX, i64::MIN, i64::MAX - 1][..]).prop_map(Json::from),
        Just(Json::from(u64::MAX)),
        proptest::sample::select(&[0.0, 1.5, -2.5, 10.0, 1e308, 0.1][..]).prop_map(Json::from),
        pick(&["", "a", "é", "2026-11-26T13:05:09Z", "yesterday"]).prop_map(Json::from),
    ]
}

fn value() -> impl Strategy<Value = Json> {
    scalar().prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Json::Array),
            proptest::collection::btree_map(pick(&["a", "b", "s"]), inner, 0..3)
                .prop_map(|fields| Json::Object(fields.into_iter().collect())),
        ]
    })
}

/// An object with the fields the leaves name, mostly of the type the typed
/// expressions expect (`a`, `b` numbers, `s` and `user` strings, `l` a
/// list, `o` an object), sometimes of any type or missing.
fn object() -> impl Strategy<Value = Json> {
    let number = || {
        prop_oneof![
            4 => (-3i64..8).prop_map(Json::from),
            1 => proptest::sample::select(&[i64::MAX, i64::MIN][..]).prop_map(Json::from),
            1 => Just(Json::from(u64::MAX)),
            2 => proptest::sample::select(&[0.0, 1.5, -2.5, 10.0, 1e308][..]).prop_map(Json::from),
        ]
    };
    let text = || pick(&["", "a", "é", "2026-11-26T13:05:09Z", "b"]).prop_map(Json::from);
    let field = |typed: BoxedStrategy<Json>| prop_oneof![6 => typed.prop_map(Some), 1 => value().prop_map(Some), 1 => Just(None)];
    (
        field(number().boxed()),
        field(number().boxed()),
        field(text().boxed()),
        field(
            proptest::collection::vec(prop_oneof![number(), text()], 0..3)
                .prop_map(Json::Array)
                .boxed(),
        ),
        field(
            proptest::collection::btree_map(pick(&["a", "s"]), prop_oneof![number(), text()], 0..3)
                .prop_map(|fields| Json::Object(fields.into_iter().collect()))
                .boxed(),
        ),
        field(text().boxed()),
    )
        .prop_map(|(a, b, s, l, o, user)| {
            let mut fields = serde_json::Map::new();
            for (name, value) in [
                ("a", a),
                ("b", b),
                ("s", s),
                ("l", l),
                ("o", o),
                ("user", user),
            ] {
                if let Some(value) = value {
                    fields.insert(name.to_owned(), value);
                }
            }
            Json::Object(fields)
        })
}

/// Every variable bound, as the widest evaluation context.
#[derive(Debug)]
struct Inputs {
    state: Json,
    command: Json,
    doc: Json,
    meta: Json,
    data: Json,
    version: u64,
}

fn inputs() -> impl Strategy<Value = Inputs> {
    (
        object(),
        object(),
        object(),
        object(),
        object(),
        proptest::sample::select(&[1u64, 7, u64::MAX][..]),
    )
        .prop_map(|(state, command, doc, meta, data, version)| Inputs {
            state,
            command,
            doc,
            meta,
            data,
            version,
        })
}

fn with_vars<R>(inputs: &Inputs, run: impl FnOnce(&Vars<'_>) -> R) -> R {
    let vars = Vars {
        state: Some(&inputs.state),
        command: Some(&inputs.command),
        doc: Some(&inputs.doc),
        meta: Some(&inputs.meta),
        event: Some(EventVar {
            input: EventInput {
                event_type: "MoneyDeposited",
                data: &inputs.data,
                aggregate_id: "acc-1",
                version: inputs.version,
                timestamp: Utc.with_ymd_and_hms(2026, 11, 26, 13, 45, 0).unwrap(),
            },
            aggregate_type: "account",
        }),
        id: Some("acc-1"),
        now: Some(Utc.with_ymd_and_hms(2026, 11, 26, 23, 59, 59).unwrap()),
        ..Vars::default()
    };
    run(&vars)
}

/// What cel gives, as JSON.
fn cel_answer(expression: &Expression, vars: &Vars<'_>) -> Result<Json, String> {
    expression.eval(vars).and_then(|value| to_json(&value))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Every value the compiled evaluator gives is cel's value, and every
    /// error it claims is an error in cel too.
    #[test]
    fn the_compiled_evaluator_agrees_with_cel(
        source in prop_oneof![expression(), typed(1), typed(2), typed(3)],
        inputs in inputs(),
    ) {
        let Ok(expression) = Expression::compile(&source, &Var::ALL) else {
            // Some generated text is not valid CEL (a literal out of range
            // after a minus, say); the loader reports those.
            return Ok(());
        };
        prop_assert!(expression.is_compiled(), "`{}` is in the subset", source);
        with_vars(&inputs, |vars| {
            let fast = expression.eval_compiled(vars).unwrap();
            let slow = cel_answer(&expression, vars);
            match fast {
                Ok(value) => prop_assert_eq!(
                    slow, Ok(value), "`{}` over {:?} / {:?} / {:?}",
                    source, inputs.state, inputs.doc, inputs.data
                ),
                Err(Miss::Error) => prop_assert!(
                    slow.is_err(), "`{}`: compiled says error, cel gives {:?}", source, slow
                ),
                Err(Miss::Unsupported) => {}
            }
            // What callers see is cel's answer. (Messages are compared in a
            // test of their own: cel prints maps in hash order, which differs
            // from one conversion to the next.)
            prop_assert_eq!(expression.eval_json(vars).ok(), cel_answer(&expression, vars).ok());
            Ok(())
        })?;
    }
}

/// Expressions of the shapes real domains use, which the compiled evaluator
/// must answer itself (no miss), with cel's value.
#[test]
fn common_shapes_are_answered_without_cel() {
    let inputs = Inputs {
        state: json!({"balance": 100, "status": "open", "owner": "Ada", "tags": ["vip"], "rate": 0.5}),
        command: json!({"amount": 25, "note": "rent", "cents": 10.5}),
        doc: json!({"balance": 7, "count": 2}),
        meta: json!({"user": "tester"}),
        data: json!({"amount": 25, "owner": "Ada", "currency": "EUR"}),
        version: 7,
    };
    let cases: &[(&str, Json)] = &[
        ("state.status == 'open'", json!(true)),
        ("state.balance >= command.amount", json!(true)),
        ("state.balance - event.amount", json!(75)),
        ("doc.balance + event.amount", json!(32)),
        ("0 + 10.5", json!(10.5)),
        ("command.cents + 1", json!(11.5)),
        ("state.balance * state.rate", json!(50.0)),
        ("state.balance / 3", json!(33)),
        ("state.balance % 3", json!(1)),
        (
            "state.owner + ' (' + event.currency + ')'",
            json!("Ada (EUR)"),
        ),
        (
            "size(command.note) > 0 && command.amount < 1000",
            json!(true),
        ),
        ("command.note.size()", json!(4)),
        ("has(command.note) ? command.note : ''", json!("rent")),
        ("has(command.missing)", json!(false)),
        ("'vip' in state.tags", json!(true)),
        ("event.currency in ['EUR', 'USD']", json!(true)),
        ("!(state.status == 'closed') || false", json!(true)),
        ("day(event.timestamp)", json!("2026-11-26")),
        ("hour(now)", json!("2026-11-26T23")),
        ("month(event.timestamp)", json!("2026-11")),
        ("now", json!("2026-11-26T23:59:59Z")),
        ("event.timestamp", json!("2026-11-26T13:45:00Z")),
        ("event.type", json!("MoneyDeposited")),
        ("event.version + 1", json!(8)),
        ("event.aggregate_id == id", json!(true)),
        ("meta.user", json!("tester")),
        ("doc.count + 1", json!(3)),
        ("state.tags + [event.owner]", json!(["vip", "Ada"])),
        ("-state.balance", json!(-100)),
        ("null", json!(null)),
        ("state", inputs.state.clone()),
    ];
    with_vars(&inputs, |vars| {
        for (source, expected) in cases {
            let expression = Expression::compile(source, &Var::ALL).unwrap();
            assert!(expression.is_compiled(), "`{source}` is compiled");
            assert_eq!(
                expression.eval_compiled(vars).unwrap(),
                Ok(expected.clone()),
                "`{source}` answered without cel"
            );
            assert_eq!(
                cel_answer(&expression, vars),
                Ok(expected.clone()),
                "`{source}` in cel"
            );
        }
    });
}

/// Errors of the compiled evaluator read exactly as cel's: the caller runs
/// cel again for its message.
#[test]
fn errors_are_cel_errors_with_cel_messages() {
    let inputs = Inputs {
        state: json!({"big": i64::MAX, "s": "x"}),
        command: json!({}),
        doc: json!({}),
        meta: json!({}),
        data: json!({}),
        version: 1,
    };
    with_vars(&inputs, |vars| {
        for source in [
            "state.big + 1",
            "1 / 0",
            "state.missing",
            "state.s + 1",
            "state.s.x",
            "day('yesterday')",
            "state.s && true",
        ] {
            let expression = Expression::compile(source, &Var::ALL).unwrap();
            assert!(expression.is_compiled(), "`{source}` is compiled");
            assert_eq!(
                expression.eval_compiled(vars).unwrap(),
                Err(Miss::Error),
                "{source}"
            );
            let message = cel_answer(&expression, vars).unwrap_err();
            assert_eq!(expression.eval_json(vars), Err(message), "{source}");
        }
        // A non-boolean rule gets cel's message too.
        let rule = Expression::compile("state.s", &Var::ALL).unwrap();
        let err = rule.eval_bool(vars).unwrap_err();
        assert!(err.contains("expected a boolean"), "{err}");
    });
}

/// Every expression of the example domain runs on the compiled evaluator:
/// commands (rules, emit, `when`), state handlers, views and aggregations.
#[test]
fn every_expression_of_the_example_domain_is_compiled() {
    let domain = Domain::from_toml_str(EXAMPLE_DOMAIN).unwrap();
    let mut seen = 0;
    let mut check = |place: String, expression: &Expression| {
        assert!(expression.is_compiled(), "{place} is compiled");
        seen += 1;
    };
    for aggregate in domain.aggregates() {
        for command in aggregate.commands.values() {
            for rule in &command.rules {
                check(
                    format!("{}.{} rule", aggregate.name, command.name),
                    &rule.require,
                );
            }
            for emit in &command.emit {
                for (field, e) in &emit.data {
                    check(
                        format!("{}.{} emit {field}", aggregate.name, command.name),
                        e,
                    );
                }
                if let Some(when) = &emit.when {
                    check(format!("{}.{} when", aggregate.name, command.name), when);
                }
            }
        }
        for (event, handler) in &aggregate.events {
            for (field, e) in &handler.set {
                check(format!("{}.{event}.{field}", aggregate.name), e);
            }
        }
    }
    for projection in domain.projections() {
        match projection.kind() {
            ProjectionKind::View(view) => {
                for (event, handler) in &view.on {
                    if let ViewHandler::Set(set) = handler {
                        for (field, e) in set {
                            check(format!("{}.{event}.{field}", projection.name), e);
                        }
                    }
                }
            }
            ProjectionKind::Aggregation(aggregation) => {
                for e in &aggregation.group_by {
                    check(format!("{} group_by", projection.name), e);
                }
                for measure in &aggregation.measures {
                    if let Some(e) = &measure.input {
                        check(format!("{} {}", projection.name, measure.name), e);
                    }
                }
            }
            ProjectionKind::Search(_) => {}
        }
    }
    assert!(seen > 10, "the example has {seen} expressions");
}
