//! Loading the whole store into a [`Snapshot`] at start-up. Every row is
//! decoded and checked; one that does not decode makes the store
//! [`Corrupt`](StoreOpenError::Corrupt), naming the row, rather than being
//! skipped: a broker that silently dropped a server or a session would
//! serve a fleet that differs from the one it promised to keep.

use std::{collections::HashMap, path::Path, time::SystemTime};

use rusqlite::{Connection, ErrorCode, Row, types::FromSql};

use super::{StoreOpenError, codec};
use crate::fleet::{
    Hold,
    persist::{Snapshot, StoredClient, StoredClientToken, StoredServer, StoredSession},
};

/// Reads every server and session, each list in id order.
pub(super) fn snapshot(connection: &Connection, path: &Path) -> Result<Snapshot, StoreOpenError> {
    read_all(connection).map_err(|e| e.into_open_error(path))
}

fn read_all(connection: &Connection) -> Result<Snapshot, LoadError> {
    let mut holds = read_holds(connection)?;
    let mut tried = read_tried(connection)?;
    let servers = read_servers(connection, &mut holds)?;
    if let Some(orphan) = holds.keys().min() {
        return Err(LoadError::Row(format!(
            "a hold names server {orphan:?}, which has no row"
        )));
    }
    let sessions = read_sessions(connection, &mut tried)?;
    if let Some(orphan) = tried.keys().min() {
        return Err(LoadError::Row(format!(
            "a tried server is listed for session {orphan:?}, which has no row"
        )));
    }
    Ok(Snapshot {
        servers,
        sessions,
        clients: read_clients(connection)?,
        secrets: read_secrets(connection)?,
        client_tokens: read_client_tokens(connection)?,
    })
}

fn read_client_tokens(connection: &Connection) -> Result<Vec<StoredClientToken>, LoadError> {
    let mut statement = connection.prepare(
        "SELECT actor, method, token, request_hash, reply, created_at
         FROM client_tokens ORDER BY created_at",
    )?;
    let mut rows = statement.query([])?;
    let mut records = Vec::new();
    while let Some(row) = rows.next()? {
        let token: String = row.get(2)?;
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

fn read_clients(connection: &Connection) -> Result<Vec<StoredClient>, LoadError> {
    let mut statement = connection.prepare(
        "SELECT id, name, secret_hash, scopes, server_id, created_at, revoked_at
         FROM clients ORDER BY id",
    )?;
    let mut rows = statement.query([])?;
    let mut clients = Vec::new();
    while let Some(row) = rows.next()? {
        let id: String = row.get(0)?;
        let f = Fields {
            row,
            what: "the client",
            id: &id,
        };
        let scopes: String = f.get(3, "scopes")?;
        let revoked_at: Option<i64> = f.get(6, "revoked_at")?;
        let client = StoredClient {
            id: id.clone(),
            name: f.get(1, "name")?,
            secret_hash: f.get(2, "secret_hash")?,
            scopes: scopes.split_whitespace().map(str::to_owned).collect(),
            server_id: f.get(4, "server_id")?,
            created_at: f.time(5, "created_at")?,
            revoked_at: match revoked_at {
                Some(m) => Some(
                    codec::time_from_micros(m)
                        .ok_or_else(|| f.bad("revoked_at", "time out of range"))?,
                ),
                None => None,
            },
        };
        clients.push(client);
    }
    Ok(clients)
}

fn read_secrets(connection: &Connection) -> Result<Vec<(String, Vec<u8>)>, LoadError> {
    let mut statement = connection.prepare("SELECT name, value FROM secrets ORDER BY name")?;
    let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A failure while reading rows.
enum LoadError {
    /// A row that does not decode.
    Row(String),
    /// SQLite failed.
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for LoadError {
    fn from(e: rusqlite::Error) -> Self {
        LoadError::Sqlite(e)
    }
}

impl LoadError {
    fn into_open_error(self, path: &Path) -> StoreOpenError {
        let path = path.to_path_buf();
        match self {
            LoadError::Row(detail) => StoreOpenError::Corrupt { path, detail },
            LoadError::Sqlite(e) if e.sqlite_error_code() == Some(ErrorCode::DatabaseCorrupt) => {
                StoreOpenError::Corrupt {
                    path,
                    detail: e.to_string(),
                }
            }
            LoadError::Sqlite(source) => StoreOpenError::Sqlite { path, source },
        }
    }
}

/// Column readers that name the row on failure.
struct Fields<'r, 's> {
    row: &'r Row<'s>,
    what: &'static str,
    id: &'r str,
}

impl Fields<'_, '_> {
    fn bad(&self, column: &str, why: impl std::fmt::Display) -> LoadError {
        LoadError::Row(format!("{} {:?}: {column}: {why}", self.what, self.id))
    }

    fn get<T: FromSql>(&self, index: usize, column: &str) -> Result<T, LoadError> {
        self.row.get(index).map_err(|e| self.bad(column, e))
    }

    fn time(&self, index: usize, column: &str) -> Result<SystemTime, LoadError> {
        let micros: i64 = self.get(index, column)?;
        codec::time_from_micros(micros).ok_or_else(|| self.bad(column, "time out of range"))
    }

    fn optional_time(&self, index: usize, column: &str) -> Result<Option<SystemTime>, LoadError> {
        let micros: Option<i64> = self.get(index, column)?;
        micros
            .map(|m| {
                codec::time_from_micros(m).ok_or_else(|| self.bad(column, "time out of range"))
            })
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

fn read_holds(connection: &Connection) -> Result<HashMap<String, Vec<Hold>>, LoadError> {
    let mut statement = connection.prepare(
        "SELECT server_id, kind, name, actor, since, reason, expires_at, drain
         FROM holds ORDER BY server_id, rowid",
    )?;
    let mut rows = statement.query([])?;
    let mut holds: HashMap<String, Vec<Hold>> = HashMap::new();
    while let Some(row) = rows.next()? {
        let server: String = row.get(0)?;
        let f = Fields {
            row,
            what: "the hold of server",
            id: &server,
        };
        let name: String = f.get(2, "name")?;
        let hold = Hold {
            kind: f.name(1, "kind", codec::hold_kind_from_name)?,
            name: codec::hold_name_from_column(&name).map_err(|e| f.bad("name", e))?,
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

fn read_tried(connection: &Connection) -> Result<HashMap<String, Vec<String>>, LoadError> {
    let mut statement = connection
        .prepare("SELECT session_id, server_id FROM session_tried ORDER BY session_id, position")?;
    let mut rows = statement.query([])?;
    let mut tried: HashMap<String, Vec<String>> = HashMap::new();
    while let Some(row) = rows.next()? {
        let session: String = row.get(0)?;
        let server: String = row.get(1)?;
        tried.entry(session).or_default().push(server);
    }
    Ok(tried)
}

/// A server row whose description is still encoded.
struct EncodedServer {
    id: String,
    description: Vec<u8>,
    registered_at: SystemTime,
    last_seen: SystemTime,
    agent_departed: bool,
    state_version: u64,
}

fn read_servers(
    connection: &Connection,
    holds: &mut HashMap<String, Vec<Hold>>,
) -> Result<Vec<StoredServer>, LoadError> {
    let mut statement = connection.prepare(
        "SELECT id, description, registered_at, last_seen, agent_departed, state_version
         FROM servers ORDER BY id",
    )?;
    let mut rows = statement.query([])?;
    let mut encoded = Vec::new();
    while let Some(row) = rows.next()? {
        let id: String = row.get(0)?;
        let f = Fields {
            row,
            what: "server",
            id: &id,
        };
        encoded.push(EncodedServer {
            description: f.get(1, "description")?,
            registered_at: f.time(2, "registered_at")?,
            last_seen: f.time(3, "last_seen")?,
            agent_departed: f.get(4, "agent_departed")?,
            state_version: codec::state_version_from_column(f.get(5, "state_version")?)
                .map_err(|e| f.bad("state_version", e))?,
            id,
        });
    }
    // Decoding the descriptions is most of a load's work.
    let descriptions = decode_in_parallel(&encoded, |s| {
        codec::decode_description(&s.description).map_err(|e| {
            LoadError::Row(format!(
                "server {:?}: description does not decode: {e}",
                s.id
            ))
        })
    })?;
    Ok(encoded
        .into_iter()
        .zip(descriptions)
        .map(|(s, description)| StoredServer {
            state_version: s.state_version,
            description,
            holds: holds.remove(&s.id).unwrap_or_default(),
            registered_at: s.registered_at,
            last_seen: s.last_seen,
            agent_departed: s.agent_departed,
            id: s.id,
        })
        .collect())
}

/// Below this many items, decoding stays on the calling thread.
const PARALLEL_DECODE_MIN: usize = 4096;
/// The most threads a load decodes on.
const PARALLEL_DECODE_THREADS: usize = 8;

/// `decode` applied to every item, in order, on up to
/// [`PARALLEL_DECODE_THREADS`] threads; the first failure in item order
/// wins.
fn decode_in_parallel<T: Sync, U: Send>(
    items: &[T],
    decode: impl Fn(&T) -> Result<U, LoadError> + Sync,
) -> Result<Vec<U>, LoadError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(PARALLEL_DECODE_THREADS)
        .min(items.len() / PARALLEL_DECODE_MIN)
        .max(1);
    if threads == 1 {
        return items.iter().map(decode).collect();
    }
    let decode = &decode;
    std::thread::scope(|scope| {
        let chunks: Vec<_> = items
            .chunks(items.len().div_ceil(threads))
            .map(|chunk| {
                scope.spawn(move || chunk.iter().map(decode).collect::<Result<Vec<U>, _>>())
            })
            .collect();
        let mut decoded = Vec::with_capacity(items.len());
        for chunk in chunks {
            let chunk = chunk
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            decoded.extend(chunk?);
        }
        Ok(decoded)
    })
}

fn read_sessions(
    connection: &Connection,
    tried: &mut HashMap<String, Vec<String>>,
) -> Result<Vec<StoredSession>, LoadError> {
    let mut statement = connection.prepare(
        "SELECT id, name, owner, kind, server_id, state, substate, state_reason, created_at,
                request, permissions_file, deadline, forgotten, queue_position, deletions
         FROM sessions ORDER BY id",
    )?;
    let mut rows = statement.query([])?;
    let mut sessions = Vec::new();
    while let Some(row) = rows.next()? {
        let id: String = row.get(0)?;
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
        let deadline: Option<i64> = f.get(11, "deadline")?;
        let deadline = deadline
            .map(|m| codec::time_from_micros(m).ok_or_else(|| f.bad("deadline", "out of range")))
            .transpose()?;
        let session = StoredSession {
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
            deadline,
            forgotten: f.get(12, "forgotten")?,
            queue_position,
            deletions,
            id,
        };
        sessions.push(session);
    }
    Ok(sessions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_decoding_keeps_order_and_reports_the_first_failure() {
        let items: Vec<usize> = (0..5 * PARALLEL_DECODE_MIN).collect();
        let doubled = decode_in_parallel(&items, |&i| Ok(i * 2)).ok().unwrap();
        assert_eq!(doubled, items.iter().map(|i| i * 2).collect::<Vec<_>>());

        let bad = [3 * PARALLEL_DECODE_MIN + 5, 4 * PARALLEL_DECODE_MIN];
        let failed = decode_in_parallel(&items, |&i| {
            if bad.contains(&i) {
                Err(LoadError::Row(format!("row {i}")))
            } else {
                Ok(i)
            }
        });
        match failed {
            Err(LoadError::Row(row)) => assert_eq!(row, format!("row {}", bad[0])),
            _ => panic!("the first bad row is reported"),
        }
    }
}
