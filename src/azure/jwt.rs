//! Reads the claims that the controller needs from a JWT, without verifying its signature.
//!
//! The tokens come straight from Azure over TLS and are only passed on to the registry, so the
//! controller has no key to verify them with and no reason to: it only needs their lifetime.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jiff::Timestamp;
use serde::Deserialize;

/// The claims the controller reads.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Expiry, in seconds since the Unix epoch.
    pub exp: Option<i64>,
    /// Issue time, in seconds since the Unix epoch.
    pub iat: Option<i64>,
    /// Entra tenant ID, sent to the registry's exchange endpoint.
    pub tid: Option<String>,
}

/// Errors reading a token's claims. The messages never contain the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClaimsError {
    /// The token does not have three dot-separated parts.
    #[error("the token is not a JWT (expected three dot-separated parts)")]
    NotJwt,
    /// The payload is not base64url-encoded JSON.
    #[error("the token's payload is not base64url-encoded JSON")]
    InvalidPayload,
    /// The payload has no usable `exp` claim.
    #[error("the token has no valid exp claim")]
    MissingExpiry,
}

/// Decodes the payload of a JWT.
///
/// # Errors
/// Returns [`ClaimsError`] when the token is not a JWT or its payload is not JSON.
pub fn read_claims(token: &str) -> Result<Claims, ClaimsError> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ClaimsError::NotJwt);
    };

    let bytes = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| ClaimsError::InvalidPayload)?;
    serde_json::from_slice(&bytes).map_err(|_| ClaimsError::InvalidPayload)
}

/// Returns the validity window `(issued_at, expires_at)` of a JWT. A token without `iat` counts
/// as issued at `now`.
///
/// # Errors
/// Returns [`ClaimsError`] when the token is not a JWT or has no valid `exp`.
pub fn validity(token: &str, now: Timestamp) -> Result<(Timestamp, Timestamp), ClaimsError> {
    let claims = read_claims(token)?;
    let expires_at = claims
        .exp
        .and_then(|exp| Timestamp::from_second(exp).ok())
        .ok_or(ClaimsError::MissingExpiry)?;
    let issued_at = claims
        .iat
        .and_then(|iat| Timestamp::from_second(iat).ok())
        .filter(|iat| *iat <= expires_at)
        .unwrap_or(now);
    Ok((issued_at, expires_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        format!(
            "eyJhbGciOiJub25lIn0.{}.c2ln",
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    #[test]
    fn validity_reads_exp_and_iat() {
        let token = jwt(r#"{"exp":2000,"iat":1000,"tid":"t"}"#);
        let (issued, expires) = validity(&token, Timestamp::UNIX_EPOCH).unwrap();
        assert_eq!(issued.as_second(), 1000);
        assert_eq!(expires.as_second(), 2000);
        assert_eq!(read_claims(&token).unwrap().tid.as_deref(), Some("t"));
    }

    #[test]
    fn validity_without_iat_uses_now() {
        let now = Timestamp::from_second(1500).unwrap();
        let (issued, _) = validity(&jwt(r#"{"exp":2000}"#), now).unwrap();
        assert_eq!(issued, now);
    }

    #[test]
    fn invalid_tokens_are_rejected() {
        let cases = [
            ("abc", ClaimsError::NotJwt),
            ("a.b.c.d", ClaimsError::NotJwt),
            ("a.!!!.c", ClaimsError::InvalidPayload),
            (&*jwt("not json"), ClaimsError::InvalidPayload),
            (&*jwt(r#"{"iat":1}"#), ClaimsError::MissingExpiry),
        ];
        for (token, expected) in cases {
            assert_eq!(
                validity(token, Timestamp::UNIX_EPOCH),
                Err(expected),
                "{token}"
            );
        }
    }
}
