//! Gives every request a fresh UUID v4 `RequestId`, the request context
//! (id and method) that every event of the request carries at any level
//! (`telemetry::request`), and a DEBUG-level tracing span (method, request
//! id, peer). The id reaches handlers through the
//! request's extensions, so the id in a response is the one in the
//! broker's log. A call forwarded by another replica keeps that replica's
//! request id once its signed identity verifies (`api::forward`), so one id
//! names the call in both brokers' logs and in the reply.

use std::{
    cell::Cell,
    task::{Context, Poll},
};

use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};
use tracing::{Instrument as _, instrument::Instrumented};
use uuid::Uuid;

use super::forward::{self, ForwardRefused};
use crate::{
    cluster::ClusterView,
    telemetry::{
        otlp::{self, TRACE_TARGET},
        request::{self, RequestContext},
    },
    transport::peer_addr,
};

/// The id of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId(pub Uuid);

impl RequestId {
    /// The id given to `request` by [`RequestSpanLayer`], or a fresh one
    /// when the service runs without the layer.
    pub fn of<T>(request: &tonic::Request<T>) -> String {
        request
            .extensions()
            .get::<RequestId>()
            .map_or_else(fresh_id, |id| id.0)
            .to_string()
    }
}

/// The tower layer that assigns request ids and spans, and checks the
/// identity of calls forwarded by other replicas.
#[derive(Debug, Clone, Default)]
pub struct RequestSpanLayer {
    view: ClusterView,
}

impl RequestSpanLayer {
    /// The layer of a broker whose place among replicas `view` tells (its
    /// forwarding key checks forwarded calls).
    pub fn new(view: ClusterView) -> RequestSpanLayer {
        RequestSpanLayer { view }
    }
}

impl<S> Layer<S> for RequestSpanLayer {
    type Service = RequestSpan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestSpan {
            inner,
            view: self.view.clone(),
        }
    }
}

/// The service [`RequestSpanLayer`] wraps around the routes.
#[derive(Debug, Clone)]
pub struct RequestSpan<S> {
    inner: S,
    view: ClusterView,
}

impl<S, B> Service<http::Request<B>> for RequestSpan<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TaskLocalFuture<RequestContext, Instrumented<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // Two header lookups for an ordinary call; the check itself only
        // when a forwarding header is there. A forwarded identity that does
        // not verify is marked for the HTTP gate to refuse (this layer
        // never answers), and its request id is not adopted.
        let id = match forward::check(request.headers(), &self.view, std::time::SystemTime::now()) {
            forward::Check::Absent => fresh_id(),
            forward::Check::Verified(forwarded, id) => {
                request.extensions_mut().insert(forwarded);
                id
            }
            forward::Check::Refused(why) => {
                request.extensions_mut().insert(ForwardRefused(why));
                fresh_id()
            }
        };
        let peer = peer_addr(request.extensions());
        // DEBUG, like the per-request events: at INFO, tracing-subscriber's
        // formatter built and tracked this span for every request, about a
        // quarter of a single-item call's CPU in the load benchmark
        // (BENCHMARKS.md). The id still reaches the response either way.
        let span = tracing::debug_span!(
            "request",
            method = request.uri().path(),
            request_id = %id,
            peer = peer.map(tracing::field::display),
            client = tracing::field::Empty,
        );
        // With --otlp-endpoint, the RPC's exported span, under the log's
        // and the caller's trace; a disabled call site (no span) else.
        let rpc = tracing::info_span!(
            target: TRACE_TARGET,
            parent: &span,
            "rpc",
            otel.name = request.uri().path(),
            otel.kind = "server",
            request_id = %id,
        );
        let span = if rpc.is_disabled() {
            span
        } else {
            otlp::continue_trace(&rpc, request.headers());
            rpc
        };
        request.extensions_mut().insert(RequestId(id));
        tracing::debug!(parent: &span, "request received");
        // What every event of the request names at any level: set while
        // the layers below decide (some log then) and while the response
        // future runs.
        let context = RequestContext {
            id,
            path: request.uri().path_and_query().cloned(),
        };
        let inner = request::CURRENT.sync_scope(context.clone(), || self.inner.call(request));
        request::CURRENT.scope(context, inner.instrument(span))
    }
}

/// A fresh random (version 4) UUID. Request ids must be unique, not
/// unguessable, so they come from a per-thread SplitMix64 stream seeded
/// once by the OS: `Uuid::new_v4` makes a system call on every request.
/// A stream never repeats a state, so one thread never repeats an id, and
/// two randomly seeded streams overlapping is as unlikely as a v4
/// collision.
fn fresh_id() -> Uuid {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }
    let (high, low) = STATE.with(|state| (splitmix(state), splitmix(state)));
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&high.to_le_bytes());
    bytes[8..].copy_from_slice(&low.to_le_bytes());
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: the clock still tells threads and runs apart.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = (nanos as u64).to_le_bytes();
    }
    u64::from_le_bytes(bytes)
}

/// The next output of a SplitMix64 generator (Steele, Lea and Flood).
fn splitmix(state: &Cell<u64>) -> u64 {
    let s = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
    state.set(s);
    let mut z = s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_ids_are_v4_and_distinct() {
        let ids: std::collections::HashSet<Uuid> = (0..10_000).map(|_| fresh_id()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|id| id.get_version_num() == 4));
    }
}
