//! What a decision grants, and the authorization of one requested
//! credential against it: kind, audiences, role, lifetime and session
//! scope are judged here, once, for every flow.

use std::time::Duration;

use herald_core::{ErrorCode, ScopePolicy};

use crate::{Decision, Denial};

/// Most audiences one JWT-SVID may carry.
pub const MAX_AUDIENCES: usize = 16;

/// An X.509 SVID grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Grant {
    /// Longest lifetime.
    pub max_ttl: Duration,
    /// The lifetime given when the request names none; `None` = the
    /// server's default (capped by `max_ttl`).
    pub ttl: Option<Duration>,
    /// DNS SANs the SVID carries.
    pub dns_names: Vec<String>,
    /// How long after its fresh evidence the lineage may keep renewing;
    /// `None` = never renewed.
    pub max_lineage_age: Option<Duration>,
    /// Foreign trust domains whose bundles are handed out with the SVID
    /// (SPIFFE federation). Workload registrations name theirs on the
    /// registration; the agent serves them.
    pub federates_with: Vec<herald_core::TrustDomain>,
}

/// A JWT-SVID grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtGrant {
    /// Longest lifetime.
    pub max_ttl: Duration,
    /// Audiences a JWT-SVID may carry.
    pub audiences: Vec<String>,
}

/// A cloud role grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudRoleGrant {
    /// The role.
    pub role_arn: String,
    /// What the role allows; a session policy may only narrow it.
    pub scope: ScopePolicy,
    /// Longest session.
    pub max_ttl: Duration,
}

/// What a policy grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// X.509 SVIDs.
    pub x509_svid: Option<X509Grant>,
    /// JWT-SVIDs.
    pub jwt_svid: Option<JwtGrant>,
    /// Cloud roles.
    pub cloud_roles: Vec<CloudRoleGrant>,
}

impl Grants {
    /// The grant for `arn`, if any.
    pub fn cloud_role(&self, arn: &str) -> Option<&CloudRoleGrant> {
        self.cloud_roles.iter().find(|r| r.role_arn == arn)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.x509_svid.is_none() && self.jwt_svid.is_none() && self.cloud_roles.is_empty()
    }
}

/// The credential a caller asks for, as far as policy is concerned (the
/// CSR and session name are the issuer's and the transport's to check).
#[derive(Debug, Clone, Copy)]
pub enum CredentialRequest<'a> {
    /// An X.509 SVID.
    X509Svid {
        /// Requested lifetime; `None` = the grant's or the server's default.
        ttl: Option<Duration>,
    },
    /// A JWT-SVID for these audiences.
    JwtSvid {
        /// At least one, at most [`MAX_AUDIENCES`].
        audiences: &'a [String],
        /// Requested lifetime.
        ttl: Option<Duration>,
    },
    /// Session credentials for a role.
    Cloud {
        /// The role.
        role_arn: &'a str,
        /// An optional session policy (JSON) that narrows the role's scope.
        session_policy: Option<&'a str>,
        /// Requested lifetime.
        ttl: Option<Duration>,
    },
}

/// The server's default lifetimes, used when neither the request nor the
/// grant names one (always capped by the grant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    /// X.509 SVIDs.
    pub x509_ttl: Duration,
    /// JWT-SVIDs.
    pub jwt_ttl: Duration,
    /// Session credentials.
    pub cloud_ttl: Duration,
}

/// One credential, authorized: exactly what the issuer will issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// An X.509 SVID.
    X509Svid {
        /// Its lifetime.
        ttl: Duration,
        /// Its DNS SANs.
        dns_names: Vec<String>,
    },
    /// A JWT-SVID.
    JwtSvid {
        /// Its lifetime.
        ttl: Duration,
        /// Its audiences.
        audiences: Vec<String>,
    },
    /// Session credentials.
    Cloud {
        /// Their lifetime.
        ttl: Duration,
        /// The role.
        role_arn: String,
        /// What they allow: the role's scope, or the narrower session policy.
        scope: ScopePolicy,
    },
}

/// The request's lifetime (refused above the cap, never clamped silently)
/// or the default (clamped to the cap).
fn lifetime(
    requested: Option<Duration>,
    default: Duration,
    cap: Duration,
) -> Result<Duration, (ErrorCode, String)> {
    match requested {
        Some(t) if t > cap => Err((
            ErrorCode::TtlTooLong,
            format!(
                "requested lifetime {}s exceeds the policy's cap of {}s",
                t.as_secs(),
                cap.as_secs()
            ),
        )),
        Some(t) if t.is_zero() => Err((
            ErrorCode::InvalidRequest,
            "lifetime must be positive".into(),
        )),
        Some(t) => Ok(t),
        None => Ok(default.min(cap)),
    }
}

impl Decision {
    /// Authorizes one requested credential against what this decision
    /// grants: the kind must be granted, every audience and the role
    /// listed, the lifetime within the cap, a session policy within the
    /// role's scope.
    pub fn authorize(
        &self,
        request: &CredentialRequest<'_>,
        defaults: &Defaults,
    ) -> Result<Grant, Denial> {
        let deny = |(code, reason): (ErrorCode, String)| Denial {
            code,
            policy: Some(self.policy.clone()),
            reason,
        };
        let not_granted = |what: &str| {
            deny((
                ErrorCode::CredentialNotGranted,
                format!("policy {} grants no {what}", self.policy),
            ))
        };
        match *request {
            CredentialRequest::X509Svid { ttl } => {
                let g = self
                    .grants
                    .x509_svid
                    .as_ref()
                    .ok_or_else(|| not_granted("X.509 SVID"))?;
                let ttl =
                    lifetime(ttl, g.ttl.unwrap_or(defaults.x509_ttl), g.max_ttl).map_err(deny)?;
                Ok(Grant::X509Svid {
                    ttl,
                    dns_names: g.dns_names.clone(),
                })
            }
            CredentialRequest::JwtSvid { audiences, ttl } => {
                let g = self
                    .grants
                    .jwt_svid
                    .as_ref()
                    .ok_or_else(|| not_granted("JWT-SVID"))?;
                if audiences.is_empty() || audiences.len() > MAX_AUDIENCES {
                    return Err(deny((
                        ErrorCode::InvalidRequest,
                        format!("a JWT-SVID needs 1 to {MAX_AUDIENCES} audiences"),
                    )));
                }
                if let Some(a) = audiences.iter().find(|a| !g.audiences.contains(a)) {
                    return Err(deny((
                        ErrorCode::AudienceNotGranted,
                        format!("policy {} does not grant audience {a:?}", self.policy),
                    )));
                }
                let ttl = lifetime(ttl, defaults.jwt_ttl, g.max_ttl).map_err(deny)?;
                Ok(Grant::JwtSvid {
                    ttl,
                    audiences: audiences.to_vec(),
                })
            }
            CredentialRequest::Cloud {
                role_arn,
                session_policy,
                ttl,
            } => {
                let role = self.grants.cloud_role(role_arn).ok_or_else(|| {
                    let code = if self.grants.cloud_roles.is_empty() {
                        ErrorCode::CredentialNotGranted
                    } else {
                        ErrorCode::RoleNotGranted
                    };
                    deny((
                        code,
                        format!("policy {} does not grant role {role_arn}", self.policy),
                    ))
                })?;
                let ttl = lifetime(ttl, defaults.cloud_ttl, role.max_ttl).map_err(deny)?;
                let scope = match session_policy {
                    None => role.scope.clone(),
                    Some(text) => {
                        let requested = ScopePolicy::from_json_str(text).map_err(|e| {
                            deny((ErrorCode::SessionPolicyMalformed, e.to_string()))
                        })?;
                        if !requested.is_within(&role.scope) {
                            return Err(deny((
                                ErrorCode::SessionPolicyTooBroad,
                                "the session policy allows actions or resources outside the role's scope"
                                    .into(),
                            )));
                        }
                        requested
                    }
                };
                Ok(Grant::Cloud {
                    ttl,
                    role_arn: role_arn.to_owned(),
                    scope,
                })
            }
        }
    }
}
