//! The writer thread: the only user of the connection once the store is
//! open. It commits submissions in groups: it waits for one, takes every
//! other already queued, applies them all in order inside one transaction
//! and commits once, so a burst of operations pays for one fsync instead
//! of one each. Each submission lies entirely inside one transaction, so
//! it is atomic. A backup the admin socket asks for runs here as well, in
//! steps between commits.

use std::sync::{atomic::Ordering, mpsc};

use rusqlite::{Connection, Transaction, TransactionBehavior, params};

use super::{AuditReadJob, Job, Shared, Submission, backup, codec};
use crate::fleet::persist::{Change, StoredServer, StoredSession};

/// The most submissions one transaction takes. A burst larger than this
/// is committed in several transactions, so that the first submitter of
/// a huge burst is not kept waiting for all of it.
const MAX_GROUP: usize = 4096;

/// Why a group could not be written.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Encode(String),
}

/// Marks the store failed if the thread panics, so the server stops
/// instead of carrying on with a store that keeps nothing.
struct PanicGuard<'a>(&'a Shared);

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .failed
                .send_replace(Some("the store's writer thread panicked".into()));
        }
    }
}

/// Commits submissions until every handle is gone, then closes the
/// connection (which checkpoints the write-ahead log into the database).
/// A backup runs here too, between commits (see `backup.rs`).
pub(super) fn run(connection: Connection, jobs: mpsc::Receiver<Job>, shared: &Shared) {
    let _guard = PanicGuard(shared);
    let mut group = Vec::new();
    let mut reads = Vec::new();
    while let Ok(first) = jobs.recv() {
        let backup = gather(first, &jobs, &mut group, &mut reads);
        commit_group(&connection, &mut group, shared);
        answer_reads(&connection, &mut reads);
        if let Some(backup) = backup {
            let between_steps = |pause| between_steps(&connection, &jobs, shared, pause);
            if backup::run(&connection, backup, shared, between_steps) == backup::After::Stop {
                break;
            }
        }
    }
    if let Err((_, e)) = connection.close() {
        tracing::warn!(error = %e, "closing the store failed; the next open recovers from the write-ahead log");
    }
}

/// Between two steps of a backup: commits what was submitted meanwhile,
/// waiting up to `pause` for a submission (a second backup is refused).
fn between_steps(
    connection: &Connection,
    jobs: &mpsc::Receiver<Job>,
    shared: &Shared,
    pause: std::time::Duration,
) -> backup::After {
    match jobs.recv_timeout(pause) {
        Ok(first) => {
            let (mut group, mut reads) = (Vec::new(), Vec::new());
            if let Some(other) = gather(first, jobs, &mut group, &mut reads) {
                other.refuse(super::BackupError::Busy.to_string());
            }
            commit_group(connection, &mut group, shared);
            answer_reads(connection, &mut reads);
            backup::After::Continue
        }
        Err(mpsc::RecvTimeoutError::Timeout) => backup::After::Continue,
        Err(mpsc::RecvTimeoutError::Disconnected) => backup::After::Stop,
    }
}

/// Puts `first` and the submissions already queued behind it into
/// `group`, up to [`MAX_GROUP`], and the audit reads among them into
/// `reads` (answered after the commit, so each sees every change submitted
/// before it). Stops at a backup request and returns it, so that it starts
/// once the submissions before it are committed.
fn gather(
    first: Job,
    jobs: &mpsc::Receiver<Job>,
    group: &mut Vec<Submission>,
    reads: &mut Vec<AuditReadJob>,
) -> Option<backup::Job> {
    let mut next = Some(first);
    while let Some(job) = next {
        match job {
            Job::Changes(submission) => group.push(submission),
            Job::ReadAudit(read) => reads.push(read),
            Job::Backup(backup) => return Some(backup),
        }
        next = match group.len() + reads.len() < MAX_GROUP {
            true => jobs.try_recv().ok(),
            false => None,
        };
    }
    None
}

/// Answers each read in `reads` from the committed store; empties it.
fn answer_reads(connection: &Connection, reads: &mut Vec<AuditReadJob>) {
    for (filter, answer) in reads.drain(..) {
        let result = super::audit::read(connection, &filter).map_err(|e| e.to_string());
        // The reader may have stopped waiting; that is its choice.
        let _ = answer.send(result);
    }
}

/// Commits `group` (if any) in one transaction and answers each of its
/// submitters; empties it.
fn commit_group(connection: &Connection, group: &mut Vec<Submission>, shared: &Shared) {
    if group.is_empty() {
        return;
    }
    let failed = shared.failed.borrow().clone();
    let result = match failed {
        Some(why) => Err(why),
        None => match timed_commit(connection, group) {
            Ok(()) => {
                shared.commits.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                crate::metrics::COUNTERS.store_commit_failures.inc();
                let why = e.to_string();
                tracing::error!(error = %why, "the store could not write; nothing more will be stored");
                shared.failed.send_replace(Some(why.clone()));
                Err(why)
            }
        },
    };
    for (_, answer) in group.drain(..) {
        // The submitter may have stopped waiting; that is its choice.
        let _ = answer.send(result.clone());
    }
}

/// [`commit`], measured for the metrics: its time and its changes.
fn timed_commit(connection: &Connection, group: &[Submission]) -> Result<(), WriteError> {
    let start = std::time::Instant::now();
    commit(connection, group)?;
    let metrics = &*crate::metrics::COUNTERS;
    metrics
        .store_commit_seconds
        .observe(start.elapsed().as_secs_f64());
    let changes: usize = group.iter().map(|(changes, _)| changes.len()).sum();
    metrics.store_changes_per_commit.observe(changes as f64);
    Ok(())
}

/// Applies a group in one transaction and commits it.
fn commit(connection: &Connection, group: &[Submission]) -> Result<(), WriteError> {
    // Unchecked (a shared borrow): a running backup borrows the connection
    // too. This thread is its only user, so no transaction is ever open
    // here already.
    let tx = Transaction::new_unchecked(connection, TransactionBehavior::Immediate)?;
    for change in group.iter().flat_map(|(changes, _)| changes) {
        apply(&tx, change)?;
    }
    tx.commit()?;
    Ok(())
}

fn apply(tx: &Transaction<'_>, change: &Change) -> Result<(), WriteError> {
    match change {
        Change::PutServer(server) => put_server(tx, server),
        Change::PutServerState {
            id,
            holds,
            state_version,
            agent_departed,
        } => {
            let state_version = state_version_column(id, *state_version)?;
            tx.prepare_cached(
                "UPDATE servers SET agent_departed = ?2, state_version = ?3 WHERE id = ?1",
            )?
            .execute(params![id, agent_departed, state_version])?;
            put_holds(tx, id, holds)
        }
        Change::DeleteServer(id) => {
            tx.prepare_cached("DELETE FROM holds WHERE server_id = ?1")?
                .execute([id])?;
            tx.prepare_cached("DELETE FROM servers WHERE id = ?1")?
                .execute([id])?;
            Ok(())
        }
        Change::PutSession(session) => put_session(tx, session),
        Change::DeleteSession(id) => {
            tx.prepare_cached("DELETE FROM session_tried WHERE session_id = ?1")?
                .execute([id])?;
            tx.prepare_cached("DELETE FROM sessions WHERE id = ?1")?
                .execute([id])?;
            Ok(())
        }
        Change::PutClient(client) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO clients
                     (id, name, secret_hash, scopes, server_id, created_at, revoked_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                client.id,
                client.name,
                client.secret_hash,
                client.scopes.join(" "),
                client.server_id,
                codec::micros(client.created_at),
                client.revoked_at.map(codec::micros),
            ])?;
            Ok(())
        }
        Change::PutSecret { name, value } => {
            tx.prepare_cached("INSERT OR REPLACE INTO secrets (name, value) VALUES (?1, ?2)")?
                .execute(params![name, value])?;
            Ok(())
        }
        // Heartbeats are never stored: this store serves one broker.
        Change::PutLiveness(_) => Ok(()),
        Change::PutAudit(record) => {
            tx.prepare_cached(
                "INSERT INTO audit (at, actor, request_id, method, peer, items)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                codec::micros(record.at),
                record.actor,
                record.request_id,
                record.method,
                record.peer,
                codec::encode_audit_items(&record.items),
            ])?;
            let audit_id = tx.last_insert_rowid();
            let mut subject = tx.prepare_cached(
                "INSERT OR IGNORE INTO audit_subjects (subject, audit_id) VALUES (?1, ?2)",
            )?;
            for item in &record.items {
                subject.execute(params![item.id, audit_id])?;
            }
            Ok(())
        }
        Change::PruneAudit { before } => {
            let before = codec::micros(*before);
            // Bounded, so one prune never holds the writer (and every
            // change behind it) for long; the pruner comes back.
            tx.prepare_cached(
                "DELETE FROM audit_subjects WHERE audit_id IN
                     (SELECT id FROM audit WHERE at < ?1 ORDER BY at LIMIT ?2)",
            )?
            .execute(params![before, crate::store::audit::PRUNE_BATCH])?;
            tx.prepare_cached(
                "DELETE FROM audit WHERE id IN
                     (SELECT id FROM audit WHERE at < ?1 ORDER BY at LIMIT ?2)",
            )?
            .execute(params![before, crate::store::audit::PRUNE_BATCH])?;
            Ok(())
        }
        Change::PutClientToken(record) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO client_tokens
                     (actor, method, token, request_hash, reply, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                record.actor,
                record.method,
                record.token,
                record.request_hash.as_slice(),
                record.reply,
                codec::micros(record.created_at),
            ])?;
            Ok(())
        }
        Change::PruneClientTokens { before } => {
            // Bounded, as the audit log's prune.
            tx.prepare_cached(
                "DELETE FROM client_tokens WHERE rowid IN
                     (SELECT rowid FROM client_tokens WHERE created_at < ?1
                      ORDER BY created_at LIMIT ?2)",
            )?
            .execute(params![
                codec::micros(*before),
                crate::fleet::client_tokens::PRUNE_BATCH
            ])?;
            Ok(())
        }
    }
}

fn put_server(tx: &Transaction<'_>, s: &StoredServer) -> Result<(), WriteError> {
    let description = codec::encode_description(&s.description);
    let state_version = state_version_column(&s.id, s.state_version)?;
    tx.prepare_cached(
        "INSERT INTO servers (id, description, registered_at, last_seen, agent_departed,
                              state_version)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (id) DO UPDATE SET
             description = excluded.description,
             registered_at = excluded.registered_at,
             last_seen = excluded.last_seen,
             agent_departed = excluded.agent_departed,
             state_version = excluded.state_version",
    )?
    .execute(params![
        s.id,
        description,
        codec::micros(s.registered_at),
        codec::micros(s.last_seen),
        s.agent_departed,
        state_version,
    ])?;
    put_holds(tx, &s.id, &s.holds)
}

fn state_version_column(id: &str, version: u64) -> Result<i64, WriteError> {
    codec::state_version_column(version)
        .map_err(|e| WriteError::Encode(format!("server {id:?}: {e}")))
}

/// Replaces the server's holds; their order is their rows' (rowid) order.
fn put_holds(
    tx: &Transaction<'_>,
    id: &str,
    holds: &[crate::fleet::Hold],
) -> Result<(), WriteError> {
    tx.prepare_cached("DELETE FROM holds WHERE server_id = ?1")?
        .execute([id])?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO holds (server_id, kind, name, actor, since, reason, expires_at, drain)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    for hold in holds {
        insert.execute(params![
            id,
            codec::hold_kind_name(hold.kind),
            &*hold.name,
            &*hold.actor,
            codec::micros(hold.since),
            hold.reason,
            hold.expires_at.map(codec::micros),
            hold.drain.as_deref().map(codec::encode_drain),
        ])?;
    }
    Ok(())
}

fn put_session(tx: &Transaction<'_>, s: &StoredSession) -> Result<(), WriteError> {
    let queue_position = s
        .queue_position
        .map(i64::try_from)
        .transpose()
        .map_err(|_| {
            WriteError::Encode(format!("session {:?}: queue position out of range", s.id))
        })?;
    tx.prepare_cached(
        "INSERT INTO sessions (id, name, owner, kind, server_id, state, substate, state_reason,
                               created_at, request, permissions_file, deadline, forgotten,
                               queue_position, deletions)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
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
    )?
    .execute(params![
        s.id,
        s.name,
        s.owner,
        codec::session_kind_name(s.kind),
        s.server,
        codec::state_name(s.state),
        s.substate.map(codec::substate_name),
        s.state_reason,
        codec::micros(s.created_at),
        s.request.as_ref().map(codec::encode_request),
        s.permissions_file,
        s.deadline.map(codec::micros),
        s.forgotten,
        queue_position,
        i64::from(s.deletions),
    ])?;
    tx.prepare_cached("DELETE FROM session_tried WHERE session_id = ?1")?
        .execute([&s.id])?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO session_tried (session_id, position, server_id) VALUES (?1, ?2, ?3)",
    )?;
    for (position, server) in (0_i64..).zip(&s.tried) {
        insert.execute(params![s.id, position, server])?;
    }
    Ok(())
}
