//! Opening a store: the checks that come before any write, the settings
//! that make every commit durable, and the schema migrations.
//!
//! Until the checks pass, the connection is told not to checkpoint when it
//! closes, so an error path changes nothing in the file: not even a
//! write-ahead log left by a crashed newer broker is folded in.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{Connection, ErrorCode, MAIN_DB, OpenFlags, TransactionBehavior, config::DbConfig};

use super::{StoreOpenError, load, private};
use crate::fleet::persist::Snapshot;

/// The schema, one migration per version: `MIGRATIONS[i]` takes a store
/// from version `i` to `i + 1`. Each runs in its own transaction, which
/// also sets `user_version`. Append only: a released migration never
/// changes.
///
/// Times are unix microseconds; enums are their upper-case names.
pub const MIGRATIONS: &[&str] = &[
    // 1: servers, their holds, sessions and the servers each session tried.
    "CREATE TABLE servers (
        id TEXT NOT NULL PRIMARY KEY,
        -- The agent's latest registration: an encoded
        -- dcv.sessionmanager.v1.RegisterServerRequest (ServerId left empty).
        description BLOB NOT NULL,
        registered_at INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        agent_departed INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE holds (
        server_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        actor TEXT NOT NULL,
        since INTEGER NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (server_id, kind)
    ) STRICT;
    CREATE TABLE sessions (
        id TEXT NOT NULL PRIMARY KEY,
        name TEXT NOT NULL,
        owner TEXT NOT NULL,
        kind TEXT NOT NULL,
        -- NULL while queued.
        server_id TEXT,
        state TEXT NOT NULL,
        substate TEXT,
        state_reason TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        -- The creation request, an encoded
        -- dcv.sessionmanager.v1.CreateSessionRequestData; NULL for
        -- sessions adopted from an agent's report.
        request BLOB,
        permissions_file TEXT NOT NULL,
        deadline INTEGER,
        forgotten INTEGER NOT NULL,
        queue_position INTEGER
    ) STRICT;
    CREATE TABLE session_tried (
        session_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        server_id TEXT NOT NULL,
        PRIMARY KEY (session_id, position)
    ) STRICT, WITHOUT ROWID;",
    // 2: API and agent clients (secrets only as argon2 hashes), and named
    // secrets such as the token-signing key.
    "CREATE TABLE clients (
        id TEXT NOT NULL PRIMARY KEY,
        name TEXT NOT NULL,
        -- A PHC string: $argon2id$v=19$m=...,t=...,p=...$salt$hash.
        secret_hash TEXT NOT NULL,
        -- Scope names separated by single spaces.
        scopes TEXT NOT NULL,
        -- For an agent client, the only server it may act for.
        server_id TEXT,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER
    ) STRICT;
    CREATE TABLE secrets (
        name TEXT NOT NULL PRIMARY KEY,
        value BLOB NOT NULL
    ) STRICT;",
    // 3: how many DeleteSessions requests each session's agent was sent,
    // part of each delete instruction's stable id.
    "ALTER TABLE sessions ADD COLUMN deletions INTEGER NOT NULL DEFAULT 0;",
    // 4: the audit log (see `store::audit`): one row per state-changing
    // call, its items as a JSON array, and one `audit_subjects` row per
    // item naming the server, session or client it touched, so that a
    // history of one id is an index lookup.
    "CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        request_id TEXT NOT NULL,
        method TEXT NOT NULL,
        peer TEXT,
        -- [{\"id\": ..., \"outcome\": \"OK\" or a failure code, \"reason\": ...}]
        items TEXT NOT NULL
    ) STRICT;
    CREATE INDEX audit_at ON audit (at);
    CREATE INDEX audit_actor_at ON audit (actor, at);
    CREATE INDEX audit_request_id ON audit (request_id);
    CREATE TABLE audit_subjects (
        subject TEXT NOT NULL,
        audit_id INTEGER NOT NULL,
        PRIMARY KEY (subject, audit_id)
    ) STRICT, WITHOUT ROWID;",
    // 5: named holds, several per server (each name once), each with an
    // optional expiry; and each server's state version, which changes
    // with its holds. SQLite cannot change a primary key in place, so
    // `holds` is rebuilt. A version 4 store has at most one hold per
    // server (its key was the kind, and CLOSED the only kind): DCV's
    // closed flag, which is the hold named 'default'. The copy keeps the
    // rows' order (the holds' order is their rowids').
    "CREATE TABLE holds_v5 (
        server_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        actor TEXT NOT NULL,
        since INTEGER NOT NULL,
        reason TEXT NOT NULL,
        -- NULL: until it is removed.
        expires_at INTEGER,
        PRIMARY KEY (server_id, name)
    ) STRICT;
    INSERT INTO holds_v5 (server_id, kind, name, actor, since, reason, expires_at)
        SELECT server_id, kind, 'default', actor, since, reason, NULL
        FROM holds ORDER BY server_id, rowid;
    DROP TABLE holds;
    ALTER TABLE holds_v5 RENAME TO holds;
    ALTER TABLE servers ADD COLUMN state_version INTEGER NOT NULL DEFAULT 0;",
    // 6: the first reply to each call made with a ClientToken (see
    // `fleet::client_tokens`), per caller, method and token, pruned by
    // age through `created_at`. (Numbered after 5, the holds' columns,
    // which a parallel change appends before this one.)
    "CREATE TABLE client_tokens (
        actor TEXT NOT NULL,
        method TEXT NOT NULL,
        token TEXT NOT NULL,
        -- SHA-256 of the encoded request, its ClientToken cleared.
        request_hash BLOB NOT NULL,
        -- The encoded reply (CloseServersResponse, ...).
        reply BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (actor, method, token)
    ) STRICT;
    CREATE INDEX client_tokens_created_at ON client_tokens (created_at);",
    // 7: the drain a hold belongs to (DrainServers), as a JSON object
    // (`codec::encode_drain`); NULL for a hold an ordinary close placed.
    "ALTER TABLE holds ADD COLUMN drain TEXT;",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// `PRAGMA application_id` of a dcv-broker store ("DCVB"): tells a store
/// apart from any other SQLite database.
const APPLICATION_ID: i64 = 0x4443_5642;

/// The write-ahead log is truncated to this after a checkpoint, so one
/// large batch (a fleet's first registration) does not leave a large file
/// behind for good.
const JOURNAL_SIZE_LIMIT: i64 = 64 << 20;

/// How many problems `quick_check` reports at most.
const QUICK_CHECK_LIMIT: i64 = 10;

/// Opens, checks, migrates and loads the store at `path` in `dir`.
pub(super) fn open(dir: &Path, path: &Path) -> Result<(Connection, Snapshot), StoreOpenError> {
    let existed = dir.is_dir();
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    // The store holds client secrets' hashes and the token-signing key:
    // a new directory is its owner's alone.
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| {
        if refused(&source) {
            StoreOpenError::ReadOnly {
                path: dir.to_path_buf(),
                detail: format!("cannot create it: {source}"),
            }
        } else {
            StoreOpenError::Io {
                path: dir.to_path_buf(),
                source,
            }
        }
    })?;
    if !existed {
        // SQLite syncs the directory it writes its log in, not that
        // directory's own entry in its parent.
        sync_parent(dir);
    }
    private::check_directory(dir)?;
    let wal = write_ahead_log(path);
    let wal_existed = fs::symlink_metadata(&wal).is_ok();
    let created = create_private(dir, path)?;
    if !created {
        check_existing(path)?;
    }
    let companions = companions(path);
    for companion in &companions {
        private::check_file(companion)?;
    }
    let found: Vec<bool> = companions
        .iter()
        .map(|c| fs::symlink_metadata(c).is_ok())
        .collect();
    match open_created(dir, path, &wal, wal_existed) {
        Ok(opened) => Ok(opened),
        Err(e) => {
            if created {
                // Leave the directory as it was found: an empty file of
                // ours would be refused as a store at the next start, and
                // a log of ours would be taken for the next store's.
                for (companion, _) in companions.iter().zip(found).filter(|(_, was)| !was) {
                    let _ = fs::remove_file(companion);
                }
                let _ = fs::remove_file(path);
            }
            Err(e)
        }
    }
}

/// Creates the store file, its owner's alone (0600) from the first moment,
/// unless there is one. SQLite gives the journal and the write-ahead log it
/// creates beside the file the file's mode, so none of the store's files is
/// ever readable by others, not even between creation and a `chmod`.
/// Returns whether it created the file (and so whether an empty file is
/// a new store rather than a damaged one).
fn create_private(dir: &Path, path: &Path) -> Result<bool, StoreOpenError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) if refused(&e) => Err(StoreOpenError::ReadOnly {
            path: dir.to_path_buf(),
            detail: format!("cannot create files in {}: {e}", dir.display()),
        }),
        Err(source) => Err(StoreOpenError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Checks a store file that was there before this open: a regular file,
/// not empty (SQLite would silently take an empty file for a new store,
/// with new signing keys and no clients), its owner's alone.
fn check_existing(path: &Path) -> Result<(), StoreOpenError> {
    let meta = fs::metadata(path).map_err(|source| StoreOpenError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(StoreOpenError::NotAStore {
            path: path.to_path_buf(),
            reason: "it is not a regular file".into(),
        });
    }
    if meta.len() == 0 {
        return Err(StoreOpenError::NotAStore {
            path: path.to_path_buf(),
            reason: "it is empty, which a store never is; if a first start was interrupted, \
                     remove the file"
                .into(),
        });
    }
    private::check_file(path)
}

/// The files SQLite may keep beside the store: its write-ahead log, its
/// shared-memory index and its rollback journal.
fn companions(path: &Path) -> [PathBuf; 3] {
    ["-wal", "-shm", "-journal"].map(|suffix| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    })
}

/// The rest of [`open`], once the store's file exists and is private.
fn open_created(
    dir: &Path,
    path: &Path,
    wal: &Path,
    wal_existed: bool,
) -> Result<(Connection, Snapshot), StoreOpenError> {
    let fail = |e: rusqlite::Error| classify(e, dir, path);
    let mut connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(fail)?;
    connection
        .set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .map_err(fail)?;
    // The lock is held for the life of the other broker: waiting for it
    // would only delay the error.
    connection.busy_timeout(Duration::ZERO).map_err(fail)?;
    // SQLite falls back to read-only when it may not write the file.
    if connection.is_readonly(MAIN_DB).map_err(fail)? {
        return Err(StoreOpenError::ReadOnly {
            path: path.to_path_buf(),
            detail: "the file can only be opened read-only".into(),
        });
    }
    // Before the first read, so that in WAL mode SQLite takes an exclusive
    // lock on the file itself at that read and keeps it: no shared-memory
    // index, and no other process can even read the store meanwhile.
    connection
        .pragma_update(None, "locking_mode", "EXCLUSIVE")
        .map_err(fail)?;

    match prepare(&mut connection, dir, path) {
        Ok(snapshot) => Ok((connection, snapshot)),
        Err(e) => {
            // Reading a store in WAL mode creates its write-ahead log, and
            // SQLite creates it only once it holds the file's exclusive
            // lock, which it keeps until the connection closes. Unless the
            // lock was someone else's, remove the log if it is still empty,
            // before closing, so a refused store is left as it was found.
            let ours = !matches!(e, StoreOpenError::Locked { .. }) && !wal_existed;
            if ours && fs::metadata(wal).is_ok_and(|m| m.len() == 0) {
                let _ = fs::remove_file(wal);
            }
            Err(e)
        }
    }
}

/// The rest of [`open`]: the checks, the lock, the durable settings, the
/// migrations and the load.
fn prepare(
    connection: &mut Connection,
    dir: &Path,
    path: &Path,
) -> Result<Snapshot, StoreOpenError> {
    let fail = |e: rusqlite::Error| classify(e, dir, path);
    // The first read: a file that is not a database fails here.
    let objects: i64 = connection
        .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
        .map_err(fail)?;
    let version = check(connection, path, objects).map_err(|e| e.or_else(fail))?;

    // Take the write lock, held from here until the process exits.
    connection
        .execute_batch("BEGIN IMMEDIATE; COMMIT;")
        .map_err(fail)?;

    let mode: String = connection
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(fail)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreOpenError::Io {
            path: path.to_path_buf(),
            source: io::Error::other(format!(
                "SQLite could not switch to write-ahead logging (journal mode stayed {mode})"
            )),
        });
    }
    connection
        .pragma_update(None, "synchronous", "FULL")
        .map_err(fail)?;
    connection
        .pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
        .map_err(fail)?;
    migrate(connection, version).map_err(fail)?;
    let snapshot = load::snapshot(connection, path)?;
    connection
        .set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, false)
        .map_err(fail)?;
    Ok(snapshot)
}

/// Makes a newly created directory's entry durable (best effort: a
/// failure here only matters if the machine also loses power before the
/// file system flushes on its own).
fn sync_parent(dir: &Path) {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(parent) = fs::File::open(parent) {
        let _ = parent.sync_all();
    }
}

/// SQLite's write-ahead log beside the database at `path`.
fn write_ahead_log(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// A check's verdict, or a SQLite error still to classify.
enum CheckError {
    Verdict(StoreOpenError),
    Sqlite(rusqlite::Error),
}

impl CheckError {
    fn or_else(self, classify: impl FnOnce(rusqlite::Error) -> StoreOpenError) -> StoreOpenError {
        match self {
            CheckError::Verdict(e) => e,
            CheckError::Sqlite(e) => classify(e),
        }
    }
}

impl From<rusqlite::Error> for CheckError {
    fn from(e: rusqlite::Error) -> Self {
        CheckError::Sqlite(e)
    }
}

/// Checks, reading only, that the file is a dcv-broker store this build
/// can use and that SQLite finds it sound. Returns its schema version.
/// `objects` is how many tables and indexes it has.
fn check(connection: &Connection, path: &Path, objects: i64) -> Result<i64, CheckError> {
    let verdict = |e| CheckError::Verdict(e);
    let path = path.to_path_buf();
    let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let application: i64 =
        connection.pragma_query_value(None, "application_id", |row| row.get(0))?;
    let foreign = if version == 0 {
        objects > 0
    } else {
        application != APPLICATION_ID
    };
    if foreign {
        return Err(verdict(StoreOpenError::NotAStore {
            path,
            reason: "it is a SQLite database of another program".into(),
        }));
    }
    if version < 0 {
        return Err(verdict(StoreOpenError::NotAStore {
            path,
            reason: format!("its schema version {version} is not one dcv-broker writes"),
        }));
    }
    if version > SCHEMA_VERSION {
        return Err(verdict(StoreOpenError::NewerSchema {
            path,
            found: version,
            supported: SCHEMA_VERSION,
        }));
    }
    let mut problems = Vec::new();
    connection.pragma(None, "quick_check", QUICK_CHECK_LIMIT, |row| {
        problems.push(row.get::<_, String>(0)?);
        Ok(())
    })?;
    if problems != ["ok"] {
        return Err(verdict(StoreOpenError::Corrupt {
            path,
            detail: format!("SQLite's quick_check found: {}", one_line(&problems)),
        }));
    }
    Ok(version)
}

/// SQLite's problem reports as one line: they span several (a header
/// naming the database, then one line per problem), and the error they go
/// into is one line on the terminal and one record in a log.
fn one_line(problems: &[String]) -> String {
    problems
        .iter()
        .flat_map(|p| p.lines())
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("***"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Runs the migrations from `version` on, each in its own transaction.
fn migrate(connection: &mut Connection, version: i64) -> rusqlite::Result<()> {
    for (from, sql) in (0_i64..).zip(MIGRATIONS).skip_while(|(v, _)| *v < version) {
        let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
        tx.pragma_update(None, "user_version", from + 1)?;
        tx.commit()?;
        tracing::info!(version = from + 1, "store schema migrated");
    }
    Ok(())
}

/// Whether an I/O error is a refusal to write (permissions or a read-only
/// mount) rather than a failure.
fn refused(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
    )
}

/// Why the directory refuses writes, if it does: SQLite needs to create
/// its write-ahead log (and, for a new store, the file) beside the
/// database. Probes with a file of its own, never the store's.
fn directory_refuses_writes(dir: &Path) -> Option<String> {
    let probe: PathBuf = dir.join(format!(
        ".{}.probe-{}",
        super::FILE_NAME,
        std::process::id()
    ));
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = fs::remove_file(&probe);
            None
        }
        Err(e) if refused(&e) => Some(format!("cannot create files in {}: {e}", dir.display())),
        Err(_) => None,
    }
}

/// The open error a SQLite failure stands for.
fn classify(e: rusqlite::Error, dir: &Path, path: &Path) -> StoreOpenError {
    let path = path.to_path_buf();
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => StoreOpenError::NotAStore {
            path,
            reason: "file is not a database".into(),
        },
        Some(ErrorCode::DatabaseCorrupt) => StoreOpenError::Corrupt {
            path,
            detail: one_line(&[e.to_string()]),
        },
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            StoreOpenError::Locked { path }
        }
        Some(
            ErrorCode::ReadOnly
            | ErrorCode::CannotOpen
            | ErrorCode::PermissionDenied
            | ErrorCode::SystemIoFailure,
        ) => match directory_refuses_writes(dir) {
            Some(detail) => StoreOpenError::ReadOnly {
                path: dir.to_path_buf(),
                detail,
            },
            None => StoreOpenError::Sqlite { path, source: e },
        },
        _ => StoreOpenError::Sqlite { path, source: e },
    }
}
