//! Routing: method + path → `Route`. Unknown paths are answered 404 and never forwarded.
//!
//! `RouteLayer` puts the matched `Route` into the request's extensions and names it in the
//! `RequestContext`; later layers act on `Route::kind` instead of looking at the path again.

use crate::body::Body;
use crate::context::RequestContext;
use crate::error::GatewayError;
use crate::snapshot::Snapshot;
use http::{Method, Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteKind {
    /// `POST /runway/pro/generate`: validated, rewritten, reserved, forwarded.
    RunwayGenerate,
    /// `POST /runway/feed`: forwarded (owner-checked once the ledger exists).
    RunwayFeed,
    /// `POST /callbacks/runway/{token}`: the upstream reporting a task; no Bearer.
    RunwayCallback {
        token: String,
    },
    Health,
    Ready,
    Metrics,
    Admin,
}

impl RouteKind {
    /// Routes that carry a caller's credential and go to the upstream.
    pub fn is_proxied(&self) -> bool {
        matches!(self, RouteKind::RunwayGenerate | RouteKind::RunwayFeed)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Bounded label for metrics and logs.
    pub name: &'static str,
    pub kind: RouteKind,
}

/// The table of known routes, built from one config snapshot.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// Whether `/metrics` is served on the main listener (else on `server.metrics_listen`).
    pub metrics_on_main_listener: bool,
}

impl RouteTable {
    pub fn from_config(config: &crate::config::Config) -> RouteTable {
        RouteTable {
            metrics_on_main_listener: config.server.metrics_listen.is_none(),
        }
    }

    /// Finds the route for a request, or says why there is none.
    pub fn resolve(&self, method: &Method, path: &str) -> Result<Route, GatewayError> {
        let (name, kind, allowed) = match path {
            "/runway/pro/generate" => ("runway_generate", RouteKind::RunwayGenerate, Method::POST),
            "/runway/feed" => ("runway_feed", RouteKind::RunwayFeed, Method::POST),
            "/healthz" => ("healthz", RouteKind::Health, Method::GET),
            "/readyz" => ("readyz", RouteKind::Ready, Method::GET),
            "/metrics" if self.metrics_on_main_listener => {
                ("metrics", RouteKind::Metrics, Method::GET)
            }
            _ => {
                if let Some(token) = path.strip_prefix("/callbacks/runway/") {
                    if !token.is_empty() && !token.contains('/') {
                        let kind = RouteKind::RunwayCallback {
                            token: token.to_string(),
                        };
                        return check_method(method, Method::POST, path, "runway_callback", kind);
                    }
                }
                if path == "/admin" || path.starts_with("/admin/") {
                    return Ok(Route {
                        name: "admin",
                        kind: RouteKind::Admin,
                    });
                }
                return Err(GatewayError::NotFound(format!(
                    "no route for {method} {path}: gatehouse forwards only the routes in its route table"
                )));
            }
        };
        check_method(method, allowed, path, name, kind)
    }
}

fn check_method(
    method: &Method,
    allowed: Method,
    path: &str,
    name: &'static str,
    kind: RouteKind,
) -> Result<Route, GatewayError> {
    if *method == allowed || (allowed == Method::GET && *method == Method::HEAD) {
        Ok(Route { name, kind })
    } else {
        Err(GatewayError::MethodNotAllowed(format!(
            "{path} accepts {allowed}, not {method}"
        )))
    }
}

/// Resolves the route of each request against the snapshot in its extensions.
#[derive(Clone, Default)]
pub struct RouteLayer;

impl<S> tower::Layer<S> for RouteLayer {
    type Service = RouteService<S>;
    fn layer(&self, inner: S) -> RouteService<S> {
        RouteService { inner }
    }
}

#[derive(Clone)]
pub struct RouteService<S> {
    inner: S,
}

impl<S> tower::Service<Request<Body>> for RouteService<S>
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

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let snapshot = match Snapshot::of(&request) {
            Ok(snapshot) => snapshot,
            Err(err) => return Box::pin(async move { Err(err) }),
        };
        let route = snapshot
            .routes
            .resolve(request.method(), request.uri().path());
        if let Some(context) = request.extensions().get::<Arc<RequestContext>>() {
            context.set_route(route.as_ref().map(|r| r.name).unwrap_or("unknown"));
        }
        match route {
            Ok(route) => {
                request.extensions_mut().insert(route);
                Box::pin(self.inner.call(request))
            }
            Err(err) => Box::pin(async move { Err(err) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_known_routes_and_refuses_others() {
        let table = RouteTable {
            metrics_on_main_listener: true,
        };
        let generate = table
            .resolve(&Method::POST, "/runway/pro/generate")
            .unwrap();
        assert_eq!(generate.kind, RouteKind::RunwayGenerate);
        assert_eq!(
            table
                .resolve(&Method::POST, "/callbacks/runway/abc123")
                .unwrap()
                .kind,
            RouteKind::RunwayCallback {
                token: "abc123".into()
            }
        );
        assert!(matches!(
            table.resolve(&Method::GET, "/runway/pro/generate"),
            Err(GatewayError::MethodNotAllowed(_))
        ));
        assert!(matches!(
            table.resolve(&Method::POST, "/runway/pro/generate/extra"),
            Err(GatewayError::NotFound(_))
        ));
        assert!(matches!(
            table.resolve(&Method::POST, "/callbacks/runway/a/b"),
            Err(GatewayError::NotFound(_))
        ));
        let no_metrics = RouteTable {
            metrics_on_main_listener: false,
        };
        assert!(no_metrics.resolve(&Method::GET, "/metrics").is_err());
    }
}
