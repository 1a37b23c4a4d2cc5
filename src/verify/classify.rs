//! The classes of one page range: our imported messages against what the server holds at their
//! MsgSeqs. Pure functions (no I/O): nothing to stop or recover.
//!
//! A message of ours is *verified* when the server's message at its MsgSeq has its sender, its
//! SendTime actually sent (MsgTimeStamp) and its Random, and the same body as JSON values;
//! *altered* when those match but the body differs (or it was recalled); *unverifiable* when the
//! server shows a hole there (IsPlaceMsg 1) or says the history below has expired (IsFinished 2);
//! *missing* otherwise (nothing there, or another message). Server messages the range holds that
//! are none of ours are returned as strangers, for the caller to tell *duplicated* (equal to one
//! of ours) from *foreign*.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::store::{VerifyOurs, VerifyRow};
use crate::tencent::{RspMsg, body};

/// The classes of `ours` (all in the range read) given the server's messages of that range,
/// and the server's messages that are none of ours (holes excluded). `expired_below`: MsgSeqs
/// below it that the server did not return are expired, not missing.
pub fn classify<'a>(
    ours: &[VerifyOurs],
    server: &'a [RspMsg],
    expired_below: Option<i64>,
) -> (Vec<VerifyRow>, Vec<&'a RspMsg>) {
    let mut at: HashMap<i64, usize> = HashMap::with_capacity(server.len());
    for (i, m) in server.iter().enumerate() {
        at.entry(seq_of(m)).or_insert(i);
    }
    let mut paired = vec![false; server.len()];
    let mut rows = Vec::with_capacity(ours.len());
    for o in ours {
        let row = |kind, found: Option<Value>| VerifyRow {
            message_id: Some(o.id),
            msg_seq: o.msg_seq,
            kind,
            expected: (kind != "verified").then(|| expected(o).to_string()),
            found: found.map(|f| f.to_string()),
        };
        let Some(&i) = at.get(&o.msg_seq) else {
            if expired_below.is_some_and(|e| o.msg_seq < e) {
                rows.push(row(
                    "unverifiable",
                    Some(json!({"note": "the server says the history here has expired (IsFinished 2)"})),
                ));
            } else {
                rows.push(row("missing", None));
            }
            continue;
        };
        let m = &server[i];
        if m.is_place_msg == 1 {
            paired[i] = true;
            rows.push(row("unverifiable", Some(found(m))));
            continue;
        }
        let same = !paired[i]
            && m.from_account == o.from_account
            && m.msg_time_stamp == o.time
            && m.random_u32() == Some(o.random);
        if !same {
            rows.push(row("missing", Some(found(m))));
            continue;
        }
        paired[i] = true;
        let equal = m.is_place_msg == 0 && same_body(o, &body::canonical(&m.msg_body));
        rows.push(if equal {
            row("verified", None)
        } else {
            row("altered", Some(found(m)))
        });
    }
    let strangers = server
        .iter()
        .zip(&paired)
        .filter(|(m, p)| !**p && m.is_place_msg != 1)
        .map(|(m, _)| m)
        .collect();
    (rows, strangers)
}

/// Whether our message's body equals a server body given as its canonical text: by the body
/// itself, or, once `queue.keep_bodies` dropped it, by the digest kept.
pub fn same_body(o: &VerifyOurs, server_canonical: &str) -> bool {
    if !o.body.is_empty() {
        return body::canonical_text(&o.body).is_some_and(|b| b == server_canonical);
    }
    o.body_sha256
        .as_deref()
        .is_some_and(|h| h == body::digest(server_canonical))
}

/// A server message's MsgSeq as stored.
pub fn seq_of(m: &RspMsg) -> i64 {
    i64::try_from(m.msg_seq).unwrap_or(i64::MAX)
}

/// Our message as `expected` shows it.
pub fn expected(o: &VerifyOurs) -> Value {
    let mut v = json!({
        "MsgSeq": o.msg_seq,
        "From_Account": o.from_account,
        "MsgTimeStamp": o.time,
        "MsgRandom": o.random,
        "MsgBody": serde_json::from_str::<Value>(&o.body).unwrap_or(Value::Null),
    });
    if o.body.is_empty() {
        // Dropped by queue.keep_bodies: its digest stands for it.
        v["MsgBodySha256"] = json!(o.body_sha256);
    }
    v
}

/// A server message as `found` shows it.
pub fn found(m: &RspMsg) -> Value {
    let mut v = json!({
        "MsgSeq": m.msg_seq,
        "From_Account": m.from_account,
        "MsgTimeStamp": m.msg_time_stamp,
        "MsgRandom": m.random_u32(),
        "MsgBody": m.msg_body,
    });
    match m.is_place_msg {
        1 => v["note"] = json!("a hole (IsPlaceMsg 1): expired, failed or deleted"),
        2 => v["note"] = json!("recalled (IsPlaceMsg 2)"),
        _ => {}
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(id: i64, seq: i64, text: &str) -> VerifyOurs {
        VerifyOurs {
            id,
            msg_seq: seq,
            from_account: "alice".into(),
            time: 1000 + seq,
            random: 7 + seq as u32,
            body: format!(r#"[{{"MsgType":"TIMTextElem","MsgContent":{{"Text":"{text}"}}}}]"#),
            body_sha256: None,
        }
    }

    fn server(seq: u64, text: &str, place: i64) -> RspMsg {
        RspMsg {
            from_account: if place == 1 {
                String::new()
            } else {
                "alice".into()
            },
            is_place_msg: place,
            is_system_msg: None,
            msg_priority: None,
            msg_random: if place == 1 { 0 } else { 7 + seq as i64 },
            msg_seq: seq,
            msg_time_stamp: 1000 + seq as i64,
            // Re-formatted: keys in another order.
            msg_body: serde_json::json!([{"MsgContent": {"Text": text}, "MsgType": "TIMTextElem"}]),
        }
    }

    #[test]
    fn each_message_gets_one_class_and_strangers_are_returned() {
        let o = vec![
            ours(1, 1, "a"),
            ours(2, 2, "b"),
            ours(3, 3, "c"),
            ours(4, 4, "d"),
            ours(5, 5, "e"),
        ];
        let mut other = server(4, "zzz", 0);
        other.from_account = "mallory".into();
        let s = vec![
            server(6, "a", 0),
            server(5, "e", 1),
            other,
            server(2, "B", 0),
            server(1, "a", 0),
        ];
        let (rows, strangers) = classify(&o, &s, None);
        let kinds: Vec<&str> = rows.iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            ["verified", "altered", "missing", "missing", "unverifiable"]
        );
        assert!(rows[0].expected.is_none() && rows[1].found.is_some());
        let seqs: Vec<u64> = strangers.iter().map(|m| m.msg_seq).collect();
        assert_eq!(seqs, [6, 4]);
        let (rows, _) = classify(&o[2..3], &[], Some(10));
        assert_eq!(rows[0].kind, "unverifiable");
        // A dropped body is compared by its digest.
        let mut dropped = ours(1, 1, "a");
        let canonical = body::canonical_text(&dropped.body).unwrap();
        dropped.body = String::new();
        dropped.body_sha256 = Some(body::digest(&canonical));
        let (rows, _) = classify(&[dropped.clone()], &s[4..], None);
        assert_eq!(rows[0].kind, "verified");
        let (rows, _) = classify(&[dropped], &[server(1, "A", 0)], None);
        assert_eq!(rows[0].kind, "altered");
    }
}
