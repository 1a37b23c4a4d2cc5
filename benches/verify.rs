//! Benchmark (not a test): `timport verify` of 100,000 imported messages against the simulator
//! at 40 ms of added latency.
//!
//! The messages (100 groups of 1,000) are imported first by the release daemon with the
//! simulator at no latency and a high quota; then the latency goes to 40 ms and the release
//! `timport verify` reads everything back, once at the default `verify.requests_per_second`
//! (50) and once at 150. Reported: read requests per second achieved (from the simulator's
//! request log: the requests of the run over the time from its first to its last arrival)
//! against the configured rate, and verify's own CPU seconds per 10,000 messages (`wait4`).
//!
//! Run: `cargo bench --bench verify`. `TIMPORT_BENCH_VERIFY` sets the number of messages
//! (default 100000; a multiple of 100). Results are written up in docs/BENCHMARKS.md.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{cpu_model, release_binary, wait_with_usage};

use secrecy::SecretString;
use timport::simulator::{self, Faults, SimConfig};

const APP: u64 = 1_400_000_000;
const KEY: &str = "bench-secret-key";
const T0: i64 = 1_600_000_000;
const GROUPS: usize = 100;

fn config(dir: &Path, base_url: &str, import_rate: u32, verify_rate: u32) -> std::path::PathBuf {
    let p = dir.join(format!("timport-{verify_rate}.toml"));
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
[import]
requests_per_second = {import_rate}
max_lanes = 100
[log]
format = "json"
level = "warn,timport::cli=info"
[http]
listen = ""
[verify]
requests_per_second = {verify_rate}
"#,
            db = dir.join("q.db").display(),
            spool = dir.join("spool").display(),
        ),
    )
    .expect("config");
    p
}

fn main() {
    let bin = release_binary();
    let total: usize = std::env::var("TIMPORT_BENCH_VERIFY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let per_group = total / GROUPS;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        println!(
            "verify benchmark on {} cores, {}: {} messages in {GROUPS} groups",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model(),
            per_group * GROUPS
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = SimConfig::new(APP, "administrator", SecretString::from(KEY.to_string()));
        cfg.auto_create_groups = true;
        cfg.requests_per_second = 5000;
        let sim = simulator::start(cfg).await.expect("simulator");
        let mut job = String::new();
        for i in 0..per_group {
            for g in 0..GROUPS {
                job.push_str(
                    &serde_json::json!({
                        "GroupId": format!("bench-{g:03}"),
                        "From_Account": if i % 2 == 0 { "alice" } else { "bob" },
                        "SendTime": T0 + i as i64,
                        "MsgBody": [{"MsgType": "TIMTextElem",
                                     "MsgContent": {"Text": format!("message {i} of group {g}, with some text")}}],
                    })
                    .to_string(),
                );
                job.push('\n');
            }
        }
        let file = dir.path().join("job.ndjson");
        std::fs::write(&file, job).expect("job");
        let import_cfg = config(dir.path(), &sim.base_url(), 2000, 50);
        let started = Instant::now();
        let status = Command::new(&bin)
            .args(["run", "--until-idle", "--config"])
            .arg(&import_cfg)
            .arg("--ingest")
            .arg(&file)
            .env_remove("TIMPORT_CONFIG")
            .stdout(Stdio::null())
            .status()
            .expect("run");
        assert!(status.success(), "import failed");
        println!(
            "imported {} messages in {:.1} s",
            per_group * GROUPS,
            started.elapsed().as_secs_f64()
        );
        sim.set_faults(Faults {
            latency: Duration::from_millis(40),
            ..Faults::default()
        })
        .expect("faults");
        println!("\n| configured reads/s | messages | read requests | wall s | achieved reads/s | % of configured | verify CPU s | CPU s / 10k messages | peak RSS MiB |");
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        for rate in [50u32, 150] {
            let cfg = config(dir.path(), &sim.base_url(), 200, rate);
            let before = sim.state().requests.len();
            let started = Instant::now();
            // Reaped by wait_with_usage (wait4), which also reads its CPU time.
            #[allow(clippy::zombie_processes)]
            let child = Command::new(&bin)
                .args(["verify", "--restart", "--json", "--config"])
                .arg(&cfg)
                .env_remove("TIMPORT_CONFIG")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("verify");
            let pid = child.id();
            // Peak RSS sampled from the child's own VmHWM (wait4's ru_maxrss of a child spawned
            // from this big process counts this process's pages at the fork).
            let hwm = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
            let sampler = {
                let hwm = hwm.clone();
                std::thread::spawn(move || {
                    let path = format!("/proc/{pid}/status");
                    while let Ok(text) = std::fs::read_to_string(&path) {
                        if let Some(kib) = text
                            .lines()
                            .find(|l| l.starts_with("VmHWM:"))
                            .and_then(|l| l.split_whitespace().nth(1))
                            .and_then(|v| v.parse::<i64>().ok())
                        {
                            hwm.fetch_max(kib, std::sync::atomic::Ordering::Relaxed);
                        }
                        if text.contains("State:\tZ") {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                })
            };
            let (ok, _, cpu) =
                tokio::task::spawn_blocking(move || wait_with_usage(pid)).await.expect("wait");
            let _ = sampler.join();
            let rss_kib = hwm.load(std::sync::atomic::Ordering::Relaxed);
            let wall = started.elapsed().as_secs_f64();
            assert!(ok, "verify exited non-zero");
            let state = sim.state();
            let reads: Vec<i64> = state.requests[before..]
                .iter()
                .filter(|r| r.endpoint == "group_msg_get_simple" || r.endpoint == "get_group_info")
                .map(|r| r.at_ms)
                .collect();
            let span = (reads[reads.len() - 1] - reads[0]) as f64 / 1000.0;
            let achieved = (reads.len() - 1) as f64 / span;
            let messages = (per_group * GROUPS) as f64;
            println!(
                "| {rate} | {} | {} | {wall:.1} | {achieved:.1} | {:.1}% | {cpu:.2} | {:.3} | {:.1} |",
                per_group * GROUPS,
                reads.len(),
                100.0 * achieved / f64::from(rate),
                cpu / messages * 10_000.0,
                rss_kib as f64 / 1024.0
            );
        }
        sim.shutdown().await;
    });
}
