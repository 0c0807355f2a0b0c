//! DescribeServers queries: their validation, server-side filters and the
//! fingerprint that binds page tokens to them.

use std::{
    collections::{BTreeSet, HashMap},
    ops::Bound,
    sync::Arc,
};

use super::{
    availability::{Reason, Reasons},
    error::FieldViolation,
    model::{OsFamily, ServerRecord, SessionState},
    sessions::SessionView,
    validate::validate_server_id,
};

/// The largest page, and the default one, as in DCV.
pub const MAX_PAGE_SIZE: usize = 1000;
/// The most ServerIds one DescribeServers call may name.
pub const MAX_DESCRIBE_IDS: usize = 1000;
/// The most filters one DescribeServers call may carry.
pub const MAX_FILTERS: usize = 50;

/// A DescribeServers request as the caller sent it.
#[derive(Debug, Clone, Default)]
pub struct DescribeQuery {
    /// Only these ids (empty: all).
    pub server_ids: Vec<String>,
    /// Token of the previous page (empty: first page).
    pub next_token: String,
    /// Page size, if given.
    pub max_results: Option<i32>,
    /// Filters as key/value pairs.
    pub filters: Vec<(String, String)>,
}

/// One filter predicate.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Predicate {
    Available(bool),
    Reason(Reason),
    Closed(bool),
    OsFamily(OsFamily),
    Tag(String, String),
}

impl Predicate {
    fn matches(&self, server: &ServerRecord, reasons: Reasons) -> bool {
        match self {
            Predicate::Available(want) => reasons.is_available() == *want,
            Predicate::Reason(r) => reasons.contains(*r),
            Predicate::Closed(want) => server.is_closed() == *want,
            Predicate::OsFamily(f) => server.description.host.os.family == *f,
            Predicate::Tag(k, v) => server.tag(k).is_some_and(|got| got == v.as_str()),
        }
    }
}

/// Parsed `Key`/`Value` filters: groups with different keys must all
/// match; the predicates inside one group (same key) match if any does.
#[derive(Debug, Clone)]
pub struct FilterGroups<P> {
    groups: Vec<(String, Vec<P>)>,
}

impl<P> Default for FilterGroups<P> {
    fn default() -> Self {
        FilterGroups { groups: Vec::new() }
    }
}

impl<P> FilterGroups<P> {
    /// Parses filters with `parse_one(index, key, value)`, reporting every
    /// bad one (and too many of them) in `violations`.
    pub fn parse(
        pairs: &[(String, String)],
        violations: &mut Vec<FieldViolation>,
        parse_one: impl Fn(usize, &str, &str) -> Result<P, FieldViolation>,
    ) -> Self {
        let mut out = FilterGroups::default();
        if pairs.len() > MAX_FILTERS {
            violations.push(FieldViolation::new(
                "Filters",
                format!("at most {MAX_FILTERS} filters; got {}", pairs.len()),
            ));
            return out;
        }
        for (i, (key, value)) in pairs.iter().enumerate() {
            match parse_one(i, key, value) {
                Ok(p) => match out.groups.iter_mut().find(|(k, _)| k == key) {
                    Some((_, group)) => group.push(p),
                    None => out.groups.push((key.clone(), vec![p])),
                },
                Err(v) => violations.push(v),
            }
        }
        out
    }

    /// Whether every group has a predicate that `test` accepts.
    pub fn matches(&self, test: impl Fn(&P) -> bool) -> bool {
        self.groups.iter().all(|(_, group)| group.iter().any(&test))
    }
}

/// The tag key of a `tag:KEY` filter key, if it is one.
pub fn tag_key(key: &str) -> Option<&str> {
    key.strip_prefix("tag:").filter(|k| !k.is_empty())
}

/// DescribeServers filters.
#[derive(Debug, Clone, Default)]
pub struct Filters(FilterGroups<Predicate>);

impl Filters {
    /// Parses filters, reporting every bad one.
    pub fn parse(pairs: &[(String, String)], violations: &mut Vec<FieldViolation>) -> Self {
        Filters(FilterGroups::parse(pairs, violations, |i, key, value| {
            let bad = |what: &str| FieldViolation::new(format!("Filters[{i}].Value"), what);
            match key {
                "availability" => match value {
                    "AVAILABLE" => Ok(Predicate::Available(true)),
                    "UNAVAILABLE" => Ok(Predicate::Available(false)),
                    _ => Err(bad("availability is AVAILABLE or UNAVAILABLE")),
                },
                "unavailability-reason" => Reason::parse(value).map(Predicate::Reason).ok_or_else(|| {
                    bad("unavailability-reason is one of SERVER_CLOSED, UNREACHABLE_AGENT, UNHEALTHY_DCV_SERVER, EXISTING_LOGGED_IN_USER, SERVER_FULL")
                }),
                "closed" => match value {
                    "true" => Ok(Predicate::Closed(true)),
                    "false" => Ok(Predicate::Closed(false)),
                    _ => Err(bad("closed is true or false")),
                },
                "os-family" => OsFamily::parse(value)
                    .map(Predicate::OsFamily)
                    .ok_or_else(|| bad("os-family is windows, linux or macos")),
                _ => match tag_key(key) {
                    Some(tag) => Ok(Predicate::Tag(tag.to_string(), value.to_string())),
                    None => Err(FieldViolation::new(
                        format!("Filters[{i}].Key"),
                        "unknown filter key; use availability, unavailability-reason, closed, os-family or tag:KEY",
                    )),
                },
            }
        }))
    }

    /// Whether `server`, with these availability reasons, passes.
    pub fn matches(&self, server: &ServerRecord, reasons: Reasons) -> bool {
        self.0.matches(|p| p.matches(server, reasons))
    }
}

/// The records of `map` in the order of `order`, after the id `after`:
/// the whole listing, or only `ids` (sorted) when given.
pub fn walk<'a, V, S: std::hash::BuildHasher>(
    order: &'a BTreeSet<Arc<str>>,
    map: &'a HashMap<Arc<str>, V, S>,
    ids: Option<&'a [String]>,
    after: Option<&str>,
) -> Box<dyn Iterator<Item = &'a V> + 'a> {
    match ids {
        None => {
            let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
            Box::new(
                order
                    .range::<str, _>((lower, Bound::Unbounded))
                    .filter_map(|id| map.get(id)),
            )
        }
        Some(ids) => {
            let start = after.map_or(0, |a| ids.partition_point(|id| id.as_str() <= a));
            Box::new(ids[start..].iter().filter_map(|id| map.get(id.as_str())))
        }
    }
}

/// A validated query, ready to run.
#[derive(Debug, Clone)]
pub struct ValidQuery {
    /// Sorted, deduplicated ids; `None` for the whole fleet.
    pub ids: Option<Vec<String>>,
    /// Page size.
    pub page_size: usize,
    /// Filters.
    pub filters: Filters,
}

/// The page size a request asks for, `MaxResults` 1 to 1000 or the
/// default 1000.
pub fn page_size(max_results: Option<i32>, violations: &mut Vec<FieldViolation>) -> usize {
    match max_results {
        None => MAX_PAGE_SIZE,
        Some(n) if (1..=MAX_PAGE_SIZE as i32).contains(&n) => n as usize,
        Some(n) => {
            violations.push(FieldViolation::new(
                "MaxResults",
                format!("must be 1 to {MAX_PAGE_SIZE}; got {n}"),
            ));
            MAX_PAGE_SIZE
        }
    }
}

/// Checks a list of ids to describe (`ServerIds`, `SessionIds`) and
/// returns them sorted and deduplicated, or `None` when empty (all).
pub fn id_list(
    field: &str,
    ids: &[String],
    check: impl Fn(&str) -> Result<(), String>,
    violations: &mut Vec<FieldViolation>,
) -> Option<Vec<String>> {
    if ids.len() > MAX_DESCRIBE_IDS {
        violations.push(FieldViolation::new(
            field,
            format!("at most {MAX_DESCRIBE_IDS} ids; got {}", ids.len()),
        ));
        return None;
    }
    for (i, id) in ids.iter().enumerate() {
        if let Err(why) = check(id) {
            violations.push(FieldViolation::new(format!("{field}[{i}]"), why));
        }
    }
    (!ids.is_empty()).then(|| {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        ids
    })
}

/// What a page token is bound to: the kind of listing, the ids asked for
/// and the filters, in a canonical order (so the same query in another
/// order keeps its tokens valid).
pub fn query_fingerprint(
    listing: &str,
    ids: Option<&[String]>,
    filters: &[(String, String)],
) -> super::page_token::Fingerprint {
    // Counts and length-prefixed parts keep the encoding unambiguous.
    let mut pairs: Vec<&(String, String)> = filters.iter().collect();
    pairs.sort_unstable();
    let id_count = ids.map_or(0, <[String]>::len).to_string();
    let pair_count = pairs.len().to_string();
    super::page_token::fingerprint(
        [listing, id_count.as_str()]
            .into_iter()
            .chain(ids.into_iter().flatten().map(String::as_str))
            .chain([pair_count.as_str()])
            .chain(pairs.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()])),
    )
}

/// Validates a query (the token is checked separately, against
/// [`query_fingerprint`]).
pub fn validate(query: &DescribeQuery) -> Result<ValidQuery, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    let page_size = page_size(query.max_results, &mut violations);
    let ids = id_list(
        "ServerIds",
        &query.server_ids,
        validate_server_id,
        &mut violations,
    );
    let filters = Filters::parse(&query.filters, &mut violations);
    if !violations.is_empty() {
        return Err(violations);
    }
    Ok(ValidQuery {
        ids,
        page_size,
        filters,
    })
}

/// Hands the first `page_size` items to `visit` and returns the key of the
/// last one when another item follows (the next page starts after it). A
/// walk never ends on an empty page it could have avoided.
pub fn paginate<T, K>(
    mut items: impl Iterator<Item = T>,
    page_size: usize,
    key: impl Fn(&T) -> K,
    mut visit: impl FnMut(T),
) -> Option<K> {
    let mut last = None;
    for item in items.by_ref().take(page_size) {
        last = Some(key(&item));
        visit(item);
    }
    if items.next().is_some() { last } else { None }
}

/// One DescribeSessions (and WatchSessions) filter predicate.
#[derive(Debug, Clone)]
pub enum SessionPredicate {
    /// `owner`.
    Owner(String),
    /// `tag:KEY` of the session's server.
    Tag(String, String),
    /// `state`, as shown.
    State(SessionState),
}

fn parse_state(s: &str) -> Option<SessionState> {
    Some(match s {
        "CREATING" => SessionState::Creating,
        "READY" => SessionState::Ready,
        "DELETING" => SessionState::Deleting,
        "DELETED" => SessionState::Deleted,
        "UNKNOWN" => SessionState::Unknown,
        _ => return None,
    })
}

pub(in crate::fleet) fn parse_session_filters(
    pairs: &[(String, String)],
    violations: &mut Vec<FieldViolation>,
) -> FilterGroups<SessionPredicate> {
    FilterGroups::parse(pairs, violations, |i, key, value| match key {
        "owner" => Ok(SessionPredicate::Owner(value.to_string())),
        "state" => parse_state(value)
            .map(SessionPredicate::State)
            .ok_or_else(|| {
                FieldViolation::new(
                    format!("Filters[{i}].Value"),
                    "state is CREATING, READY, DELETING, DELETED or UNKNOWN",
                )
            }),
        _ => match tag_key(key) {
            Some(tag) => Ok(SessionPredicate::Tag(tag.to_string(), value.to_string())),
            None => Err(FieldViolation::new(
                format!("Filters[{i}].Key"),
                "unknown filter key; use owner, state or tag:KEY",
            )),
        },
    })
}

pub(in crate::fleet) fn session_matches(p: &SessionPredicate, view: &SessionView<'_>) -> bool {
    match p {
        SessionPredicate::Owner(o) => view.record.owner == *o,
        SessionPredicate::State(s) => view.shown_state() == *s,
        SessionPredicate::Tag(k, v) => view
            .server
            .and_then(|s| s.tag(k))
            .is_some_and(|got| got == v.as_str()),
    }
}
