//! DescribeServerHistory (acceptance 4 of issue 19): who closed a server,
//! when and why, answered after it was reopened and after a restart; the
//! broker's own notes of an agent's silence and return; pagination in both
//! directions, filters, and the errors of a malformed query; the stores'
//! readers page by time and by size alike, SQLite's through its running
//! writer and PostgreSQL's on any replica.
//!
//! Real brokers on 127.0.0.1:0 over a SQLite store in a temporary
//! directory, called by tonic clients; PostgreSQL started by the test.
//! No sleeps: silence is made on tokio's paused clock.

mod common;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use common::{agent_process::TempDir, *};
use dcv_broker::{
    BrokerConfig,
    auth::{Auth, AuthConfig},
    fleet::{
        Fleet, FleetConfig,
        persist::{AuditFilter, AuditItem, AuditPage, AuditRecord, Change, Store},
    },
    pb,
    store::SqliteStore,
};
use tonic::Code;

/// A broker with authentication over the SQLite store in `dir`, as a
/// restart finds it.
async fn durable_broker(dir: &std::path::Path, fleet: FleetConfig) -> (Broker, Auth) {
    let (sqlite, snapshot) = SqliteStore::open(dir).unwrap();
    let store: Arc<dyn Store> = Arc::new(sqlite);
    let auth = Auth::restore(AuthConfig::default(), store.clone(), &snapshot)
        .await
        .unwrap();
    let config = BrokerConfig {
        auth: Some(auth.clone()),
        fleet,
        ..quiet_config()
    };
    let fleet = Fleet::restore(config.fleet.clone(), store, snapshot).unwrap();
    (Broker::start_with(config, fleet).await, auth)
}

/// Stops `broker` and waits until it is done; its fleet, and with it the
/// store, closes as it is dropped.
async fn stop(mut broker: Broker) {
    broker.stop();
    (&mut broker.task).await.unwrap().unwrap();
}

/// Every page of `request`'s history, walked with its tokens.
async fn walk(
    servers: &mut pb::servers_client::ServersClient<tonic::transport::Channel>,
    token: &str,
    request: pb::DescribeServerHistoryRequest,
) -> (Vec<pb::HistoryRecord>, usize) {
    let mut records = Vec::new();
    let mut pages = 0;
    let mut next_token = String::new();
    loop {
        let page = servers
            .describe_server_history(bearer(
                pb::DescribeServerHistoryRequest {
                    next_token: next_token.clone(),
                    ..request.clone()
                },
                token,
            ))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(!page.request_id.is_empty());
        records.extend(page.records);
        if page.next_token.is_empty() {
            return (records, pages);
        }
        next_token = page.next_token;
    }
}

fn history_of(id: &str) -> pb::DescribeServerHistoryRequest {
    pb::DescribeServerHistoryRequest {
        server_id: id.into(),
        ..Default::default()
    }
}

fn methods(records: &[pb::HistoryRecord]) -> Vec<&str> {
    records.iter().map(|r| r.method.as_str()).collect()
}

fn time(record: &pb::HistoryRecord) -> SystemTime {
    SystemTime::try_from(record.time.unwrap()).unwrap()
}

#[tokio::test]
async fn who_closed_a_server_is_answered_after_it_reopened_and_after_a_restart() {
    let dir = TempDir::new("history-who");
    let (broker, auth) = durable_broker(dir.path(), FleetConfig::default()).await;
    let (alice, alice_token) = api_client(&auth, "read servers:operate", None).await;
    let (bob, bob_token) = api_client(&auth, "read servers:operate", None).await;
    let (_, agent_token) = api_client(&auth, "agent", Some("s1")).await;
    let (_, agent2_token) = api_client(&auth, "agent", Some("s2")).await;
    let mut agent = broker.agent().await;
    for (id, token) in [("s1", &agent_token), ("s2", &agent2_token)] {
        agent
            .register_server(bearer(registration(id, "linux", 2), token))
            .await
            .unwrap();
    }
    let mut servers = broker.servers().await;
    let before = SystemTime::now();
    let closed = servers
        .close_servers(bearer(
            close_req(vec![
                close_item("s2", None, "kernel patch"),
                close_item("s1", None, "kernel patch"),
            ]),
            &alice_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(closed.successful_list.len(), 2);
    let after = SystemTime::now();
    let opened = servers
        .open_servers(bearer(open_req(&["s1"]), &bob_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.successful_list.len(), 1);

    // Reopened: the hold is gone, the history keeps who closed it.
    let (s1, pages) = walk(&mut servers, &alice_token, history_of("s1")).await;
    assert_eq!(pages, 1);
    assert_eq!(
        methods(&s1),
        ["RegisterServer", "CloseServers", "OpenServers"]
    );
    let close = &s1[1];
    assert_eq!(close.actor, alice);
    assert_eq!(close.request_id, closed.request_id);
    assert!(close.peer.starts_with("127.0.0.1:"), "{close:?}");
    assert!((before..=after).contains(&time(close)), "{close:?}");
    // Only s1's item of the two-server batch, and how many there were.
    assert_eq!(close.item_count, 2);
    assert_eq!(
        close.items,
        [pb::HistoryItem {
            id: "s1".into(),
            outcome: "OK".into(),
            reason: "kernel patch".into(),
        }]
    );
    assert_eq!(s1[2].actor, bob);
    assert_eq!(s1[2].request_id, opened.request_id);

    // Newest first, and one actor's acts across the fleet.
    let (newest, _) = walk(
        &mut servers,
        &alice_token,
        pb::DescribeServerHistoryRequest {
            newest_first: true,
            ..history_of("s1")
        },
    )
    .await;
    let mut reversed = s1.clone();
    reversed.reverse();
    assert_eq!(newest, reversed);
    let (by_alice, _) = walk(
        &mut servers,
        &bob_token,
        pb::DescribeServerHistoryRequest {
            actor: alice.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(methods(&by_alice), ["CloseServers"]);
    assert_eq!(by_alice[0].item_count, 2);
    let ids: Vec<&str> = by_alice[0].items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["s2", "s1"], "the whole batch, in request order");

    drop((agent, servers, auth));
    stop(broker).await;

    // After a restart, the same story from the store (the tokens too:
    // their key is stored).
    let (broker, _) = durable_broker(dir.path(), FleetConfig::default()).await;
    let mut servers = broker.servers().await;
    let (again, _) = walk(&mut servers, &alice_token, history_of("s1")).await;
    assert_eq!(again, s1);
    drop(servers);
    stop(broker).await;
}

#[tokio::test]
async fn history_pages_both_ways_and_filters_by_time() {
    let dir = TempDir::new("history-pages");
    let (broker, auth) = durable_broker(dir.path(), FleetConfig::default()).await;
    let (_, token) = api_client(&auth, "read servers:operate", None).await;
    let mut agent = broker.agent().await;
    let mut servers = broker.servers().await;
    for id in ["p1", "p2", "p3"] {
        let (_, agent_token) = api_client(&auth, "agent", Some(id)).await;
        agent
            .register_server(bearer(registration(id, "linux", 2), &agent_token))
            .await
            .unwrap();
    }
    for round in 0..8 {
        let id = ["p1", "p2", "p3"][round % 3];
        let reason = format!("round {round}");
        servers
            .close_servers(bearer(
                close_req(vec![close_item(id, None, &reason)]),
                &token,
            ))
            .await
            .unwrap();
        servers
            .open_servers(bearer(open_req(&[id]), &token))
            .await
            .unwrap();
    }
    let everything = pb::DescribeServerHistoryRequest {
        max_results: Some(1000),
        ..Default::default()
    };
    let (all, pages) = walk(&mut servers, &token, everything.clone()).await;
    assert_eq!(pages, 1);
    assert_eq!(all.len(), 3 + 16);
    assert!(all.windows(2).all(|w| time(&w[0]) <= time(&w[1])));

    // Pages of 4, either way, see every record once, in order.
    let (paged, pages) = walk(
        &mut servers,
        &token,
        pb::DescribeServerHistoryRequest {
            max_results: Some(4),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(paged, all);
    assert_eq!(pages, 5, "19 records in pages of 4, none empty");
    let (backwards, _) = walk(
        &mut servers,
        &token,
        pb::DescribeServerHistoryRequest {
            max_results: Some(3),
            newest_first: true,
            ..Default::default()
        },
    )
    .await;
    let mut reversed = all.clone();
    reversed.reverse();
    assert_eq!(backwards, reversed);

    // One server's, paged.
    let (p2, _) = walk(
        &mut servers,
        &token,
        pb::DescribeServerHistoryRequest {
            max_results: Some(2),
            ..history_of("p2")
        },
    )
    .await;
    let expected: Vec<_> = all
        .iter()
        .filter(|r| r.items.iter().any(|i| i.id == "p2"))
        .cloned()
        .collect();
    assert_eq!(p2, expected);
    assert_eq!(p2.len(), 1 + 2 * 3);

    // A time range: at or after one record's time, before another's.
    let (start, end) = (time(&all[5]), time(&all[12]));
    let (ranged, _) = walk(
        &mut servers,
        &token,
        pb::DescribeServerHistoryRequest {
            start_time: Some(start.into()),
            end_time: Some(end.into()),
            max_results: Some(2),
            ..Default::default()
        },
    )
    .await;
    let expected: Vec<_> = all
        .iter()
        .filter(|r| (start..end).contains(&time(r)))
        .cloned()
        .collect();
    assert!(expected.len() >= 7, "{}", expected.len());
    assert_eq!(ranged, expected);

    // A token continues only the query it was issued for.
    let first = servers
        .describe_server_history(bearer(
            pb::DescribeServerHistoryRequest {
                max_results: Some(2),
                ..history_of("p1")
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_token.is_empty());
    for request in [
        pb::DescribeServerHistoryRequest {
            next_token: first.next_token.clone(),
            ..history_of("p2")
        },
        pb::DescribeServerHistoryRequest {
            next_token: first.next_token.clone(),
            newest_first: true,
            ..history_of("p1")
        },
        pb::DescribeServerHistoryRequest {
            next_token: format!("{}x", first.next_token),
            ..history_of("p1")
        },
    ] {
        let refused = servers
            .describe_server_history(bearer(request, &token))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        let fields: Vec<String> = violations(&refused).into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["NextToken"]);
    }

    // Malformed queries name their fields.
    let t = SystemTime::now();
    let refused = servers
        .describe_server_history(bearer(
            pb::DescribeServerHistoryRequest {
                server_id: "x".repeat(513),
                max_results: Some(1001),
                start_time: Some(t.into()),
                end_time: Some(t.into()),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let fields: Vec<String> = violations(&refused).into_iter().map(|(f, _)| f).collect();
    assert_eq!(fields, ["ServerId", "MaxResults", "EndTime"]);
    let refused = servers
        .describe_server_history(bearer(
            pb::DescribeServerHistoryRequest {
                start_time: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(violations(&refused)[0].0, "StartTime");
    drop((agent, servers));
    stop(broker).await;
}

#[tokio::test]
async fn reading_history_takes_the_read_scope() {
    let dir = TempDir::new("history-scope");
    let (broker, auth) = durable_broker(dir.path(), FleetConfig::default()).await;
    let mut servers = broker.servers().await;
    for (scopes, server) in [
        ("servers:operate", None),
        ("agent", Some("s1")),
        ("sessions:manage", None),
    ] {
        let (_, token) = api_client(&auth, scopes, server).await;
        let refused = servers
            .describe_server_history(bearer(history_of("s1"), &token))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{scopes}");
    }
    let (_, token) = api_client(&auth, "read", None).await;
    servers
        .describe_server_history(bearer(history_of("s1"), &token))
        .await
        .unwrap();
    drop(servers);
    stop(broker).await;
}

#[tokio::test]
async fn a_broker_without_a_store_says_it_keeps_no_history() {
    let broker = Broker::quiet().await;
    let refused = broker
        .servers()
        .await
        .describe_server_history(history_of("s1"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("--in-memory"), "{refused:?}");
}

#[tokio::test(start_paused = true)]
async fn an_agents_silence_and_return_are_in_the_servers_history() {
    let dir = TempDir::new("history-silence");
    let fleet = FleetConfig {
        unreachable_after: Duration::from_secs(60),
        remove_after: Duration::from_secs(3600),
        ..Default::default()
    };
    let (sqlite, snapshot) = SqliteStore::open(dir.path()).unwrap();
    let fleet_handle = Fleet::restore(fleet.clone(), Arc::new(sqlite), snapshot).unwrap();
    let broker = Broker::start_with(
        BrokerConfig {
            fleet,
            ..quiet_config()
        },
        fleet_handle,
    )
    .await;
    let mut agent = broker.agent().await;
    let mut servers = broker.servers().await;
    register(&mut agent, "q1", "linux", 2).await;
    register(&mut agent, "q2", "linux", 2).await;
    // A describe runs what is due: the walk that notes silences among it.
    let reader = servers.clone();
    let after = async |seconds, servers: &mut pb::servers_client::ServersClient<_>| {
        tokio::time::advance(Duration::from_secs(seconds)).await;
        servers
            .describe_servers(pb::DescribeServersRequest::default())
            .await
            .unwrap();
    };
    after(59, &mut servers).await;
    agent.heartbeat(beat("q2", vec![])).await.unwrap();
    after(2, &mut servers).await;
    let history = |id: &'static str| {
        let mut servers = reader.clone();
        async move {
            servers
                .describe_server_history(history_of(id))
                .await
                .unwrap()
                .into_inner()
                .records
        }
    };
    let q1 = history("q1").await;
    assert_eq!(methods(&q1), ["RegisterServer", "ServerUnreachable"]);
    assert_eq!(q1[1].actor, "broker");
    assert!(q1[1].items[0].reason.contains("1m"), "{:?}", q1[1]);
    assert_eq!(
        methods(&history("q2").await),
        ["RegisterServer"],
        "heard from in time"
    );
    // Noted once, however long the silence lasts.
    after(30, &mut servers).await;
    assert_eq!(history("q1").await.len(), 2);
    agent.heartbeat(beat("q1", vec![])).await.unwrap();
    let q1 = history("q1").await;
    assert_eq!(
        methods(&q1),
        ["RegisterServer", "ServerUnreachable", "ServerReachable"]
    );
    assert_eq!(q1[2].actor, "broker");
    // q2, silent since its heartbeat, is noted on its own.
    after(30, &mut servers).await;
    assert_eq!(
        methods(&history("q2").await),
        ["RegisterServer", "ServerUnreachable"]
    );
    assert_eq!(history("q1").await.len(), 3);
    drop((agent, servers));
    stop(broker).await;
}

/// A record of a call on `id` with one item whose reason is `reason`.
fn stored(at: SystemTime, id: &str, reason: &str) -> AuditRecord {
    AuditRecord {
        at,
        actor: "someone".into(),
        request_id: format!("req-{id}"),
        method: "CloseServers".into(),
        peer: None,
        items: vec![AuditItem::new(id, AuditItem::OK.into(), reason.into())],
    }
}

/// What a store's reader must do, whichever store: read by time in both
/// directions, continue after a cursor, stop at the limit and at the item
/// budget (keeping at least one record), and say whether more follow.
async fn check_reader<F, Fut>(store: &dyn Store, read: F)
where
    F: Fn(AuditFilter) -> Fut,
    Fut: std::future::Future<Output = AuditPage>,
{
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    // Two records share a microsecond: the row breaks the tie.
    let times = [0, 1, 1, 2, 3];
    let big = "r".repeat(1000);
    let records: Vec<AuditRecord> = times
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let reason = if i == 3 { big.as_str() } else { "" };
            stored(t0 + Duration::from_secs(s), &format!("r{i}"), reason)
        })
        .collect();
    store
        .submit(records.iter().cloned().map(Change::PutAudit).collect())
        .wait()
        .await
        .unwrap();
    let ids = |page: &AuditPage| -> Vec<String> {
        page.records
            .iter()
            .map(|r| r.record.request_id.clone())
            .collect()
    };
    let all = read(AuditFilter::default()).await;
    assert_eq!(
        ids(&all),
        ["req-r0", "req-r1", "req-r2", "req-r3", "req-r4"]
    );
    assert!(!all.more);
    assert_eq!(
        all.records
            .iter()
            .map(|r| r.record.clone())
            .collect::<Vec<_>>(),
        records
    );
    // Pages of two, forwards, continued after each page's last cursor.
    let mut after = None;
    let mut walked = Vec::new();
    loop {
        let page = read(AuditFilter {
            limit: Some(2),
            after,
            ..Default::default()
        })
        .await;
        walked.extend(ids(&page));
        if !page.more {
            break;
        }
        after = Some(page.records.last().unwrap().cursor);
    }
    assert_eq!(walked, ids(&all));
    // Backwards, from the middle of the tie.
    let page = read(AuditFilter {
        newest_first: true,
        after: Some(all.records[2].cursor),
        ..Default::default()
    })
    .await;
    assert_eq!(ids(&page), ["req-r1", "req-r0"]);
    // The item budget: r3's kilobyte does not fit after r0..r2.
    let page = read(AuditFilter {
        item_bytes: Some(500),
        ..Default::default()
    })
    .await;
    assert_eq!(ids(&page), ["req-r0", "req-r1", "req-r2"]);
    assert!(page.more);
    let page = read(AuditFilter {
        item_bytes: Some(10),
        after: Some(all.records[2].cursor),
        ..Default::default()
    })
    .await;
    assert_eq!(ids(&page), ["req-r3"], "a page holds one record at least");
    assert!(page.more);
    // Subject and time.
    let page = read(AuditFilter {
        subject: Some("r4".into()),
        since: Some(t0 + Duration::from_secs(1)),
        ..Default::default()
    })
    .await;
    assert_eq!(ids(&page), ["req-r4"]);
    let page = read(AuditFilter {
        since: Some(t0 + Duration::from_secs(1)),
        until: Some(t0 + Duration::from_secs(2)),
        ..Default::default()
    })
    .await;
    assert_eq!(ids(&page), ["req-r1", "req-r2"]);
}

#[tokio::test]
async fn the_running_sqlite_store_reads_through_its_writer() {
    let dir = TempDir::new("history-sqlite-reader");
    let (store, _) = SqliteStore::open(dir.path()).unwrap();
    check_reader(&store, |filter| {
        let read = store.read_audit(filter).unwrap();
        async move { read.await.unwrap() }
    })
    .await;
    store.close().unwrap();
}

#[tokio::test]
async fn postgres_reads_the_same_on_any_replica() {
    use dcv_broker::store::{PostgresStore, postgres::Database};
    let db = common::postgres::TestDatabase::new().await;
    let (store, _) = PostgresStore::open(&db.url).await.unwrap();
    // A second connection, as a follower's: the leader's store writes.
    let follower = Database::connect(&db.url).await.unwrap();
    check_reader(&store, |filter| {
        let follower = follower.clone();
        async move { follower.read_audit(&filter).await.unwrap() }
    })
    .await;
}
