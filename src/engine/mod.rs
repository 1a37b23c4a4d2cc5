//! The import engine: queued messages to Tencent with every guarantee of PRODUCT.md.
//!
//! One lane per (group, topic); many lanes at once (`import.max_lanes`), exactly one request in
//! flight per lane, each request paced by the app-wide [`Pacer`](crate::pacing::Pacer). A lane
//! step ([`lane`]) claims the head of the lane (marking it in flight in a short transaction),
//! sends it, and records the answer and the new checkpoint in another, in which it also claims
//! its next batch; no transaction spans the HTTP call. That second transaction is shared: the
//! [`commit`] task records the answers of several lanes (and claims their next batches) at once,
//! and each lane waits for its own record before it sends again. A lane that finds messages in
//! flight when it starts (an unknown outcome, or a crash or stop mid-request) first asks the
//! server what it already has ([`reconcile`]); nothing is re-sent before that.
//!
//! Accounts first ([`accounts`], `import.accounts = "auto"`): while any sender, owner or member
//! waits to be imported as an account, no lane starts and no group step runs, and each lane
//! checks the senders of a batch before it sends it.
//!
//! Stopping: when `shutdown` fires, no lane claims another batch; requests in flight get
//! `import.shutdown_grace` to finish and record their answer, then are abandoned: their messages
//! stay in flight and are reconciled at the next start, so stopping at any instant (SIGKILL
//! included) loses and duplicates nothing. An auth failure that survives one UserSig renewal
//! stops every lane with one error ([`EngineError::Auth`]), without burning attempts.
//!
//! The database: while it refuses writes (the store's [`Health`]), no lane starts and the loop
//! goes on (watchdog, progress naming the cause); a lane whose record failed ends, its messages
//! stay in flight and are reconciled when it starts again, so an answer that could not be
//! recorded is neither lost nor sent twice. A corrupt, deleted or replaced database stops the
//! engine with [`EngineError::Database`] and no further watchdog tick.

pub mod accounts;
pub mod commit;
pub mod group;
pub mod lane;
pub mod outage;
pub mod reconcile;
pub mod share;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::settings::{ImportSettings, TiePolicy};
use crate::store::{Health, Store, StoreError, Totals, unix_now, unix_now_ms};
use crate::tencent::TencentClient;

/// Engine settings (from `[import]`).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub batch_size: usize,
    pub max_lanes: usize,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub tie_policy: TiePolicy,
    pub shutdown_grace: Duration,
    pub progress_interval: Duration,
    /// How long a lane's answer may wait for others to be recorded with it (group commit).
    pub commit_window: Duration,
    /// Exit once nothing is pending or in flight (`timport run --until-idle`).
    pub until_idle: bool,
    /// `import.accounts = "auto"`: import accounts before anything that needs them.
    pub accounts: bool,
    /// `import.account_requests_per_second`.
    pub account_rps: u32,
}

impl EngineConfig {
    pub fn from_settings(s: &ImportSettings, until_idle: bool) -> Self {
        EngineConfig {
            batch_size: s.batch_size,
            max_lanes: s.max_lanes,
            max_attempts: s.max_attempts,
            backoff_base: s.backoff_base,
            backoff_max: s.backoff_max,
            tie_policy: s.tie_policy,
            shutdown_grace: s.shutdown_grace,
            progress_interval: s.progress_interval,
            commit_window: s.commit_window,
            until_idle,
            accounts: s.accounts == crate::settings::AccountsMode::Auto,
            account_rps: s.account_requests_per_second,
        }
    }
}

/// Why the engine stopped on its own.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// Tencent refused the app's credentials even after a fresh UserSig.
    #[error(
        "Tencent refused the credentials ({code}: {info}); check {hint}. All lanes are stopped; nothing was counted as a failed attempt"
    )]
    Auth {
        code: i64,
        info: String,
        hint: &'static str,
    },
    #[error("store: {0}")]
    Store(String),
    /// The database is corrupt, deleted or replaced (the store's [`Health::Stopped`] reason,
    /// which names the file and what to do).
    #[error("{0}")]
    Database(String),
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        EngineError::Store(e.to_string())
    }
}

/// How the engine ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineExit {
    /// Shut down on request.
    Stopped,
    /// `--until-idle`: nothing pending or in flight any more.
    Idle(Totals),
}

/// State shared by the scheduler and its lane tasks.
pub struct Shared {
    pub store: Store,
    pub client: TencentClient,
    pub cfg: EngineConfig,
    /// Fires on shutdown: lanes stop claiming.
    pub stop: CancellationToken,
    /// The first fatal error, which stops every lane.
    pub fatal: Mutex<Option<EngineError>>,
    pub imported: AtomicU64,
    pub failed: AtomicU64,
    /// The server has taken a message sharing the second of the one before it. Until then a tie
    /// ends its batch (see [`Store::claim_batch`]).
    pub ties_ok: AtomicBool,
    /// Records answers (and claims next batches) for several lanes per transaction.
    pub committer: commit::Committer,
    /// Whether Tencent is reachable; while it is not, every lane waits.
    pub outage: outage::Outage,
    /// Batched get_group_info for the lanes' catch-up.
    pub group_infos: reconcile::GroupInfos,
    /// Which senders are accounts already (see [`accounts`]).
    pub accounts: accounts::Gate,
}

impl Shared {
    fn set_fatal(&self, e: EngineError) {
        let mut f = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            tracing::error!(error = %e, "import stopped");
            *f = Some(e);
        }
        self.stop.cancel();
    }

    /// Waits until a request may go out (see [`outage::Outage::admit`]); false when the engine
    /// stops first.
    pub async fn admitted(&self) -> bool {
        tokio::select! {
            _ = async {
                self.outage.admit().await;
                // High availability: only while this node may send (at once without a gate).
                self.client.sendable().await;
            } => !self.stop.is_cancelled(),
            _ = self.stop.cancelled() => false,
        }
    }

    fn fatal(&self) -> Option<EngineError> {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Capped exponential backoff with full jitter for the `attempt`-th try (1-based).
    pub fn backoff(&self, attempt: i64) -> Duration {
        let exp = u32::try_from(attempt.clamp(1, 30) - 1).unwrap_or(0);
        let base =
            self.cfg.backoff_base.as_secs_f64() * 2f64.powi(i32::try_from(exp).unwrap_or(30));
        let capped = base.min(self.cfg.backoff_max.as_secs_f64());
        let jitter: f64 = rand::random::<f64>();
        Duration::from_secs_f64(capped * (0.5 + 0.5 * jitter))
    }
}

/// A progress snapshot, written to `meta` for `timport status` and logged periodically.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub at: i64,
    /// Messages imported per second, recent average.
    pub rate: f64,
    pub pacing_rate: f64,
    pub active_lanes: usize,
    pub stopped_reason: Option<String>,
    /// While every lane waits for Tencent to answer again.
    #[serde(default)]
    pub waiting_for_tencent: Option<outage::Waiting>,
}

/// How often the loop checks that the database file at the configured path is still the one it
/// opened (see [`Store::check_file`]).
const FILE_CHECK_EVERY: Duration = Duration::from_secs(2);

pub const PROGRESS_KEY: &str = "progress";
/// `meta` key set to "1" once the server took a message sharing its predecessor's second.
pub const TIES_ACCEPTED_KEY: &str = "ties_accepted";

/// Runs the engine until `shutdown` fires, until idle (with `until_idle`), or until a fatal error.
pub async fn run(
    store: Store,
    client: TencentClient,
    cfg: EngineConfig,
    shutdown: CancellationToken,
    on_tick: impl Fn() + Send + Sync,
) -> Result<EngineExit, EngineError> {
    let committer_done = CancellationToken::new();
    let (committer, committer_task) = commit::Committer::start(
        store.clone(),
        client.pacer().cloned(),
        cfg.commit_window,
        committer_done.clone(),
    );
    let (group_infos, info_requests) = reconcile::GroupInfos::new();
    let shared = Arc::new(Shared {
        committer,
        outage: outage::Outage::new(),
        group_infos,
        accounts: accounts::Gate::new(cfg.accounts),
        store: store.clone(),
        client,
        cfg: cfg.clone(),
        stop: shutdown.child_token(),
        fatal: Mutex::new(None),
        imported: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        ties_ok: AtomicBool::new(matches!(
            store
                .meta(TIES_ACCEPTED_KEY)
                .await
                .ok()
                .flatten()
                .as_deref(),
            Some("1")
        )),
    });
    let mut tasks: JoinSet<i64> = JoinSet::new();
    let mut running: HashSet<i64> = HashSet::new();
    // Which lane each task works, so a panicked task frees exactly its own lane.
    let mut task_lanes: HashMap<tokio::task::Id, i64> = HashMap::new();
    let mut progress_task: Option<tokio::task::JoinHandle<()>> = None;
    let mut rate = RateMeter::new();
    let mut last_progress_log = Instant::now();
    let mut last_progress_write = Instant::now() - Duration::from_secs(60);
    tracing::info!(
        max_lanes = cfg.max_lanes,
        batch_size = cfg.batch_size,
        "import engine started"
    );
    // A verify sharing the quota lowers the pacer before the first request (see `share`).
    let share_task =
        share::start(&store, shared.client.pacer().cloned(), shared.stop.clone()).await;
    let group_task = tokio::spawn(group::work(shared.clone()));
    let account_task = tokio::spawn(accounts::work(shared.clone()));
    let info_task = tokio::spawn(reconcile::GroupInfos::work(shared.clone(), info_requests));
    let mut last_file_check = Instant::now();
    let exit = loop {
        // A corrupt, deleted or replaced database stops everything, and the watchdog with it
        // (no tick), so systemd sees the stop even if shutting down hangs.
        if last_file_check.elapsed() >= FILE_CHECK_EVERY {
            last_file_check = Instant::now();
            let _ = store.check_file();
        }
        if let Health::Stopped { reason } = store.health() {
            shared.set_fatal(EngineError::Database(reason));
            break EngineExit::Stopped;
        }
        on_tick();
        if shared.stop.is_cancelled() {
            break EngineExit::Stopped;
        }
        // While the database refuses writes no lane starts: each would only fail its first
        // record. The store probes with backoff and clears the refusal itself.
        let refused = store.writes_refused();
        // Fill free slots with runnable lanes.
        // While accounts wait to be imported, no lane starts (see `accounts`).
        if running.len() < cfg.max_lanes && refused.is_none() && !shared.accounts.busy() {
            let want = i64::try_from(cfg.max_lanes + running.len()).unwrap_or(i64::MAX);
            match store.runnable_lanes(unix_now_ms(), want).await {
                Ok(lanes) => {
                    for l in lanes {
                        if running.len() >= cfg.max_lanes {
                            break;
                        }
                        if running.insert(l.id) {
                            let sh = shared.clone();
                            let id = l.id;
                            let handle = tasks.spawn(async move {
                                lane::work(sh, l).await;
                                id
                            });
                            task_lanes.insert(handle.id(), id);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list lanes; retrying"),
            }
        }
        // Progress.
        let imported = shared.imported.load(Ordering::Relaxed);
        let current = rate.sample(imported);
        if last_progress_write.elapsed() >= Duration::from_secs(2) {
            last_progress_write = Instant::now();
            let p = Progress {
                at: unix_now(),
                rate: current,
                pacing_rate: shared
                    .client
                    .pacer()
                    .map(|p| p.current_rate())
                    .unwrap_or(0.0),
                active_lanes: running.len(),
                stopped_reason: None,
                waiting_for_tencent: shared.outage.waiting(),
            };
            // Written off the loop: a long ingest transaction holding the writer must not stop
            // the loop (and its watchdog pings).
            if progress_task.as_ref().is_none_or(|h| h.is_finished()) {
                let st = store.clone();
                progress_task = Some(tokio::spawn(async move { write_progress(&st, &p).await }));
            }
            if let Ok(t) = store.totals(None).await {
                export_gauges(&t, running.len());
                if last_progress_log.elapsed() >= cfg.progress_interval {
                    last_progress_log = Instant::now();
                    match &refused {
                        Some(cause) => log_waiting_for_database(&t, cause),
                        None => log_progress(&t, current, shared.outage.waiting().as_ref()),
                    }
                }
            }
        }
        if cfg.until_idle && running.is_empty() && refused.is_none() && !shared.accounts.busy() {
            match store.totals(None).await {
                Ok(t) if t.pending == 0 && t.in_flight == 0 => {
                    if let Ok(false) = store.group_work_left().await {
                        break EngineExit::Idle(t);
                    }
                }
                _ => {}
            }
        }
        // Wait for a lane to finish, or a short tick to look for new work.
        tokio::select! {
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let task = match done {
                    Ok((task, _)) => task,
                    Err(e) => {
                        tracing::error!(error = %e, "a lane task failed; its messages stay in flight and are reconciled");
                        e.id()
                    }
                };
                if let Some(id) = task_lanes.remove(&task) {
                    running.remove(&id);
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = shared.stop.cancelled() => {}
        }
    };
    // Stop: lanes see `stop` and claim nothing more; give in-flight requests the grace period.
    shared.stop.cancel();
    if tokio::time::timeout(cfg.shutdown_grace, group_task)
        .await
        .is_err()
    {
        tracing::warn!("a group step was still running at the end of the grace period");
    }
    if tokio::time::timeout(cfg.shutdown_grace, account_task)
        .await
        .is_err()
    {
        tracing::warn!("an account request was still running at the end of the grace period");
    }
    let grace = tokio::time::sleep(cfg.shutdown_grace);
    tokio::pin!(grace);
    while !tasks.is_empty() {
        tokio::select! {
            _ = tasks.join_next() => {}
            _ = &mut grace => {
                tracing::warn!(remaining = tasks.len(), "shutdown grace over; abandoning requests in flight (they are reconciled at the next start)");
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
        }
    }
    info_task.abort();
    if let Some(t) = share_task {
        t.abort();
    }
    // The lanes are done: the committer records what is still queued, then ends.
    committer_done.cancel();
    if let Err(e) = committer_task.await {
        tracing::error!(error = %e, "the committer failed; unrecorded answers are reconciled at the next start");
    }
    let fatal = shared.fatal();
    let p = Progress {
        at: unix_now(),
        rate: 0.0,
        pacing_rate: 0.0,
        active_lanes: 0,
        stopped_reason: fatal.as_ref().map(|e| e.to_string()),
        waiting_for_tencent: None,
    };
    write_progress(&store, &p).await;
    if let Ok(t) = store.totals(None).await {
        export_gauges(&t, 0);
        log_progress(&t, 0.0, None);
    }
    match fatal {
        Some(e) => Err(e),
        None => Ok(exit),
    }
}

async fn write_progress(store: &Store, p: &Progress) {
    if let Ok(text) = serde_json::to_string(p)
        && let Err(e) = store.set_meta(PROGRESS_KEY, &text).await
    {
        tracing::debug!(error = %e, "progress not written");
    }
}

fn export_gauges(t: &Totals, active: usize) {
    metrics::gauge!("timport_messages", "state" => "pending").set(t.pending as f64);
    metrics::gauge!("timport_messages", "state" => "in_flight").set(t.in_flight as f64);
    metrics::gauge!("timport_messages", "state" => "blocked").set(t.blocked as f64);
    metrics::gauge!("timport_lanes", "state" => "active").set(active as f64);
    metrics::gauge!("timport_lanes", "state" => "blocked").set(t.lanes_blocked as f64);
}

/// Remaining messages over the recent rate, if there is a rate.
pub fn eta_seconds(t: &Totals, rate: f64) -> Option<u64> {
    let remaining = (t.pending + t.in_flight) as f64;
    if remaining <= 0.0 {
        return Some(0);
    }
    (rate > 0.01).then(|| (remaining / rate).ceil() as u64)
}

fn log_waiting_for_database(t: &Totals, cause: &str) {
    tracing::warn!(
        imported = t.imported,
        pending = t.pending,
        in_flight = t.in_flight,
        failed = t.failed,
        blocked = t.blocked,
        eta = "unknown (waiting for the database)",
        reason = %cause,
        "progress: waiting for the database to accept writes"
    );
}

fn log_progress(t: &Totals, rate: f64, waiting: Option<&outage::Waiting>) {
    let eta = match waiting {
        Some(_) => "unknown (waiting for Tencent)".to_string(),
        None => eta_seconds(t, rate)
            .map(|s| humantime::format_duration(Duration::from_secs(s)).to_string())
            .unwrap_or_else(|| "unknown".into()),
    };
    match waiting {
        Some(w) => tracing::warn!(
            imported = t.imported,
            pending = t.pending,
            in_flight = t.in_flight,
            failed = t.failed,
            blocked = t.blocked,
            waiting_since = w.since,
            waiting_for = %humantime::format_duration(Duration::from_secs(
                u64::try_from(unix_now() - w.since).unwrap_or(0)
            )),
            reason = %w.reason,
            "progress: waiting for Tencent"
        ),
        None => tracing::info!(
            imported = t.imported,
            pending = t.pending,
            in_flight = t.in_flight,
            failed = t.failed,
            blocked = t.blocked,
            rate = format!("{rate:.1}/s"),
            eta = %eta,
            "progress"
        ),
    }
}

/// Recent import rate: an exponentially weighted average over one-second samples.
struct RateMeter {
    last: Instant,
    last_count: u64,
    rate: f64,
}

impl RateMeter {
    fn new() -> Self {
        RateMeter {
            last: Instant::now(),
            last_count: 0,
            rate: 0.0,
        }
    }

    fn sample(&mut self, count: u64) -> f64 {
        let dt = self.last.elapsed().as_secs_f64();
        if dt >= 1.0 {
            let inst = (count.saturating_sub(self.last_count)) as f64 / dt;
            self.rate = if self.rate == 0.0 {
                inst
            } else {
                0.7 * self.rate + 0.3 * inst
            };
            self.last = Instant::now();
            self.last_count = count;
        }
        self.rate
    }
}
