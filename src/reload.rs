//! Configuration reload without a restart: one `Reloader::reload()` behind the file
//! watcher, SIGHUP and `POST /admin/reload`.
//!
//! A reload reads the file, validates it and builds the whole derived state (key table, JWT
//! keys, routes, prices, upstream client) before anything changes; only then are the rate
//! limiters reconfigured (unchanged keys keep their state) and the snapshot swapped. A file
//! that does not validate changes nothing: every problem is logged and counted, and the old
//! configuration stays live. Settings that only take effect at start (listen addresses, the
//! ledger path) keep their running values and are reported as needing a restart.

use crate::config::{Config, EnvLookup};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiters;
use crate::snapshot::{LiveSnapshot, Snapshot};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The trigger name of the file watcher; the only one that skips an unchanged file.
pub const FILE_CHANGE: &str = "file change";

/// What a reload did; also the JSON answer of `POST /admin/reload`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// `true`: the new configuration is live.
    pub applied: bool,
    /// Why the file was rejected (empty when applied).
    pub problems: Vec<String>,
    /// Settings that changed in the file but keep their running value until a restart.
    pub restart_required: Vec<String>,
    /// Hash of the configuration that is live after the call.
    pub config_hash: String,
}

pub struct Reloader {
    path: PathBuf,
    env: Box<dyn EnvLookup + Send + Sync>,
    live: Arc<LiveSnapshot>,
    limiters: Arc<RateLimiters>,
    metrics: Arc<Metrics>,
    /// One reload at a time: the watcher, SIGHUP and the admin API may fire together.
    serialize: Mutex<()>,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        env: Box<dyn EnvLookup + Send + Sync>,
        live: Arc<LiveSnapshot>,
        limiters: Arc<RateLimiters>,
        metrics: Arc<Metrics>,
    ) -> Reloader {
        Reloader {
            path,
            env,
            live,
            limiters,
            metrics,
            serialize: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads, validates and (if valid) applies the file. Never leaves a half-applied state.
    pub fn reload(&self, trigger: &str) -> ReloadOutcome {
        let _one_at_a_time = self
            .serialize
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let running = self.live.load_full();
        let loaded = std::fs::read_to_string(&self.path)
            .map_err(|err| vec![format!("cannot read {}: {err}", self.path.display())])
            .and_then(|text| {
                Config::from_toml(&text, self.env.as_ref()).map_err(|err| err.problems)
            });
        let mut config = match loaded {
            Ok(config) => config,
            Err(problems) => return self.rejected(trigger, problems, &running),
        };
        // The watcher also sees writes that do not change the text (touch, some editors):
        // those are not reloads. SIGHUP and the admin API always rebuild, because secrets
        // read from `*_file` or the environment may have changed while the text did not.
        if trigger == FILE_CHANGE && config.source_hash == running.config.source_hash {
            tracing::debug!(trigger, "config file unchanged; nothing to reload");
            return ReloadOutcome {
                applied: true,
                problems: Vec::new(),
                restart_required: Vec::new(),
                config_hash: config.source_hash,
            };
        }
        let restart_required = keep_restart_only_settings(&mut config, &running.config);
        let snapshot = match Snapshot::build(config) {
            Ok(snapshot) => snapshot,
            Err(err) => return self.rejected(trigger, err.problems, &running),
        };
        self.limiters.reconfigure(&snapshot.config);
        self.metrics
            .init_keys(snapshot.config.keys.iter().map(|key| key.id.as_str()));
        self.metrics.set_config_info(&snapshot.config.source_hash);
        let config_hash = snapshot.config.source_hash.clone();
        let keys = snapshot.config.keys.len();
        self.live.store(Arc::new(snapshot));
        self.metrics
            .config_reloads_total
            .with_label_values(&["success"])
            .inc();
        self.metrics
            .config_last_reload_success_timestamp_seconds
            .set(chrono::Utc::now().timestamp() as f64);
        for setting in &restart_required {
            tracing::warn!(trigger, setting = %setting, "config reloaded, but this setting keeps its running value until a restart");
        }
        tracing::info!(trigger, config_hash = %config_hash, keys, "config reloaded");
        ReloadOutcome {
            applied: true,
            problems: Vec::new(),
            restart_required,
            config_hash,
        }
    }

    fn rejected(&self, trigger: &str, problems: Vec<String>, running: &Snapshot) -> ReloadOutcome {
        self.metrics
            .config_reloads_total
            .with_label_values(&["error"])
            .inc();
        for problem in &problems {
            tracing::error!(trigger, file = %self.path.display(), problem = %problem, "config reload rejected; the previous config stays live");
        }
        ReloadOutcome {
            applied: false,
            problems,
            restart_required: Vec::new(),
            config_hash: running.config.source_hash.clone(),
        }
    }

    /// Watches the file (through its directory, so editors that replace the file and
    /// Kubernetes' ConfigMap symlink swaps are seen too) and reloads after changes settle.
    pub fn spawn_watcher(self: &Arc<Self>) -> Result<tokio::task::JoinHandle<()>, notify::Error> {
        use notify::Watcher;
        let (changed_tx, mut changed_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let file_name = self.path.file_name().map(|name| name.to_os_string());
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                // Only the config file itself, or Kubernetes' `..data` symlink swap: the ledger
                // may live in the same directory and is written constantly.
                let ours = event.paths.iter().any(|path| {
                    let name = path.file_name();
                    name == file_name.as_deref()
                        || name.is_some_and(|n| n.to_string_lossy().starts_with(".."))
                });
                if ours && !event.kind.is_access() {
                    let _ = changed_tx.send(());
                }
            })?;
        let directory = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        watcher.watch(directory, notify::RecursiveMode::NonRecursive)?;
        let reloader = self.clone();
        Ok(tokio::spawn(async move {
            // The watcher stops when dropped; it lives as long as this task.
            let _watcher = watcher;
            while changed_rx.recv().await.is_some() {
                // Debounce: editors write in several steps; wait until events stop.
                while let Ok(Some(())) =
                    tokio::time::timeout(Duration::from_millis(200), changed_rx.recv()).await
                {
                }
                let reloader = reloader.clone();
                let _ = tokio::task::spawn_blocking(move || reloader.reload(FILE_CHANGE)).await;
            }
        }))
    }

    /// Reloads on every SIGHUP (unix).
    #[cfg(unix)]
    pub fn spawn_sighup(self: &Arc<Self>) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let reloader = self.clone();
        Ok(tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                let reloader = reloader.clone();
                let _ = tokio::task::spawn_blocking(move || reloader.reload("SIGHUP")).await;
            }
        }))
    }
}

/// Listen addresses and the ledger path are bound at start: the new config gets the running
/// values back, and the names of the ones that differed are returned.
fn keep_restart_only_settings(config: &mut Config, running: &Config) -> Vec<String> {
    let mut restart_required = Vec::new();
    if config.server.listen != running.server.listen {
        restart_required.push("server.listen".to_string());
        config.server.listen = running.server.listen;
    }
    if config.server.metrics_listen != running.server.metrics_listen {
        restart_required.push("server.metrics_listen".to_string());
        config.server.metrics_listen = running.server.metrics_listen;
    }
    if config.store.path != running.store.path {
        restart_required.push("store.path".to_string());
        config.store.path = running.store.path.clone();
    }
    restart_required
}
