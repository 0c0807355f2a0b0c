//! The load benchmark (issue 6): the broker against a bare tonic echo in
//! the same run, and the broker's memory per server.
//!
//! Run with `cargo bench --bench load` (add `-- --quick` for a short run,
//! `-- --help` for the options). It re-executes itself as two server
//! processes, `serve-echo` (bare tonic, no layers, the same generated
//! services answering with canned replies of the same size as the
//! broker's) and `serve-broker` (the library's `serve` with the flags the
//! binary would get: `--in-memory --client-rate 0 ...`, logging at INFO
//! like the binary, and a simulated fleet whose servers have realistic
//! host descriptions and ten tags each). Both run on the same tokio
//! runtime settings, pinned to one core; the load generator runs pinned to
//! the other core and drives echo then broker for each scenario, so each
//! ratio compares two figures taken a few seconds apart.
//! The `tls` scenario adds a broker with `--auth on`: it registers a client
//! for the generator and hands the parent its bearer token on the line
//! that announces the port, and the run stops unless it refuses a call
//! without the token.
//! The `metrics` scenario (issue 17) compares the broker with its metrics
//! on (the default) and off (`--metrics false`), alternating.
//! The `rest` scenario (issue 15) sends DCV's REST CloseServers of one item
//! and gRPC's CloseServers of one item to the same broker, both with
//! h2load, alternating repetitions; over h2c, then REST over HTTP/1.1.
//!
//! Generators: a tonic client (C connections x M requests in flight, a
//! warm-up, then R windows; latency in an HDR histogram) for every
//! scenario, and h2load with a pre-encoded gRPC body, when installed, for
//! the single-item ones (it costs the client side much less CPU). Server
//! CPU is read from `/proc/<pid>/stat`. Every figure is the median over the
//! windows. Prints a table and writes `target/bench-load.json`.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read as _, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser as _;
use common::procfs::{self, cpu_seconds, median};
use dcv_broker::{
    api::{ServersApi, SessionsApi},
    auth::{Auth, Scope, ScopeSet},
    config::Args,
    demo,
    fleet::{Fleet, FleetConfig},
    pb::{
        self, servers_client::ServersClient, servers_server::Servers,
        servers_server::ServersServer, sessions_client::SessionsClient, sessions_server::Sessions,
        sessions_server::SessionsServer,
    },
    serve, serve_tls,
    store::SqliteStore,
    telemetry,
    tls::ServerTls,
};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use prost::Message as _;
use tokio::net::TcpListener;
use tonic::{
    Code, Request, Response, Status,
    metadata::AsciiMetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Server, server::TcpIncoming},
};

mod common;

// ---------------------------------------------------------------- options

const HELP: &str = "\
cargo bench --bench load -- [OPTIONS]

  --quick                short windows, fewer scenarios, no 1,000,000-server memory run
  --fleet N              simulated servers in the broker under load (default 10000)
  --memory N,N,...       fleets whose resident memory is measured (default 10000,100000,1000000)
  --server-threads N     tokio worker threads of both servers (default 1)
  --client-threads N     tokio worker threads of the load generator (default 1)
  --no-pin               do not pin servers to CPU 0 and the generator to CPU 1
  --no-h2load            skip the h2load runs
  --in-flight N          the broker's --max-concurrent-requests (default 0: off; the
                         binary's default is 256, below 16x64 = 1024)
  --broker-flags \"...\"   more dcv-broker flags for the brokers (e.g. \"--log warn\")
  --only NAME,...        only these scenarios (NAME* : every name starting with NAME)
  --reps N  --warm-up-ms N  --window-ms N
  --out PATH             JSON output (default target/bench-load.json)
";

#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    fleet: usize,
    memory: Vec<usize>,
    server_threads: usize,
    client_threads: usize,
    pin: bool,
    h2load: bool,
    in_flight: usize,
    broker_flags: Vec<String>,
    only: Vec<String>,
    reps: usize,
    warm_up: Duration,
    window: Duration,
    out: PathBuf,
}

impl Opts {
    fn parse(args: &[String]) -> Opts {
        let quick = args.iter().any(|a| a == "--quick");
        let mut o = Opts {
            quick,
            fleet: 10_000,
            memory: if quick {
                vec![10_000, 100_000]
            } else {
                vec![10_000, 100_000, 1_000_000]
            },
            server_threads: 1,
            client_threads: 1,
            pin: true,
            h2load: true,
            in_flight: 0,
            broker_flags: Vec::new(),
            only: Vec::new(),
            reps: 3,
            warm_up: Duration::from_millis(if quick { 300 } else { 1000 }),
            window: Duration::from_millis(if quick { 700 } else { 2000 }),
            out: Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-load.json"),
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
                "--fleet" => o.fleet = value().parse().unwrap(),
                "--memory" => {
                    o.memory = value()
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(|s| s.parse().unwrap())
                        .collect()
                }
                "--server-threads" => o.server_threads = value().parse().unwrap(),
                "--client-threads" => o.client_threads = value().parse().unwrap(),
                "--no-pin" => o.pin = false,
                "--no-h2load" => o.h2load = false,
                "--in-flight" => o.in_flight = value().parse().unwrap(),
                "--broker-flags" => {
                    o.broker_flags = value().split_whitespace().map(String::from).collect()
                }
                "--only" => o.only = value().split(',').map(String::from).collect(),
                "--reps" => o.reps = value().parse().unwrap(),
                "--warm-up-ms" => o.warm_up = Duration::from_millis(value().parse().unwrap()),
                "--window-ms" => o.window = Duration::from_millis(value().parse().unwrap()),
                "--out" => o.out = value().into(),
                other => panic!("unknown option {other:?}; see --help"),
            }
        }
        o
    }

    fn wants(&self, name: &str) -> bool {
        self.only.is_empty()
            || self.only.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == p,
            })
    }
}

fn main() {
    // cargo bench passes --bench to every bench binary.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args.first().map(String::as_str) {
        Some("serve-echo") => child::run(child::Kind::Echo, &args[1..]),
        Some("serve-broker") => child::run(child::Kind::Broker, &args[1..]),
        _ => harness(Opts::parse(&args)),
    }
}

// ------------------------------------------------------ the simulated fleet

fn server_ids(n: usize) -> Arc<Vec<String>> {
    Arc::new((0..n).map(demo::server_id).collect())
}

// ---------------------------------------------------------- the servers

mod child {
    //! The server processes: `serve-echo` and `serve-broker`.

    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        Echo,
        Broker,
    }

    struct ChildOpts {
        threads: usize,
        fleet: usize,
        store: Option<PathBuf>,
        tls: Option<PathBuf>,
        in_flight: usize,
        /// More broker flags (after `--`).
        extra: Vec<String>,
    }

    fn parse(args: &[String]) -> ChildOpts {
        let mut o = ChildOpts {
            threads: 1,
            fleet: 0,
            store: None,
            tls: None,
            in_flight: 0,
            extra: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "--" {
                o.extra = it.cloned().collect();
                break;
            }
            let v = it.next().cloned().unwrap_or_default();
            match a.as_str() {
                "--threads" => o.threads = v.parse().unwrap(),
                "--fleet" => o.fleet = v.parse().unwrap(),
                "--store" => o.store = Some(v.into()),
                "--tls" => o.tls = Some(v.into()),
                "--in-flight" => o.in_flight = v.parse().unwrap(),
                other => panic!("serve: unknown option {other:?}"),
            }
        }
        o
    }

    /// Resolves when the parent closes our stdin (it is done, or gone).
    fn parent_gone() -> impl std::future::Future<Output = ()> {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            let _ = tx.send(());
        });
        async move {
            let _ = rx.await;
        }
    }

    pub fn run(kind: Kind, args: &[String]) {
        let o = parse(args);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(o.threads)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let stop = parent_gone();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let tls = o.tls.as_ref().map(|dir| {
                ServerTls::load(dir.join("server.pem"), dir.join("server-key.pem")).unwrap()
            });
            match kind {
                Kind::Echo => {
                    let echo = Echo(Arc::new(Canned::build().await));
                    let router = Server::builder()
                        .add_service(
                            ServersServer::new(echo.clone())
                                .max_decoding_message_size(64 << 20)
                                .max_encoding_message_size(64 << 20),
                        )
                        .add_service(SessionsServer::new(echo));
                    announce(addr, Duration::ZERO, None);
                    match tls {
                        None => router
                            .serve_with_incoming_shutdown(
                                TcpIncoming::from(listener).with_nodelay(Some(true)),
                                stop,
                            )
                            .await
                            .unwrap(),
                        Some(tls) => router
                            .serve_with_incoming_shutdown(
                                tls.incoming(
                                    listener,
                                    dcv_broker::server::connections::Connections::new(
                                        dcv_broker::server::connections::ConnectionLimits::unlimited(),
                                    ),
                                ),
                                stop,
                            )
                            .await
                            .unwrap(),
                    }
                }
                Kind::Broker => {
                    // The flags an operator would pass, so the configuration
                    // is the binary's: the per-client rate off (every
                    // request comes from 127.0.0.1) and the in-flight limit
                    // as asked.
                    let in_flight = o.in_flight.to_string();
                    let mut argv = vec![
                        "dcv-broker",
                        "--client-rate",
                        "0",
                        "--max-concurrent-requests",
                        &in_flight,
                    ];
                    let store = o.store.as_ref().map(|d| d.display().to_string());
                    match &store {
                        Some(dir) => argv.extend(["--data-dir", dir.as_str()]),
                        None => argv.push("--in-memory"),
                    }
                    argv.extend(o.extra.iter().map(String::as_str));
                    let cli = Args::try_parse_from(argv).unwrap();
                    cli.check().unwrap();
                    // Logging as the binary does it: INFO to stderr.
                    telemetry::init(
                        cli.log_format,
                        &telemetry::directives(cli.log.as_deref(), None),
                    )
                    .unwrap();
                    let mut config = cli.broker_config();
                    // Authentication when the flags turn it on, as the
                    // binary does (`--tls` here is not the binary's
                    // --tls-cert, so `--auth auto` leaves it off): one
                    // client for the load generator, and a token for it,
                    // announced with the port. In memory whatever the
                    // store: the client lives as long as this process.
                    if cli.auth_enabled() {
                        config.auth = Some(Auth::in_memory(cli.auth_config()).await.unwrap());
                    }
                    let token = match &config.auth {
                        None => None,
                        Some(auth) => Some(bench_token(auth).await),
                    };
                    let fleet = match &o.store {
                        None => Fleet::new(config.fleet.clone()).unwrap(),
                        Some(dir) => {
                            let (store, snapshot) = SqliteStore::open(dir).unwrap();
                            Fleet::restore(config.fleet.clone(), Arc::new(store), snapshot).unwrap()
                        }
                    };
                    // Metrics as the binary has them: on unless
                    // `--metrics false`.
                    if cli.metrics {
                        config.metrics = Some(dcv_broker::metrics::Metrics::new(
                            fleet.clone(),
                            config.cluster.clone(),
                        ));
                    }
                    let started = Instant::now();
                    let _demo = if o.fleet > 0 {
                        let handle =
                            demo::spawn_with(fleet.clone(), o.fleet, demo::tagged_description);
                        // Registered again, waited for: when this is durable,
                        // every registration before it is too.
                        fleet
                            .register(&demo::server_id(0), demo::tagged_description(0))
                            .await
                            .unwrap();
                        Some(AbortOnDrop(handle))
                    } else {
                        None
                    };
                    announce(addr, started.elapsed(), token.as_deref());
                    match tls {
                        None => serve(listener, fleet, config, stop).await.unwrap(),
                        Some(tls) => serve_tls(listener, fleet, config, tls, stop).await.unwrap(),
                    }
                }
            }
        });
    }

    struct AbortOnDrop(tokio::task::JoinHandle<()>);

    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    /// Registers the load generator's client, with every scope its
    /// requests need, and issues it a token (valid for the broker's
    /// --token-ttl, which the harness sets to outlast the run).
    async fn bench_token(auth: &Auth) -> String {
        let scopes = ScopeSet::from(Scope::Read) | Scope::OperateServers | Scope::ManageSessions;
        let client = auth.register("load-bench", scopes, None).await.unwrap();
        auth.issue_token(&client.client.id, &client.secret, None)
            .await
            .unwrap()
            .access_token
    }

    /// The line the parent waits for: `ready ADDR SETUP_SECONDS [TOKEN]`.
    fn announce(addr: SocketAddr, setup: Duration, token: Option<&str>) {
        let mut out = std::io::stdout().lock();
        write!(out, "ready {addr} {:.3}", setup.as_secs_f64()).unwrap();
        if let Some(token) = token {
            write!(out, " {token}").unwrap();
        }
        writeln!(out).unwrap();
        out.flush().unwrap();
    }

    /// The broker's replies, taken once from an in-process fleet of the
    /// same servers, so the echo's replies are the same size.
    pub struct Canned {
        describe: HashMap<usize, pb::DescribeServersResponse>,
        page: pb::DescribeServersResponse,
        create: pb::CreateSessionsResponse,
        delete: pb::DeleteSessionsResponse,
    }

    pub const CANNED_SERVERS: usize = 1000;

    impl Canned {
        async fn build() -> Canned {
            let fleet = Fleet::new(FleetConfig::default()).unwrap();
            let agents = demo::spawn_with(fleet.clone(), CANNED_SERVERS, demo::tagged_description);
            let servers = ServersApi::new(fleet.clone());
            let ids = server_ids(CANNED_SERVERS);
            let mut describe = HashMap::new();
            for n in [1, 100, 1000] {
                let request = pb::DescribeServersRequest {
                    server_ids: ids[1..=n.min(CANNED_SERVERS - 1)].to_vec(),
                    ..Default::default()
                };
                let reply = servers
                    .describe_servers(Request::new(request))
                    .await
                    .unwrap();
                describe.insert(n, reply.into_inner());
            }
            let page = servers
                .describe_servers(Request::new(pb::DescribeServersRequest {
                    max_results: Some(1000),
                    ..Default::default()
                }))
                .await
                .unwrap()
                .into_inner();
            let sessions = SessionsApi::new(fleet.clone());
            let create = sessions
                .create_sessions(Request::new(super::create_request(0, 0)))
                .await
                .unwrap()
                .into_inner();
            let id = create.successful_list[0].id.clone();
            let delete = sessions
                .delete_sessions(Request::new(super::delete_request(&id, 0)))
                .await
                .unwrap()
                .into_inner();
            agents.abort();
            Canned {
                describe,
                page,
                create,
                delete,
            }
        }
    }

    /// Bare tonic: the generated services, no layers, canned replies.
    #[derive(Clone)]
    pub struct Echo(Arc<Canned>);

    /// The length of a UUID's text, as the broker's RequestId.
    const REQUEST_ID: &str = "00000000-0000-4000-8000-000000000000";

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
                request_id: REQUEST_ID.into(),
                successful_list,
                unsuccessful_list: Vec::new(),
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
                request_id: REQUEST_ID.into(),
                successful_list,
                unsuccessful_list: Vec::new(),
                ..Default::default()
            }))
        }

        async fn describe_servers(
            &self,
            request: Request<pb::DescribeServersRequest>,
        ) -> Result<Response<pb::DescribeServersResponse>, Status> {
            let n = request.get_ref().server_ids.len();
            let reply = match self.0.describe.get(&n) {
                Some(reply) => reply.clone(),
                None => self.0.page.clone(),
            };
            Ok(Response::new(reply))
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

    #[tonic::async_trait]
    impl Sessions for Echo {
        type WatchSessionsStream = std::pin::Pin<
            Box<dyn tokio_stream::Stream<Item = Result<pb::WatchSessionsResponse, Status>> + Send>,
        >;

        async fn watch_sessions(
            &self,
            _: Request<pb::WatchSessionsRequest>,
        ) -> Result<Response<Self::WatchSessionsStream>, Status> {
            Err(Status::unimplemented("not benchmarked"))
        }

        async fn create_sessions(
            &self,
            _: Request<pb::CreateSessionsRequest>,
        ) -> Result<Response<pb::CreateSessionsResponse>, Status> {
            Ok(Response::new(self.0.create.clone()))
        }

        async fn describe_sessions(
            &self,
            _: Request<pb::DescribeSessionsRequest>,
        ) -> Result<Response<pb::DescribeSessionsResponse>, Status> {
            Err(Status::unimplemented("echo"))
        }

        async fn delete_sessions(
            &self,
            _: Request<pb::DeleteSessionsRequest>,
        ) -> Result<Response<pb::DeleteSessionsResponse>, Status> {
            Ok(Response::new(self.0.delete.clone()))
        }

        async fn get_session_connection_data(
            &self,
            _: Request<pb::GetSessionConnectionDataRequest>,
        ) -> Result<Response<pb::GetSessionConnectionDataResponse>, Status> {
            Err(Status::unimplemented("echo"))
        }

        async fn update_session_permissions(
            &self,
            _: Request<pb::UpdateSessionPermissionsRequest>,
        ) -> Result<Response<pb::UpdateSessionPermissionsResponse>, Status> {
            Err(Status::unimplemented("echo"))
        }

        async fn get_session_screenshots(
            &self,
            _: Request<pb::GetSessionScreenshotsRequest>,
        ) -> Result<Response<pb::GetSessionScreenshotsResponse>, Status> {
            Err(Status::unimplemented("echo"))
        }
    }
}

fn create_request(task: usize, n: u64) -> pb::CreateSessionsRequest {
    pb::CreateSessionsRequest {
        sessions: vec![pb::CreateSessionRequestData {
            name: format!("bench-{task}-{n}"),
            owner: format!("bench-user-{task}"),
            r#type: pb::SessionType::Virtual as i32,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn delete_request(id: &str, task: usize) -> pb::DeleteSessionsRequest {
    pb::DeleteSessionsRequest {
        sessions: vec![pb::DeleteSessionRequestData {
            session_id: id.to_string(),
            owner: format!("bench-user-{task}"),
            force: None,
        }],
        ..Default::default()
    }
}

/// A running server process.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    setup: f64,
    /// A broker with authentication on: the bearer token it issued the
    /// load generator.
    token: Option<String>,
    log: PathBuf,
}

impl ServerProcess {
    fn start(kind: &str, args: &[String], pin: bool, log: PathBuf) -> ServerProcess {
        let exe = std::env::current_exe().unwrap();
        let mut command = if pin {
            let mut c = Command::new("taskset");
            c.args(["-c", "0"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        let mut child = command
            .arg(kind)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let mut words = line.split_whitespace().skip(1);
        let (Some(addr), Some(setup)) = (words.next(), words.next()) else {
            panic!("{kind} did not start: {line:?}; see {}", log.display());
        };
        ServerProcess {
            child,
            addr: addr.parse().unwrap(),
            setup: setup.parse().unwrap(),
            token: words.next().map(String::from),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User plus system CPU seconds so far.
    fn cpu(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    fn rss_bytes(&self) -> u64 {
        procfs::rss_bytes(self.pid())
    }

    fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
        let _ = &self.log;
    }
}

// ------------------------------------------------------ the load generator

/// What each request of a scenario does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// DescribeServers naming this many ids (0: the first page of 1,000).
    Describe(usize),
    /// CloseServers then OpenServers of the same `n` servers, alternately:
    /// every request changes state.
    CloseOpen(usize),
    /// 90% single-id DescribeServers, 10% single-item Close/Open.
    Mixed,
    /// CreateSessions then DeleteSessions of that session.
    Sessions,
}

impl Op {
    fn labels(self) -> (&'static str, &'static str) {
        match self {
            Op::Describe(_) => ("describe", ""),
            Op::CloseOpen(_) => ("close", "open"),
            Op::Mixed => ("describe", "close/open"),
            Op::Sessions => ("create", "delete"),
        }
    }

    fn items(self) -> usize {
        match self {
            Op::Describe(0) => 1000,
            Op::Describe(n) | Op::CloseOpen(n) => n,
            Op::Mixed | Op::Sessions => 1,
        }
    }
}

/// One measured window.
#[derive(Clone)]
struct Window {
    requests: u64,
    items: u64,
    errors: u64,
    all: Histogram<u64>,
    a: Histogram<u64>,
    b: Histogram<u64>,
}

impl Window {
    fn new() -> Window {
        let h = || Histogram::new_with_bounds(1, 60_000_000, 3).unwrap();
        Window {
            requests: 0,
            items: 0,
            errors: 0,
            all: h(),
            a: h(),
            b: h(),
        }
    }
}

/// Figures of one scenario against one server: medians over windows.
#[derive(Debug, Clone, Default)]
struct Figures {
    rps: f64,
    items_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    a_p99_us: f64,
    b_p99_us: f64,
    cpu: f64,
    /// Server CPU time per request, in µs: unlike req/s, barely moved by
    /// other work on the machine.
    cpu_us_per_req: f64,
    errors: u64,
    first_error: Option<String>,
}

struct Load {
    op: Op,
    connections: usize,
    per_connection: usize,
}

struct Target<'a> {
    server: &'a ServerProcess,
    tls_ca: Option<&'a str>,
}

fn plain(server: &ServerProcess) -> Target<'_> {
    Target {
        server,
        tls_ca: None,
    }
}

fn over_tls<'a>(server: &'a ServerProcess, ca: &'a str) -> Target<'a> {
    Target {
        server,
        tls_ca: Some(ca),
    }
}

/// The `authorization` metadata of a broker that wants a token, parsed
/// once and cloned into each request. Per request rather than a tonic
/// interceptor, so that requests to a server without a token are built
/// exactly as before.
#[derive(Clone, Default)]
struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    fn of(server: &ServerProcess) -> Bearer {
        Bearer(
            server
                .token
                .as_ref()
                .map(|token| format!("Bearer {token}").parse().unwrap()),
        )
    }

    /// `message` as a request, with the token if there is one.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }
}

/// A connection of the load generator: the channel, and the credentials
/// its requests carry.
#[derive(Clone)]
struct Connection {
    channel: Channel,
    bearer: Bearer,
}

async fn connect(target: &Target<'_>) -> Connection {
    let endpoint = match target.tls_ca {
        None => Channel::from_shared(format!("http://{}", target.server.addr)).unwrap(),
        Some(ca) => Channel::from_shared(format!("https://{}", target.server.addr))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name("localhost"),
            )
            .unwrap(),
    };
    Connection {
        channel: endpoint.tcp_nodelay(true).connect().await.unwrap(),
        bearer: Bearer::of(target.server),
    }
}

/// Panics unless `target` refuses a call without its token and admits one
/// with it: a broker that let anonymous calls through (or refused the
/// generator's token) would report a meaningless figure.
async fn check_auth_enforced(target: &Target<'_>) {
    let Connection { channel, bearer } = connect(target).await;
    assert!(bearer.0.is_some(), "{} issued no token", target.server.addr);
    let mut servers = ServersClient::new(channel);
    let describe = || pb::DescribeServersRequest {
        server_ids: vec![demo::server_id(1)],
        ..Default::default()
    };
    match servers.describe_servers(describe()).await.map(drop) {
        Err(s) if s.code() == Code::Unauthenticated => {}
        other => panic!(
            "{} answered a call without a token with {other:?}, not UNAUTHENTICATED: \
             authentication is not enforced; see {}",
            target.server.addr,
            target.server.log.display()
        ),
    }
    if let Err(s) = servers.describe_servers(bearer.request(describe())).await {
        panic!(
            "{} refused the generator's token: {s:?}; see {}",
            target.server.addr,
            target.server.log.display()
        );
    }
}

type Shared = Arc<Mutex<(Vec<Window>, Option<String>)>>;

/// Runs one load against one server with the tonic generator.
async fn drive(opts: &Opts, load: &Load, target: &Target<'_>, fleet: usize) -> Figures {
    let mut connections = Vec::new();
    for _ in 0..load.connections {
        connections.push(connect(target).await);
    }
    let tasks = load.connections * load.per_connection;
    let ids = server_ids(fleet);
    let start = Instant::now() + opts.warm_up;
    let window = opts.window;
    let reps = opts.reps;
    let end = start + window * reps as u32;
    let shared: Shared = Arc::new(Mutex::new((vec![Window::new(); reps], None)));
    let record = {
        let shared = shared.clone();
        move |started: Instant, which: bool, items: usize, ok: Result<(), String>| {
            let done = Instant::now();
            if done < start {
                return;
            }
            let w = ((done - start).as_nanos() / window.as_nanos()) as usize;
            let mut guard = shared.lock();
            let (windows, first_error) = &mut *guard;
            let Some(slot) = windows.get_mut(w) else {
                return;
            };
            match ok {
                Ok(()) => {
                    let us = (done - started).as_micros().max(1) as u64;
                    slot.requests += 1;
                    slot.items += items as u64;
                    let _ = slot.all.record(us);
                    let _ = if which {
                        slot.b.record(us)
                    } else {
                        slot.a.record(us)
                    };
                }
                Err(e) => {
                    slot.errors += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
    };
    let mut handles = Vec::new();
    for t in 0..tasks {
        let connection = connections[t % connections.len()].clone();
        let ids = ids.clone();
        let record = record.clone();
        let op = load.op;
        handles.push(tokio::spawn(async move {
            run_task(op, t, tasks, connection, ids, end, record).await;
        }));
    }
    // Server CPU at each window boundary.
    let pid = target.server.pid();
    let mut cpu = Vec::new();
    tokio::time::sleep_until(start.into()).await;
    let mut before = cpu_seconds(pid);
    for w in 1..=reps {
        tokio::time::sleep_until((start + window * w as u32).into()).await;
        let now = cpu_seconds(pid);
        cpu.push((now - before) / window.as_secs_f64());
        before = now;
    }
    for h in handles {
        h.await.unwrap();
    }
    let (windows, first_error) = std::mem::take(&mut *shared.lock());
    let secs = window.as_secs_f64();
    let q = |h: &Histogram<u64>, q: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(q) as f64
        }
    };
    Figures {
        rps: median(windows.iter().map(|w| w.requests as f64 / secs).collect()),
        items_per_s: median(windows.iter().map(|w| w.items as f64 / secs).collect()),
        p50_us: median(windows.iter().map(|w| q(&w.all, 0.5)).collect()),
        p99_us: median(windows.iter().map(|w| q(&w.all, 0.99)).collect()),
        p999_us: median(windows.iter().map(|w| q(&w.all, 0.999)).collect()),
        a_p99_us: median(windows.iter().map(|w| q(&w.a, 0.99)).collect()),
        b_p99_us: median(windows.iter().map(|w| q(&w.b, 0.99)).collect()),
        cpu_us_per_req: median(
            windows
                .iter()
                .zip(&cpu)
                .map(|(w, c)| c * secs * 1e6 / (w.requests.max(1) as f64))
                .collect(),
        ),
        cpu: median(cpu),
        errors: windows.iter().map(|w| w.errors).sum(),
        first_error,
    }
}

/// One generator task: issues requests back to back until `end`.
async fn run_task(
    op: Op,
    t: usize,
    tasks: usize,
    connection: Connection,
    ids: Arc<Vec<String>>,
    end: Instant,
    record: impl Fn(Instant, bool, usize, Result<(), String>),
) {
    let Connection { channel, bearer } = connection;
    let mut servers = ServersClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    let mut sessions = SessionsClient::new(channel);
    let fleet = ids.len();
    // This task's own servers, so its closes and opens are real changes.
    let mine: Vec<usize> = match op {
        Op::CloseOpen(n) if n > 1 => (0..n).map(|i| (t * n + i) % fleet).collect(),
        _ => (t..fleet).step_by(tasks.max(1)).collect(),
    };
    let mut rng = (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut k: u64 = 0;
    let mut writes: u64 = 0;
    let status = |s: Status| format!("{:?}: {}", s.code(), s.message());
    while Instant::now() < end {
        let started = Instant::now();
        let mut which = false;
        let describe_one = |k: u64| {
            let i = mine[(k as usize) % mine.len().max(1)];
            pb::DescribeServersRequest {
                server_ids: vec![ids[i].clone()],
                ..Default::default()
            }
        };
        let result: Result<(), String> = match op {
            Op::Describe(0) => servers
                .describe_servers(bearer.request(pb::DescribeServersRequest {
                    max_results: Some(1000),
                    ..Default::default()
                }))
                .await
                .map(drop)
                .map_err(status),
            Op::Describe(1) => servers
                .describe_servers(bearer.request(describe_one(k)))
                .await
                .map(drop)
                .map_err(status),
            Op::Describe(n) => {
                let from = (next() as usize) % (fleet - n + 1);
                servers
                    .describe_servers(bearer.request(pb::DescribeServersRequest {
                        server_ids: ids[from..from + n].to_vec(),
                        ..Default::default()
                    }))
                    .await
                    .map(drop)
                    .map_err(status)
            }
            Op::CloseOpen(n) => {
                which = k % 2 == 1;
                let batch: Vec<usize> = if n == 1 {
                    vec![mine[(k as usize / 2) % mine.len()]]
                } else {
                    mine.clone()
                };
                close_or_open(&mut servers, &bearer, &ids, &batch, which).await
            }
            Op::Mixed => {
                if next() % 10 == 0 {
                    which = true;
                    let i = mine[(writes as usize / 2) % mine.len()];
                    let open = writes % 2 == 1;
                    writes += 1;
                    close_or_open(&mut servers, &bearer, &ids, &[i], open).await
                } else {
                    servers
                        .describe_servers(bearer.request(describe_one(k)))
                        .await
                        .map(drop)
                        .map_err(status)
                }
            }
            Op::Sessions => match sessions
                .create_sessions(bearer.request(create_request(t, k)))
                .await
            {
                Err(s) => Err(status(s)),
                Ok(reply) => match reply.into_inner().successful_list.first() {
                    None => Err("CreateSessions: no session created".into()),
                    Some(session) => {
                        record(started, false, 1, Ok(()));
                        let id = session.id.clone();
                        let started = Instant::now();
                        let result = sessions
                            .delete_sessions(bearer.request(delete_request(&id, t)))
                            .await
                            .map_err(status)
                            .and_then(|r| {
                                if r.into_inner().successful_list.is_empty() {
                                    Err("DeleteSessions: not deleted".into())
                                } else {
                                    Ok(())
                                }
                            });
                        record(started, true, 1, result);
                        k += 1;
                        continue;
                    }
                },
            },
        };
        record(started, which, op.items(), result);
        k += 1;
    }
}

async fn close_or_open(
    servers: &mut ServersClient<Channel>,
    bearer: &Bearer,
    ids: &[String],
    batch: &[usize],
    open: bool,
) -> Result<(), String> {
    let status = |s: Status| format!("{:?}: {}", s.code(), s.message());
    let failed = if open {
        let request = pb::OpenServersRequest {
            servers: batch
                .iter()
                .map(|&i| pb::OpenServerRequestData {
                    server_id: ids[i].clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        servers
            .open_servers(bearer.request(request))
            .await
            .map_err(status)?
            .into_inner()
            .unsuccessful_list
            .len()
    } else {
        let request = pb::CloseServersRequest {
            servers: batch
                .iter()
                .map(|&i| pb::CloseServerRequestData {
                    server_id: ids[i].clone(),
                    force: Some(true),
                    reason: String::new(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        servers
            .close_servers(bearer.request(request))
            .await
            .map_err(status)?
            .into_inner()
            .unsuccessful_list
            .len()
    };
    if failed == 0 {
        Ok(())
    } else {
        Err(format!("{failed} item(s) failed"))
    }
}

// --------------------------------------------------------------- h2load

/// One request as h2load sends it, over and over: a gRPC call or a REST
/// call, so that both are measured by the same generator.
struct H2loadRequest {
    /// The request's path.
    path: String,
    /// The body exactly as sent.
    body: Vec<u8>,
    /// Its headers (`name: value`).
    headers: Vec<&'static str>,
    /// HTTP/1.1 instead of h2c (prior knowledge).
    h1: bool,
}

impl H2loadRequest {
    /// A unary gRPC call: the message in its frame (uncompressed flag,
    /// big-endian length, message).
    fn grpc(path: &str, message: &[u8]) -> H2loadRequest {
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
        frame.extend_from_slice(message);
        H2loadRequest {
            path: path.into(),
            body: frame,
            headers: vec!["content-type: application/grpc", "te: trailers"],
            h1: false,
        }
    }

    /// A DCV REST call with a JSON body.
    fn rest(path: &str, json: &serde_json::Value, h1: bool) -> H2loadRequest {
        H2loadRequest {
            path: path.into(),
            body: json.to_string().into_bytes(),
            headers: vec!["content-type: application/json"],
            h1,
        }
    }
}

/// Runs h2load with a pre-encoded gRPC request against `server`: medians
/// over the repetitions, latency percentiles from its per-request log.
fn h2load(
    opts: &Opts,
    server: &ServerProcess,
    path: &str,
    body: &[u8],
    load: &Load,
    dir: &Path,
) -> Figures {
    let request = H2loadRequest::grpc(path, body);
    let reps: Vec<Figures> = (0..opts.reps)
        .map(|_| h2load_once(opts, server, &request, load, dir))
        .collect();
    median_figures(&reps)
}

/// The median of each figure over repetitions; errors summed.
fn median_figures(reps: &[Figures]) -> Figures {
    Figures {
        rps: median(reps.iter().map(|f| f.rps).collect()),
        items_per_s: median(reps.iter().map(|f| f.items_per_s).collect()),
        p50_us: median(reps.iter().map(|f| f.p50_us).collect()),
        p99_us: median(reps.iter().map(|f| f.p99_us).collect()),
        p999_us: median(reps.iter().map(|f| f.p999_us).collect()),
        cpu: median(reps.iter().map(|f| f.cpu).collect()),
        cpu_us_per_req: median(reps.iter().map(|f| f.cpu_us_per_req).collect()),
        errors: reps.iter().map(|f| f.errors).sum(),
        ..Figures::default()
    }
}

/// One h2load window of `request` against `server`.
fn h2load_once(
    opts: &Opts,
    server: &ServerProcess,
    request: &H2loadRequest,
    load: &Load,
    dir: &Path,
) -> Figures {
    let body_file = dir.join("h2load-body.bin");
    let log_file = dir.join("h2load.log");
    std::fs::write(&body_file, &request.body).unwrap();
    let _ = std::fs::remove_file(&log_file);
    let mut command = if opts.pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "1", "h2load"]);
        c
    } else {
        Command::new("h2load")
    };
    if request.h1 {
        command.arg("--h1");
    }
    // h2load takes whole units: milliseconds.
    let window = opts.window.as_millis();
    let warm = opts.warm_up.as_millis();
    let mut child = command
        .args(["-t", "1", "-c"])
        .arg(load.connections.to_string())
        .arg("-m")
        .arg(load.per_connection.to_string())
        .arg("-D")
        .arg(format!("{window}ms"))
        .arg(format!("--warm-up-time={warm}ms"))
        .args(request.headers.iter().flat_map(|h| ["-H", h]))
        .args(
            server
                .token
                .iter()
                .flat_map(|token| ["-H".into(), format!("authorization: Bearer {token}")]),
        )
        .arg("-d")
        .arg(&body_file)
        .arg(format!("--log-file={}", log_file.display()))
        .arg(format!("http://{}{}", server.addr, request.path))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(opts.warm_up + Duration::from_millis(50));
    let before = server.cpu();
    let measured = Instant::now();
    std::thread::sleep(opts.window - Duration::from_millis(100));
    let cpu = (server.cpu() - before) / measured.elapsed().as_secs_f64();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child.wait().unwrap();
    let log = std::fs::read_to_string(&log_file).unwrap_or_default();
    // Each line: start time (µs since the epoch), HTTP status, duration
    // (µs). Only the measured period is logged.
    let mut lat: Vec<u64> = Vec::new();
    let mut errors = 0;
    for line in log.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 3 {
            continue;
        }
        if f[1] != "200" {
            errors += 1;
            continue;
        }
        lat.push(f[2].trim().parse().unwrap_or(0));
    }
    lat.sort_unstable();
    let q = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
    };
    let rps = out
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(lat.len() as f64 / opts.window.as_secs_f64());
    Figures {
        rps,
        items_per_s: rps,
        cpu_us_per_req: cpu * 1e6 / rps.max(1.0),
        p50_us: q(0.5),
        p99_us: q(0.99),
        p999_us: q(0.999),
        cpu,
        errors,
        ..Figures::default()
    }
}

/// REST CloseServers of one item (DCV's bare array, JSON) against gRPC
/// CloseServers of one item, on the same broker, closing the same server
/// (so the domain does the same work), both sent by h2load so neither pays
/// for a heavier client. The repetitions alternate between the two, so
/// drift on a shared machine falls on both. Over h2c at the h2load loads,
/// then REST over HTTP/1.1 (one request at a time per connection: DCV's
/// clients do not pipeline) against gRPC at the same connections.
fn rest_vs_grpc(opts: &Opts, broker: &ServerProcess, dir: &Path) -> Result<Vec<Row>, String> {
    let server_id = demo::server_id(2);
    let grpc = H2loadRequest::grpc(
        "/dcv.sessionmanager.v1.Servers/CloseServers",
        &pb::CloseServersRequest {
            servers: vec![pb::CloseServerRequestData {
                server_id: server_id.clone(),
                force: Some(true),
                reason: String::new(),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let body = serde_json::json!([{"ServerId": server_id, "Force": true}]);
    check_rest_close(broker, &body, &server_id)?;
    let rest = H2loadRequest::rest("/closeServers", &body, false);
    let rest_h1 = H2loadRequest::rest("/closeServers", &body, true);
    let h2c: &[(usize, usize)] = if opts.quick {
        &[(16, 64)]
    } else {
        &[(4, 16), (16, 64)]
    };
    let runs = h2c
        .iter()
        .map(|&(c, m)| ("rest close-1 (h2c)", c, m, &rest))
        .chain([("rest close-1 (http/1.1)", 64, 1, &rest_h1)]);
    let mut rows = Vec::new();
    for (name, connections, per_connection, rest) in runs {
        let load = Load {
            op: Op::CloseOpen(1),
            connections,
            per_connection,
        };
        let (mut g, mut r) = (Vec::new(), Vec::new());
        for _ in 0..opts.reps {
            g.push(h2load_once(opts, broker, &grpc, &load, dir));
            r.push(h2load_once(opts, broker, rest, &load, dir));
        }
        rows.push(Row {
            name: name.into(),
            generator: "h2load",
            load: format!("{connections}x{per_connection}"),
            labels: ("", ""),
            baseline: Some(("grpc".into(), median_figures(&g))),
            broker: ("rest".into(), median_figures(&r)),
        });
    }
    Ok(rows)
}

/// Sends the REST close once over HTTP/1.1: an error unless the broker
/// answers 200 with the server in `SuccessfulList` (the benchmark must
/// measure the route doing its work, not a refusal).
fn check_rest_close(
    broker: &ServerProcess,
    body: &serde_json::Value,
    server_id: &str,
) -> Result<(), String> {
    let io = |e: std::io::Error| format!("REST CloseServers: {e}");
    let mut stream = std::net::TcpStream::connect(broker.addr).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let body = body.to_string();
    let token = broker
        .token
        .as_ref()
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "POST /closeServers HTTP/1.1\r\nHost: {}\r\n{token}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        broker.addr,
        body.len()
    )
    .map_err(io)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).map_err(io)?;
    let (head, json) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let ok = head.starts_with("HTTP/1.1 200")
        && serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .and_then(|v| {
                v["SuccessfulList"][0]["ServerId"]
                    .as_str()
                    .map(String::from)
            })
            .is_some_and(|id| id == server_id);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "REST CloseServers did not close {server_id}:\n{reply}"
        ))
    }
}

fn h2load_installed() -> bool {
    Command::new("h2load")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------- report

struct Row {
    name: String,
    generator: &'static str,
    load: String,
    labels: (&'static str, &'static str),
    baseline: Option<(String, Figures)>,
    broker: (String, Figures),
}

impl Row {
    fn json(&self) -> serde_json::Value {
        let f = |name: &str, x: &Figures| {
            serde_json::json!({
                "server": name,
                "rps": x.rps.round(),
                "items_per_s": x.items_per_s.round(),
                "p50_us": x.p50_us,
                "p99_us": x.p99_us,
                "p999_us": x.p999_us,
                "a": self.labels.0,
                "a_p99_us": x.a_p99_us,
                "b": self.labels.1,
                "b_p99_us": x.b_p99_us,
                "server_cpu": (x.cpu * 1000.0).round() / 1000.0,
                "server_cpu_us_per_request": (x.cpu_us_per_req * 10.0).round() / 10.0,
                "errors": x.errors,
                "first_error": x.first_error,
            })
        };
        let mut v = serde_json::json!({
            "scenario": self.name,
            "generator": self.generator,
            "load": self.load,
            "broker": f(&self.broker.0, &self.broker.1),
        });
        if let Some((name, b)) = &self.baseline {
            v["baseline"] = f(name, b);
            v["rps_ratio"] = ratio(self.broker.1.rps, b.rps).into();
            v["p99_ratio"] = ratio(self.broker.1.p99_us, b.p99_us).into();
            v["cpu_per_request_ratio"] =
                ratio(self.broker.1.cpu_us_per_req, b.cpu_us_per_req).into();
        }
        v
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        (a / b * 1000.0).round() / 1000.0
    }
}

fn print_header() {
    let side = |name: &str| {
        format!(
            "{name:<9} {:>7} {:>9} {:>6} {:>6} {:>6} {:>4} {:>6} {:>4}",
            "req/s", "items/s", "p50", "p99", "p999", "cpu", "us/req", "err"
        )
    };
    println!(
        "{:<24} {:<6} {:>5} {}  {}",
        "scenario",
        "gen",
        "load",
        side("baseline"),
        side("server")
    );
}

fn print_row(row: &Row) {
    let cols = |name: &str, f: &Figures| {
        format!(
            "{:<9} {:>7.0} {:>9.0} {:>6.0} {:>6.0} {:>6.0} {:>3.0}% {:>6.1} {:>4}",
            name,
            f.rps,
            f.items_per_s,
            f.p50_us,
            f.p99_us,
            f.p999_us,
            f.cpu * 100.0,
            f.cpu_us_per_req,
            f.errors
        )
    };
    let base = match &row.baseline {
        Some((name, f)) => cols(name, f),
        None => format!("{:<9}", "-"),
    };
    let mut line = format!(
        "{:<24} {:<6} {:>5} {base}  {}",
        row.name,
        row.generator,
        row.load,
        cols(&row.broker.0, &row.broker.1)
    );
    if let Some((_, b)) = &row.baseline {
        line += &format!(
            "  ratio req/s {:.2} p99 {:.2} cpu/req {:.2}",
            ratio(row.broker.1.rps, b.rps),
            ratio(row.broker.1.p99_us, b.p99_us),
            ratio(row.broker.1.cpu_us_per_req, b.cpu_us_per_req)
        );
    }
    if !row.labels.1.is_empty() {
        line += &format!(
            "   p99 {} {:.0} / {} {:.0} us",
            row.labels.0, row.broker.1.a_p99_us, row.labels.1, row.broker.1.b_p99_us
        );
    }
    println!("{line}");
    if let Some(e) = &row.broker.1.first_error {
        println!("    broker errors, first: {e}");
    }
}

// --------------------------------------------------------------- harness

fn harness(opts: Opts) {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mut opts = opts;
    if opts.pin && cpus < 2 {
        opts.pin = false;
    }
    if opts.pin {
        common::pin_self(1);
    }
    let run_h2load = opts.h2load && h2load_installed();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.client_threads)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("dcv-bench-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = |name: &str| dir.join(format!("{name}.log"));
    let threads = opts.server_threads.to_string();
    let fleet = opts.fleet.to_string();
    let in_flight = opts.in_flight.to_string();
    let base_args = |extra: &[&str]| -> Vec<String> {
        ["--threads", threads.as_str()]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    // Broker processes get the extra flags after `--`.
    let broker_args = |extra: &[&str]| -> Vec<String> {
        let mut args = base_args(extra);
        args.push("--".into());
        args.extend(opts.broker_flags.iter().cloned());
        args
    };

    println!(
        "dcv-broker load benchmark: fleet {}, server threads {}, client threads {}, pinned {}, {} x {:?} windows after {:?} warm-up, medians; latency in us",
        opts.fleet,
        opts.server_threads,
        opts.client_threads,
        opts.pin,
        opts.reps,
        opts.window,
        opts.warm_up
    );
    let mut rows: Vec<Row> = Vec::new();
    let echo = ServerProcess::start("serve-echo", &base_args(&[]), opts.pin, log("echo"));
    let broker = ServerProcess::start(
        "serve-broker",
        &broker_args(&["--fleet", &fleet, "--in-flight", &in_flight]),
        opts.pin,
        log("broker"),
    );
    println!(
        "broker: {} servers registered in {:.2} s; logs in {}",
        opts.fleet,
        broker.setup,
        dir.display()
    );
    print_header();

    let conc: &[(usize, usize)] = if opts.quick {
        &[(1, 1), (16, 64)]
    } else {
        &[(1, 1), (4, 16), (16, 64)]
    };
    let mut scenarios: Vec<(String, Load)> = Vec::new();
    for &(c, m) in conc {
        scenarios.push((
            "describe-1".into(),
            Load {
                op: Op::Describe(1),
                connections: c,
                per_connection: m,
            },
        ));
        scenarios.push((
            "close/open-1".into(),
            Load {
                op: Op::CloseOpen(1),
                connections: c,
                per_connection: m,
            },
        ));
    }
    // Batches: fewer in flight, each task with its own 1,000 servers.
    for (name, op) in [
        ("describe-100", Op::Describe(100)),
        ("describe-1000", Op::Describe(1000)),
        ("describe-page-1000", Op::Describe(0)),
        ("close/open-100", Op::CloseOpen(100)),
        ("close/open-1000", Op::CloseOpen(1000)),
    ] {
        scenarios.push((
            name.into(),
            Load {
                op,
                connections: 2,
                per_connection: 4,
            },
        ));
    }
    scenarios.push((
        "mixed-90/10".into(),
        Load {
            op: Op::Mixed,
            connections: 16,
            per_connection: 64,
        },
    ));
    scenarios.push((
        "sessions-create/delete".into(),
        Load {
            op: Op::Sessions,
            connections: 4,
            per_connection: 16,
        },
    ));

    for (name, load) in &scenarios {
        if !opts.wants(name) {
            continue;
        }
        let b = runtime.block_on(drive(&opts, load, &plain(&echo), opts.fleet));
        let r = runtime.block_on(drive(&opts, load, &plain(&broker), opts.fleet));
        let row = Row {
            name: name.clone(),
            generator: "tonic",
            load: format!("{}x{}", load.connections, load.per_connection),
            labels: load.op.labels(),
            baseline: Some(("echo".into(), b)),
            broker: ("broker".into(), r),
        };
        print_row(&row);
        rows.push(row);
    }

    // Metrics on (the default, as every broker above) against off
    // (`--metrics false`), in the same run: two brokers, alternated.
    if opts.wants("metrics") {
        let mut off_args = broker_args(&["--fleet", &fleet, "--in-flight", &in_flight]);
        off_args.extend(["--metrics", "false"].map(String::from));
        let off = ServerProcess::start(
            "serve-broker",
            &off_args,
            opts.pin,
            log("broker-no-metrics"),
        );
        for (name, op) in [
            ("describe-1", Op::Describe(1)),
            ("close/open-1", Op::CloseOpen(1)),
        ] {
            let load = Load {
                op,
                connections: 16,
                per_connection: 64,
            };
            // Which broker goes first swaps every round, so that an order
            // effect (a warmer cache, a CPU clock still rising) cancels.
            for round in 1..=4 {
                let (without, with) = if round % 2 == 1 {
                    let without = runtime.block_on(drive(&opts, &load, &plain(&off), opts.fleet));
                    let with = runtime.block_on(drive(&opts, &load, &plain(&broker), opts.fleet));
                    (without, with)
                } else {
                    let with = runtime.block_on(drive(&opts, &load, &plain(&broker), opts.fleet));
                    let without = runtime.block_on(drive(&opts, &load, &plain(&off), opts.fleet));
                    (without, with)
                };
                let row = Row {
                    name: format!("metrics {name} (round {round})"),
                    generator: "tonic",
                    load: "16x64".into(),
                    labels: load.op.labels(),
                    baseline: Some(("metrics-off".into(), without)),
                    broker: ("metrics-on".into(), with),
                };
                print_row(&row);
                rows.push(row);
            }
        }
        off.stop();
    }

    if run_h2load {
        let describe = pb::DescribeServersRequest {
            server_ids: vec![demo::server_id(1)],
            ..Default::default()
        };
        let close = pb::CloseServersRequest {
            servers: vec![pb::CloseServerRequestData {
                server_id: demo::server_id(2),
                force: Some(true),
                reason: String::new(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let open = pb::OpenServersRequest {
            servers: vec![pb::OpenServerRequestData {
                server_id: demo::server_id(3),
                ..Default::default()
            }],
            ..Default::default()
        };
        let bodies: [(&str, &str, Vec<u8>); 3] = [
            (
                "describe-1",
                "/dcv.sessionmanager.v1.Servers/DescribeServers",
                describe.encode_to_vec(),
            ),
            (
                "close-1 (repeated)",
                "/dcv.sessionmanager.v1.Servers/CloseServers",
                close.encode_to_vec(),
            ),
            (
                "open-1 (repeated)",
                "/dcv.sessionmanager.v1.Servers/OpenServers",
                open.encode_to_vec(),
            ),
        ];
        let h2conc: &[(usize, usize)] = if opts.quick {
            &[(16, 64)]
        } else {
            &[(4, 16), (16, 64)]
        };
        for &(c, m) in h2conc {
            for (name, path, body) in &bodies {
                if !opts.wants(name) {
                    continue;
                }
                let load = Load {
                    op: Op::Describe(1),
                    connections: c,
                    per_connection: m,
                };
                let b = h2load(&opts, &echo, path, body, &load, &dir);
                let r = h2load(&opts, &broker, path, body, &load, &dir);
                let row = Row {
                    name: name.to_string(),
                    generator: "h2load",
                    load: format!("{c}x{m}"),
                    labels: ("", ""),
                    baseline: Some(("echo".into(), b)),
                    broker: ("broker".into(), r),
                };
                print_row(&row);
                rows.push(row);
            }
        }
    }
    // DCV's REST facade against gRPC on the same broker.
    if run_h2load && opts.wants("rest") {
        match rest_vs_grpc(&opts, &broker, &dir) {
            Ok(rest_rows) => {
                for row in rest_rows {
                    print_row(&row);
                    rows.push(row);
                }
            }
            // Said, not a panic: a panic here would leave the servers
            // running.
            Err(why) => println!("rest: not measured: {why}"),
        }
    }
    echo.stop();

    // Durable against in-memory: every close and open committed to SQLite.
    if opts.wants("durable") {
        let store = dir.join("store");
        let store_s = store.display().to_string();
        let durable = ServerProcess::start(
            "serve-broker",
            &broker_args(&[
                "--fleet",
                &fleet,
                "--in-flight",
                &in_flight,
                "--store",
                &store_s,
            ]),
            opts.pin,
            log("broker-durable"),
        );
        for &(c, m) in &[(4, 16), (16, 64)] {
            let load = Load {
                op: Op::CloseOpen(1),
                connections: c,
                per_connection: m,
            };
            let mem = runtime.block_on(drive(&opts, &load, &plain(&broker), opts.fleet));
            let dur = runtime.block_on(drive(&opts, &load, &plain(&durable), opts.fleet));
            let row = Row {
                name: "durable close/open-1".into(),
                generator: "tonic",
                load: format!("{c}x{m}"),
                labels: load.op.labels(),
                baseline: Some(("in-memory".into(), mem)),
                broker: ("sqlite".into(), dur),
            };
            print_row(&row);
            rows.push(row);
        }
        durable.stop();
        let _ = std::fs::remove_dir_all(&store);
    }

    // TLS against plaintext, for both servers; then TLS with bearer tokens
    // against TLS without.
    if opts.wants("tls") {
        let certs = dir.join("certs");
        let generated = dcv_broker::tls::init::generate(
            &["localhost".to_string(), "127.0.0.1".to_string()],
            30,
        )
        .unwrap();
        dcv_broker::tls::init::write(&certs, &generated, true).unwrap();
        let certs_s = certs.display().to_string();
        let echo_tls = ServerProcess::start(
            "serve-echo",
            &base_args(&["--tls", &certs_s]),
            opts.pin,
            log("echo-tls"),
        );
        let broker_tls = ServerProcess::start(
            "serve-broker",
            &broker_args(&[
                "--fleet",
                &fleet,
                "--in-flight",
                &in_flight,
                "--tls",
                &certs_s,
            ]),
            opts.pin,
            log("broker-tls"),
        );
        let ca = generated.ca_cert.as_str();
        let load = Load {
            op: Op::Describe(1),
            connections: 16,
            per_connection: 64,
        };
        let b = runtime.block_on(drive(&opts, &load, &over_tls(&echo_tls, ca), opts.fleet));
        let r = runtime.block_on(drive(&opts, &load, &over_tls(&broker_tls, ca), opts.fleet));
        let plain_broker = runtime.block_on(drive(&opts, &load, &plain(&broker), opts.fleet));
        for row in [
            Row {
                name: "tls describe-1".into(),
                generator: "tonic",
                load: "16x64".into(),
                labels: load.op.labels(),
                baseline: Some(("echo-tls".into(), b)),
                broker: ("broker-tls".into(), r.clone()),
            },
            Row {
                name: "tls vs plaintext broker".into(),
                generator: "tonic",
                load: "16x64".into(),
                labels: load.op.labels(),
                baseline: Some(("plaintext".into(), plain_broker)),
                broker: ("tls".into(), r.clone()),
            },
        ] {
            print_row(&row);
            rows.push(row);
        }
        echo_tls.stop();

        // The same broker with authentication on: every call checks a JWT
        // (HMAC-SHA256) and its client in the registry. The token's TTL
        // outlasts the run, so none expires under load.
        let mut auth_args = broker_args(&[
            "--fleet",
            &fleet,
            "--in-flight",
            &in_flight,
            "--tls",
            &certs_s,
        ]);
        auth_args.extend(["--auth", "on", "--token-ttl", "24h"].map(String::from));
        let broker_auth =
            ServerProcess::start("serve-broker", &auth_args, opts.pin, log("broker-tls-auth"));
        runtime.block_on(check_auth_enforced(&over_tls(&broker_auth, ca)));
        let a = runtime.block_on(drive(&opts, &load, &over_tls(&broker_auth, ca), opts.fleet));
        let close_open = Load {
            op: Op::CloseOpen(1),
            ..load
        };
        let close_open_tls = runtime.block_on(drive(
            &opts,
            &close_open,
            &over_tls(&broker_tls, ca),
            opts.fleet,
        ));
        let close_open_auth = runtime.block_on(drive(
            &opts,
            &close_open,
            &over_tls(&broker_auth, ca),
            opts.fleet,
        ));
        for row in [
            Row {
                name: "tls+token describe-1".into(),
                generator: "tonic",
                load: "16x64".into(),
                labels: load.op.labels(),
                baseline: Some(("tls".into(), r)),
                broker: ("tls+token".into(), a),
            },
            Row {
                name: "tls+token close/open-1".into(),
                generator: "tonic",
                load: "16x64".into(),
                labels: close_open.op.labels(),
                baseline: Some(("tls".into(), close_open_tls)),
                broker: ("tls+token".into(), close_open_auth),
            },
        ] {
            print_row(&row);
            rows.push(row);
        }
        broker_auth.stop();
        broker_tls.stop();
    }
    broker.stop();

    // Resident memory per server.
    let mut memory = Vec::new();
    if opts.wants("memory") && !opts.memory.is_empty() {
        let rss_of = |n: usize| {
            let p = ServerProcess::start(
                "serve-broker",
                &broker_args(&["--fleet", &n.to_string()]),
                opts.pin,
                log(&format!("broker-memory-{n}")),
            );
            // Let the first heartbeat round and the allocator settle.
            std::thread::sleep(Duration::from_secs(2));
            let rss = p.rss_bytes();
            (p, rss)
        };
        let (empty, empty_rss) = rss_of(0);
        empty.stop();
        println!(
            "memory: empty broker {:.1} MiB resident",
            empty_rss as f64 / 1048576.0
        );
        for &n in &opts.memory {
            let (p, rss) = rss_of(n);
            let per = (rss.saturating_sub(empty_rss)) as f64 / n as f64;
            // It must also serve: a short single-id Describe load.
            let quick = Opts {
                reps: 1,
                warm_up: Duration::from_millis(200),
                window: Duration::from_millis(1000),
                ..opts.clone()
            };
            let load = Load {
                op: Op::Describe(1),
                connections: 4,
                per_connection: 16,
            };
            let serving = runtime.block_on(drive(&quick, &load, &plain(&p), n));
            println!(
                "memory: {n:>9} servers: {:>8.1} MiB resident, {per:>6.0} bytes/server; registered in {:.2} s; then served {:.0} describe-1 req/s (p99 {:.0} us, {} errors)",
                rss as f64 / 1048576.0,
                p.setup,
                serving.rps,
                serving.p99_us,
                serving.errors
            );
            memory.push(serde_json::json!({
                "servers": n,
                "rss_bytes": rss,
                "empty_rss_bytes": empty_rss,
                "bytes_per_server": per.round(),
                "register_seconds": p.setup,
                "describe_1_rps_after": serving.rps.round(),
                "describe_1_errors_after": serving.errors,
            }));
            p.stop();
        }
    }

    let json = serde_json::json!({
        "fleet": opts.fleet,
        "server_threads": opts.server_threads,
        "client_threads": opts.client_threads,
        "pinned": opts.pin,
        "repetitions": opts.reps,
        "window_ms": opts.window.as_millis() as u64,
        "warm_up_ms": opts.warm_up.as_millis() as u64,
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "memory": memory,
    });
    if let Some(parent) = opts.out.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    std::fs::write(
        &opts.out,
        serde_json::to_string_pretty(&json).unwrap() + "\n",
    )
    .unwrap();
    println!("wrote {}", opts.out.display());
    let _ = std::fs::remove_dir_all(&dir);
}
