//! The spool folder: job files arrive (by rename, or written in place), are ingested, and leave for
//! `done/` (accepted, or the same content seen before) or `rejected/` (beside `NAME.error.json`).
//!
//! A file is taken only once it stopped changing: its size, modification and change times and
//! inode must hold for `queue.spool_settle` ([`Spool::new`]), either as seen by this process across
//! scans or by its times being that old already (a file waiting since before the start is taken at
//! once). A file that still changes while it is read is not queued ([`IngestError::Changed`]) and
//! waits again. Names starting with `.` or ending in `.tmp`/`.part` are files still being written
//! and are left alone.
//!
//! A file is moved only after its transaction committed or was rolled back, so a crash between
//! the two leaves it in the spool: the next scan ingests it again, and its content hash turns a
//! second queueing into a "duplicate" that is simply moved to `done/`. A rejection writes its
//! report first (temporary file, fsync, rename) and moves the file after it; when either step fails
//! (a full disk) the file stays in the spool, no partial report is left, and it is tried again
//! with a growing backoff, logged once per change of state.
//!
//! Symlinks, FIFOs, sockets, devices and folders are rejected from their `lstat` without being
//! opened or followed; a file with more than one hard link is rejected without its mode or content
//! being touched; a file that cannot be read (permission) is rejected once. Names that are not
//! UTF-8 or hold control characters are ingested like any other and stored in `done/` and
//! `rejected/` under an escaped name; names too long for a collision suffix or a report are
//! shortened (a hash keeps them distinct). Moved files and reports get mode 0600, the folders 0700.
//! One entry's failure never stops the scan of the others.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use notify::{EventKind, RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::files::{FileOutcome, IngestError, Problem, hard_link_problem, ingest_file};
use super::files::{not_regular, rejected_whole};
use crate::store::{Store, unix_now};
use crate::telemetry::escape_bytes;

pub const DONE: &str = "done";
pub const REJECTED: &str = "rejected";

/// Longest file name most file systems take (bytes).
const NAME_MAX: usize = 255;
/// What a stored name may grow by: a collision suffix (`.999999`) and `.error.json.tmp`.
const SUFFIX_ROOM: usize = 7 + ".error.json.tmp".len();
/// First and longest wait before a file whose move or report failed is tried again.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

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
    ignored_bytes(name.as_bytes())
}

fn ignored_bytes(name: &[u8]) -> bool {
    name.starts_with(b".") || name.ends_with(b".tmp") || name.ends_with(b".part")
}

/// What one scan did with one entry.
#[derive(Debug, Clone)]
pub struct Handled {
    /// The entry's name as text (escaped where it is not printable UTF-8).
    pub name: String,
    pub outcome: FileOutcome,
    pub moved_to: PathBuf,
}

/// What one scan did, and when the next one is due for files still settling or waiting to be
/// retried.
#[derive(Debug, Default)]
pub struct Scan {
    pub handled: Vec<Handled>,
    /// Files seen but not taken yet (still changing, or waiting to be retried).
    pub waiting: usize,
    /// Of those, the files still changing (or changed too recently).
    pub settling: usize,
    pub next_in: Option<Duration>,
}

/// The identity and state of a directory entry, from `lstat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// What the spool remembers of an entry it has not taken yet.
#[derive(Debug)]
struct Seen {
    stamp: Stamp,
    /// Since when `stamp` held, as seen by this process.
    since: Instant,
    /// Not before this instant (after a failed move, report or read).
    retry_at: Option<Instant>,
    backoff: Duration,
    /// The failure last logged, so a repeat is not logged again.
    failing: Option<String>,
    /// "Waiting for it to settle" was logged for this stamp.
    told_waiting: bool,
}

/// The spool folder and what this process has seen of its entries (settling, retry backoffs).
pub struct Spool {
    dir: PathBuf,
    settle: Duration,
    seen: HashMap<OsString, Seen>,
}

/// Ingests every job file now in the spool, taking each as it is (no settle time): for callers
/// that know nothing writes to the spool. The daemon uses [`Spool::scan`].
pub async fn scan_once(
    store: &Store,
    spool: &Path,
    cancel: &CancellationToken,
) -> std::io::Result<Vec<Handled>> {
    let mut s = Spool::new(spool.to_path_buf(), Duration::ZERO);
    Ok(s.scan(store, cancel).await?.handled)
}

enum Verdict {
    /// Not taken this time (settling, changed, failed): the entry stays and is looked at again.
    Later,
    /// Gone meanwhile, or moved: forget it.
    Forget,
    Done(Handled),
}

impl Spool {
    pub fn new(dir: PathBuf, settle: Duration) -> Spool {
        Spool {
            dir,
            settle,
            seen: HashMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// One pass over the spool, oldest name first. An entry that cannot be handled now is left for
    /// a later pass; only a spool folder that cannot be listed is an error.
    pub async fn scan(
        &mut self,
        store: &Store,
        cancel: &CancellationToken,
    ) -> std::io::Result<Scan> {
        prepare(&self.dir)?;
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(spool = %self.dir.display(), error = %e, "cannot read a spool folder entry; the others go on");
                    continue;
                }
            };
            let name = entry.file_name();
            let bytes = name.as_bytes();
            if ignored_bytes(bytes) || bytes == DONE.as_bytes() || bytes == REJECTED.as_bytes() {
                continue;
            }
            names.push(name);
        }
        names.sort();
        // Forget entries that went away.
        self.seen
            .retain(|n, _| names.binary_search_by(|x| x.as_os_str().cmp(n)).is_ok());
        let mut scan = Scan::default();
        for name in names {
            if cancel.is_cancelled() {
                break;
            }
            match self.entry(store, &name, cancel, &mut scan).await {
                Verdict::Later => {}
                Verdict::Forget => {
                    self.seen.remove(&name);
                }
                Verdict::Done(h) => {
                    self.seen.remove(&name);
                    scan.handled.push(h);
                }
            }
        }
        Ok(scan)
    }

    async fn entry(
        &mut self,
        store: &Store,
        name: &OsStr,
        cancel: &CancellationToken,
        scan: &mut Scan,
    ) -> Verdict {
        let shown = escape_bytes(name.as_bytes());
        let now = Instant::now();
        let wait = |scan: &mut Scan, d: Duration| {
            scan.waiting += 1;
            scan.next_in = Some(scan.next_in.map_or(d, |n| n.min(d)));
        };
        if let Some(retry_at) = self.seen.get(name).and_then(|s| s.retry_at)
            && retry_at > now
        {
            wait(scan, retry_at - now);
            return Verdict::Later;
        }
        let path = self.dir.join(name);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Verdict::Forget,
            Err(e) => {
                let d = self.failed(name, now, &shown, "lstat failed", &e.to_string());
                wait(scan, d);
                return Verdict::Later;
            }
        };
        // Entries that are not plain files with one link are rejected as they are: never opened,
        // followed, or changed.
        let early = if let Some(what) = not_regular(&meta.file_type()) {
            Some(rejected_whole(format!(
                "not a regular file ({what}); not followed"
            )))
        } else if meta.nlink() > 1 {
            Some(rejected_whole(hard_link_problem(meta.nlink())))
        } else {
            None
        };
        let outcome = match early {
            Some(o) => o,
            None => {
                if let Some(left) = self.settling(name, &meta, now) {
                    let s = self.seen.get_mut(name);
                    if let Some(s) = s
                        && !s.told_waiting
                    {
                        s.told_waiting = true;
                        tracing::debug!(file = %shown, size = meta.len(), "job file changed recently; waiting for it to settle before taking it");
                    }
                    scan.settling += 1;
                    wait(scan, left);
                    return Verdict::Later;
                }
                match ingest_file(Some(store), &path, false, cancel).await {
                    Ok(o) => o,
                    Err(IngestError::Cancelled(_)) => return Verdict::Later,
                    Err(IngestError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        return Verdict::Forget; // taken away meanwhile
                    }
                    Err(IngestError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::PermissionDenied =>
                    {
                        rejected_whole(format!(
                            "the file cannot be read ({source}); give the service user read access and drop it again"
                        ))
                    }
                    Err(IngestError::Changed(_)) => {
                        tracing::info!(file = %shown, "job file changed while it was read; nothing of it was queued, it is taken again once it stops changing");
                        self.seen.remove(name);
                        if let Ok(m) = fs::symlink_metadata(&path) {
                            let _ = self.settling(name, &m, Instant::now());
                        }
                        scan.settling += 1;
                        wait(scan, self.settle.max(Duration::from_millis(100)));
                        return Verdict::Later;
                    }
                    Err(e) => {
                        let d = self.failed(
                            name,
                            now,
                            &shown,
                            "it could not be ingested",
                            &e.to_string(),
                        );
                        wait(scan, d);
                        return Verdict::Later;
                    }
                }
            }
        };
        match put_away(&self.dir, name, &outcome) {
            Ok(moved_to) => {
                if let Some(s) = self.seen.get(name)
                    && s.failing.is_some()
                {
                    tracing::info!(file = %shown, moved_to = %moved_to.display(), "job file moved after earlier failures");
                }
                log_outcome(&shown, &outcome, &moved_to);
                Verdict::Done(Handled {
                    name: shown,
                    outcome,
                    moved_to,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !path.exists() => Verdict::Forget,
            Err(e) => {
                let what = match outcome {
                    FileOutcome::Rejected { .. } => {
                        "it is rejected, but its report or its move into rejected/ failed"
                    }
                    _ => "it is queued, but its move into done/ failed",
                };
                let d = self.failed(name, now, &shown, what, &e.to_string());
                wait(scan, d);
                Verdict::Later
            }
        }
    }

    /// `None` when the entry has held still for the settle time; otherwise how much longer to wait.
    fn settling(&mut self, name: &OsStr, meta: &fs::Metadata, now: Instant) -> Option<Duration> {
        if self.settle.is_zero() {
            return None;
        }
        let stamp = Stamp::of(meta);
        let s = self.seen.entry(name.to_os_string()).or_insert(Seen {
            stamp,
            since: now,
            retry_at: None,
            backoff: Duration::ZERO,
            failing: None,
            told_waiting: false,
        });
        if s.stamp != stamp {
            s.stamp = stamp;
            s.since = now;
            s.told_waiting = false;
        }
        let held = now.duration_since(s.since);
        if held >= self.settle || quiet_for(meta, self.settle) {
            return None;
        }
        Some(self.settle - held)
    }

    /// Records a failure of `name` (logged when it differs from the last one) and returns how long
    /// to wait before trying it again.
    fn failed(
        &mut self,
        name: &OsStr,
        now: Instant,
        shown: &str,
        what: &str,
        error: &str,
    ) -> Duration {
        let s = self.seen.entry(name.to_os_string()).or_insert(Seen {
            stamp: Stamp {
                dev: 0,
                ino: 0,
                size: 0,
                mtime: (0, 0),
                ctime: (0, 0),
            },
            since: now,
            retry_at: None,
            backoff: Duration::ZERO,
            failing: None,
            told_waiting: false,
        });
        s.backoff = if s.backoff.is_zero() {
            RETRY_FIRST
        } else {
            (s.backoff * 2).min(RETRY_MAX)
        };
        s.retry_at = Some(now + s.backoff);
        let state = format!("{what}: {error}");
        if s.failing.as_deref() != Some(state.as_str()) {
            tracing::warn!(file = %shown, error = %error, retry_in = %humantime::format_duration(s.backoff), "cannot finish with the job file ({what}); it stays in the spool and is tried again with a growing backoff");
            s.failing = Some(state);
        }
        s.backoff
    }
}

/// True when the entry's modification and change times are both at least `settle` in the past
/// (and not in the future): nothing has written to it for that long.
fn quiet_for(meta: &fs::Metadata, settle: Duration) -> bool {
    let Some(limit) = SystemTime::now().checked_sub(settle) else {
        return false;
    };
    let at = |secs: i64, nanos: i64| {
        let secs = u64::try_from(secs).ok()?;
        let nanos = u32::try_from(nanos).ok()?;
        SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
    };
    match (
        at(meta.mtime(), meta.mtime_nsec()),
        at(meta.ctime(), meta.ctime_nsec()),
    ) {
        (Some(m), Some(c)) => m <= limit && c <= limit,
        _ => false,
    }
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

/// The name an entry is stored under in `done/` or `rejected/`: its own when that is printable
/// UTF-8 short enough for a collision suffix and a report; otherwise the escaped name, shortened
/// where needed to a prefix, `~`, 12 hex digits of the name's SHA-256 and its extension.
pub fn stored_name(name: &OsStr) -> String {
    let bytes = name.as_bytes();
    let shown = escape_bytes(bytes);
    if shown.len() + SUFFIX_ROOM <= NAME_MAX {
        return shown;
    }
    let hash = hex::encode(&Sha256::digest(bytes)[..6]);
    let ext = Path::new(&shown)
        .extension()
        .and_then(|e| e.to_str())
        .filter(|e| e.len() <= 16)
        .map(|e| format!(".{e}"))
        .unwrap_or_default();
    let room = NAME_MAX - SUFFIX_ROOM - 1 - hash.len() - ext.len();
    let mut cut = room.min(shown.len());
    while !shown.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{hash}{ext}", &shown[..cut])
}

/// Moves the entry to `done/` or `rejected/` (the report written first) and returns its new path.
/// On an error nothing is left behind: no partial report, no report without its file.
pub fn put_away(spool: &Path, name: &OsStr, outcome: &FileOutcome) -> std::io::Result<PathBuf> {
    let from = spool.join(name);
    match outcome {
        FileOutcome::Rejected {
            problem_count,
            problems,
        } => {
            let dir = spool.join(REJECTED);
            ensure_dir(&dir)?;
            let to = free_name(&dir, name, true);
            let stored = to.file_name().unwrap_or_default().to_string_lossy();
            let report_path = dir.join(format!("{stored}.error.json"));
            let report = report_json(name, &stored, *problem_count, problems);
            write_private(&report_path, report.as_bytes())?;
            if let Err(e) = move_to(&from, &to, &dir) {
                let _ = fs::remove_file(&report_path);
                let _ = sync_dir(&dir);
                return Err(e);
            }
            Ok(to)
        }
        _ => {
            let dir = spool.join(DONE);
            ensure_dir(&dir)?;
            let to = free_name(&dir, name, false);
            move_to(&from, &to, &dir)?;
            Ok(to)
        }
    }
}

fn report_json(name: &OsStr, stored: &str, problem_count: u64, problems: &[Problem]) -> String {
    let shown = escape_bytes(name.as_bytes());
    let mut report = serde_json::json!({
        "file": shown,
        "stored_as": stored,
        "rejected_at": unix_now(),
        "problem_count": problem_count,
        "problems_listed": problems.len(),
        "problems": problems,
    });
    if std::str::from_utf8(name.as_bytes()).is_err() {
        report["file_name_hex"] = serde_json::Value::String(hex::encode(name.as_bytes()));
    }
    serde_json::to_string_pretty(&report).unwrap_or_default()
}

fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// A path in `dir` for `name` that nothing holds yet (nor its report, with `report`): the stored
/// name, then `.1`, `.2`, … appended.
fn free_name(dir: &Path, name: &OsStr, report: bool) -> PathBuf {
    let base = stored_name(name);
    let taken = |p: &Path| {
        fs::symlink_metadata(p).is_ok()
            || (report && {
                let mut r = p.as_os_str().to_owned();
                r.push(".error.json");
                fs::symlink_metadata(Path::new(&r)).is_ok()
            })
    };
    let mut to = dir.join(&base);
    let mut n = 1u64;
    while taken(&to) {
        to = dir.join(format!("{base}.{n}"));
        n += 1;
    }
    to
}

/// Renames `from` to `to` (never over an existing entry: `to` was free) and makes the move
/// durable. A regular file with a single link gets mode 0600; anything else (a symlink, a hard
/// link shared with another name) is moved as it is and never altered.
fn move_to(from: &Path, to: &Path, dir: &Path) -> std::io::Result<()> {
    fs::rename(from, to)?;
    // The move is durable before anything else happens: both folders' entries on disk.
    sync_dir(dir)?;
    if let Some(parent) = from.parent() {
        sync_dir(parent)?;
    }
    // Best effort: a file dropped by another user cannot be chmod-ed by the service user; it is
    // moved all the same (its folder is 0700).
    let meta = fs::symlink_metadata(to)?;
    if meta.file_type().is_file()
        && meta.nlink() == 1
        && meta.mode() & 0o777 != 0o600
        && let Err(e) = fs::set_permissions(to, fs::Permissions::from_mode(0o600))
    {
        tracing::debug!(file = %to.display(), error = %e, "cannot restrict the moved file's mode");
    }
    Ok(())
}

/// fsync of a folder, so a rename into or out of it survives a power cut.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` through a temporary file (fsync, rename, fsync of the folder). On any
/// error the temporary file is removed: a full disk leaves neither it nor a partial `path`.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names_fit_with_suffix_and_report() {
        assert_eq!(stored_name(OsStr::new("a.ndjson")), "a.ndjson");
        let long = format!("{}.ndjson", "é".repeat(124));
        let s = stored_name(OsStr::new(&long));
        assert!(s.len() + SUFFIX_ROOM <= NAME_MAX, "{}", s.len());
        assert!(s.ends_with(".ndjson") && s.contains('~'), "{s}");
        let other = format!("{}x.ndjson", "é".repeat(124));
        assert_ne!(
            stored_name(OsStr::new(&other)),
            s,
            "a hash keeps them apart"
        );
        let raw = OsStr::from_bytes(b"bad\xff\nname.ndjson");
        assert_eq!(stored_name(raw), "bad\\xff\\nname.ndjson");
    }
}
