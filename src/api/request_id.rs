//! Gives every request a fresh UUID v4 `RequestId` and a tracing span
//! (method, request id, peer) that every event of the request carries.
//! The id reaches handlers through the request's extensions, so the id in
//! a response is the one in the broker's log.

use std::task::{Context, Poll};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};
use tracing::{Instrument as _, instrument::Instrumented};
use uuid::Uuid;

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
            .map_or_else(Uuid::new_v4, |id| id.0)
            .to_string()
    }
}

/// The client's address, from the connection information tonic puts in a
/// request's extensions (plaintext or TLS); `None` off TCP.
pub fn peer_addr(extensions: &http::Extensions) -> Option<std::net::SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
        .and_then(TcpConnectInfo::remote_addr)
}

/// The tower layer that assigns request ids and spans.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestSpanLayer;

impl<S> Layer<S> for RequestSpanLayer {
    type Service = RequestSpan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestSpan { inner }
    }
}

/// The service [`RequestSpanLayer`] wraps around the routes.
#[derive(Debug, Clone)]
pub struct RequestSpan<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for RequestSpan<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let id = Uuid::new_v4();
        let peer = peer_addr(request.extensions());
        let span = tracing::info_span!(
            "request",
            method = request.uri().path(),
            request_id = %id,
            peer = peer.map(tracing::field::display),
            client = tracing::field::Empty,
        );
        request.extensions_mut().insert(RequestId(id));
        tracing::debug!(parent: &span, "request received");
        self.inner.call(request).instrument(span)
    }
}
