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

use dcv_broker::{
    fleet::{MAX_REPORTED_SESSIONS, MAX_TEXT_BYTES},
    pb,
};

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

/// The sessions a heartbeat reports: within the broker's bounds (it
/// refuses the whole report otherwise, which would leave the server
/// unreported): each id once, ids and owners of at most
/// [`MAX_TEXT_BYTES`], names cut to it, one console session, at most
/// [`MAX_REPORTED_SESSIONS`]. What is left out is logged.
pub fn reported_sessions(sessions: &[DcvSession]) -> Vec<pb::AgentSession> {
    let mut seen = HashSet::new();
    let mut console = false;
    let mut out = Vec::new();
    for s in sessions {
        if out.len() == MAX_REPORTED_SESSIONS {
            tracing::warn!("more than {MAX_REPORTED_SESSIONS} sessions; the rest are not reported");
            break;
        }
        let is_console = s.kind == pb::SessionType::Console;
        if s.id.len() > MAX_TEXT_BYTES
            || s.owner.len() > MAX_TEXT_BYTES
            || !seen.insert(s.id.as_str())
            || (is_console && console)
        {
            tracing::warn!(session = %s.id.chars().take(64).collect::<String>(), "not reported: a duplicate, a second console session, or an id or owner too long");
            continue;
        }
        console |= is_console;
        let mut reported = agent_session(s);
        if reported.name.len() > MAX_TEXT_BYTES {
            let cut = (0..=MAX_TEXT_BYTES)
                .rev()
                .find(|i| reported.name.is_char_boundary(*i))
                .unwrap_or(0);
            reported.name.truncate(cut);
        }
        out.push(reported);
    }
    out
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

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt, path::PathBuf};

    use super::*;
    use crate::state::StateDir;

    /// A `dcv` whose list is the file `list` beside it, failing while the
    /// file `fail` exists.
    const FAKE: &str = "#!/bin/sh\nD=\"$(dirname \"$0\")\"\n[ -e \"$D/fail\" ] && { echo 'dcv server down' >&2; exit 1; }\ncat \"$D/list\"\n";

    fn setup() -> (PathBuf, Arc<Observer>) {
        let dir = std::env::temp_dir().join(format!("agent-observe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dcv = dir.join("dcv");
        std::fs::write(&dcv, FAKE).unwrap();
        std::fs::set_permissions(&dcv, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("list"), "[]").unwrap();
        let journal = StateDir::open(&dir.join("state"))
            .unwrap()
            .journal()
            .unwrap();
        let observer = Observer::new(
            Dcv::new(dcv, Duration::from_secs(10)),
            false,
            Arc::new(Mutex::new(journal)),
        );
        (dir, Arc::new(observer))
    }

    /// The polls finished so far; [`after`] waits for one more.
    fn mark(observer: &Observer) -> (watch::Receiver<u64>, u64) {
        let mut rx = observer.polled.subscribe();
        let seen = *rx.borrow_and_update();
        (rx, seen)
    }

    async fn after((mut rx, seen): (watch::Receiver<u64>, u64)) {
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|n| *n > seen))
            .await
            .expect("a poll finishes")
            .unwrap();
    }

    fn session(id: &str) -> DcvSession {
        DcvSession {
            id: id.into(),
            owner: "alice".into(),
            name: id.into(),
            kind: pb::SessionType::Virtual,
            num_of_connections: Some(0),
            creation_time: None,
            last_disconnection_time: None,
        }
    }

    #[test]
    fn reports_stay_within_the_brokers_bounds() {
        let mut console = session("c1");
        console.kind = pb::SessionType::Console;
        let mut console2 = session("c2");
        console2.kind = pb::SessionType::Console;
        let mut long_name = session("n");
        long_name.name = "é".repeat(MAX_TEXT_BYTES);
        let long_id = session(&"x".repeat(MAX_TEXT_BYTES + 1));
        let all = vec![
            session("a"),
            session("a"),
            console,
            console2,
            long_name,
            long_id,
        ];
        let reported = reported_sessions(&all);
        let ids: Vec<_> = reported.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["a", "c1", "n"]);
        assert!(reported[2].name.len() <= MAX_TEXT_BYTES);
        let many: Vec<_> = (0..MAX_REPORTED_SESSIONS + 5)
            .map(|i| session(&i.to_string()))
            .collect();
        assert_eq!(reported_sessions(&many).len(), MAX_REPORTED_SESSIONS);
    }

    #[tokio::test]
    async fn the_snapshot_follows_dcv_and_instructions_and_marks_a_silent_dcv_unhealthy() {
        let (dir, observer) = setup();
        let (_every, rx) = watch::channel(Duration::from_secs(3600));
        let poller = tokio::spawn(observer.clone().run(rx));
        let first = observer
            .first_snapshot(Duration::from_secs(20))
            .await
            .unwrap();
        assert!(first.healthy && first.sessions.is_empty());

        // A create shows at once, before any poll.
        std::fs::write(
            dir.join("list"),
            r#"[{"id":"s1","owner":"alice","type":"virtual","num-of-connections":3}]"#,
        )
        .unwrap();
        let polled = mark(&observer);
        observer.created(session("s1"));
        assert_eq!(observer.snapshot().unwrap().sessions[0].id, "s1");
        // The poke makes a fresh poll, which brings dcv's count.
        after(polled).await;
        let s = observer.snapshot().unwrap();
        assert_eq!(s.sessions.len(), 1);
        assert_eq!(s.sessions[0].num_of_connections, Some(3));
        assert_eq!(agent_session(&s.sessions[0]).num_of_connections, 3);

        // dcv fails: unhealthy, and the sessions last seen are kept.
        std::fs::write(dir.join("fail"), "").unwrap();
        let polled = mark(&observer);
        observer.poke.notify_one();
        after(polled).await;
        let s = observer.snapshot().unwrap();
        assert!(!s.healthy);
        assert_eq!(s.sessions.len(), 1);

        // A delete goes at once.
        observer.deleted("s1");
        assert!(observer.snapshot().unwrap().sessions.is_empty());
        poller.abort();
        let _ = std::fs::remove_dir_all(dir);
    }
}
