//! `dcv-broker backup` against the real binary: a backup taken under write
//! load holds every change acknowledged before it began and a second
//! broker starts and serves from it; the file is its owner's alone
//! whatever the umask; an existing file is replaced only with --force; a
//! missing directory, a stopped broker and a PostgreSQL store are refused
//! with one clear line and leave no file behind.

mod common;

use std::{
    ffi::OsStr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use common::process::{BROKER_BIN, BrokerProcess};
use dcv_broker::pb::{self, agent_client::AgentClient, servers_client::ServersClient};
use tokio::sync::watch;
use tonic::transport::Channel;

/// Writers putting the broker under load while the backup runs.
const WRITERS: usize = 4;
/// Changes acknowledged before the backup is started.
const ACKNOWLEDGED_FIRST: usize = 40;
/// Servers in the store before the load starts, each closed with a reason
/// of the longest length: several megabytes, so that the backup takes
/// several steps (of 1 MiB) with writes committed between them.
const SEEDED: usize = 1500;
/// The longest reason a close takes.
const LONGEST_REASON: usize = 1024;

/// A fresh private directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("dcv-backup-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// The names in it, sorted.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts the binary on `dir`'s SQLite store.
async fn broker(dir: &Path) -> BrokerProcess {
    let mut args: Vec<&OsStr> = ["--log", "warn", "--client-rate", "0", "--data-dir"]
        .map(OsStr::new)
        .to_vec();
    args.push(dir.as_os_str());
    BrokerProcess::start_exactly(&args).await
}

/// Runs `dcv-broker backup ARGS` under umask 000, so the file's mode can
/// only come from how it was created; its stdout, or its stderr.
async fn backup(args: &[&OsStr]) -> Result<String, String> {
    let mut command = tokio::process::Command::new("sh");
    command
        .args(["-c", "umask 000; exec \"$0\" backup \"$@\"", BROKER_BIN])
        .args(args);
    let out = command.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    match out.status.success() {
        true => Ok(stdout),
        false => {
            assert!(stdout.is_empty(), "a refusal prints nothing on stdout");
            Err(stderr)
        }
    }
}

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn registration(id: &str) -> pb::RegisterServerRequest {
    pb::RegisterServerRequest {
        server_id: id.into(),
        ip: "10.0.0.1".into(),
        host: Some(pb::Host {
            os: Some(pb::Os {
                family: "linux".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        max_virtual_sessions: 4,
        ..Default::default()
    }
}

/// One acknowledged change and when its acknowledgement came.
#[derive(Debug, Clone)]
enum Change {
    /// The server was registered.
    Registered(String),
    /// The server was closed with this reason.
    Closed(String, String),
}

/// Registers a new server and closes it, again and again, until `stop`;
/// every acknowledged change, with the moment it was acknowledged.
async fn write(
    channel: Channel,
    writer: usize,
    stop: Arc<AtomicBool>,
    acknowledged: watch::Sender<usize>,
) -> Vec<(Change, Instant)> {
    let mut agent = AgentClient::new(channel.clone());
    let mut servers = ServersClient::new(channel);
    let mut changes = Vec::new();
    for k in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let id = format!("w{writer}-{k}");
        agent.register_server(registration(&id)).await.unwrap();
        changes.push((Change::Registered(id.clone()), Instant::now()));
        let reason = format!("op-{k}");
        let reply = servers
            .close_servers(pb::CloseServersRequest {
                servers: vec![pb::CloseServerRequestData {
                    server_id: id.clone(),
                    force: Some(true),
                    reason: reason.clone(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(reply.unsuccessful_list.is_empty(), "{reply:?}");
        changes.push((Change::Closed(id, reason), Instant::now()));
        acknowledged.send_modify(|n| *n += 2);
    }
    changes
}

/// Registers [`SEEDED`] servers (ten at a time) and closes them with the
/// longest reason.
async fn seed(channel: Channel) {
    let tasks: Vec<_> = (0..10)
        .map(|t| {
            let channel = channel.clone();
            tokio::spawn(async move {
                let mut agent = AgentClient::new(channel.clone());
                let ids: Vec<String> = (t..SEEDED)
                    .step_by(10)
                    .map(|n| format!("seed-{n}"))
                    .collect();
                for id in &ids {
                    agent.register_server(registration(id)).await.unwrap();
                }
                let reply = ServersClient::new(channel)
                    .close_servers(pb::CloseServersRequest {
                        servers: ids
                            .iter()
                            .map(|id| pb::CloseServerRequestData {
                                server_id: id.clone(),
                                force: Some(true),
                                reason: "r".repeat(LONGEST_REASON),
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(reply.unsuccessful_list.is_empty(), "{reply:?}");
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

async fn describe(channel: Channel) -> Vec<pb::Server> {
    let mut servers = ServersClient::new(channel);
    let mut all = Vec::new();
    let mut next_token = String::new();
    loop {
        let page = servers
            .describe_servers(pb::DescribeServersRequest {
                next_token,
                max_results: Some(1000),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.servers);
        if page.next_token.is_empty() {
            return all;
        }
        next_token = page.next_token;
    }
}

/// Acceptance 7: a backup taken while writers keep changing the store
/// holds every change acknowledged before it began, and a broker started
/// from it serves them (and takes writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_write_load_holds_every_change_acknowledged_before_it_began() {
    let live = TempDir::new();
    let restored = TempDir::new();
    let first = broker(live.path()).await;
    let load = channel(first.addr).await;
    seed(load.clone()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (acknowledged, mut count) = watch::channel(0);
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(write(load.clone(), w, stop.clone(), acknowledged.clone())))
        .collect();
    count.wait_for(|n| *n >= ACKNOWLEDGED_FIRST).await.unwrap();

    let out = restored.path().join(dcv_broker::store::FILE_NAME);
    let began = Instant::now();
    let printed = backup(&[
        OsStr::new("--out"),
        out.as_os_str(),
        OsStr::new("--data-dir"),
        live.path().as_os_str(),
    ])
    .await
    .unwrap();
    let ended = Instant::now();
    assert!(printed.contains("backed up"), "{printed}");
    stop.store(true, Ordering::Relaxed);
    let mut changes = Vec::new();
    for writer in writers {
        changes.push(writer.await.unwrap());
    }
    let during = changes
        .iter()
        .flatten()
        .filter(|(_, at)| (began..ended).contains(at))
        .count();
    eprintln!(
        "{} changes acknowledged, {during} of them while the backup ran",
        changes.iter().map(Vec::len).sum::<usize>()
    );
    first.terminate().await;

    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "the backup is its owner's alone"
    );
    eprintln!("the backup holds {} bytes", meta.len());
    assert_eq!(
        restored.names(),
        [dcv_broker::store::FILE_NAME],
        "only the backup is left in its directory"
    );

    let second = broker(restored.path()).await;
    let second_channel = channel(second.addr).await;
    let shown = describe(second_channel.clone()).await;
    let reason = |id: &str| {
        shown
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.holds.first().map(|h| h.reason.clone()))
    };
    let mut checked = 0;
    for (change, at) in changes.iter().flatten() {
        if *at >= began {
            continue;
        }
        checked += 1;
        match change {
            Change::Registered(id) => {
                assert!(
                    reason(id).is_some(),
                    "{id}, registered before the backup, is missing"
                );
            }
            Change::Closed(id, why) => assert_eq!(
                reason(id),
                Some(Some(why.clone())),
                "{id}, closed before the backup, is not closed in it"
            ),
        }
    }
    assert!(checked >= ACKNOWLEDGED_FIRST, "{checked} changes checked");
    let seeded = shown.iter().filter(|s| s.id.starts_with("seed-")).count();
    assert_eq!(seeded, SEEDED);
    // Each writer's servers were registered one after another: a
    // consistent copy holds a prefix of them.
    for (w, writer) in changes.iter().enumerate() {
        let held = writer
            .iter()
            .filter_map(|(c, _)| match c {
                Change::Registered(id) => Some(id),
                Change::Closed(..) => None,
            })
            .take_while(|id| reason(id).is_some())
            .count();
        let all = shown
            .iter()
            .filter(|s| s.id.starts_with(&format!("w{w}-")))
            .count();
        assert_eq!(held, all, "writer {w}'s servers in the backup are a prefix");
    }

    // The restored broker takes writes too.
    let reply = ServersClient::new(second_channel)
        .open_servers(pb::OpenServersRequest {
            servers: vec![pb::OpenServerRequestData {
                server_id: "w0-0".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 1, "{reply:?}");
    second.terminate().await;
}

/// The file is 0600 even under umask 000; an existing file is kept unless
/// --force, and the broker's own store even with it; a directory that does
/// not exist is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_is_private_and_replaces_a_file_only_with_force() {
    let live = TempDir::new();
    let out_dir = TempDir::new();
    let running = broker(live.path()).await;
    let data_dir = ["--data-dir".as_ref(), live.path().as_os_str()];
    let out = out_dir.path().join("first.sqlite3");

    backup(&[&[OsStr::new("--out"), out.as_os_str()], &data_dir[..]].concat())
        .await
        .unwrap();
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(&std::fs::read(&out).unwrap()[..16], b"SQLite format 3\0");

    let existing = out_dir.path().join("existing");
    std::fs::write(&existing, "keep me").unwrap();
    let refused = backup(&[&[OsStr::new("--out"), existing.as_os_str()], &data_dir[..]].concat())
        .await
        .unwrap_err();
    assert!(refused.contains("exists; give --force"), "{refused}");
    assert_eq!(refused.lines().count(), 1, "{refused}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");

    backup(
        &[
            &[
                OsStr::new("--out"),
                existing.as_os_str(),
                OsStr::new("--force"),
            ],
            &data_dir[..],
        ]
        .concat(),
    )
    .await
    .unwrap();
    assert_eq!(
        &std::fs::read(&existing).unwrap()[..16],
        b"SQLite format 3\0"
    );
    let mode = std::fs::metadata(&existing).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "the replaced file is the backup's, not the old one's"
    );

    let store = live.path().join(dcv_broker::store::FILE_NAME);
    let refused = backup(
        &[
            &[
                OsStr::new("--out"),
                store.as_os_str(),
                OsStr::new("--force"),
            ],
            &data_dir[..],
        ]
        .concat(),
    )
    .await
    .unwrap_err();
    assert!(
        refused.contains("the running broker's own store"),
        "{refused}"
    );

    let nowhere = out_dir.path().join("missing").join("b.sqlite3");
    let refused = backup(&[&[OsStr::new("--out"), nowhere.as_os_str()], &data_dir[..]].concat())
        .await
        .unwrap_err();
    assert!(refused.contains("does not exist"), "{refused}");
    assert!(refused.contains("missing"), "{refused}");

    assert_eq!(
        out_dir.names(),
        ["existing", "first.sqlite3"],
        "no temporary file is left"
    );
    // Nor beside the store.
    let store_dir: Vec<String> = std::fs::read_dir(live.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("backup"))
        .collect();
    assert!(store_dir.is_empty(), "{store_dir:?}");
    running.terminate().await;
}

/// Without a running broker there is nothing to ask: one line says so
/// (and what to do instead), and no file is written.
#[tokio::test]
async fn a_backup_without_a_running_broker_is_refused() {
    let stopped = TempDir::new();
    let out_dir = TempDir::new();
    let out = out_dir.path().join("b.sqlite3");
    let refused = backup(&[
        OsStr::new("--out"),
        out.as_os_str(),
        OsStr::new("--data-dir"),
        stopped.path().as_os_str(),
    ])
    .await
    .unwrap_err();
    assert!(refused.contains("no broker answers"), "{refused}");
    assert!(refused.contains("admin.sock"), "{refused}");
    assert_eq!(refused.lines().count(), 1, "{refused}");
    assert!(out_dir.names().is_empty(), "{:?}", out_dir.names());
}

/// A broker on PostgreSQL has no store file to copy: the refusal points
/// at pg_dump, and no file is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_postgres_broker_is_refused_pointing_at_pg_dump() {
    let db = common::postgres::TestDatabase::new().await;
    let data_dir = TempDir::new();
    let out_dir = TempDir::new();
    let running = BrokerProcess::start_exactly(&[
        OsStr::new("--database-url"),
        OsStr::new(&db.url),
        OsStr::new("--node-id"),
        OsStr::new("backup"),
        OsStr::new("--data-dir"),
        data_dir.path().as_os_str(),
    ])
    .await;
    let out = out_dir.path().join("b.sqlite3");
    let refused = backup(&[
        OsStr::new("--out"),
        out.as_os_str(),
        OsStr::new("--data-dir"),
        data_dir.path().as_os_str(),
    ])
    .await
    .unwrap_err();
    assert!(refused.contains("PostgreSQL"), "{refused}");
    assert!(refused.contains("pg_dump"), "{refused}");
    assert_eq!(refused.lines().count(), 1, "{refused}");
    assert!(out_dir.names().is_empty(), "{:?}", out_dir.names());
    running.terminate().await;
}
