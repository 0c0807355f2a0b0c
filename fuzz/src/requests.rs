//! The `requests` target: decodes an input's message with prost (a decode
//! error ends the input: tonic would answer INTERNAL before any handler
//! ran), calls the RPC's real tonic handler on the live fixture, and
//! checks what every reply promises:
//!
//! - an `Ok` reply carries a non-empty `RequestId`;
//! - a batch reply has one `SuccessfulList` or `UnsuccessfulList` entry per
//!   request item, every failure with a known, non-zero `FailureCode`;
//! - a Describe page is in ascending order of id, holds only the ids asked
//!   for, is no longer than its page size, and is full when it has a
//!   `NextToken`;
//! - a connection token from GetSessionConnectionData validates, for its
//!   user, on the session's server;
//! - a ValidateConnectionToken verdict is `Valid` with no `Reason`, or
//!   not valid with a `Reason` and no `User`;
//! - an error is the client's (INVALID_ARGUMENT, NOT_FOUND,
//!   FAILED_PRECONDITION, ...), never INTERNAL, UNKNOWN, UNAVAILABLE or
//!   DATA_LOSS: an in-memory fleet has nothing that can fail by itself.
//!
//! A panic (in a handler or an assertion) is a crash, and so is an input
//! that costs more than [`crate::budget`] allows: a write-lock hold or a
//! peak allocation out of proportion to its size.
//!
//! One runtime and one fixture serve the whole process (building them per
//! input would cost more than most requests). Inputs change the fixture,
//! which lets the fuzzer reach states one request cannot, so it is rebuilt
//! every [`REBUILD_EVERY`] inputs and whenever it has grown past
//! [`MAX_SERVERS`] servers: the state stays small and the requests fast.
//! A crash that needs what earlier inputs did may therefore not reproduce
//! from its artifact alone; the log's input sequence then tells.

use std::{
    future::Future,
    pin::Pin,
    sync::{LazyLock, Mutex, PoisonError},
    task::Poll,
};

use dcv_broker::pb::{
    self, agent_server::Agent, servers_server::Servers, sessions_server::Sessions,
};
use prost::Message;
use tokio::runtime::Runtime;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use crate::{fixture::Broker, rpc::Rpc};

/// Inputs after which the fixture is built afresh.
pub const REBUILD_EVERY: u32 = 1000;

/// Servers past which the fixture is built afresh (registrations with new
/// ids add servers; nothing else does).
pub const MAX_SERVERS: usize = 256;

/// The most items a Describe page holds (`MaxResults` unset).
const DEFAULT_PAGE_SIZE: usize = 1000;

struct Harness {
    runtime: Runtime,
    broker: Broker,
    inputs: u32,
}

static HARNESS: LazyLock<Mutex<Harness>> = LazyLock::new(|| {
    // Current-thread, and on a paused clock: nothing the fleet derives
    // from time changes while the fuzzer runs, so an input does the same
    // thing every time it is run. No handler waits on a timer.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
    let broker = runtime.block_on(Broker::build());
    Mutex::new(Harness {
        runtime,
        broker,
        inputs: 0,
    })
});

/// Runs one input of the `requests` target.
pub fn run(data: &[u8]) {
    let mut harness = HARNESS.lock().unwrap_or_else(PoisonError::into_inner);
    let harness = &mut *harness;
    if harness.inputs >= REBUILD_EVERY || harness.broker.fleet.len() > MAX_SERVERS {
        harness.broker = harness.runtime.block_on(Broker::build());
        harness.inputs = 0;
    }
    harness.inputs += 1;
    harness.broker.fleet.take_longest_write_hold();
    let baseline = crate::budget::start();
    harness.runtime.block_on(drive(&harness.broker, data));
    let held = harness.broker.fleet.take_longest_write_hold();
    crate::budget::check(data.len(), baseline, held);
}

/// Decodes `data` (selector byte, message) and drives it through its
/// handler on `broker`, checking the reply.
pub async fn drive(broker: &Broker, data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match Rpc::from_selector(selector) {
        Rpc::CloseServers => {
            let Some(msg) = decode::<pb::CloseServersRequest>(body) else {
                return;
            };
            let items = msg.servers.len();
            if let Some(r) = reply(broker.servers.close_servers(Request::new(msg))).await {
                check_request_id(&r.request_id);
                check_batch(
                    items,
                    r.successful_list.len(),
                    r.unsuccessful_list.iter().map(|u| u.failure_code),
                );
            }
        }
        Rpc::OpenServers => {
            let Some(msg) = decode::<pb::OpenServersRequest>(body) else {
                return;
            };
            let items = msg.servers.len();
            if let Some(r) = reply(broker.servers.open_servers(Request::new(msg))).await {
                check_request_id(&r.request_id);
                check_batch(
                    items,
                    r.successful_list.len(),
                    r.unsuccessful_list.iter().map(|u| u.failure_code),
                );
            }
        }
        Rpc::DescribeServers => {
            let Some(msg) = decode::<pb::DescribeServersRequest>(body) else {
                return;
            };
            let (ids, max_results) = (msg.server_ids.clone(), msg.max_results);
            if let Some(r) = reply(broker.servers.describe_servers(Request::new(msg))).await {
                check_request_id(&r.request_id);
                let got: Vec<&str> = r.servers.iter().map(|s| s.id.as_str()).collect();
                check_page(&got, &ids, max_results, &r.next_token);
            }
        }
        Rpc::CreateSessions => {
            let Some(msg) = decode::<pb::CreateSessionsRequest>(body) else {
                return;
            };
            let items = msg.sessions.len();
            if let Some(r) = reply(broker.sessions.create_sessions(Request::new(msg))).await {
                check_request_id(&r.request_id);
                check_batch(
                    items,
                    r.successful_list.len(),
                    r.unsuccessful_list.iter().map(|u| u.failure_code),
                );
            }
        }
        Rpc::DescribeSessions => {
            let Some(msg) = decode::<pb::DescribeSessionsRequest>(body) else {
                return;
            };
            let (ids, max_results) = (msg.session_ids.clone(), msg.max_results);
            if let Some(r) = reply(broker.sessions.describe_sessions(Request::new(msg))).await {
                check_request_id(&r.request_id);
                let got: Vec<&str> = r.sessions.iter().map(|s| s.id.as_str()).collect();
                check_page(&got, &ids, max_results, &r.next_token);
            }
        }
        Rpc::DeleteSessions => {
            let Some(msg) = decode::<pb::DeleteSessionsRequest>(body) else {
                return;
            };
            let items = msg.sessions.len();
            if let Some(r) = reply(broker.sessions.delete_sessions(Request::new(msg))).await {
                check_request_id(&r.request_id);
                check_batch(
                    items,
                    r.successful_list.len(),
                    r.unsuccessful_list.iter().map(|u| u.failure_code),
                );
            }
        }
        Rpc::GetSessionConnectionData => {
            let Some(msg) = decode::<pb::GetSessionConnectionDataRequest>(body) else {
                return;
            };
            let (session_id, user) = (msg.session_id.clone(), msg.user.clone());
            let call = broker
                .sessions
                .get_session_connection_data(Request::new(msg));
            if let Some(r) = reply(call).await {
                check_request_id(&r.request_id);
                check_connection_data(broker, &r, &session_id, &user).await;
            }
        }
        Rpc::UpdateSessionPermissions => {
            let Some(msg) = decode::<pb::UpdateSessionPermissionsRequest>(body) else {
                return;
            };
            let items = msg.sessions.len();
            let call = broker
                .sessions
                .update_session_permissions(Request::new(msg));
            if let Some(r) = reply(call).await {
                check_request_id(&r.request_id);
                check_batch(
                    items,
                    r.successful_list.len(),
                    r.unsuccessful_list.iter().map(|u| u.failure_code),
                );
            }
        }
        Rpc::RegisterServer => {
            let Some(msg) = decode::<pb::RegisterServerRequest>(body) else {
                return;
            };
            if let Some(r) = reply(broker.agent.register_server(Request::new(msg))).await {
                check_request_id(&r.request_id);
                assert!(r.heartbeat_interval.is_some(), "no HeartbeatInterval");
            }
        }
        Rpc::Heartbeat => {
            let Some(msg) = decode::<pb::HeartbeatRequest>(body) else {
                return;
            };
            if let Some(r) = reply(broker.agent.heartbeat(Request::new(msg))).await {
                check_request_id(&r.request_id);
                assert!(r.heartbeat_interval.is_some(), "no HeartbeatInterval");
            }
        }
        Rpc::DeregisterServer => {
            let Some(msg) = decode::<pb::DeregisterServerRequest>(body) else {
                return;
            };
            if let Some(r) = reply(broker.agent.deregister_server(Request::new(msg))).await {
                check_request_id(&r.request_id);
            }
        }
        Rpc::StreamInstructions => {
            let Some(msg) = decode::<pb::StreamInstructionsRequest>(body) else {
                return;
            };
            if let Some(mut stream) =
                reply(broker.agent.stream_instructions(Request::new(msg))).await
            {
                first_instruction(&mut stream).await;
            }
        }
        Rpc::ReportInstructionResult => {
            let Some(msg) = decode::<pb::ReportInstructionResultRequest>(body) else {
                return;
            };
            let call = broker.agent.report_instruction_result(Request::new(msg));
            if let Some(r) = reply(call).await {
                check_request_id(&r.request_id);
            }
        }
        Rpc::GetSessionScreenshots => {
            let Some(msg) = decode::<pb::GetSessionScreenshotsRequest>(body) else {
                return;
            };
            let items = msg.sessions.len();
            let call = broker.sessions.get_session_screenshots(Request::new(msg));
            if let Some(r) = reply(call).await {
                check_request_id(&r.request_id);
                check_batch(
                    items,
                    r.successful_list.len(),
                    r.unsuccessful_list.iter().map(|u| u.failure_code),
                );
            }
        }
        Rpc::ValidateConnectionToken => {
            let Some(msg) = decode::<pb::ValidateConnectionTokenRequest>(body) else {
                return;
            };
            let call = broker.agent.validate_connection_token(Request::new(msg));
            if let Some(r) = reply(call).await {
                check_request_id(&r.request_id);
                check_verdict(&r);
            }
        }
    }
}

fn decode<M: Message + Default>(body: &[u8]) -> Option<M> {
    M::decode(body).ok()
}

/// The reply's message, or `None` after checking that an error status is
/// one a client's request may earn.
async fn reply<M>(call: impl Future<Output = Result<Response<M>, Status>>) -> Option<M> {
    match call.await {
        Ok(response) => Some(response.into_inner()),
        Err(status) => {
            assert!(
                !matches!(
                    status.code(),
                    Code::Internal | Code::Unknown | Code::Unavailable | Code::DataLoss
                ),
                "a request earned a broker-side error: {status:?}"
            );
            None
        }
    }
}

fn check_request_id(request_id: &str) {
    assert!(!request_id.is_empty(), "a reply without a RequestId");
}

/// One result per item, each failure with a known code.
fn check_batch(items: usize, succeeded: usize, failures: impl Iterator<Item = i32>) {
    let mut failed = 0;
    for code in failures {
        failed += 1;
        assert!(
            matches!(pb::FailureCode::try_from(code), Ok(c) if c as i32 != 0),
            "a failure with FailureCode {code}"
        );
    }
    assert_eq!(
        succeeded + failed,
        items,
        "{succeeded} succeeded and {failed} failed of {items} items"
    );
}

/// A Describe page: ascending ids, only those asked for, within its size,
/// full when another page follows.
fn check_page(got: &[&str], asked: &[String], max_results: Option<i32>, next_token: &str) {
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "a page out of order: {got:?}"
    );
    if !asked.is_empty() {
        for id in got {
            assert!(asked.iter().any(|a| a == id), "{id} was not asked for");
        }
    }
    // The call succeeded, so MaxResults, if set, is 1 to 1000.
    let page_size = max_results.map_or(DEFAULT_PAGE_SIZE, |n| {
        usize::try_from(n).expect("an accepted MaxResults")
    });
    assert!(
        got.len() <= page_size,
        "{} items on a page of {page_size}",
        got.len()
    );
    if !next_token.is_empty() {
        assert_eq!(got.len(), page_size, "a short page with a NextToken");
    }
}

/// The session is the one asked for, and the token admits `user` to it on
/// its server at once.
async fn check_connection_data(
    broker: &Broker,
    r: &pb::GetSessionConnectionDataResponse,
    session_id: &str,
    user: &str,
) {
    let session = r
        .session
        .as_ref()
        .expect("connection data without a Session");
    assert_eq!(session.id, session_id);
    assert!(!r.connection_token.is_empty(), "an empty ConnectionToken");
    let server_id = session
        .server
        .as_ref()
        .map(|s| s.id.clone())
        .expect("a READY session without a Server");
    let verdict = broker
        .agent
        .validate_connection_token(Request::new(pb::ValidateConnectionTokenRequest {
            server_id,
            connection_token: r.connection_token.clone(),
            session_id: session_id.to_string(),
        }))
        .await
        .expect("ValidateConnectionToken of a fresh token")
        .into_inner();
    assert!(verdict.valid, "a fresh token refused: {verdict:?}");
    assert_eq!(verdict.user, user);
}

fn check_verdict(r: &pb::ValidateConnectionTokenResponse) {
    if r.valid {
        assert!(r.reason.is_empty(), "a valid token with a Reason: {r:?}");
    } else {
        assert!(!r.reason.is_empty(), "a refused token without a Reason");
        assert!(r.user.is_empty(), "a refused token with a User: {r:?}");
    }
}

/// Takes the stream's first instruction if one is ready at once (the
/// broker resends those still waiting for this agent when it connects);
/// never waits for one. Dropping the stream then hangs up, as an agent
/// would.
async fn first_instruction<S>(stream: &mut S)
where
    S: Stream<Item = Result<pb::StreamInstructionsResponse, Status>> + Unpin,
{
    // Lets the broker's forwarding task run once, then polls the stream
    // exactly once.
    tokio::task::yield_now().await;
    let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *stream).poll_next(cx))).await;
    if let Poll::Ready(Some(item)) = first {
        let instruction = item.expect("an instruction stream item");
        assert!(
            instruction.instruction.is_some(),
            "an instruction without a body: {instruction:?}"
        );
        assert!(
            !instruction.instruction_id.is_empty(),
            "an instruction without an id"
        );
    }
}
