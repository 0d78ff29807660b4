//! Run-time controls of the fake: endpoints, call counters and injected failures.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use anyhow::{bail, ensure};
use serde::{Deserialize, Serialize};

/// An Azure endpoint the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// IMDS `GET /metadata/identity/oauth2/token`.
    Imds,
    /// Entra ID `POST /{tenant}/oauth2/v2.0/token`.
    EntraToken,
    /// ACR `POST /oauth2/exchange`, which returns a refresh token.
    AcrExchange,
    /// ACR `POST /oauth2/token`, which returns a scoped access token.
    AcrToken,
}

impl Endpoint {
    /// Every endpoint, in a stable order.
    pub const ALL: [Endpoint; 4] = [
        Endpoint::Imds,
        Endpoint::EntraToken,
        Endpoint::AcrExchange,
        Endpoint::AcrToken,
    ];

    /// Returns the name used in the admin API and in logs.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Imds => "imds",
            Endpoint::EntraToken => "entra_token",
            Endpoint::AcrExchange => "acr_exchange",
            Endpoint::AcrToken => "acr_token",
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts of requests to one endpoint from one identity for one registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallCount {
    /// The endpoint called.
    pub endpoint: Endpoint,
    /// The identity as the request named it. For IMDS it is the `client_id`, `object_id` or
    /// `msi_res_id` value, empty for the system-assigned identity. For Entra ID it is the
    /// `client_id` form field. For ACR it is the `appid` claim of the presented token, empty if
    /// the token has none.
    pub identity: String,
    /// The registry named by an ACR request, absent for IMDS and Entra ID.
    pub registry: Option<String>,
    /// Requests received, including rejected ones and injected failures.
    pub calls: u64,
    /// Requests that returned a token.
    pub tokens_issued: u64,
}

type CallKey = (Endpoint, String, Option<String>);

/// Request counters, keyed by endpoint, identity and registry.
#[derive(Default)]
pub(crate) struct CallCounters {
    counts: BTreeMap<CallKey, (u64, u64)>,
}

impl CallCounters {
    pub(crate) fn record_call(
        &mut self,
        endpoint: Endpoint,
        identity: &str,
        registry: Option<&str>,
    ) {
        self.entry(endpoint, identity, registry).0 += 1;
    }

    pub(crate) fn record_token(
        &mut self,
        endpoint: Endpoint,
        identity: &str,
        registry: Option<&str>,
    ) {
        self.entry(endpoint, identity, registry).1 += 1;
    }

    pub(crate) fn snapshot(&self) -> Vec<CallCount> {
        self.counts
            .iter()
            .map(
                |((endpoint, identity, registry), (calls, tokens_issued))| CallCount {
                    endpoint: *endpoint,
                    identity: identity.clone(),
                    registry: registry.clone(),
                    calls: *calls,
                    tokens_issued: *tokens_issued,
                },
            )
            .collect()
    }

    pub(crate) fn clear(&mut self) {
        self.counts.clear();
    }

    fn entry(
        &mut self,
        endpoint: Endpoint,
        identity: &str,
        registry: Option<&str>,
    ) -> &mut (u64, u64) {
        self.counts
            .entry((
                endpoint,
                identity.to_owned(),
                registry.map(str::to_ascii_lowercase),
            ))
            .or_default()
    }
}

/// The effect of an injected failure on a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FailureKind {
    /// Responds with this HTTP status (400 to 599) and the endpoint's usual error body.
    Status {
        /// The HTTP status code.
        status: u16,
        /// The `Retry-After` header value in seconds, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_secs: Option<u64>,
    },
    /// Responds 429 Too Many Requests with a `Retry-After` header.
    Throttle {
        /// The `Retry-After` header value in seconds.
        retry_after_secs: u64,
    },
    /// Sends no response: keeps the request open until the client gives up or the fake stops.
    Hang,
    /// Responds 200 with a body that is not valid JSON.
    InvalidJson,
    /// Responds 200 with valid JSON that lacks the token field.
    MissingFields,
}

/// A failure to inject into the next matching requests to one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The effect of the failure.
    #[serde(flatten)]
    pub kind: FailureKind,
    /// How many matching requests fail. Must be at least 1.
    #[serde(default = "one")]
    pub times: u32,
    /// Only requests from this identity fail (see [`CallCount::identity`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Only requests for this registry fail (ACR endpoints only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
}

fn one() -> u32 {
    1
}

impl Failure {
    fn of(kind: FailureKind, times: u32) -> Self {
        Self {
            kind,
            times,
            identity: None,
            registry: None,
        }
    }

    /// Fails the next `times` requests with HTTP `status` and the endpoint's error body.
    #[must_use]
    pub fn status(status: u16, times: u32) -> Self {
        Self::of(
            FailureKind::Status {
                status,
                retry_after_secs: None,
            },
            times,
        )
    }

    /// Fails the next `times` requests with 429 and `Retry-After` in whole seconds.
    #[must_use]
    pub fn throttle(retry_after: Duration, times: u32) -> Self {
        Self::of(
            FailureKind::Throttle {
                retry_after_secs: retry_after.as_secs(),
            },
            times,
        )
    }

    /// Keeps the next `times` requests open without a response.
    #[must_use]
    pub fn hang(times: u32) -> Self {
        Self::of(FailureKind::Hang, times)
    }

    /// Responds to the next `times` requests with 200 and a body that is not valid JSON.
    #[must_use]
    pub fn invalid_json(times: u32) -> Self {
        Self::of(FailureKind::InvalidJson, times)
    }

    /// Responds to the next `times` requests with 200 and JSON that lacks the token field.
    #[must_use]
    pub fn missing_fields(times: u32) -> Self {
        Self::of(FailureKind::MissingFields, times)
    }

    /// Limits the failure to requests from one identity.
    #[must_use]
    pub fn for_identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = Some(identity.into());
        self
    }

    /// Limits the failure to requests for one registry.
    #[must_use]
    pub fn for_registry(mut self, registry: impl Into<String>) -> Self {
        self.registry = Some(registry.into());
        self
    }

    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.times >= 1,
            "an injected failure must apply to at least 1 request, got times = 0"
        );
        if let FailureKind::Status { status, .. } = self.kind
            && !(400..=599).contains(&status)
        {
            bail!("an injected failure status must be 400 to 599, got {status}");
        }
        Ok(())
    }

    fn matches(&self, identity: &str, registry: Option<&str>) -> bool {
        let identity_matches = self
            .identity
            .as_deref()
            .is_none_or(|wanted| wanted == identity);
        let registry_matches = self.registry.as_deref().is_none_or(|wanted| {
            registry.is_some_and(|registry| registry.eq_ignore_ascii_case(wanted))
        });
        identity_matches && registry_matches
    }
}

/// A failure waiting in the queue of one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingFailure {
    /// The endpoint whose requests fail.
    pub endpoint: Endpoint,
    /// The failure, with `times` counting the requests still to fail.
    #[serde(flatten)]
    pub failure: Failure,
}

/// Injected failures, consumed in the order they were added.
#[derive(Default)]
pub(crate) struct FailureQueue {
    pending: Vec<PendingFailure>,
}

impl FailureQueue {
    pub(crate) fn push(&mut self, endpoint: Endpoint, failure: Failure) {
        self.pending.push(PendingFailure { endpoint, failure });
    }

    /// Takes one use of the oldest failure that matches the request.
    pub(crate) fn take(
        &mut self,
        endpoint: Endpoint,
        identity: &str,
        registry: Option<&str>,
    ) -> Option<FailureKind> {
        let index = self.pending.iter().position(|pending| {
            pending.endpoint == endpoint && pending.failure.matches(identity, registry)
        })?;
        let pending = &mut self.pending[index];
        let kind = pending.failure.kind.clone();
        pending.failure.times -= 1;
        if pending.failure.times == 0 {
            self.pending.remove(index);
        }
        Some(kind)
    }

    pub(crate) fn list(&self) -> Vec<PendingFailure> {
        self.pending.clone()
    }

    pub(crate) fn clear(&mut self) {
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_consumes_in_order() {
        let mut queue = FailureQueue::default();
        queue.push(Endpoint::Imds, Failure::status(500, 2));
        queue.push(Endpoint::Imds, Failure::hang(1));
        let status_500 = FailureKind::Status {
            status: 500,
            retry_after_secs: None,
        };
        assert_eq!(
            queue.take(Endpoint::Imds, "a", None),
            Some(status_500.clone())
        );
        assert_eq!(queue.take(Endpoint::AcrToken, "a", None), None);
        assert_eq!(queue.take(Endpoint::Imds, "a", None), Some(status_500));
        assert_eq!(
            queue.take(Endpoint::Imds, "a", None),
            Some(FailureKind::Hang)
        );
        assert_eq!(queue.take(Endpoint::Imds, "a", None), None);
    }

    #[test]
    fn queue_filters_by_identity_and_registry() {
        let mut queue = FailureQueue::default();
        queue.push(
            Endpoint::AcrToken,
            Failure::invalid_json(1)
                .for_identity("a")
                .for_registry("r.azurecr.io"),
        );
        assert_eq!(
            queue.take(Endpoint::AcrToken, "b", Some("r.azurecr.io")),
            None
        );
        assert_eq!(
            queue.take(Endpoint::AcrToken, "a", Some("s.azurecr.io")),
            None
        );
        assert_eq!(
            queue.take(Endpoint::AcrToken, "a", Some("R.azurecr.io")),
            Some(FailureKind::InvalidJson)
        );
    }

    #[test]
    fn failure_json_shape() {
        let failure: Failure =
            serde_json::from_str(r#"{"kind":"status","status":503,"times":2}"#).unwrap();
        assert_eq!(failure, Failure::status(503, 2));
        let throttle: Failure =
            serde_json::from_str(r#"{"kind":"throttle","retry_after_secs":7}"#).unwrap();
        assert_eq!(throttle, Failure::throttle(Duration::from_secs(7), 1));
    }

    #[test]
    fn validate_rejects_bad_values() {
        assert!(Failure::status(200, 1).validate().is_err());
        assert!(Failure::hang(0).validate().is_err());
        assert!(Failure::status(503, 1).validate().is_ok());
    }
}
