//! The one tower shell of the broker's request layers: a [`Policy`] says
//! what to do with each request (pass it on, answer it here, or answer it
//! later) and this module does the tower plumbing, once.
//!
//! Every layer whose shape is "inspect the request, maybe answer it early,
//! else call the inner service and maybe wrap its response" is a
//! [`PolicyLayer`]: the HTTP gate, authentication, the client rate, the
//! in-flight limit and the connection counter. An optional layer is added
//! with `tower::util::option_layer` where the stack is built
//! (`server::run`), so no policy carries an "off" branch of its own.
//!
//! The one layer not built here is `api::request_id::RequestSpanLayer`: it
//! never answers, and its future is the inner one instrumented with the
//! request's span and scoped to its log context (`Instrumented` inside a
//! `TaskLocalFuture`), with no box at all; the shell's boxed future would add an allocation to every request.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::body::Body;
use tower::{Layer, Service};

/// A boxed, sendable future: what every [`PolicyService`] returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a [`Policy`] decides for one request.
pub enum Verdict<B, H, E> {
    /// Call the inner service with the request (possibly changed), and
    /// hand its response to [`Policy::respond`] with `H`.
    Pass(http::Request<B>, H),
    /// Answer at once, without the inner service.
    Answer(http::Response<Body>),
    /// Answer with this future, without the inner service: for answers
    /// computed, or logged, inside the request's span, which instruments
    /// the future and not the call that makes it.
    Later(BoxFuture<Result<http::Response<Body>, E>>),
}

/// What a request layer does; [`PolicyLayer`] makes the layer of it.
pub trait Policy<B>: Clone {
    /// What a passed request keeps until its response (a slot, what to
    /// wrap the response in); `()` when nothing.
    type Hold: Send + 'static;

    /// Decides what becomes of `request`. `E` is the inner service's error,
    /// for [`Verdict::Later`] futures.
    fn check<E: Send + 'static>(&self, request: http::Request<B>) -> Verdict<B, Self::Hold, E>;

    /// The response of a passed request, given what [`Policy::check`]
    /// kept; dropped with the response future however that ends.
    fn respond(hold: Self::Hold, response: http::Response<Body>) -> http::Response<Body> {
        drop(hold);
        response
    }
}

/// The layer of a [`Policy`].
#[derive(Debug, Clone)]
pub struct PolicyLayer<P> {
    policy: P,
}

impl<P> PolicyLayer<P> {
    /// The layer applying `policy` to every request.
    pub fn of(policy: P) -> Self {
        PolicyLayer { policy }
    }

    /// The policy this layer applies.
    pub fn policy(&self) -> &P {
        &self.policy
    }
}

impl<P: Clone, S> Layer<S> for PolicyLayer<P> {
    type Service = PolicyService<P, S>;

    fn layer(&self, inner: S) -> Self::Service {
        PolicyService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service a [`PolicyLayer`] wraps around the inner one.
#[derive(Debug, Clone)]
pub struct PolicyService<P, S> {
    inner: S,
    policy: P,
}

impl<P, S, B> Service<http::Request<B>> for PolicyService<P, S>
where
    P: Policy<B>,
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self.policy.check(request) {
            Verdict::Pass(request, hold) => {
                let response = self.inner.call(request);
                Box::pin(async move { Ok(P::respond(hold, response.await?)) })
            }
            Verdict::Answer(response) => Box::pin(std::future::ready(Ok(response))),
            Verdict::Later(answer) => answer,
        }
    }
}
