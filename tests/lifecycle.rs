//! What service-mesh callers and tools rely on, against a real broker on
//! 127.0.0.1:0: health, reflection (v1 and v1alpha, with the google.rpc
//! descriptors), and graceful shutdown.

mod common;

use common::*;
use tokio_stream::StreamExt as _;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

#[tokio::test]
async fn health_reports_serving_for_the_server_and_each_service() {
    let broker = Broker::quiet().await;
    let mut health = HealthClient::new(broker.channel().await);
    for service in [
        "",
        "dcv.sessionmanager.v1.Servers",
        "dcv.sessionmanager.v1.Agent",
        "dcv.sessionmanager.v1.Sessions",
        // A single broker always leads, and takes writes.
        "dcv-broker.leader",
        "dcv-broker.writes",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let err = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

/// The next status a health watch reports that differs from `last` (a
/// watch repeats a status each time it is set, changed or not).
async fn next_status(
    watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    last: &mut Option<ServingStatus>,
) -> ServingStatus {
    loop {
        let status = watch
            .next()
            .await
            .expect("a status")
            .expect("no error")
            .status;
        let status = ServingStatus::try_from(status).expect("a known status");
        if *last != Some(status) {
            *last = Some(status);
            return status;
        }
    }
}

#[tokio::test]
async fn health_follows_a_replicas_role() {
    use dcv_broker::cluster::{ClusterView, Role};
    let cluster = ClusterView::clustered("replica-1".into());
    let broker = Broker::start(dcv_broker::BrokerConfig {
        cluster: cluster.clone(),
        ..quiet_config()
    })
    .await;
    let mut health = HealthClient::new(broker.channel().await);
    let watch = |service: &str| {
        let mut health = health.clone();
        let request = HealthCheckRequest {
            service: service.into(),
        };
        async move { health.watch(request).await.unwrap().into_inner() }
    };
    let mut leader = (watch("dcv-broker.leader").await, None);
    let mut writes = (watch("dcv-broker.writes").await, None);
    // Starting: no leader known, so no writes either; reads still work.
    assert_eq!(
        next_status(&mut leader.0, &mut leader.1).await,
        ServingStatus::NotServing
    );
    assert_eq!(
        next_status(&mut writes.0, &mut writes.1).await,
        ServingStatus::NotServing
    );
    cluster.set_role(Role::Leader);
    assert_eq!(
        next_status(&mut leader.0, &mut leader.1).await,
        ServingStatus::Serving
    );
    assert_eq!(
        next_status(&mut writes.0, &mut writes.1).await,
        ServingStatus::Serving
    );
    cluster.set_role(Role::Follower {
        leader: "http://127.0.0.1:1".into(),
    });
    assert_eq!(
        next_status(&mut leader.0, &mut leader.1).await,
        ServingStatus::NotServing
    );
    // A follower forwards writes: still SERVING.
    let follower_writes = health
        .check(HealthCheckRequest {
            service: "dcv-broker.writes".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(follower_writes, ServingStatus::Serving as i32);
    cluster.set_role(Role::Unavailable {
        why: "the database is unreachable".into(),
    });
    assert_eq!(
        next_status(&mut writes.0, &mut writes.1).await,
        ServingStatus::NotServing
    );
    let overall = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(overall, ServingStatus::Serving as i32);
}

macro_rules! reflection_lists_services {
    ($name:ident, $module:ident) => {
        #[tokio::test]
        async fn $name() {
            use tonic_reflection::pb::$module::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };
            let broker = Broker::quiet().await;
            let mut client = ServerReflectionClient::new(broker.channel().await);
            let requests = [
                MessageRequest::ListServices(String::new()),
                MessageRequest::FileContainingSymbol("google.rpc.BadRequest".into()),
                MessageRequest::FileContainingSymbol("dcv.sessionmanager.v1.Servers".into()),
                MessageRequest::FileByFilename("google/rpc/error_details.proto".into()),
            ]
            .map(|m| ServerReflectionRequest {
                host: String::new(),
                message_request: Some(m),
            });
            let mut replies = client
                .server_reflection_info(tokio_stream::iter(requests))
                .await
                .unwrap()
                .into_inner();

            let listed = replies.next().await.unwrap().unwrap().message_response;
            let Some(MessageResponse::ListServicesResponse(list)) = listed else {
                panic!("expected a service list, got {listed:?}");
            };
            let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
            for want in [
                "dcv.sessionmanager.v1.Servers",
                "dcv.sessionmanager.v1.Agent",
                "dcv.sessionmanager.v1.Sessions",
                "grpc.health.v1.Health",
            ] {
                assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
            }
            let mut first_files = Vec::new();
            for _ in 0..3 {
                let found = replies.next().await.unwrap().unwrap().message_response;
                let Some(MessageResponse::FileDescriptorResponse(files)) = found else {
                    panic!("expected descriptors, got {found:?}");
                };
                assert!(!files.file_descriptor_proto.is_empty());
                let first = &files.file_descriptor_proto[0];
                let first =
                    <prost_types::FileDescriptorProto as prost::Message>::decode(&first[..])
                        .unwrap();
                first_files.push(first.name().to_owned());
            }
            // google.rpc's types under their standard file name, as in every
            // other copy (googleapis, grpcio-status), so that clients' pools
            // do not see them twice; found by that name too.
            assert_eq!(
                first_files,
                [
                    "google/rpc/error_details.proto",
                    "dcv/sessionmanager/v1/servers.proto",
                    "google/rpc/error_details.proto",
                ]
            );
        }
    };
}

reflection_lists_services!(reflection_v1_lists_services_and_error_details, v1);
reflection_lists_services!(reflection_v1alpha_lists_services_and_error_details, v1alpha);

#[tokio::test]
async fn shutdown_reports_not_serving_then_drains_and_returns() {
    let mut broker = Broker::quiet().await;
    let channel = broker.channel().await;
    let mut health = HealthClient::new(channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "dcv.sessionmanager.v1.Servers".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    broker.stop();
    let next = watch.next().await.unwrap().unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    drop(watch);
    drop(health);
    drop(channel);

    // With its last stream gone, the server finishes well before the drain
    // deadline, and cleanly.
    let result = tokio::time::timeout(std::time::Duration::from_secs(4), &mut broker.task)
        .await
        .expect("serve returns within the drain deadline")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    let refused = tonic::transport::Channel::from_shared(format!("http://{}", broker.addr))
        .unwrap()
        .connect()
        .await;
    assert!(refused.is_err(), "nothing listens after shutdown");
}

#[tokio::test(start_paused = true)]
async fn shutdown_gives_up_on_stuck_connections_at_the_drain_deadline() {
    let mut broker = Broker::quiet().await;
    // A call whose message never comes: its handler waits, and the drain
    // cannot end it (it ends streaming replies, not requests in progress).
    let mut raw = common::raw_h2::RawH2::connect(broker.addr).await;
    let _held = raw.hold_open("/grpc.health.v1.Health/Check").await;
    broker.stop();
    // The paused clock jumps to the 5 s drain deadline once everything
    // else is idle; serve then returns Ok instead of waiting forever.
    let result = (&mut broker.task).await.unwrap();
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn the_drain_ends_watch_streams_instead_of_waiting_for_them() {
    let mut broker = Broker::quiet().await;
    let mut health = HealthClient::new(broker.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    watch.next().await.unwrap().unwrap();
    broker.stop();
    let not_serving = watch.next().await.unwrap().unwrap();
    assert_eq!(not_serving.status, ServingStatus::NotServing as i32);
    let end = watch.next().await.unwrap().unwrap_err();
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    // The client still holds its channel and its stream: the server
    // returns well before the 5 s drain deadline all the same.
    let result = tokio::time::timeout(std::time::Duration::from_secs(4), &mut broker.task)
        .await
        .expect("serve returns before the drain deadline")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    drop((watch, health));
}

#[tokio::test]
async fn shutdown_ends_agents_instruction_streams_instead_of_waiting_for_them() {
    let mut broker = Broker::quiet().await;
    let mut agent = TestAgent::connect(&broker, registration("a", "linux", 2)).await;
    broker.stop();
    // The stream ends cleanly, and the server returns well before the 5 s
    // drain deadline although the agent never hung up.
    assert!(agent.stream.message().await.unwrap().is_none());
    drop(agent);
    let result = tokio::time::timeout(std::time::Duration::from_secs(4), &mut broker.task)
        .await
        .expect("serve returns before the drain deadline")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}
