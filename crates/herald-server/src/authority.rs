//! Loading (or creating, on first start) the trust domain's CA from the
//! store, and the trust bundle derived from it.

use std::sync::Arc;

use herald_ca::authority::CaMaterial;
use herald_ca::kek::{KEK_ENV, read_private_file};
use herald_ca::{CertificateAuthority, JwtSigner, KeyEncryptionKey, TrustBundle};
use herald_cloud_creds::SessionKeyring;
use herald_core::{AuditEvent, EvidenceType};
use herald_store::{CaKeyRecord, Store};

use crate::ServerError;
use crate::config::ServerConfig;

/// How often validators should refresh the bundle, seconds.
pub const BUNDLE_REFRESH_HINT_SECS: u64 = 300;

/// The key ring in effect: the signing CA, the JWT signing key, the
/// session-token keyring, and the bundle published with them.
#[derive(Debug)]
pub struct CaState {
    /// The signing CA.
    pub ca: CertificateAuthority,
    /// The active JWT signing key.
    pub jwt: JwtSigner,
    /// The active audit key: signs checkpoints of the audit chain.
    pub audit: JwtSigner,
    /// Seals and opens cloud session tokens.
    sessions: SessionKeyring,
    /// The trust bundle (every non-retired key's anchor and JWT key).
    pub bundle: TrustBundle,
    /// Every non-retired X.509 CA key: (key id, its CA certificate, DER).
    x509_keys: Vec<(String, Vec<u8>)>,
}

impl CaState {
    /// The session-token keyring.
    pub fn sessions(&self) -> &SessionKeyring {
        &self.sessions
    }

    /// The certificate of the X.509 CA key `key_id`, while it is in the
    /// key ring: a presented SVID must verify against exactly the key its
    /// record names (in upstream mode the bundle's anchor is a root other
    /// CAs may share).
    pub fn ca_cert(&self, key_id: &str) -> Option<&[u8]> {
        self.x509_keys
            .iter()
            .find(|(id, _)| id == key_id)
            .map(|(_, cert)| cert.as_slice())
    }
}

/// Loads the key-encryption key: `HERALD_KEK`, else `ca.key_encryption_key_file`,
/// else (dev only) `<data_dir>/kek`, generated on first start.
pub fn load_kek(cfg: &ServerConfig) -> Result<KeyEncryptionKey, ServerError> {
    if let Ok(text) = std::env::var(KEK_ENV) {
        return Ok(KeyEncryptionKey::from_text(&text)?);
    }
    if let Some(path) = &cfg.ca.key_encryption_key_file {
        return Ok(KeyEncryptionKey::from_file(path)?);
    }
    if cfg.dev {
        let path = cfg.data_dir.join("kek");
        return Ok(if path.exists() {
            KeyEncryptionKey::from_file(&path)?
        } else {
            KeyEncryptionKey::generate_file(&path)?
        });
    }
    Err(ServerError::Config(format!(
        "no key-encryption key: set {KEK_ENV} or ca.key_encryption_key_file"
    )))
}

/// Opens the key ring from the store, creating the CA, JWT and session keys
/// on first start (one replica creates each; the others load it).
pub async fn load_or_create(
    store: &Store,
    cfg: &ServerConfig,
    kek: &KeyEncryptionKey,
    now: i64,
) -> Result<Arc<CaState>, ServerError> {
    let keys = store.ca_keys().await?;
    let has_active = |kind: &str| keys.iter().any(|k| k.kind == kind && k.status == "active");
    if !has_active("x509") {
        let (record, audit) = new_x509_key(cfg, kek, now, "active")?;
        store
            .insert_ca_key_unless(record, &["active"], audit)
            .await?;
    }
    if !has_active("jwt") {
        let (record, audit) = new_jwt_key(cfg, kek, now, "active")?;
        store
            .insert_ca_key_unless(record, &["active"], audit)
            .await?;
    }
    if !has_active("audit") {
        let (record, audit) = new_audit_key(cfg, kek, now, "active")?;
        store
            .insert_ca_key_unless(record, &["active"], audit)
            .await?;
    }
    if !has_active("session") {
        let ring = SessionKeyring::generate()
            .map_err(|e| ServerError::Config(format!("session keyring: {e}")))?;
        let active = ring.active_id().to_string();
        if let Some((id, key)) = ring.export().into_iter().find(|(id, _)| *id == active) {
            let record = key_record(
                "session",
                &id,
                Vec::new(),
                kek.seal(&id, key.as_ref())?,
                now,
                0,
                "active",
            );
            store
                .insert_ca_key_unless(record, &["active"], key_audit("session_key.create", &id))
                .await?;
        }
    }
    load(store, cfg, kek, now).await
}

/// A new X.509 CA key (self-signed root, or an intermediate under the
/// configured upstream CA) in `status`, sealed, with its audit event.
pub fn new_x509_key(
    cfg: &ServerConfig,
    kek: &KeyEncryptionKey,
    now: i64,
    status: &str,
) -> Result<(CaKeyRecord, AuditEvent), ServerError> {
    let material = generate(cfg, now)?;
    let record = CaKeyRecord {
        key_id: material.key_id.clone(),
        kind: "x509".into(),
        status: status.into(),
        cert_der: material.cert_der.clone(),
        chain_der: material.chain_der.clone(),
        encrypted_key: kek.seal(&material.key_id, &material.key_pkcs8)?,
        not_before: material.not_before,
        not_after: material.not_after,
        created_at: now,
        status_since: now,
    };
    let action = if status == "active" {
        "ca.create"
    } else {
        "ca.prepare"
    };
    let mut audit = key_audit(action, &material.key_id);
    audit.spiffe_id = Some(cfg.trust_domain.id().to_string());
    Ok((record, audit))
}

/// A new JWT signing key in `status` (`cert_der` holds the public point),
/// sealed, with its audit event.
pub fn new_jwt_key(
    cfg: &ServerConfig,
    kek: &KeyEncryptionKey,
    now: i64,
    status: &str,
) -> Result<(CaKeyRecord, AuditEvent), ServerError> {
    new_es256_key("jwt", "jwt_key", cfg, kek, now, status)
}

/// A new audit key (signs checkpoints of the audit chain) in `status`,
/// sealed, with its audit event.
pub fn new_audit_key(
    cfg: &ServerConfig,
    kek: &KeyEncryptionKey,
    now: i64,
    status: &str,
) -> Result<(CaKeyRecord, AuditEvent), ServerError> {
    new_es256_key("audit", "audit_key", cfg, kek, now, status)
}

fn new_es256_key(
    kind: &str,
    noun: &str,
    cfg: &ServerConfig,
    kek: &KeyEncryptionKey,
    now: i64,
    status: &str,
) -> Result<(CaKeyRecord, AuditEvent), ServerError> {
    let (signer, pkcs8) = JwtSigner::generate()?;
    let record = key_record(
        kind,
        signer.kid(),
        signer.public_point().to_vec(),
        kek.seal(signer.kid(), &pkcs8)?,
        now,
        cfg.ca.ttl.as_secs() as i64,
        status,
    );
    let verb = if status == "active" {
        "create"
    } else {
        "prepare"
    };
    Ok((record, key_audit(&format!("{noun}.{verb}"), signer.kid())))
}

/// Builds the key ring in effect from the store: the active CA, JWT and
/// session keys, and the bundle of every published (non-retired) key.
pub async fn load(
    store: &Store,
    cfg: &ServerConfig,
    kek: &KeyEncryptionKey,
    now: i64,
) -> Result<Arc<CaState>, ServerError> {
    // Read the sequence first: a change racing this load shows up as a
    // newer sequence at the next poll, never as a missed one.
    let sequence = store.bundle_sequence().await?;
    let keys = store.ca_keys().await?;
    let active = keys
        .iter()
        .rev()
        .find(|k| k.status == "active" && k.kind == "x509")
        .ok_or_else(|| ServerError::Config("the key ring has no active CA key".into()))?;
    let pkcs8 = kek.open(&active.key_id, &active.encrypted_key)?;
    let ca = CertificateAuthority::load(
        cfg.trust_domain.clone(),
        &active.key_id,
        &active.cert_der,
        &active.chain_der,
        &pkcs8,
    )?;
    if ca.not_after() <= now {
        return Err(ServerError::Config(format!(
            "the active CA key {} expired at {}; rotate it",
            active.key_id,
            ca.not_after()
        )));
    }
    let mut anchors: Vec<Vec<u8>> = Vec::new();
    let mut x509_keys = Vec::new();
    for k in keys
        .iter()
        .filter(|k| k.status != "retired" && k.kind == "x509")
    {
        x509_keys.push((k.key_id.clone(), k.cert_der.clone()));
        let anchor = match herald_ca::authority::split_der_certs(&k.chain_der)?.pop() {
            Some(a) => a,
            None => k.cert_der.clone(),
        };
        if !anchors.contains(&anchor) {
            anchors.push(anchor);
        }
    }
    let (jwt, jwt_authorities) = load_es256_keys(&keys, kek, "jwt")?;
    let (audit, _) = load_es256_keys(&keys, kek, "audit")?;
    let sessions = load_session_keys(&keys, kek)?;
    let bundle = TrustBundle {
        trust_domain: cfg.trust_domain.clone(),
        x509_authorities: anchors,
        jwt_authorities,
        sequence,
        refresh_hint_secs: BUNDLE_REFRESH_HINT_SECS,
    };
    Ok(Arc::new(CaState {
        ca,
        jwt,
        audit,
        sessions,
        bundle,
        x509_keys,
    }))
}

fn key_record(
    kind: &str,
    key_id: &str,
    public: Vec<u8>,
    sealed: Vec<u8>,
    now: i64,
    ttl: i64,
    status: &str,
) -> CaKeyRecord {
    CaKeyRecord {
        key_id: key_id.to_string(),
        kind: kind.into(),
        status: status.into(),
        cert_der: public,
        chain_der: Vec::new(),
        encrypted_key: sealed,
        not_before: now,
        not_after: now + ttl,
        created_at: now,
        status_since: now,
    }
}

fn key_audit(action: &str, key_id: &str) -> AuditEvent {
    let mut audit = AuditEvent::new(action, "server");
    audit.evidence_type = Some(EvidenceType::Operator);
    audit.serial = Some(key_id.to_string());
    audit
}

/// A published JWT key: (kid, public point).
type JwtAuthority = (String, Vec<u8>);

/// The active ES256 signer of `kind` (`jwt`, `audit`) and every
/// non-retired public key of that kind.
fn load_es256_keys(
    keys: &[CaKeyRecord],
    kek: &KeyEncryptionKey,
    kind: &str,
) -> Result<(JwtSigner, Vec<JwtAuthority>), ServerError> {
    let active = keys
        .iter()
        .rev()
        .find(|k| k.kind == kind && k.status == "active")
        .ok_or_else(|| ServerError::Config(format!("the key ring has no active {kind} key")))?;
    let pkcs8 = kek.open(&active.key_id, &active.encrypted_key)?;
    let signer = JwtSigner::from_pkcs8(&active.key_id, &pkcs8)?;
    let published = keys
        .iter()
        .filter(|k| k.kind == kind && k.status != "retired")
        .map(|k| (k.key_id.clone(), k.cert_der.clone()))
        .collect();
    Ok((signer, published))
}

/// The session-token keyring: every non-retired key opens, the active one seals.
fn load_session_keys(
    keys: &[CaKeyRecord],
    kek: &KeyEncryptionKey,
) -> Result<SessionKeyring, ServerError> {
    let mut ring_keys = Vec::new();
    let mut active = None;
    for k in keys
        .iter()
        .filter(|k| k.kind == "session" && k.status != "retired")
    {
        let raw = kek.open(&k.key_id, &k.encrypted_key)?;
        let key: [u8; 32] = raw.as_slice().try_into().map_err(|_| {
            ServerError::Config(format!("session key {} is not 32 bytes", k.key_id))
        })?;
        if k.status == "active" {
            active = Some(k.key_id.clone());
        }
        ring_keys.push((k.key_id.clone(), key));
    }
    let active = active.ok_or_else(|| ServerError::Config("no active session key".into()))?;
    SessionKeyring::from_keys(ring_keys, &active)
        .map_err(|e| ServerError::Config(format!("session keyring: {e}")))
}

fn generate(cfg: &ServerConfig, now: i64) -> Result<CaMaterial, ServerError> {
    match (&cfg.ca.upstream_cert, &cfg.ca.upstream_key) {
        (Some(cert), Some(key)) => {
            let chain = std::fs::read_to_string(cert)
                .map_err(|e| ServerError::Config(format!("{}: {e}", cert.display())))?;
            let key_pem = read_private_file(key)?;
            let key_pem = std::str::from_utf8(&key_pem)
                .map_err(|_| ServerError::Config(format!("{}: not PEM", key.display())))?;
            Ok(CaMaterial::generate_intermediate(
                &cfg.trust_domain,
                &chain,
                key_pem,
                cfg.ca.ttl,
                now,
            )?)
        }
        _ => Ok(CaMaterial::generate_root(
            &cfg.trust_domain,
            cfg.ca.ttl,
            now,
        )?),
    }
}
