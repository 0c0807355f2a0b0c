//! Requests that are small on the wire but name a great many items, against
//! the real binary: each is answered INVALID_ARGUMENT quickly, with a
//! bounded list of violations in a small details header, without the
//! broker's peak memory growing by more than a bound, and without stalling
//! another client's DescribeServers meanwhile.

mod common;

use std::time::{Duration, Instant};

use common::process::BrokerProcess;
use dcv_broker::pb::{self, agent_client::AgentClient, servers_client::ServersClient};
use prost::{
    Message as _,
    bytes::{Buf as _, BufMut as _},
    encoding::{WireType, encode_key, encode_varint},
};
use tonic::{
    Code,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::Channel,
};
use tonic_types::StatusExt as _;

/// Roughly how big each abusive request is on the wire.
const REQUEST_BYTES: usize = 2 * 1024 * 1024;
/// How much the broker's peak resident memory may grow over all of them.
const MAX_PEAK_GROWTH: u64 = 64 * 1024 * 1024;
/// The most field violations a reply may list (the broker's cap plus the
/// one that says how many more there were).
const MAX_VIOLATIONS: usize = 101;
/// The largest details a reply may carry (they travel base64-encoded in a
/// header: clients' metadata limits are 8 KiB and up).
const MAX_DETAILS_BYTES: usize = 2048;
/// The longest status message (also a header, percent-encoded).
const MAX_MESSAGE_BYTES: usize = 2048;
/// How long the abusive call and any concurrent DescribeServers may take:
/// generous for a debug build on a busy machine, far below the seconds the
/// unbounded handling took.
const MAX_LATENCY: Duration = Duration::from_secs(2);

/// The broker's peak resident set size (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("a VmHWM line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("a number of kB");
    kib * 1024
}

/// How many copies of an item that encodes to `item_len` bytes make a
/// request of about [`REQUEST_BYTES`].
fn copies(item_len: usize) -> usize {
    // One tag byte and a one-byte length prefix per item.
    REQUEST_BYTES / (item_len + 2)
}

/// A codec that sends an already encoded request (so that the client's
/// own encoding of a million items does not count in the time the broker
/// takes) and ignores any reply body.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

/// Sends the encoded request `body` to `method` (`/package.Service/Method`).
async fn call(channel: Channel, method: &'static str, body: Vec<u8>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static(method),
        Raw,
    )
    .await
    .map(drop)
}

/// `n` entries of repeated field `field`, each `item` (encoded once and
/// repeated: encoding a million items one by one takes seconds in a debug
/// build). Protobuf concatenates: these bytes after a message's own add
/// the items to its list.
fn entries(field: u32, item: &impl prost::Message, n: usize) -> Vec<u8> {
    length_delimited(field, &item.encode_to_vec()).repeat(n)
}

/// Field `field` holding `bytes` (a string, or an encoded message).
fn length_delimited(field: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 10);
    encode_key(field, WireType::LengthDelimited, &mut out);
    encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// `base`'s encoding followed by `more`.
fn then(base: &impl prost::Message, more: Vec<u8>) -> Vec<u8> {
    let mut out = base.encode_to_vec();
    out.extend(more);
    out
}

/// One abusive request per RPC that takes a list: its name, its method
/// and its encoding. Items are as small as protobuf allows, each with a
/// bad field where the item has one a cheap check can catch. (Field
/// numbers are the contract's, `proto/dcv/sessionmanager/v1/`.)
fn abusive_requests() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let empty = pb::KeyValuePair::default();
    let bad_session = pb::AgentSession {
        r#type: 99,
        ..Default::default()
    };
    let beat = pb::HeartbeatRequest {
        server_id: "s1".into(),
        ..Default::default()
    };
    let bad_endpoint = pb::Endpoint {
        protocol: 99,
        ..Default::default()
    };
    let mut registration = common::registration("s1", "linux", 4);
    let host = registration.host.take().unwrap_or_default();
    let bad_create = pb::CreateSessionRequestData {
        r#type: 99,
        ..Default::default()
    };
    let all = pb::DescribeServersRequest::default();
    let all_sessions = pb::DescribeSessionsRequest::default();
    let nothing = pb::CloseServersRequest::default();
    let n = copies(0);
    vec![
        (
            "Heartbeat.Sessions",
            "/dcv.sessionmanager.v1.Agent/Heartbeat",
            then(
                &beat,
                entries(4, &bad_session, copies(bad_session.encoded_len())),
            ),
        ),
        (
            "Heartbeat.LoggedInUsers",
            "/dcv.sessionmanager.v1.Agent/Heartbeat",
            then(&beat, entries(3, &empty, n)),
        ),
        (
            "RegisterServer.Endpoints",
            "/dcv.sessionmanager.v1.Agent/RegisterServer",
            then(
                &registration,
                entries(5, &bad_endpoint, copies(bad_endpoint.encoded_len())),
            ),
        ),
        (
            "RegisterServer.Tags",
            "/dcv.sessionmanager.v1.Agent/RegisterServer",
            then(&registration, entries(9, &empty, n)),
        ),
        (
            "RegisterServer.Host.Gpus",
            "/dcv.sessionmanager.v1.Agent/RegisterServer",
            then(
                &registration,
                length_delimited(8, &then(&host, entries(7, &empty, n))),
            ),
        ),
        (
            "CloseServers",
            "/dcv.sessionmanager.v1.Servers/CloseServers",
            entries(1, &empty, n),
        ),
        (
            "OpenServers",
            "/dcv.sessionmanager.v1.Servers/OpenServers",
            entries(1, &empty, n),
        ),
        (
            "DescribeServers.ServerIds",
            "/dcv.sessionmanager.v1.Servers/DescribeServers",
            then(&all, entries(1, &empty, n)),
        ),
        (
            "DescribeServers.Filters",
            "/dcv.sessionmanager.v1.Servers/DescribeServers",
            then(&all, entries(4, &empty, n)),
        ),
        (
            "CreateSessions",
            "/dcv.sessionmanager.v1.Sessions/CreateSessions",
            entries(1, &bad_create, copies(bad_create.encoded_len())),
        ),
        (
            "DescribeSessions.SessionIds",
            "/dcv.sessionmanager.v1.Sessions/DescribeSessions",
            then(&all_sessions, entries(1, &empty, n)),
        ),
        (
            "DescribeSessions.Filters",
            "/dcv.sessionmanager.v1.Sessions/DescribeSessions",
            then(&all_sessions, entries(2, &empty, n)),
        ),
        (
            "DeleteSessions",
            "/dcv.sessionmanager.v1.Sessions/DeleteSessions",
            then(&nothing, entries(1, &empty, n)),
        ),
        (
            "UpdateSessionPermissions",
            "/dcv.sessionmanager.v1.Sessions/UpdateSessionPermissions",
            entries(1, &empty, n),
        ),
    ]
    .into_iter()
    .inspect(|(name, _, body)| {
        assert!(
            body.len() > REQUEST_BYTES * 9 / 10,
            "{name}: {} bytes",
            body.len()
        );
    })
    .collect()
}

/// The encodings above are what prost makes of the same lists.
#[test]
fn repeated_entries_encode_as_prost_does() {
    let item = pb::AgentSession {
        r#type: 99,
        ..Default::default()
    };
    let beat = pb::HeartbeatRequest {
        server_id: "s1".into(),
        ..Default::default()
    };
    let full = pb::HeartbeatRequest {
        sessions: vec![item.clone(); 3],
        ..beat.clone()
    };
    assert_eq!(then(&beat, entries(4, &item, 3)), full.encode_to_vec());
    let mut registration = common::registration("s1", "linux", 4);
    let host = registration.host.take().unwrap();
    let with_gpus = pb::RegisterServerRequest {
        host: Some(pb::Host {
            gpus: vec![Default::default(); 2],
            ..host.clone()
        }),
        ..registration.clone()
    };
    assert_eq!(
        pb::RegisterServerRequest::decode(
            &then(
                &registration,
                length_delimited(8, &then(&host, entries(7, &pb::KeyValuePair::default(), 2)))
            )[..]
        )
        .unwrap(),
        with_gpus
    );
    let ids = pb::DescribeServersRequest {
        server_ids: vec![String::new(); 2],
        ..Default::default()
    };
    assert_eq!(
        entries(1, &pb::KeyValuePair::default(), 2),
        ids.encode_to_vec()
    );
}

async fn connect(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The broker binary, a connection for the abusive requests and another
/// client's, and the broker's peak memory before any abuse.
struct Harness {
    broker: BrokerProcess,
    abuser: Channel,
    bystander: ServersClient<Channel>,
    baseline: u64,
}

/// What one abusive call came to.
struct Outcome {
    status: tonic::Status,
    violations: Vec<(String, String)>,
}

impl Harness {
    async fn start() -> Harness {
        // The rate limit would count both clients (one address) as one.
        let broker =
            BrokerProcess::start_exactly(&["--in-memory", "--log", "warn", "--client-rate", "0"])
                .await;
        let abuser = connect(broker.addr).await;
        let mut bystander = ServersClient::new(connect(broker.addr).await);
        // A server, so that the bystander's DescribeServers has work to do.
        AgentClient::new(abuser.clone())
            .register_server(common::registration("s1", "linux", 4))
            .await
            .unwrap();
        bystander
            .describe_servers(pb::DescribeServersRequest::default())
            .await
            .unwrap();
        let baseline = peak_rss(broker.pid());
        Harness {
            broker,
            abuser,
            bystander,
            baseline,
        }
    }

    /// Sends `body` to `method` while the bystander keeps calling
    /// DescribeServers, and checks every bound: INVALID_ARGUMENT with
    /// BadRequest, few violations, small headers, quick answers for both
    /// clients, and the broker's peak memory.
    async fn abuse(&mut self, name: &str, method: &'static str, body: Vec<u8>) -> Outcome {
        let abuser = self.abuser.clone();
        let started = Instant::now();
        let abuse = tokio::spawn(async move {
            let result = call(abuser, method, body).await;
            (result, started.elapsed())
        });
        // The bystander's calls while the abusive one runs (at least one).
        let mut slowest = Duration::ZERO;
        loop {
            let asked = Instant::now();
            self.bystander
                .describe_servers(pb::DescribeServersRequest::default())
                .await
                .unwrap();
            slowest = slowest.max(asked.elapsed());
            if abuse.is_finished() {
                break;
            }
        }
        let (result, took) = abuse.await.unwrap();
        let status = result.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        let violations: Vec<(String, String)> = status
            .get_details_bad_request()
            .unwrap_or_else(|| panic!("{name}: no BadRequest"))
            .field_violations
            .into_iter()
            .map(|v| (v.field, v.description))
            .collect();
        assert!(
            !violations.is_empty() && violations.len() <= MAX_VIOLATIONS,
            "{name}: {} violations",
            violations.len()
        );
        assert!(
            status.details().len() <= MAX_DETAILS_BYTES,
            "{name}: {} bytes of details",
            status.details().len()
        );
        assert!(
            status.message().len() <= MAX_MESSAGE_BYTES,
            "{name}: a message of {} bytes",
            status.message().len()
        );
        assert!(took < MAX_LATENCY, "{name} took {took:?}");
        assert!(
            slowest < MAX_LATENCY,
            "{name}: a concurrent DescribeServers took {slowest:?}"
        );
        let growth = peak_rss(self.broker.pid()).saturating_sub(self.baseline);
        eprintln!(
            "{name}: {took:?}, {} violations, {} bytes of details, peak +{} MiB, bystander {slowest:?}",
            violations.len(),
            status.details().len(),
            growth >> 20
        );
        assert!(
            growth < MAX_PEAK_GROWTH,
            "{name}: the broker's peak memory grew by {} MiB",
            growth >> 20
        );
        Outcome { status, violations }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_naming_millions_of_items_cost_bounded_memory_and_time() {
    let mut harness = Harness::start().await;
    for (name, method, body) in abusive_requests() {
        let outcome = harness.abuse(name, method, body).await;
        // Refused whole, before any item was looked at.
        assert_eq!(
            outcome.violations.len(),
            1,
            "{name}: {:?}",
            outcome.violations
        );
    }
    harness.broker.terminate().await;
}

/// Requests within the codec's bound whose every item is bad: the lists'
/// own limits are checked before the items, and the items' violations are
/// capped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_bad_items_get_a_bounded_list_of_violations() {
    let mut harness = Harness::start().await;
    let bad_session = |i: usize| pb::AgentSession {
        id: format!("session-{i}"),
        r#type: 99,
        state: 99,
        ..Default::default()
    };
    let heartbeat = |n: usize| pb::HeartbeatRequest {
        server_id: "s1".into(),
        sessions: (0..n).map(bad_session).collect(),
        ..Default::default()
    };

    // Over the list's limit: one violation, for the list.
    let over = heartbeat(dcv_broker::fleet::MAX_REPORTED_SESSIONS + 1);
    let outcome = harness
        .abuse(
            "Heartbeat over its limit",
            "/dcv.sessionmanager.v1.Agent/Heartbeat",
            over.encode_to_vec(),
        )
        .await;
    assert_eq!(outcome.violations.len(), 1, "{:?}", outcome.violations);
    assert_eq!(outcome.violations[0].0, "Sessions");

    // At the limit, every session bad twice: the first violations, then
    // one that counts the rest.
    let at = heartbeat(dcv_broker::fleet::MAX_REPORTED_SESSIONS);
    let outcome = harness
        .abuse(
            "Heartbeat of bad sessions",
            "/dcv.sessionmanager.v1.Agent/Heartbeat",
            at.encode_to_vec(),
        )
        .await;
    assert_eq!(outcome.violations[0].0, "Sessions[0].Type");
    let (field, more) = outcome.violations.last().unwrap();
    assert_eq!(field, "");
    let listed = outcome.violations.len() - 1;
    let total = 2 * dcv_broker::fleet::MAX_REPORTED_SESSIONS;
    assert_eq!(
        more,
        &format!("{} more violation(s) not listed", total - listed)
    );
    assert!(
        outcome.status.message().ends_with(more.as_str()),
        "{}",
        outcome.status.message()
    );

    // A violation that quotes a long value: cut short.
    let mut registration = common::registration("s1", "linux", 4);
    if let Some(os) = registration.host.as_mut().and_then(|h| h.os.as_mut()) {
        os.family = "é".repeat(100_000);
    }
    let outcome = harness
        .abuse(
            "RegisterServer of a long family",
            "/dcv.sessionmanager.v1.Agent/RegisterServer",
            registration.encode_to_vec(),
        )
        .await;
    assert_eq!(outcome.violations.len(), 1, "{:?}", outcome.violations);
    assert_eq!(outcome.violations[0].0, "Host.Os.Family");
    assert!(outcome.violations[0].1.len() <= 256);

    let describe = pb::DescribeServersRequest {
        server_ids: vec![String::new(); 1000],
        ..Default::default()
    };
    let outcome = harness
        .abuse(
            "DescribeServers of empty ids",
            "/dcv.sessionmanager.v1.Servers/DescribeServers",
            describe.encode_to_vec(),
        )
        .await;
    assert_eq!(outcome.violations[0].0, "ServerIds[0]");
    assert!(outcome.violations.last().unwrap().1.ends_with("not listed"));

    let close = pb::CloseServersRequest {
        servers: vec![Default::default(); 5000],
        ..Default::default()
    };
    let outcome = harness
        .abuse(
            "CloseServers over its limit",
            "/dcv.sessionmanager.v1.Servers/CloseServers",
            close.encode_to_vec(),
        )
        .await;
    assert_eq!(outcome.violations.len(), 1);
    harness.broker.terminate().await;
}
