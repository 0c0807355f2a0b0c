//! The durable store: the broker's servers, holds and sessions in one
//! SQLite file, `DIR/broker.sqlite3`.
//!
//! Why SQLite:
//! - **Well kept.** It is one of the most thoroughly tested libraries
//!   there is (100% branch coverage, fuzzed continuously) and one of the
//!   most widely deployed; its file format is stable and its authors
//!   commit to supporting it through 2050.
//! - **Crash-safe.** A commit counts only once it is in the journal and
//!   fsynced (`synchronous=FULL`); after a crash or a power cut, the next
//!   open keeps every finished commit and discards a torn one.
//! - **One file, no service.** The library is compiled into the broker:
//!   nothing to install, run, secure or upgrade beside it. The store is a
//!   single file an operator can copy, back up, and inspect with the
//!   `sqlite3` shell.
//! - **Atomic batches.** Each submission is applied inside a transaction,
//!   so after a crash it is there entirely or not at all.
//! - **Group commit.** In write-ahead-log (WAL) mode a commit is one
//!   sequential append and one fsync, and a single writer thread puts
//!   every submission that arrived while the previous commit was syncing
//!   into the next transaction: under load, durability costs one fsync per
//!   group, not one per operation.
//!
//! How it runs. [`SqliteStore::open`] creates a new store file its owner's
//! alone (0600) before SQLite opens it, refuses a directory or store others
//! may write, and makes one they may read private (see `private.rs`). It
//! checks the file before it writes anything: that it is a SQLite database
//! made by dcv-broker (an empty file it did not just create is not), that
//! it passes `PRAGMA quick_check`, that its schema is not newer than this
//! build's, and that no other broker is using it (the store holds
//! SQLite's exclusive lock for as long as the process runs, so two brokers
//! can never interleave writes). On any failure the file's contents are
//! left as they were (a file the open created is removed again) and the
//! error says, in one sentence, which file and what to do. Only
//! then does it switch to WAL with `synchronous=FULL`, run the schema
//! migrations this build knows ([`MIGRATIONS`]), and load everything into
//! a [`Snapshot`].
//!
//! After that, one dedicated thread owns the connection. A submission is
//! queued without blocking (the fleet submits under its write lock); the
//! thread takes everything queued, applies it in order inside one
//! transaction, commits, and resolves every submission's [`Durable`]. If a
//! write fails, the store stops: that group and every later submission
//! fail, and [`SqliteStore::failed`] tells the server to stop serving,
//! since its memory would no longer match what a restart would load.
//!
//! [`postgres`] is the second implementation of the same trait, for a
//! database shared by brokers (`--database-url`); it reuses this module's
//! column encodings ([`codec`]).

pub mod audit;
mod backup;
mod codec;
mod load;
mod open;
pub mod postgres;
mod private;
mod writer;

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
};

use parking_lot::Mutex;
use tokio::sync::{oneshot, watch};

use crate::fleet::persist::{AuditFilter, AuditPage, AuditRead, Change, Durable, Snapshot, Store};

pub use backup::{BackupCopy, BackupError};
pub use open::{MIGRATIONS, SCHEMA_VERSION};
pub use postgres::{PostgresOpenError, PostgresStore};

/// The store's file name inside its directory.
pub const FILE_NAME: &str = "broker.sqlite3";

/// Why a store could not be opened. Each message is one sentence naming
/// the file (or directory) and, where there is one, the remedy. The store
/// is left exactly as it was.
#[derive(Debug, thiserror::Error)]
pub enum StoreOpenError {
    /// The directory could not be created or the file not opened.
    #[error("cannot open the store at {}: {source}", path.display())]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file is not a SQLite database, or is another program's.
    #[error("{} is not a dcv-broker store ({reason})", path.display())]
    NotAStore {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        reason: String,
    },
    /// The file is a damaged store: SQLite's integrity check failed, or a
    /// row does not decode.
    #[error(
        "{} is damaged ({detail}); restore it from a backup, or move it aside to start with an empty store",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the row when a row is.
        detail: String,
    },
    /// A newer broker wrote the store.
    #[error(
        "{} has schema version {found}, newer than this broker's {supported}; run a newer dcv-broker",
        path.display()
    )]
    NewerSchema {
        /// The file.
        path: PathBuf,
        /// The store's schema version.
        found: i64,
        /// The newest this build knows.
        supported: i64,
    },
    /// Another broker holds the store.
    #[error(
        "{} is in use by another dcv-broker; a store serves one broker at a time",
        path.display()
    )]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// The process may not write the directory or the file.
    #[error(
        "{} is not writable by this process ({detail}); the broker needs write access to the store's directory and file",
        path.display()
    )]
    ReadOnly {
        /// The directory or file.
        path: PathBuf,
        /// What was refused.
        detail: String,
    },
    /// Other users may write the data directory or a store file, or may
    /// read a store file that this process cannot make private.
    #[error("{} {detail}", path.display())]
    NotPrivate {
        /// The directory or file.
        path: PathBuf,
        /// Who may do what, and the remedy.
        detail: String,
    },
    /// Any other SQLite failure.
    #[error("cannot open the store {}: {source}", path.display())]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
}

/// The store failed to write; nothing submitted since is kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the store failed: {0}")]
pub struct StoreFailed(pub String);

/// One submission on its way to the writer thread.
type Submission = (Vec<Change>, oneshot::Sender<Result<(), String>>);

/// What the writer thread is asked to do, in the order asked.
enum Job {
    /// Commit these changes.
    Changes(Submission),
    /// Copy the store into a new file (see `backup.rs`).
    Backup(backup::Job),
    /// Read audit records (see `audit.rs`), once what was submitted
    /// before is committed.
    ReadAudit(AuditReadJob),
}

/// A read of audit records and where its answer goes.
type AuditReadJob = (AuditFilter, oneshot::Sender<Result<AuditPage, String>>);

/// What the handles and the writer thread share.
#[derive(Debug)]
struct Shared {
    /// `Some(why)` once a write failed.
    failed: watch::Sender<Option<String>>,
    /// Transactions committed by the writer thread.
    commits: AtomicU64,
}

/// The durable SQLite store. A cheap handle: clones share one writer
/// thread, which stops (after committing everything queued) when the last
/// handle is dropped or [`SqliteStore::close`] is called.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// `None` once closed.
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
    shared: Arc<Shared>,
    /// Whether a backup is running (one at a time: they share a file).
    backing_up: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("failed", &*self.inner.shared.failed.borrow())
            .field("commits", &self.commits())
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if need be) the store in `dir`, checks it, brings
    /// its schema up to date, and returns it with everything it holds.
    ///
    /// Blocking: it reads the whole store (call it before serving, or
    /// from `spawn_blocking`).
    pub fn open(dir: &Path) -> Result<(SqliteStore, Snapshot), StoreOpenError> {
        let path = dir.join(FILE_NAME);
        let (connection, snapshot) = open::open(dir, &path)?;
        let (queue, submissions) = mpsc::channel();
        let (failed, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            failed,
            commits: AtomicU64::new(0),
        });
        let writer = thread::Builder::new()
            .name("dcv-broker-store".into())
            .spawn({
                let shared = shared.clone();
                move || writer::run(connection, submissions, &shared)
            })
            .map_err(|source| StoreOpenError::Io {
                path: path.clone(),
                source,
            })?;
        let store = SqliteStore {
            inner: Arc::new(Inner {
                path,
                queue: Mutex::new(Some(queue)),
                writer: Mutex::new(Some(writer)),
                shared,
                backing_up: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        Ok((store, snapshot))
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// `None` while healthy; the reason once a write failed, after which
    /// nothing more is stored and the broker should stop serving.
    pub fn failed(&self) -> watch::Receiver<Option<String>> {
        self.inner.shared.failed.subscribe()
    }

    /// How many transactions the writer has committed since the store was
    /// opened (each holds one or more submissions).
    pub fn commits(&self) -> u64 {
        self.inner.shared.commits.load(Ordering::Relaxed)
    }

    /// Stops taking submissions (later ones, from any clone, fail), waits
    /// until everything already submitted is committed, and stops the
    /// writer thread. Blocks for that last commit.
    pub fn close(self) -> Result<(), StoreFailed> {
        self.inner.shut_down();
        match &*self.inner.shared.failed.borrow() {
            Some(why) => Err(StoreFailed(why.clone())),
            None => Ok(()),
        }
    }
}

impl Inner {
    fn shut_down(&self) {
        // Dropping the only sender ends the writer's loop once the queue
        // is drained.
        drop(self.queue.lock().take());
        let writer = self.writer.lock().take();
        if let Some(writer) = writer
            && writer.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "the store's writer thread panicked");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shut_down();
    }
}

impl Store for SqliteStore {
    fn submit(&self, changes: Vec<Change>) -> Durable {
        if changes.is_empty() {
            return Durable::done();
        }
        let (answer, durable) = oneshot::channel();
        if let Some(why) = &*self.inner.shared.failed.borrow() {
            let _ = answer.send(Err(why.clone()));
            return Durable::pending(durable);
        }
        let queue = self.inner.queue.lock();
        let Some(queue) = queue.as_ref() else {
            let _ = answer.send(Err("the store is closed".into()));
            return Durable::pending(durable);
        };
        // A send fails only if the writer thread is gone, which drops the
        // answer and so fails the Durable too.
        let _ = queue.send(Job::Changes((changes, answer)));
        Durable::pending(durable)
    }

    fn read_audit(&self, filter: AuditFilter) -> Option<AuditRead> {
        let (answer, read) = oneshot::channel();
        if let Some(queue) = self.inner.queue.lock().as_ref() {
            // A send fails only if the writer thread is gone, which drops
            // the answer and so fails the read too.
            let _ = queue.send(Job::ReadAudit((filter, answer)));
        }
        Some(Box::pin(async move {
            read.await
                .unwrap_or_else(|_| Err("the store is closed".into()))
        }))
    }
}
