//! Outcome classification: the one place that maps Tencent error codes and transport failures
//! to what the engine should do ([`ErrorClass`]), and the client's error type ([`ApiError`]).
//!
//! Role: [`classify`] follows `tencent-api.md` section 4. Stopping and recovery: nothing here
//! holds state; the classes tell callers how to recover (back off, retry, renew the UserSig,
//! reconcile, skip a message or stop a lane). Errors never carry the secret key or the UserSig:
//! transport messages are built from `reqwest::Error::without_url` and scrubbed once more.

use std::fmt;

use super::types::ImportMsgResult;

/// What a failure means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The quota was exceeded: slow down and try again later; not a failed attempt.
    RateLimited,
    /// Transient; the request was certainly not applied. Retry with backoff.
    Retryable,
    /// The UserSig was refused as expired or invalid; renew it and retry once.
    Auth,
    /// Data or configuration error; retrying the same request will not help.
    Permanent,
    /// The request was fine but (some of) its messages were refused; see per-message results.
    /// Request-level 10004 ("invalid parameter") is here too: the engine bisects the batch.
    PerMessage,
    /// The outcome is unknown: the request may have been applied (timeout, reset after sending,
    /// HTTP 5xx, unreadable answer). Reconcile with the server before re-sending.
    Unknown,
}

impl ErrorClass {
    /// Label used in the `outcome` of `timport_requests_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::Retryable => "retryable",
            ErrorClass::Auth => "auth",
            ErrorClass::Permanent => "permanent",
            ErrorClass::PerMessage => "per_message",
            ErrorClass::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Well-known Tencent codes used by name elsewhere.
pub mod codes {
    /// UserSig expired.
    pub const USERSIG_EXPIRED: i64 = 70001;
    /// UserSig or A2 invalid.
    pub const USERSIG_INVALID: i64 = 20002;
    /// Invalid parameter (request level); per message: SendTime invalid.
    pub const INVALID_PARAMETER: i64 = 10004;
    /// Group does not exist or was dismissed.
    pub const GROUP_NOT_FOUND: i64 = 10010;
    /// import_group: the group ID is already in use (success if the group is ours).
    pub const GROUP_ID_IN_USE: i64 = 10021;
    /// Message body longer than 12,000 bytes (per message).
    pub const MSG_TOO_LONG: i64 = 80002;
    /// SDKAppID request rate exceeded.
    pub const APP_RATE_LIMIT: i64 = 60011;
    /// REST call rate exceeded.
    pub const REST_RATE_LIMIT: i64 = 60007;
    /// Internal error, retry.
    pub const INTERNAL_RETRY: i64 = 10002;
    /// The requested account does not exist (group APIs): import the account first.
    pub const ACCOUNT_NOT_FOUND: i64 = 10019;
    /// The requested account does not exist (other APIs): import the account first.
    pub const ACCOUNT_NOT_FOUND_70107: i64 = 70107;
}

/// Classify a non-zero Tencent `ErrorCode` (or per-message `Result`).
///
/// Choices where the doc is open: 70050 ("UserSig verified too often, retry in a minute") is
/// [`ErrorClass::RateLimited`]: waiting is the only remedy and it must not count as an attempt.
/// 60004/60005/70002/70003/70005 (malformed account or signature) are Permanent: renewing a sig
/// made from the same configuration cannot help. Any code not listed is Permanent, so an
/// unexpected answer stops a lane visibly instead of looping.
pub fn classify(code: i64) -> ErrorClass {
    match code {
        60007 | 60011 | 60018 | 60019 | 10006 | 10023 | 70050 => ErrorClass::RateLimited,
        10002 | 20004 | 20005 | 60008 | 60013 | 60014 | 70169 | 70202 | 70500 | 80003 | 90992
        | 90994 | 90995 | 91000 => ErrorClass::Retryable,
        70001 | 20002 => ErrorClass::Auth,
        // 10019 / 70107: the sender (or member) is not an account of the app; only that message
        // is at fault (a whole-request refusal is bisected to find it).
        10004 | 10019 | 10020 | 70107 | 80001 | 80002 | 80004 | 93000 => ErrorClass::PerMessage,
        _ => ErrorClass::Permanent,
    }
}

/// What went wrong with one API call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiErrorKind {
    /// Tencent answered with a non-zero `ErrorCode`.
    Service { code: i64, info: String },
    /// The connection could not be made (refused, DNS, TLS): nothing was sent.
    Connect(String),
    /// No answer within the request timeout; the request may have been applied.
    Timeout,
    /// The connection broke after the request was (possibly) sent.
    Transport(String),
    /// A status other than 200 (e.g. 502): the request may have been applied.
    HttpStatus(u16),
    /// An answer that is not the expected JSON: the request may have been applied.
    BadResponse(String),
    /// The request body could not be serialized (a bug or bad input); nothing was sent.
    Encode(String),
    /// High availability: this node may not send now (it is not the active node, or its lease
    /// could end before the request would); nothing was sent.
    NotActive,
}

impl fmt::Display for ApiErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiErrorKind::Service { code, info } => write!(f, "error {code}: {info}"),
            ApiErrorKind::Connect(e) => write!(f, "could not connect (not sent): {e}"),
            ApiErrorKind::Timeout => f.write_str("timed out (may have been applied)"),
            ApiErrorKind::Transport(e) => {
                write!(f, "connection lost (may have been applied): {e}")
            }
            ApiErrorKind::HttpStatus(s) => write!(f, "HTTP status {s} (may have been applied)"),
            ApiErrorKind::BadResponse(e) => {
                write!(f, "unreadable response (may have been applied): {e}")
            }
            ApiErrorKind::Encode(e) => write!(f, "request body could not be encoded: {e}"),
            ApiErrorKind::NotActive => f.write_str(
                "not sent: this node is not the active node, or its lease ends too soon",
            ),
        }
    }
}

/// The error of every [`TencentClient`](super::TencentClient) call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{endpoint}: {kind}")]
pub struct ApiError {
    /// The command, e.g. `import_group_msg`.
    pub endpoint: &'static str,
    pub kind: ApiErrorKind,
    /// import_group_msg only: per-message results that came with a failed answer, if any.
    pub import_results: Option<Vec<ImportMsgResult>>,
}

impl ApiError {
    pub(crate) fn new(endpoint: &'static str, kind: ApiErrorKind) -> Self {
        ApiError {
            endpoint,
            kind,
            import_results: None,
        }
    }

    /// How the caller should react.
    pub fn class(&self) -> ErrorClass {
        match &self.kind {
            ApiErrorKind::Service { code, .. } => classify(*code),
            ApiErrorKind::Connect(_) => ErrorClass::Retryable,
            ApiErrorKind::Timeout
            | ApiErrorKind::Transport(_)
            | ApiErrorKind::HttpStatus(_)
            | ApiErrorKind::BadResponse(_) => ErrorClass::Unknown,
            ApiErrorKind::Encode(_) => ErrorClass::Permanent,
            // Nothing was sent and nothing is wrong with the request: like a quota refusal, the
            // batch goes back untouched and no attempt is counted; the lane waits for the gate.
            ApiErrorKind::NotActive => ErrorClass::RateLimited,
        }
    }

    /// Tencent's `ErrorCode`, when the service answered.
    pub fn code(&self) -> Option<i64> {
        match &self.kind {
            ApiErrorKind::Service { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Tencent's `ErrorInfo`, or a description of the transport failure.
    pub fn info(&self) -> String {
        match &self.kind {
            ApiErrorKind::Service { info, .. } => info.clone(),
            other => other.to_string(),
        }
    }

    /// The class of an answer to a write whose effect cannot be undone (import_group_msg):
    /// like [`ApiError::class`], except that the server-side timeouts (60008, 70169, 70202,
    /// 80003) mean the write may have been applied, like a lost answer.
    pub fn write_class(&self) -> ErrorClass {
        match self.code() {
            Some(60008 | 70169 | 70202 | 80003) => ErrorClass::Unknown,
            _ => self.class(),
        }
    }

    /// Whether the request may have reached the server and been applied.
    pub fn may_have_been_applied(&self) -> bool {
        self.class() == ErrorClass::Unknown
    }

    /// A transport failure (no Tencent answer at all).
    pub fn is_transport(&self) -> bool {
        !matches!(
            self.kind,
            ApiErrorKind::Service { .. } | ApiErrorKind::Encode(_) | ApiErrorKind::NotActive
        )
    }
}

/// Why a [`TencentClient`](super::TencentClient) could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("invalid base_url {url:?}: {reason}")]
    InvalidBaseUrl { url: String, reason: String },
    #[error("identifier must not be empty")]
    EmptyIdentifier,
    #[error("usersig_validity must be at least 1 s")]
    ValidityTooShort,
    #[error("HTTP client could not be built: {0}")]
    Http(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        for c in [60007, 60011, 60018, 60019, 10006, 10023, 70050] {
            assert_eq!(classify(c), ErrorClass::RateLimited, "{c}");
        }
        for c in [10002, 20004, 91000, 70500] {
            assert_eq!(classify(c), ErrorClass::Retryable, "{c}");
        }
        assert_eq!(classify(70001), ErrorClass::Auth);
        assert_eq!(classify(20002), ErrorClass::Auth);
        for c in [10004, 10019, 10020, 70107, 80001, 80002, 80004, 93000] {
            assert_eq!(classify(c), ErrorClass::PerMessage, "{c}");
        }
        for c in [70009, 70013, 70014, 10010, 10021, 60006, 20003, 123456] {
            assert_eq!(classify(c), ErrorClass::Permanent, "{c}");
        }
    }
}
