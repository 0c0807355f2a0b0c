//! Runs the broker: the gRPC services, reflection, health and every server
//! knob, until a shutdown signal, then a bounded drain.

use std::{future::Future, pin::Pin, time::Duration};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::ServingStatus;

use crate::{
    api::{
        AgentApi, AuthLayer, OpenServices, RequestSpanLayer, ServersApi, SessionsApi,
        oauth::TokenEndpoint,
    },
    auth::Auth,
    demo,
    fleet::{Fleet, FleetConfig},
    limits::{ClientRateLayer, InFlightLimitLayer, Limits},
    pb::{
        agent_server::AgentServer, servers_server::ServersServer, sessions_server::SessionsServer,
    },
    tls::ServerTls,
};

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
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            fleet: FleetConfig::default(),
            request_timeout: Some(Duration::from_secs(30)),
            drain_deadline: Duration::from_secs(10),
            sweep_interval: Some(Duration::from_secs(5)),
            http2_keepalive: Some(Duration::from_secs(60)),
            limits: Limits::default(),
            demo_fleet: 0,
            auth: None,
            open_services: OpenServices::default(),
        }
    }
}

/// Why the broker could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reflection could not load a descriptor set.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The google.rpc descriptors compiled in do not decode.
    #[error("reflection: google.rpc descriptors: {0}")]
    Descriptors(#[from] prost::DecodeError),
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
/// then reports NOT_SERVING, stops accepting, and waits up to the drain
/// deadline for open connections before returning.
pub async fn serve(
    listener: TcpListener,
    fleet: Fleet,
    config: BrokerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    run(listener, fleet, config, None, shutdown).await
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
    run(listener, fleet, config, Some(tls), shutdown).await
}

async fn run(
    listener: TcpListener,
    fleet: Fleet,
    config: BrokerConfig,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()>,
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

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ServersServer<ServersApi>>().await;
    health.set_serving::<AgentServer<AgentApi>>().await;
    health.set_serving::<SessionsServer<SessionsApi>>().await;
    health.set_service_status("", ServingStatus::Serving).await;

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
    let servers = ServersServer::new(ServersApi::new(fleet.clone()))
        .max_decoding_message_size(limits.max_request_bytes)
        .max_encoding_message_size(limits.max_response_bytes);
    let sessions = SessionsServer::new(SessionsApi::new(fleet.clone()))
        .max_decoding_message_size(limits.max_request_bytes)
        .max_encoding_message_size(limits.max_response_bytes);
    let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
    let agent = AgentServer::new(AgentApi::new(fleet.clone(), stopping_rx))
        .max_decoding_message_size(limits.max_request_bytes)
        .max_encoding_message_size(limits.max_response_bytes);

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let builder = Server::builder()
        // The token endpoint is plain HTTP: OAuth clients (curl, Python's
        // requests) speak HTTP/1.1. gRPC stays HTTP/2 only.
        .accept_http1(true)
        .http2_keepalive_interval(config.http2_keepalive)
        .http2_keepalive_timeout(config.http2_keepalive.map(|_| Duration::from_secs(20)));
    let mut builder = limits.http2(builder);
    if let Some(limit) = config.request_timeout {
        builder = builder.timeout(limit);
    }
    let router = builder
        // Outermost, so that refusals below are logged with the request's
        // id; then authentication, so that the rate is counted per client
        // id; then the client's rate, so that a client over it takes no
        // slot from the others; then the global in-flight limit.
        .layer(RequestSpanLayer)
        .layer(tower::util::option_layer(
            config
                .auth
                .clone()
                .map(|auth| AuthLayer::new(auth, config.open_services)),
        ))
        .layer(ClientRateLayer::new(
            limits.client_rate,
            limits.max_tracked_clients,
        ))
        .layer(InFlightLimitLayer::new(limits.max_concurrent_requests))
        .add_optional_service(config.auth.clone().map(TokenEndpoint::new))
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
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                stopped,
            )),
            Some(tls) => {
                Box::pin(router.serve_with_incoming_shutdown(tls.incoming(listener), stopped))
            }
        };

    tokio::select! {
        result = &mut server => return result.map_err(ServeError::from),
        () = shutdown => {}
    }
    tracing::info!("shutting down: reporting NOT_SERVING and draining connections");
    health.set_not_serving::<ServersServer<ServersApi>>().await;
    health.set_not_serving::<AgentServer<AgentApi>>().await;
    health
        .set_not_serving::<SessionsServer<SessionsApi>>()
        .await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    // End agents' instruction streams, which never end by themselves.
    let _ = stopping.send(true);
    let _ = stop_tx.send(());
    match tokio::time::timeout(config.drain_deadline, server).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!(
            deadline = ?config.drain_deadline,
            "drain deadline passed; closing the remaining connections"
        ),
    }
    drop(tasks);
    tracing::info!("stopped");
    Ok(())
}
