//! Operational endpoints that need no credential: `/healthz` (the process answers),
//! `/readyz` (config loaded and the ledger reachable) and `/metrics` (Prometheus text).

use crate::body::{self, Body};
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::quota::Store;
use crate::route::{Route, RouteKind};
use http::{header, HeaderValue, Request, Response, StatusCode};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// The content type Prometheus expects for the text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Flipped to false when shutdown starts, so load balancers stop sending traffic first.
#[derive(Debug, Default)]
pub struct Readiness {
    draining: AtomicBool,
}

impl Readiness {
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
pub struct OpsService {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    store: Arc<dyn Store>,
}

impl OpsService {
    pub fn new(
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        store: Arc<dyn Store>,
    ) -> OpsService {
        OpsService {
            metrics,
            readiness,
            store,
        }
    }

    async fn answer(self, kind: RouteKind) -> Result<Response<Body>, GatewayError> {
        match kind {
            RouteKind::Health => Ok(json(StatusCode::OK, r#"{"status":"ok"}"#)),
            RouteKind::Ready if self.readiness.is_draining() => Err(
                GatewayError::ServiceUnavailable("shutting down: not accepting new work".into()),
            ),
            RouteKind::Ready => match self.store.ping().await {
                Ok(()) => Ok(json(StatusCode::OK, r#"{"status":"ready"}"#)),
                Err(err) => Err(GatewayError::ServiceUnavailable(format!(
                    "the ledger is not reachable: {err}"
                ))),
            },
            RouteKind::Metrics => Ok(metrics_response(&self.metrics)),
            other => Err(GatewayError::Internal(format!(
                "route {other:?} dispatched to the operations service"
            ))),
        }
    }
}

pub fn metrics_response(metrics: &Metrics) -> Response<Body> {
    let mut response = Response::new(body::full(metrics.render()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROMETHEUS_TEXT),
    );
    response
}

fn json(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

impl tower::Service<Request<Body>> for OpsService {
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, GatewayError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let kind = request.extensions().get::<Route>().map(|r| r.kind.clone());
        let service = self.clone();
        Box::pin(async move {
            match kind {
                Some(kind) => service.answer(kind).await,
                None => Err(GatewayError::Internal(
                    "request reached ops without a route".into(),
                )),
            }
        })
    }
}
