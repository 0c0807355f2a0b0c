//! The leader lease: one row (`dcv_broker_leader`) saying which replica
//! leads, in which epoch, until when, and where it can be reached.
//!
//! Expiry is judged by the database's clock (`clock_timestamp()`), never
//! by the replicas' own, which may disagree. A replica takes the lease when
//! it has expired (or is its own), raising the epoch, so every write the
//! previous holder still attempts is fenced off ([`super::writer`]). The
//! holder renews it every third of the lease on a connection of its own
//! and gives it up by itself once a whole lease has passed, on its own
//! monotonic clock, since it *sent* its last successful renewal: whatever
//! the database's clock said then, the row expired no earlier than that
//! send plus the lease, so a leader that stops renewing stops believing it
//! leads before anyone else can be elected.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::{
    sync::watch,
    task::JoinHandle,
    time::{Instant, sleep_until, timeout_at},
};
use tokio_postgres::Client;

use super::{ClusterOptions, Database, PostgresError};

/// The outcome of an election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Elected {
    /// This replica holds the lease in `epoch`; the change log is at `seq`.
    Leader {
        /// The lease's epoch (raised at every takeover).
        epoch: i64,
        /// The change log's last sequence number.
        seq: u64,
    },
    /// Another replica holds it.
    Follower {
        /// Its epoch.
        epoch: i64,
        /// Its advertised URL.
        leader: String,
    },
}

/// The lease in milliseconds, as the statements take it.
fn millis(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)
}

/// Where the last won election of an epoch was sent from, on this
/// process's monotonic clock: the holder's first deadline counts from
/// there, not from when it started renewing.
pub(super) type LastElected = Mutex<Option<(i64, Instant)>>;

/// One election round trip (see [`Database::elect`]).
pub(super) async fn elect(
    client: &Client,
    target: &str,
    opts: &ClusterOptions,
    held: Option<i64>,
    last: &LastElected,
) -> Result<Elected, PostgresError> {
    let driver = |e: tokio_postgres::Error| PostgresError::driver(target, &e);
    let sent = Instant::now();
    // SET reads the row's old values: the epoch stays only when this node
    // renews the epoch it holds; any takeover (even of its own lease by a
    // restarted process) raises it.
    let taken = client
        .query_opt(
            "UPDATE dcv_broker_leader SET
                 epoch = CASE WHEN holder = $1 AND epoch = $3 THEN epoch ELSE epoch + 1 END,
                 holder = $1,
                 advertise = $2,
                 expires_at = clock_timestamp() + $4::bigint * interval '1 millisecond'
             WHERE holder = $1 OR expires_at <= clock_timestamp()
             RETURNING epoch, seq",
            &[&opts.node, &opts.advertise, &held, &millis(opts.lease)],
        )
        .await
        .map_err(driver)?;
    if let Some(row) = taken {
        let epoch: i64 = row.try_get(0).map_err(driver)?;
        let seq: i64 = row.try_get(1).map_err(driver)?;
        let seq = u64::try_from(seq)
            .map_err(|_| PostgresError::new(target, format!("dcv_broker_leader.seq is {seq}")))?;
        *last.lock() = Some((epoch, sent));
        return Ok(Elected::Leader { epoch, seq });
    }
    let row = client
        .query_opt("SELECT epoch, advertise FROM dcv_broker_leader", &[])
        .await
        .map_err(driver)?
        .ok_or_else(|| PostgresError::new(target, "dcv_broker_leader has no row"))?;
    Ok(Elected::Follower {
        epoch: row.try_get(0).map_err(driver)?,
        leader: row.try_get(1).map_err(driver)?,
    })
}

/// Ends `node`'s lease of `epoch` now, so that another replica takes over
/// at its next check instead of a lease later; whether it was still held.
/// The holder is cleared too: a renewal of this node's still on its way
/// (or a write) then finds the lease no longer its own and changes nothing.
pub(super) async fn resign(
    client: &Client,
    node: &str,
    epoch: i64,
) -> Result<bool, tokio_postgres::Error> {
    let resigned = client
        .execute(
            "UPDATE dcv_broker_leader SET expires_at = clock_timestamp(), holder = ''
             WHERE holder = $1 AND epoch = $2",
            &[&node, &epoch],
        )
        .await?;
    Ok(resigned == 1)
}

/// Takes the lease whoever holds it, for the single-broker path
/// ([`super::PostgresStore::open`]); its epoch.
pub(super) async fn seize(client: &Client, node: &str) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "UPDATE dcv_broker_leader SET epoch = epoch + 1, holder = $1, advertise = '',
                 expires_at = clock_timestamp() + interval '5 seconds'
             RETURNING epoch",
            &[&node],
        )
        .await?;
    row.try_get(0)
}

/// A held lease, renewed in the background until dropped or lost.
#[derive(Debug)]
pub struct LeaseHolder {
    lost: watch::Receiver<Option<String>>,
    task: JoinHandle<()>,
}

impl LeaseHolder {
    /// `None` while the lease is held; `Some(why)` once it is lost (another
    /// replica took it, or no renewal succeeded for a whole lease). Never
    /// goes back to `None`.
    pub fn lost(&self) -> watch::Receiver<Option<String>> {
        self.lost.clone()
    }
}

impl Drop for LeaseHolder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts renewing `epoch`'s lease on `client`.
pub(super) fn hold(
    database: Database,
    client: Client,
    opts: ClusterOptions,
    epoch: i64,
) -> LeaseHolder {
    let (lost, receiver) = watch::channel(None);
    // The deadline counts from the send of the election that won this
    // epoch, if this process won it; else from now.
    let since = match *database.inner.last_elected.lock() {
        Some((won, sent)) if won == epoch => sent,
        _ => Instant::now(),
    };
    let task = tokio::spawn(renew(database, client, opts, epoch, since, lost));
    LeaseHolder {
        lost: receiver,
        task,
    }
}

/// What a renewal found.
enum Renewal {
    Renewed,
    /// Someone else holds the lease, or this node in another epoch.
    Taken(String),
}

async fn renew(
    database: Database,
    client: Client,
    opts: ClusterOptions,
    epoch: i64,
    since: Instant,
    lost: watch::Sender<Option<String>>,
) {
    let period = opts.lease / 3;
    let mut client = Some(client);
    let mut last_ok = since;
    let mut next = Instant::now();
    let give_up = |why: String| {
        tracing::debug!(database = %database.target(), epoch, why = %why, "the lease is lost");
        lost.send_replace(Some(why));
    };
    loop {
        let deadline = last_ok + opts.lease;
        tokio::select! {
            () = sleep_until(next) => {}
            () = sleep_until(deadline) => {
                give_up(format!("the leader lease could not be renewed for {:?}", opts.lease));
                return;
            }
        }
        let sent = Instant::now();
        next = sent + period;
        match timeout_at(deadline, renew_once(&database, &mut client, &opts, epoch)).await {
            Ok(Ok(Renewal::Renewed)) => last_ok = sent,
            Ok(Ok(Renewal::Taken(why))) => {
                give_up(why);
                return;
            }
            Ok(Err(e)) => {
                // Retried at the next period, on a new connection if this
                // one broke, until the deadline passes.
                tracing::debug!(error = %e, "a lease renewal failed");
                if client.as_ref().is_some_and(Client::is_closed) {
                    client = None;
                }
            }
            Err(_) => {
                give_up(format!(
                    "the database did not confirm the leader lease within {:?}",
                    opts.lease
                ));
                return;
            }
        }
    }
}

async fn renew_once(
    database: &Database,
    client: &mut Option<Client>,
    opts: &ClusterOptions,
    epoch: i64,
) -> Result<Renewal, PostgresError> {
    let target = database.target();
    let driver = |e: tokio_postgres::Error| PostgresError::driver(target, &e);
    if client.is_none() {
        *client = Some(database.connection().await?);
    }
    let Some(c) = client.as_ref() else {
        return Err(PostgresError::new(target, "no lease connection"));
    };
    let renewed = c
        .query_opt(
            "UPDATE dcv_broker_leader
             SET expires_at = clock_timestamp() + $3::bigint * interval '1 millisecond'
             WHERE holder = $1 AND epoch = $2
             RETURNING epoch",
            &[&opts.node, &epoch, &millis(opts.lease)],
        )
        .await
        .map_err(driver)?;
    if renewed.is_some() {
        return Ok(Renewal::Renewed);
    }
    let row = c
        .query_opt("SELECT holder, epoch FROM dcv_broker_leader", &[])
        .await
        .map_err(driver)?;
    Ok(Renewal::Taken(match row {
        Some(row) => {
            let holder: String = row.try_get(0).map_err(driver)?;
            let now: i64 = row.try_get(1).map_err(driver)?;
            format!(
                "the leader lease passed to {holder:?} (epoch {now}, this broker's was {epoch})"
            )
        }
        None => "the leader lease row is gone".into(),
    }))
}
