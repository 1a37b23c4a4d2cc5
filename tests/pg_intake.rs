//! Queueing on PostgreSQL against SQLite, side by side: the same job files and intake rows go
//! through the facade into a fresh SQLite file and a fresh PostgreSQL database (sharing one
//! Random key, so assigned values are comparable), and what comes out must be the same: the
//! outcome, the problems named, the messages (in queue order, bodies byte for byte), lanes,
//! groups, members, accounts, caller Randoms and intake rows.
//!
//! Runs when `TIMPORT_TEST_DATABASE_URL` names a PostgreSQL server (each test creates and drops a
//! database of its own on it); skipped otherwise.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use timport::intake::files::{FileOutcome, ingest_file};
use timport::intake::table;
use timport::settings::Database;
use timport::store::{RandomKey, Store, StoreOptions};
use tokio_util::sync::CancellationToken;

const T0: i64 = 1_700_000_000;
/// The Random key both databases get, so that both assign the same values.
const KEY: &str = "00112233445566778899aabbccddeeff";

fn text_body(text: &str) -> Value {
    json!([{"MsgType": "TIMTextElem", "MsgContent": {"Text": text}}])
}

fn line(
    group: &str,
    topic: Option<&str>,
    from: &str,
    t: i64,
    random: Option<u32>,
    text: &str,
) -> String {
    let mut v = json!({"GroupId": group, "From_Account": from, "SendTime": t,
                       "MsgBody": text_body(text)});
    if let Some(topic) = topic {
        v["TopicId"] = json!(topic);
    }
    if let Some(r) = random {
        v["Random"] = json!(r);
    }
    v.to_string()
}

/// The two stores under test, and where their files and database live.
struct Pair {
    sqlite: Store,
    pg: Store,
    dir: tempfile::TempDir,
    server: String,
    db: String,
}

/// The server URL with another database name.
fn with_database(server: &str, db: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (server, None),
    };
    let base = match base.rsplit_once('/') {
        Some((head, _)) if head.contains("//") && head.len() > head.find("//").unwrap() + 2 => head,
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

async fn admin(server: &str, sql: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(server)
        .await
        .expect("connect to the server");
    sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

impl Pair {
    /// A fresh SQLite file and a fresh PostgreSQL database, or `None` without a server.
    async fn new(name: &str) -> Option<Pair> {
        let Ok(server) = std::env::var("TIMPORT_TEST_DATABASE_URL") else {
            eprintln!("TIMPORT_TEST_DATABASE_URL is not set: PostgreSQL test {name} skipped");
            return None;
        };
        let db = format!("timport_pgintake_{name}_{}", std::process::id());
        admin(
            &server,
            &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        )
        .await;
        admin(&server, &format!("CREATE DATABASE {db}")).await;
        let dir = tempfile::tempdir().unwrap();
        let mut pair = Pair {
            sqlite: open(&Database::Sqlite(dir.path().join("q.db"))).await,
            pg: open(&Database::from(with_database(&server, &db))).await,
            dir,
            server,
            db,
        };
        // The same key in both, then open again so the stores use it.
        for s in [&pair.sqlite, &pair.pg] {
            exec(
                s,
                &format!("UPDATE meta SET value = '{KEY}' WHERE key = 'random_key'"),
            )
            .await;
            s.close().await;
        }
        pair.sqlite = open(&Database::Sqlite(pair.dir.path().join("q.db"))).await;
        pair.pg = open(&Database::from(with_database(&pair.server, &pair.db))).await;
        assert_eq!(pair.pg.random_key(), RandomKey::parse(KEY).as_ref());
        Some(pair)
    }

    fn both(&self) -> [&Store; 2] {
        [&self.sqlite, &self.pg]
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Ingests the same file into both; returns both outcomes, job ids replaced by ranks.
    async fn ingest(&self, name: &str, text: &str) -> FileOutcome {
        let p = self.write(name, text);
        let mut out = Vec::new();
        for s in self.both() {
            out.push(ingest(s, &p).await);
        }
        assert_eq!(
            out[0], out[1],
            "outcome of {name} on SQLite, then PostgreSQL"
        );
        out.remove(0)
    }

    /// Runs `sql` (a query of one text column, the same on both) and compares the answers.
    async fn same(&self, what: &str, sql: &str) -> Vec<String> {
        let a = rows(&self.sqlite, sql).await;
        let b = rows(&self.pg, sql).await;
        assert_eq!(a, b, "{what}: SQLite, then PostgreSQL");
        a
    }

    /// Compares every table intake writes.
    async fn same_tables(&self) {
        self.same("messages", &messages_sql()).await;
        self.same(
            "lanes",
            &format!(
                "SELECT {} FROM lanes ORDER BY group_id, topic_id",
                cols(&["group_id", "topic_id", "state", "pending", "in_flight"])
            ),
        )
        .await;
        self.same(
            "groups",
            &format!(
                "SELECT {} FROM groups ORDER BY group_id",
                cols(&["group_id", "random_counter", "spec", "create_state"])
            ),
        )
        .await;
        self.same(
            "jobs",
            &format!(
                "SELECT {} FROM jobs j ORDER BY id",
                cols(&[
                    RANK,
                    "kind",
                    "source",
                    "content_hash",
                    "message_count",
                    "group_count",
                    "pending"
                ])
            ),
        )
        .await;
        self.same(
            "job_lanes",
            "SELECT CAST((SELECT count(*) FROM jobs j2 WHERE j2.id <= jl.job_id) AS TEXT) || '|' ||
                    l.group_id || '|' || l.topic_id
             FROM job_lanes jl JOIN lanes l ON l.id = jl.lane_id ORDER BY 1",
        )
        .await;
        self.same(
            "caller_randoms",
            &format!(
                "SELECT {} FROM caller_randoms c ORDER BY group_id, random",
                cols(&[
                    "group_id",
                    "random",
                    "counter",
                    CALLER_RANK,
                    "source_line",
                    "source_index"
                ])
            ),
        )
        .await;
        self.same(
            "members",
            &format!(
                "SELECT {} FROM members ORDER BY group_id, member_account",
                cols(&[
                    "group_id",
                    "member_account",
                    "role",
                    "join_time",
                    "unread_msg_num",
                    "state",
                    "unread_state"
                ])
            ),
        )
        .await;
        self.same(
            "accounts",
            &format!(
                "SELECT {} FROM accounts ORDER BY user_id",
                cols(&["user_id", "profile", "nick", "face_url", "state"])
            ),
        )
        .await;
    }

    async fn drop_database(self) {
        self.pg.close().await;
        self.sqlite.close().await;
        admin(
            &self.server,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db),
        )
        .await;
    }
}

/// A job's rank among the jobs (ids are the backend's own: PostgreSQL's identity does not give
/// back the id of a rolled-back job, SQLite's rowid does).
const RANK: &str = "(SELECT count(*) FROM jobs j2 WHERE j2.id <= j.id)";
const CALLER_RANK: &str = "(SELECT count(*) FROM jobs j2 WHERE j2.id <= c.job_id)";

/// `col1 || '|' || col2 ...` with NULL shown as `~`, the same SQL on both backends.
fn cols(cols: &[&str]) -> String {
    cols.iter()
        .map(|c| format!("COALESCE(CAST({c} AS TEXT), '~')"))
        .collect::<Vec<_>>()
        .join(" || '|' || ")
}

/// Every message in queue order (by id), with its lane, job rank and body.
fn messages_sql() -> String {
    format!(
        "SELECT {} FROM messages m JOIN lanes l ON l.id = m.lane_id JOIN jobs j ON j.id = m.job_id
         JOIN message_bodies b ON b.message_id = m.id ORDER BY m.id",
        cols(&[
            "l.group_id",
            "l.topic_id",
            RANK,
            "m.source_line",
            "m.source_index",
            "m.from_account",
            "m.send_time",
            "m.random",
            "m.random_assigned",
            "m.recent_contact",
            "m.state",
            "b.body"
        ])
    )
}

async fn open(db: &Database) -> Store {
    Store::open(db, &StoreOptions::default())
        .await
        .unwrap_or_else(|e| panic!("open: {e}"))
}

async fn exec(s: &Store, sql: &str) {
    let sql = sqlx::AssertSqlSafe(sql.to_string());
    match (s.sqlite_pool(), s.pg_pool()) {
        (Some(p), _) => {
            sqlx::query(sql).execute(p).await.unwrap();
        }
        (_, Some(p)) => {
            sqlx::query(sql).execute(p).await.unwrap();
        }
        _ => unreachable!(),
    }
}

async fn rows(s: &Store, sql: &str) -> Vec<String> {
    let q = sqlx::AssertSqlSafe(sql.to_string());
    match (s.sqlite_pool(), s.pg_pool()) {
        (Some(p), _) => sqlx::query_scalar(q).fetch_all(p).await,
        (_, Some(p)) => sqlx::query_scalar(q).fetch_all(p).await,
        _ => unreachable!(),
    }
    .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Ingests a file through the real intake; job ids in the outcome become ranks.
async fn ingest(s: &Store, p: &Path) -> FileOutcome {
    let out = ingest_file(Some(s), p, true, &CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("ingest {}: {e}", p.display()));
    let rank = |id: i64| async move {
        let r = rows(
            s,
            &format!("SELECT CAST(count(*) AS TEXT) FROM jobs WHERE id <= {id}"),
        )
        .await;
        r[0].parse::<i64>().unwrap()
    };
    match out {
        FileOutcome::Accepted {
            job_id,
            messages,
            groups,
        } => FileOutcome::Accepted {
            job_id: rank(job_id).await,
            messages,
            groups,
        },
        FileOutcome::Duplicate { job_id } => FileOutcome::Duplicate {
            job_id: rank(job_id).await,
        },
        other => other,
    }
}

fn problems(out: &FileOutcome) -> Vec<String> {
    match out {
        FileOutcome::Rejected { problems, .. } => problems
            .iter()
            .map(|p| format!("{}: {}", p.line, p.problem))
            .collect(),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn a_large_multi_group_ndjson_job_is_queued_alike() {
    let Some(pair) = Pair::new("ndjson").await else {
        return;
    };
    let seq = RandomKey::parse(KEY).unwrap().sequence("g1");
    // 20,000 lines (several buffers) over three groups and topics, interleaved; a caller's
    // value at g1's counter 5 (assignment must skip it), recent-contact flags, bodies with
    // spaces, escapes and non-ASCII text.
    let mut text = String::new();
    for i in 0..20_000i64 {
        let (g, topic) = match i % 5 {
            0 | 1 => ("g1", None),
            2 => ("g1", Some("t")),
            3 => ("g2", None),
            _ => ("g3", Some("τ")),
        };
        let random = (i == 7).then(|| seq.at(5));
        let mut l = line(
            g,
            topic,
            &format!("u{}", i % 13),
            T0 + i / 3,
            random,
            &format!("m{i} \"q\" 日本 \\ x"),
        );
        if i % 11 == 0 {
            let mut v: Value = serde_json::from_str(&l).unwrap();
            v["RecentContactFlag"] = json!(1);
            l = v.to_string();
        }
        text.push_str(&l);
        text.push('\n');
    }
    let out = pair.ingest("big.ndjson", &text).await;
    assert!(
        matches!(
            out,
            FileOutcome::Accepted {
                job_id: 1,
                messages: 20_000,
                groups: 3
            }
        ),
        "{out:?}"
    );
    pair.same_tables().await;
    // g1's assigned values skip counter 5, which the caller's value holds.
    let g1 = pair
        .same(
            "g1 assigned",
            "SELECT CAST(m.random AS TEXT) FROM messages m JOIN lanes l ON l.id = m.lane_id
             WHERE l.group_id = 'g1' AND m.random_assigned = 1 ORDER BY m.source_line LIMIT 7",
        )
        .await;
    let expect: Vec<String> = [0, 1, 2, 3, 4, 6, 7]
        .iter()
        .map(|c| seq.at(*c).to_string())
        .collect();
    assert_eq!(g1, expect);
    // A second job continues each group's counter.
    let mut more = String::new();
    for i in 0..10 {
        more.push_str(&line(
            if i % 2 == 0 { "g1" } else { "g4" },
            None,
            "v",
            T0 + 99_999 + i,
            None,
            "later",
        ));
        more.push('\n');
    }
    let out = pair.ingest("more.ndjson", &more).await;
    assert!(
        matches!(
            out,
            FileOutcome::Accepted {
                job_id: 2,
                messages: 10,
                groups: 2
            }
        ),
        "{out:?}"
    );
    pair.same_tables().await;
    pair.drop_database().await;
}

#[tokio::test]
async fn a_duplicate_job_is_reported_alike_and_adds_nothing() {
    let Some(pair) = Pair::new("dup").await else {
        return;
    };
    let text: String = (0..50)
        .map(|i| line("g", None, "a", T0 + i, None, "x") + "\n")
        .collect();
    let first = pair.ingest("a.ndjson", &text).await;
    assert!(
        matches!(
            first,
            FileOutcome::Accepted {
                job_id: 1,
                messages: 50,
                ..
            }
        ),
        "{first:?}"
    );
    let again = pair.ingest("b.ndjson", &text).await;
    assert_eq!(again, FileOutcome::Duplicate { job_id: 1 });
    pair.same_tables().await;
    // Still queueing after the rolled-back duplicate.
    let other = pair
        .ingest("c.ndjson", &(line("g", None, "a", T0, None, "y") + "\n"))
        .await;
    assert!(
        matches!(
            other,
            FileOutcome::Accepted {
                job_id: 2,
                messages: 1,
                ..
            }
        ),
        "{other:?}"
    );
    pair.same_tables().await;
    pair.drop_database().await;
}

#[tokio::test]
async fn caller_random_conflicts_within_and_across_jobs_are_named_alike() {
    let Some(pair) = Pair::new("conflicts").await else {
        return;
    };
    let seq = RandomKey::parse(KEY).unwrap().sequence("g1");
    // Job 1: g1 assigns counters 0..3; a caller gives 42 in g1 and g2.
    let mut a = String::new();
    for i in 0..3 {
        a.push_str(&(line("g1", None, "a", T0 + i, None, "x") + "\n"));
    }
    a.push_str(&(line("g1", None, "a", T0 + 3, Some(42), "given") + "\n"));
    a.push_str(&(line("g2", None, "a", T0 + 3, Some(42), "given") + "\n"));
    let out = pair.ingest("a.ndjson", &a).await;
    assert!(
        matches!(
            out,
            FileOutcome::Accepted {
                job_id: 1,
                messages: 5,
                ..
            }
        ),
        "{out:?}"
    );
    // A repeat within one file: line 2 repeats line 1.
    let mut w = String::new();
    w.push_str(&(line("g3", None, "a", T0, Some(7), "first") + "\n"));
    w.push_str(&(line("g3", None, "a", T0, Some(7), "again") + "\n"));
    let out = pair.ingest("w.ndjson", &w).await;
    let said = problems(&out);
    assert!(
        said.len() == 1 && said[0].starts_with("2: ") && said[0].contains("line 1 of this file"),
        "{said:?}"
    );
    pair.same_tables().await;
    // Job 2: repeats across jobs (42 in g1), and the value assigned to g1's counter 1 in job 1.
    let mut b = String::new();
    b.push_str(&(line("g3", None, "a", T0, Some(7), "first") + "\n"));
    b.push_str(&(line("g1", None, "a", T0, Some(42), "repeat") + "\n"));
    b.push_str(&(line("g1", None, "a", T0, Some(seq.at(1)), "assigned before") + "\n"));
    b.push_str(&(line("g2", None, "a", T0, Some(43), "fine") + "\n"));
    let out = pair.ingest("b.ndjson", &b).await;
    let said = problems(&out);
    assert_eq!(said.len(), 2, "{said:?}");
    assert!(
        said[0].starts_with("2: ") && said[0].contains("job 1 (a.ndjson) line 4"),
        "{said:?}"
    );
    assert!(
        said[1].starts_with("3: ") && said[1].contains("assigned to"),
        "{said:?}"
    );
    // Nothing of job 2 stays, on either.
    pair.same_tables().await;
    // Within one buffer, a value given after it was assigned in the same job.
    let mut c = String::new();
    c.push_str(&(line("g5", None, "a", T0, None, "assigned") + "\n"));
    let g5 = RandomKey::parse(KEY).unwrap().sequence("g5");
    c.push_str(&(line("g5", None, "a", T0, Some(g5.at(0)), "same value") + "\n"));
    let out = pair.ingest("c.ndjson", &c).await;
    let said = problems(&out);
    assert!(
        said.len() == 1 && said[0].contains("assigned to"),
        "{said:?}"
    );
    pair.same_tables().await;
    pair.drop_database().await;
}

#[tokio::test]
async fn a_whole_group_json_job_with_members_and_accounts_is_queued_alike() {
    let Some(pair) = Pair::new("wholegroup").await else {
        return;
    };
    let msgs: Vec<_> = (0..5)
        .map(|i| {
            json!({"From_Account": if i % 2 == 0 { "owner" } else { "alice" },
                   "SendTime": T0 + i, "MsgBody": text_body(&format!("m{i}"))})
        })
        .collect();
    let job = serde_json::to_string_pretty(&json!({
        "GroupId": "team",
        "Group": {"Type": "Public", "Name": "Team", "Owner_Account": "owner", "CreateTime": T0 - 100},
        "Members": [
            {"Member_Account": "owner", "UnreadMsgNum": 3},
            {"Member_Account": "alice", "JoinTime": T0 - 50, "UnreadMsgNum": 2},
            {"Member_Account": "bob", "Role": "Admin"}
        ],
        "AccountList": [
            {"UserID": "owner", "Nick": "The Owner"},
            {"UserID": "carol", "Nick": "Carol", "FaceUrl": "https://example.com/c.png"}
        ],
        "MsgList": msgs
    }))
    .unwrap();
    let out = pair.ingest("team.json", &job).await;
    assert!(
        matches!(
            out,
            FileOutcome::Accepted {
                job_id: 1,
                messages: 5,
                groups: 1
            }
        ),
        "{out:?}"
    );
    pair.same_tables().await;
    // Once imported, a profile listed again with other data goes back to pending; one listed
    // with the same data stays imported; a member already queued is kept as it is.
    for s in pair.both() {
        exec(s, "UPDATE accounts SET state = 'imported'").await;
        exec(s, "UPDATE groups SET create_state = 'created'").await;
    }
    let again = json!({
        "GroupId": "team",
        "Group": {"Type": "Public", "Name": "Team 2", "Owner_Account": "owner", "CreateTime": T0 - 100},
        "Members": [{"Member_Account": "alice", "UnreadMsgNum": 9}, {"Member_Account": "dave"}],
        "AccountList": [
            {"UserID": "owner", "Nick": "The Owner"},
            {"UserID": "carol", "Nick": "Carol B", "FaceUrl": "https://example.com/c.png"}
        ],
        "MsgList": [{"From_Account": "dave", "SendTime": T0 + 10, "MsgBody": text_body("hi")}]
    })
    .to_string();
    let out = pair.ingest("team2.json", &again).await;
    assert!(
        matches!(
            out,
            FileOutcome::Accepted {
                job_id: 2,
                messages: 1,
                groups: 1
            }
        ),
        "{out:?}"
    );
    pair.same_tables().await;
    let accounts = pair
        .same(
            "account states",
            &format!(
                "SELECT {} FROM accounts ORDER BY user_id",
                cols(&["user_id", "state", "nick"])
            ),
        )
        .await;
    assert!(
        accounts.contains(&"carol|pending|Carol B".to_string()),
        "{accounts:?}"
    );
    assert!(
        accounts.contains(&"owner|imported|The Owner".to_string()),
        "{accounts:?}"
    );
    assert!(
        accounts.contains(&"dave|pending|~".to_string()),
        "{accounts:?}"
    );
    pair.same_tables().await;
    pair.drop_database().await;
}

#[tokio::test]
async fn intake_table_rows_good_and_bad_are_taken_alike() {
    let Some(pair) = Pair::new("table").await else {
        return;
    };
    let body = text_body("hello").to_string();
    let spaced = r#"[ {"MsgType": "TIMTextElem", "MsgContent": {"Text": "spaced  out"}} ]"#;
    let rows = [
        format!("('g1', NULL, 'alice', {T0}, NULL, '{body}', NULL)"),
        format!("('g1', 't', 'bob', {}, 77, '{spaced}', 1)", T0 + 1),
        // Repeats row 2's Random in g1.
        format!("('g1', NULL, 'carol', {}, 77, '{body}', NULL)", T0 + 2),
        // No group.
        format!("(NULL, NULL, 'alice', {T0}, NULL, '{body}', NULL)"),
        // MsgBody not JSON.
        format!("('g2', NULL, 'alice', {T0}, NULL, 'not json', NULL)"),
        // Random out of range, SendTime negative.
        format!("('g2', NULL, 'alice', -5, 4294967296, '{body}', NULL)"),
        // An empty topic is no topic.
        format!("('g2', '', 'dave', {T0}, NULL, '{body}', 0)"),
    ];
    for s in pair.both() {
        exec(
            s,
            &format!(
                "INSERT INTO intake(group_id, topic_id, from_account, send_time, random, msg_body,
                                    recent_contact_flag) VALUES {}",
                rows.join(", ")
            ),
        )
        .await;
    }
    let mut outs = Vec::new();
    for s in pair.both() {
        outs.push(table::poll_once(s).await.unwrap());
    }
    assert_eq!(outs[0], outs[1], "poll on SQLite, then PostgreSQL");
    assert_eq!(
        (outs[0].queued, outs[0].rejected, outs[0].skipped),
        (3, 4, 0),
        "{:?}",
        outs[0]
    );
    let intake = pair
        .same(
            "intake rows",
            &format!(
                "SELECT {} FROM intake i LEFT JOIN messages m ON m.id = i.message_id ORDER BY i.id",
                cols(&["i.id", "i.status", "i.error", "m.source_line"])
            ),
        )
        .await;
    assert!(
        intake[2].contains("rejected") && intake[2].contains("intake row 2"),
        "{intake:?}"
    );
    pair.same_tables().await;
    // A second poll finds nothing new; another row joins the same intake job.
    for s in pair.both() {
        assert_eq!(table::poll_once(s).await.unwrap(), Default::default());
        exec(
            s,
            &format!(
                "INSERT INTO intake(group_id, from_account, send_time, msg_body)
                 VALUES ('g1', 'eve', {T0}, '{body}')"
            ),
        )
        .await;
        assert_eq!(table::poll_once(s).await.unwrap().queued, 1);
    }
    pair.same_tables().await;
    pair.drop_database().await;
}
