//! The deploy kit (`deploy/`) against the code it deploys, so the two cannot drift apart:
//!
//! - every metric the Grafana dashboard and the Prometheus alert rules (and their unit
//!   tests) query is exported by a running gateway, and the dashboard shows every family the
//!   gateway exports;
//! - every YAML file parses (Kubernetes manifests are multi-document), and the files they
//!   point to exist;
//! - every gatehouse config in the kit (compose, the Kubernetes ConfigMap, systemd) passes
//!   `Config::from_toml`, and the ports the manifests publish and scrape are the ones those
//!   configs listen on.

mod support;

use gatehouse::config::Config;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use support::*;
use yaml_rust2::{Yaml, YamlLoader};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
}

fn load_yaml(path: &Path) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|err| panic!("{} is not valid YAML: {err}", path.display()))
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

/// Metric families named in a query text: identifiers `gatehouse_[a-z0-9_]+`, with the
/// histogram series suffixes `_bucket`, `_sum` and `_count` removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut from = 0;
    while let Some(found) = text[from..].find("gatehouse_") {
        let start = from + found;
        let len = bytes[start..]
            .iter()
            .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || **b == b'_')
            .count();
        from = start + len;
        if start > 0 && is_name_byte(bytes[start - 1]) {
            continue; // part of a longer identifier, e.g. `my_gatehouse_x`
        }
        let name = &text[start..start + len];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.insert(family.to_string());
    }
    names
}

#[test]
fn metric_names_are_extracted_and_stripped() {
    let found = metric_names(
        r#"histogram_quantile(0.9, sum by (le) (rate(gatehouse_request_duration_seconds_bucket{route!~"healthz"}[5m]))) / gatehouse_upstream_duration_seconds_count + xgatehouse_no + gatehouse_requests_total"#,
    );
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        [
            "gatehouse_request_duration_seconds",
            "gatehouse_requests_total",
            "gatehouse_upstream_duration_seconds",
        ]
    );
}

/// The families a live gateway exports (`# TYPE name kind` lines), after the traffic that
/// creates the event-driven ones: requests and their durations, an upstream call, an auth
/// failure, and a reservation against a quota (`gatehouse_quota_remaining_points`).
async fn exported_families() -> (BTreeSet<String>, String) {
    let h = Harness::start(
        r#"
[defaults]
rate_per_second = 1000
burst = 1000
quota_points = 100000
quota_period = "monthly"

[[routes]]
name = "runway_generate"
path = "/runway/pro/generate"
kind = "runway_generate"

[[routes]]
name = "runway_feed"
path = "/runway/feed"
kind = "runway_feed"

[[routes]]
name = "chat_completions"
path = "/v1/chat/completions"
kind = "passthrough"
model_pointer = "/model"
allowed_models = ["gpt-4o-mini"]
token_pricing = { estimate = 5, default = { prompt_per_1k = 1, completion_per_1k = 2 } }
"#,
    )
    .await;
    let chat = h
        .client
        .send(
            http::Method::POST,
            &h.url("/v1/chat/completions"),
            &[
                ("authorization", &format!("Bearer {KEY_A}")),
                ("content-type", "application/json"),
            ],
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}"#,
        )
        .await;
    assert_eq!(chat.status, 200, "chat: {}", chat.text());
    let submitted = h.generate(KEY_A, GENERATE_EXAMPLE).await;
    assert_eq!(submitted.status, 200, "generate: {}", submitted.text());
    let task_id = submitted.json()["data"]["task_id"]
        .as_str()
        .expect("task_id")
        .to_string();
    h.upstream
        .advance(&task_id, "3")
        .await
        .expect("task exists");
    let polled = h.feed(KEY_A, &task_id).await;
    assert_eq!(polled.status, 200, "feed: {}", polled.text());
    let refused = h.generate("not-a-configured-key", GENERATE_EXAMPLE).await;
    assert_eq!(refused.status, 401);
    let text = h.metrics().await;
    let families = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split(' ').next())
        .map(str::to_string)
        .collect();
    (families, text)
}

fn assert_all_exported(source: &str, used: &BTreeSet<String>, exported: &BTreeSet<String>) {
    let missing: Vec<&String> = used.difference(exported).collect();
    assert!(
        missing.is_empty(),
        "{source} queries metrics the gateway does not export: {missing:?}\nexported: {exported:?}"
    );
}

/// Every string in a JSON document, with its path (for messages).
fn json_strings<'a>(value: &'a Value, path: String, out: &mut Vec<(String, &'a str)>) {
    match value {
        Value::String(text) => out.push((path, text)),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                json_strings(item, format!("{path}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                json_strings(item, format!("{path}.{key}"), out);
            }
        }
        _ => {}
    }
}

/// Every string in a YAML document.
fn yaml_strings<'a>(value: &'a Yaml, out: &mut Vec<&'a str>) {
    match value {
        Yaml::String(text) => out.push(text),
        Yaml::Array(items) => items.iter().for_each(|item| yaml_strings(item, out)),
        Yaml::Hash(map) => {
            for (key, item) in map {
                yaml_strings(key, out);
                yaml_strings(item, out);
            }
        }
        _ => {}
    }
}

#[tokio::test]
async fn dashboard_and_alerts_query_only_exported_metrics() {
    let (exported, metrics_text) = exported_families().await;
    assert!(
        exported.iter().all(|name| name.starts_with("gatehouse_")),
        "{exported:?}"
    );

    // Grafana: valid JSON, and every metric named anywhere in it (panel targets, template
    // variables) exists.
    let path = deploy("grafana/gatehouse.json");
    let dashboard: Value = serde_json::from_str(&read(&path))
        .unwrap_or_else(|err| panic!("{} is not valid JSON: {err}", path.display()));
    assert_eq!(
        dashboard["uid"], "gatehouse",
        "the README names uid gatehouse"
    );
    let mut strings = Vec::new();
    json_strings(&dashboard, String::new(), &mut strings);
    let exprs: Vec<&(String, &str)> = strings
        .iter()
        .filter(|(at, _)| at.ends_with(".expr"))
        .collect();
    assert!(
        exprs.len() >= 20,
        "expected the dashboard's panel queries, found {} exprs",
        exprs.len()
    );
    for (at, expr) in &exprs {
        assert!(
            !metric_names(expr).is_empty(),
            "dashboard {at} queries no gatehouse metric: {expr}"
        );
    }
    let mut on_dashboard = BTreeSet::new();
    for (at, text) in &strings {
        let names = metric_names(text);
        let missing: Vec<&String> = names.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "dashboard {at} uses metrics the gateway does not export: {missing:?} in {text:?}\nexported: {exported:?}"
        );
        on_dashboard.extend(names);
    }
    // The README promises a dashboard "over every metric in src/metrics.rs".
    let not_shown: Vec<&String> = exported.difference(&on_dashboard).collect();
    assert!(
        not_shown.is_empty(),
        "exported but not on the dashboard: {not_shown:?}"
    );

    // Prometheus: every rule's expr, and the series and queries of the rules' unit tests
    // (a test over a made-up series would pass and prove nothing).
    let rules = load_yaml(&deploy("prometheus/alerts.yml"));
    let mut exprs = Vec::new();
    for group in rules[0]["groups"].as_vec().expect("alerts.yml: groups") {
        for rule in group["rules"].as_vec().expect("alerts.yml: rules") {
            let expr = rule["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("rule without expr: {rule:?}"));
            exprs.push(expr);
        }
    }
    assert!(exprs.len() >= 10, "expected the alert rules, got {exprs:?}");
    let mut in_rules = BTreeSet::new();
    for expr in &exprs {
        in_rules.extend(metric_names(expr));
    }
    assert!(in_rules.len() >= 8, "rules name few metrics: {in_rules:?}");
    assert_all_exported("deploy/prometheus/alerts.yml", &in_rules, &exported);

    let tests = load_yaml(&deploy("prometheus/alerts.test.yml"));
    let mut strings = Vec::new();
    yaml_strings(&tests[0]["tests"], &mut strings);
    let in_tests: BTreeSet<String> = strings.iter().flat_map(|s| metric_names(s)).collect();
    assert!(!in_tests.is_empty(), "alerts.test.yml names no metric");
    assert_all_exported("deploy/prometheus/alerts.test.yml", &in_tests, &exported);

    // The label values the rules and dashboard filter on are the gateway's own.
    for needle in [
        r#"route="runway_generate""#,
        r#"route="runway_feed""#,
        r#"result="dead""#,
        r#"result="error""#,
    ] {
        assert!(
            metrics_text.contains(needle),
            "/metrics has no series with {needle}; the rules filter on it"
        );
    }
}

/// Every `.yml` / `.yaml` file under `deploy/`, recursively.
fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yml" || ext == "yaml")
        {
            out.push(path);
        }
    }
}

#[test]
fn every_yaml_file_parses() {
    let mut files = Vec::new();
    yaml_files(&deploy(""), &mut files);
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.strip_prefix(deploy("")).unwrap().display().to_string())
        .collect();
    for expected in [
        "docker-compose.yml",
        "compose/prometheus.yml",
        "compose/grafana/provisioning/dashboards/gatehouse.yml",
        "compose/grafana/provisioning/datasources/prometheus.yml",
        "kubernetes/deployment.yaml",
        "kubernetes/kustomization.yaml",
        "prometheus/alerts.yml",
        "prometheus/alerts.test.yml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "deploy/{expected} not found among {names:?}"
        );
    }
    for (path, name) in files.iter().zip(&names) {
        let docs = load_yaml(path);
        assert!(!docs.is_empty(), "{name}: no YAML document");
        for (i, doc) in docs.iter().enumerate() {
            assert!(
                doc.as_hash().is_some_and(|map| !map.is_empty()),
                "{name}: document {i} is not a non-empty mapping: {doc:?}"
            );
            if name.starts_with("kubernetes/") {
                for field in ["apiVersion", "kind"] {
                    assert!(
                        doc[field].as_str().is_some(),
                        "{name}: document {i} has no {field}"
                    );
                }
                if doc["kind"].as_str() != Some("Kustomization") {
                    assert!(
                        doc["metadata"]["name"].as_str().is_some(),
                        "{name}: document {i} has no metadata.name"
                    );
                }
            }
        }
    }
}

#[test]
fn files_the_manifests_point_to_exist() {
    let kustomization = &load_yaml(&deploy("kubernetes/kustomization.yaml"))[0];
    let resources = kustomization["resources"]
        .as_vec()
        .expect("kustomization resources");
    assert!(!resources.is_empty());
    for resource in resources {
        let file = resource.as_str().expect("resource path");
        assert!(
            deploy("kubernetes").join(file).is_file(),
            "kustomization.yaml lists {file}, which does not exist"
        );
    }

    // Compose bind mounts are relative to deploy/.
    let compose = &load_yaml(&deploy("docker-compose.yml"))[0];
    let services = compose["services"].as_hash().expect("compose services");
    let mut mounts = 0;
    for (name, service) in services {
        let Some(volumes) = service["volumes"].as_vec() else {
            continue;
        };
        for volume in volumes {
            let spec = volume.as_str().expect("short volume syntax");
            if let Some(source) = spec.split(':').next().filter(|s| s.starts_with("./")) {
                mounts += 1;
                assert!(
                    deploy(source).exists(),
                    "compose service {name:?} mounts {source}, which does not exist under deploy/"
                );
            }
        }
    }
    assert!(
        mounts >= 4,
        "expected the compose bind mounts, found {mounts}"
    );

    // Prometheus resolves rule_files against the config file's directory.
    let prometheus = &load_yaml(&deploy("compose/prometheus.yml"))[0];
    for rule_file in prometheus["rule_files"].as_vec().expect("rule_files") {
        let file = rule_file.as_str().expect("rule file path");
        assert!(
            deploy("compose").join(file).is_file(),
            "compose/prometheus.yml loads {file}, which does not exist"
        );
    }
}

/// Parses `text` as the gateway would, with every `${VAR}` set: each variable expands to a
/// scratch directory path (a non-empty value, so also a valid secret), and the files that
/// `*_file` settings name as `${VAR}/name` (systemd's `${CREDENTIALS_DIRECTORY}/…`) are
/// created in it.
fn parse_leniently(name: &str, text: &str) -> Config {
    let scratch = tempfile::tempdir().expect("temp dir");
    let root = scratch.path().display().to_string();
    let tree: toml::Table = text
        .parse()
        .unwrap_or_else(|err| panic!("{name} is not valid TOML: {err}"));
    fn create_files(value: &toml::Value, key: &str, root: &Path) {
        match value {
            toml::Value::String(text) if key.ends_with("_file") => {
                if let Some((_, file)) = text.strip_prefix("${").and_then(|r| r.split_once('}')) {
                    let path = root.join(file.trim_start_matches('/'));
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(&path, "placeholder-secret\n").unwrap();
                }
            }
            toml::Value::Table(table) => {
                for (key, item) in table {
                    create_files(item, key, root);
                }
            }
            toml::Value::Array(items) => {
                items.iter().for_each(|item| create_files(item, key, root))
            }
            _ => {}
        }
    }
    create_files(&toml::Value::Table(tree), "", scratch.path());
    let env = |_: &str| Some(root.clone());
    Config::from_toml(text, &env).unwrap_or_else(|err| panic!("{name}: {err}"))
}

/// The gatehouse config embedded in the Kubernetes ConfigMap.
fn configmap_config() -> String {
    let docs = load_yaml(&deploy("kubernetes/configmap.yaml"));
    docs.iter()
        .find(|doc| doc["kind"].as_str() == Some("ConfigMap"))
        .and_then(|doc| doc["data"]["config.toml"].as_str())
        .expect("configmap.yaml: a ConfigMap with data.config.toml")
        .to_string()
}

#[test]
fn every_config_in_the_kit_validates() {
    let compose = parse_leniently(
        "deploy/compose/gatehouse.toml",
        &read(&deploy("compose/gatehouse.toml")),
    );
    let kubernetes = parse_leniently("deploy/kubernetes/configmap.yaml", &configmap_config());
    let systemd = parse_leniently(
        "deploy/systemd/config.toml",
        &read(&deploy("systemd/config.toml")),
    );
    for (name, config) in [
        ("compose", &compose),
        ("kubernetes", &kubernetes),
        ("systemd", &systemd),
    ] {
        assert!(!config.keys.is_empty(), "{name}: no [[keys]]");
        assert!(
            config.server.metrics_listen.is_some(),
            "{name}: the alert rules and scrape configs expect a separate metrics listener"
        );
        // The ledger must be on the persistent volume / state directory of each setup.
        assert_eq!(
            config.store.path,
            Path::new("/var/lib/gatehouse/ledger.db"),
            "{name}: store.path"
        );
        // Each setup gives the process more time to stop than the drain takes.
        assert!(config.server.shutdown_grace_ms <= 30_000, "{name}");
    }
    // The README gives the compose demo key in plain text; the config holds its hash.
    assert_eq!(
        compose.keys[0].key_sha256,
        Some(
            hex::decode(gatehouse::auth::hash_key("gh-compose-demo-key-local-only"))
                .unwrap()
                .try_into()
                .unwrap()
        ),
        "compose/gatehouse.toml's demo key is not the README's gh-compose-demo-key-local-only"
    );
}

#[test]
fn published_and_scraped_ports_match_the_configs() {
    // Kubernetes: containerPorts, the Prometheus annotation and the Service match the config.
    let config = parse_leniently("deploy/kubernetes/configmap.yaml", &configmap_config());
    let listen = config.server.listen.port() as i64;
    let metrics = config.server.metrics_listen.expect("metrics_listen").port() as i64;
    let deployment = &load_yaml(&deploy("kubernetes/deployment.yaml"))[0];
    let pod = &deployment["spec"]["template"];
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"].as_str(),
        Some(metrics.to_string().as_str()),
        "prometheus.io/port vs metrics_listen"
    );
    let container = &pod["spec"]["containers"][0];
    let port = |name: &str| {
        container["ports"]
            .as_vec()
            .expect("container ports")
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_i64())
    };
    assert_eq!(
        port("http"),
        Some(listen),
        "containerPort http vs server.listen"
    );
    assert_eq!(
        port("metrics"),
        Some(metrics),
        "containerPort metrics vs server.metrics_listen"
    );
    let args: Vec<&str> = container["args"]
        .as_vec()
        .expect("args")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(
        args,
        [
            "serve",
            "--config",
            "/etc/gatehouse/config.toml",
            "--log-format",
            "json"
        ]
    );

    // Compose: Prometheus scrapes the gateway's metrics port; the published ports exist.
    let config = parse_leniently(
        "deploy/compose/gatehouse.toml",
        &read(&deploy("compose/gatehouse.toml")),
    );
    let listen = config.server.listen.port();
    let metrics = config.server.metrics_listen.expect("metrics_listen").port();
    let prometheus = &load_yaml(&deploy("compose/prometheus.yml"))[0];
    let gatehouse_job = prometheus["scrape_configs"]
        .as_vec()
        .expect("scrape_configs")
        .iter()
        .find(|job| job["job_name"].as_str() == Some("gatehouse"))
        .expect("a scrape job named gatehouse (GatehouseDown matches job=\"gatehouse\")");
    let targets: Vec<&str> = gatehouse_job["static_configs"][0]["targets"]
        .as_vec()
        .expect("targets")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(targets, [format!("gatehouse:{metrics}")]);
    let compose = &load_yaml(&deploy("docker-compose.yml"))[0];
    let published: Vec<u16> = compose["services"]["gatehouse"]["ports"]
        .as_vec()
        .expect("gatehouse ports")
        .iter()
        .filter_map(Yaml::as_str)
        .filter_map(|spec| spec.rsplit(':').next()?.parse().ok())
        .collect();
    assert_eq!(published, [listen, metrics], "compose gatehouse ports");
}
