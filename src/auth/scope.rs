//! Scopes: what a client may do, one per kind of caller, named as they
//! appear in tokens and on the command line.

use std::fmt;

/// One permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// DescribeServers, DescribeServerHistory, WatchServers and
    /// DescribeSessions.
    Read,
    /// CloseServers and OpenServers.
    OperateServers,
    /// Create, delete and connect to sessions, and change their
    /// permissions.
    ManageSessions,
    /// Act as a DCV server's agent.
    Agent,
}

impl Scope {
    /// Every scope, in the order they are shown.
    pub const ALL: [Scope; 4] = [
        Scope::Read,
        Scope::OperateServers,
        Scope::ManageSessions,
        Scope::Agent,
    ];

    /// The name in tokens and flags.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::OperateServers => "servers:operate",
            Scope::ManageSessions => "sessions:manage",
            Scope::Agent => "agent",
        }
    }

    /// The scope called `name`.
    pub fn from_name(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.name() == name)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A scope name that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?} (the scopes are {all})", all = ScopeSet::ALL)]
pub struct UnknownScope(pub String);

/// A set of scopes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ScopeSet(u8);

impl ScopeSet {
    /// No scope.
    pub const EMPTY: ScopeSet = ScopeSet(0);
    /// Every scope.
    pub const ALL: ScopeSet = ScopeSet(0b1111);
    /// What a DCV Session Manager API client may do: every scope but
    /// `agent` (DCV's API clients call every REST operation; acting for a
    /// DCV server is its agents' business, with their own credentials).
    /// `register-api-client` grants this set.
    pub const DCV_API_CLIENT: ScopeSet = ScopeSet(0b0111);

    /// Whether it holds `scope`.
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// Whether it is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The scopes in both.
    #[must_use]
    pub fn intersection(self, other: ScopeSet) -> ScopeSet {
        ScopeSet(self.0 & other.0)
    }

    /// The scopes in `self` and not in `other`.
    #[must_use]
    pub fn difference(self, other: ScopeSet) -> ScopeSet {
        ScopeSet(self.0 & !other.0)
    }

    /// Its scopes, in [`Scope::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }

    /// Its scopes' names.
    pub fn names(self) -> Vec<String> {
        self.iter().map(|s| s.name().to_owned()).collect()
    }

    /// Parses a list of scope names separated by spaces or commas (as in
    /// OAuth's `scope` parameter and our flags).
    pub fn parse(text: &str) -> Result<ScopeSet, UnknownScope> {
        text.split([' ', ','])
            .filter(|s| !s.is_empty())
            .try_fold(ScopeSet::EMPTY, |set, name| {
                Scope::from_name(name)
                    .map(|s| set | s)
                    .ok_or_else(|| UnknownScope(name.to_owned()))
            })
    }

    /// The scopes among stored names; names this build does not know
    /// grant nothing.
    pub fn parse_names(names: &[String]) -> ScopeSet {
        names
            .iter()
            .filter_map(|n| Scope::from_name(n))
            .fold(ScopeSet::EMPTY, |set, s| set | s)
    }
}

impl From<Scope> for ScopeSet {
    fn from(scope: Scope) -> Self {
        ScopeSet(scope.bit())
    }
}

impl std::ops::BitOr<Scope> for ScopeSet {
    type Output = ScopeSet;

    fn bitor(self, scope: Scope) -> ScopeSet {
        ScopeSet(self.0 | scope.bit())
    }
}

impl fmt::Display for ScopeSet {
    /// Space-separated names, as in OAuth's `scope`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, scope) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(scope.name())?;
        }
        Ok(())
    }
}

impl fmt::Debug for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScopeSet({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for scope in Scope::ALL {
            assert_eq!(Scope::from_name(scope.name()), Some(scope));
        }
        let set = ScopeSet::parse("read, agent").unwrap();
        assert_eq!(set.to_string(), "read agent");
        assert_eq!(ScopeSet::parse(&set.to_string()).unwrap(), set);
        assert_eq!(
            ScopeSet::parse(&ScopeSet::ALL.to_string()).unwrap(),
            ScopeSet::ALL
        );
        assert_eq!(
            ScopeSet::parse("read admin"),
            Err(UnknownScope("admin".into()))
        );
        assert_eq!(ScopeSet::parse("").unwrap(), ScopeSet::EMPTY);
    }

    #[test]
    fn a_dcv_api_client_may_do_everything_but_act_as_an_agent() {
        assert_eq!(
            ScopeSet::DCV_API_CLIENT,
            ScopeSet::ALL.difference(ScopeSet::from(Scope::Agent))
        );
    }

    #[test]
    fn set_operations() {
        let rw = ScopeSet::from(Scope::Read) | Scope::OperateServers;
        let agent = ScopeSet::from(Scope::Agent);
        assert!(rw.contains(Scope::Read) && !rw.contains(Scope::Agent));
        assert_eq!(rw.intersection(agent), ScopeSet::EMPTY);
        assert_eq!(
            rw.difference(ScopeSet::from(Scope::Read)),
            ScopeSet::from(Scope::OperateServers)
        );
        assert_eq!(
            ScopeSet::parse_names(&["read".into(), "future:scope".into()]),
            ScopeSet::from(Scope::Read)
        );
    }
}
