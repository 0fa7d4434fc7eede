//! Crash recovery of the point ledger with the real binary: `gatehouse serve` is SIGKILLed
//! in the middle of a stream of submits, restarted on the same config and ledger file, and
//! every task the upstream created must end up charged exactly once, for what the upstream
//! says it cost.
//!
//! The kill is made to land in every window of a submit, deterministically:
//! - *reserved, never created upstream*: the mock holds two submits before creating their
//!   task (`SubmitFault::Delay`); the connection dies with the gateway, so no task is made;
//! - *created upstream, never attached*: the mock creates two tasks and withholds the answer
//!   (`SubmitFault::CreateThenStall`), so the gateway never learns their task ids;
//! - *attached, pending*: submits of the stream that were answered before the kill;
//! - and whatever the stream had in flight at the moment of the kill.
//!
//! After the restart the mock finishes every task (mixed success/failure) without callbacks;
//! the reconciler must settle every task whose id the ledger knows. Tasks whose id it never
//! learnt can only be found through their callback token, so the upstream's (delayed)
//! callbacks are then sent for every task, duplicates included; they settle the rest and
//! must not charge anything twice.
//!
//! The gateway listens on a port chosen up front, not port 0: `server.public_url` is baked
//! into every task's callback URL at submit, so it has to stay valid across the restart,
//! as it does in production.

mod support;

use bytes::Bytes;
use gatehouse::mock_upstream::{mock_price, CallbackBody, MockConfig, MockUpstream, SubmitFault};
use gatehouse::points::Points;
use gatehouse::quota::{
    LedgerKind, PeriodKey, ReservationId, SqliteStore, Store, TaskRecord, TaskRef, TaskState,
};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use support::{bind, KEY_A, UPSTREAM_TOKEN};

/// Bound on every wait; a gateway that never settles fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(20);
/// The stream of submits: `CONNECTIONS` connections, `PER_CONNECTION` submits each.
const CONNECTIONS: usize = 8;
const PER_CONNECTION: usize = 5;
/// The gateway is killed once the mock has seen this many submits of the stream.
const KILL_AFTER: usize = 16;
/// The setting this test proposes (see the report): how old a `reserved` row without an
/// upstream task id must be before the reconciler releases it. Today the age is
/// `upstream.timeout_ms / 1000 + 60` s, fixed.
const STALE_SETTING: &str = "stale_reservation_after_s";

/// A `gatehouse serve` child process, killed (SIGKILL) when dropped.
struct Gatehouse {
    child: Child,
    url: String,
}

impl Gatehouse {
    /// Starts the binary on `config` and waits for its "listening" line on stdout.
    async fn start(config: &Path, log_path: &Path) -> Gatehouse {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .expect("gateway log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("GATEHOUSE_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("gatehouse binary starts");
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
        let printed = tokio::time::timeout(WAIT, rx).await;
        let Ok(Ok(url)) = printed else {
            let _ = child.kill();
            let status = child.wait();
            panic!(
                "gatehouse did not print `gatehouse listening on http://ADDR` ({status:?}); its stderr:\n{}",
                std::fs::read_to_string(log_path).unwrap_or_default()
            );
        };
        Gatehouse { child, url }
    }

    /// SIGKILL (`Child::kill` on unix): no shutdown code runs.
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL the gateway");
        let status = self.child.wait().expect("reap the gateway");
        assert!(!status.success(), "killed, not exited: {status:?}");
    }
}

impl Drop for Gatehouse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that is free now; the gateway binds it on both starts.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

fn config_text(port: u16, upstream_url: &str, store: &Path, stale_setting: bool) -> String {
    let stale = if stale_setting {
        // More than upstream.timeout_ms: a submit cannot still be in flight (see the report).
        format!("{STALE_SETTING} = 3\n")
    } else {
        String::new()
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"
request_timeout_ms = 10000
shutdown_grace_ms = 1000

[upstream]
base_url = "{upstream_url}"
token = "{UPSTREAM_TOKEN}"
connect_timeout_ms = 1000
timeout_ms = 2000
rate_per_second = 10000
burst = 10000

[[keys]]
id = "a"
key_sha256 = "{hash_a}"
rate_per_second = 1000
burst = 1000

[store]
path = {store:?}

[reconciler]
interval_s = 1
# 0 ("poll at once") is rejected by config validation; 1 s is the smallest allowed.
reconcile_after_s = 1
max_pending_s = 3600
concurrency = 8
{stale}"#,
        hash_a = gatehouse::auth::hash_key(KEY_A),
        store = store.display().to_string(),
    )
}

/// One submit: gen3 10 s (320 points) or gen2 5 s (100), with a caller callback URL that
/// refuses connections (the outbox retries it in the background; nothing leaves loopback).
fn submit_body(i: usize) -> String {
    let (model, seconds) = if i.is_multiple_of(3) {
        ("gen2", 5)
    } else {
        ("gen3", 10)
    };
    serde_json::json!({
        "callback_url": "http://127.0.0.1:9/hook",
        "prompt": format!("crash test task {i}"),
        "model": model,
        "ratio": "16:9",
        "options": {
            "seconds": seconds,
            "motion_vector": { "x": 0, "y": 0.4, "z": 0, "r": -6, "bg_x_pan": 0, "bg_y_pan": 0 },
        },
    })
    .to_string()
}

/// What a caller saw for one submit.
#[derive(Debug)]
enum Outcome {
    /// An answer (200 with a task id is the normal case).
    Answered(StatusCode, serde_json::Value),
    /// The connection failed: the gateway died under the request or before it.
    Failed(String),
}

async fn submit(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    i: usize,
) -> Outcome {
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("{url}/runway/pro/generate"))
        .header("authorization", format!("Bearer {KEY_A}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(submit_body(i))))
        .expect("valid request");
    let response = match client.request(request).await {
        Ok(response) => response,
        Err(err) => return Outcome::Failed(format!("{err:?}")),
    };
    let status = response.status();
    match response.into_body().collect().await {
        Ok(body) => Outcome::Answered(
            status,
            serde_json::from_slice(&body.to_bytes()).unwrap_or(serde_json::Value::Null),
        ),
        Err(err) => Outcome::Failed(format!("{err:?}")),
    }
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1)
        .build_http()
}

fn generate_requests(mock: &MockUpstream) -> usize {
    mock.received()
        .iter()
        .filter(|r| r.path == "/runway/pro/generate")
        .count()
}

/// The token at the end of the gateway callback URL the upstream holds for a task.
fn token_of(callback_url: &str) -> String {
    callback_url
        .rsplit_once("/callbacks/runway/")
        .unwrap_or_else(|| panic!("{callback_url} is a gateway callback URL"))
        .1
        .to_string()
}

/// Polls `condition` until it holds; panics after `WAIT` naming `what`.
async fn wait_for<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every task row of key `a` (found through its ledger rows), by row id.
async fn all_tasks(store: &SqliteStore) -> BTreeMap<ReservationId, TaskRecord> {
    let mut tasks = BTreeMap::new();
    for entry in store.ledger_entries("a", None).await.unwrap() {
        let Some(id) = entry.reservation else {
            continue;
        };
        if let std::collections::btree_map::Entry::Vacant(slot) = tasks.entry(id) {
            let task = store.task(TaskRef::Reservation(id)).await.unwrap().unwrap();
            slot.insert(task);
        }
    }
    tasks
}

/// The ledger row of each upstream task, found by its callback token (every row has one,
/// whether or not the gateway learnt the task id).
async fn rows_of(store: &SqliteStore, mock: &MockUpstream) -> Vec<(String, Option<TaskRecord>)> {
    let mut rows = Vec::new();
    for task in mock.tasks() {
        let row = store
            .task_by_token(&token_of(&task.callback_url))
            .await
            .unwrap();
        rows.push((task.task_id, row));
    }
    rows
}

async fn crash_scenario(stale_setting: bool) {
    let mock = MockUpstream::start(
        bind().await,
        MockConfig {
            token: UPSTREAM_TOKEN.to_string(),
            auto_progress: false,
            send_callbacks: false,
            // As the real upstream: the first feed of a task says task_not_exist.
            feed_not_exist_first: 1,
            ..MockConfig::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store_path: PathBuf = dir.path().join("ledger.db");
    let config_path = dir.path().join("gatehouse.toml");
    let log_path = dir.path().join("gatehouse.log");
    let port = free_port();
    std::fs::write(
        &config_path,
        config_text(port, &mock.base_url(), &store_path, stale_setting),
    )
    .unwrap();

    // ---- First life: the stream, and the kill. ----
    let first = Gatehouse::start(&config_path, &log_path).await;
    assert_eq!(first.url, format!("http://127.0.0.1:{port}"));
    let url = first.url.clone();

    // Four submits the mock holds: two die before their task exists, two after.
    for fault in [
        SubmitFault::Delay(Duration::from_secs(60)),
        SubmitFault::Delay(Duration::from_secs(60)),
        SubmitFault::CreateThenStall(Duration::from_secs(60)),
        SubmitFault::CreateThenStall(Duration::from_secs(60)),
    ] {
        mock.push_submit_fault(fault);
    }
    let mut held = Vec::new();
    for i in 0..4 {
        let url = url.clone();
        held.push(tokio::spawn(async move {
            submit(&client(), &url, 1000 + i).await
        }));
    }
    tokio::time::timeout(
        WAIT,
        mock.wait_until(|m| m.tasks().len() == 2 && generate_requests(m) == 4),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the mock holds four submits, two with a task: {} submits, {} tasks; gateway log:\n{}",
            generate_requests(&mock),
            mock.tasks().len(),
            std::fs::read_to_string(&log_path).unwrap_or_default()
        )
    });

    let stream_started = std::time::Instant::now();
    let mut stream = Vec::new();
    for connection in 0..CONNECTIONS {
        let url = url.clone();
        stream.push(tokio::spawn(async move {
            let client = client();
            let mut outcomes = Vec::new();
            for n in 0..PER_CONNECTION {
                let outcome = submit(&client, &url, connection * PER_CONNECTION + n).await;
                let failed = matches!(outcome, Outcome::Failed(_));
                outcomes.push(outcome);
                if failed {
                    // The gateway is gone: the rest of this connection's stream is cut.
                    break;
                }
            }
            outcomes
        }));
    }
    tokio::time::timeout(
        WAIT,
        mock.wait_until(|m| generate_requests(m) >= 4 + KILL_AFTER),
    )
    .await
    .expect("the stream reaches the upstream");
    first.kill();
    let killed_after = stream_started.elapsed();
    // The mock drops a held submit when its connection closes: the two delayed ones will
    // never create a task.
    tokio::time::timeout(WAIT, mock.wait_until(|m| m.open_connections() == 0))
        .await
        .expect("the dead gateway's upstream connections close");

    let mut outcomes = Vec::new();
    for worker in held {
        outcomes.push(worker.await.unwrap());
    }
    let held_outcomes = outcomes.len();
    for worker in stream {
        outcomes.extend(worker.await.unwrap());
    }
    assert!(
        outcomes[..held_outcomes]
            .iter()
            .all(|o| matches!(o, Outcome::Failed(_))),
        "the held submits died with the gateway: {:?}",
        &outcomes[..held_outcomes]
    );
    let mut answered_task_ids = Vec::new();
    for outcome in &outcomes {
        if let Outcome::Answered(status, body) = outcome {
            assert_eq!(
                *status,
                StatusCode::OK,
                "before the kill, submits succeed: {body}"
            );
            answered_task_ids.push(
                body["data"]["task_id"]
                    .as_str()
                    .expect("a 200 answer names the task")
                    .to_string(),
            );
        }
    }
    let failed_submits = outcomes.len() - answered_task_ids.len();
    let first_cut = outcomes.iter().find_map(|o| match o {
        Outcome::Failed(reason) => Some(reason.clone()),
        Outcome::Answered(..) => None,
    });
    assert!(
        answered_task_ids.len() < CONNECTIONS * PER_CONNECTION,
        "the kill landed mid-stream"
    );

    // ---- Second life: same config, same ledger file. ----
    let second = Gatehouse::start(&config_path, &log_path).await;
    assert_eq!(
        second.url, url,
        "same address, so public_url still reaches it"
    );
    // A second connection to the ledger file, read-only in spirit: WAL lets it read while
    // the gateway writes.
    let store = Arc::new(SqliteStore::open(&store_path).expect("open the ledger file"));

    // The upstream finishes every task it created: every fourth fails (refunded, costs 0).
    let created = mock.tasks();
    let mut expected: HashMap<String, Points> = HashMap::new();
    for (i, task) in created.iter().enumerate() {
        let status = if i % 4 == 3 { "2" } else { "3" };
        assert!(mock.advance(&task.task_id, status).await.unwrap().is_none());
        let cost = if status == "3" {
            mock_price(&task.model, task.seconds)
        } else {
            0
        };
        expected.insert(task.task_id.clone(), Points::from_whole(cost.into()));
    }
    for id in &answered_task_ids {
        assert!(
            expected.contains_key(id),
            "a task id the gateway answered with exists upstream: {id}"
        );
    }

    // Without callbacks, the reconciler settles every task whose id the ledger knows.
    let mut known_ids = Vec::new();
    let mut unknown_ids = Vec::new();
    for (task_id, row) in rows_of(&store, &mock).await {
        let row = row.unwrap_or_else(|| panic!("upstream task {task_id} has a ledger row"));
        match row.task_id {
            Some(known) => {
                assert_eq!(known, task_id);
                known_ids.push(task_id);
            }
            None => {
                // Not settled, not pending: nothing has told the ledger about it yet.
                assert!(
                    !matches!(row.state, TaskState::Settled | TaskState::Pending),
                    "{row:?}"
                );
                unknown_ids.push(task_id);
            }
        }
    }
    assert!(
        unknown_ids.len() >= 2,
        "the two tasks created while their answer was withheld are unknown to the ledger"
    );
    assert!(
        !known_ids.is_empty(),
        "some submits were attached before the kill"
    );
    wait_for("the reconciler settles every task with a known id", || {
        let store = store.clone();
        let known_ids = known_ids.clone();
        async move {
            for task_id in &known_ids {
                let task = store.task_by_id(task_id).await.unwrap().unwrap();
                if task.state != TaskState::Settled {
                    return false;
                }
            }
            true
        }
    })
    .await;
    for task_id in &unknown_ids {
        let row = store
            .task_by_token(&token_of(&mock.task(task_id).unwrap().callback_url))
            .await
            .unwrap()
            .unwrap();
        assert!(
            row.state.is_open() || row.state == TaskState::Released,
            "nothing but a callback can settle a task whose id the ledger never learnt"
        );
    }

    // The upstream's callbacks arrive (late): one terminal callback per task, twice for
    // some. The settled ones must not change; the rest are found by token and settled.
    for (i, task) in created.iter().enumerate() {
        let repeats = if i % 5 == 0 { 2 } else { 1 };
        for sent in mock
            .send_callback(&task.task_id, CallbackBody::Current, repeats)
            .await
            .unwrap()
        {
            assert_eq!(sent.result, Ok(200), "the gateway accepts the callback");
        }
    }
    wait_for("every upstream task is settled", || {
        let store = store.clone();
        let mock = &mock;
        async move {
            rows_of(&store, mock)
                .await
                .iter()
                .all(|(_, row)| row.as_ref().unwrap().state == TaskState::Settled)
        }
    })
    .await;

    // Stale reservations: rows whose submit never created an upstream task.
    let upstream_tokens: Vec<String> = created.iter().map(|t| token_of(&t.callback_url)).collect();
    if stale_setting {
        wait_for("the reconciler releases every stale reservation", || {
            let store = store.clone();
            async move {
                all_tasks(&store)
                    .await
                    .values()
                    .all(|task| !task.state.is_open())
            }
        })
        .await;
    }

    // ---- The ledger, checked row by row. ----
    let tasks = all_tasks(&store).await;
    let entries = store.ledger_entries("a", None).await.unwrap();
    let of_kind = |id: ReservationId, kind: LedgerKind| -> Vec<Points> {
        entries
            .iter()
            .filter(|e| e.reservation == Some(id) && e.kind == kind)
            .map(|e| e.points)
            .collect()
    };
    let mut expected_total = Points::ZERO;
    for task in &created {
        let row = tasks
            .values()
            .find(|row| row.callback_token.as_deref() == Some(&token_of(&task.callback_url)))
            .unwrap_or_else(|| panic!("upstream task {} has a ledger row", task.task_id));
        let cost = expected[&task.task_id];
        expected_total = expected_total.saturating_add(cost);
        assert_eq!(row.state, TaskState::Settled, "{row:?}");
        assert_eq!(row.charged, Some(cost), "{row:?}");
        assert_eq!(
            of_kind(row.id, LedgerKind::Charge),
            vec![cost],
            "exactly one charge for upstream task {}",
            task.task_id
        );
        assert_eq!(of_kind(row.id, LedgerKind::Reserve).len(), 1);
    }
    let mut stale = Vec::new();
    let mut released = 0;
    for row in tasks.values() {
        let has_upstream_task = row
            .callback_token
            .as_ref()
            .is_some_and(|token| upstream_tokens.contains(token));
        if has_upstream_task {
            continue;
        }
        // A row with no upstream task: never charged, never attached.
        assert!(row.task_id.is_none(), "{row:?}");
        assert!(of_kind(row.id, LedgerKind::Charge).is_empty(), "{row:?}");
        match row.state {
            TaskState::Reserved => stale.push(row.clone()),
            TaskState::Released => released += 1,
            other => panic!("a row with no upstream task is {other:?}: {row:?}"),
        }
    }
    let charged_total = entries
        .iter()
        .filter(|e| e.kind == LedgerKind::Charge)
        .fold(Points::ZERO, |sum, e| sum.saturating_add(e.points));
    assert_eq!(charged_total, expected_total, "Σ charges = Σ upstream cost");
    let usage = store.usage("a", PeriodKey::all()).await.unwrap();
    assert_eq!(usage.charged, expected_total);
    let stale_points = stale
        .iter()
        .fold(Points::ZERO, |sum, row| sum.saturating_add(row.reserved));
    assert_eq!(
        usage.reserved, stale_points,
        "only stale reservations hold points"
    );
    assert!(
        tasks.values().all(|row| row.state != TaskState::Pending),
        "nothing is left pending"
    );

    println!(
        "crash test ({}): killed {killed_after:?} into the stream; {} submits sent, {} answered, {} cut by the kill",
        if stale_setting { "with [reconciler] stale_reservation_after_s" } else { "default settings" },
        outcomes.len(),
        answered_task_ids.len(),
        failed_submits,
    );
    println!(
        "  a cut submit saw: {}",
        first_cut.as_deref().unwrap_or("-")
    );
    println!(
        "  upstream: {} tasks created ({} succeeded, {} failed); ledger: {} task rows",
        created.len(),
        created
            .iter()
            .filter(|t| expected[&t.task_id] > Points::ZERO)
            .count(),
        created
            .iter()
            .filter(|t| expected[&t.task_id] == Points::ZERO)
            .count(),
        tasks.len(),
    );
    println!(
        "  settled: {} ({} by the reconciler, {} only reachable by callback); charged {} points (upstream cost {})",
        tasks.values().filter(|t| t.state == TaskState::Settled).count(),
        known_ids.len(),
        unknown_ids.len(),
        charged_total,
        expected_total,
    );
    println!(
        "  reservations without an upstream task: {released} released, {} still reserved ({} points)",
        stale.len(),
        stale_points,
    );

    if stale_setting {
        assert!(stale.is_empty(), "no reservation is left without a task");
        assert!(
            released >= 2,
            "the two submits held before their task existed"
        );
    } else {
        // Today a reservation whose submit died with the process is released only after
        // upstream.timeout_ms / 1000 + 60 s; within this test it is still reserved.
        assert!(
            stale.len() >= 2,
            "the two submits held before their task existed are still reserved"
        );
    }
    assert_eq!(
        mock.tasks().len(),
        created.len(),
        "no task appeared upstream after the crash"
    );
    drop(second);
    mock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_stream_then_restart_charges_every_upstream_task_exactly_once() {
    crash_scenario(false).await;
}

/// Needs `[reconciler] stale_reservation_after_s` (proposed; not implemented yet: today the
/// config rejects the unknown setting). Remove the `ignore` once it exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]

async fn sigkill_mid_stream_then_restart_releases_every_stale_reservation() {
    crash_scenario(true).await;
}
