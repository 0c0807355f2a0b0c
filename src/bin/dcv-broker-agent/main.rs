//! `dcv-broker-agent`: the agent on a DCV host. It registers the host with
//! the broker, reports it and its sessions, and carries out the broker's
//! instructions through the local `dcv` tool. Linux hosts only for now
//! (only [`facts`] knows it).
//!
//! Exit codes: 0 a clean stop (SIGTERM/SIGINT), 1 another fatal error,
//! 2 a bad configuration (one line naming the key).

mod broker;
mod config;
mod dcv;
mod facts;
mod instructions;
mod observe;
mod state;

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use clap::{Parser, Subcommand};
use tokio::sync::watch;

use crate::{
    broker::Agent,
    config::{Config, DEFAULT_CONFIG},
    dcv::{Dcv, Folders},
    instructions::Executor,
    observe::Observer,
    state::StateDir,
};

const EXIT_FATAL: u8 = 1;
const EXIT_CONFIG: u8 = 2;
/// Permissions files live here (inside the 0700 state directory) while
/// `dcv` reads them.
const SCRATCH_DIR: &str = "tmp";

/// The dcv-broker agent for DCV hosts.
#[derive(Debug, Parser)]
#[command(name = "dcv-broker-agent", version)]
struct Cli {
    /// The configuration file (TOML, DCV's agent.conf layout).
    #[arg(long, global = true, env = "DCV_BROKER_AGENT_CONFIG", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the server id (made and kept in state_dir if needed), to bind
    /// an agent client to it (`dcv-broker clients register --server-id`).
    ServerId,
    /// Check the configuration and reach the broker once; print `ok`.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match config::load(&cli.config) {
        Ok(mut c) => {
            c.path.clone_from(&cli.config);
            c
        }
        Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(EXIT_FATAL, &format!("cannot start the runtime: {e}")),
    };
    match cli.command {
        Some(Command::ServerId) => match open_state(&config).and_then(|s| {
            s.server_id()
                .map_err(|e| format!("state_dir {}: {e}", config.state_dir.display()))
        }) {
            Ok(id) => {
                println!("{id}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_FATAL, &e),
        },
        Some(Command::Check) => {
            telemetry(&config.log_level);
            let id = open_state(&config).and_then(|s| {
                s.server_id()
                    .map_err(|e| format!("state_dir {}: {e}", config.state_dir.display()))
            });
            match id.map(|id| check_identity(&config, &id)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return fail(EXIT_CONFIG, &e),
                Err(e) => return fail(EXIT_FATAL, &e),
            }
            match runtime.block_on(broker::check(&config)) {
                Ok(()) => {
                    println!("ok");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(
                    EXIT_FATAL,
                    &format!("cannot use the broker at {}: {e}", config.broker_url),
                ),
            }
        }
        None => {
            telemetry(&config.log_level);
            match runtime.block_on(run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err((code, e)) => fail(code, &e),
            }
        }
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("dcv-broker-agent: {message}");
    ExitCode::from(code)
}

fn telemetry(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DCV_BROKER_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

fn open_state(config: &Config) -> Result<StateDir, String> {
    StateDir::open(&config.state_dir)
        .map_err(|e| format!("state_dir {}: {e}", config.state_dir.display()))
}

/// With an agent certificate, the certificate must be this host's: the
/// broker lets it act only for the server id in its common name.
fn check_identity(config: &Config, server_id: &str) -> Result<(), String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let Some((cert, _)) = &config.credentials.identity else {
        return Ok(());
    };
    let named = CertificateDer::pem_slice_iter(cert)
        .next()
        .and_then(Result::ok)
        .and_then(|der| dcv_broker::tls::agent_server_id(&der));
    match named {
        Some(name) if name == server_id => Ok(()),
        Some(name) => Err(format!(
            "{}: [agent] cert_file: the certificate is for server {name:?}, but this host's \
             server id is {server_id:?} (in {}); issue one with `dcv-broker tls agent-cert \
             --server-id {server_id}`",
            config.path.display(),
            config.state_dir.display()
        )),
        None => Err(format!(
            "{}: [agent] cert_file: the certificate names no server id (its common name)",
            config.path.display()
        )),
    }
}

async fn run(config: Config) -> Result<(), (u8, String)> {
    let fatal = |e: String| (EXIT_FATAL, e);
    let state = open_state(&config).map_err(fatal)?;
    let server_id = state
        .server_id()
        .map_err(|e| fatal(format!("state_dir {}: {e}", config.state_dir.display())))?;
    check_identity(&config, &server_id).map_err(|e| (EXIT_CONFIG, e))?;
    let journal = state.journal().map_err(|e| {
        fatal(format!(
            "the instruction journal in {}: {e}",
            config.state_dir.display()
        ))
    })?;
    let journal = Arc::new(Mutex::new(journal));
    let scratch = config.state_dir.join(SCRATCH_DIR);
    // Leftovers of a killed agent may hold permissions files: start empty.
    let _ = std::fs::remove_dir_all(&scratch);
    StateDir::open(&scratch).map_err(|e| fatal(format!("{}: {e}", scratch.display())))?;
    if !config.tls_strict {
        tracing::warn!(
            "tls_strict = false: any certificate the broker shows is accepted, so the broker \
             is not authenticated; set ca_file to its CA and remove tls_strict"
        );
    }
    tracing::info!(
        "dcv-broker-agent {} starting: server_id={server_id} broker={} dcv={}",
        env!("CARGO_PKG_VERSION"),
        config.broker_url,
        config.dcv_command.display()
    );
    let dcv = Dcv::new(config.dcv_command.clone(), config.dcv_command_timeout);
    let observer = Arc::new(Observer::new(
        dcv.clone(),
        config.enable_query_logged_in_users,
        journal.clone(),
    ));
    let executor = Arc::new(Executor::new(
        dcv,
        Folders {
            init: config.init_folder.clone(),
            autorun: config.autorun_folder.clone(),
        },
        scratch,
        journal,
        observer.clone(),
    ));
    let (poll_every, poll_rx) = watch::channel(Duration::from_secs(30));
    let poller = tokio::spawn(observer.clone().run(poll_rx));
    let agent = Arc::new(Agent {
        config: Arc::new(config),
        server_id,
        executor,
        observer,
        poll_every,
        slots: Arc::new(tokio::sync::Semaphore::new(
            broker::MAX_CONCURRENT_INSTRUCTIONS,
        )),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    // Handlers first: systemd may send SIGTERM as soon as it hears READY.
    let signal = signals().map_err(fatal)?;
    let talking = tokio::spawn(agent.clone().run(stop_rx));
    // Ready once started, not once the broker answers: a broker that is
    // down must not fail the agent's start (it reconnects on its own).
    dcv_broker::notify::ready(&format!("server {}", agent.server_id));
    let _watchdog = dcv_broker::notify::watchdog();
    let signal = signal.await;
    dcv_broker::notify::stopping("stopping: finishing instructions");
    tracing::info!("{signal}: stopping (the broker keeps this server; it is not deregistered)");
    let _ = stop_tx.send(true);
    let _ = talking.await;
    // Results of instructions finishing now are still reported if the
    // connection lives; otherwise the broker sends them again and the
    // journal answers.
    agent.finish_instructions().await;
    poller.abort();
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves with
/// the first signal's name.
fn signals() -> Result<impl Future<Output = &'static str>, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot handle SIGINT: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}
