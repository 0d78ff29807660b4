//! Domain types shared by the state machine, the actors and the adapters.
//!
//! Nothing here depends on Kubernetes or HTTP: the adapters in the `acrpull` binary translate
//! API objects into these types and back.

use std::fmt;

use jiff::Timestamp;
use sha2::{Digest, Sha256};

/// Maximum length of a Kubernetes object name (a DNS subdomain).
pub const MAX_OBJECT_NAME_LEN: usize = 253;

/// Suffix of the Secret that a v1beta1 binding owns: `<binding>-msi-acrpull-secret`.
pub const V1BETA1_SECRET_SUFFIX: &str = "-msi-acrpull-secret";

/// The `namespace/name` address of one AcrPullBinding.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BindingKey {
    /// Namespace of the binding, its Secret and its ServiceAccount.
    pub namespace: String,
    /// Name of the binding.
    pub name: String,
}

impl BindingKey {
    /// Builds a key from a namespace and a name.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for BindingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The Azure managed identity that a binding uses, as IMDS addresses it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// User-assigned identity by client ID (IMDS query parameter `client_id`).
    ClientId(String),
    /// User-assigned identity by ARM resource ID (IMDS query parameter `msi_res_id`).
    ResourceId(String),
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::ClientId(id) => write!(f, "client ID {id}"),
            Identity::ResourceId(id) => write!(f, "resource ID {id}"),
        }
    }
}

/// A binding's spec after defaults are applied and every field is validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBinding {
    /// Registry host name, for example `example.azurecr.io`.
    pub acr_server: String,
    /// Identity whose Azure token is exchanged for the registry token.
    pub identity: Identity,
    /// Space-separated registry scopes; `None` stores the refresh token itself.
    pub scope: Option<String>,
    /// ServiceAccount whose `imagePullSecrets` receives the Secret.
    pub service_account: String,
    /// Name of the Secret that contains the pull credentials.
    pub secret_name: String,
}

impl DesiredBinding {
    /// Returns the hash of every input that changes the token, so that a changed spec is
    /// detected even after a restart (the hash is stored as a Secret annotation).
    #[must_use]
    pub fn inputs_hash(&self) -> InputsHash {
        let mut hasher = Sha256::new();
        hasher.update(self.acr_server.as_bytes());
        hasher.update([0]);
        match &self.identity {
            Identity::ClientId(id) => {
                hasher.update(b"client_id=");
                hasher.update(id.as_bytes());
            }
            Identity::ResourceId(id) => {
                hasher.update(b"msi_res_id=");
                hasher.update(id.as_bytes());
            }
        }
        hasher.update([0]);
        hasher.update(self.scope.as_deref().unwrap_or_default().as_bytes());
        let digest = hasher.finalize();
        InputsHash(hex(&digest[..16]))
    }

    /// Returns the request that the token source needs for this binding.
    #[must_use]
    pub fn token_request(&self) -> TokenRequest {
        TokenRequest {
            acr_server: self.acr_server.clone(),
            identity: self.identity.clone(),
            scope: self.scope.clone(),
        }
    }
}

/// Hex digest of a binding's token inputs (server, identity and scope).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InputsHash(pub String);

impl fmt::Display for InputsHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Inputs the token source needs to mint one registry token.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenRequest {
    /// Registry host name.
    pub acr_server: String,
    /// Identity to authenticate as.
    pub identity: Identity,
    /// Registry scope, or `None` for the refresh token.
    pub scope: Option<String>,
}

/// A registry token. Its `Debug` and `Display` never show the value, so it cannot reach a log
/// line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryToken(String);

impl RegistryToken {
    /// Wraps a token string.
    #[must_use]
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// Returns the token itself, for the one place that writes it into a Secret.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RegistryToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RegistryToken(<redacted>)")
    }
}

/// A registry token with the validity window read from its JWT claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedToken {
    /// The token written as the Secret's password.
    pub token: RegistryToken,
    /// When the token was issued (JWT `iat`, else the time it was received).
    pub issued_at: Timestamp,
    /// When the token stops working (JWT `exp`).
    pub expires_at: Timestamp,
}

/// Failure to issue a token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TokenError {
    /// Description of the failure, fit for a status field. It never contains a token.
    pub message: String,
    /// Whether trying again later may succeed (throttling, 5xx, timeouts).
    pub retryable: bool,
    /// Delay the server asked for (`Retry-After`), if any.
    pub retry_after: Option<std::time::Duration>,
}

/// Returns the Secret name for a v1beta1 binding: `<binding>-msi-acrpull-secret`.
///
/// A name longer than 253 characters keeps a prefix of the binding's name and adds a hash of
/// the whole name, so that the result stays valid, stable and unique.
#[must_use]
pub fn v1beta1_secret_name(binding: &str) -> String {
    let plain = format!("{binding}{V1BETA1_SECRET_SUFFIX}");
    if plain.len() <= MAX_OBJECT_NAME_LEN {
        return plain;
    }

    let digest = hex(&Sha256::digest(binding.as_bytes())[..8]);
    let keep = MAX_OBJECT_NAME_LEN - V1BETA1_SECRET_SUFFIX.len() - digest.len() - 1;
    // Binding names are ASCII, so any byte index is a character boundary.
    let prefix = binding[..keep].trim_end_matches(['-', '.']);
    format!("{prefix}-{digest}{V1BETA1_SECRET_SUFFIX}")
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;

    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(server: &str, identity: Identity, scope: Option<&str>) -> DesiredBinding {
        DesiredBinding {
            acr_server: server.to_owned(),
            identity,
            scope: scope.map(str::to_owned),
            service_account: "default".to_owned(),
            secret_name: "b-msi-acrpull-secret".to_owned(),
        }
    }

    #[test]
    fn inputs_hash_changes_with_each_input() {
        let base = binding("a.azurecr.io", Identity::ClientId("x".into()), None);
        let variants = [
            binding("b.azurecr.io", Identity::ClientId("x".into()), None),
            binding("a.azurecr.io", Identity::ClientId("y".into()), None),
            binding("a.azurecr.io", Identity::ResourceId("x".into()), None),
            binding(
                "a.azurecr.io",
                Identity::ClientId("x".into()),
                Some("repository:a:pull"),
            ),
        ];
        for variant in variants {
            assert_ne!(base.inputs_hash(), variant.inputs_hash(), "{variant:?}");
        }
    }

    #[test]
    fn inputs_hash_ignores_service_account() {
        let base = binding("a.azurecr.io", Identity::ClientId("x".into()), None);
        let mut other = base.clone();
        other.service_account = "builder".into();
        assert_eq!(base.inputs_hash(), other.inputs_hash());
    }

    #[test]
    fn secret_name_short_binding() {
        assert_eq!(v1beta1_secret_name("app"), "app-msi-acrpull-secret");
    }

    #[test]
    fn secret_name_long_binding_is_valid_and_unique() {
        let long_a = "a".repeat(250);
        let long_b = format!("{}b", "a".repeat(249));
        let name_a = v1beta1_secret_name(&long_a);
        let name_b = v1beta1_secret_name(&long_b);
        assert!(name_a.len() <= MAX_OBJECT_NAME_LEN);
        assert!(name_b.len() <= MAX_OBJECT_NAME_LEN);
        assert!(name_a.ends_with(V1BETA1_SECRET_SUFFIX));
        assert_ne!(name_a, name_b);
        assert_eq!(name_a, v1beta1_secret_name(&long_a));
    }

    #[test]
    fn token_debug_is_redacted() {
        let token = RegistryToken::new("eyJsecret".into());
        assert!(!format!("{token:?}").contains("eyJsecret"));
    }
}
