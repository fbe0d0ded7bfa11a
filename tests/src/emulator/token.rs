//! Tokens the emulator mints. Listeners parse the admin token as a JWT *without verifying it*
//! and refresh when `exp` is near (reference §1.6), so it must be a well-formed JWT with a
//! real `exp`. The emulator itself never trusts the contents: it validates every token by
//! looking it up in its own table, so the signature is random bytes.

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
    fn opaque_tokens_are_not_jwts() {
        assert!(!looks_like_jwt(&opaque("ghs_")));
        assert!(parse_unverified("a.b").is_none());
    }
}
