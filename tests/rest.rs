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
    pb::{self, InstructionKind as Kind, SessionState as St},
};
use http::{Method, StatusCode, Version, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::{Value, json};

/// Bounds every wait: a broker that misbehaves fails the test.
const PATIENCE: Duration = Duration::from_secs(20);

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

    #[allow(dead_code)]
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
    let broker = Broker::quiet().await;
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
            "CloseServerRequestData": {"ServerId": "serverId2", "Force": false, "Reason": ""},
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
        described["Servers"][0]["UnavailabilityReasons"],
        json!(["SERVER_CLOSED"]),
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
    assert_eq!(described["Servers"][0]["UnavailabilityReasons"], json!([]));
    assert_eq!(
        described["Servers"][0]["Availability"], "AVAILABLE",
        "{described}"
    );
}

#[tokio::test]
async fn every_per_item_failure_code_arrives_by_name() {
    let broker = Broker::start(BrokerConfig {
        fleet: dcv_broker::fleet::FleetConfig {
            queue_max_size: 1,
            ..Default::default()
        },
        ..quiet_config()
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
    let broker = Broker::quiet().await;
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
