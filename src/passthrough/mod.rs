//! Configured pass-through routes (`[[routes]] kind = "passthrough"`): everything in the
//! upstream's catalogue beyond the Runway task flow.
//!
//! For such a request this layer
//! - reads the JSON body only when the route needs it (`model_pointer`, a fetch with
//!   `task.id_pointer`); otherwise the body streams through untouched;
//! - checks the model against the route's and the key's `allowed_models` (403);
//! - answers 404 for a fetch of a task that is not the caller's (`task.role = "fetch"`);
//! - reserves the route's price (`points_per_request`, or `token_pricing.estimate`) and, once
//!   the upstream answered, charges it (2xx), charges the tokens used (chat), records the task
//!   id with its owner (`task.role = "submit"`), or releases it (an error answer);
//! - relays streamed answers (`stream = true`) frame by frame; a chat stream's final `usage`
//!   chunk is read on the way through.
//!
//! Reads `Route`, `Principal` and `Arc<Snapshot>` from extensions. Other routes pass through.

pub mod usage;

use crate::auth::Principal;
use crate::body::{self, Body, ResponseFuture};
use crate::config::{RouteConfig, TaskRole, TaskRouteConfig};
use crate::context::RequestContext;
use crate::error::GatewayError;
use crate::points::Points;
use crate::quota::layer::key_label_and_policy;
use crate::quota::{Ledger, ReservationId, ReservationRequest, TaskRef, TaskReport};
use crate::route::{Route, RouteKind};
use crate::snapshot::Snapshot;
use bytes::Bytes;
use http::{header, Request, Response};
use serde_json::Value;
use std::sync::Arc;
use std::task::{Context, Poll};
use usage::{TokenUsage, UsageTap};

/// Answers read whole (task submits and fetches, non-streamed chat) are JSON envelopes;
/// anything larger is passed on unread and priced by its estimate.
const MAX_READ_ANSWER_BYTES: usize = 8 * 1024 * 1024;

#[derive(Clone)]
pub struct PassthroughLayer {
    ledger: Arc<Ledger>,
}

impl PassthroughLayer {
    pub fn new(ledger: Arc<Ledger>) -> PassthroughLayer {
        PassthroughLayer { ledger }
    }
}

impl<S> tower::Layer<S> for PassthroughLayer {
    type Service = PassthroughService<S>;
    fn layer(&self, inner: S) -> PassthroughService<S> {
        PassthroughService {
            inner,
            ledger: self.ledger.clone(),
        }
    }
}

#[derive(Clone)]
pub struct PassthroughService<S> {
    inner: S,
    ledger: Arc<Ledger>,
}

impl<S> tower::Service<Request<Body>> for PassthroughService<S>
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
        let route = match request.extensions().get::<Route>() {
            Some(Route {
                kind: RouteKind::Passthrough(config),
                ..
            }) => config.clone(),
            _ => return Box::pin(self.inner.call(request)),
        };
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(forward(self.ledger.clone(), inner, request, route))
    }
}

/// Everything about the caller and the route that pricing needs after the answer.
struct Charge {
    ledger: Arc<Ledger>,
    snapshot: Arc<Snapshot>,
    principal: Principal,
    route: Arc<RouteConfig>,
    model: Option<String>,
    reservation: ReservationId,
    /// The request asked for a server-sent-event answer (`"stream": true`).
    requested_stream: bool,
}

async fn forward<S>(
    ledger: Arc<Ledger>,
    mut inner: S,
    request: Request<Body>,
    route: Arc<RouteConfig>,
) -> Result<Response<Body>, GatewayError>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = GatewayError>,
    S::Future: Send + 'static,
{
    let snapshot = Snapshot::of(&request)?;
    let principal = request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| GatewayError::Internal("passthrough without a principal".into()))?;
    let context = request.extensions().get::<Arc<RequestContext>>().cloned();
    let route_path = request
        .extensions()
        .get::<Route>()
        .cloned()
        .expect("checked by the caller");
    let fetch = route.task.as_ref().filter(|t| t.role == TaskRole::Fetch);
    let submit = route.task.as_ref().filter(|t| t.role == TaskRole::Submit);

    let needs_json = route.model_pointer.is_some() || fetch.is_some_and(|t| t.id_pointer.is_some());
    let (mut parts, incoming) = request.into_parts();
    let (body, json) = if needs_json {
        let bytes = body::read_request(incoming, snapshot.config.server.max_body_bytes).await?;
        let json: Value = serde_json::from_slice(&bytes).map_err(|err| {
            GatewayError::BadRequest(format!("request body is not valid JSON: {err}"))
        })?;
        parts
            .headers
            .insert(header::CONTENT_LENGTH, bytes.len().into());
        parts.headers.remove(header::TRANSFER_ENCODING);
        (body::full(bytes), Some(json))
    } else {
        (incoming, None)
    };

    let model = model_of(&route, json.as_ref())?;
    check_model(&route, &principal, model.as_deref())?;
    if let Some(model) = &model {
        ledger
            .metrics
            .model_requests_total
            .with_label_values(&[&route.name, &model_label(&route, model)])
            .inc();
    }

    let fetched_task = match fetch {
        Some(task) => Some(
            owned_task(
                &ledger,
                &principal,
                task,
                &route_path,
                &parts,
                json.as_ref(),
            )
            .await?,
        ),
        None => None,
    };

    let price = route
        .points_per_request
        .or(route.token_pricing.as_ref().map(|t| t.estimate));
    // A submit is recorded even when free: its task id must be owned to be fetched.
    let reservation = if price.is_some() || submit.is_some() {
        let price = price.unwrap_or(Points::ZERO);
        let id = ledger
            .reserve(
                &principal.metrics_label,
                &principal.policy,
                ReservationRequest {
                    key_id: principal.key_id.clone(),
                    price,
                    callback_token: None,
                    caller_callback_url: None,
                    route: route.name.clone(),
                    model: model.clone(),
                    seconds: None,
                },
            )
            .await?;
        if let Some(context) = &context {
            context.set_points_reserved(price);
        }
        Some(id)
    } else {
        None
    };

    let call: ResponseFuture = Box::pin(inner.call(Request::from_parts(parts, body)));
    if let (Some(task), Some(task_id)) = (fetch, fetched_task) {
        let response = call.await?;
        return settle_fetched(&ledger, &snapshot, task, &task_id, response).await;
    }
    let Some(reservation) = reservation else {
        return call.await;
    };
    let requested_stream = json
        .as_ref()
        .and_then(|json| json.get("stream"))
        .and_then(Value::as_bool)
        == Some(true);
    let charge = Charge {
        ledger,
        snapshot,
        principal,
        route,
        model,
        reservation,
        requested_stream,
    };
    // The forward and its accounting run on their own task (as Runway submits do): if the
    // caller disconnects or times out, the points are still charged, attached or released.
    tokio::spawn(charge.complete(call))
        .await
        .unwrap_or_else(|join| {
            Err(GatewayError::Internal(format!(
                "pass-through task failed: {join}"
            )))
        })
}

/// The model named in the body at `model_pointer`, if the route has one.
fn model_of(route: &RouteConfig, json: Option<&Value>) -> Result<Option<String>, GatewayError> {
    let Some(pointer) = &route.model_pointer else {
        return Ok(None);
    };
    match json.and_then(|json| json.pointer(pointer)) {
        Some(Value::String(model)) if !model.is_empty() => Ok(Some(model.clone())),
        Some(Value::String(_)) | None | Some(Value::Null) => Ok(None),
        Some(_) => Err(GatewayError::BadRequest(format!(
            "{} must be a string naming the model",
            pointer.trim_start_matches('/').replace('/', ".")
        ))),
    }
}

/// The route's and the key's allow-lists, checked before anything is forwarded or charged.
fn check_model(
    route: &RouteConfig,
    principal: &Principal,
    model: Option<&str>,
) -> Result<(), GatewayError> {
    let field = || {
        route
            .model_pointer
            .as_deref()
            .unwrap_or("/model")
            .trim_start_matches('/')
            .replace('/', ".")
    };
    // A key's list applies where a model is named (`model_pointer`); routes that name none
    // (model lists, Suno, uploads) are not model-restricted.
    let key_list = route
        .model_pointer
        .as_ref()
        .and(principal.policy.allowed_models.as_ref());
    let lists = [
        (
            route.allowed_models.as_ref(),
            format!("route {}", route.name),
        ),
        (key_list, format!("key {}", principal.key_id)),
    ];
    for (list, whose) in lists {
        let Some(list) = list else { continue };
        match model {
            None => {
                return Err(GatewayError::BadRequest(format!(
                    "{} is required: {whose} only allows certain models",
                    field()
                )))
            }
            Some(model) if !list.iter().any(|allowed| allowed == model) => {
                return Err(GatewayError::Forbidden(format!(
                    "model {model:?} is not allowed for {whose}"
                )))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// A bounded metrics label for a caller-supplied model name.
fn model_label(route: &RouteConfig, model: &str) -> String {
    let known = route
        .allowed_models
        .as_ref()
        .is_some_and(|list| list.iter().any(|m| m == model))
        || route
            .token_pricing
            .as_ref()
            .is_some_and(|pricing| pricing.models.contains_key(model));
    if known {
        model.to_string()
    } else {
        "other".to_string()
    }
}

/// Task ids are unique per product only; the ledger keeps them as `product:id`.
fn stored_task_id(product: &str, id: &str) -> String {
    format!("{product}:{id}")
}

/// The fetched task's stored id, if the caller owns it; 404 (as if it did not exist) if not.
async fn owned_task(
    ledger: &Ledger,
    principal: &Principal,
    task: &TaskRouteConfig,
    route: &Route,
    parts: &http::request::Parts,
    json: Option<&Value>,
) -> Result<String, GatewayError> {
    let id = if let Some(param) = &task.id_param {
        match route.param(param) {
            Some(id) => Some(id.to_string()),
            None => {
                let values: Vec<String> = parts
                    .uri
                    .query()
                    .map(|query| {
                        url::form_urlencoded::parse(query.as_bytes())
                            .filter(|(key, _)| key == param)
                            .map(|(_, value)| value.into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                // The upstream might read another occurrence than the one checked here.
                if values.len() > 1 {
                    return Err(GatewayError::BadRequest(format!(
                        "the query parameter {param} is given {} times; give it once",
                        values.len()
                    )));
                }
                values.into_iter().next()
            }
        }
    } else {
        task.id_pointer
            .as_deref()
            .and_then(|pointer| json?.pointer(pointer))
            .and_then(id_text)
    };
    let id = id.filter(|id| !id.is_empty()).ok_or_else(|| {
        GatewayError::BadRequest(match (&task.id_param, &task.id_pointer) {
            (Some(param), _) => format!("the task id is missing: expected {param}"),
            (None, Some(pointer)) => format!(
                "the task id is missing: expected {}",
                pointer.trim_start_matches('/').replace('/', ".")
            ),
            (None, None) => "the task id is missing".to_string(),
        })
    })?;
    let stored = stored_task_id(&task.product, &id);
    let owned = ledger
        .store
        .task_by_id(&stored)
        .await?
        .is_some_and(|record| record.key_id == principal.key_id);
    if owned {
        Ok(stored)
    } else {
        Err(GatewayError::NotFound(format!(
            "task {id:?} does not exist"
        )))
    }
}

fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A fetch answer that shows the task finished settles it: the submit price on success,
/// nothing on failure. The answer itself goes back unchanged.
async fn settle_fetched(
    ledger: &Arc<Ledger>,
    snapshot: &Arc<Snapshot>,
    task: &TaskRouteConfig,
    stored_id: &str,
    response: Response<Body>,
) -> Result<Response<Body>, GatewayError> {
    let Some(pointer) = &task.status_pointer else {
        return Ok(response);
    };
    if !response.status().is_success() {
        return Ok(response);
    }
    let (parts, answer) = response.into_parts();
    let bytes = read_answer(answer, snapshot).await?;
    let status = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|json| json.pointer(pointer).and_then(id_text));
    let outcome = match status {
        Some(status) if task.success_values.contains(&status) => Some("3"),
        Some(status) if task.failure_values.contains(&status) => Some("2"),
        _ => None,
    };
    if let Some(outcome) = outcome {
        let record = ledger.store.task_by_id(stored_id).await?;
        if let Some(record) = record {
            let report = TaskReport {
                task_id: Some(stored_id.to_string()),
                status: outcome.to_string(),
                point: record.reserved.to_string(),
                refund: "0".to_string(),
            };
            let snapshot = snapshot.clone();
            ledger
                .apply_report(
                    TaskRef::TaskId(stored_id.to_string()),
                    &report,
                    "feed",
                    |key| key_label_and_policy(&snapshot, key),
                )
                .await?;
        }
    }
    Ok(Response::from_parts(parts, body::full(bytes)))
}

async fn read_answer(answer: Body, snapshot: &Snapshot) -> Result<Bytes, GatewayError> {
    crate::upstream::read_answer(answer, MAX_READ_ANSWER_BYTES, &snapshot.config.upstream).await
}

impl Charge {
    /// Waits for the upstream's answer and accounts for it.
    async fn complete(self, call: ResponseFuture) -> Result<Response<Body>, GatewayError> {
        let response = match call.await {
            Ok(response) => response,
            Err(err) => {
                self.release(&format!("upstream failed: {}", err.message()))
                    .await;
                return Err(err);
            }
        };
        if !response.status().is_success() {
            self.release(&format!(
                "upstream answered HTTP {}",
                response.status().as_u16()
            ))
            .await;
            return Ok(response);
        }
        let route = self.route.clone();
        if let Some(task) = route.task.as_ref().filter(|t| t.role == TaskRole::Submit) {
            return self.record_submit(task, response).await;
        }
        if route.token_pricing.is_some() {
            return self.by_tokens(response).await;
        }
        self.settle(route.points_per_request.unwrap_or(Points::ZERO))
            .await;
        Ok(response)
    }

    fn key_label_of(
        &self,
    ) -> impl Fn(&str) -> (String, Option<Arc<crate::config::KeyPolicy>>) + '_ {
        |key| key_label_and_policy(&self.snapshot, key)
    }

    async fn release(&self, reason: &str) {
        self.ledger
            .release(
                self.reservation,
                reason,
                &self.principal.metrics_label,
                &self.principal.policy,
            )
            .await;
    }

    /// Charges `cost` for a request the upstream answered.
    async fn settle(&self, cost: Points) {
        let report = TaskReport {
            task_id: None,
            status: "3".to_string(),
            point: cost.to_string(),
            refund: "0".to_string(),
        };
        match self
            .ledger
            .apply_report(
                TaskRef::Reservation(self.reservation),
                &report,
                "passthrough",
                self.key_label_of(),
            )
            .await
        {
            Ok(_) => {
                let model = self
                    .model
                    .as_deref()
                    .map(|m| model_label(&self.route, m))
                    .unwrap_or_default();
                self.ledger
                    .metrics
                    .route_points_charged_total
                    .with_label_values(&[&self.route.name, &model])
                    .inc_by(cost.as_f64());
            }
            Err(err) => {
                tracing::error!(route = %self.route.name, error = %err, "could not charge a pass-through request; the reconciler releases it later");
            }
        }
    }

    /// Charges the tokens used, read from the answer or from its final SSE chunk.
    async fn by_tokens(self, response: Response<Body>) -> Result<Response<Body>, GatewayError> {
        // Either side may say so: an upstream that labels its event stream oddly is still
        // relayed chunk by chunk, never held to read its usage.
        let streamed = self.requested_stream
            || response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
        let (parts, answer) = response.into_parts();
        if streamed {
            let runtime = tokio::runtime::Handle::current();
            let tap = UsageTap::new(
                answer,
                Box::new(move |usage, complete| {
                    runtime.spawn(async move { self.charge_usage(usage, complete).await });
                }),
            );
            return Ok(Response::from_parts(parts, body::boxed(tap)));
        }
        let timeout_ms = self.snapshot.config.upstream.timeout_ms;
        let read = tokio::time::timeout(
            std::time::Duration::from_millis(timeout_ms),
            body::read_up_to(answer, MAX_READ_ANSWER_BYTES),
        )
        .await;
        match read {
            Ok(Ok(body::ReadUpTo::Whole(bytes))) => {
                let usage = serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .as_ref()
                    .and_then(TokenUsage::from_json);
                self.charge_usage(usage, true).await;
                Ok(Response::from_parts(parts, body::full(bytes)))
            }
            Ok(Ok(body::ReadUpTo::Partial(first, rest))) => {
                // Too large to hold for its `usage`: relayed as it comes, at the estimate.
                self.charge_usage(None, true).await;
                Ok(Response::from_parts(parts, body::prefixed(first, rest)))
            }
            Ok(Err(err)) => {
                // The upstream did the work (it answered 2xx): the estimate is charged.
                self.charge_usage(None, false).await;
                Err(GatewayError::UpstreamUnavailable(format!(
                    "the upstream's answer broke off: {err}"
                )))
            }
            Err(_) => {
                self.charge_usage(None, false).await;
                Err(GatewayError::UpstreamTimeout {
                    after_ms: timeout_ms,
                })
            }
        }
    }

    async fn charge_usage(self, usage: Option<TokenUsage>, complete: bool) {
        let Some(pricing) = &self.route.token_pricing else {
            return;
        };
        let cost = match usage {
            Some(usage) => {
                let model = self
                    .model
                    .as_deref()
                    .map(|m| model_label(&self.route, m))
                    .unwrap_or_default();
                for (direction, tokens) in [
                    ("prompt", usage.prompt_tokens),
                    ("completion", usage.completion_tokens),
                ] {
                    self.ledger
                        .metrics
                        .tokens_total
                        .with_label_values(&[&self.route.name, &model, direction])
                        .inc_by(tokens);
                }
                pricing
                    .rates(self.model.as_deref())
                    .cost(usage.prompt_tokens, usage.completion_tokens)
            }
            None => {
                // No usage to go by (an answer without it, or a stream that ended early):
                // the estimate the caller was told about is charged.
                self.ledger
                    .metrics
                    .settlement_anomalies_total
                    .with_label_values(&[if complete {
                        "missing_usage"
                    } else {
                        "stream_incomplete"
                    }])
                    .inc();
                pricing.estimate
            }
        };
        self.settle(cost).await;
    }

    /// A submit the upstream accepted: record its task id with the owner; the price is
    /// charged when a fetch shows the task finished.
    async fn record_submit(
        self,
        task: &TaskRouteConfig,
        response: Response<Body>,
    ) -> Result<Response<Body>, GatewayError> {
        let (parts, answer) = response.into_parts();
        let bytes = match read_answer(answer, &self.snapshot).await {
            Ok(bytes) => bytes,
            Err(err) => {
                self.release("the submit answer broke off").await;
                return Err(err);
            }
        };
        let task_id = task.id_pointer.as_deref().and_then(|pointer| {
            serde_json::from_slice::<Value>(&bytes)
                .ok()?
                .pointer(pointer)
                .and_then(id_text)
        });
        match task_id.filter(|id| !id.is_empty()) {
            Some(id) => {
                self.ledger
                    .attach(self.reservation, &stored_task_id(&task.product, &id))
                    .await
            }
            None => {
                self.release(&format!(
                    "the submit answer has no task id at {}",
                    task.id_pointer.as_deref().unwrap_or("?")
                ))
                .await
            }
        }
        Ok(Response::from_parts(parts, body::full(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::CredentialKind;
    use crate::config::KeyPolicy;

    fn route(allowed: Option<Vec<&str>>) -> RouteConfig {
        let mut route = crate::config::RouteConfig {
            name: "chat".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            kind: crate::config::RouteKindConfig::Passthrough,
            stream: true,
            points_per_request: None,
            token_pricing: None,
            model_pointer: Some("/model".into()),
            allowed_models: None,
            rate_per_second: None,
            burst: None,
            task: None,
        };
        route.allowed_models = allowed.map(|l| l.into_iter().map(String::from).collect());
        route
    }

    fn principal(allowed: Option<Vec<&str>>) -> Principal {
        Principal {
            key_id: "team".into(),
            metrics_label: "team".into(),
            policy: Arc::new(KeyPolicy {
                allowed_models: allowed.map(|l| l.into_iter().map(String::from).collect()),
                ..KeyPolicy::default()
            }),
            credential: CredentialKind::ApiKey,
        }
    }

    #[test]
    fn allow_lists_of_route_and_key_both_apply() {
        let open = route(None);
        assert!(check_model(&open, &principal(None), Some("anything")).is_ok());
        assert!(check_model(&open, &principal(None), None).is_ok());

        let key_list = principal(Some(vec!["gpt-4o-mini"]));
        assert!(check_model(&open, &key_list, Some("gpt-4o-mini")).is_ok());
        let refused = check_model(&open, &key_list, Some("gpt-4o")).unwrap_err();
        assert_eq!(refused.status(), http::StatusCode::FORBIDDEN);
        assert!(refused.message().contains("\"gpt-4o\"") && refused.message().contains("key team"));
        let missing = check_model(&open, &key_list, None).unwrap_err();
        assert_eq!(missing.status(), http::StatusCode::BAD_REQUEST);

        let route_list = route(Some(vec!["deepseek-chat"]));
        let refused = check_model(&route_list, &principal(None), Some("gpt-4o")).unwrap_err();
        assert!(refused.message().contains("route chat"));
    }

    #[test]
    fn unknown_models_share_one_label() {
        let route = route(Some(vec!["gpt-4o"]));
        assert_eq!(model_label(&route, "gpt-4o"), "gpt-4o");
        assert_eq!(model_label(&route, "made-up-model-123"), "other");
    }
}
