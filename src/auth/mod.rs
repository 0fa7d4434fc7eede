//! Authentication: `Authorization: Bearer <credential>` → `Principal`.
//!
//! `AuthLayer` authenticates requests to proxied routes (`RouteKind::is_proxied`) against the
//! `Authenticator` of the request's config snapshot. On success it puts the `Principal` into
//! the request's extensions, records it in the `RequestContext`, and removes the caller's
//! `Authorization` header so the credential never travels upstream. On failure it returns
//! `GatewayError::Unauthorized` with a fixed reason label and logs that label, never the
//! credential. Other routes (health, metrics, admin, callbacks) pass through untouched.
//!
//! A credential is either a static API key (`api_key`: only its SHA-256 is configured) or,
//! when `[auth.jwt]` is configured and the credential has the shape of a JWT, a JWT (`jwt`).

mod api_key;
mod jwt;

pub use api_key::hash_key;

use crate::body::Body;
use crate::config::{Config, KeyPolicy};
use crate::context::RequestContext;
use crate::error::{AuthFailure, GatewayError};
use crate::route::Route;
use crate::snapshot::Snapshot;
use http::{header::AUTHORIZATION, Request, Response};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Who is calling, as established by authentication. Inserted into request extensions.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The key id: the `[[keys]] id`, or for a JWT the value of `auth.jwt.key_claim`.
    pub key_id: String,
    /// The value of the `key` metrics label: the configured key id, or `"_jwt"` for JWT
    /// principals without a `[[keys]]` entry (keeps label cardinality bounded).
    pub metrics_label: String,
    /// Limits and quota: the key's own, or `[defaults]`.
    pub policy: Arc<KeyPolicy>,
    pub credential: CredentialKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    ApiKey,
    Jwt,
}

/// Label shared by JWT principals that have no `[[keys]]` entry.
pub const UNLISTED_JWT_LABEL: &str = "_jwt";

/// Verifies credentials against one config snapshot.
pub struct Authenticator {
    api_keys: api_key::ApiKeyTable,
    jwt: Option<jwt::JwtVerifier>,
    /// Every `[[keys]]` entry's policy by id, shared by all of that key's principals.
    policies: HashMap<String, Arc<KeyPolicy>>,
    /// `[defaults]`, shared by all JWT principals without a `[[keys]]` entry.
    defaults: Arc<KeyPolicy>,
}

impl Authenticator {
    /// Builds the key table and loads the JWT keys; returns every problem found, each naming
    /// its setting (e.g. `auth.jwt.public_key_file: cannot read /x: …`).
    pub fn from_config(config: &Config) -> Result<Authenticator, Vec<String>> {
        let policies: HashMap<String, Arc<KeyPolicy>> = config
            .keys
            .iter()
            .map(|key| (key.id.clone(), Arc::new(key.policy.clone())))
            .collect();
        let mut problems = Vec::new();
        let jwt = config
            .auth
            .jwt
            .as_ref()
            .and_then(|jwt| jwt::JwtVerifier::from_config(jwt, &mut problems));
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Authenticator {
            api_keys: api_key::ApiKeyTable::from_config(config, &policies),
            jwt,
            policies,
            defaults: Arc::new(config.defaults.clone()),
        })
    }

    /// Authenticates the request's `Authorization: Bearer` credential.
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<Principal, AuthFailure> {
        let credential = bearer_credential(headers)?;
        match &self.jwt {
            // API keys (hex or base64 from a random generator) never contain dots, so the
            // shape decides the path; a JWT is never also tried as an API key.
            Some(verifier) if jwt::looks_like_jwt(credential) => {
                let key_id = verifier.verify(credential)?;
                Ok(self.jwt_principal(key_id))
            }
            _ => self.api_keys.authenticate(credential),
        }
    }

    /// Whether `[auth.jwt]` is configured.
    pub fn accepts_jwt(&self) -> bool {
        self.jwt.is_some()
    }

    fn jwt_principal(&self, key_id: String) -> Principal {
        let (metrics_label, policy) = match self.policies.get(&key_id) {
            Some(policy) => (key_id.clone(), policy.clone()),
            // Any number of distinct subjects may arrive; one label keeps metrics bounded.
            None => (UNLISTED_JWT_LABEL.to_string(), self.defaults.clone()),
        };
        Principal {
            key_id,
            metrics_label,
            policy,
            credential: CredentialKind::Jwt,
        }
    }
}

/// The credential of the one `Authorization: Bearer <credential>` header.
fn bearer_credential(headers: &http::HeaderMap) -> Result<&str, AuthFailure> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthFailure::MissingCredential)?;
    // Two credentials: refuse rather than guess which one the caller meant.
    if values.next().is_some() {
        return Err(AuthFailure::MalformedHeader);
    }
    // `to_str` fails on anything but visible ASCII (and tab).
    let text = value.to_str().map_err(|_| AuthFailure::MalformedHeader)?;
    let (scheme, credential) = text
        .trim()
        .split_once(' ')
        .ok_or(AuthFailure::MalformedHeader)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthFailure::MalformedHeader);
    }
    let credential = credential.trim_matches([' ', '\t']);
    if credential.is_empty() || credential.contains([' ', '\t']) {
        return Err(AuthFailure::MalformedHeader);
    }
    Ok(credential)
}

/// Authenticates requests to proxied routes; see the module documentation.
#[derive(Clone, Default)]
pub struct AuthLayer;

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService { inner }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
}

impl<S> tower::Service<Request<Body>> for AuthService<S>
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
        let route = request.extensions().get::<Route>();
        let route_name =
            route.map_or_else(|| "unknown".to_string(), |route| route.name.to_string());
        // A request without a `Route` is authenticated too: if the stack were ever assembled
        // without the route layer, failing closed is the safe mistake.
        if route.is_some_and(|route| !route.kind.is_proxied()) {
            return Box::pin(self.inner.call(request));
        }
        let snapshot = match Snapshot::of(&request) {
            Ok(snapshot) => snapshot,
            Err(err) => return Box::pin(async move { Err(err) }),
        };
        let context = request.extensions().get::<Arc<RequestContext>>().cloned();
        match snapshot.authenticator.authenticate(request.headers()) {
            Ok(principal) => {
                request.headers_mut().remove(AUTHORIZATION);
                if let Some(context) = &context {
                    context.set_principal(&principal);
                }
                request.extensions_mut().insert(principal);
                Box::pin(self.inner.call(request))
            }
            Err(reason) => {
                // The label only: the credential must never reach a log line.
                tracing::info!(
                    reason = reason.label(),
                    route = route_name,
                    request_id = context.as_ref().map_or("-", |c| c.request_id.as_str()),
                    "authentication failed"
                );
                Box::pin(async move { Err(GatewayError::Unauthorized(reason)) })
            }
        }
    }
}

/// Shared by the tests of this module and its submodules.
#[cfg(test)]
mod test_support {
    use crate::config::Config;
    use http::HeaderMap;

    /// The API key configured as `team-a` by `config`.
    pub const API_KEY: &str = "gh-test-key-0123456789abcdef";
    pub const HS_SECRET: &str = "test-only-hmac-secret-of-32-bytes!";

    pub fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    /// A valid config: key `team-a` (API key `API_KEY`, rate 7) plus `extra` TOML.
    pub fn config(extra: &str) -> Config {
        try_config(extra).expect("test config is valid")
    }

    pub fn try_config(extra: &str) -> Result<Config, crate::config::ConfigError> {
        let text = format!(
            r#"
            [upstream]
            base_url = "http://127.0.0.1:9"
            token = "upstream-token"

            [defaults]
            rate_per_second = 1
            burst = 2

            [[keys]]
            id = "team-a"
            key_sha256 = "{}"
            rate_per_second = 7

            {extra}
            "#,
            super::hash_key(API_KEY)
        );
        Config::from_toml(&text, &|_: &str| -> Option<String> { None })
    }

    pub fn bearer(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {value}").parse().unwrap(),
        );
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use crate::route::RouteKind;
    use http::{HeaderMap, HeaderValue};
    use std::sync::Mutex;
    use tower::{Layer, Service, ServiceExt};

    fn authenticator() -> Authenticator {
        Authenticator::from_config(&config("")).unwrap()
    }

    fn with_authorization(value: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_bytes(value).unwrap());
        headers
    }

    #[test]
    fn api_key_authenticates_as_its_key() {
        let auth = authenticator();
        let principal = auth.authenticate(&bearer(API_KEY)).unwrap();
        assert_eq!(principal.key_id, "team-a");
        assert_eq!(principal.metrics_label, "team-a");
        assert_eq!(principal.credential, CredentialKind::ApiKey);
        assert_eq!(principal.policy.rate_per_second, 7.0);
        // The scheme is case-insensitive, and principals share the key's policy.
        let again = auth
            .authenticate(&with_authorization(format!("bEaReR {API_KEY}").as_bytes()))
            .unwrap();
        assert!(Arc::ptr_eq(&principal.policy, &again.policy));
    }

    #[test]
    fn unknown_key_is_refused() {
        let auth = authenticator();
        assert_eq!(
            auth.authenticate(&bearer("not-a-configured-key"))
                .unwrap_err(),
            AuthFailure::UnknownKey
        );
        // A prefix or an extension of a valid key is a different key.
        assert_eq!(
            auth.authenticate(&bearer(&API_KEY[..API_KEY.len() - 1]))
                .unwrap_err(),
            AuthFailure::UnknownKey
        );
        // Without [auth.jwt], a JWT-shaped credential is just an unknown API key.
        assert_eq!(
            auth.authenticate(&bearer("eyJh.eyJz.c2ln")).unwrap_err(),
            AuthFailure::UnknownKey
        );
    }

    #[test]
    fn missing_credential() {
        assert_eq!(
            authenticator().authenticate(&HeaderMap::new()).unwrap_err(),
            AuthFailure::MissingCredential
        );
    }

    #[test]
    fn malformed_headers() {
        let auth = authenticator();
        for value in [
            format!("Basic {API_KEY}").as_bytes(),
            format!("Bearer{API_KEY}").as_bytes(),
            format!("Bearer {API_KEY} extra").as_bytes(),
            b"Bearer",
            b"Bearer    ",
            b"",
            API_KEY.as_bytes(),
            "Bearer clé".as_bytes(),
        ] {
            assert_eq!(
                auth.authenticate(&with_authorization(value)).unwrap_err(),
                AuthFailure::MalformedHeader,
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
        let mut two = bearer(API_KEY);
        two.append(AUTHORIZATION, HeaderValue::from_static("Bearer other"));
        assert_eq!(
            auth.authenticate(&two).unwrap_err(),
            AuthFailure::MalformedHeader
        );
    }

    #[test]
    fn failures_never_contain_the_credential() {
        let secret = "very-secret-credential-value";
        let err =
            GatewayError::Unauthorized(authenticator().authenticate(&bearer(secret)).unwrap_err());
        assert!(!err.to_string().contains(secret));
        assert!(!err.message().contains(secret));
    }

    /// What the inner service saw.
    #[derive(Clone, Default)]
    struct Seen {
        principal: Option<Principal>,
        authorization: Option<HeaderValue>,
    }

    fn request(route: RouteKind, name: &'static str, authorization: Option<&str>) -> Request<Body> {
        let mut request = Request::post("/runway/pro/generate")
            .body(crate::body::empty())
            .unwrap();
        if let Some(value) = authorization {
            request
                .headers_mut()
                .insert(AUTHORIZATION, value.parse().unwrap());
        }
        let snapshot = Arc::new(Snapshot::build(config("")).unwrap());
        request.extensions_mut().insert(snapshot);
        request.extensions_mut().insert(Route::new(name, route));
        request
            .extensions_mut()
            .insert(RequestContext::new("req-1".to_string()));
        request
    }

    type Inner = tower::util::BoxCloneService<Request<Body>, Response<Body>, GatewayError>;

    /// The layer around an inner service that records what it saw.
    fn service() -> (AuthService<Inner>, Arc<Mutex<Option<Seen>>>) {
        let seen = Arc::new(Mutex::new(None));
        let record = seen.clone();
        let inner = tower::service_fn(move |request: Request<Body>| {
            let record = record.clone();
            async move {
                *record.lock().unwrap() = Some(Seen {
                    principal: request.extensions().get::<Principal>().cloned(),
                    authorization: request.headers().get(AUTHORIZATION).cloned(),
                });
                Ok::<_, GatewayError>(Response::new(crate::body::empty()))
            }
        });
        (AuthLayer.layer(Inner::new(inner)), seen)
    }

    #[tokio::test]
    async fn layer_inserts_principal_and_strips_authorization() {
        let (service, seen) = service();
        let req = request(
            RouteKind::RunwayGenerate,
            "runway_generate",
            Some(&format!("Bearer {API_KEY}")),
        );
        let context = req
            .extensions()
            .get::<Arc<RequestContext>>()
            .unwrap()
            .clone();
        service.oneshot(req).await.unwrap();
        let seen = seen.lock().unwrap().clone().expect("inner service called");
        assert_eq!(seen.principal.unwrap().key_id, "team-a");
        assert_eq!(
            seen.authorization, None,
            "the credential must not go upstream"
        );
        let facts = context.facts();
        assert_eq!(facts.key_id.as_deref(), Some("team-a"));
        assert_eq!(facts.key_label.as_deref(), Some("team-a"));
    }

    #[tokio::test]
    async fn layer_refuses_bad_credentials_without_calling_inner() {
        let (svc, seen) = service();
        let req = request(RouteKind::RunwayFeed, "runway_feed", Some("Bearer wrong"));
        let err = svc.oneshot(req).await.unwrap_err();
        assert_eq!(err, GatewayError::Unauthorized(AuthFailure::UnknownKey));
        assert!(seen.lock().unwrap().is_none());

        let (svc, _) = service();
        let req = request(RouteKind::RunwayFeed, "runway_feed", None);
        let err = svc.oneshot(req).await.unwrap_err();
        assert_eq!(
            err,
            GatewayError::Unauthorized(AuthFailure::MissingCredential)
        );
    }

    #[tokio::test]
    async fn layer_leaves_other_routes_untouched() {
        for (kind, name) in [
            (RouteKind::Health, "healthz"),
            (RouteKind::Admin, "admin"),
            (
                RouteKind::RunwayCallback {
                    token: "t".to_string(),
                },
                "runway_callback",
            ),
        ] {
            let (service, seen) = service();
            // Not an API key: it must neither be checked nor removed (admin has its own token).
            let req = request(kind, name, Some("Bearer admin-token"));
            service.oneshot(req).await.unwrap();
            let seen = seen.lock().unwrap().clone().expect("inner service called");
            assert!(seen.principal.is_none(), "{name}");
            assert_eq!(seen.authorization.unwrap(), "Bearer admin-token", "{name}");
        }
    }

    #[tokio::test]
    async fn layer_logs_the_reason_but_not_the_credential() {
        #[derive(Clone, Default)]
        struct Capture(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Capture {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();

        let secret = "Bearer very-secret-credential-value";
        let (mut service, _) = service();
        let req = request(RouteKind::RunwayGenerate, "runway_generate", Some(secret));
        // The layer decides (and logs) in `call`, before the returned future is polled.
        let future = tracing::subscriber::with_default(subscriber, || service.call(req));
        assert!(future.await.is_err());

        let log = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        assert!(log.contains("authentication failed"), "{log}");
        assert!(log.contains("unknown_key"), "{log}");
        assert!(log.contains("req-1"), "{log}");
        assert!(!log.contains("very-secret"), "{log}");
    }
}
