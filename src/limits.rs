//! Request size and time limits (`server.max_body_bytes`, `server.request_timeout_ms`).
//!
//! A declared `Content-Length` over the limit is refused at once (413) without reading the
//! body; a streamed body is wrapped so that it fails once it passes the limit. The whole
//! inner call is bounded by the request timeout (504). Nothing is added to extensions.

use crate::body::{self, Body, ResponseFuture};
use crate::error::GatewayError;
use crate::snapshot::Snapshot;
use http::{header, Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

#[derive(Clone, Default)]
pub struct LimitsLayer;

impl<S> tower::Layer<S> for LimitsLayer {
    type Service = LimitsService<S>;
    fn layer(&self, inner: S) -> LimitsService<S> {
        LimitsService { inner }
    }
}

#[derive(Clone)]
pub struct LimitsService<S> {
    inner: S,
}

impl<S> tower::Service<Request<Body>> for LimitsService<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = GatewayError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, GatewayError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let snapshot = match Snapshot::of(&request) {
            Ok(snapshot) => snapshot,
            Err(err) => return Box::pin(async move { Err(err) }),
        };
        let limit = snapshot.config.server.max_body_bytes;
        let timeout_ms = snapshot.config.server.request_timeout_ms;

        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            return Box::pin(async move { Err(GatewayError::PayloadTooLarge { limit }) });
        }
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(
            parts,
            body::boxed(http_body_util::Limited::new(body, limit)),
        );

        let call: ResponseFuture = Box::pin(self.inner.call(request));
        Box::pin(async move {
            match tokio::time::timeout(Duration::from_millis(timeout_ms), call).await {
                Ok(result) => result,
                Err(_) => Err(GatewayError::RequestTimeout {
                    after_ms: timeout_ms,
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::sync::Arc;
    use tower::{Layer, ServiceExt};

    fn snapshot(max_body_bytes: usize) -> Arc<Snapshot> {
        let text = format!(
            "[server]\nmax_body_bytes = {max_body_bytes}\n[upstream]\nbase_url = \"http://127.0.0.1:9\"\ntoken = \"t\"\n"
        );
        Arc::new(Snapshot::build(Config::from_toml(&text, &|_: &str| None).unwrap()).unwrap())
    }

    #[tokio::test]
    async fn declared_content_length_over_the_limit_is_413() {
        let reached = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = reached.clone();
        let inner = tower::service_fn(move |_request: Request<Body>| {
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<_, GatewayError>(Response::new(body::empty())) }
        });
        let mut request = Request::new(body::full(&b"{}"[..]));
        request.extensions_mut().insert(snapshot(16));
        request
            .headers_mut()
            .insert(header::CONTENT_LENGTH, http::HeaderValue::from(17));

        let err = LimitsLayer.layer(inner).oneshot(request).await.unwrap_err();

        assert_eq!(err, GatewayError::PayloadTooLarge { limit: 16 });
        assert!(
            !reached.load(std::sync::atomic::Ordering::SeqCst),
            "refused before the inner service"
        );
    }
}
