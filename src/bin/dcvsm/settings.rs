//! dcvsm's settings: flags, then environment, then the configuration file,
//! then defaults; and the credentials, which have no flags (a command line
//! is visible to every user of the host in `ps`).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use crate::{
    Failure,
    auth::{self, ClientCredentials, Credentials, Secret},
    cli::{Cli, OutputFormat},
    exit, fail,
};

/// The broker URL when neither flag, environment nor configuration names one.
const DEFAULT_BROKER_URL: &str = "http://127.0.0.1:8443";

/// The settings after flags, environment and configuration are merged.
pub struct Settings {
    pub broker_url: String,
    pub output: OutputFormat,
    pub ca_bundle: Option<PathBuf>,
    pub no_verify_ssl: bool,
    pub debug: bool,
    pub credentials: Credentials,
}

/// Merges flags, environment, the configuration file and defaults.
pub fn settings(cli: &Cli) -> Result<Settings, Failure> {
    let conf = match &cli.conf {
        Some(path) => Some(read_conf(path)?),
        None => default_conf_path()
            .filter(|p| p.exists())
            .map(|p| read_conf(&p))
            .transpose()?,
    }
    .unwrap_or_default();
    let get = |section: &str, key: &str| conf.get(&(section.to_owned(), key.to_owned()));
    let truthy = |v: Option<&String>| v.is_some_and(|v| matches!(v.as_str(), "true" | "yes" | "1"));
    let output = match cli.output_format {
        Some(f) => f,
        None => match get("output", "output-format").map(String::as_str) {
            None | Some("json") => OutputFormat::Json,
            Some("table") => OutputFormat::Table,
            Some(other) => {
                return Err(fail(
                    exit::CONFIG,
                    format!(
                        "configuration: [output] output-format must be json or table, got {other:?}"
                    ),
                ));
            }
        },
    };
    let broker_url = cli
        .broker_url
        .clone()
        .or_else(|| get("broker", "url").cloned())
        .unwrap_or_else(|| DEFAULT_BROKER_URL.to_owned());
    let credentials = credentials(cli, &broker_url, &conf)?;
    Ok(Settings {
        broker_url,
        output,
        ca_bundle: cli
            .ca_bundle
            .clone()
            .or_else(|| get("security", "ca-bundle").map(PathBuf::from)),
        no_verify_ssl: cli.no_verify_ssl || truthy(get("security", "no-verify-ssl")),
        debug: cli.debug || truthy(get("output", "debug")),
        credentials,
    })
}

/// A setting and where it came from (named in error messages).
type Sourced = Option<(String, &'static str)>;

/// The credentials, each by its own precedence: environment over the
/// configuration file (`--auth-server-url` first for the URL). A token in
/// DCV_SM_OAUTH2_TOKEN wins over a client id and password.
fn credentials(cli: &Cli, broker_url: &str, conf: &Conf) -> Result<Credentials, Failure> {
    let env = |name: &'static str| -> Sourced {
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| (v, name))
    };
    let file = |key: &str, source: &'static str| -> Sourced {
        conf.get(&("authentication".to_owned(), key.to_owned()))
            .filter(|v| !v.is_empty())
            .map(|v| (v.clone(), source))
    };
    if let Some((token, _)) = env("DCV_SM_OAUTH2_TOKEN") {
        return Ok(Credentials::Token(Secret::new(token)));
    }
    let id = env("DCV_SM_CLIENT_ID").or_else(|| file("client-id", "[authentication] client-id"));
    let password = env("DCV_SM_CLIENT_PASSWORD")
        .or_else(|| file("client-password", "[authentication] client-password"));
    let (id, password) = match (id, password) {
        (None, None) => return Ok(Credentials::None),
        (Some(id), Some(password)) => (id, password),
        (Some((_, source)), None) => {
            return Err(fail(
                exit::BAD_ENVIRONMENT,
                format!(
                    "a client id is set ({source}) but no password: set DCV_SM_CLIENT_PASSWORD \
                     or [authentication] client-password"
                ),
            ));
        }
        (None, Some((_, source))) => {
            return Err(fail(
                exit::BAD_ENVIRONMENT,
                format!(
                    "a client password is set ({source}) but no client id: set \
                     DCV_SM_CLIENT_ID or [authentication] client-id"
                ),
            ));
        }
    };
    // --auth-server-url has DCV_SM_AUTH_SERVER_URL as its clap fallback.
    let auth_url = cli
        .auth_server_url
        .clone()
        .filter(|u| !u.is_empty())
        .or_else(|| file("auth-server-url", "").map(|(u, _)| u))
        .unwrap_or_else(|| {
            format!(
                "{}{}",
                broker_url.trim_end_matches('/'),
                auth::TOKEN_PATH_AND_QUERY
            )
        });
    auth::check_auth_url(&auth_url)?;
    Ok(Credentials::Client(ClientCredentials {
        auth_url,
        client_id: id.0,
        id_source: id.1,
        password: Secret::new(password.0),
        password_source: password.1,
    }))
}

fn default_conf_path() -> Option<PathBuf> {
    match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => Some(PathBuf::from(dir).join("dcvsmcli.conf")),
        None => std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".config").join("dcvsmcli.conf")),
    }
}

/// A configuration file: (section, key) -> value.
type Conf = HashMap<(String, String), String>;

// The configuration file is read by hand, not by a crate. The official CLI
// reads it with Python's configparser; the two INI crates that come closest
// were weighed against it (November 2026) and both break something dcvsm
// relies on:
// - `configparser` 3.3 (the nearest: `=` and `:`, case-insensitive keys,
//   opt-in continuation lines and [DEFAULT] fallback, no interpolation)
//   accepts what configparser refuses: a line without a delimiter becomes
//   a key with no value and keys before any header go to a "default"
//   section, so a corrupt file would no longer be exit 1. Its inline
//   comments cut at any `#` or `;`, even inside a value with no space
//   before it (`client-password = pa;ss` would lose `;ss`), or are off
//   altogether; it also lowercases section names, which Python keeps.
// - `rust-ini` 0.21 expands backslash escapes by default (Windows paths
//   and secrets change), makes case-insensitivity and inline comments
//   compile-time features, and also takes keys outside any section.
// What this reader does, and how it differs from Python's defaults: `key =
// value` only (Python also takes `key: value`); keys are case-sensitive
// (Python lowercases them); whole-line `#`/`;` comments as Python, plus
// inline comments after whitespace (Python has none by default); no
// [DEFAULT] fallback, continuation lines or `%` interpolation (Python has
// all three); a line that is not a header, comment or `key = value`, or a
// key before any header, is an error, as in Python. dcvsm's settings are
// single-line URLs, paths, ids and secrets, so none of the missing parts is
// needed, and a file written for the official CLI with those keys reads
// the same.

/// Reads an INI file into (section, key) -> value. `#` and `;` start
/// comments, at the start of a line or after whitespace.
fn read_conf(path: &Path) -> Result<Conf, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail(exit::CONFIG, format!("cannot read {}: {e}", path.display())))?;
    parse_ini(&text)
        .map_err(|(line, what)| fail(exit::CONFIG, format!("{}:{line}: {what}", path.display())))
}

fn parse_ini(text: &str) -> Result<Conf, (usize, &'static str)> {
    let mut map = HashMap::new();
    let mut section: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[') {
            let name = name
                .strip_suffix(']')
                .ok_or((i + 1, "unclosed section header"))?;
            section = Some(name.trim().to_owned());
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or((i + 1, "expected key = value"))?;
        let section = section.clone().ok_or((i + 1, "key outside of a section"))?;
        // An inline comment starts at a `#` or `;` after whitespace.
        let value = [" #", "\t#", " ;", "\t;"]
            .iter()
            .filter_map(|marker| value.find(marker))
            .min()
            .map_or(value, |end| &value[..end]);
        map.insert((section, key.trim().to_owned()), value.trim().to_owned());
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ini_sections_keys_and_comments() {
        let m = parse_ini(
            "# c\n[broker]\nurl = http://x:1 # the broker\n; c\n[output]\noutput-format=table\n",
        )
        .unwrap();
        assert_eq!(m[&("broker".into(), "url".into())], "http://x:1");
        assert_eq!(m[&("output".into(), "output-format".into())], "table");
        assert_eq!(parse_ini("url = x").unwrap_err().0, 1);
        assert_eq!(parse_ini("[a\n").unwrap_err().1, "unclosed section header");
        assert!(parse_ini("[a]\nnonsense\n").is_err());
    }
}
