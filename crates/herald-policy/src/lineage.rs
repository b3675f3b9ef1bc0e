//! Decisions on presented SVIDs: renewal of a lineage, and what a node's
//! agent may have for its workloads. Both start from a
//! [`VerifiedSvid`] — authenticated against its record, its lineage live —
//! and ask the policy that granted the lineage, as it stands now.

use herald_attest::VerifiedSvid;
use herald_core::{ErrorCode, Origin};

use crate::{Decision, Denial, Factor, Grants, JwtGrant, Policy, PolicySet, Primary, X509Grant};

impl PolicySet {
    /// Renewal: a node or bootstrap-token lineage, still granted an X.509 SVID
    /// by the policy that granted it, under that policy's prefix, within
    /// its `max_lineage_age` at `now`. Exchange-issued, workload and
    /// break-glass SVIDs never renew.
    pub fn renew(&self, svid: &VerifiedSvid, now: i64) -> Result<Decision, Denial> {
        let deny = |code, policy: Option<&str>, reason: String| Denial {
            code,
            policy: policy.map(str::to_owned),
            reason,
        };
        if !svid.origin.is_renewable() {
            let how = match svid.origin {
                Origin::Workload => "a workload SVID is re-issued to its node's agent, not renewed",
                Origin::BreakGlass => {
                    "a break-glass SVID is not renewed: its time box ends with it; use a new break-glass token"
                }
                _ => "an exchange-issued SVID is not renewed: exchange fresh evidence",
            };
            return Err(deny(
                ErrorCode::CredentialNotRenewable,
                svid.policy.as_deref(),
                how.into(),
            ));
        }
        let policy = self.lineage_policy(svid)?;
        let name = Some(policy.name.as_str());
        let kind_matches = match (&policy.primary, svid.origin) {
            (p, Origin::Node) if p.is_node() => true,
            (Primary::JoinToken { purposes }, Origin::Bootstrap) => {
                purposes.contains(&herald_core::JoinTokenPurpose::Bootstrap)
            }
            _ => false,
        };
        if !kind_matches {
            return Err(deny(
                ErrorCode::PolicyDenied,
                name,
                format!(
                    "policy {} no longer accepts the evidence this lineage began with",
                    policy.name
                ),
            ));
        }
        let grant = policy.grants.x509_svid.as_ref().ok_or_else(|| {
            deny(
                ErrorCode::CredentialNotGranted,
                name,
                format!("policy {} grants no X.509 SVID", policy.name),
            )
        })?;
        policy.check_under_prefix(&svid.spiffe_id)?;
        // Continuous attestation: a node lineage's root is its last quote
        // (a renewal with a fresh quote is a node attestation, a new root),
        // so the root's age is the quote's.
        if let Some(r) = policy.tpm_rules().and_then(|t| t.reattest)
            && r.due(now.saturating_sub(svid.root_at))
        {
            return Err(deny(
                ErrorCode::ReattestationRequired,
                name,
                format!(
                    "policy {} requires a fresh TPM quote to renew this node SVID: renew over the attestation stream",
                    policy.name
                ),
            ));
        }
        let max_age = grant.max_lineage_age.ok_or_else(|| {
            deny(
                ErrorCode::CredentialNotRenewable,
                name,
                format!("policy {} does not renew its SVIDs", policy.name),
            )
        })?;
        let age = now.saturating_sub(svid.root_at);
        if age < 0 || age as u64 > max_age.as_secs() {
            return Err(deny(
                ErrorCode::LineageTooOld,
                name,
                format!(
                    "the lineage began {age}s ago; policy {} renews for {}s: present fresh evidence",
                    policy.name,
                    max_age.as_secs()
                ),
            ));
        }
        Ok(Decision {
            policy: policy.name.clone(),
            spiffe_id: svid.spiffe_id.clone(),
            grants: Grants {
                x509_svid: Some(X509Grant {
                    // A renewal keeps the SANs the lineage was granted.
                    dns_names: svid.dns_names.clone(),
                    ..grant.clone()
                }),
                ..Grants::default()
            },
            factors: vec![Factor::X509Svid],
            golden_set: None,
            origin: svid.origin,
        })
    }

    /// The node policy behind a node SVID: the gate of every call a node's
    /// agent makes. Only a lineage rooted in a node attestation is a node,
    /// whatever SPIFFE ID another lineage carries.
    pub fn node_policy(&self, node: &VerifiedSvid) -> Result<&Policy, Denial> {
        if node.origin != Origin::Node {
            return Err(Denial {
                code: ErrorCode::NodeUnknown,
                policy: node.policy.clone(),
                reason: format!(
                    "the presented SVID descends from a {} credential, not a node attestation",
                    node.origin
                ),
            });
        }
        let policy = self.lineage_policy(node)?;
        if !policy.is_node_policy() {
            return Err(Denial {
                code: ErrorCode::NodeUnknown,
                policy: Some(policy.name.clone()),
                reason: format!("policy {} is not a node policy", policy.name),
            });
        }
        Ok(policy)
    }

    /// A workload identity for a node's agent: the node's policy must
    /// register `spiffe_id` for its workloads; the grants are the
    /// registration's (TTL, DNS names, JWT audiences, cloud role).
    ///
    /// A template registration admits every ID it could build for a
    /// caller holding its selectors; the agent, which attests the caller,
    /// chooses which one. A fixed registration wins over a template for
    /// the same ID (its grants are the more specific).
    pub fn workload(&self, node: &VerifiedSvid, spiffe_id: &str) -> Result<Decision, Denial> {
        let policy = self.node_policy(node)?;
        let not_registered = || Denial {
            code: ErrorCode::WorkloadNotRegistered,
            policy: Some(policy.name.clone()),
            reason: format!("{spiffe_id} is not registered for this node's workloads"),
        };
        let id = herald_core::SpiffeId::parse(spiffe_id).map_err(|_| not_registered())?;
        let regs = policy.registrations();
        let reg = regs
            .iter()
            .find(|r| matches!(&r.spiffe_id, herald_core::RegisteredId::Exact(e) if *e == id))
            .or_else(|| regs.iter().find(|r| r.spiffe_id.admits(&id, &r.selectors)))
            .ok_or_else(not_registered)?;
        Ok(Decision {
            policy: policy.name.clone(),
            spiffe_id: id,
            grants: Grants {
                x509_svid: Some(X509Grant {
                    max_ttl: reg.ttl,
                    ttl: Some(reg.ttl),
                    dns_names: reg.dns_names.clone(),
                    max_lineage_age: None,
                    // The agent gets the registration's federated bundles
                    // with the registrations, not with every SVID.
                    federates_with: Vec::new(),
                }),
                jwt_svid: (!reg.jwt_audiences.is_empty()).then(|| JwtGrant {
                    max_ttl: reg.ttl,
                    audiences: reg.jwt_audiences.clone(),
                }),
                cloud_roles: reg
                    .cloud_role
                    .as_deref()
                    .and_then(|role| policy.grants.cloud_role(role))
                    .cloned()
                    .into_iter()
                    .collect(),
            },
            factors: vec![Factor::X509Svid],
            golden_set: None,
            origin: Origin::Workload,
        })
    }

    /// The policy that granted `svid`'s lineage, if it still exists.
    fn lineage_policy(&self, svid: &VerifiedSvid) -> Result<&Policy, Denial> {
        let name = svid.policy.as_deref().unwrap_or_default();
        self.policy(name).ok_or_else(|| Denial {
            code: ErrorCode::PolicyDenied,
            policy: svid.policy.clone(),
            reason: format!("the policy {name:?} that granted this lineage is no longer in effect"),
        })
    }
}

impl Policy {
    /// Refuses a SPIFFE ID outside this policy's trust domain and prefix.
    pub(crate) fn check_under_prefix(&self, id: &herald_core::SpiffeId) -> Result<(), Denial> {
        if id.trust_domain() != &self.trust_domain
            || !id.as_str().starts_with(&self.prefix)
            || id.as_str().len() == self.prefix.len()
        {
            return Err(Denial {
                code: ErrorCode::SpiffeIdEscapesPrefix,
                policy: Some(self.name.clone()),
                reason: format!(
                    "policy {}: {id} is not under the prefix {}",
                    self.name, self.prefix
                ),
            });
        }
        Ok(())
    }
}
