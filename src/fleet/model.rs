//! The domain's picture of a DCV server: what its agent describes, what its
//! heartbeats report, and the holds operators put on it. Also the session
//! types the store records as they are (`CreateSpec`, `Substate`), so that
//! `persist` needs nothing from `sessions`, and the fleet's hash maps.

use std::{sync::Arc, time::SystemTime};

use tokio::time::Instant;

/// A server id: the stable id its agent registers with. Shared between the
/// map and the ordered index, so it is stored once.
pub type ServerId = Arc<str>;

/// A text of a server's description. Shared: most of what agents describe
/// (OS, CPU, GPU, versions, tag keys and most tag values) is the same on
/// thousands of servers, and the fleet keeps one copy of each such text
/// (see `Interner`), so a large fleet costs its unique texts only.
pub type Text = Arc<str>;

/// The longest server id accepted, in bytes. DCV's own ids are UUIDs or
/// host-derived names well under this; the bound keeps keys cheap to hash
/// and page tokens small.
pub const MAX_SERVER_ID_BYTES: usize = 256;

/// The longest close reason accepted, in characters: room for a sentence and
/// a ticket link, not for a document.
pub const MAX_REASON_CHARS: usize = 1024;

/// The operating system family of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OsFamily {
    /// Windows: console sessions only.
    Windows,
    /// Linux: a console session or virtual sessions.
    Linux,
    /// macOS: console sessions only.
    Macos,
}

impl OsFamily {
    /// The lowercase name DCV uses on the wire and in `dcv:os-family`.
    pub fn as_str(self) -> &'static str {
        match self {
            OsFamily::Windows => "windows",
            OsFamily::Linux => "linux",
            OsFamily::Macos => "macos",
        }
    }

    /// Parses DCV's lowercase name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "windows" => Some(OsFamily::Windows),
            "linux" => Some(OsFamily::Linux),
            "macos" => Some(OsFamily::Macos),
            _ => None,
        }
    }
}

/// The transport of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Not stated by the agent.
    Unspecified,
    /// WebSocket over TCP.
    Http,
    /// QUIC over UDP.
    Quic,
}

/// A network endpoint of a DCV server.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// Address clients connect to.
    pub ip_address: Text,
    /// Port clients connect to.
    pub port: u16,
    /// Transport.
    pub protocol: Protocol,
    /// Web path of an HTTP endpoint.
    pub web_url_path: Text,
}

/// Operating system details.
#[derive(Debug, Clone, PartialEq)]
pub struct OsInfo {
    /// Family; decides which session types the server can run.
    pub family: OsFamily,
    /// Distribution or product name.
    pub name: Text,
    /// Version.
    pub version: Text,
    /// Kernel version (Linux).
    pub kernel_version: Text,
    /// Build number (Windows).
    pub build_number: Text,
}

/// Memory or swap usage.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryUsage {
    /// Total bytes.
    pub total_bytes: i64,
    /// Bytes in use.
    pub used_bytes: i64,
}

/// EC2 details.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AwsInfo {
    /// Region.
    pub region: Text,
    /// Instance type.
    pub ec2_instance_type: Text,
    /// Instance id.
    pub ec2_instance_id: Text,
    /// Image id.
    pub ec2_image_id: Text,
}

/// CPU details.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CpuInfo {
    /// Vendor.
    pub vendor: Text,
    /// Model name.
    pub model_name: Text,
    /// Architecture.
    pub architecture: Text,
    /// Number of CPUs.
    pub number_of_cpus: u32,
    /// Physical cores per CPU.
    pub physical_cores_per_cpu: u32,
}

/// Load averages.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadAverage {
    /// One minute.
    pub one_minute: f32,
    /// Five minutes.
    pub five_minutes: f32,
    /// Fifteen minutes.
    pub fifteen_minutes: f32,
}

/// A GPU.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gpu {
    /// Vendor.
    pub vendor: Text,
    /// Model name.
    pub model_name: Text,
}

/// A key and a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    /// Key.
    pub key: Text,
    /// Value.
    pub value: Text,
}

/// The host a DCV server runs on, as its agent describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostInfo {
    /// Operating system.
    pub os: OsInfo,
    /// Memory usage; refreshed by heartbeats.
    pub memory: MemoryUsage,
    /// Swap usage; refreshed by heartbeats.
    pub swap: MemoryUsage,
    /// EC2 details, when on EC2.
    pub aws: Option<AwsInfo>,
    /// CPUs.
    pub cpu_info: CpuInfo,
    /// Load; refreshed by heartbeats.
    pub cpu_load_average: LoadAverage,
    /// GPUs.
    pub gpus: Vec<Gpu>,
}

/// What an agent says about its server when it registers.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerDescription {
    /// IP address.
    pub ip: Text,
    /// Host name.
    pub hostname: Text,
    /// Default DNS name.
    pub default_dns_name: Text,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// DCV server version.
    pub version: Text,
    /// Agent version.
    pub agent_version: Text,
    /// Host details.
    pub host: HostInfo,
    /// Custom tags (never `dcv:`-prefixed; those are built in).
    pub tags: Vec<Tag>,
    /// Virtual session capacity.
    pub max_virtual_sessions: u32,
    /// Per-user session limit (0: none).
    pub max_concurrent_sessions_per_user: u32,
}

/// The kind of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionKind {
    /// Console session.
    Console,
    /// Virtual session.
    Virtual,
}

/// The lifecycle state of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// Being created.
    Creating,
    /// Ready.
    Ready,
    /// Being deleted.
    Deleting,
    /// Deleted: no longer counted.
    Deleted,
    /// Unknown.
    Unknown,
}

/// A session as an agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedSession {
    /// Session id.
    pub id: String,
    /// Owner.
    pub owner: String,
    /// Console or virtual.
    pub kind: SessionKind,
    /// State.
    pub state: SessionState,
    /// Connections, times and name, as the agent reports them.
    pub details: ReportedDetails,
}

/// What an agent says of a session besides its identity and state. Volatile:
/// never stored, since the next heartbeat says it again (a restarted broker
/// shows 0 connections until then).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportedDetails {
    /// Clients connected now.
    pub connections: u32,
    /// When the last client disconnected, if one has.
    pub last_disconnection: Option<SystemTime>,
    /// When the DCV server created it, if the agent says.
    pub created_at: Option<SystemTime>,
    /// Its name on the DCV server (may be empty).
    pub name: String,
}

/// A periodic report from an agent. It replaces the previous one.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Heartbeat {
    /// Whether the agent can reach its DCV server.
    pub dcv_server_healthy: bool,
    /// Users logged in on the host.
    pub logged_in_users: Vec<String>,
    /// Sessions on the server.
    pub sessions: Vec<ReportedSession>,
    /// Current load, if reported.
    pub cpu_load_average: Option<LoadAverage>,
    /// Current memory, if reported.
    pub memory: Option<MemoryUsage>,
    /// Current swap, if reported.
    pub swap: Option<MemoryUsage>,
}

impl Heartbeat {
    /// Puts the host figures it reports (load, memory, swap) into `host`;
    /// a figure it does not report stays as it was.
    pub(in crate::fleet) fn update_host(&self, host: &mut HostInfo) {
        if let Some(load) = self.cpu_load_average {
            host.cpu_load_average = load;
        }
        if let Some(memory) = self.memory {
            host.memory = memory;
        }
        if let Some(swap) = self.swap {
            host.swap = swap;
        }
    }
}

/// A session the broker placed on a server and is waiting for the agent to
/// report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The session's id.
    pub session: Arc<str>,
    /// Console or virtual.
    pub kind: SessionKind,
    /// Its owner (for per-user limits).
    pub owner: String,
}

/// One session occupying a server, reported or placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionSlot<'a> {
    /// The session's id.
    pub id: &'a str,
    /// Console or virtual.
    pub kind: SessionKind,
    /// Its owner.
    pub owner: &'a str,
}

/// Why an operator holds a server out of placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldKind {
    /// Closed with CloseServers.
    Closed,
}

/// The name of the hold a close or an open without a hold name places or
/// removes: DCV's single closed flag.
pub const DEFAULT_HOLD_NAME: &str = "default";

/// An operator's hold: while a server has one, nothing is placed on it.
/// A record rather than a flag, because who, when and why matter to the
/// next operator; named, because several teams may hold one server for
/// different reasons, and each must release only its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// Kind of hold.
    pub kind: HoldKind,
    /// Its name, unique among the server's holds.
    pub name: Arc<str>,
    /// Who placed it. Shared: every hold of a batch has the same actor.
    pub actor: Arc<str>,
    /// When it was placed.
    pub since: SystemTime,
    /// Free-text reason; may be empty.
    pub reason: String,
    /// When it ends by itself, if it does.
    pub expires_at: Option<SystemTime>,
    /// The drain that placed it, if one did (DrainServers): shared by the
    /// drain's holds.
    pub drain: Option<Arc<DrainSpec>>,
}

/// What a drain is, beyond its holds (which say who, when and why): its
/// id and what happens at its deadline. Stored with each of its holds, so
/// that a drain lives exactly as long as a hold of it does, survives a
/// restart and reaches replicas with the holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainSpec {
    /// Its id (a UUID).
    pub id: Arc<str>,
    /// When the broker stops waiting for its sessions to end.
    pub deadline: Option<SystemTime>,
    /// What the broker does then.
    pub on_deadline: OnDeadline,
}

/// What a drain does at its deadline with the sessions still running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnDeadline {
    /// Nothing: it reports the servers still busy.
    #[default]
    Report,
    /// Asks each remaining session's agent to delete it.
    DeleteSessions,
}

/// Everything the broker keeps about one server.
///
/// `repr(C)`, fields in this order: what every close, open, heartbeat and
/// placement reads or writes comes first, in the record's first two cache
/// lines; the description (most of the record) after. A batch touches
/// thousands of records that are not in the cache, so each line more per
/// record is a memory stall per item (the compiler's own order put
/// `holds`, `state_version` and `id` on three lines).
#[derive(Debug, Clone)]
#[repr(C)]
pub struct ServerRecord {
    /// Operators' holds.
    pub holds: Vec<Hold>,
    /// Changes whenever `holds` does: what ExpectedStateVersion checks.
    pub state_version: u64,
    /// Sessions at the last heartbeat.
    pub sessions: Vec<ReportedSession>,
    /// Sessions the broker placed here that the agent has not reported
    /// yet. They occupy the server like reported ones, so that a close and
    /// the next placement see them at once.
    pub placing: Vec<Placement>,
    /// Stable id.
    pub id: ServerId,
    /// When the agent was last heard from (monotonic, for timeouts).
    pub last_seen: Instant,
    /// Whether the DCV server was healthy at the last heartbeat (assumed
    /// healthy from registration until the first heartbeat says otherwise).
    pub dcv_server_healthy: bool,
    /// The agent deregistered while the server was held; it stays
    /// unreachable until the agent is heard from again (a registration or
    /// a heartbeat).
    pub agent_departed: bool,
    /// The broker noted (in the audit log) that the agent went silent
    /// past the unreachable timeout; cleared when it is heard from again.
    pub silence_noted: bool,
    /// The agent's latest description.
    pub description: ServerDescription,
    /// Users logged in at the last heartbeat.
    pub logged_in_users: Vec<String>,
    /// When the server first registered.
    pub registered_at: SystemTime,
    /// When the agent was last heard from (wall clock, for display).
    pub last_seen_wall: SystemTime,
}

impl ServerRecord {
    /// Whether an operator closed the server.
    pub fn is_closed(&self) -> bool {
        self.holds.iter().any(|h| h.kind == HoldKind::Closed)
    }

    /// Sessions that occupy the server: every reported one not yet
    /// deleted, and every placement the agent has not reported yet.
    pub fn live_sessions(&self) -> impl Iterator<Item = SessionSlot<'_>> {
        self.sessions
            .iter()
            .filter(|s| s.state != SessionState::Deleted)
            .map(|s| SessionSlot {
                id: &s.id,
                kind: s.kind,
                owner: &s.owner,
            })
            .chain(self.placing.iter().map(|p| SessionSlot {
                id: &p.session,
                kind: p.kind,
                owner: &p.owner,
            }))
    }

    /// Live console and virtual session counts.
    pub fn session_counts(&self) -> (u32, u32) {
        self.live_sessions().fold((0, 0), |(c, v), s| match s.kind {
            SessionKind::Console => (c + 1, v),
            SessionKind::Virtual => (c, v + 1),
        })
    }

    /// The value of a tag, built-in `dcv:` tags included. For repeated
    /// custom keys the last value wins, as with DCV's tag files.
    pub fn tag(&self, key: &str) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        match key {
            "dcv:os-family" => Some(Cow::Borrowed(self.description.host.os.family.as_str())),
            "dcv:max-virtual-sessions" => Some(Cow::Owned(
                self.description.max_virtual_sessions.to_string(),
            )),
            "dcv:max-concurrent-sessions-per-user" => Some(Cow::Owned(
                self.description
                    .max_concurrent_sessions_per_user
                    .to_string(),
            )),
            _ => self
                .description
                .tags
                .iter()
                .rev()
                // Compared as text: `key.into()` would allocate an `Arc` per tag.
                .find(|t| *t.key == *key)
                .map(|t| Cow::Borrowed(&*t.value)),
        }
    }

    /// The built-in tags (key, value), in the order DescribeServers lists
    /// them.
    pub fn builtin_tags(&self) -> [(&'static str, String); 3] {
        let d = &self.description;
        [
            ("dcv:os-family", d.host.os.family.as_str().to_string()),
            (
                "dcv:max-virtual-sessions",
                d.max_virtual_sessions.to_string(),
            ),
            (
                "dcv:max-concurrent-sessions-per-user",
                d.max_concurrent_sessions_per_user.to_string(),
            ),
        ]
    }
}

/// A hash map on the fleet's hot paths. foldhash instead of std's SipHash:
/// every CloseServers item costs a few lookups, and SipHash was a visible
/// share of a batch's time. foldhash's per-process random seed still keeps
/// collisions from being chosen by whoever picks the ids.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The set counterpart of [`FastMap`].
pub(crate) type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// The server records by id. Boxed, so that the table holds small entries:
/// records inline made the table's empty slots cost as much as records,
/// and scattered every lookup over a table of hundreds of megabytes.
pub(crate) type ServerMap = FastMap<ServerId, Box<ServerRecord>>;

/// The detail of a CREATING session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Substate {
    /// Queued, or waiting for the chosen agent to create it.
    Placing,
    /// Created by the agent, not yet usable.
    PendingPreparation,
}

/// A CreateSessions item as the caller sent it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateSpec {
    /// Name.
    pub name: String,
    /// Owner.
    pub owner: String,
    /// Type; `None` when the caller left it unspecified.
    pub kind: Option<SessionKind>,
    /// Init file.
    pub init_file: String,
    /// Most concurrent clients.
    pub max_concurrent_clients: Option<i32>,
    /// DCV-GL.
    pub dcv_gl_enabled: bool,
    /// Permissions file, base64.
    pub permissions_file: String,
    /// Queue when nothing fits now.
    pub enqueue: bool,
    /// Autorun file.
    pub autorun_file: String,
    /// Autorun arguments.
    pub autorun_file_arguments: Vec<String>,
    /// No retry on another server.
    pub disable_retry: bool,
    /// Placement expression (empty: none).
    pub requirements: String,
    /// Storage root.
    pub storage_root: String,
}

/// An image encoding agents produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFormat {
    /// PNG (DCV's default).
    #[default]
    Png,
    /// JPEG.
    Jpeg,
}

impl ImageFormat {
    /// The lowercase name used on the wire and in file names.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpeg",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "png" => Some(ImageFormat::Png),
            "jpeg" => Some(ImageFormat::Jpeg),
            _ => None,
        }
    }
}

/// One image of a screenshot, as its agent took it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScreenshotImage {
    /// Encoding.
    pub format: ImageFormat,
    /// The encoded image.
    pub data: Vec<u8>,
    /// When it was taken.
    pub created_at: SystemTime,
    /// Whether it shows the primary display.
    pub primary: bool,
}

/// An agent's answer to GET_SCREENSHOT: the images, or why not.
pub type ScreenshotAnswer = Result<Vec<ScreenshotImage>, String>;

/// A screenshot waiting for its agent.
#[derive(Debug)]
pub(in crate::fleet) struct PendingShot {
    /// The only server whose answer counts.
    pub(in crate::fleet) server: ServerId,
    pub(in crate::fleet) answer: tokio::sync::oneshot::Sender<ScreenshotAnswer>,
}

/// The screenshots waiting for agents, by instruction id.
pub(in crate::fleet) type PendingShots = Arc<parking_lot::Mutex<FastMap<Arc<str>, PendingShot>>>;
