//! Access rules: which identities exist, and which registries and scopes each may use.

use serde::{Deserialize, Serialize};

use super::tokens::derived_guid;

/// The identities the fake accepts and what each may access.
///
/// Rules are read on every request, so replacing them at run time acts like an Azure role
/// assignment change: tokens already issued stay valid, but the next exchange or token request
/// is checked against the new rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRules {
    /// Accepts every identity, tenant, registry and scope.
    #[serde(default)]
    pub allow_all: bool,
    /// The known identities, used when `allow_all` is false.
    #[serde(default)]
    pub identities: Vec<IdentityRule>,
}

/// One Entra ID identity: a user-assigned managed identity, an app registration with federated
/// credentials, or both.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityRule {
    /// The client (application) ID.
    pub client_id: String,
    /// The object (principal) ID. Derived from the client ID when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_id: Option<String>,
    /// The Azure resource ID of the managed identity, which IMDS accepts as `msi_res_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// The tenant of the identity. Absent means the fake's default tenant for IMDS and any tenant
    /// for the Entra ID token endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Whether IMDS returns tokens for this identity, as if it were assigned to the node.
    #[serde(default = "default_true")]
    pub imds: bool,
    /// Whether this identity is the node's system-assigned identity, which IMDS returns when a
    /// request names no identity.
    #[serde(default)]
    pub system_assigned: bool,
    /// `ServiceAccount` token subjects (`system:serviceaccount:<namespace>:<name>`) that
    /// federated credentials accept for this identity. Empty accepts every subject.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub federated_subjects: Vec<String>,
    /// The registries this identity may pull from.
    #[serde(default)]
    pub registries: Vec<RegistryGrant>,
}

/// Access to one registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryGrant {
    /// The registry host name, such as `myregistry.azurecr.io`, or `*` for every registry.
    pub registry: String,
    /// The ACR scopes this identity may request, such as `repository:team/*:pull`.
    ///
    /// Each entry is `type:name:actions`, where `name` may contain `*` wildcards and `actions`
    /// may be `*`. The entry `*` allows every scope, which is also the default. An empty list
    /// allows the refresh token exchange but no access token.
    #[serde(default = "any_scope")]
    pub scopes: Vec<String>,
}

fn default_true() -> bool {
    true
}

fn any_scope() -> Vec<String> {
    vec!["*".to_owned()]
}

/// The identity a request asked IMDS for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ImdsIdentity {
    SystemAssigned,
    ClientId(String),
    ObjectId(String),
    ResourceId(String),
}

/// An identity after the rules resolved it, with every ID filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ResolvedIdentity {
    pub(crate) client_id: String,
    pub(crate) object_id: String,
    pub(crate) resource_id: Option<String>,
    pub(crate) tenant_id: Option<String>,
    pub(crate) federated_subjects: Vec<String>,
}

impl AccessRules {
    /// Returns rules that accept everything.
    #[must_use]
    pub fn allow_all() -> Self {
        Self {
            allow_all: true,
            identities: Vec::new(),
        }
    }

    /// Returns rules that accept exactly the given identities.
    #[must_use]
    pub fn new(identities: Vec<IdentityRule>) -> Self {
        Self {
            allow_all: false,
            identities,
        }
    }

    /// Resolves the identity an IMDS request names, if it is assigned to the node.
    pub(crate) fn resolve_imds(&self, requested: &ImdsIdentity) -> Option<ResolvedIdentity> {
        let found = self.identities.iter().find(|rule| {
            rule.imds
                && match requested {
                    ImdsIdentity::SystemAssigned => rule.system_assigned,
                    ImdsIdentity::ClientId(id) => rule.client_id.eq_ignore_ascii_case(id),
                    ImdsIdentity::ObjectId(id) => rule.object_id().eq_ignore_ascii_case(id),
                    ImdsIdentity::ResourceId(id) => rule
                        .resource_id
                        .as_deref()
                        .is_some_and(|resource| resource.eq_ignore_ascii_case(id)),
                }
        });
        if let Some(rule) = found {
            return Some(rule.resolve());
        }
        if !self.allow_all {
            return None;
        }
        let synthesized = match requested {
            ImdsIdentity::SystemAssigned => ResolvedIdentity::synthesized("system-assigned"),
            ImdsIdentity::ClientId(id) => ResolvedIdentity::synthesized(id),
            ImdsIdentity::ObjectId(id) => ResolvedIdentity {
                object_id: id.clone(),
                ..ResolvedIdentity::synthesized(&derived_guid(id))
            },
            ImdsIdentity::ResourceId(id) => ResolvedIdentity {
                resource_id: Some(id.clone()),
                ..ResolvedIdentity::synthesized(&derived_guid(id))
            },
        };
        Some(synthesized)
    }

    /// Resolves an identity by client ID, for the Entra ID token endpoint and ACR.
    pub(crate) fn resolve_client(&self, client_id: &str) -> Option<ResolvedIdentity> {
        let found = self
            .identities
            .iter()
            .find(|rule| rule.client_id.eq_ignore_ascii_case(client_id));
        match found {
            Some(rule) => Some(rule.resolve()),
            None if self.allow_all => Some(ResolvedIdentity::synthesized(client_id)),
            None => None,
        }
    }

    /// Returns whether `tenant_id` is the default tenant or the tenant of an identity.
    pub(crate) fn knows_tenant(&self, tenant_id: &str, default_tenant_id: &str) -> bool {
        self.allow_all
            || tenant_id.eq_ignore_ascii_case(default_tenant_id)
            || self.identities.iter().any(|rule| {
                rule.tenant_id
                    .as_deref()
                    .is_some_and(|tenant| tenant.eq_ignore_ascii_case(tenant_id))
            })
    }

    /// Returns whether the identity may use `registry` at all.
    pub(crate) fn registry_allowed(&self, client_id: &str, registry: &str) -> bool {
        self.allow_all || self.grant(client_id, registry).is_some()
    }

    /// Returns the requested scopes that the identity may not use on `registry`.
    pub(crate) fn denied_scopes<'a>(
        &self,
        client_id: &str,
        registry: &str,
        requested: &[&'a str],
    ) -> Vec<&'a str> {
        if self.allow_all {
            return Vec::new();
        }
        let Some(grant) = self.grant(client_id, registry) else {
            return requested.to_vec();
        };
        requested
            .iter()
            .copied()
            .filter(|scope| {
                !grant
                    .scopes
                    .iter()
                    .any(|allowed| scope_allows(allowed, scope))
            })
            .collect()
    }

    fn grant(&self, client_id: &str, registry: &str) -> Option<&RegistryGrant> {
        self.identities
            .iter()
            .filter(|rule| rule.client_id.eq_ignore_ascii_case(client_id))
            .flat_map(|rule| &rule.registries)
            .find(|grant| grant.registry == "*" || grant.registry.eq_ignore_ascii_case(registry))
    }
}

impl IdentityRule {
    /// Returns a rule for an identity that IMDS serves and that may use no registry yet.
    #[must_use]
    pub fn new(client_id: impl Into<String>) -> Self {
        Self {
            client_id: client_id.into(),
            object_id: None,
            resource_id: None,
            tenant_id: None,
            imds: true,
            system_assigned: false,
            federated_subjects: Vec::new(),
            registries: Vec::new(),
        }
    }

    /// Sets the managed identity's Azure resource ID.
    #[must_use]
    pub fn with_resource_id(mut self, resource_id: impl Into<String>) -> Self {
        self.resource_id = Some(resource_id.into());
        self
    }

    /// Sets the object (principal) ID.
    #[must_use]
    pub fn with_object_id(mut self, object_id: impl Into<String>) -> Self {
        self.object_id = Some(object_id.into());
        self
    }

    /// Sets the tenant of the identity.
    #[must_use]
    pub fn with_tenant_id(mut self, tenant_id: impl Into<String>) -> Self {
        self.tenant_id = Some(tenant_id.into());
        self
    }

    /// Makes this identity the node's system-assigned identity.
    #[must_use]
    pub fn system_assigned(mut self) -> Self {
        self.system_assigned = true;
        self
    }

    /// Restricts federated credentials to one more `ServiceAccount` token subject.
    #[must_use]
    pub fn with_federated_subject(mut self, subject: impl Into<String>) -> Self {
        self.federated_subjects.push(subject.into());
        self
    }

    /// Allows the identity to use `registry` with the given scopes (`["*"]` for every scope).
    #[must_use]
    pub fn with_registry(mut self, registry: impl Into<String>, scopes: &[&str]) -> Self {
        self.registries.push(RegistryGrant {
            registry: registry.into(),
            scopes: scopes.iter().map(|scope| (*scope).to_owned()).collect(),
        });
        self
    }

    fn object_id(&self) -> String {
        self.object_id
            .clone()
            .unwrap_or_else(|| derived_guid(&self.client_id))
    }

    fn resolve(&self) -> ResolvedIdentity {
        ResolvedIdentity {
            client_id: self.client_id.clone(),
            object_id: self.object_id(),
            resource_id: self.resource_id.clone(),
            tenant_id: self.tenant_id.clone(),
            federated_subjects: self.federated_subjects.clone(),
        }
    }
}

impl ResolvedIdentity {
    fn synthesized(client_id: &str) -> Self {
        Self {
            client_id: client_id.to_owned(),
            object_id: derived_guid(client_id),
            resource_id: None,
            tenant_id: None,
            federated_subjects: Vec::new(),
        }
    }
}

/// Returns whether the grant entry `allowed` covers the requested ACR scope `requested`.
///
/// Both have the form `type:name:actions`. The name may itself contain colons (a registry
/// resource such as `registry:catalog:*` does not, but a repository with a port-qualified name
/// might), so the type ends at the first colon and the actions start after the last one.
pub(crate) fn scope_allows(allowed: &str, requested: &str) -> bool {
    if allowed == "*" {
        return true;
    }
    let (Some(allowed), Some(requested)) = (split_scope(allowed), split_scope(requested)) else {
        return false;
    };
    let type_matches = allowed.0 == "*" || allowed.0 == requested.0;
    let name_matches = glob_matches(allowed.1, requested.1);
    let granted_actions: Vec<&str> = allowed.2.split(',').map(str::trim).collect();
    let actions_match = granted_actions.contains(&"*")
        || requested
            .2
            .split(',')
            .map(str::trim)
            .all(|action| granted_actions.contains(&action));
    type_matches && name_matches && actions_match
}

fn split_scope(scope: &str) -> Option<(&str, &str, &str)> {
    let (resource_type, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    if resource_type.is_empty() || name.is_empty() || actions.is_empty() {
        return None;
    }
    Some((resource_type, name, actions))
}

/// Matches `text` against `pattern`, where `*` matches any run of characters.
fn glob_matches(pattern: &str, text: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let Some(mut remaining) = text.strip_prefix(first) else {
        return false;
    };
    let mut pieces: Vec<&str> = rest.split('*').collect();
    let last = pieces.pop().unwrap_or_default();
    for piece in pieces {
        match remaining.find(piece) {
            Some(index) => remaining = &remaining[index + piece.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_wildcards() {
        let cases = [
            ("*", "repository:app:pull", true),
            ("repository:*:pull", "repository:team/app:pull", true),
            ("repository:team/*:pull", "repository:team/app:pull", true),
            ("repository:team/*:pull", "repository:other/app:pull", false),
            ("repository:app:pull", "repository:app:pull,push", false),
            ("repository:app:pull,push", "repository:app:push,pull", true),
            ("repository:app:*", "repository:app:delete", true),
            ("repository:app:pull", "registry:catalog:*", false),
            ("repository:*:pull", "not-a-scope", false),
            ("repository:a*c*e:pull", "repository:abcde:pull", true),
            ("repository:a*c*e:pull", "repository:abcdef:pull", false),
            ("repository:ab*b:pull", "repository:ab:pull", false),
        ];
        for (allowed, requested, expected) in cases {
            assert_eq!(
                scope_allows(allowed, requested),
                expected,
                "{allowed} vs {requested}"
            );
        }
    }

    #[test]
    fn imds_resolves_by_every_id() {
        let rules = AccessRules::new(vec![
            IdentityRule::new("client-a")
                .with_object_id("object-a")
                .with_resource_id("/subscriptions/s/resourceGroups/g/providers/x/a"),
            IdentityRule::new("client-b").system_assigned(),
        ]);
        let by_client = rules.resolve_imds(&ImdsIdentity::ClientId("client-a".into()));
        assert_eq!(by_client.unwrap().object_id, "object-a");
        let by_object = rules.resolve_imds(&ImdsIdentity::ObjectId("object-a".into()));
        assert_eq!(by_object.unwrap().client_id, "client-a");
        let by_resource = rules.resolve_imds(&ImdsIdentity::ResourceId(
            "/subscriptions/s/resourceGroups/g/providers/x/a".into(),
        ));
        assert_eq!(by_resource.unwrap().client_id, "client-a");
        let system = rules.resolve_imds(&ImdsIdentity::SystemAssigned);
        assert_eq!(system.unwrap().client_id, "client-b");
        assert!(
            rules
                .resolve_imds(&ImdsIdentity::ClientId("unknown".into()))
                .is_none()
        );
    }

    #[test]
    fn denied_scopes_lists_only_denied() {
        let rules = AccessRules::new(vec![
            IdentityRule::new("client").with_registry("a.azurecr.io", &["repository:app:pull"]),
        ]);
        assert!(rules.registry_allowed("client", "A.azurecr.io"));
        assert!(!rules.registry_allowed("client", "b.azurecr.io"));
        let denied = rules.denied_scopes(
            "client",
            "a.azurecr.io",
            &["repository:app:pull", "repository:other:pull"],
        );
        assert_eq!(denied, vec!["repository:other:pull"]);
    }

    #[test]
    fn rules_parse_from_yaml_with_defaults() {
        let yaml =
            "identities:\n  - client_id: c\n    registries:\n      - registry: r.azurecr.io\n";
        let rules: AccessRules = serde_saphyr::from_str(yaml).unwrap();
        let rule = &rules.identities[0];
        assert!(rule.imds);
        assert!(!rules.allow_all);
        assert_eq!(rule.registries[0].scopes, vec!["*"]);
    }
}
