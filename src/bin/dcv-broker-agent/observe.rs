//! What runs on the host, as the heartbeat reports it: a task polls `dcv
//! list-sessions --json` (and `describe-session` for connection counts
//! the list lacks) and the logged-in users, and keeps the latest snapshot.
//! Heartbeats read the snapshot and never wait on `dcv`, so a hung tool
//! makes the server unhealthy, not silent.
//!
//! Instructions carried out meanwhile adjust the snapshot at once (a
//! created session appears, a deleted one goes), and a poll that started
//! before such a change is thrown away, so that a heartbeat never reports
//! the world as it was before an instruction the broker was told about.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{Notify, watch};

use dcv_broker::pb;

use crate::{
    dcv::{Dcv, DcvSession},
    facts,
    state::Journal,
};

/// Sessions whose connection count the list lacks are described one by
/// one, at most this many per poll: a host runs tens of sessions.
const MAX_DESCRIBED_PER_POLL: usize = 256;

/// The latest view of the host.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Whether `dcv` answered the last poll in time.
    pub healthy: bool,
    pub sessions: Vec<DcvSession>,
    pub users: Vec<pb::LoggedInUser>,
}

#[derive(Debug, Default)]
struct Inner {
    snapshot: Option<Snapshot>,
    /// Bumped by every instruction that changes the sessions.
    epoch: u64,
}

/// The poller and its snapshot; shared by heartbeats and instructions.
#[derive(Debug)]
pub struct Observer {
    dcv: Dcv,
    query_users: bool,
    journal: Arc<Mutex<Journal>>,
    inner: Mutex<Inner>,
    poke: Notify,
    polled: watch::Sender<u64>,
}

impl Observer {
    pub fn new(dcv: Dcv, query_users: bool, journal: Arc<Mutex<Journal>>) -> Observer {
        Observer {
            dcv,
            query_users,
            journal,
            inner: Mutex::new(Inner::default()),
            poke: Notify::new(),
            polled: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The latest snapshot, if a poll has finished.
    pub fn snapshot(&self) -> Option<Snapshot> {
        self.lock().snapshot.clone()
    }

    /// Waits up to `bound` for the first poll to finish.
    pub async fn first_snapshot(&self, bound: Duration) -> Option<Snapshot> {
        let mut rx = self.polled.subscribe();
        let _ = tokio::time::timeout(bound, rx.wait_for(|n| *n > 0)).await;
        self.snapshot()
    }

    /// A session was created: it runs from now on.
    pub fn created(&self, session: DcvSession) {
        let mut inner = self.lock();
        inner.epoch += 1;
        if let Some(s) = inner.snapshot.as_mut() {
            s.sessions.retain(|x| x.id != session.id);
            s.sessions.push(session);
        }
        drop(inner);
        self.poke.notify_one();
    }

    /// A session was closed.
    pub fn deleted(&self, id: &str) {
        let mut inner = self.lock();
        inner.epoch += 1;
        if let Some(s) = inner.snapshot.as_mut() {
            s.sessions.retain(|x| x.id != id);
        }
        drop(inner);
        self.poke.notify_one();
    }

    /// Polls every `every` (or sooner when an instruction asks), forever.
    pub async fn run(self: Arc<Self>, every: watch::Receiver<Duration>) {
        loop {
            let started_epoch = self.lock().epoch;
            let polled = self.poll().await;
            if !self.store(started_epoch, polled) {
                // An instruction changed things while we looked: look again.
                continue;
            }
            self.polled.send_modify(|n| *n += 1);
            let next = *every.borrow();
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                () = self.poke.notified() => {}
            }
        }
    }

    /// Keeps a poll's result unless an instruction changed the sessions
    /// since it started; false when it was thrown away.
    fn store(&self, started_epoch: u64, polled: Option<Snapshot>) -> bool {
        let mut inner = self.lock();
        if inner.epoch != started_epoch {
            return false;
        }
        match polled {
            Some(s) => {
                let live: HashSet<String> = s.sessions.iter().map(|x| x.id.clone()).collect();
                inner.snapshot = Some(s);
                drop(inner);
                self.compact_journal(live);
            }
            None => {
                let mut s = inner.snapshot.take().unwrap_or_default();
                s.healthy = false;
                inner.snapshot = Some(s);
            }
        }
        true
    }

    async fn poll(&self) -> Option<Snapshot> {
        let users = if self.query_users {
            facts::logged_in_users().await
        } else {
            Vec::new()
        };
        let mut sessions = match self.dcv.list_sessions().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("the DCV server does not answer: {e}");
                return None;
            }
        };
        for s in sessions
            .iter_mut()
            .filter(|s| s.num_of_connections.is_none())
            .take(MAX_DESCRIBED_PER_POLL)
        {
            match self.dcv.describe_session(&s.id).await {
                Ok(Some(full)) => *s = full,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("the DCV server does not answer: {e}");
                    return None;
                }
            }
        }
        Some(Snapshot {
            healthy: true,
            sessions,
            users,
        })
    }

    fn compact_journal(&self, live: HashSet<String>) {
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || {
            let mut j = journal.lock().unwrap_or_else(|p| p.into_inner());
            if j.wants_compaction()
                && let Err(e) = j.compact(&live)
            {
                tracing::warn!("cannot compact the instruction journal: {e}");
            }
        });
    }
}

/// The heartbeat's view of a session.
pub fn agent_session(s: &DcvSession) -> pb::AgentSession {
    let kind = match s.kind {
        pb::SessionType::Unspecified => pb::SessionType::Virtual,
        k => k,
    };
    pb::AgentSession {
        id: s.id.clone(),
        owner: s.owner.clone(),
        r#type: kind as i32,
        state: pb::SessionState::Ready as i32,
        num_of_connections: s.num_of_connections.unwrap_or(0),
        last_disconnection_time: s.last_disconnection_time.map(prost_types::Timestamp::from),
        creation_time: s.creation_time.map(prost_types::Timestamp::from),
        name: s.name.clone(),
    }
}
