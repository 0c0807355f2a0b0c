//! Connection tokens: signed, expiring grants of one user's access to one
//! session.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit, Mac};
use parking_lot::RwLock;
use sha2::Sha256;

/// Signs connection tokens: who may connect to which session until when.
#[derive(Clone)]
pub(in crate::fleet) struct ConnectionTokens {
    /// Shared by the fleet's clones and swapped in place when a replica
    /// reloads or applies a new stored key.
    key: Arc<RwLock<[u8; 32]>>,
}

impl std::fmt::Debug for ConnectionTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionTokens").finish_non_exhaustive()
    }
}

const TOKEN_MAC_BYTES: usize = 32;

impl ConnectionTokens {
    pub(in crate::fleet) fn with_key(key: [u8; 32]) -> Self {
        ConnectionTokens {
            key: Arc::new(RwLock::new(key)),
        }
    }

    /// Signs and checks with `key` from now on, in every clone.
    pub(in crate::fleet) fn set_key(&self, key: [u8; 32]) {
        *self.key.write() = key;
    }

    pub(in crate::fleet) fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as KeyInit>::new_from_slice(&*self.key.read())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"))
    }

    /// `base64url(session \n user \n expiry) . base64url(hmac)`.
    pub(in crate::fleet) fn issue(&self, session: &str, user: &str, expires: SystemTime) -> String {
        let secs = expires
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let payload = format!("{session}\n{user}\n{secs}");
        let tag = self
            .mac()
            .chain_update(payload.as_bytes())
            .finalize()
            .into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// The (session, user) a genuine, unexpired token admits.
    pub(in crate::fleet) fn check(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<(String, String), String> {
        let (payload, tag) = token
            .split_once('.')
            .ok_or_else(|| "malformed token".to_string())?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| "malformed token".to_string())?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| "malformed token".to_string())?;
        if tag.len() != TOKEN_MAC_BYTES {
            return Err("malformed token".into());
        }
        self.mac()
            .chain_update(&payload)
            .verify_slice(&tag)
            .map_err(|_| "the token was not issued by this broker".to_string())?;
        let text = String::from_utf8(payload).map_err(|_| "malformed token".to_string())?;
        let mut parts = text.split('\n');
        let (Some(session), Some(user), Some(secs), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("malformed token".into());
        };
        let secs: u64 = secs.parse().map_err(|_| "malformed token".to_string())?;
        if now > UNIX_EPOCH + Duration::from_secs(secs) {
            return Err("the token has expired".into());
        }
        Ok((session.to_string(), user.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expiry is decided by the clock the caller passes: the token admits
    /// its user up to its expiry second, and not one second past it.
    #[test]
    fn a_token_admits_until_it_expires_and_garbage_never() {
        let tokens = ConnectionTokens::with_key([7; 32]);
        let expires = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let token = tokens.issue("s-1", "a<b&c\"d'e", expires);
        assert_eq!(
            tokens.check(&token, expires - Duration::from_secs(60)),
            Ok(("s-1".to_owned(), "a<b&c\"d'e".to_owned()))
        );
        assert!(tokens.check(&token, expires).is_ok());
        assert_eq!(
            tokens.check(&token, expires + Duration::from_secs(1)),
            Err("the token has expired".to_owned())
        );

        let now = expires - Duration::from_secs(60);
        let mut flipped = token.clone().into_bytes();
        flipped[3] ^= 1;
        let flipped = String::from_utf8(flipped).unwrap();
        let other_key = ConnectionTokens::with_key([8; 32]).issue("s-1", "u", expires);
        for garbage in [
            flipped.as_str(),
            &token[..token.len() - 1],
            "",
            ".",
            "YWJj.ZGVm",
            "%%%.***",
            other_key.as_str(),
            &"A".repeat(10_000),
        ] {
            assert!(tokens.check(garbage, now).is_err(), "{garbage:?}");
        }
    }
}
