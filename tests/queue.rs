//! The CreateSessions queue and agent timeouts on a paused clock: queued
//! requests are placed when a server opens or a session ends (never on a
//! closed server), expire at their deadline, and a full queue refuses; an
//! agent that does not answer in time has its session retried elsewhere.

mod common;

use std::time::Duration;

use common::*;
use dcv_broker::{
    fleet::FleetConfig,
    pb::{self, FailureCode, InstructionKind as Kind, SessionState as St, SessionType as Ty},
};

fn config() -> dcv_broker::BrokerConfig {
    dcv_broker::BrokerConfig {
        fleet: FleetConfig {
            queue_max_size: 2,
            queue_timeout: Duration::from_secs(60),
            agent_timeout: Duration::from_secs(10),
            // Long enough that no server goes unreachable during a test.
            unreachable_after: Duration::from_secs(3600),
            remove_after: Duration::from_secs(7200),
            ..FleetConfig::default()
        },
        ..quiet_config()
    }
}

fn queued(name: &str, kind: Ty) -> pb::CreateSessionRequestData {
    let mut item = create_item(name, "quinn", kind);
    item.enqueue_request = true;
    item
}

fn state(s: &pb::Session) -> St {
    St::try_from(s.state).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_waits_for_an_open_server_never_a_closed_one() {
    let broker = Broker::start(config()).await;
    let mut a = TestAgent::connect(&broker, registration("a", "linux", 4)).await;
    let mut b = TestAgent::connect(&broker, registration("b", "linux", 4)).await;
    let mut servers = broker.servers().await;
    servers
        .close_servers(close_req(vec![
            close_item("a", None, ""),
            close_item("b", None, ""),
        ]))
        .await
        .unwrap();
    let mut sessions = broker.sessions().await;
    let r = sessions
        .create_sessions(create_req(vec![queued("q", Ty::Virtual)]))
        .await
        .unwrap()
        .into_inner();
    let id = r.successful_list[0].id.clone();
    assert!(r.successful_list[0].server.is_none());

    // Heartbeats of closed servers do not place it.
    a.beat(vec![]).await;
    b.beat(vec![]).await;
    assert!(describe_session(&mut sessions, &id).await.server.is_none());
    assert_eq!(broker.fleet.queued(), 1);

    servers.open_servers(open_req(&["b"])).await.unwrap();
    let s = describe_session(&mut sessions, &id).await;
    assert_eq!(s.server.as_ref().unwrap().id, "b");
    assert_eq!(b.next_create().await.session_id, id);
    assert_eq!(broker.fleet.queued(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_takes_the_place_of_a_session_that_ends() {
    let broker = Broker::start(config()).await;
    let mut win = TestAgent::connect(&broker, registration("win", "windows", 0)).await;
    win.beat(vec![session("busy", Ty::Console, St::Ready)])
        .await;
    let mut sessions = broker.sessions().await;
    let r = sessions
        .create_sessions(create_req(vec![queued("q", Ty::Console)]))
        .await
        .unwrap()
        .into_inner();
    let id = r.successful_list[0].id.clone();
    assert!(r.successful_list[0].server.is_none(), "the server is full");
    win.beat(vec![]).await;
    assert_eq!(
        describe_session(&mut sessions, &id)
            .await
            .server
            .unwrap()
            .id,
        "win"
    );
    assert_eq!(win.next_create().await.session_id, id);
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_expires_at_its_deadline_and_a_full_queue_refuses() {
    let broker = Broker::start(config()).await;
    let mut sessions = broker.sessions().await;
    let r = sessions
        .create_sessions(create_req(vec![
            queued("one", Ty::Console),
            queued("two", Ty::Console),
            queued("three", Ty::Console),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.successful_list.len(), 2);
    let refused = &r.unsuccessful_list[0];
    assert_eq!(
        FailureCode::try_from(refused.failure_code).unwrap(),
        FailureCode::QueueFull
    );
    assert!(
        refused.failure_reason.contains("queue"),
        "{}",
        refused.failure_reason
    );
    let id = r.successful_list[0].id.clone();

    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(
        state(&describe_session(&mut sessions, &id).await),
        St::Creating
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    let expired = describe_session(&mut sessions, &id).await;
    assert_eq!(state(&expired), St::Deleted);
    assert!(
        expired.state_reason.contains("60 s"),
        "{}",
        expired.state_reason
    );
    assert_eq!(broker.fleet.queued(), 0);

    // The queue has room again.
    let r = sessions
        .create_sessions(create_req(vec![queued("four", Ty::Console)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.successful_list.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_silent_agent_loses_the_session_to_another_server() {
    let broker = Broker::start(config()).await;
    let mut a = TestAgent::connect(&broker, registration("a", "linux", 4)).await;
    let mut b = TestAgent::connect(&broker, registration("b", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    let r = sessions
        .create_sessions(create_req(vec![create_item("s", "rex", Ty::Virtual)]))
        .await
        .unwrap()
        .into_inner();
    let id = r.successful_list[0].id.clone();
    assert_eq!(r.successful_list[0].server.as_ref().unwrap().id, "a");
    assert_eq!(a.next_create().await.session_id, id);

    tokio::time::advance(Duration::from_secs(10)).await;
    let s = describe_session(&mut sessions, &id).await;
    assert_eq!(s.server.as_ref().unwrap().id, "b", "retried elsewhere");
    assert_eq!(state(&s), St::Creating);
    assert_eq!(b.next_create().await.session_id, id);
    // The silent agent is told to drop it, should it appear after all.
    match a.next().await {
        Instr::DeleteSession(d) => assert_eq!(d.session_id, id),
        other => panic!("expected DeleteSession, got {other:?}"),
    }
    // Nor does its heartbeat saying the session is gone there: the
    // session is on the other server now.
    a.client
        .heartbeat(beat("a", vec![session(&id, Ty::Virtual, St::Deleted)]))
        .await
        .unwrap();
    let s = describe_session(&mut sessions, &id).await;
    assert_eq!(s.server.as_ref().unwrap().id, "b", "{s:?}");
    assert_eq!(state(&s), St::Creating);
    // A late answer from the first agent changes nothing.
    a.report(&id, Kind::CreateSession, true, St::Ready).await;
    assert_eq!(
        describe_session(&mut sessions, &id)
            .await
            .server
            .unwrap()
            .id,
        "b"
    );
    b.report(&id, Kind::CreateSession, true, St::Ready).await;
    assert_eq!(
        state(&describe_session(&mut sessions, &id).await),
        St::Ready
    );
}

#[tokio::test(start_paused = true)]
async fn a_session_deleted_while_being_created_is_not_retried_when_its_server_goes() {
    let broker = Broker::start(config()).await;
    let mut a = TestAgent::connect(&broker, registration("a", "linux", 4)).await;
    let _b = TestAgent::connect(&broker, registration("b", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    let r = sessions
        .create_sessions(create_req(vec![create_item("s", "rex", Ty::Virtual)]))
        .await
        .unwrap()
        .into_inner();
    let id = r.successful_list[0].id.clone();
    assert_eq!(r.successful_list[0].server.as_ref().unwrap().id, "a");
    assert_eq!(a.next_create().await.session_id, id);
    let deleted = sessions
        .delete_sessions(pb::DeleteSessionsRequest {
            sessions: vec![pb::DeleteSessionRequestData {
                session_id: id.clone(),
                owner: "rex".into(),
                force: None,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.successful_list.len(), 1, "{deleted:?}");
    assert_eq!(
        state(&describe_session(&mut sessions, &id).await),
        St::Deleting
    );
    // Its server goes before answering: the session ends there, and is
    // not created anew on the other server.
    a.client
        .deregister_server(pb::DeregisterServerRequest {
            server_id: "a".into(),
        })
        .await
        .unwrap();
    let s = describe_session(&mut sessions, &id).await;
    assert_eq!(state(&s), St::Deleted, "{s:?}");
    assert!(s.state_reason.contains("removed"), "{}", s.state_reason);
}

#[tokio::test(start_paused = true)]
async fn failures_are_retried_unless_disabled_then_the_session_is_deleted() {
    let broker = Broker::start(config()).await;
    let mut a = TestAgent::connect(&broker, registration("a", "linux", 4)).await;
    let mut b = TestAgent::connect(&broker, registration("b", "linux", 4)).await;
    let mut sessions = broker.sessions().await;

    let mut once = create_item("once", "sam", Ty::Virtual);
    once.disable_retry_on_failure = true;
    let r = sessions
        .create_sessions(create_req(vec![once]))
        .await
        .unwrap()
        .into_inner();
    let id = r.successful_list[0].id.clone();
    a.next_create().await;
    a.report(&id, Kind::CreateSession, false, St::Unspecified)
        .await;
    let s = describe_session(&mut sessions, &id).await;
    assert_eq!(state(&s), St::Deleted);
    assert!(
        s.state_reason.contains("no such user"),
        "{}",
        s.state_reason
    );

    // With retries, a failure on one server moves it to the next; when
    // every server failed it is deleted.
    let r = sessions
        .create_sessions(create_req(vec![create_item("twice", "sam", Ty::Virtual)]))
        .await
        .unwrap()
        .into_inner();
    let id = r.successful_list[0].id.clone();
    assert_eq!(a.next_create().await.session_id, id);
    a.report(&id, Kind::CreateSession, false, St::Unspecified)
        .await;
    assert_eq!(b.next_create().await.session_id, id);
    b.report(&id, Kind::CreateSession, false, St::Unspecified)
        .await;
    let s = describe_session(&mut sessions, &id).await;
    assert_eq!(state(&s), St::Deleted);
    assert!(
        s.state_reason.starts_with("Creation failed"),
        "{}",
        s.state_reason
    );
}

#[tokio::test(start_paused = true)]
async fn deleted_sessions_are_forgotten_after_their_retention() {
    let broker = Broker::start(config()).await;
    let mut sessions = broker.sessions().await;
    let r = sessions
        .create_sessions(create_req(vec![queued("gone", Ty::Console)]))
        .await
        .unwrap()
        .into_inner();
    let id = r.successful_list[0].id.clone();
    let del = sessions
        .delete_sessions(pb::DeleteSessionsRequest {
            sessions: vec![pb::DeleteSessionRequestData {
                session_id: id.clone(),
                owner: "quinn".into(),
                force: None,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        del.successful_list[0].state,
        St::Deleted as i32,
        "a queued session has nothing to ask"
    );
    tokio::time::advance(Duration::from_secs(3599)).await;
    assert_eq!(
        state(&describe_session(&mut sessions, &id).await),
        St::Deleted
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    let page = sessions
        .describe_sessions(pb::DescribeSessionsRequest {
            session_ids: vec![id],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(page.sessions.is_empty());
}

#[tokio::test(start_paused = true)]
async fn sessions_of_an_unreachable_agent_show_as_unknown() {
    let mut config = config();
    config.fleet.unreachable_after = Duration::from_secs(90);
    let broker = Broker::start(config).await;
    let mut agent = TestAgent::connect(&broker, registration("a", "linux", 4)).await;
    agent.beat(vec![session("s", Ty::Virtual, St::Ready)]).await;
    let mut sessions = broker.sessions().await;
    assert_eq!(
        state(&describe_session(&mut sessions, "s").await),
        St::Ready
    );
    tokio::time::advance(Duration::from_secs(91)).await;
    assert_eq!(
        state(&describe_session(&mut sessions, "s").await),
        St::Unknown
    );
    agent.beat(vec![session("s", Ty::Virtual, St::Ready)]).await;
    assert_eq!(
        state(&describe_session(&mut sessions, "s").await),
        St::Ready
    );
}

/// A DeleteSessions item with Force, for quinn's session `id`.
fn force_delete(id: &str) -> pb::DeleteSessionsRequest {
    pb::DeleteSessionsRequest {
        sessions: vec![pb::DeleteSessionRequestData {
            session_id: id.into(),
            owner: "quinn".into(),
            force: Some(true),
        }],
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_forced_delete_gives_the_room_to_the_oldest_queued_request_at_once() {
    let broker = Broker::start(config()).await;
    let mut win = TestAgent::connect(&broker, registration("win", "windows", 0)).await;
    let mut sessions = broker.sessions().await;
    let create = |name: &str| create_req(vec![queued(name, Ty::Console)]);

    // Two rounds: the session forced out is first still being placed (a
    // reservation), then one its agent confirmed and reports.
    for confirmed in [false, true] {
        let r = sessions
            .create_sessions(create("running"))
            .await
            .unwrap()
            .into_inner();
        let running = r.successful_list[0].id.clone();
        assert_eq!(r.successful_list[0].server.as_ref().unwrap().id, "win");
        assert_eq!(win.next_create().await.session_id, running);
        if confirmed {
            win.report(&running, Kind::CreateSession, true, St::Ready)
                .await;
            win.beat(vec![session(&running, Ty::Console, St::Ready)])
                .await;
        }
        let r = sessions
            .create_sessions(create("older"))
            .await
            .unwrap()
            .into_inner();
        let older = r.successful_list[0].id.clone();
        assert!(r.successful_list[0].server.is_none(), "the server is full");

        sessions
            .delete_sessions(force_delete(&running))
            .await
            .unwrap();
        // No heartbeat in between: the delete itself hands the room over.
        let placed = describe_session(&mut sessions, &older).await;
        assert_eq!(
            placed.server.map(|s| s.id).as_deref(),
            Some("win"),
            "the oldest queued request takes the room (confirmed: {confirmed})"
        );
        assert_eq!(win.next_create().await.session_id, older);
        assert_eq!(broker.fleet.queued(), 0);
        let r = sessions
            .create_sessions(create("newer"))
            .await
            .unwrap()
            .into_inner();
        let newer = r.successful_list[0].id.clone();
        assert!(
            r.successful_list[0].server.is_none(),
            "a newer request is not placed ahead of the older one"
        );
        // Clean up for the next round: the server's sessions go.
        sessions
            .delete_sessions(force_delete(&newer))
            .await
            .unwrap();
        sessions
            .delete_sessions(force_delete(&older))
            .await
            .unwrap();
        win.beat(vec![]).await;
        assert_eq!(broker.fleet.queued(), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn an_agents_failure_reason_is_cleaned_and_bounded_before_it_becomes_the_state_reason() {
    let broker = Broker::start(config()).await;
    let mut a = TestAgent::connect(&broker, registration("a", "linux", 4)).await;
    let mut sessions = broker.sessions().await;

    let mut once = create_item("once", "sam", Ty::Virtual);
    once.disable_retry_on_failure = true;
    let r = sessions
        .create_sessions(create_req(vec![once]))
        .await
        .unwrap()
        .into_inner();
    let id = r.successful_list[0].id.clone();
    a.next_create().await;
    // What a hostile or chatty agent might send: terminal escapes, new
    // lines and a megabyte of output.
    let reason = format!("\u{1b}[2J\u{1b}[31mfake\nprompt$ {}", "x".repeat(1 << 20));
    a.client
        .report_instruction_result(pb::ReportInstructionResultRequest {
            server_id: "a".into(),
            session_id: id.clone(),
            kind: Kind::CreateSession as i32,
            success: false,
            failure_reason: reason,
            ..Default::default()
        })
        .await
        .unwrap();
    let s = describe_session(&mut sessions, &id).await;
    assert_eq!(state(&s), St::Deleted);
    assert!(
        s.state_reason.contains("[2J[31mfakeprompt$ xxx"),
        "{}",
        &s.state_reason[..s.state_reason.len().min(300)]
    );
    assert!(
        !s.state_reason.chars().any(char::is_control),
        "control characters kept"
    );
    assert!(
        s.state_reason.chars().count() < 1024 + 200,
        "{} characters kept",
        s.state_reason.chars().count()
    );
}
