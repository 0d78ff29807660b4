//! The registry side of the token exchange: `/oauth2/exchange` and `/oauth2/token`.

use std::time::Duration;

use serde::Deserialize;

use acrpull_actors::model::TokenError;

/// Maximum number of characters of a registry error body copied into an error message.
const MAX_ERROR_BODY_CHARS: usize = 200;

/// Exchanges an Entra ID access token for a registry refresh token.
///
/// # Errors
/// Returns a [`TokenError`] that names the failed registry call and whether a retry may help.
pub async fn exchange_refresh_token(
    client: &reqwest::Client,
    server: &str,
    entra_token: &str,
    tenant: Option<&str>,
) -> Result<String, TokenError> {
    #[derive(Deserialize)]
    struct ExchangeResponse {
        refresh_token: String,
    }

    let mut form = vec![
        ("grant_type", "access_token"),
        ("service", server),
        ("access_token", entra_token),
    ];
    if let Some(tenant) = tenant {
        form.push(("tenant", tenant));
    }

    let url = format!("https://{server}/oauth2/exchange");
    let response: ExchangeResponse = post_form(
        client,
        &url,
        &form,
        "exchange the Azure token for a refresh token",
    )
    .await?;
    Ok(response.refresh_token)
}

/// Exchanges a registry refresh token for an access token limited to `scope`.
///
/// # Errors
/// Returns a [`TokenError`] that names the failed registry call and whether a retry may help.
pub async fn scoped_access_token(
    client: &reqwest::Client,
    server: &str,
    refresh_token: &str,
    scope: &str,
) -> Result<String, TokenError> {
    #[derive(Deserialize)]
    struct TokenResponse {
        access_token: String,
    }

    let form = [
        ("grant_type", "refresh_token"),
        ("service", server),
        ("scope", scope),
        ("refresh_token", refresh_token),
    ];
    let url = format!("https://{server}/oauth2/token");
    let response: TokenResponse =
        post_form(client, &url, &form, "get an access token for the scope").await?;
    Ok(response.access_token)
}

async fn post_form<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
    form: &[(&str, &str)],
    purpose: &str,
) -> Result<T, TokenError> {
    let response = client.post(url).form(form).send().await.map_err(|error| {
        let what = if error.is_timeout() {
            "timed out"
        } else {
            "failed"
        };
        TokenError {
            message: format!(
                "registry request to {url} {what} ({purpose}): {}",
                without_url(&error)
            ),
            retryable: true,
            retry_after: None,
        }
    })?;

    let status = response.status();
    if !status.is_success() {
        let retry_after = retry_after(response.headers());
        let body = response.text().await.unwrap_or_default();
        let hint = match status.as_u16() {
            401 | 403 => {
                "; check that the identity has the AcrPull role on this registry and that the scope names an existing repository"
            }
            404 => "; check that spec.acrServer names an existing registry",
            _ => "",
        };
        return Err(TokenError {
            message: format!(
                "registry rejected the request to {url} ({purpose}) with HTTP {status}: {}{hint}",
                truncate(body.trim(), MAX_ERROR_BODY_CHARS)
            ),
            retryable: status.as_u16() == 429 || status.is_server_error() || status.as_u16() == 408,
            retry_after,
        });
    }

    let bytes = response.bytes().await.map_err(|error| TokenError {
        message: format!(
            "failed to read the registry response from {url} ({purpose}): {}",
            without_url(&error)
        ),
        retryable: true,
        retry_after: None,
    })?;
    serde_json::from_slice(&bytes).map_err(|error| TokenError {
        message: format!(
            "the registry response from {url} ({purpose}) is not the expected JSON: {error}"
        ),
        retryable: true,
        retry_after: None,
    })
}

/// Reads `Retry-After` given in seconds; the HTTP-date form is ignored.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(&format!(" ({url})"), "");
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn truncate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max_chars).collect();
    out.push('…');
    out
}
