//! Policies known to be dangerous, refused at load.
//!
//! 1. **A shared issuer without an owner pin.** GitHub Actions, GitLab.com
//!    and Buildkite sign tokens for every customer with the same issuer
//!    and keys. A policy on such an issuer must pin, exactly, the owner or
//!    repository (or their immutable numeric IDs), or the whole `sub`;
//!    otherwise any repository on the platform could mint the identity.
//! 2. **An unbounded `sub` match.** Pins are exact: a `*` in a pin value is
//!    refused (it would not glob — it would silently never match, or invite
//!    someone to "fix" it into a glob). In the CEL condition, a match on
//!    `sub` must be anchored to a literal prefix: `matches` needs a `^` and a
//!    literal start (for shared issuers one that reaches the owner, e.g.
//!    `^repo:acme/`); `startsWith` needs a literal that reaches the owner
//!    on shared issuers; `endsWith`/`contains` on `sub` are refused for
//!    shared issuers. Every alternative of a regex (`a|b` at the top
//!    level) must be bounded on its own. The check reads the compiled
//!    expression, so every spelling is seen: `claims.sub.matches(…)`,
//!    `claims["sub"].matches(…)`, `matches(claims.sub, …)` — and a value
//!    computed from `sub` is judged as `sub`: the expression's taint is
//!    tracked through concatenation, conversion, lists, indexing and
//!    comprehension variables, so `(claims.sub + "").matches(".*")`,
//!    `[claims.sub].exists(s, s.matches(".*"))` and `claims[k].matches(…)`
//!    are refused. A value that may not *start* with `sub` (`"x" +
//!    claims.sub`, a list mixing `sub` with other values) cannot be
//!    bounded by an anchor, so `matches`/`startsWith` on it are refused;
//!    so is `x.startsWith(claims.sub)` unless `x` is a literal. It catches
//!    the common mistakes; the owner pin of rule 1 is what actually bounds
//!    a shared issuer.
//! 3. **A shared issuer's platform token as a node's evidence without a
//!    project pin.** Any VM of any GCP project can ask Google
//!    (`https://accounts.google.com`) for an instance-identity token with
//!    any audience: a node policy on it must pin the project (or the
//!    service account) exactly — under `platform_token.` when the token is
//!    a TPM policy's second factor.

use crate::expr::{Compiled, SubSubject};
use crate::model::PolicyFile;

/// Shared multi-tenant issuers and the claims that pin a tenant.
pub const SHARED_ISSUERS: &[(&str, &[&str])] = &[
    (
        "https://token.actions.githubusercontent.com",
        &[
            "repository_owner",
            "repository_owner_id",
            "repository",
            "repository_id",
            "sub",
        ],
    ),
    (
        "https://gitlab.com",
        &[
            "namespace_path",
            "namespace_id",
            "project_path",
            "project_id",
            "sub",
        ],
    ),
    (
        "https://agent.buildkite.com",
        &["organization_slug", "organization_id", "sub"],
    ),
    // Any Google account or service account can mint an ID token for any
    // audience: only the account itself bounds it.
    ("https://accounts.google.com", &["sub", "email"]),
    (
        "https://app.terraform.io",
        &[
            "terraform_organization_id",
            "terraform_organization_name",
            "sub",
        ],
    ),
];

/// Shared issuers of node platform tokens and the claims that pin a tenant.
pub const SHARED_NODE_ISSUERS: &[(&str, &[&str])] = &[(
    "https://accounts.google.com",
    &[
        "project_id",
        "google.compute_engine.project_id",
        "google.compute_engine.project_number",
        "email",
        "sub",
    ],
)];

/// The owner-pinning claims of `issuer` if it is a shared issuer.
pub fn shared_issuer_pins(issuer: &str) -> Option<&'static [&'static str]> {
    let issuer = issuer.trim_end_matches('/');
    SHARED_ISSUERS
        .iter()
        .find(|(i, _)| *i == issuer)
        .map(|(_, pins)| *pins)
}

const REGEX_META: &[char] = &[
    '.', '*', '+', '?', '[', ']', '(', ')', '{', '}', '|', '\\', '$', '^',
];

/// Checks a parsed policy file and its compiled condition; `Err` names the
/// danger.
pub(crate) fn check(file: &PolicyFile, condition: Option<&Compiled>) -> Result<(), String> {
    for (k, v) in &file.pins {
        if v.as_str().is_some_and(|s| s.contains('*')) {
            return Err(format!(
                "pin `{k}` contains `*`: pins are exact matches, and an unbounded glob is refused"
            ));
        }
    }
    if let Some(p) = &file.evidence.platform_token {
        // As a TPM policy's factor, the token's claims are `platform_token.*`.
        let prefix = if file.evidence.tpm.is_some() {
            "platform_token."
        } else {
            ""
        };
        let issuer = p.issuer.trim_end_matches('/');
        if let Some((_, claims)) = SHARED_NODE_ISSUERS.iter().find(|(i, _)| *i == issuer)
            && !claims
                .iter()
                .any(|c| file.pins.contains_key(&format!("{prefix}{c}")))
        {
            return Err(format!(
                "{issuer} signs instance tokens for every project: pin one of {} exactly",
                claims
                    .iter()
                    .map(|c| format!("{prefix}{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    // TPM evidence names the node by its EK: there is no shared issuer.
    let Some(oidc) = &file.evidence.oidc else {
        return Ok(());
    };
    let issuer = &oidc.issuer;
    let shared = shared_issuer_pins(issuer);
    if let Some(owner_claims) = shared
        && !owner_claims.iter().any(|c| file.pins.contains_key(*c))
    {
        return Err(format!(
            "{issuer} is shared by every tenant of the platform: pin one of {} exactly",
            owner_claims.join(", ")
        ));
    }
    if let Some(cond) = condition {
        check_sub_calls(cond, shared.is_some())?;
    }
    Ok(())
}

/// Checks every call on the `sub` claim in a compiled condition, and on
/// every value computed from it.
fn check_sub_calls(cond: &Compiled, shared: bool) -> Result<(), String> {
    for call in cond.sub_calls() {
        let method = &call.method;
        match call.subject {
            SubSubject::Leading => {}
            SubSubject::Argument => {
                return Err(format!(
                    "`x.{method}(sub)` on a computed `x` is an unbounded test on sub: test claims.sub itself, or against a literal"
                ));
            }
            // The value may not start with `sub`: an anchored pattern or a
            // prefix bounds the rest of it, not `sub`.
            SubSubject::Computed if matches!(method.as_str(), "matches" | "startsWith") => {
                return Err(format!(
                    "`{method}` on a value computed from sub (which may not start with it) bounds nothing: test claims.sub itself"
                ));
            }
            SubSubject::Computed => {}
        }
        let Some(lit) = &call.literal else {
            return Err(format!(
                "`sub.{}(...)` must take a string literal so it can be checked for unbounded matches",
                call.method
            ));
        };
        check_one(&call.method, lit, shared)?;
    }
    Ok(())
}

/// The top-level alternatives of a regex: `a|b(c|d)` → `a`, `b(c|d)`.
fn alternatives(re: &str) -> Vec<&str> {
    let (mut depth, mut class, mut escaped, mut start) = (0usize, false, false, 0usize);
    let mut out = Vec::new();
    for (i, c) in re.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '[' if !class => class = true,
            ']' if class => class = false,
            '(' if !class => depth += 1,
            ')' if !class => depth = depth.saturating_sub(1),
            '|' if !class && depth == 0 => {
                out.push(&re[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&re[start..]);
    out
}

fn check_one(method: &str, lit: &str, shared: bool) -> Result<(), String> {
    let unbounded = || format!("`sub.{method}({lit:?})` is an unbounded match on sub");
    match method {
        "matches" => {
            for alt in alternatives(lit) {
                check_one_regex(alt, shared).map_err(|how| format!("{}: {how}", unbounded()))?;
            }
        }

        "startsWith" => {
            if lit.is_empty() || (shared && !reaches_owner(lit)) {
                return Err(format!("{}: the prefix must name the owner", unbounded()));
            }
        }
        _ => {
            if shared {
                return Err(format!(
                    "{}: on a shared issuer, bound sub from its start (pins or startsWith)",
                    unbounded()
                ));
            }
        }
    }
    Ok(())
}

/// One alternative of a `sub` regex must be anchored and start with a
/// literal (on a shared issuer, one that names the owner).
fn check_one_regex(alt: &str, shared: bool) -> Result<(), String> {
    let Some(body) = alt.strip_prefix('^') else {
        return Err("anchor every alternative with ^".into());
    };
    let literal_prefix: String = body
        .chars()
        .take_while(|c| !REGEX_META.contains(c))
        .collect();
    if literal_prefix.is_empty() || (shared && !reaches_owner(&literal_prefix)) {
        return Err("start every alternative with a literal that names the owner".into());
    }
    Ok(())
}

/// Whether a literal `sub` prefix reaches past the owner: GitHub
/// `repo:OWNER/`, GitLab `project_path:GROUP/`, Buildkite `organization:ORG:`.
fn reaches_owner(prefix: &str) -> bool {
    if let Some(rest) = prefix.strip_prefix("organization:") {
        return rest.find(':').is_some_and(|i| i > 0);
    }
    match prefix.split_once(':') {
        Some((_, rest)) => rest.find('/').is_some_and(|i| i > 0),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_sub_matches(cond: &str, shared: bool) -> Result<(), String> {
        let c = Compiled::compile(cond, crate::expr::Role::Condition)?;
        check_sub_calls(&c, shared)
    }

    #[test]
    fn sub_matches_must_be_bounded() {
        for (cond, shared, ok) in [
            (r#"claims.sub.matches("^repo:acme/.*")"#, true, true),
            (r#"claims.sub.matches("^repo:.*")"#, true, false),
            (r#"claims.sub.matches(".*")"#, false, false),
            (r#"claims.sub.matches("repo:acme/app")"#, true, false),
            (
                r#"claims.sub.matches("^system:serviceaccount:prod:.*")"#,
                false,
                true,
            ),
            (r#"claims.sub.startsWith("repo:acme/")"#, true, true),
            (r#"claims.sub.startsWith("repo:")"#, true, false),
            (r#"claims.sub.startsWith('')"#, false, false),
            (
                r#"claims.sub.endsWith(":ref:refs/heads/main")"#,
                true,
                false,
            ),
            (
                r#"claims.sub.endsWith(":ref:refs/heads/main")"#,
                false,
                true,
            ),
            (r#"claims.sub.startsWith(claims.x)"#, false, false),
            (
                r#"claims.sub.startsWith("organization:acme:pipeline")"#,
                true,
                true,
            ),
            (r#"claims.sub.startsWith("organization:")"#, true, false),
            // Alternation: each alternative is judged on its own.
            (r#"claims.sub.matches("^repo:acme/|.*")"#, true, false),
            (
                r#"claims.sub.matches("^repo:acme/a|^repo:acme/b")"#,
                true,
                true,
            ),
            (r#"claims.sub.matches("^repo:acme/(a|b)")"#, true, true),
            (r#"claims.sub.matches("^repo:acme/[|]x")"#, true, true),
            // Index and global forms are the same call.
            (r#"claims["sub"].matches(".*")"#, false, false),
            (r#"matches(claims.sub, ".*")"#, false, false),
            (r#"matches(claims["sub"], "^repo:")"#, true, false),
            (r#"claims["sub"].startsWith("repo:")"#, true, false),
        ] {
            assert_eq!(
                check_sub_matches(cond, shared).is_ok(),
                ok,
                "{cond} shared={shared}"
            );
        }
    }

    /// A value computed from `sub` is judged as `sub`: every form that
    /// carries it into a string test is seen, and only one that keeps `sub`
    /// at its start can be bounded by an anchor.
    #[test]
    fn a_value_computed_from_sub_is_judged_as_sub() {
        for (cond, shared, ok) in [
            // Concatenation keeps sub at the start: judged by the pattern.
            (r#"(claims.sub + "").matches(".*")"#, false, false),
            (r#"(claims.sub + ":x").matches("^repo:acme/")"#, true, true),
            (r#"matches(claims.sub + "", ".*")"#, false, false),
            (r#"(claims.sub + "").startsWith("repo:")"#, true, false),
            // Something before sub: no anchor bounds it.
            (
                r#"("repo:acme/" + claims.sub).matches("^repo:acme/")"#,
                true,
                false,
            ),
            (
                r#"("repo:acme/" + claims.sub).startsWith("repo:acme/")"#,
                false,
                false,
            ),
            // Comprehension variables take the taint of their range.
            (r#"[claims.sub].exists(s, s.matches(".*"))"#, false, false),
            (
                r#"[claims.sub].all(s, s.matches("^repo:acme/"))"#,
                true,
                true,
            ),
            (
                r#"[claims.sub].exists(s, s.startsWith("repo:"))"#,
                true,
                false,
            ),
            (
                r#"[claims.sub, claims.sub + "x"].exists(s, s.matches("^repo:acme/"))"#,
                true,
                true,
            ),
            // A list that mixes sub with another value may test the other.
            (
                r#"[claims.sub, "repo:acme/x"].exists(s, s.matches("^repo:acme/"))"#,
                true,
                false,
            ),
            (
                r#"[claims.sub, claims.ref].exists(s, s.matches(".*"))"#,
                false,
                false,
            ),
            // A variable that shadows `claims` is its range's item.
            (
                r#"[claims.sub].exists(claims, claims.matches(".*"))"#,
                false,
                false,
            ),
            (
                r#"[claims.sub].exists(x, [x].exists(y, y.matches(".*")))"#,
                false,
                false,
            ),
            // Conversions return their operand.
            (r#"string(claims.sub).matches(".*")"#, false, false),
            (r#"dyn(claims.sub).startsWith("repo:")"#, true, false),
            (r#"string(int(claims.sub)).matches(".*")"#, false, false),
            // Indexing: a literal list's items, a computed key, a map.
            (r#"[claims.sub][0].matches(".*")"#, false, false),
            (r#"claims["s" + "ub"].matches(".*")"#, false, false),
            (r#"claims.exists(k, claims[k].matches(".*"))"#, false, false),
            (r#"{"a": claims.sub}.a.matches(".*")"#, false, false),
            (
                r#"claims.map(k, claims[k])[0].startsWith("repo:acme/")"#,
                true,
                false,
            ),
            // Both branches of a conditional.
            (
                r#"(true ? claims.sub : "x").matches("^repo:acme/")"#,
                true,
                false,
            ),
            (
                r#"(claims.ref == "x" ? claims.sub : claims.sub + "y").matches("^repo:acme/")"#,
                true,
                true,
            ),
            // endsWith/contains: refused on a shared issuer, as on sub.
            (
                r#"[claims.sub].exists(s, s.endsWith(":ref:refs/heads/main"))"#,
                true,
                false,
            ),
            (
                r#"[claims.sub].exists(s, s.endsWith(":ref:refs/heads/main"))"#,
                false,
                true,
            ),
            (r#"("x" + claims.sub).contains("y")"#, false, true),
            // sub as the argument: bounded only by a literal receiver.
            (r#"claims.repository.startsWith(claims.sub)"#, false, false),
            (r#"claims.ref.contains(claims.sub)"#, false, false),
            (
                r#""repo:acme/app:ref:refs/heads/main".startsWith(claims.sub)"#,
                true,
                true,
            ),
            // Values not derived from sub are not judged.
            (r#"claims.ref.matches(".*")"#, true, true),
            (r#"[claims.ref].exists(r, r.matches(".*"))"#, true, true),
            (r#"claims.groups.exists(g, g.matches(".*"))"#, true, true),
            (r#"claims["ref"].matches(".*")"#, true, true),
            (
                r#"has(claims.sub) && claims.sub.startsWith("repo:acme/")"#,
                true,
                true,
            ),
            (
                r#"(claims.sub == "x" ? "a" : "b").matches(".*")"#,
                true,
                true,
            ),
            (r#"size(claims.sub) > 0 && "x".matches(".*")"#, true, true),
        ] {
            assert_eq!(
                check_sub_matches(cond, shared).is_ok(),
                ok,
                "{cond} shared={shared}"
            );
        }
    }
}
