//! Who may call the broker: API and agent clients with secrets kept only as
//! argon2 hashes, the scopes each is granted, and the short-lived bearer
//! tokens (signed JWTs) the broker issues them by OAuth 2.0 client
//! credentials. The gRPC side (`api::auth`) asks [`Auth::authenticate`]
//! about every call; this module never sees the network.
//!
//! Tokens are checked against the live registry on every call, not only by
//! signature and expiry, so revoking a client ends its tokens at once.

mod scope;
mod token;

use std::{
    collections::HashMap,
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use argon2::{
    Argon2,
    password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash},
};
use base64::Engine as _;
use parking_lot::RwLock;
use tokio::sync::{Semaphore, watch};

pub use scope::{Scope, ScopeSet, UnknownScope};
pub use token::IssuedToken;

use crate::fleet::{
    FleetError,
    persist::{Change, Snapshot, Store, StoredClient, wall_clock},
};

/// The name of the token-signing key among the store's secrets.
const SIGNING_KEY: &str = "token-signing-key/hs256";

/// Client secrets hashed or verified at once. Each argon2 run takes tens of
/// milliseconds and 19 MiB on purpose; a flood of token requests must not
/// take every core or gigabytes of memory.
const CONCURRENT_HASHES: usize = 2;

/// Longest a token request waits for a hashing slot before it is refused.
const HASH_QUEUE_WAIT: Duration = Duration::from_secs(5);

/// Longest client name accepted.
pub const MAX_CLIENT_NAME: usize = 128;

/// How authentication behaves.
#[derive(Clone)]
pub struct AuthConfig {
    /// How long an issued token is valid. Short, because a token that
    /// leaks is good until it expires (or its client is revoked).
    pub token_ttl: Duration,
    /// The `iss` of issued tokens, and the only issuer accepted.
    pub issuer: String,
    /// The wall clock tokens are issued and checked against (tests move
    /// it to see tokens expire).
    pub clock: Arc<dyn Fn() -> SystemTime + Send + Sync>,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("token_ttl", &self.token_ttl)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            token_ttl: Duration::from_secs(15 * 60),
            issuer: "dcv-broker".into(),
            clock: Arc::new(wall_clock),
        }
    }
}

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The client id (for a mutual-TLS agent, `mtls:` and its server id).
    pub client_id: Arc<str>,
    /// What it may do in this request.
    pub scopes: ScopeSet,
    /// For an agent: the only server it may act for.
    pub server_id: Option<Arc<str>>,
}

impl Principal {
    /// Whether this caller may act as the agent of `server_id`. A caller
    /// bound to no server (an operator's client with the agent scope) may
    /// act for any.
    pub fn may_act_for(&self, server_id: &str) -> bool {
        self.server_id.as_deref().is_none_or(|own| own == server_id)
    }
}

/// A client as listed (never its secret or hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// What it may be granted.
    pub scopes: ScopeSet,
    /// For an agent client, its server.
    pub server_id: Option<String>,
    /// When it was registered.
    pub created_at: SystemTime,
    /// When it was revoked.
    pub revoked_at: Option<SystemTime>,
}

/// A client just registered: the one time its secret is known.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The client.
    pub client: ClientInfo,
    /// Its secret, shown once and never stored.
    pub secret: String,
}

/// Why authentication or client administration failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The request carries no credentials.
    #[error("{0}")]
    Missing(String),
    /// Unknown client, wrong secret or a revoked client: one error for all,
    /// so that a caller learns nothing about which ids exist.
    #[error("invalid client credentials")]
    InvalidClient,
    /// The token is malformed, badly signed, expired, from another issuer,
    /// or its client was revoked.
    #[error("invalid bearer token: {0}")]
    InvalidToken(String),
    /// Authenticated, but without the scope the call needs.
    #[error("{0}")]
    Forbidden(String),
    /// The client asked for a scope it was not granted.
    #[error("scope {0:?} is not granted to this client")]
    ScopeNotGranted(String),
    /// Bad input to an administrative call.
    #[error("{0}")]
    Invalid(String),
    /// No such client.
    #[error("no client with id {0:?}")]
    NotFound(String),
    /// Too many token requests are being checked at once.
    #[error("too many token requests at once; retry shortly")]
    Busy,
    /// This broker is a replica that does not lead: clients are registered
    /// and revoked by the leader only.
    #[error(
        "this broker does not lead its replicas: register and revoke clients through the leader's admin socket"
    )]
    NotLeader,
    /// The store or the hashing failed.
    #[error("{0}")]
    Internal(String),
}

impl From<FleetError> for AuthError {
    fn from(e: FleetError) -> Self {
        AuthError::Internal(e.to_string())
    }
}

/// The clients, the signing key and the store they are kept in. Cheap to
/// clone; clones share everything.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

struct Inner {
    config: AuthConfig,
    clients: RwLock<HashMap<String, StoredClient>>,
    /// Swapped whole when a replica takes the shared key from the store;
    /// a clone of the `Arc` per token, the lock held for no longer.
    keys: RwLock<Arc<token::Keys>>,
    store: Arc<dyn Store>,
    hashing: Arc<Semaphore>,
    /// Told of every revocation, so that calls still open (an agent's
    /// instruction stream) can end when their client is revoked.
    revocations: watch::Sender<()>,
    /// Whether clients may be registered and revoked here (false on a
    /// replica that does not lead, whose registry follows the leader's).
    writable: std::sync::atomic::AtomicBool,
    /// Verified against when the client is unknown or revoked, so that the
    /// answer takes as long as for a wrong secret.
    decoy_hash: String,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("config", &self.inner.config)
            .field("clients", &self.inner.clients.read().len())
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// The registry kept in `store`, loaded from `snapshot`; a store with
    /// no signing key gets a fresh random one, durable before this returns
    /// (so tokens survive a restart).
    pub async fn restore(
        config: AuthConfig,
        store: Arc<dyn Store>,
        snapshot: &Snapshot,
    ) -> Result<Auth, AuthError> {
        let key = match snapshot
            .secrets
            .iter()
            .find(|(name, _)| name == SIGNING_KEY)
        {
            Some((_, key)) if key.len() >= 32 => key.clone(),
            Some(_) => {
                return Err(AuthError::Internal(format!(
                    "the stored {SIGNING_KEY} is shorter than 32 bytes"
                )));
            }
            None => {
                let key = random_bytes::<32>()?.to_vec();
                store
                    .submit(vec![Change::PutSecret {
                        name: SIGNING_KEY.into(),
                        value: key.clone(),
                    }])
                    .wait()
                    .await?;
                key
            }
        };
        let decoy_hash = hash_secret(&random_bytes::<32>()?)?;
        let clients = snapshot
            .clients
            .iter()
            .map(|c| (c.id.clone(), c.clone()))
            .collect();
        Ok(Auth {
            inner: Arc::new(Inner {
                keys: RwLock::new(Arc::new(token::Keys::new(&key, &config.issuer))),
                config,
                clients: RwLock::new(clients),
                store,
                hashing: Arc::new(Semaphore::new(CONCURRENT_HASHES)),
                revocations: watch::Sender::new(()),
                writable: std::sync::atomic::AtomicBool::new(true),
                decoy_hash,
            }),
        })
    }

    /// An in-memory registry with a key drawn for this process.
    pub async fn in_memory(config: AuthConfig) -> Result<Auth, AuthError> {
        Auth::restore(
            config,
            Arc::new(crate::fleet::persist::MemoryStore),
            &Snapshot::default(),
        )
        .await
    }

    /// Keeps an audit record of a change to the registry (a client
    /// registered or revoked) in the registry's store, waiting until it
    /// is durable; nothing on a replica that does not lead (it refused the
    /// change) or a store that wants no records.
    pub async fn record_audit(&self, record: crate::fleet::persist::AuditRecord) {
        if self.check_writable().is_err() || !self.inner.store.keeps_audit() {
            return;
        }
        let durable = self.inner.store.submit(vec![Change::PutAudit(record)]);
        if let Err(e) = durable.wait().await {
            tracing::error!(error = %e, "an audit record could not be stored");
        }
    }

    /// How authentication behaves.
    pub fn config(&self) -> &AuthConfig {
        &self.inner.config
    }

    /// Whether clients may be registered and revoked here: the cluster
    /// controller turns it off while this replica does not lead, so that a
    /// refused change never touches the registry in memory.
    pub fn set_writable(&self, writable: bool) {
        self.inner
            .writable
            .store(writable, std::sync::atomic::Ordering::Release);
    }

    fn check_writable(&self) -> Result<(), AuthError> {
        if self
            .inner
            .writable
            .load(std::sync::atomic::Ordering::Acquire)
        {
            Ok(())
        } else {
            Err(AuthError::NotLeader)
        }
    }

    /// Registers a client that may be granted `scopes` (an agent client
    /// names the one server it acts for) and returns its id and secret,
    /// once the registration is durable.
    pub async fn register(
        &self,
        name: &str,
        scopes: ScopeSet,
        server_id: Option<&str>,
    ) -> Result<Registered, AuthError> {
        self.check_writable()?;
        let name = name.trim();
        if name.is_empty() || name.len() > MAX_CLIENT_NAME || name.chars().any(char::is_control) {
            return Err(AuthError::Invalid(format!(
                "a client name is 1 to {MAX_CLIENT_NAME} bytes without control characters"
            )));
        }
        if scopes.is_empty() {
            return Err(AuthError::Invalid(format!(
                "give a client at least one scope ({})",
                ScopeSet::ALL
            )));
        }
        match (scopes.contains(Scope::Agent), server_id) {
            (_, Some(id)) => {
                crate::fleet::validate_server_id(id).map_err(AuthError::Invalid)?;
                if scopes != ScopeSet::from(Scope::Agent) {
                    return Err(AuthError::Invalid(
                        "a client bound to a server is an agent: its only scope is `agent`".into(),
                    ));
                }
            }
            (true, None) => {
                return Err(AuthError::Invalid(
                    "an agent client acts for one server: give its server id".into(),
                ));
            }
            (false, None) => {}
        }
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>()?);
        let secret_hash = {
            let secret = secret.clone();
            self.hashing(move || hash_secret(secret.as_bytes()))
                .await??
        };
        let client = StoredClient {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_owned(),
            secret_hash,
            scopes: scopes.names(),
            server_id: server_id.map(str::to_owned),
            created_at: (self.inner.config.clock)(),
            revoked_at: None,
        };
        let durable = {
            let mut clients = self.inner.clients.write();
            clients.insert(client.id.clone(), client.clone());
            self.inner
                .store
                .submit(vec![Change::PutClient(client.clone())])
        };
        durable.wait().await?;
        Ok(Registered {
            client: info(&client),
            secret,
        })
    }

    /// Every client, revoked ones too, oldest first.
    pub fn list(&self) -> Vec<ClientInfo> {
        let mut all: Vec<ClientInfo> = self.inner.clients.read().values().map(info).collect();
        all.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        all
    }

    /// Revokes a client: it gets no more tokens, and the ones it holds stop
    /// working now. Revoking a revoked client changes nothing.
    pub async fn revoke(&self, id: &str) -> Result<ClientInfo, AuthError> {
        self.check_writable()?;
        let (client, durable) = {
            let mut clients = self.inner.clients.write();
            let client = clients
                .get_mut(id)
                .ok_or_else(|| AuthError::NotFound(id.to_owned()))?;
            if client.revoked_at.is_some() {
                return Ok(info(client));
            }
            client.revoked_at = Some((self.inner.config.clock)());
            let durable = self
                .inner
                .store
                .submit(vec![Change::PutClient(client.clone())]);
            (info(client), durable)
        };
        self.inner.revocations.send_modify(|()| {});
        durable.wait().await?;
        Ok(client)
    }

    /// The client credentials grant: checks `client_id` and `secret` and
    /// issues a token for `requested` scopes (all the client's when
    /// `None`). Unknown ids, revoked clients and wrong secrets fail alike,
    /// after the same amount of hashing.
    pub async fn issue_token(
        &self,
        client_id: &str,
        secret: &str,
        requested: Option<ScopeSet>,
    ) -> Result<IssuedToken, AuthError> {
        let client = self
            .inner
            .clients
            .read()
            .get(client_id)
            .filter(|c| c.revoked_at.is_none())
            .cloned();
        let hash = client
            .as_ref()
            .map_or_else(|| self.inner.decoy_hash.clone(), |c| c.secret_hash.clone());
        let secret = secret.to_owned();
        let verified = self
            .hashing(move || {
                PasswordHash::new(&hash).ok().is_some_and(|h| {
                    Argon2::default()
                        .verify_password(secret.as_bytes(), &h)
                        .is_ok()
                })
            })
            .await?;
        let Some(client) = client.filter(|_| verified) else {
            return Err(AuthError::InvalidClient);
        };
        let granted = ScopeSet::parse_names(&client.scopes);
        let scopes = match requested {
            None => granted,
            Some(requested) => match requested.difference(granted).iter().next() {
                Some(missing) => return Err(AuthError::ScopeNotGranted(missing.name().into())),
                None => requested,
            },
        };
        self.keys().issue(
            &client.id,
            scopes,
            client.server_id.as_deref(),
            (self.inner.config.clock)(),
            self.inner.config.token_ttl,
        )
    }

    /// The caller a bearer token stands for: the signature, issuer and
    /// expiry must hold, and the client must still be registered and not
    /// revoked. Its scopes are those of the token that the client still
    /// has.
    pub fn authenticate(&self, bearer: &str) -> Result<Principal, AuthError> {
        let claims = self.keys().verify(bearer, (self.inner.config.clock)())?;
        let clients = self.inner.clients.read();
        let client = clients
            .get(&claims.sub)
            .ok_or_else(|| AuthError::InvalidToken("its client is not registered".into()))?;
        if client.revoked_at.is_some() {
            return Err(AuthError::InvalidToken("its client was revoked".into()));
        }
        Ok(Principal {
            client_id: claims.sub.into(),
            scopes: claims
                .scopes
                .intersection(ScopeSet::parse_names(&client.scopes)),
            server_id: client.server_id.as_deref().map(Arc::from),
        })
    }

    fn keys(&self) -> Arc<token::Keys> {
        Arc::clone(&self.inner.keys.read())
    }

    /// Replaces the clients and the signing key with what `snapshot` holds
    /// (a replica whose role changed). A client revoked or gone by the
    /// snapshot fires [`Auth::revocations`], so its open calls end. On
    /// error nothing changed.
    pub fn reload(&self, snapshot: &Snapshot) -> Result<(), AuthError> {
        let key = match snapshot
            .secrets
            .iter()
            .find(|(name, _)| name == SIGNING_KEY)
        {
            Some((_, key)) if key.len() < 32 => {
                return Err(AuthError::Internal(format!(
                    "the stored {SIGNING_KEY} is shorter than 32 bytes"
                )));
            }
            Some((_, key)) => Some(key),
            None => None,
        };
        let fresh: HashMap<String, StoredClient> = snapshot
            .clients
            .iter()
            .map(|c| (c.id.clone(), c.clone()))
            .collect();
        if let Some(key) = key {
            self.set_key(key);
        }
        let revoked = {
            let mut clients = self.inner.clients.write();
            let revoked = clients.iter().any(|(id, old)| {
                old.revoked_at.is_none() && fresh.get(id).is_none_or(|new| new.revoked_at.is_some())
            });
            *clients = fresh;
            revoked
        };
        if revoked {
            self.inner.revocations.send_modify(|()| {});
        }
        Ok(())
    }

    /// Applies the clients and the signing key among a leader's committed
    /// changes (a follower's batch; the fleet applies the rest). A
    /// revocation fires [`Auth::revocations`] at once. A signing key too
    /// short to be the store's is ignored, and said so.
    pub fn apply_replicated(&self, changes: &[Change]) {
        let mut revoked = false;
        for change in changes {
            match change {
                Change::PutClient(client) => {
                    let mut clients = self.inner.clients.write();
                    let was_active = clients
                        .get(&client.id)
                        .is_some_and(|c| c.revoked_at.is_none());
                    revoked |= was_active && client.revoked_at.is_some();
                    clients.insert(client.id.clone(), client.clone());
                }
                Change::PutSecret { name, value } if name == SIGNING_KEY => {
                    if value.len() >= 32 {
                        self.set_key(value);
                    } else {
                        tracing::error!("ignored a replicated {SIGNING_KEY} shorter than 32 bytes");
                    }
                }
                _ => {}
            }
        }
        if revoked {
            self.inner.revocations.send_modify(|()| {});
        }
    }

    fn set_key(&self, key: &[u8]) {
        let keys = Arc::new(token::Keys::new(key, &self.inner.config.issuer));
        *self.inner.keys.write() = keys;
    }

    /// Changes each time a client is revoked.
    pub fn revocations(&self) -> watch::Receiver<()> {
        self.inner.revocations.subscribe()
    }

    /// Whether `client_id` is registered and not revoked.
    pub fn is_active(&self, client_id: &str) -> bool {
        self.inner
            .clients
            .read()
            .get(client_id)
            .is_some_and(|c| c.revoked_at.is_none())
    }

    /// Runs argon2 off the async threads, at most [`CONCURRENT_HASHES`] at
    /// once. The slot goes with the work, not with the caller: a caller
    /// that gives up (the token endpoint's wait bound) frees nothing until
    /// its hash really ends, so giving up never lets more hashes run.
    async fn hashing<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let permit = tokio::time::timeout(
            HASH_QUEUE_WAIT,
            Arc::clone(&self.inner.hashing).acquire_owned(),
        )
        .await
        .map_err(|_| AuthError::Busy)?
        .map_err(|_| AuthError::Busy)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|e| AuthError::Internal(format!("hashing failed: {e}")))
    }
}

fn info(client: &StoredClient) -> ClientInfo {
    ClientInfo {
        id: client.id.clone(),
        name: client.name.clone(),
        scopes: ScopeSet::parse_names(&client.scopes),
        server_id: client.server_id.clone(),
        created_at: client.created_at,
        revoked_at: client.revoked_at,
    }
}

/// argon2id with its default (OWASP-recommended) cost and a random salt.
fn hash_secret(secret: &[u8]) -> Result<String, AuthError> {
    Argon2::default()
        .hash_password(secret)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Internal(format!("cannot hash a secret: {e}")))
}

fn random_bytes<const N: usize>() -> Result<[u8; N], AuthError> {
    let mut bytes = [0; N];
    getrandom::fill(&mut bytes)
        .map_err(|e| AuthError::Internal(format!("no randomness from the OS: {e}")))?;
    Ok(bytes)
}
