//! The daemon as systemd and a monitoring system see it: the real binary (`timport run`) against
//! the built-in simulator, with
//! - a real `NOTIFY_SOCKET` (a Unix datagram socket in a temp folder): `READY=1`, then
//!   `WATCHDOG=1` pings from the engine loop, then `STOPPING=1` on SIGTERM and exit 0;
//! - the HTTP listener: `/healthz`, `/readyz` and `/metrics` after a job file was imported;
//! - the single-instance lock: a second `timport run` on the same database file, however spelled,
//!   exits 2 naming the holder, before it opens (or creates) the database;
//! - `timport status` read-only: on a read-only copy in a read-only folder it changes nothing, and
//!   on a missing database it exits 2 and creates nothing.
//!
//! Timeouts here only bound a hung test; they assert nothing about speed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Backend, TestDb};

mod common;

/// Generous bound for anything that should happen "soon" (debug build, loaded CI machine).
const BOUND: Duration = Duration::from_secs(60);

/// A temp folder with a config for `timport run` against the built-in simulator.
struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Its queue database; after `child`, so the daemon is gone before a database is dropped.
    _db: TestDb,
}

impl Daemon {
    fn config(dir: &Path, http_listen: &str, db: &str) -> PathBuf {
        let cfg = format!(
            r#"
[tencent]
sdkappid = 1400000000
identifier = "administrator"

[queue]
database = "{db}"
spool_dir = "{spool}"
rescan_interval = "1s"

[import]
progress_interval = "1s"
shutdown_grace = "5s"

[log]
format = "text"
level = "info"

[http]
listen = "{http_listen}"

[simulator]
enabled = true
listen = "127.0.0.1:0"
auto_create_groups = true
"#,
            db = common::toml_escape(db),
            spool = dir.join("spool").display(),
        );
        let path = dir.join("timport.toml");
        std::fs::write(&path, cfg).unwrap();
        path
    }

    /// Starts `timport run --config ...` with `extra_env`; stderr goes to `stderr.log`.
    fn start(http_listen: &str, extra_env: &[(&str, &str)]) -> Daemon {
        Daemon::start_on(Backend::Sqlite, http_listen, extra_env)
    }

    /// [`Daemon::start`] with its queue on `backend` (SQLite: `timport.db` in its folder).
    fn start_on(backend: Backend, http_listen: &str, extra_env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::named_blocking(backend, dir.path(), "timport");
        let config = Self::config(dir.path(), http_listen, &db.config_value());
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_timport"));
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .env("NO_COLOR", "1");
        // Nothing from the caller's environment may change the settings or talk to systemd.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("TIMPORT") || k == "NOTIFY_SOCKET" || k.starts_with("WATCHDOG_") {
                cmd.env_remove(&*k);
            }
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn timport");
        Daemon {
            dir,
            child: Some(child),
            _db: db,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.path().join("stderr.log")).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.as_ref().unwrap().id()).unwrap()
    }

    fn sigterm(&self) {
        send_sigterm(self.pid());
    }

    /// Waits (bounded) for the process to exit.
    fn wait(&mut self) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + BOUND;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!("timport did not exit; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The address from the `health and metrics listening address=...` log line.
    fn http_address(&self) -> String {
        let deadline = Instant::now() + BOUND;
        loop {
            let log = strip_ansi(&self.stderr());
            if let Some(line) = log
                .lines()
                .find(|l| l.contains("health and metrics listening"))
            {
                let at = line.find("address=").expect("address field") + "address=".len();
                return line[at..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .trim_matches('"')
                    .to_string();
            }
            if Instant::now() > deadline {
                panic!("no listening line; stderr:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[allow(unsafe_code)]
fn send_sigterm(pid: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; `pid` is our own
    // child, not yet reaped (we hold its `Child`), so the id cannot have been reused.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Receives datagrams until one holds `wanted` as a line, or the bound passes.
fn expect_notify(sock: &UnixDatagram, wanted: &str, seen: &mut Vec<String>, d: &Daemon) {
    let deadline = Instant::now() + BOUND;
    let mut buf = [0u8; 4096];
    loop {
        if Instant::now() > deadline {
            panic!(
                "no {wanted} from timport; got {seen:?}; stderr:\n{}",
                d.stderr()
            );
        }
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = msg.lines().any(|l| l == wanted);
                seen.push(msg);
                if hit {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("recv on NOTIFY_SOCKET: {e}"),
        }
    }
}

db_test!(notify_socket_gets_ready_watchdog_and_stopping, sync);
fn notify_socket_gets_ready_watchdog_and_stopping(backend: Backend) {
    let sock_dir = tempfile::tempdir().unwrap();
    let sock_path = sock_dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();

    let mut d = Daemon::start_on(
        backend,
        "",
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    );
    let mut seen = Vec::new();
    expect_notify(&sock, "READY=1", &mut seen, &d);
    assert!(
        !seen.iter().any(|m| m.lines().any(|l| l == "WATCHDOG=1")),
        "WATCHDOG=1 before READY=1: {seen:?}"
    );
    // Pings come from the engine loop, at most every half period (1 s here): wait for two.
    expect_notify(&sock, "WATCHDOG=1", &mut seen, &d);
    expect_notify(&sock, "WATCHDOG=1", &mut seen, &d);

    d.sigterm();
    expect_notify(&sock, "STOPPING=1", &mut seen, &d);
    let status = d.wait();
    assert!(
        status.success(),
        "exit {status:?} after SIGTERM; stderr:\n{}",
        d.stderr()
    );
}

/// A hand-written HTTP/1.1 GET: (status code, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(BOUND)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response to {path}: {resp:?}"));
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of an unlabelled sample, e.g. `timport_messages_imported_total 3`.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.trim().parse().ok())?
        })
}

db_test!(health_ready_and_metrics_after_an_import, sync);
fn health_ready_and_metrics_after_an_import(backend: Backend) {
    let mut d = Daemon::start_on(backend, "127.0.0.1:0", &[]);
    let addr = d.http_address();

    let (code, body) = get(&addr, "/healthz");
    assert_eq!(code, 200, "/healthz: {body}");
    // Ready once the store is open and writable; the listener may start a moment before.
    let deadline = Instant::now() + BOUND;
    loop {
        let (code, body) = get(&addr, "/readyz");
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz stays {code}: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A small ndjson job, dropped into the spool by rename as the contract asks.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut job = String::new();
    for i in 0..3u64 {
        job.push_str(&format!(
            r#"{{"GroupId":"ops-test","From_Account":"alice","SendTime":{},"MsgBody":[{{"MsgType":"TIMTextElem","MsgContent":{{"Text":"hello {i}"}}}}]}}"#,
            now - 3600 + i
        ));
        job.push('\n');
    }
    let spool = d.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let tmp = spool.join("ops-job.ndjson.tmp");
    std::fs::write(&tmp, job).unwrap();
    std::fs::rename(&tmp, spool.join("ops-job.ndjson")).unwrap();

    let deadline = Instant::now() + BOUND;
    let metrics = loop {
        let (code, body) = get(&addr, "/metrics");
        assert_eq!(code, 200, "/metrics: {body}");
        if sample(&body, "timport_messages_imported_total").is_some_and(|v| v >= 3.0) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "messages not imported; /metrics:\n{body}\nstderr:\n{}",
            d.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // Set once when the pacer is built, and again only on rate-limit answers: it shows only if
    // the recorder was installed before the pacer was made.
    assert!(
        sample(&metrics, "timport_pacing_rate").is_some_and(|v| v > 0.0),
        "timport_pacing_rate missing from /metrics:\n{metrics}"
    );
    for name in [
        "timport_requests_total",
        "timport_job_files_total",
        "timport_request_duration_seconds_bucket",
        "timport_commit_records_bucket",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(name)),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("# TYPE timport_messages_imported_total counter"),
        "{metrics}"
    );

    d.sigterm();
    let status = d.wait();
    assert!(status.success(), "exit {status:?}; stderr:\n{}", d.stderr());
}

/// `timport` with `args`, the database (and the rest of the settings) from a config file written
/// next to `db`, nothing taken from the caller's environment.
fn timport_with_database(args: &[&str], db: &Path, workdir: &Path) -> std::process::Output {
    let cfg = workdir.join(format!(
        "second-{}.toml",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::write(
        &cfg,
        format!(
            r#"
[tencent]
sdkappid = 1400000000
identifier = "administrator"
[queue]
database = "{}"
spool_dir = "{}"
[log]
format = "text"
level = "warn"
[http]
listen = ""
[simulator]
enabled = true
listen = "127.0.0.1:0"
"#,
            db.display(),
            workdir.join("spool-second").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_timport"));
    cmd.args(args)
        .arg("--config")
        .arg(&cfg)
        .current_dir(workdir)
        .stdin(Stdio::null())
        .env("NO_COLOR", "1");
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("TIMPORT") || k == "NOTIFY_SOCKET" || k.starts_with("WATCHDOG_") {
            cmd.env_remove(&*k);
        }
    }
    cmd.output().unwrap()
}

// SQLite-only: the lock file beside the database file (a server's queue is locked on the server).
#[test]
fn a_second_daemon_on_the_same_database_file_exits_2_naming_the_holder() {
    let mut d = Daemon::start("", &[]);
    let db = d.path().join("timport.db");
    let lock = std::fs::canonicalize(d.path())
        .unwrap()
        .join("timport.db.lock");
    // The holder writes its pid once it holds the lock.
    let wanted = format!("pid {}", d.pid());
    let deadline = Instant::now() + BOUND;
    while !std::fs::read_to_string(&lock).is_ok_and(|t| t.starts_with(&wanted)) {
        assert!(
            Instant::now() < deadline,
            "no lock; stderr:\n{}",
            d.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let other = tempfile::tempdir().unwrap();
    let link = other.path().join("link.db");
    std::os::unix::fs::symlink(&db, &link).unwrap();
    let dir_name = d.path().file_name().unwrap().to_string_lossy().into_owned();
    let respelled = d
        .path()
        .join("..")
        .join(&dir_name)
        .join(".")
        .join("timport.db");
    for path in [link, respelled] {
        let out = timport_with_database(&["run"], &path, other.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {stderr}", path.display());
        assert!(
            stderr.contains(&wanted) && stderr.contains(&lock.display().to_string()),
            "{}: {stderr}",
            path.display()
        );
    }
    // status is read-only: it works beside the running daemon, through any spelling.
    let out = timport_with_database(
        &["status", "--json"],
        &other.path().join("link.db"),
        other.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The holder is untouched and still running.
    assert!(
        d.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the first daemon stopped; stderr:\n{}",
        d.stderr()
    );
}

// SQLite-only: the lock file and the database file's creation.
#[test]
fn the_lock_is_taken_before_the_database_is_created_or_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let dir_path = std::fs::canonicalize(dir.path()).unwrap();
    let db = dir_path.join("fresh.db");
    // Another holder (this test) of the lock of a database that does not exist yet.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(dir_path.join("fresh.db.lock"))
        .unwrap();
    lock.try_lock().unwrap();
    std::fs::write(dir_path.join("fresh.db.lock"), "pid 4242 on elsewhere\n").unwrap();
    let out = timport_with_database(&["run", "--until-idle"], &db, &dir_path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("pid 4242 on elsewhere"), "{stderr}");
    assert!(!db.exists(), "the database was created before the lock");
    drop(lock);
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Every file of a folder with its bytes and modification time.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>, SystemTime)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let m = std::fs::metadata(&p).unwrap();
            let bytes = if m.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                bytes,
                m.modified().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

// SQLite-only: a read-only copy of the file in a read-only folder.
#[test]
fn status_reads_a_copy_in_a_read_only_folder_and_changes_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("queue.db");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let job = work.path().join("job.ndjson");
    std::fs::write(
        &job,
        format!(
            "{{\"GroupId\":\"g\",\"From_Account\":\"a\",\"SendTime\":{},\"MsgBody\":[{{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{{\"Text\":\"x\"}}}}]}}\n",
            now - 60
        ),
    )
    .unwrap();
    let out = timport_with_database(&["ingest", &job.to_string_lossy()], &db, work.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A copy of the file alone (no -wal, no -shm), read-only, in a read-only folder.
    let ro = work.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::copy(&db, ro.join("copy.db")).unwrap();
    std::fs::set_permissions(ro.join("copy.db"), std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let before = snapshot(&ro);
    // Root writes through any mode: run it as nobody there, so the read-only folder is real.
    let output = |args: &[&str]| {
        let cfg_dir = work.path();
        if is_root() {
            let mut cmd = Command::new("setpriv");
            cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(env!("CARGO_BIN_EXE_timport"))
                .args(args)
                .arg("--config")
                .arg(write_config(cfg_dir, &ro.join("copy.db")))
                .current_dir("/")
                .env_remove("TIMPORT_CONFIG")
                .env("NO_COLOR", "1");
            cmd.output().unwrap()
        } else {
            timport_with_database(args, &ro.join("copy.db"), cfg_dir)
        }
    };
    let out = output(&["status", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["totals"]["pending"], 1, "{v}");
    let out = output(&["status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(snapshot(&ro), before, "status changed the folder");
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A config for `timport status` naming `db` (readable by anyone).
fn write_config(dir: &Path, db: &Path) -> PathBuf {
    write_config_value(dir, &db.display().to_string())
}

/// A config for `timport status` with `queue.database = db` (readable by anyone).
fn write_config_value(dir: &Path, db: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("status.toml");
    std::fs::write(
        &p,
        format!(
            "[tencent]\nsdkappid = 1400000000\nidentifier = \"administrator\"\n[queue]\ndatabase = \"{}\"\n[log]\nformat = \"text\"\nlevel = \"warn\"\n[http]\nlisten = \"\"\n",
            common::toml_escape(db)
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p
}

#[test]
fn status_on_a_missing_database_exits_2_and_creates_nothing() {
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("missing").join("queue.db");
    let out = timport_with_database(&["status"], &db, work.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&db.display().to_string()), "{stderr}");
    assert!(
        !work.path().join("missing").exists(),
        "status created a folder"
    );
}

#[tokio::test]
async fn status_on_a_missing_postgres_database_exits_2_naming_the_host_and_creates_nothing() {
    let Some(backend) = Backend::postgres_or_skip(
        "ops_systemd::status_on_a_missing_postgres_database_exits_2_naming_the_host_and_creates_nothing",
    ) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let missing = common::missing_database(backend, work.path());
    let cfg = write_config_value(work.path(), &missing);
    for args in [&["status"][..], &["verify"][..], &["retry", "--all"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_timport"))
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .env_remove("TIMPORT_CONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let host = url::Url::parse(&missing).unwrap();
        let host = format!(
            "{}:{}",
            host.host_str().unwrap(),
            host.port().unwrap_or(5432)
        );
        assert!(stderr.contains(&host), "{args:?}: names {host}: {stderr}");
        assert!(
            !common::database_exists(&missing).await,
            "{args:?} created it"
        );
    }
}
