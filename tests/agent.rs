//! The Agent API and server liveness against a real broker on
//! 127.0.0.1:0: heartbeat loss on a paused clock, removal, re-registration
//! keeping the closed state, deregistration, and input validation.

mod common;

use std::time::Duration;

use common::*;
use dcv_broker::{
    fleet::FleetConfig,
    pb::{self, UnavailabilityReason as R},
};

fn liveness_config() -> dcv_broker::BrokerConfig {
    dcv_broker::BrokerConfig {
        fleet: FleetConfig {
            heartbeat_interval: Duration::from_secs(10),
            unreachable_after: Duration::from_secs(30),
            remove_after: Duration::from_secs(300),
            ..FleetConfig::default()
        },
        ..quiet_config()
    }
}

async fn exists(
    servers: &mut pb::servers_client::ServersClient<tonic::transport::Channel>,
    id: &str,
) -> bool {
    !servers
        .describe_servers(describe_ids(&[id]))
        .await
        .unwrap()
        .into_inner()
        .servers
        .is_empty()
}

#[tokio::test(start_paused = true)]
async fn silent_agents_become_unreachable_then_are_forgotten_unless_closed() {
    let broker = Broker::start(liveness_config()).await;
    let mut agent = broker.agent().await;
    let mut servers = broker.servers().await;
    let reply = agent
        .register_server(registration("quiet", "linux", 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.heartbeat_interval,
        Some(prost_types::Duration {
            seconds: 10,
            nanos: 0
        })
    );
    register(&mut agent, "closed", "linux", 10).await;
    register(&mut agent, "chatty", "linux", 10).await;
    servers
        .close_servers(close_req(vec![close_item("closed", None, "disk swap")]))
        .await
        .unwrap();
    assert!(reasons(&describe_one(&mut servers, "quiet").await).is_empty());

    // 29 s of silence is still reachable; past 30 s it is not.
    tokio::time::advance(Duration::from_secs(29)).await;
    agent.heartbeat(beat("chatty", vec![])).await.unwrap();
    assert!(reasons(&describe_one(&mut servers, "quiet").await).is_empty());
    tokio::time::advance(Duration::from_secs(2)).await;
    let quiet = describe_one(&mut servers, "quiet").await;
    assert_eq!(quiet.availability, pb::Availability::Unavailable as i32);
    assert_eq!(quiet.unavailability_reason, R::UnreachableAgent as i32);
    assert_eq!(
        reasons(&describe_one(&mut servers, "closed").await),
        vec![R::ServerClosed, R::UnreachableAgent]
    );
    assert!(reasons(&describe_one(&mut servers, "chatty").await).is_empty());

    // A heartbeat brings it back.
    agent.heartbeat(beat("quiet", vec![])).await.unwrap();
    assert!(reasons(&describe_one(&mut servers, "quiet").await).is_empty());

    // Past the removal timeout the open server is forgotten, the closed
    // one is kept.
    tokio::time::advance(Duration::from_secs(301)).await;
    assert!(!exists(&mut servers, "quiet").await);
    assert!(!exists(&mut servers, "chatty").await);
    let closed = describe_one(&mut servers, "closed").await;
    assert_eq!(closed.holds[0].reason, "disk swap");
    assert_eq!(reasons(&closed), vec![R::ServerClosed, R::UnreachableAgent]);

    // A forgotten server's heartbeat is refused: its agent must register.
    let err = agent.heartbeat(beat("quiet", vec![])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    register(&mut agent, "quiet", "linux", 10).await;
    assert!(reasons(&describe_one(&mut servers, "quiet").await).is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_background_sweeper_forgets_silent_servers() {
    let broker = Broker::start(liveness_config()).await;
    register(&mut broker.agent().await, "gone", "linux", 10).await;
    assert_eq!(broker.fleet.len(), 1);
    tokio::time::advance(Duration::from_secs(301)).await;
    // Nothing has touched the fleet since; the sweep removes it directly.
    assert_eq!(broker.fleet.sweep().len(), 1);
    assert!(broker.fleet.is_empty());
}

#[tokio::test]
async fn re_registering_with_a_new_ip_keeps_the_closed_state() {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    let mut servers = broker.servers().await;
    register(&mut agent, "moving", "linux", 10).await;
    servers
        .close_servers(close_req(vec![close_item("moving", None, "relocating")]))
        .await
        .unwrap();
    let before = describe_one(&mut servers, "moving").await;

    let mut moved = registration("moving", "linux", 10);
    moved.ip = "198.51.100.7".into();
    moved.hostname = "new-host.example".into();
    agent.register_server(moved).await.unwrap();
    let after = describe_one(&mut servers, "moving").await;
    assert_eq!(after.ip, "198.51.100.7");
    assert_eq!(after.hostname, "new-host.example");
    assert_eq!(after.holds, before.holds, "the close survives the re-IP");
    assert_eq!(after.registration_time, before.registration_time);
    assert_eq!(after.unavailability_reason, R::ServerClosed as i32);
}

#[tokio::test]
async fn deregistration_forgets_open_servers_and_keeps_closed_ones() {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    let mut servers = broker.servers().await;
    register(&mut agent, "open", "linux", 10).await;
    register(&mut agent, "closed", "linux", 10).await;
    servers
        .close_servers(close_req(vec![close_item("closed", None, "")]))
        .await
        .unwrap();
    let gone = agent
        .deregister_server(pb::DeregisterServerRequest {
            server_id: "open".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(gone.removed);
    assert!(!exists(&mut servers, "open").await);
    let kept = agent
        .deregister_server(pb::DeregisterServerRequest {
            server_id: "closed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!kept.removed);
    assert_eq!(
        reasons(&describe_one(&mut servers, "closed").await),
        vec![R::ServerClosed, R::UnreachableAgent]
    );
    // The agent comes back: reachable again, still closed.
    register(&mut agent, "closed", "linux", 10).await;
    assert_eq!(
        reasons(&describe_one(&mut servers, "closed").await),
        vec![R::ServerClosed]
    );
    let err = agent
        .deregister_server(pb::DeregisterServerRequest {
            server_id: "never".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn malformed_agent_reports_are_invalid_argument() {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;

    let mut bad = registration("", "beos", -1);
    bad.tags.push(pb::KeyValuePair {
        key: "dcv:os-family".into(),
        value: "linux".into(),
    });
    bad.endpoints[0].port = 70000;
    bad.endpoints[0].protocol = 42;
    let err = agent.register_server(bad).await.unwrap_err();
    let fields: Vec<String> = violations(&err).into_iter().map(|(f, _)| f).collect();
    for want in [
        "Host.Os.Family",
        "Endpoints[0].Port",
        "Endpoints[0].Protocol",
        "MaxVirtualSessions",
    ] {
        assert!(
            fields.iter().any(|f| f == want),
            "{want} missing in {fields:?}"
        );
    }
    let mut bad = registration("", "linux", 1);
    bad.tags.push(pb::KeyValuePair {
        key: "dcv:os-family".into(),
        value: "linux".into(),
    });
    bad.hostname = "h".repeat(2000);
    let err = agent.register_server(bad).await.unwrap_err();
    let fields: Vec<String> = violations(&err).into_iter().map(|(f, _)| f).collect();
    assert_eq!(fields, vec!["ServerId", "Hostname", "Tags[1].Key"]);
    assert!(broker.fleet.is_empty(), "nothing registered");

    register(&mut agent, "ok", "linux", 1).await;
    let mut hb = beat(
        "ok",
        vec![session(
            "",
            pb::SessionType::Unspecified,
            pb::SessionState::Ready,
        )],
    );
    hb.sessions.push(pb::AgentSession {
        state: 99,
        ..session("x", pb::SessionType::Virtual, pb::SessionState::Ready)
    });
    let err = agent.heartbeat(hb).await.unwrap_err();
    let fields: Vec<String> = violations(&err).into_iter().map(|(f, _)| f).collect();
    assert_eq!(fields, vec!["Sessions[0].Type", "Sessions[1].State"]);
    let err = agent.heartbeat(beat("", vec![])).await.unwrap_err();
    assert_eq!(violations(&err)[0].0, "ServerId");
    assert_eq!(violations(&err)[0].1, "must not be empty");

    use pb::{SessionState as St, SessionType as Ty};
    let err = agent
        .heartbeat(beat(
            "ok",
            vec![
                session("c1", Ty::Console, St::Ready),
                session("c2", Ty::Console, St::Ready),
                session("c1", Ty::Virtual, St::Ready),
                session("old", Ty::Console, St::Deleted),
            ],
        ))
        .await
        .unwrap_err();
    let fields: Vec<String> = violations(&err).into_iter().map(|(f, _)| f).collect();
    assert_eq!(fields, vec!["Sessions[1].Type", "Sessions[2].Id"]);

    let err = agent
        .register_server(registration("win", "windows", 5))
        .await
        .unwrap_err();
    let v = violations(&err);
    assert_eq!(v[0].0, "MaxVirtualSessions");
    assert!(v[0].1.contains("only Linux"), "{v:?}");
}

/// An unknown server's NOT_FOUND carries google.rpc.ResourceInfo whose
/// hint fits the call: register before heartbeats or the instruction
/// stream, register again after a forgotten instruction's result, and
/// nothing to do for a departure.
#[tokio::test]
async fn an_unknown_server_gets_a_hint_that_fits_the_call() {
    use tonic_types::StatusExt as _;
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    let hint = |status: tonic::Status| {
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        let info = status.get_details_resource_info().expect("ResourceInfo");
        assert_eq!(info.resource_type, "dcv.sessionmanager.v1.Server");
        assert_eq!(info.resource_name, "ghost");
        assert!(status.message().ends_with(&info.description), "{status:?}");
        info.description
    };
    let heartbeat = hint(agent.heartbeat(beat("ghost", vec![])).await.unwrap_err());
    assert!(
        heartbeat.contains("before sending heartbeats"),
        "{heartbeat}"
    );
    let stream = hint(
        agent
            .stream_instructions(pb::StreamInstructionsRequest {
                server_id: "ghost".into(),
            })
            .await
            .unwrap_err(),
    );
    assert!(
        stream.contains("before opening its instruction stream"),
        "{stream}"
    );
    let result = hint(
        agent
            .report_instruction_result(pb::ReportInstructionResultRequest {
                server_id: "ghost".into(),
                session_id: "s".into(),
                kind: pb::InstructionKind::CreateSession as i32,
                success: true,
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    assert!(result.contains("register it again"), "{result}");
    assert!(!result.contains("heartbeat"), "{result}");
    let gone = hint(
        agent
            .deregister_server(pb::DeregisterServerRequest {
                server_id: "ghost".into(),
            })
            .await
            .unwrap_err(),
    );
    assert!(gone.contains("nothing to deregister"), "{gone}");
    assert!(!gone.contains("RegisterServer"), "{gone}");
}

#[tokio::test]
async fn connection_counts_and_times_from_heartbeats_show_in_describe_sessions() {
    let broker = Broker::quiet().await;
    let mut agent = TestAgent::connect(&broker, registration("lin", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    // One session the broker created, one it adopts.
    let created = sessions
        .create_sessions(create_req(vec![create_item(
            "desk",
            "alice",
            pb::SessionType::Virtual,
        )]))
        .await
        .unwrap()
        .into_inner()
        .successful_list[0]
        .id
        .clone();
    agent.next_create().await;
    let at = |seconds: i64| prost_types::Timestamp { seconds, nanos: 0 };
    let mut mine = session(&created, pb::SessionType::Virtual, pb::SessionState::Ready);
    mine.num_of_connections = 3;
    mine.last_disconnection_time = Some(at(1_700_000_000));
    mine.name = "renamed on the host".into();
    let mut adopted = session("by-hand", pb::SessionType::Virtual, pb::SessionState::Ready);
    adopted.num_of_connections = 1;
    adopted.creation_time = Some(at(1_600_000_000));
    adopted.name = "started by hand".into();
    agent.beat(vec![mine.clone(), adopted]).await;

    let shown = describe_session(&mut sessions, &created).await;
    assert_eq!(shown.num_of_connections, 3);
    assert_eq!(shown.last_disconnection_time, Some(at(1_700_000_000)));
    assert_eq!(
        shown.name, "desk",
        "the broker's own session keeps its name"
    );
    let shown = describe_session(&mut sessions, "by-hand").await;
    assert_eq!(shown.num_of_connections, 1);
    assert_eq!(shown.last_disconnection_time, None);
    assert_eq!(shown.name, "started by hand");
    assert_eq!(shown.creation_time, Some(at(1_600_000_000)));

    // The next report replaces the last.
    mine.num_of_connections = 0;
    agent.beat(vec![mine]).await;
    assert_eq!(
        describe_session(&mut sessions, &created)
            .await
            .num_of_connections,
        0
    );
}

#[tokio::test]
async fn bad_connection_counts_and_times_are_refused_naming_the_field() {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    register(&mut agent, "lin", "linux", 4).await;
    let mut negative = session("a", pb::SessionType::Virtual, pb::SessionState::Ready);
    negative.num_of_connections = -1;
    let mut huge = session("b", pb::SessionType::Virtual, pb::SessionState::Ready);
    huge.num_of_connections = i32::MAX;
    let mut bad_time = session("c", pb::SessionType::Virtual, pb::SessionState::Ready);
    bad_time.last_disconnection_time = Some(prost_types::Timestamp {
        seconds: 1,
        nanos: -5,
    });
    let mut bad_creation = session("d", pb::SessionType::Virtual, pb::SessionState::Ready);
    bad_creation.creation_time = Some(prost_types::Timestamp {
        seconds: 0,
        nanos: 2_000_000_000,
    });
    let mut long_name = session("e", pb::SessionType::Virtual, pb::SessionState::Ready);
    long_name.name = "n".repeat(5000);
    let err = agent
        .heartbeat(beat(
            "lin",
            vec![negative, huge, bad_time, bad_creation, long_name],
        ))
        .await
        .unwrap_err();
    let fields: Vec<String> = violations(&err).into_iter().map(|(f, _)| f).collect();
    assert_eq!(
        fields,
        [
            "Sessions[0].NumOfConnections",
            "Sessions[2].LastDisconnectionTime",
            "Sessions[3].CreationTime",
        ],
        "the wire's checks first"
    );
    let mut huge = session("b", pb::SessionType::Virtual, pb::SessionState::Ready);
    huge.num_of_connections = i32::MAX;
    let mut long_name = session("e", pb::SessionType::Virtual, pb::SessionState::Ready);
    long_name.name = "n".repeat(5000);
    let err = agent
        .heartbeat(beat("lin", vec![huge, long_name]))
        .await
        .unwrap_err();
    let fields: Vec<String> = violations(&err).into_iter().map(|(f, _)| f).collect();
    assert_eq!(fields, ["Sessions[0].NumOfConnections", "Sessions[1].Name"]);
}
