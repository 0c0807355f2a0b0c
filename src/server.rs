//! Runs the broker: the gRPC services, reflection, health and every server
//! knob, until a shutdown signal, then a grace period and a bounded drain.

pub mod agent_port;
pub mod connections;

use std::{future::Future, net::SocketAddr, pin::Pin, time::Duration};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::{
    ServingStatus,
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};

use crate::{
    api::{
        AgentApi, Forwarder, HttpGateLayer, OpenServices, ServersApi, SessionsApi,
        forward::ForwarderConfig, gate::RestGate, oauth::TokenEndpoint, rest::RestLayer,
        verifier::TokenVerifier,
    },
    auth::Auth,
    demo,
    fleet::{Fleet, FleetConfig},
    limits::Limits,
    pb::{
        agent_server::AgentServer, servers_server::ServersServer, sessions_server::SessionsServer,
    },
    tls::ServerTls,
};

use self::agent_port::AgentPort;
use self::connections::{ConnectionLimits, Connections};

/// The layers in front of a port's routes, outermost first. A macro, not a
/// function: each layer changes the builder's type.
///
/// Outside every other layer: counts each connection's open requests
/// (refused ones too), for idle reaping, and ends streaming replies when the
/// drain starts. Then the metrics, so that every refusal below is counted
/// with its code. Then the request span, so that refusals below are logged
/// with the request's id; then the HTTP gate, which refuses what is not for
/// us (other hosts, other sites, non-gRPC on gRPC paths) and answers the
/// token endpoint itself, outside the gRPC limits; then authentication, so
/// that the rate is counted per client id; then the client's rate, so that
/// a client over it takes no slot from the others; then the in-flight
/// limit.
macro_rules! layered {
    ($builder:expr, $connections:expr, $gate:expr, $config:expr) => {
        $builder
            .layer($connections.layer())
            .layer(tower::util::option_layer(
                $config.metrics.as_ref().map(|metrics| metrics.layer()),
            ))
            .layer($crate::api::RequestSpanLayer::new($config.cluster.clone()))
            .layer($gate)
            .layer(tower::util::option_layer($config.auth.clone().map(
                |auth| $crate::api::AuthLayer::new(auth, $config.open_services),
            )))
            .layer(tower::util::option_layer($config.limits.client_rate.map(
                |rate| {
                    $crate::limits::ClientRateLayer::new(rate, $config.limits.max_tracked_clients)
                },
            )))
            .layer(tower::util::option_layer(
                $config
                    .limits
                    .max_concurrent_requests
                    .map($crate::limits::InFlightLimitLayer::new),
            ))
    };
}
pub(crate) use layered;

/// How the broker runs, apart from where it listens.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Fleet timeouts.
    pub fleet: FleetConfig,
    /// Longest time a request may run before it is cancelled (`None`: no
    /// limit). Clients' own `grpc-timeout` applies too, whichever is less.
    pub request_timeout: Option<Duration>,
    /// How long shutdown waits for open connections to finish.
    pub drain_deadline: Duration,
    /// How long the broker keeps serving after reporting NOT_SERVING on
    /// shutdown, before it stops taking requests: load balancers see the
    /// health change and move traffic away while calls still succeed.
    pub shutdown_grace: Duration,
    /// How many connections are held at once and how long idle ones stay.
    pub connections: ConnectionLimits,
    /// How often servers past the removal timeout are swept in the
    /// background (`None`: only when an operation notices them).
    pub sweep_interval: Option<Duration>,
    /// HTTP/2 keepalive ping interval, to notice dead peers (`None`: off).
    pub http2_keepalive: Option<Duration>,
    /// Limits against abusive or broken clients: message sizes, rates,
    /// concurrency, HTTP/2 streams and headers.
    pub limits: Limits,
    /// Simulated servers to run in-process.
    pub demo_fleet: usize,
    /// The clients allowed to call, and the token endpoint's issuer
    /// (`None`: no authentication; every caller may call every RPC).
    pub auth: Option<Auth>,
    /// What stays open to callers without credentials when `auth` is on.
    pub open_services: OpenServices,
    /// Host names a plaintext broker on loopback answers besides IP
    /// literals and `localhost` (see `api::gate`: DNS rebinding).
    pub allowed_hosts: Vec<String>,
    /// Whether DCV REST replies carry dcv-broker's fields beyond DCV's
    /// (`Holds`, `Reason`, `FailureCode` on session failures, ...). Off by
    /// default: clients generated from DCV's OpenAPI file may refuse
    /// fields it does not name.
    pub rest_additions: bool,
    /// This broker's place among replicas on one database (standalone by
    /// default: the leader, forwarding nothing).
    pub cluster: crate::cluster::ClusterView,
    /// PEM roots that verify an `https://` leader's certificate when this
    /// replica forwards to it (`None`: the broker's own certificate file,
    /// which fits replicas sharing one certificate; without TLS, the
    /// system's roots).
    pub cluster_ca: Option<std::path::PathBuf>,
    /// The metrics `GET /metrics` serves and every request updates
    /// (`None`: no metrics route and no per-request counting).
    pub metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            fleet: FleetConfig::default(),
            request_timeout: Some(Duration::from_secs(30)),
            drain_deadline: Duration::from_secs(10),
            shutdown_grace: SHUTDOWN_GRACE,
            connections: ConnectionLimits::default(),
            sweep_interval: Some(Duration::from_secs(5)),
            http2_keepalive: Some(Duration::from_secs(60)),
            limits: Limits::default(),
            demo_fleet: 0,
            auth: None,
            open_services: OpenServices::default(),
            allowed_hosts: Vec::new(),
            rest_additions: false,
            cluster: crate::cluster::ClusterView::standalone(),
            cluster_ca: None,
            metrics: None,
        }
    }
}

/// The default grace period between NOT_SERVING and the drain: health
/// checkers probe every few seconds (Kubernetes: 10 s by default, a load
/// balancer's health check often 5 s); five seconds lets the quicker ones
/// notice, and with the 10 s drain stays within Kubernetes' 30 s
/// termination grace.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the broker could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reflection could not load a descriptor set.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The agents' port could not start, or stopped on its own.
    #[error("agents' port: {0}")]
    AgentPort(String),
    /// The google.rpc descriptors compiled in do not decode.
    #[error("reflection: google.rpc descriptors: {0}")]
    Descriptors(#[from] prost::DecodeError),
    /// The roots to verify the leader's certificate with cannot be read.
    #[error("cluster CA {path}: {error}")]
    ClusterCa {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// tonic-types' descriptors of google.rpc's Status and error details,
/// under the file names every other copy of them has
/// (`google/rpc/error_details.proto`, `google/rpc/status.proto`).
/// tonic-types names them bare (`error_details.proto`), and a client whose
/// descriptor pool already holds google.rpc under the standard names (any
/// client with googleapis' types, such as Python's grpcio-status) would see
/// the same types defined twice.
fn google_rpc_descriptors() -> Result<prost_types::FileDescriptorSet, prost::DecodeError> {
    use prost::Message as _;
    let mut set = prost_types::FileDescriptorSet::decode(tonic_types::pb::FILE_DESCRIPTOR_SET)?;
    let standard = |name: &str| match name {
        "status.proto" | "error_details.proto" => format!("google/rpc/{name}"),
        _ => name.to_owned(),
    };
    for file in &mut set.file {
        file.name = file.name.as_deref().map(standard);
        for dependency in &mut file.dependency {
            *dependency = standard(dependency);
        }
    }
    Ok(set)
}

/// Resolves when the agents' port stops before the main server was told
/// to stop: that is a failure, whatever it says. Never resolves without an
/// agents' port.
async fn agents_stopped(port: &mut Option<agent_port::Running>) -> Result<(), ServeError> {
    match port {
        Some(port) => Err(match port.stopped().await {
            Ok(()) => ServeError::AgentPort("stopped on its own".into()),
            Err(e) => e,
        }),
        None => std::future::pending().await,
    }
}

/// A port's server builder with every server knob of `config` set.
fn builder(config: &BrokerConfig) -> Server {
    let builder = Server::builder()
        // The token endpoint is plain HTTP: OAuth clients (curl, Python's
        // requests) speak HTTP/1.1. hyper then accepts HTTP/1.1 for every
        // path; the HTTP gate keeps gRPC to HTTP/2 and application/grpc.
        .accept_http1(true)
        .http2_keepalive_interval(config.http2_keepalive)
        .http2_keepalive_timeout(config.http2_keepalive.map(|_| Duration::from_secs(20)));
    let mut builder = config.limits.http2(builder);
    if let Some(limit) = config.request_timeout {
        builder = builder.timeout(limit);
    }
    builder
}

/// The HTTP gate of a port listening on `local`.
fn gate(
    config: &BrokerConfig,
    fleet: &Fleet,
    local: SocketAddr,
    tls: bool,
    rest: RestGate,
) -> HttpGateLayer {
    HttpGateLayer::new(
        config
            .auth
            .clone()
            .map(|auth| TokenEndpoint::new(auth, &config.limits)),
        Some(TokenVerifier::new(fleet.clone())),
        rest,
        local,
        tls,
        &config.allowed_hosts,
    )
}

/// The forwarder of a replica among several (standalone: one that forwards
/// nothing), trusting `config.cluster_ca` or else the certificate `tls`
/// serves for an `https://` leader.
fn forwarder(config: &BrokerConfig, tls: Option<&ServerTls>) -> Result<Forwarder, ServeError> {
    if !config.cluster.is_clustered() {
        return Ok(Forwarder::standalone());
    }
    let path = config
        .cluster_ca
        .clone()
        .or_else(|| tls.map(|tls| tls.cert_path().to_path_buf()));
    let roots = match path {
        Some(path) => Some(std::fs::read(&path).map_err(|error| ServeError::ClusterCa {
            path: path.display().to_string(),
            error,
        })?),
        None => None,
    };
    Ok(Forwarder::new(
        config.cluster.clone(),
        ForwarderConfig {
            roots,
            max_request_bytes: config.limits.max_request_bytes,
            max_response_bytes: config.limits.max_response_bytes,
            request_timeout: config.request_timeout,
        },
    ))
}

/// The health service's name that is SERVING on the leader only (a single
/// broker always leads).
pub const LEADER_HEALTH: &str = "dcv-broker.leader";

/// The health service's name that is SERVING while this broker can take a
/// write: it leads, or it knows a leader to forward to. Reads are served
/// either way (the overall status stays SERVING).
pub const WRITES_HEALTH: &str = "dcv-broker.writes";

/// Keeps [`LEADER_HEALTH`] and [`WRITES_HEALTH`] in step with the
/// replica's role, for as long as the server runs.
async fn report_role(cluster: crate::cluster::ClusterView, health: HealthReporter) {
    use crate::cluster::Role;
    let mut roles = cluster.roles();
    loop {
        let role = roles.borrow_and_update().clone();
        let status = |on: bool| {
            if on {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        health
            .set_service_status(LEADER_HEALTH, status(role == Role::Leader))
            .await;
        health
            .set_service_status(
                WRITES_HEALTH,
                status(!matches!(role, Role::Unavailable { .. })),
            )
            .await;
        if roles.changed().await.is_err() {
            return;
        }
    }
}

/// Aborts background tasks when the server stops, however it stops.
struct TaskGuard(Vec<JoinHandle<()>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Serves `fleet` on `listener` in plaintext until `shutdown` resolves,
/// then reports NOT_SERVING, serves on for the configured grace period,
/// stops accepting, and waits up to the drain deadline for open
/// connections before returning.
pub async fn serve(
    listener: TcpListener,
    fleet: Fleet,
    config: BrokerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    serve_until(
        listener,
        fleet,
        config,
        None,
        shutdown,
        std::future::pending(),
    )
    .await
}

/// [`serve`], over TLS: every connection is a TLS connection with `tls`'s
/// current certificate; nothing is served in the clear.
pub async fn serve_tls(
    listener: TcpListener,
    fleet: Fleet,
    config: BrokerConfig,
    tls: ServerTls,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    serve_until(
        listener,
        fleet,
        config,
        Some(tls),
        shutdown,
        std::future::pending(),
    )
    .await
}

/// [`serve`] or, with `tls`, [`serve_tls`]; `hurry`, once `shutdown` has
/// resolved, cuts the grace period and the drain short and returns at once
/// (the binary's second SIGTERM or SIGINT).
pub async fn serve_until(
    listener: TcpListener,
    fleet: Fleet,
    config: BrokerConfig,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    run(listener, None, fleet, config, tls, shutdown, hurry).await
}

/// [`serve_until`], with the Agent service also served apart on `agents`
/// (see [`agent_port`]).
pub async fn serve_with_agent_port(
    listener: TcpListener,
    agents: AgentPort,
    fleet: Fleet,
    config: BrokerConfig,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    run(listener, Some(agents), fleet, config, tls, shutdown, hurry).await
}

async fn run(
    listener: TcpListener,
    agent_port: Option<AgentPort>,
    fleet: Fleet,
    config: BrokerConfig,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let mut tasks = TaskGuard(Vec::new());
    if config.demo_fleet > 0 {
        tasks.0.push(demo::spawn(fleet.clone(), config.demo_fleet));
    }
    if let Some(every) = config.sweep_interval {
        let fleet = fleet.clone();
        tasks.0.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                fleet.sweep();
            }
        }));
    }

    let health = HealthReporter::new();
    let health_service = HealthServer::new(HealthService::from_health_reporter(health.clone()));
    health.set_serving::<ServersServer<ServersApi>>().await;
    health.set_serving::<AgentServer<AgentApi>>().await;
    health.set_serving::<SessionsServer<SessionsApi>>().await;
    health.set_service_status("", ServingStatus::Serving).await;
    let roles = TaskGuard(vec![tokio::spawn(report_role(
        config.cluster.clone(),
        health.clone(),
    ))]);

    let google_rpc = google_rpc_descriptors()?;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Lets grpcurl render google.rpc.BadRequest error details.
            .register_file_descriptor_set(google_rpc.clone())
    };
    let reflection_v1 = reflection().build_v1()?;
    // grpcurl before 1.8.8, grpcui and Postman speak only v1alpha.
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let limits = &config.limits;
    let forward = forwarder(&config, tls.as_ref())?;
    let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
    let servers = ServersServer::new(
        ServersApi::new(fleet.clone())
            .with_forwarder(forward.clone())
            .with_stopping(stopping_rx.clone()),
    )
    .max_decoding_message_size(limits.max_request_bytes)
    .max_encoding_message_size(limits.max_response_bytes);
    let sessions = SessionsServer::new(
        SessionsApi::new(fleet.clone())
            .with_forwarder(forward.clone())
            .with_stopping(stopping_rx.clone()),
    )
    .max_decoding_message_size(limits.max_request_bytes)
    .max_encoding_message_size(limits.max_response_bytes);
    let agent = AgentServer::new(
        AgentApi::new(fleet.clone(), stopping_rx.clone()).with_forwarder(forward.clone()),
    )
    .max_decoding_message_size(limits.max_request_bytes)
    .max_encoding_message_size(limits.max_response_bytes);

    // Rebinding checks need to know whether this is a loopback listener;
    // one whose address cannot be read is treated as one (the strict side).
    let local = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    let gate = gate(
        &config,
        &fleet,
        local,
        tls.is_some(),
        RestGate {
            health: Some(health.clone()),
            max_request_bytes: limits.max_request_bytes,
            routes: true,
            cluster: config.cluster.clone(),
            metrics: config.metrics.clone(),
        },
    );

    let mut agent_port = match agent_port {
        Some(port) => Some(agent_port::start(
            port,
            agent_port::Parts {
                fleet: fleet.clone(),
                config: config.clone(),
                tls: tls.clone(),
                health: health.clone(),
                stopping: stopping_rx.clone(),
                forward: forward.clone(),
            },
        )?),
        None => None,
    };

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let connections = Connections::new(config.connections);
    let router = layered!(builder(&config), connections, gate, config)
        // Innermost: DCV's REST routes, which the gate renamed to their
        // gRPC methods and every layer above counted as such, are served
        // here by the same adapters as the gRPC services below.
        .layer(RestLayer::new(
            fleet.clone(),
            limits.max_request_bytes,
            config.request_timeout,
            config.rest_additions,
            forward,
            stopping_rx.clone(),
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(servers)
        .add_service(sessions)
        .add_service(agent);
    let stopped = async {
        let _ = stop_rx.await;
    };
    let mut server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
        match tls {
            // Nagle's algorithm would hold small unary replies for delayed
            // ACKs (tens of ms); the builder's own nodelay does not apply to
            // our listener. (The TLS accept loop sets it too.)
            None => Box::pin(router.serve_with_incoming_shutdown(
                connections.incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
                stopped,
            )),
            Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
                tls.incoming(listener, connections.clone()),
                stopped,
            )),
        };

    tokio::select! {
        result = &mut server => return result.map_err(ServeError::from),
        result = agents_stopped(&mut agent_port) => return result,
        () = shutdown => {}
    }
    let mut hurry = std::pin::pin!(hurry);
    // NOT_SERVING first, while everything still works: load balancers
    // that watch health move traffic away during the grace period, and
    // the calls that reach us meanwhile still succeed.
    tracing::info!(
        grace = ?config.shutdown_grace,
        drain_deadline = ?config.drain_deadline,
        "shutting down: reporting NOT_SERVING, serving on for the grace period, then draining \
         (a second signal stops at once)"
    );
    drop(roles);
    for role in [LEADER_HEALTH, WRITES_HEALTH] {
        health
            .set_service_status(role, ServingStatus::NotServing)
            .await;
    }
    health.set_not_serving::<ServersServer<ServersApi>>().await;
    health.set_not_serving::<AgentServer<AgentApi>>().await;
    health
        .set_not_serving::<SessionsServer<SessionsApi>>()
        .await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    if !config.shutdown_grace.is_zero() {
        tokio::select! {
            result = &mut server => return result.map_err(ServeError::from),
            result = agents_stopped(&mut agent_port) => return result,
            () = tokio::time::sleep(config.shutdown_grace) => {}
            () = &mut hurry => {
                tracing::warn!("second shutdown signal during the grace period: stopping now");
                drop(tasks);
                tracing::info!("stopped");
                return Ok(());
            }
        }
    }
    let agent_connections = agent_port.as_ref().map(agent_port::Running::connections);
    let open = || connections.open() + agent_connections.as_ref().map_or(0, Connections::open);
    tracing::info!(
        connections = open(),
        "draining: no new requests; open streams end; waiting for requests in progress"
    );
    // End agents' instruction streams, which never end by themselves, and
    // every other streaming reply (Health/Watch): they would hold the
    // drain to its deadline.
    let _ = stopping.send(true);
    connections.start_drain();
    if let Some(port) = agent_port.as_mut() {
        port.start_drain();
    }
    let _ = stop_tx.send(());
    let both = async {
        let main = (&mut server).await.map_err(ServeError::from);
        let agents = match agent_port.as_mut() {
            Some(port) => port.stopped().await,
            None => Ok(()),
        };
        main.and(agents)
    };
    let drained = tokio::select! {
        drained = tokio::time::timeout(config.drain_deadline, both) => Some(drained),
        () = &mut hurry => None,
    };
    match drained {
        Some(Ok(result)) => result?,
        Some(Err(_)) => tracing::warn!(
            deadline = ?config.drain_deadline,
            connections = open(),
            "drain deadline passed; closing the remaining connections"
        ),
        None => tracing::warn!(
            connections = open(),
            "second shutdown signal: ending the drain now; closing the remaining connections"
        ),
    }
    drop(tasks);
    tracing::info!("stopped");
    Ok(())
}
