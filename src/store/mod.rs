//! The store: every SQL statement of timport, behind one interface ([`Store`], [`JobWriter`])
//! that the engine, intake, operations, verify and retention use without knowing which database
//! holds the queue. Two backends implement it, each written for its engine:
//!
//! - [`sqlite`]: one file, the embedded default. WAL, `busy_timeout`, one writer connection,
//!   `BEGIN IMMEDIATE`, short transactions; file faults (full, read-only, corrupt, replaced).
//! - [`postgres`]: a server several machines can share. The same transactions, serialized by an
//!   advisory writer lock, bulk statements over arrays; connection faults (unreachable at start,
//!   lost while running, a standby).
//!
//! `queue.database` chooses: a path is SQLite, a `postgres://` URL is PostgreSQL
//! ([`crate::settings::Database`]). Migrations are embedded per backend and run at every start.
//!
//! Recovery is the database's: every committed transaction survives a crash of the process and
//! an uncommitted one leaves no trace, so stopping is closing ([`Store::close`]). Faults are
//! classified once per backend into [`StoreError`]; a write refusal (disk full, lost connection)
//! is shared through [`Health`] and probed with backoff until writes work again.

mod assign;
mod error;
mod health;
pub mod postgres;
mod random;
mod rows;
pub mod sqlite;
mod types;

use std::collections::HashMap;

pub use error::*;
pub use health::{Health, PROBE_FIRST, PROBE_MAX};
pub use random::*;
pub use types::*;

use crate::settings::Database;
use postgres::{PgJobWriter, PgStore};
use sqlite::{SqliteJobWriter, SqliteStore};

/// What names a queue database: a [`Database`] from the configuration, or a path (SQLite).
pub trait AsDatabase {
    fn as_database(&self) -> std::borrow::Cow<'_, Database>;
}

impl AsDatabase for Database {
    fn as_database(&self) -> std::borrow::Cow<'_, Database> {
        std::borrow::Cow::Borrowed(self)
    }
}

impl AsDatabase for std::path::Path {
    fn as_database(&self) -> std::borrow::Cow<'_, Database> {
        std::borrow::Cow::Owned(Database::Sqlite(self.to_path_buf()))
    }
}

impl AsDatabase for std::path::PathBuf {
    fn as_database(&self) -> std::borrow::Cow<'_, Database> {
        self.as_path().as_database()
    }
}

/// The queue database, on either backend. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

/// Calls the same method on whichever backend holds the queue.
macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match &$self.backend {
            Backend::Sqlite($s) => $call,
            Backend::Postgres($s) => $call,
        }
    };
}

/// One job being queued, inside one write transaction: all of it commits, or nothing.
pub struct JobWriter {
    inner: Writer,
}

// One writer per job, moved around rarely: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Writer {
    Sqlite(SqliteJobWriter),
    Postgres(PgJobWriter),
}

impl Store {
    /// Opens (creating when missing) and migrates the database, then proves it takes writes.
    pub async fn open(
        db: &(impl AsDatabase + ?Sized),
        opts: &StoreOptions,
    ) -> Result<Store, StoreError> {
        match &*db.as_database() {
            Database::Sqlite(path) => SqliteStore::open(path, opts).await.map(Store::from),
            Database::Postgres(url) => PgStore::open(url, opts).await.map(Store::from),
            Database::Unsupported(why) => Err(unsupported(why)),
        }
    }

    /// Opens a queue that must already exist (`timport retry`, `timport verify`): like
    /// [`Store::open`], but no queue there is [`StoreError::NotFound`], and then nothing is
    /// created, migrated or written.
    pub async fn open_existing(
        db: &(impl AsDatabase + ?Sized),
        opts: &StoreOptions,
    ) -> Result<Store, StoreError> {
        match &*db.as_database() {
            Database::Sqlite(path) => SqliteStore::open_existing(path, opts)
                .await
                .map(Store::from),
            Database::Postgres(url) => PgStore::open_existing(url, opts).await.map(Store::from),
            Database::Unsupported(why) => Err(unsupported(why)),
        }
    }

    /// Opens an existing queue for reading only (`timport status`): no migration, no write.
    pub async fn open_read_only(
        db: &(impl AsDatabase + ?Sized),
        opts: &StoreOptions,
    ) -> Result<Store, StoreError> {
        match &*db.as_database() {
            Database::Sqlite(path) => SqliteStore::open_read_only(path, opts)
                .await
                .map(Store::from),
            Database::Postgres(url) => PgStore::open_read_only(url, opts).await.map(Store::from),
            Database::Unsupported(why) => Err(unsupported(why)),
        }
    }

    /// The database as it may be shown: the SQLite file's path, or the URL with its password
    /// redacted.
    pub fn database(&self) -> String {
        match &self.backend {
            Backend::Sqlite(s) => s.path().display().to_string(),
            Backend::Postgres(p) => p.target().to_string(),
        }
    }

    /// `sqlite` or `postgres`.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// The SQLite backend, when the queue is in SQLite (for its own tests).
    pub fn sqlite(&self) -> Option<&SqliteStore> {
        match &self.backend {
            Backend::Sqlite(s) => Some(s),
            Backend::Postgres(_) => None,
        }
    }

    /// The SQLite pool, when the queue is in SQLite (tests and benchmarks read through it).
    pub fn sqlite_pool(&self) -> Option<&sqlx::SqlitePool> {
        match &self.backend {
            Backend::Sqlite(s) => Some(s.reader()),
            Backend::Postgres(_) => None,
        }
    }

    /// The PostgreSQL pool, when the queue is in PostgreSQL (tests and benchmarks read through
    /// it).
    pub fn pg_pool(&self) -> Option<&sqlx::PgPool> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(p) => Some(p.pool()),
        }
    }

    /// The secret behind this database's assigned Randoms (`None` when opened read-only).
    pub fn random_key(&self) -> Option<&RandomKey> {
        dispatch!(self, s => s.random_key())
    }

    /// Whether the database is still the one opened: an SQLite file deleted or replaced is
    /// [`StoreError::Gone`] and stops the store. A server has no such check.
    pub fn check_file(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.check_file(),
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Records what an error says about the database's health.
    pub fn note_error(&self, e: &StoreError) {
        dispatch!(self, s => s.note_error(e))
    }

    /// Starts queueing a job. `kind` is `file` or `intake`; for `intake` the one intake job is
    /// reused.
    pub async fn job_writer(&self, kind: &str, source: &str) -> Result<JobWriter, StoreError> {
        let inner = match &self.backend {
            Backend::Sqlite(s) => Writer::Sqlite(s.job_writer(kind, source).await?),
            Backend::Postgres(p) => Writer::Postgres(p.job_writer(kind, source).await?),
        };
        Ok(JobWriter { inner })
    }

    /// Commits a small write, so a read-only file or a full disk shows up now, not mid-import.
    pub async fn write_probe(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.write_probe().await)
    }

    /// The database's health now.
    pub fn health(&self) -> Health {
        dispatch!(self, s => s.health())
    }

    /// A receiver that sees every change of [`Store::health`].
    pub fn subscribe_health(&self) -> tokio::sync::watch::Receiver<Health> {
        dispatch!(self, s => s.subscribe_health())
    }

    /// Why writes fail now, if they do.
    pub fn writes_refused(&self) -> Option<String> {
        dispatch!(self, s => s.writes_refused())
    }

    /// The reason the database may not be used any more, if it may not.
    pub fn stopped(&self) -> Option<String> {
        dispatch!(self, s => s.stopped())
    }

    /// Closes both pools; the last connection checkpoints the WAL.
    ///
    /// Not when the file at the path is no longer the one opened (deleted or replaced): SQLite's
    /// last close deletes `<path>-wal` by name, which may by then belong to the new file. The
    /// pools are left to the process's end instead, and our own `-wal` and `-shm` (the ones this
    /// process has open) are removed, so a file put back at the path is never paired with them.
    pub async fn close(&self) {
        dispatch!(self, s => s.close().await)
    }

    /// Reads a `meta` value.
    pub async fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        dispatch!(self, s => s.meta(key).await)
    }

    /// Writes a `meta` value in its own short transaction.
    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.set_meta(key, value).await)
    }

    /// New rows of the intake table, oldest first. Each column comes back as JSON of whatever
    /// SQLite type the producer stored, so validation can report a wrong type instead of failing.
    pub async fn new_intake_rows(&self, limit: i64) -> Result<Vec<IntakeRow>, StoreError> {
        dispatch!(self, s => s.new_intake_rows(limit).await)
    }

    /// Totals over all lanes, or over the lanes of one group.
    pub async fn totals(&self, group: Option<&str>) -> Result<Totals, StoreError> {
        dispatch!(self, s => s.totals(group).await)
    }

    /// Lanes, the most remaining work first; `group` narrows to one group.
    pub async fn lanes(
        &self,
        group: Option<&str>,
        limit: i64,
    ) -> Result<Vec<LaneStatus>, StoreError> {
        dispatch!(self, s => s.lanes(group, limit).await)
    }

    /// Blocked lanes with their reasons.
    pub async fn blocked_lanes(&self, limit: i64) -> Result<Vec<LaneStatus>, StoreError> {
        dispatch!(self, s => s.blocked_lanes(limit).await)
    }

    /// Jobs, newest first.
    pub async fn jobs(&self, limit: i64) -> Result<Vec<JobStatus>, StoreError> {
        dispatch!(self, s => s.jobs(limit).await)
    }

    /// The most common kinds of failure (optionally of one group), grouped by code and
    /// [`reason_kind`]. The distinct texts read are capped, so a huge number of distinct failures
    /// costs bounded memory (the counts then cover the most frequent texts).
    pub async fn failure_reasons(
        &self,
        group: Option<&str>,
        limit: i64,
    ) -> Result<Vec<FailureReason>, StoreError> {
        dispatch!(self, s => s.failure_reasons(group, limit).await)
    }

    /// Active lanes with work whose backoff has passed, oldest wait first.
    pub async fn runnable_lanes(&self, now_ms: i64, limit: i64) -> Result<Vec<Lane>, StoreError> {
        dispatch!(self, s => s.runnable_lanes(now_ms, limit).await)
    }

    /// The earliest retry_at of an active lane with work still waiting for its backoff.
    pub async fn next_retry_at(&self) -> Result<Option<i64>, StoreError> {
        dispatch!(self, s => s.next_retry_at().await)
    }

    /// One lane by id.
    pub async fn lane(&self, id: i64) -> Result<Lane, StoreError> {
        dispatch!(self, s => s.lane(id).await)
    }

    /// Messages of the lane left in flight (an unknown outcome, or a stop mid-request).
    pub async fn in_flight(&self, lane_id: i64) -> Result<Vec<QueuedMessage>, StoreError> {
        dispatch!(self, s => s.in_flight(lane_id).await)
    }

    /// Pending messages of the lane with a SendTime up to `upto`, in queue order, at most
    /// `limit` (those a catch-up looks for on the server).
    pub async fn pending_upto(
        &self,
        lane_id: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<QueuedMessage>, StoreError> {
        dispatch!(self, s => s.pending_upto(lane_id, upto, limit).await)
    }

    /// The lane's oldest pending SendTime; the newest message id in the whole queue (an upper
    /// bound of the lane's, read in the same snapshot); and whether a pending message with an id
    /// above `checked_id` has a SendTime up to `upto` (queued after the lane imported messages as
    /// new as it).
    pub async fn pending_span(
        &self,
        lane_id: i64,
        checked_id: i64,
        upto: i64,
    ) -> Result<(Option<i64>, i64, bool), StoreError> {
        dispatch!(self, s => s.pending_span(lane_id, checked_id, upto).await)
    }

    /// Takes the head of the lane: up to `max` pending messages in (SendTime, queue order) that
    /// share the first one's RecentContactFlag, marks them in flight with their attempt counted,
    /// and (for a nudging lane) fixes the SendTime to send. One short transaction.
    ///
    /// With `cut_at_tie`, the batch ends with the first message that shares the second of the one
    /// before it (or of the lane's checkpoint): until the server is known to take equal SendTimes,
    /// a refused tie must be the last of its request, so nothing after it lands first.
    pub async fn claim_batch(
        &self,
        lane: &Lane,
        max: usize,
        cut_at_tie: bool,
    ) -> Result<Vec<QueuedMessage>, StoreError> {
        dispatch!(self, s => s.claim_batch(lane, max, cut_at_tie).await)
    }

    /// Records the answer for a lane's messages and moves its checkpoint, in one transaction.
    /// Only messages still in flight are changed, so a late or repeated record is harmless.
    pub async fn record(
        &self,
        lane_id: i64,
        updates: &[MessageUpdate],
        lane: &LaneUpdate,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.record(lane_id, updates, lane).await)
    }

    /// Records the answers of several lanes and claims their next batches, all in one
    /// transaction with a fixed handful of statements however many lanes there are (a group
    /// commit). Returns each record's next batch, in order (empty where nothing was claimed).
    /// Two records must not name the same lane.
    pub async fn record_many(
        &self,
        records: &[Record],
    ) -> Result<Vec<Vec<QueuedMessage>>, StoreError> {
        dispatch!(self, s => s.record_many(records).await)
    }

    /// Puts failed messages back to pending (attempts reset) and unblocks lanes: for one group,
    /// one job, or everything. For a group, a refused creation is taken as "import into the group
    /// as it is" and failed members are queued again. Returns (messages requeued, lanes
    /// unblocked).
    pub async fn retry(&self, scope: RetryScope<'_>) -> Result<(u64, u64), StoreError> {
        dispatch!(self, s => s.retry(scope).await)
    }

    /// Up to `limit` pending accounts of one form: with profile data (`profile`) or IDs only.
    pub async fn pending_accounts(
        &self,
        profile: bool,
        limit: i64,
    ) -> Result<Vec<PendingAccount>, StoreError> {
        dispatch!(self, s => s.pending_accounts(profile, limit).await)
    }

    /// The states of these accounts (an ID the table does not hold is absent).
    pub async fn account_states(
        &self,
        ids: &[&str],
    ) -> Result<HashMap<String, AccountState>, StoreError> {
        dispatch!(self, s => s.account_states(ids).await)
    }

    /// Records an account request's answer in one transaction: `imported` are on the server;
    /// `failed` (ID, reason) are not, and the pending memberships that need them fail with them
    /// (their messages fail as their lanes reach them).
    pub async fn record_accounts(
        &self,
        imported: &[&str],
        failed: &[(&str, String)],
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.record_accounts(imported, failed).await)
    }

    /// Whether any account waits to be imported.
    pub async fn accounts_pending(&self) -> Result<bool, StoreError> {
        dispatch!(self, s => s.accounts_pending().await)
    }

    /// Account counts.
    pub async fn account_totals(&self) -> Result<AccountTotals, StoreError> {
        dispatch!(self, s => s.account_totals().await)
    }

    /// `timport retry --accounts`: failed accounts back to pending, with the messages and
    /// memberships that failed for them.
    pub async fn retry_accounts(&self) -> Result<AccountRetry, StoreError> {
        dispatch!(self, s => s.retry_accounts().await)
    }

    /// Groups whose import_group is due.
    pub async fn groups_to_create(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<GroupToCreate>, StoreError> {
        dispatch!(self, s => s.groups_to_create(now_ms, limit).await)
    }

    /// Counts an import_group attempt before it is sent.
    pub async fn count_create_attempt(&self, group: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.count_create_attempt(group).await)
    }

    /// The group exists now: its messages may go.
    pub async fn group_created(&self, group: &str, note: Option<&str>) -> Result<(), StoreError> {
        dispatch!(self, s => s.group_created(group, note).await)
    }

    /// The group cannot be created: it and all its lanes are blocked with the reason.
    pub async fn group_blocked(
        &self,
        group: &str,
        code: Option<i64>,
        reason: &str,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.group_blocked(group, code, reason).await)
    }

    /// Delays the group's next step (backoff) and says why.
    pub async fn group_retry_at(
        &self,
        group: &str,
        retry_at_ms: i64,
        why: &str,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.group_retry_at(group, retry_at_ms, why).await)
    }

    /// Groups with member work that may run now: created (or nothing to create), and no message
    /// of theirs pending or in flight, in any lane, blocked or not.
    pub async fn groups_with_member_work(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        dispatch!(self, s => s.groups_with_member_work(now_ms, limit).await)
    }

    /// Whether a group step can still run (for `--until-idle`): a creation, or member work not
    /// waiting behind a blocked lane or a blocked creation.
    pub async fn group_work_left(&self) -> Result<bool, StoreError> {
        dispatch!(self, s => s.group_work_left().await)
    }

    /// Up to `limit` members of the group still to import.
    pub async fn pending_members(
        &self,
        group: &str,
        limit: i64,
    ) -> Result<Vec<MemberRow>, StoreError> {
        dispatch!(self, s => s.pending_members(group, limit).await)
    }

    /// Members of the group whose unread count is still to set.
    pub async fn pending_unread(
        &self,
        group: &str,
        limit: i64,
    ) -> Result<Vec<MemberRow>, StoreError> {
        dispatch!(self, s => s.pending_unread(group, limit).await)
    }

    /// Records member outcomes in one transaction.
    pub async fn record_members(&self, updates: &[MemberUpdate]) -> Result<(), StoreError> {
        dispatch!(self, s => s.record_members(updates).await)
    }

    /// Member counts (all, or one group's).
    pub async fn member_totals(&self, group: Option<&str>) -> Result<MemberTotals, StoreError> {
        dispatch!(self, s => s.member_totals(group).await)
    }

    /// Lanes with imported messages, all or those of `group` or of `job`, with their passes.
    pub async fn verify_scope(
        &self,
        group: Option<&str>,
        job: Option<i64>,
    ) -> Result<Vec<VerifyLane>, StoreError> {
        dispatch!(self, s => s.verify_scope(group, job).await)
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
        dispatch!(self, s => s.verify_begin_lane(lane_id, imported, top_seq, low_seq).await)
    }

    /// Forgets every recorded pass and result of the lanes in scope (`timport verify --restart`).
    pub async fn verify_reset(
        &self,
        group: Option<&str>,
        job: Option<i64>,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.verify_reset(group, job).await)
    }

    /// Our imported messages of the lane with a MsgSeq in `lo..=hi`, by MsgSeq.
    pub async fn verify_ours(
        &self,
        lane_id: i64,
        lo: i64,
        hi: i64,
    ) -> Result<Vec<VerifyOurs>, StoreError> {
        dispatch!(self, s => s.verify_ours(lane_id, lo, hi).await)
    }

    /// Our messages of the lane (any state) from `from` sent at `time` (the SendTime actually
    /// sent), with whether each is imported: the candidates a server message not ours may copy.
    pub async fn verify_lookalikes(
        &self,
        lane_id: i64,
        from: &str,
        time: i64,
    ) -> Result<Vec<(VerifyOurs, bool)>, StoreError> {
        dispatch!(self, s => s.verify_lookalikes(lane_id, from, time).await)
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
        dispatch!(self, s => s.verify_record(lane_id, lo, hi, rows, top_seq, next_seq, done).await)
    }

    /// Recorded counts per lane that has a pass, all or those of `group` or `job`. Empty when
    /// the database has never been verified (or predates verify: read-only status).
    pub async fn verify_counts(
        &self,
        group: Option<&str>,
        job: Option<i64>,
    ) -> Result<Vec<VerifyCounts>, StoreError> {
        dispatch!(self, s => s.verify_counts(group, job).await)
    }

    /// Recorded problems (every class but verified) of the lanes in scope, by group, topic and
    /// MsgSeq, at most `limit`.
    pub async fn verify_problems(
        &self,
        group: Option<&str>,
        job: Option<i64>,
        limit: i64,
    ) -> Result<Vec<VerifyProblemRow>, StoreError> {
        dispatch!(self, s => s.verify_problems(group, job, limit).await)
    }

    /// A verify claims `rate` requests/s of the quota (replacing any earlier claim) and beats.
    pub async fn verify_claim(
        &self,
        token: &str,
        rate: f64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.verify_claim(token, rate, now_ms).await)
    }

    /// Renews the claim's heartbeat; false when the claim is no longer this token's.
    pub async fn verify_heartbeat(&self, token: &str, now_ms: i64) -> Result<bool, StoreError> {
        dispatch!(self, s => s.verify_heartbeat(token, now_ms).await)
    }

    /// Withdraws the claim (a verify ending).
    pub async fn verify_release(&self, token: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.verify_release(token).await)
    }

    /// The current claim, if any (fresh or not).
    pub async fn verify_claim_read(&self) -> Result<Option<VerifyClaim>, StoreError> {
        dispatch!(self, s => s.verify_claim_read().await)
    }

    /// The daemon acknowledges a claim: its ceiling is lowered to `ceiling`.
    pub async fn verify_ack(
        &self,
        token: &str,
        now_ms: i64,
        ceiling: f64,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.verify_ack(token, now_ms, ceiling).await)
    }

    /// Up to `limit` imported messages whose bodies `keep` lets go at `now` (Unix seconds).
    pub async fn bodies_to_drop(
        &self,
        keep: crate::settings::KeepBodies,
        now: i64,
        limit: i64,
    ) -> Result<BodiesToDrop, StoreError> {
        dispatch!(self, s => s.bodies_to_drop(keep, now, limit).await)
    }

    /// Drops the bodies of these imported messages, keeping each one's digest (`(id, sha256)`),
    /// and stores the cursor, in one transaction. Returns how many were dropped.
    pub async fn drop_bodies(
        &self,
        digests: &[(i64, String)],
        cursor: Option<i64>,
    ) -> Result<u64, StoreError> {
        dispatch!(self, s => s.drop_bodies(digests, cursor).await)
    }
}

/// Wakes intake when rows are inserted into the intake table (PostgreSQL: `LISTEN`).
#[derive(Debug)]
pub struct IntakeListener {
    pg: postgres::PgIntakeListener,
}

impl IntakeListener {
    /// Waits until rows may have been inserted (a notification, or a second after a failure).
    pub async fn recv(&mut self) {
        self.pg.recv().await
    }
}

impl Store {
    /// A listener for new intake rows, where the database can notify (PostgreSQL); `None` on
    /// SQLite, and when listening failed (logged; the poll interval still takes the rows).
    pub async fn intake_listener(&self) -> Option<IntakeListener> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(p) => match p.intake_listener().await {
                Ok(pg) => Some(IntakeListener { pg }),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot LISTEN for intake rows; polling only");
                    None
                }
            },
        }
    }
}

/// A lock of one process per database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueLock {
    /// One `timport run`.
    Daemon,
    /// One `timport verify`.
    Verify,
    /// A `timport run` node of a high-availability group: held shared by every node (they
    /// coordinate through the lease), so it excludes a `timport run` without `ha.enabled`, and
    /// that one excludes the nodes. PostgreSQL only.
    HaNode,
}

/// A held [`QueueLock`]; dropping it releases the lock.
#[derive(Debug)]
pub struct LockGuard {
    _pg: Option<postgres::PgLock>,
}

impl Store {
    /// Takes `lock` for as long as the guard lives; `Ok(None)` when another process holds it.
    /// On SQLite the locks are files beside the database, taken before it is opened (so a second
    /// daemon never even migrates it): `cli::lock_daemon` and `verify::claim::lock_verify`;
    /// this returns an empty guard there.
    pub async fn try_lock(&self, lock: QueueLock) -> Result<Option<LockGuard>, StoreError> {
        match &self.backend {
            Backend::Sqlite(_) if lock == QueueLock::HaNode => Err(StoreError::Unsupported {
                what: "high availability (ha.enabled)",
            }),
            Backend::Sqlite(_) => Ok(Some(LockGuard { _pg: None })),
            Backend::Postgres(p) => Ok(p
                .try_lock(pg_lock_key(lock), lock == QueueLock::HaNode)
                .await?
                .map(|l| LockGuard { _pg: Some(l) })),
        }
    }

    /// Whether some process holds `lock`; `None` on SQLite, where the lock is a file to look at.
    pub async fn lock_held(&self, lock: QueueLock) -> Result<Option<bool>, StoreError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(None),
            Backend::Postgres(p) => p.lock_held(pg_lock_key(lock)).await.map(Some),
        }
    }
}

/// High availability (PostgreSQL only; see `crate::ha`): the lease, the fence, the nodes.
impl Store {
    fn ha_backend(&self) -> Result<&postgres::PgStore, StoreError> {
        match &self.backend {
            Backend::Postgres(p) => Ok(p),
            Backend::Sqlite(_) => Err(StoreError::Unsupported {
                what: "high availability (ha.enabled)",
            }),
        }
    }

    /// Takes the lease if it has expired; `None` while another node holds it.
    pub async fn ha_acquire(
        &self,
        me: &HaNodeId,
        ttl: std::time::Duration,
    ) -> Result<Option<HaGrant>, StoreError> {
        self.ha_backend()?.ha_acquire(me, ms(ttl)).await
    }

    /// Extends this node's lease; `None` when another node took over.
    pub async fn ha_renew(
        &self,
        me: &HaNodeId,
        token: i64,
        ttl: std::time::Duration,
    ) -> Result<Option<HaGrant>, StoreError> {
        self.ha_backend()?.ha_renew(me, token, ms(ttl)).await
    }

    /// Gives this node's lease up now (a clean stop); false when it was not held any more.
    pub async fn ha_release(&self, me: &HaNodeId, token: i64) -> Result<bool, StoreError> {
        self.ha_backend()?.ha_release(me, token).await
    }

    /// Records this node's role in the queue's list of nodes.
    pub async fn ha_heartbeat(
        &self,
        me: &HaNodeId,
        role: &str,
        token: Option<i64>,
    ) -> Result<(), StoreError> {
        self.ha_backend()?.ha_heartbeat(me, role, token).await
    }

    /// The lease and the nodes; `None` on SQLite (no high availability there) or on a queue
    /// without the HA tables.
    pub async fn ha_view(&self) -> Result<Option<HaView>, StoreError> {
        match &self.backend {
            Backend::Postgres(p) => p.ha_view().await,
            Backend::Sqlite(_) => Ok(None),
        }
    }

    /// Every grant of the lease, oldest first.
    pub async fn ha_grants(&self) -> Result<Vec<HaLeaseGrant>, StoreError> {
        self.ha_backend()?.ha_grants().await
    }

    /// Sets (on becoming active: the token, this process's instance and the idle bound) or
    /// clears the lease that every write transaction of this process proves first; a stale one is
    /// refused as [`StoreError::Fenced`]. No-op on SQLite.
    pub fn set_fence(&self, lease: Option<HaFence>) {
        if let Backend::Postgres(p) = &self.backend {
            p.set_fence(lease);
        }
    }
}

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn pg_lock_key(lock: QueueLock) -> i64 {
    match lock {
        QueueLock::Daemon | QueueLock::HaNode => postgres::DAEMON_LOCK,
        QueueLock::Verify => postgres::VERIFY_LOCK,
    }
}

impl From<SqliteStore> for Store {
    fn from(s: SqliteStore) -> Store {
        Store {
            backend: Backend::Sqlite(s),
        }
    }
}

impl From<PgStore> for Store {
    fn from(p: PgStore) -> Store {
        Store {
            backend: Backend::Postgres(p),
        }
    }
}

fn unsupported(why: &str) -> StoreError {
    StoreError::NotFound {
        path: "queue.database".into(),
        what: if why.is_empty() {
            "is not supported"
        } else {
            "is not supported (see the configuration error)"
        },
    }
}

impl JobWriter {
    /// The job's id (valid once committed).
    pub fn job_id(&self) -> i64 {
        match &self.inner {
            Writer::Sqlite(w) => w.job_id(),
            Writer::Postgres(w) => w.job_id(),
        }
    }

    /// Queues one message (buffered; written in multi-row INSERTs). Returns the Random it gets.
    ///
    /// A caller-given Random is checked against the group's earlier ones when the buffer is
    /// written: a message repeating one is not written and is reported by [`Self::take_conflicts`].
    /// An assigned Random skips every counter whose value a caller already gave in the group.
    pub async fn push(&mut self, msg: NewMessage) -> Result<u32, StoreError> {
        match &mut self.inner {
            Writer::Sqlite(w) => w.push(msg).await,
            Writer::Postgres(w) => w.push(msg).await,
        }
    }

    /// Queues one message at once and returns its id (for the intake table, which records it),
    /// or the earlier message whose Random it repeats (then nothing is queued).
    pub async fn push_returning_id(&mut self, msg: NewMessage) -> Result<Pushed, StoreError> {
        match &mut self.inner {
            Writer::Sqlite(w) => w.push_returning_id(msg).await,
            Writer::Postgres(w) => w.push_returning_id(msg).await,
        }
    }

    /// Writes what is buffered and returns the messages refused so far for a repeated Random
    /// (none of them is written). A job file with any is to be rejected.
    pub async fn take_conflicts(&mut self) -> Result<Vec<RandomConflict>, StoreError> {
        match &mut self.inner {
            Writer::Sqlite(w) => w.take_conflicts().await,
            Writer::Postgres(w) => w.take_conflicts().await,
        }
    }

    /// Records the group's import_group body (JSON), to be sent before its messages. A group
    /// already created by an earlier job stays created.
    pub async fn set_group_spec(&mut self, group: &str, spec: &str) -> Result<(), StoreError> {
        match &mut self.inner {
            Writer::Sqlite(w) => w.set_group_spec(group, spec).await,
            Writer::Postgres(w) => w.set_group_spec(group, spec).await,
        }
    }

    /// Queues a member to import after the group's messages (a member already queued for the
    /// group is kept as it is).
    pub async fn add_member(&mut self, group: &str, m: &NewMember) -> Result<(), StoreError> {
        match &mut self.inner {
            Writer::Sqlite(w) => w.add_member(group, m).await,
            Writer::Postgres(w) => w.add_member(group, m).await,
        }
    }

    /// Writes the counters and commits. With a `content_hash` already known to the store, rolls
    /// back and reports the earlier job instead.
    pub async fn commit(self, content_hash: Option<&str>) -> Result<JobOutcome, StoreError> {
        match self.inner {
            Writer::Sqlite(w) => w.commit(content_hash).await,
            Writer::Postgres(w) => w.commit(content_hash).await,
        }
    }

    /// Abandons the job: nothing of it stays.
    pub async fn rollback(self) -> Result<(), StoreError> {
        match self.inner {
            Writer::Sqlite(w) => w.rollback().await,
            Writer::Postgres(w) => w.rollback().await,
        }
    }

    /// Takes an intake row for this job: marks it `queued`, only if it is still `new`, inside this
    /// same transaction. False when another process took it since it was read: it must then not
    /// be queued again.
    pub async fn take_intake_row(&mut self, row_id: i64) -> Result<bool, StoreError> {
        match &mut self.inner {
            Writer::Sqlite(w) => w.take_intake_row(row_id).await,
            Writer::Postgres(w) => w.take_intake_row(row_id).await,
        }
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
        match &mut self.inner {
            Writer::Sqlite(w) => w.mark_intake_row(row_id, status, error, message_id).await,
            Writer::Postgres(w) => w.mark_intake_row(row_id, status, error, message_id).await,
        }
    }

    /// Lists an account with profile data (written at commit).
    pub fn add_account(&mut self, a: NewAccount) {
        match &mut self.inner {
            Writer::Sqlite(w) => w.add_account(a),
            Writer::Postgres(w) => w.add_account(a),
        }
    }
}
