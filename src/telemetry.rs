//! Telemetry: the tracing subscriber, JSON for machines or text for people, filtered by the
//! configured `log.level`. Logs go to stderr so that command output on stdout stays parseable.
//!
//! Installed once at start; an invalid filter is a configuration error (exit code 2), never a
//! silently ignored one. Nothing here holds state that needs stopping.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::MakeWriterExt;

use crate::settings::{LogFormat, LogSettings, SettingsError};

/// Parses the filter, reporting the `log.level` key when it is invalid.
pub fn filter(level: &str) -> Result<EnvFilter, SettingsError> {
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
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer)
            .try_init(),
    };
    // An already-installed subscriber is not an error worth stopping for.
    let _ = result;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn invalid_filter_names_the_key() {
        let e = super::filter("info,[[[").unwrap_err().to_string();
        assert!(e.contains("log.level"), "{e}");
        assert!(super::filter("info,timport=debug").is_ok());
    }
}
