//! Intake: everything up to the moment a message sits durably in the queue, validated, with its
//! Random fixed: job files dropped in the spool folder ([`spool`], [`files`]) and rows inserted
//! into the intake table ([`table`]), both checked by the rules in [`validate`].
//!
//! [`run`] is the daemon's intake loop: it wakes on file-system events (inotify through `notify`),
//! on a periodic rescan as a safety net, and on a short poll of the intake table. It stops when the
//! cancellation token fires; a file being ingested at that moment is rolled back and stays in the
//! spool, so the next start takes it again. Failures of one file or one poll are logged and
//! retried on the next wake; they never stop the daemon. While the database refuses writes (a
//! full disk, a read-only file) intake takes nothing and logs nothing more than the store's one
//! warning; when writes work again it scans and polls at once. A corrupt, deleted or replaced
//! database ends the loop (the engine stops the daemon).

pub mod files;
pub mod spool;
pub mod table;
pub mod validate;

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::{Health, Store};

/// Settings of the intake loop.
#[derive(Debug, Clone)]
pub struct IntakeConfig {
    pub spool_dir: PathBuf,
    pub rescan_interval: Duration,
    pub poll_interval: Duration,
}

/// Runs until `cancel` fires: spool events and rescans, and the intake table poll.
pub async fn run(store: Store, cfg: IntakeConfig, cancel: CancellationToken) {
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
    let mut health = store.subscribe_health();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = rescan.tick() => scan(&store, &cfg, &cancel).await,
            Some(()) = wake_rx.recv() => scan(&store, &cfg, &cancel).await,
            _ = poll.tick() => poll_table(&store).await,
            changed = health.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = health.borrow_and_update().clone();
                match now {
                    // Writes work again: take what waited at once, not at the next tick.
                    Health::Ok => {
                        scan(&store, &cfg, &cancel).await;
                        poll_table(&store).await;
                    }
                    Health::WritesRefused { .. } => {}
                    // The engine stops the daemon; nothing more is taken into this file.
                    Health::Stopped { .. } => break,
                }
            }
        }
    }
    tracing::info!("intake stopped");
}

/// While the database refuses writes (or is unusable), intake waits: the store has said why,
/// once, and probes it with backoff. Failures then are logged at debug only.
fn store_waits(store: &Store) -> bool {
    store.health() != Health::Ok
}

async fn poll_table(store: &Store) {
    if store_waits(store) {
        return;
    }
    if let Err(e) = table::poll_once(store).await {
        if store_waits(store) {
            tracing::debug!(error = %e, "intake table poll failed while the database refuses writes");
        } else {
            tracing::warn!(error = %e, "intake table poll failed; retrying at the next poll");
        }
    }
}

async fn scan(store: &Store, cfg: &IntakeConfig, cancel: &CancellationToken) {
    if store_waits(store) {
        return;
    }
    if let Err(e) = spool::scan_once(store, &cfg.spool_dir, cancel).await {
        tracing::warn!(spool = %cfg.spool_dir.display(), error = %e, "spool scan failed; retrying at the next rescan");
    }
}
