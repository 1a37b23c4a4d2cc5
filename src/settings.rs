//! Configuration: `config/default.toml` (embedded in the binary), then the file given (`--config`,
//! `$TIMPORT_CONFIG`, or `config/timport.toml` when present), then `TIMPORT__SECTION__KEY`
//! environment variables, which win.
//!
//! Loading is a pure function of its inputs (file path and an environment map), so tests can check
//! the layering without touching the process environment. Every failure is a [`SettingsError`]
//! naming the key; the binary exits with code 2 on it. The secret key is held in a
//! [`SecretString`] and never printed: `Debug` of [`Settings`] shows it as redacted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// The built-in defaults, the same text as `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Where the configuration file is looked for when neither `--config` nor `$TIMPORT_CONFIG` is set.
pub const DEFAULT_CONFIG_PATH: &str = "config/timport.toml";

/// A configuration problem. The message always names the key (or the file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("invalid configuration: {key}: {message}")]
    Key { key: &'static str, message: String },
}

impl SettingsError {
    fn key(key: &'static str, message: impl Into<String>) -> Self {
        SettingsError::Key {
            key,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub tencent: TencentSettings,
    pub queue: QueueSettings,
    pub import: ImportSettings,
    pub log: LogSettings,
    pub http: HttpSettings,
    pub simulator: SimulatorSettings,
    pub verify: VerifySettings,
    pub ha: HaSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TencentSettings {
    pub sdkappid: u64,
    pub identifier: String,
    #[serde(default)]
    pub secret_key: Option<SecretString>,
    #[serde(default)]
    pub secret_key_file: String,
    pub region: String,
    pub base_url: String,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub usersig_validity: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    pub database: Database,
    pub spool_dir: PathBuf,
    #[serde(with = "humantime_serde")]
    pub rescan_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub intake_poll_interval: Duration,
    /// How long a spool file's size, times and inode must hold before it is taken.
    #[serde(with = "humantime_serde")]
    pub spool_settle: Duration,
    pub synchronous: Synchronous,
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
    /// How long the bodies of imported messages are kept (see [`KeepBodies`]).
    pub keep_bodies: KeepBodies,
    /// PostgreSQL: the most connections one process opens to the database.
    pub pool_size: u32,
}

/// `queue.database`: the queue's SQLite file, or a PostgreSQL URL (`postgres://` or
/// `postgresql://`). The URL's password is held as a secret: `Display` and `Debug` show the URL
/// with the password (and any `password` query parameter) as `***`.
#[derive(Clone, Deserialize)]
#[serde(from = "String")]
pub enum Database {
    Sqlite(PathBuf),
    Postgres(PostgresUrl),
    /// Neither (`mysql://…`, a malformed URL): [`Settings::validate`] refuses it with this reason,
    /// which never repeats the value given.
    Unsupported(String),
}

/// A PostgreSQL connection URL, with what may be shown of it.
#[derive(Clone)]
pub struct PostgresUrl {
    url: SecretString,
    redacted: String,
    host: String,
}

impl PostgresUrl {
    /// The URL as given, password included: only for connecting.
    pub fn expose(&self) -> &str {
        self.url.expose_secret()
    }

    /// The URL with its password replaced by `***`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// `host:port` (or the socket folder) the URL names.
    pub fn host(&self) -> &str {
        &self.host
    }
}

impl From<String> for Database {
    fn from(s: String) -> Database {
        let scheme = s.split_once("://").map(|(scheme, _)| scheme).filter(|sc| {
            !sc.is_empty()
                && sc
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        });
        let Some(scheme) = scheme else {
            return Database::Sqlite(PathBuf::from(s));
        };
        if !matches!(
            scheme.to_ascii_lowercase().as_str(),
            "postgres" | "postgresql"
        ) {
            return Database::Unsupported(format!(
                "{scheme}:// is not supported: give a file path (SQLite) or a postgres:// or postgresql:// URL (PostgreSQL)"
            ));
        }
        match url::Url::parse(&s) {
            Ok(mut u) => {
                let host = match (u.host_str(), u.port()) {
                    (Some(h), Some(p)) => format!("{h}:{p}"),
                    (Some(h), None) if !h.is_empty() => format!("{h}:5432"),
                    _ => u
                        .query_pairs()
                        .find(|(k, _)| k == "host")
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_else(|| "localhost:5432".to_string()),
                };
                if u.password().is_some() {
                    let _ = u.set_password(Some("***"));
                }
                let secret_keys = ["password", "sslpassword"];
                if u.query_pairs()
                    .any(|(k, _)| secret_keys.contains(&k.as_ref()))
                {
                    let pairs: Vec<(String, String)> = u
                        .query_pairs()
                        .map(|(k, v)| {
                            let v = if secret_keys.contains(&k.as_ref()) {
                                "***".to_string()
                            } else {
                                v.into_owned()
                            };
                            (k.into_owned(), v)
                        })
                        .collect();
                    u.query_pairs_mut().clear().extend_pairs(pairs);
                }
                Database::Postgres(PostgresUrl {
                    url: SecretString::from(s),
                    redacted: u.to_string(),
                    host,
                })
            }
            Err(e) => Database::Unsupported(format!("is not a valid PostgreSQL URL: {e}")),
        }
    }
}

impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(p) => write!(f, "{}", p.display()),
            Database::Postgres(u) => f.write_str(u.redacted()),
            Database::Unsupported(why) => write!(f, "(unsupported: {why})"),
        }
    }
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PostgresUrl").field(&self.redacted).finish()
    }
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(p) => f.debug_tuple("Sqlite").field(p).finish(),
            Database::Postgres(u) => f.debug_tuple("Postgres").field(&u.redacted()).finish(),
            Database::Unsupported(why) => f.debug_tuple("Unsupported").field(why).finish(),
        }
    }
}

/// `queue.keep_bodies`: when the body of an imported message is dropped (its checkpoint fields,
/// MsgSeq, sender, times and Random, and a SHA-256 of the body stay for `status` and `verify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum KeepBodies {
    /// `"forever"`: never dropped.
    Forever,
    /// `"until_verified"` (the default): dropped once `timport verify` found the message verified.
    UntilVerified,
    /// A duration such as `"30d"`: dropped that long after the message was imported, verified or
    /// not.
    For(Duration),
}

impl TryFrom<String> for KeepBodies {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        match s.trim() {
            "forever" => Ok(KeepBodies::Forever),
            "until_verified" => Ok(KeepBodies::UntilVerified),
            other => humantime::parse_duration(other)
                .map(KeepBodies::For)
                .map_err(|e| {
                    format!(
                        "queue.keep_bodies: {other:?} is not \"until_verified\", \"forever\" or a duration such as \"30d\" ({e})"
                    )
                }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Normal,
    Full,
}

/// `import.accounts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountsMode {
    /// Import every sender, owner and member as an account before it is needed.
    Auto,
    /// Assume the accounts exist.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TiePolicy {
    Fail,
    Nudge,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportSettings {
    pub requests_per_second: u32,
    pub batch_size: usize,
    pub max_lanes: usize,
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    pub tie_policy: TiePolicy,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    #[serde(with = "humantime_serde")]
    pub progress_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub commit_window: Duration,
    pub accounts: AccountsMode,
    pub account_requests_per_second: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatorSettings {
    pub enabled: bool,
    pub listen: String,
    pub groups: Vec<String>,
    pub auto_create_groups: bool,
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    pub require_accounts: bool,
}

/// `timport verify`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifySettings {
    /// Read requests per second (at most `import.requests_per_second - 1`, shared with a running
    /// daemon; see docs/OPERATIONS.md).
    pub requests_per_second: u32,
}

/// `[ha]`: several `timport run` nodes on one PostgreSQL queue, one of them sending (see
/// docs/OPERATIONS.md, "High availability").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaSettings {
    pub enabled: bool,
    /// This node's name in the lease, status and logs; empty: the machine's hostname.
    pub node_name: String,
    /// How long a lease lasts in the database after each renewal.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How often the active node renews, and how often a standby looks for an expired lease.
    #[serde(with = "humantime_serde")]
    pub renew_every: Duration,
    /// Taken off the active node's own reckoning of its lease: it stops sending this much
    /// before the lease can expire in the database.
    #[serde(with = "humantime_serde")]
    pub margin: Duration,
}

impl HaSettings {
    /// The node name: `ha.node_name`, else the hostname, else `timport`.
    pub fn node(&self) -> String {
        let n = self.node_name.trim();
        if !n.is_empty() {
            return n.to_owned();
        }
        hostname().unwrap_or_else(|| "timport".to_owned())
    }
}

/// The machine's hostname (the kernel's, as `hostname` prints it), if it has a usable one.
fn hostname() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty())
}

/// Which file to layer over the defaults: the `--config` flag, else `$TIMPORT_CONFIG`, else
/// `config/timport.toml` if it exists. An explicitly named file must exist.
pub fn config_path(flag: Option<&Path>, env: &HashMap<String, String>) -> Option<(PathBuf, bool)> {
    if let Some(p) = flag {
        return Some((p.to_path_buf(), true));
    }
    if let Some(p) = env.get("TIMPORT_CONFIG").filter(|p| !p.is_empty()) {
        return Some((PathBuf::from(p), true));
    }
    let default = PathBuf::from(DEFAULT_CONFIG_PATH);
    default.exists().then_some((default, false))
}

impl Settings {
    /// Loads the settings for this process: flag, then the real environment.
    pub fn load(flag: Option<&Path>) -> Result<Settings, SettingsError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Settings::load_from(flag, &env)
    }

    /// Loads the settings from the defaults, the file chosen by [`config_path`] and `env`.
    pub fn load_from(
        flag: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<Settings, SettingsError> {
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some((path, required)) = config_path(flag, env) {
            if required && !path.is_file() {
                return Err(SettingsError::File {
                    path,
                    message: "not found (given by --config or $TIMPORT_CONFIG)".into(),
                });
            }
            let text = std::fs::read_to_string(&path).map_err(|e| SettingsError::File {
                path: path.clone(),
                message: e.to_string(),
            })?;
            // Parse separately first so a syntax error names the file rather than "config".
            Config::builder()
                .add_source(File::from_str(&text, FileFormat::Toml))
                .build()
                .map_err(|e| SettingsError::File {
                    path: path.clone(),
                    message: redact_syntax_error(&e.to_string()),
                })?;
            builder = builder.add_source(File::from_str(&text, FileFormat::Toml));
        }
        let timport_env: HashMap<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("TIMPORT__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix("TIMPORT")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("simulator.groups")
                .source(Some(timport_env)),
        );
        let cfg = builder
            .build()
            .map_err(|e| SettingsError::Invalid(redact_config_error(e.to_string())))?;
        let settings: Settings = cfg
            .try_deserialize()
            .map_err(|e| SettingsError::Invalid(redact_config_error(e.to_string())))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks ranges and combinations that types alone do not express.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let i = &self.import;
        if !(1..=7).contains(&i.batch_size) {
            return Err(SettingsError::key(
                "import.batch_size",
                format!(
                    "{} is outside 1..=7 (Tencent takes at most 7 messages per request)",
                    i.batch_size
                ),
            ));
        }
        if i.requests_per_second == 0 {
            return Err(SettingsError::key(
                "import.requests_per_second",
                "must be at least 1",
            ));
        }
        if i.account_requests_per_second == 0 {
            return Err(SettingsError::key(
                "import.account_requests_per_second",
                "must be at least 1",
            ));
        }
        if self.verify.requests_per_second == 0 {
            return Err(SettingsError::key(
                "verify.requests_per_second",
                "must be at least 1",
            ));
        }
        if i.max_lanes == 0 {
            return Err(SettingsError::key("import.max_lanes", "must be at least 1"));
        }
        if i.commit_window > Duration::from_secs(1) {
            return Err(SettingsError::key(
                "import.commit_window",
                "must be at most 1s (every lane waits up to this long for its record)",
            ));
        }
        if i.max_attempts == 0 {
            return Err(SettingsError::key(
                "import.max_attempts",
                "must be at least 1",
            ));
        }
        if i.backoff_base.is_zero() || i.backoff_max < i.backoff_base {
            return Err(SettingsError::key(
                "import.backoff_max",
                "backoff_base must be above 0 and backoff_max at least backoff_base",
            ));
        }
        let t = &self.tencent;
        if t.request_timeout <= Duration::from_secs(3) {
            return Err(SettingsError::key(
                "tencent.request_timeout",
                "must be longer than the server's own 3s timeout",
            ));
        }
        self.validate_ha()?;
        if t.usersig_validity < Duration::from_secs(3600) {
            return Err(SettingsError::key(
                "tencent.usersig_validity",
                "must be at least 1h",
            ));
        }
        if !(t.base_url.is_empty()
            || t.base_url.starts_with("https://")
            || t.base_url.starts_with("http://"))
        {
            return Err(SettingsError::key(
                "tencent.base_url",
                "must start with https:// (or http:// for a simulator or local proxy)",
            ));
        }
        const REGIONS: [&str; 8] = [
            "china",
            "singapore",
            "seoul",
            "tokyo",
            "frankfurt",
            "mumbai",
            "silicon-valley",
            "jakarta",
        ];
        if !REGIONS.contains(&t.region.as_str()) {
            return Err(SettingsError::key(
                "tencent.region",
                format!(
                    "unknown region {:?}; one of {}",
                    t.region,
                    REGIONS.join(", ")
                ),
            ));
        }
        if t.identifier.trim().is_empty() {
            return Err(SettingsError::key(
                "tencent.identifier",
                "must not be empty",
            ));
        }
        if self.has_inline_key() && !t.secret_key_file.is_empty() {
            return Err(SettingsError::key(
                "tencent.secret_key",
                "set either tencent.secret_key or tencent.secret_key_file, not both",
            ));
        }
        match &self.queue.database {
            Database::Sqlite(p) if p.as_os_str().is_empty() => {
                return Err(SettingsError::key("queue.database", "must not be empty"));
            }
            Database::Unsupported(why) => {
                return Err(SettingsError::key("queue.database", why.clone()));
            }
            _ => {}
        }
        if self.queue.spool_dir.as_os_str().is_empty() {
            return Err(SettingsError::key("queue.spool_dir", "must not be empty"));
        }
        if self.queue.spool_settle > Duration::from_secs(3600) {
            return Err(SettingsError::key(
                "queue.spool_settle",
                "must be at most 1h (a file waits this long after its last change)",
            ));
        }
        check_log_level(&self.log.level)?;
        if self.queue.intake_poll_interval.is_zero() || self.queue.rescan_interval.is_zero() {
            return Err(SettingsError::key(
                "queue.intake_poll_interval",
                "poll and rescan intervals must be above 0",
            ));
        }
        self.http_listen()?;
        if self.simulator.enabled {
            self.simulator
                .listen
                .parse::<SocketAddr>()
                .map_err(|e| SettingsError::key("simulator.listen", e.to_string()))?;
        }
        Ok(())
    }

    /// Checks that the configured paths can be what they are meant to be: `queue.database` a file
    /// (or absent) in a folder, `queue.spool_dir` a folder (or absent). Reads the file system, so
    /// it is separate from [`Settings::validate`]; commands call it right after loading.
    pub fn check_paths(&self) -> Result<(), SettingsError> {
        if let Database::Sqlite(db) = &self.queue.database {
            check_database_path(db)?;
        }
        let spool = &self.queue.spool_dir;
        if spool.exists() && !spool.is_dir() {
            return Err(SettingsError::key(
                "queue.spool_dir",
                format!("{} is not a folder", spool.display()),
            ));
        }
        if let Some(blocker) = non_folder_ancestor(spool) {
            return Err(SettingsError::key(
                "queue.spool_dir",
                format!(
                    "{} cannot be made: {} is not a folder",
                    spool.display(),
                    blocker.display()
                ),
            ));
        }
        Ok(())
    }

    /// `[ha]`: only on a PostgreSQL queue, and with a lease long enough that a request can start
    /// right after a renewal was due and still finish before the node's own deadline.
    fn validate_ha(&self) -> Result<(), SettingsError> {
        let h = &self.ha;
        if !h.enabled {
            return Ok(());
        }
        if !matches!(self.queue.database, Database::Postgres(_)) {
            return Err(SettingsError::key(
                "ha.enabled",
                "needs queue.database to be a PostgreSQL URL (nodes share the queue and its lease there); SQLite is one machine's file",
            ));
        }
        if h.node().len() > 200 || h.node().chars().any(|c| c.is_control()) {
            return Err(SettingsError::key(
                "ha.node_name",
                "must be at most 200 characters, without control characters",
            ));
        }
        if h.renew_every.is_zero() || h.margin.is_zero() {
            return Err(SettingsError::key(
                "ha.renew_every",
                "ha.renew_every and ha.margin must be above 0",
            ));
        }
        let needed = self.tencent.request_timeout + h.margin + h.renew_every;
        if h.lease_ttl <= needed {
            return Err(SettingsError::key(
                "ha.lease_ttl",
                format!(
                    "{} must exceed tencent.request_timeout ({}) + ha.margin ({}) + ha.renew_every ({}) = {}: the active node starts no request it could not finish before its lease ends; raise ha.lease_ttl or lower tencent.request_timeout",
                    humantime::format_duration(h.lease_ttl),
                    humantime::format_duration(self.tencent.request_timeout),
                    humantime::format_duration(h.margin),
                    humantime::format_duration(h.renew_every),
                    humantime::format_duration(needed),
                ),
            ));
        }
        Ok(())
    }

    /// Checks what only the commands that send to Tencent need: a real SDKAppID unless the
    /// built-in simulator takes the requests (it needs no credentials).
    pub fn check_for_import(&self) -> Result<(), SettingsError> {
        if !self.simulator.enabled && self.tencent.sdkappid == 0 {
            return Err(SettingsError::key(
                "tencent.sdkappid",
                "is 0 (the default): set the SDKAppID of the app (Chat console, Applications), or enable the built-in simulator (simulator.enabled = true, as config/local.toml does)",
            ));
        }
        Ok(())
    }

    /// Settings that are allowed but probably a mistake, one sentence each, for a warning at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.import.requests_per_second > DOCUMENTED_REQUESTS_PER_SECOND {
            w.push(format!(
                "import.requests_per_second = {} is above the documented limit of {DOCUMENTED_REQUESTS_PER_SECOND} requests/s per app; keep it only if Tencent raised this app's quota, or the excess is answered with rate-limit errors",
                self.import.requests_per_second
            ));
        }
        if self.import.account_requests_per_second > 100 {
            w.push(format!(
                "import.account_requests_per_second = {} is above the documented limit of 100 multiaccount_import calls/s",
                self.import.account_requests_per_second
            ));
        }
        w
    }

    fn has_inline_key(&self) -> bool {
        self.tencent
            .secret_key
            .as_ref()
            .is_some_and(|k| !k.expose_secret().is_empty())
    }

    /// The app's secret key, from `tencent.secret_key` or the file named by
    /// `tencent.secret_key_file` (trailing newline trimmed). Needed only by commands that talk to
    /// Tencent, so it is resolved on demand.
    pub fn secret_key(&self) -> Result<SecretString, SettingsError> {
        if self.has_inline_key()
            && let Some(k) = &self.tencent.secret_key
        {
            return Ok(k.clone());
        }
        if !self.tencent.secret_key_file.is_empty() {
            let path = &self.tencent.secret_key_file;
            let text = std::fs::read_to_string(path).map_err(|e| {
                SettingsError::key(
                    "tencent.secret_key_file",
                    format!("cannot read {path}: {e}"),
                )
            })?;
            let key = text.trim_end_matches(['\n', '\r']).to_string();
            if key.is_empty() {
                return Err(SettingsError::key(
                    "tencent.secret_key_file",
                    format!("{path} is empty"),
                ));
            }
            return Ok(SecretString::from(key));
        }
        Err(SettingsError::key(
            "tencent.secret_key",
            "no secret key: set tencent.secret_key, tencent.secret_key_file or TIMPORT__TENCENT__SECRET_KEY",
        ))
    }

    /// The health/metrics listen address, or `None` when the listener is turned off.
    pub fn http_listen(&self) -> Result<Option<SocketAddr>, SettingsError> {
        let l = self.http.listen.trim();
        if l.is_empty() {
            return Ok(None);
        }
        l.parse::<SocketAddr>()
            .map(Some)
            .map_err(|e| SettingsError::key("http.listen", format!("{l:?}: {e}")))
    }
}

/// Tencent's documented REST quota per app (requests per second, all APIs together).
pub const DOCUMENTED_REQUESTS_PER_SECOND: u32 = 200;

/// `queue.database` as a SQLite path: not a folder, in a folder that can be made.
fn check_database_path(db: &Path) -> Result<(), SettingsError> {
    if db.is_dir() {
        return Err(SettingsError::key(
            "queue.database",
            format!(
                "{} is a folder; name the SQLite file in it, e.g. {}",
                db.display(),
                db.join("timport.db").display()
            ),
        ));
    }
    if let Some(parent) = db.parent().filter(|p| !p.as_os_str().is_empty())
        && let Some(blocker) = non_folder_ancestor(parent)
    {
        return Err(SettingsError::key(
            "queue.database",
            format!(
                "{} cannot be made: {} is not a folder",
                db.display(),
                blocker.display()
            ),
        ));
    }
    Ok(())
}

/// The first ancestor of `path` (itself included) that exists and is not a folder, if any.
fn non_folder_ancestor(path: &Path) -> Option<PathBuf> {
    path.ancestors()
        .filter(|a| !a.as_os_str().is_empty())
        .find(|a| a.exists())
        .filter(|a| !a.is_dir())
        .map(Path::to_path_buf)
}

/// Refuses a `log.level` that the tracing filter would accept but that is surely a typo: a bare
/// word that is not a level (`infoo` would be read as a target name and silence every log line).
/// Directives `target=level` and span filters are left to the filter's own parser.
pub fn check_log_level(level: &str) -> Result<(), SettingsError> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    for d in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if d.contains('=') || d.contains('[') {
            continue;
        }
        let is_level = LEVELS.iter().any(|l| d.eq_ignore_ascii_case(l))
            || matches!(d, "0" | "1" | "2" | "3" | "4" | "5");
        if !is_level {
            return Err(SettingsError::key(
                "log.level",
                format!(
                    "{d:?} is not a level (one of {}); a target needs one too, e.g. \"info,{d}=debug\"",
                    LEVELS.join(", ")
                ),
            ));
        }
    }
    if level.trim().is_empty() {
        return Err(SettingsError::key("log.level", "is empty; e.g. \"info\""));
    }
    Ok(())
}

/// A TOML syntax error as the `config` crate words it quotes the offending source line (which may
/// hold the secret key) under the position. Keeps the position and the explanation, drops the
/// quoted source, and masks quoted values in what is left.
fn redact_syntax_error(message: &str) -> String {
    let kept: Vec<&str> = message
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            // The snippet: "  |", "3 | secret_key = ...", "  |   ^".
            !(t.starts_with('|')
                || t.split_once('|').is_some_and(|(n, _)| {
                    !n.trim().is_empty() && n.trim().chars().all(|c| c.is_ascii_digit())
                }))
        })
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    format!(
        "{} (the line itself is not shown: it may hold the secret key)",
        mask_quoted(&kept.join(": "))
    )
}

/// Every double-quoted part of `message` replaced by `<redacted>` (code spans in backticks, such
/// as the parser's "expected `\"`", are kept).
fn mask_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut in_quote = false;
    let mut in_code = false;
    for c in message.chars() {
        match c {
            '`' if !in_quote => {
                in_code = !in_code;
                out.push(c);
            }
            _ if in_code => out.push(c),
            '"' => {
                in_quote = !in_quote;
                if in_quote {
                    out.push_str("<redacted>");
                }
            }
            _ if in_quote => {}
            c => out.push(c),
        }
    }
    out
}

/// The `config` crate quotes offending values in some messages; a secret key with a bad type must
/// not reach the terminal that way.
fn redact_config_error(message: String) -> String {
    if message.contains("secret_key") {
        // Keep the part naming the key, drop any quoted value.
        let mut out = String::with_capacity(message.len());
        let mut in_quote = false;
        for c in message.chars() {
            match c {
                '"' => {
                    in_quote = !in_quote;
                    if in_quote {
                        out.push_str("<redacted>");
                    }
                }
                _ if in_quote => {}
                _ => out.push(c),
            }
        }
        out
    } else {
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_validate() {
        let s = Settings::load_from(None, &env(&[])).expect("defaults");
        assert_eq!(s.import.requests_per_second, 200);
        assert_eq!(s.import.batch_size, 7);
        assert_eq!(s.tencent.request_timeout, Duration::from_secs(10));
    }

    #[test]
    fn environment_wins_over_file_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.toml");
        std::fs::write(
            &file,
            "[import]\nrequests_per_second = 50\nbatch_size = 5\n",
        )
        .unwrap();
        let s = Settings::load_from(
            Some(&file),
            &env(&[("TIMPORT__IMPORT__REQUESTS_PER_SECOND", "120")]),
        )
        .unwrap();
        assert_eq!(s.import.requests_per_second, 120, "env beats file");
        assert_eq!(s.import.batch_size, 5, "file beats defaults");
        assert_eq!(s.import.max_lanes, 64, "defaults fill the rest");
    }

    #[test]
    fn timport_config_env_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.toml");
        std::fs::write(&file, "[log]\nformat = \"json\"\n").unwrap();
        let s =
            Settings::load_from(None, &env(&[("TIMPORT_CONFIG", file.to_str().unwrap())])).unwrap();
        assert_eq!(s.log.format, LogFormat::Json);
    }

    #[test]
    fn high_availability_needs_postgresql_and_a_lease_longer_than_a_request() {
        let pg = (
            "TIMPORT__QUEUE__DATABASE",
            "postgres://u:secret@db.example/q",
        );
        let on = ("TIMPORT__HA__ENABLED", "true");
        let e = Settings::load_from(None, &env(&[on]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ha.enabled") && e.contains("PostgreSQL"), "{e}");
        // The default request timeout (10s) + margin (1s) + renew_every (2s) outlasts 10s.
        let e = Settings::load_from(None, &env(&[on, pg]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ha.lease_ttl") && e.contains("tencent.request_timeout"),
            "{e}"
        );
        assert!(!e.contains("secret"), "{e}");
        let s = Settings::load_from(
            None,
            &env(&[on, pg, ("TIMPORT__TENCENT__REQUEST_TIMEOUT", "5s")]),
        )
        .expect("5s + 1s + 2s < 10s");
        assert!(s.ha.enabled);
        assert!(!s.ha.node().is_empty(), "the hostname names the node");
        let s = Settings::load_from(
            None,
            &env(&[
                on,
                pg,
                ("TIMPORT__TENCENT__REQUEST_TIMEOUT", "5s"),
                ("TIMPORT__HA__NODE_NAME", "node-a"),
            ]),
        )
        .unwrap();
        assert_eq!(s.ha.node(), "node-a");
        // Off, nothing is checked: SQLite and the default timeout are fine.
        assert!(!Settings::load_from(None, &env(&[])).unwrap().ha.enabled);
    }

    #[test]
    fn invalid_values_name_the_key() {
        let e = Settings::load_from(None, &env(&[("TIMPORT__IMPORT__BATCH_SIZE", "9")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("import.batch_size"), "{e}");
        let e = Settings::load_from(
            None,
            &env(&[("TIMPORT__IMPORT__REQUESTS_PER_SECOND", "fast")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("requests_per_second"), "{e}");
        let e = Settings::load_from(None, &env(&[("TIMPORT__TENCENT__REGION", "mars")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tencent.region"), "{e}");
        let e = Settings::load_from(Some(Path::new("/nonexistent/t.toml")), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/t.toml"), "{e}");
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.toml");
        std::fs::write(&file, "[import]\nrequests_per_secnd = 50\n").unwrap();
        let e = Settings::load_from(Some(&file), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("requests_per_secnd"), "{e}");
    }

    #[test]
    fn secret_key_sources_and_redaction() {
        let secret = "s3cr3t-key-value-0123456789";
        let s =
            Settings::load_from(None, &env(&[("TIMPORT__TENCENT__SECRET_KEY", secret)])).unwrap();
        assert_eq!(s.secret_key().unwrap().expose_secret(), secret);
        assert!(
            !format!("{s:?}").contains(secret),
            "Debug must not show the key"
        );

        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, format!("{secret}\n")).unwrap();
        let s = Settings::load_from(
            None,
            &env(&[(
                "TIMPORT__TENCENT__SECRET_KEY_FILE",
                key_file.to_str().unwrap(),
            )]),
        )
        .unwrap();
        assert_eq!(s.secret_key().unwrap().expose_secret(), secret);

        let s = Settings::load_from(None, &env(&[])).unwrap();
        let e = s.secret_key().unwrap_err().to_string();
        assert!(e.contains("tencent.secret_key"), "{e}");

        let e = Settings::load_from(
            None,
            &env(&[
                ("TIMPORT__TENCENT__SECRET_KEY", secret),
                ("TIMPORT__TENCENT__SECRET_KEY_FILE", "/x"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains(secret), "{e}");
    }

    #[test]
    fn shipped_config_files_load() {
        for f in [
            "config/local.toml",
            "config/production.example.toml",
            "deploy/systemd/timport.toml",
        ] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            Settings::load_from(Some(&path), &env(&[])).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }

    #[test]
    fn syntax_error_on_the_secret_line_is_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.toml");
        let secret = "Zq9-very-secret-0123456789abcdef";
        std::fs::write(&file, format!("[tencent]\nsecret_key = \"{secret}\n")).unwrap();
        let e = Settings::load_from(Some(&file), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(!e.contains(secret) && !e.contains("Zq9"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        std::fs::write(&file, format!("[tencent]\nsecret_key = {secret}\n")).unwrap();
        let e = Settings::load_from(Some(&file), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(!e.contains(secret) && !e.contains("Zq9"), "{e}");
    }

    #[test]
    fn typos_and_risky_values_are_caught() {
        let e = Settings::load_from(None, &env(&[("TIMPORT__LOG__LEVEL", "infoo")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("log.level"), "{e}");
        let s = Settings::load_from(None, &env(&[])).unwrap();
        let e = s.check_for_import().unwrap_err().to_string();
        assert!(e.contains("tencent.sdkappid"), "{e}");
        let s = Settings::load_from(
            None,
            &env(&[("TIMPORT__IMPORT__REQUESTS_PER_SECOND", "500")]),
        )
        .unwrap();
        assert!(s.warnings()[0].contains("200"), "{:?}", s.warnings());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let d = dir.path().to_str().unwrap();
        let f = file.to_str().unwrap();
        let s = Settings::load_from(None, &env(&[("TIMPORT__QUEUE__DATABASE", d)])).unwrap();
        assert!(
            s.check_paths()
                .unwrap_err()
                .to_string()
                .contains("queue.database")
        );
        let s = Settings::load_from(None, &env(&[("TIMPORT__QUEUE__SPOOL_DIR", f)])).unwrap();
        assert!(
            s.check_paths()
                .unwrap_err()
                .to_string()
                .contains("queue.spool_dir")
        );
        let below = format!("{f}/q.db");
        let s = Settings::load_from(None, &env(&[("TIMPORT__QUEUE__DATABASE", &below)])).unwrap();
        assert!(
            s.check_paths()
                .unwrap_err()
                .to_string()
                .contains("queue.database")
        );
    }

    #[test]
    fn redaction_drops_quoted_values() {
        let m = redact_config_error("invalid type: \"abc\" for key `tencent.secret_key`".into());
        assert!(!m.contains("abc"));
        assert!(m.contains("tencent.secret_key"));
    }
}
