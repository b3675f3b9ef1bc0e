//! The EC2 instance metadata service, IMDSv2: a session token from `PUT
//! /latest/api/token`, then the instance identity document and its base64
//! `signature` (see `herald_attest::aws_iid` for why that signature).

use std::time::Duration;

/// Largest IMDS answer read, bytes.
const MAX_BODY: usize = 8 * 1024;
/// The session token's lifetime: one attestation's worth.
const TOKEN_TTL_SECONDS: &str = "60";

/// The document and its signature, as IMDS serves them.
#[derive(Debug, Clone)]
pub struct InstanceIdentity {
    /// The document's exact bytes.
    pub document: Vec<u8>,
    /// The base64 signature.
    pub signature: String,
}

async fn body(req: reqwest::RequestBuilder, what: &str) -> Result<Vec<u8>, String> {
    let mut resp = req.send().await.map_err(|e| format!("IMDS {what}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("IMDS {what}: HTTP {}", resp.status().as_u16()));
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("IMDS {what}: {e}"))?
    {
        if out.len() + chunk.len() > MAX_BODY {
            return Err(format!("IMDS {what}: more than {MAX_BODY} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Reads the instance identity document and its signature from the IMDS at
/// `base_url` (`http://169.254.169.254` on EC2).
pub async fn instance_identity(
    base_url: &str,
    timeout: Duration,
) -> Result<InstanceIdentity, String> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        // IMDS answers on the link itself; a proxy would see the token.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("IMDS client: {e}"))?;
    let base = base_url.trim_end_matches('/');
    let token = body(
        client
            .put(format!("{base}/latest/api/token"))
            .header("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECONDS),
        "token",
    )
    .await?;
    let token = String::from_utf8(token).map_err(|_| "IMDS token: not text".to_owned())?;
    let get = |path: &str| {
        client
            .get(format!("{base}/latest/dynamic/instance-identity/{path}"))
            .header("X-aws-ec2-metadata-token", token.trim())
    };
    let document = body(get("document"), "document").await?;
    let signature = body(get("signature"), "signature").await?;
    let signature =
        String::from_utf8(signature).map_err(|_| "IMDS signature: not text".to_owned())?;
    Ok(InstanceIdentity {
        document,
        signature,
    })
}
