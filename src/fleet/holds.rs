//! Named holds: their names and expiries, the versions that change with
//! them, the timed end of expiring holds, and operators' capacity floors.
//!
//! Expiry runs on the broker's clock, which is the wall clock at the
//! fleet's start advanced by tokio's monotonic clock: a hold ends exactly
//! when tokio's clock says (tests on a paused clock see exact timing), a
//! wall-clock step does not end holds early, and an expiry is stored as a
//! wall time so that it survives restarts. Like session deadlines, due
//! expiries are processed by the first operation at or after them and by
//! the periodic sweep: no background timer per hold.

use std::{
    collections::BTreeSet,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::model::{Hold, ServerId, ServerRecord};

/// The longest hold name, in bytes.
pub const MAX_HOLD_NAME_BYTES: usize = 64;

/// The most holds one server may carry: bounds what a describe, a store
/// row set and a HOLDS_REMAIN reason hold per server.
pub const MAX_HOLDS_PER_SERVER: usize = 16;

/// The longest a hold may last from its placing.
pub const MAX_HOLD_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// The actor of the audit records of what the broker does by itself
/// (holds that expire, servers it forgets).
pub const BROKER_ACTOR: &str = "broker";

/// The default hold's name, shared: a DCV-style close allocates nothing
/// for it.
pub(in crate::fleet) fn default_name() -> Arc<str> {
    shared_default_name().clone()
}

/// The one shared copy of the default hold's name. Borrowed to compare
/// with: a clone would be two atomic operations per hold looked at.
fn shared_default_name() -> &'static Arc<str> {
    static NAME: OnceLock<Arc<str>> = OnceLock::new();
    NAME.get_or_init(|| Arc::from(super::model::DEFAULT_HOLD_NAME))
}

/// Whether `hold` is the one `name` names (empty: the default hold). The
/// default hold's name is usually the shared one: compared by address
/// first.
#[inline]
pub(in crate::fleet) fn is_named(hold: &Hold, name: &str) -> bool {
    if name.is_empty() {
        Arc::ptr_eq(&hold.name, shared_default_name())
            || &*hold.name == super::model::DEFAULT_HOLD_NAME
    } else {
        &*hold.name == name
    }
}

/// Whether `name` may name a hold: 1 to 64 characters of ASCII letters,
/// digits and `.`, `_`, `-`, `:`, `@` (readable in a table, safe in logs,
/// and enough for `team:ticket-123` or `alice@example`).
pub fn validate_hold_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_HOLD_NAME_BYTES {
        return Err(format!(
            "HoldName must be 1 to {MAX_HOLD_NAME_BYTES} characters long."
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-_:@".contains(&b))
    {
        return Err(
            "HoldName may hold only ASCII letters, digits and the characters . _ - : @".into(),
        );
    }
    Ok(())
}

/// When a hold asked for ends.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Expiry {
    /// Never by itself.
    #[default]
    Never,
    /// At this wall time.
    At(SystemTime),
    /// This long after it is placed.
    In(Duration),
    /// The request's expiry cannot be used, for this reason.
    Malformed(String),
}

impl Expiry {
    /// The wall time a hold placed at `now_wall` (the broker's clock) ends,
    /// or why the expiry cannot be used. At the stores' precision
    /// (microseconds, rounded down), so that the expiry a broker shows and
    /// acts on is the one it shows after a restart and its replicas show.
    pub fn resolve(&self, now_wall: SystemTime) -> Result<Option<SystemTime>, String> {
        Ok(self.resolve_exactly(now_wall)?.map(to_micros))
    }

    fn resolve_exactly(&self, now_wall: SystemTime) -> Result<Option<SystemTime>, String> {
        match *self {
            Expiry::Never => Ok(None),
            Expiry::Malformed(ref why) => Err(why.clone()),
            Expiry::In(d) if d.is_zero() => Err("ExpiresIn must be positive.".into()),
            Expiry::In(d) if d > MAX_HOLD_DURATION => {
                Err("ExpiresIn must be at most 366 days.".into())
            }
            Expiry::In(d) => Ok(Some(now_wall + d)),
            Expiry::At(at) if at <= now_wall => Err("ExpiresAt must be in the future.".into()),
            Expiry::At(at)
                if at.duration_since(now_wall).unwrap_or_default() > MAX_HOLD_DURATION =>
            {
                Err("ExpiresAt must be at most 366 days from now.".into())
            }
            Expiry::At(at) => Ok(Some(at)),
        }
    }
}

/// `t` rounded down to a whole microsecond.
fn to_micros(t: SystemTime) -> SystemTime {
    let sub_micro = |d: Duration| Duration::from_nanos(u64::from(d.subsec_nanos() % 1000));
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => t - sub_micro(after),
        Err(e) => {
            let before = sub_micro(e.duration());
            if before.is_zero() {
                t
            } else {
                t - (Duration::from_micros(1) - before)
            }
        }
    }
}

/// A pool's floor: the fewest AVAILABLE servers with tag `key` = `value`
/// that a CloseServers may leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityFloor {
    /// The tag key.
    pub key: String,
    /// The tag value.
    pub value: String,
    /// The fewest AVAILABLE servers.
    pub min_available: u32,
}

impl CapacityFloor {
    /// Parses `tag:KEY=VALUE:N`.
    pub fn parse(text: &str) -> Result<CapacityFloor, String> {
        let usage = || {
            format!("{text:?}: a capacity floor is tag:KEY=VALUE:N (for example tag:pool=gpu:5)")
        };
        let rest = text.strip_prefix("tag:").ok_or_else(usage)?;
        let (pool, n) = rest.rsplit_once(':').ok_or_else(usage)?;
        let (key, value) = pool.split_once('=').ok_or_else(usage)?;
        let min_available = n.parse::<u32>().map_err(|_| usage())?;
        if key.is_empty() {
            return Err(usage());
        }
        Ok(CapacityFloor {
            key: key.to_owned(),
            value: value.to_owned(),
            min_available,
        })
    }

    /// Whether `server` is in this floor's pool.
    pub fn covers(&self, server: &ServerRecord) -> bool {
        server.tag(&self.key).is_some_and(|v| v == self.value)
    }

    /// The pool's name, as failure reasons print it.
    pub fn pool(&self) -> String {
        format!("tag:{}={}", self.key, self.value)
    }
}

/// Timed holds: the broker's clock and the expiries to process, earliest
/// first. An entry whose hold is gone or changed is skipped when due.
#[derive(Debug, Default)]
pub(in crate::fleet) struct HoldExpiries {
    /// The broker clock's origin, taken at first use.
    anchor: OnceLock<(Instant, SystemTime)>,
    /// (expiry, server, hold name).
    pub(in crate::fleet) due: BTreeSet<(SystemTime, ServerId, Arc<str>)>,
}

impl HoldExpiries {
    /// The broker's wall clock at `now`.
    pub(in crate::fleet) fn wall(&self, now: Instant) -> SystemTime {
        let (i, w) = *self.anchor.get_or_init(|| (now, SystemTime::now()));
        w + now.saturating_duration_since(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_parse_and_refuse() {
        let f = CapacityFloor::parse("tag:pool=gpu:5").unwrap();
        assert_eq!(
            (f.key.as_str(), f.value.as_str(), f.min_available),
            ("pool", "gpu", 5)
        );
        let f = CapacityFloor::parse("tag:a:b=c:d:2").unwrap();
        assert_eq!((f.key.as_str(), f.value.as_str()), ("a:b", "c:d"));
        for bad in [
            "pool=gpu:5",
            "tag:pool=gpu",
            "tag:=gpu:1",
            "tag:poolgpu:1",
            "tag:p=g:-1",
        ] {
            assert!(CapacityFloor::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hold_names_are_bounded_and_plain() {
        assert!(validate_hold_name("team:ticket-12_a.b@x").is_ok());
        assert!(validate_hold_name("").is_err());
        assert!(validate_hold_name(&"a".repeat(65)).is_err());
        assert!(validate_hold_name("a b").is_err());
        assert!(validate_hold_name("é").is_err());
    }

    #[test]
    fn expiries_are_kept_at_the_stores_precision() {
        let now = SystemTime::UNIX_EPOCH + Duration::new(1_000_000_000, 123_456_789);
        assert_eq!(
            Expiry::In(Duration::from_secs(60)).resolve(now),
            Ok(Some(
                SystemTime::UNIX_EPOCH + Duration::new(1_000_000_060, 123_456_000)
            ))
        );
        let at = now + Duration::from_nanos(5_000_999);
        assert_eq!(
            Expiry::At(at).resolve(now),
            Ok(Some(
                SystemTime::UNIX_EPOCH + Duration::new(1_000_000_000, 128_457_000)
            ))
        );
        let before_epoch = SystemTime::UNIX_EPOCH - Duration::from_nanos(1_500);
        assert_eq!(
            to_micros(before_epoch),
            SystemTime::UNIX_EPOCH - Duration::from_micros(2)
        );
        assert_eq!(to_micros(SystemTime::UNIX_EPOCH), SystemTime::UNIX_EPOCH);
    }

    #[test]
    fn expiries_must_lie_ahead_within_a_year() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(Expiry::Never.resolve(now), Ok(None));
        assert_eq!(
            Expiry::In(Duration::from_secs(60)).resolve(now),
            Ok(Some(now + Duration::from_secs(60)))
        );
        assert!(Expiry::In(Duration::ZERO).resolve(now).is_err());
        assert!(Expiry::In(MAX_HOLD_DURATION * 2).resolve(now).is_err());
        assert!(Expiry::At(now).resolve(now).is_err());
        assert!(
            Expiry::At(now + MAX_HOLD_DURATION * 2)
                .resolve(now)
                .is_err()
        );
    }
}
