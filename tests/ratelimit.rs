//! Rate limits through the whole stack: per key, across keys (global), 429 with Retry-After.

mod support;

use http::StatusCode;
use support::*;

const KEY_SLOW: &str = "ks_slow_2f0a6d8e4c1b3a5f7e9d";

fn slow_key() -> String {
    format!(
        "[[keys]]\nid = \"slow\"\nkey_sha256 = \"{}\"\nrate_per_second = 0.001\nburst = 2\n",
        gatehouse::auth::hash_key(KEY_SLOW)
    )
}

#[tokio::test]
async fn burst_exceeded_is_429_with_retry_after_and_other_keys_are_unaffected() {
    let h = Harness::start(&slow_key()).await;

    for _ in 0..2 {
        let ok = h.feed(KEY_SLOW, "t-1").await;
        assert_ne!(ok.status, StatusCode::TOO_MANY_REQUESTS, "{}", ok.text());
    }
    let limited = h.feed(KEY_SLOW, "t-1").await;
    limited.assert_envelope(429, "per-key");
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "Retry-After is in whole seconds");

    let other = h.feed(KEY_A, "t-1").await;
    assert_ne!(
        other.status,
        StatusCode::TOO_MANY_REQUESTS,
        "key a has its own limit"
    );

    let metrics = h.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "gatehouse_rate_limited_total",
            &[("key", "slow"), ("scope", "key")]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "gatehouse_requests_total",
            &[("status", "429"), ("key", "slow")]
        ),
        1.0,
        "exactly the third request was limited"
    );
}

#[tokio::test]
async fn the_global_limit_applies_across_keys() {
    let h = Harness::start_custom(manual_mock(), |url| {
        config_text(url, "").replace(
            "rate_per_second = 10000\nburst = 10000",
            "rate_per_second = 0.001\nburst = 3",
        )
    })
    .await;

    for key in [KEY_A, KEY_B, KEY_A] {
        let ok = h.feed(key, "t-1").await;
        assert_ne!(ok.status, StatusCode::TOO_MANY_REQUESTS, "{}", ok.text());
    }
    let limited = h.feed(KEY_B, "t-1").await;
    limited.assert_envelope(429, "global");
    assert!(limited.headers.contains_key("retry-after"));

    let metrics = h.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "gatehouse_rate_limited_total",
            &[("key", "b"), ("scope", "global")]
        ),
        1.0,
        "{metrics}"
    );
}
