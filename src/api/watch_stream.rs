//! WatchServers' and WatchSessions' reply stream: the snapshot in messages of about
//! [`MESSAGE_BYTES`], then the watcher's changes, likewise, and progress
//! marks; pulled as the client reads (nothing is built for a client that
//! does not read, so a slow one costs no memory: it falls behind in the
//! fleet's bounded log and is ended when it reads again).

use std::{collections::VecDeque, pin::Pin, sync::Arc, time::Duration};

use futures_util::Stream;
use prost::Message as _;
use tokio::sync::watch;
use tonic::Status;

use crate::{
    fleet::{
        FleetError,
        watch::{Change, ServersWatched, WatchError, WatchNext, WatchStart, Watched, Watcher},
        watch_sessions::SessionsWatched,
    },
    pb, wire,
};

/// A watch stream of `R` messages.
pub type WatchStream<R> = Pin<Box<dyn Stream<Item = Result<R, Status>> + Send + 'static>>;

/// WatchServers' stream.
pub type WatchServersStream = WatchStream<pb::WatchServersResponse>;

/// WatchSessions' stream.
pub type WatchSessionsStream = WatchStream<pb::WatchSessionsResponse>;

/// How a watched kind goes on the wire.
pub trait Streamed: Watched {
    /// An object (`Server`, `Session`).
    type Item: prost::Message + Send;
    /// A change to one (`ServerChange`, `SessionChange`).
    type PbChange: prost::Message + Send;
    /// A message of the stream.
    type Response: Send + 'static;
    /// An object's state as DescribeServers or DescribeSessions shows it.
    fn item(snapshot: &Self::Snapshot) -> Self::Item;
    /// A change as the stream carries it.
    fn change(sequence: u64, change: Change<Self>) -> Self::PbChange;
    /// A change's sequence number.
    fn sequence_of(change: &Self::PbChange) -> u64;
    /// A message with no objects and no changes.
    fn response(kind: pb::WatchMessageType, epoch: String, sequence: u64) -> Self::Response;
    /// Fills a SNAPSHOT message.
    fn with_items(response: &mut Self::Response, items: Vec<Self::Item>, end: bool);
    /// Fills a CHANGES message.
    fn with_changes(response: &mut Self::Response, changes: Vec<Self::PbChange>);
}

impl Streamed for ServersWatched {
    type Item = pb::Server;
    type PbChange = pb::ServerChange;
    type Response = pb::WatchServersResponse;
    fn item(s: &Self::Snapshot) -> pb::Server {
        wire::server_to_pb(s.view())
    }
    fn change(sequence: u64, change: Change<Self>) -> pb::ServerChange {
        let (kind, server) = split(change);
        pb::ServerChange {
            sequence,
            r#type: kind as i32,
            server_id: String::from(&*server.record.id),
            server: Some(wire::server_to_pb(server.view())),
        }
    }
    fn sequence_of(change: &pb::ServerChange) -> u64 {
        change.sequence
    }
    fn response(kind: pb::WatchMessageType, epoch: String, sequence: u64) -> Self::Response {
        pb::WatchServersResponse {
            r#type: kind as i32,
            epoch,
            sequence,
            ..Default::default()
        }
    }
    fn with_items(response: &mut Self::Response, items: Vec<pb::Server>, end: bool) {
        response.servers = items;
        response.snapshot_end = end;
    }
    fn with_changes(response: &mut Self::Response, changes: Vec<pb::ServerChange>) {
        response.changes = changes;
    }
}

impl Streamed for SessionsWatched {
    type Item = pb::Session;
    type PbChange = pb::SessionChange;
    type Response = pb::WatchSessionsResponse;
    fn item(s: &Self::Snapshot) -> pb::Session {
        wire::session_to_pb(s.view())
    }
    fn change(sequence: u64, change: Change<Self>) -> pb::SessionChange {
        let (kind, session) = split(change);
        pb::SessionChange {
            sequence,
            r#type: kind as i32,
            session_id: String::from(&*session.record.id),
            session: Some(wire::session_to_pb(session.view())),
        }
    }
    fn sequence_of(change: &pb::SessionChange) -> u64 {
        change.sequence
    }
    fn response(kind: pb::WatchMessageType, epoch: String, sequence: u64) -> Self::Response {
        pb::WatchSessionsResponse {
            r#type: kind as i32,
            epoch,
            sequence,
            ..Default::default()
        }
    }
    fn with_items(response: &mut Self::Response, items: Vec<pb::Session>, end: bool) {
        response.sessions = items;
        response.snapshot_end = end;
    }
    fn with_changes(response: &mut Self::Response, changes: Vec<pb::SessionChange>) {
        response.changes = changes;
    }
}

fn split<K: Watched>(change: Change<K>) -> (pb::ChangeType, Arc<K::Snapshot>) {
    match change {
        Change::Added(s) => (pb::ChangeType::Added, s),
        Change::Modified(s) => (pb::ChangeType::Modified, s),
        Change::Removed(s) => (pb::ChangeType::Removed, s),
    }
}

/// A message stops growing once its servers pass this many bytes (one
/// server alone may make it larger: at most what one registration may
/// hold), far below gRPC clients' 4 MiB limit.
pub const MESSAGE_BYTES: usize = 1 << 20;

/// The most watchers one broker serves at once.
pub const MAX_WATCHERS: usize = 10_000;

/// The default progress interval, and its bounds.
pub const DEFAULT_PROGRESS: Duration = Duration::from_secs(10);
const PROGRESS_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(300));

/// A request's ProgressInterval, checked.
pub fn progress_interval(given: Option<prost_types::Duration>) -> Result<Duration, Status> {
    let Some(given) = given else {
        return Ok(DEFAULT_PROGRESS);
    };
    match Duration::try_from(given) {
        Ok(d) if (PROGRESS_RANGE.0..=PROGRESS_RANGE.1).contains(&d) => Ok(d),
        _ => Err(FleetError::invalid("ProgressInterval", "must be 1 second to 5 minutes").into()),
    }
}

/// A watch request's fields, checked.
#[derive(Debug)]
pub struct WatchRequest {
    /// The filters' pairs.
    pub filters: Vec<(String, String)>,
    /// The epoch and sequence to resume after.
    pub resume: Option<(String, u64)>,
    /// The progress interval.
    pub progress: Duration,
}

impl WatchRequest {
    /// Checks what WatchServers and WatchSessions requests share, and that
    /// the broker serves fewer than [`MAX_WATCHERS`].
    pub fn check(
        fleet: &crate::fleet::Fleet,
        filters: Vec<pb::KeyValuePair>,
        from_sequence: Option<u64>,
        epoch: String,
        interval: Option<prost_types::Duration>,
    ) -> Result<WatchRequest, Status> {
        crate::fleet::check_lengths(&[(
            "Filters",
            filters.len(),
            crate::fleet::query::MAX_FILTERS,
        )])?;
        let progress = progress_interval(interval)?;
        let resume = match (from_sequence, epoch.is_empty()) {
            (None, true) => None,
            (Some(seq), false) => Some((epoch, seq)),
            (Some(_), true) => {
                return Err(FleetError::invalid("Epoch", "is needed with FromSequence").into());
            }
            (None, false) => {
                return Err(FleetError::invalid("FromSequence", "is needed with Epoch").into());
            }
        };
        if fleet.watchers() >= MAX_WATCHERS {
            return Err(Status::resource_exhausted(format!(
                "this broker serves {MAX_WATCHERS} watchers already; try another replica or later"
            )));
        }
        Ok(WatchRequest {
            filters: filters.into_iter().map(|f| (f.key, f.value)).collect(),
            resume,
            progress,
        })
    }
}

/// Starts a watch `asked` for with `subscribe` (the fleet's
/// `watch_servers` or `watch_sessions`): its stream, ending when
/// `stopping` turns true.
pub fn open<K: Streamed>(
    asked: WatchRequest,
    stopping: Option<watch::Receiver<bool>>,
    subscribe: impl FnOnce(
        &[(String, String)],
        Option<(String, u64)>,
    ) -> Result<(Watcher<K>, WatchStart<K>), FleetError>,
) -> Result<WatchStream<K::Response>, Status> {
    let (watcher, start) = subscribe(&asked.filters, asked.resume)?;
    tracing::debug!(
        epoch = watcher.epoch(),
        from = watcher.cursor(),
        "watch started"
    );
    Ok(stream(watcher, start, asked.progress, stopping))
}

enum Phase<K: Streamed> {
    /// Snapshot messages left to send, and the sequence they stand at.
    Snapshot(std::vec::IntoIter<Arc<K::Snapshot>>, u64),
    /// Changes: those converted and not yet sent, and the sequence the
    /// last of them completes.
    Live(VecDeque<K::PbChange>, u64),
    Done,
}

struct State<K: Streamed> {
    watcher: Watcher<K>,
    phase: Phase<K>,
    progress: Duration,
    stopping: Option<watch::Receiver<bool>>,
}

/// The stream of `watcher`'s messages, starting as `start` says.
pub fn stream<K: Streamed>(
    watcher: Watcher<K>,
    start: WatchStart<K>,
    progress: Duration,
    stopping: Option<watch::Receiver<bool>>,
) -> WatchStream<K::Response> {
    let phase = match start {
        WatchStart::Snapshot { items } => Phase::Snapshot(items.into_iter(), watcher.cursor()),
        WatchStart::Resume => Phase::Live(VecDeque::new(), watcher.cursor()),
    };
    let state = State {
        watcher,
        phase,
        progress,
        stopping,
    };
    Box::pin(futures_util::stream::unfold(
        state,
        |mut state| async move {
            let item = state.next().await?;
            Some((item, state))
        },
    ))
}

impl<K: Streamed> State<K> {
    fn message(&self, kind: pb::WatchMessageType, sequence: u64) -> K::Response {
        K::response(kind, self.watcher.epoch().to_owned(), sequence)
    }

    async fn next(&mut self) -> Option<Result<K::Response, Status>> {
        loop {
            match &mut self.phase {
                Phase::Done => return None,
                Phase::Snapshot(servers, seq) => {
                    let seq = *seq;
                    let mut batch = Vec::new();
                    let mut bytes = 0;
                    while bytes < MESSAGE_BYTES
                        && let Some(object) = servers.next()
                    {
                        let item = K::item(&object);
                        bytes += item.encoded_len();
                        batch.push(item);
                    }
                    let end = servers.len() == 0;
                    if end {
                        self.phase = Phase::Live(VecDeque::new(), seq);
                    }
                    let mut message = self.message(pb::WatchMessageType::Snapshot, seq);
                    K::with_items(&mut message, batch, end);
                    return Some(Ok(message));
                }
                Phase::Live(pending, seq) if !pending.is_empty() => {
                    let seq = *seq;
                    let mut changes = Vec::new();
                    let mut bytes = 0;
                    while bytes < MESSAGE_BYTES
                        && let Some(change) = pending.pop_front()
                    {
                        bytes += change.encoded_len();
                        changes.push(change);
                    }
                    // A message ending before the batch does stands at its
                    // own last change.
                    let sequence = match pending.is_empty() {
                        true => seq,
                        false => changes.last().map_or(seq, K::sequence_of),
                    };
                    let mut message = self.message(pb::WatchMessageType::Changes, sequence);
                    K::with_changes(&mut message, changes);
                    return Some(Ok(message));
                }
                Phase::Live(..) => {
                    let stopping = async {
                        match &mut self.stopping {
                            Some(rx) => drop(rx.wait_for(|stopping| *stopping).await),
                            None => std::future::pending().await,
                        }
                    };
                    let next = tokio::select! {
                        () = stopping => {
                            let status = Status::unavailable(format!(
                                "the broker is shutting down; resume elsewhere (after a restart: \
                                 watch again) with FromSequence {} and Epoch {:?}",
                                self.watcher.cursor(),
                                self.watcher.epoch()
                            ));
                            self.phase = Phase::Done;
                            return Some(Err(status));
                        }
                        next = self.watcher.next(self.progress) => next,
                    };
                    match next {
                        Ok(WatchNext::Progress { seq }) => {
                            return Some(Ok(self.message(pb::WatchMessageType::Progress, seq)));
                        }
                        Ok(WatchNext::Changes { seq, changes }) => {
                            let converted = changes
                                .into_iter()
                                .map(|(seq, change)| K::change(seq, change))
                                .collect();
                            self.phase = Phase::Live(converted, seq);
                        }
                        Err(e @ WatchError::TooSlow { .. }) => {
                            crate::metrics::COUNTERS.watchers_too_slow.inc();
                            self.phase = Phase::Done;
                            return Some(Err(Status::resource_exhausted(e.to_string())));
                        }
                        Err(e @ WatchError::Expired { .. }) => {
                            self.phase = Phase::Done;
                            return Some(Err(Status::out_of_range(e.to_string())));
                        }
                    }
                }
            }
        }
    }
}
