//! Resolution of a v1beta1 binding spec: controller-wide defaults, then validation.
//!
//! Validation happens before any Azure call, so bad input never leaves the process.

use crate::model::{DesiredBinding, Identity, v1beta1_secret_name};

/// ServiceAccount used when the spec names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// The v1beta1 spec fields as written by the user, before defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawSpec {
    /// `spec.acrServer`.
    pub acr_server: Option<String>,
    /// `spec.managedIdentityResourceID`.
    pub managed_identity_resource_id: Option<String>,
    /// `spec.managedIdentityClientID`.
    pub managed_identity_client_id: Option<String>,
    /// `spec.scope`.
    pub scope: Option<String>,
    /// `spec.serviceAccountName`.
    pub service_account_name: Option<String>,
}

/// Controller-wide values used where the spec leaves a field empty (the `ACR_SERVER`,
/// `MANAGED_IDENTITY_RESOURCE_ID` and `MANAGED_IDENTITY_CLIENT_ID` environment variables).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Defaults {
    /// Default registry host name.
    pub acr_server: Option<String>,
    /// Default identity by resource ID.
    pub managed_identity_resource_id: Option<String>,
    /// Default identity by client ID; wins over the default resource ID.
    pub managed_identity_client_id: Option<String>,
}

/// Which registries a binding may name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistryPolicy {
    /// Host name suffixes a registry must end with, such as `.azurecr.io`. Empty allows any
    /// valid host name.
    pub allowed_suffixes: Vec<String>,
}

/// Why a binding's spec cannot be used. Each message names the field and the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSpec {
    /// No registry in the spec and no controller default.
    #[error(
        "spec.acrServer is missing and the controller has no default registry (--default-acr-server or ACR_SERVER): set spec.acrServer to the registry host name, for example myregistry.azurecr.io"
    )]
    MissingServer,
    /// The registry is not a valid DNS host name.
    #[error(
        "spec.acrServer {server:?} is not a valid host name: use the registry's login server, for example myregistry.azurecr.io, without scheme or path"
    )]
    InvalidServer {
        /// The rejected value.
        server: String,
    },
    /// The registry is outside the allowed suffixes.
    #[error(
        "spec.acrServer {server:?} is not allowed: this controller only sends tokens to registries ending in {allowed}"
    )]
    ServerNotAllowed {
        /// The rejected value.
        server: String,
        /// The allowed suffixes, comma-separated.
        allowed: String,
    },
    /// No identity in the spec and no controller default.
    #[error(
        "no managed identity: set spec.managedIdentityClientID or spec.managedIdentityResourceID, or give the controller a default identity (--default-managed-identity-client-id or MANAGED_IDENTITY_CLIENT_ID, --default-managed-identity-resource-id or MANAGED_IDENTITY_RESOURCE_ID)"
    )]
    MissingIdentity,
    /// Both identity fields are set in the spec.
    #[error(
        "spec.managedIdentityClientID and spec.managedIdentityResourceID are both set: keep only one"
    )]
    AmbiguousIdentity,
    /// The resource ID does not look like an ARM user-assigned identity ID.
    #[error(
        "spec.managedIdentityResourceID {resource_id:?} is not a user-assigned identity resource ID: expected /subscriptions/<id>/resourceGroups/<group>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>"
    )]
    InvalidResourceId {
        /// The rejected value.
        resource_id: String,
    },
    /// The client ID is not a GUID.
    #[error(
        "spec.managedIdentityClientID {client_id:?} is not a GUID: use the identity's client ID, for example 00000000-0000-0000-0000-000000000000"
    )]
    InvalidClientId {
        /// The rejected value.
        client_id: String,
    },
    /// A scope entry is not `repository:<name>:<actions>` or `registry:catalog:*`.
    #[error(
        "spec.scope entry {entry:?} is invalid: expected space-separated entries such as repository:myapp:pull"
    )]
    InvalidScope {
        /// The rejected entry.
        entry: String,
    },
    /// The ServiceAccount name is not a valid object name.
    #[error(
        "spec.serviceAccountName {name:?} is not a valid ServiceAccount name: use lowercase letters, digits, '-' and '.'"
    )]
    InvalidServiceAccount {
        /// The rejected value.
        name: String,
    },
}

/// Applies defaults to a v1beta1 spec and validates it.
///
/// A value written in the spec always wins over a controller default; among the defaults a
/// client ID wins over a resource ID.
///
/// # Errors
/// Returns the first [`InvalidSpec`] found, checking the server, then the identity, the scope
/// and the ServiceAccount.
pub fn resolve_v1beta1(
    binding_name: &str,
    raw: &RawSpec,
    defaults: &Defaults,
    policy: &RegistryPolicy,
) -> Result<DesiredBinding, InvalidSpec> {
    let acr_server = non_empty(raw.acr_server.as_deref())
        .or(non_empty(defaults.acr_server.as_deref()))
        .ok_or(InvalidSpec::MissingServer)?
        .to_ascii_lowercase();
    validate_server(&acr_server, policy)?;

    let identity = resolve_identity(raw, defaults)?;

    let scope = non_empty(raw.scope.as_deref()).map(normalize_scope);
    if let Some(scope) = &scope {
        validate_scope(scope)?;
    }

    let service_account = non_empty(raw.service_account_name.as_deref())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT)
        .to_owned();
    if !is_dns_subdomain(&service_account) {
        return Err(InvalidSpec::InvalidServiceAccount {
            name: service_account,
        });
    }

    Ok(DesiredBinding {
        acr_server,
        identity,
        scope,
        service_account,
        secret_name: v1beta1_secret_name(binding_name),
    })
}

fn resolve_identity(raw: &RawSpec, defaults: &Defaults) -> Result<Identity, InvalidSpec> {
    let spec_client = non_empty(raw.managed_identity_client_id.as_deref());
    let spec_resource = non_empty(raw.managed_identity_resource_id.as_deref());

    let identity = match (spec_client, spec_resource) {
        (Some(_), Some(_)) => return Err(InvalidSpec::AmbiguousIdentity),
        (Some(client), None) => Identity::ClientId(client.to_owned()),
        (None, Some(resource)) => Identity::ResourceId(resource.to_owned()),
        (None, None) => {
            if let Some(client) = non_empty(defaults.managed_identity_client_id.as_deref()) {
                Identity::ClientId(client.to_owned())
            } else if let Some(resource) =
                non_empty(defaults.managed_identity_resource_id.as_deref())
            {
                Identity::ResourceId(resource.to_owned())
            } else {
                return Err(InvalidSpec::MissingIdentity);
            }
        }
    };

    match &identity {
        Identity::ClientId(client_id) if !is_guid(client_id) => Err(InvalidSpec::InvalidClientId {
            client_id: client_id.clone(),
        }),
        Identity::ResourceId(resource_id) if !is_identity_resource_id(resource_id) => {
            Err(InvalidSpec::InvalidResourceId {
                resource_id: resource_id.clone(),
            })
        }
        _ => Ok(identity),
    }
}

fn validate_server(server: &str, policy: &RegistryPolicy) -> Result<(), InvalidSpec> {
    if !is_dns_subdomain(server) || !server.contains('.') {
        return Err(InvalidSpec::InvalidServer {
            server: server.to_owned(),
        });
    }

    let allowed = policy.allowed_suffixes.is_empty()
        || policy
            .allowed_suffixes
            .iter()
            .any(|suffix| server.ends_with(&suffix.to_ascii_lowercase()));
    if !allowed {
        return Err(InvalidSpec::ServerNotAllowed {
            server: server.to_owned(),
            allowed: policy.allowed_suffixes.join(", "),
        });
    }
    Ok(())
}

fn normalize_scope(scope: &str) -> String {
    scope.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn validate_scope(scope: &str) -> Result<(), InvalidSpec> {
    for entry in scope.split(' ') {
        let parts: Vec<&str> = entry.split(':').collect();
        let valid = match parts.as_slice() {
            ["repository", name, actions] => {
                is_repository_name(name)
                    && !actions.is_empty()
                    && actions.split(',').all(|action| {
                        matches!(
                            action,
                            "pull" | "push" | "delete" | "metadata_read" | "metadata_write" | "*"
                        )
                    })
            }
            ["registry", "catalog", "*"] => true,
            _ => false,
        };
        if !valid {
            return Err(InvalidSpec::InvalidScope {
                entry: entry.to_owned(),
            });
        }
    }
    Ok(())
}

fn non_empty(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|value| !value.is_empty())
}

/// Checks an RFC 1123 DNS subdomain: at most 253 characters, dot-separated labels of
/// lowercase alphanumerics and '-', each starting and ending with an alphanumeric.
fn is_dns_subdomain(value: &str) -> bool {
    value.len() <= 253
        && !value.is_empty()
        && value.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Checks a repository path: lowercase path components separated by '/', each made of
/// alphanumerics with single '.', '_', '__' or '-' runs between them.
fn is_repository_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('/').all(|component| {
            !component.is_empty()
                && component.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
                && component.as_bytes()[0].is_ascii_alphanumeric()
                && component.as_bytes()[component.len() - 1].is_ascii_alphanumeric()
        })
}

fn is_guid(value: &str) -> bool {
    let groups: Vec<&str> = value.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len && group.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_identity_resource_id(value: &str) -> bool {
    let parts: Vec<&str> = value.trim_start_matches('/').split('/').collect();
    matches!(
        parts.as_slice(),
        [subscriptions, _, resource_groups, _, providers, namespace, kind, name]
            if subscriptions.eq_ignore_ascii_case("subscriptions")
                && resource_groups.eq_ignore_ascii_case("resourceGroups")
                && providers.eq_ignore_ascii_case("providers")
                && namespace.eq_ignore_ascii_case("Microsoft.ManagedIdentity")
                && kind.eq_ignore_ascii_case("userAssignedIdentities")
                && !name.is_empty()
    ) && value.starts_with('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &str = "11111111-2222-3333-4444-555555555555";
    const RESOURCE: &str = "/subscriptions/712288dc-f816-4242-b73f-a0a87265dcc8/resourceGroups/ids/providers/Microsoft.ManagedIdentity/userAssignedIdentities/puller";

    fn raw(server: Option<&str>, client: Option<&str>, resource: Option<&str>) -> RawSpec {
        RawSpec {
            acr_server: server.map(str::to_owned),
            managed_identity_client_id: client.map(str::to_owned),
            managed_identity_resource_id: resource.map(str::to_owned),
            ..RawSpec::default()
        }
    }

    fn resolve(raw: &RawSpec, defaults: &Defaults) -> Result<DesiredBinding, InvalidSpec> {
        resolve_v1beta1("app", raw, defaults, &RegistryPolicy::default())
    }

    #[test]
    fn resolve_minimal_spec() {
        let desired = resolve(
            &raw(Some("Example.azurecr.io"), Some(CLIENT), None),
            &Defaults::default(),
        )
        .unwrap();
        assert_eq!(desired.acr_server, "example.azurecr.io");
        assert_eq!(desired.identity, Identity::ClientId(CLIENT.into()));
        assert_eq!(desired.service_account, "default");
        assert_eq!(desired.secret_name, "app-msi-acrpull-secret");
        assert_eq!(desired.scope, None);
    }

    #[test]
    fn spec_identity_wins_over_defaults() {
        let defaults = Defaults {
            acr_server: Some("default.azurecr.io".into()),
            managed_identity_client_id: Some(CLIENT.into()),
            managed_identity_resource_id: None,
        };
        let desired = resolve(&raw(None, None, Some(RESOURCE)), &defaults).unwrap();
        assert_eq!(desired.identity, Identity::ResourceId(RESOURCE.into()));
        assert_eq!(desired.acr_server, "default.azurecr.io");
    }

    #[test]
    fn default_client_id_wins_over_default_resource_id() {
        let defaults = Defaults {
            acr_server: None,
            managed_identity_client_id: Some(CLIENT.into()),
            managed_identity_resource_id: Some(RESOURCE.into()),
        };
        let desired = resolve(&raw(Some("a.azurecr.io"), None, None), &defaults).unwrap();
        assert_eq!(desired.identity, Identity::ClientId(CLIENT.into()));
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let cases = [
            (raw(None, Some(CLIENT), None), InvalidSpec::MissingServer),
            (
                raw(Some("https://a.azurecr.io"), Some(CLIENT), None),
                InvalidSpec::InvalidServer {
                    server: "https://a.azurecr.io".into(),
                },
            ),
            (
                raw(Some("a.azurecr.io"), None, None),
                InvalidSpec::MissingIdentity,
            ),
            (
                raw(Some("a.azurecr.io"), Some(CLIENT), Some(RESOURCE)),
                InvalidSpec::AmbiguousIdentity,
            ),
            (
                raw(Some("a.azurecr.io"), Some("not-a-guid"), None),
                InvalidSpec::InvalidClientId {
                    client_id: "not-a-guid".into(),
                },
            ),
            (
                raw(Some("a.azurecr.io"), None, Some("/subscriptions/x")),
                InvalidSpec::InvalidResourceId {
                    resource_id: "/subscriptions/x".into(),
                },
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                resolve(&input, &Defaults::default()),
                Err(expected),
                "{input:?}"
            );
        }
    }

    #[test]
    fn scope_validation() {
        let mut input = raw(Some("a.azurecr.io"), Some(CLIENT), None);
        for valid in [
            "repository:app:pull",
            "repository:team/app:pull,metadata_read  registry:catalog:*",
        ] {
            input.scope = Some(valid.into());
            assert!(resolve(&input, &Defaults::default()).is_ok(), "{valid}");
        }
        for invalid in [
            "repository:app",
            "repo:app:pull",
            "repository:App:pull",
            "repository:app:fly",
        ] {
            input.scope = Some(invalid.into());
            assert!(
                matches!(
                    resolve(&input, &Defaults::default()),
                    Err(InvalidSpec::InvalidScope { .. })
                ),
                "{invalid}"
            );
        }
    }

    #[test]
    fn server_outside_allowed_suffixes_is_rejected() {
        let policy = RegistryPolicy {
            allowed_suffixes: vec![".azurecr.io".into()],
        };
        let ok = resolve_v1beta1(
            "app",
            &raw(Some("a.azurecr.io"), Some(CLIENT), None),
            &Defaults::default(),
            &policy,
        );
        assert!(ok.is_ok());
        let rejected = resolve_v1beta1(
            "app",
            &raw(Some("evil.example.com"), Some(CLIENT), None),
            &Defaults::default(),
            &policy,
        );
        assert!(matches!(
            rejected,
            Err(InvalidSpec::ServerNotAllowed { .. })
        ));
    }

    #[test]
    fn invalid_service_account_is_rejected() {
        let mut input = raw(Some("a.azurecr.io"), Some(CLIENT), None);
        input.service_account_name = Some("Bad_Name".into());
        assert!(matches!(
            resolve(&input, &Defaults::default()),
            Err(InvalidSpec::InvalidServiceAccount { .. })
        ));
    }
}
