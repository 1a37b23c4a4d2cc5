//! Accounts first (issue 14), against the simulator with `require_accounts` (a sender, owner or
//! member that is not an account fails, as on Tencent): every sender is imported as an account
//! before any message that needs it; an account in FailAccounts fails only its own messages;
//! a SIGKILL between an account import and its messages loses and duplicates nothing; a file with
//! bad account lines is rejected whole, naming the lines; accounts with profile data go out in
//! the AccountList form and IDs alone in the Accounts form (an existing profile is kept); without
//! accounts, 10019 fails only the message whose sender is missing; and the README's first command
//! works against a simulator that requires accounts.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use timport::engine::EngineConfig;
use timport::intake::files::FileOutcome;
use timport::simulator::{SimHandle, UnknownSender};
use timport::store::{Store, StoreOptions};

/// A UserID Tencent refuses (33 bytes): the account import lists it in FailAccounts.
const TOO_LONG: &str = "user-with-a-name-that-is-too-long";

fn strict_sim() -> timport::simulator::SimConfig {
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    cfg.require_accounts = true;
    cfg
}

fn accounts_on() -> EngineConfig {
    EngineConfig {
        accounts: true,
        ..engine_config()
    }
}

/// Sequence numbers of the simulator's requests to `endpoint`.
fn seqs(sim: &SimHandle, endpoint: &str) -> Vec<u64> {
    sim.state().requests_to(endpoint).map(|r| r.seq).collect()
}

/// Queues one job file (it must be accepted), then imports until idle with accounts on.
async fn queue_and_import(env: &Env, sim: &SimHandle, name: &str, text: &str) {
    let out = queue(env, name, text).await;
    assert!(matches!(out, FileOutcome::Accepted { .. }), "{out:?}");
    run_until_idle(&env.store, client_for(sim, 200), accounts_on())
        .await
        .unwrap();
}

fn ndjson(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

db_test!(
    accounts_are_imported_before_the_messages_that_need_them,
    multi_thread
);
async fn accounts_are_imported_before_the_messages_that_need_them(backend: Backend) {
    let env = Env::on(backend).await;
    let sim = start_sim(strict_sim()).await;
    // 250 senders: three account requests of at most 100.
    let mut lines = Vec::new();
    for i in 0..250 {
        lines.push(line(
            &format!("g{}", i % 5),
            &format!("user-{i:03}"),
            T0 + i,
            &format!("m{i}"),
        ));
    }
    let out = queue(&env, "a.ndjson", &ndjson(&lines)).await;
    assert!(matches!(out, FileOutcome::Accepted { .. }), "{out:?}");
    // A second job naming the same senders adds no account.
    let again: Vec<String> = (0..10)
        .map(|i| line("g0", &format!("user-{i:03}"), T0 + 1000 + i, "again"))
        .collect();
    queue(&env, "b.ndjson", &ndjson(&again)).await;
    let totals = env.store.account_totals().await.unwrap();
    assert_eq!(
        (totals.pending, totals.imported),
        (250, 0),
        "each account once"
    );
    run_until_idle(&env.store, client_for(&sim, 200), accounts_on())
        .await
        .unwrap();
    let s = sim.state();
    let account_reqs: Vec<_> = s.requests_to("multiaccount_import").collect();
    assert_eq!(account_reqs.len(), 3, "250 accounts in requests of ≤ 100");
    assert!(account_reqs.iter().all(|r| r.accounts.len() <= 100));
    let last_account = account_reqs.iter().map(|r| r.seq).max().unwrap();
    let first_message = seqs(&sim, "import_group_msg").into_iter().min().unwrap();
    assert!(
        last_account < first_message,
        "every account request arrived before the first message"
    );
    assert_eq!(s.accounts.len(), 250);
    let t = env.store.totals(None).await.unwrap();
    assert_eq!((t.imported, t.failed), (260, 0));
    let a = env.store.account_totals().await.unwrap();
    assert_eq!((a.imported, a.pending, a.failed), (250, 0, 0));
    sim.shutdown().await;
}

db_test!(
    profiles_go_in_the_account_list_form_and_ids_alone_keep_a_profile,
    multi_thread
);
async fn profiles_go_in_the_account_list_form_and_ids_alone_keep_a_profile(backend: Backend) {
    let env = Env::on(backend).await;
    let sim = start_sim(strict_sim()).await;
    // Accounts with profile data (an NDJSON account line mixed with messages), then messages.
    let text = ndjson(&[
        json!({"UserID": "alice", "Nick": "Alice", "FaceUrl": "https://example.com/a.png"})
            .to_string(),
        line("p1", "alice", T0 + 1, "hi"),
        line("p1", "bob", T0 + 2, "hello"),
    ]);
    queue(&env, "p.ndjson", &text).await;
    run_until_idle(&env.store, client_for(&sim, 200), accounts_on())
        .await
        .unwrap();
    // A .json body of accounts only: carol with a nick.
    let body = json!({"AccountList": [{"UserID": "carol", "Nick": "Carol"}]}).to_string();
    let p = env.write("acc.json", &body);
    let out = timport::intake::files::ingest_file(
        Some(&env.store),
        &p,
        true,
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(matches!(out, FileOutcome::Accepted { .. }), "{out:?}");
    // alice sends again without profile data: no new request for her, her profile kept.
    queue(
        &env,
        "q.ndjson",
        &ndjson(&[line("p1", "alice", T0 + 3, "again")]),
    )
    .await;
    run_until_idle(&env.store, client_for(&sim, 200), accounts_on())
        .await
        .unwrap();
    let s = sim.state();
    let by_id = |id: &str| s.accounts.iter().find(|a| a.user_id == id).cloned();
    let alice = by_id("alice").expect("alice is an account");
    assert_eq!(
        alice.nick.as_deref(),
        Some("Alice"),
        "profile set, not blanked"
    );
    assert_eq!(alice.face_url.as_deref(), Some("https://example.com/a.png"));
    assert_eq!(by_id("bob").expect("bob").nick, None);
    assert_eq!(
        by_id("carol").expect("carol").nick.as_deref(),
        Some("Carol")
    );
    let reqs: Vec<_> = s.requests_to("multiaccount_import").collect();
    let with_alice = reqs
        .iter()
        .filter(|r| r.accounts.iter().any(|a| a == "alice"))
        .count();
    assert_eq!(with_alice, 1, "alice imported once");
    assert_eq!(history_texts(&sim, "p1").len(), 3);
    sim.shutdown().await;
}

db_test!(
    without_accounts_a_missing_sender_fails_only_its_message,
    multi_thread
);
/// Without accounts (`import.accounts = "off"`), a sender that is not an account: Tencent's
/// 10019 fails that message alone with the explanation, under both readings of the simulator
/// (whole request refused: bisected; or per message).
async fn without_accounts_a_missing_sender_fails_only_its_message(backend: Backend) {
    for mode in [UnknownSender::WholeRequest, UnknownSender::PerMessage] {
        let env = Env::on(backend).await;
        let mut cfg = strict_sim();
        cfg.unknown_sender = mode;
        let sim = start_sim(cfg).await;
        sim.add_account("alice");
        let mut lines = Vec::new();
        for i in 0..14 {
            let from = if i == 5 { "ghost" } else { "alice" };
            lines.push(line("off", from, T0 + i, &format!("m{i}")));
        }
        queue(&env, "o.ndjson", &ndjson(&lines)).await;
        run_until_idle(&env.store, client_for(&sim, 200), engine_config())
            .await
            .unwrap();
        let texts: Vec<String> = history_texts(&sim, "off")
            .into_iter()
            .map(|(_, _, t)| t)
            .collect();
        let want: Vec<String> = (0..14)
            .filter(|i| *i != 5)
            .map(|i| format!("m{i}"))
            .collect();
        assert_eq!(
            texts, want,
            "{mode:?}: the rest of the lane went on, in order"
        );
        let reasons = env.store.failure_reasons(None, 5).await.unwrap();
        assert_eq!(reasons.len(), 1, "{mode:?}: {reasons:?}");
        let r = format!("{reasons:?}");
        assert!(r.contains("is not an account of the app"), "{mode:?}: {r}");
        assert_eq!(env.store.totals(None).await.unwrap().failed, 1);
        assert!(
            sim.state()
                .requests_to("multiaccount_import")
                .next()
                .is_none()
        );
        sim.shutdown().await;
    }
}

/// The simulator's multiaccount_import: both forms, FailAccounts for IDs that break the rules,
/// at most 100 per request; the old form keeps a profile, the new one sets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_serves_multiaccount_import_in_both_forms() {
    use timport::tencent::{AccountItem, MultiaccountImportRequest};
    let sim = start_sim(strict_sim()).await;
    let client = client_for(&sim, 200);
    let profiles = MultiaccountImportRequest::Profiles {
        account_list: vec![AccountItem {
            user_id: "ann".into(),
            nick: Some("Ann".into()),
            face_url: None,
        }],
    };
    let r = client.multiaccount_import(&profiles).await.unwrap();
    assert!(r.fail_accounts.is_empty());
    let ids = MultiaccountImportRequest::Ids {
        accounts: vec!["ann".into(), "".into(), TOO_LONG.into(), "ben".into()],
    };
    let r = client.multiaccount_import(&ids).await.unwrap();
    assert_eq!(r.fail_accounts, vec!["".to_string(), TOO_LONG.to_string()]);
    let s = sim.state();
    let ann = s.accounts.iter().find(|a| a.user_id == "ann").unwrap();
    assert_eq!(
        ann.nick.as_deref(),
        Some("Ann"),
        "the old form keeps the profile"
    );
    assert_eq!(s.accounts.len(), 2);
    let too_many = MultiaccountImportRequest::Ids {
        accounts: (0..101).map(|i| format!("x{i}")).collect(),
    };
    let e = client.multiaccount_import(&too_many).await.unwrap_err();
    assert_eq!(e.code(), Some(70206), "{e}");
    let hundred = MultiaccountImportRequest::Ids {
        accounts: (0..100).map(|i| format!("x{i}")).collect(),
    };
    assert!(client.multiaccount_import(&hundred).await.is_ok());
    assert_eq!(sim.state().accounts.len(), 102);
    sim.shutdown().await;
}

db_test!(
    owners_and_members_are_imported_before_the_group_and_its_members,
    multi_thread
);
/// A whole-group job: the owner and members are accounts too, imported before import_group and
/// import_group_member; a member whose account fails fails alone, with the reason.
async fn owners_and_members_are_imported_before_the_group_and_its_members(backend: Backend) {
    let env = Env::on(backend).await;
    let sim = start_sim(strict_sim()).await;
    let body = json!({
        "GroupId": "wg",
        "Group": {"Type": "Public", "Name": "WG", "Owner_Account": "owner", "CreateTime": T0 - 100},
        "Members": [
            {"Member_Account": "mem", "JoinTime": T0 - 50},
            {"Member_Account": TOO_LONG, "JoinTime": T0 - 50}
        ],
        "MsgList": [
            {"From_Account": "owner", "SendTime": T0, "MsgBody": text_body("a")},
            {"From_Account": "mem", "SendTime": T0 + 1, "MsgBody": text_body("b")}
        ]
    });
    queue_and_import(&env, &sim, "wg.json", &body.to_string()).await;
    let last_account = seqs(&sim, "multiaccount_import").into_iter().max().unwrap();
    for ep in ["import_group", "import_group_msg", "import_group_member"] {
        let first = seqs(&sim, ep).into_iter().min().unwrap();
        assert!(last_account < first, "accounts before {ep}");
    }
    let s = sim.state();
    let g = s.group("wg").expect("created");
    assert_eq!(g.owner_account.as_deref(), Some("owner"));
    assert!(g.members.iter().any(|m| m.member_account == "mem"));
    assert_eq!(history_texts(&sim, "wg").len(), 2);
    let m = env.store.member_totals(None).await.unwrap();
    assert_eq!((m.imported, m.failed), (1, 1));
    let a = env.store.account_totals().await.unwrap();
    assert_eq!((a.imported, a.failed), (2, 1));
    sim.shutdown().await;
}

db_test!(
    a_member_queued_after_its_account_failed_fails_with_the_account_reason_unsent,
    multi_thread
);
/// A member queued after its account already failed (a later job naming the same UserID) fails
/// with the account's reason and is never sent; `retry --accounts` takes it back with the account.
async fn a_member_queued_after_its_account_failed_fails_with_the_account_reason_unsent(
    backend: Backend,
) {
    let env = Env::on(backend).await;
    let sim = start_sim(strict_sim()).await;
    // First job: a message from the refused ID, so its account fails.
    let first = ndjson(&[
        line("early", TOO_LONG, T0, "x"),
        line("early", "ann", T0 + 1, "y"),
    ]);
    queue_and_import(&env, &sim, "first.ndjson", &first).await;
    assert_eq!(env.store.account_totals().await.unwrap().failed, 1);
    // Second job: a whole group naming the failed ID as a member, beside a good one.
    let body = json!({
        "GroupId": "late",
        "Group": {"Type": "Public", "Name": "Late", "Owner_Account": "ann", "CreateTime": T0 - 100},
        "Members": [
            {"Member_Account": "mem2", "JoinTime": T0 - 50},
            {"Member_Account": TOO_LONG, "JoinTime": T0 - 50}
        ],
        "MsgList": [{"From_Account": "ann", "SendTime": T0, "MsgBody": text_body("a")}]
    });
    queue_and_import(&env, &sim, "late.json", &body.to_string()).await;
    let s = sim.state();
    let g = s.group("late").expect("created");
    assert!(g.members.iter().any(|m| m.member_account == "mem2"));
    assert!(
        !g.members.iter().any(|m| m.member_account == TOO_LONG),
        "never sent"
    );
    let m = env.store.member_totals(None).await.unwrap();
    assert_eq!((m.imported, m.failed), (1, 1));
    // Only a member failed with the account's reason is taken back by `retry --accounts`: one
    // sent and refused by the server would carry the server's reason instead.
    let r = env.store.retry_accounts().await.unwrap();
    assert_eq!((r.accounts, r.messages, r.members), (1, 1, 1));
    sim.shutdown().await;
}

db_test!(
    a_group_whose_owner_account_failed_is_blocked_with_the_reason_unsent,
    multi_thread
);
/// A group whose owner's account failed is never sent to import_group: it is blocked with the
/// account's reason, and its messages wait with it.
async fn a_group_whose_owner_account_failed_is_blocked_with_the_reason_unsent(backend: Backend) {
    let env = Env::on(backend).await;
    let sim = start_sim(strict_sim()).await;
    let body = json!({
        "GroupId": "orphan",
        "Group": {"Type": "Public", "Name": "O", "Owner_Account": TOO_LONG, "CreateTime": T0 - 100},
        "MsgList": [{"From_Account": "ann", "SendTime": T0, "MsgBody": text_body("a")}]
    });
    queue_and_import(&env, &sim, "orphan.json", &body.to_string()).await;
    let s = sim.state();
    assert_eq!(s.requests_to("import_group").count(), 0, "never sent");
    assert_eq!(s.requests_to("import_group_msg").count(), 0);
    let blocked = env.store.blocked_lanes(10).await.unwrap();
    let text = format!("{blocked:?}");
    assert!(
        text.contains("owner account could not be imported"),
        "{text}"
    );
    sim.shutdown().await;
}

/// A database queued before accounts existed: migration 0007 records the senders its queue still
/// has to send, so they are imported first too. SQLite-only: an upgrade through SQLite's
/// migrations (PostgreSQL's queue starts at the latest schema).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_before_accounts_gets_its_pending_senders_recorded() {
    let env = Env::new().await;
    let sim = start_sim(strict_sim()).await;
    let lines: Vec<String> = (0..6)
        .map(|i| line("old", &format!("o{}", i % 3), T0 + i, &format!("m{i}")))
        .collect();
    queue(&env, "old.ndjson", &ndjson(&lines)).await;
    env.store.close().await;
    // Back to the schema before 0007, as a database of an earlier release has it.
    let out = Command::new("sqlite3")
        .arg(env.db_path())
        .arg("DROP TABLE accounts; DELETE FROM _sqlx_migrations WHERE version = 7;")
        .output()
        .expect("sqlite3 runs");
    assert!(out.status.success(), "{out:?}");
    let store = Store::open(&env.db_path(), &StoreOptions::default())
        .await
        .unwrap();
    let a = store.account_totals().await.unwrap();
    assert_eq!(
        (a.pending, a.imported),
        (3, 0),
        "the queue's senders recorded"
    );
    run_until_idle(&store, client_for(&sim, 200), accounts_on())
        .await
        .unwrap();
    assert_eq!(history_texts(&sim, "old").len(), 6);
    sim.shutdown().await;
}

db_test!(
    rate_limited_account_requests_are_waited_out_and_counted_on_metrics,
    multi_thread
);
/// The server's own multiaccount_import quota is lower than the daemon's setting: its 60007
/// answers are waited out like any rate limit, nothing fails; the account counters are on
/// /metrics.
async fn rate_limited_account_requests_are_waited_out_and_counted_on_metrics(backend: Backend) {
    let env = Env::on(backend).await;
    let mut cfg = strict_sim();
    cfg.account_requests_per_second = 1;
    let sim = start_sim(cfg).await;
    let db = db_of(&env).await;
    let config = child_config(&env, &sim.base_url(), &db.config_value(), "");
    let lines: Vec<String> = (0..250)
        .map(|i| line("rl", &format!("r{i:03}"), T0 + i, &format!("m{i}")))
        .collect();
    env.drop_in_spool("rl.ndjson", &ndjson(&lines));
    let log = env.dir.path().join("rl.log");
    let mut child = daemon::spawn_with_env(
        &config,
        &log,
        &[("TIMPORT__HTTP__LISTEN", "127.0.0.1:0")],
        &[],
        |_| {},
    );
    let listening = daemon::wait_line(&mut child, &log, Duration::from_secs(60), |l| {
        l.contains("health and metrics listening")
    })
    .await;
    let at = listening.find("\"address\":\"").expect("address") + "\"address\":\"".len();
    let addr = listening[at..].split('"').next().unwrap().to_string();
    let started = Instant::now();
    let metrics = loop {
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("timport_accounts{state=\"imported\"} 250")
            && history_texts(&sim, "rl").len() == 250
        {
            break text;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{text}\n{}",
            daemon::log_text(&log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        metrics.contains("timport_accounts_imported_total 250"),
        "{metrics}"
    );
    assert!(
        metrics.contains("timport_accounts{state=\"pending\"} 0"),
        "{metrics}"
    );
    daemon::signal(&child, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    let limited = sim
        .state()
        .requests_to("multiaccount_import")
        .filter(|r| r.error_code == Some(60007))
        .count();
    assert!(limited > 0, "the server's account quota was hit");
    let store = Store::open_read_only(&db.database(), &StoreOptions::default())
        .await
        .unwrap();
    let t = store.totals(None).await.unwrap();
    assert_eq!((t.imported, t.failed), (250, 0));
    sim.shutdown().await;
}

/// The child daemon's own database, beside the one `env.store` holds open.
async fn db_of(env: &Env) -> TestDb {
    TestDb::named(env.backend(), env.dir.path(), "child").await
}

fn timport(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_timport"))
        .args(args)
        .args(["--config", &path_str(config)])
        .env_remove("TIMPORT_CONFIG")
        .output()
        .unwrap()
}

db_test!(
    an_account_in_fail_accounts_fails_only_its_own_messages,
    multi_thread
);
async fn an_account_in_fail_accounts_fails_only_its_own_messages(backend: Backend) {
    let env = Env::on(backend).await;
    let sim = start_sim(strict_sim()).await;
    let db = db_of(&env).await;
    let config = child_config(&env, &sim.base_url(), &db.config_value(), "");
    let mut lines = Vec::new();
    for i in 0..20 {
        let from = match i % 4 {
            0 => TOO_LONG,
            1 => "alice",
            _ => "bob",
        };
        lines.push(line("fa", from, T0 + i, &format!("m{i}")));
    }
    env.drop_in_spool("fa.ndjson", &ndjson(&lines));
    let log = std::fs::File::create(env.dir.path().join("run.log")).unwrap();
    let mut child = spawn_run(&config, &log, &["--until-idle"]);
    let status = wait_exit(&mut child, Duration::from_secs(120)).await;
    assert_eq!(status.code(), Some(1), "failed messages: exit 1");
    let want: Vec<String> = (0..20)
        .filter(|i| i % 4 != 0)
        .map(|i| format!("m{i}"))
        .collect();
    let got: Vec<String> = history_texts(&sim, "fa")
        .into_iter()
        .map(|(_, _, t)| t)
        .collect();
    assert_eq!(got, want, "the others imported, in order");
    let s = sim.state();
    let first_message = seqs(&sim, "import_group_msg").into_iter().min().unwrap();
    assert!(
        s.requests_to("multiaccount_import")
            .all(|r| r.seq < first_message),
        "accounts before messages"
    );
    let out = timport(&config, &["status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["accounts"],
        json!({"imported": 2, "pending": 0, "failed": 1})
    );
    assert_eq!(v["totals"]["failed"], 5);
    let reasons = v["failure_reasons"].to_string();
    assert!(
        reasons.contains("sender account could not be imported"),
        "{reasons}"
    );
    let text = String::from_utf8_lossy(&timport(&config, &["status"]).stdout).into_owned();
    assert!(
        text.contains("accounts   2 imported, 0 pending, 1 failed"),
        "{text}"
    );
    // retry --accounts: the account and its five messages back to pending.
    let out = timport(&config, &["retry", "--accounts"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    assert!(said.contains("1 failed account(s)"), "{said}");
    assert!(said.contains("5 message(s)"), "{said}");
    let store = Store::open_read_only(&db.database(), &StoreOptions::default())
        .await
        .unwrap();
    let a = store.account_totals().await.unwrap();
    assert_eq!((a.pending, a.failed), (1, 0));
    assert_eq!(store.totals(None).await.unwrap().pending, 5);
    sim.shutdown().await;
}

db_test!(
    sigkill_between_accounts_and_messages_loses_and_duplicates_nothing,
    multi_thread
);
async fn sigkill_between_accounts_and_messages_loses_and_duplicates_nothing(backend: Backend) {
    let env = Env::on(backend).await;
    let mut cfg = strict_sim();
    // Slow enough that the kill lands after the first account request, before the messages.
    cfg.faults.latency = Duration::from_millis(150);
    let sim = start_sim(cfg).await;
    let db = db_of(&env).await;
    let config = child_config(
        &env,
        &sim.base_url(),
        &db.config_value(),
        "account_requests_per_second = 2",
    );
    let mut lines = Vec::new();
    for i in 0..300 {
        lines.push(line(
            &format!("k{}", i % 3),
            &format!("u{i:03}"),
            T0 + i,
            &format!("m{i}"),
        ));
    }
    env.drop_in_spool("k.ndjson", &ndjson(&lines));
    let log_path = env.dir.path().join("kill.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = spawn_run(&config, &log, &[]);
    let started = Instant::now();
    while sim.state().requests_to("multiaccount_import").count() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no account request"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Wait for the first answer to be recorded, then kill.
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("accounts imported") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(
        seqs(&sim, "import_group_msg").len(),
        0,
        "no message went before its account"
    );
    let mut child = spawn_run(&config, &log, &["--until-idle"]);
    let status = wait_exit(&mut child, Duration::from_secs(180)).await;
    assert_eq!(status.code(), Some(0));
    for g in 0..3 {
        let group = format!("k{g}");
        let want: Vec<(String, i64, String)> = (0..300)
            .filter(|i| i % 3 == g)
            .map(|i| (format!("u{i:03}"), T0 + i, format!("m{i}")))
            .collect();
        assert_eq!(
            history_texts(&sim, &group),
            want,
            "{group}: none lost, none twice, in order"
        );
    }
    let s = sim.state();
    assert_eq!(s.accounts.len(), 300);
    let store = Store::open_read_only(&db.database(), &StoreOptions::default())
        .await
        .unwrap();
    let a = store.account_totals().await.unwrap();
    assert_eq!((a.imported, a.pending, a.failed), (300, 0, 0));
    sim.shutdown().await;
}

db_test!(
    a_file_with_bad_account_lines_is_rejected_whole_naming_the_lines,
    multi_thread
);
async fn a_file_with_bad_account_lines_is_rejected_whole_naming_the_lines(backend: Backend) {
    let env = Env::on(backend).await;
    let sim = start_sim(strict_sim()).await;
    let db = db_of(&env).await;
    let config = child_config(&env, &sim.base_url(), &db.config_value(), "");
    let text = ndjson(&[
        json!({"UserID": "fine", "Nick": "Fine"}).to_string(),
        line("bad", "fine", T0, "ok"),
        json!({"UserID": ""}).to_string(),
        json!({"UserID": TOO_LONG}).to_string(),
        json!({"UserID": "x", "Age": 3}).to_string(),
        json!({"UserID": "y", "Nick": "n".repeat(501)}).to_string(),
    ]);
    let p = env.write("bad.ndjson", &text);
    let out = timport(&config, &["ingest", &path_str(&p)]);
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("4 problem(s), nothing queued"), "{said}");
    for (l, what) in [
        (3, "UserID is empty"),
        (4, "33 bytes"),
        (5, "unknown field \"Age\""),
        (6, "Nick is 501 bytes"),
    ] {
        assert!(said.contains(&format!("line {l}: ")), "line {l}: {said}");
        assert!(said.contains(what), "{what}: {said}");
    }
    // The same in a .json AccountList.
    let body = json!({"GroupId": "bad", "AccountList": [{"UserID": "ok"}, {"UserID": 7}],
                      "MsgList": [{"From_Account": "ok", "SendTime": T0,
                                   "MsgBody": text_body("x")}]});
    let p = env.write("bad.json", &serde_json::to_string_pretty(&body).unwrap());
    let out = timport(&config, &["ingest", &path_str(&p)]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("AccountList[1].UserID must be a string"),
        "{said}"
    );
    let store = Store::open_read_only(&db.database(), &StoreOptions::default())
        .await
        .unwrap();
    assert_eq!(store.totals(None).await.unwrap().total, 0, "nothing queued");
    assert_eq!(
        store.account_totals().await.unwrap(),
        Default::default(),
        "no account recorded"
    );
    sim.shutdown().await;
}

db_test!(
    the_readme_command_imports_every_sample_against_a_simulator_requiring_accounts,
    multi_thread
);
/// The README's first command, `cargo run --release -- run --config config/local.toml
/// --until-idle --ingest examples`, as the built binary: config/local.toml's built-in simulator
/// requires accounts, and every sample message (the whole-group example included) is imported.
async fn the_readme_command_imports_every_sample_against_a_simulator_requiring_accounts(
    backend: Backend,
) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let local = std::fs::read_to_string(root.join("config/local.toml")).unwrap();
    assert!(local.contains("require_accounts = true"), "{local}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::write(dir.path().join("config/local.toml"), &local).unwrap();
    // On PostgreSQL the configuration's database is a fresh one (SQLite keeps the file it names).
    let db = TestDb::new(backend, dir.path()).await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_timport"));
    if backend == Backend::Postgres {
        cmd.env("TIMPORT__QUEUE__DATABASE", db.config_value());
    }
    let out = cmd
        .args([
            "run",
            "--config",
            "config/local.toml",
            "--until-idle",
            "--ingest",
        ])
        .arg(root.join("examples"))
        .current_dir(dir.path())
        .env_remove("TIMPORT_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("import finished: 1523 imported, 0 failed, 0 blocked"),
        "{stdout}"
    );
    assert!(stdout.contains("accounts   "), "{stdout}");
    assert!(stdout.contains(" 0 pending, 0 failed"), "{stdout}");
    assert!(
        stdout.contains("members    3 imported"),
        "the whole-group example's members: {stdout}"
    );
}
