//! Renders the pull Secret and reads it back.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::Deserialize;

use acrpull_actors::event::ObservedSecret;
use acrpull_actors::model::{InputsHash, IssuedToken, RegistryToken};
use acrpull_actors::write::SecretContent;

use super::names::{
    BINDING_LABEL, EXPIRY_ANNOTATION, INPUTS_HASH_ANNOTATION, MANAGED_BY, MANAGED_BY_LABEL,
    REFRESHED_ANNOTATION, TOKEN_USERNAME, binding_label_value,
};
use crate::azure::jwt;

/// Secret type for registry credentials.
pub const DOCKER_CONFIG_JSON_TYPE: &str = "kubernetes.io/dockerconfigjson";

/// Data key that contains the registry credentials.
pub const DOCKER_CONFIG_JSON_KEY: &str = ".dockerconfigjson";

/// Renders the Secret for server-side apply.
#[must_use]
pub fn render(
    namespace: &str,
    binding: &str,
    owner: OwnerReference,
    content: &SecretContent,
) -> Secret {
    let token = content.token.token.expose();
    let auth = STANDARD.encode(format!("{TOKEN_USERNAME}:{token}"));
    let config = serde_json::json!({
        "auths": {
            content.acr_server.as_str(): {
                "username": TOKEN_USERNAME,
                "password": token,
                "auth": auth,
            }
        }
    });

    Secret {
        metadata: ObjectMeta {
            name: Some(content.name.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (BINDING_LABEL.to_owned(), binding_label_value(binding)),
                (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
            ])),
            annotations: Some(BTreeMap::from([
                (
                    EXPIRY_ANNOTATION.to_owned(),
                    content.token.expires_at.to_string(),
                ),
                (
                    REFRESHED_ANNOTATION.to_owned(),
                    content.refreshed_at.to_string(),
                ),
                (
                    INPUTS_HASH_ANNOTATION.to_owned(),
                    content.inputs_hash.0.clone(),
                ),
            ])),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        type_: Some(DOCKER_CONFIG_JSON_TYPE.to_owned()),
        data: Some(BTreeMap::from([(
            DOCKER_CONFIG_JSON_KEY.to_owned(),
            ByteString(config.to_string().into_bytes()),
        )])),
        ..Secret::default()
    }
}

/// Reads back what the controller needs from an observed Secret.
///
/// `owner_uid` is the UID of the binding; the Secret counts as owned when a controller
/// ownerReference points at it. `server` is the registry the binding names now, or `None` when
/// the binding is not known yet (at start-up the Secret can be seen before its binding).
#[must_use]
pub fn observe(
    secret: &Secret,
    owner_uid: Option<&str>,
    server: Option<&str>,
    now: Timestamp,
) -> ObservedSecret {
    let annotations = secret.metadata.annotations.as_ref();
    let annotation = |key: &str| annotations.and_then(|map| map.get(key));

    let owned = secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|owner| {
            owner.kind == "AcrPullBinding"
                && owner.controller == Some(true)
                && owner_uid.is_none_or(|uid| owner.uid == uid)
        });

    ObservedSecret {
        name: secret.metadata.name.clone().unwrap_or_default(),
        inputs_hash: annotation(INPUTS_HASH_ANNOTATION).map(|hash| InputsHash(hash.clone())),
        refreshed_at: annotation(REFRESHED_ANNOTATION).and_then(|value| value.parse().ok()),
        token: read_token(secret, server, now),
        owned,
    }
}

/// Reads the token from `.dockerconfigjson`, or `None` when the Secret does not hold exactly
/// what this controller writes.
fn read_token(secret: &Secret, server: Option<&str>, now: Timestamp) -> Option<IssuedToken> {
    #[derive(Deserialize)]
    struct DockerConfig {
        auths: BTreeMap<String, AuthEntry>,
    }
    #[derive(Deserialize)]
    struct AuthEntry {
        username: Option<String>,
        password: Option<String>,
        auth: Option<String>,
    }

    if secret.type_.as_deref() != Some(DOCKER_CONFIG_JSON_TYPE) {
        return None;
    }
    let bytes = &secret.data.as_ref()?.get(DOCKER_CONFIG_JSON_KEY)?.0;
    let config: DockerConfig = serde_json::from_slice(bytes).ok()?;
    if config.auths.len() != 1 {
        return None;
    }
    let (host, auth) = config.auths.into_iter().next()?;
    if server.is_some_and(|server| server != host) {
        return None;
    }

    let password = auth.password?;
    let expected_auth = STANDARD.encode(format!("{TOKEN_USERNAME}:{password}"));
    if auth.username.as_deref() != Some(TOKEN_USERNAME)
        || auth.auth.as_deref() != Some(expected_auth.as_str())
    {
        return None;
    }

    let (issued_at, expires_at) = jwt::validity(&password, now).ok()?;
    Some(IssuedToken {
        token: RegistryToken::new(password),
        issued_at,
        expires_at,
    })
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;

    fn token() -> IssuedToken {
        let payload = URL_SAFE_NO_PAD.encode(r#"{"exp":4000000000,"iat":3999990000}"#);
        IssuedToken {
            token: RegistryToken::new(format!("eyJ0eXAiOiJKV1QifQ.{payload}.c2ln")),
            issued_at: Timestamp::from_second(3_999_990_000).unwrap(),
            expires_at: Timestamp::from_second(4_000_000_000).unwrap(),
        }
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "msi-acrpull.microsoft.com/v1beta1".into(),
            kind: "AcrPullBinding".into(),
            name: "app".into(),
            uid: "uid-1".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    fn content() -> SecretContent {
        SecretContent {
            name: "app-msi-acrpull-secret".into(),
            acr_server: "example.azurecr.io".into(),
            token: token(),
            inputs_hash: InputsHash("abc".into()),
            refreshed_at: Timestamp::from_second(3_999_990_001).unwrap(),
        }
    }

    #[test]
    fn render_then_observe_round_trips() {
        let secret = render("ns", "app", owner(), &content());
        let observed = observe(
            &secret,
            Some("uid-1"),
            Some("example.azurecr.io"),
            Timestamp::UNIX_EPOCH,
        );
        assert!(observed.owned);
        assert_eq!(observed.inputs_hash, Some(InputsHash("abc".into())));
        assert_eq!(observed.refreshed_at, Some(content().refreshed_at));
        assert_eq!(observed.token, Some(token()));
    }

    #[test]
    fn render_writes_docker_config_layout() {
        let secret = render("ns", "app", owner(), &content());
        let bytes = &secret.data.as_ref().unwrap()[DOCKER_CONFIG_JSON_KEY].0;
        let json: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        let entry = &json["auths"]["example.azurecr.io"];
        assert_eq!(entry["username"], TOKEN_USERNAME);
        assert_eq!(entry["password"], token().token.expose());
        let decoded = STANDARD.decode(entry["auth"].as_str().unwrap()).unwrap();
        assert_eq!(
            decoded,
            format!("{TOKEN_USERNAME}:{}", token().token.expose()).into_bytes()
        );
        assert_eq!(secret.type_.as_deref(), Some(DOCKER_CONFIG_JSON_TYPE));
    }

    #[test]
    fn observe_rejects_edited_content() {
        let mut secret = render("ns", "app", owner(), &content());
        secret
            .data
            .as_mut()
            .unwrap()
            .insert(DOCKER_CONFIG_JSON_KEY.into(), ByteString(b"{}".to_vec()));
        assert_eq!(
            observe(&secret, Some("uid-1"), None, Timestamp::UNIX_EPOCH).token,
            None
        );
    }

    #[test]
    fn observe_rejects_other_server() {
        let secret = render("ns", "app", owner(), &content());
        let observed = observe(
            &secret,
            Some("uid-1"),
            Some("other.azurecr.io"),
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(observed.token, None);
    }

    #[test]
    fn observe_without_owner_reference_is_not_owned() {
        let mut secret = render("ns", "app", owner(), &content());
        secret.metadata.owner_references = None;
        assert!(!observe(&secret, None, None, Timestamp::UNIX_EPOCH).owned);
    }
}
