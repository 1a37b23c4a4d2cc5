//! HTTP side of the simulator: axum routes, query/UserSig checks, quota, fault injection, and a
//! listener whose connections a handler can abort.
//!
//! Closing a connection without an answer: axum's `serve` runs on [`KillableListener`], whose
//! streams carry a kill flag that the handler reaches through `ConnectInfo<ConnKill>`. A handler
//! that wants "no answer" sets the flag (and `SO_LINGER` 0) and returns; hyper's attempt to write
//! the response then fails, the connection is dropped, and the client sees the connection reset
//! or closed before any response byte, exactly like a network failure.
//!
//! Stopping: the server runs under `with_graceful_shutdown` on a cancellation token (idle
//! keep-alive connections are closed at once); `SimHandle::shutdown` waits a bounded time.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use rand::RngExt;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::Faults;
use super::state::{Answer, RequestRecord, World};
use crate::tencent::usersig::verify_usersig;

/// Shared by all handlers.
pub(crate) struct Shared {
    pub sdkappid: u64,
    pub identifier: String,
    pub secret_key: SecretString,
    pub world: Mutex<World>,
    pub faults: Mutex<Faults>,
    pub outage: Arc<OutageSwitch>,
}

impl Shared {
    pub(crate) fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn faults(&self) -> Faults {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_faults(&self, f: Faults) {
        *self.faults.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }
}

/// The outage switch: until `refuse_until` the listening socket is closed (connects refused,
/// requests on old connections aborted); then until `http_502_until` every `/v4` request
/// answers HTTP 502 without applying.
#[derive(Default)]
pub(crate) struct OutageSwitch {
    plan: Mutex<Option<(Instant, Instant)>>,
    /// Wakes the accept loop when a plan is set.
    changed: tokio::sync::Notify,
}

/// What the outage switch says about this instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutagePhase {
    Healthy,
    /// Refusing until then.
    Refusing(Instant),
    Http502,
}

impl OutageSwitch {
    pub(crate) fn set(&self, refuse: Duration, then_502: Duration) {
        let now = Instant::now();
        let refuse_until = now + refuse;
        *self.plan.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((refuse_until, refuse_until + then_502));
        self.changed.notify_one();
    }

    pub(crate) fn phase(&self) -> OutagePhase {
        let now = Instant::now();
        match *self.plan.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((refuse_until, _)) if now < refuse_until => OutagePhase::Refusing(refuse_until),
            Some((_, http_502_until)) if now < http_502_until => OutagePhase::Http502,
            _ => OutagePhase::Healthy,
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

// ---- killable connections ----

/// A TCP stream that fails every read and write once its kill flag is set.
pub(crate) struct KillableStream {
    inner: TcpStream,
    kill: Arc<AtomicBool>,
}

impl KillableStream {
    fn killed(&self) -> Option<io::Error> {
        if self.kill.load(Ordering::SeqCst) {
            // RST instead of FIN when the socket is dropped.
            let _ = self.inner.set_zero_linger();
            Some(io::Error::from(io::ErrorKind::ConnectionReset))
        } else {
            None
        }
    }
}

impl AsyncRead for KillableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A TCP listener producing [`KillableStream`]s. While the outage switch refuses, the
/// listening socket is dropped (connects are refused by the kernel) and bound again on the same
/// address when the refusal is over.
pub(crate) struct KillableListener {
    listener: Option<TcpListener>,
    addr: std::net::SocketAddr,
    outage: Arc<OutageSwitch>,
}

impl KillableListener {
    pub(crate) fn new(listener: TcpListener, outage: Arc<OutageSwitch>) -> io::Result<Self> {
        Ok(KillableListener {
            addr: listener.local_addr()?,
            listener: Some(listener),
            outage,
        })
    }
}

impl Listener for KillableListener {
    type Io = KillableStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            if let OutagePhase::Refusing(until) = self.outage.phase() {
                if self.listener.take().is_some() {
                    tracing::info!(addr = %self.addr, "simulator outage: refusing connections");
                }
                tokio::select! {
                    () = tokio::time::sleep_until(until.into()) => {}
                    () = self.outage.changed.notified() => {}
                }
                continue;
            }
            let Some(listener) = &self.listener else {
                match TcpListener::bind(self.addr).await {
                    Ok(l) => {
                        tracing::info!(addr = %self.addr, "simulator outage: listening again");
                        self.listener = Some(l);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, addr = %self.addr, "simulator could not listen again");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                continue;
            };
            let accepted = tokio::select! {
                r = listener.accept() => r,
                () = self.outage.changed.notified() => continue,
            };
            match accepted {
                Ok((inner, addr)) => {
                    let _ = inner.set_nodelay(true);
                    return (
                        KillableStream {
                            inner,
                            kill: Arc::new(AtomicBool::new(false)),
                        },
                        addr,
                    );
                }
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "simulator accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// The kill switch of the connection a request arrived on.
#[derive(Clone)]
pub(crate) struct ConnKill(Arc<AtomicBool>);

impl Connected<IncomingStream<'_, KillableListener>> for ConnKill {
    fn connect_info(stream: IncomingStream<'_, KillableListener>) -> Self {
        ConnKill(stream.io().kill.clone())
    }
}

/// Answer nothing: abort the connection.
fn abort_connection(conn: &ConnKill) -> Response {
    conn.0.store(true, Ordering::SeqCst);
    StatusCode::INTERNAL_SERVER_ERROR.into_response()
}

// ---- routes ----

pub(crate) fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .route("/v4/{service}/{command}", post(v4))
        .route("/admin/groups", post(admin_add_group))
        .route("/admin/state", get(admin_state))
        .route("/admin/faults", post(admin_faults).get(admin_get_faults))
        .route("/admin/outage", post(admin_outage))
        .route("/admin/tamper", post(admin_tamper))
        .fallback(v4_prefixed)
        .with_state(shared)
}

/// Split `/{prefix}/v4/{service}/{command}` into its parts: the prefix is one or more non-empty
/// segments, given back joined by `/` without a leading or trailing one (`/a/b/v4/s/c` is
/// `("a/b", "s", "c")`). Anything else, an empty segment included, is `None` (404). Segments are
/// taken as they arrive (not percent-decoded); the unprefixed route is axum's own.
pub(crate) fn split_prefixed(path: &str) -> Option<(&str, &str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (head, command) = rest.rsplit_once('/')?;
    let (head, service) = head.rsplit_once('/')?;
    let prefix = head.strip_suffix("/v4")?;
    if command.is_empty() || service.is_empty() || prefix.split('/').any(str::is_empty) {
        return None;
    }
    Some((prefix, service, command))
}

/// Every route not matched above: a `/v4` request behind a path prefix is served exactly like
/// the unprefixed one (other methods 405, as there); anything else is 404. Admin routes have no
/// prefixed form.
async fn v4_prefixed(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<ConnKill>,
    method: Method,
    uri: Uri,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Response {
    let Some((prefix, service, command)) = split_prefixed(uri.path()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if method != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let (prefix, service, command) = (prefix.to_owned(), service.to_owned(), command.to_owned());
    serve_v4(shared, conn, prefix, service, command, query, body).await
}

fn roll(p: f64) -> bool {
    p > 0.0 && rand::rng().random::<f64>() < p
}

/// Check the query string and the UserSig; `Err` is the Tencent answer.
fn check_query(shared: &Shared, q: &HashMap<String, String>, now: i64) -> Result<(), Answer> {
    let sig = q.get("usersig").map(String::as_str).unwrap_or_default();
    if sig.is_empty() {
        return Err(Answer::fail(70002, "UserSig is empty"));
    }
    let app = q
        .get("sdkappid")
        .ok_or_else(|| Answer::fail(60012, "sdkappid is required"))?;
    if app.parse::<u64>().ok() != Some(shared.sdkappid) {
        return Err(Answer::fail(70014, "sdkappid does not match"));
    }
    let identifier = q
        .get("identifier")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Answer::fail(60004, "identifier is required"))?;
    if q.get("random")
        .and_then(|r| r.parse::<u32>().ok())
        .is_none()
    {
        return Err(Answer::fail(60002, "random must be a u32"));
    }
    if q.get("contenttype").map(String::as_str) != Some("json") {
        return Err(Answer::fail(60002, "contenttype must be json"));
    }
    let now = u64::try_from(now).unwrap_or(0);
    verify_usersig(
        sig,
        shared.secret_key.expose_secret(),
        shared.sdkappid,
        identifier,
        now,
    )
    .map_err(|e| Answer::fail(e.tencent_code(), e.to_string()))?;
    if *identifier != shared.identifier {
        // The simulator knows one account, the App admin.
        return Err(Answer::fail(
            70013,
            "identifier is not the App admin of this SDKAppID",
        ));
    }
    Ok(())
}

async fn v4(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<ConnKill>,
    Path((service, command)): Path<(String, String)>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Response {
    serve_v4(shared, conn, String::new(), service, command, query, body).await
}

/// One `/v4` request, behind `prefix` ("" when none).
async fn serve_v4(
    shared: Arc<Shared>,
    conn: ConnKill,
    prefix: String,
    service: String,
    command: String,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Response {
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let outage = shared.outage.phase();
    let mut faults = shared.faults();
    if !faults.endpoints.is_empty() && !faults.endpoints.contains(&command) {
        // Latency applies everywhere; the failures only where they were asked for.
        faults = Faults {
            latency: faults.latency,
            ..Faults::default()
        };
    }
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }
    let query = query.map(|Query(q)| q).unwrap_or_default();
    let mut rec = RequestRecord {
        seq: 0,
        at_ms,
        prefix,
        endpoint: command.clone(),
        query_random: query.get("random").and_then(|r| r.parse().ok()),
        http_status: Some(200),
        error_code: None,
        results: Vec::new(),
        fault: None,
        applied: false,
        accounts: Vec::new(),
    };
    let mono = Instant::now();
    let now = unix_now();

    match outage {
        OutagePhase::Healthy => {}
        OutagePhase::Refusing(_) => {
            // A request on a connection opened before the outage: no answer.
            rec.fault = Some("outage_refuse".into());
            rec.http_status = None;
            shared.world().record(rec);
            return abort_connection(&conn);
        }
        OutagePhase::Http502 => {
            rec.fault = Some("outage_502".into());
            rec.http_status = Some(502);
            shared.world().record(rec);
            return (StatusCode::BAD_GATEWAY, "<html>502 Bad Gateway</html>").into_response();
        }
    }
    if roll(faults.p_http_502) {
        rec.fault = Some("http_502".into());
        rec.http_status = Some(502);
        shared.world().record(rec);
        return (StatusCode::BAD_GATEWAY, "<html>502 Bad Gateway</html>").into_response();
    }
    if roll(faults.p_reset_before) {
        rec.fault = Some("reset_before".into());
        rec.http_status = None;
        shared.world().record(rec);
        return abort_connection(&conn);
    }
    let injected = if roll(faults.p_error_10002) {
        Some((
            "error_10002",
            Answer::fail(10002, "internal error, please retry"),
        ))
    } else if roll(faults.p_rate_limit) {
        Some((
            "rate_limit",
            Answer::fail(60007, "REST API call rate exceeded"),
        ))
    } else {
        None
    };

    let answer = {
        let mut world = shared.world();
        let answer = if let Some((name, answer)) = injected {
            rec.fault = Some(name.into());
            answer
        } else if !world.take_quota(mono) {
            Answer::fail(60011, "SDKAppID request rate exceeded")
        } else if let Err(a) = check_query(&shared, &query, now) {
            a
        } else if service == crate::tencent::LOGIN_SERVICE && command == "multiaccount_import" {
            match serde_json::from_slice::<Value>(&body) {
                Ok(v) if v.is_object() => match world.multiaccount_import(&v, mono) {
                    Ok((answer, done)) => {
                        rec.accounts = done;
                        answer
                    }
                    Err(a) => a,
                },
                _ => Answer::fail(60003, "request body is not a JSON object"),
            }
        } else if service != super::GROUP_SERVICE {
            Answer::fail(60009, format!("unknown service {service}"))
        } else {
            match serde_json::from_slice::<Value>(&body) {
                Ok(v) if v.is_object() => world.handle(&command, &body, &v, now, mono),
                _ => Answer::fail(60003, "request body is not a JSON object"),
            }
        };
        rec.error_code = Some(answer.error_code);
        rec.results = answer.results.clone();
        rec.applied = answer.applied;
        if roll(faults.p_drop_response_after_apply) {
            rec.fault = Some("drop_response_after_apply".into());
            rec.http_status = None;
            world.record(rec);
            drop(world);
            return abort_connection(&conn);
        }
        world.record(rec);
        answer
    };
    tracing::debug!(
        endpoint = %command,
        code = answer.error_code,
        applied = answer.applied,
        "simulator answered"
    );
    Json(answer.body).into_response()
}

#[derive(Deserialize)]
struct AddGroup {
    #[serde(rename = "GroupId")]
    group_id: String,
    #[serde(rename = "CreateTime", default)]
    create_time: Option<i64>,
    #[serde(rename = "Type", default)]
    group_type: Option<String>,
}

async fn admin_add_group(State(shared): State<Arc<Shared>>, Json(req): Json<AddGroup>) -> Response {
    if req.group_id.is_empty() {
        return (StatusCode::BAD_REQUEST, "GroupId is empty").into_response();
    }
    let created = shared.world().add_group(
        &req.group_id,
        req.create_time.unwrap_or(0),
        req.group_type.as_deref().unwrap_or("Public"),
    );
    if created {
        (
            StatusCode::CREATED,
            Json(serde_json::json!({"created": true})),
        )
            .into_response()
    } else {
        (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"created": false})),
        )
            .into_response()
    }
}

async fn admin_state(State(shared): State<Arc<Shared>>) -> Response {
    let snapshot = shared.world().snapshot();
    Json(snapshot).into_response()
}

async fn admin_faults(State(shared): State<Arc<Shared>>, Json(f): Json<Faults>) -> Response {
    match f.validate() {
        Ok(()) => {
            shared.set_faults(f.clone());
            Json(f).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, e).into_response(),
    }
}

async fn admin_get_faults(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.faults()).into_response()
}

/// `POST /admin/outage {"refuse": "90s", "then_502": "40s"}`.
#[derive(Debug, Clone, Default, serde::Serialize, Deserialize)]
#[serde(default)]
struct OutagePlan {
    #[serde(with = "humantime_serde")]
    refuse: Duration,
    #[serde(with = "humantime_serde")]
    then_502: Duration,
}

async fn admin_outage(State(shared): State<Arc<Shared>>, Json(p): Json<OutagePlan>) -> Response {
    shared.outage.set(p.refuse, p.then_502);
    Json(p).into_response()
}

/// `POST /admin/tamper {"GroupId": "g", "TopicId": "t"?, "MsgSeq": 5, "Action": "lose" | "alter"
/// | "duplicate" | "hole", "MsgBody": [...] (alter)}`: answers `{"MsgSeq": copy}` for a duplicate.
#[derive(Debug, Deserialize)]
struct TamperRequest {
    #[serde(rename = "GroupId")]
    group_id: String,
    #[serde(rename = "TopicId", default)]
    topic_id: Option<String>,
    #[serde(rename = "MsgSeq")]
    msg_seq: u64,
    #[serde(flatten)]
    what: super::state::Tamper,
}

async fn admin_tamper(State(shared): State<Arc<Shared>>, Json(t): Json<TamperRequest>) -> Response {
    let done = shared
        .world()
        .tamper(&t.group_id, t.topic_id.as_deref(), t.msg_seq, t.what);
    match done {
        Ok(copy) => Json(serde_json::json!({"MsgSeq": copy})).into_response(),
        Err(e) => (StatusCode::NOT_FOUND, e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::split_prefixed;

    #[test]
    fn prefixed_paths_split_and_others_do_not() {
        assert_eq!(
            split_prefixed("/node-a/v4/group_open_http_svc/import_group_msg"),
            Some(("node-a", "group_open_http_svc", "import_group_msg"))
        );
        assert_eq!(split_prefixed("/a/b/v4/s/c"), Some(("a/b", "s", "c")));
        assert_eq!(split_prefixed("/v4/v4/s/c"), Some(("v4", "s", "c")));
        for bad in [
            "/v4/s/c",
            "//v4/s/c",
            "/a//v4/s/c",
            "/a/v4/s",
            "/a/v4/s/",
            "/a/v4//c",
            "/a/v4/s/c/d",
            "/a/admin/state",
            "/a/v5/s/c",
            "a/v4/s/c",
            "/",
        ] {
            assert_eq!(split_prefixed(bad), None, "{bad}");
        }
    }
}
