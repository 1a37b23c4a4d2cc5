//! systemd integration: `READY=1` once the database is migrated and writable, `WATCHDOG=1` from the
//! engine's own scheduling loop (so a wedged engine is restarted, not kept alive by a timer),
//! `STOPPING=1` on shutdown, and `STATUS=` lines. Every call is a no-op outside systemd
//! (no `NOTIFY_SOCKET`), and a failed notification is logged, never fatal.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

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
