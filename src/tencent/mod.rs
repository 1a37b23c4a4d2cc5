//! Tencent Cloud Chat REST client for group history import.
//!
//! Role: one cheap, cloneable [`TencentClient`] that paces every request through the shared
//! [`Pacer`](crate::pacing::Pacer), signs it with a cached UserSig ([`usersig`]), POSTs JSON to
//! `{base}/v4/group_open_http_svc/{command}` and turns the answer into typed data ([`types`]) or
//! an [`ApiError`] whose [`ErrorClass`] ([`error::classify`], the single classification table)
//! tells the engine how to recover.
//!
//! Stopping and recovery: the client owns no task; dropping a call's future abandons that request
//! (its outcome is then unknown, like a timeout). Every request has a timeout
//! ([`ClientConfig::request_timeout`]). A UserSig is renewed when less than a quarter of its
//! validity remains, and once, immediately, when the server answers 70001 or 20002 (the request
//! is then retried once). Transport failures are reported with whether the request may have been
//! applied; the client never retries anything else by itself.
//!
//! Secrets: the key is a [`SecretString`]; the UserSig is never logged and is scrubbed from every
//! error text (reqwest errors are stripped of their URL). Redirects are not followed, so the
//! signed URL is never sent to another host.

pub mod body;
pub mod client;
pub mod error;
pub mod types;
pub mod usersig;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

pub use client::TencentClient;
pub use error::{ApiError, ApiErrorKind, ClientBuildError, ErrorClass, classify, codes};
pub use types::*;

/// The service every import endpoint lives under.
pub const GROUP_SERVICE: &str = "group_open_http_svc";
/// The service name of account imports (`multiaccount_import`).
pub const LOGIN_SERVICE: &str = "im_open_login_svc";

/// Default per-request timeout (the server's own is 3 s).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default UserSig validity.
pub const DEFAULT_USERSIG_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// Data centre of the SDKAppID, which decides the REST domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Region {
    #[default]
    China,
    Singapore,
    Seoul,
    Tokyo,
    Frankfurt,
    Mumbai,
    SiliconValley,
    Jakarta,
}

impl Region {
    /// Every region, in documentation order.
    pub const ALL: [Region; 8] = [
        Region::China,
        Region::Singapore,
        Region::Seoul,
        Region::Tokyo,
        Region::Frankfurt,
        Region::Mumbai,
        Region::SiliconValley,
        Region::Jakarta,
    ];

    /// The configuration name (`silicon-valley`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Region::China => "china",
            Region::Singapore => "singapore",
            Region::Seoul => "seoul",
            Region::Tokyo => "tokyo",
            Region::Frankfurt => "frankfurt",
            Region::Mumbai => "mumbai",
            Region::SiliconValley => "silicon-valley",
            Region::Jakarta => "jakarta",
        }
    }

    /// Primary REST host.
    pub fn primary_host(self) -> &'static str {
        match self {
            Region::China => "console.tim.qq.com",
            Region::Singapore => "adminapisgp.im.qcloud.com",
            Region::Seoul => "adminapikr.im.qcloud.com",
            Region::Tokyo => "adminapijpn.im.qcloud.com",
            Region::Frankfurt => "adminapiger.im.qcloud.com",
            Region::Mumbai => "adminapiind.im.qcloud.com",
            Region::SiliconValley => "adminapiusa.im.qcloud.com",
            Region::Jakarta => "adminapiidn.im.qcloud.com",
        }
    }

    /// Backup host, for when the primary's DNS is hijacked.
    pub fn backup_host(self) -> &'static str {
        match self {
            Region::China => "adminapi.my-imcloud.com",
            Region::Singapore => "adminapisgp.my-imcloud.com",
            Region::Seoul => "adminapikr.my-imcloud.com",
            Region::Tokyo => "adminapijpn.my-imcloud.com",
            Region::Frankfurt => "adminapiger.my-imcloud.com",
            Region::Mumbai => "adminapiind.my-imcloud.com",
            Region::SiliconValley => "adminapiusa.my-imcloud.com",
            Region::Jakarta => "adminapiidn.my-imcloud.com",
        }
    }

    /// `https://{primary_host}`.
    pub fn base_url(self) -> String {
        format!("https://{}", self.primary_host())
    }

    /// `https://{backup_host}`.
    pub fn backup_base_url(self) -> String {
        format!("https://{}", self.backup_host())
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown region name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown region {0:?} (expected china, singapore, seoul, tokyo, frankfurt, mumbai, silicon-valley or jakarta)"
)]
pub struct UnknownRegion(pub String);

impl FromStr for Region {
    type Err = UnknownRegion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase().replace('_', "-");
        Region::ALL
            .into_iter()
            .find(|r| r.name() == wanted)
            .ok_or_else(|| UnknownRegion(s.to_owned()))
    }
}

/// Everything the client needs. `Debug` never shows the key.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub sdkappid: u64,
    /// An App admin account.
    pub identifier: String,
    pub secret_key: SecretString,
    /// Overrides the region's domain, e.g. `http://127.0.0.1:8080` for the simulator. Plain
    /// http is allowed only here.
    pub base_url: Option<String>,
    pub region: Region,
    /// Per request, connection included. Should exceed the server's own 3 s.
    pub request_timeout: Duration,
    /// Lifetime of each generated UserSig (callers enforce ≥ 1 h; the client needs ≥ 1 s).
    pub usersig_validity: Duration,
}

impl ClientConfig {
    /// A configuration with the defaults: region China, 10 s timeout, 24 h UserSig.
    pub fn new(sdkappid: u64, identifier: impl Into<String>, secret_key: SecretString) -> Self {
        ClientConfig {
            sdkappid,
            identifier: identifier.into(),
            secret_key,
            base_url: None,
            region: Region::China,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            usersig_validity: DEFAULT_USERSIG_VALIDITY,
        }
    }

    /// The base URL requests go to: `base_url`, else the region's primary domain.
    pub fn effective_base_url(&self) -> String {
        self.base_url
            .clone()
            .unwrap_or_else(|| self.region.base_url())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_names_roundtrip() {
        for r in Region::ALL {
            assert_eq!(r.name().parse::<Region>(), Ok(r));
            assert!(r.base_url().starts_with("https://"));
        }
        assert_eq!(
            "Silicon-Valley".parse::<Region>(),
            Ok(Region::SiliconValley)
        );
        assert!("mars".parse::<Region>().is_err());
    }
}
