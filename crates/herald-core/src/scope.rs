//! Scope of cloud-style session credentials: an IAM-shaped policy document.
//!
//! A grant's role carries a scope (which actions on which resources) and a
//! caller may ask for a narrower session policy, as AWS STS allows. Herald
//! binds the effective scope inside the session token; a downstream service
//! asks [`ScopePolicy::allows`] whether a request is inside it.
//!
//! Only `Allow` statements with `Action` and `Resource` lists are accepted:
//! anything Herald would not enforce (`Deny`, `NotAction`, `Condition`,
//! `Principal`) is refused as malformed rather than silently ignored, so a
//! document never means less than its author thought.
//!
//! Patterns use IAM wildcards: `*` matches any run of characters, `?` one
//! character. Actions compare case-insensitively (as IAM does), resources
//! exactly.

use serde_json::{Map, Value};

/// Largest accepted policy document, in bytes of JSON (AWS caps session
/// policies at 2,048 packed characters; role scopes may be larger).
pub const MAX_POLICY_BYTES: usize = 10 * 1024;

/// Why a policy document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// The document is not JSON or not an object.
    #[error("policy document is not a JSON object: {0}")]
    NotJson(String),
    /// The document exceeds [`MAX_POLICY_BYTES`].
    #[error("policy document exceeds {MAX_POLICY_BYTES} bytes")]
    TooLarge,
    /// A statement uses something Herald does not enforce, or lacks a field.
    #[error("statement {index}: {reason}")]
    Statement {
        /// Zero-based statement index.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The document has no statements.
    #[error("policy document has no statements")]
    Empty,
}

/// One `Allow` statement: every action pattern on every resource pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// Action patterns, e.g. `s3:GetObject`, `s3:*`.
    pub actions: Vec<String>,
    /// Resource patterns, e.g. `arn:aws:s3:::bucket/*`.
    pub resources: Vec<String>,
}

/// A parsed, validated scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopePolicy {
    statements: Vec<Statement>,
}

impl ScopePolicy {
    /// A scope from statements. Empty action or resource lists allow nothing.
    pub fn new(statements: Vec<Statement>) -> Self {
        Self { statements }
    }

    /// Parses a JSON policy document from text (the STS `Policy` parameter).
    pub fn from_json_str(text: &str) -> Result<Self, ScopeError> {
        if text.len() > MAX_POLICY_BYTES {
            return Err(ScopeError::TooLarge);
        }
        let value: Value =
            serde_json::from_str(text).map_err(|e| ScopeError::NotJson(e.to_string()))?;
        Self::from_json(&value)
    }

    /// Parses a policy document already decoded as JSON (or YAML turned JSON).
    pub fn from_json(value: &Value) -> Result<Self, ScopeError> {
        let obj = value
            .as_object()
            .ok_or_else(|| ScopeError::NotJson("expected an object".into()))?;
        for key in obj.keys() {
            if key != "Version" && key != "Statement" && key != "Id" {
                return Err(ScopeError::NotJson(format!("unsupported key `{key}`")));
            }
        }
        let statements = match obj.get("Statement") {
            Some(Value::Array(items)) => items.iter().collect::<Vec<_>>(),
            Some(item @ Value::Object(_)) => vec![item],
            _ => return Err(ScopeError::Empty),
        };
        if statements.is_empty() {
            return Err(ScopeError::Empty);
        }
        let statements = statements
            .into_iter()
            .enumerate()
            .map(|(index, s)| parse_statement(index, s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { statements })
    }

    /// The statements.
    pub fn statements(&self) -> &[Statement] {
        &self.statements
    }

    /// The document as compact JSON, stable for sealing into tokens.
    pub fn to_json(&self) -> Value {
        let statements = self
            .statements
            .iter()
            .map(|s| {
                let mut m = Map::new();
                m.insert("Effect".into(), Value::String("Allow".into()));
                m.insert(
                    "Action".into(),
                    Value::Array(s.actions.iter().cloned().map(Value::String).collect()),
                );
                m.insert(
                    "Resource".into(),
                    Value::Array(s.resources.iter().cloned().map(Value::String).collect()),
                );
                Value::Object(m)
            })
            .collect();
        let mut doc = Map::new();
        doc.insert("Version".into(), Value::String("2012-10-17".into()));
        doc.insert("Statement".into(), Value::Array(statements));
        Value::Object(doc)
    }

    /// Whether `action` on `resource` is inside this scope.
    pub fn allows(&self, action: &str, resource: &str) -> bool {
        self.statements.iter().any(|s| {
            s.actions.iter().any(|p| glob_match(p, action, true))
                && s.resources.iter().any(|p| glob_match(p, resource, false))
        })
    }

    /// Whether everything this scope allows is also allowed by `outer`.
    ///
    /// Checked statement by statement: each (action pattern, resource
    /// pattern) pair must be covered by one statement of `outer`. This is
    /// sound (never says "within" wrongly) and may refuse a document whose
    /// coverage is split across several outer statements; such a caller can
    /// split its own statement the same way.
    pub fn is_within(&self, outer: &ScopePolicy) -> bool {
        self.statements.iter().all(|s| {
            s.actions.iter().all(|a| {
                s.resources.iter().all(|r| {
                    outer.statements.iter().any(|o| {
                        o.actions.iter().any(|oa| glob_covers(oa, a, true))
                            && o.resources.iter().any(|or| glob_covers(or, r, false))
                    })
                })
            })
        })
    }
}

fn parse_statement(index: usize, value: &Value) -> Result<Statement, ScopeError> {
    let bad = |reason: &str| ScopeError::Statement {
        index,
        reason: reason.to_string(),
    };
    let obj = value.as_object().ok_or_else(|| bad("not an object"))?;
    for key in obj.keys() {
        match key.as_str() {
            "Effect" | "Action" | "Resource" | "Sid" => {}
            other => return Err(bad(&format!("`{other}` is not supported"))),
        }
    }
    match obj.get("Effect").and_then(Value::as_str) {
        Some("Allow") => {}
        Some(_) => return Err(bad("only `Allow` statements are supported")),
        None => return Err(bad("`Effect` is required")),
    }
    let list = |key: &str| -> Result<Vec<String>, ScopeError> {
        let items = match obj.get(key) {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(&format!("`{key}` entries must be strings")))
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(bad(&format!("`{key}` is required"))),
        };
        if items.is_empty() || items.iter().any(|i| i.is_empty()) {
            return Err(bad(&format!("`{key}` must not be empty")));
        }
        Ok(items)
    };
    Ok(Statement {
        actions: list("Action")?,
        resources: list("Resource")?,
    })
}

fn eq_char(a: char, b: char, fold: bool) -> bool {
    if fold {
        a.eq_ignore_ascii_case(&b)
    } else {
        a == b
    }
}

/// IAM glob match: `*` any run, `?` one character.
pub fn glob_match(pattern: &str, text: &str, fold_case: bool) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Greedy two-pointer match with backtracking to the last star: linear in
    // practice, never exponential.
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && eq_char(p[pi], t[ti], fold_case))) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Whether every string `inner` matches is also matched by `outer`.
///
/// `inner` is read as a word over characters and wildcards: a `*` in
/// `outer` may absorb anything, a `?` in `outer` one literal or `?`, and a
/// literal only the same literal. Sound for all inputs.
pub fn glob_covers(outer: &str, inner: &str, fold_case: bool) -> bool {
    let o: Vec<char> = outer.chars().collect();
    let i: Vec<char> = inner.chars().collect();
    // dp[a][b]: outer[a..] covers inner[b..].
    let mut dp = vec![vec![false; i.len() + 1]; o.len() + 1];
    dp[o.len()][i.len()] = true;
    for a in (0..o.len()).rev() {
        for b in (0..=i.len()).rev() {
            dp[a][b] = match o[a] {
                '*' => dp[a + 1][b] || (b < i.len() && dp[a][b + 1]),
                '?' => b < i.len() && i[b] != '*' && dp[a + 1][b + 1],
                c => {
                    b < i.len()
                        && i[b] != '*'
                        && i[b] != '?'
                        && eq_char(c, i[b], fold_case)
                        && dp[a + 1][b + 1]
                }
            };
        }
    }
    dp[0][0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(v: Value) -> ScopePolicy {
        ScopePolicy::from_json(&v).unwrap()
    }

    #[test]
    fn glob_match_follows_iam_wildcards() {
        assert!(glob_match("s3:*", "s3:GetObject", true));
        assert!(glob_match("S3:get*", "s3:GetObject", true));
        assert!(!glob_match("s3:Get*", "s3:PutObject", true));
        assert!(glob_match("arn:aws:s3:::b/*", "arn:aws:s3:::b/x/y", false));
        assert!(!glob_match("arn:aws:s3:::b/*", "arn:aws:s3:::B/x", false));
        assert!(glob_match("a?c", "abc", false));
        assert!(!glob_match("a?c", "ac", false));
        assert!(glob_match("*", "", false));
        assert!(glob_match("a*b*c", "axxbyyc", false));
        assert!(!glob_match("a*b*c", "axxbyy", false));
    }

    #[test]
    fn glob_covers_is_inclusion() {
        assert!(glob_covers("s3:*", "s3:Get*", true));
        assert!(glob_covers("s3:*", "s3:GetObject", true));
        assert!(!glob_covers("s3:Get*", "s3:*", true));
        assert!(!glob_covers("s3:GetObject", "s3:GetObject*", true));
        assert!(glob_covers("a?c", "abc", false));
        assert!(glob_covers("a?c", "a?c", false));
        assert!(!glob_covers("abc", "a?c", false));
        assert!(!glob_covers("a?c", "a*c", false));
        assert!(glob_covers("*", "anything*?", false));
        assert!(glob_covers("arn:*:b/*", "arn:aws:b/x/*", false));
    }

    #[test]
    fn parses_and_evaluates() {
        let p = policy(json!({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:GetObject",
                           "Resource": ["arn:aws:s3:::art/*"]}]
        }));
        assert!(p.allows("s3:getobject", "arn:aws:s3:::art/x"));
        assert!(!p.allows("s3:PutObject", "arn:aws:s3:::art/x"));
        assert!(!p.allows("s3:GetObject", "arn:aws:s3:::other/x"));
        let round = ScopePolicy::from_json(&p.to_json()).unwrap();
        assert_eq!(round, p);
    }

    #[test]
    fn refuses_what_it_would_not_enforce() {
        for doc in [
            json!({"Statement": [{"Effect": "Deny", "Action": "*", "Resource": "*"}]}),
            json!({"Statement": [{"Effect": "Allow", "NotAction": "s3:*", "Resource": "*"}]}),
            json!({"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*",
                                  "Condition": {}}]}),
            json!({"Statement": [{"Effect": "Allow", "Action": [], "Resource": "*"}]}),
            json!({"Statement": []}),
            json!({"Statement": [{"Action": "*", "Resource": "*"}]}),
            json!([1, 2]),
        ] {
            assert!(ScopePolicy::from_json(&doc).is_err(), "{doc}");
        }
        let big = format!("{{\"Statement\":\"{}\"}}", "x".repeat(MAX_POLICY_BYTES));
        assert_eq!(ScopePolicy::from_json_str(&big), Err(ScopeError::TooLarge));
    }

    #[test]
    fn session_policy_within_role() {
        let role = policy(json!({"Statement": [
            {"Effect": "Allow", "Action": ["s3:Get*", "s3:List*"], "Resource": "arn:aws:s3:::art/*"},
            {"Effect": "Allow", "Action": "ecr:*", "Resource": "*"}
        ]}));
        let narrower = policy(json!({"Statement": [
            {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::art/web/*"}
        ]}));
        let wider = policy(json!({"Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::art/*"}
        ]}));
        let other_resource = policy(json!({"Statement": [
            {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::secrets/*"}
        ]}));
        assert!(narrower.is_within(&role));
        assert!(role.is_within(&role));
        assert!(!wider.is_within(&role));
        assert!(!other_resource.is_within(&role));
    }
}
