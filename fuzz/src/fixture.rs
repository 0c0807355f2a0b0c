//! The live broker the `requests` target drives: one in-memory fleet of
//! [`SERVERS`] registered servers with sessions in every state the fleet
//! keeps (adopted READY and CREATING sessions, broker-placed ones waiting
//! for their agent, a queued one), two closed servers, and the three
//! services over it. It is built through the real handlers, as agents and
//! operators would build it, so it only holds states the API can reach.
//!
//! The ids are fixed ([`server_id`], [`adopted_session_id`]) so that seeds
//! can name servers and sessions that exist.

use dcv_broker::{
    api::{AgentApi, ServersApi, SessionsApi},
    fleet::{Fleet, FleetConfig},
    pb::{self, agent_server::Agent, servers_server::Servers, sessions_server::Sessions},
};
use tokio::sync::watch;
use tonic::Request;

/// How many servers the fixture registers.
pub const SERVERS: usize = 32;

/// The fixture's queue bound: small, so that the fuzzer reaches QUEUE_FULL
/// and the queue cannot grow the state much between two rebuilds.
pub const QUEUE_MAX_SIZE: usize = 16;

/// The id of the fixture's server `i`.
pub fn server_id(i: usize) -> String {
    format!("srv-{i:02}")
}

/// Whether server `i` runs Windows (one in four); the others run Linux.
pub fn is_windows(i: usize) -> bool {
    i % 4 == 3
}

/// The id of the READY session server `i`'s agent reports (console on
/// Windows, virtual on Linux), which the broker adopts; Windows servers
/// `i % 8 == 7` report none.
pub fn adopted_session_id(i: usize) -> String {
    format!("sess-{i:02}-a")
}

/// The servers the fixture closes: one idle, one running sessions
/// (closed with Force).
pub const CLOSED: [usize; 2] = [4, 5];

/// A registration like a real agent's.
pub fn registration(i: usize) -> pb::RegisterServerRequest {
    let (family, max_virtual) = if is_windows(i) {
        ("windows", 0)
    } else {
        ("linux", 4)
    };
    let mut tags = vec![pb::KeyValuePair {
        key: "city".into(),
        value: if i.is_multiple_of(2) {
            "London"
        } else {
            "Paris"
        }
        .into(),
    }];
    if i.is_multiple_of(3) {
        tags.push(pb::KeyValuePair {
            key: "gpu".into(),
            value: "true".into(),
        });
    }
    pb::RegisterServerRequest {
        server_id: server_id(i),
        ip: format!("192.0.2.{}", 10 + i),
        hostname: format!("{}.example", server_id(i)),
        endpoints: vec![pb::Endpoint {
            ip_address: format!("192.0.2.{}", 10 + i),
            port: 8443,
            protocol: pb::Protocol::Http as i32,
            web_url_path: "/".into(),
        }],
        version: "2024.0.19030".into(),
        session_manager_agent_version: "2024.0.817".into(),
        host: Some(pb::Host {
            os: Some(pb::Os {
                family: family.into(),
                name: format!("{family} test os"),
                ..Default::default()
            }),
            cpu_info: Some(pb::CpuInfo {
                vendor: "GenuineIntel".into(),
                architecture: "x86_64".into(),
                number_of_cpus: 8,
                physical_cores_per_cpu: 4,
                ..Default::default()
            }),
            aws: (i % 2 == 1).then(|| pb::Aws {
                region: "eu-west-1".into(),
                ec2_instance_type: "g4dn.xlarge".into(),
                ec2_instance_id: format!("i-{i:017x}"),
                ec2_image_id: "ami-0123456789abcdef0".into(),
            }),
            ..Default::default()
        }),
        tags,
        max_virtual_sessions: max_virtual,
        ..Default::default()
    }
}

/// A session as an agent reports it.
pub fn agent_session(
    id: String,
    owner: &str,
    kind: pb::SessionType,
    state: pb::SessionState,
) -> pb::AgentSession {
    pb::AgentSession {
        id,
        owner: owner.into(),
        r#type: kind as i32,
        state: state as i32,
        ..Default::default()
    }
}

/// Server `i`'s heartbeat: healthy, with its adopted sessions: a console
/// session on every other Windows server, a virtual one on every Linux
/// server (and on every third, a second one still CREATING).
pub fn heartbeat(i: usize) -> pb::HeartbeatRequest {
    let mut sessions = Vec::new();
    if is_windows(i) && i % 8 == 7 {
        // Idle: room for a console session.
    } else if is_windows(i) {
        sessions.push(agent_session(
            adopted_session_id(i),
            "carol",
            pb::SessionType::Console,
            pb::SessionState::Ready,
        ));
    } else {
        sessions.push(agent_session(
            adopted_session_id(i),
            "alice",
            pb::SessionType::Virtual,
            pb::SessionState::Ready,
        ));
        if i.is_multiple_of(3) {
            sessions.push(agent_session(
                format!("sess-{i:02}-b"),
                "bob",
                pb::SessionType::Virtual,
                pb::SessionState::Creating,
            ));
        }
    }
    // Connections and times, as a real agent reports them.
    if let Some(first) = sessions.first_mut() {
        first.num_of_connections = (i % 3) as i32;
        first.last_disconnection_time = Some(
            (std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000 + i as u64))
                .into(),
        );
        first.name = format!("desk of server {i}");
    }
    let load = i as f32 / 8.0;
    pb::HeartbeatRequest {
        server_id: server_id(i),
        dcv_server_healthy: true,
        sessions,
        cpu_load_average: Some(pb::CpuLoadAverage {
            one_minute: load,
            five_minutes: load / 2.0,
            fifteen_minutes: 0.1,
        }),
        memory: Some(pb::MemoryInfo {
            total_bytes: 16 << 30,
            used_bytes: (i as i64) << 28,
        }),
        ..Default::default()
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

/// The three services over one live fleet.
pub struct Broker {
    /// The fleet they share.
    pub fleet: Fleet,
    /// `Servers`.
    pub servers: ServersApi,
    /// `Sessions`.
    pub sessions: SessionsApi,
    /// `Agent`.
    pub agent: AgentApi,
    /// Keeps instruction streams open (dropped, it ends them).
    _stopping: watch::Sender<bool>,
}

impl Broker {
    /// Builds the fixture. Panics if the broker refuses any of it: the
    /// fixture is then wrong, not the input.
    pub async fn build() -> Broker {
        let config = FleetConfig {
            queue_max_size: QUEUE_MAX_SIZE,
            // A screenshot asked of an agent whose stream an input opened
            // fails at once instead of waiting: no input advances the
            // paused clock.
            screenshot_timeout: std::time::Duration::ZERO,
            ..FleetConfig::default()
        };
        let fleet = Fleet::new(config).expect("an in-memory fleet");
        let (stopping, stopped) = watch::channel(false);
        let broker = Broker {
            servers: ServersApi::new(fleet.clone()),
            sessions: SessionsApi::new(fleet.clone()),
            agent: AgentApi::new(fleet.clone(), stopped),
            fleet,
            _stopping: stopping,
        };
        for i in 0..SERVERS {
            broker
                .agent
                .register_server(Request::new(registration(i)))
                .await
                .expect("fixture registration");
            broker
                .agent
                .heartbeat(Request::new(heartbeat(i)))
                .await
                .expect("fixture heartbeat");
        }
        let close = pb::CloseServersRequest {
            servers: CLOSED
                .iter()
                .map(|&i| pb::CloseServerRequestData {
                    server_id: server_id(i),
                    force: Some(true),
                    reason: "fuzz fixture".into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let closed = broker
            .servers
            .close_servers(Request::new(close))
            .await
            .expect("fixture close")
            .into_inner();
        assert_eq!(closed.successful_list.len(), CLOSED.len());
        // Placed sessions waiting for their agents, and one queued.
        let mut gpu = create_item("render", "dave", pb::SessionType::Virtual);
        gpu.requirements = "tag:gpu = 'true' and server:Host.CpuInfo.NumberOfCpus >= 4".into();
        let mut queued = create_item("later", "erin", pb::SessionType::Virtual);
        queued.requirements = "tag:city = 'Tokyo'".into();
        queued.enqueue_request = true;
        let create = pb::CreateSessionsRequest {
            sessions: vec![
                create_item("desk", "alice", pb::SessionType::Virtual),
                create_item("console", "frank", pb::SessionType::Console),
                gpu,
                queued,
            ],
            ..Default::default()
        };
        let created = broker
            .sessions
            .create_sessions(Request::new(create))
            .await
            .expect("fixture creation")
            .into_inner();
        assert_eq!(created.successful_list.len(), 4, "{created:?}");
        broker
    }
}
