//! The admin API under `/admin/`, guarded by `[admin] token` (Bearer, compared in constant
//! time); disabled (404) when no token is configured.
//!
//! - `GET /admin/usage`: every key's quota, charged, reserved, remaining, period, open tasks.
//! - `GET /admin/usage/{key}`: one key.
//! - `POST /admin/reload`: reload the config file now (same as SIGHUP); answers what happened.
//!
//! Keys are listed by id; API keys and their hashes are never shown.

use crate::body::{self, Body, ResponseFuture};
use crate::config::{Config, KeyPolicy};
use crate::error::{AuthFailure, GatewayError};
use crate::points::Points;
use crate::quota::{Ledger, PeriodKey, Usage};
use crate::reload::Reloader;
use crate::snapshot::Snapshot;
use http::{header, HeaderValue, Method, Request, Response};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use subtle::ConstantTimeEq;

#[derive(Clone)]
pub struct AdminService {
    ledger: Arc<Ledger>,
    reloader: Option<Arc<Reloader>>,
}

impl AdminService {
    pub fn new(ledger: Arc<Ledger>, reloader: Option<Arc<Reloader>>) -> AdminService {
        AdminService { ledger, reloader }
    }
}

/// One key's standing in its current period.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KeyUsageReport {
    pub key: String,
    pub period: String,
    pub quota_period: &'static str,
    /// Absent when the key has no quota.
    pub quota: Option<Points>,
    pub charged: Points,
    pub reserved: Points,
    pub remaining: Option<Points>,
    pub open_tasks: u64,
}

impl tower::Service<Request<Body>> for AdminService {
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture {
        let ledger = self.ledger.clone();
        let reloader = self.reloader.clone();
        Box::pin(async move {
            let snapshot = Snapshot::of(&request)?;
            authorize(&snapshot.config, request.headers())?;
            let path = request.uri().path().trim_end_matches('/');
            match (request.method(), path) {
                (&Method::GET, "/admin/usage") => {
                    json(&usage_report(&ledger, &snapshot.config, None).await?)
                }
                (&Method::GET, other) if other.starts_with("/admin/usage/") => {
                    let key = &other["/admin/usage/".len()..];
                    let mut reports = usage_report(&ledger, &snapshot.config, Some(key)).await?;
                    match reports.pop() {
                        Some(report) => json(&report),
                        None => Err(GatewayError::NotFound(format!("no key {key:?}"))),
                    }
                }
                (&Method::POST, "/admin/reload") => {
                    let Some(reloader) = reloader else {
                        return Err(GatewayError::NotFound(
                            "reload needs a config file (serve --config FILE)".into(),
                        ));
                    };
                    let outcome = tokio::task::spawn_blocking(move || reloader.reload("admin API"))
                        .await
                        .map_err(|err| GatewayError::Internal(format!("reload failed: {err}")))?;
                    let mut response = json(&outcome)?;
                    if !outcome.applied {
                        *response.status_mut() = http::StatusCode::UNPROCESSABLE_ENTITY;
                    }
                    Ok(response)
                }
                (method, path) => {
                    let known = match path {
                        "/admin/reload" => Some("POST"),
                        "/admin/usage" => Some("GET"),
                        _ if path.starts_with("/admin/usage/") => Some("GET"),
                        _ => None,
                    };
                    Err(match known {
                        Some(allowed) => GatewayError::MethodNotAllowed(format!(
                            "{path} accepts {allowed}, not {method}"
                        )),
                        None => GatewayError::NotFound(format!(
                            "no admin endpoint {method} {path}; the admin API has GET /admin/usage, GET /admin/usage/{{key}} and POST /admin/reload"
                        )),
                    })
                }
            }
        })
    }
}

fn authorize(config: &Config, headers: &http::HeaderMap) -> Result<(), GatewayError> {
    let Some(token) = &config.admin.token else {
        return Err(GatewayError::NotFound(
            "the admin API is disabled: set [admin] token".into(),
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .ok_or(GatewayError::Unauthorized(AuthFailure::MissingCredential))?
        .to_str()
        .ok()
        .and_then(|value| {
            let (scheme, credential) = value.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| credential.trim())
        })
        .ok_or(GatewayError::Unauthorized(AuthFailure::MalformedHeader))?;
    if bool::from(presented.as_bytes().ct_eq(token.expose().as_bytes())) {
        Ok(())
    } else {
        Err(GatewayError::Unauthorized(AuthFailure::WrongAdminToken))
    }
}

/// Usage of every configured key and every key the ledger knows (or only `only`).
pub async fn usage_report(
    ledger: &Ledger,
    config: &Config,
    only: Option<&str>,
) -> Result<Vec<KeyUsageReport>, GatewayError> {
    let policy_of = |key_id: &str| -> KeyPolicy {
        config
            .key(key_id)
            .map(|key| key.policy.clone())
            .unwrap_or_else(|| config.defaults.clone())
    };
    let mut usage: BTreeMap<String, (PeriodKey, Usage)> = BTreeMap::new();
    let known: Vec<String> = match only {
        Some(key) => vec![key.to_string()],
        None => config.keys.iter().map(|key| key.id.clone()).collect(),
    };
    for key in known {
        let period = ledger.current_period(&policy_of(&key));
        let found = ledger.store.usage(&key, period.clone()).await?;
        usage.insert(key, (period, found));
    }
    if only.is_none() {
        let period_of = |key_id: &str| ledger.current_period(&policy_of(key_id));
        for row in ledger.store.usage_all(&period_of).await? {
            usage.insert(row.key_id, (row.period, row.usage));
        }
    }
    let reports = usage
        .into_iter()
        .filter(|(key, (_, found))| {
            // A single key that neither exists in the config nor in the ledger is unknown.
            only.is_none() || config.key(key).is_some() || *found != Usage::default()
        })
        .map(|(key, (period, found))| {
            let policy = policy_of(&key);
            KeyUsageReport {
                period: period.as_str().to_string(),
                quota_period: policy.quota_period.label(),
                quota: policy.quota_points,
                charged: found.charged,
                reserved: found.reserved,
                remaining: found.remaining(policy.quota_points),
                open_tasks: found.open_tasks,
                key,
            }
        })
        .collect();
    Ok(reports)
}

fn json<T: Serialize>(value: &T) -> Result<Response<Body>, GatewayError> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|err| GatewayError::Internal(format!("cannot encode admin answer: {err}")))?;
    let mut response = Response::new(body::full(bytes));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
