//! The global concurrency limit with load shedding: at most N requests in
//! the handlers at once across every connection (tonic's own
//! `concurrency_limit_per_connection` counts one connection only, and a
//! mesh multiplexes many callers over few connections). One more is
//! answered at once with `RESOURCE_EXHAUSTED`; nothing ever waits for a
//! slot, so overload cannot build an unbounded queue of requests and
//! their memory.
//!
//! A slot is held from the moment the request is admitted until its
//! handler returns the response: for a unary call that covers decoding
//! the request and the whole handler; a streaming reply (an agent's
//! StreamInstructions) frees its slot once the stream starts, and open
//! streams are bounded per connection by HTTP/2 instead.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use super::{refusal, worth_a_warning};
use crate::layer::{Policy, PolicyLayer, PolicyService, Verdict};
use crate::transport::is_health;

/// Limits the requests in flight across all connections, shedding the
/// rest. Health checks are exempt.
pub type InFlightLimitLayer = PolicyLayer<InFlightPolicy>;

/// The service [`InFlightLimitLayer`] wraps around the routes.
pub type InFlightLimit<S> = PolicyService<InFlightPolicy, S>;

/// The policy of [`InFlightLimitLayer`]: the slots, shared by every
/// connection.
#[derive(Debug, Clone)]
pub struct InFlightPolicy {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    limit: usize,
    slots: Arc<Semaphore>,
    shed: AtomicU64,
}

impl InFlightLimitLayer {
    /// A layer admitting at most `limit` requests at once. (No limit: no
    /// layer, see `server::run`.)
    pub fn new(limit: usize) -> Self {
        let limit = limit.min(Semaphore::MAX_PERMITS);
        let slots = Arc::new(Semaphore::new(limit));
        crate::metrics::track_in_flight(limit, &slots);
        PolicyLayer::of(InFlightPolicy {
            shared: Arc::new(Shared {
                limit,
                slots,
                shed: AtomicU64::new(0),
            }),
        })
    }
}

impl<B> Policy<B> for InFlightPolicy {
    /// The request's slot, freed when its response is ready (or the
    /// request is dropped).
    type Hold = Option<OwnedSemaphorePermit>;

    fn check<E: Send + 'static>(&self, request: http::Request<B>) -> Verdict<B, Self::Hold, E> {
        if is_health(request.uri().path()) {
            return Verdict::Pass(request, None);
        }
        let shared = &self.shared;
        match shared.slots.clone().try_acquire_owned() {
            Ok(slot) => Verdict::Pass(request, Some(slot)),
            Err(_) => {
                let limit = shared.limit;
                crate::metrics::COUNTERS.shed.inc();
                let shed = shared.shed.fetch_add(1, Ordering::Relaxed) + 1;
                // Logged inside the request's span (the future runs in it).
                Verdict::Later(Box::pin(async move {
                    if worth_a_warning(shed) {
                        tracing::warn!(limit, shed, "load shedding: too many requests in flight");
                    } else {
                        tracing::debug!(limit, "request shed");
                    }
                    Ok(refusal(Status::resource_exhausted(format!(
                        "the broker is handling its limit of {limit} requests; retry with backoff"
                    ))))
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tokio::sync::oneshot;
    use tonic::{Code, body::Body};
    use tower::{Layer as _, Service, ServiceExt as _};

    use super::*;

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    /// The gRPC status in a reply's headers (200 when the inner service
    /// answered).
    fn status(response: &http::Response<Body>) -> Code {
        Status::from_header_map(response.headers()).map_or(Code::Ok, |s| s.code())
    }

    /// A service that answers each request when the test says so.
    fn gated() -> (
        impl Service<
            http::Request<()>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future = impl Send + 'static,
        > + Clone,
        tokio::sync::mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    ) {
        let (calls, arrived) = tokio::sync::mpsc::unbounded_channel();
        let service = tower::service_fn(move |_request: http::Request<()>| {
            let (release, released) = oneshot::channel::<()>();
            calls.send(release).unwrap();
            async move {
                let _ = released.await;
                Ok::<_, Infallible>(http::Response::new(Body::default()))
            }
        });
        (service, arrived)
    }

    #[tokio::test]
    async fn sheds_beyond_the_limit_at_once_and_admits_again_when_a_slot_frees() {
        let (inner, mut arrived) = gated();
        let service = InFlightLimitLayer::new(2).layer(inner);
        let path = "/dcv.sessionmanager.v1.Servers/DescribeServers";

        let first = tokio::spawn(service.clone().oneshot(request(path)));
        let second = tokio::spawn(service.clone().oneshot(request(path)));
        let release_first = arrived.recv().await.unwrap();
        let release_second = arrived.recv().await.unwrap();

        // Both slots are taken: the third is answered at once, without
        // reaching the inner service.
        let shed = service.clone().oneshot(request(path)).await.unwrap();
        assert_eq!(
            shed.status(),
            http::StatusCode::OK,
            "a gRPC reply, not an HTTP error"
        );
        assert_eq!(status(&shed), Code::ResourceExhausted);
        assert_eq!(
            shed.headers()["content-type"],
            "application/grpc",
            "{shed:?}"
        );
        assert!(arrived.try_recv().is_err());

        // Health checks are never shed.
        let health = tokio::spawn(
            service
                .clone()
                .oneshot(request("/grpc.health.v1.Health/Check")),
        );
        arrived.recv().await.unwrap().send(()).unwrap();
        assert_eq!(status(&health.await.unwrap().unwrap()), Code::Ok);

        // A finished request frees its slot for the next one.
        release_first.send(()).unwrap();
        assert_eq!(status(&first.await.unwrap().unwrap()), Code::Ok);
        let third = tokio::spawn(service.clone().oneshot(request(path)));
        arrived.recv().await.unwrap().send(()).unwrap();
        assert_eq!(status(&third.await.unwrap().unwrap()), Code::Ok);
        release_second.send(()).unwrap();
        assert_eq!(status(&second.await.unwrap().unwrap()), Code::Ok);
    }

    #[tokio::test]
    async fn a_cancelled_request_frees_its_slot() {
        let (inner, mut arrived) = gated();
        let service = InFlightLimitLayer::new(1).layer(inner);
        let path = "/dcv.sessionmanager.v1.Servers/DescribeServers";

        let call = service.clone().oneshot(request(path));
        let waiting = tokio::spawn(call);
        let _release = arrived.recv().await.unwrap();
        waiting.abort();
        let _ = waiting.await;

        let next = tokio::spawn(service.clone().oneshot(request(path)));
        arrived.recv().await.unwrap().send(()).unwrap();
        assert_eq!(status(&next.await.unwrap().unwrap()), Code::Ok);
    }

    #[tokio::test]
    async fn no_limit_admits_everything() {
        let (inner, mut arrived) = gated();
        // How `server::run` adds the layer when there is no limit.
        let service = tower::util::option_layer(None::<InFlightLimitLayer>).layer(inner);
        let path = "/dcv.sessionmanager.v1.Servers/DescribeServers";
        let calls: Vec<_> = (0..100)
            .map(|_| tokio::spawn(service.clone().oneshot(request(path))))
            .collect();
        for _ in 0..100 {
            arrived.recv().await.unwrap().send(()).unwrap();
        }
        for call in calls {
            assert_eq!(status(&call.await.unwrap().unwrap()), Code::Ok);
        }
    }
}
