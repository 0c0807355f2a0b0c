//! Logging: human-readable lines by default, JSON on request, filtered by
//! `--log` (a bare level for the broker's own events, or tracing's
//! EnvFilter syntax) or RUST_LOG. Logs go to stderr; stdout is kept for the
//! one line that says where the broker listens.

pub mod otlp;
pub mod request;

use clap::ValueEnum;
use tracing::Subscriber;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::LevelFilter,
    fmt::{self as formatter, format::JsonFields},
    layer::SubscriberExt as _,
    registry::LookupSpan,
    util::SubscriberInitExt as _,
};

use self::request::WithRequest;

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// The target of every event of the broker's own code (library and
/// binary): what a bare `--log debug` makes verbose.
const BROKER_TARGET: &str = "dcv_broker";
/// The most verbose level of libraries' events (h2, hyper, tonic, rustls)
/// under a bare `--log` level (default info): their debug output is about
/// ten HTTP/2 frame lines per request, which drown the broker's own.
const LIBRARY_CEILING: LevelFilter = LevelFilter::INFO;

/// The EnvFilter directives for `--log` (`log`) or, when it is not given,
/// RUST_LOG (`rust_log`). A bare level more verbose than
/// [`LIBRARY_CEILING`] applies to the broker's targets only; anything else
/// is a directive taken as is, so that `debug,h2=trace` or RUST_LOG still
/// give full control.
pub fn directives(log: Option<&str>, rust_log: Option<&str>) -> String {
    let log = match (log, rust_log) {
        (Some(log), _) => log,
        (None, Some(rust_log)) if !rust_log.trim().is_empty() => return rust_log.to_owned(),
        (None, _) => "info",
    };
    match log.trim().parse::<LevelFilter>() {
        Ok(level) if level > LIBRARY_CEILING => {
            format!("{LIBRARY_CEILING},{BROKER_TARGET}={level}")
        }
        _ => log.to_owned(),
    }
}

/// Installs the global subscriber.
pub fn init(format: LogFormat, filter: &str) -> Result<(), String> {
    init_exporting(format, filter, None)
}

/// Installs the global subscriber, with `otlp`'s layer when traces are
/// exported.
pub fn init_exporting(
    format: LogFormat,
    filter: &str,
    otlp: Option<&otlp::Exporter>,
) -> Result<(), String> {
    let env_filter = log_filter(filter)?;
    // Colour codes only help a person at a terminal; in files and pipes
    // they are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry();
    let result = match otlp {
        // The filter for the whole subscriber, as before traces existed.
        None => registry
            .with(env_filter)
            .with(log_layer(format, ansi))
            .try_init(),
        // The filter for the log only: the exporter's layer filters its own.
        Some(otlp) => registry
            .with(log_layer(format, ansi).with_filter(env_filter))
            .with(otlp.layer())
            .try_init(),
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))
}

/// The log's filter of `directives`. The exported spans are never the
/// log's, whatever the directives say; without an exporter this disables
/// them at their call sites.
fn log_filter(directives: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(format!("{directives},{}=off", otlp::TRACE_TARGET))
        .map_err(|e| format!("invalid log filter {directives:?}: {e}"))
}

/// The layer writing log lines on stderr. Both formats add the request's
/// id and method to events logged while a request is served (`request`).
fn log_layer<S>(format: LogFormat, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let layer = formatter::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => layer
            .with_ansi(ansi)
            .event_format(WithRequest::text(formatter::format().with_ansi(ansi)))
            .boxed(),
        LogFormat::Json => layer
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(WithRequest::json(formatter::format().json()))
            .boxed(),
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::{directives, log_filter, otlp::TRACE_TARGET};

    #[test]
    fn without_an_exporter_no_trace_span_is_ever_built() {
        for filter in ["info", "info,dcv_broker=trace", "trace", "warn"] {
            let subscriber = tracing_subscriber::registry().with(log_filter(filter).unwrap());
            tracing::subscriber::with_default(subscriber, || {
                let span = tracing::info_span!(target: TRACE_TARGET, "placement");
                assert!(span.is_disabled(), "{filter}");
                let span = tracing::error_span!(target: "dcv_broker::x", "other");
                assert!(!span.is_disabled(), "{filter}");
            });
        }
    }

    #[test]
    fn a_bare_level_is_the_brokers_and_a_directive_is_taken_as_is() {
        assert_eq!(directives(None, None), "info");
        assert_eq!(directives(Some("info"), None), "info");
        assert_eq!(directives(Some("warn"), None), "warn");
        assert_eq!(directives(Some("debug"), None), "info,dcv_broker=debug");
        assert_eq!(directives(Some("TRACE"), None), "info,dcv_broker=trace");
        assert_eq!(directives(Some("debug,h2=trace"), None), "debug,h2=trace");
        assert_eq!(directives(Some("h2=debug"), None), "h2=debug");
        // RUST_LOG is taken as is, but only without the flag.
        assert_eq!(directives(None, Some("debug")), "debug");
        assert_eq!(
            directives(Some("debug"), Some("trace")),
            "info,dcv_broker=debug"
        );
        assert_eq!(directives(None, Some(" ")), "info");
    }
}
