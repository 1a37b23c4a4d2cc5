//! Issue 11 point 1: bodies arrive exactly as queued. Tricky but valid bodies go through every
//! intake path and the real engine to the simulator, which keeps the bytes it received; they must
//! be the caller's text minified, byte for byte. Bodies that could not be carried unaltered are
//! refused with a report naming the line and the reason.

mod common;

use common::*;
use serde_json::Value;
use sqlx::Connection;
use timport::engine::EngineExit;
use timport::intake::files::{FileOutcome, Problem};
use timport::intake::table;
use timport::intake::validate::{MAX_BODY_BYTES, minify};

/// Valid bodies that a parse-and-reserialize would alter, as the caller wrote them (some with
/// whitespace and newlines between tokens).
fn corpus() -> Vec<String> {
    let mut v: Vec<String> = [
        // 17 significant digits; Longitude before Desc.
        r#"[{"MsgType":"TIMLocationElem","MsgContent":{"Longitude":113.93314287066459,"Desc":"Shenzhen","Latitude":23.114068987788478}}]"#,
        // -0, 1E+1.
        r#"[{"MsgType":"TIMLocationElem","MsgContent":{"Desc":"zero","Latitude":-0,"Longitude":1E+1}}]"#,
        // 1e-7 and a 34-digit decimal.
        r#"[{"MsgType":"TIMLocationElem","MsgContent":{"Desc":"tiny","Latitude":1e-7,"Longitude":1.234567890123456789012345678901234}}]"#,
        // Integers above 2^53 and at u64::MAX.
        r#"[{"MsgType":"TIMFaceElem","MsgContent":{"Index":9007199254740993,"Data":"big"}}]"#,
        r#"[{"MsgType":"TIMFaceElem","MsgContent":{"Index":18446744073709551615}}]"#,
        // Escapes kept as written: \u00e9, \/, a surrogate pair, and raw emoji.
        r#"[{"MsgType":"TIMTextElem","MsgContent":{"Text":"caf\u00e9 a\/b \ud83d\ude00 raw 😀 \"q\" \\ \t tab"}}]"#,
        // MsgContent before MsgType; the text "null".
        r#"[{"MsgContent":{"Text":"null"},"MsgType":"TIMTextElem"}]"#,
        // JSON text inside Data, with escaped quotes and spaces inside strings.
        r#"[{"MsgType":"TIMCustomElem","MsgContent":{"Data":"{\"k\": [1, 2.50, {\"n\": null}], \"s\": \"\\u00e9\"}","Desc":"d","Ext":"e","Sound":"s"}}]"#,
        // Whitespace between tokens.
        "[ {\"MsgType\" : \"TIMTextElem\" ,\t\"MsgContent\" : { \"Text\" : \"  spaced  \" } } ]",
        // Several elements, newlines between tokens, unusual key order.
        r#"[
  {"MsgType": "TIMTextElem", "MsgContent": {"Text": "first\nline"}},
  {"MsgContent": {"Data": "smile", "Index": 1}, "MsgType": "TIMFaceElem"},
  {"MsgType": "TIMLocationElem",
   "MsgContent": {"Longitude": -0.0, "Desc": "here", "Latitude": 23.114068987788478}},
  {"MsgType": "TIMCustomElem", "MsgContent": {"Data": "[\"a\", {\"b\": null}]"}}
]"#,
        "[\r\n{\"MsgType\":\"TIMTextElem\",\r\n\"MsgContent\":{\"Text\":\"crlf\"}}\r\n]",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    // Exactly the limit once minified, larger as written.
    v.push(body_of_minified_size(MAX_BODY_BYTES));
    v
}

/// A Text body with whitespace between tokens whose minified form is exactly `n` bytes.
fn body_of_minified_size(n: usize) -> String {
    let shell = |pad: &str| {
        format!(
            "[ {{ \"MsgType\" : \"TIMTextElem\" , \"MsgContent\" : {{ \"Text\" : \"{pad}\" }} }} ]"
        )
    };
    let empty = minify(&shell("")).len();
    let body = shell(&"x".repeat(n - empty));
    assert_eq!(minify(&body).len(), n);
    assert!(body.len() > n);
    body
}

/// What must arrive: the caller's text minified.
fn expected(bodies: &[String]) -> Vec<String> {
    bodies.iter().map(|b| minify(b).into_owned()).collect()
}

/// One line for NDJSON (no newlines between tokens outside strings; none inside either).
fn one_line(body: &str) -> String {
    body.replace(['\r', '\n'], " ")
}

#[test]
fn the_corpus_is_valid_and_would_be_altered_by_a_reserialization() {
    let mut altered = 0;
    for b in corpus() {
        let v: Value = serde_json::from_str(&b).unwrap();
        let q =
            timport::intake::validate::msg_body(Some(&b)).unwrap_or_else(|e| panic!("{b}: {e:?}"));
        assert_eq!(q, minify(&b));
        if serde_json::to_string(&v).unwrap() != q {
            altered += 1;
        }
    }
    assert!(
        altered >= 8,
        "the corpus tests faithfulness: {altered} altered"
    );
}

async fn run_engine(env: &Env, sim: &timport::simulator::SimHandle, want: i64) {
    let exit = run_until_idle(&env.store, client_for(sim, 200), engine_config())
        .await
        .unwrap();
    let EngineExit::Idle(t) = exit else {
        panic!("{exit:?}")
    };
    assert_eq!((t.imported, t.blocked), (want, 0), "{t:?}");
}

/// The bytes the simulator received for `group`, in SendTime order, equal `want`.
fn assert_arrived(sim: &timport::simulator::SimHandle, group: &str, want: &[String]) {
    let state = sim.state();
    let g = state
        .group(group)
        .unwrap_or_else(|| panic!("group {group} missing"));
    let mut msgs: Vec<_> = g.messages.iter().collect();
    msgs.sort_by_key(|m| m.send_time);
    let got: Vec<&str> = msgs.iter().map(|m| m.msg_body_bytes.as_str()).collect();
    assert_eq!(got.len(), want.len(), "{group}: message count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g, w, "{group}: message {i} arrived altered");
    }
}

async fn sim_auto() -> timport::simulator::SimHandle {
    let mut cfg = sim_config();
    cfg.auto_create_groups = true;
    start_sim(cfg).await
}

fn accepted(out: &FileOutcome, n: i64) {
    assert!(
        matches!(out, FileOutcome::Accepted { messages, .. } if *messages == n),
        "{out:?}"
    );
}

db_test!(ndjson_bodies_arrive_as_written_minified);
async fn ndjson_bodies_arrive_as_written_minified(backend: Backend) {
    let env = Env::on(backend).await;
    let sim = sim_auto().await;
    let bodies = corpus();
    let mut text = String::new();
    for (i, b) in bodies.iter().enumerate() {
        let t = T0 + i as i64;
        // Half the lines put MsgBody first.
        if i % 2 == 0 {
            text += &format!(
                "{{\"GroupId\":\"nd\",\"From_Account\":\"a\",\"SendTime\":{t},\"MsgBody\":{}}}\n",
                one_line(b)
            );
        } else {
            text += &format!(
                "{{ \"MsgBody\" : {} , \"SendTime\": {t}, \"From_Account\": \"a\", \"GroupId\": \"nd\" }}\n",
                one_line(b)
            );
        }
    }
    accepted(&queue(&env, "c.ndjson", &text).await, bodies.len() as i64);
    run_engine(&env, &sim, bodies.len() as i64).await;
    assert_arrived(&sim, "nd", &expected(&bodies));
    sim.shutdown().await;
}

fn msg_list(bodies: &[String], t0: i64) -> String {
    bodies
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "\n  {{\"From_Account\": \"a\",\n   \"SendTime\": {},\n   \"MsgBody\": {b}}}",
                t0 + i as i64
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

db_test!(json_request_body_bodies_arrive_as_written_minified);
async fn json_request_body_bodies_arrive_as_written_minified(backend: Backend) {
    let env = Env::on(backend).await;
    let sim = sim_auto().await;
    let bodies = corpus();
    let text = format!(
        "{{\n \"GroupId\": \"js\",\n \"MsgList\": [{}\n ]\n}}\n",
        msg_list(&bodies, T0)
    );
    accepted(&queue(&env, "c.json", &text).await, bodies.len() as i64);
    run_engine(&env, &sim, bodies.len() as i64).await;
    assert_arrived(&sim, "js", &expected(&bodies));
    sim.shutdown().await;
}

db_test!(json_array_of_bodies_arrive_as_written_minified);
async fn json_array_of_bodies_arrive_as_written_minified(backend: Backend) {
    let env = Env::on(backend).await;
    let sim = sim_auto().await;
    let bodies = corpus();
    let (a, b) = bodies.split_at(bodies.len() / 2);
    let text = format!(
        "[\n {{\"MsgList\": [{}],\n  \"GroupId\": \"arr1\"}},\n {{\"GroupId\": \"arr2\", \"MsgList\": [{}]}}\n]\n",
        msg_list(a, T0),
        msg_list(b, T0)
    );
    accepted(&queue(&env, "arr.json", &text).await, bodies.len() as i64);
    run_engine(&env, &sim, bodies.len() as i64).await;
    assert_arrived(&sim, "arr1", &expected(a));
    assert_arrived(&sim, "arr2", &expected(b));
    sim.shutdown().await;
}

/// Inserts intake rows over a connection of its own, as another program would.
async fn insert_rows(env: &Env, rows: &[(&str, i64, &str)]) {
    if env.backend() == Backend::Postgres {
        let mut c = sqlx::PgConnection::connect(&env.db()).await.unwrap();
        for (group, t, body) in rows {
            sqlx::query(
                "INSERT INTO intake(group_id, from_account, send_time, msg_body) VALUES ($1, 'a', $2, $3)",
            )
            .bind(*group)
            .bind(*t)
            .bind(*body)
            .execute(&mut c)
            .await
            .unwrap();
        }
        c.close().await.unwrap();
        return;
    }
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(env.db_path());
    let mut c = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
    for (group, t, body) in rows {
        sqlx::query(
            "INSERT INTO intake(group_id, from_account, send_time, msg_body) VALUES (?, 'a', ?, ?)",
        )
        .bind(*group)
        .bind(*t)
        .bind(*body)
        .execute(&mut c)
        .await
        .unwrap();
    }
    c.close().await.unwrap();
}

db_test!(intake_row_bodies_arrive_as_written_minified);
async fn intake_row_bodies_arrive_as_written_minified(backend: Backend) {
    let env = Env::on(backend).await;
    let sim = sim_auto().await;
    let bodies = corpus();
    let rows: Vec<(&str, i64, &str)> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| ("rows", T0 + i as i64, b.as_str()))
        .collect();
    insert_rows(&env, &rows).await;
    let out = table::poll_once(&env.store).await.unwrap();
    assert_eq!(
        (out.queued, out.rejected),
        (bodies.len() as u64, 0),
        "{out:?}"
    );
    run_engine(&env, &sim, bodies.len() as i64).await;
    assert_arrived(&sim, "rows", &expected(&bodies));
    sim.shutdown().await;
}

db_test!(whole_group_job_bodies_arrive_as_written_minified);
async fn whole_group_job_bodies_arrive_as_written_minified(backend: Backend) {
    let env = Env::on(backend).await;
    // The job creates the group: no auto-creation.
    let sim = start_sim(sim_config()).await;
    let bodies = corpus();
    let text = format!(
        "{{\"GroupId\": \"whole\",\n \"Group\": {{\"Type\": \"Public\", \"Name\": \"Bodies\", \"Owner_Account\": \"a\", \"CreateTime\": {}}},\n \"Members\": [{{\"Member_Account\": \"a\"}}, {{\"Member_Account\": \"b\"}}],\n \"MsgList\": [{}]\n}}",
        T0 - 100,
        msg_list(&bodies, T0)
    );
    accepted(&queue(&env, "whole.json", &text).await, bodies.len() as i64);
    run_engine(&env, &sim, bodies.len() as i64).await;
    assert_arrived(&sim, "whole", &expected(&bodies));
    assert_eq!(sim.state().group("whole").unwrap().create_time, T0 - 100);
    sim.shutdown().await;
}

const GOOD: &str = r#"[{"MsgType":"TIMTextElem","MsgContent":{"Text":"fine"}}]"#;

/// Bodies that cannot be carried unaltered, with what the reason must say.
fn unfaithful() -> Vec<(String, &'static str)> {
    let loc = |lat: &str| {
        format!(
            r#"[{{"MsgType":"TIMLocationElem","MsgContent":{{"Desc":"d","Latitude":{lat},"Longitude":1}}}}]"#
        )
    };
    let text = |content: &str| format!(r#"[{{"MsgType":"TIMTextElem","MsgContent":{content}}}]"#);
    vec![
        (loc("1e400"), "64-bit float"),
        (text(r#"{"Text":"x","Big":1e400}"#), "64-bit float"),
        (text(r#"{"Text":"\ud800"}"#), "lone surrogate"),
        (text(r#"{"Text":"x","Odd":"\ud800"}"#), "lone surrogate"),
        (text(r#"{"Text":"a","Text":"b"}"#), "twice"),
        (
            r#"[{"MsgType":"TIMTextElem","MsgType":"TIMTextElem","MsgContent":{"Text":"a"}}]"#
                .to_string(),
            "twice",
        ),
        (text(r#"{"Text":"x","Extra":1}"#), "unknown field"),
        (body_of_minified_size(MAX_BODY_BYTES + 1), "bytes"),
    ]
}

async fn queued_count(env: &Env) -> i64 {
    db_scalar(&env.store, "SELECT count(*) FROM messages").await
}

fn assert_rejected_at(out: &FileOutcome, line: u64, want: &str, case: &str) {
    let FileOutcome::Rejected { problems, .. } = out else {
        panic!("{case}: not rejected: {out:?}")
    };
    let hit: Vec<&Problem> = problems
        .iter()
        .filter(|p| p.line == line && p.problem.contains(want))
        .collect();
    assert!(
        !hit.is_empty(),
        "{case}: want a problem at line {line} saying {want:?}: {problems:?}"
    );
}

db_test!(unfaithful_bodies_reject_the_ndjson_file_whole);
async fn unfaithful_bodies_reject_the_ndjson_file_whole(backend: Backend) {
    let env = Env::on(backend).await;
    for (i, (bad, want)) in unfaithful().into_iter().enumerate() {
        let text = format!(
            "{}\n{{\"GroupId\":\"g\",\"From_Account\":\"a\",\"SendTime\":{},\"MsgBody\":{bad}}}\n{}\n",
            format_args!(
                "{{\"GroupId\":\"g\",\"From_Account\":\"a\",\"SendTime\":{T0},\"MsgBody\":{GOOD}}}"
            ),
            T0 + 1,
            format_args!(
                "{{\"GroupId\":\"g\",\"From_Account\":\"a\",\"SendTime\":{},\"MsgBody\":{GOOD}}}",
                T0 + 2
            ),
        );
        let out = queue(&env, &format!("bad{i}.ndjson"), &text).await;
        assert_rejected_at(&out, 2, want, &format!("ndjson case {i} ({want})"));
        assert_eq!(queued_count(&env).await, 0, "case {i}: nothing queued");
    }
}

db_test!(unfaithful_bodies_reject_the_json_file_whole);
async fn unfaithful_bodies_reject_the_json_file_whole(backend: Backend) {
    let env = Env::on(backend).await;
    for (i, (bad, want)) in unfaithful().into_iter().enumerate() {
        // The bad message starts on line 4.
        let text = format!(
            "{{\"GroupId\": \"g\",\n \"MsgList\": [\n  {{\"From_Account\": \"a\", \"SendTime\": {T0}, \"MsgBody\": {GOOD}}},\n  {{\"From_Account\": \"a\", \"SendTime\": {}, \"MsgBody\": {bad}}}\n ]\n}}\n",
            T0 + 1
        );
        let out = queue(&env, &format!("bad{i}.json"), &text).await;
        assert_rejected_at(&out, 4, want, &format!("json case {i} ({want})"));
        assert_eq!(queued_count(&env).await, 0, "case {i}: nothing queued");
    }
}

db_test!(unfaithful_bodies_reject_their_intake_rows);
async fn unfaithful_bodies_reject_their_intake_rows(backend: Backend) {
    let env = Env::on(backend).await;
    let cases = unfaithful();
    let mut rows: Vec<(&str, i64, &str)> = vec![("g", T0, GOOD)];
    rows.extend(
        cases
            .iter()
            .enumerate()
            .map(|(i, (bad, _))| ("g", T0 + 1 + i as i64, bad.as_str())),
    );
    insert_rows(&env, &rows).await;
    let out = table::poll_once(&env.store).await.unwrap();
    assert_eq!(
        (out.queued, out.rejected),
        (1, cases.len() as u64),
        "{out:?}"
    );
    let got: Vec<(String, Option<String>)> =
        db_rows(&env.store, "SELECT status, error FROM intake ORDER BY id").await;
    assert_eq!(got[0], ("queued".to_string(), None));
    for ((status, error), (_, want)) in got[1..].iter().zip(&cases) {
        assert_eq!(status, "rejected");
        let error = error.as_deref().unwrap_or_default();
        assert!(error.contains(want), "want {want:?}: {error}");
    }
    assert_eq!(queued_count(&env).await, 1);
}
