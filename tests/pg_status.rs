//! Issue 15 (the queue on PostgreSQL): `status`, `verify`'s bookkeeping and body retention read
//! and record the same on both backends. Every test seeds a temp SQLite file and a fresh
//! PostgreSQL database with the same rows (plain SQL, the same text on both), runs the same
//! operations through the facade on each, and asserts equal answers and equal rows afterwards.
//!
//! The PostgreSQL side needs a server: `TIMPORT_TEST_DATABASE_URL` (for example
//! `postgres://postgres@127.0.0.1:55432/postgres`); each test makes a database of its own there
//! and drops it at the end. Without the variable the tests say so and pass.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sqlx::{AssertSqlSafe, Connection};
use timport::settings::{Database, KeepBodies};
use timport::store::{Store, StoreOptions, VerifyOurs, VerifyRow};
use tokio_util::sync::CancellationToken;

/// The same queue on both backends.
struct Pair {
    sqlite: Store,
    pg: Store,
    server: String,
    db: String,
    _dir: tempfile::TempDir,
}

/// `server` with its database replaced by `db` (options kept).
fn with_database(server: &str, db: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (server, String::new()),
    };
    let start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[start..].find('/') {
        Some(i) => &base[..start + i],
        None => base,
    };
    format!("{base}/{db}{query}")
}

/// Both stores, freshly made and seeded; `None` (the test is skipped) without a server.
async fn pair(test: &str) -> Option<Pair> {
    let Ok(server) = std::env::var("TIMPORT_TEST_DATABASE_URL") else {
        eprintln!("{test}: TIMPORT_TEST_DATABASE_URL is not set; the PostgreSQL side is skipped");
        return None;
    };
    static N: AtomicU32 = AtomicU32::new(0);
    let db = format!(
        "tp_pgstatus_{test}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = sqlx::PgConnection::connect(&server)
        .await
        .expect("connect to TIMPORT_TEST_DATABASE_URL");
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{db}\"")))
        .execute(&mut admin)
        .await
        .expect("create the test database");
    admin.close().await.ok();
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions::default();
    let sqlite = Store::open(&dir.path().join("queue.db"), &opts)
        .await
        .expect("open sqlite");
    let pg = Store::open(&Database::from(with_database(&server, &db)), &opts)
        .await
        .expect("open postgres");
    let p = Pair {
        sqlite,
        pg,
        server,
        db,
        _dir: dir,
    };
    p.exec(SEED).await;
    Some(p)
}

impl Pair {
    /// Runs the same SQL text on both databases.
    async fn exec(&self, sql: &str) {
        for s in [&self.sqlite, &self.pg] {
            seed(s, sql).await;
        }
    }

    /// `(integer, text)` rows that `sql` reads, from each database: they must be equal.
    async fn same_rows(&self, sql: &str) -> Vec<(i64, Option<String>)> {
        let a = rows(&self.sqlite, sql).await;
        let b = rows(&self.pg, sql).await;
        assert_eq!(a, b, "{sql}");
        a
    }

    /// Closes both stores and drops the PostgreSQL database.
    async fn finish(self) {
        self.sqlite.close().await;
        self.pg.close().await;
        let mut admin = sqlx::PgConnection::connect(&self.server).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.db
        )))
        .execute(&mut admin)
        .await
        .expect("drop the test database");
        admin.close().await.ok();
    }
}

/// Runs `sql` (several statements) on whichever database `store` holds.
async fn seed(store: &Store, sql: &str) {
    if let Some(pool) = store.sqlite_pool() {
        sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
            .execute(pool)
            .await
            .unwrap_or_else(|e| panic!("sqlite: {e}\n{sql}"));
    } else {
        sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
            .execute(store.pg_pool().unwrap())
            .await
            .unwrap_or_else(|e| panic!("postgres: {e}\n{sql}"));
    }
}

async fn rows(store: &Store, sql: &str) -> Vec<(i64, Option<String>)> {
    if let Some(pool) = store.sqlite_pool() {
        sqlx::query_as(AssertSqlSafe(sql.to_string()))
            .fetch_all(pool)
            .await
            .unwrap()
    } else {
        sqlx::query_as(AssertSqlSafe(sql.to_string()))
            .fetch_all(store.pg_pool().unwrap())
            .await
            .unwrap()
    }
}

/// Calls the same method on both stores, asserts equal answers, and returns the answer.
macro_rules! same {
    ($p:expr, $s:ident => $call:expr) => {{
        let a = {
            let $s = &$p.sqlite;
            $call.await.expect(concat!("sqlite: ", stringify!($call)))
        };
        let b = {
            let $s = &$p.pg;
            $call.await.expect(concat!("postgres: ", stringify!($call)))
        };
        assert_eq!(a, b, "{}", stringify!($call));
        a
    }};
}

/// A queue in every state status shows. Groups: g1 (two lanes, one blocked; failures of three
/// kinds), g2 (being created), g3 (creation blocked), g4 (members pending), g5 (unread counts
/// pending), g6 (done). Jobs: 1 (a file), 2 (the intake job), 3 (a file not committed yet).
const SEED: &str = "
INSERT INTO jobs (id, kind, source, content_hash, message_count, group_count, pending, in_flight,
                  imported, failed, created_at) VALUES
    (1, 'file', 'a.jsonl', 'h1', 17, 3, 4, 1, 6, 6, 1700000100),
    (2, 'intake', 'intake', NULL, 6, 3, 3, 0, 3, 0, 1700000200),
    (3, 'file', 'b.jsonl', NULL, 0, 0, 0, 0, 0, 0, 1700000300);
INSERT INTO groups (group_id, create_state) VALUES
    ('g1', NULL), ('g2', 'pending'), ('g3', 'blocked'), ('g4', NULL), ('g5', NULL), ('g6', NULL);
INSERT INTO lanes (id, group_id, topic_id, state, blocked_code, blocked_reason, last_send_time,
                   last_msg_seq, pending, in_flight, imported, failed) VALUES
    (1, 'g1', '', 'active', NULL, NULL, 1700000005, 5, 1, 1, 5, 6),
    (2, 'g1', 't1', 'blocked', 10007, 'group dismissed (10007)', 1700000050, 7, 2, 0, 1, 0),
    (3, 'g2', '', 'active', NULL, NULL, 0, 0, 3, 0, 0, 0),
    (4, 'g3', '', 'active', NULL, NULL, 0, 0, 1, 0, 0, 0),
    (5, 'g4', '', 'active', NULL, NULL, 1700000061, 2, 0, 0, 2, 0),
    (6, 'g5', '', 'active', NULL, NULL, 1700000070, 1, 0, 0, 1, 0),
    (7, 'g6', '', 'active', NULL, NULL, 0, 0, 0, 0, 0, 0);
INSERT INTO job_lanes (job_id, lane_id) VALUES (1, 1), (1, 2), (1, 4), (2, 3), (2, 5), (2, 6);
INSERT INTO messages (id, lane_id, job_id, source_line, from_account, send_time, sent_time,
                      random, state, msg_seq, result_code, result_text, updated_at, body_sha256)
VALUES
    (1, 1, 1, 1, 'alice', 1700000001, NULL, 101, 'imported', 1, NULL, NULL, 999000, NULL),
    (2, 1, 1, 2, 'alice', 1700000002, NULL, 102, 'imported', 2, NULL, NULL, 999000, NULL),
    (3, 1, 1, 3, 'bob', 1700000002, 1700000003, 103, 'imported', 3, NULL, NULL, 999000, NULL),
    (4, 1, 1, 4, 'alice', 1700000004, NULL, 104, 'imported', 4, NULL, NULL, 999950, NULL),
    (5, 1, 1, 5, 'alice', 1700000005, NULL, 105, 'imported', 5, NULL, NULL, 999950, NULL),
    (6, 1, 1, 6, 'alice', 1700000006, NULL, 106, 'pending', NULL, NULL, NULL, NULL, NULL),
    (7, 1, 1, 7, 'alice', 1700000007, NULL, 107, 'in_flight', NULL, NULL, NULL, 999000, NULL),
    (8, 1, 1, 8, 'alice', 1700000003, NULL, 108, 'failed', NULL, 10004,
        'SendTime 1700000003 is older than 1700000009 (10004)', 999000, NULL),
    (9, 1, 1, 9, 'alice', 1700000003, NULL, 109, 'failed', NULL, 10004,
        'SendTime 1700000003 is older than 1700000009 (10004)', 999000, NULL),
    (10, 1, 1, 10, 'alice', 1700000005, NULL, 110, 'failed', NULL, 10004,
        'SendTime 1700000005 is older than 1700000012 (10004)', 999000, NULL),
    (11, 1, 1, 11, 'alice', 1700000011, NULL, 111, 'failed', NULL, 80001, 'bad word 3', 999000, NULL),
    (12, 2, 1, 12, 'carol', 1700000050, NULL, 112, 'imported', 7, NULL, NULL, 999000, NULL),
    (13, 2, 1, 13, 'carol', 1700000051, NULL, 113, 'pending', NULL, NULL, NULL, NULL, NULL),
    (14, 2, 1, 14, 'carol', 1700000052, NULL, 114, 'pending', NULL, NULL, NULL, NULL, NULL),
    (15, 3, 2, 1, 'dave', 1700000060, NULL, 115, 'pending', NULL, NULL, NULL, NULL, NULL),
    (16, 3, 2, 2, 'dave', 1700000061, NULL, 116, 'pending', NULL, NULL, NULL, NULL, NULL),
    (17, 3, 2, 3, 'dave', 1700000062, NULL, 117, 'pending', NULL, NULL, NULL, NULL, NULL),
    (18, 4, 1, 18, 'erin', 1700000063, NULL, 118, 'pending', NULL, NULL, NULL, NULL, NULL),
    (19, 5, 2, 4, 'frank', 1700000060, NULL, 119, 'imported', 1, NULL, NULL, 999000, NULL),
    (20, 5, 2, 5, 'frank', 1700000061, NULL, 4294967295, 'imported', 2, NULL, NULL, 999000, NULL),
    (21, 6, 2, 6, 'gina', 1700000070, NULL, 0, 'imported', 1, NULL, NULL, 999000, 'aa11'),
    (22, 1, 1, 22, 'alice', 1700000022, NULL, 122, 'failed', NULL, NULL, NULL, 999000, NULL),
    (23, 1, 1, 23, 'alice', 1700000002, NULL, 123, 'failed', NULL, 20001,
        'illegal body at index 2', 999000, NULL);
INSERT INTO message_bodies (message_id, body) VALUES
    (1, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"one\"}}]'),
    (2, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"two\"}}]'),
    (3, '[{\"MsgContent\":{\"Text\":\"three\"},\"MsgType\":\"TIMTextElem\"}]'),
    (4, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"four\"}}]'),
    (5, '[ {\"MsgType\" : \"TIMTextElem\", \"MsgContent\" : {\"Text\" : \"five\"}} ]'),
    (6, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"six\"}}]'),
    (7, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"seven\"}}]'),
    (8, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"eight\"}}]'),
    (9, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"nine\"}}]'),
    (10, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"ten\"}}]'),
    (11, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"eleven\"}}]'),
    (12, '[{\"MsgType\":\"TIMFaceElem\",\"MsgContent\":{\"Index\":9007199254740993}}]'),
    (13, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"13\"}}]'),
    (14, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"14\"}}]'),
    (15, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"15\"}}]'),
    (16, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"16\"}}]'),
    (17, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"17\"}}]'),
    (18, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"18\"}}]'),
    (19, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"caf\\u00e9 😀\"}}]'),
    (20, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"20\"}}]'),
    (22, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"22\"}}]'),
    (23, '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"23\"}}]');
INSERT INTO members (id, group_id, job_id, member_account, state, unread_state) VALUES
    (1, 'g4', 1, 'bob', 'pending', 'none'),
    (2, 'g5', 2, 'carol', 'imported', 'pending'),
    (3, 'g1', 1, 'dave', 'imported', 'set');
INSERT INTO accounts (user_id, state) VALUES ('alice', 'imported'), ('bob', 'pending');
";

fn row(
    id: Option<i64>,
    seq: i64,
    kind: &'static str,
    exp: Option<&str>,
    found: Option<&str>,
) -> VerifyRow {
    VerifyRow {
        message_id: id,
        msg_seq: seq,
        kind,
        expected: exp.map(str::to_string),
        found: found.map(str::to_string),
    }
}

/// `verify_lookalikes` on both, in id order (the order of the candidates is not part of it).
async fn same_lookalikes(p: &Pair, lane: i64, from: &str, time: i64) -> Vec<(VerifyOurs, bool)> {
    let mut a = p.sqlite.verify_lookalikes(lane, from, time).await.unwrap();
    let mut b = p.pg.verify_lookalikes(lane, from, time).await.unwrap();
    a.sort_by_key(|(o, _)| o.id);
    b.sort_by_key(|(o, _)| o.id);
    assert_eq!(a, b, "verify_lookalikes({lane}, {from}, {time})");
    a
}

#[tokio::test]
async fn status_reads_the_same_on_both_backends() {
    let Some(p) = pair("status").await else {
        return;
    };
    for group in [None, Some("g1"), Some("g2"), Some("g6"), Some("nope")] {
        same!(p, s => s.totals(group));
        same!(p, s => s.lanes(group, 100));
    }
    let t = same!(p, s => s.totals(None));
    assert_eq!(
        (
            t.pending,
            t.in_flight,
            t.imported,
            t.failed,
            t.blocked,
            t.lanes,
            t.lanes_blocked
        ),
        (5, 1, 9, 6, 2, 7, 1)
    );
    let lanes = same!(p, s => s.lanes(None, 100));
    let steps: Vec<(&str, &str, &str)> = lanes
        .iter()
        .map(|l| (l.group_id.as_str(), l.topic_id.as_str(), l.step.as_str()))
        .collect();
    assert_eq!(
        steps,
        [
            ("g2", "", "create"),
            ("g1", "", "messages"),
            ("g1", "t1", "messages"),
            ("g3", "", "create blocked"),
            ("g4", "", "members"),
            ("g5", "", "unread"),
            ("g6", "", "done"),
        ]
    );
    same!(p, s => s.lanes(None, 2));
    let blocked = same!(p, s => s.blocked_lanes(10));
    assert_eq!(blocked.len(), 1);
    assert_eq!(blocked[0].blocked_code, Some(10007));
    same!(p, s => s.blocked_lanes(0));
    let jobs = same!(p, s => s.jobs(10));
    assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), [2, 1]);
    same!(p, s => s.jobs(1));
    for group in [None, Some("g1"), Some("g2")] {
        same!(p, s => s.failure_reasons(group, 10));
    }
    let reasons = same!(p, s => s.failure_reasons(None, 10));
    let summary: Vec<(Option<i64>, &str, i64, &str)> = reasons
        .iter()
        .map(|r| (r.code, r.reason.as_str(), r.messages, r.example.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (
                Some(10004),
                "SendTime N is older than N (10004)",
                3,
                "SendTime 1700000003 is older than 1700000009 (10004)"
            ),
            (None, "", 1, ""),
            (
                Some(20001),
                "illegal body at index N",
                1,
                "illegal body at index 2"
            ),
            (Some(80001), "bad word N", 1, "bad word 3"),
        ]
    );
    same!(p, s => s.failure_reasons(None, 2));
    p.finish().await;
}

#[tokio::test]
async fn verify_bookkeeping_is_the_same_on_both_backends() {
    let Some(p) = pair("verify").await else {
        return;
    };
    let scopes: [(Option<&str>, Option<i64>); 6] = [
        (None, None),
        (Some("g1"), None),
        (Some("g4"), None),
        (None, Some(1)),
        (None, Some(2)),
        (Some("nope"), None),
    ];
    for (g, j) in scopes {
        same!(p, s => s.verify_scope(g, j));
        assert!(same!(p, s => s.verify_counts(g, j)).is_empty());
    }
    let scope = same!(p, s => s.verify_scope(None, None));
    assert_eq!(
        scope
            .iter()
            .map(|l| (l.lane_id, l.low_seq, l.high_seq, l.unfinished))
            .collect::<Vec<_>>(),
        [(1, 1, 5, 2), (2, 7, 7, 2), (5, 1, 2, 0), (6, 1, 1, 0)]
    );

    // Our messages and their lookalikes, bodies and digests as kept.
    same!(p, s => s.verify_ours(1, 1, 5));
    same!(p, s => s.verify_ours(1, 4, 4));
    same!(p, s => s.verify_ours(5, 0, 10));
    let ours = same!(p, s => s.verify_ours(6, 1, 1));
    assert_eq!(
        (ours[0].body.as_str(), ours[0].body_sha256.as_deref()),
        ("", Some("aa11"))
    );
    let look = same_lookalikes(&p, 1, "alice", 1700000002).await;
    let mut ids: Vec<(i64, bool)> = look.iter().map(|(o, i)| (o.id, *i)).collect();
    ids.sort();
    assert_eq!(ids, [(2, true), (23, false)]);
    same_lookalikes(&p, 1, "bob", 1700000003).await;
    same_lookalikes(&p, 1, "bob", 1700000002).await;

    // Lane 1 in two pages, every class; lane 2 and lane 5 in one.
    same!(p, s => s.verify_begin_lane(1, 5, None, 1));
    same!(p, s => s.verify_begin_lane(2, 1, Some(7), 7));
    same!(p, s => s.verify_begin_lane(5, 2, None, 1));
    same!(p, s => s.verify_scope(None, None));
    let page1 = vec![
        row(Some(5), 5, "verified", None, None),
        row(
            Some(4),
            4,
            "altered",
            Some(r#"{"Text":"four"}"#),
            Some(r#"{"Text":"4"}"#),
        ),
        row(
            None,
            4,
            "foreign",
            None,
            Some(r#"{"From_Account":"mallory"}"#),
        ),
        row(Some(3), 3, "duplicated", Some("{}"), Some("[3,9]")),
    ];
    same!(p, s => s.verify_record(1, 3, 5, &page1, Some(5), 2, false));
    same!(p, s => s.verify_scope(Some("g1"), None));
    same!(p, s => s.verify_counts(None, None));
    // The same page read twice counts once.
    same!(p, s => s.verify_record(1, 3, 5, &page1, Some(9), 2, false));
    let page2 = vec![
        row(Some(2), 2, "missing", Some(r#"{"Text":"two"}"#), None),
        row(Some(1), 1, "unverifiable", None, Some("body dropped")),
    ];
    same!(p, s => s.verify_record(1, 1, 2, &page2, None, 0, true));
    same!(p, s => s.verify_record(2, 7, 7, &[row(Some(12), 7, "verified", None, None)], None, 0, true));
    same!(p, s => s.verify_record(5, 1, 2, &[], Some(2), 1, false));
    for (g, j) in scopes {
        same!(p, s => s.verify_scope(g, j));
        same!(p, s => s.verify_counts(g, j));
        same!(p, s => s.verify_problems(g, j, 100));
        same!(p, s => s.verify_problems(g, j, 2));
    }
    let counts = same!(p, s => s.verify_counts(None, None));
    let c: Vec<(i64, [i64; 6], bool)> = counts
        .iter()
        .map(|c| {
            (
                c.lane_id,
                [
                    c.verified,
                    c.missing,
                    c.altered,
                    c.duplicated,
                    c.unverifiable,
                    c.foreign,
                ],
                c.done,
            )
        })
        .collect();
    assert_eq!(
        c,
        [
            (1, [1, 1, 1, 1, 1, 1], true),
            (2, [1, 0, 0, 0, 0, 0], true),
            (5, [0, 0, 0, 0, 0, 0], false)
        ]
    );
    let pass = same!(p, s => s.verify_scope(Some("g1"), None))[0]
        .pass
        .clone()
        .unwrap();
    assert_eq!(
        (pass.top_seq, pass.next_seq, pass.done),
        (Some(5), Some(0), true)
    );
    assert_eq!(same!(p, s => s.verify_problems(None, None, 100)).len(), 5);

    // A page replaced by fewer classes; a lane begun again loses its results.
    same!(p, s => s.verify_record(1, 3, 5, &page1[..1], None, 2, false));
    same!(p, s => s.verify_counts(None, None));
    same!(p, s => s.verify_begin_lane(2, 1, None, 7));
    same!(p, s => s.verify_counts(None, None));
    same!(p, s => s.verify_scope(None, None));

    // --restart of one group, then of one job, then of all.
    same!(p, s => s.verify_reset(Some("g4"), None));
    same!(p, s => s.verify_scope(None, None));
    same!(p, s => s.verify_counts(None, None));
    same!(p, s => s.verify_reset(None, Some(1)));
    assert!(same!(p, s => s.verify_counts(None, None)).is_empty());
    same!(p, s => s.verify_begin_lane(6, 1, None, 1));
    same!(p, s => s.verify_record(6, 1, 1, &[row(Some(21), 1, "verified", None, None)], Some(1), 0, true));
    same!(p, s => s.verify_counts(None, None));
    same!(p, s => s.verify_reset(None, None));
    assert!(same!(p, s => s.verify_counts(None, None)).is_empty());
    assert!(
        same!(p, s => s.verify_scope(None, None))
            .iter()
            .all(|l| l.pass.is_none())
    );
    p.same_rows("SELECT count(*), CAST(NULL AS TEXT) FROM verify_results")
        .await;
    p.finish().await;
}

#[tokio::test]
async fn the_verify_quota_claim_is_the_same_on_both_backends() {
    let Some(p) = pair("claim").await else {
        return;
    };
    assert_eq!(same!(p, s => s.verify_claim_read()), None);
    // Nothing to beat, acknowledge or release yet.
    assert!(!same!(p, s => s.verify_heartbeat("t1", 500)));
    same!(p, s => s.verify_ack("t1", 500, 10.0));
    same!(p, s => s.verify_release("t1"));
    assert_eq!(same!(p, s => s.verify_claim_read()), None);

    same!(p, s => s.verify_claim("t1", 2.5, 1000));
    same!(p, s => s.verify_claim_read());
    assert!(same!(p, s => s.verify_heartbeat("t1", 2000)));
    assert!(!same!(p, s => s.verify_heartbeat("t2", 2500)));
    same!(p, s => s.verify_ack("t2", 2600, 1.0));
    same!(p, s => s.verify_ack("t1", 3000, 40.25));
    let c = same!(p, s => s.verify_claim_read()).unwrap();
    assert_eq!(
        (
            c.token.as_str(),
            c.rate,
            c.heartbeat_ms,
            c.ack_token.as_deref(),
            c.ack_ms
        ),
        ("t1", 2.5, 2000, Some("t1"), Some(3000))
    );
    // A new claim replaces the old one and its acknowledgement.
    same!(p, s => s.verify_claim("t2", 0.125, 4000));
    let c = same!(p, s => s.verify_claim_read()).unwrap();
    assert_eq!(
        (c.token.as_str(), c.ack_token, c.ack_ms),
        ("t2", None, None)
    );
    assert!(!same!(p, s => s.verify_heartbeat("t1", 4500)));
    same!(p, s => s.verify_release("t1"));
    assert!(same!(p, s => s.verify_claim_read()).is_some());
    same!(p, s => s.verify_release("t2"));
    assert_eq!(same!(p, s => s.verify_claim_read()), None);
    p.same_rows("SELECT count(*), CAST(NULL AS TEXT) FROM verify_claim")
        .await;
    p.finish().await;
}

/// The bodies and digests of every message, as each database holds them now.
async fn bodies_state(p: &Pair) -> (Vec<(i64, Option<String>)>, Vec<(i64, Option<String>)>) {
    (
        p.same_rows("SELECT id, body_sha256 FROM messages ORDER BY id")
            .await,
        p.same_rows("SELECT message_id, body FROM message_bodies ORDER BY message_id")
            .await,
    )
}

#[tokio::test]
async fn bodies_are_dropped_the_same_on_both_backends() {
    let Some(p) = pair("bodies").await else {
        return;
    };
    let (_, before) = bodies_state(&p).await;

    // forever: nothing, ever.
    for s in [&p.sqlite, &p.pg] {
        let b = s
            .bodies_to_drop(KeepBodies::Forever, 2_000_000, 100)
            .await
            .unwrap();
        assert!(b.last && b.cursor.is_none() && b.messages.is_empty());
    }
    // Nothing to drop, no cursor: nothing changes.
    assert_eq!(same!(p, s => s.drop_bodies(&[], None)), 0);

    // until_verified: results of every class, for imported and other messages, read in
    // batches of 3 through the cursor.
    same!(p, s => s.verify_begin_lane(1, 5, None, 1));
    let lane1 = vec![
        row(Some(5), 5, "missing", None, None),
        row(Some(4), 4, "verified", None, None),
        row(None, 4, "foreign", None, Some("{}")),
        row(Some(3), 3, "altered", None, None),
        row(Some(2), 2, "verified", None, None),
        row(Some(1), 1, "verified", None, None),
    ];
    same!(p, s => s.verify_record(1, 1, 5, &lane1, Some(5), 0, true));
    same!(p, s => s.verify_begin_lane(5, 2, None, 1));
    let lane5 = vec![
        row(Some(20), 2, "verified", None, None),
        row(Some(19), 1, "verified", None, None),
    ];
    same!(p, s => s.verify_record(5, 1, 2, &lane5, Some(2), 0, true));
    same!(p, s => s.verify_begin_lane(6, 1, None, 1));
    // 21's body is gone already; 8 is failed (a result never drops a failed message's body).
    let lane6 = vec![
        row(Some(21), 1, "verified", None, None),
        row(Some(8), 1, "verified", None, None),
    ];
    same!(p, s => s.verify_record(6, 1, 1, &lane6, Some(1), 0, true));
    let mut batches = 0;
    let mut dropped = 0;
    loop {
        let a = p
            .sqlite
            .bodies_to_drop(KeepBodies::UntilVerified, 0, 3)
            .await
            .unwrap();
        let b =
            p.pg.bodies_to_drop(KeepBodies::UntilVerified, 0, 3)
                .await
                .unwrap();
        assert_eq!(
            (&a.messages, a.cursor, a.last),
            (&b.messages, b.cursor, b.last),
            "batch {batches}"
        );
        // Any digest text goes in as given (the caller computes it); 8 is there to be refused.
        let mut digests: Vec<(i64, String)> = a
            .messages
            .iter()
            .map(|(id, body)| (*id, format!("digest-{id}-{}", body.len())))
            .collect();
        digests.push((8, "never".into()));
        dropped += same!(p, s => s.drop_bodies(&digests, a.cursor));
        batches += 1;
        if a.last {
            break;
        }
    }
    assert_eq!((batches, dropped), (4, 5));
    let (sha, kept) = bodies_state(&p).await;
    let gone: Vec<i64> = before
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !kept.iter().any(|(k, _)| k == id))
        .collect();
    assert_eq!(gone, [1, 2, 4, 19, 20]);
    assert!(
        sha[0]
            .1
            .as_deref()
            .is_some_and(|d| d.starts_with("digest-1-"))
    );
    assert_eq!(
        sha[7].1, None,
        "a failed message keeps its body, without a digest"
    );
    p.same_rows(
        "SELECT CAST(0 AS BIGINT), value FROM meta WHERE key = 'bodies_dropped_through_result'",
    )
    .await;
    // Nothing new since the cursor.
    for s in [&p.sqlite, &p.pg] {
        let b = s
            .bodies_to_drop(KeepBodies::UntilVerified, 0, 3)
            .await
            .unwrap();
        assert!(b.last && b.cursor.is_none() && b.messages.is_empty());
    }
    // Verify sees the digests in place of the bodies.
    same!(p, s => s.verify_ours(1, 1, 5));
    same!(p, s => s.verify_ours(5, 1, 2));

    // A duration: imported messages updated before now - 100 s, verified or not.
    for limit in [1, 2, 100] {
        let a = p
            .sqlite
            .bodies_to_drop(KeepBodies::For(Duration::from_secs(100)), 1_000_000, limit)
            .await
            .unwrap();
        let b =
            p.pg.bodies_to_drop(KeepBodies::For(Duration::from_secs(100)), 1_000_000, limit)
                .await
                .unwrap();
        assert_eq!((a.cursor, a.last), (b.cursor, b.last), "limit {limit}");
        assert_eq!(a.messages.len(), b.messages.len(), "limit {limit}");
        if limit == 100 {
            let mut a = a.messages;
            let mut b = b.messages;
            a.sort();
            b.sort();
            assert_eq!(a, b);
            assert_eq!(a.iter().map(|m| m.0).collect::<Vec<_>>(), [3, 12]);
        }
    }
    // The daemon's own pass (real digests of the canonical text) drops the rest the same way.
    let stop = CancellationToken::new();
    let keep = KeepBodies::For(Duration::from_secs(1));
    let a = timport::retention::pass(&p.sqlite, keep, &stop)
        .await
        .unwrap();
    let b = timport::retention::pass(&p.pg, keep, &stop).await.unwrap();
    assert_eq!((a, b), (3, 3));
    let (sha, kept) = bodies_state(&p).await;
    assert_eq!(
        kept.iter().map(|k| k.0).collect::<Vec<_>>(),
        [6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 22, 23]
    );
    assert!(
        sha[2].1.as_deref().is_some_and(|d| d.len() == 64),
        "{sha:?}"
    );
    same!(p, s => s.verify_ours(1, 1, 5));
    same_lookalikes(&p, 1, "bob", 1700000003).await;
    p.finish().await;
}
