//! Idempotent retries (issue 18, acceptance 4): a call retried with the
//! same `ClientToken` after a lost reply gets the first reply again, byte
//! for byte, and is applied once; another request under the same token is
//! refused; tokens expire, survive a restart, are bounded, and work the
//! same over REST's `?ClientToken=`.
//!
//! A real broker on 127.0.0.1:0 called by real clients. The store is a
//! recorder (optionally over a real SQLite store) that counts what the
//! broker wrote and can hold a write back, so "applied once" is what the
//! broker submitted, and a call in flight is held by an explicit gate, not
//! by timing.

mod common;

use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use common::{agent_process::TempDir, *};
use dcv_broker::{
    BrokerConfig,
    fleet::{
        Fleet, FleetConfig,
        persist::{Change, Durable, Snapshot, Store},
    },
    pb,
    store::SqliteStore,
};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use prost::Message as _;
use tokio::sync::{oneshot, watch};
use tonic::{Code, transport::Channel};

/// A held write's acknowledgement.
type Ack = oneshot::Sender<Result<(), String>>;

/// Records every change submitted, passes them on to `inner` (when there
/// is one), and while held keeps writes from becoming durable.
#[derive(Debug)]
struct Recorder {
    inner: Option<Arc<dyn Store>>,
    changes: Mutex<Vec<Change>>,
    held: Mutex<Option<Vec<Ack>>>,
    waiting: watch::Sender<usize>,
    /// While set, kept replies never reach `inner`: the broker "crashes"
    /// between a call's changes and its reply's record.
    lose_replies: std::sync::atomic::AtomicBool,
}

impl Recorder {
    fn new(inner: Option<Arc<dyn Store>>) -> Arc<Recorder> {
        Arc::new(Recorder {
            inner,
            changes: Mutex::new(Vec::new()),
            held: Mutex::new(None),
            waiting: watch::channel(0).0,
            lose_replies: Default::default(),
        })
    }

    /// How many submitted changes `pick` selects.
    fn count(&self, pick: impl Fn(&Change) -> bool) -> usize {
        self.changes
            .lock()
            .unwrap()
            .iter()
            .filter(|c| pick(c))
            .count()
    }

    fn server_writes(&self, id: &str) -> usize {
        self.count(|c| matches!(c, Change::PutServerState { id: i, .. } if i == id))
    }

    fn audits(&self, method: &str) -> usize {
        self.count(|c| matches!(c, Change::PutAudit(r) if r.method == method))
    }

    /// Replies kept under a token.
    fn tokens(&self) -> usize {
        self.count(|c| matches!(c, Change::PutClientToken(t) if !t.reply.is_empty()))
    }

    /// Tokens claimed (stored without a reply, ahead of the call).
    fn claims(&self) -> usize {
        self.count(|c| matches!(c, Change::PutClientToken(t) if t.reply.is_empty()))
    }

    fn hold(&self) {
        *self.held.lock().unwrap() = Some(Vec::new());
    }

    async fn waiting(&self, n: usize) {
        self.waiting
            .subscribe()
            .wait_for(|w| *w >= n)
            .await
            .unwrap();
    }

    fn release(&self) {
        for ack in self.held.lock().unwrap().take().unwrap_or_default() {
            let _ = ack.send(Ok(()));
        }
    }
}

impl Store for Recorder {
    fn submit(&self, changes: Vec<Change>) -> Durable {
        self.changes.lock().unwrap().extend(changes.iter().cloned());
        if let Some(held) = self.held.lock().unwrap().as_mut() {
            let (ack, acked) = oneshot::channel();
            held.push(ack);
            self.waiting.send_modify(|n| *n += 1);
            return Durable::pending(acked);
        }
        let changes: Vec<Change> = if self.lose_replies.load(Ordering::SeqCst) {
            changes
                .into_iter()
                .filter(|c| !matches!(c, Change::PutClientToken(t) if !t.reply.is_empty()))
                .collect()
        } else {
            changes
        };
        match &self.inner {
            Some(store) => store.submit(changes),
            None => Durable::done(),
        }
    }
}

fn config(fleet: FleetConfig) -> BrokerConfig {
    BrokerConfig {
        fleet,
        rest_additions: true,
        ..quiet_config()
    }
}

/// A broker over a recorder with no store behind it.
async fn recorded(fleet: FleetConfig) -> (Broker, Arc<Recorder>) {
    let recorder = Recorder::new(None);
    let config = config(fleet);
    let fleet =
        Fleet::restore(config.fleet.clone(), recorder.clone(), Snapshot::default()).unwrap();
    (Broker::start_with(config, fleet).await, recorder)
}

fn tokened_close(ids: &[&str], token: &str) -> pb::CloseServersRequest {
    pb::CloseServersRequest {
        client_token: token.into(),
        ..close_req(
            ids.iter()
                .map(|id| close_item(id, Some(true), "maintenance"))
                .collect(),
        )
    }
}

#[tokio::test]
async fn a_lost_close_reply_is_replayed_and_the_close_applied_once() {
    let (broker, recorder) = recorded(FleetConfig::default()).await;
    let mut agent = broker.agent().await;
    register(&mut agent, "s1", "linux", 4).await;
    let mut servers = broker.servers().await;

    // The first reply is "lost": the caller only ever sees the retry's.
    let first = servers
        .close_servers(tokened_close(&["s1"], "maint-42"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.successful_list.len(), 1);
    let closed = describe_one(&mut servers, "s1").await;
    assert_eq!(closed.holds.len(), 1);
    // Someone reopens the server before the retry arrives: a retry that
    // applied the close again would close it again.
    servers.open_servers(open_req(&["s1"])).await.unwrap();
    let writes = recorder.server_writes("s1");
    assert_eq!(writes, 2, "one close, one open");

    let retry = servers
        .close_servers(tokened_close(&["s1"], "maint-42"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        retry.encode_to_vec(),
        first.encode_to_vec(),
        "byte-identical"
    );
    assert_eq!(retry.request_id, first.request_id);
    assert!(describe_one(&mut servers, "s1").await.holds.is_empty());
    assert_eq!(
        recorder.server_writes("s1"),
        writes,
        "nothing applied again"
    );
    assert_eq!(recorder.audits("CloseServers"), 1, "audited once");
    assert_eq!(recorder.tokens(), 1);

    // The same token is the caller's for CloseServers only: OpenServers
    // has its own.
    let open = pb::OpenServersRequest {
        client_token: "maint-42".into(),
        ..open_req(&["s1"])
    };
    let opened = servers.open_servers(open).await.unwrap().into_inner();
    assert_ne!(opened.request_id, first.request_id);
    assert_eq!(recorder.tokens(), 2);
}

#[tokio::test]
async fn the_same_token_with_another_request_is_refused_and_changes_nothing() {
    let (broker, recorder) = recorded(FleetConfig::default()).await;
    let mut agent = broker.agent().await;
    register(&mut agent, "s1", "linux", 4).await;
    register(&mut agent, "s2", "linux", 4).await;
    let mut servers = broker.servers().await;
    servers
        .close_servers(tokened_close(&["s1"], "t-1"))
        .await
        .unwrap();
    let writes = recorder.server_writes("s2");
    let refused = servers
        .close_servers(tokened_close(&["s2"], "t-1"))
        .await
        .unwrap_err();
    let violations = violations(&refused);
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!(violations[0].0, "ClientToken");
    assert!(
        violations[0]
            .1
            .starts_with("this ClientToken was used with a different request"),
        "{violations:?}"
    );
    assert!(describe_one(&mut servers, "s2").await.holds.is_empty());
    assert_eq!(recorder.server_writes("s2"), writes);
}

#[tokio::test]
async fn a_malformed_token_is_invalid_and_changes_nothing() {
    let (broker, recorder) = recorded(FleetConfig::default()).await;
    let mut agent = broker.agent().await;
    register(&mut agent, "s1", "linux", 4).await;
    let mut servers = broker.servers().await;
    for token in ["x".repeat(65), "tab\there".into(), "é".into()] {
        let refused = servers
            .close_servers(tokened_close(&["s1"], &token))
            .await
            .unwrap_err();
        let violations = violations(&refused);
        assert_eq!(violations[0].0, "ClientToken", "{token:?}: {violations:?}");
    }
    assert_eq!(recorder.server_writes("s1"), 0);
    // 64 printable characters are a token.
    let longest = "~".repeat(64);
    servers
        .close_servers(tokened_close(&["s1"], &longest))
        .await
        .unwrap();
    assert_eq!(recorder.tokens(), 1);
}

#[tokio::test]
async fn a_create_sessions_retry_creates_one_session() {
    let (broker, recorder) = recorded(FleetConfig::default()).await;
    let mut agent = TestAgent::connect(&broker, registration("s1", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    let request = desk_for_alice("create-1");
    let first = create_one(&mut sessions, request.clone()).await;
    agent.next_create().await;
    let retry = sessions
        .create_sessions(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry.encode_to_vec(), first.encode_to_vec());
    assert_eq!(
        only_session(&mut sessions).await,
        first.successful_list[0].id
    );
    assert_eq!(recorder.audits("CreateSessions"), 1);
}

#[tokio::test]
async fn a_retry_while_the_first_call_runs_is_aborted_and_applied_once() {
    let (broker, recorder) = recorded(FleetConfig::default()).await;
    let mut agent = broker.agent().await;
    register(&mut agent, "s1", "linux", 4).await;
    let mut servers = broker.servers().await;
    recorder.hold();
    let mut first_client = servers.clone();
    let first = tokio::spawn(async move {
        first_client
            .close_servers(tokened_close(&["s1"], "slow"))
            .await
    });
    // The close is applied and waits for its write to be durable.
    recorder.waiting(1).await;
    let busy = servers
        .close_servers(tokened_close(&["s1"], "slow"))
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::Aborted, "{busy:?}");
    assert!(busy.message().contains("still running"), "{busy:?}");
    recorder.release();
    let first = first.await.unwrap().unwrap().into_inner();
    let retry = servers
        .close_servers(tokened_close(&["s1"], "slow"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry, first);
    assert_eq!(recorder.server_writes("s1"), 1);
}

#[tokio::test(start_paused = true)]
async fn tokens_expire_after_the_retention() {
    let retention = Duration::from_secs(3600);
    let (broker, _recorder) = recorded(FleetConfig {
        client_token_retention: retention,
        // Silent agents' servers stay known across the advance.
        remove_after: retention * 10,
        ..FleetConfig::default()
    })
    .await;
    let mut agent = broker.agent().await;
    register(&mut agent, "s1", "linux", 4).await;
    register(&mut agent, "s2", "linux", 4).await;
    let mut servers = broker.servers().await;
    servers
        .close_servers(tokened_close(&["s1"], "t"))
        .await
        .unwrap();
    tokio::time::advance(retention - Duration::from_secs(1)).await;
    let refused = servers
        .close_servers(tokened_close(&["s2"], "t"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    tokio::time::advance(Duration::from_secs(1)).await;
    // Expired: the token is new again, whatever it was used for.
    let reply = servers
        .close_servers(tokened_close(&["s2"], "t"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list[0].server_id, "s2");
    assert_eq!(describe_one(&mut servers, "s2").await.holds.len(), 1);
}

#[tokio::test]
async fn a_full_table_refuses_new_tokens_and_still_replays() {
    let (broker, _recorder) = recorded(FleetConfig {
        client_token_limit: 2,
        ..FleetConfig::default()
    })
    .await;
    let mut agent = broker.agent().await;
    for id in ["s1", "s2", "s3"] {
        register(&mut agent, id, "linux", 4).await;
    }
    let mut servers = broker.servers().await;
    let first = servers
        .close_servers(tokened_close(&["s1"], "a"))
        .await
        .unwrap()
        .into_inner();
    servers
        .close_servers(tokened_close(&["s2"], "b"))
        .await
        .unwrap();
    let full = servers
        .close_servers(tokened_close(&["s3"], "c"))
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(full.message().contains("--client-token-limit"), "{full:?}");
    assert!(describe_one(&mut servers, "s3").await.holds.is_empty());
    // Live tokens still answer, and calls without one are untouched.
    let again = servers
        .close_servers(tokened_close(&["s1"], "a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, first);
    servers
        .close_servers(tokened_close(&["s3"], ""))
        .await
        .unwrap();
    assert_eq!(describe_one(&mut servers, "s3").await.holds.len(), 1);
}

/// A CreateSessions of one virtual session, `desk` for `alice`, under
/// `token`.
fn desk_for_alice(token: &str) -> pb::CreateSessionsRequest {
    pb::CreateSessionsRequest {
        client_token: token.into(),
        ..create_req(vec![create_item("desk", "alice", pb::SessionType::Virtual)])
    }
}

/// The id of the broker's one session (a retry must not make a second).
async fn only_session(sessions: &mut pb::sessions_client::SessionsClient<Channel>) -> String {
    let all = sessions
        .describe_sessions(pb::DescribeSessionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.sessions.len(), 1, "one session: {all:?}");
    all.sessions[0].id.clone()
}

/// A broker over the SQLite store in `dir`, through a recorder.
async fn durable(dir: &std::path::Path) -> (Broker, Arc<Recorder>) {
    let (store, snapshot) = SqliteStore::open(dir).unwrap();
    let recorder = Recorder::new(Some(Arc::new(store)));
    let fleet = Fleet::restore(FleetConfig::default(), recorder.clone(), snapshot).unwrap();
    let broker = Broker::start_with(config(FleetConfig::default()), fleet).await;
    (broker, recorder)
}

/// Stops `broker` and waits until it has (its store closes with it).
async fn stop(mut broker: Broker) {
    broker.stop();
    (&mut broker.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn tokens_survive_a_restart() {
    let dir = TempDir::new("dcv-client-token");
    let first = {
        let (broker, _recorder) = durable(dir.path()).await;
        let mut agent = broker.agent().await;
        register(&mut agent, "s1", "linux", 4).await;
        register(&mut agent, "s2", "linux", 4).await;
        let mut servers = broker.servers().await;
        let first = servers
            .close_servers(tokened_close(&["s1"], "durable"))
            .await
            .unwrap()
            .into_inner();
        stop(broker).await;
        first
    };
    let (broker, recorder) = durable(dir.path()).await;
    let mut servers = broker.servers().await;
    let retry = servers
        .close_servers(tokened_close(&["s1"], "durable"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry.encode_to_vec(), first.encode_to_vec());
    assert_eq!(recorder.server_writes("s1"), 0, "nothing applied again");
    let refused = servers
        .close_servers(tokened_close(&["s2"], "durable"))
        .await
        .unwrap_err();
    assert_eq!(violations(&refused)[0].0, "ClientToken");
}

/// One REST call's status and body.
async fn post(broker: &Broker, path_and_query: &str, body: &str) -> (http::StatusCode, Bytes) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::post(format!("http://{}{path_and_query}", broker.addr))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

fn json(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).unwrap()
}

#[tokio::test]
async fn rest_takes_the_token_and_request_fields_as_query_parameters() {
    let (broker, recorder) = recorded(FleetConfig::default()).await;
    let mut agent = broker.agent().await;
    register(&mut agent, "s1", "linux", 4).await;
    register(&mut agent, "s2", "linux", 4).await;
    let mut servers = broker.servers().await;
    let body = r#"[{"ServerId":"s1","Force":true}]"#;

    let (status, first) = post(&broker, "/closeServers?ClientToken=rest%201", body).await;
    assert_eq!(status, http::StatusCode::OK, "{first:?}");
    let (status, retry) = post(&broker, "/closeServers?ClientToken=rest+1", body).await;
    assert_eq!(status, http::StatusCode::OK);
    assert_eq!(retry, first, "byte-identical JSON");
    assert_eq!(recorder.server_writes("s1"), 1);
    // The same token over gRPC is the same caller's same method.
    let grpc = servers
        .close_servers(pb::CloseServersRequest {
            client_token: "rest 1".into(),
            ..close_req(vec![close_item("s1", Some(true), "")])
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grpc.request_id, json(&first)["RequestId"]);

    let (status, refused) = post(
        &broker,
        "/closeServers?ClientToken=rest%201",
        r#"[{"ServerId":"s2","Force":true}]"#,
    )
    .await;
    assert_eq!(status, http::StatusCode::BAD_REQUEST);
    assert_eq!(
        json(&refused)["field_violations"][0]["field"],
        "ClientToken"
    );

    // A dry run by query parameter changes nothing and keeps no token.
    let (status, dry) = post(
        &broker,
        "/closeServers?DryRun=true&CapacityTagKey=pool&ClientToken=dry",
        r#"[{"ServerId":"s2","Force":true}]"#,
    )
    .await;
    assert_eq!(status, http::StatusCode::OK, "{dry:?}");
    assert_eq!(json(&dry)["DryRun"], true);
    assert!(describe_one(&mut servers, "s2").await.holds.is_empty());
    assert_eq!(recorder.tokens(), 1);

    // Unknown parameters, repeated ones and wrong types are 400s naming
    // them.
    let (status, unknown) = post(&broker, "/closeServers?Bogus=1&ClientToken=x", body).await;
    assert_eq!(status, http::StatusCode::BAD_REQUEST);
    let unknown = json(&unknown);
    assert_eq!(
        unknown["field_violations"][0]["field"], "Bogus",
        "{unknown}"
    );
    let (status, typed) = post(&broker, "/closeServers?DryRun=maybe", body).await;
    assert_eq!(status, http::StatusCode::BAD_REQUEST);
    assert_eq!(json(&typed)["field_violations"][0]["field"], "DryRun");
    let (status, twice) = post(
        &broker,
        "/openServers?ClientToken=a&ClientToken=b",
        r#"[{"ServerId":"s1"}]"#,
    )
    .await;
    assert_eq!(status, http::StatusCode::BAD_REQUEST);
    assert_eq!(json(&twice)["field_violations"][0]["field"], "ClientToken");
    let (status, describe) = post(&broker, "/describeServers?MaxResults=1", "{}").await;
    assert_eq!(status, http::StatusCode::BAD_REQUEST, "{describe:?}");
    assert_eq!(
        json(&describe)["field_violations"][0]["field"],
        "MaxResults"
    );
    assert_eq!(recorder.server_writes("s2"), 0);
}

/// The window a crash leaves: the call's changes are durable, its reply's
/// record is not. After a restart the retry must not run again (a second
/// session); it is told the outcome is unknown, and its token still names
/// its request.
#[tokio::test]
async fn a_retry_after_a_crash_before_the_reply_was_kept_is_not_applied_again() {
    let dir = TempDir::new("dcv-client-token-crash");
    let request = desk_for_alice("create-crash");
    let first = {
        let (broker, recorder) = durable(dir.path()).await;
        recorder.lose_replies.store(true, Ordering::SeqCst);
        let mut agent = broker.agent().await;
        register(&mut agent, "s1", "linux", 4).await;
        let mut sessions = broker.sessions().await;
        let first = create_one(&mut sessions, request.clone()).await;
        assert_eq!((recorder.claims(), recorder.tokens()), (1, 1));
        stop(broker).await;
        first
    };
    let (broker, recorder) = durable(dir.path()).await;
    let mut sessions = broker.sessions().await;
    let retry = sessions.create_sessions(request.clone()).await.unwrap_err();
    assert_eq!(retry.code(), Code::FailedPrecondition, "{retry:?}");
    assert!(
        retry.message().contains("may or may not have been applied"),
        "{retry:?}"
    );
    assert_eq!(
        only_session(&mut sessions).await,
        first.successful_list[0].id
    );
    assert_eq!(recorder.audits("CreateSessions"), 0, "nothing run again");
    let other = pb::CreateSessionsRequest {
        client_token: "create-crash".into(),
        ..create_req(vec![create_item("other", "bob", pb::SessionType::Virtual)])
    };
    let refused = sessions.create_sessions(other).await.unwrap_err();
    assert_eq!(violations(&refused)[0].0, "ClientToken");
    // A new token goes through.
    create_one(&mut sessions, desk_for_alice("create-crash-2")).await;
}
