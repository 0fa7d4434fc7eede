//! The `gatehouse` command line: serve, check, hash-key, mock-upstream.

use crate::config::{Config, ConfigError, LogFormat, ProcessEnv, EMBEDDED_CONFIG};
use crate::mock_upstream::{MockConfig, MockUpstream};
use crate::server::Gateway;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "API gateway for an AI aggregator upstream"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Configuration file; without it, the embedded example config.toml is used.
        #[arg(long, env = "GATEHOUSE_CONFIG")]
        config: Option<PathBuf>,
        /// Start a simulated upstream on loopback, point the gateway at it and add a demo key.
        #[arg(long)]
        demo: bool,
        /// Log format (overrides [log] format).
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
    },
    /// Validate a configuration file offline; lists every problem and exits non-zero if any.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Read an API key on stdin and print the hex SHA-256 to paste into [[keys]] key_sha256.
    HashKey,
    /// Print each key's points in its current period, from the ledger database.
    Usage {
        #[arg(long, env = "GATEHOUSE_CONFIG")]
        config: PathBuf,
        /// Only this key id.
        #[arg(long)]
        key: Option<String>,
    },
    /// List a key's ledger entries (reserve, release, charge, refund, adjust).
    Ledger {
        #[arg(long, env = "GATEHOUSE_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        key: String,
        /// Only the entries of this upstream task id.
        #[arg(long)]
        task: Option<String>,
    },
    /// Run the upstream simulator (for demos, tests and benchmarks).
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:9800")]
        listen: SocketAddr,
        /// The upstream token the simulator accepts.
        #[arg(long, default_value = "mock-upstream-token")]
        token: String,
        /// Seconds until a task finishes.
        #[arg(long, default_value_t = 8.0)]
        task_seconds: f64,
        /// Share of tasks that fail (status "2", refunded).
        #[arg(long, default_value_t = 0.0)]
        failure_rate: f64,
        /// Do not POST callbacks to the tasks' callback_url.
        #[arg(long)]
        no_callbacks: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::HashKey => hash_key(),
        Command::Usage { config, key } => run_async(print_usage(config, key)),
        Command::Ledger { config, key, task } => run_async(print_ledger(config, key, task)),
        Command::Serve {
            config,
            demo,
            log_format,
        } => run_async(serve(config, demo, log_format)),
        Command::MockUpstream {
            listen,
            token,
            task_seconds,
            failure_rate,
            no_callbacks,
        } => {
            init_tracing(LogFormat::Text);
            let config = MockConfig {
                token,
                task_duration: Duration::from_secs_f64(task_seconds.max(0.0)),
                generating_after: Duration::from_secs_f64((task_seconds / 4.0).max(0.0)),
                failure_rate,
                send_callbacks: !no_callbacks,
                ..MockConfig::default()
            };
            run_async(async move {
                match crate::mock_upstream::run_cli(listen, config).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(err) => {
                        eprintln!("gatehouse: {err}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

fn run_async(future: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(future),
        Err(err) => {
            eprintln!("gatehouse: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match Config::load_file(path).and_then(crate::snapshot::Snapshot::build) {
        Ok(snapshot) => {
            let config = &snapshot.config;
            println!(
                "{}: ok ({} keys, JWT {}, upstream {})",
                path.display(),
                config.keys.len(),
                if config.auth.jwt.is_some() {
                    "on"
                } else {
                    "off"
                },
                config.upstream.base_url
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{}: {} problem(s)", path.display(), err.problems.len());
            for problem in &err.problems {
                eprintln!("  - {problem}");
            }
            ExitCode::from(2)
        }
    }
}

/// Opens the ledger named by a config file, for the read-only commands. Secrets are not
/// needed to read the ledger, so `${ENV}` references that are not set do not stop them.
fn open_ledger(path: &Path) -> Result<(Config, crate::quota::Ledger), ExitCode> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        eprintln!("gatehouse: cannot read {}: {err}", path.display());
        ExitCode::from(2)
    })?;
    let lenient_env = |name: &str| std::env::var(name).ok().or_else(|| Some("unset".into()));
    let config = Config::from_toml(&text, &lenient_env).map_err(|err| {
        eprintln!("gatehouse: {}: {err}", path.display());
        ExitCode::from(2)
    })?;
    if !config.store.path.exists() {
        eprintln!(
            "gatehouse: no ledger at {} (store.path; a relative path is relative to the current directory)",
            config.store.path.display()
        );
        return Err(ExitCode::FAILURE);
    }
    let store = crate::quota::SqliteStore::open(&config.store.path).map_err(|err| {
        eprintln!(
            "gatehouse: cannot open the ledger {} (store.path): {err}",
            config.store.path.display()
        );
        ExitCode::FAILURE
    })?;
    let ledger = crate::quota::Ledger {
        store: std::sync::Arc::new(store),
        clock: std::sync::Arc::new(crate::quota::SystemClock),
        metrics: std::sync::Arc::new(crate::metrics::Metrics::new()),
    };
    Ok((config, ledger))
}

async fn print_usage(path: PathBuf, key: Option<String>) -> ExitCode {
    let (config, ledger) = match open_ledger(&path) {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let reports = match crate::admin::usage_report(&ledger, &config, key.as_deref()).await {
        Ok(reports) => reports,
        Err(err) => {
            eprintln!("gatehouse: {}", err.message());
            return ExitCode::FAILURE;
        }
    };
    if reports.is_empty() {
        eprintln!("gatehouse: no such key in the config or the ledger");
        return ExitCode::FAILURE;
    }
    let show = |points: Option<crate::points::Points>| {
        points.map_or_else(|| "-".to_string(), |p| p.to_string())
    };
    println!(
        "{:<24} {:<12} {:>12} {:>12} {:>12} {:>12} {:>6}",
        "KEY", "PERIOD", "QUOTA", "CHARGED", "RESERVED", "REMAINING", "OPEN"
    );
    for r in reports {
        println!(
            "{:<24} {:<12} {:>12} {:>12} {:>12} {:>12} {:>6}",
            r.key,
            r.period,
            show(r.quota),
            r.charged.to_string(),
            r.reserved.to_string(),
            show(r.remaining),
            r.open_tasks
        );
    }
    ExitCode::SUCCESS
}

async fn print_ledger(path: PathBuf, key: String, task: Option<String>) -> ExitCode {
    let (_config, ledger) = match open_ledger(&path) {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let entries = match ledger.store.ledger_entries(&key, task.as_deref()).await {
        Ok(entries) => entries,
        Err(err) => {
            eprintln!("gatehouse: {err}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{:>8} {:<20} {:<12} {:<8} {:>10} {:<38} NOTE",
        "ID", "AT (UTC)", "PERIOD", "KIND", "POINTS", "TASK"
    );
    for e in entries {
        let at = chrono::DateTime::from_timestamp(e.at, 0)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| e.at.to_string());
        println!(
            "{:>8} {:<20} {:<12} {:<8} {:>10} {:<38} {}",
            e.id,
            at,
            e.period.as_str(),
            e.kind.as_str(),
            e.points.to_string(),
            e.task_id.as_deref().unwrap_or("-"),
            e.note
        );
    }
    ExitCode::SUCCESS
}

fn hash_key() -> ExitCode {
    let mut input = String::new();
    if let Err(err) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("gatehouse hash-key: cannot read stdin: {err}");
        return ExitCode::FAILURE;
    }
    let key = input.trim();
    if key.is_empty() {
        eprintln!(
            "gatehouse hash-key: no key on stdin (try: echo -n \"$KEY\" | gatehouse hash-key)"
        );
        return ExitCode::FAILURE;
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        eprintln!(
            "gatehouse hash-key: a key is one line of visible ASCII (it travels in an HTTP header)"
        );
        return ExitCode::FAILURE;
    }
    println!("{}", crate::auth::hash_key(key));
    ExitCode::SUCCESS
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

async fn serve(path: Option<PathBuf>, demo: bool, log_format: Option<LogFormatArg>) -> ExitCode {
    let text = match &path {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) => {
                eprintln!("gatehouse: cannot read {}: {err}", path.display());
                return ExitCode::from(2);
            }
        },
        None => EMBEDDED_CONFIG.to_string(),
    };
    let mut demo_upstream = None;
    let loaded = if demo {
        match DemoSetup::start().await {
            Ok(setup) => {
                let config = setup.configure(&text);
                demo_upstream = Some(setup);
                config
            }
            Err(err) => {
                eprintln!("gatehouse: cannot start the demo upstream: {err}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        Config::from_toml(&text, &ProcessEnv)
    };
    let config = match loaded {
        Ok(config) => config,
        Err(err) => {
            eprintln!("gatehouse: {err}");
            if path.is_none() && !demo {
                eprintln!(
                    "hint: without --config the embedded example config is used; try `gatehouse serve --demo`"
                );
            }
            return ExitCode::from(2);
        }
    };
    init_tracing(match log_format {
        Some(LogFormatArg::Json) => LogFormat::Json,
        Some(LogFormatArg::Text) => LogFormat::Text,
        None => config.log.format,
    });

    let listen = config.server.listen;
    let metrics_listen = config.server.metrics_listen;
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("gatehouse: cannot listen on {listen} (server.listen): {err}");
            return ExitCode::FAILURE;
        }
    };
    let metrics_listener = match metrics_listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => Some(listener),
            Err(err) => {
                eprintln!("gatehouse: cannot listen on {addr} (server.metrics_listen): {err}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let mut gateway = match Gateway::new(config) {
        Ok(gateway) => gateway,
        Err(err) => {
            eprintln!("gatehouse: {err}");
            return ExitCode::from(2);
        }
    };
    // The demo's config is the file plus in-memory changes: reloading the file would drop them.
    match (&path, demo) {
        (Some(path), false) => gateway.enable_reload(path.clone(), Box::new(ProcessEnv)),
        _ => {
            tracing::info!("config reload is off (it needs --config FILE and no --demo)");
            ignore_sighup();
        }
    }
    // With port 0 in the config the real port is only known now; scripts and tests read
    // this line to find the gateway.
    let bound = listener.local_addr().unwrap_or(listen);
    let metrics_bound = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    tracing::info!(listen = %bound, metrics = ?metrics_bound, "gatehouse listening");
    println!("gatehouse listening on http://{bound}");
    if let Some(addr) = metrics_bound {
        println!("gatehouse metrics on http://{addr}/metrics");
    }
    if let Some(setup) = &demo_upstream {
        setup.print_instructions(bound);
    }
    gateway
        .serve(listener, metrics_listener, shutdown_signal())
        .await;
    ExitCode::SUCCESS
}

/// Without a reloader, SIGHUP (e.g. `systemctl reload`) must not kill the process.
fn ignore_sighup() {
    #[cfg(unix)]
    if let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::warn!("SIGHUP ignored: config reload is off");
            }
        });
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

/// `serve --demo`: a simulated upstream on loopback and a random demo key.
struct DemoSetup {
    upstream: MockUpstream,
    demo_key: String,
    admin_token: String,
    store_dir: PathBuf,
}

impl Drop for DemoSetup {
    fn drop(&mut self) {
        // The demo's ledger is scratch data; nothing should pile up in the temp dir.
        let _ = std::fs::remove_dir_all(&self.store_dir);
    }
}

const DEMO_UPSTREAM_TOKEN: &str = "demo-upstream-token";

impl DemoSetup {
    async fn start() -> std::io::Result<DemoSetup> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let upstream = MockUpstream::start(
            listener,
            MockConfig {
                token: DEMO_UPSTREAM_TOKEN.to_string(),
                ..MockConfig::default()
            },
        )
        .await;
        let store_dir = std::env::temp_dir().join(format!("gatehouse-demo-{}", std::process::id()));
        std::fs::create_dir_all(&store_dir)?;
        Ok(DemoSetup {
            upstream,
            demo_key: format!("demo-{}", hex::encode(rand::random::<[u8; 12]>())),
            admin_token: format!("admin-{}", hex::encode(rand::random::<[u8; 12]>())),
            store_dir,
        })
    }

    /// The given config with the upstream pointed at the simulator and a `demo` key added.
    fn configure(&self, text: &str) -> Result<Config, ConfigError> {
        let mut tree: toml::Table = text.parse().map_err(|err: toml::de::Error| ConfigError {
            problems: vec![crate::config::syntax_problem(text, &err)],
        })?;
        let upstream = tree
            .entry("upstream")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(upstream) = upstream.as_table_mut() {
            upstream.insert("base_url".into(), self.upstream.base_url().into());
            upstream.insert("token".into(), DEMO_UPSTREAM_TOKEN.into());
            upstream.remove("token_file");
        }
        let store = tree
            .entry("store")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(store) = store.as_table_mut() {
            let path = self.store_dir.join("ledger.db");
            store.insert("path".into(), path.display().to_string().into());
        }
        let mut demo_key = toml::Table::new();
        demo_key.insert("id".into(), "demo".into());
        demo_key.insert(
            "key_sha256".into(),
            crate::auth::hash_key(&self.demo_key).into(),
        );
        // Enough for a good look around (a gen3 10 s task reserves 320).
        demo_key.insert("quota_points".into(), 100_000.into());
        demo_key.insert("quota_period".into(), "daily".into());
        let mut admin = toml::Table::new();
        admin.insert("token".into(), self.admin_token.clone().into());
        tree.insert("admin".into(), toml::Value::Table(admin));
        let keys = tree
            .entry("keys")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        if let Some(keys) = keys.as_array_mut() {
            keys.retain(|key| key.get("id").and_then(|v| v.as_str()) != Some("demo"));
            keys.push(toml::Value::Table(demo_key));
        }
        // The example config names secrets by ${ENV}; the demo needs none of them set.
        let demo_env = |name: &str| {
            std::env::var(name)
                .ok()
                .or_else(|| Some(format!("demo-value-for-{name}")))
        };
        Config::from_table(&mut tree, &demo_env)
    }

    fn print_instructions(&self, listen: SocketAddr) {
        println!(
            "\ngatehouse demo: gateway on http://{listen}, simulated upstream on {}\n\
             demo API key: {key}\n\nTry:\n\
             curl -s http://{listen}/runway/pro/generate \\\n  \
             -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n  \
             -d '{{\"callback_url\":\"http://127.0.0.1:9/hook\",\"ratio\":\"16:9\",\"prompt\":\"一只小猫\",\"style\":\"cinematic\",\"model\":\"gen3\",\"options\":{{\"seconds\":10,\"motion_vector\":{{\"x\":0,\"y\":0.4,\"z\":0,\"r\":-6,\"bg_x_pan\":0,\"bg_y_pan\":0}}}}}}'\n\n\
             then poll the task (use the task_id from the answer):\n\
             curl -s http://{listen}/runway/feed -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{{\"task_id\":\"TASK_ID\"}}'\n\n\
             metrics: curl -s http://{listen}/metrics\n\
             points:  curl -s http://{listen}/admin/usage -H 'Authorization: Bearer {admin}'\n\
             ledger:  {ledger} (removed when the demo stops)\n",
            self.upstream.base_url(),
            key = self.demo_key,
            admin = self.admin_token,
            ledger = self.store_dir.join("ledger.db").display(),
        );
    }
}
