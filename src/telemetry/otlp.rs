//! OpenTelemetry traces over OTLP/gRPC (`--otlp-endpoint`): the spans of
//! target [`TRACE_TARGET`] (the RPC, placement, the store commit, the
//! agent round trip), exported in batches, each RPC under the caller's
//! W3C `traceparent` when it sends one.
//!
//! Off by default, and then free: no layer is installed and the log
//! filter always turns [`TRACE_TARGET`] off, so its spans' call sites are
//! disabled once, when first seen, and never build a span.

use std::time::Duration;

use opentelemetry::{
    propagation::{Extractor, TextMapPropagator as _},
    trace::TracerProvider as _,
};
use opentelemetry_otlp::{SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{Layer, filter::Targets, registry::LookupSpan};

/// The target of every span exported over OTLP, and of nothing else.
pub const TRACE_TARGET: &str = "dcv_broker_trace";

/// How long one export may take before it is given up: a collector that
/// hangs must not hold spans (and memory) for long.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for the last spans to reach the collector: a
/// collector that is gone must not hold the broker's exit for long.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(5);

/// The exporter while it runs; [`Exporter::shutdown`] flushes it.
#[derive(Debug, Clone)]
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Starts exporting to `endpoint` (`http://HOST:PORT`, a collector's
    /// OTLP/gRPC port). Must run inside the tokio runtime, which carries
    /// the exporter's connection; nothing is sent before the first batch.
    pub fn start(endpoint: &str) -> Result<Exporter, String> {
        let exporter = SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("OTLP endpoint {endpoint}: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder()
                    .with_service_name("dcv-broker")
                    .with_attribute(opentelemetry::KeyValue::new(
                        "service.version",
                        env!("CARGO_PKG_VERSION"),
                    ))
                    .build(),
            )
            .build();
        Ok(Exporter { provider })
    }

    /// The tracing layer that turns [`TRACE_TARGET`]'s spans into
    /// OpenTelemetry spans for this exporter, and sees nothing else.
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync + 'static,
    {
        let tracer = self.provider.tracer("dcv-broker");
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            // Events are the log's; only the spans are exported.
            .with_location(false)
            .with_threads(false)
            .with_filter(Targets::new().with_target(TRACE_TARGET, tracing::Level::TRACE))
    }

    /// Sends the spans not yet sent and stops, waiting at most
    /// [`FLUSH_DEADLINE`]. Blocks: call it off the runtime's workers.
    pub fn shutdown(&self) -> Result<(), String> {
        self.provider
            .shutdown_with_timeout(FLUSH_DEADLINE)
            .map_err(|e| format!("OTLP: the last spans may be lost: {e}"))
    }
}

/// Makes `span` (a [`TRACE_TARGET`] span) a child of the trace the
/// caller named in its W3C `traceparent` (and `tracestate`) header, if it
/// sent a valid one. gRPC metadata and REST headers are the same HTTP
/// headers.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    // Fails only for a span no OpenTelemetry layer sees: then nothing is
    // exported anyway.
    let _ = span.set_parent(parent);
}

/// The propagator's view of a request's headers.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}
