//! WatchServers' reply stream: the snapshot in messages of about
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
        watch::{ServerChange, ServerSnapshot, ServerWatcher, WatchError, WatchNext, WatchStart},
    },
    pb, wire,
};

/// The stream's type.
pub type WatchServersStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchServersResponse, Status>> + Send + 'static>>;

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

enum Phase {
    /// Snapshot messages left to send, and the sequence they stand at.
    Snapshot(std::vec::IntoIter<Arc<ServerSnapshot>>, u64),
    /// Changes: those converted and not yet sent, and the sequence the
    /// last of them completes.
    Live(VecDeque<pb::ServerChange>, u64),
    Done,
}

struct State {
    watcher: ServerWatcher,
    phase: Phase,
    progress: Duration,
    stopping: Option<watch::Receiver<bool>>,
}

/// The stream of `watcher`'s messages, starting as `start` says.
pub fn stream(
    watcher: ServerWatcher,
    start: WatchStart,
    progress: Duration,
    stopping: Option<watch::Receiver<bool>>,
) -> WatchServersStream {
    let phase = match start {
        WatchStart::Snapshot { servers } => Phase::Snapshot(servers.into_iter(), watcher.cursor()),
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

impl State {
    fn message(&self, kind: pb::WatchMessageType, sequence: u64) -> pb::WatchServersResponse {
        pb::WatchServersResponse {
            r#type: kind as i32,
            epoch: self.watcher.epoch().to_owned(),
            sequence,
            ..Default::default()
        }
    }

    async fn next(&mut self) -> Option<Result<pb::WatchServersResponse, Status>> {
        loop {
            match &mut self.phase {
                Phase::Done => return None,
                Phase::Snapshot(servers, seq) => {
                    let seq = *seq;
                    let mut batch = Vec::new();
                    let mut bytes = 0;
                    while bytes < MESSAGE_BYTES
                        && let Some(server) = servers.next()
                    {
                        let server = wire::server_to_pb(server.view());
                        bytes += server.encoded_len();
                        batch.push(server);
                    }
                    let end = servers.len() == 0;
                    if end {
                        self.phase = Phase::Live(VecDeque::new(), seq);
                    }
                    let mut message = self.message(pb::WatchMessageType::Snapshot, seq);
                    message.servers = batch;
                    message.snapshot_end = end;
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
                        false => changes.last().map_or(seq, |c| c.sequence),
                    };
                    let mut message = self.message(pb::WatchMessageType::Changes, sequence);
                    message.changes = changes;
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
                            let converted = changes.into_iter().map(change_to_pb).collect();
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

fn change_to_pb((sequence, change): (u64, ServerChange)) -> pb::ServerChange {
    let (kind, server) = match change {
        ServerChange::Added(s) => (pb::ChangeType::Added, s),
        ServerChange::Modified(s) => (pb::ChangeType::Modified, s),
        ServerChange::Removed(s) => (pb::ChangeType::Removed, s),
    };
    pb::ServerChange {
        sequence,
        r#type: kind as i32,
        server_id: String::from(&*server.record.id),
        server: Some(wire::server_to_pb(server.view())),
    }
}
