//! The app-wide request pacer: one schedule of request starts shared by every request to
//! Tencent, built to reach the full quota under any way the server may count it.
//!
//! Role: [`Pacer::acquire`] is awaited before each request and hands out the start slot; the
//! client reports rate-limit answers with that slot ([`Pacer::on_rate_limited`]). The docs say
//! "200 calls/s" without saying how they are counted (token bucket, fixed one-second windows or
//! a sliding window of the last second of arrivals, see `tencent-api.md` §9), and the real quota
//! may be lower than the configured one. So:
//!
//! - Starts are evenly spaced at the *target*, [`MARGIN`] (0.5%) below the *ceiling* (initially
//!   the configured maximum): no bursts, and no catch-up after idle (a start after a pause is
//!   "now", the next one a full spacing later). A waiter woken a little late by the timer keeps
//!   its slot on the grid (up to half a spacing), so timer lateness costs no throughput.
//! - The pacer keeps its own log of starts and never lets more than the ceiling start inside any
//!   window of one second plus the margin. That mirrors a strict sliding limiter which also
//!   counts refused arrivals, and holds the schedule back after the ceiling is lowered.
//! - A single rate-limit answer means the server's window is fuller than ours (jitter bunched
//!   arrivals, or another client), not that the quota shrank: the next start skips one slot and
//!   the ceiling stays.
//! - Repeated answers (two or more within [`REPEAT_WINDOW`]) set the ceiling to what the server
//!   actually accepted in the second before the refused run began (starts minus rate-limited
//!   ones), at most halving it per answer. Every further answer recomputes it, so the estimate
//!   keeps converging while a token bucket that started full drains.
//! - Without answers, the ceiling probes back up: after a quiet [`PROBE_AFTER`] it rises by 1%
//!   of the maximum; a raise that draws no answer within [`PROBE_CONFIRM`] is kept and the next
//!   step doubles (back to the maximum within seconds once a lower limit is gone). A rate-limit
//!   answer during that second retracts the raise and doubles the quiet time before the next
//!   probe, up to [`PROBE_AFTER_MAX`], so a steady lower quota costs few refused requests.
//!
//! The core is a pure state machine on an injected clock ([`Pacer::try_start_at`],
//! [`Pacer::on_rate_limited_at`], [`Pacer::probe_at`]), which the tests drive deterministically,
//! including against the simulator's three limiters.
//!
//! Stopping and recovery: the pacer holds no task and no I/O. `acquire` is cancel-safe: waiters
//! queue FIFO, and a slot is taken only at the moment `acquire` returns, so dropping the future
//! takes nothing. A restart begins again at the configured maximum (and re-learns a lower quota
//! within about a second). The ceiling is exported as the gauge `timport_pacing_rate`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Share of the ceiling left unused: the target rate is `ceiling × (1 − MARGIN)`.
pub const MARGIN: f64 = 0.005;
/// Lowest ceiling, requests/s.
pub const MIN_RATE: f64 = 1.0;
/// The window of the server's count that the pacer mirrors.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Two rate-limit answers within this much are "repeated" and lower the ceiling.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(1);
/// A lowered ceiling is at least this share of the previous one, per answer.
pub const MAX_CUT: f64 = 0.5;
/// Quiet time after a rate-limit answer before the first probe upwards.
pub const PROBE_AFTER: Duration = Duration::from_secs(2);
/// The longest quiet time before a probe, after probes that kept failing.
pub const PROBE_AFTER_MAX: Duration = Duration::from_secs(16);
/// A raise that draws no rate-limit answer for this long is kept.
pub const PROBE_CONFIRM: Duration = Duration::from_secs(1);
/// The first probe step, as a share of the maximum; it doubles with each kept raise.
pub const PROBE_STEP: f64 = 0.01;
/// How long starts stay in the log (answers can come back seconds late).
const LOG_KEEP: Duration = Duration::from_secs(5);

const GAUGE: &str = "timport_pacing_rate";

/// What a rate-limit answer did to the pacer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reaction {
    /// The ceiling stayed; the next start skips one slot.
    SkippedSlot,
    /// A probe above the last good ceiling failed: back to it.
    Retracted(f64),
    /// Repeated answers: the ceiling is now what the server accepted.
    Learned(f64),
}

#[derive(Debug, Clone, Copy)]
struct Start {
    at: Instant,
    limited: bool,
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    at: Instant,
    from: f64,
}

/// The clock-free state machine.
#[derive(Debug)]
struct Core {
    /// The configured maximum; `max` is this less any share reserved by another process.
    configured: f64,
    max: f64,
    ceiling: f64,
    /// Starts of the last [`LOG_KEEP`], oldest first, strictly increasing.
    log: VecDeque<Start>,
    /// No start before this (a skipped slot).
    hold: Option<Instant>,
    /// Arrival times of the rate-limit answers of the last [`REPEAT_WINDOW`].
    answers: VecDeque<Instant>,
    last_answer: Option<Instant>,
    /// A raise under test.
    probe: Option<Probe>,
    /// The last raise was kept: raise again without waiting.
    climbing: bool,
    step: f64,
    quiet: Duration,
}

fn spacing(ceiling: f64) -> Duration {
    Duration::from_secs_f64(1.0 / (ceiling * (1.0 - MARGIN)))
}

impl Core {
    fn new(max: f64) -> Self {
        Core {
            configured: max,
            max,
            ceiling: max,
            log: VecDeque::new(),
            hold: None,
            answers: VecDeque::new(),
            last_answer: None,
            probe: None,
            climbing: false,
            step: max * PROBE_STEP,
            quiet: PROBE_AFTER,
        }
    }

    fn prune(&mut self, now: Instant) {
        while self.log.front().is_some_and(|s| s.at + LOG_KEEP < now) {
            self.log.pop_front();
        }
    }

    /// The earliest slot for the next start (possibly a little before `now`: a waiter woken
    /// late keeps its slot).
    fn earliest(&self, now: Instant) -> Instant {
        let mut t = match self.log.back() {
            Some(last) => last.at + spacing(self.ceiling),
            None => now,
        };
        if let Some(h) = self.hold {
            t = t.max(h);
        }
        // No more than `ceiling` starts inside any window of 1 s + margin.
        let n = (self.ceiling.floor() as usize).max(1);
        let span = WINDOW.mul_f64(1.0 + MARGIN);
        let inside = self.log.len() - self.log.partition_point(|s| s.at + span <= t);
        if inside >= n {
            t = t.max(self.log[self.log.len() - n].at + span);
        }
        t
    }

    fn try_start(&mut self, now: Instant) -> Result<Instant, Instant> {
        self.probe(now);
        self.prune(now);
        let earliest = self.earliest(now);
        if now < earliest {
            return Err(earliest);
        }
        // On the grid when woken a little late; after idle, now (no catch-up).
        let start = if now - earliest <= spacing(self.ceiling) / 2 {
            earliest
        } else {
            now
        };
        self.hold = None;
        self.log.push_back(Start {
            at: start,
            limited: false,
        });
        Ok(start)
    }

    fn probe(&mut self, now: Instant) {
        if let Some(p) = self.probe
            && now.saturating_duration_since(p.at) >= PROBE_CONFIRM
        {
            self.probe = None;
            self.climbing = true;
            self.step = (self.step * 2.0).min(self.max);
            self.quiet = PROBE_AFTER;
        }
        if self.probe.is_some() || self.ceiling >= self.max {
            return;
        }
        let due = self.climbing
            || self
                .last_answer
                .is_none_or(|a| now.saturating_duration_since(a) >= self.quiet);
        if due {
            self.probe = Some(Probe {
                at: now,
                from: self.ceiling,
            });
            self.ceiling = (self.ceiling + self.step).min(self.max);
        }
    }

    /// What the server accepted in the second before the refused run that `start` ends.
    fn accepted_before(&self, start: Instant) -> Option<f64> {
        let mut i = self.log.partition_point(|s| s.at < start);
        if self.log.get(i).is_none_or(|s| s.at != start) {
            return None;
        }
        while i > 0 && self.log[i - 1].limited {
            i -= 1;
        }
        let run = self.log[i].at;
        let from = self.log.partition_point(|s| s.at + WINDOW <= run);
        Some(self.log.range(from..i).filter(|s| !s.limited).count() as f64)
    }

    fn on_rate_limited(&mut self, now: Instant, start: Instant) -> Reaction {
        self.probe(now);
        let i = self.log.partition_point(|s| s.at < start);
        if let Some(s) = self.log.get_mut(i)
            && s.at == start
        {
            s.limited = true;
        }
        while self
            .answers
            .front()
            .is_some_and(|a| *a + REPEAT_WINDOW <= now)
        {
            self.answers.pop_front();
        }
        self.answers.push_back(now);
        self.last_answer = Some(now);
        self.climbing = false;
        self.step = self.max * PROBE_STEP;
        if let Some(p) = self.probe.take() {
            self.ceiling = p.from;
            self.quiet = (self.quiet * 2).min(PROBE_AFTER_MAX);
            return Reaction::Retracted(self.ceiling);
        }
        if self.answers.len() >= 2
            && let Some(accepted) = self.accepted_before(start)
        {
            let c = accepted.max(self.ceiling * MAX_CUT).max(MIN_RATE);
            if c < self.ceiling {
                self.ceiling = c;
                return Reaction::Learned(c);
            }
        }
        let next = self
            .log
            .back()
            .map_or(now, |l| (l.at + spacing(self.ceiling)).max(now));
        self.hold = Some(next + spacing(self.ceiling));
        Reaction::SkippedSlot
    }
}

/// Shared request pacer; wrap it in an `Arc` and hand it to every client.
pub struct Pacer {
    core: Mutex<Core>,
    /// Waiters queue here (FIFO) so only one at a time waits for the next slot.
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
            .field("max_rate", &self.max_rate())
            .field("current_rate", &self.current_rate())
            .finish()
    }
}

impl Pacer {
    /// A pacer at `max_requests_per_second` (0 is treated as 1).
    pub fn new(max_requests_per_second: u32) -> Self {
        let max = f64::from(max_requests_per_second.max(1));
        metrics::gauge!(GAUGE).set(max);
        Pacer {
            core: Mutex::new(Core::new(max)),
            queue: tokio::sync::Mutex::new(()),
            waiting: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // Every method leaves the core consistent between statements, so poison is harmless.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` on the core; publish the ceiling if it moved.
    fn with<T>(&self, f: impl FnOnce(&mut Core) -> T) -> T {
        let mut core = self.lock();
        let before = core.ceiling;
        let out = f(&mut core);
        if core.ceiling != before {
            metrics::gauge!(GAUGE).set(core.ceiling);
        }
        out
    }

    /// The configured maximum, requests/s.
    pub fn max_rate(&self) -> f64 {
        self.lock().max
    }

    /// The ceiling in force, requests/s (starts run [`MARGIN`] below it).
    pub fn current_rate(&self) -> f64 {
        self.lock().ceiling
    }

    /// Reserves `reserved` requests/s of the configured maximum for another process sharing the
    /// quota (a running `timport verify`, see `engine::share`): the maximum becomes the
    /// configured one less `reserved` (at least [`MIN_RATE`]), and the ceiling at most that; 0
    /// gives the share back (a ceiling that was at the maximum follows it up at once). The start
    /// log's window rule holds the lowered ceiling from the next start on. Returns the maximum.
    pub fn set_reserved(&self, reserved: f64) -> f64 {
        self.with(|c| {
            let max = (c.configured - reserved.max(0.0)).max(MIN_RATE);
            if max != c.max {
                let at_max = c.ceiling >= c.max;
                c.max = max;
                c.step = max * PROBE_STEP;
                if at_max || c.ceiling > max {
                    c.ceiling = max;
                    c.probe = None;
                }
            }
            max
        })
    }

    /// Requests waiting in [`Pacer::acquire`] right now: above zero, the quota is what limits
    /// the import, so a short extra delay of one lane costs no throughput.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Wait until one request may start; returns its start slot, to hand back with
    /// [`Pacer::on_rate_limited`].
    pub async fn acquire(&self) -> Instant {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        let _turn = self.queue.lock().await;
        loop {
            match self.try_start_at(Instant::now()) {
                Ok(start) => return start,
                // Re-checked on waking: the ceiling may have moved meanwhile.
                Err(until) => tokio::time::sleep_until(until.into()).await,
            }
        }
    }

    /// Take the next start slot at `now` (`Ok(slot)`, logged), or `Err(when)` it is due.
    pub fn try_start_at(&self, now: Instant) -> Result<Instant, Instant> {
        self.with(|c| c.try_start(now))
    }

    /// The request started at `start` (from [`Pacer::acquire`]) was answered with a rate-limit
    /// code.
    pub fn on_rate_limited(&self, start: Instant) -> Reaction {
        self.on_rate_limited_at(Instant::now(), start)
    }

    /// [`Pacer::on_rate_limited`] with the answer arriving at `now`.
    pub fn on_rate_limited_at(&self, now: Instant, start: Instant) -> Reaction {
        self.with(|c| c.on_rate_limited(now, start))
    }

    /// A request went through without a rate-limit answer: apply any due probe.
    pub fn on_success(&self) {
        self.probe_at(Instant::now());
    }

    /// Apply any due probe at `now` (also done by every start and answer); returns the ceiling.
    pub fn probe_at(&self, now: Instant) -> f64 {
        self.with(|c| {
            c.probe(now);
            c.ceiling
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulator::state::{Limiter, QuotaLimiter};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Take a slot as a waiter would: at once if free, else at the instant it is due.
    fn next(p: &Pacer, now: Instant) -> Instant {
        match p.try_start_at(now) {
            Ok(s) => s,
            Err(t) => p.try_start_at(t).expect("due"),
        }
    }

    #[test]
    fn starts_are_evenly_spaced_at_the_target() {
        let t0 = Instant::now();
        let p = Pacer::new(200);
        let gap = spacing(200.0);
        assert!((gap.as_secs_f64() - 1.0 / 199.0).abs() < 1e-9);
        let mut prev = p.try_start_at(t0).expect("first at once");
        assert_eq!(prev, t0);
        for _ in 0..1000 {
            assert_eq!(p.try_start_at(prev), Err(prev + gap), "no burst");
            let s = next(&p, prev);
            assert_eq!(s - prev, gap);
            prev = s;
        }
        // Woken a little late: the slot stays on the grid.
        let due = p.try_start_at(prev).expect_err("not yet");
        assert_eq!(p.try_start_at(due + ms(1)), Ok(due));
    }

    /// Starts inside the window of one second ending at `at`.
    fn in_window(starts: &[Instant], at: Instant) -> usize {
        starts
            .iter()
            .filter(|s| **s <= at && at.saturating_duration_since(**s) < WINDOW)
            .count()
    }

    #[test]
    fn a_reserved_share_lowers_every_window_from_the_next_start_and_comes_back() {
        let t0 = Instant::now();
        let p = Pacer::new(100);
        let mut starts = vec![p.try_start_at(t0).expect("first")];
        while *starts.last().expect("start") < t0 + Duration::from_secs(2) {
            starts.push(next(&p, *starts.last().expect("start")));
        }
        let lowered_at = *starts.last().expect("start");
        assert_eq!(p.set_reserved(40.0), 60.0);
        assert_eq!(p.current_rate(), 60.0);
        let mut after = Vec::new();
        let mut t = lowered_at;
        while t < lowered_at + Duration::from_secs(4) {
            t = next(&p, t);
            after.push(t);
        }
        // Every window ending at a start after the change holds at most 60 starts.
        let all: Vec<Instant> = starts.iter().chain(&after).copied().collect();
        for s in &after {
            assert!(in_window(&all, *s) <= 60, "{} starts", in_window(&all, *s));
        }
        // Given back: the full rate at once.
        assert_eq!(p.set_reserved(0.0), 100.0);
        assert_eq!(p.current_rate(), 100.0);
        // A share above the maximum leaves the minimum.
        assert_eq!(p.set_reserved(500.0), MIN_RATE);
    }

    #[test]
    fn no_burst_after_idle() {
        let t0 = Instant::now();
        let p = Pacer::new(200);
        let mut t = t0;
        for _ in 0..50 {
            t = next(&p, t);
        }
        let later = t + Duration::from_secs(10);
        assert_eq!(p.try_start_at(later), Ok(later));
        // No catch-up: the next start is one full spacing after the restart.
        assert_eq!(p.try_start_at(later), Err(later + spacing(200.0)));
    }

    #[test]
    fn a_single_answer_skips_one_slot_and_keeps_the_ceiling() {
        let t0 = Instant::now();
        let p = Pacer::new(200);
        let gap = spacing(200.0);
        let mut starts = vec![p.try_start_at(t0).expect("first")];
        for _ in 0..20 {
            starts.push(next(&p, *starts.last().expect("start")));
        }
        let last = *starts.last().expect("start");
        let answer_at = starts[10] + ms(40);
        assert_eq!(
            p.on_rate_limited_at(answer_at, starts[10]),
            Reaction::SkippedSlot
        );
        assert_eq!(p.current_rate(), 200.0);
        assert_eq!(
            p.try_start_at(last),
            Err(last + gap * 2),
            "one slot skipped"
        );
        assert_eq!(next(&p, last), last + gap * 2);
        // A second answer more than a second later is single again.
        let s = next(&p, last + Duration::from_secs(2));
        assert_eq!(p.on_rate_limited_at(s + ms(40), s), Reaction::SkippedSlot);
        assert_eq!(p.current_rate(), 200.0);
    }

    #[test]
    fn never_more_than_the_ceiling_inside_one_second() {
        let t0 = Instant::now();
        let p = Pacer::new(200);
        let mut starts = vec![];
        let mut t = t0;
        for _ in 0..300 {
            t = next(&p, t);
            starts.push(t);
        }
        // The ceiling drops to 100 after 1.5 s of starts at 199/s: the log holds the schedule
        // back until the window has room, then resumes at the new spacing.
        {
            let mut c = p.lock();
            c.ceiling = 100.0;
            // As after an answer, with no probe due during the test.
            c.last_answer = Some(t);
            c.quiet = PROBE_AFTER_MAX;
        }
        for _ in 0..300 {
            t = next(&p, t);
            starts.push(t);
        }
        let first_new = starts[300];
        assert!(first_new - starts[299] > ms(400), "held back");
        for (i, s) in starts.iter().enumerate() {
            let inside = starts[i..].iter().take_while(|x| **x < *s + WINDOW).count();
            // A window whose last start came after the drop holds at most the new ceiling.
            let cap = if i + inside > 300 { 100 } else { 200 };
            assert!(inside <= cap, "{inside} starts in the second from #{i}");
        }
    }

    /// Event-driven run of a saturated pacer against one of the simulator's limiters: each
    /// request arrives [`LATENCY`] after its start and is answered at once.
    struct Run {
        p: Pacer,
        t0: Instant,
        now: Instant,
        server: QuotaLimiter,
        kind: Limiter,
        in_flight: VecDeque<(Instant, Instant)>,
        started: Vec<(Instant, bool)>,
    }

    const LATENCY: Duration = Duration::from_millis(40);

    impl Run {
        fn new(kind: Limiter, quota: u32, configured: u32) -> Run {
            let t0 = Instant::now();
            Run {
                p: Pacer::new(configured),
                t0,
                now: t0,
                // The server's window is not aligned with our first start.
                server: QuotaLimiter::new(kind, quota, t0 - ms(337)),
                kind,
                in_flight: VecDeque::new(),
                started: vec![],
            }
        }

        fn set_quota(&mut self, quota: u32) {
            self.server = QuotaLimiter::new(self.kind, quota, self.t0 - ms(337));
        }

        /// Keep the pacer saturated until `secs` after t0.
        fn until(&mut self, secs: f64) {
            let end = self.t0 + Duration::from_secs_f64(secs);
            while self.now < end {
                let due = match self.p.try_start_at(self.now) {
                    Ok(s) => {
                        let arrival = s + LATENCY;
                        self.in_flight.push_back((arrival, s));
                        continue;
                    }
                    Err(t) => t,
                };
                match self.in_flight.front().copied() {
                    Some((arrival, s)) if arrival <= due => {
                        self.in_flight.pop_front();
                        self.now = self.now.max(arrival);
                        let ok = self.server.admit(arrival);
                        self.started.push((s, !ok));
                        if !ok {
                            self.p.on_rate_limited_at(arrival, s);
                        }
                    }
                    _ => self.now = due,
                }
            }
        }

        /// (accepted/s, share refused) over [from, to) seconds, by start time.
        fn stats(&self, from: f64, to: f64) -> (f64, f64) {
            let (a, b) = (
                self.t0 + Duration::from_secs_f64(from),
                self.t0 + Duration::from_secs_f64(to),
            );
            let sel: Vec<_> = self
                .started
                .iter()
                .filter(|(s, _)| *s >= a && *s < b)
                .collect();
            let refused = sel.iter().filter(|(_, r)| *r).count();
            (
                (sel.len() - refused) as f64 / (to - from),
                refused as f64 / sel.len().max(1) as f64,
            )
        }
    }

    #[test]
    fn full_quota_against_each_limiter() {
        for kind in [Limiter::Sliding, Limiter::Fixed, Limiter::Bucket] {
            let mut r = Run::new(kind, 200, 200);
            r.until(30.0);
            let (rate, refused) = r.stats(0.0, 30.0);
            assert!(rate >= 0.99 * 200.0, "{kind:?}: {rate}/s");
            assert_eq!(refused, 0.0, "{kind:?}");
            assert_eq!(r.p.current_rate(), 200.0);
        }
    }

    #[test]
    fn repeated_answers_learn_150_from_200() {
        for kind in [Limiter::Sliding, Limiter::Fixed, Limiter::Bucket] {
            let mut r = Run::new(kind, 150, 200);
            r.until(8.0);
            let c = r.p.current_rate();
            assert!((147.0..=153.0).contains(&c), "{kind:?}: ceiling {c}");
            r.until(60.0);
            let (rate, refused) = r.stats(10.0, 60.0);
            assert!(rate >= 0.97 * 150.0, "{kind:?}: {rate}/s");
            assert!(refused <= 0.01, "{kind:?}: {:.2}% refused", refused * 100.0);
            let (_, all) = r.stats(0.0, 60.0);
            assert!(all <= 0.01, "{kind:?}: {:.2}% refused overall", all * 100.0);
        }
    }

    #[test]
    fn probing_returns_to_the_maximum_when_the_limit_goes_away() {
        for kind in [Limiter::Sliding, Limiter::Fixed, Limiter::Bucket] {
            let mut r = Run::new(kind, 150, 200);
            r.until(40.0);
            assert!(r.p.current_rate() < 155.0, "{kind:?}");
            r.set_quota(200);
            // At most one back-off of quiet, then a few doubling steps.
            r.until(40.0 + PROBE_AFTER_MAX.as_secs_f64() + 6.0);
            assert_eq!(r.p.current_rate(), 200.0, "{kind:?}");
            r.until(70.0);
            let (rate, refused) = r.stats(63.0, 70.0);
            assert!(rate >= 0.99 * 200.0, "{kind:?}: {rate}/s");
            assert_eq!(refused, 0.0, "{kind:?}");
        }
    }

    #[test]
    fn a_failed_probe_is_retracted_and_backs_off() {
        let t0 = Instant::now();
        let p = Pacer::new(200);
        let mut t = t0;
        for _ in 0..10 {
            t = next(&p, t);
        }
        // Two answers: learn what was accepted before the refused run (9 starts).
        let s = next(&p, t);
        assert_eq!(p.on_rate_limited_at(s + ms(40), s), Reaction::SkippedSlot);
        let s2 = next(&p, s);
        assert_eq!(
            p.on_rate_limited_at(s2 + ms(40), s2),
            Reaction::Learned(100.0),
            "at most halved"
        );
        let s3 = next(&p, s2);
        assert_eq!(
            p.on_rate_limited_at(s3 + ms(40), s3),
            Reaction::Learned(50.0)
        );
        let quiet = s3 + ms(40);
        assert_eq!(p.probe_at(quiet + PROBE_AFTER - ms(1)), 50.0);
        assert_eq!(p.probe_at(quiet + PROBE_AFTER), 52.0, "+1% of the maximum");
        let s4 = next(&p, quiet + PROBE_AFTER);
        assert_eq!(
            p.on_rate_limited_at(s4 + ms(40), s4),
            Reaction::Retracted(50.0)
        );
        let quiet = s4 + ms(40);
        // The quiet time doubled.
        assert_eq!(p.probe_at(quiet + PROBE_AFTER * 2 - ms(1)), 50.0);
        assert_eq!(p.probe_at(quiet + PROBE_AFTER * 2), 52.0);
        // Kept after a second without answers; then the steps double.
        let k = quiet + PROBE_AFTER * 2;
        assert_eq!(p.probe_at(k + PROBE_CONFIRM), 56.0);
        assert_eq!(p.probe_at(k + PROBE_CONFIRM * 2), 64.0);
        assert_eq!(p.probe_at(k + PROBE_CONFIRM * 3), 80.0);
        assert_eq!(p.probe_at(k + PROBE_CONFIRM * 4), 112.0);
        assert_eq!(p.probe_at(k + PROBE_CONFIRM * 5), 176.0);
        assert_eq!(p.probe_at(k + PROBE_CONFIRM * 6), 200.0);
    }

    #[tokio::test]
    async fn acquire_returns_spaced_slots() {
        let p = Pacer::new(1000);
        let a = p.acquire().await;
        let b = p.acquire().await;
        assert!(b - a >= spacing(1000.0));
        assert_eq!(p.waiting(), 0);
    }
}
