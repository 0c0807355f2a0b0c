//! The broker's bearer tokens: JWTs signed with HMAC-SHA256 under a key
//! only the broker holds (it both issues and checks them, so no key pair
//! is needed), carrying the client id, the granted scopes and the expiry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde_json::{Value, json};

use super::{AuthError, ScopeSet};

/// Clock difference tolerated on `iat`/`nbf`: brokers behind one load
/// balancer share the key but not a perfect clock.
const LEEWAY_SECS: u64 = 30;

/// A token just issued, as the token endpoint returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The JWT.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds until it expires.
    pub expires_in: u64,
    /// What it grants.
    pub scopes: ScopeSet,
}

/// What a valid token says.
pub(super) struct Claims {
    /// The client id.
    pub sub: String,
    /// The scopes granted.
    pub scopes: ScopeSet,
}

pub(super) struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    issuer: String,
    validation: Validation,
}

impl Keys {
    pub fn new(secret: &[u8], issuer: &str) -> Keys {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked against the broker's clock below, not the
        // library's, so tests can move time.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.set_issuer(&[issuer]);
        Keys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            issuer: issuer.to_owned(),
            validation,
        }
    }

    pub fn issue(
        &self,
        client_id: &str,
        scopes: ScopeSet,
        server_id: Option<&str>,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<IssuedToken, AuthError> {
        let iat = unix_seconds(now);
        let mut claims = json!({
            "iss": self.issuer,
            "sub": client_id,
            "iat": iat,
            "exp": iat + ttl.as_secs(),
            "jti": uuid::Uuid::new_v4().to_string(),
            "scope": scopes.to_string(),
        });
        if let (Some(server), Some(map)) = (server_id, claims.as_object_mut()) {
            map.insert("server_id".into(), Value::from(server));
        }
        let access_token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
                .map_err(|e| AuthError::Internal(format!("cannot sign a token: {e}")))?;
        Ok(IssuedToken {
            access_token,
            token_type: "Bearer",
            expires_in: ttl.as_secs(),
            scopes,
        })
    }

    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Claims, AuthError> {
        let data = jsonwebtoken::decode::<Value>(token, &self.decoding, &self.validation).map_err(
            |e| {
                AuthError::InvalidToken(match e.kind() {
                    ErrorKind::InvalidSignature => "bad signature".into(),
                    ErrorKind::InvalidIssuer => "issued by someone else".into(),
                    ErrorKind::InvalidAlgorithm => "not signed with HS256".into(),
                    ErrorKind::MissingRequiredClaim(claim) => format!("no {claim:?} claim"),
                    _ => "not a JWT this broker issued".into(),
                })
            },
        )?;
        let claims = data.claims;
        let number = |name: &str| claims.get(name).and_then(Value::as_u64);
        let now = unix_seconds(now);
        let exp = number("exp").ok_or_else(|| AuthError::InvalidToken("bad \"exp\"".into()))?;
        if now >= exp {
            return Err(AuthError::InvalidToken("expired".into()));
        }
        if number("iat").is_some_and(|iat| iat > now + LEEWAY_SECS) {
            return Err(AuthError::InvalidToken("issued in the future".into()));
        }
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or_else(|| AuthError::InvalidToken("bad \"sub\"".into()))?;
        let scope = claims.get("scope").and_then(Value::as_str).unwrap_or("");
        let scopes = ScopeSet::parse(scope)
            .map_err(|e| AuthError::InvalidToken(format!("bad \"scope\": {e}")))?;
        Ok(Claims {
            sub: sub.to_owned(),
            scopes,
        })
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scope;

    fn keys() -> Keys {
        Keys::new(&[7; 32], "dcv-broker")
    }

    #[test]
    fn a_token_verifies_until_it_expires() {
        let now = SystemTime::now();
        let scopes = ScopeSet::from(Scope::Read);
        let token = keys()
            .issue("c1", scopes, None, now, Duration::from_secs(60))
            .unwrap();
        assert_eq!(token.expires_in, 60);
        let claims = keys().verify(&token.access_token, now).unwrap();
        assert_eq!((claims.sub.as_str(), claims.scopes), ("c1", scopes));
        let later = now + Duration::from_secs(61);
        assert_eq!(
            keys().verify(&token.access_token, later).err(),
            Some(AuthError::InvalidToken("expired".into()))
        );
    }

    #[test]
    fn other_keys_issuers_and_garbage_are_refused() {
        let now = SystemTime::now();
        let ttl = Duration::from_secs(60);
        let other_key = Keys::new(&[8; 32], "dcv-broker")
            .issue("c1", ScopeSet::ALL, None, now, ttl)
            .unwrap();
        assert_eq!(
            keys().verify(&other_key.access_token, now).err(),
            Some(AuthError::InvalidToken("bad signature".into()))
        );
        let other_issuer = Keys::new(&[7; 32], "someone")
            .issue("c1", ScopeSet::ALL, None, now, ttl)
            .unwrap();
        assert_eq!(
            keys().verify(&other_issuer.access_token, now).err(),
            Some(AuthError::InvalidToken("issued by someone else".into()))
        );
        for garbage in ["", "a.b.c", "not a token", "eyJhbGciOiJub25lIn0.e30."] {
            assert!(matches!(
                keys().verify(garbage, now),
                Err(AuthError::InvalidToken(_))
            ));
        }
    }
}
