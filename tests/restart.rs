//! A restart recovers exactly what was stored: a fleet driven through every
//! kind of change (registrations, closes and opens with reasons, placed,
//! queued, adopted, failed and deleted sessions), then reloaded from its
//! SQLite store, describes the same servers and sessions, and its queue
//! and occupancy behave as before; holds that end by themselves still do,
//! on time.

use std::{sync::Arc, time::Duration};

use dcv_broker::{
    demo,
    fleet::{
        CloseItem, CreateSpec, DeleteItem, DescribeQuery, Expiry, Fleet, FleetConfig, Heartbeat,
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
                "{} {:?} v={} {:?} reg={:?} departed={} sessions={:?} description={:?}",
                r.id,
                r.holds,
                r.state_version,
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
    open_with(dir, FleetConfig::default())
}

fn open_with(dir: &std::path::Path, config: FleetConfig) -> Fleet {
    let (store, snapshot) = SqliteStore::open(dir).unwrap();
    Fleet::restore(config, Arc::new(store), snapshot).unwrap()
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
        // serverId1 also held under a name, until a time.
        let named = CloseItem {
            hold_name: "team:db-7".into(),
            expiry: Expiry::In(Duration::from_secs(3600)),
            ..close(1, "reindex")
        };
        fleet
            .close_servers(
                &[close(1, "patch"), close(2, "swap"), close(3, "gone")],
                "ops",
            )
            .await
            .unwrap();
        let results = fleet.close_servers(&[named], "dba").await.unwrap();
        assert!(results.iter().all(Result::is_ok), "{results:?}");
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

/// Holds that end by themselves still do after a restart, on time by the
/// broker's clock: the expiry is stored, not a timer that dies with the
/// process. The other holds stay.
#[tokio::test(start_paused = true)]
async fn expiring_holds_end_on_time_after_a_restart() {
    let dir = std::env::temp_dir().join(format!("dcv-restart-expiry-{}", uuid::Uuid::new_v4()));
    // Open servers silent this long would be forgotten; not in this test.
    let config = FleetConfig {
        remove_after: Duration::from_secs(24 * 3600),
        ..FleetConfig::default()
    };
    let hour = Duration::from_secs(3600);
    let hold = |id: usize, name: &str, expiry: Expiry| CloseItem {
        server_id: demo::server_id(id),
        force: true,
        reason: format!("{name} reason"),
        hold_name: name.into(),
        expiry,
        ..Default::default()
    };
    let before = {
        let fleet = open_with(&dir, config.clone());
        for i in 0..2 {
            fleet
                .register(&demo::server_id(i), demo::description(i))
                .await
                .unwrap();
        }
        // One hold per server per batch: a batch names each server once.
        for batch in [
            vec![
                hold(0, "maint", Expiry::In(hour)),
                hold(1, "short", Expiry::In(hour)),
            ],
            vec![hold(0, "forever", Expiry::Never)],
        ] {
            let results = fleet.close_servers(&batch, "ops").await.unwrap();
            assert!(results.iter().all(Result::is_ok), "{results:?}");
        }
        servers_of(&fleet)
    };

    let fleet = open_with(&dir, config);
    // The periodic sweep's first run: the broker's clock starts here.
    assert!(fleet.sweep().is_empty());
    assert_eq!(servers_of(&fleet), before);
    tokio::time::advance(hour - Duration::from_secs(60)).await;
    fleet.sweep();
    assert_eq!(servers_of(&fleet), before, "nothing ends early");
    tokio::time::advance(Duration::from_secs(120)).await;
    fleet.sweep();
    let mut holds = Vec::new();
    fleet
        .describe_servers(&DescribeQuery::default(), |v| {
            let names: Vec<String> = v.record.holds.iter().map(|h| h.name.to_string()).collect();
            holds.push((v.record.id.to_string(), names, v.record.is_closed()));
        })
        .unwrap();
    holds.sort();
    assert_eq!(
        holds,
        [
            (demo::server_id(1), Vec::new(), false),
            (demo::server_id(0), vec!["forever".to_owned()], true),
        ],
        "the expiring holds ended; the other stays"
    );
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
