//! The broker's configuration file (`--config`), through the real binary:
//! every setting can be set in a file, flags and the environment override
//! it, unknown keys and bad values are refused in one line naming the key,
//! a file holding a secret must be private, and `config defaults` prints a
//! file naming every flag that `config check` accepts.

mod common;

use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::process::{BROKER_BIN, BrokerProcess};
use dcv_broker::pb;

/// A directory of its own for each test's files.
fn dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("dcv-broker-config-{name}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `text` to `name` in `dir` with `mode`.
fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// The binary with `args`, none of the broker's variables inherited (the
/// tests set the ones they mean).
fn broker(args: &[&str]) -> Command {
    let mut command = Command::new(BROKER_BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("DCV_BROKER_") {
            command.env_remove(name);
        }
    }
    command.args(args);
    command
}

fn run(command: &mut Command) -> Output {
    command.output().expect("the broker binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// `config check` on `path`: the settings it reports, key to (value,
/// origin), commented-out (unset) ones left out.
fn check(path: &Path, env: &[(&str, &str)]) -> Vec<(String, String, String)> {
    let out = run(
        broker(&["config", "check", "--config", path.to_str().unwrap()]).envs(env.iter().copied()),
    );
    assert_eq!(out.status.code(), Some(0), "config check: {}", stderr(&out));
    stdout(&out)
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            let (setting, origin) = line.rsplit_once(" # ").expect("an origin");
            let (key, value) = setting.split_once(" = ").expect("key = value");
            (
                key.trim().to_owned(),
                value.trim().to_owned(),
                origin.trim().to_owned(),
            )
        })
        .collect()
}

/// Every key of `config defaults`, set or commented out.
fn default_keys() -> BTreeSet<String> {
    let out = run(&mut broker(&["config", "defaults"]));
    assert_eq!(out.status.code(), Some(0));
    stdout(&out)
        .lines()
        .filter_map(|line| {
            let line = line.strip_prefix('#').unwrap_or(line);
            let (key, _) = line.split_once(" = ")?;
            key.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                .then(|| key.to_owned())
        })
        .collect()
}

#[test]
fn config_defaults_has_a_key_for_every_flag_and_config_check_accepts_it() {
    let help = stdout(&run(&mut broker(&["--help"])));
    // The lines that introduce an option: `  -V, --version`, `      --listen <LISTEN>`.
    let flags: BTreeSet<String> = help
        .lines()
        .map(str::trim_start)
        .filter_map(|line| {
            line.strip_prefix("--")
                .or_else(|| line.split_once(", --").map(|(_, rest)| rest))
        })
        .map(|rest| {
            rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .filter(|flag| !["help", "version", "config"].contains(&flag.as_str()))
        .collect();
    assert!(flags.len() > 40, "the flags of --help: {flags:?}");
    let keys = default_keys();
    let missing: Vec<&String> = flags
        .iter()
        .filter(|flag| !keys.contains(&flag.replace('-', "_")))
        .collect();
    assert!(
        missing.is_empty(),
        "flags without a key in `config defaults`: {missing:?}"
    );
    assert_eq!(
        keys.len(),
        flags.len(),
        "a key for no flag: {keys:?} vs {flags:?}"
    );

    let defaults = stdout(&run(&mut broker(&["config", "defaults"])));
    assert!(
        defaults.contains("# Address to serve gRPC on.")
            && defaults.contains("listen = \"127.0.0.1:8443\"\n"),
        "each key under its flag's help, at its default:\n{defaults}"
    );
    let dir = dir("defaults");
    let path = write(&dir, "defaults.toml", &defaults, 0o600);
    let checked = check(&path, &[]);
    // Every key the file sets is taken from it, at the value it says.
    for line in defaults
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (key, value) = line.split_once(" = ").unwrap();
        let (_, got, origin) = checked
            .iter()
            .find(|(k, ..)| k == key)
            .unwrap_or_else(|| panic!("{key} missing from {checked:?}"));
        assert_eq!(got, value, "{key}");
        // A switch at false is its default: nothing to give clap.
        let expected = if value == "false" { "default" } else { "file" };
        assert_eq!(origin, expected, "{key}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Three files (a SQLite broker, a replica on PostgreSQL, one in memory:
/// some settings exclude others) that between them set every key of
/// `config defaults` to a value other than its default; `config check`
/// reports each at the file's value, from the file.
/// A flag added to the broker fails this test until a line here sets it.
#[test]
fn files_set_every_setting() {
    let sqlite = r#"
listen = "127.0.0.2:9443"
allow_insecure_non_loopback = true
allowed_host = ["broker.internal", "b.test"]
capacity_floor = ["tag:pool=gpu:5", "tag:zone=a:2"]
agent_listen = "127.0.0.2:9445"
agent_threads = 3
agent_nice = 5
agent_max_connections = 500
rest_additions = true
tls_cert = "/etc/dcv-broker/tls/server.pem"
tls_key = "/etc/dcv-broker/tls/server-key.pem"
auth = "on"
admin_socket = "/run/dcv-broker/admin.sock"
token_ttl = "5m"
auth_health = true
auth_reflection = true
agent_ca = "/etc/dcv-broker/tls/agents-ca.pem"
data_dir = "/var/lib/dcv-broker"
demo_fleet = 7
heartbeat_interval = "10s"
unreachable_after = "40s"
remove_after = "2h"
sweep_interval = "3s"
page_token_ttl = "20m"
placement_strategy = "pack"
queue_max_size = 50
queue_timeout = "60s"
agent_timeout = "12s"
create_retries = 4
screenshot_timeout = "7s"
screenshot_max_width = 320
screenshot_max_height = 200
screenshot_format = "jpeg"
deleted_session_retention = "30m"
connection_token_ttl = "2h"
request_timeout = "20s"
drain_deadline = "25s"
shutdown_grace = "2s"
max_connections = 700
first_request_timeout = "4s"
idle_connection_timeout = "10m"
log_format = "json"
log = "debug"
otlp_endpoint = "http://127.0.0.1:4317"
metrics_listen = "127.0.0.2:9446"
audit_log = "/var/log/dcv-broker/audit.jsonl"
audit_retention = "30days"
client_token_retention = "2h"
client_token_limit = 500
watch_buffer = 2048
max_request_bytes = 65536
max_concurrent_requests = 99
client_rate = 40
client_burst = 80
max_header_list_bytes = 4096
max_concurrent_streams = 64
"#;
    let cluster = r#"
database_url = "postgres://broker:s3cret@db.internal:5432/dcv"
node_id = "broker-a"
advertise_url = "http://127.0.0.1:9443"
leader_lease = "3s"
cluster_ca = "/etc/dcv-broker/tls/cluster-ca.pem"
"#;
    let memory = "in_memory = true\nmetrics = false\n";
    let dir = dir("every");
    let mut set = BTreeSet::new();
    for (name, text) in [("sqlite", sqlite), ("cluster", cluster), ("memory", memory)] {
        let path = write(&dir, &format!("{name}.toml"), text, 0o600);
        let checked = check(&path, &[]);
        for line in text.lines().filter(|l| !l.is_empty()) {
            let (key, value) = line.split_once(" = ").unwrap();
            let (_, got, origin) = checked
                .iter()
                .find(|(k, ..)| k == key)
                .unwrap_or_else(|| panic!("{name}: {key} missing from {checked:?}"));
            // The secret is never shown.
            let value = if key == "database_url" {
                "\"<secret>\""
            } else {
                value
            };
            assert_eq!(
                (got.as_str(), origin.as_str()),
                (value, "file"),
                "{name}: {key}"
            );
            set.insert(key.to_owned());
        }
        // What the file leaves out stays at its default.
        for (key, _, origin) in &checked {
            if !set.contains(key) {
                assert_ne!(origin, "file", "{name}: {key}");
            }
        }
    }
    assert_eq!(set, default_keys(), "the files set every key");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The servers a running broker describes.
async fn server_count(broker: &BrokerProcess) -> usize {
    let mut client = pb::servers_client::ServersClient::connect(format!("http://{}", broker.addr))
        .await
        .unwrap();
    client
        .describe_servers(pb::DescribeServersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .servers
        .len()
}

/// Starts the broker serving with `args` and `env` on 127.0.0.1:0 (given
/// as a flag) and waits for its demo fleet.
async fn serve(args: &[&str], env: &[(&str, &str)]) -> BrokerProcess {
    let mut command = tokio::process::Command::from(broker(&["--listen", "127.0.0.1:0"]));
    command.args(args).envs(env.iter().copied());
    let mut process = BrokerProcess::spawn(command).await;
    let _ = process.logged("demo fleet registered").await;
    process
}

/// A serving broker takes the file's settings, below its flags and
/// environment: the file's listening address (which the broker would
/// refuse, beyond loopback without TLS) yields to --listen, its demo
/// fleet to --demo-fleet or DCV_BROKER_DEMO_FLEET, its hour-long shutdown
/// grace to DCV_BROKER_SHUTDOWN_GRACE (else SIGTERM would not end it
/// within the test's patience); and its data directory to --in-memory,
/// which excludes it.
#[tokio::test]
async fn flags_and_the_environment_override_the_file() {
    let dir = dir("override");
    let file = write(
        &dir,
        "broker.toml",
        "listen = \"192.0.2.1:8443\"\ndemo_fleet = 5\nshutdown_grace = \"1h\"\n\
         data_dir = \"/nonexistent/dcv-broker\"\nlog = \"info\"\n",
        0o644,
    );
    let config = file.to_str().unwrap();
    let quick = [("DCV_BROKER_SHUTDOWN_GRACE", "0s")];

    let from_file = serve(&["--config", config, "--in-memory"], &quick).await;
    assert_eq!(
        server_count(&from_file).await,
        5,
        "the file beats the default"
    );
    from_file.terminate().await;

    let flag = serve(
        &["--config", config, "--in-memory", "--demo-fleet", "2"],
        &quick,
    )
    .await;
    assert_eq!(server_count(&flag).await, 2, "a flag beats the file");
    flag.terminate().await;

    let env = [
        ("DCV_BROKER_SHUTDOWN_GRACE", "0s"),
        ("DCV_BROKER_DEMO_FLEET", "3"),
        ("DCV_BROKER_CONFIG", config),
    ];
    let from_env = serve(&["--in-memory"], &env).await;
    assert_eq!(
        server_count(&from_env).await,
        3,
        "the environment beats the file"
    );
    from_env.terminate().await;

    // The same precedence in what `config check` reports.
    let checked = check(
        &file,
        &[
            ("DCV_BROKER_DEMO_FLEET", "3"),
            ("DCV_BROKER_LISTEN", "127.0.0.1:0"),
        ],
    );
    let origin = |key: &str| {
        checked
            .iter()
            .find(|(k, ..)| k == key)
            .map(|(_, v, o)| (v.clone(), o.clone()))
    };
    assert_eq!(
        origin("demo_fleet"),
        Some(("3".into(), "environment".into()))
    );
    assert_eq!(
        origin("listen"),
        Some(("\"127.0.0.1:0\"".into(), "environment".into()))
    );
    assert_eq!(
        origin("shutdown_grace"),
        Some(("\"1h\"".into(), "file".into()))
    );
    assert_eq!(
        origin("token_ttl"),
        Some(("\"15m\"".into(), "default".into()))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each bad file is refused with exactly one line naming the key (or the
/// line), by `config check` and by a broker asked to serve with it, which
/// then never listens.
#[test]
fn unknown_keys_and_bad_values_are_refused_in_one_line_naming_the_key() {
    let dir = dir("bad");
    let cases = [
        (
            "listen = \"nope\"\n",
            "key \"listen\": invalid value \"nope\": invalid socket address syntax",
        ),
        (
            "lissen = \"127.0.0.1:1\"\n",
            "unknown key \"lissen\" (`dcv-broker config defaults` lists every key)",
        ),
        (
            "tls-cert = \"a.pem\"\n",
            "unknown key \"tls-cert\" (keys are spelled with _: tls_cert)",
        ),
        (
            "[limits]\nclient_rate = 1\n",
            "unknown key \"limits\" (`dcv-broker config defaults` lists every key)",
        ),
        (
            "auth = \"maybe\"\n",
            "key \"auth\": invalid value \"maybe\": expected one of auto, on, off",
        ),
        (
            "token_ttl = 900\n",
            "key \"token_ttl\": invalid value \"900\": time unit needed, for example 900sec or 900ms",
        ),
        (
            "screenshot_max_width = 5000\n",
            "key \"screenshot_max_width\": invalid value \"5000\": 5000 is not in 1..=4096",
        ),
        (
            "queue_max_size = -1\n",
            "key \"queue_max_size\": invalid value \"-1\": invalid digit found in string",
        ),
        (
            "in_memory = \"yes\"\n",
            "key \"in_memory\": expected true or false",
        ),
        (
            "listen = [\"127.0.0.1:1\"]\n",
            "key \"listen\": expected one value, not a list",
        ),
        (
            "allowed_host = [[\"a\"]]\n",
            "key \"allowed_host\": expected a string, a number or a boolean",
        ),
        (
            "demo_fleet = 1\nlisten = \n",
            "line 2: not valid TOML: string values must be quoted, expected literal string",
        ),
        (
            "node_id = \"a\"\n",
            "the following required arguments were not provided: --database-url <URL>",
        ),
        (
            "tls_cert = \"a.pem\"\n",
            "--tls-cert and --tls-key go together: give both to serve TLS, or neither",
        ),
    ];
    for (i, (text, why)) in cases.iter().enumerate() {
        let path = write(&dir, &format!("{i}.toml"), text, 0o600);
        let expected = format!("dcv-broker: config file {}: {why}\n", path.display());
        let out = run(&mut broker(&[
            "config",
            "check",
            "--config",
            path.to_str().unwrap(),
        ]));
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert_eq!(stderr(&out), expected, "config check of {text:?}");
        assert!(stdout(&out).is_empty());
        // A data directory, not --in-memory: clap drops `requires` on
        // --node-id when a flag conflicting with the required one is given.
        let data = dir.join("data");
        let out = run(&mut broker(&[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--config",
            path.to_str().unwrap(),
        ]));
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(stdout(&out).is_empty(), "it never listened: {text}");
        // The cross-flag rules the broker checks after the file is read
        // are about flags it then names: the serving broker says them
        // without the file's name.
        let got = stderr(&out);
        assert_eq!(got.lines().count(), 1, "{got}");
        assert!(got.contains(why), "serving with {text:?}: {got}");
    }
    let missing = dir.join("missing.toml");
    let out = run(&mut broker(&[
        "config",
        "check",
        "--config",
        missing.to_str().unwrap(),
    ]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with(&format!(
        "dcv-broker: config file {}: cannot read it: ",
        missing.display()
    )));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A file that holds a secret (the database URL, with its password) must
/// be its owner's alone: refused when group or others may read it, taken
/// (the secret never printed) when private.
#[test]
fn a_file_holding_a_secret_must_be_private() {
    let dir = dir("secret");
    let text = "database_url = \"postgres://broker:s3cret@db.internal/dcv\"\n";
    for mode in [0o640, 0o604, 0o644] {
        let path = write(&dir, "shared.toml", text, mode);
        let out = run(&mut broker(&[
            "config",
            "check",
            "--config",
            path.to_str().unwrap(),
        ]));
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            stderr(&out),
            format!(
                "dcv-broker: config file {}: key \"database_url\" is a secret, but the file is \
                 readable by group or others (mode {mode:o}); chmod 600 it\n",
                path.display()
            )
        );
    }
    let path = write(&dir, "private.toml", text, 0o600);
    let out = run(&mut broker(&[
        "config",
        "check",
        "--config",
        path.to_str().unwrap(),
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("database_url = \"<secret>\""));
    assert!(!stdout(&out).contains("s3cret") && !stderr(&out).contains("s3cret"));
    // Without a secret, a file may be shared.
    let path = write(&dir, "plain.toml", "demo_fleet = 2\n", 0o644);
    let out = run(&mut broker(&[
        "config",
        "check",
        "--config",
        path.to_str().unwrap(),
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(&dir);
}
