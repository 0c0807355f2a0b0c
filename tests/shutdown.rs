//! Shutdown of the real binary: NOT_SERVING first while calls still
//! succeed during the grace period, open streams ended when the drain
//! starts (so an open Health/Watch does not hold the exit to the drain
//! deadline), and a second signal that ends the grace period or the drain
//! at once.

mod common;

use std::time::{Duration, Instant};

use common::{process::BrokerProcess, raw_h2::RawH2};
use dcv_broker::pb::{self, servers_client::ServersClient};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// How soon the broker must be gone once nothing holds it: far below the
/// 60 s drain deadline these tests set, so a broker that waits for the
/// deadline fails.
const PROMPTLY: Duration = Duration::from_secs(5);

async fn channel(broker: &BrokerProcess) -> Channel {
    Channel::from_shared(format!("http://{}", broker.addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn watch(channel: Channel) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: "dcv.sessionmanager.v1.Servers".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    watch
}

async fn servers_described(channel: Channel) -> usize {
    ServersClient::new(channel)
        .describe_servers(pb::DescribeServersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .servers
        .len()
}

#[tokio::test]
async fn not_serving_comes_first_and_calls_still_succeed_during_the_grace_period() {
    let mut broker = BrokerProcess::start_exactly(&[
        "--in-memory",
        "--demo-fleet",
        "3",
        "--shutdown-grace",
        "60s",
        "--drain-deadline",
        "60s",
    ])
    .await;
    let channel = channel(&broker).await;
    let mut watch = watch(channel.clone()).await;

    broker.signal("-TERM");
    let next = watch.message().await.unwrap().unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    // Still serving: on the open connection and on a new one.
    assert_eq!(servers_described(channel.clone()).await, 3);
    let fresh = self::channel(&broker).await;
    assert_eq!(servers_described(fresh).await, 3);
    assert!(broker.child.try_wait().unwrap().is_none(), "still running");

    // A second signal cuts the 60 s grace period short.
    let second = Instant::now();
    broker.signal("-TERM");
    let status = broker.exited().await;
    assert!(second.elapsed() < PROMPTLY, "took {:?}", second.elapsed());
    assert_eq!(status.code(), Some(0));
    broker
        .logged("second shutdown signal during the grace period")
        .await;
}

#[tokio::test]
async fn the_drain_ends_an_open_watch_and_exits_long_before_its_deadline() {
    let mut broker = BrokerProcess::start(&["--drain-deadline", "60s"]).await;
    let channel = channel(&broker).await;
    let mut watch = watch(channel.clone()).await;

    let signalled = Instant::now();
    broker.signal("-TERM");
    let next = watch.message().await.unwrap().unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    // The drain ends the stream, which would otherwise never end.
    let end = tokio::time::timeout(PROMPTLY, watch.message())
        .await
        .expect("the drain ends the Watch stream")
        .unwrap_err();
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    assert!(end.message().contains("shutting down"), "{end:?}");

    let status = broker.exited().await;
    assert!(
        signalled.elapsed() < PROMPTLY,
        "took {:?} with a Watch stream open",
        signalled.elapsed()
    );
    assert_eq!(status.code(), Some(0));
    drop(channel);
}

#[tokio::test]
async fn a_second_signal_ends_a_drain_held_by_a_request_in_progress() {
    // No request timeout: the held request would hold the drain for the
    // whole 60 s deadline.
    let mut broker =
        BrokerProcess::start(&["--drain-deadline", "60s", "--request-timeout", "0s"]).await;
    let mut raw = RawH2::connect(broker.addr).await;
    // A unary call whose message never comes: its handler waits, and the
    // broker cannot end it.
    let _held = raw.hold_open("/grpc.health.v1.Health/Check").await;

    broker.signal("-TERM");
    broker.logged("draining").await;
    assert!(
        broker.child.try_wait().unwrap().is_none(),
        "the held request keeps the drain going"
    );
    let second = Instant::now();
    broker.signal("-TERM");
    let status = broker.exited().await;
    assert!(second.elapsed() < PROMPTLY, "took {:?}", second.elapsed());
    assert_eq!(status.code(), Some(0));
    broker
        .logged("second shutdown signal: ending the drain now")
        .await;
}
