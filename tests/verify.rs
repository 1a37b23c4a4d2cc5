//! `timport verify` on real child processes against the simulator: after an import under faults
//! every message is verified; messages the server loses, alters, duplicates or turns into holes
//! are reported exactly, in their classes, with exit 1; a verify killed with SIGKILL resumes to
//! the same totals (and one stopped by SIGTERM too); its requests stay within its rate; beside a
//! running daemon, whether it started first or second, the two together stay within the
//! import's rate; and bodies dropped by `queue.keep_bodies` are still compared, by digest.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rand::RngExt;
use serde_json::{Value, json};
use timport::simulator::{RequestRecord, SimHandle};

/// The config of `child_config` with a `[verify]` section.
fn config_with_verify(env: &Env, sim: &SimHandle, import: &str, verify_rate: u32) -> PathBuf {
    let p = child_config(env, &sim.base_url(), &env.db(), import);
    let mut text = std::fs::read_to_string(&p).unwrap();
    text.push_str(&format!(
        "\n[verify]\nrequests_per_second = {verify_rate}\n"
    ));
    std::fs::write(&p, text).unwrap();
    p
}

fn verify_command(config: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_timport"));
    c.args(["verify", "--config", &path_str(config)])
        .args(extra)
        .env_remove("TIMPORT_CONFIG");
    c
}

/// Runs `timport verify --json EXTRA` to its end: exit code, the JSON report, stderr.
async fn verify_json(config: &Path, extra: &[&str]) -> (Option<i32>, Value, String) {
    let mut c = verify_command(config, extra);
    c.arg("--json");
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {}\nstderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.code(), report, stderr)
}

fn totals(report: &Value) -> [i64; 6] {
    let t = &report["totals"];
    [
        "verified",
        "missing",
        "altered",
        "duplicated",
        "unverifiable",
        "foreign",
    ]
    .map(|k| {
        t[k].as_i64()
            .unwrap_or_else(|| panic!("totals.{k} is an integer: {t}"))
    })
}

/// Imports `text` with `timport run --until-idle` (the file given with --ingest).
async fn import(env: &Env, config: &Path, name: &str, text: &str) {
    let file = env.write(name, text);
    let log = std::fs::File::create(env.dir.path().join(format!("{name}.log"))).unwrap();
    let mut child = spawn_run(
        config,
        &log,
        &["--until-idle", "--ingest", &path_str(&file)],
    );
    let status = wait_exit(&mut child, Duration::from_secs(240)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "import: {}",
        std::fs::read_to_string(env.dir.path().join(format!("{name}.log"))).unwrap()
    );
}

/// `timport run --until-idle` with nothing new to import.
async fn run_idle(env: &Env, config: &Path) {
    let log = std::fs::File::create(env.dir.path().join("idle.log")).unwrap();
    let mut child = spawn_run(config, &log, &["--until-idle"]);
    let status = wait_exit(&mut child, Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(0));
}

fn lines(group: &str, topic: Option<&str>, n: i64, t0: i64) -> String {
    let mut s = String::new();
    for i in 0..n {
        let mut v: Value = serde_json::from_str(&line(
            group,
            if i % 2 == 0 { "alice" } else { "bob" },
            t0 + i / 3,
            &format!("{group} {i}"),
        ))
        .unwrap();
        if let Some(t) = topic {
            v["TopicId"] = json!(t);
        }
        s.push_str(&v.to_string());
        s.push('\n');
    }
    s
}

/// Arrival times on the server jitter (the machine is shared, the simulator runs on the test's
/// own threads): a request started on time may arrive up to this much late, bunching with the
/// next ones. Windows this much shorter than the pacer's second are counted.
const JITTER_MS: i64 = 100;

/// The most requests that arrived inside any window of one second less [`JITTER_MS`] (sliding),
/// of those matching `keep`: at most the rate, since the pacer starts at most that many in any
/// second.
fn busiest_second(requests: &[RequestRecord], keep: impl Fn(&RequestRecord) -> bool) -> usize {
    let times: Vec<i64> = requests
        .iter()
        .filter(|r| keep(r))
        .map(|r| r.at_ms)
        .collect();
    let mut best = 0;
    let mut from = 0;
    for (i, t) in times.iter().enumerate() {
        while times[from] + 1000 - JITTER_MS <= *t {
            from += 1;
        }
        best = best.max(i + 1 - from);
    }
    best
}

fn is_read(r: &RequestRecord) -> bool {
    matches!(
        r.endpoint.as_str(),
        "group_msg_get_simple" | "get_group_info"
    )
}

db_test!(
    after_an_import_under_faults_every_message_is_verified,
    multi_thread
);
async fn after_an_import_under_faults_every_message_is_verified(backend: Backend) {
    const GROUPS: usize = 6;
    const PER_GROUP: i64 = 120;
    let env = Env::on(backend).await;
    let sim = start_sim(chaos_sim_config()).await;
    let mut job = String::new();
    for g in 0..GROUPS {
        job.push_str(&lines(&format!("vchaos-{g}"), None, PER_GROUP, T0));
    }
    env.drop_in_spool("chaos.ndjson", &job);
    let config = config_with_verify(&env, &sim, "max_lanes = 8\nmax_attempts = 1000", 100);
    let log = std::fs::File::create(env.dir.path().join("daemon.log")).unwrap();
    // The chaos scenario, smaller: SIGKILLs at random moments, then to the end.
    let mut rng = rand::rng();
    for _ in 0..3 {
        let mut child = spawn_run(&config, &log, &[]);
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..900))).await;
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let mut child = spawn_run(&config, &log, &["--until-idle"]);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(300)).await.code(),
        Some(0)
    );
    let total = GROUPS as i64 * PER_GROUP;
    // The faults stay on: verify reads through them.
    let (code, report, stderr) = verify_json(&config, &[]).await;
    assert_eq!(
        totals(&report),
        [total, 0, 0, 0, 0, 0],
        "{report}\n{stderr}"
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(report["complete"], json!(true));
    assert_eq!(report["problems"], json!([]));
    let faults: BTreeSet<String> = sim
        .state()
        .requests
        .iter()
        .filter(|r| r.endpoint == "group_msg_get_simple")
        .filter_map(|r| r.fault.clone())
        .collect();
    assert!(!faults.is_empty(), "verify met faults too");
    // status shows the verified counts per group.
    let out = Command::new(env!("CARGO_BIN_EXE_timport"))
        .args(["status", "--config", &path_str(&config), "--json"])
        .env_remove("TIMPORT_CONFIG")
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let per_group = status["verification"].as_array().unwrap();
    assert_eq!(per_group.len(), GROUPS);
    assert!(
        per_group
            .iter()
            .all(|g| g["verified"] == json!(PER_GROUP) && g["done"] == json!(true)),
        "{per_group:?}"
    );
    sim.shutdown().await;
}

db_test!(
    lost_altered_duplicated_and_holed_messages_are_reported_exactly,
    multi_thread
);
async fn lost_altered_duplicated_and_holed_messages_are_reported_exactly(backend: Backend) {
    let env = Env::on(backend).await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    let sim = start_sim(cfg).await;
    let config = config_with_verify(&env, &sim, "max_lanes = 8", 50);
    let job = [
        lines("va", None, 30, T0),
        lines("vb", None, 30, T0),
        lines("vc", None, 30, T0),
        lines("vt", Some("topic-1"), 10, T0),
    ]
    .concat();
    import(&env, &config, "job.ndjson", &job).await;
    let (code, report, stderr) = verify_json(&config, &[]).await;
    assert_eq!(code, Some(0), "{report}\n{stderr}");
    assert_eq!(totals(&report), [100, 0, 0, 0, 0, 0]);

    sim.lose_message("va", None, 5).unwrap();
    let altered = json!([{"MsgType": "TIMTextElem", "MsgContent": {"Text": "changed"}}]);
    sim.alter_message("va", None, 7, altered.clone()).unwrap();
    let copy = sim.duplicate_message("vb", None, 3).unwrap();
    assert_eq!(copy, 31);
    sim.punch_hole("vb", None, 10).unwrap();
    sim.lose_message("vt", Some("topic-1"), 2).unwrap();
    // Someone else's message in vc, after ours.
    let client = client_for(&sim, 50);
    let r = client
        .import_group_msg(&timport::tencent::ImportGroupMsgRequest {
            group_id: "vc".into(),
            recent_contact_flag: None,
            topic_id: None,
            msg_list: vec![timport::tencent::ImportMsg {
                from_account: "mallory".into(),
                send_time: T0 + 100,
                random: Some(42),
                msg_body: serde_json::value::to_raw_value(&text_body("not ours")).unwrap(),
            }],
        })
        .await
        .unwrap();
    assert_eq!(r.import_msg_result.unwrap()[0].result, 0);

    // The earlier results are for the old history: start over.
    let (code, report, stderr) = verify_json(&config, &["--restart"]).await;
    assert_eq!(code, Some(1), "{report}\n{stderr}");
    assert_eq!(totals(&report), [96, 2, 1, 1, 1, 1], "{report}");
    let problems: BTreeSet<(String, String, i64, String)> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["group"].as_str().unwrap().to_owned(),
                p["topic"].as_str().unwrap().to_owned(),
                p["msg_seq"].as_i64().unwrap(),
                p["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String, i64, String)> = [
        ("va", "", 5, "missing"),
        ("va", "", 7, "altered"),
        ("vb", "", 10, "unverifiable"),
        ("vb", "", 31, "duplicated"),
        ("vc", "", 31, "foreign"),
        ("vt", "topic-1", 2, "missing"),
    ]
    .into_iter()
    .map(|(g, t, s, k)| (g.to_owned(), t.to_owned(), s, k.to_owned()))
    .collect();
    assert_eq!(problems, want);
    let find = |kind: &str| {
        report["problems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["kind"] == json!(kind))
            .unwrap()
            .clone()
    };
    let a = find("altered");
    assert_eq!(a["found"]["MsgBody"], altered);
    assert_eq!(a["expected"]["MsgBody"], text_body("va 6"));
    let d = find("duplicated");
    assert_eq!(
        d["expected"]["MsgSeq"],
        json!(3),
        "the copy names ours: {d}"
    );
    let m = find("missing");
    assert!(m["found"].is_null() && m["expected"]["From_Account"].is_string());

    // Only foreign (not a failure): exit 0; a duplicate alone: exit 1.
    let (code, report, _) = verify_json(&config, &["--group", "vc"]).await;
    assert_eq!((code, totals(&report)), (Some(0), [30, 0, 0, 0, 0, 1]));
    let (code, report, _) = verify_json(&config, &["--group", "vb"]).await;
    assert_eq!((code, totals(&report)), (Some(1), [29, 0, 0, 1, 1, 0]));
    // The lanes of one job (here: all of them).
    let (code, report, _) = verify_json(&config, &["--job", "1"]).await;
    assert_eq!((code, totals(&report)), (Some(1), [96, 2, 1, 1, 1, 1]));
    // Usage errors: exit 2.
    for args in [
        &["--group", "nope"][..],
        &["--job", "99"],
        &["--group", "va", "--job", "1"],
    ] {
        let out = verify_command(&config, args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    let mut missing_db = config_with_verify(&env, &sim, "", 50);
    let none = missing_database(env.backend(), env.dir.path());
    let text = std::fs::read_to_string(&missing_db)
        .unwrap()
        .replace(&toml_escape(&env.db()), &toml_escape(&none));
    missing_db.set_file_name("missing-db.toml");
    std::fs::write(&missing_db, text).unwrap();
    let out = verify_command(&missing_db, &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!database_exists(&none).await, "nothing created");
    sim.shutdown().await;
}

db_test!(
    a_verify_killed_midway_resumes_to_the_same_totals_within_its_rate,
    multi_thread
);
async fn a_verify_killed_midway_resumes_to_the_same_totals_within_its_rate(backend: Backend) {
    const RATE: u32 = 20;
    let env = Env::on(backend).await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    cfg.faults.latency = Duration::from_millis(20);
    let sim = start_sim(cfg).await;
    let job = [lines("vk-1", None, 700, T0), lines("vk-2", None, 500, T0)].concat();
    // Fast import, then the real rate for verify.
    let fast = config_with_verify(&env, &sim, "requests_per_second = 200\nmax_lanes = 8", RATE);
    std::fs::rename(&fast, env.dir.path().join("fast.toml")).unwrap();
    let fast = env.dir.path().join("fast.toml");
    let config = config_with_verify(&env, &sim, "max_lanes = 8", RATE);
    import(&env, &fast, "job.ndjson", &job).await;
    sim.lose_message("vk-1", None, 650).unwrap();
    sim.alter_message("vk-2", None, 20, text_body("x")).unwrap();
    sim.duplicate_message("vk-2", None, 400).unwrap();
    sim.punch_hole("vk-1", None, 3).unwrap();
    let want = [1197, 1, 1, 1, 1, 0];

    let recorded = || async {
        try_db_rows_with::<(i64,)>(&env.store, "SELECT count(*) FROM verify_results", vec![])
            .await
            .map_or(0, |v| v[0].0)
    };
    let spawn_until = |at_least: i64| {
        let config = config.clone();
        async move {
            let child = verify_command(&config, &["--json"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let started = Instant::now();
            while recorded().await < at_least {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "verify made no progress"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            child
        }
    };
    // Stopped by SIGTERM midway: exit 1 ("run it again"), the claim withdrawn.
    let mut child = spawn_until(200).await;
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = wait_exit(&mut child, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1));
    let claims: i64 = db_scalar(&env.store, "SELECT count(*) FROM verify_claim").await;
    assert_eq!(claims, 0, "the claim is withdrawn on SIGTERM");
    // Resumed, then killed with SIGKILL midway (more pages recorded, not all).
    let after_term = recorded().await;
    let mut child = spawn_until(after_term + 200).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let n = recorded().await;
    assert!(n < 1200, "killed before the end ({n} recorded)");
    let before = sim.state().requests.len();
    let (code, resumed, stderr) = verify_json(&config, &[]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(totals(&resumed), want, "{resumed}");
    let resumed_reads = sim.state().requests[before..]
        .iter()
        .filter(|r| is_read(r))
        .count();

    // From scratch: the same totals; and every second within the rate.
    let before = sim.state().requests.len();
    let (code, full, _) = verify_json(&config, &["--restart"]).await;
    assert_eq!(code, Some(1));
    assert_eq!(totals(&full), want);
    assert_eq!(full["problems"], resumed["problems"]);
    let state = sim.state();
    let reads: Vec<RequestRecord> = state.requests[before..]
        .iter()
        .filter(|r| is_read(r))
        .cloned()
        .collect();
    assert!(
        resumed_reads < reads.len(),
        "the resumed run read less ({resumed_reads} vs {})",
        reads.len()
    );
    let busiest = busiest_second(&reads, |_| true);
    eprintln!(
        "verify alone: {} reads, busiest second {busiest} (rate {RATE}); resumed run {resumed_reads} reads",
        reads.len()
    );
    assert!(busiest <= RATE as usize, "{busiest} reads in one second");
    let span = (reads.last().unwrap().at_ms - reads[0].at_ms) as f64 / 1000.0;
    assert!(
        reads.len() as f64 <= f64::from(RATE) * span + 2.0,
        "{} reads in {span} s",
        reads.len()
    );
    sim.shutdown().await;
}

/// The quota-sharing set-up: a daemon config at `import` requests/s with verify at `verify`, a
/// first job of `old` messages imported into `{prefix}-old` (what verify reads), and a second of
/// 8 groups of `new` messages dropped in the spool for a daemon to import meanwhile.
async fn shared_quota_setup(
    backend: Backend,
    import_rate: u32,
    verify_rate: u32,
    prefix: &str,
    old: i64,
    new: i64,
) -> (Env, SimHandle, PathBuf) {
    let env = Env::on(backend).await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    cfg.faults.latency = Duration::from_millis(10);
    let sim = start_sim(cfg).await;
    let config = config_with_verify(
        &env,
        &sim,
        &format!("requests_per_second = {import_rate}\nmax_lanes = 16"),
        verify_rate,
    );
    import(
        &env,
        &config,
        "first.ndjson",
        &lines(&format!("{prefix}-old"), None, old, T0),
    )
    .await;
    let mut second = String::new();
    for g in 0..8 {
        second.push_str(&lines(&format!("{prefix}-new-{g}"), None, new, T0));
    }
    env.drop_in_spool("second.ndjson", &second);
    (env, sim, config)
}

db_test!(
    a_daemon_and_a_verify_together_stay_within_the_import_rate,
    multi_thread
);
async fn a_daemon_and_a_verify_together_stay_within_the_import_rate(backend: Backend) {
    const IMPORT: u32 = 30;
    const VERIFY: u32 = 15;
    // A first job imported (what verify reads), then a second one waiting in the spool.
    let (env, sim, config) = shared_quota_setup(backend, IMPORT, VERIFY, "vs", 600, 300).await;
    let log = std::fs::File::create(env.dir.path().join("daemon.log")).unwrap();
    let mut daemon = spawn_run(&config, &log, &[]);
    // The daemon is importing at its full rate.
    let started = Instant::now();
    while sim.state().requests_to("import_group_msg").count() < 60 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the daemon imports"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, report, stderr) = verify_json(&config, &["--group", "vs-old"]).await;
    assert_eq!(
        (code, totals(&report)),
        (Some(0), [600, 0, 0, 0, 0, 0]),
        "{stderr}"
    );
    let verify_done = sim.state().requests.len();
    // A few more seconds of the daemon alone, at its full rate again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let daemon_log = std::fs::read_to_string(env.dir.path().join("daemon.log")).unwrap();
    assert!(
        daemon_log.contains("a verify shares the quota")
            && daemon_log.contains("share of the quota is back"),
        "the daemon lowered its rate and took it back:\n{daemon_log}"
    );
    let state = sim.state();
    let reads: Vec<&RequestRecord> = state.requests[..verify_done]
        .iter()
        .filter(|r| r.endpoint == "group_msg_get_simple")
        .collect();
    assert!(reads.len() >= 30, "verify read ({} pages)", reads.len());
    let (first, last) = (reads[0].at_ms, reads.last().unwrap().at_ms);
    let all = &state.requests;
    // Together: within the import's rate in every second.
    let busiest = busiest_second(all, |_| true);
    let busiest_reads = busiest_second(all, |r| r.endpoint == "group_msg_get_simple");
    let busiest_imports = busiest_second(all, |r| r.endpoint == "import_group_msg");
    eprintln!(
        "daemon + verify: busiest second {busiest} (import rate {IMPORT}): reads {busiest_reads}, imports {busiest_imports}; {} pages read",
        reads.len()
    );
    assert!(
        busiest <= IMPORT as usize,
        "{busiest} requests in one second"
    );
    // And the daemon did give up part of it while verify read: its imports in verify's time
    // stayed near IMPORT - VERIFY.
    let imports = all
        .iter()
        .filter(|r| r.endpoint == "import_group_msg" && r.at_ms >= first && r.at_ms <= last)
        .count() as f64;
    let secs = (last - first) as f64 / 1000.0;
    eprintln!("daemon while verify read: {imports} imports in {secs} s");
    assert!(
        imports <= f64::from(IMPORT - VERIFY) * secs + f64::from(IMPORT),
        "{imports} imports in {secs} s"
    );
    sim.shutdown().await;
}

db_test!(
    bodies_are_dropped_once_verified_or_old_and_verify_still_compares_them,
    multi_thread
);
async fn bodies_are_dropped_once_verified_or_old_and_verify_still_compares_them(backend: Backend) {
    let env = Env::on(backend).await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    let sim = start_sim(cfg).await;
    let config = config_with_verify(&env, &sim, "max_lanes = 8", 50);
    import(
        &env,
        &config,
        "a.ndjson",
        &[lines("kb-1", None, 40, T0), lines("kb-2", None, 40, T0)].concat(),
    )
    .await;
    let bodies = |group: &'static str| {
        let store = env.store.clone();
        async move {
            db_row_with::<(i64, i64)>(
                &store,
                "SELECT CAST(SUM(CASE WHEN NOT EXISTS
                                 (SELECT 1 FROM message_bodies b WHERE b.message_id = m.id)
                            THEN 1 ELSE 0 END) AS BIGINT),
                        CAST(SUM(CASE WHEN m.body_sha256 IS NOT NULL THEN 1 ELSE 0 END) AS BIGINT)
                 FROM messages m JOIN lanes l ON l.id = m.lane_id WHERE l.group_id = $1",
                args![group],
            )
            .await
        }
    };
    assert_eq!(bodies("kb-1").await, (0, 0), "kept until verified");
    let (code, _, _) = verify_json(&config, &[]).await;
    assert_eq!(code, Some(0));
    // The daemon's next pass (at start) drops the verified bodies.
    run_idle(&env, &config).await;
    assert_eq!(bodies("kb-1").await, (40, 40));
    assert_eq!(bodies("kb-2").await, (40, 40));
    // verify still compares them, by digest.
    sim.alter_message("kb-1", None, 9, text_body("changed"))
        .unwrap();
    let (code, report, stderr) = verify_json(&config, &["--restart"]).await;
    assert_eq!(
        (code, totals(&report)),
        (Some(1), [79, 0, 1, 0, 0, 0]),
        "{stderr}"
    );
    let p = &report["problems"][0];
    assert!(p["expected"]["MsgBodySha256"].is_string(), "{p}");
    assert_eq!(p["found"]["MsgBody"], text_body("changed"));

    // A duration: bodies older than it go, verified or not.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[queue]\n", "[queue]\nkeep_bodies = \"1s\"\n");
    std::fs::write(&config, text).unwrap();
    import(&env, &config, "c.ndjson", &lines("kb-3", None, 30, T0)).await;
    assert_eq!(bodies("kb-3").await, (0, 0));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    run_idle(&env, &config).await;
    assert_eq!(bodies("kb-3").await, (30, 30));
    let (code, report, _) = verify_json(&config, &["--group", "kb-3"]).await;
    assert_eq!((code, totals(&report)), (Some(0), [30, 0, 0, 0, 0, 0]));
    // Status works as before.
    let t = env.store.totals(None).await.unwrap();
    assert_eq!((t.imported, t.pending), (110, 0));
    sim.shutdown().await;
}

/// (page_count, freelist_count) of the queue file.
async fn pages(env: &Env) -> (i64, i64) {
    db_row(
        &env.store,
        "SELECT * FROM pragma_page_count, pragma_freelist_count",
    )
    .await
}

/// `n` messages of `group` with bodies of about 1.5 KiB, one second apart from `t0`.
fn big_lines(group: &str, n: i64, t0: i64) -> String {
    (0..n)
        .map(|i| {
            line(
                group,
                "alice",
                t0 + i,
                &format!("{i:06} {}", "x".repeat(1500)),
            ) + "\n"
        })
        .collect()
}

// SQLite-only: about the file's pages and freelist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_bodies_give_their_pages_to_the_messages_queued_after_them() {
    const N: i64 = 700;
    let env = Env::new().await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    let sim = start_sim(cfg).await;
    let config = config_with_verify(&env, &sim, "max_lanes = 8", 50);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[queue]\n", "[queue]\nkeep_bodies = \"1s\"\n");
    std::fs::write(&config, text).unwrap();
    let (start, _) = pages(&env).await;
    let first: String = (0..7)
        .map(|g| big_lines(&format!("sp-{g}"), N / 7, T0))
        .collect();
    import(&env, &config, "a.ndjson", &first).await;
    let (imported, _) = pages(&env).await;
    let took = imported - start;
    // The next pass (at start, once they are a second old) drops all their bodies: whole rows of
    // message_bodies, whose pages go to the freelist.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    run_idle(&env, &config).await;
    let (after_drop, free) = pages(&env).await;
    let dropped: i64 = db_scalar(
        &env.store,
        "SELECT COUNT(*) FROM messages WHERE body_sha256 IS NOT NULL",
    )
    .await;
    assert_eq!(dropped, N);
    assert!(
        free * 2 > took,
        "dropping {N} bodies freed {free} of the {took} pages they took"
    );
    // As many messages of the same size again: they take the free pages before the file grows.
    let second: String = (0..7)
        .map(|g| big_lines(&format!("sq-{g}"), N / 7, T0))
        .collect();
    queue(&env, "b.ndjson", &second).await;
    let (queued, free_left) = pages(&env).await;
    let grew = queued - after_drop;
    assert!(
        grew * 4 < took,
        "the first {N} messages took {took} pages; the next {N}, queued after their bodies were \
         dropped, grew the file by {grew} ({free} free before, {free_left} after)"
    );
    assert!(
        free_left * 4 < free,
        "{free_left} of {free} free pages left unused"
    );
    // Nothing lost: the new bodies are there exactly, the old ones still verify by digest.
    let bodies: i64 = db_scalar(
        &env.store,
        "SELECT COUNT(*) FROM message_bodies b JOIN messages m ON m.id = b.message_id
         WHERE m.state = 'pending'",
    )
    .await;
    assert_eq!(bodies, N);
    let (code, report, stderr) = verify_json(&config, &[]).await;
    assert_eq!(
        (code, totals(&report)),
        (Some(0), [N, 0, 0, 0, 0, 0]),
        "{stderr}"
    );
    sim.shutdown().await;
}

db_test!(
    a_daemon_started_while_verify_reads_is_lowered_before_it_sends,
    multi_thread
);
async fn a_daemon_started_while_verify_reads_is_lowered_before_it_sends(backend: Backend) {
    const IMPORT: u32 = 30;
    const VERIFY: u32 = 20;
    let (env, sim, config) = shared_quota_setup(backend, IMPORT, VERIFY, "vd", 2000, 200).await;
    // Verify first (100 pages at 20/s: about 5 s), the daemon started once it reads.
    let mut c = verify_command(&config, &["--json", "--group", "vd-old"]);
    let verify = tokio::task::spawn_blocking(move || c.output().unwrap());
    let started = Instant::now();
    while sim.state().requests_to("group_msg_get_simple").count() < 20 {
        assert!(started.elapsed() < Duration::from_secs(60), "verify reads");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = std::fs::File::create(env.dir.path().join("daemon.log")).unwrap();
    let mut daemon = spawn_run(&config, &log, &[]);
    let out = verify.await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(totals(&report), [2000, 0, 0, 0, 0, 0]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let state = sim.state();
    let imports = state.requests_to("import_group_msg").count();
    assert!(
        imports > 20,
        "the daemon imported meanwhile ({imports} requests)"
    );
    let busiest = busiest_second(&state.requests, |_| true);
    eprintln!("daemon started during verify: busiest second {busiest} (import rate {IMPORT})");
    assert!(
        busiest <= IMPORT as usize,
        "{busiest} requests in one second"
    );
    sim.shutdown().await;
}

// SQLite-only: an upgrade through SQLite's migrations (PostgreSQL's queue starts at the latest).
#[tokio::test]
async fn a_queue_from_before_keeps_its_bodies_in_the_bodies_table() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old-migrations");
    std::fs::create_dir(&old).unwrap();
    for f in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite")).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if name.as_str() < "0008" {
            std::fs::copy(&f, old.join(&name)).unwrap();
        }
    }
    let db = dir.path().join("q.db");
    // Bodies exactly as queued: whitespace and key order are theirs, not re-serialized.
    let kept = r#"[ {"MsgType":"TIMTextElem", "MsgContent":{"Text":"kept é"}} ]"#;
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
        sqlx::query(
            "INSERT INTO jobs(id, kind, source, created_at) VALUES (1, 'file', 'old.ndjson', 0);
             INSERT INTO groups(group_id) VALUES ('g');
             INSERT INTO lanes(id, group_id) VALUES (1, 'g');
             INSERT INTO messages(id, lane_id, job_id, source_line, from_account, send_time, random,
                                  body, state, msg_seq, body_sha256)
             VALUES (1, 1, 1, 1, 'a', 1, 1, ?1, 'pending', NULL, NULL),
                    (2, 1, 1, 2, 'a', 2, 2, ?1, 'imported', 1, NULL),
                    (3, 1, 1, 3, 'a', 3, 3, '', 'imported', 2, 'abc');",
        )
        .bind(kept)
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    let store = timport::store::Store::open(&db, &Default::default())
        .await
        .unwrap();
    let bodies: Vec<(i64, String)> = db_rows(
        &store,
        "SELECT message_id, body FROM message_bodies ORDER BY message_id",
    )
    .await;
    assert_eq!(bodies, vec![(1, kept.to_string()), (2, kept.to_string())]);
    let columns: Vec<(String,)> = db_rows(
        &store,
        "SELECT name FROM pragma_table_info('messages') WHERE name LIKE 'body%'",
    )
    .await;
    assert_eq!(columns, vec![("body_sha256".to_string(),)]);
    let ours = store.verify_ours(1, 1, 2).await.unwrap();
    assert_eq!(
        ours.iter()
            .map(|m| (m.id, m.body.as_str(), m.body_sha256.as_deref()))
            .collect::<Vec<_>>(),
        vec![(2, kept, None), (3, "", Some("abc"))]
    );
}
