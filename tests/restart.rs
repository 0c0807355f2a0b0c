//! A restart recovers exactly what was stored: a fleet driven through every
//! kind of change (registrations, closes and opens with reasons, placed,
//! queued, adopted, failed and deleted sessions), then reloaded from its
//! SQLite store, describes the same servers and sessions, and its queue
//! and occupancy behave as before.

use std::sync::Arc;

use dcv_broker::{
    demo,
    fleet::{
        CloseItem, CreateSpec, DeleteItem, DescribeQuery, Fleet, FleetConfig, Heartbeat,
        InstructionKind, InstructionOutcome, OpenItem, ReportedSession, SessionKind, SessionQuery,
        SessionState,
    },
    store::SqliteStore,
};

/// What must be the same after a restart: everything but what heartbeats
/// alone keep up to date (the last heartbeat time, load, health, users).
/// Occupancy is compared by session, not by how it is held: a session the
/// agent confirmed but never reported comes back as a reported one.
fn servers_of(fleet: &Fleet) -> Vec<String> {
    let mut out = Vec::new();
    fleet
        .describe_servers(&DescribeQuery::default(), |v| {
            let r = v.record;
            out.push(format!(
                "{} {:?} {:?} reg={:?} departed={} sessions={:?} description={:?}",
                r.id,
                r.holds,
                r.session_counts(),
                r.registered_at,
                r.agent_departed,
                {
                    let mut ids: Vec<_> = r.live_sessions().map(|s| s.id.to_string()).collect();
                    ids.sort();
                    ids
                },
                r.description.tags,
            ));
        })
        .unwrap();
    out
}

fn sessions_of(fleet: &Fleet) -> Vec<String> {
    let mut out = Vec::new();
    fleet
        .describe_sessions(&SessionQuery::default(), |v| {
            let r = v.record;
            out.push(format!(
                "{} {} {} {:?} {:?} {:?} {:?} {:?} {:?} {:?} tried={:?} forgotten={} q={:?} order={:?}",
                r.id,
                r.name,
                r.owner,
                r.kind,
                r.server,
                r.state,
                r.substate,
                r.state_reason,
                r.created_at,
                r.permissions_file,
                r.tried,
                r.forgotten,
                r.queue_position,
                r.order.as_ref().map(|o| o.to_spec()),
            ));
        })
        .unwrap();
    out
}

fn open(dir: &std::path::Path) -> Fleet {
    let (store, snapshot) = SqliteStore::open(dir).unwrap();
    Fleet::restore(FleetConfig::default(), Arc::new(store), snapshot).unwrap()
}

/// A creation request; each owner its own, since demo servers allow one
/// session per user.
fn spec(name: &str, kind: SessionKind, requirements: &str, enqueue: bool) -> CreateSpec {
    CreateSpec {
        name: name.into(),
        owner: format!("owner-of-{name}"),
        kind: Some(kind),
        requirements: requirements.into(),
        enqueue,
        max_concurrent_clients: Some(5),
        ..CreateSpec::default()
    }
}

#[tokio::test]
async fn a_reloaded_fleet_is_the_fleet_that_was_stored() {
    let dir = std::env::temp_dir().join(format!("dcv-restart-{}", uuid::Uuid::new_v4()));
    let (servers_before, sessions_before) = {
        let fleet = open(&dir);
        for i in 0..6 {
            fleet
                .register(&demo::server_id(i), demo::description(i))
                .await
                .unwrap();
        }
        // A closed server, a reopened one, a departed closed one.
        let close = |id: usize, reason: &str| CloseItem {
            server_id: demo::server_id(id),
            force: true,
            reason: reason.into(),
            ..Default::default()
        };
        fleet
            .close_servers(
                &[close(1, "patch"), close(2, "swap"), close(3, "gone")],
                "ops",
            )
            .await
            .unwrap();
        fleet
            .open_servers(&[OpenItem {
                server_id: demo::server_id(2),
                ..Default::default()
            }])
            .await
            .unwrap();
        assert!(!fleet.deregister(&demo::server_id(3)).await.unwrap());
        // An adopted session on serverId1 (Linux).
        fleet
            .heartbeat(
                "serverId1",
                Heartbeat {
                    dcv_server_healthy: true,
                    sessions: vec![ReportedSession {
                        id: "by-hand".into(),
                        owner: "root".into(),
                        kind: SessionKind::Virtual,
                        state: SessionState::Ready,
                        details: Default::default(),
                    }],
                    ..Heartbeat::default()
                },
            )
            .unwrap();
        // Placed (in flight), created and READY, queued, failed, deleted.
        let results = fleet
            .create_sessions(
                &[
                    spec(
                        "in-flight",
                        SessionKind::Virtual,
                        "server:Id = 'serverId1'",
                        false,
                    ),
                    spec(
                        "ready",
                        SessionKind::Virtual,
                        "server:Id = 'serverId1'",
                        false,
                    ),
                    spec("queued", SessionKind::Virtual, "tag:nowhere = 'x'", true),
                    spec("queued-2", SessionKind::Console, "tag:nowhere = 'y'", true),
                    spec(
                        "doomed",
                        SessionKind::Virtual,
                        "server:Id = 'serverId1'",
                        false,
                    ),
                ],
                |_, _| {},
            )
            .await
            .unwrap();
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let mut ids = Vec::new();
        fleet
            .describe_sessions(&SessionQuery::default(), |v| {
                ids.push((v.record.name.clone(), v.record.id.to_string()))
            })
            .unwrap();
        let id = |name: &str| ids.iter().find(|(n, _)| n == name).unwrap().1.clone();
        fleet
            .report_instruction(
                "serverId1",
                &id("ready"),
                InstructionKind::Create,
                InstructionOutcome::Done { ready: true },
            )
            .unwrap();
        fleet
            .report_instruction(
                "serverId1",
                &id("doomed"),
                InstructionKind::Create,
                InstructionOutcome::Failed("no such user".into()),
            )
            .unwrap();
        fleet
            .delete_sessions(&[DeleteItem {
                session_id: id("queued-2"),
                owner: "owner-of-queued-2".into(),
                force: false,
            }])
            .await
            .unwrap();
        let state = (servers_of(&fleet), sessions_of(&fleet));
        // The last (unawaited) changes reach the store before it closes.
        drop(fleet);
        state
    };

    let fleet = open(&dir);
    assert_eq!(servers_of(&fleet), servers_before);
    assert_eq!(sessions_of(&fleet), sessions_before);
    assert_eq!(fleet.queued(), 1, "the queued session waits again");

    // The restored queue still works: a server that can take it appears.
    let mut description = demo::description(0);
    description.tags.push(dcv_broker::fleet::Tag {
        key: "nowhere".into(),
        value: "x".into(),
    });
    fleet.register("late", description).await.unwrap();
    assert_eq!(fleet.queued(), 0);
    drop(fleet);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Page tokens and connection tokens issued before a restart still work
/// after it: their keys are stored, not drawn per process.
#[tokio::test]
async fn tokens_issued_before_a_restart_still_work_after_it() {
    let dir = std::env::temp_dir().join(format!("dcv-restart-keys-{}", uuid::Uuid::new_v4()));
    let first_page = DescribeQuery {
        max_results: Some(1),
        ..DescribeQuery::default()
    };
    let (next_token, connection_token, second_page) = {
        let fleet = open(&dir);
        for i in 0..3 {
            fleet
                .register(&demo::server_id(i), demo::description(i))
                .await
                .unwrap();
        }
        fleet
            .heartbeat(
                "serverId1",
                Heartbeat {
                    dcv_server_healthy: true,
                    sessions: vec![ReportedSession {
                        id: "by-hand".into(),
                        owner: "root".into(),
                        kind: SessionKind::Virtual,
                        state: SessionState::Ready,
                        details: Default::default(),
                    }],
                    ..Heartbeat::default()
                },
            )
            .unwrap();
        let connection_token = fleet.connection_data("by-hand", "alice", |_| {}).unwrap();
        let next = fleet
            .describe_servers(&first_page, |_| {})
            .unwrap()
            .expect("three servers, one per page");
        let mut second = Vec::new();
        fleet
            .describe_servers(
                &DescribeQuery {
                    next_token: next.clone(),
                    ..first_page.clone()
                },
                |v| second.push(v.record.id.to_string()),
            )
            .unwrap();
        (next, connection_token, second)
    };
    let fleet = open(&dir);
    let mut again = Vec::new();
    fleet
        .describe_servers(
            &DescribeQuery {
                next_token,
                ..first_page
            },
            |v| again.push(v.record.id.to_string()),
        )
        .expect("the page token survives the restart");
    assert_eq!(again, second_page);
    assert_eq!(
        fleet
            .validate_connection_token("serverId1", "by-hand", &connection_token)
            .unwrap(),
        Ok("alice".to_owned())
    );
    let _ = std::fs::remove_dir_all(&dir);
}
