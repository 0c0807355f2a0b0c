//! The metrics' own port (`--metrics-listen`): plain HTTP/1.1 serving
//! `GET /metrics` and nothing else, so that a scraper needs no access to
//! the broker's API port and its firewall rules can differ.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

use super::{METRICS_PATH, Metrics};

/// Scrapers connected at once; one more waits for a slot. Prometheus
/// keeps one connection per target: a few are plenty, and the bound keeps
/// a flood from taking the broker's file descriptors.
const MAX_CONNECTIONS: usize = 32;

/// How long a connection may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `metrics` on `listener` until the task is dropped.
pub async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or the like: try again shortly
                // rather than spin.
                tracing::debug!(error = %e, "metrics port: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&metrics, &request)) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "metrics port: connection ended");
            }
            drop(slot);
        });
    }
}

fn answer<B>(metrics: &Metrics, request: &Request<B>) -> Response<Full<bytes::Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut response = Response::new(Full::new(bytes::Bytes::from_static(text.as_bytes())));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != METRICS_PATH {
        return plain(StatusCode::NOT_FOUND, "only /metrics is served here\n");
    }
    let head = request.method() == Method::HEAD;
    if !head && request.method() != Method::GET {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD\n");
        response.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("GET, HEAD"),
        );
        return response;
    }
    metrics
        .reply(request.headers().get(http::header::ACCEPT), head)
        .map(|body| Full::new(bytes::Bytes::from(body)))
}
