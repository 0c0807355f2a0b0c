//! A simulated fleet for demos and load: in-process agents that register N
//! fake DCV servers (mixed OS and sizes, tags, some running sessions) and
//! keep them heartbeating. Every attribute is derived from the server's
//! index, so the same N gives the same fleet on every run.
//!
//! The first server's id is `serverId1`, the id in DCV's CloseServers
//! documentation example, so that example runs as written; the others are
//! `dcv-0000001`, `dcv-0000002`, ...
//!
//! The simulated agents also carry out the broker's instructions: they
//! create and delete sessions at once, report the outcome, and list the
//! sessions they run in their next heartbeats, so the whole session flow
//! runs end to end in one process.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;
use tokio::task::JoinHandle;

use crate::fleet::{
    AwsInfo, CpuInfo, Endpoint, Fleet, Gpu, Heartbeat, HostInfo, Instruction, InstructionKind,
    InstructionOutcome, LoadAverage, MemoryUsage, OsFamily, OsInfo, Protocol, ReportedSession,
    ServerDescription, ServerId, SessionKind, SessionState, Tag,
};

/// What the simulated agents changed on the broker's instruction, by server
/// index: sessions they created, and built-in sessions they deleted.
#[derive(Debug, Default)]
struct Changes {
    created: HashMap<usize, Vec<ReportedSession>>,
    deleted: HashSet<String>,
}

type Created = Arc<Mutex<Changes>>;

/// Servers whose heartbeats are applied under one lock hold: big enough to
/// be cheap, small enough not to stall readers.
const HEARTBEAT_CHUNK: usize = 1000;

/// The id of the `index`-th simulated server.
pub fn server_id(index: usize) -> String {
    if index == 0 {
        "serverId1".to_string()
    } else {
        format!("dcv-{index:07}")
    }
}

/// The index of a simulated server's id, if it is one.
pub fn index_of(id: &str) -> Option<usize> {
    if id == "serverId1" {
        return Some(0);
    }
    let index: usize = id.strip_prefix("dcv-")?.parse().ok()?;
    (index > 0 && server_id(index) == id).then_some(index)
}

/// A deterministic pseudo-random number for `index` and `salt` (SplitMix64).
pub(crate) fn mix(index: usize, salt: u64) -> u64 {
    let mut z = (index as u64).wrapping_add(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn pick<'a>(index: usize, salt: u64, options: &[&'a str]) -> &'a str {
    options[(mix(index, salt) % options.len() as u64) as usize]
}

fn family(index: usize) -> OsFamily {
    if index == 0 {
        return OsFamily::Linux;
    }
    match mix(index, 1) % 10 {
        0..=6 => OsFamily::Linux,
        7..=8 => OsFamily::Windows,
        _ => OsFamily::Macos,
    }
}

/// The description the `index`-th simulated agent registers.
pub fn description(index: usize) -> ServerDescription {
    let family = family(index);
    let cpus = [2u32, 4, 8, 16, 32, 64][(mix(index, 2) % 6) as usize];
    let gib = 1i64 << 30;
    // Offset by one so that no server gets the network address 10.0.0.0.
    let host = index + 1;
    let ip = format!(
        "10.{}.{}.{}",
        (host >> 16) & 0xff,
        (host >> 8) & 0xff,
        host & 0xff
    );
    let (os_name, os_version, kernel, build) = match family {
        OsFamily::Linux => {
            let (name, version) = [
                ("Amazon Linux", "2023"),
                ("Ubuntu", "22.04"),
                ("Rocky Linux", "9.4"),
                ("Red Hat Enterprise Linux", "9.4"),
            ][(mix(index, 3) % 4) as usize];
            (name, version, "6.1.0", "")
        }
        OsFamily::Windows => ("Windows Server", "2022", "", "20348"),
        OsFamily::Macos => ("macOS", "14.5", "", "23F79"),
    };
    let gpu = !mix(index, 5).is_multiple_of(3);
    ServerDescription {
        ip: ip.clone().into(),
        hostname: format!("dcv-host-{index}.fleet.internal").into(),
        default_dns_name: format!("ip-{}.ec2.internal", ip.replace('.', "-")).into(),
        endpoints: vec![
            Endpoint {
                ip_address: ip.clone().into(),
                port: 8443,
                protocol: Protocol::Http,
                web_url_path: "/".into(),
            },
            Endpoint {
                ip_address: ip.into(),
                port: 8443,
                protocol: Protocol::Quic,
                web_url_path: String::new().into(),
            },
        ],
        version: "2024.0.19030".into(),
        agent_version: "2024.0.817".into(),
        host: HostInfo {
            os: OsInfo {
                family,
                name: os_name.into(),
                version: os_version.into(),
                kernel_version: kernel.into(),
                build_number: build.into(),
            },
            memory: MemoryUsage {
                total_bytes: i64::from(cpus) * 4 * gib,
                used_bytes: i64::from(cpus) * gib,
            },
            swap: MemoryUsage {
                total_bytes: 2 * gib,
                used_bytes: 0,
            },
            aws: Some(AwsInfo {
                region: pick(index, 6, &["us-east-1", "eu-west-1", "ap-northeast-1"]).into(),
                ec2_instance_type: if gpu { "g4dn.xlarge" } else { "m6i.xlarge" }.into(),
                ec2_instance_id: format!("i-{:017x}", mix(index, 7) >> 4).into(),
                ec2_image_id: "ami-0abcdef1234567890".into(),
            }),
            cpu_info: CpuInfo {
                vendor: "GenuineIntel".into(),
                model_name: "Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz".into(),
                architecture: "x86_64".into(),
                number_of_cpus: cpus,
                physical_cores_per_cpu: (cpus / 2).max(1),
            },
            cpu_load_average: LoadAverage::default(),
            gpus: if gpu {
                vec![Gpu {
                    vendor: "NVIDIA Corporation".into(),
                    model_name: "Tesla T4".into(),
                }]
            } else {
                Vec::new()
            },
        },
        tags: vec![
            Tag {
                key: "pool".into(),
                value: pick(index, 8, &["engineering", "design", "training"]).into(),
            },
            Tag {
                key: "city".into(),
                value: pick(index, 9, &["London", "Seattle", "Tokyo"]).into(),
            },
            Tag {
                key: "gpu".into(),
                value: gpu.to_string().into(),
            },
        ],
        max_virtual_sessions: if family == OsFamily::Linux { 10 } else { 0 },
        max_concurrent_sessions_per_user: 1,
    }
}

/// [`description`] with seven more tags, ten in all: the servers of the
/// benchmarks, which measure memory and speed with realistically tagged
/// servers.
pub fn tagged_description(index: usize) -> ServerDescription {
    let mut d = description(index);
    let pick = |salt: usize, options: &[&str]| {
        options[(index
            .wrapping_mul(2_654_435_761)
            .wrapping_add(salt * 40_503)
            >> 7)
            % options.len()]
        .to_string()
    };
    let extra = [
        ("environment", pick(1, &["production", "staging", "test"])),
        (
            "cost-center",
            pick(2, &["cc-1042", "cc-2210", "cc-3307", "cc-4419"]),
        ),
        (
            "owner-team",
            pick(3, &["vfx", "cad", "sim", "games", "research"]),
        ),
        ("rack", format!("r{:03}", index / 40)),
        ("asset-id", format!("AS-{index:08}")),
        (
            "image",
            pick(4, &["golden-2024.10", "golden-2024.11", "golden-2025.01"]),
        ),
        (
            "department",
            pick(5, &["engineering", "design", "training", "support"]),
        ),
    ];
    for (key, value) in extra {
        d.tags.push(Tag {
            key: key.into(),
            value: value.into(),
        });
    }
    d
}

/// The heartbeat the `index`-th simulated agent sends. About a quarter of
/// the servers run a session (never `serverId1`), a few report an unhealthy
/// DCV server, and some Windows hosts have an RDP user logged in.
pub fn heartbeat(index: usize) -> Heartbeat {
    let family = family(index);
    let busy = index != 0 && mix(index, 10).is_multiple_of(4);
    let sessions = if busy {
        vec![ReportedSession {
            id: format!("session-{index}"),
            owner: format!("user{}", mix(index, 11) % 500),
            kind: if family == OsFamily::Linux {
                SessionKind::Virtual
            } else {
                SessionKind::Console
            },
            state: SessionState::Ready,
        }]
    } else {
        Vec::new()
    };
    let rdp_user = family == OsFamily::Windows && !busy && mix(index, 12).is_multiple_of(5);
    let load = (mix(index, 13) % 400) as f32 / 100.0;
    Heartbeat {
        dcv_server_healthy: index == 0 || !mix(index, 14).is_multiple_of(50),
        logged_in_users: if rdp_user {
            vec!["Administrator".into()]
        } else {
            Vec::new()
        },
        sessions,
        cpu_load_average: Some(LoadAverage {
            one_minute: load,
            five_minutes: load,
            fifteen_minutes: load,
        }),
        memory: None,
        swap: None,
    }
}

/// Registers `count` simulated servers now, then keeps them heartbeating
/// at the fleet's heartbeat interval, spread evenly over it, and carries
/// out the broker's instructions. A server that was forgotten (its removal
/// timeout passed) registers again.
pub fn spawn(fleet: Fleet, count: usize) -> JoinHandle<()> {
    spawn_with(fleet, count, description)
}

/// [`spawn`], with the servers described by `describe` instead of
/// [`description`] (the load benchmark gives them more tags).
pub fn spawn_with(
    fleet: Fleet,
    count: usize,
    describe: fn(usize) -> ServerDescription,
) -> JoinHandle<()> {
    let ids: Vec<ServerId> = (0..count).map(|i| ServerId::from(server_id(i))).collect();
    for (index, id) in ids.iter().enumerate() {
        register(&fleet, index, id, describe);
    }
    let created: Created = Arc::default();
    let instructions = fleet.subscribe_instructions_many(&ids);
    let executor = tokio::spawn(execute(fleet.clone(), instructions, created.clone()));
    let beat = |index: usize, created: &Created| {
        let mut report = heartbeat(index);
        let changes = created.lock();
        report.sessions.retain(|s| !changes.deleted.contains(&s.id));
        if let Some(extra) = changes.created.get(&index) {
            report.sessions.extend(extra.iter().cloned());
        }
        report
    };
    fleet.heartbeat_many(
        ids.iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), beat(i, &created))),
    );
    tracing::info!(servers = count, "demo fleet registered");
    tokio::spawn(async move {
        // The executor lives as long as the heartbeats do.
        let _executor = AbortOnDrop(executor);
        let chunks = count.div_ceil(HEARTBEAT_CHUNK).max(1);
        let pause = fleet.config().heartbeat_interval / chunks as u32;
        let pause = pause.max(Duration::from_millis(1));
        loop {
            for (chunk_no, chunk) in ids.chunks(HEARTBEAT_CHUNK).enumerate() {
                tokio::time::sleep(pause).await;
                let base = chunk_no * HEARTBEAT_CHUNK;
                let unknown = fleet.heartbeat_many(
                    chunk
                        .iter()
                        .enumerate()
                        .map(|(i, id)| (id.clone(), beat(base + i, &created))),
                );
                for id in unknown {
                    if let Some(index) = index_of(&id) {
                        register(&fleet, index, &id, describe);
                    }
                }
            }
        }
    })
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Carries out instructions as a real agent would, instantly.
async fn execute(
    fleet: Fleet,
    mut instructions: tokio::sync::mpsc::UnboundedReceiver<Instruction>,
    created: Created,
) {
    while let Some(instruction) = instructions.recv().await {
        let server = instruction.server().clone();
        let Some(index) = index_of(&server) else {
            continue;
        };
        let (session, kind) = match instruction {
            Instruction::Create { session, order, .. } => {
                created
                    .lock()
                    .created
                    .entry(index)
                    .or_default()
                    .push(ReportedSession {
                        id: session.to_string(),
                        owner: order.owner.clone(),
                        kind: order.kind,
                        state: SessionState::Ready,
                    });
                (session, InstructionKind::Create)
            }
            Instruction::Delete { session, .. } => {
                let mut changes = created.lock();
                let mut was_created = false;
                if let Some(list) = changes.created.get_mut(&index) {
                    let before = list.len();
                    list.retain(|s| *s.id != *session);
                    was_created = list.len() != before;
                }
                if !was_created {
                    // A built-in session deleted by the broker stays gone.
                    changes.deleted.insert(session.to_string());
                }
                drop(changes);
                (session, InstructionKind::Delete)
            }
            Instruction::UpdatePermissions { session, .. } => {
                (session, InstructionKind::UpdatePermissions)
            }
        };
        let outcome = InstructionOutcome::Done { ready: true };
        if let Err(err) = fleet.report_instruction(&server, &session, kind, outcome) {
            tracing::debug!(%err, "demo agent report refused");
        }
    }
}

fn register(fleet: &Fleet, index: usize, id: &str, describe: fn(usize) -> ServerDescription) {
    // Not waited for: the demo does not acknowledge anything to anyone.
    if let Err(err) = fleet
        .register_nowait(id, describe(index))
        .map(|(_, durable)| drop(durable))
    {
        tracing::warn!(server_id = %id, %err, "demo server refused");
    }
}
