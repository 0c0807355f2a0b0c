//! Authentication and authorization against real brokers on 127.0.0.1:0,
//! at every point a credential is accepted: the OAuth token endpoint (over
//! HTTP/1.1 and h2c, with a real HTTP client), bearer tokens on gRPC calls
//! (expiry on a clock the test moves, forged and tampered signatures,
//! revocation, malformed headers), the scope of every RPC in the published
//! contract, the actor recorded on a close, agents bound to their server by
//! token or by a client certificate, and the rate limit keyed by client id.
//!
//! No sleep stands in for synchronisation: token expiry follows the
//! `AuthConfig::clock` the test holds, and the rate test bounds what tokens
//! may have accrued by the time that really passed.

mod common;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use bytes::{Buf as _, BufMut as _, Bytes};
use common::*;
use dcv_broker::{
    BrokerConfig,
    api::OpenServices,
    auth::{Auth, AuthConfig, Scope, ScopeSet},
    fleet::Fleet,
    limits::{ClientRate, Limits},
    pb::{self, agent_client::AgentClient, servers_client::ServersClient},
    serve_tls,
    tls::{ServerTls, init},
};
use http::{HeaderMap, Method, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, Value};
use serde_json::json;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt as _;

/// Bounds every wait on a TLS connection: a broker that misbehaves fails
/// the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(20);

/// A wall clock the test sets and moves, for the tokens' `iat` and `exp`.
#[derive(Clone)]
struct TestClock(Arc<Mutex<SystemTime>>);

impl TestClock {
    fn new() -> TestClock {
        // A whole second, so that `exp` falls exactly `ttl` after it.
        TestClock(Arc::new(Mutex::new(
            UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        )))
    }

    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }

    fn config(&self, token_ttl: Duration) -> AuthConfig {
        let now = self.0.clone();
        AuthConfig {
            token_ttl,
            clock: Arc::new(move || *now.lock().unwrap()),
            ..AuthConfig::default()
        }
    }
}

/// A broker with authentication on, the registry it checks, and the clock
/// its tokens follow.
struct AuthBroker {
    broker: Broker,
    auth: Auth,
    clock: TestClock,
}

/// How long tokens last in these tests.
const TTL: Duration = Duration::from_secs(600);

impl AuthBroker {
    async fn start() -> AuthBroker {
        AuthBroker::with(quiet_config()).await
    }

    /// Starts `config` with a fresh in-memory registry in place of its
    /// `auth`.
    async fn with(config: BrokerConfig) -> AuthBroker {
        let clock = TestClock::new();
        let auth = Auth::in_memory(clock.config(TTL)).await.unwrap();
        let broker = Broker::start(BrokerConfig {
            auth: Some(auth.clone()),
            ..config
        })
        .await;
        AuthBroker {
            broker,
            auth,
            clock,
        }
    }

    /// Registers a client with `scopes` and returns its id and secret.
    async fn client(&self, scopes: &str, server_id: Option<&str>) -> (String, String) {
        let registered = self
            .auth
            .register("test client", ScopeSet::parse(scopes).unwrap(), server_id)
            .await
            .unwrap();
        (registered.client.id, registered.secret)
    }

    /// A token for a new client with `scopes`, from the token endpoint.
    async fn token(&self, scopes: &str) -> (String, String) {
        let (id, secret) = self.client(scopes, None).await;
        let token = issue(self.broker.addr, &id, &secret).await;
        (id, token)
    }
}

// ---------------------------------------------------------------------
// The token endpoint, by a real HTTP client.
// ---------------------------------------------------------------------

/// Which HTTP the token request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Http {
    One,
    /// HTTP/2 with prior knowledge (h2c), as gRPC clients speak it.
    Two,
}

/// What the token endpoint answered.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The OAuth `error` of a refusal.
    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error in {self:?}"))
            .to_owned()
    }
}

fn basic(id: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

/// One request to the token endpoint: `target` is the path and query.
async fn http_request(
    addr: SocketAddr,
    http: Http,
    method: Method,
    target: &str,
    authorization: Option<&str>,
    form: &str,
) -> Reply {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(http == Http::Two)
        .build_http::<Full<Bytes>>();
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{target}"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(value) = authorization {
        request = request.header(header::AUTHORIZATION, value);
    }
    let request = request
        .body(Full::new(Bytes::from(form.to_owned())))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let expected = match http {
        Http::One => http::Version::HTTP_11,
        Http::Two => http::Version::HTTP_2,
    };
    assert_eq!(response.version(), expected);
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// `POST /oauth2/token?grant_type=client_credentials` with HTTP Basic.
async fn request_token(addr: SocketAddr, http: Http, id: &str, secret: &str, form: &str) -> Reply {
    http_request(
        addr,
        http,
        Method::POST,
        "/oauth2/token?grant_type=client_credentials",
        Some(&basic(id, secret)),
        form,
    )
    .await
}

/// A token for `id`, which must be issued.
async fn issue(addr: SocketAddr, id: &str, secret: &str) -> String {
    let reply = request_token(addr, Http::One, id, secret, "").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    reply.json()["access_token"].as_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------
// gRPC calls with tokens.
// ---------------------------------------------------------------------

/// `message` with `authorization: Bearer <token>`.
fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    with_authorization(message, &format!("Bearer {token}"))
}

fn with_authorization<T>(message: T, value: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", MetadataValue::try_from(value).unwrap());
    request
}

fn describe_all() -> pb::DescribeServersRequest {
    pb::DescribeServersRequest::default()
}

/// The code of a DescribeServers call with this authorization header
/// (`None`: no header).
async fn describe_code(broker: &Broker, authorization: Option<&str>) -> Code {
    let request = match authorization {
        Some(value) => with_authorization(describe_all(), value),
        None => tonic::Request::new(describe_all()),
    };
    match broker.servers().await.describe_servers(request).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn describe_with(broker: &Broker, token: &str) -> Code {
    describe_code(broker, Some(&format!("Bearer {token}"))).await
}

// ---------------------------------------------------------------------
// 1. Tokens.
// ---------------------------------------------------------------------

#[tokio::test]
async fn a_token_from_the_endpoint_works_over_http1_and_http2() {
    let b = AuthBroker::start().await;
    let (id, secret) = b.client("read servers:operate", None).await;
    for http in [Http::One, Http::Two] {
        let reply = request_token(b.broker.addr, http, &id, &secret, "").await;
        assert_eq!(reply.status, StatusCode::OK, "{http:?}: {reply:?}");
        assert_eq!(reply.headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(reply.headers[header::CACHE_CONTROL], "no-store");
        let body = reply.json();
        assert_eq!(body["token_type"], "Bearer", "{body}");
        assert_eq!(body["expires_in"], TTL.as_secs(), "{body}");
        assert_eq!(body["scope"], "read servers:operate", "{body}");
        let token = body["access_token"].as_str().unwrap();
        assert_eq!(describe_with(&b.broker, token).await, Code::Ok);
        // "Bearer" is case-insensitive (RFC 7235).
        assert_eq!(
            describe_code(&b.broker, Some(&format!("bearer {token}"))).await,
            Code::Ok
        );
    }
}

#[tokio::test]
async fn credentials_in_the_form_body_work_too() {
    let b = AuthBroker::start().await;
    let (id, secret) = b.client("read", None).await;
    let form: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "client_credentials")
        .append_pair("client_id", &id)
        .append_pair("client_secret", &secret)
        .finish();
    let reply = http_request(
        b.broker.addr,
        Http::One,
        Method::POST,
        "/oauth2/token",
        None,
        &form,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let token = reply.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(describe_with(&b.broker, &token).await, Code::Ok);
}

#[tokio::test]
async fn a_token_expires_on_the_auth_clock() {
    let b = AuthBroker::start().await;
    let (_, token) = b.token("read").await;
    assert_eq!(describe_with(&b.broker, &token).await, Code::Ok);
    b.clock.advance(TTL - Duration::from_secs(1));
    assert_eq!(describe_with(&b.broker, &token).await, Code::Ok);
    b.clock.advance(Duration::from_secs(1));
    let refused = b
        .broker
        .servers()
        .await
        .describe_servers(bearer(describe_all(), &token))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("expired"), "{refused:?}");
    // A new token, issued at the new time, works.
    let (_, fresh) = b.token("read").await;
    assert_eq!(describe_with(&b.broker, &fresh).await, Code::Ok);
}

/// A token's three parts, base64url-decoded.
fn jwt_parts(token: &str) -> (serde_json::Value, serde_json::Value, String) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    let decode = |s: &str| {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()
    };
    (decode(parts[0]), decode(parts[1]), parts[2].to_owned())
}

fn b64(value: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

#[tokio::test]
async fn forged_and_tampered_tokens_are_unauthenticated() {
    let b = AuthBroker::start().await;
    let (id, token) = b.token("read").await;
    assert_eq!(describe_with(&b.broker, &token).await, Code::Ok);
    let (header, claims, signature) = jwt_parts(&token);
    assert_eq!(claims["sub"], id.as_str());

    // The signature altered in its first character.
    let mut bad_signature = signature.clone();
    let first = if bad_signature.starts_with('A') {
        "B"
    } else {
        "A"
    };
    bad_signature.replace_range(0..1, first);
    let tampered_signature = format!("{}.{}.{bad_signature}", b64(&header), b64(&claims));

    // The claims widened to every scope, the signature kept.
    let mut widened = claims.clone();
    widened["scope"] = json!("read servers:operate sessions:manage agent");
    let tampered_claims = format!("{}.{}.{signature}", b64(&header), b64(&widened));

    // Everything right (client, issuer, expiry) but signed with another key.
    let other_key = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&[42; 32]),
    )
    .unwrap();

    // No signature at all.
    let unsigned = format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&claims));

    // A token another broker issued to its own client.
    let other = AuthBroker::start().await;
    let (_, other_broker) = other.token("read").await;

    for (what, forged) in [
        ("tampered signature", tampered_signature),
        ("tampered claims", tampered_claims),
        ("another key", other_key),
        ("alg none", unsigned),
        ("another broker's", other_broker),
    ] {
        assert_eq!(
            describe_with(&b.broker, &forged).await,
            Code::Unauthenticated,
            "{what}"
        );
    }
    // The genuine token still works: nothing above disturbed it.
    assert_eq!(describe_with(&b.broker, &token).await, Code::Ok);
}

#[tokio::test]
async fn a_revoked_clients_token_stops_working_at_once() {
    let b = AuthBroker::start().await;
    let (id, secret) = b.client("read", None).await;
    let token = issue(b.broker.addr, &id, &secret).await;
    let (_, bystander) = b.token("read").await;
    assert_eq!(describe_with(&b.broker, &token).await, Code::Ok);

    b.auth.revoke(&id).await.unwrap();
    let refused = b
        .broker
        .servers()
        .await
        .describe_servers(bearer(describe_all(), &token))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("revoked"), "{refused:?}");
    // It gets no new token, and other clients are untouched.
    let reply = request_token(b.broker.addr, Http::One, &id, &secret, "").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{reply:?}");
    assert_eq!(reply.error(), "invalid_client");
    assert_eq!(describe_with(&b.broker, &bystander).await, Code::Ok);
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::test]
async fn a_wrong_secret_and_an_unknown_client_look_and_take_alike() {
    let b = AuthBroker::start().await;
    let (id, secret) = b.client("read", None).await;
    // A secret of the same shape, and an id of the same shape.
    let wrong_secret = "x".repeat(secret.len());
    let unknown_id = uuid::Uuid::new_v4().to_string();

    // Warm up both paths (connection set-up, first hashes).
    request_token(b.broker.addr, Http::One, &id, &wrong_secret, "").await;
    request_token(b.broker.addr, Http::One, &unknown_id, &secret, "").await;

    let (mut wrong, mut unknown) = (Vec::new(), Vec::new());
    let mut replies = Vec::new();
    // Interleaved, so that a noisy moment costs both sides alike.
    for _ in 0..7 {
        let started = Instant::now();
        let a = request_token(b.broker.addr, Http::One, &id, &wrong_secret, "").await;
        wrong.push(started.elapsed());
        let started = Instant::now();
        let c = request_token(b.broker.addr, Http::One, &unknown_id, &secret, "").await;
        unknown.push(started.elapsed());
        replies.push((a, c));
    }
    for (a, c) in &replies {
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{a:?}");
        assert_eq!(a.status, c.status);
        assert_eq!(a.body, c.body, "the bodies differ");
        assert_eq!(
            a.headers.get(header::WWW_AUTHENTICATE),
            c.headers.get(header::WWW_AUTHENTICATE)
        );
        assert_eq!(a.error(), "invalid_client");
    }
    let (wrong, unknown) = (median(wrong), median(unknown));
    let ratio = wrong.as_secs_f64() / unknown.as_secs_f64();
    assert!(
        (0.5..=2.0).contains(&ratio),
        "median wrong secret {wrong:?}, unknown client {unknown:?}"
    );
}

#[tokio::test]
async fn missing_and_malformed_authorization_is_unauthenticated() {
    let b = AuthBroker::start().await;
    let (_, token) = b.token("read").await;
    let refused = b
        .broker
        .servers()
        .await
        .describe_servers(describe_all())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("Bearer"), "{refused:?}");

    let (id, secret) = b.client("read", None).await;
    for value in [
        "Bearer".to_owned(),
        "Bearer ".to_owned(),
        format!("Bearer{token}"),
        format!("Token {token}"),
        token.clone(),
        basic(&id, &secret),
        "Bearer not.a.jwt".to_owned(),
        "Bearer e30.e30.e30".to_owned(),
        format!("Bearer {token}x"),
    ] {
        assert_eq!(
            describe_code(&b.broker, Some(&value)).await,
            Code::Unauthenticated,
            "authorization: {value}"
        );
    }
    assert_eq!(describe_with(&b.broker, &token).await, Code::Ok);
}

#[tokio::test]
async fn a_token_carries_only_the_scopes_asked_for_and_granted() {
    let b = AuthBroker::start().await;
    let (id, secret) = b.client("read servers:operate", None).await;
    let addr = b.broker.addr;

    // Not granted, or not a scope at all: invalid_scope.
    for scope in ["sessions:manage", "read agent", "admin"] {
        let form = format!("scope={}", scope.replace(' ', "+"));
        let reply = request_token(addr, Http::One, &id, &secret, &form).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{scope}: {reply:?}");
        assert_eq!(reply.error(), "invalid_scope", "{scope}");
    }

    // A narrower token is narrower.
    let reply = request_token(addr, Http::One, &id, &secret, "scope=read").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.json()["scope"], "read");
    let read_only = reply.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(describe_with(&b.broker, &read_only).await, Code::Ok);
    let mut servers = b.broker.servers().await;
    let refused = servers
        .close_servers(bearer(
            close_req(vec![close_item("srv", None, "")]),
            &read_only,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    let full = issue(addr, &id, &secret).await;
    servers
        .close_servers(bearer(close_req(vec![close_item("srv", None, "")]), &full))
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_token_requests_get_the_rfc_6749_errors() {
    let b = AuthBroker::start().await;
    let (id, secret) = b.client("read", None).await;
    let addr = b.broker.addr;
    let auth = basic(&id, &secret);
    let post = |target: &'static str, authorization: Option<String>, form: &'static str| async move {
        http_request(
            addr,
            Http::One,
            Method::POST,
            target,
            authorization.as_deref(),
            form,
        )
        .await
    };

    // Another grant type.
    let reply = post(
        "/oauth2/token?grant_type=password",
        Some(auth.clone()),
        "username=a&password=b",
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert_eq!(reply.error(), "unsupported_grant_type");

    // No grant type.
    let reply = post("/oauth2/token", Some(auth.clone()), "").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert_eq!(reply.error(), "invalid_request");

    // The grant type twice (query and body).
    let reply = post(
        "/oauth2/token?grant_type=client_credentials",
        Some(auth.clone()),
        "grant_type=client_credentials",
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert_eq!(reply.error(), "invalid_request");

    // No credentials: 401 invalid_client with a challenge.
    let reply = post("/oauth2/token?grant_type=client_credentials", None, "").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{reply:?}");
    assert_eq!(reply.error(), "invalid_client");
    assert!(
        reply.headers[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Basic"),
        "{reply:?}"
    );

    // Credentials that are not HTTP Basic.
    for value in [
        "Bearer abc".to_owned(),
        "Basic !!!not-base64".to_owned(),
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("no-colon")
        ),
    ] {
        let reply = post(
            "/oauth2/token?grant_type=client_credentials",
            Some(value.clone()),
            "",
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{value}: {reply:?}");
        assert_eq!(reply.error(), "invalid_client", "{value}");
    }

    // Credentials sent two ways at once.
    let reply = post(
        "/oauth2/token?grant_type=client_credentials",
        Some(auth.clone()),
        "client_id=x&client_secret=y",
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert_eq!(reply.error(), "invalid_request");

    // GET is not how tokens are asked for.
    let reply = http_request(
        addr,
        Http::One,
        Method::GET,
        "/oauth2/token?grant_type=client_credentials",
        Some(&auth),
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{reply:?}");
    assert_eq!(reply.error(), "invalid_request");
    assert_eq!(reply.headers[header::ALLOW], "POST");

    // A form over the limit.
    let big = "a".repeat(64 * 1024);
    let reply = http_request(
        addr,
        Http::One,
        Method::POST,
        "/oauth2/token?grant_type=client_credentials",
        Some(&auth),
        &format!("scope={big}"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert_eq!(reply.error(), "invalid_request");

    // And after all that, the right request works.
    let reply = post(
        "/oauth2/token?grant_type=client_credentials",
        Some(auth),
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
}

/// A refusal for load or rate: `status`, OAuth JSON, `Retry-After` in
/// whole seconds, no gRPC.
fn assert_retry_later(reply: &Reply, status: StatusCode) {
    assert_eq!(reply.status, status, "{reply:?}");
    assert_eq!(reply.headers[header::CONTENT_TYPE], "application/json");
    assert!(reply.headers.get("grpc-status").is_none(), "{reply:?}");
    assert_eq!(reply.error(), "temporarily_unavailable");
    let retry: u64 = reply.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{reply:?}");
}

/// [`request_token`] from the local address `local` (another client, as
/// far as per-address limits can tell).
async fn request_token_from(addr: SocketAddr, local: &str, id: &str, secret: &str) -> Reply {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_local_address(Some(local.parse().unwrap()));
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(connector);
    let request = http::Request::post(format!(
        "http://{addr}/oauth2/token?grant_type=client_credentials"
    ))
    .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
    .header(header::AUTHORIZATION, basic(id, secret))
    .body(Full::new(Bytes::new()))
    .unwrap();
    let (parts, body) = client.request(request).await.unwrap().into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

#[tokio::test]
async fn a_token_request_past_its_wait_or_queue_bound_is_503_at_once() {
    // The wait bound: no time at all to check a secret.
    let b = AuthBroker::with(BrokerConfig {
        limits: Limits {
            token_wait: Duration::ZERO,
            ..quiet_config().limits
        },
        ..quiet_config()
    })
    .await;
    let (id, secret) = b.client("read", None).await;
    let reply = request_token(b.broker.addr, Http::One, &id, &secret, "").await;
    assert_retry_later(&reply, StatusCode::SERVICE_UNAVAILABLE);

    // The queue bound: one token request checked at a time; the others
    // arriving meanwhile are refused, not queued. Concurrent rounds until
    // two overlap (almost always the first: a check takes milliseconds).
    let b = AuthBroker::with(BrokerConfig {
        limits: Limits {
            max_token_requests: 1,
            ..quiet_config().limits
        },
        ..quiet_config()
    })
    .await;
    let (id, secret) = b.client("read", None).await;
    let mut refused = None;
    for _ in 0..20 {
        let round: Vec<_> = (0..8)
            .map(|_| {
                let (id, secret) = (id.clone(), secret.clone());
                let addr = b.broker.addr;
                tokio::spawn(async move {
                    let started = Instant::now();
                    let reply = request_token(addr, Http::One, &id, &secret, "").await;
                    (reply, started.elapsed())
                })
            })
            .collect();
        for reply in round {
            let (reply, took) = reply.await.unwrap();
            if reply.status == StatusCode::OK {
                continue;
            }
            assert_retry_later(&reply, StatusCode::SERVICE_UNAVAILABLE);
            refused = Some(took);
        }
        if refused.is_some() {
            break;
        }
    }
    let took = refused.expect("no token request was ever refused with 503");
    // At once: not after the 2 s wait bound.
    assert!(took < Limits::default().token_wait, "{took:?}");
    // And the endpoint serves on.
    issue(b.broker.addr, &id, &secret).await;
}

#[tokio::test]
async fn failed_secrets_are_limited_per_address_before_any_hashing() {
    const BURST: usize = 3;
    let b = AuthBroker::with(BrokerConfig {
        limits: Limits {
            failed_secret_rate: ClientRate::new(1, BURST as u32),
            ..quiet_config().limits
        },
        ..quiet_config()
    })
    .await;
    let (id, secret) = b.client("read", None).await;
    let addr = b.broker.addr;
    // Right secrets are not failures, however many.
    for _ in 0..BURST + 2 {
        issue(addr, &id, &secret).await;
    }
    let started = Instant::now();
    let mut failed = 0;
    let limited = loop {
        let reply = request_token_from(addr, "127.0.0.1", &id, "wrong").await;
        if reply.status != StatusCode::UNAUTHORIZED {
            break reply;
        }
        assert_eq!(reply.error(), "invalid_client");
        failed += 1;
        assert!(failed <= 50, "never limited");
    };
    // One failure a second accrues while the requests run.
    let accrued = started.elapsed().as_secs() as usize + 1;
    assert!(
        (BURST..=BURST + accrued).contains(&failed),
        "{failed} failures before the limit"
    );
    assert_retry_later(&limited, StatusCode::TOO_MANY_REQUESTS);
    // Another address is not limited by this one's failures.
    let other = request_token_from(addr, "127.0.0.2", &id, &secret).await;
    assert_eq!(other.status, StatusCode::OK, "{other:?}");
    // This address is refused before its secret is checked, so even right
    // ones wait for the Retry-After. Five sent at once are admitted (or
    // not) within moments of each other, before any hashing: at most one
    // can find a failure accrued meanwhile, however slow the machine.
    let again: Vec<_> = (0..5)
        .map(|_| {
            let (id, secret) = (id.clone(), secret.clone());
            tokio::spawn(async move { request_token_from(addr, "127.0.0.1", &id, &secret).await })
        })
        .collect();
    let mut refused = 0;
    for reply in again {
        let reply = reply.await.unwrap();
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            assert_retry_later(&reply, StatusCode::TOO_MANY_REQUESTS);
            refused += 1;
        } else {
            assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        }
    }
    assert!(
        refused >= 4,
        "only {refused} of 5 right secrets were refused"
    );
}

#[tokio::test]
async fn a_token_request_takes_no_grpc_slot() {
    let b = AuthBroker::with(BrokerConfig {
        limits: Limits {
            max_concurrent_requests: Some(1),
            ..quiet_config().limits
        },
        ..quiet_config()
    })
    .await;
    let (id, secret) = b.client("read", None).await;
    let token = b.auth.issue_token(&id, &secret, None).await.unwrap();
    // A gRPC call whose body never ends holds the one slot.
    let tcp = tokio::net::TcpStream::connect(b.broker.addr).await.unwrap();
    let (mut h2, connection) = h2::client::Builder::new()
        .handshake::<_, &'static [u8]>(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    let held = http::Request::post(format!(
        "http://{}/dcv.sessionmanager.v1.Servers/DescribeServers",
        b.broker.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("authorization", format!("Bearer {}", token.access_token))
    .body(())
    .unwrap();
    let (_reply, _body) = h2.send_request(held, false).unwrap();
    // Bounded polling until the slot is seen taken.
    let mut shed = false;
    for _ in 0..200 {
        let code = describe_with(&b.broker, &token.access_token).await;
        if code == Code::ResourceExhausted {
            shed = true;
            break;
        }
        assert_eq!(code, Code::Ok);
        tokio::task::yield_now().await;
    }
    assert!(shed, "the held call never took the slot");
    // The token endpoint is answered all the same, in HTTP.
    let reply = request_token(b.broker.addr, Http::One, &id, &secret, "").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(
        describe_with(&b.broker, &token.access_token).await,
        Code::ResourceExhausted,
        "the slot was still held"
    );
}

// ---------------------------------------------------------------------
// 2. The scope of every RPC.
// ---------------------------------------------------------------------

/// Passes protobuf bytes through as they are, so that any method can be
/// called without its generated client.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// One method of the published contract.
struct Rpc {
    /// `/package.Service/Method`.
    path: String,
    /// `Service/Method`, to name it in the table.
    name: String,
    /// Its request: the default message, with `server_id` set where the
    /// message has one (an agent may act only for its own server).
    request: Bytes,
    server_streaming: bool,
}

/// Every method of every service in `FILE_DESCRIPTOR_SET`.
fn every_rpc(server_id: &str) -> Vec<Rpc> {
    let pool = DescriptorPool::decode(dcv_broker::pb::FILE_DESCRIPTOR_SET).unwrap();
    let mut rpcs = Vec::new();
    for service in pool.services() {
        for method in service.methods() {
            let mut request = DynamicMessage::new(method.input());
            if let Some(field) = method.input().get_field_by_name("server_id") {
                request.set_field(&field, Value::String(server_id.to_owned()));
            }
            rpcs.push(Rpc {
                path: format!("/{}/{}", service.full_name(), method.name()),
                name: format!("{}/{}", service.name(), method.name()),
                request: request.encode_to_vec().into(),
                server_streaming: method.is_server_streaming(),
            });
        }
    }
    rpcs
}

/// What each method needs, written out independently of the broker's
/// table. A method of the contract missing here fails the test.
const EXPECTED_SCOPE: &[(&str, Scope)] = &[
    ("Servers/DescribeServers", Scope::Read),
    ("Servers/CloseServers", Scope::OperateServers),
    ("Servers/OpenServers", Scope::OperateServers),
    ("Servers/DescribeServerHistory", Scope::Read),
    ("Servers/WatchServers", Scope::Read),
    ("Servers/DrainServers", Scope::OperateServers),
    ("Servers/DescribeDrains", Scope::Read),
    ("Sessions/DescribeSessions", Scope::Read),
    ("Sessions/WatchSessions", Scope::Read),
    ("Sessions/CreateSessions", Scope::ManageSessions),
    ("Sessions/DeleteSessions", Scope::ManageSessions),
    ("Sessions/GetSessionConnectionData", Scope::ManageSessions),
    ("Sessions/UpdateSessionPermissions", Scope::ManageSessions),
    ("Sessions/GetSessionScreenshots", Scope::ManageSessions),
    ("Agent/RegisterServer", Scope::Agent),
    ("Agent/Heartbeat", Scope::Agent),
    ("Agent/DeregisterServer", Scope::Agent),
    ("Agent/StreamInstructions", Scope::Agent),
    ("Agent/ReportInstructionResult", Scope::Agent),
    ("Agent/ValidateConnectionToken", Scope::Agent),
];

/// The code a call of `rpc` gets, with `authorization` if given. A server
/// stream that starts counts as OK: only whether the call was admitted
/// matters here.
async fn call(channel: Channel, rpc: &Rpc, authorization: Option<&str>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(rpc.request.clone());
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", MetadataValue::try_from(value).unwrap());
    }
    let path = http::uri::PathAndQuery::try_from(rpc.path.as_str()).unwrap();
    let result = if rpc.server_streaming {
        grpc.server_streaming(request, path, RawCodec)
            .await
            .map(drop)
    } else {
        grpc.unary(request, path, RawCodec).await.map(drop)
    };
    result.map_or_else(|status| status.code(), |()| Code::Ok)
}

#[tokio::test]
async fn every_rpc_needs_its_scope_and_only_its_scope() {
    let b = AuthBroker::start().await;
    let rpcs = every_rpc("srv-a");
    let services: std::collections::BTreeSet<&str> = rpcs
        .iter()
        .map(|r| r.name.split('/').next().unwrap())
        .collect();
    assert_eq!(
        services.into_iter().collect::<Vec<_>>(),
        ["Agent", "Servers", "Sessions"]
    );
    for rpc in &rpcs {
        assert!(
            EXPECTED_SCOPE.iter().any(|(name, _)| *name == rpc.name),
            "{} is in the contract but not in this test's table: say which scope it needs",
            rpc.name
        );
    }
    assert_eq!(
        rpcs.len(),
        EXPECTED_SCOPE.len(),
        "a method left the contract"
    );

    // One client per scope; the agent's is bound to srv-a, which every
    // agent request names.
    let mut tokens = Vec::new();
    for scope in Scope::ALL {
        let server = (scope == Scope::Agent).then_some("srv-a");
        let (id, secret) = b.client(scope.name(), server).await;
        tokens.push((scope, issue(b.broker.addr, &id, &secret).await));
    }

    let channel = b.broker.channel().await;
    let mut checked = 0;
    for rpc in &rpcs {
        let needs = EXPECTED_SCOPE
            .iter()
            .find(|(name, _)| *name == rpc.name)
            .map(|(_, s)| *s)
            .unwrap();
        assert_eq!(
            call(channel.clone(), rpc, None).await,
            Code::Unauthenticated,
            "{} without a token",
            rpc.name
        );
        for (scope, token) in &tokens {
            let code = call(channel.clone(), rpc, Some(&format!("Bearer {token}"))).await;
            if *scope == needs {
                assert!(
                    !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                    "{} with {scope}: {code:?}",
                    rpc.name
                );
            } else {
                assert_eq!(code, Code::PermissionDenied, "{} with {scope}", rpc.name);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, EXPECTED_SCOPE.len() * Scope::ALL.len());
}

async fn health_code(channel: Channel, authorization: Option<&str>) -> Code {
    let message = HealthCheckRequest {
        service: String::new(),
    };
    let request = match authorization {
        Some(value) => with_authorization(message, value),
        None => tonic::Request::new(message),
    };
    match HealthClient::new(channel).check(request).await {
        Ok(reply) => {
            assert_eq!(reply.into_inner().status, ServingStatus::Serving as i32);
            Code::Ok
        }
        Err(status) => status.code(),
    }
}

/// The code of a reflection ListServices (v1 or v1alpha).
async fn reflection_code(channel: Channel, v1: bool, authorization: Option<&str>) -> Code {
    use tonic_reflection::pb::{v1, v1alpha};
    let result = if v1 {
        let message = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        let mut request = tonic::Request::new(tokio_stream::once(message));
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", MetadataValue::try_from(value).unwrap());
        }
        let client = v1::server_reflection_client::ServerReflectionClient::new(channel);
        reflect(client, request).await
    } else {
        let message = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        };
        let mut request = tonic::Request::new(tokio_stream::once(message));
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", MetadataValue::try_from(value).unwrap());
        }
        let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
        match client.server_reflection_info(request).await {
            Ok(reply) => reply.into_inner().message().await.map(|m| {
                assert!(m.is_some(), "no reflection reply");
            }),
            Err(status) => Err(status),
        }
    };
    result.map_or_else(|s| s.code(), |()| Code::Ok)
}

async fn reflect(
    mut client: tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient<Channel>,
    request: tonic::Request<tokio_stream::Once<tonic_reflection::pb::v1::ServerReflectionRequest>>,
) -> Result<(), Status> {
    let reply = client.server_reflection_info(request).await?;
    let message = reply.into_inner().message().await?;
    assert!(message.is_some(), "no reflection reply");
    Ok(())
}

#[tokio::test]
async fn health_and_reflection_are_open_by_default_and_closable() {
    let open = AuthBroker::start().await;
    let channel = open.broker.channel().await;
    assert_eq!(health_code(channel.clone(), None).await, Code::Ok);
    assert_eq!(reflection_code(channel.clone(), true, None).await, Code::Ok);
    assert_eq!(reflection_code(channel, false, None).await, Code::Ok);

    let closed = AuthBroker::with(BrokerConfig {
        open_services: OpenServices {
            health: false,
            reflection: false,
        },
        ..quiet_config()
    })
    .await;
    let channel = closed.broker.channel().await;
    assert_eq!(
        health_code(channel.clone(), None).await,
        Code::Unauthenticated
    );
    assert_eq!(
        reflection_code(channel.clone(), true, None).await,
        Code::Unauthenticated
    );
    assert_eq!(
        reflection_code(channel.clone(), false, None).await,
        Code::Unauthenticated
    );
    assert_eq!(
        health_code(channel.clone(), Some("Bearer not.a.token")).await,
        Code::Unauthenticated
    );
    // Any valid token will do, whatever its scopes.
    let (_, token) = closed.token("sessions:manage").await;
    let bearer = format!("Bearer {token}");
    assert_eq!(health_code(channel.clone(), Some(&bearer)).await, Code::Ok);
    assert_eq!(
        reflection_code(channel.clone(), true, Some(&bearer)).await,
        Code::Ok
    );
    assert_eq!(
        reflection_code(channel, false, Some(&bearer)).await,
        Code::Ok
    );

    // Only health open: reflection still wants a token.
    let half = AuthBroker::with(BrokerConfig {
        open_services: OpenServices {
            health: true,
            reflection: false,
        },
        ..quiet_config()
    })
    .await;
    let channel = half.broker.channel().await;
    assert_eq!(health_code(channel.clone(), None).await, Code::Ok);
    assert_eq!(
        reflection_code(channel, true, None).await,
        Code::Unauthenticated
    );
}

// ---------------------------------------------------------------------
// 3. The actor of a close.
// ---------------------------------------------------------------------

#[tokio::test]
async fn a_close_records_the_client_id_as_its_actor() {
    let b = AuthBroker::start().await;
    let (_, agent_token) = {
        let (id, secret) = b.client("agent", Some("srv-a")).await;
        (id.clone(), issue(b.broker.addr, &id, &secret).await)
    };
    let (operator, operator_token) = b.token("servers:operate").await;
    let (_, reader) = b.token("read").await;

    b.broker
        .agent()
        .await
        .register_server(bearer(registration("srv-a", "linux", 4), &agent_token))
        .await
        .unwrap();
    let mut servers = b.broker.servers().await;
    let closed = servers
        .close_servers(bearer(
            close_req(vec![close_item("srv-a", None, "patching")]),
            &operator_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(closed.successful_list.len(), 1, "{closed:?}");

    let page = servers
        .describe_servers(bearer(describe_ids(&["srv-a"]), &reader))
        .await
        .unwrap()
        .into_inner();
    let holds = &page.servers[0].holds;
    assert_eq!(holds.len(), 1, "{holds:?}");
    assert_eq!(holds[0].actor, operator);
    assert_eq!(holds[0].reason, "patching");
    assert_ne!(operator, dcv_broker::api::ANONYMOUS_ACTOR);
}

// ---------------------------------------------------------------------
// 4. Agents.
// ---------------------------------------------------------------------

#[tokio::test]
async fn an_agent_token_acts_only_for_its_own_server() {
    let b = AuthBroker::start().await;
    let (id, secret) = b.client("agent", Some("srv-a")).await;
    let token = issue(b.broker.addr, &id, &secret).await;
    let mut agent = b.broker.agent().await;

    agent
        .register_server(bearer(registration("srv-a", "linux", 4), &token))
        .await
        .unwrap();
    agent
        .heartbeat(bearer(beat("srv-a", vec![]), &token))
        .await
        .unwrap();

    // srv-b must exist for the refusals to be about who asks, not what.
    let (other, other_secret) = b.client("agent", Some("srv-b")).await;
    let other_token = issue(b.broker.addr, &other, &other_secret).await;
    agent
        .register_server(bearer(registration("srv-b", "linux", 4), &other_token))
        .await
        .unwrap();

    let refused = agent
        .register_server(bearer(registration("srv-b", "linux", 4), &token))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = agent
        .heartbeat(bearer(beat("srv-b", vec![]), &token))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = agent
        .deregister_server(bearer(
            pb::DeregisterServerRequest {
                server_id: "srv-b".into(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = agent
        .stream_instructions(bearer(
            pb::StreamInstructionsRequest {
                server_id: "srv-b".into(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // srv-b is still there, untouched by srv-a's agent.
    let (_, reader) = b.token("read").await;
    let page = b
        .broker
        .servers()
        .await
        .describe_servers(bearer(describe_ids(&["srv-b"]), &reader))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.servers.len(), 1);
}

/// The next message of an instruction stream, within [`PATIENCE`].
async fn next_on(
    stream: &mut tonic::Streaming<pb::StreamInstructionsResponse>,
) -> Result<Option<pb::StreamInstructionsResponse>, Status> {
    tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("the instruction stream neither spoke nor ended")
}

#[tokio::test]
async fn revoking_an_agent_ends_its_open_instruction_stream() {
    let b = AuthBroker::start().await;
    let agent_token = |server: &'static str| {
        let b = &b;
        async move {
            let (id, secret) = b.client("agent", Some(server)).await;
            (id.clone(), issue(b.broker.addr, &id, &secret).await)
        }
    };
    let (revoked, revoked_token) = agent_token("srv-a").await;
    let (_, spare_token) = agent_token("srv-a").await;
    let (_, other_token) = agent_token("srv-b").await;
    let (_, manager) = b.token("sessions:manage").await;

    let mut agent = b.broker.agent().await;
    let mut streams = Vec::new();
    for (server, token) in [("srv-a", &revoked_token), ("srv-b", &other_token)] {
        agent
            .register_server(bearer(registration(server, "linux", 4), token))
            .await
            .unwrap();
        let stream = agent
            .stream_instructions(bearer(
                pb::StreamInstructionsRequest {
                    server_id: server.into(),
                },
                token,
            ))
            .await
            .unwrap()
            .into_inner();
        streams.push(stream);
    }
    let (mut stream_a, mut stream_b) = (streams.remove(0), streams.remove(0));

    b.auth.revoke(&revoked).await.unwrap();
    let ended = next_on(&mut stream_a).await.unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("revoked"), "{ended:?}");

    // The server's other agent client is not revoked: it takes srv-a out,
    // and srv-b's stream, untouched, gets the next session.
    agent
        .deregister_server(bearer(
            pb::DeregisterServerRequest {
                server_id: "srv-a".into(),
            },
            &spare_token,
        ))
        .await
        .unwrap();
    let created = b
        .broker
        .sessions()
        .await
        .create_sessions(bearer(
            create_req(vec![create_item("s1", "alice", pb::SessionType::Virtual)]),
            &manager,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.successful_list.len(), 1, "{created:?}");
    let next = next_on(&mut stream_b)
        .await
        .unwrap()
        .expect("an instruction");
    assert!(
        matches!(next.instruction, Some(Instr::CreateSession(_))),
        "{next:?}"
    );
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("dcv-broker-auth-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA that signs agents' client certificates.
struct AgentCa {
    cert: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl AgentCa {
    fn new(name: &str) -> AgentCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} agent CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap().pem();
        AgentCa {
            cert,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A client certificate whose subject CN is `common_name`.
    fn client(&self, common_name: &str) -> Identity {
        self.client_named(Some(common_name))
    }

    /// A client certificate whose subject has this CN, or none.
    fn client_named(&self, common_name: Option<&str>) -> Identity {
        use rcgen::{
            CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
        };
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "dcv agents");
        if let Some(name) = common_name {
            params.distinguished_name.push(DnType::CommonName, name);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Identity::from_pem(cert.pem(), key.serialize_pem())
    }
}

/// A broker serving TLS with authentication on and agent certificates
/// signed by `agent_ca` accepted.
struct MtlsBroker {
    addr: SocketAddr,
    server_ca: String,
    auth: Auth,
    _dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
    _task: JoinHandle<Result<(), dcv_broker::server::ServeError>>,
}

impl MtlsBroker {
    async fn start(agent_ca: &AgentCa) -> MtlsBroker {
        let dir = TempDir::new();
        let g = init::generate(&["localhost".into()], 30).unwrap();
        let tls = ServerTls::load(
            dir.write("server.crt", &g.server_cert),
            dir.write("server.key", &g.server_key),
        )
        .unwrap()
        .with_agent_ca(dir.write("agent-ca.crt", &agent_ca.cert))
        .unwrap();
        let auth = Auth::in_memory(AuthConfig::default()).await.unwrap();
        let config = BrokerConfig {
            auth: Some(auth.clone()),
            ..quiet_config()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fleet = Fleet::new(config.fleet.clone()).unwrap();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve_tls(listener, fleet, config, tls, async {
            let _ = stopped.await;
        }));
        MtlsBroker {
            addr,
            server_ca: g.ca_cert,
            auth,
            _dir: dir,
            stop: Some(stop),
            _task: task,
        }
    }

    /// A TLS channel, presenting `identity` if given.
    async fn channel(
        &self,
        identity: Option<Identity>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.server_ca))
            .domain_name("localhost");
        if let Some(identity) = identity {
            tls = tls.identity(identity);
        }
        Channel::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)?
            .connect_timeout(PATIENCE)
            .timeout(PATIENCE)
            .connect()
            .await
    }
}

impl Drop for MtlsBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[tokio::test]
async fn an_agent_certificate_acts_for_its_server_without_a_token() {
    let ca = AgentCa::new("ours");
    let b = MtlsBroker::start(&ca).await;
    let channel = b.channel(Some(ca.client("srv-a"))).await.unwrap();
    let mut agent = AgentClient::new(channel.clone());

    agent
        .register_server(registration("srv-a", "linux", 4))
        .await
        .unwrap();
    agent.heartbeat(beat("srv-a", vec![])).await.unwrap();
    let refused = agent
        .register_server(registration("srv-b", "linux", 4))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = agent.heartbeat(beat("srv-a-2", vec![])).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // The certificate makes an agent, nothing more.
    let refused = ServersClient::new(channel)
        .describe_servers(describe_all())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // srv-a is registered, as an operator's token shows.
    let registered = b
        .auth
        .register("reader", ScopeSet::from(Scope::Read), None)
        .await
        .unwrap();
    let token = b
        .auth
        .issue_token(&registered.client.id, &registered.secret, None)
        .await
        .unwrap()
        .access_token;
    let plain = b.channel(None).await.unwrap();
    let page = ServersClient::new(plain)
        .describe_servers(bearer(describe_ids(&["srv-a", "srv-b"]), &token))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = page.servers.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["srv-a"]);
}

#[tokio::test]
async fn without_a_certificate_or_a_token_agent_calls_are_unauthenticated() {
    let ca = AgentCa::new("ours");
    let b = MtlsBroker::start(&ca).await;
    let channel = b.channel(None).await.unwrap();
    // The connection itself is fine: health is open.
    assert_eq!(health_code(channel.clone(), None).await, Code::Ok);
    let refused = AgentClient::new(channel)
        .register_server(registration("srv-a", "linux", 4))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // A certificate naming no server makes no agent.
    let channel = b.channel(Some(ca.client_named(None))).await.unwrap();
    let refused = AgentClient::new(channel)
        .register_server(registration("srv-a", "linux", 4))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
}

#[tokio::test]
async fn a_certificate_from_another_ca_fails_the_handshake() {
    let ours = AgentCa::new("ours");
    let theirs = AgentCa::new("theirs");
    let b = MtlsBroker::start(&ours).await;
    // With TLS 1.3 the client may finish its side before the server
    // refuses its certificate: the refusal then shows on the first call.
    // Health is open, so any failure here is the handshake's.
    let result = match b.channel(Some(theirs.client("srv-a"))).await {
        Err(e) => Err(format!("connect: {e:?}")),
        Ok(channel) => match HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(status) => {
                // Not an answer from the broker's services: a transport
                // failure.
                assert!(
                    !matches!(
                        status.code(),
                        Code::Unauthenticated | Code::PermissionDenied | Code::Ok
                    ),
                    "{status:?}"
                );
                Err(format!("call: {status:?}"))
            }
        },
    };
    let error = result.expect_err("a foreign certificate was accepted");
    assert!(error.contains("UnknownCA"), "{error}");
    // Our own CA's certificate still connects.
    let channel = b.channel(Some(ours.client("srv-a"))).await.unwrap();
    assert_eq!(health_code(channel, None).await, Code::Ok);
}

/// `POST /oauth2/token` over TLS, speaking HTTP/1.1 (negotiated by ALPN),
/// as curl or Python's requests would.
async fn https_token(b: &MtlsBroker, id: &str, secret: &str) -> Reply {
    use tokio_rustls::{
        TlsConnector,
        rustls::{ClientConfig, RootCertStore, pki_types::ServerName, pki_types::pem::PemObject},
    };
    let mut roots = RootCertStore::empty();
    roots
        .add(
            tokio_rustls::rustls::pki_types::CertificateDer::from_pem_slice(b.server_ca.as_bytes())
                .unwrap(),
        )
        .unwrap();
    let mut config = ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::builder()
        .method(Method::POST)
        .uri("/oauth2/token?grant_type=client_credentials")
        .header(header::HOST, "localhost")
        .header(header::AUTHORIZATION, basic(id, secret))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_11);
    let (parts, body) = response.into_parts();
    let reply = Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    };
    drop(sender);
    connection.await.unwrap().unwrap();
    reply
}

#[tokio::test]
async fn over_tls_an_agent_gets_a_token_by_http1_and_uses_it() {
    let ca = AgentCa::new("ours");
    let b = MtlsBroker::start(&ca).await;
    let registered = b
        .auth
        .register(
            "agent of srv-a",
            ScopeSet::from(Scope::Agent),
            Some("srv-a"),
        )
        .await
        .unwrap();
    let reply = https_token(&b, &registered.client.id, &registered.secret).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.json()["scope"], "agent");
    let token = reply.json()["access_token"].as_str().unwrap().to_owned();

    // No certificate: the token alone makes it srv-a's agent.
    let mut agent = AgentClient::new(b.channel(None).await.unwrap());
    agent
        .register_server(bearer(registration("srv-a", "linux", 4), &token))
        .await
        .unwrap();
    let refused = agent
        .register_server(bearer(registration("srv-b", "linux", 4), &token))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    let reply = https_token(&b, &registered.client.id, "wrong").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{reply:?}");
}

// ---------------------------------------------------------------------
// 5. The rate limit, per client id.
// ---------------------------------------------------------------------

#[tokio::test]
async fn authenticated_clients_on_one_address_have_their_own_rate() {
    const BURST: usize = 3;
    let b = AuthBroker::with(BrokerConfig {
        limits: Limits {
            client_rate: ClientRate::new(1, BURST as u32),
            ..Limits::default()
        },
        ..quiet_config()
    })
    .await;
    // Tokens straight from the registry: the token endpoint would count
    // against the address's own bucket, which is not under test.
    let mut tokens = Vec::new();
    for _ in 0..2 {
        let (id, secret) = b.client("read", None).await;
        let issued = b.auth.issue_token(&id, &secret, None).await.unwrap();
        tokens.push(issued.access_token);
    }
    let (first, second) = (&tokens[0], &tokens[1]);
    // Both from 127.0.0.1, on one connection.
    let mut servers = b.broker.servers().await;

    let started = Instant::now();
    let mut served = 0;
    let refused = loop {
        match servers
            .describe_servers(bearer(describe_all(), first))
            .await
        {
            Ok(_) => served += 1,
            Err(status) => break status,
        }
        assert!(served <= 50, "never refused");
    };
    // One token a second accrues while the requests run.
    let accrued = started.elapsed().as_secs() as usize + 1;
    assert!(
        (BURST..=BURST + accrued).contains(&served),
        "served {served}"
    );
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let refused_at = Instant::now();
    let retry_in = refused
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("google.rpc.RetryInfo with a delay");

    for n in 0..BURST {
        servers
            .describe_servers(bearer(describe_all(), second))
            .await
            .unwrap_or_else(|e| panic!("request {n} of the second client: {e:?}"));
    }
    // The first is still over its rate, unless its retry delay passed
    // meanwhile (a very slow machine).
    if refused_at.elapsed() < retry_in {
        let refused = servers
            .describe_servers(bearer(describe_all(), first))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    }
}
