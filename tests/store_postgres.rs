//! The PostgreSQL store against a real PostgreSQL (see
//! `tests/common/postgres.rs`): what is put comes back after a reopen, a
//! submission is all or nothing, brokers opening one database together
//! migrate it once (and only the last to take the lease can write), a
//! newer schema is refused, the URL's password never
//! shows in an error, a lost database stops the store without
//! acknowledging anything, queued submissions share commits, and the
//! `dcv-broker` binary with `--database-url` keeps a close across SIGKILL
//! and stops (exit 1, UNAVAILABLE to the caller, no password in its log)
//! when PostgreSQL goes away.

mod common;

use std::{
    ffi::OsStr,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{postgres::TestDatabase, process::BrokerProcess};
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
    pb::{self, agent_client::AgentClient, servers_client::ServersClient},
    store::{
        PostgresOpenError, PostgresStore,
        postgres::{MIGRATION_LOCK, SCHEMA_VERSION},
    },
};
use tonic::transport::Channel;

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

/// The secrets every replica shares, drawn when the database is first
/// connected to (`tests/store_cluster.rs` checks them); [`open`] leaves them
/// out of the snapshots compared here.
const SHARED_SECRETS: [&str; 4] = [
    "cluster-forwarding-key/hmac-sha256",
    "connection-token-key/hmac-sha256",
    "page-token-key/hmac-sha256",
    "token-signing-key/hs256",
];

async fn open(db: &TestDatabase) -> (PostgresStore, Snapshot) {
    let (store, mut snapshot) = PostgresStore::open(&db.url)
        .await
        .unwrap_or_else(|e| panic!("open: {e}"));
    snapshot = without_shared_secrets(snapshot);
    (store, snapshot)
}

fn without_shared_secrets(mut snapshot: Snapshot) -> Snapshot {
    let all = snapshot.secrets.len();
    snapshot
        .secrets
        .retain(|(name, _)| !SHARED_SECRETS.contains(&name.as_str()));
    assert_eq!(all - snapshot.secrets.len(), SHARED_SECRETS.len());
    snapshot
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
        deletions: 3,
    }
}

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
        request: Some(CreateSpec {
            kind: None,
            max_concurrent_clients: None,
            ..spec(id)
        }),
        ..queued(id, 0)
    }
}

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

fn client(id: &str, revoked: bool) -> StoredClient {
    StoredClient {
        id: id.into(),
        name: format!("{id} name"),
        secret_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        scopes: vec!["sm_api/read".into(), "sm_api/write".into()],
        server_id: (!revoked).then(|| "dcv-1".into()),
        created_at: at(1_700_000_000, 5),
        revoked_at: revoked.then(|| at(1_700_000_100, 6)),
    }
}

async fn put(store: &PostgresStore, changes: Vec<Change>) {
    store.submit(changes).wait().await.unwrap();
}

#[tokio::test]
async fn what_is_put_comes_back_after_a_reopen() {
    let db = TestDatabase::new().await;
    let (store, snapshot) = open(&db).await;
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
    ];
    let sessions = vec![
        queued("s-queued-1", 0),
        queued("s-queued-2", 1),
        placed("s-placed", 0),
        adopted("s-ready", 2, SessionState::Ready),
        adopted("s-deleted", 3, SessionState::Deleted),
        adopted("s-unknown", 4, SessionState::Unknown),
    ];
    let clients = vec![client("a-client", false), client("b-client", true)];
    let secrets = vec![("signing-key".to_string(), vec![0_u8, 1, 255, 0])];
    // In several submissions, in flight together.
    let first = store.submit(servers.iter().cloned().map(Change::PutServer).collect());
    let second = store.submit(sessions.iter().cloned().map(Change::PutSession).collect());
    let third = store.submit(vec![
        Change::PutSession(queued("s-gone", 9)),
        Change::PutServer(server(9, vec![closed("o", at(2, 2), "gone")])),
        Change::PutClient(clients[0].clone()),
        Change::PutClient(clients[1].clone()),
        Change::PutSecret {
            name: secrets[0].0.clone(),
            value: vec![9],
        },
    ]);
    first.wait().await.unwrap();
    second.wait().await.unwrap();
    third.wait().await.unwrap();
    put(
        &store,
        vec![
            Change::DeleteSession("s-gone".into()),
            Change::DeleteServer(demo::server_id(9)),
            Change::PutSecret {
                name: secrets[0].0.clone(),
                value: secrets[0].1.clone(),
            },
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
    assert!(store.commits() >= 1);
    store.close().await.unwrap();

    let (store, found) = open(&db).await;
    let expected = Snapshot {
        servers: {
            let mut s = servers;
            s.sort_by(|a, b| a.id.cmp(&b.id));
            s
        },
        sessions: {
            let mut s = sessions;
            s.sort_by(|a, b| a.id.cmp(&b.id));
            s
        },
        clients,
        secrets,
        client_tokens: vec![
            token_record("kept", at(3_000, 2), b"\0second"),
            token_record("claimed", at(4_000, 0), b""),
        ],
    };
    for (f, e) in found.sessions.iter().zip(&expected.sessions) {
        assert_eq!(f, e, "session {}", e.id);
    }
    assert_eq!(found, expected);
    drop(store);
    // Opening changes nothing.
    let (_store, again) = open(&db).await;
    assert_eq!(again, found);
}

#[tokio::test]
async fn deletes_and_replaces_are_kept() {
    let db = TestDatabase::new().await;
    let (store, _) = open(&db).await;
    put(
        &store,
        vec![
            Change::PutServer(server(0, vec![closed("a", at(1, 1), "first")])),
            Change::PutServer(server(1, vec![closed("b", at(2, 2), "")])),
            Change::PutServer(server(2, Vec::new())),
            Change::PutSession(placed("s1", 0)),
            Change::PutSession(queued("s2", 5)),
        ],
    )
    .await;
    let mut replaced = server(0, Vec::new());
    replaced.description = demo::description(7);
    let mut s1 = placed("s1", 1);
    s1.tried = vec!["only-one".into()];
    s1.request = None;
    put(
        &store,
        vec![
            Change::PutServer(replaced.clone()),
            Change::PutServerState {
                id: demo::server_id(2),
                holds: vec![closed("c", at(3, 3), "maintenance")],
                state_version: 0,
                agent_departed: true,
            },
            Change::DeleteServer(demo::server_id(1)),
            Change::PutSession(s1.clone()),
            Change::DeleteSession("s2".into()),
        ],
    )
    .await;
    store.close().await.unwrap();

    let (_store, found) = open(&db).await;
    let mut reheld = server(2, vec![closed("c", at(3, 3), "maintenance")]);
    reheld.agent_departed = true;
    assert_eq!(
        found,
        Snapshot {
            servers: vec![reheld, replaced],
            sessions: vec![s1],
            ..Snapshot::default()
        }
    );
}

/// Several named holds per server, some ending by themselves, and each
/// server's state version come back exactly, in their order, whether put
/// with the whole server or as its state alone.
#[tokio::test]
async fn named_holds_with_expiries_and_state_versions_come_back_exactly() {
    let db = TestDatabase::new().await;
    let (store, _) = open(&db).await;
    let since = at(1_700_000_100, 1);
    let default = dcv_broker::fleet::DEFAULT_HOLD_NAME;
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
            named(default, "dcv", since, None),
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
    held.holds.remove(1);
    held.state_version = 8;
    open_server.holds = vec![
        named(default, "dcv", since, None),
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
    store.close().await.unwrap();

    let (store, found) = open(&db).await;
    let mut servers = vec![held, full, open_server];
    servers.sort_by(|a, b| a.id.cmp(&b.id));
    for (f, e) in found.servers.iter().zip(&servers) {
        assert_eq!(f, e, "server {}", e.id);
    }
    assert_eq!(
        found,
        Snapshot {
            servers,
            ..Snapshot::default()
        }
    );
    drop(store);
    let (_store, again) = open(&db).await;
    assert_eq!(again, found);
}

/// A database written before named holds (schema version 3) migrates: its
/// holds become the hold named `default` (DCV's closed flag), with no
/// expiry, every server's state version is 0, and afterwards a server can
/// carry several holds.
#[tokio::test]
async fn a_version_3_database_migrates_and_keeps_its_holds_as_default() {
    let db = TestDatabase::new().await;
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
    // This build encodes the descriptions; then the database is made
    // again, exactly as the first three migrations left it, and the rows
    // written as a broker of that version wrote them.
    let (store, _) = open(&db).await;
    put(
        &store,
        servers.iter().cloned().map(Change::PutServer).collect(),
    )
    .await;
    store.close().await.unwrap();
    let mut client = db.connect().await;
    let descriptions: Vec<(String, Vec<u8>)> = client
        .query("SELECT id, description FROM servers", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let micros = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_micros() as i64;
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(
        "DROP TABLE servers, holds, sessions, session_tried, clients, secrets,
             dcv_broker_leader, dcv_broker_changes, audit, audit_subjects, client_tokens, dcv_broker_schema",
    )
    .await
    .unwrap();
    for migration in &dcv_broker::store::postgres::MIGRATIONS[..3] {
        tx.batch_execute(migration).await.unwrap();
    }
    tx.batch_execute(
        "CREATE TABLE dcv_broker_schema (
             singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
             version BIGINT NOT NULL
         );
         INSERT INTO dcv_broker_schema (singleton, version) VALUES (TRUE, 3);",
    )
    .await
    .unwrap();
    for s in &servers {
        let description = &descriptions.iter().find(|(id, _)| *id == s.id).unwrap().1;
        tx.execute(
            "INSERT INTO servers (id, description, registered_at, last_seen, agent_departed)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &s.id,
                description,
                &micros(s.registered_at),
                &micros(s.last_seen),
                &s.agent_departed,
            ],
        )
        .await
        .unwrap();
        for hold in &s.holds {
            tx.execute(
                "INSERT INTO holds (server_id, position, kind, actor, since, reason)
                 VALUES ($1, 0, 'CLOSED', $2, $3, $4)",
                &[&s.id, &&*hold.actor, &micros(hold.since), &hold.reason],
            )
            .await
            .unwrap();
        }
    }
    tx.commit().await.unwrap();

    let (store, found) = open(&db).await;
    servers.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(
        found,
        Snapshot {
            servers: servers.clone(),
            ..Snapshot::default()
        }
    );
    let migrated = found.servers.iter().find(|s| !s.holds.is_empty()).unwrap();
    // What the migration wrote is what the domain calls DCV's hold.
    assert_eq!(&*migrated.holds[0].name, "default");
    let version: i64 = client
        .query_one("SELECT version FROM dcv_broker_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, SCHEMA_VERSION);

    // A second hold beside the migrated one: the key is the name now.
    let i = servers
        .iter()
        .position(|s| s.id == demo::server_id(0))
        .unwrap();
    servers[i].holds.push(named(
        "team:ops",
        "bob",
        at(1_700_000_001, 0),
        Some(at(1_800_000_000, 0)),
    ));
    servers[i].state_version = 2;
    put(
        &store,
        vec![Change::PutServerState {
            id: servers[i].id.clone(),
            holds: servers[i].holds.clone(),
            state_version: 2,
            agent_departed: false,
        }],
    )
    .await;
    store.close().await.unwrap();
    let (_store, found) = open(&db).await;
    assert_eq!(
        found,
        Snapshot {
            servers,
            ..Snapshot::default()
        }
    );

    // A damaged name is refused, naming the row.
    db.execute("UPDATE holds SET name = 'two words' WHERE name = 'team:ops'")
        .await;
    let err = match PostgresStore::open(&db.url).await {
        Ok(_) => panic!("a hold named 'two words' was loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!(
            "the hold of server {:?}: name",
            demo::server_id(0)
        )),
        "{err}"
    );
}

/// PostgreSQL's TEXT cannot hold a NUL character: a change carrying one
/// fails inside the transaction, after the changes before it in the same
/// submission were applied. None of them may remain.
#[tokio::test]
async fn a_submission_is_all_or_nothing_and_a_failed_write_stops_the_store() {
    let db = TestDatabase::new().await;
    let (store, _) = open(&db).await;
    put(&store, vec![Change::PutServer(server(0, Vec::new()))]).await;
    let failed = store.failed();
    assert!(failed.borrow().is_none());

    let mut bad = queued("s-bad", 0);
    bad.name = "nul\0byte".into();
    let result = store
        .submit(vec![
            Change::PutServer(server(1, Vec::new())),
            Change::PutServerState {
                id: demo::server_id(0),
                holds: vec![closed("a", at(1, 1), "half")],
                state_version: 0,
                agent_departed: false,
            },
            Change::PutSession(bad),
        ])
        .wait()
        .await;
    assert!(result.is_err(), "the failed submission is not acknowledged");
    assert!(failed.borrow().is_some(), "the store says it failed");
    // Everything later fails too, without being written.
    let later = store
        .submit(vec![Change::PutServer(server(2, Vec::new()))])
        .wait()
        .await;
    assert!(later.is_err());
    drop(store);

    let (_store, found) = open(&db).await;
    assert_eq!(
        found,
        Snapshot {
            servers: vec![server(0, Vec::new())],
            ..Snapshot::default()
        },
        "nothing of the failed submission, nor of later ones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn brokers_opening_one_database_together_migrate_it_once() {
    let db = TestDatabase::new().await;
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { PostgresStore::open(&url).await })
        })
        .collect();
    let mut stores = Vec::new();
    for open in opens {
        let (store, snapshot) = open.await.unwrap().unwrap_or_else(|e| panic!("open: {e}"));
        assert_eq!(without_shared_secrets(snapshot), Snapshot::default());
        stores.push(store);
    }
    let check = db.connect().await;
    let rows = check
        .query("SELECT version FROM dcv_broker_schema", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i64>(0), SCHEMA_VERSION);
    // Each took the lease in turn (the single-broker path takes it
    // whoever holds it), so only the last one's writer can commit: the
    // others are fenced.
    let mut committed = 0;
    for store in &stores {
        let put = store.submit(vec![Change::PutServer(server(0, Vec::new()))]);
        committed += usize::from(put.wait().await.is_ok());
    }
    assert_eq!(committed, 1, "exactly one writer holds the lease");
    drop(stores);
    let (_store, found) = open(&db).await;
    assert_eq!(found.servers, vec![server(0, Vec::new())]);
}

/// While another broker migrates (holds the migration lock), an opening
/// broker waits at the lock instead of migrating beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opening_broker_waits_for_a_migration_in_progress() {
    let db = TestDatabase::new().await;
    let mut holder = db.connect().await;
    let tx = holder.transaction().await.unwrap();
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .unwrap();
    let url = db.url.clone();
    let opening = tokio::spawn(async move { PostgresStore::open(&url).await });
    // Bounded poll until PostgreSQL shows the opener waiting for the lock.
    let watcher = db.connect().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the opener never waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!opening.is_finished(), "it opened while the lock was held");
    let tables: i64 = watcher
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'dcv_broker_schema'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "nothing was created while the lock was held");
    tx.commit().await.unwrap();
    let (_store, snapshot) = opening
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("open: {e}"));
    assert_eq!(without_shared_secrets(snapshot), Snapshot::default());
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let db = TestDatabase::new().await;
    drop(open(&db).await);
    db.execute("UPDATE dcv_broker_schema SET version = version + 1")
        .await;
    match PostgresStore::open(&db.url).await {
        Err(
            e @ PostgresOpenError::NewerSchema {
                found, supported, ..
            },
        ) => {
            assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
            assert!(e.to_string().contains("run a newer dcv-broker"), "{e}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a newer schema was opened"),
    }
}

#[tokio::test]
async fn the_password_never_shows_in_an_error() {
    let db = TestDatabase::new().await;
    // Port 1 on loopback: nothing listens.
    for url in [
        "postgres://user:s3cr3t-pw@127.0.0.1:1/db",
        "postgres://user:s3cr3t-pw@127.0.0.1:notaport/db",
        "postgres://user:s3cr3t-pw@127.0.0.1:1/db?sslmode=nonsense",
    ] {
        match PostgresStore::open(url).await {
            Err(e) => {
                let message = format!("{e} {e:?}");
                assert!(!message.contains("s3cr3t"), "{message}");
            }
            Ok(_) => panic!("{url} opened"),
        }
    }
    drop(db);
}

#[tokio::test]
async fn a_database_that_goes_away_fails_writes_and_acknowledges_nothing() {
    let mut db = TestDatabase::new().await;
    if !db.owns_server() {
        eprintln!("skipped: DCV_BROKER_TEST_DATABASE_URL's server is not ours to stop");
        return;
    }
    let (store, _) = open(&db).await;
    put(&store, vec![Change::PutServer(server(0, Vec::new()))]).await;
    let mut failed = store.failed();
    db.stop_server();
    let result = store
        .submit(vec![Change::PutServer(server(1, Vec::new()))])
        .wait()
        .await;
    match result {
        Err(e) => assert!(
            matches!(e, dcv_broker::fleet::FleetError::Unavailable(_)),
            "{e:?}"
        ),
        Ok(()) => panic!("a write was acknowledged with the database down"),
    }
    failed.wait_for(Option::is_some).await.unwrap();
}

// --- the broker binary -----------------------------------------------------

/// A directory that does not exist yet, for `--data-dir` (which holds only
/// the admin socket with `--database-url`); removed when dropped.
struct DataDir(std::path::PathBuf);

impl DataDir {
    fn new() -> DataDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "dcv-broker-pg-data-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        DataDir(path)
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start_broker(db: &TestDatabase, dir: &DataDir) -> BrokerProcess {
    start_broker_on(&db.url, "info", dir).await
}

async fn start_broker_on(url: &str, log: &str, dir: &DataDir) -> BrokerProcess {
    let mut args: Vec<&OsStr> = ["--log", log, "--database-url", url, "--data-dir"]
        .map(OsStr::new)
        .to_vec();
    args.push(dir.0.as_os_str());
    BrokerProcess::start_exactly(&args).await
}

async fn channel(broker: &BrokerProcess) -> Channel {
    Channel::from_shared(format!("http://{}", broker.addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn registration(id: &str) -> pb::RegisterServerRequest {
    pb::RegisterServerRequest {
        server_id: id.into(),
        ip: "192.0.2.1".into(),
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

async fn holds(broker: &BrokerProcess, id: &str) -> Vec<pb::Hold> {
    let mut servers = ServersClient::new(channel(broker).await);
    let mut found = servers
        .describe_servers(pb::DescribeServersRequest {
            server_ids: vec![id.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .servers;
    assert_eq!(found.len(), 1, "{id} is known");
    found.remove(0).holds
}

/// The broker's GET /metrics, as text.
async fn scrape(broker: &BrokerProcess) -> String {
    use http_body_util::BodyExt as _;
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    let client =
        Client::builder(TokioExecutor::new()).build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: http::Uri = format!("http://{}/metrics", broker.addr).parse().unwrap();
    let response = client.get(uri).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// The value of the unlabelled sample `name` in a Prometheus text page.
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in {page}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn the_binary_keeps_a_close_in_postgres_across_sigkill() {
    let db = TestDatabase::new().await;
    let dir = DataDir::new();
    let mut broker = start_broker(&db, &dir).await;
    let startup = broker.logged("store loaded").await;
    assert!(
        !startup.contains("@"),
        "no credentials in the log: {startup}"
    );
    // The data directory was made for the admin socket, private, and
    // `dcv-broker clients` reaches the broker through it.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&dir.0).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700);
    let listed = std::process::Command::new(common::process::BROKER_BIN)
        .args(["clients", "list", "--json", "--data-dir"])
        .arg(&dir.0)
        .output()
        .unwrap();
    assert!(listed.status.success(), "{listed:?}");
    assert!(
        !dir.0.join(dcv_broker::store::FILE_NAME).exists(),
        "no SQLite store is made beside the admin socket"
    );
    let mut agent = AgentClient::new(channel(&broker).await);
    agent.register_server(registration("pg-1")).await.unwrap();
    let mut servers = ServersClient::new(channel(&broker).await);
    let reply = servers
        .close_servers(pb::CloseServersRequest {
            servers: vec![pb::CloseServerRequestData {
                server_id: "pg-1".into(),
                force: None,
                reason: "kernel patch".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.unsuccessful_list.is_empty());
    let before = holds(&broker, "pg-1").await;
    assert_eq!(before.len(), 1);
    // The PostgreSQL writer's commits are measured as SQLite's are: at
    // least the registration's and the close's, none failed.
    let metrics = scrape(&broker).await;
    assert!(
        metric(&metrics, "dcv_broker_store_commit_seconds_count") >= 2.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "dcv_broker_store_changes_per_commit_sum") >= 2.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "dcv_broker_store_commit_failures_total"),
        0.0,
        "{metrics}"
    );

    broker.signal("-KILL");
    broker.exited().await;
    // The close is in PostgreSQL, not in a local file.
    let rows = db
        .connect()
        .await
        .query("SELECT reason FROM holds WHERE server_id = 'pg-1'", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), "kernel patch");

    let broker = start_broker(&db, &dir).await;
    assert_eq!(holds(&broker, "pg-1").await, before, "the close survives");
    broker.terminate().await;
}

#[tokio::test]
async fn the_binary_keeps_reading_when_postgres_goes_away_and_acknowledges_nothing() {
    let mut db = TestDatabase::new().await;
    if !db.owns_server() {
        eprintln!("skipped: DCV_BROKER_TEST_DATABASE_URL's server is not ours to stop");
        return;
    }
    // The test's own server trusts every loopback login, so any password
    // works: the broker must never write it anywhere, at any log level.
    let password = "s3cr3t-pw";
    let url = db
        .url
        .replacen("postgres@", &format!("postgres:{password}@"), 1);
    assert!(url.contains(password));
    let dir = DataDir::new();
    let mut broker = start_broker_on(&url, "debug", &dir).await;
    let mut agent = AgentClient::new(channel(&broker).await);
    agent.register_server(registration("pg-2")).await.unwrap();
    let mut servers = ServersClient::new(channel(&broker).await);
    db.stop_server();
    let result = servers
        .close_servers(pb::CloseServersRequest {
            servers: vec![pb::CloseServerRequestData {
                server_id: "pg-2".into(),
                force: None,
                reason: "never stored".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await;
    match result {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        Ok(reply) => panic!("acknowledged with the database down: {reply:?}"),
    }
    let mut log = broker.lines_until("database unreachable").await;
    // The broker does not exit: it reads from memory and waits for the
    // database (tests/cluster.rs restarts it and writes again).
    let described = servers
        .describe_servers(pb::DescribeServersRequest::default())
        .await
        .expect("reads go on without the database")
        .into_inner();
    // (The refused close may show here until the database returns: a
    // write answered UNAVAILABLE has an unknown outcome, as a lost reply
    // would. The reload on recovery shows what the database holds.)
    assert_eq!(described.servers.len(), 1);
    assert_eq!(described.servers[0].id, "pg-2");
    assert!(
        broker.child.try_wait().unwrap().is_none(),
        "the broker exited"
    );
    log.extend(broker.drain_log());
    assert!(
        log.iter()
            .any(|line| line.contains("store loaded") && line.contains("127.0.0.1")),
        "the log names the database by host: {log:#?}"
    );
    for line in &log {
        assert!(!line.contains(password), "the password was logged: {line}");
    }
}

#[tokio::test]
async fn concurrent_submissions_share_commits() {
    let db = TestDatabase::new().await;
    let (store, _) = open(&db).await;
    let before = store.commits();
    let pending: Vec<_> = (0..200)
        .map(|i| store.submit(vec![Change::PutServer(server(i, Vec::new()))]))
        .collect();
    for durable in pending {
        durable.wait().await.unwrap();
    }
    let commits = store.commits() - before;
    assert!(
        (1..200).contains(&commits),
        "200 queued submissions took {commits} commits"
    );
    store.close().await.unwrap();
    let (_store, found) = open(&db).await;
    assert_eq!(found.servers.len(), 200);
}

/// PostgreSQL's TEXT cannot hold NUL, which the protocol's strings can:
/// a server id with one must be refused at the edge, not reach the store
/// (whose failed write would stop the broker: one bad registration would
/// take the whole service down).
#[tokio::test]
async fn a_nul_in_an_id_is_refused_at_the_edge_and_the_broker_keeps_serving() {
    let db = TestDatabase::new().await;
    let dir = DataDir::new();
    let broker = start_broker(&db, &dir).await;
    let mut agent = AgentClient::new(channel(&broker).await);
    let refused = agent
        .register_server(registration("nul\0id"))
        .await
        .expect_err("a NUL in a server id is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let mut servers = ServersClient::new(channel(&broker).await);
    let reply = servers
        .close_servers(pb::CloseServersRequest {
            servers: vec![pb::CloseServerRequestData {
                server_id: "nul\0id".into(),
                force: None,
                reason: String::new(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await;
    if let Ok(reply) = reply {
        assert_eq!(reply.into_inner().unsuccessful_list.len(), 1);
    }
    agent.register_server(registration("pg-3")).await.unwrap();
    assert!(holds(&broker, "pg-3").await.is_empty(), "still serving");
    broker.terminate().await;
}

/// A leader shutting down cleanly hands its lease over at once (another
/// replica need not wait for it to lapse): after SIGTERM the lease row is
/// expired and held by nobody, though the lease was 30 s long.
#[tokio::test]
async fn a_leader_that_shuts_down_resigns_its_lease() {
    let db = TestDatabase::new().await;
    let dir = DataDir::new();
    let mut args: Vec<&OsStr> = [
        "--database-url",
        db.url.as_str(),
        "--leader-lease",
        "30s",
        "--node-id",
        "leaving",
        "--shutdown-grace",
        "0s",
        "--data-dir",
    ]
    .map(OsStr::new)
    .to_vec();
    args.push(dir.0.as_os_str());
    let mut broker = BrokerProcess::start_exactly(&args).await;
    broker.logged("became leader").await;
    let check = db.connect().await;
    let held = check
        .query_one(
            "SELECT holder, expires_at > clock_timestamp() FROM dcv_broker_leader",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (held.get::<_, String>(0), held.get::<_, bool>(1)),
        ("leaving".to_owned(), true)
    );
    broker.signal("-TERM");
    let mut log = broker.lines_until("resigned the lease").await;
    assert!(broker.exited().await.success());
    log.extend(broker.drain_log());
    let after = check
        .query_one(
            "SELECT holder, expires_at <= clock_timestamp() FROM dcv_broker_leader",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (after.get::<_, String>(0), after.get::<_, bool>(1)),
        (String::new(), true),
        "{log:#?}"
    );
}
