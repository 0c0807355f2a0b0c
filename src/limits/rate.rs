//! The per-client request rate: a token bucket per client ([`ClientKey`]),
//! kept as GCRA (one "theoretical arrival time" per client, no background
//! refill). A request over the rate is answered at once with
//! `RESOURCE_EXHAUSTED` and `google.rpc.RetryInfo` giving the time until
//! the client's next token.
//!
//! The table is bounded: when it holds `max_tracked_clients` entries, the
//! clients whose bucket has refilled (idle ones, indistinguishable from
//! new ones) are dropped, at most once per bucket-refill time; if every
//! entry is still active, further new clients share one overflow bucket.
//! So a flood from many addresses costs bounded memory and is still
//! limited as a whole. Keys are hashed with std's SipHash, which an
//! attacker cannot aim collisions at.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use tokio::time::Instant;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use super::{ClientKey, ClientRate, millis_up, refusal, worth_a_warning};
use crate::layer::{Policy, PolicyLayer, PolicyService, Verdict};
use crate::transport::{is_health, is_reflection};

/// Every client's bucket.
#[derive(Debug)]
pub struct RateTable {
    rate: ClientRate,
    /// Time to earn one token.
    interval: Duration,
    /// Time to earn a full bucket: how far past now a client's arrival
    /// time may run.
    span: Duration,
    max_clients: usize,
    state: Mutex<TableState>,
}

#[derive(Debug)]
struct TableState {
    /// Each client's theoretical arrival time: when its bucket is full
    /// again. At or before now: full.
    clients: HashMap<ClientKey, Instant>,
    /// The bucket new clients share while the table is full of active ones.
    overflow: Instant,
    /// The earliest time idle clients are looked for again.
    next_sweep: Instant,
}

impl RateTable {
    /// A table giving each client `rate`, remembering at most
    /// `max_clients` of them.
    pub fn new(rate: ClientRate, max_clients: usize) -> RateTable {
        let interval = Duration::from_secs(1) / rate.per_second.get();
        let now = Instant::now();
        RateTable {
            rate,
            interval,
            span: interval * rate.burst.get(),
            max_clients: max_clients.max(1),
            state: Mutex::new(TableState {
                clients: HashMap::new(),
                overflow: now,
                next_sweep: now,
            }),
        }
    }

    /// Takes one of `client`'s tokens at `now`, or says how long until it
    /// has one.
    pub fn admit(&self, client: &ClientKey, now: Instant) -> Result<(), Duration> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let known = state.clients.contains_key(client);
        if !known && state.clients.len() >= self.max_clients && now >= state.next_sweep {
            state.clients.retain(|_, full_at| *full_at > now);
            // Nothing becomes idle faster than a bucket refills; a floor
            // keeps tiny buckets from making every request sweep.
            state.next_sweep = now + self.span.max(Duration::from_secs(1));
        }
        let full_at = if known || state.clients.len() < self.max_clients {
            state.clients.entry(client.clone()).or_insert(now)
        } else {
            &mut state.overflow
        };
        let next = (*full_at).max(now) + self.interval;
        let ahead = next - now;
        if ahead > self.span {
            return Err(ahead - self.span);
        }
        *full_at = next;
        Ok(())
    }

    /// Gives back a token [`RateTable::admit`] took from `client` at
    /// `now`, for rates charged in advance and refunded when the request
    /// turns out not to count (a secret that was right after all).
    pub fn refund(&self, client: &ClientKey, now: Instant) {
        let mut state = self.state.lock();
        if let Some(full_at) = state.clients.get_mut(client) {
            *full_at = full_at.checked_sub(self.interval).unwrap_or(now).max(now);
        }
    }

    /// How many clients the table remembers.
    pub fn tracked(&self) -> usize {
        self.state.lock().clients.len()
    }
}

/// Limits each client to its rate. Health checks and reflection are
/// exempt.
pub type ClientRateLayer = PolicyLayer<ClientRatePolicy>;

/// The service [`ClientRateLayer`] wraps around the routes.
pub type ClientRateLimit<S> = PolicyService<ClientRatePolicy, S>;

/// The policy of [`ClientRateLayer`]: every client's bucket.
#[derive(Debug, Clone)]
pub struct ClientRatePolicy {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    table: RateTable,
    refused: AtomicU64,
}

impl ClientRateLayer {
    /// A layer giving each client `rate`, remembering at most
    /// `max_clients` clients. (No rate: no layer, see `server::run`.)
    pub fn new(rate: ClientRate, max_clients: usize) -> Self {
        PolicyLayer::of(ClientRatePolicy {
            shared: Arc::new(Shared {
                table: RateTable::new(rate, max_clients),
                refused: AtomicU64::new(0),
            }),
        })
    }
}

impl<B> Policy<B> for ClientRatePolicy {
    type Hold = ();

    fn check<E: Send + 'static>(&self, request: http::Request<B>) -> Verdict<B, (), E> {
        let shared = &self.shared;
        let path = request.uri().path();
        if is_health(path) || is_reflection(path) {
            return Verdict::Pass(request, ());
        }
        let client = ClientKey::of(request.extensions());
        let Err(wait) = shared.table.admit(&client, Instant::now()) else {
            return Verdict::Pass(request, ());
        };
        let rate = shared.table.rate;
        crate::metrics::COUNTERS.rate_limited.inc();
        let refused = shared.refused.fetch_add(1, Ordering::Relaxed) + 1;
        // Logged inside the request's span (the future runs in it).
        Verdict::Later(Box::pin(async move {
            if worth_a_warning(refused) {
                tracing::warn!(%client, refused, "client over its request rate");
            } else {
                tracing::debug!(%client, "request over the client's rate");
            }
            let message = format!(
                "too many requests from {client}: the limit is {} a second (bursts of {}); \
                 retry in {} ms",
                rate.per_second,
                rate.burst,
                millis_up(wait)
            );
            Ok(refusal(Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(wait)),
            )))
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, net::IpAddr};

    use tonic::body::Body;
    use tonic_types::StatusExt as _;
    use tower::{Layer as _, ServiceExt as _};

    use super::*;

    fn client(ip: &str) -> ClientKey {
        ClientKey::from_ip(Some(ip.parse::<IpAddr>().unwrap()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_one_token_per_interval() {
        let table = RateTable::new(ClientRate::new(5, 5).unwrap(), 100);
        let alice = client("192.0.2.1");
        let now = Instant::now();
        for _ in 0..5 {
            assert_eq!(table.admit(&alice, now), Ok(()));
        }
        assert_eq!(table.admit(&alice, now), Err(Duration::from_millis(200)));
        // Refusals cost nothing: the wait does not grow.
        assert_eq!(table.admit(&alice, now), Err(Duration::from_millis(200)));
        let later = now + Duration::from_millis(150);
        assert_eq!(table.admit(&alice, later), Err(Duration::from_millis(50)));

        let refilled = now + Duration::from_millis(200);
        assert_eq!(table.admit(&alice, refilled), Ok(()));
        assert!(table.admit(&alice, refilled).is_err());

        // Another client has its own bucket.
        assert_eq!(table.admit(&client("192.0.2.2"), now), Ok(()));

        // After a second of silence the bucket is full again.
        let idle = refilled + Duration::from_secs(1);
        for _ in 0..5 {
            assert_eq!(table.admit(&alice, idle), Ok(()));
        }
        assert!(table.admit(&alice, idle).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refund_gives_a_token_back() {
        let table = RateTable::new(ClientRate::new(1, 2).unwrap(), 100);
        let alice = client("192.0.2.1");
        let now = Instant::now();
        table.admit(&alice, now).unwrap();
        table.admit(&alice, now).unwrap();
        assert!(table.admit(&alice, now).is_err());
        table.refund(&alice, now);
        assert_eq!(table.admit(&alice, now), Ok(()));
        assert!(table.admit(&alice, now).is_err());
        // Refunds never store more than a full bucket.
        for _ in 0..5 {
            table.refund(&alice, now);
        }
        table.admit(&alice, now).unwrap();
        table.admit(&alice, now).unwrap();
        assert!(table.admit(&alice, now).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded_and_forgets_idle_clients() {
        let table = RateTable::new(ClientRate::new(1, 2).unwrap(), 3);
        let now = Instant::now();
        for ip in ["192.0.2.1", "192.0.2.2", "192.0.2.3"] {
            table.admit(&client(ip), now).unwrap();
        }
        assert_eq!(table.tracked(), 3);

        // Full of active clients: newcomers share the overflow bucket,
        // which is limited like any other.
        assert_eq!(table.admit(&client("198.51.100.1"), now), Ok(()));
        assert_eq!(table.admit(&client("198.51.100.2"), now), Ok(()));
        assert!(table.admit(&client("198.51.100.3"), now).is_err());
        assert_eq!(table.tracked(), 3);

        // Once their buckets have refilled, the old clients are forgotten
        // to make room.
        let later = now + Duration::from_secs(2);
        assert_eq!(table.admit(&client("198.51.100.3"), later), Ok(()));
        assert_eq!(table.tracked(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_grpc_replies_with_retry_info_and_exemptions_pass() {
        let inner = tower::service_fn(|_request: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(Body::default()))
        });
        let service = ClientRateLayer::new(ClientRate::new(1, 1).unwrap(), 100).layer(inner);
        let call = |path: &'static str| {
            let request = http::Request::builder().uri(path).body(()).unwrap();
            service.clone().oneshot(request)
        };
        let path = "/dcv.sessionmanager.v1.Servers/DescribeServers";
        let ok = call(path).await.unwrap();
        assert!(Status::from_header_map(ok.headers()).is_none());

        let refused = call(path).await.unwrap();
        assert_eq!(refused.status(), http::StatusCode::OK);
        let status = Status::from_header_map(refused.headers()).unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("an unknown peer"), "{status:?}");
        let retry = status
            .get_details_retry_info()
            .unwrap()
            .retry_delay
            .unwrap();
        assert_eq!(retry, Duration::from_secs(1));

        for exempt in [
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            let reply = call(exempt).await.unwrap();
            assert!(
                Status::from_header_map(reply.headers()).is_none(),
                "{exempt}"
            );
        }

        tokio::time::advance(retry).await;
        let again = call(path).await.unwrap();
        assert!(Status::from_header_map(again.headers()).is_none());
    }
}
