//! The `dcvsm` binary against a real `dcv-broker` binary on loopback: each
//! command, the JSON keys the broker's contract names (as grpcurl prints
//! them), the table output, pagination, every exit code we can provoke, and
//! the precedence of flags, environment and configuration file.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
};

use serde_json::Value;

const BROKER: &str = env!("CARGO_BIN_EXE_dcv-broker");
const DCVSM: &str = env!("CARGO_BIN_EXE_dcvsm");

/// A broker process, killed on drop.
struct Broker {
    child: Child,
    url: String,
}

impl Broker {
    fn start(fleet: usize) -> Broker {
        Broker::start_with(fleet, &[], "http")
    }

    fn start_with(fleet: usize, extra: &[&str], scheme: &str) -> Broker {
        let mut child = Command::new(BROKER)
            .args(["--listen", "127.0.0.1:0", "--in-memory", "--demo-fleet"])
            .arg(fleet.to_string())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("dcv-broker listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Broker {
            child,
            url: format!("{scheme}://{addr}"),
        }
    }

    /// Runs dcvsm against this broker, with no configuration file around.
    fn dcvsm(&self, args: &[&str]) -> Output {
        dcvsm_cmd()
            .arg("--broker-url")
            .arg(&self.url)
            .args(args)
            .output()
            .unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.dcvsm(args);
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "{args:?}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A dcvsm command isolated from the user's configuration and environment.
fn dcvsm_cmd() -> Command {
    let mut cmd = Command::new(DCVSM);
    let empty = scratch("empty-home");
    cmd.env_remove("DCV_SM_BROKER_URL")
        .env("XDG_CONFIG_HOME", &empty)
        .env("HOME", &empty);
    cmd
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dcvsm-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn server_ids(broker: &Broker) -> Vec<String> {
    broker.json(&["describe-servers"])["Servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["Id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn close_describe_and_open_servers_with_the_brokers_json_keys() {
    let broker = Broker::start(5);
    let ids = server_ids(&broker);
    assert_eq!(ids.len(), 5);
    let target = ids[0].clone();

    let out = broker.dcvsm(&[
        "close-servers",
        "--server-ids",
        &format!("{target},nope"),
        "--reason",
        "maintenance",
    ]);
    assert_eq!(out.status.code(), Some(3), "some items failed");
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        keys(&reply),
        set(&["RequestId", "SuccessfulList", "UnsuccessfulList"])
    );
    assert_eq!(keys(&reply["SuccessfulList"][0]), set(&["ServerId"]));
    assert_eq!(reply["SuccessfulList"][0]["ServerId"], target.as_str());
    let failed = &reply["UnsuccessfulList"][0];
    assert_eq!(
        keys(failed),
        set(&["CloseServerRequestData", "FailureCode", "FailureReason"])
    );
    assert_eq!(failed["FailureCode"], "DCV_SERVER_NOT_FOUND");
    assert_eq!(failed["CloseServerRequestData"]["ServerId"], "nope");
    assert_eq!(failed["CloseServerRequestData"]["Reason"], "maintenance");

    let described = broker.json(&["describe-servers", "--server-ids", &target]);
    assert_eq!(keys(&described), set(&["RequestId", "Servers"]));
    let server = &described["Servers"][0];
    assert_eq!(server["Id"], target.as_str());
    assert_eq!(server["Availability"], "UNAVAILABLE");
    assert_eq!(server["UnavailabilityReason"], "SERVER_CLOSED");
    assert_eq!(server["Holds"][0]["Reason"], "maintenance");
    for key in ["Hostname", "Endpoints", "Host", "Tags", "LastHeartbeatTime"] {
        assert!(server.get(key).is_some(), "{key} in {server}");
    }

    let closed = broker.json(&["describe-servers", "--filter", "closed=true"]);
    let closed: Vec<_> = closed["Servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["Id"])
        .collect();
    assert_eq!(
        closed,
        [target.as_str()],
        "--filter KEY=VALUE reaches the broker"
    );

    let out = broker.dcvsm(&["open-servers", "--server-ids", &target]);
    assert_eq!(out.status.code(), Some(0));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(keys(&reply), set(&["RequestId", "SuccessfulList"]));
    let described = broker.json(&["describe-servers", "--server-ids", &target]);
    assert_eq!(described["Servers"][0]["Availability"], "AVAILABLE");
}

#[test]
fn session_commands_round_trip() {
    let broker = Broker::start(5);
    let perms = scratch("perms").join("perms.txt");
    std::fs::write(&perms, "[permissions]\n%owner% allow builtin\n").unwrap();
    let created = broker.json(&[
        "create-session",
        "--name",
        "render",
        "--owner",
        "alice",
        "--type",
        "VIRTUAL",
        "--max-concurrent-clients",
        "2",
        "--permissions-file",
        perms.to_str().unwrap(),
    ]);
    assert_eq!(keys(&created), set(&["RequestId", "SuccessfulList"]));
    let session = &created["SuccessfulList"][0];
    assert_eq!(session["Owner"], "alice");
    assert_eq!(session["Type"], "VIRTUAL");
    let id = session["Id"].as_str().unwrap().to_owned();

    let described = broker.json(&["describe-sessions", "--session-ids", &id]);
    assert_eq!(keys(&described), set(&["RequestId", "Sessions"]));
    assert_eq!(described["Sessions"][0]["Id"], id.as_str());
    let by_owner = broker.json(&["describe-sessions", "--owner", "alice"]);
    let owners: Vec<_> = by_owner["Sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["Owner"])
        .collect();
    assert!(
        !owners.is_empty() && owners.iter().all(|o| *o == "alice"),
        "{by_owner}"
    );

    let out = broker.dcvsm(&[
        "update-session-permissions",
        "--session-id",
        &id,
        "--owner",
        "alice",
        "--permission-file",
        perms.to_str().unwrap(),
    ]);
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{reply}");
    assert_eq!(reply["SuccessfulList"][0]["SessionId"], id.as_str());

    let out = broker.dcvsm(&[
        "get-session-connection-data",
        "--session-id",
        &id,
        "--user",
        "alice",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The session may still be CREATING on a demo fleet: then the broker answers with a
    // status, which is exit 254.
    match out.status.code() {
        Some(0) => {
            let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert!(keys(&reply).is_superset(&set(&["RequestId", "Session", "ConnectionToken"])));
        }
        Some(254) => assert!(stderr.contains("the broker returned"), "{stderr}"),
        other => panic!("{other:?} {stderr}"),
    }

    let out = broker.dcvsm(&["delete-session", "--session-id", &id, "--owner", "alice"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(keys(&reply), set(&["RequestId", "SuccessfulList"]));
    assert_eq!(
        keys(&reply["SuccessfulList"][0]),
        set(&["SessionId", "State"])
    );

    let out = broker.dcvsm(&["delete-session", "--session-id", "nope", "--owner", "alice"]);
    assert_eq!(out.status.code(), Some(3));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        keys(&reply["UnsuccessfulList"][0]),
        set(&["SessionId", "FailureCode", "FailureReason"])
    );
    let out = broker.dcvsm(&[
        "--compat-exit-codes",
        "delete-session",
        "--session-id",
        "nope",
        "--owner",
        "alice",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "--compat-exit-codes: partial is success"
    );
}

#[test]
fn table_output_is_aligned_for_people() {
    let broker = Broker::start(3);
    let out = broker.dcvsm(&["--output-format", "table", "describe-servers"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("RequestId: "), "{text}");
    assert!(text.contains("Servers (3)"), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.starts_with("Id ") && l.contains("Availability"))
        .expect(&text);
    let column = lines[header].find("Availability").unwrap();
    for row in &lines[header + 1..header + 4] {
        let cell = &row[column..];
        assert!(
            cell.starts_with("AVAILABLE") || cell.starts_with("UNAVAILABLE"),
            "the Availability column is aligned: {row}"
        );
    }
    assert!(serde_json::from_str::<Value>(&text).is_err(), "not JSON");

    let out = broker.dcvsm(&[
        "--output-format",
        "table",
        "describe-sessions",
        "--owner",
        "nobody",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.ends_with("\n(no items)\n"), "{text}");
}

#[test]
fn follows_every_page_of_2500_servers_unless_told_not_to() {
    let broker = Broker::start(2500);
    let all = broker.json(&["describe-servers"]);
    assert!(
        all.get("NextToken").is_none(),
        "merged reply has no NextToken"
    );
    let ids: BTreeSet<&str> = all["Servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["Id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2500, "every server once");

    let one = broker.json(&["describe-servers", "--no-paginate", "--max-results", "1000"]);
    assert_eq!(one["Servers"].as_array().unwrap().len(), 1000);
    let token = one["NextToken"].as_str().expect("a NextToken").to_owned();
    let next = broker.json(&[
        "describe-servers",
        "--next-token",
        &token,
        "--max-results",
        "1000",
    ]);
    assert_eq!(next["Servers"].as_array().unwrap().len(), 1000);
    assert!(
        next.get("NextToken").is_some(),
        "--next-token prints one page"
    );

    let small = broker.json(&["describe-servers", "--max-results", "7"]);
    assert_eq!(small["Servers"].as_array().unwrap().len(), 2500);
}

#[test]
fn exit_codes() {
    let broker = Broker::start(3);
    // 2: clap's parse error.
    assert_eq!(
        broker.dcvsm(&["describe-servers", "--bogus"]).status.code(),
        Some(2)
    );
    assert_eq!(broker.dcvsm(&["close-servers"]).status.code(), Some(2));
    // 252: a bad value caught before calling the broker.
    let out = broker.dcvsm(&["describe-servers", "--max-results", "0"]);
    assert_eq!(out.status.code(), Some(252));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-results"));
    assert_eq!(
        broker
            .dcvsm(&["describe-servers", "--filter", "nokey"])
            .status
            .code(),
        Some(252)
    );
    // 254: the broker's INVALID_ARGUMENT.
    let out = broker.dcvsm(&["describe-sessions", "--next-token", "garbage"]);
    assert_eq!(out.status.code(), Some(254));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("dcvsm: the broker returned InvalidArgument"),
        "{stderr}"
    );
    // 255: nobody listening.
    let out = dcvsm_cmd()
        .args(["--broker-url", "http://127.0.0.1:1", "describe-servers"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "dcvsm: cannot reach the broker at http://127.0.0.1:1: connection refused\n"
    );
    // 1: a named configuration file that is missing, or corrupt.
    let out = broker.dcvsm(&["--conf", "/nonexistent/dcvsmcli.conf", "describe-servers"]);
    assert_eq!(out.status.code(), Some(1));
    let corrupt = scratch("corrupt").join("dcvsmcli.conf");
    std::fs::write(&corrupt, "[broker\nurl = x\n").unwrap();
    let out = broker.dcvsm(&["--conf", corrupt.to_str().unwrap(), "describe-servers"]);
    assert_eq!(out.status.code(), Some(1));
    // 253: an unreadable CA bundle.
    let out = dcvsm_cmd()
        .args([
            "--broker-url",
            "https://127.0.0.1:1",
            "--ca-bundle",
            "/nonexistent.pem",
        ])
        .arg("describe-servers")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(253));
}

#[test]
fn flags_beat_environment_beat_configuration_file() {
    let broker = Broker::start(2);
    let dir = scratch("conf");
    let conf = dir.join("dcvsmcli.conf");
    std::fs::write(
        &conf,
        format!(
            "# test\n[output]\noutput-format = table\n\n[broker]\nurl = {}\n",
            broker.url
        ),
    )
    .unwrap();
    let conf = conf.to_str().unwrap();

    // The file alone: its URL and its table format.
    let out = dcvsm_cmd()
        .args(["--conf", conf, "describe-servers"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Servers (2)"));

    // The file found in $XDG_CONFIG_HOME.
    let out = dcvsm_cmd()
        .env("XDG_CONFIG_HOME", &dir)
        .arg("describe-servers")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Servers (2)"));

    // The environment beats the file.
    let out = dcvsm_cmd()
        .env("DCV_SM_BROKER_URL", "http://127.0.0.1:1")
        .args(["--conf", conf, "describe-servers"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));

    // A flag beats the environment, and the format flag beats the file.
    let out = dcvsm_cmd()
        .env("DCV_SM_BROKER_URL", "http://127.0.0.1:1")
        .args(["--conf", conf, "--broker-url", &broker.url])
        .args(["--output-format", "json", "describe-servers"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["Servers"].as_array().unwrap().len(), 2);
}

#[test]
fn help_documents_exit_codes_and_completion_scripts_are_printed() {
    let out = dcvsm_cmd().arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "Exit codes",
        "252",
        "253",
        "254",
        "255",
        "130",
        "--compat-exit-codes",
    ] {
        assert!(help.contains(needle), "{needle} in {help}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = dcvsm_cmd().args(["completion", shell]).output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&out.stdout).contains("describe-servers"));
    }
}

#[test]
fn https_trusts_the_ca_bundle_from_tls_init() {
    let dir = scratch("tls");
    let init = Command::new(BROKER)
        .args([
            "tls",
            "init",
            "--force",
            "--names",
            "localhost,127.0.0.1",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let (cert, key, ca) = (
        path(dcv_broker::tls::init::SERVER_CERT),
        path(dcv_broker::tls::init::SERVER_KEY),
        path(dcv_broker::tls::init::CA_CERT),
    );
    let broker = Broker::start_with(
        2,
        &["--tls-cert", &cert, "--tls-key", &key, "--auth", "off"],
        "https",
    );

    let reply = broker.json(&["--ca-bundle", &ca, "describe-servers"]);
    assert_eq!(reply["Servers"].as_array().unwrap().len(), 2);

    // The CA bundle from the configuration file.
    let conf = dir.join("dcvsmcli.conf");
    std::fs::write(&conf, format!("[security]\nca-bundle = {ca}\n")).unwrap();
    let out = broker.dcvsm(&["--conf", conf.to_str().unwrap(), "describe-servers"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Untrusted (the system roots do not know this CA): not reached, 255.
    let out = broker.dcvsm(&["describe-servers"]);
    assert_eq!(out.status.code(), Some(255));
    // Plaintext to a TLS broker: a transport failure, 255, not a broker error.
    let plain = broker.url.replace("https://", "http://");
    let out = dcvsm_cmd()
        .args(["--broker-url", &plain, "describe-servers"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    // --no-verify-ssl is refused rather than silently ignored.
    let out = broker.dcvsm(&["--no-verify-ssl", "describe-servers"]);
    assert_eq!(out.status.code(), Some(253));
}

#[test]
fn sigint_while_waiting_for_the_broker_exits_130() {
    // A listener that accepts and never answers: the call waits forever.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let child = dcvsm_cmd()
        .args(["--broker-url", &url, "describe-servers"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "dcvsm: interrupted\n");
}

#[test]
fn debug_logs_the_call_on_stderr_only() {
    let broker = Broker::start(1);
    let out = broker.dcvsm(&["--debug", "describe-servers"]);
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("DEBUG") && stderr.contains("connecting"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\x1b'),
        "no colours when stderr is not a terminal"
    );
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["Servers"].as_array().unwrap().len(), 1);
}
