//! JWT-shaped tokens that the fake mints and later checks.
//!
//! Each token is `base64url(header).base64url(payload).base64url(signature)`, like the tokens
//! Entra ID and ACR issue. The header names RS256 because real Azure tokens use it, but the
//! signature is a SHA-256 digest of a per-instance random key and the signing input. That lets
//! the fake reject tokens it did not mint (including those of an earlier fake instance) without
//! real keys. No client may verify these signatures.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};

/// A kind of token the fake issues, each with its own lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// The Entra ID access token that IMDS returns for a managed identity.
    ImdsAccessToken,
    /// The Entra ID access token that the v2.0 token endpoint returns for a client assertion.
    EntraAccessToken,
    /// The ACR refresh token returned by `/oauth2/exchange`.
    AcrRefreshToken,
    /// The scoped ACR access token returned by `/oauth2/token`.
    AcrAccessToken,
}

impl TokenKind {
    /// Every kind of token, in a stable order.
    pub const ALL: [TokenKind; 4] = [
        TokenKind::ImdsAccessToken,
        TokenKind::EntraAccessToken,
        TokenKind::AcrRefreshToken,
        TokenKind::AcrAccessToken,
    ];

    /// Returns the name used in the admin API.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::ImdsAccessToken => "imds_access_token",
            TokenKind::EntraAccessToken => "entra_access_token",
            TokenKind::AcrRefreshToken => "acr_refresh_token",
            TokenKind::AcrAccessToken => "acr_access_token",
        }
    }
}

/// Lifetimes of the tokens the fake issues.
///
/// The defaults follow what Azure issues: about 24 h for managed identity tokens, about 1 h for
/// client credential tokens, 3 h for ACR refresh tokens and 75 min for ACR access tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenLifetimes {
    /// Lifetime of tokens returned by IMDS.
    pub imds_access_token: Duration,
    /// Lifetime of tokens returned by the Entra ID token endpoint.
    pub entra_access_token: Duration,
    /// Lifetime of ACR refresh tokens.
    pub acr_refresh_token: Duration,
    /// Lifetime of ACR access tokens.
    pub acr_access_token: Duration,
}

impl Default for TokenLifetimes {
    fn default() -> Self {
        Self {
            imds_access_token: Duration::from_secs(86_399),
            entra_access_token: Duration::from_secs(3_599),
            acr_refresh_token: Duration::from_hours(3),
            acr_access_token: Duration::from_mins(75),
        }
    }
}

impl TokenLifetimes {
    /// Returns the lifetime of one kind of token.
    #[must_use]
    pub fn get(&self, kind: TokenKind) -> Duration {
        match kind {
            TokenKind::ImdsAccessToken => self.imds_access_token,
            TokenKind::EntraAccessToken => self.entra_access_token,
            TokenKind::AcrRefreshToken => self.acr_refresh_token,
            TokenKind::AcrAccessToken => self.acr_access_token,
        }
    }

    /// Sets the lifetime of one kind of token.
    pub fn set(&mut self, kind: TokenKind, lifetime: Duration) {
        match kind {
            TokenKind::ImdsAccessToken => self.imds_access_token = lifetime,
            TokenKind::EntraAccessToken => self.entra_access_token = lifetime,
            TokenKind::AcrRefreshToken => self.acr_refresh_token = lifetime,
            TokenKind::AcrAccessToken => self.acr_access_token = lifetime,
        }
    }
}

/// The reason a presented token was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenRejection {
    /// The token is not three base64url parts with a JSON payload.
    Malformed,
    /// The signature does not match, so this fake instance did not mint the token.
    BadSignature,
    /// The token's `exp` claim is in the past.
    Expired,
}

/// Mints and checks tokens with one random key per fake instance.
pub(crate) struct TokenSigner {
    key: [u8; 32],
}

impl TokenSigner {
    pub(crate) fn new() -> Self {
        Self {
            key: rand::random(),
        }
    }

    /// Mints a token with the given claims plus `iat`, `nbf`, `exp` and a unique `jti`.
    pub(crate) fn mint(&self, mut claims: Map<String, Value>, lifetime: Duration) -> String {
        let now = unix_now();
        claims.insert("iat".into(), json!(now));
        claims.insert("nbf".into(), json!(now));
        claims.insert("exp".into(), json!(now + lifetime.as_secs()));
        claims.insert("jti".into(), json!(random_id()));

        let header = json!({"alg": "RS256", "typ": "JWT", "kid": "acrpull-fake-azure"});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(Value::Object(claims).to_string()),
        );
        let signature = self.sign(&signing_input);
        format!("{signing_input}.{signature}")
    }

    /// Checks that this instance minted `token` and that it has not expired, and returns its
    /// claims.
    pub(crate) fn verify(&self, token: &str) -> Result<Map<String, Value>, TokenRejection> {
        let (signing_input, signature) = token.rsplit_once('.').ok_or(TokenRejection::Malformed)?;
        let claims = decode_claims(token).map_err(|_| TokenRejection::Malformed)?;
        if self.sign(signing_input) != signature {
            return Err(TokenRejection::BadSignature);
        }
        let expires_at = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or(TokenRejection::Malformed)?;
        if expires_at <= unix_now() {
            return Err(TokenRejection::Expired);
        }
        Ok(claims)
    }

    fn sign(&self, signing_input: &str) -> String {
        let mut digest = Sha256::new();
        digest.update(self.key);
        digest.update(signing_input.as_bytes());
        URL_SAFE_NO_PAD.encode(digest.finalize())
    }
}

/// Decodes the payload of a JWT-shaped token without checking its signature.
///
/// Works on the tokens this fake mints and on Kubernetes `ServiceAccount` tokens.
///
/// # Errors
/// Fails if the token does not have three dot-separated parts or its payload is not base64url
/// JSON object.
pub fn decode_claims(token: &str) -> anyhow::Result<Map<String, Value>> {
    let parts: Vec<&str> = token.split('.').collect();
    let [_, payload, _] = parts.as_slice() else {
        bail!(
            "a JWT must have 3 dot-separated parts, this one has {}",
            parts.len()
        );
    };
    let payload = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .context("the JWT payload is not base64url")?;
    let claims: Value = serde_json::from_slice(&payload).context("the JWT payload is not JSON")?;
    match claims {
        Value::Object(map) => Ok(map),
        _ => bail!("the JWT payload is JSON but not an object"),
    }
}

/// Returns the current time in seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Returns a random 128-bit identifier in base64url, the form Entra ID uses for `uti`.
pub(crate) fn random_id() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
}

/// Returns a GUID-shaped string derived from `seed`, so one input always maps to one ID.
pub(crate) fn derived_guid(seed: &str) -> String {
    let digest = Sha256::digest(seed.as_bytes());
    let mut hex = String::with_capacity(32);
    for byte in digest.iter().take(16) {
        // `fmt::Write` for `String` always returns `Ok`.
        let _ = write!(hex, "{byte:02x}");
    }
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_token_verifies() {
        let signer = TokenSigner::new();
        let mut claims = Map::new();
        claims.insert("appid".into(), json!("client"));
        let token = signer.mint(claims, Duration::from_mins(1));

        let verified = signer.verify(&token).unwrap();
        assert_eq!(verified["appid"], "client");
        assert!(verified["exp"].as_u64().unwrap() > unix_now());
        assert_eq!(decode_claims(&token).unwrap()["appid"], "client");
    }

    #[test]
    fn other_instance_token_rejected() {
        let token = TokenSigner::new().mint(Map::new(), Duration::from_mins(1));
        let result = TokenSigner::new().verify(&token);
        assert_eq!(result, Err(TokenRejection::BadSignature));
    }

    #[test]
    fn expired_token_rejected() {
        let signer = TokenSigner::new();
        let token = signer.mint(Map::new(), Duration::ZERO);
        assert_eq!(signer.verify(&token), Err(TokenRejection::Expired));
    }

    #[test]
    fn garbage_token_rejected() {
        let signer = TokenSigner::new();
        assert_eq!(signer.verify("not-a-jwt"), Err(TokenRejection::Malformed));
        assert_eq!(signer.verify("a.b.c"), Err(TokenRejection::Malformed));
    }

    #[test]
    fn derived_guid_is_stable() {
        let guid = derived_guid("seed");
        assert_eq!(guid, derived_guid("seed"));
        assert_eq!(guid.len(), 36);
        assert_ne!(guid, derived_guid("other"));
    }
}
