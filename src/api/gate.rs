//! The HTTP gate: the one layer in front of every route that decides what
//! may reach the broker at all, with every rule here.
//!
//! The port speaks two things: gRPC, and plain HTTP routes for non-gRPC
//! clients (the OAuth token endpoint, DCV servers' token verifier, DCV
//! Session Manager's REST API, `/health` and our OpenAPI document). A
//! browser can
//! reach both: any web page may POST to `http://127.0.0.1:8443` with a
//! "simple" content type (`text/plain`, forms) and no CORS preflight, and
//! a DNS-rebinding page can even read the answers. So, in this order:
//!
//! 1. **Host** (DNS rebinding): on a plaintext loopback listener, the
//!    request's Host / `:authority` must be an IP literal, `localhost`, or
//!    a name the operator allowed (`--allowed-host`); else HTTP 421. A
//!    rebinding page's requests carry its own domain name. (Over TLS the
//!    certificate check already defeats rebinding; beyond loopback the
//!    broker is reached by whatever names point at it.)
//! 2. **Cross-site** (CSRF): a request with an `Origin` that is not the
//!    broker's own, or a `Sec-Fetch-Site` other than `same-origin` or
//!    `none`, is refused with HTTP 403. Browsers send `Origin` on every
//!    POST; gRPC clients, curl and OAuth libraries send neither.
//! 3. **Routes**: `/oauth2/...` goes to the token endpoint (HTTP/1.1 or
//!    HTTP/2; 404 when authentication is off), outside the gRPC layers
//!    and their limits; `/agent/validate-authentication-token` goes to
//!    DCV's token verifier (HTTP/1.1 or HTTP/2, open: DCV servers hold no
//!    bearer token), likewise with limits of its own; `/health` answers
//!    from the broker's gRPC health (open, like gRPC health);
//!    `/dcv-session-manager-api.yaml` serves our OpenAPI document (open);
//!    `/metrics` the Prometheus metrics when they are on (open: counts,
//!    never names).
//!    DCV's REST routes (`api::rest::ROUTES`, HTTP/1.1 or HTTP/2, paths
//!    case-sensitive) are checked for method (405 with `Allow`), content
//!    type when a body comes (415 unless `application/json`) and declared
//!    length (413), then renamed to their gRPC method's path and passed on
//!    to the same layers as gRPC (authentication, scope, rate, in-flight
//!    limit), marked for `api::rest::handler::RestLayer`, which serves them
//!    innermost; a refusal from those layers comes back here in gRPC's
//!    form and leaves as the REST error reply. Everything else is gRPC and
//!    only gRPC: HTTP/2 with an `application/grpc*` content type. A gRPC
//!    method path with another content type gets HTTP 415, gRPC over
//!    HTTP/1.x gets HTTP 505, and any other path 404, all before any
//!    handler runs.
//!
//! Refusals are plain HTTP with an OAuth-shaped JSON body
//! (`{"error", "error_description"}`, and `request_id` on REST routes),
//! never a gRPC status.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Version, header, uri::Authority};
use tonic::body::Body;
use tower::ServiceExt as _;

use super::{
    oauth::{TokenEndpoint, is_oauth_path, oauth_error},
    rest::handler::{
        self as rest, HEALTH_PATH, Match, OPENAPI_PATH, RestCall, RestHold, error_reply,
    },
    verifier::{TokenVerifier, VERIFIER_PATH},
};
use crate::layer::{Policy, PolicyLayer, PolicyService, Verdict};
use crate::transport::is_grpc_content_type;

/// The HTTP gate (see the module documentation).
pub type HttpGateLayer = PolicyLayer<HttpGatePolicy>;

/// The service [`HttpGateLayer`] puts in front of the routes.
pub type HttpGate<S> = PolicyService<HttpGatePolicy, S>;

/// The policy of [`HttpGateLayer`]: its rules.
#[derive(Debug, Clone)]
pub struct HttpGatePolicy {
    shared: Arc<Shared>,
}

/// What the gate needs for the REST routes.
#[derive(Debug, Clone)]
pub struct RestGate {
    /// The broker's health, for `/health` (`None`: 404).
    pub health: Option<tonic_health::server::HealthReporter>,
    /// The largest request body, as gRPC's largest message: a declared
    /// length over it is refused here with 413.
    pub max_request_bytes: usize,
    /// Whether DCV's REST routes and our OpenAPI document are served here
    /// (false on the agents' port: they are the operators').
    pub routes: bool,
    /// The replica's role and progress, which `/health` reports when the
    /// broker is one of several.
    pub cluster: crate::cluster::ClusterView,
    /// What `GET /metrics` serves (`None`: 404, like any unknown path).
    pub metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl Default for RestGate {
    fn default() -> Self {
        RestGate {
            health: None,
            max_request_bytes: crate::limits::Limits::default().max_request_bytes,
            routes: true,
            cluster: crate::cluster::ClusterView::standalone(),
            metrics: None,
        }
    }
}

#[derive(Debug)]
struct Shared {
    token: Option<TokenEndpoint>,
    verifier: Option<TokenVerifier>,
    rest: RestGate,
    /// The scheme of the broker's own origin.
    scheme: &'static str,
    /// `None`: any Host. `Some(names)`: IP literals, `localhost` and these
    /// (lowercase) only.
    hosts: Option<Vec<String>>,
    refused: AtomicU64,
}

impl HttpGateLayer {
    /// The gate of a broker listening on `local` (over TLS when `tls`),
    /// answering the token endpoint with `token` (`None`: authentication is
    /// off, and `/oauth2/...` is 404) and DCV's token verifier with
    /// `verifier` (`None`: 404). `allowed_hosts` are the names, besides IP
    /// literals and `localhost`, that a plaintext loopback broker accepts as
    /// Host. `rest` serves `/health` and bounds REST bodies.
    pub fn new(
        token: Option<TokenEndpoint>,
        verifier: Option<TokenVerifier>,
        rest: RestGate,
        local: SocketAddr,
        tls: bool,
        allowed_hosts: &[String],
    ) -> HttpGateLayer {
        let rebindable = !tls && local.ip().to_canonical().is_loopback();
        PolicyLayer::of(HttpGatePolicy {
            shared: Arc::new(Shared {
                token,
                verifier,
                rest,
                scheme: if tls { "https" } else { "http" },
                hosts: rebindable.then(|| {
                    allowed_hosts
                        .iter()
                        .map(|name| name.trim_end_matches('.').to_ascii_lowercase())
                        .collect()
                }),
                refused: AtomicU64::new(0),
            }),
        })
    }
}

impl<B> Policy<B> for HttpGatePolicy
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A REST request's id and whether it carried a token, to answer a
    /// refusal from the layers behind in REST's form.
    type Hold = Option<RestHold>;

    fn check<E: Send + 'static>(&self, mut request: http::Request<B>) -> Verdict<B, Self::Hold, E> {
        // Forwarding headers that did not verify (see `api::forward`):
        // never trusted, with or without authentication.
        if let Some(refused) = request.extensions().get::<super::forward::ForwardRefused>() {
            // DEBUG, like the gate's other refusals of a flood: a caller
            // sending forged headers must not fill the log.
            tracing::debug!(why = %refused.0, "refused a forwarded call");
            return Verdict::Answer(
                tonic::Status::unauthenticated(format!("forwarded call refused: {}", refused.0))
                    .into_http(),
            );
        }
        match self.shared.route(&request) {
            Route::Grpc => Verdict::Pass(request, None),
            Route::Rest(call) => {
                // From here on the request is its gRPC method to every
                // layer: the scope table, the rate and the in-flight limit
                // treat it exactly as that call.
                *request.uri_mut() = http::Uri::from_static(call.route.grpc_path);
                let hold = RestHold::of(&request);
                request.extensions_mut().insert(call);
                Verdict::Pass(request, Some(hold))
            }
            Route::Health(reporter) => {
                let cluster = self.shared.rest.cluster.clone();
                Verdict::Later(Box::pin(async move {
                    Ok(rest::health(reporter, &cluster).await)
                }))
            }
            Route::Metrics(response) => Verdict::Answer(response),
            Route::Document { head } => {
                let document = super::rest::openapi::document();
                let body = if head {
                    Body::empty()
                } else {
                    Body::new(http_body_util::Full::new(Bytes::from_static(document)))
                };
                let mut response = http::Response::new(body);
                let headers = response.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static(super::rest::openapi::CONTENT_TYPE),
                );
                headers.insert(header::CONTENT_LENGTH, document.len().into());
                Verdict::Answer(response)
            }
            Route::Token(endpoint) => {
                let request = request.map(Body::new);
                Verdict::Later(Box::pin(async move {
                    let Ok(response) = endpoint.oneshot(request).await;
                    Ok(response)
                }))
            }
            Route::Verifier(verifier) => {
                let request = request.map(Body::new);
                Verdict::Later(Box::pin(async move {
                    let Ok(response) = verifier.oneshot(request).await;
                    Ok(response)
                }))
            }
            Route::Refuse(refusal) => {
                // A web page probing the broker is worth seeing, but not
                // once per request of a flood.
                let refused = self.shared.refused.fetch_add(1, Ordering::Relaxed) + 1;
                if refused.is_power_of_two() {
                    tracing::warn!(
                        status = refusal.status.as_u16(),
                        path = request.uri().path(),
                        refused,
                        "refused by the HTTP gate: {}",
                        refusal.description
                    );
                } else {
                    tracing::debug!(
                        status = refusal.status.as_u16(),
                        path = request.uri().path(),
                        "refused by the HTTP gate: {}",
                        refusal.description
                    );
                }
                let request_id = refusal
                    .rest
                    .then(|| request.extensions().get::<super::RequestId>())
                    .flatten()
                    .map(|id| id.0.to_string());
                Verdict::Answer(refusal.response(request_id.as_deref()))
            }
        }
    }

    fn respond(hold: Self::Hold, response: http::Response<Body>) -> http::Response<Body> {
        match hold {
            Some(hold) => rest::rest_refusal(hold, response),
            None => response,
        }
    }
}

/// Where a request goes.
enum Route {
    /// On to the gRPC layers and services.
    Grpc,
    /// On to the same layers as its gRPC method, then the REST handler.
    Rest(RestCall),
    /// `/health`.
    Health(tonic_health::server::HealthReporter),
    /// `/metrics`: the reply, already encoded.
    Metrics(http::Response<Body>),
    /// Our OpenAPI document (open, like DCV's); without its bytes for HEAD.
    Document { head: bool },
    /// To the token endpoint.
    Token(TokenEndpoint),
    /// To DCV's token verifier.
    Verifier(TokenVerifier),
    /// Nowhere: answered here.
    Refuse(Refusal),
}

struct Refusal {
    status: StatusCode,
    error: &'static str,
    description: String,
    /// A REST route's refusal: the body names the request id.
    rest: bool,
    /// The methods the path takes (405).
    allow: Option<&'static str>,
}

impl Refusal {
    fn route(status: StatusCode, error: &'static str, description: impl Into<String>) -> Route {
        Route::Refuse(Refusal {
            status,
            error,
            description: description.into(),
            rest: false,
            allow: None,
        })
    }

    fn rest(status: StatusCode, error: &'static str, description: impl Into<String>) -> Route {
        Route::Refuse(Refusal {
            status,
            error,
            description: description.into(),
            rest: true,
            allow: None,
        })
    }

    fn method_not_allowed(path: &str, allow: &'static str) -> Route {
        Route::Refuse(Refusal {
            status: StatusCode::METHOD_NOT_ALLOWED,
            error: "method_not_allowed",
            description: format!("{path} takes {allow} only"),
            rest: true,
            allow: Some(allow),
        })
    }

    fn response(&self, request_id: Option<&str>) -> http::Response<Body> {
        let mut response = if self.rest {
            error_reply(self.status, self.error, &self.description, request_id, None)
        } else {
            oauth_error(self.status, self.error, &self.description)
        };
        if let Some(allow) = self.allow {
            response
                .headers_mut()
                .insert(header::ALLOW, http::HeaderValue::from_static(allow));
        }
        response
    }
}

impl Shared {
    /// The rules, in order: Host, cross-site, then routes.
    fn route<B: http_body::Body>(&self, request: &http::Request<B>) -> Route {
        let headers = request.headers();
        // HTTP/2 carries :authority in the URI; HTTP/1.1 the Host header.
        // Both are checked when both are there.
        let mut authorities = Vec::with_capacity(2);
        if let Some(authority) = request.uri().authority() {
            authorities.push(authority.clone());
        }
        for host in headers.get_all(header::HOST) {
            match host.to_str().ok().and_then(|h| h.parse::<Authority>().ok()) {
                Some(authority) => authorities.push(authority),
                None => {
                    return Refusal::route(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "the Host header is not a host name",
                    );
                }
            }
        }
        if let Some(allowed) = &self.hosts
            && let Some(foreign) = authorities
                .iter()
                .find(|authority| !host_allowed(authority.host(), allowed))
        {
            return Refusal::route(
                StatusCode::MISDIRECTED_REQUEST,
                "invalid_request",
                format!(
                    "host {:?} is not served here: a plaintext broker on loopback answers \
                     IP addresses, localhost and the names given with --allowed-host",
                    foreign.host()
                ),
            );
        }

        if let Some(refusal) = self.cross_site(headers, authorities.first()) {
            return refusal;
        }

        let path = request.uri().path();
        if is_oauth_path(path) {
            return match &self.token {
                Some(endpoint) => Route::Token(endpoint.clone()),
                None => Refusal::route(
                    StatusCode::NOT_FOUND,
                    "invalid_request",
                    "this broker runs without a token endpoint: authentication is off",
                ),
            };
        }
        if path == VERIFIER_PATH {
            return match &self.verifier {
                Some(verifier) => Route::Verifier(verifier.clone()),
                None => Refusal::route(
                    StatusCode::NOT_FOUND,
                    "invalid_request",
                    "this broker runs without a token verifier",
                ),
            };
        }
        if let Some(route) = self.rest_route(request) {
            return route;
        }
        if !is_grpc_content_type(headers) {
            return if is_grpc_method_path(path) {
                Refusal::route(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "invalid_request",
                    "this is a gRPC method: send application/grpc over HTTP/2",
                )
            } else {
                Refusal::route(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("nothing is served at {path:?}"),
                )
            };
        }
        if request.version() != Version::HTTP_2 {
            return Refusal::route(
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "invalid_request",
                "gRPC is served over HTTP/2 only",
            );
        }
        Route::Grpc
    }

    /// Where a request for `/health`, the OpenAPI document or a REST route
    /// goes; `None` for other paths.
    fn rest_route<B: http_body::Body>(&self, request: &http::Request<B>) -> Option<Route> {
        let path = request.uri().path();
        let method = request.method();
        let read = method == Method::GET || method == Method::HEAD;
        if path == HEALTH_PATH {
            return Some(match (&self.rest.health, read) {
                (_, false) => Refusal::method_not_allowed(path, "GET, HEAD"),
                (Some(reporter), true) => Route::Health(reporter.clone()),
                (None, true) => Refusal::rest(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "this broker serves no health route",
                ),
            });
        }
        if path == crate::metrics::METRICS_PATH
            && let Some(metrics) = &self.rest.metrics
        {
            return Some(if read {
                let head = method == Method::HEAD;
                Route::Metrics(
                    metrics
                        .reply(request.headers().get(header::ACCEPT), head)
                        .map(|text| Body::new(http_body_util::Full::new(Bytes::from(text)))),
                )
            } else {
                Refusal::method_not_allowed(path, "GET, HEAD")
            });
        }
        if !self.rest.routes {
            return None;
        }
        if path == OPENAPI_PATH {
            return Some(if read {
                Route::Document {
                    head: method == Method::HEAD,
                }
            } else {
                Refusal::method_not_allowed(path, "GET, HEAD")
            });
        }
        if let Some(route) = super::rest::WATCH_ROUTES.iter().find(|r| r.path == path) {
            return Some(if method == Method::GET {
                Route::Rest(RestCall {
                    route,
                    params: Vec::new(),
                    query: request.uri().query().map(str::to_owned),
                })
            } else {
                Refusal::method_not_allowed(path, "GET")
            });
        }
        let (route, params) = match rest::find(method, path) {
            Match::Route(route, params) => (route, params),
            Match::WrongMethod(allow) => return Some(Refusal::method_not_allowed(path, allow)),
            Match::None => return None,
        };
        let headers = request.headers();
        let body = request.body();
        // What hyper knows before any byte of the body: its declared
        // length. An undeclared one is bounded while it is read.
        if body.size_hint().lower() > self.rest.max_request_bytes as u64 {
            return Some(Refusal::rest(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "the request body is over the broker's limit of {} bytes",
                    self.rest.max_request_bytes
                ),
            ));
        }
        if !body.is_end_stream() && !rest::is_json(headers.get(header::CONTENT_TYPE)) {
            return Some(Refusal::rest(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                rest::NOT_JSON,
            ));
        }
        let query = request.uri().query().map(str::to_owned);
        Some(Route::Rest(RestCall {
            route,
            params,
            query,
        }))
    }

    /// A refusal when the request comes from another site's page.
    fn cross_site(&self, headers: &HeaderMap, own: Option<&Authority>) -> Option<Route> {
        // `same-origin` and `none` (typed by the user) are the browser's
        // own word that no other site is behind the request.
        for value in headers.get_all("sec-fetch-site") {
            if !matches!(value.as_bytes(), b"same-origin" | b"none") {
                return Some(Refusal::route(
                    StatusCode::FORBIDDEN,
                    "invalid_request",
                    "cross-site requests are refused (Sec-Fetch-Site)",
                ));
            }
        }
        for origin in headers.get_all(header::ORIGIN) {
            let same = origin
                .to_str()
                .ok()
                .and_then(|origin| origin.parse::<http::Uri>().ok())
                .zip(own)
                .is_some_and(|(origin, own)| self.is_own_origin(&origin, own));
            if !same {
                return Some(Refusal::route(
                    StatusCode::FORBIDDEN,
                    "invalid_request",
                    "cross-origin requests are refused (Origin is not this broker)",
                ));
            }
        }
        None
    }

    /// Whether `origin` is `scheme://host[:port]` of this broker as the
    /// request addressed it.
    fn is_own_origin(&self, origin: &http::Uri, own: &Authority) -> bool {
        let default_port = if self.scheme == "https" { 443 } else { 80 };
        origin.scheme_str() == Some(self.scheme)
            && origin.path_and_query().is_none_or(|p| p.as_str() == "/")
            && origin
                .authority()
                .is_some_and(|a| a.host().eq_ignore_ascii_case(own.host()))
            && origin.port_u16().unwrap_or(default_port) == own.port_u16().unwrap_or(default_port)
    }
}

/// Whether `host` may address a plaintext loopback broker: an IP literal
/// (a rebinding page cannot make the browser send one for its origin),
/// `localhost`, or a configured name.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        return true;
    }
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || allowed.contains(&name)
}

/// `/package.Service/Method`: a path tonic would route to a gRPC service
/// (every service here has a package: `/sessionConnectionData/a` is not
/// one).
fn is_grpc_method_path(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .is_some_and(|(service, method)| {
            service.contains('.') && !method.is_empty() && !method.contains('/')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(tls: bool, local: &str, allowed: &[&str]) -> Arc<Shared> {
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        let layer = HttpGateLayer::new(
            None,
            None,
            RestGate::default(),
            local.parse().unwrap(),
            tls,
            &allowed,
        );
        layer.policy().shared.clone()
    }

    fn grpc(host: &str, path: &str) -> http::Request<String> {
        http::Request::builder()
            .version(Version::HTTP_2)
            .uri(format!("http://{host}{path}"))
            .header(header::CONTENT_TYPE, "application/grpc")
            .body(String::new())
            .unwrap()
    }

    fn status(route: Route) -> Option<StatusCode> {
        match route {
            Route::Refuse(refusal) => Some(refusal.status),
            _ => None,
        }
    }

    const CLOSE: &str = "/dcv.sessionmanager.v1.Servers/CloseServers";

    #[test]
    fn grpc_passes_only_as_grpc() {
        let g = gate(false, "127.0.0.1:8443", &[]);
        assert_eq!(status(g.route(&grpc("127.0.0.1:8443", CLOSE))), None);
        assert_eq!(status(g.route(&grpc("[::1]:8443", CLOSE))), None);
        assert_eq!(status(g.route(&grpc("LocalHost:8443", CLOSE))), None);

        let mut plain = grpc("127.0.0.1:8443", CLOSE);
        plain
            .headers_mut()
            .insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert_eq!(
            status(g.route(&plain)),
            Some(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
        let mut http1 = grpc("127.0.0.1:8443", CLOSE);
        *http1.version_mut() = Version::HTTP_11;
        assert_eq!(
            status(g.route(&http1)),
            Some(StatusCode::HTTP_VERSION_NOT_SUPPORTED)
        );
        for content_type in ["application/grpc+proto", "application/grpc; charset=x"] {
            let mut request = grpc("127.0.0.1:8443", CLOSE);
            request
                .headers_mut()
                .insert(header::CONTENT_TYPE, content_type.parse().unwrap());
            assert_eq!(status(g.route(&request)), None, "{content_type}");
        }
        let mut lookalike = grpc("127.0.0.1:8443", CLOSE);
        lookalike
            .headers_mut()
            .insert(header::CONTENT_TYPE, "application/grpcx".parse().unwrap());
        assert_eq!(
            status(g.route(&lookalike)),
            Some(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
        let mut page = grpc("127.0.0.1:8443", "/index.html");
        page.headers_mut().remove(header::CONTENT_TYPE);
        assert_eq!(status(g.route(&page)), Some(StatusCode::NOT_FOUND));
        // Without authentication there is no token endpoint.
        assert_eq!(
            status(g.route(&grpc("127.0.0.1:8443", "/oauth2/token"))),
            Some(StatusCode::NOT_FOUND)
        );
    }

    #[test]
    fn the_token_verifier_is_routed_as_plain_http_behind_the_same_rules() {
        const VERIFY: &str = "/agent/validate-authentication-token";
        let form = |host: &str, path: &str| {
            http::Request::builder()
                .version(Version::HTTP_11)
                .method(http::Method::POST)
                .uri(path)
                .header(header::HOST, host)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(String::new())
                .unwrap()
        };
        let fleet = crate::fleet::Fleet::new(crate::fleet::FleetConfig::default()).unwrap();
        let local = "127.0.0.1:8443".parse().unwrap();
        let g = HttpGateLayer::new(
            None,
            Some(TokenVerifier::new(fleet)),
            RestGate::default(),
            local,
            false,
            &[],
        )
        .policy()
        .shared
        .clone();
        assert!(matches!(
            g.route(&form("127.0.0.1:8443", VERIFY)),
            Route::Verifier(_)
        ));
        // Only that path; and a browser page or a rebinding name gets no
        // further than anywhere else.
        assert_eq!(
            status(g.route(&form(
                "127.0.0.1:8443",
                "/agent/validate-authentication-token/x"
            ))),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            status(g.route(&form("attacker.example", VERIFY))),
            Some(StatusCode::MISDIRECTED_REQUEST)
        );
        let mut cross = form("127.0.0.1:8443", VERIFY);
        cross
            .headers_mut()
            .insert(header::ORIGIN, "http://attacker.example".parse().unwrap());
        assert_eq!(status(g.route(&cross)), Some(StatusCode::FORBIDDEN));
        // Without a verifier, 404.
        let none = gate(false, "127.0.0.1:8443", &[]);
        assert_eq!(
            status(none.route(&form("127.0.0.1:8443", VERIFY))),
            Some(StatusCode::NOT_FOUND)
        );
    }

    #[test]
    fn rest_routes_are_checked_then_passed_on_as_their_grpc_method() {
        let g = gate(false, "127.0.0.1:8443", &[]);
        let rest = |method: http::Method, path: &str, content_type: Option<&str>, body: String| {
            let mut request = http::Request::builder()
                .version(Version::HTTP_11)
                .method(method)
                .uri(path)
                .header(header::HOST, "127.0.0.1:8443");
            if let Some(content_type) = content_type {
                request = request.header(header::CONTENT_TYPE, content_type);
            }
            request.body(body).unwrap()
        };
        let json = Some("application/json");
        match g.route(&rest(
            http::Method::POST,
            "/closeServers",
            json,
            "[]".into(),
        )) {
            Route::Rest(call) => assert_eq!(call.route.grpc_path, CLOSE),
            _ => panic!("not routed to REST"),
        }
        // A describe without a body needs no content type.
        assert!(matches!(
            g.route(&rest(
                http::Method::POST,
                "/describeServers",
                None,
                String::new()
            )),
            Route::Rest(_)
        ));
        let refused = |request| status(g.route(&request));
        assert_eq!(
            refused(rest(
                http::Method::GET,
                "/closeServers",
                None,
                String::new()
            )),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(
            refused(rest(
                http::Method::POST,
                "/closeServers",
                Some("text/plain"),
                "[]".into()
            )),
            Some(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
        let over = " ".repeat(RestGate::default().max_request_bytes + 1);
        assert_eq!(
            refused(rest(http::Method::POST, "/closeServers", json, over)),
            Some(StatusCode::PAYLOAD_TOO_LARGE)
        );
        // Without a health reporter, /health is 404; paths are exact.
        assert_eq!(
            refused(rest(http::Method::GET, "/health", None, String::new())),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            refused(rest(http::Method::POST, "/CloseServers", json, "[]".into())),
            Some(StatusCode::NOT_FOUND)
        );
    }

    #[test]
    fn a_loopback_plaintext_broker_answers_only_its_own_names() {
        let g = gate(false, "127.0.0.1:8443", &["Broker.Internal."]);
        assert_eq!(
            status(g.route(&grpc("attacker.example:8443", CLOSE))),
            Some(StatusCode::MISDIRECTED_REQUEST)
        );
        assert_eq!(
            status(g.route(&grpc("localhost.attacker.example", CLOSE))),
            Some(StatusCode::MISDIRECTED_REQUEST)
        );
        assert_eq!(status(g.route(&grpc("broker.internal:8443", CLOSE))), None);
        // A Host header disagreeing with :authority counts too.
        let mut two = grpc("127.0.0.1:8443", CLOSE);
        two.headers_mut()
            .insert(header::HOST, "attacker.example".parse().unwrap());
        assert_eq!(status(g.route(&two)), Some(StatusCode::MISDIRECTED_REQUEST));

        // Over TLS, or beyond loopback, any name.
        for g in [
            gate(true, "127.0.0.1:8443", &[]),
            gate(false, "0.0.0.0:8443", &[]),
        ] {
            assert_eq!(status(g.route(&grpc("broker.example:8443", CLOSE))), None);
        }
    }

    #[test]
    fn only_the_brokers_own_origin_passes() {
        let g = gate(false, "127.0.0.1:8443", &[]);
        let with = |name: &'static str, value: &str| {
            let mut request = grpc("127.0.0.1:8443", "/oauth2/token");
            request.headers_mut().insert(name, value.parse().unwrap());
            status(g.route(&request))
        };
        // Same origin reaches the route (404 here: no token endpoint).
        assert_eq!(
            with("origin", "http://127.0.0.1:8443"),
            Some(StatusCode::NOT_FOUND)
        );
        for origin in [
            "https://127.0.0.1:8443",
            "http://127.0.0.1:8444",
            "http://127.0.0.1",
            "http://attacker.example",
            "null",
            "",
        ] {
            assert_eq!(
                with("origin", origin),
                Some(StatusCode::FORBIDDEN),
                "{origin}"
            );
        }
        for site in ["same-origin", "none"] {
            assert_eq!(with("sec-fetch-site", site), Some(StatusCode::NOT_FOUND));
        }
        for site in ["cross-site", "same-site"] {
            assert_eq!(with("sec-fetch-site", site), Some(StatusCode::FORBIDDEN));
        }
    }
}
