//! The callback outbox end to end: the upstream's terminal callback reaches the gateway, is
//! settled and queued, and the `DeliveryWorker` POSTs it to the caller's own `callback_url`
//! with an HMAC signature, retrying with back-off — across a gateway restart on the same
//! ledger file — until it is delivered or declared dead.
//!
//! The ledger clock is a `ManualClock`: the outbox schedules retries in whole seconds, so
//! moving the clock by hand makes "not before the back-off" and "due now" exact, and the
//! tests never sleep to let time pass.

mod support;

use bytes::Bytes;
use gatehouse::mock_upstream::MockConfig;
use gatehouse::quota::{Clock, DeliveryId, DeliveryState, ManualClock, Store};
use gatehouse::server::{Gateway, RunningGateway};
use hmac::{Hmac, Mac};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sha2::Sha256;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

/// A third key with its own callback secret (keys `a` and `b` of the base config have none).
const KEY_C: &str = "kc_2d0a7b2a2f8e6c3b1b5a4f3e2d1c0b9a";
const SECRET_C: &str = "whsec-outbox-test-3f9b1c7e2a";
/// 2026-11-24T12:00:00Z; any fixed moment works.
const T0: i64 = 1_795_521_600;
/// Bound on every wait: a broken outbox fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(10);

fn key_c(max_attempts: u32) -> String {
    format!(
        r#"
[[keys]]
id = "c"
key_sha256 = "{hash}"
rate_per_second = 1000
burst = 1000
callback_secret = "{SECRET_C}"

[callbacks]
initial_backoff_ms = 1000
max_backoff_ms = 60000
max_attempts = {max_attempts}
"#,
        hash = gatehouse::auth::hash_key(KEY_C),
    )
}

/// The mock sends the task record to the gateway's callback URL on every status change.
fn mock_with_callbacks() -> MockConfig {
    MockConfig {
        send_callbacks: true,
        ..manual_mock()
    }
}

/// One POST the receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
}

/// The caller's callback endpoint: answers 500 to the first `fail_first` POSTs, then 200;
/// records every request.
struct Receiver {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        let listener = bind().await;
        let url = format!("http://{}/hooks/runway", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let received = received.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let received = received.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            answer(received.clone(), fail_first, request)
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        Receiver {
            url,
            received,
            task,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    received: Arc<Mutex<Vec<Received>>>,
    fail_first: usize,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    let seen = {
        let mut received = received.lock().unwrap();
        received.push(Received {
            headers: parts.headers,
            body,
        });
        received.len()
    };
    let status = if seen <= fail_first {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
    *response.status_mut() = status;
    Ok(response)
}

/// Polls `condition` until it holds; panics after `WAIT` naming `what`.
async fn wait_for<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn delivery_attempts(store: &Arc<dyn Store>, id: DeliveryId) -> u32 {
    store
        .delivery(id)
        .await
        .unwrap()
        .map_or(0, |delivery| delivery.attempts)
}

fn attempts_reach(
    store: &Arc<dyn Store>,
    id: DeliveryId,
    attempts: u32,
) -> impl Future<Output = bool> {
    let store = store.clone();
    async move { delivery_attempts(&store, id).await >= attempts }
}

fn in_state(
    store: &Arc<dyn Store>,
    id: DeliveryId,
    state: DeliveryState,
) -> impl Future<Output = bool> {
    let store = store.clone();
    async move {
        store
            .delivery(id)
            .await
            .unwrap()
            .is_some_and(|delivery| delivery.state == state)
    }
}

/// The caller's check: `sha256=<hex HMAC-SHA256(body, secret)>`, computed independently of
/// `gatehouse::callbacks::signature`, and compared in constant time by `verify_slice`.
fn assert_signed(received: &Received, secret: &str) {
    let header = received
        .headers
        .get("x-gatehouse-signature")
        .expect("every delivery carries X-Gatehouse-Signature")
        .to_str()
        .unwrap();
    let hex_mac = header
        .strip_prefix("sha256=")
        .unwrap_or_else(|| panic!("signature {header:?} starts with sha256="));
    let mac_bytes = hex::decode(hex_mac).expect("signature is hex");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&received.body);
    mac.verify_slice(&mac_bytes)
        .expect("signature verifies with the key's callback_secret");
    // And a wrong secret does not verify: the check above can fail.
    let mut wrong = Hmac::<Sha256>::new_from_slice(b"not-the-secret").unwrap();
    wrong.update(&received.body);
    assert!(wrong.verify_slice(&mac_bytes).is_err());
    assert_eq!(
        received
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
}

/// Submits a generate for key `c` with `callback_url`; returns the upstream task id.
async fn submit(h: &Harness, callback_url: &str) -> String {
    let body = GENERATE_EXAMPLE.replace("http://example.com/hook", callback_url);
    let response = h.generate(KEY_C, &body).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    response.json()["data"]["task_id"]
        .as_str()
        .expect("task_id in the answer")
        .to_string()
}

#[tokio::test]
async fn failing_endpoint_gets_the_callback_after_back_off_even_across_a_restart() {
    let clock = Arc::new(ManualClock::new(T0));
    let receiver = Receiver::start(2).await;
    let extra = key_c(5);
    let h = Harness::start_full(
        mock_with_callbacks(),
        |upstream_url| config_text(upstream_url, &extra),
        Some(clock.clone() as Arc<dyn Clock>),
    )
    .await;
    let upstream_url = h.upstream.base_url();
    let task_id = submit(&h, &receiver.url).await;

    // The upstream reports success on the gateway's callback URL: settled, queued, and the
    // background worker is woken for the first attempt at T0.
    let sent = h.upstream.advance(&task_id, "3").await.unwrap().unwrap();
    assert_eq!(sent.result, Ok(200), "the gateway accepted the callback");
    let store = h.gateway.ledger.store.clone();
    let task = store.task_by_id(&task_id).await.unwrap().unwrap();
    assert_eq!(task.charged.map(|p| p.to_string()), Some("320".into()));

    // Attempt 1 (500). Whoever makes it (the woken background worker or this call), the
    // row records it once.
    h.gateway.delivery_worker.run_once().await;
    let id = DeliveryId(1);
    wait_for("attempt 1 recorded", || attempts_reach(&store, id, 1)).await;
    let delivery = store.delivery(id).await.unwrap().unwrap();
    assert_eq!(
        delivery.reservation, task.id,
        "the delivery belongs to the task"
    );
    assert_eq!(delivery.state, DeliveryState::Queued);
    assert_eq!(delivery.attempts, 1);
    assert_eq!(delivery.last_error.as_deref(), Some("HTTP 500"));
    assert_eq!(delivery.next_attempt_at, T0 + 1, "initial back-off 1 s");
    assert_eq!(receiver.count(), 1);

    // Back-off: nothing is due before T0 + 1.
    assert_eq!(h.gateway.delivery_worker.run_once().await, 0);
    assert_eq!(receiver.count(), 1);

    // Restart: stop this gateway, start a new one on the same ledger file.
    let Harness {
        upstream,
        gateway,
        client,
        store_dir,
    } = h;
    gateway.shutdown().await;
    drop(store);
    let listener = bind().await;
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = parse_config(&with_store(
        &config_text(&upstream_url, &extra).replace(GATEWAY_URL, &url),
        store_dir.path(),
    ));
    let gateway = RunningGateway::start_gateway(
        Gateway::with_clock(config, clock.clone()).expect("gateway reopens the ledger"),
        listener,
        None,
    )
    .await
    .expect("gateway restarts");
    let h = Harness {
        upstream,
        gateway,
        client,
        store_dir,
    };
    let store = h.gateway.ledger.store.clone();
    assert_eq!(
        delivery_attempts(&store, id).await,
        1,
        "the outbox survived"
    );

    // Attempt 2 at T0 + 1 (500), from the new process; back-off doubles to 2 s.
    clock.advance(1);
    h.gateway.delivery_worker.run_once().await;
    wait_for("attempt 2 recorded", || attempts_reach(&store, id, 2)).await;
    let delivery = store.delivery(id).await.unwrap().unwrap();
    assert_eq!(delivery.state, DeliveryState::Queued);
    assert_eq!(
        delivery.next_attempt_at,
        T0 + 3,
        "back-off 2 s after attempt 2"
    );
    clock.advance(1);
    assert_eq!(
        h.gateway.delivery_worker.run_once().await,
        0,
        "not due at T0 + 2"
    );
    assert_eq!(receiver.count(), 2);

    // Attempt 3 at T0 + 3: 200, delivered.
    clock.advance(1);
    h.gateway.delivery_worker.run_once().await;
    wait_for("delivered", || {
        in_state(&store, id, DeliveryState::Delivered)
    })
    .await;
    let delivery = store.delivery(id).await.unwrap().unwrap();
    assert_eq!(delivery.attempts, 3);
    assert_eq!(delivery.done_at, Some(T0 + 3));

    // Delivered exactly once more: nothing is attempted after success.
    clock.advance(3600);
    assert_eq!(h.gateway.delivery_worker.run_once().await, 0);
    let received = receiver.received();
    assert_eq!(received.len(), 3, "two failures and one success");
    for attempt in &received {
        assert_eq!(
            attempt.body, sent.body,
            "the caller gets the upstream's callback body byte for byte"
        );
        assert_signed(attempt, SECRET_C);
    }
    let record: serde_json::Value = serde_json::from_slice(&received[2].body).unwrap();
    assert_eq!(record["task_id"], task_id.as_str());
    assert_eq!(record["status"], "3");

    let metrics = h.metrics().await;
    let deliveries = |result| {
        sample(
            &metrics,
            "gatehouse_callback_deliveries_total",
            &[("result", result)],
        )
    };
    // The counters are per process: the new gateway saw attempts 2 and 3.
    assert_eq!(deliveries("retry"), 1.0);
    assert_eq!(deliveries("delivered"), 1.0);
    assert_eq!(deliveries("dead"), 0.0);
}

#[tokio::test]
async fn endpoint_that_always_fails_is_dead_after_max_attempts() {
    let clock = Arc::new(ManualClock::new(T0));
    let receiver = Receiver::start(usize::MAX).await;
    let extra = key_c(2);
    let h = Harness::start_full(
        mock_with_callbacks(),
        |upstream_url| config_text(upstream_url, &extra),
        Some(clock.clone() as Arc<dyn Clock>),
    )
    .await;
    let task_id = submit(&h, &receiver.url).await;
    let sent = h.upstream.advance(&task_id, "2").await.unwrap().unwrap();
    assert_eq!(sent.result, Ok(200));
    let store = h.gateway.ledger.store.clone();
    let id = DeliveryId(1);

    h.gateway.delivery_worker.run_once().await;
    wait_for("attempt 1 recorded", || attempts_reach(&store, id, 1)).await;
    clock.advance(1);
    h.gateway.delivery_worker.run_once().await;
    wait_for("declared dead", || {
        in_state(&store, id, DeliveryState::Dead)
    })
    .await;
    let delivery = store.delivery(id).await.unwrap().unwrap();
    assert_eq!(delivery.attempts, 2);
    assert_eq!(delivery.last_error.as_deref(), Some("HTTP 500"));
    assert_eq!(delivery.done_at, Some(T0 + 1));

    // Dead means no more attempts, however long we wait.
    clock.advance(24 * 3600);
    assert_eq!(h.gateway.delivery_worker.run_once().await, 0);
    let received = receiver.received();
    assert_eq!(received.len(), 2);
    for attempt in &received {
        assert_eq!(attempt.body, sent.body);
        assert_signed(attempt, SECRET_C);
    }

    let metrics = h.metrics().await;
    let deliveries = |result| {
        sample(
            &metrics,
            "gatehouse_callback_deliveries_total",
            &[("result", result)],
        )
    };
    assert_eq!(deliveries("dead"), 1.0);
    assert_eq!(deliveries("retry"), 1.0);
    assert_eq!(deliveries("delivered"), 0.0);
    // The failed task was charged nothing, and the dead delivery did not change that.
    let task = store.task_by_id(&task_id).await.unwrap().unwrap();
    assert_eq!(task.charged.map(|p| p.to_string()), Some("0".into()));
}
