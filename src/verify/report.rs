//! What `timport verify` prints: a table per group with its counts and first problems, then the
//! totals; or, with `--json`, one object. Built from what the store recorded, so a resumed
//! verify reports the same as one that ran through. Read-only: nothing to stop or recover.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::store::{Store, StoreError, VerifyCounts};

/// Problems listed in the JSON report at most (the counts are always whole).
pub const MAX_PROBLEMS: i64 = 100_000;
/// Problems shown per group in the table.
const TABLE_PROBLEMS: usize = 5;

/// The six classes, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub verified: i64,
    pub missing: i64,
    pub altered: i64,
    pub duplicated: i64,
    pub unverifiable: i64,
    pub foreign: i64,
}

impl Totals {
    /// Whether anything is missing, altered or duplicated (exit code 1).
    pub fn failed(&self) -> bool {
        self.missing + self.altered + self.duplicated > 0
    }
}

/// One problem: a message of ours not verified, or a server message not ours.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    pub group: String,
    pub topic: String,
    pub msg_seq: i64,
    pub kind: String,
    /// Our message (MsgSeq, From_Account, MsgTimeStamp, MsgRandom, MsgBody), or null.
    pub expected: Value,
    /// The server's message there, or null when there is none.
    pub found: Value,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub database: String,
    /// Every lane in scope read to its end.
    pub complete: bool,
    pub totals: Totals,
    pub groups: Vec<VerifyCounts>,
    pub problems: Vec<Problem>,
    /// Problems left out of `problems` (beyond [`MAX_PROBLEMS`]).
    pub problems_not_listed: i64,
    /// Lanes in scope whose import is not finished (pending or in flight) or that were imported
    /// into since their pass began: only what was imported then was verified.
    pub lanes_still_importing: Vec<String>,
}

/// Builds the report of the scope from the store.
pub async fn build(
    store: &Store,
    group: Option<&str>,
    job: Option<i64>,
) -> Result<Report, StoreError> {
    let groups = store.verify_counts(group, job).await?;
    let mut totals = Totals::default();
    for g in &groups {
        totals.verified += g.verified;
        totals.missing += g.missing;
        totals.altered += g.altered;
        totals.duplicated += g.duplicated;
        totals.unverifiable += g.unverifiable;
        totals.foreign += g.foreign;
    }
    let problems: Vec<Problem> = store
        .verify_problems(group, job, MAX_PROBLEMS)
        .await?
        .into_iter()
        .map(|p| Problem {
            group: p.group,
            topic: p.topic,
            msg_seq: p.msg_seq,
            kind: p.kind,
            expected: json_or_null(p.expected.as_deref()),
            found: json_or_null(p.found.as_deref()),
        })
        .collect();
    let all =
        totals.missing + totals.altered + totals.duplicated + totals.unverifiable + totals.foreign;
    let scope = store.verify_scope(group, job).await?;
    // Imported into since its pass began: listed under lanes_still_importing, read again next
    // time; what was imported when the pass began is proven.
    let complete = scope
        .iter()
        .all(|l| l.pass.as_ref().is_some_and(|p| p.done));
    Ok(Report {
        database: store.database(),
        complete,
        totals,
        problems_not_listed: all - problems.len() as i64,
        problems,
        lanes_still_importing: scope
            .iter()
            .filter(|l| {
                l.unfinished > 0 || l.pass.as_ref().is_some_and(|p| p.imported != l.imported)
            })
            .map(|l| lane_name(&l.group_id, &l.topic_id))
            .collect(),
        groups,
    })
}

fn json_or_null(text: Option<&str>) -> Value {
    text.and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or(Value::Null)
}

fn lane_name(group: &str, topic: &str) -> String {
    if topic.is_empty() {
        group.to_owned()
    } else {
        format!("{group}/{topic}")
    }
}

/// The header of a table of per-lane counts, `first` naming its first column (also used by
/// `timport status`).
pub fn counts_header(first: &str) -> String {
    format!(
        "{first:<32} {:>9} {:>8} {:>8} {:>10} {:>12} {:>8}",
        "verified", "missing", "altered", "duplicated", "unverifiable", "foreign"
    )
}

/// One lane's row under [`counts_header`]; `unfinished` is appended while its pass is not done.
pub fn counts_row(g: &VerifyCounts, unfinished: &str) -> String {
    format!(
        "{:<32} {:>9} {:>8} {:>8} {:>10} {:>12} {:>8}{}",
        lane_name(&g.group, &g.topic),
        g.verified,
        g.missing,
        g.altered,
        g.duplicated,
        g.unverifiable,
        g.foreign,
        if g.done { "" } else { unfinished }
    )
}

/// The report as tables for people.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "database   {}", r.database);
    let _ = writeln!(s, "\n{}", counts_header("group"));
    for g in &r.groups {
        let _ = writeln!(s, "{}", counts_row(g, "  (not finished)"));
        let mine: Vec<&Problem> = r
            .problems
            .iter()
            .filter(|p| p.group == g.group && p.topic == g.topic)
            .collect();
        for p in mine.iter().take(TABLE_PROBLEMS) {
            let _ = writeln!(
                s,
                "    MsgSeq {:<8} {:<12} {}",
                p.msg_seq,
                p.kind,
                explain(p)
            );
        }
        if mine.len() > TABLE_PROBLEMS {
            let _ = writeln!(
                s,
                "    … and {} more (--json lists them all)",
                mine.len() - TABLE_PROBLEMS
            );
        }
    }
    let t = &r.totals;
    let _ = writeln!(
        s,
        "\ntotal      {} verified, {} missing, {} altered, {} duplicated, {} unverifiable, {} foreign",
        t.verified, t.missing, t.altered, t.duplicated, t.unverifiable, t.foreign
    );
    if !r.lanes_still_importing.is_empty() {
        let _ = writeln!(
            s,
            "note       {} lane(s) still importing (only what was imported when verify began is verified; run it again later): {}",
            r.lanes_still_importing.len(),
            r.lanes_still_importing
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let verdict = if !r.complete {
        "NOT FINISHED: run `timport verify` again to resume"
    } else if t.failed() {
        "FAILED: messages are missing, altered or duplicated (see docs/OPERATIONS.md, Verify)"
    } else {
        "OK: every imported message is on the server once, unaltered (unverifiable ones aside)"
    };
    let _ = writeln!(s, "result     {verdict}");
    s
}

/// One line about a problem.
fn explain(p: &Problem) -> String {
    let who = |v: &Value| {
        format!(
            "{} at {} (Random {})",
            v["From_Account"].as_str().unwrap_or("?"),
            v["MsgTimeStamp"],
            v["MsgRandom"]
        )
    };
    match p.kind.as_str() {
        "missing" if p.found.is_null() => format!("no message there; ours: {}", who(&p.expected)),
        "missing" => format!(
            "another message there: {}; ours: {}",
            who(&p.found),
            who(&p.expected)
        ),
        "altered" => format!(
            "body differs: ours {} found {}",
            p.expected["MsgBody"], p.found["MsgBody"]
        ),
        "unverifiable" => "the server shows a hole or expired history there".to_owned(),
        "duplicated" => format!(
            "a second copy of ours at MsgSeq {}: {}",
            p.expected["MsgSeq"],
            who(&p.found)
        ),
        _ => format!("not ours: {}", who(&p.found)),
    }
}
