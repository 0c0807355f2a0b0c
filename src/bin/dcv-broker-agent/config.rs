//! The agent's configuration: DCV's `agent.conf` layout (TOML, `[agent]`
//! and `[log]`), read, checked and resolved into a [`Config`] whose every
//! problem is one line naming the key.
//!
//! Keys are DCV's where DCV has one (Session Manager Administrator Guide,
//! "Agent configuration file"); ours besides are `broker_url`,
//! `dcv_command`, `dcv_command_timeout`, `dcv_port`, `dcv_web_url_path`,
//! `state_dir`, the credentials, `reconnect_max_delay` and the AWS switches.
//! DCV's `software_statement_path` (its agents register with a software
//! statement) and `[log]` `directory`/`rotation` are accepted and ignored:
//! a file written for DCV's agent must not stop ours, and our logs go to
//! stderr (journald under systemd).

use std::{
    collections::BTreeMap,
    fmt, fs,
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// Where the agent looks when neither `--config` nor the environment names a file.
pub const DEFAULT_CONFIG: &str = "/etc/dcv-broker-agent/agent.conf";
/// The broker's own default port (`dcv-broker --listen`'s default).
pub const DEFAULT_BROKER_PORT: u16 = 8443;
/// DCV's default port for the DCV server.
pub const DEFAULT_DCV_PORT: u16 = 8443;
const DEFAULT_STATE_DIR: &str = "/var/lib/dcv-broker-agent";
const DEFAULT_INIT_FOLDER: &str = "/var/lib/dcv-broker-agent/init";
const DEFAULT_AUTORUN_FOLDER: &str = "/var/lib/dcv-broker-agent/autorun";
const DEFAULT_AWS_METADATA_ENDPOINT: &str = "http://169.254.169.254";
/// A `dcv` call that has not answered in 30 s is hung, not slow.
const DEFAULT_DCV_COMMAND_TIMEOUT_SECS: u64 = 30;
/// `dcv create-session` of a heavy desktop can take minutes, never hours.
const MAX_DCV_COMMAND_TIMEOUT_SECS: u64 = 3600;
/// The reconnect backoff's cap: 30 s keeps a broker restart short for a
/// fleet without a thundering herd.
const DEFAULT_RECONNECT_MAX_DELAY_SECS: u64 = 30;
const MAX_RECONNECT_MAX_DELAY_SECS: u64 = 3600;
/// Tags files are a few lines; a bigger one is a mistake, and each tag
/// travels in every RegisterServer.
const MAX_TAG_FILE_BYTES: u64 = 64 * 1024;
/// The most tags one server sends (the broker bounds a registration too).
const MAX_TAGS: usize = 256;
/// A tag key or value longer than this is not a label.
const MAX_TAG_TEXT: usize = 1024;
/// Virtual sessions a Linux host takes when the file does not say: the
/// broker places none on a host reporting 0, and ten desktops are what a
/// typical GPU host runs well.
const DEFAULT_MAX_VIRTUAL_SESSIONS: i64 = 10;
/// The most virtual sessions or sessions per user the broker can count.
const MAX_SESSIONS_SETTING: i64 = 100_000;

/// A configuration problem: the file, and one line naming the key.
#[derive(Debug)]
pub struct ConfigError {
    pub path: PathBuf,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for ConfigError {}

/// How the agent proves who it is to the broker.
#[derive(Clone, Default)]
pub struct Credentials {
    /// OAuth client credentials at the broker's `/oauth2/token`.
    pub client: Option<(String, String)>,
    /// Mutual TLS: certificate and key, PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

// By hand: the secret and the key never reach a log.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("client_id", &self.client.as_ref().map(|(id, _)| id))
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

/// The checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    /// `http://` or `https://` URL of the broker.
    pub broker_url: String,
    /// The host part of the broker URL (for choosing the primary IP).
    pub broker_host: String,
    pub broker_port: u16,
    pub ca_pem: Option<Vec<u8>>,
    pub tls_strict: bool,
    /// Tags, in order, keys unique.
    pub tags: Vec<(String, String)>,
    pub init_folder: PathBuf,
    pub autorun_folder: PathBuf,
    pub max_virtual_sessions: i32,
    pub max_concurrent_sessions_per_user: i32,
    pub enable_query_logged_in_users: bool,
    pub dcv_command: PathBuf,
    pub dcv_command_timeout: Duration,
    pub dcv_port: u16,
    pub dcv_web_url_path: String,
    pub state_dir: PathBuf,
    pub credentials: Credentials,
    pub reconnect_max_delay: Duration,
    pub aws_metadata: bool,
    pub aws_metadata_endpoint: String,
    pub log_level: String,
}

/// The file as written. Every field optional: requirements are checked
/// after, so that the message can name the key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[allow(dead_code)] // DCV's files carry it; nothing depends on it yet
    version: Option<String>,
    agent: Option<RawAgent>,
    log: Option<RawLog>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    broker_host: Option<String>,
    broker_port: Option<u16>,
    broker_url: Option<String>,
    ca_file: Option<PathBuf>,
    tls_strict: Option<bool>,
    tags_folder: Option<PathBuf>,
    init_folder: Option<PathBuf>,
    autorun_folder: Option<PathBuf>,
    max_virtual_sessions: Option<i64>,
    max_concurrent_sessions_per_user: Option<i64>,
    enable_query_logged_in_users: Option<bool>,
    #[allow(dead_code)] // DCV's; our agents need no software statement
    software_statement_path: Option<PathBuf>,
    dcv_command: Option<PathBuf>,
    dcv_command_timeout: Option<u64>,
    dcv_port: Option<u16>,
    dcv_web_url_path: Option<String>,
    state_dir: Option<PathBuf>,
    client_id: Option<String>,
    client_secret_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    reconnect_max_delay: Option<u64>,
    aws_metadata: Option<bool>,
    aws_metadata_endpoint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    #[allow(dead_code)] // DCV's; ours logs to stderr
    directory: Option<PathBuf>,
    #[allow(dead_code)] // DCV's; ours logs to stderr
    rotation: Option<String>,
}

const TOP_KEYS: &[&str] = &["version", "agent", "log"];
const AGENT_KEYS: &[&str] = &[
    "broker_host",
    "broker_port",
    "broker_url",
    "ca_file",
    "tls_strict",
    "tags_folder",
    "init_folder",
    "autorun_folder",
    "max_virtual_sessions",
    "max_concurrent_sessions_per_user",
    "enable_query_logged_in_users",
    "software_statement_path",
    "dcv_command",
    "dcv_command_timeout",
    "dcv_port",
    "dcv_web_url_path",
    "state_dir",
    "client_id",
    "client_secret_file",
    "cert_file",
    "key_file",
    "reconnect_max_delay",
    "aws_metadata",
    "aws_metadata_endpoint",
];
const LOG_KEYS: &[&str] = &["level", "directory", "rotation"];
const LOG_LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace"];

/// Reads and checks the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let err = |message: String| ConfigError {
        path: path.to_owned(),
        message,
    };
    let text = fs::read_to_string(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    parse(path, &text).map_err(err)
}

/// Checks the text of a configuration file (`path` only resolves nothing;
/// it is for messages).
pub fn parse(_path: &Path, text: &str) -> Result<Config, String> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("not valid TOML: {}", one_line(e.message())))?;
    let raw = typed(&table)?;
    resolve(raw)
}

/// Deserializes with messages that name the key: unknown keys first, then
/// each key on its own, so a type error says which key it is about.
fn typed(table: &toml::Table) -> Result<RawFile, String> {
    for key in table.keys() {
        if !TOP_KEYS.contains(&key.as_str()) {
            return Err(format!("unknown key `{key}` at the top level"));
        }
    }
    for (section, known) in [("agent", AGENT_KEYS), ("log", LOG_KEYS)] {
        let Some(value) = table.get(section) else {
            continue;
        };
        let Some(inner) = value.as_table() else {
            return Err(format!("[{section}] must be a table"));
        };
        for (key, v) in inner {
            if !known.contains(&key.as_str()) {
                return Err(format!("unknown key `{key}` in [{section}]"));
            }
            let mut one = toml::Table::new();
            one.insert(key.clone(), v.clone());
            let checked = match section {
                "agent" => toml::Value::Table(one).try_into::<RawAgent>().map(drop),
                _ => toml::Value::Table(one).try_into::<RawLog>().map(drop),
            };
            checked.map_err(|e| format!("[{section}] {key}: {}", one_line(e.message())))?;
        }
    }
    if let Some(v) = table.get("version")
        && !v.is_str()
    {
        return Err("version: must be a string such as '0.1'".into());
    }
    toml::Value::Table(table.clone())
        .try_into::<RawFile>()
        .map_err(|e| one_line(e.message()))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn resolve(raw: RawFile) -> Result<Config, String> {
    let a = raw.agent.unwrap_or_default();
    let log = raw.log.unwrap_or_default();
    let broker_port = a.broker_port.unwrap_or(DEFAULT_BROKER_PORT);
    let credentials_checked = credentials(&a);
    if broker_port == 0 {
        return Err("[agent] broker_port must be 1 to 65535".into());
    }
    let (broker_url, broker_host, broker_port) = match (&a.broker_url, &a.broker_host) {
        (Some(url), _) => {
            let (host, port) = check_broker_url(url)?;
            (url.trim_end_matches('/').to_owned(), host, port)
        }
        (None, Some(host)) => {
            let host = host.trim();
            if host.is_empty() || host.contains(['/', ' ', '@']) {
                return Err(format!("[agent] broker_host: {host:?} is not a host name"));
            }
            let bracketed = if host.parse::<std::net::Ipv6Addr>().is_ok() {
                format!("[{host}]")
            } else {
                host.to_owned()
            };
            (
                format!("https://{bracketed}:{broker_port}"),
                host.to_owned(),
                broker_port,
            )
        }
        (None, None) => return Err("[agent] broker_host is required".into()),
    };
    let ca_pem = match &a.ca_file {
        Some(path) => Some(read_pem(path, "ca_file", "CERTIFICATE")?),
        None => None,
    };
    let tags = match &a.tags_folder {
        Some(dir) => read_tags(dir)?,
        None => Vec::new(),
    };
    let folder = |value: &Option<PathBuf>, key: &str, default: &str| match value {
        Some(p) if p.is_absolute() => Ok(p.clone()),
        Some(p) => Err(format!(
            "[agent] {key}: {} must be an absolute path",
            p.display()
        )),
        None => Ok(PathBuf::from(default)),
    };
    let init_folder = folder(&a.init_folder, "init_folder", DEFAULT_INIT_FOLDER)?;
    let autorun_folder = folder(&a.autorun_folder, "autorun_folder", DEFAULT_AUTORUN_FOLDER)?;
    let state_dir = folder(&a.state_dir, "state_dir", DEFAULT_STATE_DIR)?;
    let sessions = |value: Option<i64>, key: &str, default: i64| -> Result<i32, String> {
        match value {
            None => Ok(default as i32),
            Some(n) if (0..=MAX_SESSIONS_SETTING).contains(&n) => Ok(n as i32),
            Some(n) => Err(format!(
                "[agent] {key}: {n} is out of range 0 to {MAX_SESSIONS_SETTING}"
            )),
        }
    };
    let max_virtual_sessions = sessions(
        a.max_virtual_sessions,
        "max_virtual_sessions",
        DEFAULT_MAX_VIRTUAL_SESSIONS,
    )?;
    // 0: no limit per user.
    let max_concurrent_sessions_per_user = sessions(
        a.max_concurrent_sessions_per_user,
        "max_concurrent_sessions_per_user",
        0,
    )?;
    let seconds = |value: Option<u64>, key: &str, default: u64, max: u64| match value {
        None => Ok(Duration::from_secs(default)),
        Some(n) if (1..=max).contains(&n) => Ok(Duration::from_secs(n)),
        Some(n) => Err(format!("[agent] {key}: {n} is out of range 1 to {max}")),
    };
    let dcv_command_timeout = seconds(
        a.dcv_command_timeout,
        "dcv_command_timeout",
        DEFAULT_DCV_COMMAND_TIMEOUT_SECS,
        MAX_DCV_COMMAND_TIMEOUT_SECS,
    )?;
    let reconnect_max_delay = seconds(
        a.reconnect_max_delay,
        "reconnect_max_delay",
        DEFAULT_RECONNECT_MAX_DELAY_SECS,
        MAX_RECONNECT_MAX_DELAY_SECS,
    )?;
    let dcv_port = a.dcv_port.unwrap_or(DEFAULT_DCV_PORT);
    if dcv_port == 0 {
        return Err("[agent] dcv_port must be 1 to 65535".into());
    }
    let dcv_web_url_path = a.dcv_web_url_path.unwrap_or_else(|| "/".into());
    if !dcv_web_url_path.starts_with('/') || dcv_web_url_path.chars().any(char::is_whitespace) {
        return Err(format!(
            "[agent] dcv_web_url_path: {dcv_web_url_path:?} must start with / and hold no spaces"
        ));
    }
    let dcv_command = a.dcv_command.unwrap_or_else(|| PathBuf::from("dcv"));
    if dcv_command.as_os_str().is_empty() {
        return Err("[agent] dcv_command must not be empty".into());
    }
    let credentials = credentials_checked?;
    let aws_metadata_endpoint = a
        .aws_metadata_endpoint
        .unwrap_or_else(|| DEFAULT_AWS_METADATA_ENDPOINT.into());
    if !aws_metadata_endpoint.starts_with("http://") {
        return Err(format!(
            "[agent] aws_metadata_endpoint: {aws_metadata_endpoint:?} must be an http:// URL (IMDS speaks plain HTTP)"
        ));
    }
    let log_level = log.level.unwrap_or_else(|| "info".into()).to_lowercase();
    if !LOG_LEVELS.contains(&log_level.as_str()) {
        return Err(format!(
            "[log] level: {log_level:?} is not one of {}",
            LOG_LEVELS.join(", ")
        ));
    }
    Ok(Config {
        path: PathBuf::new(),
        broker_url,
        broker_host,
        broker_port,
        ca_pem,
        tls_strict: a.tls_strict.unwrap_or(true),
        tags,
        init_folder,
        autorun_folder,
        max_virtual_sessions,
        max_concurrent_sessions_per_user,
        enable_query_logged_in_users: a.enable_query_logged_in_users.unwrap_or(true),
        dcv_command,
        dcv_command_timeout,
        dcv_port,
        dcv_web_url_path,
        state_dir,
        credentials,
        reconnect_max_delay,
        aws_metadata: a.aws_metadata.unwrap_or(false),
        aws_metadata_endpoint: aws_metadata_endpoint.trim_end_matches('/').to_owned(),
        log_level,
    })
}

/// Checks `broker_url`; returns its host and port. Plain `http://` is refused
/// unless the host is a loopback address: a bearer token or an agent's
/// reports must not cross a network in the clear.
fn check_broker_url(url: &str) -> Result<(String, u16), String> {
    let bad = |why: &str| format!("[agent] broker_url: {url:?} {why}");
    let uri: http::Uri = url
        .parse()
        .map_err(|e| bad(&format!("is not a URL: {e}")))?;
    let scheme = uri.scheme_str().unwrap_or("");
    let Some(authority) = uri.authority() else {
        return Err(bad("names no host"));
    };
    if authority.as_str().contains('@') {
        return Err(bad("must not carry credentials"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("must have no path"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = authority
        .port_u16()
        .unwrap_or(if scheme == "http" { 80 } else { 443 });
    match scheme {
        "https" => Ok((host, port)),
        "http" if is_loopback(&host) => Ok((host, port)),
        "http" => Err(bad(
            "uses http:// for a host that is not loopback; use https://",
        )),
        _ => Err(bad("must start with https:// (or http:// for loopback)")),
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Reads a PEM file and checks it holds at least one `label` block.
fn read_pem(path: &Path, key: &str, label: &str) -> Result<Vec<u8>, String> {
    let bytes = fs::read(path)
        .map_err(|e| format!("[agent] {key}: cannot read {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let begin = format!("-----BEGIN {label}-----");
    let found = if label == "PRIVATE KEY" {
        text.lines()
            .any(|l| l.starts_with("-----BEGIN ") && l.ends_with("PRIVATE KEY-----"))
    } else {
        text.contains(&begin)
    };
    if !found {
        return Err(format!(
            "[agent] {key}: {} is not PEM (no {} block)",
            path.display(),
            label
        ));
    }
    Ok(bytes)
}

fn credentials(a: &RawAgent) -> Result<Credentials, String> {
    let mut creds = Credentials::default();
    match (&a.client_id, &a.client_secret_file) {
        (Some(id), Some(file)) => {
            if id.is_empty() || id.chars().any(|c| c.is_control()) {
                return Err("[agent] client_id must be a non-empty printable string".into());
            }
            creds.client = Some((id.clone(), read_secret(file)?));
        }
        (Some(_), None) => {
            return Err("[agent] client_secret_file is required with client_id".into());
        }
        (None, Some(_)) => {
            return Err("[agent] client_id is required with client_secret_file".into());
        }
        (None, None) => {}
    }
    match (&a.cert_file, &a.key_file) {
        (Some(cert), Some(key)) => {
            let cert = read_pem(cert, "cert_file", "CERTIFICATE")?;
            check_private(a.key_file.as_deref().unwrap_or(Path::new("")), "key_file")?;
            let key = read_pem(key, "key_file", "PRIVATE KEY")?;
            creds.identity = Some((cert, key));
        }
        (Some(_), None) => return Err("[agent] key_file is required with cert_file".into()),
        (None, Some(_)) => return Err("[agent] cert_file is required with key_file".into()),
        (None, None) => {}
    }
    Ok(creds)
}

/// A file holding a secret that others may read has leaked already.
fn check_private(path: &Path, key: &str) -> Result<(), String> {
    let meta = fs::metadata(path)
        .map_err(|e| format!("[agent] {key}: cannot read {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "[agent] {key}: {} is readable by group or others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        ));
    }
    Ok(())
}

fn read_secret(path: &Path) -> Result<String, String> {
    check_private(path, "client_secret_file")?;
    let text = fs::read_to_string(path).map_err(|e| {
        format!(
            "[agent] client_secret_file: cannot read {}: {e}",
            path.display()
        )
    })?;
    let secret = text.lines().next().unwrap_or("").trim().to_owned();
    if secret.is_empty() {
        return Err(format!(
            "[agent] client_secret_file: {} is empty",
            path.display()
        ));
    }
    Ok(secret)
}

/// Reads `*.toml` tag files in alphabetical order (later files win), each
/// a table of `key = "value"` strings. Keys starting `dcv:` are the
/// broker's own.
fn read_tags(dir: &Path) -> Result<Vec<(String, String)>, String> {
    let err = |why: String| format!("[agent] tags_folder: {why}");
    let entries =
        fs::read_dir(dir).map_err(|e| err(format!("cannot read {}: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| err(format!("cannot read {}: {e}", dir.display())))?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    let mut tags: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let mut order = 0;
    for file in files {
        let show = file.display();
        let size = fs::metadata(&file)
            .map_err(|e| err(format!("cannot read {show}: {e}")))?
            .len();
        if size > MAX_TAG_FILE_BYTES {
            return Err(err(format!(
                "{show} is larger than {MAX_TAG_FILE_BYTES} bytes"
            )));
        }
        let text =
            fs::read_to_string(&file).map_err(|e| err(format!("cannot read {show}: {e}")))?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            err(format!(
                "{show} is not valid TOML: {}",
                one_line(e.message())
            ))
        })?;
        for (key, value) in table {
            let Some(value) = value.as_str() else {
                return Err(err(format!(
                    "{show}: tag {key:?} must be a string (key = \"value\")"
                )));
            };
            if key.starts_with("dcv:") {
                return Err(err(format!(
                    "{show}: tag {key:?}: keys starting dcv: are the broker's"
                )));
            }
            if key.is_empty() || key.len() > MAX_TAG_TEXT || value.len() > MAX_TAG_TEXT {
                return Err(err(format!(
                    "{show}: tag {key:?} must have a key and a value of at most {MAX_TAG_TEXT} bytes"
                )));
            }
            order += 1;
            tags.insert(key, (order, value.to_owned()));
        }
        if tags.len() > MAX_TAGS {
            return Err(err(format!("more than {MAX_TAGS} tags")));
        }
    }
    let mut out: Vec<(usize, String, String)> =
        tags.into_iter().map(|(k, (o, v))| (o, k, v)).collect();
    out.sort();
    Ok(out.into_iter().map(|(_, k, v)| (k, v)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "agent-config-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn check(text: &str) -> Result<Config, String> {
        parse(Path::new("agent.conf"), text)
    }

    #[test]
    fn the_minimal_file_gets_the_defaults() {
        let c = check("version = '0.1'\n[agent]\nbroker_host = 'broker.example'\n").unwrap();
        assert_eq!(c.broker_url, "https://broker.example:8443");
        assert!(c.tls_strict);
        assert_eq!(c.dcv_command, PathBuf::from("dcv"));
        assert_eq!(c.dcv_command_timeout, Duration::from_secs(30));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/dcv-broker-agent"));
        assert!(!c.aws_metadata);
        assert_eq!(c.log_level, "info");
        assert_eq!(c.max_virtual_sessions, 10);
        assert_eq!(c.max_concurrent_sessions_per_user, 0);
        let c = check("[agent]\nbroker_host = '::1'\nbroker_port = 9\n").unwrap();
        assert_eq!(c.broker_url, "https://[::1]:9");
    }

    #[test]
    fn each_problem_names_its_key() {
        let cases = [
            (
                "[agent]\nbrokr_host = 'x'\n",
                "unknown key `brokr_host` in [agent]",
            ),
            ("[agent]\n", "[agent] broker_host is required"),
            ("", "[agent] broker_host is required"),
            ("colour = 1\n", "unknown key `colour` at the top level"),
            (
                "[agent]\nbroker_host='x'\n[log]\nlevl='x'\n",
                "unknown key `levl` in [log]",
            ),
            (
                "[agent]\nbroker_host='x'\nbroker_port='80'\n",
                "[agent] broker_port:",
            ),
            (
                "[agent]\nbroker_host='x'\nbroker_port=70000\n",
                "[agent] broker_port:",
            ),
            (
                "[agent]\nbroker_host='x'\nbroker_port=0\n",
                "[agent] broker_port",
            ),
            (
                "[agent]\nbroker_host='x'\ntls_strict='no'\n",
                "[agent] tls_strict:",
            ),
            (
                "[agent]\nbroker_url='http://10.0.0.1:8443'\n",
                "[agent] broker_url: \"http://10.0.0.1:8443\" uses http://",
            ),
            ("[agent]\nbroker_url='ftp://x'\n", "[agent] broker_url:"),
            (
                "[agent]\nbroker_url='https://u:p@x'\n",
                "[agent] broker_url:",
            ),
            (
                "[agent]\nbroker_host='x'\nca_file='/nope.pem'\n",
                "[agent] ca_file: cannot read /nope.pem: No such file or directory",
            ),
            (
                "[agent]\nbroker_host='x'\ndcv_command_timeout=0\n",
                "[agent] dcv_command_timeout: 0 is out of range",
            ),
            (
                "[agent]\nbroker_host='x'\nreconnect_max_delay=99999\n",
                "[agent] reconnect_max_delay:",
            ),
            (
                "[agent]\nbroker_host='x'\nmax_virtual_sessions=-1\n",
                "[agent] max_virtual_sessions:",
            ),
            (
                "[agent]\nbroker_host='x'\nclient_id='c'\n",
                "[agent] client_secret_file is required",
            ),
            (
                "[agent]\nbroker_host='x'\ncert_file='/c.pem'\n",
                "[agent] key_file is required",
            ),
            (
                "[agent]\nbroker_host='x'\nkey_file='/k.pem'\n",
                "[agent] cert_file is required",
            ),
            (
                "[agent]\nbroker_host='x'\ninit_folder='rel'\n",
                "[agent] init_folder:",
            ),
            (
                "[agent]\nbroker_host='x'\ndcv_web_url_path='x'\n",
                "[agent] dcv_web_url_path:",
            ),
            (
                "[agent]\nbroker_host='x'\naws_metadata_endpoint='https://x'\n",
                "[agent] aws_metadata_endpoint:",
            ),
            (
                "[agent]\nbroker_host='x'\n[log]\nlevel='loud'\n",
                "[log] level:",
            ),
            ("[agent\n", "not valid TOML"),
        ];
        for (text, expected) in cases {
            let e = check(text).unwrap_err();
            assert!(e.contains(expected), "{text:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
    }

    #[test]
    fn dcv_only_keys_are_accepted() {
        let c = check(
            "version = '0.1'\n[agent]\nbroker_host='x'\nsoftware_statement_path='/s'\n\
             [log]\nlevel='debug'\ndirectory='/var/log/x'\nrotation='daily'\n",
        )
        .unwrap();
        assert_eq!(c.log_level, "debug");
    }

    #[test]
    fn http_is_allowed_for_loopback_only() {
        for url in ["http://127.0.0.1:1", "http://localhost:2", "http://[::1]:3"] {
            let c = check(&format!("[agent]\nbroker_url='{url}'\n")).unwrap();
            assert_eq!(c.broker_url, url);
        }
        let c =
            check("[agent]\nbroker_url='https://b.example:1/'\nbroker_host='ignored'\n").unwrap();
        assert_eq!(c.broker_url, "https://b.example:1");
        assert_eq!((c.broker_host.as_str(), c.broker_port), ("b.example", 1));
        let c = check("[agent]\nbroker_url='https://b.example'\n").unwrap();
        assert_eq!(c.broker_port, 443);
    }

    #[test]
    fn ca_file_must_be_pem_and_secrets_private() {
        let d = dir("pem");
        let not_pem = d.join("ca.txt");
        fs::write(&not_pem, "hello").unwrap();
        let e = check(&format!(
            "[agent]\nbroker_host='x'\nca_file='{}'\n",
            not_pem.display()
        ))
        .unwrap_err();
        assert!(
            e.contains("[agent] ca_file:") && e.contains("is not PEM"),
            "{e}"
        );

        let secret = d.join("secret");
        fs::write(&secret, "s3cr3t\n").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).unwrap();
        let text = format!(
            "[agent]\nbroker_host='x'\nclient_id='c'\nclient_secret_file='{}'\n",
            secret.display()
        );
        let e = check(&text).unwrap_err();
        assert!(
            e.contains("[agent] client_secret_file:") && e.contains("readable by group"),
            "{e}"
        );
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let c = check(&text).unwrap();
        let (id, s) = c.credentials.client.clone().unwrap();
        assert_eq!((id.as_str(), s.as_str()), ("c", "s3cr3t"));
        assert!(!format!("{c:?}").contains("s3cr3t"));
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn tags_are_read_alphabetically_and_later_files_win() {
        let d = dir("tags");
        fs::write(d.join("b.toml"), "rack = 'b'\nzone = \"z1\"\n").unwrap();
        fs::write(d.join("a.toml"), "rack = 'a'\ngpu = 'yes'\n").unwrap();
        fs::write(d.join("ignored.txt"), "rack = 'no'\n").unwrap();
        let text = format!("[agent]\nbroker_host='x'\ntags_folder='{}'\n", d.display());
        let c = check(&text).unwrap();
        let tags: BTreeMap<_, _> = c.tags.iter().cloned().collect();
        assert_eq!(tags["rack"], "b");
        assert_eq!(tags["gpu"], "yes");
        assert_eq!(tags["zone"], "z1");
        assert_eq!(c.tags.len(), 3);

        fs::write(d.join("c.toml"), "n = 1\n").unwrap();
        let e = check(&text).unwrap_err();
        assert!(
            e.contains("[agent] tags_folder:") && e.contains("must be a string"),
            "{e}"
        );
        fs::write(d.join("c.toml"), "\"dcv:x\" = '1'\n").unwrap();
        let e = check(&text).unwrap_err();
        assert!(e.contains("dcv:"), "{e}");
        fs::write(d.join("c.toml"), "not toml [").unwrap();
        let e = check(&text).unwrap_err();
        assert!(e.contains("not valid TOML"), "{e}");
        fs::remove_dir_all(d).unwrap();
    }
}
