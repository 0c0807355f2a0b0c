//! The fleet's timeouts, lifetimes and placement settings.

use std::time::Duration;

use super::{holds::CapacityFloor, model::ImageFormat, sessions::PlacementStrategy};

/// Timeouts and lifetimes the fleet enforces.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// How often agents are asked to send heartbeats.
    pub heartbeat_interval: Duration,
    /// Silence after which a server is UNREACHABLE_AGENT.
    pub unreachable_after: Duration,
    /// Silence after which an open server is forgotten (closed ones never).
    pub remove_after: Duration,
    /// How long a DescribeServers or DescribeSessions page token stays
    /// valid.
    pub page_token_ttl: Duration,
    /// How the broker chooses among servers that can take a session.
    pub placement: PlacementStrategy,
    /// The most CreateSessions requests that may wait for a server (DCV's
    /// `create-sessions-queue-max-size`).
    pub queue_max_size: usize,
    /// How long a queued request waits before it fails (DCV's
    /// `create-sessions-queue-max-time-seconds`).
    pub queue_timeout: Duration,
    /// How long the broker waits for an agent to confirm a creation before
    /// it tries elsewhere.
    pub agent_timeout: Duration,
    /// How many other servers a failed creation is retried on (DCV's
    /// `create-sessions-number-of-retries-on-failure`).
    pub create_retries: u32,
    /// How long DELETED sessions stay visible in DescribeSessions.
    pub deleted_retention: Duration,
    /// How long a connection token admits its user.
    pub connection_token_ttl: Duration,
    /// Fleet events buffered for each slow subscriber before it lags.
    pub event_buffer: usize,
    /// Server changes kept for watchers to resume from (`--watch-buffer`).
    pub watch_buffer: usize,
    /// How long GetSessionScreenshots waits for agents' screenshots.
    pub screenshot_timeout: Duration,
    /// The screenshot width when a request gives none (DCV's
    /// `session-screenshot-max-width`).
    pub screenshot_max_width: u32,
    /// The screenshot height when a request gives none (DCV's
    /// `session-screenshot-max-height`).
    pub screenshot_max_height: u32,
    /// The encoding agents are asked for (DCV's
    /// `session-screenshot-format`).
    pub screenshot_format: ImageFormat,
    /// Pools' capacity floors (`--capacity-floor`).
    pub capacity_floors: Vec<CapacityFloor>,
    /// How long a `ClientToken`'s first reply is kept for retries
    /// (`--client-token-retention`).
    pub client_token_retention: Duration,
    /// The most `ClientToken` records kept at once (`--client-token-limit`).
    pub client_token_limit: usize,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            heartbeat_interval: Duration::from_secs(30),
            unreachable_after: Duration::from_secs(90),
            remove_after: Duration::from_secs(3600),
            page_token_ttl: Duration::from_secs(3600),
            placement: PlacementStrategy::Spread,
            queue_max_size: 1000,
            queue_timeout: Duration::from_secs(1800),
            agent_timeout: Duration::from_secs(30),
            create_retries: 2,
            deleted_retention: Duration::from_secs(3600),
            connection_token_ttl: Duration::from_secs(3600),
            event_buffer: 4096,
            watch_buffer: 10_000,
            screenshot_timeout: Duration::from_secs(10),
            screenshot_max_width: 160,
            screenshot_max_height: 100,
            screenshot_format: ImageFormat::Png,
            capacity_floors: Vec::new(),
            client_token_retention: super::client_tokens::DEFAULT_RETENTION,
            client_token_limit: super::client_tokens::DEFAULT_LIMIT,
        }
    }
}
