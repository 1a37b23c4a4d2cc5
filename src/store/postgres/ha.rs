//! High availability on PostgreSQL: the queue's one lease (`ha_lease`), its audit trail
//! (`ha_leases`), and the nodes' heartbeats (`ha_nodes`); see migrations/postgres/0002_ha.sql and 0003.
//!
//! Every statement here is one short autocommit statement (or a two-statement transaction), on
//! the database's clock (`now()`), so no two nodes ever compare their own clocks. A grant bumps
//! the token; a renewal only extends a lease whose token and instance are still this node's; the
//! fence (`timport_fence`, checked at the start of every write transaction of an active node)
//! makes a takeover wait for the old holder's transactions in progress and refuses its later
//! ones. Nothing here retries: the caller (`crate::ha`) runs the schedule.

use sqlx::Row;

use super::PgStore;
use crate::store::{HaGrant, HaLeaseGrant, HaLeaseRow, HaNodeId, HaNodeRow, HaView, StoreError};

/// Milliseconds since the epoch of a timestamptz expression (infinite: far past).
macro_rules! ms {
    ($col:literal) => {
        concat!(
            "CASE WHEN isfinite(",
            $col,
            ") THEN (extract(epoch FROM ",
            $col,
            ") * 1000)::bigint ELSE 0 END"
        )
    };
}

impl PgStore {
    /// Takes the lease if it has expired on the database's clock (or was released): a new token,
    /// one above the last. `None` when another node holds it.
    pub async fn ha_acquire(
        &self,
        me: &HaNodeId,
        ttl_ms: i64,
    ) -> Result<Option<HaGrant>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        // The takeover waits for the former holder's write transactions (they hold the row FOR
        // SHARE); one frozen inside its transaction would hold this statement until the server
        // ends it, so wait a second at a time and say why.
        sqlx::query("SET LOCAL lock_timeout = '1s'")
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        let row = sqlx::query(concat!(
            "UPDATE ha_lease SET token = token + 1, node = $1, instance = $2,
                    acquired_at = now(), expires_at = now() + $3 * interval '1 millisecond'
             WHERE id = 1 AND expires_at < now()
             RETURNING token, ",
            ms!("expires_at"),
            " AS expires_ms"
        ))
        .bind(&me.node)
        .bind(&me.instance)
        .bind(ttl_ms)
        .fetch_optional(&mut *tx)
        .await
        .map_err(
            |e| match e.as_database_error().and_then(|d| d.code()).as_deref() {
                Some("55P03") => StoreError::LeaseBusy {
                    target: self.target.clone(),
                },
                _ => self.err(e),
            },
        )?;
        let Some(row) = row else {
            return Ok(None);
        };
        let grant = HaGrant {
            token: row.get("token"),
            expires_at_ms: row.get("expires_ms"),
        };
        sqlx::query(
            "INSERT INTO ha_leases (token, node, instance, acquired_at, expires_at)
             SELECT token, node, instance, acquired_at, expires_at FROM ha_lease WHERE id = 1",
        )
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(Some(grant))
    }

    /// Extends this node's lease by `ttl_ms` from now; `None` when it is no longer this node's
    /// (another node took over).
    pub async fn ha_renew(
        &self,
        me: &HaNodeId,
        token: i64,
        ttl_ms: i64,
    ) -> Result<Option<HaGrant>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        let expires: Option<i64> = sqlx::query_scalar(concat!(
            "UPDATE ha_lease SET expires_at = GREATEST(expires_at, now() + $3 * interval '1 millisecond')
             WHERE id = 1 AND token = $1 AND instance = $2
             RETURNING ",
            ms!("expires_at")
        ))
        .bind(token)
        .bind(&me.instance)
        .bind(ttl_ms)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let Some(expires_at_ms) = expires else {
            return Ok(None);
        };
        sqlx::query(
            "UPDATE ha_leases SET expires_at = l.expires_at
             FROM ha_lease l WHERE l.id = 1 AND ha_leases.token = l.token",
        )
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(Some(HaGrant {
            token,
            expires_at_ms,
        }))
    }

    /// Gives the lease up now (a clean stop), so a standby need not wait for it to expire. Only
    /// this node's own token is released.
    pub async fn ha_release(&self, me: &HaNodeId, token: i64) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        let done = sqlx::query(
            "UPDATE ha_lease SET expires_at = now()
             WHERE id = 1 AND token = $1 AND instance = $2 AND expires_at > now()",
        )
        .bind(token)
        .bind(&me.instance)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?
        .rows_affected()
            == 1;
        if done {
            sqlx::query(
                "UPDATE ha_leases SET expires_at = LEAST(expires_at, now()), released_at = now()
                 WHERE token = $1",
            )
            .bind(token)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(done)
    }

    /// Records this node's role (and token, when active) in `ha_nodes`.
    pub async fn ha_heartbeat(
        &self,
        me: &HaNodeId,
        role: &str,
        token: Option<i64>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO ha_nodes (node, instance, role, token, started_at, seen_at)
             VALUES ($1, $2, $3, $4, now(), now())
             ON CONFLICT (node) DO UPDATE SET
                 started_at = CASE WHEN ha_nodes.instance = EXCLUDED.instance
                                   THEN ha_nodes.started_at ELSE EXCLUDED.started_at END,
                 instance = EXCLUDED.instance, role = EXCLUDED.role, token = EXCLUDED.token,
                 seen_at = EXCLUDED.seen_at",
        )
        .bind(&me.node)
        .bind(&me.instance)
        .bind(role)
        .bind(token)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The lease and the nodes (for `timport status`); `None` on a queue made before HA existed
    /// that was opened read-only (no migration ran).
    pub async fn ha_view(&self) -> Result<Option<HaView>, StoreError> {
        if !self
            .table_exists("ha_lease")
            .await
            .map_err(|e| self.err(e))?
        {
            return Ok(None);
        }
        let l = sqlx::query(concat!(
            "SELECT token, node, instance, ",
            ms!("acquired_at"),
            " AS acquired_ms, ",
            ms!("expires_at"),
            " AS expires_ms, ",
            ms!("now()"),
            " AS now_ms FROM ha_lease WHERE id = 1"
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        let lease = HaLeaseRow {
            token: l.get("token"),
            node: l.get("node"),
            instance: l.get("instance"),
            acquired_at_ms: l.get("acquired_ms"),
            expires_at_ms: l.get("expires_ms"),
            now_ms: l.get("now_ms"),
        };
        let nodes = sqlx::query(concat!(
            "SELECT node, instance, role, token, ",
            ms!("started_at"),
            " AS started_ms, ",
            ms!("seen_at"),
            " AS seen_ms FROM ha_nodes ORDER BY node"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?
        .iter()
        .map(|r| HaNodeRow {
            node: r.get("node"),
            instance: r.get("instance"),
            role: r.get("role"),
            token: r.get("token"),
            started_at_ms: r.get("started_ms"),
            seen_at_ms: r.get("seen_ms"),
        })
        .collect();
        Ok(Some(HaView { lease, nodes }))
    }

    /// Every grant of the lease, oldest first (the audit trail).
    pub async fn ha_grants(&self) -> Result<Vec<HaLeaseGrant>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT token, node, instance, ",
            ms!("acquired_at"),
            " AS acquired_ms, ",
            ms!("expires_at"),
            " AS expires_ms, CASE WHEN released_at IS NULL THEN NULL ELSE ",
            ms!("released_at"),
            " END AS released_ms FROM ha_leases ORDER BY token"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows
            .iter()
            .map(|r| HaLeaseGrant {
                token: r.get("token"),
                node: r.get("node"),
                instance: r.get("instance"),
                acquired_at_ms: r.get("acquired_ms"),
                expires_at_ms: r.get("expires_ms"),
                released_at_ms: r.get("released_ms"),
            })
            .collect())
    }
}
