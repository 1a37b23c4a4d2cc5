//! Benchmark (not a test): import throughput of the release daemon against the simulator.
//!
//! 1. limiters (issue 11): 40 ms added latency, 60 groups pending, the daemon configured for
//!    200 requests/s, side by side against the simulator's three limiters (`sliding`, `fixed`,
//!    `bucket`) at a server quota of 200/s, then again at a real quota of 150/s. Steady-state
//!    messages/s against the ceiling (min(server quota, configured) × 7 messages/s), the share
//!    of all requests rate-limited (learning included), and the daemon's CPU seconds per 10,000
//!    messages. "steady" is the sliding limiter at 200/s.
//! 2. lossy: the steady scenario while the simulator applies but drops 5% of responses.
//! 3. naive: side by side, a sequential importer (one request of 7 at a time, as a hand-written
//!    script would) on the same simulator for a fixed time.
//! 4. scale: 2,000,000 queued messages in 20,000 groups: time from start to the first request,
//!    and the throughput over the first seconds.
//! 5. HTTP floor: the same 30,000 messages sent by the Tencent client alone (64 concurrent
//!    senders, the same pacer, a current-thread runtime like the daemon's, no queue), to a
//!    simulator in a child process: the CPU that HTTP alone costs per 10,000 messages here.
//!
//! 6. backends: the steady scenario with the queue in SQLite and in PostgreSQL, side by side, with
//!    the database server's CPU (only with `TIMPORT_BENCH_DATABASE_URL`, a server URL).
//!
//! Run: `cargo bench --bench import`. Sizes: `TIMPORT_BENCH_STEADY` (messages per group in 1–2,
//! default 1000: about 34 s of steady state at 200/s, 46 s at 150/s), `TIMPORT_BENCH_SCALE`
//! (messages in 4, default 2000000; 0 skips it). `TIMPORT_BENCH_LIMITERS_ONLY=1` runs only 1,
//! `TIMPORT_BENCH_BACKENDS_ONLY=1` only 6.
//! Results are written up in docs/BENCHMARKS.md.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod common;
use common::{cpu_model, release_binary, wait_with_usage};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use timport::simulator::{self, Faults, Limiter, SimConfig, SimHandle};
use timport::store::{Store, StoreOptions};
use timport::tencent::{ClientConfig, ImportGroupMsgRequest, ImportMsg, Region, TencentClient};

const APP: u64 = 1_400_000_000;
const KEY: &str = "bench-secret-key";
const T0: i64 = 1_600_000_000;

fn main() {
    let bin = release_binary();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        println!(
            "import benchmark on {} cores, {}",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            cpu_model()
        );
        let per_group: i64 = env_num("TIMPORT_BENCH_STEADY", 1000);
        let only_limiters = env_num("TIMPORT_BENCH_LIMITERS_ONLY", 0) == 1;
        if env_num("TIMPORT_BENCH_BACKENDS_ONLY", 0) == 1 {
            let server = common::pg::server().expect("TIMPORT_BENCH_DATABASE_URL");
            backends(&bin, &server, per_group).await;
            return;
        }
        let mut rows = Vec::new();
        for quota in [200, 150] {
            for limiter in [Limiter::Sliding, Limiter::Fixed, Limiter::Bucket] {
                let name = format!("{} {quota}/s", limiter_name(limiter));
                let server = Server {
                    quota,
                    limiter,
                    p_drop: 0.0,
                };
                rows.push(scenario(&bin, &name, 60, per_group, server).await);
            }
        }
        if !only_limiters {
            let server = Server {
                quota: 200,
                limiter: Limiter::Sliding,
                p_drop: 0.05,
            };
            rows.push(scenario(&bin, "lossy (5% responses dropped)", 60, per_group, server).await);
        }
        println!("\n| scenario (server limiter, real quota; daemon configured 200/s) | messages | steady msg/s | ceiling msg/s | % of ceiling | rate-limited requests | daemon CPU s / 10k msgs |");
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        for r in &rows {
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.1}% | {:.2}% ({} of {}) | {:.3} |",
                r.name,
                r.messages,
                r.rate,
                r.ceiling,
                r.rate * 100.0 / r.ceiling,
                r.rate_limited_pct,
                r.limited,
                r.requests,
                r.cpu_per_10k
            );
        }
        if only_limiters {
            return;
        }
        let naive = naive(Duration::from_secs(15)).await;
        println!(
            "| naive sequential | {} | {:.0} | 1400 | {:.1}% | - | - |",
            naive.0,
            naive.1,
            naive.1 / 14.0
        );
        println!("timport / naive: {:.1}x", rows[0].rate / naive.1.max(0.001));
        if let Some(server) = common::pg::server() {
            backends(&bin, &server, per_group).await;
        }
        http_floor(&bin, 60, per_group);
        let scale_n: i64 = env_num("TIMPORT_BENCH_SCALE", 2_000_000);
        if scale_n > 0 {
            scale(&bin, scale_n, 20_000).await;
        }
    });
}

struct Outcome {
    name: String,
    messages: i64,
    rate: f64,
    ceiling: f64,
    rate_limited_pct: f64,
    limited: usize,
    requests: usize,
    cpu_per_10k: f64,
    /// PostgreSQL runs: the server's CPU seconds per 10,000 messages.
    db_cpu_per_10k: Option<f64>,
}

/// The simulator's side of a scenario.
#[derive(Clone, Copy)]
struct Server {
    /// The real quota, requests/s (the daemon is always configured for 200).
    quota: u32,
    limiter: Limiter,
    p_drop: f64,
}

const CONFIGURED_RPS: u32 = 200;

fn limiter_name(l: Limiter) -> &'static str {
    match l {
        Limiter::Sliding => "sliding",
        Limiter::Fixed => "fixed",
        Limiter::Bucket => "bucket",
    }
}

fn env_num(name: &str, default: i64) -> i64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn start_sim(latency: Duration, p_drop: f64) -> SimHandle {
    start_sim_with(
        latency,
        Server {
            quota: 200,
            limiter: Limiter::Sliding,
            p_drop,
        },
    )
    .await
}

async fn start_sim_with(latency: Duration, server: Server) -> SimHandle {
    let p_drop = server.p_drop;
    let mut cfg = SimConfig::new(APP, "administrator", SecretString::from(KEY.to_string()));
    cfg.auto_create_groups = true;
    cfg.requests_per_second = server.quota;
    cfg.limiter = server.limiter;
    cfg.faults = Faults {
        latency,
        p_drop_response_after_apply: p_drop,
        ..Faults::default()
    };
    simulator::start(cfg).await.expect("simulator")
}

fn write_job(path: &Path, groups: i64, per_group: i64, prefix: &str) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("job"));
    for i in 0..per_group {
        for g in 0..groups {
            writeln!(
                f,
                r#"{{"GroupId":"{prefix}-{g}","From_Account":"user-{}","SendTime":{},"MsgBody":[{{"MsgType":"TIMTextElem","MsgContent":{{"Text":"message {i} of group {g}"}}}}]}}"#,
                i % 13,
                T0 + i
            )
            .expect("write");
        }
    }
}

fn config(dir: &Path, base_url: &str, extra: &str) -> PathBuf {
    config_on(
        dir,
        base_url,
        extra,
        &dir.join("timport.db").display().to_string(),
    )
}

/// [`config`] with the queue in `db` (a SQLite path or a PostgreSQL URL).
fn config_on(dir: &Path, base_url: &str, extra: &str, db: &str) -> PathBuf {
    let p = dir.join("timport.toml");
    std::fs::write(
        &p,
        format!(
            r#"
[tencent]
sdkappid = {APP}
identifier = "administrator"
secret_key = "{KEY}"
base_url = "{base_url}"
[queue]
database = "{db}"
spool_dir = "{spool}"
[log]
level = "warn"
[http]
listen = ""
{extra}
"#,
            spool = dir.join("spool").display(),
        ),
    )
    .expect("config");
    p
}

/// Queues `job` with `timport ingest` (the release binary), before the import is measured.
fn ingest(bin: &Path, cfg: &Path, job: &Path) {
    let ok = Command::new(bin)
        .args([
            "ingest",
            "--config",
            &cfg.to_string_lossy(),
            &job.to_string_lossy(),
        ])
        .stdout(Stdio::null())
        .status()
        .expect("ingest")
        .success();
    assert!(ok, "ingest");
}

async fn scenario(bin: &Path, name: &str, groups: i64, per_group: i64, server: Server) -> Outcome {
    scenario_on(bin, name, groups, per_group, server, None).await
}

/// A scenario with the queue in PostgreSQL when `pg` names a server (a fresh database on it);
/// then the server's CPU is measured too.
#[expect(
    clippy::zombie_processes,
    reason = "reaped by wait_with_usage (wait4) to read its rusage"
)]
async fn scenario_on(
    bin: &Path,
    name: &str,
    groups: i64,
    per_group: i64,
    server: Server,
    pg: Option<&str>,
) -> Outcome {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = start_sim_with(Duration::from_millis(40), server).await;
    let job = dir.path().join("job.ndjson");
    write_job(&job, groups, per_group, "bench");
    let db = match pg {
        Some(server) => common::pg::fresh_database(server, "bench_import").await,
        None => dir.path().join("timport.db").display().to_string(),
    };
    let postmaster = match pg {
        Some(server) => common::pg::postmaster_pid(server).await,
        None => None,
    };
    let cfg = config_on(
        dir.path(),
        &sim.base_url(),
        &format!("[import]\nrequests_per_second = {CONFIGURED_RPS}\n"),
        &db,
    );
    // Queue first, so the import measurement is the import alone.
    ingest(bin, &cfg, &job);
    let store = Store::open(
        &timport::settings::Database::from(db.clone()),
        &StoreOptions::default(),
    )
    .await
    .expect("store");
    let db_cpu_before = postmaster.map(common::pg::server_cpu);
    let total = groups * per_group;
    let child = Command::new(bin)
        .args(["run", "--config", &cfg.to_string_lossy(), "--until-idle"])
        .stdout(Stdio::null())
        .spawn()
        .expect("run");
    let pid = child.id();
    // Steady state: between 10% and 90% imported.
    let (mut t10, mut t90) = (None, None);
    loop {
        let imported = store.totals(None).await.map(|t| t.imported).unwrap_or(0);
        if t10.is_none() && imported >= total / 10 {
            t10 = Some((Instant::now(), imported));
        }
        if t90.is_none() && imported >= total * 9 / 10 {
            t90 = Some((Instant::now(), imported));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ok, _rss, cpu) = tokio::task::spawn_blocking(move || wait_with_usage(pid))
        .await
        .expect("wait");
    assert!(ok, "daemon exit status");
    // The daemon's backends end with it; the postmaster reaps them into its own counters.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let db_cpu = match (postmaster, db_cpu_before) {
        (Some(p), Some(before)) => Some(common::pg::server_cpu(p) - before),
        _ => None,
    };
    let ((a, ia), (b, ib)) = (t10.expect("t10"), t90.expect("t90"));
    let rate = (ib - ia) as f64 / b.duration_since(a).as_secs_f64();
    let state = sim.state();
    let requests = state.requests.len().max(1);
    let limited = state
        .requests
        .iter()
        .filter(|r| {
            matches!(
                r.error_code,
                Some(60007 | 60011 | 60018 | 60019 | 10006 | 10023)
            )
        })
        .count();
    let on_server: usize = state.groups.iter().map(|g| g.messages.len()).sum();
    assert_eq!(
        on_server as i64, total,
        "{name}: every message exactly once"
    );
    store.close().await;
    sim.shutdown().await;
    let steady_secs = b.duration_since(a).as_secs_f64();
    println!(
        "{name}: {total} messages, steady {rate:.0} msg/s over {steady_secs:.1} s, {requests} requests, {limited} rate-limited, daemon CPU {cpu:.2} s"
    );
    Outcome {
        name: name.into(),
        messages: total,
        rate,
        ceiling: f64::from(server.quota.min(CONFIGURED_RPS)) * 7.0,
        rate_limited_pct: limited as f64 * 100.0 / requests as f64,
        limited,
        requests,
        cpu_per_10k: cpu * 10_000.0 / total as f64,
        db_cpu_per_10k: db_cpu.map(|c| c * 10_000.0 / total as f64),
    }
}

/// 6. backends: the steady scenario (sliding limiter, 200/s, 40 ms) with the queue in SQLite and
///    in PostgreSQL (`TIMPORT_BENCH_DATABASE_URL`), alternating, twice each, side by side.
async fn backends(bin: &Path, server: &str, per_group: i64) {
    let steady = Server {
        quota: 200,
        limiter: Limiter::Sliding,
        p_drop: 0.0,
    };
    let mut rows = Vec::new();
    for round in 1..=2 {
        rows.push(
            scenario_on(
                bin,
                &format!("SQLite, run {round}"),
                60,
                per_group,
                steady,
                None,
            )
            .await,
        );
        rows.push(
            scenario_on(
                bin,
                &format!("PostgreSQL, run {round}"),
                60,
                per_group,
                steady,
                Some(server),
            )
            .await,
        );
    }
    println!(
        "\n| queue (steady: sliding 200/s, 40 ms) | messages | steady msg/s | % of ceiling | daemon CPU s / 10k msgs | database server CPU s / 10k msgs |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.1}% | {:.3} | {} |",
            r.name,
            r.messages,
            r.rate,
            r.rate * 100.0 / r.ceiling,
            r.cpu_per_10k,
            r.db_cpu_per_10k
                .map(|c| format!("{c:.3}"))
                .unwrap_or_else(|| "(in the daemon)".into())
        );
    }
}

/// A hand-written importer: one request of 7 at a time, no pacing, no concurrency.
async fn naive(duration: Duration) -> (i64, f64) {
    let sim = start_sim(Duration::from_millis(40), 0.0).await;
    let client = TencentClient::new(
        ClientConfig {
            sdkappid: APP,
            identifier: "administrator".into(),
            secret_key: SecretString::from(KEY.to_string()),
            base_url: Some(sim.base_url()),
            region: Region::Singapore,
            request_timeout: Duration::from_secs(10),
            usersig_validity: Duration::from_secs(86_400),
        },
        None,
    )
    .expect("client");
    let started = Instant::now();
    let mut sent = 0i64;
    let mut i = 0i64;
    while started.elapsed() < duration {
        let req = ImportGroupMsgRequest {
            group_id: format!("naive-{}", i % 60),
            topic_id: None,
            recent_contact_flag: None,
            msg_list: (0..7)
                .map(|k| ImportMsg {
                    from_account: "user".into(),
                    send_time: T0 + i * 7 + k,
                    random: None,
                    msg_body: serde_json::value::to_raw_value(&serde_json::json!([{"MsgType": "TIMTextElem", "MsgContent": {"Text": "naive"}}])).expect("serializes"),
                })
                .collect(),
        };
        if client.import_group_msg(&req).await.is_ok() {
            sent += 7;
        }
        i += 1;
    }
    let rate = sent as f64 / started.elapsed().as_secs_f64();
    sim.shutdown().await;
    println!("naive sequential: {sent} messages in {duration:?}, {rate:.0} msg/s");
    (sent, rate)
}

#[expect(clippy::zombie_processes, reason = "reaped by wait_with_usage (wait4)")]
async fn scale(bin: &Path, n: i64, groups: i64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = start_sim(Duration::from_millis(40), 0.0).await;
    let job = dir.path().join("scale.ndjson");
    write_job(&job, groups, n / groups, "scale");
    let cfg = config(dir.path(), &sim.base_url(), "[import]\nmax_lanes = 64\n");
    let started = Instant::now();
    ingest(bin, &cfg, &job);
    let ingest_secs = started.elapsed().as_secs_f64();
    let child = Command::new(bin)
        .args(["run", "--config", &cfg.to_string_lossy()])
        .stdout(Stdio::null())
        .spawn()
        .expect("run");
    let start = Instant::now();
    while sim.state().requests.is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no request within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = start.elapsed();
    // Throughput over the next 20 seconds, counted on the server.
    let count =
        |s: &SimHandle| -> usize { s.state().groups.iter().map(|g| g.messages.len()).sum() };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (a, ca) = (Instant::now(), count(&sim));
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (b, cb) = (Instant::now(), count(&sim));
    let rate = (cb - ca) as f64 / b.duration_since(a).as_secs_f64();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let pid = child.id();
    let _ = tokio::task::spawn_blocking(move || wait_with_usage(pid)).await;
    sim.shutdown().await;
    println!(
        "\nscale: {n} messages in {groups} groups queued in {ingest_secs:.1} s; first request {:.0} ms after start; then {rate:.0} msg/s ({:.1}% of 1,400)",
        first.as_secs_f64() * 1000.0,
        rate / 14.0
    );
}

/// CPU seconds of this process (all threads).
#[allow(unsafe_code)]
fn own_cpu() -> f64 {
    // SAFETY: getrusage writes only into the zeroed rusage we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_utime.tv_sec as f64
        + usage.ru_utime.tv_usec as f64 / 1e6
        + usage.ru_stime.tv_sec as f64
        + usage.ru_stime.tv_usec as f64 / 1e6
}

/// The Tencent client alone, paced like the daemon, against a simulator in a child process: what
/// the HTTP exchanges cost per 10,000 messages on this machine, with no queue at all.
fn http_floor(bin: &Path, groups: i64, per_group: i64) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let mut sim = Command::new(bin)
        .args([
            "simulate",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--secret-key",
            KEY,
            "--auto-create-groups",
            "--latency",
            "40ms",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("simulator child");
    let total = groups * per_group;
    let worker = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let client = TencentClient::new(
                ClientConfig {
                    sdkappid: APP,
                    identifier: "administrator".into(),
                    secret_key: SecretString::from(KEY.to_string()),
                    base_url: Some(format!("http://127.0.0.1:{port}")),
                    region: Region::Singapore,
                    request_timeout: Duration::from_secs(10),
                    usersig_validity: Duration::from_secs(86_400),
                },
                Some(std::sync::Arc::new(timport::pacing::Pacer::new(200))),
            )
            .expect("client");
            // Wait for the simulator to listen.
            let probe = Instant::now();
            while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                assert!(probe.elapsed() < Duration::from_secs(10), "simulator did not start");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let cpu0 = own_cpu();
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            // 64 senders, each owning groups g ≡ k (mod 64), sending each group's messages in
            // order, 7 at a time, as the daemon's lanes do.
            for k in 0..64.min(groups) {
                let client = client.clone();
                tasks.spawn(async move {
                    let mut sent = 0i64;
                    for g in (k..groups).step_by(64) {
                        for start in (0..per_group).step_by(7) {
                            let req = ImportGroupMsgRequest {
                                group_id: format!("floor-{g}"),
                                topic_id: None,
                                recent_contact_flag: None,
                                msg_list: (start..(start + 7).min(per_group))
                                    .map(|i| ImportMsg {
                                        from_account: format!("user-{}", i % 13),
                                        send_time: T0 + i,
                                        random: Some((g * 100_000 + i) as u32),
                                        msg_body: serde_json::value::to_raw_value(&serde_json::json!([{"MsgType": "TIMTextElem", "MsgContent": {"Text": format!("message {i} of group {g}")}}])).expect("serializes"),
                                    })
                                    .collect(),
                            };
                            if client.import_group_msg(&req).await.is_ok() {
                                sent += req.msg_list.len() as i64;
                            }
                        }
                    }
                    sent
                });
            }
            let mut sent = 0;
            while let Some(n) = tasks.join_next().await {
                sent += n.unwrap_or(0);
            }
            (sent, started.elapsed(), own_cpu() - cpu0)
        })
    });
    let (sent, elapsed, cpu) = worker.join().expect("floor client");
    let _ = sim.kill();
    let _ = sim.wait();
    assert_eq!(sent, total, "HTTP floor: every message answered");
    println!(
        "HTTP floor (client alone, paced, no queue): {sent} messages in {:.1} s, {:.0} msg/s, client CPU {cpu:.2} s = {:.3} s per 10k messages",
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64(),
        cpu * 10_000.0 / sent as f64
    );
}
