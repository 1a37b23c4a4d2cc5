//! Issue 11 point 4, "an outage never costs a message": the real engine against the simulator
//! while Tencent refuses connections and then answers 502, on a real queue database (SQLite, and
//! PostgreSQL with `TIMPORT_TEST_DATABASE_URL`).

mod common;

use std::time::Duration;

use common::*;
use timport::engine::EngineExit;
use timport::simulator::{Faults, SimHandle};

const GROUPS: [&str; 3] = ["o1", "o2", "o3"];
const PER_GROUP: i64 = 40;
/// Longer than every attempt's backoff together (engine_config: 5 attempts × 200 ms at most).
const REFUSE: Duration = Duration::from_secs(4);
const THEN_502: Duration = Duration::from_secs(2);

/// (From_Account, SendTime, body text) as queued, per group, in order.
fn queued(group: &str) -> Vec<(String, i64, String)> {
    (0..PER_GROUP)
        .map(|i| (format!("u{}", i % 3), T0 + i, format!("{group}-m{i}")))
        .collect()
}

fn on_server(sim: &SimHandle, group: &str) -> Vec<(String, i64, String)> {
    history_texts(sim, group)
}

db_test!(
    refused_then_502_costs_no_message_and_the_daemon_waits_as_a_whole,
    multi_thread
);
async fn refused_then_502_costs_no_message_and_the_daemon_waits_as_a_whole(backend: Backend) {
    let env = Env::on(backend).await;
    let text: String = GROUPS
        .iter()
        .flat_map(|g| queued(g))
        .zip(
            GROUPS
                .iter()
                .flat_map(|g| std::iter::repeat_n(*g, PER_GROUP as usize)),
        )
        .map(|((from, t, body), g)| line(g, &from, t, &body) + "\n")
        .collect();
    queue(&env, "a.ndjson", &text).await;

    let mut cfg = sim_config();
    cfg.groups = GROUPS.iter().map(|g| ((*g).to_string(), None)).collect();
    // Slow enough that most of the import is still ahead when the outage starts.
    cfg.faults = Faults {
        latency: Duration::from_millis(100),
        ..Faults::default()
    };
    let sim = start_sim(cfg).await;
    let client = client_for(&sim, 10);
    let store = env.store.clone();
    let engine = tokio::spawn(async move { run_until_idle(&store, client, engine_config()).await });

    // The outage begins once the first messages have landed.
    let total = |sim: &SimHandle| -> usize { GROUPS.iter().map(|g| on_server(sim, g).len()).sum() };
    tokio::time::timeout(Duration::from_secs(30), async {
        while total(&sim) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("first imports landed");
    sim.outage(REFUSE, THEN_502);
    let landed_before = total(&sim);
    assert!(
        landed_before < GROUPS.len() * PER_GROUP as usize,
        "the outage must start with work left ({landed_before} landed)"
    );
    let seq_at_outage = sim.state().requests.last().map_or(0, |r| r.seq);

    // While refusing, status says the daemon waits for Tencent and why.
    let mut seen = None;
    let watch_until = tokio::time::Instant::now() + REFUSE + THEN_502;
    while tokio::time::Instant::now() < watch_until {
        let r = timport::ops::status::report(&env.store, None)
            .await
            .unwrap();
        if r.waiting_for_tencent.is_some() {
            seen = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = seen.expect("status showed waiting_for_tencent during the outage");
    let waiting = report.waiting_for_tencent.clone().unwrap();
    assert!(!waiting.reason.is_empty(), "{waiting:?}");
    assert!(waiting.since > 0, "{waiting:?}");
    let rendered = timport::ops::status::render(&report);
    assert!(
        rendered.contains("WAITING") && rendered.contains(&waiting.reason),
        "{rendered}"
    );

    let exit = engine.await.unwrap().unwrap();
    let EngineExit::Idle(t) = exit else {
        panic!("engine stopped instead of becoming idle: {exit:?}")
    };
    assert_eq!(t.imported, GROUPS.len() as i64 * PER_GROUP, "{t:?}");
    assert_eq!(
        (t.failed, t.blocked, t.pending, t.in_flight),
        (0, 0, 0, 0),
        "{t:?}"
    );

    // Every message on the server exactly once, in order, as queued.
    for g in GROUPS {
        assert_eq!(on_server(&sim, g), queued(g), "history of {g}");
    }

    // The daemon waited as a whole: during the 502 phase only spaced probes went out (probes
    // start 1 s apart and double, so at most 2 fit in 2 s; 6 leaves room for requests already
    // admitted). With the gate disabled (every lane retrying at backoff_max, paced at 10/s)
    // this phase saw 20 requests here.
    let s = sim.state();
    let after: Vec<_> = s
        .requests
        .iter()
        .filter(|r| r.seq > seq_at_outage)
        .collect();
    let during_502 = after
        .iter()
        .filter(|r| r.fault.as_deref() == Some("outage_502"))
        .count();
    assert!(
        during_502 <= 6,
        "{during_502} requests during the 502 phase"
    );
    assert!(
        after
            .iter()
            .all(|r| r.fault.as_deref() != Some("outage_502") || !r.applied),
        "nothing applied during 502"
    );
    sim.shutdown().await;
}
