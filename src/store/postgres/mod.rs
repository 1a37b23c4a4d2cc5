//! The store on PostgreSQL: the same queue as [`super::sqlite`], in a database several machines
//! can reach, replicate and back up.
//!
//! Discipline, as on SQLite: every write transaction is short, never spans an HTTP call, and
//! starts by taking the queue's writer lock (`pg_advisory_xact_lock`, held until it commits or
//! rolls back, [`PgStore::begin`]), so writes of every process on this queue (`timport run`,
//! `ingest`, `retry`, `verify`) are serialized as SQLite's `BEGIN IMMEDIATE` serializes them.
//! The one exception is the engine's claims and records ([`PgStore::begin_lanes`]): they take
//! no writer lock but row locks in one fixed order, lanes (in id order) before jobs (in id
//! order) before messages, and every transaction that changes a message's state or a counter
//! (a job's commit, `retry`, a blocked group) locks in that same order, so none can deadlock.
//! Reads take no lock (READ COMMITTED). Bulk intake goes in multi-row statements over `unnest`
//! arrays; lists go in as arrays, not JSON.
//!
//! Faults: the server unreachable at start is [`StoreError::Unreachable`] naming the host (the
//! URL is only ever shown redacted); a refused login or missing database is
//! [`StoreError::Refused`]; a hot standby is [`StoreError::Standby`]. While running, a lost
//! connection (or a server restarting, or a failover that left this URL on a standby) is a write
//! refusal: [`Health`] says so once, intake and lanes wait, and a probe write retries with
//! backoff until the database answers again. A transaction cut off by a lost connection rolled
//! back on the server, so nothing half-done remains; an answer that could not be recorded stays
//! in flight and is reconciled, as after a crash. Stopping closes the pool.

mod engine;
mod ha;
mod intake;
mod status;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};

pub use intake::PgJobWriter;

use super::health::{Health, HealthCell};
use super::{HaFence, RandomKey, StoreError, StoreOptions, unix_now};
use crate::settings::PostgresUrl;

/// The embedded PostgreSQL migrations (`migrations/postgres/`), run at every start.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The advisory lock every write transaction takes first: one writer at a time per database.
const WRITER_LOCK: i64 = 0x7469_6d70_0001; // "timp" 1

/// The BEGIN of every write transaction.
const BEGIN_WRITE: &str =
    "BEGIN ISOLATION LEVEL READ COMMITTED; SELECT pg_advisory_xact_lock(127996156444673)";

/// The BEGIN of an engine transaction on some lanes: no writer lock (see
/// [`PgStore::begin_lanes`]).
const BEGIN_LANES: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// How long a statement waits for a free connection before the database counts as unreachable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The queue database on PostgreSQL. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The URL, redacted: what errors and logs name.
    target: String,
    host: String,
    /// The secret behind assigned Randoms (`meta.random_key`); `None` when opened read-only.
    random_key: Option<RandomKey>,
    health: Arc<HealthCell>,
    url: PostgresUrl,
    /// The lease writes carry (token, holder instance; see [`PgStore::begin`]). Shared by the
    /// clones.
    fence: Arc<std::sync::RwLock<Option<HaFence>>>,
}

/// How an open treats the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Create the schema when missing (`run`, `ingest`).
    Create,
    /// The schema must exist (`retry`, `verify`).
    Existing,
    /// Read only: no migration, no write (`status`).
    ReadOnly,
}

impl PgStore {
    /// Connects, migrates, and proves the database takes writes.
    pub async fn open(url: &PostgresUrl, opts: &StoreOptions) -> Result<PgStore, StoreError> {
        PgStore::connect(url, opts, Mode::Create).await
    }

    /// Like [`PgStore::open`], but a database without a timport queue is
    /// [`StoreError::NotFound`] and nothing is created.
    pub async fn open_existing(
        url: &PostgresUrl,
        opts: &StoreOptions,
    ) -> Result<PgStore, StoreError> {
        PgStore::connect(url, opts, Mode::Existing).await
    }

    /// Connects for reading only (`timport status`): no migration, no write; works on a standby.
    pub async fn open_read_only(
        url: &PostgresUrl,
        opts: &StoreOptions,
    ) -> Result<PgStore, StoreError> {
        PgStore::connect(url, opts, Mode::ReadOnly).await
    }

    async fn connect(
        url: &PostgresUrl,
        opts: &StoreOptions,
        mode: Mode,
    ) -> Result<PgStore, StoreError> {
        let target = url.redacted().to_string();
        let host = url.host().to_string();
        let options = PgConnectOptions::from_str(url.expose())
            .map_err(|source| StoreError::Refused {
                target: target.clone(),
                source: scrub(source),
            })?
            .application_name("timport");
        // One connection first, for a precise error: the pool would only say it timed out.
        {
            use sqlx::Connection;
            match tokio::time::timeout(ACQUIRE_TIMEOUT, sqlx::PgConnection::connect_with(&options))
                .await
            {
                Ok(Ok(c)) => {
                    let _ = c.close().await;
                }
                Ok(Err(e)) => return Err(opening_error(&target, &host, e)),
                Err(_) => {
                    return Err(StoreError::Unreachable {
                        host,
                        target,
                        source: sqlx::Error::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no answer within {} s", ACQUIRE_TIMEOUT.as_secs()),
                        )),
                    });
                }
            }
        }
        let pool = PgPoolOptions::new()
            .max_connections(opts.pg_pool_size.max(2))
            .min_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // No ping before each transaction (a round trip of its own on every claim and
            // record): a connection left idle across a server restart fails its first
            // statement instead, which is classified as a lost connection like any other (the
            // health path: writes refused, a probe, then resumed), and sqlx discards a broken
            // connection when it is released (it pings it then, off the caller's path).
            .test_before_acquire(false)
            // No transaction of ours waits on anything but the database: one left idle means
            // its process is gone (a machine lost mid-transaction). Bounded, so the locks it
            // holds (the writer lock, the lease row a takeover waits for) are freed in a minute
            // rather than when TCP keepalive notices, hours later. Only where the server, the
            // database or the role set no bound of their own: an operator's tighter one wins.
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    sqlx::query(
                        "SELECT set_config('idle_in_transaction_session_timeout', '60s', false)
                         WHERE current_setting('idle_in_transaction_session_timeout') IN ('0', '0ms')",
                    )
                    .execute(&mut *conn)
                    .await
                    .map(|_| ())
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| opening_error(&target, &host, e))?;
        let mut store = PgStore {
            pool,
            target,
            host,
            random_key: None,
            health: HealthCell::new(),
            url: url.clone(),
            fence: Arc::new(std::sync::RwLock::new(None)),
        };
        if mode != Mode::Create {
            let queue = store
                .table_exists("messages")
                .await
                .map_err(|e| store.classify(e))?;
            if !queue {
                store.pool.close().await;
                return Err(StoreError::NotFound {
                    path: store.target.clone().into(),
                    what: "holds no timport queue (no messages table in its schema)",
                });
            }
        }
        if mode == Mode::ReadOnly {
            return Ok(store);
        }
        let in_recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
            .fetch_one(&store.pool)
            .await
            .map_err(|e| store.classify(e))?;
        if in_recovery {
            store.pool.close().await;
            return Err(StoreError::Standby {
                target: store.target.clone(),
                detail: "the server is a hot standby (pg_is_in_recovery)".into(),
            });
        }
        // Two processes starting at once must not both run the first migration.
        {
            let mut conn = store.pool.acquire().await.map_err(|e| store.classify(e))?;
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(WRITER_LOCK + 1)
                .execute(&mut *conn)
                .await
                .map_err(|e| store.classify(e))?;
            let migrated = MIGRATOR.run(&mut *conn).await;
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(WRITER_LOCK + 1)
                .execute(&mut *conn)
                .await;
            migrated.map_err(|source| match source {
                sqlx::migrate::MigrateError::Execute(e) => store.classify(e),
                source => StoreError::PgMigrate {
                    target: store.target.clone(),
                    source,
                },
            })?;
        }
        store.write_probe().await?;
        store.random_key = Some(store.load_random_key().await?);
        Ok(store)
    }

    /// Reads `meta.random_key` (the first migration draws it).
    async fn load_random_key(&self) -> Result<RandomKey, StoreError> {
        let value: Option<String> =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'random_key'")
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.err(e))?;
        value
            .as_deref()
            .and_then(RandomKey::parse)
            .ok_or_else(|| StoreError::Pg {
                target: self.target.clone(),
                source: sqlx::Error::Protocol(
                    "meta random_key is missing or not 32 hex digits".into(),
                ),
            })
    }

    /// The secret behind this database's assigned Randoms (`None` when opened read-only).
    pub fn random_key(&self) -> Option<&RandomKey> {
        self.random_key.as_ref()
    }

    /// The URL, redacted.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// `host:port` of the server.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The URL (for a listening connection of one's own).
    /// Listens for rows inserted into the intake table (the `intake_notify` trigger).
    pub async fn intake_listener(&self) -> Result<PgIntakeListener, StoreError> {
        let mut l = sqlx::postgres::PgListener::connect_with(&self.pool)
            .await
            .map_err(|e| self.classify(e))?;
        l.listen(INTAKE_CHANNEL)
            .await
            .map_err(|e| self.classify(e))?;
        Ok(PgIntakeListener { listener: l })
    }

    /// The pool (tests and benchmarks read through it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Commits a small write, so a standby or a lost connection shows up now, not mid-import.
    pub async fn write_probe(&self) -> Result<(), StoreError> {
        self.set_meta("last_write_probe", &unix_now().to_string())
            .await
    }

    /// Starts a write transaction holding the queue's writer lock. On an active node of a
    /// high-availability group (a fence is set), the transaction first proves that the node's
    /// lease token is still the queue's (`timport_fence`, which holds the lease row FOR SHARE until
    /// the transaction ends): a stale token is [`StoreError::Fenced`] and nothing is written.
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.begin_fenced(BEGIN_WRITE).await
    }

    /// The lease every write carries, when this node is active (see [`PgStore::begin`]).
    fn fence(&self) -> Option<HaFence> {
        self.fence.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets (on becoming active) or clears (`None`) the lease every write proves first.
    pub fn set_fence(&self, lease: Option<HaFence>) {
        *self.fence.write().unwrap_or_else(|p| p.into_inner()) = lease;
    }

    /// Starts a job writer's transaction: the writer lock, but never the fence. Standbys queue
    /// jobs too, and a job may take minutes; a fenced transaction holds the lease row FOR SHARE
    /// to its end, and would stall this node's renewals (an UPDATE of that row) all that time.
    pub async fn begin_job(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool
            .begin_with(BEGIN_WRITE)
            .await
            .map_err(|e| self.err(e))
    }

    /// Starts an engine transaction on some lanes (a claim, a record), WITHOUT the queue's
    /// writer lock, so the engine's lanes go on while a job is being queued (a job writer holds
    /// the writer lock for its whole transaction) and several lanes commit at once. Such a
    /// transaction must lock what it touches in the queue's one order: its lane rows first
    /// (`FOR NO KEY UPDATE`, in id order), then the job rows whose counters its message
    /// updates move (in id order), before updating any message; see `engine.rs`.
    pub async fn begin_lanes(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.begin_fenced(BEGIN_LANES).await
    }

    /// Starts a transaction with `begin`, then, on an active node, proves its lease first.
    async fn begin_fenced(
        &self,
        begin: &'static str,
    ) -> Result<Transaction<'static, Postgres>, StoreError> {
        let mut tx = self.pool.begin_with(begin).await.map_err(|e| self.err(e))?;
        // A statement of its own, not part of the BEGIN: a failed BEGIN batch would leave the
        // pooled connection inside an aborted transaction; a failed statement rolls back with
        // `tx` when it is dropped.
        if let Some(fence) = self.fence() {
            sqlx::query("SELECT timport_fence($1, $2, $3)")
                .bind(fence.token)
                .bind(fence.instance)
                .bind(i32::try_from(fence.idle_bound.as_millis()).unwrap_or(i32::MAX))
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(tx)
    }

    /// Commits `tx`; a committed write clears a write refusal.
    pub(crate) async fn commit_tx(
        &self,
        tx: Transaction<'static, Postgres>,
    ) -> Result<(), StoreError> {
        tx.commit().await.map_err(|e| self.err(e))?;
        self.health.note_written(&self.target);
        Ok(())
    }

    /// Wraps an sqlx error with the redacted URL and its class, and notes what it says about
    /// the database's health (see [`Health`]).
    pub fn err(&self, e: sqlx::Error) -> StoreError {
        let e = self.classify(e);
        self.note_error(&e);
        e
    }

    fn classify(&self, e: sqlx::Error) -> StoreError {
        classify(&self.target, e)
    }

    /// Records what `e` says about the database (see [`HealthCell::note_error`]).
    pub fn note_error(&self, e: &StoreError) {
        if self.health.note_error(&self.target, e) {
            let store = self.clone();
            self.health.start_probe(move || {
                let store = store.clone();
                async move {
                    if store.pool.is_closed() {
                        return None;
                    }
                    Some(store.write_probe().await.is_ok())
                }
            });
        }
    }

    /// The database's health now.
    pub fn health(&self) -> Health {
        self.health.get()
    }

    /// A receiver that sees every change of [`PgStore::health`].
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

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Reads a `meta` value.
    pub async fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))
    }

    /// Writes a `meta` value in its own short transaction.
    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO meta(key, value) VALUES($1, $2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        self.commit_tx(tx).await
    }

    /// Runs one write statement in its own short transaction; returns the rows it touched.
    pub(crate) async fn write_one(
        &self,
        q: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let n = q
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?
            .rows_affected();
        self.commit_tx(tx).await?;
        Ok(n)
    }
}

/// An error of the first connection: the server unreachable, or refusing us.
fn opening_error(target: &str, host: &str, e: sqlx::Error) -> StoreError {
    match classify(target, e) {
        // The server answered, but its certificate was not trusted or TLS was refused.
        StoreError::ConnectionLost { source, .. } if tls_refused(&source) => StoreError::Refused {
            target: target.to_string(),
            source,
        },
        StoreError::ConnectionLost { source, .. } => StoreError::Unreachable {
            host: host.to_string(),
            target: target.to_string(),
            source,
        },
        StoreError::Pg { source, .. } => StoreError::Refused {
            target: target.to_string(),
            source,
        },
        e => e,
    }
}

/// A TLS failure (an untrusted certificate, a server without TLS when the URL requires it).
fn tls_refused(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Tls(_) => true,
        sqlx::Error::Io(io) => io.kind() == std::io::ErrorKind::InvalidData,
        _ => false,
    }
}

/// An sqlx error as it may be shown: a configuration error could repeat the URL it came from.
fn scrub(e: sqlx::Error) -> sqlx::Error {
    match e {
        sqlx::Error::Configuration(_) => {
            sqlx::Error::Configuration("the URL's options could not be read".into())
        }
        e => e,
    }
}

/// Classifies an sqlx error from PostgreSQL by SQLSTATE (and the connection-level kinds).
fn classify(target: &str, e: sqlx::Error) -> StoreError {
    let target = target.to_string();
    let e = scrub(e);
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => {
            return StoreError::ConnectionLost { target, source: e };
        }
        _ => {}
    }
    let code = e
        .as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
        .unwrap_or_default();
    match code.as_str() {
        // timport_fence (migrations/postgres/0002_ha.sql, 0003): a stale lease token.
        "TF001" => StoreError::Fenced {
            target,
            detail: e
                .as_database_error()
                .map(|d| d.message().to_string())
                .unwrap_or_default(),
        },
        // read_only_sql_transaction: a standby (a failover left this URL on one).
        "25006" => StoreError::Standby {
            target,
            detail: e
                .as_database_error()
                .map(|d| d.message().to_string())
                .unwrap_or_default(),
        },
        // admin_shutdown, crash_shutdown, cannot_connect_now, connection exceptions.
        c if c.starts_with("08") || c == "57P01" || c == "57P02" || c == "57P03" => {
            StoreError::ConnectionLost { target, source: e }
        }
        // disk_full, insufficient resources: for the operator to fix, retried.
        c if c.starts_with("53") => StoreError::DiskFull {
            path: target.into(),
            source: e,
        },
        // invalid authorization, invalid catalog (no such database).
        c if c.starts_with("28") || c == "3D000" => StoreError::Refused { target, source: e },
        _ => StoreError::Pg { target, source: e },
    }
}

/// The channel the intake table's trigger notifies.
const INTAKE_CHANNEL: &str = "timport_intake";

/// A `LISTEN timport_intake` connection of its own.
#[derive(Debug)]
pub struct PgIntakeListener {
    listener: sqlx::postgres::PgListener,
}

impl PgIntakeListener {
    /// Waits for the next notification. A lost connection is re-made (and listened on again) by
    /// sqlx at the next call; a failure waits a second, so a server that is down costs no busy
    /// loop (the poll interval still takes rows meanwhile).
    pub async fn recv(&mut self) {
        if self.listener.recv().await.is_err() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// A session-level advisory lock, held on a connection of its own for as long as this value
/// lives (dropping it closes the connection, which releases the lock). If that connection is
/// lost, so is the lock.
#[derive(Debug)]
pub struct PgLock {
    _conn: sqlx::PgConnection,
}

/// The lock of the one `timport run` per database.
pub const DAEMON_LOCK: i64 = WRITER_LOCK + 2;
/// The lock of the one `timport verify` per database.
pub const VERIFY_LOCK: i64 = WRITER_LOCK + 3;

impl PgStore {
    /// Whether the queue's schema has table `name` (a queue made by an older release, or not a
    /// queue at all, may not).
    async fn table_exists(&self, name: &str) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_tables
             WHERE schemaname = current_schema() AND tablename = $1)",
        )
        .bind(name)
        .fetch_one(&self.pool)
        .await
    }

    /// Takes advisory lock `key` on a connection of its own; `None` when another session holds
    /// it.
    pub async fn try_lock(&self, key: i64, shared: bool) -> Result<Option<PgLock>, StoreError> {
        use sqlx::Connection;
        let options = PgConnectOptions::from_str(self.url.expose())
            .map_err(|e| self.err(scrub(e)))?
            .application_name("timport lock");
        let mut conn = sqlx::PgConnection::connect_with(&options)
            .await
            .map_err(|e| self.err(e))?;
        let sql = match shared {
            true => "SELECT pg_try_advisory_lock_shared($1)",
            false => "SELECT pg_try_advisory_lock($1)",
        };
        let got: bool = sqlx::query_scalar(sql)
            .bind(key)
            .fetch_one(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(got.then_some(PgLock { _conn: conn }))
    }

    /// Whether some session holds advisory lock `key`.
    pub async fn lock_held(&self, key: i64) -> Result<bool, StoreError> {
        // A bigint key shows in pg_locks as classid (high 32 bits) and objid (low), objsubid 1.
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                 AND classid::bigint = ($1 >> 32) AND objid::bigint = ($1 & 4294967295)
                 AND objsubid = 1)",
        )
        .bind(key)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(e))
    }
}
