//! PostgreSQL: what `timport status` and `timport verify` read and record, and the dropping of
//! imported bodies (`queue.keep_bodies`).
//!
//! The same statements and meaning as the SQLite twins in [`crate::store::sqlite`], written for
//! PostgreSQL: typed `$n` parameters, FILTER aggregates, lists as arrays (`unnest`, `= ANY`).
//! Reads go to the pool and take no lock; every write is one short transaction from
//! [`PgStore::begin`] (the queue's writer lock), so a stop or a lost connection leaves a page of
//! verify results or a batch of dropped bodies wholly recorded or not at all, and the next pass
//! takes up where the last commit left it.

use sqlx::Row;

use super::PgStore;
use crate::store::rows::{lane_status, verify_ours_row};
use crate::store::*;

/// Where the "until verified" pass stands: the last `verify_results.id` looked at (the same
/// `meta` key as on SQLite).
const BODIES_CURSOR_KEY: &str = "bodies_dropped_through_result";

/// The lanes `verify` works on: imported ones, all or those of group `$1` or job `$2`.
macro_rules! verify_lane_filter {
    () => {
        "l.imported > 0 AND ($1::text IS NULL OR l.group_id = $1)
         AND ($2::bigint IS NULL OR l.id IN (SELECT lane_id FROM job_lanes WHERE job_id = $2))"
    };
}

/// The columns of a [`LaneStatus`] over `lanes l LEFT JOIN groups g`, its step included.
macro_rules! lane_columns {
    () => {
        "l.group_id, l.topic_id, l.state, l.pending, l.in_flight, l.imported, l.failed,
         l.blocked_code, l.blocked_reason, l.last_send_time, l.last_msg_seq,
         CASE WHEN g.create_state = 'pending' THEN 'create'
              WHEN g.create_state = 'blocked' THEN 'create blocked'
              WHEN l.pending + l.in_flight > 0 THEN 'messages'
              WHEN EXISTS (SELECT 1 FROM members m WHERE m.group_id = l.group_id
                           AND m.state = 'pending') THEN 'members'
              WHEN EXISTS (SELECT 1 FROM members m WHERE m.group_id = l.group_id
                           AND m.unread_state = 'pending') THEN 'unread'
              ELSE 'done' END AS step"
    };
}

impl PgStore {
    /// Totals over all lanes, or over the lanes of one group.
    pub async fn totals(&self, group: Option<&str>) -> Result<Totals, StoreError> {
        let r = sqlx::query(
            "SELECT
                COALESCE(SUM(pending) FILTER (WHERE state = 'active'), 0)::bigint AS pending,
                COALESCE(SUM(in_flight) FILTER (WHERE state = 'active'), 0)::bigint AS in_flight,
                COALESCE(SUM(imported), 0)::bigint AS imported,
                COALESCE(SUM(failed), 0)::bigint AS failed,
                COALESCE(SUM(pending + in_flight) FILTER (WHERE state = 'blocked'), 0)::bigint
                    AS blocked,
                COUNT(*) AS lanes,
                COUNT(*) FILTER (WHERE state = 'blocked') AS lanes_blocked
             FROM lanes WHERE ($1::text IS NULL OR group_id = $1)",
        )
        .bind(group)
        .fetch_one(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        let mut t = Totals {
            pending: r.get("pending"),
            in_flight: r.get("in_flight"),
            imported: r.get("imported"),
            failed: r.get("failed"),
            blocked: r.get("blocked"),
            total: 0,
            lanes: r.get("lanes"),
            lanes_blocked: r.get("lanes_blocked"),
        };
        t.total = t.pending + t.in_flight + t.imported + t.failed + t.blocked;
        Ok(t)
    }

    /// Lanes, the most remaining work first; `group` narrows to one group.
    pub async fn lanes(
        &self,
        group: Option<&str>,
        limit: i64,
    ) -> Result<Vec<LaneStatus>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            lane_columns!(),
            " FROM lanes l LEFT JOIN groups g ON g.group_id = l.group_id
             WHERE ($1::text IS NULL OR l.group_id = $1)
             ORDER BY (l.pending + l.in_flight) DESC, l.group_id, l.topic_id LIMIT $2"
        ))
        .bind(group)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(lane_status).collect())
    }

    /// Blocked lanes with their reasons.
    pub async fn blocked_lanes(&self, limit: i64) -> Result<Vec<LaneStatus>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            lane_columns!(),
            " FROM lanes l LEFT JOIN groups g ON g.group_id = l.group_id
             WHERE l.state = 'blocked' ORDER BY l.group_id, l.topic_id LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(lane_status).collect())
    }

    /// Jobs, newest first.
    pub async fn jobs(&self, limit: i64) -> Result<Vec<JobStatus>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, kind, source, message_count, group_count, pending, in_flight, imported,
                    failed, created_at
             FROM jobs WHERE content_hash IS NOT NULL OR kind = 'intake'
             ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows
            .iter()
            .map(|r| JobStatus {
                id: r.get("id"),
                kind: r.get("kind"),
                source: r.get("source"),
                messages: r.get("message_count"),
                groups: r.get("group_count"),
                pending: r.get("pending"),
                in_flight: r.get("in_flight"),
                imported: r.get("imported"),
                failed: r.get("failed"),
                created_at: r.get("created_at"),
            })
            .collect())
    }

    /// The most common kinds of failure (optionally of one group), grouped by code and
    /// [`reason_kind`]. The distinct texts read are capped, so a huge number of distinct failures
    /// costs bounded memory (the counts then cover the most frequent texts).
    pub async fn failure_reasons(
        &self,
        group: Option<&str>,
        limit: i64,
    ) -> Result<Vec<FailureReason>, StoreError> {
        const DISTINCT_TEXTS: i64 = 100_000;
        let rows = sqlx::query(
            "SELECT m.result_code AS code, COALESCE(m.result_text, '') AS reason,
                    COUNT(*) AS messages
             FROM messages m
             WHERE m.state = 'failed'
               AND ($1::text IS NULL OR m.lane_id IN (SELECT id FROM lanes WHERE group_id = $1))
             GROUP BY m.result_code, m.result_text
             ORDER BY messages DESC, m.result_code, m.result_text LIMIT $2",
        )
        .bind(group)
        .bind(DISTINCT_TEXTS)
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        let mut kinds: FastMap<(Option<i64>, String), FailureReason> = FastMap::default();
        for r in &rows {
            let code: Option<i64> = r.get("code");
            let text: String = r.get("reason");
            let messages: i64 = r.get("messages");
            let kind = reason_kind(code, &text);
            kinds
                .entry((code, kind.clone()))
                .and_modify(|f| f.messages += messages)
                .or_insert(FailureReason {
                    code,
                    reason: kind,
                    messages,
                    example: text,
                });
        }
        let mut out: Vec<FailureReason> = kinds.into_values().collect();
        out.sort_by(|a, b| {
            b.messages
                .cmp(&a.messages)
                .then_with(|| a.code.cmp(&b.code))
                .then_with(|| a.reason.cmp(&b.reason))
        });
        out.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(out)
    }

    /// Lanes with imported messages, all or those of `group` or of `job`, with their passes.
    pub async fn verify_scope(
        &self,
        group: Option<&str>,
        job: Option<i64>,
    ) -> Result<Vec<VerifyLane>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT l.id, l.group_id, l.topic_id, l.imported, l.pending + l.in_flight AS unfinished,
                    s.low_seq, s.high_seq,
                    v.lane_id AS v_lane, v.imported AS v_imported, v.top_seq, v.low_seq AS v_low,
                    v.next_seq, v.done
             FROM lanes l LEFT JOIN verify_lanes v ON v.lane_id = l.id
             CROSS JOIN LATERAL (SELECT MIN(m.msg_seq) AS low_seq, MAX(m.msg_seq) AS high_seq
                                 FROM messages m
                                 WHERE m.lane_id = l.id AND m.state = 'imported') s
             WHERE ",
            verify_lane_filter!(),
            " ORDER BY l.group_id, l.topic_id"
        ))
        .bind(group)
        .bind(job)
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows
            .iter()
            .map(|r| VerifyLane {
                lane_id: r.get("id"),
                group_id: r.get("group_id"),
                topic_id: r.get("topic_id"),
                imported: r.get("imported"),
                unfinished: r.get("unfinished"),
                low_seq: r.get::<Option<i64>, _>("low_seq").unwrap_or(0),
                high_seq: r.get::<Option<i64>, _>("high_seq").unwrap_or(0),
                pass: r.get::<Option<i64>, _>("v_lane").map(|_| VerifyPass {
                    imported: r.get("v_imported"),
                    top_seq: r.get("top_seq"),
                    low_seq: r.get("v_low"),
                    next_seq: r.get("next_seq"),
                    done: r.get::<i64, _>("done") != 0,
                }),
            })
            .collect())
    }

    /// Starts a lane's pass over (its earlier results dropped): from `top_seq` (`None`: the
    /// newest, learned by the first read) down to `low_seq`.
    pub async fn verify_begin_lane(
        &self,
        lane_id: i64,
        imported: i64,
        top_seq: Option<i64>,
        low_seq: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM verify_results WHERE lane_id = $1")
            .bind(lane_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        sqlx::query(
            "INSERT INTO verify_lanes(lane_id, imported, top_seq, low_seq, next_seq, done, started_at)
             VALUES($1, $2, $3, $4, $3, 0, extract(epoch FROM now())::bigint)
             ON CONFLICT(lane_id) DO UPDATE SET imported = excluded.imported,
                top_seq = excluded.top_seq, low_seq = excluded.low_seq,
                next_seq = excluded.next_seq, done = 0, started_at = excluded.started_at,
                finished_at = NULL",
        )
        .bind(lane_id)
        .bind(imported)
        .bind(top_seq)
        .bind(low_seq)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        self.commit_tx(tx).await
    }

    /// Forgets every recorded pass and result of the lanes in scope (`timport verify --restart`).
    pub async fn verify_reset(
        &self,
        group: Option<&str>,
        job: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(concat!(
            "DELETE FROM verify_results WHERE lane_id IN (SELECT l.id FROM lanes l WHERE ",
            verify_lane_filter!(),
            ")"
        ))
        .bind(group)
        .bind(job)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        sqlx::query(concat!(
            "DELETE FROM verify_lanes WHERE lane_id IN (SELECT l.id FROM lanes l WHERE ",
            verify_lane_filter!(),
            ")"
        ))
        .bind(group)
        .bind(job)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        self.commit_tx(tx).await
    }

    /// Our imported messages of the lane with a MsgSeq in `lo..=hi`, by MsgSeq.
    pub async fn verify_ours(
        &self,
        lane_id: i64,
        lo: i64,
        hi: i64,
    ) -> Result<Vec<VerifyOurs>, StoreError> {
        let rows = sqlx::query(
            "SELECT m.id, m.msg_seq, m.from_account, COALESCE(m.sent_time, m.send_time) AS t,
                    m.random, COALESCE(b.body, '') AS body, m.body_sha256
             FROM messages m LEFT JOIN message_bodies b ON b.message_id = m.id
             WHERE m.lane_id = $1 AND m.state = 'imported' AND m.msg_seq BETWEEN $2 AND $3
             ORDER BY m.msg_seq, m.id",
        )
        .bind(lane_id)
        .bind(lo)
        .bind(hi)
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(verify_ours_row).collect())
    }

    /// Our messages of the lane (any state) from `from` sent at `time` (the SendTime actually
    /// sent), with whether each is imported: the candidates a server message not ours may copy.
    pub async fn verify_lookalikes(
        &self,
        lane_id: i64,
        from: &str,
        time: i64,
    ) -> Result<Vec<(VerifyOurs, bool)>, StoreError> {
        // send_time ≤ the time sent (a nudge only moves it forward), within a day of it.
        let rows = sqlx::query(
            "SELECT m.id, COALESCE(m.msg_seq, 0) AS msg_seq, m.from_account,
                    COALESCE(m.sent_time, m.send_time) AS t, m.random,
                    COALESCE(b.body, '') AS body, m.body_sha256,
                    m.state = 'imported' AS imported
             FROM messages m LEFT JOIN message_bodies b ON b.message_id = m.id
             WHERE m.lane_id = $1 AND m.state IN ('pending', 'in_flight', 'imported', 'failed')
               AND m.send_time BETWEEN $3 - 86400 AND $3
               AND COALESCE(m.sent_time, m.send_time) = $3 AND m.from_account = $2
             ORDER BY m.id",
        )
        .bind(lane_id)
        .bind(from)
        .bind(time)
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows
            .iter()
            .map(|r| (verify_ours_row(r), r.get::<bool, _>("imported")))
            .collect())
    }

    /// Records one page of a lane's pass in one transaction: the classes of the MsgSeq range
    /// `lo..=hi` (replacing any recorded before, so a page read twice counts once), the next page
    /// to read, whether the pass is done, and the top MsgSeq when it was learned by this read.
    #[allow(clippy::too_many_arguments)]
    pub async fn verify_record(
        &self,
        lane_id: i64,
        lo: i64,
        hi: i64,
        rows: &[VerifyRow],
        top_seq: Option<i64>,
        next_seq: i64,
        done: bool,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM verify_results WHERE lane_id = $1 AND msg_seq BETWEEN $2 AND $3")
            .bind(lane_id)
            .bind(lo)
            .bind(hi)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        if !rows.is_empty() {
            let ids: Vec<Option<i64>> = rows.iter().map(|r| r.message_id).collect();
            let seqs: Vec<i64> = rows.iter().map(|r| r.msg_seq).collect();
            let kinds: Vec<&str> = rows.iter().map(|r| r.kind).collect();
            let expected: Vec<Option<&str>> = rows.iter().map(|r| r.expected.as_deref()).collect();
            let found: Vec<Option<&str>> = rows.iter().map(|r| r.found.as_deref()).collect();
            // WITH ORDINALITY: the rows get their ids in the order given, as on SQLite.
            sqlx::query(
                "INSERT INTO verify_results(lane_id, message_id, msg_seq, kind, expected, found)
                 SELECT $1, v.message_id, v.msg_seq, v.kind, v.expected, v.found
                 FROM unnest($2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[])
                      WITH ORDINALITY AS v(message_id, msg_seq, kind, expected, found, n)
                 ORDER BY v.n",
            )
            .bind(lane_id)
            .bind(&ids)
            .bind(&seqs)
            .bind(&kinds)
            .bind(&expected)
            .bind(&found)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        sqlx::query(
            "UPDATE verify_lanes SET next_seq = $2, done = $3, top_seq = COALESCE(top_seq, $4),
                    finished_at = CASE WHEN $3 = 1 THEN extract(epoch FROM now())::bigint END
             WHERE lane_id = $1",
        )
        .bind(lane_id)
        .bind(next_seq)
        .bind(i64::from(done))
        .bind(top_seq)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        self.commit_tx(tx).await
    }

    /// Recorded counts per lane that has a pass, all or those of `group` or `job`. Empty when
    /// the database has never been verified. (The one PostgreSQL migration creates the verify
    /// tables, so unlike on SQLite there is no queue without them.)
    pub async fn verify_counts(
        &self,
        group: Option<&str>,
        job: Option<i64>,
    ) -> Result<Vec<VerifyCounts>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT l.id, l.group_id, l.topic_id, v.done,
                    COUNT(*) FILTER (WHERE r.kind = 'verified') AS verified,
                    COUNT(*) FILTER (WHERE r.kind = 'missing') AS missing,
                    COUNT(*) FILTER (WHERE r.kind = 'altered') AS altered,
                    COUNT(*) FILTER (WHERE r.kind = 'duplicated') AS duplicated,
                    COUNT(*) FILTER (WHERE r.kind = 'unverifiable') AS unverifiable,
                    COUNT(*) FILTER (WHERE r.kind = 'foreign') AS foreign_
             FROM verify_lanes v JOIN lanes l ON l.id = v.lane_id
             LEFT JOIN verify_results r ON r.lane_id = v.lane_id
             WHERE ",
            verify_lane_filter!(),
            " GROUP BY l.id, v.lane_id ORDER BY l.group_id, l.topic_id"
        ))
        .bind(group)
        .bind(job)
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows
            .iter()
            .map(|r| VerifyCounts {
                group: r.get("group_id"),
                topic: r.get("topic_id"),
                lane_id: r.get("id"),
                verified: r.get("verified"),
                missing: r.get("missing"),
                altered: r.get("altered"),
                duplicated: r.get("duplicated"),
                unverifiable: r.get("unverifiable"),
                foreign: r.get("foreign_"),
                done: r.get::<i64, _>("done") != 0,
            })
            .collect())
    }

    /// Recorded problems (every class but verified) of the lanes in scope, by group, topic and
    /// MsgSeq, at most `limit`.
    pub async fn verify_problems(
        &self,
        group: Option<&str>,
        job: Option<i64>,
        limit: i64,
    ) -> Result<Vec<VerifyProblemRow>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT l.group_id, l.topic_id, r.msg_seq, r.kind, r.expected, r.found
             FROM verify_results r JOIN lanes l ON l.id = r.lane_id
             WHERE r.kind <> 'verified' AND ",
            verify_lane_filter!(),
            " ORDER BY l.group_id, l.topic_id, r.msg_seq, r.kind, r.id LIMIT $3"
        ))
        .bind(group)
        .bind(job)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows
            .iter()
            .map(|r| VerifyProblemRow {
                group: r.get("group_id"),
                topic: r.get("topic_id"),
                msg_seq: r.get("msg_seq"),
                kind: r.get("kind"),
                expected: r.get("expected"),
                found: r.get("found"),
            })
            .collect())
    }

    /// A verify claims `rate` requests/s of the quota (replacing any earlier claim) and beats.
    pub async fn verify_claim(
        &self,
        token: &str,
        rate: f64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.write_one(
            sqlx::query(
                "INSERT INTO verify_claim(id, token, rate, heartbeat_ms) VALUES(1, $1, $2, $3)
                 ON CONFLICT(id) DO UPDATE SET token = excluded.token, rate = excluded.rate,
                    heartbeat_ms = excluded.heartbeat_ms, ack_token = NULL, ack_ms = NULL,
                    ack_ceiling = NULL",
            )
            .bind(token)
            .bind(rate)
            .bind(now_ms),
        )
        .await
        .map(drop)
    }

    /// Renews the claim's heartbeat; false when the claim is no longer this token's.
    pub async fn verify_heartbeat(&self, token: &str, now_ms: i64) -> Result<bool, StoreError> {
        let n = self
            .write_one(
                sqlx::query(
                    "UPDATE verify_claim SET heartbeat_ms = $1 WHERE id = 1 AND token = $2",
                )
                .bind(now_ms)
                .bind(token),
            )
            .await?;
        Ok(n == 1)
    }

    /// Withdraws the claim (a verify ending).
    pub async fn verify_release(&self, token: &str) -> Result<(), StoreError> {
        self.write_one(
            sqlx::query("DELETE FROM verify_claim WHERE id = 1 AND token = $1").bind(token),
        )
        .await
        .map(drop)
    }

    /// The current claim, if any (fresh or not).
    pub async fn verify_claim_read(&self) -> Result<Option<VerifyClaim>, StoreError> {
        let r = sqlx::query(
            "SELECT token, rate, heartbeat_ms, ack_token, ack_ms FROM verify_claim WHERE id = 1",
        )
        .fetch_optional(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(r.map(|r| VerifyClaim {
            token: r.get("token"),
            rate: r.get("rate"),
            heartbeat_ms: r.get("heartbeat_ms"),
            ack_token: r.get("ack_token"),
            ack_ms: r.get("ack_ms"),
        }))
    }

    /// The daemon acknowledges a claim: its ceiling is lowered to `ceiling`.
    pub async fn verify_ack(
        &self,
        token: &str,
        now_ms: i64,
        ceiling: f64,
    ) -> Result<(), StoreError> {
        self.write_one(
            sqlx::query(
                "UPDATE verify_claim SET ack_token = $1, ack_ms = $2, ack_ceiling = $3
                 WHERE id = 1 AND token = $1",
            )
            .bind(token)
            .bind(now_ms)
            .bind(ceiling),
        )
        .await
        .map(drop)
    }

    /// Up to `limit` imported messages whose bodies `keep` lets go at `now` (Unix seconds).
    pub async fn bodies_to_drop(
        &self,
        keep: crate::settings::KeepBodies,
        now: i64,
        limit: i64,
    ) -> Result<BodiesToDrop, StoreError> {
        use crate::settings::KeepBodies;
        match keep {
            KeepBodies::Forever => Ok(BodiesToDrop {
                last: true,
                ..BodiesToDrop::default()
            }),
            KeepBodies::UntilVerified => {
                let cursor: i64 = self
                    .meta(BODIES_CURSOR_KEY)
                    .await?
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let rows = sqlx::query(
                    "SELECT r.id AS rid, r.kind, m.id, m.state, COALESCE(b.body, '') AS body
                     FROM verify_results r JOIN messages m ON m.id = r.message_id
                     LEFT JOIN message_bodies b ON b.message_id = m.id
                     WHERE r.id > $1 ORDER BY r.id LIMIT $2",
                )
                .bind(cursor)
                .bind(limit)
                .fetch_all(self.pool())
                .await
                .map_err(|e| self.err(e))?;
                let through = rows.last().map(|r| r.get::<i64, _>("rid"));
                Ok(BodiesToDrop {
                    last: (rows.len() as i64) < limit,
                    cursor: through,
                    messages: rows
                        .iter()
                        .filter(|r| {
                            r.get::<String, _>("kind") == "verified"
                                && r.get::<String, _>("state") == "imported"
                        })
                        .map(|r| (r.get::<i64, _>("id"), r.get::<String, _>("body")))
                        .filter(|(_, b)| !b.is_empty())
                        .collect(),
                })
            }
            KeepBodies::For(d) => {
                let before = now - i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2);
                let rows: Vec<(i64, String)> = sqlx::query_as(
                    "SELECT m.id, b.body FROM message_bodies b JOIN messages m ON m.id = b.message_id
                     WHERE m.state = 'imported' AND m.updated_at < $1
                     ORDER BY b.message_id LIMIT $2",
                )
                .bind(before)
                .bind(limit)
                .fetch_all(self.pool())
                .await
                .map_err(|e| self.err(e))?;
                Ok(BodiesToDrop {
                    last: (rows.len() as i64) < limit,
                    cursor: None,
                    messages: rows,
                })
            }
        }
    }

    /// Drops the bodies of these imported messages, keeping each one's digest (`(id, sha256)`,
    /// computed by the caller exactly as for SQLite), and stores the cursor, in one transaction.
    /// Returns how many were dropped. The deleted body rows are reclaimed by (auto)vacuum.
    pub async fn drop_bodies(
        &self,
        digests: &[(i64, String)],
        cursor: Option<i64>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let mut n = 0;
        if !digests.is_empty() {
            let ids: Vec<i64> = digests.iter().map(|(id, _)| *id).collect();
            let shas: Vec<&str> = digests.iter().map(|(_, s)| s.as_str()).collect();
            n = sqlx::query(
                "UPDATE messages SET body_sha256 = d.sha
                 FROM unnest($1::bigint[], $2::text[]) AS d(id, sha)
                 WHERE messages.id = d.id AND messages.state = 'imported'",
            )
            .bind(&ids)
            .bind(&shas)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?
            .rows_affected();
            sqlx::query(
                "DELETE FROM message_bodies b USING messages m
                 WHERE b.message_id = m.id AND m.id = ANY($1) AND m.state = 'imported'",
            )
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        if let Some(c) = cursor {
            sqlx::query(
                "INSERT INTO meta(key, value) VALUES($1, $2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )
            .bind(BODIES_CURSOR_KEY)
            .bind(c.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        self.commit_tx(tx).await?;
        Ok(n)
    }
}
