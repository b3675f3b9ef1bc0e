//! Lineage SQL shared by the lookups, the writer and revocation: a
//! credential's standing (its own or its root's revocation, its node's
//! ban), and revocation that follows `parent_serial` down to every
//! descendant.

use sqlx::QueryBuilder;

use super::Db;

/// Joins that give a credential `i` its standing: `r` (its revocation),
/// `rr` (its root's revocation) and `n` (the node its lineage's root was
/// issued to, if any).
pub(crate) const STANDING_JOINS: &str = " LEFT JOIN revocations r ON r.serial = i.serial \
     LEFT JOIN revocations rr ON rr.serial = i.root_serial \
     LEFT JOIN issued_credentials ri ON ri.serial = i.root_serial \
     LEFT JOIN nodes n ON n.spiffe_id = ri.spiffe_id ";

/// Starts a revocation: the caller pushes the condition that picks the
/// credentials to revoke (over `issued_credentials`), then calls
/// [`finish_revocation`]. Everything descending from them is revoked too.
pub(crate) fn begin_revocation() -> QueryBuilder<Db> {
    QueryBuilder::new(
        "WITH RECURSIVE doomed(serial) AS (SELECT serial FROM issued_credentials WHERE ",
    )
}

/// Closes a revocation begun with [`begin_revocation`]: inserts a
/// revocation for every unexpired credential picked or descending from
/// one, keeping earlier revocations as they are.
pub(crate) fn finish_revocation(qb: &mut QueryBuilder<Db>, now: i64, reason: &str, by: &str) {
    qb.push(
        " UNION SELECT c.serial FROM issued_credentials c JOIN doomed d ON c.parent_serial = d.serial) \
         INSERT INTO revocations (serial, revoked_at, reason, revoked_by) SELECT i.serial, ",
    )
    .push_bind(now)
    .push(", ")
    .push_bind(reason.to_owned())
    .push(", ")
    .push_bind(by.to_owned())
    .push(" FROM issued_credentials i JOIN doomed d ON d.serial = i.serial WHERE i.not_after > ")
    .push_bind(now)
    .push(" ON CONFLICT (serial) DO NOTHING");
}
