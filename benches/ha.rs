//! Benchmark (not a test): takeover in a high-availability group (issue 16).
//!
//! Three release `timport run` nodes on one PostgreSQL queue (`TIMPORT_BENCH_DATABASE_URL`, a
//! server URL; without it the benchmark says so and stops), with the default lease (`lease_ttl`
//! 10 s, `renew_every` 2 s, `margin` 1 s) and a 5 s request timeout, against the simulator at
//! 40 ms added latency and a sliding 200 requests/s quota (ceiling 1,400 messages/s), each node
//! behind its own path prefix so the simulator's request log tells who sent what. The queue is
//! filled first (`timport ingest`). Then, `TIMPORT_BENCH_TAKEOVERS` times (default 5): the
//! active node sends for `TIMPORT_BENCH_ACTIVE_SECS` (default 8) seconds, is SIGKILLed and at
//! once restarted (as systemd would); its successor is whoever the lease names next.
//!
//! Per takeover, from the request log and the lease's audit trail (`ha_leases`):
//! - kill → lease: when the successor was granted the lease;
//! - kill → first request: the successor's first request of any kind (reconciliation first);
//! - kill → first import: its first `import_group_msg`;
//! - messages/s over the 5 s before the kill, and over the 5 s after the successor's first
//!   import (the ceiling is 1,400; the next kill comes `TIMPORT_BENCH_ACTIVE_SECS` later).
//!
//! It asserts the outcome: every message in the simulator's history exactly once, in order.
//! Run: `TIMPORT_BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:55440/postgres cargo bench
//! --bench ha`. Results are written up in docs/BENCHMARKS.md.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod common;
use common::{cpu_model, release_binary};

use secrecy::SecretString;
use timport::simulator::{self, Faults, Limiter, RequestRecord, SimConfig};
use timport::store::{Store, StoreOptions};

const APP: u64 = 1_400_000_000;
const KEY: &str = "bench-secret-key";
const T0: i64 = 1_600_000_000;
const GROUPS: i64 = 60;
const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
/// The window over which throughput is measured on each side of a takeover.
const WINDOW_MS: i64 = 5_000;

fn env_num(name: &str, default: i64) -> i64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn main() {
    let Some(server) = common::pg::server() else {
        println!("ha benchmark: needs TIMPORT_BENCH_DATABASE_URL (a PostgreSQL server URL)");
        return;
    };
    let bin = release_binary();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(&bin, &server));
}

struct Takeover {
    killed: String,
    successor: String,
    kill_at: i64,
    lease_at: i64,
    first_request_at: i64,
    first_import_at: i64,
    before: f64,
    after: f64,
}

async fn run(bin: &Path, server: &str) {
    let takeovers = env_num("TIMPORT_BENCH_TAKEOVERS", 5);
    let active_secs = env_num("TIMPORT_BENCH_ACTIVE_SECS", 8);
    // Enough to keep sending through every takeover: about (active_secs + 12 s) per takeover
    // at up to 1,400 messages/s, with room to spare at the end.
    let per_group: i64 = env_num(
        "TIMPORT_BENCH_HA_PER_GROUP",
        (takeovers * (active_secs + 4) * 1_400 + 14_000) / GROUPS,
    );
    let total = GROUPS * per_group;
    println!(
        "ha benchmark on {} cores, {}: {NODES:?}, {total} messages in {GROUPS} groups, {takeovers} takeovers after {active_secs} s of sending each",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = SimConfig::new(APP, "administrator", SecretString::from(KEY.to_string()));
    cfg.auto_create_groups = true;
    cfg.requests_per_second = 200;
    cfg.limiter = Limiter::Sliding;
    cfg.faults = Faults {
        latency: Duration::from_millis(40),
        ..Faults::default()
    };
    let sim = simulator::start(cfg).await.expect("simulator");
    let db = common::pg::fresh_database(server, "bench_ha").await;
    let configs: HashMap<&str, PathBuf> = NODES
        .iter()
        .map(|n| (*n, node_config(dir.path(), &sim.base_url(), &db, n)))
        .collect();
    let job = dir.path().join("job.ndjson");
    write_job(&job, per_group);
    let ok = Command::new(bin)
        .args(["ingest", "--config"])
        .arg(&configs["node-a"])
        .arg(&job)
        .stdout(Stdio::null())
        .status()
        .expect("ingest")
        .success();
    assert!(ok, "ingest");
    let store = Store::open(
        &timport::settings::Database::from(db.clone()),
        &StoreOptions::default(),
    )
    .await
    .expect("store");

    let start = |name: &str| -> Child {
        let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).expect("log");
        Command::new(bin)
            .args(["run", "--config"])
            .arg(&configs[name])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run")
    };
    let mut children: HashMap<String, Child> =
        NODES.iter().map(|n| (n.to_string(), start(n))).collect();

    let mut kills: Vec<(String, i64, i64)> = Vec::new(); // (node, token, kill_at)
    let mut last_token = 0;
    for _ in 0..takeovers {
        let (active, token) = active_after(&store, last_token, Duration::from_secs(60)).await;
        last_token = token;
        // Let it send at full speed for a while, then kill it and restart it at once.
        wait_for_imports(&store, Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_secs(active_secs as u64)).await;
        let mut c = children.remove(&active).expect("running");
        c.kill().expect("SIGKILL");
        let kill_at = now_ms();
        c.wait().expect("reap");
        kills.push((active.clone(), token, kill_at));
        children.insert(active.clone(), start(&active));
        let t = store.totals(None).await.expect("totals");
        assert!(
            t.imported < t.total,
            "the queue ran dry before takeover {} ({t:?}): raise TIMPORT_BENCH_HA_PER_GROUP",
            kills.len()
        );
    }
    // The last successor finishes the queue.
    let started = Instant::now();
    loop {
        let t = store.totals(None).await.expect("totals");
        if t.imported == t.total && t.total == total {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not all imported: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for c in children.values() {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
    }
    for (n, mut c) in children {
        let s = c.wait().expect("wait");
        assert!(s.success(), "{n} stopped with {s}");
    }

    let state = sim.state();
    let grants = store.ha_grants().await.expect("grants");
    let mut rows = Vec::new();
    for (killed, token, kill_at) in &kills {
        let next = grants
            .iter()
            .find(|g| g.token > *token)
            .expect("a successor's lease");
        let successor = next.node.clone();
        let first = |endpoint: Option<&str>| -> i64 {
            state
                .requests
                .iter()
                .filter(|r| r.at_ms >= *kill_at && r.prefix == successor)
                .find(|r| endpoint.is_none_or(|e| r.endpoint == e))
                .map(|r| r.at_ms)
                .expect("the successor sent")
        };
        let first_import_at = first(Some("import_group_msg"));
        rows.push(Takeover {
            killed: killed.clone(),
            successor: successor.clone(),
            kill_at: *kill_at,
            lease_at: next.acquired_at_ms,
            first_request_at: first(None),
            first_import_at,
            before: rate(&state.requests, kill_at - WINDOW_MS, *kill_at),
            after: rate(
                &state.requests,
                first_import_at,
                first_import_at + WINDOW_MS,
            ),
        });
    }
    assert_history(&state, per_group);
    // Nobody sent outside its lease: every request lies inside a lease of the node that sent it.
    for r in &state.requests {
        assert!(
            grants.iter().any(|g| g.node == r.prefix
                && g.acquired_at_ms <= r.at_ms
                && r.at_ms <= g.expires_at_ms),
            "a request outside its node's lease: {r:?}"
        );
    }

    println!(
        "\n| takeover | killed → successor | kill → lease s | kill → first request s | kill → first import s | msg/s 5 s before | msg/s 5 s after |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (i, t) in rows.iter().enumerate() {
        println!(
            "| {} | {} → {} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} |",
            i + 1,
            t.killed,
            t.successor,
            (t.lease_at - t.kill_at) as f64 / 1000.0,
            (t.first_request_at - t.kill_at) as f64 / 1000.0,
            (t.first_import_at - t.kill_at) as f64 / 1000.0,
            t.before,
            t.after
        );
    }
    let n = rows.len().max(1) as f64;
    let mean = |f: &dyn Fn(&Takeover) -> f64| rows.iter().map(f).sum::<f64>() / n;
    let max = |f: &dyn Fn(&Takeover) -> f64| rows.iter().map(f).fold(0.0, f64::max);
    let to_import = |t: &Takeover| (t.first_import_at - t.kill_at) as f64 / 1000.0;
    println!(
        "| mean | | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} |",
        mean(&|t| (t.lease_at - t.kill_at) as f64 / 1000.0),
        mean(&|t| (t.first_request_at - t.kill_at) as f64 / 1000.0),
        mean(&to_import),
        mean(&|t| t.before),
        mean(&|t| t.after)
    );
    println!(
        "longest kill → first import {:.2} s (bound: lease_ttl 10 s + request_timeout 5 s = 15 s); {} requests, {total} messages, each once, in order",
        max(&to_import),
        state.requests.len()
    );
    store.close().await;
    sim.shutdown().await;
}

/// Messages imported per second by requests arriving in `[from, to)` (Unix ms).
fn rate(requests: &[RequestRecord], from: i64, to: i64) -> f64 {
    let n: usize = requests
        .iter()
        .filter(|r| r.endpoint == "import_group_msg" && r.at_ms >= from && r.at_ms < to)
        .map(|r| r.results.iter().filter(|&&c| c == 0).count())
        .sum();
    n as f64 * 1000.0 / (to - from) as f64
}

/// The node holding a live lease with a token above `after`.
async fn active_after(store: &Store, after: i64, bound: Duration) -> (String, i64) {
    let started = Instant::now();
    loop {
        if let Ok(Some(v)) = store.ha_view().await {
            let l = v.lease;
            if l.token > after && l.expires_at_ms > l.now_ms {
                return (l.node, l.token);
            }
        }
        assert!(started.elapsed() < bound, "no node took the lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the import count moves: the active node sends.
async fn wait_for_imports(store: &Store, bound: Duration) {
    let started = Instant::now();
    let first = store.totals(None).await.expect("totals").imported;
    loop {
        let now = store.totals(None).await.expect("totals").imported;
        if now > first {
            return;
        }
        assert!(started.elapsed() < bound, "the active node does not send");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_history(state: &timport::simulator::SimSnapshot, per_group: i64) {
    for g in 0..GROUPS {
        let id = format!("ha-{g}");
        let group = state.group(&id).expect("group on the server");
        let texts: Vec<&str> = group
            .messages
            .iter()
            .map(|m| m.msg_body[0]["MsgContent"]["Text"].as_str().unwrap_or(""))
            .collect();
        let want: Vec<String> = (0..per_group)
            .map(|i| format!("message {i} of group {g}"))
            .collect();
        assert!(
            texts.iter().copied().eq(want.iter().map(String::as_str)),
            "group {id}: {} messages on the server, want {per_group}, each once, in order",
            texts.len()
        );
        let mut randoms: Vec<u32> = group.messages.iter().map(|m| m.random).collect();
        randoms.sort_unstable();
        randoms.dedup();
        assert_eq!(
            randoms.len(),
            group.messages.len(),
            "group {id}: one Random per message"
        );
    }
}

fn write_job(path: &Path, per_group: i64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("job"));
    for i in 0..per_group {
        for g in 0..GROUPS {
            writeln!(
                f,
                r#"{{"GroupId":"ha-{g}","From_Account":"user-{}","SendTime":{},"MsgBody":[{{"MsgType":"TIMTextElem","MsgContent":{{"Text":"message {i} of group {g}"}}}}]}}"#,
                i % 13,
                T0 + i
            )
            .expect("write");
        }
    }
}

/// A node's configuration: the defaults of `[ha]`, a 5 s request timeout (the lease rule),
/// 200 requests/s, its own spool and prefix.
fn node_config(dir: &Path, base_url: &str, db: &str, name: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    let spool = dir.join(format!("spool-{name}"));
    std::fs::write(
        &p,
        format!(
            r#"
[tencent]
sdkappid = {APP}
identifier = "administrator"
secret_key = "{KEY}"
base_url = "{base_url}/{name}"
request_timeout = "5s"
[queue]
database = "{db}"
spool_dir = "{spool}"
[import]
requests_per_second = 200
[log]
level = "warn"
[http]
listen = ""
[ha]
enabled = true
node_name = "{name}"
"#,
            spool = spool.display(),
        ),
    )
    .expect("config");
    p
}
