//! Waiting out an outage of Tencent: while requests fail for reasons that are not any message's
//! fault (connections refused or reset, timeouts, HTTP 5xx, "internal error, retry" codes), no
//! message is failed for it and the whole daemon waits.
//!
//! Every request outcome of the engine is reported here ([`Outage::observe`]). After
//! [`DECLARE_AFTER`] transient failures in a row, spread over at least [`DECLARE_SPAN`], the
//! daemon is *waiting for Tencent*: it says so once (with since when and why), every lane holds
//! before its next request ([`Outage::admit`]), and one probe request goes out at a time, spaced
//! by a capped exponential backoff ([`PROBE_FIRST`] doubling up to [`PROBE_MAX`]). The first
//! answer from a working service (any answer that is not transient, a rate limit included) ends
//! the wait and wakes every lane, however long the outage lasted.
//!
//! Stopping and recovery: no task and no I/O; `admit` is cancel-safe and wakes on
//! [`Outage::end`] at shutdown. The clock is injectable (`*_at`) for deterministic tests. State
//! is per process: a restart starts optimistic and learns the outage again from its first
//! requests.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::store::unix_now;
use crate::tencent::{ApiError, ErrorClass};

/// Transient failures in a row before the daemon waits as a whole.
pub const DECLARE_AFTER: u32 = 5;
/// ... and the least time they must span (a burst of unlucky answers is not an outage).
pub const DECLARE_SPAN: Duration = Duration::from_secs(1);
/// First pause between probes, doubled after each failed probe.
pub const PROBE_FIRST: Duration = Duration::from_secs(1);
/// Longest pause between probes.
pub const PROBE_MAX: Duration = Duration::from_secs(30);

/// Whether an outcome says anything about the service being there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The service answered as a working service does.
    Reachable,
    /// Nothing or a failure that is not the request's fault: refused, reset, timeout, 5xx,
    /// internal or timeout codes.
    Transient,
}

impl Seen {
    /// How a request's result counts.
    pub fn of<T>(r: &Result<T, ApiError>) -> Seen {
        match r {
            Ok(_) => Seen::Reachable,
            Err(e) if e.import_results.as_ref().is_some_and(|r| !r.is_empty()) => Seen::Reachable,
            Err(e) => match e.write_class() {
                ErrorClass::Retryable | ErrorClass::Unknown => Seen::Transient,
                _ => Seen::Reachable,
            },
        }
    }
}

/// The daemon-wide wait, as `timport status` and the progress line show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Waiting {
    /// Unix seconds of the first failure of the run that made it an outage.
    pub since: i64,
    /// The latest failure, e.g. "import_group_msg: could not connect (not sent): ...".
    pub reason: String,
}

#[derive(Debug, Default)]
struct State {
    /// Transient failures since the last reachable answer.
    in_a_row: u32,
    /// First of them (monotonic, Unix seconds).
    first: Option<(Instant, i64)>,
    last_reason: String,
    /// Declared: lanes hold; one probe per `probe_delay`.
    waiting: bool,
    next_probe: Option<Instant>,
    probe_delay: Duration,
}

/// Shared by every lane.
#[derive(Debug, Default)]
pub struct Outage {
    state: Mutex<State>,
    wake: Notify,
}

impl Outage {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The wait in force, if any.
    pub fn waiting(&self) -> Option<Waiting> {
        let st = self.lock();
        st.waiting.then(|| Waiting {
            since: st.first.map(|f| f.1).unwrap_or_else(unix_now),
            reason: st.last_reason.clone(),
        })
    }

    /// Reports a request's result.
    pub fn observe<T>(&self, r: &Result<T, ApiError>) {
        match (Seen::of(r), r) {
            (Seen::Transient, Err(e)) => {
                self.transient_at(Instant::now(), unix_now(), &e.to_string())
            }
            _ => self.reachable_at(Instant::now()),
        }
    }

    /// A transient failure at `now` (`unix`: the same instant in Unix seconds).
    pub fn transient_at(&self, now: Instant, unix: i64, reason: &str) {
        let mut st = self.lock();
        st.in_a_row = st.in_a_row.saturating_add(1);
        let first = *st.first.get_or_insert((now, unix));
        st.last_reason = reason.to_string();
        if st.waiting {
            // A failed probe: wait longer before the next.
            st.probe_delay = (st.probe_delay * 2).min(PROBE_MAX);
            st.next_probe = Some(now + st.probe_delay);
        } else if st.in_a_row >= DECLARE_AFTER
            && now.saturating_duration_since(first.0) >= DECLARE_SPAN
        {
            st.waiting = true;
            st.probe_delay = PROBE_FIRST;
            st.next_probe = Some(now + PROBE_FIRST);
            metrics::gauge!("timport_tencent_unreachable").set(1.0);
            metrics::gauge!("timport_tencent_unreachable_since_seconds").set(first.1 as f64);
            tracing::warn!(
                since = first.1,
                failures = st.in_a_row,
                reason = %st.last_reason,
                "Tencent is unreachable or failing; every lane waits (no message is failed for it), probing with backoff"
            );
        }
    }

    /// A reachable answer at `now`: the wait, if any, is over.
    pub fn reachable_at(&self, now: Instant) {
        let mut st = self.lock();
        if st.in_a_row == 0 && !st.waiting {
            return;
        }
        if st.waiting {
            let lasted = st
                .first
                .map(|f| now.saturating_duration_since(f.0))
                .unwrap_or_default();
            tracing::info!(
                waited = %humantime::format_duration(Duration::from_secs(lasted.as_secs())),
                "Tencent answers again; lanes go on"
            );
            metrics::gauge!("timport_tencent_unreachable").set(0.0);
            metrics::counter!("timport_tencent_outages_total").increment(1);
        }
        *st = State::default();
        drop(st);
        self.wake.notify_waiters();
    }

    /// Whether a request may start at `now`: always outside a wait; during one, only a probe
    /// whose turn has come (it takes the turn, so the next waits a whole probe delay). `Err` is
    /// how long to wait before asking again.
    pub fn try_admit_at(&self, now: Instant) -> Result<(), Duration> {
        let mut st = self.lock();
        if !st.waiting {
            return Ok(());
        }
        match st.next_probe {
            Some(t) if t > now => Err(t - now),
            _ => {
                st.next_probe = Some(now + st.probe_delay);
                Ok(())
            }
        }
    }

    /// Waits until a request may start (see [`Outage::try_admit_at`]).
    pub async fn admit(&self) {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_admit_at(Instant::now()) {
                Ok(()) => return,
                Err(wait) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Wakes every waiter (shutdown: they re-check and see the stop).
    pub fn end(&self) {
        self.reachable_at(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_failures_are_not_an_outage() {
        let o = Outage::new();
        let t0 = Instant::now();
        for i in 0..10 {
            // Ten failures within half a second: no wait yet (the span is too short).
            o.transient_at(t0 + Duration::from_millis(50 * i), 100, "reset");
        }
        assert!(o.waiting().is_none());
        assert_eq!(o.try_admit_at(t0), Ok(()));
        // A reachable answer starts the count again.
        o.reachable_at(t0 + Duration::from_millis(600));
        for i in 0..4 {
            o.transient_at(t0 + Duration::from_secs(2 + i), 102, "reset");
        }
        assert!(
            o.waiting().is_none(),
            "four in a row is below the threshold"
        );
    }

    #[test]
    fn an_outage_holds_every_lane_and_probes_with_a_capped_backoff() {
        let o = Outage::new();
        let t0 = Instant::now();
        for i in 0..5 {
            o.transient_at(
                t0 + Duration::from_millis(300 * i),
                1000,
                "could not connect",
            );
        }
        let declared = t0 + Duration::from_millis(1200);
        let w = o.waiting().expect("declared");
        assert_eq!(w.since, 1000);
        assert_eq!(w.reason, "could not connect");
        // Nobody goes before the first probe delay.
        assert_eq!(o.try_admit_at(declared), Err(PROBE_FIRST));
        // One probe at its time; the next waits a whole delay.
        let first_probe = declared + PROBE_FIRST;
        assert_eq!(o.try_admit_at(first_probe), Ok(()));
        assert_eq!(o.try_admit_at(first_probe), Err(PROBE_FIRST));
        // Each failed probe doubles the pause, up to the cap.
        let mut now = first_probe;
        let mut expect = PROBE_FIRST;
        for _ in 0..10 {
            o.transient_at(now, 1000, "HTTP status 502");
            expect = (expect * 2).min(PROBE_MAX);
            assert_eq!(o.try_admit_at(now), Err(expect));
            now += expect;
            assert_eq!(o.try_admit_at(now), Ok(()));
        }
        assert_eq!(expect, PROBE_MAX);
        assert_eq!(
            o.waiting().expect("still waiting").reason,
            "HTTP status 502"
        );
        // A reachable answer ends it for everyone.
        o.reachable_at(now);
        assert!(o.waiting().is_none());
        assert_eq!(o.try_admit_at(now), Ok(()));
        assert_eq!(o.try_admit_at(now), Ok(()));
    }

    #[tokio::test]
    async fn waiters_wake_when_the_service_answers() {
        let o = std::sync::Arc::new(Outage::new());
        let t0 = Instant::now() - Duration::from_secs(10);
        for i in 0..5 {
            o.transient_at(t0 + Duration::from_secs(i), 1, "timeout");
        }
        // Push the probe far out: only a reachable answer can let the waiter go.
        for _ in 0..10 {
            o.transient_at(Instant::now(), 1, "timeout");
        }
        let waiter = {
            let o = o.clone();
            tokio::spawn(async move { o.admit().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        o.reachable_at(Instant::now());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("no panic");
    }
}
