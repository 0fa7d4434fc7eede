//! `GatewayError`: every way gatehouse refuses or fails a request, and the single
//! place where such an error becomes the upstream's JSON envelope
//! (`{"code": <status>, "msg": "…", "data": null}`).
//!
//! Layers return `Result<Response<Body>, GatewayError>`; only the outermost layer
//! (`observe`) turns the error into a response, so no layer builds an error body by hand.

use crate::body::{self, Body};
use http::{header, HeaderValue, Response, StatusCode};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// The request body or its headers are not what the route accepts; the text names the field.
    #[error("{0}")]
    BadRequest(String),
    /// No valid credential; the reason is a short, fixed label (metrics) and never contains the credential.
    #[error("unauthorized: {}", .0.message())]
    Unauthorized(AuthFailure),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The request contradicts what gatehouse knows (e.g. a callback vs the upstream's record).
    #[error("{0}")]
    Conflict(String),
    /// The key's quota (in points) cannot cover the price of this request.
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("request body is larger than the limit of {limit} bytes (server.max_body_bytes)")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("rate limit exceeded ({scope}); retry after {retry_after_s} s")]
    RateLimited {
        scope: RateLimitScope,
        retry_after_s: u64,
    },
    /// The upstream could not be reached or broke the connection.
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(String),
    #[error("upstream did not answer within {after_ms} ms (upstream.timeout_ms)")]
    UpstreamTimeout { after_ms: u64 },
    #[error("request did not complete within {after_ms} ms (server.request_timeout_ms)")]
    RequestTimeout { after_ms: u64 },
    #[error("{0}")]
    ServiceUnavailable(String),
    /// A bug or a broken dependency (e.g. the ledger); the text is for operators, not secrets.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Why authentication failed. The label is a fixed string: safe as a metric label and in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    MissingCredential,
    MalformedHeader,
    UnknownKey,
    MalformedToken,
    BadSignature,
    AlgorithmNotAllowed,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    MissingClaim,
    UnknownKid,
    /// `/admin/*` with a Bearer token that is not `[admin] token`.
    WrongAdminToken,
}

impl AuthFailure {
    /// Every label, for creating the metric series up front.
    pub const LABELS: &'static [&'static str] = &[
        "missing_credential",
        "malformed_header",
        "unknown_key",
        "malformed_token",
        "bad_signature",
        "algorithm_not_allowed",
        "expired",
        "not_yet_valid",
        "wrong_issuer",
        "wrong_audience",
        "missing_claim",
        "unknown_kid",
        "wrong_admin_token",
    ];

    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::MissingCredential => "missing_credential",
            AuthFailure::MalformedHeader => "malformed_header",
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::MalformedToken => "malformed_token",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::AlgorithmNotAllowed => "algorithm_not_allowed",
            AuthFailure::Expired => "expired",
            AuthFailure::NotYetValid => "not_yet_valid",
            AuthFailure::WrongIssuer => "wrong_issuer",
            AuthFailure::WrongAudience => "wrong_audience",
            AuthFailure::MissingClaim => "missing_claim",
            AuthFailure::UnknownKid => "unknown_kid",
            AuthFailure::WrongAdminToken => "wrong_admin_token",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            AuthFailure::MissingCredential => {
                "missing credential: send the header 'Authorization: Bearer <api key or JWT>'"
            }
            AuthFailure::MalformedHeader => {
                "malformed Authorization header: expected 'Bearer <api key or JWT>'"
            }
            AuthFailure::UnknownKey => "unknown API key",
            AuthFailure::MalformedToken => "malformed JWT",
            AuthFailure::BadSignature => "JWT signature is invalid",
            AuthFailure::AlgorithmNotAllowed => {
                "JWT algorithm is not allowed (auth.jwt.algorithms)"
            }
            AuthFailure::Expired => "JWT has expired (exp)",
            AuthFailure::NotYetValid => "JWT is not valid yet (nbf)",
            AuthFailure::WrongIssuer => "JWT issuer (iss) is not accepted",
            AuthFailure::WrongAudience => "JWT audience (aud) is not accepted",
            AuthFailure::MissingClaim => "JWT lacks a required claim",
            AuthFailure::UnknownKid => "JWT key id (kid) is unknown",
            AuthFailure::WrongAdminToken => "wrong admin token (see [admin] token)",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitScope {
    /// The caller's own limit (`keys[].rate_per_second` / `burst`, or `[defaults]`).
    Key,
    /// The global limit that protects the shared upstream token (`upstream.rate_per_second`).
    Global,
    /// One route's limit over all callers (`[[routes]] rate_per_second`).
    Route,
}

impl RateLimitScope {
    pub fn label(self) -> &'static str {
        match self {
            RateLimitScope::Key => "key",
            RateLimitScope::Global => "global",
            RateLimitScope::Route => "route",
        }
    }
}

impl std::fmt::Display for RateLimitScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RateLimitScope::Key => "per-key limit",
            RateLimitScope::Global => "global upstream limit",
            RateLimitScope::Route => "route limit",
        })
    }
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GatewayError::QuotaExceeded(_) => StatusCode::PAYMENT_REQUIRED,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::NotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::Conflict(_) => StatusCode::CONFLICT,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            GatewayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout { .. } | GatewayError::RequestTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            GatewayError::ServiceUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message clients see in `msg`.
    pub fn message(&self) -> String {
        match self {
            GatewayError::Unauthorized(reason) => reason.message().to_string(),
            other => other.to_string(),
        }
    }

    /// The envelope response. The one place error bodies are built.
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let mut response = Response::new(body::full(envelope(status, &self.message())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match &self {
            GatewayError::RateLimited { retry_after_s, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
            }
            GatewayError::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"gatehouse\""),
                );
            }
            _ => {}
        }
        response
    }
}

/// `{"code": <status>, "msg": <msg>, "data": null}` as bytes.
pub fn envelope(status: StatusCode, msg: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "code": status.as_u16(),
        "msg": msg,
        "data": null,
    }))
    .expect("a JSON object of a number, a string and null always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn rate_limited_is_429_envelope_with_retry_after() {
        let response = GatewayError::RateLimited {
            scope: RateLimitScope::Key,
            retry_after_s: 3,
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["code"], 429);
        assert!(json["data"].is_null());
        assert!(json["msg"].as_str().unwrap().contains("per-key"));
    }
}
