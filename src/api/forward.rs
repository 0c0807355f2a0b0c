//! Forwarding writes from a follower replica to the leader: the signed
//! identity a forwarded call carries (who called, which request id), its
//! check on the leader, one cached channel to the leader, and the
//! read-your-writes wait on the reply (`x-dcv-broker-seq`).
//!
//! A follower serves reads from its own copy of the fleet; every RPC that
//! changes something (or needs an agent's live instruction channel, which
//! only the leader holds) goes through [`Forwarder::route`] first. The
//! forwarded call's identity is not the caller's token: the leader trusts
//! only what a replica signed with the forwarding key every replica read
//! from the database, so a caller that sends these headers itself gains
//! nothing without the key.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tonic::{
    Request, Response, Status,
    metadata::{AsciiMetadataValue, MetadataMap},
    transport::{Channel, ClientTlsConfig, Endpoint},
};
use uuid::Uuid;

use super::RequestId;
use crate::{
    auth::{Principal, ScopeSet},
    cluster::{ClusterView, Role},
    pb::{
        agent_client::AgentClient, servers_client::ServersClient, sessions_client::SessionsClient,
    },
};

/// The forwarded call's identity: base64url (no padding) of its JSON.
pub const FORWARDED: &str = "x-dcv-broker-forwarded";
/// Hex HMAC-SHA256 of [`FORWARDED`]'s value with the forwarding key.
pub const FORWARDED_MAC: &str = "x-dcv-broker-forwarded-mac";
/// On a clustered leader's reply to a write: its committed sequence number
/// once the write finished, which the forwarding follower waits to have
/// applied before it replies.
pub const SEQ: &str = "x-dcv-broker-seq";

/// The largest forwarded identity header accepted, in bytes: a client id,
/// a few scope names, a server id, a UUID and a node name fit in far less;
/// anything bigger is refused before it is decoded.
pub const MAX_FORWARDED_BYTES: usize = 4096;

/// How old a forwarded identity may be: it is made for one call, a moment
/// before it is sent, so a minute allows for clocks a little apart while
/// a captured header soon stops counting.
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// How long a follower waits to have applied a forwarded write's change
/// when the call has no deadline.
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(5);

/// At most how much earlier than the caller's deadline a follower gives up
/// waiting to apply a forwarded write (a tenth of what is left when less).
const DEADLINE_MARGIN: Duration = Duration::from_millis(250);

/// How long reaching the leader may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The identity as sent.
#[derive(Debug, Serialize, Deserialize)]
struct Identity {
    principal: Option<WirePrincipal>,
    request_id: String,
    node: String,
    issued_at: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct WirePrincipal {
    client_id: String,
    scopes: Vec<String>,
    server_id: Option<String>,
}

/// A forwarded call whose identity verified: in the request's extensions
/// (set by the request-id layer), for the authentication layer and the
/// adapters.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// The caller as the forwarding replica authenticated it (`None`: that
    /// replica runs without authentication).
    pub principal: Option<Principal>,
    /// The forwarding replica's node name.
    pub node: String,
}

/// A request that carried forwarding headers that did not verify: the
/// HTTP gate answers it UNAUTHENTICATED.
#[derive(Debug, Clone)]
pub struct ForwardRefused(pub String);

/// What the forwarding headers of a request say.
#[derive(Debug)]
pub enum Check {
    /// There are none: an ordinary call.
    Absent,
    /// A forwarded call with this identity and request id.
    Verified(Forwarded, Uuid),
    /// Headers that must not be trusted, and why.
    Refused(String),
}

fn mac(key: &[u8; 32]) -> Hmac<Sha256> {
    // HMAC takes a key of any length: this cannot fail.
    <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

fn unix_now(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The two header values of a forwarded call from `node` for `principal`
/// and `request_id`, signed with `key`.
pub fn sign(
    key: &[u8; 32],
    node: &str,
    principal: Option<&Principal>,
    request_id: Uuid,
    now: SystemTime,
) -> (String, String) {
    let identity = Identity {
        principal: principal.map(|p| WirePrincipal {
            client_id: p.client_id.to_string(),
            scopes: p.scopes.names(),
            server_id: p.server_id.as_deref().map(str::to_owned),
        }),
        request_id: request_id.to_string(),
        node: node.to_owned(),
        issued_at: unix_now(now),
    };
    // Serializing plain strings and numbers cannot fail.
    let json = serde_json::to_vec(&identity).unwrap_or_default();
    let value = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
    let mut m = mac(key);
    m.update(value.as_bytes());
    let tag = m.finalize().into_bytes();
    let hex = tag.iter().map(|b| format!("{b:02x}")).collect::<String>();
    (value, hex)
}

fn unhex(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    text.chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// Checks the forwarding headers of a request against `view`'s key.
pub fn check(headers: &http::HeaderMap, view: &ClusterView, now: SystemTime) -> Check {
    let (value, tag) = match (headers.get(FORWARDED), headers.get(FORWARDED_MAC)) {
        (None, None) => return Check::Absent,
        (Some(value), Some(tag)) => (value.as_bytes(), tag.as_bytes()),
        _ => return Check::Refused("a forwarded call needs both forwarding headers".into()),
    };
    if value.len() > MAX_FORWARDED_BYTES || tag.len() != 64 {
        return Check::Refused("the forwarding headers are malformed".into());
    }
    let Some(key) = view.forwarding_key() else {
        return Check::Refused("this broker takes no forwarded calls".into());
    };
    let Some(tag) = unhex(tag) else {
        return Check::Refused("the forwarding headers are malformed".into());
    };
    let mut m = mac(&key);
    m.update(value);
    // verify_slice compares in constant time.
    if m.verify_slice(&tag).is_err() {
        return Check::Refused("the forwarded identity's signature does not verify".into());
    }
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(value) else {
        return Check::Refused("the forwarded identity is not base64url".into());
    };
    let Ok(identity) = serde_json::from_slice::<Identity>(&json) else {
        return Check::Refused("the forwarded identity is not the expected JSON".into());
    };
    let now = unix_now(now);
    if identity.issued_at.abs_diff(now) > MAX_AGE.as_secs() {
        return Check::Refused(format!(
            "the forwarded identity was issued {}s away from now (at most {}s)",
            identity.issued_at.abs_diff(now),
            MAX_AGE.as_secs()
        ));
    }
    let Ok(request_id) = Uuid::parse_str(&identity.request_id) else {
        return Check::Refused("the forwarded request id is not a UUID".into());
    };
    let principal = identity.principal.map(|p| Principal {
        client_id: p.client_id.into(),
        scopes: ScopeSet::parse_names(&p.scopes),
        server_id: p.server_id.map(Arc::from),
    });
    Check::Verified(
        Forwarded {
            principal,
            node: identity.node,
        },
        request_id,
    )
}

/// Decides, for each RPC that writes, whether it runs here or at the
/// leader, and forwards it there. Cheap to clone; standalone brokers'
/// forwarder does nothing.
#[derive(Debug, Clone, Default)]
pub struct Forwarder {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    view: ClusterView,
    /// PEM roots trusted for an `https://` leader (`None`: the system's).
    roots: Option<Vec<u8>>,
    /// The channel to the leader, by its URL: replaced when the leader
    /// changes.
    channel: Mutex<Option<(String, Channel)>>,
    max_request_bytes: usize,
    max_response_bytes: usize,
    request_timeout: Option<Duration>,
}

/// What the forwarding adapters need to know about the broker.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// PEM roots trusted for an `https://` leader (`None`: the system's).
    pub roots: Option<Vec<u8>>,
    /// The largest request message, as the broker's own.
    pub max_request_bytes: usize,
    /// The largest reply message, as the broker's own.
    pub max_response_bytes: usize,
    /// The broker's request timeout (`None`: none).
    pub request_timeout: Option<Duration>,
}

impl Forwarder {
    /// Forwards nothing: every call is handled here.
    pub fn standalone() -> Forwarder {
        Forwarder { inner: None }
    }

    /// Forwards as `view`'s role says (nothing when standalone).
    pub fn new(view: ClusterView, config: ForwarderConfig) -> Forwarder {
        if !view.is_clustered() {
            return Forwarder::standalone();
        }
        Forwarder {
            inner: Some(Arc::new(Inner {
                view,
                roots: config.roots,
                channel: Mutex::new(None),
                max_request_bytes: config.max_request_bytes,
                max_response_bytes: config.max_response_bytes,
                request_timeout: config.request_timeout,
            })),
        }
    }

    /// Where a writing RPC runs: `None` here (this replica leads, or is
    /// standalone), or at the leader; UNAVAILABLE when no leader is known,
    /// or for a forwarded call that reached a replica no longer leading
    /// (a forwarded call is never forwarded again).
    pub fn route<T>(&self, request: &Request<T>) -> Result<Option<Leader>, Status> {
        let Some(inner) = &self.inner else {
            return Ok(None);
        };
        let forwarded = request.extensions().get::<Forwarded>().is_some();
        match inner.view.role() {
            Role::Leader => Ok(None),
            _ if forwarded => Err(Status::unavailable(
                "this broker is not the leader (it was when the call was forwarded here); retry",
            )),
            Role::Unavailable { why } => Err(Status::unavailable(why)),
            Role::Follower { leader } => {
                let channel = inner.channel(&leader)?;
                let key = inner.view.forwarding_key().ok_or_else(|| {
                    Status::unavailable("this broker has no forwarding key yet; retry")
                })?;
                let request_id = request
                    .extensions()
                    .get::<RequestId>()
                    .map_or_else(Uuid::new_v4, |id| id.0);
                let (value, tag) = sign(
                    &key,
                    inner.view.node(),
                    request.extensions().get::<Principal>(),
                    request_id,
                    SystemTime::now(),
                );
                let value = AsciiMetadataValue::try_from(value)
                    .map_err(|_| Status::internal("the forwarded identity is no header value"))?;
                let tag = AsciiMetadataValue::try_from(tag)
                    .map_err(|_| Status::internal("the forwarded signature is no header value"))?;
                let timeout = [grpc_timeout(request.metadata()), inner.request_timeout]
                    .into_iter()
                    .flatten()
                    .min();
                Ok(Some(Leader {
                    inner: inner.clone(),
                    url: leader,
                    channel,
                    value,
                    tag,
                    deadline: timeout.map(|t| Instant::now() + t),
                }))
            }
        }
    }

    /// Marks a reply to a write handled here with the committed sequence
    /// number, when this broker is one of several replicas.
    pub fn stamp<T>(&self, response: &mut Response<T>) {
        if let Some(inner) = &self.inner {
            response
                .metadata_mut()
                .insert(SEQ, AsciiMetadataValue::from(inner.view.committed()));
        }
    }

    /// `message` as the reply to a write handled here, stamped.
    pub fn stamped<M>(&self, message: M) -> Response<M> {
        let mut response = Response::new(message);
        self.stamp(&mut response);
        response
    }

    /// The cluster view, when clustered.
    pub fn view(&self) -> Option<&ClusterView> {
        self.inner.as_ref().map(|i| &i.view)
    }
}

impl Inner {
    fn channel(&self, url: &str) -> Result<Channel, Status> {
        let mut cached = self.channel.lock();
        if let Some((cached_url, channel)) = &*cached
            && cached_url == url
        {
            return Ok(channel.clone());
        }
        let unreachable =
            |e: &dyn std::fmt::Display| Status::unavailable(format!("the leader at {url}: {e}"));
        let uri: http::Uri = url.parse().map_err(|e| unreachable(&e))?;
        let https = uri.scheme_str() == Some("https");
        // With roots of our own, TLS is the pinned connector's (see
        // `client::pinned`), over an `http://` URL tonic accepts without
        // TLS of its own; without, tonic's TLS with the system's roots.
        let plain = match (&self.roots, https) {
            (Some(_), true) => format!("http{}", &url["https".len()..]),
            _ => url.to_owned(),
        };
        let mut endpoint = Endpoint::from_shared(plain)
            .map_err(|e| unreachable(&e))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let channel = match (&self.roots, https) {
            (Some(pem), true) => {
                let connector =
                    crate::client::pinned::connector(&uri, pem).map_err(|e| unreachable(&e))?;
                endpoint.connect_with_connector_lazy(connector)
            }
            (None, true) => {
                endpoint = endpoint
                    .tls_config(ClientTlsConfig::new().with_native_roots())
                    .map_err(|e| unreachable(&e))?;
                endpoint.connect_lazy()
            }
            (_, false) => endpoint.connect_lazy(),
        };
        tracing::debug!(leader = url, "forwarding to a new leader");
        *cached = Some((url.to_owned(), channel.clone()));
        Ok(channel)
    }
}

/// A writing RPC on its way to the leader.
#[derive(Debug)]
pub struct Leader {
    inner: Arc<Inner>,
    url: String,
    channel: Channel,
    value: AsciiMetadataValue,
    tag: AsciiMetadataValue,
    deadline: Option<Instant>,
}

impl Leader {
    /// The Servers service at the leader.
    pub fn servers(&self) -> ServersClient<Channel> {
        ServersClient::new(self.channel.clone())
            .max_decoding_message_size(self.inner.max_response_bytes)
            .max_encoding_message_size(self.inner.max_request_bytes)
    }

    /// The Sessions service at the leader.
    pub fn sessions(&self) -> SessionsClient<Channel> {
        SessionsClient::new(self.channel.clone())
            .max_decoding_message_size(self.inner.max_response_bytes)
            .max_encoding_message_size(self.inner.max_request_bytes)
    }

    /// The Agent service at the leader.
    pub fn agent(&self) -> AgentClient<Channel> {
        AgentClient::new(self.channel.clone())
            .max_decoding_message_size(self.inner.max_response_bytes)
            .max_encoding_message_size(self.inner.max_request_bytes)
    }

    /// The leader's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The forwarded request: `message`, the signed identity, and what is
    /// left of the caller's deadline. Nothing else of the caller's
    /// metadata goes along (its token stays here).
    pub fn request<M>(&self, message: M) -> Request<M> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert(FORWARDED, self.value.clone());
        metadata.insert(FORWARDED_MAC, self.tag.clone());
        if let Some(deadline) = self.deadline {
            request.set_timeout(deadline.saturating_duration_since(Instant::now()));
        }
        request
    }

    /// The same request without a deadline: for a stream, which outlives
    /// any.
    pub fn stream_request<M>(&self, message: M) -> Request<M> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert(FORWARDED, self.value.clone());
        metadata.insert(FORWARDED_MAC, self.tag.clone());
        request
    }

    /// The leader's reply to the caller: its errors as they are (code,
    /// message, details), and a success once this replica applied the
    /// leader's change (read-your-writes), without the sequence number.
    pub async fn reply<M>(
        &self,
        call: impl Future<Output = Result<Response<M>, Status>>,
    ) -> Result<Response<M>, Status> {
        let reply = call.await.map_err(passed_on)?;
        let seq = reply
            .metadata()
            .get(SEQ)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let message = reply.into_inner();
        if let Some(seq) = seq {
            // A little before the deadline, so that the caller hears why
            // rather than its own timeout.
            let patience = self.deadline.map_or(DEFAULT_PATIENCE, |d| {
                let left = d.saturating_duration_since(Instant::now());
                left.saturating_sub((left / 10).min(DEADLINE_MARGIN))
            });
            if !self.inner.view.wait_applied(seq, patience).await {
                return Err(Status::unavailable(
                    "committed by the leader, not yet applied here",
                ));
            }
        }
        Ok(Response::new(message))
    }

    /// Ends when this replica stops following this leader.
    pub async fn left(&self) {
        let mut roles = self.inner.view.roles();
        let url = self.url.clone();
        let _ = roles
            .wait_for(|role| !matches!(role, Role::Follower { leader } if *leader == url))
            .await;
    }
}

/// The leader's refusal as this replica's: its code, message and details
/// (a BadRequest's field violations survive the hop); the leader's other
/// response headers stay behind.
pub fn passed_on(status: Status) -> Status {
    Status::with_details(
        status.code(),
        status.message(),
        status.details().to_vec().into(),
    )
}

/// The caller's `grpc-timeout`, if any (gRPC's wire format: at most eight
/// digits and a unit).
fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scope;

    fn view(key: [u8; 32]) -> ClusterView {
        let view = ClusterView::clustered("b".into());
        view.set_forwarding_key(key);
        view
    }

    fn headers(value: &str, tag: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(FORWARDED, value.parse().unwrap());
        headers.insert(FORWARDED_MAC, tag.parse().unwrap());
        headers
    }

    #[test]
    fn a_signed_identity_verifies_and_a_tampered_one_does_not() {
        let now = SystemTime::now();
        let principal = Principal {
            client_id: "ops".into(),
            scopes: ScopeSet::from(Scope::OperateServers),
            server_id: None,
        };
        let id = Uuid::new_v4();
        let (value, tag) = sign(&[7; 32], "a", Some(&principal), id, now);
        match check(&headers(&value, &tag), &view([7; 32]), now) {
            Check::Verified(f, got) => {
                assert_eq!(got, id);
                assert_eq!(f.principal, Some(principal));
                assert_eq!(f.node, "a");
            }
            other => panic!("{other:?}"),
        }
        // Another key, a changed value, an old identity: refused.
        assert!(matches!(
            check(&headers(&value, &tag), &view([8; 32]), now),
            Check::Refused(_)
        ));
        let mut changed = value.clone();
        changed.push('A');
        assert!(matches!(
            check(&headers(&changed, &tag), &view([7; 32]), now),
            Check::Refused(_)
        ));
        assert!(matches!(
            check(
                &headers(&value, &tag),
                &view([7; 32]),
                now + Duration::from_secs(61)
            ),
            Check::Refused(_)
        ));
        // No key (standalone): nothing forwarded counts.
        assert!(matches!(
            check(&headers(&value, &tag), &ClusterView::standalone(), now),
            Check::Refused(_)
        ));
        assert!(matches!(
            check(&http::HeaderMap::new(), &view([7; 32]), now),
            Check::Absent
        ));
    }

    #[test]
    fn grpc_timeouts_parse() {
        let mut m = MetadataMap::new();
        m.insert("grpc-timeout", "1500m".parse().unwrap());
        assert_eq!(grpc_timeout(&m), Some(Duration::from_millis(1500)));
        m.insert("grpc-timeout", "123456789S".parse().unwrap());
        assert_eq!(grpc_timeout(&m), None);
    }
}
