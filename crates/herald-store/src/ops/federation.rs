//! The federated bundles' SQL (see `crate::FederatedBundleRecord`).

use herald_core::AuditEvent;
use sqlx::Row;

use super::store::{Backend, FEDERATION_SEQUENCE, append_audit, bump_sequence};
use super::{DbRow, Tx};
use crate::{BundleUpdate, FederatedBundleRecord, NewFederatedBundle, StoreError};

const COLUMNS: &str = "trust_domain, jwks, sequence, refresh_hint, source, updated_at_ms, \
     checked_at_ms, last_error, last_error_at_ms";

fn from_row(r: &DbRow) -> Result<FederatedBundleRecord, StoreError> {
    let uint = |v: Option<i64>| -> Result<Option<u64>, StoreError> {
        v.map(|n| u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("bundle counter {n}"))))
            .transpose()
    };
    Ok(FederatedBundleRecord {
        trust_domain: r.try_get(0)?,
        jwks: r.try_get(1)?,
        sequence: uint(r.try_get(2)?)?,
        refresh_hint_secs: uint(r.try_get(3)?)?,
        source: r.try_get(4)?,
        updated_at_ms: r.try_get(5)?,
        checked_at_ms: r.try_get(6)?,
        last_error: r.try_get(7)?,
        last_error_at_ms: r.try_get(8)?,
    })
}

async fn current(
    tx: &mut Tx,
    trust_domain: &str,
) -> Result<Option<FederatedBundleRecord>, StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM federated_bundles WHERE trust_domain = $1"
    )))
    .bind(trust_domain)
    .fetch_optional(&mut **tx)
    .await?;
    row.as_ref().map(from_row).transpose()
}

fn as_i64(v: Option<u64>) -> Option<i64> {
    v.map(|n| i64::try_from(n).unwrap_or(i64::MAX))
}

impl Backend {
    /// Every federated bundle, by trust domain.
    pub async fn federated_bundles(&self) -> Result<Vec<FederatedBundleRecord>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM federated_bundles ORDER BY trust_domain"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// `trust_domain`'s bundle, if one is stored (one row: the refresher
    /// reads only the domain it fetches).
    pub async fn federated_bundle(
        &self,
        trust_domain: &str,
    ) -> Result<Option<FederatedBundleRecord>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM federated_bundles WHERE trust_domain = $1"
        )))
        .bind(trust_domain)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// When each stored bundle was last confirmed, by trust domain,
    /// without the documents (the staleness gauge reads it per scrape).
    pub async fn federation_checked_at(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT trust_domain, checked_at_ms FROM federated_bundles ORDER BY trust_domain",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Stores `new` unless it is older than what is stored; see
    /// [`crate::Store::put_federated_bundle`].
    pub async fn put_federated_bundle(
        &self,
        new: &NewFederatedBundle,
        audit: AuditEvent,
    ) -> Result<BundleUpdate, StoreError> {
        let mut tx = self.begin_write().await?;
        let stored = current(&mut tx, &new.trust_domain).await?;
        if let Some(s) = &stored {
            if s.jwks == new.jwks {
                sqlx::query(
                    "UPDATE federated_bundles SET checked_at_ms = $2, last_error = NULL, \
                     last_error_at_ms = NULL WHERE trust_domain = $1",
                )
                .bind(&new.trust_domain)
                .bind(new.now_ms)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                return Ok(BundleUpdate::Unchanged);
            }
            if let Some(had) = s.sequence {
                // A document must move the sequence forward to change
                // anything: an older (or unsequenced) one could be a replay
                // of a bundle from before a key was withdrawn.
                if new.sequence.is_none_or(|n| n <= had) {
                    tx.rollback().await?;
                    return Ok(BundleUpdate::NotNewer {
                        stored: had,
                        offered: new.sequence,
                    });
                }
            }
        }
        sqlx::query(
            "INSERT INTO federated_bundles (trust_domain, jwks, sequence, refresh_hint, source, \
             updated_at_ms, checked_at_ms, last_error, last_error_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $6, NULL, NULL) \
             ON CONFLICT (trust_domain) DO UPDATE SET jwks = $2, sequence = $3, refresh_hint = $4, \
             source = $5, updated_at_ms = $6, checked_at_ms = $6, last_error = NULL, last_error_at_ms = NULL",
        )
        .bind(&new.trust_domain)
        .bind(&new.jwks)
        .bind(as_i64(new.sequence))
        .bind(as_i64(new.refresh_hint_secs))
        .bind(&new.source)
        .bind(new.now_ms)
        .execute(&mut *tx)
        .await?;
        bump_sequence(&mut tx, FEDERATION_SEQUENCE).await?;
        append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        tx.commit().await?;
        Ok(BundleUpdate::Stored)
    }

    /// Notes a failed fetch or a refused document for `trust_domain` (the
    /// stored bundle, if any, stays), with its audit record if given.
    pub async fn record_federation_failure(
        &self,
        trust_domain: &str,
        error: &str,
        now_ms: i64,
        audit: Option<AuditEvent>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "UPDATE federated_bundles SET last_error = $2, last_error_at_ms = $3 WHERE trust_domain = $1",
        )
        .bind(trust_domain)
        .bind(error)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        if let Some(audit) = audit {
            append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Removes `trust_domain`'s bundle; `Ok(false)` if there was none.
    pub async fn delete_federated_bundle(
        &self,
        trust_domain: &str,
        audit: AuditEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let gone = sqlx::query("DELETE FROM federated_bundles WHERE trust_domain = $1")
            .bind(trust_domain)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if gone {
            bump_sequence(&mut tx, FEDERATION_SEQUENCE).await?;
            append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        }
        tx.commit().await?;
        Ok(gone)
    }
}
