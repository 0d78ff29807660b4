//! The Entra ID v2.0 token endpoint, `POST /{tenant}/oauth2/v2.0/token`, for the client
//! credentials grant with a federated client assertion (workload identity).
//!
//! The fake does not check the assertion's signature. It checks that the assertion is
//! JWT-shaped, that its `aud` is one of the configured audiences, that it is within its time
//! range, and that its `sub` is one the identity's federated credentials accept.
//!
//! NOTE: the AADSTS codes, their wording and the order of the checks approximate Entra ID.
//! Clients should rely on the `error` and `error_codes` fields only.

#![allow(
    clippy::result_large_err,
    reason = "error results are whole responses, built and returned once per request"
)]

use std::collections::HashMap;
use std::sync::Arc;

use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::Shared;
use super::common::{entra_error, handle, json_response};
use super::control::Endpoint;
use super::rules::ResolvedIdentity;
use super::tokens::{TokenKind, decode_claims, random_id, unix_now};

/// The `client_assertion_type` of a JWT bearer client assertion.
pub(crate) const JWT_BEARER_ASSERTION_TYPE: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

pub(crate) async fn token(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    // A body that is not a form reads as an empty form, so the missing-parameter errors apply.
    let params: HashMap<String, String> = form
        .map(|Form(pairs)| pairs.into_iter().collect())
        .unwrap_or_default();
    let client_id = params.get("client_id").cloned().unwrap_or_default();

    handle(&shared, Endpoint::EntraToken, &client_id, None, || {
        answer(&shared, &tenant, &params)
    })
    .await
}

fn missing_parameter(name: &str) -> Response {
    entra_error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        900_144,
        &format!("The request body must contain the following parameter: '{name}'."),
    )
}

fn answer(shared: &Shared, tenant: &str, params: &HashMap<String, String>) -> Response {
    let checked = check_tenant(shared, tenant)
        .and_then(|()| check_grant_type(params))
        .and_then(|()| resolve_identity(shared, tenant, params))
        .and_then(|identity| {
            check_assertion(shared, params, &identity.federated_subjects)?;
            let resource = requested_resource(params)?;
            Ok((identity, resource))
        });
    match checked {
        Ok((identity, resource)) => issue_token(shared, tenant, &identity, resource),
        Err(response) => response,
    }
}

fn check_tenant(shared: &Shared, tenant: &str) -> Result<(), Response> {
    let tenant_shaped = !tenant.is_empty()
        && tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    if tenant_shaped && shared.rules().knows_tenant(tenant, &shared.tenant_id) {
        return Ok(());
    }
    Err(entra_error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        90_002,
        &format!(
            "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and \
             are signing into the correct cloud."
        ),
    ))
}

fn check_grant_type(params: &HashMap<String, String>) -> Result<(), Response> {
    match params.get("grant_type").map(String::as_str) {
        None => Err(missing_parameter("grant_type")),
        Some("client_credentials") => Ok(()),
        Some(other) => Err(entra_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70_003,
            &format!("The app requested an unsupported grant type '{other}'."),
        )),
    }
}

/// Finds the application named by `client_id` in `tenant`.
fn resolve_identity(
    shared: &Shared,
    tenant: &str,
    params: &HashMap<String, String>,
) -> Result<ResolvedIdentity, Response> {
    let Some(client_id) = params.get("client_id").filter(|id| !id.is_empty()) else {
        return Err(missing_parameter("client_id"));
    };
    let identity = shared.rules().resolve_client(client_id).filter(|identity| {
        identity
            .tenant_id
            .as_deref()
            .is_none_or(|expected| expected.eq_ignore_ascii_case(tenant))
    });
    identity.ok_or_else(|| {
        entra_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700_016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory \
                 '{tenant}'. This can happen if the application has not been installed by the \
                 administrator of the tenant or consented to by any user in the tenant. You may \
                 have sent your authentication request to the wrong tenant."
            ),
        )
    })
}

/// Returns the resource of the single `<resource>/.default` scope that client credential
/// requests must name.
fn requested_resource(params: &HashMap<String, String>) -> Result<&str, Response> {
    let Some(scope) = params.get("scope").filter(|scope| !scope.trim().is_empty()) else {
        return Err(missing_parameter("scope"));
    };
    let scopes: Vec<&str> = scope.split_whitespace().collect();
    match scopes.as_slice() {
        [single] if single.ends_with("/.default") => Ok(single.trim_end_matches("/.default")),
        _ => Err(entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1_002_012,
            &format!(
                "The provided value for scope {scope} is not valid. Client credential flows must \
                 have a scope value with /.default suffixed to the resource identifier \
                 (application ID URI)."
            ),
        )),
    }
}

fn issue_token(
    shared: &Shared,
    tenant: &str,
    identity: &ResolvedIdentity,
    resource: &str,
) -> Response {
    let mut claims = Map::new();
    claims.insert("aud".into(), json!(resource));
    claims.insert(
        "iss".into(),
        json!(format!("https://sts.windows.net/{tenant}/")),
    );
    claims.insert(
        "idp".into(),
        json!(format!("https://sts.windows.net/{tenant}/")),
    );
    claims.insert("appid".into(), json!(identity.client_id));
    claims.insert("appidacr".into(), json!("2"));
    claims.insert("idtyp".into(), json!("app"));
    claims.insert("oid".into(), json!(identity.object_id));
    claims.insert("sub".into(), json!(identity.object_id));
    claims.insert("tid".into(), json!(tenant));
    claims.insert("uti".into(), json!(random_id()));
    claims.insert("ver".into(), json!("1.0"));
    if let Some(resource_id) = &identity.resource_id {
        claims.insert("xms_mirid".into(), json!(resource_id));
    }
    let lifetime = shared.lifetime(TokenKind::EntraAccessToken);
    let access_token = shared.signer.mint(claims, lifetime);
    json_response(
        StatusCode::OK,
        &json!({
            "token_type": "Bearer",
            "expires_in": lifetime.as_secs(),
            "ext_expires_in": lifetime.as_secs(),
            "access_token": access_token,
        }),
    )
}

/// Checks the client assertion fields and the `ServiceAccount` token used as the assertion,
/// without checking the token's signature.
fn check_assertion(
    shared: &Shared,
    params: &HashMap<String, String>,
    federated_subjects: &[String],
) -> Result<(), Response> {
    let Some(assertion_type) = params.get("client_assertion_type") else {
        return Err(entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            7_000_218,
            "The request body must contain the following parameter: 'client_assertion' or \
             'client_secret'.",
        ));
    };
    if assertion_type != JWT_BEARER_ASSERTION_TYPE {
        return Err(entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            50_027,
            &format!(
                "The client_assertion_type '{assertion_type}' is not supported. Use \
                 '{JWT_BEARER_ASSERTION_TYPE}'."
            ),
        ));
    }
    let Some(assertion) = params.get("client_assertion") else {
        return Err(missing_parameter("client_assertion"));
    };
    let Ok(claims) = decode_claims(assertion) else {
        return Err(entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            50_027,
            "JWT token is invalid or malformed.",
        ));
    };

    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(audience)) => vec![audience.as_str()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let audience_accepted = audiences.iter().any(|audience| {
        shared
            .assertion_audiences
            .iter()
            .any(|accepted| accepted == audience)
    });
    if !audience_accepted {
        return Err(entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            700_212,
            &format!(
                "No matching federated identity record found for presented assertion audience \
                 '{}'.",
                audiences.join(",")
            ),
        ));
    }

    let now = unix_now();
    let expires_at = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
    let not_before = claims.get("nbf").and_then(Value::as_u64).unwrap_or(0);
    if expires_at <= now || not_before > now {
        return Err(entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            700_024,
            &format!(
                "Client assertion is not within its valid time range. Current time: {now}, \
                 assertion valid from {not_before}, expiry time of assertion {expires_at}."
            ),
        ));
    }

    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let subject_accepted = federated_subjects.is_empty()
        || federated_subjects
            .iter()
            .any(|accepted| accepted == subject);
    if !subject_accepted {
        let issuer = claims
            .get("iss")
            .and_then(Value::as_str)
            .unwrap_or_default();
        return Err(entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            70_021,
            &format!(
                "No matching federated identity record found for presented assertion. Assertion \
                 Issuer: '{issuer}'. Assertion Subject: '{subject}'. Assertion Audience: '{}'.",
                audiences.join(",")
            ),
        ));
    }
    Ok(())
}
