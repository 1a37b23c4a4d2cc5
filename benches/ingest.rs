//! Benchmark (not a test): ingest of a 1,000,000-message NDJSON file by the release binary
//! (`timport ingest`), messages/s and peak RSS, side by side in the same run with the sqlite3
//! shell's `.import` of the same rows as CSV into a comparable table (WAL, same index) as the
//! floor.
//!
//! Run: `cargo bench --bench ingest` (set `TIMPORT_BENCH_MESSAGES` to change the size; set
//! `TIMPORT_BENCH_DATABASE_URL` to a PostgreSQL server URL on this machine to run the same ingest
//! on a fresh database of it as well, beside `psql \copy` of the same rows as its floor, with the
//! server's CPU).
//! Results are written up in docs/BENCHMARKS.md.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

mod common;
use common::{cpu_model, release_binary, wait_with_usage};

#[expect(clippy::zombie_processes, reason = "reaped by wait_with_usage (wait4)")]
fn main() {
    let n: usize = std::env::var("TIMPORT_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let bin = release_binary();
    let dir = tempfile::tempdir().expect("tempdir");
    let ndjson = dir.path().join("bench.ndjson");
    let csv = dir.path().join("bench.csv");
    write_inputs(&ndjson, &csv, n);
    let size = std::fs::metadata(&ndjson).map(|m| m.len()).unwrap_or(0);
    println!(
        "ingest benchmark: {n} messages, NDJSON {:.1} MiB, machine: {} cores, {}",
        size as f64 / 1048576.0,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model()
    );

    // timport ingest, in its own process so its peak RSS is its own.
    let db = dir.path().join("timport.db");
    let started = Instant::now();
    let child = Command::new(&bin)
        .args(["ingest", &ndjson.to_string_lossy()])
        .env("TIMPORT__QUEUE__DATABASE", &db)
        .env("TIMPORT__LOG__LEVEL", "warn")
        .env_remove("TIMPORT_CONFIG")
        .stdout(Stdio::null())
        .spawn()
        .expect("run timport");
    let (ok, timport_rss, cpu) = wait_with_usage(child.id());
    let timport_secs = started.elapsed().as_secs_f64();
    assert!(ok, "timport ingest failed");

    // The floor: sqlite3 .import of the same rows into a comparable table.
    let floor_db = dir.path().join("floor.db");
    let schema = "PRAGMA journal_mode=WAL;
        CREATE TABLE messages (id INTEGER PRIMARY KEY, lane_id INTEGER NOT NULL, job_id INTEGER NOT NULL,
          source_line INTEGER NOT NULL, source_index INTEGER NOT NULL, from_account TEXT NOT NULL,
          send_time INTEGER NOT NULL, random INTEGER NOT NULL, random_assigned INTEGER NOT NULL,
          recent_contact INTEGER NOT NULL, body TEXT NOT NULL);
        CREATE INDEX messages_lane_queue ON messages (lane_id, send_time, id);
        CREATE INDEX messages_job_state ON messages (job_id);";
    let ok = Command::new("sqlite3")
        .arg(&floor_db)
        .arg(schema)
        .stdout(Stdio::null())
        .status()
        .expect("sqlite3 shell")
        .success();
    assert!(ok, "schema for the floor");
    let started = Instant::now();
    let ok = Command::new("sqlite3")
        .arg(&floor_db)
        .arg(format!(
            ".import --csv --skip 1 {} messages",
            csv.to_string_lossy()
        ))
        .stdout(Stdio::null())
        .status()
        .expect("sqlite3 shell")
        .success();
    let floor_secs = started.elapsed().as_secs_f64();
    assert!(ok, "sqlite3 .import failed");

    let rate = n as f64 / timport_secs;
    let floor_rate = n as f64 / floor_secs;
    println!("| tool | time | messages/s | CPU s | peak RSS |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| timport ingest | {timport_secs:.2} s | {rate:.0} | {cpu:.2} | {:.1} MiB |",
        timport_rss as f64 / 1024.0
    );
    println!("| sqlite3 .import (floor) | {floor_secs:.2} s | {floor_rate:.0} | - | - |");
    if let Some(pg) = postgres_run(&bin, &ndjson, &csv) {
        println!(
            "| timport ingest, PostgreSQL | {:.2} s | {:.0} | {:.2} (server {:.2}) | {:.1} MiB |",
            pg.secs,
            n as f64 / pg.secs,
            pg.cpu,
            pg.server_cpu,
            pg.rss as f64 / 1024.0
        );
        println!(
            "| psql \\copy, PostgreSQL (floor) | {:.2} s | {:.0} | - (server {:.2}) | - |",
            pg.floor_secs,
            n as f64 / pg.floor_secs,
            pg.floor_server_cpu
        );
    }
    println!(
        "ratio timport/floor time: {:.2}x (targets: >= 200000 messages/s, <= 2x the floor, < 100 MiB)",
        timport_secs / floor_secs
    );
}

/// What the PostgreSQL run measured.
struct PgRun {
    secs: f64,
    rss: i64,
    cpu: f64,
    server_cpu: f64,
    floor_secs: f64,
    floor_server_cpu: f64,
}

/// With `TIMPORT_BENCH_DATABASE_URL` (a PostgreSQL server URL on this machine, database part
/// ignored), the same ingest into a fresh database of that server (created, then dropped), and
/// as its floor `psql \copy` of the same rows as CSV into a comparable table (as the SQLite
/// floor: the same columns with the body, the same indexes). Seconds, timport's peak RSS (KiB) and CPU, and
/// the server's CPU for each.
#[expect(clippy::zombie_processes, reason = "reaped by wait_with_usage (wait4)")]
fn postgres_run(bin: &Path, ndjson: &Path, csv: &Path) -> Option<PgRun> {
    let server = std::env::var("TIMPORT_BENCH_DATABASE_URL").ok()?;
    let db = format!("timport_bench_ingest_{}", std::process::id());
    let (base, _) = server.split_once('?').unwrap_or((&server, ""));
    let root = base.rsplit_once('/').map_or(base, |(head, _)| head);
    let url = format!("{root}/{db}");
    let psql = |on: &str, sql: &str| {
        let ok = Command::new("psql")
            .args([on, "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdout(Stdio::null())
            .status()
            .expect("psql")
            .success();
        assert!(ok, "psql {sql}");
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let postmaster = rt.block_on(common::pg::postmaster_pid(&server));
    let server_cpu = || postmaster.map(common::pg::server_cpu).unwrap_or(f64::NAN);
    psql(&server, &format!("DROP DATABASE IF EXISTS {db}"));
    psql(&server, &format!("CREATE DATABASE {db}"));
    let cpu0 = server_cpu();
    let started = Instant::now();
    let child = Command::new(bin)
        .args(["ingest", &ndjson.to_string_lossy()])
        .env("TIMPORT__QUEUE__DATABASE", &url)
        .env("TIMPORT__LOG__LEVEL", "warn")
        .env_remove("TIMPORT_CONFIG")
        .stdout(Stdio::null())
        .spawn()
        .expect("run timport");
    let (ok, rss, cpu) = wait_with_usage(child.id());
    let secs = started.elapsed().as_secs_f64();
    assert!(ok, "timport ingest on PostgreSQL failed");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let server_used = server_cpu() - cpu0;
    psql(&server, &format!("DROP DATABASE IF EXISTS {db}"));

    // The floor: COPY of the same rows (CSV) into comparable tables, in one transaction.
    psql(&server, &format!("CREATE DATABASE {db}"));
    psql(
        &url,
        "CREATE TABLE messages (id BIGINT PRIMARY KEY, lane_id BIGINT NOT NULL,
           job_id BIGINT NOT NULL, source_line BIGINT NOT NULL, source_index BIGINT NOT NULL,
           from_account TEXT NOT NULL, send_time BIGINT NOT NULL, random BIGINT NOT NULL,
           random_assigned BIGINT NOT NULL, recent_contact BIGINT NOT NULL, body TEXT NOT NULL);
         CREATE INDEX messages_lane_queue ON messages (lane_id, send_time, id);
         CREATE INDEX messages_job ON messages (job_id);",
    );
    let cpu0 = server_cpu();
    let started = Instant::now();
    let copy = format!(
        "\\copy messages FROM '{}' WITH (FORMAT csv, HEADER)\n",
        csv.display()
    );
    let ok = Command::new("psql")
        .args([&url, "-q", "-v", "ON_ERROR_STOP=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("stdin").write_all(copy.as_bytes())?;
            c.wait()
        })
        .expect("psql copy")
        .success();
    let floor_secs = started.elapsed().as_secs_f64();
    assert!(ok, "psql \\copy failed");
    let floor_server_cpu = server_cpu() - cpu0;
    psql(&server, &format!("DROP DATABASE IF EXISTS {db}"));
    Some(PgRun {
        secs,
        rss,
        cpu,
        server_cpu: server_used,
        floor_secs,
        floor_server_cpu,
    })
}

fn write_inputs(ndjson: &Path, csv: &Path, n: usize) {
    let mut j = std::io::BufWriter::new(std::fs::File::create(ndjson).expect("ndjson"));
    let mut c = std::io::BufWriter::new(std::fs::File::create(csv).expect("csv"));
    writeln!(c, "id,lane_id,job_id,source_line,source_index,from_account,send_time,random,random_assigned,recent_contact,body").ok();
    let t0: i64 = 1_600_000_000;
    for i in 0..n {
        let group = i % 1000;
        let t = t0 + (i / 1000) as i64;
        let text = format!("message number {i} with some ordinary chat text in it");
        writeln!(
            j,
            r#"{{"GroupId":"group-{group}","From_Account":"user-{}","SendTime":{t},"MsgBody":[{{"MsgType":"TIMTextElem","MsgContent":{{"Text":"{text}"}}}}]}}"#,
            i % 97
        )
        .ok();
        let body =
            format!(r#"[{{""MsgContent"":{{""Text"":""{text}""}},""MsgType"":""TIMTextElem""}}]"#);
        writeln!(
            c,
            "{},{},1,{},0,user-{},{t},{},1,0,\"{body}\"",
            i + 1,
            group + 1,
            i + 1,
            i % 97,
            (i as u64).wrapping_mul(2654435761) % 4294967296
        )
        .ok();
    }
}
