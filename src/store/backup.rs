//! Online backups of a running store (`dcv-broker backup`), with SQLite's
//! backup API.
//!
//! Where it runs. The store's connection holds SQLite's exclusive lock for
//! as long as the broker runs (no other connection may even read the
//! file), so the copy is made from that connection, on the writer thread:
//! it copies [`PAGES_PER_STEP`] pages, then commits whatever was submitted
//! meanwhile, then copies the next pages, until done. A write waits at
//! most one step, never for the whole backup. SQLite carries a commit made
//! through the connection being copied into the pages already copied, so
//! the copy is the store as it stands when the last step completes: every
//! change acknowledged before the backup was asked for is in it, and so is
//! every change committed while it ran.
//!
//! The copy goes to a file of its own beside the store, its owner's alone
//! from the start (it holds client secrets' hashes and the token-signing
//! key), written without a journal or fsync of its own (a broken copy is
//! thrown away, never used), then made a plain rollback-journal database
//! (no write-ahead log to go with it) and checked with `quick_check`. The
//! caller gets it open and already unlinked, so nothing is left behind
//! whatever becomes of the caller.

use std::{
    fs,
    os::raw::c_int,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use rusqlite::{
    Connection, OpenFlags,
    backup::{Backup, StepResult},
};
use tokio::sync::oneshot;

use super::{Job as WriterJob, Shared, SqliteStore};

/// Pages copied per step (1 MiB at SQLite's default 4 KiB page): well under a
/// millisecond of copying from the page cache, the longest a write waits
/// for the backup.
pub(super) const PAGES_PER_STEP: c_int = 256;

/// How long the writer waits for a submission between two steps before it
/// copies on: it leaves the disk to the broker's own commits for a moment.
const PAUSE: Duration = Duration::from_millis(1);

/// The copy in progress, beside the store. One name: one backup at a time,
/// and a copy left by a broker killed during a backup is replaced by the
/// next.
const PARTIAL_SUFFIX: &str = ".backup-partial";

/// Why a backup failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Another backup is running.
    #[error("a backup of this broker's store is already running; try again when it is done")]
    Busy,
    /// The copy could not be made, or did not check out.
    #[error("the backup failed: {0}")]
    Failed(String),
}

/// A finished backup: a complete store, open for reading from its start,
/// and no longer in any directory.
#[derive(Debug)]
pub struct BackupCopy {
    /// The copy.
    pub file: fs::File,
    /// Its length.
    pub bytes: u64,
}

/// A backup request to the writer thread: copy the store into
/// `destination`, `pages_per_step` pages at a time, and hand the
/// connection back.
pub(super) struct Job {
    destination: Connection,
    pages_per_step: c_int,
    answer: oneshot::Sender<Result<Connection, String>>,
}

/// Whether the writer thread carries on after a backup.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum After {
    /// It does.
    Continue,
    /// Every handle is gone: the store is closing.
    Stop,
}

impl Job {
    /// Answers the job without running it.
    pub(super) fn refuse(self, why: String) {
        let _ = self.answer.send(Err(why));
    }
}

/// Runs `job` on the writer thread; `between_steps` runs after each step
/// (the writer commits what was submitted meanwhile, waiting up to the
/// pause it is given for a submission) and says whether to go on.
pub(super) fn run(
    source: &Connection,
    job: Job,
    shared: &Shared,
    mut between_steps: impl FnMut(Duration) -> After,
) -> After {
    let Job {
        mut destination,
        pages_per_step,
        answer,
    } = job;
    let (copied, after) = copy(
        source,
        &mut destination,
        pages_per_step,
        shared,
        &mut between_steps,
    );
    // The caller may have stopped waiting; the copy is then removed.
    let _ = answer.send(copied.map(|()| destination));
    after
}

fn copy(
    source: &Connection,
    destination: &mut Connection,
    pages_per_step: c_int,
    shared: &Shared,
    between_steps: &mut impl FnMut(Duration) -> After,
) -> (Result<(), String>, After) {
    let backup = match Backup::new(source, destination) {
        Ok(backup) => backup,
        Err(e) => return (Err(e.to_string()), After::Continue),
    };
    loop {
        if let Some(why) = shared.failed.borrow().clone() {
            return (Err(format!("the store failed: {why}")), After::Continue);
        }
        match backup.step(pages_per_step) {
            Ok(StepResult::Done) => return (Ok(()), After::Continue),
            // More, or Busy and Locked, which cannot come from a store
            // this connection locks exclusively (were they to, the next
            // step retries).
            Ok(_) => {}
            Err(e) => return (Err(e.to_string()), After::Continue),
        }
        if between_steps(PAUSE) == After::Stop {
            return (Err("the broker is stopping".into()), After::Stop);
        }
    }
}

impl SqliteStore {
    /// Copies the store, while it keeps serving, into a complete store
    /// file a broker can start from (see the module's documentation).
    pub async fn back_up(&self) -> Result<BackupCopy, BackupError> {
        self.back_up_in_steps(PAGES_PER_STEP).await
    }

    pub(super) async fn back_up_in_steps(
        &self,
        pages_per_step: c_int,
    ) -> Result<BackupCopy, BackupError> {
        if self.inner.backing_up.swap(true, Ordering::AcqRel) {
            return Err(BackupError::Busy);
        }
        let _running = Running(self);
        let partial = partial_path(self.path());
        let started = Instant::now();
        let result = self.copy_to(&partial, pages_per_step).await;
        // Whatever happened, the name is gone: on success the caller holds
        // the file open.
        let _ = fs::remove_file(&partial);
        match &result {
            Ok(copy) => tracing::info!(
                bytes = copy.bytes,
                elapsed = ?started.elapsed(),
                "store backed up"
            ),
            Err(e) => tracing::warn!(error = %e, "store backup failed"),
        }
        result
    }

    async fn copy_to(
        &self,
        partial: &Path,
        pages_per_step: c_int,
    ) -> Result<BackupCopy, BackupError> {
        let failed = |e: String| BackupError::Failed(e);
        let path = partial.to_path_buf();
        let destination = blocking(move || create(&path)).await?;
        let (answer, copied) = oneshot::channel();
        {
            let queue = self.inner.queue.lock();
            let queue = queue
                .as_ref()
                .ok_or_else(|| failed("the store is closed".into()))?;
            queue
                .send(WriterJob::Backup(Job {
                    destination,
                    pages_per_step,
                    answer,
                }))
                .map_err(|_| failed("the store is closed".into()))?;
        }
        let destination = copied
            .await
            .map_err(|_| failed("the store's writer stopped".into()))?
            .map_err(failed)?;
        let path = partial.to_path_buf();
        blocking(move || finish(destination, &path)).await
    }
}

/// Clears the store's "backing up" flag when the backup ends, however.
struct Running<'a>(&'a SqliteStore);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.inner.backing_up.store(false, Ordering::Release);
    }
}

/// Where the copy is made: beside the store, hidden.
fn partial_path(store: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(store.file_name().unwrap_or_default());
    name.push(PARTIAL_SUFFIX);
    store.with_file_name(name)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, BackupError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| BackupError::Failed(e.to_string()))?
        .map_err(BackupError::Failed)
}

/// Creates the copy's file, its owner's alone from the first moment, and
/// opens it for SQLite without a journal: a copy that breaks is discarded.
fn create(path: &Path) -> Result<Connection, String> {
    // Left by a broker killed during a backup: this store's lock means no
    // other process is writing it.
    let _ = fs::remove_file(path);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let sqlite = |e: rusqlite::Error| format!("{}: {e}", path.display());
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite)?;
    connection
        .execute_batch("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;")
        .map_err(sqlite)?;
    Ok(connection)
}

/// Makes the copy a plain database file (rollback journal, so no
/// write-ahead log has to travel with it; the broker that starts from it
/// switches it back), checks it, and opens it for the caller.
fn finish(destination: Connection, path: &Path) -> Result<BackupCopy, String> {
    let sqlite = |e: rusqlite::Error| format!("{}: {e}", path.display());
    let mode: String = destination
        .query_row("PRAGMA journal_mode = DELETE", [], |row| row.get(0))
        .map_err(sqlite)?;
    if !mode.eq_ignore_ascii_case("delete") {
        return Err(format!(
            "the copy stayed in journal mode {mode}, not a self-contained file"
        ));
    }
    let mut problems = Vec::new();
    destination
        .pragma(None, "quick_check", 10, |row| {
            problems.push(row.get::<_, String>(0)?);
            Ok(())
        })
        .map_err(sqlite)?;
    if problems != ["ok"] {
        return Err(format!(
            "the copy does not pass SQLite's quick_check: {}",
            problems.join("; ")
        ));
    }
    destination.close().map_err(|(_, e)| sqlite(e))?;
    let file = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bytes = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    Ok(BackupCopy { file, bytes })
}

#[cfg(test)]
mod tests {
    use std::{io::Read as _, time::SystemTime};

    use super::*;
    use crate::fleet::persist::{Change, Store as _, StoredClient};

    fn client(n: usize) -> Change {
        Change::PutClient(StoredClient {
            id: format!("client-{n}"),
            name: "x".repeat(2000),
            secret_hash: "hash".into(),
            scopes: vec!["read".into()],
            server_id: None,
            created_at: SystemTime::UNIX_EPOCH,
            revoked_at: None,
        })
    }

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dcv-backup-{}", uuid::Uuid::new_v4()));
        fs::DirBuilder::new().create(&dir).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        }
        dir
    }

    /// A backup one page per step, with writes committed between its
    /// steps: the copy opens as a store holding every write acknowledged
    /// before it finished, and nothing is left beside the store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backup_taken_under_writes_is_a_complete_store() {
        let dir = temp_dir();
        let (store, _) = SqliteStore::open(&dir).unwrap();
        for n in 0..200 {
            store.submit(vec![client(n)]).wait().await.unwrap();
        }
        let writing = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for n in 200..2000 {
                    if store.submit(vec![client(n)]).wait().await.is_err() {
                        break;
                    }
                    acknowledged.push((n, Instant::now()));
                }
                acknowledged
            })
        };
        let commits_before = store.commits();
        let began = Instant::now();
        let copy = store.back_up_in_steps(1).await.unwrap();
        let acknowledged = writing.await.unwrap();
        assert!(
            store.commits() > commits_before + 1,
            "writes were committed while the backup ran"
        );
        assert!(
            !partial_path(store.path()).exists(),
            "the partial copy's name is removed"
        );
        store.close().unwrap();

        let restored = temp_dir();
        let mut bytes = Vec::new();
        (&copy.file).read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, copy.bytes);
        assert_eq!(&bytes[..16], b"SQLite format 3\0");
        assert_eq!(
            (bytes[18], bytes[19]),
            (1, 1),
            "a rollback-journal file, no write-ahead log"
        );
        let path = restored.join(crate::store::FILE_NAME);
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        std::io::Write::write_all(&mut options.open(&path).unwrap(), &bytes).unwrap();
        let (reopened, snapshot) = SqliteStore::open(&restored).unwrap();
        let ids: std::collections::HashSet<_> =
            snapshot.clients.iter().map(|c| c.id.clone()).collect();
        let before: Vec<usize> = acknowledged
            .iter()
            .filter(|(_, at)| *at < began)
            .map(|(n, _)| *n)
            .collect();
        for n in (0..200).chain(before) {
            assert!(
                ids.contains(&format!("client-{n}")),
                "client-{n} is missing"
            );
        }
        // The writes were sequential: a consistent copy holds a prefix of
        // them, never one without those acknowledged before it.
        let held = (200..2000)
            .take_while(|n| ids.contains(&format!("client-{n}")))
            .count();
        assert_eq!(ids.len(), 200 + held, "the copy is a prefix of the writes");
        reopened.close().unwrap();
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&restored);
    }

    #[tokio::test]
    async fn one_backup_at_a_time() {
        let dir = temp_dir();
        let (store, _) = SqliteStore::open(&dir).unwrap();
        store.inner.backing_up.store(true, Ordering::Release);
        assert!(matches!(store.back_up().await, Err(BackupError::Busy)));
        store.inner.backing_up.store(false, Ordering::Release);
        assert!(store.back_up().await.is_ok());
        store.close().unwrap();
        let _ = fs::remove_dir_all(&dir);
    }
}
