//! The validation rules of PRODUCT.md "Input", shared by job files and the intake table.
//!
//! Each field is taken raw and parsed on its own, so that every problem names its field. Pure
//! functions, no I/O: nothing to stop or recover.

use serde_json::Value;
use serde_json::value::RawValue;

use crate::store::NewMessage;

/// Largest MsgBody, as compact JSON in UTF-8 bytes (Tencent: 12K bytes, result 80002).
pub const MAX_BODY_BYTES: usize = 12_000;

/// The element types import_group_msg accepts.
pub const ELEMENT_TYPES: [&str; 4] = [
    "TIMTextElem",
    "TIMFaceElem",
    "TIMLocationElem",
    "TIMCustomElem",
];

/// The raw fields of one message (an NDJSON line, or a MsgList entry of a .json body).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMessage<'a> {
    #[serde(rename = "GroupId", borrow, default)]
    pub group_id: Option<&'a RawValue>,
    #[serde(rename = "TopicId", borrow, default)]
    pub topic_id: Option<&'a RawValue>,
    #[serde(rename = "RecentContactFlag", borrow, default)]
    pub recent_contact_flag: Option<&'a RawValue>,
    #[serde(rename = "From_Account", borrow, default)]
    pub from_account: Option<&'a RawValue>,
    #[serde(rename = "SendTime", borrow, default)]
    pub send_time: Option<&'a RawValue>,
    #[serde(rename = "Random", borrow, default)]
    pub random: Option<&'a RawValue>,
    #[serde(rename = "MsgBody", borrow, default)]
    pub msg_body: Option<&'a RawValue>,
}

/// Group-level fields inherited from a .json body.
#[derive(Debug, Default, Clone)]
pub struct Inherited {
    pub group_id: Option<String>,
    pub topic_id: Option<String>,
    pub recent_contact: bool,
}

/// Parses a raw JSON fragment into a value; `None` for JSON null.
fn value(raw: Option<&RawValue>) -> Result<Option<Value>, String> {
    match raw {
        None => Ok(None),
        Some(r) => match serde_json::from_str::<Value>(r.get()) {
            Ok(Value::Null) => Ok(None),
            Ok(v) => Ok(Some(v)),
            Err(e) => Err(e.to_string()),
        },
    }
}

/// A required non-empty string.
pub fn non_empty_string(name: &str, v: Option<&Value>) -> Result<String, String> {
    match v {
        None => Err(format!("{name} is missing")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(format!("{name} is empty")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("{name} must be a string, got {}", type_name(other))),
    }
}

/// An optional non-empty string.
pub fn optional_string(name: &str, v: Option<&Value>) -> Result<Option<String>, String> {
    match v {
        None => Ok(None),
        some => non_empty_string(name, some).map(Some),
    }
}

/// RecentContactFlag: 0 or 1.
pub fn recent_contact(v: Option<&Value>) -> Result<bool, String> {
    match v {
        None => Ok(false),
        Some(Value::Number(n)) if n.as_i64() == Some(0) => Ok(false),
        Some(Value::Number(n)) if n.as_i64() == Some(1) => Ok(true),
        Some(other) => Err(format!("RecentContactFlag must be 0 or 1, got {other}")),
    }
}

/// SendTime: an integer number of Unix seconds, above 0 and before `now`.
pub fn send_time(v: Option<&Value>, now: i64) -> Result<i64, String> {
    match v {
        None => Err("SendTime is missing".into()),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(t) if t <= 0 => Err(format!("SendTime {t} must be above 0")),
            Some(t) if t >= now => Err(format!(
                "SendTime {t} is not in the past (now is {now}); Tencent refuses future messages"
            )),
            Some(t) => Ok(t),
            None => Err(format!(
                "SendTime must be an integer (Unix seconds), got {n}"
            )),
        },
        Some(other) => Err(format!(
            "SendTime must be an integer (Unix seconds), got {}",
            type_name(other)
        )),
    }
}

/// Random: optional, an integer within u32.
pub fn random(v: Option<&Value>) -> Result<Option<u32>, String> {
    match v {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_u64().and_then(|r| u32::try_from(r).ok()) {
            Some(r) => Ok(Some(r)),
            None => Err(format!("Random {n} is outside 0..=4294967295 (a u32)")),
        },
        Some(other) => Err(format!(
            "Random must be an integer within 0..=4294967295, got {}",
            type_name(other)
        )),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The MsgContent fields each element type may carry (D-FMT); any other key is refused, so
/// nothing is sent that Tencent's docs do not name.
fn content_fields(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "TIMTextElem" => &["Text"],
        "TIMFaceElem" => &["Index", "Data"],
        "TIMLocationElem" => &["Desc", "Latitude", "Longitude"],
        "TIMCustomElem" => &["Data", "Desc", "Ext", "Sound"],
        _ => return None,
    })
}

/// MsgBody: a non-empty array of the four element types with their documented fields (and no
/// others), at most one TIMCustomElem, text that can be carried unaltered (see [`strict_value`]),
/// at most [`MAX_BODY_BYTES`] as sent. `text` is the body as the caller wrote it; the result is
/// that text minified ([`minify`]: whitespace outside strings removed, nothing else changed),
/// which is exactly what is sent.
pub fn msg_body(text: Option<&str>) -> Result<String, Vec<String>> {
    let Some(text) = text else {
        return Err(vec!["MsgBody is missing".into()]);
    };
    let v = strict_value(text).map_err(|e| vec![format!("MsgBody {e}")])?;
    let Value::Array(elems) = &v else {
        return Err(vec![format!(
            "MsgBody must be an array, got {}",
            type_name(&v)
        )]);
    };
    if elems.is_empty() {
        return Err(vec!["MsgBody is empty".into()]);
    }
    let mut problems = Vec::new();
    let mut customs = 0;
    for (i, e) in elems.iter().enumerate() {
        let Value::Object(obj) = e else {
            problems.push(format!("MsgBody[{i}] must be an object"));
            continue;
        };
        let kind = match obj.get("MsgType") {
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                problems.push(format!("MsgBody[{i}].MsgType must be a string"));
                continue;
            }
            None => {
                problems.push(format!("MsgBody[{i}].MsgType is missing"));
                continue;
            }
        };
        if let Some(extra) = obj.keys().find(|k| *k != "MsgType" && *k != "MsgContent") {
            problems.push(format!("MsgBody[{i}] has an unknown field {extra:?}"));
        }
        let content = match obj.get("MsgContent") {
            Some(Value::Object(c)) => c,
            Some(_) => {
                problems.push(format!("MsgBody[{i}].MsgContent must be an object"));
                continue;
            }
            None => {
                problems.push(format!("MsgBody[{i}].MsgContent is missing"));
                continue;
            }
        };
        let Some(allowed) = content_fields(kind) else {
            problems.push(format!(
                "MsgBody[{i}].MsgType {kind:?} is not importable into a group; one of {}",
                ELEMENT_TYPES.join(", ")
            ));
            continue;
        };
        for k in content.keys() {
            if !allowed.contains(&k.as_str()) {
                problems.push(format!(
                    "MsgBody[{i}] ({kind}).MsgContent has an unknown field {k:?}; {kind} takes {}",
                    allowed.join(", ")
                ));
            }
        }
        let mut need =
            |field: &str, want: fn(&Value) -> bool, what: &str, required: bool| match content
                .get(field)
            {
                None if required => problems.push(format!(
                    "MsgBody[{i}] ({kind}).MsgContent.{field} is missing"
                )),
                Some(v) if !want(v) => problems.push(format!(
                    "MsgBody[{i}] ({kind}).MsgContent.{field} must be {what}"
                )),
                _ => {}
            };
        match kind {
            "TIMTextElem" => need("Text", Value::is_string, "a string", true),
            "TIMFaceElem" => {
                need("Index", is_integer, "an integer", true);
                need("Data", Value::is_string, "a string", false);
            }
            "TIMLocationElem" => {
                need("Desc", Value::is_string, "a string", true);
                need("Latitude", Value::is_number, "a number", true);
                need("Longitude", Value::is_number, "a number", true);
            }
            _ => {
                customs += 1;
                need("Data", Value::is_string, "a string", true);
                need("Desc", Value::is_string, "a string", false);
                need("Ext", Value::is_string, "a string", false);
                need("Sound", Value::is_string, "a string", false);
            }
        }
    }
    if customs > 1 {
        problems.push(format!(
            "MsgBody has {customs} TIMCustomElem elements; a message may hold at most one"
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let compact = minify(text.trim()).into_owned();
    if compact.len() > MAX_BODY_BYTES {
        return Err(vec![format!(
            "MsgBody is {} bytes as sent (minified); Tencent takes at most {MAX_BODY_BYTES}",
            compact.len()
        )]);
    }
    Ok(compact)
}

/// Parses JSON text for validation, refusing what could not be carried unaltered or would be
/// read differently by another parser: a key repeated in one object (at any depth; serde_json
/// would keep the last silently), a number outside the range of a 64-bit float, a `\u` escape
/// that is a lone surrogate (not a Unicode character), and anything that is not JSON. The value
/// is for checks only: the text itself is what is sent.
///
/// ```
/// use timport::intake::validate::strict_value;
/// assert!(strict_value(r#"{"a":{"b":1,"b":2}}"#).unwrap_err().contains("\"b\" twice"));
/// assert!(strict_value("[1e400]").unwrap_err().contains("64-bit float"));
/// assert!(strict_value(r#"["\ud800"]"#).unwrap_err().contains("lone surrogate"));
/// assert!(strict_value(r#"[-0, 1E+1, "\ud83d\ude00"]"#).is_ok());
/// ```
pub fn strict_value(text: &str) -> Result<Value, String> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = StrictSeed.deserialize(&mut de).and_then(|v| {
        de.end()?;
        Ok(v)
    });
    parsed.map_err(|e| {
        let msg = e.to_string();
        if msg.contains("surrogate") || msg.contains("hex escape") {
            format!(
                "has a \\u escape that is a lone surrogate, not a Unicode character ({msg}); it cannot be carried unaltered"
            )
        } else if msg.contains("number out of range") {
            format!(
                "has a number outside the range of a 64-bit float ({msg}); it cannot be carried unaltered"
            )
        } else {
            format!("is not valid JSON: {msg}")
        }
    })
}

/// Builds a [`Value`] like serde_json does, but refuses a key repeated within one object.
struct StrictSeed;

impl<'de> serde::de::DeserializeSeed<'de> for StrictSeed {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for StrictSeed {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(StrictSeed)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(serde::de::Error::custom(format!(
                    "has the key {k:?} twice in one object; which one counts is up to each reader, so it is refused"
                )));
            }
            let v = map.next_value_seed(StrictSeed)?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

fn is_integer(v: &Value) -> bool {
    v.as_i64().is_some() || v.as_u64().is_some()
}

/// The values of one message before validation, whatever their source.
#[derive(Debug, Default)]
pub struct Fields {
    pub group_id: Option<Value>,
    pub topic_id: Option<Value>,
    pub recent_contact_flag: Option<Value>,
    pub from_account: Option<Value>,
    pub send_time: Option<Value>,
    pub random: Option<Value>,
    /// The MsgBody as the caller wrote it (JSON text; `None` when absent or null): it is
    /// validated as a value and sent as this text, minified.
    pub msg_body: Option<String>,
}

impl Fields {
    /// Parses the raw fragments of a job-file message; a fragment that is not JSON is reported.
    pub fn from_raw(raw: &RawMessage<'_>) -> Result<Fields, Vec<String>> {
        let mut problems = Vec::new();
        let mut take = |name: &str, r: Option<&RawValue>| match value(r) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                None
            }
        };
        let f = Fields {
            group_id: take("GroupId", raw.group_id),
            topic_id: take("TopicId", raw.topic_id),
            recent_contact_flag: take("RecentContactFlag", raw.recent_contact_flag),
            from_account: take("From_Account", raw.from_account),
            send_time: take("SendTime", raw.send_time),
            random: take("Random", raw.random),
            msg_body: raw
                .msg_body
                .map(|r| r.get().trim())
                .filter(|t| *t != "null")
                .map(str::to_owned),
        };
        if problems.is_empty() {
            Ok(f)
        } else {
            Err(problems)
        }
    }
}

/// Validates one message. `inherited` supplies GroupId/TopicId/RecentContactFlag from a .json
/// body (a message must not repeat them there). Returns every problem found.
pub fn message(
    f: &Fields,
    inherited: Option<&Inherited>,
    now: i64,
    source_line: i64,
    source_index: i64,
) -> Result<NewMessage, Vec<String>> {
    let mut problems = Vec::new();
    let (group_id, topic_id, recent) = match inherited {
        Some(inh) => {
            for (name, v) in [
                ("GroupId", &f.group_id),
                ("TopicId", &f.topic_id),
                ("RecentContactFlag", &f.recent_contact_flag),
            ] {
                if v.is_some() {
                    problems.push(format!(
                        "{name} belongs to the request body, not to a MsgList entry"
                    ));
                }
            }
            (
                inh.group_id.clone(),
                inh.topic_id.clone(),
                inh.recent_contact,
            )
        }
        None => {
            let g = non_empty_string("GroupId", f.group_id.as_ref())
                .map_err(|e| problems.push(e))
                .ok();
            let t = optional_string("TopicId", f.topic_id.as_ref())
                .map_err(|e| problems.push(e))
                .ok()
                .flatten();
            let r = recent_contact(f.recent_contact_flag.as_ref())
                .map_err(|e| problems.push(e))
                .unwrap_or(false);
            (g, t, r)
        }
    };
    let from = non_empty_string("From_Account", f.from_account.as_ref())
        .map_err(|e| problems.push(e))
        .ok();
    let time = send_time(f.send_time.as_ref(), now)
        .map_err(|e| problems.push(e))
        .ok();
    let rnd = random(f.random.as_ref()).map_err(|e| problems.push(e)).ok();
    let body = msg_body(f.msg_body.as_deref())
        .map_err(|e| problems.extend(e))
        .ok();
    match (group_id, from, time, rnd, body) {
        (Some(group_id), Some(from_account), Some(send_time), Some(random), Some(body))
            if problems.is_empty() =>
        {
            Ok(NewMessage {
                group_id,
                topic_id: topic_id.unwrap_or_default(),
                from_account,
                send_time,
                random,
                recent_contact: recent,
                body,
                source_line,
                source_index,
            })
        }
        _ => {
            if problems.is_empty() {
                problems.push("GroupId is missing".into());
            }
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_800_000_000;

    fn fields(v: Value) -> Fields {
        let text = v.to_string();
        let raw: RawMessage<'_> = serde_json::from_str(&text).unwrap();
        Fields::from_raw(&raw).unwrap()
    }

    fn good() -> Value {
        json!({"GroupId": "g1", "From_Account": "alice", "SendTime": 1_700_000_000,
               "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hi"}}]})
    }

    #[test]
    fn a_good_message_is_accepted_and_compacted() {
        let m = message(&fields(good()), None, NOW, 3, 0).unwrap();
        assert_eq!(m.group_id, "g1");
        assert_eq!(m.topic_id, "");
        assert_eq!(m.random, None);
        assert_eq!(m.source_line, 3);
        assert_eq!(
            m.body,
            r#"[{"MsgContent":{"Text":"hi"},"MsgType":"TIMTextElem"}]"#
        );
    }

    fn problems_of(mut v: Value, key: &str, val: Value) -> Vec<String> {
        v[key] = val;
        message(&fields(v), None, NOW, 1, 0).unwrap_err()
    }

    #[test]
    fn every_rule_names_its_field() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("GroupId", json!(""), "GroupId is empty"),
            ("GroupId", json!(5), "GroupId must be a string"),
            ("TopicId", json!(""), "TopicId is empty"),
            ("From_Account", json!(""), "From_Account is empty"),
            ("SendTime", json!(0), "above 0"),
            ("SendTime", json!(NOW + 10), "not in the past"),
            ("SendTime", json!(1.5), "must be an integer"),
            ("SendTime", json!("1700000000"), "must be an integer"),
            ("Random", json!(4_294_967_296_u64), "outside 0..=4294967295"),
            ("Random", json!(-1), "outside"),
            ("MsgBody", json!([]), "MsgBody is empty"),
            ("MsgBody", json!("hi"), "must be an array"),
            (
                "MsgBody",
                json!([{"MsgType": "TIMImageElem", "MsgContent": {}}]),
                "not importable",
            ),
            (
                "MsgBody",
                json!([{"MsgType": "TIMTextElem", "MsgContent": {}}]),
                "Text is missing",
            ),
            (
                "MsgBody",
                json!([{"MsgType": "TIMFaceElem", "MsgContent": {"Index": "x"}}]),
                "Index must be an integer",
            ),
            (
                "MsgBody",
                json!([{"MsgType": "TIMLocationElem", "MsgContent": {"Desc": "d", "Latitude": 1}}]),
                "Longitude is missing",
            ),
            (
                "MsgBody",
                json!([{"MsgType": "TIMCustomElem", "MsgContent": {"Data": "a"}},
                       {"MsgType": "TIMCustomElem", "MsgContent": {"Data": "b"}}]),
                "at most one",
            ),
            (
                "MsgBody",
                json!([{"MsgType": "TIMTextElem", "MsgContent": {"Text": "x".repeat(12_001)}}]),
                "at most 12000",
            ),
        ];
        for (key, val, want) in cases {
            let p = problems_of(good(), key, val.clone());
            assert!(
                p.iter().any(|s| s.contains(want)),
                "{key}={val}: wanted {want:?} in {p:?}"
            );
        }
        let mut v = good();
        v.as_object_mut().unwrap().remove("From_Account");
        let p = message(&fields(v), None, NOW, 1, 0).unwrap_err();
        assert!(p.iter().any(|s| s == "From_Account is missing"), "{p:?}");
    }

    #[test]
    fn all_problems_of_a_message_are_reported() {
        let v = json!({"GroupId": "", "From_Account": 3, "SendTime": -1, "MsgBody": []});
        let p = message(&fields(v), None, NOW, 1, 0).unwrap_err();
        assert_eq!(p.len(), 4, "{p:?}");
    }

    #[test]
    fn random_bounds_and_body_limit_edges() {
        let mut v = good();
        v["Random"] = json!(4_294_967_295_u64);
        assert_eq!(
            message(&fields(v), None, NOW, 1, 0).unwrap().random,
            Some(u32::MAX)
        );
        // Exactly 12,000 bytes is allowed.
        let overhead = json!([{"MsgType": "TIMTextElem", "MsgContent": {"Text": ""}}])
            .to_string()
            .len();
        let mut v = good();
        v["MsgBody"] = json!([{"MsgType": "TIMTextElem", "MsgContent": {"Text": "x".repeat(MAX_BODY_BYTES - overhead)}}]);
        let m = message(&fields(v), None, NOW, 1, 0).unwrap();
        assert_eq!(m.body.len(), MAX_BODY_BYTES);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<RawMessage<'_>>(r#"{"GroupId":"g","CloudCustomData":"x"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("CloudCustomData"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// The fast path: most lines of a large export are valid, so they are parsed straight into borrowed
// typed fields and checked without building JSON values. Whatever the fast path does not accept
// goes through the field-by-field path above, which is the authority on what is wrong; the fast
// path only ever accepts messages that path would accept too.

use std::borrow::Cow;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FastMessage<'a> {
    #[serde(rename = "GroupId", borrow, default)]
    group_id: Option<Cow<'a, str>>,
    #[serde(rename = "TopicId", borrow, default)]
    topic_id: Option<Cow<'a, str>>,
    #[serde(rename = "RecentContactFlag", default)]
    recent_contact_flag: Option<u8>,
    #[serde(rename = "From_Account", borrow)]
    from_account: Cow<'a, str>,
    #[serde(rename = "SendTime")]
    send_time: i64,
    #[serde(rename = "Random", default)]
    random: Option<u32>,
    #[serde(rename = "MsgBody", borrow)]
    msg_body: &'a RawValue,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FastElem<'a> {
    #[serde(rename = "MsgType", borrow)]
    msg_type: Cow<'a, str>,
    #[serde(rename = "MsgContent", borrow)]
    content: FastContent<'a>,
}

/// Every documented MsgContent field; an unknown one (whose value serde would skip unchecked)
/// sends the message to the careful path, which refuses it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FastContent<'a> {
    #[serde(rename = "Text", borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(rename = "Index", default)]
    index: Option<i64>,
    #[serde(rename = "Data", borrow, default)]
    data: Option<Cow<'a, str>>,
    #[serde(rename = "Desc", borrow, default)]
    desc: Option<Cow<'a, str>>,
    #[serde(rename = "Latitude", default)]
    latitude: Option<f64>,
    #[serde(rename = "Longitude", default)]
    longitude: Option<f64>,
    #[serde(rename = "Ext", borrow, default)]
    ext: Option<Cow<'a, str>>,
    #[serde(rename = "Sound", borrow, default)]
    sound: Option<Cow<'a, str>>,
}

fn fast_body_ok(raw: &RawValue) -> bool {
    let Ok(elems) = serde_json::from_str::<Vec<FastElem<'_>>>(raw.get()) else {
        return false;
    };
    if elems.is_empty() {
        return false;
    }
    let mut customs = 0;
    for e in &elems {
        let c = &e.content;
        let (text, index, data, desc) = (
            c.text.is_some(),
            c.index.is_some(),
            c.data.is_some(),
            c.desc.is_some(),
        );
        let (lat, lon, ext, sound) = (
            c.latitude.is_some(),
            c.longitude.is_some(),
            c.ext.is_some(),
            c.sound.is_some(),
        );
        // Required fields there, and no field of another element type.
        let ok = match e.msg_type.as_ref() {
            "TIMTextElem" => text && !(index || data || desc || lat || lon || ext || sound),
            "TIMFaceElem" => index && !(text || desc || lat || lon || ext || sound),
            "TIMLocationElem" => desc && lat && lon && !(text || index || data || ext || sound),
            "TIMCustomElem" => {
                customs += 1;
                data && !(text || index || lat || lon)
            }
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    customs <= 1
}

/// JSON text without insignificant whitespace; borrowed when there is none.
///
/// ```
/// use timport::intake::validate::minify;
/// assert_eq!(minify("[ {\"Text\": \"a b\"} ]\n"), r#"[{"Text":"a b"}]"#);
/// ```
pub fn minify(raw: &str) -> Cow<'_, str> {
    // Strings are skipped whole (memchr finds their end), so only the few bytes between them are
    // looked at one by one. Whitespace outside strings is ASCII in any JSON, so every cut below
    // falls on a character boundary.
    let bytes = raw.as_bytes();
    let mut out: Option<String> = None;
    let (mut i, mut run) = (0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => i = string_end(bytes, i),
            b if b.is_ascii_whitespace() => {
                out.get_or_insert_with(|| String::with_capacity(raw.len()))
                    .push_str(&raw[run..i]);
                i += 1;
                run = i;
            }
            _ => i += 1,
        }
    }
    match out {
        None => Cow::Borrowed(raw),
        Some(mut out) => {
            out.push_str(&raw[run..]);
            Cow::Owned(out)
        }
    }
}

/// Where the JSON string opening at `bytes[start]` ends: just past its closing quote, or the end
/// of the text when it has none.
fn string_end(bytes: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < bytes.len() {
        match memchr::memchr2(b'"', b'\\', &bytes[i..]) {
            Some(k) if bytes[i + k] == b'"' => return i + k + 1,
            // A backslash escapes the byte after it.
            Some(k) => i += k + 2,
            None => break,
        }
    }
    bytes.len()
}

/// Accepts a well-formed, valid message in one typed pass; `None` means "look closer" (the
/// field-by-field path then accepts it or says exactly what is wrong).
pub fn fast_message(
    text: &str,
    inherited: Option<&Inherited>,
    now: i64,
    source_line: i64,
    source_index: i64,
) -> Option<NewMessage> {
    let m: FastMessage<'_> = serde_json::from_str(text).ok()?;
    let (group_id, topic_id, recent_contact) = match inherited {
        Some(inh) => {
            if m.group_id.is_some() || m.topic_id.is_some() || m.recent_contact_flag.is_some() {
                return None;
            }
            (
                inh.group_id.clone()?,
                inh.topic_id.clone().unwrap_or_default(),
                inh.recent_contact,
            )
        }
        None => {
            let g = m.group_id?;
            if g.trim().is_empty() {
                return None;
            }
            let t = match m.topic_id {
                Some(t) if t.trim().is_empty() => return None,
                Some(t) => t.into_owned(),
                None => String::new(),
            };
            let r = match m.recent_contact_flag {
                None | Some(0) => false,
                Some(1) => true,
                Some(_) => return None,
            };
            (g.into_owned(), t, r)
        }
    };
    if m.from_account.trim().is_empty() || m.send_time <= 0 || m.send_time >= now {
        return None;
    }
    // An explicit null reads as "absent" in the typed structs; the careful path reports it.
    if m.msg_body.get().contains("null") || !fast_body_ok(m.msg_body) {
        return None;
    }
    let body = minify(m.msg_body.get());
    if body.len() > MAX_BODY_BYTES {
        return None;
    }
    Some(NewMessage {
        group_id,
        topic_id,
        from_account: m.from_account.into_owned(),
        send_time: m.send_time,
        random: m.random,
        recent_contact,
        body: body.into_owned(),
        source_line,
        source_index,
    })
}

#[cfg(test)]
mod fast_tests {
    use super::*;

    #[test]
    fn minify_keeps_strings_and_drops_whitespace() {
        assert!(matches!(minify(r#"[{"a":"b c"}]"#), Cow::Borrowed(_)));
        assert_eq!(
            minify("[ {\"a\" : \"b \\\" c\" } ]\n"),
            r#"[{"a":"b \" c"}]"#
        );
    }

    /// Byte by byte, the obvious way: what `minify` must agree with.
    fn minify_by_bytes(raw: &str) -> String {
        let (mut out, mut in_string, mut escaped) = (String::new(), false, false);
        for ch in raw.chars() {
            if in_string {
                out.push(ch);
                if escaped {
                    escaped = false;
                } else if ch == '\\' {
                    escaped = true;
                } else if ch == '"' {
                    in_string = false;
                }
            } else if ch == '"' {
                in_string = true;
                out.push(ch);
            } else if !ch.is_ascii_whitespace() {
                out.push(ch);
            }
        }
        out
    }

    #[test]
    fn minify_agrees_with_a_byte_by_byte_copy() {
        let cases = [
            "",
            "[]",
            " [ ] ",
            r#"[{"a":"b c"}]"#,
            "[ {\"a\" : \"b \\\" c\" } ]\n",
            "[\"\\\\\", \"x y\"]",
            "[\"\\\\\\\"\" ,1]",
            "{\"é ü\" :\t\"中 文\"\r\n}",
            "[\"unterminated \\",
            "[\"ends in a backslash\\",
            "[ 1 , 2 ,\n\n 3 ]",
            "[\"\\é x\" , 1]",
            r#"[{"MsgType":"TIMTextElem","MsgContent":{"Text":"a \" \\ b"}}]"#,
        ];
        for raw in cases {
            assert_eq!(minify(raw), minify_by_bytes(raw), "{raw:?}");
            let borrowed = matches!(minify(raw), Cow::Borrowed(_));
            assert_eq!(borrowed, minify_by_bytes(raw) == raw, "{raw:?}");
        }
    }

    /// Every line the fast path accepts, the careful path accepts with the same fields.
    #[test]
    fn fast_path_agrees_with_the_careful_path() {
        let now = 1_800_000_000;
        let lines = [
            r#"{"GroupId":"g","From_Account":"a","SendTime":1700000000,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"hi"}}]}"#,
            r#"{"GroupId":"g","TopicId":"t","From_Account":"a","SendTime":1700000000,"Random":7,"MsgBody":[{"MsgType":"TIMLocationElem","MsgContent":{"Desc":"d","Latitude":1,"Longitude":2.5}},{"MsgType":"TIMCustomElem","MsgContent":{"Data":"x"}}]}"#,
            r#"{"GroupId":"g","From_Account":"a","SendTime":1700000000,"MsgBody":[{"MsgType":"TIMFaceElem","MsgContent":{"Index":1}}], "RecentContactFlag": 1}"#,
            r#"{"GroupId":"g","From_Account":"a","SendTime":1700000000,"MsgBody":[{"MsgType":"TIMFaceElem","MsgContent":{"Index":1.5}}]}"#,
            r#"{"GroupId":"g","From_Account":"a","SendTime":1700000000,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":null}}]}"#,
            r#"{"GroupId":"","From_Account":"a","SendTime":1700000000,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"x"}}]}"#,
            r#"{"GroupId":"g","From_Account":"a","SendTime":1700000000.0,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"x"}}]}"#,
            r#"{"GroupId":"g","From_Account":"a","SendTime":1700000000,"Random":4294967296,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"x"}}]}"#,
            r#"{"GroupId":"g","From_Account":"a","SendTime":1700000000,"MsgBody":[{"MsgType":"TIMCustomElem","MsgContent":{"Data":"x"}},{"MsgType":"TIMCustomElem","MsgContent":{"Data":"y"}}]}"#,
            r#"{"GroupId":"g","From_Account":"a","SendTime":1700000000,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"x"},"Extra":1}]}"#,
            r#"{"GroupId":"g","From_Account":"a","SendTime":1700000000,"MsgBody":[{"MsgType":"TIMFaceElem","MsgContent":{"Index":1,"Data":null}}]}"#,
            r#"{"GroupId":"g","From_Account":"a","SendTime":1700000000,"MsgBody":[{"MsgType":"TIMCustomElem","MsgContent":{"Data":"x","Ext":null}}]}"#,
        ];
        for l in lines {
            let fast = fast_message(l, None, now, 1, 0);
            let raw: RawMessage<'_> = serde_json::from_str(l).unwrap();
            let careful = Fields::from_raw(&raw).and_then(|f| message(&f, None, now, 1, 0));
            match (&fast, &careful) {
                (Some(f), Ok(c)) => {
                    assert_eq!(
                        (
                            &f.group_id,
                            &f.topic_id,
                            &f.from_account,
                            f.send_time,
                            f.random,
                            f.recent_contact
                        ),
                        (
                            &c.group_id,
                            &c.topic_id,
                            &c.from_account,
                            c.send_time,
                            c.random,
                            c.recent_contact
                        ),
                        "{l}"
                    );
                    let fv: Value = serde_json::from_str(&f.body).unwrap();
                    let cv: Value = serde_json::from_str(&c.body).unwrap();
                    assert_eq!(fv, cv, "{l}");
                }
                (None, _) => {}
                (Some(_), Err(p)) => {
                    panic!("fast path accepted what the careful path rejects: {l}: {p:?}")
                }
            }
        }
        assert!(
            fast_message(lines[0], None, now, 1, 0).is_some(),
            "the common case is fast"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Whole-group jobs: `Group` (the import_group body) and `Members` (import_group_member entries)
// in a .json request body. Limits from tencent-api.md section 3.1/3.2 (D-IG, D-IGMEM, D-LIMIT).

/// A validated `Group`: the import_group request as JSON, and its CreateTime.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupDef {
    pub spec: String,
    pub create_time: Option<i64>,
}

const GROUP_TYPES: [&str; 6] = [
    "Private",
    "Public",
    "ChatRoom",
    "Community",
    "Work",
    "Meeting",
];

fn max_bytes(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    limit: usize,
    required: bool,
    problems: &mut Vec<String>,
) {
    match obj.get(key) {
        None | Some(Value::Null) if required => problems.push(format!("Group.{key} is missing")),
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if required && s.trim().is_empty() => {
            problems.push(format!("Group.{key} is empty"))
        }
        Some(Value::String(s)) if s.len() > limit => problems.push(format!(
            "Group.{key} is {} bytes; Tencent takes at most {limit}",
            s.len()
        )),
        Some(Value::String(_)) => {}
        Some(_) => problems.push(format!("Group.{key} must be a string")),
    }
}

/// Validates a body's `Group` for the body's `group_id`.
pub fn group_def(group_id: &str, v: &Value, now: i64) -> Result<GroupDef, Vec<String>> {
    let Value::Object(obj) = v else {
        return Err(vec![
            "Group must be an object (the import_group body)".into(),
        ]);
    };
    let mut problems = Vec::new();
    const KNOWN: [&str; 13] = [
        "GroupId",
        "Type",
        "Name",
        "Owner_Account",
        "Introduction",
        "Notification",
        "FaceUrl",
        "MaxMemberCount",
        "ApplyJoinOption",
        "AppDefinedData",
        "CreateTime",
        "SupportTopic",
        "MemberList",
    ];
    for k in obj.keys() {
        if !KNOWN.contains(&k.as_str()) {
            problems.push(format!("Group has an unknown field {k:?}"));
        }
    }
    if obj.contains_key("MemberList") {
        problems.push("Group.MemberList is not supported: list members in Members, they are imported after the history".into());
    }
    match obj.get("GroupId") {
        None => {}
        Some(Value::String(g)) if g == group_id => {}
        Some(_) => problems.push(format!(
            "Group.GroupId must be absent or equal the body's GroupId {group_id:?}"
        )),
    }
    if group_id.len() > 48
        || group_id.starts_with("@TGS#")
        || !group_id.bytes().all(|b| (0x21..=0x7e).contains(&b))
    {
        problems.push(format!(
            "GroupId {group_id:?} cannot be created: a custom GroupId is printable ASCII without spaces, at most 48 bytes, not starting with @TGS#"
        ));
    }
    let kind = obj.get("Type").and_then(Value::as_str).unwrap_or("");
    match obj.get("Type") {
        None => problems.push("Group.Type is missing".into()),
        Some(Value::String(t)) if t == "AVChatRoom" => {
            problems.push("Group.Type AVChatRoom cannot be imported (Tencent answers 10007)".into())
        }
        Some(Value::String(t)) if GROUP_TYPES.contains(&t.as_str()) => {}
        Some(t) => problems.push(format!(
            "Group.Type {t} is not one of {}",
            GROUP_TYPES.join(", ")
        )),
    }
    max_bytes(obj, "Name", 30, true, &mut problems);
    max_bytes(obj, "Introduction", 240, false, &mut problems);
    max_bytes(obj, "Notification", 300, false, &mut problems);
    max_bytes(obj, "FaceUrl", 100, false, &mut problems);
    max_bytes(obj, "Owner_Account", 64, false, &mut problems);
    max_bytes(obj, "ApplyJoinOption", 32, false, &mut problems);
    if let Some(v) = obj.get("MaxMemberCount") {
        let limit = if kind == "Community" { 100_000 } else { 6_000 };
        match v.as_u64() {
            Some(n) if (1..=limit).contains(&n) => {}
            _ => problems.push(format!(
                "Group.MaxMemberCount must be an integer within 1..={limit}"
            )),
        }
    }
    if let Some(v) = obj.get("SupportTopic") {
        match v.as_u64() {
            Some(0) => {}
            Some(1) if kind == "Community" => {}
            Some(1) => problems.push("Group.SupportTopic is for Community groups only".into()),
            _ => problems.push("Group.SupportTopic must be 0 or 1".into()),
        }
    }
    if let Some(v) = obj.get("AppDefinedData") {
        let ok = v.as_array().is_some_and(|a| {
            a.iter().all(|e| {
                e.get("Key").is_some_and(Value::is_string)
                    && e.get("Value").is_some_and(Value::is_string)
            })
        });
        if !ok {
            problems.push("Group.AppDefinedData must be an array of {Key, Value} strings".into());
        }
    }
    let create_time = match obj.get("CreateTime") {
        None => None,
        Some(v) => match v.as_i64() {
            Some(t) if t > 0 && t < now => Some(t),
            _ => {
                problems.push(format!(
                    "Group.CreateTime must be an integer (Unix seconds) above 0 and in the past, got {v}"
                ));
                None
            }
        },
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut spec = obj.clone();
    spec.insert("GroupId".into(), Value::String(group_id.to_string()));
    Ok(GroupDef {
        spec: Value::Object(spec).to_string(),
        create_time,
    })
}

/// Validates a body's `Members` (import_group_member entries). Problems carry the entry index.
pub fn members(
    v: &Value,
    create_time: Option<i64>,
    now: i64,
) -> Result<Vec<crate::store::NewMember>, Vec<String>> {
    let Value::Array(list) = v else {
        return Err(vec!["Members must be an array".into()]);
    };
    let mut problems = Vec::new();
    let mut out = Vec::with_capacity(list.len());
    let mut seen = std::collections::HashSet::new();
    for (i, m) in list.iter().enumerate() {
        let Value::Object(obj) = m else {
            problems.push(format!("Members[{i}] must be an object"));
            continue;
        };
        let before = problems.len();
        for k in obj.keys() {
            if !["Member_Account", "Role", "JoinTime", "UnreadMsgNum"].contains(&k.as_str()) {
                problems.push(format!("Members[{i}] has an unknown field {k:?}"));
            }
        }
        let account = match obj.get("Member_Account") {
            Some(Value::String(a)) if !a.trim().is_empty() => a.clone(),
            _ => {
                problems.push(format!(
                    "Members[{i}].Member_Account must be a non-empty string"
                ));
                String::new()
            }
        };
        if !account.is_empty() && !seen.insert(account.clone()) {
            problems.push(format!("Members[{i}]: {account:?} is listed twice"));
        }
        let role = match obj.get("Role") {
            None => None,
            Some(Value::String(r)) if r == "Admin" => Some(r.clone()),
            Some(r) => {
                problems.push(format!(
                    "Members[{i}].Role may only be \"Admin\" (import_group_member), got {r}"
                ));
                None
            }
        };
        let join_time = match obj.get("JoinTime") {
            None => None,
            Some(v) => match v.as_i64() {
                Some(t) if t >= now => {
                    problems.push(format!("Members[{i}].JoinTime {t} is not in the past"));
                    None
                }
                Some(t) if create_time.is_some_and(|c| t <= c) => {
                    problems.push(format!(
                        "Members[{i}].JoinTime {t} is not after the group's CreateTime {}",
                        create_time.unwrap_or_default()
                    ));
                    None
                }
                Some(t) if t > 0 => Some(t),
                _ => {
                    problems.push(format!(
                        "Members[{i}].JoinTime must be an integer (Unix seconds) above 0"
                    ));
                    None
                }
            },
        };
        let unread = match obj.get("UnreadMsgNum") {
            None => None,
            Some(v) => match v.as_i64() {
                Some(n) if n >= 0 => Some(n),
                _ => {
                    problems.push(format!(
                        "Members[{i}].UnreadMsgNum must be an integer of at least 0"
                    ));
                    None
                }
            },
        };
        if problems.len() == before {
            out.push(crate::store::NewMember {
                account,
                role,
                join_time,
                unread_msg_num: unread,
            });
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

// ---------------------------------------------------------------------------------------------
// Accounts with profile data: `AccountList` entries of a .json body and NDJSON lines
// `{"UserID", "Nick"?, "FaceUrl"?}` (tencent-api.md section 3.8).

/// Longest UserID, bytes (D-MACC).
pub const MAX_USER_ID_BYTES: usize = 32;
/// Longest Nick and FaceUrl, bytes: the limits of the profile fields they set (Tag_Profile_IM_Nick
/// and Tag_Profile_IM_Image, 500 bytes each).
pub const MAX_PROFILE_BYTES: usize = 500;

/// Whether an NDJSON line is an account rather than a message (it has a `UserID` key).
pub fn looks_like_account(v: &Value) -> bool {
    v.as_object().is_some_and(|o| o.contains_key("UserID"))
}

/// Validates one account; `at` names it in problems (e.g. `AccountList[3]`, or "the account").
pub fn account(v: &Value, at: &str) -> Result<crate::store::NewAccount, Vec<String>> {
    let Value::Object(obj) = v else {
        return Err(vec![format!(
            "{at} must be an object {{\"UserID\", \"Nick\"?, \"FaceUrl\"?}}"
        )]);
    };
    let mut problems = Vec::new();
    for k in obj.keys() {
        if !["UserID", "Nick", "FaceUrl"].contains(&k.as_str()) {
            problems.push(format!(
                "{at} has an unknown field {k:?} (an account has UserID, Nick and FaceUrl)"
            ));
        }
    }
    let user_id = match obj.get("UserID") {
        Some(Value::String(id)) if id.trim().is_empty() => {
            problems.push(format!("{at}.UserID is empty"));
            String::new()
        }
        Some(Value::String(id)) if id.len() > MAX_USER_ID_BYTES => {
            problems.push(format!(
                "{at}.UserID is {} bytes; Tencent takes at most {MAX_USER_ID_BYTES}",
                id.len()
            ));
            String::new()
        }
        Some(Value::String(id)) if id.chars().any(char::is_control) => {
            problems.push(format!("{at}.UserID holds a control character"));
            String::new()
        }
        Some(Value::String(id)) => id.clone(),
        None | Some(Value::Null) => {
            problems.push(format!("{at}.UserID is missing"));
            String::new()
        }
        Some(other) => {
            problems.push(format!(
                "{at}.UserID must be a string, got {}",
                type_name(other)
            ));
            String::new()
        }
    };
    let mut field = |key: &str| match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) if t.len() > MAX_PROFILE_BYTES => {
            problems.push(format!(
                "{at}.{key} is {} bytes; Tencent takes at most {MAX_PROFILE_BYTES}",
                t.len()
            ));
            None
        }
        Some(Value::String(t)) => Some(t.clone()),
        Some(other) => {
            problems.push(format!(
                "{at}.{key} must be a string, got {}",
                type_name(other)
            ));
            None
        }
    };
    let nick = field("Nick");
    let face_url = field("FaceUrl");
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(crate::store::NewAccount {
        user_id,
        nick,
        face_url,
    })
}

#[cfg(test)]
mod account_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accounts_are_validated_field_by_field() {
        let a = account(&json!({"UserID": "u1", "Nick": "Ann"}), "the account").expect("valid");
        assert_eq!(a.user_id, "u1");
        assert_eq!(a.nick.as_deref(), Some("Ann"));
        assert_eq!(a.face_url, None);
        let long = "x".repeat(33);
        for (v, needle) in [
            (json!({"UserID": ""}), "UserID is empty"),
            (json!({"UserID": long}), "33 bytes"),
            (json!({"Nick": "a"}), "UserID is missing"),
            (json!({"UserID": 5}), "must be a string"),
            (json!({"UserID": "u", "Age": 3}), "unknown field \"Age\""),
            (
                json!({"UserID": "u", "Nick": "n".repeat(501)}),
                "Nick is 501 bytes",
            ),
            (
                json!({"UserID": "u", "FaceUrl": 1}),
                "FaceUrl must be a string",
            ),
        ] {
            let e = account(&v, "AccountList[0]")
                .expect_err("invalid")
                .join("; ");
            assert!(e.contains(needle), "{v}: {e}");
            assert!(e.contains("AccountList[0]"), "{e}");
        }
        assert!(account(&json!({"UserID": "x".repeat(32)}), "a").is_ok());
    }
}
