use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::*;

const TOKEN: &str = "upstream-secret";
/// Every wait in these tests is bounded, so a broken mock fails instead of hanging.
const WAIT: Duration = Duration::from_secs(3);

fn test_config() -> MockConfig {
    MockConfig {
        token: TOKEN.to_string(),
        auto_progress: false,
        feed_not_exist_first: 0,
        ..MockConfig::default()
    }
}

async fn start(config: MockConfig) -> MockUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    MockUpstream::start(listener, config).await
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!("answer is not JSON ({err}): {:?}", self.body);
        })
    }
}

async fn post_as(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: String,
    token: Option<&str>,
    body: impl Into<Bytes>,
) -> Result<Answer, hyper_util::client::legacy::Error> {
    let mut request = Request::post(url).header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = client
        .request(request.body(Full::new(body.into())).unwrap())
        .await?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

async fn post(mock: &MockUpstream, path: &str, body: Value) -> Answer {
    post_as(
        &client(),
        format!("{}{path}", mock.base_url()),
        Some(TOKEN),
        body.to_string(),
    )
    .await
    .unwrap()
}

fn generate_body(callback_url: &str) -> Value {
    json!({"callback_url": callback_url, "ratio": "16:9", "prompt": "一只小猫", "style": "cinematic",
           "model": "gen3", "options": {"seconds": 10, "motion_vector": {"x": 0, "y": 0.4, "z": 0, "r": -6, "bg_x_pan": 0, "bg_y_pan": 0}}})
}

async fn submit(mock: &MockUpstream, callback_url: &str) -> String {
    let answer = post(mock, "/runway/pro/generate", generate_body(callback_url)).await;
    assert_eq!(answer.status, StatusCode::OK);
    answer.json()["data"]["task_id"]
        .as_str()
        .expect("submit answers a task_id")
        .to_string()
}

async fn feed(mock: &MockUpstream, task_id: &str) -> Value {
    let answer = post(mock, "/runway/feed", json!({ "task_id": task_id })).await;
    assert_eq!(answer.status, StatusCode::OK);
    answer.json()
}

/// A callback receiver: every POST body arrives on the channel, answered 200.
struct Receiver {
    url: String,
    bodies: mpsc::UnboundedReceiver<Value>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/hooks/runway/secret",
            listener.local_addr().unwrap()
        );
        let (tx, bodies) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let body = request.into_body().collect().await?.to_bytes();
                            let _ = tx.send(serde_json::from_slice(&body).unwrap_or(Value::Null));
                            Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from("ok"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver { url, bodies }
    }

    async fn next(&mut self) -> Value {
        tokio::time::timeout(WAIT, self.bodies.recv())
            .await
            .expect("a callback arrives")
            .expect("the receiver is running")
    }
}

#[test]
fn price_table() {
    assert_eq!(mock_price("gen3", 10), 320);
    assert_eq!(mock_price("gen3", 5), 160);
    assert_eq!(mock_price("gen2", 10), 200);
    assert_eq!(mock_price("gen2", 5), 100);
}

#[tokio::test]
async fn submit_answers_the_documented_shape_with_empty_strings() {
    let mock = start(test_config()).await;
    let answer = post(
        &mock,
        "/runway/pro/generate",
        generate_body("http://example.com/hook"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers[header::CONTENT_TYPE], "application/json");
    let json = answer.json();
    let task_id = json["data"]["task_id"].as_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&task_id).is_ok(), "{task_id}");
    assert!(json["exec_time"].is_f64(), "exec_time is a float: {json}");
    assert_eq!(
        json,
        json!({"code": 200, "msg": "成功",
               "data": {"task_id": task_id, "state": "", "status": "", "prompt": "", "prompt_en": null,
                        "video_url": null, "poster": null, "last_frame": null, "msg": null,
                        "point": "", "refund": "", "create_time": "", "update_time": ""},
               "exec_time": json["exec_time"]})
    );
    // Field order as the upstream sends it.
    let text = std::str::from_utf8(&answer.body).unwrap();
    assert!(
        text.starts_with(r#"{"code":200,"msg":"成功","data":{"task_id":"#),
        "{text}"
    );

    let task = mock.task(&task_id).expect("the task exists");
    assert_eq!(
        (
            task.status.as_str(),
            task.model.as_str(),
            task.seconds,
            task.prompt.as_str()
        ),
        ("0", "gen3", 10, "一只小猫")
    );
    assert_eq!(task.callback_url, "http://example.com/hook");
    let received = mock.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].method, Method::POST);
    assert_eq!(received[0].path, "/runway/pro/generate");
    assert_eq!(
        received[0].headers[header::AUTHORIZATION],
        format!("Bearer {TOKEN}")
    );
    assert_eq!(
        received[0].json(),
        Some(generate_body("http://example.com/hook"))
    );
}

#[tokio::test]
async fn wrong_or_missing_token_is_403_key_incorrect() {
    let mock = start(test_config()).await;
    let url = format!("{}/runway/pro/generate", mock.base_url());
    let body = generate_body("http://example.com/hook").to_string();
    for token in [Some("wrong"), None] {
        let answer = post_as(&client(), url.clone(), token, body.clone())
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
        assert_eq!(
            answer.json(),
            json!({"code": 403, "msg": "key incorrect", "data": null})
        );
    }
    assert!(mock.tasks().is_empty());
}

#[tokio::test]
async fn missing_callback_url_is_http_200_with_code_400() {
    let mock = start(test_config()).await;
    for body in [
        json!({"prompt": "x", "model": "gen3"}),
        json!({"callback_url": ""}),
    ] {
        let answer = post(&mock, "/runway/pro/generate", body).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.json(),
            json!({"code": 400, "msg": "callback_url_empty", "data": null})
        );
    }
    let answer = post_as(
        &client(),
        format!("{}/runway/pro/generate", mock.base_url()),
        Some(TOKEN),
        "{not json",
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.json()["code"], 400);
    assert!(mock.tasks().is_empty());
}

#[tokio::test]
async fn unknown_path_is_a_404_envelope() {
    let mock = start(test_config()).await;
    let answer = post(&mock, "/nope", json!({})).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(
        answer.json(),
        json!({"code": 404, "msg": "not found", "data": null})
    );
}

#[tokio::test]
async fn feed_answers_task_not_exist_first_then_the_record() {
    let mock = start(MockConfig {
        feed_not_exist_first: 2,
        ..test_config()
    })
    .await;
    let not_exist = json!({"code": 400, "msg": "task_not_exist", "data": null});
    assert_eq!(feed(&mock, "no-such-task").await, not_exist);

    let task_id = submit(&mock, "http://example.com/hook").await;
    assert_eq!(feed(&mock, &task_id).await, not_exist);
    assert_eq!(feed(&mock, &task_id).await, not_exist);
    let json = feed(&mock, &task_id).await;
    assert_eq!(json["code"], 200);
    assert_eq!(json["exec_time"], json!(0));
    let data = &json["data"];
    assert_eq!(data["task_id"], task_id.as_str());
    assert_eq!(data["status"], "0");
    assert_eq!(data["state"], "");
    assert_eq!(data["point"], "");
    assert_eq!(data["refund"], "");
    assert_eq!(data["prompt"], "一只小猫");
    assert!(data["create_time"].as_str().unwrap().parse::<u64>().is_ok());
    assert_eq!(mock.task(&task_id).unwrap().feeds, 3);
}

#[tokio::test]
async fn driven_task_reports_point_and_refund_and_calls_back() {
    let mut receiver = Receiver::start().await;
    let mock = start(test_config()).await;
    let task_id = submit(&mock, &receiver.url).await;

    let sent = mock.advance(&task_id, "1").await.unwrap().unwrap();
    assert_eq!(sent.result, Ok(200));
    let generating = receiver.next().await;
    assert_eq!(generating["task_id"], task_id.as_str());
    assert_eq!(generating["status"], "1");
    assert_eq!(generating["state"], "running");
    assert_eq!(generating["point"], "320");
    assert_eq!(generating["refund"], "");
    assert!(
        generating.get("code").is_none(),
        "the callback is the flat record"
    );

    mock.advance(&task_id, "3").await.unwrap().unwrap();
    let done = receiver.next().await;
    assert_eq!(done["status"], "3");

    let data = feed(&mock, &task_id).await["data"].clone();
    assert_eq!(data, done, "the callback carries what feed says");
    assert_eq!(data["state"], "succeeded");
    assert_eq!(data["point"], "320");
    assert_eq!(data["refund"], "0");
    assert!(data["video_url"]
        .as_str()
        .unwrap()
        .starts_with("https://cdn.example/"));
    assert!(data["poster"].is_string() && data["last_frame"].is_string());

    let sent = mock.callbacks_sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].url, receiver.url);
    assert_eq!(sent[0].status.as_deref(), Some("1"));
    assert_eq!(sent[1].status.as_deref(), Some("3"));
}

#[tokio::test]
async fn failed_task_refunds_by_amount_or_by_flag() {
    for (style, model, seconds, point, refund) in [
        (RefundStyle::Amount, "gen3", 10, "320", "320"),
        (RefundStyle::Amount, "gen2", 5, "100", "100"),
        (RefundStyle::Flag, "gen3", 5, "160", "1"),
    ] {
        let mock = start(MockConfig {
            refund_style: style,
            send_callbacks: false,
            ..test_config()
        })
        .await;
        let mut body = generate_body("http://example.com/hook");
        body["model"] = json!(model);
        body["options"]["seconds"] = json!(seconds);
        let answer = post(&mock, "/runway/pro/generate", body).await;
        let task_id = answer.json()["data"]["task_id"]
            .as_str()
            .unwrap()
            .to_string();

        assert_eq!(mock.advance(&task_id, "2").await, Ok(None));
        let data = feed(&mock, &task_id).await["data"].clone();
        assert_eq!(data["status"], "2");
        assert_eq!(data["state"], "failed");
        assert_eq!(data["video_url"], Value::Null);
        assert_eq!(
            (data["point"].as_str(), data["refund"].as_str()),
            (Some(point), Some(refund)),
            "{style:?} {model} {seconds}"
        );
    }
}

#[tokio::test]
async fn set_task_outcome_overrides_point_and_refund() {
    let mock = start(MockConfig {
        send_callbacks: false,
        ..test_config()
    })
    .await;
    let task_id = submit(&mock, "http://example.com/hook").await;
    mock.set_task_outcome(&task_id, "3", Some(""), Some("abc"))
        .await
        .unwrap();
    let task = mock.task(&task_id).unwrap();
    assert_eq!(
        (
            task.status.as_str(),
            task.point.as_str(),
            task.refund.as_str()
        ),
        ("3", "", "abc")
    );
    assert_eq!(
        mock.advance("no-such-task", "3").await,
        Err(UnknownTask("no-such-task".to_string()))
    );
}

#[tokio::test]
async fn send_callback_repeats_wrapped_and_stale_forms() {
    let mut receiver = Receiver::start().await;
    let mock = start(test_config()).await;
    let task_id = submit(&mock, &receiver.url).await;
    mock.advance(&task_id, "3").await.unwrap();
    assert_eq!(receiver.next().await["status"], "3");

    let sent = mock
        .send_callback(&task_id, CallbackBody::Current, 2)
        .await
        .unwrap();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|s| s.result == Ok(200)));
    assert_eq!(receiver.next().await["status"], "3");
    assert_eq!(receiver.next().await["status"], "3");

    mock.send_callback(&task_id, CallbackBody::Wrapped, 1)
        .await
        .unwrap();
    let wrapped = receiver.next().await;
    assert_eq!(wrapped["code"], 200);
    assert_eq!(wrapped["data"]["status"], "3");

    // Out of order: a "generating" callback after the task finished; the task stays done.
    mock.send_callback(&task_id, CallbackBody::AsStatus("1".into()), 1)
        .await
        .unwrap();
    assert_eq!(receiver.next().await["status"], "1");
    assert_eq!(mock.task(&task_id).unwrap().status, "3");

    mock.send_callback(&task_id, CallbackBody::Raw(Bytes::from("garbage")), 1)
        .await
        .unwrap();
    assert_eq!(receiver.next().await, Value::Null);
    assert_eq!(mock.callbacks_sent().len(), 6);
}

#[tokio::test]
async fn auto_progress_moves_tasks_on_and_calls_back() {
    let mut receiver = Receiver::start().await;
    for (failure_rate, terminal) in [(0.0, "3"), (1.0, "2")] {
        let mock = start(MockConfig {
            auto_progress: true,
            generating_after: Duration::from_millis(10),
            task_duration: Duration::from_millis(30),
            failure_rate,
            ..test_config()
        })
        .await;
        let task_id = submit(&mock, &receiver.url).await;
        let first = receiver.next().await;
        assert_eq!(
            (first["task_id"].as_str(), first["status"].as_str()),
            (Some(task_id.as_str()), Some("1"))
        );
        let last = receiver.next().await;
        assert_eq!(last["status"], terminal);
        assert_eq!(last["point"], "320");
    }
}

#[tokio::test]
async fn fault_error_envelope_and_500_create_no_task() {
    let mock = start(test_config()).await;
    mock.push_submit_fault(SubmitFault::ErrorEnvelope {
        http_status: 200,
        code: 403,
        msg: "key incorrect".into(),
    });
    mock.push_submit_fault(SubmitFault::Status500);

    let first = post(&mock, "/runway/pro/generate", generate_body("http://x/h")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        first.json(),
        json!({"code": 403, "msg": "key incorrect", "data": null})
    );
    let second = post(&mock, "/runway/pro/generate", generate_body("http://x/h")).await;
    assert_eq!(second.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(second.json()["code"], 500);
    assert!(mock.tasks().is_empty());

    // The queue is used up: the next submit is normal.
    submit(&mock, "http://x/h").await;
    assert_eq!(mock.tasks().len(), 1);
}

#[tokio::test]
async fn fault_drop_connection_answers_nothing() {
    let mock = start(test_config()).await;
    mock.push_submit_fault(SubmitFault::DropConnection);
    let result = post_as(
        &client(),
        format!("{}/runway/pro/generate", mock.base_url()),
        Some(TOKEN),
        generate_body("http://x/h").to_string(),
    )
    .await;
    assert!(result.is_err(), "no answer expected");
    assert!(mock.tasks().is_empty());
}

#[tokio::test]
async fn fault_delay_creates_the_task_only_after_the_delay() {
    let mock = Arc::new(start(test_config()).await);
    mock.push_submit_fault(SubmitFault::Delay(Duration::from_millis(200)));
    let started = Instant::now();
    let pending = tokio::spawn({
        let mock = mock.clone();
        async move { post(&mock, "/runway/pro/generate", generate_body("http://x/h")).await }
    });
    tokio::time::timeout(WAIT, mock.wait_for_requests(1))
        .await
        .unwrap();
    assert!(mock.tasks().is_empty(), "no task while delaying");
    let answer = pending.await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(answer.json()["code"], 200);
    assert_eq!(mock.tasks().len(), 1);
}

#[tokio::test]
async fn fault_create_then_stall_keeps_the_task_when_the_caller_gives_up() {
    let mock = Arc::new(start(test_config()).await);
    mock.push_submit_fault(SubmitFault::CreateThenStall(Duration::from_secs(60)));
    let pending = tokio::spawn({
        let mock = mock.clone();
        async move { post(&mock, "/runway/pro/generate", generate_body("http://x/h")).await }
    });
    tokio::time::timeout(WAIT, mock.wait_until(|m| m.tasks().len() == 1))
        .await
        .expect("the task is created before the answer");
    assert!(!pending.is_finished(), "the answer stalls");
    assert_eq!(mock.open_connections(), 1);

    // The caller gives up: its connection closes, the mock notices.
    pending.abort();
    tokio::time::timeout(WAIT, mock.wait_until(|m| m.open_connections() == 0))
        .await
        .expect("the stalled connection is closed");
    assert_eq!(mock.tasks()[0].status, "0");
}

#[tokio::test]
async fn response_delay_slows_every_answer() {
    let mock = start(MockConfig {
        response_delay: Duration::from_millis(100),
        ..test_config()
    })
    .await;
    let started = Instant::now();
    post(&mock, "/runway/feed", json!({"task_id": "x"})).await;
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[tokio::test]
async fn chat_completion_answers_with_usage() {
    let mock = start(test_config()).await;
    let answer = post(
        &mock,
        "/v1/chat/completions",
        json!({"model": "deepseek-chat", "messages": [{"role": "user", "content": "12345678"}]}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let json = answer.json();
    assert_eq!(json["object"], "chat.completion");
    assert_eq!(json["model"], "deepseek-chat");
    assert_eq!(
        json["choices"][0]["message"]["content"],
        "This is a mock reply."
    );
    assert_eq!(
        json["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7})
    );
}

#[tokio::test]
async fn chat_stream_is_server_sent_events_ending_with_done() {
    let mock = start(MockConfig {
        stream_chunk_delay: Duration::from_millis(1),
        ..test_config()
    })
    .await;
    let answer = post(
        &mock,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers[header::CONTENT_TYPE], "text/event-stream");
    let text = String::from_utf8(answer.body.to_vec()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let events: Vec<Value> = text
        .split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    assert!(events
        .iter()
        .all(|e| e["object"] == "chat.completion.chunk"));
    let content: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "This is a mock reply.");
    assert_eq!(events.last().unwrap()["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn dropping_the_mock_stops_serving() {
    let mock = start(test_config()).await;
    let url = format!("{}/runway/feed", mock.base_url());
    let client = client();
    post_as(&client, url.clone(), Some(TOKEN), "{}")
        .await
        .unwrap();
    mock.shutdown().await;
    assert!(post_as(&client, url, Some(TOKEN), "{}").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_clients_each_get_their_own_tasks() {
    let mock = Arc::new(start(test_config()).await);
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let mock = mock.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for _ in 0..10 {
                    let id = submit(&mock, "http://x/h").await;
                    assert_eq!(feed(&mock, &id).await["data"]["task_id"], id.as_str());
                    ids.push(id);
                }
                ids
            })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for client in clients {
        ids.extend(client.await.unwrap());
    }
    assert_eq!(ids.len(), 160);
    let tasks = mock.tasks();
    assert_eq!(tasks.len(), 160);
    assert!(tasks.windows(2).all(|pair| pair[0].seq < pair[1].seq));
    assert_eq!(mock.received().len(), 320);
}

#[tokio::test]
async fn serves_h2c_too() {
    let mock = start(test_config()).await;
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let answer = post_as(
        &client,
        format!("{}/runway/feed", mock.base_url()),
        Some(TOKEN),
        r#"{"task_id":"x"}"#,
    )
    .await
    .unwrap();
    assert_eq!(answer.json()["msg"], "task_not_exist");
    assert_eq!(mock.received()[0].path, "/runway/feed");
}

async fn get(mock: &MockUpstream, path: &str) -> Answer {
    let request = Request::get(format!("{}{path}", mock.base_url()))
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client().request(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

/// Sends a streamed chat request and returns the response with its body unread.
async fn open_stream(mock: &MockUpstream, body: Value) -> Response<Incoming> {
    let request = Request::post(format!("{}/v1/chat/completions", mock.base_url()))
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response
}

/// The JSON chunks of a server-sent-event text, without `[DONE]`.
fn sse_chunks(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}

#[tokio::test]
async fn models_lists_the_chat_models() {
    let mock = start(test_config()).await;
    let answer = get(&mock, "/v1/models").await;
    assert_eq!(answer.status, StatusCode::OK);
    let json = answer.json();
    assert_eq!(json["object"], "list");
    let ids: Vec<&str> = json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"gpt-4o") && ids.contains(&"deepseek-chat"),
        "{ids:?}"
    );
    assert!(json["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["object"] == "model"));
}

#[tokio::test]
async fn long_chat_answers_have_max_tokens_pieces_of_one_kib() {
    let mock = start(test_config()).await;
    let request = json!({"model": "gpt-4o", "max_tokens": 40, "messages": [{"role": "user", "content": "hi"}]});
    let whole = post(&mock, "/v1/chat/completions", request.clone())
        .await
        .json();
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(
        whole["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .len(),
        40 * LONG_PIECE_BYTES
    );
    assert_eq!(whole["usage"]["completion_tokens"], 40);

    let mut streamed = request;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let answer = post(&mock, "/v1/chat/completions", streamed).await;
    let chunks = sse_chunks(std::str::from_utf8(&answer.body).unwrap());
    let pieces: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|content| !content.is_empty())
        .collect();
    assert_eq!(pieces.len(), 40);
    assert!(pieces.iter().all(|p| p.len() == LONG_PIECE_BYTES));
    assert!(pieces[39].starts_with("[39] "), "in order");
    let last = chunks.last().unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 40);
    assert_eq!(last["choices"], json!([]));
    assert_eq!(mock.streams().completed, 1);
}

#[tokio::test]
async fn short_max_tokens_cuts_the_reply() {
    let mock = start(test_config()).await;
    let json = post(
        &mock,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "max_tokens": 2, "messages": []}),
    )
    .await
    .json();
    assert_eq!(json["choices"][0]["message"]["content"], "This is");
    assert_eq!(json["choices"][0]["finish_reason"], "length");
    assert_eq!(json["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn paused_streams_send_their_first_event_and_wait() {
    let mock = start(test_config()).await;
    mock.pause_streams();
    let response = open_stream(
        &mock,
        json!({"model": "gpt-4o", "stream": true, "messages": []}),
    )
    .await;
    let mut body = response.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("the first event is not held")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert!(first.starts_with(b"data: {"), "{first:?}");
    let stats = mock.streams();
    assert_eq!(
        (stats.started, stats.events_sent, stats.completed),
        (1, 1, 0)
    );

    mock.resume_streams();
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert!(rest.ends_with(b"data: [DONE]\n\n"));
    // Role, five pieces, finish, [DONE].
    assert_eq!(mock.streams().events_sent, 8);
    assert_eq!(mock.streams().completed, 1);
}

#[tokio::test]
async fn a_client_that_hangs_up_stops_the_stream_producer() {
    let mock = start(test_config()).await;
    // A gigabyte if it were produced eagerly.
    let response = open_stream(
        &mock,
        json!({"model": "gpt-4o", "stream": true, "max_tokens": 1_000_000, "messages": []}),
    )
    .await;
    let mut body = response.into_body();
    tokio::time::timeout(WAIT, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    drop(body);
    tokio::time::timeout(
        WAIT,
        mock.wait_until(|m| m.streams().abandoned == 1 && m.open_connections() == 0),
    )
    .await
    .expect("the producer notices the client left");
    let stats = mock.streams();
    assert_eq!(stats.completed, 0);
    assert!(
        stats.events_sent < 1_000_000,
        "produced lazily, not all at once: {stats:?}"
    );
}

async fn suno_fetch(mock: &MockUpstream, id: &str) -> Value {
    let answer = get(mock, &format!("/suno/fetch/{id}")).await;
    assert_eq!(answer.status, StatusCode::OK);
    answer.json()
}

#[tokio::test]
async fn suno_submit_and_fetch_follow_the_task() {
    let mock = start(test_config()).await;
    let submitted = post(
        &mock,
        "/suno/submit/music",
        json!({"prompt": "a song about cats", "mv": "chirp-v3-5"}),
    )
    .await;
    assert_eq!(submitted.status, StatusCode::OK);
    let json = submitted.json();
    assert_eq!(
        (&json["code"], &json["msg"]),
        (&json!("success"), &json!(""))
    );
    let id = json["data"]
        .as_str()
        .expect("data is the task id")
        .to_string();

    let pending = suno_fetch(&mock, &id).await;
    assert_eq!(pending["code"], "success");
    assert_eq!(pending["data"]["task_id"], id.as_str());
    assert_eq!(pending["data"]["status"], "SUBMITTED");
    assert_eq!(pending["data"]["data"], json!([]));

    mock.set_suno_status(&id, "IN_PROGRESS").unwrap();
    assert_eq!(
        suno_fetch(&mock, &id).await["data"]["status"],
        "IN_PROGRESS"
    );
    mock.set_suno_status(&id, "SUCCESS").unwrap();
    let done = suno_fetch(&mock, &id).await;
    assert_eq!(done["data"]["status"], "SUCCESS");
    assert_eq!(done["data"]["progress"], "100%");
    assert!(done["data"]["data"][0]["audio_url"]
        .as_str()
        .unwrap()
        .ends_with(".mp3"));
    let task = mock.product_task(Product::Suno, &id).unwrap();
    assert_eq!(
        (task.fetches, task.prompt.as_str()),
        (3, "a song about cats")
    );

    let unknown = get(&mock, "/suno/fetch/no-such-task").await;
    assert_eq!(unknown.status, StatusCode::OK);
    assert_eq!(
        unknown.json(),
        json!({"code": "error", "msg": "task_not_exist", "data": null})
    );
    assert_eq!(
        mock.set_suno_status("no-such-task", "SUCCESS"),
        Err(UnknownTask("no-such-task".into()))
    );
}

#[tokio::test]
async fn mj_submit_and_fetch_follow_the_task() {
    let mock = start(test_config()).await;
    let submitted = post(&mock, "/mj/submit/imagine", json!({"prompt": "a cat"})).await;
    let json = submitted.json();
    assert_eq!(json["code"], 1);
    assert_eq!(json["description"], "提交成功");
    let id = json["result"].as_str().unwrap().to_string();
    assert!(id.bytes().all(|b| b.is_ascii_digit()), "{id}");

    let path = format!("/mj/task/{id}/fetch");
    let pending = get(&mock, &path).await.json();
    assert_eq!(
        (&pending["id"], &pending["action"], &pending["status"]),
        (&json!(id), &json!("IMAGINE"), &json!("SUBMITTED"))
    );
    assert!(pending["imageUrl"].is_null());
    mock.set_mj_status(&id, "FAILURE").unwrap();
    let failed = get(&mock, &path).await.json();
    assert_eq!(failed["status"], "FAILURE");
    assert_eq!(failed["failReason"], "generation failed");
    assert!(failed["finishTime"].is_u64());

    // A Suno fetch does not see Midjourney tasks.
    assert_eq!(
        get(&mock, &format!("/suno/fetch/{id}")).await.json()["code"],
        "error"
    );
    let unknown = get(&mock, "/mj/task/123/fetch").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.json()["code"], 4);

    let refused = post(&mock, "/mj/submit/imagine", json!({"prompt": " "})).await;
    assert_eq!(refused.status, StatusCode::OK);
    assert_eq!(refused.json()["code"], 4);
    assert_eq!(
        mock.product_tasks().len(),
        1,
        "a refused submit creates no task"
    );
}

#[tokio::test]
async fn faults_apply_to_the_path_they_were_pushed_for() {
    let mock = start(test_config()).await;
    mock.push_fault("/suno/submit/music", SubmitFault::Status500);
    // Another path is not affected.
    post(&mock, "/mj/submit/imagine", json!({"prompt": "x"})).await;
    let failed = post(&mock, "/suno/submit/music", json!({"prompt": "x"})).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        failed.json(),
        json!({"code": 500, "msg": "internal server error", "data": null})
    );
    assert_eq!(mock.product_tasks().len(), 1, "no Suno task was created");
    let ok = post(&mock, "/suno/submit/music", json!({"prompt": "x"})).await;
    assert_eq!(ok.json()["code"], "success");
    assert_eq!(mock.product_tasks().len(), 2);
}

#[tokio::test]
async fn product_tasks_progress_by_themselves_with_auto_progress() {
    let mock = start(MockConfig {
        auto_progress: true,
        generating_after: Duration::from_millis(1),
        task_duration: Duration::from_millis(2),
        ..test_config()
    })
    .await;
    let id = post(&mock, "/suno/submit/music", json!({"prompt": "x"}))
        .await
        .json()["data"]
        .as_str()
        .unwrap()
        .to_string();
    tokio::time::timeout(
        WAIT,
        mock.wait_until(|m| {
            m.product_task(Product::Suno, &id)
                .is_some_and(|task| task.status == "SUCCESS")
        }),
    )
    .await
    .expect("the task finishes on its timers");
}
