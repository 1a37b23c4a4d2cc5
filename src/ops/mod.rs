//! Operations: the HTTP listener for `/healthz`, `/readyz` and `/metrics` (Prometheus text), the
//! metrics recorder, systemd notification ([`systemd`]) and the status report ([`status`]).
//!
//! The listener runs until its shutdown token fires and holds no state of its own: readiness is
//! computed per request (the store's health, a write probe of the database, and whether the
//! engine stopped on an auth error), so it recovers as soon as the cause does. While the
//! database refuses writes it answers 503 naming the cause, without a probe of its own (the
//! store probes with backoff); a corrupt, deleted or replaced database answers 503 until the
//! daemon has stopped.

pub mod status;
pub mod systemd;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::store::{Health, Store};

/// Installs the global Prometheus recorder once and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("timport_request_duration_seconds".into()),
                    &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("timport_commit_records".into()),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests); metrics then go there.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!("timport_messages_imported_total", "Messages imported");
    metrics::describe_counter!("timport_messages_failed_total", "Messages failed, by code");
    metrics::describe_counter!("timport_requests_total", "Requests by endpoint and outcome");
    metrics::describe_histogram!("timport_request_duration_seconds", "Request latency");
    metrics::describe_histogram!(
        "timport_commit_records",
        "Answers recorded per SQLite transaction (group commit)"
    );
    metrics::describe_counter!("timport_rate_limited_total", "Rate-limit answers");
    metrics::describe_gauge!("timport_pacing_rate", "Current pacing rate, requests/s");
    metrics::describe_gauge!(
        "timport_messages",
        "Messages by state (pending, in_flight, blocked)"
    );
    metrics::describe_gauge!("timport_lanes", "Lanes by state (active, blocked)");
    metrics::describe_counter!("timport_job_files_total", "Job files by outcome");
    metrics::describe_counter!("timport_intake_rows_total", "Intake table rows by outcome");
    metrics::describe_counter!("timport_usersig_renewals_total", "UserSig renewals");
    metrics::describe_gauge!(
        "timport_ha_role",
        "High availability: 1 for this node's role now (single, standby, active), 0 for the others"
    );
    metrics::describe_counter!(
        "timport_ha_takeovers_total",
        "High availability: times this node was granted the lease and became the active node"
    );
}

/// What readiness depends on besides the database.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Set when the engine stopped on an auth error (the reason).
    pub stopped: Mutex<Option<String>>,
    /// High availability: this node's role now (`None`: not in a group).
    role: Mutex<Option<tokio::sync::watch::Receiver<crate::ha::Role>>>,
}

impl Readiness {
    /// Names the node's role in `/readyz` from now on.
    pub fn follow_role(&self, roles: tokio::sync::watch::Receiver<crate::ha::Role>) {
        *self.role.lock().unwrap_or_else(|p| p.into_inner()) = Some(roles);
    }

    fn role(&self) -> Option<&'static str> {
        self.role
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|r| r.borrow().as_str())
    }
}

#[derive(Clone)]
struct AppState {
    store: Store,
    readiness: Arc<Readiness>,
    metrics: PrometheusHandle,
}

/// Serves the listener until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Store,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = AppState {
        store,
        readiness,
        metrics: metrics_handle(),
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Binds the listener (so a taken port fails at start) and returns it with its address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if let Some(reason) = s
        .readiness
        .stopped
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stopped: {reason}\n"),
        );
    }
    match s.store.health() {
        Health::Stopped { reason } => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("stopped: {reason}\n"),
            );
        }
        // The store probes it with backoff; a request here adds no write of its own.
        Health::WritesRefused { cause, .. } => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("waiting: the database refuses writes: {cause}\n"),
            );
        }
        Health::Ok => {}
    }
    match s.store.write_probe().await {
        // A standby is ready too: it takes job files and serves status; the role says which.
        Ok(()) => match s.readiness.role() {
            Some(role) => (StatusCode::OK, format!("ready: {role}\n")),
            None => (StatusCode::OK, "ready\n".to_string()),
        },
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("database: {e}\n")),
    }
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}
