//! Config hot reload: file watcher under load, `POST /admin/reload`, SIGHUP on the real binary.

mod support;

use gatehouse::mock_upstream::MockUpstream;
use gatehouse::server::{Gateway, RunningGateway};
use http::{Method, StatusCode};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

const KEY_C: &str = "kc_reload_added_key_3d9a1f0e5b";
const KEY_D: &str = "kd_reload_other_key_7c2e4a6b8d";
const ADMIN_TOKEN: &str = "admin-token-for-reload-tests-91c3";

fn key_entry(id: &str, key: &str) -> String {
    format!(
        "[[keys]]\nid = \"{id}\"\nkey_sha256 = \"{}\"\nrate_per_second = 1000\nburst = 1000\n",
        gatehouse::auth::hash_key(key)
    )
}

/// Replaces the file in one step, as careful editors and config management do.
fn write_atomically(path: &Path, text: &str) {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

struct Reloadable {
    _dir: tempfile::TempDir,
    path: PathBuf,
    upstream: MockUpstream,
    gateway: RunningGateway,
    base: String,
}

impl Reloadable {
    async fn start(extra: &str) -> Reloadable {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gatehouse.toml");
        let upstream = MockUpstream::start(bind().await, manual_mock()).await;
        let base = with_store(
            &config_text(
                &upstream.base_url(),
                &format!("[admin]\ntoken = \"{ADMIN_TOKEN}\"\n"),
            ),
            dir.path(),
        );
        let text = format!("{base}\n{extra}");
        std::fs::write(&path, &text).unwrap();
        let mut gateway = Gateway::new(parse_config(&text)).unwrap();
        gateway.enable_reload(path.clone(), Box::new(test_env));
        let gateway = RunningGateway::start_gateway(gateway, bind().await, None)
            .await
            .unwrap();
        Reloadable {
            _dir: dir,
            path,
            upstream,
            gateway,
            base,
        }
    }

    fn write(&self, extra: &str) {
        write_atomically(&self.path, &format!("{}\n{extra}", self.base));
    }

    fn reloads(&self, result: &str) -> f64 {
        self.gateway
            .metrics
            .config_reloads_total
            .with_label_values(&[result])
            .get() as f64
    }

    fn live_hash(&self) -> String {
        self.gateway.live.load().config.source_hash.clone()
    }
}

/// Polls `condition` until it holds or `limit` passes; returns how long it took.
async fn within(limit: Duration, what: &str, mut condition: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if condition().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn feed_status(client: &TestClient, url: &str, key: &str) -> StatusCode {
    client
        .send(
            Method::POST,
            &format!("{url}/runway/feed"),
            &[
                ("authorization", &format!("Bearer {key}")),
                ("content-type", "application/json"),
            ],
            r#"{"task_id":"probe"}"#,
        )
        .await
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_keeps_serving_and_rejects_bad_versions() {
    let r = Reloadable::start(&key_entry("c", KEY_C)).await;
    let client = TestClient::new();
    let url = r.gateway.url();

    // Key a's own task: its feed must answer 200 through every reload.
    let submitted = client
        .send(
            Method::POST,
            &format!("{url}/runway/pro/generate"),
            &[
                ("authorization", &format!("Bearer {KEY_A}")),
                ("content-type", "application/json"),
            ],
            GENERATE_EXAMPLE,
        )
        .await;
    assert_eq!(submitted.status, StatusCode::OK, "{}", submitted.text());
    let task_id = submitted.json()["data"]["task_id"]
        .as_str()
        .unwrap()
        .to_string();

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn({
        let (stop, sent, failed, url, task_id) = (
            stop.clone(),
            sent.clone(),
            failed.clone(),
            url.clone(),
            task_id.clone(),
        );
        async move {
            let client = TestClient::new();
            while !stop.load(Ordering::Relaxed) {
                let response = client
                    .send(
                        Method::POST,
                        &format!("{url}/runway/feed"),
                        &[
                            ("authorization", &format!("Bearer {KEY_A}")),
                            ("content-type", "application/json"),
                        ],
                        &serde_json::json!({ "task_id": task_id }).to_string(),
                    )
                    .await;
                sent.fetch_add(1, Ordering::Relaxed);
                if response.status != StatusCode::OK {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });

    let invalid_versions = [
        "[server]\nlisten_backlog = 3\n".to_string(),
        format!("{}quota_period = \"weekly\"\n", key_entry("x", "kx_never")),
        "[upstream\nbroken = \n".to_string(),
        "[admin]\ntoken_file = \"/nonexistent/gatehouse-admin-token\"\n".to_string(),
    ];
    let mut slowest_add = Duration::ZERO;
    let mut slowest_remove = Duration::ZERO;
    for round in 0..20 {
        if round % 2 == 0 {
            // Valid: swap which of c and d exists.
            let (added, added_key, removed_key) = if round % 4 == 0 {
                ("d", KEY_D, KEY_C)
            } else {
                ("c", KEY_C, KEY_D)
            };
            r.write(&key_entry(added, added_key));
            slowest_add = slowest_add.max(
                within(Duration::from_secs(2), "added key accepted", async || {
                    feed_status(&client, &url, added_key).await != StatusCode::UNAUTHORIZED
                })
                .await,
            );
            slowest_remove = slowest_remove.max(
                within(Duration::from_secs(2), "removed key refused", async || {
                    feed_status(&client, &url, removed_key).await == StatusCode::UNAUTHORIZED
                })
                .await,
            );
        } else {
            let errors_before = r.reloads("error");
            let live_before = r.live_hash();
            r.write(&invalid_versions[(round / 2) % invalid_versions.len()]);
            within(
                Duration::from_secs(2),
                "invalid version rejected",
                async || r.reloads("error") > errors_before,
            )
            .await;
            assert_eq!(r.live_hash(), live_before, "the old config stays live");
        }
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();

    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests that should have passed failed"
    );
    assert!(sent.load(Ordering::Relaxed) > 20, "the load kept running");
    assert_eq!(r.reloads("error"), 10.0);
    assert!(r.reloads("success") >= 10.0);
    println!(
        "reload under load: {} requests, 0 failed; slowest add {slowest_add:?}, slowest removal {slowest_remove:?}",
        sent.load(Ordering::Relaxed)
    );
    drop(r.upstream);
}

#[tokio::test]
async fn admin_reload_reports_restart_required_settings_and_rejections() {
    let r = Reloadable::start("").await;
    let client = TestClient::new();
    let url = r.gateway.url();
    let admin = format!("Bearer {ADMIN_TOKEN}");
    let reload = || async {
        client
            .send(
                Method::POST,
                &format!("{url}/admin/reload"),
                &[("authorization", admin.as_str())],
                "",
            )
            .await
    };

    let text = std::fs::read_to_string(&r.path).unwrap();
    let moved = text.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
    assert_ne!(moved, text);
    write_atomically(&r.path, &format!("{moved}\n{}", key_entry("c", KEY_C)));
    let answer = reload().await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let json = answer.json();
    assert_eq!(json["applied"], true);
    assert_eq!(
        json["restart_required"],
        serde_json::json!(["server.listen"])
    );
    assert_eq!(
        r.gateway.live.load().config.server.listen.port(),
        0,
        "listen keeps its running value"
    );
    assert_ne!(
        feed_status(&client, &url, KEY_C).await,
        StatusCode::UNAUTHORIZED
    );

    write_atomically(
        &r.path,
        &format!("{moved}\n[validation]\nunknown_fields = \"maybe\"\n"),
    );
    let rejected = reload().await;
    assert_eq!(rejected.status, StatusCode::UNPROCESSABLE_ENTITY);
    let problems = rejected.json()["problems"].to_string();
    assert!(problems.contains("validation.unknown_fields"), "{problems}");
    assert_ne!(
        feed_status(&client, &url, KEY_C).await,
        StatusCode::UNAUTHORIZED,
        "the previous config is still live"
    );

    let unauthorized = client
        .send(Method::POST, &format!("{url}/admin/reload"), &[], "")
        .await;
    unauthorized.assert_envelope(401, "missing credential");
}

#[test]
fn sighup_reloads_rotated_secrets_in_the_real_binary() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream =
        runtime.block_on(async { MockUpstream::start(bind().await, manual_mock()).await });
    let dir = tempfile::tempdir().unwrap();
    // The secret lives outside the config's directory, so only SIGHUP can notice it changed.
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("admin_token");
    std::fs::write(&token_file, "first-admin-token-0a1b2c\n").unwrap();
    let config = dir.path().join("gatehouse.toml");
    let text = with_store(
        &config_text(
            &upstream.base_url(),
            &format!(
                "[admin]\ntoken_file = {:?}\n",
                token_file.display().to_string()
            ),
        ),
        dir.path(),
    )
    .replace("${TEST_UPSTREAM_TOKEN}", UPSTREAM_TOKEN);
    std::fs::write(&config, text).unwrap();

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = lines
        .find_map(|line| {
            line.ok()?
                .strip_prefix("gatehouse listening on ")
                .map(str::to_string)
        })
        .expect("the binary prints its address");

    let status_with = |token: &str| {
        runtime.block_on(async {
            TestClient::new()
                .send(
                    Method::GET,
                    &format!("{url}/admin/usage"),
                    &[("authorization", &format!("Bearer {token}"))],
                    "",
                )
                .await
                .status
        })
    };
    assert_eq!(status_with("first-admin-token-0a1b2c"), StatusCode::OK);

    std::fs::write(&token_file, "second-admin-token-3d4e5f\n").unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let started = Instant::now();
    while status_with("second-admin-token-3d4e5f") != StatusCode::OK {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "SIGHUP did not reload"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        status_with("first-admin-token-0a1b2c"),
        StatusCode::UNAUTHORIZED
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP did not kill the process"
    );

    child.kill().unwrap();
    child.wait().unwrap();
    drop(upstream);
}
