//! The SQLite store on its own, without a broker: what is put comes back
//! after a reopen, submissions are grouped into few commits, a failed
//! write stops the store, and every kind of bad store directory is refused
//! with a clear error and left byte-for-byte as it was.
//!
//! Two cases run in a child process (this test binary again, filtered to
//! the ignored `child_process` helper): a second broker opening a store
//! another process holds, and a directory the broker may not write, which
//! needs an unprivileged user (`setpriv` to `nobody`) when the tests run
//! as root, as they do on CI.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use dcv_broker::{
    demo,
    fleet::{
        CreateSpec, DrainSpec, Hold, HoldKind, OnDeadline, SessionKind, SessionState, Substate,
        Tag,
        persist::{
            Change, Snapshot, Store as _, StoredClient, StoredClientToken, StoredServer,
            StoredSession,
        },
    },
    store::{FILE_NAME, SCHEMA_VERSION, SqliteStore, StoreFailed, StoreOpenError},
};
use rusqlite::config::DbConfig;

/// A directory under the system's temporary directory, removed when
/// dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "dcv-broker-store-{}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn file(&self) -> PathBuf {
        self.0.join(FILE_NAME)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A wall-clock time at the store's precision.
fn at(seconds: u64, micros: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(seconds, micros * 1000)
}

/// A ClientToken record named `token`, kept at `created_at`, replying
/// `reply`.
fn token_record(token: &str, created_at: SystemTime, reply: &[u8]) -> StoredClientToken {
    StoredClientToken {
        actor: "a-client".into(),
        method: "CloseServers".into(),
        token: token.into(),
        request_hash: [7; 32],
        reply: reply.to_vec(),
        created_at,
    }
}

fn open(dir: &Path) -> (SqliteStore, Snapshot) {
    SqliteStore::open(dir).unwrap_or_else(|e| panic!("open {}: {e}", dir.display()))
}

fn open_err(dir: &Path) -> StoreOpenError {
    match SqliteStore::open(dir) {
        Ok(_) => panic!("{} opened, but should have been refused", dir.display()),
        Err(e) => e,
    }
}

fn server(i: usize, holds: Vec<Hold>) -> StoredServer {
    StoredServer {
        id: demo::server_id(i),
        description: demo::description(i),
        holds,
        state_version: 0,
        registered_at: at(1_700_000_000 + i as u64, 123_456),
        last_seen: at(1_700_100_000 + i as u64, 654_321),
        agent_departed: false,
    }
}

fn closed(actor: &str, since: SystemTime, reason: &str) -> Hold {
    Hold {
        kind: HoldKind::Closed,
        name: dcv_broker::fleet::DEFAULT_HOLD_NAME.into(),
        expires_at: None,
        drain: None,
        actor: actor.into(),
        since,
        reason: reason.into(),
    }
}

/// `hold`, placed by drain `id`.
fn in_drain(mut hold: Hold, id: &str, deadline: Option<SystemTime>, on: OnDeadline) -> Hold {
    hold.drain = Some(std::sync::Arc::new(DrainSpec {
        id: id.into(),
        deadline,
        on_deadline: on,
    }));
    hold
}

/// A named hold, ending at `expires_at` if given.
fn named(name: &str, actor: &str, since: SystemTime, expires_at: Option<SystemTime>) -> Hold {
    Hold {
        kind: HoldKind::Closed,
        name: name.into(),
        expires_at,
        drain: None,
        actor: actor.into(),
        since,
        reason: format!("{name} by {actor}"),
    }
}

fn spec(name: &str) -> CreateSpec {
    CreateSpec {
        name: name.into(),
        owner: "alice".into(),
        kind: Some(SessionKind::Virtual),
        init_file: "init.sh".into(),
        max_concurrent_clients: Some(4),
        dcv_gl_enabled: true,
        permissions_file: "W2dyb3Vwc10K".into(),
        enqueue: true,
        autorun_file: "run.sh".into(),
        autorun_file_arguments: vec!["--fast".into(), "two words".into(), String::new()],
        disable_retry: true,
        requirements: "tag:pool = 'design' and server:Host.CpuInfo.NumberOfCpus >= 8".into(),
        storage_root: "/home/alice".into(),
    }
}

/// A queued session: no server yet, a request, a deadline and a place in
/// the queue.
fn queued(id: &str, position: u64) -> StoredSession {
    StoredSession {
        id: id.into(),
        name: format!("{id}-name"),
        owner: "alice".into(),
        kind: SessionKind::Virtual,
        server: None,
        state: SessionState::Creating,
        substate: Some(Substate::Placing),
        state_reason: "waiting for a server".into(),
        created_at: at(1_700_000_500, 1),
        request: Some(spec(id)),
        permissions_file: "W2dyb3Vwc10K".into(),
        tried: Vec::new(),
        deadline: Some(at(1_700_002_300, 999_999)),
        forgotten: false,
        queue_position: Some(position),
        deletions: 0,
    }
}

/// A session placed on a server after other servers failed it.
fn placed(id: &str, server: usize) -> StoredSession {
    StoredSession {
        server: Some(demo::server_id(server)),
        substate: Some(Substate::PendingPreparation),
        state_reason: String::new(),
        tried: vec![
            demo::server_id(server + 1),
            "odd\nid".into(),
            "ünïcode".into(),
        ],
        queue_position: None,
        deletions: 0,
        request: Some(CreateSpec {
            kind: None,
            max_concurrent_clients: None,
            ..spec(id)
        }),
        ..queued(id, 0)
    }
}

/// A session adopted from an agent's report: no request.
fn adopted(id: &str, server: usize, state: SessionState) -> StoredSession {
    StoredSession {
        id: id.into(),
        name: String::new(),
        owner: "bob".into(),
        kind: SessionKind::Console,
        server: Some(demo::server_id(server)),
        state,
        substate: None,
        state_reason: "reported by the agent".into(),
        created_at: at(1_600_000_000, 0),
        request: None,
        permissions_file: String::new(),
        tried: Vec::new(),
        deadline: None,
        forgotten: state == SessionState::Deleted,
        queue_position: None,
        deletions: 0,
    }
}

async fn put(store: &SqliteStore, changes: Vec<Change>) {
    store.submit(changes).wait().await.unwrap();
}

/// Compares snapshots item by item, so a failure names the item.
fn assert_snapshot(found: &Snapshot, mut expected: Snapshot) {
    expected.servers.sort_by(|a, b| a.id.cmp(&b.id));
    expected.sessions.sort_by(|a, b| a.id.cmp(&b.id));
    let ids = |s: &Snapshot| {
        (
            s.servers.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
            s.sessions.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(ids(found), ids(&expected));
    for (f, e) in found.servers.iter().zip(&expected.servers) {
        assert_eq!(f.description, e.description, "server {}", e.id);
        assert_eq!(f.holds, e.holds, "server {}", e.id);
        assert_eq!(f.registered_at, e.registered_at, "server {}", e.id);
        assert_eq!(f.last_seen, e.last_seen, "server {}", e.id);
        assert_eq!(f.agent_departed, e.agent_departed, "server {}", e.id);
    }
    for (f, e) in found.sessions.iter().zip(&expected.sessions) {
        assert_eq!(f, e, "session {}", e.id);
    }
    assert_eq!(*found, expected);
}

#[tokio::test]
async fn what_is_put_comes_back_after_a_reopen() {
    let dir = TempDir::new("round-trip");
    let (store, snapshot) = open(dir.path());
    assert_eq!(snapshot, Snapshot::default());

    let mut held = server(
        1,
        vec![closed(
            "operator",
            at(1_700_000_100, 42),
            "disk\tswap; ticket #7",
        )],
    );
    held.agent_departed = true;
    let mut described = server(2, Vec::new());
    described.description.tags.push(Tag {
        key: "ünïcode".into(),
        value: String::new().into(),
    });
    let before_epoch = UNIX_EPOCH - Duration::from_micros(1_500_000);
    let servers = vec![
        server(0, Vec::new()),
        held,
        described,
        server(3, vec![closed("", before_epoch, "")]),
        server(4, Vec::new()),
        server(5, Vec::new()),
    ];
    let sessions = vec![
        queued("s-queued-1", 0),
        queued("s-queued-2", 1),
        placed("s-placed", 0),
        adopted("s-ready", 2, SessionState::Ready),
        adopted("s-deleted", 3, SessionState::Deleted),
        adopted("s-unknown", 4, SessionState::Unknown),
    ];
    // In several submissions, some in flight together.
    let first = store.submit(servers.iter().cloned().map(Change::PutServer).collect());
    let second = store.submit(sessions.iter().cloned().map(Change::PutSession).collect());
    let third = store.submit(vec![
        Change::PutSession(queued("s-gone", 9)),
        Change::PutServer(server(9, Vec::new())),
    ]);
    first.wait().await.unwrap();
    second.wait().await.unwrap();
    third.wait().await.unwrap();
    put(
        &store,
        vec![
            Change::DeleteSession("s-gone".into()),
            Change::DeleteServer(demo::server_id(9)),
            // A record replaced under its key, one pruned, one kept.
            Change::PutClientToken(token_record("kept", at(2_000, 1), b"first")),
            Change::PutClientToken(token_record("old", at(1_000, 0), b"old")),
            Change::PutClientToken(token_record("kept", at(3_000, 2), b"\0second")),
            // Claimed, its call never finished: kept without a reply.
            Change::PutClientToken(token_record("claimed", at(4_000, 0), b"")),
            Change::PruneClientTokens {
                before: at(2_500, 0),
            },
        ],
    )
    .await;
    store.close().unwrap();

    let (store, found) = open(dir.path());
    assert_snapshot(
        &found,
        Snapshot {
            servers,
            sessions,
            client_tokens: vec![
                token_record("kept", at(3_000, 2), b"\0second"),
                token_record("claimed", at(4_000, 0), b""),
            ],
            ..Snapshot::default()
        },
    );
    drop(store);
    // And again: opening a store changes nothing in it.
    let (_store, again) = open(dir.path());
    assert_eq!(again, found);
}

/// Several named holds per server, some ending by themselves, and each
/// server's state version come back exactly, in their order, whether put
/// with the whole server or as its state alone.
#[tokio::test]
async fn named_holds_with_expiries_and_state_versions_come_back_exactly() {
    let dir = TempDir::new("named-holds");
    let (store, _) = open(dir.path());
    let since = at(1_700_000_100, 1);
    let mut held = server(
        0,
        vec![
            // Not in name order: the order placed is the order kept.
            // A drain's hold carries the drain.
            in_drain(
                named("zeta", "alice", since, None),
                "5f0c51a2-6c3e-4a47-9a1e-0d1d5a3f7b21",
                Some(at(1_800_000_000, 7)),
                OnDeadline::Report,
            ),
            named("team:ops-1", "bob", since, Some(at(1_800_000_000, 999_999))),
            named(dcv_broker::fleet::DEFAULT_HOLD_NAME, "dcv", since, None),
        ],
    );
    held.state_version = 7;
    let mut full = server(
        1,
        (0..dcv_broker::fleet::holds::MAX_HOLDS_PER_SERVER)
            .map(|i| {
                let expires = (i % 2 == 1).then(|| at(1_750_000_000 + i as u64, 3));
                named(
                    &format!("h{i:02}"),
                    "ops",
                    at(1_700_000_000, i as u32),
                    expires,
                )
            })
            .collect(),
    );
    full.state_version = i64::MAX as u64;
    let mut open_server = server(2, Vec::new());
    open_server.state_version = 3;
    put(
        &store,
        vec![
            Change::PutServer(held.clone()),
            Change::PutServer(full.clone()),
            Change::PutServer(open_server.clone()),
        ],
    )
    .await;
    // The state alone: one hold ends, another server is held twice.
    held.holds.remove(1);
    held.state_version = 8;
    open_server.holds = vec![
        named(dcv_broker::fleet::DEFAULT_HOLD_NAME, "dcv", since, None),
        named("@x", "carol", since, Some(at(1_700_000_200, 0))),
        in_drain(
            named("drain", "carol", since, None),
            "0b6a3c0e-1f53-4c8e-8d9a-2a8f0f7f3e10",
            None,
            OnDeadline::DeleteSessions,
        ),
    ];
    open_server.state_version = 9;
    open_server.agent_departed = true;
    let state = |s: &StoredServer| Change::PutServerState {
        id: s.id.clone(),
        holds: s.holds.clone(),
        state_version: s.state_version,
        agent_departed: s.agent_departed,
    };
    put(&store, vec![state(&held), state(&open_server)]).await;
    store.close().unwrap();

    let (store, found) = open(dir.path());
    for e in [&held, &full, &open_server] {
        let f = found.servers.iter().find(|f| f.id == e.id).unwrap();
        assert_eq!(f.state_version, e.state_version, "server {}", e.id);
    }
    assert_snapshot(
        &found,
        Snapshot {
            servers: vec![held, full, open_server],
            ..Snapshot::default()
        },
    );
    drop(store);
    let (_store, again) = open(dir.path());
    assert_eq!(again, found);
}

#[tokio::test]
async fn deletes_and_replaces_are_kept() {
    let dir = TempDir::new("replace");
    let (store, _) = open(dir.path());
    put(
        &store,
        vec![
            Change::PutServer(server(0, vec![closed("a", at(1, 1), "first")])),
            Change::PutServer(server(1, vec![closed("b", at(2, 2), "")])),
            Change::PutServer(server(2, Vec::new())),
            Change::PutSession(placed("s1", 0)),
            Change::PutSession(queued("s2", 5)),
            Change::PutSession(queued("s3", 6)),
        ],
    )
    .await;
    // Replace: a new description and no hold; a new hold; a session
    // placed with fewer tried servers and no request; a deleted server
    // and session, one of each put back.
    let mut replaced = server(0, Vec::new());
    replaced.description = demo::description(7);
    replaced.last_seen = at(1_800_000_000, 7);
    let reheld = server(2, vec![closed("c", at(3, 3), "maintenance")]);
    let mut s1 = placed("s1", 1);
    s1.tried = vec!["only-one".into()];
    s1.request = None;
    s1.state = SessionState::Ready;
    s1.substate = None;
    put(
        &store,
        vec![
            Change::PutServer(replaced.clone()),
            Change::PutServer(reheld.clone()),
            Change::DeleteServer(demo::server_id(1)),
            Change::PutSession(s1.clone()),
            Change::DeleteSession("s2".into()),
            Change::DeleteSession("s3".into()),
        ],
    )
    .await;
    put(&store, vec![Change::PutSession(queued("s3", 8))]).await;
    drop(store);

    let (_store, found) = open(dir.path());
    assert_snapshot(
        &found,
        Snapshot {
            servers: vec![replaced, reheld],
            sessions: vec![s1, queued("s3", 8)],
            ..Snapshot::default()
        },
    );
}

#[tokio::test]
async fn close_commits_every_queued_submission() {
    let dir = TempDir::new("close");
    let (store, _) = open(dir.path());
    let mut expected = Vec::new();
    for i in 0..500 {
        let mut s = server(i, Vec::new());
        s.agent_departed = i.is_multiple_of(2);
        // Nobody waits: close must still commit them all.
        drop(store.submit(vec![Change::PutServer(s.clone())]));
        expected.push(s);
    }
    let clone = store.clone();
    store.close().unwrap();
    // Closing stops every clone.
    let late = clone.submit(vec![Change::PutServer(server(999, Vec::new()))]);
    assert!(late.wait().await.is_err());
    drop(clone);

    let (_store, found) = open(dir.path());
    assert_snapshot(
        &found,
        Snapshot {
            servers: expected,
            sessions: Vec::new(),
            ..Snapshot::default()
        },
    );
}

#[tokio::test]
async fn an_empty_submission_is_already_durable() {
    let dir = TempDir::new("empty");
    let (store, _) = open(dir.path());
    store.submit(Vec::new()).wait().await.unwrap();
    assert_eq!(store.commits(), 0);
}

/// Runs `tasks` tasks that each submit `each` single-change submissions
/// one after another, waiting for each to be durable before the next;
/// returns how many commits they took.
async fn submit_concurrently(store: &SqliteStore, tasks: usize, each: usize) -> u64 {
    let before = store.commits();
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0..each {
                    let s = server(t * each + n, Vec::new());
                    store.submit(vec![Change::PutServer(s)]).wait().await?;
                }
                Ok::<_, dcv_broker::fleet::FleetError>(())
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap().unwrap();
    }
    let commits = store.commits() - before;
    println!(
        "{tasks} tasks x {each} submissions: {commits} commits in {:?}",
        started.elapsed()
    );
    commits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_submissions_share_commits() {
    const SUBMISSIONS: usize = 1000;
    let dir = TempDir::new("group");
    let (store, _) = open(dir.path());
    // A burst: a thousand tasks submitting once each.
    let burst = submit_concurrently(&store, SUBMISSIONS, 1).await;
    assert!(
        (1..=SUBMISSIONS as u64 / 10).contains(&burst),
        "{burst} commits for a burst of {SUBMISSIONS} submissions"
    );
    // Sustained: fifty tasks each waiting for its previous submission
    // before the next, so at least twenty commits; the rest ride along.
    let sustained = submit_concurrently(&store, 50, SUBMISSIONS / 50).await;
    assert!(
        (20..=SUBMISSIONS as u64 / 4).contains(&sustained),
        "{sustained} commits for {SUBMISSIONS} submissions from 50 tasks"
    );
    store.close().unwrap();
    let (_store, found) = open(dir.path());
    assert_eq!(found.servers.len(), SUBMISSIONS);
}

#[tokio::test]
async fn a_failed_write_stops_the_store() {
    let dir = TempDir::new("failed");
    let (store, _) = open(dir.path());
    let mut failed = store.failed();
    assert_eq!(*failed.borrow(), None);
    put(&store, vec![Change::PutServer(server(0, Vec::new()))]).await;
    // Two holds of one kind break the holds table's key: the write fails.
    let twice = vec![closed("a", at(1, 0), ""), closed("b", at(2, 0), "")];
    let bad = store.submit(vec![
        Change::PutServer(server(1, Vec::new())),
        Change::PutServer(server(2, twice)),
    ]);
    let err = bad.wait().await.unwrap_err().to_string();
    assert!(err.contains("could not be stored"), "{err}");
    failed.changed().await.unwrap();
    let why = failed
        .borrow()
        .clone()
        .expect("the store reports its failure");
    assert!(why.contains("UNIQUE"), "{why}");
    // Everything after fails at once.
    let later = store.submit(vec![Change::PutServer(server(3, Vec::new()))]);
    assert!(later.wait().await.is_err());
    assert_eq!(store.close(), Err(StoreFailed(why)));

    // Nothing of the failed submission, nor anything after, was kept.
    let (_store, found) = open(dir.path());
    assert_snapshot(
        &found,
        Snapshot {
            servers: vec![server(0, Vec::new())],
            sessions: Vec::new(),
            ..Snapshot::default()
        },
    );
}

#[test]
fn a_missing_directory_is_created() {
    let dir = TempDir::new("missing");
    let nested = dir.path().join("a/b/c");
    let (store, snapshot) = open(&nested);
    assert_eq!(snapshot, Snapshot::default());
    assert!(nested.join(FILE_NAME).is_file());
    assert_eq!(store.path(), nested.join(FILE_NAME));
}

/// Writes a store with `n` servers and a session, and closes it.
fn write_store(dir: &Path, n: usize) {
    let (store, _) = open(dir);
    let mut changes: Vec<Change> = (0..n)
        .map(|i| Change::PutServer(server(i, Vec::new())))
        .collect();
    changes.push(Change::PutSession(queued("s", 0)));
    drop(store.submit(changes));
    store.close().unwrap();
}

/// Asserts that opening `dir` fails and leaves every file in it (the
/// store and any write-ahead log) byte-for-byte as it was; returns the
/// error.
fn refused_unchanged(dir: &TempDir) -> StoreOpenError {
    let contents = |d: &Path| -> Vec<(std::ffi::OsString, Vec<u8>)> {
        listing(d)
            .into_iter()
            .map(|name| {
                let bytes = fs::read(d.join(&name)).unwrap();
                (name, bytes)
            })
            .collect()
    };
    let before = contents(dir.path());
    assert!(dir.file().exists());
    let err = open_err(dir.path());
    let message = err.to_string();
    assert!(
        message.contains(&dir.file().display().to_string())
            || message.contains(&dir.path().display().to_string()),
        "the message names the store: {message}"
    );
    let after = contents(dir.path());
    let names =
        |c: &[(std::ffi::OsString, Vec<u8>)]| c.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&after),
        names(&before),
        "refusing the store ({message})"
    );
    assert!(after == before, "refusing the store changed it ({message})");
    err
}

/// The names in a directory, sorted.
fn listing(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    names
}

#[test]
fn garbage_is_not_a_store() {
    let dir = TempDir::new("garbage");
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let garbage: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    fs::write(dir.file(), &garbage).unwrap();
    let err = refused_unchanged(&dir);
    assert!(matches!(err, StoreOpenError::NotAStore { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "{} is not a dcv-broker store (file is not a database)",
            dir.file().display()
        )
    );
}

#[test]
fn a_truncated_store_is_refused() {
    let dir = TempDir::new("truncated");
    write_store(dir.path(), 300);
    let file = fs::OpenOptions::new().write(true).open(dir.file()).unwrap();
    let len = file.metadata().unwrap().len();
    assert!(len > 64 * 1024, "the store is big enough to cut: {len}");
    file.set_len(len / 2).unwrap();
    drop(file);
    let err = refused_unchanged(&dir);
    assert!(
        matches!(
            err,
            StoreOpenError::Corrupt { .. } | StoreOpenError::NotAStore { .. }
        ),
        "{err:?}"
    );
    println!("{err}");
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = TempDir::new("newer");
    write_store(dir.path(), 3);
    let connection = rusqlite::Connection::open(dir.file()).unwrap();
    connection.pragma_update(None, "user_version", 999).unwrap();
    connection.close().unwrap();
    let err = refused_unchanged(&dir);
    assert!(
        matches!(err, StoreOpenError::NewerSchema { found: 999, supported, .. } if supported == SCHEMA_VERSION),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "{} has schema version 999, newer than this broker's {SCHEMA_VERSION}; run a newer dcv-broker",
            dir.file().display()
        )
    );

    // A newer broker that crashed before checkpointing: the new version is
    // only in the write-ahead log. It is found there, and the log is left
    // alone too (not folded into the file).
    let dir = TempDir::new("newer-in-log");
    write_store(dir.path(), 3);
    let connection = rusqlite::Connection::open(dir.file()).unwrap();
    connection
        .set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .unwrap();
    connection
        .execute_batch(&format!(
            "PRAGMA locking_mode = EXCLUSIVE; PRAGMA user_version = {};",
            SCHEMA_VERSION + 1
        ))
        .unwrap();
    connection.close().unwrap();
    let wal = dir.path().join(format!("{FILE_NAME}-wal"));
    assert!(
        fs::metadata(&wal).unwrap().len() > 0,
        "the log holds the change"
    );
    let err = refused_unchanged(&dir);
    assert!(
        matches!(err, StoreOpenError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1),
        "{err:?}"
    );
}

#[test]
fn another_programs_database_is_refused() {
    let dir = TempDir::new("foreign");
    let connection = rusqlite::Connection::open(dir.file()).unwrap();
    connection
        .execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('mine');")
        .unwrap();
    connection.close().unwrap();
    let err = refused_unchanged(&dir);
    assert!(matches!(err, StoreOpenError::NotAStore { .. }), "{err:?}");
}

#[test]
fn a_row_that_does_not_decode_names_itself() {
    let dir = TempDir::new("bad-row");
    write_store(dir.path(), 3);
    let connection = rusqlite::Connection::open(dir.file()).unwrap();
    let id = demo::server_id(1);
    connection
        .execute(
            "UPDATE servers SET description = x'ffffffff' WHERE id = ?1",
            [&id],
        )
        .unwrap();
    connection.close().unwrap();
    let err = refused_unchanged(&dir);
    assert!(matches!(err, StoreOpenError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains(&format!("{id:?}")), "{err}");

    let dir = TempDir::new("bad-enum");
    write_store(dir.path(), 1);
    let connection = rusqlite::Connection::open(dir.file()).unwrap();
    connection
        .execute("UPDATE sessions SET state = 'READY?' WHERE id = 's'", [])
        .unwrap();
    connection.close().unwrap();
    let err = refused_unchanged(&dir);
    assert!(err.to_string().contains("session \"s\": state"), "{err}");

    // A hold's name no CloseServers could have placed, and a state
    // version below zero.
    for (case, sql, named) in [
        (
            "bad-hold-name",
            "UPDATE holds SET name = 'two words'",
            "the hold of server \"serverId1\": name",
        ),
        (
            "bad-state-version",
            "UPDATE servers SET state_version = -1",
            "server \"serverId1\": state_version",
        ),
    ] {
        let dir = TempDir::new(case);
        let (store, _) = open(dir.path());
        let held = server(0, vec![closed("a", at(1, 1), "r")]);
        drop(store.submit(vec![Change::PutServer(held)]));
        store.close().unwrap();
        let connection = rusqlite::Connection::open(dir.file()).unwrap();
        assert_eq!(connection.execute(sql, []).unwrap(), 1, "{case}");
        connection.close().unwrap();
        let err = refused_unchanged(&dir);
        assert!(matches!(err, StoreOpenError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains(named), "{case}: {err}");
    }
}

#[tokio::test]
async fn a_second_broker_is_refused_while_the_first_runs() {
    let dir = TempDir::new("locked");
    write_store(dir.path(), 2);
    let (first, _) = open(dir.path());

    let err = open_err(dir.path());
    assert!(matches!(err, StoreOpenError::Locked { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "{} is in use by another dcv-broker; a store serves one broker at a time",
            dir.file().display()
        )
    );
    // The same from another process.
    let output = child(&[("locked", dir.path())], false);
    println!("{output}");
    assert!(output.contains("Locked"), "{output}");

    // The refused opens did not disturb the first broker's lock or writes.
    put(&first, vec![Change::PutServer(server(7, Vec::new()))]).await;
    assert!(matches!(
        open_err(dir.path()),
        StoreOpenError::Locked { .. }
    ));
    first.close().unwrap();
    let (_store, found) = open(dir.path());
    assert_eq!(found.servers.len(), 3);
}

#[test]
fn a_directory_the_broker_cannot_write_is_refused() {
    let dir = TempDir::new("read-only");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let root = fs::metadata(dir.path()).unwrap().uid() == 0;
    // An empty directory, a directory to create in it, and one holding a
    // store the broker may not write.
    let empty = dir.path().join("empty");
    let inside = empty.join("new");
    let with_store = dir.path().join("with-store");
    fs::create_dir(&empty).unwrap();
    write_store(&with_store, 2);
    let mut stores = vec![with_store.join(FILE_NAME)];
    let mut cases = vec![
        ("read-only", empty.clone()),
        ("read-only", inside.clone()),
        ("read-only", with_store.clone()),
    ];
    if root {
        // And a store file the broker's user owns, in a directory it may
        // not write (SQLite cannot create its write-ahead log there).
        let own_file = dir.path().join("own-file");
        write_store(&own_file, 2);
        std::os::unix::fs::chown(own_file.join(FILE_NAME), Some(65534), Some(65534)).unwrap();
        stores.push(own_file.join(FILE_NAME));
        cases.push(("read-only", own_file));
    }
    let before: Vec<Vec<u8>> = stores.iter().map(|f| fs::read(f).unwrap()).collect();
    let listings: Vec<_> = cases.iter().skip(2).map(|(_, d)| listing(d)).collect();
    if root {
        // Permission bits do not bind root: open as nobody, in a child.
        let cases: Vec<_> = cases.iter().map(|(k, d)| (*k, d.as_path())).collect();
        let output = child(&cases, true);
        println!("{output}");
        assert_eq!(output.matches("ReadOnly").count(), cases.len(), "{output}");
    } else {
        for d in [&empty, &with_store] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o555)).unwrap();
        }
        for (_, d) in &cases {
            let err = open_err(d);
            assert!(matches!(err, StoreOpenError::ReadOnly { .. }), "{err:?}");
        }
        for d in [&empty, &with_store] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    for (file, before) in stores.iter().zip(before) {
        assert!(
            fs::read(file).unwrap() == before,
            "{} changed",
            file.display()
        );
    }
    assert!(!inside.exists());
    assert_eq!(listing(&empty), Vec::<std::ffi::OsString>::new());
    for ((_, d), names) in cases.iter().skip(2).zip(listings) {
        assert_eq!(listing(d), names, "files appeared in {}", d.display());
    }
}

/// The variable that tells the `child_process` helper what to do.
const CHILD_CASES: &str = "DCV_BROKER_STORE_TEST_CHILD";

/// Runs the `child_process` helper on `cases` (what to do, and in which
/// directory), as `nobody` if `unprivileged`; returns its exit status and
/// its output.
fn run_child(cases: &[(&str, &Path)], unprivileged: bool) -> (Option<i32>, String) {
    let exe = std::env::current_exe().unwrap();
    let spec = cases
        .iter()
        .map(|(kind, dir)| format!("{kind}={}", dir.display()))
        .collect::<Vec<_>>()
        .join("\n");
    let mut command = if unprivileged {
        let mut c = Command::new("/usr/bin/setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    let output = command
        .args([
            "--exact",
            "child_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_CASES, spec)
        .output()
        .expect("run the test binary again");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

/// [`run_child`], which must pass.
fn child(cases: &[(&str, &Path)], unprivileged: bool) -> String {
    let (status, text) = run_child(cases, unprivileged);
    assert_eq!(status, Some(0), "the child failed: {text}");
    assert!(text.contains("1 passed"), "the child ran nothing: {text}");
    text
}

/// How many servers the `crash` child stores before it exits.
const CRASH_SERVERS: usize = 200;
/// The `crash` child's exit status.
const CRASH_EXIT: i32 = 3;

/// Not a test on its own: does what `run_child` asks, in a process of its
/// own. `locked` and `read-only` open a store that must be refused so;
/// `crash` stores servers and ends the process once they are durable,
/// without closing the store.
#[test]
#[ignore = "run by other tests in a child process"]
fn child_process() {
    let Ok(cases) = std::env::var(CHILD_CASES) else {
        return;
    };
    for case in cases.lines() {
        let (kind, dir) = case.split_once('=').unwrap();
        if kind == "crash" {
            let (store, _) = open(Path::new(dir));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            runtime.block_on(async {
                for i in 0..CRASH_SERVERS {
                    put(&store, vec![Change::PutServer(server(i, Vec::new()))]).await;
                }
            });
            println!("durable; exiting without closing the store");
            // No destructor runs: the writer thread dies with the process,
            // as in a crash (and no core file is left behind).
            std::process::exit(CRASH_EXIT);
        }
        let err = open_err(Path::new(dir));
        println!("{dir}: {err:?}\n  {err}");
        match kind {
            "locked" => assert!(matches!(err, StoreOpenError::Locked { .. }), "{err:?}"),
            "read-only" => assert!(matches!(err, StoreOpenError::ReadOnly { .. }), "{err:?}"),
            other => panic!("unknown case {other}"),
        }
    }
}

#[test]
fn what_was_durable_survives_a_crash() {
    let dir = TempDir::new("crash");
    let (status, text) = run_child(&[("crash", dir.path())], false);
    assert_eq!(status, Some(CRASH_EXIT), "{text}");
    // The process died holding the store, its last commits only in the
    // write-ahead log.
    let wal = dir.path().join(format!("{FILE_NAME}-wal"));
    assert!(fs::metadata(&wal).unwrap().len() > 0);
    let (_store, found) = open(dir.path());
    assert_snapshot(
        &found,
        Snapshot {
            servers: (0..CRASH_SERVERS).map(|i| server(i, Vec::new())).collect(),
            sessions: Vec::new(),
            ..Snapshot::default()
        },
    );
}

/// The start-up path the benchmark measures: 100,000 servers with ten
/// tags each, loaded by a fresh open.
#[test]
fn startup_with_a_hundred_thousand_servers() {
    const SERVERS: usize = 100_000;
    const PER_SUBMISSION: usize = 25_000;
    let dir = TempDir::new("startup");
    let (store, _) = open(dir.path());
    let started = Instant::now();
    for first in (0..SERVERS).step_by(PER_SUBMISSION) {
        let changes = (first..first + PER_SUBMISSION)
            .map(|i| {
                let mut s = server(i, Vec::new());
                let tags = &mut s.description.tags;
                let extra = (tags.len()..10).map(|t| Tag {
                    key: format!("tag{t}").into(),
                    value: format!("value-{i}-{t}").into(),
                });
                tags.extend(extra.collect::<Vec<_>>());
                Change::PutServer(s)
            })
            .collect();
        drop(store.submit(changes));
    }
    store.close().unwrap();
    let written = started.elapsed();
    let size = fs::metadata(dir.file()).unwrap().len();

    let started = Instant::now();
    let (_store, snapshot) = open(dir.path());
    let loaded = started.elapsed();
    assert_eq!(snapshot.servers.len(), SERVERS);
    assert!(
        snapshot
            .servers
            .iter()
            .all(|s| s.description.tags.len() == 10)
    );
    println!(
        "{SERVERS} servers: written in {written:?}, {:.1} MiB; open+load took {loaded:?}",
        size as f64 / f64::from(1 << 20)
    );
}

#[tokio::test]
async fn a_version_1_store_migrates_and_keeps_clients_and_secrets_after() {
    let dir = TempDir::new("migrate-v1");
    let held = server(0, vec![closed("operator", at(1_700_000_000, 0), "kept")]);
    // A version 1 store, as a broker before authentication (and before
    // sessions counted their deletions) left it.
    write_old_store(dir.path(), 1, std::slice::from_ref(&held));

    let (store, snapshot) = open(dir.path());
    assert_eq!(snapshot.servers, vec![held.clone()], "the servers survive");
    assert!(snapshot.clients.is_empty() && snapshot.secrets.is_empty());
    let client = StoredClient {
        id: "c1".into(),
        name: "portal".into(),
        secret_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        scopes: vec!["read".into(), "servers:operate".into()],
        server_id: None,
        created_at: at(1_700_000_001, 5),
        revoked_at: None,
    };
    let agent = StoredClient {
        id: "c2".into(),
        server_id: Some("srv-1".into()),
        scopes: vec!["agent".into()],
        revoked_at: Some(at(1_700_000_002, 7)),
        ..client.clone()
    };
    put(
        &store,
        vec![
            Change::PutClient(client.clone()),
            Change::PutClient(agent.clone()),
            Change::PutSecret {
                name: "key".into(),
                value: vec![0, 1, 2, 255],
            },
        ],
    )
    .await;
    store.close().unwrap();

    let (_store, snapshot) = open(dir.path());
    assert_eq!(snapshot.servers, vec![held]);
    assert_eq!(snapshot.clients, vec![client, agent]);
    assert_eq!(
        snapshot.secrets,
        vec![("key".to_owned(), vec![0, 1, 2, 255])]
    );
}

/// Writes at `dir` a store of schema `version` (its tables exactly as the
/// released migrations made them) holding `servers`, each with at most one
/// hold, of kind CLOSED, as every store before named holds had it. The
/// servers' descriptions are encoded by this build's store, in a store of
/// its own.
fn write_old_store(dir: &Path, version: usize, servers: &[StoredServer]) {
    let scratch = TempDir::new("scratch");
    let (store, _) = open(scratch.path());
    drop(store.submit(servers.iter().cloned().map(Change::PutServer).collect()));
    store.close().unwrap();
    let scratch = rusqlite::Connection::open(scratch.file()).unwrap();
    let description = |id: &str| -> Vec<u8> {
        scratch
            .query_row("SELECT description FROM servers WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap()
    };
    let micros = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_micros() as i64;

    let connection = rusqlite::Connection::open(dir.join(FILE_NAME)).unwrap();
    for migration in &dcv_broker::store::MIGRATIONS[..version] {
        connection.execute_batch(migration).unwrap();
    }
    connection
        .execute_batch(&format!(
            "PRAGMA application_id = {}; PRAGMA user_version = {version};",
            0x4443_5642
        ))
        .unwrap();
    for s in servers {
        connection
            .execute(
                "INSERT INTO servers (id, description, registered_at, last_seen, agent_departed)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![
                    s.id,
                    description(&s.id),
                    micros(s.registered_at),
                    micros(s.last_seen),
                    s.agent_departed
                ],
            )
            .unwrap();
        assert!(s.holds.len() <= 1, "one hold per server before named holds");
        for hold in &s.holds {
            connection
                .execute(
                    "INSERT INTO holds (server_id, kind, actor, since, reason)
                     VALUES (?1, 'CLOSED', ?2, ?3, ?4)",
                    rusqlite::params![s.id, &*hold.actor, micros(hold.since), hold.reason],
                )
                .unwrap();
        }
    }
    connection.close().unwrap();
}

/// A store written before named holds opens: its holds become the hold
/// named `default` (DCV's closed flag), with no expiry, and every server's
/// state version is 0; after the migration a server can carry several
/// holds, and they are kept.
#[tokio::test]
async fn a_version_4_store_migrates_and_keeps_its_holds_as_default() {
    let dir = TempDir::new("migrate-v4");
    let default = dcv_broker::fleet::DEFAULT_HOLD_NAME;
    let mut servers = vec![
        server(
            0,
            vec![named(default, "operator", at(1_700_000_000, 5), None)],
        ),
        server(1, Vec::new()),
        server(2, vec![named(default, "", at(1_600_000_000, 0), None)]),
    ];
    servers[0].holds[0].reason = "kernel patch; ticket #7".into();
    servers[2].holds[0].reason = String::new();
    servers[2].agent_departed = true;
    write_old_store(dir.path(), 4, &servers);

    let (store, snapshot) = open(dir.path());
    assert_snapshot(
        &snapshot,
        Snapshot {
            servers: servers.clone(),
            ..Snapshot::default()
        },
    );
    // What the migration wrote is what the domain calls DCV's hold.
    let migrated = snapshot.servers.iter().find(|s| s.id == servers[0].id);
    assert_eq!(&*migrated.unwrap().holds[0].name, "default");

    // A second hold beside the migrated one: the key is the name now.
    servers[0].holds.push(named(
        "team:ops",
        "bob",
        at(1_700_000_001, 0),
        Some(at(1_800_000_000, 0)),
    ));
    servers[0].state_version = 2;
    put(
        &store,
        vec![Change::PutServerState {
            id: servers[0].id.clone(),
            holds: servers[0].holds.clone(),
            state_version: 2,
            agent_departed: false,
        }],
    )
    .await;
    store.close().unwrap();
    let (_store, snapshot) = open(dir.path());
    assert_snapshot(
        &snapshot,
        Snapshot {
            servers,
            ..Snapshot::default()
        },
    );
}

/// The store holds secrets' hashes and signing keys: whatever mode the file
/// had (an older build's 0644), an open leaves it its owner's alone.
#[cfg(unix)]
#[tokio::test]
async fn an_opened_store_file_is_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("private");
    let data = dir.path().join("data");
    let (store, _) = open(&data);
    put(&store, vec![Change::PutServer(server(0, Vec::new()))]).await;
    store.close().unwrap();
    let dir_mode = fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        dir_mode, 0o700,
        "a new data directory is private: {dir_mode:o}"
    );
    let file = data.join(FILE_NAME);
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    let (_store, snapshot) = open(&data);
    assert_eq!(snapshot.servers.len(), 1);
    let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
}
