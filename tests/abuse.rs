//! Abuse against a real broker on 127.0.0.1:0: each limit of
//! `dcv_broker::limits` is crossed and the client gets the documented
//! status, and afterwards the broker still reports SERVING and answers a
//! fresh client. Load is bounded (a few hundred requests) and local.
//!
//! What clients see (the README's table of limits says the same):
//! - a message over `max_request_bytes`: OUT_OF_RANGE (tonic's code for
//!   it), before the message is read;
//! - a batch over 1000 items: INVALID_ARGUMENT with google.rpc.BadRequest;
//! - an over-long string: the item's typed failure code (INVALID_SERVER_ID,
//!   INVALID_REASON, INVALID_REQUIREMENTS), or INVALID_ARGUMENT with
//!   BadRequest for an agent's registration; OUT_OF_RANGE if the message
//!   as a whole is too big first;
//! - metadata over `max_header_list_bytes`: refused by HTTP/2 before any
//!   handler runs: HTTP 431 (tonic: UNKNOWN), or for a header block itself
//!   over the limit GOAWAY COMPRESSION_ERROR (tonic: INTERNAL);
//! - more requests in flight than `max_concurrent_requests`:
//!   RESOURCE_EXHAUSTED at once; health checks still answer;
//! - a client over its rate: RESOURCE_EXHAUSTED with google.rpc.RetryInfo;
//!   other clients and health checks are unaffected;
//! - a rapid-reset flood: the connection is closed (GOAWAY,
//!   ENHANCE_YOUR_CALM).
//!
//! No sleep stands in for synchronisation: in-flight requests are held
//! deterministically by a store that acknowledges writes only when the
//! test says so.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use dcv_broker::{
    BrokerConfig,
    fleet::{
        Fleet,
        persist::{Change, Durable, Snapshot, Store},
    },
    limits::{ClientRate, Limits},
    pb::{self, FailureCode},
};
use tokio::sync::{oneshot, watch};
use tonic::{
    Code,
    metadata::{MetadataKey, MetadataValue},
    transport::Channel,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt as _;

fn code(c: i32) -> FailureCode {
    FailureCode::try_from(c).unwrap()
}

fn with_limits(limits: Limits) -> BrokerConfig {
    BrokerConfig {
        limits,
        ..quiet_config()
    }
}

async fn health_on(channel: Channel) -> ServingStatus {
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(reply.status).unwrap()
}

/// The broker reports SERVING and serves a fresh client.
async fn assert_healthy(broker: &Broker) {
    assert!(!broker.task.is_finished(), "the broker stopped");
    assert_eq!(
        health_on(broker.channel().await).await,
        ServingStatus::Serving
    );
    broker
        .servers()
        .await
        .describe_servers(pb::DescribeServersRequest::default())
        .await
        .expect("a fresh client is served");
}

fn describe_all() -> pb::DescribeServersRequest {
    pb::DescribeServersRequest::default()
}

#[tokio::test]
async fn a_message_over_the_size_limit_is_out_of_range_and_the_broker_serves_on() {
    let broker = Broker::start(with_limits(Limits {
        max_request_bytes: 1024 * 1024,
        ..Limits::default()
    }))
    .await;
    register(&mut broker.agent().await, "s1", "linux", 4).await;
    let mut servers = broker.servers().await;

    let oversize = close_req(vec![close_item("s1", None, &"x".repeat(1024 * 1024 + 1))]);
    let err = servers.close_servers(oversize).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{err:?}");

    // Under the message limit, the same long reason reaches the domain,
    // which refuses the item; the connection that sent the oversize
    // message is still usable.
    let under = close_req(vec![close_item("s1", None, &"x".repeat(1000 * 1024))]);
    let r = servers.close_servers(under).await.unwrap().into_inner();
    assert_eq!(
        code(r.unsuccessful_list[0].failure_code),
        FailureCode::InvalidReason
    );
    assert_healthy(&broker).await;
}

#[tokio::test]
async fn an_oversize_batch_is_invalid_argument_with_bad_request() {
    let broker = Broker::quiet().await;
    register(&mut broker.agent().await, "s1", "linux", 4).await;
    let mut servers = broker.servers().await;

    let ids: Vec<String> = (0..1001).map(|i| format!("s{i}")).collect();
    let close = close_req(ids.iter().map(|id| close_item(id, None, "")).collect());
    let err = servers.close_servers(close).await.unwrap_err();
    assert_eq!(violations(&err)[0].0, "Servers");
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let err = servers.open_servers(open_req(&ids)).await.unwrap_err();
    assert_eq!(violations(&err)[0].0, "Servers");

    // Not even the valid item was applied.
    assert!(describe_one(&mut servers, "s1").await.holds.is_empty());
    assert_healthy(&broker).await;
}

#[tokio::test]
async fn huge_strings_fail_item_by_item() {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    register(&mut agent, "s1", "linux", 4).await;
    register(&mut agent, "s2", "linux", 4).await;
    let mut servers = broker.servers().await;

    let long_id = "i".repeat(10 * 1024);
    let r = servers
        .close_servers(close_req(vec![
            close_item(&long_id, None, ""),
            close_item("s1", None, &"r".repeat(1024 * 1024)),
            close_item("s2", None, "patching"),
        ]))
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<FailureCode> = r
        .unsuccessful_list
        .iter()
        .map(|f| code(f.failure_code))
        .collect();
    assert_eq!(
        codes,
        [FailureCode::InvalidServerId, FailureCode::InvalidReason]
    );
    assert_eq!(r.successful_list.len(), 1);
    assert_eq!(r.successful_list[0].server_id, "s2");

    // An agent's strings: the whole registration is refused.
    let mut huge = registration("s3", "linux", 4);
    huge.hostname = "h".repeat(100 * 1024);
    let err = agent.register_server(huge).await.unwrap_err();
    assert_eq!(violations(&err)[0].0, "Hostname", "{err:?}");

    // A Requirements expression of a megabyte is refused before parsing.
    let mut item = create_item("big", "alice", pb::SessionType::Virtual);
    item.requirements = format!("tag:a = '{}'", "a".repeat(1024 * 1024));
    let r = broker
        .sessions()
        .await
        .create_sessions(create_req(vec![item]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        code(r.unsuccessful_list[0].failure_code),
        FailureCode::InvalidRequirements
    );

    // A thousand 10 KB ids make a 10 MB message: the message limit
    // (8 MiB by default) answers first.
    let many = close_req((0..1000).map(|_| close_item(&long_id, None, "")).collect());
    let err = servers.close_servers(many).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert_healthy(&broker).await;
}

/// A DescribeServers request carrying `n` metadata entries.
fn with_entries(n: usize) -> tonic::Request<pb::DescribeServersRequest> {
    let mut request = tonic::Request::new(describe_all());
    for i in 0..n {
        let key = MetadataKey::from_bytes(format!("x-entry-{i}").as_bytes()).unwrap();
        request.metadata_mut().insert(key, MetadataValue::from(i));
    }
    request
}

#[tokio::test]
async fn thousands_of_metadata_entries_are_refused_before_any_handler() {
    let broker = Broker::quiet().await;
    let channel = broker.channel().await;
    let mut servers = pb::servers_client::ServersClient::new(channel.clone());

    // A few entries are fine.
    servers.describe_servers(with_entries(20)).await.unwrap();

    // A thousand small entries: the header block h2 receives is under the
    // limit, but the entries it decodes to (32 bytes counted for each)
    // are over it. h2 answers that stream with HTTP 431, which tonic
    // reports as UNKNOWN, and the connection carries on.
    let err = servers
        .describe_servers(with_entries(1000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unknown, "{err:?}");
    assert!(err.message().contains("431"), "{err:?}");
    servers.describe_servers(describe_all()).await.unwrap();

    // Five thousand: the header block itself is over the limit, and h2's
    // defence against CONTINUATION floods closes the connection (GOAWAY,
    // COMPRESSION_ERROR) rather than read it all. tonic reports INTERNAL.
    let err = servers
        .describe_servers(with_entries(5000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(format!("{err:?}").contains("COMPRESSION_ERROR"), "{err:?}");

    // The same channel reconnects and is served; so is a fresh one.
    servers.describe_servers(describe_all()).await.unwrap();
    assert_eq!(health_on(channel).await, ServingStatus::Serving);
    assert_healthy(&broker).await;
}

/// How a store acknowledges a write.
type Ack = oneshot::Sender<Result<(), String>>;

/// A store that acknowledges writes at once, or, while held, only when
/// the test releases them: requests that write stay in flight, in their
/// handlers, for as long as the test needs.
#[derive(Debug)]
struct GateStore {
    /// `Some` while held: the acknowledgements of the writes waiting.
    held: Mutex<Option<Vec<Ack>>>,
    waiting: watch::Sender<usize>,
}

impl GateStore {
    fn new() -> Arc<GateStore> {
        Arc::new(GateStore {
            held: Mutex::new(None),
            waiting: watch::Sender::new(0),
        })
    }

    fn hold(&self) {
        *self.held.lock().unwrap() = Some(Vec::new());
    }

    /// Waits until `n` writes wait for the gate.
    async fn waiting(&self, n: usize) {
        self.waiting
            .subscribe()
            .wait_for(|w| *w >= n)
            .await
            .unwrap();
    }

    /// Acknowledges every waiting write, and later ones at once.
    fn release(&self) {
        for ack in self.held.lock().unwrap().take().unwrap_or_default() {
            let _ = ack.send(Ok(()));
        }
    }
}

impl Store for GateStore {
    fn submit(&self, _changes: Vec<Change>) -> Durable {
        let mut held = self.held.lock().unwrap();
        let Some(held) = held.as_mut() else {
            return Durable::done();
        };
        let (ack, acked) = oneshot::channel();
        held.push(ack);
        self.waiting.send_modify(|n| *n += 1);
        Durable::pending(acked)
    }
}

#[tokio::test]
async fn a_flood_beyond_the_concurrency_limit_is_shed_and_the_broker_serves_on() {
    let config = with_limits(Limits {
        max_concurrent_requests: Some(2),
        ..Limits::default()
    });
    let store = GateStore::new();
    let fleet = Fleet::restore(config.fleet.clone(), store.clone(), Snapshot::default()).unwrap();
    let broker = Broker::start_with(config, fleet).await;
    let mut agent = broker.agent().await;
    register(&mut agent, "s1", "linux", 4).await;
    register(&mut agent, "s2", "linux", 4).await;

    // Two closes wait for the store inside their handlers: both slots are
    // taken.
    store.hold();
    let mut holders = Vec::new();
    for id in ["s1", "s2"] {
        let mut servers = broker.servers().await;
        holders.push(tokio::spawn(async move {
            servers
                .close_servers(close_req(vec![close_item(id, None, "")]))
                .await
        }));
    }
    store.waiting(2).await;

    // A flood over other connections: every request is refused at once
    // (the limit is global, not per connection).
    let channels = [
        broker.channel().await,
        broker.channel().await,
        broker.channel().await,
    ];
    let flood: Vec<_> = (0..200)
        .map(|i| {
            let mut servers = pb::servers_client::ServersClient::new(channels[i % 3].clone());
            tokio::spawn(async move { servers.describe_servers(describe_all()).await })
        })
        .collect();
    for call in flood {
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("limit of 2 requests"), "{err:?}");
    }
    // Health checks are never shed.
    assert_eq!(health_on(channels[0].clone()).await, ServingStatus::Serving);

    // The held requests complete, and the broker serves again.
    store.release();
    for holder in holders {
        let r = holder.await.unwrap().unwrap().into_inner();
        assert_eq!(r.successful_list.len(), 1);
    }
    assert_healthy(&broker).await;
}

#[tokio::test]
async fn a_concurrent_flood_only_ever_succeeds_or_is_shed() {
    let broker = Broker::start(with_limits(Limits {
        max_concurrent_requests: Some(2),
        ..Limits::default()
    }))
    .await;
    let _agents = dcv_broker::demo::spawn(broker.fleet.clone(), 200);
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(broker.channel().await);
    }
    let flood: Vec<_> = (0..200)
        .map(|i| {
            let mut servers = pb::servers_client::ServersClient::new(channels[i % 8].clone());
            tokio::spawn(async move { servers.describe_servers(describe_all()).await })
        })
        .collect();
    let (mut ok, mut shed) = (0, 0);
    for call in flood {
        match call.await.unwrap() {
            Ok(page) => {
                assert_eq!(page.into_inner().servers.len(), 200);
                ok += 1;
            }
            Err(err) if err.code() == Code::ResourceExhausted => shed += 1,
            Err(err) => panic!("neither served nor shed: {err:?}"),
        }
    }
    // A request is only ever shed while another one holds a slot, and
    // that one is served.
    assert!(ok >= 1, "ok {ok}, shed {shed}");
    eprintln!("flood of 200 with a limit of 2: {ok} served, {shed} shed");
    assert_healthy(&broker).await;
}

#[tokio::test]
async fn an_open_instruction_stream_holds_no_slot() {
    let broker = Broker::start(with_limits(Limits {
        max_concurrent_requests: Some(1),
        ..Limits::default()
    }))
    .await;
    let _agent = TestAgent::connect(&broker, registration("s1", "linux", 4)).await;
    // The stream stays open; unary requests are still admitted.
    let mut servers = broker.servers().await;
    for _ in 0..3 {
        servers.describe_servers(describe_all()).await.unwrap();
    }
}

/// A channel to the broker from another loopback address: another client
/// as far as the rate limit can tell.
async fn channel_from(broker: &Broker, local: &str) -> Channel {
    Channel::from_shared(format!("http://{}", broker.addr))
        .unwrap()
        .local_address(Some(local.parse().unwrap()))
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_client_over_its_rate_gets_retry_info_and_others_are_served() {
    let broker = Broker::start(with_limits(Limits {
        client_rate: ClientRate::new(5, 5),
        ..Limits::default()
    }))
    .await;
    let channel = broker.channel().await;
    let mut servers = pb::servers_client::ServersClient::new(channel.clone());

    let started = Instant::now();
    let mut served = 0;
    let refused = loop {
        match servers.describe_servers(describe_all()).await {
            Ok(_) => served += 1,
            Err(err) => break err,
        }
        assert!(served <= 50, "never refused");
    };
    // The burst of 5, plus whatever tokens accrued (one per 200 ms) while
    // the requests ran: exactly 5 unless this machine is very slow.
    let accrued = (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!((5..=5 + accrued).contains(&served), "served {served}");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("127.0.0.1"), "{refused:?}");
    let delay = refused
        .get_details_retry_info()
        .expect("google.rpc.RetryInfo")
        .retry_delay
        .expect("a delay");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(1),
        "{delay:?}"
    );

    // Health checks are exempt; another client has its own bucket.
    assert_eq!(health_on(channel).await, ServingStatus::Serving);
    let mut other =
        pb::servers_client::ServersClient::new(channel_from(&broker, "127.0.0.2").await);
    for _ in 0..5 {
        other.describe_servers(describe_all()).await.unwrap();
    }

    // Honouring RetryInfo works.
    tokio::time::sleep(delay).await;
    servers.describe_servers(describe_all()).await.unwrap();

    // Healthy, for clients with tokens.
    let fresh = channel_from(&broker, "127.0.0.3").await;
    assert_eq!(health_on(fresh.clone()).await, ServingStatus::Serving);
    pb::servers_client::ServersClient::new(fresh)
        .describe_servers(describe_all())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_rapid_reset_flood_loses_its_connection_and_the_broker_serves_on() {
    let broker = Broker::quiet().await;
    let tcp = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let (mut h2, connection) = h2::client::Builder::new()
        .handshake::<_, &'static [u8]>(tcp)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);

    // One real health check first: its reply proves the broker's SETTINGS
    // have arrived.
    let health = http::Request::post(format!(
        "http://{}/grpc.health.v1.Health/Check",
        broker.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (reply, mut body) = h2.send_request(health, false).unwrap();
    body.send_data(&[0, 0, 0, 0, 0][..], true).unwrap();
    let reply = reply.await.unwrap();
    assert_eq!(reply.status(), http::StatusCode::OK);
    assert_eq!(
        h2.current_max_send_streams(),
        Limits::default().max_concurrent_streams as usize,
        "the broker advertises its stream limit"
    );

    // Open and cancel streams as fast as the client can.
    for _ in 0..150 {
        let request = http::Request::post(format!(
            "http://{}/dcv.sessionmanager.v1.Servers/DescribeServers",
            broker.addr
        ))
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
        let Ok((_reply, mut stream)) = h2.send_request(request, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
    }
    let ended = connection.await.unwrap().unwrap_err();
    assert_eq!(
        ended.reason(),
        Some(h2::Reason::ENHANCE_YOUR_CALM),
        "{ended:?}"
    );
    assert!(ended.is_go_away() && ended.is_remote(), "{ended:?}");
    assert_healthy(&broker).await;
}
