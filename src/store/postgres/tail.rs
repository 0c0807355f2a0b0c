//! A follower's tail of the change log.
//!
//! `LISTEN dcv_broker_changes` only wakes the tail up: a notification can
//! be lost (a connection that broke and was remade, a pooler in between),
//! so the tail also polls, and a lost notification costs at most one poll
//! interval. Whatever woke it, it reads the log rows after what it applied,
//! in order, in one `REPEATABLE READ READ ONLY` transaction that also reads
//! the current rows of the ids they touched: the change log names ids, the
//! tables hold the records, and both come from one snapshot.
//!
//! The rows read together become one [`Batch`] (at most [`PAGE_ROWS`]
//! rows, and rows are added only while the batch names fewer than
//! [`PAGE_IDS`] ids): their records as they are at the end of the last
//! row, which is a consistent state of the whole database, as a snapshot
//! is. Applying each row's records separately would not be: a row's
//! session may, by then, name a server that only a later row registered.
//! When the follower keeps up, a read finds one row and the batch is that
//! one committed group.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;
use tokio::{sync::Notify, task::JoinHandle};
use tokio_postgres::{AsyncMessage, Client, IsolationLevel, NoTls};

use super::{
    Database, PostgresError, describe,
    load::{self, LoadError},
};
use crate::{
    fleet::persist::{Change, StoredLiveness},
    store::codec,
};

/// The most change-log rows one read takes (catching up is done in pages).
pub const PAGE_ROWS: i64 = 1000;

/// A read stops adding rows once its batch names this many ids (it always
/// takes at least one row).
pub const PAGE_IDS: usize = 10_000;

/// How long one read may take before the tail reports the database lost.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How a tail waits for changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailOptions {
    /// How often it reads even without a notification (about a fifth of
    /// the lease).
    pub poll: Duration,
    /// Whether it listens for notifications at all: without, it only
    /// polls (for a connection through a pooler that drops them).
    pub listen: bool,
}

impl Default for TailOptions {
    fn default() -> Self {
        TailOptions {
            poll: Duration::from_secs(1),
            listen: true,
        }
    }
}

/// The changes of one or more consecutive change-log rows, to apply
/// atomically.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// The last change-log row included.
    pub seq: u64,
    /// When that row was written (the database's clock): how far behind
    /// the leader a follower applies is measured from it.
    pub committed_at: std::time::SystemTime,
    /// The records as they are after that row: puts of what exists,
    /// deletes of what does not, then the heartbeats passed on.
    pub changes: Vec<Change>,
}

/// Why a tail cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TailError {
    /// The rows after `applied` are gone (pruned, or the database is not
    /// the one applied from): reload a snapshot.
    #[error(
        "the change log no longer holds what follows sequence number {applied} (it starts at {oldest}); a reload is needed"
    )]
    Gap {
        /// What this replica applied.
        applied: u64,
        /// The oldest row the log holds after it.
        oldest: u64,
    },
    /// The connection failed or a read did not answer: start another tail
    /// (after a reload, since changes may have been missed meanwhile).
    #[error("{0}")]
    Lost(String),
}

/// A follower's tail. Dropping it closes its connection.
pub struct Tail {
    target: String,
    client: Client,
    applied: u64,
    poll: Duration,
    /// Woken by a notification, or by the connection ending.
    wake: Arc<Notify>,
    /// Why the connection ended, once it has.
    ended: Arc<Mutex<Option<String>>>,
    driver: JoinHandle<()>,
    /// The error every later call returns, once one happened.
    failed: Option<TailError>,
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tail")
            .field("target", &self.target)
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Tail {
    pub(super) async fn start(
        database: &Database,
        from: u64,
        options: TailOptions,
    ) -> Result<Tail, PostgresError> {
        let target = database.target().to_owned();
        let (client, mut connection) = database
            .inner
            .config
            .connect(NoTls)
            .await
            .map_err(|e| PostgresError::driver(&target, &e))?;
        let wake = Arc::new(Notify::new());
        let ended = Arc::new(Mutex::new(None));
        // The connection is driven here rather than awaited as a future:
        // that is the only way to see its notifications.
        let driver = tokio::spawn({
            let wake = wake.clone();
            let ended = ended.clone();
            async move {
                let why = loop {
                    match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break describe(&e),
                        None => break "the connection closed".to_owned(),
                    }
                };
                *ended.lock() = Some(why);
                wake.notify_one();
            }
        });
        let tail = Tail {
            target,
            client,
            applied: from,
            poll: options.poll,
            wake,
            ended,
            driver,
            failed: None,
        };
        // Listening starts before the first read, so nothing committed
        // after that read goes unnoticed until the next poll.
        if options.listen {
            tail.client
                .batch_execute("LISTEN dcv_broker_changes")
                .await
                .map_err(|e| PostgresError::driver(&tail.target, &e))?;
        }
        Ok(tail)
    }

    /// What this tail has returned up to.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The next batch after what was returned so far, waiting for one to
    /// be committed. Cancel-safe: dropping the future loses nothing. After
    /// an error, every call returns it again.
    pub async fn next(&mut self) -> Result<Batch, TailError> {
        loop {
            if let Some(e) = &self.failed {
                return Err(e.clone());
            }
            if let Some(why) = self.ended.lock().clone() {
                self.failed = Some(TailError::Lost(format!(
                    "PostgreSQL database {}: {why}",
                    self.target
                )));
                continue;
            }
            let read = tokio::time::timeout(READ_TIMEOUT, read(&mut self.client, self.applied));
            match read.await {
                Ok(Ok(Some(batch))) => {
                    self.applied = batch.seq;
                    return Ok(batch);
                }
                Ok(Ok(None)) => {}
                Ok(Err(ReadError::Gap { applied, oldest })) => {
                    self.failed = Some(TailError::Gap { applied, oldest });
                    continue;
                }
                Ok(Err(ReadError::Load(e))) => {
                    let e = e.into_error(&self.target);
                    self.failed = Some(TailError::Lost(e.to_string()));
                    continue;
                }
                Err(_) => {
                    self.failed = Some(TailError::Lost(format!(
                        "PostgreSQL database {}: a read of the change log took longer than {READ_TIMEOUT:?}",
                        self.target
                    )));
                    continue;
                }
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.poll) => {}
            }
        }
    }
}

enum ReadError {
    Gap { applied: u64, oldest: u64 },
    Load(LoadError),
}

impl From<LoadError> for ReadError {
    fn from(e: LoadError) -> Self {
        ReadError::Load(e)
    }
}

impl From<tokio_postgres::Error> for ReadError {
    fn from(e: tokio_postgres::Error) -> Self {
        ReadError::Load(LoadError::Postgres(e))
    }
}

/// Ids in first-seen order, without repeats.
#[derive(Default)]
struct Ids {
    list: Vec<String>,
    seen: HashSet<String>,
}

impl Ids {
    fn add(&mut self, ids: Vec<String>) {
        for id in ids {
            if !self.seen.contains(&id) {
                self.seen.insert(id.clone());
                self.list.push(id);
            }
        }
    }
}

/// Reads the rows after `applied` and the records they name; `None` if
/// there are none yet.
async fn read(client: &mut Client, applied: u64) -> Result<Option<Batch>, ReadError> {
    let after = i64::try_from(applied).map_err(|_| ReadError::Gap { applied, oldest: 0 })?;
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let rows = tx
        .query(
            "SELECT seq, servers, sessions, clients, secrets, liveness, committed_at
             FROM dcv_broker_changes WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&after, &PAGE_ROWS],
        )
        .await?;
    let Some(first) = rows.first() else {
        // Pruning keeps the newest row, so an empty log after `applied`
        // means nothing new, unless the sequence number says otherwise.
        let seq = load::log_seq(&tx).await?;
        tx.commit().await?;
        // Behind it: rows were removed by hand. Ahead of it: this is not
        // the database (or not the history) the replica applied from.
        return match seq {
            seq if seq == applied => Ok(None),
            seq => Err(ReadError::Gap {
                applied,
                oldest: seq.saturating_add(1),
            }),
        };
    };
    let first: i64 = first.try_get(0)?;
    if first != after + 1 {
        return Err(ReadError::Gap {
            applied,
            oldest: u64::try_from(first).unwrap_or(0),
        });
    }
    let (mut servers, mut sessions, mut clients, mut secrets) = (
        Ids::default(),
        Ids::default(),
        Ids::default(),
        Ids::default(),
    );
    let mut liveness: Vec<StoredLiveness> = Vec::new();
    let mut liveness_at: HashMap<String, usize> = HashMap::new();
    let mut last = after;
    let mut committed_at = std::time::UNIX_EPOCH;
    for row in &rows {
        let seq: i64 = row.try_get(0)?;
        // The log is gap-free (each row is written by the transaction that
        // bumped the sequence number); a hole is reported at the next read.
        let named = servers.list.len() + sessions.list.len() + clients.list.len();
        if seq != last + 1 || (last > after && named >= PAGE_IDS) {
            break;
        }
        servers.add(row.try_get(1)?);
        sessions.add(row.try_get(2)?);
        clients.add(row.try_get(3)?);
        secrets.add(row.try_get(4)?);
        let bytes: Option<Vec<u8>> = row.try_get(5)?;
        if let Some(bytes) = bytes {
            let records = codec::decode_liveness(&bytes).map_err(|e| {
                LoadError::Row(format!(
                    "change-log row {seq}: liveness does not decode: {e}"
                ))
            })?;
            for record in records {
                match liveness_at.get(&record.id) {
                    Some(&at) => liveness[at] = record,
                    None => {
                        liveness_at.insert(record.id.clone(), liveness.len());
                        liveness.push(record);
                    }
                }
            }
        }
        last = seq;
        committed_at = row.try_get(6)?;
    }
    let current = load::current(
        &tx,
        &servers.list,
        &sessions.list,
        &clients.list,
        &secrets.list,
    )
    .await?;
    tx.commit().await?;
    let mut changes = Vec::with_capacity(
        servers.list.len()
            + sessions.list.len()
            + clients.list.len()
            + secrets.list.len()
            + liveness.len(),
    );
    changes.extend(
        current
            .secrets
            .into_iter()
            .map(|(name, value)| Change::PutSecret { name, value }),
    );
    changes.extend(current.clients.into_iter().map(Change::PutClient));
    let present_servers: HashSet<String> = current.servers.iter().map(|s| s.id.clone()).collect();
    let present_sessions: HashSet<String> = current.sessions.iter().map(|s| s.id.clone()).collect();
    changes.extend(current.servers.into_iter().map(Change::PutServer));
    changes.extend(current.sessions.into_iter().map(Change::PutSession));
    changes.extend(
        sessions
            .list
            .into_iter()
            .filter(|id| !present_sessions.contains(id))
            .map(Change::DeleteSession),
    );
    changes.extend(
        servers
            .list
            .into_iter()
            .filter(|id| !present_servers.contains(id))
            .map(Change::DeleteServer),
    );
    changes.extend(liveness.into_iter().map(Change::PutLiveness));
    let seq = u64::try_from(last).map_err(|_| ReadError::Gap { applied, oldest: 0 })?;
    Ok(Some(Batch {
        seq,
        committed_at,
        changes,
    }))
}
