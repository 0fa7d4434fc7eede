//! The real `gatehouse` binary: `check` and `hash-key`.

use std::io::Write;
use std::process::{Command, Stdio};

fn gatehouse() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gatehouse"))
}

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

#[test]
fn check_lists_every_problem_and_fails() {
    let file = write_config(
        r#"
[server]
listen = "127.0.0.1:8080"
listen_backlog = 5

[upstream]
base_url = "http://127.0.0.1:9"
token = "${GATEHOUSE_TEST_SURELY_UNSET_VAR}"

[[keys]]
id = "team"
quota_period = "weekly"
"#,
    );
    let output = gatehouse()
        .args(["check", "--config"])
        .arg(file.path())
        .env_remove("GATEHOUSE_TEST_SURELY_UNSET_VAR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("server.listen_backlog"),
        "unknown key named: {stderr}"
    );
    assert!(
        stderr.contains("keys[0].quota_period") && stderr.contains("weekly"),
        "bad enum named: {stderr}"
    );
    assert!(
        stderr.contains("GATEHOUSE_TEST_SURELY_UNSET_VAR"),
        "missing env var named: {stderr}"
    );
    assert!(stderr.contains("3 problem(s)"), "{stderr}");
}

#[test]
fn check_accepts_the_shipped_example_and_prints_no_secret() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let output = gatehouse()
        .args(["check", "--config", example])
        .env("GATEHOUSE_UPSTREAM_TOKEN", "tok-very-secret-value")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("ok"), "{stdout}");
    assert!(!stdout.contains("tok-very-secret-value") && !stderr.contains("tok-very-secret-value"));
}

#[test]
fn hash_key_prints_the_sha256_of_stdin() {
    let mut child = gatehouse()
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"test\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    // SHA-256("test"), trailing newline from `echo` ignored.
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    );
}

#[tokio::test]
async fn usage_and_ledger_read_the_database() {
    use gatehouse::points::Points;
    use gatehouse::quota::{NewReservation, PeriodKey, Settlement, SqliteStore, Store, TaskRef};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let config = write_config(&format!(
        r#"
[upstream]
base_url = "http://127.0.0.1:9"
token = "${{GATEHOUSE_UPSTREAM_TOKEN}}"

[store]
path = {db:?}

[[keys]]
id = "video"
quota_points = 1000
quota_period = "none"

[[keys]]
id = "idle"
"#,
        db = db.display().to_string()
    ));
    {
        let store = SqliteStore::open(&db).unwrap();
        let now = chrono::Utc::now().timestamp();
        let id = store
            .reserve(NewReservation {
                key_id: "video".into(),
                period: PeriodKey::all(),
                quota: Some(Points::from_whole(1000)),
                price: Points::from_whole(320),
                callback_token: Some("tok".into()),
                caller_callback_url: None,
                route: "runway_generate".into(),
                model: Some("gen3".into()),
                seconds: Some(10),
                now,
            })
            .await
            .unwrap();
        store.attach(id, "task-xyz", now).await.unwrap();
        store
            .settle(Settlement {
                by: TaskRef::TaskId("task-xyz".into()),
                status: "3".into(),
                raw_point: "300".into(),
                raw_refund: "0".into(),
                now,
            })
            .await
            .unwrap();
    }

    // The upstream token is not needed to read the ledger.
    let usage = gatehouse()
        .args(["usage", "--config"])
        .arg(config.path())
        .env_remove("GATEHOUSE_UPSTREAM_TOKEN")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&usage.stdout);
    assert!(
        usage.status.success(),
        "{}",
        String::from_utf8_lossy(&usage.stderr)
    );
    let video = text.lines().find(|l| l.starts_with("video")).expect(&text);
    let columns: Vec<&str> = video.split_whitespace().collect();
    assert_eq!(
        columns,
        ["video", "all", "1000", "300", "0", "700", "0"],
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("idle")),
        "configured keys are listed: {text}"
    );

    let ledger = gatehouse()
        .args(["ledger", "--key", "video", "--task", "task-xyz", "--config"])
        .arg(config.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ledger.stdout);
    assert!(ledger.status.success());
    let kinds: Vec<&str> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    assert_eq!(kinds, ["reserve", "release", "charge"], "{text}");
    assert!(text.contains("300"), "{text}");
}
