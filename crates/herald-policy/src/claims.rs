//! Claim paths, pin comparison and SPIFFE ID templates.

use herald_core::spiffe_id::is_segment;
use serde_json::{Map, Value};

/// Resolves a dotted claim path. Keys may themselves contain dots
/// (`kubernetes.io`), so every split is tried, longest key first.
pub fn resolve<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    let dots: Vec<usize> = path.match_indices('.').map(|(i, _)| i).collect();
    for &i in dots.iter().rev() {
        if let Some(Value::Object(inner)) = claims.get(&path[..i])
            && let Some(v) = resolve(inner, &path[i + 1..])
        {
            return Some(v);
        }
    }
    None
}

/// The canonical text of a scalar claim: strings as they are, integers in
/// decimal, booleans as `true`/`false`. `None` for anything else.
pub fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// Pin equality after normalisation: `"123"` equals `123`, `"true"` equals
/// `true` (platforms disagree on types); an array claim matches when one
/// element does.
pub fn pin_matches(actual: &Value, expected: &Value) -> bool {
    if let Value::Array(items) = actual {
        return items.iter().any(|i| pin_matches(i, expected));
    }
    match (scalar_text(actual), scalar_text(expected)) {
        (Some(a), Some(e)) => a == e,
        _ => false,
    }
}

/// A parsed `{claim.path}` template.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Literal(String),
    Claim(String),
}

impl Template {
    /// Parses `spiffe://td/ci/{repository_owner}/{environment}`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if rest[..open].contains('}') {
                return Err("unbalanced `}`".into());
            }
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or("unclosed `{`")?;
            let path = &after[..close];
            if path.is_empty()
                || !path
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
                || path.starts_with('.')
                || path.ends_with('.')
            {
                return Err(format!("`{{{path}}}` is not a claim path"));
            }
            parts.push(Part::Claim(path.to_string()));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err("unbalanced `}`".into());
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Self { parts })
    }

    /// The claim paths the template uses.
    pub fn claims(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Claim(c) => Some(c.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Renders the template. Every substituted value must be a non-empty
    /// scalar made only of `[A-Za-z0-9._-]` and not `.` or `..`, so a claim
    /// can never add a segment, a dot segment, a percent-escape or another
    /// trust domain.
    pub fn render(&self, claims: &Map<String, Value>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::Claim(path) => {
                    let v = resolve(claims, path)
                        .ok_or_else(|| format!("claim `{path}` is missing"))?;
                    let text =
                        scalar_text(v).ok_or_else(|| format!("claim `{path}` is not a scalar"))?;
                    if !is_segment(&text) {
                        return Err(format!(
                            "claim `{path}` is not usable in a SPIFFE ID (empty, a dot segment, or a character outside [A-Za-z0-9._-])"
                        ));
                    }
                    out.push_str(&text);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn resolves_keys_with_dots() {
        let c = m(
            json!({"kubernetes.io": {"namespace": "prod", "serviceaccount": {"name": "api"}}, "a": {"b": 1}}),
        );
        assert_eq!(resolve(&c, "kubernetes.io.namespace"), Some(&json!("prod")));
        assert_eq!(
            resolve(&c, "kubernetes.io.serviceaccount.name"),
            Some(&json!("api"))
        );
        assert_eq!(resolve(&c, "a.b"), Some(&json!(1)));
        assert_eq!(resolve(&c, "a.c"), None);
    }

    #[test]
    fn pins_normalise_types() {
        assert!(pin_matches(&json!("123"), &json!(123)));
        assert!(pin_matches(&json!(123), &json!("123")));
        assert!(pin_matches(&json!(true), &json!("true")));
        assert!(pin_matches(&json!(["a", "b"]), &json!("b")));
        assert!(!pin_matches(&json!("1234"), &json!(123)));
        assert!(!pin_matches(&json!({"a": 1}), &json!("a")));
        assert!(!pin_matches(&json!(null), &json!("null")));
    }

    #[test]
    fn templates_refuse_injection() {
        let t = Template::parse("spiffe://td/ci/{owner}/{env}").unwrap();
        assert_eq!(
            t.render(&m(json!({"owner": "acme", "env": "prod"})))
                .unwrap(),
            "spiffe://td/ci/acme/prod"
        );
        for bad in ["..", ".", "", "a/b", "x%2fy", "a b", "évil", "a?b", "a#b"] {
            assert!(
                t.render(&m(json!({"owner": "acme", "env": bad}))).is_err(),
                "{bad:?}"
            );
        }
        assert!(t.render(&m(json!({"owner": "acme"}))).is_err());
        assert!(
            t.render(&m(json!({"owner": "acme", "env": ["a"]})))
                .is_err()
        );
        assert_eq!(
            t.render(&m(json!({"owner": 42, "env": true}))).unwrap(),
            "spiffe://td/ci/42/true"
        );
        for bad in ["{", "}", "a{}b", "{a b}", "{.a}", "x}{y"] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }
}
