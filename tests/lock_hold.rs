//! Requirements cannot hold the fleet's write lock: against a broker with
//! 1,000 servers, a CreateSessions of 1,000 sessions with ~4 KB
//! Requirements that match nothing (placed at once, or queued), 200
//! servers gaining room with 1,000 requests queued, and 1,000 costly
//! placements whose agents never answer (all retried at once) never hold
//! the write lock longer than a few milliseconds, and DescribeServers
//! from another client keeps answering meanwhile. Before the bound, the
//! same request held the lock for seconds (18.5 s measured), opening the
//! servers held it for 4.3 s, and the retries for 120 ms in one hold.

mod common;

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use dcv_broker::{
    fleet::{FleetConfig, FleetEvent},
    pb::{self, FailureCode, SessionType as Ty},
};

const SERVERS: usize = 1000;

/// The longest write-lock hold allowed, in a debug build on a busy
/// two-core machine (a few ms typically; a holder descheduled while other
/// tests run measured over 100 ms in CI): the requests below held it for
/// seconds before.
const MAX_HOLD: Duration = Duration::from_millis(300);

/// The slowest DescribeServers (p99) allowed while the request runs.
const MAX_DESCRIBE_P99: Duration = Duration::from_millis(500);

fn server(i: usize) -> String {
    format!("srv-{i:04}")
}

/// About 4 KB of Requirements that match no server: 130-odd comparisons
/// of tags no server has, joined by `or`, so that each is evaluated.
/// `variant` makes the text differ.
fn never_matching(variant: usize) -> String {
    let mut text = String::new();
    let mut j = 0;
    while text.len() < 3900 {
        if j > 0 {
            text.push_str(" or ");
        }
        write!(text, "tag:never{variant}x{j} = 'value-{j}'").unwrap();
        j += 1;
    }
    text
}

/// A Sessions client that takes replies as large as the broker sends
/// (failures echo their items, Requirements included).
async fn sessions_client(
    broker: &Broker,
) -> pb::sessions_client::SessionsClient<tonic::transport::Channel> {
    broker
        .sessions()
        .await
        .max_decoding_message_size(64 * 1024 * 1024)
}

async fn broker_with_servers() -> Broker {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    for i in 0..SERVERS {
        register(&mut agent, &server(i), "linux", 4).await;
    }
    broker
}

/// DescribeServers of one server, over and over from its own client,
/// until stopped; returns each call's latency.
fn describe_meanwhile(
    broker: &Broker,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Duration>> {
    let addr = broker.addr;
    tokio::spawn(async move {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut servers = pb::servers_client::ServersClient::new(channel);
        let mut latencies = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            servers
                .describe_servers(describe_ids(&[&server(7)]))
                .await
                .unwrap();
            latencies.push(started.elapsed());
        }
        latencies
    })
}

fn p99(mut latencies: Vec<Duration>) -> Duration {
    assert!(!latencies.is_empty(), "DescribeServers never answered");
    latencies.sort();
    latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)]
}

fn create_items(
    count: usize,
    enqueue: bool,
    variant: impl Fn(usize) -> usize,
) -> pb::CreateSessionsRequest {
    create_req(
        (0..count)
            .map(|i| {
                let mut item = create_item(&format!("s{i}"), "mallory", Ty::Virtual);
                item.requirements = never_matching(variant(i));
                item.enqueue_request = enqueue;
                item
            })
            .collect(),
    )
}

fn codes(r: &pb::CreateSessionsResponse) -> Vec<FailureCode> {
    r.unsuccessful_list
        .iter()
        .map(|u| FailureCode::try_from(u.failure_code).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_costly_requirements_holds_the_lock_briefly() {
    let broker = broker_with_servers().await;
    let mut sessions = sessions_client(&broker).await;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = describe_meanwhile(&broker, stop.clone());
    broker.fleet.take_longest_write_hold();

    // Every item's expression differs: nothing is shared.
    let r = sessions
        .create_sessions(create_items(1000, false, |i| i))
        .await
        .unwrap()
        .into_inner();
    let held = broker.fleet.take_longest_write_hold();
    stop.store(true, Ordering::Relaxed);
    let describe = p99(reader.await.unwrap());

    let codes = codes(&r);
    assert!(r.successful_list.is_empty());
    assert_eq!(codes.len(), 1000);
    let evaluated = codes
        .iter()
        .filter(|c| **c == FailureCode::NoServerAvailable)
        .count();
    let refused = codes
        .iter()
        .filter(|c| **c == FailureCode::InvalidRequirements)
        .count();
    assert_eq!(evaluated + refused, 1000, "{codes:?}");
    // The request's evaluation budget covers a few such expressions
    // against 1,000 servers, not a thousand.
    assert!((1..=16).contains(&evaluated), "{evaluated} evaluated");
    assert!(
        r.unsuccessful_list
            .iter()
            .find(|u| u.failure_code == FailureCode::InvalidRequirements as i32)
            .is_some_and(|u| u.failure_reason.contains("distinct or shorter")),
        "{:?}",
        r.unsuccessful_list.last()
    );
    eprintln!("longest write hold {held:?}, DescribeServers p99 {describe:?}");
    assert!(held <= MAX_HOLD, "the write lock was held for {held:?}");
    assert!(
        describe <= MAX_DESCRIBE_P99,
        "DescribeServers p99 {describe:?} during the request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_of_costly_requirements_holds_the_lock_briefly() {
    let broker = broker_with_servers().await;
    let mut sessions = sessions_client(&broker).await;
    let mut servers = broker.servers().await;
    let some: Vec<String> = (0..200).map(server).collect();
    let some: Vec<&str> = some.iter().map(String::as_str).collect();
    servers
        .close_servers(close_req(
            some.iter().map(|id| close_item(id, None, "")).collect(),
        ))
        .await
        .unwrap();
    broker.fleet.take_longest_write_hold();

    // Ten expressions, shared by a thousand requests (five per request,
    // within one request's evaluation budget): all queued.
    let mut queued = Vec::new();
    for round in 0..2 {
        let r = sessions
            .create_sessions(create_items(500, true, |i| round * 5 + i % 5))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.successful_list.len(),
            500,
            "{:?}",
            r.unsuccessful_list.first()
        );
        queued.extend(r.successful_list);
    }
    assert_eq!(broker.fleet.queued(), 1000);
    let held = broker.fleet.take_longest_write_hold();
    assert!(
        held <= MAX_HOLD,
        "queueing held the write lock for {held:?}"
    );

    // A place frees up in the queue, but a new expression would make
    // checking the queue costlier than its bound: refused. A queued one
    // is still welcome.
    sessions
        .delete_sessions(pb::DeleteSessionsRequest {
            sessions: vec![pb::DeleteSessionRequestData {
                session_id: queued[0].id.clone(),
                owner: "mallory".into(),
                force: None,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let refused = sessions
        .create_sessions(create_items(1, true, |_| 100))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(codes(&refused), [FailureCode::QueueFull]);
    assert!(
        refused.unsuccessful_list[0]
            .failure_reason
            .contains("distinct Requirements"),
        "{:?}",
        refused.unsuccessful_list[0]
    );
    let admitted = sessions
        .create_sessions(create_items(1, true, |_| 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(admitted.successful_list.len(), 1);
    assert_eq!(broker.fleet.queued(), 1000);

    // 200 servers gain room, each checking the whole queue: at once in one
    // batch, then one at a time by heartbeat.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = describe_meanwhile(&broker, stop.clone());
    broker.fleet.take_longest_write_hold();
    servers.open_servers(open_req(&some)).await.unwrap();
    let mut agent = broker.agent().await;
    for id in &some {
        agent.heartbeat(beat(id, vec![])).await.unwrap();
    }
    let held = broker.fleet.take_longest_write_hold();
    stop.store(true, Ordering::Relaxed);
    let describe = p99(reader.await.unwrap());
    assert_eq!(broker.fleet.queued(), 1000, "nothing matched");
    eprintln!("longest write hold {held:?}, DescribeServers p99 {describe:?}");
    assert!(held <= MAX_HOLD, "the write lock was held for {held:?}");
    assert!(
        describe <= MAX_DESCRIBE_P99,
        "DescribeServers p99 {describe:?} while servers opened"
    );
}

#[tokio::test(start_paused = true)]
async fn agents_that_never_answer_costly_placements_hold_the_lock_briefly() {
    let broker = broker_with_servers().await;
    let mut events = broker.fleet.events();
    let mut sessions = sessions_client(&broker).await;
    let mut servers = broker.servers().await;

    // ~4 KB that every server matches, but only at its last comparison.
    let mut item = create_item("s", "mallory", Ty::Virtual);
    item.requirements = format!("{} or tag:city = 'London'", never_matching(0));
    let r = sessions
        .create_sessions(create_req(vec![item; 1000]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.successful_list.len(),
        1000,
        "{:?}",
        r.unsuccessful_list.first()
    );
    // No agent streams: every placement times out, all at once, and is
    // retried elsewhere, each retry evaluating the Requirements under the
    // lock. Whatever request comes next processes the deadlines.
    tokio::time::advance(FleetConfig::default().agent_timeout).await;
    broker.fleet.take_longest_write_hold();
    let mut left = 0;
    let mut requests = 0;
    while left < 1000 {
        servers
            .describe_servers(describe_ids(&[&server(7)]))
            .await
            .unwrap();
        requests += 1;
        assert!(requests <= 1000, "only {left} placements were retried");
        while let Ok(event) = events.try_recv() {
            if matches!(event.event, FleetEvent::SessionLeft { .. }) {
                left += 1;
            }
        }
    }
    let held = broker.fleet.take_longest_write_hold();
    eprintln!("longest write hold {held:?} over {requests} requests");
    assert!(held <= MAX_HOLD, "the write lock was held for {held:?}");
}
