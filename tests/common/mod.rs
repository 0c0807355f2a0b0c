//! Test support: starts a real broker on 127.0.0.1:0 through the library's
//! `serve`, and builds agent requests.

#![allow(dead_code)]

pub mod agent_process;
pub mod postgres;
pub mod process;
pub mod raw_h2;

use std::{net::SocketAddr, time::Duration};

use dcv_broker::{
    BrokerConfig,
    fleet::{Fleet, FleetConfig},
    limits::Limits,
    pb::{self, agent_client::AgentClient, servers_client::ServersClient},
    serve,
    server::connections::ConnectionLimits,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// A broker running in this test's runtime.
pub struct Broker {
    pub addr: SocketAddr,
    pub fleet: Fleet,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Result<(), dcv_broker::server::ServeError>>,
}

/// A configuration with no background timers, so that tests on a paused
/// clock only see time move when they advance it. Every test client
/// connects from 127.0.0.1, which the rate limit would count as one
/// client: it is off here, and on in the tests of limits (so is the
/// token endpoint's rate of failed secrets per address).
pub fn quiet_config() -> BrokerConfig {
    BrokerConfig {
        fleet: FleetConfig::default(),
        request_timeout: None,
        drain_deadline: Duration::from_secs(5),
        shutdown_grace: Duration::ZERO,
        // Idle reaping would fire whenever a test advances a paused clock.
        connections: ConnectionLimits::unlimited(),
        sweep_interval: None,
        http2_keepalive: None,
        limits: Limits {
            client_rate: None,
            failed_secret_rate: None,
            ..Limits::default()
        },
        demo_fleet: 0,
        auth: None,
        open_services: Default::default(),
        allowed_hosts: Vec::new(),
        rest_additions: false,
        cluster: Default::default(),
        cluster_ca: None,
        metrics: None,
    }
}

impl Broker {
    pub async fn start(config: BrokerConfig) -> Broker {
        let fleet = Fleet::new(config.fleet.clone()).unwrap();
        Broker::start_with(config, fleet).await
    }

    /// Serves `fleet` (made with `config.fleet`, perhaps over a test store).
    pub async fn start_with(config: BrokerConfig, fleet: Fleet) -> Broker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(listener, fleet.clone(), config, async {
            let _ = stopped.await;
        }));
        Broker {
            addr,
            fleet,
            stop: Some(stop),
            task,
        }
    }

    pub async fn quiet() -> Broker {
        Broker::start(quiet_config()).await
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn servers(&self) -> ServersClient<Channel> {
        ServersClient::new(self.channel().await)
    }

    pub async fn agent(&self) -> AgentClient<Channel> {
        AgentClient::new(self.channel().await)
    }

    /// Asks the broker to shut down.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A registration for a server of `family` with room for `max_virtual`
/// virtual sessions.
pub fn registration(id: &str, family: &str, max_virtual: i32) -> pb::RegisterServerRequest {
    pb::RegisterServerRequest {
        server_id: id.to_string(),
        ip: "192.0.2.10".into(),
        hostname: format!("{id}.example"),
        endpoints: vec![pb::Endpoint {
            ip_address: "192.0.2.10".into(),
            port: 8443,
            protocol: pb::Protocol::Http as i32,
            web_url_path: "/".into(),
        }],
        version: "2024.0.19030".into(),
        session_manager_agent_version: "2024.0.817".into(),
        host: Some(pb::Host {
            os: Some(pb::Os {
                family: family.into(),
                name: "test os".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        tags: vec![pb::KeyValuePair {
            key: "city".into(),
            value: "London".into(),
        }],
        max_virtual_sessions: max_virtual,
        ..Default::default()
    }
}

/// A session report.
pub fn session(id: &str, kind: pb::SessionType, state: pb::SessionState) -> pb::AgentSession {
    pb::AgentSession {
        id: id.into(),
        owner: "alice".into(),
        r#type: kind as i32,
        state: state as i32,
        ..Default::default()
    }
}

/// A healthy heartbeat with these sessions.
pub fn beat(id: &str, sessions: Vec<pb::AgentSession>) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        server_id: id.into(),
        dcv_server_healthy: true,
        sessions,
        ..Default::default()
    }
}

pub async fn register(agent: &mut AgentClient<Channel>, id: &str, family: &str, max_virtual: i32) {
    agent
        .register_server(registration(id, family, max_virtual))
        .await
        .unwrap();
}

pub fn close_item(id: &str, force: Option<bool>, reason: &str) -> pb::CloseServerRequestData {
    pb::CloseServerRequestData {
        server_id: id.into(),
        force,
        reason: reason.into(),
        ..Default::default()
    }
}

pub fn close_req(items: Vec<pb::CloseServerRequestData>) -> pb::CloseServersRequest {
    pb::CloseServersRequest {
        servers: items,
        ..Default::default()
    }
}

pub fn open_req(ids: &[&str]) -> pb::OpenServersRequest {
    pb::OpenServersRequest {
        servers: ids
            .iter()
            .map(|id| pb::OpenServerRequestData {
                server_id: id.to_string(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

pub fn describe_ids(ids: &[&str]) -> pb::DescribeServersRequest {
    pb::DescribeServersRequest {
        server_ids: ids.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// `request`'s reply, which created its one session.
pub async fn create_one(
    sessions: &mut pb::sessions_client::SessionsClient<Channel>,
    request: impl tonic::IntoRequest<pb::CreateSessionsRequest>,
) -> pb::CreateSessionsResponse {
    let reply = sessions
        .create_sessions(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 1, "{reply:?}");
    reply
}

/// Describes one server, which must exist.
pub async fn describe_one(servers: &mut ServersClient<Channel>, id: &str) -> pb::Server {
    let mut page = servers
        .describe_servers(describe_ids(&[id]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.servers.len(), 1, "server {id} should exist");
    page.servers.remove(0)
}

/// The BadRequest field violations of an error status, as (field, text).
pub fn violations(status: &tonic::Status) -> Vec<(String, String)> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("INVALID_ARGUMENT must carry google.rpc.BadRequest")
        .field_violations
        .into_iter()
        .map(|v| (v.field, v.description))
        .collect()
}

pub fn reasons(server: &pb::Server) -> Vec<pb::UnavailabilityReason> {
    server
        .unavailability_reasons
        .iter()
        .map(|r| pb::UnavailabilityReason::try_from(*r).unwrap())
        .collect()
}

/// An agent driven by the test: registered, with its instruction stream
/// open, answering only when told to.
pub struct TestAgent {
    pub id: String,
    pub client: AgentClient<Channel>,
    pub stream: tonic::Streaming<pb::StreamInstructionsResponse>,
}

pub use pb::stream_instructions_response::Instruction as Instr;

impl TestAgent {
    pub async fn connect(broker: &Broker, request: pb::RegisterServerRequest) -> TestAgent {
        TestAgent::connect_to(broker.addr, request).await
    }

    /// [`TestAgent::connect`] to a broker at `addr` (the binary's too).
    pub async fn connect_to(addr: SocketAddr, request: pb::RegisterServerRequest) -> TestAgent {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = AgentClient::new(channel);
        let id = request.server_id.clone();
        client.register_server(request).await.unwrap();
        let stream = client
            .stream_instructions(pb::StreamInstructionsRequest {
                server_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        TestAgent { id, client, stream }
    }

    /// The next instruction (waits for it).
    pub async fn next(&mut self) -> Instr {
        self.stream
            .message()
            .await
            .unwrap()
            .expect("instruction stream ended")
            .instruction
            .expect("instruction body")
    }

    /// The next instruction, which must be a creation; returns it.
    pub async fn next_create(&mut self) -> pb::CreateSessionInstruction {
        match self.next().await {
            Instr::CreateSession(c) => c,
            other => panic!("expected CreateSession, got {other:?}"),
        }
    }

    pub async fn report(
        &mut self,
        session: &str,
        kind: pb::InstructionKind,
        success: bool,
        state: pb::SessionState,
    ) {
        self.client
            .report_instruction_result(pb::ReportInstructionResultRequest {
                server_id: self.id.clone(),
                session_id: session.into(),
                kind: kind as i32,
                success,
                failure_reason: if success {
                    String::new()
                } else {
                    "no such user".into()
                },
                session_state: state as i32,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// The next instruction with its id (waits for it).
    pub async fn next_with_id(&mut self) -> (String, Instr) {
        let message = self
            .stream
            .message()
            .await
            .unwrap()
            .expect("instruction stream ended");
        (
            message.instruction_id,
            message.instruction.expect("instruction body"),
        )
    }

    /// The next instruction, which must be a screenshot request; returns
    /// its id and body.
    pub async fn next_screenshot(&mut self) -> (String, pb::GetScreenshotInstruction) {
        match self.next_with_id().await {
            (id, Instr::GetScreenshot(g)) => (id, g),
            (_, other) => panic!("expected GetScreenshot, got {other:?}"),
        }
    }

    /// Answers GET_SCREENSHOT `instruction_id` for `session` with
    /// `images` (success) or `failure` (a reason).
    pub async fn report_screenshot(
        &mut self,
        session: &str,
        instruction_id: &str,
        answer: Result<Vec<pb::SessionScreenshotImage>, &str>,
    ) -> Result<(), tonic::Status> {
        let (success, images, failure_reason) = match answer {
            Ok(images) => (true, images, String::new()),
            Err(why) => (false, Vec::new(), why.to_string()),
        };
        self.client
            .report_instruction_result(pb::ReportInstructionResultRequest {
                server_id: self.id.clone(),
                session_id: session.into(),
                kind: pb::InstructionKind::GetScreenshot as i32,
                success,
                failure_reason,
                instruction_id: instruction_id.into(),
                images,
                ..Default::default()
            })
            .await
            .map(drop)
    }

    /// Reports these sessions as the server's current ones.
    pub async fn beat(&mut self, sessions: Vec<pb::AgentSession>) {
        self.client
            .heartbeat(beat(&self.id, sessions))
            .await
            .unwrap();
    }
}

/// A CreateSessions item.
pub fn create_item(name: &str, owner: &str, kind: pb::SessionType) -> pb::CreateSessionRequestData {
    pb::CreateSessionRequestData {
        name: name.into(),
        owner: owner.into(),
        r#type: kind as i32,
        ..Default::default()
    }
}

pub fn create_req(items: Vec<pb::CreateSessionRequestData>) -> pb::CreateSessionsRequest {
    pb::CreateSessionsRequest {
        sessions: items,
        ..Default::default()
    }
}

/// Describes one session, which must exist.
pub async fn describe_session(
    sessions: &mut pb::sessions_client::SessionsClient<Channel>,
    id: &str,
) -> pb::Session {
    let mut page = sessions
        .describe_sessions(pb::DescribeSessionsRequest {
            session_ids: vec![id.to_string()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.sessions.len(), 1, "session {id} should exist");
    page.sessions.remove(0)
}

impl Broker {
    pub async fn sessions(&self) -> pb::sessions_client::SessionsClient<Channel> {
        pb::sessions_client::SessionsClient::new(self.channel().await)
    }
}

/// `message` with `authorization: Bearer <token>`.
pub fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        tonic::metadata::MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    request
}

/// A client with `scopes` (as `--scopes` spells them) registered in
/// `auth`, acting for `server_id` if it is an agent: its id and a token.
pub async fn api_client(
    auth: &dcv_broker::auth::Auth,
    scopes: &str,
    server_id: Option<&str>,
) -> (String, String) {
    let scopes = dcv_broker::auth::ScopeSet::parse(scopes).unwrap();
    let registered = auth.register("test", scopes, server_id).await.unwrap();
    let token = auth
        .issue_token(&registered.client.id, &registered.secret, None)
        .await
        .unwrap()
        .access_token;
    (registered.client.id, token)
}
