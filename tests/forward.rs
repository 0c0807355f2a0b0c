//! Forwarding between replicas (issue 16, item 7), without PostgreSQL: two
//! real in-process brokers, each with its own `ClusterView`, the same
//! forwarding key, roles set by hand (one leader, one follower of it).
//!
//! The leader's fleet writes through a small store that numbers each
//! submission and publishes it with `view.set_committed`, as the
//! PostgreSQL writer does after each COMMIT, so the leader's committed
//! sequence number moves with its real writes. The follower's applied
//! number is advanced by the test (a "replicator" task, or by hand where a
//! test holds it back): that is the controller's job, and nothing here
//! copies the leader's state into the follower's fleet, so whatever a test
//! sees of a write happened on the leader.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use common::{
    Broker, Instr, TestAgent, bearer, close_item, close_req, create_item, create_req, describe_ids,
    open_req, quiet_config, registration, violations,
};
use dcv_broker::{
    BrokerConfig,
    api::forward::{FORWARDED, FORWARDED_MAC, SEQ, sign},
    auth::{Auth, AuthConfig, Principal, Scope, ScopeSet},
    cluster::{ClusterView, Role},
    fleet::{
        Fleet,
        persist::{Change, Durable, Snapshot, Store},
    },
    pb::{
        self, agent_client::AgentClient, servers_client::ServersClient,
        sessions_client::SessionsClient,
    },
    serve_tls,
    tls::{ServerTls, init},
};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio::net::TcpListener;
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig},
};
use uuid::Uuid;

/// Bounds every wait: a broker that misbehaves fails the test.
const PATIENCE: Duration = Duration::from_secs(20);

const KEY: [u8; 32] = [42; 32];

/// A store that keeps nothing but numbers each submission as one commit
/// and publishes it, as the leader's PostgreSQL writer does.
#[derive(Debug)]
struct Committing {
    view: ClusterView,
    seq: AtomicU64,
}

impl Store for Committing {
    fn submit(&self, _changes: Vec<Change>) -> Durable {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.view.set_committed(seq);
        Durable::done()
    }

    fn keeps_liveness(&self) -> bool {
        true
    }
}

struct Pair {
    leader: Broker,
    follower: Broker,
    lview: ClusterView,
    fview: ClusterView,
}

impl Pair {
    async fn start(auth: Option<Auth>) -> Pair {
        let lview = ClusterView::clustered("leader".into());
        lview.set_forwarding_key(KEY);
        lview.set_role(Role::Leader);
        let fview = ClusterView::clustered("follower".into());
        fview.set_forwarding_key(KEY);
        let config = |view: &ClusterView| BrokerConfig {
            auth: auth.clone(),
            cluster: view.clone(),
            ..quiet_config()
        };
        let lconfig = config(&lview);
        let store = Arc::new(Committing {
            view: lview.clone(),
            seq: AtomicU64::new(0),
        });
        let fleet = Fleet::restore(lconfig.fleet.clone(), store, Snapshot::default()).unwrap();
        let leader = Broker::start_with(lconfig, fleet).await;
        let follower = Broker::start(config(&fview)).await;
        fview.set_role(Role::Follower {
            leader: format!("http://{}", leader.addr),
        });
        Pair {
            leader,
            follower,
            lview,
            fview,
        }
    }

    /// Advances the follower's applied number to whatever the leader
    /// commits, as the controller's tail of the change log would.
    fn replicate(&self) -> tokio::task::JoinHandle<()> {
        let (leader, follower) = (self.lview.clone(), self.fview.clone());
        tokio::spawn(async move {
            loop {
                leader
                    .wait_applied(follower.applied() + 1, Duration::from_secs(3600))
                    .await;
                follower.set_applied(leader.committed());
            }
        })
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(PATIENCE)
        .connect()
        .await
        .unwrap()
}

fn is_uuid(id: &str) -> bool {
    Uuid::parse_str(id).is_ok()
}

/// Writes of every kind through the follower land on the leader; the agent
/// registered, beating and streaming through the follower gets the
/// leader's instructions.
#[tokio::test]
async fn writes_through_the_follower_land_on_the_leader() {
    let pair = Pair::start(None).await;
    let _replicator = pair.replicate();
    let mut agent =
        TestAgent::connect_to(pair.follower.addr, registration("srv", "linux", 4)).await;
    agent.beat(Vec::new()).await;

    // The server is the leader's; the follower's own fleet has nothing
    // (nothing replicates in this test).
    let mut on_leader = ServersClient::new(channel(pair.leader.addr).await);
    let described = on_leader
        .describe_servers(describe_ids(&["srv"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.servers.len(), 1);
    let mut on_follower = ServersClient::new(channel(pair.follower.addr).await);
    let none = on_follower
        .describe_servers(describe_ids(&["srv"]))
        .await
        .unwrap()
        .into_inner();
    assert!(none.servers.is_empty(), "{none:?}");

    // CloseServers, OpenServers.
    let closed = on_follower
        .close_servers(close_req(vec![close_item("srv", None, "patching")]))
        .await
        .unwrap();
    assert!(
        closed.metadata().get(SEQ).is_none(),
        "the follower strips it"
    );
    let closed = closed.into_inner();
    assert_eq!(closed.successful_list.len(), 1, "{closed:?}");
    assert!(is_uuid(&closed.request_id));
    let server = common::describe_one(&mut on_leader, "srv").await;
    assert_eq!(server.holds.len(), 1, "{server:?}");
    assert_eq!(server.holds[0].reason, "patching");
    assert_eq!(server.holds[0].actor, dcv_broker::api::ANONYMOUS_ACTOR);
    let opened = on_follower
        .open_servers(open_req(&["srv"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.successful_list.len(), 1, "{opened:?}");
    assert!(
        common::describe_one(&mut on_leader, "srv")
            .await
            .holds
            .is_empty()
    );

    // CreateSessions: placed by the leader, whose instruction reaches the
    // agent's stream opened at the follower; the agent's report goes
    // through the follower too.
    let mut sessions = SessionsClient::new(channel(pair.follower.addr).await);
    let created = sessions
        .create_sessions(create_req(vec![create_item(
            "s",
            "alice",
            pb::SessionType::Virtual,
        )]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.successful_list.len(), 1, "{created:?}");
    let id = created.successful_list[0].id.clone();
    let instruction = tokio::time::timeout(PATIENCE, agent.next_create())
        .await
        .expect("the instruction reaches the agent through the follower");
    assert_eq!(instruction.session_id, id);
    agent
        .report(
            &id,
            pb::InstructionKind::CreateSession,
            true,
            pb::SessionState::Ready,
        )
        .await;
    let mut leader_sessions = SessionsClient::new(channel(pair.leader.addr).await);
    let session = common::describe_session(&mut leader_sessions, &id).await;
    assert_eq!(session.state, pb::SessionState::Ready as i32);

    // UpdateSessionPermissions, then DeleteSessions: each an instruction
    // on the relayed stream.
    let updated = sessions
        .update_session_permissions(pb::UpdateSessionPermissionsRequest {
            sessions: vec![pb::UpdateSessionPermissionsRequestData {
                session_id: id.clone(),
                owner: "alice".into(),
                permissions_file: "W2dyb3Vwc10K".into(),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.successful_list.len(), 1, "{updated:?}");
    let next = tokio::time::timeout(PATIENCE, agent.next()).await.unwrap();
    assert!(
        matches!(next, Instr::UpdatePermissions(_)),
        "expected UpdatePermissions, got {next:?}"
    );
    let deleted = sessions
        .delete_sessions(pb::DeleteSessionsRequest {
            sessions: vec![pb::DeleteSessionRequestData {
                session_id: id.clone(),
                owner: "alice".into(),
                force: None,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.successful_list.len(), 1, "{deleted:?}");
    let next = tokio::time::timeout(PATIENCE, agent.next()).await.unwrap();
    assert!(
        matches!(next, Instr::DeleteSession(_)),
        "expected DeleteSession, got {next:?}"
    );

    // DeregisterServer.
    let removed = agent
        .client
        .deregister_server(pb::DeregisterServerRequest {
            server_id: "srv".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(removed.removed);
    let gone = on_leader
        .describe_servers(describe_ids(&["srv"]))
        .await
        .unwrap()
        .into_inner();
    assert!(gone.servers.is_empty(), "{gone:?}");
}

/// The leader stamps its replies with its committed number only when
/// clustered; a standalone broker's replies are unchanged.
#[tokio::test]
async fn the_leader_stamps_writes_and_a_standalone_broker_does_not() {
    let pair = Pair::start(None).await;
    let mut agent = AgentClient::new(channel(pair.leader.addr).await);
    let reply = agent
        .register_server(registration("srv", "linux", 4))
        .await
        .unwrap();
    let seq: u64 = reply
        .metadata()
        .get(SEQ)
        .expect("a clustered leader stamps its writes")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(seq, pair.lview.committed());
    assert!(seq > 0);

    let standalone = Broker::quiet().await;
    let reply = standalone
        .agent()
        .await
        .register_server(registration("srv", "linux", 4))
        .await
        .unwrap();
    assert!(reply.metadata().get(SEQ).is_none());
}

/// The follower replies once it has applied what the leader committed for
/// the write, and not before; past the caller's deadline it says why.
#[tokio::test]
async fn the_reply_waits_until_the_follower_applied_the_leaders_change() {
    let pair = Pair::start(None).await;
    // Registered at the leader; the follower starts where the leader is.
    AgentClient::new(channel(pair.leader.addr).await)
        .register_server(registration("srv", "linux", 4))
        .await
        .unwrap();
    pair.fview.set_applied(pair.lview.committed());
    let before = pair.lview.committed();

    let mut servers = ServersClient::new(channel(pair.follower.addr).await);
    let call = tokio::spawn(async move {
        servers
            .close_servers(close_req(vec![close_item("srv", None, "held back")]))
            .await
    });
    // The leader committed the close...
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while pair.lview.committed() == before {
        assert!(tokio::time::Instant::now() < deadline, "the leader commits");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let committed = pair.lview.committed();
    // ...and the follower has not applied it: its reply waits. (Waiting
    // on the applied number itself: the follower subscribes to it.)
    assert!(
        !pair
            .fview
            .wait_applied(committed, Duration::from_millis(200))
            .await
    );
    assert!(!call.is_finished(), "the reply waits for the follower");
    pair.fview.set_applied(committed);
    let reply = tokio::time::timeout(PATIENCE, call)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 1, "{reply:?}");

    // Never applied, with a deadline: UNAVAILABLE, saying so.
    let mut servers = ServersClient::new(channel(pair.follower.addr).await);
    let mut request = tonic::Request::new(open_req(&["srv"]));
    request.set_timeout(Duration::from_secs(1));
    let status = servers.open_servers(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("not yet applied here"),
        "{status:?}"
    );
    // It was done on the leader all the same.
    let mut on_leader = ServersClient::new(channel(pair.leader.addr).await);
    assert!(
        common::describe_one(&mut on_leader, "srv")
            .await
            .holds
            .is_empty()
    );
}

/// A refusal by the leader reaches the caller whole: code, message and
/// BadRequest's field violations.
#[tokio::test]
async fn invalid_argument_details_survive_the_hop() {
    let pair = Pair::start(None).await;
    let _replicator = pair.replicate();
    let mut servers = ServersClient::new(channel(pair.follower.addr).await);
    let status = servers
        .close_servers(close_req(Vec::new()))
        .await
        .unwrap_err();
    let direct = ServersClient::new(channel(pair.leader.addr).await)
        .close_servers(close_req(Vec::new()))
        .await
        .unwrap_err();
    assert_eq!(violations(&status), violations(&direct));
    assert!(!violations(&status).is_empty());
    assert_eq!(status.message(), direct.message());

    let mut agent = AgentClient::new(channel(pair.follower.addr).await);
    let status = agent
        .register_server(registration("", "linux", 4))
        .await
        .unwrap_err();
    let fields = violations(&status);
    assert!(
        fields.iter().any(|(field, _)| field == "ServerId"),
        "{fields:?}"
    );
}

/// Without a leader, writes are UNAVAILABLE with the reason; a forwarded
/// call that reaches a replica that does not lead is not forwarded again.
#[tokio::test]
async fn no_leader_and_no_second_hop_are_unavailable() {
    let pair = Pair::start(None).await;
    pair.fview.set_role(Role::Unavailable {
        why: "the database is unreachable".into(),
    });
    let mut servers = ServersClient::new(channel(pair.follower.addr).await);
    let status = servers
        .close_servers(close_req(vec![close_item("srv", None, "")]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "the database is unreachable");
    // Reads are still served.
    servers.describe_servers(describe_ids(&[])).await.unwrap();

    // A correctly signed forwarded call sent to a follower.
    pair.fview.set_role(Role::Follower {
        leader: format!("http://{}", pair.leader.addr),
    });
    let status = servers
        .close_servers(forwarded(
            close_req(vec![close_item("srv", None, "")]),
            &KEY,
            None,
            SystemTime::now(),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("not the leader"), "{status:?}");
}

/// `message` with forwarding headers signed by `key`.
fn forwarded<T>(
    message: T,
    key: &[u8; 32],
    principal: Option<&Principal>,
    issued: SystemTime,
) -> tonic::Request<T> {
    forwarded_as(message, key, principal, issued, Uuid::new_v4())
}

/// [`forwarded`] with request id `id`.
fn forwarded_as<T>(
    message: T,
    key: &[u8; 32],
    principal: Option<&Principal>,
    issued: SystemTime,
    id: Uuid,
) -> tonic::Request<T> {
    let (value, tag) = sign(key, "elsewhere", principal, id, issued);
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(FORWARDED, value.parse().unwrap());
    request
        .metadata_mut()
        .insert(FORWARDED_MAC, tag.parse().unwrap());
    request
}

/// Forwarding headers a caller makes up count for nothing: a wrong key, a
/// tampered identity, a stale one, a missing signature are all refused,
/// with authentication off too.
#[tokio::test]
async fn forged_or_stale_forwarded_headers_are_refused() {
    let pair = Pair::start(None).await;
    AgentClient::new(channel(pair.leader.addr).await)
        .register_server(registration("srv", "linux", 4))
        .await
        .unwrap();
    let mut servers = ServersClient::new(channel(pair.leader.addr).await);
    let close = || close_req(vec![close_item("srv", None, "forged")]);
    let now = SystemTime::now();

    let refused = [
        forwarded(close(), &[1; 32], None, now),
        forwarded(close(), &KEY, None, now - Duration::from_secs(120)),
        forwarded(close(), &KEY, None, now + Duration::from_secs(120)),
        {
            let mut r = forwarded(close(), &KEY, None, now);
            r.metadata_mut().remove(FORWARDED_MAC);
            r
        },
        {
            let mut r = forwarded(close(), &KEY, None, now);
            r.metadata_mut()
                .insert(FORWARDED_MAC, "00".repeat(32).parse().unwrap());
            r
        },
        {
            // The identity of another (signed) call, under this call's
            // signature: the signature covers the identity.
            let mut r = forwarded(close(), &KEY, None, now);
            let other = forwarded(close(), &KEY, None, now);
            r.metadata_mut()
                .insert(FORWARDED, other.metadata().get(FORWARDED).unwrap().clone());
            r
        },
        {
            let mut r = forwarded(close(), &KEY, None, now);
            r.metadata_mut()
                .insert(FORWARDED, "A".repeat(5000).parse().unwrap());
            r
        },
    ];
    for request in refused {
        let status = servers.close_servers(request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    let mut on_leader = ServersClient::new(channel(pair.leader.addr).await);
    assert!(
        common::describe_one(&mut on_leader, "srv")
            .await
            .holds
            .is_empty(),
        "no forged call changed anything"
    );
    // The same call correctly signed is taken, under the forwarded
    // request id.
    let id = Uuid::new_v4();
    let reply = servers
        .close_servers(forwarded_as(close(), &KEY, None, now, id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 1, "{reply:?}");
    assert_eq!(reply.request_id, id.to_string());

    // A standalone broker has no key: nothing forwarded is taken.
    let standalone = Broker::quiet().await;
    let status = standalone
        .servers()
        .await
        .describe_servers(forwarded(describe_ids(&[]), &KEY, None, now))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

async fn token(
    auth: &Auth,
    name: &str,
    scopes: ScopeSet,
    server: Option<&str>,
) -> (String, String) {
    let registered = auth.register(name, scopes, server).await.unwrap();
    let token = auth
        .issue_token(&registered.client.id, &registered.secret, None)
        .await
        .unwrap()
        .access_token;
    (registered.client.id, token)
}

/// With authentication, the caller's scopes are checked on the forwarded
/// call as on a direct one, and the leader records the caller's client id
/// as the actor; a revoked client's forwarded identity stops counting.
#[tokio::test]
async fn with_auth_the_callers_scopes_and_id_cross_the_hop() {
    // One registry for both replicas: what the database shares.
    let auth = Auth::in_memory(AuthConfig::default()).await.unwrap();
    let pair = Pair::start(Some(auth.clone())).await;
    let _replicator = pair.replicate();
    let (_, agent_token) = token(&auth, "agent", ScopeSet::from(Scope::Agent), Some("srv")).await;
    let (operator, operator_token) =
        token(&auth, "ops", ScopeSet::from(Scope::OperateServers), None).await;
    let (_, reader) = token(&auth, "reader", ScopeSet::from(Scope::Read), None).await;

    let mut agent = AgentClient::new(channel(pair.follower.addr).await);
    agent
        .register_server(bearer(registration("srv", "linux", 4), &agent_token))
        .await
        .unwrap();
    // The agent may act only for its own server, at the leader too.
    let status = agent
        .register_server(bearer(registration("other", "linux", 4), &agent_token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let mut servers = ServersClient::new(channel(pair.follower.addr).await);
    let status = servers
        .close_servers(bearer(
            close_req(vec![close_item("srv", None, "patching")]),
            &reader,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = servers
        .close_servers(close_req(vec![close_item("srv", None, "patching")]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    let closed = servers
        .close_servers(bearer(
            close_req(vec![close_item("srv", None, "patching")]),
            &operator_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(closed.successful_list.len(), 1, "{closed:?}");
    let page = ServersClient::new(channel(pair.leader.addr).await)
        .describe_servers(bearer(describe_ids(&["srv"]), &reader))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.servers[0].holds.len(), 1, "{page:?}");
    assert_eq!(page.servers[0].holds[0].actor, operator);

    // A forwarded identity of a client the leader knows as revoked is
    // refused, even correctly signed.
    let ops = Principal {
        client_id: operator.clone().into(),
        scopes: ScopeSet::from(Scope::OperateServers),
        server_id: None,
    };
    let mut direct = ServersClient::new(channel(pair.leader.addr).await);
    direct
        .open_servers(forwarded(
            open_req(&["srv"]),
            &KEY,
            Some(&ops),
            SystemTime::now(),
        ))
        .await
        .unwrap();
    auth.revoke(&operator).await.unwrap();
    let status = direct
        .open_servers(forwarded(
            open_req(&["srv"]),
            &KEY,
            Some(&ops),
            SystemTime::now(),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // And a signed call with no caller, with authentication on, too.
    let status = direct
        .open_servers(forwarded(open_req(&["srv"]), &KEY, None, SystemTime::now()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

/// The relayed instruction stream ends UNAVAILABLE once the follower no
/// longer follows that leader, so the agent reconnects.
#[tokio::test]
async fn the_relayed_stream_ends_when_the_leader_changes() {
    let pair = Pair::start(None).await;
    let _replicator = pair.replicate();
    let mut agent =
        TestAgent::connect_to(pair.follower.addr, registration("srv", "linux", 4)).await;
    // The stream is open at the leader: a placement reaches it.
    let mut sessions = SessionsClient::new(channel(pair.follower.addr).await);
    sessions
        .create_sessions(create_req(vec![create_item(
            "s",
            "alice",
            pb::SessionType::Virtual,
        )]))
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, agent.next_create())
        .await
        .unwrap();

    pair.fview.set_role(Role::Follower {
        leader: "http://127.0.0.1:1".into(),
    });
    let ended = tokio::time::timeout(PATIENCE, agent.stream.message())
        .await
        .expect("the stream ends");
    let status = ended.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

/// An agent connected straight to the leader: once that broker no longer
/// leads, the new leader holds the agent's instructions, so the stream
/// ends and the agent reconnects.
#[tokio::test]
async fn a_leaders_own_stream_ends_when_it_stops_leading() {
    let pair = Pair::start(None).await;
    let mut agent = TestAgent::connect_to(pair.leader.addr, registration("srv", "linux", 4)).await;
    let mut sessions = SessionsClient::new(channel(pair.leader.addr).await);
    sessions
        .create_sessions(create_req(vec![create_item(
            "s",
            "alice",
            pb::SessionType::Virtual,
        )]))
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, agent.next_create())
        .await
        .unwrap();
    pair.lview.set_role(Role::Follower {
        leader: "http://127.0.0.1:1".into(),
    });
    let ended = tokio::time::timeout(PATIENCE, agent.stream.message())
        .await
        .expect("the stream ends");
    let status = ended.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("no longer leads"), "{status:?}");
}

/// DCV's REST CloseServers through the follower is forwarded as the gRPC
/// call is.
#[tokio::test]
async fn rest_close_through_the_follower() {
    let pair = Pair::start(None).await;
    let _replicator = pair.replicate();
    AgentClient::new(channel(pair.leader.addr).await)
        .register_server(registration("srv", "linux", 4))
        .await
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://{}/closeServers", pair.follower.addr))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(
            br#"[{"ServerId": "srv", "Reason": "rest"}]"#,
        )))
        .unwrap();
    let response = tokio::time::timeout(PATIENCE, client.request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        reply["SuccessfulList"],
        serde_json::json!([{"ServerId": "srv"}]),
        "{reply}"
    );
    assert!(is_uuid(reply["RequestId"].as_str().unwrap()));
    let mut on_leader = ServersClient::new(channel(pair.leader.addr).await);
    let server = common::describe_one(&mut on_leader, "srv").await;
    assert_eq!(server.holds.len(), 1, "{server:?}");
    assert_eq!(server.holds[0].reason, "rest");
}

/// Everything the brokers of a test log, at DEBUG.
#[derive(Clone, Default)]
struct Captured(Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One request id names a forwarded call in the reply and in both brokers'
/// logs.
#[tokio::test]
async fn one_request_id_in_the_reply_and_both_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // This test's runtime runs on this thread only: both brokers log here.
    let _guard = tracing::subscriber::set_default(subscriber);
    let pair = Pair::start(None).await;
    let _replicator = pair.replicate();
    AgentClient::new(channel(pair.leader.addr).await)
        .register_server(registration("srv", "linux", 4))
        .await
        .unwrap();
    let reply = ServersClient::new(channel(pair.follower.addr).await)
        .close_servers(close_req(vec![close_item("srv", None, "logged")]))
        .await
        .unwrap()
        .into_inner();
    let id = reply.request_id;
    let log = String::from_utf8(captured.0.lock().clone()).unwrap();
    let received: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("CloseServers") && line.contains("request received"))
        .collect();
    assert_eq!(received.len(), 2, "one per broker: {log}");
    for line in received {
        assert!(line.contains(&format!("request_id={id}")), "{line}");
    }
}

/// Two replicas serving TLS with one `dcv-broker tls init` certificate:
/// `leader`, and `follower` of it, whose `cluster_ca` is `ca` (`None`:
/// the default, the broker's own certificate file).
async fn tls_pair(dir: &Path, ca: Option<PathBuf>) -> (SocketAddr, SocketAddr, ClusterView) {
    let g = init::generate(&["localhost".into(), "127.0.0.1".into()], 30).unwrap();
    init::write(dir, &g, true).unwrap();
    let tls = ServerTls::load(dir.join(init::SERVER_CERT), dir.join(init::SERVER_KEY)).unwrap();
    let start = |view: ClusterView, ca: Option<PathBuf>| {
        let tls = tls.clone();
        async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let config = BrokerConfig {
                cluster: view,
                cluster_ca: ca,
                ..quiet_config()
            };
            let fleet = Fleet::new(config.fleet.clone()).unwrap();
            tokio::spawn(serve_tls(
                listener,
                fleet,
                config,
                tls,
                std::future::pending(),
            ));
            addr
        }
    };
    let lview = ClusterView::clustered("leader".into());
    lview.set_forwarding_key(KEY);
    lview.set_role(Role::Leader);
    let fview = ClusterView::clustered("follower".into());
    fview.set_forwarding_key(KEY);
    let leader = start(lview, None).await;
    let follower = start(fview.clone(), ca).await;
    fview.set_role(Role::Follower {
        leader: format!("https://127.0.0.1:{}", leader.port()),
    });
    (leader, follower, fview)
}

async fn tls_channel(addr: SocketAddr, ca: &Path) -> Channel {
    let ca = std::fs::read(ca).unwrap();
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .unwrap()
        .timeout(PATIENCE)
        .connect()
        .await
        .unwrap()
}

/// An `https://` leader is trusted through `cluster_ca`, or by default
/// through the certificate the replicas share.
#[tokio::test]
async fn forwarding_to_an_https_leader() {
    for explicit_ca in [true, false] {
        let dir = std::env::temp_dir().join(format!("dcv-broker-forward-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join(init::CA_CERT);
        let (leader, follower, _fview) = tls_pair(&dir, explicit_ca.then(|| ca.clone())).await;
        AgentClient::new(tls_channel(leader, &ca).await)
            .register_server(registration("srv", "linux", 4))
            .await
            .unwrap();
        // Nothing replicates here: OpenServers commits nothing the
        // follower would wait for (the leader's fleet keeps nothing).
        let reply = ServersClient::new(tls_channel(follower, &ca).await)
            .open_servers(open_req(&["srv"]))
            .await;
        let _ = std::fs::remove_dir_all(&dir);
        let reply = reply
            .unwrap_or_else(|e| panic!("explicit CA {explicit_ca}: {e:?}"))
            .into_inner();
        assert_eq!(
            reply.successful_list.len(),
            1,
            "explicit CA {explicit_ca}: {reply:?}"
        );
    }

    // A CA that did not sign the leader's certificate: refused.
    let dir = std::env::temp_dir().join(format!("dcv-broker-forward-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let other = dir.join("other-ca.pem");
    let stranger = init::generate(&["localhost".into()], 30).unwrap();
    std::fs::write(&other, &stranger.ca_cert).unwrap();
    let (_, follower, _fview) = tls_pair(&dir, Some(other)).await;
    let status = ServersClient::new(tls_channel(follower, &dir.join(init::CA_CERT)).await)
        .open_servers(open_req(&["srv"]))
        .await;
    let _ = std::fs::remove_dir_all(&dir);
    let status = status.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}
