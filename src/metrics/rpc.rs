//! Per-request metrics: the tower layer in front of every route, and the
//! table of every gRPC method's counters it updates.
//!
//! gRPC requests are counted under the names gRPC dashboards already use
//! (go-grpc-prometheus'): `grpc_server_started_total`,
//! `grpc_server_handled_total{grpc_code}` and
//! `grpc_server_handling_seconds`, each labelled `grpc_service`,
//! `grpc_method` and `grpc_type`. Every method's counters are resolved when
//! the broker starts, so a request looks its path up once and allocates
//! nothing; a path no service has counts as `unknown`, never as a label
//! taken from the request. Everything else on the port (DCV's REST routes,
//! `/oauth2/token`, the token verifier, `/health`, `/metrics`) is counted
//! as `dcv_broker_http_requests_total{route,code}` and
//! `dcv_broker_http_request_duration_seconds{route}`, with `route` from a
//! fixed list.
//!
//! The layer is outermost (inside the connection counter only), so that
//! refusals by the gate, authentication, the rate and the in-flight limit
//! are counted with their codes. The handling time runs from the request's
//! arrival to its response's headers: for a unary call, the whole call.
//! The code comes from `grpc-status` in the headers (a refusal, or any
//! failure of a unary handler) or else in the trailers, read as the body
//! ends; a request dropped before its response, or a body dropped before
//! it ends, counts as CANCELLED.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
};
use tonic::{Code, body::Body};
use tower::{Layer, Service};

use super::COUNTERS;
use crate::transport::is_grpc_content_type;

/// The buckets of the handling-time histograms: 100 µs to ~13 s.
fn buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.5, 14)
}

/// Every gRPC status code, in number order (`Code as usize` indexes it).
const CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

/// Prometheus' names of the codes (go-grpc-prometheus uses Go's
/// `codes.Code.String()`).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// One gRPC method's counters.
#[derive(Debug)]
pub(super) struct Method {
    service: String,
    method: String,
    kind: &'static str,
    started: Counter,
    handled: [Counter; 17],
    seconds: Histogram,
}

impl Method {
    fn new(service: String, method: String, kind: &'static str) -> Method {
        Method {
            service,
            method,
            kind,
            started: Counter::default(),
            handled: Default::default(),
            seconds: Histogram::new(buckets()),
        }
    }

    fn handled(&self, code: Code) {
        self.handled[code as usize].inc();
        if code == Code::OutOfRange {
            // tonic's refusal of a message over the decoding limit; no
            // handler of ours answers OUT_OF_RANGE.
            COUNTERS.too_large_grpc.inc();
        }
    }

    fn labels(&self) -> [(&'static str, &str); 3] {
        [
            ("grpc_service", &self.service),
            ("grpc_method", &self.method),
            ("grpc_type", self.kind),
        ]
    }
}

/// An HTTP route's and status' labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: &'static str,
    code: u16,
}

/// An HTTP route's label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

/// Every method's counters, by path, and the HTTP routes'.
#[derive(Debug)]
pub(super) struct Table {
    methods: HashMap<String, Arc<Method>, foldhash::fast::RandomState>,
    /// Paths no service has.
    unknown: Arc<Method>,
    http: Family<HttpLabels, Counter>,
    http_seconds: Family<RouteLabel, Histogram>,
}

impl Table {
    /// Every method of the broker's services, health and reflection.
    pub(super) fn new() -> Table {
        use prost::Message as _;
        let mut methods = HashMap::default();
        for set in [
            crate::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            // Compiled in: a set that does not decode only loses its
            // methods to `unknown`.
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let name = service.name.unwrap_or_default();
                    let full = if package.is_empty() {
                        name
                    } else {
                        format!("{package}.{name}")
                    };
                    for method in service.method {
                        let kind = match (
                            method.client_streaming.unwrap_or(false),
                            method.server_streaming.unwrap_or(false),
                        ) {
                            (false, false) => "unary",
                            (true, false) => "client_stream",
                            (false, true) => "server_stream",
                            (true, true) => "bidi_stream",
                        };
                        let method = method.name.unwrap_or_default();
                        methods.insert(
                            format!("/{full}/{method}"),
                            Arc::new(Method::new(full.clone(), method, kind)),
                        );
                    }
                }
            }
        }
        Table {
            methods,
            unknown: Arc::new(Method::new("unknown".into(), "unknown".into(), "unknown")),
            http: Family::default(),
            http_seconds: Family::new_with_constructor(|| Histogram::new(buckets())),
        }
    }

    fn method(&self, path: &str) -> &Arc<Method> {
        self.methods.get(path).unwrap_or(&self.unknown)
    }

    /// The gRPC families, in the registry's scrape.
    pub(super) fn encode(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        let mut sorted: Vec<&Arc<Method>> = self.methods.values().collect();
        sorted.sort_by(|a, b| (&a.service, &a.method).cmp(&(&b.service, &b.method)));
        sorted.push(&self.unknown);
        // Methods never called are left out, as go-grpc-prometheus leaves
        // them out until it is told to preregister them.
        let called = || sorted.iter().filter(|m| m.started.get() > 0);
        let mut started = encoder.encode_descriptor(
            "grpc_server_started",
            "RPCs started on the server",
            None,
            MetricType::Counter,
        )?;
        for m in called() {
            m.started.encode(started.encode_family(&m.labels())?)?;
        }
        let mut handled = encoder.encode_descriptor(
            "grpc_server_handled",
            "RPCs completed on the server, whatever their code",
            None,
            MetricType::Counter,
        )?;
        for m in called() {
            let [service, method, kind] = m.labels();
            for code in CODES {
                let counter = &m.handled[code as usize];
                if counter.get() > 0 {
                    let labels = [service, method, kind, ("grpc_code", code_name(code))];
                    counter.encode(handled.encode_family(&labels)?)?;
                }
            }
        }
        let mut seconds = encoder.encode_descriptor(
            "grpc_server_handling_seconds",
            "Time from an RPC's arrival to its response's headers (a unary call's whole time)",
            None,
            MetricType::Histogram,
        )?;
        for m in called() {
            m.seconds.encode(seconds.encode_family(&m.labels())?)?;
        }
        self.http.encode(encoder.encode_descriptor(
            "dcv_broker_http_requests",
            "Plain HTTP requests (DCV's REST routes, the token endpoint, the token verifier, \
             health, metrics), by route and HTTP status",
            None,
            MetricType::Counter,
        )?)?;
        self.http_seconds.encode(encoder.encode_descriptor(
            "dcv_broker_http_request_duration_seconds",
            "Time from a plain HTTP request's arrival to its response's headers",
            None,
            MetricType::Histogram,
        )?)
    }
}

/// The route label of a plain HTTP request: from a fixed list.
fn http_route(method: &http::Method, path: &str) -> &'static str {
    use crate::api::{oauth::TOKEN_PATH, rest::handler, verifier::VERIFIER_PATH};
    match path {
        TOKEN_PATH => "oauth2_token",
        VERIFIER_PATH => "validate_authentication_token",
        handler::HEALTH_PATH => "health",
        handler::OPENAPI_PATH => "openapi",
        super::METRICS_PATH => "metrics",
        _ => match handler::find(method, path) {
            handler::Match::Route(route, _) => route.operation_id,
            _ => "other",
        },
    }
}

/// The layer counting every request (see the module documentation).
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    table: Arc<Table>,
}

impl MetricsLayer {
    pub(super) fn new(table: Arc<Table>) -> MetricsLayer {
        MetricsLayer { table }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            table: self.table.clone(),
        }
    }
}

/// The service of [`MetricsLayer`].
#[derive(Debug, Clone)]
pub struct MetricsService<S> {
    inner: S,
    table: Arc<Table>,
}

/// What a request is counted as.
enum Call {
    Grpc(Arc<Method>),
    Http(Arc<Table>, &'static str),
}

impl<S, B> Service<http::Request<B>> for MetricsService<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let grpc = is_grpc_content_type(request.headers());
        let call = if grpc {
            let method = self.table.method(request.uri().path()).clone();
            method.started.inc();
            Call::Grpc(method)
        } else {
            Call::Http(
                self.table.clone(),
                http_route(request.method(), request.uri().path()),
            )
        };
        MetricsFuture {
            inner: self.inner.call(request),
            call: Some(call),
            start: Instant::now(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`MetricsService`].
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        // `None` once counted.
        call: Option<Call>,
        start: Instant,
    }

    impl<F> PinnedDrop for MetricsFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before its response: the client went away (or the
            // connection did). Counted, so that every started RPC is
            // handled once.
            if let Some(Call::Grpc(method)) = this.project().call.take() {
                method.handled(Code::Cancelled);
            }
        }
    }
}

impl<F, E> std::future::Future for MetricsFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let Some(call) = this.call.take() else {
            return Poll::Ready(result);
        };
        let seconds = this.start.elapsed().as_secs_f64();
        Poll::Ready(match call {
            Call::Grpc(method) => {
                method.seconds.observe(seconds);
                match result {
                    Ok(response) => Ok(grpc_response(method, response)),
                    Err(e) => {
                        // The connection's error, not a reply: hyper resets
                        // the stream.
                        method.handled(Code::Unknown);
                        Err(e)
                    }
                }
            }
            Call::Http(table, route) => {
                table
                    .http_seconds
                    .get_or_create(&RouteLabel { route })
                    .observe(seconds);
                let code = result.as_ref().map_or(500, |r| r.status().as_u16());
                table.http.get_or_create(&HttpLabels { route, code }).inc();
                if code == 413 {
                    COUNTERS.too_large_rest.inc();
                }
                result
            }
        })
    }
}

/// Counts a gRPC response whose code its headers tell, or wraps its body
/// to read the code from its trailers.
fn grpc_response(method: Arc<Method>, response: http::Response<Body>) -> http::Response<Body> {
    if let Some(code) = response.headers().get("grpc-status") {
        method.handled(Code::from_bytes(code.as_bytes()));
        return response;
    }
    if response.status() != http::StatusCode::OK {
        // An HTTP refusal of a gRPC request (the gate's 415, 404, ...),
        // as gRPC clients read it (gRPC's HTTP-to-gRPC status mapping).
        method.handled(match response.status().as_u16() {
            400 => Code::Internal,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::Unimplemented,
            429 | 502 | 503 | 504 => Code::Unavailable,
            _ => Code::Unknown,
        });
        return response;
    }
    response.map(|body| {
        Body::new(TrailersBody {
            inner: body,
            method: Some(method),
        })
    })
}

pin_project_lite::pin_project! {
    /// A gRPC reply's body that counts its code when its trailers pass.
    struct TrailersBody {
        #[pin]
        inner: Body,
        // `None` once counted.
        method: Option<Arc<Method>>,
    }

    impl PinnedDrop for TrailersBody {
        fn drop(this: Pin<&mut Self>) {
            if let Some(method) = this.project().method.take() {
                method.handled(Code::Cancelled);
            }
        }
    }
}

impl http_body::Body for TrailersBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(method) = this.method.take()
                {
                    let code = trailers
                        .get("grpc-status")
                        .map_or(Code::Unknown, |code| Code::from_bytes(code.as_bytes()));
                    method.handled(code);
                }
            }
            Some(Err(_)) => {
                if let Some(method) = this.method.take() {
                    method.handled(Code::Unknown);
                }
            }
            None => {
                // Ended without trailers: not a complete gRPC reply.
                if let Some(method) = this.method.take() {
                    method.handled(Code::Unknown);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::*;

    const PATH: &str = "/dcv.sessionmanager.v1.Servers/DescribeServers";

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder()
            .uri(path)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(())
            .unwrap()
    }

    /// A reply whose code is in its trailers, after one message.
    fn with_trailers(code: &'static str) -> http::Response<Body> {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static(code));
        let frames: Vec<Result<Frame<Bytes>, tonic::Status>> = vec![
            Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
            Ok(Frame::trailers(trailers)),
        ];
        http::Response::new(Body::new(http_body_util::StreamBody::new(
            tokio_stream::iter(frames),
        )))
    }

    fn handled(table: &Table, path: &str, code: Code) -> u64 {
        table.method(path).handled[code as usize].get()
    }

    #[tokio::test]
    async fn codes_come_from_headers_trailers_or_the_request_going_away() {
        let table = Arc::new(Table::new());
        let layer = MetricsLayer::new(table.clone());

        // OK, read from the trailers once the body has been read.
        let service = layer.layer(tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, Infallible>(with_trailers("0"))
        }));
        let response = service.clone().oneshot(request(PATH)).await.unwrap();
        assert_eq!(
            handled(&table, PATH, Code::Ok),
            0,
            "not before the trailers"
        );
        response.into_body().collect().await.unwrap();
        assert_eq!(handled(&table, PATH, Code::Ok), 1);

        // A body dropped before its end: the client went away.
        drop(service.oneshot(request(PATH)).await.unwrap());
        assert_eq!(handled(&table, PATH, Code::Cancelled), 1);

        // A refusal: the code in the headers (trailers-only).
        let refuse = layer.layer(tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, Infallible>(tonic::Status::resource_exhausted("busy").into_http())
        }));
        refuse.oneshot(request(PATH)).await.unwrap();
        assert_eq!(handled(&table, PATH, Code::ResourceExhausted), 1);

        // A request dropped before its response.
        let mut never = layer.layer(tower::service_fn(|_: http::Request<()>| {
            std::future::pending::<Result<http::Response<Body>, Infallible>>()
        }));
        drop(never.call(request(PATH)));
        assert_eq!(handled(&table, PATH, Code::Cancelled), 2);

        let method = table.method(PATH);
        assert_eq!(method.started.get(), 4);
        assert_eq!(method.kind, "unary");
        assert_eq!(method.service, "dcv.sessionmanager.v1.Servers");

        // A path no service has counts as `unknown`, never by its name.
        let service = layer.layer(tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, Infallible>(with_trailers("12"))
        }));
        let response = service.oneshot(request("/made.Up/Path")).await.unwrap();
        response.into_body().collect().await.unwrap();
        assert_eq!(table.unknown.started.get(), 1);
        assert_eq!(table.unknown.handled[Code::Unimplemented as usize].get(), 1);
        assert!(!table.methods.contains_key("/made.Up/Path"));
    }
}
