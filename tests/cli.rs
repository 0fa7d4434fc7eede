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
