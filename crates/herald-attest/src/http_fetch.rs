//! Fetching a small document over HTTPS for a verifier (OIDC discovery
//! and JWKS, SPIFFE bundle endpoints): bounded in size, with errors that
//! name their cause.

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// Connection, TLS, timeout or a broken body.
    #[error("{0}")]
    Transport(String),
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
        .map_err(|e| FetchError::Transport(describe(&e)))?;
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
