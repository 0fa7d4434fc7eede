//! The quota layer: point accounting on the request path.
//!
//! - `POST /runway/pro/generate`: reserves the price (402 when it does not fit) durably,
//!   together with the callback token, *before* forwarding; then attaches the upstream's
//!   `task_id`, or releases the reservation when no task was created (non-200 `code`,
//!   HTTP error, timeout, connection failure).
//! - `POST /runway/feed`: answers 404 for a task that is not the caller's, without calling
//!   the upstream; settles the task when the answer shows a terminal status.
//!
//! Reads `Principal`, `Route`, `GenerateTask` and `Arc<Snapshot>` from extensions; records
//! the reserved points in the `RequestContext`.

use super::{Ledger, ReservationId, ReservationRequest, TaskRef, TaskReport};
use crate::auth::Principal;
use crate::body::{self, Body, ResponseFuture};
use crate::context::RequestContext;
use crate::error::GatewayError;
use crate::route::{Route, RouteKind};
use crate::snapshot::Snapshot;
use crate::upstream::read_answer;
use crate::validate::GenerateTask;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use std::sync::Arc;
use std::task::{Context, Poll};

/// The `task.product` under which pass-through Runway submits are recorded; `/runway/feed`
/// serves their tasks too.
pub const RUNWAY_PRODUCT: &str = "runway";

/// Upstream answers on these routes are small JSON envelopes; anything larger is not one.
const MAX_UPSTREAM_ANSWER_BYTES: usize = 1024 * 1024;

#[derive(Clone)]
pub struct QuotaLayer {
    ledger: Arc<Ledger>,
}

impl QuotaLayer {
    pub fn new(ledger: Arc<Ledger>) -> QuotaLayer {
        QuotaLayer { ledger }
    }
}

impl<S> tower::Layer<S> for QuotaLayer {
    type Service = QuotaService<S>;
    fn layer(&self, inner: S) -> QuotaService<S> {
        QuotaService {
            inner,
            ledger: self.ledger.clone(),
        }
    }
}

#[derive(Clone)]
pub struct QuotaService<S> {
    inner: S,
    ledger: Arc<Ledger>,
}

impl<S> tower::Service<Request<Body>> for QuotaService<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture {
        let kind = request.extensions().get::<Route>().map(|r| r.kind.clone());
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let ledger = self.ledger.clone();
        match kind {
            Some(RouteKind::RunwayGenerate) => Box::pin(submit(ledger, inner, request)),
            Some(RouteKind::RunwayFeed) => Box::pin(feed(ledger, inner, request)),
            _ => {
                let mut inner = inner;
                Box::pin(inner.call(request))
            }
        }
    }
}

struct Caller {
    principal: Principal,
    snapshot: Arc<Snapshot>,
    context: Option<Arc<RequestContext>>,
}

fn caller(request: &Request<Body>) -> Result<Caller, GatewayError> {
    let principal = request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| GatewayError::Internal("quota layer reached without a principal".into()))?;
    let snapshot = Snapshot::of(request)?;
    let context = request.extensions().get::<Arc<RequestContext>>().cloned();
    Ok(Caller {
        principal,
        snapshot,
        context,
    })
}

async fn submit<S>(
    ledger: Arc<Ledger>,
    inner: S,
    request: Request<Body>,
) -> Result<Response<Body>, GatewayError>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = GatewayError>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let Caller {
        principal,
        snapshot,
        context,
    } = caller(&request)?;
    let task = request
        .extensions()
        .get::<GenerateTask>()
        .cloned()
        .ok_or_else(|| {
            GatewayError::Internal("generate reached quota without validation".into())
        })?;
    let price = snapshot
        .config
        .prices
        .runway_generate(&task.model, task.seconds)
        .ok_or_else(|| {
            GatewayError::Internal(format!(
                "no price for model {} with {} s (prices.runway_generate)",
                task.model, task.seconds
            ))
        })?;
    let route = request
        .extensions()
        .get::<Route>()
        .map(|r| r.name.to_string())
        .unwrap_or_else(|| "runway_generate".to_string());
    let reservation = ledger
        .reserve(
            &principal.metrics_label,
            &principal.policy,
            ReservationRequest {
                key_id: principal.key_id.clone(),
                price,
                callback_token: Some(task.callback_token.clone()),
                caller_callback_url: Some(task.caller_callback_url.clone()),
                route: route.to_string(),
                model: Some(task.model.clone()),
                seconds: Some(task.seconds),
            },
        )
        .await?;
    if let Some(context) = &context {
        context.set_points_reserved(price);
    }

    // The forward and its bookkeeping run on their own task: if the caller disconnects or
    // the request times out, this future is dropped, but the reservation must still be
    // attached or released once the upstream answers (or its own timeout fires).
    let forward = tokio::spawn(forward_submit(
        ledger,
        inner,
        request,
        reservation,
        principal,
    ));
    forward.await.unwrap_or_else(|join| {
        Err(GatewayError::Internal(format!(
            "submit task failed: {join}"
        )))
    })
}

async fn forward_submit<S>(
    ledger: Arc<Ledger>,
    mut inner: S,
    request: Request<Body>,
    reservation: ReservationId,
    principal: Principal,
) -> Result<Response<Body>, GatewayError>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = GatewayError>,
    S::Future: Send + 'static,
{
    let upstream = Snapshot::of(&request)?.config.upstream.clone();
    let release = |reason: String| {
        let ledger = ledger.clone();
        let principal = principal.clone();
        async move {
            ledger
                .release(
                    reservation,
                    &reason,
                    &principal.metrics_label,
                    &principal.policy,
                )
                .await
        }
    };
    let call: ResponseFuture = Box::pin(inner.call(request));
    let response = match call.await {
        Ok(response) => response,
        Err(err) => {
            release(format!("submit failed: {}", err.message())).await;
            return Err(err);
        }
    };
    let (parts, answer) = response.into_parts();
    let bytes = match read_answer(answer, MAX_UPSTREAM_ANSWER_BYTES, &upstream).await {
        Ok(bytes) => bytes,
        Err(err) => {
            release(err.message()).await;
            return Err(err);
        }
    };
    match accepted_task_id(parts.status, &bytes) {
        Some(task_id) => ledger.attach(reservation, &task_id).await,
        None => {
            release(format!(
                "upstream answered HTTP {} without a task (body: {})",
                parts.status.as_u16(),
                preview(&bytes)
            ))
            .await
        }
    }
    Ok(Response::from_parts(parts, body::full(bytes)))
}

/// The task id of a submit the upstream accepted: HTTP 2xx, `code` 200 and a `data.task_id`.
/// Anything else means no task was created (upstream-api.md, "Errors").
fn accepted_task_id(status: http::StatusCode, bytes: &Bytes) -> Option<String> {
    if !status.is_success() {
        return None;
    }
    let answer: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let code_ok = match &answer["code"] {
        serde_json::Value::Number(n) => n.as_i64() == Some(200),
        serde_json::Value::String(s) => s.trim() == "200",
        _ => false,
    };
    if !code_ok {
        return None;
    }
    let task_id = answer["data"]["task_id"].as_str()?.trim();
    (!task_id.is_empty()).then(|| task_id.to_string())
}

fn preview(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.chars().take(200).collect()
}

async fn feed<S>(
    ledger: Arc<Ledger>,
    mut inner: S,
    request: Request<Body>,
) -> Result<Response<Body>, GatewayError>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = GatewayError>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let Caller {
        principal,
        snapshot,
        ..
    } = caller(&request)?;
    let limit = snapshot.config.server.max_body_bytes;
    let (mut parts, incoming) = request.into_parts();
    let bytes = body::read_request(incoming, limit).await?;
    let task_id = feed_task_id(&bytes)?;

    // Another key's task answers exactly like a task that does not exist, so task ids
    // cannot be probed across keys.
    // Generate tasks are stored by their id; other Runway submits (video2video, act_one,
    // configured as pass-through routes of product "runway") as "runway:<id>".
    let record = match ledger.store.task_by_id(&task_id).await? {
        Some(record) => Some(record),
        None => {
            ledger
                .store
                .task_by_id(&format!("{RUNWAY_PRODUCT}:{task_id}"))
                .await?
        }
    };
    let Some(stored_id) = record
        .filter(|task| task.key_id == principal.key_id)
        .and_then(|task| task.task_id)
    else {
        return Err(GatewayError::NotFound(format!(
            "task_id {task_id:?} does not exist"
        )));
    };

    parts.headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(bytes.len() as u64),
    );
    let call: ResponseFuture = Box::pin(inner.call(Request::from_parts(parts, body::full(bytes))));
    let response = call.await?;
    let (parts, answer) = response.into_parts();
    let answer = read_answer(answer, MAX_UPSTREAM_ANSWER_BYTES, &snapshot.config.upstream).await?;
    if parts.status.is_success() {
        if let Some(report) = serde_json::from_slice(&answer)
            .ok()
            .filter(|value: &serde_json::Value| value["code"] == 200)
            .as_ref()
            .and_then(TaskReport::from_json)
        {
            let snapshot = snapshot.clone();
            if let Err(err) = ledger
                .apply_report(TaskRef::TaskId(stored_id), &report, "feed", |key_id| {
                    key_label_and_policy(&snapshot, key_id)
                })
                .await
            {
                // The caller still gets its answer; the reconciler settles the task later.
                tracing::error!(task_id, error = %err, "could not apply a feed answer to the ledger");
            }
        }
    }
    Ok(Response::from_parts(parts, body::full(answer)))
}

/// `{"task_id": "<id>"}` → the id, or a 400 naming the field.
fn feed_task_id(bytes: &[u8]) -> Result<String, GatewayError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|err| {
        GatewayError::BadRequest(format!("request body is not valid JSON: {err}"))
    })?;
    match value.get("task_id") {
        Some(serde_json::Value::String(id)) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        Some(serde_json::Value::String(_)) | None | Some(serde_json::Value::Null) => Err(
            GatewayError::BadRequest("task_id is required (a non-empty string)".into()),
        ),
        Some(_) => Err(GatewayError::BadRequest("task_id must be a string".into())),
    }
}

/// The metrics label and policy of a key id as the live config knows it.
pub fn key_label_and_policy(
    snapshot: &Snapshot,
    key_id: &str,
) -> (String, Option<Arc<crate::config::KeyPolicy>>) {
    match snapshot.config.key(key_id) {
        Some(key) => (key.id.clone(), Some(Arc::new(key.policy.clone()))),
        None => (
            crate::auth::UNLISTED_JWT_LABEL.to_string(),
            Some(Arc::new(snapshot.config.defaults.clone())),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_code_200_answer_with_a_task_id_created_a_task() {
        let ok =
            Bytes::from_static(r#"{"code":200,"msg":"成功","data":{"task_id":"t-1"}}"#.as_bytes());
        assert_eq!(
            accepted_task_id(http::StatusCode::OK, &ok),
            Some("t-1".to_string())
        );
        assert_eq!(accepted_task_id(http::StatusCode::BAD_GATEWAY, &ok), None);
        for body in [
            &br#"{"code":403,"msg":"key incorrect","data":null}"#[..],
            br#"{"code":400,"msg":"callback_url_empty","data":null}"#,
            br#"{"code":200,"msg":"ok","data":{"task_id":""}}"#,
            br#"{"code":200,"msg":"ok","data":null}"#,
            b"not json",
        ] {
            assert_eq!(
                accepted_task_id(http::StatusCode::OK, &Bytes::copy_from_slice(body)),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let string_code = Bytes::from_static(br#"{"code":"200","data":{"task_id":"t-2"}}"#);
        assert_eq!(
            accepted_task_id(http::StatusCode::OK, &string_code),
            Some("t-2".into())
        );
    }

    #[test]
    fn feed_body_names_the_task_id_field() {
        assert_eq!(feed_task_id(br#"{"task_id":" t-1 "}"#).unwrap(), "t-1");
        for bad in [
            &br#"{}"#[..],
            br#"{"task_id":""}"#,
            br#"{"task_id":5}"#,
            b"nope",
        ] {
            let err = feed_task_id(bad).unwrap_err();
            assert!(
                matches!(err, GatewayError::BadRequest(ref m) if m.contains("task_id") || m.contains("JSON"))
            );
        }
    }
}
