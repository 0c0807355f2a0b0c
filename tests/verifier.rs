//! DCV's token verifier (`POST /agent/validate-authentication-token`)
//! against the real broker binary, as a DCV server calls it: a form over
//! HTTP/1.1, h2c or TLS, answered with DCV's XML. A token from
//! GetSessionConnectionData admits its user to its own READY session only,
//! and only until it expires; garbage, other sessions, deleted sessions,
//! wrong methods, content types and sizes are refused, never with a 500;
//! and the route needs no bearer token when the broker requires them.

mod common;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use common::process::{BROKER_BIN, BrokerProcess, PATIENCE};
use dcv_broker::pb::{self, sessions_client::SessionsClient};
use http::{HeaderMap, Method, StatusCode, header};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::{
    self,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use tonic::transport::Channel;

const PATH: &str = "/agent/validate-authentication-token";
const FORM: &str = "application/x-www-form-urlencoded";

/// A directory removed at the end of the test.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("dcv-verifier-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How a request reaches the broker.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Wire {
    Http1,
    H2c,
    /// HTTP/1.1 over TLS (ALPN http/1.1), trusting [`Client::ca`].
    TlsHttp1,
    /// HTTP/2 over TLS (ALPN h2).
    TlsH2,
}

/// A verifier client: what a DCV server is to the broker.
struct Client {
    addr: SocketAddr,
    wire: Wire,
    ca: Option<String>,
}

/// An answer: status, headers, body text.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    /// DCV's yes, for `user` (as it appears in the XML).
    fn assert_yes(&self, user_xml: &str) {
        assert_eq!(self.status, StatusCode::OK, "{self:?}");
        assert_eq!(self.headers[header::CONTENT_TYPE], "text/xml", "{self:?}");
        assert_eq!(
            self.body,
            format!("<auth result=\"yes\"><username>{user_xml}</username></auth>")
        );
    }

    /// DCV's no with `status`; returns the message.
    fn assert_no(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.headers[header::CONTENT_TYPE], "text/xml", "{self:?}");
        let message = self
            .body
            .strip_prefix("<auth result=\"no\"><message>")
            .and_then(|rest| rest.strip_suffix("</message></auth>"))
            .unwrap_or_else(|| panic!("not DCV's no: {self:?}"));
        assert!(!message.is_empty());
        assert!(!message.contains('<'), "{self:?}");
        message.to_owned()
    }
}

type Body = BoxBody<Bytes, std::convert::Infallible>;

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

impl Client {
    /// POSTs DCV's form.
    async fn verify(&self, session_id: &str, token: &str) -> Reply {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("sessionId", session_id)
            .append_pair("authenticationToken", token)
            .append_pair("clientAddress", "198.51.100.7")
            .finish();
        self.send(Method::POST, Some(FORM), full(body)).await
    }

    async fn send(&self, method: Method, content_type: Option<&str>, body: Body) -> Reply {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{PATH}", self.addr));
        if matches!(self.wire, Wire::Http1 | Wire::TlsHttp1) {
            builder = builder
                .uri(PATH)
                .header(header::HOST, self.addr.to_string());
        } else if matches!(self.wire, Wire::TlsH2) {
            builder = builder.uri(format!("https://localhost:{}{PATH}", self.addr.port()));
        }
        if let Some(content_type) = content_type {
            builder = builder.header(header::CONTENT_TYPE, content_type);
        }
        let request = builder.body(body).unwrap();
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let response = match self.wire {
            Wire::Http1 => http1(tcp, request).await,
            Wire::H2c => h2(tcp, request).await,
            Wire::TlsHttp1 => http1(self.tls(tcp, false).await, request).await,
            Wire::TlsH2 => h2(self.tls(tcp, true).await, request).await,
        };
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap(),
        }
    }

    async fn tls(
        &self,
        tcp: tokio::net::TcpStream,
        h2: bool,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca.as_deref().unwrap().as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = if h2 {
            vec![b"h2".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("the TLS handshake succeeds");
        let negotiated = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        if h2 {
            assert_eq!(negotiated.as_deref(), Some(&b"h2"[..]));
        }
        stream
    }
}

async fn http1<S>(stream: S, request: http::Request<Body>) -> http::Response<hyper::body::Incoming>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_11);
    response
}

async fn h2<S>(stream: S, request: http::Request<Body>) -> http::Response<hyper::body::Incoming>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    response
}

/// `message` with `authorization: Bearer <token>` when there is a token.
fn authorized<T>(message: T, bearer: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = bearer {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// Creates a session for `owner` on the demo fleet, waits (bounded) until
/// its simulated agent has made it READY, and returns its id and a
/// connection token for `owner`.
async fn ready_session(
    sessions: &mut SessionsClient<Channel>,
    owner: &str,
    bearer: Option<&str>,
) -> (String, String) {
    let created = sessions
        .create_sessions(authorized(
            common::create_req(vec![common::create_item(
                "desk",
                owner,
                pb::SessionType::Virtual,
            )]),
            bearer,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.successful_list.len(), 1, "{created:?}");
    let id = created.successful_list[0].id.clone();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let data = sessions
            .get_session_connection_data(authorized(
                pb::GetSessionConnectionDataRequest {
                    session_id: id.clone(),
                    user: owner.into(),
                },
                bearer,
            ))
            .await;
        match data {
            Ok(data) => return (id, data.into_inner().connection_token),
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "session {id} never became READY"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
}

async fn sessions_client(addr: SocketAddr) -> SessionsClient<Channel> {
    SessionsClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
}

#[tokio::test]
async fn a_token_admits_its_user_to_its_session_only_over_http1_and_h2c() {
    let mut broker = BrokerProcess::start(&["--log", "debug"]).await;
    let mut sessions = sessions_client(broker.addr).await;
    let (gus_session, gus_token) = ready_session(&mut sessions, "gus", None).await;
    let odd_owner = "o'<b&c\"d>";
    let (odd_session, odd_token) = ready_session(&mut sessions, odd_owner, None).await;

    for wire in [Wire::Http1, Wire::H2c] {
        let client = Client {
            addr: broker.addr,
            wire,
            ca: None,
        };
        client
            .verify(&gus_session, &gus_token)
            .await
            .assert_yes("gus");
        // The user name comes out escaped, and the document well-formed.
        client
            .verify(&odd_session, &odd_token)
            .await
            .assert_yes("o&apos;&lt;b&amp;c&quot;d&gt;");

        // Another session's id: the token is bound to its own.
        let why = client
            .verify(&odd_session, &gus_token)
            .await
            .assert_no(StatusCode::OK);
        assert_eq!(why, "the token is for another session");
        let why = client
            .verify("no-such-session", &gus_token)
            .await
            .assert_no(StatusCode::OK);
        assert_eq!(why, "the token is for another session");

        // Garbled tokens.
        let mut flipped = gus_token.clone().into_bytes();
        flipped[5] = if flipped[5] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        let long = "A".repeat(5 * 1024);
        let huge = "A".repeat(10 * 1024);
        for garbled in [
            flipped.as_str(),
            &gus_token[..gus_token.len() - 3],
            &gus_token[..gus_token.len() / 2],
            "",
            "Zm9vYmFy.YmF6",
            "!!!not base64!!!",
            long.as_str(),
            huge.as_str(),
        ] {
            let reply = client.verify(&gus_session, garbled).await;
            let why = reply.assert_no(if garbled.len() > 8 * 1024 {
                // Over the form's bound before any field is looked at.
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::OK
            });
            if garbled.len() > 20 {
                assert!(!why.contains(garbled), "the token is not echoed: {why}");
            }
        }

        // Forms that are not DCV's: result="no", HTTP 200.
        for (body, expected) in [
            ("sessionId=x".to_owned(), "authenticationToken is missing"),
            (
                format!("authenticationToken={gus_token}"),
                "sessionId is missing",
            ),
            (
                format!("sessionId={gus_session}&sessionId=x&authenticationToken={gus_token}"),
                "sessionId is given more than once",
            ),
            (
                format!("sessionId={gus_session}&authenticationToken=%C3%28"),
                "the form is not UTF-8",
            ),
        ] {
            let why = client
                .send(Method::POST, Some(FORM), full(body))
                .await
                .assert_no(StatusCode::OK);
            assert_eq!(why, expected);
        }
        let why = client
            .send(Method::POST, Some(FORM), full(&b"sessionId=\xff\xfe"[..]))
            .await
            .assert_no(StatusCode::OK);
        assert_eq!(why, "the form is not UTF-8");

        // Not DCV's request at all: HTTP errors, still DCV's no.
        for method in [Method::GET, Method::PUT, Method::DELETE] {
            let reply = client.send(method, Some(FORM), full("")).await;
            reply.assert_no(StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(reply.headers[header::ALLOW], "POST");
        }
        for content_type in [Some("application/json"), Some("text/plain"), None] {
            let form = format!("sessionId={gus_session}&authenticationToken={gus_token}");
            client
                .send(Method::POST, content_type, full(form))
                .await
                .assert_no(StatusCode::UNSUPPORTED_MEDIA_TYPE);
        }
        client
            .send(Method::POST, Some(FORM), full(vec![b'a'; 8 * 1024 + 1]))
            .await
            .assert_no(StatusCode::PAYLOAD_TOO_LARGE);
        // The bound holds without a Content-Length too: the body is read
        // with a limit, never buffered whole.
        let chunks = (0..4).map(|_| {
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(vec![b'a'; 4096])))
        });
        let streamed = StreamBody::new(tokio_stream::iter(chunks)).boxed();
        client
            .send(Method::POST, Some(FORM), streamed)
            .await
            .assert_no(StatusCode::PAYLOAD_TOO_LARGE);
    }

    // One debug line per verdict, with the session id and the client's
    // address, never the token.
    let line = broker.logged("token accepted").await;
    assert!(line.contains(&gus_session), "{line}");
    assert!(line.contains("198.51.100.7"), "{line}");
    let refused = broker.logged("token refused").await;
    for line in [line, refused].iter().chain(broker.drain_log().iter()) {
        assert!(!line.contains(&gus_token), "the token is logged: {line}");
        assert!(!line.contains(&odd_token), "the token is logged: {line}");
    }

    // A deleted session admits no one, whatever its token.
    let deleted = sessions
        .delete_sessions(pb::DeleteSessionsRequest {
            sessions: vec![pb::DeleteSessionRequestData {
                session_id: gus_session.clone(),
                owner: "gus".into(),
                force: None,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.successful_list.len(), 1, "{deleted:?}");
    let client = Client {
        addr: broker.addr,
        wire: Wire::Http1,
        ca: None,
    };
    let why = client
        .verify(&gus_session, &gus_token)
        .await
        .assert_no(StatusCode::OK);
    assert_eq!(why, "the session is not READY");
    broker.terminate().await;
}

#[tokio::test]
async fn a_token_is_refused_once_it_has_expired() {
    // Expiry is decided against the wall clock in whole seconds: a
    // 3-second token is valid for at least 2 seconds after it is issued,
    // and expired at most 4 seconds after. Polled, not slept on.
    let broker = BrokerProcess::start(&["--connection-token-ttl", "3s"]).await;
    let mut sessions = sessions_client(broker.addr).await;
    let (session, token) = ready_session(&mut sessions, "gus", None).await;
    let client = Client {
        addr: broker.addr,
        wire: Wire::Http1,
        ca: None,
    };
    client.verify(&session, &token).await.assert_yes("gus");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let reply = client.verify(&session, &token).await;
        if reply.status == StatusCode::OK && reply.body.contains("result=\"no\"") {
            assert_eq!(reply.assert_no(StatusCode::OK), "the token has expired");
            break;
        }
        reply.assert_yes("gus");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the token never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A fresh token for the same session is accepted again.
    let fresh = sessions
        .get_session_connection_data(pb::GetSessionConnectionDataRequest {
            session_id: session.clone(),
            user: "gus".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .connection_token;
    client.verify(&session, &fresh).await.assert_yes("gus");
    broker.terminate().await;
}

#[tokio::test]
async fn the_verifier_is_served_over_tls_with_http1_and_h2() {
    let dir = TempDir::new();
    let init = std::process::Command::new(BROKER_BIN)
        .args(["tls", "init", "--names", "localhost,127.0.0.1", "--out"])
        .arg(&dir.0)
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let ca = std::fs::read_to_string(dir.0.join("ca.pem")).unwrap();
    let (cert, key) = (dir.0.join("server.pem"), dir.0.join("server-key.pem"));
    let mut broker = BrokerProcess::start(&[
        "--tls-cert".as_ref(),
        cert.as_os_str(),
        "--tls-key".as_ref(),
        key.as_os_str(),
        "--auth".as_ref(),
        "off".as_ref(),
    ])
    .await;
    broker.logged("TLS only").await;
    let channel = Channel::from_shared(format!("https://localhost:{}", broker.addr.port()))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&ca)),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut sessions = SessionsClient::new(channel);
    let (session, token) = ready_session(&mut sessions, "gus", None).await;
    for wire in [Wire::TlsHttp1, Wire::TlsH2] {
        let client = Client {
            addr: broker.addr,
            wire,
            ca: Some(ca.clone()),
        };
        client.verify(&session, &token).await.assert_yes("gus");
        client
            .verify(&session, "garbage")
            .await
            .assert_no(StatusCode::OK);
    }
    broker.terminate().await;
}

#[tokio::test]
async fn the_verifier_needs_no_bearer_token_when_the_broker_requires_them() {
    let dir = TempDir::new();
    let register = std::process::Command::new(BROKER_BIN)
        .args([
            "clients",
            "register",
            "--name",
            "portal",
            "--scopes",
            "sessions:manage",
            "--json",
            "--data-dir",
        ])
        .arg(&dir.0)
        .output()
        .unwrap();
    assert!(register.status.success(), "{register:?}");
    let reply: serde_json::Value = serde_json::from_slice(&register.stdout).unwrap();
    let (id, secret) = (
        reply["client"]["client_id"].as_str().unwrap().to_owned(),
        reply["client"]["client_secret"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    let broker = BrokerProcess::start_exactly(&[
        "--auth".as_ref(),
        "on".as_ref(),
        "--demo-fleet".as_ref(),
        "3".as_ref(),
        "--data-dir".as_ref(),
        dir.0.as_os_str(),
    ])
    .await;
    let client = Client {
        addr: broker.addr,
        wire: Wire::Http1,
        ca: None,
    };
    // The portal's bearer token, from the broker's token endpoint.
    let form = format!("grant_type=client_credentials&client_id={id}&client_secret={secret}");
    let request = http::Request::builder()
        .method(Method::POST)
        .uri("/oauth2/token")
        .header(header::HOST, broker.addr.to_string())
        .header(header::CONTENT_TYPE, FORM)
        .body(full(form))
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let response = http1(tcp, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let token: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let bearer = token["access_token"].as_str().unwrap().to_owned();

    let mut sessions = sessions_client(broker.addr).await;
    // Without the bearer token, gRPC is refused...
    let refused = sessions
        .describe_sessions(pb::DescribeSessionsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let (session, connection_token) = ready_session(&mut sessions, "gus", Some(&bearer)).await;
    // ...but a DCV server, which has none, is answered.
    client
        .verify(&session, &connection_token)
        .await
        .assert_yes("gus");
    client
        .verify(&session, "garbage")
        .await
        .assert_no(StatusCode::OK);
    broker.terminate().await;
}

/// An HTTP/2 connection to the broker from `source` (any 127.0.0.0/8
/// address is this host: a second peer without a second machine).
async fn h2_from(
    source: [u8; 4],
    broker: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<Body> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    let tcp = socket.connect(broker).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

fn form_request(broker: SocketAddr, body: Body) -> http::Request<Body> {
    http::Request::builder()
        .method(Method::POST)
        .uri(format!("http://{broker}{PATH}"))
        .header(header::CONTENT_TYPE, FORM)
        .body(body)
        .unwrap()
}

#[tokio::test]
async fn a_peer_holding_forms_open_is_bounded_and_timed_out_and_others_get_in() {
    let broker = BrokerProcess::start(&[] as &[&str]).await;
    let addr = broker.addr;
    let probe = |mut sender: hyper::client::conn::http2::SendRequest<Body>| async move {
        let response = sender
            .send_request(form_request(
                addr,
                full("sessionId=s&authenticationToken=garbage"),
            ))
            .await
            .unwrap();
        response.status()
    };

    // One peer starts 32 forms (the per-address bound) and never ends
    // them: no Content-Length, half a form, then silence.
    let holder = h2_from([127, 0, 0, 1], addr).await;
    let mut held = Vec::new();
    let mut bodies = Vec::new();
    for _ in 0..32 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(Ok(http_body::Frame::data(Bytes::from_static(
            b"sessionId=s",
        ))))
        .await
        .unwrap();
        bodies.push(tx);
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
        let mut sender = holder.clone();
        held.push(tokio::spawn(async move {
            sender
                .send_request(form_request(addr, body))
                .await
                .unwrap()
                .status()
        }));
    }
    // Its next request is refused at once, once the broker holds all 32
    // (polled: the 32 reach it in their own time).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match probe(holder.clone()).await {
            StatusCode::SERVICE_UNAVAILABLE => break,
            status => assert_eq!(status, StatusCode::OK),
        }
        assert!(tokio::time::Instant::now() < deadline, "never bounded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another address is answered meanwhile.
    assert_eq!(
        probe(h2_from([127, 0, 0, 2], addr).await).await,
        StatusCode::OK
    );

    // The held forms are cut off at the read timeout (5 s)...
    for request in held {
        let status = tokio::time::timeout(PATIENCE, request)
            .await
            .expect("answered within the read timeout")
            .unwrap();
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    }
    drop(bodies);
    // ...and their slots are back.
    assert_eq!(probe(holder.clone()).await, StatusCode::OK);
    broker.terminate().await;
}
