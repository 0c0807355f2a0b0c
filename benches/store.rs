//! The durable store's cost, measured against the real server: CloseServers
//! single-item throughput with the SQLite store and in memory, at 1, 16 and
//! 64 requests in flight, and start-up time with 100,000 stored servers.
//!
//! Run with `cargo bench --bench store` (optimised build). Figures are
//! medians over repetitions; the machine is shared, so compare ratios
//! measured in the same run. Writes target/bench-store.json.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use dcv_broker::{
    BrokerConfig, demo,
    fleet::{Fleet, FleetConfig, persist},
    limits::Limits,
    pb::{self, servers_client::ServersClient},
    serve,
    store::SqliteStore,
};
use tokio::{net::TcpListener, sync::oneshot};
use tonic::transport::Channel;

const SERVERS: usize = 1024;
const CONCURRENCY: [usize; 3] = [1, 16, 64];
const CONNECTIONS: usize = 4;
const WARM_UP: Duration = Duration::from_millis(500);
const WINDOW: Duration = Duration::from_secs(2);
const REPETITIONS: usize = 3;
const STARTUP_SERVERS: usize = 100_000;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dcv-bench-{name}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts a broker serving `fleet`; returns its address and a stopper.
async fn start(fleet: Fleet) -> (std::net::SocketAddr, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let config = BrokerConfig {
        fleet: FleetConfig::default(),
        request_timeout: None,
        sweep_interval: None,
        // The load generator is one address standing for many clients.
        limits: Limits {
            client_rate: None,
            ..Limits::default()
        },
        ..BrokerConfig::default()
    };
    tokio::spawn(serve(listener, fleet, config, async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

/// Requests per second of single-item CloseServers/OpenServers (each one a
/// real change, so each one is written) with `inflight` requests at once.
async fn throughput(channels: &[Channel], inflight: usize) -> f64 {
    let run = |window: Duration| {
        let tasks: Vec<_> = (0..inflight)
            .map(|t| {
                let mut client = ServersClient::new(channels[t % channels.len()].clone());
                // Each task works its own servers, so every call changes
                // state: close, then open, and so on.
                let mine: Vec<String> = (0..SERVERS)
                    .filter(|i| i % inflight == t)
                    .map(demo::server_id)
                    .collect();
                tokio::spawn(async move {
                    let deadline = Instant::now() + window;
                    let mut done = 0u64;
                    let mut k = 0usize;
                    while Instant::now() < deadline {
                        let id = mine[(k / 2) % mine.len()].clone();
                        if k.is_multiple_of(2) {
                            let items = vec![pb::CloseServerRequestData {
                                server_id: id,
                                force: Some(true),
                                reason: String::new(),
                                ..Default::default()
                            }];
                            client
                                .close_servers(pb::CloseServersRequest {
                                    servers: items,
                                    ..Default::default()
                                })
                                .await
                                .unwrap();
                        } else {
                            let items = vec![pb::OpenServerRequestData {
                                server_id: id,
                                ..Default::default()
                            }];
                            client
                                .open_servers(pb::OpenServersRequest {
                                    servers: items,
                                    ..Default::default()
                                })
                                .await
                                .unwrap();
                        }
                        k += 1;
                        done += 1;
                    }
                    done
                })
            })
            .collect::<Vec<_>>();
        async move {
            let mut total = 0;
            for t in tasks {
                total += t.await.unwrap();
            }
            total
        }
    };
    run(WARM_UP).await;
    let started = Instant::now();
    let done = run(WINDOW).await;
    done as f64 / started.elapsed().as_secs_f64()
}

async fn measure(durable: bool) -> Vec<(usize, f64)> {
    let dir = temp_dir("throughput");
    let fleet = if durable {
        let (store, snapshot) = SqliteStore::open(&dir).unwrap();
        Fleet::restore(FleetConfig::default(), Arc::new(store), snapshot).unwrap()
    } else {
        Fleet::new(FleetConfig::default()).unwrap()
    };
    for i in 0..SERVERS {
        fleet
            .register(&demo::server_id(i), demo::description(i))
            .await
            .unwrap();
    }
    let (addr, stop) = start(fleet).await;
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(
            Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    let mut out = Vec::new();
    for inflight in CONCURRENCY {
        let mut reps = Vec::new();
        for _ in 0..REPETITIONS {
            reps.push(throughput(&channels, inflight).await);
        }
        out.push((inflight, median(reps)));
    }
    let _ = stop.send(());
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// Seconds to open and load a store of `STARTUP_SERVERS` servers with ten
/// tags each, and build the fleet from it.
fn startup() -> f64 {
    let dir = temp_dir("startup");
    {
        let (store, _) = SqliteStore::open(&dir).unwrap();
        let now = persist::wall_clock();
        for chunk in (0..STARTUP_SERVERS).collect::<Vec<_>>().chunks(10_000) {
            let changes = chunk
                .iter()
                .map(|&i| {
                    let mut description = demo::description(i);
                    for t in description.tags.len()..10 {
                        description.tags.push(dcv_broker::fleet::Tag {
                            key: format!("tag{t}").into(),
                            value: format!("value-{}", i % 97).into(),
                        });
                    }
                    persist::Change::PutServer(persist::StoredServer {
                        id: demo::server_id(i),
                        description,
                        holds: Vec::new(),
                        state_version: 0,
                        registered_at: now,
                        last_seen: now,
                        agent_departed: false,
                    })
                })
                .collect();
            let durable = persist::Store::submit(&store, changes);
            futures_lite_block(durable.wait()).unwrap();
        }
        store.close().unwrap();
    }
    let mut reps = Vec::new();
    for _ in 0..REPETITIONS {
        let started = Instant::now();
        let (store, snapshot) = SqliteStore::open(&dir).unwrap();
        assert_eq!(snapshot.servers.len(), STARTUP_SERVERS);
        let fleet = Fleet::restore(FleetConfig::default(), Arc::new(store), snapshot).unwrap();
        assert_eq!(fleet.len(), STARTUP_SERVERS);
        reps.push(started.elapsed().as_secs_f64());
        drop(fleet);
    }
    let _ = std::fs::remove_dir_all(&dir);
    median(reps)
}

fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let memory = runtime.block_on(measure(false));
    let durable = runtime.block_on(measure(true));
    drop(runtime);
    let startup = startup();

    println!(
        "CloseServers/OpenServers, single item, {CONNECTIONS} connections, median of {REPETITIONS} x {WINDOW:?}"
    );
    println!(
        "{:>9} {:>14} {:>14} {:>7}",
        "in flight", "in-memory/s", "durable/s", "ratio"
    );
    let mut rows = Vec::new();
    for ((c, m), (_, d)) in memory.iter().zip(&durable) {
        println!("{c:>9} {m:>14.0} {d:>14.0} {:>7.2}", d / m);
        rows.push(format!(
            "{{\"in_flight\":{c},\"in_memory_rps\":{m:.0},\"durable_rps\":{d:.0},\"ratio\":{:.3}}}",
            d / m
        ));
    }
    println!(
        "start-up with {STARTUP_SERVERS} stored servers: {startup:.3} s (median of {REPETITIONS})"
    );
    let json = format!(
        "{{\"throughput\":[{}],\"startup_servers\":{STARTUP_SERVERS},\"startup_seconds\":{startup:.4}}}\n",
        rows.join(",")
    );
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-store.json");
    if let Err(err) = std::fs::write(&out, json) {
        eprintln!("cannot write {}: {err}", out.display());
    }
}
