//! TPM node evidence in policies: trusted EK roots, the PCR selection to
//! quote, golden PCR values and firmware rules.
//!
//! ```yaml
//! evidence:
//!   tpm:
//!     ek_roots: [tpm-roots/manufacturer-root.pem]   # relative to the policy file
//!     ek_intermediates: []                           # if TPMs do not carry them
//!     pcr_bank: sha256
//!     pcrs: [0, 2, 4, 7]
//!     golden:                                        # several sets: roll out an OS update
//!       - name: image-2026-10
//!         pcrs: { 0: "<64 hex>", 7: "<64 hex>" }     # PCRs left out are unconstrained
//!     min_firmware_version: 0
//!     reattest: every_renewal                        # or a duration: continuous attestation
//!   require: [join_token]                            # checked at enrolment only
//! spiffe_id:
//!   prefix: spiffe://example.org/node/
//!   template: "spiffe://example.org/node/tpm/{ek_hash}"
//! ```
//!
//! The claims TPM evidence offers to pins, `condition` and templates are
//! `ek_hash` (hex SHA-256 of the EK public area), `ak_name` (hex),
//! `firmware_version`, `reset_count`, `restart_count` and
//! `ek_certificate.{subject,issuer,serial}` (absent for an EK accepted by
//! its hash: vTPMs without an EK certificate are listed in `ek_hashes`
//! instead of chaining to `ek_roots`).

use std::collections::BTreeMap;
use std::path::Path;

use crate::model::TpmSpec;

/// TPM_ALG_SHA256, the only PCR bank accepted for now.
pub const PCR_BANK_SHA256: u16 = 0x000B;
/// Highest PCR index (TPM 2.0 PC client platforms have 24).
pub const MAX_PCR: u8 = 23;
/// Most golden sets per policy.
pub const MAX_GOLDEN_SETS: usize = 64;

/// One allowed set of PCR values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoldenSet {
    /// Its name, recorded with each decision it allowed.
    pub name: String,
    /// PCR index → required digest. PCRs not listed are unconstrained.
    pub values: BTreeMap<u8, Vec<u8>>,
}

/// When a node SVID's renewal needs a fresh quote (continuous attestation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reattest {
    /// Every renewal carries a fresh quote.
    EveryRenewal,
    /// A renewal needs a fresh quote once the last one is this old.
    After(std::time::Duration),
}

impl Reattest {
    /// Whether a renewal of a lineage whose last quote was `quote_age`
    /// seconds ago must carry a fresh one.
    pub fn due(self, quote_age: i64) -> bool {
        match self {
            Reattest::EveryRenewal => true,
            Reattest::After(d) => quote_age < 0 || quote_age as u64 >= d.as_secs(),
        }
    }
}

/// A policy's TPM rules, validated at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmRules {
    /// Manufacturer root certificates, DER.
    pub ek_roots: Vec<Vec<u8>>,
    /// EKs accepted by hash (lowercase hex SHA-256 of the TPMT_PUBLIC),
    /// with or without a certificate: vTPMs that have none.
    pub ek_hashes: Vec<String>,
    /// Extra intermediate CA certificates, DER.
    pub ek_intermediates: Vec<Vec<u8>>,
    /// The PCR bank to quote (TPM_ALG_ID).
    pub pcr_bank: u16,
    /// The PCRs to quote, ascending and unique.
    pub pcrs: Vec<u8>,
    /// Allowed value sets; the quote must match at least one.
    pub golden: Vec<GoldenSet>,
    /// Lowest accepted TPM firmware version, if any.
    pub min_firmware_version: Option<u64>,
    /// Continuous attestation: when renewals need a fresh quote.
    pub reattest: Option<Reattest>,
}

impl TpmRules {
    /// The golden set the PCR values match, if any.
    pub fn matching_golden(&self, pcrs: &BTreeMap<u8, Vec<u8>>) -> Option<&GoldenSet> {
        self.golden.iter().find(|g| {
            g.values
                .iter()
                .all(|(i, want)| pcrs.get(i).is_some_and(|got| got == want))
        })
    }
}

pub(crate) fn read_pem_certs(base: &Path, file: &str) -> Result<Vec<Vec<u8>>, String> {
    let path = base.join(file);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Vec<Vec<u8>> = pem::parse_many(&text)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .collect();
    if certs.is_empty() {
        return Err(format!("{} holds no CERTIFICATE", path.display()));
    }
    Ok(certs)
}

/// Validates a policy's `evidence.tpm` and reads its certificate files
/// (relative to `policy_path`'s directory).
pub(crate) fn compile(spec: &TpmSpec, policy_path: &Path) -> Result<TpmRules, Vec<String>> {
    let base = policy_path.parent().unwrap_or(Path::new("."));
    let mut errors = Vec::new();
    let mut load = |files: &[String]| {
        let mut out = Vec::new();
        for f in files {
            match read_pem_certs(base, f) {
                Ok(mut c) => out.append(&mut c),
                Err(e) => errors.push(format!("evidence.tpm: {e}")),
            }
        }
        out
    };
    let ek_roots = load(&spec.ek_roots);
    let ek_intermediates = load(&spec.ek_intermediates);
    if spec.ek_roots.is_empty() && spec.ek_hashes.is_empty() {
        errors.push(
            "evidence.tpm needs ek_roots (root certificate files) or ek_hashes (EKs without a certificate)"
                .into(),
        );
    }
    let mut ek_hashes = Vec::new();
    for h in &spec.ek_hashes {
        let h = h.to_ascii_lowercase();
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            errors.push(format!(
                "evidence.tpm.ek_hashes: {h:?} is not 64 hex digits (SHA-256 of the EK's TPMT_PUBLIC)"
            ));
        } else if !ek_hashes.contains(&h) {
            ek_hashes.push(h);
        }
    }
    let reattest = match spec.reattest.as_deref() {
        None => None,
        Some("every_renewal") => Some(Reattest::EveryRenewal),
        Some(t) => match humantime::parse_duration(t) {
            Ok(d) if !d.is_zero() => Some(Reattest::After(d)),
            _ => {
                errors.push(format!(
                    "evidence.tpm.reattest {t:?} must be every_renewal or a duration"
                ));
                None
            }
        },
    };
    if spec.pcr_bank != "sha256" {
        errors.push(format!(
            "evidence.tpm.pcr_bank {:?} is not supported (sha256)",
            spec.pcr_bank
        ));
    }
    let mut pcrs = spec.pcrs.clone();
    pcrs.sort_unstable();
    pcrs.dedup();
    if pcrs.len() != spec.pcrs.len() || pcrs.iter().any(|p| *p > MAX_PCR) || pcrs.is_empty() {
        errors.push(format!(
            "evidence.tpm.pcrs must be 1-24 distinct indices 0..={MAX_PCR}"
        ));
    }
    if spec.golden.is_empty() || spec.golden.len() > MAX_GOLDEN_SETS {
        errors.push(format!(
            "evidence.tpm.golden must list 1-{MAX_GOLDEN_SETS} sets of PCR values (deny by default)"
        ));
    }
    let mut golden = Vec::new();
    for g in &spec.golden {
        let mut values = BTreeMap::new();
        if g.pcrs.is_empty() {
            errors.push(format!("golden set {:?} constrains no PCR", g.name));
        }
        for (i, hexval) in &g.pcrs {
            if !pcrs.contains(i) {
                errors.push(format!(
                    "golden set {:?} names PCR {i}, which is not in evidence.tpm.pcrs",
                    g.name
                ));
            }
            match hex::decode(hexval) {
                Ok(v) if v.len() == 32 => {
                    values.insert(*i, v);
                }
                _ => errors.push(format!(
                    "golden set {:?}: PCR {i} must be 64 hex digits (SHA-256)",
                    g.name
                )),
            }
        }
        if golden.iter().any(|x: &GoldenSet| x.name == g.name) {
            errors.push(format!("golden set name {:?} used twice", g.name));
        }
        golden.push(GoldenSet {
            name: g.name.clone(),
            values,
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(TpmRules {
        ek_roots,
        ek_hashes,
        ek_intermediates,
        pcr_bank: PCR_BANK_SHA256,
        pcrs,
        golden,
        min_firmware_version: spec.min_firmware_version,
        reattest,
    })
}

/// Most workload registrations per node policy.
pub const MAX_REGISTRATIONS: usize = 2000;
/// Default lifetime of a workload X.509 SVID.
pub const DEFAULT_WORKLOAD_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// A workload registration of a node policy: callers on an admitted
/// node's Workload API socket matching every selector get `spiffe_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The workload's SPIFFE ID, or a template filled from each caller's
    /// selectors (`spiffe://td/ns/{k8s:ns}/sa/{k8s:sa}`).
    pub spiffe_id: herald_core::RegisteredId,
    /// All must match the caller.
    pub selectors: Vec<herald_core::Selector>,
    /// X.509 SVID lifetime.
    pub ttl: std::time::Duration,
    /// DNS SANs for the X.509 SVID.
    pub dns_names: Vec<String>,
    /// Audiences a JWT-SVID for this workload may carry (none: no JWT-SVIDs).
    pub jwt_audiences: Vec<String>,
    /// Hint for workloads that get several SVIDs (unique per node).
    pub hint: String,
    /// The cloud role (one of the policy's `grants.cloud`) whose session
    /// credentials the agent's credentials endpoint serves this workload.
    pub cloud_role: Option<String>,
    /// Foreign trust domains whose bundles this workload is given (SPIFFE
    /// federation), so it can authenticate their workloads.
    pub federates_with: Vec<herald_core::TrustDomain>,
}

/// Validates a policy's `workloads`.
pub(crate) fn compile_workloads(
    specs: &[crate::model::WorkloadSpec],
    opts: &crate::LoadOptions,
    node_prefix: &str,
) -> Result<Vec<Registration>, Vec<String>> {
    let trust_domain = &opts.trust_domain;
    let reserved: Vec<String> = opts
        .reserved_dns_names
        .iter()
        .map(|d| crate::dns_name_key(d))
        .collect();
    let mut errors = Vec::new();
    let mut out: Vec<Registration> = Vec::new();
    if specs.len() > MAX_REGISTRATIONS {
        errors.push(format!("at most {MAX_REGISTRATIONS} workloads per policy"));
    }
    // The node identities' prefix and Herald's own IDs: no registration
    // (nor any expansion of a template) may land under either.
    let node_prefix_id = herald_core::SpiffeId::parse(node_prefix.trim_end_matches('/')).ok();
    let reserved_id = trust_domain
        .spiffe_id(herald_core::spiffe_id::RESERVED_PATH)
        .ok();
    for (i, w) in specs.iter().enumerate() {
        let at = |m: String| format!("workloads[{i}]: {m}");
        let id = match herald_core::RegisteredId::parse(&w.spiffe_id, trust_domain) {
            Ok(id) => Some(id),
            Err(e) => {
                errors.push(at(format!("{}: {e}", w.spiffe_id)));
                None
            }
        };
        if let Some(id) = &id {
            let under = |p: &Option<herald_core::SpiffeId>| {
                p.as_ref().is_some_and(|p| id.could_be_under(p))
            };
            if under(&node_prefix_id) || w.spiffe_id.starts_with(node_prefix) {
                errors.push(at(
                    "a workload ID may not sit under the node identities' prefix".into(),
                ));
            }
            if under(&reserved_id) {
                errors.push(at(format!(
                    "{} can name an identity under spiffe://{trust_domain}{}, reserved for Herald's own services",
                    w.spiffe_id,
                    herald_core::spiffe_id::RESERVED_PATH
                )));
            }
        }
        let mut selectors = Vec::new();
        for s in &w.selectors {
            match herald_core::Selector::parse(s) {
                Ok(s) => selectors.push(s),
                Err(e) => errors.push(at(e.to_string())),
            }
        }
        if w.selectors.is_empty() {
            errors.push(at("needs at least one selector".into()));
        }
        selectors.sort();
        selectors.dedup();
        let ttl = match &w.ttl {
            None => DEFAULT_WORKLOAD_TTL,
            Some(t) => match humantime::parse_duration(t) {
                Ok(d) if !d.is_zero() && d <= crate::MAX_TTL => d,
                _ => {
                    errors.push(at(format!("ttl {t:?} must be more than 0 and at most 24h")));
                    DEFAULT_WORKLOAD_TTL
                }
            },
        };
        for d in &w.dns_names {
            if d.is_empty()
                || d.len() > 253
                || !d
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                errors.push(at(format!("dns name {d:?} is not a hostname")));
            } else if reserved.contains(&crate::dns_name_key(d)) {
                errors.push(at(format!(
                    "dns name {d:?} is one of the server's own names (tls.dns_names)"
                )));
            }
        }
        if w.jwt_audiences.iter().any(String::is_empty) {
            errors.push(at("an empty JWT audience".into()));
        }
        let mut federates_with = Vec::new();
        for f in &w.federates_with {
            match herald_core::TrustDomain::new(f) {
                Ok(td) if &td == trust_domain => {
                    errors.push(at(format!("federates_with {f:?} is this trust domain")));
                }
                Ok(td) if !federates_with.contains(&td) => federates_with.push(td),
                Ok(_) => {}
                Err(e) => errors.push(at(format!("federates_with {f:?}: {e}"))),
            }
        }
        let hint = w.hint.clone().unwrap_or_default();
        if !hint.is_empty() && out.iter().any(|r| r.hint == hint) {
            errors.push(at(format!("hint {hint:?} is used twice")));
        }
        if let Some(spiffe_id) = id {
            if out
                .iter()
                .any(|r| r.spiffe_id == spiffe_id && r.selectors == selectors)
            {
                errors.push(at(format!(
                    "{spiffe_id} is registered twice with the same selectors"
                )));
            }
            out.push(Registration {
                spiffe_id,
                selectors,
                ttl,
                dns_names: w.dns_names.clone(),
                jwt_audiences: w.jwt_audiences.clone(),
                hint,
                cloud_role: w.cloud_role.clone(),
                federates_with,
            });
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}
