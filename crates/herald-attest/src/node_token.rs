//! A platform OIDC token as a node's evidence.
//!
//! The token itself is verified by [`crate::oidc`] like any other (issuer,
//! signature, `exp`/`nbf`/`iat`, audience; single use is the store's).
//! This module decides what *node* it speaks for, from the platform's own
//! claim shapes:
//!
//! - **Kubernetes** projected service-account tokens:
//!   `kubernetes.io: {namespace, serviceaccount: {name, uid}, pod: {name,
//!   uid}, node: {name, uid}}`. The node claim is what makes a token a
//!   node's (the kubelet binds it when the pod is bound to a node); a token
//!   without it is refused.
//! - **GCP** instance-identity tokens (`format=full`): `google:
//!   {compute_engine: {project_id, project_number, zone, instance_id,
//!   instance_name, ...}}`; project and instance are required.
//!
//! The nested claims stay as the platform sent them; flat copies are added
//! for templates and CEL (`namespace`, `serviceaccount`, `pod`, `node`,
//! `node_uid`; `project_id`, `zone`, `instance_id`, `instance_name`), with
//! `platform` (`kubernetes` or `gcp`).

use herald_core::ErrorCode;
use serde_json::{Map, Value};

use crate::VerifiedToken;

/// Which platform minted the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// A Kubernetes projected service-account token.
    Kubernetes,
    /// A GCP Compute Engine instance-identity token.
    Gcp,
}

impl Platform {
    /// `kubernetes` or `gcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Kubernetes => "kubernetes",
            Platform::Gcp => "gcp",
        }
    }
}

/// Why a verified token is no node's evidence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeTokenError {
    /// The claims naming the node are missing.
    #[error("the token names no node: {0}")]
    NoNode(String),
}

impl NodeTokenError {
    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::NodeTokenClaimsMissing
    }
}

/// A verified platform token and the node it speaks for.
#[derive(Debug, Clone)]
pub struct VerifiedNodeToken {
    /// The verified token.
    pub token: VerifiedToken,
    /// Its platform.
    pub platform: Platform,
    /// The node's registry key: hex SHA-256 over the platform, the issuer
    /// and the node's stable identifier (Kubernetes node UID, else its name;
    /// GCP project and instance ID), so two clusters' nodes never collide.
    pub node_key: String,
    /// The claims policies see (see the module docs).
    pub claims: Map<String, Value>,
}

/// The scalar at `object` then `keys` (Kubernetes' `kubernetes.io` key holds
/// a dot, so paths are given as segments).
fn text(claims: &Map<String, Value>, object: &str, keys: &[&str]) -> Option<String> {
    let mut v = claims.get(object)?;
    for k in keys {
        v = v.get(k)?;
    }
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The node `token` speaks for, and the claims policies see.
pub fn node_token(token: VerifiedToken) -> Result<VerifiedNodeToken, NodeTokenError> {
    let mut claims = token.claims.clone();
    let (platform, id) = if claims.contains_key("kubernetes.io") {
        let node = text(&claims, "kubernetes.io", &["node", "name"]).ok_or_else(|| {
            NodeTokenError::NoNode("a Kubernetes token without kubernetes.io.node.name".into())
        })?;
        let uid = text(&claims, "kubernetes.io", &["node", "uid"]);
        let flat = [
            ("namespace", text(&claims, "kubernetes.io", &["namespace"])),
            (
                "serviceaccount",
                text(&claims, "kubernetes.io", &["serviceaccount", "name"]),
            ),
            ("pod", text(&claims, "kubernetes.io", &["pod", "name"])),
            ("node", Some(node.clone())),
            ("node_uid", uid.clone()),
        ];
        for (k, v) in flat {
            if let Some(v) = v {
                claims.insert(k.into(), Value::String(v));
            }
        }
        (Platform::Kubernetes, uid.unwrap_or(node))
    } else if claims.contains_key("google") {
        let project = text(&claims, "google", &["compute_engine", "project_id"]);
        let instance = text(&claims, "google", &["compute_engine", "instance_id"]);
        let (Some(project), Some(instance)) = (project, instance) else {
            return Err(NodeTokenError::NoNode(
                "a GCP token without google.compute_engine project_id and instance_id (request it with format=full)"
                    .into(),
            ));
        };
        for k in ["project_id", "zone", "instance_id", "instance_name"] {
            if let Some(v) = text(&claims, "google", &["compute_engine", k]) {
                claims.insert(k.into(), Value::String(v));
            }
        }
        (Platform::Gcp, format!("{project}/{instance}"))
    } else {
        return Err(NodeTokenError::NoNode(
            "neither a Kubernetes (kubernetes.io) nor a GCP (google.compute_engine) token".into(),
        ));
    };
    claims.insert("platform".into(), Value::String(platform.as_str().into()));
    let node_key =
        crate::sha256_hex(format!("{}\0{}\0{id}", platform.as_str(), token.issuer).as_bytes());
    Ok(VerifiedNodeToken {
        token,
        platform,
        node_key,
        claims,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn verified(claims: Value) -> VerifiedToken {
        VerifiedToken {
            issuer: "https://k8s.example".into(),
            subject: "s".into(),
            audiences: vec!["herald".into()],
            claims: claims.as_object().unwrap().clone(),
            replay_key: "k".into(),
            expires_at: 0,
            digest: "d".into(),
        }
    }

    #[test]
    fn kubernetes_tokens_name_their_node_and_gain_flat_claims() {
        let t = node_token(verified(json!({"kubernetes.io": {
            "namespace": "herald", "serviceaccount": {"name": "agent", "uid": "u1"},
            "pod": {"name": "agent-x", "uid": "u2"}, "node": {"name": "n1", "uid": "u3"}}})))
        .unwrap();
        assert_eq!(t.platform, Platform::Kubernetes);
        assert_eq!(t.claims["node"], "n1");
        assert_eq!(t.claims["node_uid"], "u3");
        assert_eq!(t.claims["serviceaccount"], "agent");
        assert_eq!(t.claims["platform"], "kubernetes");
        // Another issuer's node of the same UID is another node.
        let mut other = verified(json!({"kubernetes.io": {"node": {"name": "n1", "uid": "u3"}}}));
        other.issuer = "https://other.example".into();
        assert_ne!(node_token(other).unwrap().node_key, t.node_key);
    }

    #[test]
    fn tokens_naming_no_node_are_refused() {
        for claims in [
            json!({"kubernetes.io": {"namespace": "n", "pod": {"name": "p"}}}),
            json!({"google": {"compute_engine": {"project_id": "p"}}}),
            json!({"sub": "x"}),
        ] {
            let e = node_token(verified(claims)).unwrap_err();
            assert_eq!(e.code(), ErrorCode::NodeTokenClaimsMissing);
        }
    }

    #[test]
    fn gcp_tokens_name_project_and_instance() {
        let t = node_token(verified(json!({"google": {"compute_engine": {
            "project_id": "acme", "zone": "europe-west1-b", "instance_id": 42,
            "instance_name": "vm-1"}}})))
        .unwrap();
        assert_eq!(t.platform, Platform::Gcp);
        assert_eq!(t.claims["instance_id"], "42");
        assert_eq!(t.claims["zone"], "europe-west1-b");
    }
}
