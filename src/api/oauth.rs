//! The OAuth 2.0 token endpoint (RFC 6749 §4.4, client credentials), served
//! on the broker's own port beside gRPC, as DCV's broker does:
//! `POST /oauth2/token?grant_type=client_credentials` with HTTP Basic
//! authentication answers `{"access_token", "token_type", "expires_in",
//! "scope"}`. It is plain HTTP (1.1 or 2), so curl, Python's requests and
//! DCV's own clients can use it.
//!
//! The HTTP gate (`api::gate`) routes `/oauth2/...` here, in front of the
//! gRPC layers: a token request takes no gRPC concurrency slot and is
//! never answered in gRPC. It has a budget of its own instead
//! ([`Limits`]): a bounded number of requests waiting for a secret check,
//! each for a bounded time, and a strict per-address rate of failed
//! secrets; past them it answers HTTP 503 or 429 with `Retry-After` at
//! once.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use serde_json::json;
use tokio::{sync::Semaphore, time::Instant};
use tonic::body::Body;
use tower::Service;

use crate::{
    auth::{Auth, AuthError, ScopeSet},
    limits::{ClientKey, Limits, RateTable},
};

/// The token endpoint's path.
pub const TOKEN_PATH: &str = "/oauth2/token";

/// Largest form body read: a client id, a secret and a scope list fit in
/// far less.
const MAX_FORM_BYTES: usize = 8 * 1024;

/// The paths the endpoint answers: every one under `/oauth2/` (unknown
/// ones with 404), none of them gRPC.
pub fn is_oauth_path(path: &str) -> bool {
    path == "/oauth2" || path.starts_with("/oauth2/")
}

/// The token endpoint. Cheap to clone; clones share the budget.
#[derive(Debug, Clone)]
pub struct TokenEndpoint {
    auth: Auth,
    budget: Arc<Budget>,
}

/// What token requests may cost, shared by every connection.
#[derive(Debug)]
struct Budget {
    /// Requests waiting for or running a secret check.
    checking: Arc<Semaphore>,
    max_checking: usize,
    wait: Duration,
    /// Every token request, per address (the gRPC clients' rate).
    requests: Option<RateTable>,
    /// Failed secrets, per address.
    failures: Option<RateTable>,
    refused: AtomicU64,
}

impl TokenEndpoint {
    /// Issues tokens for `auth`'s clients within `limits`' token budget
    /// (and its per-client rate, per address).
    pub fn new(auth: Auth, limits: &Limits) -> TokenEndpoint {
        let max_checking = limits.max_token_requests.clamp(1, Semaphore::MAX_PERMITS);
        TokenEndpoint {
            auth,
            budget: Arc::new(Budget {
                checking: Arc::new(Semaphore::new(max_checking)),
                max_checking,
                wait: limits.token_wait,
                requests: limits
                    .client_rate
                    .map(|rate| RateTable::new(rate, limits.max_tracked_clients)),
                failures: limits
                    .failed_secret_rate
                    .map(|rate| RateTable::new(rate, limits.max_tracked_clients)),
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// A 429 or 503 for `source`, logged at WARN only now and then so that a
    /// flood shows without flooding the log.
    fn refuse(
        &self,
        source: &ClientKey,
        status: StatusCode,
        description: &str,
        retry_after: Duration,
    ) -> http::Response<Body> {
        let refused = self.budget.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if refused.is_power_of_two() {
            tracing::warn!(
                %source,
                refused,
                status = status.as_u16(),
                "token request refused: {description}"
            );
        } else {
            tracing::debug!(
                %source,
                status = status.as_u16(),
                "token request refused: {description}"
            );
        }
        retry_later(status, description, retry_after)
    }
}

impl Service<http::Request<Body>> for TokenEndpoint {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let endpoint = self.clone();
        Box::pin(async move {
            let response = token(&endpoint, request).await;
            let metrics = &*crate::metrics::COUNTERS;
            match &response {
                Ok(_) => {
                    metrics.tokens_issued.inc();
                }
                Err(refusal) => {
                    metrics.token_refused(crate::metrics::TokenRefusal::of_status(refusal.status()))
                }
            }
            Ok(response.unwrap_or_else(|e| e))
        })
    }
}

/// An OAuth error reply (RFC 6749 §5.2), also the shape of the HTTP gate's
/// refusals.
pub(crate) fn oauth_error(
    status: StatusCode,
    error: &str,
    description: &str,
) -> http::Response<Body> {
    let mut response = json_response(
        status,
        &json!({"error": error, "error_description": description}),
    );
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"dcv-broker\""),
        );
    }
    response
}

/// A refusal for load (503) or rate (429): the client may retry after
/// `retry_after`, rounded up to whole seconds as `Retry-After` needs.
fn retry_later(
    status: StatusCode,
    description: &str,
    retry_after: Duration,
) -> http::Response<Body> {
    let mut response = oauth_error(status, "temporarily_unavailable", description);
    let seconds = retry_after.as_nanos().div_ceil(1_000_000_000).max(1);
    if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // Tokens must never sit in a cache (RFC 6749 §5.1).
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

async fn token(
    endpoint: &TokenEndpoint,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, http::Response<Body>> {
    let budget = &*endpoint.budget;
    let bad =
        |description: &str| oauth_error(StatusCode::BAD_REQUEST, "invalid_request", description);
    if request.uri().path() != TOKEN_PATH {
        return Err(oauth_error(
            StatusCode::NOT_FOUND,
            "invalid_request",
            "the token endpoint is POST /oauth2/token",
        ));
    }
    if request.method() != Method::POST {
        let mut response = oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "the token endpoint takes POST",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return Err(response);
    }
    let source = ClientKey::of(request.extensions());
    if let Some(Err(wait)) = budget
        .requests
        .as_ref()
        .map(|table| table.admit(&source, Instant::now()))
    {
        return Err(endpoint.refuse(
            &source,
            StatusCode::TOO_MANY_REQUESTS,
            &format!("too many requests from {source}; retry later"),
            wait,
        ));
    }
    let (parts, body) = request.into_parts();
    let form = Limited::new(body, MAX_FORM_BYTES)
        .collect()
        .await
        .map_err(|_| bad("the form body is unreadable or over 8 KiB"))?
        .to_bytes();
    // DCV's clients put grant_type in the query; RFC 6749 puts everything
    // in the form body. Both are read; a parameter given twice is refused.
    let mut params: Vec<(String, String)> = Vec::new();
    for (name, value) in form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
        .chain(form_urlencoded::parse(&form))
    {
        if params.iter().any(|(n, _)| *n == name) {
            return Err(bad(&format!("parameter {name:?} is given more than once")));
        }
        params.push((name.into_owned(), value.into_owned()));
    }
    let param = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    match param("grant_type") {
        Some("client_credentials") => {}
        Some(other) => {
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                &format!("grant_type {other:?} is not supported; use client_credentials"),
            ));
        }
        None => return Err(bad("grant_type=client_credentials is missing")),
    }
    let basic = match parts.headers.get(header::AUTHORIZATION) {
        Some(value) => Some(basic_credentials(value).ok_or_else(|| {
            oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "the authorization header is not HTTP Basic with base64(client_id:client_secret)",
            )
        })?),
        None => None,
    };
    let (id, secret) = match (basic, param("client_id"), param("client_secret")) {
        (Some(basic), None, None) => basic,
        (None, Some(id), Some(secret)) => (id.to_owned(), secret.to_owned()),
        (None, None, None) => {
            return Err(oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "send the client id and secret with HTTP Basic authentication",
            ));
        }
        _ => {
            return Err(bad(
                "send the client credentials one way: HTTP Basic, or client_id and client_secret",
            ));
        }
    };
    let requested =
        // An empty scope asks for nothing in particular: the client's
        // default, all it was granted (RFC 6749 §3.3).
        match param("scope").filter(|s| !s.trim().is_empty()) {
            Some(scope) => Some(ScopeSet::parse(scope).map_err(|e| {
                oauth_error(StatusCode::BAD_REQUEST, "invalid_scope", &e.to_string())
            })?),
            None => None,
        };
    // Charged before any hashing, refunded if the secret was right: an
    // address out of failures costs nothing, however many requests it
    // sends at once.
    if let Some(Err(wait)) = budget
        .failures
        .as_ref()
        .map(|table| table.admit(&source, Instant::now()))
    {
        return Err(endpoint.refuse(
            &source,
            StatusCode::TOO_MANY_REQUESTS,
            &format!("too many failed client authentications from {source}; retry later"),
            wait,
        ));
    }
    let refund = || {
        if let Some(failures) = &budget.failures {
            failures.refund(&source, Instant::now());
        }
    };
    let Ok(_checking) = Arc::clone(&budget.checking).try_acquire_owned() else {
        refund();
        return Err(endpoint.refuse(
            &source,
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "{} token requests are being checked already; retry shortly",
                budget.max_checking
            ),
            Duration::from_secs(1),
        ));
    };
    let issued = tokio::time::timeout(
        budget.wait,
        endpoint.auth.issue_token(&id, &secret, requested),
    )
    .await
    .unwrap_or(Err(AuthError::Busy));
    if !matches!(issued, Err(AuthError::InvalidClient)) {
        refund();
    }
    match issued {
        Ok(token) => {
            tracing::info!(client = %id, scope = %token.scopes, "token issued");
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "access_token": token.access_token,
                    "token_type": token.token_type,
                    "expires_in": token.expires_in,
                    "scope": token.scopes.to_string(),
                }),
            ))
        }
        Err(AuthError::InvalidClient) => {
            tracing::info!(client = %id, %source, "token refused: invalid client credentials");
            Err(oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "unknown client, wrong secret, or a revoked client",
            ))
        }
        Err(AuthError::ScopeNotGranted(scope)) => Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            &format!("scope {scope:?} is not granted to this client"),
        )),
        Err(AuthError::Busy) => Err(endpoint.refuse(
            &source,
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "the secret could not be checked within {} ms; retry shortly",
                budget.wait.as_millis()
            ),
            Duration::from_secs(1),
        )),
        Err(e) => {
            tracing::error!(error = %e, "token endpoint failed");
            Err(oauth_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal error; see the broker's log",
            ))
        }
    }
}

/// `Basic base64(client_id ":" client_secret)`, each part form-encoded
/// (RFC 6749 §2.3.1).
fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let (scheme, encoded) = value.to_str().ok()?.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |s: &str| {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    Some((unescape(id)?, unescape(secret)?))
}
