//! The shared store: the broker's servers, holds, sessions, clients and
//! secrets in a PostgreSQL database (`--database-url postgres://...`),
//! which several brokers (replicas) share: one leads and writes, the
//! others follow its change log.
//!
//! Why PostgreSQL: operators who run several brokers already run it
//! (managed or self-hosted), back it up and monitor it; a commit is
//! durable once its write-ahead log record is flushed (every connection
//! sets `synchronous_commit = on`, whatever the server's default), and DDL
//! is transactional, so a migration is all or nothing.
//!
//! Why `tokio-postgres` and no pool (rather than `sqlx`, or
//! `deadpool-postgres` on top): each task owns exactly one connection (the
//! writer, the lease, the tail, and the control connection for elections
//! and snapshots), because submissions must be committed in the order the
//! fleet made them and a group commit needs one connection that owns the
//! transaction; a pool would add a crate for no concurrency we use.
//! `tokio-postgres` is small, async on the tokio the broker already runs,
//! has explicit prepared statements and transactions, LISTEN/NOTIFY
//! through `Connection::poll_message`, and no compile-time database access
//! or macros.
//!
//! How it runs. [`Database::connect`] connects, runs the versioned
//! migrations ([`MIGRATIONS`]) in one transaction holding an advisory lock
//! (replicas starting together migrate once; a newer schema is refused),
//! and inserts-if-absent the secrets every replica must share (the page-
//! and connection-token keys, the token-signing key, [`FORWARDING_KEY`]).
//! Then, per replica role:
//! - [`Database::elect`] takes or renews the lease (`dcv_broker_leader`,
//!   judged by the database's clock; a takeover raises the epoch), or says
//!   who leads. The leader keeps it with [`Database::hold_lease`], which
//!   reports the lease lost when another replica took it or when no
//!   renewal succeeded for a whole lease on its own clock (see `lease`).
//! - The leader writes through [`Database::start_writer`]'s
//!   [`PostgresStore`]: [`Store::submit`] queues without blocking; one
//!   task commits what is queued as a group in one transaction that first
//!   passes the epoch fence, then logs the group as one change-log row
//!   (`dcv_broker_changes`), notifies, commits, publishes the sequence
//!   number to the [`ClusterView`], and only then resolves the
//!   [`Durable`]s. A fenced or failed group fails, as does everything after
//!   it ([`PostgresStore::failed`]); a COMMIT whose answer is lost is
//!   reported failed, so nothing is acknowledged that is not known to be
//!   committed. The leader prunes log rows older than ten minutes.
//! - A follower loads [`Database::snapshot`] (everything and the log's
//!   sequence number, in one `REPEATABLE READ` transaction) and then
//!   follows [`Database::tail`], which turns log rows into [`Batch`]es of
//!   full records, woken by NOTIFY and polling; a pruned log is a
//!   [`TailError::Gap`] (reload), a lost connection [`TailError::Lost`].
//!
//! A broken connection is remade by calling again: the control connection
//! when a call finds it closed, the lease's at its next renewal; a writer
//! or a tail that lost its connection is done, and the caller starts
//! another after reloading.
//!
//! [`PostgresStore::open`] is the single-broker path from before several
//! brokers shared a database: it takes the lease whoever holds it, loads
//! and starts a writer, without renewing; `main` uses it until the cluster
//! controller replaces it.
//!
//! The connection is plain TCP or a Unix socket (no TLS yet): run the
//! database on the broker's host or a trusted network. The URL's password
//! is never logged nor put into an error: errors ([`PostgresError`]) name
//! the database by [`Database::target`] (`host:port/dbname`).
//!
//! Not here: the controller that turns elections, lease loss and the tail
//! into roles, reloads and applied batches (`crate::cluster`); TLS to the
//! database; a prune age other than ten minutes; `dcv-broker clients` on a
//! stopped broker knows only the SQLite store.

mod lease;
mod load;
mod schema;
mod tail;
mod writer;

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::{Client, Config, NoTls};

use crate::{
    cluster::ClusterView,
    fleet::persist::{Change, Durable, Snapshot, Store},
};

pub use lease::{Elected, LeaseHolder};
pub use schema::{MIGRATION_LOCK, MIGRATIONS, SCHEMA_VERSION};
pub use tail::{Batch, PAGE_IDS, PAGE_ROWS, Tail, TailError, TailOptions};

/// How long a connection attempt may take when the URL does not say
/// (`connect_timeout`): a broker that cannot reach its database should
/// say so at start rather than hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long sent data may stay unacknowledged before the kernel drops the
/// connection, when the URL does not say: a database host that vanished
/// (no reset, no FIN) is noticed in this time rather than TCP's default
/// quarter of an hour.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);

/// The shared secret forwarded calls are signed with (HMAC-SHA256), drawn
/// once by the first replica that connects and read by all.
pub const FORWARDING_KEY: &str = "cluster-forwarding-key/hmac-sha256";

/// Every secret the replicas must share, drawn at connect if absent: the
/// page-token and connection-token keys (`fleet`), the token-signing key
/// (`auth`) and the forwarding key. The names are those modules' own.
const SHARED_SECRETS: [&str; 4] = [
    "page-token-key/hmac-sha256",
    "connection-token-key/hmac-sha256",
    "token-signing-key/hs256",
    FORWARDING_KEY,
];

/// Why the database could not be opened. Messages name the database by
/// host, port and name, never with the URL's password.
#[derive(Debug, thiserror::Error)]
pub enum PostgresOpenError {
    /// The URL does not parse.
    #[error("--database-url is not a valid PostgreSQL URL ({0})")]
    Url(String),
    /// The server could not be reached or refused the login.
    #[error("cannot connect to PostgreSQL at {target}: {detail}")]
    Connect {
        /// host:port/dbname.
        target: String,
        /// The driver's error.
        detail: String,
    },
    /// A newer broker migrated the database.
    #[error(
        "PostgreSQL database {target} has schema version {found}, newer than this broker's {supported}; run a newer dcv-broker"
    )]
    NewerSchema {
        /// host:port/dbname.
        target: String,
        /// The database's schema version.
        found: i64,
        /// The newest this build knows.
        supported: i64,
    },
    /// A row does not decode.
    #[error(
        "PostgreSQL database {target} holds a damaged row ({detail}); restore it from a backup"
    )]
    Corrupt {
        /// host:port/dbname.
        target: String,
        /// Which row and column.
        detail: String,
    },
    /// Any other failure while migrating or loading.
    #[error("PostgreSQL database {target}: {detail}")]
    Query {
        /// host:port/dbname.
        target: String,
        /// The driver's error.
        detail: String,
    },
}

impl From<PostgresError> for PostgresOpenError {
    fn from(e: PostgresError) -> Self {
        PostgresOpenError::Query {
            target: e.target,
            detail: e.detail,
        }
    }
}

/// A failure talking to the database once it is open: one line, naming the
/// database by `host:port/dbname` (never the password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("PostgreSQL database {target}: {detail}")]
pub struct PostgresError {
    target: String,
    detail: String,
}

impl PostgresError {
    fn new(target: &str, detail: impl Into<String>) -> PostgresError {
        PostgresError {
            target: target.to_owned(),
            detail: detail.into(),
        }
    }

    fn driver(target: &str, e: &tokio_postgres::Error) -> PostgresError {
        PostgresError::new(target, describe(e))
    }

    /// What went wrong, without the database's name.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

/// What a replica is called among the replicas, where it can be reached,
/// and how long its lease lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterOptions {
    /// This replica's unique name (`--node-id`).
    pub node: String,
    /// The URL other replicas forward writes to (`--advertise-url`).
    pub advertise: String,
    /// How long a lease lasts without renewal (`--leader-lease`).
    pub lease: Duration,
}

/// The database a URL names, migrated and holding the shared secrets: makes
/// the connections the writer, the lease and the tail each own, and keeps
/// one more (the control connection, for elections and snapshots) that it
/// remakes lazily when a call finds it broken. Cheap to clone.
#[derive(Clone)]
pub struct Database {
    inner: Arc<DatabaseInner>,
}

struct DatabaseInner {
    config: Config,
    target: String,
    control: tokio::sync::Mutex<Option<Client>>,
    /// Reads of the audit log, apart from the control connection.
    reader: tokio::sync::Mutex<Option<Client>>,
    last_elected: lease::LastElected,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("target", &self.inner.target)
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Connects, forces `synchronous_commit = on`, brings the schema up to
    /// date (under the advisory lock, safely while other replicas do the
    /// same), and inserts-if-absent the shared secrets.
    pub async fn connect(url: &str) -> Result<Database, PostgresOpenError> {
        let mut config = parse_url(url)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("dcv-broker");
        }
        let target = target(&config);
        let mut client =
            open_connection(&config, &target)
                .await
                .map_err(|e| PostgresOpenError::Connect {
                    target: target.clone(),
                    detail: e.detail,
                })?;
        schema::migrate(&mut client, &target).await?;
        schema::ensure_secrets(&client, &target, &SHARED_SECRETS).await?;
        Ok(Database {
            inner: Arc::new(DatabaseInner {
                config,
                target,
                control: tokio::sync::Mutex::new(Some(client)),
                reader: tokio::sync::Mutex::new(None),
                last_elected: parking_lot::Mutex::new(None),
            }),
        })
    }

    /// The database, as `host:port/dbname` (no credentials).
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// A new connection of its own, `synchronous_commit = on`, driven by a
    /// task that ends when the client is dropped.
    async fn connection(&self) -> Result<Client, PostgresError> {
        open_connection(&self.inner.config, &self.inner.target).await
    }

    /// The control connection's slot, holding a connection (remade if it
    /// broke since the last call).
    async fn control(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>, PostgresError> {
        let mut slot = self.inner.control.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = None;
            *slot = Some(self.connection().await?);
        }
        Ok(slot)
    }

    /// Takes the lease if it is free, expired or this node's, or renews it
    /// if `held` is this node's epoch; else says who leads. Answers within
    /// the lease or fails.
    pub async fn elect(
        &self,
        opts: &ClusterOptions,
        held: Option<i64>,
    ) -> Result<Elected, PostgresError> {
        let target = self.target();
        let mut slot = self.control().await?;
        let Some(client) = slot.as_ref() else {
            return Err(PostgresError::new(target, "no control connection"));
        };
        let election = lease::elect(client, target, opts, held, &self.inner.last_elected);
        match tokio::time::timeout(opts.lease, election).await {
            Ok(result) => result,
            Err(_) => {
                // Its answer may still come, after the next call's question:
                // the next call starts on a new connection.
                *slot = None;
                Err(PostgresError::new(
                    target,
                    format!("the election took longer than the lease ({:?})", opts.lease),
                ))
            }
        }
    }

    /// Gives up this node's lease of `epoch` at once (a leader shutting
    /// down cleanly, once it takes no more writes); whether it still held
    /// it. Answers within the lease or fails.
    pub async fn resign(&self, opts: &ClusterOptions, epoch: i64) -> Result<bool, PostgresError> {
        let target = self.target();
        let mut slot = self.control().await?;
        let Some(client) = slot.as_ref() else {
            return Err(PostgresError::new(target, "no control connection"));
        };
        match tokio::time::timeout(opts.lease, lease::resign(client, &opts.node, epoch)).await {
            Ok(result) => result.map_err(|e| PostgresError::new(target, describe(&e))),
            Err(_) => {
                *slot = None;
                Err(PostgresError::new(target, "no answer to the resignation"))
            }
        }
    }

    /// Everything, and the change log's sequence number, in one
    /// `REPEATABLE READ` transaction.
    pub async fn snapshot(&self) -> Result<(Snapshot, u64), PostgresError> {
        let mut slot = self.control().await?;
        let Some(client) = slot.as_mut() else {
            return Err(PostgresError::new(self.target(), "no control connection"));
        };
        load::snapshot(client)
            .await
            .map_err(|e| e.into_error(self.target()))
    }

    /// The audit records `filter` selects, in its order (any replica may
    /// read them: the leader writes them).
    pub async fn audit_records(
        &self,
        filter: &crate::store::audit::AuditFilter,
    ) -> Result<Vec<crate::fleet::persist::AuditRecord>, PostgresError> {
        Ok(self
            .read_audit(filter)
            .await?
            .records
            .into_iter()
            .map(|stored| stored.record)
            .collect())
    }

    /// The audit records `filter` selects, with their places in the log,
    /// read on a connection of their own (a slow read never delays an
    /// election), one read at a time per replica. Rows are streamed and
    /// the read stops at the filter's item budget.
    pub async fn read_audit(
        &self,
        filter: &crate::store::audit::AuditFilter,
    ) -> Result<crate::fleet::persist::AuditPage, PostgresError> {
        use tokio_stream::StreamExt as _;

        use crate::store::audit::{FilterValue, PageFill, RawRecord, clause};
        let (clause, values) = clause(filter, '$');
        let columns = RawRecord::COLUMNS.replace("a.items", "a.items::TEXT");
        let sql = format!("SELECT {columns} FROM audit a{clause}");
        let values: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = values
            .into_iter()
            .map(|v| -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
                match v {
                    FilterValue::Text(t) => Box::new(t),
                    FilterValue::Time(t) => Box::new(t),
                }
            })
            .collect();
        let target = self.target();
        let mut slot = self.inner.reader.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = None;
            *slot = Some(self.connection().await?);
        }
        let Some(client) = slot.as_ref() else {
            return Err(PostgresError::new(target, "no reading connection"));
        };
        let driver = |e: tokio_postgres::Error| PostgresError::driver(target, &e);
        let rows = client
            .query_raw(
                &sql,
                values
                    .iter()
                    .map(|v| v.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)),
            )
            .await
            .map_err(driver)?;
        // The stream is read in full or dropped; either way the driver
        // discards what is left of it.
        let mut rows = std::pin::pin!(rows);
        let mut page = PageFill::new(filter);
        while let Some(row) = rows.next().await {
            let row = row.map_err(driver)?;
            let record = RawRecord {
                row: row.get(0),
                at: row.get(1),
                actor: row.get(2),
                request_id: row.get(3),
                method: row.get(4),
                peer: row.get(5),
                items: row.get(6),
            };
            if !page
                .offer(record)
                .map_err(|e| PostgresError::new(target, e))?
            {
                break;
            }
        }
        Ok(page.finish())
    }

    /// The leader's fenced group-commit writer for `epoch`, on a connection
    /// of its own; publishes each commit to `view` before acknowledging it.
    pub async fn start_writer(
        &self,
        opts: &ClusterOptions,
        epoch: i64,
        view: ClusterView,
    ) -> Result<PostgresStore, PostgresError> {
        let client = self.connection().await?;
        Ok(PostgresStore::start(
            client,
            self.target().to_owned(),
            writer::Fence {
                node: opts.node.clone(),
                epoch,
                timeout: (opts.lease * 2).max(writer::MIN_GROUP_TIMEOUT),
            },
            view,
        ))
    }

    /// Renews the lease of `epoch` every `lease / 3` on a connection of its
    /// own until the holder is dropped or the lease is lost.
    pub async fn hold_lease(
        &self,
        opts: &ClusterOptions,
        epoch: i64,
    ) -> Result<LeaseHolder, PostgresError> {
        let client = self.connection().await?;
        Ok(lease::hold(self.clone(), client, opts.clone(), epoch))
    }

    /// A follower's tail of the change log after `from`, woken by LISTEN and
    /// polling every second.
    pub async fn tail(&self, from: u64) -> Result<Tail, PostgresError> {
        self.tail_with(from, TailOptions::default()).await
    }

    /// [`Database::tail`] with its polling interval and whether it listens.
    pub async fn tail_with(&self, from: u64, options: TailOptions) -> Result<Tail, PostgresError> {
        tail::Tail::start(self, from, options).await
    }
}

/// Connects with `config` and forces `synchronous_commit = on`.
async fn open_connection(config: &Config, target: &str) -> Result<Client, PostgresError> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| PostgresError::driver(target, &e))?;
    let target_name = target.to_owned();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(database = %target_name, error = %describe(&e), "a PostgreSQL connection ended");
        }
    });
    // Whatever the server's or role's default: a commit returns only once
    // it is flushed to the write-ahead log.
    client
        .batch_execute("SET synchronous_commit = on")
        .await
        .map_err(|e| PostgresError::driver(target, &e))?;
    Ok(client)
}

/// One submission on its way to the writer task.
type Submission = (Vec<Change>, oneshot::Sender<Result<(), String>>);

/// What the handles and the writer task share.
#[derive(Debug)]
struct Shared {
    /// `Some(why)` once a write failed.
    failed: watch::Sender<Option<String>>,
    /// Transactions committed by the writer.
    commits: AtomicU64,
}

/// The leader's store: a cheap handle to its writer task. Clones share one
/// writer, which stops (after committing everything queued) once every
/// handle is gone or [`PostgresStore::close`] is called.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    target: String,
    /// `None` once closed.
    queue: Mutex<Option<mpsc::UnboundedSender<Submission>>>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    shared: Arc<Shared>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.inner.target)
            .field("failed", &*self.inner.shared.failed.borrow())
            .field("commits", &self.commits())
            .finish_non_exhaustive()
    }
}

/// The database a URL names, for messages and logs: `host:port/dbname`,
/// without user or password.
pub fn target(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let dbname = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("{host}:{port}/{dbname}")
}

/// Parses a URL (or key=value string) without ever echoing it: the
/// driver's parse errors do not include the input, but say so here.
pub fn parse_url(url: &str) -> Result<Config, PostgresOpenError> {
    url.parse::<Config>()
        .map_err(|e| PostgresOpenError::Url(e.to_string()))
}

impl PostgresStore {
    /// The single-broker path of before issue 16, kept until the cluster
    /// controller replaces it in `main`: connects, takes the lease whoever
    /// holds it (one broker per database: a previous process of it may
    /// have died holding it), loads everything and starts the writer on
    /// that epoch. The lease is not renewed: nothing else should be using
    /// the database, and a replica that takes it over fences this writer.
    pub async fn open(url: &str) -> Result<(PostgresStore, Snapshot), PostgresOpenError> {
        let database = Database::connect(url).await?;
        let node = format!("single-{}", uuid::Uuid::new_v4());
        let epoch = {
            let slot = database.control().await?;
            let Some(client) = slot.as_ref() else {
                return Err(PostgresError::new(database.target(), "no control connection").into());
            };
            lease::seize(client, &node)
                .await
                .map_err(|e| PostgresError::driver(database.target(), &e))?
        };
        let (snapshot, _) = database.snapshot().await?;
        let options = ClusterOptions {
            node,
            advertise: String::new(),
            lease: Duration::from_secs(5),
        };
        let store = database
            .start_writer(&options, epoch, ClusterView::standalone())
            .await?;
        Ok((store, snapshot))
    }

    fn start(
        client: Client,
        target: String,
        fence: writer::Fence,
        view: ClusterView,
    ) -> PostgresStore {
        let (queue, submissions) = mpsc::unbounded_channel();
        let (failed, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            failed,
            commits: AtomicU64::new(0),
        });
        let writer = tokio::spawn(writer::run(
            client,
            target.clone(),
            fence,
            view,
            submissions,
            shared.clone(),
        ));
        PostgresStore {
            inner: Arc::new(Inner {
                target,
                queue: Mutex::new(Some(queue)),
                writer: Mutex::new(Some(writer)),
                shared,
            }),
        }
    }

    /// The database, as `host:port/dbname` (no credentials).
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// `None` while healthy; the reason once a group failed (fenced by a
    /// lost lease, or the connection lost), after which nothing more is
    /// stored.
    pub fn failed(&self) -> watch::Receiver<Option<String>> {
        self.inner.shared.failed.subscribe()
    }

    /// How many transactions the writer has committed since it started
    /// (each holds one or more submissions).
    pub fn commits(&self) -> u64 {
        self.inner.shared.commits.load(Ordering::Relaxed)
    }

    /// Stops taking submissions (later ones, from any clone, fail), waits
    /// until everything already submitted is committed (or failed), and
    /// closes the connection.
    pub async fn close(self) -> Result<(), super::StoreFailed> {
        drop(self.inner.queue.lock().take());
        let writer = self.inner.writer.lock().take();
        if let Some(writer) = writer
            && writer.await.is_err()
        {
            tracing::error!(database = %self.inner.target, "the store's writer task panicked");
        }
        match &*self.inner.shared.failed.borrow() {
            Some(why) => Err(super::StoreFailed(why.clone())),
            None => Ok(()),
        }
    }
}

impl Store for PostgresStore {
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
        // A send fails only if the writer task is gone, which drops the
        // answer and so fails the Durable too.
        let _ = queue.send((changes, answer));
        Durable::pending(durable)
    }

    fn keeps_liveness(&self) -> bool {
        true
    }
}

/// A driver error in one line: PostgreSQL's own message (and code) when
/// the server sent one, else the driver's description.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    // The driver's Display already appends its cause.
    e.to_string()
}
