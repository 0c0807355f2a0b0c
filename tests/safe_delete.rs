//! DeleteSessions dry runs (issue 18, acceptance 3): a dry run judges
//! every item as the real call does and changes nothing (DescribeSessions
//! and DescribeServers identical before and after, nothing submitted to
//! the store, no audit record, no instruction to an agent), names the
//! sessions it would delete per server and counts AVAILABLE capacity per
//! pool as if they were gone; the real call that follows gives the same
//! per-item results.
//!
//! A real broker on 127.0.0.1:0 over a store that hands every submission
//! to the test, with agents driven by the test over the Agent API.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use dcv_broker::{
    fleet::{
        Fleet,
        persist::{Change, Durable, Store},
    },
    pb::{self, FailureCode, InstructionKind as Kind, SessionState as St, SessionType as Ty},
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// A store that hands every submission to the test.
#[derive(Debug)]
struct Recording(Mutex<UnboundedSender<Vec<Change>>>);

impl Store for Recording {
    fn submit(&self, changes: Vec<Change>) -> Durable {
        let _ = self.0.lock().unwrap().send(changes);
        Durable::done()
    }
}

/// A broker over a [`Recording`] store, and what it submits.
async fn recorded_broker() -> (Broker, UnboundedReceiver<Vec<Change>>) {
    let (tx, rx) = unbounded_channel();
    let config = quiet_config();
    let fleet = Fleet::restore(
        config.fleet.clone(),
        Arc::new(Recording(Mutex::new(tx))),
        Default::default(),
    )
    .unwrap();
    (Broker::start_with(config, fleet).await, rx)
}

/// Everything submitted so far.
fn drain(rx: &mut UnboundedReceiver<Vec<Change>>) -> Vec<Change> {
    let mut out = Vec::new();
    while let Ok(changes) = rx.try_recv() {
        out.extend(changes);
    }
    out
}

/// A Linux server in `pool` (no pool tag when empty).
fn pooled(id: &str, pool: &str, max_virtual: i32) -> pb::RegisterServerRequest {
    let mut r = registration(id, "linux", max_virtual);
    r.tags = if pool.is_empty() {
        Vec::new()
    } else {
        vec![pb::KeyValuePair {
            key: "pool".into(),
            value: pool.into(),
        }]
    };
    r
}

/// A READY session of `owner`, as its agent reports it.
fn running(id: &str, owner: &str, kind: Ty) -> pb::AgentSession {
    pb::AgentSession {
        owner: owner.into(),
        ..session(id, kind, St::Ready)
    }
}

fn del(id: &str, owner: &str, force: bool) -> pb::DeleteSessionRequestData {
    pb::DeleteSessionRequestData {
        session_id: id.into(),
        owner: owner.into(),
        force: force.then_some(true),
    }
}

fn delete_req(
    items: Vec<pb::DeleteSessionRequestData>,
    dry_run: bool,
) -> pb::DeleteSessionsRequest {
    pb::DeleteSessionsRequest {
        sessions: items,
        dry_run,
        capacity_tag_key: if dry_run {
            "pool".into()
        } else {
            String::new()
        },
        ..Default::default()
    }
}

/// A reply's per-item results, request ids aside.
type Outcome = (
    Vec<pb::DeleteSessionSuccessfulResponse>,
    Vec<pb::DeleteSessionUnsuccessfulResponse>,
);

fn outcome(r: &pb::DeleteSessionsResponse) -> Outcome {
    (r.successful_list.clone(), r.unsuccessful_list.clone())
}

/// Every session and every server as Describe shows them, request ids
/// cleared.
async fn snapshot(broker: &Broker) -> (pb::DescribeSessionsResponse, pb::DescribeServersResponse) {
    let mut sessions = broker
        .sessions()
        .await
        .describe_sessions(pb::DescribeSessionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    sessions.request_id.clear();
    let mut servers = broker
        .servers()
        .await
        .describe_servers(pb::DescribeServersRequest::default())
        .await
        .unwrap()
        .into_inner();
    servers.request_id.clear();
    (sessions, servers)
}

fn affected(id: &str, before: bool, after: bool, sessions: &[(&str, &str)]) -> pb::AffectedServer {
    pb::AffectedServer {
        server_id: id.into(),
        available_before: before,
        available_after: after,
        sessions: sessions
            .iter()
            .map(|(id, owner)| pb::AffectedSession {
                id: id.to_string(),
                owner: owner.to_string(),
                r#type: Ty::Virtual as i32,
            })
            .collect(),
    }
}

fn pool(key: &str, value: &str, before: i32, after: i32) -> pb::PoolCapacity {
    pb::PoolCapacity {
        tag_key: key.into(),
        tag_value: value.into(),
        available_before: before,
        available_after: after,
    }
}

/// The next instruction must update `session`'s permissions.
async fn expect_permissions(agent: &mut TestAgent, session: &str) {
    match agent.next().await {
        Instr::UpdatePermissions(u) => assert_eq!(u.session_id, session),
        other => panic!("{}: expected UpdatePermissions, got {other:?}", agent.id),
    }
}

/// The next instruction must delete `session`.
async fn expect_delete(agent: &mut TestAgent, session: &str) {
    match agent.next().await {
        Instr::DeleteSession(d) => assert_eq!(d.session_id, session),
        other => panic!("{}: expected DeleteSession, got {other:?}", agent.id),
    }
}

#[tokio::test]
async fn a_dry_run_changes_nothing_reports_the_blast_radius_and_matches_the_real_call() {
    let (broker, mut submitted) = recorded_broker().await;
    // gpu: g1 full with one session, g2 full with two. cpu: c1 closed
    // with one session, c2 empty and AVAILABLE. w1: no pool tag, full.
    let mut g1 = TestAgent::connect(&broker, pooled("g1", "gpu", 1)).await;
    let mut g2 = TestAgent::connect(&broker, pooled("g2", "gpu", 2)).await;
    let mut c1 = TestAgent::connect(&broker, pooled("c1", "cpu", 4)).await;
    let mut c2 = TestAgent::connect(&broker, pooled("c2", "cpu", 4)).await;
    let mut w1 = TestAgent::connect(&broker, pooled("w1", "", 1)).await;
    g1.beat(vec![running("a1", "alice", Ty::Virtual)]).await;
    g2.beat(vec![
        running("b1", "bob", Ty::Virtual),
        running("b2", "carol", Ty::Virtual),
    ])
    .await;
    c1.beat(vec![running("c", "dave", Ty::Virtual)]).await;
    c2.beat(vec![running("old", "olga", Ty::Virtual)]).await;
    w1.beat(vec![running("e", "erin", Ty::Virtual)]).await;
    let mut servers = broker.servers().await;
    let closed = servers
        .close_servers(close_req(vec![close_item("c1", Some(true), "patching")]))
        .await
        .unwrap()
        .into_inner();
    assert!(closed.unsuccessful_list.is_empty(), "{closed:?}");
    // `old` was deleted before: deleting it again succeeds and does nothing.
    let mut sessions = broker.sessions().await;
    sessions
        .delete_sessions(delete_req(vec![del("old", "olga", true)], false))
        .await
        .unwrap();
    c2.beat(vec![]).await;

    let items = vec![
        del("b1", "bob", true),
        del("a1", "alice", false),
        del("b2", "carol", false),
        del("c", "dave", false),
        del("a1", "alice", false),
        del("e", "mallory", false),
        del("nope", "alice", false),
        del("old", "olga", false),
        del("", "alice", false),
    ];
    let before = snapshot(&broker).await;
    drain(&mut submitted);

    let dry = sessions
        .delete_sessions(delete_req(items.clone(), true))
        .await
        .unwrap()
        .into_inner();

    // Nothing changed, nothing was written or audited.
    assert_eq!(snapshot(&broker).await, before);
    let written = drain(&mut submitted);
    assert!(written.is_empty(), "a dry run submitted {written:?}");
    // No agent was told anything: the next instruction each receives is
    // one sent after the dry run.
    for (agent, session, owner) in [
        (&mut g1, "a1", "alice"),
        (&mut g2, "b2", "carol"),
        (&mut c1, "c", "dave"),
    ] {
        let r = sessions
            .update_session_permissions(pb::UpdateSessionPermissionsRequest {
                sessions: vec![pb::UpdateSessionPermissionsRequestData {
                    session_id: session.into(),
                    owner: owner.into(),
                    permissions_file: "W3Blcm1pc3Npb25zXQ==".into(),
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.unsuccessful_list.is_empty(), "{r:?}");
        expect_permissions(agent, session).await;
    }
    drain(&mut submitted);

    // Per item, as the real call will say.
    assert_eq!(dry.dry_run, Some(true));
    let ok: Vec<_> = dry
        .successful_list
        .iter()
        .map(|s| (s.session_id.as_str(), St::try_from(s.state).unwrap()))
        .collect();
    assert_eq!(
        ok,
        [
            ("b1", St::Deleted),
            ("a1", St::Deleting),
            ("b2", St::Deleting),
            ("c", St::Deleting),
            ("old", St::Deleted),
        ]
    );
    let failed: Vec<_> = dry
        .unsuccessful_list
        .iter()
        .map(|f| {
            (
                f.session_id.as_str(),
                FailureCode::try_from(f.failure_code).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        failed,
        [
            ("a1", FailureCode::DuplicateSessionId),
            ("e", FailureCode::SessionNotFound),
            ("nope", FailureCode::SessionNotFound),
            ("", FailureCode::InvalidSessionParameter),
        ]
    );

    // The servers in order of first appearance, with the sessions that
    // would go; capacity as if they were gone.
    let radius = dry.blast_radius.clone().expect("a dry run's blast radius");
    assert_eq!(
        radius.servers,
        [
            affected("g2", false, true, &[("b1", "bob"), ("b2", "carol")]),
            affected("g1", false, true, &[("a1", "alice")]),
            // Closed: its session going does not make it AVAILABLE.
            affected("c1", false, false, &[("c", "dave")]),
        ]
    );
    assert_eq!(
        radius.pools,
        [
            pool("pool", "", 0, 0),
            pool("pool", "cpu", 1, 1),
            pool("pool", "gpu", 0, 2),
        ]
    );
    assert_eq!(radius.overall, Some(pool("", "", 1, 3)));

    // The real call: the same per-item results, and it does act.
    let real = sessions
        .delete_sessions(delete_req(items, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&real), outcome(&dry));
    assert_eq!(real.dry_run, None);
    assert_eq!(real.blast_radius, None);
    assert_ne!(snapshot(&broker).await, before);
    let written = drain(&mut submitted);
    assert!(
        written.iter().any(|c| matches!(c, Change::PutAudit(_))),
        "the real call is audited: {written:?}"
    );
    assert!(
        written.iter().any(|c| !matches!(c, Change::PutAudit(_))),
        "the real call is stored: {written:?}"
    );
    expect_delete(&mut g1, "a1").await;
    expect_delete(&mut g2, "b2").await;
    expect_delete(&mut c1, "c").await;
    g1.report("a1", Kind::DeleteSession, true, St::Deleted)
        .await;
}

/// A forced deletion frees room a queued request could take; the same
/// batch deleting that request deletes it from the queue, in the dry run
/// and for real alike: the room goes to the queue only once the batch is
/// applied, so the request is never placed and then asked to go.
#[tokio::test]
async fn a_queued_request_deleted_in_the_batch_that_frees_its_room_is_never_placed() {
    let (broker, _submitted) = recorded_broker().await;
    let mut w = TestAgent::connect(&broker, pooled("w", "", 1)).await;
    w.beat(vec![running("run", "alice", Ty::Virtual)]).await;
    let mut sessions = broker.sessions().await;
    let mut item = create_item("q", "quinn", Ty::Virtual);
    item.enqueue_request = true;
    let r = sessions
        .create_sessions(create_req(vec![item]))
        .await
        .unwrap()
        .into_inner();
    let queued = r.successful_list[0].id.clone();
    assert!(r.successful_list[0].server.is_none(), "the server is full");

    let items = vec![del("run", "alice", true), del(&queued, "quinn", false)];
    let dry = sessions
        .delete_sessions(delete_req(items.clone(), true))
        .await
        .unwrap()
        .into_inner();
    let states: Vec<_> = dry.successful_list.iter().map(|s| s.state).collect();
    assert_eq!(states, [St::Deleted as i32, St::Deleted as i32]);
    // The queued request is on no server: only its item names it.
    let radius = dry.blast_radius.clone().unwrap();
    assert_eq!(
        radius.servers,
        [affected("w", false, true, &[("run", "alice")])]
    );
    assert_eq!(radius.pools, [pool("pool", "", 0, 1)]);
    assert_eq!(radius.overall, Some(pool("", "", 0, 1)));
    assert_eq!(broker.fleet.queued(), 1);

    let real = sessions
        .delete_sessions(delete_req(items, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&real), outcome(&dry));
    assert_eq!(broker.fleet.queued(), 0);
    let q = describe_session(&mut sessions, &queued).await;
    assert_eq!(St::try_from(q.state).unwrap(), St::Deleted);
    assert!(q.server.is_none());
    // The first creation the agent is asked for is a later request's.
    let r = sessions
        .create_sessions(create_req(vec![create_item("later", "lee", Ty::Virtual)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.next_create().await.session_id, r.successful_list[0].id);
}

#[tokio::test]
async fn a_dry_run_refuses_what_the_real_call_refuses_and_an_overlong_tag_key() {
    let broker = Broker::quiet().await;
    let mut sessions = broker.sessions().await;
    for dry_run in [false, true] {
        let err = sessions
            .delete_sessions(delete_req(Vec::new(), dry_run))
            .await
            .unwrap_err();
        assert_eq!(violations(&err)[0].0, "Sessions");
    }
    let err = sessions
        .delete_sessions(pb::DeleteSessionsRequest {
            sessions: vec![del("s", "alice", false)],
            dry_run: true,
            capacity_tag_key: "k".repeat(1025),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "CapacityTagKey");
}
