//! DCV's REST routes against a real broker on 127.0.0.1:0, through a real
//! HTTP client (hyper) over HTTP/1.1 and HTTP/2 (h2c, and TLS): every
//! route's success and per-item failure codes in DCV's JSON, the same
//! state seen over gRPC and REST, malformed and hostile bodies, tokens and
//! scopes, methods, content types and sizes, each as the status and JSON
//! error body the contract gives, with the broker healthy after.

mod common;

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use common::*;
use dcv_broker::{
    BrokerConfig,
    auth::{Auth, AuthConfig, ScopeSet},
    limits::{ClientRate, Limits},
    pb::{self, InstructionKind as Kind, SessionState as St},
};
use http::{Method, StatusCode, Version, header};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::{Value, json};

/// Bounds every wait: a broker that misbehaves fails the test.
const PATIENCE: Duration = Duration::from_secs(20);

/// A quiet broker whose REST replies carry our fields beyond DCV's
/// (`--rest-additions`), so that per-item failure codes of every route are
/// visible; `dcv_exact_replies_by_default` covers the default.
fn config() -> BrokerConfig {
    BrokerConfig {
        rest_additions: true,
        ..quiet_config()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Http {
    One,
    Two,
}

const BOTH: [Http; 2] = [Http::One, Http::Two];

/// A REST reply.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// A 200 with a JSON body carrying a RequestId; the body.
    fn ok(&self) -> Value {
        assert_eq!(self.status, StatusCode::OK, "{self:?}");
        assert_eq!(self.headers[header::CONTENT_TYPE], "application/json");
        let json = self.json();
        let id = json["RequestId"]
            .as_str()
            .unwrap_or_else(|| panic!("{json}"));
        assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4);
        json
    }

    /// An error reply with `status` and `error`; the body.
    fn error(&self, status: StatusCode, error: &str) -> Value {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.headers[header::CONTENT_TYPE], "application/json");
        assert!(!self.headers.contains_key("grpc-status"), "{self:?}");
        let json = self.json();
        assert_eq!(json["error"], error, "{json}");
        assert!(
            json["error_description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{json}"
        );
        json
    }

    /// A 400 whose first field violation names `field`; the body.
    fn bad(&self, field: &str) -> Value {
        let json = self.error(StatusCode::BAD_REQUEST, "invalid_request");
        assert!(json["request_id"].is_string(), "{json}");
        assert_eq!(json["field_violations"][0]["field"], field, "{json}");
        json
    }
}

/// A REST client of one broker.
#[derive(Clone)]
struct Rest {
    addr: SocketAddr,
    http: Http,
    token: Option<String>,
}

impl Rest {
    fn new(addr: SocketAddr, http: Http) -> Rest {
        Rest {
            addr,
            http,
            token: None,
        }
    }

    fn with_token(&self, token: &str) -> Rest {
        Rest {
            token: Some(token.to_owned()),
            ..self.clone()
        }
    }

    async fn send(&self, request: http::request::Builder, body: Full<Bytes>) -> Reply {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(self.http == Http::Two)
            .build_http::<Full<Bytes>>();
        let mut request = request;
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = tokio::time::timeout(PATIENCE, client.request(request.body(body).unwrap()))
            .await
            .expect("the broker answers")
            .unwrap();
        let expected = match self.http {
            Http::One => Version::HTTP_11,
            Http::Two => Version::HTTP_2,
        };
        assert_eq!(response.version(), expected);
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    /// `method path` with `body` as `content_type`.
    async fn raw(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Reply {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        self.send(request, Full::new(Bytes::copy_from_slice(body)))
            .await
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        self.raw(
            Method::POST,
            path,
            Some("application/json"),
            body.to_string().as_bytes(),
        )
        .await
    }

    async fn put(&self, path: &str, body: Value) -> Reply {
        self.raw(
            Method::PUT,
            path,
            Some("application/json"),
            body.to_string().as_bytes(),
        )
        .await
    }

    async fn get(&self, path: &str) -> Reply {
        self.raw(Method::GET, path, None, b"").await
    }

    /// `/health` and a gRPC call both succeed.
    async fn assert_healthy(&self) {
        let health = self.get("/health").await;
        assert_eq!(health.status, StatusCode::OK, "{health:?}");
        assert_eq!(health.json(), json!({"status": "SERVING"}));
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap();
    }
}

/// The per-item failures of a batch reply: (the request data's id, code).
fn failures(reply: &Value, data: &str, id: &str) -> Vec<(String, String)> {
    reply["UnsuccessfulList"]
        .as_array()
        .unwrap_or_else(|| panic!("{reply}"))
        .iter()
        .map(|f| {
            (
                f[data][id].as_str().unwrap_or_default().to_owned(),
                f["FailureCode"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn codes(reply: &Value) -> Vec<String> {
    reply["UnsuccessfulList"]
        .as_array()
        .unwrap_or_else(|| panic!("{reply}"))
        .iter()
        .map(|f| f["FailureCode"].as_str().unwrap().to_owned())
        .collect()
}

/// Creates a virtual session for `owner` over REST and makes it READY
/// through `agent`; returns its id.
async fn ready_session(rest: &Rest, agent: &mut TestAgent, owner: &str) -> String {
    let reply = rest
        .post(
            "/createSessions",
            json!([{"Name": "desk", "Owner": owner, "Type": "VIRTUAL"}]),
        )
        .await
        .ok();
    assert_eq!(reply["UnsuccessfulList"], json!([]), "{reply}");
    let id = reply["SuccessfulList"][0]["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(reply["SuccessfulList"][0]["State"], "CREATING");
    assert_eq!(agent.next_create().await.session_id, id);
    agent
        .report(&id, Kind::CreateSession, true, St::Ready)
        .await;
    id
}

#[tokio::test]
async fn every_route_answers_over_http1_and_http2() {
    let broker = Broker::start(config()).await;
    let mut agent = TestAgent::connect(&broker, registration("lin", "linux", 8)).await;
    for http in BOTH {
        let rest = Rest::new(broker.addr, http);

        let servers = rest.post("/describeServers", json!({})).await.ok();
        assert_eq!(servers["Servers"][0]["Id"], "lin", "{servers}");
        assert_eq!(servers["NextToken"], "");
        // No body at all is "everything" too.
        let empty = rest
            .raw(Method::POST, "/describeServers", None, b"")
            .await
            .ok();
        assert_eq!(empty["Servers"].as_array().unwrap().len(), 1);

        let id = ready_session(&rest, &mut agent, "gus").await;
        let described = rest
            .post("/describeSessions", json!({"SessionIds": [id]}))
            .await
            .ok();
        let session = &described["Sessions"][0];
        assert_eq!(session["Id"], id.as_str());
        assert_eq!(session["State"], "READY");
        assert_eq!(session["Owner"], "gus");
        assert_eq!(session["Type"], "VIRTUAL");
        assert!(session["CreationTime"].as_str().unwrap().ends_with('Z'));

        let data = rest
            .get(&format!("/sessionConnectionData/{id}/gus"))
            .await
            .ok();
        assert_eq!(data["Session"]["Id"], id.as_str());
        assert!(!data["ConnectionToken"].as_str().unwrap().is_empty());

        let permissions = rest
            .put(
                "/sessionPermissions",
                json!([{"SessionId": id, "Owner": "gus", "PermissionsFile": "W3Blcm1pc3Npb25zXQ=="}]),
            )
            .await
            .ok();
        assert_eq!(permissions["SuccessfulList"][0]["SessionId"], id.as_str());
        assert_eq!(permissions["UnsuccessfulList"], json!([]));
        match agent.next().await {
            Instr::UpdatePermissions(u) => assert_eq!(u.session_id, id),
            other => panic!("expected UpdatePermissions, got {other:?}"),
        }

        // The screenshot waits for the agent: ask in a task, answer here.
        let asking = {
            let rest = rest.clone();
            let id = id.clone();
            tokio::spawn(async move {
                rest.post("/getSessionScreenshots", json!([{"SessionId": id}]))
                    .await
            })
        };
        let (instruction_id, _) = agent.next_screenshot().await;
        agent
            .report_screenshot(
                &id,
                &instruction_id,
                Ok(vec![pb::SessionScreenshotImage {
                    format: "png".into(),
                    data: vec![1, 2, 3],
                    creation_time: Some(std::time::SystemTime::now().into()),
                    primary: true,
                }]),
            )
            .await
            .unwrap();
        let shots = asking.await.unwrap().ok();
        let image = &shots["SuccessfulList"][0]["SessionScreenshot"]["Images"][0];
        assert_eq!(image["Data"], "AQID", "{shots}");
        assert_eq!(image["Format"], "png");
        assert_eq!(image["Primary"], true);

        let deleted = rest
            .post(
                "/deleteSessions",
                json!([{"SessionId": id, "Owner": "gus", "Force": true}]),
            )
            .await
            .ok();
        assert_eq!(
            deleted["SuccessfulList"][0]["SessionId"],
            id.as_str(),
            "{deleted}"
        );

        let closed = rest
            .post("/closeServers", json!([{"ServerId": "lin", "Force": true}]))
            .await
            .ok();
        assert_eq!(closed["SuccessfulList"], json!([{"ServerId": "lin"}]));
        let opened = rest
            .post("/openServers", json!([{"ServerId": "lin"}]))
            .await
            .ok();
        assert_eq!(opened["SuccessfulList"], json!([{"ServerId": "lin"}]));
        assert_eq!(opened["UnsuccessfulList"], json!([]));
        rest.assert_healthy().await;
    }
}

#[tokio::test]
async fn the_seeds_close_example_and_state_shared_with_grpc() {
    // The default: DCV's fields only, as DCV documents the reply.
    let broker = Broker::quiet().await;
    let _agent = TestAgent::connect(&broker, registration("serverId1", "linux", 2)).await;
    let rest = Rest::new(broker.addr, Http::One);
    // DCV's Python SDK sends the bare array of CloseServerRequestData.
    let reply = rest
        .post(
            "/closeServers",
            json!([{"ServerId": "serverId1"}, {"ServerId": "serverId2"}]),
        )
        .await
        .ok();
    assert_eq!(reply["SuccessfulList"], json!([{"ServerId": "serverId1"}]));
    assert_eq!(
        reply["UnsuccessfulList"],
        json!([{
            "CloseServerRequestData": {"ServerId": "serverId2", "Force": false},
            "FailureCode": "DCV_SERVER_NOT_FOUND",
            "FailureReason": "Dcv server not found.",
        }])
    );
    // Closed over REST: closed over gRPC.
    let mut servers = broker.servers().await;
    let server = describe_one(&mut servers, "serverId1").await;
    assert!(
        reasons(&server).contains(&pb::UnavailabilityReason::ServerClosed),
        "{server:?}"
    );
    let described = rest
        .post("/describeServers", json!({"ServerIds": ["serverId1"]}))
        .await
        .ok();
    assert_eq!(
        described["Servers"][0]["UnavailabilityReason"], "SERVER_CLOSED",
        "{described}"
    );
    // Opened over gRPC: open over REST.
    servers
        .open_servers(open_req(&["serverId1"]))
        .await
        .unwrap();
    let described = rest
        .post("/describeServers", json!({"ServerIds": ["serverId1"]}))
        .await
        .ok();
    assert!(
        described["Servers"][0]
            .get("UnavailabilityReason")
            .is_none(),
        "{described}"
    );
    assert_eq!(
        described["Servers"][0]["Availability"], "AVAILABLE",
        "{described}"
    );

    // One path through the code: the gRPC reply, in DCV's JSON, is the
    // REST reply but for the request id.
    let grpc = servers
        .describe_servers(describe_ids(&["serverId1"]))
        .await
        .unwrap()
        .into_inner();
    let route = dcv_broker::api::rest::ROUTES
        .iter()
        .find(|r| r.path == "/describeServers")
        .unwrap();
    let (_, output) = dcv_broker::api::rest::json::method_types(route).unwrap();
    let encoded = dcv_broker::api::rest::json::encode_reply(&output, &grpc, false).unwrap();
    let mut grpc: Value = serde_json::from_slice(&encoded).unwrap();
    let mut described = described;
    for reply in [&mut grpc, &mut described] {
        reply.as_object_mut().unwrap().remove("RequestId");
    }
    assert_eq!(grpc, described);
}

#[tokio::test]
async fn dcv_exact_replies_by_default_and_our_additions_on_request() {
    for additions in [false, true] {
        let broker = Broker::start(BrokerConfig {
            rest_additions: additions,
            ..quiet_config()
        })
        .await;
        let _agent = TestAgent::connect(&broker, registration("lin", "linux", 2)).await;
        let rest = Rest::new(broker.addr, Http::Two);
        rest.post(
            "/closeServers",
            json!([{"ServerId": "lin", "Reason": "maintenance"}]),
        )
        .await
        .ok();
        let described = rest.post("/describeServers", json!({})).await.ok();
        let server = described["Servers"][0].as_object().unwrap();
        // DCV's fields are there either way.
        for field in [
            "Id",
            "Hostname",
            "Availability",
            "UnavailabilityReason",
            "Host",
            "Tags",
        ] {
            assert!(server.contains_key(field), "{field}: {described}");
        }
        for field in [
            "Holds",
            "UnavailabilityReasons",
            "LastHeartbeatTime",
            "RegistrationTime",
            "MaxVirtualSessions",
        ] {
            assert_eq!(
                server.contains_key(field),
                additions,
                "{field}: {described}"
            );
        }
        if additions {
            assert_eq!(server["Holds"][0]["Reason"], "maintenance");
        }
        // DCV's DeleteSessions failures carry no FailureCode; ours do.
        let deleted = rest
            .post(
                "/deleteSessions",
                json!([{"SessionId": "nope", "Owner": "alice"}]),
            )
            .await
            .ok();
        let failure = deleted["UnsuccessfulList"][0].as_object().unwrap();
        assert_eq!(failure["SessionId"], "nope", "{deleted}");
        assert!(failure.contains_key("FailureReason"), "{deleted}");
        assert_eq!(failure.contains_key("FailureCode"), additions, "{deleted}");
        // CloseServers' FailureCode is DCV's own: always there; the echoed
        // item's Reason is ours.
        let closed = rest
            .post("/closeServers", json!([{"ServerId": "gone"}]))
            .await
            .ok();
        let failure = &closed["UnsuccessfulList"][0];
        assert_eq!(failure["FailureCode"], "DCV_SERVER_NOT_FOUND", "{closed}");
        assert_eq!(
            failure["CloseServerRequestData"]
                .as_object()
                .unwrap()
                .contains_key("Reason"),
            additions,
            "{closed}"
        );
    }
}

#[tokio::test]
async fn every_per_item_failure_code_arrives_by_name() {
    let broker = Broker::start(BrokerConfig {
        fleet: dcv_broker::fleet::FleetConfig {
            queue_max_size: 1,
            ..Default::default()
        },
        ..config()
    })
    .await;
    let mut agent = TestAgent::connect(&broker, registration("lin", "linux", 8)).await;
    let _win = TestAgent::connect(&broker, registration("win", "windows", 0)).await;
    let rest = Rest::new(broker.addr, Http::Two);
    let busy = ready_session(&rest, &mut agent, "gus").await;

    // CloseServers: unknown, running sessions, invalid id, duplicate,
    // invalid reason.
    let reply = rest
        .post(
            "/closeServers",
            json!([
                {"ServerId": "nope"},
                {"ServerId": "lin"},
                {"ServerId": ""},
                {"ServerId": "win", "Reason": "maintenance"},
                {"ServerId": "win"},
                {"ServerId": "win", "Reason": "bad\u{7}reason"},
            ]),
        )
        .await
        .ok();
    assert_eq!(
        codes(&reply),
        [
            "DCV_SERVER_NOT_FOUND",
            "DCV_SERVER_HAS_RUNNING_SESSIONS",
            "INVALID_SERVER_ID",
            "DUPLICATE_SERVER_ID",
            "DUPLICATE_SERVER_ID",
        ],
        "{reply}"
    );
    let reply = rest
        .post(
            "/closeServers",
            json!([{"ServerId": "win", "Reason": "x".repeat(5000)}]),
        )
        .await
        .ok();
    assert_eq!(codes(&reply), ["INVALID_REASON"], "{reply}");
    assert_eq!(reply["SuccessfulList"], json!([]));

    // OpenServers: unknown, invalid id, duplicate.
    let reply = rest
        .post(
            "/openServers",
            json!([{"ServerId": "nope"}, {"ServerId": ""}, {"ServerId": "lin"}, {"ServerId": "lin"}]),
        )
        .await
        .ok();
    assert_eq!(
        failures(&reply, "OpenServerRequestData", "ServerId"),
        [
            ("nope".to_owned(), "DCV_SERVER_NOT_FOUND".to_owned()),
            (String::new(), "INVALID_SERVER_ID".to_owned()),
            ("lin".to_owned(), "DUPLICATE_SERVER_ID".to_owned()),
        ],
        "{reply}"
    );

    // CreateSessions: invalid parameter, invalid requirements, no server,
    // queue full.
    let reply = rest
        .post(
            "/createSessions",
            json!([
                {"Name": "", "Owner": "o", "Type": "CONSOLE"},
                {"Name": "q", "Owner": "o", "Type": "CONSOLE", "Requirements": "tag:"},
                {"Name": "v", "Owner": "o", "Type": "VIRTUAL", "Requirements": "server:Host.Os.Family = 'windows'"},
                {"Name": "queued", "Owner": "o", "Type": "VIRTUAL", "EnqueueRequest": true, "Requirements": "server:Host.Os.Family = 'windows'"},
                {"Name": "refused", "Owner": "o", "Type": "VIRTUAL", "EnqueueRequest": true, "Requirements": "server:Host.Os.Family = 'windows'"},
            ]),
        )
        .await
        .ok();
    assert_eq!(
        codes(&reply),
        [
            "INVALID_SESSION_PARAMETER",
            "INVALID_REQUIREMENTS",
            "NO_SERVER_AVAILABLE",
            "QUEUE_FULL",
        ],
        "{reply}"
    );
    let failed = &reply["UnsuccessfulList"][0];
    assert_eq!(failed["CreateSessionRequestData"]["Type"], "CONSOLE");
    assert!(
        failed["FailureReason"]
            .as_str()
            .unwrap()
            .starts_with("Name")
    );

    // UpdateSessionPermissions: duplicate, unknown, invalid.
    let perm =
        |id: &str, file: &str| json!({"SessionId": id, "Owner": "gus", "PermissionsFile": file});
    let reply = rest
        .put(
            "/sessionPermissions",
            json!([
                perm(&busy, "W3Blcm1pc3Npb25zXQ=="),
                perm(&busy, "W3Blcm1pc3Npb25zXQ=="),
                perm("missing", "W3Blcm1pc3Npb25zXQ=="),
            ]),
        )
        .await
        .ok();
    assert_eq!(
        codes(&reply),
        ["DUPLICATE_SESSION_ID", "SESSION_NOT_FOUND"],
        "{reply}"
    );
    assert!(matches!(agent.next().await, Instr::UpdatePermissions(_)));
    let reply = rest
        .put("/sessionPermissions", json!([perm(&busy, "%%%")]))
        .await
        .ok();
    assert_eq!(codes(&reply), ["INVALID_SESSION_PARAMETER"], "{reply}");

    // GetSessionScreenshots: unknown, not ready, duplicate, invalid; the
    // agent failing is AGENT_FAILED.
    let creating = rest
        .post(
            "/createSessions",
            json!([{"Name": "c", "Owner": "gus", "Type": "VIRTUAL"}]),
        )
        .await
        .ok()["SuccessfulList"][0]["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    agent.next_create().await;
    let asking = {
        let rest = rest.clone();
        let (busy, creating) = (busy.clone(), creating.clone());
        tokio::spawn(async move {
            rest.post(
                "/getSessionScreenshots",
                json!([
                    {"SessionId": "missing"},
                    {"SessionId": creating},
                    {"SessionId": busy},
                    {"SessionId": busy},
                    {"SessionId": ""},
                ]),
            )
            .await
        })
    };
    let (instruction_id, _) = agent.next_screenshot().await;
    agent
        .report_screenshot(&busy, &instruction_id, Err("no display"))
        .await
        .unwrap();
    let reply = asking.await.unwrap().ok();
    let mut got = codes(&reply);
    got.sort();
    assert_eq!(
        got,
        [
            "AGENT_FAILED",
            "DUPLICATE_SESSION_ID",
            "INVALID_SESSION_PARAMETER",
            "SESSION_NOT_FOUND",
            "SESSION_NOT_READY",
        ],
        "{reply}"
    );

    // GetSessionConnectionData has no list: an unknown session is 404, a
    // session not READY yet 400, both in the error body.
    let reply = rest.get("/sessionConnectionData/missing/gus").await;
    reply.error(StatusCode::NOT_FOUND, "not_found");
    let reply = rest
        .get(&format!("/sessionConnectionData/{creating}/gus"))
        .await;
    reply.error(StatusCode::BAD_REQUEST, "invalid_request");
    // DeleteSessions: unknown, duplicate, invalid.
    let reply = rest
        .post(
            "/deleteSessions",
            json!([
                {"SessionId": "nope", "Owner": "gus"},
                {"SessionId": busy, "Owner": "gus", "Force": true},
                {"SessionId": busy, "Owner": "gus"},
                {"SessionId": "", "Owner": "gus"},
            ]),
        )
        .await
        .ok();
    assert_eq!(
        failures(&reply, "DeleteSessionRequestData", "SessionId")
            .into_iter()
            .map(|(_, code)| code)
            .collect::<Vec<_>>(),
        [
            "SESSION_NOT_FOUND",
            "DUPLICATE_SESSION_ID",
            "INVALID_SESSION_PARAMETER",
        ],
        "{reply}"
    );

    rest.assert_healthy().await;
}

#[tokio::test]
async fn malformed_bodies_are_400s_naming_the_field() {
    let broker = Broker::start(config()).await;
    for http in BOTH {
        let rest = Rest::new(broker.addr, http);
        for route in dcv_broker::api::rest::ROUTES {
            let (method, path) = (route.method.clone(), route.path);
            if path.contains('{') {
                continue;
            }
            let array = matches!(
                route.body,
                dcv_broker::api::rest::RequestBody::BareArray { .. }
            );
            let send = |body: &'static str| {
                let rest = rest.clone();
                let method = method.clone();
                async move {
                    rest.raw(method, path, Some("application/json"), body.as_bytes())
                        .await
                }
            };
            // Malformed JSON.
            send("[{\"SessionId\": ").await.bad("body");
            // The wrong shape at the top.
            if array {
                send("{}").await.bad("body");
            } else {
                send("[]").await.bad("body");
            }
            // An unknown field, named by its path.
            if array {
                let list = match route.body {
                    dcv_broker::api::rest::RequestBody::BareArray { field } => field,
                    _ => unreachable!(),
                };
                let (input, _) = dcv_broker::api::rest::json::method_types(route).unwrap();
                let list = input.get_field_by_name(list).unwrap();
                send(r#"[{}, {"Bogus": 1}]"#)
                    .await
                    .bad(&format!("{}[1].Bogus", list.json_name()));
            } else {
                send(r#"{"Bogus": 1}"#).await.bad("Bogus");
            }
        }
        // Unknown fields and wrong types, per route, named.
        rest.post("/closeServers", json!([{"ServerId": "a", "Bogus": 1}]))
            .await
            .bad("Servers[0].Bogus");
        rest.post("/closeServers", json!([{"ServerId": "a", "Force": "yes"}]))
            .await
            .bad("Servers[0].Force");
        rest.post("/openServers", json!([{"ServerId": 5}]))
            .await
            .bad("Servers[0].ServerId");
        rest.post("/describeServers", json!({"MaxResults": "many"}))
            .await
            .bad("MaxResults");
        rest.post("/describeSessions", json!({"Nope": true}))
            .await
            .bad("Nope");
        rest.post(
            "/createSessions",
            json!([{"Name": "n", "Type": "SIDEWAYS"}]),
        )
        .await
        .bad("Sessions[0].Type");
        rest.post("/deleteSessions", json!([{"SessionId": ["a"]}]))
            .await
            .bad("Sessions[0].SessionId");
        rest.put("/sessionPermissions", json!([{"Owner": {}}]))
            .await
            .bad("Sessions[0].Owner");
        rest.post("/getSessionScreenshots", json!([{"MaxWidth": "wide"}]))
            .await
            .bad("Sessions[0].MaxWidth");
        // The domain's own violations come through the same mapping.
        rest.post("/closeServers", json!([])).await.bad("Servers");
        // A path parameter that is not UTF-8.
        rest.get("/sessionConnectionData/%FF/gus")
            .await
            .bad("sessionId");
        rest.assert_healthy().await;
    }
}

/// A broker with authentication on, and its client registry.
async fn auth_broker(config: BrokerConfig) -> (Broker, Auth) {
    let auth = Auth::in_memory(AuthConfig::default()).await.unwrap();
    let broker = Broker::start(BrokerConfig {
        auth: Some(auth.clone()),
        ..config
    })
    .await;
    (broker, auth)
}

/// A token from `/oauth2/token` for a new client with `scopes`: its id and
/// the token.
async fn token(broker: &Broker, auth: &Auth, scopes: &str) -> (String, String) {
    use base64::Engine as _;
    let registered = auth
        .register("rest test", ScopeSet::parse(scopes).unwrap(), None)
        .await
        .unwrap();
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", registered.client.id, registered.secret));
    let rest = Rest::new(broker.addr, Http::One);
    let request = http::Request::builder()
        .method(Method::POST)
        .uri(format!(
            "http://{}/oauth2/token?grant_type=client_credentials",
            broker.addr
        ))
        .header(header::AUTHORIZATION, format!("Basic {basic}"));
    let reply = rest.send(request, Full::new(Bytes::new())).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let token = reply.json()["access_token"].as_str().unwrap().to_owned();
    (registered.client.id, token)
}

/// Each route with a body it accepts.
fn sample(route: &dcv_broker::api::rest::Route) -> (String, Option<Value>) {
    match route.path {
        "/sessionConnectionData/{sessionId}/{user}" => {
            ("/sessionConnectionData/s/u".to_owned(), None)
        }
        "/describeServers" | "/describeSessions" => (route.path.to_owned(), Some(json!({}))),
        "/closeServers" | "/openServers" => {
            (route.path.to_owned(), Some(json!([{"ServerId": "nope"}])))
        }
        "/createSessions" => (
            route.path.to_owned(),
            Some(json!([{"Name": "n", "Owner": "o", "Type": "VIRTUAL"}])),
        ),
        _ => (route.path.to_owned(), Some(json!([{"SessionId": "nope"}]))),
    }
}

async fn call(rest: &Rest, route: &dcv_broker::api::rest::Route) -> Reply {
    let (path, body) = sample(route);
    match body {
        None => rest.raw(route.method.clone(), &path, None, b"").await,
        Some(body) => {
            rest.raw(
                route.method.clone(),
                &path,
                Some("application/json"),
                body.to_string().as_bytes(),
            )
            .await
        }
    }
}

#[tokio::test]
async fn tokens_and_scopes_as_for_grpc() {
    let (broker, auth) = auth_broker(config()).await;
    let (_, read) = token(&broker, &auth, "read").await;
    let (operator, all) = token(&broker, &auth, "read servers:operate sessions:manage").await;
    for http in BOTH {
        let anonymous = Rest::new(broker.addr, http);
        let reader = anonymous.with_token(&read);
        let everything = anonymous.with_token(&all);
        let forged = anonymous.with_token("not.a.token");
        for route in dcv_broker::api::rest::ROUTES {
            let reply = call(&anonymous, route).await;
            let json = reply.error(StatusCode::UNAUTHORIZED, "invalid_token");
            assert!(json["request_id"].is_string(), "{json}");
            assert_eq!(
                reply.headers[header::WWW_AUTHENTICATE],
                r#"Bearer realm="dcv-broker""#
            );
            let reply = call(&forged, route).await;
            reply.error(StatusCode::UNAUTHORIZED, "invalid_token");
            assert_eq!(
                reply.headers[header::WWW_AUTHENTICATE],
                r#"Bearer realm="dcv-broker", error="invalid_token""#
            );

            let reply = call(&reader, route).await;
            if route.path.starts_with("/describe") {
                reply.ok();
            } else {
                let json = reply.error(StatusCode::FORBIDDEN, "insufficient_scope");
                assert!(
                    json["error_description"]
                        .as_str()
                        .unwrap()
                        .contains(route.grpc_path),
                    "{json}"
                );
            }

            let reply = call(&everything, route).await;
            if route.path.starts_with("/sessionConnectionData") {
                reply.error(StatusCode::NOT_FOUND, "not_found");
            } else {
                let json = reply.ok();
                if json.get("UnsuccessfulList").is_some() {
                    assert_eq!(codes(&json).len(), 1, "{json}");
                }
            }
        }
        // Open without a token: health.
        anonymous.assert_healthy().await;
    }

    // The audit actor is the token's client, as over gRPC.
    // (A server registered in-process: agents need tokens of their own.)
    let (id, description) =
        dcv_broker::wire::registration_from_pb(registration("lin", "linux", 2)).unwrap();
    broker.fleet.register(&id, description).await.unwrap();
    let rest = Rest::new(broker.addr, Http::One).with_token(&all);
    let closed = rest
        .post(
            "/closeServers",
            json!([{"ServerId": "lin", "Reason": "maintenance"}]),
        )
        .await
        .ok();
    assert_eq!(closed["SuccessfulList"], json!([{"ServerId": "lin"}]));
    let described = rest
        .post("/describeServers", json!({"ServerIds": ["lin"]}))
        .await
        .ok();
    let hold = &described["Servers"][0]["Holds"][0];
    assert_eq!(hold["Actor"], operator.as_str(), "{described}");
    assert_eq!(hold["Reason"], "maintenance");
}

/// Sends `chunks` as a body of undeclared length (chunked over HTTP/1.1).
async fn streamed(addr: SocketAddr, path: &str, chunks: Vec<Bytes>) -> Reply {
    type Chunks = StreamBody<
        tokio_stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, std::io::Error>>>,
    >;
    let client = Client::builder(TokioExecutor::new()).build_http::<Chunks>();
    let frames: Vec<_> = chunks
        .into_iter()
        .map(|c| Ok(http_body::Frame::data(c)))
        .collect();
    let request = http::Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}{path}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(tokio_stream::iter(frames)))
        .unwrap();
    let response = tokio::time::timeout(PATIENCE, client.request(request))
        .await
        .expect("the broker answers")
        .unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default(),
    }
}

#[tokio::test]
async fn sizes_methods_media_types_and_paths() {
    let broker = Broker::start(config()).await;
    let limit = Limits::default().max_request_bytes;
    for http in BOTH {
        let rest = Rest::new(broker.addr, http);
        // Over the limit, declared: refused before the body is read.
        let big = vec![b' '; limit + 1];
        rest.raw(
            Method::POST,
            "/closeServers",
            Some("application/json"),
            &big,
        )
        .await
        .error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
        // A huge array of `{}` within the byte limit: refused by the list
        // item bound before any item is built.
        let mut many = b"[".to_vec();
        while many.len() < limit - 8 {
            many.extend_from_slice(b"{},");
        }
        many.extend_from_slice(b"{}]");
        let json = rest
            .raw(
                Method::POST,
                "/createSessions",
                Some("application/json"),
                &many,
            )
            .await
            .bad("body");
        assert!(
            json["error_description"]
                .as_str()
                .unwrap()
                .contains("list items"),
            "{json}"
        );
        // Deep nesting: a 400, not a crash.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        rest.raw(
            Method::POST,
            "/closeServers",
            Some("application/json"),
            deep.as_bytes(),
        )
        .await
        .bad("body");
        let deep = format!(
            "[{{\"ServerId\": {}1{}}}]",
            "[".repeat(5000),
            "]".repeat(5000)
        );
        rest.raw(
            Method::POST,
            "/closeServers",
            Some("application/json"),
            deep.as_bytes(),
        )
        .await
        .bad("body");

        // Wrong methods: 405 with Allow.
        for (method, path, allow) in [
            (Method::GET, "/closeServers", "POST"),
            (Method::DELETE, "/describeSessions", "POST"),
            (Method::POST, "/sessionPermissions", "PUT"),
            (Method::POST, "/sessionConnectionData/a/b", "GET"),
            (Method::POST, "/health", "GET, HEAD"),
        ] {
            let reply = rest.raw(method, path, None, b"").await;
            reply.error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
            assert_eq!(reply.headers[header::ALLOW], allow, "{path}");
        }
        // Wrong content types: 415.
        for content_type in [
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            None,
        ] {
            rest.raw(
                Method::POST,
                "/closeServers",
                content_type,
                br#"[{"ServerId": "a"}]"#,
            )
            .await
            .error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
        }
        let reply = rest
            .raw(
                Method::POST,
                "/closeServers",
                Some("application/json; charset=utf-8"),
                br#"[{"ServerId": "a"}]"#,
            )
            .await
            .ok();
        assert_eq!(codes(&reply), ["DCV_SERVER_NOT_FOUND"]);
        // Unknown paths, and DCV's paths are case-sensitive: 404.
        for path in [
            "/closeservers",
            "/closeServers/",
            "/nope",
            "/sessionConnectionData/a",
        ] {
            rest.raw(Method::POST, path, None, b"")
                .await
                .error(StatusCode::NOT_FOUND, "not_found");
        }
        rest.assert_healthy().await;
    }
    // Over the limit, undeclared (chunked): refused while reading.
    let chunk = Bytes::from(vec![b' '; 1024 * 1024]);
    let reply = streamed(
        broker.addr,
        "/closeServers",
        vec![chunk; limit / (1024 * 1024) + 2],
    )
    .await;
    reply.error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    Rest::new(broker.addr, Http::One).assert_healthy().await;
}

#[tokio::test]
async fn the_clients_rate_is_the_one_grpc_calls_count_against() {
    let (broker, auth) = auth_broker(BrokerConfig {
        limits: Limits {
            client_rate: ClientRate::new(1, 2),
            ..config().limits
        },
        ..config()
    })
    .await;
    let (_, read) = token(&broker, &auth, "read").await;
    let rest = Rest::new(broker.addr, Http::Two).with_token(&read);
    rest.post("/describeServers", json!({})).await.ok();
    // One gRPC call takes the second token of the same bucket.
    let mut servers = broker.servers().await;
    let mut grpc = tonic::Request::new(pb::DescribeServersRequest::default());
    grpc.metadata_mut()
        .insert("authorization", format!("Bearer {read}").parse().unwrap());
    servers.describe_servers(grpc).await.unwrap();
    let reply = rest.post("/describeServers", json!({})).await;
    reply.error(StatusCode::TOO_MANY_REQUESTS, "too_many_requests");
    assert_eq!(reply.headers[header::RETRY_AFTER], "1");
    // Health is never rate limited.
    let health = rest.get("/health").await;
    assert_eq!(health.status, StatusCode::OK);
}

#[tokio::test]
async fn health_follows_grpc_health_through_shutdown() {
    let mut config = config();
    config.shutdown_grace = Duration::from_secs(30);
    let mut broker = Broker::start(config).await;
    let rest = Rest::new(broker.addr, Http::One);
    rest.assert_healthy().await;
    let head = rest.raw(Method::HEAD, "/health", None, b"").await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    broker.stop();
    // NOT_SERVING is reported at once on shutdown; the grace period keeps
    // serving. Poll (bounded) until the change shows.
    let mut last = None;
    for _ in 0..200 {
        let reply = rest.get("/health").await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            last = Some(reply);
            break;
        }
        tokio::task::yield_now().await;
    }
    let reply = last.expect("health turns 503 during the grace period");
    assert_eq!(reply.json(), json!({"status": "NOT_SERVING"}));
    // Calls still succeed meanwhile.
    rest.post("/describeServers", json!({})).await.ok();
}

#[tokio::test]
async fn health_says_where_a_replica_stands() {
    use dcv_broker::cluster::{ClusterView, Role};
    let cluster = ClusterView::clustered("replica-2".into());
    let broker = Broker::start(BrokerConfig {
        cluster: cluster.clone(),
        ..config()
    })
    .await;
    let rest = Rest::new(broker.addr, Http::One);
    cluster.set_epoch(4);
    cluster.reset_applied(17);
    cluster.set_role(Role::Follower {
        leader: "http://10.0.0.1:8443".into(),
    });
    let reply = rest.get("/health").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(
        reply.json(),
        json!({"status": "SERVING", "role": "follower", "leader": "http://10.0.0.1:8443",
               "epoch": 4, "applied_seq": 17, "lag_ms": 0})
    );
    // Cut off from the database: still SERVING (reads work), and says why.
    cluster.set_role(Role::Unavailable {
        why: "the database is unreachable".into(),
    });
    let reply = rest.get("/health").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let body = reply.json();
    assert_eq!(body["role"], "unavailable");
    assert_eq!(body["why"], "the database is unreachable");
    cluster.set_role(Role::Leader);
    cluster.set_committed(18);
    let body = rest.get("/health").await.json();
    assert_eq!(
        (&body["role"], &body["applied_seq"], &body["lag_ms"]),
        (&json!("leader"), &json!(18), &json!(0))
    );
}

#[tokio::test]
async fn the_openapi_document_is_served() {
    let broker = Broker::start(config()).await;
    let rest = Rest::new(broker.addr, Http::One);
    let reply = rest.get("/dcv-session-manager-api.yaml").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(
        reply.headers[header::CONTENT_TYPE],
        dcv_broker::api::rest::openapi::CONTENT_TYPE
    );
    assert_eq!(reply.body, dcv_broker::api::rest::openapi::document());
    assert!(
        String::from_utf8_lossy(&reply.body).contains("/closeServers"),
        "{reply:?}"
    );
}

/// One request over TLS, trusting only `ca` (PEM), with ALPN `h2` or
/// `http/1.1`.
async fn over_tls(
    addr: SocketAddr,
    ca: &str,
    http: Http,
    request: http::Request<Full<Bytes>>,
) -> Reply {
    use hyper_util::rt::TokioIo;
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![match http {
        Http::One => b"http/1.1".to_vec(),
        Http::Two => b"h2".to_vec(),
    }];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let io = TokioIo::new(tls);
    let response = match http {
        Http::One => {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(connection);
            sender.send_request(request).await.unwrap()
        }
        Http::Two => {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            sender.send_request(request).await.unwrap()
        }
    };
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

#[tokio::test]
async fn routes_are_served_over_tls_too() {
    use dcv_broker::tls::{ServerTls, init};
    let dir = std::env::temp_dir().join(format!("dcv-rest-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let generated = init::generate(&["localhost".into(), "127.0.0.1".into()], 30).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, &generated.server_cert).unwrap();
    std::fs::write(&key, &generated.server_key).unwrap();
    let tls = ServerTls::load(&cert, &key).unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fleet = dcv_broker::fleet::Fleet::new(Default::default()).unwrap();
    let (id, description) =
        dcv_broker::wire::registration_from_pb(registration("serverId1", "linux", 2)).unwrap();
    fleet.register(&id, description).await.unwrap();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(dcv_broker::serve_tls(
        listener,
        fleet,
        config(),
        tls,
        async {
            let _ = stopped.await;
        },
    ));
    for http in BOTH {
        let version = match http {
            Http::One => Version::HTTP_11,
            Http::Two => Version::HTTP_2,
        };
        let request = http::Request::builder()
            .method(Method::POST)
            .version(version)
            .uri(format!("https://localhost:{}/closeServers", addr.port()))
            .header(header::HOST, format!("localhost:{}", addr.port()))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(
                br#"[{"ServerId": "serverId1"}, {"ServerId": "serverId2"}]"#,
            )))
            .unwrap();
        let request = match http {
            // HTTP/2 carries the authority in :authority.
            Http::Two => {
                let (mut parts, body) = request.into_parts();
                parts.headers.remove(header::HOST);
                http::Request::from_parts(parts, body)
            }
            Http::One => request,
        };
        let reply = over_tls(addr, &generated.ca_cert, http, request).await;
        let json = reply.ok();
        assert_eq!(codes(&json), ["DCV_SERVER_NOT_FOUND"], "{json}");
        let health = over_tls(
            addr,
            &generated.ca_cert,
            http,
            http::Request::builder()
                .version(version)
                .uri(format!("https://localhost:{}/health", addr.port()))
                .header(header::HOST, format!("localhost:{}", addr.port()))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(health.status, StatusCode::OK, "{health:?}");
    }
}

#[tokio::test]
async fn the_in_flight_limit_sheds_rest_calls_as_503() {
    let broker = Broker::start(BrokerConfig {
        fleet: dcv_broker::fleet::FleetConfig {
            screenshot_timeout: Duration::from_millis(500),
            ..Default::default()
        },
        limits: Limits {
            max_concurrent_requests: Some(1),
            ..config().limits
        },
        ..config()
    })
    .await;
    let mut agent = TestAgent::connect(&broker, registration("lin", "linux", 2)).await;
    let rest = Rest::new(broker.addr, Http::Two);
    let id = ready_session(&rest, &mut agent, "gus").await;
    // A screenshot the agent never answers holds the one slot...
    let asking = {
        let rest = rest.clone();
        let id = id.clone();
        tokio::spawn(async move {
            rest.post("/getSessionScreenshots", json!([{"SessionId": id}]))
                .await
        })
    };
    agent.next_screenshot().await;
    // ...so another call is shed, in REST's form.
    let reply = rest.post("/describeServers", json!({})).await;
    let json = reply.error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(json["request_id"].is_string(), "{json}");
    assert!(reply.headers.contains_key(header::RETRY_AFTER));
    // Health is never shed.
    assert_eq!(rest.get("/health").await.status, StatusCode::OK);
    // Once the screenshot gives up, the slot is free again.
    let shot = asking.await.unwrap().ok();
    assert_eq!(codes(&shot), ["AGENT_UNAVAILABLE"], "{shot}");
    rest.post("/describeServers", json!({})).await.ok();
}

#[tokio::test]
async fn the_request_timeout_ends_a_rest_call_with_504() {
    let broker = Broker::start(BrokerConfig {
        request_timeout: Some(Duration::from_millis(300)),
        fleet: dcv_broker::fleet::FleetConfig {
            screenshot_timeout: Duration::from_secs(60),
            ..Default::default()
        },
        ..config()
    })
    .await;
    let mut agent = TestAgent::connect(&broker, registration("lin", "linux", 2)).await;
    let rest = Rest::new(broker.addr, Http::One);
    let id = ready_session(&rest, &mut agent, "gus").await;
    // The agent never answers: the broker's request timeout, not the
    // screenshot's, ends the call, in REST's form.
    let asking = {
        let rest = rest.clone();
        tokio::spawn(async move {
            rest.post("/getSessionScreenshots", json!([{"SessionId": id}]))
                .await
        })
    };
    agent.next_screenshot().await;
    let reply = asking.await.unwrap();
    let json = reply.error(StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded");
    assert!(json["request_id"].is_string(), "{json}");
    rest.assert_healthy().await;
}

#[tokio::test]
async fn the_gates_host_and_cross_site_rules_cover_rest_routes() {
    let broker = Broker::start(config()).await;
    let rest = Rest::new(broker.addr, Http::One);
    let body = || Full::new(Bytes::from_static(br#"[{"ServerId": "a"}]"#));
    let post = |name: &'static str, value: &str| {
        http::Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/closeServers", broker.addr))
            .header(header::CONTENT_TYPE, "application/json")
            .header(name, value)
    };
    // A web page's POST (its Origin) is refused before the route.
    let reply = rest
        .send(post("origin", "http://attacker.example"), body())
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{reply:?}");
    let reply = rest
        .send(post("sec-fetch-site", "cross-site"), body())
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{reply:?}");
    // A rebinding name as Host, on a plaintext loopback broker.
    let reply = rest.send(post("host", "attacker.example"), body()).await;
    assert_eq!(reply.status, StatusCode::MISDIRECTED_REQUEST, "{reply:?}");
    // The broker's own origin passes.
    let own = format!("http://{}", broker.addr);
    let reply = rest.send(post("origin", &own), body()).await;
    assert_eq!(codes(&reply.ok()), ["DCV_SERVER_NOT_FOUND"]);
}

#[tokio::test]
async fn screenshots_past_the_reply_budget_fail_with_reply_size_limit_over_rest() {
    use dcv_broker::fleet::sessions::screenshots::MAX_SCREENSHOT_REPLY_BYTES;
    let broker = Broker::start(config()).await;
    let mut agent = TestAgent::connect(&broker, registration("lin", "linux", 4)).await;
    let rest = Rest::new(broker.addr, Http::One);
    let mut ids = Vec::new();
    for owner in ["alice", "bob", "carol"] {
        ids.push(ready_session(&rest, &mut agent, owner).await);
    }
    let asking = {
        let rest = rest.clone();
        let items: Vec<Value> = ids.iter().map(|id| json!({"SessionId": id})).collect();
        tokio::spawn(async move { rest.post("/getSessionScreenshots", json!(items)).await })
    };
    // The first two in the request's order each take half the budget and
    // a byte: the second does not fit.
    let half = MAX_SCREENSHOT_REPLY_BYTES / 2 + 1;
    let sizes = [half, half, 1000];
    for _ in 0..3 {
        let (instruction_id, shot) = agent.next_screenshot().await;
        let n = ids.iter().position(|i| *i == shot.session_id).unwrap();
        let image = pb::SessionScreenshotImage {
            format: "png".into(),
            data: vec![n as u8; sizes[n]],
            creation_time: Some(std::time::SystemTime::now().into()),
            primary: true,
        };
        agent
            .report_screenshot(&shot.session_id, &instruction_id, Ok(vec![image]))
            .await
            .unwrap();
    }
    let reply = asking.await.unwrap().ok();
    let got: Vec<&str> = reply["SuccessfulList"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["SessionScreenshot"]["SessionId"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[0].as_str(), ids[2].as_str()]);
    // The images are base64, as DCV's Data.
    let data = reply["SuccessfulList"][1]["SessionScreenshot"]["Images"][0]["Data"]
        .as_str()
        .unwrap();
    use base64::Engine as _;
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap(),
        vec![2u8; 1000]
    );
    assert_eq!(codes(&reply), ["REPLY_SIZE_LIMIT"], "{reply}");
    assert_eq!(
        reply["UnsuccessfulList"][0]["GetSessionScreenshotRequestData"]["SessionId"],
        ids[1].as_str()
    );
}

#[tokio::test]
async fn named_holds_expiries_and_versions_over_rest() {
    // Issue 18's per-item fields ride in the array's items; the replies
    // show them with --rest-additions.
    let broker = Broker::start(config()).await;
    let _agent = TestAgent::connect(&broker, registration("s1", "linux", 2)).await;
    for http in BOTH {
        let rest = Rest::new(broker.addr, http);
        let reply = rest
            .post(
                "/closeServers",
                json!([{"ServerId": "s1", "HoldName": "net", "ExpiresIn": "3600s", "Reason": "cabling"}]),
            )
            .await
            .ok();
        assert_eq!(
            reply["SuccessfulList"],
            json!([{"ServerId": "s1"}]),
            "{reply}"
        );
        let described = rest
            .post("/describeServers", json!({"ServerIds": ["s1"]}))
            .await
            .ok();
        let server = &described["Servers"][0];
        assert_eq!(server["Holds"][0]["Name"], "net", "{described}");
        assert!(
            server["Holds"][0]["ExpirationTime"].is_string(),
            "{described}"
        );
        let version = server["StateVersion"].as_u64().unwrap();
        // A stale version, then another team's name: typed failures.
        let reply = rest
            .post(
                "/openServers",
                json!([{"ServerId": "s1", "HoldName": "net", "ExpectedStateVersion": version + 1}]),
            )
            .await
            .ok();
        assert_eq!(codes(&reply), ["STATE_VERSION_MISMATCH"], "{reply}");
        let reply = rest
            .post(
                "/openServers",
                json!([{"ServerId": "s1", "HoldName": "disk"}]),
            )
            .await
            .ok();
        assert_eq!(codes(&reply), ["HOLDS_REMAIN"], "{reply}");
        let reply = rest
            .post(
                "/openServers",
                json!([{"ServerId": "s1", "HoldName": "net", "ExpectedStateVersion": version}]),
            )
            .await
            .ok();
        assert_eq!(
            reply["SuccessfulList"],
            json!([{"ServerId": "s1"}]),
            "{reply}"
        );
        let reply = rest
            .post(
                "/closeServers",
                json!([{"ServerId": "s1", "HoldName": "bad name"}]),
            )
            .await
            .ok();
        assert_eq!(codes(&reply), ["INVALID_HOLD"], "{reply}");
    }
}
