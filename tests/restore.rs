//! A queue database put back to an older copy: a backup taken online while a real `timport run`
//! imports (SQLite's `.backup`; on PostgreSQL, with `TIMPORT_TEST_DATABASE_URL`, `pg_dump`, put
//! back with `pg_restore` into the database made again), the import going on past it (a second job file dropped in), a
//! SIGKILL, the copy restored, the second job file dropped in again, and the server's Random
//! dedup window let pass. The daemon must recognise what the server already holds (catch-up)
//! instead of sending it again: afterwards the simulator's history equals the expected messages
//! exactly, none missing and none twice, in order, with a server that takes equal SendTimes (so
//! only the catch-up stands between a re-sent message and a duplicate).

mod common;

use std::time::{Duration, Instant};

use common::*;
use timport::store::{Store, StoreOptions};

const GROUPS: usize = 4;

/// (group, From_Account, SendTime, text) in queue order; seconds are shared by pairs.
fn messages(job: &str, first: i64, per_group: i64) -> Vec<(String, String, i64, String)> {
    let mut out = Vec::new();
    for i in 0..per_group {
        for g in 0..GROUPS {
            out.push((
                format!("restore-{g}"),
                if i % 3 == 0 { "alice" } else { "bob" }.to_string(),
                T0 + first + i / 2,
                format!("{job} {g}-{i}"),
            ));
        }
    }
    out
}

fn ndjson(msgs: &[(String, String, i64, String)]) -> String {
    msgs.iter()
        .map(|(g, f, t, text)| line(g, f, *t, text) + "\n")
        .collect()
}

fn imported_on(sim: &timport::simulator::SimHandle) -> usize {
    sim.state().groups.iter().map(|g| g.messages.len()).sum()
}

db_test!(a_restored_older_database_sends_nothing_twice, multi_thread);
async fn a_restored_older_database_sends_nothing_twice(backend: Backend) {
    let env = Env::on(backend).await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    cfg.dedup_window = Duration::from_secs(2);
    cfg.faults.latency = Duration::from_millis(5);
    let sim = start_sim(cfg).await;
    // The daemon's own database, beside the one `env.store` holds open.
    let db = TestDb::named(backend, env.dir.path(), "q").await;
    let config = child_config(
        &env,
        &sim.base_url(),
        &db.config_value(),
        "requests_per_second = 40\nmax_lanes = 8",
    );
    let log = std::fs::File::create(env.dir.path().join("daemon.log")).unwrap();
    let spawn = |extra: &[&str]| spawn_run(&config, &log, extra);
    let wait_for = |what: &str, want: usize| {
        let what = what.to_string();
        let sim = &sim;
        async move {
            let started = Instant::now();
            while imported_on(sim) < want {
                assert!(
                    started.elapsed() < Duration::from_secs(120),
                    "{what}: {} of {want} on the server",
                    imported_on(sim)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let a = messages("a", 0, 100);
    let b = messages("b", 1000, 50);
    env.drop_in_spool("a.ndjson", &ndjson(&a));
    let mut child = spawn(&[]);
    wait_for("before the copy", 120).await;
    // An online backup of the live database, as an operator's backup job takes it.
    let copy = db.backup_online(env.dir.path());
    let at_copy = imported_on(&sim);
    // The import goes on past the copy, and a second job file comes in.
    env.drop_in_spool("b.ndjson", &ndjson(&b));
    wait_for("after the copy", a.len() + 60).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before_restore = imported_on(&sim);
    assert!(
        before_restore > at_copy + 100,
        "the server got well ahead of the copy ({at_copy} -> {before_restore})"
    );
    // The copy put back (on SQLite the -wal and -shm of the lost database go with it), and the
    // second file dropped in again: the restored queue has never seen it.
    db.restore(&copy).await;
    env.drop_in_spool("b.ndjson", &ndjson(&b));
    // Past the server's dedup window: only reconciliation can prevent duplicates now.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut child = spawn(&["--until-idle"]);
    let status = wait_exit(&mut child, Duration::from_secs(180)).await;
    let log_text = std::fs::read_to_string(env.dir.path().join("daemon.log")).unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "all imported; log tail:\n{}",
        log_text
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        log_text.contains("caught up with the server before sending"),
        "the catch-up ran"
    );
    for g in 0..GROUPS {
        let group = format!("restore-{g}");
        let want: Vec<(String, i64, String)> = a
            .iter()
            .chain(&b)
            .filter(|m| m.0 == group)
            .map(|(_, f, t, text)| (f.clone(), *t, text.clone()))
            .collect();
        let got = history_texts(&sim, &group);
        assert_eq!(
            got.len(),
            want.len(),
            "group {group}: none missing, none twice"
        );
        assert_eq!(
            got, want,
            "group {group}: exactly the expected messages, in order"
        );
    }
    let store = Store::open_read_only(&db.database(), &StoreOptions::default())
        .await
        .unwrap();
    let t = store.totals(None).await.unwrap();
    assert_eq!(t.total as usize, a.len() + b.len(), "each job queued once");
    assert_eq!((t.imported, t.failed), (t.total, 0));
    sim.shutdown().await;
}
