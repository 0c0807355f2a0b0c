//! dcvsm's command line (clap): the global flags, the commands of the
//! official DCV Session Manager CLI with their flags, and `--help`'s text on
//! exit codes and settings.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    success
  1    the configuration file is missing or corrupt
  2    the command line could not be parsed
  3    the call succeeded but UnsuccessfulList is not empty (0 with --compat-exit-codes)
  4    drain-servers: the drain's deadline passed with sessions left
  5    drain-servers: the drain ended before its sessions did (its holds were opened)
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
pub struct Cli {
    /// The broker's URL; https:// uses TLS (trusting --ca-bundle, else the system roots).
    /// Default http://127.0.0.1:8443.
    #[arg(long, global = true, env = "DCV_SM_BROKER_URL")]
    pub broker_url: Option<String>,
    /// Configuration file (INI, sections [output], [security], [authentication], [broker]).
    /// When absent, $XDG_CONFIG_HOME/dcvsmcli.conf then ~/.config/dcvsmcli.conf are read if
    /// they exist.
    #[arg(long, global = true)]
    pub conf: Option<PathBuf>,
    /// Log the calls (tracing) on stderr.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Output format: json (the broker's reply, as grpcurl prints it) or table. Default json.
    #[arg(long, global = true, value_enum)]
    pub output_format: Option<OutputFormat>,
    /// A PEM file of the CA certificates to trust for an https:// broker and auth server.
    #[arg(long, global = true)]
    pub ca_bundle: Option<PathBuf>,
    /// The OAuth 2.0 token endpoint that client credentials buy tokens from.
    /// Default: the broker's BROKER_URL/oauth2/token?grant_type=client_credentials.
    #[arg(long, global = true, env = "DCV_SM_AUTH_SERVER_URL")]
    pub auth_server_url: Option<String>,
    /// Skip TLS certificate verification. Refused (exit 253): a client that trusts any
    /// certificate hands its credentials and tokens to whoever answers. Use --ca-bundle
    /// with the broker's CA instead (`dcv-broker tls init` writes one).
    #[arg(long, global = true)]
    pub no_verify_ssl: bool,
    /// Exit 0 even when some items are in UnsuccessfulList, like the official CLI.
    #[arg(long, global = true)]
    pub compat_exit_codes: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Json,
    Table,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SessionTypeArg {
    #[value(name = "CONSOLE", alias = "console")]
    Console,
    #[value(name = "VIRTUAL", alias = "virtual")]
    Virtual,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Close DCV servers: no new sessions are placed on them. A close places a named hold
    /// (--hold); a server stays closed while it has any hold.
    CloseServers(CloseServersArgs),
    /// Open closed DCV servers again: removes the named hold (--hold); a server opens once
    /// no hold remains.
    OpenServers(OpenServersArgs),
    /// Describe DCV servers; follows every page unless --next-token or --no-paginate.
    DescribeServers(DescribeServersArgs),
    /// Beyond DCV: who did what to a server (or across the fleet), when, why, with which
    /// request id and outcome, from the broker's audit log; follows every page unless
    /// --next-token or --no-paginate.
    DescribeServerHistory(DescribeServerHistoryArgs),
    /// Beyond DCV: the servers, then one line per change as it happens (JSON: one message
    /// per line); reconnects and resumes by itself; runs until interrupted or --max-changes.
    WatchServers(WatchServersArgs),
    /// Beyond DCV: close servers for maintenance and wait, with a progress line on stderr,
    /// until their sessions have ended (exit 0) or the deadline passes (exit 4); prints the
    /// reply with the drain's final state.
    DrainServers(DrainServersArgs),
    /// Beyond DCV: the drains and their progress; follows every page unless --next-token or
    /// --no-paginate.
    DescribeDrains(DescribeDrainsArgs),
    /// Create a session.
    CreateSession(CreateSessionArgs),
    /// Describe sessions; follows every page unless --next-token or --no-paginate.
    DescribeSessions(DescribeSessionsArgs),
    /// Delete a session (--dry-run: say what it would do, change nothing).
    DeleteSession(DeleteSessionArgs),
    /// Get the data a DCV client needs to connect to a session.
    GetSessionConnectionData(GetSessionConnectionDataArgs),
    /// Replace a session's permissions.
    UpdateSessionPermissions(UpdateSessionPermissionsArgs),
    /// Take screenshots of sessions and save them as DIR/<SessionId>-<n>.<format> (mode
    /// 0600: they show users' desktops); prints the reply with each image's File instead of
    /// its Data.
    GetSessionScreenshots(GetSessionScreenshotsArgs),
    /// Print a shell completion script.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Beyond DCV: what every command that changes something takes.
#[derive(Args, Debug)]
pub struct RetryArgs {
    /// Make the call safe to repeat: the same token with the same request (within the
    /// broker's retention window, 24 hours by default) returns the first reply again and
    /// applies nothing twice. 1 to 64 printable ASCII characters, e.g. a UUID.
    #[arg(long, value_name = "TOKEN")]
    pub client_token: Option<String>,
}

/// Beyond DCV: a dry run.
#[derive(Args, Debug)]
pub struct DryRunArgs {
    /// Judge every item exactly as for real, change nothing, and print what the call would
    /// affect: the servers, the sessions on them, and AVAILABLE capacity before and after.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: count AVAILABLE capacity per value of this tag, e.g. pool.
    #[arg(long, value_name = "KEY", requires = "dry_run")]
    pub capacity_tag: Option<String>,
}

#[derive(Args, Debug)]
pub struct CloseServersArgs {
    /// Comma-separated server ids.
    #[arg(long, required = true)]
    pub server_ids: String,
    /// Close even servers that have running sessions.
    #[arg(long)]
    pub force: bool,
    /// Why the servers are closed (shown by describe-servers in Holds).
    #[arg(long)]
    pub reason: Option<String>,
    /// The name of the hold to place (default `default`, the one DCV-style closes use).
    /// Each team closing with its own name opens only its own hold.
    #[arg(long, value_name = "NAME")]
    pub hold: Option<String>,
    /// The hold ends by itself after this long (the server reopens if it was the last),
    /// e.g. 2h, 90m, 1h30m; at most a year.
    #[arg(long, value_name = "DURATION", conflicts_with = "expires_at")]
    pub expires_in: Option<String>,
    /// The hold ends by itself at this time, RFC 3339, e.g. 2026-12-02T06:00:00Z.
    #[arg(long, value_name = "RFC3339")]
    pub expires_at: Option<String>,
    /// Act only on servers whose StateVersion (describe-servers) is N; any other fails with
    /// STATE_VERSION_MISMATCH. Applies to every id given.
    #[arg(long, value_name = "N")]
    pub expected_version: Option<u64>,
    /// Close even if that leaves a pool below its capacity floor (the broker's
    /// --capacity-floor).
    #[arg(long)]
    pub override_capacity_floor: bool,
    #[command(flatten)]
    pub dry: DryRunArgs,
    #[command(flatten)]
    pub retry: RetryArgs,
}

#[derive(Args, Debug)]
pub struct OpenServersArgs {
    /// Comma-separated server ids.
    #[arg(long, required = true)]
    pub server_ids: String,
    /// The name of the hold to remove (default `default`). A server that keeps other holds
    /// stays closed, and its item fails with HOLDS_REMAIN naming them.
    #[arg(long, value_name = "NAME")]
    pub hold: Option<String>,
    /// Act only on servers whose StateVersion (describe-servers) is N. Applies to every id
    /// given.
    #[arg(long, value_name = "N")]
    pub expected_version: Option<u64>,
    #[command(flatten)]
    pub dry: DryRunArgs,
    #[command(flatten)]
    pub retry: RetryArgs,
}

#[derive(Args, Debug)]
pub struct DescribeServersArgs {
    /// Comma-separated server ids (all servers when absent).
    #[arg(long)]
    pub server_ids: Option<String>,
    /// Start from this page token (prints only that page).
    #[arg(long)]
    pub next_token: Option<String>,
    /// Items per page, 1 to 1000.
    #[arg(long)]
    pub max_results: Option<i32>,
    /// Print one page, with its NextToken.
    #[arg(long)]
    pub no_paginate: bool,
    /// Filter as KEY=VALUE (repeatable), e.g. tag:team=render.
    #[arg(long = "filter", value_name = "KEY=VALUE")]
    pub filters: Vec<String>,
}

#[derive(Args, Debug)]
pub struct DescribeServerHistoryArgs {
    /// The server (or a session's or API client's id); the whole fleet's history when absent.
    #[arg(long)]
    pub server_id: Option<String>,
    /// Only this actor's records (an API client id, mtls:SERVER, admin, broker).
    #[arg(long)]
    pub actor: Option<String>,
    /// Records at or after this time: RFC 3339 (2026-12-01T09:00:00Z) or a span ago (7days, 2h).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Records before this time: RFC 3339 or a span ago.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Newest first (default: oldest first).
    #[arg(long)]
    pub newest_first: bool,
    /// Start from this page token (prints only that page).
    #[arg(long)]
    pub next_token: Option<String>,
    /// Records per page, 1 to 1000 (default 100).
    #[arg(long)]
    pub max_results: Option<i32>,
    /// Print one page, with its NextToken.
    #[arg(long)]
    pub no_paginate: bool,
}

#[derive(Args, Debug)]
pub struct WatchServersArgs {
    /// Filter as KEY=VALUE (repeatable), as describe-servers.
    #[arg(long = "filter", value_name = "KEY=VALUE")]
    pub filters: Vec<String>,
    /// Resume after this sequence number (needs --epoch): no snapshot.
    #[arg(long, requires = "epoch")]
    pub from_sequence: Option<u64>,
    /// The epoch of the stream to resume (printed with every sequence).
    #[arg(long, requires = "from_sequence")]
    pub epoch: Option<String>,
    /// How long the broker waits before a progress mark on a quiet stream (1s to 5m).
    #[arg(long, value_name = "DURATION")]
    pub progress_interval: Option<String>,
    /// Stop after this many changes (the snapshot's servers not counted).
    #[arg(long)]
    pub max_changes: Option<u64>,
}

/// What a drain does at its deadline.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDeadlineArg {
    /// Report the servers still busy (exit 4).
    Report,
    /// Ask the agents to delete the sessions left (exit 4 too: the deadline passed).
    DeleteSessions,
}

#[derive(Args, Debug)]
pub struct DrainServersArgs {
    /// Comma-separated server ids.
    #[arg(long, required = true)]
    pub server_ids: String,
    /// Why the servers are drained (shown with their holds).
    #[arg(long)]
    pub reason: Option<String>,
    /// The name of the holds to place (default `drain`).
    #[arg(long, value_name = "NAME")]
    pub hold: Option<String>,
    /// Stop waiting after this long, e.g. 2h, 90m; at most a year.
    #[arg(long, value_name = "DURATION", conflicts_with = "deadline")]
    pub deadline_in: Option<String>,
    /// Stop waiting at this time, RFC 3339, e.g. 2026-12-02T06:00:00Z.
    #[arg(long, value_name = "RFC3339")]
    pub deadline: Option<String>,
    /// What the broker does at the deadline with the sessions left.
    #[arg(long, value_enum, default_value = "report")]
    pub on_deadline: OnDeadlineArg,
    /// Close even if that leaves a pool below its capacity floor.
    #[arg(long)]
    pub override_capacity_floor: bool,
    /// Print the reply and return at once, without waiting.
    #[arg(long)]
    pub no_wait: bool,
    /// How often to ask the broker how the drain is going.
    #[arg(long, value_name = "DURATION", default_value = "2s")]
    pub poll_interval: String,
    #[command(flatten)]
    pub retry: RetryArgs,
}

#[derive(Args, Debug)]
pub struct DescribeDrainsArgs {
    /// Comma-separated drain ids (all drains when absent).
    #[arg(long)]
    pub drain_ids: Option<String>,
    /// Start from this page token (prints only that page).
    #[arg(long)]
    pub next_token: Option<String>,
    /// Drains per page, 1 to 100.
    #[arg(long)]
    pub max_results: Option<i32>,
    /// Print one page, with its NextToken.
    #[arg(long)]
    pub no_paginate: bool,
}

#[derive(Args, Debug)]
pub struct CreateSessionArgs {
    /// The session's name.
    #[arg(long, required = true)]
    pub name: String,
    /// The user who owns the session.
    #[arg(long, required = true)]
    pub owner: String,
    /// CONSOLE or VIRTUAL.
    #[arg(long = "type", required = true, value_enum)]
    pub session_type: SessionTypeArg,
    /// Path, on the DCV server, of a script run when a virtual session starts.
    #[arg(long)]
    pub init_file_path: Option<String>,
    /// Path, on the DCV server, of a file run when the session starts.
    #[arg(long)]
    pub autorun_file: Option<String>,
    /// Comma-separated arguments of --autorun-file.
    #[arg(long)]
    pub autorun_file_arguments: Option<String>,
    /// Maximum concurrent clients, 1 to 100.
    #[arg(long)]
    pub max_concurrent_clients: Option<i32>,
    /// Enable DCV-GL (virtual sessions on Linux).
    #[arg(long)]
    pub dcv_gl_enabled: bool,
    /// A local permissions file; it is read and sent base64-encoded.
    #[arg(long)]
    pub permissions_file: Option<PathBuf>,
    /// Placement requirements, e.g. "server:Host.Os.Family = 'linux'".
    #[arg(long)]
    pub requirements: Option<String>,
    /// Storage root of the session on the DCV server.
    #[arg(long)]
    pub storage_root: Option<String>,
    /// Queue the request when no server is available.
    #[arg(long)]
    pub enqueue_request: bool,
    /// Do not retry the creation on another server after a failure.
    #[arg(long)]
    pub disable_retry_on_failure: bool,
    #[command(flatten)]
    pub retry: RetryArgs,
}

#[derive(Args, Debug)]
pub struct DescribeSessionsArgs {
    /// Comma-separated session ids (all sessions when absent).
    #[arg(long)]
    pub session_ids: Option<String>,
    /// Start from this page token (prints only that page).
    #[arg(long)]
    pub next_token: Option<String>,
    /// Only the sessions of this owner.
    #[arg(long)]
    pub owner: Option<String>,
    /// Items per page, 1 to 1000.
    #[arg(long)]
    pub max_results: Option<i32>,
    /// Print one page, with its NextToken.
    #[arg(long)]
    pub no_paginate: bool,
}

#[derive(Args, Debug)]
pub struct DeleteSessionArgs {
    /// The session's id.
    #[arg(long, required = true)]
    pub session_id: String,
    /// The session's owner.
    #[arg(long, required = true)]
    pub owner: String,
    /// Delete even when the DCV server does not answer.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub dry: DryRunArgs,
    #[command(flatten)]
    pub retry: RetryArgs,
}

#[derive(Args, Debug)]
pub struct GetSessionConnectionDataArgs {
    /// The session's id.
    #[arg(long, required = true)]
    pub session_id: String,
    /// The user who connects.
    #[arg(long, required = true)]
    pub user: String,
}

#[derive(Args, Debug)]
pub struct GetSessionScreenshotsArgs {
    /// Comma-separated session ids, 1 to 100.
    #[arg(long, required = true)]
    pub session_ids: String,
    /// The most pixels wide, 1 to 4096 (default: the broker's).
    #[arg(long)]
    pub max_width: Option<i32>,
    /// The most pixels high, 1 to 4096 (default: the broker's).
    #[arg(long)]
    pub max_height: Option<i32>,
    /// Where the images are saved (created, mode 0700, if missing).
    #[arg(long, default_value = ".")]
    pub output_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct UpdateSessionPermissionsArgs {
    /// The session's id.
    #[arg(long, required = true)]
    pub session_id: String,
    /// The session's owner.
    #[arg(long, required = true)]
    pub owner: String,
    /// A local permissions file; it is read and sent base64-encoded.
    #[arg(long, required = true)]
    pub permission_file: PathBuf,
    #[command(flatten)]
    pub retry: RetryArgs,
}
