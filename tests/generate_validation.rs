//! Bad `POST /runway/pro/generate` bodies: each answered 400 (or 413/415) with a message
//! that names the field, and none of them reaches the upstream.

mod support;

use http::Method;
use support::*;

const MV: &str = r#""motion_vector":{"x":0,"y":0.4,"z":0,"r":-6,"bg_x_pan":0,"bg_y_pan":0}"#;

fn with(fields: &str) -> String {
    format!(r#"{{"callback_url":"http://example.com/hook","prompt":"一只小猫"{fields}}}"#)
}

#[tokio::test]
async fn bad_generate_bodies_are_rejected_naming_the_field() {
    let h = Harness::start("[validation]\nmax_prompt_chars = 10\n").await;
    let cases: Vec<(&str, String, &str)> = vec![
        ("not JSON", "{not json".into(), "JSON"),
        ("array body", "[1,2]".into(), "object"),
        ("string body", r#""prompt""#.into(), "object"),
        ("empty body", "".into(), "JSON"),
        (
            "missing callback_url",
            r#"{"prompt":"a"}"#.into(),
            "callback_url",
        ),
        (
            "callback_url not a URL",
            r#"{"callback_url":"not a url","prompt":"a"}"#.into(),
            "callback_url",
        ),
        (
            "callback_url ftp",
            r#"{"callback_url":"ftp://x.example/h","prompt":"a"}"#.into(),
            "callback_url",
        ),
        (
            "callback_url number",
            r#"{"callback_url":42,"prompt":"a"}"#.into(),
            "callback_url",
        ),
        (
            "missing prompt",
            r#"{"callback_url":"http://example.com/h"}"#.into(),
            "prompt",
        ),
        (
            "empty prompt",
            r#"{"callback_url":"http://example.com/h","prompt":""}"#.into(),
            "prompt",
        ),
        (
            "blank prompt",
            r#"{"callback_url":"http://example.com/h","prompt":"   "}"#.into(),
            "prompt",
        ),
        (
            "prompt too long (chars)",
            r#"{"callback_url":"http://example.com/h","prompt":"一二三四五六七八九十一"}"#.into(),
            "prompt",
        ),
        (
            "prompt number",
            r#"{"callback_url":"http://example.com/h","prompt":7}"#.into(),
            "prompt",
        ),
        ("model unknown", with(r#","model":"gen4""#), "model"),
        ("model wrong type", with(r#","model":3"#), "model"),
        ("ratio unknown", with(r#","ratio":"2:1""#), "ratio"),
        ("style unknown", with(r#","style":"anime""#), "style"),
        ("options not object", with(r#","options":5"#), "options"),
        (
            "options without motion_vector",
            with(r#","options":{"seconds":10}"#),
            "motion_vector",
        ),
        (
            "seconds 7",
            with(&format!(r#","options":{{"seconds":7,{MV}}}"#)),
            "options.seconds",
        ),
        (
            "seconds string",
            with(&format!(r#","options":{{"seconds":"10",{MV}}}"#)),
            "options.seconds",
        ),
        (
            "seconds fraction",
            with(&format!(r#","options":{{"seconds":10.5,{MV}}}"#)),
            "options.seconds",
        ),
        (
            "motion_vector not object",
            with(r#","options":{"motion_vector":[1,2]}"#),
            "motion_vector",
        ),
        (
            "motion_vector.x string",
            with(r#","options":{"motion_vector":{"x":"left"}}"#),
            "motion_vector.x",
        ),
        (
            "unknown top-level field",
            with(r#","colour":"red""#),
            "colour",
        ),
        (
            "unknown options field",
            with(&format!(r#","options":{{"speed":2,{MV}}}"#)),
            "options.speed",
        ),
        ("image not a URL", with(r#","image":"cat.png""#), "image"),
        (
            "image_as_end_frame not bool",
            with(&format!(
                r#","image":"https://img.example/a.png","options":{{"image_as_end_frame":"yes",{MV}}}"#
            )),
            "image_as_end_frame",
        ),
    ];
    assert!(cases.len() >= 20);

    for (what, body, field) in &cases {
        let response = h.generate(KEY_A, body).await;
        assert_eq!(response.status.as_u16(), 400, "{what}: {}", response.text());
        response.assert_envelope(400, field);
    }
    assert!(
        h.upstream_requests("/runway/pro/generate").is_empty(),
        "no bad body reached the upstream"
    );
}

#[tokio::test]
async fn invalid_utf8_and_wrong_content_type_are_refused() {
    let h = Harness::start("").await;
    let auth = format!("Bearer {KEY_A}");
    let invalid_utf8 = h
        .client
        .send_bytes(
            Method::POST,
            &h.url("/runway/pro/generate"),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            bytes::Bytes::from_static(
                b"{\"callback_url\":\"http://e.com/h\",\"prompt\":\"\xff\xfe\"}",
            ),
        )
        .await;
    invalid_utf8.assert_envelope(400, "UTF-8");

    let form = h
        .client
        .send(
            Method::POST,
            &h.url("/runway/pro/generate"),
            &[
                ("authorization", &auth),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            GENERATE_EXAMPLE,
        )
        .await;
    form.assert_envelope(415, "application/json");
    assert!(h.upstream.received().is_empty());
}

#[tokio::test]
async fn unknown_fields_are_dropped_when_configured() {
    let h = Harness::start("[validation]\nunknown_fields = \"drop\"\n").await;
    let response = h.generate(KEY_A, &with(r#","colour":"red""#)).await;
    assert_eq!(response.status.as_u16(), 200, "{}", response.text());
    let seen = h.upstream_requests("/runway/pro/generate");
    let forwarded: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert!(forwarded.get("colour").is_none(), "{forwarded}");
    assert_eq!(forwarded["prompt"], "一只小猫");
}

#[tokio::test]
async fn callback_hosts_outside_the_allow_list_are_refused_before_any_reservation() {
    let h = Harness::start(
        "[callbacks]\nallowed_hosts = [\"hooks.example.com\", \"*.corp.example\"]\n",
    )
    .await;
    let body = |url: &str| format!(r#"{{"callback_url":"{url}","prompt":"一只小猫"}}"#);

    h.generate(KEY_A, &body("http://evil.example.net/steal"))
        .await
        .assert_envelope(400, "callback_url host \"evil.example.net\" is not allowed");
    let usage = h
        .gateway
        .ledger
        .store
        .usage("a", gatehouse::quota::PeriodKey::all())
        .await
        .unwrap();
    assert_eq!(
        usage,
        gatehouse::quota::Usage::default(),
        "nothing reserved"
    );
    assert!(h.upstream.received().is_empty());

    for allowed in ["https://hooks.example.com/h", "http://a.corp.example/h"] {
        let response = h.generate(KEY_A, &body(allowed)).await;
        assert_eq!(
            response.status.as_u16(),
            200,
            "{allowed}: {}",
            response.text()
        );
    }
}
