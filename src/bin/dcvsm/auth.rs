//! Bearer tokens for `dcvsm`: which credentials apply, buying a token from
//! an OAuth 2.0 token endpoint (the client credentials grant, RFC 6749
//! §4.4), and the per-user token cache.
//!
//! `DCV_SM_OAUTH2_TOKEN` is sent as it is: never fetched, cached or
//! renewed. Otherwise a client id and password buy a token from the auth
//! server URL, by default the broker's own
//! `/oauth2/token?grant_type=client_credentials`, as the official CLI
//! defaults to the broker. The token is cached per (auth server URL, client
//! id) in `$XDG_CACHE_HOME/dcvsm/` (else `~/.cache/dcvsm/`), mode 0600, and
//! reused until 80% of its lifetime has passed, when DCV's Access Console
//! renews its tokens too. A cache entry also records an HMAC of the
//! password it was bought with, so a changed (or wrong) password is never
//! hidden behind a token bought with the old one.
//!
//! Secrets and tokens are never printed, not even with `--debug`: they live
//! in [`Secret`], whose `Debug` is redacted, and a token shows as a short
//! SHA-256 fingerprint so that two runs can be told apart.
//!
//! The request itself is the library's [`dcv_broker::oauth`], shared with
//! the agent; this module adds dcvsm's cache and its exit codes.

use std::{
    fmt,
    fs::{self, DirBuilder, OpenOptions},
    io::Write,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{Failure, exit, fail};

/// The token endpoint's path and grant on the broker.
pub use dcv_broker::oauth::TOKEN_PATH_AND_QUERY;
/// A token is renewed once this share of its lifetime (in percent) has
/// passed, as DCV's Access Console does.
const RENEW_AT_PERCENT: u64 = 80;
/// Bumped when the cache file's shape changes; other versions are ignored.
const CACHE_VERSION: u64 = 1;

/// A string that is never printed: its `Debug` says `<redacted>`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A token's printable stand-in: `sha256:` and 8 hex digits of its digest.
pub fn fingerprint(token: &Secret) -> String {
    let digest = Sha256::digest(token.expose().as_bytes());
    format!("sha256:{}", hex(&digest[..4]))
}

/// A client id and password, with where each came from (for messages).
#[derive(Clone, Debug)]
pub struct ClientCredentials {
    pub auth_url: String,
    pub client_id: String,
    pub id_source: &'static str,
    pub password: Secret,
    pub password_source: &'static str,
}

/// How calls authenticate.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// No credentials: calls carry no token (a broker with `--auth off`).
    None,
    /// `DCV_SM_OAUTH2_TOKEN`, sent as it is.
    Token(Secret),
    /// A client that buys its tokens.
    Client(ClientCredentials),
}

/// A token to send.
#[derive(Clone, Debug)]
pub struct Token {
    pub value: Secret,
    /// It came from the cache: a refusal may only mean the cache is stale.
    pub cached: bool,
}

/// Hands out tokens for one run: from the cache, or bought.
pub struct Tokens {
    credentials: Credentials,
    ca_bundle: Option<PathBuf>,
    cache: Cache,
}

impl Tokens {
    pub fn new(credentials: Credentials, ca_bundle: Option<PathBuf>, cache: Cache) -> Tokens {
        Tokens {
            credentials,
            ca_bundle,
            cache,
        }
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The token to send, if any: a cached one still fresh, else a new one.
    pub async fn get(&self) -> Result<Option<Token>, Failure> {
        match &self.credentials {
            Credentials::None => Ok(None),
            Credentials::Token(value) => {
                tracing::debug!(token = %fingerprint(value), "using DCV_SM_OAUTH2_TOKEN as it is");
                Ok(Some(Token {
                    value: value.clone(),
                    cached: false,
                }))
            }
            Credentials::Client(client) => match self.cache.load(client, now()) {
                Some(value) => {
                    tracing::debug!(
                        client = %client.client_id,
                        token = %fingerprint(&value),
                        "using the cached token"
                    );
                    Ok(Some(Token {
                        value,
                        cached: true,
                    }))
                }
                None => self.buy(client).await.map(Some),
            },
        }
    }

    /// A new token, after the broker refused the cached one (revoked,
    /// or signed with a key the broker has since rotated).
    pub async fn renew(&self) -> Result<Option<Token>, Failure> {
        match &self.credentials {
            Credentials::Client(client) => {
                self.cache.forget(client);
                self.buy(client).await.map(Some)
            }
            _ => self.get().await,
        }
    }

    async fn buy(&self, client: &ClientCredentials) -> Result<Token, Failure> {
        let request_client = client.clone();
        let ca_bundle = self.ca_bundle.clone();
        let issued = tokio::task::spawn_blocking(move || fetch(&request_client, ca_bundle))
            .await
            .map_err(|e| fail(exit::OTHER, format!("the token request failed: {e}")))??;
        tracing::debug!(
            client = %client.client_id,
            token = %fingerprint(&issued.access_token),
            expires_in = ?issued.expires_in,
            scope = issued.scope.as_deref().unwrap_or(""),
            "token issued"
        );
        self.cache.store(client, &issued, now());
        Ok(Token {
            value: issued.access_token,
            cached: false,
        })
    }
}

/// What the token endpoint issued.
struct Issued {
    access_token: Secret,
    expires_in: Option<u64>,
    scope: Option<String>,
}

/// Checks an auth server URL before anything is sent to it.
pub fn check_auth_url(url: &str) -> Result<(), Failure> {
    let bad = |why: &str| {
        fail(
            exit::BAD_PARAMETER,
            format!("invalid auth server URL {url:?}: {why}"),
        )
    };
    let uri: http::Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad("it must start with http:// or https://"));
    }
    match uri.authority() {
        None => Err(bad("it names no host")),
        Some(a) if a.as_str().contains('@') => Err(bad(
            "credentials go in DCV_SM_CLIENT_ID and DCV_SM_CLIENT_PASSWORD, not in the URL",
        )),
        Some(_) => Ok(()),
    }
}

/// One token request (blocking), through the library's client
/// credentials grant; its errors become dcvsm's exit codes.
fn fetch(client: &ClientCredentials, ca_bundle: Option<PathBuf>) -> Result<Issued, Failure> {
    use dcv_broker::oauth::{TokenError, TokenRequest, request_token};
    let url = client.auth_url.as_str();
    let ca_pem = match &ca_bundle {
        Some(path) => Some(fs::read(path).map_err(|e| {
            fail(
                exit::BAD_ENVIRONMENT,
                format!("cannot read the CA bundle {}: {e}", path.display()),
            )
        })?),
        None => None,
    };
    tracing::debug!(url, client = %client.client_id, "requesting a token");
    let request = TokenRequest {
        url: url.to_owned(),
        client_id: client.client_id.clone(),
        secret: client.password.expose().to_owned(),
        ca_pem,
        accept_any_certificate: false,
        user_agent: concat!("dcvsm/", env!("CARGO_PKG_VERSION")).to_owned(),
    };
    match request_token(&request) {
        Ok(issued) => Ok(Issued {
            access_token: Secret::new(issued.access_token),
            expires_in: issued.expires_in,
            scope: issued.scope,
        }),
        Err(e) => Err(match e {
            TokenError::Ca(why) => fail(
                exit::BAD_ENVIRONMENT,
                format!(
                    "cannot read the CA bundle {}: {why}",
                    ca_bundle.as_deref().unwrap_or(Path::new("")).display()
                ),
            ),
            TokenError::Unreachable { .. } => fail(exit::OTHER, e.to_string()),
            TokenError::NoTokenEndpoint { .. } => fail(
                exit::BAD_ENVIRONMENT,
                format!("{e}; unset the client credentials, or fix the auth server URL"),
            ),
            TokenError::Refused { detail, .. } => fail(
                exit::BAD_ENVIRONMENT,
                format!(
                    "the auth server refused the credentials of client {:?} (id from {}, \
                     password from {}){detail}",
                    client.client_id, client.id_source, client.password_source,
                ),
            ),
            TokenError::Status { status, .. } if status < 500 => {
                fail(exit::BAD_ENVIRONMENT, e.to_string())
            }
            TokenError::Status { .. } => fail(exit::BROKER_ERROR, e.to_string()),
            TokenError::NotAToken { .. } => fail(exit::BAD_ENVIRONMENT, e.to_string()),
        }),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The token cache: one JSON file per (auth server URL, client id), only
/// readable by its owner. Failing to read or write it is never fatal: the
/// run buys a token instead (and says why under `--debug`).
pub struct Cache {
    dir: Option<PathBuf>,
}

impl Cache {
    /// `$XDG_CACHE_HOME/dcvsm`, else `~/.cache/dcvsm` (a relative
    /// `XDG_CACHE_HOME` is ignored, as the XDG spec says).
    pub fn from_env() -> Cache {
        let xdg = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute());
        let dir = match xdg {
            Some(dir) => Some(dir.join("dcvsm")),
            None => std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|home| PathBuf::from(home).join(".cache").join("dcvsm")),
        };
        Cache { dir }
    }

    fn file(&self, client: &ClientCredentials) -> Option<PathBuf> {
        let mut h = Sha256::new();
        h.update(client.auth_url.as_bytes());
        h.update([0]);
        h.update(client.client_id.as_bytes());
        Some(
            self.dir
                .as_ref()?
                .join(format!("token-{}.json", hex(&h.finalize()[..16]))),
        )
    }

    /// The cached token, while less than 80% of its lifetime has passed
    /// and it was bought with this password.
    fn load(&self, client: &ClientCredentials, now: u64) -> Option<Secret> {
        let path = self.file(client)?;
        let skip = |why: &str| {
            tracing::debug!(path = %path.display(), "cached token not used: {why}");
            None
        };
        let metadata = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => return skip(&e.to_string()),
        };
        // A token file others may read has leaked already; do not use it.
        if metadata.mode() & 0o077 != 0 {
            return skip("others may read the file");
        }
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => return skip(&e.to_string()),
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            return skip("not JSON");
        };
        let field = |name: &str| v.get(name).and_then(Value::as_str);
        let number = |name: &str| v.get(name).and_then(Value::as_u64);
        if number("version") != Some(CACHE_VERSION)
            || field("auth_url") != Some(&client.auth_url)
            || field("client_id") != Some(&client.client_id)
        {
            return skip("written for another version, URL or client");
        }
        if field("secret_check") != Some(&secret_check(client)) {
            return skip("bought with another password");
        }
        let (Some(obtained), Some(renew_after)) = (number("obtained_at"), number("renew_after"))
        else {
            return skip("no times");
        };
        if now < obtained || now >= renew_after {
            return skip("due for renewal");
        }
        match field("access_token") {
            Some(t) if !t.is_empty() => Some(Secret::new(t.to_owned())),
            _ => skip("no token"),
        }
    }

    fn store(&self, client: &ClientCredentials, issued: &Issued, now: u64) {
        let Some(path) = self.file(client) else {
            return;
        };
        let Some(lifetime) = issued.expires_in.filter(|l| *l > 0) else {
            tracing::debug!("the token has no expires_in; not cached");
            return;
        };
        let entry = json!({
            "version": CACHE_VERSION,
            "auth_url": client.auth_url,
            "client_id": client.client_id,
            "secret_check": secret_check(client),
            "access_token": issued.access_token.expose(),
            "scope": issued.scope,
            "obtained_at": now,
            "expires_at": now.saturating_add(lifetime),
            "renew_after": now.saturating_add(lifetime * RENEW_AT_PERCENT / 100),
        });
        match write_private(&path, entry.to_string().as_bytes()) {
            Ok(()) => tracing::debug!(path = %path.display(), "token cached"),
            Err(e) => tracing::debug!(path = %path.display(), error = %e, "token not cached"),
        }
    }

    fn forget(&self, client: &ClientCredentials) {
        if let Some(path) = self.file(client) {
            match fs::remove_file(&path) {
                Ok(()) => tracing::debug!(path = %path.display(), "cached token dropped"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "cached token not dropped")
                }
            }
        }
    }
}

/// Binds a cache entry to the password that bought it without storing
/// the password: HMAC-SHA256 keyed by it.
fn secret_check(client: &ClientCredentials) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(client.password.expose().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(b"dcvsm token cache\0");
    mac.update(client.auth_url.as_bytes());
    mac.update(&[0]);
    mac.update(client.client_id.as_bytes());
    hex(&mac.finalize().into_bytes())
}

/// Writes `bytes` to `path` through a private temporary file renamed into
/// place, so a reader sees the old entry or the new one, never half, and
/// nobody else may read either.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("no parent directory"))?;
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let name = path
        .file_name()
        .map_or_else(|| "token".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(password: &str) -> ClientCredentials {
        ClientCredentials {
            auth_url: "http://127.0.0.1:1/oauth2/token".into(),
            client_id: "c1".into(),
            id_source: "test",
            password: Secret::new(password.into()),
            password_source: "test",
        }
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let c = client("hunter2");
        let printed = format!("{c:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(fingerprint(&Secret::new("tok".into())).starts_with("sha256:"));
    }

    #[test]
    fn cache_round_trip_renewal_and_password_binding() {
        let dir = std::env::temp_dir().join(format!("dcvsm-cache-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let cache = Cache {
            dir: Some(dir.join("dcvsm")),
        };
        let c = client("pw");
        let issued = Issued {
            access_token: Secret::new("t0k".into()),
            expires_in: Some(100),
            scope: Some("read".into()),
        };
        cache.store(&c, &issued, 1000);
        let path = cache.file(&c).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777,
            0o700
        );
        assert_eq!(cache.load(&c, 1079).unwrap().expose(), "t0k");
        assert!(cache.load(&c, 1080).is_none(), "renewed at 80%");
        assert!(cache.load(&c, 999).is_none(), "clock went back");
        assert!(cache.load(&client("other"), 1001).is_none());
        cache.forget(&c);
        assert!(cache.load(&c, 1001).is_none());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn auth_urls_are_checked() {
        assert!(check_auth_url("ftp://x/").is_err());
        assert!(check_auth_url("https://u:p@x/").is_err());
        assert!(check_auth_url("https://x:8443/oauth2/token").is_ok());
    }
}
