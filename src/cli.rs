//! The commands of the `timport` binary: `run`, `ingest`, `status`, `retry`, `verify`,
//! `simulate`.
//!
//! This is orchestration: it loads the settings (exit code 2 on any configuration error, naming
//! the key), installs telemetry, opens the store (`run` takes the single-instance lock first; see
//! [`lock_daemon`]; `status` opens it read-only and `retry` only an existing queue, so neither
//! creates one: a missing database exits 2), and wires intake, engine, simulator and the ops
//! listener together under one shutdown token fired by SIGTERM or SIGINT. `run` ignores SIGHUP
//! (one log line each time): there is no configuration reload and no log file to reopen, so a
//! closed terminal or a stray `kill -HUP` must not end an import. Errors here carry
//! anyhow context; the modules below return typed errors.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::engine::{self, EngineConfig, EngineError, EngineExit};
use crate::intake::files::{FileOutcome, ingest_file};
use crate::intake::{self, IntakeConfig, spool, table};
use crate::ops::{self, Readiness, status, systemd};
use crate::pacing::Pacer;
use crate::settings::{Database, Settings, SettingsError};
use crate::simulator::{self, SimConfig, SimulateArgs};
use crate::store::{QueueLock, RetryScope, Store, StoreError, StoreOptions};
use crate::tencent::{ClientConfig, Region, TencentClient};

/// Exit code for bad usage or invalid configuration.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code for a database that is corrupt, or was deleted or replaced while the daemon ran: a
/// restart cannot fix it (and after a deletion would start an empty queue), so the systemd unit
/// does not restart on it.
pub const EXIT_DATABASE: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "timport",
    version,
    about = "Import chat history into Tencent Cloud Chat, exactly once, in order"
)]
pub struct Cli {
    /// Configuration file (default: $TIMPORT_CONFIG, then config/timport.toml).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The daemon: watch the spool folder and the intake table, import, serve health and metrics.
    Run {
        /// Exit once nothing is pending or in flight: 0 when all imported, 1 when anything failed
        /// or is blocked.
        #[arg(long)]
        until_idle: bool,
        /// Queue these job files (or every job file in these folders) before starting, as
        /// `timport ingest` would.
        #[arg(long, value_name = "PATH")]
        ingest: Vec<PathBuf>,
    },
    /// Validate and queue job files now. Exit 0 when all were accepted, 1 when any was rejected.
    Ingest {
        /// Validate only; queue nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Progress: totals, rate and ETA, blocked lanes, failure reasons, groups and jobs.
    Status {
        /// One JSON object for scripts.
        #[arg(long)]
        json: bool,
        /// Only this group.
        #[arg(long)]
        group: Option<String>,
    },
    /// Put failed messages and blocked lanes back to pending.
    Retry {
        #[arg(long, conflicts_with_all = ["job", "all", "accounts"])]
        group: Option<String>,
        #[arg(long, conflicts_with_all = ["group", "all", "accounts"])]
        job: Option<i64>,
        #[arg(long, conflicts_with_all = ["group", "job", "accounts"])]
        all: bool,
        /// Failed accounts back to pending, with the messages and memberships that failed for
        /// them.
        #[arg(long, conflicts_with_all = ["group", "job", "all"])]
        accounts: bool,
    },
    /// Read every group's history back and prove the import, message by message.
    ///
    /// Each imported message ends verified, missing, altered or unverifiable; server messages
    /// that are not ours are duplicated or foreign. Results are kept (a stopped verify resumes).
    /// Exit 0 when nothing is missing, altered or duplicated, 1 otherwise or when stopped, 2 for
    /// usage or configuration errors.
    Verify {
        /// One JSON object for scripts.
        #[arg(long)]
        json: bool,
        /// Only this group.
        #[arg(long, conflicts_with = "job")]
        group: Option<String>,
        /// Only the lanes of this job.
        #[arg(long, conflicts_with = "group")]
        job: Option<i64>,
        /// Forget earlier results (of the scope) and read everything again.
        #[arg(long)]
        restart: bool,
    },
    /// A local stand-in for Tencent's REST endpoints, with fault injection.
    Simulate(SimulateArgs),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match runtime_for(&cli.command) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("timport: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(dispatch(cli))
}

/// The daemon runs on one thread: its work is waiting (on the pacer, the network, the SQLite
/// thread), and one scheduler thread avoids the cross-thread wake-ups that cost it more CPU than
/// the work itself (docs/BENCHMARKS.md). Parsing job files happens on blocking threads anyway.
fn runtime_for(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    match command {
        Command::Run { .. } | Command::Verify { .. } => {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
}

async fn dispatch(cli: Cli) -> ExitCode {
    if let Command::Simulate(args) = cli.command {
        return simulate(args).await;
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => return config_error(&e),
    };
    if let Err(e) = settings.check_paths() {
        return config_error(&e);
    }
    if let Err(e) = crate::telemetry::init(&settings.log) {
        return config_error(&e);
    }
    let result = match cli.command {
        Command::Run { until_idle, ingest } => run(settings, until_idle, ingest).await,
        Command::Ingest { dry_run, files } => ingest(&settings, dry_run, &files).await,
        Command::Status { json, group } => show_status(&settings, json, group.as_deref()).await,
        Command::Retry { accounts: true, .. } => retry_accounts(&settings).await,
        Command::Retry {
            group, job, all, ..
        } => retry(&settings, group, job, all).await,
        Command::Verify {
            json,
            group,
            job,
            restart,
        } => verify(&settings, json, group, job, restart).await,
        Command::Simulate(_) => Ok(ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(se) = e.downcast_ref::<SettingsError>() {
                return config_error(se);
            }
            if e.downcast_ref::<StoreError>()
                .is_some_and(StoreError::is_fatal)
            {
                eprintln!("timport: {e:#}");
                return ExitCode::from(EXIT_DATABASE);
            }
            eprintln!("timport: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(e: &SettingsError) -> ExitCode {
    eprintln!("timport: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn store_options(settings: &Settings) -> StoreOptions {
    StoreOptions {
        synchronous: settings.queue.synchronous,
        busy_timeout: settings.queue.busy_timeout,
        readers: 2,
        pg_pool_size: settings.queue.pool_size,
    }
}

/// Opens (creating it when missing) the queue for `run` and `ingest`. A database that cannot be
/// reached or refuses us (wrong password, a standby) is said on stderr, and the exit code is 2.
async fn open_store(settings: &Settings) -> anyhow::Result<Result<Store, ExitCode>> {
    match Store::open(&settings.queue.database, &store_options(settings)).await {
        Ok(s) => Ok(Ok(s)),
        Err(e) if e.is_config() => {
            eprintln!("timport: {e}");
            Ok(Err(ExitCode::from(EXIT_CONFIG)))
        }
        Err(e) => Err(e.into()),
    }
}

async fn ingest(settings: &Settings, dry_run: bool, files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let store = if dry_run {
        None
    } else {
        match open_store(settings).await? {
            Ok(s) => Some(s),
            Err(code) => return Ok(code),
        }
    };
    let cancel = CancellationToken::new();
    let mut any_rejected = false;
    for f in files {
        let outcome = ingest_file(store.as_ref(), f, true, &cancel)
            .await
            .with_context(|| format!("ingesting {}", f.display()))?;
        any_rejected |= matches!(outcome, FileOutcome::Rejected { .. });
        print!("{}", describe(f, &outcome));
    }
    if let Some(s) = store {
        s.close().await;
    }
    Ok(if any_rejected {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// One file's outcome as `timport ingest` prints it.
pub fn describe(f: &Path, outcome: &FileOutcome) -> String {
    // Control characters and bytes that are not UTF-8 escaped: a name cannot forge a line.
    let name = {
        use std::os::unix::ffi::OsStrExt;
        crate::telemetry::escape_bytes(f.as_os_str().as_bytes())
    };
    match outcome {
        FileOutcome::Accepted {
            job_id,
            messages,
            groups,
        } => format!("accepted  {name}: job {job_id}, {messages} messages in {groups} groups\n"),
        FileOutcome::Duplicate { job_id } => {
            format!("duplicate {name}: same content as job {job_id}; not queued again\n")
        }
        FileOutcome::Valid { messages, groups } => {
            format!(
                "valid     {name}: {messages} messages in {groups} groups (dry run, nothing queued)\n"
            )
        }
        FileOutcome::Rejected {
            problem_count,
            problems,
        } => {
            let mut s = format!("rejected  {name}: {problem_count} problem(s), nothing queued\n");
            for p in problems.iter().take(20) {
                let at = match (p.line, p.message_index) {
                    (0, _) => String::new(),
                    (l, Some(i)) => format!("line {l} (message {i}): "),
                    (l, None) => format!("line {l}: "),
                };
                s.push_str(&format!(
                    "  {at}{}\n",
                    crate::telemetry::escape_control(&p.problem)
                ));
            }
            if *problem_count > 20 {
                s.push_str(&format!("  … and {} more\n", problem_count - 20));
            }
            s
        }
    }
}

async fn show_status(
    settings: &Settings,
    json: bool,
    group: Option<&str>,
) -> anyhow::Result<ExitCode> {
    // Read-only: no migration, no write, nothing created (works on a copy or a read-only mount).
    let db = &settings.queue.database;
    if let Database::Sqlite(path) = db
        && !path.exists()
    {
        eprintln!(
            "timport: database {} does not exist (queue.database); check the path. Nothing was created",
            path.display()
        );
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    let store = match Store::open_read_only(db, &store_options(settings)).await {
        Ok(s) => s,
        Err(e) if e.is_config() => {
            eprintln!("timport status: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
        Err(e) => return Err(e.into()),
    };
    let mut r = status::report(&store, group).await?;
    r.accounts_off = settings.import.accounts == crate::settings::AccountsMode::Off;
    (r.node, r.nodes) = status::node_report(
        &store,
        &settings.ha.node(),
        settings.ha.enabled.then_some(settings.ha.lease_ttl),
    )
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", status::render(&r));
    }
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

/// Opens an existing queue, for the commands that must never create one (`retry`, `verify`): a
/// missing or empty file, or an SQLite file that is not a timport queue, is a usage error (exit 2)
/// naming it.
async fn open_existing(
    settings: &Settings,
    command: &str,
) -> anyhow::Result<Result<Store, ExitCode>> {
    match Store::open_existing(&settings.queue.database, &store_options(settings)).await {
        Ok(s) => Ok(Ok(s)),
        Err(e) if e.is_config() => {
            eprintln!("timport {command}: {e}");
            Ok(Err(ExitCode::from(EXIT_CONFIG)))
        }
        Err(e) => Err(e.into()),
    }
}

async fn retry(
    settings: &Settings,
    group: Option<String>,
    job: Option<i64>,
    all: bool,
) -> anyhow::Result<ExitCode> {
    let scope = match (&group, job, all) {
        (Some(g), None, false) => RetryScope::Group(g),
        (None, Some(j), false) => RetryScope::Job(j),
        (None, None, true) => RetryScope::All,
        _ => {
            eprintln!("timport retry: give exactly one of --group G, --job J, --all, --accounts");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let store = match open_existing(settings, "retry").await? {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let (messages, lanes) = store.retry(scope).await?;
    tracing::info!(messages, lanes, ?scope, "retry requested");
    println!("{messages} failed message(s) back to pending, {lanes} blocked lane(s) unblocked");
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

async fn retry_accounts(settings: &Settings) -> anyhow::Result<ExitCode> {
    let store = match open_existing(settings, "retry").await? {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let r = store.retry_accounts().await?;
    tracing::info!(
        accounts = r.accounts,
        messages = r.messages,
        members = r.members,
        "account retry requested"
    );
    println!(
        "{} failed account(s) back to pending, with {} message(s) and {} membership(s) that failed for them",
        r.accounts, r.messages, r.members
    );
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

/// The Tencent client's settings for `run` and `verify`; an unknown `tencent.region` is a
/// configuration error naming the key.
fn client_config(
    settings: &Settings,
    secret_key: SecretString,
    base_url: Option<String>,
) -> Result<ClientConfig, SettingsError> {
    let region: Region = settings
        .tencent
        .region
        .parse()
        .map_err(|_| SettingsError::Key {
            key: "tencent.region",
            message: format!("unknown region {:?}", settings.tencent.region),
        })?;
    Ok(ClientConfig {
        sdkappid: settings.tencent.sdkappid,
        identifier: settings.tencent.identifier.clone(),
        secret_key,
        base_url,
        region,
        request_timeout: settings.tencent.request_timeout,
        usersig_validity: settings.tencent.usersig_validity,
    })
}

/// `timport verify`: see [`crate::verify`].
async fn verify(
    settings: &Settings,
    json: bool,
    group: Option<String>,
    job: Option<i64>,
    restart: bool,
) -> anyhow::Result<ExitCode> {
    use crate::verify::{self, Ended, VerifyOptions, claim, report};
    let usage = |msg: String| {
        eprintln!("timport verify: {msg}");
        Ok(ExitCode::from(EXIT_CONFIG))
    };
    if settings.simulator.enabled {
        return usage(
            "simulator.enabled: the built-in simulator lives inside the daemon and has no history \
             to read back; point tencent.base_url at `timport simulate` (or Tencent) instead"
                .into(),
        );
    }
    let db = &settings.queue.database;
    let mut _verify_lock = None;
    if let Database::Sqlite(path) = db {
        if !path.is_file() {
            return usage(format!(
                "database {} does not exist (queue.database); nothing was imported there",
                path.display()
            ));
        }
        _verify_lock = match claim::lock_verify(path) {
            Ok(f) => Some(f),
            Err(e) => return usage(e),
        };
    }
    let store = match open_existing(settings, "verify").await? {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let Some(_verify_guard) = store.try_lock(QueueLock::Verify).await? else {
        store.close().await;
        return usage(format!(
            "another `timport verify` is running on database {db} (its lock is held)"
        ));
    };
    if let Some(g) = &group
        && store.totals(Some(g)).await?.lanes == 0
    {
        store.close().await;
        return usage(format!("no group {g} in the database"));
    }
    if let Some(j) = job
        && !store.jobs(i64::MAX).await?.iter().any(|x| x.id == j)
    {
        store.close().await;
        return usage(format!("no job {j} in the database"));
    }
    // Shared with a daemon: verify takes at most import.requests_per_second − 1, so the daemon
    // keeps at least one.
    let import_rate = settings.import.requests_per_second;
    let rate = settings
        .verify
        .requests_per_second
        .min(import_rate.saturating_sub(1))
        .max(1);
    let client_cfg = client_config(
        settings,
        settings.secret_key()?,
        (!settings.tencent.base_url.is_empty()).then(|| settings.tencent.base_url.clone()),
    )?;
    // Unpaced client: verify paces its own requests (see `verify`).
    let client = TencentClient::new(client_cfg, None).map_err(|e| SettingsError::Key {
        key: "tencent.base_url",
        message: e.to_string(),
    })?;
    let pacer = Arc::new(Pacer::new(rate));
    let cancel = CancellationToken::new();
    let signal_token = cancel.clone();
    let signals = tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: verify stops; run it again to resume");
        signal_token.cancel();
    });
    let claim = claim::Claim::start(&store, f64::from(rate), db).await?;
    let mut opts = VerifyOptions::for_rate(f64::from(rate));
    opts.group = group.clone();
    opts.job = job;
    opts.restart = restart;
    let counters = Arc::new(verify::Counters::default());
    let started = std::time::Instant::now();
    let ended = verify::run(
        &store,
        &client,
        pacer,
        &opts,
        claim.gate(),
        &cancel,
        counters.clone(),
    )
    .await;
    let elapsed = started.elapsed();
    claim.release().await;
    signals.abort();
    let requests = counters.requests.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        requests,
        messages = counters.messages.load(std::sync::atomic::Ordering::Relaxed),
        seconds = elapsed.as_secs_f64(),
        requests_per_second = requests as f64 / elapsed.as_secs_f64().max(1e-9),
        configured = rate,
        "verify ended"
    );
    let r = report::build(&store, group.as_deref(), job).await?;
    store.close().await;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", report::render(&r));
    }
    match ended {
        Ok(Ended::Complete) if !r.totals.failed() => Ok(ExitCode::SUCCESS),
        Ok(Ended::Complete) => Ok(ExitCode::FAILURE),
        Ok(Ended::Stopped) => {
            eprintln!("timport verify: stopped before the end; run it again to resume");
            Ok(ExitCode::FAILURE)
        }
        Err(e @ verify::VerifyError::Read { .. }) if matches!(&e, verify::VerifyError::Read { error, .. } if error.class() == crate::tencent::ErrorClass::Auth) =>
        {
            eprintln!("timport verify: {e}; check tencent.secret_key and tencent.identifier");
            Ok(ExitCode::from(EXIT_CONFIG))
        }
        Err(e) => {
            eprintln!("timport verify: {e}; what was read is kept, run it again to resume");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn simulate(args: SimulateArgs) -> ExitCode {
    let _ = crate::telemetry::init(&crate::settings::LogSettings {
        format: crate::settings::LogFormat::Text,
        level: "info".into(),
    });
    let cfg: SimConfig = args.into();
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        s.cancel();
    });
    match simulator::run_until_stopped(cfg, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("timport simulate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Waits for SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The key used by the built-in simulator when none is configured (it never leaves the process).
const LOCAL_SIMULATOR_KEY: &str = "timport-local-simulator-key";

/// Ignores SIGHUP for the life of the process, logging each one. Installed before anything else
/// in `run`, so the default action (terminate) never applies once the daemon is starting.
fn ignore_hangup() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!(
                        "SIGHUP received and ignored: nothing to reload (restart to apply configuration changes) and no log file to reopen (logs go to stderr)"
                    );
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot handle SIGHUP; it would stop the daemon"),
    }
}

async fn run(
    settings: Settings,
    until_idle: bool,
    pre_ingest: Vec<PathBuf>,
) -> anyhow::Result<ExitCode> {
    ignore_hangup();
    settings.check_for_import()?;
    for w in settings.warnings() {
        tracing::warn!("{w}");
    }
    // The lock first: a second daemon must not even migrate the database under the first.
    let mut _lock = None;
    if let Database::Sqlite(path) = &settings.queue.database {
        _lock = match lock_daemon(path) {
            Ok(f) => Some(f),
            Err(e @ LockError::Held { .. }) => {
                eprintln!("timport: {e}");
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
            Err(e) => return Err(e.into()),
        };
    }
    let store = match open_store(&settings).await? {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let ha = settings.ha.enabled;
    if ha && until_idle {
        eprintln!(
            "timport: --until-idle is for one daemon; with ha.enabled the nodes run until stopped"
        );
        store.close().await;
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    let lock = if ha {
        QueueLock::HaNode
    } else {
        QueueLock::Daemon
    };
    let Some(_daemon_guard) = store.try_lock(lock).await? else {
        if ha {
            eprintln!(
                "timport: a `timport run` without ha.enabled is using database {}; stop it first (nodes of a high-availability group share the queue only with each other)",
                settings.queue.database
            );
        } else {
            eprintln!(
                "timport: another `timport run` is using database {} (its lock is held in the database); stop it first (one daemon per database, or set ha.enabled on every node)",
                settings.queue.database
            );
        }
        store.close().await;
        return Ok(ExitCode::from(EXIT_CONFIG));
    };
    let shutdown = CancellationToken::new();
    // Signals first: a SIGTERM during the initial scan stops cleanly too.
    let signal_token = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: stopping (requests in flight get the grace period)");
        systemd::stopping();
        signal_token.cancel();
    });

    // Where requests go: the built-in simulator, an explicit base_url, or the region.
    let mut sim = None;
    let secret_key = if settings.simulator.enabled {
        settings
            .secret_key()
            .unwrap_or_else(|_| SecretString::from(LOCAL_SIMULATOR_KEY.to_string()))
    } else {
        settings.secret_key()?
    };
    let base_url = if settings.simulator.enabled {
        let mut cfg = SimConfig::new(
            settings.tencent.sdkappid,
            settings.tencent.identifier.clone(),
            secret_key.clone(),
        );
        cfg.listen = settings
            .simulator
            .listen
            .parse()
            .map_err(|e| SettingsError::Key {
                key: "simulator.listen",
                message: format!("{e}"),
            })?;
        cfg.auto_create_groups = settings.simulator.auto_create_groups;
        cfg.require_accounts = settings.simulator.require_accounts;
        cfg.requests_per_second = settings.import.requests_per_second.max(200);
        cfg.faults.latency = settings.simulator.latency;
        for g in &settings.simulator.groups {
            let spec: simulator::GroupSpec = g.parse().map_err(|e: String| SettingsError::Key {
                key: "simulator.groups",
                message: e,
            })?;
            cfg.groups.push((spec.id, spec.create_time));
        }
        let handle = simulator::start(cfg)
            .await
            .context("starting the built-in simulator")?;
        let url = handle.base_url();
        tracing::warn!(url = %url, "built-in simulator enabled: nothing is sent to Tencent");
        sim = Some(handle);
        Some(url)
    } else if settings.tencent.base_url.is_empty() {
        None
    } else {
        Some(settings.tencent.base_url.clone())
    };
    let client_cfg = client_config(&settings, secret_key, base_url)?;
    // The recorder first, so the pacer's initial gauge is recorded.
    ops::metrics_handle();
    let pacer = Arc::new(Pacer::new(settings.import.requests_per_second));
    let client = TencentClient::new(client_cfg, Some(pacer)).map_err(|e| SettingsError::Key {
        key: "tencent.base_url",
        message: e.to_string(),
    })?;
    // High availability: this node sends only while it holds the queue's lease.
    let node = ha.then(|| {
        let n = crate::ha::Node::new(
            store.clone(),
            settings.ha.node(),
            crate::ha::Timing::new(&settings.ha, settings.tencent.request_timeout),
        );
        client.set_gate(n.gate());
        n
    });
    if !ha {
        crate::ha::set_role_gauge(&crate::ha::Role::Single);
    }

    // Health and metrics.
    let readiness = Arc::new(Readiness::default());
    let mut http_task = None;
    if let Some(addr) = settings.http_listen()? {
        let (listener, bound) = ops::bind(addr)
            .await
            .with_context(|| format!("binding http.listen {addr}"))?;
        tracing::info!(address = %bound, "health and metrics listening");
        if let Some(n) = &node {
            readiness.follow_role(n.roles());
        }
        http_task = Some(tokio::spawn(ops::serve(
            listener,
            store.clone(),
            readiness.clone(),
            shutdown.clone(),
        )));
    }

    // Ready: the store is migrated and writable, the client and the listener are up.
    systemd::ready();
    let health_task = tokio::spawn(systemd::follow_health(
        store.subscribe_health(),
        shutdown.clone(),
    ));

    // Job files named on the command line, then one pass over the spool and the intake table,
    // so `--until-idle` sees everything that is waiting now.
    'files: for path in &pre_ingest {
        for f in job_files(path)? {
            match ingest_file(Some(&store), &f, true, &shutdown).await {
                Ok(outcome) => print!("{}", describe(&f, &outcome)),
                Err(crate::intake::files::IngestError::Cancelled(_)) => break 'files,
                Err(e) => return Err(e).with_context(|| format!("ingesting {}", f.display())),
            }
        }
    }
    let intake_cfg = IntakeConfig {
        spool_dir: settings.queue.spool_dir.clone(),
        rescan_interval: settings.queue.rescan_interval,
        poll_interval: settings.queue.intake_poll_interval,
        settle: settings.queue.spool_settle,
    };
    let mut spool = intake_cfg.spool();
    loop {
        let scan = spool.scan(&store, &shutdown).await.with_context(|| {
            format!("scanning the spool {}", settings.queue.spool_dir.display())
        })?;
        // `--until-idle` imports what is waiting now, so files still being written are waited for.
        match scan.next_in {
            Some(d) if until_idle && scan.settling > 0 && !shutdown.is_cancelled() => {
                tokio::select! {
                    _ = tokio::time::sleep(d + std::time::Duration::from_millis(50)) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            _ => break,
        }
    }
    // A failure here (a disk that filled since the write probe) is the intake loop's to retry,
    // not a reason to exit; a corrupt file stops the engine at its first look.
    if node.is_none()
        && let Err(e) = table::poll_once(&store).await
    {
        tracing::warn!(error = %e, "intake table poll failed; the intake loop retries it");
    }

    // Bodies no longer needed (queue.keep_bodies): a pass now (beside the engine), then one a
    // minute.
    let retention_task = tokio::spawn(crate::retention::run(
        store.clone(),
        settings.queue.keep_bodies,
        shutdown.clone(),
    ));
    // The intake table: only the active node takes its rows (a standby still takes the job
    // files of its own spool).
    let table = match &node {
        None => tokio::sync::watch::channel(true).1,
        Some(n) => active_flag(n.roles()),
    };
    let intake_task = tokio::spawn(intake::run_with_table(
        store.clone(),
        intake_cfg,
        spool,
        table,
        shutdown.clone(),
    ));

    let engine_cfg = EngineConfig::from_settings(&settings.import, until_idle);
    let result = match &node {
        None => {
            engine::run(
                store.clone(),
                client,
                engine_cfg,
                shutdown.clone(),
                systemd::watchdog_tick,
            )
            .await
        }
        Some(n) => run_node(n, &store, client, engine_cfg, &shutdown).await,
    };
    let code = match result {
        Ok(EngineExit::Stopped) => ExitCode::SUCCESS,
        Ok(EngineExit::Idle(t)) => {
            let mut report = status::report(&store, None).await?;
            report.accounts_off = settings.import.accounts == crate::settings::AccountsMode::Off;
            print!("\n{}", status::render(&report));
            println!(
                "\nimport finished: {} imported, {} failed, {} blocked",
                t.imported, t.failed, t.blocked
            );
            if t.failed > 0
                || t.blocked > 0
                || report.members.failed > 0
                || report.accounts.failed > 0
            {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e @ EngineError::Auth { .. }) => {
            *readiness.stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            systemd::status(&format!("stopped: {e}"));
            eprintln!("timport: {e}");
            if until_idle {
                ExitCode::from(EXIT_CONFIG)
            } else {
                // Stay up (intake, status, /readyz reporting the stop) until told to stop.
                shutdown.cancelled().await;
                ExitCode::from(EXIT_CONFIG)
            }
        }
        Err(e @ EngineError::Database(_)) => {
            *readiness.stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            systemd::status(&format!("stopped: {e}"));
            eprintln!("timport: {e}");
            ExitCode::from(EXIT_DATABASE)
        }
        Err(e) => {
            eprintln!("timport: {e}");
            ExitCode::FAILURE
        }
    };
    shutdown.cancel();
    let _ = health_task.await;
    let _ = intake_task.await;
    let _ = retention_task.await;
    if until_idle {
        // The last pass a batch run owes (the daemon's passes were cut short by the stop).
        if let Err(e) = crate::retention::pass(
            &store,
            settings.queue.keep_bodies,
            &CancellationToken::new(),
        )
        .await
        {
            tracing::warn!(error = %e, "dropping imported bodies failed");
        }
    }
    if let Some(t) = http_task {
        let _ = t.await;
    }
    if let Some(s) = sim {
        s.shutdown().await;
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(code)
}

/// A node of a high-availability group: a standby until it is granted the lease, then the
/// engine while it holds it, and a standby again when it loses it; until `shutdown` or a fatal
/// error of the engine. The watchdog is fed all along.
async fn run_node(
    node: &crate::ha::Node,
    store: &Store,
    client: TencentClient,
    cfg: EngineConfig,
    shutdown: &CancellationToken,
) -> Result<EngineExit, EngineError> {
    tracing::info!(node = %node.name(), "high availability: standby, waiting for the lease");
    loop {
        let term = {
            let acquire = node.acquire(shutdown);
            tokio::pin!(acquire);
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    t = &mut acquire => break t,
                    _ = tick.tick() => systemd::watchdog_tick(),
                }
            }
        };
        let Some(term) = term else {
            return Ok(EngineExit::Stopped);
        };
        let engine_stop = shutdown.child_token();
        let engine_done = CancellationToken::new();
        let hold = node.hold(term, engine_stop.clone(), engine_done.clone());
        let engine = async {
            let r = engine::run(
                store.clone(),
                client.clone(),
                cfg.clone(),
                engine_stop.clone(),
                systemd::watchdog_tick,
            )
            .await;
            engine_done.cancel();
            r
        };
        let (result, _end) = tokio::join!(engine, hold);
        match result {
            Ok(EngineExit::Stopped) if !shutdown.is_cancelled() => continue,
            other => return other,
        }
    }
}

/// Follows a node's role as "is it the active node".
fn active_flag(
    mut roles: tokio::sync::watch::Receiver<crate::ha::Role>,
) -> tokio::sync::watch::Receiver<bool> {
    let is_active = |r: &crate::ha::Role| matches!(r, crate::ha::Role::Active { .. });
    let (tx, rx) = tokio::sync::watch::channel(is_active(&roles.borrow()));
    tokio::spawn(async move {
        while roles.changed().await.is_ok() {
            let a = is_active(&roles.borrow_and_update());
            if tx.send(a).is_err() {
                break;
            }
        }
    });
    rx
}

/// The job files at `path`: the file itself, or the job files directly inside a folder (sorted).
fn job_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && crate::intake::files::Format::of(p).is_some()
                    && !p
                        .file_name()
                        .is_some_and(|n| spool::ignored(&n.to_string_lossy()))
            })
            .collect();
        v.sort();
        Ok(v)
    } else {
        Ok(vec![path.to_path_buf()])
    }
}

/// The single-instance lock of `timport run` could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another `timport run` is using database {database}: lock {lock} is held by {holder}; stop it first (one daemon per database)"
    )]
    Held {
        database: PathBuf,
        lock: PathBuf,
        /// What the holder wrote: `pid N on HOST`, or why that is unknown.
        holder: String,
    },
    #[error("lock {lock} for database {database}: {source}")]
    Io {
        database: PathBuf,
        lock: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The database file as the lock knows it: symlinks resolved and the path made canonical, so
/// every spelling of one file (a symlink, `dir/../dir/q.db`, a relative path) gives the same
/// name. A file not created yet is named by its canonical folder (created if missing, as the store
/// would) and its file name.
pub fn canonical_database(db: &Path) -> std::io::Result<PathBuf> {
    match std::fs::canonicalize(db) {
        Ok(p) => Ok(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let name = db.file_name().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name")
            })?;
            let dir = match db.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(d) => d.to_path_buf(),
                None => PathBuf::from("."),
            };
            std::fs::create_dir_all(&dir)?;
            let dir = std::fs::canonicalize(&dir)?;
            // A dangling symlink: lock the file it will create.
            let joined = dir.join(name);
            match std::fs::read_link(&joined) {
                Ok(target) => Ok(dir.join(target)),
                Err(_) => Ok(joined),
            }
        }
        Err(e) => Err(e),
    }
}

/// One daemon per database: an exclusive `flock` on `<canonical database>.lock`, taken before the
/// database is opened or migrated and held for the process's life (the kernel drops it when the
/// process ends, however it ends). The holder writes its pid and host into the file, so a second
/// daemon names it.
pub fn lock_daemon(db: &Path) -> Result<std::fs::File, LockError> {
    use std::io::{Read, Seek, Write};
    let canonical = canonical_database(db).map_err(|source| LockError::Io {
        database: db.to_path_buf(),
        lock: PathBuf::from(format!("{}.lock", db.display())),
        source,
    })?;
    let mut name = canonical.as_os_str().to_owned();
    name.push(".lock");
    let lock = PathBuf::from(name);
    let io = |source| LockError::Io {
        database: canonical.clone(),
        lock: lock.clone(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&lock)
        .map_err(io)?;
    match f.try_lock() {
        Ok(()) => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let text = format!("pid {} on {}\n", std::process::id(), host.trim());
            f.set_len(0).map_err(io)?;
            f.rewind().map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            f.flush().map_err(io)?;
            Ok(f)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            let text = text.trim();
            let holder = if text.is_empty() {
                "a process that has not written its pid yet".to_string()
            } else {
                text.to_string()
            };
            Err(LockError::Held {
                database: canonical.clone(),
                lock: lock.clone(),
                holder,
            })
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}
