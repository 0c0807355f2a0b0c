//! Drains (acceptance 3 of issue 19): DrainServers closes servers and
//! DescribeDrains follows them until their sessions end (a simulated
//! agent ends them); a drain past its deadline reports or deletes as
//! asked; a restart mid-drain continues it; the malformed requests it
//! refuses, the servers it refuses, and what the audit log says.
//!
//! Real brokers on 127.0.0.1:0 over a SQLite store in a temporary
//! directory, called by tonic clients. No sleeps: deadlines pass on
//! tokio's paused clock.

mod common;

use std::{sync::Arc, time::Duration};

use common::{agent_process::TempDir, *};
use dcv_broker::{
    BrokerConfig,
    fleet::{Fleet, FleetConfig, persist::Store},
    pb,
    store::SqliteStore,
};
use tonic::{Code, transport::Channel};

type Servers = pb::servers_client::ServersClient<Channel>;

/// A broker over the SQLite store in `dir`, as a restart finds it.
async fn durable_broker(dir: &std::path::Path) -> Broker {
    let fleet = FleetConfig {
        // Agents that fall silent on a paused clock must not turn the
        // picture: only the deadline moves here.
        unreachable_after: Duration::from_secs(24 * 3600),
        remove_after: Duration::from_secs(48 * 3600),
        ..Default::default()
    };
    let (sqlite, snapshot) = SqliteStore::open(dir).unwrap();
    let store: Arc<dyn Store> = Arc::new(sqlite);
    let config = BrokerConfig {
        fleet,
        ..quiet_config()
    };
    let fleet = Fleet::restore(config.fleet.clone(), store, snapshot).unwrap();
    Broker::start_with(config, fleet).await
}

async fn stop(mut broker: Broker) {
    broker.stop();
    (&mut broker.task).await.unwrap().unwrap();
}

fn drain_req(ids: &[&str], reason: &str) -> pb::DrainServersRequest {
    pb::DrainServersRequest {
        servers: ids
            .iter()
            .map(|id| pb::DrainServerRequestData {
                server_id: (*id).into(),
            })
            .collect(),
        reason: reason.into(),
        ..Default::default()
    }
}

fn within(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

async fn drain(
    servers: &mut Servers,
    request: pb::DrainServersRequest,
) -> pb::DrainServersResponse {
    servers.drain_servers(request).await.unwrap().into_inner()
}

/// The one drain `id`, as DescribeDrains shows it.
async fn describe_drain(servers: &mut Servers, id: &str) -> Option<pb::Drain> {
    let page = servers
        .describe_drains(pb::DescribeDrainsRequest {
            drain_ids: vec![id.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!page.request_id.is_empty());
    assert!(page.drains.len() <= 1);
    page.drains.into_iter().next()
}

/// Each server of `drain` with its sessions left.
fn progress(drain: &pb::Drain) -> Vec<(&str, i32)> {
    drain
        .servers
        .iter()
        .map(|s| (s.server_id.as_str(), s.sessions_left))
        .collect()
}

fn virtual_session(id: &str) -> pb::AgentSession {
    session(id, pb::SessionType::Virtual, pb::SessionState::Ready)
}

async fn history_methods(servers: &mut Servers, id: &str) -> Vec<pb::HistoryRecord> {
    servers
        .describe_server_history(pb::DescribeServerHistoryRequest {
            server_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records
}

#[tokio::test]
async fn a_drain_ends_when_the_last_session_ends_and_survives_a_restart() {
    let dir = TempDir::new("drain-ends");
    let broker = durable_broker(dir.path()).await;
    let mut agent = broker.agent().await;
    let mut servers = broker.servers().await;
    for id in ["d1", "d2", "d3", "other"] {
        register(&mut agent, id, "linux", 4).await;
    }
    // What the simulated agents run: two sessions on d1, one on d2.
    agent
        .heartbeat(beat(
            "d1",
            vec![virtual_session("s-a"), virtual_session("s-b")],
        ))
        .await
        .unwrap();
    agent
        .heartbeat(beat("d2", vec![virtual_session("s-c")]))
        .await
        .unwrap();

    let reply = drain(
        &mut servers,
        drain_req(&["d1", "d2", "d3", "nope", "d1"], "kernel 6.8"),
    )
    .await;
    assert!(!reply.request_id.is_empty());
    let id = reply.drain_id.clone();
    assert!(uuid::Uuid::try_parse(&id).is_ok(), "{reply:?}");
    let ok: Vec<&str> = reply
        .successful_list
        .iter()
        .map(|s| s.server_id.as_str())
        .collect();
    assert_eq!(ok, ["d1", "d2", "d3"]);
    let failed: Vec<(&str, i32)> = reply
        .unsuccessful_list
        .iter()
        .map(|f| {
            (
                f.drain_server_request_data
                    .as_ref()
                    .unwrap()
                    .server_id
                    .as_str(),
                f.failure_code,
            )
        })
        .collect();
    assert_eq!(
        failed,
        [
            ("nope", pb::FailureCode::DcvServerNotFound as i32),
            ("d1", pb::FailureCode::DuplicateServerId as i32)
        ]
    );

    // Closed with a hold that names the drain, like a forced close.
    let d1 = describe_one(&mut servers, "d1").await;
    assert_eq!(d1.availability, pb::Availability::Unavailable as i32);
    assert_eq!(reasons(&d1), [pb::UnavailabilityReason::ServerClosed]);
    assert_eq!(d1.holds.len(), 1);
    assert_eq!(d1.holds[0].name, "drain");
    assert_eq!(d1.holds[0].drain_id, id);
    assert_eq!(d1.holds[0].reason, "kernel 6.8");
    let open = describe_one(&mut servers, "other").await;
    assert!(open.holds.is_empty());

    let shown = describe_drain(&mut servers, &id).await.unwrap();
    assert_eq!(shown.state, pb::DrainState::Draining as i32);
    assert_eq!(shown.hold_name, "drain");
    assert_eq!(shown.actor, "anonymous");
    assert_eq!(shown.reason, "kernel 6.8");
    assert!(shown.start_time.is_some());
    assert!(shown.deadline.is_none());
    assert_eq!(progress(&shown), [("d1", 2), ("d2", 1), ("d3", 0)]);
    assert_eq!((shown.sessions_left, shown.busy_servers), (3, 2));

    // A server in a drain cannot join another under the same hold name.
    let again = drain(&mut servers, drain_req(&["d3", "other"], "again")).await;
    assert_eq!(again.successful_list.len(), 1, "{again:?}");
    let refused = &again.unsuccessful_list[0];
    assert_eq!(
        refused.failure_code,
        pb::FailureCode::AlreadyDraining as i32
    );
    assert!(refused.failure_reason.contains(&id), "{refused:?}");

    // d2's session ends; then the broker restarts mid-drain.
    agent.heartbeat(beat("d2", vec![])).await.unwrap();
    let shown = describe_drain(&mut servers, &id).await.unwrap();
    assert_eq!(progress(&shown), [("d1", 2), ("d2", 0), ("d3", 0)]);
    drop((agent, servers));
    stop(broker).await;

    let broker = durable_broker(dir.path()).await;
    let mut agent = broker.agent().await;
    let mut servers = broker.servers().await;
    let shown = describe_drain(&mut servers, &id).await.unwrap();
    assert_eq!(shown.state, pb::DrainState::Draining as i32);
    assert_eq!(progress(&shown), [("d1", 2), ("d2", 0), ("d3", 0)]);
    assert_eq!(shown.reason, "kernel 6.8");
    // The agents come back and report what still runs.
    agent
        .register_server(registration("d1", "linux", 4))
        .await
        .unwrap();
    agent
        .heartbeat(beat("d1", vec![virtual_session("s-b")]))
        .await
        .unwrap();
    let shown = describe_drain(&mut servers, &id).await.unwrap();
    assert_eq!((shown.sessions_left, shown.busy_servers), (1, 1));
    assert_eq!(shown.state, pb::DrainState::Draining as i32);
    // The last session ends: the drain is done, the servers stay closed.
    agent.heartbeat(beat("d1", vec![])).await.unwrap();
    let shown = describe_drain(&mut servers, &id).await.unwrap();
    assert_eq!(shown.state, pb::DrainState::Drained as i32);
    assert_eq!((shown.sessions_left, shown.busy_servers), (0, 0));
    assert_eq!(
        describe_one(&mut servers, "d1").await.availability,
        pb::Availability::Unavailable as i32
    );

    // Opening a server with the drain's hold name takes it out of the
    // drain; the drain ends with its last hold.
    let opened = servers
        .open_servers(pb::OpenServersRequest {
            servers: ["d1", "d2", "d3"]
                .iter()
                .map(|id| pb::OpenServerRequestData {
                    server_id: (*id).into(),
                    hold_name: Some("drain".into()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.successful_list.len(), 3, "{opened:?}");
    assert!(describe_drain(&mut servers, &id).await.is_none());

    // The history says who drained d1, when and why, naming the drain.
    let records = history_methods(&mut servers, "d1").await;
    let drained = records
        .iter()
        .find(|r| r.method == "DrainServers")
        .expect("the drain is in d1's history");
    assert_eq!(drained.actor, "anonymous");
    assert_eq!(
        drained.items[0].reason,
        format!("drain {id}: kernel 6.8"),
        "{drained:?}"
    );
    drop((agent, servers));
    stop(broker).await;
}

#[tokio::test(start_paused = true)]
async fn a_drain_past_its_deadline_reports_or_deletes_as_asked_even_after_a_restart() {
    let dir = TempDir::new("drain-deadline");
    let broker = durable_broker(dir.path()).await;
    let mut agent = broker.agent().await;
    let mut servers = broker.servers().await;
    register(&mut agent, "r1", "linux", 4).await;
    agent
        .heartbeat(beat("r1", vec![virtual_session("s-r")]))
        .await
        .unwrap();
    let mut deleting = TestAgent::connect(&broker, registration("x1", "linux", 4)).await;
    deleting
        .beat(vec![virtual_session("s-x"), virtual_session("s-y")])
        .await;

    let report = drain(
        &mut servers,
        pb::DrainServersRequest {
            deadline_in: within(600),
            ..drain_req(&["r1"], "")
        },
    )
    .await;
    let delete = drain(
        &mut servers,
        pb::DrainServersRequest {
            deadline_in: within(600),
            on_deadline: pb::OnDeadline::DeleteSessions as i32,
            hold_name: Some("retire".into()),
            ..drain_req(&["x1"], "retiring")
        },
    )
    .await;
    let (report, delete) = (report.drain_id, delete.drain_id);
    let shown = describe_drain(&mut servers, &report).await.unwrap();
    assert_eq!(shown.state, pb::DrainState::Draining as i32);
    assert_eq!(shown.on_deadline, pb::OnDeadline::Report as i32);
    assert!(shown.deadline.is_some());
    let shown = describe_drain(&mut servers, &delete).await.unwrap();
    assert_eq!(shown.hold_name, "retire");
    assert_eq!(shown.on_deadline, pb::OnDeadline::DeleteSessions as i32);

    // A restart mid-drain keeps the deadlines.
    drop((agent, servers, deleting));
    stop(broker).await;
    let broker = durable_broker(dir.path()).await;
    let mut servers = broker.servers().await;
    let mut deleting = TestAgent::connect(&broker, registration("x1", "linux", 4)).await;
    tokio::time::advance(Duration::from_secs(700)).await;

    // REPORT: the drain says the deadline passed, with what is left.
    let shown = describe_drain(&mut servers, &report).await.unwrap();
    assert_eq!(shown.state, pb::DrainState::DeadlinePassed as i32);
    assert_eq!(progress(&shown), [("r1", 1)]);
    // DELETE_SESSIONS: the agent is asked to delete each session left.
    let mut asked = Vec::new();
    for _ in 0..2 {
        match deleting.next().await {
            Instr::DeleteSession(d) => asked.push(d.session_id),
            other => panic!("expected DeleteSession, got {other:?}"),
        }
    }
    asked.sort();
    assert_eq!(asked, ["s-x", "s-y"]);
    let shown = describe_drain(&mut servers, &delete).await.unwrap();
    assert_eq!(shown.state, pb::DrainState::DeadlinePassed as i32);
    for id in ["s-x", "s-y"] {
        deleting
            .report(
                id,
                pb::InstructionKind::DeleteSession,
                true,
                pb::SessionState::Deleted,
            )
            .await;
    }
    deleting.beat(vec![]).await;
    let shown = describe_drain(&mut servers, &delete).await.unwrap();
    assert_eq!(shown.state, pb::DrainState::Drained as i32, "{shown:?}");
    // The REPORT drain deleted nothing.
    let r1 = describe_one(&mut servers, "r1").await;
    assert_eq!(r1.virtual_session_count, 1);

    // The audit log has the broker's act at each deadline.
    let records = history_methods(&mut servers, "r1").await;
    let at_deadline = records
        .iter()
        .find(|r| r.method == "DrainDeadline")
        .expect("REPORT is recorded");
    assert_eq!(at_deadline.actor, "broker");
    assert_eq!(at_deadline.items[0].outcome, "SESSIONS_REMAIN");
    let records = history_methods(&mut servers, "s-x").await;
    let at_deadline = records
        .iter()
        .find(|r| r.method == "DrainDeadline")
        .expect("the deletion is recorded");
    assert_eq!(at_deadline.items[0].outcome, "OK");
    assert!(at_deadline.items[0].reason.contains(&delete));
    drop((servers, deleting));
    stop(broker).await;
}

#[tokio::test]
async fn malformed_drains_are_refused_whole() {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    let mut servers = broker.servers().await;
    register(&mut agent, "m1", "linux", 2).await;
    let refused = async |servers: &mut Servers, request: pb::DrainServersRequest| {
        let status = servers.drain_servers(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        violations(&status)
            .into_iter()
            .map(|(field, _)| field)
            .collect::<Vec<_>>()
    };
    assert_eq!(refused(&mut servers, drain_req(&[], "")).await, ["Servers"]);
    let many: Vec<String> = (0..1001).map(|i| format!("s{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(
        refused(&mut servers, drain_req(&many, "")).await,
        ["Servers"]
    );
    assert_eq!(
        refused(&mut servers, drain_req(&["m1"], "bad\u{202e}reason")).await,
        ["Reason"]
    );
    assert_eq!(
        refused(
            &mut servers,
            pb::DrainServersRequest {
                hold_name: Some("no spaces".into()),
                ..drain_req(&["m1"], "")
            }
        )
        .await,
        ["HoldName"]
    );
    for (deadline, deadline_in, field) in [
        (None, within(0), "DeadlineIn"),
        (None, within(-5), "DeadlineIn"),
        (None, within(400 * 86_400), "DeadlineIn"),
        (
            Some(prost_types::Timestamp {
                seconds: 1_000_000_000,
                nanos: 0,
            }),
            None,
            "Deadline",
        ),
        (
            Some(prost_types::Timestamp {
                seconds: 4_000_000_000,
                nanos: 0,
            }),
            within(60),
            "DeadlineIn",
        ),
        (
            Some(prost_types::Timestamp {
                seconds: 4_000_000_000,
                nanos: -1,
            }),
            None,
            "Deadline",
        ),
    ] {
        assert_eq!(
            refused(
                &mut servers,
                pb::DrainServersRequest {
                    deadline,
                    deadline_in,
                    ..drain_req(&["m1"], "")
                }
            )
            .await,
            [field]
        );
    }
    assert_eq!(
        refused(
            &mut servers,
            pb::DrainServersRequest {
                on_deadline: 7,
                ..drain_req(&["m1"], "")
            }
        )
        .await,
        ["OnDeadline"]
    );
    // Nothing was applied by any of them.
    assert!(describe_one(&mut servers, "m1").await.holds.is_empty());

    // Items that all fail make no drain.
    let none = drain(&mut servers, drain_req(&["ghost", ""], "")).await;
    assert!(none.drain_id.is_empty(), "{none:?}");
    assert_eq!(none.unsuccessful_list.len(), 2);
    assert_eq!(
        none.unsuccessful_list[1].failure_code,
        pb::FailureCode::InvalidServerId as i32
    );

    // DescribeDrains refuses ids that are not drain ids, page sizes out of
    // range and forged tokens.
    for (request, field) in [
        (
            pb::DescribeDrainsRequest {
                drain_ids: vec!["not-a-uuid".into()],
                ..Default::default()
            },
            "DrainIds[0]",
        ),
        (
            pb::DescribeDrainsRequest {
                max_results: Some(101),
                ..Default::default()
            },
            "MaxResults",
        ),
        (
            pb::DescribeDrainsRequest {
                next_token: "forged".into(),
                ..Default::default()
            },
            "NextToken",
        ),
    ] {
        let status = servers.describe_drains(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(violations(&status)[0].0, field);
    }
}

#[tokio::test]
async fn drains_page_in_id_order_and_a_token_binds_its_query() {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    let mut servers = broker.servers().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let server = format!("p{i}");
        register(&mut agent, &server, "linux", 2).await;
        ids.push(
            drain(&mut servers, drain_req(&[&server], ""))
                .await
                .drain_id,
        );
    }
    ids.sort();
    let mut seen = Vec::new();
    let mut next_token = String::new();
    let mut pages = 0;
    loop {
        let page = servers
            .describe_drains(pb::DescribeDrainsRequest {
                max_results: Some(3),
                next_token: next_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.drains.len() <= 3);
        seen.extend(page.drains.into_iter().map(|d| d.drain_id));
        if page.next_token.is_empty() {
            break;
        }
        next_token = page.next_token;
    }
    assert_eq!(seen, ids);
    assert_eq!(pages, 3);

    // A token is bound to its DrainIds.
    let first = servers
        .describe_drains(pb::DescribeDrainsRequest {
            drain_ids: ids[..2].to_vec(),
            max_results: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.drains[0].drain_id, ids[0]);
    let mismatched = servers
        .describe_drains(pb::DescribeDrainsRequest {
            next_token: first.next_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(mismatched.code(), Code::InvalidArgument);
    let second = servers
        .describe_drains(pb::DescribeDrainsRequest {
            drain_ids: ids[..2].to_vec(),
            next_token: first.next_token,
            max_results: Some(1),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.drains[0].drain_id, ids[1]);
    assert!(second.next_token.is_empty());
}

#[tokio::test]
async fn a_drains_progress_shows_on_the_watch_stream() {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    let mut servers = broker.servers().await;
    register(&mut agent, "w1", "linux", 4).await;
    agent
        .heartbeat(beat("w1", vec![virtual_session("s-1")]))
        .await
        .unwrap();
    let mut stream = servers
        .watch_servers(pb::WatchServersRequest {
            filters: vec![pb::KeyValuePair {
                key: "closed".into(),
                value: "true".into(),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let snapshot = stream.message().await.unwrap().unwrap();
    assert!(snapshot.snapshot_end && snapshot.servers.is_empty());
    let id = drain(&mut servers, drain_req(&["w1"], "")).await.drain_id;
    agent.heartbeat(beat("w1", vec![])).await.unwrap();
    let mut changes = Vec::new();
    while changes.len() < 2 {
        let message = stream.message().await.unwrap().unwrap();
        changes.extend(message.changes);
    }
    assert_eq!(changes[0].r#type, pb::ChangeType::Added as i32);
    let added = changes[0].server.as_ref().unwrap();
    assert_eq!(added.holds[0].drain_id, id);
    assert_eq!(added.virtual_session_count, 1);
    assert_eq!(changes[1].r#type, pb::ChangeType::Modified as i32);
    assert_eq!(changes[1].server.as_ref().unwrap().virtual_session_count, 0);
}
