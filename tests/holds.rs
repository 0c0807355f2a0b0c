//! Safe closes (issue 18): named holds by several actors, holds that
//! expire on tokio's clock and across restarts, dry runs that change
//! nothing and predict the real call, ExpectedStateVersion, and capacity
//! floors. A real broker on 127.0.0.1:0, called over gRPC.

mod common;

use std::{sync::Arc, time::Duration};

use common::{agent_process::TempDir, *};
use dcv_broker::{
    BrokerConfig,
    auth::{Auth, AuthConfig, ScopeSet},
    fleet::{CapacityFloor, Fleet, FleetConfig},
    pb::{self, servers_client::ServersClient},
    store::{
        SqliteStore,
        audit::{AuditFilter, read_sqlite},
    },
};
use tonic::{metadata::MetadataValue, transport::Channel};

/// Long enough that no server becomes unreachable or is forgotten while a
/// test advances the paused clock past an expiry.
fn patient() -> FleetConfig {
    FleetConfig {
        unreachable_after: Duration::from_secs(30 * 24 * 3600),
        remove_after: Duration::from_secs(60 * 24 * 3600),
        ..FleetConfig::default()
    }
}

fn config(fleet: FleetConfig) -> BrokerConfig {
    BrokerConfig {
        fleet,
        ..quiet_config()
    }
}

fn hold_item(id: &str, hold: &str, reason: &str) -> pb::CloseServerRequestData {
    pb::CloseServerRequestData {
        server_id: id.into(),
        reason: reason.into(),
        hold_name: (!hold.is_empty()).then(|| hold.into()),
        force: Some(true),
        ..Default::default()
    }
}

fn open_item(id: &str, hold: &str) -> pb::OpenServerRequestData {
    pb::OpenServerRequestData {
        server_id: id.into(),
        hold_name: (!hold.is_empty()).then(|| hold.into()),
        ..Default::default()
    }
}

fn opens(items: Vec<pb::OpenServerRequestData>) -> pb::OpenServersRequest {
    pb::OpenServersRequest {
        servers: items,
        ..Default::default()
    }
}

/// A blast radius's server: id, available before and after, sessions.
type Affected<'a> = (&'a str, bool, bool, Vec<(&'a str, &'a str, i32)>);

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    request
}

fn hold_names(server: &pb::Server) -> Vec<(String, String)> {
    server
        .holds
        .iter()
        .map(|h| (h.name.clone(), h.actor.clone()))
        .collect()
}

fn is_available(server: &pb::Server) -> bool {
    server.availability == pb::Availability::Available as i32
}

/// A pool-tagged registration.
fn pooled(id: &str, pool: &str) -> pb::RegisterServerRequest {
    let mut r = registration(id, "linux", 4);
    r.tags.push(pb::KeyValuePair {
        key: "pool".into(),
        value: pool.into(),
    });
    r
}

/// A new client with `scopes` (for `server`, an agent's) and a bearer
/// token for it.
async fn token(auth: &Auth, name: &str, scopes: &str, server: Option<&str>) -> (String, String) {
    let registered = auth
        .register(name, ScopeSet::parse(scopes).unwrap(), server)
        .await
        .unwrap();
    let issued = auth
        .issue_token(&registered.client.id, &registered.secret, None)
        .await
        .unwrap();
    (registered.client.id, issued.access_token)
}

#[tokio::test]
async fn two_actors_holds_keep_a_server_closed_until_both_are_opened() {
    let auth = Auth::in_memory(AuthConfig::default()).await.unwrap();
    let broker = Broker::start(BrokerConfig {
        auth: Some(auth.clone()),
        ..config(patient())
    })
    .await;
    let operators = "read servers:operate";
    let (network_id, network) = token(&auth, "network team", operators, None).await;
    let (storage_id, storage) = token(&auth, "storage team", operators, None).await;
    let (_, agent_token) = token(&auth, "agent", "agent", Some("s1")).await;
    let mut agent = broker.agent().await;
    agent
        .register_server(with_token(registration("s1", "linux", 4), &agent_token))
        .await
        .unwrap();
    let mut servers = broker.servers().await;

    for (who, hold) in [(&network, "net-upgrade"), (&storage, "disk-swap")] {
        let reply = servers
            .close_servers(with_token(
                close_req(vec![hold_item("s1", hold, "maintenance")]),
                who,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.successful_list.len(), 1, "{reply:?}");
    }
    let described = servers
        .describe_servers(with_token(describe_ids(&["s1"]), &network))
        .await
        .unwrap()
        .into_inner()
        .servers;
    assert_eq!(
        hold_names(&described[0]),
        vec![
            ("net-upgrade".to_owned(), network_id.clone()),
            ("disk-swap".to_owned(), storage_id.clone())
        ]
    );

    // The network team is done: its hold goes, the server stays closed,
    // and the reply says whose hold remains.
    let reply = servers
        .open_servers(with_token(
            opens(vec![open_item("s1", "net-upgrade")]),
            &network,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.successful_list.is_empty());
    let failed = &reply.unsuccessful_list[0];
    assert_eq!(failed.failure_code, pb::FailureCode::HoldsRemain as i32);
    assert!(
        failed.failure_reason.contains("\"disk-swap\"")
            && failed.failure_reason.contains(&storage_id)
            && !failed.failure_reason.contains("\"net-upgrade\" ("),
        "{}",
        failed.failure_reason
    );
    let s1 = servers
        .describe_servers(with_token(describe_ids(&["s1"]), &network))
        .await
        .unwrap()
        .into_inner()
        .servers
        .remove(0);
    assert!(!is_available(&s1));
    assert_eq!(
        hold_names(&s1),
        vec![("disk-swap".to_owned(), storage_id.clone())]
    );

    // Opening without a name removes the default hold, which is not there.
    let reply = servers
        .open_servers(with_token(open_req(&["s1"]), &network))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.unsuccessful_list[0].failure_code,
        pb::FailureCode::HoldsRemain as i32
    );

    let reply = servers
        .open_servers(with_token(
            opens(vec![open_item("s1", "disk-swap")]),
            &storage,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 1, "{reply:?}");
    let s1 = servers
        .describe_servers(with_token(describe_ids(&["s1"]), &storage))
        .await
        .unwrap()
        .into_inner()
        .servers
        .remove(0);
    assert!(is_available(&s1), "{s1:?}");
    assert!(s1.holds.is_empty());
}

#[tokio::test]
async fn dcv_style_closes_and_opens_use_the_default_hold() {
    let broker = Broker::start(config(patient())).await;
    let mut agent = broker.agent().await;
    register(&mut agent, "s1", "linux", 4).await;
    let mut servers = broker.servers().await;
    // Closing twice keeps one hold, as DCV's closed flag.
    for _ in 0..2 {
        let reply = servers
            .close_servers(close_req(vec![close_item("s1", None, "")]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.successful_list.len(), 1);
        assert_eq!(reply.dry_run, None);
        assert_eq!(reply.blast_radius, None);
    }
    let s1 = describe_one(&mut servers, "s1").await;
    assert_eq!(
        hold_names(&s1),
        vec![("default".into(), "anonymous".into())]
    );
    assert!(s1.holds[0].expiration_time.is_none());
    let reply = servers
        .open_servers(open_req(&["s1"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 1);
    assert!(is_available(&describe_one(&mut servers, "s1").await));
    // Opening an open server succeeds, whatever the name.
    let reply = servers
        .open_servers(opens(vec![open_item("s1", "anything")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 1);
}

#[tokio::test]
async fn malformed_holds_fail_per_item() {
    let broker = Broker::start(config(patient())).await;
    let mut agent = broker.agent().await;
    register(&mut agent, "s1", "linux", 4).await;
    let mut servers = broker.servers().await;
    let expiring_in = |seconds: i64| pb::CloseServerRequestData {
        expires_in: Some(prost_types::Duration { seconds, nanos: 0 }),
        ..hold_item("s1", "x", "")
    };
    let items = vec![
        hold_item("s1", "has space", ""),
        hold_item("s1", &"a".repeat(65), ""),
        expiring_in(0),
        expiring_in(-5),
        expiring_in(400 * 24 * 3600),
        pb::CloseServerRequestData {
            expires_at: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            ..hold_item("s1", "y", "")
        },
        pb::CloseServerRequestData {
            expires_at: Some(prost_types::Timestamp {
                seconds: 4_000_000_000,
                nanos: 0,
            }),
            expires_in: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            ..hold_item("s1", "z", "")
        },
    ];
    for item in &items {
        let reply = servers
            .close_servers(close_req(vec![item.clone()]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            reply.unsuccessful_list[0].failure_code,
            pb::FailureCode::InvalidHold as i32,
            "{item:?}: {reply:?}"
        );
        assert_eq!(
            reply.unsuccessful_list[0]
                .close_server_request_data
                .as_ref(),
            Some(item),
            "the failed item is echoed as given"
        );
    }
    assert!(is_available(&describe_one(&mut servers, "s1").await));

    // The same items in one batch, each on a server of its own, between
    // items without an expiry that succeed or fail: every failed item's
    // echo is its own, expiry included.
    let mut batch = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let (id, fine) = (format!("m{i}"), format!("f{i}"));
        register(&mut agent, &id, "linux", 4).await;
        register(&mut agent, &fine, "linux", 4).await;
        batch.push(hold_item(&fine, "fine", ""));
        batch.push(pb::CloseServerRequestData {
            server_id: id,
            ..item
        });
    }
    batch.push(hold_item("unknown", "", ""));
    let reply = servers
        .close_servers(close_req(batch.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 7, "{reply:?}");
    let echoed: Vec<_> = reply
        .unsuccessful_list
        .iter()
        .map(|f| f.close_server_request_data.clone().unwrap())
        .collect();
    let mut failed: Vec<_> = batch.iter().skip(1).step_by(2).cloned().collect();
    failed.extend(batch.last().cloned());
    assert_eq!(echoed, failed);
    assert!(
        reply
            .unsuccessful_list
            .iter()
            .take(7)
            .all(|f| f.failure_code == pb::FailureCode::InvalidHold as i32),
        "{reply:?}"
    );

    // At most 16 holds on one server.
    let many: Vec<_> = (0..16)
        .map(|i| hold_item("s1", &format!("h{i}"), ""))
        .collect();
    for item in many {
        let reply = servers
            .close_servers(close_req(vec![item]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.successful_list.len(), 1);
    }
    let reply = servers
        .close_servers(close_req(vec![hold_item("s1", "one-too-many", "")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.unsuccessful_list[0].failure_code,
        pb::FailureCode::InvalidHold as i32
    );
}

fn expiring(id: &str, hold: &str, seconds: i64) -> pb::CloseServerRequestData {
    pb::CloseServerRequestData {
        expires_in: Some(prost_types::Duration { seconds, nanos: 0 }),
        ..hold_item(id, hold, "patching")
    }
}

#[tokio::test(start_paused = true)]
async fn an_expiring_hold_reopens_its_server_exactly_on_time() {
    let broker = Broker::start(config(patient())).await;
    let mut agent = broker.agent().await;
    register(&mut agent, "s1", "linux", 4).await;
    register(&mut agent, "s2", "linux", 4).await;
    let mut servers = broker.servers().await;
    let reply = servers
        .close_servers(close_req(vec![
            expiring("s1", "window", 3600),
            expiring("s2", "window", 3600),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 2, "{reply:?}");
    // One server appears once per batch: another hold is another call.
    let reply = servers
        .close_servers(close_req(vec![hold_item("s2", "keep", "stays")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 1, "{reply:?}");
    let before = describe_one(&mut servers, "s1").await;
    let expires = before.holds[0].expiration_time.unwrap();
    let created = before.holds[0].creation_time.unwrap();
    assert!(
        (3599..=3601).contains(&(expires.seconds - created.seconds)),
        "{before:?}"
    );

    tokio::time::advance(Duration::from_millis(3_599_990)).await;
    assert!(!is_available(&describe_one(&mut servers, "s1").await));
    tokio::time::advance(Duration::from_millis(10)).await;
    let s1 = describe_one(&mut servers, "s1").await;
    assert!(is_available(&s1), "{s1:?}");
    assert!(s1.holds.is_empty());
    assert_ne!(s1.state_version, before.state_version);
    // The other hold keeps s2 closed.
    let s2 = describe_one(&mut servers, "s2").await;
    assert!(!is_available(&s2));
    assert_eq!(hold_names(&s2), vec![("keep".into(), "anonymous".into())]);
}

/// A broker over the SQLite store in `dir`, on the paused clock.
async fn durable_broker(dir: &TempDir) -> Broker {
    let (store, snapshot) = SqliteStore::open(dir.path()).unwrap();
    let fleet = Fleet::restore(patient(), Arc::new(store), snapshot).unwrap();
    Broker::start_with(config(patient()), fleet).await
}

async fn stop(mut broker: Broker) {
    broker.stop();
    (&mut broker.task).await.unwrap().unwrap();
    drop(broker);
}

#[tokio::test(start_paused = true)]
async fn an_expiring_hold_ends_after_a_restart_and_its_end_is_durable_and_audited() {
    let dir = TempDir::new("holds-restart");
    let broker = durable_broker(&dir).await;
    let mut agent = broker.agent().await;
    register(&mut agent, "s1", "linux", 4).await;
    let mut servers = broker.servers().await;
    let reply = servers
        .close_servers(close_req(vec![expiring("s1", "window", 3600)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 1);
    let closed = describe_one(&mut servers, "s1").await;
    drop((agent, servers));
    stop(broker).await;

    tokio::time::advance(Duration::from_secs(1800)).await;
    let broker = durable_broker(&dir).await;
    let mut servers = broker.servers().await;
    let s1 = describe_one(&mut servers, "s1").await;
    assert_eq!(s1.holds, closed.holds, "the hold and its expiry are kept");
    assert_eq!(s1.state_version, closed.state_version);
    assert!(!is_available(&s1));
    // The expiry is a wall time: the half hour that passed while the
    // broker was down does not count again, but the restarted broker's
    // clock starts from the wall clock, which the paused test clock does
    // not move; so the whole hour is still ahead on tokio's clock.
    tokio::time::advance(Duration::from_secs(3600)).await;
    let s1 = describe_one(&mut servers, "s1").await;
    assert!(s1.holds.is_empty(), "{s1:?}");
    assert!(
        !s1.unavailability_reasons
            .contains(&(pb::UnavailabilityReason::ServerClosed as i32))
    );
    drop(servers);
    stop(broker).await;

    let broker = durable_broker(&dir).await;
    let mut servers = broker.servers().await;
    let s1 = describe_one(&mut servers, "s1").await;
    assert!(
        s1.holds.is_empty(),
        "the end of the hold was stored: {s1:?}"
    );
    drop(servers);
    stop(broker).await;

    let records = read_sqlite(dir.path(), &AuditFilter::default()).unwrap();
    let expired: Vec<_> = records
        .iter()
        .filter(|r| r.method == "HoldExpired")
        .collect();
    assert_eq!(expired.len(), 1, "{records:?}");
    assert_eq!(expired[0].actor, "broker");
    assert_eq!(expired[0].items[0].id, "s1");
    assert!(
        expired[0].items[0].reason.contains("\"window\""),
        "{:?}",
        expired[0].items
    );
}

#[tokio::test]
async fn dry_runs_change_nothing_report_the_blast_radius_and_predict_the_real_call() {
    let dir = TempDir::new("holds-dry-run");
    let fleet_config = FleetConfig {
        capacity_floors: vec![CapacityFloor::parse("tag:pool=gpu:1").unwrap()],
        ..patient()
    };
    let (store, snapshot) = SqliteStore::open(dir.path()).unwrap();
    let fleet = Fleet::restore(fleet_config.clone(), Arc::new(store), snapshot).unwrap();
    let broker = Broker::start_with(config(fleet_config), fleet).await;
    let mut agent = broker.agent().await;
    for (id, pool) in [
        ("g1", "gpu"),
        ("g2", "gpu"),
        ("g3", "gpu"),
        ("c1", "cpu"),
        ("c2", "cpu"),
    ] {
        agent.register_server(pooled(id, pool)).await.unwrap();
    }
    // g1 runs two sessions, c1 one.
    agent
        .heartbeat(beat(
            "g1",
            vec![
                session("v1", pb::SessionType::Virtual, pb::SessionState::Ready),
                session("v2", pb::SessionType::Virtual, pb::SessionState::Ready),
            ],
        ))
        .await
        .unwrap();
    agent
        .heartbeat(beat(
            "c1",
            vec![session(
                "c",
                pb::SessionType::Virtual,
                pb::SessionState::Ready,
            )],
        ))
        .await
        .unwrap();
    let mut servers = broker.servers().await;
    let all = ["c1", "c2", "g1", "g2", "g3"];
    let g3_version = describe_one(&mut servers, "g3").await.state_version;
    let items = vec![
        // Forced: its two sessions keep running.
        hold_item("g1", "", "swap"),
        // Not forced, with a session: refused.
        close_item("c1", None, ""),
        hold_item("g2", "", ""),
        // After g1 and g2, gpu has one AVAILABLE server left, its floor.
        hold_item("g3", "", ""),
        hold_item("nope", "", ""),
        pb::CloseServerRequestData {
            expected_state_version: Some(g3_version + 1000),
            ..hold_item("c2", "", "")
        },
    ];
    let before = servers
        .describe_servers(describe_ids(&all))
        .await
        .unwrap()
        .into_inner()
        .servers;
    let dry = servers
        .close_servers(pb::CloseServersRequest {
            servers: items.clone(),
            dry_run: true,
            capacity_tag_key: "pool".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dry.dry_run, Some(true));
    let after = servers
        .describe_servers(describe_ids(&all))
        .await
        .unwrap()
        .into_inner()
        .servers;
    assert_eq!(before, after, "a dry run changes nothing");
    let ok: Vec<&str> = dry
        .successful_list
        .iter()
        .map(|s| s.server_id.as_str())
        .collect();
    assert_eq!(ok, ["g1", "g2"]);
    let failed: Vec<(&str, i32)> = dry
        .unsuccessful_list
        .iter()
        .map(|f| {
            (
                f.close_server_request_data
                    .as_ref()
                    .unwrap()
                    .server_id
                    .as_str(),
                f.failure_code,
            )
        })
        .collect();
    assert_eq!(
        failed,
        [
            ("c1", pb::FailureCode::DcvServerHasRunningSessions as i32),
            ("g3", pb::FailureCode::CapacityFloor as i32),
            ("nope", pb::FailureCode::DcvServerNotFound as i32),
            ("c2", pb::FailureCode::StateVersionMismatch as i32),
        ]
    );
    let floor = &dry.unsuccessful_list[1].failure_reason;
    assert!(
        floor.contains("tag:pool=gpu")
            && floor.contains("with 0 AVAILABLE")
            && floor.contains("floor of 1"),
        "{floor}"
    );
    let radius = dry.blast_radius.clone().unwrap();
    let affected: Vec<Affected<'_>> = radius
        .servers
        .iter()
        .map(|s| {
            (
                s.server_id.as_str(),
                s.available_before,
                s.available_after,
                s.sessions
                    .iter()
                    .map(|x| (x.id.as_str(), x.owner.as_str(), x.r#type))
                    .collect(),
            )
        })
        .collect();
    let virt = pb::SessionType::Virtual as i32;
    assert_eq!(
        affected,
        vec![
            (
                "g1",
                true,
                false,
                vec![("v1", "alice", virt), ("v2", "alice", virt)]
            ),
            ("g2", true, false, vec![]),
        ]
    );
    let pools: Vec<(&str, &str, i32, i32)> = radius
        .pools
        .iter()
        .map(|p| {
            (
                p.tag_key.as_str(),
                p.tag_value.as_str(),
                p.available_before,
                p.available_after,
            )
        })
        .collect();
    assert_eq!(pools, [("pool", "cpu", 2, 2), ("pool", "gpu", 3, 1)]);
    let overall = radius.overall.unwrap();
    assert_eq!((overall.available_before, overall.available_after), (5, 3));

    // The real call gives the same per-item results.
    let real = servers
        .close_servers(close_req(items))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(real.dry_run, None);
    assert_eq!(real.blast_radius, None);
    assert_eq!(real.successful_list, dry.successful_list);
    assert_eq!(real.unsuccessful_list, dry.unsuccessful_list);
    let closed: Vec<bool> = servers
        .describe_servers(describe_ids(&all))
        .await
        .unwrap()
        .into_inner()
        .servers
        .iter()
        .map(|s| !s.holds.is_empty())
        .collect();
    assert_eq!(closed, [false, false, true, true, false]);

    // An open's dry run: g1 would be AVAILABLE again, gpu back to 2.
    let dry = servers
        .open_servers(pb::OpenServersRequest {
            servers: vec![open_item("g1", ""), open_item("c2", "")],
            dry_run: true,
            capacity_tag_key: "pool".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dry.successful_list.len(), 2);
    let radius = dry.blast_radius.unwrap();
    let gpu = radius.pools.iter().find(|p| p.tag_value == "gpu").unwrap();
    assert_eq!((gpu.available_before, gpu.available_after), (1, 2));
    assert!(!describe_one(&mut servers, "g1").await.holds.is_empty());
    drop((agent, servers));
    stop(broker).await;

    // Only the real call was audited, and only it was stored.
    let methods: Vec<String> = read_sqlite(dir.path(), &AuditFilter::default())
        .unwrap()
        .into_iter()
        .map(|r| r.method)
        .filter(|m| m.ends_with("Servers"))
        .collect();
    assert_eq!(methods, ["CloseServers"]);
    let broker = durable_broker(&dir).await;
    let mut servers = broker.servers().await;
    let closed: Vec<bool> = servers
        .describe_servers(describe_ids(&all))
        .await
        .unwrap()
        .into_inner()
        .servers
        .iter()
        .map(|s| !s.holds.is_empty())
        .collect();
    assert_eq!(closed, [false, false, true, true, false]);
}

#[tokio::test]
async fn expected_state_versions_guard_read_decide_write() {
    let broker = Broker::start(config(patient())).await;
    let mut agent = broker.agent().await;
    register(&mut agent, "s1", "linux", 4).await;
    register(&mut agent, "s2", "linux", 4).await;
    let mut servers = broker.servers().await;
    let v1 = describe_one(&mut servers, "s1").await.state_version;
    let v2 = describe_one(&mut servers, "s2").await.state_version;
    assert_ne!(v1, v2, "versions never repeat across servers");

    let reply = servers
        .close_servers(close_req(vec![
            pb::CloseServerRequestData {
                expected_state_version: Some(v1 + 1),
                ..hold_item("s1", "", "")
            },
            pb::CloseServerRequestData {
                expected_state_version: Some(v2),
                ..hold_item("s2", "", "")
            },
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 1);
    assert_eq!(reply.successful_list[0].server_id, "s2");
    let failed = &reply.unsuccessful_list[0];
    assert_eq!(
        failed.failure_code,
        pb::FailureCode::StateVersionMismatch as i32
    );
    assert_eq!(
        failed
            .close_server_request_data
            .as_ref()
            .unwrap()
            .expected_state_version,
        Some(v1 + 1)
    );
    assert!(failed.failure_reason.contains(&v1.to_string()));
    assert!(describe_one(&mut servers, "s1").await.holds.is_empty());
    let s2 = describe_one(&mut servers, "s2").await;
    assert!(s2.state_version > v2);

    // A stale version cannot open it; the current one can.
    let stale = pb::OpenServerRequestData {
        expected_state_version: Some(v2),
        ..open_item("s2", "")
    };
    let reply = servers
        .open_servers(opens(vec![stale]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.unsuccessful_list[0].failure_code,
        pb::FailureCode::StateVersionMismatch as i32
    );
    let current = pb::OpenServerRequestData {
        expected_state_version: Some(s2.state_version),
        ..open_item("s2", "")
    };
    let reply = servers
        .open_servers(opens(vec![current]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 1);
    // A close that changes nothing (the hold is there) keeps the version.
    let v = describe_one(&mut servers, "s1").await.state_version;
    let _ = servers
        .close_servers(close_req(vec![hold_item("s1", "a", "")]))
        .await
        .unwrap();
    let v_closed = describe_one(&mut servers, "s1").await.state_version;
    assert!(v_closed > v);
    let _ = servers
        .close_servers(close_req(vec![hold_item("s1", "a", "")]))
        .await
        .unwrap();
    assert_eq!(
        describe_one(&mut servers, "s1").await.state_version,
        v_closed
    );
}

#[tokio::test]
async fn capacity_floors_refuse_the_items_that_cross_them_unless_overridden() {
    let fleet_config = FleetConfig {
        capacity_floors: vec![
            CapacityFloor::parse("tag:pool=gpu:2").unwrap(),
            CapacityFloor::parse("tag:city=London:1").unwrap(),
        ],
        ..patient()
    };
    let broker = Broker::start(config(fleet_config)).await;
    let mut agent = broker.agent().await;
    for (id, pool) in [("g1", "gpu"), ("g2", "gpu"), ("g3", "gpu"), ("g4", "gpu")] {
        agent.register_server(pooled(id, pool)).await.unwrap();
    }
    let mut servers: ServersClient<Channel> = broker.servers().await;
    let reply = servers
        .close_servers(close_req(vec![
            hold_item("g1", "", ""),
            hold_item("g2", "", ""),
            hold_item("g3", "", ""),
            hold_item("g4", "", ""),
        ]))
        .await
        .unwrap()
        .into_inner();
    let ok: Vec<&str> = reply
        .successful_list
        .iter()
        .map(|s| s.server_id.as_str())
        .collect();
    assert_eq!(ok, ["g1", "g2"]);
    for failed in &reply.unsuccessful_list {
        assert_eq!(failed.failure_code, pb::FailureCode::CapacityFloor as i32);
        assert!(
            failed
                .failure_reason
                .contains("tag:pool=gpu with 1 AVAILABLE server(s), below its floor of 2"),
            "{}",
            failed.failure_reason
        );
    }
    // Another hold on a closed server takes no capacity: allowed.
    let reply = servers
        .close_servers(close_req(vec![hold_item("g1", "second", "")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 1);
    // Overridden: g3 closes; g4 then crosses the city floor of 1 too.
    let overriding = |id: &str| pb::CloseServerRequestData {
        override_capacity_floor: Some(true),
        ..hold_item(id, "", "")
    };
    let reply = servers
        .close_servers(close_req(vec![overriding("g3")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 1);
    let reply = servers
        .close_servers(close_req(vec![hold_item("g4", "", "")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.unsuccessful_list[0].failure_code,
        pb::FailureCode::CapacityFloor as i32
    );
    assert_eq!(
        reply.unsuccessful_list[0]
            .close_server_request_data
            .as_ref()
            .unwrap()
            .override_capacity_floor,
        None
    );
    assert!(is_available(&describe_one(&mut servers, "g4").await));
}
