//! `--otlp-endpoint`: the real binary exports its spans to an in-process
//! OTLP/gRPC collector, a CreateSessions under the caller's `traceparent`
//! giving the RPC, placement and store-commit spans of that trace, and a
//! GetSessionScreenshots its agent round trip, all flushed before the
//! broker exits; a REST call's `traceparent` header likewise.

mod common;

use std::collections::HashMap;

use common::{
    TestAgent,
    agent_process::TempDir,
    create_item, create_one, create_req,
    process::{BROKER_BIN, BrokerProcess},
    registration,
};
use dcv_broker::pb;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    trace::v1::Span,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

/// An OTLP trace collector that hands every span it receives to a channel.
struct Collector(mpsc::UnboundedSender<Span>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        for span in spans {
            let _ = self.0.send(span);
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A collector on a loopback port: its address and what it receives.
async fn collector() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Span>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    (addr, rx)
}

const CREATE_SESSIONS: &str = "/dcv.sessionmanager.v1.Sessions/CreateSessions";

#[tokio::test]
async fn create_sessions_is_traced_under_the_callers_trace_and_flushed_on_exit() {
    let (collector, mut received) = collector().await;
    let data = TempDir::new("dcv-broker-traces");
    let mut command = tokio::process::Command::new(BROKER_BIN);
    command
        .args(["--listen", "127.0.0.1:0", "--shutdown-grace", "0s"])
        .arg("--data-dir")
        .arg(data.path())
        .args(["--otlp-endpoint", &format!("http://{collector}")])
        .env_remove("DCV_BROKER_LOG")
        .env_remove("RUST_LOG");
    let mut broker = BrokerProcess::spawn(command).await;
    let mut agent = TestAgent::connect_to(broker.addr, registration("srv-1", "linux", 4)).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(create_req(vec![create_item(
        "traced",
        "alice",
        pb::SessionType::Virtual,
    )]));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    let mut sessions =
        pb::sessions_client::SessionsClient::connect(format!("http://{}", broker.addr))
            .await
            .unwrap();
    let reply = create_one(&mut sessions, request).await;
    assert!(reply.unsuccessful_list.is_empty(), "{reply:?}");

    // The agent creates the session; a screenshot of it is a round trip
    // to the agent, inside the GetSessionScreenshots call.
    let session = reply.successful_list[0].id.clone();
    assert_eq!(agent.next_create().await.session_id, session);
    agent
        .report(
            &session,
            pb::InstructionKind::CreateSession,
            true,
            pb::SessionState::Ready,
        )
        .await;
    let screenshot_trace = "5cf92f3577b34da6a3ce929d0e0e4737";
    let mut request = tonic::Request::new(pb::GetSessionScreenshotsRequest {
        sessions: vec![pb::GetSessionScreenshotRequestData {
            session_id: session.clone(),
            ..Default::default()
        }],
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{screenshot_trace}-{caller_span}-01")
            .parse()
            .unwrap(),
    );
    let mut screenshots = sessions.clone();
    let call = tokio::spawn(async move { screenshots.get_session_screenshots(request).await });
    let (instruction, _) = agent.next_screenshot().await;
    agent
        .report_screenshot(&session, &instruction, Err("no display"))
        .await
        .unwrap();
    let answered = call.await.unwrap().unwrap().into_inner();
    assert_eq!(answered.unsuccessful_list.len(), 1, "{answered:?}");

    // A REST call's traceparent is an HTTP header like any other.
    let rest_trace = "0af7651916cd43dd8448eb211c80319c";
    let rest_reply = http1_post(
        broker.addr,
        "/describeServers",
        &format!("traceparent: 00-{rest_trace}-b7ad6b7169203331-01"),
    )
    .await;
    assert!(rest_reply.starts_with("HTTP/1.1 200"), "{rest_reply}");

    // The spans are sent in a batch by the time the broker has exited.
    broker.signal("-TERM");
    assert_eq!(broker.exited().await.code(), Some(0));
    let mut spans = Vec::new();
    while let Ok(span) = received.try_recv() {
        spans.push(span);
    }
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let ours: HashMap<String, &Span> = spans
        .iter()
        .filter(|s| hex(&s.trace_id) == trace_id)
        .map(|s| (s.name.clone(), s))
        .collect();
    let names: Vec<&String> = spans.iter().map(|s| &s.name).collect();
    let rpc = ours
        .get(CREATE_SESSIONS)
        .unwrap_or_else(|| panic!("no RPC span in the caller's trace: {names:?}"));
    assert_eq!(hex(&rpc.parent_span_id), caller_span);
    let request_id = rpc
        .attributes
        .iter()
        .find(|a| a.key == "request_id")
        .and_then(|a| a.value.as_ref())
        .map(|v| format!("{:?}", v.value));
    assert!(
        request_id.is_some_and(|id| id.contains(&reply.request_id)),
        "{rpc:?}"
    );
    for child in ["placement", "store commit"] {
        let span = ours
            .get(child)
            .unwrap_or_else(|| panic!("no {child} span in the caller's trace: {names:?}"));
        assert_eq!(span.parent_span_id, rpc.span_id, "{child}");
    }
    assert!(
        spans.iter().any(|s| s.name == "/describeServers"
            && hex(&s.trace_id) == rest_trace
            && hex(&s.parent_span_id) == "b7ad6b7169203331"),
        "{names:?}"
    );
    let in_screenshot_trace: HashMap<String, &Span> = spans
        .iter()
        .filter(|s| hex(&s.trace_id) == screenshot_trace)
        .map(|s| (s.name.clone(), s))
        .collect();
    let rpc = in_screenshot_trace
        .get("/dcv.sessionmanager.v1.Sessions/GetSessionScreenshots")
        .unwrap_or_else(|| panic!("no GetSessionScreenshots span: {names:?}"));
    let round_trip = in_screenshot_trace
        .get("agent round trip")
        .unwrap_or_else(|| panic!("no agent round trip span: {names:?}"));
    assert_eq!(round_trip.parent_span_id, rpc.span_id);
    // Other calls (the agent's) are traces of their own, not the caller's.
    assert!(
        spans
            .iter()
            .any(|s| s.name.contains("RegisterServer") && hex(&s.trace_id) != trace_id),
        "{names:?}"
    );
}

/// The reply to an empty HTTP/1.1 POST to `path` with one more header.
async fn http1_post(addr: std::net::SocketAddr, path: &str, header: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{header}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    reply
}
