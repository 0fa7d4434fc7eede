//! Shared test harness: an in-process mock upstream and the real gateway service, both on
//! port 0, plus a small HTTP client. Each test reads as: given config, when request, then
//! response (+ what the upstream saw + metrics).
#![allow(dead_code)]

use bytes::Bytes;
use gatehouse::config::Config;
use gatehouse::mock_upstream::{MockConfig, MockUpstream};
use gatehouse::server::RunningGateway;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;
use tokio::net::TcpListener;

pub const UPSTREAM_TOKEN: &str = "upstream-token-7d1f0c9a-never-shown-to-callers";
pub const KEY_A: &str = "ka_0b8e5f0e0d6c4a1f9f3e2d1c0b9a8f7e";
pub const KEY_B: &str = "kb_1c9f6a1f1e7d5b2a0a4f3e2d1c0b9a8f";

/// A generate body like the upstream's own example.
pub const GENERATE_EXAMPLE: &str = r#"{"callback_url":"http://example.com/hook","ratio":"16:9","prompt":"一只小猫","style":"cinematic","model":"gen3","options":{"seconds":10,"motion_vector":{"x":0,"y":0.4,"z":0,"r":-6,"bg_x_pan":0,"bg_y_pan":0}}}"#;

/// The config every test starts from: two API keys (`a`, `b`) with generous limits.
/// `extra` is appended verbatim (more sections, `[[keys]]`, …).
pub fn config_text(upstream_url: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
public_url = "{GATEWAY_URL}"
request_timeout_ms = 10000

[upstream]
base_url = "{upstream_url}"
token = "${{TEST_UPSTREAM_TOKEN}}"
connect_timeout_ms = 1000
timeout_ms = 5000
rate_per_second = 10000
burst = 10000

[[keys]]
id = "a"
key_sha256 = "{hash_a}"
rate_per_second = 1000
burst = 1000

[[keys]]
id = "b"
key_sha256 = "{hash_b}"
rate_per_second = 1000
burst = 1000
{extra}
"#,
        hash_a = gatehouse::auth::hash_key(KEY_A),
        hash_b = gatehouse::auth::hash_key(KEY_B),
    )
}

pub fn test_env(name: &str) -> Option<String> {
    match name {
        "TEST_UPSTREAM_TOKEN" => Some(UPSTREAM_TOKEN.to_string()),
        _ => None,
    }
}

pub fn parse_config(text: &str) -> Config {
    Config::from_toml(text, &test_env).unwrap_or_else(|err| panic!("test config invalid: {err}"))
}

/// A mock config where tests drive task states themselves.
pub fn manual_mock() -> MockConfig {
    MockConfig {
        token: UPSTREAM_TOKEN.to_string(),
        auto_progress: false,
        send_callbacks: false,
        feed_not_exist_first: 0,
        ..MockConfig::default()
    }
}

pub struct Harness {
    pub upstream: MockUpstream,
    pub gateway: RunningGateway,
    pub client: TestClient,
    /// Holds the ledger file; removed when the harness is dropped.
    pub store_dir: tempfile::TempDir,
}

/// Adds a `[store]` section pointing into `dir` (each test gets its own ledger file).
pub fn with_store(config_text: &str, dir: &std::path::Path) -> String {
    format!(
        "{config_text}\n[store]\npath = {:?}\n",
        dir.join("ledger.db").display().to_string()
    )
}

/// The placeholder for the gateway's own URL in test configs (`server.public_url`), replaced
/// by the real address once the listener is bound, so the mock's callbacks reach the gateway.
pub const GATEWAY_URL: &str = "http://gatehouse.test";

/// A gateway on port 0 for `config_text`, with its own ledger file.
pub async fn start_gateway(config_text: &str) -> (RunningGateway, tempfile::TempDir) {
    start_gateway_with_clock(config_text, None).await
}

/// As `start_gateway`, with an injected ledger clock.
pub async fn start_gateway_with_clock(
    config_text: &str,
    clock: Option<std::sync::Arc<dyn gatehouse::quota::Clock>>,
) -> (RunningGateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = bind().await;
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = parse_config(&with_store(
        &config_text.replace(GATEWAY_URL, &url),
        dir.path(),
    ));
    let gateway = match clock {
        Some(clock) => gatehouse::server::Gateway::with_clock(config, clock),
        None => gatehouse::server::Gateway::new(config),
    }
    .expect("gateway starts");
    let running = RunningGateway::start_gateway(gateway, listener, None)
        .await
        .expect("gateway starts");
    (running, dir)
}

impl Harness {
    /// Mock upstream + gateway with the base config and `extra` appended.
    pub async fn start(extra: &str) -> Harness {
        Harness::start_with(extra, manual_mock()).await
    }

    pub async fn start_with(extra: &str, mock: MockConfig) -> Harness {
        Harness::start_custom(mock, |upstream_url| config_text(upstream_url, extra)).await
    }

    /// Full control over the config text, given the mock upstream's URL.
    pub async fn start_custom(mock: MockConfig, config: impl FnOnce(&str) -> String) -> Harness {
        Harness::start_full(mock, config, None).await
    }

    pub async fn start_full(
        mock: MockConfig,
        config: impl FnOnce(&str) -> String,
        clock: Option<std::sync::Arc<dyn gatehouse::quota::Clock>>,
    ) -> Harness {
        let upstream = MockUpstream::start(bind().await, mock).await;
        let (gateway, store_dir) =
            start_gateway_with_clock(&config(&upstream.base_url()), clock).await;
        Harness {
            upstream,
            gateway,
            client: TestClient::new(),
            store_dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.gateway.url(), path)
    }

    pub async fn generate(&self, key: &str, body: &str) -> TestResponse {
        self.client
            .send(
                Method::POST,
                &self.url("/runway/pro/generate"),
                &[
                    ("authorization", &format!("Bearer {key}")),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await
    }

    pub async fn feed(&self, key: &str, task_id: &str) -> TestResponse {
        self.client
            .send(
                Method::POST,
                &self.url("/runway/feed"),
                &[
                    ("authorization", &format!("Bearer {key}")),
                    ("content-type", "application/json"),
                ],
                &serde_json::json!({ "task_id": task_id }).to_string(),
            )
            .await
    }

    pub async fn metrics(&self) -> String {
        let response = self
            .client
            .send(Method::GET, &self.url("/metrics"), &[], "")
            .await;
        assert_eq!(response.status, StatusCode::OK);
        response.text()
    }

    /// Requests the mock upstream received on a given path.
    pub fn upstream_requests(&self, path: &str) -> Vec<gatehouse::mock_upstream::RecordedRequest> {
        self.upstream
            .received()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }
}

pub async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind port 0")
}

pub struct TestClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "response is not JSON ({err}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts the gateway's error envelope: `code` equals the HTTP status, `data` is null,
    /// and `msg` contains `needle`. Returns `msg`.
    pub fn assert_envelope(&self, status: u16, needle: &str) -> String {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            self.text()
        );
        assert_eq!(
            self.headers
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "envelope content type"
        );
        let json = self.json();
        assert_eq!(json["code"], status, "envelope code: {json}");
        assert!(json["data"].is_null(), "envelope data must be null: {json}");
        let msg = json["msg"].as_str().expect("msg is a string").to_string();
        assert!(
            msg.contains(needle),
            "msg {msg:?} should contain {needle:?}"
        );
        msg
    }
}

impl TestClient {
    pub fn new() -> TestClient {
        TestClient {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(5))
                .build_http(),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> TestResponse {
        self.send_bytes(
            method,
            url,
            headers,
            Bytes::copy_from_slice(body.as_bytes()),
        )
        .await
    }

    pub async fn send_bytes(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> TestResponse {
        let mut builder = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Full::new(body)).expect("valid test request");
        let response = self.client.request(request).await.expect("request sent");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body read").to_bytes();
        TestResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }
}

impl Default for TestClient {
    fn default() -> Self {
        TestClient::new()
    }
}

/// The value of one sample in Prometheus text, e.g.
/// `sample(&text, "gatehouse_requests_total", &[("route","runway_feed"),("status","200")])`.
/// Labels not given are ignored; all matching samples are summed.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all_match = labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            all_match.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Awaits all futures concurrently on the current task (they may borrow the harness).
pub async fn join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all_done = true;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => all_done = false,
                }
            }
        }
        if all_done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|output| output.expect("every future completed"))
        .collect()
}
