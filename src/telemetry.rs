//! Telemetry: the tracing subscriber, JSON for machines or text for people, filtered by the
//! configured `log.level`. Logs go to stderr so that command output on stdout stays parseable.
//!
//! Installed once at start; an invalid filter is a configuration error (exit code 2), never a
//! silently ignored one. Nothing here holds state that needs stopping.
//!
//! In text format every field, the message included, goes through [`escape_control`]: a file
//! name, an ID or an error text holding a newline or an escape sequence cannot start a forged log
//! line or drive the terminal. Colours are used only when stderr is a terminal. JSON output is
//! escaped by JSON itself.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format;
use tracing_subscriber::fmt::writer::MakeWriterExt;

use crate::settings::{LogFormat, LogSettings, SettingsError};

/// Parses the filter, reporting the `log.level` key when it is invalid.
pub fn filter(level: &str) -> Result<EnvFilter, SettingsError> {
    crate::settings::check_log_level(level)?;
    EnvFilter::try_new(level).map_err(|e| SettingsError::Key {
        key: "log.level",
        message: format!("invalid tracing filter {level:?}: {e}"),
    })
}

/// Installs the global subscriber. Calling it twice (as tests may) keeps the first.
pub fn init(settings: &LogSettings) -> Result<(), SettingsError> {
    let filter = filter(&settings.level)?;
    let writer = std::io::stderr.with_max_level(tracing::Level::TRACE);
    let result = match settings.format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_env_filter(filter)
            .with_writer(writer)
            .try_init(),
        LogFormat::Text => {
            let fields = format::debug_fn(|w, field, value| {
                let text = format!("{value:?}");
                let text = escape_control(&text);
                match field.name() {
                    "message" => w.write_str(&text),
                    name => write!(w, "{}={text}", name.trim_start_matches("r#")),
                }
            })
            .delimited(" ");
            tracing_subscriber::fmt()
                .with_ansi(std::io::stderr().is_terminal())
                .fmt_fields(fields)
                .with_env_filter(filter)
                .with_writer(writer)
                .try_init()
        }
    };
    // An already-installed subscriber is not an error worth stopping for.
    let _ = result;
    Ok(())
}

/// True for characters that must not reach a text log or a terminal as they are: C0 and C1
/// controls (newline, ESC, …), DEL, and the bidirectional overrides that reorder what is shown.
fn must_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with control characters written as escapes (`\n`, `\r`, `\t`, `\u{1b}`), so that it
/// stays on one line and cannot drive a terminal. Borrowed when nothing needed escaping.
pub fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(must_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if must_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Bytes (a file name from the file system) as printable text: valid UTF-8 through
/// [`escape_control`], every other byte as `\xNN`.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(&escape_control(chunk.valid()));
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_filter_names_the_key() {
        let e = filter("info,[[[").unwrap_err().to_string();
        assert!(e.contains("log.level"), "{e}");
        assert!(filter("info,timport=debug").is_ok());
        let e = filter("infoo").unwrap_err().to_string();
        assert!(e.contains("log.level") && e.contains("infoo"), "{e}");
        for ok in [
            "info",
            "WARN",
            "debug,hyper=warn",
            "timport::engine=trace",
            "off",
            "3",
        ] {
            assert!(filter(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_control("a.ndjson"), "a.ndjson");
        assert_eq!(
            escape_control("a\nFAKE \u{1b}[31mred\u{7f}"),
            "a\\nFAKE \\u{1b}[31mred\\u{7f}"
        );
        assert_eq!(escape_bytes(b"x\xff\xfey.ndjson"), "x\\xff\\xfey.ndjson");
        assert_eq!(escape_bytes("é\r".as_bytes()), "é\\r");
    }
}
