//! The reply side of [`super::Connections`]: the request layer that counts
//! each request against its connection until its reply's last frame, and
//! ends gRPC replies still streaming when the drain starts.

use std::{
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::Frame;
use tokio::{sync::watch, time::Instant};
use tonic::{Status, body::Body};

use super::{ConnectionState, Connections};
use crate::{
    layer::{self, BoxFuture, Policy, PolicyLayer, PolicyService},
    transport::{is_grpc_content_type, peer_addr},
};

/// Streaming replies that end by themselves, cleanly, when the broker
/// shuts down: agents' instruction streams (`AgentApi` watches the same
/// shutdown), which agents take as "reconnect". Cutting them too would race
/// that clean end with `UNAVAILABLE`.
const END_THEMSELVES: &[&str] = &["/dcv.sessionmanager.v1.Agent/StreamInstructions"];

/// Counts each request against its connection from its start until its
/// reply's last frame, and ends gRPC replies still streaming when the
/// drain starts.
pub type ConnectionLayer = PolicyLayer<ConnectionPolicy>;

/// The service of [`ConnectionLayer`].
pub type ConnectionService<S> = PolicyService<ConnectionPolicy, S>;

/// The policy of [`ConnectionLayer`]: it never answers, and wraps every
/// reply's body.
#[derive(Debug, Clone)]
pub struct ConnectionPolicy {
    connections: Connections,
}

/// What a request keeps for its reply's body.
pub struct ReplyWatch {
    open: Option<OpenRequest>,
    ends_itself: bool,
    draining: watch::Receiver<bool>,
}

impl Connections {
    /// The request layer: counts each connection's open requests and ends
    /// streaming replies once the drain starts.
    pub fn layer(&self) -> ConnectionLayer {
        PolicyLayer::of(ConnectionPolicy {
            connections: self.clone(),
        })
    }
}

impl<B> Policy<B> for ConnectionPolicy {
    type Hold = ReplyWatch;

    fn check<E: Send + 'static>(
        &self,
        request: http::Request<B>,
    ) -> layer::Verdict<B, ReplyWatch, E> {
        let open = peer_addr(request.extensions())
            .and_then(|peer| self.connections.state_of(peer))
            .map(OpenRequest::new);
        let ends_itself = END_THEMSELVES.contains(&request.uri().path());
        let draining = self.connections.shared.draining.subscribe();
        let watch = ReplyWatch {
            open,
            ends_itself,
            draining,
        };
        layer::Verdict::Pass(request, watch)
    }

    fn respond(watch: ReplyWatch, reply: http::Response<Body>) -> http::Response<Body> {
        let cut_at_drain = is_grpc_content_type(reply.headers()) && !watch.ends_itself;
        reply.map(|body| {
            Body::new(Counted {
                inner: body,
                _open: watch.open,
                drain: cut_at_drain.then_some(Drain::Watching(watch.draining)),
            })
        })
    }
}

/// One request in progress on a connection.
struct OpenRequest(Arc<ConnectionState>);

impl OpenRequest {
    fn new(state: Arc<ConnectionState>) -> OpenRequest {
        state.started.store(true, Ordering::Release);
        state.open_requests.fetch_add(1, Ordering::AcqRel);
        OpenRequest(state)
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        // last_active first: the reaper reads the count, then the time.
        *self.0.last_active.lock() = Instant::now();
        self.0.open_requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether a reply ends at the drain.
enum Drain {
    /// Not yet waiting: most replies are complete when first polled.
    Watching(watch::Receiver<bool>),
    /// Waiting for the drain, since the reply is streaming.
    Waiting(BoxFuture<()>),
    /// Ended by the drain.
    Ended,
}

/// A reply body that keeps its request counted until dropped and, for a
/// gRPC reply, ends with `UNAVAILABLE` trailers when the drain starts.
struct Counted {
    inner: Body,
    _open: Option<OpenRequest>,
    drain: Option<Drain>,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if matches!(this.drain, Some(Drain::Ended)) {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if polled.is_ready() {
            return polled;
        }
        let Some(drain) = this.drain.as_mut() else {
            return Poll::Pending;
        };
        if let Drain::Watching(draining) = drain {
            let mut draining = draining.clone();
            *drain = Drain::Waiting(Box::pin(async move {
                let _ = draining.wait_for(|draining| *draining).await;
            }));
        }
        let Drain::Waiting(wait) = drain else {
            return Poll::Pending;
        };
        if wait.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.drain = Some(Drain::Ended);
        let mut trailers = http::HeaderMap::new();
        // Only fails for a message that is not a valid header value.
        let _ = Status::unavailable("the broker is shutting down").add_header(&mut trailers);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.drain, Some(Drain::Ended)) || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
