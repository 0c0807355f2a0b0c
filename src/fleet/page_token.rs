//! Opaque DescribeServers page tokens.
//!
//! A token names the last server id of the page it ends (pages are in id
//! order, so resuming "after this id" neither repeats nor skips a server
//! that existed throughout the walk, however the fleet changes between
//! pages). It also carries when it was issued and a fingerprint of the
//! query it belongs to, and is signed with a key the broker keeps in its
//! store (so tokens survive a restart), so a forged, corrupted, expired or
//! mismatched token is told apart from a good one and rejected with a
//! precise message.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit, Mac};
use parking_lot::RwLock;
use sha2::{Digest, Sha256};

const VERSION: u8 = 1;
const MAC_BYTES: usize = 16;
const FINGERPRINT_BYTES: usize = 8;
/// version, issued-at seconds, fingerprint.
const HEADER_BYTES: usize = 1 + 8 + FINGERPRINT_BYTES;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token this broker issued: garbage, edited, or signed with
    /// another key (the key is stored, so tokens survive a restart, except
    /// a broker's that keeps nothing: `--in-memory`).
    #[error(
        "is not a token this broker issued (corrupted or forged, or issued before an --in-memory broker restarted)"
    )]
    Invalid,
    /// Issued too long ago.
    #[error("has expired; start again without NextToken")]
    Expired,
    /// Issued for other ServerIds or Filters.
    #[error("was issued for different ServerIds or Filters")]
    WrongQuery,
}

/// Signs and checks page tokens with the store's key (per process with --in-memory/--demo-fleet).
#[derive(Clone)]
pub struct PageTokens {
    /// Shared by the fleet's clones and swapped in place when a replica
    /// reloads or applies a new stored key: one uncontended read lock per
    /// token, nothing on the paths that issue none.
    key: Arc<RwLock<[u8; 32]>>,
    ttl: Duration,
}

impl std::fmt::Debug for PageTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageTokens")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// A digest of the parts of a query a token is bound to.
pub type Fingerprint = [u8; FINGERPRINT_BYTES];

/// Fingerprints a query from its canonical parts (callers sort them, so
/// that the same query in another order keeps its tokens valid).
pub fn fingerprint<'a>(parts: impl IntoIterator<Item = &'a str>) -> Fingerprint {
    let mut h = Sha256::new();
    for p in parts {
        // Length-prefixed, so that ["ab","c"] and ["a","bc"] differ.
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    let digest = h.finalize();
    let mut out = [0u8; FINGERPRINT_BYTES];
    out.copy_from_slice(&digest[..FINGERPRINT_BYTES]);
    out
}

impl PageTokens {
    /// A signer with a fresh random key; tokens live for `ttl`.
    pub fn random(ttl: Duration) -> Result<Self, getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        Ok(PageTokens::with_key(key, ttl))
    }

    /// Tokens under a given key (the stored one, so that tokens survive a
    /// restart).
    pub fn with_key(key: [u8; 32], ttl: Duration) -> Self {
        PageTokens {
            key: Arc::new(RwLock::new(key)),
            ttl,
        }
    }

    /// Signs and checks with `key` from now on, in every clone (another
    /// replica's tokens, signed with the same shared key, are then good
    /// here too).
    pub fn set_key(&self, key: [u8; 32]) {
        *self.key.write() = key;
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail.
        <Hmac<Sha256> as KeyInit>::new_from_slice(&*self.key.read())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"))
    }

    /// A token meaning "continue after `last_id`" for the query `query`.
    pub fn issue(&self, query: &Fingerprint, last_id: &str, now: SystemTime) -> String {
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut buf = Vec::with_capacity(HEADER_BYTES + last_id.len() + MAC_BYTES);
        buf.push(VERSION);
        buf.extend_from_slice(&secs.to_be_bytes());
        buf.extend_from_slice(query);
        buf.extend_from_slice(last_id.as_bytes());
        let tag = self.mac().chain_update(&buf).finalize().into_bytes();
        buf.extend_from_slice(&tag[..MAC_BYTES]);
        URL_SAFE_NO_PAD.encode(buf)
    }

    /// The server id a token continues after, if the token is genuine,
    /// fresh and issued for `query`.
    pub fn check(
        &self,
        token: &str,
        query: &Fingerprint,
        now: SystemTime,
    ) -> Result<String, TokenError> {
        let raw = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Invalid)?;
        if raw.len() < HEADER_BYTES + MAC_BYTES {
            return Err(TokenError::Invalid);
        }
        let (body, tag) = raw.split_at(raw.len() - MAC_BYTES);
        self.mac()
            .chain_update(body)
            .verify_truncated_left(tag)
            .map_err(|_| TokenError::Invalid)?;
        if body[0] != VERSION {
            return Err(TokenError::Invalid);
        }
        let mut secs = [0u8; 8];
        secs.copy_from_slice(&body[1..9]);
        let issued = UNIX_EPOCH + Duration::from_secs(u64::from_be_bytes(secs));
        if now.duration_since(issued).unwrap_or_default() > self.ttl {
            return Err(TokenError::Expired);
        }
        if &body[9..HEADER_BYTES] != query {
            return Err(TokenError::WrongQuery);
        }
        String::from_utf8(body[HEADER_BYTES..].to_vec()).map_err(|_| TokenError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> PageTokens {
        PageTokens::random(Duration::from_secs(60)).unwrap()
    }

    #[test]
    fn round_trip_and_rejections() {
        let s = signer();
        let q = fingerprint(["a"]);
        let now = SystemTime::now();
        let t = s.issue(&q, "server-9", now);
        assert_eq!(s.check(&t, &q, now).as_deref(), Ok("server-9"));
        assert_eq!(
            s.check(&t, &fingerprint(["b"]), now),
            Err(TokenError::WrongQuery)
        );
        assert_eq!(
            s.check(&t, &q, now + Duration::from_secs(61)),
            Err(TokenError::Expired)
        );
        assert_eq!(signer().check(&t, &q, now), Err(TokenError::Invalid));
        assert_eq!(s.check("!!!", &q, now), Err(TokenError::Invalid));
        assert_eq!(s.check("", &q, now), Err(TokenError::Invalid));
        // Flip one character of a genuine token.
        let mut forged = t.into_bytes();
        forged[5] = if forged[5] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert_eq!(s.check(&forged, &q, now), Err(TokenError::Invalid));
    }

    #[test]
    fn fingerprint_is_length_prefixed() {
        assert_ne!(fingerprint(["ab", "c"]), fingerprint(["a", "bc"]));
    }
}
