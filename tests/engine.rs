//! The import engine against the simulator on a loopback port and a real queue database, on
//! SQLite and on PostgreSQL (`TIMPORT_TEST_DATABASE_URL`).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::Value;
use timport::engine::{EngineError, EngineExit};
use timport::settings::TiePolicy;
use timport::simulator::{Faults, SimHandle, StoredMessage};
use timport::store::{NewMessage, RetryScope, Store};

/// What the queue holds for one group, in the order it must arrive: (From_Account, SendTime,
/// Random, body text).
async fn expected(store: &Store, group: &str) -> Vec<(String, i64, u32, String)> {
    let rows: Vec<(String, i64, i64, String)> = db_rows_with(
        store,
        "SELECT m.from_account, m.send_time, m.random, b.body FROM messages m
         JOIN message_bodies b ON b.message_id = m.id
         JOIN lanes l ON l.id = m.lane_id WHERE l.group_id = $1 AND l.topic_id = ''
         ORDER BY m.send_time, m.id",
        args![group],
    )
    .await;
    rows.into_iter()
        .map(|(f, t, r, b)| {
            (
                f,
                t,
                u32::try_from(r).unwrap(),
                body_text(&serde_json::from_str(&b).unwrap()),
            )
        })
        .collect()
}

fn body_text(v: &Value) -> String {
    v[0]["MsgContent"]["Text"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn history(sim: &SimHandle, group: &str) -> Vec<StoredMessage> {
    sim.state()
        .group(group)
        .map(|g| g.messages.clone())
        .unwrap_or_default()
}

fn as_tuples(h: &[StoredMessage]) -> Vec<(String, i64, u32, String)> {
    h.iter()
        .map(|m| {
            (
                m.from_account.clone(),
                m.send_time,
                m.random,
                body_text(&m.msg_body),
            )
        })
        .collect()
}

async fn scalar(store: &Store, sql: &str) -> i64 {
    db_scalar(store, sql).await
}

fn ndjson(groups: &[&str], per_group: i64, same_second_every: i64) -> String {
    let mut s = String::new();
    for i in 0..per_group {
        for g in groups {
            // Every `same_second_every`-th message shares the previous one's second.
            let t = if same_second_every == 0 {
                T0 + i
            } else {
                T0 + i - (i / same_second_every)
            };
            s.push_str(&line(
                g,
                if i % 3 == 0 { "alice" } else { "bob" },
                t,
                &format!("{g}-{i}"),
            ));
            s.push('\n');
        }
    }
    s
}

db_test!(imports_in_order_in_batches_of_at_most_seven);
async fn imports_in_order_in_batches_of_at_most_seven(backend: Backend) {
    let env = Env::on(backend).await;
    let groups = ["g1", "g2", "g3"];
    queue(&env, "a.ndjson", &ndjson(&groups, 50, 3)).await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    let sim = start_sim(cfg).await;
    let exit = run_until_idle(&env.store, client_for(&sim, 200), engine_config())
        .await
        .unwrap();
    let EngineExit::Idle(t) = exit else {
        panic!("{exit:?}")
    };
    assert_eq!(
        (t.imported, t.failed, t.pending, t.in_flight),
        (150, 0, 0, 0)
    );
    for g in groups {
        let want = expected(&env.store, g).await;
        assert_eq!(
            as_tuples(&history(&sim, g)),
            want,
            "group {g}: order and content"
        );
    }
    let state = sim.state();
    let imports: Vec<_> = state.requests_to("import_group_msg").collect();
    assert!(imports.iter().all(|r| r.results.len() <= 7));
    // The first tie of the run ends its batch (the server's stance on ties is unknown until
    // then); after it was taken, batches are full again.
    assert!(imports.iter().filter(|r| r.results.len() == 7).count() >= 3 * 6);
    assert!(
        sim.state().requests.len() <= 3 * 9,
        "no more requests than needed"
    );
    // MsgSeq recorded for every message matches the server's.
    let seqs: Vec<(i64,)> = db_rows(
        &env.store,
        "SELECT m.msg_seq FROM messages m JOIN lanes l ON l.id = m.lane_id
         WHERE l.group_id = 'g1' ORDER BY m.send_time, m.id",
    )
    .await;
    let server: Vec<(i64,)> = history(&sim, "g1")
        .iter()
        .map(|m| (m.msg_seq as i64,))
        .collect();
    assert_eq!(seqs, server);
    sim.shutdown().await;
}

db_test!(a_missing_group_is_blocked_while_others_finish_and_retry_resumes_it);
async fn a_missing_group_is_blocked_while_others_finish_and_retry_resumes_it(backend: Backend) {
    let env = Env::on(backend).await;
    queue(&env, "a.ndjson", &ndjson(&["here", "missing"], 20, 0)).await;
    let mut cfg = sim_config();
    cfg.groups = vec![("here".into(), None)];
    let sim = start_sim(cfg).await;
    let exit = run_until_idle(&env.store, client_for(&sim, 200), engine_config())
        .await
        .unwrap();
    let EngineExit::Idle(t) = exit else {
        panic!("{exit:?}")
    };
    assert_eq!((t.imported, t.blocked, t.failed), (20, 20, 0));
    let blocked = env.store.blocked_lanes(10).await.unwrap();
    assert_eq!(blocked.len(), 1);
    assert_eq!(blocked[0].group_id, "missing");
    assert_eq!(blocked[0].blocked_code, Some(10010));
    assert!(
        blocked[0]
            .blocked_reason
            .as_deref()
            .unwrap()
            .contains("retry --group missing")
    );
    assert_eq!(
        scalar(
            &env.store,
            "SELECT MAX(attempts) FROM messages WHERE state = 'pending'"
        )
        .await,
        0,
        "blocking burns no attempt"
    );

    sim.add_group("missing", 0);
    let (msgs, lanes) = env.store.retry(RetryScope::Group("missing")).await.unwrap();
    assert_eq!((msgs, lanes), (0, 1));
    let exit = run_until_idle(&env.store, client_for(&sim, 200), engine_config())
        .await
        .unwrap();
    assert!(matches!(exit, EngineExit::Idle(t) if t.imported == 40 && t.blocked == 0));
    assert_eq!(
        as_tuples(&history(&sim, "missing")),
        expected(&env.store, "missing").await
    );
    sim.shutdown().await;
}

/// Queues messages straight into the store, bypassing validation, to reach server-side refusals.
async fn queue_raw(store: &Store, group: &str, bodies: &[Value]) {
    let mut w = store.job_writer("file", "raw").await.unwrap();
    for (i, b) in bodies.iter().enumerate() {
        w.push(NewMessage {
            group_id: group.into(),
            topic_id: String::new(),
            from_account: "alice".into(),
            send_time: T0 + i as i64,
            random: None,
            recent_contact: false,
            body: b.to_string(),
            source_line: i as i64 + 1,
            source_index: 0,
        })
        .await
        .unwrap();
    }
    w.commit(Some(&format!("raw-{group}"))).await.unwrap();
}

db_test!(a_too_long_message_fails_alone_and_the_lane_goes_on);
async fn a_too_long_message_fails_alone_and_the_lane_goes_on(backend: Backend) {
    let env = Env::on(backend).await;
    let mut bodies: Vec<Value> = (0..10).map(|i| text_body(&format!("m{i}"))).collect();
    bodies[3] = text_body(&"x".repeat(12_500));
    queue_raw(&env.store, "g", &bodies).await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    let sim = start_sim(cfg).await;
    let exit = run_until_idle(&env.store, client_for(&sim, 200), engine_config())
        .await
        .unwrap();
    let EngineExit::Idle(t) = exit else {
        panic!("{exit:?}")
    };
    assert_eq!((t.imported, t.failed), (9, 1));
    let (code, text): (i64, String) = db_row(
        &env.store,
        "SELECT result_code, result_text FROM messages WHERE state = 'failed'",
    )
    .await;
    assert_eq!(code, 80002);
    assert!(text.contains("12,000"), "{text}");
    assert_eq!(history(&sim, "g").len(), 9);
    let reasons = env.store.failure_reasons(None, 5).await.unwrap();
    assert_eq!(reasons[0].code, Some(80002));
    sim.shutdown().await;
}

db_test!(a_whole_request_10004_is_bisected_down_to_the_bad_message);
async fn a_whole_request_10004_is_bisected_down_to_the_bad_message(backend: Backend) {
    let env = Env::on(backend).await;
    let mut bodies: Vec<Value> = (0..14).map(|i| text_body(&format!("m{i}"))).collect();
    // An element type the server refuses for the whole request.
    bodies[5] = serde_json::json!([{"MsgType": "TIMImageElem", "MsgContent": {"UUID": "x"}}]);
    queue_raw(&env.store, "g", &bodies).await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    let sim = start_sim(cfg).await;
    let exit = run_until_idle(&env.store, client_for(&sim, 200), engine_config())
        .await
        .unwrap();
    let EngineExit::Idle(t) = exit else {
        panic!("{exit:?}")
    };
    assert_eq!((t.imported, t.failed), (13, 1));
    let failed_line: i64 = scalar(
        &env.store,
        "SELECT source_line FROM messages WHERE state = 'failed'",
    )
    .await;
    assert_eq!(failed_line, 6);
    let texts: Vec<String> = history(&sim, "g")
        .iter()
        .map(|m| body_text(&m.msg_body))
        .collect();
    let want: Vec<String> = (0..14)
        .filter(|i| *i != 5)
        .map(|i| format!("m{i}"))
        .collect();
    assert_eq!(texts, want, "order kept around the bad message");
    sim.shutdown().await;
}

db_test!(rate_limit_answers_slow_the_daemon_without_failed_attempts);
async fn rate_limit_answers_slow_the_daemon_without_failed_attempts(backend: Backend) {
    let env = Env::on(backend).await;
    queue(&env, "a.ndjson", &ndjson(&["a", "b", "c", "d"], 40, 0)).await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    cfg.requests_per_second = 10;
    let sim = start_sim(cfg).await;
    let client = client_for(&sim, 200);
    let exit = run_until_idle(&env.store, client.clone(), engine_config())
        .await
        .unwrap();
    let EngineExit::Idle(t) = exit else {
        panic!("{exit:?}")
    };
    assert_eq!((t.imported, t.failed), (160, 0));
    let limited = sim
        .state()
        .requests
        .iter()
        .filter(|r| r.error_code == Some(60011))
        .count();
    assert!(limited > 0, "the quota was exceeded at first");
    assert!(
        client.pacer().unwrap().current_rate() < 200.0,
        "the pacer slowed down"
    );
    assert_eq!(
        scalar(&env.store, "SELECT MAX(attempts) FROM messages").await,
        1,
        "rate-limit answers are not failed attempts"
    );
    sim.shutdown().await;
}

db_test!(an_auth_failure_stops_every_lane_with_one_clear_error);
async fn an_auth_failure_stops_every_lane_with_one_clear_error(backend: Backend) {
    let env = Env::on(backend).await;
    queue(&env, "a.ndjson", &ndjson(&["a", "b"], 10, 0)).await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    let sim = start_sim(cfg).await;
    let wrong_key = "this-is-the-wrong-key-0000";
    let client = timport::tencent::TencentClient::new(
        timport::tencent::ClientConfig {
            sdkappid: APP,
            identifier: ADMIN.into(),
            secret_key: secrecy::SecretString::from(wrong_key.to_string()),
            base_url: Some(sim.base_url()),
            region: timport::tencent::Region::Singapore,
            request_timeout: Duration::from_secs(5),
            usersig_validity: Duration::from_secs(86_400),
        },
        None,
    )
    .unwrap();
    let err = run_until_idle(&env.store, client, engine_config())
        .await
        .unwrap_err();
    let EngineError::Auth { code, hint, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*code, 70009);
    assert!(hint.contains("tencent.secret_key"));
    let text = format!("{err} {err:?}");
    assert!(!text.contains(wrong_key));
    assert_eq!(
        scalar(
            &env.store,
            "SELECT COUNT(*) FROM messages WHERE state <> 'pending'"
        )
        .await,
        0
    );
    assert_eq!(
        scalar(&env.store, "SELECT MAX(attempts) FROM messages").await,
        0
    );
    sim.shutdown().await;
}

db_test!(applied_but_unanswered_batches_are_reconciled_not_resent_after_the_dedup_window);
async fn applied_but_unanswered_batches_are_reconciled_not_resent_after_the_dedup_window(
    backend: Backend,
) {
    let env = Env::on(backend).await;
    queue(&env, "a.ndjson", &ndjson(&["a", "b"], 30, 4)).await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    // Dedup cannot save us: the window is practically closed.
    cfg.dedup_window = Duration::from_millis(1);
    cfg.faults.p_drop_response_after_apply = 1.0;
    // Only the imports lose their answers (the catch-up's reads before them get through).
    cfg.faults.endpoints = vec!["import_group_msg".into()];
    let sim = start_sim(cfg).await;
    // Phase 1: every answer is lost after the server applied the request; stop the daemon
    // once some imports have landed.
    let daemon = common::Daemon::start(&env.store, client_for(&sim, 200));
    for _ in 0..200 {
        if sim
            .state()
            .requests_to("import_group_msg")
            .filter(|r| r.applied)
            .count()
            >= 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.stop().await;
    let in_flight = scalar(
        &env.store,
        "SELECT COUNT(*) FROM messages WHERE state = 'in_flight'",
    )
    .await;
    assert!(in_flight > 0, "lost answers leave messages in flight");
    let applied_before: usize = ["a", "b"].iter().map(|g| history(&sim, g).len()).sum();
    assert!(applied_before > 0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Phase 2: a restart with the faults gone.
    sim.set_faults(Faults::default()).unwrap();
    let exit = run_until_idle(&env.store, client_for(&sim, 200), engine_config())
        .await
        .unwrap();
    assert!(
        matches!(exit, EngineExit::Idle(t) if t.imported == 60 && t.failed == 0),
        "{exit:?}"
    );
    for g in ["a", "b"] {
        assert_eq!(
            as_tuples(&history(&sim, g)),
            expected(&env.store, g).await,
            "group {g}: each once, in order"
        );
    }
    let reconciled = scalar(
        &env.store,
        "SELECT COUNT(*) FROM messages WHERE result_text LIKE 'found on the server%'",
    )
    .await;
    assert_eq!(
        reconciled as usize, applied_before,
        "every applied message was found, not re-sent"
    );
    sim.shutdown().await;
}

db_test!(retryable_answers_never_fail_a_message_however_many_attempts);
async fn retryable_answers_never_fail_a_message_however_many_attempts(backend: Backend) {
    let env = Env::on(backend).await;
    queue(&env, "a.ndjson", &ndjson(&["a"], 3, 0)).await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    cfg.faults.p_error_10002 = 1.0;
    cfg.faults.endpoints = vec!["import_group_msg".into()];
    let sim = start_sim(cfg).await;
    let daemon = common::Daemon::start(&env.store, client_for(&sim, 200));
    // Far more attempts than max_attempts (5): the messages wait, they do not fail.
    for _ in 0..500 {
        if sim.state().requests_to("import_group_msg").count() >= 12 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sim.state().requests_to("import_group_msg").count() >= 12);
    let t = env.store.totals(None).await.unwrap();
    assert_eq!((t.failed, t.imported, t.blocked), (0, 0, 0), "{t:?}");
    assert!(scalar(&env.store, "SELECT MAX(attempts) FROM messages").await >= 6);
    daemon.stop().await;
    // The service recovers: every message lands, once, in order.
    sim.set_faults(Faults::default()).unwrap();
    let exit = run_until_idle(&env.store, client_for(&sim, 200), engine_config())
        .await
        .unwrap();
    assert!(
        matches!(exit, EngineExit::Idle(t) if t.imported == 3 && t.failed == 0),
        "{exit:?}"
    );
    let texts: Vec<String> = history(&sim, "a")
        .iter()
        .map(|m| body_text(&m.msg_body))
        .collect();
    assert_eq!(texts.len(), 3);
    sim.shutdown().await;
}

db_test!(equal_send_times_refused_by_a_strict_server_fail_or_are_nudged);
async fn equal_send_times_refused_by_a_strict_server_fail_or_are_nudged(backend: Backend) {
    for policy in [TiePolicy::Fail, TiePolicy::Nudge] {
        let env = Env::on(backend).await;
        let mut s = String::new();
        for (i, t) in [0, 1, 1, 1, 2, 5].iter().enumerate() {
            s.push_str(&line("g", "alice", T0 + t, &format!("m{i}")));
            s.push('\n');
        }
        queue(&env, "a.ndjson", &s).await;
        let mut cfg = sim_config();
        cfg.auto_create_groups = true;
        cfg.strict_equal_time = true;
        let sim = start_sim(cfg).await;
        let mut ecfg = engine_config();
        ecfg.tie_policy = policy;
        let exit = run_until_idle(&env.store, client_for(&sim, 200), ecfg)
            .await
            .unwrap();
        let EngineExit::Idle(t) = exit else {
            panic!("{exit:?}")
        };
        let h = history(&sim, "g");
        let texts: Vec<String> = h.iter().map(|m| body_text(&m.msg_body)).collect();
        match policy {
            TiePolicy::Fail => {
                assert_eq!((t.imported, t.failed), (4, 2));
                assert_eq!(texts, ["m0", "m1", "m4", "m5"]);
                let reasons: Vec<String> = db_column(
                    &env.store,
                    "SELECT result_text FROM messages WHERE state = 'failed'",
                )
                .await;
                assert!(
                    reasons
                        .iter()
                        .all(|r| r.contains("equals the group's latest message time")),
                    "{reasons:?}"
                );
            }
            TiePolicy::Nudge => {
                assert_eq!((t.imported, t.failed), (6, 0));
                assert_eq!(texts, ["m0", "m1", "m2", "m3", "m4", "m5"], "order kept");
                let times: Vec<i64> = h.iter().map(|m| m.send_time - T0).collect();
                assert_eq!(
                    times,
                    [0, 1, 2, 3, 4, 5],
                    "moved by the fewest whole seconds"
                );
                let recorded: Vec<(i64, Option<i64>)> = db_rows_with(
                    &env.store,
                    "SELECT send_time - $1, sent_time - $2 FROM messages ORDER BY id",
                    args![T0, T0],
                )
                .await;
                assert_eq!(
                    recorded,
                    [
                        (0, None),
                        (1, None),
                        (1, Some(2)),
                        (1, Some(3)),
                        (2, Some(4)),
                        (5, None)
                    ],
                    "original and sent SendTime both recorded"
                );
            }
        }
        sim.shutdown().await;
    }
}

db_test!(shutdown_stops_claiming_and_leaves_nothing_unrecorded);
async fn shutdown_stops_claiming_and_leaves_nothing_unrecorded(backend: Backend) {
    let env = Env::on(backend).await;
    queue(&env, "a.ndjson", &ndjson(&["a", "b", "c"], 200, 0)).await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    cfg.faults.latency = Duration::from_millis(30);
    let sim = start_sim(cfg).await;
    let daemon = common::Daemon::start(&env.store, client_for(&sim, 200));
    // The stop comes once every group has messages imported (recorded in the store), so the
    // run proves that all lanes were interrupted mid-import, whatever the machine's load.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut all = true;
        for g in ["a", "b", "c"] {
            all &= env.store.totals(Some(g)).await.unwrap().imported > 0;
        }
        if all && env.store.totals(None).await.unwrap().imported >= 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "every group should have messages imported"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let exit = daemon.stop().await;
    assert_eq!(exit, EngineExit::Stopped);
    let t = env.store.totals(None).await.unwrap();
    assert_eq!(
        t.in_flight, 0,
        "in-flight requests finished within the grace period and were recorded"
    );
    assert!(t.pending > 0, "it stopped claiming");
    let on_server: usize = ["a", "b", "c"].iter().map(|g| history(&sim, g).len()).sum();
    assert_eq!(
        on_server as i64, t.imported,
        "the store knows exactly what the server has"
    );
    let per_group: HashMap<&str, usize> = ["a", "b", "c"]
        .iter()
        .map(|g| (*g, history(&sim, g).len()))
        .collect();
    assert!(per_group.values().all(|n| *n > 0));
    sim.shutdown().await;
}

db_test!(expired_history_after_a_lost_answer_blocks_the_lane_and_resends_nothing);
async fn expired_history_after_a_lost_answer_blocks_the_lane_and_resends_nothing(backend: Backend) {
    let env = Env::on(backend).await;
    queue(&env, "a.ndjson", &ndjson(&["old"], 30, 0)).await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    cfg.dedup_window = Duration::from_millis(1);
    // Our SendTimes (2023) are far beyond a one-day retention: they read back as holes.
    cfg.history_retention = Some(Duration::from_secs(86_400));
    cfg.faults.p_drop_response_after_apply = 1.0;
    // Only the imports lose their answers (the catch-up's reads before them get through).
    cfg.faults.endpoints = vec!["import_group_msg".into()];
    let sim = start_sim(cfg).await;
    let daemon = common::Daemon::start(&env.store, client_for(&sim, 200));
    for _ in 0..200 {
        if sim
            .state()
            .requests_to("import_group_msg")
            .any(|r| r.applied)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    daemon.stop().await;
    let landed = history(&sim, "old").len();
    assert!(landed > 0);
    sim.set_faults(Faults::default()).unwrap();
    let exit = run_until_idle(&env.store, client_for(&sim, 200), engine_config())
        .await
        .unwrap();
    let EngineExit::Idle(t) = exit else {
        panic!("{exit:?}")
    };
    assert_eq!(t.imported, 0);
    assert_eq!(t.blocked, 30, "the lane waits for the operator");
    let lanes = env.store.blocked_lanes(5).await.unwrap();
    assert!(
        lanes[0]
            .blocked_reason
            .as_deref()
            .unwrap()
            .contains("inconclusive"),
        "{lanes:?}"
    );
    assert!(
        lanes[0].in_flight > 0,
        "the messages in doubt stay in flight"
    );
    assert_eq!(history(&sim, "old").len(), landed, "nothing was sent again");
    sim.shutdown().await;
}

db_test!(retry_while_the_daemon_runs_unblocks_the_lane);
async fn retry_while_the_daemon_runs_unblocks_the_lane(backend: Backend) {
    let env = Env::on(backend).await;
    queue(&env, "a.ndjson", &ndjson(&["later"], 10, 0)).await;
    let sim = start_sim(sim_config()).await;
    let daemon = common::Daemon::start(&env.store, client_for(&sim, 200));
    let mut blocked = 0;
    for _ in 0..500 {
        blocked = env.store.totals(None).await.unwrap().blocked;
        if blocked == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(blocked, 10, "the missing group blocks its lane");
    // The operator creates the group and retries, as `timport retry --group later` does, while
    // the daemon keeps running.
    sim.add_group("later", 0);
    env.store.retry(RetryScope::Group("later")).await.unwrap();
    let mut imported = 0;
    for _ in 0..500 {
        imported = env.store.totals(None).await.unwrap().imported;
        if imported == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(imported, 10, "the running daemon picked the lane up again");
    daemon.stop().await;
    assert_eq!(history(&sim, "later").len(), 10);
    sim.shutdown().await;
}

db_test!(a_group_commit_records_every_lane_and_claims_each_lanes_own_next_batch);
async fn a_group_commit_records_every_lane_and_claims_each_lanes_own_next_batch(backend: Backend) {
    use timport::store::{Claim, LaneUpdate, MessageUpdate, Record};
    let env = Env::on(backend).await;
    // Three lanes; "b" has a tie at its 3rd message, so its next claim cuts there.
    let mut text = String::new();
    for i in 0..20 {
        for g in ["a", "b", "c"] {
            let t = if g == "b" && i == 9 { T0 + 8 } else { T0 + i };
            text.push_str(&line(g, "u", t, &format!("{g}-{i}")));
            text.push('\n');
        }
    }
    queue(&env, "a.ndjson", &text).await;
    let lanes = env.store.runnable_lanes(i64::MAX, 10).await.unwrap();
    assert_eq!(lanes.len(), 3);
    let mut records = Vec::new();
    let mut first = HashMap::new();
    for (k, lane) in lanes.iter().enumerate() {
        let batch = env.store.claim_batch(lane, 7, false).await.unwrap();
        assert_eq!(batch.len(), 7);
        let updates: Vec<_> = batch
            .iter()
            .enumerate()
            .map(|(i, m)| MessageUpdate::Imported {
                id: m.id,
                msg_seq: i as i64 + 1,
                msg_time: m.send_time,
                note: None,
            })
            .collect();
        let mut after = lane.clone();
        after.last_send_time = batch.last().unwrap().send_time;
        after.last_msg_seq = 7;
        first.insert(lane.group_id.clone(), batch.clone());
        records.push(Record {
            lane_id: lane.id,
            updates,
            lane: LaneUpdate {
                seen_send_time: Some(after.last_send_time),
                seen_msg_seq: Some(7),
                ..LaneUpdate::default()
            },
            // The last lane records only; the others claim, cut at ties.
            next: (k < 2).then_some(Claim {
                lane: after,
                max: 7,
                cut_at_tie: true,
            }),
        });
    }
    let next = env.store.record_many(&records).await.unwrap();
    assert_eq!(next.len(), 3);
    assert!(next[2].is_empty(), "no claim asked, none made");
    for (lane, batch) in lanes.iter().zip(&next).take(2) {
        let g = &lane.group_id;
        let texts: Vec<String> = batch
            .iter()
            .map(|m| body_text(&serde_json::from_str(&m.body).unwrap()))
            .collect();
        let want: Vec<String> = if g == "b" {
            // 7: T0+7, 8: T0+8, 9: T0+8 (the tie ends the batch).
            (7..10).map(|i| format!("b-{i}")).collect()
        } else {
            (7..14).map(|i| format!("{g}-{i}")).collect()
        };
        assert_eq!(texts, want, "lane {g}: its own messages, in order");
        assert!(batch.iter().all(|m| m.attempts == 1));
    }
    for lane in env.store.lanes(None, 10).await.unwrap() {
        let claimed = match lane.group_id.as_str() {
            "a" => 7,
            "b" => 3,
            _ => 0,
        };
        assert_eq!(
            (lane.imported, lane.in_flight, lane.pending),
            (7, claimed, 20 - 7 - claimed),
            "lane {}",
            lane.group_id
        );
        assert_eq!(lane.last_msg_seq, 7);
        let seqs: Vec<i64> = (1..=first[&lane.group_id].len() as i64).collect();
        let stored: Vec<(i64,)> = db_rows_with(
            &env.store,
            "SELECT msg_seq FROM messages m JOIN lanes l ON l.id = m.lane_id
             WHERE l.group_id = $1 AND m.state = 'imported' ORDER BY m.send_time, m.id",
            args![&lane.group_id],
        )
        .await;
        assert_eq!(
            stored.into_iter().map(|(s,)| s).collect::<Vec<_>>(),
            seqs,
            "lane {}: MsgSeq recorded",
            lane.group_id
        );
    }
}

/// Two lanes' answers: (transactions, records) the committer used, with the given window. Lane
/// "a" answers first while "b" still has its request out; "b" answers 50 ms later.
async fn commit_two_answers(backend: Backend, window: Duration) -> (usize, usize) {
    use timport::engine::commit::Committer;
    use timport::store::{LaneUpdate, MessageUpdate, Record};
    let env = Env::on(backend).await;
    let mut text = String::new();
    for g in ["a", "b"] {
        for i in 0..3 {
            text.push_str(&line(g, "u", T0 + i, &format!("{g}-{i}")));
            text.push('\n');
        }
    }
    queue(&env, "a.ndjson", &text).await;
    let lanes = env.store.runnable_lanes(i64::MAX, 10).await.unwrap();
    let done = tokio_util::sync::CancellationToken::new();
    let (committer, task) = Committer::start(env.store.clone(), None, window, done.clone());
    let mut records = Vec::new();
    for lane in &lanes {
        let batch = env.store.claim_batch(lane, 7, false).await.unwrap();
        let updates = batch
            .iter()
            .map(|m| MessageUpdate::Imported {
                id: m.id,
                msg_seq: m.id,
                msg_time: m.send_time,
                note: None,
            })
            .collect();
        records.push(Record {
            lane_id: lane.id,
            updates,
            lane: LaneUpdate::default(),
            next: None,
        });
    }
    let (out_a, out_b) = (committer.outstanding(), committer.outstanding());
    let committer = std::sync::Arc::new(committer);
    let (ra, rb) = (records.remove(0), records.remove(0));
    let c = committer.clone();
    let a = tokio::spawn(async move { c.submit(ra, out_a).await });
    let c = committer.clone();
    let b = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.submit(rb, out_b).await
    });
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    let t = env.store.totals(None).await.unwrap();
    assert_eq!((t.imported, t.in_flight), (6, 0), "both answers recorded");
    let stats = committer.stats();
    done.cancel();
    task.await.unwrap();
    stats
}

db_test!(an_answer_waits_for_a_lane_still_out_within_the_commit_window_only);
async fn an_answer_waits_for_a_lane_still_out_within_the_commit_window_only(backend: Backend) {
    // With a window, "a" waits for "b" (which is still out): one transaction for both.
    assert_eq!(
        commit_two_answers(backend, Duration::from_secs(10)).await,
        (1, 2)
    );
    // Without one, each answer is committed as it comes.
    assert_eq!(commit_two_answers(backend, Duration::ZERO).await, (2, 2));
}

db_test!(a_result_0_pointing_at_another_message_is_a_duplicate_on_the_random_not_an_import);
async fn a_result_0_pointing_at_another_message_is_a_duplicate_on_the_random_not_an_import(
    backend: Backend,
) {
    let env = Env::on(backend).await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    let sim = start_sim(cfg).await;
    // Another importer (a second database) put a message with Random 4242 into the group, within
    // the server's dedup window.
    let other = client_for(&sim, 200);
    other
        .import_group_msg(&timport::tencent::ImportGroupMsgRequest {
            group_id: "g".into(),
            topic_id: None,
            recent_contact_flag: None,
            msg_list: vec![timport::tencent::ImportMsg {
                from_account: "zoe".into(),
                send_time: T0,
                random: Some(4242),
                msg_body: serde_json::value::to_raw_value(&text_body("theirs")).unwrap(),
            }],
        })
        .await
        .unwrap();
    // Ours uses the same Random; the next one does not.
    let mut ours: Value = serde_json::from_str(&line("g", "alice", T0 + 10, "ours")).unwrap();
    ours["Random"] = 4242.into();
    let text = format!("{ours}\n{}\n", line("g", "alice", T0 + 11, "next"));
    queue(&env, "a.ndjson", &text).await;
    let exit = run_until_idle(&env.store, client_for(&sim, 200), engine_config())
        .await
        .unwrap();
    let EngineExit::Idle(t) = exit else {
        panic!("{exit:?}")
    };
    assert_eq!((t.imported, t.failed), (1, 1), "{t:?}");
    let reason: String = db_scalar(
        &env.store,
        "SELECT result_text FROM messages WHERE state = 'failed'",
    )
    .await;
    assert!(
        reason.contains("server-side duplicate on the Random") && reason.contains("\"zoe\""),
        "{reason}"
    );
    let texts: Vec<String> = history(&sim, "g")
        .iter()
        .map(|m| body_text(&m.msg_body))
        .collect();
    assert_eq!(
        texts,
        ["theirs", "next"],
        "ours never landed; the lane went on"
    );
    sim.shutdown().await;
}
