//! Herald's fuzz entry points: one function per parser of untrusted input,
//! each driving the project's real code (no copies) and asserting the
//! invariants that must hold on *every* input, not only "does not panic":
//! typed errors with stable codes, round trips, and properties such as
//! "a request signed by the signer verifies" or "a forged token never
//! verifies".
//!
//! The cargo-fuzz targets in `fuzz/` (nightly, libFuzzer) call these
//! functions; the `corpus_replay` test calls them on every file of
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` on the stable
//! toolchain, so that a fixed crash stays fixed. A broken invariant is
//! reported the way libFuzzer expects: a panic.
//!
//! Inputs that combine several parts (a mode, a header and claims) are split
//! by [`split`]: the first byte picks the mode, `0xff` (never valid in
//! UTF-8 or JSON text) separates text parts.
#![forbid(unsafe_code)]
// A fuzz harness reports a broken invariant by panicking, and fixtures that
// cannot be built (no random source) are a broken harness, not bad input.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

mod csr;
mod forms;
mod jwt;
mod policy;
pub mod seeds;
mod sigv4;
mod tpm;
mod workload;

pub use csr::csr;
pub use forms::exchange_form;
pub use jwt::jwt;
pub use policy::policy;
pub use sigv4::sigv4;
pub use tpm::tpm;
pub use workload::workload_api;

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// Every target: its name (the directory under `fuzz/corpus/`) and entry
/// function.
pub const TARGETS: &[(&str, Target)] = &[
    ("tpm", tpm),
    ("csr", csr),
    ("jwt", jwt),
    ("policy", policy),
    ("sigv4", sigv4),
    ("exchange_form", exchange_form),
    ("workload_api", workload_api),
];

thread_local! {
    static ACCEPTED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Records that an input reached a target's accepting path (where the
/// strongest invariants are checked).
pub(crate) fn accept() {
    ACCEPTED.with(|a| a.set(a.get() + 1));
}

/// How many inputs on this thread reached an accepting path: the replay
/// test checks that the seeds exercise them, so that no invariant is
/// vacuous.
pub fn accepted() -> usize {
    ACCEPTED.with(std::cell::Cell::get)
}

/// The mode byte and the rest of an input (`None` for an empty input).
pub(crate) fn mode(data: &[u8], modes: u8) -> Option<(u8, &[u8])> {
    let (&first, rest) = data.split_first()?;
    Some((first % modes, rest))
}

/// Splits `data` into at most `n` parts at `0xff` bytes (the last part
/// keeps any further separators).
pub fn split(data: &[u8], n: usize) -> Vec<&[u8]> {
    data.splitn(n, |b| *b == 0xff).collect()
}

/// One current-thread runtime for the async verifiers (built once: the
/// harness runs millions of inputs).
pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::sync::OnceLock;
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime")
    })
    .block_on(f)
}

/// The fixtures' P-256 key (TPM AK, JWT issuer, CSR signer), PKCS#8:
/// generated once per process.
fn p256_pkcs8() -> &'static [u8] {
    use std::sync::OnceLock;
    static PKCS8: OnceLock<Vec<u8>> = OnceLock::new();
    PKCS8.get_or_init(|| {
        aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .expect("a P-256 key")
        .as_ref()
        .to_vec()
    })
}

/// The fixtures' key, signing in the fixed r ‖ s form (JWS, TPM).
pub(crate) fn p256() -> &'static aws_lc_rs::signature::EcdsaKeyPair {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    use std::sync::OnceLock;
    static KEY: OnceLock<EcdsaKeyPair> = OnceLock::new();
    KEY.get_or_init(|| {
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, p256_pkcs8())
            .expect("the P-256 key")
    })
}

/// The same key, signing in the DER form (X.509, PKCS#10).
pub(crate) fn p256_asn1() -> &'static aws_lc_rs::signature::EcdsaKeyPair {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    use std::sync::OnceLock;
    static KEY: OnceLock<EcdsaKeyPair> = OnceLock::new();
    KEY.get_or_init(|| {
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, p256_pkcs8())
            .expect("the P-256 key")
    })
}

/// The fixtures' uncompressed P-256 point.
pub(crate) fn p256_point() -> &'static [u8] {
    use aws_lc_rs::signature::KeyPair;
    p256().public_key().as_ref()
}

/// Signs `msg` with `key`.
pub(crate) fn sign_with(key: &aws_lc_rs::signature::EcdsaKeyPair, msg: &[u8]) -> Vec<u8> {
    key.sign(&aws_lc_rs::rand::SystemRandom::new(), msg)
        .expect("ECDSA signing")
        .as_ref()
        .to_vec()
}
