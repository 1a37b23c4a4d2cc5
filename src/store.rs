//! The store: every SQL statement of timport, against one SQLite file.
//!
//! The file is opened in WAL mode with `busy_timeout`, foreign keys on, and the embedded
//! migrations applied at start, followed by a write probe so that a read-only or full disk fails at
//! once with the file named. Writes go through a single-connection pool (one writer per process)
//! and every write transaction starts with `BEGIN IMMEDIATE`, so a second process (`timport
//! ingest`, `timport retry`) waits for the lock instead of failing on an upgrade. Transactions are
//! short and never span an HTTP call.
//!
//! Recovery: SQLite's WAL makes every committed transaction durable across a process crash; an
//! uncommitted one (an ingest killed half-way) leaves no trace. Nothing here keeps state outside
//! the file, so stopping is just dropping the pools ([`Store::close`] checkpoints cleanly).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, Sqlite, Transaction};

use crate::settings::Synchronous;

/// The embedded migrations (`migrations/`), run at every start.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A store failure. SQLite's read-only, disk-full and busy conditions name the file, since they
/// are for the operator to fix.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: cannot open: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database {path} is read-only (check the file, its folder and the mount): {source}")]
    ReadOnly {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("database {path}: disk full: {source}")]
    DiskFull {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("database {path} stayed locked by another process beyond busy_timeout: {source}")]
    Busy {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("database {path}: migration failed: {source}")]
    Migrate {
        path: PathBuf,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("database {path}: {source}")]
    Sql {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
}

/// How to open the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub synchronous: Synchronous,
    pub busy_timeout: Duration,
    /// Readers for status queries (the writer is always one connection).
    pub readers: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            synchronous: Synchronous::Normal,
            busy_timeout: Duration::from_secs(60),
            readers: 2,
        }
    }
}

/// The queue database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    writer: SqlitePool,
    reader: SqlitePool,
    path: PathBuf,
}

/// Current Unix time in seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Current Unix time in milliseconds.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating with mode 0600 when missing) and migrates the database, then proves it is
    /// writable.
    pub async fn open(path: &Path, opts: &StoreOptions) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        }
        // Create the file ourselves so it is readable by the service user only; SQLite gives the
        // -wal and -shm files the same mode.
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| StoreError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let base = SqliteConnectOptions::new()
            .filename(path)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(opts.busy_timeout)
            .foreign_keys(true)
            .synchronous(match opts.synchronous {
                Synchronous::Normal => SqliteSynchronous::Normal,
                Synchronous::Full => SqliteSynchronous::Full,
            })
            .pragma("temp_store", "memory");
        let wrap = |source| classify(path, source);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(opts.busy_timeout + Duration::from_secs(30))
            .connect_with(base.clone().pragma("cache_size", "-32768"))
            .await
            .map_err(wrap)?;
        MIGRATOR
            .run(&writer)
            .await
            .map_err(|source| match source {
                sqlx::migrate::MigrateError::Execute(e) => classify(path, e),
                source => StoreError::Migrate {
                    path: path.to_path_buf(),
                    source,
                },
            })?;
        let reader = SqlitePoolOptions::new()
            .max_connections(opts.readers.max(1))
            .connect_with(base)
            .await
            .map_err(wrap)?;
        let store = Store {
            writer,
            reader,
            path: path.to_path_buf(),
        };
        store.write_probe().await?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits a small write, so a read-only file or a full disk shows up now, not mid-import.
    pub async fn write_probe(&self) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO meta(key, value) VALUES('last_write_probe', ?)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        )
        .bind(unix_now().to_string())
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Starts a write transaction with `BEGIN IMMEDIATE` on the single writer connection.
    pub async fn begin(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.err(e))
    }

    /// Wraps an sqlx error with the file name and its class.
    pub fn err(&self, e: sqlx::Error) -> StoreError {
        classify(&self.path, e)
    }

    /// The pool for reads (status, the engine's lane queries).
    pub fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    /// Closes both pools; the last connection checkpoints the WAL.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }

    /// Reads a `meta` value.
    pub async fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT value FROM meta WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.reader)
            .await
            .map_err(|e| self.err(e))
    }

    /// Writes a `meta` value in its own short transaction.
    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO meta(key, value) VALUES(?, ?)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))
    }
}

fn classify(path: &Path, e: sqlx::Error) -> StoreError {
    let path = path.to_path_buf();
    let code = e
        .as_database_error()
        .and_then(|d| d.code())
        .and_then(|c| i64::from_str(&c).ok());
    // Primary result code is the low byte of the extended code.
    match code.map(|c| c & 0xff) {
        Some(8) => StoreError::ReadOnly { path, source: e },
        Some(13) => StoreError::DiskFull { path, source: e },
        Some(5) | Some(6) => StoreError::Busy { path, source: e },
        _ => StoreError::Sql { path, source: e },
    }
}

// ---------------------------------------------------------------------------------------------
// Intake: queueing validated messages.

/// A validated message, ready to be queued.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub group_id: String,
    /// Empty when the message has no topic.
    pub topic_id: String,
    pub from_account: String,
    pub send_time: i64,
    /// The caller's Random, if given; otherwise one is assigned at queue time.
    pub random: Option<u32>,
    pub recent_contact: bool,
    /// The MsgBody array as compact JSON.
    pub body: String,
    /// Line in the job file (1-based) or intake row id.
    pub source_line: i64,
    /// Index within its MsgList (0 for NDJSON lines and intake rows).
    pub source_index: i64,
}

/// The Random assigned to the `counter`-th message of a group without a caller's value.
///
/// A bijection of the counter (offset by a per-group seed, then murmur3's fmix32 finaliser, which
/// is invertible), so two messages of one group never get the same value until 2^32 assignments,
/// whatever their SendTimes and whenever they arrive at the server. The seed spreads different
/// groups over the space so values do not look alike across groups.
pub fn assigned_random(group_id: &str, counter: u64) -> u32 {
    // FNV-1a of the group id as the seed.
    let mut seed: u32 = 0x811c_9dc5;
    for b in group_id.as_bytes() {
        seed ^= u32::from(*b);
        seed = seed.wrapping_mul(0x0100_0193);
    }
    // Truncation is the point: the counter wraps modulo 2^32.
    let mut h = seed.wrapping_add((counter & 0xffff_ffff) as u32);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

const INSERT_COLUMNS: &str = "INSERT INTO messages (lane_id, job_id, source_line, source_index, \
     from_account, send_time, random, random_assigned, recent_contact, body) VALUES ";
const INSERT_TUPLE: &str = "(?,?,?,?,?,?,?,?,?,?)";
/// Rows per multi-row INSERT: 10 parameters each, well under SQLite's 32766.
const INSERT_CHUNK: usize = 128;

struct LaneAcc {
    id: i64,
    added: i64,
}

struct GroupAcc {
    counter: i64,
    start: i64,
}

/// One job being queued, inside one `BEGIN IMMEDIATE` transaction: all of it commits, or nothing.
pub struct JobWriter {
    store: Store,
    tx: Transaction<'static, Sqlite>,
    job_id: i64,
    lanes: HashMap<(String, String), LaneAcc>,
    groups: HashMap<String, GroupAcc>,
    buf: Vec<(i64, NewMessage, u32, bool)>,
    count: i64,
    full_chunk_sql: String,
}

/// What became of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum JobOutcome {
    /// Queued as job `job_id`.
    Accepted {
        job_id: i64,
        messages: i64,
        groups: i64,
    },
    /// The same content was queued before, as `job_id`; nothing was added.
    Duplicate { job_id: i64 },
}

impl Store {
    /// Starts queueing a job. `kind` is `file` or `intake`; for `intake` the one intake job is
    /// reused.
    pub async fn job_writer(&self, kind: &str, source: &str) -> Result<JobWriter, StoreError> {
        let mut tx = self.begin().await?;
        let job_id: i64 = if kind == "intake" {
            let existing: Option<i64> =
                sqlx::query_scalar("SELECT id FROM jobs WHERE kind = 'intake' LIMIT 1")
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| self.err(e))?;
            match existing {
                Some(id) => id,
                None => sqlx::query_scalar(
                    "INSERT INTO jobs(kind, source, created_at) VALUES('intake', 'intake table', ?) RETURNING id",
                )
                .bind(unix_now())
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| self.err(e))?,
            }
        } else {
            sqlx::query_scalar(
                "INSERT INTO jobs(kind, source, created_at) VALUES(?, ?, ?) RETURNING id",
            )
            .bind(kind)
            .bind(source)
            .bind(unix_now())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.err(e))?
        };
        let mut full_chunk_sql = String::from(INSERT_COLUMNS);
        for i in 0..INSERT_CHUNK {
            if i > 0 {
                full_chunk_sql.push(',');
            }
            full_chunk_sql.push_str(INSERT_TUPLE);
        }
        Ok(JobWriter {
            store: self.clone(),
            tx,
            job_id,
            lanes: HashMap::new(),
            groups: HashMap::new(),
            buf: Vec::with_capacity(INSERT_CHUNK),
            count: 0,
            full_chunk_sql,
        })
    }
}

impl JobWriter {
    /// The job's id (valid once committed).
    pub fn job_id(&self) -> i64 {
        self.job_id
    }

    /// Queues one message (buffered; written in multi-row INSERTs). Returns the Random it gets.
    pub async fn push(&mut self, msg: NewMessage) -> Result<u32, StoreError> {
        let lane_id = self.lane_id(&msg.group_id, &msg.topic_id).await?;
        let (random, assigned) = match msg.random {
            Some(r) => (r, false),
            None => {
                let g = self.groups.get_mut(&msg.group_id).ok_or_else(|| StoreError::Sql {
                    path: self.store.path.clone(),
                    source: sqlx::Error::Protocol("group not loaded".into()),
                })?;
                let r = assigned_random(&msg.group_id, g.counter as u64);
                g.counter += 1;
                (r, true)
            }
        };
        self.buf.push((lane_id, msg, random, assigned));
        self.count += 1;
        if self.buf.len() >= INSERT_CHUNK {
            self.flush().await?;
        }
        Ok(random)
    }

    /// Queues one message and returns its id (for the intake table, which records it).
    pub async fn push_returning_id(&mut self, msg: NewMessage) -> Result<i64, StoreError> {
        self.push(msg).await?;
        self.flush().await?;
        let id: i64 = sqlx::query_scalar("SELECT last_insert_rowid()")
            .fetch_one(&mut *self.tx)
            .await
            .map_err(|e| self.store.err(e))?;
        Ok(id)
    }

    async fn lane_id(&mut self, group: &str, topic: &str) -> Result<i64, StoreError> {
        if let Some(l) = self.lanes.get_mut(&(group.to_string(), topic.to_string())) {
            l.added += 1;
            return Ok(l.id);
        }
        if !self.groups.contains_key(group) {
            sqlx::query("INSERT OR IGNORE INTO groups(group_id) VALUES(?)")
                .bind(group)
                .execute(&mut *self.tx)
                .await
                .map_err(|e| self.store.err(e))?;
            let counter: i64 =
                sqlx::query_scalar("SELECT random_counter FROM groups WHERE group_id = ?")
                    .bind(group)
                    .fetch_one(&mut *self.tx)
                    .await
                    .map_err(|e| self.store.err(e))?;
            self.groups.insert(
                group.to_string(),
                GroupAcc {
                    counter,
                    start: counter,
                },
            );
        }
        sqlx::query("INSERT OR IGNORE INTO lanes(group_id, topic_id, updated_at) VALUES(?, ?, ?)")
            .bind(group)
            .bind(topic)
            .bind(unix_now())
            .execute(&mut *self.tx)
            .await
            .map_err(|e| self.store.err(e))?;
        let id: i64 = sqlx::query_scalar("SELECT id FROM lanes WHERE group_id = ? AND topic_id = ?")
            .bind(group)
            .bind(topic)
            .fetch_one(&mut *self.tx)
            .await
            .map_err(|e| self.store.err(e))?;
        self.lanes
            .insert((group.to_string(), topic.to_string()), LaneAcc { id, added: 1 });
        Ok(id)
    }

    async fn flush(&mut self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.buf);
        let sql = if rows.len() == INSERT_CHUNK {
            self.full_chunk_sql.clone()
        } else {
            let mut s = String::from(INSERT_COLUMNS);
            for i in 0..rows.len() {
                if i > 0 {
                    s.push(',');
                }
                s.push_str(INSERT_TUPLE);
            }
            s
        };
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (lane_id, m, random, assigned) in rows.iter() {
            q = q
                .bind(*lane_id)
                .bind(self.job_id)
                .bind(m.source_line)
                .bind(m.source_index)
                .bind(m.from_account.as_str())
                .bind(m.send_time)
                .bind(i64::from(*random))
                .bind(i64::from(*assigned))
                .bind(i64::from(m.recent_contact))
                .bind(m.body.as_str());
        }
        q.execute(&mut *self.tx)
            .await
            .map_err(|e| self.store.err(e))?;
        self.buf = rows;
        self.buf.clear();
        Ok(())
    }

    /// Writes the counters and commits. With a `content_hash` already known to the store, rolls
    /// back and reports the earlier job instead.
    pub async fn commit(mut self, content_hash: Option<&str>) -> Result<JobOutcome, StoreError> {
        if let Some(hash) = content_hash {
            let existing: Option<i64> =
                sqlx::query_scalar("SELECT id FROM jobs WHERE content_hash = ?")
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
        let now = unix_now();
        for l in self.lanes.values() {
            sqlx::query("UPDATE lanes SET pending = pending + ?, updated_at = ? WHERE id = ?")
                .bind(l.added)
                .bind(now)
                .bind(l.id)
                .execute(&mut *self.tx)
                .await
                .map_err(|e| self.store.err(e))?;
        }
        for (g, acc) in self.groups.iter() {
            if acc.counter != acc.start {
                sqlx::query("UPDATE groups SET random_counter = ? WHERE group_id = ?")
                    .bind(acc.counter)
                    .bind(g)
                    .execute(&mut *self.tx)
                    .await
                    .map_err(|e| self.store.err(e))?;
            }
        }
        let groups = i64::try_from(self.groups.len()).unwrap_or(i64::MAX);
        sqlx::query(
            "UPDATE jobs SET content_hash = COALESCE(?, content_hash),
                message_count = message_count + ?, group_count = group_count + ?,
                pending = pending + ? WHERE id = ?",
        )
        .bind(content_hash)
        .bind(self.count)
        .bind(groups)
        .bind(self.count)
        .bind(self.job_id)
        .execute(&mut *self.tx)
        .await
        .map_err(|e| self.store.err(e))?;
        self.tx.commit().await.map_err(|e| self.store.err(e))?;
        Ok(JobOutcome::Accepted {
            job_id: self.job_id,
            messages: self.count,
            groups,
        })
    }

    /// Abandons the job: nothing of it stays.
    pub async fn rollback(self) -> Result<(), StoreError> {
        self.tx.rollback().await.map_err(|e| self.store.err(e))
    }

    /// Marks intake rows inside this same transaction.
    pub async fn mark_intake_row(
        &mut self,
        row_id: i64,
        status: &str,
        error: Option<&str>,
        message_id: Option<i64>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE intake SET status = ?, error = ?, message_id = ?, processed_at = ? WHERE id = ?",
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

/// A row of the intake table as another program wrote it (loosely typed on purpose).
#[derive(Debug, Clone)]
pub struct IntakeRow {
    pub id: i64,
    pub group_id: Option<serde_json::Value>,
    pub topic_id: Option<serde_json::Value>,
    pub from_account: Option<serde_json::Value>,
    pub send_time: Option<serde_json::Value>,
    pub random: Option<serde_json::Value>,
    pub msg_body: Option<serde_json::Value>,
    pub recent_contact_flag: Option<serde_json::Value>,
}

/// `json_quote(col)`, except that a BLOB (which JSON cannot hold) becomes a marker object that
/// validation reports as a wrong type.
macro_rules! quoted {
    ($col:literal) => {
        concat!(
            "CASE typeof(", $col, ") WHEN 'blob' THEN '{\"blob\":true}' ELSE json_quote(", $col,
            ") END AS ", $col
        )
    };
}

impl Store {
    /// New rows of the intake table, oldest first. Each column comes back as JSON of whatever
    /// SQLite type the producer stored, so validation can report a wrong type instead of failing.
    pub async fn new_intake_rows(&self, limit: i64) -> Result<Vec<IntakeRow>, StoreError> {
        let rows = sqlx::query(
            concat!(
                "SELECT id, ",
                quoted!("group_id"), ", ", quoted!("topic_id"), ", ",
                quoted!("from_account"), ", ", quoted!("send_time"), ", ",
                quoted!("random"), ", ", quoted!("msg_body"), ", ",
                quoted!("recent_contact_flag"),
                " FROM intake WHERE status = 'new' ORDER BY id LIMIT ?"
            ),
        )
        .bind(limit)
        .fetch_all(&self.reader)
        .await
        .map_err(|e| self.err(e))?;
        let parse = |r: &sqlx::sqlite::SqliteRow, col: &str| -> Option<serde_json::Value> {
            let text: Option<String> = r.try_get(col).ok().flatten();
            text.and_then(|t| serde_json::from_str(&t).ok())
                .filter(|v: &serde_json::Value| !v.is_null())
        };
        Ok(rows
            .iter()
            .map(|r| IntakeRow {
                id: r.get("id"),
                group_id: parse(r, "group_id"),
                topic_id: parse(r, "topic_id"),
                from_account: parse(r, "from_account"),
                send_time: parse(r, "send_time"),
                random: parse(r, "random"),
                msg_body: parse(r, "msg_body"),
                recent_contact_flag: parse(r, "recent_contact_flag"),
            })
            .collect())
    }
}
