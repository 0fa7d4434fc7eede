//! Log capture: the real `gatehouse serve` binary as a child process at `RUST_LOG=debug`,
//! once with `--log-format json` and once with `text`, driven through every path that
//! handles a secret — API key and JWT auth (accepted and refused), the admin API (right and
//! wrong token), the upstream token on every forwarded request, upstream failures, and a
//! signed callback delivery to a local receiver. After a graceful SIGTERM stop, no secret
//! may appear in any log line, nor in any response the clients got; and the logs must be
//! worth having: one access line per request with its request id, key id and status, and
//! in JSON mode every line is a JSON object.

mod support;

use bytes::Bytes;
use gatehouse::mock_upstream::{MockConfig, MockUpstream, SubmitFault};
use hmac::{Hmac, Mac};
use http::{HeaderMap, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::Sha256;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tokio::sync::mpsc;

// Every secret is distinctive, so a hit in the logs can only be a leak.
const JWT_SECRET: &str = "jwt-hmac-secret-5f1e9c2a7b3d4e6f8a0b1c2d3e4f5a6b";
const ADMIN_TOKEN: &str = "admin-token-9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b";
const WRONG_ADMIN_TOKEN: &str = "admin-guess-1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d";
const CALLBACK_SECRET: &str = "callback-secret-3c5e7a9b1d2f4a6c8e0b2d4f6a8c0e2f";
const KEY_HOOKS: &str = "kh_7f3e1d9c5b2a8e4f6a0c3d5b7e9f1a2c";
const WRONG_KEY: &str = "kx_deadbeefcafef00dbaadf00d12345678";
const ISSUER: &str = "https://sso.gatehouse.test";
const AUDIENCE: &str = "gatehouse";

/// How long any one step may take before the test fails instead of hanging.
const STEP: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_leak_no_secret_and_record_every_request() {
    let run = run_scenario("json", Step::None).await;
    run.assert_no_secret_leaked();
    // Every line on stderr is one JSON object with the usual fields.
    let mut access = Vec::new();
    for line in &run.stderr {
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|err| panic!("log line is not JSON ({err}): {line}"));
        for field in ["timestamp", "level", "target"] {
            assert!(
                value.get(field).is_some(),
                "log line without {field}: {line}"
            );
        }
        if value["target"] == "gatehouse::access" {
            access.push(value);
        }
    }
    for expected in &run.requests {
        let lines: Vec<&Value> = access
            .iter()
            .filter(|line| line["span"]["request_id"] == expected.request_id.as_str())
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{}: expected one access line with request id {}, got {lines:?}",
            expected.what,
            expected.request_id
        );
        let line = lines[0];
        assert_eq!(line["status"], expected.status, "{}: {line}", expected.what);
        assert_eq!(line["key"], expected.key, "{}: {line}", expected.what);
        assert_eq!(line["route"], expected.route, "{}: {line}", expected.what);
        assert!(line["duration_ms"].is_number(), "{}: {line}", expected.what);
    }
    // Plus one line per callback the upstream POSTed to the gateway; nothing else.
    assert_eq!(
        access.len(),
        run.requests.len() + run.callbacks_received,
        "access lines: {access:#?}"
    );
    run.assert_debug_level_reached(|line| line.contains(r#""level":"DEBUG""#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_leak_no_secret_and_record_every_request() {
    let run = run_scenario("text", Step::None).await;
    run.assert_no_secret_leaked();
    let access: Vec<&String> = run
        .stderr
        .iter()
        .filter(|line| line.contains("gatehouse::access"))
        .collect();
    for expected in &run.requests {
        let id = format!("request_id={}", expected.request_id);
        let lines: Vec<&&String> = access.iter().filter(|line| line.contains(&id)).collect();
        assert_eq!(
            lines.len(),
            1,
            "{}: expected one access line with {id}, got {lines:#?}",
            expected.what
        );
        let line = lines[0];
        for field in [
            format!("status={}", expected.status),
            format!("key=\"{}\"", expected.key),
            format!("route=\"{}\"", expected.route),
        ] {
            assert!(
                line.contains(&field),
                "{}: no {field} in {line}",
                expected.what
            );
        }
    }
    assert_eq!(
        access.len(),
        run.requests.len() + run.callbacks_received,
        "access lines: {access:#?}"
    );
    for line in &run.stderr {
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"]
                .iter()
                .any(|level| line.contains(level)),
            "text log line without a level: {line}"
        );
    }
    run.assert_debug_level_reached(|line| line.contains("DEBUG"));
}

/// The callback route's credential is the token in its URL; the request span logs the raw
/// path, so the token is in every line logged while a callback is handled (found by this
/// test, not fixed yet: see the ignore reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn callback_url_tokens_are_not_logged() {
    for format in ["json", "text"] {
        let mut run = run_scenario(format, Step::None).await;
        run.secrets = run
            .callback_tokens
            .iter()
            .map(|token| ("callback URL token".to_string(), token.clone()))
            .collect();
        run.assert_no_secret_leaked();
    }
}

/// A config file with a TOML syntax error is logged with the offending source line (the
/// toml crate's error quotes it), so an inline secret on that line reaches the logs and the
/// admin's reload answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn rejected_reloads_do_not_echo_inline_secrets() {
    for format in ["json", "text"] {
        run_scenario(format, Step::BrokenReload)
            .await
            .assert_no_secret_leaked();
    }
}

/// One request a client made, and what its access log line must say.
struct Expected {
    what: &'static str,
    request_id: String,
    status: u16,
    /// The key id the access log names (`-` before authentication).
    key: &'static str,
    route: &'static str,
}

/// Everything one run of the binary produced.
struct Run {
    format: &'static str,
    stdout: Vec<String>,
    stderr: Vec<String>,
    /// Every response any client got (status line aside): headers and body as text.
    responses: Vec<(String, String)>,
    requests: Vec<Expected>,
    /// Callback POSTs the mock upstream made to the gateway (each has an access line too).
    callbacks_received: usize,
    /// (name, value) of every secret that was in play during the run.
    secrets: Vec<(String, String)>,
    /// The tokens of the gateway's own callback URLs (`/callbacks/runway/{token}`), as the
    /// upstream received them; the token is the credential of the callback route.
    callback_tokens: Vec<String>,
}

impl Run {
    fn assert_no_secret_leaked(&self) {
        let mut leaks = Vec::new();
        for (name, secret) in &self.secrets {
            for (stream, lines) in [("stderr", &self.stderr), ("stdout", &self.stdout)] {
                for (i, line) in lines.iter().enumerate() {
                    if line.contains(secret.as_str()) {
                        leaks.push(format!(
                            "{} log {stream} line {}: {name} in: {line}",
                            self.format,
                            i + 1
                        ));
                    }
                }
            }
            for (headers, body) in &self.responses {
                if headers.contains(secret.as_str()) || body.contains(secret.as_str()) {
                    leaks.push(format!(
                        "{} run: {name} in a response: {headers}\n{body}",
                        self.format
                    ));
                }
            }
        }
        assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    }

    /// `RUST_LOG=debug` really took effect (else the leak check would cover less).
    fn assert_debug_level_reached(&self, is_debug: impl Fn(&str) -> bool) {
        assert!(
            self.stderr.iter().any(|line| is_debug(line)),
            "no debug line in the {} logs although RUST_LOG=debug:\n{}",
            self.format,
            self.stderr.join("\n")
        );
    }
}

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

fn jwt(sub: &str, exp: i64) -> String {
    let claims = json!({ "sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now(), "exp": exp });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("token signs")
}

fn signature_segment(token: &str) -> String {
    token
        .rsplit('.')
        .next()
        .expect("three segments")
        .to_string()
}

/// ANSI colour codes would split a value from its field name in text logs; compare the text
/// an operator reads.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A child's output stream, read line by line on its own thread (so the pipe never fills),
/// kept for the assertions and forwarded for the "listening" line.
fn capture(
    stream: impl std::io::Read + Send + 'static,
    forward: Option<mpsc::UnboundedSender<String>>,
) -> (Arc<Mutex<Vec<String>>>, std::thread::JoinHandle<()>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let line = strip_ansi(&line);
            if let Some(forward) = &forward {
                let _ = forward.send(line.clone());
            }
            sink.lock().unwrap().push(line);
        }
    });
    (lines, reader)
}

/// A caller's callback endpoint on port 0: records every POST (headers, body), answers 200.
async fn start_receiver() -> (String, mpsc::UnboundedReceiver<(HeaderMap, Bytes)>) {
    let listener = bind().await;
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let _ = tx.send((parts.headers, body));
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, rx)
}

fn header_text(headers: &HeaderMap) -> String {
    headers
        .iter()
        .map(|(name, value)| format!("{name}: {}", String::from_utf8_lossy(value.as_bytes())))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Owns the gateway process: if the test fails before `stop`, dropping the guard kills it,
/// so a failed run leaves no process behind.
struct Gateway(Option<Child>);

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends the child SIGTERM and waits for a clean exit (it drains and flushes its logs).
async fn stop(mut gateway: Gateway) {
    let mut child = gateway.0.take().expect("the gateway runs until stopped");
    let pid = child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid} failed");
    let waited = tokio::time::timeout(
        STEP,
        tokio::task::spawn_blocking(move || {
            let status = child.wait();
            (child, status)
        }),
    )
    .await;
    match waited {
        Ok(Ok((_, Ok(status)))) => assert!(status.success(), "gatehouse exited with {status}"),
        Ok(Ok((_, Err(err)))) => panic!("waiting for gatehouse failed: {err}"),
        Ok(Err(err)) => panic!("waiting for gatehouse failed: {err}"),
        Err(_) => {
            // The blocking wait still owns the child: kill it by pid so nothing is left behind.
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            panic!("gatehouse did not stop within {STEP:?} of SIGTERM");
        }
    }
}

/// Records a response for the leak check and its request for the access-log check.
struct Recorder {
    responses: Vec<(String, String)>,
    requests: Vec<Expected>,
}

impl Recorder {
    fn record(
        &mut self,
        what: &'static str,
        response: &TestResponse,
        status: u16,
        key: &'static str,
        route: &'static str,
    ) {
        assert_eq!(
            response.status.as_u16(),
            status,
            "{what}: unexpected status; body: {}",
            response.text()
        );
        let request_id = response
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("{what}: no X-Request-Id on the response"))
            .to_string();
        self.responses
            .push((header_text(&response.headers), response.text()));
        self.requests.push(Expected {
            what,
            request_id,
            status,
            key,
            route,
        });
    }
}

/// A step the known-leak tests add to the common scenario.
#[derive(Clone, Copy, PartialEq)]
enum Step {
    None,
    /// Last, the config file gets a TOML syntax error on the line of the inline JWT secret,
    /// and `POST /admin/reload` is refused.
    BrokenReload,
}

/// Replaces the config file in one step (the gateway watches it and must never read half).
fn replace_file(path: &std::path::Path, text: &str) {
    let staging = path.with_extension("toml.new");
    std::fs::write(&staging, text).expect("write config");
    std::fs::rename(&staging, path).expect("replace config");
}

async fn run_scenario(format: &'static str, step: Step) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = MockUpstream::start(
        bind().await,
        MockConfig {
            send_callbacks: true,
            ..manual_mock()
        },
    )
    .await;
    let (hook_url, mut deliveries) = start_receiver().await;

    let admin_token_file = dir.path().join("admin_token");
    std::fs::write(&admin_token_file, format!("{ADMIN_TOKEN}\n")).expect("write admin token");
    let extra = format!(
        r#"
[[keys]]
id = "hooks"
key_sha256 = "{hooks_hash}"
callback_secret = "{CALLBACK_SECRET}"

[auth.jwt]
algorithms = ["HS256"]
secret = "{JWT_SECRET}"
issuer = "{ISSUER}"
audience = "{AUDIENCE}"

[admin]
token_file = {admin_file:?}
"#,
        hooks_hash = gatehouse::auth::hash_key(KEY_HOOKS),
        admin_file = admin_token_file.display().to_string(),
    );
    // The public URL is only known once the child has bound port 0; it starts with a
    // placeholder and the real one is applied through the admin reload below.
    let config = with_store(&config_text(&upstream.base_url(), &extra), dir.path());
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, &config).expect("write config");

    let mut process = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["serve", "--config"])
        .arg(&config_path)
        .args(["--log-format", format])
        .env("RUST_LOG", "debug")
        .env("TEST_UPSTREAM_TOKEN", UPSTREAM_TOKEN)
        .env_remove("GATEHOUSE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the gatehouse binary");
    let (stdout_tx, mut stdout_rx) = mpsc::unbounded_channel();
    let (stdout, stdout_reader) = capture(process.stdout.take().unwrap(), Some(stdout_tx));
    let (stderr, stderr_reader) = capture(process.stderr.take().unwrap(), None);
    let child = Gateway(Some(process));

    let gateway = loop {
        match tokio::time::timeout(STEP, stdout_rx.recv()).await {
            Ok(Some(line)) => {
                if let Some(addr) = line.strip_prefix("gatehouse listening on ") {
                    break addr.trim().to_string();
                }
            }
            Ok(None) | Err(_) => {
                drop(child);
                panic!(
                    "gatehouse did not print its address; stderr:\n{}",
                    stderr.lock().unwrap().join("\n")
                );
            }
        }
    };
    let url = |path: &str| format!("{gateway}{path}");

    let client = TestClient::new();
    let mut rec = Recorder {
        responses: Vec::new(),
        requests: Vec::new(),
    };
    let bearer = |credential: &str| format!("Bearer {credential}");
    let generate_body = json!({
        "callback_url": hook_url,
        "ratio": "16:9",
        "prompt": "一只小猫",
        "style": "cinematic",
        "model": "gen3",
        "options": {"seconds": 10, "motion_vector": {"x":0,"y":0.4,"z":0,"r":-6,"bg_x_pan":0,"bg_y_pan":0}}
    })
    .to_string();
    let generate = |credential: String| {
        let client = &client;
        let body = generate_body.clone();
        let url = url("/runway/pro/generate");
        async move {
            client
                .send(
                    Method::POST,
                    &url,
                    &[
                        ("authorization", &credential),
                        ("content-type", "application/json"),
                    ],
                    &body,
                )
                .await
        }
    };
    let feed = |credential: String, task_id: String| {
        let client = &client;
        let url = url("/runway/feed");
        async move {
            client
                .send(
                    Method::POST,
                    &url,
                    &[
                        ("authorization", &credential),
                        ("content-type", "application/json"),
                    ],
                    &json!({ "task_id": task_id }).to_string(),
                )
                .await
        }
    };

    // Admin API: point public_url at the real address, then read usage; a wrong token is refused.
    let config = config.replace(GATEWAY_URL, &gateway);
    replace_file(&config_path, &config);
    let reload = client
        .send(
            Method::POST,
            &url("/admin/reload"),
            &[("authorization", &bearer(ADMIN_TOKEN))],
            "",
        )
        .await;
    rec.record("admin reload", &reload, 200, "-", "admin");
    assert_eq!(reload.json()["applied"], true, "{}", reload.text());
    let usage = client
        .send(
            Method::GET,
            &url("/admin/usage"),
            &[("authorization", &bearer(ADMIN_TOKEN))],
            "",
        )
        .await;
    rec.record("admin usage", &usage, 200, "-", "admin");
    let refused = client
        .send(
            Method::GET,
            &url("/admin/usage"),
            &[("authorization", &bearer(WRONG_ADMIN_TOKEN))],
            "",
        )
        .await;
    rec.record("admin with a wrong token", &refused, 401, "-", "admin");

    // API key: generate and feed.
    let submitted = generate(bearer(KEY_HOOKS)).await;
    rec.record(
        "generate with an API key",
        &submitted,
        200,
        "hooks",
        "runway_generate",
    );
    let hooks_task = submitted.json()["data"]["task_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no task_id: {}", submitted.text()))
        .to_string();
    let polled = feed(bearer(KEY_HOOKS), hooks_task.clone()).await;
    rec.record("feed with an API key", &polled, 200, "hooks", "runway_feed");

    // JWT: generate and feed (subject "a" has a [[keys]] entry).
    let token = jwt("a", now() + 3600);
    let submitted = generate(bearer(&token)).await;
    rec.record(
        "generate with a JWT",
        &submitted,
        200,
        "a",
        "runway_generate",
    );
    let jwt_task = submitted.json()["data"]["task_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no task_id: {}", submitted.text()))
        .to_string();
    let polled = feed(bearer(&token), jwt_task).await;
    rec.record("feed with a JWT", &polled, 200, "a", "runway_feed");

    // Refused credentials.
    let expired = jwt("a", now() - 3600);
    let response = generate(bearer(WRONG_KEY)).await;
    rec.record(
        "generate with a wrong API key",
        &response,
        401,
        "-",
        "runway_generate",
    );
    let response = generate(bearer(&expired)).await;
    rec.record(
        "generate with an expired JWT",
        &response,
        401,
        "-",
        "runway_generate",
    );

    // Upstream failures: a 500 answer, then a connection dropped mid-request.
    upstream.push_submit_fault(SubmitFault::Status500);
    let response = generate(bearer(KEY_HOOKS)).await;
    let status = response.status.as_u16();
    assert!(
        status >= 500,
        "upstream 500: expected a 5xx, got {status}: {}",
        response.text()
    );
    rec.record(
        "upstream answers 500",
        &response,
        status,
        "hooks",
        "runway_generate",
    );
    upstream.push_submit_fault(SubmitFault::DropConnection);
    let response = generate(bearer(KEY_HOOKS)).await;
    rec.record(
        "upstream drops the connection",
        &response,
        502,
        "hooks",
        "runway_generate",
    );

    // Not a route.
    let response = client.send(Method::GET, &url("/nope"), &[], "").await;
    rec.record("unknown path", &response, 404, "-", "unknown");

    // The upstream finishes the API key's task and POSTs its callback to the gateway, which
    // settles it and delivers the record, signed with the key's callback_secret.
    let sent = upstream
        .advance(&hooks_task, "3")
        .await
        .expect("the mock knows the task")
        .expect("send_callbacks is on");
    assert_eq!(sent.result, Ok(200), "callback to the gateway: {sent:?}");
    let (headers, body) = tokio::time::timeout(STEP, deliveries.recv())
        .await
        .expect("the gateway delivers the callback to the caller")
        .expect("receiver running");
    let mut mac = Hmac::<Sha256>::new_from_slice(CALLBACK_SECRET.as_bytes()).unwrap();
    mac.update(&body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(
        headers
            .get("x-gatehouse-signature")
            .and_then(|v| v.to_str().ok()),
        Some(expected.as_str()),
        "delivery signature"
    );
    // The caller's endpoint sees the signature, never the secret.
    rec.responses
        .push((header_text(&headers), String::from_utf8_lossy(&body).into()));

    if step == Step::BrokenReload {
        let jwt_line = format!("secret = \"{JWT_SECRET}\"");
        assert!(config.contains(&jwt_line));
        replace_file(
            &config_path,
            &config.replace(&jwt_line, &format!("secret = \"{JWT_SECRET}")),
        );
        let rejected = client
            .send(
                Method::POST,
                &url("/admin/reload"),
                &[("authorization", &bearer(ADMIN_TOKEN))],
                "",
            )
            .await;
        rec.record("reload of a broken file", &rejected, 422, "-", "admin");
    }

    // Sanity: the upstream token really was used (so its absence from the logs means something).
    let forwarded = upstream.received();
    assert!(
        forwarded.iter().any(|r| r
            .headers
            .get("authorization")
            .is_some_and(|v| v.as_bytes() == format!("Bearer {UPSTREAM_TOKEN}").as_bytes())),
        "the upstream never saw its token"
    );
    let callbacks_received = upstream.callbacks_sent().len();
    let callback_tokens: Vec<String> = upstream
        .received()
        .iter()
        .filter(|r| r.path == "/runway/pro/generate")
        .filter_map(|r| r.json()?["callback_url"].as_str().map(str::to_string))
        .filter_map(|url| {
            url.rsplit_once("/callbacks/runway/")
                .map(|(_, t)| t.to_string())
        })
        .collect();
    assert!(
        !callback_tokens.is_empty(),
        "the upstream got no gateway callback URL"
    );

    drop(client);
    stop(child).await;
    stdout_reader.join().expect("stdout reader");
    stderr_reader.join().expect("stderr reader");

    let mut secrets = vec![
        ("API key".to_string(), KEY_HOOKS.to_string()),
        ("JWT".to_string(), token.clone()),
        ("JWT signature".to_string(), signature_segment(&token)),
        ("expired JWT".to_string(), expired.clone()),
        (
            "expired JWT signature".to_string(),
            signature_segment(&expired),
        ),
        ("JWT secret".to_string(), JWT_SECRET.to_string()),
        ("upstream token".to_string(), UPSTREAM_TOKEN.to_string()),
        ("admin token".to_string(), ADMIN_TOKEN.to_string()),
        (
            "wrong admin token".to_string(),
            WRONG_ADMIN_TOKEN.to_string(),
        ),
        ("callback secret".to_string(), CALLBACK_SECRET.to_string()),
        ("wrong API key".to_string(), WRONG_KEY.to_string()),
        ("other API key".to_string(), KEY_A.to_string()),
    ];
    // A truncated secret is still a leak: also look for the first half of each plain secret.
    for (name, value) in secrets.clone() {
        if !name.contains("JWT") || name == "JWT secret" {
            secrets.push((
                format!("{name} (first half)"),
                value[..value.len() / 2].to_string(),
            ));
        }
    }
    let stdout = stdout.lock().unwrap().clone();
    let stderr = stderr.lock().unwrap().clone();
    assert!(!stderr.is_empty(), "no log output at all");
    Run {
        format,
        stdout,
        stderr,
        responses: rec.responses,
        requests: rec.requests,
        callbacks_received,
        secrets,
        callback_tokens,
    }
}

#[test]
fn strip_ansi_removes_colour_codes() {
    assert_eq!(
        strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x=\u{1b}[1m1\u{1b}[0m"),
        "2026  INFO x=1"
    );
}
