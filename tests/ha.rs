//! High availability (PostgreSQL only): several real `timport run` nodes on one queue, each
//! sending through its own path prefix of the simulator (`/node-a/v4/...`), so the request log
//! tells the senders apart. The lease's audit trail (`ha_leases`: token, node, from, until) is
//! the yardstick: every request a node sent must fall inside a lease that node held, and leases
//! never overlap, so no two nodes ever sent at the same moment.
//!
//! Without `TIMPORT_TEST_DATABASE_URL` these tests skip (CI sets it and forbids skipping).

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use common::*;
use timport::simulator::RequestRecord;
use timport::store::HaLeaseGrant;

/// A short lease for tests: 5 s, renewed every 500 ms, 500 ms margin; requests time out after
/// 3.5 s (the shortest the settings allow is just above Tencent's own 3 s).
const LEASE_TTL_MS: i64 = 5_000;
const REQUEST_TIMEOUT_MS: i64 = 3_500;
const MARGIN_MS: i64 = 500;

struct Nodes<'a> {
    env: &'a Env,
    base_url: String,
    children: HashMap<String, Child>,
    configs: HashMap<String, PathBuf>,
}

impl<'a> Nodes<'a> {
    fn new(env: &'a Env, base_url: String) -> Self {
        Nodes {
            env,
            base_url,
            children: HashMap::new(),
            configs: HashMap::new(),
        }
    }

    fn spool(&self, name: &str) -> PathBuf {
        self.env.dir.path().join(format!("spool-{name}"))
    }

    fn log(&self, name: &str) -> PathBuf {
        self.env.dir.path().join(format!("{name}.log"))
    }

    /// This node's configuration (written once): its own spool, log and prefix.
    fn config(&mut self, name: &str, http: &str) -> PathBuf {
        if let Some(c) = self.configs.get(name) {
            return c.clone();
        }
        let spool = self.spool(name);
        std::fs::create_dir_all(&spool).unwrap();
        let text = format!(
            r#"
[tencent]
sdkappid = {APP}
identifier = "{ADMIN}"
secret_key = "{KEY}"
base_url = "{base}/{name}"
request_timeout = "{REQUEST_TIMEOUT_MS}ms"
[queue]
database = "{db}"
spool_dir = "{spool}"
rescan_interval = "500ms"
[import]
# Slow enough that the import outlasts several takeovers.
requests_per_second = 20
max_lanes = 16
max_attempts = 1000
backoff_base = "20ms"
backoff_max = "300ms"
shutdown_grace = "2s"
[log]
format = "json"
level = "info"
[http]
listen = "{http}"
[ha]
enabled = true
node_name = "{name}"
lease_ttl = "{LEASE_TTL_MS}ms"
renew_every = "500ms"
margin = "{MARGIN_MS}ms"
"#,
            base = self.base_url,
            db = self.env.db(),
            spool = spool.display(),
        );
        let path = self.env.write(&format!("{name}.toml"), &text);
        self.configs.insert(name.to_owned(), path.clone());
        path
    }

    fn start(&mut self, name: &str) {
        self.start_with_http(name, "");
    }

    fn start_with_http(&mut self, name: &str, http: &str) {
        let config = self.config(name, http);
        let child = daemon::spawn_with_env(&config, &self.log(name), &[], &[], |_| {});
        assert!(self.children.insert(name.to_owned(), child).is_none());
    }

    fn kill(&mut self, name: &str) {
        let mut c = self.children.remove(name).expect("running");
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
    }

    fn signal(&self, name: &str, sig: &str) {
        daemon::signal(&self.children[name], sig);
    }

    /// SIGTERM to all, each must exit 0.
    async fn stop_all(&mut self) {
        let names: Vec<String> = self.children.keys().cloned().collect();
        for n in &names {
            daemon::signal(&self.children[n], "TERM");
        }
        for n in names {
            let mut c = self.children.remove(&n).unwrap();
            let status = wait_exit(&mut c, Duration::from_secs(30)).await;
            assert!(
                status.success(),
                "node {n} stopped with {status}; log:\n{}",
                tail(&daemon::log_text(&self.log(&n)))
            );
        }
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for n in self.configs.keys() {
            s.push_str(&format!(
                "---- {n}\n{}\n",
                tail(&daemon::log_text(&self.log(n)))
            ));
        }
        s
    }
}

/// The node holding a live lease with a token above `after`, waiting up to `bound` for one (the
/// nodes' logs shown if none comes).
async fn active_node(env: &Env, nodes: &Nodes<'_>, after: i64, bound: Duration) -> (String, i64) {
    let started = Instant::now();
    loop {
        if let Some(v) = env.store.ha_view().await.unwrap()
            && v.lease.token > after
            && v.lease.expires_at_ms > v.lease.now_ms
            && !v.lease.node.is_empty()
        {
            return (v.lease.node, v.lease.token);
        }
        assert!(
            started.elapsed() < bound,
            "no active node within {bound:?}; the nodes' logs:\n{}",
            nodes.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `pred` holds of the requests the simulator received.
async fn wait_requests(
    sim: &timport::simulator::SimHandle,
    bound: Duration,
    what: &str,
    pred: impl Fn(&[RequestRecord]) -> bool,
) {
    let started = Instant::now();
    while !pred(&sim.state().requests) {
        if started.elapsed() >= bound {
            let mut by: std::collections::BTreeMap<(String, String), usize> = Default::default();
            for r in sim.state().requests {
                *by.entry((r.prefix, r.endpoint)).or_default() += 1;
            }
            panic!("{what}: not within {bound:?}; requests so far by prefix and endpoint: {by:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every request inside a lease its own node held; the leases one after another.
fn assert_one_sender_at_a_time(requests: &[RequestRecord], grants: &[HaLeaseGrant]) {
    for w in grants.windows(2) {
        assert!(
            w[0].expires_at_ms <= w[1].acquired_at_ms,
            "leases overlap: {:?} and {:?}",
            w[0],
            w[1]
        );
    }
    for r in requests {
        let inside = grants.iter().any(|g| {
            g.node == r.prefix && g.acquired_at_ms <= r.at_ms && r.at_ms <= g.expires_at_ms
        });
        assert!(
            inside,
            "request #{} ({}) from {:?} at {} is outside every lease that node held: {grants:?}",
            r.seq, r.endpoint, r.prefix, r.at_ms
        );
    }
}

/// The longest time with no request at all, between the first and the last request.
fn longest_gap_ms(requests: &[RequestRecord]) -> (i64, i64) {
    let mut at: Vec<i64> = requests.iter().map(|r| r.at_ms).collect();
    at.sort_unstable();
    at.windows(2)
        .map(|w| (w[1] - w[0], w[0]))
        .max()
        .unwrap_or((0, 0))
}

const GROUPS: usize = 12;
const PER_GROUP: i64 = 250;

/// Three job files, one per node, each with its own groups.
fn jobs() -> Vec<String> {
    let mut files = vec![String::new(), String::new(), String::new()];
    for i in 0..PER_GROUP {
        for g in 0..GROUPS {
            let t = T0 + i - i / 4;
            let mut v: serde_json::Value = serde_json::from_str(&line(
                &format!("ha-{g:02}"),
                if i % 2 == 0 { "alice" } else { "bob" },
                t,
                &format!("{g}-{i}"),
            ))
            .unwrap();
            if i % 25 == 0 {
                v["Random"] = serde_json::json!(2_000_000 + i * 100 + g as i64);
            }
            let f = &mut files[g % 3];
            f.push_str(&v.to_string());
            f.push('\n');
        }
    }
    files
}

/// The simulator's history of every group equals the queue: none missing, none twice, in order,
/// each with the Random it was queued with.
async fn assert_history_exact(env: &Env, sim: &timport::simulator::SimHandle) {
    let state = sim.state();
    for g in 0..GROUPS {
        assert_group_history_is_the_queue(env, &state, &format!("ha-{g:02}"), PER_GROUP as usize)
            .await;
    }
}

async fn wait_all_imported(env: &Env, nodes: &Nodes<'_>, bound: Duration) {
    let started = Instant::now();
    let total = GROUPS as i64 * PER_GROUP;
    loop {
        let t = env.store.totals(None).await.unwrap();
        if t.total == total && t.imported == total {
            return;
        }
        assert!(
            started.elapsed() < bound,
            "not all imported within {bound:?}: {t:?}\n{}",
            nodes.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_through_sigkills_and_a_freeze_send_every_message_once_one_sender_at_a_time() {
    let Some(backend) = Backend::postgres_or_skip("ha::three_nodes") else {
        return;
    };
    let env = Env::on(backend).await;
    let sim = start_sim(chaos_sim_config()).await;
    let mut nodes = Nodes::new(&env, sim.base_url());
    for n in ["node-a", "node-b", "node-c"] {
        nodes.start(n);
    }
    // Job files dropped through different nodes: standbys ingest too.
    for (i, (n, text)) in ["node-a", "node-b", "node-c"]
        .iter()
        .zip(jobs())
        .enumerate()
    {
        let spool = nodes.spool(n);
        let tmp = spool.join(format!(".job-{i}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, spool.join(format!("job-{i}.ndjson"))).unwrap();
    }

    // The active node SIGKILLed three times while it sends; each time restarted, as a standby.
    let mut tokens: Vec<i64> = vec![0];
    for _ in 0..3 {
        let last = *tokens.last().unwrap();
        let (active, token) = active_node(&env, &nodes, last, Duration::from_secs(60)).await;
        eprintln!("ha test: {active} is active with token {token}");
        tokens.push(token);
        let before = sim.state().requests.len();
        wait_requests(
            &sim,
            Duration::from_secs(60),
            "the active node sends",
            |r| r.len() > before + 20 && r.iter().skip(before).any(|r| r.prefix == active),
        )
        .await;
        nodes.kill(&active);
        nodes.start(&active);
    }
    // The active node frozen past its lease, then thawed: it must send nothing more.
    let last = *tokens.last().unwrap();
    let (frozen, token) = active_node(&env, &nodes, last, Duration::from_secs(60)).await;
    tokens.push(token);
    let before = sim.state().requests.len();
    wait_requests(
        &sim,
        Duration::from_secs(60),
        "the active node sends",
        |r| r.len() > before + 20,
    )
    .await;
    nodes.signal(&frozen, "STOP");
    let (next, next_token) = active_node(&env, &nodes, token, Duration::from_secs(60)).await;
    assert_ne!(next, frozen, "a frozen node cannot renew");
    tokens.push(next_token);
    let after_takeover = sim.state().requests.len();
    wait_requests(&sim, Duration::from_secs(60), "the successor sends", |r| {
        r.iter().skip(after_takeover).any(|r| r.prefix == next)
    })
    .await;
    nodes.signal(&frozen, "CONT");
    // Thawed: it says it lost the lease and stands by.
    let mut frozen_child = nodes.children.remove(&frozen).unwrap();
    daemon::wait_line(
        &mut frozen_child,
        &nodes.log(&frozen),
        Duration::from_secs(30),
        |l| l.contains("no longer the active node"),
    )
    .await;
    nodes.children.insert(frozen.clone(), frozen_child);

    wait_all_imported(&env, &nodes, Duration::from_secs(300)).await;
    nodes.stop_all().await;

    assert_history_exact(&env, &sim).await;
    let state = sim.state();
    let grants = env.store.ha_grants().await.unwrap();
    assert_one_sender_at_a_time(&state.requests, &grants);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "every takeover raised the token: {tokens:?}"
    );
    let senders: std::collections::BTreeSet<&str> =
        state.requests.iter().map(|r| r.prefix.as_str()).collect();
    assert!(
        senders.len() >= 2,
        "more than one node sent over the run: {senders:?}"
    );
    assert!(
        state.requests.iter().all(|r| !r.prefix.is_empty()),
        "every request came through a node's prefix"
    );
    // Never still longer than a lease plus a request timeout plus a small margin (2 s).
    let (gap, at) = longest_gap_ms(&state.requests);
    assert!(
        gap <= LEASE_TTL_MS + REQUEST_TIMEOUT_MS + 2_000,
        "the import stood still for {gap} ms (from {at}); leases: {grants:?}"
    );
    let faults: std::collections::HashSet<&str> = state
        .requests
        .iter()
        .filter_map(|r| r.fault.as_deref())
        .collect();
    // The run went through every fault the issue names, not only through node losses.
    for f in [
        "http_502",
        "reset_before",
        "drop_response_after_apply",
        "error_10002",
    ] {
        assert!(faults.contains(f), "fault {f} never happened: {faults:?}");
    }
    eprintln!(
        "ha: {} requests, {} leases, longest gap {gap} ms, faults {faults:?}",
        state.requests.len(),
        grants.len()
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_lost_while_a_request_is_in_flight_records_nothing_and_the_successor_reconciles() {
    let Some(backend) = Backend::postgres_or_skip("ha::lease_lost_in_flight") else {
        return;
    };
    let env = Env::on(backend).await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    cfg.dedup_window = Duration::from_secs(2);
    let sim = start_sim(cfg).await;
    let mut nodes = Nodes::new(&env, sim.base_url());
    let port_a = free_port();
    let port_b = free_port();
    nodes.start_with_http("node-a", &format!("127.0.0.1:{port_a}"));
    let (active, token) = active_node(&env, &nodes, 0, Duration::from_secs(30)).await;
    assert_eq!(active, "node-a");
    nodes.start_with_http("node-b", &format!("127.0.0.1:{port_b}"));
    let mut text = String::new();
    for i in 0..80 {
        text.push_str(&line("inflight", "alice", T0 + i, &format!("m{i}")));
        text.push('\n');
    }
    // Every answer takes 1.5 s: inside the 3.5 s timeout, so a request stays in flight long
    // enough for the lease to be taken from under it, and inside the 2 s shutdown grace, so its
    // answer comes back (and its record is refused) before node-a lets go of it.
    sim.set_faults(timport::simulator::Faults {
        latency: Duration::from_millis(1_500),
        ..timport::simulator::Faults::default()
    })
    .unwrap();
    std::fs::write(nodes.spool("node-b").join("inflight.ndjson"), &text).unwrap();
    wait_requests(&sim, Duration::from_secs(30), "node-a sends a batch", |r| {
        r.iter()
            .any(|r| r.prefix == "node-a" && r.endpoint == "import_group_msg")
    })
    .await;

    // Roles while node-a sends: readiness, metrics, status.
    let ready_a = http_get(port_a, "/readyz").await;
    let ready_b = http_get(port_b, "/readyz").await;
    assert!(ready_a.contains("ready: active"), "{ready_a}");
    assert!(ready_b.contains("ready: standby"), "{ready_b}");
    let metrics_a = http_get(port_a, "/metrics").await;
    assert!(
        metrics_a.contains("timport_ha_role{role=\"active\"} 1"),
        "{metrics_a}"
    );
    assert!(
        metrics_a.contains("timport_ha_takeovers_total 1"),
        "{metrics_a}"
    );
    let status = status_json(&nodes.config("node-b", ""));
    assert_eq!(status["node"]["name"], "node-b");
    assert_eq!(status["node"]["role"], "standby");
    assert_eq!(status["node"]["active"]["name"], "node-a");
    assert_eq!(status["node"]["active"]["token"], token);
    assert!(status["node"]["active"]["lease_expires_at"].is_string());

    // The lease taken away while node-a's request is in flight (as if node-a had been cut off
    // and another node had taken over): its answer may not be recorded, and it sends no more.
    // Taken 300 ms after a batch has been answered: node-a has recorded it and sent the next
    // one by then (a few milliseconds), which is 1.2 s from its answer. The theft is made only
    // while some messages are claimed, and the test waits for the next answer if none are.
    let mut stolen_at: Option<i64> = None;
    for _ in 0..10 {
        let sent = sim.state().requests.len();
        wait_requests(
            &sim,
            Duration::from_secs(30),
            "node-a sends the next batch",
            |r| {
                r.iter()
                    .skip(sent)
                    .any(|r| r.prefix == "node-a" && r.endpoint == "import_group_msg")
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let at: Option<i64> = db_scalar(
            &env.store,
            "WITH s AS (UPDATE ha_lease SET token = token + 1, node = 'thief', instance = 'thief',
                            acquired_at = now(), expires_at = now() + interval '1 hour'
                        WHERE id = 1
                          AND EXISTS (SELECT 1 FROM messages WHERE state = 'in_flight')
                        RETURNING now() AS at)
             SELECT (SELECT (extract(epoch FROM at) * 1000)::bigint FROM s)",
        )
        .await;
        if at.is_some() {
            stolen_at = at;
            break;
        }
    }
    let stolen_at = stolen_at.expect("a batch in flight after one of ten answers");
    // In the audit trail, node-a's lease ended there.
    db_exec_with(
        &env.store,
        "UPDATE ha_leases SET expires_at = to_timestamp($1 / 1000.0) WHERE token = $2",
        args![stolen_at, token],
    )
    .await;
    let mut a = nodes.children.remove("node-a").unwrap();
    daemon::wait_line(&mut a, &nodes.log("node-a"), Duration::from_secs(20), |l| {
        l.contains("no longer the active node")
    })
    .await;
    daemon::wait_line(&mut a, &nodes.log("node-a"), Duration::from_secs(20), |l| {
        l.contains("fenced")
    })
    .await;
    nodes.children.insert("node-a".into(), a);
    let in_flight_then: i64 = db_scalar_i64(
        &env.store,
        "SELECT count(*) FROM messages WHERE state = 'in_flight'",
    )
    .await;
    assert!(
        in_flight_then > 0,
        "the answer that came after the theft was not recorded"
    );
    // Rows inserted into the intake table while another holds the lease: both nodes here are
    // standbys, and a standby takes no intake rows (only the active node polls the table).
    for i in 0..5 {
        db_exec_with(
            &env.store,
            "INSERT INTO intake(group_id, from_account, send_time, msg_body) VALUES ('table', 'alice', $1, $2)",
            args![T0 + i, format!(r#"[{{"MsgType":"TIMTextElem","MsgContent":{{"Text":"t{i}"}}}}]"#)],
        )
        .await;
    }
    // Nobody sends while the thief holds it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let taken: i64 = db_scalar_i64(
        &env.store,
        "SELECT count(*) FROM intake WHERE status <> 'new'",
    )
    .await;
    assert_eq!(
        taken, 0,
        "a standby took intake rows (poll interval 250 ms, 3 s waited)"
    );
    let late: Vec<RequestRecord> = sim
        .state()
        .requests
        .into_iter()
        .filter(|r| r.at_ms > stolen_at)
        .collect();
    assert!(
        late.is_empty(),
        "requests after the lease was taken: {late:?}"
    );

    // The thief lets go; a node takes over, asks the server what it has, and finishes.
    sim.set_faults(timport::simulator::Faults {
        latency: Duration::from_millis(5),
        ..timport::simulator::Faults::default()
    })
    .unwrap();
    db_exec(
        &env.store,
        "UPDATE ha_lease SET expires_at = now() WHERE id = 1",
    )
    .await;
    db_exec(
        &env.store,
        "INSERT INTO ha_leases (token, node, instance, acquired_at, expires_at)
         SELECT token, node, instance, acquired_at, expires_at FROM ha_lease WHERE id = 1",
    )
    .await;
    let started = Instant::now();
    loop {
        let t = env.store.totals(None).await.unwrap();
        if t.total == 85 && t.imported == 85 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not finished: {t:?}\n{}",
            nodes.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    nodes.stop_all().await;
    let got = history_texts(&sim, "inflight");
    let want: Vec<String> = (0..80).map(|i| format!("m{i}")).collect();
    assert_eq!(
        got.iter().map(|m| m.2.clone()).collect::<Vec<_>>(),
        want,
        "every message once, in order"
    );
    // The new active node took the intake rows.
    let got = history_texts(&sim, "table");
    assert_eq!(
        got.iter().map(|m| m.2.clone()).collect::<Vec<_>>(),
        (0..5).map(|i| format!("t{i}")).collect::<Vec<_>>(),
        "the intake rows, once each, in order"
    );
    let state = sim.state();
    let reconciled = state.requests.iter().any(|r| {
        r.at_ms > stolen_at && r.endpoint == "group_msg_get_simple" && !r.prefix.is_empty()
    });
    assert!(
        reconciled,
        "the successor asked the server before sending again"
    );
    // The thief's lease has no requests: it is in the audit trail under a node that sent none.
    let grants = env.store.ha_grants().await.unwrap();
    assert_one_sender_at_a_time(&state.requests, &grants);
    sim.shutdown().await;
}

/// A node frozen (or cut off) inside a write transaction holds the lease row FOR SHARE. Without
/// a bound, a takeover waits for it as long as the server lets it sit idle; with the node's idle
/// bound (what `timport_fence` sets), the server has ended it by the time the lease expires, so
/// the takeover goes through at once. The node's transaction is what `PgStore::begin` sends on
/// an active node: `BEGIN`, then `timport_fence(token, instance, idle_ms)`, then nothing more.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_frozen_inside_a_write_transaction_does_not_hold_up_a_takeover() {
    use sqlx::Connection;
    let Some(backend) = Backend::postgres_or_skip("ha::frozen_in_transaction") else {
        return;
    };
    let env = Env::on(backend).await;
    let url = env.db.config_value();
    let ttl = Duration::from_millis(1_500);
    let a = timport::store::HaNodeId {
        node: "node-a".into(),
        instance: "instance-a".into(),
    };
    let b = timport::store::HaNodeId {
        node: "node-b".into(),
        instance: "instance-b".into(),
    };
    // Waits until `who` is granted the lease (it expires on the database's clock).
    async fn take(env: &Env, who: &timport::store::HaNodeId, ttl: Duration) -> i64 {
        let started = Instant::now();
        loop {
            match env.store.ha_acquire(who, ttl).await {
                Ok(Some(g)) => return g.token,
                Ok(None) => {}
                Err(e) => panic!("{} asking for the lease: {e}", who.node),
            }
            assert!(started.elapsed() < Duration::from_secs(10), "never granted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Opens a transaction on `conn` fenced by `who`'s lease `token` with an idle bound of
    // `idle_ms`, as the store does; the bound in force inside it.
    async fn fenced(
        conn: &mut sqlx::PgConnection,
        who: &timport::store::HaNodeId,
        token: i64,
        idle_ms: i32,
    ) -> Result<String, sqlx::Error> {
        sqlx::query("BEGIN").execute(&mut *conn).await?;
        sqlx::query("SELECT timport_fence($1, $2, $3)")
            .bind(token)
            .bind(&who.instance)
            .bind(idle_ms)
            .execute(&mut *conn)
            .await?;
        sqlx::query_scalar("SELECT current_setting('idle_in_transaction_session_timeout')")
            .fetch_one(&mut *conn)
            .await
    }

    // 1. No bound (as before the fence set one): the takeover is refused, a second at a time,
    //    with an error that says why, for as long as the frozen transaction lasts.
    let token_a = take(&env, &a, ttl).await;
    let mut frozen = sqlx::PgConnection::connect(&url).await.unwrap();
    fenced(&mut frozen, &a, token_a, 600_000).await.unwrap();
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    for _ in 0..2 {
        let e = env
            .store
            .ha_acquire(&b, ttl)
            .await
            .expect_err("the frozen transaction holds the lease row");
        assert!(
            matches!(e, timport::store::StoreError::LeaseBusy { .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("former holder"), "{e}");
    }
    drop(frozen);
    let token_b = take(&env, &b, ttl).await;
    assert_eq!(token_b, token_a + 1);

    // 2. The stale holder is refused before it takes the lock (no wait behind the takeover).
    let mut stale = sqlx::PgConnection::connect(&url).await.unwrap();
    let e = fenced(&mut stale, &a, token_a, 1_000)
        .await
        .expect_err("a stale token is fenced");
    assert_eq!(
        e.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("TF001"),
        "{e}"
    );
    drop(stale);

    // 3. With the bound (1 s, inside the 1.5 s lease): the frozen holder's transaction is ended
    //    by the server before its lease expires; the takeover is granted at its first try, and
    //    the frozen node can commit nothing.
    let _ = env.store.ha_release(&b, token_b).await.unwrap();
    let token_a = take(&env, &a, ttl).await;
    let mut frozen = sqlx::PgConnection::connect(&url).await.unwrap();
    let bound = fenced(&mut frozen, &a, token_a, 1_000).await.unwrap();
    assert_eq!(bound, "1s", "the fence bounds the transaction's idle time");
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    let grant = env.store.ha_acquire(&b, ttl).await.unwrap();
    assert_eq!(
        grant.map(|g| g.token),
        Some(token_a + 1),
        "granted at the first try after the lease expired"
    );
    assert!(
        sqlx::query("COMMIT").execute(&mut frozen).await.is_err(),
        "the server ended the frozen transaction"
    );

    // 4. An operator's tighter bound stays.
    let token_b = token_a + 1;
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("SET idle_in_transaction_session_timeout = '300ms'")
        .execute(&mut conn)
        .await
        .unwrap();
    let bound = fenced(&mut conn, &b, token_b, 1_000).await.unwrap();
    assert_eq!(bound, "300ms");
    sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn http_get(port: u16, path: &str) -> String {
    let url = format!("http://127.0.0.1:{port}{path}");
    let started = Instant::now();
    loop {
        match reqwest::get(&url).await {
            Ok(r) => return r.text().await.unwrap_or_default(),
            Err(e) => {
                assert!(started.elapsed() < Duration::from_secs(10), "{url}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn status_json(config: &std::path::Path) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_timport"))
        .args(["status", "--json", "--config", config.to_str().unwrap()])
        .env_remove("TIMPORT_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
