//! TLS over real connections on 127.0.0.1: a client trusting the right CA
//! succeeds, one trusting another CA or speaking plaintext fails, a reload
//! swaps the certificate for new connections, a failed reload keeps the old
//! one, and a stalled or failed handshake costs other clients nothing. Then
//! the binary: `dcv-broker tls init`, serving with its files, and SIGHUP.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use common::{
    close_item, close_req, describe_ids, process::BrokerProcess, quiet_config, registration,
};
use dcv_broker::{
    fleet::Fleet,
    pb::{self, agent_client::AgentClient, servers_client::ServersClient},
    serve_tls,
    tls::{
        ServerTls, TlsError,
        init::{self, Generated},
    },
};
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const BIN: &str = env!("CARGO_BIN_EXE_dcv-broker");

/// Bounds every wait in these tests: a broker that misbehaves fails the
/// test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(20);

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("dcv-broker-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn cert(&self) -> PathBuf {
        self.0.join(init::SERVER_CERT)
    }

    fn key(&self) -> PathBuf {
        self.0.join(init::SERVER_KEY)
    }

    /// The broker binary serving TLS with this directory's `tls init`
    /// files, authentication off (it has its own tests), plus `extra`;
    /// returned once it has logged that it serves TLS only, with the
    /// certificate's fingerprint.
    async fn tls_broker(&self, extra: &[&str]) -> BrokerProcess {
        let (cert, key) = (self.cert(), self.key());
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
            "--auth".as_ref(),
            "off".as_ref(),
        ];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        let mut broker = BrokerProcess::start(&args).await;
        let line = broker.logged("TLS only").await;
        assert!(
            line.contains("sha256"),
            "the certificate's fingerprint: {line}"
        );
        broker
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh CA and a certificate for localhost and 127.0.0.1.
fn issue() -> Generated {
    init::generate(&["localhost".into(), "127.0.0.1".into()], 30).unwrap()
}

/// Puts `g`'s server certificate and key in `dir`, the way an operator
/// rotates them: written beside and renamed into place.
fn install(dir: &TempDir, g: &Generated) {
    replace(&dir.cert(), &g.server_cert);
    replace(&dir.key(), &g.server_key);
}

fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A broker serving TLS in this test's runtime.
struct TlsBroker {
    addr: SocketAddr,
    tls: ServerTls,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), dcv_broker::server::ServeError>>,
}

impl TlsBroker {
    async fn start(tls: ServerTls) -> TlsBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = quiet_config();
        let fleet = Fleet::new(config.fleet.clone()).unwrap();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve_tls(listener, fleet, config, tls.clone(), async {
            let _ = stopped.await;
        }));
        TlsBroker {
            addr,
            tls,
            stop: Some(stop),
            task,
        }
    }

    /// Serves `g`'s certificate from files in `dir`.
    async fn with(dir: &TempDir, g: &Generated) -> TlsBroker {
        install(dir, g);
        TlsBroker::start(ServerTls::load(dir.cert(), dir.key()).unwrap()).await
    }
}

/// A channel to `addr` over TLS, trusting only `ca` (PEM) and checking the
/// certificate against `server_name`.
async fn tls_channel(
    addr: SocketAddr,
    ca: &str,
    server_name: &str,
) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(server_name),
        )?
        .connect_timeout(PATIENCE)
        .timeout(PATIENCE)
        .connect()
        .await
}

/// Connects trusting `ca` and makes one call: Ok if the whole way works.
async fn call_trusting(addr: SocketAddr, ca: &str) -> Result<(), String> {
    let channel = tls_channel(addr, ca, "localhost")
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    describe(channel).await
}

async fn describe(channel: Channel) -> Result<(), String> {
    ServersClient::new(channel)
        .describe_servers(pb::DescribeServersRequest::default())
        .await
        .map(drop)
        .map_err(|e| format!("call: {e:?}"))
}

/// A plaintext (h2c) client's attempt to call.
async fn call_in_plaintext(addr: SocketAddr) -> Result<(), String> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(PATIENCE)
        .timeout(PATIENCE)
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    describe(channel).await
}

#[tokio::test]
async fn a_client_trusting_the_ca_gets_every_service() {
    let dir = TempDir::new();
    let g = issue();
    let mut broker = TlsBroker::with(&dir, &g).await;

    // By DNS name, and by IP address (the certificate names both).
    let channel = tls_channel(broker.addr, &g.ca_cert, "localhost")
        .await
        .unwrap();
    let by_ip = tls_channel(broker.addr, &g.ca_cert, "127.0.0.1")
        .await
        .unwrap();

    let mut agent = AgentClient::new(by_ip);
    agent
        .register_server(registration("srv-1", "linux", 4))
        .await
        .unwrap();
    let mut servers = ServersClient::new(channel.clone());
    let closed = servers
        .close_servers(close_req(vec![close_item("srv-1", None, "patching")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(closed.successful_list.len(), 1, "{closed:?}");
    let page = servers
        .describe_servers(describe_ids(&["srv-1"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.servers.len(), 1);
    assert!(!page.servers[0].holds.is_empty(), "srv-1 is closed");

    let status = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    // Graceful shutdown works over TLS too.
    broker.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(PATIENCE, broker.task)
        .await
        .expect("stops within the drain deadline")
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(broker.addr).await.is_err(),
        "port closed"
    );
}

#[tokio::test]
async fn a_client_trusting_another_ca_fails_the_handshake() {
    let dir = TempDir::new();
    let (g, other) = (issue(), issue());
    let broker = TlsBroker::with(&dir, &g).await;

    let err = tls_channel(broker.addr, &other.ca_cert, "localhost")
        .await
        .expect_err("the certificate is not signed by the CA the client trusts");
    let err = format!("{err:?}");
    assert!(err.contains("InvalidCertificate(UnknownIssuer)"), "{err}");
    // A name the certificate does not carry fails too.
    assert!(
        tls_channel(broker.addr, &g.ca_cert, "elsewhere.example")
            .await
            .is_err()
    );
    // And the broker is unharmed.
    call_trusting(broker.addr, &g.ca_cert).await.unwrap();
}

#[tokio::test]
async fn a_plaintext_client_fails_against_the_tls_port() {
    let dir = TempDir::new();
    let g = issue();
    let broker = TlsBroker::with(&dir, &g).await;

    let err = call_in_plaintext(broker.addr)
        .await
        .expect_err("nothing is served in the clear");
    assert!(!err.is_empty());
    call_trusting(broker.addr, &g.ca_cert).await.unwrap();
}

#[tokio::test]
async fn reload_serves_the_new_certificate_to_new_connections() {
    let dir = TempDir::new();
    let (a, b) = (issue(), issue());
    let broker = TlsBroker::with(&dir, &a).await;
    call_trusting(broker.addr, &a.ca_cert).await.unwrap();
    assert!(call_trusting(broker.addr, &b.ca_cert).await.is_err());
    let before = broker.tls.fingerprint();
    // A connection made before the reload.
    let open = tls_channel(broker.addr, &a.ca_cert, "localhost")
        .await
        .unwrap();

    install(&dir, &b);
    broker.tls.reload().unwrap();

    assert_ne!(broker.tls.fingerprint(), before);
    call_trusting(broker.addr, &b.ca_cert)
        .await
        .expect("a new client trusting the new CA connects");
    let err = call_trusting(broker.addr, &a.ca_cert)
        .await
        .expect_err("a new client trusting only the old CA does not");
    assert!(err.starts_with("connect:"), "{err}");
    // The open connection keeps the certificate it started with.
    describe(open).await.unwrap();
}

#[tokio::test]
async fn a_failed_reload_keeps_the_old_certificate() {
    let dir = TempDir::new();
    let (a, b) = (issue(), issue());
    let broker = TlsBroker::with(&dir, &a).await;
    let served = broker.tls.fingerprint();

    // Garbage where the certificate should be.
    replace(&dir.cert(), "not a certificate\n");
    let err = broker.tls.reload().unwrap_err();
    assert!(matches!(err, TlsError::Pem { .. }), "{err:?}");
    assert!(err.to_string().contains("server.pem"), "{err}");

    // A certificate that is not the key's (rotated half-way).
    replace(&dir.cert(), &b.server_cert);
    replace(&dir.key(), &a.server_key);
    let err = broker.tls.reload().unwrap_err();
    assert!(matches!(err, TlsError::Pair { .. }), "{err:?}");

    // A broken PEM block in the key.
    replace(&dir.key(), "-----BEGIN PRIVATE KEY-----\nAAAA\n");
    assert!(matches!(
        broker.tls.reload().unwrap_err(),
        TlsError::Pem { .. }
    ));

    // A missing file.
    std::fs::remove_file(dir.key()).unwrap();
    assert!(matches!(
        broker.tls.reload().unwrap_err(),
        TlsError::Read { .. }
    ));

    assert_eq!(broker.tls.fingerprint(), served);
    call_trusting(broker.addr, &a.ca_cert)
        .await
        .expect("still serving the old certificate");
    assert!(call_trusting(broker.addr, &b.ca_cert).await.is_err());
}

#[tokio::test]
async fn loading_refuses_files_that_are_not_a_pair() {
    let dir = TempDir::new();
    let (a, b) = (issue(), issue());
    replace(&dir.cert(), &a.server_cert);
    replace(&dir.key(), &b.server_key);
    let err = ServerTls::load(dir.cert(), dir.key()).unwrap_err();
    assert!(matches!(err, TlsError::Pair { .. }), "{err:?}");
    replace(&dir.cert(), &a.server_key);
    let err = ServerTls::load(dir.cert(), dir.key()).unwrap_err();
    assert!(err.to_string().contains("no certificate"), "{err}");
    let err = ServerTls::load(dir.path().join("nope.pem"), dir.key()).unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");
}

#[tokio::test]
async fn a_stalled_handshake_does_not_hold_up_other_clients() {
    let dir = TempDir::new();
    let g = issue();
    install(&dir, &g);
    // Longer than the test waits for the well-behaved client, so that only
    // concurrent handshakes can pass.
    let tls = ServerTls::load(dir.cert(), dir.key())
        .unwrap()
        .with_handshake_timeout(PATIENCE * 3);
    let broker = TlsBroker::start(tls).await;

    // Connects and says nothing, for longer than the whole test.
    let stalled = TcpStream::connect(broker.addr).await.unwrap();
    // One that sends garbage and stays.
    let mut garbage = TcpStream::connect(broker.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut garbage, b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();

    tokio::time::timeout(PATIENCE, call_trusting(broker.addr, &g.ca_cert))
        .await
        .expect("a well-behaved client is served while another stalls")
        .unwrap();
    drop((stalled, garbage));
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_is_dropped() {
    let dir = TempDir::new();
    let g = issue();
    install(&dir, &g);
    let tls = ServerTls::load(dir.cert(), dir.key())
        .unwrap()
        .with_handshake_timeout(Duration::from_millis(200));
    let broker = TlsBroker::start(tls).await;

    let mut stalled = TcpStream::connect(broker.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(PATIENCE, stalled.read(&mut buf))
        .await
        .expect("the broker closes the connection after the handshake timeout");
    // Closed: end of stream (or a reset, depending on timing).
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    call_trusting(broker.addr, &g.ca_cert).await.unwrap();
}

// --- the binary ------------------------------------------------------------

fn tls_init(dir: &Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(["tls", "init", "--names", "localhost,127.0.0.1", "--out"])
        .arg(dir)
        .args(extra)
        .output()
        .unwrap()
}

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[cfg(unix)]
fn mode(path: PathBuf) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn tls_init_writes_the_four_files_and_never_overwrites_without_force() {
    let tmp = TempDir::new();
    let dir = tmp.path().join("certs");
    let out = tls_init(&dir, &["--days", "90"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    for name in ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem"] {
        assert!(
            stdout.contains(&*dir.join(name).to_string_lossy()),
            "{stdout}"
        );
    }
    assert!(stdout.contains("--tls-cert"), "{stdout}");
    assert!(stdout.contains("grpcurl -cacert"), "{stdout}");
    #[cfg(unix)]
    {
        assert_eq!(mode(dir.join("ca-key.pem")), 0o600);
        assert_eq!(mode(dir.join("server-key.pem")), 0o600);
    }
    let ca = read(dir.join("ca.pem"));
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");

    // Again: refused, nothing touched.
    let again = tls_init(&dir, &[]);
    assert_eq!(again.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already exist"), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(read(dir.join("ca.pem")), ca);

    // Refused as well when only one of them exists.
    std::fs::remove_file(dir.join("ca.pem")).unwrap();
    assert_eq!(tls_init(&dir, &[]).status.code(), Some(1));
    assert!(!dir.join("ca.pem").exists(), "nothing written");

    // With --force: a new CA, keys still private.
    let forced = tls_init(&dir, &["--force"]);
    assert!(forced.status.success(), "{forced:?}");
    assert_ne!(read(dir.join("ca.pem")), ca);
    #[cfg(unix)]
    assert_eq!(mode(dir.join("server-key.pem")), 0o600);

    let bad = std::process::Command::new(BIN)
        .args(["tls", "init", "--names", "not a name", "--out"])
        .arg(tmp.path().join("other"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("\"not a name\""));
}

#[test]
fn the_binary_wants_both_tls_files_and_readable_ones() {
    let tmp = TempDir::new();
    let half = std::process::Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--in-memory",
            "--tls-cert",
            "x.pem",
        ])
        .output()
        .unwrap();
    assert_eq!(half.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&half.stderr).contains("--tls-cert and --tls-key go together"));
    assert!(half.stdout.is_empty(), "it never listened");

    let missing = std::process::Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--in-memory", "--tls-cert"])
        .arg(tmp.path().join("server.pem"))
        .arg("--tls-key")
        .arg(tmp.path().join("server-key.pem"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("TLS: cannot read"), "{stderr}");
    assert!(missing.stdout.is_empty(), "it never listened");
}

/// Calls until a client trusting `ca` succeeds, a bounded number of times:
/// the reload happens in the broker's own time after the signal.
async fn until_trusted(addr: SocketAddr, ca: &str) {
    let mut pause = Duration::from_millis(10);
    let mut last = String::new();
    for _ in 0..40 {
        match call_trusting(addr, ca).await {
            Ok(()) => return,
            Err(e) => last = e,
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
    panic!("a client trusting the new CA never got through: {last}");
}

#[tokio::test]
async fn the_binary_serves_tls_from_tls_init_files_and_reloads_on_sighup() {
    let tmp = TempDir::new();
    let out = tls_init(tmp.path(), &[]);
    assert!(out.status.success(), "{out:?}");
    let first_ca = read(tmp.path().join("ca.pem"));

    let mut broker = tmp.tls_broker(&[]).await;
    call_trusting(broker.addr, &first_ca).await.unwrap();
    let channel = tls_channel(broker.addr, &first_ca, "127.0.0.1")
        .await
        .unwrap();
    let page = ServersClient::new(channel)
        .describe_servers(pb::DescribeServersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.servers.len(), 3, "the demo fleet, over TLS");
    assert!(call_in_plaintext(broker.addr).await.is_err());

    // Rotate: a new CA and certificate in the same files; then SIGHUP.
    let rotated = tls_init(tmp.path(), &["--force"]);
    assert!(rotated.status.success(), "{rotated:?}");
    let second_ca = read(tmp.path().join("ca.pem"));
    broker.signal("-HUP");
    until_trusted(broker.addr, &second_ca).await;
    broker.logged("SIGHUP: TLS certificate reloaded").await;
    assert!(call_trusting(broker.addr, &first_ca).await.is_err());

    // A bad file and another SIGHUP: logged, and the broker keeps serving
    // the certificate it had.
    replace(&tmp.cert(), "garbage\n");
    broker.signal("-HUP");
    let line = broker.logged("TLS reload failed").await;
    assert!(line.contains("server.pem"), "{line}");
    call_trusting(broker.addr, &second_ca).await.unwrap();

    broker.terminate().await;
}

#[tokio::test]
async fn plaintext_serving_warns_loudly() {
    let mut broker = BrokerProcess::start::<&str>(&[]).await;
    let line = broker.logged("PLAINTEXT").await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("unencrypted"), "{line}");
    let line = broker.logged("authentication OFF").await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("can call every RPC"), "{line}");
    broker.terminate().await;
}

#[tokio::test]
async fn a_flood_of_failed_handshakes_logs_a_few_lines_not_one_each() {
    let tmp = TempDir::new();
    assert!(tls_init(tmp.path(), &[]).status.success());
    let mut broker = tmp.tls_broker(&[]).await;

    // Garbage instead of a ClientHello: each handshake fails at once, and
    // the broker closes the connection after logging (or not) the failure.
    const FLOOD: usize = 200;
    for _ in 0..FLOOD {
        let mut tcp = TcpStream::connect(broker.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        // Ok (the alert, then EOF) or a reset: either way, closed.
        let _ = tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut rest))
            .await
            .expect("the broker closes a failed handshake");
    }
    // A log line after every failure's: everything before it is in.
    broker.signal("-HUP");
    let lines = broker.lines_until("SIGHUP: TLS certificate reloaded").await;
    let failures: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("TLS handshake failed"))
        .collect();
    // The 1st, 2nd, 4th, ... 128th of the minute: 8 lines for 200.
    assert!(
        (1..=10).contains(&failures.len()),
        "{} lines for {FLOOD} failed handshakes: {failures:#?}",
        failures.len()
    );
    let last = failures.last().unwrap();
    assert!(last.contains("failed_this_minute=128"), "{last}");
    assert!(last.contains("does not speak TLS"), "{last}");
    broker.terminate().await;
}

#[tokio::test]
async fn a_tls_session_silent_after_its_handshake_is_closed_at_the_first_request_timeout() {
    use std::sync::Arc;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::{self, pki_types::CertificateDer, pki_types::ServerName};

    let tmp = TempDir::new();
    assert!(tls_init(tmp.path(), &[]).status.success());
    let ca = read(tmp.path().join("ca.pem"));
    let mut broker = tmp.tls_broker(&["--first-request-timeout", "1s"]).await;

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(broker.addr).await.unwrap();
    let mut session = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("the handshake succeeds");
    // Handshake done, then silence: no preface, no request.
    let silent = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(PATIENCE, session.read(&mut buf))
        .await
        .expect("the broker closes a silent TLS session");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // The broker's clock starts when its side of the handshake ends, which
    // may be a little before the client's does: allow that much.
    assert!(
        silent.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before its first-request timeout (1 s)",
        silent.elapsed()
    );
    let line = broker.logged("closed an idle connection").await;
    assert!(
        line.contains("no request within the first-request timeout"),
        "{line}"
    );
    broker.terminate().await;
}

#[tokio::test]
async fn the_agents_port_serves_tls_and_reloads_with_the_main_one() {
    let tmp = TempDir::new();
    let out = tls_init(tmp.path(), &[]);
    assert!(out.status.success(), "{out:?}");
    let first_ca = read(tmp.path().join("ca.pem"));
    let mut broker = tmp.tls_broker(&["--agent-listen", "127.0.0.1:0"]).await;
    let agents = broker.agent_addr.expect("an agents' port");

    let channel = tls_channel(agents, &first_ca, "127.0.0.1").await.unwrap();
    let mut agent = pb::agent_client::AgentClient::new(channel);
    agent
        .register_server(common::registration("tls-agent", "linux", 2))
        .await
        .expect("an agent registers over TLS on the agents' port");
    assert!(
        call_in_plaintext(agents).await.is_err(),
        "no plaintext there either"
    );

    // One SIGHUP reloads the certificate of both ports.
    let rotated = tls_init(tmp.path(), &["--force"]);
    assert!(rotated.status.success(), "{rotated:?}");
    let second_ca = read(tmp.path().join("ca.pem"));
    broker.signal("-HUP");
    broker.logged("SIGHUP: TLS certificate reloaded").await;
    let channel = tls_channel(agents, &second_ca, "127.0.0.1").await.unwrap();
    pb::agent_client::AgentClient::new(channel)
        .heartbeat(common::beat("tls-agent", vec![]))
        .await
        .expect("the agents' port serves the new certificate");
    assert!(tls_channel(agents, &first_ca, "127.0.0.1").await.is_err());

    broker.terminate().await;
}
