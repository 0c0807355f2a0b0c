//! The `dcvsm` binary against a real `dcv-broker` binary on loopback: each
//! command, the JSON keys the broker's contract names (as grpcurl prints
//! them), the table output, pagination, every exit code we can provoke, the
//! precedence of flags, environment and configuration file, and
//! authentication against a broker with `--auth on` (and one serving TLS,
//! where authentication is on by default): client credentials from the
//! environment or the configuration file, `DCV_SM_OAUTH2_TOKEN`, the token
//! cache and its renewal, refused, unscoped and revoked clients.

mod common;

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use common::process::{BROKER_BIN as BROKER, BrokerProcess};
use serde_json::Value;

const DCVSM: &str = env!("CARGO_BIN_EXE_dcvsm");

/// A broker process, killed on drop. Tests that start one run on a
/// multi-threaded runtime: dcvsm runs blocking on the test's thread while
/// a worker reads the broker's log.
struct Broker {
    _process: BrokerProcess,
    url: String,
    /// With authentication: its admin socket and its log.
    admin: Option<(PathBuf, PathBuf)>,
}

/// A registered API client.
struct ApiClient {
    id: String,
    secret: String,
}

impl Broker {
    async fn start(fleet: usize) -> Broker {
        Broker::start_with(fleet, &[], "http").await
    }

    async fn start_with(fleet: usize, extra: &[&str], scheme: &str) -> Broker {
        Broker::spawn(fleet, extra, scheme, None).await
    }

    /// A broker whose clients are registered through its admin socket
    /// (in `dir`) and whose log is kept, to count the tokens it issues.
    async fn start_admin(dir: &Path, extra: &[&str], scheme: &str) -> Broker {
        let socket = dir.join("admin.sock");
        let log = dir.join("broker.log");
        let socket_arg = socket.to_str().unwrap().to_owned();
        let mut args = vec!["--admin-socket", &socket_arg];
        args.extend_from_slice(extra);
        Broker::spawn(2, &args, scheme, Some((socket, log))).await
    }

    async fn spawn(
        fleet: usize,
        extra: &[&str],
        scheme: &str,
        admin: Option<(PathBuf, PathBuf)>,
    ) -> Broker {
        let fleet = fleet.to_string();
        let mut args = vec!["--in-memory", "--demo-fleet", &fleet];
        args.extend_from_slice(extra);
        let process = match &admin {
            Some((_, log)) => {
                let log = std::fs::File::create(log).unwrap();
                BrokerProcess::start_exactly_logging_to(&args, log).await
            }
            None => BrokerProcess::start_exactly(&args).await,
        };
        Broker {
            url: format!("{scheme}://{}", process.addr),
            _process: process,
            admin,
        }
    }

    fn clients(&self, args: &[&str]) -> Value {
        let (socket, _) = self.admin.as_ref().expect("a broker with an admin socket");
        let out = Command::new(BROKER)
            .arg("clients")
            .args(args)
            .arg("--admin-socket")
            .arg(socket)
            .arg("--json")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn register(&self, name: &str, scopes: &str) -> ApiClient {
        let reply = self.clients(&["register", "--name", name, "--scopes", scopes]);
        ApiClient {
            id: reply["client"]["client_id"].as_str().unwrap().to_owned(),
            secret: reply["client"]["client_secret"]
                .as_str()
                .unwrap()
                .to_owned(),
        }
    }

    /// How many tokens the broker has issued, from its log (written before
    /// the token endpoint answers).
    fn tokens_issued(&self) -> usize {
        let (_, log) = self.admin.as_ref().expect("a broker with a log");
        std::fs::read_to_string(log)
            .unwrap()
            .matches("token issued")
            .count()
    }

    /// dcvsm against this broker with these client credentials in the
    /// environment and `cache` as its XDG cache directory.
    fn dcvsm_as(&self, client: &ApiClient, cache: &Path, args: &[&str]) -> Output {
        dcvsm_cmd()
            .env("DCV_SM_CLIENT_ID", &client.id)
            .env("DCV_SM_CLIENT_PASSWORD", &client.secret)
            .env("XDG_CACHE_HOME", cache)
            .arg("--broker-url")
            .arg(&self.url)
            .args(args)
            .output()
            .unwrap()
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

/// A dcvsm command isolated from the user's configuration and environment.
fn dcvsm_cmd() -> Command {
    let mut cmd = Command::new(DCVSM);
    let empty = scratch("empty-home");
    for var in [
        "DCV_SM_BROKER_URL",
        "DCV_SM_AUTH_SERVER_URL",
        "DCV_SM_CLIENT_ID",
        "DCV_SM_CLIENT_PASSWORD",
        "DCV_SM_OAUTH2_TOKEN",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("XDG_CONFIG_HOME", &empty)
        .env("XDG_CACHE_HOME", empty.join("cache"))
        .env("HOME", &empty);
    cmd
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dcvsm-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An empty scratch directory.
fn fresh(name: &str) -> PathBuf {
    let dir = scratch(name);
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The token cache files dcvsm wrote under `cache`.
fn cache_files(cache: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(cache.join("dcvsm")) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn close_describe_and_open_servers_with_the_brokers_json_keys() {
    let broker = Broker::start(5).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn session_commands_round_trip() {
    let broker = Broker::start(5).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn table_output_is_aligned_for_people() {
    let broker = Broker::start(3).await;
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

/// The README's maintenance-window check, as written: the table shows who
/// closed a server, when and why, and its tags, endpoints and host, each
/// in one cell of the server's row.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn the_table_shows_holds_tags_endpoints_and_host() {
    let broker = Broker::start(3).await;
    let reason = "maintenance window 保守";
    let out = broker.dcvsm(&[
        "close-servers",
        "--server-ids",
        "serverId1",
        "--reason",
        reason,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(
        &broker
            .dcvsm(&["describe-servers", "--server-ids", "serverId1"])
            .stdout,
    )
    .unwrap();
    let server = &json["Servers"][0];
    let hold = &server["Holds"][0];

    let out = broker.dcvsm(&["--output-format", "table", "describe-servers"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let header = lines
        .iter()
        .find(|l| l.starts_with("Id "))
        .unwrap_or_else(|| panic!("{text}"));
    for column in ["Holds", "Tags", "Endpoints", "Host"] {
        assert!(
            header.split_whitespace().any(|c| c == column),
            "a {column} column: {header}"
        );
    }
    let row = lines
        .iter()
        .find(|l| l.starts_with("serverId1 "))
        .unwrap_or_else(|| panic!("{text}"));
    let expected_hold = format!(
        "[default] CLOSED by {} at {}: {reason}",
        hold["Actor"].as_str().unwrap(),
        hold["CreationTime"].as_str().unwrap()
    );
    assert!(row.contains(&expected_hold), "{expected_hold:?} in {row}");
    for tag in server["Tags"].as_array().unwrap() {
        let cell = format!(
            "{}={}",
            tag["Key"].as_str().unwrap(),
            tag["Value"].as_str().unwrap()
        );
        assert!(row.contains(&cell), "{cell} in {row}");
    }
    let endpoint = &server["Endpoints"][0];
    let cell = format!(
        "{}:{} {}",
        endpoint["IpAddress"].as_str().unwrap(),
        endpoint["Port"],
        endpoint["Protocol"].as_str().unwrap()
    );
    assert!(row.contains(&cell), "{cell} in {row}");
    let os = server["Host"]["Os"]["Name"].as_str().unwrap();
    assert!(row.contains(os), "{os} in {row}");
    // Each server is one line: the rows are the three servers.
    let rows = lines
        .iter()
        .skip_while(|l| !l.starts_with("Id "))
        .skip(1)
        .count();
    assert_eq!(rows, 3, "{text}");
}

/// The table's rows as their whitespace-separated cells.
fn rows(text: &str) -> Vec<Vec<&str>> {
    text.lines()
        .map(|l| l.split_whitespace().collect())
        .collect()
}

/// Whether a row of `text` begins with `cells`.
fn has_row(text: &str, cells: &[&str]) -> bool {
    rows(text).iter().any(|r| r.starts_with(cells))
}

/// The demo fleet's AVAILABLE servers per value of its `pool` tag.
fn available_per_pool(broker: &Broker) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut pools = std::collections::BTreeMap::<String, Vec<String>>::new();
    for server in broker.json(&["describe-servers"])["Servers"]
        .as_array()
        .unwrap()
    {
        let pool = server["Tags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["Key"] == "pool")
            .map(|t| t["Value"].as_str().unwrap().to_owned())
            .unwrap_or_default();
        let entry = pools.entry(pool).or_default();
        if server["Availability"] == "AVAILABLE" {
            entry.push(server["Id"].as_str().unwrap().to_owned());
        }
    }
    pools
}

/// What an operator changes on each server, as describe-servers shows it:
/// availability, holds and StateVersion (heartbeats change the rest).
fn operator_state(broker: &Broker) -> Vec<Value> {
    broker.json(&["describe-servers"])["Servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| serde_json::json!([s["Id"], s["Availability"], s["Holds"], s["StateVersion"]]))
        .collect()
}

/// A server's StateVersion (a uint64: a JSON string).
fn state_version(broker: &Broker, id: &str) -> u64 {
    broker.json(&["describe-servers", "--server-ids", id])["Servers"][0]["StateVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// The engineering pool of an eight-server demo fleet, AVAILABLE: what the
/// safe-maintenance tests close, under a floor of two.
const ENGINEERING: [&str; 4] = ["dcv-0000001", "dcv-0000005", "dcv-0000006", "dcv-0000007"];

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_dry_run_close_prints_its_blast_radius_per_pool_and_changes_nothing() {
    let broker =
        Broker::start_with(8, &["--capacity-floor", "tag:pool=engineering:2"], "http").await;
    let pools = available_per_pool(&broker);
    assert_eq!(pools["engineering"], ENGINEERING, "the demo fleet changed");
    let all: usize = pools.values().map(Vec::len).sum();
    let training = pools["training"].len().to_string();
    let session = &broker.json(&["describe-sessions"])["Sessions"][0];
    let busy = session["Server"]["Id"].as_str().unwrap().to_owned();
    assert!(pools["training"].contains(&busy), "{session}");
    let before = operator_state(&broker);

    let out = broker.dcvsm(&[
        "--output-format",
        "table",
        "close-servers",
        "--server-ids",
        &format!("dcv-0000001,dcv-0000005,dcv-0000006,{busy},nope"),
        "--hold",
        "kernel",
        "--expires-in",
        "2h",
        "--dry-run",
        "--capacity-tag",
        "pool",
    ]);
    assert_eq!(out.status.code(), Some(3), "some items would fail");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("DRY RUN — nothing was changed\n"),
        "{text}"
    );
    for row in [
        &[
            "Items", "(5):", "2", "would", "succeed,", "3", "would", "fail",
        ][..],
        &["dcv-0000001", "OK"],
        &["dcv-0000005", "OK"],
        // The floor: four AVAILABLE, two may go.
        &[
            "dcv-0000006",
            "CAPACITY_FLOOR",
            "Closing",
            "it",
            "would",
            "leave",
            "pool",
        ],
        &[&busy, "DCV_SERVER_HAS_RUNNING_SESSIONS"],
        &["nope", "DCV_SERVER_NOT_FOUND"],
        &["Affected", "servers", "(2)"],
        &["dcv-0000001", "yes", "→", "no", "0"],
        &["dcv-0000005", "yes", "→", "no", "0"],
        &[
            "Sessions", "that", "would", "keep", "running", "on", "closed", "servers", "(0)",
        ],
        &["pool=engineering", "4", "→", "2", "-2"],
        &["pool=training", &training, "→", &training, "0"],
        &[
            "all",
            "servers",
            &all.to_string(),
            "→",
            &(all - 2).to_string(),
            "-2",
        ],
    ] {
        assert!(has_row(&text, row), "{row:?} in\n{text}");
    }
    assert_eq!(operator_state(&broker), before, "a dry run changes nothing");

    // With Force and the floor overridden: the busy server's session
    // would keep running; JSON prints the reply as it is.
    let reply = broker.json(&[
        "close-servers",
        "--server-ids",
        &format!("dcv-0000006,{busy}"),
        "--force",
        "--override-capacity-floor",
        "--dry-run",
    ]);
    assert_eq!(
        keys(&reply),
        set(&["RequestId", "SuccessfulList", "DryRun", "BlastRadius"])
    );
    assert_eq!(reply["DryRun"], true);
    let affected = &reply["BlastRadius"]["Servers"];
    assert_eq!(affected[0]["ServerId"], "dcv-0000006");
    assert_eq!(affected[1]["ServerId"], busy.as_str());
    assert_eq!(
        affected[1]["Sessions"],
        serde_json::json!([{
            "Id": session["Id"],
            "Owner": session["Owner"],
            "Type": session["Type"],
        }])
    );
    assert_eq!(reply["BlastRadius"].get("Pools"), None, "no --capacity-tag");
    assert_eq!(operator_state(&broker), before, "a dry run changes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn named_holds_expiry_versions_and_floors_from_the_command_line() {
    let broker =
        Broker::start_with(8, &["--capacity-floor", "tag:pool=engineering:2"], "http").await;
    assert_eq!(available_per_pool(&broker)["engineering"], ENGINEERING);
    let target = "dcv-0000001";

    // One team's hold, for two hours.
    let asked = std::time::SystemTime::now();
    let out = broker.dcvsm(&[
        "close-servers",
        "--server-ids",
        target,
        "--hold",
        "kernel",
        "--expires-in",
        "2h",
        "--reason",
        "kernel 6.8",
        "--client-token",
        "kernel-2026-12-02",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let server = broker.json(&["describe-servers", "--server-ids", target])["Servers"][0].clone();
    let hold = &server["Holds"][0];
    assert_eq!(hold["Name"], "kernel");
    let expires = humantime::parse_rfc3339(hold["ExpirationTime"].as_str().unwrap()).unwrap();
    let two_hours = std::time::Duration::from_secs(7200);
    assert!(
        expires >= asked + two_hours
            && expires <= asked + two_hours + std::time::Duration::from_secs(60),
        "{hold}"
    );

    // Another team's, only if nobody changed the server since it was read.
    let version = state_version(&broker, target);
    let out = broker.dcvsm(&[
        "close-servers",
        "--server-ids",
        target,
        "--hold",
        "audit",
        "--expected-version",
        &(version + 1000).to_string(),
    ]);
    assert_eq!(out.status.code(), Some(3));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        reply["UnsuccessfulList"][0]["FailureCode"],
        "STATE_VERSION_MISMATCH"
    );
    // Until a time given with an offset: the same instant in UTC.
    let at = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    let local =
        humantime::format_rfc3339_seconds(at + std::time::Duration::from_secs(7200)).to_string();
    let with_offset = format!("{}+02:00", local.trim_end_matches('Z'));
    let out = broker.dcvsm(&[
        "close-servers",
        "--server-ids",
        target,
        "--hold",
        "audit",
        "--expected-version",
        &version.to_string(),
        "--expires-at",
        &with_offset,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let server = broker.json(&["describe-servers", "--server-ids", target])["Servers"][0].clone();
    let audit = &server["Holds"][1];
    assert_eq!(audit["Name"], "audit");
    assert_eq!(
        audit["ExpirationTime"],
        humantime::format_rfc3339_seconds(at).to_string().as_str()
    );

    // The table names both holds, with their expiry, and the StateVersion.
    let out = broker.dcvsm(&[
        "--output-format",
        "table",
        "describe-servers",
        "--server-ids",
        target,
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    let header = text.lines().find(|l| l.starts_with("Id ")).unwrap();
    assert!(
        header.split_whitespace().any(|c| c == "StateVersion"),
        "{header}"
    );
    for hold in server["Holds"].as_array().unwrap() {
        let cell = format!(
            "[{}] CLOSED by {} at {} until {}",
            hold["Name"].as_str().unwrap(),
            hold["Actor"].as_str().unwrap(),
            hold["CreationTime"].as_str().unwrap(),
            hold["ExpirationTime"].as_str().unwrap()
        );
        assert!(text.contains(&cell), "{cell} in {text}");
    }
    let version = state_version(&broker, target);
    let row = text.lines().find(|l| l.starts_with(target)).unwrap();
    assert!(row.trim_end().ends_with(&format!(" {version}")), "{row}");

    // Opening one team's hold leaves the server closed, and says why; a
    // dry run of it says the same and that the server stays unavailable.
    let out = broker.dcvsm(&[
        "--output-format",
        "table",
        "open-servers",
        "--server-ids",
        target,
        "--hold",
        "kernel",
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("DRY RUN — nothing was changed\n"),
        "{text}"
    );
    assert!(has_row(&text, &[target, "HOLDS_REMAIN"]), "{text}");
    let overall = rows(&text)
        .into_iter()
        .find(|r| r.starts_with(&["all", "servers"]))
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(
        overall.last(),
        Some(&"0"),
        "the server stays closed: {text}"
    );
    assert_eq!(state_version(&broker, target), version);
    let out = broker.dcvsm(&["open-servers", "--server-ids", target, "--hold", "kernel"]);
    assert_eq!(out.status.code(), Some(3));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    let failed = &reply["UnsuccessfulList"][0];
    assert_eq!(failed["FailureCode"], "HOLDS_REMAIN");
    assert!(
        failed["FailureReason"].as_str().unwrap().contains("audit"),
        "{failed}"
    );
    let version = state_version(&broker, target);
    let out = broker.dcvsm(&[
        "open-servers",
        "--server-ids",
        target,
        "--hold",
        "audit",
        "--expected-version",
        &version.to_string(),
        "--client-token",
        "audit-open-1",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let server = &broker.json(&["describe-servers", "--server-ids", target])["Servers"][0];
    assert_eq!(server["Availability"], "AVAILABLE");

    // The floor: of four AVAILABLE engineering servers, two may close.
    let out = broker.dcvsm(&[
        "close-servers",
        "--server-ids",
        "dcv-0000005,dcv-0000006,dcv-0000007",
        "--hold",
        "gpu-driver",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        reply["SuccessfulList"].as_array().unwrap().len(),
        2,
        "{reply}"
    );
    let failed = &reply["UnsuccessfulList"][0];
    assert_eq!(failed["CloseServerRequestData"]["ServerId"], "dcv-0000007");
    assert_eq!(failed["FailureCode"], "CAPACITY_FLOOR");
    let out = broker.dcvsm(&[
        "close-servers",
        "--server-ids",
        "dcv-0000007",
        "--hold",
        "gpu-driver",
        "--override-capacity-floor",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(available_per_pool(&broker)["engineering"], [target]);

    // Every flag reaches the broker: a failed item echoes what was sent.
    let reply = broker.json(&[
        "close-servers",
        "--server-ids",
        "nope",
        "--force",
        "--hold",
        "team-a",
        "--expires-in",
        "90m",
        "--expected-version",
        "3",
        "--override-capacity-floor",
    ]);
    assert_eq!(
        reply["UnsuccessfulList"][0]["CloseServerRequestData"],
        serde_json::json!({
            "ServerId": "nope",
            "Force": true,
            "HoldName": "team-a",
            "ExpiresIn": "5400s",
            "ExpectedStateVersion": "3",
            "OverrideCapacityFloor": true,
        })
    );
    let reply = broker.json(&[
        "open-servers",
        "--server-ids",
        "nope",
        "--hold",
        "team-a",
        "--expected-version",
        "4",
    ]);
    assert_eq!(
        reply["UnsuccessfulList"][0]["OpenServerRequestData"],
        serde_json::json!({"ServerId": "nope", "HoldName": "team-a", "ExpectedStateVersion": "4"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_dry_run_delete_names_the_session_and_deletes_nothing() {
    let broker = Broker::start(8).await;
    let session = broker.json(&["describe-sessions"])["Sessions"][0].clone();
    let (id, owner) = (
        session["Id"].as_str().unwrap(),
        session["Owner"].as_str().unwrap(),
    );
    let server = session["Server"]["Id"].as_str().unwrap();
    let available = broker.json(&["describe-servers", "--server-ids", server])["Servers"][0]["Availability"]
        == "AVAILABLE";
    let yes_no = if available { "yes" } else { "no" };

    let out = broker.dcvsm(&[
        "--output-format",
        "table",
        "delete-session",
        "--session-id",
        id,
        "--owner",
        owner,
        "--dry-run",
        "--capacity-tag",
        "pool",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("DRY RUN — nothing was changed\n"),
        "{text}"
    );
    for row in [
        &[
            "Items", "(1):", "1", "would", "succeed,", "0", "would", "fail",
        ][..],
        &[id, "DELETING"],
        &[server, yes_no, "→", "yes", "1"],
        &["Sessions", "that", "would", "be", "deleted", "(1)"],
        &[server, id, owner, session["Type"].as_str().unwrap()],
        &["Pool", "Before", "→", "after", "Change"],
    ] {
        assert!(has_row(&text, row), "{row:?} in\n{text}");
    }
    let after = &broker.json(&["describe-sessions", "--session-ids", id])["Sessions"][0];
    assert_eq!(
        after["State"], session["State"],
        "a dry run deletes nothing"
    );

    let reply = broker.json(&[
        "delete-session",
        "--session-id",
        id,
        "--owner",
        owner,
        "--client-token",
        "delete-1",
    ]);
    assert_eq!(reply["SuccessfulList"][0]["State"], "DELETING");
    assert_eq!(reply.get("DryRun"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn safe_maintenance_flags_are_checked_before_calling_the_broker() {
    let broker = Broker::start(1).await;
    let close = |extra: &[&str]| {
        let mut args = vec!["close-servers", "--server-ids", "serverId1"];
        args.extend_from_slice(extra);
        broker.dcvsm(&args)
    };
    // 252: values dcvsm can tell are wrong.
    for (extra, flag) in [
        (&["--expires-in", "soon"][..], "--expires-in"),
        (&["--expires-at", "tomorrow"], "--expires-at"),
        (&["--client-token", ""], "--client-token"),
        (&["--client-token", &"x".repeat(65)], "--client-token"),
        (&["--client-token", "tab\there"], "--client-token"),
    ] {
        let out = close(extra);
        assert_eq!(out.status.code(), Some(252), "{extra:?}");
        assert!(stderr(&out).contains(flag), "{}", stderr(&out));
    }
    // 2: combinations the command line refuses.
    for extra in [
        &["--expires-in", "2h", "--expires-at", "2026-12-02T06:00:00Z"][..],
        &["--capacity-tag", "pool"],
        &["--expected-version", "-1"],
    ] {
        assert_eq!(close(extra).status.code(), Some(2), "{extra:?}");
    }
    // Nothing was closed by any of them.
    let server = &broker.json(&["describe-servers"])["Servers"][0];
    assert_eq!(server["Availability"], "AVAILABLE");
    // --client-token on the session commands that change something.
    let perms = scratch("perms-token").join("perms.txt");
    std::fs::write(&perms, "[permissions]\n%owner% allow builtin\n").unwrap();
    let created = broker.json(&[
        "create-session",
        "--name",
        "n",
        "--owner",
        "alice",
        "--type",
        "VIRTUAL",
        "--client-token",
        "create-1",
    ]);
    let id = created["SuccessfulList"][0]["Id"].as_str().unwrap();
    let out = broker.dcvsm(&[
        "update-session-permissions",
        "--session-id",
        id,
        "--owner",
        "alice",
        "--permission-file",
        perms.to_str().unwrap(),
        "--client-token",
        "perms-1",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn follows_every_page_of_2500_servers_unless_told_not_to() {
    let broker = Broker::start(2500).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn exit_codes() {
    let broker = Broker::start(3).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn flags_beat_environment_beat_configuration_file() {
    let broker = Broker::start(2).await;
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
        "--auth-server-url",
        "DCV_SM_CLIENT_ID",
        "DCV_SM_CLIENT_PASSWORD",
        "DCV_SM_AUTH_SERVER_URL",
        "DCV_SM_OAUTH2_TOKEN",
        "80%",
    ] {
        assert!(help.contains(needle), "{needle} in {help}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = dcvsm_cmd().args(["completion", shell]).output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&out.stdout).contains("describe-servers"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn https_trusts_the_ca_bundle_from_tls_init() {
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
    )
    .await;

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

/// `--no-verify-ssl` (or `no-verify-ssl = true` in the config file) is
/// refused the same way for a plaintext broker as for a TLS one: the same
/// command line must not turn insecure the day the URL becomes https://.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn no_verify_ssl_is_refused_for_every_broker_url() {
    let broker = Broker::start(1).await;
    assert!(broker.url.starts_with("http://"));
    let conf_dir = fresh("no-verify-ssl-conf");
    let conf = conf_dir.join("dcvsm.conf");
    std::fs::write(&conf, "[security]\nno-verify-ssl = true\n").unwrap();
    let conf = conf.to_str().unwrap();
    let mut messages = Vec::new();
    for url in [broker.url.as_str(), "https://127.0.0.1:1"] {
        for flags in [&["--no-verify-ssl"][..], &["--conf", conf][..]] {
            let out = dcvsm_cmd()
                .args(["--broker-url", url])
                .args(flags)
                .arg("describe-servers")
                .output()
                .unwrap();
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(253), "{url} {flags:?}: {err}");
            assert!(out.stdout.is_empty(), "{url} {flags:?}");
            assert!(err.contains("--no-verify-ssl is not supported"), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            messages.push(err);
        }
    }
    messages.dedup();
    assert_eq!(messages.len(), 1, "one message for every URL: {messages:?}");
    // Without it, the plaintext broker answers.
    assert_eq!(broker.dcvsm(&["describe-servers"]).status.code(), Some(0));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn debug_logs_the_call_on_stderr_only() {
    let broker = Broker::start(1).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn env_credentials_buy_a_token_that_is_cached_and_renewed_at_80_percent() {
    let dir = fresh("auth-env");
    let broker = Broker::start_admin(&dir, &["--auth", "on"], "http").await;
    let ops = broker.register("ops", "read,servers:operate");
    let cache = dir.join("cache");

    // No credentials: the broker's UNAUTHENTICATED is 253, with the way out.
    let out = broker.dcvsm(&["describe-servers"]);
    assert_eq!(out.status.code(), Some(253));
    let err = stderr(&out);
    assert!(
        err.contains("requires authentication") && err.contains("DCV_SM_CLIENT_ID"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // Credentials in the environment: a token is bought and the call works.
    let out = broker.dcvsm_as(&ops, &cache, &["describe-servers"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["Servers"].as_array().unwrap().len(), 2);
    assert_eq!(broker.tokens_issued(), 1);

    // Cached: one private file in a private directory, without the secret,
    // renewed after 80% of the broker's 15-minute lifetime.
    let files = cache_files(&cache);
    assert_eq!(files.len(), 1, "{files:?}");
    let file = &files[0];
    assert_eq!(std::fs::metadata(file).unwrap().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(cache.join("dcvsm")).unwrap().mode() & 0o777,
        0o700
    );
    let text = std::fs::read_to_string(file).unwrap();
    assert!(!text.contains(&ops.secret), "the secret is not cached");
    let entry: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(entry["client_id"], ops.id.as_str());
    let obtained = entry["obtained_at"].as_u64().unwrap();
    assert_eq!(entry["expires_at"].as_u64().unwrap() - obtained, 900);
    assert_eq!(entry["renew_after"].as_u64().unwrap() - obtained, 720);

    // A second run (and a command of another scope) reuses the token.
    let ids = server_ids_as(&broker, &ops, &cache);
    let out = broker.dcvsm_as(&ops, &cache, &["close-servers", "--server-ids", &ids[0]]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(broker.tokens_issued(), 1, "the cached token was used");
    assert_eq!(std::fs::read_to_string(file).unwrap(), text);

    // Past 80% of its lifetime (here: renew_after in the past), a new one.
    let mut stale = entry.clone();
    stale["renew_after"] = (obtained - 1).into();
    stale["obtained_at"] = (obtained - 800).into();
    std::fs::write(file, stale.to_string()).unwrap();
    let out = broker.dcvsm_as(&ops, &cache, &["describe-servers"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(broker.tokens_issued(), 2, "renewed");
    let renewed = read_json(file);
    assert!(renewed["renew_after"].as_u64().unwrap() >= obtained + 720);

    // A cached token the broker refuses (a rotated key, say): dropped, a new
    // one bought, the call made once more and succeeding.
    let mut rotten = renewed.clone();
    rotten["access_token"] = "not-a-token-the-broker-signed".into();
    std::fs::write(file, rotten.to_string()).unwrap();
    let out = broker.dcvsm_as(&ops, &cache, &["describe-servers"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(broker.tokens_issued(), 3);
    assert_ne!(read_json(file)["access_token"], rotten["access_token"]);

    // Lacking the scope: the broker's PERMISSION_DENIED is 254, naming it.
    let out = broker.dcvsm_as(
        &ops,
        &cache,
        &[
            "create-session",
            "--name",
            "x",
            "--owner",
            "alice",
            "--type",
            "VIRTUAL",
        ],
    );
    assert_eq!(out.status.code(), Some(254));
    let err = stderr(&out);
    assert!(
        err.starts_with("dcvsm: the broker returned PermissionDenied")
            && err.contains("sessions:manage"),
        "{err}"
    );

    // A wrong password: 253 in one line, even with a valid token cached
    // (the cache entry is bound to the password that bought it).
    let wrong = ApiClient {
        id: ops.id.clone(),
        secret: "wrong-password".into(),
    };
    let out = broker.dcvsm_as(&wrong, &cache, &["describe-servers"]);
    assert_eq!(out.status.code(), Some(253));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("refused the credentials") && err.contains("invalid_client"),
        "{err}"
    );
    assert!(!err.contains("wrong-password"), "{err}");
    let out = broker.dcvsm_as(&ops, &cache, &["describe-servers"]);
    assert_eq!(out.status.code(), Some(0), "the good entry is still there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn secrets_and_tokens_never_reach_debug_output() {
    let dir = fresh("auth-debug");
    let broker = Broker::start_admin(&dir, &["--auth", "on"], "http").await;
    let ops = broker.register("ops", "read");
    let cache = dir.join("cache");
    for _ in 0..2 {
        // The first run buys a token, the second takes it from the cache.
        let out = broker.dcvsm_as(&ops, &cache, &["--debug", "describe-servers"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let err = stderr(&out);
        let token = read_json(&cache_files(&cache)[0])["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(err.contains("token"), "{err}");
        for secret in [ops.secret.as_str(), token.as_str()] {
            assert!(!err.contains(secret), "a secret in {err}");
        }
    }
    assert_eq!(broker.tokens_issued(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn config_file_credentials_environment_overrides_and_a_token_as_it_is() {
    let dir = fresh("auth-conf");
    let broker = Broker::start_admin(&dir, &["--auth", "on"], "http").await;
    let reader = broker.register("reader", "read");
    let operator = broker.register("operator", "read,servers:operate");
    let cache = dir.join("cache");
    let conf = dir.join("dcvsmcli.conf");
    std::fs::write(
        &conf,
        format!(
            "[broker]\nurl = {}\n\n[authentication]\nclient-id = {}\nclient-password = {}\n",
            broker.url, reader.id, reader.secret
        ),
    )
    .unwrap();
    let ids = server_ids_as(&broker, &reader, &cache);
    let run = |envs: &[(&str, &str)], args: &[&str]| {
        let mut cmd = dcvsm_cmd();
        cmd.env("XDG_CACHE_HOME", &cache)
            .arg("--conf")
            .arg(&conf)
            .args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let close = ["close-servers", "--server-ids", ids[0].as_str()];

    // The file's credentials: the reader may describe, not close.
    let out = run(&[], &["describe-servers"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(&[], &close);
    assert_eq!(out.status.code(), Some(254), "{}", stderr(&out));
    assert!(stderr(&out).contains("servers:operate"));

    // The environment beats the file: the operator closes.
    let operator_env = [
        ("DCV_SM_CLIENT_ID", operator.id.as_str()),
        ("DCV_SM_CLIENT_PASSWORD", operator.secret.as_str()),
    ];
    let out = run(&operator_env, &close);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(cache_files(&cache).len(), 2, "one entry per client");

    // Each setting by its own precedence: the operator's id from the
    // environment, the reader's password from the file, refused, and said so.
    let out = run(&operator_env[..1], &["describe-servers"]);
    assert_eq!(out.status.code(), Some(253));
    let err = stderr(&out);
    assert!(
        err.contains("id from DCV_SM_CLIENT_ID, password from [authentication] client-password"),
        "{err}"
    );

    // DCV_SM_OAUTH2_TOKEN is sent as it is: nothing bought, nothing cached,
    // and it beats any client credentials.
    let token = cache_files(&cache)
        .iter()
        .map(|f| read_json(f))
        .find(|e| e["client_id"] == operator.id.as_str())
        .unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let issued = broker.tokens_issued();
    let other_cache = dir.join("other-cache");
    let out = dcvsm_cmd()
        .env("DCV_SM_OAUTH2_TOKEN", &token)
        .env("DCV_SM_CLIENT_PASSWORD", "wrong")
        .env("XDG_CACHE_HOME", &other_cache)
        .args([
            "--conf",
            conf.to_str().unwrap(),
            "open-servers",
            "--server-ids",
        ])
        .arg(&ids[0])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(broker.tokens_issued(), issued);
    assert!(cache_files(&other_cache).is_empty());
    let out = run(&[("DCV_SM_OAUTH2_TOKEN", "garbage")], &["describe-servers"]);
    assert_eq!(out.status.code(), Some(253));
    assert!(
        stderr(&out).contains("refused DCV_SM_OAUTH2_TOKEN"),
        "{}",
        stderr(&out)
    );

    // The auth server URL: the file's (nobody there: 255), beaten by the
    // environment, beaten by the flag; a URL without grant_type in its query
    // gets it in the form body.
    let with_dead_auth = dir.join("dead-auth.conf");
    std::fs::write(
        &with_dead_auth,
        format!(
            "{}auth-server-url = http://127.0.0.1:1/oauth2/token\n",
            std::fs::read_to_string(&conf).unwrap()
        ),
    )
    .unwrap();
    let fresh_cache = dir.join("fresh-cache");
    let auth_run = |envs: &[(&str, &str)], args: &[&str]| {
        let mut cmd = dcvsm_cmd();
        cmd.env("XDG_CACHE_HOME", &fresh_cache)
            .arg("--conf")
            .arg(&with_dead_auth)
            .args(args)
            .arg("describe-servers");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = auth_run(&[], &[]);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains("cannot reach the auth server at http://127.0.0.1:1"),
        "{}",
        stderr(&out)
    );
    let good = format!("{}/oauth2/token", broker.url);
    let out = auth_run(&[("DCV_SM_AUTH_SERVER_URL", &good)], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = auth_run(
        &[("DCV_SM_AUTH_SERVER_URL", "http://127.0.0.1:1/x")],
        &["--auth-server-url", &good],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = auth_run(&[], &["--auth-server-url", "ftp://nope"]);
    assert_eq!(out.status.code(), Some(252));

    // A half-given pair is a configuration error, before anything is sent.
    let out = dcvsm_cmd()
        .env("DCV_SM_CLIENT_ID", &reader.id)
        .args(["--broker-url", &broker.url, "describe-servers"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(253));
    assert!(stderr(&out).contains("no password"), "{}", stderr(&out));
}

fn server_ids_as(broker: &Broker, client: &ApiClient, cache: &Path) -> Vec<String> {
    let out = broker.dcvsm_as(client, cache, &["describe-servers"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    reply["Servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["Id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_revoked_client_is_refused_with_its_cached_token_dropped() {
    let dir = fresh("auth-revoked");
    let broker = Broker::start_admin(&dir, &["--auth", "on"], "http").await;
    let ops = broker.register("ops", "read");
    let cache = dir.join("cache");
    server_ids_as(&broker, &ops, &cache);
    assert_eq!(cache_files(&cache).len(), 1);

    broker.clients(&["revoke", &ops.id]);
    let out = broker.dcvsm_as(&ops, &cache, &["describe-servers"]);
    assert_eq!(out.status.code(), Some(253));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&ops.id) && err.contains("revoked"),
        "the broker's invalid_client description says why: {err}"
    );
    assert!(
        cache_files(&cache).is_empty(),
        "the refused token is dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn credentials_for_a_broker_without_authentication_are_a_configuration_error() {
    let broker = Broker::start(1).await;
    let cache = fresh("auth-off-cache");
    let someone = ApiClient {
        id: "someone".into(),
        secret: "secret".into(),
    };
    let out = broker.dcvsm_as(&someone, &cache, &["describe-servers"]);
    assert_eq!(out.status.code(), Some(253));
    assert!(
        stderr(&out).contains("without a token endpoint"),
        "{}",
        stderr(&out)
    );
    // Without credentials it answers, as before.
    assert_eq!(broker.dcvsm(&["describe-servers"]).status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn over_tls_authentication_is_on_by_default_and_the_token_comes_over_https() {
    let dir = fresh("auth-tls");
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
    let broker =
        Broker::start_admin(&dir, &["--tls-cert", &cert, "--tls-key", &key], "https").await;
    let ops = broker.register("ops", "read");
    let cache = dir.join("cache");

    let out = broker.dcvsm(&["--ca-bundle", &ca, "describe-servers"]);
    assert_eq!(out.status.code(), Some(253), "{}", stderr(&out));
    let out = broker.dcvsm_as(&ops, &cache, &["--ca-bundle", &ca, "describe-servers"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(broker.tokens_issued(), 1);
    // The auth server on its own https:// URL trusts --ca-bundle too, and
    // nothing else: without the bundle the broker itself is not reached.
    let auth_url = format!("{}/oauth2/token?grant_type=client_credentials", broker.url);
    let out = broker.dcvsm_as(
        &ops,
        &dir.join("cache2"),
        &[
            "--ca-bundle",
            &ca,
            "--auth-server-url",
            &auth_url,
            "describe-servers",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(broker.tokens_issued(), 2);
    let out = broker.dcvsm_as(&ops, &dir.join("cache3"), &["describe-servers"]);
    assert_eq!(out.status.code(), Some(255));
    let out = broker.dcvsm_as(&ops, &cache, &["--no-verify-ssl", "describe-servers"]);
    assert_eq!(out.status.code(), Some(253));
    assert!(stderr(&out).contains("--ca-bundle"), "{}", stderr(&out));
}

/// `describe-server-history` against a broker with a store: who closed a
/// server and why, after it was reopened; times as spans ago; the whole
/// walk, in the order asked for; a bad time refused before any call.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn describe_server_history_tells_who_closed_a_server_and_why() {
    use dcv_broker::pb::agent_client::AgentClient;
    let dir = fresh("dcvsm-history");
    let data = dir.join("data");
    let process = BrokerProcess::start_exactly(&["--data-dir", data.to_str().unwrap()]).await;
    let url = format!("http://{}", process.addr);
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut agent = AgentClient::new(channel.clone());
    for id in ["h1", "h2"] {
        agent
            .register_server(common::registration(id, "linux", 2))
            .await
            .unwrap();
    }
    let broker = Broker {
        _process: process,
        url,
        admin: None,
    };
    broker.json(&[
        "close-servers",
        "--server-ids",
        "h1,h2",
        "--reason",
        "firmware update",
    ]);
    broker.json(&["open-servers", "--server-ids", "h1"]);
    let reply = broker.json(&[
        "describe-server-history",
        "--server-id",
        "h1",
        "--since",
        "1h",
        "--max-results",
        "1",
    ]);
    let records = reply["Records"].as_array().unwrap();
    let methods: Vec<&str> = records
        .iter()
        .map(|r| r["Method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["RegisterServer", "CloseServers", "OpenServers"]);
    assert!(reply.get("NextToken").is_none(), "every page followed");
    let close = &records[1];
    assert_eq!(close["Actor"], "anonymous");
    assert_eq!(close["ItemCount"], 2);
    assert_eq!(
        close["Items"],
        serde_json::json!([{"Id": "h1", "Outcome": "OK", "Reason": "firmware update"}])
    );
    // Newest first, across the fleet, in a table.
    let out = broker.dcvsm(&[
        "--output-format",
        "table",
        "describe-server-history",
        "--newest-first",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let open = text.find("OpenServers").unwrap();
    let close = text.find("CloseServers").unwrap();
    assert!(open < close, "{text}");
    assert!(text.contains("firmware update"), "{text}");
    // Nothing in the future.
    let reply = broker.json(&["describe-server-history", "--since", "2999-01-01T00:00:00Z"]);
    assert!(reply.get("Records").is_none(), "{reply}");
    let out = broker.dcvsm(&["describe-server-history", "--since", "last tuesday"]);
    assert_eq!(out.status.code(), Some(252), "{}", stderr(&out));
    assert!(stderr(&out).contains("--since"), "{}", stderr(&out));
}

/// `watch-servers`: the snapshot, then a line per change, in a filtered
/// view (a server closed enters `closed=true`, opened leaves it); JSON: one
/// message per line; `--max-changes` ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn watch_servers_prints_a_line_per_change() {
    use tokio::io::AsyncBufReadExt as _;
    let broker = Broker::start(3).await;
    let start = |format: &str| {
        let mut command = tokio::process::Command::from(dcvsm_cmd());
        command
            .args(["--broker-url", &broker.url, "--output-format", format])
            .args([
                "watch-servers",
                "--filter",
                "closed=true",
                "--max-changes",
                "2",
            ])
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().unwrap();
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        (child, lines)
    };
    let (mut table, mut table_lines) = start("table");
    let (mut json, mut json_lines) = start("json");
    // Both have their (empty) snapshot before anything changes.
    let first = table_lines.next_line().await.unwrap().unwrap();
    assert!(first.ends_with("SNAPSHOT (no servers)"), "{first}");
    let first: Value =
        serde_json::from_str(&json_lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(first["Type"], "SNAPSHOT");
    assert_eq!(first["SnapshotEnd"], true);
    broker.json(&[
        "close-servers",
        "--server-ids",
        "serverId1",
        "--reason",
        "kernel patch",
    ]);
    broker.json(&["open-servers", "--server-ids", "serverId1"]);

    let added = table_lines.next_line().await.unwrap().unwrap();
    let parts: Vec<&str> = added.split(' ').collect();
    assert_eq!(
        &parts[1..5],
        ["ADDED", "serverId1", "UNAVAILABLE", "[SERVER_CLOSED]"],
        "{added}"
    );
    assert!(
        added.ends_with("holds=default(anonymous: kernel patch)"),
        "{added}"
    );
    let removed = table_lines.next_line().await.unwrap().unwrap();
    assert!(removed.contains(" REMOVED serverId1 "), "{removed}");
    assert!(table.wait().await.unwrap().success());

    let mut types = Vec::new();
    while let Some(line) = json_lines.next_line().await.unwrap() {
        let message: Value = serde_json::from_str(&line).unwrap();
        if message["Type"] == "CHANGES" {
            for change in message["Changes"].as_array().unwrap() {
                assert_eq!(change["ServerId"], "serverId1");
                types.push(change["Type"].as_str().unwrap().to_owned());
            }
        }
    }
    assert_eq!(types, ["ADDED", "REMOVED"]);
    assert!(json.wait().await.unwrap().success());
}

/// `watch-servers` outlives its broker: when the broker restarts (on the
/// same address, a new epoch), it reconnects, is told its sequence is no
/// longer kept, says so, lists again, and goes on with the new broker's
/// changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn watch_servers_lists_again_after_the_broker_restarts() {
    use tokio::io::AsyncBufReadExt as _;
    let args = ["--in-memory", "--demo-fleet", "3"];
    let first = BrokerProcess::start_exactly(&args).await;
    let addr = first.addr;
    let url = format!("http://{addr}");
    let mut command = tokio::process::Command::from(dcvsm_cmd());
    command
        .args(["--broker-url", &url, "--output-format", "json"])
        .args([
            "watch-servers",
            "--filter",
            "closed=true",
            "--max-changes",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut watcher = command.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(watcher.stdout.take().unwrap()).lines();
    let snapshot: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(snapshot["Type"], "SNAPSHOT");
    first.terminate().await;
    let second = BrokerProcess::start_on(addr, &args).await;
    // The watcher re-lists from the new broker: a snapshot of its epoch.
    let again: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(again["Type"], "SNAPSHOT", "{again}");
    assert_ne!(again["Epoch"], snapshot["Epoch"]);
    let broker = Broker {
        _process: second,
        url,
        admin: None,
    };
    let closed = broker.json(&[
        "close-servers",
        "--server-ids",
        "serverId1",
        "--reason",
        "after",
    ]);
    assert_eq!(
        closed["SuccessfulList"][0]["ServerId"], "serverId1",
        "{closed}"
    );
    let change: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(change["Changes"][0]["Type"], "ADDED", "{change}");
    assert_eq!(change["Changes"][0]["ServerId"], "serverId1");
    let out = watcher.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("reconnecting"), "{stderr}");
    assert!(
        stderr.contains("starting again from a snapshot"),
        "{stderr}"
    );
}

/// `drain-servers` waits, with a progress line on stderr, until the last
/// session ends (exit 0; the reply carries the drain's final state), or
/// until the deadline passes (exit 4); `describe-drains` lists the drains;
/// bad flags are refused before any call.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn drain_servers_waits_until_the_sessions_end_or_the_deadline_passes() {
    use dcv_broker::pb::{self, agent_client::AgentClient};
    use tokio::io::AsyncBufReadExt as _;
    let process = BrokerProcess::start_exactly(&["--in-memory"]).await;
    let url = format!("http://{}", process.addr);
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut agent = AgentClient::new(channel.clone());
    for id in ["dr1", "dr2", "dr3"] {
        agent
            .register_server(common::registration(id, "linux", 2))
            .await
            .unwrap();
    }
    let busy = |id: &str, session: &str| {
        common::beat(
            id,
            vec![common::session(
                session,
                pb::SessionType::Virtual,
                pb::SessionState::Ready,
            )],
        )
    };
    agent.heartbeat(busy("dr1", "busy-1")).await.unwrap();
    agent.heartbeat(busy("dr3", "busy-3")).await.unwrap();
    let broker = Broker {
        _process: process,
        url,
        admin: None,
    };

    let mut command = tokio::process::Command::from(dcvsm_cmd());
    command
        .args(["--broker-url", &broker.url])
        .args([
            "drain-servers",
            "--server-ids",
            "dr1,dr2",
            "--reason",
            "bios update",
            "--poll-interval",
            "20ms",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap();
    let mut progress = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    while let Some(line) = progress.next_line().await.unwrap() {
        seen.push(line.clone());
        if line.contains("1 session(s) left on 1 of 2 server(s)") {
            break;
        }
    }
    assert!(
        seen.last()
            .is_some_and(|l| l.contains("1 session(s) left on 1 of 2 server(s)")),
        "{seen:?}"
    );
    // The simulated agent ends the last session: the wait ends.
    agent.heartbeat(common::beat("dr1", vec![])).await.unwrap();
    let mut rest = Vec::new();
    while let Some(line) = progress.next_line().await.unwrap() {
        rest.push(line);
    }
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{rest:?}");
    assert!(rest.iter().any(|l| l.ends_with(": drained")), "{rest:?}");
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = reply["DrainId"].as_str().unwrap().to_owned();
    assert_eq!(reply["SuccessfulList"].as_array().unwrap().len(), 2);
    assert_eq!(reply["Drain"]["DrainId"], id.as_str());
    assert_eq!(reply["Drain"]["State"], "DRAINED");
    assert_eq!(reply["Drain"]["Reason"], "bios update");

    // A deadline that passes with a session left: exit 4.
    let out = broker.dcvsm(&[
        "drain-servers",
        "--server-ids",
        "dr3",
        "--deadline-in",
        "300ms",
        "--poll-interval",
        "20ms",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the deadline passed with 1 session(s) left"),
        "{}",
        stderr(&out)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["Drain"]["State"], "DEADLINE_PASSED");
    assert_eq!(reply["Drain"]["OnDeadline"], "REPORT");

    // Both drains are described; one page of one drain at a time, walked.
    let listed = broker.json(&["describe-drains", "--max-results", "1"]);
    let drains = listed["Drains"].as_array().unwrap();
    assert_eq!(drains.len(), 2, "{listed}");
    assert!(drains.iter().any(|d| d["DrainId"] == id.as_str()));
    // A server already drained under the hold name is refused (exit 3)
    // without waiting; --no-wait returns at once.
    let out = broker.dcvsm(&["drain-servers", "--server-ids", "dr1", "--no-wait"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        reply["UnsuccessfulList"][0]["FailureCode"],
        "ALREADY_DRAINING"
    );
    for bad in [
        ["--deadline-in", "soon"],
        ["--deadline", "tomorrow"],
        ["--poll-interval", "0s"],
    ] {
        let mut args = vec!["drain-servers", "--server-ids", "dr2"];
        args.extend(bad);
        let out = broker.dcvsm(&args);
        assert_eq!(out.status.code(), Some(252), "{bad:?}: {}", stderr(&out));
    }
}
