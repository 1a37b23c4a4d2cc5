//! Issue 12 point 3, "the spool never stalls or half-reads", and the report part of point 1: a
//! real `timport run` child against the simulator, with files written in place, odd entries (long
//! and non-UTF-8 names, a hard link, a socket, a FIFO, an unreadable file), a 200 MB line, and a
//! spool on a tmpfs that fills up while a file is rejected.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use daemon::*;
use serde_json::Value;
use timport::intake::files::{FileOutcome, IngestError, ingest_file};
use tokio_util::sync::CancellationToken;

const BOUND: Duration = Duration::from_secs(60);

/// Settings for spool tests: a quick rescan and a short settle time unless `settle` is given.
fn spool_env(settle: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("TIMPORT__QUEUE__RESCAN_INTERVAL", "200ms"),
        ("TIMPORT__QUEUE__SPOOL_SETTLE", settle),
    ]
}

struct Run {
    env: Env,
    sim: timport::simulator::SimHandle,
    config: PathBuf,
    log: PathBuf,
}

async fn setup() -> Run {
    let env = Env::new().await;
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    let sim = start_sim(cfg).await;
    let db = env.dir.path().join("q.db");
    let config = child_config(&env, &sim.base_url(), &db, "requests_per_second = 500");
    std::fs::create_dir_all(env.spool().join("done")).unwrap();
    std::fs::create_dir_all(env.spool().join("rejected")).unwrap();
    let log = env.dir.path().join("run.log");
    Run {
        env,
        sim,
        config,
        log,
    }
}

fn lines(group: &str, n: i64) -> String {
    (0..n)
        .map(|i| line(group, "u", T0 + i, &format!("{group}-{i}")) + "\n")
        .collect()
}

/// JSON log lines with this message.
fn events(log: &Path, message: &str) -> Vec<Value> {
    log_text(log)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"].as_str().is_some_and(|m| m.contains(message)))
        .collect()
}

async fn stop(child: &mut std::process::Child) {
    signal(child, "TERM");
    let status = wait_exit(child, BOUND).await;
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_appended_to_after_it_appeared_is_taken_whole() {
    let r = setup().await;
    let mut envs = spool_env("5s");
    envs.push(("TIMPORT__LOG__LEVEL", "info,timport::intake=debug"));
    let mut child = spawn_with_env(&r.config, &r.log, &envs, &[], |_| {});
    wait_line(&mut child, &r.log, BOUND, |l| {
        l.contains("import engine started")
    })
    .await;

    // Written in place: the first 101 lines, then (once the daemon has seen the file) the rest.
    let all = lines("grow", 1000);
    let cut = all.match_indices('\n').nth(100).unwrap().0 + 1;
    let path = r.env.spool().join("grow.ndjson");
    std::fs::write(&path, &all[..cut]).unwrap();
    wait_line(&mut child, &r.log, BOUND, |l| {
        l.contains("waiting for it to settle") && l.contains("grow.ndjson")
    })
    .await;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(&all.as_bytes()[cut..]).unwrap();
    drop(f);

    let accepted = wait_line(&mut child, &r.log, BOUND, |l| {
        l.contains("job file accepted")
    })
    .await;
    let v: Value = serde_json::from_str(&accepted).unwrap();
    assert_eq!(v["messages"], 1000, "{accepted}");
    assert!(r.env.spool().join("done/grow.ndjson").is_file());
    // And the server got every line.
    let started = std::time::Instant::now();
    while history_texts(&r.sim, "grow").len() < 1000 {
        assert!(started.elapsed() < BOUND, "not all imported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(events(&r.log, "job file accepted").len(), 1);
    stop(&mut child).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_while_it_is_read_is_not_queued_and_is_taken_later() {
    let env = Env::new().await;
    let path = env.dir.path().join("busy.ndjson");
    std::fs::write(&path, lines("busy", 50_000)).unwrap();
    let start_len = std::fs::metadata(&path).unwrap().len();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, path) = (stop.clone(), path.clone());
        std::thread::spawn(move || {
            let mut i = 50_000;
            while !stop.load(Ordering::Relaxed) {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .unwrap();
                f.write_all((line("busy", "u", T0 + i, "more") + "\n").as_bytes())
                    .unwrap();
                i += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            i
        })
    };
    while std::fs::metadata(&path).unwrap().len() == start_len {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let outcome = ingest_file(Some(&env.store), &path, false, &CancellationToken::new()).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(
        matches!(outcome, Err(IngestError::Changed(_))),
        "{outcome:?}"
    );
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(env.store.sqlite_pool().unwrap())
        .await
        .unwrap();
    assert_eq!(queued, 0, "nothing of a changing file is queued");
    // Once it holds still, all of it is taken.
    let outcome = ingest_file(Some(&env.store), &path, false, &CancellationToken::new())
        .await
        .unwrap();
    match outcome {
        FileOutcome::Accepted { messages, .. } => assert_eq!(messages, written),
        o => panic!("{o:?}"),
    }
}

#[tokio::test]
async fn a_json_file_over_its_limit_is_rejected_unread() {
    let env = Env::new().await;
    let path = env.dir.path().join("big.json");
    let f = std::fs::File::create(&path).unwrap();
    // Sparse: no time or disk spent writing it.
    f.set_len(timport::intake::files::MAX_JSON_FILE_BYTES + 1)
        .unwrap();
    drop(f);
    let outcome = ingest_file(Some(&env.store), &path, false, &CancellationToken::new())
        .await
        .unwrap();
    let FileOutcome::Rejected { problems, .. } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        problems[0].problem.contains("at most 64 MiB"),
        "{problems:?}"
    );
}

fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

fn names(dir: &Path) -> Vec<Vec<u8>> {
    entries(dir)
        .iter()
        .map(|p| p.file_name().unwrap().as_bytes().to_vec())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_entries_are_handled_or_rejected_once_and_the_others_go_on() {
    let r = setup().await;
    let spool = r.env.spool();
    let drop_in = |name: &OsStr, text: &str| {
        let tmp = r.env.dir.path().join(".dropping");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, spool.join(name)).unwrap();
    };
    // 250-byte names: one taken in done/ already (a collision suffix would pass 255 bytes), one
    // rejected (its report name would).
    let long_good = format!("{}.ndjson", "L".repeat(243));
    let long_bad = format!("{}.ndjson", "B".repeat(243));
    assert_eq!(long_good.len(), 250);
    std::fs::write(spool.join("done").join(&long_good), "earlier").unwrap();
    drop_in(OsStr::new(&long_good), &lines("long", 3));
    drop_in(OsStr::new(&long_bad), "not json\n");
    // Names that are not UTF-8 (and hold a control character).
    drop_in(OsStr::from_bytes(b"caf\xe9\x01.ndjson"), &lines("latin", 2));
    drop_in(OsStr::from_bytes(b"bad\xff.ndjson"), "{\n");
    // A hard link to a file elsewhere.
    let shared = r.env.write("shared.ndjson", &lines("shared", 2));
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::hard_link(&shared, spool.join("linked.ndjson")).unwrap();
    // A Unix socket and a FIFO.
    let _listener = std::os::unix::net::UnixListener::bind(spool.join("sock.ndjson")).unwrap();
    mkfifo(&spool.join("fifo.ndjson"));
    // And an ordinary file after all of them.
    drop_in(OsStr::new("zzz.ndjson"), &lines("last", 2));

    let mut child = spawn_with_env(&r.config, &r.log, &spool_env("100ms"), &[], |_| {});
    wait_line(&mut child, &r.log, BOUND, |l| {
        l.contains("job file accepted") && l.contains("zzz.ndjson")
    })
    .await;
    // Two more files, one after the other: at least two more scans saw what is left.
    for name in ["after1.ndjson", "after2.ndjson"] {
        drop_in(
            OsStr::new(name),
            &lines(name.trim_end_matches(".ndjson"), 1),
        );
        wait_line(&mut child, &r.log, BOUND, |l| {
            l.contains("job file accepted") && l.contains(name)
        })
        .await;
    }

    let accepted: Vec<String> = events(&r.log, "job file accepted")
        .iter()
        .map(|v| v["file"].as_str().unwrap().to_string())
        .collect();
    let rejected: Vec<String> = events(&r.log, "job file rejected")
        .iter()
        .map(|v| v["file"].as_str().unwrap().to_string())
        .collect();
    let mut want_accepted = vec![
        long_good.clone(),
        "caf\\xe9\\u{1}.ndjson".to_string(),
        "zzz.ndjson".into(),
        "after1.ndjson".into(),
        "after2.ndjson".into(),
    ];
    let mut want_rejected = vec![
        long_bad.clone(),
        "bad\\xff.ndjson".to_string(),
        "linked.ndjson".into(),
        "sock.ndjson".into(),
        "fifo.ndjson".into(),
    ];
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    want_accepted.sort();
    want_rejected.sort();
    assert_eq!(sorted(accepted), want_accepted, "each accepted once");
    assert_eq!(
        sorted(rejected),
        want_rejected,
        "each rejected once, not per rescan"
    );
    let text = log_text(&r.log);
    assert!(!text.contains("stays in the spool"), "{text}");
    assert!(!text.contains("scan failed"), "{text}");

    // The spool is empty; every entry is in done/ or rejected/ under a name that fits.
    let left: Vec<_> = names(&spool)
        .into_iter()
        .filter(|n| n != b"done" && n != b"rejected")
        .collect();
    assert!(left.is_empty(), "{left:?}");
    for n in names(&spool.join("done"))
        .into_iter()
        .chain(names(&spool.join("rejected")))
    {
        assert!(n.len() <= 255 && std::str::from_utf8(&n).is_ok(), "{n:?}");
    }
    let done = names(&spool.join("done"));
    assert!(
        done.contains(&long_good.as_bytes().to_vec()),
        "the earlier one stays"
    );
    assert!(
        done.contains(&b"caf\\xe9\\u{1}.ndjson".to_vec()),
        "{done:?}"
    );
    assert_eq!(done.len(), 6, "{done:?}");
    // Every rejected entry has its report, which names the original.
    let rejected_dir = spool.join("rejected");
    let reports: Vec<Value> = entries(&rejected_dir)
        .iter()
        .filter(|p| p.to_string_lossy().ends_with(".error.json"))
        .map(|p| {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
            let stored = rejected_dir.join(v["stored_as"].as_str().unwrap());
            assert!(
                std::fs::symlink_metadata(&stored).is_ok(),
                "{} is beside its report",
                stored.display()
            );
            v
        })
        .collect();
    assert_eq!(reports.len(), 5);
    let report_of = |file: &str| {
        reports
            .iter()
            .find(|v| v["file"] == file)
            .unwrap_or_else(|| panic!("no report for {file}"))
    };
    assert_eq!(
        report_of("bad\\xff.ndjson")["file_name_hex"],
        "626164ff2e6e646a736f6e"
    );
    let problem = |file: &str| {
        report_of(file)["problems"][0]["problem"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(problem("linked.ndjson").contains("hard links"));
    assert!(problem("sock.ndjson").contains("socket"));
    assert!(problem("fifo.ndjson").contains("FIFO"));
    // The hard-linked file is untouched: its mode, its content, its links.
    assert_eq!(mode(&shared), 0o644, "the shared file's mode");
    assert_eq!(
        std::fs::read_to_string(&shared).unwrap(),
        lines("shared", 2)
    );
    assert_eq!(std::fs::metadata(&shared).unwrap().nlink(), 2);
    // Its messages were not queued; the others' were.
    let started = std::time::Instant::now();
    while history_texts(&r.sim, "after2").is_empty() {
        assert!(started.elapsed() < BOUND);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(history_texts(&r.sim, "shared").is_empty());
    assert_eq!(history_texts(&r.sim, "long").len(), 3);
    assert_eq!(history_texts(&r.sim, "latin").len(), 2);
    stop(&mut child).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_file_is_rejected_once() {
    const NOBODY: u32 = 65534;
    let r = setup().await;
    let spool = r.env.spool();
    // The daemon runs as an unprivileged user, which owns its folders; the job file is root's.
    for p in [
        r.env.dir.path().to_path_buf(),
        spool.clone(),
        spool.join("done"),
        spool.join("rejected"),
        r.config.clone(),
    ] {
        std::os::unix::fs::chown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let secret = spool.join("secret.ndjson");
    std::fs::write(&secret, lines("secret", 1)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut child = spawn_with_env(&r.config, &r.log, &spool_env("100ms"), &[], |c| {
        use std::os::unix::process::CommandExt;
        c.uid(NOBODY).gid(NOBODY);
    });
    wait_line(&mut child, &r.log, BOUND, |l| {
        l.contains("job file rejected") && l.contains("secret.ndjson")
    })
    .await;
    for name in ["after1.ndjson", "after2.ndjson"] {
        let tmp = spool.join(format!(".{name}"));
        std::fs::write(&tmp, lines("after", 1)).unwrap();
        std::fs::rename(&tmp, spool.join(name)).unwrap();
        wait_line(&mut child, &r.log, BOUND, |l| {
            l.contains("job file") && l.contains(name)
        })
        .await;
    }
    assert_eq!(events(&r.log, "job file rejected").len(), 1);
    let report = std::fs::read_to_string(spool.join("rejected/secret.ndjson.error.json")).unwrap();
    assert!(report.contains("cannot be read"), "{report}");
    assert!(spool.join("rejected/secret.ndjson").is_file());
    stop(&mut child).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_line_is_rejected_without_being_held() {
    let r = setup().await;
    let tmp = r.env.dir.path().join("huge.ndjson");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).unwrap());
        writeln!(f, "{}", line("huge", "u", T0, "first")).unwrap();
        write!(
            f,
            r#"{{"GroupId":"huge","From_Account":"u","SendTime":{},"MsgBody":[{{"MsgType":"TIMTextElem","MsgContent":{{"Text":""#,
            T0 + 1
        )
        .unwrap();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..200 {
            f.write_all(&chunk).unwrap();
        }
        writeln!(f, r#""}}}}]}}"#).unwrap();
        writeln!(f, "{}", line("huge", "u", T0 + 2, "third")).unwrap();
    }
    std::fs::rename(&tmp, r.env.spool().join("huge.ndjson")).unwrap();
    let mut child = spawn_with_env(&r.config, &r.log, &spool_env("100ms"), &[], |_| {});
    let rejected = wait_line(&mut child, &r.log, Duration::from_secs(300), |l| {
        l.contains("job file rejected")
    })
    .await;
    let peak = peak_rss_kib(&child);
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(r.env.spool().join("rejected/huge.ndjson.error.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["problem_count"], 1, "{report}");
    assert_eq!(report["problems"][0]["line"], 2, "{report}");
    let problem = report["problems"][0]["problem"].as_str().unwrap();
    assert!(problem.contains("longer than"), "{problem}");
    assert!(rejected.contains("line 2"), "{rejected}");
    assert!(
        peak < 100 * 1024,
        "peak RSS {peak} KiB while reading a 200 MB line"
    );
    eprintln!("peak RSS while rejecting a 200 MB line: {peak} KiB");
    stop(&mut child).await;
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs (the tests run as root)");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_that_cannot_be_written_is_retried_until_the_disk_has_room() {
    let r = setup().await;
    let spool = r.env.spool();
    std::fs::remove_dir_all(&spool).unwrap();
    let _mount = Tmpfs::mount(&spool, "64k");
    std::fs::create_dir(spool.join("done")).unwrap();
    std::fs::create_dir(spool.join("rejected")).unwrap();
    std::fs::write(spool.join(".bad.tmp"), "not json\n").unwrap();
    std::fs::rename(spool.join(".bad.tmp"), spool.join("bad.ndjson")).unwrap();
    // Fill the file system (a hidden name: the spool leaves it alone).
    let filler = spool.join(".filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let page = [0u8; 4096];
        while f.write_all(&page).and_then(|_| f.flush()).is_ok() {}
    }
    let mut child = spawn_with_env(&r.config, &r.log, &spool_env("100ms"), &[], |_| {});
    wait_line(&mut child, &r.log, BOUND, |l| {
        l.contains("report or its move") && l.contains("bad.ndjson")
    })
    .await;
    // A few retries while full: the file stays where it was, nothing half-written is left.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(spool.join("bad.ndjson").is_file());
    assert!(
        entries(&spool.join("rejected")).is_empty(),
        "{:?}",
        entries(&spool.join("rejected"))
    );
    assert_eq!(
        events(&r.log, "report or its move").len(),
        1,
        "logged once, not per retry"
    );
    // Room again: the report and then the file land in rejected/.
    std::fs::remove_file(&filler).unwrap();
    wait_line(&mut child, &r.log, Duration::from_secs(120), |l| {
        l.contains("job file rejected") && l.contains("bad.ndjson")
    })
    .await;
    let report_path = spool.join("rejected/bad.ndjson.error.json");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; rejected/ holds {:?}\n{}",
                report_path.display(),
                entries(&spool.join("rejected")),
                log_text(&r.log)
            )
        }))
        .unwrap();
    assert_eq!(report["problems"][0]["line"], 1);
    assert!(spool.join("rejected/bad.ndjson").is_file());
    assert!(!spool.join("bad.ndjson").exists());
    let tmp: Vec<_> = entries(&spool.join("rejected"))
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "{tmp:?}");
    stop(&mut child).await;
}
