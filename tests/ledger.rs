//! The point ledger through the whole gateway: reservations, settlement from every source,
//! failures that must give points back, duplicates and races, ownership, quota periods.

mod support;

use gatehouse::mock_upstream::{CallbackBody, MockConfig, SubmitFault};
use gatehouse::points::Points;
use gatehouse::quota::{LedgerKind, ManualClock, PeriodKey, TaskState, Usage};
use http::StatusCode;
use std::sync::Arc;
use std::time::Duration;
use support::*;

const KEY_Q: &str = "kq_quota_key_5e1d2c3b4a59687f";

/// A key `q` with a daily quota of `points`.
fn quota_key(points: u32) -> String {
    format!(
        "[[keys]]\nid = \"q\"\nkey_sha256 = \"{}\"\nrate_per_second = 1000\nburst = 1000\nquota_points = {points}\nquota_period = \"daily\"\n",
        gatehouse::auth::hash_key(KEY_Q)
    )
}

fn with_callbacks() -> MockConfig {
    MockConfig {
        send_callbacks: true,
        ..manual_mock()
    }
}

async fn submit(h: &Harness, key: &str) -> String {
    let response = h.generate(key, GENERATE_EXAMPLE).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    response.json()["data"]["task_id"]
        .as_str()
        .expect("task id")
        .to_string()
}

/// Usage of a key without a quota period (`a`, `b`).
async fn usage(h: &Harness, key: &str) -> Usage {
    h.gateway
        .ledger
        .store
        .usage(key, PeriodKey::all())
        .await
        .unwrap()
}

async fn charge_rows(h: &Harness, key: &str, task_id: &str) -> Vec<Points> {
    h.gateway
        .ledger
        .store
        .ledger_entries(key, Some(task_id))
        .await
        .unwrap()
        .into_iter()
        .filter(|entry| entry.kind == LedgerKind::Charge)
        .map(|entry| entry.points)
        .collect()
}

fn points(whole: i64) -> Points {
    Points::from_whole(whole)
}

#[tokio::test]
async fn quota_race_accepts_exactly_what_fits() {
    const FITS: usize = 3;
    let h = Harness::start(&quota_key(320 * FITS as u32)).await;

    let attempts = (0..10 * FITS).map(|_| h.generate(KEY_Q, GENERATE_EXAMPLE));
    let responses = join_all(attempts).await;

    let accepted = responses
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    let refused: Vec<_> = responses
        .iter()
        .filter(|r| r.status == StatusCode::PAYMENT_REQUIRED)
        .collect();
    assert_eq!(accepted, FITS);
    assert_eq!(refused.len(), 9 * FITS);
    refused[0].assert_envelope(402, "quota");
    let msg = refused[0].json()["msg"].as_str().unwrap().to_string();
    for part in ["used", "reserved", "price 320", "quota 960"] {
        assert!(msg.contains(part), "402 message names {part}: {msg}");
    }

    let created = h.upstream.tasks();
    assert_eq!(
        created.len(),
        FITS,
        "only accepted submits reached the upstream"
    );
    let period = PeriodKey::current(
        gatehouse::config::QuotaPeriod::Daily,
        &gatehouse::quota::SystemClock,
    );
    let usage = h.gateway.ledger.store.usage("q", period).await.unwrap();
    assert_eq!(usage.reserved, points(320 * FITS as i64));
    assert_eq!(usage.charged, Points::ZERO);
    assert_eq!(usage.open_tasks, FITS as u64);
    for task in created {
        let record = h
            .gateway
            .ledger
            .store
            .task_by_id(&task.task_id)
            .await
            .unwrap()
            .expect("every created task is in the ledger");
        assert_eq!(record.state, TaskState::Pending);
        assert_eq!(record.key_id, "q");
    }
}

#[tokio::test]
async fn lifecycle_through_callbacks() {
    let h = Harness::start_with("", with_callbacks()).await;
    let task_id = submit(&h, KEY_A).await;
    assert_eq!(usage(&h, "a").await.reserved, points(320));

    let generating = h.upstream.advance(&task_id, "1").await.unwrap().unwrap();
    assert_eq!(
        generating.result,
        Ok(200),
        "the gateway accepted the callback"
    );
    let record = h
        .gateway
        .ledger
        .store
        .task_by_id(&task_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.state, TaskState::Pending);
    assert_eq!(record.status, "1");

    let done = h.upstream.advance(&task_id, "3").await.unwrap().unwrap();
    assert_eq!(done.result, Ok(200));

    let usage = usage(&h, "a").await;
    assert_eq!(usage.charged, points(320));
    assert_eq!(
        usage.reserved,
        Points::ZERO,
        "reservation replaced by the charge"
    );
    assert_eq!(charge_rows(&h, "a", &task_id).await, vec![points(320)]);
    let metrics = h.metrics().await;
    assert_eq!(
        sample(&metrics, "gatehouse_points_charged_total", &[("key", "a")]),
        320.0
    );
    assert_eq!(
        sample(
            &metrics,
            "gatehouse_tasks_settled_total",
            &[("outcome", "succeeded")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            "gatehouse_callbacks_received_total",
            &[("result", "accepted")]
        ),
        2.0
    );
}

#[tokio::test]
async fn lifecycle_through_feed_only() {
    let h = Harness::start("").await;
    let task_id = submit(&h, KEY_A).await;

    h.upstream.advance(&task_id, "1").await.unwrap();
    let running = h.feed(KEY_A, &task_id).await;
    assert_eq!(running.json()["data"]["status"], "1");
    assert_eq!(usage(&h, "a").await.reserved, points(320));

    h.upstream.advance(&task_id, "3").await.unwrap();
    let done = h.feed(KEY_A, &task_id).await;
    assert_eq!(done.status, StatusCode::OK);
    assert_eq!(
        done.json()["data"]["point"],
        "320",
        "the caller sees the upstream's answer"
    );

    let usage = usage(&h, "a").await;
    assert_eq!((usage.charged, usage.reserved), (points(320), Points::ZERO));
    assert!(
        h.upstream.callbacks_sent().is_empty(),
        "no callback was involved"
    );
}

#[tokio::test]
async fn lifecycle_through_the_reconciler_only() {
    let h = Harness::start("[reconciler]\ninterval_s = 3600\nreconcile_after_s = 0\n").await;
    let task_id = submit(&h, KEY_A).await;
    let first = h.gateway.reconciler.run_once().await;
    assert_eq!(first.settled, 0, "still queued upstream");

    h.upstream.advance(&task_id, "3").await.unwrap();
    let second = h.gateway.reconciler.run_once().await;

    assert_eq!(second.settled, 1, "{second:?}");
    let usage = usage(&h, "a").await;
    assert_eq!((usage.charged, usage.reserved), (points(320), Points::ZERO));
    let feeds = h.upstream_requests("/runway/feed");
    assert!(!feeds.is_empty());
    assert_eq!(
        feeds[0].headers["authorization"],
        format!("Bearer {UPSTREAM_TOKEN}")
    );
}

#[tokio::test]
async fn reconciler_treats_task_not_exist_as_pending() {
    let mock = MockConfig {
        feed_not_exist_first: 1,
        ..manual_mock()
    };
    let h = Harness::start_with(
        "[reconciler]\ninterval_s = 3600\nreconcile_after_s = 0\n",
        mock,
    )
    .await;
    let task_id = submit(&h, KEY_A).await;
    h.upstream.advance(&task_id, "3").await.unwrap();

    let first = h.gateway.reconciler.run_once().await;
    assert_eq!(first.settled, 0, "task_not_exist is not a failure");
    assert_eq!(usage(&h, "a").await.reserved, points(320));
    let second = h.gateway.reconciler.run_once().await;
    assert_eq!(second.settled, 1);
    assert_eq!(usage(&h, "a").await.charged, points(320));
}

#[tokio::test]
async fn failed_task_with_refund_costs_nothing() {
    let h = Harness::start_with("", with_callbacks()).await;
    let task_id = submit(&h, KEY_A).await;

    let failed = h.upstream.advance(&task_id, "2").await.unwrap().unwrap();
    assert_eq!(failed.result, Ok(200));
    let record = h
        .gateway
        .ledger
        .store
        .task_by_id(&task_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        record.raw_refund.as_deref(),
        Some("320"),
        "raw strings kept"
    );

    let usage = usage(&h, "a").await;
    assert_eq!(
        (usage.charged, usage.reserved),
        (Points::ZERO, Points::ZERO)
    );
    let metrics = h.metrics().await;
    assert_eq!(
        sample(&metrics, "gatehouse_points_refunded_total", &[("key", "a")]),
        320.0
    );
    assert_eq!(
        sample(
            &metrics,
            "gatehouse_tasks_settled_total",
            &[("outcome", "failed")]
        ),
        1.0
    );
}

#[tokio::test]
async fn rejected_submits_release_the_reservation() {
    let h = Harness::start_custom(manual_mock(), |url| {
        config_text(url, "").replace("\ntimeout_ms = 5000", "\ntimeout_ms = 500")
    })
    .await;
    let faults = [
        (
            SubmitFault::ErrorEnvelope {
                http_status: 200,
                code: 403,
                msg: "key incorrect".into(),
            },
            200,
        ),
        (SubmitFault::Status500, 500),
        (SubmitFault::Delay(Duration::from_secs(5)), 504),
        (SubmitFault::DropConnection, 502),
    ];
    for (fault, status) in faults {
        h.upstream.push_submit_fault(fault.clone());
        let response = h.generate(KEY_A, GENERATE_EXAMPLE).await;
        assert_eq!(
            response.status.as_u16(),
            status,
            "{fault:?}: {}",
            response.text()
        );
        let usage = usage(&h, "a").await;
        assert_eq!(
            usage.reserved,
            Points::ZERO,
            "{fault:?} left points reserved"
        );
        assert_eq!(usage.charged, Points::ZERO);
    }
    let entries = h
        .gateway
        .ledger
        .store
        .ledger_entries("a", None)
        .await
        .unwrap();
    let count = |kind| entries.iter().filter(|e| e.kind == kind).count();
    assert_eq!(count(LedgerKind::Reserve), 4);
    assert_eq!(count(LedgerKind::Release), 4);
    assert_eq!(count(LedgerKind::Charge), 0);
    assert_eq!(
        sample(
            &h.metrics().await,
            "gatehouse_points_released_total",
            &[("key", "a")]
        ),
        4.0 * 320.0
    );
}

#[tokio::test]
async fn connection_refused_releases_the_reservation() {
    let closed = bind().await;
    let dead_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (gateway, _store) = start_gateway(&config_text(&dead_url, "")).await;
    let response = TestClient::new()
        .send(
            http::Method::POST,
            &format!("{}/runway/pro/generate", gateway.url()),
            &[
                ("authorization", &format!("Bearer {KEY_A}")),
                ("content-type", "application/json"),
            ],
            GENERATE_EXAMPLE,
        )
        .await;
    response.assert_envelope(502, "upstream");
    let usage = gateway
        .ledger
        .store
        .usage("a", PeriodKey::all())
        .await
        .unwrap();
    assert_eq!(
        (usage.reserved, usage.charged),
        (Points::ZERO, Points::ZERO)
    );
}

#[tokio::test]
async fn duplicate_and_concurrent_terminal_reports_charge_once() {
    let h = Harness::start("").await;
    let task_id = submit(&h, KEY_A).await;
    h.upstream.advance(&task_id, "3").await.unwrap();

    let (callbacks, feed) = tokio::join!(
        h.upstream.send_callback(&task_id, CallbackBody::Current, 5),
        h.feed(KEY_A, &task_id),
    );
    let wrapped = h
        .upstream
        .send_callback(&task_id, CallbackBody::Wrapped, 1)
        .await
        .unwrap();

    assert!(callbacks.unwrap().iter().all(|c| c.result == Ok(200)));
    assert_eq!(
        wrapped[0].result,
        Ok(200),
        "the wrapped form is accepted too"
    );
    assert_eq!(feed.status, StatusCode::OK);
    assert_eq!(charge_rows(&h, "a", &task_id).await, vec![points(320)]);
    let usage = usage(&h, "a").await;
    assert_eq!((usage.charged, usage.reserved), (points(320), Points::ZERO));
    let metrics = h.metrics().await;
    assert_eq!(sample(&metrics, "gatehouse_tasks_settled_total", &[]), 1.0);
}

#[tokio::test]
async fn out_of_order_callbacks_do_not_reopen_a_settled_task() {
    let h = Harness::start_with("", with_callbacks()).await;
    let task_id = submit(&h, KEY_A).await;
    h.upstream.advance(&task_id, "3").await.unwrap();
    let late = h
        .upstream
        .send_callback(&task_id, CallbackBody::AsStatus("1".into()), 1)
        .await
        .unwrap();
    assert_eq!(late[0].result, Ok(200));
    let record = h
        .gateway
        .ledger
        .store
        .task_by_id(&task_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.state, TaskState::Settled);
    assert_eq!(usage(&h, "a").await.charged, points(320));
}

#[tokio::test]
async fn callback_before_the_submit_response_settles_correctly() {
    let h = Harness::start_with("", with_callbacks()).await;
    h.upstream
        .push_submit_fault(SubmitFault::CreateThenStall(Duration::from_millis(1500)));

    let callback_first = async {
        h.upstream.wait_until(|mock| !mock.tasks().is_empty()).await;
        let task_id = h.upstream.tasks()[0].task_id.clone();
        let sent = h.upstream.advance(&task_id, "3").await.unwrap().unwrap();
        assert_eq!(
            sent.result,
            Ok(200),
            "callback accepted before the submit answered"
        );
        let record = h.gateway.ledger.store.task_by_id(&task_id).await.unwrap();
        assert!(record.is_none(), "the task id is not attached yet");
        task_id
    };
    let (response, task_id) = tokio::join!(h.generate(KEY_A, GENERATE_EXAMPLE), callback_first);

    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert_eq!(response.json()["data"]["task_id"], task_id.as_str());
    let record = h
        .gateway
        .ledger
        .store
        .task_by_id(&task_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        record.state,
        TaskState::Settled,
        "attach kept the settlement"
    );
    let usage = usage(&h, "a").await;
    assert_eq!((usage.charged, usage.reserved), (points(320), Points::ZERO));
    assert_eq!(charge_rows(&h, "a", &task_id).await, vec![points(320)]);
}

#[tokio::test]
async fn unknown_callback_tokens_are_404() {
    let h = Harness::start("").await;
    let response = h
        .client
        .send(
            http::Method::POST,
            &h.url("/callbacks/runway/00000000000000000000000000000000"),
            &[("content-type", "application/json")],
            r#"{"task_id":"x","status":"3","point":"1","refund":"0"}"#,
        )
        .await;
    response.assert_envelope(404, "unknown callback token");
}

#[tokio::test]
async fn another_keys_task_does_not_exist_for_the_caller() {
    let h = Harness::start("").await;
    let task_id = submit(&h, KEY_A).await;

    let foreign = h.feed(KEY_B, &task_id).await;
    let unknown = h.feed(KEY_B, "no-such-task").await;

    let foreign_msg = foreign.assert_envelope(404, "does not exist");
    let unknown_msg = unknown.assert_envelope(404, "does not exist");
    assert_eq!(
        foreign_msg.replace(&task_id, "ID"),
        unknown_msg.replace("no-such-task", "ID"),
        "another key's task looks exactly like a missing one"
    );
    assert!(
        h.upstream_requests("/runway/feed").is_empty(),
        "upstream not called"
    );
    assert_eq!(h.feed(KEY_A, &task_id).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_charge_in_the_previous_day_does_not_count_today() {
    // 2026-11-23 23:59:00 UTC.
    let clock = Arc::new(ManualClock::new(1_795_478_340));
    let h = Harness::start_full(
        with_callbacks(),
        |url| config_text(url, &quota_key(320)),
        Some(clock.clone()),
    )
    .await;

    let task_id = submit(&h, KEY_Q).await;
    h.upstream.advance(&task_id, "3").await.unwrap();
    h.generate(KEY_Q, GENERATE_EXAMPLE)
        .await
        .assert_envelope(402, "quota");

    clock.advance(120); // 2026-11-24 00:01:00 UTC
    let today = submit(&h, KEY_Q).await;

    let store = &h.gateway.ledger.store;
    let yesterday = store
        .usage("q", PeriodKey::parse("2026-11-23").unwrap())
        .await
        .unwrap();
    let current = store
        .usage("q", PeriodKey::parse("2026-11-24").unwrap())
        .await
        .unwrap();
    assert_eq!(
        (yesterday.charged, yesterday.reserved),
        (points(320), Points::ZERO)
    );
    assert_eq!(
        (current.charged, current.reserved),
        (Points::ZERO, points(320))
    );
    assert_ne!(task_id, today);
}

#[tokio::test]
async fn a_forged_terminal_callback_is_refused_and_the_real_one_settles() {
    let h = Harness::start("").await;
    let task_id = submit(&h, KEY_A).await;
    h.upstream.advance(&task_id, "1").await.unwrap();
    let state = || async {
        h.gateway
            .ledger
            .store
            .task_by_id(&task_id)
            .await
            .unwrap()
            .unwrap()
            .state
    };

    // Someone who learned the callback URL claims the task failed (it would cost 0) while
    // the upstream still says it is generating: the feed may lag, so it is not refused,
    // but nothing is settled by it.
    let early = h
        .upstream
        .send_callback(&task_id, CallbackBody::AsStatus("2".into()), 1)
        .await
        .unwrap();
    assert_eq!(early[0].result, Ok(200));
    assert_eq!(state().await, TaskState::Pending, "nothing settled");

    // Once the upstream's record is final, a contradicting callback is refused (409) and
    // the record itself settles the task.
    h.upstream
        .set_task_outcome(&task_id, "3", Some("300"), Some("0"))
        .await
        .unwrap();
    let forged = h
        .upstream
        .send_callback(&task_id, CallbackBody::AsStatus("2".into()), 1)
        .await
        .unwrap();
    assert_eq!(forged[0].result, Ok(409), "contradicts /runway/feed");
    assert_eq!(state().await, TaskState::Settled);
    assert_eq!(usage(&h, "a").await.charged, points(300));

    let real = h
        .upstream
        .send_callback(&task_id, CallbackBody::Current, 1)
        .await
        .unwrap();
    assert_eq!(real[0].result, Ok(200));
    assert_eq!(usage(&h, "a").await.charged, points(300), "charged once");
    let metrics = h.metrics().await;
    for (result, count) in [("unconfirmed", 1.0), ("mismatch", 1.0)] {
        assert_eq!(
            sample(
                &metrics,
                "gatehouse_callbacks_received_total",
                &[("result", result)]
            ),
            count,
            "{result}"
        );
    }
}

#[tokio::test]
async fn a_second_gateway_on_the_same_ledger_is_refused() {
    let h = Harness::start("").await;
    let text = with_store(&config_text(&h.upstream.base_url(), ""), h.store_dir.path());
    let second = gatehouse::server::Gateway::new(parse_config(&text));
    let err = second
        .err()
        .expect("the ledger is locked by the first gateway");
    assert!(
        err.to_string().contains("another gatehouse process"),
        "{err}"
    );
}
