//! WatchServers (acceptance 1 and 2 of issue 19): a watcher that
//! disconnects anywhere and resumes from its last sequence sees exactly
//! what a watcher that never disconnected sees, and both end up with what
//! DescribeServers shows (a property over random operations, filters and
//! disconnection points); resuming past the log or from another epoch
//! fails OUT_OF_RANGE; a watcher that does not read is ended with
//! RESOURCE_EXHAUSTED while the log stays bounded and another watcher gets
//! everything; streams end when the broker shuts down.
//!
//! Real brokers on 127.0.0.1:0 called by tonic clients, on tokio's paused
//! clock: a watcher is caught up when its stream sends a PROGRESS mark,
//! which the broker sends only once it has delivered every change it
//! published (the clock advances to the mark by itself when nothing else
//! is left to do). No sleeps.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use dcv_broker::{
    BrokerConfig,
    fleet::{Fleet, FleetConfig, watch::WatchError},
    pb::{self, servers_client::ServersClient},
};
use proptest::prelude::*;
use tonic::{Code, Streaming, transport::Channel};

const IDS: [&str; 4] = ["w1", "w2", "w3", "w4"];

fn config(watch_buffer: usize) -> BrokerConfig {
    BrokerConfig {
        fleet: FleetConfig {
            // Silence only when a case says so (Advance), not while the
            // paused clock jumps from one progress mark to the next.
            unreachable_after: Duration::from_secs(3600),
            remove_after: Duration::from_secs(4 * 3600),
            watch_buffer,
            ..FleetConfig::default()
        },
        ..quiet_config()
    }
}

fn watch_request(filter: Option<(&str, &str)>) -> pb::WatchServersRequest {
    pb::WatchServersRequest {
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

/// A watcher's stream and what it has seen.
struct Watcher {
    stream: Streaming<pb::WatchServersResponse>,
    epoch: String,
    /// The Sequence of the last message.
    sequence: u64,
    /// Every change, in order.
    changes: Vec<pb::ServerChange>,
    /// Its view: the snapshot with the changes applied.
    view: BTreeMap<String, pb::Server>,
}

impl Watcher {
    /// Opens a watch and reads its snapshot (or nothing, when resuming).
    async fn open(
        servers: &mut ServersClient<Channel>,
        request: pb::WatchServersRequest,
    ) -> Watcher {
        let resuming = request.from_sequence.is_some();
        let stream = servers.watch_servers(request).await.unwrap().into_inner();
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
                for server in m.servers {
                    watcher.view.insert(server.id.clone(), server);
                }
                if m.snapshot_end {
                    break;
                }
            }
        }
        watcher
    }

    async fn message(&mut self) -> pb::WatchServersResponse {
        let m = self
            .stream
            .message()
            .await
            .unwrap()
            .expect("the stream goes on");
        assert!(!m.epoch.is_empty());
        if !self.epoch.is_empty() {
            assert_eq!(m.epoch, self.epoch, "one epoch per broker");
        }
        self.epoch.clone_from(&m.epoch);
        assert!(m.sequence >= self.sequence, "sequences never go back");
        self.sequence = m.sequence;
        m
    }

    /// Reads until a progress mark at `target` or later: every change
    /// published up to it is delivered (earlier marks may be queued).
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

    fn apply(&mut self, change: pb::ServerChange) {
        if let Some(last) = self.changes.last() {
            assert!(change.sequence > last.sequence, "in order, once each");
        }
        assert!(change.sequence <= self.sequence);
        let server = change.server.clone().expect("every change carries a state");
        assert_eq!(server.id, change.server_id);
        match change.r#type() {
            pb::ChangeType::Added => {
                assert!(
                    self.view.insert(server.id.clone(), server).is_none(),
                    "{change:?}"
                );
            }
            pb::ChangeType::Modified => {
                assert!(
                    self.view.insert(server.id.clone(), server).is_some(),
                    "{change:?}"
                );
            }
            pb::ChangeType::Removed => {
                assert!(self.view.remove(&server.id).is_some(), "{change:?}");
            }
            other => panic!("{other:?}"),
        }
        self.changes.push(change);
    }
}

/// The sequence of the broker's last change: a new watch's snapshot
/// stands there.
async fn last_sequence(servers: &mut ServersClient<Channel>) -> u64 {
    Watcher::open(servers, watch_request(None)).await.sequence
}

/// What a view and DescribeServers must agree on: every server in view,
/// with its availability, reasons, holds and session counts.
fn essentials(servers: impl IntoIterator<Item = pb::Server>) -> Vec<String> {
    servers
        .into_iter()
        .map(|s| {
            format!(
                "{} {:?} {:?} {:?} v{} c{} v{}",
                s.id,
                s.availability(),
                s.unavailability_reasons,
                s.holds.iter().map(|h| &h.name).collect::<Vec<_>>(),
                s.state_version,
                s.console_session_count,
                s.virtual_session_count,
            )
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    Register(usize, bool),
    Beat(usize, usize),
    Close(usize, bool),
    Open(usize),
    Deregister(usize),
    /// Past the unreachable timeout.
    Silence,
}

fn op() -> impl Strategy<Value = Op> {
    let i = 0..IDS.len();
    prop_oneof![
        3 => (i.clone(), any::<bool>()).prop_map(|(i, linux)| Op::Register(i, linux)),
        3 => (i.clone(), 0..3usize).prop_map(|(i, n)| Op::Beat(i, n)),
        3 => (i.clone(), any::<bool>()).prop_map(|(i, force)| Op::Close(i, force)),
        2 => i.clone().prop_map(Op::Open),
        1 => i.prop_map(Op::Deregister),
        1 => Just(Op::Silence),
    ]
}

const FILTERS: [Option<(&str, &str)>; 4] = [
    None,
    Some(("closed", "true")),
    Some(("os-family", "linux")),
    Some(("availability", "AVAILABLE")),
];

async fn apply(op: &Op, broker: &Broker) {
    let mut agent = broker.agent().await;
    let mut servers = broker.servers().await;
    match *op {
        Op::Register(i, linux) => {
            let (family, virtuals) = if linux { ("linux", 4) } else { ("windows", 0) };
            register(&mut agent, IDS[i], family, virtuals).await;
        }
        Op::Beat(i, n) => {
            let sessions = (0..n)
                .map(|k| {
                    session(
                        &format!("{}-s{k}", IDS[i]),
                        pb::SessionType::Virtual,
                        pb::SessionState::Ready,
                    )
                })
                .collect();
            // An unknown server's heartbeat is refused; that is fine.
            let _ = agent.heartbeat(beat(IDS[i], sessions)).await;
        }
        Op::Close(i, force) => {
            let close = close_req(vec![close_item(IDS[i], Some(force), "watch test")]);
            servers.close_servers(close).await.unwrap();
        }
        Op::Open(i) => {
            servers.open_servers(open_req(&[IDS[i]])).await.unwrap();
        }
        Op::Deregister(i) => {
            let _ = agent
                .deregister_server(pb::DeregisterServerRequest {
                    server_id: IDS[i].into(),
                })
                .await;
        }
        Op::Silence => {
            tokio::time::advance(Duration::from_secs(3601)).await;
            // Anything the broker is asked runs what is due first.
            servers
                .describe_servers(pb::DescribeServersRequest::default())
                .await
                .unwrap();
        }
    }
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
    let mut servers = broker.servers().await;
    let mut steady = Watcher::open(&mut servers, watch_request(filter)).await;
    let mut flaky = Watcher::open(&mut servers, watch_request(filter)).await;
    prop_assert_eq!(&steady.view, &flaky.view, "one snapshot");
    let cut = disconnect.index(ops.len() + 1);
    for op in &ops[..cut] {
        apply(op, &broker).await;
    }
    let target = last_sequence(&mut servers).await;
    flaky.catch_up(target).await;
    prop_assert_eq!(flaky.sequence, target);
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
        &mut servers,
        pb::WatchServersRequest {
            from_sequence: Some(sequence),
            epoch: epoch.clone(),
            ..watch_request(filter)
        },
    )
    .await;
    resumed.view = view;
    resumed.epoch = epoch;
    resumed.sequence = sequence;
    resumed.changes.clone_from(&seen);
    let target = last_sequence(&mut servers).await;
    resumed.catch_up(target).await;
    steady.catch_up(target).await;
    prop_assert_eq!(&resumed.changes, &steady.changes);
    prop_assert_eq!(&resumed.view, &steady.view);

    // The view is the fleet as DescribeServers shows it.
    let described = servers
        .describe_servers(pb::DescribeServersRequest {
            filters: watch_request(filter).filters,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .servers;
    let target = last_sequence(&mut servers).await;
    steady.catch_up(target).await;
    prop_assert_eq!(
        essentials(steady.view.values().cloned()),
        essentials(described)
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn a_resumed_watcher_sees_exactly_what_a_steady_one_sees(
        initial in prop::collection::vec(op(), 0..6),
        ops in prop::collection::vec(op(), 1..30),
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
async fn resuming_past_the_log_or_from_another_epoch_is_out_of_range() {
    let broker = Broker::start(config(8)).await;
    let mut servers = broker.servers().await;
    let mut agent = broker.agent().await;
    for i in 0..20 {
        register(&mut agent, &format!("r{i:02}"), "linux", 2).await;
    }
    // Nothing is recorded before the first watcher: its snapshot is at 0.
    let first = Watcher::open(&mut servers, watch_request(None)).await;
    assert_eq!(first.sequence, 0);
    assert_eq!(first.view.len(), 20);
    drop(first);
    for i in 0..20 {
        servers
            .close_servers(close_req(vec![close_item(&format!("r{i:02}"), None, "")]))
            .await
            .unwrap();
    }
    let watcher = Watcher::open(&mut servers, watch_request(None)).await;
    assert_eq!(watcher.sequence, 20);
    let resume = |sequence, epoch: &str| pb::WatchServersRequest {
        from_sequence: Some(sequence),
        epoch: epoch.into(),
        ..watch_request(None)
    };
    // The log keeps 8 events: 13..=20, so one may resume after 12 to 20.
    for (sequence, epoch) in [
        (11, watcher.epoch.as_str()),
        (0, watcher.epoch.as_str()),
        (21, watcher.epoch.as_str()),
        (20, "0123456789abcdef"),
    ] {
        let refused = servers
            .watch_servers(resume(sequence, epoch))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::OutOfRange, "{sequence} {refused:?}");
        assert!(
            refused.message().contains("without FromSequence"),
            "{refused:?}"
        );
    }
    let mut resumed = Watcher::open(&mut servers, resume(12, &watcher.epoch)).await;
    resumed.sequence = 12;
    resumed.view = watcher.view.clone();
    resumed.catch_up(20).await;
    let ids: Vec<&str> = resumed
        .changes
        .iter()
        .map(|c| c.server_id.as_str())
        .collect();
    assert_eq!(
        ids,
        ["r12", "r13", "r14", "r15", "r16", "r17", "r18", "r19"]
    );
    assert!(
        resumed
            .changes
            .iter()
            .all(|c| c.r#type() == pb::ChangeType::Modified)
    );

    // Malformed requests.
    for (request, field) in [
        (
            pb::WatchServersRequest {
                from_sequence: Some(3),
                ..Default::default()
            },
            "Epoch",
        ),
        (
            pb::WatchServersRequest {
                epoch: "x".into(),
                ..Default::default()
            },
            "FromSequence",
        ),
        (
            pb::WatchServersRequest {
                progress_interval: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 5,
                }),
                ..Default::default()
            },
            "ProgressInterval",
        ),
        (
            pb::WatchServersRequest {
                filters: vec![pb::KeyValuePair {
                    key: "colour".into(),
                    value: "red".into(),
                }],
                ..Default::default()
            },
            "Filters[0].Key",
        ),
    ] {
        let refused = servers.watch_servers(request).await.unwrap_err();
        assert_eq!(violations(&refused)[0].0, field);
    }
}

#[tokio::test]
async fn a_watcher_that_does_not_read_is_ended_and_the_others_are_not_held_back() {
    let broker = Broker::start(config(64)).await;
    let mut servers = broker.servers().await;
    // The slow watcher's own connection, with HTTP/2's smallest windows:
    // the broker can push it little before it must wait for it to read.
    let slow_channel = Channel::from_shared(format!("http://{}", broker.addr))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut slow = Watcher::open(&mut ServersClient::new(slow_channel), watch_request(None)).await;
    let mut steady = Watcher::open(&mut servers, watch_request(None)).await;
    let mut agent = broker.agent().await;
    let rounds = 400;
    for i in 0..rounds {
        register(&mut agent, &format!("slow{i:03}"), "linux", 2).await;
        servers
            .close_servers(close_req(vec![close_item(
                &format!("slow{i:03}"),
                None,
                "to make changes",
            )]))
            .await
            .unwrap();
    }
    // The steady watcher gets every change, in order, while the slow one
    // has read nothing.
    while steady.changes.len() < 2 * rounds {
        let m = steady.message().await;
        for change in m.changes {
            steady.apply(change);
        }
    }
    assert_eq!(steady.view.len(), rounds);
    assert!(broker.fleet.watch_kept() <= 64, "the log is bounded");
    // Operators see it in /metrics: two watchers, the last change.
    let metrics =
        dcv_broker::metrics::Metrics::new(broker.fleet.clone(), Default::default()).encode(false);
    assert!(metrics.contains("\ndcv_broker_watchers 2\n"), "{metrics}");
    let published = format!(
        "\ndcv_broker_watch_sequence {}\n",
        broker.fleet.watch_sequence()
    );
    assert!(metrics.contains(&published), "{metrics}");
    assert!(broker.fleet.watch_sequence() >= 2 * rounds as u64);
    // The slow one reads what was already on its way, then learns why
    // the rest will not come.
    let ended = loop {
        match slow.stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::ResourceExhausted, "{ended:?}");
    assert!(ended.message().contains("FromSequence"), "{ended:?}");
    assert_eq!(dcv_broker::metrics::COUNTERS.watchers_too_slow.get(), 1);
}

#[tokio::test]
async fn a_watcher_half_the_log_behind_is_ended_where_it_can_resume() {
    // The domain alone: exactly how far behind a watcher is.
    let fleet = Fleet::new(FleetConfig {
        watch_buffer: 100,
        ..FleetConfig::default()
    })
    .unwrap();
    let (mut watcher, _) = fleet.watch_servers(&[], None).unwrap();
    for i in 0..60 {
        fleet
            .register(&format!("d{i:02}"), dcv_broker::sample::description(i))
            .await
            .unwrap();
    }
    let too_slow = watcher.next(Duration::from_secs(1)).await.unwrap_err();
    let WatchError::TooSlow {
        seq, epoch, behind, ..
    } = too_slow
    else {
        panic!("{too_slow:?}");
    };
    assert_eq!((seq, behind), (0, 60));
    let (mut resumed, _) = fleet.watch_servers(&[], Some((epoch, seq))).unwrap();
    let mut seen = 0;
    while seen < 60 {
        match resumed.next(Duration::from_secs(1)).await.unwrap() {
            dcv_broker::fleet::watch::WatchNext::Changes { changes, .. } => seen += changes.len(),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(fleet.watchers(), 2);
    drop(watcher);
    assert_eq!(fleet.watchers(), 1);
}

#[tokio::test]
async fn streams_end_when_the_broker_shuts_down() {
    let mut broker = Broker::start(config(16)).await;
    let mut servers = broker.servers().await;
    let mut watcher = Watcher::open(&mut servers, watch_request(None)).await;
    broker.stop();
    let ended = loop {
        match watcher.stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("shutting down"), "{ended:?}");
    (&mut broker.task).await.unwrap().unwrap();
}
