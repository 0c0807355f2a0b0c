//! The replica's controller: takes the lease or follows whoever holds it,
//! loads the state for its role, applies the leader's changes as a
//! follower, steps down the moment its lease or its writer fails, and
//! recovers by itself when the database comes back.
//!
//! Every role change goes through a full reload from the database (see
//! [`Controller::load`]): a leader that stepped down may hold changes in
//! memory that never committed, and a replica that was cut off may have
//! missed any number of them; a reload is the one way back that is right
//! in every case. It costs a read of the whole fleet per change of role,
//! not per change.

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use super::{ClusterStore, ClusterView, Role};
use crate::{
    auth::Auth,
    fleet::{Fleet, persist::Snapshot},
    store::postgres::{Batch, ClusterOptions, Database, Elected, TailError, TailOptions},
};

/// The shortest wait before trying an unreachable database again.
const RETRY_MIN: Duration = Duration::from_millis(100);

/// What the controller drives.
pub struct Replica {
    /// The shared database.
    pub db: Database,
    /// This replica's name, URL and lease.
    pub options: ClusterOptions,
    /// The fleet, built from the snapshot at `loaded`.
    pub fleet: Fleet,
    /// The client registry, built from the same snapshot.
    pub auth: Auth,
    /// The store both write through.
    pub store: Arc<ClusterStore>,
    /// What everything else reads.
    pub view: ClusterView,
}

/// The running controller. Dropping it stops it: a leader's lease then
/// lapses and another replica takes over a lease later;
/// [`Controller::resign`] hands it over at once.
pub struct Controller {
    task: JoinHandle<()>,
    replica: Arc<Replica>,
}

impl Controller {
    /// Stops the controller; a leader takes no more writes and gives up
    /// its lease, so another replica leads at its next check rather than a
    /// lease later. For a clean shutdown, once the server has drained.
    pub async fn resign(mut self) {
        self.task.abort();
        // Wait until it stopped, dropping the lease holder and the writer.
        let _ = (&mut self.task).await;
        let r = &*self.replica;
        if r.view.role() != Role::Leader {
            return;
        }
        r.step_down("this broker is shutting down".into());
        let epoch = r.view.status().epoch;
        match r.db.resign(&r.options, epoch).await {
            Ok(true) => tracing::info!(epoch, "resigned the lease"),
            Ok(false) => tracing::info!(epoch, "the lease had already passed on"),
            Err(e) => {
                tracing::warn!(epoch, error = %e, "could not resign the lease; it lapses by itself")
            }
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a role's loop ended with.
enum Step {
    /// Elect again (after a reload).
    Again,
    /// This replica just took the lease: lead at once.
    Lead(i64),
}

impl Replica {
    /// Starts the controller on a fleet loaded at change-log position
    /// `loaded`, and waits for its first role: the broker announces its
    /// port only once it knows whether it leads, and its memory is
    /// current. A database that fails before then fails the start.
    pub async fn start(self, loaded: u64) -> Result<Controller, String> {
        let (first, decided) = oneshot::channel();
        let replica = Arc::new(self);
        let controller = Ctl {
            replica: replica.clone(),
        };
        let task = tokio::spawn(controller.run(loaded, first));
        match decided.await {
            Ok(Ok(())) => Ok(Controller { task, replica }),
            Ok(Err(why)) => {
                task.abort();
                Err(why)
            }
            Err(_) => Err("the cluster controller stopped before taking a role".into()),
        }
    }
}

/// The controller's loop, on a task of its own.
struct Ctl {
    replica: Arc<Replica>,
}

/// Tells the starting broker once, with the first role or the first error.
type First = Option<oneshot::Sender<Result<(), String>>>;

impl Ctl {
    async fn run(self, loaded: u64, first: oneshot::Sender<Result<(), String>>) {
        let r = &*self.replica;
        let mut first: First = Some(first);
        // The snapshot the broker started from is fresh for the first
        // follow; every later role change reloads.
        let mut fresh = Some(loaded);
        let mut next: Option<i64> = None;
        let mut retry = RETRY_MIN;
        let mut unreachable = false;
        loop {
            let outcome = match next.take() {
                Some(epoch) => self.lead(epoch, &mut first).await,
                None => match self.elect().await.inspect(|_| {
                    if std::mem::take(&mut unreachable) {
                        tracing::info!(database = %r.db.target(), "database reachable again");
                    }
                }) {
                    Ok(Elected::Leader { epoch, .. }) => {
                        fresh = None;
                        self.lead(epoch, &mut first).await
                    }
                    Ok(Elected::Follower { leader, epoch }) => {
                        r.view.set_epoch(epoch);
                        self.follow(leader, fresh.take(), &mut first).await
                    }
                    Err(why) => Err(why),
                },
            };
            match outcome {
                Ok(step) => {
                    retry = RETRY_MIN;
                    if let Step::Lead(epoch) = step {
                        next = Some(epoch);
                    }
                }
                Err(why) => {
                    if let Some(first) = first.take() {
                        let _ = first.send(Err(why));
                        return;
                    }
                    fresh = None;
                    r.step_down(format!("the database is unreachable: {why}"));
                    if !unreachable {
                        unreachable = true;
                        tracing::warn!(database = %r.db.target(), %why, "database unreachable");
                    }
                    // Not a synchronisation: how often to knock on a
                    // database that did not answer.
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(r.options.lease / 2).max(RETRY_MIN);
                }
            }
        }
    }

    /// Tries for the lease, within the lease's time (a database that hangs
    /// counts as unreachable).
    async fn elect(&self) -> Result<Elected, String> {
        let r = &*self.replica;
        match tokio::time::timeout(r.options.lease, r.db.elect(&r.options, None)).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "no answer to the election within {:?}",
                r.options.lease
            )),
        }
    }

    /// Leads with lease `epoch` until the lease or the writer fails.
    async fn lead(&self, epoch: i64, first: &mut First) -> Result<Step, String> {
        let r = &*self.replica;
        let lease =
            r.db.hold_lease(&r.options, epoch)
                .await
                .map_err(|e| e.to_string())?;
        // Read after the lease is ours: the epoch it raised fences the
        // previous leader, so nothing it could still commit is missing.
        let (snapshot, seq) = r.db.snapshot().await.map_err(|e| e.to_string())?;
        r.load(&snapshot, seq)?;
        drop(snapshot);
        let writer =
            r.db.start_writer(&r.options, epoch, r.view.clone())
                .await
                .map_err(|e| e.to_string())?;
        let mut failed = writer.failed();
        r.store.set_writer(Some(Arc::new(writer.clone())));
        r.view.set_epoch(epoch);
        r.fleet.set_writable(true);
        r.auth.set_writable(true);
        r.view.set_role(Role::Leader);
        tracing::info!(epoch, seq, node = %r.options.node, "became leader");
        if let Some(first) = first.take() {
            let _ = first.send(Ok(()));
        }
        let mut lost = lease.lost();
        let why = tokio::select! {
            why = lost.wait_for(Option::is_some) => why
                .ok()
                .and_then(|why| why.clone())
                .unwrap_or_else(|| "the lease's renewal stopped".into()),
            why = failed.wait_for(Option::is_some) => why
                .ok()
                .and_then(|why| why.clone())
                .unwrap_or_else(|| "the writer stopped".into()),
        };
        r.step_down(format!("this broker lost the leadership: {why}"));
        tracing::warn!(epoch, %why, "lost leadership");
        drop(lease);
        drop(writer);
        Ok(Step::Again)
    }

    /// Follows `leader`, applying the change log from where memory is
    /// (`fresh`, or a reload), until the leader's lease lapses (then this
    /// replica may lead), the log moved past it, or the database fails.
    async fn follow(
        &self,
        mut leader: String,
        fresh: Option<u64>,
        first: &mut First,
    ) -> Result<Step, String> {
        let r = &*self.replica;
        let seq = match fresh {
            Some(seq) => seq,
            None => {
                let (snapshot, seq) = r.db.snapshot().await.map_err(|e| e.to_string())?;
                r.load(&snapshot, seq)?;
                seq
            }
        };
        // NOTIFY wakes the tail at once; the poll only bounds what a lost
        // notification costs.
        let poll = TailOptions {
            poll: r.options.lease / 5,
            listen: true,
        };
        let mut tail = r.db.tail_with(seq, poll).await.map_err(|e| e.to_string())?;
        // The tail runs on a task of its own: the election check below
        // must never cancel a read of the log halfway.
        let (batches, mut received) = mpsc::channel::<Result<Batch, TailError>>(16);
        let tailing = AbortOnDrop(tokio::spawn(async move {
            loop {
                let next = tail.next().await;
                let ended = next.is_err();
                if batches.send(next).await.is_err() || ended {
                    return;
                }
            }
        }));
        r.view.set_role(Role::Follower {
            leader: leader.clone(),
        });
        tracing::info!(%leader, seq, node = %r.options.node, "following");
        if let Some(first) = first.take() {
            let _ = first.send(Ok(()));
        }
        let mut check = tokio::time::interval(r.options.lease / 3);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.reset();
        let step = loop {
            tokio::select! {
                batch = received.recv() => match batch {
                    Some(Ok(batch)) => {
                        if let Err(e) = r.apply(&batch) {
                            tracing::warn!(error = %e, seq = batch.seq, "a replicated change did not apply; reloading");
                            break Ok(Step::Again);
                        }
                    }
                    Some(Err(TailError::Gap { applied, oldest })) => {
                        tracing::info!(applied, oldest, "the change log no longer holds what this replica lacks; reloading");
                        break Ok(Step::Again);
                    }
                    Some(Err(TailError::Lost(why))) => break Err(why),
                    None => break Err("the change log's reader stopped".into()),
                },
                _ = check.tick() => match self.elect().await {
                    Ok(Elected::Leader { epoch, .. }) => break Ok(Step::Lead(epoch)),
                    Ok(Elected::Follower { leader: now, epoch }) => {
                        r.view.set_epoch(epoch);
                        if now != leader {
                            leader = now;
                            r.view.set_role(Role::Follower { leader: leader.clone() });
                            tracing::info!(%leader, epoch, seq = r.view.applied(), "following");
                        }
                    }
                    Err(why) => break Err(why),
                },
            }
        };
        drop(tailing);
        step
    }
}

impl Replica {
    /// Memory becomes the snapshot's, at change-log position `seq`.
    fn load(&self, snapshot: &Snapshot, seq: u64) -> Result<(), String> {
        self.fleet
            .reload(snapshot)
            .map_err(|e| format!("cannot load the fleet: {e}"))?;
        self.auth
            .reload(snapshot)
            .map_err(|e| format!("cannot load the API clients: {e}"))?;
        self.view.reset_applied(seq);
        Ok(())
    }

    /// Applies one batch of the leader's changes.
    fn apply(&self, batch: &Batch) -> Result<(), String> {
        self.fleet
            .apply_replicated(&batch.changes)
            .map_err(|e| e.to_string())?;
        self.auth.apply_replicated(&batch.changes);
        self.view.set_applied(batch.seq);
        self.view.note_lag(batch.committed_at);
        Ok(())
    }

    /// No more writes here: refused at once, and memory left to the
    /// reload that comes with the next role.
    fn step_down(&self, why: String) {
        self.fleet.set_writable(false);
        self.auth.set_writable(false);
        self.store.set_writer(None);
        self.view.set_role(Role::Unavailable { why });
    }
}

/// Stops a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
