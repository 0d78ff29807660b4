//! The JSON admin API on the plain HTTP port, for scripts and black-box tests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Shared;
use super::common::json_response;
use super::control::{Endpoint, PendingFailure};
use super::rules::AccessRules;
use super::tokens::TokenKind;

/// Returns the admin routes, all under `/admin`.
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/admin/state", get(state))
        .route("/admin/calls", get(calls).delete(reset_calls))
        .route(
            "/admin/failures",
            get(failures).post(add_failure).delete(clear_failures),
        )
        .route("/admin/rules", get(rules).put(set_rules).post(set_rules))
        .route("/admin/latency", get(latency).post(set_latency))
        .route("/admin/lifetimes", get(lifetimes).post(set_lifetime))
}

fn admin_error(message: &str) -> Response {
    json_response(StatusCode::BAD_REQUEST, &json!({"error": message}))
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

async fn state(State(shared): State<Arc<Shared>>) -> Response {
    Json(&shared.info).into_response()
}

async fn calls(State(shared): State<Arc<Shared>>) -> Response {
    let calls = shared.call_counts();
    let mut totals: BTreeMap<Endpoint, Value> = BTreeMap::new();
    for endpoint in Endpoint::ALL {
        let (requests, tokens) = calls
            .iter()
            .filter(|count| count.endpoint == endpoint)
            .fold((0, 0), |(requests, tokens), count| {
                (requests + count.calls, tokens + count.tokens_issued)
            });
        totals.insert(
            endpoint,
            json!({"calls": requests, "tokens_issued": tokens}),
        );
    }
    Json(json!({"totals": totals, "calls": calls})).into_response()
}

async fn reset_calls(State(shared): State<Arc<Shared>>) -> Response {
    shared.reset_counters();
    no_content()
}

async fn failures(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.pending_failures()).into_response()
}

async fn add_failure(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<PendingFailure>, JsonRejection>,
) -> Response {
    let Json(pending) = match body {
        Ok(body) => body,
        Err(rejection) => return admin_error(&rejection.body_text()),
    };
    match shared.inject_failure(pending.endpoint, pending.failure) {
        Ok(()) => no_content(),
        Err(error) => admin_error(&format!("{error:#}")),
    }
}

async fn clear_failures(State(shared): State<Arc<Shared>>) -> Response {
    shared.clear_failures();
    no_content()
}

async fn rules(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.rules()).into_response()
}

async fn set_rules(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<AccessRules>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(rules)) => {
            shared.set_rules(rules);
            no_content()
        }
        Err(rejection) => admin_error(&rejection.body_text()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LatencyRequest {
    endpoint: Endpoint,
    millis: u64,
}

async fn latency(State(shared): State<Arc<Shared>>) -> Response {
    let millis: BTreeMap<Endpoint, u128> = Endpoint::ALL
        .into_iter()
        .map(|endpoint| (endpoint, shared.latency(endpoint).as_millis()))
        .collect();
    Json(millis).into_response()
}

async fn set_latency(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<LatencyRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(request)) => {
            shared.set_latency(request.endpoint, Duration::from_millis(request.millis));
            no_content()
        }
        Err(rejection) => admin_error(&rejection.body_text()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LifetimeRequest {
    kind: TokenKind,
    seconds: u64,
}

async fn lifetimes(State(shared): State<Arc<Shared>>) -> Response {
    let lifetimes = shared.lifetimes();
    let seconds: BTreeMap<&str, u64> = TokenKind::ALL
        .into_iter()
        .map(|kind| (kind.as_str(), lifetimes.get(kind).as_secs()))
        .collect();
    Json(seconds).into_response()
}

async fn set_lifetime(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<LifetimeRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(request)) => {
            shared.set_lifetime(request.kind, Duration::from_secs(request.seconds));
            no_content()
        }
        Err(rejection) => admin_error(&rejection.body_text()),
    }
}
