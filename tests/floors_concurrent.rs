//! Capacity floors under concurrent CloseServers batches (issue 18,
//! acceptance 6): no interleaving of many clients' batches lets a pool drop
//! below its floor.
//!
//! A real broker with the floor `tag:pool=gpu:10` serves 20 gpu servers and
//! 5 cpu servers (a pool without a floor). In each of six rounds, 16
//! clients, each on its own connection, start together (a barrier) and send
//! three CloseServers batches each of random servers of both pools under
//! random hold names, between them touching every gpu server; meanwhile an
//! observer describes the gpu pool over and over. Every snapshot the
//! observer sees has at least 10 AVAILABLE gpu servers; every refused item
//! is a gpu server refused with CAPACITY_FLOOR (no cpu item is refused);
//! and when the round ends exactly 10 gpu servers are AVAILABLE and no cpu
//! server is. Between rounds a few servers are opened fully, so that each
//! round starts from a different pool.

mod common;

use std::{collections::BTreeSet, net::SocketAddr, sync::Arc};

use common::{Broker, quiet_config, registration};
use dcv_broker::{
    fleet::CapacityFloor,
    pb::{self, servers_client::ServersClient},
};
use tokio::sync::{Barrier, watch};
use tonic::transport::Channel;

const GPU: usize = 20;
const CPU: usize = 5;
const FLOOR: usize = 10;
const CLIENTS: usize = 16;
const BATCHES: usize = 3;
const ROUNDS: usize = 6;
/// Hold names the clients close under (empty: the default hold).
const HOLDS: [&str; 3] = ["", "team-a", "team-b"];

fn gpu(i: usize) -> String {
    format!("gpu-{i:02}")
}

fn cpu(i: usize) -> String {
    format!("cpu-{i}")
}

/// SplitMix64: reproducible batches without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

async fn client(addr: SocketAddr) -> ServersClient<Channel> {
    ServersClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// The AVAILABLE servers of `pool`, in one DescribeServers snapshot.
async fn available(servers: &mut ServersClient<Channel>, pool: &str) -> BTreeSet<String> {
    let page = servers
        .describe_servers(pb::DescribeServersRequest {
            filters: vec![pb::KeyValuePair {
                key: "tag:pool".into(),
                value: pool.into(),
            }],
            max_results: Some(100),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(page.next_token.is_empty(), "one page holds the pool");
    page.servers
        .into_iter()
        .filter(|s| s.availability == pb::Availability::Available as i32)
        .map(|s| s.id)
        .collect()
}

/// One client's batches: 1 to 6 distinct servers each, mostly gpu.
fn plan(rng: &mut Rng) -> Vec<Vec<pb::CloseServerRequestData>> {
    (0..BATCHES)
        .map(|_| {
            let len = 1 + rng.below(6);
            let mut ids = BTreeSet::new();
            while ids.len() < len {
                ids.insert(if rng.below(5) == 0 {
                    cpu(rng.below(CPU))
                } else {
                    gpu(rng.below(GPU))
                });
            }
            ids.into_iter()
                .map(|id| close_item(id, HOLDS[rng.below(HOLDS.len())]))
                .collect()
        })
        .collect()
}

fn close_item(id: String, hold: &str) -> pb::CloseServerRequestData {
    pb::CloseServerRequestData {
        server_id: id,
        reason: "maintenance".into(),
        hold_name: (!hold.is_empty()).then(|| hold.to_string()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn floors_hold_under_concurrent_batches() {
    let mut config = quiet_config();
    config.fleet.capacity_floors =
        vec![CapacityFloor::parse(&format!("tag:pool=gpu:{FLOOR}")).unwrap()];
    let broker = Broker::start(config).await;
    let mut agent = broker.agent().await;
    for (id, pool) in (0..GPU)
        .map(|i| (gpu(i), "gpu"))
        .chain((0..CPU).map(|i| (cpu(i), "cpu")))
    {
        let mut request = registration(&id, "linux", 2);
        request.tags = vec![pb::KeyValuePair {
            key: "pool".into(),
            value: pool.into(),
        }];
        agent.register_server(request).await.unwrap();
    }
    let mut admin = broker.servers().await;
    assert_eq!(available(&mut admin, "gpu").await.len(), GPU);

    let mut rng = Rng(18);
    for round in 0..ROUNDS {
        let start = available(&mut admin, "gpu").await.len();
        assert!(start > FLOOR, "round {round} starts with {start} AVAILABLE");
        let mut plans: Vec<_> = (0..CLIENTS).map(|_| plan(&mut rng)).collect();
        // Every gpu server is asked for by someone, so the round must end
        // exactly at the floor: an AVAILABLE server left over was refused
        // when the pool was at the floor already.
        for i in 0..GPU {
            let id = gpu(i);
            let asked = plans
                .iter()
                .flatten()
                .flatten()
                .any(|item| item.server_id == id);
            if !asked {
                let batch = &mut plans[rng.below(CLIENTS)][rng.below(BATCHES)];
                batch.push(close_item(id, HOLDS[rng.below(HOLDS.len())]));
            }
        }

        let (stop, mut stopped) = watch::channel(false);
        let mut watcher = client(broker.addr).await;
        let observer = tokio::spawn(async move {
            let mut snapshots = 0usize;
            loop {
                let n = available(&mut watcher, "gpu").await.len();
                assert!(n >= FLOOR, "a snapshot showed {n} AVAILABLE gpu servers");
                snapshots += 1;
                if *stopped.borrow_and_update() {
                    return snapshots;
                }
            }
        });

        let barrier = Arc::new(Barrier::new(CLIENTS));
        let mut tasks = Vec::new();
        for batches in plans {
            let barrier = barrier.clone();
            let addr = broker.addr;
            tasks.push(tokio::spawn(async move {
                let mut servers = client(addr).await;
                barrier.wait().await;
                let mut replies = Vec::new();
                for batch in batches {
                    let reply = servers
                        .close_servers(pb::CloseServersRequest {
                            servers: batch.clone(),
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    replies.push((batch, reply));
                }
                replies
            }));
        }
        let mut refused = 0;
        for task in tasks {
            for (batch, reply) in task.await.unwrap() {
                let ok: Vec<&str> = reply
                    .successful_list
                    .iter()
                    .map(|s| s.server_id.as_str())
                    .collect();
                let failed: Vec<&str> = reply
                    .unsuccessful_list
                    .iter()
                    .map(|f| {
                        let id = f
                            .close_server_request_data
                            .as_ref()
                            .unwrap()
                            .server_id
                            .as_str();
                        assert_eq!(
                            f.failure_code,
                            pb::FailureCode::CapacityFloor as i32,
                            "{id}: {}",
                            f.failure_reason
                        );
                        assert!(id.starts_with("gpu-"), "{id} has no floor but was refused");
                        id
                    })
                    .collect();
                refused += failed.len();
                let mut answered: Vec<&str> = ok.iter().chain(&failed).copied().collect();
                answered.sort_unstable();
                let mut asked: Vec<&str> = batch.iter().map(|i| i.server_id.as_str()).collect();
                asked.sort_unstable();
                assert_eq!(answered, asked, "every item answered once");
            }
        }
        stop.send(true).unwrap();
        let snapshots = observer.await.unwrap();
        assert!(snapshots >= 1);
        assert!(refused > 0, "round {round}: the floor refused nothing");

        let left = available(&mut admin, "gpu").await;
        assert_eq!(left.len(), FLOOR, "round {round}: {left:?}");
        assert!(available(&mut admin, "cpu").await.is_empty());

        // Open a few gpu servers fully (every hold name) and every cpu one.
        let closed: Vec<String> = (0..GPU).map(gpu).filter(|id| !left.contains(id)).collect();
        let reopen: BTreeSet<String> = (0..3 + rng.below(6))
            .map(|_| closed[rng.below(closed.len())].clone())
            .collect();
        let targets: Vec<String> = reopen.iter().cloned().chain((0..CPU).map(cpu)).collect();
        for hold in HOLDS {
            admin
                .open_servers(pb::OpenServersRequest {
                    servers: targets
                        .iter()
                        .map(|id| pb::OpenServerRequestData {
                            server_id: id.clone(),
                            hold_name: (!hold.is_empty()).then(|| hold.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        let now = available(&mut admin, "gpu").await;
        assert_eq!(
            now.len(),
            FLOOR + reopen.len(),
            "round {round} reopened {reopen:?}"
        );
        assert_eq!(available(&mut admin, "cpu").await.len(), CPU);
    }
}
