//! A smoke test of the `dcv-broker-agent` binary against the real broker
//! binary and a tiny shell-script `dcv`: the host appears in
//! DescribeServers with its host name and the tags of its tags folder; the
//! server id survives a restart; a bad configuration exits 2 with one line
//! naming the key; an unreachable broker is retried with a logged backoff;
//! SIGTERM stops it with status 0. The full end-to-end suite is
//! tests/agent_e2e.rs.

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use common::process::{BrokerProcess, PATIENCE};
use dcv_broker::{client, pb};
use tokio::io::{AsyncBufReadExt, BufReader};

const AGENT_BIN: &str = env!("CARGO_BIN_EXE_dcv-broker-agent");

/// A `dcv` that knows no sessions and answers every other command.
const FAKE_DCV: &str = "#!/bin/sh\ncase \"$1\" in\n  list-sessions) echo '[]' ;;\n  describe-session) echo 'no such session' >&2; exit 1 ;;\n  *) exit 0 ;;\nesac\n";

struct Temp(PathBuf);

impl Temp {
    fn new(name: &str) -> Temp {
        let dir = std::env::temp_dir().join(format!("agent-smoke-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Temp(dir)
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A configuration for a broker at `url`, with a fake `dcv` and two tag
/// files (the later one wins for `rack`).
fn write_config(dir: &Path, url: &str) -> PathBuf {
    let dcv = dir.join("dcv");
    std::fs::write(&dcv, FAKE_DCV).unwrap();
    std::fs::set_permissions(&dcv, std::fs::Permissions::from_mode(0o755)).unwrap();
    let tags = dir.join("tags");
    std::fs::create_dir_all(&tags).unwrap();
    std::fs::write(tags.join("10-site.toml"), "rack = 'r1'\nsite = \"lab\"\n").unwrap();
    std::fs::write(tags.join("20-rack.toml"), "rack = 'r2'\n").unwrap();
    let path = dir.join("agent.conf");
    std::fs::write(
        &path,
        format!(
            "version = '0.1'\n[agent]\nbroker_url = '{url}'\ntags_folder = '{}'\n\
             dcv_command = '{}'\nstate_dir = '{}'\nreconnect_max_delay = 1\n\
             enable_query_logged_in_users = false\n[log]\nlevel = 'info'\n",
            tags.display(),
            dcv.display(),
            dir.join("state").display(),
        ),
    )
    .unwrap();
    path
}

/// The agent binary running, its stderr delivered line by line.
struct AgentProcess {
    child: tokio::process::Child,
    log: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl AgentProcess {
    fn start(config: &Path) -> AgentProcess {
        let mut child = tokio::process::Command::new(AGENT_BIN)
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (tx, log) = tokio::sync::mpsc::unbounded_channel();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
        AgentProcess { child, log }
    }

    async fn logged(&mut self, text: &str) -> String {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let line = self.log.recv().await.expect("the agent's log ended");
                if line.contains(text) {
                    return line;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no agent log line with {text:?}"))
    }

    async fn terminate(mut self) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("the agent stops on SIGTERM")
            .unwrap();
        assert_eq!(status.code(), Some(0), "a clean stop exits 0");
    }
}

fn server_id(config: &Path) -> String {
    let out = std::process::Command::new(AGENT_BIN)
        .args(["server-id", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// `dcv-broker-agent check` with this configuration.
async fn check(config: &Path) -> std::process::Output {
    tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(AGENT_BIN)
            .args(["check", "--config"])
            .arg(config)
            .env("DCV_BROKER_AGENT_LOG", "off")
            .output(),
    )
    .await
    .expect("check answers")
    .unwrap()
}

#[tokio::test]
async fn the_host_registers_with_its_hostname_and_tags_and_keeps_its_id() {
    let tmp = Temp::new("register");
    let broker = BrokerProcess::start_exactly(&["--in-memory", "--heartbeat-interval", "1s"]).await;
    let config = write_config(&tmp.0, &format!("http://{}", broker.addr));
    let id = server_id(&config);
    assert_eq!(server_id(&config), id, "the id is made once");

    let check = check(&config).await;
    assert_eq!(check.status.code(), Some(0), "{check:?}");
    assert_eq!(String::from_utf8_lossy(&check.stdout), "ok\n");

    let mut agent = AgentProcess::start(&config);
    let line = agent.logged("registered server_id=").await;
    assert!(line.contains(&id), "{line}");
    agent.logged("instruction stream open").await;

    let api = client::connect(&format!("http://{}", broker.addr), None, None)
        .await
        .unwrap();
    // Bounded polling: the server is there once registered, and available
    // once a heartbeat said its DCV server answers.
    let servers = tokio::time::timeout(PATIENCE, async {
        loop {
            let servers = api
                .servers()
                .describe_servers(pb::DescribeServersRequest {
                    server_ids: vec![id.clone()],
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .servers;
            if servers
                .iter()
                .any(|s| s.availability == pb::Availability::Available as i32)
            {
                return servers;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the server becomes available");
    assert_eq!(servers.len(), 1, "{servers:?}");
    let server = &servers[0];
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(server.hostname, hostname.trim());
    let tags: Vec<(String, String)> = server
        .tags
        .iter()
        .map(|t| (t.key.clone(), t.value.clone()))
        .collect();
    assert!(tags.contains(&("rack".into(), "r2".into())), "{tags:?}");
    assert!(tags.contains(&("site".into(), "lab".into())), "{tags:?}");
    let host = server.host.as_ref().unwrap();
    assert_eq!(host.os.as_ref().unwrap().family, "linux");
    assert!(host.memory.as_ref().unwrap().total_bytes > 0);

    agent.terminate().await;
    // The same id after a restart.
    let mut again = AgentProcess::start(&config);
    let line = again.logged("registered server_id=").await;
    assert!(line.contains(&id), "{line}");
    again.terminate().await;
    broker.terminate().await;
}

#[tokio::test]
async fn an_unreachable_broker_is_retried_with_a_logged_backoff() {
    let tmp = Temp::new("unreachable");
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = write_config(&tmp.0, &format!("http://127.0.0.1:{port}"));
    let check = check(&config).await;
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{check:?}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("dcv-broker-agent: cannot use the broker"),
        "{stderr}"
    );
    let mut agent = AgentProcess::start(&config);
    for _ in 0..2 {
        let line = agent.logged("broker unreachable").await;
        assert!(line.contains("retrying in"), "{line}");
    }
    agent.terminate().await;
}

#[tokio::test]
async fn a_bad_configuration_exits_2_naming_the_key() {
    let tmp = Temp::new("bad");
    let cases = [
        (
            "[agent]\nbrokr_host = 'x'\n",
            "unknown key `brokr_host` in [agent]",
        ),
        ("[agent]\n", "[agent] broker_host is required"),
        (
            "[agent]\nbroker_host = 'x'\nca_file = '/nope.pem'\n",
            "[agent] ca_file: cannot read /nope.pem",
        ),
    ];
    for (text, expected) in cases {
        let path = tmp.0.join("agent.conf");
        std::fs::write(&path, text).unwrap();
        for args in [&["--config"][..], &["check", "--config"][..]] {
            let out = tokio::time::timeout(
                Duration::from_secs(20),
                tokio::process::Command::new(AGENT_BIN)
                    .args(args)
                    .arg(&path)
                    .output(),
            )
            .await
            .unwrap()
            .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{text:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(stderr.starts_with("dcv-broker-agent: "), "{stderr}");
            assert!(stderr.contains(expected), "{text:?}: {stderr}");
        }
    }
}

/// `dcv-broker tls init`'s files in `dir`, for localhost and 127.0.0.1.
fn tls_init(dir: &Path) {
    let out = std::process::Command::new(common::process::BROKER_BIN)
        .args(["tls", "init", "--names", "localhost,127.0.0.1", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn over_tls_the_broker_is_verified_unless_tls_strict_is_false() {
    let tmp = Temp::new("tls");
    let certs = tmp.0.join("certs");
    tls_init(&certs);
    let cert = certs.join("server.pem");
    let key = certs.join("server-key.pem");
    let args: Vec<&std::ffi::OsStr> = vec![
        "--in-memory".as_ref(),
        "--tls-cert".as_ref(),
        cert.as_os_str(),
        "--tls-key".as_ref(),
        key.as_os_str(),
        "--auth".as_ref(),
        "off".as_ref(),
    ];
    let broker = BrokerProcess::start_exactly(&args).await;
    let port = broker.addr.port();
    let base = write_config(&tmp.0, "http://127.0.0.1:1");
    let base = std::fs::read_to_string(base).unwrap().replace(
        "broker_url = 'http://127.0.0.1:1'",
        &format!("broker_host = '127.0.0.1'\nbroker_port = {port}"),
    );
    let cases = [
        (
            format!("ca_file = '{}'\n", certs.join("ca.pem").display()),
            true,
        ),
        ("tls_strict = false\n".to_owned(), true),
        (String::new(), false),
    ];
    for (extra, registers) in cases {
        let path = tmp.0.join("tls.conf");
        std::fs::write(
            &path,
            base.replace("[agent]\n", &format!("[agent]\n{extra}")),
        )
        .unwrap();
        let mut agent = AgentProcess::start(&path);
        if registers {
            agent.logged("registered server_id=").await;
        } else {
            // The system roots do not hold the test CA.
            let line = agent.logged("broker unreachable").await;
            assert!(line.contains("retrying in"), "{line}");
            assert!(line.contains("UnknownIssuer"), "{line}");
        }
        agent.terminate().await;
    }
    broker.terminate().await;
}

/// `dcv-broker clients register` on a stopped broker's store: the client
/// id and secret.
fn register_agent_client(data: &Path, server_id: &str) -> (String, String) {
    let out = std::process::Command::new(common::process::BROKER_BIN)
        .args([
            "clients", "register", "--name", "agent", "--scopes", "agent",
        ])
        .args(["--server-id", server_id, "--json", "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let client = &reply["client"];
    (
        client["client_id"].as_str().unwrap().to_owned(),
        client["client_secret"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn with_client_credentials_the_agent_buys_a_token_and_registers() {
    let tmp = Temp::new("oauth");
    let data = tmp.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = write_config(&tmp.0, "http://127.0.0.1:1");
    let id = server_id(&config);
    let (client_id, secret) = register_agent_client(&data, &id);
    let (other_id, other_secret) = register_agent_client(&data, "another-server");
    let mut args = ["--auth", "on", "--data-dir"]
        .map(std::ffi::OsStr::new)
        .to_vec();
    args.push(data.as_os_str());
    let broker = BrokerProcess::start_exactly(&args).await;
    let secret_file = tmp.0.join("secret");
    let base = std::fs::read_to_string(&config)
        .unwrap()
        .replace("http://127.0.0.1:1", &format!("http://{}", broker.addr));
    for (client, secret, registers) in [
        (&client_id, &secret, true),
        (&other_id, &other_secret, false),
    ] {
        let _ = std::fs::remove_file(&secret_file);
        std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
        std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(
            &config,
            base.replace(
                "[agent]\n",
                &format!(
                    "[agent]\nclient_id = '{client}'\nclient_secret_file = '{}'\n",
                    secret_file.display()
                ),
            ),
        )
        .unwrap();
        let mut agent = AgentProcess::start(&config);
        if registers {
            agent.logged("registered server_id=").await;
            agent.logged("instruction stream open").await;
        } else {
            // A client bound to another server may not act for this one.
            let line = agent.logged("broker unreachable").await;
            assert!(line.contains("PermissionDenied"), "{line}");
        }
        agent.terminate().await;
    }
    broker.terminate().await;
}

#[tokio::test]
async fn with_an_agent_certificate_the_agent_registers_over_mutual_tls() {
    let tmp = Temp::new("mtls");
    let certs = tmp.0.join("certs");
    tls_init(&certs);
    let config = write_config(&tmp.0, "http://127.0.0.1:1");
    let id = server_id(&config);
    let out = std::process::Command::new(common::process::BROKER_BIN)
        .args(["tls", "agent-cert", "--server-id", &id, "--ca-dir"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (cert, key, ca) = (
        certs.join("server.pem"),
        certs.join("server-key.pem"),
        certs.join("ca.pem"),
    );
    let args: Vec<&std::ffi::OsStr> = vec![
        "--in-memory".as_ref(),
        "--tls-cert".as_ref(),
        cert.as_os_str(),
        "--tls-key".as_ref(),
        key.as_os_str(),
        "--agent-ca".as_ref(),
        ca.as_os_str(),
    ];
    let broker = BrokerProcess::start_exactly(&args).await;
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "broker_url = 'http://127.0.0.1:1'",
        &format!(
            "broker_host = '127.0.0.1'\nbroker_port = {}\nca_file = '{}'\ncert_file = '{}'\nkey_file = '{}'",
            broker.addr.port(),
            ca.display(),
            certs.join(format!("agent-{id}.pem")).display(),
            certs.join(format!("agent-{id}-key.pem")).display(),
        ),
    );
    std::fs::write(&config, &text).unwrap();
    let mut agent = AgentProcess::start(&config);
    let line = agent.logged("registered server_id=").await;
    assert!(line.contains(&id), "{line}");
    agent.logged("instruction stream open").await;
    agent.terminate().await;

    // A certificate issued for another server is a configuration error,
    // said at once rather than retried forever.
    let out = std::process::Command::new(common::process::BROKER_BIN)
        .args(["tls", "agent-cert", "--server-id", "other-host", "--ca-dir"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::write(
        &config,
        text.replace(&format!("agent-{id}"), "agent-other-host"),
    )
    .unwrap();
    let out = tokio::process::Command::new(AGENT_BIN)
        .arg("--config")
        .arg(&config)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("[agent] cert_file:") && stderr.contains("other-host"),
        "{stderr}"
    );
    broker.terminate().await;
}

#[tokio::test]
async fn a_server_the_broker_forgot_registers_again() {
    let tmp = Temp::new("forgotten");
    let broker = BrokerProcess::start_exactly(&["--in-memory", "--heartbeat-interval", "1s"]).await;
    let config = write_config(&tmp.0, &format!("http://{}", broker.addr));
    let id = server_id(&config);
    let mut agent = AgentProcess::start(&config);
    agent.logged("instruction stream open").await;
    let api = client::connect(&format!("http://{}", broker.addr), None, None)
        .await
        .unwrap();
    // As if its agent had left: the broker forgets the (open) server.
    let removed = api
        .agent()
        .deregister_server(pb::DeregisterServerRequest {
            server_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(removed.removed);
    // The broker ends the server's instruction stream (or answers the next
    // heartbeat NOT_FOUND): either way the agent registers again.
    let line = agent.logged("registered server_id=").await;
    assert!(line.contains(&id), "{line}");
    let servers = api
        .servers()
        .describe_servers(pb::DescribeServersRequest {
            server_ids: vec![id.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .servers;
    assert_eq!(servers.len(), 1, "registered again: {servers:?}");
    agent.terminate().await;
    broker.terminate().await;
}
