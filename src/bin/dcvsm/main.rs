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
//!
//! Layout: [`cli`] (the flags, clap), [`settings`] (flags > environment >
//! file > defaults), [`commands`] (one function per command, over
//! `dcv_broker::client`), [`output`] (JSON and tables), [`auth`] (tokens),
//! [`watch`] and [`drain`] (the commands that follow the broker over
//! time); this file runs a command and maps failures to exit codes.

mod auth;
mod cli;
mod commands;
mod drain;
mod output;
mod settings;
mod watch;

use std::{io::IsTerminal, process::ExitCode};

use clap::{CommandFactory, Parser};
use serde_json::Value;

use auth::{Credentials, Tokens};
use cli::{Cli, Command};
use commands::{client_failure, connect, execute};

/// Exit codes, documented in `--help` and the README.
mod exit {
    pub const OK: u8 = 0;
    pub const CONFIG: u8 = 1;
    pub const PARTIAL: u8 = 3;
    pub const DEADLINE_PASSED: u8 = 4;
    pub const DRAIN_ENDED: u8 = 5;
    pub const INTERRUPTED: u8 = 130;
    pub const BAD_PARAMETER: u8 = 252;
    pub const BAD_ENVIRONMENT: u8 = 253;
    pub const BROKER_ERROR: u8 = 254;
    pub const OTHER: u8 = 255;
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
    let settings = settings::settings(&cli)?;
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
    if let Command::WatchServers(args) = &cli.command {
        return watch::run(&broker, &tokens, args, settings.output).await;
    }
    if let Command::DrainServers(args) = &cli.command {
        let compat = cli.compat_exit_codes;
        return drain::run(
            &broker,
            &tokens,
            args,
            settings.output,
            &cli.command,
            compat,
        )
        .await;
    }
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

    output::print(&reply, settings.output, &cli.command)?;
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
