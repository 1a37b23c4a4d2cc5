//! PostgreSQL: what the engine claims and records (lanes, messages, accounts, groups and
//! members), and `timport retry`.
//!
//! The same transactions as the SQLite backend ([`crate::store::sqlite`]), with the same meaning
//! statement for statement, written for PostgreSQL: lists go in as arrays (`= ANY($1)`,
//! `UPDATE ... FROM unnest(...)`), so a group commit of many lanes is a fixed handful of
//! statements. Nothing here keeps state outside the database: a transaction cut off by a lost
//! connection rolled back on the server, and the engine reconciles what it left in flight.
//!
//! Locking. Claims and records ([`PgStore::claim_batch`], [`PgStore::record_many`]) run without
//! the queue's writer lock ([`PgStore::begin_lanes`]), so lanes go on while a job is queued and
//! do not wait for each other's round trips. Each locks its lane rows first (in id order), then
//! the job rows its message updates will move (in id order, see [`lock_jobs`]), and only then
//! updates messages; the counter trigger then touches only rows already held, so two of them
//! can never deadlock. What else changes messages, lanes or jobs keeps the writer lock and
//! takes row locks in the same order (lanes, then jobs):
//!
//! - a job's commit ([`super::intake`]) locks the lanes it counts messages in before it adds to
//!   their counters, then its job row; its messages are invisible until then, and its commit
//!   waits for a claim holding one of its lanes (or the claim waits, and then sees them);
//! - `retry` and `retry --accounts` lock the lanes in scope first, then the jobs of their failed
//!   messages, and requeue only the failed messages of the lanes they hold, so a message failed
//!   by a record meanwhile is either seen whole (lane, message) or not at all;
//! - a blocked group locks its lanes in id order before it blocks them.
//!
//! Messages are changed by id or by lane and state, always under their lane's lock; dropping
//! bodies changes no state (the trigger moves nothing) and only touches imported messages,
//! which no claim or record waits for. Verify's rows reference lanes (a key-share lock), which
//! `FOR NO KEY UPDATE` does not block.

use sqlx::postgres::PgArguments;
use sqlx::{PgConnection, Postgres, Row};

use super::PgStore;
use crate::store::rows::{lane_row, member_row, queued_message};
use crate::store::*;

/// The message columns of `m` a claim or a read returns, and its body (`''` once dropped).
const MESSAGE_COLUMNS: &str = "m.id, m.from_account, m.send_time, m.sent_time, m.random, \
     m.recent_contact, m.attempts, COALESCE(b.body, '') AS body";

/// Splits `items` into runs that one array statement each may apply exactly as applying them
/// one by one would: a run holds items of one kind, each id at most once (a repeated id, or a
/// change of kind, starts the next run). Runs come back in order.
fn runs<'a, T>(
    items: impl IntoIterator<Item = &'a T>,
    kind: impl Fn(&T) -> u8,
    id: impl Fn(&T) -> i64,
) -> Vec<(u8, Vec<&'a T>)> {
    let mut out: Vec<(u8, Vec<&'a T>)> = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for item in items {
        let k = kind(item);
        let same = matches!(out.last(), Some((last, _)) if *last == k);
        if !same || !ids.insert(id(item)) {
            ids.clear();
            ids.insert(id(item));
            out.push((k, Vec::new()));
        }
        if let Some((_, run)) = out.last_mut() {
            run.push(item);
        }
    }
    out
}

/// The message an update is for.
fn update_id(u: &MessageUpdate) -> i64 {
    match u {
        MessageUpdate::Imported { id, .. }
        | MessageUpdate::Failed { id, .. }
        | MessageUpdate::Pending { id, .. }
        | MessageUpdate::Unknown { id, .. }
        | MessageUpdate::Adopted { id, .. } => *id,
    }
}

/// Locks the rows of these lanes for the rest of the transaction, in id order (`FOR NO KEY
/// UPDATE`: what an UPDATE of the counters takes anyway; it does not block rows that merely
/// reference a lane, like verify's and a job's `job_lanes`). Returns the ids locked.
async fn lock_lanes(
    store: &PgStore,
    tx: &mut PgConnection,
    ids: &[i64],
) -> Result<Vec<i64>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT id FROM lanes WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .bind(ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| store.err(e))
}

/// Locks, in id order, the job rows whose counters the transaction's message updates will
/// move: the jobs of messages `ids` (a record's), and of the first `limit` pending messages of
/// each of `claim_lanes` (what a claim can take: after a record, a lane's head is at most those
/// and the record's own messages put back). The caller holds these lanes, so no other
/// transaction can add or requeue messages in them meanwhile (a job's commit and `retry` lock
/// the lanes first).
async fn lock_jobs(
    store: &PgStore,
    tx: &mut PgConnection,
    ids: &[i64],
    claim_lanes: &[i64],
    limit: usize,
) -> Result<(), StoreError> {
    if ids.is_empty() && claim_lanes.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "SELECT id FROM jobs WHERE id IN (
             SELECT job_id FROM messages WHERE id = ANY($1)
             UNION
             SELECT h.job_id FROM unnest($2::bigint[]) AS l(id)
             CROSS JOIN LATERAL (SELECT job_id FROM messages
                                 WHERE lane_id = l.id AND state = 'pending'
                                 ORDER BY send_time, id LIMIT $3) AS h)
         ORDER BY id FOR NO KEY UPDATE",
    )
    .bind(ids)
    .bind(claim_lanes)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| store.err(e))?;
    Ok(())
}

impl PgStore {
    /// Active lanes with work whose backoff has passed, oldest wait first.
    pub async fn runnable_lanes(&self, now_ms: i64, limit: i64) -> Result<Vec<Lane>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, group_id, topic_id, last_send_time, last_msg_seq, tie_nudge, checked_id,
                    catch_up_waived FROM lanes
             WHERE state = 'active' AND (pending > 0 OR in_flight > 0) AND retry_at <= $1
               AND NOT EXISTS (SELECT 1 FROM groups g WHERE g.group_id = lanes.group_id
                               AND g.create_state IN ('pending', 'blocked'))
             ORDER BY retry_at, id LIMIT $2",
        )
        .bind(now_ms)
        .bind(limit.max(0))
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(lane_row).collect())
    }

    /// The earliest retry_at of an active lane with work still waiting for its backoff.
    pub async fn next_retry_at(&self) -> Result<Option<i64>, StoreError> {
        sqlx::query_scalar(
            "SELECT MIN(retry_at) FROM lanes WHERE state = 'active' AND (pending > 0 OR in_flight > 0)",
        )
        .fetch_one(self.pool())
        .await
        .map_err(|e| self.err(e))
    }

    /// One lane by id.
    pub async fn lane(&self, id: i64) -> Result<Lane, StoreError> {
        let r = sqlx::query(
            "SELECT id, group_id, topic_id, last_send_time, last_msg_seq, tie_nudge, checked_id,
                    catch_up_waived FROM lanes WHERE id = $1",
        )
        .bind(id)
        .fetch_one(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(lane_row(&r))
    }

    /// Messages of the lane left in flight (an unknown outcome, or a stop mid-request).
    pub async fn in_flight(&self, lane_id: i64) -> Result<Vec<QueuedMessage>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages AS m
             LEFT JOIN message_bodies AS b ON b.message_id = m.id
             WHERE m.lane_id = $1 AND m.state = 'in_flight'
             ORDER BY m.send_time, m.id"
        )))
        .bind(lane_id)
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(queued_message).collect())
    }

    /// Pending messages of the lane with a SendTime up to `upto`, in queue order, at most
    /// `limit` (those a catch-up looks for on the server).
    pub async fn pending_upto(
        &self,
        lane_id: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<QueuedMessage>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages AS m
             LEFT JOIN message_bodies AS b ON b.message_id = m.id
             WHERE m.lane_id = $1 AND m.state = 'pending' AND m.send_time <= $2
             ORDER BY m.send_time, m.id LIMIT $3"
        )))
        .bind(lane_id)
        .bind(upto)
        .bind(limit.max(0))
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(queued_message).collect())
    }

    /// The lane's oldest pending SendTime; the newest message id in the whole queue (an upper
    /// bound of the lane's, read in the same snapshot: one statement); and whether a pending
    /// message with an id above `checked_id` has a SendTime up to `upto`.
    pub async fn pending_span(
        &self,
        lane_id: i64,
        checked_id: i64,
        upto: i64,
    ) -> Result<(Option<i64>, i64, bool), StoreError> {
        let r = sqlx::query(
            "SELECT MIN(send_time) AS oldest,
                    (SELECT COALESCE(MAX(id), 0) FROM messages) AS newest,
                    EXISTS (SELECT 1 FROM messages WHERE lane_id = $1 AND state = 'pending'
                            AND send_time <= $3 AND id > $2) AS stale
             FROM messages WHERE lane_id = $1 AND state = 'pending'",
        )
        .bind(lane_id)
        .bind(checked_id)
        .bind(upto)
        .fetch_one(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok((r.get("oldest"), r.get("newest"), r.get("stale")))
    }

    /// Takes the head of the lane: up to `max` pending messages in (SendTime, queue order) that
    /// share the first one's RecentContactFlag, marks them in flight with their attempt counted,
    /// and (for a nudging lane) fixes the SendTime to send. One short transaction. With
    /// `cut_at_tie`, the batch ends with the first message that shares the second of the one
    /// before it (or of the lane's checkpoint).
    pub async fn claim_batch(
        &self,
        lane: &Lane,
        max: usize,
        cut_at_tie: bool,
    ) -> Result<Vec<QueuedMessage>, StoreError> {
        // No writer lock: the lane, then the jobs of its head (see the module's locking).
        let mut tx = self.begin_lanes().await?;
        let claim = Claim {
            lane: lane.clone(),
            max,
            cut_at_tie,
        };
        lock_lanes(self, &mut tx, &[lane.id]).await?;
        lock_jobs(self, &mut tx, &[], &[lane.id], max).await?;
        let mut batches = self.claim_in(&mut tx, &[&claim]).await?;
        self.commit_tx(tx).await?;
        Ok(batches.pop().unwrap_or_default())
    }

    /// [`PgStore::claim_batch`] for several lanes at once, inside `tx`, whose lane rows the
    /// caller has locked: one statement reads the heads of all the lanes, one marks the chosen
    /// messages in flight (and sets the nudged SendTimes). Batches come back in the order of
    /// `claims`.
    async fn claim_in(
        &self,
        tx: &mut PgConnection,
        claims: &[&Claim],
    ) -> Result<Vec<Vec<QueuedMessage>>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let lane_ids: Vec<i64> = claims.iter().map(|c| c.lane.id).collect();
        let limit = claims.iter().map(|c| c.max).max().unwrap_or(7);
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT m.lane_id, {MESSAGE_COLUMNS}
             FROM unnest($1::bigint[]) AS l(id)
             CROSS JOIN LATERAL (SELECT * FROM messages
                                 WHERE lane_id = l.id AND state = 'pending'
                                 ORDER BY send_time, id LIMIT $2) AS m
             LEFT JOIN message_bodies AS b ON b.message_id = m.id"
        )))
        .bind(&lane_ids)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let mut heads: HashMap<i64, Vec<QueuedMessage>> = HashMap::new();
        for r in &rows {
            heads
                .entry(r.get("lane_id"))
                .or_default()
                .push(queued_message(r));
        }
        // The original SendTime of the newest imported message of every nudging lane with
        // something to claim: only messages from that second on are ties to move.
        let nudging: Vec<i64> = claims
            .iter()
            .filter(|c| c.lane.tie_nudge && heads.contains_key(&c.lane.id))
            .map(|c| c.lane.id)
            .collect();
        let mut newest_imported: HashMap<i64, i64> = HashMap::new();
        if !nudging.is_empty() {
            let rows = sqlx::query(
                "SELECT l.id, (SELECT send_time FROM messages
                               WHERE lane_id = l.id AND state = 'imported'
                               ORDER BY send_time DESC, id DESC LIMIT 1) AS send_time
                 FROM unnest($1::bigint[]) AS l(id)",
            )
            .bind(&nudging)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
            for r in &rows {
                if let Some(t) = r.get::<Option<i64>, _>("send_time") {
                    newest_imported.insert(r.get("id"), t);
                }
            }
        }
        let mut batches = Vec::with_capacity(claims.len());
        for claim in claims {
            let lane = &claim.lane;
            let mut batch = heads.remove(&lane.id).unwrap_or_default();
            batch.sort_by_key(|m| (m.send_time, m.id));
            batch.truncate(claim.max);
            if let Some(first) = batch.first() {
                let flag = first.recent_contact;
                if let Some(cut) = batch.iter().position(|m| m.recent_contact != flag) {
                    batch.truncate(cut);
                }
            }
            let mut prev = lane.last_send_time;
            let mut prev_orig = if lane.tie_nudge {
                newest_imported
                    .get(&lane.id)
                    .copied()
                    .unwrap_or(lane.last_send_time)
            } else {
                lane.last_send_time
            };
            let mut cut = None;
            for (i, m) in batch.iter_mut().enumerate() {
                let sent = if lane.tie_nudge && m.send_time >= prev_orig && m.send_time <= prev {
                    Some(prev + 1)
                } else {
                    None
                };
                prev_orig = m.send_time;
                m.sent_time = sent;
                if claim.cut_at_tie && cut.is_none() && m.effective_time() == prev {
                    cut = Some(i + 1);
                }
                prev = m.effective_time();
            }
            if let Some(c) = cut {
                batch.truncate(c);
            }
            for m in batch.iter_mut() {
                m.attempts += 1;
            }
            batches.push(batch);
        }
        let (ids, sent): (Vec<i64>, Vec<Option<i64>>) = batches
            .iter()
            .flatten()
            .map(|m| (m.id, m.sent_time))
            .unzip();
        if !ids.is_empty() {
            sqlx::query(
                "UPDATE messages SET state = 'in_flight', attempts = attempts + 1,
                 sent_time = v.sent_time, updated_at = $1
                 FROM unnest($2::bigint[], $3::bigint[]) AS v(id, sent_time)
                 WHERE messages.id = v.id AND messages.state = 'pending'",
            )
            .bind(unix_now())
            .bind(&ids)
            .bind(&sent)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        Ok(batches)
    }

    /// Records the answer for a lane's messages and moves its checkpoint, in one transaction.
    /// Only messages still in flight are changed, so a late or repeated record is harmless.
    pub async fn record(
        &self,
        lane_id: i64,
        updates: &[MessageUpdate],
        lane: &LaneUpdate,
    ) -> Result<(), StoreError> {
        let record = Record {
            lane_id,
            updates: updates.to_vec(),
            lane: lane.clone(),
            next: None,
        };
        self.record_many(std::slice::from_ref(&record))
            .await
            .map(|_| ())
    }

    /// Records the answers of several lanes and claims their next batches, all in one
    /// transaction with a fixed handful of statements however many lanes there are (a group
    /// commit). Returns each record's next batch, in order (empty where nothing was claimed).
    pub async fn record_many(
        &self,
        records: &[Record],
    ) -> Result<Vec<Vec<QueuedMessage>>, StoreError> {
        let now = unix_now();
        // No writer lock: all the lanes, then the jobs of the messages recorded and of the heads
        // to claim, then the messages (see the module's locking).
        let mut tx = self.begin_lanes().await?;
        let mut lane_ids: Vec<i64> = records
            .iter()
            .map(|r| r.lane_id)
            .chain(
                records
                    .iter()
                    .filter_map(|r| r.next.as_ref().map(|c| c.lane.id)),
            )
            .collect();
        lane_ids.sort_unstable();
        lane_ids.dedup();
        lock_lanes(self, &mut tx, &lane_ids).await?;
        let updates = || records.iter().flat_map(|r| r.updates.iter());
        let message_ids: Vec<i64> = updates().map(update_id).collect();
        let claims: Vec<&Claim> = records.iter().filter_map(|r| r.next.as_ref()).collect();
        let claim_lanes: Vec<i64> = claims.iter().map(|c| c.lane.id).collect();
        let claim_max = claims.iter().map(|c| c.max).max().unwrap_or(0);
        lock_jobs(self, &mut tx, &message_ids, &claim_lanes, claim_max).await?;
        // The common outcomes in one statement each for every record at once.
        let mut imported = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::<Option<String>>::new(),
        );
        for u in updates() {
            if let MessageUpdate::Imported {
                id,
                msg_seq,
                msg_time,
                note,
            } = u
            {
                imported.0.push(*id);
                imported.1.push(*msg_seq);
                imported.2.push(*msg_time);
                imported.3.push(note.clone());
            }
        }
        if !imported.0.is_empty() {
            sqlx::query(
                "UPDATE messages SET state = 'imported', msg_seq = v.msg_seq, msg_time = v.msg_time,
                 result_code = 0, result_text = v.note, updated_at = $1
                 FROM unnest($2::bigint[], $3::bigint[], $4::bigint[], $5::text[])
                      AS v(id, msg_seq, msg_time, note)
                 WHERE messages.id = v.id AND messages.state = 'in_flight'",
            )
            .bind(now)
            .bind(&imported.0)
            .bind(&imported.1)
            .bind(&imported.2)
            .bind(&imported.3)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        for refund in [false, true] {
            let ids: Vec<i64> = updates()
                .filter_map(|u| match u {
                    MessageUpdate::Pending { id, refund: r } if *r == refund => Some(*id),
                    _ => None,
                })
                .collect();
            if ids.is_empty() {
                continue;
            }
            sqlx::query(
                "UPDATE messages SET state = 'pending', attempts = GREATEST(attempts - $1, 0),
                 updated_at = $2 WHERE id = ANY($3) AND state = 'in_flight'",
            )
            .bind(i64::from(refund))
            .bind(now)
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        // The rare outcomes in the order given, one statement per run of one kind.
        let rare = updates().filter(|u| {
            !matches!(
                u,
                MessageUpdate::Imported { .. } | MessageUpdate::Pending { .. }
            )
        });
        let kind = |u: &MessageUpdate| match u {
            MessageUpdate::Failed { .. } => 0,
            MessageUpdate::Unknown { .. } => 1,
            _ => 2,
        };
        for (_, run) in runs(rare, kind, update_id) {
            let mut ids = Vec::new();
            let mut codes = Vec::new();
            let mut seqs = Vec::new();
            let mut times = Vec::new();
            let mut texts = Vec::new();
            for u in &run {
                match u {
                    MessageUpdate::Failed { id, code, reason } => {
                        ids.push(*id);
                        codes.push(*code);
                        texts.push(reason.clone());
                    }
                    MessageUpdate::Unknown { id, note } => {
                        ids.push(*id);
                        texts.push(note.clone());
                    }
                    MessageUpdate::Adopted {
                        id,
                        msg_seq,
                        msg_time,
                        note,
                    } => {
                        ids.push(*id);
                        seqs.push(*msg_seq);
                        times.push(*msg_time);
                        texts.push(note.clone());
                    }
                    MessageUpdate::Imported { .. } | MessageUpdate::Pending { .. } => {}
                }
            }
            let q = match run.first() {
                Some(MessageUpdate::Failed { .. }) => sqlx::query(
                    "UPDATE messages SET state = 'failed', result_code = v.code,
                     result_text = v.reason, updated_at = $1
                     FROM unnest($2::bigint[], $3::bigint[], $4::text[]) AS v(id, code, reason)
                     WHERE messages.id = v.id AND messages.state = 'in_flight'",
                )
                .bind(now)
                .bind(ids)
                .bind(codes)
                .bind(texts),
                Some(MessageUpdate::Unknown { .. }) => sqlx::query(
                    "UPDATE messages SET result_code = NULL, result_text = v.note, updated_at = $1
                     FROM unnest($2::bigint[], $3::text[]) AS v(id, note)
                     WHERE messages.id = v.id AND messages.state = 'in_flight'",
                )
                .bind(now)
                .bind(ids)
                .bind(texts),
                Some(MessageUpdate::Adopted { .. }) => sqlx::query(
                    "UPDATE messages SET state = 'imported', msg_seq = v.msg_seq,
                     msg_time = v.msg_time, result_code = 0, result_text = v.note, updated_at = $1
                     FROM unnest($2::bigint[], $3::bigint[], $4::bigint[], $5::text[])
                          AS v(id, msg_seq, msg_time, note)
                     WHERE messages.id = v.id AND messages.state IN ('pending', 'in_flight')",
                )
                .bind(now)
                .bind(ids)
                .bind(seqs)
                .bind(times)
                .bind(texts),
                _ => continue,
            };
            q.execute(&mut *tx).await.map_err(|e| self.err(e))?;
        }
        // Every lane's checkpoint in one statement.
        let mut l = LaneArrays::default();
        for r in records {
            l.push(r.lane_id, &r.lane);
        }
        sqlx::query(
            "UPDATE lanes SET
                last_send_time = GREATEST(lanes.last_send_time, COALESCE(v.seen_send_time, 0)),
                last_msg_seq = GREATEST(lanes.last_msg_seq, COALESCE(v.seen_msg_seq, 0)),
                retry_at = COALESCE(v.retry_at, lanes.retry_at),
                state = CASE WHEN v.block_reason IS NOT NULL THEN 'blocked' ELSE lanes.state END,
                blocked_code = CASE WHEN v.block_reason IS NOT NULL THEN v.block_code
                                    ELSE lanes.blocked_code END,
                blocked_reason = COALESCE(v.block_reason, lanes.blocked_reason),
                tie_nudge = GREATEST(lanes.tie_nudge, v.tie_nudge),
                last_error = COALESCE(v.last_error, lanes.last_error),
                checked_id = GREATEST(lanes.checked_id, COALESCE(v.checked_id, 0)),
                catch_up_waived = CASE WHEN v.checked_id IS NOT NULL THEN 0
                                       ELSE lanes.catch_up_waived END,
                updated_at = $1
             FROM unnest($2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[],
                         $7::text[], $8::bigint[], $9::text[], $10::bigint[])
                  AS v(id, seen_send_time, seen_msg_seq, retry_at, block_code, block_reason,
                       tie_nudge, last_error, checked_id)
             WHERE lanes.id = v.id",
        )
        .bind(now)
        .bind(&l.id)
        .bind(&l.seen_send_time)
        .bind(&l.seen_msg_seq)
        .bind(&l.retry_at)
        .bind(&l.block_code)
        .bind(&l.block_reason)
        .bind(&l.tie_nudge)
        .bind(&l.last_error)
        .bind(&l.checked_id)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let mut claimed = self.claim_in(&mut tx, &claims).await?.into_iter();
        self.commit_tx(tx).await?;
        Ok(records
            .iter()
            .map(|r| {
                r.next
                    .as_ref()
                    .and_then(|_| claimed.next())
                    .unwrap_or_default()
            })
            .collect())
    }

    /// Puts failed messages back to pending (attempts reset) and unblocks lanes: for one group,
    /// one job, or everything. For a group, a refused creation is taken as "import into the group
    /// as it is" and failed members are queued again. Returns (messages requeued, lanes
    /// unblocked).
    pub async fn retry(&self, scope: RetryScope<'_>) -> Result<(u64, u64), StoreError> {
        // The lanes in scope, as `$1` names the group or the job.
        let lanes_where = match scope {
            RetryScope::All => "TRUE",
            RetryScope::Group(_) => "group_id = $1",
            RetryScope::Job(_) => "id IN (SELECT lane_id FROM job_lanes WHERE job_id = $1)",
        };
        let job = match scope {
            RetryScope::Job(j) => Some(j),
            _ => None,
        };
        // The failed messages in scope (of `m`), the job being parameter `$n`.
        let failed_where = |n: u8| match job {
            Some(_) => format!("m.job_id = ${n}"),
            None => "TRUE".to_string(),
        };
        let bind = |q: sqlx::query::Query<'static, Postgres, PgArguments>| match scope {
            RetryScope::All => q,
            RetryScope::Group(g) => q.bind(g.to_string()),
            RetryScope::Job(j) => q.bind(j),
        };
        let bind_job = |q: sqlx::query::Query<'static, Postgres, PgArguments>| match job {
            Some(j) => q.bind(j),
            None => q,
        };
        let now = unix_now();
        let mut tx = self.begin().await?;
        if let RetryScope::Group(g) = scope {
            sqlx::query(
                "UPDATE groups SET create_state = 'created', step_error = NULL, retry_at = 0
                 WHERE group_id = $1 AND create_state = 'blocked'",
            )
            .bind(g)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
            sqlx::query(
                "UPDATE members SET
                    state = CASE WHEN state = 'failed' THEN 'pending' ELSE state END,
                    unread_state = CASE WHEN unread_state = 'failed' THEN 'pending'
                                        ELSE unread_state END
                 WHERE group_id = $1 AND (state = 'failed' OR unread_state = 'failed')",
            )
            .bind(g)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        // The writer lock keeps jobs and other retries out, not the engine's claims and
        // records: lock the lanes to change (blocked, or holding failed messages) in id order,
        // then the jobs of their failed messages, then change only what those lanes hold. A
        // message a record fails meanwhile in another lane stays failed, as if it failed after
        // this retry; one in a lane held here waited for this retry, or was seen with its lane.
        let lanes: Vec<i64> = bind(sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM lanes WHERE {lanes_where}
               AND (state = 'blocked' OR EXISTS (SELECT 1 FROM messages m
                    WHERE m.lane_id = lanes.id AND m.state = 'failed' AND {}))
             ORDER BY id FOR NO KEY UPDATE",
            failed_where(1)
        ))))
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.err(e))?
        .iter()
        .map(|r| r.get("id"))
        .collect();
        if lanes.is_empty() {
            self.commit_tx(tx).await?;
            return Ok((0, 0));
        }
        bind_job(
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT id FROM jobs WHERE id IN (SELECT m.job_id FROM messages m
                     WHERE m.lane_id = ANY($1) AND m.state = 'failed' AND {})
                 ORDER BY id FOR NO KEY UPDATE",
                failed_where(2)
            )))
            .bind(&lanes),
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let m = bind_job(
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE messages AS m SET state = 'pending', attempts = 0, result_code = NULL,
                 result_text = NULL, updated_at = $1
                 WHERE m.state = 'failed' AND m.lane_id = ANY($2) AND {}",
                failed_where(3)
            )))
            .bind(now)
            .bind(&lanes),
        )
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let l = sqlx::query(
            "UPDATE lanes SET state = 'active', blocked_code = NULL, blocked_reason = NULL,
             retry_at = 0, updated_at = $1,
             -- Blocked by the engine itself (a history it could not read conclusively): the
             -- operator has looked, so the next catch-up takes the history as it is.
             catch_up_waived = CASE WHEN blocked_code IS NULL THEN 1 ELSE catch_up_waived END
             WHERE state = 'blocked' AND id = ANY($2)",
        )
        .bind(now)
        .bind(&lanes)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        self.commit_tx(tx).await?;
        Ok((m.rows_affected(), l.rows_affected()))
    }
}

/// The lane checkpoints of a group commit, column by column (for `unnest`).
#[derive(Default)]
struct LaneArrays {
    id: Vec<i64>,
    seen_send_time: Vec<Option<i64>>,
    seen_msg_seq: Vec<Option<i64>>,
    retry_at: Vec<Option<i64>>,
    block_code: Vec<Option<i64>>,
    block_reason: Vec<Option<String>>,
    tie_nudge: Vec<i64>,
    last_error: Vec<Option<String>>,
    checked_id: Vec<Option<i64>>,
}

impl LaneArrays {
    fn push(&mut self, id: i64, u: &LaneUpdate) {
        let (code, reason) = match &u.block {
            Some((c, reason)) => (*c, Some(reason.clone())),
            None => (None, None),
        };
        self.id.push(id);
        self.seen_send_time.push(u.seen_send_time);
        self.seen_msg_seq.push(u.seen_msg_seq);
        self.retry_at.push(u.retry_at);
        self.block_code.push(code);
        self.block_reason.push(reason);
        self.tie_nudge.push(i64::from(u.tie_nudge));
        self.last_error.push(u.last_error.clone());
        self.checked_id.push(u.checked_id);
    }
}

impl PgStore {
    /// Up to `limit` pending accounts of one form: with profile data (`profile`) or IDs only,
    /// in byte order of their IDs (as on SQLite, whatever the database's collation).
    pub async fn pending_accounts(
        &self,
        profile: bool,
        limit: i64,
    ) -> Result<Vec<PendingAccount>, StoreError> {
        let rows = sqlx::query(
            "SELECT user_id, nick, face_url FROM accounts
             WHERE state = 'pending' AND profile = $1 ORDER BY user_id COLLATE \"C\" LIMIT $2",
        )
        .bind(i64::from(profile))
        .bind(limit.max(0))
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows
            .iter()
            .map(|r| PendingAccount {
                user_id: r.get("user_id"),
                nick: r.get("nick"),
                face_url: r.get("face_url"),
            })
            .collect())
    }

    /// The states of these accounts (an ID the table does not hold is absent).
    pub async fn account_states(
        &self,
        ids: &[&str],
    ) -> Result<HashMap<String, AccountState>, StoreError> {
        let rows =
            sqlx::query("SELECT user_id, state, reason FROM accounts WHERE user_id = ANY($1)")
                .bind(ids)
                .fetch_all(self.pool())
                .await
                .map_err(|e| self.err(e))?;
        Ok(rows
            .iter()
            .map(|r| {
                let state: String = r.get("state");
                let st = match state.as_str() {
                    "imported" => AccountState::Imported,
                    "failed" => AccountState::Failed(
                        r.get::<Option<String>, _>("reason").unwrap_or_default(),
                    ),
                    _ => AccountState::Pending,
                };
                (r.get("user_id"), st)
            })
            .collect())
    }

    /// Records an account request's answer in one transaction: `imported` are on the server;
    /// `failed` (ID, reason) are not, and the pending memberships that need them fail with them.
    pub async fn record_accounts(
        &self,
        imported: &[&str],
        failed: &[(&str, String)],
    ) -> Result<(), StoreError> {
        let now = unix_now();
        let mut tx = self.begin().await?;
        if !imported.is_empty() {
            sqlx::query(
                "UPDATE accounts SET state = 'imported', attempts = attempts + 1, reason = NULL,
                 updated_at = $2 WHERE user_id = ANY($1) AND state = 'pending'",
            )
            .bind(imported)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        if !failed.is_empty() {
            let (ids, reasons): (Vec<&str>, Vec<&str>) =
                failed.iter().map(|(id, r)| (*id, r.as_str())).unzip();
            sqlx::query(
                "UPDATE accounts SET state = 'failed', attempts = attempts + 1,
                 reason = v.reason, updated_at = $3
                 FROM unnest($1::text[], $2::text[]) AS v(user_id, reason)
                 WHERE accounts.user_id = v.user_id AND accounts.state = 'pending'",
            )
            .bind(&ids)
            .bind(&reasons)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
            sqlx::query(
                "UPDATE members SET state = 'failed',
                 result_text = 'member ' || $4::text || ': ' || v.reason, updated_at = $3
                 FROM unnest($1::text[], $2::text[]) AS v(user_id, reason)
                 WHERE members.member_account = v.user_id AND members.state = 'pending'",
            )
            .bind(&ids)
            .bind(&reasons)
            .bind(now)
            .bind(ACCOUNT_FAILED_REASON.trim_start_matches("sender "))
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        self.commit_tx(tx).await
    }

    /// Whether any account waits to be imported.
    pub async fn accounts_pending(&self) -> Result<bool, StoreError> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE state = 'pending')")
            .fetch_one(self.pool())
            .await
            .map_err(|e| self.err(e))
    }

    /// Account counts.
    pub async fn account_totals(&self) -> Result<AccountTotals, StoreError> {
        let r = sqlx::query(
            "SELECT COUNT(*) FILTER (WHERE state = 'imported') AS imported,
                    COUNT(*) FILTER (WHERE state = 'pending') AS pending,
                    COUNT(*) FILTER (WHERE state = 'failed') AS failed FROM accounts",
        )
        .fetch_one(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(AccountTotals {
            imported: r.get("imported"),
            pending: r.get("pending"),
            failed: r.get("failed"),
        })
    }

    /// `timport retry --accounts`: failed accounts back to pending, with the messages and
    /// memberships that failed for them. (`ILIKE`: SQLite's `LIKE` ignores ASCII case.)
    pub async fn retry_accounts(&self) -> Result<AccountRetry, StoreError> {
        let now = unix_now();
        let mut tx = self.begin().await?;
        let a = sqlx::query(
            "UPDATE accounts SET state = 'pending', reason = NULL, updated_at = $1
             WHERE state = 'failed'",
        )
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        // As in `retry`: the lanes of the messages to requeue (in id order), then their jobs,
        // then only the messages of the lanes held (the engine's records take no writer lock).
        let lanes: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM lanes WHERE id IN (SELECT lane_id FROM messages
                 WHERE state = 'failed' AND result_code IS NULL AND result_text ILIKE $1::text || '%')
             ORDER BY id FOR NO KEY UPDATE",
        )
        .bind(ACCOUNT_FAILED_REASON)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        sqlx::query(
            "SELECT id FROM jobs WHERE id IN (SELECT job_id FROM messages
                 WHERE lane_id = ANY($2) AND state = 'failed' AND result_code IS NULL
                   AND result_text ILIKE $1::text || '%')
             ORDER BY id FOR NO KEY UPDATE",
        )
        .bind(ACCOUNT_FAILED_REASON)
        .bind(&lanes)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let m = sqlx::query(
            "UPDATE messages SET state = 'pending', attempts = 0, result_code = NULL,
             result_text = NULL, updated_at = $1
             WHERE state = 'failed' AND result_code IS NULL AND result_text ILIKE $2::text || '%'
               AND lane_id = ANY($3)",
        )
        .bind(now)
        .bind(ACCOUNT_FAILED_REASON)
        .bind(&lanes)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let g = sqlx::query(
            "UPDATE members SET state = 'pending', result_text = NULL, updated_at = $1
             WHERE state = 'failed' AND result_text ILIKE 'member ' || $2::text || '%'",
        )
        .bind(now)
        .bind(ACCOUNT_FAILED_REASON.trim_start_matches("sender "))
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        self.commit_tx(tx).await?;
        Ok(AccountRetry {
            accounts: a.rows_affected(),
            messages: m.rows_affected(),
            members: g.rows_affected(),
        })
    }

    /// Groups whose import_group is due, in byte order of their IDs.
    pub async fn groups_to_create(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<GroupToCreate>, StoreError> {
        let rows = sqlx::query(
            "SELECT group_id, spec, create_attempts FROM groups
             WHERE create_state = 'pending' AND retry_at <= $1
             ORDER BY group_id COLLATE \"C\" LIMIT $2",
        )
        .bind(now_ms)
        .bind(limit.max(0))
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows
            .iter()
            .map(|r| GroupToCreate {
                group_id: r.get("group_id"),
                spec: r.get::<Option<String>, _>("spec").unwrap_or_default(),
                attempts: r.get("create_attempts"),
            })
            .collect())
    }

    /// Counts an import_group attempt before it is sent.
    pub async fn count_create_attempt(&self, group: &str) -> Result<(), StoreError> {
        self.write_one(
            sqlx::query(
                "UPDATE groups SET create_attempts = create_attempts + 1 WHERE group_id = $1",
            )
            .bind(group),
        )
        .await
        .map(|_| ())
    }

    /// The group exists now: its messages may go.
    pub async fn group_created(&self, group: &str, note: Option<&str>) -> Result<(), StoreError> {
        self.write_one(
            sqlx::query(
                "UPDATE groups SET create_state = 'created', step_error = $1 WHERE group_id = $2",
            )
            .bind(note)
            .bind(group),
        )
        .await
        .map(|_| ())
    }

    /// The group cannot be created: it and all its lanes are blocked with the reason.
    pub async fn group_blocked(
        &self,
        group: &str,
        code: Option<i64>,
        reason: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE groups SET create_state = 'blocked', step_error = $1 WHERE group_id = $2",
        )
        .bind(reason)
        .bind(group)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        // The group's lanes in id order first, as claims and records lock them (they take no
        // writer lock); the UPDATE alone would lock them in the order it finds them.
        sqlx::query("SELECT id FROM lanes WHERE group_id = $1 ORDER BY id FOR NO KEY UPDATE")
            .bind(group)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        sqlx::query(
            "UPDATE lanes SET state = 'blocked', blocked_code = $1, blocked_reason = $2,
             updated_at = $3 WHERE group_id = $4",
        )
        .bind(code)
        .bind(reason)
        .bind(unix_now())
        .bind(group)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        self.commit_tx(tx).await
    }

    /// Delays the group's next step (backoff) and says why.
    pub async fn group_retry_at(
        &self,
        group: &str,
        retry_at_ms: i64,
        why: &str,
    ) -> Result<(), StoreError> {
        self.write_one(
            sqlx::query("UPDATE groups SET retry_at = $1, step_error = $2 WHERE group_id = $3")
                .bind(retry_at_ms)
                .bind(why)
                .bind(group),
        )
        .await
        .map(|_| ())
    }

    /// Groups with member work that may run now: created (or nothing to create), and no message
    /// of theirs pending or in flight, in any lane, blocked or not.
    pub async fn groups_with_member_work(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT DISTINCT m.group_id FROM members m JOIN groups g ON g.group_id = m.group_id
             WHERE (m.state = 'pending' OR m.unread_state = 'pending')
               AND COALESCE(g.create_state, 'created') = 'created' AND g.retry_at <= $1
               AND NOT EXISTS (SELECT 1 FROM lanes l WHERE l.group_id = m.group_id
                               AND (l.pending > 0 OR l.in_flight > 0))
             LIMIT $2",
        )
        .bind(now_ms)
        .bind(limit.max(0))
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))
    }

    /// Whether a group step can still run (for `--until-idle`): a creation, or member work not
    /// waiting behind a blocked lane or a blocked creation.
    pub async fn group_work_left(&self) -> Result<bool, StoreError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM groups WHERE create_state = 'pending')
                 OR EXISTS (SELECT 1 FROM members m JOIN groups g ON g.group_id = m.group_id
                            WHERE (m.state = 'pending' OR m.unread_state = 'pending')
                              AND COALESCE(g.create_state, 'created') = 'created'
                              AND NOT EXISTS (SELECT 1 FROM lanes l WHERE l.group_id = m.group_id
                                              AND l.state = 'blocked'))",
        )
        .fetch_one(self.pool())
        .await
        .map_err(|e| self.err(e))
    }

    /// Up to `limit` members of the group still to import.
    pub async fn pending_members(
        &self,
        group: &str,
        limit: i64,
    ) -> Result<Vec<MemberRow>, StoreError> {
        self.members_where(group, "state = 'pending'", limit).await
    }

    /// Members of the group whose unread count is still to set.
    pub async fn pending_unread(
        &self,
        group: &str,
        limit: i64,
    ) -> Result<Vec<MemberRow>, StoreError> {
        self.members_where(group, "unread_state = 'pending'", limit)
            .await
    }

    async fn members_where(
        &self,
        group: &str,
        condition: &'static str,
        limit: i64,
    ) -> Result<Vec<MemberRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id, member_account, role, join_time, unread_msg_num FROM members
             WHERE group_id = $1 AND {condition} ORDER BY id LIMIT $2"
        )))
        .bind(group)
        .bind(limit.max(0))
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(member_row).collect())
    }

    /// Records member outcomes in one transaction: one statement per run of one kind, in the
    /// order given.
    pub async fn record_members(&self, updates: &[MemberUpdate]) -> Result<(), StoreError> {
        let now = unix_now();
        let kind = |u: &MemberUpdate| match u {
            MemberUpdate::Imported { .. } => 0,
            MemberUpdate::Failed { .. } => 1,
            MemberUpdate::UnreadSet { .. } => 2,
            MemberUpdate::UnreadFailed { .. } => 3,
        };
        let id_of = |u: &MemberUpdate| match u {
            MemberUpdate::Imported { id, .. }
            | MemberUpdate::Failed { id, .. }
            | MemberUpdate::UnreadSet { id }
            | MemberUpdate::UnreadFailed { id, .. } => *id,
        };
        let mut tx = self.begin().await?;
        for (k, run) in runs(updates, kind, id_of) {
            let mut ids = Vec::new();
            let mut results = Vec::new();
            let mut texts = Vec::new();
            for u in &run {
                ids.push(id_of(u));
                match u {
                    MemberUpdate::Imported {
                        result,
                        unread_pending,
                        ..
                    } => {
                        results.push(Some(*result));
                        texts.push(if *unread_pending { "pending" } else { "none" }.to_string());
                    }
                    MemberUpdate::Failed { result, reason, .. } => {
                        results.push(*result);
                        texts.push(reason.clone());
                    }
                    MemberUpdate::UnreadSet { .. } => {}
                    MemberUpdate::UnreadFailed { reason, .. } => texts.push(reason.clone()),
                }
            }
            let q = match k {
                0 => sqlx::query(
                    "UPDATE members SET state = 'imported', result = v.result,
                     unread_state = v.unread_state, result_text = NULL, updated_at = $1
                     FROM unnest($2::bigint[], $3::bigint[], $4::text[])
                          AS v(id, result, unread_state)
                     WHERE members.id = v.id",
                )
                .bind(now)
                .bind(ids)
                .bind(results)
                .bind(texts),
                1 => sqlx::query(
                    "UPDATE members SET state = 'failed', result = v.result,
                     result_text = v.reason, updated_at = $1
                     FROM unnest($2::bigint[], $3::bigint[], $4::text[]) AS v(id, result, reason)
                     WHERE members.id = v.id",
                )
                .bind(now)
                .bind(ids)
                .bind(results)
                .bind(texts),
                2 => sqlx::query(
                    "UPDATE members SET unread_state = 'set', updated_at = $1 WHERE id = ANY($2)",
                )
                .bind(now)
                .bind(ids),
                _ => sqlx::query(
                    "UPDATE members SET unread_state = 'failed', result_text = v.reason,
                     updated_at = $1
                     FROM unnest($2::bigint[], $3::text[]) AS v(id, reason)
                     WHERE members.id = v.id",
                )
                .bind(now)
                .bind(ids)
                .bind(texts),
            };
            q.execute(&mut *tx).await.map_err(|e| self.err(e))?;
        }
        self.commit_tx(tx).await
    }

    /// Member counts (all, or one group's).
    pub async fn member_totals(&self, group: Option<&str>) -> Result<MemberTotals, StoreError> {
        let r = sqlx::query(
            "SELECT COUNT(*) FILTER (WHERE state = 'pending') AS pending,
                    COUNT(*) FILTER (WHERE state = 'imported') AS imported,
                    COUNT(*) FILTER (WHERE state = 'failed' OR unread_state = 'failed') AS failed,
                    COUNT(*) FILTER (WHERE unread_state = 'pending') AS unread_pending
             FROM members WHERE ($1::text IS NULL OR group_id = $1)",
        )
        .bind(group)
        .fetch_one(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(MemberTotals {
            pending: r.get("pending"),
            imported: r.get("imported"),
            failed: r.get("failed"),
            unread_pending: r.get("unread_pending"),
        })
    }
}
