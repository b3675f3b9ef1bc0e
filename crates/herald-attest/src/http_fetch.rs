//! Fetching a small document over HTTPS for a verifier (OIDC discovery
//! and JWKS, SPIFFE bundle endpoints): bounded in size, with errors that
//! name their cause.

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// Connection, TLS handshake, timeout or a broken body.
    #[error("{0}")]
    Transport(String),
    /// The server's TLS certificate was refused (an unknown issuer,
    /// expired, or not valid for the name dialled): a matter of
    /// configuration (which roots are trusted), not of the network.
    #[error("certificate refused: {0}")]
    Certificate(String),
    /// The server answered with a non-2xx status.
    #[error("HTTP {0}")]
    Status(u16),
    /// The document is larger than the caller's cap.
    #[error("document too large (more than {0} bytes)")]
    TooLarge(usize),
}

/// GETs `url` and returns its body, refusing one larger than `max` bytes
/// without reading past the cap.
pub async fn get_capped(
    client: &reqwest::Client,
    url: &str,
    accept: &str,
    max: usize,
) -> Result<Vec<u8>, FetchError> {
    let mut resp = client
        .get(url)
        .header("accept", accept)
        .send()
        .await
        .map_err(|e| {
            if certificate_refused(&e) {
                FetchError::Certificate(describe(&e))
            } else {
                FetchError::Transport(describe(&e))
            }
        })?;
    if !resp.status().is_success() {
        return Err(FetchError::Status(resp.status().as_u16()));
    }
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(FetchError::TooLarge(max));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| FetchError::Transport(describe(&e)))?
    {
        if body.len() + chunk.len() > max {
            return Err(FetchError::TooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// What went wrong, down to the cause an operator can act on: "timed
/// out", "connection refused", "invalid peer certificate: UnknownIssuer",
/// rather than reqwest's outermost "error sending request".
pub fn describe(e: &reqwest::Error) -> String {
    let mut causes: Vec<String> = Vec::new();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        // Wrappers repeat their inner error's text: keep each cause once.
        if !causes
            .iter()
            .any(|c| c.contains(&text) || text.contains(c.as_str()))
        {
            causes.push(text);
        }
        source = s.source();
    }
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_decode() || e.is_body() {
        "bad response body"
    } else {
        "request failed"
    };
    match causes.last() {
        Some(root) if !e.is_timeout() => format!("{kind}: {root}"),
        _ => kind.to_owned(),
    }
}

/// Whether `e` is rustls refusing the peer's certificate. rustls's error
/// sits inside `io::Error`s (nested: the TLS stream's inside the
/// connector's), whose `source()` skips it: look inside each.
fn certificate_refused(e: &reqwest::Error) -> bool {
    fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return matches!(tls, rustls::Error::InvalidCertificate(_));
        }
        e.downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .is_some_and(|inner| refused(inner))
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if refused(s) {
            return true;
        }
        source = s.source();
    }
    false
}
