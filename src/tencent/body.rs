//! Message bodies as Tencent may give them back: `group_msg_get_simple` is not documented to
//! return a body byte for byte as it was imported (the strict reading: numbers re-formatted, keys
//! reordered), so bodies are compared as JSON values, through one canonical text.
//!
//! Role: [`canonical`], [`canonical_text`] and [`digest`], used wherever the engine (and `verify`) must tell
//! whether a message read back is one that was sent. Pure functions: nothing to stop or recover.

use std::fmt::Write as _;

use serde_json::Value;

/// The canonical text of a JSON value: object keys sorted, no whitespace, strings escaped the one
/// way serde_json does, and every number written by its value (so `10`, `10.0` and `1E+1` are the
/// same, as are `1.50` and `1.5`), as a JSON reader that holds numbers as integers or 64-bit
/// floats sees them.
///
/// ```
/// use timport::tencent::body::canonical_text;
/// let a = canonical_text(r#"[{"MsgType":"TIMLocationElem","MsgContent":{"Latitude":1E+1,"Desc":"x","Longitude":-0}}]"#);
/// let b = canonical_text(r#"[ {"MsgContent": {"Desc": "x", "Latitude": 10.0, "Longitude": 0}, "MsgType": "TIMLocationElem"} ]"#);
/// assert_eq!(a, b);
/// assert_ne!(canonical_text(r#"[{"a":1.5}]"#), canonical_text(r#"[{"a":1.25}]"#));
/// ```
pub fn canonical(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

/// [`canonical`] of JSON text; `None` when it is not JSON.
pub fn canonical_text(text: &str) -> Option<String> {
    serde_json::from_str::<Value>(text)
        .ok()
        .map(|v| canonical(&v))
}

/// The SHA-256 (hex) of a canonical text: what the store keeps of a body it dropped
/// (`queue.keep_bodies`), so `verify` still compares bodies as JSON values.
pub fn digest(canonical: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(canonical.as_bytes()))
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Null | Value::Bool(_) | Value::String(_) => out.push_str(&v.to_string()),
        Value::Number(n) => write_number(n, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
    }
}

fn write_number(n: &serde_json::Number, out: &mut String) {
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(f) = n.as_f64() {
        // Integral floats within i64 as integers (10.0 = 10; -0.0 = 0), the rest in Rust's
        // shortest round-trip form.
        if f.fract() == 0.0 && f.abs() < 9.2e18 {
            let _ = write!(out, "{}", f as i64);
        } else {
            let _ = write!(out, "{f:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn re_formatted_bodies_compare_equal_and_different_ones_do_not() {
        let sent = r#"[{"MsgType":"TIMLocationElem","MsgContent":{"Desc":"\u4e2d","Latitude":23.114068987788478,"Longitude":1e-7}}]"#;
        let back = r#"[{"MsgContent":{"Desc":"中","Latitude":23.114068987788478,"Longitude":0.0000001},"MsgType":"TIMLocationElem"}]"#;
        assert_eq!(canonical_text(sent), canonical_text(back));
        let other = r#"[{"MsgContent":{"Desc":"中","Latitude":23.11406898778848,"Longitude":0.0000001},"MsgType":"TIMLocationElem"}]"#;
        assert_ne!(canonical_text(sent), canonical_text(other));
        assert_ne!(
            canonical_text(r#"[{"Text":"null"}]"#),
            canonical_text(r#"[{"Text":null}]"#)
        );
        assert_eq!(
            canonical_text("[18446744073709551615]").as_deref(),
            Some("[18446744073709551615]")
        );
        assert_eq!(canonical_text("nope"), None);
    }
}
