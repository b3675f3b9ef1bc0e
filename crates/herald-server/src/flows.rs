//! The evidence half of each flow: verify what the caller presented (the
//! verifiers live in `herald_attest`; this module only looks their records
//! up), ask policy, and hand the [`Run`] a [`Decided`]. Node attestation's
//! evidence arrives over a stream and is gathered in `crate::attestation`.

use herald_attest::{
    PresentedSvid, TokenUse, VerifiedJoinToken, VerifiedSvid, VerifiedToken, join_token,
};
use herald_core::{ErrorCode, EvidenceType, JoinTokenPurpose};
use herald_policy::{Evidence, OidcEvidence};
use herald_store::ReplayKey;

use crate::decision::{Decided, Parent, Run};
use crate::status::Refusal;
use crate::{Shared, unix_now};

/// A join token presented for `used_as`: shape, record, use, expiry and
/// purpose checked. Its digest goes on the audit record.
pub async fn join_token(
    shared: &Shared,
    run: &mut Run<'_>,
    text: &str,
    used_as: TokenUse,
) -> Result<VerifiedJoinToken, Refusal> {
    let hash = join_token::parse(text).map_err(|e| Refusal::new(e.code(), e.to_string()))?;
    let digest = hex::encode(hash);
    run.audit.evidence_digest = Some(match run.audit.evidence_digest.take() {
        Some(d) => format!("{d}+{digest}"),
        None => digest,
    });
    let record = shared.store.join_token(&hash).await?;
    if let Some(r) = &record {
        run.audit
            .spiffe_id
            .get_or_insert_with(|| r.spiffe_id.clone());
        // Every use of a break-glass token stands out, refused ones too.
        if r.purpose == JoinTokenPurpose::BreakGlass && used_as == TokenUse::Mint {
            run.audit.evidence_type = Some(EvidenceType::BreakGlass);
        }
    }
    let time_box = shared.config.join_token.break_glass_max_ttl;
    join_token::verify(hash, record, used_as, time_box, unix_now()).map_err(|e| {
        if let join_token::JoinTokenError::Corrupt(reason) = &e {
            tracing::error!(reason, "unusable join token record");
        }
        Refusal::new(e.code(), e.to_string())
    })
}

/// The caller's SVID chain from mTLS, authenticated against Herald's record
/// of it: issued here, the same SPIFFE ID, key and CA key, a live lineage.
pub async fn presented_svid(
    shared: &Shared,
    chain: Option<&[Vec<u8>]>,
) -> Result<VerifiedSvid, Refusal> {
    let chain = chain.filter(|c| !c.is_empty()).ok_or_else(|| {
        Refusal::new(
            ErrorCode::MtlsRequired,
            "present your current SVID as the TLS client certificate",
        )
    })?;
    let now = unix_now();
    let ca = shared.ca();
    let presented = PresentedSvid::parse(chain, ca.ca.trust_domain(), now)
        .map_err(|e| Refusal::new(e.code(), e.to_string()))?;
    let record = shared.store.credential_status(presented.serial()).await?;
    presented
        .verify(record.as_ref(), |key_id| ca.ca_cert(key_id), now)
        .map_err(|e| Refusal::new(e.code(), e.to_string()))
}

/// `MintX509Svid`: a bootstrap (or break-glass) join token is the evidence;
/// a policy accepting join-token evidence must grant the identity it is
/// bound to.
pub async fn mint(shared: &Shared, run: &mut Run<'_>, token: &str) -> Result<Decided, Refusal> {
    run.admit()?;
    let token = join_token(shared, run, token, TokenUse::Mint).await?;
    let hash = token.hash;
    let evidence = Evidence {
        join_token: Some(token),
        ..Evidence::default()
    };
    let decision = run.decided(shared.policies()?.evaluate(&evidence))?;
    Ok(Decided {
        join_token: Some(hash),
        ..Decided::new(decision)
    })
}

/// `RenewX509Svid`: the caller's current SVID is the evidence; its lineage
/// must be renewable under the policy that granted it.
pub async fn renew(
    shared: &Shared,
    run: &mut Run<'_>,
    chain: Option<&[Vec<u8>]>,
) -> Result<Decided, Refusal> {
    run.admit()?;
    if let Some(leaf) = chain.and_then(<[_]>::first) {
        run.audit.evidence_digest = Some(herald_ca::sha256_hex(leaf));
    }
    let current = presented_svid(shared, chain).await?;
    run.audit.caller = current.spiffe_id.to_string();
    run.audit.spiffe_id = Some(current.spiffe_id.to_string());
    run.audit.policy = current.policy.clone();
    let decision = run.decided(shared.policies()?.renew(&current, unix_now()))?;
    Ok(Decided {
        parent: Some(Parent::from(&current)),
        renews: Some((current.not_before, current.not_after)),
        ..Decided::new(decision)
    })
}

/// A node agent's call: its node SVID, which must descend from a node
/// attestation under a node policy still in effect.
pub async fn node(
    shared: &Shared,
    run: &mut Run<'_>,
    chain: Option<&[Vec<u8>]>,
) -> Result<VerifiedSvid, Refusal> {
    run.admit()?;
    let node = presented_svid(shared, chain).await?;
    run.audit.caller = node.spiffe_id.to_string();
    run.audit.evidence_digest = Some(node.cert_sha256.clone());
    run.audit.policy = node.policy.clone();
    shared
        .policies()?
        .node_policy(&node)
        .map_err(|d| Refusal::new(d.code, d.reason))?;
    Ok(node)
}

/// A node agent asking for its workloads' credentials: a node (as
/// [`node`] checks it) whose last fresh quote, when its policy requires
/// fresh quotes (`evidence.tpm.reattest`), was not refused. A drifted node's
/// SVID may still be unexpired; it serves nothing until the node re-attests.
pub async fn serving_node(
    shared: &Shared,
    run: &mut Run<'_>,
    chain: Option<&[Vec<u8>]>,
) -> Result<VerifiedSvid, Refusal> {
    let node = node(shared, run, chain).await?;
    let continuous = shared
        .policies()?
        .node_policy(&node)
        .ok()
        .and_then(|p| p.tpm_rules())
        .is_some_and(|r| r.reattest.is_some());
    if continuous
        && let Some(record) = shared
            .store
            .node_by_spiffe_id(node.spiffe_id.as_str())
            .await?
        && let Some(result) = record.last_quote_result.as_deref()
        && result != herald_store::QUOTE_OK
    {
        return Err(Refusal::new(
            ErrorCode::ReattestationRequired,
            format!(
                "the node's last fresh quote was refused ({result}): it serves no workload until it re-attests"
            ),
        ));
    }
    Ok(node)
}

/// One identity for a node's workload: the node's policy must register it.
pub fn workload(
    shared: &Shared,
    run: &mut Run<'_>,
    node: &VerifiedSvid,
    spiffe_id: &str,
) -> Result<Decided, Refusal> {
    run.audit.caller = node.spiffe_id.to_string();
    run.audit.evidence_digest = Some(node.cert_sha256.clone());
    run.audit.policy = node.policy.clone();
    run.audit.spiffe_id = Some(spiffe_id.to_owned());
    let decision = run.decided(shared.policies()?.workload(node, spiffe_id))?;
    Ok(Decided {
        parent: Some(Parent::from(node)),
        ..Decided::new(decision)
    })
}

/// What a token exchange presents: the OIDC token and optional extra
/// factors.
#[derive(Debug, Clone, Default)]
pub struct ExchangeEvidence {
    /// The OIDC ID token.
    pub subject_token: String,
    /// A second-factor join token.
    pub join_token: Option<String>,
    /// The caller's SVID chain from mTLS.
    pub peer_certs: Option<Vec<Vec<u8>>>,
}

/// Token exchange: the OIDC token is the evidence (rate-limited per caller
/// before any signature is checked or JWKS fetched), with any second
/// factor fully verified as well.
pub async fn exchange(
    shared: &Shared,
    run: &mut Run<'_>,
    ev: &ExchangeEvidence,
) -> Result<(Decided, VerifiedToken), Refusal> {
    run.admit()?;
    let state = shared.policy_state()?;
    let token = state
        .oidc
        .verify(&ev.subject_token, unix_now())
        .await
        .map_err(|e| Refusal::new(e.code(), e.to_string()))?;
    run.audit.caller = format!("oidc:{}#{}", token.issuer, token.subject);
    run.audit.evidence_digest = Some(token.digest.clone());
    let mut evidence = Evidence {
        oidc: Some(OidcEvidence::from(&token)),
        ..Evidence::default()
    };
    if let Some(text) = &ev.join_token {
        run.audit.evidence_type = Some(EvidenceType::OidcAndJoinToken);
        evidence.join_token = Some(join_token(shared, run, text, TokenUse::SecondFactor).await?);
    }
    if let Some(chain) = ev.peer_certs.as_deref().filter(|c| !c.is_empty()) {
        if evidence.join_token.is_none() {
            run.audit.evidence_type = Some(EvidenceType::OidcAndX509Svid);
        }
        let digest = herald_ca::sha256_hex(&chain[0]);
        run.audit.evidence_digest = run
            .audit
            .evidence_digest
            .take()
            .map(|d| format!("{d}+{digest}"));
        evidence.x509_svid = Some(presented_svid(shared, Some(chain)).await?);
    }
    let decision = run.decided(state.policies.current().evaluate(&evidence))?;
    let replay = ReplayKey {
        key: token.replay_key.clone(),
        expires_at: token.replay_until(state.oidc.leeway_secs(&token.issuer)),
    };
    let decided = Decided {
        join_token: evidence.join_token.map(|t| t.hash),
        replay: Some(replay),
        ..Decided::new(decision)
    };
    Ok((decided, token))
}
