//! `dcvsm drain-servers`: the DrainServers call, then a wait until the
//! drain's sessions have ended or its deadline passed, with a progress
//! line on stderr whenever the count of sessions left changes. The wait
//! asks DescribeDrains every `--poll-interval`, renews a token the broker
//! stops accepting, and rides out a broker restart (a drain lives in its
//! holds, so the restarted broker still has it).

use dcv_broker::{client::BrokerClient, pb};
use serde_json::Value;
use tonic::Code;

use crate::{
    Failure,
    auth::Tokens,
    cli::{Command, DrainServersArgs, OnDeadlineArg, OutputFormat},
    commands::{client_failure, client_token, split_ids, status_failure},
    exit, fail,
    output::{self, to_json},
};

/// Drains, waits, prints the reply with the drain's final state, and
/// says by its exit code how it ended.
pub async fn run(
    broker: &BrokerClient,
    tokens: &Tokens,
    args: &DrainServersArgs,
    format: OutputFormat,
    command: &Command,
    compat_exit_codes: bool,
) -> Result<u8, Failure> {
    let request = request(args)?;
    let poll = humantime::parse_duration(&args.poll_interval)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            fail(
                exit::BAD_PARAMETER,
                format!(
                    "--poll-interval {:?}: expected a positive duration such as 2s",
                    args.poll_interval
                ),
            )
        })?;
    let mut token = tokens.get().await?;
    let mut renewed = false;
    // The call itself. A refused cached token changed nothing: renew once.
    let reply = loop {
        let client = broker
            .with_token(token.as_ref().map(|t| t.value.expose()))
            .map_err(client_failure)?;
        match client.servers().drain_servers(request.clone()).await {
            Ok(reply) => break reply.into_inner(),
            Err(s)
                if s.code() == Code::Unauthenticated
                    && !renewed
                    && token.as_ref().is_some_and(|t| t.cached) =>
            {
                renewed = true;
                token = tokens.renew().await?;
            }
            Err(s) => return Err(status_failure(s)),
        }
    };
    let partial = !reply.unsuccessful_list.is_empty() && !compat_exit_codes;
    let mut printed = to_json("DrainServersResponse", &reply)?;
    let done = if partial { exit::PARTIAL } else { exit::OK };
    if reply.drain_id.is_empty() || args.no_wait {
        output::print(&printed, format, command)?;
        return Ok(done);
    }
    let id = reply.drain_id;
    eprintln!(
        "dcvsm: drain {id}: {} server(s) closed; waiting for their sessions to end",
        reply.successful_list.len()
    );
    let mut shown = None;
    let mut renewed = false;
    let last = loop {
        let client = broker
            .with_token(token.as_ref().map(|t| t.value.expose()))
            .map_err(client_failure)?;
        let asked = client
            .servers()
            .describe_drains(pb::DescribeDrainsRequest {
                drain_ids: vec![id.clone()],
                ..Default::default()
            })
            .await;
        match asked {
            Ok(page) => {
                renewed = false;
                let Some(drain) = page.into_inner().drains.into_iter().next() else {
                    output::print(&printed, format, command)?;
                    return Err(fail(
                        exit::DRAIN_ENDED,
                        format!(
                            "drain {id} ended before its sessions did: its holds were removed (open-servers)"
                        ),
                    ));
                };
                let now = (drain.sessions_left, drain.busy_servers);
                if shown != Some(now) {
                    eprintln!(
                        "dcvsm: drain {id}: {} session(s) left on {} of {} server(s)",
                        drain.sessions_left,
                        drain.busy_servers,
                        drain.servers.len()
                    );
                    shown = Some(now);
                }
                if drain.state != pb::DrainState::Draining as i32 {
                    break drain;
                }
            }
            // A token that expired during a long wait.
            Err(s) if s.code() == Code::Unauthenticated && !renewed => {
                renewed = true;
                token = tokens.renew().await?;
                continue;
            }
            // A broker restarting, or a replica losing its database for a
            // moment: the drain is still there once it is back.
            Err(s) if s.code() == Code::Unavailable => {
                eprintln!(
                    "dcvsm: drain {id}: the broker is unavailable ({}); asking again",
                    s.message()
                );
            }
            Err(s) => return Err(status_failure(s)),
        }
        tokio::time::sleep(poll).await;
    };
    let passed = last.state == pb::DrainState::DeadlinePassed as i32;
    if let Value::Object(fields) = &mut printed {
        fields.insert("Drain".into(), to_json("Drain", &last)?);
    }
    output::print(&printed, format, command)?;
    if passed {
        eprintln!(
            "dcvsm: drain {id}: the deadline passed with {} session(s) left",
            last.sessions_left
        );
        Ok(exit::DEADLINE_PASSED)
    } else {
        eprintln!("dcvsm: drain {id}: drained");
        Ok(done)
    }
}

/// The DrainServers request the flags ask for, checked before any call.
fn request(args: &DrainServersArgs) -> Result<pb::DrainServersRequest, Failure> {
    let ids = split_ids("--server-ids", &args.server_ids)?;
    let deadline_in = args
        .deadline_in
        .as_deref()
        .map(|text| {
            humantime::parse_duration(text)
                .ok()
                .and_then(|d| prost_types::Duration::try_from(d).ok())
                .ok_or_else(|| {
                    fail(
                        exit::BAD_PARAMETER,
                        format!("--deadline-in {text:?}: expected a duration such as 2h or 90m"),
                    )
                })
        })
        .transpose()?;
    let deadline = args
        .deadline
        .as_deref()
        .map(|text| {
            text.parse::<prost_types::Timestamp>().map_err(|_| {
                fail(
                    exit::BAD_PARAMETER,
                    format!(
                        "--deadline {text:?}: expected an RFC 3339 time such as 2026-12-02T06:00:00Z"
                    ),
                )
            })
        })
        .transpose()?;
    Ok(pb::DrainServersRequest {
        servers: ids
            .into_iter()
            .map(|server_id| pb::DrainServerRequestData { server_id })
            .collect(),
        reason: args.reason.clone().unwrap_or_default(),
        hold_name: args.hold.clone(),
        deadline,
        deadline_in,
        on_deadline: match args.on_deadline {
            OnDeadlineArg::Report => pb::OnDeadline::Report,
            OnDeadlineArg::DeleteSessions => pb::OnDeadline::DeleteSessions,
        } as i32,
        override_capacity_floor: args.override_capacity_floor,
        client_token: client_token(&args.retry)?,
    })
}
