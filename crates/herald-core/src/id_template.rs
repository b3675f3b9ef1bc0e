//! Registered workload identities: a fixed SPIFFE ID, or a template whose
//! path segments are filled from the caller's selectors
//! (`spiffe://td/ns/{k8s:ns}/sa/{k8s:sa}`), so one registration gives
//! every service account its own identity.
//!
//! The server and the agent share this one definition: the agent expands
//! a template for the caller it attested, the server accepts a requested
//! ID only if the template could have produced it. A placeholder is a
//! whole path segment and names a selector kind that a caller holds at
//! most once; the value it takes must already be a valid segment
//! ([`crate::spiffe_id::is_segment`]) — a value is never escaped, so it can
//! never add a segment, a dot segment or an escape.

use std::fmt;

use crate::selector::Selector;
use crate::spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain, is_segment};

/// A selector kind a template segment can take its value from: one the
/// caller holds at most once, whose values can be path segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectorKind {
    /// `unix:uid`
    Uid,
    /// `k8s:ns`
    K8sNamespace,
    /// `k8s:sa`
    K8sServiceAccount,
    /// `k8s:pod-name`
    K8sPodName,
    /// `k8s:pod-uid`
    K8sPodUid,
    /// `k8s:container-name`
    K8sContainerName,
    /// `k8s:node-name`
    K8sNodeName,
}

impl SelectorKind {
    /// Every kind, in the order the documentation lists them.
    pub const ALL: [SelectorKind; 7] = [
        SelectorKind::Uid,
        SelectorKind::K8sNamespace,
        SelectorKind::K8sServiceAccount,
        SelectorKind::K8sPodName,
        SelectorKind::K8sPodUid,
        SelectorKind::K8sContainerName,
        SelectorKind::K8sNodeName,
    ];

    /// The placeholder's name, as written between braces.
    pub fn name(self) -> &'static str {
        match self {
            SelectorKind::Uid => "unix:uid",
            SelectorKind::K8sNamespace => "k8s:ns",
            SelectorKind::K8sServiceAccount => "k8s:sa",
            SelectorKind::K8sPodName => "k8s:pod-name",
            SelectorKind::K8sPodUid => "k8s:pod-uid",
            SelectorKind::K8sContainerName => "k8s:container-name",
            SelectorKind::K8sNodeName => "k8s:node-name",
        }
    }

    /// The value `s` holds for this kind, if `s` is of it.
    fn value_of(self, s: &Selector) -> Option<String> {
        match (self, s) {
            (SelectorKind::Uid, Selector::Uid(v)) => Some(v.to_string()),
            (SelectorKind::K8sNamespace, Selector::K8sNamespace(v))
            | (SelectorKind::K8sServiceAccount, Selector::K8sServiceAccount(v))
            | (SelectorKind::K8sPodName, Selector::K8sPodName(v))
            | (SelectorKind::K8sPodUid, Selector::K8sPodUid(v))
            | (SelectorKind::K8sContainerName, Selector::K8sContainerName(v))
            | (SelectorKind::K8sNodeName, Selector::K8sNodeName(v)) => Some(v.clone()),
            _ => None,
        }
    }

    /// The one value `selectors` hold for this kind; `None` when they hold
    /// none or several (ambiguous, so nothing is built from them).
    fn single_value(self, selectors: &[Selector]) -> Option<String> {
        let mut values = selectors.iter().filter_map(|s| self.value_of(s));
        let first = values.next()?;
        values.all(|v| v == first).then_some(first)
    }
}

/// Why a template is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The text outside the placeholders is no SPIFFE ID.
    #[error("not a SPIFFE ID template: {0}")]
    SpiffeId(#[from] SpiffeIdError),
    /// The ID or template names another trust domain.
    #[error("not in trust domain {0}")]
    OtherTrustDomain(String),
    /// A brace that does not make a whole-segment placeholder.
    #[error("a placeholder must be a whole path segment, like /{{k8s:ns}}/")]
    PartialSegment,
    /// A placeholder naming no usable selector kind.
    #[error("unknown placeholder {{{0}}} (one of: {1})")]
    UnknownPlaceholder(String, String),
    /// No placeholder at all.
    #[error("the template has no placeholder")]
    NoPlaceholder,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Value(SelectorKind),
}

/// A SPIFFE ID template over selectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdTemplate {
    text: String,
    trust_domain: TrustDomain,
    segments: Vec<Segment>,
}

impl IdTemplate {
    /// Whether `text` is written as a template (a SPIFFE ID never holds `{`).
    pub fn is_template(text: &str) -> bool {
        text.contains('{')
    }

    /// Parses `spiffe://<trust_domain>/…/{kind}/…`.
    pub fn parse(text: &str, trust_domain: &TrustDomain) -> Result<IdTemplate, TemplateError> {
        let mut segments = Vec::new();
        let mut sample = String::new();
        let rest = text
            .strip_prefix("spiffe://")
            .ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        for seg in path.split('/') {
            match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => {
                    let kind = SelectorKind::ALL
                        .into_iter()
                        .find(|k| k.name() == name)
                        .ok_or_else(|| {
                            let all: Vec<&str> =
                                SelectorKind::ALL.iter().map(|k| k.name()).collect();
                            TemplateError::UnknownPlaceholder(name.to_owned(), all.join(", "))
                        })?;
                    segments.push(Segment::Value(kind));
                    sample.push_str("/x");
                }
                None if seg.contains(['{', '}']) => return Err(TemplateError::PartialSegment),
                None => {
                    segments.push(Segment::Literal(seg.to_owned()));
                    sample.push('/');
                    sample.push_str(seg);
                }
            }
        }
        // The literal parts, with a plain segment for every placeholder,
        // must make a valid ID: that checks the scheme, the trust domain
        // and every literal segment with the standard's own rules.
        let sample = SpiffeId::parse(&format!("spiffe://{td}{sample}"))?;
        if sample.trust_domain() != trust_domain {
            return Err(TemplateError::OtherTrustDomain(trust_domain.to_string()));
        }
        if !segments.iter().any(|s| matches!(s, Segment::Value(_))) {
            return Err(TemplateError::NoPlaceholder);
        }
        Ok(IdTemplate {
            text: text.to_owned(),
            trust_domain: trust_domain.clone(),
            segments,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The selector kinds the template takes values from.
    pub fn kinds(&self) -> impl Iterator<Item = SelectorKind> + '_ {
        self.segments.iter().filter_map(|s| match s {
            Segment::Value(k) => Some(*k),
            Segment::Literal(_) => None,
        })
    }

    /// The ID for a caller holding `facts`: `None` when a placeholder's
    /// selector is missing, held twice with different values, or not a
    /// valid path segment.
    pub fn expand(&self, facts: &[Selector]) -> Option<SpiffeId> {
        let mut out = format!("spiffe://{}", self.trust_domain);
        for seg in &self.segments {
            out.push('/');
            match seg {
                Segment::Literal(l) => out.push_str(l),
                Segment::Value(k) => {
                    let v = k.single_value(facts)?;
                    if !is_segment(&v) {
                        return None;
                    }
                    out.push_str(&v);
                }
            }
        }
        SpiffeId::parse(&out).ok()
    }

    /// Whether the template could have produced `id` for a caller holding
    /// `required` (the registration's selectors): literal segments equal,
    /// and a placeholder whose kind `required` fixes takes only that value.
    pub fn admits(&self, id: &SpiffeId, required: &[Selector]) -> bool {
        if id.trust_domain() != &self.trust_domain {
            return false;
        }
        let Some(path) = id.path().strip_prefix('/') else {
            return false;
        };
        let parts: Vec<&str> = path.split('/').collect();
        parts.len() == self.segments.len()
            && self
                .segments
                .iter()
                .zip(parts)
                .all(|(seg, part)| match seg {
                    Segment::Literal(l) => l == part,
                    Segment::Value(k) => {
                        let fixed: Vec<String> =
                            required.iter().filter_map(|s| k.value_of(s)).collect();
                        is_segment(part) && (fixed.is_empty() || fixed.iter().all(|f| f == part))
                    }
                })
    }

    /// Whether some expansion could equal `prefix` or lie below it — used
    /// to keep templates out of reserved ID spaces (the node identities').
    pub fn could_be_under(&self, prefix: &SpiffeId) -> bool {
        if prefix.trust_domain() != &self.trust_domain {
            return false;
        }
        let wanted: Vec<&str> = prefix.path().split('/').filter(|s| !s.is_empty()).collect();
        wanted.len() <= self.segments.len()
            && self.segments.iter().zip(&wanted).all(|(seg, w)| match seg {
                Segment::Literal(l) => l == w,
                Segment::Value(_) => true,
            })
    }
}

impl fmt::Display for IdTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The identity a workload registration gives: fixed, or templated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisteredId {
    /// One SPIFFE ID for every matching caller.
    Exact(SpiffeId),
    /// An ID per caller, from its selectors.
    Template(IdTemplate),
}

impl RegisteredId {
    /// Parses a registration's `spiffe_id` (a template if it holds `{`).
    pub fn parse(text: &str, trust_domain: &TrustDomain) -> Result<RegisteredId, TemplateError> {
        if IdTemplate::is_template(text) {
            return IdTemplate::parse(text, trust_domain).map(RegisteredId::Template);
        }
        let id = SpiffeId::parse(text)?;
        if id.trust_domain() != trust_domain {
            return Err(TemplateError::OtherTrustDomain(trust_domain.to_string()));
        }
        Ok(RegisteredId::Exact(id))
    }

    /// The ID or the template, as written.
    pub fn as_str(&self) -> &str {
        match self {
            RegisteredId::Exact(e) => e.as_str(),
            RegisteredId::Template(t) => t.as_str(),
        }
    }

    /// Whether a caller registered with `required` selectors may hold `id`.
    pub fn admits(&self, id: &SpiffeId, required: &[Selector]) -> bool {
        match self {
            RegisteredId::Exact(e) => e == id,
            RegisteredId::Template(t) => t.admits(id, required),
        }
    }

    /// The ID for a caller holding `facts`.
    pub fn for_caller(&self, facts: &[Selector]) -> Option<SpiffeId> {
        match self {
            RegisteredId::Exact(e) => Some(e.clone()),
            RegisteredId::Template(t) => t.expand(facts),
        }
    }

    /// Whether any ID it gives could equal `prefix` or lie below it.
    pub fn could_be_under(&self, prefix: &SpiffeId) -> bool {
        match self {
            RegisteredId::Exact(e) => e.is_under(prefix),
            RegisteredId::Template(t) => t.could_be_under(prefix),
        }
    }
}

impl fmt::Display for RegisteredId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("td").unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn pod(ns: &str, sa: &str) -> Vec<Selector> {
        vec![
            Selector::K8sNamespace(ns.into()),
            Selector::K8sServiceAccount(sa.into()),
            Selector::Uid(0),
        ]
    }

    #[test]
    fn expands_whole_segments_from_the_callers_selectors() {
        let t = IdTemplate::parse("spiffe://td/ns/{k8s:ns}/sa/{k8s:sa}", &td()).unwrap();
        assert_eq!(
            t.expand(&pod("prod", "api")),
            Some(id("spiffe://td/ns/prod/sa/api"))
        );
        let u = IdTemplate::parse("spiffe://td/uid/{unix:uid}", &td()).unwrap();
        assert_eq!(u.expand(&pod("a", "b")), Some(id("spiffe://td/uid/0")));
        // Missing, ambiguous, or unusable values build nothing.
        assert_eq!(t.expand(&[Selector::K8sNamespace("prod".into())]), None);
        let mut two = pod("prod", "api");
        two.push(Selector::K8sServiceAccount("other".into()));
        assert_eq!(t.expand(&two), None);
        for bad in ["..", ".", "a%2fb", "a/b", ""] {
            assert_eq!(t.expand(&pod(bad, "api")), None, "{bad:?}");
        }
    }

    #[test]
    fn admits_only_what_it_could_have_built() {
        let t = IdTemplate::parse("spiffe://td/ns/{k8s:ns}/sa/{k8s:sa}", &td()).unwrap();
        assert!(t.admits(&id("spiffe://td/ns/prod/sa/api"), &[]));
        assert!(!t.admits(&id("spiffe://td/ns/prod/sa/api/x"), &[]));
        assert!(!t.admits(&id("spiffe://td/ns/prod/sb/api"), &[]));
        assert!(!t.admits(&id("spiffe://other/ns/prod/sa/api"), &[]));
        // A registration that fixes a kind fixes its segment.
        let prod = [Selector::K8sNamespace("prod".into())];
        assert!(t.admits(&id("spiffe://td/ns/prod/sa/api"), &prod));
        assert!(!t.admits(&id("spiffe://td/ns/dev/sa/api"), &prod));
    }

    #[test]
    fn refuses_malformed_templates() {
        for (bad, why) in [
            ("spiffe://td/ns-{k8s:ns}", "partial"),
            ("spiffe://td/{k8s:ns}x/a", "partial"),
            ("spiffe://td/{k8s:pod-label}", "multi-valued kind"),
            ("spiffe://td/{unix:path}", "path holds slashes"),
            ("spiffe://td/{}", "empty"),
            ("spiffe://other/{k8s:ns}", "other trust domain"),
            ("spiffe://{k8s:ns}/a", "trust domain templated"),
            ("spiffe://td/../{k8s:ns}", "dot segment"),
            ("spiffe://td//{k8s:ns}", "empty segment"),
            ("http://td/{k8s:ns}", "scheme"),
        ] {
            assert!(IdTemplate::parse(bad, &td()).is_err(), "{bad}: {why}");
        }
        assert_eq!(
            IdTemplate::parse("spiffe://td/a", &td()),
            Err(TemplateError::NoPlaceholder)
        );
    }

    #[test]
    fn knows_when_it_could_reach_a_reserved_prefix() {
        let node = id("spiffe://td/node");
        for (t, reaches) in [
            ("spiffe://td/{k8s:ns}/x", true),
            ("spiffe://td/node/{k8s:ns}", true),
            ("spiffe://td/ns/{k8s:ns}", false),
        ] {
            let t = IdTemplate::parse(t, &td()).unwrap();
            assert_eq!(t.could_be_under(&node), reaches, "{t}");
        }
        assert!(
            RegisteredId::parse("spiffe://td/node/a", &td())
                .unwrap()
                .could_be_under(&node)
        );
    }
}
