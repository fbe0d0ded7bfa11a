//! Tokens the emulator mints. Listeners parse the admin token as a JWT *without verifying it*
//! and refresh when `exp` is near (reference §1.6), so it must be a well-formed JWT with a
//! real `exp`. The emulator itself never trusts the contents: it validates every token by
//! looking it up in its own table, so the signature is random bytes.
//!
//! GitHub App JWTs are the exception: GitHub verifies them (RS256, `iat`, `exp` at most ten
//! minutes after `iat`, a known `iss`), so [`verify_app_jwt`] does too, with `ring`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rand::RngCore;
use serde::Deserialize;

/// Claims the emulator puts in its JWTs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
}

/// A JWT (`HS256` header, random signature) for `sub`, valid until `exp` (unix seconds).
pub fn mint_jwt(sub: &str, iat: i64, exp: i64) -> String {
    let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = serde_json::json!({
        "iss": "arcfed-actions-emulator",
        "sub": sub,
        "iat": iat,
        "nbf": iat,
        "exp": exp,
        "jti": uuid::Uuid::new_v4().to_string(),
    });
    let payload = B64.encode(claims.to_string());
    let mut sig = [0u8; 32];
    rand::rng().fill_bytes(&mut sig);
    format!("{header}.{payload}.{}", B64.encode(sig))
}

/// An installation token in GitHub's 2026 form: a JWT of about 520 characters.
pub fn installation_jwt(installation: &str, iat: i64, exp: i64) -> String {
    let header = B64.encode(br#"{"alg":"RS256","typ":"JWT","kid":"actions-emulator-installation-key-1"}"#);
    let claims = serde_json::json!({
        "iss": "https://github.localhost",
        "sub": format!("installation:{installation}"),
        "aud": "api.github.localhost",
        "iat": iat,
        "nbf": iat,
        "exp": exp,
        "jti": uuid::Uuid::new_v4().to_string(),
        "permissions": {"administration": "write", "organization_self_hosted_runners": "write"},
    });
    let payload = B64.encode(claims.to_string());
    let mut sig = [0u8; 96];
    rand::rng().fill_bytes(&mut sig);
    format!("{header}.{payload}.{}", B64.encode(sig))
}

/// Reads a JWT's claims without verifying it, as the Go clients do. `None` if it is not a JWT.
pub fn parse_unverified(token: &str) -> Option<Claims> {
    let mut parts = token.split('.');
    let (_h, p, _s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = B64.decode(p.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether `token` has the shape of a JWT (three base64url segments). The App installation
/// endpoint accepts any such token, since the emulator has no App private keys to check.
pub fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts[..2].iter().all(|p| !p.is_empty())
        && parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'='))
}

/// Why an App JWT is refused; each is GitHub's 401 with this message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AppJwtError {
    #[error("A JSON web token could not be decoded")]
    Undecodable,
    #[error("'Issued at' claim ('iat') must be an Integer representing the time that the assertion was issued")]
    BadIat,
    #[error(
        "'Expiration time' claim ('exp') must be a numeric value representing the future time at which the assertion expires"
    )]
    Expired,
    #[error("'Expiration time' claim ('exp') is too far in the future")]
    TooLong,
    #[error("'Issuer' claim ('iss') does not name a GitHub App on this server")]
    UnknownIssuer,
}

/// How far in the future `iat` may be (clock skew between the client and the emulator).
pub const APP_JWT_SKEW_S: i64 = 30;

/// Checks an App JWT as GitHub does: header `alg` RS256, a valid RS256 signature by the App's
/// key, numeric `iat` not in the future, numeric `exp` after `now` and at most 600 s after
/// `iat`, and `iss` (string or number) equal to `app_id`. Returns the issuer.
pub fn verify_app_jwt(token: &str, app_id: &str, rsa_public_key: &[u8], now_s: i64) -> Result<String, AppJwtError> {
    use AppJwtError::*;
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(Undecodable);
    };
    let header: serde_json::Value =
        B64.decode(h).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or(Undecodable)?;
    if header["alg"] != "RS256" {
        return Err(Undecodable);
    }
    let claims: serde_json::Value =
        B64.decode(p).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or(Undecodable)?;
    let iss = match &claims["iss"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => return Err(UnknownIssuer),
    };
    if iss != app_id {
        return Err(UnknownIssuer);
    }
    let sig = B64.decode(sig).map_err(|_| Undecodable)?;
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, rsa_public_key);
    key.verify(format!("{h}.{p}").as_bytes(), &sig).map_err(|_| Undecodable)?;
    let iat = claims["iat"].as_i64().ok_or(BadIat)?;
    if iat > now_s + APP_JWT_SKEW_S {
        return Err(BadIat);
    }
    let exp = claims["exp"].as_i64().ok_or(Expired)?;
    if exp <= now_s {
        return Err(Expired);
    }
    if exp - iat > 600 {
        return Err(TooLong);
    }
    Ok(iss)
}

/// Signs an App JWT (RS256) as ARC does (reference §1.2), with a PKCS#8 RSA private key.
pub fn sign_app_jwt(pkcs8_der: &[u8], iss: &str, iat: i64, exp: i64) -> Result<String, String> {
    let kp = ring::signature::RsaKeyPair::from_pkcs8(pkcs8_der).map_err(|e| format!("RSA key: {e}"))?;
    let header = B64.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = B64.encode(serde_json::json!({"iat": iat, "exp": exp, "iss": iss}).to_string());
    let input = format!("{header}.{claims}");
    let mut sig = vec![0u8; kp.public().modulus_len()];
    kp.sign(&ring::signature::RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), input.as_bytes(), &mut sig)
        .map_err(|e| format!("signing: {e}"))?;
    Ok(format!("{input}.{}", B64.encode(sig)))
}

/// The DER `RSAPublicKey` in a PEM file: a `PUBLIC KEY` (SubjectPublicKeyInfo, what
/// `openssl pkey -pubout` writes), or, for convenience, the App's own private key (`RSA
/// PRIVATE KEY` as GitHub hands it out, or PKCS#8 `PRIVATE KEY`), whose public half is taken.
pub fn rsa_public_key_from_pem(pem: &[u8]) -> Result<Vec<u8>, String> {
    use rustls_pki_types::pem::SectionKind;
    let mut rd = pem;
    while let Some((kind, der)) = rustls_pki_types::pem::from_buf(&mut rd).map_err(|e| format!("PEM: {e}"))? {
        return match kind {
            SectionKind::PublicKey => spki_rsa(&der).map(<[u8]>::to_vec).ok_or_else(|| "not an RSA public key".into()),
            SectionKind::RsaPrivateKey => ring::signature::RsaKeyPair::from_der(&der)
                .map(|k| k.public().as_ref().to_vec())
                .map_err(|e| format!("RSA private key: {e}")),
            SectionKind::PrivateKey => ring::signature::RsaKeyPair::from_pkcs8(&der)
                .map(|k| k.public().as_ref().to_vec())
                .map_err(|e| format!("PKCS#8 RSA private key: {e}")),
            _ => continue,
        };
    }
    Err("no PUBLIC KEY, RSA PRIVATE KEY or PRIVATE KEY section".into())
}

/// One DER TLV: (tag, contents, rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&l0, rest) = rest.split_first()?;
    let (len, rest) = if l0 < 0x80 {
        (usize::from(l0), rest)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |a, &b| (a << 8) | usize::from(b)), &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// `SubjectPublicKeyInfo ::= SEQUENCE { algorithm, BIT STRING subjectPublicKey }` → the key.
fn spki_rsa(spki: &[u8]) -> Option<&[u8]> {
    let (0x30, seq, _) = der(spki)? else { return None };
    let (0x30, _alg, rest) = der(seq)? else { return None };
    let (0x03, bits, _) = der(rest)? else { return None };
    let (&0, key) = bits.split_first()? else { return None };
    Some(key)
}

/// An opaque random token with a recognisable prefix (installation, registration tokens).
pub fn opaque(prefix: &str) -> String {
    let mut b = [0u8; 24];
    rand::rng().fill_bytes(&mut b);
    format!("{prefix}{}", B64.encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_jwt_parses_with_its_exp() {
        let t = mint_jwt("pat:x", 100, 700);
        assert!(looks_like_jwt(&t));
        let c = parse_unverified(&t).unwrap();
        assert_eq!((c.sub.as_str(), c.iat, c.exp), ("pat:x", 100, 700));
    }

    #[test]
    fn installation_tokens_are_jwt_shaped_and_about_520_characters() {
        let t = installation_jwt("42", 1_700_000_000, 1_700_003_600);
        assert!(looks_like_jwt(&t), "{t}");
        assert!((450..=650).contains(&t.len()), "{} characters", t.len());
        assert_eq!(parse_unverified(&t).map(|c| c.exp), Some(1_700_003_600));
    }

    #[test]
    fn opaque_tokens_are_not_jwts() {
        assert!(!looks_like_jwt(&opaque("ghs_")));
        assert!(parse_unverified("a.b").is_none());
    }
}
