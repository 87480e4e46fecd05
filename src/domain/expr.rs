//! CEL expressions as cqrsd uses them: compiled once with load-time bounds,
//! evaluated with cqrsd's number semantics, time helpers and a cost budget,
//! and converted to and from JSON.
//!
//! Numbers: cel 0.15 refuses `int + double`, which surprises users whose
//! JSON bodies mix `10` and `10.5`. After parsing, the arithmetic operator
//! calls of the AST (`_+_`, `_-_`, `_*_`, `_/_`, `_%_`) are renamed to
//! functions of ours (`@add`, ...); `@` cannot start a name in CEL source, so
//! users cannot call them or shadow them. Those functions keep integers
//! integers (checked, so overflow is an error rather than a wrap), switch to
//! floating point as soon as one side is a double, and hand every other
//! operand type back to cel's own operators. Comparisons already work across
//! int, uint and double in cel 0.15, so they are left alone.

use std::cell::OnceCell;
use std::collections::{BTreeSet, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock};

use cel::common::ast::{EntryExpr, Expr, IdedExpr, operators};
use cel::objects::{Key, Map};
use cel::{Context, Env, ExecutionError, Value};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value as Json;

use super::aggregate::EventInput;
use super::compiled::{self, Node};

/// Longest expression source accepted. Real rules are a line or two; the cap
/// keeps parse time and AST size small whatever a domain file contains.
pub const MAX_EXPRESSION_LEN: usize = 4096;

/// Deepest bracket nesting accepted before the parser runs. The ANTLR parser
/// recurses once per nesting level and a few thousand levels would overflow
/// the stack, so this is checked on the raw text, before parsing.
pub const MAX_BRACKET_DEPTH: usize = 32;

/// The parser's own nesting limit, passed on to cel's recursion guard.
const MAX_PARSER_DEPTH: u16 = 64;

/// Deepest AST accepted after parsing. Evaluation recurses once per level, so
/// this bounds the evaluator's stack use (long `a + b + c + ...` chains nest
/// without brackets).
pub const MAX_AST_DEPTH: usize = 96;

/// Most comprehension iterations (`all`, `exists`, `map`, `filter`, ...) one
/// evaluation may run, counted over all nested macros. The input is bounded
/// by the HTTP body limit, but `l.map(a, l.map(b, ...))` is quadratic in it.
pub const MAX_ITERATIONS: u64 = 100_000;

/// Longest string or list one `+` may produce: concatenation is the only way
/// an expression grows a value beyond its inputs.
pub const MAX_CONCAT_LEN: usize = 1 << 20;

/// Largest JSON value (approximate bytes) an expression may produce. CEL
/// shares values internally, so a list holding the same big string many times
/// is cheap until it is turned into JSON; this stops it there.
pub const MAX_RESULT_BYTES: usize = 4 << 20;

/// The variables an expression may name. Which ones are allowed depends on
/// where the expression is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Var {
    State,
    Command,
    Event,
    Doc,
    Id,
    Meta,
    Now,
    /// A policy's answer to a rejected send (`on_rejected` only).
    Rejection,
}

impl Var {
    pub(crate) const ALL: [Var; 8] = [
        Var::State,
        Var::Command,
        Var::Event,
        Var::Doc,
        Var::Id,
        Var::Meta,
        Var::Now,
        Var::Rejection,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Var::State => "state",
            Var::Command => "command",
            Var::Event => "event",
            Var::Doc => "doc",
            Var::Id => "id",
            Var::Meta => "meta",
            Var::Now => "now",
            Var::Rejection => "rejection",
        }
    }
}

/// The values of the variables for one evaluation, borrowed as JSON; absent
/// ones are not bound. Compiled expressions read them as they are; the same
/// values as CEL values are made only when an expression that runs on cel
/// needs them, once per evaluation context.
#[derive(Debug, Default)]
pub(crate) struct Vars<'a> {
    pub state: Option<&'a Json>,
    pub command: Option<&'a Json>,
    pub event: Option<EventVar<'a>>,
    pub doc: Option<&'a Json>,
    pub id: Option<&'a str>,
    pub meta: Option<&'a Json>,
    pub now: Option<DateTime<Utc>>,
    pub rejection: Option<&'a Json>,
    /// The variables converted for cel, filled on first use: leave it at its
    /// default.
    pub cel_cache: OnceCell<CelVars>,
}

/// The `event` variable: a recorded event and its aggregate type.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EventVar<'a> {
    pub input: EventInput<'a>,
    pub aggregate_type: &'a str,
}

/// The variables as CEL values.
#[derive(Debug, Default)]
pub(crate) struct CelVars {
    state: Option<Value>,
    command: Option<Value>,
    event: Option<Value>,
    doc: Option<Value>,
    id: Option<Value>,
    meta: Option<Value>,
    now: Option<Value>,
    rejection: Option<Value>,
}

impl Vars<'_> {
    fn cel(&self) -> &CelVars {
        self.cel_cache.get_or_init(|| CelVars {
            state: self.state.map(from_json),
            command: self.command.map(from_json),
            event: self.event.map(|e| e.input.cel_variable(e.aggregate_type)),
            doc: self.doc.map(from_json),
            id: self.id.map(|id| Value::String(Arc::new(id.to_owned()))),
            meta: self.meta.map(from_json),
            now: self.now.map(timestamp),
            rejection: self.rejection.map(from_json),
        })
    }
}

/// A compiled expression, ready to be evaluated any number of times: the
/// cel AST, and the same expression for the compiled evaluator when it is in
/// that evaluator's subset.
#[derive(Debug, Clone)]
pub(crate) struct Expression {
    ast: IdedExpr,
    compiled: Option<Node>,
}

/// The standard CEL environment, shared by every evaluation: it holds no
/// state of ours, only cel's standard library.
fn env() -> Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib())).clone()
}

const ARITHMETIC: [(&str, &str); 5] = [
    (operators::ADD, "@add"),
    (operators::SUBSTRACT, "@sub"),
    (operators::MULTIPLY, "@mul"),
    (operators::DIVIDE, "@div"),
    (operators::MODULO, "@rem"),
];

/// The guard wrapped around every comprehension range, which charges its
/// size to the evaluation's iteration budget.
const RANGE_GUARD: &str = "@range";

impl Expression {
    /// Parses `source`, checks its bounds and that it only names variables of
    /// `allowed`, and rewrites it for cqrsd's number semantics.
    pub(crate) fn compile(source: &str, allowed: &[Var]) -> Result<Expression, String> {
        if source.len() > MAX_EXPRESSION_LEN {
            return Err(format!(
                "expression is {} bytes long, the limit is {MAX_EXPRESSION_LEN}",
                source.len()
            ));
        }
        if source.trim().is_empty() {
            return Err("expression is empty".to_owned());
        }
        let depth = bracket_depth(source);
        if depth > MAX_BRACKET_DEPTH {
            return Err(format!(
                "expression nests brackets {depth} deep, the limit is {MAX_BRACKET_DEPTH}"
            ));
        }
        let parsed = catch_unwind(|| {
            env()
                .parser()
                .max_recursion_depth(MAX_PARSER_DEPTH)
                .parse(source)
        })
        .map_err(|_| "the CEL parser failed on this expression".to_owned())?;
        let mut ast = parsed.map_err(|errors| {
            let messages: Vec<String> = errors.errors.iter().map(|e| e.msg.clone()).collect();
            format!("invalid CEL: {}", messages.join("; "))
        })?;
        let mut walk = Walk {
            scopes: Vec::new(),
            accumulators: Vec::new(),
            free: BTreeSet::new(),
        };
        walk.visit(&mut ast, 0)?;
        let env = env();
        let unknown: Vec<&String> = walk
            .free
            .iter()
            .filter(|name| {
                !allowed.iter().any(|v| v.name() == name.as_str())
                    && env.types().find_type(name).is_none()
            })
            .collect();
        if let Some(name) = unknown.first() {
            let known = Var::ALL.iter().any(|v| v.name() == name.as_str());
            let allowed: Vec<&str> = allowed.iter().map(|v| v.name()).collect();
            return Err(if known {
                format!(
                    "variable `{name}` is not available here (available: {})",
                    allowed.join(", ")
                )
            } else {
                format!(
                    "unknown variable `{name}` (available here: {})",
                    allowed.join(", ")
                )
            });
        }
        let compiled = compiled::compile(&ast);
        Ok(Expression { ast, compiled })
    }

    /// Whether the compiled evaluator runs this expression (else cel does).
    #[cfg(test)]
    pub(crate) fn is_compiled(&self) -> bool {
        self.compiled.is_some()
    }

    /// The compiled evaluator's own answer, with no fallback to cel: for the
    /// differential test. `None` when the expression is not compiled.
    #[cfg(test)]
    pub(crate) fn eval_compiled(
        &self,
        vars: &Vars<'_>,
    ) -> Option<Result<serde_json::Value, compiled::Miss>> {
        self.compiled
            .as_ref()
            .map(|node| compiled::eval_json(node, vars))
    }

    /// Evaluates the expression with cel. Errors are messages for the caller
    /// to place.
    pub(crate) fn eval(&self, vars: &Vars<'_>) -> Result<Value, String> {
        let vars = vars.cel();
        ROOT.with(|root| {
            let root = root.as_ref().map_err(Clone::clone)?;
            // Variables live in a child scope, so the root's functions are
            // registered once per thread rather than once per evaluation
            // (that registration was the costliest step of a projected event).
            let mut ctx = root.new_inner_scope();
            let bindings = [
                (Var::State, &vars.state),
                (Var::Command, &vars.command),
                (Var::Event, &vars.event),
                (Var::Doc, &vars.doc),
                (Var::Id, &vars.id),
                (Var::Meta, &vars.meta),
                (Var::Now, &vars.now),
                (Var::Rejection, &vars.rejection),
            ];
            for (var, value) in bindings {
                if let Some(value) = value {
                    ctx.add_variable_from_value(var.name(), value.clone());
                }
            }
            BUDGET.with(|budget| budget.set(0));
            // cel is not known to panic on a checked AST, but a panic here would
            // take a request (or a projection worker) down with it: a panic is
            // turned into an evaluation error as a last line of defence.
            let result = catch_unwind(AssertUnwindSafe(|| Value::resolve(&self.ast, &ctx)))
                .map_err(|_| "the expression evaluator failed on this input".to_owned())?;
            result.map_err(|error| error.to_string())
        })
    }

    /// Evaluates the expression and requires a boolean. A compiled
    /// expression that gives no value here is run again with cel, so an
    /// error reads the same whichever evaluator ran.
    pub(crate) fn eval_bool(&self, vars: &Vars<'_>) -> Result<bool, String> {
        if let Some(node) = &self.compiled
            && let Ok(b) = compiled::eval_bool(node, vars)
        {
            return Ok(b);
        }
        match self.eval(vars)? {
            Value::Bool(b) => Ok(b),
            other => Err(format!(
                "expected a boolean, got a value of type {}",
                other.type_of()
            )),
        }
    }

    /// Evaluates the expression and converts the result to JSON; as with
    /// [`Expression::eval_bool`], cel has the last word when the compiled
    /// evaluator gives no value.
    pub(crate) fn eval_json(&self, vars: &Vars<'_>) -> Result<Json, String> {
        if let Some(node) = &self.compiled
            && let Ok(value) = compiled::eval_json(node, vars)
        {
            return Ok(value);
        }
        to_json(&self.eval(vars)?)
    }
}

/// The deepest nesting of `(`, `[` and `{` in `source`, ignoring quoted text.
/// It errs on the side of counting too much (raw and triple-quoted strings
/// are treated like ordinary ones), which can only make the bound stricter.
fn bracket_depth(source: &str) -> usize {
    let mut depth = 0usize;
    let mut deepest = 0usize;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in source.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => quote = Some(c),
            '(' | '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// One pass over a parsed AST: checks its depth and node kinds, collects the
/// free variables, and rewrites arithmetic and comprehension ranges.
struct Walk {
    /// Variables bound by enclosing comprehensions.
    scopes: Vec<String>,
    /// Accumulators of enclosing comprehensions: the macro-generated
    /// `@result + [x]` steps must stay as they are, because cel recognises
    /// that exact shape to build `map`/`filter` results in linear time.
    accumulators: Vec<String>,
    free: BTreeSet<String>,
}

impl Walk {
    fn visit(&mut self, node: &mut IdedExpr, depth: usize) -> Result<(), String> {
        if depth > MAX_AST_DEPTH {
            return Err(format!(
                "expression nests more than {MAX_AST_DEPTH} operations deep"
            ));
        }
        let next = depth + 1;
        match &mut node.expr {
            Expr::Unspecified => return Err("invalid CEL: incomplete expression".to_owned()),
            Expr::Literal(_) => {}
            Expr::Ident(name) => {
                if !self.scopes.iter().any(|s| s == name) {
                    self.free.insert(name.clone());
                }
            }
            Expr::Select(select) => self.visit(&mut select.operand, next)?,
            Expr::List(list) => {
                for element in &mut list.elements {
                    self.visit(element, next)?;
                }
            }
            Expr::Map(map) => {
                for entry in &mut map.entries {
                    match &mut entry.expr {
                        EntryExpr::MapEntry(e) => {
                            self.visit(&mut e.key, next)?;
                            self.visit(&mut e.value, next)?;
                        }
                        EntryExpr::StructField(_) => {
                            return Err("invalid CEL: a field entry in a map literal".to_owned());
                        }
                    }
                }
            }
            Expr::Struct(s) => {
                return Err(format!(
                    "message construction (`{}{{...}}`) is not supported",
                    s.type_name
                ));
            }
            Expr::Call(call) => {
                let accumulator_step = call.func_name == operators::ADD
                    && matches!(call.args.first().map(|a| &a.expr),
                        Some(Expr::Ident(name)) if self.accumulators.contains(name));
                if call.target.is_none()
                    && call.args.len() == 2
                    && !accumulator_step
                    && let Some((_, ours)) = ARITHMETIC.iter().find(|(op, _)| *op == call.func_name)
                {
                    call.func_name = (*ours).to_owned();
                }
                if let Some(target) = &mut call.target {
                    self.visit(target, next)?;
                }
                for arg in &mut call.args {
                    self.visit(arg, next)?;
                }
            }
            Expr::Comprehension(c) => {
                // The range and the initial accumulator are evaluated outside
                // the comprehension's scope; the rest inside it.
                self.visit(&mut c.iter_range, next)?;
                self.visit(&mut c.accu_init, next)?;
                let range = std::mem::take(&mut c.iter_range);
                c.iter_range = IdedExpr {
                    id: range.id,
                    expr: Expr::Call(cel::common::ast::CallExpr {
                        func_name: RANGE_GUARD.to_owned(),
                        target: None,
                        args: vec![range],
                    }),
                };
                let bound = self.scopes.len();
                self.scopes.push(c.iter_var.clone());
                if let Some(second) = &c.iter_var2 {
                    self.scopes.push(second.clone());
                }
                self.scopes.push(c.accu_var.clone());
                self.accumulators.push(c.accu_var.clone());
                let inner = (|| {
                    self.visit(&mut c.loop_cond, next)?;
                    self.visit(&mut c.loop_step, next)?;
                    self.visit(&mut c.result, next)
                })();
                self.accumulators.pop();
                self.scopes.truncate(bound);
                inner?;
            }
        }
        Ok(())
    }
}

thread_local! {
    /// The root context of every evaluation on this thread: the environment
    /// and cqrsd's functions. Contexts hold boxed closures that are not
    /// `Sync`, hence one per thread rather than one per process.
    static ROOT: Result<Context<'static, 'static>, String> = root_context();
    /// Comprehension iterations charged so far by the evaluation running on
    /// this thread; `eval` resets it. Evaluations never nest (no function
    /// evaluates an expression), so one counter per thread is one per
    /// evaluation.
    static BUDGET: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn root_context() -> Result<Context<'static, 'static>, String> {
    let mut ctx = Context::with_env(env());
    let declare = |e: cel::DeclarationError| format!("internal error declaring a function: {e}");
    ctx.add_function("@add", |a: Value, b: Value| arithmetic(Op::Add, a, b))
        .map_err(declare)?;
    ctx.add_function("@sub", |a: Value, b: Value| arithmetic(Op::Sub, a, b))
        .map_err(declare)?;
    ctx.add_function("@mul", |a: Value, b: Value| arithmetic(Op::Mul, a, b))
        .map_err(declare)?;
    ctx.add_function("@div", |a: Value, b: Value| arithmetic(Op::Div, a, b))
        .map_err(declare)?;
    ctx.add_function("@rem", |a: Value, b: Value| arithmetic(Op::Rem, a, b))
        .map_err(declare)?;
    ctx.add_function(RANGE_GUARD, |range: Value| {
        charge(&range)?;
        Ok::<Value, ExecutionError>(range)
    })
    .map_err(declare)?;
    for name in ["hour", "day", "month"] {
        ctx.add_function(name, move |ts: Value| bucket(&ts, name))
            .map_err(declare)?;
    }
    Ok(ctx)
}

/// Charges the size of a comprehension range to the running evaluation's budget.
fn charge(range: &Value) -> Result<(), ExecutionError> {
    let size = match range {
        Value::List(list) => list.len(),
        Value::Map(map) => map.map.len(),
        _ => 0,
    };
    let size = u64::try_from(size).unwrap_or(u64::MAX);
    let total = BUDGET.with(|budget| {
        let total = budget.get().saturating_add(size);
        budget.set(total);
        total
    });
    if total > MAX_ITERATIONS {
        return Err(ExecutionError::function_error(
            "comprehension",
            format!("too costly: more than {MAX_ITERATIONS} iterations in one expression"),
        ));
    }
    Ok(())
}

/// The strftime format of a time helper's bucket.
pub(crate) fn bucket_format(name: &str) -> &'static str {
    match name {
        "hour" => "%Y-%m-%dT%H",
        "day" => "%Y-%m-%d",
        _ => "%Y-%m",
    }
}

/// A time bucket of a timestamp, or of an RFC 3339 string, in UTC.
fn bucket(ts: &Value, name: &str) -> Result<Value, ExecutionError> {
    let format = bucket_format(name);
    let ts: DateTime<Utc> = match ts {
        Value::Timestamp(t) => t.with_timezone(&Utc),
        Value::String(s) => DateTime::parse_from_rfc3339(s)
            .map_err(|e| {
                ExecutionError::function_error(name, format!("not an RFC 3339 timestamp: {e}"))
            })?
            .with_timezone(&Utc),
        other => {
            return Err(ExecutionError::function_error(
                name,
                format!("expected a timestamp, got {}", other.type_of()),
            ));
        }
    };
    Ok(Value::String(Arc::new(ts.format(format).to_string())))
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

impl Op {
    /// The operator of one of our arithmetic functions (`@add`, ...).
    pub(crate) fn from_function(name: &str) -> Option<Op> {
        Some(match name {
            "@add" => Op::Add,
            "@sub" => Op::Sub,
            "@mul" => Op::Mul,
            "@div" => Op::Div,
            "@rem" => Op::Rem,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Sub => "sub",
            Op::Mul => "mul",
            Op::Div => "div",
            Op::Rem => "rem",
        }
    }
}

fn is_number(v: &Value) -> bool {
    matches!(v, Value::Int(_) | Value::UInt(_) | Value::Float(_))
}

/// cqrsd's arithmetic: numbers as users expect, everything else as cel does.
fn arithmetic(op: Op, a: Value, b: Value) -> Result<Value, ExecutionError> {
    if is_number(&a) && is_number(&b) {
        return numeric(op, a, b);
    }
    let result = match op {
        Op::Add => a + b,
        Op::Sub => a - b,
        Op::Mul => a * b,
        Op::Div => a / b,
        Op::Rem => a % b,
    }?;
    let len = match &result {
        Value::String(s) => s.len(),
        Value::List(l) => l.len(),
        _ => 0,
    };
    if len > MAX_CONCAT_LEN {
        return Err(ExecutionError::function_error(
            op.name(),
            format!("too costly: the result would be longer than {MAX_CONCAT_LEN}"),
        ));
    }
    Ok(result)
}

fn numeric(op: Op, a: Value, b: Value) -> Result<Value, ExecutionError> {
    let num = |v: &Value| match v {
        Value::Int(i) => Num::Int(*i),
        Value::UInt(u) => Num::UInt(*u),
        _ => Num::Float(as_float(v)),
    };
    match numeric_core(op, num(&a), num(&b)) {
        Ok(Num::Int(i)) => Ok(Value::Int(i)),
        Ok(Num::UInt(u)) => Ok(Value::UInt(u)),
        Ok(Num::Float(f)) => Ok(Value::Float(f)),
        Err(NumError::Overflow) => Err(ExecutionError::Overflow(op.name(), a, b)),
        Err(NumError::DivisionByZero) => Err(ExecutionError::DivisionByZero(a)),
        Err(NumError::RemainderByZero) => Err(ExecutionError::RemainderByZero(a)),
    }
}

/// A number of either evaluator: CEL's three kinds.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Num {
    Int(i64),
    UInt(u64),
    Float(f64),
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum NumError {
    Overflow,
    DivisionByZero,
    RemainderByZero,
}

/// cqrsd's number rules, shared by the cel functions and the compiled
/// evaluator so that both compute alike.
pub(crate) fn numeric_core(op: Op, a: Num, b: Num) -> Result<Num, NumError> {
    let integer = |n: Num| match n {
        Num::Int(i) => Some(i128::from(i)),
        Num::UInt(u) => Some(i128::from(u)),
        Num::Float(_) => None,
    };
    match (integer(a), integer(b)) {
        (Some(x), Some(y)) => {
            let result = match op {
                Op::Add => x.checked_add(y),
                Op::Sub => x.checked_sub(y),
                Op::Mul => x.checked_mul(y),
                Op::Div if y == 0 => return Err(NumError::DivisionByZero),
                Op::Rem if y == 0 => return Err(NumError::RemainderByZero),
                Op::Div => x.checked_div(y),
                Op::Rem => x.checked_rem(y),
            }
            .ok_or(NumError::Overflow)?;
            // Two ints give an int and two uints a uint, as in CEL, and
            // leaving their range is an overflow. A mix gives an int when it
            // fits, which is what a JSON integer becomes, else a uint.
            match (a, b) {
                (Num::Int(_), Num::Int(_)) => i64::try_from(result)
                    .map(Num::Int)
                    .map_err(|_| NumError::Overflow),
                (Num::UInt(_), Num::UInt(_)) => u64::try_from(result)
                    .map(Num::UInt)
                    .map_err(|_| NumError::Overflow),
                _ => i64::try_from(result).map(Num::Int).or_else(|_| {
                    u64::try_from(result)
                        .map(Num::UInt)
                        .map_err(|_| NumError::Overflow)
                }),
            }
        }
        _ => {
            let float = |n: Num| match n {
                Num::Int(i) => i as f64,
                Num::UInt(u) => u as f64,
                Num::Float(f) => f,
            };
            let (x, y) = (float(a), float(b));
            if matches!(op, Op::Div | Op::Rem) && y == 0.0 {
                return Err(if matches!(op, Op::Div) {
                    NumError::DivisionByZero
                } else {
                    NumError::RemainderByZero
                });
            }
            let result = match op {
                Op::Add => x + y,
                Op::Sub => x - y,
                Op::Mul => x * y,
                Op::Div => x / y,
                Op::Rem => x % y,
            };
            if result.is_finite() || !(x.is_finite() && y.is_finite()) {
                Ok(Num::Float(result))
            } else {
                Err(NumError::Overflow)
            }
        }
    }
}

fn as_float(v: &Value) -> f64 {
    match v {
        Value::Int(i) => *i as f64,
        Value::UInt(u) => *u as f64,
        Value::Float(f) => *f,
        _ => f64::NAN,
    }
}

/// Runs a handler's `set` expressions over `vars` and returns each field's
/// new value; an error names the field (`<place>.set.<field>`). Aggregate
/// event handlers and view handlers share this, so both report alike. Every
/// expression sees the values as they were before the handler, and nothing
/// is written until all of them succeeded, so a failed handler changes
/// nothing. The place is only spelled out for an error: on the hot path it
/// costs nothing.
pub(crate) fn eval_set<'s>(
    set: &'s [(String, Expression)],
    vars: &Vars<'_>,
    place: &dyn Fn() -> String,
) -> Result<Vec<(&'s str, Json)>, super::ApplyError> {
    set.iter()
        .map(|(field, expression)| {
            expression
                .eval_json(vars)
                .map(|value| (field.as_str(), value))
                .map_err(|reason| super::ApplyError::Evaluation {
                    place: format!("{}.set.{field}", place()),
                    reason,
                })
        })
        .collect()
}

/// Writes the values of [`eval_set`] into an object's fields.
pub(crate) fn assign(fields: &mut serde_json::Map<String, Json>, values: Vec<(&str, Json)>) {
    for (field, value) in values {
        match fields.get_mut(field) {
            Some(slot) => *slot = value,
            None => {
                fields.insert(field.to_owned(), value);
            }
        }
    }
}

/// JSON to CEL: integers that fit an i64 become ints, larger ones uints, all
/// other numbers doubles.
pub(crate) fn from_json(value: &serde_json::Value) -> Value {
    match value {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(items) => {
            Value::List(Arc::new(items.iter().map(from_json).collect()))
        }
        serde_json::Value::Object(fields) => {
            let map: HashMap<Key, Value> = fields
                .iter()
                .map(|(k, v)| (Key::String(Arc::new(k.clone())), from_json(v)))
                .collect();
            Value::Map(Map { map: Arc::new(map) })
        }
    }
}

/// A CEL timestamp for a UTC time.
pub(crate) fn timestamp(t: DateTime<Utc>) -> Value {
    Value::Timestamp(t.fixed_offset())
}

/// CEL to JSON: ints and uints become JSON integers, doubles JSON floats
/// (non-finite ones are an error), timestamps RFC 3339 strings in UTC.
pub(crate) fn to_json(value: &Value) -> Result<serde_json::Value, String> {
    let mut size = 0usize;
    to_json_sized(value, &mut size)
}

fn to_json_sized(value: &Value, size: &mut usize) -> Result<serde_json::Value, String> {
    // Every node costs a little beyond its text, so that a huge list of
    // empty values is bounded too.
    *size = size.saturating_add(8);
    if *size > MAX_RESULT_BYTES {
        return Err(format!(
            "too costly: the result is larger than {MAX_RESULT_BYTES} bytes"
        ));
    }
    Ok(match value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Int(i) => serde_json::Value::from(*i),
        Value::UInt(u) => serde_json::Value::from(*u),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .ok_or_else(|| format!("the number {f} cannot be stored in JSON"))?,
        Value::String(s) => {
            *size = size.saturating_add(s.len());
            if *size > MAX_RESULT_BYTES {
                return Err(format!(
                    "too costly: the result is larger than {MAX_RESULT_BYTES} bytes"
                ));
            }
            serde_json::Value::String(s.as_str().to_owned())
        }
        Value::Timestamp(t) => serde_json::Value::String(
            t.with_timezone(&Utc)
                .to_rfc3339_opts(SecondsFormat::AutoSi, true),
        ),
        Value::List(items) => serde_json::Value::Array(
            items
                .iter()
                .map(|item| to_json_sized(item, size))
                .collect::<Result<_, _>>()?,
        ),
        Value::Map(map) => {
            let mut object = serde_json::Map::new();
            // Sorted keys give the same JSON for the same value every time.
            let mut entries: Vec<(&Key, &Value)> = map.map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            for (key, item) in entries {
                let key = match key {
                    Key::String(s) => s.as_str().to_owned(),
                    Key::Int(i) => i.to_string(),
                    Key::Uint(u) => u.to_string(),
                    Key::Bool(b) => b.to_string(),
                };
                *size = size.saturating_add(key.len());
                object.insert(key, to_json_sized(item, size)?);
            }
            serde_json::Value::Object(object)
        }
        other => {
            return Err(format!(
                "a value of type {} cannot be stored in JSON",
                other.type_of()
            ));
        }
    })
}
