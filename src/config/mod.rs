//! The configuration file: parsed once, validated once, then read-only.
//!
//! Loading goes text → TOML tree → `${ENV}` expansion → one section at a time into
//! plain structs → cross-field validation. Each step collects problems instead of
//! stopping at the first, so `gatehouse check` can list everything wrong with a file
//! in one go, and every message names the setting (`keys[1].quota_period: …`).
//!
//! Secrets are `Secret` values: they print as `***` in `Debug`, and come from
//! `${ENV_VAR}` or a `*_file` path in real deployments.

mod routes;

pub use routes::{
    RouteConfig, RouteKindConfig, TaskRole, TaskRouteConfig, TokenPricing, TokenRates,
};

use crate::points::Points;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The example configuration shipped with the repository, used when no file is given.
pub const EMBEDDED_CONFIG: &str = include_str!("../../config.toml");

/// A value that must not be printed: tokens, secrets.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub auth: AuthConfig,
    pub defaults: KeyPolicy,
    pub keys: Vec<KeyConfig>,
    pub validation: ValidationConfig,
    pub store: StoreConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub prices: PriceTable,
    pub reconciler: ReconcilerConfig,
    pub callbacks: CallbacksConfig,
    /// The route table, first match wins; the Runway routes alone when the file has none.
    pub routes: Vec<RouteConfig>,
    /// Short hash of the file's contents (before `${ENV}` expansion, so it reveals no
    /// secret): shows in metrics which version of the file is live.
    pub source_hash: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the gateway listens on.
    pub listen: SocketAddr,
    /// The URL under which the upstream can reach this gateway (for callbacks).
    pub public_url: String,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Time limit for a whole request through the gateway.
    pub request_timeout_ms: u64,
    /// Optional separate address for `/metrics`; when unset, `/metrics` is on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_grace_ms: u64,
    /// On shutdown, how long `/readyz` answers 503 while new requests are still accepted,
    /// so load balancers stop sending traffic before the listener closes.
    pub drain_delay_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".parse().expect("literal address"),
            public_url: "http://127.0.0.1:8080".to_string(),
            max_body_bytes: 1024 * 1024,
            request_timeout_ms: 120_000,
            metrics_listen: None,
            shutdown_grace_ms: 30_000,
            drain_delay_ms: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    pub base_url: String,
    /// The single upstream Bearer token. Required (inline, `${ENV}` or `token_file`).
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
    pub connect_timeout_ms: u64,
    pub timeout_ms: u64,
    /// Global limit over all callers, protecting the shared upstream token.
    pub rate_per_second: f64,
    pub burst: u32,
    /// Idle pooled connections kept per upstream host.
    pub pool_max_idle: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            base_url: String::new(),
            token: None,
            token_file: None,
            connect_timeout_ms: 3_000,
            timeout_ms: 60_000,
            rate_per_second: 100.0,
            burst: 200,
            pool_max_idle: 256,
        }
    }
}

impl UpstreamConfig {
    /// The resolved token. Validation guarantees it is set.
    pub fn token(&self) -> &Secret {
        self.token
            .as_ref()
            .expect("validated config always has upstream.token")
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub jwt: Option<JwtConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Accepted algorithms, e.g. ["HS256"] or ["RS256", "ES256"]. HS* and asymmetric
    /// algorithms cannot be mixed: that is how algorithm confusion attacks work.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// Shared secret for HS256/384/512.
    pub secret: Option<Secret>,
    pub secret_file: Option<PathBuf>,
    /// PEM public key for RS*/PS*/ES*/EdDSA.
    pub public_key_file: Option<PathBuf>,
    /// Extra PEM public keys selected by the token's `kid` header.
    #[serde(default)]
    pub kid_keys: Vec<JwtKidKey>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The claim whose value is the principal's key id.
    #[serde(default = "default_key_claim")]
    pub key_claim: String,
    #[serde(default = "default_leeway_s")]
    pub leeway_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKidKey {
    pub kid: String,
    pub public_key_file: PathBuf,
}

fn default_key_claim() -> String {
    "sub".to_string()
}

fn default_leeway_s() -> u64 {
    30
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaPeriod {
    Daily,
    Monthly,
    None,
}

impl QuotaPeriod {
    pub fn label(self) -> &'static str {
        match self {
            QuotaPeriod::Daily => "daily",
            QuotaPeriod::Monthly => "monthly",
            QuotaPeriod::None => "none",
        }
    }
}

/// Limits and quota that apply to one principal.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyPolicy {
    pub rate_per_second: f64,
    pub burst: u32,
    /// Points allowed per period; absent means unlimited.
    pub quota_points: Option<Points>,
    pub quota_period: QuotaPeriod,
    /// Models this key may use on routes that name a model (absent: any model).
    pub allowed_models: Option<Vec<String>>,
    /// Signs callbacks delivered to this key's `callback_url`.
    pub callback_secret: Option<Secret>,
    pub callback_secret_file: Option<PathBuf>,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        KeyPolicy {
            rate_per_second: 5.0,
            burst: 10,
            quota_points: None,
            quota_period: QuotaPeriod::None,
            allowed_models: None,
            callback_secret: None,
            callback_secret_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeyConfig {
    /// The key's name: in logs, metrics, the ledger. Not secret.
    pub id: String,
    /// SHA-256 of the API key; absent for keys that only authenticate by JWT.
    pub key_sha256: Option<[u8; 32]>,
    pub policy: KeyPolicy,
}

/// A `[[keys]]` entry before validation. The policy fields are read separately
/// (serde cannot deny unknown fields through `flatten`).
#[derive(Debug, Clone)]
struct RawKey {
    id: String,
    key_sha256: Option<String>,
    policy: KeyPolicy,
}

#[derive(Deserialize)]
struct RawKeyIdentity {
    id: String,
    key_sha256: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownFields {
    Reject,
    Drop,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationConfig {
    pub unknown_fields: UnknownFields,
    pub max_prompt_chars: usize,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            unknown_fields: UnknownFields::Reject,
            max_prompt_chars: 2000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite file of the point ledger.
    pub path: PathBuf,
    /// When a ledger write counts as done: `full` (fsync per commit: survives power loss)
    /// or `normal` (survives a crash of the gateway process, not of the machine; much faster).
    pub synchronous: Synchronous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    #[default]
    Full,
    Normal,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("gatehouse.db"),
            synchronous: Synchronous::Full,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer token for `/admin/*`; the admin API is off when unset.
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// The models and video lengths `POST /runway/pro/generate` accepts (upstream-api.md).
pub const RUNWAY_MODELS: &[&str] = &["gen2", "gen3"];
pub const RUNWAY_SECONDS: &[u32] = &[5, 10];

/// Points reserved per request, before the upstream says what a task really cost.
///
/// ```toml
/// [prices.runway_generate]
/// default = 320            # optional: any combination not listed
/// gen3 = { 5 = 160, 10 = 320 }
/// gen2 = { 5 = 100, 10 = 200 }
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable {
    runway_generate: std::collections::BTreeMap<(String, u32), Points>,
    runway_generate_default: Option<Points>,
}

impl PriceTable {
    /// The reservation for one generate; validation guarantees every allowed combination has one.
    pub fn runway_generate(&self, model: &str, seconds: u32) -> Option<Points> {
        self.runway_generate
            .get(&(model.to_string(), seconds))
            .copied()
            .or(self.runway_generate_default)
    }

    /// Used when the file has no `[prices]`: the upstream's observed prices
    /// (gen3: 320 points for 10 s; the rest in proportion).
    fn builtin() -> PriceTable {
        let mut table = PriceTable::default();
        for (model, seconds, points) in [
            ("gen3", 5, 160),
            ("gen3", 10, 320),
            ("gen2", 5, 100),
            ("gen2", 10, 200),
        ] {
            table
                .runway_generate
                .insert((model.to_string(), seconds), Points::from_whole(points));
        }
        table
    }

    fn from_tree(value: Option<&toml::Value>, problems: &mut Vec<String>) -> PriceTable {
        let mut table = PriceTable::default();
        let Some(value) = value else {
            return PriceTable::builtin();
        };
        let Some(prices) = value.as_table() else {
            problems.push("prices: expected a table".to_string());
            return table;
        };
        for name in prices.keys() {
            if name != "runway_generate" {
                problems.push(format!(
                    "prices.{name}: unknown setting; expected runway_generate"
                ));
            }
        }
        let Some(runway) = prices
            .get("runway_generate")
            .and_then(toml::Value::as_table)
        else {
            problems.push(
                "prices.runway_generate: expected a table, e.g. gen3 = { 5 = 160, 10 = 320 }"
                    .to_string(),
            );
            return table;
        };
        for (model, entry) in runway {
            let at = format!("prices.runway_generate.{model}");
            if model == "default" {
                table.runway_generate_default = deserialize_at::<Points>(entry, &at, problems);
                continue;
            }
            if !RUNWAY_MODELS.contains(&model.as_str()) {
                problems.push(format!(
                    "{at}: unknown model; expected default or one of {}",
                    RUNWAY_MODELS.join(", ")
                ));
                continue;
            }
            let Some(by_seconds) = entry.as_table() else {
                problems.push(format!("{at}: expected a table of seconds = points"));
                continue;
            };
            for (seconds, points) in by_seconds {
                let at = format!("{at}.{seconds}");
                match seconds.parse::<u32>() {
                    Ok(secs) if RUNWAY_SECONDS.contains(&secs) => {
                        if let Some(points) = deserialize_at::<Points>(points, &at, problems) {
                            table.runway_generate.insert((model.clone(), secs), points);
                        }
                    }
                    _ => problems.push(format!("{at}: seconds must be one of 5, 10")),
                }
            }
        }
        for model in RUNWAY_MODELS {
            for seconds in RUNWAY_SECONDS {
                if table.runway_generate(model, *seconds).is_none() {
                    problems.push(format!(
                        "prices.runway_generate.{model}.{seconds}: missing price (and no default)"
                    ));
                }
            }
        }
        table
    }
}

/// The background task that settles tasks nobody reported on (no callback, no feed).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcilerConfig {
    /// How often it looks for pending tasks.
    pub interval_s: u64,
    /// A task pending this long is polled with /runway/feed.
    pub reconcile_after_s: u64,
    /// A task pending this long is reported as stuck (it stays reserved for a human).
    pub max_pending_s: u64,
    /// Feeds in flight at once.
    pub concurrency: usize,
    /// A reservation with no upstream answer recorded this long is released (the gateway
    /// died mid-submit). Unset: `upstream.timeout_ms` plus a minute, when no submit can
    /// still be in flight.
    pub stale_reservation_after_s: Option<u64>,
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        ReconcilerConfig {
            interval_s: 15,
            reconcile_after_s: 120,
            max_pending_s: 6 * 3600,
            concurrency: 4,
            stale_reservation_after_s: None,
        }
    }
}

/// Delivery of task callbacks to the callers' own `callback_url`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallbacksConfig {
    /// Hosts a caller's callback_url may point to (`*.example.com` matches subdomains);
    /// empty allows any host.
    pub allowed_hosts: Vec<String>,
    /// Delivery attempts before a callback is marked dead.
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub delivery_timeout_ms: u64,
    /// Largest callback body accepted from the upstream.
    pub max_body_bytes: usize,
    /// Check a terminal callback against `/runway/feed` before settling (one upstream
    /// request per finished task); a callback that contradicts the upstream's record is refused.
    pub verify_terminal: bool,
}

impl ReconcilerConfig {
    /// See `stale_reservation_after_s`.
    pub fn stale_reservation_after_s(&self, upstream: &UpstreamConfig) -> u64 {
        self.stale_reservation_after_s
            .unwrap_or(upstream.timeout_ms.div_ceil(1000) + 60)
    }
}

impl Default for CallbacksConfig {
    fn default() -> Self {
        CallbacksConfig {
            allowed_hosts: Vec::new(),
            max_attempts: 8,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 300_000,
            delivery_timeout_ms: 10_000,
            max_body_bytes: 256 * 1024,
            verify_terminal: true,
        }
    }
}

impl CallbacksConfig {
    pub fn host_allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.allowed_hosts.is_empty()
            || self.allowed_hosts.iter().any(|allowed| {
                let allowed = allowed.to_ascii_lowercase();
                match allowed.strip_prefix("*.") {
                    Some(domain) => host.ends_with(&format!(".{domain}")),
                    None => host == allowed,
                }
            })
    }
}

/// Everything wrong with a configuration, one line per problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

/// Where `${NAME}` values come from. Tests pass a closure instead of the process environment.
pub trait EnvLookup {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl EnvLookup for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> EnvLookup for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

const SECTIONS: &[&str] = &[
    "server",
    "upstream",
    "auth",
    "defaults",
    "keys",
    "validation",
    "store",
    "admin",
    "log",
    "prices",
    "reconciler",
    "callbacks",
    "routes",
];

impl Config {
    /// Reads and validates a config file. Relative `*_file` paths are relative to the file.
    pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
            problems: vec![format!("cannot read {}: {err}", path.display())],
        })?;
        Config::from_toml(&text, &ProcessEnv)
    }

    /// Parses and validates config text; `env` resolves `${NAME}` references.
    pub fn from_toml(text: &str, env: &dyn EnvLookup) -> Result<Config, ConfigError> {
        let mut tree: toml::Table = text.parse().map_err(|err: toml::de::Error| ConfigError {
            problems: vec![syntax_problem(text, &err)],
        })?;
        Config::from_table(&mut tree, env)
    }

    /// Validates an already parsed TOML tree (the demo mode edits the tree first).
    pub fn from_table(tree: &mut toml::Table, env: &dyn EnvLookup) -> Result<Config, ConfigError> {
        let source_hash = {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(tree.to_string().as_bytes());
            hex::encode(&digest[..6])
        };
        let mut problems = Vec::new();
        for name in tree.keys() {
            if !SECTIONS.contains(&name.as_str()) {
                problems.push(format!(
                    "{name}: unknown setting; expected one of {}",
                    SECTIONS.join(", ")
                ));
            }
        }
        for (name, value) in tree.iter_mut() {
            expand_env(value, name, env, &mut problems);
        }

        let server: ServerConfig = section(tree, "server", &mut problems);
        let upstream: UpstreamConfig = section(tree, "upstream", &mut problems);
        let auth: AuthConfig = section(tree, "auth", &mut problems);
        let defaults: KeyPolicy = section(tree, "defaults", &mut problems);
        let validation: ValidationConfig = section(tree, "validation", &mut problems);
        let store: StoreConfig = section(tree, "store", &mut problems);
        let admin: AdminConfig = section(tree, "admin", &mut problems);
        let log: LogConfig = section(tree, "log", &mut problems);
        let reconciler: ReconcilerConfig = section(tree, "reconciler", &mut problems);
        let callbacks: CallbacksConfig = section(tree, "callbacks", &mut problems);
        let prices = PriceTable::from_tree(tree.get("prices"), &mut problems);
        let routes = routes::from_tree(tree.get("routes"), &mut problems);
        let default_policy = tree.get("defaults").and_then(toml::Value::as_table);
        let raw_keys: Vec<(usize, RawKey)> = match tree.get("keys") {
            None => Vec::new(),
            Some(toml::Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    raw_key(item, default_policy, &format!("keys[{i}]"), &mut problems)
                        .map(|key| (i, key))
                })
                .collect(),
            Some(_) => {
                problems.push("keys: expected an array of tables ([[keys]])".to_string());
                Vec::new()
            }
        };

        let mut config = Config {
            server,
            upstream,
            auth,
            defaults,
            keys: Vec::new(),
            validation,
            store,
            admin,
            log,
            prices,
            reconciler,
            callbacks,
            routes,
            source_hash,
        };
        config.keys = validate_keys(raw_keys, &mut problems);
        config.validate(&mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Cross-field checks and secret resolution; appends to `problems`.
    fn validate(&mut self, problems: &mut Vec<String>) {
        let s = &self.server;
        if url::Url::parse(&s.public_url)
            .map(|u| !matches!(u.scheme(), "http" | "https"))
            .unwrap_or(true)
        {
            problems.push(format!(
                "server.public_url: expected an http(s) URL, got {:?}",
                s.public_url
            ));
        }
        self.server.public_url = s.public_url.trim_end_matches('/').to_string();
        if self.server.max_body_bytes == 0 {
            problems.push("server.max_body_bytes: must be greater than 0".to_string());
        }
        if self.server.request_timeout_ms == 0 {
            problems.push("server.request_timeout_ms: must be greater than 0".to_string());
        }
        if self.server.metrics_listen == Some(self.server.listen) {
            problems.push(
                "server.metrics_listen: must differ from server.listen (leave it unset to serve /metrics on listen)"
                    .to_string(),
            );
        }

        let u = &mut self.upstream;
        match url::Url::parse(&u.base_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ if u.base_url.is_empty() => problems
                .push("upstream.base_url: required, e.g. \"https://api.example.com\"".to_string()),
            _ => problems.push(format!(
                "upstream.base_url: expected an http(s) URL, got {:?}",
                u.base_url
            )),
        }
        u.base_url = u.base_url.trim_end_matches('/').to_string();
        u.token = resolve_secret(
            u.token.take(),
            u.token_file.as_deref(),
            "upstream.token",
            true,
            problems,
        );
        if u.timeout_ms == 0 || u.connect_timeout_ms == 0 {
            problems.push(
                "upstream.timeout_ms / upstream.connect_timeout_ms: must be greater than 0"
                    .to_string(),
            );
        }
        check_rate("upstream", u.rate_per_second, u.burst, problems);

        if let Some(jwt) = self.auth.jwt.as_mut() {
            validate_jwt(jwt, problems);
        }

        check_policy("defaults", &mut self.defaults, problems);
        if self.validation.max_prompt_chars == 0 {
            problems.push("validation.max_prompt_chars: must be greater than 0".to_string());
        }
        self.admin.token = resolve_secret(
            self.admin.token.take(),
            self.admin.token_file.as_deref(),
            "admin.token",
            false,
            problems,
        );
        let r = &self.reconciler;
        if r.interval_s == 0 || r.concurrency == 0 {
            problems
                .push("reconciler.interval_s / concurrency: must be greater than 0".to_string());
        }
        if let Some(stale) = r.stale_reservation_after_s {
            // Releasing a reservation whose submit may still be in flight would leave a task
            // the reconciler never polls (attach keeps a released row released).
            let in_flight_s = self.upstream.timeout_ms.div_ceil(1000);
            if stale <= in_flight_s {
                problems.push(format!(
                    "reconciler.stale_reservation_after_s: must be longer than upstream.timeout_ms ({in_flight_s} s), got {stale}"
                ));
            }
        }
        if r.max_pending_s <= r.reconcile_after_s {
            problems.push(
                "reconciler.max_pending_s: must be greater than reconciler.reconcile_after_s"
                    .to_string(),
            );
        }
        let c = &self.callbacks;
        for (i, host) in c.allowed_hosts.iter().enumerate() {
            let name = host.strip_prefix("*.").unwrap_or(host);
            let plain = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
            if !plain {
                problems.push(format!(
                    "callbacks.allowed_hosts[{i}]: expected a host name like \"hooks.example.com\" or \"*.example.com\" (no scheme, port or path), got {host:?}"
                ));
            }
        }
        if c.max_attempts == 0 || c.initial_backoff_ms == 0 || c.delivery_timeout_ms == 0 {
            problems.push(
                "callbacks.max_attempts / initial_backoff_ms / delivery_timeout_ms: must be greater than 0"
                    .to_string(),
            );
        }
        if c.max_backoff_ms < c.initial_backoff_ms {
            problems.push(
                "callbacks.max_backoff_ms: must be at least callbacks.initial_backoff_ms"
                    .to_string(),
            );
        }
        if self.store.path.as_os_str().is_empty() {
            problems.push("store.path: must name a file".to_string());
        }
    }

    /// The key entry with this id, if configured.
    pub fn key(&self, id: &str) -> Option<&KeyConfig> {
        self.keys.iter().find(|key| key.id == id)
    }
}

/// Splits a `[[keys]]` table into identity and policy; unset policy fields come from `[defaults]`.
fn raw_key(
    item: &toml::Value,
    defaults: Option<&toml::Table>,
    at: &str,
    problems: &mut Vec<String>,
) -> Option<RawKey> {
    let Some(table) = item.as_table() else {
        problems.push(format!("{at}: expected a table"));
        return None;
    };
    let mut identity = toml::Table::new();
    let mut policy = defaults.cloned().unwrap_or_default();
    for (name, value) in table {
        match name.as_str() {
            "id" | "key_sha256" => identity.insert(name.clone(), value.clone()),
            _ => policy.insert(name.clone(), value.clone()),
        };
    }
    let identity: RawKeyIdentity = deserialize_at(&toml::Value::Table(identity), at, problems)?;
    let policy: KeyPolicy = deserialize_at(&toml::Value::Table(policy), at, problems)?;
    Some(RawKey {
        id: identity.id,
        key_sha256: identity.key_sha256,
        policy,
    })
}

fn validate_keys(raw_keys: Vec<(usize, RawKey)>, problems: &mut Vec<String>) -> Vec<KeyConfig> {
    let mut seen_ids = BTreeSet::new();
    let mut seen_hashes = BTreeSet::new();
    let mut keys = Vec::new();
    for (i, raw) in raw_keys {
        let at = format!("keys[{i}]");
        if raw.id.is_empty()
            || raw.id.starts_with('_')
            || !raw
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
        {
            // A leading '_' is reserved for gatehouse's own label values (`_jwt`).
            problems.push(format!(
                "{at}.id: expected letters, digits, '-', '_', '.' or '@', not starting with '_', got {:?}",
                raw.id
            ));
        }
        if !seen_ids.insert(raw.id.clone()) {
            problems.push(format!("{at}.id: duplicate key id {:?}", raw.id));
        }
        let key_sha256 = match raw.key_sha256.as_deref() {
            None => None,
            Some(text) => match decode_sha256(text) {
                Some(hash) => {
                    if !seen_hashes.insert(hash) {
                        problems.push(format!(
                            "{at}.key_sha256: the same key hash is configured twice"
                        ));
                    }
                    Some(hash)
                }
                None => {
                    problems.push(format!(
                        "{at}.key_sha256: expected 64 hex characters (from `gatehouse hash-key`)"
                    ));
                    None
                }
            },
        };
        let mut policy = raw.policy;
        check_policy(&at, &mut policy, problems);
        keys.push(KeyConfig {
            id: raw.id,
            key_sha256,
            policy,
        });
    }
    keys
}

fn decode_sha256(text: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(text.trim()).ok()?;
    bytes.try_into().ok()
}

fn check_policy(at: &str, policy: &mut KeyPolicy, problems: &mut Vec<String>) {
    check_rate(at, policy.rate_per_second, policy.burst, problems);
    if policy.quota_period != QuotaPeriod::None && policy.quota_points.is_none() {
        problems.push(format!(
            "{at}.quota_points: required when quota_period is {:?}",
            policy.quota_period.label()
        ));
    }
    policy.callback_secret = resolve_secret(
        policy.callback_secret.take(),
        policy.callback_secret_file.as_deref(),
        &format!("{at}.callback_secret"),
        false,
        problems,
    );
}

fn check_rate(at: &str, rate_per_second: f64, burst: u32, problems: &mut Vec<String>) {
    if !(rate_per_second.is_finite() && rate_per_second > 0.0 && rate_per_second <= 1e9) {
        problems.push(format!(
            "{at}.rate_per_second: expected a number greater than 0, got {rate_per_second}"
        ));
    }
    if burst == 0 {
        problems.push(format!("{at}.burst: must be at least 1"));
    }
}

fn validate_jwt(jwt: &mut JwtConfig, problems: &mut Vec<String>) {
    use jsonwebtoken::Algorithm::*;
    if jwt.algorithms.is_empty() {
        problems.push("auth.jwt.algorithms: list at least one algorithm, e.g. [\"HS256\"]".into());
    }
    let hmac = jwt
        .algorithms
        .iter()
        .any(|a| matches!(a, HS256 | HS384 | HS512));
    let asymmetric = jwt
        .algorithms
        .iter()
        .any(|a| !matches!(a, HS256 | HS384 | HS512));
    if hmac && asymmetric {
        problems.push(
            "auth.jwt.algorithms: HS* cannot be mixed with RS*/PS*/ES*/EdDSA (algorithm confusion)"
                .into(),
        );
    }
    jwt.secret = resolve_secret(
        jwt.secret.take(),
        jwt.secret_file.as_deref(),
        "auth.jwt.secret",
        hmac,
        problems,
    );
    if asymmetric && jwt.public_key_file.is_none() && jwt.kid_keys.is_empty() {
        problems.push(format!(
            "auth.jwt.public_key_file: required for {:?}",
            jwt.algorithms
        ));
    }
    if jwt.key_claim.is_empty() {
        problems.push("auth.jwt.key_claim: must name a claim, e.g. \"sub\"".into());
    }
}

/// Picks the inline value or reads `*_file`; both at once is a mistake worth reporting.
fn resolve_secret(
    inline: Option<Secret>,
    file: Option<&Path>,
    name: &str,
    required: bool,
    problems: &mut Vec<String>,
) -> Option<Secret> {
    match (inline, file) {
        (Some(_), Some(_)) => {
            problems.push(format!(
                "{name}: set either {name} or {name}_file, not both"
            ));
            None
        }
        (Some(secret), None) if secret.expose().is_empty() => {
            problems.push(format!("{name}: is empty"));
            None
        }
        (Some(secret), None) => Some(secret),
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => Some(Secret(text.trim_end().to_string())),
            Ok(_) => {
                problems.push(format!("{name}_file: {} is empty", path.display()));
                None
            }
            Err(err) => {
                problems.push(format!(
                    "{name}_file: cannot read {}: {err}",
                    path.display()
                ));
                None
            }
        },
        (None, None) => {
            if required {
                problems.push(format!(
                    "{name}: required (inline, \"${{ENV_VAR}}\", or {name}_file)"
                ));
            }
            None
        }
    }
}

fn section<T: DeserializeOwned + Default>(
    tree: &toml::Table,
    name: &str,
    problems: &mut Vec<String>,
) -> T {
    match tree.get(name) {
        None => T::default(),
        Some(value) => deserialize_at(value, name, problems).unwrap_or_default(),
    }
}

/// A TOML syntax error as "line L, column C: message". toml's own text quotes the source
/// line, which may hold an inline secret; this goes to logs and the admin API, so it must not.
pub fn syntax_problem(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim_end();
    match err.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("not valid TOML at line {line}, column {column}: {message}")
        }
        None => format!("not valid TOML: {message}"),
    }
}

/// Deserializes one part of the tree, reporting failures with their full setting path.
fn deserialize_at<T: DeserializeOwned>(
    value: &toml::Value,
    at: &str,
    problems: &mut Vec<String>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value.clone()) {
        Ok(parsed) => Some(parsed),
        Err(err) => {
            let path = err.path().to_string();
            let place = if path == "." || path.is_empty() {
                at.to_string()
            } else {
                format!("{at}.{path}")
            };
            let message = err.into_inner().to_string();
            // toml appends "in `field`" on a second line; the path already says where.
            let first_line = message.lines().next().unwrap_or_default();
            problems.push(format!("{place}: {first_line}"));
            None
        }
    }
}

/// Replaces `${NAME}` in every string of the tree; `$${` stays a literal `${`.
fn expand_env(value: &mut toml::Value, at: &str, env: &dyn EnvLookup, problems: &mut Vec<String>) {
    match value {
        toml::Value::String(text) if text.contains("${") => {
            *text = expand_string(text, at, env, problems);
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_env(item, &format!("{at}[{i}]"), env, problems);
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                expand_env(item, &format!("{at}.{key}"), env, problems);
            }
        }
        _ => {}
    }
}

fn expand_string(text: &str, at: &str, env: &dyn EnvLookup, problems: &mut Vec<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        if let Some(literal) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = literal;
        } else if let Some(inner) = after.strip_prefix("${") {
            match inner.find('}') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.var(name) {
                        Some(value) => out.push_str(&value),
                        None => {
                            problems.push(format!(
                                "{at}: environment variable {name} is not set (referenced as ${{{name}}})"
                            ));
                            // Keep the reference so later checks do not also call it empty.
                            out.push_str(&after[..end + 3]);
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    problems.push(format!("{at}: unterminated ${{ in value"));
                    out.push_str(after);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "UPSTREAM_TOKEN" => Some("up-token".to_string()),
            "JWT_SECRET" => Some("jwt-secret".to_string()),
            _ => None,
        }
    }

    const MINIMAL: &str = r#"
        [upstream]
        base_url = "http://127.0.0.1:9/"
        token = "${UPSTREAM_TOKEN}"

    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::from_toml(MINIMAL, &env).unwrap();
        assert_eq!(config.upstream.base_url, "http://127.0.0.1:9");
        assert_eq!(config.upstream.token().expose(), "up-token");
        assert_eq!(config.validation.unknown_fields, UnknownFields::Reject);
        assert!(config.keys.is_empty());
    }

    #[test]
    fn embedded_config_is_valid_with_its_env_vars() {
        let lookup = |name: &str| Some(format!("value-of-{name}"));
        Config::from_toml(EMBEDDED_CONFIG, &lookup).unwrap();
    }

    #[test]
    fn every_problem_is_listed_with_its_setting() {
        let text = r#"
            [server]
            listen = "127.0.0.1:8080"
            colour = "blue"

            [upstream]
            base_url = "http://127.0.0.1:9"
            token = "${MISSING_TOKEN}"

            [[keys]]
            id = "a"
            key_sha256 = "zz"
            quota_period = "weekly"

            [[keys]]
            id = "b"
            rate_per_second = 0

            [[keys]]
            id = "b"
        "#;
        let err = Config::from_toml(text, &env).unwrap_err();
        let all = err.problems.join("\n");
        assert!(
            all.contains("server.colour") || all.contains("colour"),
            "{all}"
        );
        assert!(all.contains("MISSING_TOKEN"), "{all}");
        assert!(
            all.contains("keys[0]") && all.contains("weekly"),
            "bad enum is named: {all}"
        );
        assert!(all.contains("keys[2].id: duplicate"), "{all}");
        assert!(
            !all.contains("is empty"),
            "a missing env var is reported once: {all}"
        );
        assert!(all.contains("keys[1].rate_per_second"), "{all}");
        assert!(err.problems.len() >= 4, "{all}");
    }

    #[test]
    fn prices_cover_every_allowed_combination() {
        let text = format!(
            "{MINIMAL}\n[prices.runway_generate]\ngen3 = {{ 5 = 160, 10 = 320 }}\ngen2 = {{ 10 = 200, 7 = 1 }}\ngen9 = {{ 5 = 1 }}\n"
        );
        let err = Config::from_toml(&text, &env).unwrap_err();
        let all = err.problems.join("\n");
        assert!(
            all.contains("prices.runway_generate.gen2.5: missing price"),
            "{all}"
        );
        assert!(
            all.contains("prices.runway_generate.gen2.7: seconds must be"),
            "{all}"
        );
        assert!(
            all.contains("prices.runway_generate.gen9: unknown model"),
            "{all}"
        );
        assert!(!all.contains("gen3.10"), "{all}");

        let with_default = format!("{MINIMAL}\n[prices.runway_generate]\ndefault = 320\n");
        let config = Config::from_toml(&with_default, &env).unwrap();
        assert_eq!(
            config.prices.runway_generate("gen2", 5),
            Some(Points::from_whole(320))
        );
        let builtin = Config::from_toml(MINIMAL, &env).unwrap();
        assert_eq!(
            builtin.prices.runway_generate("gen3", 10),
            Some(Points::from_whole(320))
        );
    }

    #[test]
    fn callback_hosts_match_exactly_or_by_wildcard() {
        let callbacks = CallbacksConfig {
            allowed_hosts: vec!["hooks.example.com".into(), "*.corp.example".into()],
            ..CallbacksConfig::default()
        };
        assert!(callbacks.host_allowed("hooks.example.com"));
        assert!(callbacks.host_allowed("HOOKS.example.com"));
        assert!(callbacks.host_allowed("a.b.corp.example"));
        assert!(!callbacks.host_allowed("corp.example"));
        assert!(!callbacks.host_allowed("evil-hooks.example.com"));
        assert!(!callbacks.host_allowed("hooks.example.com.evil"));
        assert!(CallbacksConfig::default().host_allowed("anything"));
    }

    #[test]
    fn syntax_errors_give_the_place_without_quoting_the_line() {
        let text = "[upstream]\nbase_url = \"http://x\"\ntoken = \"s3cr3t-inline\" oops\n";
        let err = Config::from_toml(text, &env).unwrap_err();
        let problem = &err.problems[0];
        assert!(
            problem.starts_with("not valid TOML at line 3, column"),
            "{problem}"
        );
        assert!(!problem.contains("s3cr3t"), "{problem}");
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let config = Config::from_toml(MINIMAL, &env).unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("up-token"), "{debug}");
        assert!(debug.contains("***"));
    }

    #[test]
    fn hmac_and_asymmetric_algorithms_cannot_mix() {
        let text = format!(
            "{MINIMAL}\n[auth.jwt]\nalgorithms = [\"HS256\", \"RS256\"]\nsecret = \"${{JWT_SECRET}}\"\npublic_key_file = \"/nonexistent\"\n"
        );
        let err = Config::from_toml(&text, &env).unwrap_err();
        assert!(
            err.problems.iter().any(|p| p.contains("confusion")),
            "{err}"
        );
    }

    #[test]
    fn dollar_escape_and_missing_var() {
        let mut problems = Vec::new();
        assert_eq!(
            expand_string("a$${b}c$d", "x", &env, &mut problems),
            "a${b}c$d"
        );
        assert!(problems.is_empty());
        expand_string("${NOPE}", "upstream.token", &env, &mut problems);
        assert_eq!(
            problems,
            vec!["upstream.token: environment variable NOPE is not set (referenced as ${NOPE})"]
        );
    }
}
