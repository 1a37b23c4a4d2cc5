//! The simulator's documented rules, exercised through the real client on a loopback port.

mod sim_support;

use std::time::Duration;

use serde_json::json;
use sim_support::*;
use timport::simulator::{Faults, SimSnapshot};
use timport::tencent::{
    ErrorClass, GetGroupInfoRequest, GroupMsgGetSimpleRequest, ImportGroupMemberRequest,
    ImportGroupRequest, ImportMember, ImportMsg, SetUnreadMsgNumRequest, codes,
};

fn results(r: &timport::tencent::ImportGroupMsgResponse) -> Vec<(i64, Option<u64>)> {
    r.import_msg_result
        .as_ref()
        .expect("results")
        .iter()
        .map(|x| (x.result, x.msg_seq))
        .collect()
}

fn stored_times(s: &SimSnapshot, g: &str) -> Vec<i64> {
    s.group(g)
        .expect("group")
        .messages
        .iter()
        .map(|m| m.send_time)
        .collect()
}

#[tokio::test]
async fn more_than_seven_messages_is_a_request_level_10004() {
    let sim = sim().await;
    let t = now() - 100;
    let msgs = (0..8).map(|i| msg("a", t + i, i as u32)).collect();
    let e = client(&sim)
        .import_group_msg(&import("g1", msgs))
        .await
        .expect_err("too many");
    assert_eq!(e.code(), Some(codes::INVALID_PARAMETER));
    assert_eq!(e.class(), ErrorClass::PerMessage);
    assert!(e.import_results.is_none());
    assert!(stored_times(&sim.state(), "g1").is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn oversized_body_is_80002_for_that_message_only() {
    let sim = sim().await;
    let t = now() - 100;
    let big = ImportMsg {
        msg_body: raw(&text(&"x".repeat(12_001))),
        ..msg("a", t + 1, 2)
    };
    let r = client(&sim)
        .import_group_msg(&import("g1", vec![msg("a", t, 1), big, msg("a", t + 2, 3)]))
        .await
        .expect("answered");
    assert_eq!(
        results(&r),
        vec![(0, Some(1)), (codes::MSG_TOO_LONG, None), (0, Some(2))]
    );
    assert_eq!(stored_times(&sim.state(), "g1"), vec![t, t + 2]);
    sim.shutdown().await;
}

#[tokio::test]
async fn send_time_rules_future_old_out_of_order_and_equal() {
    let sim = sim().await;
    let c = client(&sim);
    let t = now() - 1000;
    let r = c
        .import_group_msg(&import(
            "g1",
            vec![
                msg("a", now() + 3600, 1), // future
                msg("a", CREATED, 2),      // not after CreateTime
                msg("a", t, 3),
                msg("a", t, 4),     // equal to the newest: allowed by default
                msg("a", t - 1, 5), // older than the newest
            ],
        ))
        .await
        .expect("answered");
    assert_eq!(
        results(&r),
        vec![
            (10004, None),
            (10004, None),
            (0, Some(1)),
            (0, Some(2)),
            (10004, None)
        ]
    );
    sim.shutdown().await;

    let strict = sim_with(|cfg| cfg.strict_equal_time = true).await;
    let r = client(&strict)
        .import_group_msg(&import("g1", vec![msg("a", t, 1), msg("a", t, 2)]))
        .await
        .expect("answered");
    assert_eq!(results(&r), vec![(0, Some(1)), (10004, None)]);
    strict.shutdown().await;
}

#[tokio::test]
async fn element_rules_are_request_level_10004() {
    let sim = sim().await;
    let c = client(&sim);
    let t = now() - 100;
    let image = ImportMsg {
        msg_body: raw(&json!([{"MsgType": "TIMImageElem", "MsgContent": {"UUID": "x"}}])),
        ..msg("a", t, 1)
    };
    let two_custom = ImportMsg {
        msg_body: raw(&json!([
            {"MsgType": "TIMCustomElem", "MsgContent": {"Data": "1"}},
            {"MsgType": "TIMCustomElem", "MsgContent": {"Data": "2"}}
        ])),
        ..msg("a", t, 2)
    };
    for bad in [image, two_custom] {
        let e = c
            .import_group_msg(&import("g1", vec![msg("a", t, 9), bad]))
            .await
            .expect_err("rejected");
        assert_eq!(e.code(), Some(10004));
    }
    assert!(stored_times(&sim.state(), "g1").is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn random_dedup_inside_the_window_answers_the_original_msgseq() {
    let sim = sim().await;
    let c = client(&sim);
    let t = now() - 100;
    let batch = import("g1", vec![msg("a", t, 11), msg("b", t + 1, 12)]);
    let first = c.import_group_msg(&batch).await.expect("first");
    let again = c.import_group_msg(&batch).await.expect("retry");
    assert_eq!(results(&first), vec![(0, Some(1)), (0, Some(2))]);
    assert_eq!(results(&again), results(&first));
    // Same Random with another time and sender is absorbed too.
    let other = c
        .import_group_msg(&import("g1", vec![msg("z", t + 50, 11)]))
        .await
        .expect("dup");
    assert_eq!(results(&other), vec![(0, Some(1))]);
    assert_eq!(stored_times(&sim.state(), "g1"), vec![t, t + 1]);
    // Another group does not share the Random space.
    let g2 = c
        .import_group_msg(&import("g2", vec![msg("a", t, 11)]))
        .await
        .expect("g2");
    assert_eq!(results(&g2), vec![(0, Some(1))]);
    sim.shutdown().await;
}

#[tokio::test]
async fn random_outside_the_window_is_stored_again() {
    let sim = sim_with(|cfg| cfg.dedup_window = Duration::ZERO).await;
    let c = client(&sim);
    let t = now() - 100;
    let batch = import("g1", vec![msg("a", t, 11)]);
    c.import_group_msg(&batch).await.expect("first");
    let again = c.import_group_msg(&batch).await.expect("second");
    assert_eq!(results(&again), vec![(0, Some(2))]);
    assert_eq!(stored_times(&sim.state(), "g1"), vec![t, t]);
    sim.shutdown().await;
}

#[tokio::test]
async fn topics_have_their_own_history_and_seq() {
    let sim = sim().await;
    let c = client(&sim);
    let t = now() - 100;
    c.import_group_msg(&import("g1", vec![msg("a", t, 1)]))
        .await
        .expect("main");
    let mut req = import("g1", vec![msg("a", t - 10, 1)]);
    req.topic_id = Some("topic-1".into());
    let r = c.import_group_msg(&req).await.expect("topic");
    assert_eq!(results(&r), vec![(0, Some(1))]);
    let s = sim.state();
    let g = s.group("g1").expect("g1");
    assert_eq!(g.messages.len(), 1);
    assert_eq!(g.topics["topic-1"][0].send_time, t - 10);
    let page = c
        .group_msg_get_simple(&GroupMsgGetSimpleRequest {
            group_id: "g1".into(),
            req_msg_number: 20,
            req_msg_seq: None,
            topic_id: Some("topic-1".into()),
            with_recalled_msg: None,
        })
        .await
        .expect("page");
    assert_eq!(page.rsp_msg_list.len(), 1);
    assert_eq!(page.rsp_msg_list[0].msg_time_stamp, t - 10);
    sim.shutdown().await;
}

#[tokio::test]
async fn get_group_info_reports_each_group() {
    let sim = sim().await;
    let c = client(&sim);
    let t = now() - 100;
    c.import_group_msg(&import("g1", vec![msg("a", t, 1), msg("a", t + 5, 2)]))
        .await
        .expect("imported");
    let r = c
        .get_group_info(&GetGroupInfoRequest {
            group_id_list: vec!["g1".into(), "missing".into(), "g2".into()],
            response_filter: None,
        })
        .await
        .expect("info");
    let g1 = &r.group_info[0];
    assert_eq!(
        (
            g1.error_code,
            g1.create_time,
            g1.last_msg_time,
            g1.next_msg_seq,
            g1.member_num
        ),
        (0, Some(CREATED), Some(t + 5), Some(3), Some(0))
    );
    assert_eq!(r.group_info[1].group_id, "missing");
    assert_eq!(r.group_info[1].error_code, codes::GROUP_NOT_FOUND);
    assert_eq!(r.group_info[2].next_msg_seq, Some(1));
    sim.shutdown().await;
}

#[tokio::test]
async fn group_msg_get_simple_pages_newest_first() {
    let sim = sim().await;
    let c = client(&sim);
    let t = now() - 1000;
    let all: Vec<ImportMsg> = (0..45).map(|i| msg("a", t + i, 1000 + i as u32)).collect();
    for chunk in all.chunks(7) {
        c.import_group_msg(&import("g1", chunk.to_vec()))
            .await
            .expect("imported");
    }
    let mut seen = Vec::new();
    let mut next: Option<u64> = None;
    loop {
        let page = c
            .group_msg_get_simple(&GroupMsgGetSimpleRequest {
                group_id: "g1".into(),
                req_msg_number: 20,
                req_msg_seq: next,
                topic_id: None,
                with_recalled_msg: None,
            })
            .await
            .expect("page");
        assert!(page.rsp_msg_list.len() <= 20);
        for m in &page.rsp_msg_list {
            assert_eq!(m.random_u32(), Some(1000 + (m.msg_seq as u32 - 1)));
            assert_eq!(m.msg_time_stamp, t + m.msg_seq as i64 - 1);
            seen.push(m.msg_seq);
        }
        if page.is_finished == 1 {
            break;
        }
        next = page.rsp_msg_list.last().map(|m| m.msg_seq - 1);
    }
    assert_eq!(seen, (1..=45).rev().collect::<Vec<u64>>());
    // Asking for more than 20 still returns at most 20.
    let big = c
        .group_msg_get_simple(&GroupMsgGetSimpleRequest {
            group_id: "g1".into(),
            req_msg_number: 100,
            req_msg_seq: Some(30),
            topic_id: None,
            with_recalled_msg: None,
        })
        .await
        .expect("page");
    assert_eq!(big.rsp_msg_list.len(), 20);
    assert_eq!(big.rsp_msg_list[0].msg_seq, 30);
    assert_eq!(big.is_finished, 0);
    let e = c
        .group_msg_get_simple(&GroupMsgGetSimpleRequest {
            group_id: "nope".into(),
            req_msg_number: 5,
            req_msg_seq: None,
            topic_id: None,
            with_recalled_msg: None,
        })
        .await
        .expect_err("missing");
    assert_eq!(e.code(), Some(10010));
    sim.shutdown().await;
}

fn group_req(id: &str, create_time: i64) -> ImportGroupRequest {
    ImportGroupRequest {
        group_type: "Public".into(),
        group_id: Some(id.into()),
        name: format!("name of {id}"),
        owner_account: Some("owner".into()),
        create_time: Some(create_time),
        ..Default::default()
    }
}

#[tokio::test]
async fn import_group_creates_then_answers_10021() {
    let sim = sim().await;
    let c = client(&sim);
    let r = c
        .import_group(&group_req("new-group", CREATED + 10))
        .await
        .expect("created");
    assert_eq!(r.group_id, "new-group");
    let e = c
        .import_group(&group_req("new-group", CREATED + 10))
        .await
        .expect_err("exists");
    assert_eq!(e.code(), Some(codes::GROUP_ID_IN_USE));
    assert_eq!(e.class(), ErrorClass::Permanent);
    let s = sim.state();
    let g = s.group("new-group").expect("created");
    assert_eq!(g.create_time, CREATED + 10);
    assert_eq!(g.owner_account.as_deref(), Some("owner"));
    // A message before the CreateTime is refused.
    let r = c
        .import_group_msg(&import("new-group", vec![msg("a", CREATED + 5, 1)]))
        .await
        .expect("answered");
    assert_eq!(results(&r), vec![(10004, None)]);
    sim.shutdown().await;
}

fn member(name: &str, join: Option<i64>, unread: Option<u64>) -> ImportMember {
    ImportMember {
        member_account: name.into(),
        role: None,
        join_time: join,
        unread_msg_num: unread,
    }
}

#[tokio::test]
async fn import_group_member_results_and_limits() {
    let sim = sim().await;
    let c = client(&sim);
    let t = now() - 100;
    c.import_group_msg(&import("g1", vec![msg("a", t, 1), msg("a", t + 1, 2)]))
        .await
        .expect("two messages");
    let r = c
        .import_group_member(&ImportGroupMemberRequest {
            group_id: "g1".into(),
            member_list: vec![
                member("m1", Some(CREATED + 1), Some(50)),
                member("m1", Some(CREATED + 1), None),
                member("early", Some(CREATED - 1), None),
                member("late", Some(now() + 3600), None),
            ],
        })
        .await
        .expect("answered");
    let got: Vec<_> = r
        .member_list
        .iter()
        .map(|m| (m.member_account.as_str(), m.result))
        .collect();
    assert_eq!(got, vec![("m1", 1), ("m1", 2), ("early", 0), ("late", 0)]);
    let s = sim.state();
    let members = &s.group("g1").expect("g1").members;
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].unread_msg_num, 2, "capped at the message count");

    let too_many = (0..301)
        .map(|i| member(&format!("u{i}"), None, None))
        .collect();
    let e = c
        .import_group_member(&ImportGroupMemberRequest {
            group_id: "g1".into(),
            member_list: too_many,
        })
        .await
        .expect_err("too many");
    assert_eq!(e.code(), Some(10004));
    sim.shutdown().await;
}

#[tokio::test]
async fn set_unread_msg_num_is_capped() {
    let sim = sim().await;
    let c = client(&sim);
    let t = now() - 100;
    c.import_group_member(&ImportGroupMemberRequest {
        group_id: "g1".into(),
        member_list: vec![member("m1", None, None)],
    })
    .await
    .expect("member");
    c.import_group_msg(&import(
        "g1",
        vec![msg("a", t, 1), msg("a", t + 1, 2), msg("a", t + 2, 3)],
    ))
    .await
    .expect("three messages");
    let set = |n: u64, g: &str| SetUnreadMsgNumRequest {
        group_id: g.into(),
        member_account: "m1".into(),
        unread_msg_num: n,
    };
    c.set_unread_msg_num(&set(2, "g1")).await.expect("set");
    assert_eq!(
        sim.state().group("g1").expect("g1").members[0].unread_msg_num,
        2
    );
    c.set_unread_msg_num(&set(99, "g1")).await.expect("set");
    assert_eq!(
        sim.state().group("g1").expect("g1").members[0].unread_msg_num,
        3
    );
    let e = c
        .set_unread_msg_num(&set(1, "missing"))
        .await
        .expect_err("missing group");
    assert_eq!(e.code(), Some(10010));
    sim.shutdown().await;
}

#[tokio::test]
async fn auto_created_groups_accept_imports() {
    let sim = sim_with(|cfg| cfg.auto_create_groups = true).await;
    let r = client(&sim)
        .import_group_msg(&import("fresh", vec![msg("a", now() - 5, 1)]))
        .await
        .expect("auto-created");
    assert_eq!(results(&r), vec![(0, Some(1))]);
    assert!(sim.state().group("fresh").is_some());
    sim.shutdown().await;
}

#[tokio::test]
async fn query_string_is_checked() {
    let sim = sim().await;
    let http = reqwest::Client::new();
    let url = format!("{}/v4/group_open_http_svc/get_group_info", sim.base_url());
    let sig = timport::tencent::usersig::gen_usersig(KEY, APP, ADMIN, now() as u64, 3600);
    let body = r#"{"GroupIdList":["g1"]}"#;
    let cases = [
        (
            format!("sdkappid={APP}&identifier={ADMIN}&random=1&contenttype=json"),
            70002,
        ),
        (
            format!("sdkappid={APP}&identifier={ADMIN}&usersig={sig}&contenttype=json"),
            60002,
        ),
        (
            format!("sdkappid={APP}&identifier={ADMIN}&usersig={sig}&random=1&contenttype=xml"),
            60002,
        ),
        (
            format!("identifier={ADMIN}&usersig={sig}&random=1&contenttype=json"),
            60012,
        ),
        (
            format!("sdkappid={APP}&identifier={ADMIN}&usersig=garbage&random=1&contenttype=json"),
            70003,
        ),
        (
            format!("sdkappid={APP}&identifier={ADMIN}&usersig={sig}&random=1&contenttype=json"),
            0,
        ),
    ];
    for (query, want) in cases {
        let v: serde_json::Value = http
            .post(format!("{url}?{query}"))
            .body(body)
            .send()
            .await
            .expect("sent")
            .json()
            .await
            .expect("json");
        assert_eq!(v["ErrorCode"], want, "{query}");
    }
    let v: serde_json::Value = http
        .post(format!(
            "{url}?sdkappid={APP}&identifier={ADMIN}&usersig={sig}&random=1&contenttype=json"
        ))
        .body("not json")
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(v["ErrorCode"], 60003);
    sim.shutdown().await;
}

#[tokio::test]
async fn admin_routes_create_groups_dump_state_and_set_faults() {
    let sim = sim().await;
    let http = reqwest::Client::new();
    let base = sim.base_url();
    let created = http
        .post(format!("{base}/admin/groups"))
        .json(&json!({"GroupId": "adm", "CreateTime": CREATED}))
        .send()
        .await
        .expect("sent");
    assert_eq!(created.status(), 201);
    let again = http
        .post(format!("{base}/admin/groups"))
        .json(&json!({"GroupId": "adm"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(again.status(), 409);

    client(&sim)
        .import_group_msg(&import("adm", vec![msg("a", now() - 5, 1)]))
        .await
        .expect("imported");
    let state: SimSnapshot = http
        .get(format!("{base}/admin/state"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("snapshot");
    assert_eq!(state, sim.state());
    assert_eq!(state.group("adm").expect("adm").messages.len(), 1);

    let set = http
        .post(format!("{base}/admin/faults"))
        .json(&json!({"p_error_10002": 1.0, "latency": "1ms"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(set.status(), 200);
    let e = client(&sim)
        .import_group_msg(&import("adm", vec![msg("a", now() - 4, 2)]))
        .await
        .expect_err("fault");
    assert_eq!(e.code(), Some(10002));
    let bad = http
        .post(format!("{base}/admin/faults"))
        .json(&json!({"p_http_502": 2.0}))
        .send()
        .await
        .expect("sent");
    assert_eq!(bad.status(), 400);
    assert!(
        sim.set_faults(Faults {
            p_reset_before: -1.0,
            ..Faults::default()
        })
        .is_err()
    );
    sim.shutdown().await;
}

mod limiters {
    use std::time::{Duration, Instant};

    use timport::simulator::Limiter;
    use timport::simulator::state::QuotaLimiter;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn admit_all(q: &mut QuotaLimiter, t0: Instant, at_ms: &[u64]) -> Vec<bool> {
        at_ms.iter().map(|m| q.admit(t0 + ms(*m))).collect()
    }

    #[test]
    fn sliding_passes_exactly_the_quota_per_second_of_arrivals() {
        let t0 = Instant::now();
        let mut q = QuotaLimiter::new(Limiter::Sliding, 200, t0);
        // Evenly at the quota: every window (t − 1 s, t] holds 200.
        for i in 0..1000 {
            assert!(q.admit(t0 + ms(5 * i)), "arrival {i}");
        }
        // One more in between is the 201st of its second.
        assert!(!q.admit(t0 + ms(4997)));
    }

    #[test]
    fn sliding_counts_refused_arrivals() {
        let t0 = Instant::now();
        let mut q = QuotaLimiter::new(Limiter::Sliding, 3, t0);
        assert_eq!(
            admit_all(&mut q, t0, &[0, 100, 200, 300]),
            [true, true, true, false],
            "quota + 1 refused"
        );
        // 0 has left the window, but the refused arrival at 300 still counts.
        assert!(!q.admit(t0 + ms(1000)));
        assert!(!q.admit(t0 + ms(1100)));
        // 100, 200 and 300 have left; 1000 and 1100 remain.
        assert!(q.admit(t0 + ms(1300)));
        assert!(!q.admit(t0 + ms(1301)));
    }

    #[test]
    fn fixed_counts_per_aligned_second() {
        let epoch = Instant::now();
        let mut q = QuotaLimiter::new(Limiter::Fixed, 3, epoch);
        assert_eq!(
            admit_all(&mut q, epoch, &[100, 200, 300, 400, 999]),
            [true, true, true, false, false]
        );
        // A new window: the quota again at once, so up to twice the quota within a short time
        // across the boundary (the kind reading).
        assert_eq!(
            admit_all(&mut q, epoch, &[1000, 1001, 1002, 1003]),
            [true, true, true, false]
        );
        let mut q = QuotaLimiter::new(Limiter::Fixed, 3, epoch);
        assert_eq!(
            admit_all(&mut q, epoch, &[900, 950, 990, 1000, 1010, 1020, 1030]),
            [true, true, true, true, true, true, false]
        );
    }

    #[test]
    fn bucket_starts_full_and_refills_continuously() {
        let t0 = Instant::now();
        let mut q = QuotaLimiter::new(Limiter::Bucket, 4, t0);
        assert_eq!(
            admit_all(&mut q, t0, &[0, 0, 0, 0, 0]),
            [true, true, true, true, false],
            "a full second's worth at once, then refused"
        );
        // One token every 250 ms; refused arrivals take none.
        assert_eq!(
            admit_all(&mut q, t0, &[200, 260, 270, 520]),
            [false, true, false, true]
        );
        // Never more than the bucket holds, however long idle.
        let later: Vec<u64> = (0..5).map(|_| 60_000).collect();
        assert_eq!(
            admit_all(&mut q, t0, &later),
            [true, true, true, true, false]
        );
    }

    #[test]
    fn zero_is_treated_as_one() {
        let t0 = Instant::now();
        for kind in [Limiter::Bucket, Limiter::Fixed, Limiter::Sliding] {
            let mut q = QuotaLimiter::new(kind, 0, t0);
            assert!(q.admit(t0), "{kind:?}");
            assert!(!q.admit(t0 + ms(10)), "{kind:?}");
        }
    }
}

#[tokio::test]
async fn outage_refuses_connections_then_answers_502_then_recovers_with_state_kept() {
    let sim = sim().await;
    let c = client(&sim);
    let t = now() - 100;
    c.import_group_msg(&import("g1", vec![msg("a", t, 1)]))
        .await
        .expect("imported before the outage");

    let http = reqwest::Client::new();
    let set = http
        .post(format!("{}/admin/outage", sim.base_url()))
        .json(&json!({"refuse": "600ms", "then_502": "400ms"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(set.status(), 200);

    // A new connection is refused by the kernel: the listening socket is gone.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let e = tokio::net::TcpStream::connect(sim.addr)
        .await
        .expect_err("connect during refuse");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    // The client (new or kept-alive connection) gets no answer and nothing is applied.
    let e = c
        .import_group_msg(&import("g1", vec![msg("a", t + 1, 2)]))
        .await
        .expect_err("no answer while refusing");
    // Refused (Retryable) on a new connection, reset (Unknown) on the kept-alive one.
    assert!(
        matches!(e.class(), ErrorClass::Retryable | ErrorClass::Unknown),
        "{e}"
    );

    // Then HTTP 502 for every /v4 request, nothing applied.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let e = c
        .import_group_msg(&import("g1", vec![msg("a", t + 1, 3)]))
        .await
        .expect_err("502 phase");
    assert!(e.to_string().contains("502"), "{e}");
    let s = sim.state();
    assert!(
        s.requests
            .iter()
            .any(|r| r.fault.as_deref() == Some("outage_502") && r.http_status == Some(502)),
        "{:?}",
        s.requests
    );

    // Healthy again on the same address, with the history from before the outage.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::net::TcpStream::connect(sim.addr)
        .await
        .expect("connect after the outage");
    c.import_group_msg(&import("g1", vec![msg("a", t + 2, 4)]))
        .await
        .expect("imported after the outage");
    assert_eq!(stored_times(&sim.state(), "g1"), vec![t, t + 2]);
    assert_eq!(sim.state().requests.iter().filter(|r| r.applied).count(), 2);

    // The handle's switch works too: a zero outage is healthy at once.
    sim.outage(Duration::from_millis(300), Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(sim.addr).await.is_err());
    sim.outage(Duration::ZERO, Duration::ZERO);
    let mut ok = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(sim.addr).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok, "listening again after the outage was lifted");
    sim.shutdown().await;
}

#[tokio::test]
async fn path_prefixes_are_served_like_the_plain_route_and_recorded() {
    let sim = sim().await;
    let base = sim.base_url();
    let node_a = client_with(&sim, |c| c.base_url = Some(format!("{base}/node-a")));
    let node_b = client_with(&sim, |c| c.base_url = Some(format!("{base}/node-b/")));
    let plain = client(&sim);
    let t = now() - 100;
    let r = node_a
        .import_group_msg(&import("g1", vec![msg("a", t, 11), msg("a", t + 1, 12)]))
        .await
        .expect("node-a imports");
    assert_eq!(results(&r), vec![(0, Some(1)), (0, Some(2))]);
    let r = node_b
        .import_group_msg(&import("g1", vec![msg("b", t + 2, 21)]))
        .await
        .expect("node-b imports");
    assert_eq!(results(&r), vec![(0, Some(3))]);
    // The same rules behind a prefix: dedup by Random across prefixes (one app, one history).
    let r = node_b
        .import_group_msg(&import("g1", vec![msg("a", t, 11)]))
        .await
        .expect("answered");
    assert_eq!(results(&r), vec![(0, Some(1))], "deduplicated");
    let e = node_a
        .import_group_msg(&import("missing", vec![msg("a", t, 1)]))
        .await
        .expect_err("no such group");
    assert_eq!(e.code(), Some(codes::GROUP_NOT_FOUND));
    plain
        .import_group_msg(&import("g2", vec![msg("c", t, 31)]))
        .await
        .expect("plain imports");

    let state = sim.state();
    let log: Vec<(&str, Option<i64>)> = state
        .requests_to("import_group_msg")
        .map(|r| (r.prefix.as_str(), r.error_code))
        .collect();
    assert_eq!(
        log,
        vec![
            ("node-a", Some(0)),
            ("node-b", Some(0)),
            ("node-b", Some(0)),
            ("node-a", Some(codes::GROUP_NOT_FOUND)),
            ("", Some(0)),
        ]
    );
    let stored: Vec<&str> = state
        .group("g1")
        .expect("g1")
        .messages
        .iter()
        .map(|m| m.from_account.as_str())
        .collect();
    assert_eq!(stored, ["a", "a", "b"]);

    // The prefixed route is as strict as the plain one: the query is checked, other methods
    // are refused, and there is no prefixed admin route or half a /v4 path.
    let http = reqwest::Client::new();
    let v: serde_json::Value = http
        .post(format!(
            "{base}/node-a/v4/group_open_http_svc/get_group_info?sdkappid={APP}"
        ))
        .body(r#"{"GroupIdList":["g1"]}"#)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(v["ErrorCode"], 70002, "no usersig");
    for (method, path, want) in [
        (
            "GET",
            "/node-a/v4/group_open_http_svc/import_group_msg",
            405,
        ),
        ("GET", "/v4/group_open_http_svc/import_group_msg", 405),
        ("GET", "/node-a/admin/state", 404),
        ("POST", "/node-a/admin/groups", 404),
        ("POST", "/node-a/v4/group_open_http_svc", 404),
        ("POST", "//v4/group_open_http_svc/import_group_msg", 404),
        (
            "POST",
            "/node-a/v4/group_open_http_svc/import_group_msg/x",
            404,
        ),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let status = http
            .request(method.clone(), format!("{base}{path}"))
            .send()
            .await
            .expect("sent")
            .status();
        assert_eq!(status.as_u16(), want, "{method} {path}");
    }
    let after = sim.state();
    assert_eq!(
        after.requests.len(),
        state.requests.len() + 1,
        "only the 70002 is logged"
    );
    assert_eq!(
        after.requests.last().map(|r| r.prefix.as_str()),
        Some("node-a")
    );
    sim.shutdown().await;
}
