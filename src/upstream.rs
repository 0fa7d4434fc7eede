//! The upstream client: the innermost service. Sends the request to `upstream.base_url` with
//! the single upstream Bearer token in place of the caller's credential.
//!
//! - hop-by-hop headers are stripped both ways; `X-Request-Id` (set by `observe`) goes along;
//! - connect failures → 502, no answer within `upstream.timeout_ms` → 504;
//! - the upstream's own answers, errors included, are passed back unchanged, body streamed;
//! - nothing is retried by gatehouse. (hyper's pool re-sends a request only when the pooled
//!   connection was closed before a single byte of it was written, which cannot charge twice.)
//!
//! Records the upstream status and duration in the `RequestContext`.

use crate::body::{self, Body};
use crate::config::UpstreamConfig;
use crate::context::RequestContext;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::route::{Route, RouteKind};
use crate::snapshot::Snapshot;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// A pooled HTTP/1.1 + HTTP/2 client (TLS via rustls with the Mozilla roots).
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<HttpsConnector<HttpConnector>, Body>,
}

impl UpstreamClient {
    pub fn new(config: &UpstreamConfig) -> UpstreamClient {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_millis(config.connect_timeout_ms)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(config.pool_max_idle)
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        UpstreamClient { client }
    }

    /// Sends one request with the upstream token, bounded by `timeout_ms` until the
    /// response headers arrive. Errors are classified and counted in `metrics`.
    pub async fn send(
        &self,
        config: &UpstreamConfig,
        mut request: Request<Body>,
        metrics: &Metrics,
    ) -> Result<Response<Body>, GatewayError> {
        let path_and_query = request
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        let uri: Uri = format!("{}{}", config.base_url, path_and_query)
            .parse()
            .map_err(|err| GatewayError::Internal(format!("cannot build upstream URI: {err}")))?;
        *request.uri_mut() = uri;
        *request.version_mut() = http::Version::HTTP_11;
        strip_hop_by_hop(request.headers_mut());
        let headers = request.headers_mut();
        headers.remove(header::HOST);
        // Callers' other credential headers (some SDKs send the key twice) and cookies are
        // for gatehouse, never for the upstream.
        for name in ["x-api-key", "api-key", "cookie"] {
            headers.remove(name);
        }
        // gatehouse reads the JSON of answers it accounts for (task ids, usage, statuses);
        // a compressed answer would hide them.
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let mut bearer = HeaderValue::from_str(&format!("Bearer {}", config.token().expose()))
            .map_err(|_| {
                GatewayError::Internal(
                    "upstream.token contains characters not allowed in a header".into(),
                )
            })?;
        bearer.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, bearer);

        let timeout = Duration::from_millis(config.timeout_ms);
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Err(_) => {
                metrics
                    .upstream_errors_total
                    .with_label_values(&["timeout"])
                    .inc();
                Err(GatewayError::UpstreamTimeout {
                    after_ms: config.timeout_ms,
                })
            }
            Ok(Err(err)) => {
                let kind = if err.is_connect() {
                    "connect"
                } else {
                    "protocol"
                };
                metrics
                    .upstream_errors_total
                    .with_label_values(&[kind])
                    .inc();
                tracing::warn!(kind, error = %error_chain(&err), "upstream request failed");
                Err(GatewayError::UpstreamUnavailable(if err.is_connect() {
                    "cannot connect to the upstream".to_string()
                } else {
                    "the upstream closed the connection without a complete answer".to_string()
                }))
            }
            Ok(Ok(response)) => {
                if response.status().is_server_error() {
                    metrics
                        .upstream_errors_total
                        .with_label_values(&["status_5xx"])
                        .inc();
                }
                if matches!(response.status().as_u16(), 401 | 403) {
                    // Callers authenticated with gatehouse, not the upstream: a 401/403 from
                    // the upstream means gatehouse's own upstream.token is wrong or revoked.
                    metrics
                        .upstream_errors_total
                        .with_label_values(&["upstream_auth"])
                        .inc();
                    tracing::error!(
                        status = response.status().as_u16(),
                        "the upstream refused gatehouse's upstream.token; every caller is affected"
                    );
                }
                let (mut parts, incoming) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Ok(Response::from_parts(parts, body::boxed(incoming)))
            }
        }
    }
}

/// Reads an upstream answer whole, bounded in size and in time: `upstream.timeout_ms` bounds
/// only the wait for the headers, and an answer that stalls after them must not hold a
/// settlement (or the reconciler) forever.
pub async fn read_answer(
    answer: Body,
    limit: usize,
    config: &UpstreamConfig,
) -> Result<bytes::Bytes, GatewayError> {
    let timeout = Duration::from_millis(config.timeout_ms);
    match tokio::time::timeout(timeout, body::collect_limited(answer, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(body::CollectError::TooLarge)) => Err(GatewayError::UpstreamUnavailable(format!(
            "the upstream's answer is larger than the {limit} bytes gatehouse reads to account for it"
        ))),
        Ok(Err(body::CollectError::Read(err))) => Err(GatewayError::UpstreamUnavailable(format!(
            "the upstream's answer broke off: {err}"
        ))),
        Err(_) => Err(GatewayError::UpstreamTimeout {
            after_ms: config.timeout_ms,
        }),
    }
}

/// The full error chain of a hyper client error, for logs (it names no credential).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Removes the headers that describe one connection rather than the request (RFC 9110 §7.6.1),
/// including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

/// The innermost service of the proxy stack: forwards to the upstream.
#[derive(Clone)]
pub struct UpstreamService {
    metrics: Arc<Metrics>,
}

impl UpstreamService {
    pub fn new(metrics: Arc<Metrics>) -> UpstreamService {
        UpstreamService { metrics }
    }
}

impl tower::Service<Request<Body>> for UpstreamService {
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, GatewayError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let snapshot = Snapshot::of(&request)?;
            let context = request.extensions().get::<Arc<RequestContext>>().cloned();
            let route_name = request
                .extensions()
                .get::<Route>()
                .map_or_else(|| Arc::from("unknown"), |r| r.name.clone());
            let kind = request.extensions().get::<Route>().map(|r| r.kind.clone());
            let started = Instant::now();
            let result = snapshot
                .upstream
                .send(&snapshot.config.upstream, request, &metrics)
                .await;
            let elapsed = started.elapsed();
            metrics
                .upstream_duration_seconds
                .with_label_values(&[route_name])
                .observe(elapsed.as_secs_f64());
            if let (Ok(response), Some(context)) = (&result, context) {
                context.set_upstream(response.status().as_u16(), elapsed);
            }
            // Only routes marked `stream = true` may send their answer for longer than the
            // upstream timeout; any other answer must be complete within it.
            let streams = matches!(&kind, Some(RouteKind::Passthrough(route)) if route.stream);
            if streams {
                return result;
            }
            let limit = Duration::from_millis(snapshot.config.upstream.timeout_ms);
            result.map(|response| response.map(|answer| body::with_deadline(answer, limit)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::CONTENT_TYPE));
    }
}
