//! UserSig v2 (TLSSigAPIv2, HMAC-SHA256): generation and verification.
//!
//! Role: [`gen_usersig`] builds the credential the REST client puts into every request's query
//! string; [`verify_usersig`] decodes and checks one, the way Tencent's own verifier does, so the
//! simulator can answer 70001/70009/70013/70014 like the real service.
//!
//! The algorithm follows the official `tls-sig-api-v2` libraries byte for byte: HMAC-SHA256 with
//! the console key's UTF-8 bytes over
//! `"TLS.identifier:{id}\nTLS.sdkappid:{app}\nTLS.time:{t}\nTLS.expire:{e}\n"`, standard base64
//! of the digest as `TLS.sig`, a JSON document with `TLS.ver` = `"2.0"`, zlib compression, and
//! base64 with `+` → `*`, `/` → `-`, `=` → `_`.
//!
//! Stopping and recovery: everything here is a pure function of its inputs (the clock is a
//! parameter), holds no state and cannot hang. Decoding untrusted input never panics: malformed
//! input is a [`UserSigError::Malformed`], and decompression is capped at [`MAX_DECODED_LEN`].
//! Neither the key nor the signature ever appears in an error or in `Debug` output.

use std::fmt;
use std::io::{Read, Write};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_PAD_INDIFFERENT};
use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The `TLS.ver` value of UserSig v2.
pub const USERSIG_VERSION: &str = "2.0";

/// Upper bound on the decompressed JSON document of a UserSig; anything larger is malformed.
pub const MAX_DECODED_LEN: u64 = 16 * 1024;

/// Why a UserSig was rejected.
///
/// The variants mirror what Tencent answers: `Malformed` ~ 70003, `BadSignature` ~ 70009 (a key
/// of another app), `WrongSdkAppId` ~ 70014, `WrongIdentifier` ~ 70013, `Expired` ~ 70001.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserSigError {
    /// Not valid base64, zlib or JSON, or a required field is missing.
    #[error("malformed UserSig: {0}")]
    Malformed(String),
    /// The signature does not match: made with another key, or the fields were altered.
    #[error("UserSig signature does not match (wrong secret key?)")]
    BadSignature,
    /// Signed for another SDKAppID.
    #[error("UserSig was made for SDKAppID {found}, expected {expected}")]
    WrongSdkAppId { expected: u64, found: u64 },
    /// Signed for another identifier.
    #[error("UserSig was made for identifier {found:?}, expected {expected:?}")]
    WrongIdentifier { expected: String, found: String },
    /// Valid but past `TLS.time + TLS.expire`.
    #[error("UserSig expired at {expired_at} (now {now})")]
    Expired { expired_at: u64, now: u64 },
}

impl UserSigError {
    /// The Tencent error code a server answers for this failure.
    pub fn tencent_code(&self) -> i64 {
        match self {
            UserSigError::Malformed(_) => 70003,
            UserSigError::BadSignature => 70009,
            UserSigError::WrongSdkAppId { .. } => 70014,
            UserSigError::WrongIdentifier { .. } => 70013,
            UserSigError::Expired { .. } => 70001,
        }
    }
}

/// The JSON document inside a UserSig (field names as Tencent writes them).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decoded {
    #[serde(rename = "TLS.ver")]
    pub ver: String,
    #[serde(rename = "TLS.identifier")]
    pub identifier: String,
    #[serde(rename = "TLS.sdkappid")]
    pub sdkappid: u64,
    #[serde(rename = "TLS.time")]
    pub time: u64,
    /// Validity in seconds after `time`. The Go library omits it when 0, hence the default.
    #[serde(rename = "TLS.expire", default)]
    pub expire: u64,
    /// Standard base64 of the HMAC-SHA256 digest. Treat as a credential.
    #[serde(rename = "TLS.sig")]
    pub sig: String,
}

impl Decoded {
    /// Unix second after which the UserSig is expired.
    pub fn expires_at(&self) -> u64 {
        self.time.saturating_add(self.expire)
    }
}

impl fmt::Debug for Decoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoded")
            .field("ver", &self.ver)
            .field("identifier", &self.identifier)
            .field("sdkappid", &self.sdkappid)
            .field("time", &self.time)
            .field("expire", &self.expire)
            .field("sig", &"<redacted>")
            .finish()
    }
}

/// The exact string that is signed.
pub fn signed_string(sdkappid: u64, identifier: &str, time: u64, expire: u64) -> String {
    format!(
        "TLS.identifier:{identifier}\nTLS.sdkappid:{sdkappid}\nTLS.time:{time}\nTLS.expire:{expire}\n"
    )
}

fn mac_for(key: &str, sdkappid: u64, identifier: &str, time: u64, expire: u64) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(signed_string(sdkappid, identifier, time, expire).as_bytes());
    mac
}

/// `TLS.sig`: standard base64 of HMAC-SHA256(key, signed string). `key` is the console key as
/// text (its UTF-8 bytes are the HMAC key; it is not hex-decoded).
pub fn tls_sig(key: &str, sdkappid: u64, identifier: &str, time: u64, expire: u64) -> String {
    let digest = mac_for(key, sdkappid, identifier, time, expire)
        .finalize()
        .into_bytes();
    STANDARD.encode(digest)
}

/// A UserSig for `identifier` in `sdkappid`, issued at Unix second `time`, valid `expire` seconds.
pub fn gen_usersig(key: &str, sdkappid: u64, identifier: &str, time: u64, expire: u64) -> String {
    let doc = Decoded {
        ver: USERSIG_VERSION.to_owned(),
        identifier: identifier.to_owned(),
        sdkappid,
        time,
        expire,
        sig: tls_sig(key, sdkappid, identifier, time, expire),
    };
    // Serializing a struct of strings and integers cannot fail.
    let json = serde_json::to_vec(&doc).expect("UserSig document serializes");
    let mut enc = ZlibEncoder::new(Vec::with_capacity(json.len()), Compression::default());
    // Writing into a Vec cannot fail.
    enc.write_all(&json).expect("zlib into a Vec");
    let compressed = enc.finish().expect("zlib into a Vec");
    to_url_safe(&STANDARD.encode(compressed))
}

fn to_url_safe(b64: &str) -> String {
    b64.chars()
        .map(|c| match c {
            '+' => '*',
            '/' => '-',
            '=' => '_',
            other => other,
        })
        .collect()
}

fn from_url_safe(sig: &str) -> String {
    sig.chars()
        .map(|c| match c {
            '*' => '+',
            '-' => '/',
            '_' => '=',
            other => other,
        })
        .collect()
}

/// Decode a UserSig into its JSON document without checking the signature.
pub fn decode_usersig(usersig: &str) -> Result<Decoded, UserSigError> {
    let trimmed = usersig.trim();
    if trimmed.is_empty() {
        return Err(UserSigError::Malformed("empty".into()));
    }
    let compressed = STANDARD_PAD_INDIFFERENT
        .decode(from_url_safe(trimmed))
        .map_err(|e| UserSigError::Malformed(format!("base64: {e}")))?;
    let mut json = Vec::new();
    ZlibDecoder::new(compressed.as_slice())
        .take(MAX_DECODED_LEN + 1)
        .read_to_end(&mut json)
        .map_err(|e| UserSigError::Malformed(format!("zlib: {e}")))?;
    if json.len() as u64 > MAX_DECODED_LEN {
        return Err(UserSigError::Malformed("document too large".into()));
    }
    let doc: Decoded =
        serde_json::from_slice(&json).map_err(|e| UserSigError::Malformed(format!("json: {e}")))?;
    if doc.ver != USERSIG_VERSION {
        return Err(UserSigError::Malformed(format!(
            "TLS.ver {:?} is not {USERSIG_VERSION:?}",
            doc.ver
        )));
    }
    Ok(doc)
}

/// Decode and verify a UserSig the way Tencent does.
///
/// Checks, in order: well-formed, SDKAppID, identifier, signature (constant-time), expiry
/// (`now > time + expire` is expired). Returns the decoded document on success.
pub fn verify_usersig(
    usersig: &str,
    key: &str,
    sdkappid: u64,
    identifier: &str,
    now: u64,
) -> Result<Decoded, UserSigError> {
    let doc = decode_usersig(usersig)?;
    if doc.sdkappid != sdkappid {
        return Err(UserSigError::WrongSdkAppId {
            expected: sdkappid,
            found: doc.sdkappid,
        });
    }
    if doc.identifier != identifier {
        return Err(UserSigError::WrongIdentifier {
            expected: identifier.to_owned(),
            found: doc.identifier.clone(),
        });
    }
    let claimed = STANDARD_PAD_INDIFFERENT
        .decode(doc.sig.as_bytes())
        .map_err(|_| UserSigError::BadSignature)?;
    mac_for(key, doc.sdkappid, &doc.identifier, doc.time, doc.expire)
        .verify_slice(&claimed)
        .map_err(|_| UserSigError::BadSignature)?;
    if now > doc.expires_at() {
        return Err(UserSigError::Expired {
            expired_at: doc.expires_at(),
            now,
        });
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_errors() {
        let sig = gen_usersig("k", 1, "admin", 100, 50);
        assert!(!sig.contains(['+', '/', '=']));
        let d = verify_usersig(&sig, "k", 1, "admin", 150).expect("valid");
        assert_eq!(d.expires_at(), 150);
        assert_eq!(
            verify_usersig(&sig, "k", 1, "admin", 151),
            Err(UserSigError::Expired {
                expired_at: 150,
                now: 151
            })
        );
        assert_eq!(
            verify_usersig(&sig, "other", 1, "admin", 100),
            Err(UserSigError::BadSignature)
        );
        assert!(matches!(
            verify_usersig(&sig, "k", 2, "admin", 100),
            Err(UserSigError::WrongSdkAppId { .. })
        ));
        assert!(matches!(
            verify_usersig(&sig, "k", 1, "bob", 100),
            Err(UserSigError::WrongIdentifier { .. })
        ));
        assert!(matches!(
            verify_usersig("!!not base64", "k", 1, "admin", 100),
            Err(UserSigError::Malformed(_))
        ));
        assert!(!format!("{d:?}").contains(&d.sig));
    }
}
