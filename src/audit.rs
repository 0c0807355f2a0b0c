//! The audit log's sinks: one JSON line per state-changing call, to a file
//! or to stdout (`--audit-log`), written by a thread of its own so that no
//! request ever waits for the disk; and the periodic pruning of the
//! records the store keeps (`--audit-retention`).
//!
//! The store is the audit log of record: the API adapters submit each
//! record through the fleet ([`crate::fleet::Fleet::record_audit`]) to the
//! same writer and group commit as the changes, and wait for it before
//! answering. [`AuditedStore`] wraps that store and copies every record it
//! is handed to the JSON-lines sink on the way: one submission path, so a
//! record reaches the file exactly when it reaches the store.
//!
//! The file is a copy for operators' log shippers, not a second ledger: a
//! full queue ([`QUEUE`] records behind, a stalled disk or a blocked
//! stdout) drops lines from it rather than hold requests. Drops are
//! counted, logged at WARN once per episode, and written into the file
//! itself (`{"dropped": N, ...}`) as soon as the writer catches up; the
//! records stay in the store either way.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    time::{Duration, SystemTime},
};

use serde_json::{Value, json};

use crate::fleet::{
    Fleet,
    persist::{AuditFilter, AuditRead, AuditRecord, Change, Durable, Store},
};

/// How many records may wait for the sink's writer before lines are
/// dropped from the file: seconds of a busy broker's writes, a few MB.
pub const QUEUE: usize = 4096;

/// How long records are kept in the store by default (`--audit-retention`).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);

/// How often the leader prunes records past the retention. With at most
/// `store::audit::PRUNE_BATCH` (10,000) records a pass, pruning keeps up
/// with over 14 million records a day; a pass with nothing to prune is one
/// look at the time index.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Where the JSON lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Standard output (`-`), shared with the broker's "listening" line.
    Stdout,
    /// A file, appended to; created 0600.
    File(PathBuf),
}

impl Destination {
    /// `-` for stdout, anything else a file path.
    pub fn parse(text: &str) -> Destination {
        if text == "-" {
            Destination::Stdout
        } else {
            Destination::File(PathBuf::from(text))
        }
    }
}

/// The JSON-lines sink: a cheap handle to the writer thread's queue.
#[derive(Debug, Clone)]
pub struct AuditLog {
    queue: SyncSender<AuditRecord>,
    dropped: Arc<AtomicU64>,
}

impl AuditLog {
    /// Opens `destination` and starts its writer thread. A file is created
    /// with mode 0600 (never readable by others, not even for a moment);
    /// an existing one others may read is made private, and said so.
    pub fn open(destination: &Destination) -> io::Result<AuditLog> {
        let out: Box<dyn Write + Send> = match destination {
            Destination::Stdout => Box::new(io::stdout()),
            Destination::File(path) => Box::new(open_private(path)?),
        };
        let (queue, records) = mpsc::sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        std::thread::Builder::new()
            .name("dcv-broker-audit".into())
            .spawn({
                let dropped = dropped.clone();
                move || write_lines(records, BufWriter::new(out), &dropped)
            })?;
        Ok(AuditLog { queue, dropped })
    }

    /// Queues `record` for the sink without waiting; a full queue drops
    /// it from the file (counted, and the first of a run logged).
    pub fn send(&self, record: AuditRecord) {
        match self.queue.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        queue = QUEUE,
                        "the audit log's sink is behind: dropping lines from it (the store keeps \
                         every record; the count is written to the sink when it catches up)"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// How many lines have been dropped and not yet reported in the sink.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Creates (0600) or opens `path` for appending; an existing file others
/// may read or write is made private first.
fn open_private(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = file.metadata()?.permissions().mode();
        if mode & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "the audit log was readable by others; it is now 0600"
            );
        }
    }
    Ok(file)
}

/// The writer thread: one line per record, flushed whenever the queue is
/// empty (so a quiet broker's file is current), until every handle is gone.
fn write_lines(records: Receiver<AuditRecord>, mut out: impl Write, dropped: &AtomicU64) {
    let mut failing = false;
    while let Ok(first) = records.recv() {
        let mut next = Some(first);
        let mut result = Ok(());
        while let Some(record) = next {
            result = result.and_then(|()| writeln!(out, "{}", line(&record)));
            next = records.try_recv().ok();
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            tracing::warn!(dropped = lost, "audit log lines were dropped from the sink");
            let note = json!({"time": rfc3339(SystemTime::now()), "dropped": lost});
            result = result.and_then(|()| writeln!(out, "{note}"));
        }
        match result.and_then(|()| out.flush()) {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, "the audit log's sink cannot be written (the store keeps every record)");
            }
            Err(_) => {}
        }
    }
}

/// A record as its JSON line: `time`, `actor`, `request_id`, `method`,
/// `peer` (when known) and `items` (`id`, `outcome`, `reason`).
pub fn line(record: &AuditRecord) -> Value {
    let items: Vec<Value> = record
        .items
        .iter()
        .map(|i| json!({"id": i.id, "outcome": i.outcome, "reason": i.reason}))
        .collect();
    let mut line = json!({
        "time": rfc3339(record.at),
        "actor": record.actor,
        "request_id": record.request_id,
        "method": record.method,
    });
    if let Some(peer) = &record.peer {
        line["peer"] = Value::from(peer.as_str());
    }
    line["items"] = Value::Array(items);
    line
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// A store that also copies every audit record to an [`AuditLog`]; wants
/// audit records even when the store itself keeps nothing (`--in-memory`).
#[derive(Debug)]
pub struct AuditedStore {
    inner: Arc<dyn Store>,
    log: AuditLog,
}

impl AuditedStore {
    /// `inner`, with its audit records copied to `log`.
    pub fn new(inner: Arc<dyn Store>, log: AuditLog) -> AuditedStore {
        AuditedStore { inner, log }
    }

    /// `store` wrapped when there is a log, else `store` itself.
    pub fn wrap(store: Arc<dyn Store>, log: Option<&AuditLog>) -> Arc<dyn Store> {
        match log {
            Some(log) => Arc::new(AuditedStore::new(store, log.clone())),
            None => store,
        }
    }
}

impl Store for AuditedStore {
    fn submit(&self, changes: Vec<Change>) -> Durable {
        for change in &changes {
            if let Change::PutAudit(record) = change {
                self.log.send(record.clone());
            }
        }
        self.inner.submit(changes)
    }

    fn keeps_changes(&self) -> bool {
        self.inner.keeps_changes()
    }

    fn keeps_liveness(&self) -> bool {
        self.inner.keeps_liveness()
    }

    fn keeps_audit(&self) -> bool {
        true
    }

    fn read_audit(&self, filter: AuditFilter) -> Option<AuditRead> {
        // The JSON-lines copy is for shippers; the store answers.
        self.inner.read_audit(filter)
    }
}

/// Keeps only the audit log of the store it wraps: a demo fleet's servers,
/// holds and sessions live in memory and are gone with the process, while
/// the history of what was done to them stays readable.
#[derive(Debug)]
pub struct AuditOnly(Arc<dyn Store>);

impl AuditOnly {
    /// `inner`'s audit log, and nothing else of the fleet's.
    pub fn new(inner: Arc<dyn Store>) -> AuditOnly {
        AuditOnly(inner)
    }
}

impl Store for AuditOnly {
    fn submit(&self, changes: Vec<Change>) -> Durable {
        let kept: Vec<Change> = changes
            .into_iter()
            .filter(|c| matches!(c, Change::PutAudit(_) | Change::PruneAudit { .. }))
            .collect();
        self.0.submit(kept)
    }

    fn keeps_changes(&self) -> bool {
        false
    }

    fn keeps_audit(&self) -> bool {
        true
    }

    fn read_audit(&self, filter: AuditFilter) -> Option<AuditRead> {
        self.0.read_audit(filter)
    }
}

/// Prunes the store's audit records older than `retention` every `every`
/// (the first time at once), on whichever replica writes; runs until
/// aborted.
pub async fn prune_periodically(fleet: Fleet, retention: Duration, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(before) = SystemTime::now().checked_sub(retention) else {
            continue;
        };
        if let Err(e) = fleet.prune_audit(before).wait().await {
            tracing::warn!(error = %e, "pruning the audit log failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::persist::AuditItem;

    fn record(id: &str) -> AuditRecord {
        AuditRecord {
            at: std::time::UNIX_EPOCH,
            actor: "a".into(),
            request_id: id.into(),
            method: "CloseServers".into(),
            peer: None,
            items: vec![AuditItem {
                id: "s1".into(),
                outcome: AuditItem::OK.into(),
                reason: String::new(),
            }],
        }
    }

    /// A full queue never blocks the sender: the record is counted as
    /// dropped, and the writer reports the count in the sink once it
    /// catches up.
    #[test]
    fn a_full_queue_drops_counts_and_reports() {
        let (queue, records) = mpsc::sync_channel(1);
        let log = AuditLog {
            queue,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        log.send(record("kept"));
        log.send(record("dropped"));
        log.send(record("dropped too"));
        assert_eq!(log.dropped(), 2);
        let dropped = log.dropped.clone();
        drop(log);
        let mut out = Vec::new();
        write_lines(records, &mut out, &dropped);
        let lines: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["request_id"], "kept");
        assert_eq!(lines[0]["time"], "1970-01-01T00:00:00.000000Z");
        assert!(lines[0].get("peer").is_none());
        assert_eq!(lines[1]["dropped"], 2);
        assert_eq!(dropped.load(Ordering::Relaxed), 0);
    }
}
