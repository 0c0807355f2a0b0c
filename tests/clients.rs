//! `dcv-broker clients` against the real binary: registering on a stopped
//! broker's store and through a running broker's admin socket, tokens from
//! the broker's /oauth2/token over plain HTTP/1.1, revocation taking effect
//! on tokens already issued, and clients and the signing key surviving a
//! restart; DCV's `register-api-client` spelling and its two-line output.

mod common;

use std::{ffi::OsStr, path::Path, time::Duration};

use base64::Engine as _;
use common::process::{BROKER_BIN, BrokerProcess};
use dcv_broker::pb::{self, servers_client::ServersClient};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{Code, metadata::MetadataValue, transport::Channel};

const PATIENCE: Duration = Duration::from_secs(30);

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("dcv-clients-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `dcv-broker clients ARGS --data-dir DIR --json`; the reply, or the
/// error printed.
fn clients(dir: &Path, args: &[&str]) -> Result<Value, String> {
    let out = std::process::Command::new(BROKER_BIN)
        .arg("clients")
        .args(args)
        .args(["--json", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn register(dir: &Path, name: &str, scopes: &str) -> (String, String) {
    let reply = clients(dir, &["register", "--name", name, "--scopes", scopes]).unwrap();
    let client = &reply["client"];
    (
        client["client_id"].as_str().unwrap().to_owned(),
        client["client_secret"].as_str().unwrap().to_owned(),
    )
}

/// The broker binary with `--auth on` on a data directory.
struct Running(BrokerProcess);

impl Running {
    async fn start(dir: &Path) -> Running {
        let mut args = ["--auth", "on", "--demo-fleet", "2", "--data-dir"]
            .map(OsStr::new)
            .to_vec();
        args.push(dir.as_os_str());
        Running(BrokerProcess::start_exactly(&args).await)
    }

    /// SIGTERM, and a clean exit.
    async fn stop(self) {
        self.0.terminate().await;
    }

    /// POST /oauth2/token over HTTP/1.1: the status code and the JSON body.
    async fn token_request(&self, id: &str, secret: &str) -> (u16, Value) {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
        let mut stream = TcpStream::connect(self.0.addr).await.unwrap();
        let request = format!(
            "POST /oauth2/token?grant_type=client_credentials HTTP/1.1\r\n\
             Host: {}\r\nAuthorization: Basic {basic}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n",
            self.0.addr
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(PATIENCE, stream.read_to_string(&mut response))
            .await
            .unwrap()
            .unwrap();
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not HTTP: {response:?}"));
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("cache-control: no-store"), "{head}");
        (status, serde_json::from_str(body).unwrap())
    }

    async fn token(&self, id: &str, secret: &str) -> String {
        let (status, body) = self.token_request(id, secret).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token_type"], "Bearer");
        assert!(body["expires_in"].as_u64().unwrap() > 0);
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// DescribeServers with `token`: the number of servers, or the status.
    async fn describe(&self, token: &str) -> Result<usize, tonic::Status> {
        let channel = Channel::from_shared(format!("http://{}", self.0.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut request = tonic::Request::new(pb::DescribeServersRequest::default());
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
        );
        ServersClient::new(channel)
            .describe_servers(request)
            .await
            .map(|r| r.into_inner().servers.len())
    }
}

#[tokio::test]
async fn clients_registered_offline_and_online_get_tokens_until_revoked_and_survive_restarts() {
    let dir = TempDir::new();
    // Before any broker ran: on the store directly.
    let (reader, reader_secret) = register(&dir.0, "portal", "read");

    let broker = Running::start(&dir.0).await;
    let token = broker.token(&reader, &reader_secret).await;
    assert_eq!(broker.describe(&token).await.unwrap(), 2);
    let refused = broker.describe("not-a-token").await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // While it runs: through the admin socket (the store is locked).
    let (ops, ops_secret) = register(&dir.0, "ops", "read servers:operate");
    let ops_token = broker.token(&ops, &ops_secret).await;
    assert_eq!(broker.describe(&ops_token).await.unwrap(), 2);

    // Wrong secret and unknown client: the same answer.
    let wrong = broker.token_request(&ops, "wrong").await;
    let unknown = broker
        .token_request("00000000-0000-0000-0000-000000000000", "wrong")
        .await;
    assert_eq!(wrong.0, 401);
    assert_eq!(wrong, unknown);
    assert_eq!(wrong.1["error"], "invalid_client");

    // Revoking takes effect on the token already issued.
    let revoked = clients(&dir.0, &["revoke", &ops]).unwrap();
    assert!(revoked["client"]["revoked_at"].is_string(), "{revoked}");
    let status = broker.describe(&ops_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("revoked"), "{status:?}");
    assert_eq!(broker.token_request(&ops, &ops_secret).await.0, 401);

    let listed = clients(&dir.0, &["list"]).unwrap();
    let listed = listed["clients"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .all(|c| c.get("client_secret").is_none() && c.get("secret_hash").is_none()),
        "{listed:?}"
    );
    broker.stop().await;

    // After a restart: the same clients, the same signing key (the token
    // issued before still works), the revocation kept.
    let broker = Running::start(&dir.0).await;
    assert_eq!(broker.describe(&token).await.unwrap(), 2);
    assert_eq!(
        broker.describe(&ops_token).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(broker.token_request(&ops, &ops_secret).await.0, 401);
    broker.stop().await;

    // Stopped again: the admin socket is gone, and the store answers.
    assert!(!dir.0.join("admin.sock").exists());
    let listed = clients(&dir.0, &["list"]).unwrap();
    assert_eq!(listed["clients"].as_array().unwrap().len(), 2);
}

#[test]
fn bad_registrations_are_refused_with_one_line() {
    let dir = TempDir::new();
    for (args, expected) in [
        (
            &["register", "--name", "x", "--scopes", "admin"][..],
            "unknown scope \"admin\"",
        ),
        (
            &["register", "--name", "x", "--scopes", "agent"],
            "give its server id",
        ),
        (
            &[
                "register",
                "--name",
                "x",
                "--scopes",
                "read",
                "--server-id",
                "s1",
            ],
            "its only scope is `agent`",
        ),
        (
            &["register", "--name", " ", "--scopes", "read"],
            "a client name is 1 to 128 bytes",
        ),
        (&["revoke", "nobody"], "no client with id \"nobody\""),
    ] {
        let err = clients(&dir.0, args).unwrap_err();
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// Runs the binary with exactly `args`: stdout, or stderr on failure.
fn broker_command(args: &[&OsStr]) -> Result<String, String> {
    let out = std::process::Command::new(BROKER_BIN)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    match out.status.success() {
        true => Ok(String::from_utf8(out.stdout).unwrap()),
        false => Err(stderr),
    }
}

/// `register-api-client NAME_ARGS --data-dir DIR`, parsed as the Access
/// Console's configuration wizard parses it: the id and the secret.
fn register_api_client(dir: &Path, name_args: &[&str]) -> (String, String) {
    let mut args: Vec<&OsStr> = vec![OsStr::new("register-api-client")];
    args.extend(name_args.iter().map(OsStr::new));
    args.extend([OsStr::new("--data-dir"), dir.as_os_str()]);
    let out = broker_command(&args).unwrap();
    // The wizard decodes with Python's `unicode_escape` (ASCII in, ASCII
    // out) and searches with re.DOTALL; `(?s)` is DOTALL, and Rust's
    // regex, like Python's, takes the leftmost match with lazy repeats.
    assert!(out.is_ascii(), "{out:?}");
    let wizard = regex::Regex::new(r"(?s)client-id: (.*?)\n.*?client-password: (.*?)\n").unwrap();
    let found = wizard.captures(&out).unwrap_or_else(|| panic!("{out:?}"));
    let (id, secret) = (found[1].to_owned(), found[2].to_owned());
    // DCV's format exactly: two lines, nothing around them.
    assert_eq!(out, format!("client-id: {id}\nclient-password: {secret}\n"));
    assert!(!id.is_empty() && !secret.is_empty(), "{out:?}");
    (id, secret)
}

#[tokio::test]
async fn register_api_client_prints_dcv_two_lines_and_the_client_gets_a_dcv_api_clients_token() {
    let tmp = TempDir::new();
    // Created by the broker, as a first install's is.
    let data = tmp.0.join("data");
    let dir = TempDir(data.clone());
    // Stopped broker (on the store), with the wizard's `-cn`.
    let (console, console_secret) = register_api_client(&dir.0, &["-cn", "access-console"]);
    let broker = Running::start(&dir.0).await;
    // Running broker (through the admin socket), DCV's documented spelling.
    let (portal, portal_secret) = register_api_client(&dir.0, &["--client-name", "portal"]);
    for (id, secret) in [(&console, &console_secret), (&portal, &portal_secret)] {
        let (status, body) = broker.token_request(id, secret).await;
        assert_eq!(status, 200, "{body}");
        // Everything a DCV API client may do, and not acting as an agent.
        assert_eq!(
            body["scope"], "read servers:operate sessions:manage",
            "{body}"
        );
        let token = body["access_token"].as_str().unwrap();
        assert_eq!(broker.describe(token).await.unwrap(), 2);
    }
    broker.stop().await;

    let listed = clients(&dir.0, &["list"]).unwrap();
    let names: Vec<_> = listed["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["scopes"].as_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            ("access-console", "read servers:operate sessions:manage"),
            ("portal", "read servers:operate sessions:manage"),
        ]
    );
    // The secrets were printed, never written: no file of the data
    // directory holds them, and none is open to other users.
    for entry in std::fs::read_dir(&dir.0).unwrap() {
        use std::os::unix::fs::PermissionsExt as _;
        let entry = entry.unwrap();
        let mode = entry.metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{:?} is {mode:o}", entry.path());
        if entry.file_type().unwrap().is_file() {
            let bytes = std::fs::read(entry.path()).unwrap();
            for secret in [&console_secret, &portal_secret] {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{:?} holds a secret",
                    entry.path()
                );
            }
        }
    }
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&dir.0).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the data directory is {mode:o}");
}

#[test]
fn register_api_client_without_a_name_is_refused_and_registers_nothing() {
    let dir = TempDir::new();
    for name_args in [&[][..], &["-cn"], &["--client-name"], &["-cn", " "]] {
        let mut args: Vec<&OsStr> = vec![OsStr::new("register-api-client")];
        args.extend(name_args.iter().map(OsStr::new));
        args.extend([OsStr::new("--data-dir"), dir.0.as_os_str()]);
        let err = broker_command(&args).unwrap_err();
        let expected = match name_args.len() {
            2 => "a client name is 1 to 128 bytes",
            _ => "--client-name <NAME>",
        };
        assert!(err.contains(expected), "{name_args:?}: {err}");
    }
    assert_eq!(
        clients(&dir.0, &["list"]).unwrap()["clients"],
        serde_json::json!([])
    );
}
