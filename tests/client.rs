//! `dcv_broker::client` against real brokers on 127.0.0.1:0: plaintext, TLS
//! trusting the broker's CA with a bearer token on every call (and without
//! one, refused), a CA that is not the broker's, and a broker that is not
//! there.

mod common;

use std::path::PathBuf;

use common::{Broker, quiet_config};
use dcv_broker::{
    BrokerConfig,
    auth::{Auth, AuthConfig, ScopeSet},
    client::{self, ClientError},
    fleet::Fleet,
    pb, serve_tls,
    tls::{ServerTls, init},
};
use tokio::{net::TcpListener, sync::oneshot};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A broker serving TLS with authentication, its CA (PEM) and a token of a
/// client with the `read` scope.
struct TlsAuthBroker {
    url: String,
    ca: String,
    token: String,
    _dir: TempDir,
    _stop: oneshot::Sender<()>,
}

impl TlsAuthBroker {
    async fn start() -> TlsAuthBroker {
        let dir = TempDir(
            std::env::temp_dir().join(format!("dcv-broker-client-{}", uuid::Uuid::new_v4())),
        );
        std::fs::create_dir_all(&dir.0).unwrap();
        let generated = init::generate(&["localhost".into(), "127.0.0.1".into()], 30).unwrap();
        let (cert, key) = (dir.0.join("server.pem"), dir.0.join("server.key"));
        std::fs::write(&cert, &generated.server_cert).unwrap();
        std::fs::write(&key, &generated.server_key).unwrap();
        let tls = ServerTls::load(cert, key).unwrap();

        let auth = Auth::in_memory(AuthConfig::default()).await.unwrap();
        let registered = auth
            .register("client test", ScopeSet::parse("read").unwrap(), None)
            .await
            .unwrap();
        let token = auth
            .issue_token(&registered.client.id, &registered.secret, None)
            .await
            .unwrap()
            .access_token;

        let config = BrokerConfig {
            auth: Some(auth),
            ..quiet_config()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fleet = Fleet::new(config.fleet.clone()).unwrap();
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(serve_tls(listener, fleet, config, tls, async {
            let _ = stopped.await;
        }));
        TlsAuthBroker {
            url: format!("https://{addr}"),
            ca: generated.ca_cert,
            token,
            _dir: dir,
            _stop: stop,
        }
    }
}

async fn describe(broker: &client::BrokerClient) -> Result<(), tonic::Status> {
    broker
        .servers()
        .describe_servers(pb::DescribeServersRequest::default())
        .await
        .map(drop)
}

#[tokio::test]
async fn a_plaintext_broker_answers_without_a_token() {
    let broker = Broker::quiet().await;
    let client = client::connect(&format!("http://{}", broker.addr), None, None)
        .await
        .unwrap();
    describe(&client).await.unwrap();
    // The same channel wraps the other services too.
    client
        .sessions()
        .describe_sessions(pb::DescribeSessionsRequest::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn over_tls_the_token_goes_on_every_call_and_none_is_refused() {
    let broker = TlsAuthBroker::start().await;
    let client = client::builder(&broker.url)
        .ca_pem(broker.ca.as_bytes())
        .token(&broker.token)
        .connect()
        .await
        .unwrap();
    describe(&client).await.unwrap();
    describe(&client).await.unwrap();

    // The same connection without the token: the broker refuses the call,
    // so the token above was what let it through.
    let anonymous = client.with_token(None).unwrap();
    let refused = describe(&anonymous).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    describe(&anonymous.with_token(Some(&broker.token)).unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_broker_certified_by_another_ca_is_not_trusted() {
    let broker = TlsAuthBroker::start().await;
    let other = init::generate(&["localhost".into()], 30).unwrap();
    let e = client::connect(&broker.url, Some(other.ca_cert.as_bytes()), None)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
    // The right CA on the same broker connects: the CA was the difference.
    client::connect(&broker.url, Some(broker.ca.as_bytes()), None)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_absent_broker_is_a_connect_error_naming_its_url() {
    // A port that was free a moment ago: nothing listens there now.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{addr}");
    let e = client::connect(&url, None, None).await.unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
    assert!(e.to_string().contains(&url), "{e}");
}
