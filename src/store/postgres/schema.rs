//! The PostgreSQL schema and its migrations, run by every broker as it
//! connects, safely when several start at once; and the secrets every
//! replica must share, drawn by whichever connects first.
//!
//! All migrations run in one transaction that first takes a
//! transaction-scoped advisory lock ([`MIGRATION_LOCK`]): a second broker
//! starting meanwhile waits at the lock, then reads the version the first
//! one committed and finds nothing left to do. DDL in PostgreSQL is
//! transactional, so a migration interrupted halfway leaves nothing behind.

use tokio_postgres::Client;

use super::{PostgresOpenError, describe};

/// The schema, one migration per version: `MIGRATIONS[i]` takes the
/// database from version `i` to `i + 1`. Append only: a released
/// migration never changes.
///
/// The same tables as the SQLite store's, in PostgreSQL's types: times
/// are unix microseconds (`BIGINT`), enums their upper-case names, a
/// server's description and a session's creation request their protobuf
/// encodings (`BYTEA`). Holds keep their order in `position`.
pub const MIGRATIONS: &[&str] = &[
    // 1: everything the SQLite store holds at its version 3.
    "CREATE TABLE servers (
        id TEXT NOT NULL PRIMARY KEY,
        description BYTEA NOT NULL,
        registered_at BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        agent_departed BOOLEAN NOT NULL
    );
    CREATE TABLE holds (
        server_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        kind TEXT NOT NULL,
        actor TEXT NOT NULL,
        since BIGINT NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (server_id, kind)
    );
    CREATE TABLE sessions (
        id TEXT NOT NULL PRIMARY KEY,
        name TEXT NOT NULL,
        owner TEXT NOT NULL,
        kind TEXT NOT NULL,
        server_id TEXT,
        state TEXT NOT NULL,
        substate TEXT,
        state_reason TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        request BYTEA,
        permissions_file TEXT NOT NULL,
        deadline BIGINT,
        forgotten BOOLEAN NOT NULL,
        queue_position BIGINT,
        deletions BIGINT NOT NULL
    );
    CREATE TABLE session_tried (
        session_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        server_id TEXT NOT NULL,
        PRIMARY KEY (session_id, position)
    );
    CREATE TABLE clients (
        id TEXT NOT NULL PRIMARY KEY,
        name TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        scopes TEXT NOT NULL,
        server_id TEXT,
        created_at BIGINT NOT NULL,
        revoked_at BIGINT
    );
    CREATE TABLE secrets (
        name TEXT NOT NULL PRIMARY KEY,
        value BYTEA NOT NULL
    );",
    // 2: several brokers on one database. `dcv_broker_leader` is the
    // lease (one row; an expiry in the past means nobody leads) and the
    // change log's last sequence number, which every write transaction of
    // the leader bumps first (its fence). `dcv_broker_changes` is the log
    // followers tail: per committed group, the ids it touched and the
    // heartbeats it passed on.
    "CREATE TABLE dcv_broker_leader (
        singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
        holder TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL,
        advertise TEXT NOT NULL,
        seq BIGINT NOT NULL
    );
    INSERT INTO dcv_broker_leader (singleton, holder, epoch, expires_at, advertise, seq)
        VALUES (TRUE, '', 0, '-infinity', '', 0);
    CREATE TABLE dcv_broker_changes (
        seq BIGINT NOT NULL PRIMARY KEY,
        epoch BIGINT NOT NULL,
        committed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
        servers TEXT[] NOT NULL,
        sessions TEXT[] NOT NULL,
        clients TEXT[] NOT NULL,
        secrets TEXT[] NOT NULL,
        liveness BYTEA
    );",
    // 3: the audit log, as the SQLite store's version 4 (see
    // `store::audit`); the items as JSONB, for PostgreSQL's JSON
    // operators.
    "CREATE TABLE audit (
        id BIGSERIAL PRIMARY KEY,
        at BIGINT NOT NULL,
        actor TEXT NOT NULL,
        request_id TEXT NOT NULL,
        method TEXT NOT NULL,
        peer TEXT,
        items JSONB NOT NULL
    );
    CREATE INDEX audit_at ON audit (at);
    CREATE INDEX audit_actor_at ON audit (actor, at);
    CREATE INDEX audit_request_id ON audit (request_id);
    CREATE TABLE audit_subjects (
        subject TEXT NOT NULL,
        audit_id BIGINT NOT NULL,
        PRIMARY KEY (subject, audit_id)
    );",
    // 4: named holds with expiries and servers' state versions, as the
    // SQLite store's version 5: a hold is keyed by its name, and the
    // rows already there are DCV's closed flag, the hold named 'default'.
    // The name's default stays, so that a broker of the previous version
    // still leading while a newer one migrates keeps writing rows that
    // mean what its holds meant.
    "ALTER TABLE holds
        ADD COLUMN name TEXT NOT NULL DEFAULT 'default',
        ADD COLUMN expires_at BIGINT,
        DROP CONSTRAINT holds_pkey,
        ADD PRIMARY KEY (server_id, name);
    ALTER TABLE servers ADD COLUMN state_version BIGINT NOT NULL DEFAULT 0;",
    // 5: the ClientToken records, as the SQLite store's version 6. (After
    // 4, the holds' columns, which a parallel change appends before it.)
    // Written by the leader only and never in the change log: a new
    // leader loads them with everything else.
    "CREATE TABLE client_tokens (
        actor TEXT NOT NULL,
        method TEXT NOT NULL,
        token TEXT NOT NULL,
        request_hash BYTEA NOT NULL,
        reply BYTEA NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (actor, method, token)
    );
    CREATE INDEX client_tokens_created_at ON client_tokens (created_at);",
    // 6: the drain a hold belongs to, as the SQLite store's version 7.
    // Nullable: a broker of the previous version still leading while a
    // newer one migrates writes holds without a drain (it knows none).
    "ALTER TABLE holds ADD COLUMN drain TEXT;",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The advisory lock key migrations hold: "DCVB" and a 1 for "schema".
pub const MIGRATION_LOCK: i64 = 0x4443_5642_0000_0001;

/// Brings the database's schema up to this build's version, or refuses
/// one that is newer.
pub(super) async fn migrate(client: &mut Client, target: &str) -> Result<(), PostgresOpenError> {
    let query = |e: tokio_postgres::Error| PostgresOpenError::Query {
        target: target.to_owned(),
        detail: describe(&e),
    };
    let tx = client.transaction().await.map_err(query)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(query)?;
    // The version table is the one thing created outside a numbered
    // migration: it says which migrations ran.
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS dcv_broker_schema (
             singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
             version BIGINT NOT NULL
         )",
    )
    .await
    .map_err(query)?;
    let found: i64 = match tx
        .query_opt("SELECT version FROM dcv_broker_schema", &[])
        .await
        .map_err(query)?
    {
        Some(row) => row.try_get(0).map_err(query)?,
        None => 0,
    };
    if found > SCHEMA_VERSION {
        return Err(PostgresOpenError::NewerSchema {
            target: target.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    let from = usize::try_from(found).map_err(|_| PostgresOpenError::Corrupt {
        target: target.to_owned(),
        detail: format!("dcv_broker_schema.version is {found}"),
    })?;
    for (version, migration) in (found + 1..).zip(&MIGRATIONS[from..]) {
        tx.batch_execute(migration).await.map_err(query)?;
        tx.execute(
            "INSERT INTO dcv_broker_schema (singleton, version) VALUES (TRUE, $1)
             ON CONFLICT (singleton) DO UPDATE SET version = excluded.version",
            &[&version],
        )
        .await
        .map_err(query)?;
        tracing::info!(database = %target, version, "migrated the schema");
    }
    tx.commit().await.map_err(query)?;
    Ok(())
}

/// The length of every shared secret: a 256-bit key.
const SECRET_BYTES: usize = 32;

/// Inserts each named secret with fresh random bytes unless a replica (or
/// an earlier start) already did, then checks that each is there and long
/// enough: every replica ends up with the same keys, and none draws its
/// own.
pub(super) async fn ensure_secrets(
    client: &Client,
    target: &str,
    names: &[&str],
) -> Result<(), PostgresOpenError> {
    let query = |e: tokio_postgres::Error| PostgresOpenError::Query {
        target: target.to_owned(),
        detail: describe(&e),
    };
    let mut values = Vec::with_capacity(names.len());
    for _ in names {
        let mut value = vec![0_u8; SECRET_BYTES];
        getrandom::fill(&mut value).map_err(|e| PostgresOpenError::Query {
            target: target.to_owned(),
            detail: format!("cannot draw a random secret: {e}"),
        })?;
        values.push(value);
    }
    client
        .execute(
            "INSERT INTO secrets (name, value) SELECT * FROM unnest($1::text[], $2::bytea[])
             ON CONFLICT (name) DO NOTHING",
            &[&names, &values],
        )
        .await
        .map_err(query)?;
    let rows = client
        .query(
            "SELECT name, length(value) FROM secrets WHERE name = ANY($1)",
            &[&names],
        )
        .await
        .map_err(query)?;
    for name in names {
        let length: Option<i32> = rows
            .iter()
            .find(|row| row.try_get::<_, &str>(0).is_ok_and(|n| n == *name))
            .and_then(|row| row.try_get(1).ok());
        match length {
            Some(length) if usize::try_from(length).is_ok_and(|l| l >= SECRET_BYTES) => {}
            Some(length) => {
                return Err(PostgresOpenError::Corrupt {
                    target: target.to_owned(),
                    detail: format!(
                        "the secret {name:?} is {length} bytes, fewer than {SECRET_BYTES}"
                    ),
                });
            }
            None => {
                return Err(PostgresOpenError::Query {
                    target: target.to_owned(),
                    detail: format!("the secret {name:?} is missing after it was inserted"),
                });
            }
        }
    }
    Ok(())
}
