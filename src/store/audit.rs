//! The audit log as the store keeps it, and how it is read back: the
//! ground a history API (`DescribeHistory`: by server or session id, by
//! actor, by time range) will stand on.
//!
//! One `audit` row per state-changing call (time, actor, request id,
//! method, peer, its items as a JSON array), indexed by time, by actor and
//! time, and by request id; one `audit_subjects` row per item naming the
//! id it touched, so the history of one server, session or client is an
//! index lookup however large the log grows. Records are written by the
//! store's writer in the same group commits as the changes they describe
//! (`Change::PutAudit`), and pruned by age (`Change::PruneAudit`, at most
//! [`PRUNE_BATCH`] records per prune, so a long-neglected log never holds
//! the writer for long).

use std::{path::Path, time::SystemTime};

use rusqlite::{Connection, OpenFlags, params_from_iter, types::Value};

use super::{FILE_NAME, codec};
use crate::fleet::persist::AuditRecord;

/// The most records one prune removes.
pub const PRUNE_BATCH: i64 = 10_000;

/// Which records to read; every field narrows, `None` does not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Records with an item naming this server, session or client id.
    pub subject: Option<String>,
    /// Records of this actor.
    pub actor: Option<String>,
    /// Records at or after this time.
    pub since: Option<SystemTime>,
    /// Records before this time.
    pub until: Option<SystemTime>,
    /// At most this many, oldest first (`None`: all).
    pub limit: Option<u32>,
}

impl AuditFilter {
    /// The `WHERE` clause over `audit` (aliased `a`) and its parameters,
    /// numbered from 1 with PostgreSQL's `$n` or SQLite's `?n`.
    pub(super) fn clause(&self, mark: char) -> (String, Vec<FilterValue>) {
        let mut conditions = Vec::new();
        let mut values = Vec::new();
        let mut add = |sql: &str, value: FilterValue| {
            values.push(value);
            conditions.push(sql.replace('#', &format!("{mark}{}", values.len())));
        };
        if let Some(subject) = &self.subject {
            add(
                "a.id IN (SELECT audit_id FROM audit_subjects WHERE subject = #)",
                FilterValue::Text(subject.clone()),
            );
        }
        if let Some(actor) = &self.actor {
            add("a.actor = #", FilterValue::Text(actor.clone()));
        }
        if let Some(since) = self.since {
            add("a.at >= #", FilterValue::Time(codec::micros(since)));
        }
        if let Some(until) = self.until {
            add("a.at < #", FilterValue::Time(codec::micros(until)));
        }
        let mut sql = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        sql.push_str(" ORDER BY a.at, a.id");
        if let Some(limit) = self.limit {
            sql.push_str(&format!(" LIMIT {limit}"));
        }
        (sql, values)
    }
}

/// One parameter of a filter's clause.
#[derive(Debug, Clone)]
pub(super) enum FilterValue {
    Text(String),
    Time(i64),
}

/// Why audit records could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AuditReadError {
    /// The database refused.
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored record does not decode.
    #[error("{0}")]
    Decode(String),
}

/// The audit records of the SQLite store in `dir` that `filter` selects,
/// oldest first. Opens the file read-only: a running broker holds the
/// store's exclusive lock, so this reads a stopped broker's store (or a
/// backup of a running one's).
pub fn read_sqlite(dir: &Path, filter: &AuditFilter) -> Result<Vec<AuditRecord>, AuditReadError> {
    let connection = Connection::open_with_flags(
        dir.join(FILE_NAME),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let (clause, values) = filter.clause('?');
    let sql = format!(
        "SELECT a.at, a.actor, a.request_id, a.method, a.peer, a.items FROM audit a{clause}"
    );
    let values = values.into_iter().map(|v| match v {
        FilterValue::Text(t) => Value::Text(t),
        FilterValue::Time(t) => Value::Integer(t),
    });
    let mut statement = connection.prepare(&sql)?;
    let rows = statement.query_map(params_from_iter(values), |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, Option<String>>(4)?,
            row.get::<_, String>(5)?,
        ))
    })?;
    rows.map(|row| {
        let (at, actor, request_id, method, peer, items) = row?;
        record(at, actor, request_id, method, peer, &items).map_err(AuditReadError::Decode)
    })
    .collect()
}

/// A record from its stored columns.
pub(super) fn record(
    at: i64,
    actor: String,
    request_id: String,
    method: String,
    peer: Option<String>,
    items: &str,
) -> Result<AuditRecord, String> {
    Ok(AuditRecord {
        at: codec::time_from_micros(at).ok_or("audit record: time out of range")?,
        actor,
        request_id,
        method,
        peer,
        items: codec::decode_audit_items(items)?,
    })
}
