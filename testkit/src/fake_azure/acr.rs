//! The ACR token endpoints: `POST /oauth2/exchange` trades an Entra ID access token for a
//! refresh token, and `POST /oauth2/token` trades a refresh token for a scoped access token.
//!
//! One listener serves every registry. The registry is the `service` form field, and when the
//! request's host name is a DNS name it must be the same registry.
//!
//! NOTE: ACR documents its 401 body (code `UNAUTHORIZED`) but not the body of a 400 for a
//! malformed request, so those use the registry error format with code `UNSUPPORTED`.

#![allow(
    clippy::result_large_err,
    reason = "error results are whole responses, built and returned once per request"
)]

use std::net::IpAddr;
use std::sync::Arc;

use axum::Form;
use axum::extract::State;
use axum::extract::rejection::FormRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Map, Value, json};
use tracing::debug;

use super::Shared;
use super::common::{ACR_UNAUTHORIZED_MESSAGE, acr_error, handle, json_response, request_host};
use super::control::Endpoint;
use super::tokens::{TokenKind, decode_claims, random_id};

/// Audiences of Entra ID tokens that ACR accepts in an exchange: Azure Resource Manager in the
/// public, US Government and China clouds, and ACR's own audience.
const ACCEPTED_AUDIENCES: [&str; 7] = [
    "https://management.azure.com",
    "https://management.core.windows.net",
    "https://management.usgovcloudapi.net",
    "https://management.core.usgovcloudapi.net",
    "https://management.chinacloudapi.cn",
    "https://management.core.chinacloudapi.cn",
    "https://containerregistry.azure.net",
];

const ISSUER: &str = "Azure Container Registry";

/// A parsed ACR token request: form fields with repeats kept, plus the host it was sent to.
struct AcrRequest {
    fields: Vec<(String, String)>,
    host: Option<String>,
    form_error: Option<String>,
}

impl AcrRequest {
    fn new(
        headers: &HeaderMap,
        uri: &Uri,
        form: Result<Form<Vec<(String, String)>>, FormRejection>,
    ) -> Self {
        let (fields, form_error) = match form {
            Ok(Form(fields)) => (fields, None),
            Err(rejection) => (Vec::new(), Some(rejection.body_text())),
        };
        Self {
            fields,
            host: request_host(headers, uri),
            form_error,
        }
    }

    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(key, value)| key == name && !value.is_empty())
            .map(|(_, value)| value.as_str())
    }

    /// Returns every requested scope: `scope` may repeat and each may hold several scopes
    /// separated by spaces.
    fn scopes(&self) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(key, _)| key == "scope")
            .flat_map(|(_, value)| value.split_whitespace())
            .collect()
    }

    /// Returns the registry for counters: the `service` field, else the host name.
    fn registry(&self) -> Option<String> {
        self.field("service")
            .map(str::to_ascii_lowercase)
            .or_else(|| self.host.clone())
    }

    /// Returns the `appid` claim of the token in `field`, without checking the token.
    fn claimed_client_id(&self, field: &str) -> String {
        self.field(field)
            .and_then(|token| decode_claims(token).ok())
            .and_then(|claims| {
                claims
                    .get("appid")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    }

    /// Checks the fields every ACR token request needs and returns the `service` value.
    fn check_common(&self, expected_grant_type: &str) -> Result<&str, Response> {
        if let Some(error) = &self.form_error {
            return Err(bad_request(&format!("invalid form body: {error}")));
        }
        let Some(grant_type) = self.field("grant_type") else {
            return Err(bad_request("missing grant_type"));
        };
        if grant_type != expected_grant_type {
            return Err(bad_request(&format!(
                "grant_type '{grant_type}' is not supported here, use '{expected_grant_type}'"
            )));
        }
        let Some(service) = self.field("service") else {
            return Err(bad_request("missing service"));
        };
        if let Some(host) = self.host.as_deref().filter(|host| is_dns_name(host))
            && !host.eq_ignore_ascii_case(service)
        {
            return Err(unauthorized(&format!(
                "the service '{service}' does not match the registry host '{host}'"
            )));
        }
        Ok(service)
    }
}

pub(crate) async fn exchange(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    uri: Uri,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    let request = AcrRequest::new(&headers, &uri, form);
    let identity = request.claimed_client_id("access_token");
    let registry = request.registry();
    handle(
        &shared,
        Endpoint::AcrExchange,
        &identity,
        registry.as_deref(),
        || answer_exchange(&shared, &request).unwrap_or_else(|response| response),
    )
    .await
}

fn answer_exchange(shared: &Shared, request: &AcrRequest) -> Result<Response, Response> {
    let service = request.check_common("access_token")?;
    let Some(access_token) = request.field("access_token") else {
        return Err(bad_request("missing access_token"));
    };
    let claims = shared.signer.verify(access_token).map_err(|rejection| {
        debug!(
            ?rejection,
            service, "rejected the Entra ID token of an ACR exchange"
        );
        unauthorized(ACR_UNAUTHORIZED_MESSAGE)
    })?;

    let audience = claims
        .get("aud")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let audience_accepted = ACCEPTED_AUDIENCES
        .iter()
        .any(|accepted| audience.trim_end_matches('/') == *accepted);
    if claims.contains_key("grant_type") || !audience_accepted {
        return Err(unauthorized(&format!(
            "the access token audience '{audience}' is not accepted, request a token for \
             https://management.azure.com/"
        )));
    }

    let tenant_id = claims
        .get("tid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if let Some(tenant) = request.field("tenant")
        && !tenant.eq_ignore_ascii_case(tenant_id)
    {
        return Err(unauthorized(&format!(
            "the tenant '{tenant}' does not match the access token tenant '{tenant_id}'"
        )));
    }

    let client_id = claims
        .get("appid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let rules = shared.rules();
    let identity = rules.resolve_client(client_id);
    if identity.is_none() || !rules.registry_allowed(client_id, service) {
        return Err(unauthorized(&format!(
            "the identity '{client_id}' has no access to registry '{service}'"
        )));
    }

    let mut refresh_claims = Map::new();
    refresh_claims.insert(
        "sub".into(),
        claims.get("oid").cloned().unwrap_or(Value::Null),
    );
    refresh_claims.insert("iss".into(), json!(ISSUER));
    refresh_claims.insert("aud".into(), json!(service.to_ascii_lowercase()));
    refresh_claims.insert("version".into(), json!("1.0"));
    refresh_claims.insert("rid".into(), json!(random_id()));
    refresh_claims.insert("grant_type".into(), json!("refresh_token"));
    refresh_claims.insert("appid".into(), json!(client_id));
    refresh_claims.insert("tenant".into(), json!(tenant_id));
    refresh_claims.insert(
        "permissions".into(),
        json!({"actions": ["read"], "notActions": null}),
    );
    refresh_claims.insert("roles".into(), json!([]));
    let lifetime = shared.lifetime(TokenKind::AcrRefreshToken);
    let refresh_token = shared.signer.mint(refresh_claims, lifetime);
    Ok(json_response(
        StatusCode::OK,
        &json!({"refresh_token": refresh_token}),
    ))
}

pub(crate) async fn token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    uri: Uri,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    let request = AcrRequest::new(&headers, &uri, form);
    let identity = request.claimed_client_id("refresh_token");
    let registry = request.registry();
    handle(
        &shared,
        Endpoint::AcrToken,
        &identity,
        registry.as_deref(),
        || answer_token(&shared, &request).unwrap_or_else(|response| response),
    )
    .await
}

fn answer_token(shared: &Shared, request: &AcrRequest) -> Result<Response, Response> {
    let service = request.check_common("refresh_token")?;
    let Some(refresh_token) = request.field("refresh_token") else {
        return Err(bad_request("missing refresh_token"));
    };
    let claims = shared.signer.verify(refresh_token).map_err(|rejection| {
        debug!(
            ?rejection,
            service, "rejected the refresh token of an ACR token request"
        );
        unauthorized(ACR_UNAUTHORIZED_MESSAGE)
    })?;
    let is_refresh_token =
        claims.get("grant_type").and_then(Value::as_str) == Some("refresh_token");
    let audience = claims
        .get("aud")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !is_refresh_token || !audience.eq_ignore_ascii_case(service) {
        return Err(unauthorized(ACR_UNAUTHORIZED_MESSAGE));
    }

    let client_id = claims
        .get("appid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let rules = shared.rules();
    if rules.resolve_client(client_id).is_none() || !rules.registry_allowed(client_id, service) {
        return Err(unauthorized(&format!(
            "the identity '{client_id}' has no access to registry '{service}'"
        )));
    }
    let scopes = request.scopes();
    let denied = rules.denied_scopes(client_id, service, &scopes);
    if !denied.is_empty() {
        let detail: Vec<Value> = denied
            .iter()
            .map(|scope| scope_claim(scope, "Action"))
            .collect();
        return Err(acr_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            ACR_UNAUTHORIZED_MESSAGE,
            &Value::Array(detail),
        ));
    }

    let access: Vec<Value> = scopes
        .iter()
        .map(|scope| scope_claim(scope, "Actions"))
        .collect();
    let mut access_claims = Map::new();
    access_claims.insert(
        "sub".into(),
        claims.get("sub").cloned().unwrap_or(Value::Null),
    );
    access_claims.insert("iss".into(), json!(ISSUER));
    access_claims.insert("aud".into(), json!(service.to_ascii_lowercase()));
    access_claims.insert("version".into(), json!("1.0"));
    access_claims.insert("rid".into(), json!(random_id()));
    access_claims.insert("access".into(), Value::Array(access));
    access_claims.insert("roles".into(), json!([]));
    access_claims.insert("grant_type".into(), json!("access_token"));
    access_claims.insert("appid".into(), json!(client_id));
    access_claims.insert(
        "tenant".into(),
        claims.get("tenant").cloned().unwrap_or(Value::Null),
    );
    let lifetime = shared.lifetime(TokenKind::AcrAccessToken);
    let access_token = shared.signer.mint(access_claims, lifetime);
    Ok(json_response(
        StatusCode::OK,
        &json!({"access_token": access_token}),
    ))
}

/// Responds to the registry API base `GET /v2/` with the bearer challenge that tells a client where
/// to get a token.
pub(crate) async fn challenge(headers: HeaderMap, uri: Uri) -> Response {
    let host = request_host(&headers, &uri).unwrap_or_else(|| "localhost".to_owned());
    let mut response = acr_error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        ACR_UNAUTHORIZED_MESSAGE,
        &Value::Null,
    );
    let challenge = format!(r#"Bearer realm="https://{host}/oauth2/token",service="{host}""#);
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

/// Describes one scope as the access claim or error detail entry ACR uses, such as
/// `{"Type": "repository", "Name": "app", "Actions": ["pull"]}`.
fn scope_claim(scope: &str, actions_key: &str) -> Value {
    let (resource_type, rest) = scope.split_once(':').unwrap_or((scope, ""));
    let (name, actions) = rest.rsplit_once(':').unwrap_or((rest, ""));
    let actions: Vec<&str> = actions
        .split(',')
        .filter(|action| !action.is_empty())
        .collect();
    let actions = if actions_key == "Action" {
        json!(actions.join(","))
    } else {
        json!(actions)
    };
    let mut claim = Map::new();
    claim.insert("Type".into(), json!(resource_type));
    claim.insert("Name".into(), json!(name));
    claim.insert(actions_key.into(), actions);
    Value::Object(claim)
}

fn is_dns_name(host: &str) -> bool {
    host != "localhost" && host.parse::<IpAddr>().is_err()
}

fn bad_request(message: &str) -> Response {
    acr_error(
        StatusCode::BAD_REQUEST,
        "UNSUPPORTED",
        message,
        &Value::Null,
    )
}

fn unauthorized(message: &str) -> Response {
    acr_error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        message,
        &Value::Null,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_claim_shapes() {
        assert_eq!(
            scope_claim("repository:team/app:pull,push", "Actions"),
            json!({"Type": "repository", "Name": "team/app", "Actions": ["pull", "push"]})
        );
        assert_eq!(
            scope_claim("repository:app:pull", "Action"),
            json!({"Type": "repository", "Name": "app", "Action": "pull"})
        );
    }

    #[test]
    fn dns_names() {
        assert!(is_dns_name("my.azurecr.io"));
        assert!(!is_dns_name("127.0.0.1"));
        assert!(!is_dns_name("::1"));
        assert!(!is_dns_name("localhost"));
    }
}
