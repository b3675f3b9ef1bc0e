//! What to do about each error the CLI prints: one place mapping every
//! stable code to a remedy, so that `herald: error[code]: …` is always
//! followed by a `  fix: …` line a newcomer can act on without reading the
//! source. A call site that knows a more specific cause sets its own fix
//! ([`crate::cli::CliError::with_fix`]); a few causes are recognised from
//! the message here (a refused TLS certificate above all, which otherwise
//! looks like any unreachable issuer or server).

use herald_core::ErrorCode;

/// Codes the CLI prints besides [`ErrorCode`]'s: its own (configuration,
/// files, audit and replica checks) and those of [`herald_client::ClientError`]
/// and `herald_server::checkpoint::VerifyError`.
#[cfg(test)]
pub(crate) const CLI_CODES: &[&str] = &[
    "config",
    "config_invalid",
    "startup",
    "io",
    "agent",
    "invalid_argument",
    "invalid_input",
    "invalid_response",
    "unavailable",
    "unknown",
    "server_identity_mismatch",
    "dev_issuer_unavailable",
    "replicas_diverged",
    "federation_stale",
    "policy_invalid",
    "policy_test_failed",
    "audit_chain_broken",
    "audit_checkpoint_forged",
    "audit_truncated",
    "audit_rewritten",
];

/// The fix for an error with this code and message: a cause recognised in
/// the message first, else the code's general remedy.
pub(crate) fn remedy(code: &str, message: &str) -> Option<&'static str> {
    specific(code, message).or_else(|| general(code))
}

/// Whether the message says a TLS peer's certificate was refused (rustls:
/// "invalid peer certificate: UnknownIssuer", "…: Expired", "…: NotValidForName";
/// Herald's own fetches: "certificate refused").
fn certificate_refused(message: &str) -> bool {
    message.contains("invalid peer certificate") || message.contains("certificate refused")
}

fn specific(code: &str, message: &str) -> Option<&'static str> {
    match code {
        "issuer_unavailable" if certificate_refused(message) => Some(
            "the server does not trust the issuer's TLS certificate: put the CA that signed it (PEM) in `extra_roots` of that issuer's [[oidc.issuers]] entry in the server's configuration, then restart the server",
        ),
        "unavailable" if certificate_refused(message) => Some(
            "the server's certificate does not chain to --bundle: use the server's current bundle (its <data_dir>/bundle.pem, or GET /v1/bundle.pem) and dial a name in its tls.dns_names",
        ),
        "unavailable" if message.contains("onnection refused") => Some(
            "nothing listens at that address: start the server (`herald server --config FILE`, or `--dev`) or point --server / HERALD_SERVER at its gRPC listener (listen.grpc, default 127.0.0.1:8443)",
        ),
        "invalid_input" if message.contains("names no SPIFFE trust domain") => Some(
            "--bundle is not a Herald trust bundle (its CA names no trust domain): use the server's bundle.pem, or name the server's identity with --server-spiffe-id (agent: server_spiffe_id)",
        ),
        "startup" | "internal" if message.contains("ddress already in use") => Some(
            "another process holds that port (often an earlier `herald server`): find it with `ss -ltnp 'sport = :PORT'` and stop it, or listen elsewhere (listen.grpc / listen.http, HERALD_LISTEN_GRPC / HERALD_LISTEN_HTTP) and point clients there (--server / HERALD_SERVER)",
        ),
        "config" | "config_invalid" if message.contains("No such file") => Some(
            "the file does not exist: give the right path (deploy/herald.example.toml and deploy/agent.example.toml are documented starting points)",
        ),
        _ => None,
    }
}

/// Every code's general remedy; `None` for a code nobody listed (the unit
/// test below makes that a failure for every code the CLI can print).
fn general(code: &str) -> Option<&'static str> {
    if let Some(c) = ErrorCode::from_code(code) {
        return Some(refusal(c));
    }
    Some(match code {
        "config" | "config_invalid" => {
            "correct the configuration named above and check it offline: `herald config check FILE` (server) or `herald agent --config FILE check`; every key is documented in deploy/herald.example.toml and deploy/agent.example.toml"
        }
        "startup" => {
            "the server could not start: check the configuration with `herald config check FILE`, that the listen addresses are free, and that data_dir is writable"
        }
        "io" => "check that the path exists and that this user may read (or write) it",
        "agent" => {
            "the agent stopped: `herald agent --config FILE status` shows its last error; the server's audit log (`herald audit export`) says why an attestation was refused"
        }
        "invalid_argument" | "invalid_input" => {
            "check the arguments (`herald <command> --help`): --server is https://host:port, --bundle a PEM file of certificates"
        }
        "invalid_response" => {
            "the agent's Workload API answered something unexpected: check SPIFFE_ENDPOINT_SOCKET (or --socket) names a Herald agent's socket"
        }
        "unavailable" => {
            "check that the server is running and --server (or HERALD_SERVER) names its gRPC listener; retry, the server may be restarting"
        }
        "unknown" => {
            "the server refused without a Herald error code: check that --server names a Herald server and not a proxy in front of it"
        }
        "server_identity_mismatch" => {
            "the address answered with a certificate of the right CA but another identity: check --server, or pin the server's real SPIFFE ID with --server-spiffe-id (agent: server_spiffe_id)"
        }
        "dev_issuer_unavailable" => {
            "start `herald server --dev` from this directory first (or pass --data-dir / HERALD_DATA_DIR naming the running dev server's data directory)"
        }
        "replicas_diverged" => {
            "replicas serve different bundles or policy sets: wait ca.bundle_poll (1 s) and policy.reload_interval, then check again; a replica that stays behind needs a restart and its log read"
        }
        "federation_stale" => {
            "`herald federation list` shows each trust domain's last error; fix the endpoint or its trust, then `herald federation refresh`"
        }
        "policy_invalid" => {
            "fix each problem listed above (every key is in docs/policy-reference.md); `herald policy explain FILE` shows what a policy means"
        }
        "policy_test_failed" => {
            "a policy's embedded test disagrees with the policy: fix the policy or the test's expectation (`herald policy explain FILE`)"
        }
        "audit_chain_broken"
        | "audit_checkpoint_forged"
        | "audit_truncated"
        | "audit_rewritten" => {
            "treat this as a security incident: the audit log was altered; keep the database and the checkpoints as they are and compare with a backup"
        }
        _ => return None,
    })
}

/// The remedy for a refusal with a stable code (the server's or a local
/// verifier's).
fn refusal(code: ErrorCode) -> &'static str {
    use ErrorCode::*;
    match code {
        InvalidRequest => {
            "check the command's arguments (`herald <command> --help`); the message names the field"
        }
        RequestTimeout => {
            "send the whole request body at once: the server closes a connection whose body is still arriving after listen.body_read_timeout (default 10s)"
        }
        RequestTooLarge => {
            "send less: the token, CSR or field exceeds the server's size cap (a token's is max_token_bytes of its [[oidc.issuers]] entry)"
        }
        JoinTokenMalformed => {
            "pass the join token exactly as `herald token create` printed it (HERALD_JOIN_TOKEN keeps it out of the process list)"
        }
        JoinTokenUnknown => {
            "create the join token on this server's database (`herald token create`); tokens of another server or database are unknown here"
        }
        JoinTokenExpired => {
            "create a new join token (`herald token create --ttl …`) and use it before it expires"
        }
        JoinTokenUsed => "join tokens are single-use: create a new one with `herald token create`",
        JoinTokenWrongPurpose => {
            "create a token for this use: `herald token create --purpose bootstrap|node|second-factor` (or --break-glass --reason)"
        }
        CsrMalformed | CsrSignatureInvalid | CsrUnsupportedKey => {
            "let herald make the key and CSR (`herald svid mint`/`renew` do); a CSR of your own must be PKCS#10, self-signed, with a P-256, P-384, Ed25519 or RSA 2048-8192 key"
        }
        CsrRequestsCa => {
            "ask for a leaf certificate: SVIDs are never CAs (drop basicConstraints cA=true from the CSR)"
        }
        MtlsRequired => {
            "renew with the current SVID: `herald svid renew --out DIR` presents DIR/svid.pem and DIR/svid.key"
        }
        SvidInvalid => {
            "the SVID does not validate against the trust bundle: use the server's current bundle, or get a new SVID from fresh evidence"
        }
        SvidExpired => {
            "the SVID has expired and cannot be renewed: get a new one from fresh evidence (a join token, an attestation, an OIDC token)"
        }
        SvidRevoked => {
            "this SVID was revoked (`herald audit export` shows by whom and why): get a new one from fresh evidence"
        }
        ForeignTrustDomain => {
            "present an SVID of this server's trust domain (or federate the trust domains: [[federation.trust_domains]])"
        }
        RenewSameKey => "renew with a new key pair (`herald svid renew` makes one)",
        TtlTooLong => {
            "ask for a shorter --ttl: at most what the policy's max_ttl (and the server's caps) allow"
        }
        NotFound => {
            "check the name, serial or SPIFFE ID (`herald node list`, `herald token list`, `herald audit export` list what exists)"
        }
        TokenMalformed => {
            "pass the OIDC ID token itself (three base64url parts joined by dots), not a file name or a quoted or truncated string"
        }
        TokenIssuerUnknown => {
            "add the token's issuer (its `iss`) to the server's [[oidc.issuers]] with a policy for it, or exchange a token from a configured issuer"
        }
        TokenAlgorithmRefused => {
            "the issuer's `algorithms` in [[oidc.issuers]] does not list the token's alg: add it there if the issuer really signs with it (none and HS* are never accepted)"
        }
        TokenKeyUnknown => {
            "the token's kid is in none of the issuer's published keys: check the token comes from the configured issuer (keys are refetched at most every min_refresh_interval)"
        }
        TokenSignatureInvalid => {
            "the token was altered or signed by another key: fetch a fresh token from the platform"
        }
        TokenExpired => {
            "fetch a fresh token from the platform and exchange it at once (ID tokens live minutes)"
        }
        TokenNotYetValid | TokenIssuedInFuture => {
            "the clocks disagree: synchronise the server's (and the platform's) clock with NTP"
        }
        TokenAudienceInvalid => {
            "request the token for an audience the issuer's [[oidc.issuers]] entry lists in `audiences` (GitHub Actions: --github-actions AUDIENCE)"
        }
        TokenClaimsInvalid => {
            "the token lacks a claim Herald requires (exp, iat, sub; jti when require_jti): take the platform's ID token, not an access token"
        }
        TokenReplayed => "tokens are single-use: fetch a fresh token for each exchange",
        IssuerUnavailable => {
            "the server could not fetch the issuer's discovery document or JWKS over HTTPS: check its network path and the server log; an issuer behind a private CA needs that CA in its `extra_roots`"
        }
        PolicyDenied => {
            "no policy accepts this evidence: `herald policy explain DIR` shows what each accepts; compare with the token's claims (a policy's tests show examples)"
        }
        FactorMissing => {
            "add the second factor the policy requires: --join-token from `herald token create --purpose second-factor --policy NAME`, or mTLS with the current SVID"
        }
        SpiffeIdEscapesPrefix => {
            "a claim used in the policy's spiffe_id.template holds characters a SPIFFE ID cannot ('/', '..', '%', upper case in the trust domain): fix the claim or the template"
        }
        CredentialNotGranted => {
            "ask for a credential the policy grants (`herald policy explain FILE` lists x509_svid, jwt_svid, cloud)"
        }
        RoleNotGranted => "use a --role-arn listed in the policy's grants.cloud",
        AudienceNotGranted => {
            "use a --jwt-audience listed in the policy's grants.jwt_svid.audiences"
        }
        SessionPolicyMalformed => {
            "pass a session policy that is a valid IAM policy document (Version, Statement)"
        }
        SessionPolicyTooBroad => {
            "narrow the session policy to actions and resources within the role's scope in the policy"
        }
        RateLimited => {
            "slow down and retry with backoff; the server's limits per caller address are [rate_limit] per_caller_rate and per_caller_burst in its configuration (the agent's per uid: rate_limit in agent.toml)"
        }
        TpmStructureMalformed => {
            "the agent and server disagree on a TPM structure: run the same Herald version on both, and report it if they match"
        }
        TpmEkCertificateUntrusted => {
            "the EK certificate does not chain to the policy's ek_roots: add the TPM vendor's root (and ek_intermediates) to the node policy — `tpm2_nvread 0x01c00002` reads the EK certificate, its issuer names the vendor CA"
        }
        TpmEkCertificateInvalid => {
            "the TPM's EK certificate is malformed or expired: check it with `tpm2_nvread 0x01c00002 | openssl x509 -inform DER -text`; re-provision the TPM's EK certificate"
        }
        TpmEkPublicMismatch
        | TpmCredentialMismatch
        | TpmQuoteSignatureInvalid
        | TpmQuoteSignerMismatch => {
            "the TPM's keys do not match its EK certificate or enrolment: delete the agent's AK blobs in its data_dir and restart it; if it persists, treat the node as suspect"
        }
        TpmAkRefused => {
            "the attestation key is not a restricted signing key fixed to the TPM: delete the agent's AK blobs in its data_dir so it makes a new one"
        }
        TpmNonceMismatch | TpmNonceReplayed | TpmPcrSelectionMismatch | TpmPcrDigestMismatch => {
            "the quote does not answer this attestation: restart the agent (a fresh attestation); if it persists, treat the node as suspect"
        }
        TpmPcrOffPolicy => {
            "the node's PCRs match no golden set: if the change is an expected update, add its values (`tpm2_pcrread sha256:0,7`) as a new golden set in the node policy; otherwise investigate the node"
        }
        TpmCounterRollback => {
            "the TPM's reset counter went backwards (a replayed or cloned TPM state): investigate the node; an operator can ban it with `herald node ban`"
        }
        TpmFirmwareRefused => "update the TPM firmware to a version the policy accepts",
        NodeBanned => {
            "this node was banned by an operator (`herald node list` shows why); a banned node stays refused"
        }
        NodeEkChanged => {
            "another TPM claims an enrolled node's identity: if the TPM was replaced, an operator bans the old identity (`herald node ban`) and the node enrols anew"
        }
        TpmAkChanged => {
            "a renewal's quote came from another attestation key than the node enrolled with (its AK blobs were replaced or lost): the agent re-attests in full on its own; if the TPM itself changed, treat the node as suspect"
        }
        ReattestationRequired => {
            "the node policy requires a fresh TPM quote with this renewal (evidence.tpm.reattest): `herald agent` renews over the attestation stream on its own; other clients re-attest"
        }
        AttestationTimeout | AttestationProtocol => {
            "retry the attestation (the agent does on its own); check the network between agent and server and that both run the same Herald version"
        }
        NodeUnknown => {
            "only attested node agents may ask for workload identities: run `herald agent` and let it attest first"
        }
        WorkloadNotRegistered => {
            "register the SPIFFE ID for this node's workloads in its node policy (`workloads:` with selectors matching the caller)"
        }
        KubernetesWorkloadNotFound => {
            "the caller's pod or container is not in the kubelet's pod list: check the agent's node_name / HERALD_NODE_NAME and that the pod runs on this node (docs/kubernetes.md)"
        }
        KubeletUnavailable => {
            "check [workload_api.kubernetes]: kubelet_url, kubelet_ca_path, kubelet_server_name, and RBAC `get nodes/pods` for the agent's service account (docs/kubernetes.md)"
        }
        CredentialNotRenewable => {
            "this credential is not renewed: get a new one from fresh evidence (exchange a new token; workload SVIDs come from the agent)"
        }
        LineageTooOld => {
            "the lineage passed its policy's max_lineage_age: present fresh evidence (a new join token or attestation)"
        }
        SvidRecordMismatch => {
            "the presented certificate is not the one Herald issued for its serial: present the SVID exactly as issued, or get a new one"
        }
        DnsNameReserved => {
            "remove the server's own DNS names (tls.dns_names) from the grant or registration"
        }
        NodeTokenClaimsMissing => {
            "the node's platform token must name its node: for Kubernetes, a projected service-account token from a cluster that issues the node claim (ServiceAccountTokenPodNodeInfo, on by default since 1.30) mounted into the agent's pod; for GCP, an instance identity token requested with format=full"
        }
        AwsIidMalformed => {
            "send the IMDSv2 document and its `signature` exactly as the metadata service serves them (the agent's [attestation] method = \"aws_iid\" does)"
        }
        AwsIidSignatureInvalid => {
            "list the instance's region's AWS public certificate (the one for the base64 `signature` endpoint) in the node policy's evidence.aws_iid.certificates"
        }
        AwsIidStale => {
            "the instance was launched longer ago than the policy's evidence.aws_iid.max_age: raise max_age, or re-enrol it with a join token factor if the policy takes one"
        }
        NodeAgentKeyChanged => {
            "the instance enrolled with another agent key (a rebuilt agent lost <data_dir>/node/enrolment.key): after checking the machine, `herald node reset <id>` lets it enrol afresh"
        }
        RefusalsAggregated => {
            "not an error of one request: many refusals arrived at once (often from many addresses); read the record's detail for each action and code, and raise [rate_limit] refusal_audit_rate only if every refusal must have a record of its own"
        }
        SpiffeIdReserved => {
            "choose a SPIFFE ID outside spiffe://<trust domain>/herald/ (reserved for Herald's own services) in the policy, registration or --spiffe-id"
        }
        ClientUnauthenticated => {
            "authenticate with `Authorization: Bearer <JWT-SVID for audience herald-introspection>`"
        }
        FederationBundleRefused => {
            "the partner's bundle was refused (the message says why): ask its operator to fix it, or set it by hand with `herald federation set TD FILE`"
        }
        FederationEndpointUnauthenticated => {
            "the partner's bundle endpoint presented a certificate this server does not trust: for profile https_spiffe check `endpoint_spiffe_id` and `bootstrap_bundle` (if the partner rotated its CA while this server held an old bundle, set its current one with `herald federation set TD FILE`); for https_web the endpoint needs a Web PKI certificate (or give its CA in `ca_file`)"
        }
        FederationEndpointUnreachable => {
            "check the partner's bundle endpoint url and network path; `herald federation list` shows the last error, `herald federation refresh` retries"
        }
        StoreUnavailable => {
            "check the database: data_dir exists and is writable (SQLite) or database_url is reachable (PostgreSQL), and no other process holds it; then retry"
        }
        Internal => "retry; if it persists, the server's log has the details (HERALD_LOG=debug)",
        // ErrorCode is non_exhaustive for other crates: a code added later
        // is caught by the unit test below before anyone sees this.
        _ => "see the code's meaning in crates/herald-core/src/error.rs",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    const FALLBACK: &str = "see the code's meaning in crates/herald-core/src/error.rs";

    #[test]
    fn every_code_the_cli_can_print_has_a_remedy() {
        for code in ErrorCode::ALL {
            let fix = remedy(code.as_str(), "").unwrap();
            assert_ne!(fix, FALLBACK, "{code} has no remedy of its own");
        }
        for code in CLI_CODES {
            assert!(remedy(code, "").is_some(), "{code} has no remedy");
        }
        assert_eq!(remedy("no_such_code", ""), None);
    }

    /// Every literal code given to `CliError::new` in the binary's sources
    /// is a known one: a new code cannot reach users without a remedy.
    #[test]
    fn every_literal_code_in_the_sources_is_known() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut checked = 0;
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            // src/bin/herald-agent.rs prints its own few codes, not CliErrors.
            if path.is_dir() || path.ends_with("remedy.rs") {
                continue; // this scan's own text
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, _) in text.match_indices("CliError::new(") {
                let rest = text[i + "CliError::new(".len()..].trim_start();
                let Some(lit) = rest.strip_prefix('"') else {
                    continue; // a code computed from a typed error, covered by ALL
                };
                let code = lit.split('"').next().unwrap();
                checked += 1;
                assert!(
                    ErrorCode::from_code(code).is_some() || CLI_CODES.contains(&code),
                    "{}: code {code:?} is not in ErrorCode or CLI_CODES",
                    path.display()
                );
            }
        }
        assert!(
            checked > 30,
            "found only {checked} codes: the scan is broken"
        );
    }

    #[test]
    fn the_codes_of_client_and_checkpoint_errors_are_known() {
        use herald_client::ClientError;
        for e in [
            ClientError::Transport("x".into()),
            ClientError::Input("x".into()),
            ClientError::Io("x".into()),
            ClientError::Refused {
                code: None,
                message: "x".into(),
                grpc: tonic::Code::Unknown,
            },
        ] {
            let text = e.to_string();
            let code = text
                .strip_prefix("error[")
                .and_then(|r| r.split_once(']'))
                .unwrap()
                .0;
            assert!(CLI_CODES.contains(&code), "{code}");
        }
    }

    #[test]
    fn a_refused_certificate_names_the_key_to_fix() {
        let msg = "no keys for https://issuer.example yet; the last fetch failed (GET https://issuer.example/.well-known/openid-configuration: request failed: invalid peer certificate: UnknownIssuer)";
        assert!(
            remedy("issuer_unavailable", msg)
                .unwrap()
                .contains("extra_roots")
        );
        assert!(
            remedy(
                "unavailable",
                "transport error: invalid peer certificate: UnknownIssuer"
            )
            .unwrap()
            .contains("--bundle")
        );
        // Without the cause, the general remedy.
        assert_eq!(
            remedy("issuer_unavailable", "timed out"),
            Some(refusal(ErrorCode::IssuerUnavailable))
        );
    }
}
