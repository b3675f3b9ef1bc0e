//! The OIDC verifier against a real issuer over HTTPS (discovery + JWKS).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use herald_attest::oidc::{Algorithm, IssuerConfig, OidcError, OidcVerifier};
use herald_core::ErrorCode;
use herald_test_oidc::{Alg, Document, TestIssuer, now};
use serde_json::{Value, json};

const AUD: &str = "herald";

fn config(issuer: &TestIssuer) -> IssuerConfig {
    let mut cfg = IssuerConfig::new(issuer.issuer(), vec![AUD.to_string()]);
    cfg.extra_roots = Some(issuer.ca_pem_path().to_path_buf());
    cfg.http_timeout = Duration::from_millis(800);
    cfg.min_refresh_interval = Duration::from_secs(3600);
    cfg
}

async fn setup() -> (TestIssuer, OidcVerifier) {
    let issuer = TestIssuer::start().await;
    let verifier = OidcVerifier::new(vec![config(&issuer)]).unwrap();
    (issuer, verifier)
}

fn gh(issuer: &TestIssuer) -> Value {
    issuer.github_claims(AUD, "acme/webapp", "refs/heads/main", "production")
}

async fn refused(verifier: &OidcVerifier, token: &str) -> OidcError {
    verifier.verify(token, now()).await.unwrap_err()
}

#[tokio::test]
async fn github_rs256_and_es256_tokens_verify_with_claims_normalised() {
    let (issuer, verifier) = setup().await;
    for alg in [Alg::RS256, Alg::ES256] {
        let claims = gh(&issuer);
        let token = issuer.sign(alg, &claims);
        let v = verifier.verify(&token, now()).await.unwrap();
        assert_eq!(v.issuer, issuer.issuer());
        assert_eq!(v.subject, "repo:acme/webapp:environment:production");
        assert_eq!(v.audiences, vec![AUD.to_string()]);
        assert_eq!(v.claims["ref_protected"], json!(true));
        assert_eq!(v.claims["repository_owner_id"], json!("1342004"));
        assert_eq!(
            v.replay_key,
            format!(
                "jti:{}#{}",
                issuer.issuer(),
                claims["jti"].as_str().unwrap()
            )
        );
        assert_eq!(v.expires_at, claims["exp"].as_i64().unwrap());
        assert_eq!(v.digest.len(), 64);
    }
    // Discovery and JWKS were fetched once and cached for both tokens.
    assert_eq!(issuer.jwks_fetches(), 1);
    assert_eq!(issuer.discovery_fetches(), 1);
}

#[tokio::test]
async fn gitlab_shaped_claims_are_normalised() {
    let (issuer, verifier) = setup().await;
    let mut claims = issuer.gitlab_claims(AUD, "group/project", "main");
    claims["project_id"] = json!(20);
    let v = verifier
        .verify(&issuer.sign(Alg::RS256, &claims), now())
        .await
        .unwrap();
    assert_eq!(v.claims["ref_protected"], json!(true));
    assert_eq!(v.claims["project_id"], json!("20"));
    assert_eq!(v.claims["namespace_path"], json!("group"));
}

#[tokio::test]
async fn time_claims_are_enforced_with_leeway() {
    let (issuer, verifier) = setup().await;
    let t = now();
    let cases = [
        (json!({"exp": t - 120}), ErrorCode::TokenExpired),
        (json!({"nbf": t + 600}), ErrorCode::TokenNotYetValid),
        (json!({"iat": t + 600}), ErrorCode::TokenIssuedInFuture),
    ];
    for (patch, code) in cases {
        let mut claims = gh(&issuer);
        for (k, v) in patch.as_object().unwrap() {
            claims[k] = v.clone();
        }
        let e = refused(&verifier, &issuer.sign(Alg::ES256, &claims)).await;
        assert_eq!(e.code(), code, "{patch}: {e}");
    }
    // Within the 60 s leeway: accepted.
    let mut claims = gh(&issuer);
    claims["exp"] = json!(t - 30);
    claims["iat"] = json!(t + 30);
    verifier
        .verify(&issuer.sign(Alg::ES256, &claims), t)
        .await
        .unwrap();
    // exp is mandatory.
    let mut claims = gh(&issuer);
    claims.as_object_mut().unwrap().remove("exp");
    let e = refused(&verifier, &issuer.sign(Alg::ES256, &claims)).await;
    assert_eq!(e.code(), ErrorCode::TokenClaimsInvalid);
}

#[tokio::test]
async fn issuer_and_audience_are_exact() {
    let (issuer, verifier) = setup().await;
    let mut claims = gh(&issuer);
    claims["iss"] = json!(format!("{}/", issuer.issuer()));
    let e = refused(&verifier, &issuer.sign(Alg::RS256, &claims)).await;
    assert_eq!(e.code(), ErrorCode::TokenIssuerUnknown);

    for aud in [json!("other"), json!(["other", "herald-x"]), Value::Null] {
        let mut claims = gh(&issuer);
        if aud.is_null() {
            claims.as_object_mut().unwrap().remove("aud");
        } else {
            claims["aud"] = aud.clone();
        }
        let e = refused(&verifier, &issuer.sign(Alg::RS256, &claims)).await;
        assert_eq!(e.code(), ErrorCode::TokenAudienceInvalid, "aud {aud}");
    }
    let mut claims = gh(&issuer);
    claims["aud"] = json!(["other", AUD]);
    let v = verifier
        .verify(&issuer.sign(Alg::RS256, &claims), now())
        .await
        .unwrap();
    assert_eq!(v.audiences, vec![AUD.to_string()]);
}

#[tokio::test]
async fn algorithm_attacks_are_refused() {
    let (issuer, verifier) = setup().await;
    let e = refused(&verifier, &issuer.unsigned(&gh(&issuer))).await;
    assert_eq!(e.code(), ErrorCode::TokenAlgorithmRefused);
    let e = refused(&verifier, &issuer.hs256_with_public_key(&gh(&issuer))).await;
    assert_eq!(e.code(), ErrorCode::TokenAlgorithmRefused);

    // An issuer pinned to ES256 refuses RS256.
    let mut cfg = config(&issuer);
    cfg.algorithms = vec![Algorithm::ES256];
    let es_only = OidcVerifier::new(vec![cfg]).unwrap();
    let e = refused(&es_only, &issuer.sign(Alg::RS256, &gh(&issuer))).await;
    assert_eq!(e.code(), ErrorCode::TokenAlgorithmRefused);

    // An ES256 header on the RSA key's kid cannot verify.
    let header = json!({"alg": "ES256", "kid": "rsa-1", "typ": "JWT"});
    let token = issuer.sign_with_header(Alg::ES256, &header, &gh(&issuer));
    let e = refused(&verifier, &token).await;
    assert_eq!(e.code(), ErrorCode::TokenSignatureInvalid);

    // A critical header extension is not silently ignored.
    let header = json!({"alg": "ES256", "kid": "ec-1", "crit": ["exp"], "exp": 1});
    let token = issuer.sign_with_header(Alg::ES256, &header, &gh(&issuer));
    assert_eq!(
        refused(&verifier, &token).await.code(),
        ErrorCode::TokenMalformed
    );

    // A jku pointing elsewhere is never followed: the issuer's own key decides.
    let header = json!({"alg": "ES256", "kid": "ec-1", "jku": "https://evil.example/jwks"});
    let token = issuer.sign_with_header(Alg::ES256, &header, &gh(&issuer));
    verifier.verify(&token, now()).await.unwrap();
}

#[tokio::test]
async fn tampering_and_foreign_keys_are_refused() {
    let (issuer, verifier) = setup().await;
    let token = issuer.sign(Alg::RS256, &gh(&issuer));
    // Flip one character of the signature.
    let mut bytes = token.clone().into_bytes();
    let last = bytes.len() - 5;
    bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
    let e = refused(&verifier, &String::from_utf8(bytes).unwrap()).await;
    assert_eq!(e.code(), ErrorCode::TokenSignatureInvalid);
    // Swap the claims for others while keeping the signature.
    let parts: Vec<&str> = token.split('.').collect();
    let mut other = gh(&issuer);
    other["repository"] = json!("evil/repo");
    let other_token = issuer.sign(Alg::RS256, &other);
    let other_claims = other_token.split('.').nth(1).unwrap();
    let spliced = format!("{}.{}.{}", parts[0], other_claims, parts[2]);
    assert_eq!(
        refused(&verifier, &spliced).await.code(),
        ErrorCode::TokenSignatureInvalid
    );
    // An unpublished key claiming a published kid.
    let e = refused(&verifier, &issuer.sign_forged(Alg::ES256, &gh(&issuer))).await;
    assert_eq!(e.code(), ErrorCode::TokenSignatureInvalid);
    // Garbage.
    for junk in ["", "a.b", "a.b.c.d", "!!!.???.***", "e30.e30.AAAA"] {
        let e = refused(&verifier, junk).await;
        assert!(
            matches!(
                e.code(),
                ErrorCode::TokenMalformed | ErrorCode::TokenClaimsInvalid
            ),
            "{junk}: {e}"
        );
    }
}

#[tokio::test]
async fn oversized_tokens_are_refused_before_parsing() {
    let (issuer, verifier) = setup().await;
    let mut claims = gh(&issuer);
    claims["padding"] = json!("x".repeat(20 * 1024));
    let e = refused(&verifier, &issuer.sign(Alg::ES256, &claims)).await;
    assert_eq!(e.code(), ErrorCode::RequestTooLarge);
    assert_eq!(
        issuer.jwks_fetches(),
        0,
        "nothing fetched for an oversized token"
    );
}

#[tokio::test]
async fn unknown_kid_refreshes_once_then_is_refused_and_rotation_is_followed() {
    let issuer = TestIssuer::start().await;
    let mut cfg = config(&issuer);
    cfg.min_refresh_interval = Duration::from_millis(0);
    let verifier = OidcVerifier::new(vec![cfg]).unwrap();
    verifier
        .verify(&issuer.sign(Alg::ES256, &gh(&issuer)), now())
        .await
        .unwrap();
    assert_eq!(issuer.jwks_fetches(), 1);

    // The issuer rotates: a token with the new kid triggers one refresh.
    issuer.rotate(false);
    verifier
        .verify(&issuer.sign(Alg::ES256, &gh(&issuer)), now())
        .await
        .unwrap();
    assert_eq!(issuer.jwks_fetches(), 2);

    // A kid that is nowhere: refreshed, still unknown.
    let e = refused(
        &verifier,
        &issuer.sign_with_unpublished_key(Alg::RS256, &gh(&issuer)),
    )
    .await;
    assert_eq!(e.code(), ErrorCode::TokenKeyUnknown);
    assert_eq!(issuer.jwks_fetches(), 3);
}

#[tokio::test]
async fn unknown_kid_refreshes_are_rate_limited() {
    let (issuer, verifier) = setup().await; // min_refresh_interval = 1 h
    verifier
        .verify(&issuer.sign(Alg::ES256, &gh(&issuer)), now())
        .await
        .unwrap();
    for _ in 0..20 {
        let e = refused(
            &verifier,
            &issuer.sign_with_unpublished_key(Alg::ES256, &gh(&issuer)),
        )
        .await;
        assert_eq!(e.code(), ErrorCode::TokenKeyUnknown);
    }
    assert_eq!(
        issuer.jwks_fetches(),
        1,
        "a flood of unknown kids must not become a flood of fetches"
    );
}

#[tokio::test]
async fn slow_or_unreachable_issuer_fails_fast_with_a_clear_error() {
    let (issuer, verifier) = setup().await;
    issuer.set_delay(Duration::from_secs(30));
    let started = Instant::now();
    let e = refused(&verifier, &issuer.sign(Alg::ES256, &gh(&issuer))).await;
    assert_eq!(e.code(), ErrorCode::IssuerUnavailable, "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded by the configured timeout, took {:?}",
        started.elapsed()
    );
    assert_eq!(verifier.stats()[0].failures, 1);

    // Nothing listening at all.
    let mut cfg = IssuerConfig::new("https://127.0.0.1:9", vec![AUD.into()]);
    cfg.http_timeout = Duration::from_millis(500);
    let dead = OidcVerifier::new(vec![cfg]).unwrap();
    let mut claims = gh(&issuer);
    claims["iss"] = json!("https://127.0.0.1:9");
    let e = refused(&dead, &issuer.sign(Alg::ES256, &claims)).await;
    assert_eq!(e.code(), ErrorCode::IssuerUnavailable);
}

#[tokio::test]
async fn discovery_naming_another_issuer_is_refused() {
    let (issuer, verifier) = setup().await;
    issuer.set_discovery_issuer(Some("https://evil.example".into()));
    let e = refused(&verifier, &issuer.sign(Alg::ES256, &gh(&issuer))).await;
    assert_eq!(e.code(), ErrorCode::IssuerUnavailable);
}

#[tokio::test]
async fn untrusted_tls_certificate_is_refused() {
    let issuer = TestIssuer::start().await;
    let mut cfg = config(&issuer);
    cfg.extra_roots = None;
    let verifier = OidcVerifier::new(vec![cfg]).unwrap();
    let e = refused(&verifier, &issuer.sign(Alg::ES256, &gh(&issuer))).await;
    assert_eq!(e.code(), ErrorCode::IssuerUnavailable);
    assert_eq!(issuer.jwks_fetches(), 0);
    // The refusal says it is the certificate, and which key trusts its CA.
    let text = e.to_string();
    assert!(text.contains("certificate refused"), "{text}");
    assert!(text.contains("extra_roots"), "{text}");
}

#[tokio::test]
async fn static_jwks_serves_air_gapped_issuers() {
    let issuer = TestIssuer::start().await;
    // Fetch the JWKS once by hand, as an operator would copy it over.
    let online = OidcVerifier::new(vec![config(&issuer)]).unwrap();
    online
        .verify(&issuer.sign(Alg::ES256, &gh(&issuer)), now())
        .await
        .unwrap();
    let jwks = fetch_jwks(&issuer).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks).unwrap();
    let mut cfg = IssuerConfig::new(issuer.issuer(), vec![AUD.into()]);
    cfg.static_jwks = Some(path);
    let offline = OidcVerifier::new(vec![cfg]).unwrap();
    let before = issuer.jwks_fetches();
    offline
        .verify(&issuer.sign(Alg::RS256, &gh(&issuer)), now())
        .await
        .unwrap();
    let e = refused(
        &offline,
        &issuer.sign_with_unpublished_key(Alg::RS256, &gh(&issuer)),
    )
    .await;
    assert_eq!(e.code(), ErrorCode::TokenKeyUnknown);
    assert_eq!(issuer.jwks_fetches(), before, "a static JWKS never fetches");
}

#[test]
fn configuration_is_checked_at_start() {
    assert!(
        OidcVerifier::new(vec![IssuerConfig::new(
            "http://issuer.example",
            vec!["a".into()]
        )])
        .is_err()
    );
    assert!(OidcVerifier::new(vec![IssuerConfig::new("https://issuer.example", vec![])]).is_err());
    let mut local = IssuerConfig::new("http://127.0.0.1:1", vec!["a".into()]);
    local.allow_insecure_http = true;
    assert!(OidcVerifier::new(vec![local]).is_ok());
    let mut remote = IssuerConfig::new("http://issuer.example", vec!["a".into()]);
    remote.allow_insecure_http = true;
    assert!(OidcVerifier::new(vec![remote]).is_err());
}

async fn fetch_jwks(issuer: &TestIssuer) -> Vec<u8> {
    let ca = std::fs::read(issuer.ca_pem_path()).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&ca).unwrap())
        .build()
        .unwrap();
    client
        .get(format!("{}/jwks", issuer.issuer()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

/// `n − s` for a P-256 signature's `s` (big-endian, 32 bytes).
fn p256_negate(s: &[u8]) -> Vec<u8> {
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63,
        0x25, 0x51,
    ];
    let mut out = vec![0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = i16::from(N[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        if d < 0 {
            d += 256;
        }
        out[i] = d as u8;
    }
    out
}

#[tokio::test]
async fn a_token_without_jti_is_single_use_whatever_its_signature_encoding() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (issuer, verifier) = setup().await;
    let mut claims = gh(&issuer);
    claims.as_object_mut().unwrap().remove("jti");
    let token = issuer.sign(Alg::ES256, &claims);
    let first = verifier.verify(&token, now()).await.unwrap();
    assert!(
        first.replay_key.starts_with("sha256:"),
        "{}",
        first.replay_key
    );
    // The other valid encoding of the same ECDSA signature: (r, n − s).
    let (signed, sig) = token.rsplit_once('.').unwrap();
    let raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
    let mut twin = raw[..32].to_vec();
    twin.extend(p256_negate(&raw[32..]));
    let twin = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(twin));
    assert_ne!(twin, token);
    let second = verifier.verify(&twin, now()).await.unwrap();
    assert_eq!(
        second.replay_key, first.replay_key,
        "the twin must collide with the original in the replay cache"
    );
    assert_ne!(second.digest, first.digest);
}

#[tokio::test]
async fn an_issuer_down_at_start_is_fetched_at_most_once_per_interval() {
    let (issuer, verifier) = setup().await; // min_refresh_interval = 1 h
    issuer.set_delay(Duration::from_secs(30));
    let first = refused(&verifier, &issuer.sign(Alg::ES256, &gh(&issuer))).await;
    assert_eq!(first.code(), ErrorCode::IssuerUnavailable, "{first}");
    // Tokens naming the issuer (signed or not) no longer reach it: each is
    // refused with the cause of the last failure.
    for token in [
        issuer.sign(Alg::ES256, &gh(&issuer)),
        issuer.unsigned(&gh(&issuer)),
        issuer.sign_with_unpublished_key(Alg::RS256, &gh(&issuer)),
    ] {
        let e = refused(&verifier, &token).await;
        if e.code() == ErrorCode::TokenAlgorithmRefused {
            continue; // `none` is refused before any key is looked for
        }
        assert_eq!(e.code(), ErrorCode::IssuerUnavailable, "{e}");
        assert!(e.to_string().contains("last fetch failed (GET "), "{e}");
    }
    assert_eq!(
        verifier.stats()[0].failures,
        1,
        "one fetch attempt, not one per token"
    );
}

#[tokio::test]
async fn issuer_failures_name_their_cause() {
    // A certificate Herald does not trust.
    let issuer = TestIssuer::start().await;
    let mut cfg = config(&issuer);
    cfg.extra_roots = None;
    let verifier = OidcVerifier::new(vec![cfg]).unwrap();
    let e = refused(&verifier, &issuer.sign(Alg::ES256, &gh(&issuer))).await;
    assert_eq!(e.code(), ErrorCode::IssuerUnavailable, "{e}");
    let text = e.to_string();
    assert!(text.contains("certificate refused"), "{e}");
    // And why: rustls's reason, and the setting that fixes it.
    assert!(text.contains("UnknownIssuer"), "{e}");
    assert!(text.contains("extra_roots"), "{e}");
    // Nothing listening.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let url = format!("https://127.0.0.1:{port}");
    let mut cfg = IssuerConfig::new(&url, vec![AUD.into()]);
    cfg.http_timeout = Duration::from_millis(500);
    let dead = OidcVerifier::new(vec![cfg]).unwrap();
    let mut claims = gh(&issuer);
    claims["iss"] = json!(url);
    let e = refused(&dead, &issuer.sign(Alg::ES256, &claims)).await;
    assert!(e.to_string().to_lowercase().contains("refused"), "{e}");
    // A timeout says so.
    issuer.set_delay(Duration::from_secs(30));
    let slow = OidcVerifier::new(vec![config(&issuer)]).unwrap();
    let e = refused(&slow, &issuer.sign(Alg::ES256, &gh(&issuer))).await;
    assert!(e.to_string().contains("timed out"), "{e}");
    issuer.set_delay(Duration::ZERO);
    // A document that is not JSON (an HTML error page served with 200)
    // names the document and says so, for discovery and for the JWKS.
    for (doc, path) in [
        (Document::Discovery, "/.well-known/openid-configuration"),
        (Document::Jwks, "/jwks"),
    ] {
        issuer.set_not_json(Some(doc));
        let fresh = OidcVerifier::new(vec![config(&issuer)]).unwrap();
        let e = refused(&fresh, &issuer.sign(Alg::ES256, &gh(&issuer))).await;
        assert_eq!(e.code(), ErrorCode::IssuerUnavailable, "{e}");
        let text = e.to_string();
        assert!(
            text.contains(&format!("{}{path}: not JSON", issuer.issuer())),
            "{e}"
        );
    }
    issuer.set_not_json(None);
    let fresh = OidcVerifier::new(vec![config(&issuer)]).unwrap();
    fresh
        .verify(&issuer.sign(Alg::ES256, &gh(&issuer)), now())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_token_without_kid_is_tried_against_a_few_keys_only() {
    let (issuer, verifier) = setup().await;
    let kidless = |issuer: &TestIssuer| {
        issuer.sign_with_header(
            Alg::ES256,
            &json!({"alg": "ES256", "typ": "JWT"}),
            &gh(issuer),
        )
    };
    issuer.rotate(true);
    // Two keys published: the current one is among the few tried.
    verifier.verify(&kidless(&issuer), now()).await.unwrap();
    let mut cfg = config(&issuer);
    cfg.min_refresh_interval = Duration::ZERO;
    for _ in 0..5 {
        issuer.rotate(true);
    }
    let fresh = OidcVerifier::new(vec![cfg]).unwrap();
    // Seven keys: the current one (the last published) is beyond the cap.
    let e = refused(&fresh, &kidless(&issuer)).await;
    assert_eq!(e.code(), ErrorCode::TokenSignatureInvalid, "{e}");
    // With its kid it verifies.
    fresh
        .verify(&issuer.sign(Alg::ES256, &gh(&issuer)), now())
        .await
        .unwrap();
}
