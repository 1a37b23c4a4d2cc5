//! Intake: everything up to the moment a message sits durably in the queue, validated, with its
//! Random fixed: job files dropped in the spool folder ([`spool`], [`files`]) and rows inserted
//! into the intake table ([`table`]), both checked by the rules in [`validate`].
//!
//! [`run`] is the daemon's intake loop: it wakes on file-system events (inotify through `notify`),
//! on a periodic rescan as a safety net, when a file waiting to settle or to be retried is due
//! ([`spool::Scan::next_in`]), and on a short poll of the intake table. It stops when the
//! cancellation token fires; a file being ingested at that moment is rolled back and stays in the
//! spool, so the next start takes it again. Failures of one file or one poll are logged and
//! retried on the next wake; they never stop the daemon.

pub mod files;
pub mod spool;
pub mod table;
pub mod validate;

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// Settings of the intake loop.
#[derive(Debug, Clone)]
pub struct IntakeConfig {
    pub spool_dir: PathBuf,
    pub rescan_interval: Duration,
    pub poll_interval: Duration,
    /// How long a spool file must hold still before it is taken (`queue.spool_settle`).
    pub settle: Duration,
}

impl IntakeConfig {
    /// The spool as this configuration describes it, with nothing seen yet.
    pub fn spool(&self) -> spool::Spool {
        spool::Spool::new(self.spool_dir.clone(), self.settle)
    }
}

/// Runs until `cancel` fires: spool events and rescans, and the intake table poll.
pub async fn run(store: Store, cfg: IntakeConfig, cancel: CancellationToken) {
    let spool = cfg.spool();
    run_with(store, cfg, spool, cancel).await
}

/// [`run`], going on from what earlier scans of `spool` saw (files settling, retry backoffs).
pub async fn run_with(
    store: Store,
    cfg: IntakeConfig,
    mut spool: spool::Spool,
    cancel: CancellationToken,
) {
    if let Err(e) = spool::prepare(&cfg.spool_dir) {
        tracing::error!(spool = %cfg.spool_dir.display(), error = %e, "cannot prepare the spool folder; rescans will retry");
    }
    let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
    // Keep the watcher alive for the life of the loop; without it, rescans still find files.
    let _watcher = match spool::watch(&cfg.spool_dir, wake_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(spool = %cfg.spool_dir.display(), error = %e, "file-system events unavailable; relying on the periodic rescan");
            None
        }
    };
    let mut rescan = tokio::time::interval(cfg.rescan_interval);
    let mut poll = tokio::time::interval(cfg.poll_interval);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut due: Option<tokio::time::Instant> = None;
    let mut failing: Option<String> = None;
    loop {
        let due_at = due.unwrap_or_else(|| tokio::time::Instant::now() + cfg.rescan_interval);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = rescan.tick() => due = scan(&store, &mut spool, &mut failing, &cancel).await,
            Some(()) = wake_rx.recv() => due = scan(&store, &mut spool, &mut failing, &cancel).await,
            _ = tokio::time::sleep_until(due_at), if due.is_some() => {
                due = scan(&store, &mut spool, &mut failing, &cancel).await;
            }
            _ = poll.tick() => {
                if let Err(e) = table::poll_once(&store).await {
                    tracing::warn!(error = %e, "intake table poll failed; retrying at the next poll");
                }
            }
        }
    }
    tracing::info!("intake stopped");
}

/// One scan; returns when the next is due for files still settling or waiting for a retry. A
/// spool folder that cannot be listed is logged once per distinct error, and once when it can be
/// again (`failing` carries the last error).
async fn scan(
    store: &Store,
    spool: &mut spool::Spool,
    failing: &mut Option<String>,
    cancel: &CancellationToken,
) -> Option<tokio::time::Instant> {
    match spool.scan(store, cancel).await {
        Ok(s) => {
            if failing.take().is_some() {
                tracing::info!(spool = %spool.dir().display(), "spool folder readable again");
            }
            s.next_in.map(|d| {
                // A little past the moment, so the file has surely held still long enough.
                tokio::time::Instant::now() + d + Duration::from_millis(50)
            })
        }
        Err(e) => {
            let text = e.to_string();
            if failing.as_deref() != Some(text.as_str()) {
                tracing::warn!(spool = %spool.dir().display(), error = %e, "spool scan failed; retrying at every rescan (logged again only if the error changes)");
                *failing = Some(text);
            }
            None
        }
    }
}
