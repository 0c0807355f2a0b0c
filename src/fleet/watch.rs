//! WatchServers and WatchSessions: the fleet's servers (or sessions) as a
//! snapshot, then every change to them, numbered, from a bounded log a
//! watcher can resume from. The log, its dispatcher and the watchers are
//! the same for both kinds ([`Watched`]); servers are recorded here,
//! sessions in `watch_sessions.rs`.
//!
//! How it works. Nothing is recorded until the first watcher comes (a
//! broker nobody watches pays nothing); from then on, for the life of the
//! process, every write section notes the servers it touched, and when it
//! commits (still under the fleet's write lock, so in the order things
//! happened) each touched server's watched state is compared with the last
//! one published: a difference becomes a [`ServerEvent`] with the next
//! sequence number and the state before and after, shared (`Arc`) by every
//! watcher. Events go into a log of at most `watch_buffer` events, behind a
//! lock of its own, and a dispatcher task (outside the fleet's lock) hands
//! each event to the watchers whose view it touches: into each one's
//! bounded queue, waking only those. A thousand watchers cost the write
//! path one event per change, and a change costs one filter pass over the
//! watchers plus a wake-up per watcher concerned (waking all of them on
//! every change cost 75 µs of CPU per delivery in the benchmark).
//!
//! What counts as a change: a server registered (ADDED), forgotten or
//! deregistered (REMOVED), or a change of what DescribeServers shows of it
//! beyond host metrics: holds (its state version), availability and its
//! reasons, session counts, health, and its registration's facts (address,
//! endpoints, versions, tags, capacity). A heartbeat that only refreshes
//! load or memory figures is not a change.
//!
//! A watcher whose filter matched a server before a change and does not
//! after sees it REMOVED (it left the watcher's view), and ADDED in the
//! opposite case, so a filtered view stays exact.
//!
//! Each log has an epoch (random, per process): sequence numbers mean
//! something only within it, so a resume names both, and one against
//! another epoch (a restarted broker, another replica) is refused with
//! [`WatchError::Expired`] like one from past the log's start: the client
//! lists again.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

use super::{
    FieldViolation, Fleet, FleetError, Reasons, ServerId, ServerRecord, ServerView, availability,
    model::{FastMap, ServerMap},
    query::Filters,
};

/// A server's state as a change left it.
#[derive(Debug, Clone)]
pub struct ServerSnapshot {
    /// Its record, copied.
    pub record: ServerRecord,
    /// Why it was unavailable then, if it was.
    pub reasons: Reasons,
}

impl ServerSnapshot {
    /// As DescribeServers shows a server.
    pub fn view(&self) -> ServerView<'_> {
        ServerView {
            record: &self.record,
            reasons: self.reasons,
        }
    }
}

/// A kind of object watchers follow: what its published state is, and
/// how a watcher's filters select it.
pub trait Watched: Clone + std::fmt::Debug + Send + Sync + 'static {
    /// An object's state as a change left it.
    type Snapshot: std::fmt::Debug + Send + Sync;
    /// A watcher's parsed filters.
    type Filters: Clone + std::fmt::Debug + Send + Sync;
    /// Whether `snapshot` is in the view `filters` select.
    fn matches(filters: &Self::Filters, snapshot: &Self::Snapshot) -> bool;
}

/// Servers, as WatchServers follows them.
#[derive(Debug, Clone, Copy)]
pub struct ServersWatched;

impl Watched for ServersWatched {
    type Snapshot = ServerSnapshot;
    type Filters = Filters;
    fn matches(filters: &Filters, s: &ServerSnapshot) -> bool {
        filters.matches(&s.record, s.reasons)
    }
}

/// One change to one object, as the log keeps it.
#[derive(Debug)]
pub struct Event<K: Watched> {
    /// Its sequence number within the log's epoch.
    pub seq: u64,
    /// The object's id.
    pub id: Arc<str>,
    /// Its state before (`None`: it was added).
    pub before: Option<Arc<K::Snapshot>>,
    /// Its state after (`None`: it was removed).
    pub after: Option<Arc<K::Snapshot>>,
}

/// What a change is to one watcher, seen through its filters.
#[derive(Debug)]
pub enum Change<K: Watched> {
    /// The object entered the watcher's view (new, or now matches).
    Added(Arc<K::Snapshot>),
    /// The object changed and is still in view.
    Modified(Arc<K::Snapshot>),
    /// The object left the watcher's view (gone, or no longer matches);
    /// its last state in view.
    Removed(Arc<K::Snapshot>),
}

impl<K: Watched> Clone for Change<K> {
    fn clone(&self) -> Self {
        match self {
            Change::Added(s) => Change::Added(s.clone()),
            Change::Modified(s) => Change::Modified(s.clone()),
            Change::Removed(s) => Change::Removed(s.clone()),
        }
    }
}

/// An event to publish: the object's id, its state before and after.
pub(in crate::fleet) type Published<K> = (
    Arc<str>,
    Option<Arc<<K as Watched>::Snapshot>>,
    Option<Arc<<K as Watched>::Snapshot>>,
);

/// A change to a server, in a watcher's view.
pub type ServerChange = Change<ServersWatched>;

/// A server watcher.
pub type ServerWatcher = Watcher<ServersWatched>;

/// The most events a watcher takes from the log at a time.
pub const MAX_BATCH: usize = 256;

/// Why a watch could not start or go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    /// The sequence to resume from is not in the log any more (or never
    /// was: another epoch); list again.
    #[error(
        "sequence {seq} of epoch {epoch:?} is no longer kept (this broker's log holds epoch {current:?} from sequence {oldest}); watch again without FromSequence, which starts with a snapshot"
    )]
    Expired {
        /// What the watcher asked for.
        seq: u64,
        /// Its epoch.
        epoch: String,
        /// This log's epoch.
        current: String,
        /// The oldest sequence one may resume from now.
        oldest: u64,
    },
    /// The watcher fell too far behind; it may resume from `seq`.
    #[error(
        "this watcher fell {behind} changes behind (the broker keeps {kept}); resume with FromSequence {seq} and Epoch {epoch:?} while it is kept"
    )]
    TooSlow {
        /// How far behind it was.
        behind: u64,
        /// The log's size.
        kept: usize,
        /// Where to resume.
        seq: u64,
        /// The epoch.
        epoch: String,
    },
}

/// The log, shared by the fleet's clones and its watchers.
#[derive(Debug)]
pub(in crate::fleet) struct WatchShared<K: Watched> {
    log: Mutex<WatchLog<K>>,
    /// The last sequence published; the dispatcher waits on it.
    latest: watch::Sender<u64>,
    /// The watchers, and how far the dispatcher has handed events out.
    fanout: Mutex<Fanout<K>>,
    /// `fanout.dispatched`, for watchers to read without that lock: every
    /// change up to it in a watcher's view is in its queue.
    dispatched: AtomicU64,
    /// Watchers now connected.
    watchers: AtomicUsize,
}

/// The dispatcher's side: who watches, and what it has handed out.
#[derive(Debug)]
struct Fanout<K: Watched> {
    /// Watchers grouped by their filters: each event is judged once per
    /// distinct filter (portals of one pool watch with the same one).
    groups: Vec<Group<K>>,
    /// Every event up to this one has been judged for every subscriber.
    dispatched: u64,
}

impl<K: Watched> Default for Fanout<K> {
    fn default() -> Self {
        Fanout {
            groups: Vec::new(),
            dispatched: 0,
        }
    }
}

/// The watchers with one filter.
#[derive(Debug)]
struct Group<K: Watched> {
    /// The filter's pairs, sorted: what makes two filters the same.
    key: Vec<(String, String)>,
    filters: K::Filters,
    subscribers: Vec<Weak<Subscriber<K>>>,
}

/// One watcher's share of the fan-out: the changes in its view, queued by
/// the dispatcher, which wakes it only when it queued something.
#[derive(Debug)]
struct Subscriber<K: Watched> {
    filters: K::Filters,
    inbox: Mutex<Inbox<K>>,
    notify: Notify,
}

#[derive(Debug)]
struct Inbox<K: Watched> {
    /// Changes in view not yet taken, in order.
    queue: VecDeque<(u64, Change<K>)>,
    /// Every event up to this one has been judged for this watcher.
    through: u64,
    /// The most changes `queue` may hold; past it the watcher is ended.
    limit: usize,
    /// The queue overflowed (or the dispatcher lost events): ended.
    overflowed: bool,
}

impl<K: Watched> Subscriber<K> {
    /// Queues event `seq`'s `change` (what it is in this watcher's view,
    /// if anything); false once the queue is full.
    fn offer(inbox: &mut Inbox<K>, seq: u64, change: Option<&Change<K>>) -> bool {
        if seq <= inbox.through || inbox.overflowed {
            return true;
        }
        if let Some(change) = change {
            if inbox.queue.len() >= inbox.limit {
                inbox.overflowed = true;
                return false;
            }
            inbox.queue.push_back((seq, change.clone()));
        }
        inbox.through = seq;
        true
    }
}

/// What `event` is to a watcher with `filters`, if anything.
fn judge<K: Watched>(filters: &K::Filters, event: &Event<K>) -> Option<Change<K>> {
    let matches =
        |s: &Option<Arc<K::Snapshot>>| s.as_ref().filter(|s| K::matches(filters, s)).cloned();
    match (matches(&event.before), matches(&event.after)) {
        (None, Some(after)) => Some(Change::Added(after)),
        (Some(_), Some(after)) => Some(Change::Modified(after)),
        (Some(before), None) => Some(Change::Removed(before)),
        (None, None) => None,
    }
}

/// The most changes a watcher's queue holds before it is ended (or half
/// the log, if that is less).
pub const MAX_QUEUED: usize = 4096;

impl<K: Watched> WatchShared<K> {
    /// Hands the events published since the last pass to every watcher
    /// whose view they touch, waking only those. Runs on the dispatcher
    /// task, outside the fleet's lock: filtering costs a pass over the
    /// watchers per event, and a wake-up only per watcher concerned.
    fn dispatch(&self) {
        let mut fanout = self.fanout.lock();
        let (events, lost) = {
            let log = self.log.lock();
            let lost = log.oldest_resumable() > fanout.dispatched;
            let events: Vec<Arc<Event<K>>> = log
                .events
                .iter()
                .filter(|e| e.seq > fanout.dispatched)
                .cloned()
                .collect();
            (events, lost)
        };
        let Some(last) = events.last().map(|e| e.seq) else {
            return;
        };
        for group in &mut fanout.groups {
            group.subscribers.retain(|s| s.strong_count() > 0);
        }
        fanout.groups.retain(|g| !g.subscribers.is_empty());
        for group in &fanout.groups {
            let judged: Vec<(u64, Option<Change<K>>)> = events
                .iter()
                .map(|e| (e.seq, judge(&group.filters, e)))
                .collect();
            if !lost && judged.iter().all(|(_, c)| c.is_none()) {
                // Nothing in view: the watchers' `through` moves on when
                // they next look (see `ServerWatcher::next`).
                continue;
            }
            for subscriber in group.subscribers.iter().filter_map(Weak::upgrade) {
                let mut inbox = subscriber.inbox.lock();
                let queued = inbox.queue.len();
                if lost && inbox.through < last {
                    inbox.overflowed = true;
                }
                for (seq, change) in &judged {
                    if !Subscriber::offer(&mut inbox, *seq, change.as_ref()) {
                        break;
                    }
                }
                let wake = inbox.queue.len() > queued || inbox.overflowed;
                drop(inbox);
                if wake {
                    subscriber.notify.notify_one();
                }
            }
        }
        fanout.dispatched = last;
        // After every inbox has what it needs up to `last` (see
        // `ServerWatcher::next`, which reads it under its inbox's lock).
        self.dispatched.store(last, Ordering::Release);
    }
}

/// The dispatcher: a pass whenever something is published, until the
/// fleet is gone.
async fn dispatcher<K: Watched>(shared: Weak<WatchShared<K>>, mut latest: watch::Receiver<u64>) {
    while latest.changed().await.is_ok() {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.dispatch();
    }
}

#[derive(Debug)]
struct WatchLog<K: Watched> {
    epoch: String,
    events: VecDeque<Arc<Event<K>>>,
    /// The sequence of the last event published (0: none yet).
    last: u64,
    capacity: usize,
}

impl<K: Watched> WatchLog<K> {
    /// OUT_OF_RANGE: this log does not cover a resume after `seq` of
    /// `epoch`.
    fn expired(&self, seq: u64, epoch: String) -> FleetError {
        FleetError::OutOfRange(
            WatchError::Expired {
                seq,
                epoch,
                current: self.epoch.clone(),
                oldest: self.oldest_resumable(),
            }
            .to_string(),
        )
    }

    /// The oldest sequence a watcher may resume after.
    fn oldest_resumable(&self) -> u64 {
        self.events
            .front()
            .map_or(self.last, |first| first.seq.saturating_sub(1))
    }
}

impl<K: Watched> WatchShared<K> {
    pub(in crate::fleet) fn new(capacity: usize) -> Arc<WatchShared<K>> {
        Arc::new(WatchShared {
            log: Mutex::new(WatchLog {
                epoch: uuid::Uuid::new_v4().simple().to_string()[..16].to_owned(),
                events: VecDeque::new(),
                last: 0,
                capacity: capacity.max(1),
            }),
            latest: watch::channel(0).0,
            fanout: Mutex::new(Fanout::default()),
            dispatched: AtomicU64::new(0),
            watchers: AtomicUsize::new(0),
        })
    }
}

/// What the fleet's state keeps for watchers (all empty until the first).
#[derive(Debug, Default)]
pub(in crate::fleet) struct WatchTracking {
    /// Whether changes are recorded at all.
    pub(in crate::fleet) recording: bool,
    /// Servers touched since the last publication.
    touched: Vec<ServerId>,
    /// The last published state of every server.
    pub(in crate::fleet) last: FastMap<ServerId, Arc<ServerSnapshot>>,
}

impl WatchTracking {
    /// Takes over `old`'s published states (a reload replaces the state).
    pub(in crate::fleet) fn take_published_from(&mut self, old: &mut WatchTracking) {
        self.last = std::mem::take(&mut old.last);
    }

    /// The servers whose state was published.
    pub(in crate::fleet) fn published_ids(&self) -> Vec<ServerId> {
        self.last.keys().cloned().collect()
    }

    /// Notes that `id` may have changed.
    #[inline]
    pub(in crate::fleet) fn touch(&mut self, id: &ServerId) {
        if self.recording {
            self.touched.push(id.clone());
        }
    }
}

/// Whether a watcher would see a difference between two states of a
/// server: everything DescribeServers shows but the host's metrics.
fn differs(a: &ServerSnapshot, b: &ServerRecord, reasons: Reasons) -> bool {
    let r = &a.record;
    let (da, db) = (&r.description, &b.description);
    a.reasons != reasons
        || r.state_version != b.state_version
        || r.session_counts() != b.session_counts()
        || r.dcv_server_healthy != b.dcv_server_healthy
        || r.agent_departed != b.agent_departed
        || r.registered_at != b.registered_at
        || da.ip != db.ip
        || da.hostname != db.hostname
        || da.default_dns_name != db.default_dns_name
        || da.endpoints != db.endpoints
        || da.version != db.version
        || da.agent_version != db.agent_version
        || da.tags != db.tags
        || da.max_virtual_sessions != db.max_virtual_sessions
        || da.max_concurrent_sessions_per_user != db.max_concurrent_sessions_per_user
        || da.host.os != db.host.os
}

impl WatchTracking {
    /// Publishes, as events, what the touched servers' changes are, in
    /// the order touched (`servers`: the state's). Called under the write
    /// lock, before it is released.
    ///
    /// Returns the servers touched (each once), for the sessions on them.
    pub(in crate::fleet) fn publish(
        &mut self,
        servers: &ServerMap,
        shared: &WatchShared<ServersWatched>,
        now: Instant,
        unreachable_after: Duration,
    ) -> Vec<ServerId> {
        if self.touched.is_empty() {
            return Vec::new();
        }
        let mut touched = std::mem::take(&mut self.touched);
        let mut seen = FastMap::default();
        touched.retain(|id| seen.insert(id.clone(), ()).is_none());
        let mut log = shared.log.lock();
        let before_last = log.last;
        for id in &touched {
            let id = id.clone();
            let current = servers.get(&id);
            let previous = self.last.get(&id);
            let after = match (current, previous) {
                (None, None) => continue,
                (Some(server), previous) => {
                    let reasons = availability::reasons(server, now, unreachable_after);
                    if previous.is_some_and(|p| !differs(p, server, reasons)) {
                        continue;
                    }
                    Some(Arc::new(ServerSnapshot {
                        record: (**server).clone(),
                        reasons,
                    }))
                }
                (None, Some(_)) => None,
            };
            let before = match &after {
                Some(after) => self.last.insert(id.clone(), after.clone()),
                None => self.last.remove(&id),
            };
            log.append(id, before, after);
        }
        let last = log.last;
        drop(log);
        if last != before_last {
            shared.latest.send_replace(last);
        }
        touched
    }
}

impl<K: Watched> WatchLog<K> {
    /// Appends the next event, dropping the oldest past the capacity.
    fn append(
        &mut self,
        id: Arc<str>,
        before: Option<Arc<K::Snapshot>>,
        after: Option<Arc<K::Snapshot>>,
    ) {
        self.last += 1;
        let event = Arc::new(Event {
            seq: self.last,
            id,
            before,
            after,
        });
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }
}

impl<K: Watched> WatchShared<K> {
    /// Publishes `events` (id, before, after), in order, under the
    /// fleet's write lock; wakes the dispatcher once.
    pub(in crate::fleet) fn publish_events(&self, events: Vec<Published<K>>) {
        if events.is_empty() {
            return;
        }
        let mut log = self.log.lock();
        for (id, before, after) in events {
            log.append(id, before, after);
        }
        let last = log.last;
        drop(log);
        self.latest.send_replace(last);
    }

    /// The sequence of the last event published.
    pub(in crate::fleet) fn last_sequence(&self) -> u64 {
        self.log.lock().last
    }

    /// Starts the dispatcher (once recording starts).
    pub(in crate::fleet) fn spawn_dispatcher(self: &Arc<Self>) {
        tokio::spawn(dispatcher(Arc::downgrade(self), self.latest.subscribe()));
    }

    /// How many watchers are connected.
    pub(in crate::fleet) fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }
}

/// A watcher: its share of the fan-out, and what it was last told.
#[derive(Debug)]
pub struct Watcher<K: Watched> {
    shared: Arc<WatchShared<K>>,
    subscriber: Arc<Subscriber<K>>,
    epoch: String,
    /// The last sequence delivered (or judged, at a progress mark).
    cursor: u64,
}

impl<K: Watched> Drop for Watcher<K> {
    fn drop(&mut self) {
        self.shared.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a watch starts.
#[derive(Debug)]
pub enum WatchStart<K: Watched> {
    /// With the objects that match, in id order, as of the watcher's
    /// cursor.
    Snapshot {
        /// The objects.
        items: Vec<Arc<K::Snapshot>>,
    },
    /// With the changes after the sequence asked for.
    Resume,
}

/// What a watcher gets next.
#[derive(Debug)]
pub enum WatchNext<K: Watched> {
    /// Changes in its view, in order; `seq`: resume after it.
    Changes {
        /// Everything up to it is delivered.
        seq: u64,
        /// The changes.
        changes: Vec<(u64, Change<K>)>,
    },
    /// Nothing in its view happened up to `seq` for a progress interval.
    Progress {
        /// Everything up to it is delivered.
        seq: u64,
    },
}

impl<K: Watched> Watcher<K> {
    /// The log's epoch.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The last sequence delivered.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Waits for the next changes in view (at most [`MAX_BATCH`]), or
    /// `progress` of quiet.
    pub async fn next(&mut self, progress: Duration) -> Result<WatchNext<K>, WatchError> {
        let deadline = Instant::now() + progress;
        loop {
            // Registered before looking, so a change queued meanwhile
            // still wakes it.
            let notified = self.subscriber.notify.notified();
            {
                let mut inbox = self.subscriber.inbox.lock();
                if inbox.overflowed {
                    let (last, capacity) = {
                        let log = self.shared.log.lock();
                        (log.last, log.capacity)
                    };
                    return Err(WatchError::TooSlow {
                        behind: last.saturating_sub(self.cursor),
                        kept: capacity,
                        seq: self.cursor,
                        epoch: self.epoch.clone(),
                    });
                }
                // Under the inbox's lock: see `WatchShared::dispatch`.
                let through = inbox
                    .through
                    .max(self.shared.dispatched.load(Ordering::Acquire));
                if !inbox.queue.is_empty() {
                    let take = inbox.queue.len().min(MAX_BATCH);
                    let changes: Vec<(u64, Change<K>)> = inbox.queue.drain(..take).collect();
                    self.cursor = match inbox.queue.front() {
                        // More queued: this batch ends at its own last.
                        Some(_) => changes.last().map_or(self.cursor, |c| c.0),
                        None => through,
                    };
                    return Ok(WatchNext::Changes {
                        seq: self.cursor,
                        changes,
                    });
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let inbox = self.subscriber.inbox.lock();
                if inbox.queue.is_empty() && !inbox.overflowed {
                    let through = inbox
                        .through
                        .max(self.shared.dispatched.load(Ordering::Acquire));
                    self.cursor = self.cursor.max(through);
                    return Ok(WatchNext::Progress { seq: self.cursor });
                }
                // Queued just now: deliver it rather than a mark.
            }
        }
    }
}

impl Fleet {
    /// Starts watching the servers `filters` select: from a snapshot, or,
    /// with `resume` (an epoch and the last sequence delivered), from the
    /// changes after it. INVALID_ARGUMENT for bad filters; OUT_OF_RANGE
    /// ([`WatchError::Expired`]) for a resume the log no longer covers.
    pub fn watch_servers(
        &self,
        filters: &[(String, String)],
        resume: Option<(String, u64)>,
    ) -> Result<(ServerWatcher, WatchStart<ServersWatched>), FleetError> {
        let mut violations: Vec<FieldViolation> = Vec::new();
        let parsed = Filters::parse(filters, &mut violations);
        if !violations.is_empty() {
            return Err(FleetError::InvalidArgument(violations));
        }
        self.start_recording();
        subscribe(&self.watch, filters, parsed, resume, || {
            // The snapshot and its sequence under one read lock: every
            // change after it is published later, with a greater one.
            let state = self.read(Instant::now());
            let seq = self.watch.last_sequence();
            let servers = state
                .order
                .iter()
                .filter_map(|id| state.watch.last.get(id))
                .cloned()
                .collect::<Vec<_>>();
            (seq, servers)
        })
    }
}

/// Subscribes a watcher with `filters` (`pairs` as given) to `shared`'s
/// log: from `snapshot` (its sequence and every object, in id order,
/// filtered here), or from `resume`.
pub(in crate::fleet) fn subscribe<K: Watched>(
    shared: &Arc<WatchShared<K>>,
    pairs: &[(String, String)],
    filters: K::Filters,
    resume: Option<(String, u64)>,
    snapshot: impl FnOnce() -> (u64, Vec<Arc<K::Snapshot>>),
) -> Result<(Watcher<K>, WatchStart<K>), FleetError> {
    let mut key = pairs.to_vec();
    key.sort_unstable();
    key.dedup();
    let (from, start) = match resume {
        Some((epoch, seq)) => {
            let log = shared.log.lock();
            if epoch != log.epoch || seq < log.oldest_resumable() || seq > log.last {
                return Err(log.expired(seq, epoch));
            }
            (seq, WatchStart::Resume)
        }
        None => {
            let (seq, mut items) = snapshot();
            items.retain(|s| K::matches(&filters, s));
            (seq, WatchStart::Snapshot { items })
        }
    };
    let subscriber = Arc::new(Subscriber {
        filters,
        inbox: Mutex::new(Inbox {
            queue: VecDeque::new(),
            through: from,
            limit: 0,
            overflowed: false,
        }),
        notify: Notify::new(),
    });
    // Under the fan-out's lock: the events the dispatcher handed out
    // already (after `from`) are queued here, the later ones by it.
    let mut fanout = shared.fanout.lock();
    let log = shared.log.lock();
    if from < log.oldest_resumable() {
        // Evicted between the check (or the snapshot) and now.
        return Err(log.expired(from, log.epoch.clone()));
    }
    let epoch = log.epoch.clone();
    let base = (log.capacity / 2).clamp(1, MAX_QUEUED);
    {
        let mut inbox = subscriber.inbox.lock();
        inbox.limit = usize::MAX;
        for event in log.events.iter().filter(|e| e.seq <= fanout.dispatched) {
            let change = judge(&subscriber.filters, event);
            Subscriber::offer(&mut inbox, event.seq, change.as_ref());
        }
        // A watcher that resumed far behind may catch up on what it
        // starts with, and half the usual room more.
        inbox.limit = base + inbox.queue.len();
    }
    drop(log);
    let weak = Arc::downgrade(&subscriber);
    match fanout.groups.iter_mut().find(|g| g.key == key) {
        Some(group) => group.subscribers.push(weak),
        None => fanout.groups.push(Group {
            key,
            filters: subscriber.filters.clone(),
            subscribers: vec![weak],
        }),
    }
    drop(fanout);
    shared.watchers.fetch_add(1, Ordering::Relaxed);
    Ok((
        Watcher {
            shared: shared.clone(),
            subscriber,
            epoch,
            cursor: from,
        },
        start,
    ))
}

impl Fleet {
    /// On a follower (which runs no maintenance of its own): publishes,
    /// for watchers, the agents that went silent past the unreachable
    /// timeout, as the leader's maintenance does for its own watchers.
    /// What it notes is the follower's alone: nothing is submitted.
    pub(in crate::fleet) fn note_silences_for_watchers(&self) {
        let now = Instant::now();
        {
            let state = self.state.read();
            if !state.watch.recording || !state.silence_due(now) {
                return;
            }
        }
        let mut state = self.lock_write();
        state.note_silences(now, &self.ctx());
        drop(self.commit(&mut state));
    }

    /// How many changes the log keeps now (at most `watch_buffer`).
    pub fn watch_kept(&self) -> usize {
        self.watch.log.lock().events.len()
    }

    /// The sequence number of the last change published (0: none yet).
    pub fn watch_sequence(&self) -> u64 {
        *self.watch.latest.borrow()
    }

    /// How many watchers are connected (servers' and sessions').
    pub fn watchers(&self) -> usize {
        self.watch.watchers() + self.session_watch.watchers()
    }

    /// Turns recording on (once), with its dispatcher: every server's
    /// state is published as it is, without events, so that later changes
    /// compare against it.
    pub(in crate::fleet) fn start_recording(&self) {
        if self.state.read().watch.recording {
            return;
        }
        let now = Instant::now();
        let mut state = self.write(now);
        if state.watch.recording {
            return;
        }
        let unreachable_after = self.config.unreachable_after;
        let last: FastMap<ServerId, Arc<ServerSnapshot>> = state
            .servers
            .iter()
            .map(|(id, server)| {
                let reasons = availability::reasons(server, now, unreachable_after);
                (
                    id.clone(),
                    Arc::new(ServerSnapshot {
                        record: (**server).clone(),
                        reasons,
                    }),
                )
            })
            .collect();
        state.watch.last = last;
        state.watch.recording = true;
        self.watch.spawn_dispatcher();
        tracing::info!(
            servers = state.servers.len(),
            "watchers: recording server changes from now on"
        );
    }
}
