//! The watcher benchmark (issue 19): WATCHERS WatchServers streams on a
//! fleet of FLEET servers while closes, opens and heartbeats run, against
//! the release broker binary (`--in-memory`), pinned to CPU 0; the
//! generator runs pinned to CPU 1.
//!
//! Run with `cargo bench --bench watch` (`-- --quick` for a short run).
//! Each watcher filters one of POOLS pools (`tag:watchpool=pNN`), as a
//! portal watching its own servers would, so each change is delivered to
//! WATCHERS / POOLS watchers. Two phases alternate, REPS times each, with
//! the same close/open rate, heartbeats and DescribeServers probe:
//! without watchers, then with them. Reported, as medians over the
//! repetitions:
//! - the delay from sending a CloseServers to a watcher receiving the
//!   change (an upper bound on commit-to-delivery: it includes the call),
//!   p50 and p99 over every delivery, and whether every watcher received
//!   every change of its pool in order;
//! - the broker's CPU per change delivered (from `/proc/PID/stat`);
//! - DescribeServers' p99 latency with watchers against without.
//!
//! The broker records changes from the first watcher on, for the life of
//! the process: each repetition starts a fresh broker so that a phase
//! without watchers is one that never had any.

mod common;

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::procfs::{cpu_seconds, median};
use dcv_broker::{
    pb::{self, agent_client::AgentClient, servers_client::ServersClient},
    sample, wire,
};
use hdrhistogram::Histogram;
use tonic::transport::Channel;

const BROKER: &str = env!("CARGO_BIN_EXE_dcv-broker");

struct Opts {
    fleet: usize,
    watchers: usize,
    pools: usize,
    /// Changes a second (closes and opens, alternating per server).
    rate: u64,
    phase: Duration,
    reps: usize,
}

fn opts() -> Opts {
    let quick = std::env::args().any(|a| a == "--quick");
    Opts {
        fleet: 10_000,
        watchers: 1_000,
        pools: 100,
        rate: 1_000,
        phase: Duration::from_secs(if quick { 3 } else { 10 }),
        reps: if quick { 1 } else { 3 },
    }
}

fn main() {
    let opts = opts();
    common::pin_self(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for rep in 0..opts.reps {
        eprintln!("repetition {}/{}", rep + 1, opts.reps);
        rows.push(runtime.block_on(repetition(&opts)));
    }
    let pick = |f: fn(&Row) -> f64| median(rows.iter().map(f).collect());
    println!(
        "\nWatchServers: {} watchers ({} pools), {} servers, {} changes/s, {:?} phases, {} reps (medians)",
        opts.watchers, opts.pools, opts.fleet, opts.rate, opts.phase, opts.reps
    );
    println!("| figure | without watchers | with watchers |");
    println!("|---|---|---|");
    println!(
        "| changes/s made | {:.0} | {:.0} |",
        pick(|r| r.rate_without),
        pick(|r| r.rate_with)
    );
    println!("| deliveries/s | — | {:.0} |", pick(|r| r.deliveries_per_s));
    println!("| delay p50 (ms) | — | {:.2} |", pick(|r| r.delay_p50_ms));
    println!("| delay p99 (ms) | — | {:.2} |", pick(|r| r.delay_p99_ms));
    println!(
        "| broker CPU per change delivered (µs; all work) | — | {:.2} |",
        pick(|r| r.cpu_per_delivery_us)
    );
    println!(
        "| extra broker CPU per change delivered (µs; with minus without) | — | {:.2} |",
        pick(|r| r.extra_cpu_per_delivery_us)
    );
    println!(
        "| broker CPU per change made (µs; all work, closes, heartbeats, probe) | {:.1} | {:.1} |",
        pick(|r| r.cpu_per_change_without_us),
        pick(|r| r.cpu_per_change_with_us)
    );
    println!(
        "| broker CPU (s per s) | {:.3} | {:.3} |",
        pick(|r| r.cpu_without),
        pick(|r| r.cpu_with)
    );
    println!(
        "| DescribeServers p99 (ms) | {:.2} | {:.2} |",
        pick(|r| r.describe_p99_without_ms),
        pick(|r| r.describe_p99_with_ms)
    );
    println!(
        "| DescribeServers p99 ratio (with / without) | | {:.2}x |",
        pick(|r| r.describe_p99_with_ms / r.describe_p99_without_ms)
    );
    let complete = rows.iter().all(|r| r.complete);
    println!("| every watcher got every change of its pool, in order | | {complete} |");
    assert!(complete, "a watcher missed a change");
}

#[derive(Debug, Default)]
struct Row {
    rate_without: f64,
    rate_with: f64,
    deliveries_per_s: f64,
    delay_p50_ms: f64,
    delay_p99_ms: f64,
    cpu_per_delivery_us: f64,
    extra_cpu_per_delivery_us: f64,
    cpu_per_change_without_us: f64,
    cpu_per_change_with_us: f64,
    cpu_without: f64,
    cpu_with: f64,
    describe_p99_without_ms: f64,
    describe_p99_with_ms: f64,
    complete: bool,
}

/// The broker binary, pinned to CPU 0, and its address.
struct Broker {
    child: Child,
    url: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_broker() -> Broker {
    let mut child = Command::new("taskset")
        .args(["-c", "0", BROKER])
        .args([
            "--in-memory",
            "--listen",
            "127.0.0.1:0",
            "--client-rate",
            "0",
            "--max-concurrent-requests",
            "0",
            "--log",
            "warn",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the broker binary (taskset from util-linux)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("the broker's address").unwrap();
        if let Some(addr) = line.strip_prefix("dcv-broker listening on ") {
            break addr.to_owned();
        }
    };
    // Keep reading stdout, so the broker never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Broker {
        child,
        url: format!("http://{addr}"),
    }
}

fn server_id(i: usize) -> String {
    format!("w-{i:05}")
}

fn pool_of(i: usize, pools: usize) -> String {
    format!("p{:02}", i % pools)
}

async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Registers the fleet: ten tags each, plus its pool.
async fn register_fleet(url: &str, opts: &Opts) {
    let mut tasks = Vec::new();
    for part in 0..8 {
        let url = url.to_owned();
        let (fleet, pools) = (opts.fleet, opts.pools);
        tasks.push(tokio::spawn(async move {
            let mut agent = AgentClient::new(channel(&url).await);
            for i in (part..fleet).step_by(8) {
                let mut request =
                    wire::registration_to_pb(&server_id(i), &sample::tagged_description(i));
                request.tags.push(pb::KeyValuePair {
                    key: "watchpool".into(),
                    value: pool_of(i, pools),
                });
                agent.register_server(request).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// When each close was sent, by its Reason.
type Sent = Arc<Mutex<HashMap<String, Instant>>>;

/// Closes and opens servers at `rate` changes a second for `phase`, from
/// CALLERS tasks (each its share of the rate and of the fleet, so that no
/// reply's latency slows the rate): a server is closed (Reason
/// `c<task>-<n>`, its key in `sent`) then opened, in turn. Heartbeats for
/// every server every 30 s run beside them. Returns the closes made, by
/// server index.
async fn make_changes(url: &str, opts: &Opts, sent: Sent, phase: Duration) -> Vec<(usize, String)> {
    const CALLERS: usize = 4;
    let mut agent = AgentClient::new(channel(url).await);
    let heartbeats = tokio::spawn({
        let fleet = opts.fleet;
        async move {
            // 1/30 of the fleet a second, in ticks of 10 ms.
            let per_tick = (fleet / 3000).max(1);
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut next = 0;
            loop {
                tick.tick().await;
                for _ in 0..per_tick {
                    let beat = pb::HeartbeatRequest {
                        server_id: server_id(next % fleet),
                        dcv_server_healthy: true,
                        ..Default::default()
                    };
                    let _ = agent.heartbeat(beat).await;
                    next += 1;
                }
            }
        }
    });
    let mut callers = Vec::new();
    for task in 0..CALLERS {
        let url = url.to_owned();
        let sent = sent.clone();
        let (fleet, rate) = (opts.fleet, opts.rate);
        callers.push(tokio::spawn(async move {
            let mut servers = ServersClient::new(channel(&url).await);
            let started = Instant::now();
            let every = Duration::from_micros(1_000_000 * CALLERS as u64 / rate);
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut closes = Vec::new();
            let mut n: usize = 0;
            while started.elapsed() < phase {
                tick.tick().await;
                let index = (task + CALLERS * (n / 2)) % fleet;
                let server = server_id(index);
                if n.is_multiple_of(2) {
                    let reason = format!("c{task}-{n}");
                    sent.lock().unwrap().insert(reason.clone(), Instant::now());
                    let close = pb::CloseServersRequest {
                        servers: vec![pb::CloseServerRequestData {
                            server_id: server,
                            reason: reason.clone(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    };
                    servers.close_servers(close).await.unwrap();
                    closes.push((index, reason));
                } else {
                    let open = pb::OpenServersRequest {
                        servers: vec![pb::OpenServerRequestData {
                            server_id: server,
                            ..Default::default()
                        }],
                        ..Default::default()
                    };
                    servers.open_servers(open).await.unwrap();
                }
                n += 1;
            }
            // A server left closed would make the next phase's close of
            // it a no-op (its hold is kept), a change nobody sees.
            if !n.is_multiple_of(2) {
                let index = (task + CALLERS * (n / 2)) % fleet;
                let open = pb::OpenServersRequest {
                    servers: vec![pb::OpenServerRequestData {
                        server_id: server_id(index),
                        ..Default::default()
                    }],
                    ..Default::default()
                };
                servers.open_servers(open).await.unwrap();
                n += 1;
            }
            (closes, n)
        }));
    }
    let mut closes = Vec::new();
    let mut made = 0;
    for caller in callers {
        let (mine, n) = caller.await.unwrap();
        closes.extend(mine);
        made += n;
    }
    heartbeats.abort();
    MADE.store(made as u64, std::sync::atomic::Ordering::Relaxed);
    closes
}

/// The changes (closes and opens) the last `make_changes` made.
static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Probes DescribeServers (one server, by id) at 200 calls a second (4
/// callers, 50 each) for `phase`: its latency histogram, in
/// microseconds. A fixed rate, so the probe measures latency and leaves
/// the broker's CPU to the load.
async fn probe_describe(url: &str, opts: &Opts, phase: Duration) -> Histogram<u64> {
    let mut tasks = Vec::new();
    for k in 0..4 {
        let url = url.to_owned();
        let fleet = opts.fleet;
        tasks.push(tokio::spawn(async move {
            let mut servers = ServersClient::new(channel(&url).await);
            let mut h = Histogram::<u64>::new(3).unwrap();
            let started = Instant::now();
            let mut i = k;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while started.elapsed() < phase {
                tick.tick().await;
                let request = pb::DescribeServersRequest {
                    server_ids: vec![server_id(i * 7919 % fleet)],
                    ..Default::default()
                };
                let t = Instant::now();
                servers.describe_servers(request).await.unwrap();
                h.record(t.elapsed().as_micros() as u64).unwrap();
                i += 4;
            }
            h
        }));
    }
    let mut all = Histogram::<u64>::new(3).unwrap();
    for task in tasks {
        all.add(task.await.unwrap()).unwrap();
    }
    all
}

/// What one watcher saw.
#[derive(Default)]
struct Seen {
    deliveries: u64,
    in_order: bool,
    /// Closes of its pool it saw, by Reason.
    closes: Vec<String>,
}

/// One watcher: reads its pool's changes until `stop`, timing each
/// close's delivery against `sent`.
async fn watch(
    channel: Channel,
    pool: String,
    sent: Sent,
    delays: Arc<Mutex<Histogram<u64>>>,
    ready: tokio::sync::mpsc::Sender<()>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Seen {
    let mut servers = ServersClient::new(channel);
    let request = pb::WatchServersRequest {
        filters: vec![pb::KeyValuePair {
            key: "tag:watchpool".into(),
            value: pool,
        }],
        ..Default::default()
    };
    let mut stream = servers.watch_servers(request).await.unwrap().into_inner();
    let mut seen = Seen {
        in_order: true,
        ..Default::default()
    };
    let mut last = 0;
    let mut local = Histogram::<u64>::new(3).unwrap();
    let mut announced = false;
    loop {
        let message = tokio::select! {
            m = stream.message() => m,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Ok(Some(message)) = message else {
            seen.in_order = false;
            break;
        };
        if message.snapshot_end && !announced {
            announced = true;
            let _ = ready.send(()).await;
        }
        let now = Instant::now();
        for change in message.changes {
            seen.in_order &= change.sequence > last;
            last = change.sequence;
            seen.deliveries += 1;
            let reason = change
                .server
                .as_ref()
                .and_then(|s| s.holds.first())
                .map(|h| h.reason.clone());
            if let Some(reason) = reason
                && change.r#type() == pb::ChangeType::Modified
            {
                if let Some(at) = sent.lock().unwrap().get(&reason) {
                    local
                        .record(now.duration_since(*at).as_micros() as u64)
                        .unwrap();
                }
                seen.closes.push(reason);
            }
        }
    }
    delays.lock().unwrap().add(local).unwrap();
    seen
}

async fn repetition(opts: &Opts) -> Row {
    let broker = start_broker();
    let pid = broker.child.id();
    register_fleet(&broker.url, opts).await;
    let mut row = Row::default();

    // A warm-up under the same load, not measured: the first seconds
    // after registering the fleet are slower (allocator, caches).
    tokio::join!(
        make_changes(&broker.url, opts, Sent::default(), Duration::from_secs(3)),
        probe_describe(&broker.url, opts, Duration::from_secs(3))
    );

    // Without watchers.
    let cpu0 = cpu_seconds(pid);
    let started = Instant::now();
    let sent: Sent = Arc::default();
    let (_, describe) = tokio::join!(
        make_changes(&broker.url, opts, sent.clone(), opts.phase),
        probe_describe(&broker.url, opts, opts.phase)
    );
    let made = MADE.load(std::sync::atomic::Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    row.rate_without = made as f64 / elapsed;
    row.cpu_without = (cpu_seconds(pid) - cpu0) / elapsed;
    row.cpu_per_change_without_us = (cpu_seconds(pid) - cpu0) / made.max(1) as f64 * 1e6;
    row.describe_p99_without_ms = describe.value_at_quantile(0.99) as f64 / 1000.0;

    // With watchers: 20 streams a connection.
    let sent: Sent = Arc::default();
    let delays = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(opts.watchers);
    let mut watchers = Vec::new();
    let mut connection = None;
    for w in 0..opts.watchers {
        if w.is_multiple_of(20) {
            connection = Some(channel(&broker.url).await);
        }
        let pool = pool_of(w, opts.pools);
        watchers.push((
            pool.clone(),
            tokio::spawn(watch(
                connection.clone().unwrap(),
                pool,
                sent.clone(),
                delays.clone(),
                ready_tx.clone(),
                stop_rx.clone(),
            )),
        ));
    }
    for _ in 0..opts.watchers {
        ready_rx.recv().await.unwrap();
    }
    let cpu0 = cpu_seconds(pid);
    let started = Instant::now();
    let (closes, describe) = tokio::join!(
        make_changes(&broker.url, opts, sent.clone(), opts.phase),
        probe_describe(&broker.url, opts, opts.phase)
    );
    let made = MADE.load(std::sync::atomic::Ordering::Relaxed);
    // Let the last changes arrive (the delay target is 50 ms).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    stop_tx.send_replace(true);
    let mut deliveries = 0;
    let mut complete = true;
    // Which closes each pool should have seen (callers run concurrently:
    // the order is the broker's, checked by sequence).
    let mut by_pool: HashMap<String, Vec<String>> = HashMap::new();
    for (index, reason) in closes {
        by_pool
            .entry(pool_of(index, opts.pools))
            .or_default()
            .push(reason);
    }
    for expected in by_pool.values_mut() {
        expected.sort();
    }
    for (pool, watcher) in watchers {
        let mut seen = watcher.await.unwrap();
        deliveries += seen.deliveries;
        seen.closes.sort();
        let expected = by_pool.get(&pool).cloned().unwrap_or_default();
        complete &= seen.in_order && seen.closes == expected;
    }
    row.rate_with = made as f64 / opts.phase.as_secs_f64();
    row.deliveries_per_s = deliveries as f64 / elapsed;
    row.cpu_with = cpu / elapsed;
    row.cpu_per_delivery_us = cpu / deliveries.max(1) as f64 * 1e6;
    row.extra_cpu_per_delivery_us =
        (row.cpu_with - row.cpu_without).max(0.0) / row.deliveries_per_s.max(1.0) * 1e6;
    row.cpu_per_change_with_us = cpu / made.max(1) as f64 * 1e6;
    let delays = delays.lock().unwrap();
    row.delay_p50_ms = delays.value_at_quantile(0.5) as f64 / 1000.0;
    row.delay_p99_ms = delays.value_at_quantile(0.99) as f64 / 1000.0;
    row.describe_p99_with_ms = describe.value_at_quantile(0.99) as f64 / 1000.0;
    row.complete = complete;
    eprintln!("{row:?}");
    row
}
