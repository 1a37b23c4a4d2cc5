//! The spool folder: job files arrive by rename, are ingested, and leave for `done/` (accepted,
//! or the same content seen before) or `rejected/` (beside `NAME.error.json`).
//!
//! A file is moved only after its transaction committed or was rolled back, so a crash between
//! the two leaves it in the spool: the next scan ingests it again, and its content hash turns a
//! second queueing into a "duplicate" that is simply moved to `done/`. Names starting with `.` or
//! ending in `.tmp`/`.part` are files still being written and are left alone. Symlinks and other
//! non-regular entries are rejected without being followed. Moved files and reports get mode
//! 0600, the folders 0700.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::files::{FileOutcome, IngestError, ingest_file};
use crate::store::{Store, unix_now};

pub const DONE: &str = "done";
pub const REJECTED: &str = "rejected";

/// Creates the spool folder and its `done/` and `rejected/` folders (mode 0700 when new).
pub fn prepare(spool: &Path) -> std::io::Result<()> {
    for dir in [spool.to_path_buf(), spool.join(DONE), spool.join(REJECTED)] {
        if !dir.exists() {
            fs::create_dir_all(&dir)?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

/// Watches the spool folder; any event wakes the loop (coalesced in a channel of one).
pub fn watch(spool: &Path, wake: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Only arrivals matter. Access events must not wake the loop: the scan itself opens the
        // folder, and waking on that would rescan forever.
        if let Ok(ev) = res
            && matches!(ev.kind, EventKind::Create(_) | EventKind::Modify(_))
        {
            let _ = wake.try_send(());
        }
    })?;
    watcher.watch(spool, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// True for names the spool leaves alone: still being written, or hidden.
pub fn ignored(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".part")
}

/// What one scan did with one entry.
#[derive(Debug, Clone)]
pub struct Handled {
    pub name: String,
    pub outcome: FileOutcome,
    pub moved_to: PathBuf,
}

/// Ingests every job file now in the spool, oldest name first, and moves each where it belongs.
pub async fn scan_once(
    store: &Store,
    spool: &Path,
    cancel: &CancellationToken,
) -> std::io::Result<Vec<Handled>> {
    prepare(spool)?;
    let mut names = Vec::new();
    for entry in fs::read_dir(spool)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if ignored(&name) {
            continue;
        }
        if name == DONE || name == REJECTED {
            continue;
        }
        names.push(name);
    }
    names.sort();
    let mut handled = Vec::new();
    for name in names {
        if cancel.is_cancelled() {
            break;
        }
        let path = spool.join(&name);
        let outcome = match ingest_file(Some(store), &path, false, cancel).await {
            Ok(o) => o,
            Err(IngestError::Cancelled(_)) => break,
            Err(IngestError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                continue; // taken away meanwhile
            }
            Err(e) => {
                tracing::warn!(file = %name, error = %e, "job file not ingested; it stays in the spool and is retried");
                continue;
            }
        };
        let moved_to = settle(spool, &name, &outcome)?;
        log_outcome(&name, &outcome, &moved_to);
        handled.push(Handled {
            name,
            outcome,
            moved_to,
        });
    }
    Ok(handled)
}

fn log_outcome(name: &str, outcome: &FileOutcome, moved_to: &Path) {
    match outcome {
        FileOutcome::Accepted {
            job_id,
            messages,
            groups,
        } => {
            metrics::counter!("timport_job_files_total", "outcome" => "accepted").increment(1);
            tracing::info!(file = %name, job = job_id, messages, groups, moved_to = %moved_to.display(), "job file accepted");
        }
        FileOutcome::Duplicate { job_id } => {
            metrics::counter!("timport_job_files_total", "outcome" => "duplicate").increment(1);
            tracing::info!(file = %name, job = job_id, moved_to = %moved_to.display(), "job file has the content of an earlier job; not queued again");
        }
        FileOutcome::Rejected {
            problem_count,
            problems,
        } => {
            metrics::counter!("timport_job_files_total", "outcome" => "rejected").increment(1);
            let first = problems
                .first()
                .map(|p| format!("line {}: {}", p.line, p.problem));
            tracing::warn!(file = %name, problems = problem_count, first = first.unwrap_or_default(), moved_to = %moved_to.display(), "job file rejected; nothing of it was queued");
        }
        FileOutcome::Valid { .. } => {}
    }
}

/// Moves the entry to `done/` or `rejected/` (writing the report) and returns its new path.
pub fn settle(spool: &Path, name: &str, outcome: &FileOutcome) -> std::io::Result<PathBuf> {
    let from = spool.join(name);
    match outcome {
        FileOutcome::Rejected {
            problem_count,
            problems,
        } => {
            let to = move_into(&spool.join(REJECTED), &from, name)?;
            let report_name = format!(
                "{}.error.json",
                to.file_name().unwrap_or_default().to_string_lossy()
            );
            let report = serde_json::json!({
                "file": name,
                "rejected_at": unix_now(),
                "problem_count": problem_count,
                "problems_listed": problems.len(),
                "problems": problems,
            });
            write_private(
                &spool.join(REJECTED).join(report_name),
                serde_json::to_string_pretty(&report)
                    .unwrap_or_default()
                    .as_bytes(),
            )?;
            Ok(to)
        }
        _ => move_into(&spool.join(DONE), &from, name),
    }
}

/// Renames `from` into `dir`, never overwriting: a taken name gets `.1`, `.2`, … appended.
/// A regular file gets mode 0600; a symlink is moved as the link itself.
fn move_into(dir: &Path, from: &Path, name: &str) -> std::io::Result<PathBuf> {
    if !dir.exists() {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    let mut to = dir.join(name);
    let mut n = 1;
    while fs::symlink_metadata(&to).is_ok() {
        to = dir.join(format!("{name}.{n}"));
        n += 1;
    }
    fs::rename(from, &to)?;
    // The move is durable before anything else happens: both folders' entries on disk.
    sync_dir(dir)?;
    if let Some(parent) = from.parent() {
        sync_dir(parent)?;
    }
    // Best effort: a file dropped by another user cannot be chmod-ed by the service user; it is
    // moved all the same (its folder is 0700).
    if fs::symlink_metadata(&to)?.file_type().is_file()
        && let Err(e) = fs::set_permissions(&to, fs::Permissions::from_mode(0o600))
    {
        tracing::debug!(file = %to.display(), error = %e, "cannot restrict the moved file's mode");
    }
    Ok(to)
}

/// fsync of a folder, so a rename into or out of it survives a power cut.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}
