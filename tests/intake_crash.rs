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
    sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(env.store.sqlite_pool().unwrap())
        .await
        .unwrap()
}

/// Waits (bounded) until the daemon's ingest transaction is visibly writing, then kills it.
async fn kill_mid_ingest(env: &Env, child: &mut std::process::Child, rng: &mut impl rand::Rng) {
    let start_wal = wal_len(&env.db_path());
    let started = Instant::now();
    while wal_len(&env.db_path()) < start_wal + (64 << 10) {
        if child.try_wait().unwrap().is_some() || started.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_ingest_leaves_the_file_whole_or_absent_and_it_is_taken_again() {
    let env = Env::new().await;
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
            db = path_str(&env.db_path()),
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
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(env.store.sqlite_pool().unwrap())
        .await
        .unwrap();
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
