//! DescribeServerHistory: who did what to a server (or any id), when, why
//! and how it went, read a page at a time from the audit log the store
//! keeps, and continued with a signed page token.
//!
//! The store reads (see [`persist::Store::read_audit`]); this module
//! bounds what one call may cost before it asks (an id and an actor no
//! longer than any stored one, a page of at most [`MAX_PAGE`] records and
//! [`PAGE_ITEM_BYTES`] of items) and shapes the answer: with an id given,
//! each record lists only that id's items (a 1,000-server close is one
//! line of a server's story, not 1,000), with the call's item count.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{
    Fleet,
    error::{FieldViolation, FleetError},
    page_token::{TokenError, fingerprint},
    persist::{AuditCursor, AuditFilter, AuditItem, AuditRecord},
};

/// The default page size.
pub const DEFAULT_PAGE: u32 = 100;
/// The largest page a caller may ask for.
pub const MAX_PAGE: u32 = 1000;
/// A page stops before the record that would make its stored items exceed
/// this many bytes (a page always holds at least one record): far below
/// gRPC clients' 4 MiB message limit, however large the batches were.
pub const PAGE_ITEM_BYTES: usize = 1 << 20;
/// The longest actor a query may name: as long as any client id.
pub const MAX_ACTOR_BYTES: usize = 512;

/// A history query, as the caller sent it.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    /// A server's id (a session's or an API client's works too); empty:
    /// the whole fleet.
    pub server_id: String,
    /// Only this actor's records; empty: everyone's.
    pub actor: String,
    /// Records at or after this time.
    pub start_time: Option<SystemTime>,
    /// Records before this time.
    pub end_time: Option<SystemTime>,
    /// Newest first instead of oldest first.
    pub newest_first: bool,
    /// Records per page (1 to [`MAX_PAGE`], default [`DEFAULT_PAGE`]).
    pub max_results: Option<i32>,
    /// The previous page's token, to continue; empty to start.
    pub next_token: String,
}

/// One record of a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRecord {
    /// The record; with a server id asked for, only that id's items.
    pub record: AuditRecord,
    /// How many items the call had in all.
    pub item_count: usize,
}

/// A page of history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryPage {
    /// The records, in the order asked for.
    pub records: Vec<HistoryRecord>,
    /// Present when more records may follow.
    pub next_token: Option<String>,
}

impl Fleet {
    /// One page of the history `query` asks for. INVALID_ARGUMENT for a
    /// malformed query or token; FAILED_PRECONDITION when this broker
    /// keeps no history (`--in-memory`, `--demo-fleet`); UNAVAILABLE when
    /// the store cannot read.
    pub async fn describe_history(&self, query: HistoryQuery) -> Result<HistoryPage, FleetError> {
        let (mut filter, page_fingerprint) = validate(&query)?;
        let now = SystemTime::now();
        if !query.next_token.is_empty() {
            let last = self
                .tokens
                .check(&query.next_token, &page_fingerprint, now)
                .map_err(|e| match e {
                    TokenError::WrongQuery => FleetError::invalid(
                        "NextToken",
                        "was issued for a different ServerId, Actor, StartTime, EndTime or order",
                    ),
                    e => FleetError::invalid("NextToken", e.to_string()),
                })?;
            filter.after = Some(parse_cursor(&last).ok_or_else(|| {
                FleetError::invalid("NextToken", TokenError::Invalid.to_string())
            })?);
        }
        let read = self.store.read_audit(filter.clone()).ok_or_else(|| {
            FleetError::FailedPrecondition(
                "this broker keeps no history: it runs without a store (--in-memory or \
                 --demo-fleet); run it with --data-dir or --database-url"
                    .into(),
            )
        })?;
        let page = read.await.map_err(|why| {
            FleetError::Unavailable(format!("the history could not be read: {why}"))
        })?;
        let next_token = match (page.more, page.records.last()) {
            (true, Some(last)) => Some(self.tokens.issue(
                &page_fingerprint,
                &format_cursor(last.cursor),
                now,
            )),
            _ => None,
        };
        let subject = filter.subject.as_deref();
        let records = page
            .records
            .into_iter()
            .map(|stored| {
                let mut record = stored.record;
                let item_count = record.items.len();
                if let Some(subject) = subject {
                    record.items.retain(|item| item.id == subject);
                }
                HistoryRecord { record, item_count }
            })
            .collect();
        Ok(HistoryPage {
            records,
            next_token,
        })
    }
}

/// The store's filter for `query`, and what its page tokens are bound to.
fn validate(
    query: &HistoryQuery,
) -> Result<(AuditFilter, super::page_token::Fingerprint), FleetError> {
    let mut violations = Vec::new();
    let mut bounded = |field: &str, value: &str, max: usize| {
        if value.len() > max {
            violations.push(FieldViolation::new(
                field,
                format!("at most {max} bytes; got {}", value.len()),
            ));
        }
    };
    bounded("ServerId", &query.server_id, AuditItem::MAX_ID_BYTES);
    bounded("Actor", &query.actor, MAX_ACTOR_BYTES);
    let limit = match query.max_results {
        None => DEFAULT_PAGE,
        Some(n) if (1..=MAX_PAGE as i32).contains(&n) => n as u32,
        Some(n) => {
            violations.push(FieldViolation::new(
                "MaxResults",
                format!("must be 1 to {MAX_PAGE}; got {n}"),
            ));
            DEFAULT_PAGE
        }
    };
    if let (Some(start), Some(end)) = (query.start_time, query.end_time)
        && end <= start
    {
        violations.push(FieldViolation::new("EndTime", "must be after StartTime"));
    }
    if !violations.is_empty() {
        return Err(FleetError::InvalidArgument(violations));
    }
    let micros = |t: Option<SystemTime>| {
        t.map_or(String::new(), |t| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros())
                .to_string()
        })
    };
    let (start, end) = (micros(query.start_time), micros(query.end_time));
    let order = if query.newest_first {
        "newest"
    } else {
        "oldest"
    };
    let bound = fingerprint([
        "history",
        query.server_id.as_str(),
        query.actor.as_str(),
        start.as_str(),
        end.as_str(),
        order,
    ]);
    let filter = AuditFilter {
        subject: (!query.server_id.is_empty()).then(|| query.server_id.clone()),
        actor: (!query.actor.is_empty()).then(|| query.actor.clone()),
        since: query.start_time,
        until: query.end_time,
        after: None,
        newest_first: query.newest_first,
        limit: Some(limit),
        item_bytes: Some(PAGE_ITEM_BYTES),
    };
    Ok((filter, bound))
}

/// A cursor as a page token carries it: `MICROS.ROW`.
fn format_cursor(cursor: AuditCursor) -> String {
    format!("{}.{}", cursor.at_micros, cursor.row)
}

fn parse_cursor(text: &str) -> Option<AuditCursor> {
    let (at, row) = text.split_once('.')?;
    Some(AuditCursor {
        at_micros: at.parse().ok()?,
        row: row.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let cursor = AuditCursor {
            at_micros: 1_764_000_000_123_456,
            row: 42,
        };
        assert_eq!(parse_cursor(&format_cursor(cursor)), Some(cursor));
        for bad in ["", "1", "1.", ".2", "a.b", "1.2.3"] {
            assert_eq!(parse_cursor(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn malformed_queries_name_every_bad_field() {
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let query = HistoryQuery {
            server_id: "s".repeat(AuditItem::MAX_ID_BYTES + 1),
            actor: "a".repeat(MAX_ACTOR_BYTES + 1),
            start_time: Some(t),
            end_time: Some(t),
            max_results: Some(0),
            ..Default::default()
        };
        let Err(FleetError::InvalidArgument(violations)) = validate(&query) else {
            panic!("accepted");
        };
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["ServerId", "Actor", "MaxResults", "EndTime"]);
    }

    #[test]
    fn tokens_are_bound_to_the_whole_query() {
        let base = HistoryQuery {
            server_id: "s1".into(),
            ..Default::default()
        };
        let (_, a) = validate(&base).unwrap();
        for other in [
            HistoryQuery {
                server_id: "s2".into(),
                ..base.clone()
            },
            HistoryQuery {
                actor: "x".into(),
                ..base.clone()
            },
            HistoryQuery {
                newest_first: true,
                ..base.clone()
            },
            HistoryQuery {
                start_time: Some(UNIX_EPOCH),
                ..base.clone()
            },
        ] {
            assert_ne!(validate(&other).unwrap().1, a, "{other:?}");
        }
        // The page size is not part of it: a walk may change it.
        let resized = HistoryQuery {
            max_results: Some(5),
            ..base.clone()
        };
        assert_eq!(validate(&resized).unwrap().1, a);
    }
}
