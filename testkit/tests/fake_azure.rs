//! Tests of the fake Azure over real HTTP and HTTPS: every endpoint's success, access denial,
//! injected failures and counters, the admin API, and the real `azure_identity` credentials.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use acrpull_testkit::fake_azure::{
    AccessRules, Endpoint, Failure, FakeAzure, FakeAzureConfig, IdentityRule,
    OPERATOR_ENDPOINT_FLAGS, TokenKind, decode_claims,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

const CLIENT_ID: &str = "11111111-0000-0000-0000-000000000001";
const OBJECT_ID: &str = "11111111-0000-0000-0000-0000000000aa";
const RESOURCE_ID: &str = "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/puller";
const WORKLOAD_CLIENT_ID: &str = "22222222-0000-0000-0000-000000000002";
const SUBJECT: &str = "system:serviceaccount:apps:puller";
const REGISTRY: &str = "myregistry.azurecr.io";
const OTHER_REGISTRY: &str = "other.azurecr.io";
const ARM_RESOURCE: &str = "https://management.azure.com/";
const ARM_SCOPE: &str = "https://management.azure.com/.default";
const AUDIENCE: &str = "api://AzureCRTokenExchange";

fn rules() -> AccessRules {
    AccessRules::new(vec![
        IdentityRule::new(CLIENT_ID)
            .with_object_id(OBJECT_ID)
            .with_resource_id(RESOURCE_ID)
            .with_registry(REGISTRY, &["repository:app:pull", "repository:team/*:pull"]),
        IdentityRule::new(WORKLOAD_CLIENT_ID)
            .with_federated_subject(SUBJECT)
            .with_registry(REGISTRY, &["*"]),
    ])
}

async fn start() -> FakeAzure {
    FakeAzure::start(FakeAzureConfig::with_rules(rules()))
        .await
        .expect("fake Azure should start")
}

/// Returns a client that trusts only the fake's CA and resolves both registry names to it.
fn https_client(fake: &FakeAzure) -> Client {
    let ca = reqwest::Certificate::from_pem(fake.ca_pem().as_bytes()).expect("CA PEM parses");
    Client::builder()
        .tls_certs_only([ca])
        .resolve(REGISTRY, fake.acr_addr())
        .resolve(OTHER_REGISTRY, fake.acr_addr())
        .no_proxy()
        .build()
        .expect("HTTPS client builds")
}

fn plain_client() -> Client {
    Client::builder()
        .no_proxy()
        .build()
        .expect("HTTP client builds")
}

/// Returns the IMDS token URL with `query` (reqwest here has no `query` feature).
fn imds_token_url(fake: &FakeAzure, query: &[(&str, &str)]) -> reqwest::Url {
    let base = format!("{}/metadata/identity/oauth2/token", fake.imds_url());
    reqwest::Url::parse_with_params(&base, query).expect("IMDS URL parses")
}

async fn imds(fake: &FakeAzure, query: &[(&str, &str)]) -> reqwest::Response {
    plain_client()
        .get(imds_token_url(fake, query))
        .header("Metadata", "true")
        .send()
        .await
        .expect("IMDS request is sent")
}

async fn imds_token(fake: &FakeAzure, client_id: &str) -> String {
    let response = imds(
        fake,
        &[
            ("api-version", "2018-02-01"),
            ("resource", ARM_RESOURCE),
            ("client_id", client_id),
        ],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Builds an unsigned JWT shaped like a Kubernetes `ServiceAccount` token.
fn service_account_token(audience: &str, subject: &str, expires_at: u64) -> String {
    let header = json!({"alg": "RS256", "kid": "test"});
    let claims = json!({
        "aud": [audience],
        "exp": expires_at,
        "iat": unix_now() - 10,
        "nbf": unix_now() - 10,
        "iss": "https://kubernetes.default.svc",
        "sub": subject,
    });
    format!(
        "{}.{}.c2lnbmF0dXJl",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

async fn entra(fake: &FakeAzure, tenant: &str, form: &[(&str, &str)]) -> reqwest::Response {
    https_client(fake)
        .post(format!(
            "{}/{tenant}/oauth2/v2.0/token",
            fake.entra_authority_url()
        ))
        .form(form)
        .send()
        .await
        .expect("Entra ID request is sent")
}

async fn entra_with_assertion(
    fake: &FakeAzure,
    client_id: &str,
    assertion: &str,
) -> reqwest::Response {
    entra(
        fake,
        fake.tenant_id(),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
            ("scope", ARM_SCOPE),
        ],
    )
    .await
}

async fn acr_post(
    fake: &FakeAzure,
    host: &str,
    path: &str,
    form: &[(&str, &str)],
) -> reqwest::Response {
    https_client(fake)
        .post(format!("https://{host}{path}"))
        .form(form)
        .send()
        .await
        .expect("ACR request is sent")
}

async fn exchange(fake: &FakeAzure, registry: &str, access_token: &str) -> reqwest::Response {
    acr_post(
        fake,
        registry,
        "/oauth2/exchange",
        &[
            ("grant_type", "access_token"),
            ("service", registry),
            ("access_token", access_token),
        ],
    )
    .await
}

async fn refresh_token(fake: &FakeAzure) -> String {
    let access_token = imds_token(fake, CLIENT_ID).await;
    let response = exchange(fake, REGISTRY, &access_token).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["refresh_token"].as_str().unwrap().to_owned()
}

async fn acr_token(
    fake: &FakeAzure,
    registry: &str,
    refresh: &str,
    scope: &str,
) -> reqwest::Response {
    acr_post(
        fake,
        registry,
        "/oauth2/token",
        &[
            ("grant_type", "refresh_token"),
            ("service", registry),
            ("scope", scope),
            ("refresh_token", refresh),
        ],
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// IMDS

#[tokio::test]
async fn imds_token_for_client_id() {
    let fake = start().await;
    let response = imds(
        &fake,
        &[
            ("api-version", "2018-02-01"),
            ("resource", ARM_RESOURCE),
            ("client_id", CLIENT_ID),
        ],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();

    for field in ["expires_in", "expires_on", "ext_expires_in", "not_before"] {
        let text = body[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} is a string"));
        assert!(
            text.parse::<u64>().is_ok(),
            "{field} holds an integer: {text}"
        );
    }
    let expires_on: u64 = body["expires_on"].as_str().unwrap().parse().unwrap();
    assert!(expires_on > unix_now() + 3_600);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["resource"], ARM_RESOURCE);
    assert_eq!(body["client_id"], CLIENT_ID);

    let claims = decode_claims(body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["aud"], ARM_RESOURCE);
    assert_eq!(claims["appid"], CLIENT_ID);
    assert_eq!(claims["oid"], OBJECT_ID);
    assert_eq!(claims["tid"], fake.tenant_id());
    assert_eq!(claims["xms_mirid"], RESOURCE_ID);
    assert_eq!(claims["exp"].as_u64().unwrap(), expires_on);

    assert_eq!(fake.calls(Endpoint::Imds), 1);
    assert_eq!(fake.calls_for(Endpoint::Imds, CLIENT_ID), 1);
    assert_eq!(fake.tokens_issued(Endpoint::Imds), 1);
}

#[tokio::test]
async fn imds_token_by_resource_and_object_id() {
    let fake = start().await;
    for (name, value) in [("msi_res_id", RESOURCE_ID), ("object_id", OBJECT_ID)] {
        let response = imds(
            &fake,
            &[
                ("api-version", "2019-08-01"),
                ("resource", ARM_RESOURCE),
                (name, value),
            ],
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK, "by {name}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["client_id"], CLIENT_ID, "by {name}");
        assert_eq!(fake.calls_for(Endpoint::Imds, value), 1, "by {name}");
    }
}

#[tokio::test]
async fn imds_requires_metadata_header() {
    let fake = start().await;
    let response = plain_client()
        .get(imds_token_url(
            &fake,
            &[
                ("api-version", "2018-02-01"),
                ("resource", ARM_RESOURCE),
                ("client_id", CLIENT_ID),
            ],
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
    assert_eq!(fake.tokens_issued(Endpoint::Imds), 0);
}

#[tokio::test]
async fn imds_rejects_bad_query() {
    let fake = start().await;
    let cases: [&[(&str, &str)]; 3] = [
        &[("resource", ARM_RESOURCE), ("client_id", CLIENT_ID)],
        &[("api-version", "2018-02-01"), ("client_id", CLIENT_ID)],
        &[
            ("api-version", "2018-02-01"),
            ("resource", ARM_RESOURCE),
            ("client_id", CLIENT_ID),
            ("object_id", OBJECT_ID),
        ],
    ];
    for query in cases {
        let response = imds(&fake, query).await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "query {query:?}"
        );
    }
}

#[tokio::test]
async fn imds_unknown_identity_denied() {
    let fake = start().await;
    let response = imds(
        &fake,
        &[
            ("api-version", "2018-02-01"),
            ("resource", ARM_RESOURCE),
            ("client_id", "unknown"),
        ],
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": "invalid_request", "error_description": "Identity not found"})
    );

    let system_assigned = imds(
        &fake,
        &[("api-version", "2018-02-01"), ("resource", ARM_RESOURCE)],
    )
    .await;
    assert_eq!(system_assigned.status(), StatusCode::BAD_REQUEST);
    assert_eq!(fake.calls_for(Endpoint::Imds, "unknown"), 1);
    assert_eq!(fake.calls_for(Endpoint::Imds, ""), 1);
}

#[tokio::test]
async fn imds_system_assigned_identity() {
    let mut rules = rules();
    rules
        .identities
        .push(IdentityRule::new("system-client").system_assigned());
    let fake = FakeAzure::start(FakeAzureConfig::with_rules(rules))
        .await
        .unwrap();
    let response = imds(
        &fake,
        &[("api-version", "2018-02-01"), ("resource", ARM_RESOURCE)],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["client_id"], "system-client");
}

#[tokio::test]
async fn imds_injected_status_then_recovers() {
    let fake = start().await;
    fake.inject_failure(Endpoint::Imds, Failure::status(503, 2))
        .unwrap();
    let query = [
        ("api-version", "2018-02-01"),
        ("resource", ARM_RESOURCE),
        ("client_id", CLIENT_ID),
    ];

    for attempt in 1..=2 {
        let response = imds(&fake, &query).await;
        assert_eq!(
            response.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "attempt {attempt}"
        );
        let body: Value = response.json().await.unwrap();
        assert!(
            body["error"].is_string(),
            "attempt {attempt} has an IMDS error body"
        );
    }
    let response = imds(&fake, &query).await;
    assert_eq!(response.status(), StatusCode::OK);

    assert_eq!(fake.calls_for(Endpoint::Imds, CLIENT_ID), 3);
    assert_eq!(fake.tokens_issued(Endpoint::Imds), 1);
    assert!(fake.pending_failures().is_empty());
}

#[tokio::test]
async fn imds_throttle_sets_retry_after() {
    let fake = start().await;
    fake.inject_failure(Endpoint::Imds, Failure::throttle(Duration::from_secs(7), 1))
        .unwrap();
    let response = imds(
        &fake,
        &[
            ("api-version", "2018-02-01"),
            ("resource", ARM_RESOURCE),
            ("client_id", CLIENT_ID),
        ],
    )
    .await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "7");
}

#[tokio::test]
async fn imds_malformed_bodies() {
    let fake = start().await;
    let query = [
        ("api-version", "2018-02-01"),
        ("resource", ARM_RESOURCE),
        ("client_id", CLIENT_ID),
    ];

    fake.inject_failure(Endpoint::Imds, Failure::invalid_json(1))
        .unwrap();
    let response = imds(&fake, &query).await;
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    assert!(
        serde_json::from_str::<Value>(&text).is_err(),
        "body {text:?} is not JSON"
    );

    fake.inject_failure(Endpoint::Imds, Failure::missing_fields(1))
        .unwrap();
    let response = imds(&fake, &query).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert!(body.get("access_token").is_none());
    assert!(body.get("expires_on").is_none());
}

#[tokio::test]
async fn imds_hang_outlasts_client_timeout() {
    let fake = start().await;
    fake.inject_failure(Endpoint::Imds, Failure::hang(1))
        .unwrap();
    let result = plain_client()
        .get(imds_token_url(
            &fake,
            &[
                ("api-version", "2018-02-01"),
                ("resource", ARM_RESOURCE),
                ("client_id", CLIENT_ID),
            ],
        ))
        .header("Metadata", "true")
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    let error = result.expect_err("a held request times out");
    assert!(error.is_timeout(), "error is a timeout: {error}");

    let token = imds_token(&fake, CLIENT_ID).await;
    assert!(!token.is_empty());
}

#[tokio::test]
async fn imds_latency_delays_response() {
    let fake = start().await;
    fake.set_latency(Endpoint::Imds, Duration::from_millis(300));
    let started = Instant::now();
    imds_token(&fake, CLIENT_ID).await;
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Setting a long delay and then zero shows that zero clears it, with a 10 s margin for a
    // slow machine.
    fake.set_latency(Endpoint::Imds, Duration::from_secs(10));
    fake.set_latency(Endpoint::Imds, Duration::ZERO);
    let started = Instant::now();
    imds_token(&fake, CLIENT_ID).await;
    assert!(started.elapsed() < Duration::from_secs(10));
}

// ---------------------------------------------------------------------------------------------
// Entra ID

#[tokio::test]
async fn entra_token_for_federated_assertion() {
    let fake = start().await;
    let assertion = service_account_token(AUDIENCE, SUBJECT, unix_now() + 600);
    let response = entra_with_assertion(&fake, WORKLOAD_CLIENT_ID, &assertion).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(body["ext_expires_in"], 3599);

    let claims = decode_claims(body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["appid"], WORKLOAD_CLIENT_ID);
    assert_eq!(claims["tid"], fake.tenant_id());
    assert_eq!(claims["aud"], "https://management.azure.com");
    assert_eq!(fake.calls_for(Endpoint::EntraToken, WORKLOAD_CLIENT_ID), 1);
    assert_eq!(fake.tokens_issued(Endpoint::EntraToken), 1);
}

/// Asserts a 400 AADSTS error with the given `error` and first error code.
async fn assert_entra_error(response: reqwest::Response, error: &str, code: u64) {
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], error, "body {body}");
    assert_eq!(body["error_codes"][0], code, "body {body}");
    let description = body["error_description"].as_str().unwrap();
    assert!(
        description.starts_with(&format!("AADSTS{code}:")),
        "description {description}"
    );
    for field in ["timestamp", "trace_id", "correlation_id", "error_uri"] {
        assert!(body[field].is_string(), "{field} in {body}");
    }
}

#[tokio::test]
async fn entra_rejects_wrong_audience() {
    let fake = start().await;
    let assertion = service_account_token("api://AzureADTokenExchange", SUBJECT, unix_now() + 600);
    let response = entra_with_assertion(&fake, WORKLOAD_CLIENT_ID, &assertion).await;
    assert_entra_error(response, "invalid_client", 700_212).await;
}

#[tokio::test]
async fn entra_rejects_unknown_client() {
    let fake = start().await;
    let assertion = service_account_token(AUDIENCE, SUBJECT, unix_now() + 600);
    let response = entra_with_assertion(&fake, "unknown-client", &assertion).await;
    assert_entra_error(response, "unauthorized_client", 700_016).await;
    assert_eq!(fake.calls_for(Endpoint::EntraToken, "unknown-client"), 1);
}

#[tokio::test]
async fn entra_rejects_unfederated_subject() {
    let fake = start().await;
    let assertion = service_account_token(
        AUDIENCE,
        "system:serviceaccount:apps:other",
        unix_now() + 600,
    );
    let response = entra_with_assertion(&fake, WORKLOAD_CLIENT_ID, &assertion).await;
    assert_entra_error(response, "invalid_client", 70_021).await;
}

#[tokio::test]
async fn entra_rejects_expired_or_malformed_assertion() {
    let fake = start().await;
    let expired = service_account_token(AUDIENCE, SUBJECT, unix_now() - 1);
    let response = entra_with_assertion(&fake, WORKLOAD_CLIENT_ID, &expired).await;
    assert_entra_error(response, "invalid_client", 700_024).await;

    let response = entra_with_assertion(&fake, WORKLOAD_CLIENT_ID, "not-a-jwt").await;
    assert_entra_error(response, "invalid_client", 50_027).await;
}

#[tokio::test]
async fn entra_rejects_bad_request_fields() {
    let fake = start().await;
    let assertion = service_account_token(AUDIENCE, SUBJECT, unix_now() + 600);
    let assertion_type = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

    let bad_scope = entra(
        &fake,
        fake.tenant_id(),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", WORKLOAD_CLIENT_ID),
            ("client_assertion_type", assertion_type),
            ("client_assertion", &assertion),
            ("scope", "https://management.azure.com/user_impersonation"),
        ],
    )
    .await;
    assert_entra_error(bad_scope, "invalid_scope", 1_002_012).await;

    let bad_grant = entra(
        &fake,
        fake.tenant_id(),
        &[
            ("grant_type", "password"),
            ("client_id", WORKLOAD_CLIENT_ID),
        ],
    )
    .await;
    assert_entra_error(bad_grant, "unsupported_grant_type", 70_003).await;

    let unknown_tenant = entra(
        &fake,
        "00000000-0000-0000-0000-000000000000",
        &[
            ("grant_type", "client_credentials"),
            ("client_id", WORKLOAD_CLIENT_ID),
        ],
    )
    .await;
    assert_entra_error(unknown_tenant, "invalid_request", 90_002).await;
}

#[tokio::test]
async fn entra_injected_failures() {
    let fake = start().await;
    let assertion = service_account_token(AUDIENCE, SUBJECT, unix_now() + 600);

    fake.inject_failure(Endpoint::EntraToken, Failure::status(500, 1))
        .unwrap();
    let response = entra_with_assertion(&fake, WORKLOAD_CLIENT_ID, &assertion).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "temporarily_unavailable");
    assert!(body["error_codes"].is_array());

    fake.inject_failure(
        Endpoint::EntraToken,
        Failure::throttle(Duration::from_secs(3), 1),
    )
    .unwrap();
    let response = entra_with_assertion(&fake, WORKLOAD_CLIENT_ID, &assertion).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "3");

    fake.inject_failure(Endpoint::EntraToken, Failure::invalid_json(1))
        .unwrap();
    let response = entra_with_assertion(&fake, WORKLOAD_CLIENT_ID, &assertion).await;
    assert!(response.json::<Value>().await.is_err());

    fake.inject_failure(Endpoint::EntraToken, Failure::missing_fields(1))
        .unwrap();
    let response = entra_with_assertion(&fake, WORKLOAD_CLIENT_ID, &assertion).await;
    let body: Value = response.json().await.unwrap();
    assert!(body.get("access_token").is_none());

    let response = entra_with_assertion(&fake, WORKLOAD_CLIENT_ID, &assertion).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fake.calls(Endpoint::EntraToken), 5);
    assert_eq!(fake.tokens_issued(Endpoint::EntraToken), 1);
}

// ---------------------------------------------------------------------------------------------
// ACR

#[tokio::test]
async fn acr_exchange_issues_refresh_token() {
    let fake = start().await;
    let refresh = refresh_token(&fake).await;
    let claims = decode_claims(&refresh).unwrap();
    assert_eq!(claims["aud"], REGISTRY);
    assert_eq!(claims["grant_type"], "refresh_token");
    assert_eq!(claims["appid"], CLIENT_ID);
    assert_eq!(claims["tenant"], fake.tenant_id());
    let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert_eq!(lifetime, 3 * 3_600);

    assert_eq!(fake.calls_for(Endpoint::AcrExchange, CLIENT_ID), 1);
    assert_eq!(fake.calls_for_registry(Endpoint::AcrExchange, REGISTRY), 1);
}

#[tokio::test]
async fn acr_exchange_accepts_workload_token_and_tenant() {
    let fake = start().await;
    let assertion = service_account_token(AUDIENCE, SUBJECT, unix_now() + 600);
    let response = entra_with_assertion(&fake, WORKLOAD_CLIENT_ID, &assertion).await;
    let body: Value = response.json().await.unwrap();
    let access_token = body["access_token"].as_str().unwrap();

    let response = acr_post(
        &fake,
        REGISTRY,
        "/oauth2/exchange",
        &[
            ("grant_type", "access_token"),
            ("service", REGISTRY),
            ("tenant", fake.tenant_id()),
            ("access_token", access_token),
        ],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let wrong_tenant = acr_post(
        &fake,
        REGISTRY,
        "/oauth2/exchange",
        &[
            ("grant_type", "access_token"),
            ("service", REGISTRY),
            ("tenant", "00000000-0000-0000-0000-000000000000"),
            ("access_token", access_token),
        ],
    )
    .await;
    assert_eq!(wrong_tenant.status(), StatusCode::UNAUTHORIZED);
}

/// Asserts an ACR 401 with the registry error format.
async fn assert_acr_unauthorized(response: reqwest::Response) -> Value {
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED", "body {body}");
    assert!(body["errors"][0]["message"].is_string(), "body {body}");
    body
}

#[tokio::test]
async fn acr_exchange_rejects_invalid_tokens() {
    let fake = start().await;
    assert_acr_unauthorized(exchange(&fake, REGISTRY, "garbage").await).await;

    let other_fake = start().await;
    let foreign = imds_token(&other_fake, CLIENT_ID).await;
    assert_acr_unauthorized(exchange(&fake, REGISTRY, &foreign).await).await;

    fake.set_lifetime(TokenKind::ImdsAccessToken, Duration::ZERO);
    let expired = imds_token(&fake, CLIENT_ID).await;
    assert_acr_unauthorized(exchange(&fake, REGISTRY, &expired).await).await;

    assert_eq!(fake.calls(Endpoint::AcrExchange), 3);
    assert_eq!(fake.tokens_issued(Endpoint::AcrExchange), 0);
}

#[tokio::test]
async fn acr_exchange_rejects_forbidden_registry() {
    let fake = start().await;
    let access_token = imds_token(&fake, CLIENT_ID).await;
    assert_acr_unauthorized(exchange(&fake, OTHER_REGISTRY, &access_token).await).await;
    assert_eq!(
        fake.calls_for_registry(Endpoint::AcrExchange, OTHER_REGISTRY),
        1
    );
}

#[tokio::test]
async fn acr_exchange_rejects_service_host_mismatch() {
    let fake = start().await;
    let access_token = imds_token(&fake, CLIENT_ID).await;
    let response = acr_post(
        &fake,
        OTHER_REGISTRY,
        "/oauth2/exchange",
        &[
            ("grant_type", "access_token"),
            ("service", REGISTRY),
            ("access_token", &access_token),
        ],
    )
    .await;
    assert_acr_unauthorized(response).await;

    let bad_grant = acr_post(
        &fake,
        REGISTRY,
        "/oauth2/exchange",
        &[("grant_type", "password"), ("service", REGISTRY)],
    )
    .await;
    assert_eq!(bad_grant.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn acr_exchange_injected_failures() {
    let fake = start().await;
    let access_token = imds_token(&fake, CLIENT_ID).await;

    fake.inject_failure(Endpoint::AcrExchange, Failure::status(503, 2))
        .unwrap();
    for attempt in 1..=2 {
        let response = exchange(&fake, REGISTRY, &access_token).await;
        assert_eq!(
            response.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "attempt {attempt}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
    }

    fake.inject_failure(
        Endpoint::AcrExchange,
        Failure::throttle(Duration::from_secs(11), 1),
    )
    .unwrap();
    let response = exchange(&fake, REGISTRY, &access_token).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "11");

    fake.inject_failure(Endpoint::AcrExchange, Failure::invalid_json(1))
        .unwrap();
    let response = exchange(&fake, REGISTRY, &access_token).await;
    assert!(response.json::<Value>().await.is_err());

    fake.inject_failure(Endpoint::AcrExchange, Failure::missing_fields(1))
        .unwrap();
    let response = exchange(&fake, REGISTRY, &access_token).await;
    let body: Value = response.json().await.unwrap();
    assert!(body.get("refresh_token").is_none());

    let response = exchange(&fake, REGISTRY, &access_token).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fake.calls_for(Endpoint::AcrExchange, CLIENT_ID), 6);
    assert_eq!(fake.tokens_issued(Endpoint::AcrExchange), 1);
}

#[tokio::test]
async fn acr_token_issues_scoped_access_token() {
    let fake = start().await;
    let refresh = refresh_token(&fake).await;
    let response = acr_token(&fake, REGISTRY, &refresh, "repository:team/web:pull").await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    let claims = decode_claims(body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(
        claims["access"],
        json!([{"Type": "repository", "Name": "team/web", "Actions": ["pull"]}])
    );
    assert_eq!(claims["aud"], REGISTRY);
    assert_eq!(claims["appid"], CLIENT_ID);
    let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert_eq!(lifetime, 75 * 60);

    assert_eq!(fake.calls_for(Endpoint::AcrToken, CLIENT_ID), 1);
    assert_eq!(fake.calls_for_registry(Endpoint::AcrToken, REGISTRY), 1);
    assert_eq!(fake.tokens_issued(Endpoint::AcrToken), 1);
}

#[tokio::test]
async fn acr_token_rejects_denied_scope() {
    let fake = start().await;
    let refresh = refresh_token(&fake).await;
    let response = acr_token(&fake, REGISTRY, &refresh, "repository:app:pull,push").await;
    let body = assert_acr_unauthorized(response).await;
    assert_eq!(
        body["errors"][0]["detail"],
        json!([{"Type": "repository", "Name": "app", "Action": "pull,push"}])
    );
}

#[tokio::test]
async fn acr_token_rejects_bad_refresh_tokens() {
    let fake = start().await;
    let refresh = refresh_token(&fake).await;

    assert_acr_unauthorized(acr_token(&fake, REGISTRY, "garbage", "repository:app:pull").await)
        .await;
    let other_registry = acr_token(&fake, OTHER_REGISTRY, &refresh, "repository:app:pull").await;
    assert_acr_unauthorized(other_registry).await;

    let access_token = imds_token(&fake, CLIENT_ID).await;
    assert_acr_unauthorized(acr_token(&fake, REGISTRY, &access_token, "repository:app:pull").await)
        .await;

    fake.set_lifetime(TokenKind::AcrRefreshToken, Duration::ZERO);
    let expired = refresh_token(&fake).await;
    assert_acr_unauthorized(acr_token(&fake, REGISTRY, &expired, "repository:app:pull").await)
        .await;
}

#[tokio::test]
async fn acr_token_injected_failures_by_registry() {
    let fake = FakeAzure::start(FakeAzureConfig::allow_all())
        .await
        .unwrap();
    let access_token = imds_token(&fake, CLIENT_ID).await;
    let mut refresh_tokens = Vec::new();
    for registry in [REGISTRY, OTHER_REGISTRY] {
        let response = exchange(&fake, registry, &access_token).await;
        let body: Value = response.json().await.unwrap();
        refresh_tokens.push(body["refresh_token"].as_str().unwrap().to_owned());
    }
    fake.inject_failure(
        Endpoint::AcrToken,
        Failure::status(500, 1).for_registry(OTHER_REGISTRY),
    )
    .unwrap();

    let scope = "repository:app:pull";
    let unaffected = acr_token(&fake, REGISTRY, &refresh_tokens[0], scope).await;
    assert_eq!(unaffected.status(), StatusCode::OK);
    let failed = acr_token(&fake, OTHER_REGISTRY, &refresh_tokens[1], scope).await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let recovered = acr_token(&fake, OTHER_REGISTRY, &refresh_tokens[1], scope).await;
    assert_eq!(recovered.status(), StatusCode::OK);

    fake.inject_failure(Endpoint::AcrToken, Failure::invalid_json(1))
        .unwrap();
    let response = acr_token(&fake, REGISTRY, &refresh_tokens[0], scope).await;
    assert!(response.json::<Value>().await.is_err());
    fake.inject_failure(Endpoint::AcrToken, Failure::missing_fields(1))
        .unwrap();
    let response = acr_token(&fake, REGISTRY, &refresh_tokens[0], scope).await;
    let body: Value = response.json().await.unwrap();
    assert!(body.get("access_token").is_none());
    fake.inject_failure(
        Endpoint::AcrToken,
        Failure::throttle(Duration::from_secs(2), 1),
    )
    .unwrap();
    let response = acr_token(&fake, REGISTRY, &refresh_tokens[0], scope).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "2");

    assert_eq!(fake.calls_for_registry(Endpoint::AcrToken, REGISTRY), 4);
    assert_eq!(
        fake.calls_for_registry(Endpoint::AcrToken, OTHER_REGISTRY),
        2
    );
    assert_eq!(fake.tokens_issued(Endpoint::AcrToken), 2);

    fake.reset_counters();
    assert_eq!(fake.calls(Endpoint::AcrToken), 0);
    assert!(fake.call_counts().is_empty());
}

#[tokio::test]
async fn acr_rules_replaced_at_run_time() {
    let fake = start().await;
    let refresh = refresh_token(&fake).await;
    fake.set_rules(AccessRules::new(vec![IdentityRule::new(CLIENT_ID)]));
    let response = acr_token(&fake, REGISTRY, &refresh, "repository:app:pull").await;
    assert_acr_unauthorized(response).await;
}

#[tokio::test]
async fn acr_challenge_names_token_endpoint() {
    let fake = start().await;
    let response = https_client(&fake)
        .get(format!("https://{REGISTRY}/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response.headers()["www-authenticate"],
        format!(r#"Bearer realm="https://{REGISTRY}/oauth2/token",service="{REGISTRY}""#).as_str()
    );
}

// ---------------------------------------------------------------------------------------------
// Admin API, operator flags and lifecycle

/// Sends a GET to the admin API and parses the JSON response.
async fn admin_get(client: &Client, admin: &str, path: &str) -> Value {
    client
        .get(format!("{admin}{path}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn admin_api_failures_and_calls() {
    let fake = start().await;
    let client = plain_client();
    let admin = fake.admin_url().to_owned();

    let state = admin_get(&client, &admin, "/state").await;
    assert_eq!(state["imds_url"], fake.imds_url());
    assert_eq!(state["acr_address"], fake.acr_addr().to_string());

    let added = client
        .post(format!("{admin}/failures"))
        .json(&json!({"endpoint": "imds", "kind": "status", "status": 502, "times": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), StatusCode::NO_CONTENT);
    let pending = admin_get(&client, &admin, "/failures").await;
    assert_eq!(pending[0]["endpoint"], "imds");
    assert_eq!(pending[0]["status"], 502);
    let invalid = client
        .post(format!("{admin}/failures"))
        .json(&json!({"endpoint": "imds", "kind": "status", "status": 200}))
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status(), StatusCode::BAD_REQUEST);

    let query = [
        ("api-version", "2018-02-01"),
        ("resource", ARM_RESOURCE),
        ("client_id", CLIENT_ID),
    ];
    assert_eq!(imds(&fake, &query).await.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(imds(&fake, &query).await.status(), StatusCode::OK);

    let calls = admin_get(&client, &admin, "/calls").await;
    assert_eq!(calls["totals"]["imds"]["calls"], 2);
    assert_eq!(calls["totals"]["imds"]["tokens_issued"], 1);
    assert_eq!(calls["calls"][0]["identity"], CLIENT_ID);
    let reset = client
        .delete(format!("{admin}/calls"))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), StatusCode::NO_CONTENT);
    assert_eq!(fake.calls(Endpoint::Imds), 0);
}

#[tokio::test]
async fn admin_api_rules_latency_lifetimes() {
    let fake = start().await;
    let client = plain_client();
    let admin = fake.admin_url().to_owned();

    let replaced = client
        .put(format!("{admin}/rules"))
        .json(&json!({"identities": [{"client_id": "scripted", "registries": [{"registry": REGISTRY}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(replaced.status(), StatusCode::NO_CONTENT);
    assert_eq!(fake.rules().identities[0].client_id, "scripted");
    assert_eq!(fake.rules().identities[0].registries[0].scopes, vec!["*"]);

    let latency = client
        .post(format!("{admin}/latency"))
        .json(&json!({"endpoint": "acr_token", "millis": 250}))
        .send()
        .await
        .unwrap();
    assert_eq!(latency.status(), StatusCode::NO_CONTENT);
    let latencies = admin_get(&client, &admin, "/latency").await;
    assert_eq!(latencies["acr_token"], 250);

    let lifetime = client
        .post(format!("{admin}/lifetimes"))
        .json(&json!({"kind": "acr_refresh_token", "seconds": 600}))
        .send()
        .await
        .unwrap();
    assert_eq!(lifetime.status(), StatusCode::NO_CONTENT);
    let lifetimes = admin_get(&client, &admin, "/lifetimes").await;
    assert_eq!(lifetimes["acr_refresh_token"], 600);
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 127,
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}

#[tokio::test]
async fn operator_args_leave_no_production_endpoint() {
    let fake = start().await;
    let args = fake.operator_args();
    for flag in OPERATOR_ENDPOINT_FLAGS {
        let count = args.iter().filter(|arg| *arg == flag).count();
        assert_eq!(count, 1, "{flag} appears once in {args:?}");
    }
    assert_eq!(
        args.len(),
        2 * OPERATOR_ENDPOINT_FLAGS.len(),
        "only flag and value pairs: {args:?}"
    );

    for pair in args.chunks(2) {
        let [flag, value] = pair else { unreachable!() };
        match flag.as_str() {
            "--imds-endpoint" | "--entra-authority-host" => {
                let url =
                    reqwest::Url::parse(value).unwrap_or_else(|e| panic!("{flag} {value}: {e}"));
                let host = url
                    .host_str()
                    .unwrap()
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let ip: IpAddr = host
                    .parse()
                    .unwrap_or_else(|_| panic!("{flag} host {host} is an IP"));
                assert!(is_loopback(ip), "{flag} {value} is on loopback");
            }
            "--acr-address" => {
                let addr: SocketAddr = value
                    .parse()
                    .unwrap_or_else(|e| panic!("{flag} {value}: {e}"));
                assert!(is_loopback(addr.ip()), "{flag} {value} is on loopback");
                assert_ne!(addr.port(), 0, "{flag} has a real port");
            }
            "--extra-ca-file" => {
                let pem = std::fs::read_to_string(value).unwrap();
                assert_eq!(pem, fake.ca_pem(), "{flag} holds the fake's CA");
            }
            other => panic!("unexpected flag {other}"),
        }
    }
    assert!(fake.entra_authority_url().starts_with("https://"));
    assert!(fake.imds_url().starts_with("http://"));
}

#[tokio::test]
async fn drop_stops_listeners() {
    let fake = start().await;
    let imds_url = fake.imds_url().to_owned();
    let acr = fake.acr_addr();
    fake.inject_failure(Endpoint::Imds, Failure::hang(1))
        .unwrap();
    let held_request = tokio::spawn({
        let url = format!("{imds_url}/metadata/identity/oauth2/token?api-version=2018-02-01");
        async move {
            plain_client()
                .get(url)
                .header("Metadata", "true")
                .send()
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    fake.shutdown().await;

    let held_result = tokio::time::timeout(Duration::from_secs(5), held_request)
        .await
        .expect("a held request ends when the fake stops")
        .unwrap();
    // The listener drops its connections as it stops, so the 503 may not reach the client.
    if let Ok(response) = held_result {
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert!(
        tokio::net::TcpStream::connect(acr).await.is_err(),
        "ACR listener is closed"
    );
    let result = plain_client()
        .get(format!("{imds_url}/admin/state"))
        .send()
        .await;
    assert!(result.is_err(), "IMDS listener is closed");
}

// ---------------------------------------------------------------------------------------------
// The real azure_identity credentials against the fake

/// Sends `azure_identity`'s IMDS requests to the fake: rewrites `http://169.254.169.254` to the
/// fake's IMDS URL and rejects every other URL, so no request leaves loopback.
#[derive(Debug)]
struct RedirectImds {
    imds_url: String,
    inner: Client,
}

impl azure_core::http::HttpClient for RedirectImds {
    // The trait is declared with `async_trait`; this is the signature that macro generates.
    fn execute_request<'life0, 'life1, 'async_trait>(
        &'life0 self,
        request: &'life1 azure_core::http::Request,
    ) -> Pin<
        Box<
            dyn Future<Output = azure_core::Result<azure_core::http::AsyncRawResponse>>
                + Send
                + 'async_trait,
        >,
    >
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let original = request.url().as_str();
            let Some(path) = original.strip_prefix("http://169.254.169.254/") else {
                return Err(azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Other,
                    format!("refusing to send a request outside the fake: {original}"),
                ));
            };
            let mut redirected = request.clone();
            *redirected.url_mut() =
                azure_core::http::Url::parse(&format!("{}/{path}", self.imds_url))?;
            self.inner.execute_request(&redirected).await
        })
    }
}

fn managed_identity_credential(
    fake: &FakeAzure,
    id: azure_identity::UserAssignedId,
) -> Arc<azure_identity::ManagedIdentityCredential> {
    let transport = azure_core::http::Transport::new(Arc::new(RedirectImds {
        imds_url: fake.imds_url().to_owned(),
        inner: plain_client(),
    }));
    let options = azure_identity::ManagedIdentityCredentialOptions {
        user_assigned_id: Some(id),
        client_options: azure_core::http::ClientOptions {
            transport: Some(transport),
            ..Default::default()
        },
    };
    azure_identity::ManagedIdentityCredential::new(Some(options)).expect("credential builds")
}

#[tokio::test]
async fn azure_identity_managed_identity_gets_token() {
    use azure_core::credentials::TokenCredential as _;

    let fake = start().await;
    for id in [
        azure_identity::UserAssignedId::ClientId(CLIENT_ID.to_owned()),
        azure_identity::UserAssignedId::ObjectId(OBJECT_ID.to_owned()),
        azure_identity::UserAssignedId::ResourceId(RESOURCE_ID.to_owned()),
    ] {
        let credential = managed_identity_credential(&fake, id.clone());
        let token = credential
            .get_token(&[ARM_SCOPE], None)
            .await
            .unwrap_or_else(|e| panic!("{id:?} gets a token: {e}"));
        let claims = decode_claims(token.token.secret()).unwrap();
        assert_eq!(claims["appid"], CLIENT_ID, "{id:?}");
        assert_eq!(
            u64::try_from(token.expires_on.unix_timestamp()).unwrap(),
            claims["exp"].as_u64().unwrap(),
            "{id:?} expiry parsed from expires_on"
        );
    }
    assert_eq!(fake.tokens_issued(Endpoint::Imds), 3);

    let access_token = {
        let credential = managed_identity_credential(
            &fake,
            azure_identity::UserAssignedId::ClientId(CLIENT_ID.to_owned()),
        );
        credential
            .get_token(&[ARM_SCOPE], None)
            .await
            .unwrap()
            .token
            .secret()
            .to_owned()
    };
    let response = exchange(&fake, REGISTRY, &access_token).await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn azure_identity_managed_identity_unknown_fails() {
    use azure_core::credentials::TokenCredential as _;

    let fake = start().await;
    let credential = managed_identity_credential(
        &fake,
        azure_identity::UserAssignedId::ClientId("unknown".to_owned()),
    );
    let error = credential.get_token(&[ARM_SCOPE], None).await.unwrap_err();
    assert!(
        error.to_string().contains("has not been assigned"),
        "error names the unassigned identity: {error}"
    );
    assert_eq!(
        fake.calls_for(Endpoint::Imds, "unknown"),
        1,
        "a 400 is not retried"
    );
}

/// A fixed client assertion, as the operator would supply a `ServiceAccount` token.
#[derive(Debug)]
struct FixedAssertion(String);

impl azure_identity::ClientAssertion for FixedAssertion {
    // The trait is declared with `async_trait`; this is the signature that macro generates.
    fn secret<'life0, 'life1, 'async_trait>(
        &'life0 self,
        _options: Option<azure_core::http::ClientMethodOptions<'life1>>,
    ) -> Pin<Box<dyn Future<Output = azure_core::Result<String>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move { Ok(self.0.clone()) })
    }
}

#[tokio::test]
async fn azure_identity_client_assertion_gets_token() {
    use azure_core::credentials::TokenCredential as _;

    let fake = start().await;
    let mut cloud = azure_core::cloud::CustomConfiguration::default();
    cloud.authority_host = fake.entra_authority_url().to_owned();
    let options = azure_identity::ClientAssertionCredentialOptions {
        client_options: azure_core::http::ClientOptions {
            transport: Some(azure_core::http::Transport::new(Arc::new(https_client(
                &fake,
            )))),
            cloud: Some(Arc::new(cloud.into())),
            ..Default::default()
        },
    };
    let assertion = FixedAssertion(service_account_token(AUDIENCE, SUBJECT, unix_now() + 600));
    let credential = azure_identity::ClientAssertionCredential::new(
        fake.tenant_id().to_owned(),
        WORKLOAD_CLIENT_ID.to_owned(),
        assertion,
        Some(options),
    )
    .expect("credential builds");

    let token = credential
        .get_token(&[ARM_SCOPE], None)
        .await
        .expect("token");
    let claims = decode_claims(token.token.secret()).unwrap();
    assert_eq!(claims["appid"], WORKLOAD_CLIENT_ID);
    assert_eq!(fake.calls_for(Endpoint::EntraToken, WORKLOAD_CLIENT_ID), 1);
}

// ---------------------------------------------------------------------------------------------
// The acrpull-fake-azure binary

#[tokio::test]
async fn binary_serves_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let rules_path = dir.path().join("rules.json");
    let rules =
        json!({"identities": [{"client_id": CLIENT_ID, "registries": [{"registry": REGISTRY}]}]});
    std::fs::write(&rules_path, rules.to_string()).unwrap();
    let state_path = dir.path().join("state.json");
    let ca_path = dir.path().join("ca.crt");

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_acrpull-fake-azure"))
        .arg("--rules")
        .arg(&rules_path)
        .arg("--state-file")
        .arg(&state_path)
        .arg("--ca-file")
        .arg(&ca_path)
        .arg("--acr-access-token-lifetime")
        .arg("120")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("acrpull-fake-azure starts");

    let deadline = Instant::now() + Duration::from_secs(20);
    while !state_path.exists() {
        assert!(Instant::now() < deadline, "state file appears within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    assert_eq!(state["ca_file"], ca_path.display().to_string());
    assert_eq!(
        std::fs::read_to_string(&ca_path).unwrap().lines().next(),
        Some("-----BEGIN CERTIFICATE-----")
    );
    let imds_url = state["imds_url"].as_str().unwrap();
    let flags: Vec<&str> = state["operator_args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(flags.contains(&"--acr-address"));

    let query = |client_id: &str| {
        reqwest::Url::parse_with_params(
            &format!("{imds_url}/metadata/identity/oauth2/token"),
            [
                ("api-version", "2018-02-01"),
                ("resource", ARM_RESOURCE),
                ("client_id", client_id),
            ],
        )
        .unwrap()
    };
    let known = plain_client()
        .get(query(CLIENT_ID))
        .header("Metadata", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(known.status(), StatusCode::OK);
    let unknown = plain_client()
        .get(query("unknown"))
        .header("Metadata", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    let lifetimes = admin_get(
        &plain_client(),
        state["admin_url"].as_str().unwrap(),
        "/lifetimes",
    )
    .await;
    assert_eq!(lifetimes["acr_access_token"], 120);

    let pid = child.id().unwrap().to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the fake exits within 10 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(!state_path.exists(), "the state file is removed on exit");
}
