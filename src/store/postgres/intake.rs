//! PostgreSQL: queueing jobs ([`PgJobWriter`]) and reading the intake table.
//!
//! A job is one transaction from [`PgStore::begin`] (holding the queue's writer lock), so it
//! commits whole or leaves nothing; a connection lost midway rolls it back on the server. The
//! assignment of Randoms and the bookkeeping of caller-given ones are shared with SQLite
//! ([`JobBuf`]); what differs is how rows go in: every buffer of messages is a binary COPY into
//! messages and one into their bodies (with a block of ids drawn from the sequence beforehand),
//! lookups of many keys are one `unnest` join, and counters are written at commit from arrays,
//! one statement each.

use sqlx::{Postgres, Row, Transaction};

use super::PgStore;
use crate::store::assign::{JobBuf, Next};
use crate::store::*;

/// Messages buffered before they are written, sorted by lane (stable, so each lane keeps its
/// file order and its queue order): one INSERT per buffer.
const SORT_CHUNK: usize = 8192;

/// One job being queued, inside one write transaction: all of it commits, or nothing.
pub struct PgJobWriter {
    store: PgStore,
    tx: Transaction<'static, Postgres>,
    /// The job's lanes, groups, buffer and Random bookkeeping (see [`JobBuf`]).
    b: JobBuf,
    /// The id of the last message written (for [`PgJobWriter::push_returning_id`]).
    last_id: Option<i64>,
}

impl PgStore {
    /// Starts queueing a job. `kind` is `file` or `intake`; for `intake` the one intake job is
    /// reused.
    pub async fn job_writer(&self, kind: &str, source: &str) -> Result<PgJobWriter, StoreError> {
        if self.random_key.is_none() {
            return Err(self.fault("the database was opened read-only".into()));
        }
        if !matches!(kind, "file" | "intake") {
            return Err(self.fault(format!("unknown job kind {kind:?}")));
        }
        // Not fenced: queueing sends nothing, any node may do it, and a job's transaction can
        // last long; holding the lease row FOR SHARE that long would hold up this node's own
        // renewals (see `PgStore::begin_job`).
        let mut tx = self.begin_job().await?;
        let existing: Option<i64> = if kind == "intake" {
            sqlx::query_scalar("SELECT id FROM jobs WHERE kind = 'intake' ORDER BY id LIMIT 1")
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.err(e))?
        } else {
            None
        };
        let job_id = match existing {
            Some(id) => id,
            None => sqlx::query_scalar(
                "INSERT INTO jobs(kind, source, created_at) VALUES($1, $2, $3) RETURNING id",
            )
            .bind(kind)
            .bind(if kind == "intake" {
                "intake table"
            } else {
                source
            })
            .bind(unix_now())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.err(e))?,
        };
        Ok(PgJobWriter {
            store: self.clone(),
            tx,
            b: JobBuf::new(job_id, kind, source, SORT_CHUNK),
            last_id: None,
        })
    }

    /// New rows of the intake table, oldest first. The columns are typed in PostgreSQL, so each
    /// comes back as the JSON value of its type (text as a string, bigint as a number); NULL is
    /// `None`.
    pub async fn new_intake_rows(&self, limit: i64) -> Result<Vec<IntakeRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, group_id, topic_id, from_account, send_time, random, msg_body,
                    recent_contact_flag
             FROM intake WHERE status = 'new' ORDER BY id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        let text = |r: &sqlx::postgres::PgRow, col: &str| -> Option<serde_json::Value> {
            r.get::<Option<String>, _>(col)
                .map(serde_json::Value::String)
        };
        let int = |r: &sqlx::postgres::PgRow, col: &str| -> Option<serde_json::Value> {
            r.get::<Option<i64>, _>(col).map(serde_json::Value::from)
        };
        Ok(rows
            .iter()
            .map(|r| IntakeRow {
                id: r.get("id"),
                group_id: text(r, "group_id"),
                topic_id: text(r, "topic_id"),
                from_account: text(r, "from_account"),
                send_time: int(r, "send_time"),
                random: int(r, "random"),
                msg_body: text(r, "msg_body"),
                recent_contact_flag: int(r, "recent_contact_flag"),
            })
            .collect())
    }

    /// An error of the job's own bookkeeping (not of the server).
    fn fault(&self, what: String) -> StoreError {
        StoreError::Pg {
            target: self.target.clone(),
            source: sqlx::Error::Protocol(what),
        }
    }
}

impl PgJobWriter {
    /// The job's id (valid once committed).
    pub fn job_id(&self) -> i64 {
        self.b.job_id
    }

    /// Lists an account with profile data (written at commit).
    pub fn add_account(&mut self, a: NewAccount) {
        self.b.accounts.profiles.push(a);
    }

    /// Queues one message (buffered; written in multi-row INSERTs). Returns the Random it gets.
    /// See [`crate::store::JobWriter::push`].
    pub async fn push(&mut self, msg: NewMessage) -> Result<u32, StoreError> {
        let lane_id = self.ensure_lane(&msg.group_id, &msg.topic_id).await?;
        self.b.count_in_lane(&msg.group_id, &msg.topic_id);
        self.b.accounts.name(&msg.from_account);
        let (random, assigned) = match msg.random {
            Some(r) => {
                self.b
                    .given(&msg.group_id, r)
                    .map_err(|w| self.store.fault(w))?;
                (r, false)
            }
            None => (self.assign(&msg.group_id).await?, true),
        };
        if self.b.buffer((lane_id, msg, random, assigned), SORT_CHUNK) {
            self.flush().await?;
        }
        Ok(random)
    }

    /// The group's next assigned Random: the next counter that no caller's value occupies.
    async fn assign(&mut self, group: &str) -> Result<u32, StoreError> {
        loop {
            match self
                .b
                .next_assigned(group)
                .map_err(|w| self.store.fault(w))?
            {
                Next::Value(v) => return Ok(v),
                Next::Taken(counter) => {
                    let stored: Option<i64> = sqlx::query_scalar(
                        "SELECT MIN(counter) FROM caller_randoms
                         WHERE group_id = $1 AND counter > $2",
                    )
                    .bind(group)
                    .bind(counter)
                    .fetch_one(&mut *self.tx)
                    .await
                    .map_err(|e| self.store.err(e))?;
                    self.b
                        .skip(group, counter, stored)
                        .map_err(|w| self.store.fault(w))?;
                }
            }
        }
    }

    /// Queues one message at once and returns its id, or the earlier message whose Random it
    /// repeats (then nothing is queued).
    pub async fn push_returning_id(&mut self, msg: NewMessage) -> Result<Pushed, StoreError> {
        self.push(msg).await?;
        self.flush().await?;
        if let Some(c) = self.b.conflicts.pop() {
            return Ok(Pushed::Refused(c));
        }
        match self.last_id {
            Some(id) => Ok(Pushed::Queued(id)),
            None => Err(self.store.fault("no message was written".into())),
        }
    }

    /// Writes what is buffered and returns the messages refused so far for a repeated Random.
    pub async fn take_conflicts(&mut self) -> Result<Vec<RandomConflict>, StoreError> {
        self.flush().await?;
        Ok(std::mem::take(&mut self.b.conflicts))
    }

    /// The lane's id, creating the group and lane rows when new (counts nothing).
    async fn ensure_lane(&mut self, group: &str, topic: &str) -> Result<i64, StoreError> {
        if let Some(id) = self.b.lane(group, topic) {
            return Ok(id);
        }
        if !self.b.groups.contains_key(group) {
            let row = sqlx::query(
                "WITH ins AS (INSERT INTO groups(group_id) VALUES($1)
                              ON CONFLICT (group_id) DO NOTHING RETURNING random_counter),
                      g AS (SELECT random_counter FROM ins
                            UNION ALL SELECT random_counter FROM groups WHERE group_id = $1)
                 SELECT c.counter,
                        (SELECT MIN(r.counter) FROM caller_randoms r
                         WHERE r.group_id = $1 AND r.counter >= c.counter) AS next_taken
                 FROM (SELECT random_counter AS counter FROM g LIMIT 1) c",
            )
            .bind(group)
            .fetch_one(&mut *self.tx)
            .await
            .map_err(|e| self.store.err(e))?;
            let counter: i64 = row.get("counter");
            let next_taken: Option<i64> = row.get("next_taken");
            let seq = match &self.store.random_key {
                Some(key) => key.sequence(group),
                None => return Err(self.store.fault("the database was opened read-only".into())),
            };
            self.b.add_group(group, counter, seq, next_taken);
        }
        let id: i64 = sqlx::query_scalar(
            "WITH ins AS (INSERT INTO lanes(group_id, topic_id, updated_at) VALUES($1, $2, $3)
                          ON CONFLICT (group_id, topic_id) DO NOTHING RETURNING id)
             SELECT id FROM ins
             UNION ALL SELECT id FROM lanes WHERE group_id = $1 AND topic_id = $2
             LIMIT 1",
        )
        .bind(group)
        .bind(topic)
        .bind(unix_now())
        .fetch_one(&mut *self.tx)
        .await
        .map_err(|e| self.store.err(e))?;
        self.b.add_lane(group, topic, id);
        Ok(id)
    }

    /// Records the group's import_group body (JSON). A group already created stays created.
    pub async fn set_group_spec(&mut self, group: &str, spec: &str) -> Result<(), StoreError> {
        self.ensure_lane(group, "").await?;
        self.b.accounts.name_owner(spec);
        sqlx::query(
            "UPDATE groups SET spec = $1,
                create_state = CASE WHEN create_state IN ('created', 'blocked') THEN create_state
                                    ELSE 'pending' END
             WHERE group_id = $2",
        )
        .bind(spec)
        .bind(group)
        .execute(&mut *self.tx)
        .await
        .map_err(|e| self.store.err(e))?;
        Ok(())
    }

    /// Queues a member to import after the group's messages (a member already queued for the
    /// group is kept as it is).
    pub async fn add_member(&mut self, group: &str, m: &NewMember) -> Result<(), StoreError> {
        self.ensure_lane(group, "").await?;
        self.b.accounts.name(&m.account);
        sqlx::query(
            "INSERT INTO members(group_id, job_id, member_account, role, join_time,
                unread_msg_num, updated_at) VALUES($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (group_id, member_account) DO NOTHING",
        )
        .bind(group)
        .bind(self.b.job_id)
        .bind(&m.account)
        .bind(m.role.as_deref())
        .bind(m.join_time)
        .bind(m.unread_msg_num)
        .bind(unix_now())
        .execute(&mut *self.tx)
        .await
        .map_err(|e| self.store.err(e))?;
        Ok(())
    }

    /// Writes the buffered rows, sorted by lane: a block of ids drawn from the sequence first
    /// (rising in queue order), then messages and their bodies by binary COPY.
    async fn flush(&mut self) -> Result<(), StoreError> {
        if self.b.buf.is_empty() {
            return Ok(());
        }
        if !self.b.callers.is_empty() {
            self.check_callers().await?;
            if self.b.buf.is_empty() {
                return Ok(());
            }
        }
        self.b.buf.sort_by_key(|r| r.0);
        let n = self.b.buf.len();
        // The block of ids first..=last from the sequence in one call (nextval for each of a
        // million rows cost a fifth of the ingest). Safe under the writer lock: every statement
        // that draws message ids is this one, so no other nextval can fall between the two.
        let n64 = i64::try_from(n).unwrap_or(i64::MAX);
        let last: i64 = sqlx::query_scalar(
            "SELECT setval(s, nextval(s) + $1 - 1)
             FROM (SELECT pg_get_serial_sequence('messages', 'id')::regclass AS s) q",
        )
        .bind(n64)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(|e| self.store.err(e))?;
        let first = last - n64 + 1;
        // Both tables by binary COPY, each row encoded once from the buffer: the server's
        // cheapest bulk path (no statement to plan, no arrays to unpack; within a few per cent
        // of `psql \copy`, against a third more server CPU for INSERT ... unnest).
        let mut messages = CopyRows::new(n * 96);
        let mut bodies = CopyRows::new(n * 64);
        let job_id = self.b.job_id;
        for (id, (lane_id, m, r, a)) in (first..).zip(self.b.buf.drain(..)) {
            messages.row(10);
            messages.int(id);
            messages.int(lane_id);
            messages.int(job_id);
            messages.int(m.source_line);
            messages.int(m.source_index);
            messages.text(&m.from_account);
            messages.int(m.send_time);
            messages.int(i64::from(r));
            messages.int(i64::from(a));
            messages.int(i64::from(m.recent_contact));
            bodies.row(2);
            bodies.int(id);
            bodies.text(&m.body);
        }
        for (statement, rows) in [
            (
                "COPY messages (id, lane_id, job_id, source_line, source_index, from_account,
                                send_time, random, random_assigned, recent_contact)
                 FROM STDIN (FORMAT binary)",
                messages,
            ),
            (
                "COPY message_bodies (message_id, body) FROM STDIN (FORMAT binary)",
                bodies,
            ),
        ] {
            let mut copy = self
                .tx
                .copy_in_raw(statement)
                .await
                .map_err(|e| self.store.err(e))?;
            if let Err(e) = copy.send(rows.finish()).await {
                let _ = copy.abort("timport: the rows could not be sent").await;
                return Err(self.store.err(e));
            }
            copy.finish().await.map_err(|e| self.store.err(e))?;
        }
        self.last_id = Some(last);
        Ok(())
    }

    /// Checks the buffered caller-given Randoms against the group's earlier ones (given, in one
    /// statement for the whole buffer, or assigned), records the new ones in `caller_randoms`,
    /// and takes every message that repeats one out of the buffer, as a conflict.
    async fn check_callers(&mut self) -> Result<(), StoreError> {
        let callers = std::mem::take(&mut self.b.callers);
        let keys = self.b.caller_keys(&callers);
        let mut earlier: Vec<Option<EarlierRandom>> = vec![None; callers.len()];
        let groups: Vec<&str> = keys.iter().map(|k| k.0).collect();
        let randoms: Vec<i64> = keys.iter().map(|k| i64::from(k.1)).collect();
        let rows = sqlx::query(
            "SELECT u.i, c.job_id, c.source_line, c.source_index,
                    COALESCE(j.kind, 'file') AS kind, COALESCE(j.source, '') AS source
             FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS u(g, r, i)
             JOIN caller_randoms c ON c.group_id = u.g AND c.random = u.r
             LEFT JOIN jobs j ON j.id = c.job_id",
        )
        .bind(&groups)
        .bind(&randoms)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(|e| self.store.err(e))?;
        drop((groups, randoms));
        for r in &rows {
            let i: i64 = r.get("i");
            if let Some(slot) = usize::try_from(i - 1).ok().and_then(|i| earlier.get_mut(i)) {
                *slot = Some(EarlierRandom {
                    job_id: r.get("job_id"),
                    kind: r.get("kind"),
                    source: r.get("source"),
                    source_line: r.get("source_line"),
                    source_index: r.get("source_index"),
                    assigned: false,
                });
            }
        }
        // Repeats within the buffer: the first one stands.
        self.b.repeats_in_buffer(&callers, &keys, &mut earlier);
        drop(keys);
        // Values whose counter was passed: an assigned message may hold them.
        for (i, c) in callers.iter().enumerate() {
            if earlier[i].is_some() || !c.below {
                continue;
            }
            let group = self.b.buf[c.pos].1.group_id.clone();
            earlier[i] = self.assigned_holder(&group, c.random).await?;
        }
        let job_id = self.b.job_id;
        let (refused, new_rows) = self.b.settle(&callers, &earlier);
        if !new_rows.is_empty() {
            let mut g = Vec::with_capacity(new_rows.len());
            let mut r = Vec::with_capacity(new_rows.len());
            let mut c = Vec::with_capacity(new_rows.len());
            let mut l = Vec::with_capacity(new_rows.len());
            let mut x = Vec::with_capacity(new_rows.len());
            for (group, random, counter, _, line, index) in &new_rows {
                g.push(*group);
                r.push(i64::from(*random));
                c.push(*counter);
                l.push(*line);
                x.push(*index);
            }
            sqlx::query(
                "INSERT INTO caller_randoms(group_id, random, counter, job_id, source_line,
                                            source_index)
                 SELECT u.g, u.r, u.c, $6, u.l, u.x
                 FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])
                      AS u(g, r, c, l, x)",
            )
            .bind(&g)
            .bind(&r)
            .bind(&c)
            .bind(&l)
            .bind(&x)
            .bind(job_id)
            .execute(&mut *self.tx)
            .await
            .map_err(|e| self.store.err(e))?;
        }
        drop(new_rows);
        self.b.drop_refused(&refused);
        Ok(())
    }

    /// The message of the group that was assigned `random`: still in the buffer, or queued
    /// before (rare: a caller's value at a counter already passed).
    async fn assigned_holder(
        &mut self,
        group: &str,
        random: u32,
    ) -> Result<Option<EarlierRandom>, StoreError> {
        if let Some(e) = self.b.assigned_in_buffer(group, random) {
            return Ok(Some(e));
        }
        let row = sqlx::query(
            "SELECT m.job_id, m.source_line, m.source_index, j.kind, j.source
             FROM messages m JOIN lanes l ON l.id = m.lane_id JOIN jobs j ON j.id = m.job_id
             WHERE l.group_id = $1 AND m.random = $2 AND m.random_assigned = 1
             ORDER BY m.id LIMIT 1",
        )
        .bind(group)
        .bind(i64::from(random))
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(|e| self.store.err(e))?;
        Ok(row.map(|r| EarlierRandom {
            job_id: r.get("job_id"),
            kind: r.get("kind"),
            source: r.get("source"),
            source_line: r.get("source_line"),
            source_index: r.get("source_index"),
            assigned: true,
        }))
    }

    /// Writes the counters and commits. With a `content_hash` already known to the store, rolls
    /// back and reports the earlier job instead.
    pub async fn commit(mut self, content_hash: Option<&str>) -> Result<JobOutcome, StoreError> {
        if let Some(hash) = content_hash {
            let existing: Option<i64> =
                sqlx::query_scalar("SELECT id FROM jobs WHERE content_hash = $1")
                    .bind(hash)
                    .fetch_optional(&mut *self.tx)
                    .await
                    .map_err(|e| self.store.err(e))?;
            if let Some(job_id) = existing {
                self.tx.rollback().await.map_err(|e| self.store.err(e))?;
                return Ok(JobOutcome::Duplicate { job_id });
            }
        }
        self.flush().await?;
        if !self.b.conflicts.is_empty() {
            let refused = self.store.fault(format!(
                "{} message(s) repeat a Random queued before; the job was not committed",
                self.b.conflicts.len()
            ));
            self.tx.rollback().await.map_err(|e| self.store.err(e))?;
            return Err(refused);
        }
        self.b.accounts.write_pg(&self.store, &mut self.tx).await?;
        let store = self.store;
        let err = |e| store.err(e);
        let mut tx = self.tx;
        let b = self.b;
        let (lane_ids, added): (Vec<i64>, Vec<i64>) = b.lane_counts().into_iter().unzip();
        if !lane_ids.is_empty() {
            // The lanes in id order before their counters (claims and records lock lanes in
            // that order without the writer lock, see `engine.rs`); then the job row, last.
            sqlx::query("SELECT id FROM lanes WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
                .bind(&lane_ids)
                .fetch_all(&mut *tx)
                .await
                .map_err(err)?;
            sqlx::query(
                "UPDATE lanes SET pending = pending + v.n, updated_at = $1
                 FROM unnest($2::bigint[], $3::bigint[]) AS v(id, n) WHERE lanes.id = v.id",
            )
            .bind(unix_now())
            .bind(&lane_ids)
            .bind(&added)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
            sqlx::query(
                "INSERT INTO job_lanes(job_id, lane_id) SELECT $1, unnest($2::bigint[])
                 ON CONFLICT DO NOTHING",
            )
            .bind(b.job_id)
            .bind(&lane_ids)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        }
        let (groups, counters): (Vec<&str>, Vec<i64>) = b.moved_counters().into_iter().unzip();
        if !groups.is_empty() {
            sqlx::query(
                "UPDATE groups SET random_counter = v.c
                 FROM unnest($1::text[], $2::bigint[]) AS v(g, c) WHERE groups.group_id = v.g",
            )
            .bind(&groups)
            .bind(&counters)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        }
        let group_count = b.group_count();
        sqlx::query(
            "UPDATE jobs SET content_hash = COALESCE($1, content_hash),
                message_count = message_count + $2, group_count = group_count + $3,
                pending = pending + $2 WHERE id = $4",
        )
        .bind(content_hash)
        .bind(b.count)
        .bind(group_count)
        .bind(b.job_id)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        store.commit_tx(tx).await?;
        Ok(JobOutcome::Accepted {
            job_id: b.job_id,
            messages: b.count,
            groups: group_count,
        })
    }

    /// Abandons the job: nothing of it stays.
    pub async fn rollback(self) -> Result<(), StoreError> {
        self.tx.rollback().await.map_err(|e| self.store.err(e))
    }

    /// Takes an intake row for this job: marks it `queued`, only if it is still `new`, inside
    /// this same transaction. False when another process took it since it was read.
    pub async fn take_intake_row(&mut self, row_id: i64) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE intake SET status = 'queued', processed_at = $1
             WHERE id = $2 AND status = 'new'",
        )
        .bind(unix_now())
        .bind(row_id)
        .execute(&mut *self.tx)
        .await
        .map_err(|e| self.store.err(e))?;
        Ok(r.rows_affected() == 1)
    }

    /// Records what became of an intake row taken by [`Self::take_intake_row`] in this
    /// transaction: `queued` with its message, or `rejected` with the reason.
    pub async fn mark_intake_row(
        &mut self,
        row_id: i64,
        status: &str,
        error: Option<&str>,
        message_id: Option<i64>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE intake SET status = $1, error = $2, message_id = $3, processed_at = $4
             WHERE id = $5",
        )
        .bind(status)
        .bind(error)
        .bind(message_id)
        .bind(unix_now())
        .bind(row_id)
        .execute(&mut *self.tx)
        .await
        .map_err(|e| self.store.err(e))?;
        Ok(())
    }
}

impl JobAccounts {
    /// Inserts the accounts not known yet (as pending). A profile given again with other data
    /// than was imported puts the account back to pending, to be sent in the profile form (as
    /// [`JobAccounts::write_sqlite`] does row by row: one listed several times ends with its
    /// last data, and goes back to pending if any listing differs from what was imported).
    async fn write_pg(
        &self,
        store: &PgStore,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), StoreError> {
        let now = unix_now();
        if !self.profiles.is_empty() {
            let ids: Vec<&str> = self.profiles.iter().map(|a| a.user_id.as_str()).collect();
            let nicks: Vec<Option<&str>> =
                self.profiles.iter().map(|a| a.nick.as_deref()).collect();
            let faces: Vec<Option<&str>> = self
                .profiles
                .iter()
                .map(|a| a.face_url.as_deref())
                .collect();
            sqlx::query(
                "WITH v AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
                                 WITH ORDINALITY AS v(u, n, f, o)),
                      last AS (SELECT DISTINCT ON (u) u, n, f FROM v ORDER BY u, o DESC),
                      changed AS (SELECT DISTINCT a.user_id FROM accounts a JOIN v ON v.u = a.user_id
                                  WHERE a.profile = 0 OR a.nick IS DISTINCT FROM v.n
                                     OR a.face_url IS DISTINCT FROM v.f)
                 INSERT INTO accounts(user_id, profile, nick, face_url, updated_at)
                 SELECT u, 1, n, f, $4 FROM last
                 ON CONFLICT (user_id) DO UPDATE SET
                    state = CASE WHEN accounts.state = 'imported'
                                      AND accounts.user_id IN (SELECT user_id FROM changed)
                                 THEN 'pending' ELSE accounts.state END,
                    profile = 1, nick = excluded.nick, face_url = excluded.face_url,
                    updated_at = excluded.updated_at",
            )
            .bind(&ids)
            .bind(&nicks)
            .bind(&faces)
            .bind(now)
            .execute(&mut **tx)
            .await
            .map_err(|e| store.err(e))?;
        }
        if !self.named.is_empty() {
            let ids: Vec<&str> = self.named.keys().map(String::as_str).collect();
            sqlx::query(
                "INSERT INTO accounts(user_id, updated_at) SELECT unnest($1::text[]), $2
                 ON CONFLICT (user_id) DO NOTHING",
            )
            .bind(&ids)
            .bind(now)
            .execute(&mut **tx)
            .await
            .map_err(|e| store.err(e))?;
        }
        Ok(())
    }
}

/// Rows in PostgreSQL's binary COPY format: a signature and two zero words, then per row its
/// field count and each field as a length and its bytes (big-endian integers, text as its
/// UTF-8 bytes), and -1 at the end.
struct CopyRows(Vec<u8>);

impl CopyRows {
    fn new(capacity: usize) -> CopyRows {
        let mut b = Vec::with_capacity(capacity + 19);
        b.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        b.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        b.extend_from_slice(&0i32.to_be_bytes()); // no header extension
        CopyRows(b)
    }

    fn row(&mut self, fields: i16) {
        self.0.extend_from_slice(&fields.to_be_bytes());
    }

    fn int(&mut self, v: i64) {
        self.0.extend_from_slice(&8i32.to_be_bytes());
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn text(&mut self, v: &str) {
        // A field longer than 2 GiB cannot be a message (Tencent takes 12 KB); the server
        // refuses the negative length rather than reading a wrong one.
        let len = i32::try_from(v.len()).unwrap_or(-2);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(v.as_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&(-1i16).to_be_bytes());
        self.0
    }
}
