//! The node's TPM 2.0, through tss-esapi: the EK certificate and public
//! area, an attestation key created under the EK, credential activation and
//! quotes.
//!
//! Every call is blocking (the TSS talks to the TPM synchronously); callers
//! on an async runtime run them with `spawn_blocking`. Transient objects
//! are flushed after each operation: a TPM (and swtpm) has only a few
//! object slots, and another process may need them.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use tss_esapi::Context;
use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, DefaultKey, ak, ek};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    AttestInfo, Data, EncryptedSecret, IdObject, PcrSelectionListBuilder, PcrSlot, Private, Public,
    SignatureScheme, SymmetricDefinition,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};

/// TPM_ALG_SHA256, the PCR bank Herald quotes.
pub const PCR_BANK_SHA256: u32 = 0x000B;
/// Attempts at a quote whose PCRs did not move between read and quote.
const QUOTE_ATTEMPTS: usize = 5;

/// Errors from the TPM layer.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// The TCTI string is not one tss-esapi understands.
    #[error("TCTI {tcti:?}: {source}")]
    Tcti {
        /// The configured TCTI.
        tcti: String,
        /// Why.
        source: tss_esapi::Error,
    },
    /// A TPM command failed.
    #[error("TPM {op}: {source}")]
    Command {
        /// What was being done.
        op: &'static str,
        /// The TSS error.
        source: tss_esapi::Error,
    },
    /// The server asked for something this TPM layer does not do.
    #[error("{0}")]
    Unsupported(String),
    /// The PCRs kept changing while quoting.
    #[error("the PCRs changed during each of {QUOTE_ATTEMPTS} quote attempts")]
    PcrsUnstable,
    /// Reading or writing the persisted AK failed.
    #[error("AK file {path}: {source}")]
    AkFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn cmd(op: &'static str) -> impl FnOnce(tss_esapi::Error) -> TpmError {
    move |source| TpmError::Command { op, source }
}

/// What the agent tells the server about its TPM.
#[derive(Debug, Clone)]
pub struct TpmIdentity {
    /// The EK certificate, DER; empty when the TPM has none (a vTPM).
    pub ek_certificate: Vec<u8>,
    /// The EK public area, marshalled TPMT_PUBLIC.
    pub ek_public: Vec<u8>,
    /// The AK public area, marshalled TPMT_PUBLIC.
    pub ak_public: Vec<u8>,
}

/// A quote and the PCR values it covers.
#[derive(Debug, Clone)]
pub struct Quote {
    /// Marshalled TPMS_ATTEST.
    pub attest: Vec<u8>,
    /// Marshalled TPMT_SIGNATURE.
    pub signature: Vec<u8>,
    /// The selected PCRs' values, ascending PCR order.
    pub pcr_values: Vec<Vec<u8>>,
}

/// An open TPM with the node's EK and AK loaded.
pub struct NodeTpm {
    ctx: Context,
    ek: KeyHandle,
    ak: KeyHandle,
    identity: TpmIdentity,
}

impl std::fmt::Debug for NodeTpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTpm").finish_non_exhaustive()
    }
}

const EK_ALG: AsymmetricAlgorithmSelection = AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048);

impl NodeTpm {
    /// Opens the TPM at `tcti` (`device:/dev/tpmrm0`,
    /// `swtpm:host=127.0.0.1,port=2321`, ...), recreates the EK from its
    /// template and loads the AK persisted in `state_dir` — creating it
    /// under the EK on first use. The AK's private part is wrapped by the
    /// EK (it is useless outside this TPM), so it is kept as a file; the
    /// node keeps one AK, hence one AK name, across restarts.
    pub fn open(tcti: &str, state_dir: &Path) -> Result<NodeTpm, TpmError> {
        let conf = TctiNameConf::from_str(tcti).map_err(|source| TpmError::Tcti {
            tcti: tcti.to_owned(),
            source,
        })?;
        let mut ctx = Context::new(conf).map_err(|source| TpmError::Tcti {
            tcti: tcti.to_owned(),
            source,
        })?;
        // vTPMs (AWS NitroTPM, some hypervisors) have no EK certificate in
        // NV: the agent sends none and the server must know the EK by its
        // hash (a policy's `ek_hashes`) — or refuses it.
        let ek_certificate = match ek::retrieve_ek_pubcert(&mut ctx, EK_ALG) {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(error = %e, "no EK certificate in NV; attesting with the EK public only");
                Vec::new()
            }
        };
        let ek = ek::create_ek_object_2(&mut ctx, EK_ALG, DefaultKey).map_err(cmd("create EK"))?;
        match load_keys(&mut ctx, ek, state_dir) {
            Ok((ak, ek_public, ak_public)) => Ok(NodeTpm {
                ctx,
                ek,
                ak,
                identity: TpmIdentity {
                    ek_certificate,
                    ek_public,
                    ak_public,
                },
            }),
            Err(e) => {
                let _ = ctx.flush_context(ObjectHandle::from(ek));
                Err(e)
            }
        }
    }

    /// The EK certificate and the EK and AK public areas.
    pub fn identity(&self) -> &TpmIdentity {
        &self.identity
    }

    /// TPM2_ActivateCredential: recovers the server's secret, which only
    /// this TPM can do and only for an AK with the name the server used.
    pub fn activate_credential(
        &mut self,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, TpmError> {
        let id_object =
            IdObject::try_from(credential_blob.to_vec()).map_err(cmd("credential blob"))?;
        let secret = EncryptedSecret::try_from(encrypted_secret.to_vec())
            .map_err(cmd("encrypted secret"))?;
        // The EK's authPolicy is PolicySecret(TPM_RH_ENDORSEMENT): satisfy
        // it in a policy session; the AK takes its (empty) password.
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(cmd("start policy session"))?
            .ok_or_else(|| TpmError::Unsupported("the TPM returned no session".into()))?;
        let result = self.activate_in(session, id_object, secret);
        self.ctx.clear_sessions();
        let _ = self
            .ctx
            .flush_context(ObjectHandle::from(SessionHandle::from(session)));
        result
    }

    fn activate_in(
        &mut self,
        session: AuthSession,
        id_object: IdObject,
        secret: EncryptedSecret,
    ) -> Result<Vec<u8>, TpmError> {
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        self.ctx
            .tr_sess_set_attributes(session, attrs, mask)
            .map_err(cmd("session attributes"))?;
        let policy = PolicySession::try_from(session).map_err(cmd("policy session"))?;
        self.ctx
            .execute_with_nullauth_session(|ctx| {
                ctx.policy_secret(
                    policy,
                    AuthHandle::Endorsement,
                    Default::default(),
                    Default::default(),
                    Default::default(),
                    None,
                )
            })
            .map_err(cmd("PolicySecret(endorsement)"))?;
        self.ctx
            .set_sessions((Some(AuthSession::Password), Some(session), None));
        let digest = self
            .ctx
            .activate_credential(self.ak, self.ek, id_object, secret)
            .map_err(cmd("ActivateCredential"))?;
        Ok(digest.value().to_vec())
    }

    /// Quotes `pcrs` of `bank` with `qualifying_data` and reads their
    /// values. PCR reads are not atomic with the quote, so the values are
    /// checked against the quote's digest and the pair retried if a PCR
    /// moved in between.
    pub fn quote(
        &mut self,
        qualifying_data: &[u8],
        bank: u32,
        pcrs: &[u32],
    ) -> Result<Quote, TpmError> {
        if bank != PCR_BANK_SHA256 {
            return Err(TpmError::Unsupported(format!(
                "PCR bank {bank:#06x} (only SHA-256)"
            )));
        }
        let slots = pcrs
            .iter()
            .map(|i| {
                if *i > 23 {
                    return Err(TpmError::Unsupported(format!("PCR {i}")));
                }
                PcrSlot::try_from(1u32 << i).map_err(cmd("PCR slot"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let selection = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &slots)
            .build()
            .map_err(cmd("PCR selection"))?;
        let data = Data::try_from(qualifying_data.to_vec()).map_err(cmd("qualifying data"))?;
        let mut sorted: Vec<u32> = pcrs.to_vec();
        sorted.sort_unstable();
        for _ in 0..QUOTE_ATTEMPTS {
            let ak = self.ak;
            let (attest, signature) = self
                .ctx
                .execute_with_nullauth_session(|ctx| {
                    ctx.quote(ak, data.clone(), SignatureScheme::Null, selection.clone())
                })
                .map_err(cmd("Quote"))?;
            let values = self.read_pcrs(&sorted, &slots)?;
            let AttestInfo::Quote { info } = attest.attested() else {
                return Err(TpmError::Unsupported("the TPM returned no quote".into()));
            };
            let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            for v in &values {
                digest.update(v);
            }
            if digest.finish().as_ref() != info.pcr_digest().value() {
                continue;
            }
            return Ok(Quote {
                attest: attest.marshall().map_err(cmd("marshal quote"))?,
                signature: signature.marshall().map_err(cmd("marshal signature"))?,
                pcr_values: values,
            });
        }
        Err(TpmError::PcrsUnstable)
    }

    /// Reads the selected SHA-256 PCRs, ascending (PCR_Read returns at
    /// most eight digests per call).
    fn read_pcrs(&mut self, sorted: &[u32], slots: &[PcrSlot]) -> Result<Vec<Vec<u8>>, TpmError> {
        let selection = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, slots)
            .build()
            .map_err(cmd("PCR selection"))?;
        let data = self
            .ctx
            .execute_without_session(|ctx| {
                tss_esapi::abstraction::pcr::read_all(ctx, selection.clone())
            })
            .map_err(cmd("PCR_Read"))?;
        let bank = data
            .pcr_bank(HashingAlgorithm::Sha256)
            .ok_or_else(|| TpmError::Unsupported("the TPM has no SHA-256 PCR bank".into()))?;
        sorted
            .iter()
            .map(|i| {
                let slot = PcrSlot::try_from(1u32 << i).map_err(cmd("PCR slot"))?;
                bank.get_digest(slot)
                    .map(|d| d.value().to_vec())
                    .ok_or_else(|| TpmError::Unsupported(format!("PCR {i} was not returned")))
            })
            .collect()
    }
}

impl Drop for NodeTpm {
    fn drop(&mut self) {
        let _ = self.ctx.flush_context(ObjectHandle::from(self.ak));
        let _ = self.ctx.flush_context(ObjectHandle::from(self.ek));
    }
}

/// The EK public area and the AK (loaded), with its public area.
fn load_keys(
    ctx: &mut Context,
    ek: KeyHandle,
    state_dir: &Path,
) -> Result<(KeyHandle, Vec<u8>, Vec<u8>), TpmError> {
    let (ek_public, _, _) = ctx.read_public(ek).map_err(cmd("read EK public"))?;
    let ek_public = ek_public.marshall().map_err(cmd("marshal EK public"))?;
    let (ak, ak_public) = load_or_create_ak(ctx, ek, state_dir)?;
    Ok((ak, ek_public, ak_public))
}

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>, TpmError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TpmError::AkFile {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), TpmError> {
    herald_client::files::write_atomic(path, bytes, 0o600).map_err(|e| TpmError::AkFile {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Loads the AK kept in `state_dir`, or creates one under the EK (ECC
/// P-256, ECDSA/SHA-256, restricted signing, fixedTPM/fixedParent) and keeps it.
fn load_or_create_ak(
    ctx: &mut Context,
    ek: KeyHandle,
    state_dir: &Path,
) -> Result<(KeyHandle, Vec<u8>), TpmError> {
    let pub_path = state_dir.join("ak.pub");
    let priv_path = state_dir.join("ak.priv");
    if let (Some(public), Some(private)) = (read_opt(&pub_path)?, read_opt(&priv_path)?) {
        let parsed = Public::unmarshall(&public).map_err(cmd("stored AK public"))?;
        let private = Private::try_from(private).map_err(cmd("stored AK private"))?;
        let handle = ak::load_ak(ctx, ek, None, private, parsed).map_err(cmd("load AK"))?;
        return Ok((handle, public));
    }
    let created = ak::create_ak_2(
        ctx,
        ek,
        HashingAlgorithm::Sha256,
        AsymmetricAlgorithmSelection::Ecc(tss_esapi::interface_types::ecc::EccCurve::NistP256),
        SignatureSchemeAlgorithm::EcDsa,
        None,
        DefaultKey,
    )
    .map_err(cmd("create AK"))?;
    let public = created.out_public.marshall().map_err(cmd("marshal AK"))?;
    write_file(&priv_path, created.out_private.value())?;
    write_file(&pub_path, &public)?;
    let handle = ak::load_ak(ctx, ek, None, created.out_private, created.out_public)
        .map_err(cmd("load AK"))?;
    Ok((handle, public))
}

enum TpmCommand {
    Activate {
        blob: Vec<u8>,
        secret: Vec<u8>,
        reply: tokio::sync::oneshot::Sender<Result<Vec<u8>, TpmError>>,
    },
    Quote {
        data: Vec<u8>,
        bank: u32,
        pcrs: Vec<u32>,
        reply: tokio::sync::oneshot::Sender<Result<Quote, TpmError>>,
    },
}

/// A [`NodeTpm`] owned by its own thread (the TSS context must stay on
/// one thread), driven from async code. Dropping the handle closes the
/// TPM and flushes its objects.
#[derive(Debug)]
pub struct TpmHandle {
    tx: std::sync::mpsc::Sender<TpmCommand>,
    identity: TpmIdentity,
}

impl TpmHandle {
    /// Opens the TPM on a dedicated thread (see [`NodeTpm::open`]).
    pub async fn open(tcti: &str, state_dir: &Path) -> Result<TpmHandle, TpmError> {
        let (tx, rx) = std::sync::mpsc::channel::<TpmCommand>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (tcti, dir) = (tcti.to_owned(), state_dir.to_path_buf());
        std::thread::Builder::new()
            .name("herald-tpm".into())
            .spawn(move || {
                let mut tpm = match NodeTpm::open(&tcti, &dir) {
                    Ok(t) => {
                        let _ = ready_tx.send(Ok(t.identity().clone()));
                        t
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(command) = rx.recv() {
                    match command {
                        TpmCommand::Activate {
                            blob,
                            secret,
                            reply,
                        } => {
                            let _ = reply.send(tpm.activate_credential(&blob, &secret));
                        }
                        TpmCommand::Quote {
                            data,
                            bank,
                            pcrs,
                            reply,
                        } => {
                            let _ = reply.send(tpm.quote(&data, bank, &pcrs));
                        }
                    }
                }
            })
            .map_err(|e| TpmError::Unsupported(format!("cannot start the TPM thread: {e}")))?;
        let identity = ready_rx
            .await
            .map_err(|_| TpmError::Unsupported("the TPM thread ended".into()))??;
        Ok(TpmHandle { tx, identity })
    }

    /// The EK certificate and the EK and AK public areas.
    pub fn identity(&self) -> &TpmIdentity {
        &self.identity
    }

    /// See [`NodeTpm::activate_credential`].
    pub async fn activate_credential(
        &self,
        blob: Vec<u8>,
        secret: Vec<u8>,
    ) -> Result<Vec<u8>, TpmError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(TpmCommand::Activate {
                blob,
                secret,
                reply,
            })
            .map_err(|_| TpmError::Unsupported("the TPM thread ended".into()))?;
        rx.await
            .map_err(|_| TpmError::Unsupported("the TPM thread ended".into()))?
    }

    /// See [`NodeTpm::quote`].
    pub async fn quote(&self, data: Vec<u8>, bank: u32, pcrs: Vec<u32>) -> Result<Quote, TpmError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(TpmCommand::Quote {
                data,
                bank,
                pcrs,
                reply,
            })
            .map_err(|_| TpmError::Unsupported("the TPM thread ended".into()))?;
        rx.await
            .map_err(|_| TpmError::Unsupported("the TPM thread ended".into()))?
    }
}
