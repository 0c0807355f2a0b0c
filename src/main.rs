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
    // Signal handlers go in before the port is announced: a supervisor may
    // send SIGTERM the moment it sees the line.
    let shutdown = shutdown_signal().map_err(|e| format!("cannot watch signals: {e}"))?;
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
    serve(listener, fleet, config, shutdown)
        .await
        .map_err(|e| e.to_string())
}

/// Installs SIGTERM and SIGINT handlers now; the future resolves on
/// either.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
