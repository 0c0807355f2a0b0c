//! Instruction ids as agents see them: a create or delete sent again (its
//! agent reopened its stream, or the broker restarted on its store) keeps
//! its id, and a new attempt (a retry after a failure, on another server
//! or the same one; a delete after a failed delete) gets a new one, so an
//! agent that journals the ids it carried out never runs one twice and
//! never skips a new one.

mod common;

use std::{ffi::OsStr, net::SocketAddr};

use common::{process::BrokerProcess, *};
use dcv_broker::pb::{
    self, InstructionKind as Kind, SessionState as St, SessionType as Ty,
    sessions_client::SessionsClient,
};
use tonic::transport::Channel;

/// Opens `agent`'s instruction stream again, as an agent that reconnects.
async fn reopen(agent: &mut TestAgent) {
    agent.stream = agent
        .client
        .stream_instructions(pb::StreamInstructionsRequest {
            server_id: agent.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
}

async fn next_create(agent: &mut TestAgent) -> (String, String) {
    match agent.next_with_id().await {
        (id, Instr::CreateSession(c)) => (id, c.session_id),
        (_, other) => panic!("expected CreateSession, got {other:?}"),
    }
}

async fn next_delete(agent: &mut TestAgent) -> (String, String) {
    match agent.next_with_id().await {
        (id, Instr::DeleteSession(d)) => (id, d.session_id),
        (_, other) => panic!("expected DeleteSession, got {other:?}"),
    }
}

async fn create_one(sessions: &mut SessionsClient<Channel>, enqueue: bool) -> String {
    let mut item = create_item("desk", "alice", Ty::Virtual);
    item.enqueue_request = enqueue;
    let reply = sessions
        .create_sessions(create_req(vec![item]))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.unsuccessful_list.is_empty(), "{reply:?}");
    reply.successful_list[0].id.clone()
}

fn delete_req(session: &str) -> pb::DeleteSessionsRequest {
    pb::DeleteSessionsRequest {
        sessions: vec![pb::DeleteSessionRequestData {
            session_id: session.into(),
            owner: "alice".into(),
            force: None,
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn a_create_sent_again_on_a_new_stream_keeps_its_id_and_a_retry_gets_a_new_one() {
    let broker = Broker::quiet().await;
    let mut a = TestAgent::connect(&broker, registration("a", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    let session = create_one(&mut sessions, true).await;
    let (first, on_a) = next_create(&mut a).await;
    assert_eq!(on_a, session);

    reopen(&mut a).await;
    let (again, _) = next_create(&mut a).await;
    assert_eq!(again, first, "the same instruction, sent again");

    // It fails on a; queued (EnqueueRequest), it is placed on a again by
    // a's next heartbeat: a new attempt, a new id.
    a.report(&session, Kind::CreateSession, false, St::Unspecified)
        .await;
    a.beat(vec![]).await;
    let (retry, retried) = next_create(&mut a).await;
    assert_eq!(retried, session);
    assert_ne!(retry, first, "a retry on the same server is a new attempt");

    // Failing there again, it goes to another server, with yet another id.
    let mut b = TestAgent::connect(&broker, registration("b", "linux", 4)).await;
    a.report(&session, Kind::CreateSession, false, St::Unspecified)
        .await;
    let (elsewhere, _) = next_create(&mut b).await;
    assert_ne!(elsewhere, first);
    assert_ne!(elsewhere, retry);
    for id in [&first, &retry, &elsewhere] {
        assert_eq!(id.len(), 36, "a UUID: {id}");
    }
}

#[tokio::test]
async fn a_delete_sent_again_keeps_its_id_and_a_delete_after_a_failed_one_gets_a_new_one() {
    let broker = Broker::quiet().await;
    let mut agent = TestAgent::connect(&broker, registration("a", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    let session = create_one(&mut sessions, false).await;
    let (create, _) = next_create(&mut agent).await;
    agent
        .report(&session, Kind::CreateSession, true, St::Ready)
        .await;

    sessions
        .delete_sessions(delete_req(&session))
        .await
        .unwrap();
    let (first, deleted) = next_delete(&mut agent).await;
    assert_eq!(deleted, session);
    assert_ne!(first, create);
    reopen(&mut agent).await;
    assert_eq!(next_delete(&mut agent).await.0, first, "sent again");
    // Asked again while pending: the same deletion, the same id.
    sessions
        .delete_sessions(delete_req(&session))
        .await
        .unwrap();
    assert_eq!(next_delete(&mut agent).await.0, first);

    agent
        .report(&session, Kind::DeleteSession, false, St::Unspecified)
        .await;
    sessions
        .delete_sessions(delete_req(&session))
        .await
        .unwrap();
    let (second, _) = next_delete(&mut agent).await;
    assert_ne!(second, first, "a new deletion after a failed one");
}

/// The binary on `dir`, with no demo fleet.
async fn start_on(dir: &std::path::Path) -> BrokerProcess {
    let mut args: Vec<&OsStr> = ["--client-rate", "0", "--data-dir"]
        .map(OsStr::new)
        .to_vec();
    args.push(dir.as_os_str());
    BrokerProcess::start_exactly(&args).await
}

async fn sessions_at(addr: SocketAddr) -> SessionsClient<Channel> {
    SessionsClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

#[tokio::test]
async fn pending_instructions_keep_their_ids_across_a_broker_restart() {
    let dir = std::env::temp_dir().join(format!("dcv-ids-{}", uuid::Uuid::new_v4()));
    let mut broker = start_on(&dir).await;
    let mut agent = TestAgent::connect_to(broker.addr, registration("a", "linux", 4)).await;
    let mut sessions = sessions_at(broker.addr).await;
    let placing = create_one(&mut sessions, false).await;
    let (create, _) = next_create(&mut agent).await;
    // A second session, READY, then being deleted.
    let mut item = create_item("other", "alice", Ty::Virtual);
    item.name = "other".into();
    let ready = sessions
        .create_sessions(create_req(vec![item]))
        .await
        .unwrap()
        .into_inner()
        .successful_list[0]
        .id
        .clone();
    next_create(&mut agent).await;
    agent
        .report(&ready, Kind::CreateSession, true, St::Ready)
        .await;
    sessions.delete_sessions(delete_req(&ready)).await.unwrap();
    let (delete, _) = next_delete(&mut agent).await;

    broker.signal("-KILL");
    broker.exited().await;
    let broker = start_on(&dir).await;
    // The agent reconnects to the restarted broker (a new port).
    let mut agent = TestAgent::connect_to(broker.addr, registration("a", "linux", 4)).await;
    let mut resent = [agent.next_with_id().await, agent.next_with_id().await];
    resent.sort_by_key(|(_, i)| matches!(i, Instr::DeleteSession(_)));
    match (&resent[0], &resent[1]) {
        ((c, Instr::CreateSession(cs)), (d, Instr::DeleteSession(ds))) => {
            assert_eq!((c, cs.session_id.as_str()), (&create, placing.as_str()));
            assert_eq!((d, ds.session_id.as_str()), (&delete, ready.as_str()));
        }
        other => panic!("expected the create and the delete again, got {other:?}"),
    }
    broker.terminate().await;
    let _ = std::fs::remove_dir_all(&dir);
}
