//! Intake: everything up to the moment a message sits durably in the queue, validated, with its
//! Random fixed: job files dropped in the spool folder ([`spool`], [`files`]) and rows inserted
//! into the intake table ([`table`]), both checked by the rules in [`validate`].
//!
//! [`run`] is the daemon's intake loop: it wakes on file-system events (inotify through `notify`),
//! on a periodic rescan as a safety net, when a file waiting to settle or to be retried is due
//! ([`spool::Scan::next_in`]), on a short poll of the intake table, and on PostgreSQL at once
//! when rows are inserted there (LISTEN/NOTIFY; the poll stays as the safety net). It stops when the
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
    spool: spool::Spool,
    cancel: CancellationToken,
) {
    let (_always, table) = tokio::sync::watch::channel(true);
    run_with_table(store, cfg, spool, table, cancel).await
}

/// Like [`run_with`], but the intake table is polled only while `table` says so: on a node of a
/// high-availability group, only the active node takes intake rows (a standby still takes the
/// job files dropped into its own spool).
pub async fn run_with_table(
    store: Store,
    cfg: IntakeConfig,
    mut spool: spool::Spool,
    mut table: tokio::sync::watch::Receiver<bool>,
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
    let mut health = store.subscribe_health();
    // PostgreSQL notifies at every insert into the intake table: rows are taken at once, and the
    // poll stays as the safety net for a notification lost with a connection.
    let mut listener = store.intake_listener().await;
    let mut watching = true;
    loop {
        let due_at = due.unwrap_or_else(|| tokio::time::Instant::now() + cfg.rescan_interval);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = rescan.tick() => due = scan(&store, &mut spool, &mut failing, &cancel).await,
            Some(()) = wake_rx.recv() => due = scan(&store, &mut spool, &mut failing, &cancel).await,
            _ = tokio::time::sleep_until(due_at), if due.is_some() => {
                due = scan(&store, &mut spool, &mut failing, &cancel).await;
            }
            _ = poll.tick(), if *table.borrow() => poll_table(&store).await,
            _ = notified(&mut listener), if *table.borrow() => poll_table(&store).await,
            changed = table.changed(), if watching => {
                if changed.is_err() {
                    // The owner is gone: its last word stands.
                    watching = false;
                    continue;
                }
                if *table.borrow_and_update() {
                    poll_table(&store).await;
                }
            }
            changed = health.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = health.borrow_and_update().clone();
                match now {
                    // Writes work again: take what waited at once, not at the next tick.
                    Health::Ok => {
                        due = scan(&store, &mut spool, &mut failing, &cancel).await;
                        if *table.borrow() {
                            poll_table(&store).await;
                        }
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

/// The next intake notification; never, without a listener.
async fn notified(listener: &mut Option<crate::store::IntakeListener>) {
    match listener {
        Some(l) => l.recv().await,
        None => std::future::pending().await,
    }
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

/// One scan; returns when the next is due for files still settling or waiting for a retry. A
/// spool folder that cannot be listed is logged once per distinct error, and once when it can be
/// again (`failing` carries the last error). While the database refuses writes nothing is
/// scanned: the health change back to Ok scans at once.
async fn scan(
    store: &Store,
    spool: &mut spool::Spool,
    failing: &mut Option<String>,
    cancel: &CancellationToken,
) -> Option<tokio::time::Instant> {
    if store_waits(store) {
        return None;
    }
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
            if store_waits(store) {
                tracing::debug!(error = %e, "spool scan failed while the database refuses writes");
            } else if failing.as_deref() != Some(text.as_str()) {
                tracing::warn!(spool = %spool.dir().display(), error = %e, "spool scan failed; retrying at every rescan (logged again only if the error changes)");
                *failing = Some(text);
            }
            None
        }
    }
}
