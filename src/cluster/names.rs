//! Labels, annotations and other names this controller puts on Kubernetes objects.

/// Label on every Secret this controller manages. The value is the binding's name, or a hash
/// of it when the name is longer than a label value may be. The watch selects on it.
pub const BINDING_LABEL: &str = "acr.microsoft.com/binding";

/// Standard label naming the tool that manages an object.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "acrpull";

/// Annotation with the token's expiry, RFC 3339.
pub const EXPIRY_ANNOTATION: &str = "acrpull.microsoft.com/token-expiry";

/// Annotation with the time the token was written, RFC 3339.
pub const REFRESHED_ANNOTATION: &str = "acrpull.microsoft.com/last-refresh";

/// Annotation with the hash of the token's inputs (server, identity, scope).
pub const INPUTS_HASH_ANNOTATION: &str = "acrpull.microsoft.com/inputs-hash";

/// Finalizer that keeps a binding until its ServiceAccount reference and Secret are removed.
pub const FINALIZER: &str = "msi-acrpull.microsoft.com/finalizer";

/// Field manager for server-side apply and the manager name in managedFields.
pub const FIELD_MANAGER: &str = "acrpull";

/// Username written with every registry token, as the registry expects for token logins.
pub const TOKEN_USERNAME: &str = "00000000-0000-0000-0000-000000000000";

/// Maximum length of a label value.
const MAX_LABEL_VALUE_LEN: usize = 63;

/// Returns the [`BINDING_LABEL`] value for a binding name.
#[must_use]
pub fn binding_label_value(binding: &str) -> String {
    use std::fmt::Write as _;

    use sha2::{Digest, Sha256};

    if binding.len() <= MAX_LABEL_VALUE_LEN {
        return binding.to_owned();
    }
    let digest = Sha256::digest(binding.as_bytes());
    let hex = digest[..8].iter().fold(String::new(), |mut out, byte| {
        let _ = write!(out, "{byte:02x}");
        out
    });
    let keep = MAX_LABEL_VALUE_LEN - hex.len() - 1;
    let prefix = binding[..keep].trim_end_matches(['-', '.']);
    format!("{prefix}-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_value_keeps_short_names() {
        assert_eq!(binding_label_value("app"), "app");
    }

    #[test]
    fn label_value_hashes_long_names() {
        let long = "a".repeat(100);
        let value = binding_label_value(&long);
        assert!(value.len() <= MAX_LABEL_VALUE_LEN);
        assert_ne!(value, binding_label_value(&"a".repeat(101)));
    }
}
