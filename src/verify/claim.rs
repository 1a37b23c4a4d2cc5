//! Verify's side of the quota share with a daemon on the same database (the daemon's side is
//! `engine::share`), and the one-verify-per-database lock.
//!
//! Role: [`Claim::start`] writes the claim (verify's rate, a fresh token, a heartbeat) and keeps
//! the heartbeat renewed every [`BEAT`] in a task. [`Claim::admit`] is awaited before every
//! request: it lets requests through only while the last heartbeat written is younger than
//! [`SEND_WHILE`] (shorter than the daemon's `CLAIM_FRESH`, so verify is quiet before the daemon
//! takes its share back) and, while a daemon holds its lock on the database, only once the daemon
//! has acknowledged this token and a full second has passed since (every second the daemon
//! counts from then on is one at its lowered ceiling).
//!
//! Stopping and recovery: [`Claim::release`] withdraws the claim; a verify killed without it
//! leaves a claim whose heartbeat goes stale, and the daemon takes its share back within
//! `CLAIM_FRESH` plus a second.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::settings::Database;
use crate::store::{QueueLock, Store, StoreError, unix_now_ms};

/// How often the heartbeat is renewed (and the daemon looked for).
pub const BEAT: Duration = Duration::from_millis(500);
/// Requests go out only while the last heartbeat written is younger than this.
pub const SEND_WHILE: Duration = Duration::from_millis(2000);
/// A daemon silent this long about the claim is warned about.
pub const NO_ACK_WARNING: Duration = Duration::from_secs(10);
/// After the daemon's acknowledgement, wait this long (its pacer's window and a margin).
pub const AFTER_ACK: Duration = Duration::from_millis(1100);

/// A held claim on part of the quota.
pub struct Claim {
    token: String,
    store: Store,
    open: watch::Receiver<bool>,
    lock: Option<PathBuf>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Claim {
    /// Claims `rate` requests/s and starts the heartbeat. `db` is the database file, whose
    /// daemon lock tells whether a daemon shares the quota.
    pub async fn start(store: &Store, rate: f64, db: &Database) -> Result<Claim, StoreError> {
        let token = format!(
            "{}-{}-{:08x}",
            std::process::id(),
            unix_now_ms(),
            rand::random::<u32>()
        );
        store.verify_claim(&token, rate, unix_now_ms()).await?;
        let (tx, rx) = watch::channel(false);
        let stop = CancellationToken::new();
        let lock = match db {
            Database::Sqlite(path) => daemon_lock_path(path),
            _ => None,
        };
        let task = tokio::spawn(beat(
            store.clone(),
            token.clone(),
            rate,
            lock.clone(),
            tx,
            stop.clone(),
        ));
        Ok(Claim {
            token,
            store: store.clone(),
            open: rx,
            lock,
            stop,
            task,
        })
    }

    /// A handle for request tasks.
    pub fn gate(&self) -> Gate {
        Gate(Arc::new(self.open.clone()))
    }

    /// Withdraws the claim (the daemon takes its share back at its next look). Call it once no
    /// request is in flight: while a daemon runs, it first waits out one window of the daemon's
    /// pacer, so the daemon's raised rate never meets verify's last second of requests.
    pub async fn release(self) {
        self.stop.cancel();
        let _ = self.task.await;
        if daemon_running(&self.store, self.lock.as_deref()).await {
            tokio::time::sleep(AFTER_ACK).await;
        }
        if let Err(e) = self.store.verify_release(&self.token).await {
            tracing::warn!(error = %e, "the verify claim was not withdrawn; it goes stale by itself");
        }
    }
}

/// Cloneable admission check for tasks (see [`Claim::admit`]).
#[derive(Clone)]
pub struct Gate(Arc<watch::Receiver<bool>>);

impl Gate {
    /// Whether a request may go out right now.
    pub fn is_open(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until a request may go out; false when `cancel` fires first.
    pub async fn admit(&self, cancel: &CancellationToken) -> bool {
        let mut rx = (*self.0).clone();
        tokio::select! {
            r = rx.wait_for(|open| *open) => r.is_ok() && !cancel.is_cancelled(),
            _ = cancel.cancelled() => false,
        }
    }
}

async fn beat(
    store: Store,
    token: String,
    rate: f64,
    lock: Option<PathBuf>,
    open: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let mut last_beat = Instant::now();
    let mut acked_at: Option<Instant> = None;
    let mut waiting_logged = false;
    let mut waiting_since: Option<Instant> = None;
    let mut stuck_logged = false;
    loop {
        let daemon = daemon_running(&store, lock.as_deref()).await;
        if acked_at.is_none()
            && let Ok(Some(c)) = store.verify_claim_read().await
            && c.ack_token.as_deref() == Some(token.as_str())
        {
            acked_at = Some(Instant::now());
            tracing::info!("the daemon acknowledged the verify's share of the quota");
        }
        let fresh = last_beat.elapsed() < SEND_WHILE;
        let shared = !daemon || acked_at.is_some_and(|a| a.elapsed() >= AFTER_ACK);
        if daemon && acked_at.is_none() {
            let since = *waiting_since.get_or_insert_with(Instant::now);
            if !waiting_logged {
                waiting_logged = true;
                tracing::info!(
                    "a daemon runs on this database: waiting for it to lower its rate before reading"
                );
            }
            if since.elapsed() > NO_ACK_WARNING && !stuck_logged {
                stuck_logged = true;
                tracing::warn!(
                    "the daemon on this database has not acknowledged the verify's share of the quota; a timport older than verify does not: upgrade it, or stop it while verifying"
                );
            }
        }
        open.send_replace(fresh && shared);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(BEAT) => {}
        }
        match store.verify_heartbeat(&token, unix_now_ms()).await {
            Ok(true) => last_beat = Instant::now(),
            Ok(false) => {
                // The claim row is gone (someone cleared it): claim again, wait for a new ack.
                if store
                    .verify_claim(&token, rate, unix_now_ms())
                    .await
                    .is_ok()
                {
                    last_beat = Instant::now();
                    acked_at = None;
                }
            }
            Err(e) => tracing::debug!(error = %e, "verify heartbeat not written; retrying"),
        }
    }
}

/// Whether a `timport run` holds the database: its lock file (SQLite, `lock`) or its lock in the
/// database (PostgreSQL). A lock that cannot be read counts as held, so verify waits for an
/// acknowledgement rather than risk the quota.
async fn daemon_running(store: &Store, lock: Option<&Path>) -> bool {
    match store.lock_held(QueueLock::Daemon).await {
        Ok(Some(held)) => held,
        Ok(None) => lock.is_some_and(lock_held),
        Err(_) => true,
    }
}

/// `<canonical database>.lock`, the daemon's single-instance lock (see `cli::lock_daemon`).
fn daemon_lock_path(db: &Path) -> Option<PathBuf> {
    let canonical = std::fs::canonicalize(db).ok()?;
    let mut name = canonical.into_os_string();
    name.push(".lock");
    Some(PathBuf::from(name))
}

/// Whether some process holds a lock on `path`: read from `/proc/locks` (which takes no lock, so
/// a daemon starting at that instant is never refused); where that is unreadable, by trying a
/// shared lock and dropping it at once.
pub fn lock_held(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    match std::fs::read_to_string("/proc/locks") {
        Ok(locks) => proc_locks_hold(&locks, meta.dev(), meta.ino()),
        Err(_) => match std::fs::File::open(path) {
            Ok(f) => matches!(f.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock)),
            Err(_) => false,
        },
    }
}

/// Whether `/proc/locks` text lists a lock on the file (device `dev`, inode `ino`). Its lines
/// read `1: FLOCK  ADVISORY  WRITE 1234 08:02:131090 0 EOF`, the device as hex major:minor.
fn proc_locks_hold(locks: &str, dev: u64, ino: u64) -> bool {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    locks.lines().any(|line| {
        line.split_whitespace().any(|field| {
            let mut parts = field.split(':');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(ma), Some(mi), Some(i), None) => {
                    u64::from_str_radix(ma, 16).ok() == Some(major)
                        && u64::from_str_radix(mi, 16).ok() == Some(minor)
                        && i.parse::<u64>().ok() == Some(ino)
                }
                _ => false,
            }
        })
    })
}

/// Takes the one-verify-per-database lock, `<canonical database>.verify.lock`, for the
/// process's life; the text of the error names the holder's file.
pub fn lock_verify(db: &Path) -> Result<std::fs::File, String> {
    let canonical = std::fs::canonicalize(db).map_err(|e| format!("{}: {e}", db.display()))?;
    let mut name = canonical.into_os_string();
    name.push(".verify.lock");
    let path = PathBuf::from(name);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "another `timport verify` is running on this database (lock {} is held)",
            path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines_name_the_file() {
        // dev 0x0802 = major 8, minor 2.
        let text = "1: FLOCK  ADVISORY  WRITE 1234 08:02:131090 0 EOF\n2: POSIX  ADVISORY  READ 99 00:1b:5 0 EOF\n";
        assert!(proc_locks_hold(text, 0x0802, 131_090));
        assert!(!proc_locks_hold(text, 0x0802, 131_091));
        assert!(!proc_locks_hold(text, 0x0803, 131_090));
        assert!(proc_locks_hold(text, 0x1b, 5));
    }

    #[test]
    fn a_held_lock_is_seen_and_a_dropped_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.db.lock");
        let f = std::fs::File::create(&p).unwrap();
        assert!(!lock_held(&p));
        f.try_lock().unwrap();
        assert!(lock_held(&p));
        drop(f);
        assert!(!lock_held(&p));
    }
}
