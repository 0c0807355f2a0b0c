//! The agents' port: the Agent service, and what agents and DCV servers
//! need beside it, on a listener and a tokio runtime of its own whose
//! threads run at a lower CPU priority, so that a fleet of agents cannot
//! starve operators' calls.
//!
//! DCV Session Manager itself takes agents on a port of their own (8445,
//! clients on 8443). Here the split is a bulkhead: 10,000 agents
//! heartbeating once a second cost about half a core of HTTP/2 work. On
//! one runtime, an operator's DescribeServers waits behind that work in
//! the same run queues; on a runtime of its own at a higher nice value, the
//! kernel gives the operators' threads the CPU first whenever both want it,
//! and heartbeats use what is left (they tolerate seconds of delay; an
//! operator at a terminal does not). The fleet is shared: both runtimes
//! call the same [`Fleet`], whose lock is held for microseconds at a time.
//!
//! The agents' port serves the Agent service, gRPC health, the OAuth token
//! endpoint (agents with a client id and secret get their tokens there) and
//! DCV's token verifier (DCV servers call it on the agents' port), behind
//! the same gate, authentication and limits as the main port, with its own
//! connection cap and in-flight limit. The main port keeps serving the
//! Agent service too, so agents can move from one port to the other
//! without a flag day.

use std::{net::SocketAddr, thread, time::Duration};

use tokio::sync::{oneshot, watch};
use tonic::transport::server::TcpIncoming;
use tonic_health::{
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};

use super::{
    BrokerConfig, RestGate, ServeError, connections::ConnectionLimits, connections::Connections,
};
use crate::{api::AgentApi, fleet::Fleet, pb::agent_server::AgentServer, tls::ServerTls};

/// Default of `--agent-threads`.
pub const DEFAULT_THREADS: usize = 1;

/// Default of `--agent-nice`: a nice value 10 above the broker's own gives
/// the agents' threads about a tenth of the weight of the operators' ones
/// when both want the CPU (the kernel's weights fall about 1.25x per
/// step). Even on a CPU kept busy by operators, that tenth of a core serves
/// about 2,000 heartbeats a second (some 60,000 agents at the default
/// 30 s interval); at 5, DescribeServers was not protected enough in the
/// 10,000-agent benchmark (BENCHMARKS.md).
pub const DEFAULT_NICE: i32 = 10;

/// Where and how agents are served apart.
#[derive(Debug)]
pub struct AgentPort {
    /// The bound listener (bound by the caller, so that it can announce the
    /// address and fail early).
    pub listener: std::net::TcpListener,
    /// Worker threads of the agents' runtime.
    pub threads: usize,
    /// How much lower the agents' threads run than the broker's: a nice
    /// increment, 0 (same priority) to 19.
    pub nice: i32,
    /// The agents' port's own connection cap and idle timeouts.
    pub connections: ConnectionLimits,
}

/// What the agents' port needs from the main server.
pub(super) struct Parts {
    pub fleet: Fleet,
    pub config: BrokerConfig,
    pub tls: Option<ServerTls>,
    /// The main server's health: one state, served on both ports.
    pub health: HealthReporter,
    pub stopping: watch::Receiver<bool>,
    /// Sends agents' writes to the leader when this replica follows one.
    pub forward: crate::api::Forwarder,
}

/// The running agents' port, as the main server drives it.
pub(super) struct Running {
    connections: Connections,
    stop: Option<oneshot::Sender<()>>,
    done: oneshot::Receiver<Result<(), tonic::transport::Error>>,
    // Dropped with `Running`: the agents' runtime stops at once, whatever
    // it was doing (the main server returned; nothing waits for it).
    _abort: oneshot::Sender<()>,
}

impl Running {
    /// The agents' port's connections.
    pub fn connections(&self) -> Connections {
        self.connections.clone()
    }

    /// Stops taking requests and ends streaming replies (the drain).
    pub fn start_drain(&mut self) {
        self.connections.start_drain();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Resolves when the agents' server has stopped, with why.
    pub async fn stopped(&mut self) -> Result<(), ServeError> {
        match (&mut self.done).await {
            Ok(result) => result.map_err(ServeError::from),
            // The runtime's thread ended without a word: it panicked.
            Err(_) => Err(ServeError::AgentPort("its runtime stopped".into())),
        }
    }
}

/// Starts the agents' port on a thread and runtime of its own.
pub(super) fn start(port: AgentPort, parts: Parts) -> Result<Running, ServeError> {
    let AgentPort {
        listener,
        threads,
        nice,
        connections: limits,
    } = port;
    listener
        .set_nonblocking(true)
        .map_err(|e| ServeError::AgentPort(format!("listener: {e}")))?;
    let local = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("agent-port")
        .on_thread_start(move || lower_priority(nice))
        .enable_all()
        .build()
        .map_err(|e| ServeError::AgentPort(format!("runtime: {e}")))?;
    // Registered with the agents' runtime's reactor, not the caller's.
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener)
            .map_err(|e| ServeError::AgentPort(format!("listener: {e}")))?
    };
    let connections = Connections::new(limits);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (done_tx, done_rx) = oneshot::channel();
    let (abort_tx, abort_rx) = oneshot::channel::<()>();
    let serving = connections.clone();
    thread::Builder::new()
        .name("agent-port".into())
        .spawn(move || {
            lower_priority(nice);
            let served = runtime.block_on(async move {
                tokio::select! {
                    result = serve(listener, local, serving, parts, stop_rx) => Some(result),
                    _ = abort_rx => None,
                }
            });
            if let Some(result) = served {
                let _ = done_tx.send(result);
            }
            // Connections still open after the drain are closed here.
            runtime.shutdown_timeout(Duration::ZERO);
        })
        .map_err(|e| ServeError::AgentPort(format!("thread: {e}")))?;
    Ok(Running {
        connections,
        stop: Some(stop_tx),
        done: done_rx,
        _abort: abort_tx,
    })
}

async fn serve(
    listener: tokio::net::TcpListener,
    local: SocketAddr,
    connections: Connections,
    parts: Parts,
    stop: oneshot::Receiver<()>,
) -> Result<(), tonic::transport::Error> {
    let Parts {
        fleet,
        config,
        tls,
        health,
        stopping,
        forward,
    } = parts;
    let limits = &config.limits;
    let agent = AgentServer::new(AgentApi::new(fleet.clone(), stopping).with_forwarder(forward))
        .max_decoding_message_size(limits.max_request_bytes)
        .max_encoding_message_size(limits.max_response_bytes);
    // Health for the agents' load balancer; DCV's REST API is the
    // operators' and stays on the main port.
    let gate = super::gate(
        &config,
        &fleet,
        local,
        tls.is_some(),
        RestGate {
            health: Some(health.clone()),
            max_request_bytes: limits.max_request_bytes,
            routes: false,
            cluster: config.cluster.clone(),
            metrics: config.metrics.clone(),
        },
    );
    let router = super::layered!(super::builder(&config), connections, gate, config)
        .add_service(HealthServer::new(HealthService::from_health_reporter(
            health,
        )))
        .add_service(agent);
    let stopped = async {
        let _ = stop.await;
    };
    match tls {
        None => {
            router
                .serve_with_incoming_shutdown(
                    connections.incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
                    stopped,
                )
                .await
        }
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls.incoming(listener, connections.clone()), stopped)
                .await
        }
    }
}

/// Raises the calling thread's nice value by `nice` (Linux keeps one per
/// thread). Failing only costs the priority, so it is logged, not fatal.
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    let current = rustix::process::getpriority_process(None).unwrap_or(0);
    let wanted = (current + nice).min(19);
    if let Err(e) = rustix::process::setpriority_process(None, wanted) {
        tracing::warn!(error = %e, nice = wanted, "agents' port: cannot lower the thread's priority");
    }
}
