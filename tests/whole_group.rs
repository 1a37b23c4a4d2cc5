//! Whole-group jobs: the group is created, its history imported, then its members and unread
//! counts set, in that order, resumable after SIGKILL between the steps.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use timport::engine::EngineExit;
use timport::intake::files::FileOutcome;
use timport::store::RetryScope;

fn whole_group_job(group: &str, create_time: i64, n: i64) -> String {
    let msgs: Vec<_> = (0..n)
        .map(|i| {
            json!({"From_Account": if i % 2 == 0 { "owner" } else { "alice" },
                        "SendTime": T0 + i, "MsgBody": text_body(&format!("m{i}"))})
        })
        .collect();
    serde_json::to_string_pretty(&json!({
        "GroupId": group,
        "Group": {"Type": "Public", "Name": "Team", "Owner_Account": "owner", "CreateTime": create_time},
        "Members": [
            {"Member_Account": "owner", "UnreadMsgNum": 3},
            {"Member_Account": "alice", "JoinTime": create_time + 5, "UnreadMsgNum": 2},
            {"Member_Account": "bob", "Role": "Admin"}
        ],
        "MsgList": msgs
    }))
    .unwrap()
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

db_test!(
    create_then_history_then_members_and_unread_across_sigkills,
    multi_thread
);
async fn create_then_history_then_members_and_unread_across_sigkills(backend: Backend) {
    let env = Env::on(backend).await;
    let mut cfg = sim_config();
    cfg.faults.latency = Duration::from_millis(20);
    let sim = start_sim(cfg).await;
    let group = "team-1";
    env.drop_in_spool("team.json", &whole_group_job(group, T0 - 100, 60));
    let config = env.write(
        "timport.toml",
        &format!(
            "[tencent]\nsdkappid = {APP}\nidentifier = \"{ADMIN}\"\nsecret_key = \"{KEY}\"\nbase_url = \"{}\"\n\
             [queue]\ndatabase = \"{}\"\nspool_dir = \"{}\"\n[import]\nbackoff_base = \"20ms\"\nbackoff_max = \"200ms\"\n\
             [log]\nlevel = \"warn\"\n[http]\nlisten = \"\"\n",
            sim.base_url(),
            toml_escape(&env.db()),
            path_str(&env.spool())
        ),
    );
    let spawn = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_timport"))
            .args(["run", "--config", &path_str(&config)])
            .args(extra)
            .env_remove("TIMPORT_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // Killed once the group exists, and once some history is in.
    let mut child = spawn(&[]);
    wait_for("the group", || sim.state().group(group).is_some()).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let mut child = spawn(&[]);
    wait_for("some history", || {
        sim.state()
            .group(group)
            .is_some_and(|g| !g.messages.is_empty())
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let status = spawn(&["--until-idle"]).wait().unwrap();
    assert_eq!(status.code(), Some(0));

    let state = sim.state();
    let g = state.group(group).unwrap();
    assert_eq!(g.create_time, T0 - 100);
    let texts: Vec<String> = g
        .messages
        .iter()
        .map(|m| {
            m.msg_body[0]["MsgContent"]["Text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let want: Vec<String> = (0..60).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, want, "the history, each message once, in order");
    // The order of the steps, from the request log.
    let applied = |ep: &str| -> Vec<u64> {
        state
            .requests_to(ep)
            .filter(|r| r.applied)
            .map(|r| r.seq)
            .collect()
    };
    let created = applied("import_group");
    let imports = applied("import_group_msg");
    let members = applied("import_group_member");
    let unread = applied("set_unread_msg_num");
    assert_eq!(created.len(), 1);
    assert!(created[0] < imports[0], "the group before its messages");
    let last_import = *imports.iter().max().unwrap();
    assert!(
        members.iter().all(|s| *s > last_import),
        "members only after the whole history"
    );
    assert!(!unread.is_empty() && unread.iter().all(|s| *s > members[0]));
    let unread_of = |a: &str| {
        g.members
            .iter()
            .find(|m| m.member_account == a)
            .map(|m| m.unread_msg_num)
    };
    assert_eq!(
        unread_of("owner"),
        Some(3),
        "already a member: set afterwards"
    );
    assert_eq!(
        unread_of("alice"),
        Some(2),
        "imported with its count after the history"
    );
    assert_eq!(unread_of("bob"), Some(0));
    let m = env.store.member_totals(None).await.unwrap();
    assert_eq!(
        (m.imported, m.pending, m.failed, m.unread_pending),
        (3, 0, 0, 0)
    );
    let lanes = env.store.lanes(Some(group), 10).await.unwrap();
    assert_eq!(lanes[0].step, "done");
    sim.shutdown().await;
}

db_test!(a_group_that_already_exists_blocks_until_retried);
async fn a_group_that_already_exists_blocks_until_retried(backend: Backend) {
    let env = Env::on(backend).await;
    let mut cfg = sim_config();
    cfg.groups = vec![("theirs".into(), Some(T0 - 1000))];
    let sim = start_sim(cfg).await;
    let out = queue(
        &env,
        "theirs.json",
        &whole_group_job("theirs", T0 - 100, 10),
    )
    .await;
    assert!(matches!(out, FileOutcome::Accepted { .. }), "{out:?}");
    let exit = run_until_idle(&env.store, client_for(&sim, 200), engine_config())
        .await
        .unwrap();
    let EngineExit::Idle(t) = exit else {
        panic!("{exit:?}")
    };
    assert_eq!((t.imported, t.blocked), (0, 10));
    let blocked = env.store.blocked_lanes(5).await.unwrap();
    assert_eq!(blocked[0].blocked_code, Some(10021));
    assert!(
        blocked[0]
            .blocked_reason
            .as_deref()
            .unwrap()
            .contains("not created by timport")
    );
    assert_eq!(blocked[0].step, "create blocked");
    assert!(sim.state().group("theirs").unwrap().messages.is_empty());
    assert_eq!(
        env.store.member_totals(None).await.unwrap().pending,
        3,
        "members wait"
    );

    env.store.retry(RetryScope::Group("theirs")).await.unwrap();
    let exit = run_until_idle(&env.store, client_for(&sim, 200), engine_config())
        .await
        .unwrap();
    assert!(
        matches!(exit, EngineExit::Idle(t) if t.imported == 10 && t.blocked == 0),
        "{exit:?}"
    );
    assert_eq!(sim.state().group("theirs").unwrap().messages.len(), 10);
    assert_eq!(env.store.member_totals(None).await.unwrap().imported, 3);
    sim.shutdown().await;
}

db_test!(a_member_refused_for_its_join_time_is_failed_with_the_reason);
async fn a_member_refused_for_its_join_time_is_failed_with_the_reason(backend: Backend) {
    let env = Env::on(backend).await;
    // The group exists with a CreateTime the job does not know; carol's JoinTime is before it.
    let mut cfg = sim_config();
    cfg.groups = vec![("late".into(), Some(T0 + 1_000))];
    let sim = start_sim(cfg).await;
    let body = json!({"GroupId": "late",
        "Members": [{"Member_Account": "carol", "JoinTime": T0 + 10}, {"Member_Account": "dave"}],
        "MsgList": [{"From_Account": "dave", "SendTime": T0 + 2_000, "MsgBody": text_body("hi")}]});
    let out = queue(&env, "late.json", &body.to_string()).await;
    assert!(matches!(out, FileOutcome::Accepted { .. }), "{out:?}");
    let exit = run_until_idle(&env.store, client_for(&sim, 200), engine_config())
        .await
        .unwrap();
    assert!(
        matches!(exit, EngineExit::Idle(t) if t.imported == 1),
        "{exit:?}"
    );
    let m = env.store.member_totals(None).await.unwrap();
    assert_eq!((m.imported, m.failed), (1, 1));
    let (result, reason): (Option<i64>, String) = db_row(
        &env.store,
        "SELECT result, result_text FROM members WHERE member_account = 'carol'",
    )
    .await;
    assert_eq!(result, Some(0));
    assert!(reason.contains("JoinTime"), "{reason}");
    sim.shutdown().await;
}

db_test!(bad_group_definitions_reject_the_file_whole);
async fn bad_group_definitions_reject_the_file_whole(backend: Backend) {
    let env = Env::on(backend).await;
    let cases = [
        (
            json!({"Type": "AVChatRoom", "Name": "x", "CreateTime": T0 - 10}),
            "AVChatRoom",
        ),
        (
            json!({"Type": "Public", "Name": "x".repeat(31), "CreateTime": T0 - 10}),
            "Group.Name",
        ),
        (
            json!({"Type": "Public", "Name": "x", "CreateTime": T0 + 5}),
            "not before the first SendTime",
        ),
        (
            json!({"Type": "Public", "Name": "x"}),
            "CreateTime is required",
        ),
        (
            json!({"Type": "Public", "Name": "x", "CreateTime": T0 - 10, "Color": 1}),
            "unknown field",
        ),
    ];
    for (i, (group, want)) in cases.into_iter().enumerate() {
        let body = json!({"GroupId": "g", "Group": group,
            "MsgList": [{"From_Account": "a", "SendTime": T0, "MsgBody": text_body("x")}]});
        let out = queue(&env, &format!("g{i}.json"), &body.to_string()).await;
        let FileOutcome::Rejected { problems, .. } = &out else {
            panic!("{want}: {out:?}")
        };
        assert!(
            problems.iter().any(|p| p.problem.contains(want)),
            "{want}: {problems:?}"
        );
    }
    let body = json!({"GroupId": "g",
        "Group": {"Type": "Public", "Name": "x", "CreateTime": T0 - 10},
        "Members": [{"Member_Account": "early", "JoinTime": T0 - 20}],
        "MsgList": [{"From_Account": "a", "SendTime": T0, "MsgBody": text_body("x")}]});
    let out = queue(&env, "members.json", &body.to_string()).await;
    let FileOutcome::Rejected { problems, .. } = &out else {
        panic!("{out:?}")
    };
    assert!(problems[0].problem.contains("JoinTime"), "{problems:?}");
    let n: i64 = db_scalar(&env.store, "SELECT COUNT(*) FROM messages").await;
    assert_eq!(n, 0);
}
