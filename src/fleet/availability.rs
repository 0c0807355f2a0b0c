//! Computes whether a server can take a new session, and every reason it
//! cannot. Availability is never stored: it is derived on demand from the
//! holds, the heartbeat age and the last report, so it cannot go stale.

use std::time::Duration;

use tokio::time::Instant;

use super::model::{OsFamily, ServerRecord};

/// A reason a server cannot take a new session. The declaration order is
/// the precedence order DescribeServers uses for `UnavailabilityReason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// An operator closed it.
    ServerClosed,
    /// Its agent has not been heard from in time (or deregistered).
    UnreachableAgent,
    /// Its agent cannot reach the DCV server.
    UnhealthyDcvServer,
    /// A user is logged in on a Windows host outside DCV.
    ExistingLoggedInUser,
    /// It has no room for another session.
    ServerFull,
}

impl Reason {
    /// Every reason, in precedence order.
    pub const ALL: [Reason; 5] = [
        Reason::ServerClosed,
        Reason::UnreachableAgent,
        Reason::UnhealthyDcvServer,
        Reason::ExistingLoggedInUser,
        Reason::ServerFull,
    ];

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// DCV's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ServerClosed => "SERVER_CLOSED",
            Reason::UnreachableAgent => "UNREACHABLE_AGENT",
            Reason::UnhealthyDcvServer => "UNHEALTHY_DCV_SERVER",
            Reason::ExistingLoggedInUser => "EXISTING_LOGGED_IN_USER",
            Reason::ServerFull => "SERVER_FULL",
        }
    }

    /// Parses DCV's wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// The set of reasons that apply to a server; empty means AVAILABLE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reasons(u8);

impl Reasons {
    /// Whether no reason applies.
    pub fn is_available(self) -> bool {
        self.0 == 0
    }

    /// Whether `reason` applies.
    pub fn contains(self, reason: Reason) -> bool {
        self.0 & reason.bit() != 0
    }

    /// The reason DCV would show: the first by precedence.
    pub fn primary(self) -> Option<Reason> {
        self.iter().next()
    }

    /// Every reason that applies, in precedence order.
    pub fn iter(self) -> impl Iterator<Item = Reason> {
        Reason::ALL.into_iter().filter(move |r| self.contains(*r))
    }

    /// The same reasons but `reason`.
    pub fn without(self, reason: Reason) -> Reasons {
        Reasons(self.0 & !reason.bit())
    }

    fn insert(&mut self, reason: Reason) {
        self.0 |= reason.bit();
    }
}

/// Whether a server with these live session counts has room for one more.
/// A console session fills a server; otherwise only Linux runs virtual
/// sessions, up to its `max_virtual_sessions`. An empty server always has
/// room (for a console session at least).
pub fn is_full(family: OsFamily, consoles: u32, virtuals: u32, max_virtual: u32) -> bool {
    if consoles + virtuals == 0 {
        return false;
    }
    !(family == OsFamily::Linux && consoles == 0 && virtuals < max_virtual)
}

/// Every reason `server` cannot take a new session at `now`.
pub fn reasons(server: &ServerRecord, now: Instant, unreachable_after: Duration) -> Reasons {
    let mut out = Reasons::default();
    if server.is_closed() {
        out.insert(Reason::ServerClosed);
    }
    if server.agent_departed || now.saturating_duration_since(server.last_seen) > unreachable_after
    {
        out.insert(Reason::UnreachableAgent);
    }
    if !server.dcv_server_healthy {
        out.insert(Reason::UnhealthyDcvServer);
    }
    let (consoles, virtuals) = server.session_counts();
    let family = server.description.host.os.family;
    if family == OsFamily::Windows && consoles == 0 && !server.logged_in_users.is_empty() {
        out.insert(Reason::ExistingLoggedInUser);
    }
    if is_full(
        family,
        consoles,
        virtuals,
        server.description.max_virtual_sessions,
    ) {
        out.insert(Reason::ServerFull);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fullness_follows_dcv_capacity_rules() {
        assert!(!is_full(OsFamily::Windows, 0, 0, 0));
        assert!(is_full(OsFamily::Windows, 1, 0, 0));
        assert!(is_full(OsFamily::Linux, 1, 0, 10));
        assert!(!is_full(OsFamily::Linux, 0, 9, 10));
        assert!(is_full(OsFamily::Linux, 0, 10, 10));
        assert!(is_full(OsFamily::Macos, 1, 0, 0));
    }

    #[test]
    fn primary_reason_follows_precedence() {
        let mut r = Reasons::default();
        r.insert(Reason::ServerFull);
        r.insert(Reason::UnreachableAgent);
        assert_eq!(r.primary(), Some(Reason::UnreachableAgent));
        assert_eq!(
            r.iter().collect::<Vec<_>>(),
            vec![Reason::UnreachableAgent, Reason::ServerFull]
        );
        assert!(!r.is_available());
        assert!(Reasons::default().is_available());
        for reason in Reason::ALL {
            assert_eq!(Reason::parse(reason.as_str()), Some(reason));
        }
    }
}
