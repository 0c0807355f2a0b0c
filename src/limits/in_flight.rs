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

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use tokio::sync::Semaphore;
use tonic::{Status, body::Body};
use tower::{Layer, Service};

use super::{refusal, worth_a_warning};
use crate::transport::is_health;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Limits the requests in flight across all connections to `limit`,
/// shedding the rest. Health checks are exempt.
#[derive(Debug, Clone)]
pub struct InFlightLimitLayer {
    shared: Option<Arc<Shared>>,
}

#[derive(Debug)]
struct Shared {
    limit: usize,
    slots: Arc<Semaphore>,
    shed: AtomicU64,
}

impl InFlightLimitLayer {
    /// A layer admitting at most `limit` requests at once (`None`: any
    /// number).
    pub fn new(limit: Option<usize>) -> Self {
        let shared = limit.map(|limit| {
            let limit = limit.min(Semaphore::MAX_PERMITS);
            Arc::new(Shared {
                limit,
                slots: Arc::new(Semaphore::new(limit)),
                shed: AtomicU64::new(0),
            })
        });
        InFlightLimitLayer { shared }
    }
}

impl<S> Layer<S> for InFlightLimitLayer {
    type Service = InFlightLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightLimit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`InFlightLimitLayer`] wraps around the routes.
#[derive(Debug, Clone)]
pub struct InFlightLimit<S> {
    inner: S,
    shared: Option<Arc<Shared>>,
}

impl<S, B> Service<http::Request<B>> for InFlightLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(shared) = &self.shared else {
            return Box::pin(self.inner.call(request));
        };
        if is_health(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        match shared.slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let response = self.inner.call(request);
                Box::pin(async move {
                    let response = response.await;
                    drop(slot);
                    response
                })
            }
            Err(_) => {
                let limit = shared.limit;
                let shed = shared.shed.fetch_add(1, Ordering::Relaxed) + 1;
                // Logged inside the request's span (the future runs in it).
                Box::pin(async move {
                    if worth_a_warning(shed) {
                        tracing::warn!(limit, shed, "load shedding: too many requests in flight");
                    } else {
                        tracing::debug!(limit, "request shed");
                    }
                    Ok(refusal(Status::resource_exhausted(format!(
                        "the broker is handling its limit of {limit} requests; retry with backoff"
                    ))))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tokio::sync::oneshot;
    use tonic::Code;
    use tower::ServiceExt as _;

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
        let service = InFlightLimitLayer::new(Some(2)).layer(inner);
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
        let service = InFlightLimitLayer::new(Some(1)).layer(inner);
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
        let service = InFlightLimitLayer::new(None).layer(inner);
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
