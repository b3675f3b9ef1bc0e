//! CEL expressions: compiled once at load, checked for the variables they
//! use, evaluated per request against `claims` and `factors`.
//!
//! Herald provides two functions beside CEL's standard library:
//! - `matches` (`s.matches(re)` and `matches(s, re)`), whose pattern must be
//!   a string literal: every pattern is compiled once, at load, and a bad
//!   one refuses the policy file instead of failing each request;
//! - `segment(x)`, which returns `x` as a string if it is one safe SPIFFE ID
//!   path segment (`[A-Za-z0-9._-]`, not `.` or `..`, not empty) and fails
//!   otherwise. A `spiffe_id.expression` must pass every claim that reaches
//!   the ID through it, so a claim can never inject `/`, `..`, `%` or
//!   another trust domain.
//!
//! Evaluation cost is bounded at load (expression size, syntax tree size,
//! comprehension nesting, and [`MAX_STEPS`] over the largest claims
//! accepted) and per request (the size of the claims).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue, operators};
use cel::extractors::This;
use cel::{Context, Env, ExecutionError, Program};
use herald_core::spiffe_id::is_segment;
use serde_json::{Map, Value};

/// The variables an expression may reference.
pub const VARIABLES: &[&str] = &["claims", "factors"];

/// Largest expression accepted, bytes.
pub const MAX_EXPRESSION_BYTES: usize = 4 * 1024;
/// Most nodes in an expression's syntax tree.
pub const MAX_NODES: usize = 1_000;
/// Deepest nesting of comprehensions (`all`, `exists`, `map`, `filter`):
/// each level multiplies the work by the size of a claims list.
pub const MAX_COMPREHENSION_DEPTH: usize = 2;
/// Most values (scalars, list items, map entries) in the claims an
/// expression evaluates over.
pub const MAX_CLAIM_VALUES: usize = 4_096;
/// Deepest nesting of the claims.
pub const MAX_CLAIM_DEPTH: usize = 16;
/// Most evaluation steps an expression may take, bounded at load over the
/// largest claims accepted: every comprehension is assumed to run over
/// [`MAX_CLAIM_VALUES`] items when its range comes from the claims, so two
/// nested ones over claim lists (about 16.7 million steps) are refused,
/// as is a membership test on a claim list inside a loop over another.
pub const MAX_STEPS: u64 = 250_000;
/// Longest regex pattern.
pub const MAX_PATTERN_BYTES: usize = 1_024;
/// Deepest nesting of brackets — `(`, `[`, `{`, calls included — outside
/// string literals. The CEL parser and evaluator recurse once per level:
/// an unoptimised build overflows a 2 MiB thread (a Tokio worker's) at
/// about 11, so the limit is checked before the parser ever runs.
pub const MAX_NESTING: usize = 8;

/// What an expression computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A `condition`: a boolean.
    Condition,
    /// A `spiffe_id.expression`: a string in which every claim passes
    /// through `segment()`.
    SpiffeId,
}

/// The standard CEL environment, built once: building it registers every
/// standard function, which would otherwise dominate an evaluation.
fn env() -> Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib())).clone()
}

/// Claims converted to a CEL value, once per request (shared by every
/// expression of every candidate policy). Refused beyond the size bounds.
pub fn claims_value(claims: &Map<String, Value>) -> Result<cel::Value, String> {
    let mut count = 0usize;
    for v in claims.values() {
        measure(v, 1, &mut count)?;
    }
    cel::objects::TryIntoValue::try_into_value(claims).map_err(|e| format!("claims: {e}"))
}

fn measure(v: &Value, depth: usize, count: &mut usize) -> Result<(), String> {
    *count += 1;
    if *count > MAX_CLAIM_VALUES || depth > MAX_CLAIM_DEPTH {
        return Err(format!(
            "claims exceed {MAX_CLAIM_VALUES} values or {MAX_CLAIM_DEPTH} levels"
        ));
    }
    match v {
        Value::Array(items) => items.iter().try_for_each(|i| measure(i, depth + 1, count)),
        Value::Object(m) => m.values().try_for_each(|i| measure(i, depth + 1, count)),
        _ => Ok(()),
    }
}

/// The deepest bracket nesting of a CEL source outside its string and
/// bytes literals (quoted with `'`, `"`, or tripled; `r`-prefixed ones
/// take no escapes), and how many operator characters (`.`, `+`, `==`'s
/// two, …) it holds outside them.
fn nesting(source: &str) -> (usize, usize) {
    let b = source.as_bytes();
    let (mut depth, mut max, mut i) = (0usize, 0usize, 0usize);
    let mut operators = 0usize;
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'') => {
                // A prefix (`r`, `b`, `rb`, `br`, any case) only when not
                // the tail of an identifier, exactly as CEL lexes it.
                let mut j = i;
                while j > 0 && i - j < 2 && matches!(b[j - 1], b'r' | b'R' | b'b' | b'B') {
                    j -= 1;
                }
                let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
                let raw = (j == 0 || !ident(b[j - 1]))
                    && b[j..i].iter().any(|c| matches!(c, b'r' | b'R'));
                let triple = b[i..].starts_with(&[q, q, q]);
                let close: &[u8] = if triple { &[q, q, q] } else { &[q] };
                i += close.len();
                while i < b.len() && !b[i..].starts_with(close) {
                    i += if b[i] == b'\\' && !raw { 2 } else { 1 };
                }
                i += close.len();
                continue;
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'.' | b'+' | b'-' | b'*' | b'/' | b'%' | b'<' | b'>' | b'=' | b'!' | b'&' | b'|'
            | b'?' | b':' => operators += 1,
            _ => {}
        }
        i += 1;
    }
    (max, operators)
}

/// A call on the `sub` claim found in an expression: the method and its
/// string literal argument, if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubCall {
    /// `matches`, `startsWith`, `endsWith` or `contains`.
    pub method: String,
    /// The literal pattern or prefix; `None` when it is computed.
    pub literal: Option<String>,
    /// How the value tested relates to `sub`.
    pub subject: SubSubject,
}

/// How the value a string test runs on relates to the `sub` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubSubject {
    /// `sub` itself, or a value that starts with it (`claims.sub + "x"`,
    /// `[claims.sub].exists(s, …)`): a pattern anchored to a literal
    /// prefix bounds it.
    Leading,
    /// A value computed from `sub` that may not start with it (`"x" +
    /// claims.sub`, `claims[k]`, a list that also holds other values): an
    /// anchor bounds nothing.
    Computed,
    /// `sub` is the argument (`x.startsWith(claims.sub)`) and the receiver
    /// is not a literal.
    Argument,
}

/// A compiled expression.
pub struct Compiled {
    program: Program,
    source: String,
    /// Every `matches` pattern, compiled at load.
    regexes: Arc<HashMap<String, regex::Regex>>,
    sub_calls: Vec<SubCall>,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Compiled").field(&self.source).finish()
    }
}

impl Compiled {
    /// Compiles `source` for `role`: only [`VARIABLES`], literal regex
    /// patterns (each compiled now), bounded size and comprehension depth,
    /// and for a SPIFFE ID every claim through `segment()`.
    pub fn compile(source: &str, role: Role) -> Result<Self, String> {
        if source.len() > MAX_EXPRESSION_BYTES {
            return Err(format!("expression exceeds {MAX_EXPRESSION_BYTES} bytes"));
        }
        let (brackets, operators) = nesting(source);
        if brackets > MAX_NESTING {
            return Err(format!(
                "expression nests brackets more than {MAX_NESTING} deep"
            ));
        }
        // The parser also recurses once per operator of a chain (`a + b +
        // …`, `a.b.c…`): an expression with more operators than it may
        // have nodes is refused before it runs.
        if operators > MAX_NODES {
            return Err(format!("expression has more than {MAX_NODES} nodes"));
        }
        let program = Program::compile(source).map_err(|e| format!("CEL: {e}"))?;
        let root = program.expression();
        let mut free = BTreeSet::new();
        free_variables(root, &mut Vec::new(), &mut free);
        let unknown: Vec<&str> = free
            .iter()
            .map(String::as_str)
            .filter(|v| !VARIABLES.contains(v))
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "CEL references unknown variable(s) {} (only `claims` and `factors` exist)",
                unknown.join(", ")
            ));
        }
        let mut shape = Shape::default();
        shape.walk(root, 0);
        if shape.nodes > MAX_NODES {
            return Err(format!("expression has more than {MAX_NODES} nodes"));
        }
        if shape.max_depth > MAX_COMPREHENSION_DEPTH {
            return Err(format!(
                "comprehensions nest deeper than {MAX_COMPREHENSION_DEPTH} levels"
            ));
        }
        if let Some(e) = shape.error {
            return Err(e);
        }
        let steps = Cost::default().walk(root).steps;
        if steps > MAX_STEPS {
            return Err(format!(
                "expression may take {steps} evaluation steps over claims of {MAX_CLAIM_VALUES} values (limit {MAX_STEPS}): do not nest loops over claim lists, or test membership in one inside a loop over another"
            ));
        }
        let mut regexes = HashMap::new();
        for pattern in shape.patterns {
            if pattern.len() > MAX_PATTERN_BYTES {
                return Err(format!(
                    "a matches() pattern exceeds {MAX_PATTERN_BYTES} bytes"
                ));
            }
            let re = regex::RegexBuilder::new(&pattern)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| format!("matches({pattern:?}): not a valid regex: {e}"))?;
            regexes.insert(pattern, re);
        }
        if role == Role::SpiffeId {
            raw_claims(root, Flow::Value)?;
        }
        Ok(Self {
            program,
            source: source.to_string(),
            regexes: Arc::new(regexes),
            sub_calls: shape.sub_calls,
        })
    }

    /// The calls on the `sub` claim (for the dangerous-policy check).
    pub fn sub_calls(&self) -> &[SubCall] {
        &self.sub_calls
    }

    fn run(&self, claims: &cel::Value, factors: &[&str]) -> Result<cel::Value, String> {
        let mut ctx = Context::with_env(env());
        ctx.add_variable_from_value("claims", claims.clone());
        ctx.add_variable("factors", factors)
            .map_err(|e| format!("factors: {e}"))?;
        let regexes = self.regexes.clone();
        ctx.add_function(
            "matches",
            move |This(subject): This<Arc<String>>,
                  pattern: Arc<String>|
                  -> Result<bool, ExecutionError> {
                match regexes.get(pattern.as_str()) {
                    Some(re) => Ok(re.is_match(&subject)),
                    // Unreachable for a literal pattern; a computed one was
                    // refused at load.
                    None => Err(ExecutionError::function_error(
                        "matches",
                        "the pattern was not compiled at load",
                    )),
                }
            },
        )
        .map_err(|e| format!("matches: {e}"))?;
        ctx.add_function(
            "segment",
            |v: cel::Value| -> Result<Arc<String>, ExecutionError> {
                let text = match v {
                    cel::Value::String(s) => s.to_string(),
                    cel::Value::Int(i) => i.to_string(),
                    cel::Value::UInt(u) => u.to_string(),
                    _ => {
                        return Err(ExecutionError::function_error(
                            "segment",
                            "takes a string or an integer",
                        ));
                    }
                };
                if is_segment(&text) {
                    Ok(Arc::new(text))
                } else {
                    Err(ExecutionError::function_error(
                        "segment",
                        "the value is not one SPIFFE ID path segment ([A-Za-z0-9._-], not . or ..)",
                    ))
                }
            },
        )
        .map_err(|e| format!("segment: {e}"))?;
        self.program
            .execute(&ctx)
            .map_err(|e| format!("evaluation failed: {e}"))
    }

    /// Evaluates to a boolean; anything else (or an error, such as a
    /// missing claim) is an error — which the caller treats as "deny".
    pub fn eval_bool(&self, claims: &cel::Value, factors: &[&str]) -> Result<bool, String> {
        match self.run(claims, factors)? {
            cel::Value::Bool(b) => Ok(b),
            other => Err(format!("condition returned {other:?}, not a bool")),
        }
    }

    /// Evaluates to a string.
    pub fn eval_string(&self, claims: &cel::Value, factors: &[&str]) -> Result<String, String> {
        match self.run(claims, factors)? {
            cel::Value::String(s) => Ok(s.to_string()),
            other => Err(format!("expression returned {other:?}, not a string")),
        }
    }
}

/// The string literal `e` is, if it is one.
fn literal(e: &IdedExpr) -> Option<String> {
    match &e.expr {
        Expr::Literal(LiteralValue::String(s)) => Some(s.inner().to_owned()),
        _ => None,
    }
}

/// How much of the `sub` claim an expression's value may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taint {
    /// None of it.
    Clean,
    /// It is a string that starts with `sub`.
    Leading,
    /// It may hold `sub` anywhere, or not at all.
    Anywhere,
}

impl Taint {
    /// The taint of a value that is one of `self` or `other`: a mix of
    /// `sub` and other values is no longer known to start with `sub`.
    fn join(self, other: Taint) -> Taint {
        if self == other { self } else { Taint::Anywhere }
    }

    /// The taint of a value computed from parts of these taints.
    fn any(parts: impl IntoIterator<Item = Taint>) -> Taint {
        if parts.into_iter().all(|t| t == Taint::Clean) {
            Taint::Clean
        } else {
            Taint::Anywhere
        }
    }
}

/// What a walk of the syntax tree finds.
#[derive(Default)]
struct Shape {
    nodes: usize,
    max_depth: usize,
    patterns: BTreeSet<String>,
    sub_calls: Vec<SubCall>,
    error: Option<String>,
    /// Comprehension variables in scope, innermost last, with the taint
    /// of the values they take.
    scope: Vec<(String, Taint)>,
}

impl Shape {
    fn bound(&self, name: &str) -> Option<Taint> {
        self.scope
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, t)| *t)
    }

    /// Whether `e` is the `claims` variable (not a comprehension variable
    /// that shadows it).
    fn is_claims(&self, e: &IdedExpr) -> bool {
        matches!(&e.expr, Expr::Ident(n) if n == "claims" && self.bound(n).is_none())
    }

    /// Walks `e`, recording what [`Shape`] collects, and returns how much
    /// of `sub` its value may carry. The taint is tracked through every
    /// computation so that a test on a value derived from `sub` —
    /// `(claims.sub + "").matches(…)`, `[claims.sub].exists(s,
    /// s.matches(…))`, `claims[k]` — is judged like one on `sub` itself.
    fn walk(&mut self, e: &IdedExpr, depth: usize) -> Taint {
        self.nodes += 1;
        self.max_depth = self.max_depth.max(depth);
        match &e.expr {
            Expr::Ident(n) => match self.bound(n) {
                Some(t) => t,
                // The whole claims map holds `sub`.
                None if n == "claims" => Taint::Anywhere,
                None => Taint::Clean,
            },
            Expr::Literal(_) | Expr::Unspecified => Taint::Clean,
            Expr::Select(s) => {
                if self.is_claims(&s.operand) {
                    self.nodes += 1;
                    return if s.field == "sub" && !s.test {
                        Taint::Leading
                    } else {
                        Taint::Clean
                    };
                }
                let t = self.walk(&s.operand, depth);
                if s.test { Taint::Clean } else { t }
            }
            Expr::Call(c) => self.call(c, depth),
            Expr::List(l) => {
                let items: Vec<Taint> = l.elements.iter().map(|el| self.walk(el, depth)).collect();
                Taint::any(items)
            }
            Expr::Map(m) => {
                let mut parts = Vec::new();
                for entry in &m.entries {
                    parts.push(self.entry(&entry.expr, depth));
                }
                Taint::any(parts)
            }
            Expr::Struct(s) => {
                let mut parts = Vec::new();
                for entry in &s.entries {
                    parts.push(self.entry(&entry.expr, depth));
                }
                Taint::any(parts)
            }
            Expr::Comprehension(c) => {
                let items = self.items(&c.iter_range, depth);
                let init = self.walk(&c.accu_init, depth);
                let outer = self.scope.len();
                self.scope.push((c.iter_var.clone(), items));
                if let Some(v2) = &c.iter_var2 {
                    self.scope.push((v2.clone(), items));
                }
                self.scope.push((c.accu_var.clone(), init));
                self.walk(&c.loop_cond, depth + 1);
                let step = self.walk(&c.loop_step, depth + 1);
                // The accumulator (never named by a policy: the macros
                // call it `@result`) ends as its initial value or a step's.
                if let Some(last) = self.scope.last_mut() {
                    last.1 = if step == init {
                        init
                    } else {
                        Taint::any([init, step])
                    };
                }
                let result = self.walk(&c.result, depth);
                self.scope.truncate(outer);
                result
            }
        }
    }

    /// Walks a comprehension's range and returns the taint of its items:
    /// a list literal's items are known one by one; any other range that
    /// carries `sub` may yield it anywhere.
    fn items(&mut self, range: &IdedExpr, depth: usize) -> Taint {
        match &range.expr {
            Expr::List(l) if !l.elements.is_empty() => {
                self.nodes += 1;
                let items: Vec<Taint> = l.elements.iter().map(|el| self.walk(el, depth)).collect();
                items
                    .into_iter()
                    .reduce(Taint::join)
                    .unwrap_or(Taint::Clean)
            }
            _ => Taint::any([self.walk(range, depth)]),
        }
    }

    fn call(&mut self, c: &cel::common::ast::CallExpr, depth: usize) -> Taint {
        // `claims["sub"]` is `claims.sub`; any other computed key may be
        // "sub".
        if c.func_name == operators::INDEX
            && c.target.is_none()
            && c.args.len() == 2
            && self.is_claims(&c.args[0])
        {
            self.nodes += 1;
            self.walk(&c.args[1], depth);
            return match literal(&c.args[1]) {
                Some(k) if k == "sub" => Taint::Leading,
                Some(_) => Taint::Clean,
                None => Taint::Anywhere,
            };
        }
        // `[a, b][i]`: one of the items.
        if c.func_name == operators::INDEX
            && c.target.is_none()
            && c.args.len() == 2
            && matches!(c.args[0].expr, Expr::List(_))
        {
            let items = self.items(&c.args[0], depth);
            self.walk(&c.args[1], depth);
            return items;
        }
        // Receiver form `x.f(a)` or global form `f(x, a)`.
        let (subject, rest): (Option<&IdedExpr>, &[IdedExpr]) = match &c.target {
            Some(t) => (Some(t), &c.args[..]),
            None => (c.args.first(), c.args.get(1..).unwrap_or_default()),
        };
        let target = c.target.as_ref().map(|t| self.walk(t, depth));
        let args: Vec<Taint> = c.args.iter().map(|a| self.walk(a, depth)).collect();
        let (subject_taint, rest_taint) = match target {
            Some(t) => (t, &args[..]),
            None => (
                args.first().copied().unwrap_or(Taint::Clean),
                args.get(1..).unwrap_or_default(),
            ),
        };
        if c.func_name == "matches" {
            match rest.first().and_then(literal) {
                Some(p) if rest.len() == 1 => {
                    self.patterns.insert(p);
                }
                _ => {
                    self.error.get_or_insert_with(|| {
                        "matches() takes one string literal pattern (compiled at load)".into()
                    });
                }
            }
        }
        if matches!(
            c.func_name.as_str(),
            "matches" | "startsWith" | "endsWith" | "contains"
        ) {
            let how = match subject_taint {
                Taint::Leading => Some(SubSubject::Leading),
                Taint::Anywhere => Some(SubSubject::Computed),
                // A literal receiver bounds `sub` as its argument to that
                // literal's substrings.
                Taint::Clean
                    if rest_taint.iter().any(|t| *t != Taint::Clean)
                        && subject.is_none_or(|s| literal(s).is_none()) =>
                {
                    Some(SubSubject::Argument)
                }
                Taint::Clean => None,
            };
            if let Some(subject) = how {
                self.sub_calls.push(SubCall {
                    method: c.func_name.clone(),
                    literal: rest.first().and_then(literal),
                    subject,
                });
            }
        }
        let all = target.into_iter().chain(args.iter().copied());
        match c.func_name.as_str() {
            f if TESTS.contains(&f) => Taint::Clean,
            // The branches, whichever is taken.
            operators::CONDITIONAL => args
                .get(1..)
                .unwrap_or_default()
                .iter()
                .copied()
                .reduce(Taint::join)
                .unwrap_or(Taint::Clean),
            // A concatenation starts with its first operand.
            operators::ADD if c.target.is_none() && args.first() == Some(&Taint::Leading) => {
                Taint::Leading
            }
            // Conversions return their operand as it was.
            "string" | "dyn" if c.target.is_none() && args.len() == 1 => args[0],
            _ => Taint::any(all),
        }
    }

    fn entry(&mut self, e: &EntryExpr, depth: usize) -> Taint {
        match e {
            EntryExpr::StructField(f) => self.walk(&f.value, depth),
            EntryExpr::MapEntry(m) => {
                let k = self.walk(&m.key, depth);
                let v = self.walk(&m.value, depth);
                Taint::any([k, v])
            }
        }
    }
}

/// Most entries in `factors` (one per kind of evidence).
const MAX_FACTORS: u64 = 8;

/// An upper bound on an expression's evaluation work, over the largest
/// claims accepted.
#[derive(Default)]
struct Cost {
    /// Comprehension variables in scope, innermost last: name, size bound,
    /// and whether its items' sizes add up to at most that bound.
    scope: Vec<(String, u64, bool)>,
    /// Where the innermost comprehension's variables start in `scope`.
    innermost: usize,
}

/// What [`Cost`] knows of a subexpression.
#[derive(Debug, Clone, Copy, Default)]
struct Estimate {
    /// Bounds the length of any list or map the value holds (itself or
    /// nested).
    size: u64,
    /// Bounds the nodes evaluated plus the items `in`, `==` and `+` go
    /// through.
    steps: u64,
    /// `size` also bounds the sizes of the value's items added up (true
    /// of the claims, which hold [`MAX_CLAIM_VALUES`] in all, and of what
    /// is read out of them).
    shared: bool,
    /// The value is (read out of) the innermost loop's current item, and
    /// that loop runs over a value whose items share its size: work linear
    /// in the item adds up, over the loop, to that size — as one more
    /// step per iteration does — so it is not charged again.
    item: bool,
}

impl Cost {
    fn walk(&mut self, e: &IdedExpr) -> Estimate {
        let leaf = |size, shared, item| Estimate {
            size,
            steps: 1,
            shared,
            item,
        };
        match &e.expr {
            Expr::Ident(n) => match self.scope.iter().rposition(|(v, _, _)| v == n) {
                Some(i) => {
                    let (_, size, shared) = self.scope[i];
                    leaf(size, shared, shared && i >= self.innermost)
                }
                None if n == "claims" => leaf(MAX_CLAIM_VALUES as u64, true, false),
                None if n == "factors" => leaf(MAX_FACTORS, true, false),
                None => leaf(0, true, false),
            },
            Expr::Literal(_) | Expr::Unspecified => leaf(0, true, false),
            Expr::Select(s) => {
                let operand = self.walk(&s.operand);
                Estimate {
                    steps: operand.steps.saturating_add(1),
                    ..operand
                }
            }
            Expr::Call(c) => {
                let mut parts: Vec<Estimate> = Vec::with_capacity(c.args.len() + 1);
                for operand in c.target.iter().map(|t| &**t).chain(&c.args) {
                    parts.push(self.walk(operand));
                }
                // The items a call goes through beside evaluating its
                // operands: a membership test scans its list, an equality
                // stops at the shorter side, a concatenation of two
                // collections copies both.
                let linear = |e: &Estimate| if e.item { 0 } else { e.size };
                let scanned = match (c.func_name.as_str(), &parts[..]) {
                    (operators::IN, [.., list]) => linear(list),
                    (operators::EQUALS | operators::NOT_EQUALS, [a, b]) => linear(a).min(linear(b)),
                    (operators::ADD, [a, b]) if a.size > 0 && b.size > 0 => {
                        linear(a).saturating_add(linear(b))
                    }
                    _ => 0,
                };
                let steps = parts.iter().fold(1u64.saturating_add(scanned), |n, p| {
                    n.saturating_add(p.steps)
                });
                let sizes = parts.iter().map(|p| p.size);
                let size = match c.func_name.as_str() {
                    operators::ADD => sizes.fold(0u64, u64::saturating_add),
                    operators::CONDITIONAL => sizes.skip(1).max().unwrap_or(0),
                    f if TESTS.contains(&f) => 0,
                    _ => sizes.max().unwrap_or(0),
                };
                let first = parts.first().copied().unwrap_or_default();
                match c.func_name.as_str() {
                    // Read out of its operand (or returned as it is).
                    operators::INDEX | "dyn" => Estimate {
                        size,
                        steps,
                        ..first
                    },
                    operators::ADD => Estimate {
                        size,
                        steps,
                        shared: parts.iter().all(|p| p.shared),
                        item: false,
                    },
                    _ => Estimate {
                        size,
                        steps,
                        shared: size == 0,
                        item: false,
                    },
                }
            }
            Expr::List(l) => {
                let parts: Vec<Estimate> = l.elements.iter().map(|el| self.walk(el)).collect();
                collection(l.elements.len(), &parts)
            }
            Expr::Map(m) => {
                let parts = self.entries(&m.entries);
                collection(m.entries.len(), &parts)
            }
            Expr::Struct(s) => {
                let parts = self.entries(&s.entries);
                collection(s.entries.len(), &parts)
            }
            Expr::Comprehension(c) => {
                let range = self.walk(&c.iter_range);
                let init = self.walk(&c.accu_init);
                let items = range.size;
                let (outer, innermost) = (self.scope.len(), self.innermost);
                self.innermost = outer;
                self.scope.push((c.iter_var.clone(), items, range.shared));
                if let Some(v2) = &c.iter_var2 {
                    self.scope.push((v2.clone(), items, range.shared));
                }
                // Inside the loop the accumulator costs nothing to extend:
                // the evaluator appends `map` and `filter` results in place.
                self.scope.push((c.accu_var.clone(), 0, false));
                let cond = self.walk(&c.loop_cond);
                let step = self.walk(&c.loop_step);
                // Every macro's accumulator grows by at most one item per
                // iteration (of at most the size a step adds).
                if let Some(last) = self.scope.last_mut() {
                    last.1 = init.size.saturating_add(items).max(step.size);
                }
                let result = self.walk(&c.result);
                self.scope.truncate(outer);
                self.innermost = innermost;
                let per_item = cond.steps.saturating_add(step.steps);
                Estimate {
                    size: result.size,
                    steps: range
                        .steps
                        .saturating_add(init.steps)
                        .saturating_add(items.saturating_mul(per_item))
                        .saturating_add(result.steps)
                        .saturating_add(1),
                    shared: result.size == 0,
                    item: false,
                }
            }
        }
    }

    fn entries(&mut self, entries: &[cel::common::ast::IdedEntryExpr]) -> Vec<Estimate> {
        let mut parts = Vec::new();
        for entry in entries {
            match &entry.expr {
                EntryExpr::StructField(f) => parts.push(self.walk(&f.value)),
                EntryExpr::MapEntry(m) => {
                    parts.push(self.walk(&m.key));
                    parts.push(self.walk(&m.value));
                }
            }
        }
        parts
    }
}

/// A list or map literal of `len` entries made of `parts`: its size is
/// theirs added up, so its items share it.
fn collection(len: usize, parts: &[Estimate]) -> Estimate {
    Estimate {
        size: parts
            .iter()
            .fold(len as u64, |n, p| n.saturating_add(p.size)),
        steps: parts.iter().fold(1u64, |n, p| n.saturating_add(p.steps)),
        shared: true,
        item: false,
    }
}

/// Whether a subexpression's value can reach the result.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Its value may become (part of) the result.
    Value,
    /// Only a boolean derived from it can: a comparison, a test.
    Test,
}

/// Functions whose result is a boolean (or a number) computed from their
/// arguments: a claim inside them cannot reach a string result.
const TESTS: &[&str] = &[
    operators::EQUALS,
    operators::NOT_EQUALS,
    operators::LESS,
    operators::LESS_EQUALS,
    operators::GREATER,
    operators::GREATER_EQUALS,
    operators::LOGICAL_AND,
    operators::LOGICAL_OR,
    operators::LOGICAL_NOT,
    operators::IN,
    operators::NOT_STRICTLY_FALSE,
    operators::HAS,
    "matches",
    "startsWith",
    "endsWith",
    "contains",
    "size",
];

/// Refuses a raw claim that can flow into a SPIFFE ID expression's result
/// without passing through `segment()`.
fn raw_claims(e: &IdedExpr, flow: Flow) -> Result<(), String> {
    let refuse = || {
        Err("spiffe_id.expression: pass every claim that reaches the ID through segment(), e.g. \"spiffe://td/ci/\" + segment(claims.repository_owner)".to_string())
    };
    match &e.expr {
        Expr::Ident(n) if n == "claims" && flow == Flow::Value => refuse(),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => Ok(()),
        Expr::Select(s) => raw_claims(&s.operand, flow),
        Expr::Call(c) if c.func_name == "segment" => Ok(()),
        Expr::Call(c) if TESTS.contains(&c.func_name.as_str()) => {
            if let Some(t) = &c.target {
                raw_claims(t, Flow::Test)?;
            }
            c.args.iter().try_for_each(|a| raw_claims(a, Flow::Test))
        }
        Expr::Call(c) if c.func_name == operators::CONDITIONAL => {
            let mut args = c.args.iter();
            if let Some(cond) = args.next() {
                raw_claims(cond, Flow::Test)?;
            }
            args.try_for_each(|a| raw_claims(a, flow))
        }
        Expr::Call(c) => {
            if let Some(t) = &c.target {
                raw_claims(t, flow)?;
            }
            c.args.iter().try_for_each(|a| raw_claims(a, flow))
        }
        Expr::List(l) => l.elements.iter().try_for_each(|el| raw_claims(el, flow)),
        Expr::Map(m) => m.entries.iter().try_for_each(|en| match &en.expr {
            EntryExpr::MapEntry(me) => {
                raw_claims(&me.key, flow)?;
                raw_claims(&me.value, flow)
            }
            EntryExpr::StructField(f) => raw_claims(&f.value, flow),
        }),
        Expr::Struct(s) => s.entries.iter().try_for_each(|en| match &en.expr {
            EntryExpr::StructField(f) => raw_claims(&f.value, flow),
            EntryExpr::MapEntry(me) => raw_claims(&me.value, flow),
        }),
        // A comprehension's result may carry claim values (`map`): judge
        // every part as a value.
        Expr::Comprehension(c) => {
            raw_claims(&c.iter_range, flow)?;
            raw_claims(&c.accu_init, flow)?;
            raw_claims(&c.loop_step, flow)?;
            raw_claims(&c.result, flow)
        }
    }
}

/// Collects identifiers that are not bound by an enclosing comprehension.
fn free_variables(e: &IdedExpr, bound: &mut Vec<String>, out: &mut BTreeSet<String>) {
    match &e.expr {
        Expr::Ident(name) => {
            if !name.starts_with('@') && !bound.iter().any(|b| b == name) {
                out.insert(name.clone());
            }
        }
        Expr::Select(s) => free_variables(&s.operand, bound, out),
        Expr::Call(c) => {
            if let Some(t) = &c.target {
                free_variables(t, bound, out);
            }
            for a in &c.args {
                free_variables(a, bound, out);
            }
        }
        Expr::List(l) => {
            for el in &l.elements {
                free_variables(el, bound, out);
            }
        }
        Expr::Map(m) => {
            for entry in &m.entries {
                entry_vars(&entry.expr, bound, out);
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                entry_vars(&entry.expr, bound, out);
            }
        }
        Expr::Comprehension(c) => {
            free_variables(&c.iter_range, bound, out);
            free_variables(&c.accu_init, bound, out);
            let depth = bound.len();
            bound.push(c.iter_var.clone());
            if let Some(v2) = &c.iter_var2 {
                bound.push(v2.clone());
            }
            bound.push(c.accu_var.clone());
            free_variables(&c.loop_cond, bound, out);
            free_variables(&c.loop_step, bound, out);
            free_variables(&c.result, bound, out);
            bound.truncate(depth);
        }
        Expr::Literal(_) | Expr::Unspecified => {}
    }
}

fn entry_vars(e: &EntryExpr, bound: &mut Vec<String>, out: &mut BTreeSet<String>) {
    match e {
        EntryExpr::StructField(f) => free_variables(&f.value, bound, out),
        EntryExpr::MapEntry(m) => {
            free_variables(&m.key, bound, out);
            free_variables(&m.value, bound, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nesting_is_bounded_before_the_parser_runs() {
        for (src, depth) in [
            ("claims.a == 1", 0),
            ("size([(1)])", 3),
            (r#"claims.x == "((((((((((((" && (true)"#, 1),
            (r#"claims.x == '\'(((' && (true)"#, 1),
            (r#"claims.x == r"\" && ((true))"#, 2),
            (r#"claims.x == R'\' && [[1]] == [[1]]"#, 2),
            (r#"claims.x == xr"\"(((" && (1)"#, 1),
            (r#"claims.x == """a"(((""" && [1]"#, 1),
            ("{1: {2: [3]}}", 3),
        ] {
            assert_eq!(nesting(src).0, depth, "{src}");
        }
        // One level past the limit is refused with a reason, in every
        // bracket kind; at the limit it compiles.
        for (open, close) in [("(", ")"), ("[", "]"), ("size(", ")")] {
            let at = format!(
                "{}1{} == 1",
                open.repeat(MAX_NESTING),
                close.repeat(MAX_NESTING)
            );
            Compiled::compile(&at, Role::Condition)
                .map(|_| ())
                .unwrap_or_else(|e| {
                    assert!(!e.contains("nests"), "{at}: {e}");
                });
            let past = format!("{open}{at}{close}");
            let e = Compiled::compile(&past, Role::Condition).unwrap_err();
            assert!(e.contains("nests brackets"), "{past}: {e}");
        }
    }

    fn claims() -> cel::Value {
        claims_value(
            json!({"ref": "refs/heads/main", "ref_name": "release/admin", "owner": "acme", "id": 42, "groups": ["a", "b"], "kubernetes.io": {"namespace": "prod"}, "ref_protected": true, "sub": "repo:acme/app:ref:refs/heads/main"})
                .as_object()
                .unwrap(),
        )
        .unwrap()
    }

    fn cond(s: &str) -> Compiled {
        Compiled::compile(s, Role::Condition).unwrap()
    }

    #[test]
    fn compiles_checks_variables_and_evaluates() {
        let c = cond(r#"claims.ref == "refs/heads/main" && claims.ref_protected"#);
        assert!(c.eval_bool(&claims(), &[]).unwrap());
        let c = cond(r#"claims.groups.exists(g, g == "b") && "join_token" in factors"#);
        assert!(c.eval_bool(&claims(), &["join_token"]).unwrap());
        assert!(!c.eval_bool(&claims(), &[]).unwrap());
        let c = cond(r#"claims["kubernetes.io"].namespace == "prod""#);
        assert!(c.eval_bool(&claims(), &[]).unwrap());
        // A missing claim is an error, never a silent true.
        let c = cond(r#"claims.environment == "production""#);
        assert!(c.eval_bool(&claims(), &[]).is_err());
        // Non-bool results are errors.
        let c = cond("claims.ref");
        assert!(c.eval_bool(&claims(), &[]).is_err());
        assert_eq!(c.eval_string(&claims(), &[]).unwrap(), "refs/heads/main");
    }

    #[test]
    fn refuses_unknown_variables_and_bad_syntax() {
        let e = Compiled::compile("request.auth == 1", Role::Condition).unwrap_err();
        assert!(e.contains("request"), "{e}");
        let e = Compiled::compile("claims.a == foo", Role::Condition).unwrap_err();
        assert!(e.contains("foo"), "{e}");
        assert!(Compiled::compile("claims.a ==", Role::Condition).is_err());
        assert!(Compiled::compile(&"1 + ".repeat(2000), Role::Condition).is_err());
        // Comprehension variables are bound, not free.
        cond("claims.groups.all(x, x.size() > 0)");
    }

    #[test]
    fn regexes_are_literal_compiled_at_load_and_both_forms_work() {
        let c = cond(r#"claims.sub.matches("^repo:acme/") && matches(claims.ref, "^refs/heads/")"#);
        assert!(c.eval_bool(&claims(), &[]).unwrap());
        assert_eq!(c.regexes.len(), 2);
        let e =
            Compiled::compile(r#"claims.sub.matches(claims.ref)"#, Role::Condition).unwrap_err();
        assert!(e.contains("string literal"), "{e}");
        let e =
            Compiled::compile(r#"claims.sub.matches("(unclosed")"#, Role::Condition).unwrap_err();
        assert!(e.contains("not a valid regex"), "{e}");
        // Both call forms and the index form are seen as calls on sub.
        let c = cond(
            r#"claims["sub"].startsWith("repo:acme/") || matches(claims.sub, "^repo:x/") || claims.sub.endsWith("y")"#,
        );
        let methods: Vec<&str> = c.sub_calls().iter().map(|s| s.method.as_str()).collect();
        assert_eq!(methods, ["startsWith", "matches", "endsWith"]);
    }

    #[test]
    fn cost_is_bounded() {
        let e = Compiled::compile(
            "claims.groups.all(a, claims.groups.all(b, claims.groups.all(c, a == b)))",
            Role::Condition,
        )
        .unwrap_err();
        assert!(e.contains("nest"), "{e}");
        let mut big = serde_json::Map::new();
        big.insert("xs".into(), json!(vec![1; MAX_CLAIM_VALUES + 1]));
        assert!(claims_value(&big).is_err());
    }

    /// The parser and the load-time walks recurse once per level of the
    /// syntax tree: the deepest trees the size limit lets through (4 KiB
    /// chains of one operator, of selections, of negations) are refused
    /// or checked within a Tokio worker's 2 MiB stack, without overflowing
    /// it.
    #[test]
    fn the_deepest_expressions_are_checked_within_a_worker_stack() {
        let handle = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                let n = MAX_EXPRESSION_BYTES - 32;
                let chain = |op: &str, term: &str| {
                    let terms = n / (op.len() + term.len());
                    format!("{}{term}", format!("{term}{op}").repeat(terms))
                };
                for (src, role) in [
                    (format!("{} > 0", chain("+", "1")), Role::Condition),
                    (chain("||", "true"), Role::Condition),
                    (chain("==", "1"), Role::Condition),
                    (
                        format!("claims{} == 1", ".a".repeat(n / 2)),
                        Role::Condition,
                    ),
                    (format!("{}true", "!".repeat(n)), Role::Condition),
                    (format!("{}1 > 0", "-".repeat(n)), Role::Condition),
                    (
                        format!("\"spiffe://td/\" + {}", chain("+", "\"a\"")),
                        Role::SpiffeId,
                    ),
                ] {
                    let e = Compiled::compile(&src, role).unwrap_err();
                    assert!(e.contains("nodes"), "{}…: {e}", &src[..20]);
                }
                // Just under the limits, a long chain compiles.
                let long = chain("+", "1");
                let at = format!("{} > 0", &long[..2 * (MAX_NODES / 2 - 2) + 1]);
                Compiled::compile(&at, Role::Condition).unwrap();
            })
            .unwrap();
        handle.join().unwrap();
    }

    /// Evaluation work is bounded at load: nested loops over claim lists
    /// (the worst case, ~16.7 million steps at 4,096 claim values) are
    /// refused; the costliest expression accepted, run over the largest
    /// claims accepted, is timed.
    #[test]
    fn evaluation_cost_is_bounded_at_load() {
        for bad in [
            "claims.xs.all(a, claims.xs.all(b, a == b))",
            "claims.xs.exists(a, claims.ys.exists(b, a == b))",
            "claims.xs.exists(a, a in claims.ys)",
            "claims.xs.map(a, claims.ys).exists(l, l.exists(x, x == 1))",
            "claims.exists(k, claims[k].exists(v, v == 1))",
            "claims.xs.all(a, claims.ys == claims.zs)",
        ] {
            let e = Compiled::compile(bad, Role::Condition).unwrap_err();
            assert!(e.contains("evaluation steps"), "{bad}: {e}");
        }
        for fine in [
            r#"claims.groups.exists(g, g == "admin")"#,
            "claims.xs.exists(a, [1, 2, 3].exists(b, a == b))",
            "claims.xs.exists(x, x in [1, 2])",
            r#"claims.groups.exists(g, g == claims.team + "-admins")"#,
            "claims.xs.map(x, x + 1).filter(y, y > 2).size() > 0",
            r#"claims.xs.all(a, a in ["x", "y"]) && claims.ys.all(b, b == "z")"#,
        ] {
            Compiled::compile(fine, Role::Condition).unwrap_or_else(|e| panic!("{fine}: {e}"));
        }

        // The costliest accepted expression of one shape: a loop over a
        // claim list whose body is as long as the bound allows.
        let body = |terms: usize| vec!["x >= 0"; terms].join(" && ");
        let mut terms = 1;
        while Compiled::compile(
            &format!("claims.xs.all(x, {})", body(terms + 1)),
            Role::Condition,
        )
        .is_ok()
        {
            terms += 1;
        }
        let worst = cond(&format!("claims.xs.all(x, {})", body(terms)));
        let mut big = serde_json::Map::new();
        big.insert("xs".into(), json!(vec![0; MAX_CLAIM_VALUES - 1]));
        let claims = claims_value(&big).unwrap();
        let started = std::time::Instant::now();
        assert!(worst.eval_bool(&claims, &[]).unwrap());
        let accepted = started.elapsed();

        // What the refused worst case would cost, measured on an eighth
        // of the claims (an 64th of its work) and scaled up.
        let nested = Compiled {
            program: Program::compile("claims.xs.all(a, claims.xs.all(b, a == b))").unwrap(),
            source: String::new(),
            regexes: Arc::default(),
            sub_calls: Vec::new(),
        };
        let mut eighth = serde_json::Map::new();
        eighth.insert("xs".into(), json!(vec![0; MAX_CLAIM_VALUES / 8]));
        let started = std::time::Instant::now();
        assert!(
            nested
                .eval_bool(&claims_value(&eighth).unwrap(), &[])
                .unwrap()
        );
        let refused = started.elapsed() * 64;
        println!(
            "CEL cost: costliest accepted (one loop, {terms} tests per item, {} claim values) took {accepted:?}; the refused nested loop over {MAX_CLAIM_VALUES} values would take about {refused:?}",
            MAX_CLAIM_VALUES - 1
        );
        assert!(
            accepted * 4 < refused,
            "the bound should keep the accepted cost well below the refused one"
        );
    }

    #[test]
    fn a_spiffe_id_expression_takes_claims_only_through_segment() {
        let id = |s: &str| Compiled::compile(s, Role::SpiffeId);
        // A raw claim in the result is refused at load, in every spelling.
        for bad in [
            r#""spiffe://td/ci/" + claims.ref_name"#,
            r#""spiffe://td/ci/" + claims["ref_name"]"#,
            r#""spiffe://td/" + string(claims.id)"#,
            r#"claims.owner == "acme" ? "spiffe://td/a/" + claims.ref_name : "spiffe://td/b""#,
            r#""spiffe://td/" + claims.groups.map(g, g)[0]"#,
        ] {
            assert!(id(bad).is_err(), "{bad}");
        }
        // Through segment(): a claim with a slash fails at evaluation.
        let c = id(r#""spiffe://td/ci/" + segment(claims.ref_name)"#).unwrap();
        assert!(c.eval_string(&claims(), &[]).is_err());
        let c =
            id(r#""spiffe://td/ci/" + segment(claims.owner) + "/" + segment(claims.id)"#).unwrap();
        assert_eq!(
            c.eval_string(&claims(), &[]).unwrap(),
            "spiffe://td/ci/acme/42"
        );
        // Claims in tests (conditions inside the expression) are fine.
        let c = id(r#"claims.owner == "acme" ? "spiffe://td/a" : "spiffe://td/b""#).unwrap();
        assert_eq!(c.eval_string(&claims(), &[]).unwrap(), "spiffe://td/a");
        for bad in ["", ".", "..", "a/b", "a%2fb", "é"] {
            assert!(!is_segment(bad), "{bad:?}");
        }
    }
}
