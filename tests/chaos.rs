//! Chaos: a real `timport run` child process killed with SIGKILL at random moments while the
//! simulator loses answers after applying them, answers 502, resets connections and answers 10002,
//! with a Random dedup window of only 2 s. Afterwards `--until-idle` must leave the simulator's
//! history equal to the queued messages exactly: none missing, none twice, order kept, and each
//! message with the one Random it was given when queued.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use rand::RngExt;

const GROUPS: usize = 16;
const PER_GROUP: i64 = 300;

fn job() -> String {
    let mut s = String::new();
    for i in 0..PER_GROUP {
        for g in 0..GROUPS {
            // Some seconds are shared; every 25th message brings its own Random.
            let t = T0 + i - i / 4;
            let mut v: serde_json::Value = serde_json::from_str(&line(
                &format!("chaos-{g:02}"),
                if i % 2 == 0 { "alice" } else { "bob" },
                t,
                &format!("{g}-{i}"),
            ))
            .unwrap();
            if i % 25 == 0 {
                v["Random"] = serde_json::json!(1_000_000 + i * 100 + g as i64);
            }
            s.push_str(&v.to_string());
            s.push('\n');
        }
    }
    s
}

db_test!(
    sigkill_at_random_moments_loses_and_duplicates_nothing,
    multi_thread
);
async fn sigkill_at_random_moments_loses_and_duplicates_nothing(backend: Backend) {
    let env = Env::on(backend).await;
    let sim = start_sim(chaos_sim_config()).await;
    // In the spool, so a daemon killed before the ingest committed takes it again next start.
    env.drop_in_spool("chaos.ndjson", &job());
    let config = child_config(
        &env,
        &sim.base_url(),
        &env.db(),
        "max_lanes = 16\nmax_attempts = 1000",
    );
    let log = std::fs::File::create(env.dir.path().join("daemon.log")).unwrap();
    let spawn = |extra: &[&str]| spawn_run(&config, &log, extra);
    // The store handle of this test must not hold the daemon's lock; it only reads.
    let mut rng = rand::rng();
    let mut kills = 0;
    while kills < 6 {
        let mut child = spawn(&[]);
        let wait_ms = rng.random_range(300..1200);
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    let t = env.store.totals(None).await.unwrap();
    assert!(
        t.total == 0 || t.total == GROUPS as i64 * PER_GROUP,
        "the job is queued whole or not at all"
    );
    assert!(
        t.imported < GROUPS as i64 * PER_GROUP,
        "the kills landed before the end of the import"
    );

    // Faults stay on; the dedup window has long closed for the early attempts.
    let mut child = spawn(&["--until-idle"]);
    let status = wait_exit(&mut child, Duration::from_secs(300)).await;
    let log_text = std::fs::read_to_string(env.dir.path().join("daemon.log")).unwrap();
    let failed: Vec<(i64, Option<i64>, Option<String>)> = db_rows(
        &env.store,
        "SELECT id, result_code, result_text FROM messages WHERE state = 'failed' LIMIT 10",
    )
    .await;
    let blocked = env.store.blocked_lanes(10).await.unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "all imported; failed {failed:?}; blocked {blocked:?}; log:\n{}",
        tail(&log_text)
    );

    let state = sim.state();
    let faults_seen: HashSet<&str> = state
        .requests
        .iter()
        .filter_map(|r| r.fault.as_deref())
        .collect();
    for f in [
        "http_502",
        "reset_before",
        "drop_response_after_apply",
        "error_10002",
    ] {
        assert!(
            faults_seen.contains(f),
            "fault {f} never happened: {faults_seen:?}"
        );
    }
    for g in 0..GROUPS {
        assert_group_history_is_the_queue(
            &env,
            &state,
            &format!("chaos-{g:02}"),
            PER_GROUP as usize,
        )
        .await;
    }
    let t = env.store.totals(None).await.unwrap();
    assert_eq!(
        t.total,
        GROUPS as i64 * PER_GROUP,
        "the job was queued once"
    );
    assert_eq!(
        (t.imported, t.failed, t.pending, t.in_flight),
        (t.total, 0, 0, 0)
    );
    assert!(env.spool().join("done/chaos.ndjson").is_file());
    eprintln!(
        "chaos: {kills} SIGKILLs, {} requests, faults {:?}",
        state.requests.len(),
        faults_seen
    );
    sim.shutdown().await;
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
