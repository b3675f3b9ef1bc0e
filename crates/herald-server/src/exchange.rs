//! Token exchange: the one decision path behind gRPC `ExchangeToken`,
//! RFC 8693 `POST /v1/token` and AWS STS `AssumeRoleWithWebIdentity`.
//!
//! verify the OIDC token → verify any second factor → evaluate policy →
//! check the requested credential against the grant (kind, role, audience,
//! TTL cap, session policy within the role) → issue → commit (replay key,
//! join token use, issued record and audit record in one transaction) →
//! respond. Transports only translate requests and refusals; every refusal
//! is audited here, with its stable code, before the caller sees it.

use std::time::Duration;

use herald_ca::csr::{MAX_CSR_LEN, verify_csr};
use herald_ca::svid::verify_x509_svid;
use herald_ca::{IssuedX509, JwtSvidClaims, X509Grant, sha256_hex};
use herald_cloud_creds::{MintRequest, SessionCredentials};
use herald_core::{AuditEvent, ErrorCode, EvidenceType, ScopePolicy, SpiffeId};
use herald_policy::{Decision, Evidence, JoinTokenEvidence, OidcEvidence, SvidEvidence};
use herald_store::{Commit, Committed, IssuedCredential, ReplayKey};
use time::OffsetDateTime;

use crate::join_token::{self, MAX_TOKEN_LEN};
use crate::status::Refusal;
use crate::{Shared, unix_now};

/// Longest session name AWS accepts.
const SESSION_NAME_MAX: usize = 64;
/// Most audiences one JWT-SVID may carry.
const MAX_AUDIENCES: usize = 8;

/// What the caller wants in exchange for its token.
#[derive(Debug, Clone)]
pub enum RequestedCredential {
    /// An X.509 SVID for the CSR's key.
    X509Svid {
        /// PKCS#10 DER.
        csr: Vec<u8>,
    },
    /// A JWT-SVID for these audiences.
    JwtSvid {
        /// At least one.
        audiences: Vec<String>,
    },
    /// Cloud-style session credentials for a role.
    Cloud {
        /// The role; must be granted.
        role_arn: String,
        /// AWS-style session name.
        session_name: String,
        /// Optional narrower session policy (JSON).
        session_policy: Option<String>,
    },
}

impl RequestedCredential {
    fn action(&self) -> &'static str {
        match self {
            Self::X509Svid { .. } => "exchange.x509_svid",
            Self::JwtSvid { .. } => "exchange.jwt_svid",
            Self::Cloud { .. } => "exchange.cloud_credentials",
        }
    }
}

/// One exchange request, transport-neutral.
#[derive(Debug, Clone)]
pub struct ExchangeRequest {
    /// The OIDC ID token.
    pub subject_token: String,
    /// The credential wanted.
    pub credential: RequestedCredential,
    /// Optional second factor: a join token.
    pub join_token: Option<String>,
    /// Optional second factor: the caller's SVID chain from mTLS.
    pub peer_certs: Option<Vec<Vec<u8>>>,
    /// Requested lifetime; `None` = the default (capped by policy).
    pub ttl: Option<Duration>,
    /// Who is asking, before evidence says more (peer address, transport).
    pub caller: String,
    /// The caller's address, for per-caller rate limiting.
    pub peer_ip: Option<std::net::IpAddr>,
    /// Which API the request came through (`grpc`, `rfc8693`, `sts`).
    pub transport: &'static str,
}

/// The issued credential.
#[derive(Debug)]
pub enum Issued {
    /// An X.509 SVID and the trust anchors.
    X509 {
        /// The certificate and its serial.
        issued: IssuedX509,
        /// X.509 authorities, DER.
        bundle: Vec<Vec<u8>>,
    },
    /// A JWT-SVID.
    Jwt {
        /// JWS compact.
        token: String,
    },
    /// Session credentials.
    Cloud {
        /// The credentials.
        creds: SessionCredentials,
        /// The role assumed.
        role_arn: String,
        /// The session name.
        session_name: String,
    },
}

/// A granted exchange.
#[derive(Debug)]
pub struct Exchanged {
    /// The policy that granted it.
    pub policy: String,
    /// The SPIFFE ID granted.
    pub spiffe_id: SpiffeId,
    /// The token's issuer.
    pub issuer: String,
    /// The token's subject.
    pub subject: String,
    /// The token's audience that Herald accepted.
    pub audience: String,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
    /// The credential.
    pub issued: Issued,
}

/// Runs one exchange. Refusals come back already audited.
pub async fn exchange(shared: &Shared, req: ExchangeRequest) -> Result<Exchanged, Refusal> {
    let started = std::time::Instant::now();
    let mut audit = AuditEvent::new(req.credential.action(), req.caller.clone());
    audit.evidence_type = Some(EvidenceType::Oidc);
    let span = tracing::info_span!(
        "exchange",
        transport = req.transport,
        action = req.credential.action(),
        evidence_type = tracing::field::Empty,
        policy = tracing::field::Empty,
        outcome = tracing::field::Empty,
        reason = tracing::field::Empty,
        latency_ms = tracing::field::Empty,
    );
    let result =
        tracing::Instrument::instrument(decide_and_issue(shared, req, &mut audit), span.clone())
            .await;
    let (result, event) = match result {
        Ok(done) => (Ok(done), audit),
        Err(r) => {
            let event = audit.deny(r.code);
            if !r.audited
                && let Err(e) = shared.store.audit(event.clone()).await
            {
                tracing::error!(error = %e, "could not write the audit record of a refusal");
            }
            (Err(Refusal { audited: true, ..r }), event)
        }
    };
    crate::metrics::record_decision(shared, &span, &event, started);
    result
}

async fn decide_and_issue(
    shared: &Shared,
    req: ExchangeRequest,
    audit: &mut AuditEvent,
) -> Result<Exchanged, Refusal> {
    let exchange = shared.exchange.as_ref().ok_or_else(|| {
        Refusal::new(
            ErrorCode::PolicyDenied,
            "token exchange is not configured on this server (no OIDC issuers or policies)",
        )
    })?;
    if req
        .join_token
        .as_ref()
        .is_some_and(|t| t.len() > MAX_TOKEN_LEN)
    {
        return Err(Refusal::new(
            ErrorCode::RequestTooLarge,
            "join token exceeds its size cap",
        ));
    }
    let now = unix_now();

    // 0. Per-caller rate limit, before any signature is checked or any
    //    JWKS fetched on the caller's behalf.
    if let Some(ip) = req.peer_ip
        && !shared.limiter.allow(ip, std::time::Instant::now())
    {
        return Err(Refusal::new(
            ErrorCode::RateLimited,
            "too many requests from this address; retry later",
        ));
    }

    // 1. Evidence: the OIDC token.
    let token = exchange
        .verifier
        .verify(&req.subject_token, now)
        .await
        .map_err(|e| Refusal::new(e.code(), e.to_string()))?;
    audit.caller = format!("oidc:{}#{}", token.issuer, token.subject);
    let mut digests = vec![token.digest.clone()];

    // 2. Evidence: an optional second factor.
    let mut join_hash = None;
    let mut evidence = Evidence {
        oidc: Some(OidcEvidence {
            issuer: token.issuer.clone(),
            audiences: token.audiences.clone(),
            claims: token.claims.clone(),
        }),
        tpm: None,
        join_token: None,
        x509_svid: None,
    };
    if let Some(text) = &req.join_token {
        let hash = join_token::parse(text).ok_or_else(|| {
            Refusal::new(ErrorCode::JoinTokenMalformed, "not a Herald join token")
        })?;
        audit.evidence_type = Some(EvidenceType::OidcAndJoinToken);
        digests.push(hex::encode(hash));
        let record = join_token::lookup(&shared.store, &hash).await?;
        let spiffe_id = join_token::usable(&record, now)?;
        evidence.join_token = Some(JoinTokenEvidence { spiffe_id });
        join_hash = Some(hash);
    }
    let ca = shared.ca();
    if let Some(chain) = req.peer_certs.as_ref().filter(|c| !c.is_empty()) {
        let svid = verify_x509_svid(
            chain,
            &ca.bundle.x509_authorities,
            ca.ca.trust_domain(),
            now,
        )
        .map_err(|e| Refusal::new(e.code(), e.to_string()))?;
        if shared.store.is_revoked(&svid.serial_hex).await? {
            return Err(Refusal::new(
                ErrorCode::SvidRevoked,
                "the presented SVID has been revoked",
            ));
        }
        audit.evidence_type = Some(if join_hash.is_some() {
            // Three factors are recorded by their strongest pair: the
            // SVID and join token are both second factors to the token.
            EvidenceType::OidcAndJoinToken
        } else {
            EvidenceType::OidcAndX509Svid
        });
        digests.push(sha256_hex(&chain[0]));
        evidence.x509_svid = Some(SvidEvidence {
            spiffe_id: svid.spiffe_id,
        });
    }
    audit.evidence_digest = Some(digests.join("+"));

    // 3. Policy.
    let policies = exchange.policies.current();
    let decision = policies.evaluate(&evidence).map_err(|d| {
        audit.policy = d.policy.clone();
        Refusal::new(d.code, d.reason)
    })?;
    audit.policy = Some(decision.policy.clone());
    audit.spiffe_id = Some(decision.spiffe_id.to_string());

    // 4. The requested credential against the grant, then issue.
    let replay = ReplayKey {
        key: token.replay_key.clone(),
        expires_at: token.replay_until(exchange.verifier.leeway_secs(&token.issuer)),
    };
    let audience = token.audiences.first().cloned().unwrap_or_default();
    let (issued, record, expires_at) = issue(shared, &ca, &decision, &req, audit, now).await?;
    audit.serial = Some(record.serial.clone());
    let commit = Commit {
        consume_join_token: join_hash,
        consume_replay: Some(replay),
        now_s: now,
        issued: Some(record),
        audit: audit.clone(),
    };
    match shared.store.commit(commit).await? {
        Committed::Done { .. } => Ok(Exchanged {
            policy: decision.policy,
            spiffe_id: decision.spiffe_id,
            issuer: token.issuer,
            subject: token.subject,
            audience,
            expires_at,
            issued,
        }),
        Committed::TokenRejected(code) => Err(Refusal {
            code,
            message: match code {
                ErrorCode::TokenReplayed => {
                    "the token was already used (tokens are single-use)".into()
                }
                _ => "the join token can no longer be used".into(),
            },
            audited: true,
        }),
    }
}

/// Picks the lifetime: the request's (refused above the cap) or the default
/// (clamped to the cap).
fn lifetime(
    requested: Option<Duration>,
    default: Duration,
    cap: Duration,
) -> Result<Duration, Refusal> {
    match requested {
        Some(t) if t > cap => Err(Refusal::new(
            ErrorCode::TtlTooLong,
            format!(
                "requested lifetime {}s exceeds the policy's cap of {}s",
                t.as_secs(),
                cap.as_secs()
            ),
        )),
        Some(t) if t.is_zero() => Err(Refusal::new(
            ErrorCode::InvalidRequest,
            "lifetime must be positive",
        )),
        Some(t) => Ok(t),
        None => Ok(default.min(cap)),
    }
}

fn random_serial() -> Result<String, Refusal> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b)
        .map_err(|_| Refusal::new(ErrorCode::Internal, "random source failed"))?;
    Ok(hex::encode(b))
}

/// What one issuance records besides its evidence.
struct NewRecord<'a> {
    kind: &'a str,
    serial: String,
    not_before: i64,
    not_after: i64,
    /// SHA-256 of the public key (X.509) or access key id (cloud); empty for JWTs.
    key_digest: String,
    /// The signing or sealing key.
    key_id: &'a str,
}

fn credential_record(
    r: NewRecord<'_>,
    spiffe_id: &SpiffeId,
    audit: &AuditEvent,
    now: i64,
) -> IssuedCredential {
    IssuedCredential {
        serial: r.serial,
        kind: r.kind.into(),
        spiffe_id: spiffe_id.to_string(),
        not_before: r.not_before,
        not_after: r.not_after,
        issued_at: now,
        evidence_type: audit
            .evidence_type
            .map_or_else(String::new, |e| e.as_str().to_owned()),
        evidence_digest: audit.evidence_digest.clone(),
        policy: audit.policy.clone(),
        parent_serial: None,
        public_key_sha256: r.key_digest,
        ca_key_id: r.key_id.to_owned(),
    }
}

/// Checks an AWS-style session name: 2–64 of `[\w+=,.@-]`.
pub fn valid_session_name(name: &str) -> bool {
    (2..=SESSION_NAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b))
}

async fn issue(
    shared: &Shared,
    ca: &crate::CaState,
    decision: &Decision,
    req: &ExchangeRequest,
    audit: &AuditEvent,
    now: i64,
) -> Result<(Issued, IssuedCredential, i64), Refusal> {
    let grants = &decision.grants;
    match &req.credential {
        RequestedCredential::X509Svid { csr } => {
            let grant = grants.x509_svid.as_ref().ok_or_else(|| {
                Refusal::new(
                    ErrorCode::CredentialNotGranted,
                    format!("policy {} grants no X.509 SVID", decision.policy),
                )
            })?;
            if csr.len() > MAX_CSR_LEN {
                return Err(Refusal::new(
                    ErrorCode::RequestTooLarge,
                    "CSR exceeds its size cap",
                ));
            }
            let ttl = lifetime(req.ttl, shared.config.svid.x509_ttl, grant.max_ttl)?;
            let csr = verify_csr(csr)?;
            let issued = ca.ca.issue_x509_svid(
                &csr,
                &X509Grant {
                    spiffe_id: decision.spiffe_id.clone(),
                    ttl,
                    dns_names: Vec::new(),
                },
                now,
            )?;
            let record = credential_record(
                NewRecord {
                    kind: "x509_svid",
                    serial: issued.serial_hex.clone(),
                    not_before: issued.not_before,
                    not_after: issued.not_after,
                    key_digest: csr.spki_sha256.clone(),
                    key_id: &issued.ca_key_id,
                },
                &decision.spiffe_id,
                audit,
                now,
            );
            let expires_at = issued.not_after;
            Ok((
                Issued::X509 {
                    issued,
                    bundle: ca.bundle.x509_authorities.clone(),
                },
                record,
                expires_at,
            ))
        }
        RequestedCredential::JwtSvid { audiences } => {
            let grant = grants.jwt_svid.as_ref().ok_or_else(|| {
                Refusal::new(
                    ErrorCode::CredentialNotGranted,
                    format!("policy {} grants no JWT-SVID", decision.policy),
                )
            })?;
            if audiences.is_empty() || audiences.len() > MAX_AUDIENCES {
                return Err(Refusal::new(
                    ErrorCode::InvalidRequest,
                    format!("a JWT-SVID needs 1 to {MAX_AUDIENCES} audiences"),
                ));
            }
            if let Some(a) = audiences.iter().find(|a| !grant.audiences.contains(a)) {
                return Err(Refusal::new(
                    ErrorCode::AudienceNotGranted,
                    format!("policy {} does not grant audience {a:?}", decision.policy),
                ));
            }
            let ttl = lifetime(req.ttl, shared.config.jwt.default_ttl, grant.max_ttl)?;
            let serial = random_serial()?;
            let expires_at = now + ttl.as_secs() as i64;
            let token = ca.jwt.sign_jwt_svid(&JwtSvidClaims {
                spiffe_id: decision.spiffe_id.clone(),
                audiences: audiences.clone(),
                issued_at: now,
                expires_at,
                jti: serial.clone(),
                issuer: Some(shared.config.jwt_issuer()),
            })?;
            let record = credential_record(
                NewRecord {
                    kind: "jwt_svid",
                    serial,
                    not_before: now,
                    not_after: expires_at,
                    key_digest: String::new(),
                    key_id: ca.jwt.kid(),
                },
                &decision.spiffe_id,
                audit,
                now,
            );
            Ok((Issued::Jwt { token }, record, expires_at))
        }
        RequestedCredential::Cloud {
            role_arn,
            session_name,
            session_policy,
        } => {
            if !valid_session_name(session_name) {
                return Err(Refusal::new(
                    ErrorCode::InvalidRequest,
                    "RoleSessionName must be 2-64 characters of [A-Za-z0-9_+=,.@-]",
                ));
            }
            let role = grants.cloud_role(role_arn).ok_or_else(|| {
                let code = if grants.cloud_roles.is_empty() {
                    ErrorCode::CredentialNotGranted
                } else {
                    ErrorCode::RoleNotGranted
                };
                Refusal::new(
                    code,
                    format!("policy {} does not grant role {role_arn}", decision.policy),
                )
            })?;
            let ttl = lifetime(req.ttl, shared.config.cloud.default_ttl, role.max_ttl)?;
            let scope = match session_policy {
                None => role.scope.clone(),
                Some(text) => {
                    let requested = ScopePolicy::from_json_str(text).map_err(|e| {
                        Refusal::new(ErrorCode::SessionPolicyMalformed, e.to_string())
                    })?;
                    if !requested.is_within(&role.scope) {
                        return Err(Refusal::new(
                            ErrorCode::SessionPolicyTooBroad,
                            "the session policy allows actions or resources outside the role's scope",
                        ));
                    }
                    requested
                }
            };
            let serial = random_serial()?;
            let expires_at = now + ttl.as_secs() as i64;
            let at = |s: i64| {
                OffsetDateTime::from_unix_timestamp(s)
                    .map_err(|_| Refusal::new(ErrorCode::Internal, "time out of range"))
            };
            let keyring = ca.sessions();
            let creds = keyring
                .mint(&MintRequest {
                    spiffe_id: decision.spiffe_id.to_string(),
                    role_arn: role_arn.clone(),
                    session_name: session_name.clone(),
                    scope,
                    policy: decision.policy.clone(),
                    serial: serial.clone(),
                    issued_at: at(now)?,
                    expires_at: at(expires_at)?,
                })
                .map_err(|e| {
                    tracing::error!(error = %e, "minting session credentials failed");
                    Refusal::new(ErrorCode::Internal, "minting session credentials failed")
                })?;
            let record = credential_record(
                NewRecord {
                    kind: "cloud_session",
                    serial,
                    not_before: now,
                    not_after: expires_at,
                    key_digest: sha256_hex(creds.access_key_id.as_bytes()),
                    key_id: keyring.active_id(),
                },
                &decision.spiffe_id,
                audit,
                now,
            );
            Ok((
                Issued::Cloud {
                    creds,
                    role_arn: role_arn.clone(),
                    session_name: session_name.clone(),
                },
                record,
                expires_at,
            ))
        }
    }
}
