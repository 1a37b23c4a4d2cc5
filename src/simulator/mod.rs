//! `timport simulate`: a local stand-in for Tencent's group import REST endpoints that enforces
//! the documented rules and injects faults, for demos, rehearsals and tests.
//!
//! Role: [`start`] binds a listener (port 0 works) and serves
//! `POST /v4/group_open_http_svc/{import_group_msg, group_msg_get_simple, get_group_info,
//! import_group, import_group_member, set_unread_msg_num}` with the same query string, UserSig
//! checks and answer envelope as Tencent, plus admin routes outside `/v4`:
//! `POST /admin/groups {GroupId, CreateTime?, Type?}`, `GET /admin/state` (the
//! [`SimSnapshot`]), `POST|GET /admin/faults` ([`Faults`] as JSON, durations as "40ms"),
//! `POST /admin/outage {"refuse": "90s", "then_502": "40s"}` (see Outage below),
//! `POST /admin/tamper {"GroupId", "TopicId"?, "MsgSeq", "Action": "lose" | "alter" |
//! "duplicate" | "hole", "MsgBody"? }` (see Tampering below). Each request record carries its
//! arrival time (`at_ms`), so tests can count requests per second.
//!
//! Path prefixes: `POST /{prefix}/v4/{service}/{command}` (one or more non-empty segments before
//! `/v4`, e.g. `/node-a/v4/...`) is served exactly like the unprefixed route, and the request
//! record names the prefix (`prefix`, "" when none), so several daemons sharing one simulator,
//! each with its own `tencent.base_url` path, can be told apart. Admin routes have no prefixed
//! form (404); any other path is 404, another method on a `/v4` path 405.
//!
//! Rules (see `tencent-api.md`; choices where the doc is open are marked *):
//! - Query: missing usersig 70002; sdkappid missing 60012, not this app 70014; identifier missing
//!   60004; `random` not a u32 or `contenttype` ≠ json: 60002*. UserSig: malformed 70003, bad
//!   signature 70009, made for another app 70014, for another identifier 70013, expired 70001.
//!   An identifier other than the configured admin: 70013*.
//! - Quota: `requests_per_second` per app over all endpoints, 60011, counted by the
//!   [`Limiter`] (`--limiter`): `sliding` (default, the strict reading of `tencent-api.md` §9: at
//!   most that many arrivals in any last second, refused arrivals included), `fixed` (a counter
//!   per one-second window) or `bucket` (a token bucket of one second's worth, starting full).
//!   The quota is the server's own, independent of what the daemon is configured with.
//! - import_group_msg: group missing 10010 (or auto-created with CreateTime 0 when
//!   `auto_create_groups`); empty or > 7 messages, an element type other than Text, Face,
//!   Location, Custom, a missing MsgContent, more than one TIMCustomElem, or an empty
//!   From_Account: request-level 10004*. Per message, in order: a Random equal to that of a
//!   message in the same (group, topic) that *arrived* within `dedup_window` is not stored and
//!   answers Result 0 with the original MsgSeq and MsgTime (content and sender are ignored*;
//!   after the window the same Random is stored again); serialized MsgBody > 12,000 bytes: 80002;
//!   SendTime must be < now, > CreateTime and ≥ the newest SendTime of that history (> with
//!   `strict_equal_time`), else 10004. MsgSeq counts from 1 per (group, topic); MsgTime =
//!   SendTime. The answer is OK/0 with per-message Results even when some failed*. Importing
//!   zeroes every member's unread count (documented side effect).
//! - get_group_info: 1–50 groups; per group ErrorCode 10010 when missing; LastMsgTime 0* and
//!   NextMsgSeq 1 for an empty group (topics do not count).
//! - group_msg_get_simple: newest first, ≤ 20 per page, Seq ≤ ReqMsgSeq, IsFinished 1 when the
//!   page reaches MsgSeq 1.
//! - import_group: 10021 when the ID exists; CreateTime defaults to now; the owner becomes a
//!   member. import_group_member: ≤ 300 (else 10004); Result 1 added, 2 already a member, 0 when
//!   JoinTime is not strictly between CreateTime and now or Role is not "Admin"; unread capped.
//! - set_unread_msg_num: capped at the group's message count; group missing 10010; not a member
//!   10007*.
//! - `POST /v4/im_open_login_svc/multiaccount_import`: both forms, `{"Accounts": [ids]}` (creates
//!   missing accounts, keeps existing profiles) and `{"AccountList": [{UserID, Nick?, FaceUrl?}]}`
//!   (creates or overwrites the profile); 1–100 per request (else 70206*), its own quota
//!   (`account_requests_per_second`, 60007); IDs that are empty, over 32 bytes or hold a control
//!   character come back in `FailAccounts`*.
//! - `require_accounts` (`--require-accounts`): a From_Account that is not an account refuses the
//!   whole import_group_msg with 10019 (`--unknown-sender whole-request`, the strict reading) or
//!   gets Result 10019 alone (`per-message`); an unknown Owner_Account refuses import_group
//!   (10019); an unknown member gets Result 0 from import_group_member.
//!
//! Faults, drawn per request after `latency`: `p_http_502` (HTTP 502, nothing applied),
//! `p_reset_before` (connection aborted with RST before processing, nothing applied),
//! `p_error_10002` (answer 10002, nothing applied), `p_rate_limit` (answer 60007, nothing
//! applied), `p_drop_response_after_apply` (processed and applied, then the connection is aborted
//! without an answer). See `server` for how a connection is aborted.
//!
//! Tampering (for `timport verify`; [`Tamper`], [`SimHandle::lose_message`] and the others):
//! a message the server *loses* is left out of every read (its MsgSeq stays used, so the page
//! skips it); an *altered* one reads back with another body; a *duplicated* one gets a copy at
//! the end of the history (same sender, SendTime, Random and body, the next MsgSeq); a
//! *hole-punched* one reads back as a hole, as the retention switch (`--retention`) makes
//! expired messages do.
//!
//! Outage ([`SimHandle::outage`], `POST /admin/outage`): for `refuse` the listening socket is
//! closed, so new connections are refused by the kernel (ECONNREFUSED) and requests arriving on
//! keep-alive connections opened before are aborted without an answer (fault `outage_refuse` in
//! the request log); the same address is bound again when the time is over. Then for `then_502`
//! every `/v4` request answers HTTP 502 without applying (fault `outage_502`); then healthy.
//! Groups, histories and the request log are kept. Admin routes are unreachable while refusing.
//!
//! Stopping and recovery: [`SimHandle::shutdown`] (or cancelling the token given to
//! [`run_until_stopped`]) stops accepting, closes idle connections and waits up to 5 s for
//! in-flight requests before aborting the server task. State lives in memory only: a restart
//! begins again from the configured groups. The request log keeps the newest 100,000 records.

mod server;
pub mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use state::{
    AccountSnapshot, GroupSnapshot, Limiter, MemberSnapshot, RequestRecord, SimSnapshot,
    StoredMessage, Tamper, UnknownSender,
};

use server::{ConnKill, KillableListener, OutageSwitch, Shared};
use state::{Rules, World};

/// The service name of the import endpoints.
pub const GROUP_SERVICE: &str = crate::tencent::GROUP_SERVICE;

/// Injected faults. Probabilities are in 0..=1 and drawn independently per request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Added before processing each `/v4` request.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    pub p_http_502: f64,
    pub p_reset_before: f64,
    pub p_drop_response_after_apply: f64,
    pub p_error_10002: f64,
    pub p_rate_limit: f64,
    /// The commands the probabilities apply to (e.g. `["import_group_msg"]`); empty: all.
    pub endpoints: Vec<String>,
}

impl Faults {
    /// Every probability is a number in 0..=1.
    pub fn validate(&self) -> Result<(), String> {
        for (name, p) in [
            ("p_http_502", self.p_http_502),
            ("p_reset_before", self.p_reset_before),
            (
                "p_drop_response_after_apply",
                self.p_drop_response_after_apply,
            ),
            ("p_error_10002", self.p_error_10002),
            ("p_rate_limit", self.p_rate_limit),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name} must be between 0 and 1, got {p}"));
            }
        }
        Ok(())
    }
}

/// Simulator configuration.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub listen: SocketAddr,
    pub sdkappid: u64,
    /// The App admin account requests must use.
    pub identifier: String,
    pub secret_key: SecretString,
    /// Groups that exist at start: ID and CreateTime (`None` = 0, so any SendTime is later).
    pub groups: Vec<(String, Option<i64>)>,
    pub requests_per_second: u32,
    /// How the quota is counted.
    pub limiter: Limiter,
    pub dedup_window: Duration,
    /// A SendTime equal to the newest one in the history is invalid (Result 10004).
    pub strict_equal_time: bool,
    pub faults: Faults,
    /// import_group_msg to an unknown group creates it (CreateTime 0) instead of 10010.
    pub auto_create_groups: bool,
    /// Messages with a SendTime older than this read back as holes (expired history).
    pub history_retention: Option<Duration>,
    /// Senders, owners and members must be accounts (imported by multiaccount_import).
    pub require_accounts: bool,
    /// With `require_accounts`: refuse the whole import_group_msg, or answer per message.
    pub unknown_sender: UnknownSender,
    /// multiaccount_import's own quota, calls/s (documented: 100).
    pub account_requests_per_second: u32,
}

impl SimConfig {
    /// Loopback on a free port, 200 requests/s in a sliding window, 300 s dedup window, no
    /// faults, no groups.
    pub fn new(sdkappid: u64, identifier: impl Into<String>, secret_key: SecretString) -> Self {
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            sdkappid,
            identifier: identifier.into(),
            secret_key,
            groups: Vec::new(),
            requests_per_second: 200,
            limiter: Limiter::default(),
            dedup_window: Duration::from_secs(300),
            strict_equal_time: false,
            faults: Faults::default(),
            auto_create_groups: false,
            history_retention: None,
            require_accounts: false,
            unknown_sender: UnknownSender::default(),
            account_requests_per_second: 100,
        }
    }
}

/// `--group ID[:CREATE_TIME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    pub id: String,
    pub create_time: Option<i64>,
}

impl std::str::FromStr for GroupSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, create_time) = match s.rsplit_once(':') {
            Some((id, t)) => match t.parse::<i64>() {
                Ok(t) => (id, Some(t)),
                Err(_) => return Err(format!("{s:?}: CREATE_TIME after ':' must be an integer")),
            },
            None => (s, None),
        };
        if id.is_empty() {
            return Err(format!("{s:?}: empty group ID"));
        }
        Ok(GroupSpec {
            id: id.to_owned(),
            create_time,
        })
    }
}

fn parse_probability(s: &str) -> Result<f64, String> {
    let p: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("{s}: a probability is between 0 and 1"))
    }
}

fn parse_secret(s: &str) -> Result<SecretString, String> {
    if s.is_empty() {
        Err("the secret key must not be empty".into())
    } else {
        Ok(SecretString::from(s.to_owned()))
    }
}

/// Arguments of `timport simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The simulated SDKAppID.
    #[arg(long, default_value_t = 1_400_000_000)]
    pub sdkappid: u64,
    /// The App admin account requests must use.
    #[arg(long, default_value = "administrator")]
    pub identifier: String,
    /// The app's secret key (for UserSig checks).
    #[arg(long, env = "TIMPORT_SIM_SECRET_KEY", hide_env_values = true, value_parser = parse_secret)]
    pub secret_key: SecretString,
    /// A group that exists at start, optionally with its CreateTime (Unix seconds). Repeatable.
    #[arg(long = "group", value_name = "ID[:CREATE_TIME]")]
    pub groups: Vec<GroupSpec>,
    /// Per-app quota over all endpoints, requests/s (the server's own, whatever the daemon is
    /// configured with).
    #[arg(long, default_value_t = 200)]
    pub rps: u32,
    /// How the quota is counted: `sliding` (the strict reading: any last second of arrivals,
    /// refused ones included), `fixed` (one-second windows) or `bucket` (a token bucket of one
    /// second's worth, starting full).
    #[arg(long, value_enum, default_value_t = Limiter::Sliding)]
    pub limiter: Limiter,
    /// How long a message's Random suppresses repeats (measured on arrival).
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub dedup_window: Duration,
    /// Treat a SendTime equal to the group's newest message as invalid.
    #[arg(long)]
    pub strict_equal_time: bool,
    /// Delay added to every request.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// Probability of an HTTP 502 (nothing applied).
    #[arg(long = "p-502", default_value_t = 0.0, value_parser = parse_probability)]
    pub p_502: f64,
    /// Probability of a connection reset before processing (nothing applied).
    #[arg(long, default_value_t = 0.0, value_parser = parse_probability)]
    pub p_reset: f64,
    /// Probability of applying a request and then dropping the connection without an answer.
    #[arg(long, default_value_t = 0.0, value_parser = parse_probability)]
    pub p_drop_response: f64,
    /// Probability of answering 10002 (nothing applied).
    #[arg(long = "p-10002", default_value_t = 0.0, value_parser = parse_probability)]
    pub p_10002: f64,
    /// Probability of answering 60007 (nothing applied).
    #[arg(long, default_value_t = 0.0, value_parser = parse_probability)]
    pub p_rate_limit: f64,
    /// Create unknown groups on first import instead of answering 10010.
    #[arg(long)]
    pub auto_create_groups: bool,
    /// History retention: messages whose SendTime is older than this come back from
    /// group_msg_get_simple as holes (IsPlaceMsg 1, no sender, no Random), as Tencent's expired
    /// history does. Off by default.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub retention: Option<Duration>,
    /// Senders, owners and members must be accounts, imported by multiaccount_import first.
    #[arg(long)]
    pub require_accounts: bool,
    /// With --require-accounts, a sender that is not an account: `whole-request` (the strict
    /// reading: the whole import_group_msg is refused with 10019) or `per-message` (Result 10019
    /// for that message alone).
    #[arg(long, value_enum, default_value_t = UnknownSender::WholeRequest)]
    pub unknown_sender: UnknownSender,
    /// multiaccount_import's own quota, calls/s.
    #[arg(long, default_value_t = 100)]
    pub account_rps: u32,
}

impl From<SimulateArgs> for SimConfig {
    fn from(a: SimulateArgs) -> Self {
        SimConfig {
            listen: a.listen,
            sdkappid: a.sdkappid,
            identifier: a.identifier,
            secret_key: a.secret_key,
            groups: a
                .groups
                .into_iter()
                .map(|g| (g.id, g.create_time))
                .collect(),
            requests_per_second: a.rps,
            limiter: a.limiter,
            dedup_window: a.dedup_window,
            strict_equal_time: a.strict_equal_time,
            faults: Faults {
                latency: a.latency,
                p_http_502: a.p_502,
                p_reset_before: a.p_reset,
                p_drop_response_after_apply: a.p_drop_response,
                p_error_10002: a.p_10002,
                p_rate_limit: a.p_rate_limit,
                endpoints: Vec::new(),
            },
            auto_create_groups: a.auto_create_groups,
            history_retention: a.retention,
            require_accounts: a.require_accounts,
            unknown_sender: a.unknown_sender,
            account_requests_per_second: a.account_rps,
        }
    }
}

/// A running simulator.
pub struct SimHandle {
    /// The bound address (the real port when 0 was asked for).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SimHandle {
    /// `http://{addr}`, for `tencent.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A copy of the whole state: groups with histories and members, and the request log.
    pub fn state(&self) -> SimSnapshot {
        self.shared.world().snapshot()
    }

    /// Replace the faults (probabilities outside 0..=1 are rejected).
    pub fn set_faults(&self, faults: Faults) -> Result<(), String> {
        faults.validate()?;
        self.shared.set_faults(faults);
        Ok(())
    }

    /// Simulate an outage from now on: for `refuse` the listening socket is closed (connects are
    /// refused, requests on connections opened before are aborted without an answer), then for
    /// `then_502` every `/v4` request answers HTTP 502 without applying, then healthy again.
    /// State is kept. A new call replaces the previous plan (zero durations end it).
    pub fn outage(&self, refuse: Duration, then_502: Duration) {
        self.shared.outage.set(refuse, then_502);
    }

    /// Create an account; false if it already exists.
    pub fn add_account(&self, id: &str) -> bool {
        self.shared.world().add_account(id)
    }

    /// Tamper with the message at `seq` of `group` (or of its `topic`); see [`Tamper`].
    pub fn tamper(
        &self,
        group: &str,
        topic: Option<&str>,
        seq: u64,
        what: Tamper,
    ) -> Result<Option<u64>, String> {
        self.shared.world().tamper(group, topic, seq, what)
    }

    /// The server loses the message at `seq`: no read returns it.
    pub fn lose_message(&self, group: &str, topic: Option<&str>, seq: u64) -> Result<(), String> {
        self.tamper(group, topic, seq, Tamper::Lose).map(|_| ())
    }

    /// The message at `seq` reads back with `body`.
    pub fn alter_message(
        &self,
        group: &str,
        topic: Option<&str>,
        seq: u64,
        body: serde_json::Value,
    ) -> Result<(), String> {
        self.tamper(group, topic, seq, Tamper::Alter { msg_body: body })
            .map(|_| ())
    }

    /// A copy of the message at `seq` lands at the end of the history; returns its MsgSeq.
    pub fn duplicate_message(
        &self,
        group: &str,
        topic: Option<&str>,
        seq: u64,
    ) -> Result<u64, String> {
        self.tamper(group, topic, seq, Tamper::Duplicate)
            .map(|s| s.unwrap_or_default())
    }

    /// The message at `seq` reads back as a hole (IsPlaceMsg 1).
    pub fn punch_hole(&self, group: &str, topic: Option<&str>, seq: u64) -> Result<(), String> {
        self.tamper(group, topic, seq, Tamper::Hole).map(|_| ())
    }

    /// Create a group; false if it already exists.
    pub fn add_group(&self, id: &str, create_time: i64) -> bool {
        self.shared.world().add_group(id, create_time, "Public")
    }

    /// Stop the server: no new connections, idle ones closed, in-flight requests get up to 5 s.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// Bind and serve in a background task.
pub async fn start(cfg: SimConfig) -> anyhow::Result<SimHandle> {
    cfg.faults.validate().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(!cfg.identifier.is_empty(), "identifier must not be empty");
    let mut world = World::new(Rules {
        requests_per_second: cfg.requests_per_second,
        limiter: cfg.limiter,
        dedup_window: cfg.dedup_window,
        strict_equal_time: cfg.strict_equal_time,
        auto_create_groups: cfg.auto_create_groups,
        history_retention: cfg.history_retention,
        require_accounts: cfg.require_accounts,
        unknown_sender: cfg.unknown_sender,
        account_requests_per_second: cfg.account_requests_per_second,
    });
    for (id, create_time) in &cfg.groups {
        world.add_group(id, create_time.unwrap_or(0), "Public");
    }
    let shared = Arc::new(Shared {
        sdkappid: cfg.sdkappid,
        identifier: cfg.identifier,
        secret_key: cfg.secret_key,
        world: Mutex::new(world),
        faults: Mutex::new(cfg.faults),
        outage: Arc::new(OutageSwitch::default()),
    });
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("simulator could not listen on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let listener = KillableListener::new(listener, shared.outage.clone())?;
    let app = server::router(shared.clone()).into_make_service_with_connect_info::<ConnKill>();
    let stop = CancellationToken::new();
    let signal = stop.clone();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { signal.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "simulator server stopped with an error");
        }
    });
    tracing::info!(%addr, "simulator listening");
    Ok(SimHandle {
        addr,
        shared,
        stop,
        task,
    })
}

/// Run until `shutdown` is cancelled (the CLI's `timport simulate`).
pub async fn run_until_stopped(cfg: SimConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let handle = start(cfg).await?;
    shutdown.cancelled().await;
    tracing::info!("simulator stopping");
    handle.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_spec_parses() {
        assert_eq!(
            "g1:1700000000".parse::<GroupSpec>(),
            Ok(GroupSpec {
                id: "g1".into(),
                create_time: Some(1_700_000_000)
            })
        );
        assert_eq!(
            "@TGS#abc".parse::<GroupSpec>(),
            Ok(GroupSpec {
                id: "@TGS#abc".into(),
                create_time: None
            })
        );
        assert!("g:x".parse::<GroupSpec>().is_err());
        assert!(":5".parse::<GroupSpec>().is_err());
    }

    #[test]
    fn args_parse_into_config() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: SimulateArgs,
        }
        let cli = Cli::try_parse_from([
            "x",
            "--secret-key",
            "k",
            "--group",
            "a:5",
            "--group",
            "b",
            "--p-502",
            "0.5",
            "--latency",
            "40ms",
            "--dedup-window",
            "2s",
            "--limiter",
            "fixed",
        ])
        .expect("parses");
        let cfg = SimConfig::from(cli.args);
        assert_eq!(cfg.groups, vec![("a".into(), Some(5)), ("b".into(), None)]);
        assert_eq!(cfg.faults.p_http_502, 0.5);
        assert_eq!(cfg.faults.latency, Duration::from_millis(40));
        assert_eq!(cfg.dedup_window, Duration::from_secs(2));
        assert_eq!(cfg.listen.port(), 8080);
        assert_eq!(cfg.limiter, Limiter::Fixed);
        let default = Cli::try_parse_from(["x", "--secret-key", "k"]).expect("parses");
        assert_eq!(SimConfig::from(default.args).limiter, Limiter::Sliding);
        assert!(Cli::try_parse_from(["x", "--secret-key", "k", "--p-reset", "1.5"]).is_err());
    }
}
