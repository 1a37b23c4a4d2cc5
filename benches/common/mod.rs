//! Helpers shared by the benchmarks: the release binary, a child's own rusage, the machine.
#![allow(dead_code)]

pub mod pg;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Waits for `pid` and returns (exited 0, its own peak RSS in KiB, its CPU seconds).
#[allow(unsafe_code)]
pub fn wait_with_usage(pid: u32) -> (bool, i64, f64) {
    let mut status = 0;
    // SAFETY: wait4 writes only into the status int and the zeroed rusage we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
    let cpu = usage.ru_utime.tv_sec as f64
        + usage.ru_utime.tv_usec as f64 / 1e6
        + usage.ru_stime.tv_sec as f64
        + usage.ru_stime.tv_usec as f64 / 1e6;
    (
        rc > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        usage.ru_maxrss,
        cpu,
    )
}

pub fn release_binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ok = Command::new(env!("CARGO"))
        .args(["build", "--release", "--bin", "timport"])
        .current_dir(root)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "cargo build --release failed");
    // This benchmark runs from <target>/release/deps/, so CARGO_TARGET_DIR is honoured.
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("timport")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| root.join("target/release/timport"))
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
