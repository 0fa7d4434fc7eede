//! The proxy path end to end: what the upstream receives, what the caller gets back, and how
//! upstream failures are reported.

mod support;

use gatehouse::mock_upstream::SubmitFault;
use http::{Method, StatusCode};
use std::time::Duration;
use support::*;

#[tokio::test]
async fn generate_reaches_upstream_rewritten_with_the_upstream_token() {
    let h = Harness::start("").await;
    let body = r#"{"callback_url":"https://team.example/hook","prompt":"一只小猫"}"#;

    let response = h.generate(KEY_A, body).await;

    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let json = response.json();
    assert_eq!(json["code"], 200);
    let task_id = json["data"]["task_id"]
        .as_str()
        .expect("task id")
        .to_string();
    assert!(
        h.upstream.task(&task_id).is_some(),
        "the upstream created the task"
    );
    assert!(response.headers.contains_key("x-request-id"));

    let seen = h.upstream_requests("/runway/pro/generate");
    assert_eq!(seen.len(), 1);
    let seen = &seen[0];
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {UPSTREAM_TOKEN}"),
        "upstream gets its own token"
    );
    let all_headers = format!("{:?}", seen.headers);
    assert!(
        !all_headers.contains(KEY_A),
        "caller key leaked upstream: {all_headers}"
    );
    assert_eq!(
        seen.headers["x-request-id"], response.headers["x-request-id"],
        "request id travels upstream and back"
    );
    let forwarded: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(forwarded["prompt"], "一只小猫");
    assert_eq!(forwarded["model"], "gen3", "default model filled");
    assert_eq!(forwarded["ratio"], "16:9", "default ratio filled");
    assert_eq!(forwarded["style"], "cinematic", "default style filled");
    let callback = forwarded["callback_url"].as_str().unwrap();
    let token = callback
        .strip_prefix(&format!("{}/callbacks/runway/", h.gateway.url()))
        .unwrap_or_else(|| panic!("callback_url rewritten to the gateway: {callback}"));
    assert_eq!(token.len(), 32);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(
        !seen.body.windows(12).any(|w| w == b"team.example"),
        "caller URL not forwarded"
    );
}

#[tokio::test]
async fn the_upstreams_own_example_passes_and_feed_is_forwarded() {
    let h = Harness::start("").await;
    let submitted = h.generate(KEY_A, GENERATE_EXAMPLE).await;
    assert_eq!(submitted.status, StatusCode::OK, "{}", submitted.text());
    let task_id = submitted.json()["data"]["task_id"]
        .as_str()
        .unwrap()
        .to_string();

    let fed = h.feed(KEY_A, &task_id).await;

    assert_eq!(fed.status, StatusCode::OK, "{}", fed.text());
    assert_eq!(fed.json()["data"]["task_id"], task_id.as_str());
    let seen = h.upstream_requests("/runway/feed");
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {UPSTREAM_TOKEN}")
    );
}

#[tokio::test]
async fn unknown_paths_are_404_and_never_forwarded() {
    let h = Harness::start("").await;
    for path in [
        "/v1/unknown",
        "/runway/pro/generate/x",
        "/",
        "/runway/feed/",
    ] {
        let response = h
            .client
            .send(
                Method::POST,
                &h.url(path),
                &[("authorization", &format!("Bearer {KEY_A}"))],
                "{}",
            )
            .await;
        response.assert_envelope(404, "no route");
    }
    let wrong_method = h
        .client
        .send(
            Method::GET,
            &h.url("/runway/pro/generate"),
            &[("authorization", &format!("Bearer {KEY_A}"))],
            "",
        )
        .await;
    wrong_method.assert_envelope(405, "POST");
    assert!(
        h.upstream.received().is_empty(),
        "nothing reached the upstream"
    );
}

#[tokio::test]
async fn upstream_error_envelope_is_passed_back_unchanged() {
    let h = Harness::start("").await;
    h.upstream.push_submit_fault(SubmitFault::ErrorEnvelope {
        http_status: 200,
        code: 403,
        msg: "key incorrect".into(),
    });
    h.upstream.push_submit_fault(SubmitFault::Status500);

    let first = h.generate(KEY_A, GENERATE_EXAMPLE).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.json()["code"], 403);
    assert_eq!(first.json()["msg"], "key incorrect");

    let second = h.generate(KEY_A, GENERATE_EXAMPLE).await;
    assert_eq!(second.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        second.json()["code"],
        500,
        "the upstream's envelope, as it sent it"
    );
}

#[tokio::test]
async fn upstream_unreachable_is_502() {
    // A port that was just free: nothing listens there.
    let closed = bind().await;
    let dead_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (gateway, _store) = start_gateway(&config_text(&dead_url, "")).await;
    let client = TestClient::new();

    let response = client
        .send(
            Method::POST,
            &format!("{}/runway/pro/generate", gateway.url()),
            &[
                ("authorization", &format!("Bearer {KEY_A}")),
                ("content-type", "application/json"),
            ],
            GENERATE_EXAMPLE,
        )
        .await;

    let msg = response.assert_envelope(502, "upstream");
    assert!(!msg.contains(UPSTREAM_TOKEN));
}

#[tokio::test]
async fn upstream_slower_than_timeout_is_504() {
    let h = Harness::start_custom(manual_mock(), |url| {
        config_text(url, "").replace("\ntimeout_ms = 5000", "\ntimeout_ms = 300")
    })
    .await;
    h.upstream
        .push_submit_fault(SubmitFault::Delay(Duration::from_secs(30)));

    let started = std::time::Instant::now();
    let response = h.generate(KEY_A, GENERATE_EXAMPLE).await;

    let msg = response.assert_envelope(504, "upstream.timeout_ms");
    assert!(msg.contains("300 ms"), "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "timed out, not waited out"
    );
}

#[tokio::test]
async fn upstream_dropping_the_connection_is_502() {
    let h = Harness::start("").await;
    h.upstream.push_submit_fault(SubmitFault::DropConnection);
    let response = h.generate(KEY_A, GENERATE_EXAMPLE).await;
    response.assert_envelope(502, "upstream");
}

#[tokio::test]
async fn oversized_body_is_413_before_the_upstream() {
    let h = Harness::start("").await;
    let huge = format!(
        r#"{{"callback_url":"http://example.com/h","prompt":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let response = h.generate(KEY_A, &huge).await;
    response.assert_envelope(413, "max_body_bytes");
    assert!(h.upstream.received().is_empty());
}

#[tokio::test]
async fn request_id_from_the_caller_is_kept() {
    let h = Harness::start("").await;
    let response = h
        .client
        .send(
            Method::GET,
            &h.url("/healthz"),
            &[("x-request-id", "trace-abc-123")],
            "",
        )
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.headers["x-request-id"], "trace-abc-123");
}

#[tokio::test]
async fn on_shutdown_readyz_turns_503_while_requests_are_still_served() {
    let mut h = Harness::start_custom(manual_mock(), |url| {
        config_text(url, "").replace(
            "request_timeout_ms = 10000",
            "request_timeout_ms = 10000\ndrain_delay_ms = 30000",
        )
    })
    .await;
    let ready = h.client.send(Method::GET, &h.url("/readyz"), &[], "").await;
    assert_eq!(ready.status, StatusCode::OK);

    h.gateway.begin_shutdown();
    let started = std::time::Instant::now();
    loop {
        let ready = h.client.send(Method::GET, &h.url("/readyz"), &[], "").await;
        if ready.status == StatusCode::SERVICE_UNAVAILABLE {
            ready.assert_envelope(503, "shutting down");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "readyz never turned 503"
        );
        tokio::task::yield_now().await;
    }
    let still_served = h.generate(KEY_A, GENERATE_EXAMPLE).await;
    assert_eq!(
        still_served.status,
        StatusCode::OK,
        "the listener is still open while draining"
    );
}
