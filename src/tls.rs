//! TLS on the gRPC port, with rustls: the server's certificate and key come
//! from PEM files and can be replaced while the broker runs.
//!
//! The broker accepts TCP connections itself and hands tonic finished TLS
//! streams ([`ServerTls::incoming`]), rather than giving tonic a fixed
//! identity: each handshake asks [`CurrentCertificate`] for the certified
//! key, which [`ServerTls::reload`] swaps (the binary calls it on SIGHUP).
//! New connections get the new certificate; open ones keep theirs. A reload
//! that fails (unreadable file, bad PEM, a key that is not the
//! certificate's) changes nothing.
//!
//! Handshakes run concurrently, each in its own task under a timeout, so a
//! client that stalls or fails its handshake costs nobody else anything; a
//! failed handshake is dropped, never passed on to tonic, and logged a few
//! times a minute at most (the 1st, 2nd, 4th, ... failure in each minute,
//! with the count), since anyone who reaches the port can fail handshakes
//! as fast as they like. Each connection takes a slot under the server's
//! connection cap from the moment it is accepted.

pub mod init;

use std::{
    convert::Infallible,
    fmt, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinSet,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, ServerConfig,
        crypto::CryptoProvider,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::{
            ClientHello, ResolvesServerCert, WebPkiClientVerifier, danger::ClientCertVerifier,
        },
        sign::CertifiedKey,
    },
    server::TlsStream,
};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};

use crate::server::connections::{Connections, Occurrences, Slot, Tracked};

/// The server id an agent's client certificate names: its subject's common
/// name, which must be a valid server id. Only certificates rustls verified
/// against the agent CA reach here.
pub fn agent_server_id(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
    crate::fleet::validate_server_id(name).ok()?;
    Some(name.to_owned())
}

/// How long a client has to finish its TLS handshake. A handshake is a
/// few round trips; a client silent for this long is a stalled or hostile
/// connection holding a socket.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long accepting pauses after an error that would only repeat at once
/// (out of file descriptors), instead of spinning on it.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Connections whose handshake finished, waiting for tonic to take them.
/// tonic takes each at once; the bound only stops a runaway.
const READY_CONNECTIONS: usize = 64;

/// Why a certificate and key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file is not the PEM it should be.
    #[error("{}: {what}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// rustls refused the pair: the key is not the certificate's, or is of
    /// a kind it cannot use.
    #[error("{} with {}: {source}", cert.display(), key.display())]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// rustls could not build a server configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The broker's TLS: where its certificate and key live, the one it serves
/// now, and the rustls configuration every handshake uses. Cheap to clone;
/// clones share the certificate, so reloading one reloads all.
#[derive(Clone)]
pub struct ServerTls {
    cert_path: Arc<Path>,
    key_path: Arc<Path>,
    agent_ca_path: Option<Arc<Path>>,
    provider: Arc<CryptoProvider>,
    current: Arc<CurrentCertificate>,
    config: Arc<ServerConfig>,
    handshake_timeout: Duration,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("current", &self.current)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

impl ServerTls {
    /// Loads the certificate chain (PEM, the server's certificate first)
    /// and its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub fn load(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Result<ServerTls, TlsError> {
        let (cert_path, key_path): (Arc<Path>, Arc<Path>) = (cert.into().into(), key.into().into());
        // Named explicitly rather than rustls's process-wide default, which
        // is unset, or ambiguous when a dependency brings another backend.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = read_pair(&cert_path, &key_path, &provider)?;
        let current = Arc::new(CurrentCertificate(RwLock::new(key)));
        let config = server_config(&provider, &current, None)?;
        Ok(ServerTls {
            cert_path,
            key_path,
            agent_ca_path: None,
            provider,
            current,
            config,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        })
    }

    /// The same TLS, also asking each client for a certificate signed by
    /// the CA in `path` (PEM), for agents that authenticate by mutual TLS.
    /// A client may still connect without one (API clients and agents with
    /// tokens do); one that offers a certificate this CA did not sign for
    /// client authentication fails its handshake.
    pub fn with_agent_ca(mut self, path: impl Into<PathBuf>) -> Result<ServerTls, TlsError> {
        let path: Arc<Path> = path.into().into();
        let pem = std::fs::read(&path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |what: String| TlsError::Pem {
            path: path.to_path_buf(),
            what,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad("holds no certificate".into()));
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| bad(format!("cannot verify clients with it: {e}")))?;
        self.config = server_config(&self.provider, &self.current, Some(verifier))?;
        self.agent_ca_path = Some(path);
        Ok(self)
    }

    /// The agent CA file, when agents may use client certificates.
    pub fn agent_ca_path(&self) -> Option<&Path> {
        self.agent_ca_path.as_deref()
    }

    /// The same TLS with another handshake timeout (tests use a short one).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> ServerTls {
        self.handshake_timeout = timeout;
        self
    }

    /// Reads the certificate and key files again and, if they make a valid
    /// pair, serves them to every new connection. On error nothing changes:
    /// the previous certificate stays in service.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = read_pair(&self.cert_path, &self.key_path, &self.provider)?;
        *self.current.0.write() = key;
        Ok(())
    }

    /// The SHA-256 fingerprint of the certificate served now, as
    /// `openssl x509 -noout -fingerprint -sha256` prints it.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.current.0.read())
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The key file.
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    /// Accepts connections on `listener`, each under `connections`'s cap,
    /// and yields those whose TLS handshake succeeded, for tonic's
    /// `serve_with_incoming_shutdown`. Dropping the stream stops accepting
    /// and closes the listener.
    pub fn incoming(
        &self,
        listener: TcpListener,
        connections: Connections,
    ) -> impl Stream<Item = Result<Tracked<TlsStream<TcpStream>>, Infallible>> + Send + 'static
    {
        let (ready, taken) = mpsc::channel(READY_CONNECTIONS);
        tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(self.config.clone()),
            self.handshake_timeout,
            connections,
            ready,
        ));
        ReceiverStream::new(taken).map(Ok)
    }
}

fn server_config(
    provider: &Arc<CryptoProvider>,
    current: &Arc<CurrentCertificate>,
    clients: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match clients {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(current.clone());
    // gRPC is HTTP/2; the token endpoint also takes HTTP/1.1.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The certified key new handshakes get, swapped by [`ServerTls::reload`].
/// A handshake holds the read lock only to clone an `Arc`.
pub struct CurrentCertificate(RwLock<Arc<CertifiedKey>>);

impl fmt::Debug for CurrentCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CurrentCertificate")
            .field("sha256", &fingerprint(&self.0.read()))
            .finish()
    }
}

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().clone())
    }
}

/// Reads and checks a certificate chain and its key. The files are small;
/// reading them synchronously is cheaper than a trip to a blocking thread.
fn read_pair(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let pem_error = |path: &Path, what: String| TlsError::Pem {
        path: path.to_owned(),
        what,
    };

    let chain = CertificateDer::pem_slice_iter(&read(cert_path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(cert_path, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(pem_error(
            cert_path,
            "no certificate in it (expected -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(key_path)?).map_err(|e| {
        pem_error(
            key_path,
            match e {
                rustls::pki_types::pem::Error::NoItemsFound => {
                    "no private key in it (expected -----BEGIN PRIVATE KEY-----, \
                     RSA PRIVATE KEY or EC PRIVATE KEY)"
                        .into()
                }
                other => format!("not a PEM private key: {other}"),
            },
        )
    })?;
    warn_if_key_is_readable_by_others(key_path);
    // from_der checks that the key is the certificate's.
    CertifiedKey::from_der(chain, key, provider)
        .map(Arc::new)
        .map_err(|source| TlsError::Pair {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
            source,
        })
}

#[cfg(unix)]
fn warn_if_key_is_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            key = %path.display(),
            mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
            "the TLS private key is readable by other users; chmod 600 it"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_key_is_readable_by_others(_path: &Path) {}

fn fingerprint(key: &CertifiedKey) -> String {
    let digest = Sha256::digest(key.cert.first().map_or(&[][..], |c| c.as_ref()));
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Accepts TCP connections and runs each handshake in its own task, until
/// the receiving end (tonic's accept loop) is dropped. Returning drops the
/// listener, which closes the port, and the unfinished handshakes, which
/// aborts them.
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    timeout: Duration,
    connections: Connections,
    ready: mpsc::Sender<Tracked<TlsStream<TcpStream>>>,
) {
    let mut handshakes = JoinSet::new();
    let failures = Arc::new(Occurrences::default());
    loop {
        tokio::select! {
            () = ready.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    // Over the cap: dropping the stream closes it at once.
                    let Some(slot) = connections.admit(peer) else { continue };
                    // Nagle's algorithm would hold small unary replies for
                    // delayed ACKs (tens of ms).
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                    }
                    handshakes.spawn(handshake(
                        acceptor.clone(),
                        tcp,
                        peer,
                        timeout,
                        slot,
                        failures.clone(),
                    ));
                }
                Err(e) => accept_failed(e).await,
            },
            Some(done) = handshakes.join_next() => {
                if let Ok(Some((stream, slot, peer))) = done
                    && ready.send(connections.track(stream, slot, peer)).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
    slot: Slot,
    failures: Arc<Occurrences>,
) -> Option<(TlsStream<TcpStream>, Slot, SocketAddr)> {
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Some((stream, slot, peer)),
        // A TCP health probe or port scan: connected and left.
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            tracing::debug!(%peer, "connection closed before the TLS handshake");
            None
        }
        // Plaintext clients, clients that do not trust our certificate:
        // worth a line, since the client's operator will ask why; but only
        // a few a minute, since anyone can fail handshakes at will.
        Ok(Err(e)) => {
            let failed_this_minute = failures.record()?;
            let not_tls = matches!(
                e.get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
                Some(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType
                ))
            );
            if not_tls {
                tracing::info!(%peer, error = %e, failed_this_minute, "TLS handshake failed: the client does not speak TLS (plaintext?)");
            } else {
                tracing::info!(%peer, error = %e, failed_this_minute, "TLS handshake failed");
            }
            None
        }
        Err(_) => {
            let failed_this_minute = failures.record()?;
            tracing::info!(%peer, ?timeout, failed_this_minute, "TLS handshake timed out");
            None
        }
    }
}

async fn accept_failed(e: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted};
    // A connection that died in the backlog is that client's business.
    if matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted) {
        tracing::debug!(error = %e, "accept failed");
        return;
    }
    tracing::warn!(error = %e, pause = ?ACCEPT_ERROR_PAUSE, "cannot accept connections");
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}

/// Reloads `tls` whenever the process gets SIGHUP, logging the outcome.
/// The handler is installed before this returns, so a SIGHUP sent any time
/// after cannot kill the process.
#[cfg(unix)]
pub fn reload_on_sighup(tls: ServerTls) -> io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => tracing::info!(
                    cert = %tls.cert_path().display(),
                    sha256 = %tls.fingerprint(),
                    "SIGHUP: TLS certificate reloaded; new connections use it"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    sha256 = %tls.fingerprint(),
                    "SIGHUP: TLS reload failed; still serving the previous certificate"
                ),
            }
        }
    }))
}
