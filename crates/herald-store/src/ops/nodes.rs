//! The node registry's SQL (see `crate::nodes` for the rules).

use herald_core::{AuditEvent, ErrorCode};
use sqlx::{QueryBuilder, Row};

use super::lineage::{begin_revocation, finish_revocation};
use super::store::{BAN_SEQUENCE, Backend, append_audit, bump_sequence, push_issued_insert};
use super::{Db, DbRow, Tx};
use crate::nodes::check_existing;
use crate::{
    IssuedCredential, NodeAttestation, NodeCommitted, NodeRecord, NodeStatus, ReplayKey,
    RevocationFilter, StoreError,
};

const COLUMNS: &str = "ek_hash, spiffe_id, ak_name, policy, status, reset_count, restart_count, \
     firmware_version, golden_set, enrolled_at, last_attested_at, attestations, banned_at, banned_by, ban_reason, \
     quote_clock, last_quote_at, last_quote_result";

use crate::nodes::QUOTE_OK;

fn node_from_row(r: &DbRow) -> Result<NodeRecord, StoreError> {
    let status: String = r.try_get(4)?;
    let count = |i: usize| -> Result<u32, StoreError> {
        let v: i64 = r.try_get(i)?;
        u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("node counter {v}")))
    };
    Ok(NodeRecord {
        ek_hash: r.try_get(0)?,
        spiffe_id: r.try_get(1)?,
        ak_name: r.try_get(2)?,
        policy: r.try_get(3)?,
        status: match status.as_str() {
            "active" => NodeStatus::Active,
            "banned" => NodeStatus::Banned,
            other => return Err(StoreError::Corrupt(format!("node status {other:?}"))),
        },
        reset_count: count(5)?,
        restart_count: count(6)?,
        firmware_version: r.try_get::<i64, _>(7)? as u64,
        golden_set: r.try_get(8)?,
        enrolled_at: r.try_get(9)?,
        last_attested_at: r.try_get(10)?,
        attestations: r.try_get(11)?,
        banned_at: r.try_get(12)?,
        banned_by: r.try_get(13)?,
        ban_reason: r.try_get(14)?,
        quote_clock: r.try_get::<i64, _>(15)? as u64,
        last_quote_at: r.try_get(16)?,
        last_quote_result: r.try_get(17)?,
    })
}

async fn node_where(
    tx: &mut Tx,
    column: &'static str,
    value: &str,
) -> Result<Option<NodeRecord>, StoreError> {
    let sql = match column {
        "ek_hash" => "WHERE ek_hash = $1",
        _ => "WHERE spiffe_id = $1",
    };
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM nodes {sql}"
    )))
    .bind(value)
    .fetch_optional(&mut **tx)
    .await?;
    row.as_ref().map(node_from_row).transpose()
}

impl Backend {
    /// The node with this EK hash.
    pub async fn node_by_ek(&self, ek_hash: &str) -> Result<Option<NodeRecord>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let node = node_where(&mut tx, "ek_hash", ek_hash).await?;
        tx.commit().await?;
        Ok(node)
    }

    /// The node holding this SPIFFE ID.
    pub async fn node_by_spiffe_id(
        &self,
        spiffe_id: &str,
    ) -> Result<Option<NodeRecord>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM nodes WHERE spiffe_id = $1"
        )))
        .bind(spiffe_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(node_from_row).transpose()
    }

    /// Every node, by SPIFFE ID.
    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM nodes ORDER BY spiffe_id"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(node_from_row).collect()
    }

    /// Records a verified attestation, its node SVID, the consumed join
    /// token (enrolment factor) and its audit record in one transaction — or, when the registry refuses it (banned node,
    /// counters going backwards, another EK claiming the identity), only
    /// the refusal's audit record.
    pub async fn commit_node_attestation(
        &self,
        att: NodeAttestation,
        issued: IssuedCredential,
        consume_join_token: Option<[u8; 32]>,
        consume_replay: Option<ReplayKey>,
        audit: AuditEvent,
    ) -> Result<NodeCommitted, StoreError> {
        let mut tx = self.begin_write().await?;
        if let Some(replay) = consume_replay {
            // The exchange's rule (see the writer): a key present and
            // unexpired is a replay, an expired one is taken over.
            let fresh = sqlx::query(
                "INSERT INTO replay_cache (key, expires_at) VALUES ($1, $2) ON CONFLICT (key) \
                 DO UPDATE SET expires_at = excluded.expires_at WHERE replay_cache.expires_at < $3 \
                 RETURNING key",
            )
            .bind(&replay.key)
            .bind(replay.expires_at)
            .bind(att.now_s)
            .fetch_optional(&mut *tx)
            .await?;
            if fresh.is_none() {
                let mut denied = audit.deny(ErrorCode::TokenReplayed);
                denied.serial = None;
                append_audit(&mut tx, std::slice::from_ref(&denied)).await?;
                tx.commit().await?;
                return Ok(NodeCommitted::Refused(ErrorCode::TokenReplayed));
            }
        }
        if let Some(hash) = consume_join_token {
            let consumed = sqlx::query(
                "UPDATE join_tokens SET used_at = $2 WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2",
            )
            .bind(hash.to_vec())
            .bind(att.now_s)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if consumed == 0 {
                let mut denied = audit.deny(ErrorCode::JoinTokenUsed);
                denied.serial = None;
                append_audit(&mut tx, std::slice::from_ref(&denied)).await?;
                tx.commit().await?;
                return Ok(NodeCommitted::Refused(ErrorCode::JoinTokenUsed));
            }
        }
        let by_ek = node_where(&mut tx, "ek_hash", &att.ek_hash).await?;
        let by_id = node_where(&mut tx, "spiffe_id", &att.spiffe_id).await?;
        let refusal = match (&by_ek, &by_id) {
            (_, Some(holder)) if holder.ek_hash != att.ek_hash => {
                // Another TPM already holds this identity.
                Some(if holder.status == NodeStatus::Banned {
                    ErrorCode::NodeBanned
                } else {
                    ErrorCode::NodeEkChanged
                })
            }
            (Some(old), _) => check_existing(old, &att),
            (None, _) => None,
        };
        if let Some(code) = refusal {
            let mut denied = audit.deny(code);
            denied.serial = None;
            append_audit(&mut tx, std::slice::from_ref(&denied)).await?;
            if by_ek.is_some() {
                set_quote_result(&mut tx, &att.ek_hash, att.now_s, code.as_str()).await?;
            }
            tx.commit().await?;
            return Ok(NodeCommitted::Refused(code));
        }
        if by_ek.is_some() {
            sqlx::query(
                "UPDATE nodes SET spiffe_id = $2, ak_name = $3, policy = $4, reset_count = $5, \
                 restart_count = $6, firmware_version = $7, golden_set = $8, last_attested_at = $9, \
                 attestations = attestations + 1, quote_clock = $10, last_quote_at = $9, \
                 last_quote_result = $11 WHERE ek_hash = $1",
            )
            .bind(&att.ek_hash)
            .bind(&att.spiffe_id)
            .bind(&att.ak_name)
            .bind(&att.policy)
            .bind(i64::from(att.reset_count))
            .bind(i64::from(att.restart_count))
            .bind(att.firmware_version as i64)
            .bind(&att.golden_set)
            .bind(att.now_s)
            .bind(att.clock as i64)
            .bind(QUOTE_OK)
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query(
                "INSERT INTO nodes (ek_hash, spiffe_id, ak_name, policy, status, reset_count, restart_count, \
                 firmware_version, golden_set, enrolled_at, last_attested_at, attestations, quote_clock, \
                 last_quote_at, last_quote_result) \
                 VALUES ($1, $2, $3, $4, 'active', $5, $6, $7, $8, $9, $9, 1, $10, $9, $11)",
            )
            .bind(&att.ek_hash)
            .bind(&att.spiffe_id)
            .bind(&att.ak_name)
            .bind(&att.policy)
            .bind(i64::from(att.reset_count))
            .bind(i64::from(att.restart_count))
            .bind(att.firmware_version as i64)
            .bind(&att.golden_set)
            .bind(att.now_s)
            .bind(att.clock as i64)
            .bind(QUOTE_OK)
            .execute(&mut *tx)
            .await?;
        }
        insert_issued(&mut tx, &issued).await?;
        append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        let node = node_where(&mut tx, "ek_hash", &att.ek_hash)
            .await?
            .ok_or_else(|| StoreError::Corrupt("node row vanished".into()))?;
        tx.commit().await?;
        Ok(NodeCommitted::Done(Box::new(node)))
    }

    /// Forgets an active node (by SPIFFE ID or EK hash / node key), with
    /// its audit record, so that its hardware or instance may enrol afresh
    /// (an AWS instance with a new agent key). A banned node stays banned:
    /// `Ok(None)` for it and for an unknown one. Its credentials are not
    /// revoked — ban it for that.
    pub async fn reset_node(
        &self,
        id_or_ek: &str,
        audit: AuditEvent,
    ) -> Result<Option<NodeRecord>, StoreError> {
        let mut tx = self.begin_write().await?;
        let node = match node_where(&mut tx, "spiffe_id", id_or_ek).await? {
            Some(n) => Some(n),
            None => node_where(&mut tx, "ek_hash", id_or_ek).await?,
        };
        let Some(node) = node.filter(|n| n.status == NodeStatus::Active) else {
            return Ok(None);
        };
        sqlx::query("DELETE FROM nodes WHERE ek_hash = $1 AND status = 'active'")
            .bind(&node.ek_hash)
            .execute(&mut *tx)
            .await?;
        let mut audit = audit;
        audit.spiffe_id = Some(node.spiffe_id.clone());
        append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        tx.commit().await?;
        Ok(Some(node))
    }

    /// Records on an enrolled node's row that its latest quote was refused
    /// with `code` at `now_s` (no row: nothing to record).
    pub async fn record_quote_refusal(
        &self,
        ek_hash: &str,
        now_s: i64,
        code: ErrorCode,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        set_quote_result(&mut tx, ek_hash, now_s, code.as_str()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Bans the node with this SPIFFE ID or EK hash: its attestations and
    /// renewals are refused from now on, and every unexpired credential
    /// issued to its SPIFFE ID is revoked — all with the audit record, in
    /// one transaction. `Ok(None)` if there is no such node.
    pub async fn ban_node(
        &self,
        id_or_ek: &str,
        banned_by: &str,
        reason: &str,
        audit: AuditEvent,
    ) -> Result<Option<(NodeRecord, u64)>, StoreError> {
        let mut tx = self.begin_write().await?;
        let node = match node_where(&mut tx, "spiffe_id", id_or_ek).await? {
            Some(n) => Some(n),
            None => node_where(&mut tx, "ek_hash", id_or_ek).await?,
        };
        let Some(node) = node else {
            return Ok(None);
        };
        let now = audit.time_ms / 1000;
        sqlx::query(
            "UPDATE nodes SET status = $2, banned_at = COALESCE(banned_at, $3), \
             banned_by = COALESCE(banned_by, $4), ban_reason = COALESCE(ban_reason, $5) WHERE ek_hash = $1",
        )
        .bind(&node.ek_hash)
        .bind(NodeStatus::Banned.as_str())
        .bind(now)
        .bind(banned_by)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        // Everything issued to the node and everything descending from it
        // (its workloads' SVIDs, JWT-SVIDs and session credentials).
        let mut qb = begin_revocation();
        qb.push("spiffe_id = ").push_bind(node.spiffe_id.clone());
        finish_revocation(&mut qb, now, &format!("node banned: {reason}"), banned_by);
        let revoked = qb.build().execute(&mut *tx).await?.rows_affected();
        bump_sequence(&mut tx, BAN_SEQUENCE).await?;
        let mut audit = audit;
        audit.spiffe_id = Some(node.spiffe_id.clone());
        append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        let node = node_where(&mut tx, "ek_hash", &node.ek_hash)
            .await?
            .ok_or_else(|| StoreError::Corrupt("node row vanished".into()))?;
        tx.commit().await?;
        Ok(Some((node, revoked)))
    }
}

async fn set_quote_result(
    tx: &mut Tx,
    ek_hash: &str,
    now_s: i64,
    result: &str,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE nodes SET last_quote_at = $2, last_quote_result = $3 WHERE ek_hash = $1")
        .bind(ek_hash)
        .bind(now_s)
        .bind(result)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn insert_issued(tx: &mut Tx, i: &IssuedCredential) -> Result<(), StoreError> {
    let mut qb = QueryBuilder::<Db>::new("");
    push_issued_insert(&mut qb, [i]);
    qb.build().execute(&mut **tx).await?;
    Ok(())
}

impl Backend {
    /// Revokes every unexpired credential matching `filter` (at least one
    /// condition is required) or descending from one, with one audit
    /// record, in one transaction;
    /// returns how many were revoked. The incident-response path: "revoke
    /// everything policy P issued in the last hour".
    pub async fn revoke_matching(
        &self,
        filter: &RevocationFilter,
        reason: &str,
        revoked_by: &str,
        audit: AuditEvent,
    ) -> Result<u64, StoreError> {
        if *filter == RevocationFilter::default() {
            return Err(StoreError::Corrupt(
                "refusing to revoke without a condition".into(),
            ));
        }
        let now = audit.time_ms / 1000;
        let mut tx = self.begin_write().await?;
        let mut qb = begin_revocation();
        let mut sep = qb.separated(" AND ");
        if let Some(id) = &filter.spiffe_id {
            sep.push("spiffe_id = ").push_bind_unseparated(id.clone());
        }
        if let Some(p) = &filter.policy {
            sep.push("policy = ").push_bind_unseparated(p.clone());
        }
        if let Some(t) = filter.issued_after {
            sep.push("issued_at >= ").push_bind_unseparated(t);
        }
        if let Some(t) = filter.issued_before {
            sep.push("issued_at < ").push_bind_unseparated(t);
        }
        finish_revocation(&mut qb, now, reason, revoked_by);
        let n = qb.build().execute(&mut *tx).await?.rows_affected();
        append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        tx.commit().await?;
        Ok(n)
    }
}
