//! Shared test helpers: a real queue database (a SQLite file in a temp folder, or a fresh
//! PostgreSQL database, see [`db`]), the simulator on a loopback port, a real client, and job
//! files written to disk.
#![allow(dead_code)]

pub mod db;
pub use db::*;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use serde_json::{Value, json};
use tempfile::TempDir;
use timport::engine::{self, EngineConfig, EngineExit};
use timport::pacing::Pacer;
use timport::settings::TiePolicy;
use timport::simulator::{self, SimConfig, SimHandle};
use timport::store::{Store, StoreOptions};
use timport::tencent::{ClientConfig, Region, TencentClient};
use tokio_util::sync::CancellationToken;

pub const APP: u64 = 1_400_000_000;
pub const ADMIN: &str = "administrator";
pub const KEY: &str = "test-secret-key-5bd2850fff3ecb11";
/// A SendTime base comfortably in the past.
pub const T0: i64 = 1_700_000_000;

pub struct Env {
    pub dir: TempDir,
    pub store: Store,
    /// The queue database; declared after `store`, so the store's pools close before a
    /// PostgreSQL database is dropped.
    pub db: TestDb,
}

impl Env {
    /// A fresh queue on SQLite (a file in the temp folder).
    pub async fn new() -> Env {
        Env::on(Backend::Sqlite).await
    }

    /// A fresh queue on `backend`.
    pub async fn on(backend: Backend) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path()).await;
        let store = Store::open(&db.database(), &StoreOptions::default())
            .await
            .unwrap();
        Env { dir, store, db }
    }

    pub fn backend(&self) -> Backend {
        self.db.backend()
    }

    /// The SQLite file (only for SQLite-only tests: it panics on PostgreSQL).
    pub fn db_path(&self) -> PathBuf {
        self.db.sqlite_path().to_path_buf()
    }

    /// The queue database as `queue.database` takes it: the SQLite path or the PostgreSQL URL.
    pub fn db(&self) -> String {
        self.db.config_value()
    }

    /// The queue database as the store opens it.
    pub fn database(&self) -> timport::settings::Database {
        self.db.database()
    }

    pub fn spool(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    /// Writes a file next to the spool (not in it).
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Drops a file into the spool the way producers should: write elsewhere, rename in.
    pub fn drop_in_spool(&self, name: &str, text: &str) -> PathBuf {
        std::fs::create_dir_all(self.spool()).unwrap();
        let tmp = self.dir.path().join(format!(".{name}.writing"));
        std::fs::write(&tmp, text).unwrap();
        let to = self.spool().join(name);
        std::fs::rename(&tmp, &to).unwrap();
        to
    }
}

/// Runs SQL statements in another process, the way other programs reach the queue: the
/// sqlite3 shell (or Python's sqlite3 module where the shell is missing) on SQLite, psql on
/// PostgreSQL. Panics when they fail.
pub fn sql_elsewhere(env: &Env, sql: &str) {
    let out = match env.backend() {
        Backend::Sqlite => {
            let db = env.db_path();
            match std::process::Command::new("sqlite3").arg(&db).arg(sql).output() {
                Ok(out) => out,
                Err(_) => std::process::Command::new("python3")
                    .args([
                        "-c",
                        "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.executescript(sys.argv[2]); c.commit()",
                    ])
                    .arg(&db)
                    .arg(sql)
                    .output()
                    .expect("neither the sqlite3 shell nor python3 is available"),
            }
        }
        Backend::Postgres => std::process::Command::new("psql")
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &env.db(),
                "-c",
                sql,
            ])
            .output()
            .expect("psql is not available"),
    };
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One NDJSON line.
pub fn line(group: &str, from: &str, t: i64, text: &str) -> String {
    json!({"GroupId": group, "From_Account": from, "SendTime": t,
           "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": text}}]})
    .to_string()
}

pub fn text_body(text: &str) -> Value {
    json!([{"MsgType": "TIMTextElem", "MsgContent": {"Text": text}}])
}

pub fn sim_config() -> SimConfig {
    SimConfig::new(APP, ADMIN, SecretString::from(KEY.to_string()))
}

/// The chaos scenario's server: groups made on first use, a 2 s dedup window, and every fault
/// that leaves an outcome unknown (502, resets before, answers lost after applying, 10002).
pub fn chaos_sim_config() -> SimConfig {
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    cfg.dedup_window = Duration::from_secs(2);
    cfg.faults = timport::simulator::Faults {
        latency: Duration::from_millis(3),
        p_http_502: 0.04,
        p_reset_before: 0.04,
        p_drop_response_after_apply: 0.08,
        p_error_10002: 0.04,
        p_rate_limit: 0.0,
        ..timport::simulator::Faults::default()
    };
    cfg
}

pub async fn start_sim(cfg: SimConfig) -> SimHandle {
    simulator::start(cfg).await.unwrap()
}

pub fn client_for(sim: &SimHandle, rps: u32) -> TencentClient {
    let cfg = ClientConfig {
        sdkappid: APP,
        identifier: ADMIN.into(),
        secret_key: SecretString::from(KEY.to_string()),
        base_url: Some(sim.base_url()),
        region: Region::Singapore,
        request_timeout: Duration::from_secs(5),
        usersig_validity: Duration::from_secs(86_400),
    };
    TencentClient::new(cfg, Some(Arc::new(Pacer::new(rps)))).unwrap()
}

pub fn engine_config() -> EngineConfig {
    EngineConfig {
        batch_size: 7,
        max_lanes: 16,
        max_attempts: 5,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        tie_policy: TiePolicy::Fail,
        shutdown_grace: Duration::from_secs(5),
        progress_interval: Duration::from_secs(60),
        commit_window: Duration::from_millis(10),
        until_idle: true,
        // Library tests assume the accounts exist; tests/accounts.rs turns this on.
        accounts: false,
        account_rps: 100,
    }
}

/// Runs the engine with `--until-idle` semantics and returns how it ended.
pub async fn run_until_idle(
    store: &Store,
    client: TencentClient,
    cfg: EngineConfig,
) -> Result<EngineExit, engine::EngineError> {
    let cfg = EngineConfig {
        until_idle: true,
        ..cfg
    };
    tokio::time::timeout(
        Duration::from_secs(120),
        engine::run(store.clone(), client, cfg, CancellationToken::new(), || {}),
    )
    .await
    .expect("engine did not become idle within the bound")
}

/// Queues NDJSON text as a job file through the real intake.
pub async fn queue(env: &Env, name: &str, text: &str) -> timport::intake::files::FileOutcome {
    let p = env.write(name, text);
    timport::intake::files::ingest_file(Some(&env.store), &p, true, &CancellationToken::new())
        .await
        .unwrap()
}

pub fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A string as it may stand between a TOML basic string's quotes.
pub fn toml_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Engine settings for a daemon that runs until stopped.
pub fn engine_config_daemon() -> EngineConfig {
    EngineConfig {
        until_idle: false,
        ..engine_config()
    }
}

/// A running engine in daemon mode (until stopped), with the token that stops it.
pub struct Daemon {
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<EngineExit, engine::EngineError>>,
}

impl Daemon {
    pub fn start(store: &Store, client: TencentClient) -> Daemon {
        let stop = CancellationToken::new();
        let task = tokio::spawn(engine::run(
            store.clone(),
            client,
            engine_config_daemon(),
            stop.clone(),
            || {},
        ));
        Daemon { stop, task }
    }

    /// Stops it and returns how it ended.
    pub async fn stop(self) -> EngineExit {
        self.stop.cancel();
        self.task.await.unwrap().unwrap()
    }
}

/// A `timport run` configuration for child-process tests, written into `env`: the simulator at
/// `base_url`, the database `db`, `env.spool()`, quick backoffs, JSON logs at info, no HTTP
/// listener. `import` adds lines to `[import]`. `db` is `queue.database`: a path or a URL
/// ([`Env::db`]).
pub fn child_config(
    env: &Env,
    base_url: &str,
    db: &(impl AsRef<std::ffi::OsStr> + ?Sized),
    import: &str,
) -> PathBuf {
    env.write(
        "timport.toml",
        &format!(
            r#"
[tencent]
sdkappid = {APP}
identifier = "{ADMIN}"
secret_key = "{KEY}"
base_url = "{base_url}"
request_timeout = "4s"
[queue]
database = "{db}"
spool_dir = "{spool}"
[import]
{import}
backoff_base = "20ms"
backoff_max = "300ms"
shutdown_grace = "2s"
[log]
format = "json"
level = "info"
[http]
listen = ""
"#,
            db = toml_escape(&db.as_ref().to_string_lossy()),
            spool = path_str(&env.spool()),
        ),
    )
}

/// Starts `timport run --config CONFIG EXTRA...` as a child process, its log appended to `log`.
pub fn spawn_run(config: &Path, log: &std::fs::File, extra: &[&str]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_timport"))
        .args(["run", "--config", &path_str(config)])
        .args(extra)
        .env_remove("TIMPORT_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(log.try_clone().unwrap()))
        .spawn()
        .unwrap()
}

/// Waits for a child process to exit, polling; panics past `bound`.
pub async fn wait_exit(
    child: &mut std::process::Child,
    bound: Duration,
) -> std::process::ExitStatus {
    let started = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            started.elapsed() < bound,
            "the child did not exit within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A group's history on the simulator as (From_Account, SendTime, first element's Text).
pub fn history_texts(sim: &SimHandle, group: &str) -> Vec<(String, i64, String)> {
    sim.state()
        .group(group)
        .map(|g| {
            g.messages
                .iter()
                .map(|m| {
                    (
                        m.from_account.clone(),
                        m.send_time,
                        m.msg_body[0]["MsgContent"]["Text"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The simulator's history of `group` is the queue's messages of that group, exactly: the same
/// senders, times, Randoms and bodies, in the same order, none missing and none twice; and
/// there are `expected` of them.
pub async fn assert_group_history_is_the_queue(
    env: &Env,
    state: &timport::simulator::SimSnapshot,
    group: &str,
    expected: usize,
) {
    let rows: Vec<(String, i64, i64, String)> = db_rows_with(
        &env.store,
        "SELECT m.from_account, m.send_time, m.random, b.body FROM messages m
         JOIN message_bodies b ON b.message_id = m.id
         JOIN lanes l ON l.id = m.lane_id WHERE l.group_id = $1 ORDER BY m.send_time, m.id",
        vec![Arg::from(group)],
    )
    .await;
    let want: Vec<(String, i64, u32, String)> = rows
        .into_iter()
        .map(|(f, t, r, b)| (f, t, u32::try_from(r).unwrap(), b))
        .collect();
    let got: Vec<(String, i64, u32, String)> = state
        .group(group)
        .map(|g| {
            g.messages
                .iter()
                .map(|m| {
                    (
                        m.from_account.clone(),
                        m.send_time,
                        m.random,
                        m.msg_body.to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        (got.len(), want.len()),
        (expected, expected),
        "group {group}: none missing, none twice (server, queue)"
    );
    assert_eq!(
        got, want,
        "group {group}: same messages, same order, same Random"
    );
}
