//! What a store operation can fail with ([`StoreError`], classified once per backend) and how a
//! store is opened ([`StoreOptions`]). SQLite errors name the file; PostgreSQL errors name the
//! server and database by the redacted URL, never with its password.

use std::path::PathBuf;
use std::time::Duration;

use crate::settings::Synchronous;

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
    #[error(
        "database {path}: I/O error (check the disk, the mount, and the file's permissions and attributes such as chattr +i): {source}"
    )]
    Io {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    /// SQLITE_CORRUPT or SQLITE_NOTADB: nothing written to this file can be trusted any more.
    #[error(
        "database {path} is corrupt ({error}): timport stops and must not run on this file. Restore the latest backup of it (docs/OPERATIONS.md, \"The database file: full, corrupt, deleted\") and start again; `timport verify` then shows what the server holds"
    )]
    Corrupt {
        path: PathBuf,
        /// Not a `source`: the message above already says it, once.
        error: sqlx::Error,
    },
    /// The file at the configured path is not the one opened (deleted, or replaced by another).
    #[error(
        "database {path} {what} while timport was running; it stopped so as not to go on in a file nobody sees. Put the file back (or restore a backup) and start again"
    )]
    Gone { path: PathBuf, what: &'static str },
    /// A command that reads or changes an existing queue found none.
    #[error(
        "database {path} {what} (queue.database); check the path. Nothing was created or changed"
    )]
    NotFound { path: PathBuf, what: &'static str },
    #[error("database {path}: {source}")]
    Sql {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    /// PostgreSQL: the server could not be reached (refused, timed out, no such host).
    #[error(
        "database server {host} is unreachable ({target}): {source}; check that PostgreSQL runs there and that the host, port and network let this machine in"
    )]
    Unreachable {
        host: String,
        /// The URL, redacted.
        target: String,
        #[source]
        source: sqlx::Error,
    },
    /// PostgreSQL: the server refused the connection (authentication, no such database or role,
    /// TLS required or refused).
    #[error(
        "database {target} refused the connection: {source}; check the user, password, database name and sslmode in queue.database"
    )]
    Refused {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    /// PostgreSQL: the database takes no writes (a hot standby, `default_transaction_read_only`).
    #[error(
        "database {target} is read-only ({detail}): timport needs the primary; point queue.database at it (after a failover, at the new primary)"
    )]
    Standby { target: String, detail: String },
    /// PostgreSQL: the connection was lost, or the server is shutting down or restarting. Retried
    /// with backoff; nothing is lost (the transaction in flight rolled back).
    #[error("database {target}: connection lost ({source}); waiting for the database to come back")]
    ConnectionLost {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    /// PostgreSQL, high availability: this node's lease token is no longer the queue's (another
    /// node took over), so the database refused the write. Nothing of it was applied.
    #[error(
        "database {target}: fenced: another node holds the lease now ({detail}); this node sends nothing more"
    )]
    Fenced { target: String, detail: String },
    /// PostgreSQL, high availability: the lease has expired, but a transaction of its former
    /// holder still holds the lease row (a node frozen or cut off inside one). The server ends
    /// such a transaction once it has been idle for the holder's bound; retried at the next beat.
    #[error(
        "database {target}: the lease has expired, but a transaction of its former holder still holds it (a node frozen or cut off mid-transaction); the server ends that transaction within a few seconds and this node takes the lease then"
    )]
    LeaseBusy { target: String },
    /// A feature only one backend has (high availability: PostgreSQL).
    #[error("{what} needs the queue in PostgreSQL (queue.database = \"postgres://...\")")]
    Unsupported { what: &'static str },
    /// PostgreSQL: a migration failed.
    #[error("database {target}: migration failed: {source}")]
    PgMigrate {
        target: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// PostgreSQL: any other failure of a statement.
    #[error("database {target}: {source}")]
    Pg {
        target: String,
        #[source]
        source: sqlx::Error,
    },
}

impl StoreError {
    /// Why the database refuses writes, when that is what this error says (a full disk, a
    /// read-only or immutable file, an I/O error): a condition for the operator to fix, after
    /// which writes work again without a restart.
    pub fn write_refusal(&self) -> Option<&'static str> {
        match self {
            StoreError::DiskFull { .. } => Some("disk full"),
            StoreError::ReadOnly { .. } => Some("read-only"),
            StoreError::Io { .. } => Some("I/O error"),
            StoreError::ConnectionLost { .. } => Some("connection lost"),
            StoreError::Standby { .. } => Some("read-only (standby)"),
            _ => None,
        }
    }

    /// The file is corrupt, gone or replaced: nothing more may be done with it.
    pub fn is_fatal(&self) -> bool {
        matches!(self, StoreError::Corrupt { .. } | StoreError::Gone { .. })
    }

    /// A problem with what `queue.database` names, found on opening (missing, unreachable,
    /// refusing, read-only): the command exits 2, as for a configuration error.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            StoreError::NotFound { .. }
                | StoreError::Unreachable { .. }
                | StoreError::Refused { .. }
                | StoreError::Standby { .. }
        )
    }
}

/// How to open the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub synchronous: Synchronous,
    pub busy_timeout: Duration,
    /// Readers for status queries (the writer is always one connection).
    pub readers: u32,
    /// PostgreSQL: the most connections the pool opens (`queue.pool_size`).
    pub pg_pool_size: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            synchronous: Synchronous::Normal,
            busy_timeout: Duration::from_secs(60),
            readers: 2,
            pg_pool_size: 8,
        }
    }
}
