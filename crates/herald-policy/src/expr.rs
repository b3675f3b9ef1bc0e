//! CEL expressions: compiled once at load, checked for the variables they
//! use, evaluated per request against `claims` and `factors`.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use cel::common::ast::{EntryExpr, Expr, IdedExpr};
use cel::{Context, Env, Program};
use serde_json::{Map, Value};

/// The variables an expression may reference.
pub const VARIABLES: &[&str] = &["claims", "factors"];

/// Largest expression accepted, bytes.
pub const MAX_EXPRESSION_BYTES: usize = 4 * 1024;

/// The standard CEL environment, built once: building it registers every
/// standard function, which would otherwise dominate an evaluation.
fn env() -> Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib())).clone()
}

/// Claims converted to a CEL value, once per request (shared by every
/// expression of every candidate policy).
pub fn claims_value(claims: &Map<String, Value>) -> Result<cel::Value, String> {
    cel::objects::TryIntoValue::try_into_value(claims).map_err(|e| format!("claims: {e}"))
}

/// A compiled expression.
pub struct Compiled {
    program: Program,
    source: String,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Compiled").field(&self.source).finish()
    }
}

impl Compiled {
    /// Compiles `source` and checks that it references only [`VARIABLES`].
    pub fn compile(source: &str) -> Result<Self, String> {
        if source.len() > MAX_EXPRESSION_BYTES {
            return Err(format!("expression exceeds {MAX_EXPRESSION_BYTES} bytes"));
        }
        let program = Program::compile(source).map_err(|e| format!("CEL: {e}"))?;
        let mut free = BTreeSet::new();
        free_variables(program.expression(), &mut Vec::new(), &mut free);
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
        Ok(Self {
            program,
            source: source.to_string(),
        })
    }

    fn run(&self, claims: &cel::Value, factors: &[&str]) -> Result<cel::Value, String> {
        let mut ctx = Context::with_env(env());
        ctx.add_variable_from_value("claims", claims.clone());
        ctx.add_variable("factors", factors)
            .map_err(|e| format!("factors: {e}"))?;
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

    fn claims() -> cel::Value {
        claims_value(
            json!({"ref": "refs/heads/main", "groups": ["a", "b"], "kubernetes.io": {"namespace": "prod"}, "ref_protected": true})
                .as_object()
                .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn compiles_checks_variables_and_evaluates() {
        let c = Compiled::compile(r#"claims.ref == "refs/heads/main" && claims.ref_protected"#)
            .unwrap();
        assert!(c.eval_bool(&claims(), &[]).unwrap());
        let c =
            Compiled::compile(r#"claims.groups.exists(g, g == "b") && "join_token" in factors"#)
                .unwrap();
        assert!(c.eval_bool(&claims(), &["join_token"]).unwrap());
        assert!(!c.eval_bool(&claims(), &[]).unwrap());
        let c = Compiled::compile(r#"claims["kubernetes.io"].namespace == "prod""#).unwrap();
        assert!(c.eval_bool(&claims(), &[]).unwrap());
        // A missing claim is an error, never a silent true.
        let c = Compiled::compile(r#"claims.environment == "production""#).unwrap();
        assert!(c.eval_bool(&claims(), &[]).is_err());
        // Non-bool results are errors.
        let c = Compiled::compile("claims.ref").unwrap();
        assert!(c.eval_bool(&claims(), &[]).is_err());
        assert_eq!(c.eval_string(&claims(), &[]).unwrap(), "refs/heads/main");
    }

    #[test]
    fn refuses_unknown_variables_and_bad_syntax() {
        let e = Compiled::compile("request.auth == 1").unwrap_err();
        assert!(e.contains("request"), "{e}");
        let e = Compiled::compile("claims.a == foo").unwrap_err();
        assert!(e.contains("foo"), "{e}");
        assert!(Compiled::compile("claims.a ==").is_err());
        assert!(Compiled::compile(&"1 + ".repeat(2000)).is_err());
        // Comprehension variables are bound, not free.
        Compiled::compile("claims.groups.all(x, x.size() > 0)").unwrap();
    }
}
