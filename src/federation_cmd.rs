//! `herald federation …`: the foreign trust domains' bundles as the
//! datastore holds them (shared by every replica), fetching one now, and
//! setting one by hand for a partner with no reachable endpoint.

use std::path::PathBuf;

use clap::Subcommand;
use herald_core::TrustDomain;
use herald_server::federation::{self, FetchFailure, RefreshOutcome};

use crate::cli::{CliError, ConfigArgs, load_config, open_store, operator};

/// SPIFFE federation administration.
#[derive(Subcommand, Debug)]
pub enum FederationCommand {
    /// One line per federated trust domain: configured endpoint, sequence,
    /// when last confirmed, and the last error since.
    List {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// How stale each configured trust domain's bundle is; exits with
    /// `federation_stale` when one has none or was not confirmed within
    /// `--max-age`. A trust domain without an endpoint (`url`; set by hand)
    /// is never late for a refresh: it shows when it was set, and is
    /// stale only once every CA certificate in it has expired.
    Status {
        #[command(flatten)]
        config: ConfigArgs,
        /// Oldest acceptable confirmation (default: 3 × federation.max_refresh).
        #[arg(long, value_parser = humantime::parse_duration)]
        max_age: Option<std::time::Duration>,
    },
    /// Print one trust domain's bundle (SPIFFE bundle JSON, or PEM).
    Show {
        #[command(flatten)]
        config: ConfigArgs,
        /// The trust domain.
        trust_domain: String,
        /// Print the X.509 authorities as PEM.
        #[arg(long)]
        pem: bool,
    },
    /// Fetch configured trust domains' bundles now (all, or the one named).
    Refresh {
        #[command(flatten)]
        config: ConfigArgs,
        /// Only this trust domain.
        trust_domain: Option<String>,
    },
    /// Set a trust domain's bundle by hand from FILE (SPIFFE bundle JSON or
    /// PEM CA certificates), for air-gapped partners. A document with a
    /// `spiffe_sequence` must move past the stored one.
    Set {
        #[command(flatten)]
        config: ConfigArgs,
        /// The trust domain.
        trust_domain: String,
        /// The bundle file.
        file: PathBuf,
    },
    /// Forget a trust domain's bundle.
    Delete {
        #[command(flatten)]
        config: ConfigArgs,
        /// The trust domain.
        trust_domain: String,
    },
}

fn trust_domain(text: &str) -> Result<TrustDomain, CliError> {
    TrustDomain::new(text).map_err(|e| CliError::new("invalid_argument", e.to_string()))
}

fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into())
}

/// Runs `herald federation …`.
pub async fn federation(cmd: FederationCommand) -> Result<(), CliError> {
    match cmd {
        FederationCommand::List { config, json } => list(config, json).await,
        FederationCommand::Status { config, max_age } => status(config, max_age).await,
        FederationCommand::Show {
            config,
            trust_domain: td,
            pem,
        } => show(config, &td, pem).await,
        FederationCommand::Refresh {
            config,
            trust_domain: td,
        } => refresh(config, td.as_deref()).await,
        FederationCommand::Set {
            config,
            trust_domain: td,
            file,
        } => set(config, &td, &file).await,
        FederationCommand::Delete {
            config,
            trust_domain: td,
        } => delete(config, &td).await,
    }
}

async fn list(config: ConfigArgs, json: bool) -> Result<(), CliError> {
    let cfg = load_config(&config)?;
    let store = open_store(&cfg).await?;
    let records = store.federated_bundles().await;
    store.close().await;
    let records = records?;
    let mut names: Vec<String> = cfg
        .federation
        .trust_domains
        .iter()
        .map(|t| t.trust_domain.to_string())
        .collect();
    names.extend(records.iter().map(|r| r.trust_domain.clone()));
    names.sort();
    names.dedup();
    if !json {
        println!(
            "{:<28} {:<13} {:<8} {:<21} {:<8} LAST ERROR",
            "TRUST DOMAIN", "PROFILE", "SEQ", "CONFIRMED", "SOURCE"
        );
    }
    for name in names {
        let configured = cfg
            .federation
            .trust_domains
            .iter()
            .find(|t| t.trust_domain.as_str() == name);
        let record = records.iter().find(|r| r.trust_domain == name);
        let profile = configured.map_or("(not configured)", |t| {
            if t.url.is_some() {
                t.profile.as_str()
            } else {
                "manual"
            }
        });
        if json {
            let line = serde_json::json!({
                "trust_domain": name,
                "configured": configured.is_some(),
                "url": configured.and_then(|t| t.url.clone()),
                "profile": profile,
                "sequence": record.and_then(|r| r.sequence),
                "refresh_hint_secs": record.and_then(|r| r.refresh_hint_secs),
                "source": record.map(|r| r.source.clone()),
                "updated_at": record.map(|r| rfc3339_ms(r.updated_at_ms)),
                "confirmed_at": record.map(|r| rfc3339_ms(r.checked_at_ms)),
                "last_error": record.and_then(|r| r.last_error.clone()),
            });
            println!("{line}");
        } else {
            println!(
                "{:<28} {:<13} {:<8} {:<21} {:<8} {}",
                name,
                profile,
                record
                    .and_then(|r| r.sequence)
                    .map_or("-".into(), |s| s.to_string()),
                record.map_or("never".into(), |r| rfc3339_ms(r.checked_at_ms)),
                record.map_or("-", |r| r.source.as_str()),
                record.and_then(|r| r.last_error.as_deref()).unwrap_or("")
            );
        }
    }
    Ok(())
}

async fn status(config: ConfigArgs, max_age: Option<std::time::Duration>) -> Result<(), CliError> {
    let cfg = load_config(&config)?;
    let store = open_store(&cfg).await?;
    let records = store.federated_bundles().await;
    store.close().await;
    let records = records?;
    let max_age = max_age.unwrap_or_else(|| federation::stale_after(&cfg.federation));
    let now = herald_core::audit::now_ms();
    let mut stale = Vec::new();
    for t in &cfg.federation.trust_domains {
        let td = t.trust_domain.to_string();
        match records.iter().find(|r| r.trust_domain == td) {
            None => {
                println!("{td}: no bundle held");
                stale.push(td);
            }
            Some(r) if t.url.is_none() => {
                let (line, expired) = manual_status(&t.trust_domain, r, now);
                println!("{td}: {line}");
                if expired {
                    stale.push(td);
                }
            }
            Some(r) => {
                let age_ms = (now - r.checked_at_ms).max(0);
                let age_s = age_ms / 1000;
                let is_stale = age_ms as u128 > max_age.as_millis();
                println!(
                    "{td}: {} (confirmed {} ago, sequence {}){}",
                    if is_stale { "STALE" } else { "fresh" },
                    humantime::format_duration(std::time::Duration::from_secs(age_s as u64)),
                    r.sequence.map_or("-".into(), |s| s.to_string()),
                    r.last_error
                        .as_deref()
                        .map(|e| format!("; last error: {e}"))
                        .unwrap_or_default()
                );
                if is_stale {
                    stale.push(td);
                }
            }
        }
    }
    if stale.is_empty() {
        Ok(())
    } else {
        Err(CliError::new(
            "federation_stale",
            format!("stale or missing bundles: {}", stale.join(", ")),
        ))
    }
}

/// The status of a bundle set by hand: when it was set and, since nothing
/// refreshes it, whether its CA certificates have expired (`true`: all).
fn manual_status(
    td: &TrustDomain,
    r: &herald_store::FederatedBundleRecord,
    now_ms: i64,
) -> (String, bool) {
    let ago = |ms: i64| {
        humantime::format_duration(std::time::Duration::from_secs(ms.max(0) as u64 / 1000))
    };
    let not_after: Vec<i64> = herald_ca::bundle::ForeignBundle::parse(td, r.jwks.as_bytes())
        .map(|b| {
            b.x509_authorities
                .iter()
                .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
                .map(|(_, c)| c.validity().not_after.timestamp())
                .collect()
        })
        .unwrap_or_default();
    let now_s = now_ms / 1000;
    let expired = not_after.iter().filter(|t| **t <= now_s).count();
    let all_expired = !not_after.is_empty() && expired == not_after.len();
    let certs = match (expired, all_expired) {
        (0, _) => String::new(),
        (_, true) => format!(
            "; EXPIRED: every CA certificate expired (the last {} ago)",
            ago((now_s - not_after.iter().copied().max().unwrap_or(now_s)) * 1000)
        ),
        (n, false) => format!("; {n} of {} CA certificates expired", not_after.len()),
    };
    (
        format!(
            "manual (set {} ago, sequence {}){certs}",
            ago(now_ms - r.checked_at_ms),
            r.sequence.map_or("-".into(), |s| s.to_string()),
        ),
        all_expired,
    )
}

async fn show(config: ConfigArgs, td: &str, pem: bool) -> Result<(), CliError> {
    let td = trust_domain(td)?;
    let cfg = load_config(&config)?;
    let store = open_store(&cfg).await?;
    let records = store.federated_bundles().await;
    store.close().await;
    let record = records?
        .into_iter()
        .find(|r| r.trust_domain == td.as_str())
        .ok_or_else(|| CliError::new("not_found", format!("no bundle is held for {td}")))?;
    if pem {
        let bundle = herald_ca::bundle::ForeignBundle::parse(&td, record.jwks.as_bytes())
            .map_err(|e| CliError::new("internal", e.to_string()))?;
        print!("{}", bundle.to_pem());
    } else {
        println!("{}", record.jwks);
    }
    Ok(())
}

fn print_outcome(td: &TrustDomain, outcome: &RefreshOutcome) {
    match outcome {
        RefreshOutcome::Updated { sequence } => println!(
            "{td}: updated (spiffe_sequence {})",
            sequence.map_or("none".into(), |s| s.to_string())
        ),
        RefreshOutcome::Unchanged => println!("{td}: unchanged"),
        RefreshOutcome::Failed(f) => {
            println!("{td}: {} ({}): {f}", outcome.label(), f.code().as_str());
        }
    }
}

async fn refresh(config: ConfigArgs, only: Option<&str>) -> Result<(), CliError> {
    let cfg = load_config(&config)?;
    let only = only.map(trust_domain).transpose()?;
    let targets: Vec<_> = cfg
        .federation
        .trust_domains
        .iter()
        .filter(|t| only.as_ref().is_none_or(|o| o == &t.trust_domain))
        .collect();
    if targets.is_empty() {
        return Err(CliError::new(
            "not_found",
            "no such trust domain under [[federation.trust_domains]]",
        ));
    }
    let store = open_store(&cfg).await?;
    let caller = operator();
    let mut failed = None;
    for t in targets {
        let audit = federation::FailureAudit::Always;
        match federation::refresh(&store, &cfg.federation, t, &caller, audit).await {
            Ok((outcome, _)) => {
                print_outcome(&t.trust_domain, &outcome);
                if let RefreshOutcome::Failed(f) = &outcome {
                    failed = Some(CliError::new(f.code().as_str(), f.to_string()));
                }
            }
            Err(e) => {
                store.close().await;
                return Err(e.into());
            }
        }
    }
    store.close().await;
    failed.map_or(Ok(()), Err)
}

async fn set(config: ConfigArgs, td: &str, file: &std::path::Path) -> Result<(), CliError> {
    let td = trust_domain(td)?;
    let cfg = load_config(&config)?;
    if td == cfg.trust_domain {
        return Err(CliError::new(
            "invalid_argument",
            "that is this server's own trust domain",
        ));
    }
    let bytes =
        std::fs::read(file).map_err(|e| CliError::new("io", format!("{}: {e}", file.display())))?;
    let store = open_store(&cfg).await?;
    let caller = operator();
    // A malformed file is refused like a hostile endpoint's document, and
    // audited with its code: an operator's failed attempt is on record too.
    let outcome = match federation::parse_bundle_file(&td, &bytes) {
        Ok(bundle) => federation::store_bundle(&store, &bundle, "manual", &caller).await,
        Err(e) => Ok(RefreshOutcome::Failed(FetchFailure::Refused(format!(
            "set by hand from {}: {e}",
            file.display()
        )))),
    };
    let recorded = match &outcome {
        Ok(RefreshOutcome::Failed(f)) => federation::record_failure(&store, &td, f, &caller).await,
        _ => Ok(()),
    };
    store.close().await;
    let outcome = outcome?;
    recorded?;
    print_outcome(&td, &outcome);
    match outcome {
        RefreshOutcome::Failed(f) => Err(CliError::new(f.code().as_str(), f.to_string())),
        _ => Ok(()),
    }
}

async fn delete(config: ConfigArgs, td: &str) -> Result<(), CliError> {
    let td = trust_domain(td)?;
    let cfg = load_config(&config)?;
    let store = open_store(&cfg).await?;
    let gone = federation::delete(&store, &td, &operator()).await;
    store.close().await;
    if gone? {
        println!("{td}: forgotten");
        Ok(())
    } else {
        Err(CliError::new(
            "not_found",
            format!("no bundle is held for {td}"),
        ))
    }
}
