//! systemd's notification protocol, through the real binary: with
//! `NOTIFY_SOCKET` set, the broker says READY=1 only once its port takes
//! connections, pings the watchdog at half of `WATCHDOG_USEC`, and says
//! STOPPING=1 when SIGTERM starts its shutdown; so does the agent.

mod common;

use std::{net::SocketAddr, path::PathBuf};

use common::{
    agent_process::{AgentHome, AgentProcess},
    process::{BROKER_BIN, BrokerProcess, PATIENCE},
};
use tokio::net::UnixDatagram;

/// The service manager's end: a datagram socket in a directory of its own.
struct Manager {
    socket: UnixDatagram,
    dir: PathBuf,
}

impl Manager {
    fn bind() -> Manager {
        let dir = std::env::temp_dir().join(format!("dcv-broker-notify-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = UnixDatagram::bind(dir.join("notify.sock")).unwrap();
        Manager { socket, dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("notify.sock")
    }

    /// The next notification, its `KEY=VALUE` lines.
    async fn next(&self) -> Vec<String> {
        let mut buf = vec![0; 4096];
        let len = tokio::time::timeout(PATIENCE, self.socket.recv(&mut buf))
            .await
            .expect("a notification in time")
            .unwrap();
        String::from_utf8(buf[..len].to_vec())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Notifications up to and including the first with `line`; returns
    /// that one.
    async fn until(&self, line: &str) -> Vec<String> {
        loop {
            let message = self.next().await;
            if message.iter().any(|l| l == line) {
                return message;
            }
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn ready_once_listening_watchdog_pings_and_stopping_on_sigterm() {
    let manager = Manager::bind();
    let mut command = tokio::process::Command::new(BROKER_BIN);
    command
        .env("NOTIFY_SOCKET", manager.path())
        // A 200 ms watchdog: pinged every 100 ms.
        .env("WATCHDOG_USEC", "200000")
        .env("DCV_BROKER_SHUTDOWN_GRACE", "0s")
        .args([
            "--listen",
            "127.0.0.1:0",
            "--in-memory",
            "--demo-fleet",
            "1",
        ]);
    // Read the notifications as they come, while the harness waits for the
    // listening line on stdout.
    let (broker, ready) = tokio::join!(BrokerProcess::spawn(command), async {
        let ready = manager.until("READY=1").await;
        // The port READY=1 announces takes a connection at once.
        let status = ready
            .iter()
            .find_map(|l| l.strip_prefix("STATUS=serving on "))
            .unwrap_or_else(|| panic!("READY=1 says where it serves: {ready:?}"));
        let addr: SocketAddr = status.parse().unwrap();
        tokio::net::TcpStream::connect(addr)
            .await
            .expect("the port is listening when READY=1 arrives");
        addr
    });
    assert_eq!(ready, broker.addr);

    manager.until("WATCHDOG=1").await;
    manager.until("WATCHDOG=1").await;

    broker.signal("-TERM");
    let stopping = manager.until("STOPPING=1").await;
    assert!(
        stopping.iter().any(|l| l.starts_with("STATUS=")),
        "{stopping:?}"
    );
    let mut broker = broker;
    assert_eq!(broker.exited().await.code(), Some(0));
}

/// Without `NOTIFY_SOCKET` nothing is sent and nothing fails; with one
/// nobody listens on, the broker serves all the same.
#[tokio::test]
async fn serves_without_a_service_manager() {
    let gone =
        std::env::temp_dir().join(format!("dcv-broker-notify-gone-{}", uuid::Uuid::new_v4()));
    let mut command = tokio::process::Command::new(BROKER_BIN);
    command
        .env("NOTIFY_SOCKET", &gone)
        .env("DCV_BROKER_SHUTDOWN_GRACE", "0s")
        .args(["--listen", "127.0.0.1:0", "--in-memory"]);
    let broker = BrokerProcess::spawn(command).await;
    std::net::TcpStream::connect(broker.addr).expect("serving");
    broker.terminate().await;
}

/// The agent is ready once it runs, naming its server, and says
/// STOPPING=1 on SIGTERM.
#[tokio::test]
async fn the_agent_notifies_ready_and_stopping() {
    let broker = BrokerProcess::start::<&str>(&[]).await;
    let home = AgentHome::new(&format!("http://{}", broker.addr), "");
    let manager = Manager::bind();
    let socket = manager.path();
    let mut agent = AgentProcess::start_with_env(&home, &[("NOTIFY_SOCKET", socket.as_os_str())]);
    let ready = manager.until("READY=1").await;
    let id = agent.registered().await;
    assert!(ready.contains(&format!("STATUS=server {id}")), "{ready:?}");
    agent.signal("-TERM");
    manager.until("STOPPING=1").await;
    assert_eq!(agent.exited().await.code(), Some(0));
    broker.terminate().await;
}
