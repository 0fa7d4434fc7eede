//! Task callbacks, both directions.
//!
//! - `CallbackService` answers `POST /callbacks/runway/{token}` from the upstream: no Bearer
//!   (the 128-bit token in the URL is the credential; unknown → 404), body bounded by
//!   `callbacks.max_body_bytes`, flat or wrapped record. It updates or settles the task, then
//!   queues the body for the caller's own `callback_url` in the durable outbox.
//! - `DeliveryWorker` drains the outbox: POSTs each body to the caller's URL with
//!   `X-Gatehouse-Signature: sha256=<hex HMAC-SHA256(body, key's callback_secret)>`, retries
//!   with exponential back-off, and marks a delivery dead after `callbacks.max_attempts`.

use crate::body::{self, Body, ResponseFuture};
use crate::error::GatewayError;
use crate::quota::layer::key_label_and_policy;
use crate::quota::{Delivery, Ledger, NewDelivery, TaskRef, TaskReport};
use crate::reconciler::{feed_upstream, FeedAnswer};
use crate::route::{Route, RouteKind};
use crate::snapshot::{LiveSnapshot, Snapshot};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Notify;

pub const SIGNATURE_HEADER: &str = "x-gatehouse-signature";

/// `sha256=<hex HMAC-SHA256 of body keyed by secret>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Clone)]
pub struct CallbackService {
    ledger: Arc<Ledger>,
    outbox_wakeup: Arc<Notify>,
}

impl CallbackService {
    pub fn new(ledger: Arc<Ledger>, outbox_wakeup: Arc<Notify>) -> CallbackService {
        CallbackService {
            ledger,
            outbox_wakeup,
        }
    }
}

impl tower::Service<Request<Body>> for CallbackService {
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture {
        let ledger = self.ledger.clone();
        let wakeup = self.outbox_wakeup.clone();
        Box::pin(async move {
            let result = receive(&ledger, request).await;
            let label = match &result {
                Ok(label) => label,
                Err(GatewayError::NotFound(_)) => "unknown_token",
                Err(GatewayError::Conflict(_)) => "mismatch",
                Err(GatewayError::BadRequest(_) | GatewayError::PayloadTooLarge { .. }) => {
                    "malformed"
                }
                Err(_) => "error",
            };
            ledger
                .metrics
                .callbacks_received_total
                .with_label_values(&[label])
                .inc();
            if result.is_ok() {
                wakeup.notify_one();
            }
            result.map(|_| {
                let mut response = Response::new(body::full(
                    r#"{"code":200,"msg":"ok","data":null}"#.as_bytes(),
                ));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                response
            })
        })
    }
}

/// Handles one callback; the `Ok` value is the metrics label of how it was accepted.
async fn receive(ledger: &Ledger, request: Request<Body>) -> Result<&'static str, GatewayError> {
    let token = match request.extensions().get::<Route>().map(|r| &r.kind) {
        Some(RouteKind::RunwayCallback { token }) => token.clone(),
        _ => {
            return Err(GatewayError::Internal(
                "callback without a token route".into(),
            ))
        }
    };
    let snapshot = Snapshot::of(&request)?;
    let bytes = body::read_request(
        request.into_body(),
        snapshot.config.callbacks.max_body_bytes,
    )
    .await?;

    // Unknown tokens answer 404 before the body is even parsed: nothing to learn by probing.
    let Some(task) = ledger.store.task_by_token(&token).await? else {
        return Err(GatewayError::NotFound("unknown callback token".into()));
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|err| {
        GatewayError::BadRequest(format!("callback body is not valid JSON: {err}"))
    })?;
    let report = TaskReport::from_json(&value).ok_or_else(|| {
        GatewayError::BadRequest("callback body is not a task record (no status or task_id)".into())
    })?;
    if let (Some(known), Some(reported)) = (&task.task_id, &report.task_id) {
        if known != reported {
            return Err(GatewayError::BadRequest(format!(
                "callback task_id {reported:?} does not belong to this callback URL"
            )));
        }
    }
    let (report, label) = if report.is_terminal() && snapshot.config.callbacks.verify_terminal {
        verify_terminal(ledger, &snapshot, report, task.task_id.as_deref()).await?
    } else {
        (report, "accepted")
    };
    ledger
        .apply_report(
            TaskRef::CallbackToken(token),
            &report,
            "callback",
            |key_id| key_label_and_policy(&snapshot, key_id),
        )
        .await?;

    if let Some(url) = task.caller_callback_url.filter(|url| !url.is_empty()) {
        ledger
            .store
            .enqueue_delivery(NewDelivery {
                reservation: task.id,
                key_id: task.key_id.clone(),
                url,
                body: bytes.to_vec(),
                now: ledger.now(),
            })
            .await?;
    }
    Ok(label)
}

/// A terminal callback is checked against `/runway/feed` before it settles anything: the
/// callback is unsigned, so the upstream's own record is the authority on what a task
/// cost (upstream-api.md: "treat a terminal state in it as final only if it matches what
/// /runway/feed says"). When the feed has no record to compare with (it may answer
/// `task_not_exist`, or be unreachable), the callback is trusted as the upstream documents.
async fn verify_terminal(
    ledger: &Ledger,
    snapshot: &Snapshot,
    claimed: TaskReport,
    attached_task_id: Option<&str>,
) -> Result<(TaskReport, &'static str), GatewayError> {
    let Some(task_id) = attached_task_id.or(claimed.task_id.as_deref()) else {
        return Ok((claimed, "accepted_unverified"));
    };
    match feed_upstream(snapshot, task_id, &ledger.metrics).await {
        FeedAnswer::Record(record) if record.status == claimed.status => Ok((record, "accepted")),
        // The feed may lag behind the callback: nothing is settled yet (the reconciler or a
        // later callback will), but the caller still hears about it.
        FeedAnswer::Record(record) if !record.is_terminal() => Ok((record, "unconfirmed")),
        FeedAnswer::Record(record) => {
            // The upstream's own record is final and says otherwise: it settles the task,
            // and the contradicting callback is neither trusted nor forwarded.
            tracing::warn!(task_id, claimed = %claimed.status, upstream = %record.status, "callback status contradicts the upstream's record; settling by the record");
            ledger
                .apply_report(
                    TaskRef::TaskId(task_id.to_string()),
                    &record,
                    "feed",
                    |key| key_label_and_policy(snapshot, key),
                )
                .await?;
            Err(GatewayError::Conflict(format!(
                "callback status {:?} does not match the upstream's record ({:?})",
                claimed.status, record.status
            )))
        }
        FeedAnswer::NoRecord(why) => {
            tracing::info!(
                task_id,
                why,
                "could not verify a terminal callback with /runway/feed; trusting it"
            );
            Ok((claimed, "accepted_unverified"))
        }
    }
}

/// Delivers queued callbacks to the callers' own URLs.
#[derive(Clone)]
pub struct DeliveryWorker {
    ledger: Arc<Ledger>,
    live: Arc<LiveSnapshot>,
    wakeup: Arc<Notify>,
    client: Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Body,
    >,
}

/// Deliveries taken per poll; also how long one lease lasts, in seconds, per batch.
const BATCH: u32 = 32;

impl DeliveryWorker {
    pub fn new(
        ledger: Arc<Ledger>,
        live: Arc<LiveSnapshot>,
        wakeup: Arc<Notify>,
    ) -> DeliveryWorker {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        DeliveryWorker {
            ledger,
            live,
            wakeup,
            client: Client::builder(TokioExecutor::new()).build(https),
        }
    }

    /// Runs until the task is aborted.
    pub async fn run(self) {
        loop {
            let delivered = self.run_once().await;
            if delivered < BATCH as usize {
                // Nothing more due right now: wait for a new callback or the next retry time.
                tokio::select! {
                    _ = self.wakeup.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }

    /// Attempts every delivery that is due; returns how many were attempted.
    pub async fn run_once(&self) -> usize {
        let snapshot = self.live.load_full();
        let settings = &snapshot.config.callbacks;
        let now = self.ledger.now();
        let lease = (settings.delivery_timeout_ms / 1000 + 30) as i64;
        let due = match self
            .ledger
            .store
            .due_deliveries(now, now + lease, BATCH)
            .await
        {
            Ok(due) => due,
            Err(err) => {
                tracing::error!(error = %err, "cannot read the callback outbox");
                return 0;
            }
        };
        let count = due.len();
        // Concurrently: one slow receiver must not hold up everyone else's callbacks.
        let mut attempts = tokio::task::JoinSet::new();
        for delivery in due {
            let worker = self.clone();
            let snapshot = snapshot.clone();
            attempts.spawn(async move { worker.attempt(&snapshot, delivery).await });
        }
        while attempts.join_next().await.is_some() {}
        count
    }

    async fn attempt(&self, snapshot: &Snapshot, delivery: Delivery) {
        let settings = &snapshot.config.callbacks;
        let secret = snapshot
            .config
            .key(&delivery.key_id)
            .and_then(|key| key.policy.callback_secret.clone())
            .or_else(|| snapshot.config.defaults.callback_secret.clone());
        let outcome = self
            .post(
                &delivery,
                secret.as_ref().map(|s| s.expose()),
                settings.delivery_timeout_ms,
            )
            .await;
        let now = self.ledger.now();
        let store = &self.ledger.store;
        let metrics = &self.ledger.metrics;
        let attempt = delivery.attempts + 1;
        let result = match outcome {
            Ok(()) => {
                metrics
                    .callback_deliveries_total
                    .with_label_values(&["delivered"])
                    .inc();
                store.mark_delivered(delivery.id, now).await
            }
            Err(error) if attempt >= settings.max_attempts => {
                metrics
                    .callback_deliveries_total
                    .with_label_values(&["dead"])
                    .inc();
                tracing::warn!(delivery = %delivery.id, key = %delivery.key_id, attempts = attempt, %error, "callback delivery gave up");
                store.mark_dead(delivery.id, &error, now).await
            }
            Err(error) => {
                metrics
                    .callback_deliveries_total
                    .with_label_values(&["retry"])
                    .inc();
                let backoff_ms = settings
                    .initial_backoff_ms
                    .saturating_mul(1u64 << (attempt - 1).min(30))
                    .min(settings.max_backoff_ms);
                // The outbox schedules in whole seconds; round up so back-off never shrinks.
                let next = now + backoff_ms.div_ceil(1000) as i64;
                tracing::info!(delivery = %delivery.id, key = %delivery.key_id, attempt, %error, retry_in_ms = backoff_ms, "callback delivery failed; will retry");
                store.mark_attempt_failed(delivery.id, next, &error).await
            }
        };
        if let Err(err) = result {
            tracing::error!(delivery = %delivery.id, error = %err, "cannot record a callback delivery attempt");
        }
    }

    async fn post(
        &self,
        delivery: &Delivery,
        secret: Option<&str>,
        timeout_ms: u64,
    ) -> Result<(), String> {
        let mut request = Request::post(&delivery.url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body::full(Bytes::from(delivery.body.clone())))
            .map_err(|err| format!("invalid callback_url: {err}"))?;
        if let Some(secret) = secret {
            let value = HeaderValue::from_str(&signature(secret, &delivery.body))
                .expect("hex signatures are valid header values");
            request.headers_mut().insert(SIGNATURE_HEADER, value);
        }
        let sent = tokio::time::timeout(Duration::from_millis(timeout_ms), async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|err| err.to_string())?;
            // The receiver's body is not read: only its status matters, and a hostile
            // receiver could stream without end. (The connection is then not reused.)
            Ok::<StatusCode, String>(response.status())
        })
        .await
        .map_err(|_| format!("no answer within {timeout_ms} ms"))??;
        if sent.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", sent.as_u16()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
