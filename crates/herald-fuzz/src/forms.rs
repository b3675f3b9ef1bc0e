//! The exchange endpoints' form parsers: RFC 8693 token exchange
//! (`POST /v1/token`) and AWS STS `AssumeRoleWithWebIdentity` (`/`).

use herald_core::ErrorCode;
use herald_server::decision::RequestedCredential;
use herald_server::exchange::ExchangeRequest;
use herald_server::http_exchange::{
    FormRefusal, TOKEN_EXCHANGE_GRANT, TOKEN_TYPE_JOIN_TOKEN, TOKEN_TYPE_JWT, parse_rfc8693_form,
    parse_sts_form,
};

fn encode(pairs: &[(&str, &str)]) -> Vec<u8> {
    serde_urlencoded::to_string(pairs)
        .expect("string pairs encode")
        .into_bytes()
}

fn refused(r: &FormRefusal) {
    assert!(
        matches!(
            r.code,
            ErrorCode::InvalidRequest | ErrorCode::RequestTooLarge
        ),
        "{r:?}"
    );
    assert!(r.status.is_client_error(), "{r:?}");
    assert!(!r.wire.is_empty() && !r.message.is_empty());
}

/// The fields that matter, for comparing two parses.
fn key(r: &ExchangeRequest) -> String {
    format!(
        "{:?}|{:?}|{:?}",
        r.evidence.subject_token, r.evidence.join_token, r.credential
    )
}

/// Mode 0: `rest` is an RFC 8693 body. Mode 1: `rest` is an STS form.
/// Invariants: refusals are typed client errors; an accepted form is
/// well-formed by the endpoint's rules and survives a round trip (its
/// meaning, re-encoded as a form, parses to the same request).
pub fn exchange_form(data: &[u8]) {
    let Some((mode, rest)) = crate::mode(data, 2) else {
        return;
    };
    if mode == 0 {
        let (req, scope) = match parse_rfc8693_form(rest) {
            Ok(v) => v,
            Err(r) => return refused(&r),
        };
        assert!(!req.evidence.subject_token.is_empty());
        let RequestedCredential::JwtSvid { audiences, ttl } = &req.credential else {
            panic!("RFC 8693 asks for a JWT-SVID: {:?}", req.credential)
        };
        assert!(!audiences.is_empty() && ttl.is_none());
        let mut pairs = vec![
            ("grant_type", TOKEN_EXCHANGE_GRANT),
            ("subject_token", req.evidence.subject_token.as_str()),
            ("subject_token_type", TOKEN_TYPE_JWT),
            ("scope", scope.as_str()),
        ];
        if let Some(t) = &req.evidence.join_token {
            pairs.push(("actor_token", t));
            pairs.push(("actor_token_type", TOKEN_TYPE_JOIN_TOKEN));
        }
        pairs.extend(audiences.iter().map(|a| ("audience", a.as_str())));
        let again = parse_rfc8693_form(&encode(&pairs)).expect("a re-encoded request parses");
        assert_eq!(key(&again.0), key(&req));
        assert_eq!(again.1, scope);
        crate::accept();
    } else {
        let req = match parse_sts_form(rest) {
            Ok(v) => v,
            Err(r) => return refused(&r),
        };
        let RequestedCredential::Cloud {
            role_arn,
            session_name,
            session_policy,
            ttl,
        } = &req.credential
        else {
            panic!("STS asks for session credentials: {:?}", req.credential)
        };
        assert!(role_arn.starts_with("arn:") && (20..=2048).contains(&role_arn.len()));
        assert!(herald_server::issue::valid_session_name(session_name));
        assert!((4..=20_000).contains(&req.evidence.subject_token.len()));
        assert!(ttl.is_none_or(|t| (900..=43_200).contains(&t.as_secs())));
        assert!(session_policy.as_ref().is_none_or(|p| p.len() <= 2048));
        assert!(req.evidence.join_token.is_none());
        let secs = ttl.map(|t| t.as_secs().to_string());
        let mut pairs = vec![
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", "2011-06-15"),
            ("RoleArn", role_arn.as_str()),
            ("RoleSessionName", session_name.as_str()),
            ("WebIdentityToken", req.evidence.subject_token.as_str()),
        ];
        if let Some(s) = &secs {
            pairs.push(("DurationSeconds", s));
        }
        if let Some(p) = session_policy {
            pairs.push(("Policy", p));
        }
        let again = parse_sts_form(&encode(&pairs)).expect("a re-encoded request parses");
        assert_eq!(key(&again), key(&req));
        crate::accept();
    }
}
