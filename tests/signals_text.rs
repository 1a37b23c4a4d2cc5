//! Issue 12 point 6, "signals and text output": a real `timport run` child that gets SIGHUP and
//! keeps running, text logs that cannot be forged by a file name, and `timport status` grouping
//! failures by code and kind.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::time::Duration;

use common::*;
use daemon::*;

const BOUND: Duration = Duration::from_secs(60);

db_test!(
    sighup_is_logged_and_ignored_and_sigterm_still_stops_cleanly,
    multi_thread
);
async fn sighup_is_logged_and_ignored_and_sigterm_still_stops_cleanly(backend: Backend) {
    let env = Env::on(backend).await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    let sim = start_sim(cfg).await;
    let db = TestDb::named(backend, env.dir.path(), "q").await;
    let config = child_config(
        &env,
        &sim.base_url(),
        &db.config_value(),
        "requests_per_second = 500",
    );
    let log = env.dir.path().join("run.log");
    let envs = [
        ("TIMPORT__QUEUE__RESCAN_INTERVAL", "200ms"),
        ("TIMPORT__QUEUE__SPOOL_SETTLE", "100ms"),
    ];
    let mut child = spawn_with_env(&config, &log, &envs, &[], |_| {});
    wait_line(&mut child, &log, BOUND, |l| {
        l.contains("import engine started")
    })
    .await;
    signal(&child, "HUP");
    wait_line(&mut child, &log, BOUND, |l| {
        l.contains("SIGHUP received and ignored")
    })
    .await;
    signal(&child, "HUP");
    // Still at work: a file dropped now is taken and imported.
    env.drop_in_spool(
        "after-hup.ndjson",
        &format!("{}\n", line("hup", "u", T0, "still here")),
    );
    wait_line(&mut child, &log, BOUND, |l| {
        l.contains("job file accepted") && l.contains("after-hup.ndjson")
    })
    .await;
    let started = std::time::Instant::now();
    while history_texts(&sim, "hup").is_empty() {
        assert!(started.elapsed() < BOUND, "not imported after SIGHUP");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP did not stop it"
    );
    signal(&child, "TERM");
    let status = wait_exit(&mut child, BOUND).await;
    assert!(status.success(), "{status}");
    let text = log_text(&log);
    assert_eq!(
        text.matches("SIGHUP received and ignored").count(),
        2,
        "{text}"
    );
    assert!(text.contains("\"stopped\""), "{text}");
}

db_test!(
    text_logs_escape_control_characters_and_have_no_colours_off_a_terminal,
    multi_thread
);
async fn text_logs_escape_control_characters_and_have_no_colours_off_a_terminal(backend: Backend) {
    let env = Env::on(backend).await;
    let sim = start_sim(sim_config()).await;
    let db = TestDb::named(backend, env.dir.path(), "q").await;
    let config = child_config(
        &env,
        &sim.base_url(),
        &db.config_value(),
        "requests_per_second = 500",
    );
    let log = env.dir.path().join("run.log");
    let envs = [
        ("TIMPORT__QUEUE__RESCAN_INTERVAL", "200ms"),
        ("TIMPORT__QUEUE__SPOOL_SETTLE", "100ms"),
        ("TIMPORT__LOG__FORMAT", "text"),
    ];
    // A name that would start a forged line, with an escape sequence; and a body whose error
    // text quotes a control character.
    let evil = "x\n2030-01-01T00:00:00.000000Z  INFO timport: forged line \u{1b}[31mred.ndjson";
    env.drop_in_spool(evil, "{\"GroupId\": \"g\u{1b}]0;title\u{7}\"\n");
    let mut child = spawn_with_env(&config, &log, &envs, &[], |_| {});
    let rejected = wait_line(&mut child, &log, BOUND, |l| l.contains("job file rejected")).await;
    signal(&child, "TERM");
    let status = wait_exit(&mut child, BOUND).await;
    assert!(status.success(), "{status}");
    let bytes = std::fs::read(&log).unwrap();
    assert!(
        !bytes.contains(&0x1b) && !bytes.contains(&0x07),
        "no escape byte, neither colours nor the name's: {}",
        String::from_utf8_lossy(&bytes)
    );
    let text = String::from_utf8_lossy(&bytes);
    for l in text.lines() {
        assert!(!l.starts_with("2030-01-01"), "forged line: {l}");
    }
    assert!(rejected.contains("forged line"), "{rejected}");
    assert!(rejected.contains("x\\n2030"), "{rejected}");
    assert!(rejected.contains("\\u{1b}[31mred"), "{rejected}");
}

db_test!(status_groups_failures_by_code_and_kind, multi_thread);
async fn status_groups_failures_by_code_and_kind(backend: Backend) {
    let env = Env::on(backend).await;
    // The group was created after every message's SendTime: each fails with a 10004 whose text
    // names its own SendTime.
    const N: i64 = 60;
    let mut cfg = sim_config();
    cfg.groups = vec![("late".into(), Some(T0 + 10_000))];
    let sim = start_sim(cfg).await;
    let text: String = (0..N)
        .map(|i| line("late", "u", T0 + i, &format!("m{i}")) + "\n")
        .collect();
    queue(&env, "late.ndjson", &text).await;
    let client = client_for(&sim, 500);
    run_until_idle(&env.store, client, engine_config())
        .await
        .unwrap();
    let distinct: i64 = db_scalar(
        &env.store,
        "SELECT count(DISTINCT result_text) FROM messages WHERE state = 'failed'",
    )
    .await;
    assert_eq!(distinct, N, "every failure text is different");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_timport"))
        .args(["status"])
        .env_remove("TIMPORT_CONFIG")
        .env("TIMPORT__QUEUE__DATABASE", env.db())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reasons: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("most common failure reasons"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert_eq!(reasons.len(), 2, "one kind and one example: {stdout}");
    assert!(
        reasons[0].contains("10004") && reasons[0].contains(&format!("x{N}")),
        "{stdout}"
    );
    assert!(reasons[0].contains("SendTime N"), "{stdout}");
    assert!(
        reasons[1].contains("e.g.") && reasons[1].contains(&T0.to_string()[..6]),
        "{stdout}"
    );

    let json = std::process::Command::new(env!("CARGO_BIN_EXE_timport"))
        .args(["status", "--json"])
        .env_remove("TIMPORT_CONFIG")
        .env("TIMPORT__QUEUE__DATABASE", env.db())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let f = &v["failure_reasons"];
    assert_eq!(f.as_array().unwrap().len(), 1, "{f}");
    assert_eq!(f[0]["code"], 10004);
    assert_eq!(f[0]["messages"], N);
    assert!(
        f[0]["example"].as_str().unwrap().contains("SendTime 1"),
        "{f}"
    );
    sim.shutdown().await;
}

db_test!(
    status_gives_no_eta_while_everything_left_is_blocked,
    multi_thread
);
async fn status_gives_no_eta_while_everything_left_is_blocked(backend: Backend) {
    let env = Env::on(backend).await;
    // A group the server does not know: its lane blocks (10010) with every message still to go.
    let text: String = (0..20)
        .map(|i| line("missing", "u", T0 + i, &format!("m{i}")) + "\n")
        .collect();
    queue(&env, "missing.ndjson", &text).await;
    let sim = start_sim(sim_config()).await;
    run_until_idle(&env.store, client_for(&sim, 500), engine_config())
        .await
        .unwrap();
    let status = |json: bool| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_timport"));
        c.arg("status");
        if json {
            c.arg("--json");
        }
        c.env_remove("TIMPORT_CONFIG")
            .env("TIMPORT__QUEUE__DATABASE", env.db())
            .output()
            .unwrap()
    };
    let out = status(false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(!stdout.contains("nothing left to import"), "{stdout}");
    assert!(!stdout.contains("ETA "), "{stdout}");
    assert!(
        stdout.contains("stalled, no ETA") && stdout.contains("blocked lane"),
        "{stdout}"
    );
    let v: serde_json::Value = serde_json::from_slice(&status(true).stdout).unwrap();
    assert!(v["eta_seconds"].is_null(), "{v}");
    assert!(v["stalled"].as_str().unwrap().contains("blocked"), "{v}");
    sim.shutdown().await;
}
