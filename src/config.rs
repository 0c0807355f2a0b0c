//! The broker binary's configuration: command-line flags, each with an
//! environment-variable fallback, turned into a [`BrokerConfig`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

pub use crate::telemetry::LogFormat;
use crate::{
    BrokerConfig,
    auth::ScopeSet,
    fleet::{FleetConfig, PlacementStrategy},
    limits::{ClientRate, Limits},
    tls::init::{AgentCertArgs, InitArgs},
};

/// How the broker chooses among servers that can take a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Placement {
    /// The server with the fewest sessions (ties: lowest id).
    Spread,
    /// The fullest server that still has room (ties: lowest id).
    Pack,
}

/// The encoding agents are asked to take screenshots in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScreenshotFormat {
    /// PNG.
    Png,
    /// JPEG.
    Jpeg,
}

fn capacity_floor(s: &str) -> Result<crate::fleet::CapacityFloor, String> {
    crate::fleet::CapacityFloor::parse(s)
}

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// dcv-broker: a gRPC session broker for fleets of Amazon DCV servers.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Args {
    /// Address to serve gRPC on. Without TLS (--tls-cert), only loopback
    /// addresses are allowed, unless --allow-insecure-non-loopback is given.
    #[arg(long, env = "DCV_BROKER_LISTEN", default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,

    /// Serve plaintext gRPC on a non-loopback address. Anyone who can reach
    /// the port can then close every server: use only on a trusted network.
    #[arg(long, env = "DCV_BROKER_ALLOW_INSECURE_NON_LOOPBACK")]
    pub allow_insecure_non_loopback: bool,

    /// A host name a plaintext broker on loopback answers to, besides IP
    /// addresses and localhost (repeat, or separate with commas). Any other
    /// Host is refused (HTTP 421), against DNS rebinding from web pages.
    #[arg(
        long = "allowed-host",
        env = "DCV_BROKER_ALLOWED_HOSTS",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,

    /// Also serve agents on this address, apart from operators: the Agent
    /// service, health, the token endpoint and DCV's token verifier, on a
    /// runtime of its own whose threads run at a lower CPU priority
    /// (--agent-nice), so that a large fleet's heartbeats cannot slow
    /// operators' calls down (DCV Session Manager's agent port is 8445).
    /// The main address keeps serving agents too. Same TLS, authentication
    /// and listening rules as --listen.
    #[arg(long, env = "DCV_BROKER_AGENT_LISTEN", value_name = "ADDR")]
    pub agent_listen: Option<SocketAddr>,

    /// Worker threads of the agents' port (--agent-listen).
    #[arg(
        long,
        env = "DCV_BROKER_AGENT_THREADS",
        default_value_t = crate::server::agent_port::DEFAULT_THREADS,
        value_parser = clap::builder::TypedValueParser::map(
            clap::value_parser!(u16).range(1..=256),
            usize::from
        ),
        value_name = "N"
    )]
    pub agent_threads: usize,

    /// How much lower the agents' port's threads run than the broker's
    /// others: a nice increment, 0 (same priority) to 19.
    #[arg(
        long,
        env = "DCV_BROKER_AGENT_NICE",
        default_value_t = crate::server::agent_port::DEFAULT_NICE,
        value_parser = clap::value_parser!(i32).range(0..=19),
        value_name = "N"
    )]
    pub agent_nice: i32,

    /// The most connections the agents' port holds at once (as
    /// --max-connections for the main address); lowered at start so that
    /// both fit the open-file limit together.
    #[arg(
        long,
        env = "DCV_BROKER_AGENT_MAX_CONNECTIONS",
        default_value_t = crate::server::connections::MAX_CONNECTIONS,
        value_name = "N"
    )]
    pub agent_max_connections: usize,

    /// DCV REST replies also carry dcv-broker's fields beyond DCV's (Holds,
    /// Reason, UnavailabilityReasons, FailureCode on session failures,
    /// ...). Off: exactly the fields DCV's OpenAPI file names, because
    /// clients generated from it (Amazon's Access Console, openapi-generator's
    /// Java clients) refuse any other. gRPC always has them.
    #[arg(long, env = "DCV_BROKER_REST_ADDITIONS")]
    pub rest_additions: bool,

    /// Serve Prometheus metrics at GET /metrics on --listen (and on
    /// --metrics-listen). Open like health: they reveal counts, never names.
    /// `--metrics false` turns them off, and the per-request counting with
    /// them.
    #[arg(
        long,
        env = "DCV_BROKER_METRICS",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    pub metrics: bool,

    /// Also serve GET /metrics, and only that, as plain HTTP/1.1 on this
    /// address, for a scraper kept off the API port. Only loopback
    /// addresses, unless --allow-insecure-non-loopback is given.
    #[arg(long, env = "DCV_BROKER_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// Serve gRPC over TLS only, with this certificate (PEM: the server's
    /// certificate, then any intermediates). Needs --tls-key. Both files
    /// are read again on SIGHUP. `dcv-broker tls init` makes a pair.
    #[arg(long, env = "DCV_BROKER_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "DCV_BROKER_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,

    /// Authentication of callers by OAuth 2.0 bearer tokens (clients are
    /// registered with `dcv-broker clients register`; tokens come from
    /// POST /oauth2/token on this port). `auto` turns it on with TLS (a
    /// token sent in the clear could be read and replayed); `off` lets
    /// anyone who reaches the port call every RPC.
    #[arg(long, env = "DCV_BROKER_AUTH", value_enum, default_value = "auto")]
    pub auth: AuthMode,

    /// The local admin socket `dcv-broker clients` talks to (default:
    /// DIR/admin.sock under --data-dir; none with --in-memory unless
    /// given). Whoever may open it may administer clients.
    #[arg(long, env = "DCV_BROKER_ADMIN_SOCKET", value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,

    /// How long a token from /oauth2/token is valid. Short: a leaked token
    /// works until it expires or its client is revoked.
    #[arg(long, env = "DCV_BROKER_TOKEN_TTL", default_value = "15m", value_parser = duration)]
    pub token_ttl: Duration,

    /// With authentication on, require a token for health checks too
    /// (open by default: load balancers probe without credentials).
    #[arg(long, env = "DCV_BROKER_AUTH_HEALTH")]
    pub auth_health: bool,

    /// With authentication on, require a token for server reflection too
    /// (open by default: it describes the API, not the fleet).
    #[arg(long, env = "DCV_BROKER_AUTH_REFLECTION")]
    pub auth_reflection: bool,

    /// Let agents authenticate with a client certificate signed by this CA
    /// (PEM) instead of a token: the certificate's common name is the one
    /// server id the agent may act for. Needs TLS and authentication.
    /// `dcv-broker tls agent-cert` issues such certificates.
    #[arg(long, env = "DCV_BROKER_AGENT_CA", value_name = "PATH")]
    pub agent_ca: Option<PathBuf>,

    /// Directory of the durable store (created if missing). Every change
    /// an RPC acknowledges is on disk here first.
    #[arg(
        long,
        env = "DCV_BROKER_DATA_DIR",
        default_value = "dcv-broker-data",
        value_name = "DIR"
    )]
    pub data_dir: std::path::PathBuf,

    /// Keep the state in this PostgreSQL database instead of the SQLite
    /// store in --data-dir: postgres://USER:PASSWORD@HOST:PORT/DBNAME (or
    /// libpq's key=value form). Servers, holds, sessions, API clients and
    /// the token-signing key all live there; the schema is created or
    /// migrated at start. Plain TCP or a Unix socket, no TLS yet. The
    /// password is never logged. --data-dir then holds only the admin
    /// socket (created 0700 if missing); `dcv-broker clients` needs the
    /// broker running.
    #[arg(
        long,
        env = "DCV_BROKER_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL",
        conflicts_with = "in_memory"
    )]
    pub database_url: Option<DatabaseUrl>,

    /// With --database-url: this replica's name among the brokers sharing
    /// the database (default: a fresh UUID each start). Shown as the
    /// lease's holder and in forwarded calls.
    #[arg(
        long,
        env = "DCV_BROKER_NODE_ID",
        value_name = "ID",
        requires = "database_url"
    )]
    pub node_id: Option<String>,

    /// With --database-url: the URL the other replicas reach this one at
    /// when it leads (they forward writes there): http://HOST:PORT, or
    /// https:// with TLS. Default: the listening address, which must then
    /// be a specific one (not 0.0.0.0 or ::).
    #[arg(
        long,
        env = "DCV_BROKER_ADVERTISE_URL",
        value_name = "URL",
        requires = "database_url"
    )]
    pub advertise_url: Option<String>,

    /// With --database-url: how long the leader's lease lasts without a
    /// renewal (renewed every third of it). A failed leader is replaced
    /// after about this long; too short, and a slow database or a long
    /// pause costs a needless failover. At least 500ms.
    #[arg(
        long,
        env = "DCV_BROKER_LEADER_LEASE",
        default_value = "5s",
        value_parser = duration,
        value_name = "DURATION"
    )]
    pub leader_lease: Duration,

    /// With --database-url and TLS: the CA certificates (PEM) that the
    /// leader's certificate is checked against when a follower forwards a
    /// write. Default: the broker's own --tls-cert, which works when every
    /// replica serves the same certificate.
    #[arg(
        long,
        env = "DCV_BROKER_CLUSTER_CA",
        value_name = "PATH",
        requires = "database_url"
    )]
    pub cluster_ca: Option<PathBuf>,

    /// Keep state in memory only: a restart forgets every server, close and
    /// session. For tests and demos.
    #[arg(long, env = "DCV_BROKER_IN_MEMORY", conflicts_with = "data_dir")]
    pub in_memory: bool,

    /// Run N simulated DCV servers in-process (ids serverId1, dcv-0000001,
    /// ...), for demos and load tests.
    #[arg(
        long,
        env = "DCV_BROKER_DEMO_FLEET",
        default_value_t = 0,
        value_name = "N"
    )]
    pub demo_fleet: usize,

    /// How often agents are asked to send heartbeats.
    #[arg(long, env = "DCV_BROKER_HEARTBEAT_INTERVAL", default_value = "30s", value_parser = duration)]
    pub heartbeat_interval: Duration,

    /// Heartbeat silence after which a server is UNAVAILABLE / UNREACHABLE_AGENT.
    #[arg(long, env = "DCV_BROKER_UNREACHABLE_AFTER", default_value = "90s", value_parser = duration)]
    pub unreachable_after: Duration,

    /// Heartbeat silence after which an open server is forgotten. Closed
    /// servers are never forgotten this way.
    #[arg(long, env = "DCV_BROKER_REMOVE_AFTER", default_value = "1h", value_parser = duration)]
    pub remove_after: Duration,

    /// How often servers silent past --remove-after are looked for in the
    /// background (operations also notice them on their own).
    #[arg(long, env = "DCV_BROKER_SWEEP_INTERVAL", default_value = "5s", value_parser = duration)]
    pub sweep_interval: Duration,

    /// How long a DescribeServers NextToken stays valid.
    #[arg(long, env = "DCV_BROKER_PAGE_TOKEN_TTL", default_value = "1h", value_parser = duration)]
    pub page_token_ttl: Duration,

    /// How CreateSessions chooses among the servers that can take a
    /// session.
    #[arg(
        long,
        env = "DCV_BROKER_PLACEMENT_STRATEGY",
        value_enum,
        default_value = "spread"
    )]
    pub placement_strategy: Placement,

    /// The most CreateSessions requests (EnqueueRequest) that may wait for
    /// a server at once.
    #[arg(long, env = "DCV_BROKER_QUEUE_MAX_SIZE", default_value_t = 1000)]
    pub queue_max_size: usize,

    /// How long a queued CreateSessions request waits before it fails.
    #[arg(long, env = "DCV_BROKER_QUEUE_TIMEOUT", default_value = "1800s", value_parser = duration)]
    pub queue_timeout: Duration,

    /// How long an agent has to confirm a session creation before the
    /// broker tries another server.
    #[arg(long, env = "DCV_BROKER_AGENT_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub agent_timeout: Duration,

    /// How many other servers a failed session creation is retried on.
    #[arg(long, env = "DCV_BROKER_CREATE_RETRIES", default_value_t = 2)]
    pub create_retries: u32,

    /// How long GetSessionScreenshots waits for agents' screenshots; a
    /// session whose agent has not answered by then fails with
    /// AGENT_UNAVAILABLE. Keep it under --request-timeout.
    #[arg(long, env = "DCV_BROKER_SCREENSHOT_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub screenshot_timeout: Duration,

    /// The screenshot width when a GetSessionScreenshots item gives no
    /// MaxWidth (DCV's session-screenshot-max-width).
    #[arg(long, env = "DCV_BROKER_SCREENSHOT_MAX_WIDTH", default_value_t = 160,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub screenshot_max_width: u32,

    /// The screenshot height when a GetSessionScreenshots item gives no
    /// MaxHeight (DCV's session-screenshot-max-height).
    #[arg(long, env = "DCV_BROKER_SCREENSHOT_MAX_HEIGHT", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub screenshot_max_height: u32,

    /// The encoding agents are asked for (DCV's session-screenshot-format).
    #[arg(
        long,
        env = "DCV_BROKER_SCREENSHOT_FORMAT",
        value_enum,
        default_value = "png"
    )]
    pub screenshot_format: ScreenshotFormat,

    /// A pool's capacity floor, `tag:KEY=VALUE:N`: a CloseServers item that
    /// would leave fewer than N AVAILABLE servers with that tag fails with
    /// CAPACITY_FLOOR unless it sets OverrideCapacityFloor (repeat for
    /// several pools).
    #[arg(
        long = "capacity-floor",
        env = "DCV_BROKER_CAPACITY_FLOORS",
        value_name = "tag:KEY=VALUE:N",
        value_delimiter = ',',
        value_parser = capacity_floor
    )]
    pub capacity_floors: Vec<crate::fleet::CapacityFloor>,

    /// How long DELETED sessions stay visible in DescribeSessions.
    #[arg(long, env = "DCV_BROKER_DELETED_SESSION_RETENTION", default_value = "1h", value_parser = duration)]
    pub deleted_session_retention: Duration,

    /// How long a connection token from GetSessionConnectionData is valid.
    #[arg(long, env = "DCV_BROKER_CONNECTION_TOKEN_TTL", default_value = "1h", value_parser = duration)]
    pub connection_token_ttl: Duration,

    /// Longest a request may run before it is cancelled ("0s": no limit).
    #[arg(long, env = "DCV_BROKER_REQUEST_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub request_timeout: Duration,

    /// Limits against abusive clients.
    #[command(flatten)]
    pub limits: LimitFlags,

    /// On SIGTERM/SIGINT, how long to wait for open connections to finish.
    /// A second signal ends the wait at once.
    #[arg(long, env = "DCV_BROKER_DRAIN_DEADLINE", default_value = "10s", value_parser = duration)]
    pub drain_deadline: Duration,

    /// On SIGTERM/SIGINT, how long to keep serving after reporting
    /// NOT_SERVING to health checks, before draining: load balancers move
    /// traffic away meanwhile ("0s": drain at once).
    #[arg(long, env = "DCV_BROKER_SHUTDOWN_GRACE", default_value = "5s", value_parser = duration)]
    pub shutdown_grace: Duration,

    /// Connections held open at once (TLS handshakes included); more are
    /// closed as soon as they are accepted. Lowered at start to fit the
    /// open-file limit.
    #[arg(
        long,
        env = "DCV_BROKER_MAX_CONNECTIONS",
        default_value_t = crate::server::connections::MAX_CONNECTIONS,
        value_name = "N"
    )]
    pub max_connections: usize,

    /// How long a new connection has to start its first request before it
    /// is closed (for TLS, counted from the end of the handshake; "0s": no
    /// limit).
    #[arg(long, env = "DCV_BROKER_FIRST_REQUEST_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub first_request_timeout: Duration,

    /// How long a connection may stay open with no request in progress
    /// before it is closed; clients reconnect when they next call ("0s": no
    /// limit). An open stream (an agent's, a health watch) is a request in
    /// progress.
    #[arg(long, env = "DCV_BROKER_IDLE_CONNECTION_TIMEOUT", default_value = "5m", value_parser = duration)]
    pub idle_connection_timeout: Duration,

    /// Log format.
    #[arg(
        long,
        env = "DCV_BROKER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// Log filter [default: info]. A bare level applies to the broker's
    /// own logs, libraries staying at info at most: `debug` shows every
    /// request without HTTP/2's frames. Anything else is tracing's
    /// EnvFilter syntax, taken as is (`debug,h2=trace` for everything).
    /// Without this flag, RUST_LOG, if set, is taken as is.
    #[arg(long, env = "DCV_BROKER_LOG", value_name = "FILTER")]
    pub log: Option<String>,

    /// Export OpenTelemetry traces over OTLP/gRPC to this collector
    /// (`http://HOST:4317`): spans of each RPC, placement, the store commit
    /// and the agent round trip, under the caller's W3C `traceparent`.
    /// Off when absent, and then free.
    #[arg(long, env = "DCV_BROKER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// Also write the audit log (one JSON line per state-changing call) to
    /// this file (appended; created 0600) or to stdout (`-`). The store
    /// keeps every record either way.
    #[arg(long, env = "DCV_BROKER_AUDIT_LOG", value_name = "DEST")]
    pub audit_log: Option<String>,

    /// How long the store keeps audit records before pruning them.
    #[arg(
        long,
        env = "DCV_BROKER_AUDIT_RETENTION",
        default_value = "90days",
        value_parser = duration
    )]
    pub audit_retention: Duration,

    /// How long the first reply to a call made with a ClientToken
    /// (CloseServers, OpenServers, CreateSessions, DeleteSessions,
    /// UpdateSessionPermissions) is kept: the same caller sending the same
    /// request with the same token within it gets that reply again, same
    /// RequestId, and nothing is applied twice; the same token with
    /// another request is refused (INVALID_ARGUMENT). Kept in the store.
    #[arg(
        long,
        env = "DCV_BROKER_CLIENT_TOKEN_RETENTION",
        default_value = "24h",
        value_parser = duration
    )]
    pub client_token_retention: Duration,

    /// The most ClientToken records kept at once. A call with a new token
    /// beyond it fails with RESOURCE_EXHAUSTED: a live record is never
    /// evicted, since that would make its caller's retry apply twice.
    #[arg(long, env = "DCV_BROKER_CLIENT_TOKEN_LIMIT", default_value_t = 100_000,
          value_parser = clap::builder::TypedValueParser::map(
              clap::value_parser!(u64).range(1..=100_000_000), |n| n as usize))]
    pub client_token_limit: usize,

    /// Server changes kept for WatchServers watchers to resume from. A
    /// resume from before them fails with OUT_OF_RANGE (the watcher lists
    /// again); a watcher half this far behind is ended.
    #[arg(long, env = "DCV_BROKER_WATCH_BUFFER", default_value_t = 10_000,
          value_parser = clap::builder::TypedValueParser::map(
              clap::value_parser!(u64).range(16..=10_000_000), |n| n as usize))]
    pub watch_buffer: usize,

    /// Take every setting not given as a flag or environment variable from
    /// this TOML file: each key is a flag's name, `-` written `_`
    /// (`dcv-broker config defaults` prints one with every key).
    #[arg(long, env = "DCV_BROKER_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Without a subcommand, the broker serves.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// When callers must authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// On with TLS, off without.
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

/// What the binary does instead of serving.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// API and agent clients: register, list, revoke. Works on a running
    /// broker (through its admin socket) and on a stopped one (on its
    /// store).
    Clients {
        /// What to do.
        #[command(subcommand)]
        command: ClientsCommand,
    },
    /// DCV Session Manager's spelling of `clients register`, for set-up
    /// tools written for DCV (the Access Console's wizard runs
    /// `register-api-client -cn NAME`): registers an API client with the
    /// scopes a DCV API client has, every scope but `agent` (read,
    /// servers:operate, sessions:manage), and prints exactly DCV's two
    /// lines, `client-id: ID` and `client-password: SECRET`. The secret is
    /// shown once: only its argon2 hash is stored.
    RegisterApiClient {
        /// A name to recognise it by (DCV's `-cn` is accepted too).
        #[arg(long, visible_alias = "name", value_name = "NAME")]
        client_name: String,
        /// Where the broker keeps its clients.
        #[command(flatten)]
        location: AdminLocation,
    },
    /// Copies the store of a running broker into FILE while it keeps
    /// serving (through its admin socket, with SQLite's online backup
    /// API): a complete store, mode 0600, that a broker starts from as
    /// DIR/broker.sqlite3. Not for a PostgreSQL store: use pg_dump.
    Backup {
        /// The backup file to write (read where this command runs).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
        /// Where the running broker is.
        #[command(flatten)]
        location: AdminLocation,
    },
    /// TLS certificates for the broker.
    Tls {
        /// What to do.
        #[command(subcommand)]
        command: TlsCommand,
    },
    /// The configuration file (--config).
    Config {
        /// What to do.
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

/// `dcv-broker config ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum ConfigCommand {
    /// Checks a configuration file as the broker would take it at a start
    /// (with the current environment, which overrides it): exits 0 if it
    /// would start, else 1 with one line naming what is wrong.
    Check {
        /// The file.
        #[arg(long, env = "DCV_BROKER_CONFIG", value_name = "PATH")]
        config: PathBuf,
    },
    /// Prints a configuration file of every setting at its default, each
    /// under its flag's help (settings without a default commented out).
    Defaults,
}

/// `dcv-broker clients ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum ClientsCommand {
    /// Registers an API client (or an agent, with --server-id) and prints
    /// its id and secret. The secret is shown once: only its argon2 hash
    /// is stored. DCV's spelling, `dcv-broker register-api-client -cn
    /// NAME`, registers an API client with every scope but `agent`.
    Register {
        /// A name to recognise it by.
        #[arg(long)]
        name: String,
        /// What it may do, separated by commas or spaces: read (Describe*),
        /// servers:operate (Close/OpenServers), sessions:manage
        /// (Create/Delete sessions, connection data, permissions), agent.
        #[arg(long, value_parser = scopes)]
        scopes: ScopeSet,
        /// For an agent: the one server id it may register and report for
        /// (its only scope is then `agent`).
        #[arg(long)]
        server_id: Option<String>,
        /// Where the broker keeps its clients.
        #[command(flatten)]
        location: AdminLocation,
    },
    /// Lists every client, revoked ones too (never their secrets).
    List {
        /// Where the broker keeps its clients.
        #[command(flatten)]
        location: AdminLocation,
    },
    /// Revokes a client: it gets no new tokens, and the tokens it holds
    /// stop working at once on a running broker.
    Revoke {
        /// The client's id.
        client_id: String,
        /// Where the broker keeps its clients.
        #[command(flatten)]
        location: AdminLocation,
    },
}

/// Where `dcv-broker clients` finds the registry: a running broker's admin
/// socket, or else its store, opened directly.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminLocation {
    /// The broker's data directory.
    #[arg(
        long,
        env = "DCV_BROKER_DATA_DIR",
        default_value = "dcv-broker-data",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,
    /// The running broker's admin socket (default: DIR/admin.sock).
    #[arg(long, env = "DCV_BROKER_ADMIN_SOCKET", value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// Print the reply as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The command line with DCV's multi-letter short option `-cn` (of
/// `register-api-client`) spelled `--client-name`, which clap understands:
/// clap's short options are single letters, so `-cn NAME` would read as
/// `-c n NAME`. Nothing else is touched.
pub fn dcv_spellings<I>(args: I) -> Vec<std::ffi::OsString>
where
    I: IntoIterator,
    I::Item: Into<std::ffi::OsString>,
{
    let mut in_register = false;
    args.into_iter()
        .map(Into::into)
        .map(|arg| {
            if arg == "register-api-client" {
                in_register = true;
            } else if in_register && arg == "-cn" {
                return "--client-name".into();
            }
            arg
        })
        .collect()
}

fn scopes(text: &str) -> Result<ScopeSet, String> {
    match ScopeSet::parse(text) {
        Ok(set) if set.is_empty() => Err(format!("give at least one scope ({})", ScopeSet::ALL)),
        Ok(set) => Ok(set),
        Err(e) => Err(e.to_string()),
    }
}

/// `dcv-broker tls ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum TlsCommand {
    /// Creates a private CA and a server certificate it signs, for a first
    /// install: ca.pem, ca-key.pem, server.pem and server-key.pem in DIR.
    Init(InitArgs),
    /// Signs a client certificate for one agent with the CA `tls init`
    /// made, for brokers started with --agent-ca.
    AgentCert(AgentCertArgs),
}

impl Args {
    /// Checks the flags against each other.
    pub fn check(&self) -> Result<(), String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), Some(_)) | (None, None) => check_listen(
                self.listen,
                self.tls_cert.is_some(),
                self.auth_enabled(),
                self.allow_insecure_non_loopback,
            )?,
            _ => {
                return Err(
                    "--tls-cert and --tls-key go together: give both to serve TLS, or neither"
                        .into(),
                );
            }
        }
        if self.agent_ca.is_some() && (self.tls_cert.is_none() || !self.auth_enabled()) {
            return Err(
                "--agent-ca needs TLS (--tls-cert, --tls-key) and authentication (not --auth off)"
                    .into(),
            );
        }
        if self.database_url.is_some() {
            if self.leader_lease < Duration::from_millis(500) {
                return Err("--leader-lease must be at least 500ms".into());
            }
            if self.demo_fleet > 0 {
                return Err(
                    "--demo-fleet runs simulated agents inside one broker; it does not go with \
                     --database-url (replicas share their fleet through the database)"
                        .into(),
                );
            }
            if let Some(url) = &self.advertise_url {
                check_advertise_url(url, self.tls_cert.is_some())?;
            } else if self.listen.ip().is_unspecified() {
                return Err(format!(
                    "--listen {} is every address: give --advertise-url, the URL the other \
                     replicas reach this one at",
                    self.listen
                ));
            }
            if let Some(id) = &self.node_id
                && (id.is_empty() || id.len() > 128 || id.chars().any(char::is_control))
            {
                return Err(
                    "--node-id must be 1 to 128 characters, none a control character".into(),
                );
            }
        }
        if self.token_ttl.is_zero() {
            return Err("--token-ttl must be positive".into());
        }
        if self.client_token_retention.is_zero() {
            return Err("--client-token-retention must be positive".into());
        }
        if self.unreachable_after >= self.remove_after {
            return Err(format!(
                "--unreachable-after ({:?}) must be shorter than --remove-after ({:?})",
                self.unreachable_after, self.remove_after
            ));
        }
        if self.heartbeat_interval.is_zero() || self.sweep_interval.is_zero() {
            return Err("--heartbeat-interval and --sweep-interval must be positive".into());
        }
        if self.max_connections == 0 || self.agent_max_connections == 0 {
            return Err("--max-connections and --agent-max-connections must be positive".into());
        }
        if let Some(agents) = self.agent_listen {
            if agents == self.listen && agents.port() != 0 {
                return Err(format!(
                    "--agent-listen {agents} is --listen's address: give the agents a port of their own"
                ));
            }
            check_listen(
                agents,
                self.tls_cert.is_some(),
                self.auth_enabled(),
                self.allow_insecure_non_loopback,
            )
            .map_err(|e| format!("--agent-listen: {e}"))?;
        }
        if let Some(at) = self.metrics_listen {
            if !self.metrics {
                return Err("--metrics-listen needs the metrics on (not --metrics false)".into());
            }
            if !at.ip().is_loopback() && !self.allow_insecure_non_loopback {
                return Err(format!(
                    "--metrics-listen {at}: the metrics port is plaintext HTTP; listen on \
                     loopback, or pass --allow-insecure-non-loopback on a trusted network"
                ));
            }
        }
        self.limits.check()
    }

    /// Where the admin socket listens, if anywhere.
    pub fn admin_socket_path(&self) -> Option<PathBuf> {
        match (&self.admin_socket, self.in_memory) {
            (Some(path), _) => Some(path.clone()),
            (None, false) => Some(self.data_dir.join(crate::admin::SOCKET_NAME)),
            (None, true) => None,
        }
    }

    /// Whether callers must authenticate.
    pub fn auth_enabled(&self) -> bool {
        match self.auth {
            AuthMode::Auto => self.tls_cert.is_some(),
            AuthMode::On => true,
            AuthMode::Off => false,
        }
    }

    /// How authentication behaves (when it is on).
    pub fn auth_config(&self) -> crate::auth::AuthConfig {
        crate::auth::AuthConfig {
            token_ttl: self.token_ttl,
            ..crate::auth::AuthConfig::default()
        }
    }

    /// The broker configuration these flags describe (without the client
    /// registry, which the binary loads from the store).
    pub fn broker_config(&self) -> BrokerConfig {
        BrokerConfig {
            fleet: FleetConfig {
                heartbeat_interval: self.heartbeat_interval,
                unreachable_after: self.unreachable_after,
                remove_after: self.remove_after,
                page_token_ttl: self.page_token_ttl,
                placement: match self.placement_strategy {
                    Placement::Spread => PlacementStrategy::Spread,
                    Placement::Pack => PlacementStrategy::Pack,
                },
                queue_max_size: self.queue_max_size,
                queue_timeout: self.queue_timeout,
                agent_timeout: self.agent_timeout,
                create_retries: self.create_retries,
                deleted_retention: self.deleted_session_retention,
                connection_token_ttl: self.connection_token_ttl,
                client_token_retention: self.client_token_retention,
                client_token_limit: self.client_token_limit,
                watch_buffer: self.watch_buffer,
                screenshot_timeout: self.screenshot_timeout,
                screenshot_max_width: self.screenshot_max_width,
                screenshot_max_height: self.screenshot_max_height,
                screenshot_format: match self.screenshot_format {
                    ScreenshotFormat::Png => crate::fleet::ImageFormat::Png,
                    ScreenshotFormat::Jpeg => crate::fleet::ImageFormat::Jpeg,
                },
                capacity_floors: self.capacity_floors.clone(),
                ..FleetConfig::default()
            },
            request_timeout: (!self.request_timeout.is_zero()).then_some(self.request_timeout),
            drain_deadline: self.drain_deadline,
            shutdown_grace: self.shutdown_grace,
            connections: crate::server::connections::ConnectionLimits {
                max_connections: self.max_connections,
                first_request_timeout: (!self.first_request_timeout.is_zero())
                    .then_some(self.first_request_timeout),
                idle_timeout: (!self.idle_connection_timeout.is_zero())
                    .then_some(self.idle_connection_timeout),
            },
            sweep_interval: Some(self.sweep_interval),
            http2_keepalive: BrokerConfig::default().http2_keepalive,
            limits: self.limits.limits(),
            demo_fleet: self.demo_fleet,
            auth: None,
            open_services: crate::api::OpenServices {
                health: !self.auth_health,
                reflection: !self.auth_reflection,
            },
            allowed_hosts: self.allowed_hosts.clone(),
            rest_additions: self.rest_additions,
            cluster: crate::cluster::ClusterView::standalone(),
            cluster_ca: self.cluster_ca.clone(),
            // Built by the binary once the fleet exists (--metrics).
            metrics: None,
        }
    }
}

/// The flags of [`Limits`] an operator may need to tune; the others keep
/// their defaults. See [`Limits`] for why each exists.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitFlags {
    /// Largest request message accepted, in bytes; a bigger one fails with
    /// OUT_OF_RANGE before it is read.
    #[arg(
        long,
        env = "DCV_BROKER_MAX_REQUEST_BYTES",
        default_value_t = Limits::default().max_request_bytes,
        value_name = "BYTES"
    )]
    pub max_request_bytes: usize,

    /// Requests handled at once across all connections; more are refused
    /// at once with RESOURCE_EXHAUSTED ("0": no limit). Health checks are
    /// never refused.
    #[arg(
        long,
        env = "DCV_BROKER_MAX_CONCURRENT_REQUESTS",
        default_value_t = Limits::default().max_concurrent_requests.unwrap_or(0),
        value_name = "N"
    )]
    pub max_concurrent_requests: usize,

    /// Requests a second each client may sustain; more get
    /// RESOURCE_EXHAUSTED with RetryInfo ("0": no limit). A client is its
    /// authenticated client id or, without credentials, its IP address
    /// (IPv6: a /64); behind a proxy, all unauthenticated requests are one
    /// client.
    #[arg(
        long,
        env = "DCV_BROKER_CLIENT_RATE",
        default_value_t = Limits::default().client_rate.map_or(0, |r| r.per_second.get()),
        value_name = "PER_SECOND"
    )]
    pub client_rate: u32,

    /// Requests a client may make at once after a pause (its bucket size).
    #[arg(
        long,
        env = "DCV_BROKER_CLIENT_BURST",
        default_value_t = Limits::default().client_rate.map_or(0, |r| r.burst.get()),
        value_name = "N"
    )]
    pub client_burst: u32,

    /// Most bytes of metadata (HTTP/2 headers, 32 bytes counted per entry)
    /// one request may carry; more is refused by HTTP/2 before any handler
    /// runs.
    #[arg(
        long,
        env = "DCV_BROKER_MAX_HEADER_LIST_BYTES",
        default_value_t = Limits::default().max_header_list_bytes,
        value_name = "BYTES"
    )]
    pub max_header_list_bytes: u32,

    /// Most requests open at once on one HTTP/2 connection (clients queue
    /// the rest).
    #[arg(
        long,
        env = "DCV_BROKER_MAX_CONCURRENT_STREAMS",
        default_value_t = Limits::default().max_concurrent_streams,
        value_name = "N"
    )]
    pub max_concurrent_streams: u32,
}

impl LimitFlags {
    fn check(&self) -> Result<(), String> {
        if self.max_request_bytes == 0 || self.max_concurrent_streams == 0 {
            return Err("--max-request-bytes and --max-concurrent-streams must be positive".into());
        }
        if self.client_rate > 0 && self.client_burst == 0 {
            return Err("--client-burst must be positive when --client-rate is".into());
        }
        // gRPC's own request headers take a few hundred bytes.
        if self.max_header_list_bytes < 1024 {
            return Err("--max-header-list-bytes must be at least 1024".into());
        }
        Ok(())
    }

    fn limits(&self) -> Limits {
        Limits {
            max_request_bytes: self.max_request_bytes,
            max_concurrent_requests: (self.max_concurrent_requests > 0)
                .then_some(self.max_concurrent_requests),
            client_rate: ClientRate::new(self.client_rate, self.client_burst),
            max_header_list_bytes: self.max_header_list_bytes,
            max_concurrent_streams: self.max_concurrent_streams,
            ..Limits::default()
        }
    }
}

/// Refuses a listener beyond loopback without both TLS and
/// authentication, unless explicitly allowed.
pub fn check_listen(
    addr: SocketAddr,
    tls: bool,
    auth: bool,
    allow_insecure: bool,
) -> Result<(), String> {
    if addr.ip().is_loopback() || (tls && auth) || allow_insecure {
        return Ok(());
    }
    let missing = match (tls, auth) {
        (false, false) => "plaintext gRPC without authentication",
        (false, true) => "plaintext gRPC (tokens would cross the network in the clear)",
        _ => "gRPC without authentication (--auth off)",
    };
    Err(format!(
        "refusing to serve {missing} on non-loopback address {addr}: anyone who reaches it could close every server. \
         Listen on 127.0.0.1, serve TLS (--tls-cert and --tls-key; `dcv-broker tls init` makes them) with authentication on, \
         or pass --allow-insecure-non-loopback on a trusted network"
    ))
}

/// Refuses an --advertise-url that is not a plain `http(s)://HOST:PORT`
/// URL, or whose scheme does not match the broker's transport.
fn check_advertise_url(url: &str, tls: bool) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("--advertise-url {url:?} is not a URL: {e}"))?;
    let scheme = uri.scheme_str().unwrap_or_default();
    let wanted = if tls { "https" } else { "http" };
    if scheme != wanted {
        return Err(format!(
            "--advertise-url {url:?} must start with {wanted}:// (the broker serves {})",
            if tls { "TLS" } else { "plaintext" }
        ));
    }
    if uri.host().is_none_or(str::is_empty) || uri.port_u16().is_none() {
        return Err(format!(
            "--advertise-url {url:?} must name a host and a port"
        ));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!("--advertise-url {url:?} must have no path"));
    }
    Ok(())
}

pub mod file;
#[cfg(test)]
mod tests;

/// A `--database-url`, kept out of `Debug` output and clap's messages: it
/// may carry a password. Not checked when parsed (clap would echo a refused
/// value); the store checks it when it connects and names only host, port
/// and database in its errors.
#[derive(Clone)]
pub struct DatabaseUrl(pub String);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseUrl(<redacted>)")
    }
}

impl std::str::FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        Ok(DatabaseUrl(url.to_owned()))
    }
}
