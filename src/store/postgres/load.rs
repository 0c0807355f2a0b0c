//! Reading records: the whole database into a [`Snapshot`] (with the change
//! log's sequence number) in one `REPEATABLE READ` transaction, a
//! consistent picture while the leader writes; and the current rows of
//! given ids, for a follower's tail ([`super::tail`]). As in the SQLite
//! store, a row that does not decode fails the read, naming the row,
//! rather than being skipped.
//! Lists are in byte order of their ids (`COLLATE "C"`), as SQLite sorts
//! them, whatever the database's collation.

use std::{collections::HashMap, time::SystemTime};

use tokio_postgres::{
    Client, IsolationLevel, Row, Transaction,
    types::{FromSql, FromSqlOwned},
};

use super::PostgresError;
use crate::{
    fleet::{
        Hold,
        persist::{Snapshot, StoredClient, StoredClientToken, StoredServer, StoredSession},
    },
    store::codec,
};

/// A failure while reading rows.
pub(super) enum LoadError {
    /// A row that does not decode.
    Row(String),
    /// The query failed.
    Postgres(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for LoadError {
    fn from(e: tokio_postgres::Error) -> Self {
        LoadError::Postgres(e)
    }
}

impl LoadError {
    pub(super) fn into_error(self, target: &str) -> PostgresError {
        match self {
            LoadError::Row(detail) => PostgresError::new(
                target,
                format!("holds a damaged row ({detail}); restore it from a backup"),
            ),
            LoadError::Postgres(e) => PostgresError::driver(target, &e),
        }
    }
}

/// Reads everything, each list in id order, and the change log's sequence
/// number it reflects.
pub(super) async fn snapshot(client: &mut Client) -> Result<(Snapshot, u64), LoadError> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let seq = log_seq(&tx).await?;
    let mut holds = read_holds(&tx, None).await?;
    let mut tried = read_tried(&tx, None).await?;
    let servers = read_servers(&tx, &mut holds, None).await?;
    if let Some(orphan) = holds.keys().min() {
        return Err(LoadError::Row(format!(
            "a hold names server {orphan:?}, which has no row"
        )));
    }
    let sessions = read_sessions(&tx, &mut tried, None).await?;
    if let Some(orphan) = tried.keys().min() {
        return Err(LoadError::Row(format!(
            "a tried server is listed for session {orphan:?}, which has no row"
        )));
    }
    let clients = read_clients(&tx, None).await?;
    let secrets = read_secrets(&tx, None).await?;
    let client_tokens = read_client_tokens(&tx).await?;
    tx.commit().await?;
    Ok((
        Snapshot {
            servers,
            sessions,
            clients,
            secrets,
            client_tokens,
        },
        seq,
    ))
}

/// The change log's last sequence number, as the lease row keeps it.
pub(super) async fn log_seq(tx: &Transaction<'_>) -> Result<u64, LoadError> {
    let row = tx
        .query_opt("SELECT seq FROM dcv_broker_leader", &[])
        .await?
        .ok_or_else(|| LoadError::Row("dcv_broker_leader has no row".into()))?;
    let seq: i64 = row.try_get(0)?;
    u64::try_from(seq).map_err(|_| LoadError::Row(format!("dcv_broker_leader.seq is {seq}")))
}

/// The current rows of the given ids (of a follower's batch).
pub(super) struct Current {
    pub servers: Vec<StoredServer>,
    pub sessions: Vec<StoredSession>,
    pub clients: Vec<StoredClient>,
    pub secrets: Vec<(String, Vec<u8>)>,
}

/// Reads the rows of `servers`, `sessions`, `clients` and `secrets` that
/// exist, inside the caller's transaction.
pub(super) async fn current(
    tx: &Transaction<'_>,
    servers: &[String],
    sessions: &[String],
    clients: &[String],
    secrets: &[String],
) -> Result<Current, LoadError> {
    let servers = if servers.is_empty() {
        Vec::new()
    } else {
        let mut holds = read_holds(tx, Some(servers)).await?;
        read_servers(tx, &mut holds, Some(servers)).await?
    };
    let sessions = if sessions.is_empty() {
        Vec::new()
    } else {
        let mut tried = read_tried(tx, Some(sessions)).await?;
        read_sessions(tx, &mut tried, Some(sessions)).await?
    };
    let clients = if clients.is_empty() {
        Vec::new()
    } else {
        read_clients(tx, Some(clients)).await?
    };
    let secrets = if secrets.is_empty() {
        Vec::new()
    } else {
        read_secrets(tx, Some(secrets)).await?
    };
    Ok(Current {
        servers,
        sessions,
        clients,
        secrets,
    })
}

/// `select` (all rows), or only those whose `key` is one of `ids`, in
/// `order`.
async fn rows(
    tx: &Transaction<'_>,
    select: &str,
    key: &str,
    order: &str,
    ids: Option<&[String]>,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    match ids {
        None => tx.query(&format!("{select} ORDER BY {order}"), &[]).await,
        Some(ids) => {
            tx.query(
                &format!("{select} WHERE {key} = ANY($1) ORDER BY {order}"),
                &[&ids],
            )
            .await
        }
    }
}

async fn read_secrets(
    tx: &Transaction<'_>,
    ids: Option<&[String]>,
) -> Result<Vec<(String, Vec<u8>)>, LoadError> {
    Ok(rows(
        tx,
        "SELECT name, value FROM secrets",
        "name",
        "name COLLATE \"C\"",
        ids,
    )
    .await?
    .iter()
    .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
    .collect::<Result<_, tokio_postgres::Error>>()?)
}

async fn read_client_tokens(tx: &Transaction<'_>) -> Result<Vec<StoredClientToken>, LoadError> {
    let rows = tx
        .query(
            "SELECT actor, method, token, request_hash, reply, created_at
             FROM client_tokens ORDER BY created_at",
            &[],
        )
        .await?;
    let mut records = Vec::with_capacity(rows.len());
    for row in &rows {
        let token: String = row.try_get(2)?;
        let f = Fields {
            row,
            what: "the ClientToken record",
            id: &token,
        };
        let hash: Vec<u8> = f.get(3, "request_hash")?;
        records.push(StoredClientToken {
            actor: f.get(0, "actor")?,
            method: f.get(1, "method")?,
            request_hash: <[u8; 32]>::try_from(hash.as_slice())
                .map_err(|_| f.bad("request_hash", "not 32 bytes long"))?,
            reply: f.get(4, "reply")?,
            created_at: f.time(5, "created_at")?,
            token,
        });
    }
    Ok(records)
}

/// Column readers that name the row on failure.
struct Fields<'r> {
    row: &'r Row,
    what: &'static str,
    id: &'r str,
}

impl Fields<'_> {
    fn bad(&self, column: &str, why: impl std::fmt::Display) -> LoadError {
        LoadError::Row(format!("{} {:?}: {column}: {why}", self.what, self.id))
    }

    fn get<'a, T: FromSql<'a>>(&'a self, index: usize, column: &str) -> Result<T, LoadError> {
        self.row.try_get(index).map_err(|e| self.bad(column, e))
    }

    fn time(&self, index: usize, column: &str) -> Result<SystemTime, LoadError> {
        let micros: i64 = self.get(index, column)?;
        codec::time_from_micros(micros).ok_or_else(|| self.bad(column, "time out of range"))
    }

    fn optional_time(&self, index: usize, column: &str) -> Result<Option<SystemTime>, LoadError> {
        let micros: Option<i64> = self.get(index, column)?;
        micros
            .map(|m| codec::time_from_micros(m).ok_or_else(|| self.bad(column, "out of range")))
            .transpose()
    }

    fn name<T>(
        &self,
        index: usize,
        column: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<T, LoadError> {
        let name: String = self.get(index, column)?;
        parse(&name).ok_or_else(|| self.bad(column, format!("unknown value {name:?}")))
    }
}

/// The first column of a row, as its id.
fn id<T: FromSqlOwned>(row: &Row) -> Result<T, LoadError> {
    Ok(row.try_get(0)?)
}

async fn read_holds(
    tx: &Transaction<'_>,
    ids: Option<&[String]>,
) -> Result<HashMap<String, Vec<Hold>>, LoadError> {
    let rows = rows(
        tx,
        "SELECT server_id, kind, name, actor, since, reason, expires_at, drain FROM holds",
        "server_id",
        "server_id COLLATE \"C\", position",
        ids,
    )
    .await?;
    let mut holds: HashMap<String, Vec<Hold>> = HashMap::new();
    for row in &rows {
        let server: String = id(row)?;
        let f = Fields {
            row,
            what: "the hold of server",
            id: &server,
        };
        let hold = Hold {
            kind: f.name(1, "kind", codec::hold_kind_from_name)?,
            name: codec::hold_name_from_column(f.get(2, "name")?).map_err(|e| f.bad("name", e))?,
            actor: f.get::<String>(3, "actor")?.into(),
            since: f.time(4, "since")?,
            reason: f.get(5, "reason")?,
            expires_at: f.optional_time(6, "expires_at")?,
            drain: f
                .get::<Option<String>>(7, "drain")?
                .map(|text| codec::decode_drain(&text).map(std::sync::Arc::new))
                .transpose()
                .map_err(|e| f.bad("drain", e))?,
        };
        holds.entry(server).or_default().push(hold);
    }
    Ok(holds)
}

async fn read_tried(
    tx: &Transaction<'_>,
    ids: Option<&[String]>,
) -> Result<HashMap<String, Vec<String>>, LoadError> {
    let rows = rows(
        tx,
        "SELECT session_id, server_id FROM session_tried",
        "session_id",
        "session_id COLLATE \"C\", position",
        ids,
    )
    .await?;
    let mut tried: HashMap<String, Vec<String>> = HashMap::new();
    for row in &rows {
        tried
            .entry(row.try_get(0)?)
            .or_default()
            .push(row.try_get(1)?);
    }
    Ok(tried)
}

async fn read_servers(
    tx: &Transaction<'_>,
    holds: &mut HashMap<String, Vec<Hold>>,
    ids: Option<&[String]>,
) -> Result<Vec<StoredServer>, LoadError> {
    let rows = rows(
        tx,
        "SELECT id, description, registered_at, last_seen, agent_departed, state_version
         FROM servers",
        "id",
        "id COLLATE \"C\"",
        ids,
    )
    .await?;
    let mut servers = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: String = id(row)?;
        let f = Fields {
            row,
            what: "server",
            id: &id,
        };
        let description: Vec<u8> = f.get(1, "description")?;
        let description = codec::decode_description(&description)
            .map_err(|e| f.bad("description does not decode", e))?;
        servers.push(StoredServer {
            state_version: codec::state_version_from_column(f.get(5, "state_version")?)
                .map_err(|e| f.bad("state_version", e))?,
            description,
            holds: holds.remove(&id).unwrap_or_default(),
            registered_at: f.time(2, "registered_at")?,
            last_seen: f.time(3, "last_seen")?,
            agent_departed: f.get(4, "agent_departed")?,
            id,
        });
    }
    Ok(servers)
}

async fn read_sessions(
    tx: &Transaction<'_>,
    tried: &mut HashMap<String, Vec<String>>,
    ids: Option<&[String]>,
) -> Result<Vec<StoredSession>, LoadError> {
    let rows = rows(
        tx,
        "SELECT id, name, owner, kind, server_id, state, substate, state_reason,
                created_at, request, permissions_file, deadline, forgotten,
                queue_position, deletions
         FROM sessions",
        "id",
        "id COLLATE \"C\"",
        ids,
    )
    .await?;
    let mut sessions = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: String = id(row)?;
        let f = Fields {
            row,
            what: "session",
            id: &id,
        };
        let codec::SessionColumns {
            substate,
            request,
            queue_position,
            deletions,
        } = codec::SessionColumns::decode(
            f.get(6, "substate")?,
            f.get(9, "request")?,
            f.get(13, "queue_position")?,
            f.get(14, "deletions")?,
        )
        .map_err(|(column, why)| f.bad(column, why))?;
        sessions.push(StoredSession {
            name: f.get(1, "name")?,
            owner: f.get(2, "owner")?,
            kind: f.name(3, "kind", codec::session_kind_from_name)?,
            server: f.get(4, "server_id")?,
            state: f.name(5, "state", codec::state_from_name)?,
            substate,
            state_reason: f.get(7, "state_reason")?,
            created_at: f.time(8, "created_at")?,
            request,
            permissions_file: f.get(10, "permissions_file")?,
            tried: tried.remove(&id).unwrap_or_default(),
            deadline: f.optional_time(11, "deadline")?,
            forgotten: f.get(12, "forgotten")?,
            queue_position,
            deletions,
            id,
        });
    }
    Ok(sessions)
}

async fn read_clients(
    tx: &Transaction<'_>,
    ids: Option<&[String]>,
) -> Result<Vec<StoredClient>, LoadError> {
    let rows = rows(
        tx,
        "SELECT id, name, secret_hash, scopes, server_id, created_at, revoked_at FROM clients",
        "id",
        "id COLLATE \"C\"",
        ids,
    )
    .await?;
    let mut clients = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: String = id(row)?;
        let f = Fields {
            row,
            what: "the client",
            id: &id,
        };
        let scopes: String = f.get(3, "scopes")?;
        clients.push(StoredClient {
            name: f.get(1, "name")?,
            secret_hash: f.get(2, "secret_hash")?,
            scopes: scopes.split_whitespace().map(str::to_owned).collect(),
            server_id: f.get(4, "server_id")?,
            created_at: f.time(5, "created_at")?,
            revoked_at: f.optional_time(6, "revoked_at")?,
            id,
        });
    }
    Ok(clients)
}
