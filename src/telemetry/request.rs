//! The request a log event belongs to: its id and method, set for the
//! duration of each request by the request-id layer and appended to every
//! event logged while it runs, at any level.
//!
//! Why not a span: an INFO span per request was formatted and tracked by
//! tracing-subscriber whether or not anything was logged inside it, about
//! 9 µs of every request in the load benchmark. A tokio task-local costs a
//! swap of a thread-local slot per poll, and the id is only formatted when
//! an event is actually written.

use std::{cell::RefCell, fmt};

use tracing::{Event, Subscriber};
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};
use uuid::Uuid;

/// The request being served, as its log events name it.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The request id, as in the reply and the audit log.
    pub id: Uuid,
    /// The request's path: the gRPC method or the REST route. Kept as the
    /// request's own bytes (a reference count, not a copy).
    pub path: Option<http::uri::PathAndQuery>,
}

impl RequestContext {
    /// The method as logged: the path without its query.
    fn method(&self) -> &str {
        self.path.as_ref().map_or("", |p| p.path())
    }
}

tokio::task_local! {
    /// The request whose future is being polled, if any.
    pub static CURRENT: RequestContext;
}

/// How the request's fields are added to a formatted line.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// ` request_id=… method=…` before the line's end.
    Text,
    /// `,"request_id":"…","method":"…"` before the object's closing brace.
    Json,
}

/// A [`FormatEvent`] that writes the event as `inner` does and, inside a
/// request, adds the request's id and method.
pub struct WithRequest<F> {
    inner: F,
    shape: Shape,
}

impl<F> WithRequest<F> {
    /// Around tracing-subscriber's text format.
    pub fn text(inner: F) -> Self {
        WithRequest {
            inner,
            shape: Shape::Text,
        }
    }

    /// Around tracing-subscriber's JSON format.
    pub fn json(inner: F) -> Self {
        WithRequest {
            inner,
            shape: Shape::Json,
        }
    }
}

thread_local! {
    /// The line being formatted, reused: events are rare, but a busy
    /// broker's warnings should not allocate each.
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

impl<S, N, F> FormatEvent<S, N> for WithRequest<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Ok(request) = CURRENT.try_with(RequestContext::clone) else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut format = |line: &mut String| {
            line.clear();
            // The inner format's own ANSI setting applies (a plain
            // `Writer` has none of its own).
            self.inner.format_event(ctx, Writer::new(line), event)?;
            append(line, self.shape, &request);
            writer.write_str(line)
        };
        // A value's Display that logs would find the buffer taken.
        LINE.with(|line| match line.try_borrow_mut() {
            Ok(mut line) => format(&mut line),
            Err(_) => format(&mut String::new()),
        })
    }
}

/// Adds `request`'s fields to `line`, a whole formatted event.
fn append(line: &mut String, shape: Shape, request: &RequestContext) {
    use std::fmt::Write as _;
    let newline = line.ends_with('\n');
    if newline {
        line.pop();
    }
    match shape {
        Shape::Text => {
            let _ = write!(
                line,
                " request_id={} method={}",
                request.id,
                request.method()
            );
        }
        Shape::Json => {
            // Only a whole object is reopened; anything else is left as is.
            if line.ends_with('}') {
                line.pop();
                let method = serde_json::Value::from(request.method());
                let _ = write!(
                    line,
                    ",\"request_id\":\"{}\",\"method\":{method}}}",
                    request.id
                );
            }
        }
    }
    if newline {
        line.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RequestContext {
        RequestContext {
            id: Uuid::nil(),
            path: Some(http::uri::PathAndQuery::from_static("/a.B/C?x=y")),
        }
    }

    #[test]
    fn text_lines_end_with_the_request() {
        let mut line = "WARN x: refused a=1\n".to_owned();
        append(&mut line, Shape::Text, &request());
        assert_eq!(
            line,
            "WARN x: refused a=1 request_id=00000000-0000-0000-0000-000000000000 method=/a.B/C\n"
        );
    }

    #[test]
    fn json_objects_get_two_more_members() {
        let mut line = "{\"level\":\"WARN\"}\n".to_owned();
        append(&mut line, Shape::Json, &request());
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["request_id"], "00000000-0000-0000-0000-000000000000");
        assert_eq!(value["method"], "/a.B/C");
        assert_eq!(value["level"], "WARN");
    }
}
