//! `--otlp-endpoint`: the real binary exports its spans to an in-process
//! OTLP/gRPC collector, a CreateSessions under the caller's `traceparent`
//! giving the RPC, placement and store-commit spans of that trace, all
//! flushed before the broker exits.

mod common;

use std::collections::HashMap;

use common::{
    TestAgent,
    agent_process::TempDir,
    create_item, create_req,
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
    let _agent = TestAgent::connect_to(broker.addr, registration("srv-1", "linux", 4)).await;

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
    let reply = sessions
        .create_sessions(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 1, "{reply:?}");
    assert!(reply.unsuccessful_list.is_empty(), "{reply:?}");

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
    // Other calls (the agent's) are traces of their own, not the caller's.
    assert!(
        spans
            .iter()
            .any(|s| s.name.contains("RegisterServer") && hex(&s.trace_id) != trace_id),
        "{names:?}"
    );
}
