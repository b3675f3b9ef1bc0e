//! Stable error codes.
//!
//! Every refusal Herald makes carries one of these codes: in the gRPC status
//! (metadata `herald-error-code`), in the HTTP error body, in the audit record
//! and in the CLI's one-line error. The string forms are an API: never rename
//! one, only add.

use std::fmt;

/// The broad class of a failure, which decides the transport status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request itself is malformed.
    InvalidArgument,
    /// The evidence did not authenticate the caller.
    Unauthenticated,
    /// The caller is known but not allowed this.
    PermissionDenied,
    /// The request exceeds a size or rate cap.
    ResourceExhausted,
    /// Something on Herald's side failed.
    Internal,
    /// A dependency (database, issuer) is unavailable; retry later.
    Unavailable,
}

macro_rules! error_codes {
    ($($variant:ident => $code:literal, $class:ident, $doc:literal;)*) => {
        /// A stable, machine-readable reason for a refusal or failure.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $(#[doc = $doc] $variant,)*
        }

        impl ErrorCode {
            /// Every code, for documentation and exhaustive tests.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The stable string form, e.g. `join_token_used`.
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)* }
            }

            /// The class, which decides the gRPC / HTTP status.
            pub fn class(self) -> ErrorClass {
                match self { $(ErrorCode::$variant => ErrorClass::$class,)* }
            }

            /// Parses the stable string form.
            pub fn from_code(s: &str) -> Option<Self> {
                match s { $($code => Some(ErrorCode::$variant),)* _ => None }
            }
        }
    };
}

error_codes! {
    InvalidRequest => "invalid_request", InvalidArgument, "A required field is missing or malformed.";
    RequestTooLarge => "request_too_large", ResourceExhausted, "A field or message exceeds its size cap.";
    RequestTimeout => "request_timeout", InvalidArgument, "The request's body did not arrive within the listener's deadline (listen.body_read_timeout); the connection was closed.";
    JoinTokenMalformed => "join_token_malformed", Unauthenticated, "The join token is not in Herald's token format.";
    JoinTokenUnknown => "join_token_unknown", Unauthenticated, "No such join token.";
    JoinTokenExpired => "join_token_expired", Unauthenticated, "The join token has expired.";
    JoinTokenUsed => "join_token_used", Unauthenticated, "The join token was already used (tokens are single-use).";
    CsrMalformed => "csr_malformed", InvalidArgument, "The CSR is not a parseable PKCS#10 request.";
    CsrSignatureInvalid => "csr_signature_invalid", InvalidArgument, "The CSR's self-signature does not verify.";
    CsrRequestsCa => "csr_requests_ca", PermissionDenied, "The CSR asks for a CA certificate; SVIDs are never CAs.";
    CsrUnsupportedKey => "csr_unsupported_key", InvalidArgument, "The CSR's key type or size is not accepted.";
    MtlsRequired => "mtls_required", Unauthenticated, "The call needs a client certificate (the caller's current SVID).";
    SvidInvalid => "svid_invalid", Unauthenticated, "The presented SVID does not validate against the trust bundle.";
    SvidExpired => "svid_expired", Unauthenticated, "The presented SVID has expired or is not yet valid.";
    SvidRevoked => "svid_revoked", PermissionDenied, "The presented SVID has been revoked.";
    ForeignTrustDomain => "foreign_trust_domain", PermissionDenied, "The presented SVID belongs to another trust domain.";
    RenewSameKey => "renew_same_key", InvalidArgument, "A renewal must use a new key pair.";
    TtlTooLong => "ttl_too_long", InvalidArgument, "The requested lifetime exceeds the cap.";
    NotFound => "not_found", InvalidArgument, "The named object does not exist.";
    TokenMalformed => "token_malformed", Unauthenticated, "The OIDC token is not a well-formed JWS compact JWT.";
    TokenIssuerUnknown => "token_issuer_unknown", Unauthenticated, "The token's issuer is not one Herald is configured to trust.";
    TokenAlgorithmRefused => "token_algorithm_refused", Unauthenticated, "The token's algorithm is not allowed for its issuer (never none, never HS*).";
    TokenKeyUnknown => "token_key_unknown", Unauthenticated, "No key in the issuer's JWKS matches the token's kid, even after a refresh.";
    TokenSignatureInvalid => "token_signature_invalid", Unauthenticated, "The token's signature does not verify.";
    TokenExpired => "token_expired", Unauthenticated, "The token has expired.";
    TokenNotYetValid => "token_not_yet_valid", Unauthenticated, "The token's nbf is in the future.";
    TokenIssuedInFuture => "token_issued_in_future", Unauthenticated, "The token's iat is in the future beyond the allowed leeway.";
    TokenAudienceInvalid => "token_audience_invalid", Unauthenticated, "The token's aud is missing or is not an audience Herald accepts.";
    TokenClaimsInvalid => "token_claims_invalid", Unauthenticated, "A required claim is missing or has the wrong type.";
    TokenReplayed => "token_replayed", Unauthenticated, "The token's jti was already used (tokens are single-use).";
    IssuerUnavailable => "issuer_unavailable", Unavailable, "The issuer's discovery document or JWKS could not be fetched in time.";
    PolicyDenied => "policy_denied", PermissionDenied, "No attestation policy grants this evidence a credential.";
    FactorMissing => "factor_missing", PermissionDenied, "The policy requires a second factor the request did not carry.";
    SpiffeIdEscapesPrefix => "spiffe_id_escapes_prefix", PermissionDenied, "The SPIFFE ID built from claims is invalid or outside the policy's prefix.";
    CredentialNotGranted => "credential_not_granted", PermissionDenied, "The policy does not grant this kind of credential.";
    RoleNotGranted => "role_not_granted", PermissionDenied, "The policy does not grant the requested role.";
    AudienceNotGranted => "audience_not_granted", PermissionDenied, "The policy does not grant a JWT-SVID for the requested audience.";
    SessionPolicyMalformed => "session_policy_malformed", InvalidArgument, "The session policy document is not a valid policy.";
    SessionPolicyTooBroad => "session_policy_too_broad", PermissionDenied, "The session policy allows more than the role's scope.";
    RateLimited => "rate_limited", ResourceExhausted, "Too many requests from this caller; retry later.";
    TpmStructureMalformed => "tpm_structure_malformed", InvalidArgument, "A TPM structure (public area, attestation, signature) does not parse strictly.";
    TpmEkCertificateUntrusted => "tpm_ek_certificate_untrusted", Unauthenticated, "The EK certificate does not chain to a configured manufacturer root.";
    TpmEkCertificateInvalid => "tpm_ek_certificate_invalid", Unauthenticated, "The EK certificate is malformed, expired or not an EK certificate.";
    TpmEkPublicMismatch => "tpm_ek_public_mismatch", Unauthenticated, "The EK public area does not match the EK certificate's key.";
    TpmAkRefused => "tpm_ak_refused", Unauthenticated, "The attestation key lacks fixedTPM/fixedParent/sensitiveDataOrigin/restricted/sign, is of a refused type, or carries an authorization policy (authPolicy, adminWithPolicy).";
    TpmCredentialMismatch => "tpm_credential_mismatch", Unauthenticated, "The activated credential secret is wrong: the AK is not bound to this EK.";
    TpmQuoteSignatureInvalid => "tpm_quote_signature_invalid", Unauthenticated, "The quote's signature does not verify with the AK.";
    TpmQuoteSignerMismatch => "tpm_quote_signer_mismatch", Unauthenticated, "The quote names another signer than the enrolled AK.";
    TpmNonceMismatch => "tpm_nonce_mismatch", Unauthenticated, "The quote is not over this attestation's nonce and CSR key.";
    TpmNonceReplayed => "tpm_nonce_replayed", Unauthenticated, "The attestation nonce was already used (nonces are single-use).";
    TpmPcrSelectionMismatch => "tpm_pcr_selection_mismatch", Unauthenticated, "The quote covers another PCR selection than the one requested.";
    TpmPcrDigestMismatch => "tpm_pcr_digest_mismatch", Unauthenticated, "The reported PCR values do not hash to the quoted PCR digest.";
    TpmPcrOffPolicy => "tpm_pcr_off_policy", PermissionDenied, "The PCR values match none of the policy's golden sets.";
    TpmCounterRollback => "tpm_counter_rollback", PermissionDenied, "The TPM's reset or restart counter went backwards for an enrolled node.";
    TpmFirmwareRefused => "tpm_firmware_refused", PermissionDenied, "The TPM firmware version is refused by policy.";
    NodeBanned => "node_banned", PermissionDenied, "The node is banned: its attestations and renewals are refused.";
    NodeEkChanged => "node_ek_changed", PermissionDenied, "Another EK presented itself for an enrolled node's identity.";
    NodeTokenClaimsMissing => "node_token_claims_missing", Unauthenticated, "A platform token presented as node evidence does not name its node: a Kubernetes token without `kubernetes.io.node` (name), a GCP token without `google.compute_engine` project and instance, or a token of neither shape.";
    AwsIidMalformed => "aws_iid_malformed", InvalidArgument, "The AWS instance identity document or its signature does not parse (JSON fields, pendingTime, base64).";
    AwsIidSignatureInvalid => "aws_iid_signature_invalid", Unauthenticated, "The AWS instance identity document's signature verifies with none of the regional certificates the node policies name.";
    AwsIidStale => "aws_iid_stale", Unauthenticated, "The AWS instance identity document's pendingTime is older than the policy's max_age (or in the future).";
    NodeAgentKeyChanged => "node_agent_key_changed", PermissionDenied, "The instance is already enrolled with another agent key: it re-enrols only with its first key, or after `herald node reset`.";
    TpmAkChanged => "tpm_ak_changed", PermissionDenied, "A renewal with a fresh quote came from another attestation key than the node's recorded one: re-attest in full.";
    ReattestationRequired => "reattestation_required", PermissionDenied, "The node's policy requires a fresh TPM quote for this renewal: renew over the attestation stream (NodeAttestationService/Attest with renewal set).";
    AttestationTimeout => "attestation_timeout", InvalidArgument, "The attestation stream stalled past the server's deadline.";
    AttestationProtocol => "attestation_protocol", InvalidArgument, "The attestation stream's messages came out of order or were missing.";
    NodeUnknown => "node_unknown", PermissionDenied, "The caller's SVID is not an attested node's: only node agents may ask for workload identities.";
    WorkloadNotRegistered => "workload_not_registered", PermissionDenied, "The SPIFFE ID is not registered for workloads of this node.";
    KubernetesWorkloadNotFound => "kubernetes_workload_not_found", PermissionDenied, "The caller's cgroup names a Kubernetes pod and container that the kubelet's pod list did not contain (after the bounded retries), or names them inconsistently: no identity is served on a partial match.";
    KubeletUnavailable => "kubelet_unavailable", Unavailable, "The agent could not read the kubelet's pod list (connection, TLS verification, authorization, or a malformed document); retry later.";
    JoinTokenWrongPurpose => "join_token_wrong_purpose", PermissionDenied, "The join token was created for another purpose (bootstrap, node enrolment, second factor of named policies, break-glass).";
    CredentialNotRenewable => "credential_not_renewable", PermissionDenied, "This credential is not renewed: exchange-issued SVIDs need fresh evidence, workload SVIDs are re-issued to their agent.";
    LineageTooOld => "lineage_too_old", PermissionDenied, "The credential's lineage is older than its policy's max_lineage_age: present fresh evidence.";
    SvidRecordMismatch => "svid_record_mismatch", Unauthenticated, "The presented certificate differs from Herald's record of its serial (SPIFFE ID, key or issuing CA key).";
    DnsNameReserved => "dns_name_reserved", PermissionDenied, "The grant names one of the server's own DNS names (tls.dns_names); no workload may pose as the server.";
    SpiffeIdReserved => "spiffe_id_reserved", PermissionDenied, "The grant names an identity under spiffe://<td>/herald/, reserved for Herald's own services (clients pin the server by it); no caller may hold one.";
    RefusalsAggregated => "refusals_aggregated", ResourceExhausted, "The refusals in this record came past the server-wide refusal audit budget (rate_limit.refusal_audit_rate) and are counted here by action and code, one record per caller per interval.";
    ClientUnauthenticated => "client_unauthenticated", Unauthenticated, "The caller of an authenticated endpoint (introspection) presented no valid credential.";
    FederationBundleRefused => "federation_bundle_refused", InvalidArgument, "A federated trust domain's bundle document was refused (another trust domain, an older spiffe_sequence, malformed, oversized or holding a private key); the last good bundle stays.";
    FederationEndpointUnreachable => "federation_endpoint_unreachable", Unavailable, "A federated trust domain's bundle endpoint could not be fetched (connection, TLS, HTTP status or timeout); the last good bundle stays.";
    FederationEndpointUnauthenticated => "federation_endpoint_unauthenticated", Unauthenticated, "A federated trust domain's bundle endpoint presented a certificate this server does not trust (https_spiffe: an SVID that does not chain to that trust domain's bundle held or bootstrap_bundle, or names another SPIFFE ID than endpoint_spiffe_id; https_web: not valid under the Web PKI roots or ca_file): nothing was read from it; the last good bundle stays.";
    StoreUnavailable => "store_unavailable", Unavailable, "The datastore could not be reached or was busy.";
    Internal => "internal", Internal, "An internal error; details are in the server log.";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ErrorCode::from_code(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown error code {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_roundtrip() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate {code}");
            assert_eq!(ErrorCode::from_code(code.as_str()), Some(*code));
            assert!(
                code.as_str()
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_')
            );
        }
        assert_eq!(ErrorCode::from_code("nope"), None);
    }
}
