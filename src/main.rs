//! The `dcv-broker` binary: parses flags, starts logging, binds the
//! listener, and serves until SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser;
use dcv_broker::{config::Args, fleet::Fleet, serve, telemetry};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dcv-broker: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    args.check()?;
    telemetry::init(args.log_format, &args.log)?;
    let config = args.broker_config();
    let fleet = Fleet::new(config.fleet.clone()).map_err(|e| e.to_string())?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    // The one line on stdout: scripts read the port from it.
    println!("dcv-broker listening on {addr}");
    tracing::info!(%addr, demo_fleet = config.demo_fleet, "serving");
    serve(listener, fleet, config, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(err) => {
                    tracing::warn!(%err, "cannot watch SIGTERM; only SIGINT stops the broker");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
