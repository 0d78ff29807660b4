//! `AcrPullBinding` in API group `msi-acrpull.microsoft.com`, version `v1beta1`.
//!
//! Field names and meanings match the original msi-acrpull API, so existing manifests apply
//! unchanged.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use acrpull_actors::spec::RawSpec;

/// Desired state of an AcrPullBinding: which identity pulls from which registry, for which
/// ServiceAccount.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "msi-acrpull.microsoft.com",
    version = "v1beta1",
    kind = "AcrPullBinding",
    plural = "acrpullbindings",
    doc = "Binds an Azure managed identity to an Azure Container Registry. The controller keeps a kubernetes.io/dockerconfigjson Secret named <binding>-msi-acrpull-secret filled with a fresh registry token and adds it to the ServiceAccount's imagePullSecrets.",
    namespaced,
    status = "AcrPullBindingStatus",
    printcolumn = r#"{"name":"Server","type":"string","description":"Registry login server","jsonPath":".spec.acrServer"}"#,
    printcolumn = r#"{"name":"ServiceAccount","type":"string","description":"ServiceAccount that receives the pull secret","jsonPath":".spec.serviceAccountName"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","description":"Whether the pull secret is valid and attached","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","description":"When the current registry token expires","jsonPath":".status.tokenExpirationTime"}"#,
    printcolumn = r#"{"name":"Error","type":"string","priority":1,"description":"Last error, if any","jsonPath":".status.error"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("!has(self.spec) || !(has(self.spec.managedIdentityResourceID) && has(self.spec.managedIdentityClientID))").message("set only one of spec.managedIdentityResourceID and spec.managedIdentityClientID")
)]
#[serde(rename_all = "camelCase")]
pub struct AcrPullBindingSpec {
    /// Login server of the registry, for example `myregistry.azurecr.io`. Defaults to the
    /// controller's `ACR_SERVER` setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub acr_server: Option<String>,

    /// ARM resource ID of the user-assigned managed identity that pulls images. Set this or
    /// managedIdentityClientID; either defaults to the controller's setting.
    #[serde(
        default,
        rename = "managedIdentityResourceID",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 1024))]
    pub managed_identity_resource_id: Option<String>,

    /// Client ID of the user-assigned managed identity that pulls images. Set this or
    /// managedIdentityResourceID; either defaults to the controller's setting.
    #[serde(
        default,
        rename = "managedIdentityClientID",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 36))]
    pub managed_identity_client_id: Option<String>,

    /// Space-separated registry scopes, for example `repository:myapp:pull`. When set, the
    /// Secret contains an access token limited to these scopes. When empty, it contains the
    /// registry refresh token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub scope: Option<String>,

    /// ServiceAccount in this namespace whose imagePullSecrets receives the Secret. Defaults to
    /// `default`. The controller never creates ServiceAccounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub service_account_name: Option<String>,
}

impl AcrPullBindingSpec {
    /// Returns the spec fields as the domain's unresolved spec.
    #[must_use]
    pub fn to_raw(&self) -> RawSpec {
        RawSpec {
            acr_server: self.acr_server.clone(),
            managed_identity_resource_id: self.managed_identity_resource_id.clone(),
            managed_identity_client_id: self.managed_identity_client_id.clone(),
            scope: self.scope.clone(),
            service_account_name: self.service_account_name.clone(),
        }
    }
}

/// Observed state of an AcrPullBinding.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AcrPullBindingStatus {
    /// When the controller last wrote a new registry token into the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_token_refresh_time: Option<Time>,

    /// When the registry token in the Secret expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expiration_time: Option<Time>,

    /// The last error, cleared by the next success. The Secret keeps its last good token
    /// while an error is reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,

    /// Conditions of the binding. `Ready` is True when the last token refresh succeeded, the
    /// Secret contains that token, and the ServiceAccount references the Secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
