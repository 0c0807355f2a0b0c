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
//! The HTTP client is `ureq`, run on tokio's blocking pool. One POST per
//! few minutes needs no async stack, and hyper's client would have us
//! assemble the connector, TLS with SNI, timeouts and body limits by hand;
//! ureq is small, maintained, and runs on the ring provider tonic already
//! uses (not aws-lc, which needs cmake), trusting `--ca-bundle` or else the
//! system roots, exactly as the gRPC channel does. Like the gRPC channel it
//! ignores proxy variables and follows no redirects.

use std::{
    fmt,
    fs::{self, DirBuilder, OpenOptions},
    io::Write,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{Failure, exit, fail};

/// The token endpoint's path and grant on the broker.
pub const TOKEN_PATH_AND_QUERY: &str = "/oauth2/token?grant_type=client_credentials";
/// A token is renewed once this share of its lifetime (in percent) has
/// passed, as DCV's Access Console does.
const RENEW_AT_PERCENT: u64 = 80;
/// Whole token request, connection to last byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A token reply is a few hundred bytes; anything past this is not one.
const MAX_REPLY_BYTES: u64 = 64 * 1024;
/// Attempts when the auth server answers 503 (busy), honouring its
/// Retry-After up to [`MAX_RETRY_AFTER`].
const ATTEMPTS: u32 = 3;
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);
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

/// One token request (blocking), retried while the server says it is busy.
fn fetch(client: &ClientCredentials, ca_bundle: Option<PathBuf>) -> Result<Issued, Failure> {
    let url = client.auth_url.as_str();
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .proxy(None)
        .timeout_global(Some(REQUEST_TIMEOUT))
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .user_agent(concat!("dcvsm/", env!("CARGO_PKG_VERSION")));
    if url.starts_with("https://") {
        config = config.tls_config(tls_config(ca_bundle.as_deref())?);
    }
    let agent: ureq::Agent = config.build().into();
    // RFC 6749 §2.3.1: each part form-encoded before base64.
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        encode(&client.client_id),
        encode(client.password.expose())
    ));
    // DCV's URL carries the grant in its query; a URL without it gets it in
    // the form body (a server refuses a parameter given twice).
    let form = if url.contains("grant_type=") {
        ""
    } else {
        "grant_type=client_credentials"
    };
    tracing::debug!(url, client = %client.client_id, "requesting a token");
    let mut attempt = 1;
    loop {
        let sent = agent
            .post(url)
            .header("authorization", format!("Basic {basic}"))
            .header("accept", "application/json")
            .content_type("application/x-www-form-urlencoded")
            .send(form);
        let mut response = sent.map_err(|e| {
            fail(
                exit::OTHER,
                format!("cannot reach the auth server at {url}: {}", ureq_cause(&e)),
            )
        })?;
        let status = response.status().as_u16();
        let grpc = response.headers().contains_key("grpc-status");
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(Duration::from_secs(1), Duration::from_secs)
            .min(MAX_RETRY_AFTER);
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_REPLY_BYTES)
            .read_to_string()
            .map_err(|e| {
                fail(
                    exit::OTHER,
                    format!("reading the auth server's reply from {url}: {e}"),
                )
            })?;
        if status == 503 && attempt < ATTEMPTS {
            tracing::debug!(attempt, ?retry_after, "the auth server is busy; retrying");
            std::thread::sleep(retry_after);
            attempt += 1;
            continue;
        }
        return match status {
            200 if grpc => Err(fail(
                exit::BAD_ENVIRONMENT,
                format!(
                    "{url} is a gRPC server without a token endpoint (a broker with \
                     authentication off?); unset the client credentials, or fix the auth \
                     server URL"
                ),
            )),
            200 => parse_token(url, &body),
            401 => Err(fail(
                exit::BAD_ENVIRONMENT,
                format!(
                    "the auth server refused the credentials of client {:?} (id from {}, \
                     password from {}){}",
                    client.client_id,
                    client.id_source,
                    client.password_source,
                    oauth_detail(&body)
                ),
            )),
            _ if status < 500 => Err(fail(
                exit::BAD_ENVIRONMENT,
                format!(
                    "the auth server at {url} answered {status}{}",
                    oauth_detail(&body)
                ),
            )),
            _ => Err(fail(
                exit::BROKER_ERROR,
                format!(
                    "the auth server at {url} answered {status}{}",
                    oauth_detail(&body)
                ),
            )),
        };
    }
}

/// ureq's TLS settings: ring, and `--ca-bundle`'s certificates or else the
/// system's roots.
fn tls_config(ca_bundle: Option<&Path>) -> Result<ureq::tls::TlsConfig, Failure> {
    use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};
    let roots: Vec<Certificate<'static>> = match ca_bundle {
        Some(path) => {
            let unreadable = |e: &dyn fmt::Display| {
                fail(
                    exit::BAD_ENVIRONMENT,
                    format!("cannot read the CA bundle {}: {e}", path.display()),
                )
            };
            let pem = fs::read(path).map_err(|e| unreadable(&e))?;
            let mut certs = Vec::new();
            for item in ureq::tls::parse_pem(&pem) {
                if let PemItem::Certificate(cert) = item.map_err(|e| unreadable(&e))? {
                    certs.push(cert);
                }
            }
            if certs.is_empty() {
                return Err(unreadable(&"no certificate in it"));
            }
            certs
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::debug!(error = %e, "a system root certificate was not loaded");
            }
            native
                .certs
                .iter()
                .map(|der| Certificate::from_der(der.as_ref()).to_owned())
                .collect()
        }
    };
    Ok(TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::new_with_certs(&roots))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build())
}

/// The innermost reason a request did not get through, in a few words.
fn ureq_cause(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused".to_owned()
        }
        other => other.to_string(),
    }
}

/// `: error: description` from an OAuth error body (RFC 6749 §5.2), else
/// the start of whatever the body says.
fn oauth_detail(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(body)
        && let Some(error) = v.get("error").and_then(Value::as_str)
    {
        return match v.get("error_description").and_then(Value::as_str) {
            Some(d) => format!(": {error}: {d}"),
            None => format!(": {error}"),
        };
    }
    let line: String = body
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    if line.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", line.trim())
    }
}

/// A successful token reply (RFC 6749 §5.1).
fn parse_token(url: &str, body: &str) -> Result<Issued, Failure> {
    let not_a_token = |why: &str| {
        fail(
            exit::BAD_ENVIRONMENT,
            format!("{url} did not answer with an OAuth token ({why}); is it a token endpoint?"),
        )
    };
    let v: Value = serde_json::from_str(body).map_err(|_| not_a_token("not JSON"))?;
    let access_token = v
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| not_a_token("no access_token"))?;
    match v.get("token_type").and_then(Value::as_str) {
        Some(t) if t.eq_ignore_ascii_case("bearer") => {}
        other => {
            return Err(not_a_token(&format!(
                "token_type {:?}, not Bearer",
                other.unwrap_or("")
            )));
        }
    }
    // A number by the RFC; some servers send it as a string.
    let expires_in = match v.get("expires_in") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    Ok(Issued {
        access_token: Secret::new(access_token.to_owned()),
        expires_in,
        scope: v.get("scope").and_then(Value::as_str).map(str::to_owned),
    })
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
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
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
    fn token_replies_and_errors() {
        let ok = parse_token(
            "u",
            r#"{"access_token":"a","token_type":"bearer","expires_in":"60"}"#,
        )
        .unwrap();
        assert_eq!(ok.expires_in, Some(60));
        assert!(parse_token("u", r#"{"access_token":"a","token_type":"mac"}"#).is_err());
        assert!(parse_token("u", "<html>").is_err());
        assert_eq!(
            oauth_detail(r#"{"error":"invalid_client","error_description":"no"}"#),
            ": invalid_client: no"
        );
        assert_eq!(oauth_detail(""), "");
        assert!(check_auth_url("ftp://x/").is_err());
        assert!(check_auth_url("https://u:p@x/").is_err());
        assert!(check_auth_url("https://x:8443/oauth2/token").is_ok());
    }
}
