//! Idempotent retries: the table of `ClientToken`s (AWS's convention) and
//! the first reply each one got.
//!
//! A caller that sends a mutating call with a token and loses the reply
//! (a timeout, a dropped connection) sends the same call again with the
//! same token and gets the first reply back, byte for byte, without
//! anything being applied twice. A record is keyed by the caller (the
//! authenticated client id), the method and the token, and remembers a
//! hash of the request (the API computes it: this module never sees a
//! protobuf message) and the encoded reply. It lives for the retention
//! (`--client-token-retention`, 24 hours by default) by tokio's clock, so
//! tests can pause and advance it; durably in the store, reloaded at start
//! and by a new leader.
//!
//! The table is bounded: at most `--client-token-limit` records (100,000
//! by default) and [`MAX_REPLY_BYTES`] of replies. A new token beyond
//! either is refused (RESOURCE_EXHAUSTED) rather than evicting a live
//! record: evicting one would silently turn a retry its caller believes
//! safe into a second application.
//!
//! The table has its own lock, beside the fleet's: a claim is a hash-map
//! lookup and never waits for the fleet, and the fleet's lock is never
//! taken while this one is held.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, SystemTime},
};

use parking_lot::Mutex;
use tokio::time::Instant;

use super::{
    error::FleetError,
    persist::{self, StoredClientToken},
};

/// How long a token's record is kept by default (`--client-token-retention`).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// How many records are kept at most by default (`--client-token-limit`).
pub const DEFAULT_LIMIT: usize = 100_000;

/// The most bytes of replies the table holds (256 MiB): a CreateSessions
/// reply of 1,000 sessions is about a megabyte, a CloseServers reply of
/// one server a hundred bytes, so a count alone would not bound memory. A
/// new token is refused past it; replies of calls already running may
/// pass it by their own size.
pub const MAX_REPLY_BYTES: usize = 256 << 20;

/// The longest token, in characters (AWS's limit).
pub const MAX_TOKEN_CHARS: usize = 64;

/// The field violations name.
pub const FIELD: &str = "ClientToken";

/// Why the same token cannot be used for another request.
pub const DIFFERENT_REQUEST: &str = "this ClientToken was used with a different request by the same \
     caller within the retention window; a token names one request: send the same request again \
     to get its reply, or use a new token for a new request";

/// Why a retry is refused when the broker stopped while the first call
/// with its token ran (FAILED_PRECONDITION).
pub const OUTCOME_UNKNOWN: &str = "the broker stopped while the first call with this ClientToken \
     ran, so it may or may not have been applied and its reply was not kept; describe the \
     servers or sessions it names to see what it did, then send what is still needed with a new \
     ClientToken";

/// The most stored records one prune removes (as the audit log's).
pub const PRUNE_BATCH: i64 = 10_000;

/// Checks a token's form: 1 to [`MAX_TOKEN_CHARS`] printable ASCII
/// characters (0x20 to 0x7E). The empty token means "no token" and is
/// not checked here.
pub fn validate_token(token: &str) -> Result<(), FleetError> {
    if token.len() > MAX_TOKEN_CHARS {
        return Err(FleetError::invalid(
            FIELD,
            format!(
                "is {} bytes long; a ClientToken is 1 to {MAX_TOKEN_CHARS} printable ASCII characters",
                token.len()
            ),
        ));
    }
    if let Some(bad) = token.bytes().find(|b| !(0x20..=0x7e).contains(b)) {
        return Err(FleetError::invalid(
            FIELD,
            format!(
                "holds the byte 0x{bad:02X}; a ClientToken is 1 to {MAX_TOKEN_CHARS} printable \
                 ASCII characters (0x20 to 0x7E)"
            ),
        ));
    }
    Ok(())
}

/// Whose token, for which method: the scope of a token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    /// The caller: the authenticated client id, or `anonymous`.
    pub actor: String,
    /// The gRPC method (`CloseServers`), whichever API carried the call.
    pub method: String,
    /// The caller's token.
    pub token: String,
}

/// What a claim found.
#[derive(Debug)]
pub enum Claim {
    /// The token is new (or its record expired): run the call, then
    /// [`Fleet::keep_client_token`] its reply. Dropping the ticket instead
    /// (the call failed as a whole) frees the token for a retry.
    New(TokenTicket),
    /// The same request came with this token before: its reply, encoded.
    Replay(Arc<[u8]>),
}

/// The right to run a call under a token; see [`Claim::New`].
#[derive(Debug)]
pub struct TokenTicket {
    table: Arc<Mutex<Table>>,
    /// `None` once kept.
    key: Option<TokenKey>,
    serial: u64,
    request_hash: [u8; 32],
    /// When the claim's record ends if the call is abandoned.
    expires: Instant,
}

impl Drop for TokenTicket {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.table.lock().abandon(key, self.serial, self.expires);
        }
    }
}

/// The shared table: a cheap handle.
#[derive(Debug, Clone, Default)]
pub(in crate::fleet) struct ClientTokens(Arc<Mutex<Table>>);

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<TokenKey, Entry>,
    /// Kept records in expiry order (the retention is one for all, so the
    /// order they are kept in), with the serial of the entry each was:
    /// expiring is popping the front.
    expiries: VecDeque<(Instant, TokenKey, u64)>,
    /// Bytes of kept replies.
    bytes: usize,
    next_serial: u64,
    /// Stored records past the retention the store may still hold; the
    /// sweep prunes while there are.
    stale_in_store: u64,
}

#[derive(Debug)]
enum Entry {
    /// A call is running under this token.
    Running { serial: u64, request_hash: [u8; 32] },
    /// A call under this token failed as a whole: the token is free again
    /// for any request, but the claim stored for it stays until it
    /// expires, so it keeps its place in the table (and its limit) until
    /// then, and its expiry prunes the row.
    Abandoned { serial: u64 },
    /// A call ran under this token when the broker stopped (its record
    /// was stored as claimed, before the call's changes, and never got
    /// its reply): whether it was applied is unknown.
    Unknown { serial: u64, request_hash: [u8; 32] },
    /// Its reply.
    Kept {
        serial: u64,
        request_hash: [u8; 32],
        reply: Arc<[u8]>,
    },
}

impl Table {
    /// Forgets every record expired at `now`.
    fn expire(&mut self, now: Instant) {
        while let Some((at, ..)) = self.expiries.front() {
            if *at > now {
                break;
            }
            let Some((_, key, serial)) = self.expiries.pop_front() else {
                break;
            };
            let bytes =
                match self.entries.get(&key) {
                    Some(Entry::Kept {
                        serial: kept,
                        reply,
                        ..
                    }) if *kept == serial => reply.len(),
                    Some(
                        Entry::Unknown { serial: kept, .. } | Entry::Abandoned { serial: kept },
                    ) if *kept == serial => 0,
                    _ => continue,
                };
            self.bytes = self.bytes.saturating_sub(bytes);
            self.entries.remove(&key);
            self.stale_in_store += 1;
        }
    }

    fn abandon(&mut self, key: TokenKey, serial: u64, expires: Instant) {
        if let Some(Entry::Running {
            serial: running, ..
        }) = self.entries.get(&key)
            && *running == serial
        {
            self.expiries.push_back((expires, key.clone(), serial));
            self.entries.insert(key, Entry::Abandoned { serial });
        }
    }

    fn serial(&mut self) -> u64 {
        self.next_serial += 1;
        self.next_serial
    }
}

impl ClientTokens {
    /// The table of `records` (oldest first) still live at `now` / `wall`.
    pub(in crate::fleet) fn load(
        records: &[StoredClientToken],
        retention: Duration,
        now: Instant,
        wall: SystemTime,
    ) -> ClientTokens {
        let mut table = Table::default();
        let mut sorted: Vec<&StoredClientToken> = records.iter().collect();
        sorted.sort_by_key(|r| r.created_at);
        for record in sorted {
            let expires = record.created_at + retention;
            if expires <= wall {
                table.stale_in_store += 1;
                continue;
            }
            let serial = table.serial();
            let key = TokenKey {
                actor: record.actor.clone(),
                method: record.method.clone(),
                token: record.token.clone(),
            };
            table.bytes += record.reply.len();
            table.expiries.push_back((
                persist::monotonic_time(expires, now, wall),
                key.clone(),
                serial,
            ));
            // No reply: a claim whose call never finished (see
            // `ClientTokens::claimed`). A reply is never empty (every reply
            // has a RequestId).
            let entry = if record.reply.is_empty() {
                Entry::Unknown {
                    serial,
                    request_hash: record.request_hash,
                }
            } else {
                Entry::Kept {
                    serial,
                    request_hash: record.request_hash,
                    reply: Arc::from(record.reply.as_slice()),
                }
            };
            table.entries.insert(key, entry);
        }
        ClientTokens(Arc::new(Mutex::new(table)))
    }

    /// Replaces the table with `other`'s contents (a reload); tickets of
    /// calls still running find their entries gone and keep nothing.
    pub(in crate::fleet) fn replace(&self, other: ClientTokens) {
        let fresh = std::mem::take(&mut *other.0.lock());
        let old = std::mem::replace(&mut *self.0.lock(), fresh);
        drop(old);
    }

    /// How many records (running and kept) the table holds.
    pub(in crate::fleet) fn len(&self) -> usize {
        self.0.lock().entries.len()
    }

    /// See [`crate::fleet::Fleet::claim_client_token`]: the table's part,
    /// at `now`, with at most `limit` records, each kept for `retention`
    /// when its call is abandoned.
    pub(in crate::fleet) fn claim(
        &self,
        key: TokenKey,
        request_hash: [u8; 32],
        limit: usize,
        now: Instant,
        retention: Duration,
    ) -> Result<Claim, FleetError> {
        let mut table = self.0.lock();
        table.expire(now);
        let reclaimed = matches!(table.entries.get(&key), Some(Entry::Abandoned { .. }));
        match table.entries.get(&key) {
            Some(Entry::Kept {
                request_hash: first,
                reply,
                ..
            }) => {
                return if *first == request_hash {
                    Ok(Claim::Replay(reply.clone()))
                } else {
                    Err(FleetError::invalid(FIELD, DIFFERENT_REQUEST))
                };
            }
            Some(Entry::Unknown {
                request_hash: first,
                ..
            }) => {
                return if *first == request_hash {
                    Err(FleetError::FailedPrecondition(OUTCOME_UNKNOWN.into()))
                } else {
                    Err(FleetError::invalid(FIELD, DIFFERENT_REQUEST))
                };
            }
            Some(Entry::Running {
                request_hash: first,
                ..
            }) => {
                return if *first == request_hash {
                    Err(FleetError::Aborted(
                        "a call with this ClientToken is still running; retry later to get its \
                         reply (it is applied once)"
                            .into(),
                    ))
                } else {
                    Err(FleetError::invalid(FIELD, DIFFERENT_REQUEST))
                };
            }
            Some(Entry::Abandoned { .. }) | None => {}
        }
        // An abandoned claim of the same key gives its place to this one.
        if !reclaimed && table.entries.len() >= limit {
            return Err(FleetError::ResourceExhausted(format!(
                "the broker holds {limit} ClientToken records, its limit (--client-token-limit); \
                 a new token is accepted once older ones expire (--client-token-retention), or \
                 send the call without a ClientToken"
            )));
        }
        if table.bytes >= MAX_REPLY_BYTES {
            return Err(FleetError::ResourceExhausted(format!(
                "the ClientToken records' replies fill the broker's {} MiB for them; a new token \
                 is accepted once older ones expire (--client-token-retention), or send the call \
                 without a ClientToken",
                MAX_REPLY_BYTES >> 20
            )));
        }
        let serial = table.serial();
        table.entries.insert(
            key.clone(),
            Entry::Running {
                serial,
                request_hash,
            },
        );
        Ok(Claim::New(TokenTicket {
            table: self.0.clone(),
            key: Some(key),
            serial,
            request_hash,
            expires: now + retention,
        }))
    }

    /// The record to store for `ticket` as soon as it is claimed, created
    /// `created_at`: no reply yet. Stored before the call's changes (the
    /// store keeps submissions in order), it is durable whenever they are;
    /// a broker that stops before the reply is kept then knows, after a
    /// restart, that the call may have been applied (`Entry::Unknown`)
    /// rather than run it again.
    pub(in crate::fleet) fn claimed(
        ticket: &TokenTicket,
        created_at: SystemTime,
    ) -> Option<StoredClientToken> {
        let key = ticket.key.as_ref()?;
        Some(StoredClientToken {
            actor: key.actor.clone(),
            method: key.method.clone(),
            token: key.token.clone(),
            request_hash: ticket.request_hash,
            reply: Vec::new(),
            created_at,
        })
    }

    /// Keeps `reply` for `ticket`'s call until `expires`; the record to
    /// store (created `created_at`), or `None` when the ticket's entry is
    /// gone (a reload replaced the table: this broker no longer leads).
    pub(in crate::fleet) fn keep(
        mut ticket: TokenTicket,
        reply: Vec<u8>,
        expires: Instant,
        created_at: SystemTime,
    ) -> Option<StoredClientToken> {
        let key = ticket.key.take()?;
        let mut table = ticket.table.lock();
        match table.entries.get(&key) {
            Some(Entry::Running { serial, .. }) if *serial == ticket.serial => {}
            _ => return None,
        }
        let reply: Arc<[u8]> = Arc::from(reply);
        table.bytes += reply.len();
        table
            .expiries
            .push_back((expires, key.clone(), ticket.serial));
        let stored = StoredClientToken {
            actor: key.actor.clone(),
            method: key.method.clone(),
            token: key.token.clone(),
            request_hash: ticket.request_hash,
            reply: reply.to_vec(),
            created_at,
        };
        table.entries.insert(
            key,
            Entry::Kept {
                serial: ticket.serial,
                request_hash: ticket.request_hash,
                reply,
            },
        );
        Some(stored)
    }

    /// Forgets the records expired at `now`; whether the store may hold
    /// records past the retention (then a prune is due, and one is
    /// counted as done).
    pub(in crate::fleet) fn expire(&self, now: Instant) -> bool {
        let mut table = self.0.lock();
        table.expire(now);
        let stale = table.stale_in_store;
        table.stale_in_store = stale.saturating_sub(PRUNE_BATCH as u64);
        stale > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(token: &str) -> TokenKey {
        TokenKey {
            actor: "a".into(),
            method: "CloseServers".into(),
            token: token.into(),
        }
    }

    fn new(claim: Result<Claim, FleetError>) -> TokenTicket {
        match claim {
            Ok(Claim::New(ticket)) => ticket,
            other => panic!("a new token, not {other:?}"),
        }
    }

    #[test]
    fn tokens_are_printable_ascii_up_to_64() {
        assert!(validate_token("a").is_ok());
        assert!(validate_token(&"x".repeat(64)).is_ok());
        assert!(validate_token(" ~").is_ok());
        assert!(validate_token(&"x".repeat(65)).is_err());
        assert!(validate_token("tab\t").is_err());
        assert!(validate_token("é").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_reply_is_replayed_until_it_expires() {
        let tokens = ClientTokens::default();
        let now = Instant::now();
        let ticket = new(tokens.claim(key("t"), [1; 32], 10, now, DEFAULT_RETENTION));
        // Running: the same request is told to retry, another refused.
        let running = tokens
            .claim(key("t"), [1; 32], 10, now, DEFAULT_RETENTION)
            .unwrap_err();
        assert!(matches!(running, FleetError::Aborted(_)), "{running:?}");
        let other = tokens
            .claim(key("t"), [2; 32], 10, now, DEFAULT_RETENTION)
            .unwrap_err();
        assert!(matches!(other, FleetError::InvalidArgument(_)), "{other:?}");
        let expires = now + DEFAULT_RETENTION;
        let stored = ClientTokens::keep(ticket, b"reply".to_vec(), expires, SystemTime::now());
        assert_eq!(stored.map(|s| s.reply), Some(b"reply".to_vec()));
        let Ok(Claim::Replay(reply)) = tokens.claim(key("t"), [1; 32], 10, now, DEFAULT_RETENTION)
        else {
            panic!("a replay")
        };
        assert_eq!(&*reply, b"reply");
        assert!(!tokens.expire(now), "nothing stale yet");
        let ticket = new(tokens.claim(key("t"), [2; 32], 10, expires, DEFAULT_RETENTION));
        assert!(
            tokens.expire(expires),
            "the expired record is stale in the store"
        );
        drop(ticket);
        // Abandoned: its stored claim keeps a place until it expires.
        assert_eq!(tokens.len(), 1);
        assert!(tokens.expire(expires + DEFAULT_RETENTION));
        assert_eq!(tokens.len(), 0);
    }

    /// A call that failed as a whole frees its token for any request, but
    /// its stored claim holds a place in the table until the retention
    /// ends: failing calls under fresh tokens cannot grow the store past
    /// the limit.
    #[test]
    fn a_dropped_ticket_frees_its_token_but_keeps_its_place_until_it_expires() {
        let tokens = ClientTokens::default();
        let now = Instant::now();
        let ticket = new(tokens.claim(key("t"), [1; 32], 1, now, DEFAULT_RETENTION));
        let full = tokens
            .claim(key("u"), [1; 32], 1, now, DEFAULT_RETENTION)
            .unwrap_err();
        assert!(matches!(full, FleetError::ResourceExhausted(_)), "{full:?}");
        drop(ticket);
        assert_eq!(tokens.len(), 1);
        let full = tokens
            .claim(key("u"), [1; 32], 1, now, DEFAULT_RETENTION)
            .unwrap_err();
        assert!(matches!(full, FleetError::ResourceExhausted(_)), "{full:?}");
        // The same token, with another request even, takes its place.
        let again = new(tokens.claim(key("t"), [2; 32], 1, now, DEFAULT_RETENTION));
        drop(again);
        // At the end of the retention the place is free, and the stored
        // claim is to be pruned.
        let later = now + DEFAULT_RETENTION;
        assert!(tokens.expire(later));
        assert_eq!(tokens.len(), 0);
        new(tokens.claim(key("u"), [1; 32], 1, later, DEFAULT_RETENTION));
    }

    #[test]
    fn a_reloaded_table_has_the_live_records_only() {
        let wall = SystemTime::now();
        let record = |token: &str, age: Duration| StoredClientToken {
            actor: "a".into(),
            method: "CloseServers".into(),
            token: token.into(),
            request_hash: [1; 32],
            reply: b"r".to_vec(),
            created_at: wall - age,
        };
        let hour = Duration::from_secs(3600);
        let tokens = ClientTokens::load(
            &[record("live", hour), record("gone", 25 * hour)],
            DEFAULT_RETENTION,
            Instant::now(),
            wall,
        );
        assert_eq!(tokens.len(), 1);
        let now = Instant::now();
        assert!(matches!(
            tokens.claim(key("live"), [1; 32], 10, now, DEFAULT_RETENTION),
            Ok(Claim::Replay(_))
        ));
        assert!(tokens.expire(now), "the expired record is to be pruned");
    }

    #[test]
    fn a_claim_stored_without_a_reply_reloads_as_an_unknown_outcome_until_it_expires() {
        let wall = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let claimed = StoredClientToken {
            actor: "a".into(),
            method: "CloseServers".into(),
            token: "t".into(),
            request_hash: [1; 32],
            reply: Vec::new(),
            created_at: wall - hour,
        };
        let now = Instant::now();
        let tokens = ClientTokens::load(&[claimed], DEFAULT_RETENTION, now, wall);
        assert!(matches!(
            tokens.claim(key("t"), [1; 32], 10, now, DEFAULT_RETENTION),
            Err(FleetError::FailedPrecondition(m)) if m == OUTCOME_UNKNOWN
        ));
        assert!(matches!(
            tokens.claim(key("t"), [2; 32], 10, now, DEFAULT_RETENTION),
            Err(FleetError::InvalidArgument(_))
        ));
        // At the end of the retention it goes, and the token is new again.
        let later = now + DEFAULT_RETENTION;
        assert!(matches!(
            tokens.claim(key("t"), [1; 32], 10, later, DEFAULT_RETENTION),
            Ok(Claim::New(_))
        ));
    }

    #[test]
    fn a_new_claim_is_stored_without_a_reply_and_its_reply_replaces_it() {
        let tokens = ClientTokens::default();
        let ticket = new(tokens.claim(key("t"), [3; 32], 10, Instant::now(), DEFAULT_RETENTION));
        let wall = SystemTime::now();
        let claimed = ClientTokens::claimed(&ticket, wall).expect("a claim to store");
        assert_eq!(
            (claimed.token.as_str(), claimed.request_hash),
            ("t", [3; 32])
        );
        assert!(claimed.reply.is_empty());
        let kept = ClientTokens::keep(ticket, b"reply".to_vec(), Instant::now(), wall)
            .expect("a reply to store");
        assert_eq!(kept.reply, b"reply");
    }
}
