//! The SQLite backend of the store: every SQL statement of timport, against one SQLite file.
//!
//! The file is opened in WAL mode with `busy_timeout`, foreign keys on, and the embedded
//! migrations applied at start, followed by a write probe so that a read-only or full disk fails at
//! once with the file named. Writes go through a single-connection pool (one writer per process)
//! and every write transaction starts with `BEGIN IMMEDIATE`, so a second process (`timport
//! ingest`, `timport retry`) waits for the lock instead of failing on an upgrade. Transactions are
//! short and never span an HTTP call. [`SqliteStore::open_read_only`] (for `timport status`) migrates
//! and writes nothing.
//!
//! Randoms: a message without a caller's value is assigned one from its group's counter through
//! a permutation keyed by the database's own secret ([`RandomKey`], drawn by migration 0004), so
//! values never repeat within a group and two databases collide no more often than chance.
//! Caller-given values are recorded per group (`caller_randoms`): a message repeating a value
//! already queued in its group, given or assigned, is not queued ([`RandomConflict`]), and
//! assignment skips the counters whose values callers took.
//!
//! Recovery: SQLite's WAL makes every committed transaction durable across a process crash; an
//! uncommitted one (an ingest killed half-way) leaves no trace. Nothing here keeps state outside
//! the file, so stopping is just dropping the pools ([`SqliteStore::close`] checkpoints cleanly).
//!
//! Faults of the file ([`Health`], shared by every clone): each failed statement is classified
//! once ([`SqliteStore::err`]). A write refusal (disk full, read-only, I/O error) is logged once, the
//! writer connection is replaced (as is any connection a failed COMMIT or ROLLBACK left inside a
//! transaction for sqlx), and a probe write retries with backoff from 1 s to 30 s; the next
//! committed write, the probe's or anyone's, clears it with one log line. SQLITE_CORRUPT and
//! SQLITE_NOTADB, and the file at the path deleted or replaced ([`SqliteStore::check_file`]), are
//! fatal: the health says why, and the daemon stops on it. At every open a quick check touches
//! each table's and index's root page; [`SqliteStore::open_existing`] refuses to create a queue.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Arguments, AssertSqlSafe, Row, Sqlite, Transaction};

use super::assign::{Buffered, JobBuf, Next};
use super::health::HealthCell;
use super::rows::{lane_row, lane_status, member_row, queued_message, verify_ours_row};
use super::*;
use crate::settings::Synchronous;

/// The embedded migrations (`migrations/`), run at every start.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The queue database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    path: PathBuf,
    /// Set while a job is queued with foreign-key and CHECK constraints off and
    /// `synchronous = FULL` on the writer (see [`SqliteStore::job_writer`]); the next ordinary
    /// transaction turns them back to normal.
    relaxed: Arc<AtomicBool>,
    /// `queue.synchronous` as a pragma value, restored after a job's commit.
    synchronous: &'static str,
    /// The secret behind assigned Randoms (`meta.random_key`); `None` when opened read-only.
    random_key: Option<RandomKey>,
    health: Arc<HealthCell>,
    /// (device, inode) of the file opened, to notice it deleted or replaced under us.
    identity: Option<(u64, u64)>,
    /// Set on a write refusal: the writer connection is closed when it is next released, and
    /// the pool opens a fresh one.
    renew_writer: Arc<AtomicBool>,
}

/// (device, inode) of `path`.
fn identity_of(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

impl SqliteStore {
    /// Opens (creating with mode 0600 when missing) and migrates the database, then proves it is
    /// writable.
    pub async fn open(path: &Path, opts: &StoreOptions) -> Result<SqliteStore, StoreError> {
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
        SqliteStore::open_file(path, opts, false).await
    }

    /// Opens a queue that must already exist (`timport retry`, `timport verify`): like
    /// [`SqliteStore::open`] (migrations, write probe), but a missing or empty file, or an SQLite file
    /// that is not a timport queue, is [`StoreError::NotFound`], and then nothing is created,
    /// migrated or written. For reading only, [`SqliteStore::open_read_only`] also refuses a missing
    /// file.
    pub async fn open_existing(
        path: &Path,
        opts: &StoreOptions,
    ) -> Result<SqliteStore, StoreError> {
        let not_found = |what| StoreError::NotFound {
            path: path.to_path_buf(),
            what,
        };
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() && m.len() > 0 => {}
            Ok(m) if m.is_file() => return Err(not_found("is empty (not a timport queue)")),
            Ok(_) => return Err(not_found("is not a regular file")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(not_found("does not exist"));
            }
            Err(source) => {
                return Err(StoreError::Open {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        SqliteStore::open_file(path, opts, true).await
    }

    /// Opens the file at `path`, which exists: the quick check, the migrations, the write probe.
    /// With `existing`, it must already hold a timport queue.
    async fn open_file(
        path: &Path,
        opts: &StoreOptions,
        existing: bool,
    ) -> Result<SqliteStore, StoreError> {
        let identity = identity_of(path).ok();
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
        let renew = Arc::new(AtomicBool::new(false));
        let renew_on_release = renew.clone();
        // No ping before each acquire (a round trip to SQLite's thread per transaction): a local
        // file connection does not go stale, and a broken one fails its statement anyway.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .test_before_acquire(false)
            // Generous: a lane waits here while a large job file's transaction holds the writer.
            .acquire_timeout(opts.busy_timeout * 10 + Duration::from_secs(30))
            // 32 MiB of page cache for the writer: a bulk ingest (rows sorted by lane, see
            // SORT_CHUNK) keeps its lanes' index leaves hot; 64 MiB was no faster once rows were
            // sorted, and cost 40 MiB more RSS. Readers keep SQLite's default.
            // A transaction whose COMMIT or ROLLBACK failed (a full disk, an immutable file:
            // SQLite may already have rolled it back itself) leaves sqlx's transaction depth
            // above zero, and every later BEGIN on that connection fails. When the connection
            // comes back, the rollback queued by the dropped transaction has run (the ping is
            // queued behind it); if the depth is still not zero, the connection is closed and the
            // pool opens a fresh one.
            //
            // After a write refusal the connection is replaced too: one opened while the file
            // was read-only or immutable stays read-only after the cause is gone.
            .after_release(move |conn, _meta| {
                let renew = renew_on_release.clone();
                Box::pin(async move {
                    use sqlx::Connection;
                    if conn.is_in_transaction() {
                        // Only after a transaction dropped uncommitted (an error path): let its
                        // rollback run first. A commit or rollback that worked left depth 0, so
                        // the usual release costs no extra round trip.
                        conn.ping().await?;
                    }
                    let usable = !conn.is_in_transaction() && !renew.swap(false, Ordering::SeqCst);
                    if !usable {
                        tracing::debug!(
                            "a failed transaction left the writer connection unusable (or writes were refused); opening a new one"
                        );
                    }
                    Ok(usable)
                })
            })
            .connect_with(base.clone().pragma("cache_size", "-32768"))
            .await
            .map_err(wrap)?;
        quick_check(path, &writer).await?;
        if existing {
            let queue: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'messages'",
            )
            .fetch_one(&writer)
            .await
            .map_err(wrap)?;
            if queue == 0 {
                writer.close().await;
                return Err(StoreError::NotFound {
                    path: path.to_path_buf(),
                    what: "is not a timport queue (it has no messages table)",
                });
            }
        }
        MIGRATOR.run(&writer).await.map_err(|source| match source {
            sqlx::migrate::MigrateError::Execute(e) => classify(path, e),
            source => StoreError::Migrate {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let reader = SqlitePoolOptions::new()
            .max_connections(opts.readers.max(1))
            .test_before_acquire(false)
            .connect_with(base)
            .await
            .map_err(wrap)?;
        let mut store = SqliteStore {
            writer,
            reader,
            path: path.to_path_buf(),
            relaxed: Arc::new(AtomicBool::new(false)),
            synchronous: match opts.synchronous {
                Synchronous::Normal => "NORMAL",
                Synchronous::Full => "FULL",
            },
            random_key: None,
            health: HealthCell::new(),
            identity,
            renew_writer: renew,
        };
        store.write_probe().await?;
        store.random_key = Some(store.load_random_key().await?);
        store.count_caller_randoms().await?;
        Ok(store)
    }

    /// Opens an existing database for reading only (`timport status`): no migration, no write
    /// probe, nothing created, so it works on a copy, a read-only file or a read-only mount, and
    /// changes nothing. A missing file is an error naming it. A WAL database alone in a folder it
    /// cannot write (no -wal, no -shm: a copy, a read-only mount) is read as immutable.
    pub async fn open_read_only(
        path: &Path,
        opts: &StoreOptions,
    ) -> Result<SqliteStore, StoreError> {
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(StoreError::Open {
                    path: path.to_path_buf(),
                    source: std::io::Error::other("not a regular file"),
                });
            }
            Err(source) => {
                return Err(StoreError::Open {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        let base = SqliteConnectOptions::new()
            .filename(path)
            .read_only(true)
            .create_if_missing(false)
            .busy_timeout(opts.busy_timeout);
        let connect = |o: SqliteConnectOptions| async move {
            let pool = SqlitePoolOptions::new()
                .max_connections(opts.readers.max(1))
                .test_before_acquire(false)
                .connect_with(o)
                .await?;
            // The first read opens the WAL index (-shm), where a read-only folder shows.
            sqlx::query("SELECT count(*) FROM sqlite_schema")
                .execute(&pool)
                .await?;
            Ok::<_, sqlx::Error>(pool)
        };
        let reader = match connect(base.clone()).await {
            Ok(pool) => pool,
            // A WAL database in a folder we cannot write, with no -shm to share: SQLite cannot
            // build the WAL index. With no -wal either, nobody is writing it (a writer would have
            // to create both there), so the file alone is the whole database: read it as
            // immutable.
            Err(e) if cannot_build_wal_index(&e) && !sidecar(path, "-wal").exists() => {
                connect(base.immutable(true))
                    .await
                    .map_err(|source| classify(path, source))?
            }
            Err(source) => return Err(classify(path, source)),
        };
        quick_check(path, &reader).await?;
        Ok(SqliteStore {
            // Every write fails with SQLite's read-only error (there is no writer).
            writer: reader.clone(),
            reader,
            path: path.to_path_buf(),
            relaxed: Arc::new(AtomicBool::new(false)),
            synchronous: "FULL",
            random_key: None,
            health: HealthCell::new(),
            identity: identity_of(path).ok(),
            renew_writer: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Reads `meta.random_key` (migration 0004 writes it).
    async fn load_random_key(&self) -> Result<RandomKey, StoreError> {
        let value: Option<String> =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'random_key'")
                .fetch_optional(&self.writer)
                .await
                .map_err(|e| self.err(e))?;
        value
            .as_deref()
            .and_then(RandomKey::parse)
            .ok_or_else(|| StoreError::Sql {
                path: self.path.clone(),
                source: sqlx::Error::Protocol(
                    "meta random_key is missing or not 32 hex digits or 'legacy'".into(),
                ),
            })
    }

    /// Fills `caller_randoms.counter` where it is NULL (rows migration 0004 copied from messages
    /// queued before it): the inverse of the group's sequence needs the key, which SQL has not.
    async fn count_caller_randoms(&self) -> Result<(), StoreError> {
        let Some(key) = &self.random_key else {
            return Ok(());
        };
        loop {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT group_id, random FROM caller_randoms WHERE counter IS NULL LIMIT 10000",
            )
            .fetch_all(&self.writer)
            .await
            .map_err(|e| self.err(e))?;
            if rows.is_empty() {
                return Ok(());
            }
            let mut seqs: FastMap<&str, RandomSequence> = FastMap::default();
            let counted: Vec<(&str, i64, i64)> = rows
                .iter()
                .map(|(g, r)| {
                    let seq = *seqs.entry(g.as_str()).or_insert_with(|| key.sequence(g));
                    let value = u32::try_from(*r).unwrap_or_default();
                    (g.as_str(), *r, i64::from(seq.counter_of(value)))
                })
                .collect();
            let mut tx = self.begin().await?;
            sqlx::query(
                "UPDATE caller_randoms SET counter = v.value ->> 2 FROM json_each(?) AS v
                 WHERE caller_randoms.group_id = v.value ->> 0
                   AND caller_randoms.random = v.value ->> 1",
            )
            .bind(serde_json::to_string(&counted).unwrap_or_default())
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
            self.commit_tx(tx).await?;
        }
    }

    /// The secret behind this database's assigned Randoms (`None` when opened read-only).
    pub fn random_key(&self) -> Option<&RandomKey> {
        self.random_key.as_ref()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits a small write, so a read-only file or a full disk shows up now, not mid-import.
    pub async fn write_probe(&self) -> Result<(), StoreError> {
        self.set_meta("last_write_probe", &unix_now().to_string())
            .await
    }

    /// Starts a write transaction with `BEGIN IMMEDIATE` on the single writer connection.
    pub async fn begin(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        if self.relaxed.swap(false, Ordering::SeqCst) {
            let sql = format!(
                "PRAGMA foreign_keys = ON; PRAGMA ignore_check_constraints = OFF; PRAGMA synchronous = {}",
                self.synchronous
            );
            sqlx::query(AssertSqlSafe(sql))
                .execute(&self.writer)
                .await
                .map_err(|e| self.err(e))?;
        }
        self.writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.err(e))
    }

    /// Wraps an sqlx error with the file name and its class, and notes what it says about the
    /// database's health (see [`Health`]).
    pub fn err(&self, e: sqlx::Error) -> StoreError {
        let e = classify(&self.path, e);
        self.note_error(&e);
        e
    }

    /// Commits `tx`; a committed write clears a write refusal.
    async fn commit_tx(&self, tx: Transaction<'static, Sqlite>) -> Result<(), StoreError> {
        tx.commit().await.map_err(|e| self.err(e))?;
        self.note_written();
        Ok(())
    }

    /// The database's health now.
    pub fn health(&self) -> Health {
        self.health.get()
    }

    /// A receiver that sees every change of [`SqliteStore::health`].
    pub fn subscribe_health(&self) -> tokio::sync::watch::Receiver<Health> {
        self.health.subscribe()
    }

    /// Why writes fail now, if they do.
    pub fn writes_refused(&self) -> Option<String> {
        self.health.writes_refused()
    }

    /// The reason the database may not be used any more, if it may not.
    pub fn stopped(&self) -> Option<String> {
        self.health.stopped()
    }

    /// Records what `e` says: fatal stops the store for good (logged once); a write refusal
    /// replaces the writer connection and starts the probe (logged once per refusal).
    pub fn note_error(&self, e: &StoreError) {
        if e.write_refusal().is_some() {
            self.renew_writer.store(true, Ordering::SeqCst);
        }
        if self.health.note_error(&self.path.display().to_string(), e) {
            let store = self.clone();
            self.health.start_probe(move || {
                let store = store.clone();
                async move {
                    if store.writer.is_closed() {
                        return None;
                    }
                    Some(store.write_probe().await.is_ok())
                }
            });
        }
    }

    /// A write committed: a refusal is over.
    fn note_written(&self) {
        self.health.note_written(&self.path.display().to_string());
    }

    /// Whether the file at the configured path is still the one opened: deleted or replaced
    /// (another inode under the name) is [`StoreError::Gone`], and stops the store.
    pub fn check_file(&self) -> Result<(), StoreError> {
        let Some(opened) = self.identity else {
            return Ok(());
        };
        let what = match identity_of(&self.path) {
            Ok(now) if now == opened => return Ok(()),
            Ok(_) => "was replaced by another file",
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "was deleted",
            // Cannot tell (a permission change on the folder): not a reason to stop.
            Err(_) => return Ok(()),
        };
        let e = StoreError::Gone {
            path: self.path.clone(),
            what,
        };
        self.note_error(&e);
        Err(e)
    }

    /// The pool for reads (status, the engine's lane queries).
    pub fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    /// Closes both pools; the last connection checkpoints the WAL.
    ///
    /// Not when the file at the path is no longer the one opened (deleted or replaced): SQLite's
    /// last close deletes `<path>-wal` by name, which may by then belong to the new file. The
    /// pools are left to the process's end instead, and our own `-wal` and `-shm` (the ones this
    /// process has open) are removed, so a file put back at the path is never paired with them.
    pub async fn close(&self) {
        if self.moved() {
            self.forget_sidecars();
            return;
        }
        self.reader.close().await;
        self.writer.close().await;
    }

    /// The file at the path is not the one opened.
    fn moved(&self) -> bool {
        self.identity
            .is_some_and(|opened| identity_of(&self.path).ok() != Some(opened))
    }

    /// Removes `<path>-wal` and `<path>-shm` if they are the files this process has open (found
    /// through `/proc/self/fd`), and only then.
    fn forget_sidecars(&self) {
        let open: Vec<(u64, u64)> = std::fs::read_dir("/proc/self/fd")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| identity_of(&e.path()).ok())
                    .collect()
            })
            .unwrap_or_default();
        for suffix in ["-wal", "-shm"] {
            let p = sidecar(&self.path, suffix);
            if identity_of(&p).is_ok_and(|id| open.contains(&id)) {
                match std::fs::remove_file(&p) {
                    Ok(()) => {
                        tracing::info!(file = %p.display(), "removed this process's own sidecar of the deleted or replaced database, so it is never paired with another file")
                    }
                    Err(e) => {
                        tracing::warn!(file = %p.display(), error = %e, "could not remove this process's sidecar of the deleted or replaced database; delete it before putting a database back at this path")
                    }
                }
            }
        }
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
        self.write_one(
            sqlx::query(
                "INSERT INTO meta(key, value) VALUES(?, ?)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )
            .bind(key)
            .bind(value),
        )
        .await
    }

    /// Runs one write statement in its own `BEGIN IMMEDIATE` transaction.
    async fn write_one(
        &self,
        q: sqlx::query::Query<'_, Sqlite, sqlx::sqlite::SqliteArguments>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        q.execute(&mut *tx).await.map_err(|e| self.err(e))?;
        self.commit_tx(tx).await
    }
}

/// SQLite's "read-only folder" (SQLITE_READONLY_DIRECTORY) or "cannot open" (the -shm).
fn cannot_build_wal_index(e: &sqlx::Error) -> bool {
    let code = e
        .as_database_error()
        .and_then(|d| d.code())
        .and_then(|c| i64::from_str(&c).ok());
    matches!(code, Some(1544)) || code.is_some_and(|c| c & 0xff == 14)
}

/// `path` with `suffix` appended to its file name (`-wal`, `-shm`).
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
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
        // SQLITE_IOERR, SQLITE_PERM, SQLITE_CANTOPEN: the disk or the file's permissions.
        Some(10) | Some(3) | Some(14) => StoreError::Io { path, source: e },
        // SQLITE_CORRUPT, SQLITE_NOTADB (extended codes included).
        Some(11) | Some(26) => StoreError::Corrupt { path, error: e },
        _ => StoreError::Sql { path, source: e },
    }
}

/// A quick check of the schema pages at start, not a scan of the file: the header and
/// `sqlite_schema` are read, and each table's and index's root page (and the first leaf below
/// it) is touched by a one-row read through it. `PRAGMA quick_check` reads every page instead
/// (docs/OPERATIONS.md has the times measured). Any SQLITE_CORRUPT or SQLITE_NOTADB is
/// [`StoreError::Corrupt`].
async fn quick_check(path: &Path, pool: &SqlitePool) -> Result<(), StoreError> {
    let wrap = |e| classify(path, e);
    let objects: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT type, name, tbl_name, sql FROM sqlite_schema
         WHERE type IN ('table', 'index') AND rootpage > 0",
    )
    .fetch_all(pool)
    .await
    .map_err(wrap)?;
    let quote = |n: &str| format!("\"{}\"", n.replace('"', "\"\""));
    for (kind, name, table, sql) in objects {
        let q = if kind == "table" {
            format!("SELECT 1 FROM {} NOT INDEXED LIMIT 1", quote(&name))
        } else {
            // A partial index is used only under its own WHERE clause.
            let partial = sql
                .as_deref()
                .and_then(|s| s.to_ascii_uppercase().rfind(" WHERE ").map(|i| &s[i..]))
                .unwrap_or("");
            format!(
                "SELECT 1 FROM {} INDEXED BY {}{partial} LIMIT 1",
                quote(&table),
                quote(&name)
            )
        };
        if let Err(e) = sqlx::query(AssertSqlSafe(q)).fetch_optional(pool).await {
            match classify(path, e) {
                e @ StoreError::Corrupt { .. } => return Err(e),
                // Another failure (an index the planner cannot use this way) proves nothing.
                e => tracing::debug!(object = %name, error = %e, "quick check skipped an object"),
            }
        }
    }
    Ok(())
}

// OR FAIL: a multi-row INSERT that may abort needs a statement journal (a copy of every page it
// touches, so it can undo itself); FAIL needs none. A failure rolls back the whole job anyway.
const INSERT_COLUMNS: &str = "INSERT OR FAIL INTO messages (lane_id, job_id, source_line, source_index, \
     from_account, send_time, random, random_assigned, recent_contact) VALUES ";
const INSERT_TUPLE: &str = "(?,?,?,?,?,?,?,?,?)";
/// The bodies of the same rows, in their own table (so that dropping them frees whole pages; see
/// migrations/0008_bodies.sql), keyed by message id.
const INSERT_BODIES: &str = "INSERT OR FAIL INTO message_bodies (message_id, body) VALUES ";
const INSERT_BODY_TUPLE: &str = "(?,?)";
/// Rows per multi-row INSERT: 9 parameters each, well under SQLite's 32766.
const INSERT_CHUNK: usize = 128;
/// Messages buffered before they are written, sorted by lane (stable, so each lane keeps its file
/// order and its queue order). A lane's messages then sit next to each other in the table and
/// its index: the bulk insert touches far fewer pages, and so does every later claim and record
/// of a batch (7 neighbours on one page instead of 7 pages). About 2 MiB of memory.
const SORT_CHUNK: usize = 8192;

/// A multi-row INSERT: `head` then `n` times `tuple`.
fn multi_row(head: &str, tuple: &str, n: usize) -> String {
    let mut s = String::from(head);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push_str(tuple);
    }
    s
}

/// The multi-row INSERT of `n` messages; the full-chunk one is built once.
fn insert_sql(n: usize) -> Cow<'static, str> {
    static FULL_CHUNK: LazyLock<String> =
        LazyLock::new(|| multi_row(INSERT_COLUMNS, INSERT_TUPLE, INSERT_CHUNK));
    if n == INSERT_CHUNK {
        Cow::Borrowed(FULL_CHUNK.as_str())
    } else {
        Cow::Owned(multi_row(INSERT_COLUMNS, INSERT_TUPLE, n))
    }
}

/// The multi-row INSERT of `n` bodies; the full-chunk one is built once.
fn insert_bodies_sql(n: usize) -> Cow<'static, str> {
    static FULL_CHUNK: LazyLock<String> =
        LazyLock::new(|| multi_row(INSERT_BODIES, INSERT_BODY_TUPLE, INSERT_CHUNK));
    if n == INSERT_CHUNK {
        Cow::Borrowed(FULL_CHUNK.as_str())
    } else {
        Cow::Owned(multi_row(INSERT_BODIES, INSERT_BODY_TUPLE, n))
    }
}

/// The multi-row INSERT of `n` caller-given Randoms (OR FAIL: no statement journal, as above).
fn caller_insert_sql(n: usize) -> String {
    let mut s = String::from(
        "INSERT OR FAIL INTO caller_randoms(group_id, random, counter, job_id, source_line, \
         source_index) VALUES ",
    );
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push_str("(?,?,?,?,?,?)");
    }
    s
}

/// Adds a buffered message's nine values, in the order of [`INSERT_COLUMNS`] (its body goes in
/// [`INSERT_BODIES`]). Its strings move into the arguments (a borrowed one would be copied).
fn add_row(
    args: &mut SqliteArguments,
    job_id: i64,
    (lane_id, m, random, assigned): &mut Buffered,
) -> Result<(), sqlx::error::BoxDynError> {
    args.add(*lane_id)?;
    args.add(job_id)?;
    args.add(m.source_line)?;
    args.add(m.source_index)?;
    args.add(std::mem::take(&mut m.from_account))?;
    args.add(m.send_time)?;
    args.add(i64::from(*random))?;
    args.add(i64::from(*assigned))?;
    args.add(i64::from(m.recent_contact))
}

/// One job being queued, inside one `BEGIN IMMEDIATE` transaction: all of it commits, or nothing.
pub struct SqliteJobWriter {
    store: SqliteStore,
    tx: Transaction<'static, Sqlite>,
    /// The job's lanes, groups, buffer and Random bookkeeping (see [`JobBuf`]).
    b: JobBuf,
}

impl SqliteStore {
    /// Starts queueing a job. `kind` is `file` or `intake`; for `intake` the one intake job is
    /// reused.
    pub async fn job_writer(
        &self,
        kind: &str,
        source: &str,
    ) -> Result<SqliteJobWriter, StoreError> {
        // Foreign-key and CHECK constraints off for the bulk insert; the next ordinary `begin`
        // turns them back on (the foreign-key pragma cannot change inside a transaction).
        // - Every parent row (job, group, lane) is created in this same transaction before its
        //   messages; checking each of a million rows cost a third of the ingest time.
        // - Every checked column is written from constants or typed values here (state and the
        //   like by their defaults, random from a u32, kind checked below). SQLite evaluates
        //   `state IN (...)` by building a temporary table for every row it checks: that was more
        //   than half of SQLite's work per queued message.
        if self.random_key.is_none() {
            return Err(StoreError::Sql {
                path: self.path.clone(),
                source: sqlx::Error::Protocol("the database was opened read-only".into()),
            });
        }
        if !matches!(kind, "file" | "intake") {
            return Err(StoreError::Sql {
                path: self.path.clone(),
                source: sqlx::Error::Protocol(format!("unknown job kind {kind:?}")),
            });
        }
        // synchronous = FULL for the job's commit, whatever `queue.synchronous` says: its file
        // leaves the spool only after this commit, so the commit must be on disk first (with
        // NORMAL, a power cut could lose a committed job whose file was already moved).
        sqlx::query(
            "PRAGMA foreign_keys = OFF; PRAGMA ignore_check_constraints = ON; PRAGMA synchronous = FULL",
        )
        .execute(&self.writer)
        .await
        .map_err(|e| self.err(e))?;
        // Marked before BEGIN, so even a failed BEGIN is followed by the restore.
        self.relaxed.store(true, Ordering::SeqCst);
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.err(e))?;
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
        Ok(SqliteJobWriter {
            store: self.clone(),
            tx,
            b: JobBuf::new(job_id, kind, source, SORT_CHUNK),
        })
    }
}

impl SqliteJobWriter {
    /// The job's id (valid once committed).
    pub fn job_id(&self) -> i64 {
        self.b.job_id
    }

    /// An error of the job's own bookkeeping (not of SQLite).
    fn fault(&self, what: String) -> StoreError {
        StoreError::Sql {
            path: self.store.path.clone(),
            source: sqlx::Error::Protocol(what),
        }
    }

    /// Queues one message (buffered; written in multi-row INSERTs). Returns the Random it gets.
    ///
    /// A caller-given Random is checked against the group's earlier ones when the buffer is
    /// written: a message repeating one is not written and is reported by [`Self::take_conflicts`].
    /// An assigned Random skips every counter whose value a caller already gave in the group.
    pub async fn push(&mut self, msg: NewMessage) -> Result<u32, StoreError> {
        let lane_id = self.lane_id(&msg.group_id, &msg.topic_id).await?;
        self.b.accounts.name(&msg.from_account);
        let (random, assigned) = match msg.random {
            Some(r) => {
                self.b.given(&msg.group_id, r).map_err(|w| self.fault(w))?;
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
            match self.b.next_assigned(group).map_err(|w| self.fault(w))? {
                Next::Value(v) => return Ok(v),
                Next::Taken(counter) => {
                    // A caller gave this counter's value: skip it, and find the next one taken.
                    let stored: Option<i64> = sqlx::query_scalar(
                        "SELECT MIN(counter) FROM caller_randoms WHERE group_id = ? AND counter > ?",
                    )
                    .bind(group)
                    .bind(counter)
                    .fetch_one(&mut *self.tx)
                    .await
                    .map_err(|e| self.store.err(e))?;
                    self.b
                        .skip(group, counter, stored)
                        .map_err(|w| self.fault(w))?;
                }
            }
        }
    }

    /// Queues one message at once and returns its id (for the intake table, which records it),
    /// or the earlier message whose Random it repeats (then nothing is queued).
    pub async fn push_returning_id(&mut self, msg: NewMessage) -> Result<Pushed, StoreError> {
        self.push(msg).await?;
        self.flush().await?;
        if let Some(c) = self.b.conflicts.pop() {
            return Ok(Pushed::Refused(c));
        }
        let id: i64 = sqlx::query_scalar("SELECT last_insert_rowid()")
            .fetch_one(&mut *self.tx)
            .await
            .map_err(|e| self.store.err(e))?;
        Ok(Pushed::Queued(id))
    }

    /// Writes what is buffered and returns the messages refused so far for a repeated Random
    /// (none of them is written). A job file with any is to be rejected.
    pub async fn take_conflicts(&mut self) -> Result<Vec<RandomConflict>, StoreError> {
        self.flush().await?;
        Ok(std::mem::take(&mut self.b.conflicts))
    }

    async fn lane_id(&mut self, group: &str, topic: &str) -> Result<i64, StoreError> {
        let id = self.ensure_lane(group, topic).await?;
        self.b.count_in_lane(group, topic);
        Ok(id)
    }

    /// The lane's id, creating the group and lane rows when new (counts nothing).
    async fn ensure_lane(&mut self, group: &str, topic: &str) -> Result<i64, StoreError> {
        if let Some(id) = self.b.lane(group, topic) {
            return Ok(id);
        }
        if !self.b.groups.contains_key(group) {
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
            let next_taken: Option<i64> = sqlx::query_scalar(
                "SELECT MIN(counter) FROM caller_randoms WHERE group_id = ? AND counter >= ?",
            )
            .bind(group)
            .bind(counter)
            .fetch_one(&mut *self.tx)
            .await
            .map_err(|e| self.store.err(e))?;
            let seq = match &self.store.random_key {
                Some(key) => key.sequence(group),
                None => return Err(self.fault("the database was opened read-only".into())),
            };
            self.b.add_group(group, counter, seq, next_taken);
        }
        sqlx::query("INSERT OR IGNORE INTO lanes(group_id, topic_id, updated_at) VALUES(?, ?, ?)")
            .bind(group)
            .bind(topic)
            .bind(unix_now())
            .execute(&mut *self.tx)
            .await
            .map_err(|e| self.store.err(e))?;
        let id: i64 =
            sqlx::query_scalar("SELECT id FROM lanes WHERE group_id = ? AND topic_id = ?")
                .bind(group)
                .bind(topic)
                .fetch_one(&mut *self.tx)
                .await
                .map_err(|e| self.store.err(e))?;
        self.b.add_lane(group, topic, id);
        Ok(id)
    }

    /// Records the group's import_group body (JSON), to be sent before its messages. A group
    /// already created by an earlier job stays created.
    pub async fn set_group_spec(&mut self, group: &str, spec: &str) -> Result<(), StoreError> {
        self.ensure_lane(group, "").await?;
        self.b.accounts.name_owner(spec);
        sqlx::query(
            "UPDATE groups SET spec = ?,
                create_state = CASE WHEN create_state IN ('created', 'blocked') THEN create_state
                                    ELSE 'pending' END
             WHERE group_id = ?",
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
            "INSERT OR IGNORE INTO members(group_id, job_id, member_account, role, join_time,
                unread_msg_num, updated_at) VALUES(?, ?, ?, ?, ?, ?, ?)",
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

    /// Writes the buffered rows, sorted by lane.
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
        let job_id = self.b.job_id;
        self.b.buf.sort_by_key(|r| r.0);
        for chunk in self.b.buf.chunks_mut(INSERT_CHUNK) {
            // Arguments added straight into one buffer (`Query::bind` moves the whole query for
            // every value).
            let rows = chunk.len();
            let mut args = SqliteArguments::default();
            args.reserve(rows * 9, 0);
            for row in chunk.iter_mut() {
                add_row(&mut args, job_id, row)
                    .map_err(|e| self.store.err(sqlx::Error::Encode(e)))?;
            }
            let last = sqlx::query_with(AssertSqlSafe(insert_sql(rows)), args)
                .execute(&mut *self.tx)
                .await
                .map_err(|e| self.store.err(e))?
                .last_insert_rowid();
            // One statement, one writer: its rows took the ids up to `last` one after another
            // (an INTEGER PRIMARY KEY without AUTOINCREMENT is the largest id plus one).
            let first = last - rows as i64 + 1;
            let mut args = SqliteArguments::default();
            args.reserve(rows * 2, 0);
            for (id, row) in (first..).zip(chunk.iter_mut()) {
                args.add(id)
                    .and_then(|()| args.add(std::mem::take(&mut row.1.body)))
                    .map_err(|e| self.store.err(sqlx::Error::Encode(e)))?;
            }
            sqlx::query_with(AssertSqlSafe(insert_bodies_sql(rows)), args)
                .execute(&mut *self.tx)
                .await
                .map_err(|e| self.store.err(e))?;
        }
        self.b.buf.clear();
        Ok(())
    }

    /// Checks the buffered caller-given Randoms against the group's earlier ones (given, in one
    /// statement for the whole buffer, or assigned), records the new ones in `caller_randoms`, and
    /// takes every message that repeats one out of the buffer, as a conflict.
    async fn check_callers(&mut self) -> Result<(), StoreError> {
        let callers = std::mem::take(&mut self.b.callers);
        let keys = self.b.caller_keys(&callers);
        // One lookup per chunk of keys, with bound values (json_each parses each value again).
        let mut earlier: Vec<Option<EarlierRandom>> = vec![None; callers.len()];
        for (n, chunk) in keys.chunks(INSERT_CHUNK).enumerate() {
            let mut sql = String::from("WITH v(i, g, r) AS (VALUES ");
            let mut args = SqliteArguments::default();
            args.reserve(chunk.len() * 3, 0);
            for (k, (g, r)) in chunk.iter().enumerate() {
                if k > 0 {
                    sql.push(',');
                }
                sql.push_str("(?,?,?)");
                let i = i64::try_from(n * INSERT_CHUNK + k).unwrap_or(i64::MAX);
                (|| {
                    args.add(i)?;
                    args.add(*g)?;
                    args.add(i64::from(*r))
                })()
                .map_err(|e| self.store.err(sqlx::Error::Encode(e)))?;
            }
            sql.push_str(
                ") SELECT v.i, c.job_id, c.source_line, c.source_index,
                    COALESCE(j.kind, 'file') AS kind, COALESCE(j.source, '') AS source
                 FROM v JOIN caller_randoms c ON c.group_id = v.g AND c.random = v.r
                 LEFT JOIN jobs j ON j.id = c.job_id",
            );
            let rows = sqlx::query_with(AssertSqlSafe(sql), args)
                .fetch_all(&mut *self.tx)
                .await
                .map_err(|e| self.store.err(e))?;
            for r in &rows {
                let i: i64 = r.get("i");
                if let Some(slot) = usize::try_from(i).ok().and_then(|i| earlier.get_mut(i)) {
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
        // Record the new values; take the repeating messages out.
        let (refused, new_rows) = self.b.settle(&callers, &earlier);
        // In multi-row INSERTs with bound values: through json_each the same rows cost several
        // times more (each value parsed out again).
        for chunk in new_rows.chunks(INSERT_CHUNK) {
            let mut args = SqliteArguments::default();
            args.reserve(chunk.len() * 6, 0);
            for (g, r, c, j, l, i) in chunk {
                (|| {
                    args.add(*g)?;
                    args.add(i64::from(*r))?;
                    args.add(*c)?;
                    args.add(*j)?;
                    args.add(*l)?;
                    args.add(*i)
                })()
                .map_err(|e| self.store.err(sqlx::Error::Encode(e)))?;
            }
            sqlx::query_with(AssertSqlSafe(caller_insert_sql(chunk.len())), args)
                .execute(&mut *self.tx)
                .await
                .map_err(|e| self.store.err(e))?;
        }
        drop(new_rows);
        self.b.drop_refused(&refused);
        Ok(())
    }

    /// The message of the group that was assigned `random`: still in the buffer, or queued
    /// before. Rare (a caller's value at a counter already passed), so a scan of the group's
    /// messages is fine.
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
             WHERE l.group_id = ? AND m.random = ? AND m.random_assigned = 1
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
        if !self.b.conflicts.is_empty() {
            let refused = self.fault(format!(
                "{} message(s) repeat a Random queued before; the job was not committed",
                self.b.conflicts.len()
            ));
            self.tx.rollback().await.map_err(|e| self.store.err(e))?;
            return Err(refused);
        }
        self.b
            .accounts
            .write_sqlite(&self.store, &mut self.tx)
            .await?;
        let store = self.store.clone();
        let err = |e| store.err(e);
        let mut tx = self.tx;
        let b = self.b;
        let now = unix_now();
        // Every lane's and group's counters in one statement each, however many there are.
        let lanes = serde_json::to_string(&b.lane_counts()).unwrap_or_default();
        sqlx::query(
            "UPDATE lanes SET pending = pending + v.value ->> 1, updated_at = ?1
             FROM json_each(?2) AS v WHERE lanes.id = v.value ->> 0",
        )
        .bind(now)
        .bind(&lanes)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        sqlx::query(
            "INSERT OR IGNORE INTO job_lanes(job_id, lane_id)
             SELECT ?1, value ->> 0 FROM json_each(?2)",
        )
        .bind(b.job_id)
        .bind(&lanes)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        let counters = b.moved_counters();
        if !counters.is_empty() {
            sqlx::query(
                "UPDATE groups SET random_counter = v.value ->> 1
                 FROM json_each(?1) AS v WHERE groups.group_id = v.value ->> 0",
            )
            .bind(serde_json::to_string(&counters).unwrap_or_default())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        }
        let groups = b.group_count();
        sqlx::query(
            "UPDATE jobs SET content_hash = COALESCE(?, content_hash),
                message_count = message_count + ?, group_count = group_count + ?,
                pending = pending + ? WHERE id = ?",
        )
        .bind(content_hash)
        .bind(b.count)
        .bind(groups)
        .bind(b.count)
        .bind(b.job_id)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        store.commit_tx(tx).await?;
        Ok(JobOutcome::Accepted {
            job_id: b.job_id,
            messages: b.count,
            groups,
        })
    }

    /// Abandons the job: nothing of it stays.
    pub async fn rollback(self) -> Result<(), StoreError> {
        self.tx.rollback().await.map_err(|e| self.store.err(e))
    }

    /// Takes an intake row for this job: marks it `queued`, only if it is still `new`, inside this
    /// same transaction. False when another process took it since it was read: it must then not
    /// be queued again.
    pub async fn take_intake_row(&mut self, row_id: i64) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE intake SET status = 'queued', processed_at = ? WHERE id = ? AND status = 'new'",
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

/// `json_quote(col)`, except that a BLOB (which JSON cannot hold) becomes a marker object that
/// validation reports as a wrong type.
macro_rules! quoted {
    ($col:literal) => {
        concat!(
            "CASE typeof(",
            $col,
            ") WHEN 'blob' THEN '{\"blob\":true}' ELSE json_quote(",
            $col,
            ") END AS ",
            $col
        )
    };
}

impl SqliteStore {
    /// New rows of the intake table, oldest first. Each column comes back as JSON of whatever
    /// SQLite type the producer stored, so validation can report a wrong type instead of failing.
    pub async fn new_intake_rows(&self, limit: i64) -> Result<Vec<IntakeRow>, StoreError> {
        // LIMIT as a literal: SQLite re-prepares a statement whenever a LIMIT parameter is bound.
        let sql = format!(
            "{}{limit}",
            concat!(
                "SELECT id, ",
                quoted!("group_id"),
                ", ",
                quoted!("topic_id"),
                ", ",
                quoted!("from_account"),
                ", ",
                quoted!("send_time"),
                ", ",
                quoted!("random"),
                ", ",
                quoted!("msg_body"),
                ", ",
                quoted!("recent_contact_flag"),
                " FROM intake WHERE status = 'new' ORDER BY id LIMIT "
            )
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
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

const LANE_COLUMNS: &str = "l.group_id, l.topic_id, l.state, l.pending, l.in_flight, l.imported, \
     l.failed, l.blocked_code, l.blocked_reason, l.last_send_time, l.last_msg_seq, \
     CASE WHEN g.create_state = 'pending' THEN 'create' \
          WHEN g.create_state = 'blocked' THEN 'create blocked' \
          WHEN l.pending + l.in_flight > 0 THEN 'messages' \
          WHEN EXISTS (SELECT 1 FROM members m WHERE m.group_id = l.group_id \
                       AND m.state = 'pending') THEN 'members' \
          WHEN EXISTS (SELECT 1 FROM members m WHERE m.group_id = l.group_id \
                       AND m.unread_state = 'pending') THEN 'unread' \
          ELSE 'done' END AS step";

impl SqliteStore {
    /// Totals over all lanes, or over the lanes of one group.
    pub async fn totals(&self, group: Option<&str>) -> Result<Totals, StoreError> {
        let r = sqlx::query(
            "SELECT
                COALESCE(SUM(CASE WHEN state = 'active' THEN pending ELSE 0 END), 0) AS pending,
                COALESCE(SUM(CASE WHEN state = 'active' THEN in_flight ELSE 0 END), 0) AS in_flight,
                COALESCE(SUM(imported), 0) AS imported,
                COALESCE(SUM(failed), 0) AS failed,
                COALESCE(SUM(CASE WHEN state = 'blocked' THEN pending + in_flight ELSE 0 END), 0) AS blocked,
                COUNT(*) AS lanes,
                COALESCE(SUM(state = 'blocked'), 0) AS lanes_blocked
             FROM lanes WHERE (?1 IS NULL OR group_id = ?1)",
        )
        .bind(group)
        .fetch_one(&self.reader)
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
        self.lanes_where(
            "(?1 IS NULL OR l.group_id = ?1)",
            "(l.pending + l.in_flight) DESC, l.group_id, l.topic_id",
            group,
            limit,
        )
        .await
    }

    /// Blocked lanes with their reasons.
    pub async fn blocked_lanes(&self, limit: i64) -> Result<Vec<LaneStatus>, StoreError> {
        self.lanes_where(
            "l.state = 'blocked' AND ?1 IS NULL",
            "l.group_id, l.topic_id",
            None,
            limit,
        )
        .await
    }

    async fn lanes_where(
        &self,
        condition: &'static str,
        order: &'static str,
        group: Option<&str>,
        limit: i64,
    ) -> Result<Vec<LaneStatus>, StoreError> {
        let sql = format!(
            "SELECT {LANE_COLUMNS} FROM lanes l LEFT JOIN groups g ON g.group_id = l.group_id
             WHERE {condition} ORDER BY {order} LIMIT ?2"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(group)
            .bind(limit)
            .fetch_all(&self.reader)
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
             ORDER BY id DESC LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.reader)
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
               AND (?1 IS NULL OR m.lane_id IN (SELECT id FROM lanes WHERE group_id = ?1))
             GROUP BY m.result_code, m.result_text ORDER BY messages DESC LIMIT ?2",
        )
        .bind(group)
        .bind(DISTINCT_TEXTS)
        .fetch_all(&self.reader)
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
}

const MESSAGE_COLUMNS: &str =
    "id, from_account, send_time, sent_time, random, recent_contact, attempts";
/// The body of message `m` (from `message_bodies`; `''` once dropped), next to [`MESSAGE_COLUMNS`].
const BODY_OF_M: &str =
    "COALESCE((SELECT b.body FROM message_bodies AS b WHERE b.message_id = m.id), '') AS body";

impl SqliteStore {
    /// Active lanes with work whose backoff has passed, oldest wait first.
    pub async fn runnable_lanes(&self, now_ms: i64, limit: i64) -> Result<Vec<Lane>, StoreError> {
        // Polled every tick: LIMIT as a literal (a bound LIMIT re-prepares the statement).
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT id, group_id, topic_id, last_send_time, last_msg_seq, tie_nudge, checked_id,
                    catch_up_waived FROM lanes
             WHERE state = 'active' AND (pending > 0 OR in_flight > 0) AND retry_at <= ?
               AND NOT EXISTS (SELECT 1 FROM groups g WHERE g.group_id = lanes.group_id
                               AND g.create_state IN ('pending', 'blocked'))
             ORDER BY retry_at, id LIMIT {limit}"
        )))
        .bind(now_ms)
        .fetch_all(&self.reader)
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(lane_row).collect())
    }

    /// The earliest retry_at of an active lane with work still waiting for its backoff.
    pub async fn next_retry_at(&self) -> Result<Option<i64>, StoreError> {
        sqlx::query_scalar(
            "SELECT MIN(retry_at) FROM lanes WHERE state = 'active' AND (pending > 0 OR in_flight > 0)",
        )
        .fetch_one(&self.reader)
        .await
        .map_err(|e| self.err(e))
    }

    /// One lane by id.
    pub async fn lane(&self, id: i64) -> Result<Lane, StoreError> {
        let r = sqlx::query(
            "SELECT id, group_id, topic_id, last_send_time, last_msg_seq, tie_nudge, checked_id,
                    catch_up_waived FROM lanes WHERE id = ?",
        )
        .bind(id)
        .fetch_one(&self.reader)
        .await
        .map_err(|e| self.err(e))?;
        Ok(lane_row(&r))
    }

    /// Messages of the lane left in flight (an unknown outcome, or a stop mid-request).
    pub async fn in_flight(&self, lane_id: i64) -> Result<Vec<QueuedMessage>, StoreError> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS}, {BODY_OF_M} FROM messages AS m
             WHERE lane_id = ? AND state = 'in_flight'
             ORDER BY send_time, id"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(lane_id)
            .fetch_all(&self.reader)
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
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS}, {BODY_OF_M} FROM messages AS m
             WHERE lane_id = ? AND state = 'pending'
             AND send_time <= ? ORDER BY send_time, id LIMIT {limit}"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(lane_id)
            .bind(upto)
            .fetch_all(&self.reader)
            .await
            .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(queued_message).collect())
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
        let r = sqlx::query(
            "SELECT MIN(send_time) AS oldest,
                    (SELECT COALESCE(MAX(id), 0) FROM messages) AS newest,
                    EXISTS (SELECT 1 FROM messages WHERE lane_id = ?1 AND state = 'pending'
                            AND send_time <= ?3 AND id > ?2) AS stale
             FROM messages WHERE lane_id = ?1 AND state = 'pending'",
        )
        .bind(lane_id)
        .bind(checked_id)
        .bind(upto)
        .fetch_one(&self.reader)
        .await
        .map_err(|e| self.err(e))?;
        Ok((
            r.get("oldest"),
            r.get("newest"),
            r.get::<i64, _>("stale") != 0,
        ))
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
        let mut tx = self.begin().await?;
        let claim = Claim {
            lane: lane.clone(),
            max,
            cut_at_tie,
        };
        let mut batches = self.claim_in(&mut tx, &[&claim]).await?;
        self.commit_tx(tx).await?;
        Ok(batches.pop().unwrap_or_default())
    }

    /// [`SqliteStore::claim_batch`] for several lanes at once, inside `tx`: one statement reads the
    /// heads of all the lanes, one marks the chosen messages in flight. Batches come back in the
    /// order of `claims`.
    async fn claim_in(
        &self,
        tx: &mut sqlx::SqliteConnection,
        claims: &[&Claim],
    ) -> Result<Vec<Vec<QueuedMessage>>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let lane_ids = serde_json::to_string(&claims.iter().map(|c| c.lane.id).collect::<Vec<_>>())
            .unwrap_or_default();
        let limit = claims.iter().map(|c| c.max).max().unwrap_or(7);
        // The limit is written into the SQL, not bound: SQLite re-prepares a statement each time a
        // parameter used as LIMIT is bound again (it may plan with the value).
        // The message columns prefixed with `m.` (json_each has an `id` of its own), built once.
        static COLUMNS: LazyLock<String> = LazyLock::new(|| {
            MESSAGE_COLUMNS
                .split(", ")
                .map(|c| format!("m.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        });
        let sql = format!(
            "SELECT m.lane_id, {}, {BODY_OF_M} FROM json_each(?1) AS l, messages AS m
             WHERE m.id IN (SELECT id FROM messages WHERE lane_id = l.value AND state = 'pending'
                            ORDER BY send_time, id LIMIT {limit})",
            *COLUMNS
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(lane_ids)
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
        let now = unix_now();
        let mut batches = Vec::with_capacity(claims.len());
        let mut nudged = Vec::new();
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
            // The original SendTime of the newest imported message: only messages from that
            // second on are ties to move; older ones are left to the server to refuse (visibly).
            let mut prev_orig = if lane.tie_nudge && !batch.is_empty() {
                sqlx::query_scalar::<_, i64>(
                    "SELECT send_time FROM messages WHERE lane_id = ? AND state = 'imported'
                     ORDER BY send_time DESC, id DESC LIMIT 1",
                )
                .bind(lane.id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.err(e))?
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
                if let Some(t) = m.sent_time {
                    nudged.push((m.id, t));
                }
            }
            batches.push(batch);
        }
        let ids: Vec<i64> = batches.iter().flatten().map(|m| m.id).collect();
        if !ids.is_empty() {
            // One statement for every batch; the SendTime to send is set only where nudged.
            sqlx::query(
                "UPDATE messages SET state = 'in_flight', attempts = attempts + 1, sent_time = NULL,
                 updated_at = ?1 WHERE id IN (SELECT value FROM json_each(?2)) AND state = 'pending'",
            )
            .bind(now)
            .bind(serde_json::to_string(&ids).unwrap_or_default())
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
            for (id, t) in nudged {
                sqlx::query("UPDATE messages SET sent_time = ? WHERE id = ?")
                    .bind(t)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.err(e))?;
            }
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
    /// Two records must not name the same lane.
    pub async fn record_many(
        &self,
        records: &[Record],
    ) -> Result<Vec<Vec<QueuedMessage>>, StoreError> {
        let now = unix_now();
        let mut tx = self.begin().await?;
        // The common outcomes in one statement each for every record at once; the rare ones row
        // by row.
        let updates = || records.iter().flat_map(|r| r.updates.iter());
        let imported: Vec<_> = updates()
            .filter_map(|u| match u {
                MessageUpdate::Imported {
                    id,
                    msg_seq,
                    msg_time,
                    note,
                } => Some((*id, *msg_seq, *msg_time, note.as_deref())),
                _ => None,
            })
            .collect();
        if !imported.is_empty() {
            sqlx::query(
                "UPDATE messages SET state = 'imported', msg_seq = v.value ->> 1,
                 msg_time = v.value ->> 2, result_code = 0, result_text = v.value ->> 3,
                 updated_at = ?1
                 FROM json_each(?2) AS v
                 WHERE messages.id = v.value ->> 0 AND messages.state = 'in_flight'",
            )
            .bind(now)
            .bind(serde_json::to_string(&imported).unwrap_or_default())
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
                "UPDATE messages SET state = 'pending', attempts = MAX(attempts - ?1, 0),
                 updated_at = ?2 WHERE id IN (SELECT value FROM json_each(?3))
                 AND state = 'in_flight'",
            )
            .bind(i64::from(refund))
            .bind(now)
            .bind(serde_json::to_string(&ids).unwrap_or_default())
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        for u in updates() {
            let q = match u {
                MessageUpdate::Imported { .. } | MessageUpdate::Pending { .. } => continue,
                MessageUpdate::Failed { id, code, reason } => sqlx::query(
                    "UPDATE messages SET state = 'failed', result_code = ?, result_text = ?,
                     updated_at = ? WHERE id = ? AND state = 'in_flight'",
                )
                .bind(*code)
                .bind(reason.as_str())
                .bind(now)
                .bind(*id),
                MessageUpdate::Unknown { id, note } => sqlx::query(
                    "UPDATE messages SET result_code = NULL, result_text = ?, updated_at = ?
                     WHERE id = ? AND state = 'in_flight'",
                )
                .bind(note.as_str())
                .bind(now)
                .bind(*id),
                MessageUpdate::Adopted {
                    id,
                    msg_seq,
                    msg_time,
                    note,
                } => sqlx::query(
                    "UPDATE messages SET state = 'imported', msg_seq = ?, msg_time = ?,
                     result_code = 0, result_text = ?, updated_at = ?
                     WHERE id = ? AND state IN ('pending', 'in_flight')",
                )
                .bind(*msg_seq)
                .bind(*msg_time)
                .bind(note.as_str())
                .bind(now)
                .bind(*id),
            };
            q.execute(&mut *tx).await.map_err(|e| self.err(e))?;
        }
        // Every lane's checkpoint in one statement: [id, seen SendTime, seen MsgSeq, retry_at,
        // block code, block reason, tie_nudge, last_error, checked_id].
        let lanes: Vec<_> = records
            .iter()
            .map(|r| {
                let (block_code, block_reason) = match &r.lane.block {
                    Some((c, reason)) => (*c, Some(reason.as_str())),
                    None => (None, None),
                };
                (
                    r.lane_id,
                    r.lane.seen_send_time,
                    r.lane.seen_msg_seq,
                    r.lane.retry_at,
                    block_code,
                    block_reason,
                    i64::from(r.lane.tie_nudge),
                    r.lane.last_error.as_deref(),
                    r.lane.checked_id,
                )
            })
            .collect();
        sqlx::query(
            "UPDATE lanes SET
                last_send_time = MAX(last_send_time, COALESCE(v.value ->> 1, 0)),
                last_msg_seq = MAX(last_msg_seq, COALESCE(v.value ->> 2, 0)),
                retry_at = COALESCE(v.value ->> 3, retry_at),
                state = CASE WHEN v.value ->> 5 IS NOT NULL THEN 'blocked' ELSE state END,
                blocked_code = CASE WHEN v.value ->> 5 IS NOT NULL THEN v.value ->> 4
                                    ELSE blocked_code END,
                blocked_reason = COALESCE(v.value ->> 5, blocked_reason),
                tie_nudge = MAX(tie_nudge, v.value ->> 6),
                last_error = COALESCE(v.value ->> 7, last_error),
                checked_id = MAX(checked_id, COALESCE(v.value ->> 8, 0)),
                catch_up_waived = CASE WHEN v.value ->> 8 IS NOT NULL THEN 0
                                       ELSE catch_up_waived END,
                updated_at = ?1
             FROM json_each(?2) AS v
             WHERE lanes.id = v.value ->> 0",
        )
        .bind(now)
        .bind(serde_json::to_string(&lanes).unwrap_or_default())
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let claims: Vec<&Claim> = records.iter().filter_map(|r| r.next.as_ref()).collect();
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
        // The same two updates for every scope, narrowed by a condition on messages and lanes.
        let (messages_where, lanes_where) = match scope {
            RetryScope::All => ("1", "1"),
            RetryScope::Group(_) => (
                "lane_id IN (SELECT id FROM lanes WHERE group_id = ?2)",
                "group_id = ?2",
            ),
            RetryScope::Job(_) => (
                "job_id = ?2",
                "id IN (SELECT lane_id FROM job_lanes WHERE job_id = ?2)",
            ),
        };
        let bind =
            |q: sqlx::query::Query<'static, Sqlite, sqlx::sqlite::SqliteArguments>| match scope {
                RetryScope::All => q,
                RetryScope::Group(g) => q.bind(g.to_string()),
                RetryScope::Job(j) => q.bind(j),
            };
        let now = unix_now();
        let mut tx = self.begin().await?;
        if let RetryScope::Group(g) = scope {
            sqlx::query(
                "UPDATE groups SET create_state = 'created', step_error = NULL, retry_at = 0
                 WHERE group_id = ? AND create_state = 'blocked'",
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
                 WHERE group_id = ? AND (state = 'failed' OR unread_state = 'failed')",
            )
            .bind(g)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        let m = bind(
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE messages SET state = 'pending', attempts = 0, result_code = NULL,
                 result_text = NULL, updated_at = ?1 WHERE state = 'failed' AND {messages_where}"
            )))
            .bind(now),
        )
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let l = bind(
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE lanes SET state = 'active', blocked_code = NULL, blocked_reason = NULL,
                 retry_at = 0, updated_at = ?1,
                 -- Blocked by the engine itself (a history it could not read conclusively): the
                 -- operator has looked, so the next catch-up takes the history as it is.
                 catch_up_waived = CASE WHEN blocked_code IS NULL THEN 1 ELSE catch_up_waived END
                 WHERE state = 'blocked' AND {lanes_where}"
            )))
            .bind(now),
        )
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        self.commit_tx(tx).await?;
        Ok((m.rows_affected(), l.rows_affected()))
    }
}

impl JobAccounts {
    /// Inserts the accounts not known yet (as pending). A profile given again with other data
    /// than was imported puts the account back to pending, to be sent in the profile form.
    async fn write_sqlite(
        &self,
        store: &SqliteStore,
        tx: &mut Transaction<'static, Sqlite>,
    ) -> Result<(), StoreError> {
        let now = unix_now();
        if !self.profiles.is_empty() {
            let rows: Vec<(&str, Option<&str>, Option<&str>)> = self
                .profiles
                .iter()
                .map(|a| (a.user_id.as_str(), a.nick.as_deref(), a.face_url.as_deref()))
                .collect();
            sqlx::query(
                "INSERT INTO accounts(user_id, profile, nick, face_url, updated_at)
                 SELECT value ->> 0, 1, value ->> 1, value ->> 2, ?2 FROM json_each(?1) WHERE true
                 ON CONFLICT(user_id) DO UPDATE SET
                    state = CASE WHEN accounts.state = 'imported' AND (accounts.profile = 0
                                      OR accounts.nick IS NOT excluded.nick
                                      OR accounts.face_url IS NOT excluded.face_url)
                                 THEN 'pending' ELSE accounts.state END,
                    profile = 1, nick = excluded.nick, face_url = excluded.face_url,
                    updated_at = excluded.updated_at",
            )
            .bind(serde_json::to_string(&rows).unwrap_or_default())
            .bind(now)
            .execute(&mut **tx)
            .await
            .map_err(|e| store.err(e))?;
        }
        if !self.named.is_empty() {
            let ids: Vec<&str> = self.named.keys().map(String::as_str).collect();
            sqlx::query(
                "INSERT OR IGNORE INTO accounts(user_id, updated_at)
                 SELECT value, ?2 FROM json_each(?1)",
            )
            .bind(serde_json::to_string(&ids).unwrap_or_default())
            .bind(now)
            .execute(&mut **tx)
            .await
            .map_err(|e| store.err(e))?;
        }
        Ok(())
    }
}

impl SqliteJobWriter {
    /// Lists an account with profile data (written at commit).
    pub fn add_account(&mut self, a: NewAccount) {
        self.b.accounts.profiles.push(a);
    }
}

impl SqliteStore {
    /// Up to `limit` pending accounts of one form: with profile data (`profile`) or IDs only.
    pub async fn pending_accounts(
        &self,
        profile: bool,
        limit: i64,
    ) -> Result<Vec<PendingAccount>, StoreError> {
        let rows = sqlx::query(
            "SELECT user_id, nick, face_url FROM accounts
             WHERE state = 'pending' AND profile = ? ORDER BY user_id LIMIT ?",
        )
        .bind(i64::from(profile))
        .bind(limit)
        .fetch_all(&self.reader)
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
        let rows = sqlx::query(
            "SELECT user_id, state, reason FROM accounts
             WHERE user_id IN (SELECT value FROM json_each(?))",
        )
        .bind(serde_json::to_string(ids).unwrap_or_default())
        .fetch_all(&self.reader)
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
    /// `failed` (ID, reason) are not, and the pending memberships that need them fail with them
    /// (their messages fail as their lanes reach them).
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
                 updated_at = ?2 WHERE user_id IN (SELECT value FROM json_each(?1))
                 AND state = 'pending'",
            )
            .bind(serde_json::to_string(imported).unwrap_or_default())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        if !failed.is_empty() {
            let rows = serde_json::to_string(failed).unwrap_or_default();
            sqlx::query(
                "UPDATE accounts SET state = 'failed', attempts = attempts + 1,
                 reason = v.value ->> 1, updated_at = ?2
                 FROM json_each(?1) AS v WHERE accounts.user_id = v.value ->> 0
                 AND accounts.state = 'pending'",
            )
            .bind(&rows)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
            sqlx::query(
                "UPDATE members SET state = 'failed',
                 result_text = 'member ' || ?3 || ': ' || (v.value ->> 1), updated_at = ?2
                 FROM json_each(?1) AS v WHERE members.member_account = v.value ->> 0
                 AND members.state = 'pending'",
            )
            .bind(&rows)
            .bind(now)
            .bind(ACCOUNT_FAILED_REASON.trim_start_matches("sender "))
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    /// Whether any account waits to be imported.
    pub async fn accounts_pending(&self) -> Result<bool, StoreError> {
        let n: i64 =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE state = 'pending')")
                .fetch_one(&self.reader)
                .await
                .map_err(|e| self.err(e))?;
        Ok(n != 0)
    }

    /// Account counts.
    pub async fn account_totals(&self) -> Result<AccountTotals, StoreError> {
        let r = sqlx::query(
            "SELECT COALESCE(SUM(state = 'imported'), 0) AS imported,
                    COALESCE(SUM(state = 'pending'), 0) AS pending,
                    COALESCE(SUM(state = 'failed'), 0) AS failed FROM accounts",
        )
        .fetch_one(&self.reader)
        .await
        .map_err(|e| self.err(e))?;
        Ok(AccountTotals {
            imported: r.get("imported"),
            pending: r.get("pending"),
            failed: r.get("failed"),
        })
    }

    /// `timport retry --accounts`: failed accounts back to pending, with the messages and
    /// memberships that failed for them.
    pub async fn retry_accounts(&self) -> Result<AccountRetry, StoreError> {
        let now = unix_now();
        let mut tx = self.begin().await?;
        let a = sqlx::query(
            "UPDATE accounts SET state = 'pending', reason = NULL, updated_at = ?
             WHERE state = 'failed'",
        )
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let m = sqlx::query(
            "UPDATE messages SET state = 'pending', attempts = 0, result_code = NULL,
             result_text = NULL, updated_at = ?1
             WHERE state = 'failed' AND result_code IS NULL AND result_text LIKE ?2 || '%'",
        )
        .bind(now)
        .bind(ACCOUNT_FAILED_REASON)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let g = sqlx::query(
            "UPDATE members SET state = 'pending', result_text = NULL, updated_at = ?1
             WHERE state = 'failed' AND result_text LIKE 'member ' || ?2 || '%'",
        )
        .bind(now)
        .bind(ACCOUNT_FAILED_REASON.trim_start_matches("sender "))
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(AccountRetry {
            accounts: a.rows_affected(),
            messages: m.rows_affected(),
            members: g.rows_affected(),
        })
    }
}

impl SqliteStore {
    /// Groups whose import_group is due.
    pub async fn groups_to_create(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<GroupToCreate>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT group_id, spec, create_attempts FROM groups
             WHERE create_state = 'pending' AND retry_at <= ? ORDER BY group_id LIMIT {limit}"
        )))
        .bind(now_ms)
        .fetch_all(&self.reader)
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
                "UPDATE groups SET create_attempts = create_attempts + 1 WHERE group_id = ?",
            )
            .bind(group),
        )
        .await
    }

    /// The group exists now: its messages may go.
    pub async fn group_created(&self, group: &str, note: Option<&str>) -> Result<(), StoreError> {
        self.write_one(
            sqlx::query(
                "UPDATE groups SET create_state = 'created', step_error = ? WHERE group_id = ?",
            )
            .bind(note)
            .bind(group),
        )
        .await
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
            "UPDATE groups SET create_state = 'blocked', step_error = ? WHERE group_id = ?",
        )
        .bind(reason)
        .bind(group)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        sqlx::query(
            "UPDATE lanes SET state = 'blocked', blocked_code = ?, blocked_reason = ?,
             updated_at = ? WHERE group_id = ?",
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
            sqlx::query("UPDATE groups SET retry_at = ?, step_error = ? WHERE group_id = ?")
                .bind(retry_at_ms)
                .bind(why)
                .bind(group),
        )
        .await
    }

    /// Groups with member work that may run now: created (or nothing to create), and no message
    /// of theirs pending or in flight, in any lane, blocked or not.
    pub async fn groups_with_member_work(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT DISTINCT m.group_id FROM members m JOIN groups g ON g.group_id = m.group_id
             WHERE (m.state = 'pending' OR m.unread_state = 'pending')
               AND COALESCE(g.create_state, 'created') = 'created' AND g.retry_at <= ?
               AND NOT EXISTS (SELECT 1 FROM lanes l WHERE l.group_id = m.group_id
                               AND (l.pending > 0 OR l.in_flight > 0))
             LIMIT {limit}"
        )))
        .bind(now_ms)
        .fetch_all(&self.reader)
        .await
        .map_err(|e| self.err(e))
    }

    /// Whether a group step can still run (for `--until-idle`): a creation, or member work not
    /// waiting behind a blocked lane or a blocked creation.
    pub async fn group_work_left(&self) -> Result<bool, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM groups WHERE create_state = 'pending')
                  + (SELECT COUNT(*) FROM members m JOIN groups g ON g.group_id = m.group_id
                     WHERE (m.state = 'pending' OR m.unread_state = 'pending')
                       AND COALESCE(g.create_state, 'created') = 'created'
                       AND NOT EXISTS (SELECT 1 FROM lanes l WHERE l.group_id = m.group_id
                                       AND l.state = 'blocked'))",
        )
        .fetch_one(&self.reader)
        .await
        .map_err(|e| self.err(e))?;
        Ok(n > 0)
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
        let sql = format!(
            "SELECT id, member_account, role, join_time, unread_msg_num FROM members
             WHERE group_id = ? AND {condition} ORDER BY id LIMIT {limit}"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(group)
            .fetch_all(&self.reader)
            .await
            .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(member_row).collect())
    }

    /// Records member outcomes in one transaction.
    pub async fn record_members(&self, updates: &[MemberUpdate]) -> Result<(), StoreError> {
        let now = unix_now();
        let mut tx = self.begin().await?;
        for u in updates {
            let q = match u {
                MemberUpdate::Imported {
                    id,
                    result,
                    unread_pending,
                } => sqlx::query(
                    "UPDATE members SET state = 'imported', result = ?, unread_state = ?,
                     result_text = NULL, updated_at = ? WHERE id = ?",
                )
                .bind(*result)
                .bind(if *unread_pending { "pending" } else { "none" })
                .bind(now)
                .bind(*id),
                MemberUpdate::Failed { id, result, reason } => sqlx::query(
                    "UPDATE members SET state = 'failed', result = ?, result_text = ?,
                     updated_at = ? WHERE id = ?",
                )
                .bind(*result)
                .bind(reason.as_str())
                .bind(now)
                .bind(*id),
                MemberUpdate::UnreadSet { id } => sqlx::query(
                    "UPDATE members SET unread_state = 'set', updated_at = ? WHERE id = ?",
                )
                .bind(now)
                .bind(*id),
                MemberUpdate::UnreadFailed { id, reason } => sqlx::query(
                    "UPDATE members SET unread_state = 'failed', result_text = ?, updated_at = ?
                     WHERE id = ?",
                )
                .bind(reason.as_str())
                .bind(now)
                .bind(*id),
            };
            q.execute(&mut *tx).await.map_err(|e| self.err(e))?;
        }
        self.commit_tx(tx).await
    }

    /// Member counts (all, or one group's).
    pub async fn member_totals(&self, group: Option<&str>) -> Result<MemberTotals, StoreError> {
        let r = sqlx::query(
            "SELECT COALESCE(SUM(state = 'pending'), 0) AS pending,
                    COALESCE(SUM(state = 'imported'), 0) AS imported,
                    COALESCE(SUM(state = 'failed' OR unread_state = 'failed'), 0) AS failed,
                    COALESCE(SUM(unread_state = 'pending'), 0) AS unread_pending
             FROM members WHERE (?1 IS NULL OR group_id = ?1)",
        )
        .bind(group)
        .fetch_one(&self.reader)
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

fn verify_lane_filter() -> &'static str {
    "l.imported > 0 AND (?1 IS NULL OR l.group_id = ?1)
     AND (?2 IS NULL OR l.id IN (SELECT lane_id FROM job_lanes WHERE job_id = ?2))"
}

impl SqliteStore {
    /// Lanes with imported messages, all or those of `group` or of `job`, with their passes.
    pub async fn verify_scope(
        &self,
        group: Option<&str>,
        job: Option<i64>,
    ) -> Result<Vec<VerifyLane>, StoreError> {
        let sql = format!(
            "SELECT l.id, l.group_id, l.topic_id, l.imported, l.pending + l.in_flight AS unfinished,
                    (SELECT MIN(msg_seq) FROM messages m
                      WHERE m.lane_id = l.id AND m.state = 'imported') AS low_seq,
                    (SELECT MAX(msg_seq) FROM messages m
                      WHERE m.lane_id = l.id AND m.state = 'imported') AS high_seq,
                    v.lane_id AS v_lane, v.imported AS v_imported, v.top_seq, v.low_seq AS v_low,
                    v.next_seq, v.done
             FROM lanes l LEFT JOIN verify_lanes v ON v.lane_id = l.id
             WHERE {} ORDER BY l.group_id, l.topic_id",
            verify_lane_filter()
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(group)
            .bind(job)
            .fetch_all(&self.reader)
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
        sqlx::query("DELETE FROM verify_results WHERE lane_id = ?")
            .bind(lane_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        sqlx::query(
            "INSERT INTO verify_lanes(lane_id, imported, top_seq, low_seq, next_seq, done, started_at)
             VALUES(?1, ?2, ?3, ?4, ?3, 0, unixepoch())
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
        tx.commit().await.map_err(|e| self.err(e))
    }

    /// Forgets every recorded pass and result of the lanes in scope (`timport verify --restart`).
    pub async fn verify_reset(
        &self,
        group: Option<&str>,
        job: Option<i64>,
    ) -> Result<(), StoreError> {
        let lanes = format!("SELECT l.id FROM lanes l WHERE {}", verify_lane_filter());
        let mut tx = self.begin().await?;
        for table in ["verify_results", "verify_lanes"] {
            sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE lane_id IN ({lanes})"
            )))
            .bind(group)
            .bind(job)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    /// Our imported messages of the lane with a MsgSeq in `lo..=hi`, by MsgSeq.
    pub async fn verify_ours(
        &self,
        lane_id: i64,
        lo: i64,
        hi: i64,
    ) -> Result<Vec<VerifyOurs>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, msg_seq, from_account, COALESCE(sent_time, send_time) AS t, random,
                    COALESCE((SELECT b.body FROM message_bodies AS b WHERE b.message_id = m.id), '')
                        AS body,
                    body_sha256
             FROM messages AS m WHERE lane_id = ? AND state = 'imported' AND msg_seq BETWEEN ? AND ?
             ORDER BY msg_seq, id",
        )
        .bind(lane_id)
        .bind(lo)
        .bind(hi)
        .fetch_all(&self.reader)
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
        let sql = format!(
            "SELECT id, COALESCE(msg_seq, 0) AS msg_seq, from_account,
                    COALESCE(sent_time, send_time) AS t, random, {BODY_OF_M}, body_sha256,
                    state = 'imported' AS imported
             FROM messages AS m
             WHERE lane_id = ?1 AND state IN ('pending', 'in_flight', 'imported', 'failed')
               AND send_time BETWEEN ?3 - 86400 AND ?3
               AND COALESCE(sent_time, send_time) = ?3 AND from_account = ?2
             ORDER BY id"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(lane_id)
            .bind(from)
            .bind(time)
            .fetch_all(&self.reader)
            .await
            .map_err(|e| self.err(e))?;
        Ok(rows
            .iter()
            .map(|r| (verify_ours_row(r), r.get::<i64, _>("imported") != 0))
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
        let items: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| serde_json::json!([r.message_id, r.msg_seq, r.kind, r.expected, r.found]))
            .collect();
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM verify_results WHERE lane_id = ? AND msg_seq BETWEEN ? AND ?")
            .bind(lane_id)
            .bind(lo)
            .bind(hi)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        if !items.is_empty() {
            sqlx::query(
                "INSERT INTO verify_results(lane_id, message_id, msg_seq, kind, expected, found)
                 SELECT ?, v.value ->> 0, v.value ->> 1, v.value ->> 2, v.value ->> 3,
                        v.value ->> 4
                 FROM json_each(?) AS v",
            )
            .bind(lane_id)
            .bind(serde_json::Value::Array(items).to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        sqlx::query(
            "UPDATE verify_lanes SET next_seq = ?2, done = ?3, top_seq = COALESCE(top_seq, ?4),
                    finished_at = CASE WHEN ?3 THEN unixepoch() END
             WHERE lane_id = ?1",
        )
        .bind(lane_id)
        .bind(next_seq)
        .bind(done)
        .bind(top_seq)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))
    }

    /// Recorded counts per lane that has a pass, all or those of `group` or `job`. Empty when
    /// the database has never been verified (or predates verify: read-only status).
    pub async fn verify_counts(
        &self,
        group: Option<&str>,
        job: Option<i64>,
    ) -> Result<Vec<VerifyCounts>, StoreError> {
        let exists: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'verify_results'",
        )
        .fetch_optional(&self.reader)
        .await
        .map_err(|e| self.err(e))?;
        if exists.is_none() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT l.id, l.group_id, l.topic_id, v.done,
                    COALESCE(SUM(r.kind = 'verified'), 0) AS verified,
                    COALESCE(SUM(r.kind = 'missing'), 0) AS missing,
                    COALESCE(SUM(r.kind = 'altered'), 0) AS altered,
                    COALESCE(SUM(r.kind = 'duplicated'), 0) AS duplicated,
                    COALESCE(SUM(r.kind = 'unverifiable'), 0) AS unverifiable,
                    COALESCE(SUM(r.kind = 'foreign'), 0) AS foreign_
             FROM verify_lanes v JOIN lanes l ON l.id = v.lane_id
             LEFT JOIN verify_results r ON r.lane_id = v.lane_id
             WHERE {} GROUP BY l.id ORDER BY l.group_id, l.topic_id",
            verify_lane_filter()
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(group)
            .bind(job)
            .fetch_all(&self.reader)
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
        let sql = format!(
            "SELECT l.group_id, l.topic_id, r.msg_seq, r.kind, r.expected, r.found
             FROM verify_results r JOIN lanes l ON l.id = r.lane_id
             WHERE r.kind <> 'verified' AND {}
             ORDER BY l.group_id, l.topic_id, r.msg_seq, r.kind LIMIT {limit}",
            verify_lane_filter()
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(group)
            .bind(job)
            .fetch_all(&self.reader)
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
                "INSERT INTO verify_claim(id, token, rate, heartbeat_ms) VALUES(1, ?, ?, ?)
                 ON CONFLICT(id) DO UPDATE SET token = excluded.token, rate = excluded.rate,
                    heartbeat_ms = excluded.heartbeat_ms, ack_token = NULL, ack_ms = NULL,
                    ack_ceiling = NULL",
            )
            .bind(token)
            .bind(rate)
            .bind(now_ms),
        )
        .await
    }

    /// Renews the claim's heartbeat; false when the claim is no longer this token's.
    pub async fn verify_heartbeat(&self, token: &str, now_ms: i64) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let n = sqlx::query("UPDATE verify_claim SET heartbeat_ms = ? WHERE id = 1 AND token = ?")
            .bind(now_ms)
            .bind(token)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?
            .rows_affected();
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(n == 1)
    }

    /// Withdraws the claim (a verify ending).
    pub async fn verify_release(&self, token: &str) -> Result<(), StoreError> {
        self.write_one(
            sqlx::query("DELETE FROM verify_claim WHERE id = 1 AND token = ?").bind(token),
        )
        .await
    }

    /// The current claim, if any (fresh or not).
    pub async fn verify_claim_read(&self) -> Result<Option<VerifyClaim>, StoreError> {
        let r = sqlx::query(
            "SELECT token, rate, heartbeat_ms, ack_token, ack_ms FROM verify_claim WHERE id = 1",
        )
        .fetch_optional(&self.reader)
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
                "UPDATE verify_claim SET ack_token = ?1, ack_ms = ?2, ack_ceiling = ?3
                 WHERE id = 1 AND token = ?1",
            )
            .bind(token)
            .bind(now_ms)
            .bind(ceiling),
        )
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// `queue.keep_bodies`: the bodies of imported messages dropped once they are no longer needed.

/// Where the "until verified" pass stands: the last `verify_results.id` looked at.
const BODIES_CURSOR_KEY: &str = "bodies_dropped_through_result";

impl SqliteStore {
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
                     WHERE r.id > ? ORDER BY r.id LIMIT ?",
                )
                .bind(cursor)
                .bind(limit)
                .fetch_all(&self.reader)
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
                     WHERE m.state = 'imported' AND m.updated_at < ? LIMIT ?",
                )
                .bind(before)
                .bind(limit)
                .fetch_all(&self.reader)
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

    /// Drops the bodies of these imported messages, keeping each one's digest (`(id, sha256)`),
    /// and stores the cursor, in one transaction. Returns how many were dropped.
    pub async fn drop_bodies(
        &self,
        digests: &[(i64, String)],
        cursor: Option<i64>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let mut n = 0;
        if !digests.is_empty() {
            let digests = serde_json::to_string(digests).unwrap_or_default();
            n = sqlx::query(
                "UPDATE messages SET body_sha256 = v.value ->> 1
                 FROM json_each(?) AS v
                 WHERE messages.id = v.value ->> 0 AND messages.state = 'imported'",
            )
            .bind(&digests)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?
            .rows_affected();
            // Whole rows go (their pages to the freelist, taken again by later bodies).
            sqlx::query(
                "DELETE FROM message_bodies WHERE message_id IN
                     (SELECT m.id FROM json_each(?) AS v JOIN messages m ON m.id = v.value ->> 0
                      WHERE m.state = 'imported')",
            )
            .bind(&digests)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        if let Some(c) = cursor {
            sqlx::query(
                "INSERT INTO meta(key, value) VALUES(?, ?)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )
            .bind(BODIES_CURSOR_KEY)
            .bind(c.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// `assigned_random` exactly as it was before keys existed (the legacy sequence).
    fn before_keys(group_id: &str, counter: u64) -> u32 {
        let mut seed: u32 = 0x811c_9dc5;
        for b in group_id.as_bytes() {
            seed ^= u32::from(*b);
            seed = seed.wrapping_mul(0x0100_0193);
        }
        let mut h = seed.wrapping_add((counter & 0xffff_ffff) as u32);
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^= h >> 16;
        h
    }

    fn key(byte: u8) -> RandomKey {
        let mut k = [0u8; 16];
        k[0] = byte;
        k[15] = 0x5a;
        RandomKey::Keyed(k)
    }

    #[test]
    fn the_legacy_key_reproduces_the_values_assigned_before_keys_existed() {
        for g in ["", "g", "team-general", "@TGS#2ABCDEF", "群组"] {
            let seq = RandomKey::Legacy.sequence(g);
            for c in (0..50_000u64).chain([u64::from(u32::MAX) - 1, u64::from(u32::MAX)]) {
                let want = before_keys(g, c);
                assert_eq!(assigned_random(g, c), want, "{g} {c}");
                assert_eq!(seq.at(c as u32), want, "{g} {c}");
            }
        }
        // Pinned values, in case both copies drift together.
        assert_eq!(
            assigned_random("team-general", 0),
            before_keys("team-general", 0)
        );
        assert_eq!(
            [assigned_random("g", 0), assigned_random("g", 1)],
            [1_377_171_301, 1_297_577_406]
        );
    }

    #[test]
    fn each_key_gives_a_bijection_with_an_inverse() {
        for k in [RandomKey::Legacy, key(1), key(2)] {
            let seq = k.sequence("busy-group");
            let mut seen = HashSet::new();
            for c in 0..300_000u32 {
                let v = seq.at(c);
                assert!(seen.insert(v), "{k:?}: repeat at {c}");
                assert_eq!(seq.counter_of(v), c, "{k:?}: inverse of {c}");
            }
            // The other way round, over values spread across u32.
            for v in (0..u32::MAX).step_by(65_521) {
                assert_eq!(seq.at(seq.counter_of(v)), v, "{k:?}: value {v}");
            }
        }
    }

    #[test]
    fn two_keys_give_unrelated_sequences() {
        let n = 100_000u32;
        let a: HashSet<u32> = (0..n).map(|c| key(1).sequence("g").at(c)).collect();
        let b: Vec<u32> = (0..n).map(|c| key(2).sequence("g").at(c)).collect();
        // By chance, two samples of 100,000 from 2^32 share about n^2 / 2^32 = 2.3 values.
        let shared = b.iter().filter(|v| a.contains(v)).count();
        assert!(shared < 20, "{shared} values shared by two keys");
        let same_position = (0..n as usize)
            .filter(|&i| key(1).sequence("g").at(i as u32) == b[i])
            .count();
        assert!(same_position < 3, "{same_position}");
        // And two groups under one key.
        let c: Vec<u32> = (0..n).map(|c| key(1).sequence("h").at(c)).collect();
        assert!(c.iter().filter(|v| a.contains(v)).count() < 20);
    }

    #[test]
    fn keys_parse_and_never_show() {
        assert_eq!(RandomKey::parse("legacy"), Some(RandomKey::Legacy));
        let k = RandomKey::parse("00112233445566778899aabbccddeeff").unwrap();
        assert!(matches!(k, RandomKey::Keyed(b) if b[1] == 0x11 && b[15] == 0xff));
        for bad in ["", "0011", "zz112233445566778899aabbccddeeff", "Legacy"] {
            assert_eq!(RandomKey::parse(bad), None, "{bad}");
        }
        let shown = format!("{k:?} {:?}", k.sequence("g"));
        assert!(
            !shown.contains("0011") && !shown.contains("aabb"),
            "{shown}"
        );
    }
}
