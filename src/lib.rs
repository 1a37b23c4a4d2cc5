//! timport: durable, exactly-once, ordered import of chat history into Tencent Cloud Chat.
//!
//! # Layout
//! - [`settings`]: layered configuration (defaults, file, environment) and its validation.
//! - [`telemetry`]: tracing subscriber (JSON or text) and the filter from the configuration.
//! - [`store`]: every SQL statement behind one interface, on SQLite or PostgreSQL: the queue,
//!   lanes, jobs, the intake table.
//! - [`intake`]: job files in the spool folder and rows of the intake table, validated and queued.
//! - [`tencent`]: the REST client for Tencent Cloud Chat, UserSig, outcome classification.
//! - [`pacing`]: the app-wide request pacer: evenly spaced starts, learns a lower real quota.
//! - [`engine`]: ordered lanes, checkpoints, reconciliation, exactly-once resume.
//! - [`verify`]: `timport verify`: every imported message read back and classed.
//! - [`simulator`]: a local stand-in for Tencent's endpoints with fault injection.
//! - [`retention`]: `queue.keep_bodies`: bodies of imported messages dropped when not needed.
//! - [`ops`]: health, readiness and metrics over HTTP, systemd notify and watchdog.
//! - [`cli`]: the commands of the `timport` binary.

pub mod cli;
pub mod engine;
pub mod ha;
pub mod intake;
pub mod ops;
pub mod pacing;
pub mod retention;
pub mod settings;
pub mod simulator;
pub mod store;
pub mod telemetry;
pub mod tencent;
pub mod verify;
