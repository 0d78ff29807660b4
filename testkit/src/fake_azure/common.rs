//! Request handling shared by every endpoint: counting, latency, injected failures and the
//! error body each Azure service sends.

use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse as _, Response};
use serde_json::{Value, json};
use tracing::{debug, info};

use super::Shared;
use super::control::{Endpoint, FailureKind};
use super::tokens::{random_id, unix_now};

/// The message ACR sends with most 401 responses.
pub(crate) const ACR_UNAUTHORIZED_MESSAGE: &str =
    "authentication required, visit https://aka.ms/acr/authorization for more information.";

/// Runs one request: counts it, waits the configured latency, responds with an injected failure
/// if one matches, and otherwise runs `handler`. A 200 response from `handler` counts as an
/// issued token.
pub(crate) async fn handle(
    shared: &Shared,
    endpoint: Endpoint,
    identity: &str,
    registry: Option<&str>,
    handler: impl FnOnce() -> Response,
) -> Response {
    shared
        .counters
        .lock()
        .expect("call counter lock poisoned")
        .record_call(endpoint, identity, registry);

    let latency = shared.latency(endpoint);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let failure = shared
        .failures
        .lock()
        .expect("failure queue lock poisoned")
        .take(endpoint, identity, registry);
    if let Some(failure) = failure {
        info!(%endpoint, identity, registry, ?failure, "injecting a failure");
        return failure_response(shared, endpoint, &failure).await;
    }

    let response = handler();
    let status = response.status();
    debug!(%endpoint, identity, registry, status = status.as_u16(), "responded to a request");
    if status == StatusCode::OK {
        shared
            .counters
            .lock()
            .expect("call counter lock poisoned")
            .record_token(endpoint, identity, registry);
    }
    response
}

async fn failure_response(shared: &Shared, endpoint: Endpoint, failure: &FailureKind) -> Response {
    match failure {
        FailureKind::Status {
            status,
            retry_after_secs,
        } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = error_for_status(endpoint, status);
            if let Some(seconds) = retry_after_secs {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*seconds));
            }
            response
        }
        FailureKind::Throttle { retry_after_secs } => {
            let mut response = error_for_status(endpoint, StatusCode::TOO_MANY_REQUESTS);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            response
        }
        FailureKind::Hang => {
            shared.wait_for_shutdown().await;
            error_for_status(endpoint, StatusCode::SERVICE_UNAVAILABLE)
        }
        FailureKind::InvalidJson => json_text(StatusCode::OK, r#"{"access_token": "eyJ"#),
        FailureKind::MissingFields => {
            let body = match endpoint {
                Endpoint::Imds => json!({"token_type": "Bearer", "expires_in": "3599"}),
                Endpoint::EntraToken => {
                    json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599})
                }
                Endpoint::AcrExchange | Endpoint::AcrToken => json!({}),
            };
            json_response(StatusCode::OK, &body)
        }
    }
}

/// Builds the error an endpoint sends for an injected HTTP status.
fn error_for_status(endpoint: Endpoint, status: StatusCode) -> Response {
    let description = format!("injected failure: HTTP {}", status.as_u16());
    match endpoint {
        Endpoint::Imds => {
            let code = status
                .canonical_reason()
                .unwrap_or("unknown")
                .to_ascii_lowercase()
                .replace(' ', "_");
            imds_error(status, &code, &description)
        }
        Endpoint::EntraToken => {
            let transient = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
            if transient {
                entra_error(status, "temporarily_unavailable", 90_033, &description)
            } else {
                entra_error(status, "invalid_request", 50_000, &description)
            }
        }
        Endpoint::AcrExchange | Endpoint::AcrToken => {
            let code = match status {
                StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
                StatusCode::FORBIDDEN => "DENIED",
                StatusCode::NOT_FOUND => "NOT_FOUND",
                StatusCode::TOO_MANY_REQUESTS => "TOOMANYREQUESTS",
                StatusCode::SERVICE_UNAVAILABLE => "UNAVAILABLE",
                status if status.is_server_error() => "UNKNOWN",
                _ => "UNSUPPORTED",
            };
            acr_error(status, code, &description, &Value::Null)
        }
    }
}

/// Builds an IMDS error: `{"error": ..., "error_description": ...}`.
pub(crate) fn imds_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

/// Builds an Entra ID (AADSTS) error with the fields Entra ID sends.
pub(crate) fn entra_error(
    status: StatusCode,
    error: &str,
    aadsts_code: u32,
    description: &str,
) -> Response {
    let trace_id = random_id();
    let correlation_id = random_id();
    let timestamp = format_utc(unix_now());
    json_response(
        status,
        &json!({
            "error": error,
            "error_description": format!(
                "AADSTS{aadsts_code}: {description} Trace ID: {trace_id} \
                 Correlation ID: {correlation_id} Timestamp: {timestamp}"
            ),
            "error_codes": [aadsts_code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": format!("https://login.microsoftonline.com/error?code={aadsts_code}"),
        }),
    )
}

/// Builds an ACR error in the registry error format: `{"errors": [{"code", "message",
/// "detail"}]}`.
pub(crate) fn acr_error(status: StatusCode, code: &str, message: &str, detail: &Value) -> Response {
    json_response(
        status,
        &json!({"errors": [{"code": code, "message": message, "detail": detail}]}),
    )
}

pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response {
    json_text(status, &body.to_string())
}

fn json_text(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body.to_owned(),
    )
        .into_response()
}

/// Returns the host a request was sent to, lower-cased and without the port.
pub(crate) fn request_host(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    let authority = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(ToString::to_string))?;
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    Some(host.to_ascii_lowercase())
}

/// Formats Unix seconds as `YYYY-MM-DD hh:mm:ssZ`, the timestamp form of Entra ID errors.
pub(crate) fn format_utc(unix_seconds: u64) -> String {
    let days = i64::try_from(unix_seconds / 86_400).unwrap_or(0);
    let seconds_of_day = unix_seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        seconds_of_day / 3_600,
        seconds_of_day % 3_600 / 60,
        seconds_of_day % 60
    )
}

/// Converts days since 1970-01-01 to a proleptic Gregorian date, with Howard Hinnant's
/// `civil_from_days` algorithm.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_utc_known_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(format_utc(1_745_000_000), "2025-04-18 18:13:20Z");
    }

    #[test]
    fn request_host_strips_port() {
        let uri = Uri::from_static("/oauth2/token");
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("My.azurecr.io:8443"));
        assert_eq!(
            request_host(&headers, &uri).as_deref(),
            Some("my.azurecr.io")
        );
        headers.insert(header::HOST, HeaderValue::from_static("[::1]:8443"));
        assert_eq!(request_host(&headers, &uri).as_deref(), Some("::1"));
    }
}
