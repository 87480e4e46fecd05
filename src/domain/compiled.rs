//! The compiled subset of CEL: the shapes real domain files use, evaluated
//! directly on the JSON values of the variables, with no conversion into CEL
//! values.
//!
//! At load time [`compile`] turns an expression's (already rewritten) AST
//! into a [`Node`] tree when every part of it is in the subset: literals,
//! variables and field paths, `+ - * / %` with cqrsd's number rules,
//! comparisons, `&& || !`, `? :`, list literals, `size`, `has`, `in` and the
//! time helpers. Anything else (macros, indexing, method calls, map literals,
//! type conversions, ...) leaves the expression to cel.
//!
//! An evaluation answers a value, or a [`Miss`]: `Error` when cel is known to
//! fail on the same input too, `Unsupported` when this evaluator does not
//! model the case (durations, the whole `event` variable, ...). The caller
//! runs cel on every miss, so an error's message is always cel's own and a
//! case this evaluator leaves out still gets cel's answer. What matters for
//! correctness is that every value answered here is the value cel gives; the
//! differential property test in `domain/tests.rs` checks that, and that
//! every `Error` is an error in cel too.

use std::borrow::Cow;
use std::cmp::Ordering;

use cel::common::ast::{Expr, IdedExpr, LiteralValue, operators};
use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};
use serde_json::Value as Json;

use super::expr::{
    EventVar, MAX_CONCAT_LEN, MAX_RESULT_BYTES, Num, NumError, Op, Var, Vars, bucket_format,
    numeric_core,
};

/// A compiled expression of the subset.
#[derive(Debug, Clone)]
pub(crate) enum Node {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Var(Var),
    /// `operand.field`
    Field(Box<Node>, String),
    /// `has(operand.field)`
    Has(Box<Node>, String),
    List(Vec<Node>),
    Not(Box<Node>),
    Neg(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Cond(Box<(Node, Node, Node)>),
    Arith(Op, Box<Node>, Box<Node>),
    Cmp(Cmp, Box<Node>, Box<Node>),
    In(Box<Node>, Box<Node>),
    Size(Box<Node>),
    /// `hour`, `day` or `month` of a timestamp or an RFC 3339 string.
    Bucket(Bucket, Box<Node>),
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Bucket {
    Hour,
    Day,
    Month,
}

impl Bucket {
    fn format(self) -> &'static str {
        bucket_format(match self {
            Bucket::Hour => "hour",
            Bucket::Day => "day",
            Bucket::Month => "month",
        })
    }
}

/// Compiles a checked and rewritten AST, or `None` when some part of it is
/// outside the subset.
pub(crate) fn compile(ast: &IdedExpr) -> Option<Node> {
    let boxed = |e: &IdedExpr| compile(e).map(Box::new);
    Some(match &ast.expr {
        Expr::Literal(literal) => match literal {
            LiteralValue::Null => Node::Null,
            LiteralValue::Boolean(b) => Node::Bool(*b.inner()),
            LiteralValue::Int(i) => Node::Int(*i.inner()),
            LiteralValue::UInt(u) => Node::UInt(*u.inner()),
            LiteralValue::Double(d) => Node::Float(*d.inner()),
            LiteralValue::String(s) => Node::Str(s.inner().to_owned()),
            LiteralValue::Bytes(_) => return None,
        },
        Expr::Ident(name) => Node::Var(*Var::ALL.iter().find(|v| v.name() == name)?),
        Expr::Select(select) => {
            let operand = boxed(&select.operand)?;
            if select.test {
                Node::Has(operand, select.field.clone())
            } else {
                Node::Field(operand, select.field.clone())
            }
        }
        Expr::List(list) => {
            if !list.optional_indices.is_empty() {
                return None;
            }
            Node::List(list.elements.iter().map(compile).collect::<Option<_>>()?)
        }
        Expr::Call(call) => {
            let args = &call.args;
            let name = call.func_name.as_str();
            if let Some(target) = &call.target {
                // Only `x.size()`; every other method stays with cel.
                return (name == "size" && args.is_empty())
                    .then(|| compile(target).map(|t| Node::Size(Box::new(t))))
                    .flatten();
            }
            match (name, args.as_slice()) {
                (operators::CONDITIONAL, [c, a, b]) => {
                    Node::Cond(Box::new((compile(c)?, compile(a)?, compile(b)?)))
                }
                (operators::LOGICAL_AND, [a, b]) => Node::And(boxed(a)?, boxed(b)?),
                (operators::LOGICAL_OR, [a, b]) => Node::Or(boxed(a)?, boxed(b)?),
                (operators::LOGICAL_NOT, [a]) => Node::Not(boxed(a)?),
                (operators::NEGATE, [a]) => Node::Neg(boxed(a)?),
                (operators::IN, [a, b]) => Node::In(boxed(a)?, boxed(b)?),
                ("size", [a]) => Node::Size(boxed(a)?),
                ("hour", [a]) => Node::Bucket(Bucket::Hour, boxed(a)?),
                ("day", [a]) => Node::Bucket(Bucket::Day, boxed(a)?),
                ("month", [a]) => Node::Bucket(Bucket::Month, boxed(a)?),
                (_, [a, b]) => {
                    let cmp = match name {
                        operators::EQUALS => Some(Cmp::Eq),
                        operators::NOT_EQUALS => Some(Cmp::Ne),
                        operators::LESS => Some(Cmp::Lt),
                        operators::LESS_EQUALS => Some(Cmp::Le),
                        operators::GREATER => Some(Cmp::Gt),
                        operators::GREATER_EQUALS => Some(Cmp::Ge),
                        _ => None,
                    };
                    if let Some(cmp) = cmp {
                        Node::Cmp(cmp, boxed(a)?, boxed(b)?)
                    } else {
                        Node::Arith(Op::from_function(name)?, boxed(a)?, boxed(b)?)
                    }
                }
                _ => return None,
            }
        }
        Expr::Map(_) | Expr::Struct(_) | Expr::Comprehension(_) | Expr::Unspecified => return None,
    })
}

/// Why the compiled evaluator gave no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Miss {
    /// cel fails on this input too.
    Error,
    /// Not modelled here: only cel knows.
    Unsupported,
}

/// A value during an evaluation: scalars by value, strings and JSON
/// containers borrowed from the variables or the expression where possible.
#[derive(Debug, Clone)]
enum V<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(Cow<'a, str>),
    /// A JSON array or object of a variable.
    Json(&'a Json),
    /// A list made by the expression.
    List(Vec<V<'a>>),
    Ts(DateTime<FixedOffset>),
    /// The `event` variable itself: its data with its metadata beside it.
    Event(&'a EventVar<'a>),
}

type Eval<'a> = Result<V<'a>, Miss>;

/// A JSON value as the evaluator sees it, with the number kinds of
/// `expr::from_json`: integers that fit an i64 are ints, larger ones uints,
/// all others doubles.
fn from_ref(json: &Json) -> V<'_> {
    match json {
        Json::Null => V::Null,
        Json::Bool(b) => V::Bool(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                V::Int(i)
            } else if let Some(u) = n.as_u64() {
                V::UInt(u)
            } else {
                V::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => V::Str(Cow::Borrowed(s)),
        Json::Array(_) | Json::Object(_) => V::Json(json),
    }
}

/// A field of the `event` variable: the metadata names win over data fields
/// of the same name, as in `EventInput::cel_variable`.
fn event_field<'a>(event: &'a EventVar<'a>, field: &str) -> Option<V<'a>> {
    let input = &event.input;
    Some(match field {
        "type" => V::Str(Cow::Borrowed(input.event_type)),
        "aggregate_id" => V::Str(Cow::Borrowed(input.aggregate_id)),
        "aggregate_type" => V::Str(Cow::Borrowed(event.aggregate_type)),
        "version" => match i64::try_from(input.version) {
            Ok(i) => V::Int(i),
            Err(_) => V::UInt(input.version),
        },
        "timestamp" => V::Ts(input.timestamp.fixed_offset()),
        _ => match input.data {
            Json::Object(fields) => from_ref(fields.get(field)?),
            _ => return None,
        },
    })
}

fn event_has(event: &EventVar<'_>, field: &str) -> bool {
    super::aggregate::EVENT_META_FIELDS.contains(&field)
        || matches!(event.input.data, Json::Object(fields) if fields.contains_key(field))
}

/// Evaluates `node` and converts the result to JSON, bounded in size like
/// `expr::to_json`.
pub(crate) fn eval_json(node: &Node, vars: &Vars<'_>) -> Result<Json, Miss> {
    to_json(eval(node, vars)?)
}

/// Evaluates `node`, which must give a boolean.
pub(crate) fn eval_bool(node: &Node, vars: &Vars<'_>) -> Result<bool, Miss> {
    match eval(node, vars)? {
        V::Bool(b) => Ok(b),
        _ => Err(Miss::Error),
    }
}

fn bool_of(value: Eval<'_>) -> Result<bool, Miss> {
    match value? {
        V::Bool(b) => Ok(b),
        _ => Err(Miss::Error),
    }
}

fn eval<'a>(node: &'a Node, vars: &'a Vars<'_>) -> Eval<'a> {
    Ok(match node {
        Node::Null => V::Null,
        Node::Bool(b) => V::Bool(*b),
        Node::Int(i) => V::Int(*i),
        Node::UInt(u) => V::UInt(*u),
        Node::Float(f) => V::Float(*f),
        Node::Str(s) => V::Str(Cow::Borrowed(s)),
        // An unbound variable is an undeclared reference in cel.
        Node::Var(var) => match var {
            Var::State => from_ref(vars.state.ok_or(Miss::Error)?),
            Var::Command => from_ref(vars.command.ok_or(Miss::Error)?),
            Var::Doc => from_ref(vars.doc.ok_or(Miss::Error)?),
            Var::Meta => from_ref(vars.meta.ok_or(Miss::Error)?),
            Var::Rejection => from_ref(vars.rejection.ok_or(Miss::Error)?),
            Var::Event => V::Event(vars.event.as_ref().ok_or(Miss::Error)?),
            Var::Id => V::Str(Cow::Borrowed(vars.id.ok_or(Miss::Error)?)),
            Var::Now => V::Ts(vars.now.ok_or(Miss::Error)?.fixed_offset()),
        },
        Node::Field(operand, field) => match eval(operand, vars)? {
            V::Json(Json::Object(fields)) => from_ref(fields.get(field).ok_or(Miss::Error)?),
            V::Event(event) => event_field(event, field).ok_or(Miss::Error)?,
            // Selecting from anything else is an error in cel: a list is
            // indexed by numbers, scalars cannot be indexed at all.
            _ => return Err(Miss::Error),
        },
        Node::Has(operand, field) => match eval(operand, vars)? {
            V::Json(Json::Object(fields)) => V::Bool(fields.contains_key(field)),
            V::Event(event) => V::Bool(event_has(event, field)),
            _ => return Err(Miss::Error),
        },
        Node::List(items) => V::List(
            items
                .iter()
                .map(|item| eval(item, vars))
                .collect::<Result<_, _>>()?,
        ),
        Node::Not(operand) => match eval(operand, vars)? {
            V::Bool(b) => V::Bool(!b),
            _ => return Err(Miss::Error),
        },
        Node::Neg(operand) => match eval(operand, vars)? {
            V::Int(i) => V::Int(i.checked_neg().ok_or(Miss::Error)?),
            V::Float(f) => V::Float(-f),
            V::Ts(_) | V::Event(_) => return Err(Miss::Unsupported),
            _ => return Err(Miss::Error),
        },
        // cel's logical operators: the left side decides alone when it is
        // the absorbing value; otherwise the right side is evaluated (its
        // error is the result's), and an absorbing right side wins over a
        // failed left side.
        Node::Or(left, right) => {
            let left = bool_of(eval(left, vars));
            if left == Ok(true) {
                return Ok(V::Bool(true));
            }
            let right = eval(right, vars)?;
            match (left, right) {
                (Ok(false), V::Bool(r)) => V::Bool(r),
                (Err(_), V::Bool(true)) => V::Bool(true),
                (Err(miss), _) => return Err(miss),
                _ => return Err(Miss::Error),
            }
        }
        Node::And(left, right) => {
            let left = bool_of(eval(left, vars));
            if left == Ok(false) {
                return Ok(V::Bool(false));
            }
            let right = eval(right, vars)?;
            match (left, right) {
                (Ok(true), V::Bool(r)) => V::Bool(r),
                (Err(_), V::Bool(false)) => V::Bool(false),
                (Err(miss), _) => return Err(miss),
                _ => return Err(Miss::Error),
            }
        }
        Node::Cond(branches) => {
            let (condition, then, otherwise) = &**branches;
            if bool_of(eval(condition, vars))? {
                eval(then, vars)?
            } else {
                eval(otherwise, vars)?
            }
        }
        Node::Arith(op, a, b) => arithmetic(*op, eval(a, vars)?, eval(b, vars)?)?,
        Node::Cmp(cmp, a, b) => {
            let (a, b) = (eval(a, vars)?, eval(b, vars)?);
            V::Bool(match cmp {
                Cmp::Eq => equal(&a, &b)?,
                Cmp::Ne => !equal(&a, &b)?,
                Cmp::Lt => compare(&a, &b)? == Ordering::Less,
                Cmp::Le => compare(&a, &b)? != Ordering::Greater,
                Cmp::Gt => compare(&a, &b)? == Ordering::Greater,
                Cmp::Ge => compare(&a, &b)? != Ordering::Less,
            })
        }
        Node::In(item, container) => {
            let item = eval(item, vars)?;
            match eval(container, vars)? {
                V::Json(Json::Object(fields)) => match &item {
                    V::Str(key) => V::Bool(fields.contains_key(key.as_ref())),
                    _ => return Err(Miss::Unsupported),
                },
                container @ (V::Json(Json::Array(_)) | V::List(_)) => {
                    let mut found = false;
                    for element in list_items(&container).into_iter().flatten() {
                        if equal(&element, &item)? {
                            found = true;
                            break;
                        }
                    }
                    V::Bool(found)
                }
                V::Ts(_) | V::Event(_) => return Err(Miss::Unsupported),
                _ => return Err(Miss::Error),
            }
        }
        Node::Size(operand) => {
            let size = match eval(operand, vars)? {
                V::Str(s) => s.chars().count(),
                V::Json(Json::Array(items)) => items.len(),
                V::Json(Json::Object(fields)) => fields.len(),
                V::List(items) => items.len(),
                V::Ts(_) | V::Event(_) => return Err(Miss::Unsupported),
                _ => return Err(Miss::Error),
            };
            V::Int(i64::try_from(size).map_err(|_| Miss::Unsupported)?)
        }
        Node::Bucket(kind, operand) => {
            let ts: DateTime<Utc> = match eval(operand, vars)? {
                V::Ts(t) => t.with_timezone(&Utc),
                V::Str(s) => DateTime::parse_from_rfc3339(&s)
                    .map_err(|_| Miss::Error)?
                    .with_timezone(&Utc),
                V::Event(_) => return Err(Miss::Unsupported),
                _ => return Err(Miss::Error),
            };
            V::Str(Cow::Owned(ts.format(kind.format()).to_string()))
        }
    })
}

/// The elements of a list value, `None` for anything else.
fn list_items<'a>(value: &V<'a>) -> Option<Vec<V<'a>>> {
    match value {
        V::Json(Json::Array(items)) => Some(items.iter().map(from_ref).collect()),
        V::List(items) => Some(items.clone()),
        _ => None,
    }
}

fn number(value: &V<'_>) -> Option<Num> {
    match value {
        V::Int(i) => Some(Num::Int(*i)),
        V::UInt(u) => Some(Num::UInt(*u)),
        V::Float(f) => Some(Num::Float(*f)),
        _ => None,
    }
}

/// cqrsd's arithmetic, as `expr::arithmetic` does it on cel values.
fn arithmetic<'a>(op: Op, a: V<'a>, b: V<'a>) -> Eval<'a> {
    if let (Some(x), Some(y)) = (number(&a), number(&b)) {
        return match numeric_core(op, x, y) {
            Ok(Num::Int(i)) => Ok(V::Int(i)),
            Ok(Num::UInt(u)) => Ok(V::UInt(u)),
            Ok(Num::Float(f)) => Ok(V::Float(f)),
            Err(NumError::Overflow | NumError::DivisionByZero | NumError::RemainderByZero) => {
                Err(Miss::Error)
            }
        };
    }
    match (op, &a, &b) {
        (Op::Add, V::Str(x), V::Str(y)) => {
            if x.len() + y.len() > MAX_CONCAT_LEN {
                return Err(Miss::Error);
            }
            let mut joined = String::with_capacity(x.len() + y.len());
            joined.push_str(x);
            joined.push_str(y);
            Ok(V::Str(Cow::Owned(joined)))
        }
        (_, V::Ts(_) | V::Event(_), _) | (_, _, V::Ts(_) | V::Event(_)) => Err(Miss::Unsupported),
        (Op::Add, _, _) => match (list_items(&a), list_items(&b)) {
            (Some(mut x), Some(y)) => {
                if x.len() + y.len() > MAX_CONCAT_LEN {
                    return Err(Miss::Error);
                }
                x.extend(y);
                Ok(V::List(x))
            }
            _ => Err(Miss::Error),
        },
        _ => Err(Miss::Error),
    }
}

/// cel's equality: numbers compare across int, uint and double; lists and
/// maps element by element; values of different types are unequal.
fn equal(a: &V<'_>, b: &V<'_>) -> Result<bool, Miss> {
    if let (Some(x), Some(y)) = (number(a), number(b)) {
        return Ok(numbers_equal(x, y));
    }
    Ok(match (a, b) {
        (V::Event(_), _) | (_, V::Event(_)) => return Err(Miss::Unsupported),
        (V::Null, V::Null) => true,
        (V::Bool(x), V::Bool(y)) => x == y,
        (V::Str(x), V::Str(y)) => x == y,
        (V::Ts(x), V::Ts(y)) => x == y,
        (V::Json(Json::Object(x)), V::Json(Json::Object(y))) => {
            if x.len() != y.len() {
                return Ok(false);
            }
            for (key, value) in x {
                match y.get(key) {
                    Some(other) if equal(&from_ref(value), &from_ref(other))? => {}
                    _ => return Ok(false),
                }
            }
            true
        }
        _ => match (list_items(a), list_items(b)) {
            (Some(x), Some(y)) => {
                if x.len() != y.len() {
                    return Ok(false);
                }
                for (p, q) in x.iter().zip(&y) {
                    if !equal(p, q)? {
                        return Ok(false);
                    }
                }
                true
            }
            _ => false,
        },
    })
}

fn numbers_equal(a: Num, b: Num) -> bool {
    match (a, b) {
        (Num::Int(x), Num::Int(y)) => x == y,
        (Num::UInt(x), Num::UInt(y)) => x == y,
        (Num::Float(x), Num::Float(y)) => x == y,
        (Num::Int(x), Num::UInt(y)) | (Num::UInt(y), Num::Int(x)) => {
            u64::try_from(x).is_ok_and(|x| x == y)
        }
        (Num::Int(x), Num::Float(y)) | (Num::Float(y), Num::Int(x)) => x as f64 == y,
        (Num::UInt(x), Num::Float(y)) | (Num::Float(y), Num::UInt(x)) => x as f64 == y,
    }
}

/// cel's ordering: numbers across kinds, strings, booleans and timestamps
/// each among themselves; other pairs of scalars are not comparable.
fn compare(a: &V<'_>, b: &V<'_>) -> Result<Ordering, Miss> {
    if let (Some(x), Some(y)) = (number(a), number(b)) {
        return match (x, y) {
            (Num::Int(x), Num::Int(y)) => Ok(x.cmp(&y)),
            (Num::UInt(x), Num::UInt(y)) => Ok(x.cmp(&y)),
            (Num::Int(x), Num::UInt(y)) => {
                Ok(u64::try_from(x).map_or(Ordering::Less, |x| x.cmp(&y)))
            }
            (Num::UInt(x), Num::Int(y)) => {
                Ok(u64::try_from(y).map_or(Ordering::Greater, |y| x.cmp(&y)))
            }
            (Num::Int(x), Num::Float(y)) => (x as f64).partial_cmp(&y).ok_or(Miss::Error),
            (Num::UInt(x), Num::Float(y)) => (x as f64).partial_cmp(&y).ok_or(Miss::Error),
            (Num::Float(x), Num::Int(y)) => x.partial_cmp(&(y as f64)).ok_or(Miss::Error),
            (Num::Float(x), Num::UInt(y)) => x.partial_cmp(&(y as f64)).ok_or(Miss::Error),
            (Num::Float(x), Num::Float(y)) => x.partial_cmp(&y).ok_or(Miss::Error),
        };
    }
    let scalar = |v: &V<'_>| {
        matches!(
            v,
            V::Null | V::Bool(_) | V::Int(_) | V::UInt(_) | V::Float(_) | V::Str(_) | V::Ts(_)
        )
    };
    match (a, b) {
        (V::Str(x), V::Str(y)) => Ok(x.cmp(y)),
        (V::Bool(x), V::Bool(y)) => Ok(x.cmp(y)),
        (V::Ts(x), V::Ts(y)) => Ok(x.cmp(y)),
        (V::Null, V::Null) => Err(Miss::Unsupported),
        _ if scalar(a) && scalar(b) => Err(Miss::Error),
        _ => Err(Miss::Unsupported),
    }
}

/// The approximate size `expr::to_json` charges for a value: 8 for every
/// node, plus the length of every string and map key.
fn json_size(json: &Json) -> usize {
    8usize.saturating_add(match json {
        Json::String(s) => s.len(),
        Json::Array(items) => items
            .iter()
            .fold(0usize, |sum, item| sum.saturating_add(json_size(item))),
        Json::Object(fields) => fields.iter().fold(0usize, |sum, (key, item)| {
            sum.saturating_add(key.len())
                .saturating_add(json_size(item))
        }),
        _ => 0,
    })
}

fn value_size(value: &V<'_>) -> usize {
    match value {
        V::Str(s) => 8usize.saturating_add(s.len()),
        V::Json(json) => json_size(json),
        V::List(items) => items
            .iter()
            .fold(8usize, |sum, item| sum.saturating_add(value_size(item))),
        _ => 8,
    }
}

fn to_json(value: V<'_>) -> Result<Json, Miss> {
    if value_size(&value) > MAX_RESULT_BYTES {
        return Err(Miss::Error);
    }
    into_json(value)
}

fn into_json(value: V<'_>) -> Result<Json, Miss> {
    Ok(match value {
        V::Null => Json::Null,
        V::Bool(b) => Json::Bool(b),
        V::Int(i) => Json::from(i),
        V::UInt(u) => Json::from(u),
        V::Float(f) => serde_json::Number::from_f64(f)
            .map(Json::Number)
            .ok_or(Miss::Error)?,
        V::Str(s) => Json::String(s.into_owned()),
        V::Json(json) => json.clone(),
        V::List(items) => Json::Array(items.into_iter().map(into_json).collect::<Result<_, _>>()?),
        V::Ts(t) => Json::String(
            t.with_timezone(&Utc)
                .to_rfc3339_opts(SecondsFormat::AutoSi, true),
        ),
        V::Event(_) => return Err(Miss::Unsupported),
    })
}
