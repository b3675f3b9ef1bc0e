//! `herald workload fetch`: a workload's X.509 SVIDs from the local
//! agent's Workload API, printed or written as files — once, or on every
//! rotation with a reload command (for software that reads certificates
//! from disk, the spiffe-helper pattern).

use std::path::PathBuf;

use clap::Args;
use herald_client::files::{self, SvidFiles};
use herald_client::workload_api::{WorkloadApiClient, socket_from_env, split_der_certs};
use herald_proto::workload::X509svidResponse;

use crate::cli::CliError;

/// `herald workload fetch`.
#[derive(Args, Debug)]
pub struct FetchArgs {
    /// The Workload API socket; defaults to SPIFFE_ENDPOINT_SOCKET (unix:///path).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Write the first SVID (svid.pem, svid.key 0600, bundle.pem, and each federated
    /// trust domain's bundle as federated/<td>.pem) into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Which SVID to write when the workload has several: its hint or SPIFFE ID.
    #[arg(long)]
    select: Option<String>,
    /// Keep running: rewrite the files on every rotation.
    #[arg(long, requires = "out")]
    watch: bool,
    /// With --watch: run this command (via /bin/sh -c) after each rewrite.
    #[arg(long, requires = "watch")]
    reload: Option<String>,
}

fn write_out(resp: &X509svidResponse, args: &FetchArgs) -> Result<Option<String>, CliError> {
    let Some(dir) = &args.out else {
        return Ok(None);
    };
    let svid = match &args.select {
        Some(sel) => resp
            .svids
            .iter()
            .find(|s| &s.hint == sel || &s.spiffe_id == sel),
        None => resp.svids.first(),
    }
    .ok_or_else(|| CliError::new("not_found", "no SVID matches --select"))?;
    let err = |e: herald_client::ClientError| CliError::new("invalid_response", e.to_string());
    files::write_svid_dir(
        dir,
        &SvidFiles {
            cert_chain: split_der_certs(&svid.x509_svid).map_err(err)?,
            key_pkcs8: svid.x509_svid_key.clone(),
            bundle: split_der_certs(&svid.bundle).map_err(err)?,
        },
    )
    .map_err(|e| CliError::new("io", e.to_string()))?;
    let mut federated = Vec::new();
    for (td, der) in &resp.federated_bundles {
        federated.push((td.clone(), split_der_certs(der).map_err(err)?));
    }
    federated.sort();
    files::write_federated_bundles(dir, &federated)
        .map_err(|e| CliError::new("io", e.to_string()))?;
    Ok(Some(svid.spiffe_id.clone()))
}

/// Runs `herald workload fetch`.
pub async fn fetch(args: FetchArgs) -> Result<(), CliError> {
    let socket = args
        .socket
        .clone()
        .or_else(socket_from_env)
        .ok_or_else(|| {
            CliError::new(
                "config",
                "--socket or SPIFFE_ENDPOINT_SOCKET (unix:///path) is required",
            )
        })?;
    let client = WorkloadApiClient::connect(&socket).await?;
    if !args.watch {
        let resp = client.fetch_x509().await?;
        for s in &resp.svids {
            println!("{}\t{}", s.spiffe_id, s.hint);
        }
        write_out(&resp, &args)?;
        return Ok(());
    }
    let mut stream = client.watch_x509().await?;
    loop {
        let resp = tokio::select! {
            m = stream.message() => m.map_err(herald_client::ClientError::from)?,
            () = crate::cli::wait_for_signal() => return Ok(()),
        };
        let Some(resp) = resp else {
            return Err(CliError::new(
                "unavailable",
                "the Workload API closed the stream",
            ));
        };
        if let Some(id) = write_out(&resp, &args)? {
            println!("wrote {id}");
        }
        if let Some(cmd) = &args.reload {
            match tokio::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(cmd)
                .status()
                .await
            {
                Ok(s) if s.success() => {}
                Ok(s) => eprintln!("herald: reload command exited with {s}"),
                Err(e) => eprintln!("herald: reload command: {e}"),
            }
        }
    }
}
