//! SIGKILL during the ingest of a large job file: the file ends up either fully queued once or
//! not at all, and a restarted daemon takes it up again from the spool.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rand::RngExt;

const LINES: i64 = 300_000;

fn big_job() -> String {
    let mut s = String::with_capacity(LINES as usize * 120);
    for i in 0..LINES {
        s.push_str(&line(&format!("big-{}", i % 50), "alice", T0 + i / 50, "m"));
        s.push('\n');
    }
    s
}

fn wal_len(db: &std::path::Path) -> u64 {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

async fn queued(env: &Env) -> i64 {
    db_scalar_i64(&env.store, "SELECT count(*) FROM messages").await
}

/// Whether the daemon's ingest transaction is visibly writing: on SQLite the WAL grew by 64 KiB
/// since `start_wal`; on PostgreSQL another session holds a transaction id (it wrote) while
/// inserting messages.
async fn ingest_writing(env: &Env, start_wal: u64) -> bool {
    match env.backend() {
        Backend::Sqlite => wal_len(&env.db_path()) >= start_wal + (64 << 10),
        Backend::Postgres => {
            db_scalar_i64(
                &env.store,
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND backend_xid IS NOT NULL
                   AND (query ILIKE '%messages%' OR query ILIKE '%copy%')",
            )
            .await
                > 0
        }
    }
}

/// Waits (bounded) until the daemon's ingest transaction is visibly writing, then kills it.
async fn kill_mid_ingest(env: &Env, child: &mut std::process::Child, rng: &mut impl rand::Rng) {
    let start_wal = match env.backend() {
        Backend::Sqlite => wal_len(&env.db_path()),
        Backend::Postgres => 0,
    };
    let started = Instant::now();
    while !ingest_writing(env, start_wal).await {
        if child.try_wait().unwrap().is_some() || started.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
    child.kill().unwrap();
    child.wait().unwrap();
}

db_test!(
    sigkill_mid_ingest_leaves_the_file_whole_or_absent_and_it_is_taken_again,
    multi_thread
);
async fn sigkill_mid_ingest_leaves_the_file_whole_or_absent_and_it_is_taken_again(
    backend: Backend,
) {
    let env = Env::on(backend).await;
    let config = env.write(
        "timport.toml",
        &format!(
            r#"
[tencent]
secret_key = "unused-in-this-test"
[queue]
database = "{db}"
spool_dir = "{spool}"
rescan_interval = "1h"
[import]
requests_per_second = 1
[log]
level = "warn"
[http]
listen = ""
[simulator]
enabled = true
auto_create_groups = true
"#,
            db = toml_escape(&env.db()),
            spool = path_str(&env.spool()),
        ),
    );
    env.drop_in_spool("big.ndjson", &big_job());
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_timport"))
            .args(["run", "--config", &path_str(&config)])
            .env_remove("TIMPORT_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut rng = rand::rng();
    let mut killed_before_commit = 0;
    for _ in 0..3 {
        let mut child = spawn();
        kill_mid_ingest(&env, &mut child, &mut rng).await;
        let n = queued(&env).await;
        assert!(n == 0 || n == LINES, "partially queued: {n}");
        if n == 0 {
            killed_before_commit += 1;
            assert!(
                env.spool().join("big.ndjson").is_file(),
                "an uncommitted file stays in the spool"
            );
        } else {
            break;
        }
    }
    assert!(killed_before_commit > 0, "no kill landed inside the ingest");

    // A restart takes the file again and queues it exactly once.
    let mut child = spawn();
    let started = Instant::now();
    while !env.spool().join("done/big.ndjson").is_file() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the restarted daemon did not take the file"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sigterm(&child);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM stops the daemon cleanly");
    assert_eq!(queued(&env).await, LINES);
    let jobs = db_scalar_i64(&env.store, "SELECT count(*) FROM jobs").await;
    assert_eq!(jobs, 1);
}

fn sigterm(child: &std::process::Child) {
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
}
