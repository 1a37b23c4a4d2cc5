//! Whether the database takes writes ([`Health`]), shared by every clone of a store and by both
//! backends. A failed statement classified as a write refusal (a full disk, a read-only file, a
//! lost PostgreSQL connection) is logged once and starts a probe that retries a small write with
//! backoff from [`PROBE_FIRST`] to [`PROBE_MAX`]; the next committed write, the probe's or anyone's,
//! clears it with one log line. A fatal error stops the store for good. The probe task ends when
//! writes work again, the store stops, or the store is closed.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::{StoreError, unix_now};

/// Whether the database takes writes, shared by every clone of a [`Store`] and set by the store
/// itself: any failed statement classified as a write refusal or as fatal changes it, and the
/// next committed write (the store's own probe, with backoff, or anyone's) clears a refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Health {
    Ok,
    /// Writes fail for a reason the operator can fix (`cause` names it); retried with backoff.
    WritesRefused {
        cause: String,
        since: i64,
    },
    /// Corrupt, deleted or replaced: the daemon must stop (`reason` says what to do).
    Stopped {
        reason: String,
    },
}

/// First wait of the write probe after writes start failing; it doubles up to [`PROBE_MAX`].
pub const PROBE_FIRST: Duration = Duration::from_secs(1);

/// Longest wait between two write probes.
pub const PROBE_MAX: Duration = Duration::from_secs(30);

/// The shared cell behind [`Health`].
#[derive(Debug)]
pub(crate) struct HealthCell {
    tx: tokio::sync::watch::Sender<Health>,
    /// A probe task is running.
    probing: AtomicBool,
    /// The probe's next wait, and when writes last recovered: a refusal soon after a recovery
    /// (a probe that fit in the WAL while the disk is still full) goes on from the wait reached,
    /// so the log does not flap.
    backoff: std::sync::Mutex<(Duration, Option<std::time::Instant>)>,
}

impl HealthCell {
    pub(crate) fn new() -> Arc<HealthCell> {
        Arc::new(HealthCell {
            tx: tokio::sync::watch::Sender::new(Health::Ok),
            probing: AtomicBool::new(false),
            backoff: std::sync::Mutex::new((PROBE_FIRST, None)),
        })
    }

    pub(crate) fn get(&self) -> Health {
        self.tx.borrow().clone()
    }

    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<Health> {
        self.tx.subscribe()
    }

    pub(crate) fn writes_refused(&self) -> Option<String> {
        match &*self.tx.borrow() {
            Health::WritesRefused { cause, .. } => Some(cause.clone()),
            _ => None,
        }
    }

    pub(crate) fn stopped(&self) -> Option<String> {
        match &*self.tx.borrow() {
            Health::Stopped { reason } => Some(reason.clone()),
            _ => None,
        }
    }

    /// Records what `e` says about database `db` (its path, or its redacted URL): fatal stops
    /// the store for good; a write refusal is logged once. Returns true when a refusal began
    /// now, and the caller must then start the probe ([`HealthCell::start_probe`]).
    pub(crate) fn note_error(&self, db: &str, e: &StoreError) -> bool {
        if e.is_fatal() {
            let reason = e.to_string();
            let changed = self.tx.send_if_modified(|h| {
                if matches!(h, Health::Stopped { .. }) {
                    return false;
                }
                *h = Health::Stopped {
                    reason: reason.clone(),
                };
                true
            });
            if changed {
                // Said once, as an error, by whoever stops on it (the engine, a command).
                tracing::debug!(database = %db, error = %reason, "database unusable");
            }
            return false;
        }
        let Some(kind) = e.write_refusal() else {
            return false;
        };
        let cause = e.to_string();
        let changed = self.tx.send_if_modified(|h| {
            if !matches!(h, Health::Ok) {
                return false;
            }
            *h = Health::WritesRefused {
                cause: cause.clone(),
                since: unix_now(),
            };
            true
        });
        if changed {
            tracing::warn!(database = %db, kind, error = %cause, "the database refuses writes; intake and import wait, and a write is retried with backoff (1 s to 30 s) until it works");
        }
        changed
    }

    /// A write committed: a refusal is over.
    pub(crate) fn note_written(&self, db: &str) {
        let mut since = 0;
        let changed = self.tx.send_if_modified(|h| match h {
            Health::WritesRefused { since: s, .. } => {
                since = *s;
                *h = Health::Ok;
                true
            }
            _ => false,
        });
        if changed {
            if let Ok(mut b) = self.backoff.lock() {
                b.1 = Some(std::time::Instant::now());
            }
            tracing::info!(database = %db, refused_for_s = unix_now() - since, "the database accepts writes again; intake and import resume");
        }
    }

    /// Probes with `probe` (a small write; `None` when the store is closed), with backoff, until
    /// writes work, the store stops, or it is closed. One probe task at a time.
    pub(crate) fn start_probe<F, Fut>(self: &Arc<Self>, probe: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Option<bool>> + Send,
    {
        if self.probing.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.probing.store(false, Ordering::SeqCst);
            return;
        };
        let cell = self.clone();
        rt.spawn(async move {
            loop {
                let mut wait = {
                    let b = cell
                        .backoff
                        .lock()
                        .map(|b| *b)
                        .unwrap_or((PROBE_FIRST, None));
                    match b.1 {
                        Some(at) if at.elapsed() < PROBE_MAX * 2 => b.0,
                        _ => PROBE_FIRST,
                    }
                };
                let mut closed = false;
                loop {
                    tokio::time::sleep(wait).await;
                    if !matches!(cell.get(), Health::WritesRefused { .. }) {
                        break;
                    }
                    let ok = match probe().await {
                        Some(ok) => ok,
                        None => {
                            closed = true;
                            break;
                        }
                    };
                    wait = (wait * 2).min(PROBE_MAX);
                    if let Ok(mut b) = cell.backoff.lock() {
                        b.0 = wait;
                    }
                    if ok {
                        break;
                    }
                }
                cell.probing.store(false, Ordering::SeqCst);
                // A refusal that came back while this task was ending needs a probe of its own.
                if closed
                    || !matches!(cell.get(), Health::WritesRefused { .. })
                    || cell.probing.swap(true, Ordering::SeqCst)
                {
                    return;
                }
            }
        });
    }
}
