//! JWTs: the GitHub App's RS256 assertion (reference §1.2) and reading the admin token's `exp`
//! without verifying it (reference §1.6), as the Go clients do.

use super::error::Error;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

/// Parses an App private key: PKCS#1 (`BEGIN RSA PRIVATE KEY`) or PKCS#8 (`BEGIN PRIVATE KEY`).
pub(crate) fn parse_app_key(pem: &str) -> Result<RsaKeyPair, Error> {
    let bad = |why: String| Error::Config(format!("github_app_private_key: {why}"));
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| bad(format!("not a PEM private key ({e})")))?;
    match der {
        PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
        PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
        _ => return Err(bad("an RSA key is required (PKCS#1 or PKCS#8 PEM)".into())),
    }
    .map_err(|e| bad(format!("unusable RSA key ({e})")))
}

/// The App JWT: RS256, `iat` = now − 60 s (clock skew), `exp` = iat + 9 min (GitHub allows at
/// most 10), `iss` = the App ID or Client ID. `now` is unix seconds.
pub fn app_jwt(key: &RsaKeyPair, app_id: &str, now: i64) -> Result<String, Error> {
    let header = B64.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let iat = now - 60;
    let claims = serde_json::json!({ "iat": iat, "exp": iat + 9 * 60, "iss": app_id });
    let signing_input = format!("{header}.{}", B64.encode(claims.to_string()));
    let mut sig = vec![0u8; key.public().modulus_len()];
    key.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), signing_input.as_bytes(), &mut sig)
        .map_err(|_| Error::Config("github_app_private_key: RS256 signing failed".into()))?;
    Ok(format!("{signing_input}.{}", B64.encode(sig)))
}

/// The `exp` claim (unix seconds) of a JWT, read without verifying it. `None` if `token` is not
/// a JWT or has no numeric `exp`.
pub fn unverified_exp(token: &str) -> Option<i64> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = B64.decode(payload.trim_end_matches('=')).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = &v["exp"];
    exp.as_i64().or_else(|| exp.as_f64().map(|f| f as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_read_from_an_unverified_jwt() {
        let payload = B64.encode(br#"{"sub":"x","exp":1700000600}"#);
        assert_eq!(unverified_exp(&format!("e30.{payload}.c2ln")), Some(1_700_000_600));
        let float = B64.encode(br#"{"exp":12.0}"#);
        assert_eq!(unverified_exp(&format!("e30.{float}.c2ln")), Some(12));
        assert_eq!(unverified_exp("not-a-jwt"), None);
        assert_eq!(unverified_exp("a.b"), None);
        let no_exp = B64.encode(br#"{"sub":"x"}"#);
        assert_eq!(unverified_exp(&format!("e30.{no_exp}.c2ln")), None);
    }

    #[test]
    fn a_non_rsa_or_garbage_key_is_a_config_error_naming_the_key() {
        let e = parse_app_key("garbage").unwrap_err().to_string();
        assert!(e.contains("github_app_private_key"), "{e}");
        let e = parse_app_key("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap_err();
        assert!(e.to_string().contains("github_app_private_key"), "{e}");
    }
}
