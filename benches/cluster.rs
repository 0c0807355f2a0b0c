//! The cluster benchmark (issue 16): the cost of replication on writes,
//! against the single broker on SQLite and a bare tonic echo in the same
//! run, and the time a failover takes.
//!
//! Run with `cargo bench --bench cluster` (add `-- --quick` for a short
//! run, `-- --help` for the options). It starts, all on 127.0.0.1:
//! - `serve-echo`: this binary re-executed as bare tonic 0.14, no layers,
//!   the generated `Servers` service answering Close/OpenServers with the
//!   ids it was sent (the cost of gRPC alone);
//! - the release `dcv-broker` on SQLite (`--data-dir` in a fresh
//!   temporary directory): the single broker, every write fsynced;
//! - a throwaway PostgreSQL (fsync on; `tests/common/postgres.rs`, or
//!   `DCV_BROKER_TEST_DATABASE_URL`'s server) and three `dcv-broker`
//!   replicas on it (`--database-url`, `--leader-lease 1s`), through the
//!   test harness's `Replica`;
//!
//! registers 1,000 servers on each broker, then drives, in this order
//! within each repetition so that every ratio compares figures taken
//! seconds apart: single-item Close/Open (each task alternately closes
//! and opens a server of its own, so every call changes state and
//! commits) at 1×1 and 4×16 (connections × calls in flight), and batches
//! of 1,000 Close/Open at 1×1, against echo, SQLite, the leader and a
//! follower. Then failovers: the leader is SIGKILLed while four writers
//! send single-item closes and opens through every replica; the time from
//! the kill to the first acknowledged write sent after it, and to a
//! leader in health; the killed replica is restarted and rejoins as a
//! follower before the next kill.
//!
//! Every figure is the median over the repetitions. Prints a table and
//! writes `target/bench-cluster.json`.

#[allow(dead_code)] // The bench uses a few of the test helper's functions.
#[path = "../tests/common/postgres.rs"]
mod postgres;
#[allow(dead_code)]
#[path = "../tests/common/process.rs"]
mod process;

#[allow(dead_code)] // Only the median is used here.
mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::procfs::median;
use dcv_broker::pb::{
    self,
    agent_client::AgentClient,
    servers_client::ServersClient,
    servers_server::{Servers, ServersServer},
};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use process::{BrokerProcess, Replica, wait_for_leader, wait_for_leader_among};
use tokio::time::Instant;
use tonic::{
    Request, Response, Status,
    transport::{Channel, Endpoint, Server},
};

const HELP: &str = "\
cargo bench --bench cluster -- [OPTIONS]

  --quick        1 s windows, 3 repetitions, 3 failovers (default: 3 s, 5, 10)
  --seconds N    length of each measured window
  --reps N       repetitions of every scenario
  --kills N      failovers measured
  --out PATH     JSON output (default target/bench-cluster.json)
";

/// Servers registered on each broker: one per task, and a batch's worth.
const SERVERS: usize = 1000;
const WARM_UP: Duration = Duration::from_millis(500);

struct Opts {
    window: Duration,
    reps: usize,
    kills: usize,
    out: PathBuf,
}

impl Opts {
    fn parse(args: &[String]) -> Opts {
        let quick = args.iter().any(|a| a == "--quick");
        let mut o = Opts {
            window: Duration::from_secs(if quick { 1 } else { 3 }),
            reps: if quick { 3 } else { 5 },
            kills: if quick { 3 } else { 10 },
            out: Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-cluster.json"),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().cloned().unwrap_or_default();
            match a.as_str() {
                "--quick" | "--bench" => {}
                "--help" | "-h" => {
                    print!("{HELP}");
                    std::process::exit(0);
                }
                "--seconds" => {
                    o.window = Duration::from_secs_f64(value().parse().expect("--seconds N"))
                }
                "--reps" => o.reps = value().parse().expect("--reps N"),
                "--kills" => o.kills = value().parse().expect("--kills N"),
                "--out" => o.out = PathBuf::from(value()),
                other => panic!("unknown option {other:?}\n{HELP}"),
            }
        }
        o
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve-echo") {
        return serve_echo();
    }
    let opts = Opts::parse(&args);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(opts));
}

// ---------------------------------------------------------------- the echo

/// Bare tonic: Close/OpenServers answer with the ids they were sent.
struct Echo;

#[tonic::async_trait]
impl Servers for Echo {
    async fn close_servers(
        &self,
        request: Request<pb::CloseServersRequest>,
    ) -> Result<Response<pb::CloseServersResponse>, Status> {
        let successful_list = request
            .into_inner()
            .servers
            .into_iter()
            .map(|s| pb::CloseServerSuccessfulResponse {
                server_id: s.server_id,
            })
            .collect();
        Ok(Response::new(pb::CloseServersResponse {
            successful_list,
            ..Default::default()
        }))
    }

    async fn open_servers(
        &self,
        request: Request<pb::OpenServersRequest>,
    ) -> Result<Response<pb::OpenServersResponse>, Status> {
        let successful_list = request
            .into_inner()
            .servers
            .into_iter()
            .map(|s| pb::OpenServerSuccessfulResponse {
                server_id: s.server_id,
            })
            .collect();
        Ok(Response::new(pb::OpenServersResponse {
            successful_list,
            ..Default::default()
        }))
    }

    async fn describe_servers(
        &self,
        _: Request<pb::DescribeServersRequest>,
    ) -> Result<Response<pb::DescribeServersResponse>, Status> {
        Err(Status::unimplemented("not benchmarked"))
    }

    async fn describe_server_history(
        &self,
        _: Request<pb::DescribeServerHistoryRequest>,
    ) -> Result<Response<pb::DescribeServerHistoryResponse>, Status> {
        Err(Status::unimplemented("not benchmarked"))
    }

    async fn drain_servers(
        &self,
        _: Request<pb::DrainServersRequest>,
    ) -> Result<Response<pb::DrainServersResponse>, Status> {
        Err(Status::unimplemented("not benchmarked"))
    }

    async fn describe_drains(
        &self,
        _: Request<pb::DescribeDrainsRequest>,
    ) -> Result<Response<pb::DescribeDrainsResponse>, Status> {
        Err(Status::unimplemented("not benchmarked"))
    }

    type WatchServersStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::WatchServersResponse, Status>> + Send>,
    >;

    async fn watch_servers(
        &self,
        _: Request<pb::WatchServersRequest>,
    ) -> Result<Response<Self::WatchServersStream>, Status> {
        Err(Status::unimplemented("not benchmarked"))
    }
}

/// The `serve-echo` child: one tokio worker, prints `ready ADDR`, serves
/// until its parent closes its stdin.
fn serve_echo() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        println!("ready {addr}");
        std::io::stdout().flush().unwrap();
        let parent_gone = async {
            let _ = tokio::task::spawn_blocking(|| {
                let mut sink = Vec::new();
                let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            })
            .await;
        };
        Server::builder()
            .add_service(ServersServer::new(Echo))
            .serve_with_incoming_shutdown(incoming, parent_gone)
            .await
            .unwrap();
    });
}

/// The echo child process; killed when dropped.
struct EchoProcess {
    child: Child,
    addr: SocketAddr,
}

impl EchoProcess {
    fn start() -> EchoProcess {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .arg("serve-echo")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the echo");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("the echo said {line:?}"))
            .parse()
            .unwrap();
        EchoProcess { child, addr }
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------ measurement

fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .connect_lazy()
}

fn server_id(i: usize) -> String {
    format!("bench-{i:04}")
}

/// What one window measured.
#[derive(Clone, Copy, Default)]
struct Figures {
    calls_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

/// Drives `target` with `connections` × `in_flight` tasks, each
/// alternately closing and opening `batch` servers of its own (task t of
/// a single-item load owns server t; a batch covers servers 0..batch).
async fn drive(
    target: SocketAddr,
    connections: usize,
    in_flight: usize,
    batch: usize,
    window: Duration,
) -> Figures {
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let errors = Arc::new(Mutex::new(0u64));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let ch = channel(target);
        for m in 0..in_flight {
            let task = c * in_flight + m;
            let ids: Vec<String> = if batch == 1 {
                vec![server_id(task)]
            } else {
                (0..batch).map(server_id).collect()
            };
            let mut client = ServersClient::new(ch.clone());
            let (histogram, errors, measuring, stop) = (
                histogram.clone(),
                errors.clone(),
                measuring.clone(),
                stop.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut close = true;
                let mut local = Histogram::<u64>::new(3).unwrap();
                let mut failed = 0;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let ok = if close {
                        client
                            .close_servers(pb::CloseServersRequest {
                                servers: ids
                                    .iter()
                                    .map(|id| pb::CloseServerRequestData {
                                        server_id: id.clone(),
                                        force: Some(true),
                                        reason: "bench".into(),
                                        ..Default::default()
                                    })
                                    .collect(),
                                ..Default::default()
                            })
                            .await
                            .is_ok_and(|r| r.get_ref().unsuccessful_list.is_empty())
                    } else {
                        client
                            .open_servers(pb::OpenServersRequest {
                                servers: ids
                                    .iter()
                                    .map(|id| pb::OpenServerRequestData {
                                        server_id: id.clone(),
                                        ..Default::default()
                                    })
                                    .collect(),
                                ..Default::default()
                            })
                            .await
                            .is_ok_and(|r| r.get_ref().unsuccessful_list.is_empty())
                    };
                    close = !close;
                    if measuring.load(Ordering::Relaxed) {
                        if ok {
                            let _ = local.record(started.elapsed().as_micros() as u64);
                        } else {
                            failed += 1;
                        }
                    }
                }
                histogram.lock().add(&local).unwrap();
                *errors.lock() += failed;
            }));
        }
    }
    tokio::time::sleep(WARM_UP).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(window).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let h = histogram.lock();
    Figures {
        calls_per_s: h.len() as f64 / elapsed.as_secs_f64(),
        p50_us: h.value_at_quantile(0.5) as f64,
        p99_us: h.value_at_quantile(0.99) as f64,
        errors: *errors.lock(),
    }
}

fn median_of(figures: &[Figures]) -> Figures {
    Figures {
        calls_per_s: median(figures.iter().map(|f| f.calls_per_s).collect()),
        p50_us: median(figures.iter().map(|f| f.p50_us).collect()),
        p99_us: median(figures.iter().map(|f| f.p99_us).collect()),
        errors: figures.iter().map(|f| f.errors).sum(),
    }
}

async fn register(addr: SocketAddr) {
    let mut agent = AgentClient::new(channel(addr));
    for i in 0..SERVERS {
        let host = pb::Host {
            os: Some(pb::Os {
                family: "linux".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        agent
            .register_server(pb::RegisterServerRequest {
                server_id: server_id(i),
                ip: "192.0.2.1".into(),
                host: Some(host),
                max_virtual_sessions: 4,
                ..Default::default()
            })
            .await
            .expect("register a bench server");
    }
}

// ------------------------------------------------------------------ run

const TARGETS: [&str; 4] = ["echo", "sqlite", "leader", "follower"];
/// (name, connections, in flight, batch)
const SCENARIOS: [(&str, usize, usize, usize); 3] = [
    ("Close/Open, 1 item", 1, 1, 1),
    ("Close/Open, 1 item", 4, 16, 1),
    ("Close/Open, 1,000 items", 1, 1, 1000),
];

async fn run(opts: Opts) {
    let echo = EchoProcess::start();
    let sqlite_dir =
        std::env::temp_dir().join(format!("dcv-broker-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&sqlite_dir).unwrap();
    let sqlite = BrokerProcess::start_exactly(&[
        "--data-dir",
        sqlite_dir.to_str().unwrap(),
        "--auth",
        "off",
        "--client-rate",
        "0",
        "--max-concurrent-requests",
        "0",
        "--log",
        "warn",
    ])
    .await;
    let db = postgres::TestDatabase::new().await;
    let extra = ["--max-concurrent-requests", "0"];
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(Replica::start(&db.url, &format!("bench-{i}"), &extra).await);
    }
    let mut leader = wait_for_leader(&replicas, Duration::from_secs(30)).await;
    let follower = (leader + 1) % 3;
    replicas[follower]
        .wait_following(Duration::from_secs(30))
        .await;
    register(sqlite.addr).await;
    register(replicas[leader].addr).await;
    eprintln!(
        "echo {}, sqlite {}, leader {} ({}), follower {} ({}); {SERVERS} servers each",
        echo.addr,
        sqlite.addr,
        replicas[leader].node,
        replicas[leader].addr,
        replicas[follower].node,
        replicas[follower].addr
    );

    let addrs = [
        echo.addr,
        sqlite.addr,
        replicas[leader].addr,
        replicas[follower].addr,
    ];
    let mut results = vec![vec![Vec::new(); TARGETS.len()]; SCENARIOS.len()];
    for rep in 0..opts.reps {
        for (s, &(_, c, m, batch)) in SCENARIOS.iter().enumerate() {
            for (t, addr) in addrs.iter().enumerate() {
                let f = drive(*addr, c, m, batch, opts.window).await;
                results[s][t].push(f);
            }
        }
        eprintln!("repetition {} of {} done", rep + 1, opts.reps);
    }

    // Failovers.
    let (failovers, elections) = failovers(&mut replicas, &mut leader, opts.kills).await;

    // The report.
    let mut json_rows = Vec::new();
    println!(
        "\n| scenario | load | target | calls/s | items/s | p50 µs | p99 µs | calls/s ÷ echo | p50 ÷ echo | errors |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (s, &(name, c, m, batch)) in SCENARIOS.iter().enumerate() {
        let echo_f = median_of(&results[s][0]);
        for (t, target) in TARGETS.iter().enumerate() {
            let f = median_of(&results[s][t]);
            println!(
                "| {name} | {c}×{m} | {target} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {} |",
                f.calls_per_s,
                f.calls_per_s * batch as f64,
                f.p50_us,
                f.p99_us,
                f.calls_per_s / echo_f.calls_per_s,
                f.p50_us / echo_f.p50_us,
                f.errors
            );
            json_rows.push(serde_json::json!({
                "scenario": name, "connections": c, "in_flight": m, "batch": batch,
                "target": target, "calls_per_s": f.calls_per_s, "p50_us": f.p50_us,
                "p99_us": f.p99_us, "errors": f.errors,
            }));
        }
        let leader_f = median_of(&results[s][2]);
        let follower_f = median_of(&results[s][3]);
        let sqlite_f = median_of(&results[s][1]);
        println!(
            "| {name} | {c}×{m} | follower ÷ leader | {:.2} | | {:.2} | {:.2} | | | |",
            follower_f.calls_per_s / leader_f.calls_per_s,
            follower_f.p50_us / leader_f.p50_us,
            follower_f.p99_us / leader_f.p99_us
        );
        println!(
            "| {name} | {c}×{m} | leader ÷ sqlite | {:.2} | | {:.2} | {:.2} | | | |",
            leader_f.calls_per_s / sqlite_f.calls_per_s,
            leader_f.p50_us / sqlite_f.p50_us,
            leader_f.p99_us / sqlite_f.p99_us
        );
    }
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let stat = |v: &[Duration]| {
        let xs: Vec<f64> = v.iter().map(ms).collect();
        (median(xs.clone()), xs.iter().copied().fold(0.0, f64::max))
    };
    let (f_med, f_max) = stat(&failovers);
    let (e_med, e_max) = stat(&elections);
    println!(
        "\nfailover over {} kills (lease 1 s): kill to first acknowledged write median {f_med:.0} ms, \
         max {f_max:.0} ms; kill to a leader in health median {e_med:.0} ms, max {e_max:.0} ms",
        failovers.len()
    );
    let json = serde_json::json!({
        "window_s": opts.window.as_secs_f64(),
        "reps": opts.reps,
        "rows": json_rows,
        "failover_ms": failovers.iter().map(ms).collect::<Vec<_>>(),
        "election_ms": elections.iter().map(ms).collect::<Vec<_>>(),
    });
    if let Some(dir) = opts.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&opts.out, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    eprintln!("wrote {}", opts.out.display());

    for r in &mut replicas {
        r.terminate().await;
    }
    sqlite.terminate().await;
    let _ = std::fs::remove_dir_all(&sqlite_dir);
}

/// Kills the leader `kills` times under four writers sending single-item
/// closes and opens through every replica; returns the times from each
/// kill to the first acknowledged write sent after it, and to a leader
/// in health.
async fn failovers(
    replicas: &mut [Replica],
    leader: &mut usize,
    kills: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let mark: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let first: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let channels: Vec<Channel> = replicas.iter().map(Replica::channel).collect();
    let mut writers = Vec::new();
    for w in 0..4usize {
        let (channels, mark, first, stop) =
            (channels.clone(), mark.clone(), first.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let ids = [server_id(w)];
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let mut client = ServersClient::new(channels[(k + w) % channels.len()].clone());
                let sent = Instant::now();
                let ok = if k.is_multiple_of(2) {
                    client
                        .close_servers(pb::CloseServersRequest {
                            servers: vec![pb::CloseServerRequestData {
                                server_id: ids[0].clone(),
                                force: Some(true),
                                reason: "failover".into(),
                                ..Default::default()
                            }],
                            ..Default::default()
                        })
                        .await
                        .is_ok()
                } else {
                    client
                        .open_servers(pb::OpenServersRequest {
                            servers: vec![pb::OpenServerRequestData {
                                server_id: ids[0].clone(),
                                ..Default::default()
                            }],
                            ..Default::default()
                        })
                        .await
                        .is_ok()
                };
                if ok {
                    if mark.lock().is_some_and(|m| sent > m) {
                        first.lock().get_or_insert_with(Instant::now);
                    }
                } else {
                    // A pause before retrying, so a dead replica is no
                    // busy loop.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    let mut failovers = Vec::new();
    let mut elections = Vec::new();
    for kill in 0..kills {
        let killed = *leader;
        replicas[killed].kill().await;
        let at = Instant::now();
        *first.lock() = None;
        *mark.lock() = Some(at);
        let others: Vec<usize> = (0..replicas.len()).filter(|i| *i != killed).collect();
        *leader = wait_for_leader_among(replicas, &others, Duration::from_secs(30)).await;
        elections.push(at.elapsed());
        let deadline = at + Duration::from_secs(30);
        let served = loop {
            if let Some(t) = *first.lock() {
                break t;
            }
            assert!(
                Instant::now() < deadline,
                "no write acknowledged after kill {kill}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        failovers.push(served - at);
        *mark.lock() = None;
        replicas[killed].restart().await;
        replicas[killed]
            .wait_following(Duration::from_secs(30))
            .await;
        eprintln!("kill {}: first write after {:?}", kill + 1, served - at);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    (failovers, elections)
}
