//! SPIFFE IDs and trust domains, validated exactly per the SPIFFE ID standard.
//!
//! `spiffe://<trust-domain>/<path>`: the trust domain is lowercase
//! `[a-z0-9._-]` with no port or userinfo; each path segment is
//! `[A-Za-z0-9._-]`, never empty, `.` or `..`; no trailing slash, no
//! percent-encoding, no query or fragment. The standard caps a SPIFFE ID at
//! 2048 bytes and a trust domain at 255.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SCHEME: &str = "spiffe://";
/// Longest SPIFFE ID accepted, in bytes (SPIFFE ID standard §2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// The path under which Herald's own identities live (the server's is
/// `/herald/server`). Clients pin the server by its SPIFFE ID, so no
/// policy may grant anything here.
pub const RESERVED_PATH: &str = "/herald";

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The input was empty.
    #[error("empty")]
    Empty,
    /// The scheme is not `spiffe://` (the scheme is case-sensitive here, as in the reference libraries).
    #[error("scheme must be spiffe://")]
    WrongScheme,
    /// No trust domain after the scheme.
    #[error("trust domain is missing")]
    MissingTrustDomain,
    /// The trust domain holds a character outside `[a-z0-9._-]` (uppercase, port, userinfo, ...).
    #[error(
        "trust domain contains {0:?}; only lowercase letters, digits, '.', '-' and '_' are allowed"
    )]
    BadTrustDomainChar(char),
    /// A path segment holds a character outside `[A-Za-z0-9._-]` (percent-encoding, query, fragment, ...).
    #[error("path contains {0:?}; only letters, digits, '.', '-' and '_' are allowed")]
    BadPathChar(char),
    /// `//` or a trailing `/`.
    #[error("path has an empty segment or a trailing slash")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("path has a '.' or '..' segment")]
    DotSegment,
    /// The path must start with `/`.
    #[error("path must start with '/'")]
    PathNotAbsolute,
    /// Longer than the standard allows.
    #[error("too long: {0} bytes (max {1})")]
    TooLong(usize, usize),
}

/// A SPIFFE trust domain, e.g. `example.org`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`) or a SPIFFE ID and takes
    /// its trust domain (`spiffe://example.org/anything`).
    pub fn new(input: &str) -> Result<Self, SpiffeIdError> {
        if input.starts_with(SCHEME) {
            return SpiffeId::parse(input).map(|id| id.trust_domain().clone());
        }
        validate_trust_domain(input)?;
        Ok(Self(input.to_owned()))
    }

    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID that names the trust domain itself (`spiffe://td`), used in CA certificates.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            uri: format!("{SCHEME}{}", self.0),
            td_len: self.0.len(),
            trust_domain: self.clone(),
        }
    }

    /// Builds `spiffe://<td><path>` after validating `path` (`/a/b`).
    pub fn spiffe_id(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        // Validate the path on its own first: concatenating "a" would
        // otherwise silently name another trust domain ("example.orga").
        validate_path(path)?;
        SpiffeId::parse(&format!("{SCHEME}{}{path}", self.0))
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TooLong(td.len(), MAX_TRUST_DOMAIN_LEN));
    }
    match td.chars().find(|c| !is_trust_domain_char(*c)) {
        Some(c) => Err(SpiffeIdError::BadTrustDomainChar(c)),
        None => Ok(()),
    }
}

fn is_trust_domain_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

/// Whether `s` can stand as one SPIFFE ID path segment exactly as it is:
/// non-empty, not `.` or `..`, only `[A-Za-z0-9._-]` — so a value put into
/// an ID (a claim, a selector) can never add a segment, a dot segment, a
/// percent-escape or another trust domain.
pub fn is_segment(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && s.chars().all(is_path_char)
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(SpiffeIdError::PathNotAbsolute);
    };
    for segment in rest.split('/') {
        match segment {
            "" => return Err(SpiffeIdError::EmptySegment),
            "." | ".." => return Err(SpiffeIdError::DotSegment),
            _ => {
                if let Some(c) = segment.chars().find(|c| !is_path_char(*c)) {
                    return Err(SpiffeIdError::BadPathChar(c));
                }
            }
        }
    }
    Ok(())
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    td_len: usize,
    trust_domain: TrustDomain,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        if input.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if input.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(input.len(), MAX_SPIFFE_ID_LEN));
        }
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(Self {
            uri: input.to_owned(),
            td_len: td.len(),
            trust_domain: TrustDomain(td.to_owned()),
        })
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, `""` for the trust domain's own ID, otherwise starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[SCHEME.len() + self.td_len..]
    }

    /// The full URI form.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// True when `self` equals `prefix` or lies below it segment-wise
    /// (`spiffe://td/a/b` is under `spiffe://td/a`, `spiffe://td/ab` is not).
    pub fn is_under(&self, prefix: &SpiffeId) -> bool {
        if self.trust_domain != prefix.trust_domain {
            return false;
        }
        let (p, q) = (self.path(), prefix.path());
        p == q || (p.starts_with(q) && p.as_bytes().get(q.len()) == Some(&b'/'))
    }

    /// True when the ID is one of Herald's own ([`RESERVED_PATH`]).
    pub fn is_reserved(&self) -> bool {
        let p = self.path();
        p.strip_prefix(RESERVED_PATH)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_valid_ids() {
        for ok in [
            "spiffe://example.org",
            "spiffe://example.org/workload",
            "spiffe://a-b_c.d/ns/prod/sa/Web_Server-1.0",
            "spiffe://1.2.3.4/x",
            "spiffe://td/..a/a..",
        ] {
            let id = SpiffeId::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(id.as_str(), ok);
            assert_eq!(id.to_string(), ok);
        }
        let id = SpiffeId::parse("spiffe://example.org/a/b").unwrap();
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/a/b");
    }

    #[test]
    fn rejects_each_forbidden_form() {
        use SpiffeIdError::*;
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", Empty),
            ("http://example.org/a", WrongScheme),
            ("SPIFFE://example.org/a", WrongScheme),
            ("spiffe://", MissingTrustDomain),
            ("spiffe:///path", MissingTrustDomain),
            ("spiffe://Example.org/a", BadTrustDomainChar('E')),
            ("spiffe://example.org:8080/a", BadTrustDomainChar(':')),
            ("spiffe://user@example.org/a", BadTrustDomainChar('@')),
            ("spiffe://user:pw@example.org/a", BadTrustDomainChar(':')),
            ("spiffe://example.org/", EmptySegment),
            ("spiffe://example.org/a/", EmptySegment),
            ("spiffe://example.org//a", EmptySegment),
            ("spiffe://example.org/./a", DotSegment),
            ("spiffe://example.org/a/..", DotSegment),
            ("spiffe://example.org/a/../b", DotSegment),
            ("spiffe://example.org/a%2fb", BadPathChar('%')),
            ("spiffe://example.org/%2e%2e", BadPathChar('%')),
            ("spiffe://example.org/a?x=1", BadPathChar('?')),
            ("spiffe://example.org/a#frag", BadPathChar('#')),
            ("spiffe://example.org/a b", BadPathChar(' ')),
            ("spiffe://example.org/caf\u{e9}", BadPathChar('\u{e9}')),
            ("spiffe://exa%6dple.org/a", BadTrustDomainChar('%')),
            ("spiffe://example.org?x", BadTrustDomainChar('?')),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input).as_ref(), Err(want), "{input}");
        }
    }

    #[test]
    fn length_limits() {
        let td = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        assert!(matches!(
            TrustDomain::new(&td),
            Err(SpiffeIdError::TooLong(..))
        ));
        let base = "spiffe://example.org/";
        let ok = format!("{base}{}", "a".repeat(MAX_SPIFFE_ID_LEN - base.len()));
        assert_eq!(ok.len(), 2048);
        assert!(SpiffeId::parse(&ok).is_ok());
        let long = format!("{ok}a");
        assert_eq!(
            SpiffeId::parse(&long),
            Err(SpiffeIdError::TooLong(2049, MAX_SPIFFE_ID_LEN))
        );
    }

    #[test]
    fn herald_paths_are_reserved() {
        for (id, reserved) in [
            ("spiffe://td/herald/server", true),
            ("spiffe://td/herald", true),
            ("spiffe://td/herald/x/y", true),
            ("spiffe://td/heraldx", false),
            ("spiffe://td/ci/herald/server", false),
            ("spiffe://td", false),
        ] {
            assert_eq!(SpiffeId::parse(id).unwrap().is_reserved(), reserved, "{id}");
        }
    }

    #[test]
    fn prefix_is_segment_wise() {
        let p = SpiffeId::parse("spiffe://td/ci/github").unwrap();
        assert!(
            SpiffeId::parse("spiffe://td/ci/github")
                .unwrap()
                .is_under(&p)
        );
        assert!(
            SpiffeId::parse("spiffe://td/ci/github/x")
                .unwrap()
                .is_under(&p)
        );
        assert!(
            !SpiffeId::parse("spiffe://td/ci/githubx")
                .unwrap()
                .is_under(&p)
        );
        assert!(
            !SpiffeId::parse("spiffe://other/ci/github/x")
                .unwrap()
                .is_under(&p)
        );
        let root = TrustDomain::new("td").unwrap().id();
        assert!(
            SpiffeId::parse("spiffe://td/anything")
                .unwrap()
                .is_under(&root)
        );
    }

    #[test]
    fn trust_domain_from_id_and_builder() {
        let td = TrustDomain::new("spiffe://example.org/x/y").unwrap();
        assert_eq!(td.as_str(), "example.org");
        assert_eq!(td.id().as_str(), "spiffe://example.org");
        assert_eq!(
            td.spiffe_id("/a").unwrap().as_str(),
            "spiffe://example.org/a"
        );
        assert!(td.spiffe_id("/../x").is_err());
        assert_eq!(td.spiffe_id("a"), Err(SpiffeIdError::PathNotAbsolute));
        assert_eq!(
            td.spiffe_id(".evil.com/x"),
            Err(SpiffeIdError::PathNotAbsolute)
        );
    }

    fn segment() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,12}".prop_filter("dot segment", |s| s != "." && s != "..")
    }

    proptest! {
        #[test]
        fn valid_ids_roundtrip(td in "[a-z0-9._-]{1,40}", segs in proptest::collection::vec(segment(), 0..6)) {
            let uri = format!("spiffe://{td}{}", segs.iter().map(|s| format!("/{s}")).collect::<String>());
            let id = SpiffeId::parse(&uri).unwrap();
            prop_assert_eq!(id.as_str(), uri.as_str());
            prop_assert_eq!(id.trust_domain().as_str(), td.as_str());
            prop_assert!(id.is_under(&id.trust_domain().id()));
        }

        #[test]
        fn arbitrary_input_never_panics_and_accepted_ids_obey_the_rules(s in "\\PC{0,64}", raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            for input in [s, format!("spiffe://{}", String::from_utf8_lossy(&raw))] {
                if let Ok(id) = SpiffeId::parse(&input) {
                    let td = id.trust_domain().as_str();
                    prop_assert!(!td.is_empty() && td.chars().all(is_trust_domain_char));
                    let path = id.path();
                    prop_assert!(!path.ends_with('/'));
                    for seg in path.split('/').skip(1) {
                        prop_assert!(!seg.is_empty() && seg != "." && seg != "..");
                        prop_assert!(seg.chars().all(is_path_char));
                    }
                }
            }
        }

        #[test]
        fn injected_characters_are_rejected(seg in segment(), bad in prop::sample::select(vec!["%2f", "%2e%2e", "/..", "/.", "//", "?q", "#f", ":1", "@x", "\\", " ", "%"]), pos in 0usize..3) {
            let path = match pos { 0 => format!("/{bad}{seg}"), 1 => format!("/{seg}{bad}"), _ => format!("/{seg}{bad}/{seg}") };
            let uri = format!("spiffe://example.org{path}");
            prop_assert!(SpiffeId::parse(&uri).is_err(), "{} was accepted", uri);
        }

        #[test]
        fn uppercase_trust_domains_are_rejected(td in "[a-z0-9]{0,10}[A-Z][a-zA-Z0-9]{0,10}") {
            prop_assert!(TrustDomain::new(&td).is_err());
            let uri = format!("spiffe://{td}/x");
            prop_assert!(SpiffeId::parse(&uri).is_err());
        }

        #[test]
        fn ports_and_userinfo_are_rejected(td in "[a-z0-9]{1,10}", port in 1u16.., user in "[a-z]{1,8}") {
            let with_port = format!("spiffe://{td}:{port}/x");
            let with_user = format!("spiffe://{user}@{td}/x");
            prop_assert!(SpiffeId::parse(&with_port).is_err());
            prop_assert!(SpiffeId::parse(&with_user).is_err());
        }

        #[test]
        fn over_long_ids_are_rejected(extra in 1usize..512) {
            let base = "spiffe://example.org/";
            let uri = format!("{base}{}", "a".repeat(MAX_SPIFFE_ID_LEN - base.len() + extra));
            let is_too_long = matches!(SpiffeId::parse(&uri), Err(SpiffeIdError::TooLong(..)));
            prop_assert!(is_too_long);
        }
    }
}
