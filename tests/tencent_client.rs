//! The real `TencentClient` against the real simulator on a loopback port: every outcome class,
//! UserSig renewal, secrets kept out of errors, pacing.

mod sim_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::routing::post;
use secrecy::SecretString;
use sim_support::*;
use timport::pacing::{Pacer, Reaction};
use timport::simulator::Faults;
use timport::tencent::usersig::gen_usersig;
use timport::tencent::{
    ApiError, ApiErrorKind, ClientConfig, ErrorClass, GetGroupInfoRequest, Region, TencentClient,
    codes,
};

fn info_req(ids: &[&str]) -> GetGroupInfoRequest {
    GetGroupInfoRequest {
        group_id_list: ids.iter().map(|s| s.to_string()).collect(),
        response_filter: None,
    }
}

/// Neither the key nor the UserSig (raw or as a query parameter) shows in Display or Debug.
fn assert_no_secrets(e: &ApiError, sig: Option<&str>) {
    let text = format!("{e} | {e:?}");
    assert!(!text.contains(KEY), "key leaked: {text}");
    assert!(
        !text.contains("usersig="),
        "usersig parameter leaked: {text}"
    );
    if let Some(sig) = sig {
        assert!(!text.contains(sig), "usersig leaked: {text}");
    }
}

#[tokio::test]
async fn import_succeeds_with_msgseq_from_one_and_fresh_random_per_request() {
    let sim = sim().await;
    let c = client(&sim);
    let t = now() - 1000;
    let resp = c
        .import_group_msg(&import(
            "g1",
            vec![msg("a", t, 1), msg("b", t + 1, 2), msg("a", t + 2, 3)],
        ))
        .await
        .expect("imported");
    let results = resp.import_msg_result.expect("results");
    let seqs: Vec<_> = results
        .iter()
        .map(|r| (r.result, r.msg_seq, r.msg_time))
        .collect();
    assert_eq!(
        seqs,
        vec![
            (0, Some(1), Some(t)),
            (0, Some(2), Some(t + 1)),
            (0, Some(3), Some(t + 2))
        ]
    );
    c.import_group_msg(&import("g1", vec![msg("c", t + 3, 4)]))
        .await
        .expect("imported");

    let state = sim.state();
    let g = state.group("g1").expect("g1");
    let stored: Vec<_> = g
        .messages
        .iter()
        .map(|m| (m.msg_seq, m.from_account.as_str(), m.send_time, m.random))
        .collect();
    assert_eq!(
        stored,
        vec![
            (1, "a", t, 1),
            (2, "b", t + 1, 2),
            (3, "a", t + 2, 3),
            (4, "c", t + 3, 4)
        ]
    );
    assert_eq!(g.messages[0].msg_body, text(&format!("a at {t}")));
    let randoms: Vec<_> = state
        .requests_to("import_group_msg")
        .map(|r| r.query_random.expect("random sent"))
        .collect();
    assert_eq!(randoms.len(), 2);
    assert_ne!(randoms[0], randoms[1]);
    sim.shutdown().await;
}

#[tokio::test]
async fn missing_group_is_10010_permanent() {
    let sim = sim().await;
    let e = client(&sim)
        .import_group_msg(&import("nope", vec![msg("a", now() - 10, 1)]))
        .await
        .expect_err("no such group");
    assert_eq!(e.code(), Some(codes::GROUP_NOT_FOUND));
    assert_eq!(e.class(), ErrorClass::Permanent);
    assert_eq!(e.endpoint, "import_group_msg");
    assert!(!e.may_have_been_applied());
    sim.shutdown().await;
}

#[tokio::test]
async fn wrong_key_is_70009_permanent_without_leaking_secrets() {
    let sim = sim().await;
    let c = client_with(&sim, |cfg| {
        cfg.secret_key = SecretString::from("not-the-key".to_owned());
    });
    let sig = gen_usersig("not-the-key", APP, ADMIN, now() as u64, 86_400);
    c.override_usersig(SecretString::from(sig.clone()));
    let e = c
        .get_group_info(&info_req(&["g1"]))
        .await
        .expect_err("bad key");
    assert_eq!(e.code(), Some(70009));
    assert_eq!(e.class(), ErrorClass::Permanent);
    assert_no_secrets(&e, Some(&sig));
    assert!(!format!("{c:?}").contains("not-the-key"));
    // Not an auth-class code: no renewal, no retry.
    assert_eq!(sim.state().requests.len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn wrong_identifier_is_70013_and_wrong_app_is_70014() {
    let sim = sim().await;
    let e = client_with(&sim, |cfg| cfg.identifier = "bob".into())
        .get_group_info(&info_req(&["g1"]))
        .await
        .expect_err("not the admin");
    assert_eq!(e.code(), Some(70013));
    assert_eq!(e.class(), ErrorClass::Permanent);
    assert_no_secrets(&e, None);

    let e = client_with(&sim, |cfg| cfg.sdkappid = APP + 1)
        .get_group_info(&info_req(&["g1"]))
        .await
        .expect_err("other app");
    assert_eq!(e.code(), Some(70014));
    assert_eq!(e.class(), ErrorClass::Permanent);
    assert_no_secrets(&e, None);
    sim.shutdown().await;
}

#[tokio::test]
async fn expired_usersig_is_renewed_once_and_the_request_retried() {
    let sim = sim().await;
    let c = client(&sim);
    let expired = gen_usersig(KEY, APP, ADMIN, (now() - 100_000) as u64, 60);
    c.override_usersig(SecretString::from(expired));
    let resp = c
        .import_group_msg(&import("g1", vec![msg("a", now() - 5, 9)]))
        .await
        .expect("renewed and imported");
    assert_eq!(resp.import_msg_result.expect("results")[0].msg_seq, Some(1));
    let state = sim.state();
    let codes: Vec<_> = state
        .requests_to("import_group_msg")
        .map(|r| r.error_code)
        .collect();
    assert_eq!(codes, vec![Some(70001), Some(0)]);
    assert_eq!(state.group("g1").expect("g1").messages.len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_tiny_validity_renews_before_expiry() {
    let sim = sim().await;
    let c = client_with(&sim, |cfg| cfg.usersig_validity = Duration::from_secs(1));
    for _ in 0..3 {
        c.get_group_info(&info_req(&["g1"])).await.expect("ok");
    }
    assert!(sim.state().requests.iter().all(|r| r.error_code == Some(0)));
    sim.shutdown().await;
}

#[tokio::test]
async fn quota_exceeded_is_rate_limited_and_slows_the_pacer() {
    let sim = sim_with(|cfg| cfg.requests_per_second = 1).await;
    let pacer = Arc::new(Pacer::new(1000));
    let c = TencentClient::new(client_config(&sim), Some(pacer.clone())).expect("client");
    c.get_group_info(&info_req(&["g1"]))
        .await
        .expect("first fits the quota");
    let e = c
        .get_group_info(&info_req(&["g1"]))
        .await
        .expect_err("second exceeds it");
    assert_eq!(e.code(), Some(codes::APP_RATE_LIMIT));
    assert_eq!(e.class(), ErrorClass::RateLimited);
    assert_eq!(pacer.current_rate(), 1000.0, "one answer keeps the ceiling");
    let e = c
        .get_group_info(&info_req(&["g1"]))
        .await
        .expect_err("third exceeds it too");
    assert_eq!(e.code(), Some(codes::APP_RATE_LIMIT));
    assert!(pacer.current_rate() < 1000.0, "repeated answers lower it");
    sim.shutdown().await;
}

#[tokio::test]
async fn injected_rate_limit_is_60007_rate_limited() {
    let sim = sim_with(|cfg| cfg.faults.p_rate_limit = 1.0).await;
    let e = client(&sim)
        .import_group_msg(&import("g1", vec![msg("a", now() - 5, 1)]))
        .await
        .expect_err("limited");
    assert_eq!(e.code(), Some(codes::REST_RATE_LIMIT));
    assert_eq!(e.class(), ErrorClass::RateLimited);
    assert!(sim.state().group("g1").expect("g1").messages.is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn error_10002_is_retryable_and_not_applied() {
    let sim = sim_with(|cfg| cfg.faults.p_error_10002 = 1.0).await;
    let e = client(&sim)
        .import_group_msg(&import("g1", vec![msg("a", now() - 5, 1)]))
        .await
        .expect_err("10002");
    assert_eq!(e.code(), Some(10002));
    assert_eq!(e.class(), ErrorClass::Retryable);
    assert!(sim.state().group("g1").expect("g1").messages.is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn http_502_is_unknown_and_not_applied() {
    let sim = sim_with(|cfg| cfg.faults.p_http_502 = 1.0).await;
    let e = client(&sim)
        .import_group_msg(&import("g1", vec![msg("a", now() - 5, 1)]))
        .await
        .expect_err("502");
    assert_eq!(e.kind, ApiErrorKind::HttpStatus(502));
    assert_eq!(e.class(), ErrorClass::Unknown);
    assert!(e.may_have_been_applied());
    assert_eq!(e.code(), None);
    assert!(sim.state().group("g1").expect("g1").messages.is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn dropped_response_is_unknown_but_was_applied() {
    let sim = sim_with(|cfg| cfg.faults.p_drop_response_after_apply = 1.0).await;
    let c = client(&sim);
    let sig = gen_usersig(KEY, APP, ADMIN, now() as u64, 86_400);
    c.override_usersig(SecretString::from(sig.clone()));
    let t = now() - 5;
    let e = c
        .import_group_msg(&import("g1", vec![msg("a", t, 77)]))
        .await
        .expect_err("no answer");
    assert_eq!(e.class(), ErrorClass::Unknown, "{e:?}");
    assert!(e.is_transport());
    assert_no_secrets(&e, Some(&sig));
    let state = sim.state();
    let g = state.group("g1").expect("g1");
    assert_eq!(g.messages.len(), 1);
    assert_eq!((g.messages[0].send_time, g.messages[0].random), (t, 77));
    sim.shutdown().await;
}

#[tokio::test]
async fn reset_before_processing_is_a_transport_error_and_nothing_applied() {
    let sim = sim_with(|cfg| cfg.faults.p_reset_before = 1.0).await;
    let c = client(&sim);
    let sig = gen_usersig(KEY, APP, ADMIN, now() as u64, 86_400);
    c.override_usersig(SecretString::from(sig.clone()));
    let e = c
        .import_group_msg(&import("g1", vec![msg("a", now() - 5, 1)]))
        .await
        .expect_err("reset");
    assert!(e.is_transport(), "{e:?}");
    assert!(matches!(e.kind, ApiErrorKind::Transport(_)), "{e:?}");
    assert_eq!(e.class(), ErrorClass::Unknown);
    assert_no_secrets(&e, Some(&sig));
    let state = sim.state();
    assert!(state.group("g1").expect("g1").messages.is_empty());
    assert_eq!(state.requests[0].fault.as_deref(), Some("reset_before"));
    assert!(!state.requests[0].applied);

    // Faults can be cleared at run time; the same client then succeeds.
    sim.set_faults(Faults::default()).expect("valid faults");
    c.import_group_msg(&import("g1", vec![msg("a", now() - 5, 1)]))
        .await
        .expect("imported after the fault is cleared");
    sim.shutdown().await;
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let mut cfg = ClientConfig::new(APP, ADMIN, SecretString::from(KEY.to_owned()));
    cfg.base_url = Some(format!("http://{addr}"));
    let c = TencentClient::new(cfg, None).expect("client");
    let e = c
        .get_group_info(&info_req(&["g1"]))
        .await
        .expect_err("refused");
    assert!(matches!(e.kind, ApiErrorKind::Connect(_)), "{e:?}");
    assert_eq!(e.class(), ErrorClass::Retryable);
    assert!(!e.may_have_been_applied());
    assert_no_secrets(&e, None);
}

#[tokio::test]
async fn timeout_is_unknown() {
    let sim = sim_with(|cfg| cfg.faults.latency = Duration::from_secs(2)).await;
    let c = client_with(&sim, |cfg| cfg.request_timeout = Duration::from_millis(200));
    let e = c
        .get_group_info(&info_req(&["g1"]))
        .await
        .expect_err("times out");
    assert_eq!(e.kind, ApiErrorKind::Timeout);
    assert_eq!(e.class(), ErrorClass::Unknown);
    sim.shutdown().await;
}

/// A scripted server for answers the simulator never gives.
async fn scripted(answer: &'static str, hits: Arc<AtomicUsize>) -> String {
    let app = axum::Router::new().route(
        "/v4/{service}/{command}",
        post(move || {
            hits.fetch_add(1, Ordering::SeqCst);
            async move { answer }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

fn scripted_client(base: String) -> TencentClient {
    let mut cfg = ClientConfig::new(APP, ADMIN, SecretString::from(KEY.to_owned()));
    cfg.base_url = Some(base);
    TencentClient::new(cfg, None).expect("client")
}

#[tokio::test]
async fn persistent_auth_failure_is_retried_once_then_returned() {
    let hits = Arc::new(AtomicUsize::new(0));
    let base = scripted(
        r#"{"ActionStatus":"FAIL","ErrorCode":70001,"ErrorInfo":"expired"}"#,
        hits.clone(),
    )
    .await;
    let e = scripted_client(base)
        .get_group_info(&info_req(&["g1"]))
        .await
        .expect_err("auth");
    assert_eq!(e.class(), ErrorClass::Auth);
    assert_eq!(e.info(), "expired");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn failed_import_answer_still_exposes_its_results() {
    let hits = Arc::new(AtomicUsize::new(0));
    let base = scripted(
        r#"{"ActionStatus":"FAIL","ErrorCode":10004,"ErrorInfo":"bad time",
            "ImportMsgResult":[{"Result":10004,"MsgTime":5},{"Result":0,"MsgSeq":3,"MsgTime":6}]}"#,
        hits,
    )
    .await;
    let e = scripted_client(base)
        .import_group_msg(&import("g1", vec![msg("a", 5, 1), msg("a", 6, 2)]))
        .await
        .expect_err("failed answer");
    assert_eq!(e.class(), ErrorClass::PerMessage);
    let results = e.import_results.expect("results kept");
    assert_eq!(results[1].msg_seq, Some(3));
}

#[tokio::test]
async fn non_json_answer_is_unknown() {
    let hits = Arc::new(AtomicUsize::new(0));
    let base = scripted("<html>busy</html>", hits).await;
    let e = scripted_client(base)
        .get_group_info(&info_req(&["g1"]))
        .await
        .expect_err("not JSON");
    assert!(matches!(e.kind, ApiErrorKind::BadResponse(_)));
    assert_eq!(e.class(), ErrorClass::Unknown);
}

#[tokio::test]
async fn get_group_info_ignores_the_top_level_code_when_groups_are_listed() {
    let hits = Arc::new(AtomicUsize::new(0));
    let base = scripted(
        r#"{"ActionStatus":"FAIL","ErrorCode":10010,"ErrorInfo":"",
            "GroupInfo":[{"GroupId":"x","ErrorCode":10010,"ErrorInfo":"gone"}]}"#,
        hits,
    )
    .await;
    let r = scripted_client(base)
        .get_group_info(&info_req(&["x"]))
        .await
        .expect("per-group codes only");
    assert_eq!(r.group_info[0].error_code, 10010);
}

#[test]
fn client_config_validation() {
    let mut cfg = ClientConfig::new(APP, ADMIN, SecretString::from(KEY.to_owned()));
    assert!(TencentClient::new(cfg.clone(), None).is_ok());
    assert!(!format!("{cfg:?}").contains(KEY));
    cfg.region = Region::Frankfurt;
    assert_eq!(
        cfg.effective_base_url(),
        "https://adminapiger.im.qcloud.com"
    );
    cfg.base_url = Some("ftp://example".into());
    assert!(TencentClient::new(cfg.clone(), None).is_err());
    cfg.base_url = Some("not a url".into());
    assert!(TencentClient::new(cfg.clone(), None).is_err());
    cfg.base_url = None;
    cfg.identifier.clear();
    assert!(TencentClient::new(cfg, None).is_err());
}

#[test]
fn pacer_keeps_its_ceiling_on_one_answer_learns_on_repeated_and_probes_back() {
    let t0 = Instant::now();
    let p = Pacer::new(100);
    let mut starts = vec![];
    let mut t = t0;
    for _ in 0..150 {
        let s = p
            .try_start_at(t)
            .unwrap_or_else(|due| p.try_start_at(due).expect("due"));
        starts.push(s);
        t = s;
    }
    let rl = Duration::from_millis(40);
    assert_eq!(
        p.on_rate_limited_at(starts[120] + rl, starts[120]),
        Reaction::SkippedSlot
    );
    assert_eq!(p.current_rate(), 100.0);
    // The second answer within a second: the ceiling becomes what was accepted in the second
    // before the first refused start (99 starts at 99.5/s).
    let learned = p.on_rate_limited_at(starts[121] + rl, starts[121]);
    assert_eq!(learned, Reaction::Learned(99.0));
    assert_eq!(p.current_rate(), 99.0);
    // Quiet: probes back up to the maximum within seconds.
    let quiet = starts[121] + rl;
    assert_eq!(p.probe_at(quiet + Duration::from_secs(1)), 99.0);
    assert_eq!(
        p.probe_at(quiet + Duration::from_secs(2)),
        100.0,
        "+1% of the maximum"
    );
    assert_eq!(p.probe_at(quiet + Duration::from_secs(3)), 100.0, "kept");
}

#[tokio::test]
async fn an_error_info_echoing_the_query_is_scrubbed() {
    let app = axum::Router::new().route(
        "/v4/{service}/{command}",
        post(
            |axum::extract::RawQuery(q): axum::extract::RawQuery| async move {
                axum::Json(serde_json::json!({
                    "ActionStatus": "FAIL", "ErrorCode": 70009,
                    "ErrorInfo": format!("bad request {}", q.unwrap_or_default()),
                }))
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let c = scripted_client(format!("http://{addr}"));
    let sig = gen_usersig(KEY, APP, ADMIN, now() as u64, 86_400);
    c.override_usersig(SecretString::from(sig.clone()));
    let e = c
        .get_group_info(&info_req(&["g1"]))
        .await
        .expect_err("refused");
    assert!(e.info().contains("sdkappid="), "{e}");
    let text = format!("{e} | {e:?}");
    assert!(!text.contains(&sig), "usersig leaked: {text}");
}
