//! The HTTP side of the Tencent client: pacing, UserSig caching and renewal, the request/answer
//! envelope, metrics and the per-request debug line. See the parent module for the contract.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngExt;
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::{ApiError, ApiErrorKind, ClientBuildError, ErrorClass};
use super::types::*;
use super::usersig::gen_usersig;
use super::{ClientConfig, GROUP_SERVICE, LOGIN_SERVICE};
use crate::ha::Gate;
use crate::pacing::Pacer;

const REDACTED: &str = "<redacted>";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

struct CachedSig {
    value: SecretString,
    issued_at: u64,
    validity: u64,
    generation: u64,
}

impl CachedSig {
    /// Renew once less than a quarter of the validity remains (or the clock went back).
    fn due(&self, now: u64) -> bool {
        let renew_at = self
            .issued_at
            .saturating_add(self.validity - self.validity / 4);
        now >= renew_at || now.saturating_add(300) < self.issued_at
    }
}

struct Inner {
    http: reqwest::Client,
    base: String,
    /// `base` parsed once (a request clones it and sets path and query: no re-parse per request).
    base_url: Url,
    sdkappid: u64,
    identifier: String,
    secret_key: SecretString,
    validity_secs: u64,
    pacer: Option<Arc<Pacer>>,
    sig: Mutex<Option<CachedSig>>,
    /// High availability: the gate every request passes (unset: always open).
    gate: std::sync::OnceLock<Gate>,
}

/// Cloneable handle to the Tencent REST API (clones share the connection pool, the UserSig
/// cache and the pacer).
#[derive(Clone)]
pub struct TencentClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TencentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TencentClient")
            .field("base", &self.inner.base)
            .field("sdkappid", &self.inner.sdkappid)
            .field("identifier", &self.inner.identifier)
            .finish_non_exhaustive()
    }
}

/// How to read the envelope of an answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Envelope {
    Plain,
    /// Keep `ImportMsgResult` on a failed answer.
    ImportMsg,
    /// The top-level `ErrorCode` is meaningless once `GroupInfo` is present.
    GroupInfo,
}

impl TencentClient {
    /// Build a client. `pacer`: the app-wide pacer (`None` = unpaced, for tools and tests).
    pub fn new(cfg: ClientConfig, pacer: Option<Arc<Pacer>>) -> Result<Self, ClientBuildError> {
        if cfg.identifier.is_empty() {
            return Err(ClientBuildError::EmptyIdentifier);
        }
        if cfg.usersig_validity < Duration::from_secs(1) {
            return Err(ClientBuildError::ValidityTooShort);
        }
        let base = cfg.effective_base_url();
        let parsed = Url::parse(&base).map_err(|e| ClientBuildError::InvalidBaseUrl {
            url: base.clone(),
            reason: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(ClientBuildError::InvalidBaseUrl {
                url: base.clone(),
                reason: "expected http(s)://host[:port][/prefix]".into(),
            });
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(ClientBuildError::InvalidBaseUrl {
                url: base.clone(),
                reason: "must not have a query or fragment".into(),
            });
        }
        let timeout = cfg.request_timeout.max(Duration::from_millis(1));
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(50))
            .pool_max_idle_per_host(64)
            .tcp_keepalive(Duration::from_secs(30))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("timport/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientBuildError::Http(e.without_url().to_string()))?;
        Ok(TencentClient {
            inner: Arc::new(Inner {
                http,
                base: base.trim_end_matches('/').to_owned(),
                base_url: parsed,
                sdkappid: cfg.sdkappid,
                identifier: cfg.identifier,
                secret_key: cfg.secret_key,
                validity_secs: cfg.usersig_validity.as_secs(),
                pacer,
                sig: Mutex::new(None),
                gate: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Installs the high-availability gate: from now on a request starts only while it allows
    /// it (a second call is ignored: one node, one gate).
    pub fn set_gate(&self, gate: Gate) {
        let _ = self.inner.gate.set(gate);
    }

    /// Waits until a request may start (at once without a gate).
    pub async fn sendable(&self) {
        if let Some(g) = self.inner.gate.get() {
            g.opened().await;
        }
    }

    /// The base URL requests go to (no secrets in it).
    pub fn base_url(&self) -> &str {
        &self.inner.base
    }

    /// The pacer this client obeys, if any.
    pub fn pacer(&self) -> Option<&Arc<Pacer>> {
        self.inner.pacer.as_ref()
    }

    /// Import up to 7 messages into one group (and topic). Per-message results are in the
    /// answer; a failed answer that still carried results has them in
    /// [`ApiError::import_results`].
    pub async fn import_group_msg(
        &self,
        req: &ImportGroupMsgRequest,
    ) -> Result<ImportGroupMsgResponse, ApiError> {
        self.call("import_group_msg", Envelope::ImportMsg, req)
            .await
    }

    /// Read a group's history, newest first (≤ 20 per page, Seq ≤ `ReqMsgSeq`).
    pub async fn group_msg_get_simple(
        &self,
        req: &GroupMsgGetSimpleRequest,
    ) -> Result<GroupMsgGetSimpleResponse, ApiError> {
        self.call("group_msg_get_simple", Envelope::Plain, req)
            .await
    }

    /// Group details; check each [`GroupInfo::error_code`] (10010 = no such group).
    pub async fn get_group_info(
        &self,
        req: &GetGroupInfoRequest,
    ) -> Result<GetGroupInfoResponse, ApiError> {
        self.call("get_group_info", Envelope::GroupInfo, req).await
    }

    /// Create a group with a given CreateTime. 10021 (ID in use) comes back as an error of
    /// class Permanent with code [`codes::GROUP_ID_IN_USE`](super::codes::GROUP_ID_IN_USE).
    pub async fn import_group(
        &self,
        req: &ImportGroupRequest,
    ) -> Result<ImportGroupResponse, ApiError> {
        self.call("import_group", Envelope::Plain, req).await
    }

    /// Add up to 300 members; `Result` 0 failed, 1 added, 2 already a member.
    pub async fn import_group_member(
        &self,
        req: &ImportGroupMemberRequest,
    ) -> Result<ImportGroupMemberResponse, ApiError> {
        self.call("import_group_member", Envelope::Plain, req).await
    }

    /// Set one member's unread count (capped by the server at the group's message count).
    pub async fn set_unread_msg_num(
        &self,
        req: &SetUnreadMsgNumRequest,
    ) -> Result<SetUnreadMsgNumResponse, ApiError> {
        self.call("set_unread_msg_num", Envelope::Plain, req).await
    }

    /// Import up to 100 accounts (`im_open_login_svc`); those that failed are listed in
    /// [`MultiaccountImportResponse::fail_accounts`]. Idempotent on the server, so an unknown
    /// outcome is simply sent again.
    pub async fn multiaccount_import(
        &self,
        req: &MultiaccountImportRequest,
    ) -> Result<MultiaccountImportResponse, ApiError> {
        self.call("multiaccount_import", Envelope::Plain, req).await
    }

    /// Replace the cached UserSig with `usersig`, treated as freshly issued. For tests that
    /// need the server to see a forged or expired signature; not for production use.
    #[doc(hidden)]
    pub fn override_usersig(&self, usersig: SecretString) {
        let mut slot = self.lock_sig();
        let generation = slot.as_ref().map_or(0, |s| s.generation + 1);
        *slot = Some(CachedSig {
            value: usersig,
            issued_at: unix_now(),
            validity: self.inner.validity_secs,
            generation,
        });
    }

    fn lock_sig(&self) -> MutexGuard<'_, Option<CachedSig>> {
        self.inner.sig.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn issue(&self, now: u64, generation: u64) -> CachedSig {
        let value = gen_usersig(
            self.inner.secret_key.expose_secret(),
            self.inner.sdkappid,
            &self.inner.identifier,
            now,
            self.inner.validity_secs,
        );
        CachedSig {
            value: SecretString::from(value),
            issued_at: now,
            validity: self.inner.validity_secs,
            generation,
        }
    }

    /// The UserSig to use now and its generation; renews a due one.
    fn current_sig(&self, now: u64) -> (SecretString, u64) {
        let mut slot = self.lock_sig();
        match slot.as_ref() {
            Some(s) if !s.due(now) => {}
            Some(s) => {
                let next = self.issue(now, s.generation + 1);
                metrics::counter!("timport_usersig_renewals_total", "reason" => "scheduled")
                    .increment(1);
                tracing::debug!(
                    generation = next.generation,
                    "UserSig renewed before expiry"
                );
                *slot = Some(next);
            }
            None => *slot = Some(self.issue(now, 0)),
        }
        let s = slot.as_ref().expect("just filled");
        (s.value.clone(), s.generation)
    }

    /// The server refused generation `generation`: renew it unless another request already did.
    fn renew_rejected(&self, generation: u64) {
        let mut slot = self.lock_sig();
        if slot.as_ref().is_some_and(|s| s.generation == generation) {
            *slot = Some(self.issue(unix_now(), generation + 1));
            metrics::counter!("timport_usersig_renewals_total", "reason" => "rejected")
                .increment(1);
            tracing::info!("UserSig refused by the server; renewed");
        }
    }

    async fn call<Q: Serialize, R: DeserializeOwned>(
        &self,
        command: &'static str,
        envelope: Envelope,
        req: &Q,
    ) -> Result<R, ApiError> {
        let body = serde_json::to_vec(req)
            .map_err(|e| ApiError::new(command, ApiErrorKind::Encode(e.to_string())))?;
        let mut renewed = false;
        loop {
            let (sig, generation) = self.current_sig(unix_now());
            match self.attempt(command, envelope, &body, &sig).await {
                Err(e) if e.class() == ErrorClass::Auth && !renewed => {
                    renewed = true;
                    self.renew_rejected(generation);
                }
                Err(e) => return Err(e),
                Ok(v) => {
                    return serde_json::from_value(v).map_err(|e| {
                        ApiError::new(
                            command,
                            ApiErrorKind::BadResponse(format!("unexpected body: {e}")),
                        )
                    });
                }
            }
        }
    }

    fn url(&self, command: &str, sig: &SecretString) -> Result<Url, ApiErrorKind> {
        let mut url = self.inner.base_url.clone();
        let prefix = url.path().trim_end_matches('/').to_owned();
        let service = match command {
            "multiaccount_import" => LOGIN_SERVICE,
            _ => GROUP_SERVICE,
        };
        url.set_path(&format!("{prefix}/v4/{service}/{command}"));
        let random: u32 = rand::rng().random();
        url.query_pairs_mut()
            .append_pair("sdkappid", &self.inner.sdkappid.to_string())
            .append_pair("identifier", &self.inner.identifier)
            .append_pair("usersig", sig.expose_secret())
            .append_pair("random", &random.to_string())
            .append_pair("contenttype", "json");
        Ok(url)
    }

    /// One paced HTTP exchange, with metrics and the debug line.
    async fn attempt(
        &self,
        command: &'static str,
        envelope: Envelope,
        body: &[u8],
        sig: &SecretString,
    ) -> Result<Value, ApiError> {
        let slot = match &self.inner.pacer {
            Some(p) => Some(p.acquire().await),
            None => None,
        };
        // High availability: a request starts only if it would end before this node's lease
        // could (see `crate::ha`). Checked after the pacer's wait, right before sending.
        if let Some(gate) = self.inner.gate.get()
            && !gate.allows()
        {
            metrics::counter!("timport_requests_total", "endpoint" => command, "outcome" => "not_active")
                .increment(1);
            return Err(ApiError::new(command, ApiErrorKind::NotActive));
        }
        let started = Instant::now();
        let result = match self.url(command, sig) {
            Ok(url) => self.exchange(url, envelope, body, sig).await,
            Err(kind) => Err((kind, None)),
        };
        let elapsed = started.elapsed();
        let result = result.map_err(|(kind, import_results)| ApiError {
            endpoint: command,
            // A server echoing the request must not smuggle the UserSig into our errors.
            kind: match kind {
                ApiErrorKind::Service { code, info } => ApiErrorKind::Service {
                    code,
                    info: scrub(&info, sig),
                },
                other => other,
            },
            import_results,
        });
        let (outcome, code) = match &result {
            Ok(_) => ("ok", 0),
            Err(e) => (e.class().as_str(), e.code().unwrap_or(-1)),
        };
        metrics::counter!("timport_requests_total", "endpoint" => command, "outcome" => outcome)
            .increment(1);
        metrics::histogram!("timport_request_duration_seconds", "endpoint" => command)
            .record(elapsed.as_secs_f64());
        tracing::debug!(
            endpoint = command,
            code,
            outcome,
            elapsed_ms = elapsed.as_millis() as u64,
            "tencent request"
        );
        if let (Some(p), Some(slot)) = (&self.inner.pacer, slot) {
            match &result {
                Err(e) if e.class() == ErrorClass::RateLimited => {
                    p.on_rate_limited(slot);
                }
                Ok(_) => p.on_success(),
                Err(_) => {}
            }
        }
        if matches!(&result, Err(e) if e.class() == ErrorClass::RateLimited) {
            metrics::counter!("timport_rate_limited_total", "endpoint" => command).increment(1);
        }
        result
    }

    async fn exchange(
        &self,
        url: Url,
        envelope: Envelope,
        body: &[u8],
        sig: &SecretString,
    ) -> Result<Value, (ApiErrorKind, Option<Vec<ImportMsgResult>>)> {
        let transport = |e: reqwest::Error| (transport_kind(e, sig), None);
        let resp = self
            .inner
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(transport)?;
        if status != reqwest::StatusCode::OK {
            return Err((ApiErrorKind::HttpStatus(status.as_u16()), None));
        }
        read_envelope(&bytes, envelope)
    }
}

/// Map a reqwest failure; the text never contains the URL or the UserSig.
fn transport_kind(e: reqwest::Error, sig: &SecretString) -> ApiErrorKind {
    let connect = e.is_connect();
    let timeout = e.is_timeout();
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    let text = scrub(&text, sig);
    if connect {
        ApiErrorKind::Connect(text)
    } else if timeout {
        ApiErrorKind::Timeout
    } else {
        ApiErrorKind::Transport(text)
    }
}

/// Remove the UserSig (raw or percent-encoded) from a text.
fn scrub(text: &str, sig: &SecretString) -> String {
    let raw = sig.expose_secret();
    if raw.is_empty() {
        return text.to_owned();
    }
    text.replace(raw, REDACTED)
        .replace(&form_encode(raw), REDACTED)
}

/// `application/x-www-form-urlencoded` byte serialization (what `Url::query_pairs_mut` does).
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(char::from(b))
            }
            b' ' => out.push('+'),
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

fn read_envelope(
    bytes: &[u8],
    envelope: Envelope,
) -> Result<Value, (ApiErrorKind, Option<Vec<ImportMsgResult>>)> {
    let bad = |m: String| (ApiErrorKind::BadResponse(m), None);
    let value: Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    if envelope == Envelope::GroupInfo
        && obj
            .get("GroupInfo")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
    {
        return Ok(value);
    }
    let code = obj.get("ErrorCode").and_then(Value::as_i64);
    let ok_status = obj.get("ActionStatus").and_then(Value::as_str) == Some("OK");
    match code {
        Some(0) => Ok(value),
        None if ok_status => Ok(value),
        None => Err(bad("no ErrorCode in the answer".into())),
        Some(code) => {
            let info = obj
                .get("ErrorInfo")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let results = if envelope == Envelope::ImportMsg {
                obj.get("ImportMsgResult")
                    .and_then(|r| serde_json::from_value::<Vec<ImportMsgResult>>(r.clone()).ok())
                    .filter(|r| !r.is_empty())
            } else {
                None
            };
            Err((ApiErrorKind::Service { code, info }, results))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_urls_keep_the_base_prefix_and_carry_the_query() {
        for (base, path) in [
            (
                "http://127.0.0.1:9/",
                "/v4/group_open_http_svc/import_group_msg",
            ),
            (
                "http://127.0.0.1:9/proxy/tim/",
                "/proxy/tim/v4/group_open_http_svc/import_group_msg",
            ),
        ] {
            let client = TencentClient::new(
                crate::tencent::ClientConfig {
                    sdkappid: 1400000000,
                    identifier: "admin".into(),
                    secret_key: SecretString::from("k".to_string()),
                    base_url: Some(base.into()),
                    region: crate::tencent::Region::Singapore,
                    request_timeout: Duration::from_secs(5),
                    usersig_validity: Duration::from_secs(3600),
                },
                None,
            )
            .unwrap();
            let sig = SecretString::from("a+b/c=".to_string());
            let url = client.url("import_group_msg", &sig).unwrap();
            assert_eq!(url.path(), path);
            let q: Vec<(String, String)> = url.query_pairs().into_owned().collect();
            let keys: Vec<&str> = q.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(
                keys,
                ["sdkappid", "identifier", "usersig", "random", "contenttype"]
            );
            assert_eq!(q[2].1, "a+b/c=", "the UserSig survives encoding");
            // A second URL is built from the same base, not from the first one.
            let again = client.url("get_group_info", &sig).unwrap();
            assert_eq!(
                again.path(),
                path.replace("import_group_msg", "get_group_info")
            );
            assert_eq!(again.query_pairs().count(), 5);
        }
    }

    #[test]
    fn envelope_rules() {
        let ok = read_envelope(br#"{"ActionStatus":"OK","ErrorCode":0}"#, Envelope::Plain);
        assert!(ok.is_ok());
        let fail = read_envelope(
            br#"{"ActionStatus":"FAIL","ErrorCode":10004,"ErrorInfo":"x","ImportMsgResult":[{"Result":10004}]}"#,
            Envelope::ImportMsg,
        );
        let (kind, results) = fail.expect_err("fails");
        assert_eq!(
            kind,
            ApiErrorKind::Service {
                code: 10004,
                info: "x".into()
            }
        );
        assert_eq!(results.map(|r| r.len()), Some(1));
        let gi = read_envelope(
            br#"{"ActionStatus":"FAIL","ErrorCode":10010,"GroupInfo":[{"GroupId":"g","ErrorCode":10010}]}"#,
            Envelope::GroupInfo,
        );
        assert!(gi.is_ok());
        let gi_fail = read_envelope(
            br#"{"ActionStatus":"FAIL","ErrorCode":70001}"#,
            Envelope::GroupInfo,
        );
        assert!(gi_fail.is_err());
        assert!(read_envelope(b"<html>", Envelope::Plain).is_err());
        assert!(read_envelope(b"[]", Envelope::Plain).is_err());
    }

    #[test]
    fn scrub_removes_raw_and_encoded() {
        let sig = SecretString::from("a*b-c_d+e/f=".to_owned());
        let enc = form_encode("a*b-c_d+e/f=");
        assert_eq!(enc, "a*b-c_d%2Be%2Ff%3D");
        let text = format!("x a*b-c_d+e/f= y {enc} z");
        let out = scrub(&text, &sig);
        assert!(!out.contains("a*b-c_d+e/f="));
        assert!(!out.contains(&enc));
    }

    #[test]
    fn due_at_three_quarters() {
        let s = CachedSig {
            value: SecretString::from("x".to_owned()),
            issued_at: 1000,
            validity: 400,
            generation: 0,
        };
        assert!(!s.due(1299));
        assert!(s.due(1300));
        assert!(s.due(100));
    }
}
