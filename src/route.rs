//! Routing: method + path → `Route`. Unknown paths are answered 404 and never forwarded.
//!
//! The table is the config's `[[routes]]` (first match wins) plus gatehouse's own endpoints.
//! `RouteLayer` puts the matched `Route` into the request's extensions and names it in the
//! `RequestContext`; later layers act on `Route::kind` instead of looking at the path again.

use crate::body::{Body, ResponseFuture};
use crate::config::{Config, RouteConfig, RouteKindConfig};
use crate::context::RequestContext;
use crate::error::GatewayError;
use crate::snapshot::Snapshot;
use http::{Method, Request, Response};
use std::sync::Arc;
use std::task::{Context, Poll};

#[derive(Debug, Clone, PartialEq)]
pub enum RouteKind {
    /// `POST /runway/pro/generate`: validated, rewritten, reserved, forwarded.
    RunwayGenerate,
    /// `POST /runway/feed`: owner-checked, forwarded, settles terminal answers.
    RunwayFeed,
    /// Any other configured upstream route.
    Passthrough(Arc<RouteConfig>),
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
        matches!(
            self,
            RouteKind::RunwayGenerate | RouteKind::RunwayFeed | RouteKind::Passthrough(_)
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Bounded label for metrics and logs: the route's configured name.
    pub name: Arc<str>,
    pub kind: RouteKind,
    /// Values of `{name}` segments in the path pattern.
    pub params: Vec<(String, String)>,
}

impl Route {
    /// A route without path parameters (gatehouse's own endpoints; tests).
    pub fn new(name: &str, kind: RouteKind) -> Route {
        Route {
            name: Arc::from(name),
            kind,
            params: Vec::new(),
        }
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// One `[[routes]]` entry, ready to match.
#[derive(Debug, Clone)]
struct TableEntry {
    method: Method,
    segments: Vec<Segment>,
    /// The pattern ends in `/*`: any number (≥ 1) of further segments.
    prefix: bool,
    name: Arc<str>,
    kind: RouteKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

/// The table of known routes, built from one config snapshot.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    entries: Vec<TableEntry>,
    /// Whether `/metrics` is served on the main listener (else on `server.metrics_listen`).
    metrics_on_main_listener: bool,
}

impl RouteTable {
    pub fn from_config(config: &Config) -> RouteTable {
        let entries = config
            .routes
            .iter()
            .map(|route| {
                let mut parts: Vec<&str> = route.path.trim_start_matches('/').split('/').collect();
                let prefix = parts.last() == Some(&"*");
                if prefix {
                    parts.pop();
                }
                let segments = parts
                    .into_iter()
                    .map(
                        |part| match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                            Some(param) => Segment::Param(param.to_string()),
                            None => Segment::Literal(part.to_string()),
                        },
                    )
                    .collect();
                let kind = match route.kind {
                    RouteKindConfig::RunwayGenerate => RouteKind::RunwayGenerate,
                    RouteKindConfig::RunwayFeed => RouteKind::RunwayFeed,
                    RouteKindConfig::Passthrough => RouteKind::Passthrough(Arc::new(route.clone())),
                };
                TableEntry {
                    // Validation checked the method.
                    method: Method::from_bytes(route.method.as_bytes()).unwrap_or(Method::POST),
                    segments,
                    prefix,
                    name: Arc::from(route.name.as_str()),
                    kind,
                }
            })
            .collect();
        RouteTable {
            entries,
            metrics_on_main_listener: config.server.metrics_listen.is_none(),
        }
    }

    /// Finds the route for a request, or says why there is none.
    pub fn resolve(&self, method: &Method, path: &str) -> Result<Route, GatewayError> {
        // Paths are forwarded as they are; a server behind the upstream that normalises
        // "/mj/submit/../../runway/feed" would otherwise reach a route gatehouse never checked.
        let lowered = path.to_ascii_lowercase();
        if path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
            || lowered.contains("%2e")
            || lowered.contains("%2f")
            || lowered.contains("%5c")
            || path.contains('\\')
        {
            return Err(GatewayError::BadRequest(
                "the path may not contain dot segments or encoded '.', '/' or '\\'".into(),
            ));
        }
        match path {
            "/healthz" => return only_get(method, path, Route::new("healthz", RouteKind::Health)),
            "/readyz" => return only_get(method, path, Route::new("readyz", RouteKind::Ready)),
            "/metrics" if self.metrics_on_main_listener => {
                return only_get(method, path, Route::new("metrics", RouteKind::Metrics))
            }
            _ => {}
        }
        if let Some(token) = path.strip_prefix("/callbacks/runway/") {
            if !token.is_empty() && !token.contains('/') {
                let kind = RouteKind::RunwayCallback {
                    token: token.to_string(),
                };
                return if *method == Method::POST {
                    Ok(Route::new("runway_callback", kind))
                } else {
                    Err(GatewayError::MethodNotAllowed(format!(
                        "/callbacks/runway/{{token}} accepts POST, not {method}"
                    )))
                };
            }
            // The token is a credential: never echoed, not even for a malformed callback path.
            return Err(GatewayError::NotFound(
                "no route for this /callbacks/runway/ path".into(),
            ));
        }
        if path == "/admin" || path.starts_with("/admin/") {
            return Ok(Route::new("admin", RouteKind::Admin));
        }

        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let mut allowed = Vec::new();
        for entry in &self.entries {
            let Some(params) = entry.matches(&segments) else {
                continue;
            };
            if entry.method == *method {
                return Ok(Route {
                    name: entry.name.clone(),
                    kind: entry.kind.clone(),
                    params,
                });
            }
            allowed.push(entry.method.to_string());
        }
        if allowed.is_empty() {
            Err(GatewayError::NotFound(format!(
                "no route for {method} {path}: gatehouse forwards only the routes in its route table ([[routes]])"
            )))
        } else {
            Err(GatewayError::MethodNotAllowed(format!(
                "{path} accepts {}, not {method}",
                allowed.join(", ")
            )))
        }
    }
}

impl TableEntry {
    /// The `{param}` values when `segments` fit this pattern.
    fn matches(&self, segments: &[&str]) -> Option<Vec<(String, String)>> {
        let fits_length = if self.prefix {
            segments.len() > self.segments.len()
                && segments[self.segments.len()..]
                    .iter()
                    .all(|s| !s.is_empty())
        } else {
            segments.len() == self.segments.len()
        };
        if !fits_length {
            return None;
        }
        let mut params = Vec::new();
        for (pattern, segment) in self.segments.iter().zip(segments) {
            match pattern {
                Segment::Literal(literal) if literal == segment => {}
                Segment::Param(name) if !segment.is_empty() => {
                    params.push((name.clone(), segment.to_string()))
                }
                _ => return None,
            }
        }
        Some(params)
    }
}

fn only_get(method: &Method, path: &str, route: Route) -> Result<Route, GatewayError> {
    if *method == Method::GET || *method == Method::HEAD {
        Ok(route)
    } else {
        Err(GatewayError::MethodNotAllowed(format!(
            "{path} accepts GET, not {method}"
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
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> ResponseFuture {
        let snapshot = match Snapshot::of(&request) {
            Ok(snapshot) => snapshot,
            Err(err) => return Box::pin(async move { Err(err) }),
        };
        let route = snapshot
            .routes
            .resolve(request.method(), request.uri().path());
        if let Some(context) = request.extensions().get::<Arc<RequestContext>>() {
            context.set_route(
                route
                    .as_ref()
                    .map(|r| r.name.clone())
                    .unwrap_or_else(|_| Arc::from("unknown")),
            );
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

    fn table(routes: &str) -> RouteTable {
        let text =
            format!("[upstream]\nbase_url = \"http://127.0.0.1:9\"\ntoken = \"t\"\n{routes}");
        RouteTable::from_config(&Config::from_toml(&text, &|_: &str| None).unwrap())
    }

    #[test]
    fn resolves_known_routes_and_refuses_others() {
        let table = table("");
        let generate = table
            .resolve(&Method::POST, "/runway/pro/generate")
            .unwrap();
        assert_eq!(generate.kind, RouteKind::RunwayGenerate);
        assert_eq!(&*generate.name, "runway_generate");
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
        assert!(table.resolve(&Method::GET, "/metrics").is_ok());
        for sneaky in [
            "/runway/feed/../pro/generate",
            "/runway/./feed",
            "/runway/%2e%2e/feed",
            "/runway%2Ffeed",
        ] {
            assert!(
                matches!(
                    table.resolve(&Method::POST, sneaky),
                    Err(GatewayError::BadRequest(_))
                ),
                "{sneaky}"
            );
        }
        let token_path = "/callbacks/runway/secret-token-123/x";
        let err = table.resolve(&Method::POST, token_path).unwrap_err();
        assert!(
            !err.message().contains("secret-token-123"),
            "{}",
            err.message()
        );
        let err = table
            .resolve(&Method::GET, "/callbacks/runway/secret-token-123")
            .unwrap_err();
        assert!(
            !err.message().contains("secret-token-123"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn patterns_match_params_and_prefixes_first_match_wins() {
        let table = table(
            r#"
[[routes]]
name = "suno_fetch"
method = "GET"
path = "/suno/fetch/{id}"
kind = "passthrough"

[[routes]]
name = "mj_imagine"
path = "/mj/submit/imagine"
kind = "passthrough"

[[routes]]
name = "mj_submit"
path = "/mj/submit/*"
kind = "passthrough"
"#,
        );
        let fetch = table.resolve(&Method::GET, "/suno/fetch/abc").unwrap();
        assert_eq!(&*fetch.name, "suno_fetch");
        assert_eq!(fetch.param("id"), Some("abc"));
        assert!(table.resolve(&Method::GET, "/suno/fetch/").is_err());
        assert!(table.resolve(&Method::GET, "/suno/fetch/a/b").is_err());
        assert_eq!(
            &*table
                .resolve(&Method::POST, "/mj/submit/imagine")
                .unwrap()
                .name,
            "mj_imagine"
        );
        assert_eq!(
            &*table
                .resolve(&Method::POST, "/mj/submit/blend")
                .unwrap()
                .name,
            "mj_submit"
        );
        assert!(table.resolve(&Method::POST, "/mj/submit").is_err());
        assert!(matches!(
            table.resolve(&Method::POST, "/suno/fetch/abc"),
            Err(GatewayError::MethodNotAllowed(m)) if m.contains("GET")
        ));
        assert!(
            table.resolve(&Method::POST, "/runway/feed").is_err(),
            "a [[routes]] table replaces the Runway defaults"
        );
    }
}
