//! Connecting to the broker from Rust: one call gives a channel, over TLS
//! for `https://`, that adds `authorization: Bearer` to every request and
//! that every generated client (`ServersClient`, `SessionsClient`, ...) wraps.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use dcv_broker::{client, pb};
//!
//! let ca = std::fs::read("ca.pem")?;
//! let broker = client::builder("https://broker.example.internal:8443")
//!     .ca_pem(ca)
//!     .token("TOKEN")
//!     .connect()
//!     .await?;
//! let reply = broker
//!     .servers()
//!     .describe_servers(pb::DescribeServersRequest::default())
//!     .await?;
//! # Ok(())
//! # }
//! ```

use std::{fmt, io, time::Duration};

use http::Uri;
use hyper_util::rt::TokioIo;

use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

mod insecure;
pub mod pinned;

use crate::pb::{
    agent_client::AgentClient, servers_client::ServersClient, sessions_client::SessionsClient,
};

/// How long connecting (TCP and, for `https://`, the TLS handshake) may take
/// by default: a broker that has not answered in 10 s is down or unreachable,
/// and a command-line user should hear so rather than wait for the OS's
/// minutes-long TCP timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not an `http://` or `https://` URL tonic can use.
    #[error("invalid broker URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS configuration was refused (e.g. a CA bundle that is not PEM).
    #[error("TLS configuration: {0}")]
    Tls(#[source] tonic::transport::Error),
    /// The token cannot be sent in a header (printable ASCII only).
    #[error("the token is not a valid header value (printable ASCII only)")]
    InvalidToken,
    /// The broker could not be reached or the handshake failed.
    #[error("cannot reach the broker at {url}: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// Why; its innermost source is usually the telling part.
        source: tonic::transport::Error,
    },
}

/// Adds `authorization: Bearer <token>` to every call, when it has a token.
/// The value is marked sensitive: kept out of HTTP/2 header compression
/// tables and debug logs.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// A bearer for `token`, or one that adds nothing for `None`.
    pub fn new(token: Option<&str>) -> Result<BearerToken, ClientError> {
        let Some(token) = token else {
            return Ok(BearerToken(None));
        };
        let mut value = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| ClientError::InvalidToken)?;
        value.set_sensitive(true);
        Ok(BearerToken(Some(value)))
    }
}

// By hand: the token never reaches a log, not even through `{:?}`.
impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = if self.0.is_some() { "Some(..)" } else { "None" };
        f.debug_tuple("BearerToken")
            .field(&format_args!("{shown}"))
            .finish()
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The channel every generated client wraps: `XClient::new(broker.channel())`.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

/// How to connect; made by [`builder`].
#[derive(Clone)]
pub struct ClientBuilder {
    url: String,
    ca_pem: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    accept_any_certificate: bool,
    token: Option<String>,
    connect_timeout: Duration,
    request_timeout: Option<Duration>,
}

// By hand: the token never reaches a log.
impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("url", &self.url)
            .field("ca_pem", &self.ca_pem.is_some())
            .field("identity", &self.identity.is_some())
            .field("accept_any_certificate", &self.accept_any_certificate)
            .field("token", &self.token.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// Starts describing a connection to the broker at `url` (`http://` in
/// plaintext, `https://` over TLS trusting the system roots unless
/// [`ClientBuilder::ca_pem`] names a CA).
pub fn builder(url: impl Into<String>) -> ClientBuilder {
    ClientBuilder {
        url: url.into(),
        ca_pem: None,
        identity: None,
        accept_any_certificate: false,
        token: None,
        connect_timeout: CONNECT_TIMEOUT,
        request_timeout: None,
    }
}

/// Connects to `url`, trusting `ca_pem` (PEM CA certificates) for
/// `https://` when given, and sending `token` as a bearer token when given.
pub async fn connect(
    url: &str,
    ca_pem: Option<&[u8]>,
    token: Option<&str>,
) -> Result<BrokerClient, ClientError> {
    let mut builder = builder(url);
    builder.ca_pem = ca_pem.map(<[u8]>::to_vec);
    builder.token = token.map(str::to_owned);
    builder.connect().await
}

impl ClientBuilder {
    /// Trust only these CA certificates (PEM) for an `https://` broker,
    /// instead of the system roots.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> ClientBuilder {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Present this client certificate and key (PEM) in the TLS handshake
    /// (mutual TLS, e.g. an agent certificate from `dcv-broker tls
    /// agent-cert`). Only used for `https://`.
    pub fn identity_pem(
        mut self,
        cert: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> ClientBuilder {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// For `https://`, accept any server certificate (a DCV agent's
    /// `tls_strict = false`): the connection is encrypted but the broker is
    /// not authenticated. Callers should say so loudly.
    pub fn accept_any_server_certificate(mut self) -> ClientBuilder {
        self.accept_any_certificate = true;
        self
    }

    /// Send `authorization: Bearer <token>` on every call.
    pub fn token(mut self, token: impl Into<String>) -> ClientBuilder {
        self.token = Some(token.into());
        self
    }

    /// How long connecting may take; default [`CONNECT_TIMEOUT`].
    pub fn connect_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.connect_timeout = timeout;
        self
    }

    /// How long each call may take; default none (the broker's own request
    /// timeout applies).
    pub fn request_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.request_timeout = Some(timeout);
        self
    }

    /// Connects now: an unreachable broker or a failed handshake is an
    /// error here, not on the first call.
    pub async fn connect(self) -> Result<BrokerClient, ClientError> {
        let bearer = BearerToken::new(self.token.as_deref())?;
        let invalid = |reason: String| ClientError::InvalidUrl {
            url: self.url.clone(),
            reason,
        };
        let tls = if self.url.starts_with("https://") {
            true
        } else if self.url.starts_with("http://") {
            false
        } else {
            return Err(invalid("the scheme must be http:// or https://".into()));
        };
        let mut endpoint = Endpoint::from_shared(self.url.clone())
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(self.connect_timeout);
        if let Some(timeout) = self.request_timeout {
            endpoint = endpoint.timeout(timeout);
        }
        if tls && self.accept_any_certificate {
            return self.connect_accepting_any(endpoint, bearer).await;
        }
        if tls {
            let mut config = match &self.ca_pem {
                Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
                None => ClientTlsConfig::new().with_native_roots(),
            };
            if let Some((cert, key)) = &self.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint.tls_config(config).map_err(ClientError::Tls)?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                url: self.url.clone(),
                source,
            })?;
        Ok(BrokerClient { channel, bearer })
    }

    /// [`ClientBuilder::connect`] through [`insecure`]'s connector: an
    /// `http://` endpoint with the real `https://` origin.
    async fn connect_accepting_any(
        &self,
        endpoint: Endpoint,
        bearer: BearerToken,
    ) -> Result<BrokerClient, ClientError> {
        let invalid = |reason: String| ClientError::InvalidUrl {
            url: self.url.clone(),
            reason,
        };
        let uri = endpoint.uri().clone();
        let host = uri
            .host()
            .ok_or_else(|| invalid("no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let authority = uri
            .authority()
            .map_or_else(String::new, |a| a.as_str().to_owned());
        let plain = Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|e| invalid(e.to_string()))?
            .origin(uri)
            .connect_timeout(self.connect_timeout);
        let plain = match self.request_timeout {
            Some(t) => plain.timeout(t),
            None => plain,
        };
        let connector = insecure::connector(host, port, self.identity.as_ref())
            .map_err(|e| invalid(format!("TLS configuration: {e}")))?;
        let channel = plain
            .connect_with_connector(connector)
            .await
            .map_err(|source| ClientError::Connect {
                url: self.url.clone(),
                source,
            })?;
        Ok(BrokerClient { channel, bearer })
    }
}

/// A connection to the broker; cheap to clone (clones share the connection).
#[derive(Clone, Debug)]
pub struct BrokerClient {
    channel: Channel,
    bearer: BearerToken,
}

impl BrokerClient {
    /// The channel, with the bearer token, for any generated client.
    pub fn channel(&self) -> AuthChannel {
        InterceptedService::new(self.channel.clone(), self.bearer.clone())
    }

    /// The Servers service.
    pub fn servers(&self) -> ServersClient<AuthChannel> {
        ServersClient::new(self.channel())
    }

    /// The Sessions service.
    pub fn sessions(&self) -> SessionsClient<AuthChannel> {
        SessionsClient::new(self.channel())
    }

    /// The Agent service (what a DCV server's agent calls).
    pub fn agent(&self) -> AgentClient<AuthChannel> {
        AgentClient::new(self.channel())
    }

    /// The same connection with another token (or none): a renewed token
    /// needs no new connection.
    pub fn with_token(&self, token: Option<&str>) -> Result<BrokerClient, ClientError> {
        Ok(BrokerClient {
            channel: self.channel.clone(),
            bearer: BearerToken::new(token)?,
        })
    }
}

/// A connection maker for tonic's `connect_with_connector`: TLS by our own
/// rules (any certificate, or a pinned one), which tonic's TLS cannot do.
pub type TlsConnector = tower::util::BoxCloneService<
    Uri,
    TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    io::Error,
>;

/// A connector to `host:port` over TLS with `config` (ALPN `h2` added),
/// for a channel given the same address with `http://`: tonic refuses an
/// `https://` one without its own TLS.
fn tls_connector(
    mut config: rustls::ClientConfig,
    host: String,
    port: u16,
) -> Result<TlsConnector, String> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
    Ok(tower::util::BoxCloneService::new(tower::service_fn(
        move |_: Uri| {
            let tls = tls.clone();
            let name = name.clone();
            let host = host.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let stream = tls.connect(name, tcp).await?;
                Ok::<_, io::Error>(TokioIo::new(stream))
            }
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_never_shows_in_debug_output() {
        let bearer = BearerToken::new(Some("s3cr3t")).unwrap();
        let builder = builder("http://127.0.0.1:1").token("s3cr3t");
        for text in [format!("{bearer:?}"), format!("{builder:?}")] {
            assert!(!text.contains("s3cr3t"), "{text}");
        }
    }

    #[test]
    fn a_token_that_cannot_be_a_header_is_refused() {
        assert!(matches!(
            BearerToken::new(Some("line\nbreak")),
            Err(ClientError::InvalidToken)
        ));
    }

    #[tokio::test]
    async fn urls_without_an_http_scheme_are_refused_before_connecting() {
        for url in ["127.0.0.1:8443", "ftp://127.0.0.1:1", "http://exa mple"] {
            let e = builder(url).connect().await.unwrap_err();
            assert!(matches!(e, ClientError::InvalidUrl { .. }), "{url}: {e:?}");
        }
    }
}
