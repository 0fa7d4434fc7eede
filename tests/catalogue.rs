//! The shipped route catalogue (the `[[routes]]` of config.toml) through the in-process
//! gateway and the mock upstream: routing, model allow-lists, task ownership of async
//! products, per-request and per-token pricing, streaming relay and cancellation; and, with
//! the real binary, that a 10 MB stream does not grow the gateway's memory.
//!
//! Prices are read from the loaded config, not repeated here, so the tests follow the
//! catalogue when its prices change.

mod support;

use bytes::Bytes;
use gatehouse::config::{Config, RouteConfig};
use gatehouse::mock_upstream::{MockConfig, MockUpstream, Product, SubmitFault, LONG_PIECE_BYTES};
use gatehouse::points::Points;
use gatehouse::quota::{LedgerEntry, LedgerKind, PeriodKey, Usage};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::future::Future;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::{bind, manual_mock, sample, Harness, TestResponse, KEY_A, KEY_B, UPSTREAM_TOKEN};

/// Bound on every wait: a gateway that never does the thing fails instead of hanging.
const WAIT: Duration = Duration::from_secs(5);
/// Key `c` may only use gpt-4o-mini.
const KEY_C: &str = "kc_2d0a7b2a2f8e6c3b1b5a4f3e2d1c0b9a";

/// The shipped catalogue: config.toml from its first `[[routes]]` to the end.
fn catalogue() -> &'static str {
    let text = include_str!("../config.toml");
    let start = text
        .find("\n[[routes]]")
        .expect("config.toml ships a [[routes]] catalogue");
    &text[start..]
}

fn key_c() -> String {
    format!(
        r#"
[[keys]]
id = "c"
key_sha256 = "{}"
rate_per_second = 1000
burst = 1000
allowed_models = ["gpt-4o-mini"]
"#,
        gatehouse::auth::hash_key(KEY_C)
    )
}

async fn start() -> Harness {
    start_with(manual_mock()).await
}

async fn start_with(mock: MockConfig) -> Harness {
    Harness::start_with(&format!("{}{}", key_c(), catalogue()), mock).await
}

fn route(h: &Harness, name: &str) -> RouteConfig {
    let config: &Config = &h.gateway.live.load().config;
    config
        .routes
        .iter()
        .find(|route| route.name == name)
        .unwrap_or_else(|| panic!("the catalogue has no route {name:?}"))
        .clone()
}

fn points_per_request(h: &Harness, name: &str) -> Points {
    route(h, name)
        .points_per_request
        .unwrap_or_else(|| panic!("route {name} has points_per_request"))
}

async fn call(
    h: &Harness,
    method: Method,
    path: &str,
    key: &str,
    body: Option<&Value>,
) -> TestResponse {
    let auth = format!("Bearer {key}");
    let mut headers = vec![("authorization", auth.as_str())];
    if body.is_some() {
        headers.push(("content-type", "application/json"));
    }
    let body = body.map(Value::to_string).unwrap_or_default();
    h.client.send(method, &h.url(path), &headers, &body).await
}

async fn post(h: &Harness, path: &str, key: &str, body: Value) -> TestResponse {
    call(h, Method::POST, path, key, Some(&body)).await
}

async fn get(h: &Harness, path: &str, key: &str) -> TestResponse {
    call(h, Method::GET, path, key, None).await
}

async fn usage(h: &Harness, key: &str) -> Usage {
    h.gateway
        .ledger
        .store
        .usage(key, PeriodKey::all())
        .await
        .unwrap()
}

async fn entries(h: &Harness, key: &str, task_id: Option<&str>) -> Vec<LedgerEntry> {
    h.gateway
        .ledger
        .store
        .ledger_entries(key, task_id)
        .await
        .unwrap()
}

/// Polls `check` until it holds or `WAIT` passes. For effects with nothing to await on
/// (a stream's charge is written after its body ended, on a spawned task).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A request whose body is read frame by frame by the test.
async fn open(h: &Harness, path: &str, key: &str, body: &Value) -> Response<Incoming> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = Request::post(h.url(path))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    tokio::time::timeout(WAIT, client.request(request))
        .await
        .expect("response headers in time")
        .expect("request sent")
}

async fn next_frame(body: &mut Incoming) -> Option<Bytes> {
    match tokio::time::timeout(WAIT, body.frame()).await {
        Err(_) => panic!("no frame within {WAIT:?}"),
        Ok(None) => None,
        Ok(Some(frame)) => Some(
            frame
                .expect("the stream does not break")
                .into_data()
                .unwrap_or_default(),
        ),
    }
}

/// The JSON chunks of a server-sent-event text, without `[DONE]`.
fn sse_chunks(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|event| event.trim().strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).expect("each event is JSON"))
        .collect()
}

/// What the catalogue's rates make of a `usage`, in exact milli-point arithmetic
/// (a rate per 1k tokens is milli-points per token).
fn expected_cost(h: &Harness, model: &str, usage: &Value) -> Points {
    let pricing = route(h, "chat_completions")
        .token_pricing
        .expect("the chat route is priced by tokens");
    let rates = pricing.rates(Some(model));
    let prompt = usage["prompt_tokens"].as_u64().unwrap() as f64;
    let completion = usage["completion_tokens"].as_u64().unwrap() as f64;
    Points::from_milli(
        (prompt * rates.prompt_per_1k + completion * rates.completion_per_1k).round() as i64,
    )
}

fn chat_body(model: &str, stream: bool) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Write a haiku about gateways, please."}],
    });
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

#[tokio::test]
async fn a_path_not_in_the_table_is_404_and_never_forwarded() {
    let h = start().await;
    for (method, path) in [
        (Method::POST, "/v1/responses"),
        (Method::POST, "/suno/submit/lyrics"),
        (Method::GET, "/mj/task/1/image-seed"),
    ] {
        let response = call(&h, method, path, KEY_A, Some(&json!({}))).await;
        assert_eq!(
            response.status,
            StatusCode::NOT_FOUND,
            "{path}: {}",
            response.text()
        );
        assert_eq!(response.json()["code"], 404);
    }
    assert!(
        h.upstream.received().is_empty(),
        "nothing reached the upstream"
    );
}

#[tokio::test]
async fn a_model_the_key_may_not_use_is_403_before_the_upstream() {
    let h = start().await;
    let refused = post(
        &h,
        "/v1/chat/completions",
        KEY_C,
        chat_body("gpt-4o", false),
    )
    .await;
    let msg = refused.assert_envelope(403, "\"gpt-4o\"");
    assert!(msg.contains("key c"), "{msg}");
    assert!(h.upstream.received().is_empty());
    assert_eq!(usage(&h, "c").await, Usage::default(), "nothing reserved");

    let allowed = post(
        &h,
        "/v1/chat/completions",
        KEY_C,
        chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(allowed.status, StatusCode::OK, "{}", allowed.text());
    assert_eq!(allowed.json()["model"], "gpt-4o-mini");
    // Keys without a list may use any model.
    let open = post(
        &h,
        "/v1/chat/completions",
        KEY_A,
        chat_body("gpt-4o", false),
    )
    .await;
    assert_eq!(open.status, StatusCode::OK);
    assert_eq!(h.upstream_requests("/v1/chat/completions").len(), 2);
}

#[tokio::test]
async fn a_route_allow_list_refuses_other_models() {
    let h = Harness::start(
        r#"
[[routes]]
name = "chat"
path = "/v1/chat/completions"
kind = "passthrough"
model_pointer = "/model"
allowed_models = ["deepseek-chat"]
"#,
    )
    .await;
    let refused = post(
        &h,
        "/v1/chat/completions",
        KEY_A,
        chat_body("gpt-4o", false),
    )
    .await;
    let msg = refused.assert_envelope(403, "\"gpt-4o\"");
    assert!(msg.contains("route chat"), "{msg}");
    assert!(h.upstream.received().is_empty());
    let allowed = post(
        &h,
        "/v1/chat/completions",
        KEY_A,
        chat_body("deepseek-chat", false),
    )
    .await;
    assert_eq!(allowed.status, StatusCode::OK, "{}", allowed.text());
}

async fn suno_submit(h: &Harness, key: &str) -> String {
    let response = post(
        h,
        "/suno/submit/music",
        key,
        json!({"prompt": "a song about a gatekeeper", "mv": "chirp-v3-5"}),
    )
    .await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert_eq!(response.json()["code"], "success");
    response.json()["data"]
        .as_str()
        .expect("the task id")
        .to_string()
}

#[tokio::test]
async fn a_suno_task_is_fetched_only_by_its_owner() {
    let h = start().await;
    let id = suno_submit(&h, KEY_A).await;
    let path = format!("/suno/fetch/{id}");

    let stranger = get(&h, &path, KEY_B).await;
    stranger.assert_envelope(404, &id);
    assert!(
        h.upstream_requests(&path).is_empty(),
        "a stranger's fetch is not forwarded"
    );

    let owner = get(&h, &path, KEY_A).await;
    assert_eq!(owner.status, StatusCode::OK, "{}", owner.text());
    assert_eq!(owner.json()["data"]["task_id"], id.as_str());
    assert_eq!(owner.json()["data"]["status"], "SUBMITTED");
    assert_eq!(h.upstream_requests(&path).len(), 1);
    assert_eq!(
        h.upstream.product_task(Product::Suno, &id).unwrap().fetches,
        1
    );
}

#[tokio::test]
async fn a_finished_suno_task_is_charged_its_price_and_a_failed_one_nothing() {
    let h = start().await;
    let price = points_per_request(&h, "suno_submit");
    let won = suno_submit(&h, KEY_A).await;
    let lost = suno_submit(&h, KEY_A).await;
    let after_submit = usage(&h, "a").await;
    assert_eq!(
        (after_submit.reserved, after_submit.charged),
        (price.saturating_add(price), Points::ZERO)
    );

    h.upstream.set_suno_status(&won, "IN_PROGRESS").unwrap();
    let running = get(&h, &format!("/suno/fetch/{won}"), KEY_A).await;
    assert_eq!(running.json()["data"]["status"], "IN_PROGRESS");
    assert_eq!(usage(&h, "a").await.charged, Points::ZERO, "not yet");

    h.upstream.set_suno_status(&won, "SUCCESS").unwrap();
    h.upstream.set_suno_status(&lost, "FAILURE").unwrap();
    for id in [&won, &lost, &won] {
        let fetched = get(&h, &format!("/suno/fetch/{id}"), KEY_A).await;
        assert_eq!(fetched.status, StatusCode::OK, "{}", fetched.text());
    }
    let settled = usage(&h, "a").await;
    assert_eq!(
        (settled.charged, settled.reserved),
        (price, Points::ZERO),
        "charged once for the finished task, nothing for the failed one"
    );
    let charged = |entries: Vec<LedgerEntry>| -> Vec<Points> {
        entries
            .into_iter()
            .filter(|e| e.kind == LedgerKind::Charge)
            .map(|e| e.points)
            .collect()
    };
    assert_eq!(
        charged(entries(&h, "a", Some(&format!("suno:{won}"))).await),
        [price]
    );
    let lost_entries = entries(&h, "a", Some(&format!("suno:{lost}"))).await;
    assert!(
        charged(lost_entries.clone())
            .iter()
            .all(|p| *p == Points::ZERO),
        "{lost_entries:?}"
    );
    assert!(lost_entries
        .iter()
        .any(|e| matches!(e.kind, LedgerKind::Release | LedgerKind::Refund)));
}

#[tokio::test]
async fn a_midjourney_task_is_owned_and_charged_like_suno() {
    let h = start().await;
    let price = points_per_request(&h, "mj_submit");
    let submitted = post(&h, "/mj/submit/imagine", KEY_A, json!({"prompt": "a gate"})).await;
    assert_eq!(submitted.json()["code"], 1, "{}", submitted.text());
    let id = submitted.json()["result"].as_str().unwrap().to_string();
    let path = format!("/mj/task/{id}/fetch");
    get(&h, &path, KEY_B).await.assert_envelope(404, &id);

    h.upstream.set_mj_status(&id, "SUCCESS").unwrap();
    let fetched = get(&h, &path, KEY_A).await;
    assert_eq!(fetched.json()["status"], "SUCCESS", "{}", fetched.text());
    let usage = usage(&h, "a").await;
    assert_eq!((usage.charged, usage.reserved), (price, Points::ZERO));
    assert_eq!(h.upstream_requests(&path).len(), 1);
}

#[tokio::test]
async fn a_submit_answered_with_an_error_is_released() {
    let h = start().await;
    h.upstream
        .push_fault("/suno/submit/music", SubmitFault::Status500);
    let failed = post(&h, "/suno/submit/music", KEY_A, json!({"prompt": "x"})).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(failed.json()["msg"], "internal server error");

    // A Midjourney refusal comes as HTTP 200 without a task id: no task, nothing to pay.
    let refused = post(&h, "/mj/submit/imagine", KEY_A, json!({"prompt": ""})).await;
    assert_eq!(refused.status, StatusCode::OK);
    assert_eq!(refused.json()["code"], 4);

    assert!(h.upstream.product_tasks().is_empty());
    let usage = usage(&h, "a").await;
    assert_eq!(
        (usage.charged, usage.reserved),
        (Points::ZERO, Points::ZERO)
    );
    let entries = entries(&h, "a", None).await;
    let kinds: Vec<LedgerKind> = entries.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == LedgerKind::Reserve).count(),
        2,
        "{entries:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == LedgerKind::Release).count(),
        2,
        "{entries:?}"
    );
}

#[tokio::test]
async fn a_chat_the_upstream_fails_costs_nothing() {
    let h = start().await;
    h.upstream
        .push_fault("/v1/chat/completions", SubmitFault::Status500);
    let failed = post(&h, "/v1/chat/completions", KEY_A, chat_body("gpt-4o", true)).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    let usage = usage(&h, "a").await;
    assert_eq!(
        (usage.charged, usage.reserved),
        (Points::ZERO, Points::ZERO)
    );
    assert_eq!(h.upstream.streams().started, 0);
}

#[tokio::test]
async fn a_chat_answer_is_charged_its_usage_at_the_model_rates() {
    let h = start().await;
    let response = post(
        &h,
        "/v1/chat/completions",
        KEY_A,
        chat_body("gpt-4o", false),
    )
    .await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let answer = response.json();
    let expected = expected_cost(&h, "gpt-4o", &answer["usage"]);
    assert!(expected > Points::ZERO);
    let usage = usage(&h, "a").await;
    assert_eq!((usage.charged, usage.reserved), (expected, Points::ZERO));

    let metrics = h.metrics().await;
    let tokens = |direction| {
        sample(
            &metrics,
            "gatehouse_tokens_total",
            &[
                ("route", "chat_completions"),
                ("model", "gpt-4o"),
                ("direction", direction),
            ],
        )
    };
    assert_eq!(
        tokens("prompt"),
        answer["usage"]["prompt_tokens"].as_f64().unwrap()
    );
    assert_eq!(
        tokens("completion"),
        answer["usage"]["completion_tokens"].as_f64().unwrap()
    );
    assert_eq!(
        sample(
            &metrics,
            "gatehouse_model_requests_total",
            &[("route", "chat_completions"), ("model", "gpt-4o")]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_streamed_chat_is_charged_from_its_final_usage_chunk() {
    let h = start().await;
    let response = post(
        &h,
        "/v1/chat/completions",
        KEY_A,
        chat_body("deepseek-chat", true),
    )
    .await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let chunks = sse_chunks(&response.text());
    let usage_chunk = chunks.last().expect("chunks");
    let expected = expected_cost(&h, "deepseek-chat", &usage_chunk["usage"]);
    eventually("the stream is charged", || async {
        usage(&h, "a").await.charged != Points::ZERO
    })
    .await;
    let usage = usage(&h, "a").await;
    assert_eq!((usage.charged, usage.reserved), (expected, Points::ZERO));

    let metrics = h.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "gatehouse_tokens_total",
            &[("model", "deepseek-chat"), ("direction", "completion")]
        ),
        usage_chunk["usage"]["completion_tokens"].as_f64().unwrap()
    );
    assert_eq!(
        sample(
            &metrics,
            "gatehouse_model_requests_total",
            &[("route", "chat_completions"), ("model", "deepseek-chat")]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_stream_without_usage_is_charged_the_estimate() {
    let h = start().await;
    let mut body = chat_body("gpt-4o", true);
    body.as_object_mut().unwrap().remove("stream_options");
    let response = post(&h, "/v1/chat/completions", KEY_A, body).await;
    assert!(response.text().ends_with("data: [DONE]\n\n"));
    let estimate = route(&h, "chat_completions")
        .token_pricing
        .unwrap()
        .estimate;
    eventually("the stream is charged", || async {
        usage(&h, "a").await.charged != Points::ZERO
    })
    .await;
    assert_eq!(usage(&h, "a").await.charged, estimate);
    assert_eq!(
        sample(
            &h.metrics().await,
            "gatehouse_settlement_anomalies_total",
            &[("kind", "missing_usage")]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_streamed_chat_is_relayed_while_the_upstream_is_still_producing() {
    let h = start_with(MockConfig {
        stream_chunk_delay: Duration::from_millis(2),
        ..manual_mock()
    })
    .await;
    // The mock sends its first event and holds the rest: a gateway that buffers the
    // answer never delivers anything, one that relays delivers the first event now.
    h.upstream.pause_streams();
    let response = open(
        &h,
        "/v1/chat/completions",
        KEY_A,
        &chat_body("gpt-4o", true),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let first = next_frame(&mut body).await.expect("a first frame");
    assert!(first.starts_with(b"data: {"), "{first:?}");
    let stats = h.upstream.streams();
    assert_eq!(
        (stats.events_sent, stats.completed),
        (1, 0),
        "the first event arrived before the upstream produced the rest"
    );

    h.upstream.resume_streams();
    let mut frames = 1;
    let mut text = String::from_utf8(first.to_vec()).unwrap();
    while let Some(frame) = next_frame(&mut body).await {
        frames += 1;
        text.push_str(std::str::from_utf8(&frame).unwrap());
    }
    assert!(frames > 1, "the answer came in several frames");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let content: String = sse_chunks(&text)
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(content, "This is a mock reply.");
    assert_eq!(h.upstream.streams().completed, 1);
}

#[tokio::test]
async fn a_client_hanging_up_mid_stream_cancels_the_upstream_request() {
    let h = start().await;
    // A finished request leaves the gateway's connection to the upstream open, pooled:
    // so a connection closing below is the cancellation, not the end of a request.
    let warm = post(&h, "/v1/chat/completions", KEY_A, chat_body("gpt-4o", true)).await;
    assert!(warm.text().ends_with("data: [DONE]\n\n"));
    assert_eq!(h.upstream.open_connections(), 1, "the pooled connection");

    h.upstream.pause_streams();
    let response = open(
        &h,
        "/v1/chat/completions",
        KEY_A,
        &chat_body("gpt-4o", true),
    )
    .await;
    let mut body = response.into_body();
    next_frame(&mut body).await.expect("a first frame");
    let before = h.upstream.open_connections();
    assert!(before >= 1, "the stream holds a connection to the upstream");
    assert_eq!(h.upstream.streams().abandoned, 0);

    drop(body);
    tokio::time::timeout(
        WAIT,
        h.upstream
            .wait_until(|mock| mock.open_connections() < before && mock.streams().abandoned == 1),
    )
    .await
    .expect("the upstream request is cancelled when the client hangs up");
    assert_eq!(
        h.upstream.streams().completed,
        1,
        "only the warm-up finished"
    );
    // The reservation of the cancelled stream does not stay open.
    eventually("the cancelled stream is settled", || async {
        usage(&h, "a").await.reserved == Points::ZERO
    })
    .await;
    assert_eq!(
        sample(
            &h.metrics().await,
            "gatehouse_settlement_anomalies_total",
            &[("kind", "stream_incomplete")]
        ),
        1.0
    );
}

#[tokio::test]
async fn passthrough_routes_send_only_the_upstream_token() {
    let h = start().await;
    assert_eq!(get(&h, "/v1/models", KEY_A).await.status, StatusCode::OK);
    post(
        &h,
        "/v1/chat/completions",
        KEY_A,
        chat_body("gpt-4o", false),
    )
    .await;
    post(&h, "/v1/chat/completions", KEY_A, chat_body("gpt-4o", true)).await;
    let id = suno_submit(&h, KEY_A).await;
    get(&h, &format!("/suno/fetch/{id}"), KEY_A).await;
    post(&h, "/mj/submit/imagine", KEY_A, json!({"prompt": "x"})).await;

    let received = h.upstream.received();
    assert_eq!(received.len(), 6);
    let expected = format!("Bearer {UPSTREAM_TOKEN}");
    for request in &received {
        let auth: Vec<_> = request.headers.get_all("authorization").iter().collect();
        assert_eq!(auth.len(), 1, "{}", request.path);
        assert_eq!(auth[0], expected.as_str(), "{}", request.path);
        for (name, value) in &request.headers {
            assert!(
                !value
                    .as_bytes()
                    .windows(KEY_A.len())
                    .any(|w| w == KEY_A.as_bytes()),
                "{} carried the caller's key in {name}",
                request.path
            );
        }
    }
}

// ---- known gateway bugs (see the catalogue branch's report); they pass once fixed ----

#[tokio::test]

async fn a_key_allow_list_does_not_block_routes_that_name_no_model() {
    let h = start().await;
    // KeyPolicy::allowed_models: "Models this key may use on routes that name a model".
    let models = get(&h, "/v1/models", KEY_C).await;
    assert_eq!(models.status, StatusCode::OK, "{}", models.text());
    let submitted = post(&h, "/suno/submit/music", KEY_C, json!({"prompt": "x"})).await;
    assert_eq!(submitted.status, StatusCode::OK, "{}", submitted.text());
}

#[tokio::test]

async fn a_priced_json_answer_larger_than_the_read_limit_reaches_the_client_whole() {
    let h = start().await;
    // About 9 MiB of JSON: above the 8 MiB the pass-through layer reads to find `usage`
    // (an embeddings answer for a large batch is that big too).
    let body = json!({"model": "gpt-4o", "max_tokens": 9 * 1024, "messages": []});
    let response = open(&h, "/v1/chat/completions", KEY_A, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("the answer in time")
        .expect("a complete answer, not a broken connection")
        .to_bytes();
    let json: Value = serde_json::from_slice(&answer).expect("the upstream's JSON, whole");
    assert_eq!(json["usage"]["completion_tokens"], 9 * 1024);
}

// ---- the real binary: a 10 MB stream against its resident memory ----

/// A `gatehouse serve` child, killed when dropped.
struct Gatehouse {
    child: Child,
    url: String,
}

impl Drop for Gatehouse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gatehouse {
    async fn start(config: &std::path::Path, log: &std::path::Path) -> Gatehouse {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .env_remove("GATEHOUSE_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("the gatehouse binary starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Reads stdout to its end, so a later print never meets a closed pipe.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("gatehouse listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.trim().to_string());
                    }
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(url)) => Gatehouse { child, url },
            _ => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "gatehouse did not print its listening line ({status:?}); stderr:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
    }

    /// A field of /proc/PID/status in KiB (`VmRSS`, `VmHWM`).
    fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/PID/status of the gateway");
        status
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{field}:")))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"))
    }

    /// Resets the peak (`VmHWM`) to the current RSS (Linux `clear_refs` value 5).
    fn reset_peak(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5").is_ok()
    }
}

/// Streams a long chat answer through the gateway; returns (bytes, frames) received.
async fn stream_through(url: &str, max_tokens: usize) -> (usize, usize) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let body = json!({
        "model": "gpt-4o", "stream": true, "max_tokens": max_tokens,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "a long story"}],
    });
    let request = Request::post(format!("{url}/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY_A}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = client.request(request).await.expect("request sent");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let (mut bytes, mut frames) = (0, 0);
    let mut tail = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("the stream does not break").into_data() {
            bytes += data.len();
            frames += 1;
            tail.extend_from_slice(&data);
            let keep = tail.len().saturating_sub(64);
            tail.drain(..keep);
        }
    }
    assert!(tail.ends_with(b"data: [DONE]\n\n"), "the stream finished");
    (bytes, frames)
}

#[cfg(target_os = "linux")] // reads /proc
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_megabyte_stream_does_not_grow_the_gateways_memory() {
    const MAX_TOKENS: usize = 10_240; // 10 MiB of content, more on the wire
    const MAX_GROWTH_KIB: u64 = 4 * 1024;
    let upstream = MockUpstream::start(bind().await, manual_mock()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gatehouse.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"

[upstream]
base_url = "{}"
token = "{UPSTREAM_TOKEN}"

[store]
path = {:?}

[[keys]]
id = "a"
key_sha256 = "{}"
rate_per_second = 100
burst = 100

[[routes]]
name = "chat_completions"
path = "/v1/chat/completions"
kind = "passthrough"
stream = true
model_pointer = "/model"
token_pricing = {{ estimate = 20, default = {{ prompt_per_1k = 1, completion_per_1k = 2 }} }}
"#,
            upstream.base_url(),
            dir.path().join("ledger.db").display().to_string(),
            gatehouse::auth::hash_key(KEY_A),
        ),
    )
    .unwrap();
    let gateway = Gatehouse::start(&config, &dir.path().join("gatehouse.log")).await;

    // Warm up: threads, pools and the ledger are set up before measuring.
    stream_through(&gateway.url, 64).await;
    let rss_before = gateway.memory_kib("VmRSS");
    let peak_reset = gateway.reset_peak();
    let peak_before = gateway.memory_kib("VmHWM");

    let (bytes, frames) = stream_through(&gateway.url, MAX_TOKENS).await;
    let rss_after = gateway.memory_kib("VmRSS");
    let peak_after = gateway.memory_kib("VmHWM");
    let baseline = if peak_reset { rss_before } else { peak_before };
    eprintln!(
        "received {bytes} bytes in {frames} frames; VmRSS {rss_before} → {rss_after} KiB, \
         VmHWM {peak_before} → {peak_after} KiB (peak reset: {peak_reset})"
    );
    assert!(
        bytes >= MAX_TOKENS * LONG_PIECE_BYTES,
        "the client received the whole answer: {bytes} bytes"
    );
    assert!(
        rss_after.saturating_sub(rss_before) < MAX_GROWTH_KIB,
        "VmRSS grew by {} KiB streaming {bytes} bytes",
        rss_after.saturating_sub(rss_before)
    );
    assert!(
        peak_after.saturating_sub(baseline) < MAX_GROWTH_KIB,
        "VmHWM grew by {} KiB streaming {bytes} bytes",
        peak_after.saturating_sub(baseline)
    );
    assert_eq!(upstream.streams().completed, 2);
}

/// A chat route with or without `stream = true`, an upstream timeout of 300 ms, and the
/// mock's streams paused after their first event.
async fn paused_chat(stream: bool) -> (Harness, Incoming) {
    let routes = format!(
        "[[routes]]\nname = \"chat\"\npath = \"/v1/chat/completions\"\nkind = \"passthrough\"\nstream = {stream}\n"
    );
    let h = Harness::start_custom(manual_mock(), |url| {
        support::config_text(url, &routes).replace("\ntimeout_ms = 5000", "\ntimeout_ms = 300")
    })
    .await;
    h.upstream.pause_streams();
    let body = json!({"model": "gpt-4o", "stream": true, "messages": []});
    let mut answer = open(&h, "/v1/chat/completions", KEY_A, &body)
        .await
        .into_body();
    assert!(
        next_frame(&mut answer).await.is_some(),
        "a first chunk arrives"
    );
    (h, answer)
}

#[tokio::test]
async fn only_stream_routes_may_answer_for_longer_than_the_upstream_timeout() {
    let (streaming, mut kept) = paused_chat(true).await;
    let (_whole, mut cut) = paused_chat(false).await;

    // Both upstream answers now stall. The non-stream route's answer fails once
    // upstream.timeout_ms has passed; the stream route's keeps waiting.
    let broken = tokio::time::timeout(WAIT, cut.frame())
        .await
        .expect("the stalled answer is ended, not left hanging");
    assert!(
        matches!(broken, Some(Err(_)) | None),
        "the non-stream answer must not continue: {broken:?}"
    );
    let waited = tokio::time::timeout(Duration::from_millis(600), kept.frame()).await;
    assert!(
        waited.is_err(),
        "a stream route keeps waiting past upstream.timeout_ms"
    );
    streaming.upstream.resume_streams();
    while next_frame(&mut kept).await.is_some() {}
}
