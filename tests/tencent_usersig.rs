//! UserSig v2 against the official vectors: exact `TLS.sig`, decoding of the official UserSigs,
//! verification and each rejection reason.

use std::path::PathBuf;

use serde::Deserialize;
use timport::tencent::usersig::{
    Decoded, UserSigError, decode_usersig, gen_usersig, signed_string, tls_sig, verify_usersig,
};

#[derive(Deserialize)]
struct Vectors {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    sdkappid: u64,
    secret_key: String,
    identifier: String,
    time: u64,
    expire: u64,
    signed_string: String,
    tls_sig: String,
    usersig: String,
    decoded: serde_json::Value,
}

/// The copy in tests/data, else the shared file beside the checkout.
fn vectors() -> Vectors {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        root.join("tests/data/usersig-vectors.json"),
        root.join("../shared/usersig-vectors.json"),
    ];
    let path = candidates
        .iter()
        .find(|p| p.is_file())
        .expect("usersig-vectors.json in tests/data or ../shared");
    let text = std::fs::read_to_string(path).expect("read vectors");
    let v: Vectors = serde_json::from_str(&text).expect("parse vectors");
    assert!(!v.cases.is_empty());
    v
}

#[test]
fn tls_sig_matches_every_vector_exactly() {
    for c in vectors().cases {
        assert_eq!(
            signed_string(c.sdkappid, &c.identifier, c.time, c.expire),
            c.signed_string
        );
        assert_eq!(
            tls_sig(&c.secret_key, c.sdkappid, &c.identifier, c.time, c.expire),
            c.tls_sig,
            "case {}",
            c.identifier
        );
    }
}

#[test]
fn official_usersigs_decode_to_their_documents() {
    for c in vectors().cases {
        let d = decode_usersig(&c.usersig).expect("decodes");
        assert_eq!(serde_json::to_value(&d).expect("to json"), c.decoded);
        let expected: Decoded = serde_json::from_value(c.decoded.clone()).expect("typed");
        assert_eq!(d, expected);
    }
}

#[test]
fn official_usersigs_verify_and_report_each_failure() {
    for c in vectors().cases {
        let now = c.time + 1;
        let d = verify_usersig(&c.usersig, &c.secret_key, c.sdkappid, &c.identifier, now)
            .expect("official sig verifies");
        assert_eq!(d.sig, c.tls_sig);
        // Last valid second, then expired.
        let end = c.time + c.expire;
        assert!(verify_usersig(&c.usersig, &c.secret_key, c.sdkappid, &c.identifier, end).is_ok());
        assert_eq!(
            verify_usersig(
                &c.usersig,
                &c.secret_key,
                c.sdkappid,
                &c.identifier,
                end + 1
            ),
            Err(UserSigError::Expired {
                expired_at: end,
                now: end + 1
            })
        );
        assert_eq!(
            verify_usersig(&c.usersig, "wrong-key", c.sdkappid, &c.identifier, now),
            Err(UserSigError::BadSignature)
        );
        assert!(matches!(
            verify_usersig(
                &c.usersig,
                &c.secret_key,
                c.sdkappid + 1,
                &c.identifier,
                now
            ),
            Err(UserSigError::WrongSdkAppId { .. })
        ));
        assert!(matches!(
            verify_usersig(&c.usersig, &c.secret_key, c.sdkappid, "someone-else", now),
            Err(UserSigError::WrongIdentifier { .. })
        ));
        let mut truncated = c.usersig.clone();
        truncated.truncate(c.usersig.len() / 2);
        assert!(matches!(
            verify_usersig(&truncated, &c.secret_key, c.sdkappid, &c.identifier, now),
            Err(UserSigError::Malformed(_))
        ));
    }
}

#[test]
fn generated_usersigs_roundtrip_and_are_url_safe() {
    for c in vectors().cases {
        let sig = gen_usersig(&c.secret_key, c.sdkappid, &c.identifier, c.time, c.expire);
        assert!(
            sig.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"*-_".contains(&b)),
            "{sig}"
        );
        let d = decode_usersig(&sig).expect("decodes");
        assert_eq!(serde_json::to_value(&d).expect("to json"), c.decoded);
        verify_usersig(&sig, &c.secret_key, c.sdkappid, &c.identifier, c.time).expect("verifies");
    }
}

#[test]
fn tampered_fields_fail_the_signature() {
    let c = &vectors().cases[0];
    let forged = {
        // Re-sign nothing: reuse the official TLS.sig with a longer expiry.
        let mut d = decode_usersig(&c.usersig).expect("decodes");
        d.expire += 1;
        let json = serde_json::to_vec(&d).expect("json");
        let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut enc, &json).expect("zlib");
        let raw = enc.finish().expect("zlib");
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .encode(raw)
            .replace('+', "*")
            .replace('/', "-")
            .replace('=', "_")
    };
    assert_eq!(
        verify_usersig(&forged, &c.secret_key, c.sdkappid, &c.identifier, c.time),
        Err(UserSigError::BadSignature)
    );
}

#[test]
fn errors_and_debug_never_show_key_or_sig() {
    let c = &vectors().cases[0];
    let d = decode_usersig(&c.usersig).expect("decodes");
    assert!(!format!("{d:?}").contains(&c.tls_sig));
    for key in ["wrong-key", c.secret_key.as_str()] {
        if let Err(e) = verify_usersig(&c.usersig, key, c.sdkappid, &c.identifier, u64::MAX) {
            let text = format!("{e} {e:?}");
            assert!(!text.contains(&c.secret_key));
            assert!(!text.contains(&c.tls_sig));
            assert!(!text.contains(&c.usersig));
        }
    }
}
