//! The one issuer: an authorized [`Grant`] for a decided identity becomes
//! the credential and the record the store keeps of it — X.509 SVIDs,
//! JWT-SVIDs and session credentials alike, each record carrying its
//! lineage.

use herald_ca::csr::{MAX_CSR_LEN, verify_csr};
use herald_ca::{IssuedX509, JwtSvidClaims, X509Grant, sha256_hex};
use herald_cloud_creds::{MintRequest, SessionCredentials};
use herald_core::{AuditEvent, ErrorCode, Origin};
use herald_policy::{Decision, Grant};
use herald_store::IssuedCredential;
use time::OffsetDateTime;

use crate::decision::{Parent, RequestedCredential};
use crate::status::Refusal;
use crate::{CaState, Shared};

/// Longest session name AWS accepts.
const SESSION_NAME_MAX: usize = 64;

/// An issued credential.
#[derive(Debug)]
pub enum Issued {
    /// An X.509 SVID and the trust anchors.
    X509 {
        /// The certificate and its serial.
        issued: IssuedX509,
        /// X.509 authorities, DER.
        bundle: Vec<Vec<u8>>,
        /// Bundles of the foreign trust domains the grant federates with.
        federated: Vec<herald_proto::v1::TrustBundle>,
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

/// Where a new credential sits: how its lineage began and what it
/// descends from (`None`: it is a root, issued on fresh evidence).
#[derive(Debug, Clone)]
pub struct Lineage {
    /// How the lineage began.
    pub origin: Origin,
    /// The credential presented to get this one.
    pub parent: Option<Parent>,
}

/// Checks an AWS-style session name: 2–64 of `[\w+=,.@-]`.
pub fn valid_session_name(name: &str) -> bool {
    (2..=SESSION_NAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b))
}

/// Signs the credential `grant` allows for `decision`'s identity, from the
/// material `wanted` carries (the CSR, the session name), and builds its
/// record: serial, validity, evidence (from the audit event), policy,
/// lineage.
#[allow(clippy::too_many_arguments)]
pub(crate) fn issue(
    shared: &Shared,
    ca: &CaState,
    decision: &Decision,
    grant: &Grant,
    wanted: &RequestedCredential,
    lineage: &Lineage,
    audit: &AuditEvent,
    now: i64,
) -> Result<(Issued, IssuedCredential), Refusal> {
    let record = |kind: &str,
                  serial: String,
                  not_before: i64,
                  not_after: i64,
                  key_digest: String,
                  key_id: &str| {
        let (root_serial, root_at) = match &lineage.parent {
            Some(p) => (p.root_serial.clone(), p.root_at),
            None => (serial.clone(), now),
        };
        IssuedCredential {
            serial,
            kind: kind.into(),
            spiffe_id: decision.spiffe_id.to_string(),
            not_before,
            not_after,
            issued_at: now,
            evidence_type: audit
                .evidence_type
                .map_or_else(String::new, |e| e.as_str().to_owned()),
            evidence_digest: audit.evidence_digest.clone(),
            policy: Some(decision.policy.clone()),
            parent_serial: lineage.parent.as_ref().map(|p| p.serial.clone()),
            public_key_sha256: key_digest,
            ca_key_id: key_id.to_owned(),
            origin: Some(lineage.origin),
            root_serial,
            root_at,
            cert_sha256: None,
        }
    };
    // Checked here, on every credential kind, because this is the one
    // place every identity passes: policies are also refused at load when
    // they name a reserved ID, but a prefix of the whole trust domain or a
    // claim-built ID can still land on one.
    if decision.spiffe_id.is_reserved() {
        return Err(Refusal::new(
            ErrorCode::SpiffeIdReserved,
            format!(
                "{} is reserved for Herald's own services",
                decision.spiffe_id
            ),
        ));
    }
    match (grant, wanted) {
        (Grant::X509Svid { ttl, dns_names }, RequestedCredential::X509Svid { csr, .. }) => {
            if csr.len() > MAX_CSR_LEN {
                return Err(Refusal::new(
                    ErrorCode::RequestTooLarge,
                    "CSR exceeds its size cap",
                ));
            }
            if let Some(name) = shared.reserved_dns_name(dns_names) {
                return Err(Refusal::new(
                    ErrorCode::DnsNameReserved,
                    format!("{name} is one of the server's own DNS names"),
                ));
            }
            let csr = verify_csr(csr)?;
            if lineage
                .parent
                .as_ref()
                .is_some_and(|p| p.spki_sha256 == csr.spki_sha256)
            {
                return Err(Refusal::new(
                    ErrorCode::RenewSameKey,
                    "the CSR reuses the key of the SVID presented for it",
                ));
            }
            let issued = ca.ca.issue_x509_svid(
                &csr,
                &X509Grant {
                    spiffe_id: decision.spiffe_id.clone(),
                    ttl: *ttl,
                    dns_names: dns_names.clone(),
                },
                now,
            )?;
            let rec = IssuedCredential {
                cert_sha256: Some(sha256_hex(&issued.cert_der)),
                ..record(
                    "x509_svid",
                    issued.serial_hex.clone(),
                    issued.not_before,
                    issued.not_after,
                    csr.spki_sha256.clone(),
                    &issued.ca_key_id,
                )
            };
            Ok((
                Issued::X509 {
                    issued,
                    bundle: ca.bundle.x509_authorities.clone(),
                    federated: crate::federation::bundle_messages(
                        shared,
                        decision
                            .grants
                            .x509_svid
                            .iter()
                            .flat_map(|g| &g.federates_with),
                    ),
                },
                rec,
            ))
        }
        (Grant::JwtSvid { ttl, audiences }, RequestedCredential::JwtSvid { .. }) => {
            let serial = herald_ca::Serial::generate()?.to_hex();
            let expires_at = now + ttl.as_secs() as i64;
            let token = ca.jwt.sign_jwt_svid(&JwtSvidClaims {
                spiffe_id: decision.spiffe_id.clone(),
                audiences: audiences.clone(),
                issued_at: now,
                expires_at,
                jti: serial.clone(),
                issuer: Some(shared.config.jwt_issuer()),
            })?;
            let rec = record(
                "jwt_svid",
                serial,
                now,
                expires_at,
                String::new(),
                ca.jwt.kid(),
            );
            Ok((Issued::Jwt { token }, rec))
        }
        (
            Grant::Cloud {
                ttl,
                role_arn,
                scope,
            },
            RequestedCredential::Cloud { session_name, .. },
        ) => {
            if !valid_session_name(session_name) {
                return Err(Refusal::new(
                    ErrorCode::InvalidRequest,
                    "RoleSessionName must be 2-64 characters of [A-Za-z0-9_+=,.@-]",
                ));
            }
            let serial = herald_ca::Serial::generate()?.to_hex();
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
                    scope: scope.clone(),
                    policy: decision.policy.clone(),
                    serial: serial.clone(),
                    issued_at: at(now)?,
                    expires_at: at(expires_at)?,
                })
                .map_err(|e| {
                    tracing::error!(error = %e, "minting session credentials failed");
                    Refusal::new(ErrorCode::Internal, "minting session credentials failed")
                })?;
            let rec = record(
                "cloud_session",
                serial,
                now,
                expires_at,
                sha256_hex(creds.access_key_id.as_bytes()),
                keyring.active_id(),
            );
            Ok((
                Issued::Cloud {
                    creds,
                    role_arn: role_arn.clone(),
                    session_name: session_name.clone(),
                },
                rec,
            ))
        }
        _ => Err(Refusal::new(
            ErrorCode::Internal,
            "the grant does not match the credential asked for",
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use herald_core::{SpiffeId, TrustDomain};

    use super::*;
    use crate::config::ServerConfig;

    /// The server's own DNS names are refused when a credential is signed,
    /// whatever grant carries them. Policies naming them are refused at
    /// load, so no policy the server loaded reaches this: the check stands
    /// behind that one (a set loaded with other `tls.dns_names`), and it
    /// compares DNS names as DNS does — any case, with or without the
    /// trailing dot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_grant_naming_the_servers_dns_names_is_refused_at_issue() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let kek = dir.path().join("kek");
        std::fs::write(&kek, "4b".repeat(32)).unwrap();
        std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
        let td = TrustDomain::new("issue.herald.test").unwrap();
        let mut cfg = ServerConfig::new(td, dir.path().join("data"));
        cfg.listen.grpc = "127.0.0.1:0".parse().unwrap();
        cfg.listen.http = "127.0.0.1:0".parse().unwrap();
        cfg.listen.https = None;
        cfg.ca.key_encryption_key_file = Some(kek);
        cfg.tls.dns_names = vec!["herald.example.org".into(), "localhost".into()];
        let server = crate::start(cfg).await.unwrap();
        let shared = &server.shared;
        let ca = shared.ca();
        let decision = Decision {
            policy: "web".into(),
            spiffe_id: SpiffeId::parse("spiffe://issue.herald.test/web").unwrap(),
            grants: herald_policy::Grants::default(),
            factors: Vec::new(),
            golden_set: None,
            origin: Origin::Bootstrap,
        };
        let lineage = Lineage {
            origin: Origin::Bootstrap,
            parent: None,
        };
        let audit = AuditEvent::new("x509_svid.mint", "test");
        for (names, reserved) in [
            (&["web.internal"][..], None),
            (
                &["web.internal", "HERALD.Example.org."],
                Some("HERALD.Example.org."),
            ),
            (&["LocalHost"], Some("LocalHost")),
        ] {
            let grant = Grant::X509Svid {
                ttl: Duration::from_secs(600),
                dns_names: names.iter().map(|n| n.to_string()).collect(),
            };
            let wanted = RequestedCredential::X509Svid {
                csr: herald_client::keys::generate_key_and_csr().unwrap().csr_der,
                ttl: None,
            };
            let now = crate::unix_now();
            let result = issue(
                shared, &ca, &decision, &grant, &wanted, &lineage, &audit, now,
            );
            match (result, reserved) {
                (Ok((Issued::X509 { issued, .. }, record)), None) => {
                    assert_eq!(record.spiffe_id, "spiffe://issue.herald.test/web");
                    assert!(!issued.cert_der.is_empty());
                }
                (Err(e), Some(name)) => {
                    assert_eq!(e.code, ErrorCode::DnsNameReserved, "{names:?}: {e:?}");
                    assert!(e.message.contains(name), "{e:?}");
                }
                (other, _) => panic!("{names:?}: {:?}", other.map(|(_, r)| r.serial)),
            }
        }
        server.shutdown().await;
    }
}
