//! A `timport run` child with settings overridden by environment variables, and its log read as
//! it grows. Included by path (`#[path = "common/daemon.rs"] mod daemon;`) next to `mod common;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `timport run --config CONFIG EXTRA...` with `envs` set, stderr appended to `log`.
pub fn spawn_with_env(
    config: &Path,
    log: &Path,
    envs: &[(&str, &str)],
    extra: &[&str],
    setup: impl FnOnce(&mut Command),
) -> Child {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_timport"));
    cmd.args(["run", "--config", config.to_str().unwrap()])
        .args(extra)
        .env_remove("TIMPORT_CONFIG")
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::from(file));
    setup(&mut cmd);
    cmd.spawn().unwrap()
}

/// The log so far, lossily decoded.
pub fn log_text(log: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned()
}

/// Waits (polling, up to `bound`) for a log line matching `pred` and returns it. Panics with the
/// log when none came, or when the child exited first.
pub async fn wait_line(
    child: &mut Child,
    log: &Path,
    bound: Duration,
    pred: impl Fn(&str) -> bool,
) -> String {
    let started = Instant::now();
    loop {
        let text = log_text(log);
        if let Some(l) = text.lines().find(|l| pred(l)) {
            return l.to_string();
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the child exited ({status}) before the expected log line:\n{text}");
        }
        assert!(
            started.elapsed() < bound,
            "no expected log line within {bound:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a signal by name (`TERM`, `HUP`) with kill(1).
pub fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name} failed");
}

/// Peak resident memory of a running process, in KiB (VmHWM from /proc).
pub fn peak_rss_kib(child: &Child) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// Paths of the entries of `dir`, sorted.
pub fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}
