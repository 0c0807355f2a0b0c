//! `dcvsm watch-servers`: the snapshot, then one line per change, as the
//! broker streams them; reconnects and resumes by itself (from the last
//! sequence seen, or from a new snapshot when the broker no longer has
//! it), so an operator's terminal or a script's pipe survives a broker
//! restart or a moment of slowness.

use std::{io::Write as _, time::Duration};

use dcv_broker::{client::BrokerClient, pb};
use tonic::Code;

use crate::{
    Failure,
    auth::Tokens,
    cli::{OutputFormat, WatchServersArgs},
    commands::{client_failure, parse_filter, status_failure},
    exit, fail,
    output::to_json,
};

/// The longest wait between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Runs the watch until interrupted (or `--max-changes`).
pub async fn run(
    broker: &BrokerClient,
    tokens: &Tokens,
    args: &WatchServersArgs,
    format: OutputFormat,
) -> Result<u8, Failure> {
    let filters = args
        .filters
        .iter()
        .map(|f| parse_filter(f))
        .collect::<Result<Vec<_>, _>>()?;
    let progress_interval = args
        .progress_interval
        .as_deref()
        .map(|text| {
            humantime::parse_duration(text)
                .map(|d| prost_types::Duration::try_from(d).unwrap_or_default())
                .map_err(|e| {
                    fail(
                        exit::BAD_PARAMETER,
                        format!("--progress-interval {text:?}: {e}"),
                    )
                })
        })
        .transpose()?;
    let mut resume = args.epoch.clone().zip(args.from_sequence);
    let mut changes = 0u64;
    let mut backoff = Duration::from_millis(250);
    let mut renewed = false;
    let mut token = tokens.get().await?;
    loop {
        let client = broker
            .with_token(token.as_ref().map(|t| t.value.expose()))
            .map_err(client_failure)?;
        let request = pb::WatchServersRequest {
            filters: filters.clone(),
            from_sequence: resume.as_ref().map(|(_, seq)| *seq),
            epoch: resume
                .as_ref()
                .map(|(epoch, _)| epoch.clone())
                .unwrap_or_default(),
            progress_interval,
        };
        let ended = match client.servers().watch_servers(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(message)) => {
                            backoff = Duration::from_millis(250);
                            renewed = false;
                            resume = Some((message.epoch.clone(), message.sequence));
                            changes += message.changes.len() as u64;
                            print(&message, format)?;
                            if args.max_changes.is_some_and(|max| changes >= max) {
                                return Ok(exit::OK);
                            }
                        }
                        Ok(None) => {
                            break tonic::Status::unavailable("the broker ended the stream");
                        }
                        Err(status) => break status,
                    }
                }
            }
            Err(status) => status,
        };
        match ended.code() {
            Code::Unauthenticated if !renewed => {
                renewed = true;
                token = tokens.renew().await?;
                continue;
            }
            Code::OutOfRange => {
                eprintln!("dcvsm: {}; starting again from a snapshot", ended.message());
                resume = None;
            }
            Code::Unavailable | Code::ResourceExhausted | Code::Cancelled | Code::Internal => {
                eprintln!(
                    "dcvsm: the watch stopped ({}); reconnecting in {backoff:?}",
                    ended.message()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            _ => return Err(status_failure(ended)),
        }
    }
}

/// One message: JSON on one line, or a line per server and change.
fn print(message: &pb::WatchServersResponse, format: OutputFormat) -> Result<(), Failure> {
    let mut out = String::new();
    match format {
        OutputFormat::Json => {
            let value = to_json("WatchServersResponse", message)?;
            out.push_str(&value.to_string());
            out.push('\n');
        }
        OutputFormat::Table => {
            let at = format!("{}#{}", message.epoch, message.sequence);
            for server in &message.servers {
                out.push_str(&line(&at, "SNAPSHOT", server));
            }
            if message.snapshot_end && message.servers.is_empty() {
                out.push_str(&format!("{at} SNAPSHOT (no servers)\n"));
            }
            for change in &message.changes {
                let at = format!("{}#{}", message.epoch, change.sequence);
                let kind = change.r#type().as_str_name();
                match &change.server {
                    Some(server) => out.push_str(&line(&at, kind, server)),
                    None => out.push_str(&format!("{at} {kind} {}\n", change.server_id)),
                }
            }
        }
    }
    let mut stdout = std::io::stdout().lock();
    // A reader that stopped (`| head`) ends the watch quietly.
    if stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        std::process::exit(0);
    }
    Ok(())
}

/// `EPOCH#SEQ KIND ID AVAILABILITY [REASONS] sessions=C+V holds=NAME(ACTOR: REASON),...`
fn line(at: &str, kind: &str, server: &pb::Server) -> String {
    let reasons: Vec<&str> = server
        .unavailability_reasons()
        .map(|r| r.as_str_name())
        .collect();
    let holds: Vec<String> = server
        .holds
        .iter()
        .map(|h| format!("{}({}: {})", h.name, h.actor, h.reason))
        .collect();
    format!(
        "{at} {kind} {} {}{} sessions={}+{} holds={}\n",
        server.id,
        server.availability().as_str_name(),
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" [{}]", reasons.join(","))
        },
        server.console_session_count,
        server.virtual_session_count,
        if holds.is_empty() {
            "-".to_owned()
        } else {
            holds.join(",")
        },
    )
}
