//! systemd integration: `READY=1` once the database is migrated and writable, `WATCHDOG=1` from the
//! engine's own scheduling loop (so a wedged engine is restarted, not kept alive by a timer),
//! `STOPPING=1` on shutdown, and `STATUS=` lines. Every call is a no-op outside systemd
//! (no `NOTIFY_SOCKET`), and a failed notification is logged, never fatal.
//!
//! The store's health shows in `STATUS=` ([`follow_health`]). While the database refuses writes
//! the watchdog goes on: the daemon is waiting for the operator and resumes by itself, and a
//! restart would meet the same full disk. A corrupt, deleted or replaced database stops the
//! engine's loop, and with it the watchdog, and the process exits non-zero.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::store::Health;

/// Tells systemd the service is ready.
pub fn ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("importing")]);
}

/// Tells systemd the service is stopping.
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// A free-form status line (`systemctl status`).
pub fn status(text: &str) {
    notify(&[NotifyState::Status(text)]);
}

fn notify(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "systemd notification failed");
    }
}

/// Sends `WATCHDOG=1` at most every half watchdog period. Call it from the loop whose progress
/// should keep the service alive.
pub fn watchdog_tick() {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let half = period / 2;
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if last.is_none_or(|t| t.elapsed() >= half.min(Duration::from_secs(30))) {
        *last = Some(Instant::now());
        notify(&[NotifyState::Watchdog]);
    }
}

/// Mirrors the store's health into `STATUS=` until `stop` fires.
pub async fn follow_health(
    mut health: tokio::sync::watch::Receiver<Health>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            // A change that came with the stop (a corrupt file stops everything) is still said.
            biased;
            changed = health.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = stop.cancelled() => return,
        }
        let now = health.borrow_and_update().clone();
        match now {
            Health::Ok => status("importing"),
            Health::WritesRefused { cause, .. } => {
                status(&format!("waiting: the database refuses writes: {cause}"))
            }
            Health::Stopped { reason } => status(&format!("stopped: {reason}")),
        }
    }
}
