//! The agents benchmark (issue 14): one broker holding 10,000 agents over
//! real loopback connections.
//!
//! Run with `cargo bench --bench agents` (add `-- --quick` for a short run,
//! `-- --help` for the options). It starts the real release binary
//! (`dcv-broker --in-memory --listen 127.0.0.1:0`, heartbeats asked every
//! second, no demo fleet, the per-client rate off: without authentication
//! every agent on loopback is the same client, 127.0.0.1) and plays every
//! agent from this one process: each has its own tonic channel (its own
//! TCP and HTTP/2 connection), registers a distinct server with a
//! realistic description, opens its instruction stream and keeps it open,
//! and heartbeats every second, the agents spread evenly over the second.
//!
//! Phases alternate, B then A, `--reps` times:
//! - B, the same fleet without live connections: the servers registered
//!   (and heartbeated once) over one connection, or left behind by the
//!   agents of the previous A; they stay as they are for
//!   `--unreachable-after` (an hour here). The broker's idle CPU, then
//!   DescribeServers from a separate client.
//! - A, live: every agent connects (in waves of `--connect-concurrency`,
//!   so the broker's accept queue is never overrun), then heartbeats; a
//!   window of heartbeats alone (broker CPU per heartbeat, RSS, open
//!   descriptors, heartbeat latency, and what this load process costs),
//!   then DescribeServers windows as in B. Then every agent hangs up.
//!
//! DescribeServers comes in two forms, each one request at a time: paging
//! through the whole fleet with MaxResults 1000, and single-id lookups.
//! By default the broker and the DescribeServers client share CPU 0 and
//! the agents have CPU 1 to themselves, so that the agents' own cost does
//! not land on the latencies compared. Prints a table and writes
//! `target/bench-agents.json`; a run where any agent failed to come up,
//! lost its stream or had a heartbeat refused says INVALID and exits 1.

#[allow(dead_code)] // The bench uses a few of the test helper's methods.
#[path = "../tests/common/process.rs"]
mod process;

mod common;
#[path = "agents/reader.rs"]
mod reader;
#[path = "agents/report.rs"]
mod report;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use common::procfs::{cpu_seconds, open_fds, rss_bytes};
use dcv_broker::{
    demo, fleet,
    pb::{self, agent_client::AgentClient},
    wire,
};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use process::BrokerProcess;
use reader::{Describe, Latency, Reader};
use report::{load_average, mib, report};
use tokio::{
    sync::{Semaphore, watch},
    task::JoinSet,
    time::Instant,
};
use tonic::transport::Endpoint;

// ---------------------------------------------------------------- options

const HELP: &str = "\
cargo bench --bench agents -- [OPTIONS]

  --quick                   2 repetitions of 3 s windows (default: 3 of 10 s)
  --agents N                simulated agents, each its own connection (default 10000)
  --seconds N               length of each measured window
  --reps N                  B/A pairs (B: fleet without connections, A: live agents)
  --connect-concurrency N   agents connecting at once (default 100)
  --agent-threads N         tokio worker threads of the agents (default 1 pinned, 2 not)
  --agent-port              agents connect to a port of their own (--agent-listen)
  --no-pin                  do not pin the broker and DescribeServers client to CPU 0
                            and the agents to CPU 1
  --broker-flags \"...\"      more dcv-broker flags
  --out PATH                JSON output (default target/bench-agents.json)
";

/// How often the broker asks for heartbeats, and the agents send them.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// The broker's `--unreachable-after`: longer than any run, so that in
/// phase B the servers stay exactly as the agents left them.
const UNREACHABLE_AFTER: &str = "1h";

/// DescribeServers page size: DCV's largest.
const PAGE: i32 = 1000;

/// Longest the agents may take to come up, or the broker to let their
/// connections go, before the run gives up on it.
const PATIENCE: Duration = Duration::from_secs(180);

#[derive(Debug, Clone)]
struct Opts {
    agents: usize,
    window: Duration,
    reps: usize,
    warm_up: Duration,
    connect_concurrency: usize,
    agent_threads: Option<usize>,
    pin: bool,
    agent_port: bool,
    broker_flags: Vec<String>,
    out: PathBuf,
}

impl Opts {
    fn parse(args: &[String]) -> Opts {
        let quick = args.iter().any(|a| a == "--quick");
        let mut o = Opts {
            agents: 10_000,
            window: Duration::from_secs(if quick { 3 } else { 10 }),
            reps: if quick { 2 } else { 3 },
            warm_up: Duration::from_secs(2),
            connect_concurrency: 100,
            agent_threads: None,
            pin: true,
            agent_port: false,
            broker_flags: Vec::new(),
            out: Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-agents.json"),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().cloned().unwrap_or_default();
            match a.as_str() {
                "--quick" => {}
                "--help" | "-h" => {
                    print!("{HELP}");
                    std::process::exit(0);
                }
                "--agents" => o.agents = value().parse().unwrap(),
                "--seconds" => o.window = Duration::from_secs_f64(value().parse().unwrap()),
                "--reps" => o.reps = value().parse().unwrap(),
                "--connect-concurrency" => o.connect_concurrency = value().parse().unwrap(),
                "--agent-threads" => o.agent_threads = Some(value().parse().unwrap()),
                "--no-pin" => o.pin = false,
                "--agent-port" => o.agent_port = true,
                "--broker-flags" => {
                    o.broker_flags = value().split_whitespace().map(String::from).collect()
                }
                "--out" => o.out = value().into(),
                other => panic!("unknown option {other:?}; see --help"),
            }
        }
        assert!(
            o.agents > 0 && o.reps > 0,
            "--agents and --reps must be positive"
        );
        o
    }
}

fn main() {
    // cargo bench passes --bench to every bench binary.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut opts = Opts::parse(&args);
    if std::thread::available_parallelism().map_or(1, usize::from) < 2 {
        opts.pin = false;
    }
    // One descriptor per agent here, and one per agent in the broker (it
    // raises its own soft limit to the hard one; it inherits ours).
    let nofile = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let needed = opts.agents as u64 + 256;
    assert!(
        nofile >= needed,
        "the open-file limit is {nofile}, {needed} are needed: raise it (ulimit -Hn)"
    );
    if opts.pin {
        pin("-a", std::process::id(), 1);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.agent_threads.unwrap_or(if opts.pin { 1 } else { 2 }))
        .enable_all()
        .build()
        .unwrap();
    let valid = runtime.block_on(run(&opts));
    if !valid {
        std::process::exit(1);
    }
}

/// Pins `pid` (`-a`: with all its threads) to `cpu`.
fn pin(all: &str, pid: u32, cpu: usize) {
    let mut command = Command::new("taskset");
    if !all.is_empty() {
        command.arg(all);
    }
    let ok = command
        .args(["-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("warning: could not pin {pid} to CPU {cpu}");
    }
}

// ------------------------------------------------------------- the agents

/// The `index`-th agent's registration: the simulated fleet's realistic
/// host description with ten tags, as the load benchmark's fleet has.
fn registration(index: usize) -> pb::RegisterServerRequest {
    wire::registration_to_pb(&demo::server_id(index), &demo::tagged_description(index))
}

/// The `index`-th agent's heartbeat: the simulated fleet's (about a
/// quarter of the servers run a session), with memory and swap as a real
/// agent reports them.
fn heartbeat(index: usize) -> pb::HeartbeatRequest {
    let h = demo::heartbeat(index);
    let memory = |total: i64, used: i64| {
        Some(pb::MemoryInfo {
            total_bytes: total << 30,
            used_bytes: used << 30,
        })
    };
    pb::HeartbeatRequest {
        server_id: demo::server_id(index),
        dcv_server_healthy: h.dcv_server_healthy,
        logged_in_users: h
            .logged_in_users
            .into_iter()
            .map(|username| pb::LoggedInUser { username })
            .collect(),
        sessions: h
            .sessions
            .into_iter()
            .map(|s| pb::AgentSession {
                id: s.id,
                owner: s.owner,
                r#type: match s.kind {
                    fleet::SessionKind::Console => pb::SessionType::Console,
                    fleet::SessionKind::Virtual => pb::SessionType::Virtual,
                } as i32,
                state: wire::session_state_to_pb(s.state) as i32,
                num_of_connections: 1,
                ..Default::default()
            })
            .collect(),
        cpu_load_average: h.cpu_load_average.map(|l| pb::CpuLoadAverage {
            one_minute: l.one_minute,
            five_minutes: l.five_minutes,
            fifteen_minutes: l.fifteen_minutes,
        }),
        memory: memory(64, 12),
        swap: memory(8, 0),
    }
}

fn endpoint(addr: std::net::SocketAddr) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(30))
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

/// What the agents count, shared by all of them.
struct Tally {
    /// Agents whose connection, registration, first heartbeat and stream
    /// all succeeded.
    up: AtomicU64,
    /// Agents that failed to come up.
    failed: AtomicU64,
    heartbeats: AtomicU64,
    heartbeat_errors: AtomicU64,
    /// Instruction streams that ended while their agent was live.
    streams_lost: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Heartbeat latency seen by the agents, in µs, since the last reset.
    latency: Mutex<Histogram<u64>>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            up: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            heartbeat_errors: AtomicU64::new(0),
            streams_lost: AtomicU64::new(0),
            first_error: Mutex::new(None),
            latency: Mutex::new(histogram()),
        }
    }

    fn error(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.first_error.lock().get_or_insert(what);
    }
}

/// The schedule the agents follow: when heartbeats start (all agents up),
/// and when to hang up.
#[derive(Clone)]
struct Signals {
    go: watch::Receiver<Option<Instant>>,
    stop: watch::Receiver<bool>,
}

/// One agent: connects on its own connection, registers, heartbeats once,
/// opens its instruction stream; then, once every agent is up, heartbeats
/// every second at its own offset in the second, until told to stop.
async fn agent(
    index: usize,
    agents: usize,
    endpoint: Endpoint,
    connecting: Arc<Semaphore>,
    mut signals: Signals,
    tally: Arc<Tally>,
) {
    let server_id = demo::server_id(index);
    let beat = heartbeat(index);
    let permit = connecting.acquire().await.unwrap();
    let setup = async {
        // `connect`, not `connect_lazy`, and never a clone of another
        // agent's channel: a connection of its own.
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        let mut client = AgentClient::new(channel);
        client
            .register_server(registration(index))
            .await
            .map_err(|e| format!("RegisterServer: {e}"))?;
        client
            .heartbeat(beat.clone())
            .await
            .map_err(|e| format!("Heartbeat: {e}"))?;
        let stream = client
            .stream_instructions(pb::StreamInstructionsRequest {
                server_id: server_id.clone(),
            })
            .await
            .map_err(|e| format!("StreamInstructions: {e}"))?
            .into_inner();
        Ok::<_, String>((client, stream))
    };
    let (mut client, mut stream) = match setup.await {
        Ok(up) => up,
        Err(e) => {
            tally.error(&tally.failed, format!("agent {server_id}: {e}"));
            return;
        }
    };
    drop(permit);
    tally.up.fetch_add(1, Ordering::Relaxed);
    let start = tokio::select! {
        start = started(&mut signals.go) => start,
        () = stopped(&mut signals.stop) => return,
    };
    let Some(start) = start else { return };
    // Spread evenly over the interval, not in lockstep.
    let offset = HEARTBEAT_INTERVAL.mul_f64(index as f64 / agents as f64);
    let mut tick = tokio::time::interval_at(start + offset, HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let sent = Instant::now();
                match client.heartbeat(beat.clone()).await {
                    Ok(_) => {
                        let us = sent.elapsed().as_micros() as u64;
                        tally.heartbeats.fetch_add(1, Ordering::Relaxed);
                        let _ = tally.latency.lock().record(us.max(1));
                    }
                    Err(e) => tally.error(
                        &tally.heartbeat_errors,
                        format!("agent {server_id}: Heartbeat: {e}"),
                    ),
                }
            }
            message = stream.message() => match message {
                // No instructions are sent in this benchmark; one would be
                // ignored.
                Ok(Some(_)) => {}
                Ok(None) => {
                    tally.error(&tally.streams_lost, format!("agent {server_id}: stream ended"));
                    return;
                }
                Err(e) => {
                    tally.error(&tally.streams_lost, format!("agent {server_id}: stream: {e}"));
                    return;
                }
            },
            () = stopped(&mut signals.stop) => return,
        }
    }
}

/// When heartbeats start (`None` if the sender is gone).
async fn started(go: &mut watch::Receiver<Option<Instant>>) -> Option<Instant> {
    // The guard is not `Send`: copy the value out at once.
    go.wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|start| *start)
}

/// Resolves when the agents are told to hang up (or the sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

// ---------------------------------------------------------------- phases

/// Phase B: the fleet registered, no agent connected.
#[derive(Debug, Clone, Default)]
struct Idle {
    rss: u64,
    fds: usize,
    /// Broker CPU, in cores (1.0: one core busy).
    cpu: f64,
    pages: Latency,
    single: Latency,
}

/// Phase A: every agent connected and heartbeating.
#[derive(Debug, Clone, Default)]
struct Live {
    bring_up_s: f64,
    failed: u64,
    rss: u64,
    fds: usize,
    heartbeats_per_s: f64,
    hb_p50: f64,
    hb_p99: f64,
    hb_max: f64,
    /// Heartbeat p99 while the reader pages through the fleet.
    hb_p99_paging: f64,
    broker_cpu: f64,
    broker_us_per_hb: f64,
    load_cpu: f64,
    load_us_per_hb: f64,
    heartbeat_errors: u64,
    streams_lost: u64,
    pages: Latency,
    single: Latency,
}

struct Bench<'a> {
    opts: &'a Opts,
    broker: BrokerProcess,
    pid: u32,
    reader: Reader,
    /// The broker's descriptors with the reader's connection only.
    base_fds: usize,
}

impl Bench<'_> {
    /// Broker CPU (cores) and this process's, over `length`.
    async fn cpu_over(&self, length: Duration) -> (f64, f64, f64) {
        let me = std::process::id();
        let (b0, l0, t0) = (cpu_seconds(self.pid), cpu_seconds(me), Instant::now());
        tokio::time::sleep(length).await;
        let secs = t0.elapsed().as_secs_f64();
        (
            (cpu_seconds(self.pid) - b0) / secs,
            (cpu_seconds(me) - l0) / secs,
            secs,
        )
    }

    /// Registers every server (and heartbeats it once, so that its record
    /// holds what the agents will report) over one connection.
    async fn seed(&self, addr: std::net::SocketAddr) {
        let channel = endpoint(addr).connect().await.unwrap();
        let agents = self.opts.agents;
        let mut tasks = JoinSet::new();
        for lane in 0..16 {
            let mut client = AgentClient::new(channel.clone());
            tasks.spawn(async move {
                for index in (lane..agents).step_by(16) {
                    client.register_server(registration(index)).await.unwrap();
                    client.heartbeat(heartbeat(index)).await.unwrap();
                }
            });
        }
        tasks.join_all().await;
    }

    /// Waits until the broker holds no connection but the reader's.
    async fn wait_connections_gone(&self) -> Result<Duration, usize> {
        let started = Instant::now();
        loop {
            let fds = open_fds(self.pid);
            if fds <= self.base_fds + 2 {
                return Ok(started.elapsed());
            }
            if started.elapsed() > PATIENCE {
                return Err(fds);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn idle(&self) -> Idle {
        let (cpu, _, _) = self.cpu_over(self.opts.window).await;
        Idle {
            rss: rss_bytes(self.pid),
            fds: open_fds(self.pid),
            cpu,
            pages: self.reader.window(Describe::Pages, self.opts.window).await,
            single: self.reader.window(Describe::Single, self.opts.window).await,
        }
    }

    async fn live(&self) -> Live {
        let opts = self.opts;
        let n = opts.agents;
        let tally = Arc::new(Tally::new());
        let (go_tx, go) = watch::channel(None);
        let (stop_tx, stop) = watch::channel(false);
        let connecting = Arc::new(Semaphore::new(opts.connect_concurrency.max(1)));
        let endpoint = endpoint(self.broker.agent_addr.unwrap_or(self.broker.addr));
        let started = Instant::now();
        let mut agents = JoinSet::new();
        for index in 0..n {
            agents.spawn(agent(
                index,
                n,
                endpoint.clone(),
                connecting.clone(),
                Signals {
                    go: go.clone(),
                    stop: stop.clone(),
                },
                tally.clone(),
            ));
        }
        // Bounded polling of the tally: every agent up or failed.
        while tally.up.load(Ordering::Relaxed) + tally.failed.load(Ordering::Relaxed) < n as u64 {
            assert!(started.elapsed() < PATIENCE, "agents still connecting");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut out = Live {
            bring_up_s: started.elapsed().as_secs_f64(),
            failed: tally.failed.load(Ordering::Relaxed),
            fds: open_fds(self.pid),
            ..Live::default()
        };
        let _ = go_tx.send(Some(Instant::now() + Duration::from_millis(20)));
        tokio::time::sleep(opts.warm_up).await;

        // Heartbeats alone.
        let beats = || tally.heartbeats.load(Ordering::Relaxed);
        tally.latency.lock().reset();
        let before = beats();
        let (broker_cpu, load_cpu, secs) = self.cpu_over(opts.window).await;
        let served = (beats() - before) as f64;
        {
            let h = tally.latency.lock();
            out.hb_p50 = h.value_at_quantile(0.5) as f64;
            out.hb_p99 = h.value_at_quantile(0.99) as f64;
            out.hb_max = h.max() as f64;
        }
        out.rss = rss_bytes(self.pid);
        out.fds = out.fds.max(open_fds(self.pid));
        out.heartbeats_per_s = served / secs;
        out.broker_cpu = broker_cpu;
        out.load_cpu = load_cpu;
        out.broker_us_per_hb = broker_cpu * secs * 1e6 / served.max(1.0);
        out.load_us_per_hb = load_cpu * secs * 1e6 / served.max(1.0);

        // DescribeServers while they run.
        tally.latency.lock().reset();
        out.pages = self.reader.window(Describe::Pages, opts.window).await;
        out.hb_p99_paging = tally.latency.lock().value_at_quantile(0.99) as f64;
        out.single = self.reader.window(Describe::Single, opts.window).await;

        out.heartbeat_errors = tally.heartbeat_errors.load(Ordering::Relaxed);
        out.streams_lost = tally.streams_lost.load(Ordering::Relaxed);
        if let Some(e) = tally.first_error.lock().as_ref() {
            eprintln!("first agent error: {e}");
        }
        // Every agent hangs up: its task ends, dropping its stream and
        // channel, which closes its connection.
        let _ = stop_tx.send(true);
        agents.join_all().await;
        out
    }
}

async fn run(opts: &Opts) -> bool {
    let log_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-agents-broker.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let max_connections = (opts.agents + 1000).to_string();
    let interval = format!("{}s", HEARTBEAT_INTERVAL.as_secs());
    let mut args: Vec<&str> = vec![
        "--in-memory",
        "--heartbeat-interval",
        &interval,
        "--unreachable-after",
        UNREACHABLE_AFTER,
        "--remove-after",
        "2h",
        // Without authentication a client is its address: every agent
        // here is 127.0.0.1, one client.
        "--client-rate",
        "0",
    ];
    if !opts.agent_port {
        args.extend(["--max-connections", &max_connections]);
    } else {
        // The main port then only serves the DescribeServers client and the
        // seeding: a small cap leaves the open-file room to the agents'.
        args.extend([
            "--agent-listen",
            "127.0.0.1:0",
            "--agent-max-connections",
            &max_connections,
            "--max-connections",
            "100",
        ]);
    }
    args.extend(opts.broker_flags.iter().map(String::as_str));
    let broker = BrokerProcess::start_exactly_logging_to(&args, log).await;
    let pid = broker.pid();
    if opts.pin {
        pin("-a", pid, 0);
    }
    let empty_rss = rss_bytes(pid);
    let reader = Reader::start(broker.addr, opts.agents, opts.pin.then_some(0)).await;
    let base_fds = open_fds(pid);
    let bench = Bench {
        opts,
        broker,
        pid,
        reader,
        base_fds,
    };
    let seeding = Instant::now();
    bench.seed(bench.broker.addr).await;
    let seed_s = seeding.elapsed().as_secs_f64();
    if let Err(fds) = bench.wait_connections_gone().await {
        panic!("the seeding connection is still open ({fds} descriptors)");
    }
    let fleet_rss = rss_bytes(pid);
    println!(
        "broker {} (pid {pid}), {} servers registered in {seed_s:.1} s; RSS {} empty, {} with the fleet",
        bench.broker.addr,
        opts.agents,
        mib(empty_rss),
        mib(fleet_rss)
    );

    let load_before = load_average();
    let mut idle = Vec::new();
    let mut live = Vec::new();
    let mut closing = Vec::new();
    let mut valid = true;
    for rep in 0..opts.reps {
        let b = bench.idle().await;
        println!(
            "rep {rep} B: pages p99 {:.0} µs ({} servers a walk), single p99 {:.0} µs, broker CPU {:.1}%",
            b.pages.p99,
            b.pages.walked,
            b.single.p99,
            b.cpu * 100.0
        );
        if b.pages.walked != opts.agents as u64 || b.pages.errors + b.single.errors > 0 {
            println!(
                "INVALID: phase B saw {} servers, {} errors",
                b.pages.walked,
                b.pages.errors + b.single.errors
            );
            valid = false;
        }
        idle.push(b);
        let a = bench.live().await;
        println!(
            "rep {rep} A: {} agents up in {:.1} s ({} failed), {} broker fds; {:.0} heartbeats/s, \
             p99 {:.0} µs; broker {:.1} µs CPU/heartbeat; pages p99 {:.0} µs, single p99 {:.0} µs",
            opts.agents as u64 - a.failed,
            a.bring_up_s,
            a.failed,
            a.fds,
            a.heartbeats_per_s,
            a.hb_p99,
            a.broker_us_per_hb,
            a.pages.p99,
            a.single.p99
        );
        if a.failed + a.heartbeat_errors + a.streams_lost + a.pages.errors + a.single.errors > 0
            || a.pages.walked != opts.agents as u64
        {
            println!(
                "INVALID: {} agents failed to come up, {} heartbeats refused, {} streams lost, \
                 {} DescribeServers errors, {} servers a walk",
                a.failed,
                a.heartbeat_errors,
                a.streams_lost,
                a.pages.errors + a.single.errors,
                a.pages.walked
            );
            valid = false;
        }
        let asked = opts.agents as f64 / HEARTBEAT_INTERVAL.as_secs_f64();
        if a.heartbeats_per_s < 0.9 * asked {
            println!(
                "INVALID: the agents sent {:.0} heartbeats/s of the {asked:.0} asked (the machine \
                 is too busy: see the load average)",
                a.heartbeats_per_s
            );
            valid = false;
        }
        live.push(a);
        match bench.wait_connections_gone().await {
            Ok(took) => closing.push(took.as_secs_f64()),
            Err(fds) => {
                println!("INVALID: the broker still holds {fds} descriptors after the agents left");
                valid = false;
            }
        }
    }
    let machine = format!(
        "load average {load_before} before, {} after",
        load_average()
    );
    report(
        opts, &machine, empty_rss, fleet_rss, seed_s, &idle, &live, &closing, valid,
    );
    drop(bench.reader);
    bench.broker.terminate().await;
    valid
}
