//! The engine's store operations on PostgreSQL against their SQLite twins: the same seeded
//! queue in a temp SQLite file and in a fresh PostgreSQL database, the same sequence of store
//! calls through the facade on both, and after every step the same answers and the same rows
//! (messages, lanes with their counters, jobs, groups, members, accounts). Then one real engine
//! imports a seeded PostgreSQL queue into the simulator.
//!
//! Skipped (with a line on stderr) unless `TIMPORT_TEST_DATABASE_URL` names a PostgreSQL server;
//! each test makes a database of its own there and drops it when it passes.

mod common;

use std::time::Duration;

use common::*;
use sqlx::AssertSqlSafe;
use tempfile::TempDir;
use timport::settings::Database;
use timport::store::{
    ACCOUNT_FAILED_REASON, Claim, LaneUpdate, MemberUpdate, MessageUpdate, Record, RetryScope,
    Store, StoreOptions,
};
use tokio_util::sync::CancellationToken;

/// The server URL from the environment, or `None` (the test is skipped).
fn server_url() -> Option<String> {
    match std::env::var("TIMPORT_TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("TIMPORT_TEST_DATABASE_URL is not set: PostgreSQL test skipped");
            None
        }
    }
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let head = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{head}/{db}{query}")
}

/// A fresh database on the server (a unique name per test and run).
struct PgDb {
    server: String,
    name: String,
    url: String,
}

impl PgDb {
    async fn create(server: &str, test: &str) -> PgDb {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!(
            "pgengine_{test}_{}_{}",
            std::process::id(),
            nanos % 1_000_000_000
        );
        let admin = sqlx::PgPool::connect(server).await.unwrap();
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        PgDb {
            server: server.to_string(),
            url: with_database(server, &name),
            name,
        }
    }

    async fn drop_db(&self) {
        let admin = sqlx::PgPool::connect(&self.server).await.unwrap();
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&admin)
        .await
        .unwrap();
        admin.close().await;
    }
}

/// The same queue on both backends.
struct Pair {
    _dir: TempDir,
    sqlite_path: std::path::PathBuf,
    sqlite: Store,
    pg: Store,
    db: PgDb,
}

impl Pair {
    async fn new(test: &str) -> Option<Pair> {
        let server = server_url()?;
        let dir = tempfile::tempdir().unwrap();
        let sqlite_path = dir.path().join("queue.db");
        let sqlite = Store::open(&sqlite_path, &StoreOptions::default())
            .await
            .unwrap();
        let db = PgDb::create(&server, test).await;
        let pg = Store::open(&Database::from(db.url.clone()), &StoreOptions::default())
            .await
            .unwrap();
        assert_eq!(pg.backend_name(), "postgres");
        Some(Pair {
            _dir: dir,
            sqlite_path,
            sqlite,
            pg,
            db,
        })
    }

    /// Runs the same plain SQL on both databases.
    async fn exec(&self, sql: &str) {
        let lite = sqlx::SqlitePool::connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&self.sqlite_path)
                .busy_timeout(Duration::from_secs(30)),
        )
        .await
        .unwrap();
        sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
            .execute(&lite)
            .await
            .unwrap();
        lite.close().await;
        sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
            .execute(self.pg.pg_pool().unwrap())
            .await
            .unwrap();
    }

    /// Asserts both databases hold the same rows (all but the `updated_at` stamps).
    async fn same_rows(&self, step: &str) {
        assert_eq!(
            snapshot(&self.sqlite).await,
            snapshot(&self.pg).await,
            "rows differ after {step}"
        );
    }

    async fn finish(self) {
        self.sqlite.close().await;
        self.pg.close().await;
        self.db.drop_db().await;
    }
}

/// Runs one query on whichever backend `store` is, as rows of type `$t`.
macro_rules! rows {
    ($store:expr, $t:ty, $sql:expr) => {{
        let sql = AssertSqlSafe($sql.to_string());
        match ($store.sqlite_pool(), $store.pg_pool()) {
            (Some(p), _) => sqlx::query_as::<_, $t>(sql).fetch_all(p).await.unwrap(),
            (_, Some(p)) => sqlx::query_as::<_, $t>(sql).fetch_all(p).await.unwrap(),
            _ => unreachable!(),
        }
    }};
}

/// Calls the same store method on both backends and asserts the same answer; gives it back.
macro_rules! same {
    ($pair:expr, $s:ident => $call:expr) => {{
        let a = {
            let $s = &$pair.sqlite;
            $call.await.unwrap()
        };
        let b = {
            let $s = &$pair.pg;
            $call.await.unwrap()
        };
        assert_eq!(a, b, "answers differ: {}", stringify!($call));
        a
    }};
}

type MessageRow = (
    i64,
    String,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    String,
);
type LaneRow = (
    i64,
    String,
    Option<i64>,
    Option<String>,
    i64,
    i64,
    i64,
    (i64, i64, i64, i64),
    i64,
    Option<String>,
    i64,
    i64,
);
type RawLane = (
    i64,
    String,
    Option<i64>,
    Option<String>,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
    i64,
    i64,
);

/// A counter row beside the counts of its messages by state: id, four counters, four counts.
type CounterRow = (i64, i64, i64, i64, i64, i64, i64, i64, i64);
type GroupRow = (String, Option<String>, i64, Option<String>, i64);
type MemberRow = (i64, String, Option<i64>, String, Option<String>, String);

#[derive(Debug, PartialEq)]
struct Snapshot {
    messages: Vec<MessageRow>,
    lanes: Vec<LaneRow>,
    jobs: Vec<(i64, i64, i64, i64, i64)>,
    groups: Vec<GroupRow>,
    members: Vec<MemberRow>,
    accounts: Vec<(String, String, i64, Option<String>)>,
}

async fn snapshot(s: &Store) -> Snapshot {
    let messages = rows!(
        s,
        MessageRow,
        "SELECT m.id, m.state, m.attempts, m.sent_time, m.msg_seq, m.msg_time, m.result_code,
                m.result_text, COALESCE(b.body, '') FROM messages m
         LEFT JOIN message_bodies b ON b.message_id = m.id ORDER BY m.id"
    );
    let lanes: Vec<RawLane> = rows!(
        s,
        RawLane,
        "SELECT id, state, blocked_code, blocked_reason, last_send_time, last_msg_seq, retry_at,
                pending, in_flight, imported, failed, tie_nudge, last_error, checked_id,
                catch_up_waived FROM lanes ORDER BY id"
    );
    let lanes = lanes
        .into_iter()
        .map(|l| {
            (
                l.0,
                l.1,
                l.2,
                l.3,
                l.4,
                l.5,
                l.6,
                (l.7, l.8, l.9, l.10),
                l.11,
                l.12,
                l.13,
                l.14,
            )
        })
        .collect();
    Snapshot {
        messages,
        lanes,
        jobs: rows!(
            s,
            (i64, i64, i64, i64, i64),
            "SELECT id, pending, in_flight, imported, failed FROM jobs ORDER BY id"
        ),
        groups: rows!(
            s,
            GroupRow,
            "SELECT group_id, create_state, create_attempts, step_error, retry_at FROM groups
             ORDER BY group_id"
        ),
        members: rows!(
            s,
            MemberRow,
            "SELECT id, state, result, unread_state, result_text, member_account FROM members
             ORDER BY id"
        ),
        accounts: rows!(
            s,
            (String, String, i64, Option<String>),
            "SELECT user_id, state, attempts, reason FROM accounts ORDER BY user_id"
        ),
    }
}

/// Plain SQL for both backends: a job and the groups and lanes named.
fn seed_lanes(groups: &[(&str, Option<&str>)], lanes: &[(i64, &str, &str)]) -> String {
    let mut sql = String::from(
        "INSERT INTO jobs(id, kind, source, created_at) VALUES (1, 'file', 'seed-1', 0);
         INSERT INTO jobs(id, kind, source, created_at) VALUES (2, 'file', 'seed-2', 0);\n",
    );
    for (g, state) in groups {
        let state = state.map_or("NULL".to_string(), |s| format!("'{s}'"));
        sql.push_str(&format!(
            "INSERT INTO groups(group_id, spec, create_state) VALUES ('{g}', '{{\"GroupId\":\"{g}\"}}', {state});\n"
        ));
    }
    for (id, g, topic) in lanes {
        sql.push_str(&format!(
            "INSERT INTO lanes(id, group_id, topic_id) VALUES ({id}, '{g}', '{topic}');
             INSERT INTO job_lanes(job_id, lane_id) VALUES (1, {id});\n"
        ));
    }
    sql
}

/// One message row and its body, as plain SQL: (id, lane, job, from, SendTime, Random,
/// RecentContactFlag, body).
#[allow(clippy::too_many_arguments)]
fn seed_message(
    id: i64,
    lane: i64,
    job: i64,
    from: &str,
    send_time: i64,
    random: i64,
    recent: bool,
    body: &str,
) -> String {
    let body = body.replace('\'', "''");
    format!(
        "INSERT INTO messages(id, lane_id, job_id, source_line, from_account, send_time, random,
                              recent_contact)
         VALUES ({id}, {lane}, {job}, {id}, '{from}', {send_time}, {random}, {});
         INSERT INTO message_bodies(message_id, body) VALUES ({id}, '{body}');\n",
        i64::from(recent)
    )
}

/// Sets the lane and job counters from the messages (the intake keeps them on insert).
const COUNT: &str = "
    UPDATE lanes SET
        pending = (SELECT COUNT(*) FROM messages m WHERE m.lane_id = lanes.id AND m.state = 'pending'),
        in_flight = (SELECT COUNT(*) FROM messages m WHERE m.lane_id = lanes.id AND m.state = 'in_flight'),
        imported = (SELECT COUNT(*) FROM messages m WHERE m.lane_id = lanes.id AND m.state = 'imported'),
        failed = (SELECT COUNT(*) FROM messages m WHERE m.lane_id = lanes.id AND m.state = 'failed');
    UPDATE jobs SET
        pending = (SELECT COUNT(*) FROM messages m WHERE m.job_id = jobs.id AND m.state = 'pending'),
        in_flight = (SELECT COUNT(*) FROM messages m WHERE m.job_id = jobs.id AND m.state = 'in_flight'),
        imported = (SELECT COUNT(*) FROM messages m WHERE m.job_id = jobs.id AND m.state = 'imported'),
        failed = (SELECT COUNT(*) FROM messages m WHERE m.job_id = jobs.id AND m.state = 'failed');";

fn body(text: &str) -> String {
    text_body(text).to_string()
}

#[tokio::test]
async fn claims_and_records_match_sqlite() {
    let Some(p) = Pair::new("claims").await else {
        return;
    };
    let mut sql = seed_lanes(
        &[("g1", None), ("g2", Some("created"))],
        &[(1, "g1", ""), (2, "g1", "topic"), (3, "g2", "")],
    );
    // Lane 1: ties at T0+1 and T0+3, a RecentContactFlag change at message 15.
    let times = [0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11];
    for (i, t) in times.iter().enumerate() {
        let id = 10 + i as i64;
        let text = format!("lane one «{i}» \"quoted\" \\ 😀");
        sql.push_str(&seed_message(
            id,
            1,
            1,
            "alice",
            T0 + t,
            1000 + id,
            id >= 24,
            // Bodies go byte for byte: odd spacing and key order kept.
            &format!(
                "[ {{\"MsgType\":\"TIMTextElem\",  \"MsgContent\":{{\"Text\":{}}}}}]",
                serde_json::Value::from(text)
            ),
        ));
    }
    // Lane 2 (nudging): three messages in one second after an imported one in it.
    sql.push_str(&seed_message(
        40,
        2,
        2,
        "bob",
        T0 + 5,
        1,
        false,
        &body("imported"),
    ));
    sql.push_str("UPDATE messages SET state = 'imported', msg_seq = 1 WHERE id = 40;\n");
    sql.push_str("UPDATE lanes SET last_send_time = 1700000005, last_msg_seq = 1, tie_nudge = 1 WHERE id = 2;\n");
    for (i, t) in [5, 5, 6, 9].iter().enumerate() {
        let id = 41 + i as i64;
        sql.push_str(&seed_message(
            id,
            2,
            2,
            "bob",
            T0 + t,
            id,
            false,
            &body(&format!("b{i}")),
        ));
    }
    // Lane 3: a few plain messages.
    for i in 0..5 {
        let id = 60 + i;
        sql.push_str(&seed_message(
            id,
            3,
            1,
            "carol",
            T0 + 100 + i,
            id,
            false,
            &body("c"),
        ));
    }
    sql.push_str("INSERT INTO job_lanes(job_id, lane_id) VALUES (2, 2);\n");
    sql.push_str(COUNT);
    p.exec(&sql).await;
    p.same_rows("seeding").await;

    let now_ms = 4_000_000_000_000;
    let lanes = same!(p, s => s.runnable_lanes(now_ms, 10));
    assert_eq!(
        lanes.iter().map(|l| l.id).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    same!(p, s => s.next_retry_at());
    let lane1 = same!(p, s => s.lane(1));
    let lane2 = same!(p, s => s.lane(2));
    let lane3 = same!(p, s => s.lane(3));
    assert!(lane2.tie_nudge);
    same!(p, s => s.pending_upto(1, T0 + 3, 4));
    same!(p, s => s.pending_span(1, 12, T0 + 2));
    same!(p, s => s.pending_span(3, 0, T0));

    // A claim cut at the first tie (message 12 shares message 11's second).
    let b = same!(p, s => s.claim_batch(&lane1, 7, true));
    assert_eq!(b.iter().map(|m| m.id).collect::<Vec<_>>(), vec![10, 11, 12]);
    assert!(b[0].body.starts_with("[ {\"MsgType\""), "{}", b[0].body);
    p.same_rows("a claim cut at a tie").await;
    same!(p, s => s.in_flight(1));
    // The nudging lane: the imported message's second and the ties after it move on.
    let b = same!(p, s => s.claim_batch(&lane2, 7, false));
    assert!(b.iter().any(|m| m.sent_time.is_some()), "{b:?}");
    p.same_rows("a nudged claim").await;

    // Every outcome of a record, and every field of the checkpoint.
    same!(p, s => s.record(
        1,
        &[
            MessageUpdate::Imported { id: 10, msg_seq: 5, msg_time: T0, note: None },
            MessageUpdate::Imported { id: 11, msg_seq: 6, msg_time: T0 + 1, note: Some("n".into()) },
            MessageUpdate::Failed { id: 12, code: Some(10007), reason: "refused".into() },
            // Not in flight: nothing changes.
            MessageUpdate::Failed { id: 20, code: None, reason: "late".into() },
            MessageUpdate::Adopted { id: 19, msg_seq: 40, msg_time: T0 + 9, note: "found".into() },
        ],
        &LaneUpdate {
            seen_send_time: Some(T0 + 1),
            seen_msg_seq: Some(6),
            retry_at: Some(5),
            block: None,
            tie_nudge: false,
            last_error: Some("slow".into()),
            checked_id: Some(12),
        },
    ));
    p.same_rows("a record of every kind").await;
    // A checkpoint never goes back; no checked_id leaves the waiver.
    same!(p, s => s.record(1, &[], &LaneUpdate { seen_send_time: Some(T0), seen_msg_seq: Some(2), ..LaneUpdate::default() }));
    p.same_rows("an older checkpoint").await;

    // record_many: two lanes' answers, next claims for both (one cut at ties).
    let lane1 = same!(p, s => s.lane(1));
    let b = same!(p, s => s.claim_batch(&lane1, 3, false));
    let ids: Vec<i64> = b.iter().map(|m| m.id).collect();
    let lane3_batch = same!(p, s => s.claim_batch(&lane3, 2, false));
    let records = vec![
        Record {
            lane_id: 1,
            updates: vec![
                MessageUpdate::Pending {
                    id: ids[0],
                    refund: true,
                },
                MessageUpdate::Pending {
                    id: ids[1],
                    refund: false,
                },
                MessageUpdate::Unknown {
                    id: ids[2],
                    note: "502".into(),
                },
                MessageUpdate::Unknown {
                    id: ids[2],
                    note: "502 again".into(),
                },
            ],
            lane: LaneUpdate {
                tie_nudge: true,
                retry_at: Some(0),
                ..LaneUpdate::default()
            },
            next: Some(Claim {
                lane: lane1.clone(),
                max: 7,
                cut_at_tie: true,
            }),
        },
        Record {
            lane_id: 3,
            updates: vec![MessageUpdate::Imported {
                id: lane3_batch[0].id,
                msg_seq: 1,
                msg_time: T0 + 100,
                note: None,
            }],
            lane: LaneUpdate {
                seen_send_time: Some(T0 + 100),
                seen_msg_seq: Some(1),
                block: Some((None, "history unreadable".into())),
                ..LaneUpdate::default()
            },
            next: Some(Claim {
                lane: lane3.clone(),
                max: 1,
                cut_at_tie: false,
            }),
        },
        Record {
            lane_id: 2,
            updates: vec![],
            lane: LaneUpdate::default(),
            next: None,
        },
    ];
    let next = same!(p, s => s.record_many(&records));
    assert_eq!(next.len(), 3);
    assert!(next[2].is_empty());
    p.same_rows("record_many with next claims").await;

    // A block with a code; the lane leaves the runnable ones.
    same!(p, s => s.record(3, &[], &LaneUpdate { block: Some((Some(10015), "no such group".into())), ..LaneUpdate::default() }));
    let lanes = same!(p, s => s.runnable_lanes(now_ms, 10));
    assert!(!lanes.iter().any(|l| l.id == 3));
    same!(p, s => s.runnable_lanes(0, 10));
    same!(p, s => s.next_retry_at());
    p.same_rows("a block with a code").await;

    // A claim with a flag change in it stops before the change.
    let lane1 = same!(p, s => s.lane(1));
    for _ in 0..4 {
        let b = same!(p, s => s.claim_batch(&lane1, 7, false));
        let ups: Vec<MessageUpdate> = b
            .iter()
            .map(|m| MessageUpdate::Pending {
                id: m.id,
                refund: false,
            })
            .collect();
        same!(p, s => s.record(1, &ups, &LaneUpdate::default()));
    }
    same!(p, s => s.pending_span(1, 12, T0 + 11));
    p.same_rows("claims across a flag change").await;
    p.finish().await;
}

#[tokio::test]
async fn retry_scopes_match_sqlite() {
    let Some(p) = Pair::new("retry").await else {
        return;
    };
    let mut sql = seed_lanes(
        &[("g1", None), ("g2", Some("blocked")), ("g3", None)],
        &[(1, "g1", ""), (2, "g2", ""), (3, "g3", ""), (4, "g3", "t")],
    );
    for (i, lane) in [1, 1, 2, 2, 3, 3, 4, 4].iter().enumerate() {
        let id = 1 + i as i64;
        let job = if i % 2 == 0 { 1 } else { 2 };
        sql.push_str(&seed_message(
            id,
            *lane,
            job,
            "a",
            T0 + i as i64,
            id,
            false,
            &body("x"),
        ));
    }
    sql.push_str(
        "UPDATE messages SET state = 'failed', attempts = 5, result_code = 10007,
             result_text = 'refused' WHERE id IN (1, 3, 4, 5, 6, 8);
         UPDATE lanes SET state = 'blocked', blocked_code = 10015, blocked_reason = 'gone'
             WHERE id IN (2, 3);
         UPDATE lanes SET state = 'blocked', blocked_reason = 'unreadable' WHERE id = 4;
         INSERT INTO job_lanes(job_id, lane_id) VALUES (2, 1), (2, 2), (2, 3), (2, 4);
         INSERT INTO members(id, group_id, job_id, member_account, state, unread_state)
             VALUES (1, 'g2', 1, 'm1', 'failed', 'none'), (2, 'g2', 1, 'm2', 'imported', 'failed'),
                    (3, 'g3', 1, 'm3', 'failed', 'none');\n",
    );
    sql.push_str(COUNT);
    p.exec(&sql).await;
    p.same_rows("seeding").await;
    let r = same!(p, s => s.retry(RetryScope::Group("g2")));
    assert_eq!(r, (2, 1));
    p.same_rows("retry of a group").await;
    let r = same!(p, s => s.retry(RetryScope::Job(2)));
    assert_eq!(r.0, 2);
    p.same_rows("retry of a job").await;
    same!(p, s => s.retry(RetryScope::All));
    p.same_rows("retry of everything").await;
    same!(p, s => s.retry(RetryScope::Group("nope")));
    same!(p, s => s.group_blocked("g1", Some(10010), "deleted"));
    p.same_rows("a blocked group").await;
    same!(p, s => s.retry(RetryScope::Group("g1")));
    p.same_rows("retry after a blocked group").await;
    p.finish().await;
}

#[tokio::test]
async fn accounts_match_sqlite() {
    let Some(p) = Pair::new("accounts").await else {
        return;
    };
    let mut sql = seed_lanes(&[("g1", Some("created"))], &[(1, "g1", "")]);
    // Mixed case: byte order puts "Zed" before "abe" whatever the database's collation.
    for (id, profile) in [
        ("abe", 0),
        ("Zed", 0),
        ("émile", 0),
        ("bo", 1),
        ("Al", 1),
        ("cy", 0),
    ] {
        sql.push_str(&format!(
            "INSERT INTO accounts(user_id, profile, nick) VALUES ('{id}', {profile}, 'n-{id}');\n"
        ));
    }
    sql.push_str(
        "INSERT INTO members(id, group_id, job_id, member_account) VALUES
             (1, 'g1', 1, 'abe'), (2, 'g1', 1, 'Zed'), (3, 'g1', 1, 'cy');\n",
    );
    for i in 0..3 {
        sql.push_str(&seed_message(
            1 + i,
            1,
            1,
            "Zed",
            T0 + i,
            i,
            false,
            &body("m"),
        ));
    }
    sql.push_str(COUNT);
    p.exec(&sql).await;
    let ids = same!(p, s => s.pending_accounts(false, 10));
    assert_eq!(
        ids.iter().map(|a| a.user_id.as_str()).collect::<Vec<_>>(),
        vec!["Zed", "abe", "cy", "émile"]
    );
    same!(p, s => s.pending_accounts(true, 1));
    same!(p, s => s.pending_accounts(false, 2));
    same!(p, s => s.account_states(&["abe", "Zed", "missing"]));
    same!(p, s => s.accounts_pending());
    same!(p, s => s.record_accounts(&["abe", "bo"], &[("Zed", "70107 no such".to_string()), ("cy", "bad".to_string())]));
    p.same_rows("accounts recorded").await;
    let st = same!(p, s => s.account_states(&["abe", "Zed", "cy"]));
    assert_eq!(st.len(), 3);
    same!(p, s => s.account_totals());
    // A message failed for its sender's account, as the engine records it.
    let lane = same!(p, s => s.lane(1));
    let b = same!(p, s => s.claim_batch(&lane, 7, false));
    let ups: Vec<MessageUpdate> = b
        .iter()
        .map(|m| MessageUpdate::Failed {
            id: m.id,
            code: None,
            reason: format!("{ACCOUNT_FAILED_REASON}: Zed (70107 no such)"),
        })
        .collect();
    same!(p, s => s.record(1, &ups, &LaneUpdate::default()));
    p.same_rows("messages failed for an account").await;
    let r = same!(p, s => s.retry_accounts());
    assert_eq!((r.accounts, r.messages, r.members), (2, 3, 2));
    p.same_rows("retry --accounts").await;
    same!(p, s => s.account_totals());
    same!(p, s => s.record_accounts(&[], &[]));
    p.finish().await;
}

#[tokio::test]
async fn groups_and_members_match_sqlite() {
    let Some(p) = Pair::new("groups").await else {
        return;
    };
    let mut sql = seed_lanes(
        &[
            ("gB", Some("pending")),
            ("ga", Some("pending")),
            ("gc", Some("created")),
            ("gd", None),
        ],
        &[(1, "gB", ""), (2, "gc", ""), (3, "gd", "")],
    );
    sql.push_str(&seed_message(1, 1, 1, "a", T0, 1, false, &body("x")));
    sql.push_str(&seed_message(2, 3, 1, "a", T0, 2, false, &body("y")));
    sql.push_str(
        "UPDATE messages SET state = 'imported' WHERE id = 2;
         INSERT INTO members(id, group_id, job_id, member_account, role, join_time, unread_msg_num,
                             unread_state)
         VALUES (1, 'gc', 1, 'u1', 'Admin', 5, 3, 'none'), (2, 'gc', 1, 'u2', NULL, NULL, NULL, 'none'),
                (3, 'gc', 1, 'u3', 'Member', 7, 1, 'none'), (4, 'gd', 1, 'u4', NULL, NULL, 2, 'none'),
                (5, 'gB', 1, 'u5', NULL, NULL, NULL, 'none');\n",
    );
    sql.push_str(COUNT);
    p.exec(&sql).await;
    let now_ms = 4_000_000_000_000;
    let g = same!(p, s => s.groups_to_create(now_ms, 10));
    assert_eq!(
        g.iter().map(|g| g.group_id.as_str()).collect::<Vec<_>>(),
        vec!["gB", "ga"]
    );
    same!(p, s => s.count_create_attempt("gB"));
    same!(p, s => s.group_retry_at("ga", now_ms + 1, "backoff"));
    same!(p, s => s.groups_to_create(now_ms, 10));
    same!(p, s => s.group_created("gB", Some("10021 ours")));
    same!(p, s => s.group_created("ga", None));
    p.same_rows("groups created").await;
    let mut a = p.sqlite.groups_with_member_work(now_ms, 16).await.unwrap();
    let mut b = p.pg.groups_with_member_work(now_ms, 16).await.unwrap();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    assert_eq!(a, vec!["gc".to_string(), "gd".to_string()]);
    same!(p, s => s.group_work_left());
    same!(p, s => s.pending_members("gc", 2));
    same!(p, s => s.pending_members("gc", 10));
    same!(p, s => s.record_members(&[
        MemberUpdate::Imported { id: 1, result: 1, unread_pending: true },
        MemberUpdate::Imported { id: 2, result: 2, unread_pending: false },
        MemberUpdate::Failed { id: 3, result: None, reason: "10004".into() },
        // The same member twice in a row: the second answer is the one kept.
        MemberUpdate::Failed { id: 4, result: Some(0), reason: "first".into() },
        MemberUpdate::Failed { id: 4, result: Some(0), reason: "second".into() },
        MemberUpdate::Imported { id: 4, result: 1, unread_pending: true },
    ]));
    p.same_rows("members recorded").await;
    let unread = same!(p, s => s.pending_unread("gc", 10));
    assert_eq!(unread.len(), 1);
    same!(p, s => s.member_totals(None));
    same!(p, s => s.member_totals(Some("gc")));
    same!(p, s => s.record_members(&[
        MemberUpdate::UnreadSet { id: 1 },
        MemberUpdate::UnreadFailed { id: 4, reason: "70107".into() },
    ]));
    p.same_rows("unread counts recorded").await;
    same!(p, s => s.member_totals(None));
    same!(p, s => s.group_work_left());
    same!(p, s => s.group_blocked("gc", None, "refused"));
    same!(p, s => s.group_work_left());
    same!(p, s => s.retry(RetryScope::Group("gc")));
    p.same_rows("group retried").await;
    same!(p, s => s.pending_unread("gd", 10));
    same!(p, s => s.record_members(&[]));
    p.finish().await;
}

/// One real engine imports a seeded PostgreSQL queue into the simulator: every message lands,
/// in order, once, with its body as queued, and the queue says so.
#[tokio::test]
async fn engine_imports_a_postgres_queue() {
    let Some(server) = server_url() else {
        return;
    };
    let db = PgDb::create(&server, "e2e").await;
    let store = Store::open(&Database::from(db.url.clone()), &StoreOptions::default())
        .await
        .unwrap();
    let groups = ["ge1", "ge2", "ge3"];
    let mut sql = seed_lanes(
        &groups.iter().map(|g| (*g, None)).collect::<Vec<_>>(),
        &[(1, "ge1", ""), (2, "ge2", ""), (3, "ge3", "")],
    );
    let per_lane = 30;
    let mut id = 1;
    for lane in 1..=3 {
        for i in 0..per_lane {
            sql.push_str(&seed_message(
                id,
                lane,
                1,
                "alice",
                T0 + i,
                id,
                false,
                &body(&format!("lane {lane} message {i}")),
            ));
            id += 1;
        }
    }
    sql.push_str(COUNT);
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(store.pg_pool().unwrap())
        .await
        .unwrap();

    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    let sim = start_sim(cfg).await;
    let stop = CancellationToken::new();
    let engine_cfg = timport::engine::EngineConfig {
        until_idle: false,
        ..engine_config()
    };
    let mut run = tokio::spawn(timport::engine::run(
        store.clone(),
        client_for(&sim, 200),
        engine_cfg,
        stop.clone(),
        || {},
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let imported: i64 =
            sqlx::query_scalar("SELECT COALESCE(SUM(imported), 0)::bigint FROM lanes")
                .fetch_one(store.pg_pool().unwrap())
                .await
                .unwrap();
        if imported == 3 * per_lane {
            break;
        }
        if run.is_finished() {
            panic!("the engine stopped early: {:?}", (&mut run).await);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {imported} imported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), run).await;
    for (lane, g) in groups.iter().enumerate() {
        let texts: Vec<String> = history_texts(&sim, g)
            .into_iter()
            .map(|(_, _, t)| t)
            .collect();
        let want: Vec<String> = (0..per_lane)
            .map(|i| format!("lane {} message {i}", lane + 1))
            .collect();
        assert_eq!(texts, want, "history of {g}");
    }
    let counts: Vec<(i64, i64, i64)> =
        sqlx::query_as("SELECT pending, in_flight, failed FROM lanes ORDER BY id")
            .fetch_all(store.pg_pool().unwrap())
            .await
            .unwrap();
    assert_eq!(counts, vec![(0, 0, 0); 3]);
    store.close().await;
    db.drop_db().await;
}

/// Queues `per_lane` messages into each of `groups` as one file job (number `n`).
async fn queue_job(store: &Store, groups: &[String], n: i64, per_lane: i64) {
    let mut w = store.job_writer("file", &format!("job{n}")).await.unwrap();
    for i in 0..per_lane {
        for g in groups {
            w.push(timport::store::NewMessage {
                group_id: g.clone(),
                topic_id: String::new(),
                from_account: "alice".into(),
                send_time: T0 + n * 1_000 + i,
                random: None,
                recent_contact: false,
                body: body(&format!("job {n} message {i}")),
                source_line: i + 1,
                source_index: 0,
            })
            .await
            .unwrap();
        }
    }
    w.commit(None).await.unwrap();
}

/// What a worker of the concurrency test answers for a claimed message: mostly imported, some
/// failed (again after every retry), some back to pending on their first attempt.
fn outcome(m: &timport::store::QueuedMessage) -> MessageUpdate {
    if m.id % 7 == 3 {
        MessageUpdate::Failed {
            id: m.id,
            code: Some(80001),
            reason: "refused".into(),
        }
    } else if m.id % 5 == 4 && m.attempts == 1 {
        MessageUpdate::Pending {
            id: m.id,
            refund: false,
        }
    } else {
        MessageUpdate::Imported {
            id: m.id,
            msg_seq: m.id,
            msg_time: m.send_time,
            note: None,
        }
    }
}

/// Claims and records take no writer lock on PostgreSQL: many lanes claimed and recorded at once
/// (group commits over several lanes, in shuffled orders, with messages of several jobs in every
/// lane), beside a job writer queueing more messages into those same lanes and retries putting
/// failed messages back, never deadlock (any error fails the test), and at the end every lane's
/// and job's counters equal a recount of its messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lanes_claimed_and_recorded_at_once_beside_a_job_writer_keep_their_counters() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(server) = server_url() else {
        return;
    };
    let db = PgDb::create(&server, "lanes").await;
    let opts = StoreOptions {
        pg_pool_size: 16,
        ..StoreOptions::default()
    };
    let store = Store::open(&Database::from(db.url.clone()), &opts)
        .await
        .unwrap();
    let groups: Vec<String> = (0..24).map(|g| format!("cg{g:02}")).collect();
    let (jobs, per_lane) = (6, 15);
    queue_job(&store, &groups, 0, per_lane).await;
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (store, groups, writing) = (store.clone(), groups.clone(), writing.clone());
        tokio::spawn(async move {
            for n in 1..jobs {
                queue_job(&store, &groups, n, per_lane).await;
                store.retry(RetryScope::All).await.unwrap();
                tokio::task::yield_now().await;
            }
            writing.store(false, Ordering::SeqCst);
        })
    };
    let mut workers = Vec::new();
    for w in 0..6usize {
        let (store, writing) = (store.clone(), writing.clone());
        workers.push(tokio::spawn(async move {
            let mut round = 0usize;
            let mut idle = 0;
            loop {
                round += 1;
                let lanes = store.runnable_lanes(i64::MAX, 100).await.unwrap();
                if lanes.is_empty() {
                    if !writing.load(Ordering::SeqCst) {
                        idle += 1;
                        if idle > 3 {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                idle = 0;
                // A few lanes, overlapping other workers' picks, in an order of their own.
                let mut picked: Vec<_> = (0..4)
                    .map(|k| lanes[(w * 7 + round * 3 + k * 5) % lanes.len()].clone())
                    .collect();
                picked.sort_by_key(|l| l.id);
                picked.dedup_by_key(|l| l.id);
                if (w + round).is_multiple_of(2) {
                    picked.reverse();
                }
                let mut records = Vec::new();
                for lane in &picked {
                    let batch = store.claim_batch(lane, 7, false).await.unwrap();
                    if batch.is_empty() {
                        continue;
                    }
                    records.push(Record {
                        lane_id: lane.id,
                        updates: batch.iter().map(outcome).collect(),
                        lane: LaneUpdate::default(),
                        next: Some(Claim {
                            lane: lane.clone(),
                            max: 7,
                            cut_at_tie: false,
                        }),
                    });
                }
                let next = store.record_many(&records).await.unwrap();
                // The batches claimed by the group commit, recorded in one more (no next).
                let last: Vec<Record> = records
                    .iter()
                    .zip(next)
                    .filter(|(_, b)| !b.is_empty())
                    .map(|(r, b)| Record {
                        lane_id: r.lane_id,
                        updates: b.iter().map(outcome).collect(),
                        lane: LaneUpdate::default(),
                        next: None,
                    })
                    .collect();
                store.record_many(&last).await.unwrap();
            }
        }));
    }
    writer.await.unwrap();
    for w in workers {
        w.await.unwrap();
    }
    let pool = store.pg_pool().unwrap();
    let lanes: Vec<CounterRow> = sqlx::query_as(
        "SELECT l.id, l.pending, l.in_flight, l.imported, l.failed,
                COUNT(*) FILTER (WHERE m.state = 'pending'),
                COUNT(*) FILTER (WHERE m.state = 'in_flight'),
                COUNT(*) FILTER (WHERE m.state = 'imported'),
                COUNT(*) FILTER (WHERE m.state = 'failed')
         FROM lanes l LEFT JOIN messages m ON m.lane_id = l.id GROUP BY l.id ORDER BY l.id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(lanes.len(), groups.len());
    for l in &lanes {
        assert_eq!((l.1, l.2, l.3, l.4), (l.5, l.6, l.7, l.8), "lane {}", l.0);
    }
    let job_rows: Vec<CounterRow> = sqlx::query_as(
        "SELECT j.id, j.pending, j.in_flight, j.imported, j.failed,
                COUNT(*) FILTER (WHERE m.state = 'pending'),
                COUNT(*) FILTER (WHERE m.state = 'in_flight'),
                COUNT(*) FILTER (WHERE m.state = 'imported'),
                COUNT(*) FILTER (WHERE m.state = 'failed')
         FROM jobs j LEFT JOIN messages m ON m.job_id = j.id GROUP BY j.id ORDER BY j.id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(job_rows.len(), jobs as usize);
    for j in &job_rows {
        assert_eq!((j.1, j.2, j.3, j.4), (j.5, j.6, j.7, j.8), "job {}", j.0);
    }
    let t = store.totals(None).await.unwrap();
    assert_eq!(t.pending + t.in_flight, 0, "{t:?}");
    assert_eq!(t.imported + t.failed, jobs * per_lane * groups.len() as i64);
    assert!(t.failed > 0 && t.imported > 0, "{t:?}");
    store.close().await;
    db.drop_db().await;
}
