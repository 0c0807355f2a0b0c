//! The PostgreSQL store's side of several brokers on one database, against
//! a real PostgreSQL (see `tests/common/postgres.rs`): one leader at a
//! time, judged by the database's clock, and a takeover only after expiry;
//! a writer whose lease was taken commits nothing; the change log is
//! gap-free and ordered; a follower's tail sees each committed group as
//! one batch (puts, deletes, heartbeats), woken by NOTIFY or, without it,
//! by polling; a pruned log is a gap; a held lease is lost when the row is
//! taken, when the database stops, and when it hangs; a writer fails when
//! the database stops; connections the server ends are remade (control,
//! lease) or reported (writer, tail); every replica reads the same shared
//! secrets.
//!
//! Nothing waits by sleeping: each test waits for a condition, with a
//! deadline.

mod common;

use std::{
    collections::BTreeMap,
    future::Future,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::postgres::TestDatabase;
use dcv_broker::{
    cluster::ClusterView,
    demo,
    fleet::{
        Heartbeat, Hold, HoldKind, LoadAverage, SessionKind, SessionState,
        persist::{
            Change, Snapshot, Store as _, StoredClient, StoredLiveness, StoredServer, StoredSession,
        },
    },
    store::postgres::{
        Batch, ClusterOptions, Database, Elected, FORWARDING_KEY, PAGE_IDS, PAGE_ROWS,
        PostgresStore, TailError, TailOptions,
    },
};
use tokio::time::Instant;

/// The lease the tests run with.
const LEASE: Duration = Duration::from_secs(1);

/// The pause between two checks of a polled condition.
const POLL: Duration = Duration::from_millis(20);

/// How long any awaited condition may take on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(20);

fn at(seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds)
}

fn opts(node: &str) -> ClusterOptions {
    ClusterOptions {
        node: node.into(),
        advertise: format!("http://{node}.example:8443"),
        lease: LEASE,
    }
}

async fn connect(db: &TestDatabase) -> Database {
    Database::connect(&db.url)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {PATIENCE:?}"))
}

/// Elects `node` until it leads (the lease must expire first).
async fn lead(database: &Database, node: &str) -> (i64, u64) {
    within("an election", async {
        loop {
            match database.elect(&opts(node), None).await.unwrap() {
                Elected::Leader { epoch, seq } => return (epoch, seq),
                // Polled, not slept on: the loop ends on the condition.
                Elected::Follower { .. } => tokio::time::sleep(POLL).await,
            }
        }
    })
    .await
}

fn server(i: usize, holds: Vec<Hold>) -> StoredServer {
    StoredServer {
        id: demo::server_id(i),
        description: demo::description(i),
        holds,
        state_version: 0,
        registered_at: at(1_700_000_000 + i as u64),
        last_seen: at(1_700_100_000 + i as u64),
        agent_departed: false,
    }
}

fn session(id: &str, server: usize) -> StoredSession {
    StoredSession {
        id: id.into(),
        name: format!("{id}-name"),
        owner: "alice".into(),
        kind: SessionKind::Virtual,
        server: Some(demo::server_id(server)),
        state: SessionState::Ready,
        substate: None,
        state_reason: String::new(),
        created_at: at(1_700_000_500),
        request: None,
        permissions_file: String::new(),
        tried: vec![demo::server_id(server + 1)],
        deadline: None,
        forgotten: false,
        queue_position: None,
        deletions: 0,
    }
}

fn client(id: &str) -> StoredClient {
    StoredClient {
        id: id.into(),
        name: format!("{id} name"),
        secret_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        scopes: vec!["sm_api/read".into()],
        server_id: None,
        created_at: at(1_700_000_000),
        revoked_at: None,
    }
}

fn liveness(i: usize, users: &[&str]) -> StoredLiveness {
    StoredLiveness {
        id: demo::server_id(i),
        last_seen: UNIX_EPOCH + Duration::from_micros(1_700_200_000_123_456),
        heartbeat: Heartbeat {
            dcv_server_healthy: true,
            logged_in_users: users.iter().map(|u| (*u).to_owned()).collect(),
            cpu_load_average: Some(LoadAverage {
                one_minute: 0.25,
                five_minutes: 0.5,
                fifteen_minutes: 0.75,
            }),
            ..Heartbeat::default()
        },
    }
}

/// DCV's hold and a named one that ends by itself.
fn two_holds() -> Vec<Hold> {
    vec![
        closed("ops"),
        Hold {
            name: "team:db-7".into(),
            expires_at: Some(at(1_800_000_000)),
            drain: None,
            ..closed("dba")
        },
    ]
}

fn closed(actor: &str) -> Hold {
    Hold {
        kind: HoldKind::Closed,
        name: dcv_broker::fleet::DEFAULT_HOLD_NAME.into(),
        expires_at: None,
        drain: None,
        actor: actor.into(),
        since: at(1_700_000_900),
        reason: "maintenance".into(),
    }
}

async fn put(store: &PostgresStore, changes: Vec<Change>) {
    store
        .submit(changes)
        .wait()
        .await
        .unwrap_or_else(|e| panic!("a submission failed: {e}"));
}

/// A query's single i64 column.
async fn numbers(db: &TestDatabase, sql: &str) -> Vec<i64> {
    db.connect()
        .await
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// What a follower's memory would hold after applying batches to a
/// snapshot: records by id (liveness aside).
#[derive(Debug, Default, PartialEq)]
struct Model {
    servers: BTreeMap<String, StoredServer>,
    sessions: BTreeMap<String, StoredSession>,
    clients: BTreeMap<String, StoredClient>,
    secrets: BTreeMap<String, Vec<u8>>,
}

impl Model {
    fn of(snapshot: Snapshot) -> Model {
        Model {
            servers: snapshot
                .servers
                .into_iter()
                .map(|s| (s.id.clone(), s))
                .collect(),
            sessions: snapshot
                .sessions
                .into_iter()
                .map(|s| (s.id.clone(), s))
                .collect(),
            clients: snapshot
                .clients
                .into_iter()
                .map(|c| (c.id.clone(), c))
                .collect(),
            secrets: snapshot.secrets.into_iter().collect(),
        }
    }

    fn apply(&mut self, batch: &Batch) {
        for change in &batch.changes {
            match change.clone() {
                Change::PutServer(s) => {
                    self.servers.insert(s.id.clone(), s);
                }
                Change::DeleteServer(id) => {
                    self.servers.remove(&id);
                }
                Change::PutSession(s) => {
                    self.sessions.insert(s.id.clone(), s);
                }
                Change::DeleteSession(id) => {
                    self.sessions.remove(&id);
                }
                Change::PutClient(c) => {
                    self.clients.insert(c.id.clone(), c);
                }
                Change::PutSecret { name, value } => {
                    self.secrets.insert(name, value);
                }
                Change::PutLiveness(_) => {}
                other @ (Change::PutServerState { .. }
                | Change::PutAudit(_)
                | Change::PruneAudit { .. }
                | Change::PutClientToken(_)
                | Change::PruneClientTokens { .. }) => {
                    panic!("a tail passes full records, not {other:?}")
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_one_replica_leads_at_a_time() {
    let db = TestDatabase::new().await;
    let mut replicas = Vec::new();
    for _ in 0..5 {
        replicas.push(connect(&db).await);
    }
    let elections = replicas.iter().enumerate().map(|(i, replica)| {
        let replica = replica.clone();
        tokio::spawn(async move { replica.elect(&opts(&format!("n{i}")), None).await })
    });
    let mut leaders = Vec::new();
    let mut followers = Vec::new();
    for (i, election) in elections.enumerate() {
        match election.await.unwrap().unwrap() {
            Elected::Leader { epoch, seq } => leaders.push((i, epoch, seq)),
            Elected::Follower { epoch, leader } => followers.push((epoch, leader)),
        }
    }
    assert_eq!(leaders.len(), 1, "{leaders:?} {followers:?}");
    let (winner, epoch, seq) = leaders[0];
    assert_eq!((epoch, seq), (1, 0));
    for follower in followers {
        assert_eq!(follower, (1, opts(&format!("n{winner}")).advertise));
    }
}

#[tokio::test]
async fn a_takeover_waits_for_the_lease_to_expire_on_the_database_clock() {
    let db = TestDatabase::new().await;
    let (a, b) = (connect(&db).await, connect(&db).await);
    assert_eq!(
        a.elect(&opts("a"), None).await.unwrap(),
        Elected::Leader { epoch: 1, seq: 0 }
    );
    // A renewal keeps the epoch; it is sent at `renewed`, so the row
    // expires no earlier than `renewed + LEASE` on any clock.
    let renewed = Instant::now();
    assert_eq!(
        a.elect(&opts("a"), Some(1)).await.unwrap(),
        Elected::Leader { epoch: 1, seq: 0 }
    );
    assert_eq!(
        b.elect(&opts("b"), None).await.unwrap(),
        Elected::Follower {
            epoch: 1,
            leader: opts("a").advertise
        }
    );
    let (epoch, _) = lead(&b, "b").await;
    assert!(
        renewed.elapsed() >= LEASE,
        "b took over {:?} after a's renewal, before the lease of {LEASE:?} ran out",
        renewed.elapsed()
    );
    assert_eq!(epoch, 2, "a takeover raises the epoch");
    assert_eq!(
        a.elect(&opts("a"), Some(1)).await.unwrap(),
        Elected::Follower {
            epoch: 2,
            leader: opts("b").advertise
        },
        "the old leader cannot renew what it lost"
    );
    assert_eq!(
        b.elect(&opts("b"), Some(2)).await.unwrap(),
        Elected::Leader { epoch: 2, seq: 0 }
    );
}

#[tokio::test]
async fn a_writer_whose_lease_was_taken_commits_nothing() {
    let db = TestDatabase::new().await;
    let (a, b) = (connect(&db).await, connect(&db).await);
    let (epoch_a, _) = lead(&a, "a").await;
    let view_a = ClusterView::clustered("a".into());
    let writer_a = a
        .start_writer(&opts("a"), epoch_a, view_a.clone())
        .await
        .unwrap();
    assert!(dcv_broker::fleet::persist::Store::keeps_liveness(&writer_a));
    put(&writer_a, vec![Change::PutServer(server(0, Vec::new()))]).await;
    assert_eq!(
        view_a.committed(),
        1,
        "published before the submitter was told"
    );
    assert_eq!(view_a.applied(), 1);

    // b takes the lease once it expired (a is paused: it never renews).
    let (epoch_b, seq) = lead(&b, "b").await;
    assert_eq!((epoch_b, seq), (epoch_a + 1, 1));

    let failed = writer_a.failed();
    let result = writer_a
        .submit(vec![
            Change::PutServer(server(1, Vec::new())),
            Change::PutClient(client("c1")),
        ])
        .wait()
        .await;
    assert!(result.is_err(), "a fenced group is not acknowledged");
    assert_eq!(
        failed.borrow().as_deref(),
        Some("this broker lost the leader lease")
    );
    let later = writer_a
        .submit(vec![Change::PutServer(server(2, Vec::new()))])
        .wait()
        .await;
    assert!(later.is_err(), "a failed writer refuses everything after");
    assert_eq!(view_a.committed(), 1);

    let (snapshot, seq) = b.snapshot().await.unwrap();
    assert_eq!(seq, 1);
    assert_eq!(snapshot.servers, vec![server(0, Vec::new())]);
    assert!(snapshot.clients.is_empty());
    assert_eq!(
        numbers(&db, "SELECT seq FROM dcv_broker_changes").await,
        [1]
    );

    // The new leader goes on from the log's seq, without a gap.
    let view_b = ClusterView::clustered("b".into());
    let writer_b = b
        .start_writer(&opts("b"), epoch_b, view_b.clone())
        .await
        .unwrap();
    put(&writer_b, vec![Change::PutServer(server(3, Vec::new()))]).await;
    assert_eq!(view_b.committed(), 2);
    assert_eq!(
        numbers(&db, "SELECT epoch FROM dcv_broker_changes ORDER BY seq").await,
        [epoch_a, epoch_b]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_log_is_gap_free_and_a_tail_sees_each_group_as_one_batch() {
    let db = TestDatabase::new().await;
    let (a, b) = (connect(&db).await, connect(&db).await);
    let (epoch, _) = lead(&a, "a").await;
    let view = ClusterView::clustered("a".into());
    let writer = a
        .start_writer(&opts("a"), epoch, view.clone())
        .await
        .unwrap();
    let (start, from) = b.snapshot().await.unwrap();
    assert_eq!(from, 0);
    let mut model = Model::of(start);
    let mut tail = b.tail(from).await.unwrap();

    assert!(demo::server_id(1) < demo::server_id(0));
    put(
        &writer,
        vec![
            Change::PutServer(server(0, Vec::new())),
            Change::PutServer(server(1, Vec::new())),
            Change::PutClient(client("c1")),
            Change::PutSecret {
                name: "extra".into(),
                value: vec![7; 32],
            },
        ],
    )
    .await;
    let batch = within("batch 1", tail.next()).await.unwrap();
    assert_eq!(
        batch,
        Batch {
            seq: 1,
            committed_at: batch.committed_at,
            changes: vec![
                Change::PutSecret {
                    name: "extra".into(),
                    value: vec![7; 32]
                },
                Change::PutClient(client("c1")),
                // Records of a kind come in byte order of their ids.
                Change::PutServer(server(1, Vec::new())),
                Change::PutServer(server(0, Vec::new())),
            ]
        }
    );
    model.apply(&batch);

    // Two submissions committed in one group would be one row; submitted
    // one after the other, each is its own.
    put(
        &writer,
        vec![
            Change::PutSession(session("s1", 0)),
            Change::PutLiveness(liveness(0, &["old"])),
            Change::PutLiveness(liveness(1, &[])),
            Change::PutLiveness(liveness(0, &["alice", "bob"])),
        ],
    )
    .await;
    let batch = within("batch 2", tail.next()).await.unwrap();
    assert_eq!(
        batch,
        Batch {
            seq: 2,
            committed_at: batch.committed_at,
            changes: vec![
                Change::PutSession(session("s1", 0)),
                // The last heartbeat of each server, in first-seen order.
                Change::PutLiveness(liveness(0, &["alice", "bob"])),
                Change::PutLiveness(liveness(1, &[])),
            ]
        }
    );
    model.apply(&batch);

    put(
        &writer,
        vec![
            Change::DeleteSession("s1".into()),
            Change::DeleteServer(demo::server_id(1)),
            Change::PutServerState {
                id: demo::server_id(0),
                holds: two_holds(),
                state_version: 5,
                agent_departed: true,
            },
        ],
    )
    .await;
    let batch = within("batch 3", tail.next()).await.unwrap();
    // A follower sees the state as the whole server: its named holds,
    // their expiries and its state version.
    let held = StoredServer {
        agent_departed: true,
        state_version: 5,
        ..server(0, two_holds())
    };
    assert_eq!(
        batch,
        Batch {
            seq: 3,
            committed_at: batch.committed_at,
            changes: vec![
                Change::PutServer(held.clone()),
                Change::DeleteSession("s1".into()),
                Change::DeleteServer(demo::server_id(1)),
            ]
        }
    );
    model.apply(&batch);

    // Many concurrent submitters: groups of any size, committed in order.
    let submitted: Vec<_> = (10..60)
        .map(|i| {
            let writer = writer.clone();
            tokio::spawn(async move {
                let mut changes = vec![Change::PutServer(server(i, Vec::new()))];
                if i % 3 == 0 {
                    changes.push(Change::DeleteServer(demo::server_id(i - 1)));
                }
                if i % 5 == 0 {
                    changes.push(Change::PutSession(session(&format!("s{i}"), i)));
                }
                writer.submit(changes).wait().await
            })
        })
        .collect();
    for submission in submitted {
        submission.await.unwrap().unwrap();
    }
    let last = view.committed();
    let seqs = numbers(&db, "SELECT seq FROM dcv_broker_changes ORDER BY seq").await;
    assert_eq!(
        seqs,
        (1..=i64::try_from(last).unwrap()).collect::<Vec<_>>(),
        "the log is gap-free and ends at the last commit"
    );
    assert_eq!(
        numbers(&db, "SELECT seq FROM dcv_broker_leader").await,
        [i64::try_from(last).unwrap()]
    );
    let mut seen = 3;
    while seen < last {
        let batch = within("the rest", tail.next()).await.unwrap();
        assert!(batch.seq > seen, "batches come in order");
        seen = batch.seq;
        model.apply(&batch);
    }
    assert_eq!(seen, last);
    let (snapshot, seq) = b.snapshot().await.unwrap();
    assert_eq!(seq, last);
    assert_eq!(
        model,
        Model::of(snapshot),
        "the tail's batches rebuild the tables"
    );
}

#[tokio::test]
async fn a_notification_wakes_a_tail_that_would_poll_only_hourly() {
    let db = TestDatabase::new().await;
    let (a, b) = (connect(&db).await, connect(&db).await);
    let (epoch, _) = lead(&a, "a").await;
    let writer = a
        .start_writer(&opts("a"), epoch, ClusterView::clustered("a".into()))
        .await
        .unwrap();
    let mut tail = b
        .tail_with(
            0,
            TailOptions {
                poll: Duration::from_secs(3600),
                listen: true,
            },
        )
        .await
        .unwrap();
    let waiting = tokio::spawn(async move { tail.next().await });
    put(&writer, vec![Change::PutServer(server(0, Vec::new()))]).await;
    let batch = within("the notified batch", waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch.seq, 1);
}

#[tokio::test]
async fn a_tail_that_gets_no_notification_still_sees_each_commit_by_polling() {
    let db = TestDatabase::new().await;
    let (a, b) = (connect(&db).await, connect(&db).await);
    let (epoch, _) = lead(&a, "a").await;
    let writer = a
        .start_writer(&opts("a"), epoch, ClusterView::clustered("a".into()))
        .await
        .unwrap();
    let mut tail = b
        .tail_with(
            0,
            TailOptions {
                poll: Duration::from_millis(200),
                listen: false,
            },
        )
        .await
        .unwrap();
    for seq in 1..=3 {
        // The tail is already waiting (its read found nothing) when the
        // commit happens, so only a poll can find it.
        let mut waiting = tokio::spawn(async move {
            let batch = tail.next().await;
            (tail, batch)
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut waiting)
                .await
                .is_err(),
            "nothing to return before the commit"
        );
        put(&writer, vec![Change::PutServer(server(seq, Vec::new()))]).await;
        let (back, batch) = within("the polled batch", waiting).await.unwrap();
        tail = back;
        assert_eq!(batch.unwrap().seq, seq as u64);
    }
}

#[tokio::test]
async fn a_tail_behind_the_pruned_log_reports_a_gap() {
    let db = TestDatabase::new().await;
    let (a, b) = (connect(&db).await, connect(&db).await);
    let (epoch, _) = lead(&a, "a").await;
    let writer = a
        .start_writer(&opts("a"), epoch, ClusterView::clustered("a".into()))
        .await
        .unwrap();
    for i in 0..3 {
        put(&writer, vec![Change::PutServer(server(i, Vec::new()))]).await;
    }
    // What the leader's pruning does to rows older than ten minutes,
    // keeping the newest.
    db.execute("DELETE FROM dcv_broker_changes WHERE seq <= 2")
        .await;
    let mut behind = b.tail(0).await.unwrap();
    assert_eq!(
        behind.next().await,
        Err(TailError::Gap {
            applied: 0,
            oldest: 3
        })
    );
    assert!(
        matches!(behind.next().await, Err(TailError::Gap { .. })),
        "a tail stays failed"
    );
    // A replica that reloaded (at seq 3, or 2) goes on.
    let mut reloaded = b.tail(2).await.unwrap();
    let batch = within("the kept row", reloaded.next()).await.unwrap();
    assert_eq!(batch.seq, 3);
    assert_eq!(
        batch.changes,
        vec![Change::PutServer(server(2, Vec::new()))]
    );
    // Pruning every row but the newest: still no gap for a current tail.
    db.execute("DELETE FROM dcv_broker_changes WHERE seq < 3")
        .await;
    let mut current = b
        .tail_with(
            3,
            TailOptions {
                poll: Duration::from_millis(100),
                listen: true,
            },
        )
        .await
        .unwrap();
    put(&writer, vec![Change::PutServer(server(9, Vec::new()))]).await;
    assert_eq!(
        within("after the prune", current.next()).await.unwrap().seq,
        4
    );
}

#[tokio::test]
async fn a_held_lease_is_renewed_and_lost_when_another_takes_the_row() {
    let db = TestDatabase::new().await;
    let a = connect(&db).await;
    let (epoch, _) = lead(&a, "a").await;
    let holder = a.hold_lease(&opts("a"), epoch).await.unwrap();
    let mut lost = holder.lost();
    let expiry = "SELECT (extract(epoch FROM expires_at) * 1000000)::bigint FROM dcv_broker_leader";
    let first = numbers(&db, expiry).await[0];
    within("a renewal", async {
        while numbers(&db, expiry).await[0] == first {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    assert!(lost.borrow().is_none());

    db.execute("UPDATE dcv_broker_leader SET holder = 'thief', epoch = epoch + 1")
        .await;
    let why = within("the loss", lost.wait_for(Option::is_some))
        .await
        .unwrap()
        .clone()
        .unwrap();
    assert!(why.contains("thief"), "{why}");
    drop(holder);
}

#[tokio::test]
async fn a_held_lease_is_lost_when_the_database_hangs() {
    let db = TestDatabase::new().await;
    let a = connect(&db).await;
    let (epoch, _) = lead(&a, "a").await;
    let holder = a.hold_lease(&opts("a"), epoch).await.unwrap();
    let mut lost = holder.lost();
    // A transaction that keeps the row locked: every renewal waits.
    let mut locker = db.connect().await;
    let locked = locker.transaction().await.unwrap();
    locked
        .execute("SELECT 1 FROM dcv_broker_leader FOR UPDATE", &[])
        .await
        .unwrap();
    let since = Instant::now();
    let why = within("the loss", lost.wait_for(Option::is_some))
        .await
        .unwrap()
        .clone()
        .unwrap();
    assert!(
        since.elapsed() <= LEASE + Duration::from_secs(2),
        "the holder believed for {:?}",
        since.elapsed()
    );
    assert!(why.contains("lease"), "{why}");
    locked.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_database_loses_the_lease_and_fails_the_writer() {
    let mut db = TestDatabase::new().await;
    if !db.owns_server() {
        eprintln!("skipped: DCV_BROKER_TEST_DATABASE_URL's server is not ours to stop");
        return;
    }
    let a = connect(&db).await;
    let (epoch, _) = lead(&a, "a").await;
    let holder = a.hold_lease(&opts("a"), epoch).await.unwrap();
    let mut lost = holder.lost();
    let writer = a
        .start_writer(&opts("a"), epoch, ClusterView::clustered("a".into()))
        .await
        .unwrap();
    put(&writer, vec![Change::PutServer(server(0, Vec::new()))]).await;
    let mut failed = writer.failed();

    tokio::task::block_in_place(|| db.stop_server());
    let stopped = Instant::now();
    let result = writer
        .submit(vec![Change::PutServer(server(1, Vec::new()))])
        .wait()
        .await;
    assert!(
        result.is_err(),
        "a write was acknowledged with the database down"
    );
    let why = within("the writer's failure", failed.wait_for(Option::is_some))
        .await
        .unwrap()
        .clone()
        .unwrap();
    assert!(!why.is_empty());
    assert!(
        writer
            .submit(vec![Change::PutServer(server(2, Vec::new()))])
            .wait()
            .await
            .is_err()
    );

    let why = within("the loss", lost.wait_for(Option::is_some))
        .await
        .unwrap()
        .clone()
        .unwrap();
    assert!(
        stopped.elapsed() <= LEASE + Duration::from_secs(2),
        "the holder believed for {:?} after the database stopped",
        stopped.elapsed()
    );
    assert!(why.contains("lease"), "{why}");
    // Elections fail too, quickly, naming the database without secrets.
    let error = a.elect(&opts("a"), Some(epoch)).await.unwrap_err();
    assert!(error.to_string().contains(a.target()), "{error}");
}

#[tokio::test]
async fn every_replica_reads_the_same_shared_secrets() {
    let db = TestDatabase::new().await;
    let a = connect(&db).await;
    let b = connect(&db).await;
    let (first, _) = a.snapshot().await.unwrap();
    let (second, _) = b.snapshot().await.unwrap();
    let names: Vec<&str> = first.secrets.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            FORWARDING_KEY,
            "connection-token-key/hmac-sha256",
            "page-token-key/hmac-sha256",
            "token-signing-key/hs256",
        ]
    );
    assert!(first.secrets.iter().all(|(_, v)| v.len() == 32));
    assert_eq!(
        first.secrets, second.secrets,
        "the second replica drew none of its own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_server_ends_are_remade_or_reported() {
    let db = TestDatabase::new().await;
    let (a, b) = (connect(&db).await, connect(&db).await);
    let (epoch, _) = lead(&a, "a").await;
    let holder = a.hold_lease(&opts("a"), epoch).await.unwrap();
    let lost = holder.lost();
    let writer = a
        .start_writer(&opts("a"), epoch, ClusterView::clustered("a".into()))
        .await
        .unwrap();
    put(&writer, vec![Change::PutServer(server(0, Vec::new()))]).await;
    let mut tail = b.tail(1).await.unwrap();

    // Every connection the replicas made (they name themselves dcv-broker).
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = 'dcv-broker' AND pid <> pg_backend_pid()",
    )
    .await;

    // The tail and the writer are done, and say so.
    assert!(matches!(
        within("the tail's end", tail.next()).await,
        Err(TailError::Lost(_))
    ));
    let result = writer
        .submit(vec![Change::PutServer(server(1, Vec::new()))])
        .wait()
        .await;
    assert!(result.is_err());
    assert!(writer.failed().borrow().is_some());

    // The control connection is remade by calling again (the first call
    // may still find the old one before it noticed its end).
    let elected = within("an election on a new connection", async {
        loop {
            if let Ok(elected) = a.elect(&opts("a"), Some(epoch)).await {
                return elected;
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    assert_eq!(elected, Elected::Leader { epoch, seq: 1 });
    let (snapshot, seq) = b.snapshot().await.unwrap();
    assert_eq!((snapshot.servers.len(), seq), (1, 1));

    // The lease is renewed on a new connection, and never lost meanwhile.
    let expiry = "SELECT (extract(epoch FROM expires_at) * 1000000)::bigint FROM dcv_broker_leader";
    let before = numbers(&db, expiry).await[0];
    within("a renewal on a new connection", async {
        while numbers(&db, expiry).await[0] == before {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    assert_eq!(*lost.borrow(), None);
    // A new writer and tail go on from there.
    let writer = a
        .start_writer(&opts("a"), epoch, ClusterView::clustered("a".into()))
        .await
        .unwrap();
    put(&writer, vec![Change::PutServer(server(1, Vec::new()))]).await;
    let mut tail = b.tail(1).await.unwrap();
    assert_eq!(within("the next batch", tail.next()).await.unwrap().seq, 2);
}

#[tokio::test]
async fn a_tail_catches_up_in_bounded_pages() {
    let db = TestDatabase::new().await;
    let b = connect(&db).await;
    // A long log written directly: each row names one server that no
    // longer exists (so each comes back as a delete).
    let rows = 2 * PAGE_ROWS + 500;
    db.execute(&format!(
        "INSERT INTO dcv_broker_changes (seq, epoch, servers, sessions, clients, secrets)
         SELECT g, 1, ARRAY['gone-' || g], '{{}}', '{{}}', '{{}}' FROM generate_series(1, {rows}) g;
         UPDATE dcv_broker_leader SET seq = {rows};"
    ))
    .await;
    let mut tail = b.tail(0).await.unwrap();
    let mut ends = Vec::new();
    let mut deleted = 0;
    while tail.applied() < rows as u64 {
        let batch = within("a page", tail.next()).await.unwrap();
        deleted += batch
            .changes
            .iter()
            .filter(|c| matches!(c, Change::DeleteServer(_)))
            .count();
        ends.push(batch.seq);
    }
    let page = PAGE_ROWS as u64;
    assert_eq!(ends, [page, 2 * page, rows as u64]);
    assert_eq!(deleted, rows as usize);

    // Rows naming many ids: a page stops once it names enough of them
    // (it always takes one row).
    let many = PAGE_IDS / 2 + 1;
    db.execute(&format!(
        "INSERT INTO dcv_broker_changes (seq, epoch, servers, sessions, clients, secrets)
         SELECT {rows} + r, 1,
                ARRAY(SELECT 'many-' || r || '-' || i FROM generate_series(1, {many}) i),
                '{{}}', '{{}}', '{{}}'
         FROM generate_series(1, 3) r;
         UPDATE dcv_broker_leader SET seq = {rows} + 3;"
    ))
    .await;
    let mut sizes = Vec::new();
    while tail.applied() < rows as u64 + 3 {
        let batch = within("a page of many ids", tail.next()).await.unwrap();
        sizes.push((batch.seq - rows as u64, batch.changes.len()));
    }
    assert_eq!(sizes, [(2, 2 * many), (3, many)]);
}
