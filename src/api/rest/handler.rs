//! The REST routes' dispatch and replies: which route a path is, the layer
//! that turns a routed request into the gRPC service's own call, and the
//! one mapping from a gRPC status to a REST error reply.
//!
//! The way a REST request travels (see `api::gate` for the routing): the
//! gate finds its route, checks what it can from the headers (method,
//! content type, declared length), renames the request to the route's gRPC
//! method path and marks it with a [`RestCall`]. It then passes through
//! the very layers a gRPC call does (authentication and the scope table,
//! the client's rate, the in-flight limit), each of which sees the gRPC
//! method path. [`RestLayer`], innermost, takes the marked request before
//! the gRPC router would: it reads the body within the size limit, decodes
//! it (`json`), and calls the same `ServersApi`/`SessionsApi` method a gRPC
//! call reaches, with the same extensions (principal, request id). A layer
//! refusing on the way answers in gRPC's form; the gate turns that into
//! the REST error reply on the way out ([`rest_refusal`]).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use serde_json::json;
use tonic::{Code, Status, body::Body};
use tonic_types::StatusExt as _;

use super::{
    json,
    routes::{ROUTES, RequestBody, Route, WATCH_ROUTES},
};
use crate::{
    api::{Forwarder, RequestId, ServersApi, SessionsApi},
    fleet::{Fleet, FleetError},
    layer::{Policy, PolicyLayer, PolicyService, Verdict},
    pb::{servers_server::Servers as _, sessions_server::Sessions as _},
};

/// The health route for load balancers (DCV's ALB health check path).
pub const HEALTH_PATH: &str = "/health";

/// Where our OpenAPI document is served (DCV serves its own there).
pub const OPENAPI_PATH: &str = "/dcv-session-manager-api.yaml";

/// How much earlier than the broker's request timeout a REST call gives
/// up: tonic's own timeout wraps every layer and would answer in gRPC's
/// form; ending first, the route answers 504 in its own.
const TIMEOUT_MARGIN: Duration = Duration::from_millis(10);

/// A request the gate routed to a REST route: its route and its raw
/// (still percent-encoded) path parameters. Only the gate inserts it.
#[derive(Debug, Clone)]
pub struct RestCall {
    /// The route.
    pub route: &'static Route,
    /// The path's `{...}` segments, in order, as sent.
    pub params: Vec<String>,
    /// The query string, as sent (the gate renames the path to the gRPC
    /// method's, which has none).
    pub query: Option<String>,
}

/// Which route a request is.
#[derive(Debug)]
pub enum Match {
    /// This route, with these raw path parameters.
    Route(&'static Route, Vec<String>),
    /// A route's path, with another method; the methods it takes.
    WrongMethod(&'static str),
    /// No route's path.
    None,
}

/// The route `method` and `path` name. Paths are case-sensitive, as DCV's.
pub fn find(method: &Method, path: &str) -> Match {
    let mut wrong = None;
    for route in ROUTES {
        let Some(params) = matches(route.path, path) else {
            continue;
        };
        if route.method == method {
            return Match::Route(route, params);
        }
        wrong = Some(route.method.as_str());
    }
    wrong.map_or(Match::None, Match::WrongMethod)
}

/// The parameters of `path` when it fits `template`.
fn matches(template: &str, path: &str) -> Option<Vec<String>> {
    if !template.contains('{') {
        return (template == path).then(Vec::new);
    }
    let mut params = Vec::new();
    let mut segments = path.split('/');
    for expected in template.split('/') {
        let segment = segments.next()?;
        if expected.starts_with('{') {
            params.push(segment.to_owned());
        } else if expected != segment {
            return None;
        }
    }
    segments.next().is_none().then_some(params)
}

/// Whether `value` is `application/json`, parameters allowed.
pub fn is_json(value: Option<&HeaderValue>) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// A REST error reply: `{"error", "error_description", "request_id",
/// "field_violations"}` (the last two when known).
pub fn error_reply(
    status: StatusCode,
    error: &str,
    description: &str,
    request_id: Option<&str>,
    violations: Option<Vec<serde_json::Value>>,
) -> http::Response<Body> {
    let mut body = json!({"error": error, "error_description": description});
    if let Some(id) = request_id {
        body["request_id"] = json!(id);
    }
    if let Some(violations) = violations {
        body["field_violations"] = json!(violations);
    }
    let mut response = json_reply(body.to_string().into_bytes());
    *response.status_mut() = status;
    response
}

/// The one mapping from a gRPC status to a REST error reply. `token`:
/// whether the request carried an `Authorization` header (RFC 6750: a
/// request without one gets a challenge without an error code).
pub fn status_reply(
    status: &Status,
    request_id: Option<&str>,
    token: bool,
) -> http::Response<Body> {
    let (http, error) = match status.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            (StatusCode::BAD_REQUEST, "invalid_request")
        }
        Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "invalid_token"),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "insufficient_scope"),
        Code::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        // A call with the same ClientToken is still running.
        Code::Aborted => (StatusCode::CONFLICT, "conflict"),
        // The client's own rate (it carries RetryInfo): 429. The broker's
        // in-flight limit sheds load from everyone: that is the server's
        // overload, 503, which load balancers and clients retry elsewhere.
        Code::ResourceExhausted if status.get_details_retry_info().is_some() => {
            (StatusCode::TOO_MANY_REQUESTS, "too_many_requests")
        }
        Code::ResourceExhausted | Code::Unavailable => {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
    };
    let violations = status.get_details_bad_request().map(|details| {
        details
            .field_violations
            .iter()
            .map(|v| json!({"field": v.field, "description": v.description}))
            .collect()
    });
    let mut response = error_reply(http, error, status.message(), request_id, violations);
    let headers = response.headers_mut();
    match http {
        StatusCode::UNAUTHORIZED => {
            let challenge = if token {
                r#"Bearer realm="dcv-broker", error="invalid_token""#
            } else {
                r#"Bearer realm="dcv-broker""#
            };
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        StatusCode::FORBIDDEN => {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(
                    r#"Bearer realm="dcv-broker", error="insufficient_scope""#,
                ),
            );
        }
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            // Whole seconds, rounded up; the in-flight limit names no time:
            // a second is a short backoff.
            let seconds = status
                .get_details_retry_info()
                .and_then(|r| r.retry_delay)
                .map_or(1, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        _ => {}
    }
    response
}

/// What the gate keeps of a REST request to turn a gRPC-form refusal from
/// the layers behind it into a REST reply.
#[derive(Debug)]
pub struct RestHold {
    request_id: Option<String>,
    token: bool,
}

impl RestHold {
    /// What `request` (already routed to a REST route) needs remembered.
    pub fn of<B>(request: &http::Request<B>) -> RestHold {
        RestHold {
            request_id: request
                .extensions()
                .get::<RequestId>()
                .map(|id| id.0.to_string()),
            token: request.headers().contains_key(header::AUTHORIZATION),
        }
    }
}

/// `response` as the REST client sees it: a refusal in gRPC's form (from
/// authentication, the rate or the in-flight limit) becomes the REST error
/// reply; the route's own replies pass unchanged.
pub fn rest_refusal(hold: RestHold, response: http::Response<Body>) -> http::Response<Body> {
    match Status::from_header_map(response.headers()) {
        Some(status) => status_reply(&status, hold.request_id.as_deref(), hold.token),
        None => response,
    }
}

/// The innermost layer: serves requests the gate routed to REST routes.
pub type RestLayer = PolicyLayer<RestPolicy>;

/// The service [`RestLayer`] wraps around the gRPC routes.
pub type Rest<S> = PolicyService<RestPolicy, S>;

/// The policy of [`RestLayer`]: the same adapters the gRPC services run.
#[derive(Debug, Clone)]
pub struct RestPolicy {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    servers: ServersApi,
    sessions: SessionsApi,
    max_request_bytes: usize,
    deadline: Option<Duration>,
    additions: bool,
}

impl RestLayer {
    /// Serves `fleet` through the gRPC adapters; bodies up to
    /// `max_request_bytes` (as gRPC messages), calls for at most
    /// `request_timeout`; replies with our fields beyond DCV's only with
    /// `additions` (see [`json::is_addition`]); writes go to the leader as
    /// `forward` says, as gRPC calls' do; its event streams (`sse`) end
    /// when `stopping` turns true.
    pub fn new(
        fleet: Fleet,
        max_request_bytes: usize,
        request_timeout: Option<Duration>,
        additions: bool,
        forward: Forwarder,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> RestLayer {
        PolicyLayer::of(RestPolicy {
            shared: Arc::new(Shared {
                servers: ServersApi::new(fleet.clone())
                    .with_forwarder(forward.clone())
                    .with_stopping(stopping.clone()),
                sessions: SessionsApi::new(fleet)
                    .with_forwarder(forward)
                    .with_stopping(stopping),
                max_request_bytes,
                deadline: request_timeout.map(|t| t.checked_sub(TIMEOUT_MARGIN).unwrap_or(t)),
                additions,
            }),
        })
    }
}

impl<B> Policy<B> for RestPolicy
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Hold = ();

    fn check<E: Send + 'static>(&self, mut request: http::Request<B>) -> Verdict<B, (), E> {
        let Some(call) = request.extensions_mut().remove::<RestCall>() else {
            return Verdict::Pass(request, ());
        };
        let shared = self.shared.clone();
        let call_path = call.route.path;
        if WATCH_ROUTES.iter().any(|r| r.path == call.route.path) {
            return Verdict::Later(Box::pin(async move {
                let request_id = request
                    .extensions()
                    .get::<RequestId>()
                    .map(|id| id.0.to_string());
                let token = request.headers().contains_key(header::AUTHORIZATION);
                // No request timeout: the stream is meant to last.
                let served = super::sse::serve(
                    &shared.servers,
                    &shared.sessions,
                    shared.additions,
                    call.route,
                    call.query.as_deref(),
                    request,
                )
                .await;
                Ok(match served {
                    Ok(response) => {
                        tracing::debug!(route = call_path, "REST watch started");
                        response
                    }
                    Err(status) => status_reply(&status, request_id.as_deref(), token),
                })
            }));
        }
        Verdict::Later(Box::pin(async move {
            let request_id = request
                .extensions()
                .get::<RequestId>()
                .map(|id| id.0.to_string());
            let token = request.headers().contains_key(header::AUTHORIZATION);
            let served = match shared.deadline {
                Some(deadline) => tokio::time::timeout(deadline, shared.serve(call, request))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Reply::Status(Status::deadline_exceeded(
                            "the request took longer than the broker's request timeout",
                        )))
                    }),
                None => shared.serve(call, request).await,
            };
            // Inside the request's span: the log line carries its id.
            match &served {
                Ok(_) => tracing::debug!(route = call_path, "REST call answered"),
                Err(Reply::Status(status)) => tracing::debug!(
                    route = call_path,
                    code = ?status.code(),
                    message = status.message(),
                    "REST call refused"
                ),
                Err(Reply::Refused(status, error, _)) => tracing::debug!(
                    route = call_path,
                    status = status.as_u16(),
                    error,
                    "REST call refused"
                ),
            }
            Ok(match served {
                Ok(body) => json_reply(body),
                Err(Reply::Status(status)) => status_reply(&status, request_id.as_deref(), token),
                Err(Reply::Refused(status, error, description)) => {
                    error_reply(status, error, &description, request_id.as_deref(), None)
                }
            })
        }))
    }
}

/// Why a route did not answer 200.
enum Reply {
    Status(Status),
    /// Refused by HTTP's own rules (413, 415): status, error, description.
    Refused(StatusCode, &'static str, String),
}

impl From<Status> for Reply {
    fn from(status: Status) -> Self {
        Reply::Status(status)
    }
}

impl From<FleetError> for Reply {
    fn from(error: FleetError) -> Self {
        Reply::Status(error.into())
    }
}

fn too_large(limit: usize) -> Reply {
    Reply::Refused(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the request body is over the broker's limit of {limit} bytes"),
    )
}

fn not_json() -> Reply {
    Reply::Refused(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        NOT_JSON.to_owned(),
    )
}

/// Why a body is refused with 415.
pub const NOT_JSON: &str = "the request body must be JSON: send Content-Type: application/json";

/// A JSON body, never cached (replies carry tokens and fleet state).
fn json_reply(body: Vec<u8>) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(Full::new(Bytes::from(body))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Calls `$method` of `$api` with the route's request decoded into
/// `$request`, carrying `$parts`' extensions and headers as a gRPC call
/// would; the reply as DCV's JSON.
macro_rules! call {
    ($shared:expr, $parts:ident, $route:ident, $body:ident, $params:ident, $query:ident, $api:ident, $method:ident) => {{
        let message = json::decode_request($route, &$body, &$params, $query)?;
        let mut request = tonic::Request::from_http(http::Request::from_parts($parts, message));
        request
            .extensions_mut()
            .insert($crate::api::audit::RestRoute::of($route));
        let reply = $shared.$api.$method(request).await?.into_inner();
        let (_, output) = json::method_types($route)
            .ok_or_else(|| FleetError::Internal(format!("{} has no method", $route.path)))?;
        Ok(json::encode_reply(&output, &reply, $shared.additions)?)
    }};
}

impl Shared {
    async fn serve<B>(&self, call: RestCall, request: http::Request<B>) -> Result<Vec<u8>, Reply>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let route = call.route;
        let query = call.query.as_deref();
        let (parts, body) = request.into_parts();
        let params = match route.body {
            RequestBody::PathParams { .. } => decode_params(route.path, &call.params)?,
            _ => Vec::new(),
        };
        let body = match route.body {
            RequestBody::PathParams { .. } => Bytes::new(),
            _ => match Limited::new(body, self.max_request_bytes).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Err(too_large(self.max_request_bytes));
                }
                Err(e) => {
                    return Err(Reply::Status(Status::invalid_argument(format!(
                        "the request body could not be read: {e}"
                    ))));
                }
            },
        };
        // The gate checked the content type when it saw a body coming; a
        // body of unannounced length is checked now that it is here.
        if !body.is_empty() && !is_json(parts.headers.get(header::CONTENT_TYPE)) {
            return Err(not_json());
        }
        match route.grpc_path {
            "/dcv.sessionmanager.v1.Servers/CloseServers" => {
                call!(
                    self,
                    parts,
                    route,
                    body,
                    params,
                    query,
                    servers,
                    close_servers
                )
            }
            "/dcv.sessionmanager.v1.Servers/OpenServers" => {
                call!(
                    self,
                    parts,
                    route,
                    body,
                    params,
                    query,
                    servers,
                    open_servers
                )
            }
            "/dcv.sessionmanager.v1.Servers/DescribeServers" => {
                call!(
                    self,
                    parts,
                    route,
                    body,
                    params,
                    query,
                    servers,
                    describe_servers
                )
            }
            "/dcv.sessionmanager.v1.Sessions/CreateSessions" => {
                call!(
                    self,
                    parts,
                    route,
                    body,
                    params,
                    query,
                    sessions,
                    create_sessions
                )
            }
            "/dcv.sessionmanager.v1.Sessions/DescribeSessions" => {
                call!(
                    self,
                    parts,
                    route,
                    body,
                    params,
                    query,
                    sessions,
                    describe_sessions
                )
            }
            "/dcv.sessionmanager.v1.Sessions/DeleteSessions" => {
                call!(
                    self,
                    parts,
                    route,
                    body,
                    params,
                    query,
                    sessions,
                    delete_sessions
                )
            }
            "/dcv.sessionmanager.v1.Sessions/UpdateSessionPermissions" => call!(
                self,
                parts,
                route,
                body,
                params,
                query,
                sessions,
                update_session_permissions
            ),
            "/dcv.sessionmanager.v1.Sessions/GetSessionConnectionData" => call!(
                self,
                parts,
                route,
                body,
                params,
                query,
                sessions,
                get_session_connection_data
            ),
            "/dcv.sessionmanager.v1.Sessions/GetSessionScreenshots" => {
                call!(
                    self,
                    parts,
                    route,
                    body,
                    params,
                    query,
                    sessions,
                    get_session_screenshots
                )
            }
            other => Err(FleetError::Internal(format!("no REST dispatch for {other}")).into()),
        }
    }
}

/// The path parameters, percent-decoded as UTF-8; a violation names the
/// parameter as `template` does (`sessionId`).
fn decode_params(template: &str, raw: &[String]) -> Result<Vec<String>, FleetError> {
    let names = template
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')));
    names
        .zip(raw)
        .map(|(name, raw)| {
            percent_encoding::percent_decode_str(raw)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| {
                    FleetError::invalid(name, "the path segment is not percent-encoded UTF-8")
                })
        })
        .collect()
}

/// `GET /health`: 200 `{"status":"SERVING"}` while the broker's overall
/// gRPC health (service "") is SERVING, else 503 `{"status":"NOT_SERVING"}`.
/// A replica of several adds where it stands: `role` (`leader`,
/// `follower` with its `leader` URL, or `unavailable` with `why`), the
/// lease's `epoch`, the change-log position it has applied
/// (`applied_seq`) and how far behind its commit the last change was
/// applied (`lag_ms`). A follower, or a replica cut off from the database,
/// still serves reads: the status stays SERVING.
pub async fn health(
    reporter: tonic_health::server::HealthReporter,
    cluster: &crate::cluster::ClusterView,
) -> http::Response<Body> {
    use crate::cluster::Role;
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_server::Health as _,
    };
    let service = tonic_health::server::HealthService::from_health_reporter(reporter);
    let serving = service
        .check(tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        }))
        .await
        .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32);
    let (status, text) = if serving {
        (StatusCode::OK, "SERVING")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING")
    };
    let mut body = json!({"status": text});
    if cluster.is_clustered() {
        let state = cluster.status();
        let fields = [
            ("epoch", json!(state.epoch)),
            ("applied_seq", json!(state.applied_seq)),
            (
                "lag_ms",
                json!(u64::try_from(state.lag.as_millis()).unwrap_or(u64::MAX)),
            ),
        ];
        let role = match state.role {
            Role::Leader => json!({"role": "leader"}),
            Role::Follower { leader } => json!({"role": "follower", "leader": leader}),
            Role::Unavailable { why } => json!({"role": "unavailable", "why": why}),
        };
        if let (Some(body), Some(role)) = (body.as_object_mut(), role.as_object()) {
            body.extend(role.clone());
            body.extend(fields.map(|(k, v)| (k.to_owned(), v)));
        }
    }
    let mut response = json_reply(body.to_string().into_bytes());
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_find_their_routes() {
        let Match::Route(route, params) = find(&Method::GET, "/sessionConnectionData/s%201/u")
        else {
            panic!()
        };
        assert_eq!(route.operation_id, "GetSessionConnectionData");
        assert_eq!(params, ["s%201", "u"]);
        assert!(matches!(
            find(&Method::POST, "/closeServers"),
            Match::Route(..)
        ));
        assert!(matches!(
            find(&Method::GET, "/closeServers"),
            Match::WrongMethod("POST")
        ));
        for path in [
            "/closeservers",
            "/closeServers/",
            "/sessionConnectionData/s",
            "/sessionConnectionData/s/u/x",
        ] {
            assert!(matches!(find(&Method::POST, path), Match::None), "{path}");
        }
        assert!(matches!(
            find(&Method::GET, "/sessionPermissions"),
            Match::WrongMethod("PUT")
        ));
    }

    #[test]
    fn json_content_types() {
        for ok in ["application/json", "Application/JSON; charset=utf-8"] {
            assert!(is_json(Some(&HeaderValue::from_static(ok))), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/jsonx",
            "application/x-www-form-urlencoded",
        ] {
            assert!(!is_json(Some(&HeaderValue::from_static(bad))), "{bad}");
        }
        assert!(!is_json(None));
    }
}
