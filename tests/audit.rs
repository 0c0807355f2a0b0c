//! The audit log (acceptance 4 of issue 17): every state-changing call,
//! over gRPC, over REST and through the admin socket, leaves exactly one
//! record with its actor, request id, method and per-item outcomes, in the
//! JSON-lines file and in the store; the file is private from its
//! creation; retention prunes old records.
//!
//! A real broker on 127.0.0.1:0 with authentication on, over a SQLite
//! store in a temporary directory, called by real clients. No sleeps: the
//! file is polled with a deadline, and the pruning task runs on tokio's
//! paused clock.

mod common;

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use common::{agent_process::TempDir, *};
use dcv_broker::{
    BrokerConfig, admin,
    audit::{self, AuditLog, AuditedStore, Destination},
    auth::{Auth, AuthConfig, ScopeSet},
    cluster::{ClusterView, Role},
    fleet::{
        Fleet,
        persist::{AuditItem, AuditRecord, Change, Durable, Store},
    },
    pb::{self, SessionType as Ty},
    store::{
        SqliteStore,
        audit::{AuditFilter, read_sqlite},
    },
};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

/// One call the table made, and the record it must have left.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    request_id: String,
    actor: String,
    method: String,
    /// Each item's id, outcome and reason.
    items: Vec<(String, String, String)>,
}

fn ok(id: &str, reason: &str) -> (String, String, String) {
    (id.into(), AuditItem::OK.into(), reason.into())
}

fn failed(id: &str, code: pb::FailureCode, reason: &str) -> (String, String, String) {
    (id.into(), code.as_str_name().into(), reason.into())
}

/// The record's fields as the table writes them.
fn observed(record: &AuditRecord) -> Expected {
    Expected {
        request_id: record.request_id.clone(),
        actor: record.actor.clone(),
        method: record.method.clone(),
        items: record
            .items
            .iter()
            .map(|i| (i.id.clone(), i.outcome.clone(), i.reason.clone()))
            .collect(),
    }
}

/// A JSON line back as a record (what the table compares).
fn from_line(line: &serde_json::Value) -> Expected {
    let text = |v: &serde_json::Value, key: &str| v[key].as_str().unwrap().to_owned();
    Expected {
        request_id: text(line, "request_id"),
        actor: text(line, "actor"),
        method: text(line, "method"),
        items: line["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| (text(i, "id"), text(i, "outcome"), text(i, "reason")))
            .collect(),
    }
}

/// The file's lines once it holds `n` (or the deadline passes).
async fn lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= n || tokio::time::Instant::now() > deadline {
            return lines;
        }
        // Polling with a deadline: the writer thread flushes on its own.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A REST call with a bearer token: the reply's JSON.
async fn rest(
    addr: std::net::SocketAddr,
    path: &str,
    token: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://{addr}{path}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn every_state_changing_call_leaves_one_record_in_the_file_and_the_store() {
    let dir = TempDir::new("dcv-broker-audit");
    let file = dir.path().join("audit.jsonl");
    let (sqlite, snapshot) = SqliteStore::open(dir.path()).unwrap();
    let log = AuditLog::open(&Destination::File(file.clone())).unwrap();
    let store: Arc<dyn Store> = Arc::new(AuditedStore::new(Arc::new(sqlite.clone()), log));
    let auth = Auth::restore(AuthConfig::default(), store.clone(), &snapshot)
        .await
        .unwrap();
    let config = BrokerConfig {
        auth: Some(auth.clone()),
        ..quiet_config()
    };
    let fleet = Fleet::restore(config.fleet.clone(), store, snapshot).unwrap();
    let mut broker = Broker::start_with(config, fleet).await;

    // Two callers: an operator, and the agent of server s1.
    let (actor, token) = api_client(&auth, "read servers:operate sessions:manage", None).await;
    let (agent_actor, agent_token) = api_client(&auth, "agent", Some("s1")).await;
    let mut agent = broker.agent().await;
    let mut servers = broker.servers().await;
    let mut sessions = broker.sessions().await;
    let mut expected = Vec::new();
    let mut expect = |actor: &str, request_id: &str, method: &str, items| {
        expected.push(Expected {
            request_id: request_id.to_owned(),
            actor: actor.to_owned(),
            method: method.to_owned(),
            items,
        })
    };

    // RegisterServer, and the instruction stream a placement needs.
    let reply = agent
        .register_server(bearer(registration("s1", "linux", 2), &agent_token))
        .await
        .unwrap()
        .into_inner();
    expect(
        &agent_actor,
        &reply.request_id,
        "RegisterServer",
        vec![ok("s1", "new server")],
    );
    let _stream = agent
        .stream_instructions(bearer(
            pb::StreamInstructionsRequest {
                server_id: "s1".into(),
            },
            &agent_token,
        ))
        .await
        .unwrap();

    // CloseServers and OpenServers, each with a failed item.
    let close = close_req(vec![
        close_item("s1", None, "maintenance"),
        close_item("ghost", None, "maintenance"),
    ]);
    let reply = servers
        .close_servers(bearer(close, &token))
        .await
        .unwrap()
        .into_inner();
    let not_found = pb::FailureCode::DcvServerNotFound;
    expect(
        &actor,
        &reply.request_id,
        "CloseServers",
        vec![
            ok("s1", "maintenance"),
            failed(
                "ghost",
                not_found,
                &reply.unsuccessful_list[0].failure_reason,
            ),
        ],
    );
    let reply = servers
        .open_servers(bearer(open_req(&["s1", "ghost"]), &token))
        .await
        .unwrap()
        .into_inner();
    expect(
        &actor,
        &reply.request_id,
        "OpenServers",
        vec![
            ok("s1", ""),
            failed(
                "ghost",
                not_found,
                &reply.unsuccessful_list[0].failure_reason,
            ),
        ],
    );

    // CreateSessions: one placed, one refused (no Windows server).
    let create = create_req(vec![
        create_item("desk", "alice", Ty::Virtual),
        create_item("win", "bob", Ty::Console),
    ]);
    let reply = sessions
        .create_sessions(bearer(create, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reply.successful_list.len(), reply.unsuccessful_list.len()),
        (1, 1),
        "{reply:?}"
    );
    let session_id = reply.successful_list[0].id.clone();
    let refusal = &reply.unsuccessful_list[0];
    let code = pb::FailureCode::try_from(refusal.failure_code).unwrap();
    expect(
        &actor,
        &reply.request_id,
        "CreateSessions",
        vec![
            ok(&session_id, ""),
            failed("", code, &refusal.failure_reason),
        ],
    );

    // UpdateSessionPermissions and DeleteSessions: outcomes as answered.
    let permissions = pb::UpdateSessionPermissionsRequest {
        sessions: vec![pb::UpdateSessionPermissionsRequestData {
            session_id: session_id.clone(),
            owner: "alice".into(),
            permissions_file: "".into(),
        }],
        ..Default::default()
    };
    let reply = sessions
        .update_session_permissions(bearer(permissions, &token))
        .await
        .unwrap()
        .into_inner();
    let item = match (
        reply.successful_list.first(),
        reply.unsuccessful_list.first(),
    ) {
        (Some(_), None) => ok(&session_id, ""),
        (None, Some(f)) => failed(
            &session_id,
            pb::FailureCode::try_from(f.failure_code).unwrap(),
            &f.failure_reason,
        ),
        _ => panic!("{reply:?}"),
    };
    expect(
        &actor,
        &reply.request_id,
        "UpdateSessionPermissions",
        vec![item],
    );
    let delete = pb::DeleteSessionsRequest {
        sessions: vec![
            pb::DeleteSessionRequestData {
                session_id: session_id.clone(),
                owner: "alice".into(),
                force: Some(true),
            },
            pb::DeleteSessionRequestData {
                session_id: "nope".into(),
                owner: "alice".into(),
                force: Some(true),
            },
        ],
        ..Default::default()
    };
    let reply = sessions
        .delete_sessions(bearer(delete, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 1, "{reply:?}");
    let refusal = &reply.unsuccessful_list[0];
    expect(
        &actor,
        &reply.request_id,
        "DeleteSessions",
        vec![
            ok(&session_id, ""),
            failed(
                "nope",
                pb::FailureCode::try_from(refusal.failure_code).unwrap(),
                &refusal.failure_reason,
            ),
        ],
    );

    // A REST route: the same adapter, audited once under the route.
    let reply = rest(
        broker.addr,
        "/closeServers",
        &token,
        serde_json::json!([{"ServerId": "s1", "Reason": "by REST"}]),
    )
    .await;
    let request_id = reply["RequestId"].as_str().unwrap();
    expect(
        &actor,
        request_id,
        "POST /closeServers",
        vec![ok("s1", "by REST")],
    );

    // DeregisterServer: a closed server stays.
    let reply = agent
        .deregister_server(bearer(
            pb::DeregisterServerRequest {
                server_id: "s1".into(),
            },
            &agent_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!reply.removed);
    expect(
        &agent_actor,
        &reply.request_id,
        "DeregisterServer",
        vec![ok("s1", "kept: closed by an operator")],
    );

    // A client registered and revoked through the admin socket's commands.
    let registered = admin::execute(
        &auth,
        &admin::Request::Register {
            name: "ci".into(),
            scopes: ScopeSet::parse("read").unwrap(),
            server_id: None,
        },
    )
    .await
    .unwrap();
    let ci = registered["client"]["client_id"]
        .as_str()
        .unwrap()
        .to_owned();
    admin::execute(
        &auth,
        &admin::Request::Revoke {
            client_id: ci.clone(),
        },
    )
    .await
    .unwrap();
    // Reads change nothing and leave no record.
    servers
        .describe_servers(bearer(describe_ids(&["s1"]), &token))
        .await
        .unwrap();

    let admin_record = |method: &str, reason: &str| Expected {
        request_id: String::new(),
        actor: admin::ADMIN_ACTOR.into(),
        method: method.into(),
        items: vec![ok(&ci, reason)],
    };
    // The operator client registered in-process first: not through the
    // admin commands, so not audited.
    let mut all = expected;
    all.push(admin_record("clients register", "ci (read)"));
    all.push(admin_record("clients revoke", "ci"));

    // The JSON lines: one per call, in order, each as expected.
    let written = lines(&file, all.len()).await;
    let from_file: Vec<Expected> = written.iter().map(from_line).collect();
    assert_eq!(from_file, all);
    for line in &written {
        let time = line["time"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
    }
    let peers = written.iter().filter(|l| l["peer"].is_string()).count();
    assert_eq!(peers, all.len() - 2, "every call but the admin commands");
    // Request ids are unique: exactly one record per call.
    let mut ids: HashMap<&str, usize> = HashMap::new();
    for e in all.iter().filter(|e| !e.request_id.is_empty()) {
        *ids.entry(&e.request_id).or_default() += 1;
    }
    assert!(ids.values().all(|&n| n == 1), "{ids:?}");

    // The store: the same records, read back once the broker stopped.
    broker.stop();
    (&mut broker.task).await.unwrap().unwrap();
    drop(broker);
    sqlite.close().unwrap();
    let stored = read_sqlite(dir.path(), &AuditFilter::default()).unwrap();
    assert_eq!(stored.iter().map(observed).collect::<Vec<_>>(), all);
    // The filters a history API needs: by subject, by actor, by time.
    let about_s1 = read_sqlite(
        dir.path(),
        &AuditFilter {
            subject: Some("s1".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let methods: Vec<&str> = about_s1.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(
        methods,
        [
            "RegisterServer",
            "CloseServers",
            "OpenServers",
            "POST /closeServers",
            "DeregisterServer"
        ]
    );
    let by_admin = read_sqlite(
        dir.path(),
        &AuditFilter {
            actor: Some(admin::ADMIN_ACTOR.into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(by_admin.len(), 2);
    let future = read_sqlite(
        dir.path(),
        &AuditFilter {
            since: Some(SystemTime::now() + Duration::from_secs(60)),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(future.is_empty());
}

#[tokio::test]
async fn the_audit_file_is_private_from_its_creation() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("dcv-broker-audit-mode");
    let path = dir.path().join("audit.jsonl");
    drop(AuditLog::open(&Destination::File(path.clone())).unwrap());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // One others could read is made private before anything is written.
    let loose = dir.path().join("loose.jsonl");
    std::fs::write(&loose, "").unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    drop(AuditLog::open(&Destination::File(loose.clone())).unwrap());
    let mode = std::fs::metadata(&loose).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

fn record(at: SystemTime, id: &str) -> AuditRecord {
    AuditRecord {
        at,
        actor: "someone".into(),
        request_id: id.into(),
        method: "CloseServers".into(),
        peer: None,
        items: vec![AuditItem {
            id: id.into(),
            outcome: AuditItem::OK.into(),
            reason: String::new(),
        }],
    }
}

const DAY: Duration = Duration::from_secs(24 * 3600);

#[tokio::test]
async fn pruning_removes_records_past_the_retention_only() {
    let dir = TempDir::new("dcv-broker-audit-prune");
    let (sqlite, snapshot) = SqliteStore::open(dir.path()).unwrap();
    let now = SystemTime::now();
    let changes = vec![
        Change::PutAudit(record(now - 100 * DAY, "old")),
        Change::PutAudit(record(now - 89 * DAY, "recent")),
        Change::PutAudit(record(now, "new")),
    ];
    sqlite.submit(changes).wait().await.unwrap();
    let fleet = Fleet::restore(Default::default(), Arc::new(sqlite.clone()), snapshot).unwrap();
    fleet.prune_audit(now - 90 * DAY).wait().await.unwrap();
    sqlite.close().unwrap();
    let kept = read_sqlite(dir.path(), &AuditFilter::default()).unwrap();
    let ids: Vec<&str> = kept.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids, ["recent", "new"]);
    // Its subjects went with it.
    let old = read_sqlite(
        dir.path(),
        &AuditFilter {
            subject: Some("old".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(old.is_empty());
}

/// A store that hands every submission to the test.
#[derive(Debug)]
struct Recording(Mutex<tokio::sync::mpsc::UnboundedSender<Vec<Change>>>);

impl Store for Recording {
    fn submit(&self, changes: Vec<Change>) -> Durable {
        let _ = self.0.lock().unwrap().send(changes);
        Durable::done()
    }
}

#[tokio::test(start_paused = true)]
async fn the_pruning_task_prunes_at_start_and_every_period() {
    let (tx, mut submitted) = tokio::sync::mpsc::unbounded_channel();
    let fleet = Fleet::restore(
        Default::default(),
        Arc::new(Recording(Mutex::new(tx))),
        Default::default(),
    )
    .unwrap();
    // The fleet's own start-up keys.
    while let Ok(changes) = submitted.try_recv() {
        assert!(matches!(changes[0], Change::PutSecret { .. }));
    }
    let retention = 90 * DAY;
    let task = tokio::spawn(audit::prune_periodically(
        fleet,
        retention,
        audit::PRUNE_EVERY,
    ));
    for _ in 0..2 {
        let changes = submitted.recv().await.unwrap();
        let [Change::PruneAudit { before }] = changes.as_slice() else {
            panic!("{changes:?}");
        };
        let age = SystemTime::now().duration_since(*before).unwrap();
        assert!(age >= retention && age < retention + Duration::from_secs(60));
        // Nothing more until the period has passed.
        assert!(submitted.try_recv().is_err());
        tokio::time::advance(audit::PRUNE_EVERY).await;
    }
    task.abort();
}

/// A leader's store for [`a_forwarded_write_is_audited_once_on_the_leader`]:
/// keeps nothing, but numbers each submission as one commit and publishes
/// it, as the PostgreSQL writer does (see tests/forward.rs).
#[derive(Debug)]
struct Committing {
    view: ClusterView,
    seq: std::sync::atomic::AtomicU64,
}

impl Store for Committing {
    fn submit(&self, _changes: Vec<Change>) -> Durable {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        self.view.set_committed(seq);
        Durable::done()
    }
}

/// A write through a follower is forwarded with the caller's identity and
/// request id; the leader writes the one record, under that actor and id,
/// and the follower none.
#[tokio::test]
async fn a_forwarded_write_is_audited_once_on_the_leader() {
    let dir = TempDir::new("dcv-broker-audit-forward");
    let file = dir.path().join("leader.jsonl");
    let auth = Auth::in_memory(AuthConfig::default()).await.unwrap();
    let key = [7u8; 32];
    let lview = ClusterView::clustered("leader".into());
    lview.set_forwarding_key(key);
    lview.set_role(Role::Leader);
    let fview = ClusterView::clustered("follower".into());
    fview.set_forwarding_key(key);
    let config = |view: &ClusterView| BrokerConfig {
        auth: Some(auth.clone()),
        cluster: view.clone(),
        ..quiet_config()
    };
    let committing = Arc::new(Committing {
        view: lview.clone(),
        seq: Default::default(),
    });
    let log = AuditLog::open(&Destination::File(file.clone())).unwrap();
    let store = Arc::new(AuditedStore::new(committing, log));
    let leader_fleet = Fleet::restore(config(&lview).fleet, store, Default::default()).unwrap();
    let leader = Broker::start_with(config(&lview), leader_fleet).await;
    // The follower's fleet wants audit records too: it must write none.
    let (tx, mut follower_submitted) = tokio::sync::mpsc::unbounded_channel();
    let follower_fleet = Fleet::restore(
        config(&fview).fleet,
        Arc::new(Recording(Mutex::new(tx))),
        Default::default(),
    )
    .unwrap();
    let follower = Broker::start_with(config(&fview), follower_fleet).await;
    fview.set_role(Role::Follower {
        leader: format!("http://{}", leader.addr),
    });
    // The follower's applied number follows the leader's commits, as the
    // controller's tail of the change log would.
    let replicator = tokio::spawn({
        let (lview, fview) = (lview.clone(), fview.clone());
        async move {
            loop {
                lview
                    .wait_applied(fview.applied() + 1, Duration::from_secs(3600))
                    .await;
                fview.set_applied(lview.committed());
            }
        }
    });
    while follower_submitted.try_recv().is_ok() {}

    let (agent_actor, agent_token) = api_client(&auth, "agent", Some("srv")).await;
    let (actor, token) = api_client(&auth, "servers:operate", None).await;
    let mut agent = follower.agent().await;
    let registered = agent
        .register_server(bearer(registration("srv", "linux", 2), &agent_token))
        .await
        .unwrap()
        .into_inner();
    let mut servers = follower.servers().await;
    let closed = servers
        .close_servers(bearer(
            close_req(vec![close_item("srv", None, "patching")]),
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(closed.successful_list.len(), 1, "{closed:?}");

    let written = lines(&file, 2).await;
    let records: Vec<Expected> = written.iter().map(from_line).collect();
    assert_eq!(
        records,
        [
            Expected {
                request_id: registered.request_id,
                actor: agent_actor,
                method: "RegisterServer".into(),
                items: vec![ok("srv", "new server")],
            },
            Expected {
                request_id: closed.request_id,
                actor,
                method: "CloseServers".into(),
                items: vec![ok("srv", "patching")],
            },
        ]
    );
    // The follower submitted no record (it would have before answering).
    while let Ok(changes) = follower_submitted.try_recv() {
        assert!(
            !changes.iter().any(|c| matches!(c, Change::PutAudit(_))),
            "{changes:?}"
        );
    }
    replicator.abort();
}

/// PostgreSQL keeps the same records (migration 3), found by the same
/// filters, and prunes them alike.
#[tokio::test]
async fn postgres_keeps_finds_and_prunes_records() {
    use dcv_broker::store::{PostgresStore, postgres::Database};
    let db = common::postgres::TestDatabase::new().await;
    let (store, _) = PostgresStore::open(&db.url).await.unwrap();
    let now = dcv_broker::fleet::persist::wall_clock();
    let mut two_items = record(now, "new");
    two_items.items.push(AuditItem {
        id: "ghost".into(),
        outcome: pb::FailureCode::DcvServerNotFound.as_str_name().into(),
        reason: "Dcv server not found.".into(),
    });
    two_items.peer = Some("127.0.0.1:5000".into());
    let changes = vec![
        Change::PutAudit(record(now - 100 * DAY, "old")),
        Change::PutAudit(two_items.clone()),
    ];
    store.submit(changes).wait().await.unwrap();
    let database = Database::connect(&db.url).await.unwrap();
    let all = database
        .audit_records(&AuditFilter::default())
        .await
        .unwrap();
    assert_eq!(all, [record(now - 100 * DAY, "old"), two_items.clone()]);
    let ghost = AuditFilter {
        subject: Some("ghost".into()),
        ..Default::default()
    };
    assert_eq!(
        database.audit_records(&ghost).await.unwrap(),
        [two_items.clone()]
    );
    store
        .submit(vec![Change::PruneAudit {
            before: now - 90 * DAY,
        }])
        .wait()
        .await
        .unwrap();
    let kept = database
        .audit_records(&AuditFilter {
            actor: Some("someone".into()),
            since: Some(now - 200 * DAY),
            limit: Some(10),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(kept, [two_items]);
}

/// A store that wants no audit records: the broker as before the audit log.
#[derive(Debug)]
struct Unaudited(Arc<dyn Store>);

impl Store for Unaudited {
    fn submit(&self, changes: Vec<Change>) -> Durable {
        self.0.submit(changes)
    }

    fn keeps_audit(&self) -> bool {
        false
    }
}

/// What a record costs single-item CloseServers/OpenServers on the SQLite
/// store (fsync per commit): sequential latency and, with 32 callers,
/// throughput, audit on and off. A measurement, not a check:
/// `cargo nextest run --test audit --run-ignored only audit_cost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn audit_cost() {
    for audited in [false, true, false, true] {
        let dir = TempDir::new("dcv-broker-audit-cost");
        let (sqlite, snapshot) = SqliteStore::open(dir.path()).unwrap();
        let store: Arc<dyn Store> = if audited {
            Arc::new(sqlite.clone())
        } else {
            Arc::new(Unaudited(Arc::new(sqlite.clone())))
        };
        let fleet = Fleet::restore(Default::default(), store, snapshot).unwrap();
        let broker = Broker::start_with(quiet_config(), fleet).await;
        let mut agent = broker.agent().await;
        for i in 0..32 {
            register(&mut agent, &format!("s{i}"), "linux", 2).await;
        }
        let round = |mut servers: pb::servers_client::ServersClient<_>, id: String, n: usize| async move {
            for _ in 0..n {
                let close = close_req(vec![close_item(&id, None, "cost")]);
                servers.close_servers(close).await.unwrap();
                servers.open_servers(open_req(&[&id])).await.unwrap();
            }
        };
        let started = std::time::Instant::now();
        round(broker.servers().await, "s0".into(), 200).await;
        let sequential = started.elapsed() / 400;
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        for i in 0..32 {
            tasks.push(tokio::spawn(round(
                broker.servers().await,
                format!("s{i}"),
                50,
            )));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let per_second = 3200.0 / started.elapsed().as_secs_f64();
        println!(
            "audit {}: sequential {sequential:?} per call; 32 callers {per_second:.0} calls/s",
            if audited { "on " } else { "off" }
        );
    }
}

/// The binary wires it up: `--audit-log FILE` with the SQLite store, and
/// without authentication every record's actor is `anonymous`.
#[tokio::test]
async fn the_binary_writes_the_file_and_the_store() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("dcv-broker-audit-binary");
    let file = dir.path().join("audit.jsonl");
    let data = dir.path().join("data");
    let broker = common::process::BrokerProcess::start_exactly(&[
        "--data-dir".as_ref(),
        data.as_os_str(),
        "--audit-log".as_ref(),
        file.as_os_str(),
    ])
    .await;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", broker.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut agent = pb::agent_client::AgentClient::new(channel.clone());
    let registered = agent
        .register_server(registration("s1", "linux", 2))
        .await
        .unwrap()
        .into_inner();
    let mut servers = pb::servers_client::ServersClient::new(channel);
    let closed = servers
        .close_servers(close_req(vec![close_item("s1", None, "patch")]))
        .await
        .unwrap()
        .into_inner();
    let expected = [
        Expected {
            request_id: registered.request_id,
            actor: dcv_broker::api::ANONYMOUS_ACTOR.into(),
            method: "RegisterServer".into(),
            items: vec![ok("s1", "new server")],
        },
        Expected {
            request_id: closed.request_id,
            actor: dcv_broker::api::ANONYMOUS_ACTOR.into(),
            method: "CloseServers".into(),
            items: vec![ok("s1", "patch")],
        },
    ];
    let written = lines(&file, 2).await;
    assert_eq!(written.iter().map(from_line).collect::<Vec<_>>(), expected);
    broker.terminate().await;
    let stored = read_sqlite(&data, &AuditFilter::default()).unwrap();
    assert_eq!(stored.iter().map(observed).collect::<Vec<_>>(), expected);
}

/// The broker's own acts are audited like callers' (issue 19's history
/// reads them): a server whose agent stays silent past the removal
/// timeout leaves the fleet with a `ServerRemoved` record by `broker`,
/// one per sweep, naming each server removed and why.
#[tokio::test(start_paused = true)]
async fn a_server_forgotten_for_silence_is_audited_by_the_broker() {
    let dir = TempDir::new("audit-removed");
    let fleet_config = dcv_broker::fleet::FleetConfig {
        unreachable_after: Duration::from_secs(60),
        remove_after: Duration::from_secs(600),
        ..Default::default()
    };
    let (store, snapshot) = SqliteStore::open(dir.path()).unwrap();
    let fleet = Fleet::restore(fleet_config.clone(), Arc::new(store), snapshot).unwrap();
    let mut broker = Broker::start_with(
        BrokerConfig {
            fleet: fleet_config,
            ..quiet_config()
        },
        fleet,
    )
    .await;
    let mut agent = broker.agent().await;
    register(&mut agent, "quiet-1", "linux", 4).await;
    register(&mut agent, "quiet-2", "linux", 4).await;
    let mut servers = broker.servers().await;
    // A describe runs what is due, the removal included.
    let mut known_after = async |seconds| {
        tokio::time::advance(Duration::from_secs(seconds)).await;
        let all = servers
            .describe_servers(pb::DescribeServersRequest::default())
            .await
            .unwrap()
            .into_inner();
        all.servers.len()
    };
    assert_eq!(known_after(599).await, 2, "not yet");
    assert_eq!(known_after(2).await, 0, "forgotten");
    drop((agent, servers));
    broker.stop();
    (&mut broker.task).await.unwrap().unwrap();
    // The fleet, and with it the store, closes with the broker.
    drop(broker);

    let records = read_sqlite(dir.path(), &AuditFilter::default()).unwrap();
    let removed: Vec<_> = records
        .iter()
        .filter(|r| r.method == "ServerRemoved")
        .collect();
    assert_eq!(removed.len(), 1, "{records:?}");
    assert_eq!(removed[0].actor, "broker");
    let mut ids: Vec<_> = removed[0].items.iter().map(|i| i.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["quiet-1", "quiet-2"]);
    assert!(
        removed[0].items[0].reason.contains("10m"),
        "{:?}",
        removed[0].items
    );
    assert_eq!(removed[0].items[0].outcome, AuditItem::OK);
}
