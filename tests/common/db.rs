//! The queue database of one test, on either backend: a SQLite file in the test's temp folder,
//! or a fresh PostgreSQL database made on the server `TIMPORT_TEST_DATABASE_URL` names. With
//! [`db_test!`] one test function (taking the [`Backend`]) becomes two tests, `NAME::sqlite` and `NAME::postgres`; the
//! PostgreSQL one is skipped (with a line on stderr) when the variable is unset, unless
//! `TIMPORT_REQUIRE_POSTGRES=1` (CI), which makes a missing variable a failure.
//!
//! Test SQL goes through [`db_rows`], [`db_scalar`] and [`db_exec`], which run the same statement
//! on whichever pool the store has: write it portable (`$1` placeholders, `CAST(... AS BIGINT)`
//! around `sum`, i64 for every integer column).
//!
//! A PostgreSQL database is dropped when its test ends (`DROP DATABASE ... WITH (FORCE)`), and
//! left behind, named on stderr, when the test failed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::postgres::{PgArguments, PgRow};
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Postgres, Sqlite};
use timport::settings::Database;
use timport::store::Store;

/// The server URL that turns the PostgreSQL runs on.
pub const URL_VAR: &str = "TIMPORT_TEST_DATABASE_URL";
/// Set to `1` to make a missing [`URL_VAR`] a failure instead of a skip.
pub const REQUIRE_VAR: &str = "TIMPORT_REQUIRE_POSTGRES";

/// Which database a test's queue is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `Some(Postgres)` when PostgreSQL runs are on; otherwise `None` after saying on stderr
    /// that `test` is skipped, or a panic under `TIMPORT_REQUIRE_POSTGRES=1`.
    pub fn postgres_or_skip(test: &str) -> Option<Backend> {
        if server_url().is_some() {
            return Some(Backend::Postgres);
        }
        if std::env::var(REQUIRE_VAR).is_ok_and(|v| v == "1") {
            panic!("{REQUIRE_VAR}=1 but {URL_VAR} is not set: {test} cannot run on PostgreSQL");
        }
        eprintln!("skipping {test} on PostgreSQL: {URL_VAR} is not set");
        None
    }

    pub fn is_postgres(self) -> bool {
        self == Backend::Postgres
    }
}

/// The PostgreSQL server URL, when the PostgreSQL runs are on.
pub fn server_url() -> Option<String> {
    std::env::var(URL_VAR).ok().filter(|u| !u.trim().is_empty())
}

/// One test's queue database (not yet opened: [`TestDb::database`] is what the store opens, and
/// [`TestDb::config_value`] what a child's `queue.database` says).
pub struct TestDb {
    backend: Backend,
    sqlite: PathBuf,
    /// PostgreSQL: the server URL and the database's name on it.
    pg: Option<(String, String)>,
    url: String,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl TestDb {
    /// A fresh database: `dir/queue.db` on SQLite, a new database on the PostgreSQL server.
    pub async fn new(backend: Backend, dir: &Path) -> TestDb {
        TestDb::named(backend, dir, "queue").await
    }

    /// Like [`TestDb::new`], with `name` for the SQLite file (`dir/NAME.db`) and in the
    /// PostgreSQL database's name, so one test can hold several.
    pub async fn named(backend: Backend, dir: &Path, name: &str) -> TestDb {
        let sqlite = dir.join(format!("{name}.db"));
        match backend {
            Backend::Sqlite => TestDb {
                backend,
                url: sqlite.to_string_lossy().into_owned(),
                sqlite,
                pg: None,
            },
            Backend::Postgres => {
                let server = server_url().expect("TIMPORT_TEST_DATABASE_URL for a PostgreSQL test");
                let db_name = unique_name(name);
                pg_admin(&server, &format!("CREATE DATABASE \"{db_name}\"")).await;
                let url = with_database(&server, &db_name);
                TestDb {
                    backend,
                    sqlite,
                    pg: Some((server, db_name)),
                    url,
                }
            }
        }
    }

    /// A SQLite file made elsewhere (an old schema a test built by hand).
    pub fn sqlite_at(path: &Path) -> TestDb {
        TestDb {
            backend: Backend::Sqlite,
            url: path.to_string_lossy().into_owned(),
            sqlite: path.to_path_buf(),
            pg: None,
        }
    }

    /// [`TestDb::named`] for a test without a runtime of its own.
    pub fn named_blocking(backend: Backend, dir: &Path, name: &str) -> TestDb {
        let (dir, name) = (dir.to_path_buf(), name.to_string());
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(TestDb::named(backend, &dir, &name))
        })
        .join()
        .unwrap()
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The database as the store opens it.
    pub fn database(&self) -> Database {
        Database::from(self.url.clone())
    }

    /// `queue.database` for a child's configuration: the path or the URL.
    pub fn config_value(&self) -> String {
        self.url.clone()
    }

    /// The SQLite file. Panics on PostgreSQL: only SQLite-only steps use it.
    pub fn sqlite_path(&self) -> &Path {
        assert_eq!(
            self.backend,
            Backend::Sqlite,
            "this step is about the SQLite file and has no PostgreSQL meaning"
        );
        &self.sqlite
    }

    /// PostgreSQL: the database's name on the server.
    pub fn pg_name(&self) -> Option<&str> {
        self.pg.as_ref().map(|(_, n)| n.as_str())
    }

    /// An online backup of this database as it is now, while a daemon may be writing it, the
    /// way an operator's backup job takes one: SQLite's `.backup` (sqlite3 shell), or `pg_dump`
    /// (custom format) on PostgreSQL. Written into `dir`.
    pub fn backup_online(&self, dir: &Path) -> SavedCopy {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        match &self.pg {
            None => {
                let to = dir.join(format!("backup-{n}.db"));
                let out = std::process::Command::new("sqlite3")
                    .arg(&self.sqlite)
                    .arg(format!(".backup '{}'", to.display()))
                    .output()
                    .expect("sqlite3 runs");
                assert!(out.status.success(), "{out:?}");
                SavedCopy::Sqlite(to)
            }
            Some(_) => {
                let to = dir.join(format!("backup-{n}.pgdump"));
                let out = std::process::Command::new("pg_dump")
                    .args(["-Fc", "-f"])
                    .arg(&to)
                    .args(["-d", &self.url])
                    .output()
                    .expect("pg_dump runs");
                assert!(out.status.success(), "{out:?}");
                SavedCopy::Postgres(to)
            }
        }
    }

    /// Puts this database back as `saved` holds it ([`TestDb::backup_online`]); nothing may be
    /// using it. SQLite: the file replaced, the lost database's `-wal` and `-shm` removed with
    /// it. PostgreSQL: the database dropped, made again empty, and `pg_restore`d.
    pub async fn restore(&self, saved: &SavedCopy) {
        match (&self.pg, saved) {
            (None, SavedCopy::Sqlite(file)) => {
                for ext in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{ext}", self.sqlite.display()));
                }
                std::fs::copy(file, &self.sqlite).unwrap();
            }
            (Some((server, name)), SavedCopy::Postgres(dump)) => {
                pg_admin(server, &format!("DROP DATABASE \"{name}\" WITH (FORCE)")).await;
                pg_admin(server, &format!("CREATE DATABASE \"{name}\"")).await;
                let out = std::process::Command::new("pg_restore")
                    .args(["--exit-on-error", "-d", &self.url])
                    .arg(dump)
                    .output()
                    .expect("pg_restore runs");
                assert!(out.status.success(), "{out:?}");
            }
            _ => panic!("a backup of the other backend"),
        }
    }
}

/// A backup of a test database, see [`TestDb::backup_online`]: the file it was written to.
pub enum SavedCopy {
    Sqlite(PathBuf),
    Postgres(PathBuf),
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((server, name)) = self.pg.take() else {
            return;
        };
        if std::thread::panicking() {
            eprintln!("the failed test's PostgreSQL database is kept: {name}");
            return;
        }
        // Drop runs inside the test's runtime, which may not block: a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(pg_admin_try(
                &server,
                &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
            ))
        })
        .join();
    }
}

/// A `queue.database` that names no database yet: a file in `dir` on SQLite, a database name
/// nobody made on the PostgreSQL server.
pub fn missing_database(backend: Backend, dir: &Path) -> String {
    match backend {
        Backend::Sqlite => dir.join("none.db").to_string_lossy().into_owned(),
        Backend::Postgres => with_database(
            &server_url().expect("TIMPORT_TEST_DATABASE_URL for a PostgreSQL test"),
            &unique_name("none"),
        ),
    }
}

/// Whether the database a `queue.database` value names exists (the file, or the database on the
/// server).
pub async fn database_exists(value: &str) -> bool {
    match Database::from(value.to_string()) {
        Database::Postgres(url) => {
            let u = url::Url::parse(url.expose()).unwrap();
            let name = u.path().trim_start_matches('/').to_string();
            let server = with_database(url.expose(), "postgres");
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&server).await.unwrap();
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
                .bind(name)
                .fetch_one(&mut c)
                .await
                .unwrap();
            n > 0
        }
        _ => Path::new(value).exists(),
    }
}

/// `timport_t_<pid>_<nanos>_<n>_<what>`: unique on the server across concurrent test binaries.
fn unique_name(what: &str) -> String {
    let what: String = what
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(20)
        .collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "timport_t_{}_{nanos}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        what.to_ascii_lowercase()
    )
}

/// The server URL with its database replaced by `name`.
pub fn with_database(server: &str, name: &str) -> String {
    let mut u = url::Url::parse(server).expect("TIMPORT_TEST_DATABASE_URL is a URL");
    u.set_path(&format!("/{name}"));
    u.to_string()
}

/// Runs one statement on the server's own database (CREATE/DROP DATABASE), panicking on error.
pub async fn pg_admin(server: &str, sql: &str) {
    if let Err(e) = pg_admin_try(server, sql).await {
        panic!("{sql}: {e}");
    }
}

async fn pg_admin_try(server: &str, sql: &str) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(server).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut conn)
        .await?;
    conn.close().await
}

/// One bound parameter of a test statement.
#[derive(Debug, Clone)]
pub enum Arg {
    I64(i64),
    Text(String),
    OptI64(Option<i64>),
    OptText(Option<String>),
}

impl From<i64> for Arg {
    fn from(v: i64) -> Arg {
        Arg::I64(v)
    }
}
impl From<i32> for Arg {
    fn from(v: i32) -> Arg {
        Arg::I64(v.into())
    }
}
impl From<u32> for Arg {
    fn from(v: u32) -> Arg {
        Arg::I64(v.into())
    }
}
impl From<&str> for Arg {
    fn from(v: &str) -> Arg {
        Arg::Text(v.to_string())
    }
}
impl From<String> for Arg {
    fn from(v: String) -> Arg {
        Arg::Text(v)
    }
}
impl From<&String> for Arg {
    fn from(v: &String) -> Arg {
        Arg::Text(v.clone())
    }
}
impl From<Option<i64>> for Arg {
    fn from(v: Option<i64>) -> Arg {
        Arg::OptI64(v)
    }
}
impl From<Option<&str>> for Arg {
    fn from(v: Option<&str>) -> Arg {
        Arg::OptText(v.map(str::to_string))
    }
}

/// Parameters for [`db_rows_with`] and friends: `args![group, 3]`.
#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$($crate::common::Arg::from($a)),*] };
}

fn sqlite_args(args: &[Arg]) -> SqliteArguments {
    use sqlx::Arguments;
    let mut a = SqliteArguments::default();
    for arg in args {
        match arg {
            Arg::I64(v) => a.add(*v),
            Arg::Text(v) => a.add(v.clone()),
            Arg::OptI64(v) => a.add(*v),
            Arg::OptText(v) => a.add(v.clone()),
        }
        .unwrap();
    }
    a
}

fn pg_args(args: &[Arg]) -> PgArguments {
    use sqlx::Arguments;
    let mut a = PgArguments::default();
    for arg in args {
        match arg {
            Arg::I64(v) => a.add(*v),
            Arg::Text(v) => a.add(v.clone()),
            Arg::OptI64(v) => a.add(*v),
            Arg::OptText(v) => a.add(v.clone()),
        }
        .unwrap();
    }
    a
}

/// Rows of a statement with parameters, on whichever database the store has.
pub async fn db_rows_with<T>(store: &Store, sql: &str, args: Vec<Arg>) -> Vec<T>
where
    T: for<'r> sqlx::FromRow<'r, SqliteRow> + for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
{
    try_db_rows_with(store, sql, args)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Like [`db_rows_with`], the error returned.
pub async fn try_db_rows_with<T>(
    store: &Store,
    sql: &str,
    args: Vec<Arg>,
) -> Result<Vec<T>, sqlx::Error>
where
    T: for<'r> sqlx::FromRow<'r, SqliteRow> + for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
{
    let q = sqlx::AssertSqlSafe(sql.to_string());
    if let Some(pool) = store.sqlite_pool() {
        sqlx::query_as_with::<Sqlite, T, _>(q, sqlite_args(&args))
            .fetch_all(pool)
            .await
    } else {
        sqlx::query_as_with::<Postgres, T, _>(q, pg_args(&args))
            .fetch_all(store.pg_pool().expect("a store on SQLite or PostgreSQL"))
            .await
    }
}

/// Rows of a statement, on whichever database the store has.
pub async fn db_rows<T>(store: &Store, sql: &str) -> Vec<T>
where
    T: for<'r> sqlx::FromRow<'r, SqliteRow> + for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
{
    db_rows_with(store, sql, vec![]).await
}

/// The one row of a statement with parameters (exactly one).
pub async fn db_row_with<T>(store: &Store, sql: &str, args: Vec<Arg>) -> T
where
    T: for<'r> sqlx::FromRow<'r, SqliteRow> + for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
{
    let mut v = db_rows_with::<T>(store, sql, args).await;
    assert_eq!(v.len(), 1, "{sql}: expected one row");
    v.pop().unwrap()
}

/// The one row of a statement (exactly one).
pub async fn db_row<T>(store: &Store, sql: &str) -> T
where
    T: for<'r> sqlx::FromRow<'r, SqliteRow> + for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
{
    db_row_with(store, sql, vec![]).await
}

/// The first value of a statement with parameters, if it gives a row.
pub async fn db_optional_with<T>(store: &Store, sql: &str, args: Vec<Arg>) -> Option<T>
where
    T: for<'r> sqlx::Decode<'r, Sqlite>
        + sqlx::Type<Sqlite>
        + for<'r> sqlx::Decode<'r, Postgres>
        + sqlx::Type<Postgres>
        + Send
        + Unpin,
{
    db_column_with::<T>(store, sql, args)
        .await
        .into_iter()
        .next()
}

/// The first value of a statement, if it gives a row.
pub async fn db_optional<T>(store: &Store, sql: &str) -> Option<T>
where
    T: for<'r> sqlx::Decode<'r, Sqlite>
        + sqlx::Type<Sqlite>
        + for<'r> sqlx::Decode<'r, Postgres>
        + sqlx::Type<Postgres>
        + Send
        + Unpin,
{
    db_optional_with(store, sql, vec![]).await
}

/// The first column of every row of a statement with parameters.
pub async fn db_column_with<T>(store: &Store, sql: &str, args: Vec<Arg>) -> Vec<T>
where
    T: for<'r> sqlx::Decode<'r, Sqlite>
        + sqlx::Type<Sqlite>
        + for<'r> sqlx::Decode<'r, Postgres>
        + sqlx::Type<Postgres>
        + Send
        + Unpin,
{
    db_rows_with::<(T,)>(store, sql, args)
        .await
        .into_iter()
        .map(|(v,)| v)
        .collect()
}

/// The first column of every row of a statement.
pub async fn db_column<T>(store: &Store, sql: &str) -> Vec<T>
where
    T: for<'r> sqlx::Decode<'r, Sqlite>
        + sqlx::Type<Sqlite>
        + for<'r> sqlx::Decode<'r, Postgres>
        + sqlx::Type<Postgres>
        + Send
        + Unpin,
{
    db_column_with(store, sql, vec![]).await
}

/// The one value of a statement with parameters (exactly one row).
pub async fn db_scalar_with<T>(store: &Store, sql: &str, args: Vec<Arg>) -> T
where
    T: for<'r> sqlx::Decode<'r, Sqlite>
        + sqlx::Type<Sqlite>
        + for<'r> sqlx::Decode<'r, Postgres>
        + sqlx::Type<Postgres>
        + Send
        + Unpin,
{
    let mut v = db_column_with::<T>(store, sql, args).await;
    assert_eq!(v.len(), 1, "{sql}: expected one row");
    v.pop().unwrap()
}

/// The one value of a statement (exactly one row).
pub async fn db_scalar<T>(store: &Store, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, Sqlite>
        + sqlx::Type<Sqlite>
        + for<'r> sqlx::Decode<'r, Postgres>
        + sqlx::Type<Postgres>
        + Send
        + Unpin,
{
    db_scalar_with(store, sql, vec![]).await
}

/// An integer a statement gives (`count(*)`, a column; wrap a `sum` in `CAST(... AS BIGINT)`).
pub async fn db_scalar_i64(store: &Store, sql: &str) -> i64 {
    db_scalar(store, sql).await
}

/// Runs a statement with parameters; returns the rows it changed.
pub async fn db_exec_with(store: &Store, sql: &str, args: Vec<Arg>) -> u64 {
    try_db_exec_with(store, sql, args)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Like [`db_exec_with`], the error returned.
pub async fn try_db_exec_with(
    store: &Store,
    sql: &str,
    args: Vec<Arg>,
) -> Result<u64, sqlx::Error> {
    let q = sqlx::AssertSqlSafe(sql.to_string());
    if let Some(pool) = store.sqlite_pool() {
        sqlx::query_with::<Sqlite, _>(q, sqlite_args(&args))
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
    } else {
        sqlx::query_with::<Postgres, _>(q, pg_args(&args))
            .execute(store.pg_pool().expect("a store on SQLite or PostgreSQL"))
            .await
            .map(|r| r.rows_affected())
    }
}

/// Runs a statement; returns the rows it changed.
pub async fn db_exec(store: &Store, sql: &str) -> u64 {
    db_exec_with(store, sql, vec![]).await
}

/// Two tests, `NAME::sqlite` and `NAME::postgres`, that call the function `NAME(backend:
/// Backend)` written beside it: `db_test!(NAME);` for a `#[tokio::test]`, `db_test!(NAME,
/// multi_thread);` for `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`,
/// `db_test!(NAME, sync);` for a plain `#[test]` (then `NAME` is not async).
///
/// ```ignore
/// db_test!(imports_in_order);
/// async fn imports_in_order(backend: Backend) {
///     let env = Env::on(backend).await;
/// }
/// ```
#[macro_export]
macro_rules! db_test {
    ($name:ident) => {
        $crate::db_test!(@async $name, #[tokio::test]);
    };
    ($name:ident, multi_thread) => {
        $crate::db_test!(@async $name, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
    };
    ($name:ident, sync) => {
        mod $name {
            #[test]
            fn sqlite() {
                super::$name($crate::common::Backend::Sqlite)
            }

            #[test]
            fn postgres() {
                if let Some(b) = $crate::common::Backend::postgres_or_skip(concat!(
                    module_path!(),
                    "::postgres"
                )) {
                    super::$name(b)
                }
            }
        }
    };
    (@async $name:ident, #[$m:meta]) => {
        mod $name {
            #[$m]
            async fn sqlite() {
                super::$name($crate::common::Backend::Sqlite).await
            }

            #[$m]
            async fn postgres() {
                if let Some(b) = $crate::common::Backend::postgres_or_skip(concat!(
                    module_path!(),
                    "::postgres"
                )) {
                    super::$name(b).await
                }
            }
        }
    };
}
