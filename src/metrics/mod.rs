//! Prometheus metrics: what `GET /metrics` serves (Prometheus text, or
//! OpenMetrics when the scraper's `Accept` asks for it), on the broker's
//! port and optionally on a port of its own (`--metrics-listen`).
//!
//! Three kinds of numbers, each kept where it costs least:
//! - per request ([`rpc`]): a tower layer with every gRPC method's
//!   counters and histogram resolved once at start, so a request costs a
//!   hash lookup of its path, two clock reads and a few atomic adds;
//! - events deep in the broker (requests shed, rate-limited or too large,
//!   store commits, tokens): process-wide counters in [`COUNTERS`], which
//!   the limits, the store and the token endpoint bump whether or not
//!   anyone scrapes (an atomic add each);
//! - the fleet's shape, the replica's role and the process: read at
//!   scrape time ([`Fleet::gauges`], [`ClusterView::status`], `/proc`),
//!   so nothing is kept up to date between scrapes.
//!
//! Metrics are open like health: they reveal counts, never names.

mod listener;
mod process;
pub mod rpc;

use std::sync::{Arc, LazyLock, Weak};

use tokio::sync::Semaphore;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::Counter,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    cluster::{ClusterView, Role},
    fleet::{Fleet, Reason, SESSION_STATES},
};

pub use self::listener::serve_metrics;
pub use self::rpc::MetricsLayer;

/// Where the metrics are served.
pub const METRICS_PATH: &str = "/metrics";

/// Why a token request was refused, as `dcv_broker_tokens_refused_total`'s
/// `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// Unknown client, wrong secret, revoked client (HTTP 401).
    InvalidClient,
    /// A malformed request, an unsupported grant or a scope not granted
    /// (HTTP 400 and other 4xx).
    InvalidRequest,
    /// Too many requests, or too many failed secrets, from one address
    /// (HTTP 429).
    RateLimited,
    /// The secret checks were all busy (HTTP 503).
    Busy,
    /// The broker failed (HTTP 5xx).
    Internal,
}

impl TokenRefusal {
    const ALL: [TokenRefusal; 5] = [
        TokenRefusal::InvalidClient,
        TokenRefusal::InvalidRequest,
        TokenRefusal::RateLimited,
        TokenRefusal::Busy,
        TokenRefusal::Internal,
    ];

    fn label(self) -> &'static str {
        match self {
            TokenRefusal::InvalidClient => "invalid_client",
            TokenRefusal::InvalidRequest => "invalid_request",
            TokenRefusal::RateLimited => "rate_limited",
            TokenRefusal::Busy => "busy",
            TokenRefusal::Internal => "internal",
        }
    }

    /// The refusal an HTTP status of the token endpoint stands for.
    pub fn of_status(status: http::StatusCode) -> TokenRefusal {
        match status.as_u16() {
            401 => TokenRefusal::InvalidClient,
            429 => TokenRefusal::RateLimited,
            503 => TokenRefusal::Busy,
            500..=599 => TokenRefusal::Internal,
            _ => TokenRefusal::InvalidRequest,
        }
    }
}

/// The process-wide counters of events deep in the broker. Process-wide,
/// like neon's storage broker's: one broker per process in production,
/// and the limits, the store and the token endpoint then need no handle.
#[derive(Debug)]
pub struct Counters {
    /// Requests refused at once by the in-flight limit.
    pub shed: Counter,
    /// Requests refused by a client's rate.
    pub rate_limited: Counter,
    /// gRPC requests whose message was over the size limit (tonic's
    /// OUT_OF_RANGE from the length prefix).
    pub too_large_grpc: Counter,
    /// REST requests whose declared body length was over the limit (413).
    pub too_large_rest: Counter,
    /// Store commit latency, in seconds.
    pub store_commit_seconds: Histogram,
    /// Changes in each committed transaction.
    pub store_changes_per_commit: Histogram,
    /// Commits that failed (the store then stops the broker).
    pub store_commit_failures: Counter,
    /// Bearer tokens issued.
    pub tokens_issued: Counter,
    /// Token requests refused, by [`TokenRefusal`] in its `ALL` order.
    tokens_refused: [Counter; 5],
    /// WatchServers streams ended because the watcher fell behind.
    pub watchers_too_slow: Counter,
}

impl Counters {
    /// Counts one refused token request.
    pub fn token_refused(&self, why: TokenRefusal) {
        self.tokens_refused[why as usize].inc();
    }
}

/// The process-wide counters.
pub static COUNTERS: LazyLock<Counters> = LazyLock::new(|| Counters {
    shed: Counter::default(),
    rate_limited: Counter::default(),
    too_large_grpc: Counter::default(),
    too_large_rest: Counter::default(),
    // 100 µs to ~3 s: a group commit with fsync is a few ms on SSD.
    store_commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
    // 1 to 4096 (the writer's largest group of submissions).
    store_changes_per_commit: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
    store_commit_failures: Counter::default(),
    tokens_issued: Counter::default(),
    tokens_refused: Default::default(),
    watchers_too_slow: Counter::default(),
});

/// Every in-flight limit's slots (the main port's and the agents'), read
/// at scrape time: the limit itself keeps the count, so the requests pay
/// nothing more for the gauge.
static IN_FLIGHT: parking_lot::Mutex<Vec<(usize, Weak<Semaphore>)>> =
    parking_lot::Mutex::new(Vec::new());

/// Makes the requests holding `slots` (of `limit`) part of
/// `dcv_broker_requests_in_flight`, for as long as the slots live.
pub fn track_in_flight(limit: usize, slots: &Arc<Semaphore>) {
    let mut tracked = IN_FLIGHT.lock();
    tracked.retain(|(_, slots)| slots.strong_count() > 0);
    tracked.push((limit, Arc::downgrade(slots)));
}

/// Requests holding an in-flight slot now, across the live limits.
fn in_flight() -> u64 {
    let mut tracked = IN_FLIGHT.lock();
    tracked.retain(|(_, slots)| slots.strong_count() > 0);
    tracked
        .iter()
        .filter_map(|(limit, slots)| {
            Some(limit.saturating_sub(slots.upgrade()?.available_permits()))
        })
        .sum::<usize>() as u64
}

/// One broker's metrics: the registry `/metrics` encodes and the request
/// layer's method table.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rpc: Arc<rpc::Table>,
}

impl Metrics {
    /// The metrics of a broker serving `fleet`, whose role among replicas
    /// `cluster` tells.
    pub fn new(fleet: Fleet, cluster: ClusterView) -> Arc<Metrics> {
        let rpc = Arc::new(rpc::Table::new());
        let mut registry = Registry::default();
        let c = &*COUNTERS;
        registry.register(
            "dcv_broker_requests_shed",
            "Requests refused at once because too many were in flight (load shedding)",
            c.shed.clone(),
        );
        registry.register(
            "dcv_broker_requests_rate_limited",
            "Requests refused because their client was over its rate",
            c.rate_limited.clone(),
        );
        registry.register(
            "dcv_broker_store_commit_seconds",
            "Time to commit one transaction of the store (a group of submissions)",
            c.store_commit_seconds.clone(),
        );
        registry.register(
            "dcv_broker_store_changes_per_commit",
            "Changes written by each committed transaction",
            c.store_changes_per_commit.clone(),
        );
        registry.register(
            "dcv_broker_store_commit_failures",
            "Store commits that failed (the broker stops after one)",
            c.store_commit_failures.clone(),
        );
        registry.register(
            "dcv_broker_tokens_issued",
            "Bearer tokens issued by POST /oauth2/token",
            c.tokens_issued.clone(),
        );
        registry.register(
            "dcv_broker_watchers_too_slow",
            "WatchServers streams ended RESOURCE_EXHAUSTED because the watcher fell behind",
            c.watchers_too_slow.clone(),
        );
        registry.register_collector(Box::new(Scraped {
            fleet,
            cluster,
            rpc: rpc.clone(),
        }));
        Arc::new(Metrics { registry, rpc })
    }

    /// The layer that counts every request of a port.
    pub fn layer(&self) -> MetricsLayer {
        MetricsLayer::new(self.rpc.clone())
    }

    /// Every metric now: OpenMetrics text (ending in `# EOF`) when
    /// `openmetrics`, else Prometheus text format 0.0.4.
    pub fn encode(&self, openmetrics: bool) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let encoded = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        };
        if let Err(e) = encoded {
            // Writing to a String cannot fail; a collector that does is a bug.
            tracing::error!(error = %e, "encoding the metrics failed");
        }
        out
    }

    /// The reply to `GET /metrics`: the format `accept` asks for
    /// (OpenMetrics if it names `application/openmetrics-text`), never
    /// cached.
    pub fn reply(&self, accept: Option<&http::HeaderValue>, head: bool) -> http::Response<String> {
        let openmetrics = accept
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.contains("application/openmetrics-text"));
        let body = self.encode(openmetrics);
        let content_type = if openmetrics {
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        } else {
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE
        };
        let length = body.len();
        let mut response = http::Response::new(if head { String::new() } else { body });
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        headers.insert(http::header::CONTENT_LENGTH, length.into());
        headers.insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        response
    }
}

/// What is read at scrape time: the fleet, the replica, the process,
/// the per-method table and the counters kept in arrays.
#[derive(Debug)]
struct Scraped {
    fleet: Fleet,
    cluster: ClusterView,
    rpc: Arc<rpc::Table>,
}

/// Encodes a family of gauges, one per label set.
fn gauges<'a>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = ([(&'static str, &'a str); 1], i64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in values {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes one unlabelled gauge.
fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: impl prometheus_client::encoding::EncodeGaugeValue + Clone + std::fmt::Debug,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn saturating(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.rpc.encode(&mut encoder)?;

        let c = &*COUNTERS;
        let mut refused = encoder.encode_descriptor(
            "dcv_broker_tokens_refused",
            "Token requests refused, by reason",
            None,
            MetricType::Counter,
        )?;
        for why in TokenRefusal::ALL {
            c.tokens_refused[why as usize]
                .encode(refused.encode_family(&[("reason", why.label())])?)?;
        }
        let mut too_large = encoder.encode_descriptor(
            "dcv_broker_requests_too_large",
            "Requests refused for their size: a gRPC message over --max-request-bytes \
             (OUT_OF_RANGE) or a REST body declared over it (HTTP 413)",
            None,
            MetricType::Counter,
        )?;
        c.too_large_grpc
            .encode(too_large.encode_family(&[("protocol", "grpc")])?)?;
        c.too_large_rest
            .encode(too_large.encode_family(&[("protocol", "rest")])?)?;

        gauge(
            &mut encoder,
            "dcv_broker_requests_in_flight",
            "Requests holding a slot of the in-flight limit (a stream frees its slot once it starts)",
            saturating(in_flight()),
        )?;
        let fleet = self.fleet.gauges();
        gauge(
            &mut encoder,
            "dcv_broker_servers_available",
            "Servers that can take a new session",
            saturating(fleet.available),
        )?;
        gauges(
            &mut encoder,
            "dcv_broker_servers_unavailable",
            "Servers that cannot take a new session, by each reason that applies \
             (a server with two reasons counts under both)",
            Reason::ALL.iter().map(|r| {
                (
                    [("reason", r.as_str())],
                    saturating(fleet.unavailable[*r as usize]),
                )
            }),
        )?;
        gauge(
            &mut encoder,
            "dcv_broker_servers_closed",
            "Servers with at least one hold",
            saturating(fleet.closed),
        )?;
        gauge(
            &mut encoder,
            "dcv_broker_holds",
            "Holds on all servers",
            saturating(fleet.holds),
        )?;
        gauges(
            &mut encoder,
            "dcv_broker_sessions",
            "Sessions the broker knows, by state",
            SESSION_STATES
                .iter()
                .zip(fleet.sessions)
                .map(|(state, n)| ([("state", *state)], saturating(n))),
        )?;
        gauge(
            &mut encoder,
            "dcv_broker_queue_length",
            "Session requests waiting in the queue",
            saturating(fleet.queued),
        )?;
        gauge(
            &mut encoder,
            "dcv_broker_queue_oldest_age_seconds",
            "How long the oldest queued session request has waited (0: none)",
            fleet.oldest_queued.as_secs_f64(),
        )?;
        gauge(
            &mut encoder,
            "dcv_broker_agents_connected",
            "Agents with an open instruction stream",
            saturating(fleet.agents_connected),
        )?;
        gauge(
            &mut encoder,
            "dcv_broker_watchers",
            "WatchServers streams open",
            saturating(self.fleet.watchers() as u64),
        )?;
        gauge(
            &mut encoder,
            "dcv_broker_watch_sequence",
            "The sequence number of the last server change published to watchers (0 before the first watcher)",
            saturating(self.fleet.watch_sequence()),
        )?;
        gauge(
            &mut encoder,
            "dcv_broker_instructions_in_flight",
            "Instructions sent to agents and not yet answered (creations and deletions)",
            saturating(fleet.instructions_in_flight),
        )?;
        let p = fleet.placements;
        prometheus_client::metrics::counter::ConstCounter::new(p.placed).encode(
            encoder.encode_descriptor(
                "dcv_broker_placements",
                "Sessions handed to a server's agent to create, retries included",
                None,
                MetricType::Counter,
            )?,
        )?;
        let mut failures = encoder.encode_descriptor(
            "dcv_broker_placement_failures",
            "Session requests or attempts that found no server: no_server (nothing fits, \
             not queued), queue_full, agent_failed (the agent failed or did not answer)",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in [
            ("no_server", p.no_server),
            ("queue_full", p.queue_full),
            ("agent_failed", p.agent_failed),
        ] {
            prometheus_client::metrics::counter::ConstCounter::new(n)
                .encode(failures.encode_family(&[("reason", reason)])?)?;
        }

        let status = self.cluster.status();
        gauge(
            &mut encoder,
            "dcv_broker_cluster_leader",
            "1 while this broker leads (a single broker always does)",
            i64::from(status.role == Role::Leader),
        )?;
        gauge(
            &mut encoder,
            "dcv_broker_cluster_applied_sequence",
            "The change-log position this replica's memory reflects",
            saturating(status.applied_seq),
        )?;
        gauge(
            &mut encoder,
            "dcv_broker_cluster_lag_seconds",
            "How far behind its commit the last applied change was applied (0 on the leader)",
            status.lag.as_secs_f64(),
        )?;

        let mut info = encoder.encode_descriptor(
            "dcv_broker_build",
            "The broker's version",
            None,
            MetricType::Info,
        )?;
        info.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;
        process::encode(&mut encoder)
    }
}
