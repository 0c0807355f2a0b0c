//! The leader's writer task, the only user of its connection. Like the
//! SQLite store's writer thread, it commits submissions in groups: it
//! waits for one, takes every other already queued, applies them in order
//! inside one transaction and commits once, so a burst of operations pays
//! for one round of COMMIT (and one WAL flush on the server) instead of one
//! each. Each submission lies entirely inside one transaction, so it is
//! atomic.
//!
//! Each group transaction starts with the fence: it bumps the change
//! log's sequence number in the lease row only if this writer's node still
//! holds the lease in its epoch. The row lock it takes orders it with
//! renewals and takeovers, so a writer whose lease was taken (however long
//! it was paused) finds no row and abandons the group; nothing of it is
//! committed. The group then inserts one change-log row (the ids it
//! touched, its heartbeats), notifies the followers and commits; only
//! after the commit is the sequence number published to the cluster view,
//! and only then are the group's submitters told. A group that fails
//! (fenced, the connection lost, no answer in time) fails its submitters
//! and every later one: the store is done, and the replica reloads.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{sync::mpsc, time::Instant};
use tokio_postgres::{Client, Statement, Transaction};

use super::{Shared, Submission, describe};
use crate::{
    cluster::ClusterView,
    fleet::{
        Hold,
        persist::{Change, StoredLiveness, StoredServer, StoredSession},
    },
    store::codec,
};

/// Why a fenced group fails: the words the contract gives callers.
pub(super) const FENCED: &str = "this broker lost the leader lease";

/// The least time a group may take before the store gives up on the
/// database: at least twice the lease, since a group that outlives the
/// lease is fenced anyway.
pub(super) const MIN_GROUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Change-log rows older than this are pruned by the leader (always
/// keeping the newest). A follower further behind reloads.
const KEEP_LOG: Duration = Duration::from_secs(600);

/// How often the writer notes the sequence number it reached, to know
/// later which rows are old enough to prune without an index on time.
const SAMPLE_EVERY: Duration = Duration::from_secs(60);

/// The lease this writer writes under.
#[derive(Debug, Clone)]
pub(super) struct Fence {
    /// The holder's node.
    pub node: String,
    /// Its epoch.
    pub epoch: i64,
    /// How long a group may take.
    pub timeout: Duration,
}

/// The most submissions one transaction takes, as in the SQLite store: a
/// huge burst is committed in several transactions so its first submitter
/// is not kept waiting for all of it.
const MAX_GROUP: usize = 4096;

/// Why a group could not be written.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("PostgreSQL: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Encode(String),
    #[error("{FENCED}")]
    Fenced,
    #[error("PostgreSQL did not commit within {0:?}")]
    Timeout(Duration),
}

/// The statements a group uses, prepared once per connection.
struct Statements {
    fence: Statement,
    log: Statement,
    prune: Statement,
    put_server: Statement,
    server_state: Statement,
    delete_holds: Statement,
    insert_hold: Statement,
    delete_server: Statement,
    put_session: Statement,
    delete_tried: Statement,
    insert_tried: Statement,
    delete_session: Statement,
    put_client: Statement,
    put_secret: Statement,
    put_audit: Statement,
    prune_audit: Statement,
    put_client_token: Statement,
    prune_client_tokens: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            fence: client
                .prepare(
                    "UPDATE dcv_broker_leader SET seq = seq + 1
                     WHERE epoch = $1 AND holder = $2
                     RETURNING seq",
                )
                .await?,
            log: client
                .prepare(
                    "INSERT INTO dcv_broker_changes
                         (seq, epoch, servers, sessions, clients, secrets, liveness)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .await?,
            prune: client
                .prepare("DELETE FROM dcv_broker_changes WHERE seq <= $1")
                .await?,
            // One round trip per record, its subjects included.
            put_audit: client
                .prepare(
                    "WITH record AS (
                         INSERT INTO audit (at, actor, request_id, method, peer, items)
                         VALUES ($1, $2, $3, $4, $5, ($6::TEXT)::JSONB)
                         RETURNING id)
                     INSERT INTO audit_subjects (subject, audit_id)
                     SELECT DISTINCT unnest($7::TEXT[]), record.id FROM record
                     ON CONFLICT DO NOTHING",
                )
                .await?,
            prune_audit: client
                .prepare(
                    "WITH old AS (
                         DELETE FROM audit WHERE id IN
                             (SELECT id FROM audit WHERE at < $1 ORDER BY at LIMIT $2)
                         RETURNING id)
                     DELETE FROM audit_subjects WHERE audit_id IN (SELECT id FROM old)",
                )
                .await?,
            put_client_token: client
                .prepare(
                    "INSERT INTO client_tokens
                         (actor, method, token, request_hash, reply, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (actor, method, token) DO UPDATE SET
                         request_hash = excluded.request_hash,
                         reply = excluded.reply,
                         created_at = excluded.created_at",
                )
                .await?,
            prune_client_tokens: client
                .prepare(
                    "DELETE FROM client_tokens WHERE ctid IN
                         (SELECT ctid FROM client_tokens WHERE created_at < $1
                          ORDER BY created_at LIMIT $2)",
                )
                .await?,
            put_server: client
                .prepare(
                    "INSERT INTO servers (id, description, registered_at, last_seen, agent_departed,
                                          state_version)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (id) DO UPDATE SET
                         description = excluded.description,
                         registered_at = excluded.registered_at,
                         last_seen = excluded.last_seen,
                         agent_departed = excluded.agent_departed,
                         state_version = excluded.state_version",
                )
                .await?,
            server_state: client
                .prepare("UPDATE servers SET agent_departed = $2, state_version = $3 WHERE id = $1")
                .await?,
            delete_holds: client
                .prepare("DELETE FROM holds WHERE server_id = $1")
                .await?,
            insert_hold: client
                .prepare(
                    "INSERT INTO holds
                         (server_id, position, kind, name, actor, since, reason, expires_at,
                          drain)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .await?,
            delete_server: client.prepare("DELETE FROM servers WHERE id = $1").await?,
            put_session: client
                .prepare(
                    "INSERT INTO sessions (id, name, owner, kind, server_id, state, substate,
                         state_reason, created_at, request, permissions_file, deadline,
                         forgotten, queue_position, deletions)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
                     ON CONFLICT (id) DO UPDATE SET
                         name = excluded.name,
                         owner = excluded.owner,
                         kind = excluded.kind,
                         server_id = excluded.server_id,
                         state = excluded.state,
                         substate = excluded.substate,
                         state_reason = excluded.state_reason,
                         created_at = excluded.created_at,
                         request = excluded.request,
                         permissions_file = excluded.permissions_file,
                         deadline = excluded.deadline,
                         forgotten = excluded.forgotten,
                         queue_position = excluded.queue_position,
                         deletions = excluded.deletions",
                )
                .await?,
            delete_tried: client
                .prepare("DELETE FROM session_tried WHERE session_id = $1")
                .await?,
            insert_tried: client
                .prepare(
                    "INSERT INTO session_tried (session_id, position, server_id)
                     VALUES ($1, $2, $3)",
                )
                .await?,
            delete_session: client
                .prepare("DELETE FROM sessions WHERE id = $1")
                .await?,
            put_client: client
                .prepare(
                    "INSERT INTO clients
                         (id, name, secret_hash, scopes, server_id, created_at, revoked_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (id) DO UPDATE SET
                         name = excluded.name,
                         secret_hash = excluded.secret_hash,
                         scopes = excluded.scopes,
                         server_id = excluded.server_id,
                         created_at = excluded.created_at,
                         revoked_at = excluded.revoked_at",
                )
                .await?,
            put_secret: client
                .prepare(
                    "INSERT INTO secrets (name, value) VALUES ($1, $2)
                     ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                )
                .await?,
        })
    }
}

/// Marks the store failed if the task ends abnormally (a panic, or the
/// runtime dropping it mid-commit), so nothing more is acknowledged.
struct FailGuard<'a>(&'a Shared, bool);

impl Drop for FailGuard<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.failed.send_if_modified(|failed| match failed {
                Some(_) => false,
                None => {
                    *failed = Some("the store's writer task stopped".into());
                    true
                }
            });
        }
    }
}

/// Notes of which sequence number was reached when, to prune the log.
#[derive(Default)]
struct Pruning {
    samples: VecDeque<(Instant, u64)>,
}

impl Pruning {
    /// After committing `seq`: rows up to the returned one are older than
    /// [`KEEP_LOG`] and may go (in the next group's transaction).
    fn committed(&mut self, seq: u64) {
        let now = Instant::now();
        match self.samples.back() {
            // Everything before this writer's first commit is older than
            // now.
            None => self.samples.push_back((now, seq.saturating_sub(1))),
            Some((at, _)) if now.duration_since(*at) >= SAMPLE_EVERY => {
                self.samples.push_back((now, seq));
            }
            Some(_) => {}
        }
    }

    /// The newest sequence number known to be older than [`KEEP_LOG`].
    fn due(&mut self) -> Option<u64> {
        let mut due = None;
        while let Some((at, seq)) = self.samples.front()
            && at.elapsed() >= KEEP_LOG
        {
            due = Some(*seq);
            self.samples.pop_front();
        }
        due
    }
}

/// Commits submissions until every handle is gone, then lets the
/// connection close.
pub(super) async fn run(
    client: Client,
    target: String,
    fence: Fence,
    view: ClusterView,
    mut submissions: mpsc::UnboundedReceiver<Submission>,
    shared: Arc<Shared>,
) {
    let mut guard = FailGuard(&shared, false);
    let mut client = Some(client);
    let mut statements = None;
    let mut pruning = Pruning::default();
    let mut group = Vec::new();
    while let Some(first) = submissions.recv().await {
        group.push(first);
        while group.len() < MAX_GROUP
            && let Ok(next) = submissions.try_recv()
        {
            group.push(next);
        }
        let failed = shared.failed.borrow().clone();
        let result = match (failed, client.as_mut()) {
            (Some(why), _) => Err(why),
            (None, None) => Err("the store's connection is closed".to_owned()),
            (None, Some(connection)) => {
                let prune = pruning.due();
                let started = std::time::Instant::now();
                let committing = commit(connection, &mut statements, &fence, prune, &group);
                let outcome = match tokio::time::timeout(fence.timeout, committing).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(WriteError::Timeout(fence.timeout)),
                };
                match outcome {
                    Ok(seq) => {
                        shared.commits.fetch_add(1, Ordering::Relaxed);
                        let metrics = &*crate::metrics::COUNTERS;
                        metrics
                            .store_commit_seconds
                            .observe(started.elapsed().as_secs_f64());
                        let changes: usize = group.iter().map(|(changes, _)| changes.len()).sum();
                        metrics.store_changes_per_commit.observe(changes as f64);
                        pruning.committed(seq);
                        // Before anyone is told: a reply sent after the
                        // wait carries a sequence number that includes it.
                        view.set_committed(seq);
                        Ok(())
                    }
                    Err(e) => {
                        let why = e.to_string();
                        if matches!(e, WriteError::Fenced) {
                            // Expected when another replica took over.
                            tracing::warn!(database = %target, epoch = fence.epoch, "{FENCED}; this writer stores nothing more");
                        } else {
                            crate::metrics::COUNTERS.store_commit_failures.inc();
                            tracing::error!(database = %target, error = %why, "the store could not write; nothing more will be stored");
                        }
                        shared.failed.send_replace(Some(why.clone()));
                        // Closing the connection makes the server abandon
                        // whatever the group left open (and its row lock).
                        client = None;
                        Err(why)
                    }
                }
            }
        };
        for (_, answer) in group.drain(..) {
            // The submitter may have stopped waiting; that is its choice.
            let _ = answer.send(result.clone());
        }
    }
    guard.1 = true;
}

/// The ids a group touched and the heartbeats it passes on (the last of
/// each server's), for its change-log row.
#[derive(Default)]
struct Touched<'a> {
    servers: Vec<&'a str>,
    sessions: Vec<&'a str>,
    clients: Vec<&'a str>,
    secrets: Vec<&'a str>,
    seen: HashSet<(u8, &'a str)>,
    liveness: Vec<&'a StoredLiveness>,
    liveness_at: HashMap<&'a str, usize>,
}

impl<'a> Touched<'a> {
    fn note(&mut self, change: &'a Change) {
        let (kind, id, list) = match change {
            Change::PutServer(server) => (0, server.id.as_str(), &mut self.servers),
            Change::PutServerState { id, .. } | Change::DeleteServer(id) => {
                (0, id.as_str(), &mut self.servers)
            }
            Change::PutSession(session) => (1, session.id.as_str(), &mut self.sessions),
            Change::DeleteSession(id) => (1, id.as_str(), &mut self.sessions),
            Change::PutClient(client) => (2, client.id.as_str(), &mut self.clients),
            Change::PutSecret { name, .. } => (3, name.as_str(), &mut self.secrets),
            // The audit log is the leader's to write and nobody's to
            // follow: followers' fleets have nothing to apply.
            // So are ClientToken records: a new leader loads them.
            Change::PutAudit(_)
            | Change::PruneAudit { .. }
            | Change::PutClientToken(_)
            | Change::PruneClientTokens { .. } => return,
            Change::PutLiveness(record) => {
                match self.liveness_at.get(record.id.as_str()) {
                    Some(&at) => self.liveness[at] = record,
                    None => {
                        self.liveness_at
                            .insert(record.id.as_str(), self.liveness.len());
                        self.liveness.push(record);
                    }
                }
                return;
            }
        };
        if self.seen.insert((kind, id)) {
            list.push(id);
        }
    }
}

/// Applies a group in one fenced transaction, logs it, and commits it;
/// the sequence number it was logged under.
async fn commit(
    client: &mut Client,
    statements: &mut Option<Statements>,
    fence: &Fence,
    prune: Option<u64>,
    group: &[Submission],
) -> Result<u64, WriteError> {
    if statements.is_none() {
        *statements = Some(Statements::prepare(client).await?);
    }
    let Some(statements) = statements.as_ref() else {
        return Err(WriteError::Encode("statements were not prepared".into()));
    };
    let tx = client.transaction().await?;
    let Some(row) = tx
        .query_opt(&statements.fence, &[&fence.epoch, &fence.node])
        .await?
    else {
        return Err(WriteError::Fenced);
    };
    let seq: i64 = row.try_get(0)?;
    let mut touched = Touched::default();
    for change in group.iter().flat_map(|(changes, _)| changes) {
        apply(&tx, statements, change).await?;
        touched.note(change);
    }
    let liveness =
        (!touched.liveness.is_empty()).then(|| codec::encode_liveness(&touched.liveness));
    tx.execute(
        &statements.log,
        &[
            &seq,
            &fence.epoch,
            &touched.servers,
            &touched.sessions,
            &touched.clients,
            &touched.secrets,
            &liveness,
        ],
    )
    .await?;
    if let Some(upto) = prune
        && let Ok(upto) = i64::try_from(upto)
        && upto < seq
    {
        tx.execute(&statements.prune, &[&upto]).await?;
    }
    tx.batch_execute("NOTIFY dcv_broker_changes").await?;
    tx.commit().await?;
    u64::try_from(seq)
        .map_err(|_| WriteError::Encode(format!("the log's sequence number is {seq}")))
}

async fn apply(tx: &Transaction<'_>, s: &Statements, change: &Change) -> Result<(), WriteError> {
    match change {
        Change::PutServer(server) => put_server(tx, s, server).await,
        Change::PutServerState {
            id,
            holds,
            state_version,
            agent_departed,
        } => {
            let state_version = state_version_column(id, *state_version)?;
            tx.execute(&s.server_state, &[id, agent_departed, &state_version])
                .await?;
            put_holds(tx, s, id, holds).await
        }
        Change::DeleteServer(id) => {
            tx.execute(&s.delete_holds, &[id]).await?;
            tx.execute(&s.delete_server, &[id]).await?;
            Ok(())
        }
        Change::PutSession(session) => put_session(tx, s, session).await,
        Change::DeleteSession(id) => {
            tx.execute(&s.delete_tried, &[id]).await?;
            tx.execute(&s.delete_session, &[id]).await?;
            Ok(())
        }
        Change::PutClient(client) => {
            tx.execute(
                &s.put_client,
                &[
                    &client.id,
                    &client.name,
                    &client.secret_hash,
                    &client.scopes.join(" "),
                    &client.server_id,
                    &codec::micros(client.created_at),
                    &client.revoked_at.map(codec::micros),
                ],
            )
            .await?;
            Ok(())
        }
        Change::PutSecret { name, value } => {
            tx.execute(&s.put_secret, &[name, value]).await?;
            Ok(())
        }
        // Passed on to followers through the change log, never a table.
        Change::PutLiveness(_) => Ok(()),
        Change::PutAudit(record) => {
            let subjects: Vec<&str> = record.items.iter().map(|i| i.id.as_str()).collect();
            tx.execute(
                &s.put_audit,
                &[
                    &codec::micros(record.at),
                    &record.actor,
                    &record.request_id,
                    &record.method,
                    &record.peer,
                    &codec::encode_audit_items(&record.items),
                    &subjects,
                ],
            )
            .await?;
            Ok(())
        }
        Change::PruneAudit { before } => {
            tx.execute(
                &s.prune_audit,
                &[&codec::micros(*before), &crate::store::audit::PRUNE_BATCH],
            )
            .await?;
            Ok(())
        }
        Change::PutClientToken(record) => {
            tx.execute(
                &s.put_client_token,
                &[
                    &record.actor,
                    &record.method,
                    &record.token,
                    &record.request_hash.as_slice(),
                    &record.reply,
                    &codec::micros(record.created_at),
                ],
            )
            .await?;
            Ok(())
        }
        Change::PruneClientTokens { before } => {
            tx.execute(
                &s.prune_client_tokens,
                &[
                    &codec::micros(*before),
                    &crate::fleet::client_tokens::PRUNE_BATCH,
                ],
            )
            .await?;
            Ok(())
        }
    }
}

async fn put_server(
    tx: &Transaction<'_>,
    s: &Statements,
    server: &StoredServer,
) -> Result<(), WriteError> {
    let description = codec::encode_description(&server.description);
    let state_version = state_version_column(&server.id, server.state_version)?;
    tx.execute(
        &s.put_server,
        &[
            &server.id,
            &description,
            &codec::micros(server.registered_at),
            &codec::micros(server.last_seen),
            &server.agent_departed,
            &state_version,
        ],
    )
    .await?;
    put_holds(tx, s, &server.id, &server.holds).await
}

fn state_version_column(id: &str, version: u64) -> Result<i64, WriteError> {
    codec::state_version_column(version)
        .map_err(|e| WriteError::Encode(format!("server {id:?}: {e}")))
}

async fn put_holds(
    tx: &Transaction<'_>,
    s: &Statements,
    id: &String,
    holds: &[Hold],
) -> Result<(), WriteError> {
    tx.execute(&s.delete_holds, &[id]).await?;
    for (position, hold) in (0_i32..).zip(holds) {
        tx.execute(
            &s.insert_hold,
            &[
                id,
                &position,
                &codec::hold_kind_name(hold.kind),
                &&*hold.name,
                &&*hold.actor,
                &codec::micros(hold.since),
                &hold.reason,
                &hold.expires_at.map(codec::micros),
                &hold.drain.as_deref().map(codec::encode_drain),
            ],
        )
        .await?;
    }
    Ok(())
}

async fn put_session(
    tx: &Transaction<'_>,
    s: &Statements,
    session: &StoredSession,
) -> Result<(), WriteError> {
    let queue_position = session
        .queue_position
        .map(i64::try_from)
        .transpose()
        .map_err(|_| {
            WriteError::Encode(format!(
                "session {:?}: queue position out of range",
                session.id
            ))
        })?;
    tx.execute(
        &s.put_session,
        &[
            &session.id,
            &session.name,
            &session.owner,
            &codec::session_kind_name(session.kind),
            &session.server,
            &codec::state_name(session.state),
            &session.substate.map(codec::substate_name),
            &session.state_reason,
            &codec::micros(session.created_at),
            &session.request.as_ref().map(codec::encode_request),
            &session.permissions_file,
            &session.deadline.map(codec::micros),
            &session.forgotten,
            &queue_position,
            &i64::from(session.deletions),
        ],
    )
    .await?;
    tx.execute(&s.delete_tried, &[&session.id]).await?;
    for (position, server) in (0_i32..).zip(&session.tried) {
        tx.execute(&s.insert_tried, &[&session.id, &position, server])
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows become due only once they are older than the log is kept,
    /// and never the newest (the next group's row is always newer).
    #[tokio::test(start_paused = true)]
    async fn pruning_marks_rows_older_than_the_kept_window() {
        let mut pruning = Pruning::default();
        // The first commit of this writer: everything before it is older.
        pruning.committed(41);
        assert_eq!(pruning.due(), None);
        for seq in 42..100 {
            tokio::time::advance(Duration::from_secs(10)).await;
            pruning.committed(seq);
        }
        // 58 commits, 10 s apart: samples about once a minute.
        assert!(pruning.samples.len() <= 11, "{}", pruning.samples.len());
        tokio::time::advance(KEEP_LOG - Duration::from_secs(580)).await;
        assert_eq!(pruning.due(), Some(40), "what preceded the first commit");
        assert_eq!(pruning.due(), None, "nothing more is ten minutes old yet");
        tokio::time::advance(Duration::from_secs(60)).await;
        let due = pruning.due().expect("a minute later, a minute more is due");
        assert!((42..=48).contains(&due), "{due}");
        tokio::time::advance(KEEP_LOG).await;
        assert!(pruning.due().is_some_and(|seq| seq < 99));
        assert!(pruning.samples.is_empty());
    }
}
