//! WatchSessions (acceptance 1 and 2 of issue 19, for sessions): a
//! watcher that disconnects anywhere and resumes from its last sequence
//! sees exactly what a watcher that never disconnected sees, and both end
//! up with exactly what DescribeSessions shows, field for field (a
//! property over random agent reports, deletions, departures, silences,
//! filters and disconnection points); a session whose agent falls silent
//! turns UNKNOWN on the stream; resuming from another epoch or past the
//! log fails OUT_OF_RANGE; malformed requests are refused.
//!
//! Real brokers on 127.0.0.1:0 called by tonic clients, on tokio's paused
//! clock: a watcher is caught up when its stream sends a PROGRESS mark at
//! or past the broker's last sequence. No sleeps.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use dcv_broker::{
    BrokerConfig,
    fleet::FleetConfig,
    pb::{self, sessions_client::SessionsClient},
};
use proptest::prelude::*;
use tonic::{Code, Streaming, transport::Channel};

const IDS: [&str; 3] = ["q1", "q2", "q3"];
const OWNERS: [&str; 2] = ["alice", "bob"];

fn config(watch_buffer: usize) -> BrokerConfig {
    BrokerConfig {
        fleet: FleetConfig {
            unreachable_after: Duration::from_secs(3600),
            remove_after: Duration::from_secs(4 * 3600),
            watch_buffer,
            ..FleetConfig::default()
        },
        ..quiet_config()
    }
}

fn watch_request(filter: Option<(&str, &str)>) -> pb::WatchSessionsRequest {
    pb::WatchSessionsRequest {
        filters: filter
            .map(|(key, value)| pb::KeyValuePair {
                key: key.into(),
                value: value.into(),
            })
            .into_iter()
            .collect(),
        progress_interval: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// A session watcher's stream and what it has seen.
struct Watcher {
    stream: Streaming<pb::WatchSessionsResponse>,
    epoch: String,
    sequence: u64,
    changes: Vec<pb::SessionChange>,
    view: BTreeMap<String, pb::Session>,
}

impl Watcher {
    async fn open(
        sessions: &mut SessionsClient<Channel>,
        request: pb::WatchSessionsRequest,
    ) -> Watcher {
        let resuming = request.from_sequence.is_some();
        let stream = sessions.watch_sessions(request).await.unwrap().into_inner();
        let mut watcher = Watcher {
            stream,
            epoch: String::new(),
            sequence: 0,
            changes: Vec::new(),
            view: BTreeMap::new(),
        };
        if !resuming {
            loop {
                let m = watcher.message().await;
                assert_eq!(m.r#type(), pb::WatchMessageType::Snapshot, "{m:?}");
                for session in m.sessions {
                    watcher.view.insert(session.id.clone(), session);
                }
                if m.snapshot_end {
                    break;
                }
            }
        }
        watcher
    }

    async fn message(&mut self) -> pb::WatchSessionsResponse {
        let m = self
            .stream
            .message()
            .await
            .unwrap()
            .expect("the stream goes on");
        if !self.epoch.is_empty() {
            assert_eq!(m.epoch, self.epoch, "one epoch per broker");
        }
        self.epoch.clone_from(&m.epoch);
        assert!(m.sequence >= self.sequence, "sequences never go back");
        self.sequence = m.sequence;
        m
    }

    async fn catch_up(&mut self, target: u64) {
        loop {
            let m = self.message().await;
            match m.r#type() {
                pb::WatchMessageType::Progress if m.sequence >= target => return,
                pb::WatchMessageType::Progress => {}
                pb::WatchMessageType::Changes => {
                    for change in m.changes {
                        self.apply(change);
                    }
                }
                other => panic!("{other:?} after the snapshot"),
            }
        }
    }

    fn apply(&mut self, change: pb::SessionChange) {
        if let Some(last) = self.changes.last() {
            assert!(change.sequence > last.sequence, "in order, once each");
        }
        let session = change
            .session
            .clone()
            .expect("every change carries a state");
        assert_eq!(session.id, change.session_id);
        match change.r#type() {
            pb::ChangeType::Added => {
                assert!(self.view.insert(session.id.clone(), session).is_none());
            }
            pb::ChangeType::Modified => {
                assert!(self.view.insert(session.id.clone(), session).is_some());
            }
            pb::ChangeType::Removed => {
                assert!(self.view.remove(&session.id).is_some());
            }
            other => panic!("{other:?}"),
        }
        self.changes.push(change);
    }
}

async fn last_sequence(sessions: &mut SessionsClient<Channel>) -> u64 {
    Watcher::open(sessions, watch_request(None)).await.sequence
}

#[derive(Debug, Clone)]
enum Op {
    Register(usize),
    /// A heartbeat of server `.0` with sessions: (index, owner, connections).
    Beat(usize, Vec<(usize, usize, i32)>),
    Delete(usize, usize, bool),
    Deregister(usize),
    Silence,
}

fn op() -> impl Strategy<Value = Op> {
    let i = 0..IDS.len();
    let reported = prop::collection::vec((0..3usize, 0..OWNERS.len(), 0..3i32), 0..3);
    prop_oneof![
        2 => i.clone().prop_map(Op::Register),
        5 => (i.clone(), reported).prop_map(|(i, s)| Op::Beat(i, s)),
        2 => (i.clone(), 0..3usize, any::<bool>()).prop_map(|(i, k, f)| Op::Delete(i, k, f)),
        1 => i.prop_map(Op::Deregister),
        1 => Just(Op::Silence),
    ]
}

const FILTERS: [Option<(&str, &str)>; 5] = [
    None,
    Some(("state", "READY")),
    Some(("state", "UNKNOWN")),
    Some(("owner", "bob")),
    Some(("state", "DELETING")),
];

fn session_id(server: usize, k: usize) -> String {
    format!("{}-s{k}", IDS[server])
}

async fn apply(op: &Op, broker: &Broker) {
    let mut agent = broker.agent().await;
    let mut sessions = broker.sessions().await;
    match op {
        Op::Register(i) => register(&mut agent, IDS[*i], "linux", 4).await,
        Op::Beat(i, reported) => {
            let mut seen = std::collections::BTreeSet::new();
            let reported = reported
                .iter()
                .filter(|(k, _, _)| seen.insert(*k))
                .map(|&(k, owner, connections)| pb::AgentSession {
                    num_of_connections: connections,
                    owner: OWNERS[owner].into(),
                    ..session(
                        &session_id(*i, k),
                        pb::SessionType::Virtual,
                        pb::SessionState::Ready,
                    )
                })
                .collect();
            // An unknown server's heartbeat is refused; that is fine.
            let _ = agent.heartbeat(beat(IDS[*i], reported)).await;
        }
        Op::Delete(i, k, force) => {
            let items = OWNERS
                .iter()
                .map(|owner| pb::DeleteSessionRequestData {
                    session_id: session_id(*i, *k),
                    owner: (*owner).into(),
                    force: Some(*force),
                })
                .collect();
            sessions
                .delete_sessions(pb::DeleteSessionsRequest {
                    sessions: items,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        Op::Deregister(i) => {
            let _ = agent
                .deregister_server(pb::DeregisterServerRequest {
                    server_id: IDS[*i].into(),
                })
                .await;
        }
        Op::Silence => {
            tokio::time::advance(Duration::from_secs(3601)).await;
            sessions
                .describe_sessions(pb::DescribeSessionsRequest::default())
                .await
                .unwrap();
        }
    }
}

async fn described(
    sessions: &mut SessionsClient<Channel>,
    filter: Option<(&str, &str)>,
) -> BTreeMap<String, pb::Session> {
    sessions
        .describe_sessions(pb::DescribeSessionsRequest {
            filters: watch_request(filter).filters,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sessions
        .into_iter()
        .map(|s| (s.id.clone(), s))
        .collect()
}

async fn run_case(
    initial: &[Op],
    ops: &[Op],
    disconnect: prop::sample::Index,
    filter: Option<(&str, &str)>,
) -> Result<(), TestCaseError> {
    let broker = Broker::start(config(10_000)).await;
    for op in initial {
        apply(op, &broker).await;
    }
    let mut sessions = broker.sessions().await;
    let mut steady = Watcher::open(&mut sessions, watch_request(filter)).await;
    let mut flaky = Watcher::open(&mut sessions, watch_request(filter)).await;
    prop_assert_eq!(&steady.view, &flaky.view, "one snapshot");
    prop_assert_eq!(&steady.view, &described(&mut sessions, filter).await);
    let cut = disconnect.index(ops.len() + 1);
    for op in &ops[..cut] {
        apply(op, &broker).await;
    }
    let target = last_sequence(&mut sessions).await;
    flaky.catch_up(target).await;
    let (epoch, sequence, seen, view) = (
        flaky.epoch.clone(),
        flaky.sequence,
        std::mem::take(&mut flaky.changes),
        std::mem::take(&mut flaky.view),
    );
    drop(flaky);
    for op in &ops[cut..] {
        apply(op, &broker).await;
    }
    let mut resumed = Watcher::open(
        &mut sessions,
        pb::WatchSessionsRequest {
            from_sequence: Some(sequence),
            epoch: epoch.clone(),
            ..watch_request(filter)
        },
    )
    .await;
    resumed.view = view;
    resumed.epoch = epoch;
    resumed.sequence = sequence;
    resumed.changes = seen;
    let target = last_sequence(&mut sessions).await;
    resumed.catch_up(target).await;
    steady.catch_up(target).await;
    prop_assert_eq!(&resumed.changes, &steady.changes);
    prop_assert_eq!(&resumed.view, &steady.view);
    // The view is what DescribeSessions shows, field for field.
    let now = described(&mut sessions, filter).await;
    let target = last_sequence(&mut sessions).await;
    steady.catch_up(target).await;
    prop_assert_eq!(&steady.view, &now);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 40,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn a_resumed_session_watcher_sees_exactly_what_a_steady_one_sees(
        initial in prop::collection::vec(op(), 0..6),
        ops in prop::collection::vec(op(), 1..25),
        disconnect in any::<prop::sample::Index>(),
        filter in 0..FILTERS.len(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a current-thread runtime");
        runtime.block_on(run_case(&initial, &ops, disconnect, FILTERS[filter]))?;
    }
}

#[tokio::test(start_paused = true)]
async fn a_silent_agents_sessions_turn_unknown_on_the_stream() {
    let broker = Broker::start(config(100)).await;
    let mut agent = broker.agent().await;
    let mut sessions = broker.sessions().await;
    register(&mut agent, "u1", "linux", 4).await;
    agent
        .heartbeat(beat(
            "u1",
            vec![session(
                "u1-a",
                pb::SessionType::Virtual,
                pb::SessionState::Ready,
            )],
        ))
        .await
        .unwrap();
    let mut watcher = Watcher::open(&mut sessions, watch_request(Some(("state", "UNKNOWN")))).await;
    assert!(watcher.view.is_empty());
    tokio::time::advance(Duration::from_secs(3601)).await;
    let target = last_sequence(&mut sessions).await;
    watcher.catch_up(target).await;
    assert_eq!(watcher.changes.len(), 1, "{:?}", watcher.changes);
    assert_eq!(watcher.changes[0].r#type(), pb::ChangeType::Added);
    let shown = watcher.view.get("u1-a").unwrap();
    assert_eq!(shown.state(), pb::SessionState::Unknown);
    // Heard from again: READY, so out of this view.
    agent
        .heartbeat(beat(
            "u1",
            vec![session(
                "u1-a",
                pb::SessionType::Virtual,
                pb::SessionState::Ready,
            )],
        ))
        .await
        .unwrap();
    let target = last_sequence(&mut sessions).await;
    watcher.catch_up(target).await;
    assert_eq!(
        watcher.changes.last().unwrap().r#type(),
        pb::ChangeType::Removed
    );
    assert!(watcher.view.is_empty());
}

#[tokio::test]
async fn resuming_elsewhere_is_out_of_range_and_bad_requests_are_refused() {
    let broker = Broker::start(config(100)).await;
    let mut sessions = broker.sessions().await;
    let watcher = Watcher::open(&mut sessions, watch_request(None)).await;
    let refused = sessions
        .watch_sessions(pb::WatchSessionsRequest {
            from_sequence: Some(0),
            epoch: "another-epoch".into(),
            ..watch_request(None)
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    // Sessions have a log of their own: the server log's epoch is another.
    let servers_epoch = broker
        .servers()
        .await
        .watch_servers(pb::WatchServersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap()
        .epoch;
    assert_ne!(servers_epoch, watcher.epoch);
    for (request, field) in [
        (
            pb::WatchSessionsRequest {
                filters: vec![pb::KeyValuePair {
                    key: "colour".into(),
                    value: "blue".into(),
                }],
                ..Default::default()
            },
            "Filters[0].Key",
        ),
        (
            pb::WatchSessionsRequest {
                from_sequence: Some(3),
                ..Default::default()
            },
            "Epoch",
        ),
        (
            pb::WatchSessionsRequest {
                progress_interval: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 5,
                }),
                ..Default::default()
            },
            "ProgressInterval",
        ),
    ] {
        let status = sessions.watch_sessions(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(violations(&status)[0].0, field);
    }
}
