//! dcvsm's commands: connecting to the broker, one function per command
//! (checking its flags before any call, then calling the broker), and the
//! mapping of failures to exit codes.

use std::{
    io::IsTerminal,
    path::Path,
    time::{Duration, Instant},
};

use base64::Engine;
use dcv_broker::{
    client::{self, AuthChannel, BrokerClient, ClientError},
    pb::{self, servers_client::ServersClient, sessions_client::SessionsClient},
};
use serde_json::Value;

use crate::{
    Failure,
    cli::{
        CloseServersArgs, Command, CreateSessionArgs, DeleteSessionArgs, DescribeDrainsArgs,
        DescribeServerHistoryArgs, DescribeServersArgs, DescribeSessionsArgs,
        GetSessionConnectionDataArgs, GetSessionScreenshotsArgs, OpenServersArgs, RetryArgs,
        SessionTypeArg, UpdateSessionPermissionsArgs,
    },
    exit, fail,
    output::to_json,
    settings::Settings,
};

/// How long a paginated describe runs before a progress line appears.
const PROGRESS_AFTER: Duration = Duration::from_millis(500);

type Servers = ServersClient<AuthChannel>;
type Sessions = SessionsClient<AuthChannel>;

/// Runs one command: the broker's reply as JSON. Called again, whole, when
/// the broker refused a cached token.
pub async fn execute(
    command: &Command,
    servers: Servers,
    sessions: Sessions,
) -> Result<Value, Failure> {
    match command {
        Command::CloseServers(args) => close_servers(servers, args).await,
        Command::OpenServers(args) => open_servers(servers, args).await,
        Command::DescribeServers(args) => describe_servers(servers, args).await,
        Command::DescribeServerHistory(args) => describe_server_history(servers, args).await,
        Command::CreateSession(args) => create_session(sessions, args).await,
        Command::DescribeSessions(args) => describe_sessions(sessions, args).await,
        Command::DeleteSession(args) => delete_session(sessions, args).await,
        Command::GetSessionConnectionData(args) => {
            get_session_connection_data(sessions, args).await
        }
        Command::UpdateSessionPermissions(args) => update_session_permissions(sessions, args).await,
        Command::GetSessionScreenshots(args) => get_session_screenshots(sessions, args).await,
        Command::Completion { .. } => unreachable!("handled before connecting"),
        Command::WatchServers(_) => unreachable!("a stream, run by watch::run"),
        Command::DrainServers(_) => unreachable!("a wait, run by drain::run"),
        Command::DescribeDrains(args) => describe_drains(servers, args).await,
    }
}

async fn close_servers(mut servers: Servers, args: &CloseServersArgs) -> Result<Value, Failure> {
    let ids = split_ids("--server-ids", &args.server_ids)?;
    let expires_in = args
        .expires_in
        .as_deref()
        .map(parse_expires_in)
        .transpose()?;
    let expires_at = args
        .expires_at
        .as_deref()
        .map(parse_expires_at)
        .transpose()?;
    let client_token = client_token(&args.retry)?;
    let servers_data = ids
        .into_iter()
        .map(|server_id| pb::CloseServerRequestData {
            server_id,
            force: args.force.then_some(true),
            reason: args.reason.clone().unwrap_or_default(),
            hold_name: args.hold.clone(),
            expires_at,
            expires_in,
            expected_state_version: args.expected_version,
            override_capacity_floor: args.override_capacity_floor.then_some(true),
        })
        .collect();
    let r = servers
        .close_servers(pb::CloseServersRequest {
            servers: servers_data,
            client_token,
            dry_run: args.dry.dry_run,
            capacity_tag_key: args.dry.capacity_tag.clone().unwrap_or_default(),
        })
        .await
        .map_err(status_failure)?;
    to_json("CloseServersResponse", &r.into_inner())
}

async fn open_servers(mut servers: Servers, args: &OpenServersArgs) -> Result<Value, Failure> {
    let ids = split_ids("--server-ids", &args.server_ids)?;
    let client_token = client_token(&args.retry)?;
    let servers_data = ids
        .into_iter()
        .map(|server_id| pb::OpenServerRequestData {
            server_id,
            hold_name: args.hold.clone(),
            expected_state_version: args.expected_version,
        })
        .collect();
    let r = servers
        .open_servers(pb::OpenServersRequest {
            servers: servers_data,
            client_token,
            dry_run: args.dry.dry_run,
            capacity_tag_key: args.dry.capacity_tag.clone().unwrap_or_default(),
        })
        .await
        .map_err(status_failure)?;
    to_json("OpenServersResponse", &r.into_inner())
}

/// The longest token the broker accepts in ClientToken.
const MAX_CLIENT_TOKEN_CHARS: usize = 64;

/// --client-token, checked as the broker documents it (empty: none).
pub fn client_token(args: &RetryArgs) -> Result<String, Failure> {
    let Some(token) = &args.client_token else {
        return Ok(String::new());
    };
    let printable = token.chars().all(|c| (' '..='~').contains(&c));
    if token.is_empty() || token.len() > MAX_CLIENT_TOKEN_CHARS || !printable {
        return Err(fail(
            exit::BAD_PARAMETER,
            format!(
                "--client-token must be 1 to {MAX_CLIENT_TOKEN_CHARS} printable ASCII characters"
            ),
        ));
    }
    Ok(token.clone())
}

/// --expires-in: a duration such as 2h, 90m or 1h30m.
fn parse_expires_in(text: &str) -> Result<prost_types::Duration, Failure> {
    let bad = |why: String| {
        fail(
            exit::BAD_PARAMETER,
            format!("--expires-in {text:?}: {why} (expected a duration such as 2h, 90m or 1h30m)"),
        )
    };
    let duration = humantime::parse_duration(text).map_err(|e| bad(e.to_string()))?;
    prost_types::Duration::try_from(duration).map_err(|_| bad("too long".into()))
}

/// --expires-at: an RFC 3339 time, with Z or an offset.
fn parse_expires_at(text: &str) -> Result<prost_types::Timestamp, Failure> {
    text.parse().map_err(|_| {
        fail(
            exit::BAD_PARAMETER,
            format!(
                "--expires-at {text:?}: expected an RFC 3339 time such as 2026-12-02T06:00:00Z"
            ),
        )
    })
}

async fn describe_servers(servers: Servers, args: &DescribeServersArgs) -> Result<Value, Failure> {
    let server_ids = match &args.server_ids {
        Some(ids) => split_ids("--server-ids", ids)?,
        None => Vec::new(),
    };
    let max_results = args.max_results.map(check_max_results).transpose()?;
    let filters = args
        .filters
        .iter()
        .map(|f| parse_filter(f))
        .collect::<Result<Vec<_>, _>>()?;
    let single = args.no_paginate || args.next_token.is_some();
    let mut request = pb::DescribeServersRequest {
        server_ids,
        next_token: args.next_token.clone().unwrap_or_default(),
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
    .await
}

async fn describe_drains(servers: Servers, args: &DescribeDrainsArgs) -> Result<Value, Failure> {
    let drain_ids = match &args.drain_ids {
        Some(ids) => split_ids("--drain-ids", ids)?,
        None => Vec::new(),
    };
    let max_results = args.max_results.map(check_max_results).transpose()?;
    let single = args.no_paginate || args.next_token.is_some();
    let mut request = pb::DescribeDrainsRequest {
        drain_ids,
        next_token: args.next_token.clone().unwrap_or_default(),
        max_results,
    };
    paginate("Drains", single, |token| {
        request.next_token = token.unwrap_or_else(|| request.next_token.clone());
        let request = request.clone();
        let mut servers = servers.clone();
        async move {
            let r = servers.describe_drains(request).await;
            let r = r.map_err(status_failure)?.into_inner();
            Ok((to_json("DescribeDrainsResponse", &r)?, r.next_token))
        }
    })
    .await
}

/// A time given as RFC 3339, or as a span before now (`7days`, `90min`).
fn parse_time(flag: &str, text: &str) -> Result<prost_types::Timestamp, Failure> {
    if let Ok(t) = text.parse::<prost_types::Timestamp>() {
        return Ok(t);
    }
    humantime::parse_duration(text)
        .ok()
        .and_then(|ago| std::time::SystemTime::now().checked_sub(ago))
        .map(prost_types::Timestamp::from)
        .ok_or_else(|| {
            fail(
                exit::BAD_PARAMETER,
                format!(
                    "{flag} {text:?}: expected an RFC 3339 time such as 2026-12-02T06:00:00Z \
                     or a span ago such as 7days"
                ),
            )
        })
}

async fn describe_server_history(
    servers: Servers,
    args: &DescribeServerHistoryArgs,
) -> Result<Value, Failure> {
    let max_results = args.max_results.map(check_max_results).transpose()?;
    let start_time = args
        .since
        .as_deref()
        .map(|t| parse_time("--since", t))
        .transpose()?;
    let end_time = args
        .until
        .as_deref()
        .map(|t| parse_time("--until", t))
        .transpose()?;
    let single = args.no_paginate || args.next_token.is_some();
    let mut request = pb::DescribeServerHistoryRequest {
        server_id: args.server_id.clone().unwrap_or_default(),
        actor: args.actor.clone().unwrap_or_default(),
        start_time,
        end_time,
        newest_first: args.newest_first,
        max_results,
        next_token: args.next_token.clone().unwrap_or_default(),
    };
    paginate("Records", single, |token| {
        request.next_token = token.unwrap_or_else(|| request.next_token.clone());
        let request = request.clone();
        let mut servers = servers.clone();
        async move {
            let r = servers.describe_server_history(request).await;
            let r = r.map_err(status_failure)?.into_inner();
            Ok((to_json("DescribeServerHistoryResponse", &r)?, r.next_token))
        }
    })
    .await
}

async fn create_session(
    mut sessions: Sessions,
    args: &CreateSessionArgs,
) -> Result<Value, Failure> {
    if let Some(n) = args.max_concurrent_clients
        && !(1..=100).contains(&n)
    {
        return Err(fail(
            exit::BAD_PARAMETER,
            format!("--max-concurrent-clients must be between 1 and 100, got {n}"),
        ));
    }
    let permissions_file = match &args.permissions_file {
        Some(path) => read_base64("--permissions-file", path)?,
        None => String::new(),
    };
    let client_token = client_token(&args.retry)?;
    let data = pb::CreateSessionRequestData {
        name: args.name.clone(),
        owner: args.owner.clone(),
        r#type: match args.session_type {
            SessionTypeArg::Console => pb::SessionType::Console,
            SessionTypeArg::Virtual => pb::SessionType::Virtual,
        } as i32,
        init_file: args.init_file_path.clone().unwrap_or_default(),
        max_concurrent_clients: args.max_concurrent_clients,
        dcv_gl_enabled: args.dcv_gl_enabled,
        permissions_file,
        enqueue_request: args.enqueue_request,
        autorun_file: args.autorun_file.clone().unwrap_or_default(),
        autorun_file_arguments: args
            .autorun_file_arguments
            .as_ref()
            .map(|a| a.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
        disable_retry_on_failure: args.disable_retry_on_failure,
        requirements: args.requirements.clone().unwrap_or_default(),
        storage_root: args.storage_root.clone().unwrap_or_default(),
    };
    let r = sessions
        .create_sessions(pb::CreateSessionsRequest {
            sessions: vec![data],
            client_token,
        })
        .await
        .map_err(status_failure)?;
    to_json("CreateSessionsResponse", &r.into_inner())
}

async fn describe_sessions(
    sessions: Sessions,
    args: &DescribeSessionsArgs,
) -> Result<Value, Failure> {
    let session_ids = match &args.session_ids {
        Some(ids) => split_ids("--session-ids", ids)?,
        None => Vec::new(),
    };
    let max_results = args.max_results.map(check_max_results).transpose()?;
    let filters = args
        .owner
        .clone()
        .map(|value| {
            vec![pb::KeyValuePair {
                key: "owner".into(),
                value,
            }]
        })
        .unwrap_or_default();
    let single = args.no_paginate || args.next_token.is_some();
    let mut request = pb::DescribeSessionsRequest {
        session_ids,
        filters,
        max_results,
        next_token: args.next_token.clone().unwrap_or_default(),
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
    .await
}

async fn delete_session(
    mut sessions: Sessions,
    args: &DeleteSessionArgs,
) -> Result<Value, Failure> {
    let client_token = client_token(&args.retry)?;
    let r = sessions
        .delete_sessions(pb::DeleteSessionsRequest {
            sessions: vec![pb::DeleteSessionRequestData {
                session_id: args.session_id.clone(),
                owner: args.owner.clone(),
                force: args.force.then_some(true),
            }],
            client_token,
            dry_run: args.dry.dry_run,
            capacity_tag_key: args.dry.capacity_tag.clone().unwrap_or_default(),
        })
        .await
        .map_err(status_failure)?;
    to_json("DeleteSessionsResponse", &r.into_inner())
}

async fn get_session_connection_data(
    mut sessions: Sessions,
    args: &GetSessionConnectionDataArgs,
) -> Result<Value, Failure> {
    let r = sessions
        .get_session_connection_data(pb::GetSessionConnectionDataRequest {
            session_id: args.session_id.clone(),
            user: args.user.clone(),
        })
        .await
        .map_err(status_failure)?;
    to_json("GetSessionConnectionDataResponse", &r.into_inner())
}

async fn update_session_permissions(
    mut sessions: Sessions,
    args: &UpdateSessionPermissionsArgs,
) -> Result<Value, Failure> {
    let permissions_file = read_base64("--permission-file", &args.permission_file)?;
    let client_token = client_token(&args.retry)?;
    let r = sessions
        .update_session_permissions(pb::UpdateSessionPermissionsRequest {
            sessions: vec![pb::UpdateSessionPermissionsRequestData {
                session_id: args.session_id.clone(),
                owner: args.owner.clone(),
                permissions_file,
            }],
            client_token,
        })
        .await
        .map_err(status_failure)?;
    to_json("UpdateSessionPermissionsResponse", &r.into_inner())
}

/// The most sessions one GetSessionScreenshots call may name (the
/// broker's bound, checked before calling it).
const MAX_SCREENSHOT_SESSIONS: usize = 100;

async fn get_session_screenshots(
    mut sessions: Sessions,
    args: &GetSessionScreenshotsArgs,
) -> Result<Value, Failure> {
    let ids = split_ids("--session-ids", &args.session_ids)?;
    if ids.len() > MAX_SCREENSHOT_SESSIONS {
        return Err(fail(
            exit::BAD_PARAMETER,
            format!(
                "--session-ids names {} sessions; at most {MAX_SCREENSHOT_SESSIONS} per call",
                ids.len()
            ),
        ));
    }
    for (flag, value) in [
        ("--max-width", args.max_width),
        ("--max-height", args.max_height),
    ] {
        if let Some(n) = value
            && !(1..=4096).contains(&n)
        {
            return Err(fail(
                exit::BAD_PARAMETER,
                format!("{flag} must be between 1 and 4096, got {n}"),
            ));
        }
    }
    let r = sessions
        .get_session_screenshots(pb::GetSessionScreenshotsRequest {
            sessions: ids
                .into_iter()
                .map(|session_id| pb::GetSessionScreenshotRequestData {
                    session_id,
                    max_width: args.max_width,
                    max_height: args.max_height,
                })
                .collect(),
        })
        .await
        .map_err(status_failure)?
        .into_inner();
    let mut saved = Vec::new();
    for success in &r.successful_list {
        let Some(shot) = &success.session_screenshot else {
            continue;
        };
        let mut files = Vec::new();
        for (n, image) in shot.images.iter().enumerate() {
            let path =
                args.output_dir
                    .join(screenshot_file_name(&shot.session_id, n, &image.format));
            crate::auth::write_private(&path, &image.data)
                .map_err(|e| fail(exit::OTHER, format!("cannot save {}: {e}", path.display())))?;
            files.push(path.display().to_string());
        }
        saved.push(files);
    }
    let mut reply = to_json("GetSessionScreenshotsResponse", &r)?;
    // The files instead of the data: the images are saved, and base64 of
    // every screenshot would bury the reply.
    if let Some(Value::Array(list)) = reply.get_mut("SuccessfulList") {
        for (item, files) in list.iter_mut().zip(saved) {
            if let Some(Value::Array(images)) = item.pointer_mut("/SessionScreenshot/Images") {
                for (image, file) in images.iter_mut().zip(files) {
                    if let Some(image) = image.as_object_mut() {
                        image.remove("Data");
                        image.insert("File".into(), Value::String(file));
                    }
                }
            }
        }
    }
    Ok(reply)
}

/// `<SessionId>-<n>.<format>`, safe as one file name whatever the session
/// id (an agent names the sessions it reports): every byte outside
/// `[A-Za-z0-9_-]` and a leading dot become `%XX`, so the name never
/// climbs out of the directory, hides, or collides with another id's.
fn screenshot_file_name(session_id: &str, n: usize, format: &str) -> String {
    let mut name = String::with_capacity(session_id.len() + 12);
    for b in session_id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && !name.is_empty()) {
            name.push(char::from(b));
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    let extension = match format {
        "png" => "png",
        "jpeg" => "jpeg",
        _ => "bin",
    };
    format!("{name}-{n}.{extension}")
}

pub async fn connect(settings: &Settings) -> Result<BrokerClient, Failure> {
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
pub fn client_failure(e: ClientError) -> Failure {
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
pub fn status_failure(status: tonic::Status) -> Failure {
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

pub fn split_ids(flag: &str, ids: &str) -> Result<Vec<String>, Failure> {
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

pub fn parse_filter(f: &str) -> Result<pb::KeyValuePair, Failure> {
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

#[cfg(test)]
mod tests {
    use super::screenshot_file_name;

    #[test]
    fn screenshot_file_names_stay_in_their_directory() {
        assert_eq!(screenshot_file_name("abc-1", 0, "png"), "abc-1-0.png");
        assert_eq!(
            screenshot_file_name("../etc/x", 1, "jpeg"),
            "%2E.%2Fetc%2Fx-1.jpeg"
        );
        assert_eq!(screenshot_file_name(".hidden", 0, "gif"), "%2Ehidden-0.bin");
        assert_eq!(screenshot_file_name("a b%", 2, "png"), "a%20b%25-2.png");
    }
}
