//! Limits against abuse: what one request, one connection or one client
//! may cost the broker, gathered in one place ([`Limits`]), each with its
//! default and why, and the tower layers that enforce the per-request ones.
//!
//! Who enforces what:
//! - message sizes: tonic, per service (`server::serve` passes
//!   [`Limits::max_request_bytes`] and [`Limits::max_response_bytes`]);
//! - HTTP/2 limits (streams per connection, header list size, reset-stream
//!   floods): hyper and h2, configured by [`Limits::http2`];
//! - a per-client request rate: [`ClientRateLayer`], a token bucket per
//!   client answering `RESOURCE_EXHAUSTED` with `google.rpc.RetryInfo`;
//! - a global concurrency limit: [`InFlightLimitLayer`], which refuses a
//!   request at once with `RESOURCE_EXHAUSTED` when the broker already
//!   handles `max_concurrent_requests` of them (load shedding: overload
//!   shows as fast errors, never as an unbounded queue);
//! - the token endpoint's own budget (requests queued for a secret check,
//!   how long they wait, failed secrets per address): `api::oauth`,
//!   answering HTTP 503 or 429 with `Retry-After`, never a gRPC slot;
//! - the request timeout: tonic (`BrokerConfig::request_timeout`);
//! - batch sizes and string lengths: the domain ([`crate::fleet`]), item by
//!   item, with typed failure codes.
//!
//! Health checks are never shed nor rate limited, so probes see the
//! broker's real state; reflection is not rate limited either (grpcurl
//! asks for it before every call), but it counts against the concurrency
//! limit.

mod in_flight;
mod rate;

use std::{
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
    time::Duration,
};

use tonic::{Code, Status, transport::Server};

pub use self::{
    in_flight::{InFlightLimit, InFlightLimitLayer},
    rate::{ClientRateLayer, ClientRateLimit, RateTable},
};

/// Every limit the broker enforces against abusive or broken clients,
/// apart from the request timeout (`BrokerConfig::request_timeout`) and
/// the domain's own bounds on batches and strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The largest request message decoded, in bytes. A full CloseServers
    /// batch (1000 ids of up to 256 bytes, each with a 1024-character
    /// reason) stays under 5 MiB; anything bigger is not a request we
    /// serve. tonic refuses it from its length prefix (`OUT_OF_RANGE`),
    /// before buffering it.
    pub max_request_bytes: usize,
    /// The largest response message sent, in bytes. A DescribeServers page
    /// of 1000 servers with rich host descriptions is a few MiB; the cap
    /// guards against a pathological page rather than limiting normal
    /// ones. Clients whose default receive limit is 4 MiB (grpc-go, tonic)
    /// may lower MaxResults.
    pub max_response_bytes: usize,
    /// Requests handled at once across all connections (`None`: no limit);
    /// one more is refused at once with `RESOURCE_EXHAUSTED`. The store
    /// benchmark (BENCHMARKS.md) gets its best throughput at 64 in flight
    /// on 2 cores; 256 leaves room for bigger machines and for requests
    /// waiting on the disk. Each admitted request may buffer up to
    /// `max_request_bytes`, so this also bounds that memory.
    pub max_concurrent_requests: Option<usize>,
    /// Each client's request rate (`None`: no limit). Keeps one runaway
    /// client from taking the broker from everyone else.
    pub client_rate: Option<ClientRate>,
    /// The most clients the rate limiter remembers. Clients whose bucket
    /// is full again are forgotten when room is needed; beyond this many
    /// active clients, new ones share one bucket. Bounds the table's
    /// memory (about 50 bytes a client) whatever the number of addresses.
    pub max_tracked_clients: usize,
    /// HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE: the most bytes of metadata
    /// (headers) per request, counting 32 bytes per entry as HTTP/2 does.
    /// Real requests carry a few hundred bytes (a bearer token adds a few
    /// KiB); this also caps a request at about 500 entries. Over it, h2
    /// refuses the request before any handler runs: HTTP 431 on that
    /// stream, or, when the encoded header block alone is over it, GOAWAY
    /// (COMPRESSION_ERROR) for the connection, h2's defence against
    /// CONTINUATION floods.
    pub max_header_list_bytes: u32,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: requests open at once on one
    /// connection. Bounds what one connection can hold open (agents'
    /// instruction streams included); clients queue beyond it. RFC 9113
    /// advises at least 100.
    pub max_concurrent_streams: u32,
    /// Streams a client may open and reset before the server accepted
    /// them, per connection; one more and the connection is closed
    /// (GOAWAY, ENHANCE_YOUR_CALM). This is the defence against "rapid
    /// reset" floods (CVE-2023-44487), which open and cancel streams
    /// faster than any stream limit can see them.
    pub max_pending_accept_reset_streams: usize,
    /// Streams the server may reset because of the client's protocol
    /// errors, per connection, before it closes the connection. The
    /// defence against "MadeYouReset" (CVE-2025-8671), where a client
    /// provokes the resets instead of sending them.
    pub max_local_error_reset_streams: usize,
    /// Token requests (`POST /oauth2/token`) waiting for or running their
    /// secret check at once; one more is answered at once with HTTP 503
    /// and `Retry-After`. Token requests have this budget of their own,
    /// outside `max_concurrent_requests`, so that a token flood never
    /// takes a slot from a gRPC caller. Only two secrets are hashed at a
    /// time (tens of ms each): 16 waiting clear in well under a second,
    /// and a longer queue would only add latency.
    pub max_token_requests: usize,
    /// Longest a token request waits for its secret check (queueing and
    /// hashing) before it is answered HTTP 503 with `Retry-After`.
    pub token_wait: Duration,
    /// Each address's rate of token requests with a wrong secret or an
    /// unknown client (`None`: no limit). Past it, the address's token
    /// requests are answered HTTP 429 with `Retry-After` before any
    /// hashing, so guessing costs the broker nothing. Legitimate clients
    /// fail a few times at most; the address's requests stay subject to
    /// `client_rate` too.
    pub failed_secret_rate: Option<ClientRate>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 8 * 1024 * 1024,
            max_response_bytes: 64 * 1024 * 1024,
            max_concurrent_requests: Some(256),
            client_rate: ClientRate::new(200, 400),
            max_tracked_clients: 100_000,
            // hyper's default, set explicitly so it is visible and tested.
            max_header_list_bytes: 16 * 1024,
            // hyper's default; tonic's builder replaces it with "no limit"
            // unless it is set.
            max_concurrent_streams: 200,
            // h2's default.
            max_pending_accept_reset_streams: 20,
            // h2's default; tonic's builder turns the check off unless it
            // is set.
            max_local_error_reset_streams: 1024,
            max_token_requests: 16,
            token_wait: Duration::from_secs(2),
            // One guess a second after a burst of ten: a mistyped secret
            // retried by hand never meets it.
            failed_secret_rate: ClientRate::new(1, 10),
        }
    }
}

impl Limits {
    /// Applies the HTTP/2 limits to a server builder.
    pub fn http2(&self, server: Server) -> Server {
        server
            // Bounds the streams one connection holds open at once. Left
            // unset, tonic tells hyper "no limit", not hyper's default.
            .max_concurrent_streams(self.max_concurrent_streams)
            // Bounds metadata per request: thousands of entries are
            // refused by h2 before they reach a handler.
            .http2_max_header_list_size(self.max_header_list_bytes)
            // Rapid reset (CVE-2023-44487): a client opening and cancelling
            // streams faster than they are accepted gets a GOAWAY. Unlike
            // qdrant's internal port, which raises this to 1024 because its
            // trusted peers drop many streams, ours faces any client: keep
            // h2's low default.
            .http2_max_pending_accept_reset_streams(Some(self.max_pending_accept_reset_streams))
            // MadeYouReset (CVE-2025-8671): tonic passes "none" to h2 unless
            // this is set, which turns h2's protection off.
            .http2_max_local_error_reset_streams(Some(self.max_local_error_reset_streams))
    }
}

/// A per-client request rate: a token bucket of `burst` tokens refilled
/// at `per_second` tokens a second; every request takes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientRate {
    /// Requests a second a client may sustain.
    pub per_second: NonZeroU32,
    /// Requests a client may make at once after being idle.
    pub burst: NonZeroU32,
}

impl ClientRate {
    /// The rate `per_second` with bucket size `burst`; `None` if either is
    /// zero.
    pub fn new(per_second: u32, burst: u32) -> Option<ClientRate> {
        Some(ClientRate {
            per_second: NonZeroU32::new(per_second)?,
            burst: NonZeroU32::new(burst)?,
        })
    }
}

/// Who a request counts against for its rate: the authenticated client
/// id, or for a caller without credentials (the token endpoint, open
/// services, a broker without authentication) the peer's IP address. An
/// IPv6 peer counts as its /64 network, which one host or customer usually
/// holds whole. Behind a proxy every unauthenticated request comes from
/// the proxy's address: all of them are one client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// An authenticated client, by its id.
    Client(std::sync::Arc<str>),
    /// An unauthenticated caller, by its address (a /64 for IPv6);
    /// `None` off TCP.
    Peer(Option<IpAddr>),
}

impl ClientKey {
    /// The client of a request: its client id once authentication has
    /// run, else its address from the connection information tonic puts
    /// in its extensions. A request without either counts against one
    /// shared "unknown" client, never against nobody.
    pub fn of(extensions: &http::Extensions) -> ClientKey {
        if let Some(principal) = extensions.get::<crate::auth::Principal>() {
            return ClientKey::Client(principal.client_id.clone());
        }
        let ip = crate::transport::peer_addr(extensions).map(|addr| addr.ip());
        ClientKey::from_ip(ip)
    }

    /// The client an address counts as.
    pub fn from_ip(ip: Option<IpAddr>) -> ClientKey {
        ClientKey::Peer(ip.map(|ip| match ip.to_canonical() {
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
            v4 => v4,
        }))
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::Client(id) => write!(f, "client {id}"),
            ClientKey::Peer(Some(IpAddr::V6(net))) => write!(f, "{net}/64"),
            ClientKey::Peer(Some(ip)) => write!(f, "{ip}"),
            ClientKey::Peer(None) => f.write_str("an unknown peer"),
        }
    }
}

/// A complete gRPC reply (HTTP 200, `grpc-status` in the headers) for a
/// refused request.
fn refusal(status: Status) -> http::Response<tonic::body::Body> {
    debug_assert_eq!(status.code(), Code::ResourceExhausted);
    status.into_http()
}

/// Whether the `n`th refusal is one to log at WARN: the 1st, 2nd, 4th,
/// 8th, ..., so that a flood is visible without flooding the log.
pub(crate) fn worth_a_warning(n: u64) -> bool {
    n.is_power_of_two()
}

/// How long `d` is, for messages: milliseconds, rounded up.
fn millis_up(d: Duration) -> u128 {
    d.as_nanos().div_ceil(1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_addresses_and_ipv6_networks() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(
            ClientKey::from_ip(Some(mapped)),
            ClientKey::from_ip(Some(v4))
        );
        assert_eq!(ClientKey::from_ip(Some(v4)).to_string(), "192.0.2.7");

        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ClientKey::from_ip(Some(a)), ClientKey::from_ip(Some(b)));
        assert_ne!(ClientKey::from_ip(Some(a)), ClientKey::from_ip(Some(other)));
        assert_eq!(ClientKey::from_ip(Some(a)).to_string(), "2001:db8:1:2::/64");
        assert_eq!(ClientKey::from_ip(None).to_string(), "an unknown peer");
    }

    #[test]
    fn defaults_are_sane() {
        let limits = Limits::default();
        let rate = limits.client_rate.unwrap();
        assert!(rate.burst.get() >= rate.per_second.get());
        assert!(limits.max_concurrent_streams >= 100, "RFC 9113's advice");
        assert!(limits.max_request_bytes <= limits.max_response_bytes);
        let failed = limits.failed_secret_rate.unwrap();
        assert!(
            failed.per_second < rate.per_second && failed.burst < rate.burst,
            "failed secrets are held to a stricter rate than requests"
        );
        assert!(limits.max_token_requests >= 1);
        assert!(
            limits.token_wait < Duration::from_secs(5),
            "under auth's own queue wait"
        );
        assert_eq!(ClientRate::new(0, 5), None);
        assert_eq!(ClientRate::new(5, 0), None);
    }

    #[test]
    fn warnings_thin_out() {
        let warned: Vec<u64> = (1..=20).filter(|n| worth_a_warning(*n)).collect();
        assert_eq!(warned, [1, 2, 4, 8, 16]);
    }
}
