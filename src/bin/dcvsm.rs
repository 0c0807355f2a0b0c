//! `dcvsm`: the command-line client of the broker, shaped like the official
//! DCV Session Manager CLI (same commands, flags and JSON replies) but
//! speaking the broker's own gRPC contract (`dcv_broker::pb`).
//!
//! Replies are printed as the protobuf JSON mapping of the proto (PascalCase
//! `json_name`s, enum names, RFC 3339 timestamps, default values omitted):
//! byte for byte what `grpcurl` prints, because both go through the
//! descriptor set rather than a hand mapping.
//!
//! Settings come from, in order of precedence: flags, environment
//! (`DCV_SM_BROKER_URL`, `DCV_SM_AUTH_SERVER_URL`, `DCV_SM_CLIENT_ID`,
//! `DCV_SM_CLIENT_PASSWORD`), the configuration file (`--conf`, else
//! `$XDG_CONFIG_HOME/dcvsmcli.conf`, else `~/.config/dcvsmcli.conf`), defaults.
//! The client id and password have no flags on purpose: a command line is
//! visible to every user of the host in `ps`.
//!
//! Authentication ([`auth`]): `DCV_SM_OAUTH2_TOKEN` is sent as it is;
//! otherwise a client id and password buy an OAuth 2.0 token from the auth
//! server (the broker's own `/oauth2/token` by default), cached and renewed
//! at 80% of its lifetime. The token goes into `authorization: Bearer` on
//! every call; when the broker refuses a cached token, the cache entry is
//! dropped and the call made once more with a new token. A call the broker
//! refused as UNAUTHENTICATED changed nothing, so repeating it is safe.

// A crate root file looks for its modules beside it; this one keeps them in dcvsm/.
#[path = "dcvsm/auth.rs"]
mod auth;

use std::{
    collections::HashMap,
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use base64::Engine;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use dcv_broker::{
    client::{self, AuthChannel, BrokerClient, ClientError},
    pb::{self, servers_client::ServersClient, sessions_client::SessionsClient},
};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::Value;

use auth::{ClientCredentials, Credentials, Secret, Tokens};

/// The broker URL when neither flag, environment nor configuration names one.
const DEFAULT_BROKER_URL: &str = "http://127.0.0.1:8443";
/// How long a paginated describe runs before a progress line appears.
const PROGRESS_AFTER: Duration = Duration::from_millis(500);

/// Exit codes, documented in `--help` and the README.
mod exit {
    pub const OK: u8 = 0;
    pub const CONFIG: u8 = 1;
    pub const PARTIAL: u8 = 3;
    pub const INTERRUPTED: u8 = 130;
    pub const BAD_PARAMETER: u8 = 252;
    pub const BAD_ENVIRONMENT: u8 = 253;
    pub const BROKER_ERROR: u8 = 254;
    pub const OTHER: u8 = 255;
}

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    success
  1    the configuration file is missing or corrupt
  2    the command line could not be parsed
  3    the call succeeded but UnsuccessfulList is not empty (0 with --compat-exit-codes)
  130  interrupted (Ctrl-C)
  252  a parameter value is invalid (checked before calling the broker)
  253  the environment, configuration or credentials are invalid: an unreadable CA bundle,
       credentials the auth server refuses (invalid_client), a token the broker refuses
       (UNAUTHENTICATED), or a broker that needs credentials and got none
  254  the broker returned an error (a gRPC status, PERMISSION_DENIED when the client lacks
       the scope a command needs), or the auth server failed (5xx)
  255  anything else, e.g. the broker or the auth server is unreachable

Settings precedence: flags > environment > configuration file > defaults.

Authentication (a broker with --auth on, or serving TLS):
  DCV_SM_CLIENT_ID, DCV_SM_CLIENT_PASSWORD  client credentials from `dcv-broker clients
                           register`; else [authentication] client-id, client-password
  DCV_SM_AUTH_SERVER_URL   the token endpoint (--auth-server-url; [authentication]
                           auth-server-url); default BROKER_URL/oauth2/token?grant_type=
                           client_credentials
  DCV_SM_OAUTH2_TOKEN      a token to send as it is (nothing is fetched or cached)
Tokens are cached per auth server and client in $XDG_CACHE_HOME/dcvsm/ (else
~/.cache/dcvsm/), mode 0600, and renewed once 80% of their lifetime has passed. Secrets and
tokens are never printed, not even with --debug.";

/// Command-line client of the dcv-broker session broker.
#[derive(Parser, Debug)]
#[command(name = "dcvsm", version, after_help = EXIT_CODES_HELP)]
struct Cli {
    /// The broker's URL; https:// uses TLS (trusting --ca-bundle, else the system roots).
    /// Default http://127.0.0.1:8443.
    #[arg(long, global = true, env = "DCV_SM_BROKER_URL")]
    broker_url: Option<String>,
    /// Configuration file (INI, sections [output], [security], [authentication], [broker]).
    /// When absent, $XDG_CONFIG_HOME/dcvsmcli.conf then ~/.config/dcvsmcli.conf are read if
    /// they exist.
    #[arg(long, global = true)]
    conf: Option<PathBuf>,
    /// Log the calls (tracing) on stderr.
    #[arg(long, global = true)]
    debug: bool,
    /// Output format: json (the broker's reply, as grpcurl prints it) or table. Default json.
    #[arg(long, global = true, value_enum)]
    output_format: Option<OutputFormat>,
    /// A PEM file of the CA certificates to trust for an https:// broker and auth server.
    #[arg(long, global = true)]
    ca_bundle: Option<PathBuf>,
    /// The OAuth 2.0 token endpoint that client credentials buy tokens from.
    /// Default: the broker's BROKER_URL/oauth2/token?grant_type=client_credentials.
    #[arg(long, global = true, env = "DCV_SM_AUTH_SERVER_URL")]
    auth_server_url: Option<String>,
    /// Skip TLS certificate verification. Refused (exit 253): a client that trusts any
    /// certificate hands its credentials and tokens to whoever answers. Use --ca-bundle
    /// with the broker's CA instead (`dcv-broker tls init` writes one).
    #[arg(long, global = true)]
    no_verify_ssl: bool,
    /// Exit 0 even when some items are in UnsuccessfulList, like the official CLI.
    #[arg(long, global = true)]
    compat_exit_codes: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Json,
    Table,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SessionTypeArg {
    #[value(name = "CONSOLE", alias = "console")]
    Console,
    #[value(name = "VIRTUAL", alias = "virtual")]
    Virtual,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Close DCV servers: no new sessions are placed on them.
    CloseServers {
        /// Comma-separated server ids.
        #[arg(long, required = true)]
        server_ids: String,
        /// Close even servers that have running sessions.
        #[arg(long)]
        force: bool,
        /// Why the servers are closed (shown by describe-servers in Holds).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Open closed DCV servers again.
    OpenServers {
        /// Comma-separated server ids.
        #[arg(long, required = true)]
        server_ids: String,
    },
    /// Describe DCV servers; follows every page unless --next-token or --no-paginate.
    DescribeServers {
        /// Comma-separated server ids (all servers when absent).
        #[arg(long)]
        server_ids: Option<String>,
        /// Start from this page token (prints only that page).
        #[arg(long)]
        next_token: Option<String>,
        /// Items per page, 1 to 1000.
        #[arg(long)]
        max_results: Option<i32>,
        /// Print one page, with its NextToken.
        #[arg(long)]
        no_paginate: bool,
        /// Filter as KEY=VALUE (repeatable), e.g. tag:team=render.
        #[arg(long = "filter", value_name = "KEY=VALUE")]
        filters: Vec<String>,
    },
    /// Create a session.
    CreateSession {
        /// The session's name.
        #[arg(long, required = true)]
        name: String,
        /// The user who owns the session.
        #[arg(long, required = true)]
        owner: String,
        /// CONSOLE or VIRTUAL.
        #[arg(long = "type", required = true, value_enum)]
        session_type: SessionTypeArg,
        /// Path, on the DCV server, of a script run when a virtual session starts.
        #[arg(long)]
        init_file_path: Option<String>,
        /// Path, on the DCV server, of a file run when the session starts.
        #[arg(long)]
        autorun_file: Option<String>,
        /// Comma-separated arguments of --autorun-file.
        #[arg(long)]
        autorun_file_arguments: Option<String>,
        /// Maximum concurrent clients, 1 to 100.
        #[arg(long)]
        max_concurrent_clients: Option<i32>,
        /// Enable DCV-GL (virtual sessions on Linux).
        #[arg(long)]
        dcv_gl_enabled: bool,
        /// A local permissions file; it is read and sent base64-encoded.
        #[arg(long)]
        permissions_file: Option<PathBuf>,
        /// Placement requirements, e.g. "server:Host.Os.Family = 'linux'".
        #[arg(long)]
        requirements: Option<String>,
        /// Storage root of the session on the DCV server.
        #[arg(long)]
        storage_root: Option<String>,
        /// Queue the request when no server is available.
        #[arg(long)]
        enqueue_request: bool,
        /// Do not retry the creation on another server after a failure.
        #[arg(long)]
        disable_retry_on_failure: bool,
    },
    /// Describe sessions; follows every page unless --next-token or --no-paginate.
    DescribeSessions {
        /// Comma-separated session ids (all sessions when absent).
        #[arg(long)]
        session_ids: Option<String>,
        /// Start from this page token (prints only that page).
        #[arg(long)]
        next_token: Option<String>,
        /// Only the sessions of this owner.
        #[arg(long)]
        owner: Option<String>,
        /// Items per page, 1 to 1000.
        #[arg(long)]
        max_results: Option<i32>,
        /// Print one page, with its NextToken.
        #[arg(long)]
        no_paginate: bool,
    },
    /// Delete a session.
    DeleteSession {
        /// The session's id.
        #[arg(long, required = true)]
        session_id: String,
        /// The session's owner.
        #[arg(long, required = true)]
        owner: String,
        /// Delete even when the DCV server does not answer.
        #[arg(long)]
        force: bool,
    },
    /// Get the data a DCV client needs to connect to a session.
    GetSessionConnectionData {
        /// The session's id.
        #[arg(long, required = true)]
        session_id: String,
        /// The user who connects.
        #[arg(long, required = true)]
        user: String,
    },
    /// Replace a session's permissions.
    UpdateSessionPermissions {
        /// The session's id.
        #[arg(long, required = true)]
        session_id: String,
        /// The session's owner.
        #[arg(long, required = true)]
        owner: String,
        /// A local permissions file; it is read and sent base64-encoded.
        #[arg(long, required = true)]
        permission_file: PathBuf,
    },
    /// Print a shell completion script.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// A failure, carrying its exit code and its one line for stderr.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
    /// The broker's gRPC status code, when the failure is one.
    status: Option<tonic::Code>,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
        status: None,
    }
}

/// The settings after flags, environment and configuration are merged.
struct Settings {
    broker_url: String,
    output: OutputFormat,
    ca_bundle: Option<PathBuf>,
    no_verify_ssl: bool,
    debug: bool,
    credentials: Credentials,
}

type Servers = ServersClient<AuthChannel>;
type Sessions = SessionsClient<AuthChannel>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completion { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "dcvsm", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dcvsm: {e}");
            return ExitCode::from(exit::OTHER);
        }
    };
    let code = runtime.block_on(async {
        tokio::select! {
            result = run(cli) => match result {
                Ok(code) => code,
                Err(f) => {
                    eprintln!("dcvsm: {}", f.message);
                    f.code
                }
            },
            _ = tokio::signal::ctrl_c() => {
                eprintln!("dcvsm: interrupted");
                exit::INTERRUPTED
            }
        }
    });
    // Not waiting for a token request still running on the blocking pool
    // after Ctrl-C: its thread dies with the process.
    runtime.shutdown_background();
    ExitCode::from(code)
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    let settings = settings(&cli)?;
    if settings.debug {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_env_filter("debug,h2=info,hyper=info,tower=info")
            .init();
    }
    tracing::debug!(url = %settings.broker_url, "connecting");
    let broker = connect(&settings).await?;
    let tokens = Tokens::new(
        settings.credentials.clone(),
        settings.ca_bundle.clone(),
        auth::Cache::from_env(),
    );
    let mut token = tokens.get().await?;
    let mut renewed = false;
    let reply = loop {
        let broker = broker
            .with_token(token.as_ref().map(|t| t.value.expose()))
            .map_err(client_failure)?;
        match execute(&cli.command, broker.servers(), broker.sessions()).await {
            Err(f) if f.status == Some(tonic::Code::Unauthenticated) => {
                if token.as_ref().is_some_and(|t| t.cached) && !renewed {
                    tracing::debug!("the broker refused the cached token; buying a new one");
                    renewed = true;
                    token = tokens.renew().await?;
                    continue;
                }
                return Err(refused(tokens.credentials(), f));
            }
            other => break other?,
        }
    };

    let text = match settings.output {
        OutputFormat::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(&reply).expect("a Value always serializes")
        ),
        OutputFormat::Table => table(&reply),
    };
    // A reader that stopped early (`| head`) is not an error worth a panic.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(fail(exit::OTHER, format!("writing the reply: {e}")));
        }
        _ => {}
    }
    let partial = reply
        .get("UnsuccessfulList")
        .and_then(Value::as_array)
        .is_some_and(|l| !l.is_empty());
    Ok(if partial && !cli.compat_exit_codes {
        exit::PARTIAL
    } else {
        exit::OK
    })
}

/// An UNAUTHENTICATED from the broker, said in terms of the credentials
/// that were sent (exit 253).
fn refused(credentials: &Credentials, f: Failure) -> Failure {
    let why = f.message;
    let message = match credentials {
        Credentials::None => format!(
            "the broker requires authentication ({why}); set DCV_SM_CLIENT_ID and \
             DCV_SM_CLIENT_PASSWORD (or client-id and client-password in [authentication] \
             of dcvsmcli.conf), or DCV_SM_OAUTH2_TOKEN"
        ),
        Credentials::Token(_) => format!("the broker refused DCV_SM_OAUTH2_TOKEN ({why})"),
        Credentials::Client(c) => format!(
            "the broker refused the token of client {:?} ({why})",
            c.client_id
        ),
    };
    fail(exit::BAD_ENVIRONMENT, message)
}

/// Runs one command: the broker's reply as JSON. Called again, whole, when
/// the broker refused a cached token.
async fn execute(
    command: &Command,
    mut servers: Servers,
    mut sessions: Sessions,
) -> Result<Value, Failure> {
    Ok(match command {
        Command::CloseServers {
            server_ids,
            force,
            reason,
        } => {
            let servers_data = split_ids("--server-ids", server_ids)?
                .into_iter()
                .map(|server_id| pb::CloseServerRequestData {
                    server_id,
                    force: force.then_some(true),
                    reason: reason.clone().unwrap_or_default(),
                })
                .collect();
            let r = servers
                .close_servers(pb::CloseServersRequest {
                    servers: servers_data,
                })
                .await
                .map_err(status_failure)?;
            to_json("CloseServersResponse", &r.into_inner())?
        }
        Command::OpenServers { server_ids } => {
            let servers_data = split_ids("--server-ids", server_ids)?
                .into_iter()
                .map(|server_id| pb::OpenServerRequestData { server_id })
                .collect();
            let r = servers
                .open_servers(pb::OpenServersRequest {
                    servers: servers_data,
                })
                .await
                .map_err(status_failure)?;
            to_json("OpenServersResponse", &r.into_inner())?
        }
        Command::DescribeServers {
            server_ids,
            next_token,
            max_results,
            no_paginate,
            filters,
        } => {
            let server_ids = match server_ids {
                Some(ids) => split_ids("--server-ids", ids)?,
                None => Vec::new(),
            };
            let max_results = max_results.map(check_max_results).transpose()?;
            let filters = filters
                .iter()
                .map(|f| parse_filter(f))
                .collect::<Result<Vec<_>, _>>()?;
            let single = *no_paginate || next_token.is_some();
            let mut request = pb::DescribeServersRequest {
                server_ids,
                next_token: next_token.clone().unwrap_or_default(),
                max_results,
                filters,
            };
            paginate("Servers", single, |token| {
                request.next_token = token.unwrap_or_else(|| request.next_token.clone());
                let request = request.clone();
                let mut servers = servers.clone();
                async move {
                    let r = servers.describe_servers(request).await;
                    let r = r.map_err(status_failure)?.into_inner();
                    Ok((to_json("DescribeServersResponse", &r)?, r.next_token))
                }
            })
            .await?
        }
        Command::CreateSession {
            name,
            owner,
            session_type,
            init_file_path,
            autorun_file,
            autorun_file_arguments,
            max_concurrent_clients,
            dcv_gl_enabled,
            permissions_file,
            requirements,
            storage_root,
            enqueue_request,
            disable_retry_on_failure,
        } => {
            if let Some(n) = *max_concurrent_clients
                && !(1..=100).contains(&n)
            {
                return Err(fail(
                    exit::BAD_PARAMETER,
                    format!("--max-concurrent-clients must be between 1 and 100, got {n}"),
                ));
            }
            let permissions_file = match permissions_file {
                Some(path) => read_base64("--permissions-file", path)?,
                None => String::new(),
            };
            let data = pb::CreateSessionRequestData {
                name: name.clone(),
                owner: owner.clone(),
                r#type: match session_type {
                    SessionTypeArg::Console => pb::SessionType::Console,
                    SessionTypeArg::Virtual => pb::SessionType::Virtual,
                } as i32,
                init_file: init_file_path.clone().unwrap_or_default(),
                max_concurrent_clients: *max_concurrent_clients,
                dcv_gl_enabled: *dcv_gl_enabled,
                permissions_file,
                enqueue_request: *enqueue_request,
                autorun_file: autorun_file.clone().unwrap_or_default(),
                autorun_file_arguments: autorun_file_arguments
                    .as_ref()
                    .map(|a| a.split(',').map(str::to_owned).collect())
                    .unwrap_or_default(),
                disable_retry_on_failure: *disable_retry_on_failure,
                requirements: requirements.clone().unwrap_or_default(),
                storage_root: storage_root.clone().unwrap_or_default(),
            };
            let r = sessions
                .create_sessions(pb::CreateSessionsRequest {
                    sessions: vec![data],
                })
                .await
                .map_err(status_failure)?;
            to_json("CreateSessionsResponse", &r.into_inner())?
        }
        Command::DescribeSessions {
            session_ids,
            next_token,
            owner,
            max_results,
            no_paginate,
        } => {
            let session_ids = match session_ids {
                Some(ids) => split_ids("--session-ids", ids)?,
                None => Vec::new(),
            };
            let max_results = max_results.map(check_max_results).transpose()?;
            let filters = owner
                .clone()
                .map(|value| {
                    vec![pb::KeyValuePair {
                        key: "owner".into(),
                        value,
                    }]
                })
                .unwrap_or_default();
            let single = *no_paginate || next_token.is_some();
            let mut request = pb::DescribeSessionsRequest {
                session_ids,
                filters,
                max_results,
                next_token: next_token.clone().unwrap_or_default(),
            };
            paginate("Sessions", single, |token| {
                request.next_token = token.unwrap_or_else(|| request.next_token.clone());
                let request = request.clone();
                let mut sessions = sessions.clone();
                async move {
                    let r = sessions.describe_sessions(request).await;
                    let r = r.map_err(status_failure)?.into_inner();
                    Ok((to_json("DescribeSessionsResponse", &r)?, r.next_token))
                }
            })
            .await?
        }
        Command::DeleteSession {
            session_id,
            owner,
            force,
        } => {
            let r = sessions
                .delete_sessions(pb::DeleteSessionsRequest {
                    sessions: vec![pb::DeleteSessionRequestData {
                        session_id: session_id.clone(),
                        owner: owner.clone(),
                        force: force.then_some(true),
                    }],
                })
                .await
                .map_err(status_failure)?;
            to_json("DeleteSessionsResponse", &r.into_inner())?
        }
        Command::GetSessionConnectionData { session_id, user } => {
            let r = sessions
                .get_session_connection_data(pb::GetSessionConnectionDataRequest {
                    session_id: session_id.clone(),
                    user: user.clone(),
                })
                .await
                .map_err(status_failure)?;
            to_json("GetSessionConnectionDataResponse", &r.into_inner())?
        }
        Command::UpdateSessionPermissions {
            session_id,
            owner,
            permission_file,
        } => {
            let permissions_file = read_base64("--permission-file", permission_file)?;
            let r = sessions
                .update_session_permissions(pb::UpdateSessionPermissionsRequest {
                    sessions: vec![pb::UpdateSessionPermissionsRequestData {
                        session_id: session_id.clone(),
                        owner: owner.clone(),
                        permissions_file,
                    }],
                })
                .await
                .map_err(status_failure)?;
            to_json("UpdateSessionPermissionsResponse", &r.into_inner())?
        }
        Command::Completion { .. } => unreachable!("handled before connecting"),
    })
}

/// Merges flags, environment, the configuration file and defaults.
fn settings(cli: &Cli) -> Result<Settings, Failure> {
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

async fn connect(settings: &Settings) -> Result<BrokerClient, Failure> {
    // Refused whatever the URL: accepted silently for http://, the same
    // command line would turn insecure the day the URL becomes https://.
    if settings.no_verify_ssl {
        return Err(fail(
            exit::BAD_ENVIRONMENT,
            "--no-verify-ssl is not supported: a client that trusts any certificate hands its \
             credentials to whoever answers; pass the broker's CA with --ca-bundle",
        ));
    }
    let url = &settings.broker_url;
    let mut builder = client::builder(url.clone());
    // The bundle only matters to an https:// broker; reading it for an
    // http:// one would fail a command over a file it never needed.
    if let (true, Some(path)) = (url.starts_with("https://"), &settings.ca_bundle) {
        let pem = std::fs::read(path).map_err(|e| {
            fail(
                exit::BAD_ENVIRONMENT,
                format!("cannot read the CA bundle {}: {e}", path.display()),
            )
        })?;
        builder = builder.ca_pem(pem);
    }
    builder.connect().await.map_err(client_failure)
}

/// A [`ClientError`] as dcvsm's exit code and one line.
fn client_failure(e: ClientError) -> Failure {
    match e {
        ClientError::InvalidUrl { .. } => fail(exit::BAD_PARAMETER, e.to_string()),
        ClientError::Tls(_) | ClientError::InvalidToken => {
            fail(exit::BAD_ENVIRONMENT, e.to_string())
        }
        ClientError::Connect { url, source } => fail(
            exit::OTHER,
            format!("cannot reach the broker at {url}: {}", root_cause(&source)),
        ),
    }
}

/// The innermost cause of a transport error, in a few words.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        if let Some(io) = next.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
                _ => io.to_string(),
            };
        }
        cause = next;
    }
    cause.to_string()
}

/// A status from the broker is 254 (UNAUTHENTICATED: 253, credentials
/// refused); one tonic made up from a transport
/// failure (it carries the error as its source) is 255, like an unreachable
/// broker.
fn status_failure(status: tonic::Status) -> Failure {
    if let Some(source) = std::error::Error::source(&status) {
        return fail(
            exit::OTHER,
            format!(
                "the connection to the broker failed: {}",
                root_cause(source)
            ),
        );
    }
    Failure {
        code: if status.code() == tonic::Code::Unauthenticated {
            exit::BAD_ENVIRONMENT
        } else {
            exit::BROKER_ERROR
        },
        message: format!(
            "the broker returned {:?}: {}",
            status.code(),
            status.message()
        ),
        status: Some(status.code()),
    }
}

fn split_ids(flag: &str, ids: &str) -> Result<Vec<String>, Failure> {
    let ids: Vec<String> = ids
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if ids.is_empty() {
        return Err(fail(exit::BAD_PARAMETER, format!("{flag} names no id")));
    }
    Ok(ids)
}

fn check_max_results(n: i32) -> Result<i32, Failure> {
    if (1..=1000).contains(&n) {
        Ok(n)
    } else {
        Err(fail(
            exit::BAD_PARAMETER,
            format!("--max-results must be between 1 and 1000, got {n}"),
        ))
    }
}

fn parse_filter(f: &str) -> Result<pb::KeyValuePair, Failure> {
    match f.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok(pb::KeyValuePair {
            key: key.to_owned(),
            value: value.to_owned(),
        }),
        _ => Err(fail(
            exit::BAD_PARAMETER,
            format!("--filter expects KEY=VALUE, got {f:?}"),
        )),
    }
}

fn read_base64(flag: &str, path: &Path) -> Result<String, Failure> {
    let bytes = std::fs::read(path).map_err(|e| {
        fail(
            exit::BAD_PARAMETER,
            format!("{flag}: cannot read {}: {e}", path.display()),
        )
    })?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Calls `page` until the last page (or once when `single`), merging the
/// `items` arrays into the first reply and dropping its NextToken.
async fn paginate<F, Fut>(items: &str, single: bool, mut page: F) -> Result<Value, Failure>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<(Value, String), Failure>>,
{
    let (mut merged, mut token) = page(None).await?;
    if single {
        return Ok(merged);
    }
    let started = Instant::now();
    let show_progress = std::io::stderr().is_terminal();
    let mut shown = false;
    while !token.is_empty() {
        let (next, next_token) = page(Some(token)).await?;
        token = next_token;
        if let Some(Value::Array(more)) = next.get(items).cloned() {
            match merged.get_mut(items) {
                Some(Value::Array(all)) => all.extend(more),
                _ => {
                    merged[items] = Value::Array(more);
                }
            }
        }
        if show_progress && started.elapsed() > PROGRESS_AFTER {
            let n = merged
                .get(items)
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            eprint!("\rdcvsm: {n} {} so far…", items.to_lowercase());
            shown = true;
        }
    }
    if shown {
        eprint!("\r\x1b[K");
    }
    if let Some(obj) = merged.as_object_mut() {
        obj.remove("NextToken");
    }
    Ok(merged)
}

/// The protobuf JSON mapping of a reply, as grpcurl prints it: through the
/// descriptor set, so the names are the proto's `json_name`s.
fn to_json<M: Message>(name: &str, message: &M) -> Result<Value, Failure> {
    static POOL: std::sync::OnceLock<DescriptorPool> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| {
        DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET).expect("the built-in descriptor set")
    });
    let full_name = format!("dcv.sessionmanager.v1.{name}");
    let descriptor = pool
        .get_message_by_name(&full_name)
        .ok_or_else(|| fail(exit::OTHER, format!("no descriptor for {full_name}")))?;
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .map_err(|e| fail(exit::OTHER, format!("re-decoding the reply: {e}")))?;
    // Through text, not `to_value`: a float field is an f32, printed by the
    // serializer as its shortest f32 form (2.83, as grpcurl prints it);
    // `to_value` would widen it to an f64 first (2.8299999237060547).
    let text =
        serde_json::to_string(&dynamic).map_err(|e| fail(exit::OTHER, format!("JSON: {e}")))?;
    serde_json::from_str(&text).map_err(|e| fail(exit::OTHER, format!("JSON: {e}")))
}

/// A reply for people: its scalars as `Key: value` lines, then one aligned
/// table per list (or nested object), a column per field. Nested objects
/// are flattened one level as `Parent.Child`; lists of objects (a server's
/// Holds, Tags and Endpoints) and a server's Host are summed up in one
/// cell each, so that what the JSON says about a server fits on its row.
/// comfy-table measures the cells, wide characters included (a reason may
/// be in any script).
fn table(reply: &Value) -> String {
    let mut out = String::new();
    let Some(obj) = reply.as_object() else {
        return format!("{reply}\n");
    };
    for (key, value) in obj {
        if let Some(s) = scalar(value) {
            out.push_str(&format!("{key}: {s}\n"));
        }
    }
    // Proto3 JSON omits empty lists, so a reply with none says so.
    if !obj.values().any(|v| v.is_array() || v.is_object()) {
        out.push_str("\n(no items)\n");
    }
    for (key, value) in obj {
        let rows: Vec<&Value> = match value {
            Value::Array(items) => items.iter().collect(),
            Value::Object(_) => vec![value],
            _ => continue,
        };
        out.push_str(&format!("\n{key} ({})\n", rows.len()));
        let flat: Vec<Vec<(String, String)>> = rows.iter().map(|r| flatten(r)).collect();
        let mut columns: Vec<String> = Vec::new();
        for row in &flat {
            for (c, _) in row {
                if !columns.contains(c) {
                    columns.push(c.clone());
                }
            }
        }
        let mut grid = comfy_table::Table::new();
        grid.load_style(comfy_table::presets::NOTHING)
            .set_header(columns.clone());
        for row in &flat {
            grid.add_row(columns.iter().map(|c| {
                row.iter()
                    .find(|(k, _)| k == c)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            }));
        }
        for column in grid.column_iter_mut() {
            column.set_padding((0, 2));
        }
        out.push_str(&grid.trim_fmt());
        out.push('\n');
    }
    out
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A field of `object` as text ("" if absent or not a scalar).
fn field(object: &serde_json::Map<String, Value>, key: &str) -> String {
    object.get(key).and_then(scalar).unwrap_or_default()
}

/// One element of a list of objects in a cell: a hold as "KIND by ACTOR at
/// TIME: REASON", a tag as "KEY=VALUE", an endpoint as "IP:PORT PROTOCOL
/// PATH", anything else as its "Key=value" scalars.
fn summary(item: &Value) -> String {
    let Some(o) = item.as_object() else {
        return scalar(item).unwrap_or_else(|| item.to_string());
    };
    if o.contains_key("Actor") || o.contains_key("CreationTime") {
        let mut text = format!(
            "{} by {} at {}",
            field(o, "Kind"),
            field(o, "Actor"),
            field(o, "CreationTime")
        );
        let reason = field(o, "Reason");
        if !reason.is_empty() {
            text.push_str(&format!(": {reason}"));
        }
        return text;
    }
    if o.contains_key("Key") && o.len() <= 2 {
        return format!("{}={}", field(o, "Key"), field(o, "Value"));
    }
    if o.contains_key("IpAddress") && o.contains_key("Port") {
        let mut text = format!(
            "{}:{} {}",
            field(o, "IpAddress"),
            field(o, "Port"),
            field(o, "Protocol")
        );
        let path = field(o, "WebUrlPath");
        if !path.is_empty() {
            text.push_str(&format!(" {path}"));
        }
        return text;
    }
    o.iter()
        .filter_map(|(k, v)| scalar(v).map(|v| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A server's Host in a few words: OS, CPUs, memory, GPUs.
fn host_summary(host: &serde_json::Map<String, Value>) -> String {
    let part = |key: &str| host.get(key).and_then(Value::as_object);
    let mut parts = Vec::new();
    if let Some(os) = part("Os") {
        let name = [field(os, "Family"), field(os, "Name"), field(os, "Version")]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        if !name.is_empty() {
            parts.push(name);
        }
    }
    if let Some(cpu) = part("CpuInfo") {
        let cpus = field(cpu, "NumberOfCpus");
        if !cpus.is_empty() {
            parts.push(
                format!("{cpus} CPU {}", field(cpu, "Architecture"))
                    .trim_end()
                    .to_owned(),
            );
        }
    }
    if let Some(memory) = part("Memory")
        && let Ok(bytes) = field(memory, "TotalBytes").parse::<u64>()
    {
        parts.push(format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30)));
    }
    if let Some(Value::Array(gpus)) = host.get("Gpus") {
        parts.extend(
            gpus.iter()
                .filter_map(Value::as_object)
                .map(|g| field(g, "ModelName"))
                .filter(|m| !m.is_empty()),
        );
    }
    parts.join(", ")
}

fn flatten(row: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Some(obj) = row.as_object() else {
        return vec![("Value".into(), row.to_string())];
    };
    for (key, value) in obj {
        if let Some(s) = scalar(value) {
            out.push((key.clone(), s));
        } else if let (Value::Object(inner), "Host") = (value, key.as_str()) {
            out.push((key.clone(), host_summary(inner)));
        } else if let Value::Object(inner) = value {
            for (k, v) in inner {
                if let Some(s) = scalar(v) {
                    out.push((format!("{key}.{k}"), s));
                }
            }
        } else if let Value::Array(items) = value {
            let parts: Vec<String> = items
                .iter()
                .map(summary)
                .filter(|s| !s.is_empty())
                .collect();
            if !parts.is_empty() {
                let separator = if items.iter().all(Value::is_object) {
                    "; "
                } else {
                    ","
                };
                out.push((key.clone(), parts.join(separator)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Columns line up on screen when a cell holds wide characters (CJK
    /// takes two columns a character): a server id or a hold's reason may.
    #[test]
    fn table_columns_line_up_with_wide_characters() {
        let reply = serde_json::json!({
            "Servers": [
                {"Id": "東京-1", "Availability": "AVAILABLE"},
                {"Id": "oslo-1", "Availability": "UNAVAILABLE"},
            ]
        });
        let text = table(&reply);
        // The display width of the text before the Availability cell.
        let width = |line: &str| -> usize {
            let at = line
                .find("AVAILABLE")
                .map(|i| if line[..i].ends_with("UN") { i - 2 } else { i });
            line[..at.unwrap_or_else(|| panic!("{text}"))]
                .chars()
                .map(|c| if c >= '\u{1100}' { 2 } else { 1 })
                .sum()
        };
        let rows: Vec<&str> = text.lines().filter(|l| l.contains("-1")).collect();
        assert_eq!(rows.len(), 2, "{text}");
        assert_eq!(width(rows[0]), width(rows[1]), "{text}");
    }

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
