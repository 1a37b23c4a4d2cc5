//! Issue 12 points 1, 2 and 5: the database refusing writes (a full disk on a small mount, an
//! immutable file), a corrupt file, and a database deleted, replaced or never there. Real
//! `timport run` child processes against the simulator, real SQLite files on real mounts (we run
//! as root: tmpfs, or a loop-mounted image where tmpfs is refused, and `chattr`).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use timport::simulator::SimHandle;
use timport::store::{Health, Store, StoreError, StoreOptions};
use tokio_util::sync::CancellationToken;

/// A small file system of its own at `dir`: tmpfs, or an ext4 image on a loop device where
/// tmpfs cannot be mounted. Unmounted on drop.
struct SmallMount {
    dir: PathBuf,
}

impl SmallMount {
    fn new(dir: &Path, mib: u32) -> SmallMount {
        std::fs::create_dir_all(dir).unwrap();
        let tmpfs = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !tmpfs {
            let img = dir.with_extension("img");
            let f = std::fs::File::create(&img).unwrap();
            f.set_len(u64::from(mib) << 20).unwrap();
            let mkfs = Command::new("mkfs.ext4")
                .arg("-q")
                .arg(&img)
                .status()
                .unwrap();
            assert!(mkfs.success(), "mkfs.ext4 for the loop image");
            let mount = Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(dir)
                .status()
                .unwrap();
            assert!(
                mount.success(),
                "neither tmpfs nor a loop image could be mounted"
            );
        }
        SmallMount {
            dir: dir.to_path_buf(),
        }
    }

    /// Fills the mount with `filler` until the disk is full.
    fn fill(&self) -> PathBuf {
        let p = self.dir.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![0x5au8; 64 * 1024];
        loop {
            if f.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = f.sync_all();
        p
    }
}

impl Drop for SmallMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Clears `chattr +i` on drop, so a failed test leaves a folder that can be removed.
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(files: &[PathBuf]) -> Immutable {
        for f in files {
            let s = Command::new("chattr").arg("+i").arg(f).status().unwrap();
            assert!(s.success(), "chattr +i {}", f.display());
        }
        Immutable(files.to_vec())
    }

    fn clear(&self) {
        for f in &self.0 {
            let _ = Command::new("chattr")
                .arg("-i")
                .arg(f)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        self.clear();
    }
}

/// A systemd notification socket: every line the child sends, in order, collected by a thread.
struct Notify {
    _dir: tempfile::TempDir,
    path: PathBuf,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Notify {
    fn new() -> Notify {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let into = lines.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                into.lock().unwrap().extend(msg.lines().map(str::to_string));
            }
        });
        Notify {
            _dir: dir,
            path,
            lines,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// `timport run --config CONFIG EXTRA...` as systemd would start it, with a 2 s watchdog.
    fn spawn_run(&self, config: &Path, log: &std::fs::File, extra: &[&str]) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_timport"))
            .args(["run", "--config", &path_str(config)])
            .args(extra)
            .env_remove("TIMPORT_CONFIG")
            .env("NOTIFY_SOCKET", &self.path)
            .env("WATCHDOG_USEC", "2000000")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(log.try_clone().unwrap()))
            .spawn()
            .unwrap()
    }
}

/// A free loopback port for the child's HTTP listener.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `child_config` with the HTTP listener on `port`.
fn config_with_http(env: &Env, sim: &SimHandle, db: &Path, import: &str, port: u16) -> PathBuf {
    let p = child_config(env, &sim.base_url(), db, import);
    let text = std::fs::read_to_string(&p).unwrap();
    let text = text.replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    std::fs::write(&p, text).unwrap();
    p
}

/// `GET /readyz`: (status code, body), or None while nothing listens.
fn readyz(port: u16) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Some((code, body))
}

/// Polls `what` until it holds, panicking with `why` past two minutes.
async fn eventually(why: &str, mut what: impl FnMut() -> bool) {
    let started = Instant::now();
    while !what() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "timed out waiting: {why}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// (group, From_Account, SendTime, text) in queue order over `groups` groups.
fn messages(prefix: &str, groups: usize, per_group: usize) -> Vec<(String, String, i64, String)> {
    let mut out = Vec::new();
    for i in 0..per_group {
        for g in 0..groups {
            out.push((
                format!("{prefix}-{g}"),
                if i % 3 == 0 { "alice" } else { "bob" }.to_string(),
                T0 + i as i64,
                format!("{prefix} {g}-{i}"),
            ));
        }
    }
    out
}

fn ndjson(msgs: &[(String, String, i64, String)]) -> String {
    msgs.iter()
        .map(|(g, f, t, text)| line(g, f, *t, text) + "\n")
        .collect()
}

fn on_server(sim: &SimHandle) -> usize {
    sim.state().groups.iter().map(|g| g.messages.len()).sum()
}

/// Every message on the server exactly once, in order, as queued.
fn assert_history(sim: &SimHandle, msgs: &[(String, String, i64, String)]) {
    let mut groups: Vec<&str> = msgs.iter().map(|m| m.0.as_str()).collect();
    groups.sort();
    groups.dedup();
    for g in groups {
        let want: Vec<(String, i64, String)> = msgs
            .iter()
            .filter(|m| m.0 == g)
            .map(|(_, f, t, text)| (f.clone(), *t, text.clone()))
            .collect();
        assert_eq!(
            history_texts(sim, g),
            want,
            "group {g}: all, once, in order"
        );
    }
}

/// Queues `msgs` as one job file into the database at `db` (created), then closes it, so the
/// child starts with no WAL.
async fn queue_into(env: &Env, db: &Path, msgs: &[(String, String, i64, String)]) {
    let store = Store::open(db, &StoreOptions::default()).await.unwrap();
    let p = env.write("job.ndjson", &ndjson(msgs));
    let outcome =
        timport::intake::files::ingest_file(Some(&store), &p, true, &CancellationToken::new())
            .await
            .unwrap();
    assert!(
        matches!(
            outcome,
            timport::intake::files::FileOutcome::Accepted { .. }
        ),
        "{outcome:?}"
    );
    store.close().await;
}

fn sim_for(groups: usize, prefix: &str, latency_ms: u64) -> timport::simulator::SimConfig {
    let mut cfg = sim_config();
    cfg.groups = (0..groups)
        .map(|g| (format!("{prefix}-{g}"), None))
        .collect();
    cfg.faults.latency = Duration::from_millis(latency_ms);
    cfg
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// What every write-refusal test checks in the daemon's log: the refusal said once per change
/// (each warning followed by its recovery), no sqlx transaction-depth wedge, no message failed.
fn assert_refusal_logged(log: &str, kind: &str) {
    let refused = log.matches("the database refuses writes").count();
    let recovered = log.matches("the database accepts writes again").count();
    assert!(refused >= 1, "the refusal was logged:\n{}", tail(log));
    assert!(
        log.contains(kind),
        "the refusal names its cause ({kind}):\n{}",
        tail(log)
    );
    assert_eq!(
        refused,
        recovered,
        "one warning per refusal, one info per recovery:\n{}",
        tail(log)
    );
    assert!(
        refused <= 3,
        "said once per state change, not per attempt ({refused} times)"
    );
    assert!(
        !log.contains("non-zero transaction depth"),
        "no wedged connection:\n{}",
        tail(log)
    );
    assert!(!log.contains("message failed"), "no message failed for it");
    for noise in [
        "intake table poll failed",
        "lane step failed",
        "group step failed",
    ] {
        assert!(
            !log.contains(noise),
            "no {noise:?} warnings on top of the one refusal:\n{}",
            tail(log)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_leaves_the_store_usable_once_space_is_back() {
    // In-process, the sqlx behaviour itself: a transaction whose statement or COMMIT fails on a
    // full disk used to leave the writer connection at transaction depth 1, so every later
    // BEGIN failed with "attempted to call begin_with at non-zero transaction depth".
    let env = Env::new().await;
    let mount = SmallMount::new(&env.dir.path().join("small"), 8);
    let db = mount.dir.join("queue.db");
    let store = Store::open(&db, &StoreOptions::default()).await.unwrap();
    let filler = mount.fill();
    let big = "x".repeat(2 << 20);
    let e = store.set_meta("big", &big).await.unwrap_err();
    assert!(
        matches!(e, StoreError::DiskFull { .. }),
        "a full disk is named as such: {e}"
    );
    assert!(
        matches!(store.health(), Health::WritesRefused { ref cause, .. } if cause.contains("disk full")),
        "{:?}",
        store.health()
    );
    std::fs::remove_file(&filler).unwrap();
    // At once, not after the probe: the connection is usable again (or was replaced).
    store.set_meta("big", &big).await.unwrap();
    store.set_meta("small", "1").await.unwrap();
    assert_eq!(store.health(), Health::Ok);
    assert_eq!(
        store.meta("big").await.unwrap().map(|v| v.len()),
        Some(2 << 20)
    );
    store.close().await;
}

/// A child daemon's files: a free port for its HTTP listener, its config (queue `db`, Tencent
/// the simulator, `extra` under `[import]`) and its log, created.
fn daemon_files(
    env: &Env,
    sim: &SimHandle,
    db: &Path,
    extra: &str,
) -> (u16, PathBuf, PathBuf, std::fs::File) {
    let port = free_port();
    let config = config_with_http(env, sim, db, extra, port);
    let log_path = env.dir.path().join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    (port, config, log_path, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_during_an_import_waits_and_resumes_without_a_restart() {
    let env = Env::new().await;
    let mount = SmallMount::new(&env.dir.path().join("small"), 8);
    let db = mount.dir.join("queue.db");
    let msgs = messages("full", 4, 300);
    queue_into(&env, &db, &msgs).await;
    let sim = start_sim(sim_for(4, "full", 20)).await;
    let (port, config, log_path, log) = daemon_files(
        &env,
        &sim,
        &db,
        "requests_per_second = 40\nbatch_size = 5\nprogress_interval = \"1s\"",
    );
    let notify = Notify::new();
    let mut child = notify.spawn_run(&config, &log, &["--until-idle"]);

    eventually("the first messages landed", || on_server(&sim) >= 20).await;
    let filler = mount.fill();
    eventually("/readyz says the database refuses writes", || {
        readyz(port).is_some_and(|(code, body)| code == 503 && body.contains("disk full"))
    })
    .await;
    assert!(on_server(&sim) < msgs.len(), "the disk filled mid-import");
    eventually("the progress line names the cause", || {
        log_of(&log_path).contains("progress: waiting for the database to accept writes")
    })
    .await;
    // systemd's status line names the cause, and the watchdog goes on: the daemon waits for the
    // operator and resumes by itself, which a restart would not do better.
    eventually("STATUS= names the refusal", || {
        notify.lines().iter().any(|l| {
            l.starts_with("STATUS=waiting: the database refuses writes") && l.contains("disk full")
        })
    })
    .await;
    let pings = |n: &Notify| n.lines().iter().filter(|l| *l == "WATCHDOG=1").count();
    let pinged = pings(&notify);
    // While refused, the import stands still: nothing is sent that could not be recorded.
    let held = on_server(&sim);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        on_server(&sim) <= held + 4 * 5,
        "lanes stopped sending (at most one batch each after the refusal)"
    );
    assert!(
        pings(&notify) > pinged,
        "the watchdog goes on while waiting"
    );
    std::fs::remove_file(&filler).unwrap();

    let status = wait_exit(&mut child, Duration::from_secs(180)).await;
    let log_text = log_of(&log_path);
    assert_eq!(status.code(), Some(0), "all imported:\n{}", tail(&log_text));
    assert_refusal_logged(&log_text, "database or disk is full");
    assert!(
        notify
            .lines()
            .iter()
            .skip_while(|l| !l.starts_with("STATUS=waiting"))
            .any(|l| l == "STATUS=importing"),
        "STATUS= says it imports again: {:?}",
        notify.lines()
    );
    assert_history(&sim, &msgs);
    let store = Store::open_read_only(&db, &StoreOptions::default())
        .await
        .unwrap();
    let t = store.totals(None).await.unwrap();
    assert_eq!(
        (t.total, t.imported, t.failed),
        (msgs.len() as i64, msgs.len() as i64, 0)
    );
    store.close().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_during_an_ingest_keeps_the_file_and_takes_it_once_space_is_back() {
    let env = Env::new().await;
    let mount = SmallMount::new(&env.dir.path().join("small"), 8);
    let db = mount.dir.join("queue.db");
    // Bodies of ~600 bytes: the job needs more than a megabyte of WAL.
    let msgs: Vec<_> = messages("ingest", 3, 1000)
        .into_iter()
        .map(|(g, f, t, text)| (g, f, t, format!("{text} {}", "y".repeat(600))))
        .collect();
    let sim = start_sim(sim_for(3, "ingest", 2)).await;
    let (port, config, log_path, log) = daemon_files(&env, &sim, &db, "");
    let mut child = spawn_run(&config, &log, &[]);
    eventually("the daemon is ready", || {
        readyz(port).is_some_and(|(code, _)| code == 200)
    })
    .await;

    let filler = mount.fill();
    let job = env.drop_in_spool("big.ndjson", &ndjson(&msgs));
    eventually("/readyz says the database refuses writes", || {
        readyz(port).is_some_and(|(code, body)| code == 503 && body.contains("disk full"))
    })
    .await;
    assert!(job.exists(), "the job file stays in the spool");
    assert_eq!(on_server(&sim), 0, "nothing of a job not queued is sent");
    tokio::time::sleep(Duration::from_secs(2)).await;
    std::fs::remove_file(&filler).unwrap();

    eventually("every message imported", || on_server(&sim) >= msgs.len()).await;
    eventually("/readyz is ready again", || {
        readyz(port).is_some_and(|(code, _)| code == 200)
    })
    .await;
    assert!(!job.exists(), "the job file left the spool once queued");
    // Stopped by signal: the daemon did not need a restart to get here.
    let s = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(s.success());
    let status = wait_exit(&mut child, Duration::from_secs(60)).await;
    let log_text = log_of(&log_path);
    assert_eq!(status.code(), Some(0), "{}", tail(&log_text));
    assert_refusal_logged(&log_text, "database or disk is full");
    assert_history(&sim, &msgs);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immutable_database_waits_and_resumes_after_chattr_minus_i() {
    let env = Env::new().await;
    let db = env.dir.path().join("q.db");
    let msgs = messages("imm", 4, 300);
    queue_into(&env, &db, &msgs).await;
    let sim = start_sim(sim_for(4, "imm", 20)).await;
    let (port, config, log_path, log) =
        daemon_files(&env, &sim, &db, "requests_per_second = 40\nbatch_size = 5");
    let mut child = spawn_run(&config, &log, &["--until-idle"]);
    eventually("the first messages landed", || on_server(&sim) >= 20).await;
    // The database is its file and its WAL (the file alone is only written at checkpoints).
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    let imm = Immutable::set(&[db.clone(), wal]);
    eventually("/readyz says the database refuses writes", || {
        readyz(port).is_some_and(|(code, body)| code == 503 && body.contains("refuses writes"))
    })
    .await;
    assert!(on_server(&sim) < msgs.len(), "made immutable mid-import");
    tokio::time::sleep(Duration::from_secs(2)).await;
    imm.clear();

    let status = wait_exit(&mut child, Duration::from_secs(180)).await;
    let log_text = log_of(&log_path);
    assert_eq!(status.code(), Some(0), "all imported:\n{}", tail(&log_text));
    assert_refusal_logged(&log_text, "I/O error");
    assert_history(&sim, &msgs);
    sim.shutdown().await;
}

/// `dd` one page of garbage into `db` at page `page` (1-based), as a failing disk or a careless
/// tool would.
fn dd_garbage(db: &Path, page: u64) {
    let garbage = db.with_extension("garbage");
    std::fs::write(&garbage, vec![0xa5u8; 4096]).unwrap();
    let out = Command::new("dd")
        .arg(format!("if={}", garbage.display()))
        .arg(format!("of={}", db.display()))
        .args([
            "bs=4096",
            &format!("seek={}", page - 1),
            "count=1",
            "conv=notrunc",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn page_count(db: &Path) -> u64 {
    std::fs::metadata(db).unwrap().len() / 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_page_mid_queue_stops_until_idle_with_the_file_named() {
    let env = Env::new().await;
    let db = env.dir.path().join("q.db");
    let msgs = messages("corrupt", 4, 5000);
    queue_into(&env, &db, &msgs).await;
    let pages = page_count(&db);
    assert!(pages > 100, "a real queue file ({pages} pages)");
    dd_garbage(&db, pages / 2);

    let sim = start_sim(sim_for(4, "corrupt", 1)).await;
    let (_port, config, log_path, log) = daemon_files(&env, &sim, &db, "");
    let notify = Notify::new();
    let mut child = notify.spawn_run(&config, &log, &["--until-idle"]);
    let status = wait_exit(&mut child, Duration::from_secs(240)).await;
    let log_text = log_of(&log_path);
    assert_eq!(status.code(), Some(3), "{}", tail(&log_text));
    // systemd sees it: the status says why, and no watchdog ping follows it.
    let lines = notify.lines();
    let stopped = lines
        .iter()
        .position(|l| l.starts_with("STATUS=stopped: database") && l.contains("is corrupt"))
        .unwrap_or_else(|| panic!("STATUS=stopped names the corrupt file: {lines:?}"));
    assert!(
        lines[..stopped].iter().any(|l| l == "WATCHDOG=1"),
        "pinged while it worked: {lines:?}"
    );
    assert!(
        !lines[stopped..].iter().any(|l| l == "WATCHDOG=1"),
        "no ping once the database was found corrupt: {lines:?}"
    );
    assert!(
        on_server(&sim) < msgs.len(),
        "it stopped at the corrupt page"
    );
    let errors: Vec<&str> = log_text
        .lines()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .collect();
    assert_eq!(errors.len(), 1, "one error:\n{}", errors.join("\n"));
    for needle in [
        db.to_str().unwrap(),
        "is corrupt",
        "Restore the latest backup",
        "timport verify",
    ] {
        assert!(
            errors[0].contains(needle),
            "the error says {needle:?}: {}",
            errors[0]
        );
    }
    assert!(
        !log_text.contains("lane step failed"),
        "no lane loops on it"
    );
    // Nothing imported was sent twice on the way.
    for g in 0..4 {
        let h = history_texts(&sim, &format!("corrupt-{g}"));
        let mut texts: Vec<&str> = h.iter().map(|m| m.2.as_str()).collect();
        texts.dedup();
        assert_eq!(texts.len(), h.len(), "no duplicate in corrupt-{g}");
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_database_makes_readyz_answer_503_and_the_engine_stop() {
    // In-process, so /readyz can be asked after the engine stopped on the corrupt page.
    let env = Env::new().await;
    let msgs = messages("ready", 2, 3000);
    queue_into(&env, &env.dir.path().join("q2.db"), &msgs).await;
    let db = env.dir.path().join("q2.db");
    dd_garbage(&db, page_count(&db) / 2);
    let store = Store::open(&db, &StoreOptions::default()).await.unwrap();
    let (listener, addr) = timport::ops::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let http = tokio::spawn(timport::ops::serve(
        listener,
        store.clone(),
        Default::default(),
        stop.clone(),
    ));
    let port = addr.port();
    let sim = start_sim(sim_for(2, "ready", 0)).await;
    let got = run_until_idle(&store, client_for(&sim, 200), engine_config()).await;
    let Err(timport::engine::EngineError::Database(reason)) = got else {
        panic!("the engine stopped on the corrupt file: {got:?}")
    };
    assert!(reason.contains("is corrupt"), "{reason}");
    let (code, body) = tokio::task::spawn_blocking(move || readyz(port))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("is corrupt"), "{body}");
    stop.cancel();
    let _ = http.await;
    sim.shutdown().await;
}

/// `timport run --until-idle` on `db`: (exit code, stderr), with the simulator unused.
fn run_on(env: &Env, sim: &SimHandle, db: &Path) -> (Option<i32>, String) {
    let config = child_config(env, &sim.base_url(), db, "");
    let out = Command::new(env!("CARGO_BIN_EXE_timport"))
        .args(["run", "--until-idle", "--config", &path_str(&config)])
        .env_remove("TIMPORT_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_a_corrupt_header_or_a_non_database_exits_with_a_clear_error() {
    let env = Env::new().await;
    let sim = start_sim(sim_config()).await;
    // Not a database at all.
    let junk = env.write("junk.db", &"this is not an SQLite file\n".repeat(400));
    let before = std::fs::read(&junk).unwrap();
    let (code, stderr) = run_on(&env, &sim, &junk);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains("is corrupt") && stderr.contains("file is not a database"),
        "{stderr}"
    );
    assert!(
        stderr.contains(junk.to_str().unwrap()),
        "names the file: {stderr}"
    );
    assert_eq!(std::fs::read(&junk).unwrap(), before, "left as it was");

    // A real queue whose header was overwritten.
    let db = env.dir.path().join("hdr.db");
    queue_into(&env, &db, &messages("hdr", 2, 50)).await;
    let mut bytes = std::fs::read(&db).unwrap();
    bytes[..100].fill(0x33);
    std::fs::write(&db, &bytes).unwrap();
    let (code, stderr) = run_on(&env, &sim, &db);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("is corrupt"), "{stderr}");

    // A real queue whose messages table's root page is garbage: the quick check at start finds
    // it before anything is sent.
    let db = env.dir.path().join("root.db");
    queue_into(&env, &db, &messages("root", 2, 2000)).await;
    let root: i64 = {
        let s = Store::open_read_only(&db, &StoreOptions::default())
            .await
            .unwrap();
        let r = sqlx::query_scalar("SELECT rootpage FROM sqlite_schema WHERE name = 'messages'")
            .fetch_one(s.sqlite_pool().unwrap())
            .await
            .unwrap();
        s.close().await;
        r
    };
    dd_garbage(&db, root as u64);
    let (code, stderr) = run_on(&env, &sim, &db);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("is corrupt"), "{stderr}");
    assert_eq!(on_server(&sim), 0, "nothing sent");
    // `status` says so too, rather than reporting on a broken file.
    let config = child_config(&env, &sim.base_url(), &db, "");
    let out = Command::new(env!("CARGO_BIN_EXE_timport"))
        .args(["status", "--config", &path_str(&config)])
        .env_remove("TIMPORT_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("is corrupt"), "{stderr}");
    sim.shutdown().await;
}

/// `timport CMD ARGS` with `queue.database = db`: (exit code, stderr).
fn command_on(env: &Env, db: &Path, args: &[&str]) -> (Option<i32>, String) {
    let config = child_config(env, "http://127.0.0.1:9", db, "");
    let out = Command::new(env!("CARGO_BIN_EXE_timport"))
        .args(args)
        .args(["--config", &path_str(&config)])
        .env_remove("TIMPORT_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_commands_refuse_a_missing_database_and_create_nothing() {
    let env = Env::new().await;
    let typo = env.dir.path().join("queeu.db");
    for args in [&["status"][..], &["status", "--json"], &["retry", "--all"]] {
        let (code, stderr) = command_on(&env, &typo, args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(typo.to_str().unwrap()) && stderr.contains("does not exist"),
            "{args:?} names the missing file: {stderr}"
        );
        assert!(!typo.exists(), "{args:?} created nothing");
        assert!(
            !PathBuf::from(format!("{}-wal", typo.display())).exists(),
            "{args:?} created no WAL"
        );
    }
    // An empty file (what a careless `touch` leaves) is no queue either, and stays empty.
    let empty = env.write("empty.db", "");
    let (code, stderr) = command_on(&env, &empty, &["retry", "--all"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is empty"), "{stderr}");
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
    // Another program's SQLite file is not migrated into a queue.
    let other = env.dir.path().join("other.db");
    let s = Command::new("sqlite3")
        .arg(&other)
        .arg("CREATE TABLE notes(x); INSERT INTO notes VALUES (1);")
        .status()
        .unwrap();
    assert!(s.success());
    let (code, stderr) = command_on(&env, &other, &["retry", "--all"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is not a timport queue"), "{stderr}");
    let out = Command::new("sqlite3")
        .arg(&other)
        .arg("SELECT group_concat(name) FROM sqlite_schema")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "notes");
    // An existing queue works as before.
    let db = env.dir.path().join("real.db");
    queue_into(&env, &db, &messages("real", 1, 3)).await;
    let (code, stderr) = command_on(&env, &db, &["retry", "--all"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = command_on(&env, &db, &["status"]);
    assert_eq!(code, Some(0), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_database_under_a_running_daemon_stops_it() {
    let env = Env::new().await;
    let db = env.dir.path().join("q.db");
    let msgs = messages("del", 2, 500);
    queue_into(&env, &db, &msgs).await;
    let sim = start_sim(sim_for(2, "del", 20)).await;
    let config = child_config(&env, &sim.base_url(), &db, "requests_per_second = 10");
    let log_path = env.dir.path().join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = spawn_run(&config, &log, &[]);
    eventually("the first messages landed", || on_server(&sim) >= 5).await;
    std::fs::remove_file(&db).unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(60)).await;
    let log_text = log_of(&log_path);
    assert_eq!(status.code(), Some(3), "{}", tail(&log_text));
    assert!(
        log_text.contains(&format!("database {} was deleted", db.display())),
        "{}",
        tail(&log_text)
    );
    assert!(!db.exists(), "no new database was created in its place");
    for s in ["-wal", "-shm"] {
        assert!(
            !PathBuf::from(format!("{}{s}", db.display())).exists(),
            "its {s} is not left to pair with a file put back"
        );
    }
    // `status` now refuses, instead of creating an empty queue.
    let (code, stderr) = command_on(&env, &db, &["status"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(!db.exists());
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_the_database_under_a_running_daemon_stops_it_and_leaves_the_new_file_alone() {
    let env = Env::new().await;
    let db = env.dir.path().join("q.db");
    let msgs = messages("rep", 2, 500);
    queue_into(&env, &db, &msgs).await;
    // The replacement: a copy of the queue as it was before the import.
    let copy = env.dir.path().join("copy.db");
    std::fs::copy(&db, &copy).unwrap();
    let copy_bytes = std::fs::read(&copy).unwrap();
    let sim = start_sim(sim_for(2, "rep", 20)).await;
    let config = child_config(&env, &sim.base_url(), &db, "requests_per_second = 10");
    let log_path = env.dir.path().join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = spawn_run(&config, &log, &[]);
    eventually("the first messages landed", || on_server(&sim) >= 5).await;
    std::fs::rename(&copy, &db).unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(60)).await;
    let log_text = log_of(&log_path);
    assert_eq!(status.code(), Some(3), "{}", tail(&log_text));
    assert!(
        log_text.contains("was replaced by another file"),
        "{}",
        tail(&log_text)
    );
    assert_eq!(
        std::fs::read(&db).unwrap(),
        copy_bytes,
        "the file put in its place is untouched"
    );
    assert!(
        !PathBuf::from(format!("{}-wal", db.display())).exists(),
        "the old file's WAL is not paired with the new file"
    );
    sim.shutdown().await;
}
