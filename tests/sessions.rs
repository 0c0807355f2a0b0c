//! The Sessions API against a real broker on 127.0.0.1:0, with agents
//! driven by the test over the Agent API: creation, placement rules and
//! strategies, Requirements, the instruction flow, deletion, connection
//! tokens, permissions, every session failure code, and closes that meet
//! placements in flight.

mod common;

use common::*;
use dcv_broker::{
    fleet::{FleetConfig, PlacementStrategy},
    pb::{self, FailureCode, InstructionKind as Kind, SessionState as St, SessionType as Ty},
};

fn code(c: i32) -> FailureCode {
    FailureCode::try_from(c).unwrap()
}

fn state(s: &pb::Session) -> St {
    St::try_from(s.state).unwrap()
}

fn substate(s: &pb::Session) -> pb::SessionSubstate {
    pb::SessionSubstate::try_from(s.substate).unwrap()
}

/// Creates `items` in one CreateSessions call, which must succeed as a
/// call (items may still fail).
async fn create(
    sessions: &mut pb::sessions_client::SessionsClient<tonic::transport::Channel>,
    items: Vec<pb::CreateSessionRequestData>,
) -> pb::CreateSessionsResponse {
    sessions
        .create_sessions(create_req(items))
        .await
        .unwrap()
        .into_inner()
}

fn with_fleet(fleet: FleetConfig) -> dcv_broker::BrokerConfig {
    dcv_broker::BrokerConfig {
        fleet,
        ..quiet_config()
    }
}

/// A registration with a tag and a CPU count, for Requirements.
fn described(
    id: &str,
    family: &str,
    max_virtual: i32,
    city: &str,
    cpus: i32,
) -> pb::RegisterServerRequest {
    let mut r = registration(id, family, max_virtual);
    r.tags = vec![pb::KeyValuePair {
        key: "city".into(),
        value: city.into(),
    }];
    if let Some(host) = r.host.as_mut() {
        host.cpu_info = Some(pb::CpuInfo {
            number_of_cpus: cpus,
            ..Default::default()
        });
    }
    r
}

#[tokio::test]
async fn a_session_goes_from_placing_to_ready_through_its_agent() {
    let broker = Broker::quiet().await;
    let mut agent = TestAgent::connect(&broker, registration("lin", "linux", 2)).await;
    let mut sessions = broker.sessions().await;
    let mut item = create_item("desk", "alice", Ty::Virtual);
    item.init_file = "init.sh".into();
    item.max_concurrent_clients = Some(3);
    item.storage_root = "/home/alice".into();
    let reply = create(&mut sessions, vec![item]).await;
    assert!(reply.unsuccessful_list.is_empty(), "{reply:?}");
    assert_eq!(
        uuid::Uuid::parse_str(&reply.request_id)
            .unwrap()
            .get_version_num(),
        4
    );
    let created = &reply.successful_list[0];
    assert_eq!(state(created), St::Creating);
    assert_eq!(substate(created), pb::SessionSubstate::SessionPlacing);
    assert_eq!(created.server.as_ref().unwrap().id, "lin");
    assert_eq!(created.server.as_ref().unwrap().port, "8443");
    assert_eq!(created.name, "desk");
    assert_eq!(created.max_concurrent_clients, 3);
    assert_eq!(created.storage_root, "/home/alice");
    assert!(created.creation_time.is_some());

    let instruction = agent.next_create().await;
    assert_eq!(instruction.session_id, created.id);
    assert_eq!(instruction.owner, "alice");
    assert_eq!(instruction.init_file, "init.sh");
    assert_eq!(instruction.r#type, Ty::Virtual as i32);

    // Created but still preparing.
    agent
        .report(&created.id, Kind::CreateSession, true, St::Creating)
        .await;
    let s = describe_session(&mut sessions, &created.id).await;
    assert_eq!(
        (state(&s), substate(&s)),
        (St::Creating, pb::SessionSubstate::PendingPreparation)
    );
    // The agent's heartbeat says READY.
    agent
        .beat(vec![session(&created.id, Ty::Virtual, St::Ready)])
        .await;
    let s = describe_session(&mut sessions, &created.id).await;
    assert_eq!(
        (state(&s), substate(&s)),
        (St::Ready, pb::SessionSubstate::Unspecified)
    );
    let mut servers = broker.servers().await;
    assert_eq!(
        describe_one(&mut servers, "lin")
            .await
            .virtual_session_count,
        1
    );
}

#[tokio::test]
async fn placement_respects_os_capacity_and_strategy() {
    let broker = Broker::quiet().await;
    let _win = TestAgent::connect(&broker, registration("win", "windows", 0)).await;
    let mut sessions = broker.sessions().await;

    // Windows is console-only.
    let r = create(&mut sessions, vec![create_item("v", "bob", Ty::Virtual)]).await;
    assert_eq!(
        code(r.unsuccessful_list[0].failure_code),
        FailureCode::NoServerAvailable
    );
    let echoed = r.unsuccessful_list[0]
        .create_session_request_data
        .as_ref()
        .unwrap();
    assert_eq!(echoed.name, "v");
    // A console session fills it; the next one finds no room.
    let r = create(
        &mut sessions,
        vec![
            create_item("c1", "bob", Ty::Console),
            create_item("c2", "bob", Ty::Console),
        ],
    )
    .await;
    assert_eq!(r.successful_list.len(), 1);
    assert_eq!(r.successful_list[0].server.as_ref().unwrap().id, "win");
    assert_eq!(
        code(r.unsuccessful_list[0].failure_code),
        FailureCode::NoServerAvailable
    );

    // Spread: least loaded first, ties by id; full servers are skipped.
    let _a = TestAgent::connect(&broker, registration("a", "linux", 2)).await;
    let _b = TestAgent::connect(&broker, registration("b", "linux", 1)).await;
    let mut placed = Vec::new();
    for i in 0..4 {
        let r = create(
            &mut sessions,
            vec![create_item(&format!("v{i}"), "carol", Ty::Virtual)],
        )
        .await;
        placed.push(
            r.successful_list
                .first()
                .map(|s| s.server.as_ref().unwrap().id.clone())
                .unwrap_or_else(|| format!("{:?}", code(r.unsuccessful_list[0].failure_code))),
        );
    }
    assert_eq!(placed, vec!["a", "b", "a", "NoServerAvailable"]);
}

#[tokio::test]
async fn pack_fills_the_fullest_server_first() {
    let broker = Broker::start(with_fleet(FleetConfig {
        placement: PlacementStrategy::Pack,
        ..FleetConfig::default()
    }))
    .await;
    let _a = TestAgent::connect(&broker, registration("a", "linux", 2)).await;
    let _b = TestAgent::connect(&broker, registration("b", "linux", 2)).await;
    let mut sessions = broker.sessions().await;
    let mut placed = Vec::new();
    for i in 0..4 {
        let r = create(
            &mut sessions,
            vec![create_item(&format!("v{i}"), "dan", Ty::Virtual)],
        )
        .await;
        placed.push(r.successful_list[0].server.as_ref().unwrap().id.clone());
    }
    assert_eq!(placed, vec!["a", "a", "b", "b"]);
}

#[tokio::test]
async fn requirements_select_by_tag_and_server_property() {
    let broker = Broker::quiet().await;
    let _small = TestAgent::connect(&broker, described("small", "linux", 4, "London", 2)).await;
    let _big = TestAgent::connect(&broker, described("big", "linux", 4, "Tokyo", 16)).await;
    let _win = TestAgent::connect(&broker, described("win", "windows", 0, "Tokyo", 16)).await;
    let mut sessions = broker.sessions().await;
    let cases = [
        ("tag:city = 'London'", Ty::Virtual, Some("small")),
        (
            "server:Host.CpuInfo.NumberOfCpus >= 8",
            Ty::Virtual,
            Some("big"),
        ),
        (
            "tag:city = 'Tokyo' and server:Host.Os.Family = 'windows'",
            Ty::Console,
            Some("win"),
        ),
        (
            "tag:dcv:os-family = 'linux' and not tag:city := 'Lon'",
            Ty::Virtual,
            Some("big"),
        ),
        ("server:Id = 'win'", Ty::Virtual, None),
        ("tag:city = 'Paris'", Ty::Console, None),
    ];
    for (expression, kind, want) in cases {
        let mut item = create_item("r", "erin", kind);
        item.requirements = expression.into();
        let r = create(&mut sessions, vec![item]).await;
        let got = r
            .successful_list
            .first()
            .map(|s| s.server.as_ref().unwrap().id.clone());
        assert_eq!(got.as_deref(), want, "{expression}");
        if want.is_none() {
            assert_eq!(
                code(r.unsuccessful_list[0].failure_code),
                FailureCode::NoServerAvailable
            );
        }
    }
    let mut item = create_item("r", "erin", Ty::Virtual);
    item.requirements = "tag:city = 'London' and (server:Host.Nope = 1".into();
    let r = create(&mut sessions, vec![item]).await;
    let failed = &r.unsuccessful_list[0];
    assert_eq!(code(failed.failure_code), FailureCode::InvalidRequirements);
    assert!(
        failed
            .failure_reason
            .starts_with("Requirements at character 33:"),
        "{}",
        failed.failure_reason
    );
    assert!(
        failed.failure_reason.contains("Host.Nope"),
        "{}",
        failed.failure_reason
    );
}

#[tokio::test]
async fn every_create_failure_code() {
    let broker = Broker::start(with_fleet(FleetConfig {
        queue_max_size: 1,
        ..FleetConfig::default()
    }))
    .await;
    let _win = TestAgent::connect(&broker, registration("win", "windows", 0)).await;
    let mut sessions = broker.sessions().await;
    let mut bad_type = create_item("t", "o", Ty::Console);
    bad_type.r#type = 0;
    let mut init_on_console = create_item("i", "o", Ty::Console);
    init_on_console.init_file = "x.sh".into();
    let mut gl_on_console = create_item("g", "o", Ty::Console);
    gl_on_console.dcv_gl_enabled = true;
    let mut clients = create_item("m", "o", Ty::Console);
    clients.max_concurrent_clients = Some(101);
    let mut permissions = create_item("p", "o", Ty::Console);
    permissions.permissions_file = "not base64!".into();
    let mut requirements = create_item("q", "o", Ty::Console);
    requirements.requirements = "tag:".into();
    let mut queued = create_item("queued", "o", Ty::Virtual);
    queued.enqueue_request = true;
    let mut refused = create_item("refused", "o", Ty::Virtual);
    refused.enqueue_request = true;
    let r = create(
        &mut sessions,
        vec![
            create_item("", "o", Ty::Console),
            create_item("n", "", Ty::Console),
            bad_type,
            init_on_console,
            gl_on_console,
            clients,
            permissions,
            requirements,
            create_item("virtual-on-windows", "o", Ty::Virtual),
            queued,
            refused,
        ],
    )
    .await;
    let codes: Vec<_> = r
        .unsuccessful_list
        .iter()
        .map(|f| code(f.failure_code))
        .collect();
    use FailureCode::*;
    assert_eq!(
        codes,
        vec![
            InvalidSessionParameter,
            InvalidSessionParameter,
            InvalidSessionParameter,
            InvalidSessionParameter,
            InvalidSessionParameter,
            InvalidSessionParameter,
            InvalidSessionParameter,
            InvalidRequirements,
            NoServerAvailable,
            QueueFull,
        ]
    );
    let reasons: Vec<_> = r
        .unsuccessful_list
        .iter()
        .map(|f| f.failure_reason.as_str())
        .collect();
    for (reason, field) in reasons.iter().zip([
        "Name",
        "Owner",
        "Type",
        "InitFile",
        "DcvGlEnabled",
        "MaxConcurrentClients",
        "PermissionsFile",
    ]) {
        assert!(reason.starts_with(field), "{reason:?} should name {field}");
    }
    // The queued one was accepted, waiting without a server.
    assert_eq!(r.successful_list.len(), 1);
    assert!(r.successful_list[0].server.is_none());
    assert_eq!(
        substate(&r.successful_list[0]),
        pb::SessionSubstate::SessionPlacing
    );

    for n in [0usize, 1001] {
        let items = (0..n)
            .map(|i| create_item(&format!("s{i}"), "o", Ty::Console))
            .collect();
        let err = sessions
            .create_sessions(create_req(items))
            .await
            .unwrap_err();
        assert_eq!(violations(&err)[0].0, "Sessions");
    }
}

#[tokio::test]
async fn delete_asks_the_agent_and_force_does_not() {
    let broker = Broker::quiet().await;
    let mut agent = TestAgent::connect(&broker, registration("lin", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    let r = create(
        &mut sessions,
        vec![
            create_item("one", "fay", Ty::Virtual),
            create_item("two", "fay", Ty::Virtual),
        ],
    )
    .await;
    let (one, two) = (
        r.successful_list[0].id.clone(),
        r.successful_list[1].id.clone(),
    );
    for id in [&one, &two] {
        let c = agent.next_create().await;
        agent
            .report(&c.session_id, Kind::CreateSession, true, St::Ready)
            .await;
        assert!(c.session_id == *id || [&one, &two].contains(&&c.session_id));
    }
    agent
        .beat(vec![
            session(&one, Ty::Virtual, St::Ready),
            session(&two, Ty::Virtual, St::Ready),
        ])
        .await;

    let del = |id: &str, owner: &str, force: Option<bool>| pb::DeleteSessionRequestData {
        session_id: id.into(),
        owner: owner.into(),
        force,
    };
    let r = sessions
        .delete_sessions(pb::DeleteSessionsRequest {
            sessions: vec![
                del(&one, "fay", None),
                del(&one, "fay", None),
                del("nope", "fay", None),
                del(&two, "mallory", None),
                del("", "fay", None),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.successful_list.len(), 1);
    assert_eq!(r.successful_list[0].state, St::Deleting as i32);
    let failures: Vec<_> = r
        .unsuccessful_list
        .iter()
        .map(|f| (f.session_id.as_str(), code(f.failure_code)))
        .collect();
    assert_eq!(
        failures,
        vec![
            (one.as_str(), FailureCode::DuplicateSessionId),
            ("nope", FailureCode::SessionNotFound),
            (two.as_str(), FailureCode::SessionNotFound),
            ("", FailureCode::InvalidSessionParameter),
        ]
    );
    assert_eq!(
        r.unsuccessful_list[1].failure_reason,
        "The requested dcvSession does not exist"
    );

    match agent.next().await {
        Instr::DeleteSession(d) => assert_eq!(d.session_id, one),
        other => panic!("expected DeleteSession, got {other:?}"),
    }
    assert_eq!(
        state(&describe_session(&mut sessions, &one).await),
        St::Deleting
    );
    agent
        .report(&one, Kind::DeleteSession, true, St::Deleted)
        .await;
    assert_eq!(
        state(&describe_session(&mut sessions, &one).await),
        St::Deleted
    );
    // Confirmed gone: the server counts it no more, before any heartbeat.
    let mut servers = broker.servers().await;
    assert_eq!(
        describe_one(&mut servers, "lin")
            .await
            .virtual_session_count,
        1
    );
    // Deleting a deleted session is not an error.
    let again = sessions
        .delete_sessions(pb::DeleteSessionsRequest {
            sessions: vec![del(&one, "fay", None)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.successful_list[0].state, St::Deleted as i32);

    // Force forgets at once without an instruction; the agent, still
    // running it, reports it and it comes back (DCV's behaviour).
    let r = sessions
        .delete_sessions(pb::DeleteSessionsRequest {
            sessions: vec![del(&two, "fay", Some(true))],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.successful_list[0].state, St::Deleted as i32);
    assert_eq!(
        state(&describe_session(&mut sessions, &two).await),
        St::Deleted
    );
    agent
        .beat(vec![session(&two, Ty::Virtual, St::Ready)])
        .await;
    assert_eq!(
        state(&describe_session(&mut sessions, &two).await),
        St::Ready
    );
    // The first one's instruction was the only one sent: the next message
    // on the stream is what the next create brings.
    create(
        &mut sessions,
        vec![create_item("three", "fay", Ty::Virtual)],
    )
    .await;
    assert_eq!(agent.next_create().await.name, "three");
}

#[tokio::test]
async fn connection_data_tokens_and_permissions() {
    let broker = Broker::quiet().await;
    let mut agent = TestAgent::connect(&broker, registration("lin", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    let r = create(&mut sessions, vec![create_item("desk", "gus", Ty::Virtual)]).await;
    let id = r.successful_list[0].id.clone();
    let ask = |user: &str| pb::GetSessionConnectionDataRequest {
        session_id: id.clone(),
        user: user.into(),
    };
    let err = sessions
        .get_session_connection_data(ask("gus"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "not READY yet");
    agent.next_create().await;
    agent
        .report(&id, Kind::CreateSession, true, St::Ready)
        .await;
    let data = sessions
        .get_session_connection_data(ask("gus"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(data.session.as_ref().unwrap().id, id);
    assert!(!data.connection_token.is_empty());

    let validate = |token: &str, server: &str, session: &str| pb::ValidateConnectionTokenRequest {
        server_id: server.into(),
        connection_token: token.into(),
        session_id: session.into(),
    };
    let ok = agent
        .client
        .validate_connection_token(validate(&data.connection_token, "lin", &id))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.valid, "{ok:?}");
    assert_eq!(ok.user, "gus");
    let mut tampered = data.connection_token.clone().into_bytes();
    tampered[2] = if tampered[2] == b'A' { b'B' } else { b'A' };
    for (token, server, session) in [
        (String::from_utf8(tampered).unwrap(), "lin", id.as_str()),
        (data.connection_token.clone(), "other", id.as_str()),
        (data.connection_token.clone(), "lin", "another-session"),
        ("garbage".to_string(), "lin", id.as_str()),
    ] {
        let verdict = agent
            .client
            .validate_connection_token(validate(&token, server, session))
            .await
            .unwrap()
            .into_inner();
        assert!(!verdict.valid, "{token} {server} {session}");
        assert!(!verdict.reason.is_empty());
    }

    let err = sessions
        .get_session_connection_data(pb::GetSessionConnectionDataRequest {
            session_id: "missing".into(),
            user: "gus".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.message(), "The requested dcvSession does not exist");
    let err = sessions
        .get_session_connection_data(ask(""))
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "User");

    let perm = |session: &str, owner: &str, file: &str| pb::UpdateSessionPermissionsRequestData {
        session_id: session.into(),
        owner: owner.into(),
        permissions_file: file.into(),
    };
    let r = sessions
        .update_session_permissions(pb::UpdateSessionPermissionsRequest {
            sessions: vec![
                perm(&id, "gus", "W3Blcm1pc3Npb25zXQ=="),
                perm(&id, "gus", "W3Blcm1pc3Npb25zXQ=="),
                perm("missing", "gus", "W3Blcm1pc3Npb25zXQ=="),
                perm(&id, "gus", "%%%"),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.successful_list.len(), 1);
    let codes: Vec<_> = r
        .unsuccessful_list
        .iter()
        .map(|f| code(f.failure_code))
        .collect();
    assert_eq!(
        codes,
        vec![
            FailureCode::DuplicateSessionId,
            FailureCode::SessionNotFound,
            FailureCode::DuplicateSessionId,
        ]
    );
    match agent.next().await {
        Instr::UpdatePermissions(u) => {
            assert_eq!(u.session_id, id);
            assert_eq!(u.permissions_file, "W3Blcm1pc3Npb25zXQ==");
        }
        other => panic!("expected UpdatePermissions, got {other:?}"),
    }
    let bad = sessions
        .update_session_permissions(pb::UpdateSessionPermissionsRequest {
            sessions: vec![perm(&id, "gus", "%%%")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        code(bad.unsuccessful_list[0].failure_code),
        FailureCode::InvalidSessionParameter
    );
}

#[tokio::test]
async fn describe_sessions_filters_and_pages() {
    let broker = Broker::quiet().await;
    let mut london =
        TestAgent::connect(&broker, described("london", "linux", 10, "London", 4)).await;
    let mut tokyo = TestAgent::connect(&broker, described("tokyo", "linux", 10, "Tokyo", 4)).await;
    let mut sessions = broker.sessions().await;
    let mut ids = Vec::new();
    for (i, (owner, city)) in [
        ("ann", "London"),
        ("ann", "Tokyo"),
        ("ben", "Tokyo"),
        ("ann", "London"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut item = create_item(&format!("s{i}"), owner, Ty::Virtual);
        item.requirements = format!("tag:city = '{city}'");
        let r = create(&mut sessions, vec![item]).await;
        ids.push(r.successful_list[0].id.clone());
    }
    // Two sessions went to each city's server.
    for agent in [&mut london, &mut tokyo] {
        for _ in 0..2 {
            let c = agent.next_create().await;
            agent
                .report(&c.session_id, Kind::CreateSession, true, St::Ready)
                .await;
        }
    }
    let filtered = |filters: Vec<(&str, &str)>| pb::DescribeSessionsRequest {
        filters: filters
            .into_iter()
            .map(|(k, v)| pb::KeyValuePair {
                key: k.into(),
                value: v.into(),
            })
            .collect(),
        ..Default::default()
    };
    let count = |r: pb::DescribeSessionsResponse| r.sessions.len();
    let r = sessions
        .describe_sessions(filtered(vec![("owner", "ann")]))
        .await
        .unwrap();
    assert_eq!(count(r.into_inner()), 3);
    let r = sessions
        .describe_sessions(filtered(vec![("tag:city", "Tokyo")]))
        .await
        .unwrap();
    assert_eq!(count(r.into_inner()), 2);
    let r = sessions
        .describe_sessions(filtered(vec![("tag:city", "Tokyo"), ("owner", "ann")]))
        .await
        .unwrap();
    assert_eq!(count(r.into_inner()), 1);
    let r = sessions
        .describe_sessions(filtered(vec![("state", "READY")]))
        .await
        .unwrap();
    assert_eq!(count(r.into_inner()), 4);
    let err = sessions
        .describe_sessions(filtered(vec![("colour", "red")]))
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "Filters[0].Key");

    // Pages of one, in id order, covering all.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = sessions
            .describe_sessions(pb::DescribeSessionsRequest {
                max_results: Some(1),
                next_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.sessions.into_iter().map(|s| s.id));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want);
    let err = sessions
        .describe_sessions(pb::DescribeSessionsRequest {
            next_token: "forged".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "NextToken");
}

#[tokio::test]
async fn a_close_counts_placements_in_flight_and_blocks_new_ones() {
    let broker = Broker::quiet().await;
    let mut agent = TestAgent::connect(&broker, registration("only", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    let mut servers = broker.servers().await;
    let r = create(&mut sessions, vec![create_item("a", "hal", Ty::Virtual)]).await;
    let id = r.successful_list[0].id.clone();
    // The agent has not answered yet, yet the server is not empty.
    let close = servers
        .close_servers(close_req(vec![close_item("only", None, "")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        code(close.unsuccessful_list[0].failure_code),
        FailureCode::DcvServerHasRunningSessions
    );
    let close = servers
        .close_servers(close_req(vec![close_item("only", Some(true), "")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(close.successful_list.len(), 1);
    // The placement in flight completes; nothing new is placed.
    agent.next_create().await;
    agent
        .report(&id, Kind::CreateSession, true, St::Ready)
        .await;
    assert_eq!(
        state(&describe_session(&mut sessions, &id).await),
        St::Ready
    );
    let r = create(&mut sessions, vec![create_item("b", "hal", Ty::Virtual)]).await;
    assert_eq!(
        code(r.unsuccessful_list[0].failure_code),
        FailureCode::NoServerAvailable
    );
    servers.open_servers(open_req(&["only"])).await.unwrap();
    let r = create(&mut sessions, vec![create_item("b", "hal", Ty::Virtual)]).await;
    assert_eq!(r.successful_list.len(), 1);
}

#[tokio::test]
async fn sessions_the_broker_did_not_create_are_adopted() {
    let broker = Broker::quiet().await;
    let mut agent = TestAgent::connect(&broker, registration("win", "windows", 0)).await;
    agent
        .beat(vec![session("by-hand", Ty::Console, St::Ready)])
        .await;
    let mut sessions = broker.sessions().await;
    let s = describe_session(&mut sessions, "by-hand").await;
    assert_eq!(state(&s), St::Ready);
    assert_eq!(s.owner, "alice");
    assert_eq!(s.server.as_ref().unwrap().id, "win");
    let mut servers = broker.servers().await;
    let close = servers
        .close_servers(close_req(vec![close_item("win", None, "")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        code(close.unsuccessful_list[0].failure_code),
        FailureCode::DcvServerHasRunningSessions
    );
    // It ends on the server: DELETED, and the server is free again.
    agent.beat(vec![]).await;
    assert_eq!(
        state(&describe_session(&mut sessions, "by-hand").await),
        St::Deleted
    );
    let r = create(&mut sessions, vec![create_item("c", "ivy", Ty::Console)]).await;
    assert_eq!(r.successful_list.len(), 1);
}
