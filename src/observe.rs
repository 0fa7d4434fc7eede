//! The outermost layer: request id, tracing span, metrics, access log, and the one place
//! a `GatewayError` becomes the JSON envelope.
//!
//! For each request it loads the live `Snapshot` once and inserts `Arc<Snapshot>` and an
//! `Arc<RequestContext>` into the extensions, sets `X-Request-Id` on the request (so the
//! upstream sees it) and echoes it on the response.

use crate::body::{Body, ResponseFuture};
use crate::context::RequestContext;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::snapshot::LiveSnapshot;
use http::{HeaderName, HeaderValue, Request, Response};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tracing::Instrument;

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Clone)]
pub struct ObserveLayer {
    live: Arc<LiveSnapshot>,
    metrics: Arc<Metrics>,
}

impl ObserveLayer {
    pub fn new(live: Arc<LiveSnapshot>, metrics: Arc<Metrics>) -> ObserveLayer {
        ObserveLayer { live, metrics }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = ObserveService<S>;
    fn layer(&self, inner: S) -> ObserveService<S> {
        ObserveService {
            inner,
            live: self.live.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ObserveService<S> {
    inner: S,
    live: Arc<LiveSnapshot>,
    metrics: Arc<Metrics>,
}

impl<S> tower::Service<Request<Body>> for ObserveService<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Inner services are always ready: they hold no per-call capacity.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let started = Instant::now();
        let request_id = incoming_request_id(&request).unwrap_or_else(new_request_id);
        let header_value =
            HeaderValue::from_str(&request_id).expect("request ids are checked to be ASCII");
        request
            .headers_mut()
            .insert(REQUEST_ID.clone(), header_value.clone());
        let context = RequestContext::new(request_id.clone());
        request.extensions_mut().insert(self.live.load_full());
        request.extensions_mut().insert(context.clone());

        let method = request.method().clone();
        let path = loggable_path(request.uri().path());
        let span = tracing::info_span!("request", request_id = %request_id, %method, %path);
        let metrics = self.metrics.clone();
        let in_flight = InFlight::enter(&metrics);
        let call: ResponseFuture = Box::pin(self.inner.call(request));

        Box::pin(
            async move {
                let result = call.await;
                let facts = context.facts();
                let route = facts.route.as_deref().unwrap_or("unknown");
                let key = facts.key_label.as_deref().unwrap_or("");
                let (mut response, error) = match result {
                    Ok(response) => (response, None),
                    Err(err) => {
                        record_error(&metrics, &err, key);
                        let message = err.message();
                        (err.into_response(), Some(message))
                    }
                };
                response
                    .headers_mut()
                    .insert(REQUEST_ID.clone(), header_value);
                let status = response.status();
                let elapsed = started.elapsed();
                metrics
                    .requests_total
                    .with_label_values(&[route, status.as_str(), key])
                    .inc();
                metrics
                    .request_duration_seconds
                    .with_label_values(&[route])
                    .observe(elapsed.as_secs_f64());
                drop(in_flight);
                tracing::info!(
                    target: "gatehouse::access",
                    route,
                    status = status.as_u16(),
                    key = facts.key_id.as_deref().unwrap_or("-"),
                    upstream_status = facts.upstream_status,
                    upstream_ms = facts.upstream_duration.map(|d| d.as_secs_f64() * 1000.0),
                    duration_ms = elapsed.as_secs_f64() * 1000.0,
                    points_reserved = facts.points_reserved.map(|p| p.to_string()),
                    error = error.as_deref(),
                    "request"
                );
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// Counts a request in `gatehouse_requests_in_flight` until dropped: also when the client
/// disconnects and the request's future is dropped half-way.
struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn enter(metrics: &Metrics) -> InFlight {
        metrics.requests_in_flight.inc();
        InFlight(metrics.requests_in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn record_error(metrics: &Metrics, err: &GatewayError, key: &str) {
    match err {
        GatewayError::Unauthorized(reason) => metrics
            .auth_failures_total
            .with_label_values(&[reason.label()])
            .inc(),
        GatewayError::RateLimited { scope, .. } => metrics
            .rate_limited_total
            .with_label_values(&[key, scope.label()])
            .inc(),
        // Upstream failures are counted by kind where they happen (upstream.rs).
        _ => {}
    }
}

/// The path as it may appear in logs: the token in a callback URL is that route's
/// credential, so it is never written down.
fn loggable_path(path: &str) -> String {
    match path.strip_prefix("/callbacks/runway/") {
        Some(_) => "/callbacks/runway/{token}".to_string(),
        None => path.to_string(),
    }
}

/// Keeps a caller's request id when it is short and plain, so traces join across systems.
fn incoming_request_id(request: &Request<Body>) -> Option<String> {
    let value = request.headers().get(&REQUEST_ID)?.to_str().ok()?;
    let plain = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    plain.then(|| value.to_string())
}

fn new_request_id() -> String {
    hex::encode(rand::random::<[u8; 12]>())
}
