//! The watch streams over plain HTTP as server-sent events (issue 19's
//! "HTTP streaming form"): `GET /watchServers` and `GET /watchSessions`
//! over HTTP/1.1 and HTTP/2 give a snapshot event, then a change made
//! meanwhile through gRPC, each event with its `EPOCH:SEQUENCE` id; a
//! reconnection with `Last-Event-ID` resumes with no snapshot (and starts
//! from one when that point is gone); malformed requests get DCV-style
//! 400s, other methods 405.
//!
//! A real broker on 127.0.0.1:0, a hyper client reading the event stream
//! frame by frame; every wait is bounded. No sleeps.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{StatusCode, header};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(20);

/// One server-sent event.
#[derive(Debug)]
struct Event {
    kind: String,
    id: Option<String>,
    data: Value,
}

/// An open event stream.
struct Events {
    body: hyper::body::Incoming,
    buffer: Vec<u8>,
}

impl Events {
    async fn next(&mut self) -> Event {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let text = String::from_utf8(raw).unwrap();
                let (mut kind, mut id, mut data) = (String::new(), None, String::new());
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        kind = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                return Event {
                    kind,
                    id,
                    data: serde_json::from_str(&data).unwrap(),
                };
            }
            let frame = tokio::time::timeout(PATIENCE, self.body.frame())
                .await
                .expect("an event in time")
                .expect("the stream goes on")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                self.buffer.extend_from_slice(&data);
            }
        }
    }
}

/// `GET path` with `headers`, over HTTP/2 if `h2`: the status, headers,
/// and the body (as events when 200).
async fn get(
    broker: &Broker,
    path: &str,
    headers: &[(&str, &str)],
    h2: bool,
) -> (StatusCode, http::HeaderMap, Result<Events, Value>) {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build_http::<Empty<Bytes>>();
    let mut request = http::Request::get(format!("http://{}{path}", broker.addr));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(
        PATIENCE,
        client.request(request.body(Empty::new()).unwrap()),
    )
    .await
    .expect("the broker answers")
    .unwrap();
    let (parts, body) = response.into_parts();
    let body = if parts.status == StatusCode::OK {
        Ok(Events {
            body,
            buffer: Vec::new(),
        })
    } else {
        let bytes = body.collect().await.unwrap().to_bytes();
        Err(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    };
    (parts.status, parts.headers, body)
}

#[tokio::test]
async fn watch_servers_streams_events_that_resume_with_last_event_id() {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    let mut servers = broker.servers().await;
    register(&mut agent, "e1", "linux", 2).await;
    for h2 in [false, true] {
        let path = "/watchServers?filter=closed%3Dtrue&progressInterval=300";
        let (status, headers, events) = get(&broker, path, &[], h2).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        let mut events = events.unwrap();
        let snapshot = events.next().await;
        assert_eq!(snapshot.kind, "SNAPSHOT", "{snapshot:?}");
        assert_eq!(snapshot.data["Type"], "SNAPSHOT");
        assert_eq!(snapshot.data["SnapshotEnd"], true);
        let epoch = snapshot.data["Epoch"].as_str().unwrap().to_owned();
        assert_eq!(
            snapshot.id.as_deref(),
            Some(
                format!(
                    "{epoch}:{}",
                    snapshot.data["Sequence"].as_u64().unwrap_or(0)
                )
                .as_str()
            )
        );

        servers
            .close_servers(close_req(vec![close_item("e1", None, "sse")]))
            .await
            .unwrap();
        let added = events.next().await;
        assert_eq!(added.kind, "CHANGES", "{added:?}");
        let change = &added.data["Changes"][0];
        assert_eq!(change["Type"], "ADDED");
        assert_eq!(change["ServerId"], "e1");
        assert_eq!(change["Server"]["Id"], "e1");
        let last_id = added.id.clone().unwrap();
        drop(events);

        // Opened while nobody listened; a reconnection resumes after the
        // last event it saw: no snapshot, just what it missed.
        servers.open_servers(open_req(&["e1"])).await.unwrap();
        let (status, _, events) = get(&broker, path, &[("last-event-id", &last_id)], h2).await;
        assert_eq!(status, StatusCode::OK);
        let removed = events.unwrap().next().await;
        assert_eq!(removed.kind, "CHANGES", "{removed:?}");
        assert_eq!(removed.data["Changes"][0]["Type"], "REMOVED");

        // A point the broker does not have: a fresh snapshot.
        let (status, _, events) =
            get(&broker, path, &[("last-event-id", "another-epoch:7")], h2).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(events.unwrap().next().await.kind, "SNAPSHOT");
    }
}

#[tokio::test]
async fn watch_sessions_streams_its_snapshot() {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    register(&mut agent, "e2", "linux", 2).await;
    agent
        .heartbeat(beat(
            "e2",
            vec![session(
                "e2-a",
                dcv_broker::pb::SessionType::Virtual,
                dcv_broker::pb::SessionState::Ready,
            )],
        ))
        .await
        .unwrap();
    let (status, _, events) = get(&broker, "/watchSessions?filter=owner%3Dalice", &[], false).await;
    assert_eq!(status, StatusCode::OK);
    let snapshot = events.unwrap().next().await;
    assert_eq!(snapshot.kind, "SNAPSHOT");
    assert_eq!(snapshot.data["Sessions"][0]["Id"], "e2-a");
    assert_eq!(snapshot.data["Sessions"][0]["State"], "READY");
}

#[tokio::test]
async fn malformed_watches_are_refused_like_other_rest_calls() {
    let broker = Broker::quiet().await;
    for (path, headers, field) in [
        (
            "/watchServers?filter=colour%3Dblue",
            vec![],
            "Filters[0].Key",
        ),
        ("/watchServers?filter=nokey", vec![], "filter"),
        ("/watchServers?colour=blue", vec![], "query"),
        (
            "/watchServers?progressInterval=soon",
            vec![],
            "progressInterval",
        ),
        (
            "/watchServers?progressInterval=0",
            vec![],
            "ProgressInterval",
        ),
        ("/watchServers?fromSequence=3", vec![], "Epoch"),
        (
            "/watchServers",
            vec![("last-event-id", "no-colon")],
            "Last-Event-ID",
        ),
        (
            "/watchSessions?filter=state%3DASLEEP",
            vec![],
            "Filters[0].Value",
        ),
    ] {
        let (status, _, body) = get(&broker, path, &headers, false).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        let body = body.err().unwrap();
        assert_eq!(body["error"], "invalid_request", "{body}");
        assert_eq!(
            body["field_violations"][0]["field"], field,
            "{path}: {body}"
        );
    }
    // An explicit resume the broker does not cover: 400, as over gRPC.
    let (status, _, body) = get(
        &broker,
        "/watchServers?fromSequence=3&epoch=gone",
        &[],
        false,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body.err().unwrap()["error_description"]
            .as_str()
            .unwrap()
            .contains("no longer kept")
    );
    // Only GET.
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = client
        .request(
            http::Request::post(format!("http://{}/watchServers", broker.addr))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()[header::ALLOW], "GET");
}

#[tokio::test]
async fn an_event_stream_ends_with_an_error_event_when_the_broker_shuts_down() {
    let mut broker = Broker::quiet().await;
    let (status, _, events) = get(&broker, "/watchServers", &[], false).await;
    assert_eq!(status, StatusCode::OK);
    let mut events = events.unwrap();
    assert_eq!(events.next().await.kind, "SNAPSHOT");
    broker.stop();
    let last = events.next().await;
    assert_eq!(last.kind, "error", "{last:?}");
    assert_eq!(last.data["code"], "UNAVAILABLE");
    assert!(
        last.data["message"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{last:?}"
    );
    // And the broker finishes its shutdown: the stream did not hold it.
    tokio::time::timeout(PATIENCE, &mut broker.task)
        .await
        .expect("the broker stops")
        .unwrap()
        .unwrap();
}
