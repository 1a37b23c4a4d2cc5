//! Intake against a real queue database (SQLite, and PostgreSQL with
//! `TIMPORT_TEST_DATABASE_URL`): job files, the spool folder, the intake table, Random
//! assignment, and the `ingest` command's exit codes.

mod common;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;
use timport::intake::files::{FileOutcome, ingest_file};
use timport::intake::{spool, table};
use timport::store::{RandomKey, assigned_random};
use tokio_util::sync::CancellationToken;

async fn count(env: &Env, sql: &str) -> i64 {
    db_scalar(&env.store, sql).await
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

db_test!(ndjson_is_queued_with_randoms_fixed_once);
async fn ndjson_is_queued_with_randoms_fixed_once(backend: Backend) {
    let env = Env::on(backend).await;
    let mut text = String::new();
    for i in 0..20 {
        text.push_str(&line(
            if i % 2 == 0 { "g1" } else { "g2" },
            "alice",
            T0 + i,
            "x",
        ));
        text.push('\n');
    }
    // One caller-given Random, which must be kept.
    text.push_str(
        &json!({"GroupId": "g1", "TopicId": "t", "From_Account": "bob", "SendTime": T0, "Random": 42,
                "MsgBody": text_body("hi")})
        .to_string(),
    );
    text.push('\n');
    let out = queue(&env, "a.ndjson", &text).await;
    assert!(
        matches!(
            out,
            FileOutcome::Accepted {
                messages: 21,
                groups: 2,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(count(&env, "SELECT count(*) FROM messages").await, 21);
    assert_eq!(
        count(&env, "SELECT count(*) FROM lanes").await,
        3,
        "g1, g1/t, g2"
    );
    assert_eq!(
        count(
            &env,
            "SELECT random FROM messages WHERE from_account = 'bob'"
        )
        .await,
        42
    );
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM messages WHERE random_assigned = 1"
        )
        .await,
        20
    );
    let t = env.store.totals(None).await.unwrap();
    assert_eq!((t.pending, t.total), (21, 21));
    // Assigned values are the group's counter sequence, in queue order.
    let rows: Vec<(i64, String)> = db_rows(
        &env.store,
        "SELECT m.random, l.group_id FROM messages m JOIN lanes l ON l.id = m.lane_id
         WHERE random_assigned = 1 ORDER BY m.id",
    )
    .await;
    let key = env.store.random_key().unwrap();
    assert_ne!(key, &RandomKey::Legacy, "a new database draws its own key");
    let mut counters: HashMap<String, u32> = HashMap::new();
    for (r, g) in rows {
        let c = counters.entry(g.clone()).or_default();
        assert_eq!(r, i64::from(key.sequence(&g).at(*c)));
        *c += 1;
    }
}

db_test!(assigned_randoms_never_repeat_in_a_busy_group_across_files);
async fn assigned_randoms_never_repeat_in_a_busy_group_across_files(backend: Backend) {
    let env = Env::on(backend).await;
    // 30,000 messages of one group inside three minutes of SendTime, in three files, plus
    // another group interleaved.
    let mut seen_values = Vec::new();
    for f in 0..3 {
        let mut text = String::new();
        for i in 0..10_000 {
            let t = T0 + (i % 180);
            text.push_str(&line("busy", "alice", t, &format!("{f}-{i}")));
            text.push('\n');
            if i % 10 == 0 {
                text.push_str(&line("other", "bob", t, "o"));
                text.push('\n');
            }
        }
        let out = queue(&env, &format!("f{f}.ndjson"), &text).await;
        assert!(matches!(out, FileOutcome::Accepted { .. }), "{out:?}");
        let values: Vec<i64> = db_column(&env.store, "SELECT random FROM messages WHERE lane_id = (SELECT id FROM lanes WHERE group_id = 'busy')
             ORDER BY id").await;
        // Values assigned earlier never change when more arrive.
        assert_eq!(&values[..seen_values.len()], &seen_values[..]);
        seen_values = values;
    }
    assert_eq!(seen_values.len(), 30_000);
    let distinct: HashSet<i64> = seen_values.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        30_000,
        "an assigned Random repeated within the group"
    );
}

#[test]
fn assigned_random_is_a_bijection_of_the_counter() {
    let mut seen = HashSet::new();
    for c in 0..200_000u64 {
        assert!(seen.insert(assigned_random("g", c)), "repeat at {c}");
    }
}

db_test!(json_bodies_single_and_array_are_accepted);
async fn json_bodies_single_and_array_are_accepted(backend: Backend) {
    let env = Env::on(backend).await;
    let single = json!({"GroupId": "g1", "RecentContactFlag": 1, "MsgList": [
        {"From_Account": "a", "SendTime": T0, "MsgBody": text_body("1")},
        {"From_Account": "a", "SendTime": T0 + 1, "Random": 7, "MsgBody": text_body("2")}]});
    let out = queue(
        &env,
        "one.json",
        &serde_json::to_string_pretty(&single).unwrap(),
    )
    .await;
    assert!(
        matches!(
            out,
            FileOutcome::Accepted {
                messages: 2,
                groups: 1,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM messages WHERE recent_contact = 1"
        )
        .await,
        2
    );
    let many: Vec<_> = (0..3)
        .map(|g| {
            json!({"GroupId": format!("g{g}"), "TopicId": "topic", "MsgList": (0..10).map(|i| json!(
                {"From_Account": "a", "SendTime": T0 + i, "MsgBody": text_body("m")})).collect::<Vec<_>>()})
        })
        .collect();
    let out = queue(&env, "many.json", &serde_json::to_string(&many).unwrap()).await;
    assert!(
        matches!(
            out,
            FileOutcome::Accepted {
                messages: 30,
                groups: 3,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(
        count(&env, "SELECT count(*) FROM lanes WHERE topic_id = 'topic'").await,
        3
    );
}

db_test!(a_file_with_bad_messages_is_rejected_whole_with_every_problem_and_its_line);
async fn a_file_with_bad_messages_is_rejected_whole_with_every_problem_and_its_line(
    backend: Backend,
) {
    let env = Env::on(backend).await;
    let good = line("g1", "alice", T0, "ok");
    let text = [
        good.clone(),
        json!({"GroupId": "g1", "From_Account": "", "SendTime": T0, "MsgBody": text_body("x")})
            .to_string(),
        good.clone(),
        "{not json".to_string(),
        String::new(),
        json!({"GroupId": "g1", "From_Account": "a", "SendTime": 4_102_444_800_i64, "Random": -5,
               "MsgBody": [{"MsgType": "TIMImageElem", "MsgContent": {}}]})
        .to_string(),
        good,
    ]
    .join("\n");
    let out = queue(&env, "bad.ndjson", &text).await;
    let FileOutcome::Rejected {
        problem_count,
        problems,
    } = out
    else {
        panic!("expected rejection, got {out:?}");
    };
    let at: Vec<(u64, Option<u64>)> = problems.iter().map(|p| (p.line, p.message_index)).collect();
    assert_eq!(problem_count, 5, "{problems:#?}");
    assert_eq!(at[0], (2, Some(1)));
    assert!(problems[0].problem.contains("From_Account is empty"));
    assert_eq!(at[1].0, 4, "unparseable line");
    assert!(problems[2..].iter().all(|p| p.line == 6));
    let texts: Vec<&str> = problems.iter().map(|p| p.problem.as_str()).collect();
    assert!(
        texts.iter().any(|t| t.contains("not in the past")),
        "{texts:?}"
    );
    assert!(texts.iter().any(|t| t.contains("Random")), "{texts:?}");
    assert!(
        texts.iter().any(|t| t.contains("TIMImageElem")),
        "{texts:?}"
    );
    assert_eq!(
        count(&env, "SELECT count(*) FROM messages").await,
        0,
        "nothing queued"
    );
    assert_eq!(count(&env, "SELECT count(*) FROM lanes").await, 0);

    // In a pretty-printed .json file the line is the message's own line.
    let body = json!({"GroupId": "g1", "MsgList": [
        {"From_Account": "a", "SendTime": T0, "MsgBody": text_body("1")},
        {"From_Account": "a", "SendTime": "soon", "MsgBody": text_body("2")}]});
    let text = serde_json::to_string_pretty(&body).unwrap();
    // The message object starts on the line before its From_Account (keys come sorted).
    let lines: Vec<&str> = text.lines().collect();
    let soon = lines.iter().position(|l| l.contains("\"soon\"")).unwrap();
    let from = (0..soon)
        .rev()
        .find(|&i| lines[i].contains("From_Account"))
        .unwrap();
    let want_line = from as u64; // 1-based line of the "{" just above
    let out = queue(&env, "bad.json", &text).await;
    let FileOutcome::Rejected { problems, .. } = out else {
        panic!("{out:?}")
    };
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].message_index, Some(1));
    assert_eq!(problems[0].line, want_line, "{text}");
    assert!(problems[0].problem.contains("SendTime must be an integer"));
}

db_test!(empty_and_duplicate_files);
async fn empty_and_duplicate_files(backend: Backend) {
    let env = Env::on(backend).await;
    let out = queue(&env, "empty.ndjson", "\n\n").await;
    assert!(
        matches!(&out, FileOutcome::Rejected { problems, .. } if problems[0].problem.contains("no message")),
        "{out:?}"
    );
    let out = queue(&env, "empty.json", "[]").await;
    assert!(matches!(out, FileOutcome::Rejected { .. }), "{out:?}");

    let text = format!(
        "{}\n{}\n",
        line("g", "a", T0, "1"),
        line("g", "a", T0 + 1, "2")
    );
    let first = queue(&env, "a.ndjson", &text).await;
    let FileOutcome::Accepted { job_id, .. } = first else {
        panic!("{first:?}")
    };
    let again = queue(&env, "renamed.ndjson", &text).await;
    assert_eq!(again, FileOutcome::Duplicate { job_id });
    assert_eq!(count(&env, "SELECT count(*) FROM messages").await, 2);
    assert_eq!(
        count(&env, "SELECT count(*) FROM jobs").await,
        1,
        "the duplicate left no job"
    );
}

db_test!(dry_run_validates_without_a_store);
async fn dry_run_validates_without_a_store(backend: Backend) {
    let env = Env::on(backend).await;
    let p = env.write("a.ndjson", &format!("{}\n", line("g", "a", T0, "1")));
    let out = ingest_file(None, &p, true, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        out,
        FileOutcome::Valid {
            messages: 1,
            groups: 1
        }
    );
    assert_eq!(count(&env, "SELECT count(*) FROM messages").await, 0);
}

db_test!(spool_moves_files_and_rejects_what_it_must_not_follow);
async fn spool_moves_files_and_rejects_what_it_must_not_follow(backend: Backend) {
    let env = Env::on(backend).await;
    let spool = env.spool();
    env.drop_in_spool("good.ndjson", &format!("{}\n", line("g", "a", T0, "1")));
    env.drop_in_spool("bad.ndjson", "{\"GroupId\": 1}\n");
    env.drop_in_spool(".hidden.ndjson", "x");
    env.drop_in_spool("partial.ndjson.part", "x");
    env.drop_in_spool("writing.json.tmp", "x");
    // A symlink to a good file elsewhere: rejected, not followed.
    let target = env.write("target.ndjson", &format!("{}\n", line("s", "a", T0, "1")));
    std::os::unix::fs::symlink(&target, spool.join("link.ndjson")).unwrap();
    // A FIFO.
    let fifo = spool.join("pipe.ndjson");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // A directory.
    std::fs::create_dir(spool.join("dir.json")).unwrap();

    let handled = spool::scan_once(&env.store, &spool, &CancellationToken::new())
        .await
        .unwrap();
    let names: HashSet<&str> = handled.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "good.ndjson",
            "bad.ndjson",
            "link.ndjson",
            "pipe.ndjson",
            "dir.json"
        ]
        .into_iter()
        .collect()
    );
    assert!(spool.join("done/good.ndjson").is_file());
    assert_eq!(mode(&spool.join("done/good.ndjson")), 0o600);
    assert_eq!(mode(&spool.join("done")), 0o700);
    assert!(spool.join("rejected/bad.ndjson").is_file());
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(spool.join("rejected/bad.ndjson.error.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["problems"][0]["line"], 1);
    assert_eq!(mode(&spool.join("rejected/bad.ndjson.error.json")), 0o600);
    let link_report =
        std::fs::read_to_string(spool.join("rejected/link.ndjson.error.json")).unwrap();
    assert!(link_report.contains("symbolic link"), "{link_report}");
    assert!(
        std::fs::symlink_metadata(spool.join("rejected/link.ndjson"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(mode(&target), 0o644, "the link's target is untouched");
    assert!(spool.join("rejected/pipe.ndjson.error.json").is_file());
    assert!(spool.join("rejected/dir.json.error.json").is_file());
    for ignored in [".hidden.ndjson", "partial.ndjson.part", "writing.json.tmp"] {
        assert!(spool.join(ignored).exists(), "{ignored} must be left alone");
    }
    // Only the good file's message is queued; the symlinked one is not.
    assert_eq!(count(&env, "SELECT count(*) FROM messages").await, 1);
    if backend == Backend::Sqlite {
        assert_eq!(mode(&env.db_path()), 0o600);
    }

    // The same content again, under another name: recognised, moved to done/, not queued.
    env.drop_in_spool("again.ndjson", &format!("{}\n", line("g", "a", T0, "1")));
    let handled = spool::scan_once(&env.store, &spool, &CancellationToken::new())
        .await
        .unwrap();
    assert!(matches!(handled[0].outcome, FileOutcome::Duplicate { .. }));
    assert!(spool.join("done/again.ndjson").is_file());
    assert_eq!(count(&env, "SELECT count(*) FROM messages").await, 1);
}

db_test!(intake_table_rows_from_another_process_are_queued_or_rejected_with_a_reason);
async fn intake_table_rows_from_another_process_are_queued_or_rejected_with_a_reason(
    backend: Backend,
) {
    let env = Env::on(backend).await;
    let cancel = CancellationToken::new();
    let task = tokio::spawn(timport::intake::run(
        env.store.clone(),
        timport::intake::IntakeConfig {
            spool_dir: env.spool(),
            rescan_interval: Duration::from_secs(60),
            poll_interval: Duration::from_millis(100),
            settle: Duration::ZERO,
        },
        cancel.clone(),
    ));
    let body = r#"[{"MsgType":"TIMTextElem","MsgContent":{"Text":"from sql"}}]"#;
    // A SendTime of the wrong type: SQLite stores it, PostgreSQL's typed column refuses it at
    // insert, so there the row comes without one.
    let wrong_time = match backend {
        Backend::Sqlite => "'yesterday'",
        Backend::Postgres => "NULL",
    };
    sql_elsewhere(
        &env,
        &format!(
            "INSERT INTO intake(group_id, from_account, send_time, msg_body) VALUES ('g', 'a', {T0}, '{body}');
             INSERT INTO intake(group_id, topic_id, from_account, send_time, random, msg_body) VALUES ('g', 't', 'a', {}, 99, '{body}');
             INSERT INTO intake(group_id, from_account, send_time, msg_body) VALUES ('g', 'a', {wrong_time}, '{body}');
             INSERT INTO intake(group_id, send_time, msg_body) VALUES ('g', {T0}, '{body}');
             INSERT INTO intake(group_id, from_account, send_time, msg_body) VALUES ('g', 'a', {T0}, '[{{oops');",
            T0 + 1
        ),
    );
    // Bounded wait for the daemon's poll to take them (default poll is 250 ms).
    let mut pending = i64::MAX;
    for _ in 0..100 {
        pending = count(&env, "SELECT count(*) FROM intake WHERE status = 'new'").await;
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pending, 0);
    cancel.cancel();
    task.await.unwrap();
    let rows: Vec<(i64, String, Option<String>, Option<i64>)> = db_rows(
        &env.store,
        "SELECT id, status, error, message_id FROM intake ORDER BY id",
    )
    .await;
    assert_eq!(rows[0].1, "queued");
    assert!(rows[0].3.is_some());
    assert_eq!(rows[1].1, "queued");
    assert_eq!(rows[2].1, "rejected");
    assert!(
        rows[2].2.as_deref().unwrap().contains("SendTime"),
        "{rows:?}"
    );
    assert!(
        rows[3]
            .2
            .as_deref()
            .unwrap()
            .contains("From_Account is missing")
    );
    assert!(
        rows[4]
            .2
            .as_deref()
            .unwrap()
            .contains("MsgBody is not valid JSON")
    );
    assert_eq!(count(&env, "SELECT count(*) FROM messages").await, 2);
    assert_eq!(
        count(&env, "SELECT random FROM messages WHERE lane_id = (SELECT id FROM lanes WHERE topic_id = 't')").await,
        99
    );
    // Taking them again finds nothing new.
    assert_eq!(
        table::poll_once(&env.store).await.unwrap(),
        Default::default()
    );
}

fn timport(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_timport"));
    cmd.args(args).env_remove("TIMPORT_CONFIG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

db_test!(ingest_command_exit_codes_and_summary);
async fn ingest_command_exit_codes_and_summary(backend: Backend) {
    let env = Env::on(backend).await;
    let db = env.db();
    let good = env.write("good.ndjson", &format!("{}\n", line("g", "a", T0, "1")));
    let bad = env.write("bad.ndjson", "{}\n");
    let db_env = [("TIMPORT__QUEUE__DATABASE", db.as_str())];

    let out = timport(&["ingest", "--dry-run", &path_str(&good)], &db_env);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
    assert_eq!(count(&env, "SELECT count(*) FROM messages").await, 0);

    let out = timport(&["ingest", &path_str(&good), &path_str(&bad)], &db_env);
    assert_eq!(out.status.code(), Some(1), "any rejected file gives 1");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("accepted") && stdout.contains("rejected"),
        "{stdout}"
    );
    assert!(stdout.contains("GroupId is missing"), "{stdout}");

    let out = timport(&["ingest", &path_str(&good)], &db_env);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("duplicate"));
    assert_eq!(count(&env, "SELECT count(*) FROM messages").await, 1);

    let out = timport(&["status", "--json"], &db_env);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in ["pending", "in_flight", "imported", "failed", "blocked"] {
        assert!(
            v["totals"][k].is_i64(),
            "totals.{k} must be an integer: {v}"
        );
    }
    assert_eq!(v["totals"]["pending"], 1);
}

#[test]
fn configuration_errors_exit_2_naming_the_key_and_never_print_the_secret() {
    let secret = "Sup3r-secret-key-do-not-print-7f3a";
    let out = timport(
        &["status"],
        &[
            ("TIMPORT__IMPORT__BATCH_SIZE", "8"),
            ("TIMPORT__TENCENT__SECRET_KEY", secret),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("import.batch_size"), "{err}");
    assert!(!err.contains(secret));

    let out = timport(
        &["status"],
        &[
            ("TIMPORT__LOG__LEVEL", "info,[[["),
            ("TIMPORT__TENCENT__SECRET_KEY", secret),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("log.level"));

    let out = timport(&["--config", "/nonexistent/timport.toml", "status"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/timport.toml"));

    // A key of the wrong type for a secret: the error names the key, never the value.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t.toml");
    std::fs::write(&f, format!("[tencent]\nsecret_key = [\"{secret}\"]\n")).unwrap();
    let out = timport(&["--config", &path_str(&f), "status"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains(secret), "{all}");
}

// SQLite-only: a read-only file (PostgreSQL's read-only case is a standby, in the store's tests).
#[tokio::test]
async fn a_read_only_database_fails_at_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ro.db");
    {
        let s = timport::store::Store::open(&db, &Default::default())
            .await
            .unwrap();
        s.close().await;
    }
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o400)).unwrap();
    // Root ignores file modes; make the read-only condition real with SQLite's own flag instead.
    let uri_db = format!("file:{}?mode=ro", db.display());
    let _ = uri_db;
    if nix_is_root() {
        // Under root, a 0400 file is still writable; use a read-only bind of /proc instead: a
        // path inside a read-only file system.
        let e = timport::store::Store::open(
            std::path::Path::new("/proc/timport-test.db"),
            &Default::default(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("/proc/timport-test.db"), "{e}");
    } else {
        let e = timport::store::Store::open(&db, &Default::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("ro.db"), "{e}");
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

// SQLite-only: SQLite's bulk insert turns foreign keys and checks off (PostgreSQL never does).
#[tokio::test]
async fn foreign_keys_and_checks_are_enforced_again_after_a_bulk_job() {
    let env = Env::new().await;
    let out = queue(&env, "a.ndjson", &format!("{}\n", line("g", "a", T0, "1"))).await;
    assert!(matches!(out, FileOutcome::Accepted { .. }));
    // Both are off for the bulk insert; every later write is checked again.
    let mut tx = env.store.sqlite().unwrap().begin().await.unwrap();
    for (bad, refused_by) in [
        (
            "INSERT INTO messages (lane_id, job_id, source_line, from_account, send_time, random)
             VALUES (999999, 999999, 1, 'a', 1, 1)",
            "FOREIGN KEY",
        ),
        (
            "UPDATE messages SET state = 'done'",
            "CHECK constraint failed",
        ),
        (
            "UPDATE messages SET random = 4294967296",
            "CHECK constraint failed",
        ),
    ] {
        let e = sqlx::query(bad)
            .execute(&mut *tx)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(refused_by), "{bad}: {e}");
    }
    drop(tx);
    let states: Vec<(String,)> = db_rows(&env.store, "SELECT DISTINCT state FROM messages").await;
    assert_eq!(states, vec![("pending".to_string(),)]);
    let orphans: Vec<(String,)> =
        db_rows(&env.store, "SELECT \"table\" FROM pragma_foreign_key_check").await;
    assert!(orphans.is_empty(), "{orphans:?}");
}

db_test!(a_large_interleaved_job_keeps_each_lanes_file_order_and_packs_lanes_together);
async fn a_large_interleaved_job_keeps_each_lanes_file_order_and_packs_lanes_together(
    backend: Backend,
) {
    // More messages than one sorted write chunk, three groups taking turns line by line.
    let env = Env::on(backend).await;
    let groups = ["a", "b", "c"];
    let per_group = 7_000;
    let mut text = String::new();
    for i in 0..per_group {
        for g in groups {
            // Same second for runs of ten lines: queue order, not SendTime, must keep them.
            text.push_str(&line(g, "u", T0 + i / 10, &format!("{g}-{i}")));
            text.push('\n');
        }
    }
    let out = queue(&env, "big.ndjson", &text).await;
    assert!(
        matches!(out, FileOutcome::Accepted { messages, .. } if messages == 3 * per_group),
        "{out:?}"
    );
    for g in groups {
        let rows: Vec<(i64, i64, String)> = db_rows_with(
            &env.store,
            "SELECT m.id, m.source_line, b.body FROM messages m JOIN lanes l ON l.id = m.lane_id
             JOIN message_bodies b ON b.message_id = m.id
             WHERE l.group_id = $1 ORDER BY m.send_time, m.id",
            args![g],
        )
        .await;
        assert_eq!(rows.len() as i64, per_group);
        for (i, (_, source_line, body)) in rows.iter().enumerate() {
            assert!(
                body.contains(&format!("\"{g}-{i}\"")),
                "group {g}: message {i} out of file order: {body}"
            );
            if i > 0 {
                assert!(*source_line > rows[i - 1].1, "group {g}: file lines ascend");
            }
        }
        // The lane's messages sit together: at most a few runs of consecutive ids per write
        // chunk, not one id in three.
        let runs = 1 + rows.windows(2).filter(|w| w[1].0 != w[0].0 + 1).count();
        assert!(runs <= 8, "group {g}: {runs} runs of consecutive ids");
    }
}

/// One NDJSON line with a caller-given Random (and an optional topic).
fn line_with_random(group: &str, topic: Option<&str>, t: i64, random: u32, text: &str) -> String {
    let mut v = json!({"GroupId": group, "From_Account": "a", "SendTime": t, "Random": random,
                       "MsgBody": text_body(text)});
    if let Some(topic) = topic {
        v["TopicId"] = json!(topic);
    }
    v.to_string()
}

async fn randoms_of(env: &Env, group: &str) -> Vec<i64> {
    db_column_with(
        &env.store,
        "SELECT m.random FROM messages m JOIN lanes l ON l.id = m.lane_id WHERE l.group_id = $1
         ORDER BY m.id",
        args![group],
    )
    .await
}

fn problems(out: &FileOutcome) -> Vec<(u64, String)> {
    match out {
        FileOutcome::Rejected { problems, .. } => problems
            .iter()
            .map(|p| (p.line, p.problem.clone()))
            .collect(),
        other => panic!("not rejected: {other:?}"),
    }
}

db_test!(two_databases_assign_unrelated_randoms_to_the_same_group);
async fn two_databases_assign_unrelated_randoms_to_the_same_group(backend: Backend) {
    let (a, b) = (Env::on(backend).await, Env::on(backend).await);
    let mut text = String::new();
    for i in 0..5_000 {
        text.push_str(&line("shared", "alice", T0 + i / 10, &format!("{i}")));
        text.push('\n');
    }
    for env in [&a, &b] {
        assert!(matches!(
            queue(env, "same.ndjson", &text).await,
            FileOutcome::Accepted { .. }
        ));
    }
    let ra: HashSet<i64> = randoms_of(&a, "shared").await.into_iter().collect();
    let rb = randoms_of(&b, "shared").await;
    assert_eq!((ra.len(), rb.len()), (5_000, 5_000));
    // Chance alone shares about 5000^2 / 2^32 = 0.006 values.
    let shared = rb.iter().filter(|r| ra.contains(r)).count();
    assert!(shared <= 2, "{shared} Randoms shared by two databases");
    // Each key is the database's own, drawn at creation and kept across opens.
    let key = a.store.random_key().unwrap().clone();
    assert_ne!(&key, b.store.random_key().unwrap());
    a.store.close().await;
    let again = timport::store::Store::open(&a.database(), &Default::default())
        .await
        .unwrap();
    assert_eq!(again.random_key(), Some(&key));
}

// SQLite-only: an upgrade through SQLite's migrations (PostgreSQL's queue starts at the latest).
#[tokio::test]
async fn a_database_upgraded_with_assigned_randoms_keeps_its_sequence_and_skips_caller_values() {
    // A database as the previous release left it: migrations 0001-0003 only, five Randoms
    // assigned in group g, and a caller's value equal to the one at counter 7.
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old-migrations");
    std::fs::create_dir(&old).unwrap();
    for f in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite")).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if name.as_str() < "0004" {
            std::fs::copy(&f, old.join(&name)).unwrap();
        }
    }
    let db = dir.path().join("q.db");
    {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .connect_with(
                sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(&db)
                    .create_if_missing(true),
            )
            .await
            .unwrap();
        sqlx::migrate::Migrator::new(old.as_path())
            .await
            .unwrap()
            .run(&pool)
            .await
            .unwrap();
        let mut sql = String::from(
            "INSERT INTO jobs(id, kind, source, created_at) VALUES (1, 'file', 'old.ndjson', 0);
             INSERT INTO groups(group_id, random_counter) VALUES ('g', 5);
             INSERT INTO lanes(id, group_id) VALUES (1, 'g');",
        );
        for c in 0..5u64 {
            sql.push_str(&format!(
                "INSERT INTO messages(lane_id, job_id, source_line, from_account, send_time, random,
                    random_assigned, body) VALUES (1, 1, {}, 'a', {T0}, {}, 1, '[]');",
                c + 1,
                assigned_random("g", c)
            ));
        }
        sql.push_str(&format!(
            "INSERT INTO messages(lane_id, job_id, source_line, from_account, send_time, random,
                random_assigned, body) VALUES (1, 1, 6, 'a', {T0}, {}, 0, '[]');",
            assigned_random("g", 7)
        ));
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
    let store = timport::store::Store::open(&db, &Default::default())
        .await
        .unwrap();
    assert_eq!(store.random_key(), Some(&RandomKey::Legacy));
    let env = Env {
        dir,
        store,
        db: TestDb::sqlite_at(&db),
    };
    let mut text = String::new();
    for i in 0..5 {
        text.push_str(&line("g", "a", T0 + i, "new"));
        text.push('\n');
    }
    assert!(matches!(
        queue(&env, "new.ndjson", &text).await,
        FileOutcome::Accepted { .. }
    ));
    let values = randoms_of(&env, "g").await;
    let want: Vec<i64> = [5u64, 6, 8, 9, 10]
        .iter()
        .map(|c| i64::from(assigned_random("g", *c)))
        .collect();
    assert_eq!(
        &values[6..],
        &want[..],
        "counters 5, 6, then 8 on: 7 is the caller's"
    );
    let distinct: HashSet<&i64> = values.iter().collect();
    assert_eq!(distinct.len(), values.len());
    // The caller's value from before the upgrade is known: repeating it is refused.
    let again = format!(
        "{}\n",
        line_with_random("g", None, T0, assigned_random("g", 7), "x")
    );
    let p = problems(&queue(&env, "again.ndjson", &again).await);
    assert!(p[0].1.contains("job 1 (old.ndjson) line 6"), "{p:?}");
}

db_test!(a_caller_random_repeating_one_of_the_group_is_rejected_naming_both_lines);
async fn a_caller_random_repeating_one_of_the_group_is_rejected_naming_both_lines(
    backend: Backend,
) {
    let env = Env::on(backend).await;
    let first = format!(
        "{}\n{}\n",
        line_with_random("g", None, T0, 42, "first"),
        line_with_random("other", None, T0, 42, "another group may")
    );
    assert!(matches!(
        queue(&env, "a.ndjson", &first).await,
        FileOutcome::Accepted { messages: 2, .. }
    ));
    let before = count(&env, "SELECT count(*) FROM messages").await;

    // Queued before by another job, in another topic of the group.
    let text = format!(
        "{}\n{}\n",
        line("g", "a", T0 + 1, "fine"),
        line_with_random("g", Some("t"), T0 + 2, 42, "repeat")
    );
    let p = problems(&queue(&env, "b.ndjson", &text).await);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, 2, "{p:?}");
    assert!(
        p[0].1.contains("Random 42") && p[0].1.contains("job 1 (a.ndjson) line 1"),
        "{p:?}"
    );

    // Twice in one file: found while parsing (also in a dry run), both lines named.
    let text = format!(
        "{}\n{}\n{}\n",
        line_with_random("h", None, T0, 7, "one"),
        line("h", "a", T0, "between"),
        line_with_random("h", Some("t"), T0 + 1, 7, "two")
    );
    let p = problems(&queue(&env, "c.ndjson", &text).await);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, 3);
    assert!(p[0].1.contains("line 1 of this file"), "{p:?}");
    let path = env.write("c2.ndjson", &text);
    let dry = ingest_file(None, &path, true, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(problems(&dry), p);

    // A .json body: the MsgList entry's line.
    let body = json!({"GroupId": "j", "MsgList": [
        {"From_Account": "a", "SendTime": T0, "Random": 9, "MsgBody": text_body("1")},
        {"From_Account": "a", "SendTime": T0 + 1, "Random": 9, "MsgBody": text_body("2")}]});
    let p = problems(
        &queue(
            &env,
            "d.json",
            &serde_json::to_string_pretty(&body).unwrap(),
        )
        .await,
    );
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].1.contains("Random 9 repeats"), "{p:?}");

    // A value timport assigned before.
    let assigned = randoms_of(&env, "g").await;
    assert_eq!(assigned.len(), 1, "only a.ndjson's message");
    let mut text = String::new();
    for i in 0..3 {
        text.push_str(&line("g", "a", T0 + i, "assigned"));
        text.push('\n');
    }
    assert!(matches!(
        queue(&env, "e.ndjson", &text).await,
        FileOutcome::Accepted { .. }
    ));
    let taken = randoms_of(&env, "g").await[2];
    let text = format!(
        "{}\n",
        line_with_random("g", None, T0, u32::try_from(taken).unwrap(), "x")
    );
    let p = problems(&queue(&env, "f.ndjson", &text).await);
    assert!(
        p[0].1.contains("assigned to job") && p[0].1.contains("(e.ndjson) line 2"),
        "{p:?}"
    );
    // Nothing of the rejected files was queued.
    assert_eq!(
        count(&env, "SELECT count(*) FROM messages").await,
        before + 3
    );
}

db_test!(assignment_skips_the_values_callers_gave);
async fn assignment_skips_the_values_callers_gave(backend: Backend) {
    let env = Env::on(backend).await;
    let seq = env.store.random_key().unwrap().sequence("g");
    // The caller takes the values at counters 1 and 4, ahead of the assignment.
    let text = format!(
        "{}\n{}\n",
        line_with_random("g", None, T0, seq.at(1), "caller"),
        line_with_random("g", None, T0, seq.at(4), "caller")
    );
    assert!(matches!(
        queue(&env, "a.ndjson", &text).await,
        FileOutcome::Accepted { .. }
    ));
    let mut text = String::new();
    for i in 0..3 {
        text.push_str(&line("g", "a", T0 + i, "assigned"));
        text.push('\n');
    }
    // In the same file as assigned ones, ahead of them: counter 6 is taken on line 4.
    text.push_str(&line_with_random("g", None, T0, seq.at(6), "caller"));
    text.push('\n');
    for i in 0..3 {
        text.push_str(&line("g", "a", T0 + i, "assigned"));
        text.push('\n');
    }
    assert!(matches!(
        queue(&env, "b.ndjson", &text).await,
        FileOutcome::Accepted { .. }
    ));
    let values = randoms_of(&env, "g").await;
    let want: Vec<i64> = [1u32, 4, 0, 2, 3, 6, 5, 7, 8]
        .iter()
        .map(|c| i64::from(seq.at(*c)))
        .collect();
    assert_eq!(values, want);
}

db_test!(intake_rows_repeating_a_random_are_rejected_the_others_go_on);
async fn intake_rows_repeating_a_random_are_rejected_the_others_go_on(backend: Backend) {
    let env = Env::on(backend).await;
    assert!(matches!(
        queue(
            &env,
            "a.ndjson",
            &format!("{}\n", line_with_random("g", None, T0, 500, "file"))
        )
        .await,
        FileOutcome::Accepted { .. }
    ));
    let body = r#"[{"MsgType":"TIMTextElem","MsgContent":{"Text":"row"}}]"#;
    sql_elsewhere(
        &env,
        &format!(
            "INSERT INTO intake(group_id, from_account, send_time, random, msg_body) VALUES ('g', 'a', {T0}, 5, '{body}');
             INSERT INTO intake(group_id, topic_id, from_account, send_time, random, msg_body) VALUES ('g', 't', 'a', {T0}, 5, '{body}');
             INSERT INTO intake(group_id, from_account, send_time, random, msg_body) VALUES ('h', 'a', {T0}, 5, '{body}');
             INSERT INTO intake(group_id, from_account, send_time, random, msg_body) VALUES ('g', 'a', {T0}, 500, '{body}');
             INSERT INTO intake(group_id, from_account, send_time, msg_body) VALUES ('g', 'a', {T0}, '{body}');"
        ),
    );
    let out = table::poll_once(&env.store).await.unwrap();
    assert_eq!((out.queued, out.rejected), (3, 2), "{out:?}");
    let rows: Vec<(i64, String, Option<String>)> = db_rows(
        &env.store,
        "SELECT id, status, error FROM intake ORDER BY id",
    )
    .await;
    assert_eq!(rows[0].1, "queued");
    assert_eq!(rows[1].1, "rejected");
    assert!(
        rows[1].2.as_deref().unwrap().contains("intake row 1"),
        "{rows:?}"
    );
    assert_eq!(rows[2].1, "queued", "another group may use the value");
    assert_eq!(rows[3].1, "rejected");
    assert!(
        rows[3]
            .2
            .as_deref()
            .unwrap()
            .contains("job 1 (a.ndjson) line 1"),
        "{rows:?}"
    );
    assert_eq!(rows[4].1, "queued");
    let g = randoms_of(&env, "g").await;
    assert_eq!(g.len(), 3);
    assert_eq!(g.iter().collect::<HashSet<_>>().len(), 3);
    let t = env.store.totals(None).await.unwrap();
    assert_eq!(
        t.pending, 4,
        "the rejected rows left no message and no count"
    );
}

db_test!(an_intake_row_taken_by_another_process_is_not_queued_twice);
async fn an_intake_row_taken_by_another_process_is_not_queued_twice(backend: Backend) {
    let env = Env::on(backend).await;
    let body = r#"[{"MsgType":"TIMTextElem","MsgContent":{"Text":"row"}}]"#;
    sql_elsewhere(
        &env,
        &format!(
            "INSERT INTO intake(group_id, from_account, send_time, msg_body) VALUES ('g', 'a', {T0}, '{body}');
             INSERT INTO intake(group_id, from_account, send_time, msg_body) VALUES ('g', 'a', {}, '{body}');
             INSERT INTO intake(group_id, from_account, send_time, msg_body) VALUES ('g', 'a', {}, '{body}');",
            T0 + 1,
            T0 + 2
        ),
    );
    // Two takers read the same new rows; another process takes row 2 before either writes.
    let rows = env.store.new_intake_rows(100).await.unwrap();
    assert_eq!(rows.len(), 3);
    sql_elsewhere(
        &env,
        "UPDATE intake SET status = 'queued', error = 'taken elsewhere' WHERE id = 2",
    );
    let out = table::take_rows(&env.store, rows.clone()).await.unwrap();
    assert_eq!((out.queued, out.rejected, out.skipped), (2, 0, 1));
    let out = table::take_rows(&env.store, rows).await.unwrap();
    assert_eq!((out.queued, out.rejected, out.skipped), (0, 0, 3));
    assert_eq!(count(&env, "SELECT count(*) FROM messages").await, 2);
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM intake WHERE error = 'taken elsewhere'"
        )
        .await,
        1,
        "the other process's mark stands"
    );
    assert_eq!(env.store.totals(None).await.unwrap().pending, 2);
}

db_test!(repeats_are_found_and_named_across_many_lookups_in_a_large_file);
async fn repeats_are_found_and_named_across_many_lookups_in_a_large_file(backend: Backend) {
    let env = Env::on(backend).await;
    let mut first = String::new();
    for i in 0..1_000u32 {
        first.push_str(&line_with_random("big", None, T0, 10_000 + i, "first"));
        first.push('\n');
    }
    assert!(matches!(
        queue(&env, "first.ndjson", &first).await,
        FileOutcome::Accepted { messages: 1000, .. }
    ));
    // 1,000 new values, except line 777, which repeats the value of first.ndjson's line 300.
    let mut second = String::new();
    for i in 0..1_000u32 {
        let r = if i == 776 { 10_299 } else { 20_000 + i };
        second.push_str(&line_with_random("big", Some("t"), T0, r, "second"));
        second.push('\n');
    }
    let p = problems(&queue(&env, "second.ndjson", &second).await);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, 777);
    assert!(
        p[0].1.contains("Random 10299") && p[0].1.contains("(first.ndjson) line 300"),
        "{p:?}"
    );
    assert_eq!(count(&env, "SELECT count(*) FROM messages").await, 1000);
    assert_eq!(
        count(&env, "SELECT count(*) FROM caller_randoms").await,
        1000
    );
}
