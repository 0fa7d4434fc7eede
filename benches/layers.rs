//! What each layer of the request path costs on its own, and the whole stack in-process.
//!
//! Run: `cargo bench --bench layers` (all, a few minutes on 2 cores), or a filter:
//! `cargo bench --bench layers -- auth/` ; `-- --quick` for a fast, rough pass.
//!
//! Groups:
//! - `auth`: `Authenticator::authenticate` for an API key (1 and 1000 keys configured; the
//!   key table is a constant-time scan, so the cost grows with the number of keys) and for
//!   JWTs (HS256, ES256, RS256) with the test fixtures in `tests/fixtures/jwt/`;
//! - `ratelimit`: `RateLimiters::check` for one configured key, and cycling through 100k
//!   distinct JWT principals that share the `[defaults]` keyed limiter;
//! - `validate`: `validate::validate_generate` on a typical body and on prompts exactly at
//!   `max_prompt_chars` (ASCII and CJK);
//! - `ledger`: `Store::reserve` + `Store::attach` on a durable SQLite file (WAL, synchronous
//!   = FULL, so one fsync per transaction) in a tempdir, and on an in-memory database for
//!   comparison (the difference is the cost of durability);
//! - `full_stack`: `Gateway::service()` called in-process (no client socket) with a generate
//!   and a feed that cross a real loopback socket to an in-process `MockUpstream`, and
//!   `/healthz`, which never leaves the gateway (the fixed cost of observe/limits/route).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gatehouse::auth::{hash_key, Authenticator, CredentialKind, Principal};
use gatehouse::body;
use gatehouse::config::{Config, KeyPolicy, QuotaPeriod, ValidationConfig};
use gatehouse::mock_upstream::{MockConfig, MockUpstream};
use gatehouse::points::Points;
use gatehouse::quota::{NewReservation, PeriodKey, SqliteStore, Store};
use gatehouse::ratelimit::RateLimiters;
use gatehouse::server::Gateway;
use gatehouse::validate::validate_generate;
use http::{HeaderMap, Request};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

const UPSTREAM_TOKEN: &str = "bench-upstream-token";
const API_KEY: &str = "gh-bench-key-0123456789abcdef0123456789";
const HS_SECRET: &str = "bench-only-hmac-secret-of-32-bytes!!";

/// The upstream's own example body (docs/upstream-api.md).
const GENERATE_EXAMPLE: &str = r#"{"callback_url":"http://example.com/hook","ratio":"16:9","prompt":"一只小猫","style":"cinematic","model":"gen3","options":{"seconds":10,"motion_vector":{"x":0,"y":0.4,"z":0,"r":-6,"bg_x_pan":0,"bg_y_pan":0}}}"#;

/// Short runs so that the whole bench finishes in a few minutes on 2 shared cores.
fn group_settings<M: criterion::measurement::Measurement>(
    group: &mut criterion::BenchmarkGroup<'_, M>,
) {
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn parse(text: &str) -> Config {
    Config::from_toml(text, &|_: &str| -> Option<String> { None })
        .unwrap_or_else(|err| panic!("bench config invalid: {err}"))
}

/// A config with `n_keys` API keys (the last one is `API_KEY`) plus `extra` TOML.
fn config_with_keys(n_keys: usize, extra: &str) -> Config {
    let mut text = format!(
        r#"
[upstream]
base_url = "http://127.0.0.1:9"
token = "{UPSTREAM_TOKEN}"
rate_per_second = 1000000000
burst = 1000000000

[defaults]
rate_per_second = 1000000000
burst = 1000000000

{extra}
"#
    );
    for i in 0..n_keys {
        let key = if i + 1 == n_keys {
            API_KEY.to_string()
        } else {
            format!("other-key-{i:06}-padding-padding")
        };
        text.push_str(&format!(
            "\n[[keys]]\nid = \"key-{i}\"\nkey_sha256 = \"{}\"\nrate_per_second = 1000000000\nburst = 1000000000\n",
            hash_key(&key)
        ));
    }
    parse(&text)
}

fn bearer(credential: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {credential}").parse().unwrap(),
    );
    headers
}

fn now_s() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

fn sign(alg: Algorithm, key: &EncodingKey) -> String {
    let claims = serde_json::json!({
        "sub": "bench-user",
        "iss": "https://sso.bench",
        "aud": "gatehouse",
        "iat": now_s(),
        "exp": now_s() + 24 * 3600,
    });
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

fn jwt_authenticator(section: &str) -> Authenticator {
    Authenticator::from_config(&config_with_keys(1, section)).unwrap()
}

fn bench_auth(c: &mut Criterion) {
    let mut group = c.benchmark_group("auth");
    group_settings(&mut group);

    for n in [1usize, 1000] {
        let auth = Authenticator::from_config(&config_with_keys(n, "")).unwrap();
        let headers = bearer(API_KEY);
        assert_eq!(
            auth.authenticate(&headers).unwrap().key_id,
            format!("key-{}", n - 1)
        );
        group.bench_with_input(BenchmarkId::new("api_key", n), &headers, |b, headers| {
            b.iter(|| auth.authenticate(black_box(headers)).unwrap())
        });
    }

    let hs = jwt_authenticator(&format!(
        "[auth.jwt]\nalgorithms = [\"HS256\"]\nsecret = \"{HS_SECRET}\"\nissuer = \"https://sso.bench\"\naudience = \"gatehouse\"\n"
    ));
    let hs_token = bearer(&sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(HS_SECRET.as_bytes()),
    ));
    let asym = |alg: &str, public: &str| {
        jwt_authenticator(&format!(
            "[auth.jwt]\nalgorithms = [\"{alg}\"]\npublic_key_file = \"{}\"\nissuer = \"https://sso.bench\"\naudience = \"gatehouse\"\n",
            fixture(public)
        ))
    };
    let es = asym("ES256", "ec_p256_test_public.pem");
    let es_token = bearer(&sign(
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(&std::fs::read(fixture("ec_p256_test_private.pem")).unwrap())
            .unwrap(),
    ));
    let rs = asym("RS256", "rsa_test_public.pem");
    let rs_token = bearer(&sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_test_private.pem")).unwrap())
            .unwrap(),
    ));
    for (name, auth, headers) in [
        ("jwt_hs256", &hs, &hs_token),
        ("jwt_es256", &es, &es_token),
        ("jwt_rs256", &rs, &rs_token),
    ] {
        let principal = auth.authenticate(headers).unwrap();
        assert_eq!(principal.credential, CredentialKind::Jwt);
        assert_eq!(principal.key_id, "bench-user");
        group.bench_function(name, |b| {
            b.iter(|| auth.authenticate(black_box(headers)).unwrap())
        });
    }
    group.finish();
}

fn bench_ratelimit(c: &mut Criterion) {
    let mut group = c.benchmark_group("ratelimit");
    group_settings(&mut group);
    let config = config_with_keys(1, "");
    let limiters = RateLimiters::new(&config);
    let policy = Arc::new(config.keys[0].policy.clone());
    let configured = Principal {
        key_id: config.keys[0].id.clone(),
        metrics_label: config.keys[0].id.clone(),
        policy: policy.clone(),
        credential: CredentialKind::ApiKey,
    };
    group.bench_function("one_key", |b| {
        b.iter(|| limiters.check(black_box(&configured)).unwrap())
    });

    const DISTINCT: usize = 100_000;
    let defaults = Arc::new(KeyPolicy {
        rate_per_second: 1e9,
        burst: 1_000_000_000,
        ..KeyPolicy::default()
    });
    let principals: Vec<Principal> = (0..DISTINCT)
        .map(|i| Principal {
            key_id: format!("jwt-subject-{i:06}"),
            metrics_label: gatehouse::auth::UNLISTED_JWT_LABEL.to_string(),
            policy: defaults.clone(),
            credential: CredentialKind::Jwt,
        })
        .collect();
    // Every subject is already tracked, as on a busy gateway between two evictions.
    for principal in &principals {
        limiters.check(principal).unwrap();
    }
    assert_eq!(limiters.tracked_keys(), DISTINCT);
    let mut next = 0usize;
    group.bench_function("jwt_100k_distinct", |b| {
        b.iter(|| {
            // A stride coprime to 100k visits every subject in a cache-unfriendly order.
            next = (next + 7919) % DISTINCT;
            limiters.check(black_box(&principals[next])).unwrap()
        })
    });
    group.finish();
}

fn generate_body(prompt: &str) -> Vec<u8> {
    serde_json::json!({
        "callback_url": "https://team.example/hooks/runway?id=42",
        "ratio": "16:9",
        "prompt": prompt,
        "style": "cinematic",
        "model": "gen3",
        "options": {
            "seconds": 10,
            "motion_vector": {"x": 0, "y": 0.4, "z": 0, "r": -6, "bg_x_pan": 0, "bg_y_pan": 0}
        }
    })
    .to_string()
    .into_bytes()
}

fn bench_validate(c: &mut Criterion) {
    let mut group = c.benchmark_group("validate");
    group_settings(&mut group);
    let rules = ValidationConfig::default();
    let max = rules.max_prompt_chars;
    let cases = [
        ("typical", GENERATE_EXAMPLE.as_bytes().to_vec()),
        ("max_prompt_ascii", generate_body(&"a".repeat(max))),
        ("max_prompt_cjk", generate_body(&"猫".repeat(max))),
    ];
    for (name, body) in &cases {
        validate_generate(body, &rules).unwrap_or_else(|err| panic!("{name}: {err}"));
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), body, |b, body| {
            b.iter(|| validate_generate(black_box(body), &rules).unwrap())
        });
    }
    group.finish();
}

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

fn bench_ledger(c: &mut Criterion) {
    let mut group = c.benchmark_group("ledger");
    group_settings(&mut group);
    let rt = runtime(2);
    let dir = tempfile::tempdir().unwrap();
    let stores: [(&str, SqliteStore); 2] = [
        (
            "reserve_attach_sqlite_file",
            SqliteStore::open(&dir.path().join("ledger.db")).unwrap(),
        ),
        (
            "reserve_attach_sqlite_memory",
            SqliteStore::open_in_memory().unwrap(),
        ),
    ];
    let mut n = 0u64;
    for (name, store) in &stores {
        group.bench_function(*name, |b| {
            b.to_async(&rt).iter(|| {
                n += 1;
                let reservation = NewReservation {
                    key_id: "team-video".to_string(),
                    period: PeriodKey::at(QuotaPeriod::Monthly, now_s()),
                    // Large enough never to refuse, but present so the quota check runs.
                    quota: Some(Points::from_whole(1_000_000_000_000)),
                    price: Points::from_whole(320),
                    callback_token: Some(format!("{n:032x}")),
                    caller_callback_url: Some("https://team.example/hook".to_string()),
                    route: "runway_generate".to_string(),
                    model: Some("gen3".to_string()),
                    seconds: Some(10),
                    now: now_s(),
                };
                let task_id = format!("bench-task-{n}");
                async move {
                    let id = store.reserve(reservation).await.unwrap();
                    store.attach(id, &task_id, now_s()).await.unwrap()
                }
            })
        });
    }
    group.finish();
    // `rt` first: no ledger job may still run when the tempdir goes.
    drop(rt);
    drop(stores);
    drop(dir);
}

fn bench_full_stack(c: &mut Criterion) {
    let mut group = c.benchmark_group("full_stack");
    group_settings(&mut group);
    let rt = runtime(2);
    let dir = tempfile::tempdir().unwrap();
    let mock = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        MockUpstream::start(
            listener,
            MockConfig {
                token: UPSTREAM_TOKEN.to_string(),
                // Tasks stay queued: no timers or callbacks compete with the measurement.
                auto_progress: false,
                send_callbacks: false,
                feed_not_exist_first: 0,
                max_recorded: 0,
                ..MockConfig::default()
            },
        )
        .await
    });
    let config = parse(&format!(
        r#"
[server]
listen = "127.0.0.1:0"
public_url = "http://gatehouse.bench"

[upstream]
base_url = "{upstream}"
token = "{UPSTREAM_TOKEN}"
rate_per_second = 1000000000
burst = 1000000000

[store]
path = "{store}"

[[keys]]
id = "bench"
key_sha256 = "{hash}"
rate_per_second = 1000000000
burst = 1000000000
quota_points = 1000000000000
quota_period = "monthly"
"#,
        upstream = mock.base_url(),
        store = dir.path().join("ledger.db").display(),
        hash = hash_key(API_KEY),
    ));
    let gateway = Gateway::new(config).unwrap();
    let service = gateway.service();
    let authorization = format!("Bearer {API_KEY}");

    let generate = || {
        Request::post("/runway/pro/generate")
            .header("authorization", &authorization)
            .header("content-type", "application/json")
            .body(body::full(GENERATE_EXAMPLE))
            .unwrap()
    };
    let call = |request: Request<body::Body>| {
        let service = service.clone();
        async move {
            let response = service.oneshot(request).await.unwrap();
            let status = response.status();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            assert!(
                status.is_success(),
                "{status}: {}",
                String::from_utf8_lossy(&bytes)
            );
            bytes
        }
    };

    // One task to feed; also proves the path works before anything is measured.
    let submitted = rt.block_on(call(generate()));
    let submitted: serde_json::Value = serde_json::from_slice(&submitted).unwrap();
    let task_id = submitted["data"]["task_id"]
        .as_str()
        .unwrap_or_else(|| panic!("generate answered without a task id: {submitted}"))
        .to_string();
    let feed_body = serde_json::json!({ "task_id": task_id }).to_string();

    group.bench_function("generate", |b| b.to_async(&rt).iter(|| call(generate())));
    group.bench_function("feed", |b| {
        b.to_async(&rt).iter(|| {
            call(
                Request::post("/runway/feed")
                    .header("authorization", &authorization)
                    .header("content-type", "application/json")
                    .body(body::full(feed_body.clone()))
                    .unwrap(),
            )
        })
    });
    group.bench_function("healthz", |b| {
        b.to_async(&rt)
            .iter(|| call(Request::get("/healthz").body(body::empty()).unwrap()))
    });
    group.finish();
    drop(service);
    drop(gateway);
    rt.block_on(mock.shutdown());
}

criterion_group!(
    layers,
    bench_auth,
    bench_ratelimit,
    bench_validate,
    bench_ledger,
    bench_full_stack
);
criterion_main!(layers);
