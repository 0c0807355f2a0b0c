//! The watch streams over plain HTTP, as server-sent events: `GET
//! /watchServers` and `GET /watchSessions` (beyond DCV, so not in DCV's
//! route table nor in the OpenAPI document built from it).
//!
//! Each WatchServers (WatchSessions) message becomes one event: `event:`
//! its type (`SNAPSHOT`, `CHANGES`, `PROGRESS`), `id:` `EPOCH:SEQUENCE`,
//! `data:` the message as the REST routes print JSON (DCV's names). A
//! client that reconnects sends the last id back as `Last-Event-ID` (an
//! EventSource does by itself) and the stream resumes after it; if the
//! broker no longer has that point (its log moved on, it restarted, another
//! replica answers) the stream starts again from a snapshot, and a SNAPSHOT
//! event always means "replace your view". An error after the stream
//! started ends it with an `error` event (`{"code": ..., "message": ...}`).
//!
//! Query parameters: `filter=KEY=VALUE` (repeatable, the describes' keys),
//! `progressInterval` (seconds, 1 to 300), and `fromSequence` with `epoch`
//! to resume explicitly (OUT_OF_RANGE then answers 400, as over gRPC).

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{HeaderMap, HeaderValue, header};
use http_body::Frame;
use prost_reflect::MessageDescriptor;
use serde_json::json;
use tonic::{Code, Status, body::Body};

use super::{json, routes::Route};
use crate::{
    api::{ServersApi, SessionsApi, watch_stream::WatchStream},
    fleet::{FieldViolation, FleetError},
    pb::{self, servers_server::Servers as _, sessions_server::Sessions as _},
};

/// The most query parameters a watch takes (filters and the rest).
const MAX_PARAMETERS: usize = crate::fleet::query::MAX_FILTERS + 4;

/// What the request asked for.
#[derive(Debug, Default)]
struct Asked {
    filters: Vec<pb::KeyValuePair>,
    progress_interval: Option<prost_types::Duration>,
    from_sequence: Option<u64>,
    epoch: String,
    /// The resume point came from `Last-Event-ID`: a lost one means a
    /// fresh snapshot, not an error.
    reconnect: bool,
}

fn invalid(field: &str, why: impl Into<String>) -> Status {
    FleetError::InvalidArgument(vec![FieldViolation::new(field, why)]).into()
}

/// Parses the query and `Last-Event-ID`.
fn asked(query: Option<&str>, headers: &HeaderMap) -> Result<Asked, Status> {
    let mut asked = Asked::default();
    for (i, (name, value)) in form_urlencoded::parse(query.unwrap_or("").as_bytes()).enumerate() {
        if i >= MAX_PARAMETERS {
            return Err(invalid(
                "query",
                format!("more than {MAX_PARAMETERS} query parameters"),
            ));
        }
        match &*name {
            "filter" => {
                let (key, value) = value
                    .split_once('=')
                    .ok_or_else(|| invalid("filter", "must be KEY=VALUE"))?;
                asked.filters.push(pb::KeyValuePair {
                    key: key.to_owned(),
                    value: value.to_owned(),
                });
            }
            "progressInterval" => {
                let seconds: i64 = value
                    .parse()
                    .map_err(|_| invalid("progressInterval", "must be whole seconds"))?;
                asked.progress_interval = Some(prost_types::Duration { seconds, nanos: 0 });
            }
            "fromSequence" => {
                asked.from_sequence = Some(
                    value
                        .parse()
                        .map_err(|_| invalid("fromSequence", "must be a sequence number"))?,
                );
            }
            "epoch" => asked.epoch = value.into_owned(),
            _ => {
                return Err(invalid(
                    "query",
                    format!(
                        "unknown query parameter {name:?}; this route takes filter, progressInterval, fromSequence and epoch"
                    ),
                ));
            }
        }
    }
    if asked.from_sequence.is_none()
        && asked.epoch.is_empty()
        && let Some(last) = headers.get("last-event-id")
    {
        let (epoch, sequence) = last
            .to_str()
            .ok()
            .and_then(|id| id.split_once(':'))
            .and_then(|(epoch, seq)| Some((epoch.to_owned(), seq.parse::<u64>().ok()?)))
            .ok_or_else(|| invalid("Last-Event-ID", "must be EPOCH:SEQUENCE, an event's id"))?;
        asked.epoch = epoch;
        asked.from_sequence = Some(sequence);
        asked.reconnect = true;
    }
    Ok(asked)
}

/// A watch message's place in its stream.
trait Event: prost::Message + Send + 'static {
    fn kind(&self) -> pb::WatchMessageType;
    fn epoch(&self) -> &str;
    fn sequence(&self) -> u64;
}

impl Event for pb::WatchServersResponse {
    fn kind(&self) -> pb::WatchMessageType {
        self.r#type()
    }
    fn epoch(&self) -> &str {
        &self.epoch
    }
    fn sequence(&self) -> u64 {
        self.sequence
    }
}

impl Event for pb::WatchSessionsResponse {
    fn kind(&self) -> pb::WatchMessageType {
        self.r#type()
    }
    fn epoch(&self) -> &str {
        &self.epoch
    }
    fn sequence(&self) -> u64 {
        self.sequence
    }
}

/// One event's bytes: `id`, `event`, and the JSON on `data` lines.
fn frame(kind: &str, id: Option<String>, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 64);
    if let Some(id) = id {
        out.extend_from_slice(format!("id: {id}\n").as_bytes());
    }
    out.extend_from_slice(format!("event: {kind}\n").as_bytes());
    // JSON printed compactly has no newline; split anyway, as SSE wants.
    for line in data.split(|b| *b == b'\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
    Bytes::from(out)
}

/// The event stream of `stream`, its messages printed as `output`.
fn events<R: Event>(stream: WatchStream<R>, output: MessageDescriptor, additions: bool) -> Body {
    let body = futures_util::stream::unfold(Some(stream), move |stream| {
        let output = output.clone();
        async move {
            let mut stream = stream?;
            let bytes = match stream.next().await? {
                Ok(message) => {
                    let id = format!("{}:{}", message.epoch(), message.sequence());
                    match json::encode_reply(&output, &message, additions) {
                        Ok(data) => {
                            let kind = message.kind().as_str_name();
                            return Some((
                                Ok(Frame::data(frame(kind, Some(id), &data))),
                                Some(stream),
                            ));
                        }
                        Err(e) => error_event(&e.into()),
                    }
                }
                Err(status) => error_event(&status),
            };
            // An error ends the stream.
            Some((Ok::<_, std::convert::Infallible>(Frame::data(bytes)), None))
        }
    });
    Body::new(http_body_util::StreamBody::new(body))
}

fn error_event(status: &Status) -> Bytes {
    // gRPC's name for the code, as grpcurl prints it: OUT_OF_RANGE.
    let mut code = String::new();
    for (i, c) in format!("{:?}", status.code()).chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            code.push('_');
        }
        code.push(c.to_ascii_uppercase());
    }
    let data = json!({"code": code, "message": status.message()});
    frame("error", None, data.to_string().as_bytes())
}

/// The stream's reply: 200, `text/event-stream`, never cached or buffered.
fn reply(body: Body) -> http::Response<Body> {
    let mut response = http::Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Proxies (nginx) otherwise hold events back in their buffers.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Starts the watch `asked` for through `call`, its request built by
/// `make` and carrying `parts`' headers and extensions (the caller's
/// identity, request id); once more from a snapshot when a reconnection's
/// point is gone.
async fn start<M, R, Fut>(
    asked: Asked,
    parts: &http::request::Parts,
    make: impl Fn(&Asked) -> M,
    call: impl Fn(tonic::Request<M>) -> Fut,
) -> Result<WatchStream<R>, Status>
where
    Fut: std::future::Future<Output = Result<tonic::Response<WatchStream<R>>, Status>>,
{
    let request = |asked: &Asked| {
        let mut request = http::Request::new(make(asked));
        *request.headers_mut() = parts.headers.clone();
        *request.extensions_mut() = parts.extensions.clone();
        tonic::Request::from_http(request)
    };
    let started = match call(request(&asked)).await {
        Err(s) if s.code() == Code::OutOfRange && asked.reconnect => {
            let fresh = Asked {
                from_sequence: None,
                epoch: String::new(),
                ..asked
            };
            call(request(&fresh)).await?
        }
        other => other?,
    };
    Ok(started.into_inner())
}

/// Serves a watch route: the stream, or the status that refused it.
pub async fn serve<B>(
    servers: &ServersApi,
    sessions: &SessionsApi,
    additions: bool,
    route: &'static Route,
    query: Option<&str>,
    request: http::Request<B>,
) -> Result<http::Response<Body>, Status> {
    let asked = asked(query, request.headers())?;
    let (_, output) = json::method_types(route)
        .ok_or_else(|| Status::internal(format!("{} has no method", route.path)))?;
    let (parts, _) = request.into_parts();
    let body = if route.grpc_path.ends_with("/WatchSessions") {
        let make = |a: &Asked| pb::WatchSessionsRequest {
            filters: a.filters.clone(),
            from_sequence: a.from_sequence,
            epoch: a.epoch.clone(),
            progress_interval: a.progress_interval,
        };
        let stream = start(asked, &parts, make, |r| sessions.watch_sessions(r)).await?;
        events(stream, output, additions)
    } else {
        let make = |a: &Asked| pb::WatchServersRequest {
            filters: a.filters.clone(),
            from_sequence: a.from_sequence,
            epoch: a.epoch.clone(),
            progress_interval: a.progress_interval,
        };
        let stream = start(asked, &parts, make, |r| servers.watch_servers(r)).await?;
        events(stream, output, additions)
    };
    Ok(reply(body))
}
