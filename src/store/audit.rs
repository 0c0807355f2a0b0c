//! The audit log as the store keeps it, and how it is read back: what
//! DescribeServerHistory answers from (by server, session or client id,
//! by actor, by time range, a page at a time in either direction).
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
//!
//! A running SQLite broker reads on its writer thread, between commits
//! (the store's lock is exclusive, so no other connection can); a page
//! stops at [`AuditFilter::item_bytes`] of items, so a read never holds
//! the writer for long either.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, params_from_iter, types::Value};

use super::{FILE_NAME, codec};
use crate::fleet::persist::{AuditCursor, AuditPage, AuditRecord, StoredAudit};

/// The most records one prune removes.
pub const PRUNE_BATCH: i64 = 10_000;

pub use crate::fleet::persist::AuditFilter;

/// The `WHERE`, `ORDER BY` and `LIMIT` clauses over `audit` (aliased `a`)
/// that `filter` makes, and their parameters, numbered from 1 with
/// PostgreSQL's `$n` or SQLite's `?n`.
pub(super) fn clause(filter: &AuditFilter, mark: char) -> (String, Vec<FilterValue>) {
    let mut conditions = Vec::new();
    let mut values = Vec::new();
    let mut add = |sql: &str, new: Vec<FilterValue>| {
        let mut sql = sql.to_owned();
        for value in new {
            values.push(value);
            sql = sql.replacen('#', &format!("{mark}{}", values.len()), 1);
        }
        conditions.push(sql);
    };
    if let Some(subject) = &filter.subject {
        add(
            "a.id IN (SELECT audit_id FROM audit_subjects WHERE subject = #)",
            vec![FilterValue::Text(subject.clone())],
        );
    }
    if let Some(actor) = &filter.actor {
        add("a.actor = #", vec![FilterValue::Text(actor.clone())]);
    }
    if let Some(since) = filter.since {
        add("a.at >= #", vec![FilterValue::Time(codec::micros(since))]);
    }
    if let Some(until) = filter.until {
        add("a.at < #", vec![FilterValue::Time(codec::micros(until))]);
    }
    let (after, order) = match filter.newest_first {
        false => ("(a.at, a.id) > (#, #)", "a.at, a.id"),
        true => ("(a.at, a.id) < (#, #)", "a.at DESC, a.id DESC"),
    };
    if let Some(cursor) = filter.after {
        add(
            after,
            vec![
                FilterValue::Time(cursor.at_micros),
                FilterValue::Time(cursor.row),
            ],
        );
    }
    let mut sql = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    sql.push_str(" ORDER BY ");
    sql.push_str(order);
    if let Some(limit) = filter.limit {
        // One more than asked: whether another follows.
        sql.push_str(&format!(" LIMIT {}", u64::from(limit) + 1));
    }
    (sql, values)
}

/// A page being filled from rows in the reading order: takes rows while
/// they fit `filter.limit` and `filter.item_bytes` (always the first), and
/// notes whether another row followed them. The one stopping rule of both
/// stores' readers (PostgreSQL's stops reading its stream there).
pub(super) struct PageFill {
    limit: usize,
    budget: usize,
    page: AuditPage,
}

impl PageFill {
    pub(super) fn new(filter: &AuditFilter) -> PageFill {
        PageFill {
            limit: filter.limit.map_or(usize::MAX, |l| l as usize),
            budget: filter.item_bytes.unwrap_or(usize::MAX),
            page: AuditPage::default(),
        }
    }

    /// Takes `raw`, decoded, if the page has room; `Ok(false)` when it is
    /// full (the page then says more follow, and no later row is wanted).
    pub(super) fn offer(&mut self, raw: RawRecord) -> Result<bool, String> {
        let records = &self.page.records;
        if records.len() == self.limit || (!records.is_empty() && raw.items.len() > self.budget) {
            self.page.more = true;
            return Ok(false);
        }
        self.budget = self.budget.saturating_sub(raw.items.len());
        self.page.records.push(raw.decode()?);
        Ok(true)
    }

    pub(super) fn finish(self) -> AuditPage {
        self.page
    }
}

/// An audit row's columns, not yet decoded.
#[derive(Debug)]
pub(super) struct RawRecord {
    pub(super) row: i64,
    pub(super) at: i64,
    pub(super) actor: String,
    pub(super) request_id: String,
    pub(super) method: String,
    pub(super) peer: Option<String>,
    pub(super) items: String,
}

impl RawRecord {
    /// The columns a reader selects, in [`RawRecord`]'s order; the items
    /// as text (PostgreSQL keeps them as JSONB).
    pub(super) const COLUMNS: &str = "a.id, a.at, a.actor, a.request_id, a.method, a.peer, a.items";

    fn decode(self) -> Result<StoredAudit, String> {
        Ok(StoredAudit {
            cursor: AuditCursor {
                at_micros: self.at,
                row: self.row,
            },
            record: record(
                self.at,
                self.actor,
                self.request_id,
                self.method,
                self.peer,
                &self.items,
            )?,
        })
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
/// in its order. Opens the file read-only: a running broker holds the
/// store's exclusive lock, so this reads a stopped broker's store (or a
/// backup of a running one's); a running broker answers
/// DescribeServerHistory through its writer thread instead ([`read`]).
pub fn read_sqlite(dir: &Path, filter: &AuditFilter) -> Result<Vec<AuditRecord>, AuditReadError> {
    let connection = Connection::open_with_flags(
        dir.join(FILE_NAME),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    Ok(read(&connection, filter)?
        .records
        .into_iter()
        .map(|stored| stored.record)
        .collect())
}

/// The audit records `filter` selects, read on `connection`.
pub(super) fn read(
    connection: &Connection,
    filter: &AuditFilter,
) -> Result<AuditPage, AuditReadError> {
    let (clause, values) = clause(filter, '?');
    let sql = format!("SELECT {} FROM audit a{clause}", RawRecord::COLUMNS);
    let values = values.into_iter().map(|v| match v {
        FilterValue::Text(t) => Value::Text(t),
        FilterValue::Time(t) => Value::Integer(t),
    });
    let mut statement = connection.prepare(&sql)?;
    let rows = statement.query_map(params_from_iter(values), |row| {
        Ok(RawRecord {
            row: row.get(0)?,
            at: row.get(1)?,
            actor: row.get(2)?,
            request_id: row.get(3)?,
            method: row.get(4)?,
            peer: row.get(5)?,
            items: row.get(6)?,
        })
    })?;
    let mut page = PageFill::new(filter);
    for row in rows {
        if !page.offer(row?).map_err(AuditReadError::Decode)? {
            break;
        }
    }
    Ok(page.finish())
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
