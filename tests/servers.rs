//! The Servers API against a real broker on 127.0.0.1:0: every failure
//! code, idempotence, Force, duplicates, batch limits, atomic batches,
//! availability, filters, page tokens and request ids.

mod common;

use std::collections::HashSet;

use common::*;
use dcv_broker::pb::{self, FailureCode, UnavailabilityReason as R};
use pb::{SessionState as St, SessionType as Ty};

fn code(c: i32) -> FailureCode {
    FailureCode::try_from(c).unwrap()
}

#[tokio::test]
async fn seed_example_closes_one_server_and_reports_the_unknown_one() {
    let broker = Broker::quiet().await;
    register(&mut broker.agent().await, "serverId1", "linux", 10).await;
    let mut servers = broker.servers().await;
    let r = servers
        .close_servers(close_req(vec![
            close_item("serverId1", None, ""),
            close_item("serverId2", None, ""),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.successful_list.len(), 1);
    assert_eq!(r.successful_list[0].server_id, "serverId1");
    assert_eq!(r.unsuccessful_list.len(), 1);
    let failed = &r.unsuccessful_list[0];
    let echoed = failed.close_server_request_data.as_ref().unwrap();
    assert_eq!(echoed.server_id, "serverId2");
    assert_eq!(echoed.force, Some(false), "Force is always echoed");
    assert_eq!(code(failed.failure_code), FailureCode::DcvServerNotFound);
    assert_eq!(failed.failure_reason, "Dcv server not found.");
    let id = uuid::Uuid::parse_str(&r.request_id).unwrap();
    assert_eq!(id.get_version_num(), 4);

    let open = servers
        .open_servers(open_req(&["serverId1", "serverId2"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(open.successful_list[0].server_id, "serverId1");
    let failed = &open.unsuccessful_list[0];
    assert_eq!(
        failed.open_server_request_data.as_ref().unwrap().server_id,
        "serverId2"
    );
    assert_eq!(code(failed.failure_code), FailureCode::DcvServerNotFound);
    assert_eq!(failed.failure_reason, "Dcv server not found.");
    assert_ne!(
        open.request_id, r.request_id,
        "every response has a fresh id"
    );
}

#[tokio::test]
async fn every_item_failure_code_in_one_batch() {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    register(&mut agent, "idle", "linux", 10).await;
    register(&mut agent, "busy", "linux", 10).await;
    agent
        .heartbeat(beat("busy", vec![session("s1", Ty::Virtual, St::Ready)]))
        .await
        .unwrap();
    let mut servers = broker.servers().await;
    let long_id = "x".repeat(257);
    let max_id = "y".repeat(256);
    let r = servers
        .close_servers(close_req(vec![
            close_item("idle", None, "kernel patch"),
            close_item("busy", None, ""),
            close_item("", None, ""),
            close_item(&long_id, None, ""),
            close_item("idle", Some(true), "again"),
            close_item("ghost", None, ""),
            close_item("busy", Some(true), "dup"),
            close_item(&max_id, None, ""),
        ]))
        .await
        .unwrap()
        .into_inner();
    let ok: Vec<_> = r
        .successful_list
        .iter()
        .map(|s| s.server_id.as_str())
        .collect();
    assert_eq!(ok, vec!["idle"]);
    let failed: Vec<_> = r
        .unsuccessful_list
        .iter()
        .map(|f| {
            (
                f.close_server_request_data
                    .as_ref()
                    .unwrap()
                    .server_id
                    .len(),
                code(f.failure_code),
            )
        })
        .collect();
    assert_eq!(
        failed,
        vec![
            (4, FailureCode::DcvServerHasRunningSessions),
            (0, FailureCode::InvalidServerId),
            (257, FailureCode::InvalidServerId),
            (4, FailureCode::DuplicateServerId),
            (5, FailureCode::DcvServerNotFound),
            (4, FailureCode::DuplicateServerId),
            (256, FailureCode::DcvServerNotFound),
        ]
    );
    // The duplicate of "busy" had Force, but only the first occurrence
    // (without Force) counts: the server stays open.
    let busy = describe_one(&mut servers, "busy").await;
    assert!(busy.holds.is_empty());

    let bad_reasons = servers
        .close_servers(close_req(vec![
            close_item("idle", None, &"r".repeat(1025)),
            close_item("busy", Some(true), "line\nbreak"),
            close_item("other", Some(true), "looks \u{202E}fine"),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert!(bad_reasons.successful_list.is_empty());
    for f in &bad_reasons.unsuccessful_list {
        assert_eq!(code(f.failure_code), FailureCode::InvalidReason);
    }
    // An over-long Reason is echoed cut short, and the FailureReason says
    // so; a short one, whole.
    let huge = "é".repeat(512 * 1024);
    let r = servers
        .close_servers(close_req(vec![
            close_item("busy", Some(true), &huge),
            close_item("nowhere", None, "short"),
        ]))
        .await
        .unwrap()
        .into_inner();
    let [cut, whole] = &r.unsuccessful_list[..] else {
        panic!("two failures expected: {:?}", r.unsuccessful_list.len());
    };
    assert_eq!(code(cut.failure_code), FailureCode::InvalidReason);
    let echoed = &cut.close_server_request_data.as_ref().unwrap().reason;
    assert!(echoed.len() <= 256 && huge.starts_with(echoed.as_str()));
    assert!(!echoed.is_empty());
    assert!(
        cut.failure_reason
            .starts_with("Reason must be at most 1024 characters")
            && cut
                .failure_reason
                .ends_with("The Reason echoed here is truncated from 1048576 bytes."),
        "{:?}",
        cut.failure_reason
    );
    assert_eq!(code(whole.failure_code), FailureCode::DcvServerNotFound);
    assert_eq!(
        whole.close_server_request_data.as_ref().unwrap().reason,
        "short"
    );
    assert_eq!(whole.failure_reason, "Dcv server not found.");

    // Every character of Unicode's Bidi_Control property (PropList.txt),
    // U+061C ARABIC LETTER MARK included.
    let bidi_controls = ['\u{061C}', '\u{200E}', '\u{200F}']
        .into_iter()
        .chain('\u{202A}'..='\u{202E}')
        .chain('\u{2066}'..='\u{2069}');
    for c in bidi_controls {
        let r = servers
            .close_servers(close_req(vec![close_item(
                "busy",
                Some(true),
                &format!("maintenance {c}window"),
            )]))
            .await
            .unwrap()
            .into_inner();
        assert!(
            r.successful_list.is_empty(),
            "U+{:04X} accepted",
            u32::from(c)
        );
        assert_eq!(
            code(r.unsuccessful_list[0].failure_code),
            FailureCode::InvalidReason
        );
        assert!(
            r.unsuccessful_list[0]
                .failure_reason
                .contains("bidirectional"),
            "{:?}",
            r.unsuccessful_list[0].failure_reason
        );
    }
    let fits = servers
        .close_servers(close_req(vec![close_item(
            "busy",
            Some(true),
            &"é".repeat(1024),
        )]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fits.successful_list.len(), 1, "1024 characters fit");
}

#[tokio::test]
async fn close_and_open_are_idempotent_and_keep_the_first_hold() {
    let broker = Broker::quiet().await;
    register(&mut broker.agent().await, "a", "windows", 0).await;
    let mut servers = broker.servers().await;
    for reason in ["first", "second"] {
        let r = servers
            .close_servers(close_req(vec![close_item("a", None, reason)]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.successful_list.len(), 1);
        assert!(r.unsuccessful_list.is_empty());
    }
    let a = describe_one(&mut servers, "a").await;
    assert_eq!(a.availability, pb::Availability::Unavailable as i32);
    assert_eq!(a.unavailability_reason, R::ServerClosed as i32);
    assert_eq!(a.holds.len(), 1);
    assert_eq!(a.holds[0].kind, pb::HoldKind::Closed as i32);
    assert_eq!(a.holds[0].reason, "first");
    assert_eq!(a.holds[0].actor, "anonymous");
    assert!(a.holds[0].creation_time.is_some());
    for _ in 0..2 {
        let r = servers
            .open_servers(open_req(&["a"]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.successful_list.len(), 1);
        assert!(r.unsuccessful_list.is_empty());
    }
    let a = describe_one(&mut servers, "a").await;
    assert_eq!(a.availability, pb::Availability::Available as i32);
    assert!(a.holds.is_empty());
    assert!(a.unavailability_reasons.is_empty());
}

#[tokio::test]
async fn force_closes_a_busy_server_and_its_sessions_keep_running() {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    register(&mut agent, "busy", "linux", 4).await;
    agent
        .heartbeat(beat(
            "busy",
            vec![
                session("s1", Ty::Virtual, St::Ready),
                session("s2", Ty::Virtual, St::Creating),
                session("gone", Ty::Virtual, St::Deleted),
            ],
        ))
        .await
        .unwrap();
    let mut servers = broker.servers().await;
    let r = servers
        .close_servers(close_req(vec![close_item("busy", Some(false), "")]))
        .await
        .unwrap()
        .into_inner();
    let failed = &r.unsuccessful_list[0];
    assert_eq!(
        code(failed.failure_code),
        FailureCode::DcvServerHasRunningSessions
    );
    assert!(
        failed.failure_reason.contains("2 running session"),
        "{}",
        failed.failure_reason
    );
    assert_eq!(
        failed.close_server_request_data.as_ref().unwrap().force,
        Some(false)
    );
    assert!(describe_one(&mut servers, "busy").await.holds.is_empty());

    let r = servers
        .close_servers(close_req(vec![close_item("busy", Some(true), "drain")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.successful_list.len(), 1);
    let busy = describe_one(&mut servers, "busy").await;
    assert_eq!(
        busy.virtual_session_count, 2,
        "deleted sessions do not count"
    );
    assert_eq!(busy.holds[0].reason, "drain");

    // A server whose sessions ended closes without Force.
    register(&mut agent, "was-busy", "linux", 4).await;
    agent
        .heartbeat(beat("was-busy", vec![session("s", Ty::Console, St::Ready)]))
        .await
        .unwrap();
    agent.heartbeat(beat("was-busy", vec![])).await.unwrap();
    let r = servers
        .close_servers(close_req(vec![close_item("was-busy", None, "")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.successful_list.len(), 1);
}

#[tokio::test]
async fn batch_limits_are_invalid_argument_with_bad_request_details() {
    let broker = Broker::quiet().await;
    let mut servers = broker.servers().await;
    for n in [0usize, 1001] {
        let items = (0..n)
            .map(|i| close_item(&format!("s{i}"), None, ""))
            .collect();
        let err = servers.close_servers(close_req(items)).await.unwrap_err();
        let v = violations(&err);
        assert_eq!(v[0].0, "Servers");
        assert!(v[0].1.contains(&format!("got {n}")), "{v:?}");
        let ids: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let err = servers.open_servers(open_req(&ids)).await.unwrap_err();
        assert_eq!(violations(&err)[0].0, "Servers");
    }
    let items = (0..1000)
        .map(|i| close_item(&format!("s{i}"), None, ""))
        .collect();
    let r = servers
        .close_servers(close_req(items))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.unsuccessful_list.len(),
        1000,
        "1000 items is a valid batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_observes_half_a_batch() {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    let ids: Vec<String> = (0..50).map(|i| format!("atom-{i:02}")).collect();
    for id in &ids {
        register(&mut agent, id, "linux", 10).await;
    }
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut writer = broker.servers().await;
    let items: Vec<_> = ids.iter().map(|id| close_item(id, None, "")).collect();
    let open = open_req(&id_refs);
    let write = tokio::spawn(async move {
        for _ in 0..100 {
            writer
                .close_servers(close_req(items.clone()))
                .await
                .unwrap();
            writer.open_servers(open.clone()).await.unwrap();
        }
    });
    let mut reader = broker.servers().await;
    let mut mixed = 0;
    let mut observed = HashSet::new();
    while !write.is_finished() {
        let page = reader
            .describe_servers(describe_ids(&id_refs))
            .await
            .unwrap()
            .into_inner();
        let closed = page.servers.iter().filter(|s| !s.holds.is_empty()).count();
        observed.insert(closed);
        if closed != 0 && closed != ids.len() {
            mixed += 1;
        }
    }
    write.await.unwrap();
    assert_eq!(mixed, 0, "saw partially applied batches: {observed:?}");
}

#[tokio::test]
async fn availability_lists_every_reason_in_precedence_order() {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    let mut servers = broker.servers().await;
    register(&mut agent, "win", "windows", 0).await;
    let mut hb = beat("win", vec![]);
    hb.logged_in_users = vec![pb::LoggedInUser {
        username: "Administrator".into(),
    }];
    agent.heartbeat(hb).await.unwrap();
    let win = describe_one(&mut servers, "win").await;
    assert_eq!(reasons(&win), vec![R::ExistingLoggedInUser]);

    register(&mut agent, "full", "linux", 1).await;
    let mut hb = beat("full", vec![session("v", Ty::Virtual, St::Ready)]);
    hb.dcv_server_healthy = false;
    agent.heartbeat(hb).await.unwrap();
    servers
        .close_servers(close_req(vec![close_item("full", Some(true), "")]))
        .await
        .unwrap();
    let full = describe_one(&mut servers, "full").await;
    assert_eq!(full.unavailability_reason, R::ServerClosed as i32);
    assert_eq!(
        reasons(&full),
        vec![R::ServerClosed, R::UnhealthyDcvServer, R::ServerFull]
    );

    register(&mut agent, "roomy", "linux", 2).await;
    agent
        .heartbeat(beat("roomy", vec![session("v", Ty::Virtual, St::Ready)]))
        .await
        .unwrap();
    let roomy = describe_one(&mut servers, "roomy").await;
    assert_eq!(roomy.availability, pb::Availability::Available as i32);
    assert_eq!(roomy.unavailability_reason, R::Unspecified as i32);
    assert_eq!(roomy.virtual_session_count, 1);
    let tags: Vec<_> = roomy
        .tags
        .iter()
        .map(|t| (t.key.as_str(), t.value.as_str()))
        .collect();
    assert_eq!(
        tags,
        vec![
            ("city", "London"),
            ("dcv:os-family", "linux"),
            ("dcv:max-virtual-sessions", "2"),
            ("dcv:max-concurrent-sessions-per-user", "0"),
        ]
    );
}

fn filter(key: &str, value: &str) -> pb::KeyValuePair {
    pb::KeyValuePair {
        key: key.into(),
        value: value.into(),
    }
}

async fn ids_matching(
    servers: &mut pb::servers_client::ServersClient<tonic::transport::Channel>,
    filters: Vec<pb::KeyValuePair>,
) -> Vec<String> {
    servers
        .describe_servers(pb::DescribeServersRequest {
            filters,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .servers
        .into_iter()
        .map(|s| s.id)
        .collect()
}

#[tokio::test]
async fn each_filter_selects_server_side() {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    let mut servers = broker.servers().await;
    register(&mut agent, "a-linux", "linux", 10).await;
    register(&mut agent, "b-windows", "windows", 0).await;
    let mut mac = registration("c-mac", "macos", 0);
    mac.tags = vec![filter("city", "Tokyo")];
    agent.register_server(mac).await.unwrap();
    register(&mut agent, "d-unhealthy", "linux", 10).await;
    let mut hb = beat("d-unhealthy", vec![]);
    hb.dcv_server_healthy = false;
    agent.heartbeat(hb).await.unwrap();
    servers
        .close_servers(close_req(vec![close_item("b-windows", None, "")]))
        .await
        .unwrap();

    let cases: Vec<(Vec<pb::KeyValuePair>, Vec<&str>)> = vec![
        (vec![], vec!["a-linux", "b-windows", "c-mac", "d-unhealthy"]),
        (
            vec![filter("availability", "AVAILABLE")],
            vec!["a-linux", "c-mac"],
        ),
        (
            vec![filter("availability", "UNAVAILABLE")],
            vec!["b-windows", "d-unhealthy"],
        ),
        (
            vec![filter("unavailability-reason", "UNHEALTHY_DCV_SERVER")],
            vec!["d-unhealthy"],
        ),
        (
            vec![filter("unavailability-reason", "SERVER_CLOSED")],
            vec!["b-windows"],
        ),
        (vec![filter("closed", "true")], vec!["b-windows"]),
        (
            vec![filter("closed", "false")],
            vec!["a-linux", "c-mac", "d-unhealthy"],
        ),
        (
            vec![filter("os-family", "linux")],
            vec!["a-linux", "d-unhealthy"],
        ),
        (vec![filter("os-family", "macos")], vec!["c-mac"]),
        (vec![filter("tag:city", "Tokyo")], vec!["c-mac"]),
        (
            vec![filter("tag:dcv:os-family", "windows")],
            vec!["b-windows"],
        ),
        // Same key: any; different keys: all.
        (
            vec![filter("os-family", "macos"), filter("os-family", "windows")],
            vec!["b-windows", "c-mac"],
        ),
        (
            vec![
                filter("os-family", "linux"),
                filter("availability", "AVAILABLE"),
            ],
            vec!["a-linux"],
        ),
        (vec![filter("tag:city", "Paris")], vec![]),
    ];
    for (filters, want) in cases {
        let shown = format!("{filters:?}");
        assert_eq!(ids_matching(&mut servers, filters).await, want, "{shown}");
    }

    for (bad, field) in [
        (filter("colour", "red"), "Filters[0].Key"),
        (filter("tag:", "x"), "Filters[0].Key"),
        (filter("availability", "MAYBE"), "Filters[0].Value"),
        (filter("closed", "yes"), "Filters[0].Value"),
        (filter("os-family", "beos"), "Filters[0].Value"),
        (filter("unavailability-reason", "TIRED"), "Filters[0].Value"),
    ] {
        let err = servers
            .describe_servers(pb::DescribeServersRequest {
                filters: vec![bad],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(violations(&err)[0].0, field);
    }
}

#[tokio::test]
async fn describe_validates_its_input_and_its_tokens() {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    for i in 0..5 {
        register(&mut agent, &format!("s{i}"), "linux", 10).await;
    }
    let mut servers = broker.servers().await;

    let known = servers
        .describe_servers(describe_ids(&["s3", "nope", "s1", "s3"]))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = known.servers.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, vec!["s1", "s3"], "unknown ids left out, sorted, once");

    for n in [0, 1001, -1] {
        let err = servers
            .describe_servers(pb::DescribeServersRequest {
                max_results: Some(n),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(violations(&err)[0].0, "MaxResults");
    }
    let err = servers
        .describe_servers(describe_ids(&["ok", ""]))
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "ServerIds[1]");

    let first = servers
        .describe_servers(pb::DescribeServersRequest {
            max_results: Some(2),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.servers.len(), 2);
    assert!(!first.next_token.is_empty());

    // Forged: garbage, and a genuine token with one character changed.
    let mut edited = first.next_token.clone().into_bytes();
    edited[3] = if edited[3] == b'A' { b'B' } else { b'A' };
    for token in ["garbage".to_string(), String::from_utf8(edited).unwrap()] {
        let err = servers
            .describe_servers(pb::DescribeServersRequest {
                next_token: token,
                ..Default::default()
            })
            .await
            .unwrap_err();
        let v = violations(&err);
        assert_eq!(v[0].0, "NextToken");
        // Tokens survive restarts (their key is stored): the text blames
        // a restart only for a broker that keeps nothing.
        assert_eq!(
            v[0].1,
            "is not a token this broker issued (corrupted or forged, or issued before an --in-memory broker restarted)"
        );
    }
    // A token is bound to its query.
    let err = servers
        .describe_servers(pb::DescribeServersRequest {
            next_token: first.next_token.clone(),
            filters: vec![filter("os-family", "linux")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        violations(&err)[0]
            .1
            .contains("different ServerIds or Filters")
    );
    // A token from another broker (a restart) is refused too.
    let other = Broker::quiet().await;
    let err = other
        .servers()
        .await
        .describe_servers(pb::DescribeServersRequest {
            next_token: first.next_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "NextToken");

    // The page size may change between pages.
    let rest = servers
        .describe_servers(pb::DescribeServersRequest {
            next_token: first.next_token,
            max_results: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = rest.servers.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, vec!["s2", "s3", "s4"]);
    assert!(rest.next_token.is_empty(), "no token after the last page");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_through_2500_servers_while_others_come_and_go() {
    let broker = Broker::quiet().await;
    let stable: Vec<String> = (0..2500).map(|i| format!("stable-{i:05}")).collect();
    let mut joins = Vec::new();
    for chunk in stable.chunks(250) {
        let chunk = chunk.to_vec();
        let mut agent = broker.agent().await;
        joins.push(tokio::spawn(async move {
            for id in chunk {
                register(&mut agent, &id, "linux", 10).await;
            }
        }));
    }
    for j in joins {
        j.await.unwrap();
    }

    // Churn: servers whose ids interleave with the stable ones register
    // and leave while the walk runs.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut agent = broker.agent().await;
    let churn = tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            if stop_rx.try_recv().is_ok() {
                return n;
            }
            let id = format!("stable-{:05}-churn-{n}", (n * 7919) % 2500);
            register(&mut agent, &id, "linux", 10).await;
            if n.is_multiple_of(2) {
                agent
                    .deregister_server(pb::DeregisterServerRequest { server_id: id })
                    .await
                    .unwrap();
            }
            n += 1;
        }
    });

    let mut servers = broker.servers().await;
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = servers
            .describe_servers(pb::DescribeServersRequest {
                next_token: token,
                max_results: Some(1000),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.servers.len() <= 1000);
        seen.extend(page.servers.into_iter().map(|s| s.id));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
        tokio::task::yield_now().await;
    }
    let _ = stop_tx.send(());
    let churned = churn.await.unwrap();
    assert!(churned > 0, "the churn task ran");
    assert!(pages >= 3);

    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "pages are in ascending id order");
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no server repeated");
    let stable_seen = seen.iter().filter(|id| !id.contains("churn")).count();
    assert_eq!(stable_seen, 2500, "no stable server skipped");
}

/// DCV's flat Port and WebUrlPath of a described server are those of its
/// first HTTP endpoint (DCV clients that predate Endpoints read them), else
/// of its first endpoint, else empty.
#[tokio::test]
async fn a_described_server_carries_dcvs_port_and_web_url_path() {
    let broker = Broker::quiet().await;
    let mut agent = broker.agent().await;
    let endpoint = |port: i32, protocol: pb::Protocol, path: &str| pb::Endpoint {
        ip_address: "192.0.2.10".into(),
        port,
        protocol: protocol as i32,
        web_url_path: path.into(),
    };
    let mut http_second = registration("http-second", "linux", 2);
    http_second.endpoints = vec![
        endpoint(8444, pb::Protocol::Quic, "/q"),
        endpoint(8443, pb::Protocol::Http, "/dcv"),
    ];
    let mut quic_only = registration("quic-only", "linux", 2);
    quic_only.endpoints = vec![endpoint(9443, pb::Protocol::Quic, "/quic")];
    let mut none = registration("none", "linux", 2);
    none.endpoints.clear();
    for r in [http_second, quic_only, none] {
        agent.register_server(r).await.unwrap();
    }
    let mut servers = broker.servers().await;
    for (id, port, path) in [
        ("http-second", "8443", "/dcv"),
        ("quic-only", "9443", "/quic"),
        ("none", "", ""),
    ] {
        let s = describe_one(&mut servers, id).await;
        assert_eq!(
            (s.port.as_str(), s.web_url_path.as_str()),
            (port, path),
            "{id}"
        );
    }
}
