//! The IMDS managed identity endpoint, `GET /metadata/identity/oauth2/token`.
//!
//! IMDS serves plain HTTP, requires the header `Metadata: true`, and sends every number in
//! its token response as a string.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::Shared;
use super::common::{handle, imds_error, json_response};
use super::control::Endpoint;
use super::rules::ImdsIdentity;
use super::tokens::{TokenKind, random_id, unix_now};

/// The oldest `api-version` of the IMDS identity endpoint.
const OLDEST_API_VERSION: &str = "2018-02-01";

pub(crate) async fn token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let params: HashMap<String, String> = match query {
        Ok(Query(pairs)) => pairs.into_iter().collect(),
        Err(rejection) => {
            return imds_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("Invalid query string: {rejection}"),
            );
        }
    };
    let identity_params: Vec<(&str, &String)> = ["client_id", "object_id", "msi_res_id"]
        .into_iter()
        .filter_map(|name| params.get(name).map(|value| (name, value)))
        .collect();
    let identity_key = identity_params
        .first()
        .map(|(_, value)| value.as_str())
        .unwrap_or_default()
        .to_owned();

    handle(&shared, Endpoint::Imds, &identity_key, None, || {
        answer(&shared, &headers, &params, &identity_params)
    })
    .await
}

fn answer(
    shared: &Shared,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
    identity_params: &[(&str, &String)],
) -> Response {
    let metadata = headers
        .get("metadata")
        .and_then(|value| value.to_str().ok());
    if !metadata.is_some_and(|value| value.eq_ignore_ascii_case("true")) {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required metadata header not specified",
        );
    }

    let Some(api_version) = params.get("api-version") else {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required query variable 'api-version' is missing",
        );
    };
    if !is_supported_api_version(api_version) {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!("Invalid api-version '{api_version}'"),
        );
    }

    let Some(resource) = params.get("resource").filter(|value| !value.is_empty()) else {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required audience parameter not specified",
        );
    };

    let requested = match identity_params {
        [] => ImdsIdentity::SystemAssigned,
        [("client_id", id)] => ImdsIdentity::ClientId((*id).clone()),
        [("object_id", id)] => ImdsIdentity::ObjectId((*id).clone()),
        [(_, id)] => ImdsIdentity::ResourceId((*id).clone()),
        _ => {
            return imds_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Only one of client_id, object_id and msi_res_id may be specified",
            );
        }
    };
    let Some(identity) = shared.rules().resolve_imds(&requested) else {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Identity not found",
        );
    };

    let tenant_id = identity
        .tenant_id
        .clone()
        .unwrap_or_else(|| shared.tenant_id.clone());
    let mut claims = Map::new();
    claims.insert("aud".into(), json!(resource));
    claims.insert(
        "iss".into(),
        json!(format!("https://sts.windows.net/{tenant_id}/")),
    );
    claims.insert(
        "idp".into(),
        json!(format!("https://sts.windows.net/{tenant_id}/")),
    );
    claims.insert("appid".into(), json!(identity.client_id));
    claims.insert("appidacr".into(), json!("2"));
    claims.insert("idtyp".into(), json!("app"));
    claims.insert("oid".into(), json!(identity.object_id));
    claims.insert("sub".into(), json!(identity.object_id));
    claims.insert("tid".into(), json!(tenant_id));
    claims.insert("uti".into(), json!(random_id()));
    claims.insert("ver".into(), json!("1.0"));
    if let Some(resource_id) = &identity.resource_id {
        claims.insert("xms_mirid".into(), json!(resource_id));
    }

    let lifetime = shared.lifetime(TokenKind::ImdsAccessToken);
    let now = unix_now();
    let access_token = shared.signer.mint(claims, lifetime);
    let expires_in = lifetime.as_secs().to_string();
    json_response(
        StatusCode::OK,
        &Value::Object(Map::from_iter([
            ("access_token".to_owned(), json!(access_token)),
            ("client_id".to_owned(), json!(identity.client_id)),
            ("expires_in".to_owned(), json!(expires_in)),
            (
                "expires_on".to_owned(),
                json!((now + lifetime.as_secs()).to_string()),
            ),
            ("ext_expires_in".to_owned(), json!(expires_in)),
            ("not_before".to_owned(), json!(now.to_string())),
            ("resource".to_owned(), json!(resource)),
            ("token_type".to_owned(), json!("Bearer")),
        ])),
    )
}

/// Accepts dated API versions from the oldest one the identity endpoint has onwards, such as
/// `2018-02-01` (documented) and `2019-08-01` (sent by `azure_identity` 1.0).
fn is_supported_api_version(version: &str) -> bool {
    let bytes = version.as_bytes();
    let dated = bytes.len() == 10
        && bytes.iter().enumerate().all(|(index, byte)| match index {
            4 | 7 => *byte == b'-',
            _ => byte.is_ascii_digit(),
        });
    dated && version >= OLDEST_API_VERSION
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions() {
        assert!(is_supported_api_version("2018-02-01"));
        assert!(is_supported_api_version("2019-08-01"));
        assert!(!is_supported_api_version("2017-09-01"));
        assert!(!is_supported_api_version("latest"));
        assert!(!is_supported_api_version("2019-8-01"));
    }
}
