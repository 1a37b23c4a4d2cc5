//! The app-wide request pacer: one token bucket (governor) shared by every request to Tencent,
//! with adaptive slow-down when the service answers with a rate-limit code.
//!
//! Role: [`Pacer::acquire`] is awaited before each request, so the daemon never exceeds the
//! configured quota (default 200 requests/s per SDKAppID). [`Pacer::on_rate_limited`] cuts the
//! rate multiplicatively (×0.7, floor 1/s, at most once per second so a burst of answers counts
//! once); every second without a rate-limit answer gives back 5 % of the maximum
//! ([`Pacer::on_success`] and `acquire` apply that recovery step), up to the maximum.
//!
//! The bucket allows a burst of [`BURST_MS`] worth of requests (4 at 200/s): starts are spaced at
//! `1 / rate` on average, and a waiter woken a little late by the timer does not lose its slot
//! (with a burst of one, timer lateness alone cost about 4% of the quota). No one-second window
//! sees more than `rate + burst` starts.
//!
//! Stopping and recovery: the pacer holds no task and no I/O; `acquire` is cancel-safe (dropping
//! the future gives nothing back and takes nothing). A rate change swaps the limiter; waiters on
//! the old one re-check and wait on the new one. The clock is injectable through the `*_at`
//! methods, which tests use to check decrease and recovery deterministically. The current rate is
//! exported as the gauge `timport_pacing_rate`.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Factor applied to the rate on a rate-limit answer.
pub const DECREASE_FACTOR: f64 = 0.7;
/// Lowest rate the pacer goes down to, requests/s.
pub const MIN_RATE: f64 = 1.0;
/// Share of the maximum given back per second without rate limits.
pub const RECOVERY_SHARE_PER_SEC: f64 = 0.05;
/// Minimum time between two decreases.
pub const DECREASE_COOLDOWN: Duration = Duration::from_secs(1);

const GAUGE: &str = "timport_pacing_rate";

struct State {
    rate: f64,
    limiter: Arc<DefaultDirectRateLimiter>,
    last_decrease: Option<Instant>,
    /// Start of the current recovery second: the last rate-limit answer or the last step.
    last_step: Instant,
}

/// Shared request pacer; wrap it in an `Arc` and hand it to every client.
pub struct Pacer {
    max_rate: f64,
    state: Mutex<State>,
    /// Waiters queue here (FIFO) so only one at a time waits on the limiter: with dozens of lanes
    /// waiting on governor directly, every freed slot would wake all of them to find one winner.
    queue: tokio::sync::Mutex<()>,
    /// Requests waiting for their turn (the quota, not latency, is what holds them).
    waiting: AtomicUsize,
}

struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacer")
            .field("max_rate", &self.max_rate)
            .field("current_rate", &self.current_rate())
            .finish()
    }
}

/// Milliseconds of requests the bucket may hold.
pub const BURST_MS: f64 = 20.0;

fn burst_for(rate: f64) -> NonZeroU32 {
    let n = (rate * BURST_MS / 1000.0).floor();
    NonZeroU32::new(n.clamp(1.0, 1000.0) as u32).unwrap_or(NonZeroU32::MIN)
}

fn limiter_for(rate: f64) -> Arc<DefaultDirectRateLimiter> {
    let period = Duration::from_secs_f64(1.0 / rate.max(MIN_RATE));
    // `with_period` only fails on a zero period, which a rate ≤ max u32 cannot produce.
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst_for(rate));
    Arc::new(RateLimiter::direct(quota))
}

impl Pacer {
    /// A pacer at `max_requests_per_second` (0 is treated as 1).
    pub fn new(max_requests_per_second: u32) -> Self {
        Self::new_at(max_requests_per_second, Instant::now())
    }

    /// Like [`Pacer::new`] with an explicit clock reading.
    pub fn new_at(max_requests_per_second: u32, now: Instant) -> Self {
        let max_rate = f64::from(max_requests_per_second.max(1));
        metrics::gauge!(GAUGE).set(max_rate);
        Pacer {
            max_rate,
            state: Mutex::new(State {
                rate: max_rate,
                limiter: limiter_for(max_rate),
                last_decrease: None,
                last_step: now,
            }),
            queue: tokio::sync::Mutex::new(()),
            waiting: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent under a panic (plain assignments), so poison is harmless.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The configured maximum, requests/s.
    pub fn max_rate(&self) -> f64 {
        self.max_rate
    }

    /// The rate in force, requests/s.
    pub fn current_rate(&self) -> f64 {
        self.lock().rate
    }

    fn set_rate(&self, st: &mut State, rate: f64) {
        if rate != st.rate {
            st.rate = rate;
            st.limiter = limiter_for(rate);
            metrics::gauge!(GAUGE).set(rate);
        }
    }

    /// Requests waiting in [`Pacer::acquire`] right now: above zero, the quota is what limits
    /// the import, so a short extra delay of one lane costs no throughput.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Wait until one request may start.
    pub async fn acquire(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        self.recover_at(Instant::now());
        let _turn = self.queue.lock().await;
        loop {
            let limiter = self.lock().limiter.clone();
            // Wait on tokio's timer, not governor's `until_ready` (futures-timer's own thread:
            // two extra thread wake-ups per request).
            while let Err(not_until) = limiter.check() {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(limiter.clock()));
                tokio::time::sleep(wait).await;
            }
            if Arc::ptr_eq(&limiter, &self.lock().limiter) {
                return;
            }
            // The rate changed while we waited: obey the new limiter (the slot taken on the old
            // one is simply not used).
        }
    }

    /// The service answered with a rate-limit code.
    pub fn on_rate_limited(&self) {
        self.on_rate_limited_at(Instant::now());
    }

    /// [`Pacer::on_rate_limited`] at `now`. Returns whether the rate was lowered (false inside
    /// the one-second cooldown after the previous decrease).
    pub fn on_rate_limited_at(&self, now: Instant) -> bool {
        let mut st = self.lock();
        st.last_step = now;
        if let Some(prev) = st.last_decrease
            && now.saturating_duration_since(prev) < DECREASE_COOLDOWN
        {
            return false;
        }
        st.last_decrease = Some(now);
        let rate = (st.rate * DECREASE_FACTOR).max(MIN_RATE);
        self.set_rate(&mut st, rate);
        true
    }

    /// A request went through without a rate-limit answer: apply any due recovery.
    pub fn on_success(&self) {
        self.recover_at(Instant::now());
    }

    /// Recovery step at `now`: +5 % of the maximum for every whole second since the last
    /// rate-limit answer (or the last step), capped at the maximum. Returns the rate after it.
    pub fn recover_at(&self, now: Instant) -> f64 {
        let mut st = self.lock();
        if st.rate >= self.max_rate {
            st.last_step = now;
            return st.rate;
        }
        let steps = now.saturating_duration_since(st.last_step).as_secs();
        if steps == 0 {
            return st.rate;
        }
        st.last_step += Duration::from_secs(steps);
        let rate =
            (st.rate + steps as f64 * RECOVERY_SHARE_PER_SEC * self.max_rate).min(self.max_rate);
        self.set_rate(&mut st, rate);
        rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decrease_once_per_second_then_recover() {
        let t0 = Instant::now();
        let p = Pacer::new_at(200, t0);
        assert_eq!(p.current_rate(), 200.0);
        assert!(p.on_rate_limited_at(t0));
        assert!((p.current_rate() - 140.0).abs() < 1e-9);
        // A burst of answers inside the cooldown counts once.
        assert!(!p.on_rate_limited_at(t0 + Duration::from_millis(300)));
        assert!((p.current_rate() - 140.0).abs() < 1e-9);
        // The rate-limit answer at +300 ms restarted the recovery clock.
        assert!((p.recover_at(t0 + Duration::from_millis(1200)) - 140.0).abs() < 1e-9);
        assert!((p.recover_at(t0 + Duration::from_millis(1300)) - 150.0).abs() < 1e-9);
        assert!((p.recover_at(t0 + Duration::from_millis(3300)) - 170.0).abs() < 1e-9);
        assert!((p.recover_at(t0 + Duration::from_secs(60)) - 200.0).abs() < 1e-9);
    }

    #[test]
    fn floor_is_one() {
        let t0 = Instant::now();
        let p = Pacer::new_at(2, t0);
        for i in 0..10 {
            p.on_rate_limited_at(t0 + Duration::from_secs(2 * i));
        }
        assert_eq!(p.current_rate(), MIN_RATE);
    }

    #[tokio::test]
    async fn acquire_returns() {
        let p = Pacer::new(1000);
        for _ in 0..3 {
            p.acquire().await;
        }
    }
}
