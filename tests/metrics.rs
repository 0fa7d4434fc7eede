//! `/metrics`: valid Prometheus text that counts the requests just made, with bounded labels.

mod support;

use http::Method;
use support::*;

/// A strict reading of the text format: every sample line is `name{labels} value`, every
/// metric has HELP and TYPE, label values are quoted. Returns the number of samples.
fn assert_prometheus_text(text: &str) -> usize {
    let mut samples = 0;
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap();
            let kind = parts.next().unwrap();
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line}"));
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "bad metric name in {line}"
        );
        let base = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            typed.contains(name) || typed.contains(base),
            "sample without TYPE: {line}"
        );
        if let Some(labels) = series.split_once('{').map(|(_, l)| l) {
            assert!(labels.ends_with('}'), "{line}");
            for pair in labels
                .trim_end_matches('}')
                .split("\",")
                .filter(|p| !p.is_empty())
            {
                let (key, value) = pair.split_once('=').unwrap_or_else(|| panic!("{line}"));
                assert!(!key.is_empty() && value.starts_with('"'), "{line}");
            }
        }
        samples += 1;
    }
    samples
}

#[tokio::test]
async fn metrics_count_the_requests_just_made() {
    let h = Harness::start("").await;
    let ok = h.generate(KEY_A, GENERATE_EXAMPLE).await;
    assert_eq!(ok.status.as_u16(), 200, "{}", ok.text());
    h.generate("wrong-key", GENERATE_EXAMPLE)
        .await
        .assert_envelope(401, "unknown API key");
    h.client
        .send(
            Method::POST,
            &h.url("/runway/pro/generate"),
            &[],
            GENERATE_EXAMPLE,
        )
        .await
        .assert_envelope(401, "missing credential");
    h.client
        .send(Method::GET, &h.url("/nope/secret-path-xyz"), &[], "")
        .await
        .assert_envelope(404, "no route");

    let text = h.metrics().await;

    assert!(assert_prometheus_text(&text) > 20);
    let req = |route: &str, status: &str, key: &str| {
        sample(
            &text,
            "gatehouse_requests_total",
            &[("route", route), ("status", status), ("key", key)],
        )
    };
    assert_eq!(req("runway_generate", "200", "a"), 1.0, "{text}");
    assert_eq!(req("runway_generate", "401", ""), 2.0, "{text}");
    assert_eq!(req("unknown", "404", ""), 1.0, "{text}");
    assert_eq!(
        sample(
            &text,
            "gatehouse_auth_failures_total",
            &[("reason", "unknown_key")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "gatehouse_auth_failures_total",
            &[("reason", "missing_credential")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "gatehouse_request_duration_seconds_count",
            &[("route", "runway_generate")]
        ),
        3.0
    );
    assert_eq!(
        sample(
            &text,
            "gatehouse_upstream_duration_seconds_count",
            &[("route", "runway_generate")]
        ),
        1.0
    );
    assert_eq!(sample(&text, "gatehouse_build_info", &[]), 1.0);
    assert!(
        !text.contains("secret-path-xyz"),
        "raw paths never become labels"
    );
    assert!(!text.contains(KEY_A) && !text.contains(UPSTREAM_TOKEN));
}

#[tokio::test]
async fn metrics_can_move_to_their_own_listener() {
    let upstream = gatehouse::mock_upstream::MockUpstream::start(bind().await, manual_mock()).await;
    let store = tempfile::tempdir().unwrap();
    let text = config_text(&upstream.base_url(), "").replace(
        "request_timeout_ms = 10000",
        "request_timeout_ms = 10000\nmetrics_listen = \"127.0.0.1:1\"",
    );
    let config = parse_config(&with_store(&text, store.path()));
    let metrics_listener = bind().await;
    let gateway =
        gatehouse::server::RunningGateway::start(config, bind().await, Some(metrics_listener))
            .await
            .unwrap();
    let client = TestClient::new();

    let main = client
        .send(Method::GET, &format!("{}/metrics", gateway.url()), &[], "")
        .await;
    main.assert_envelope(404, "no route");
    let separate = client
        .send(
            Method::GET,
            &format!("http://{}/metrics", gateway.metrics_addr.unwrap()),
            &[],
            "",
        )
        .await;
    assert_eq!(separate.status.as_u16(), 200);
    assert!(separate.text().contains("gatehouse_requests_total"));
}
