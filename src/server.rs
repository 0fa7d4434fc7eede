//! The whole request path, assembled in one place, and the listeners that serve it.
//!
//! ```text
//! observe ─ limits ─ route ─┬─ proxied routes: auth ─ ratelimit ─ validate ─ quota ─ passthrough ─ upstream
//!                           ├─ /healthz /readyz /metrics: ops
//!                           ├─ /callbacks/runway/{token}: callbacks
//!                           └─ /admin/…: admin
//! ```
//!
//! Background tasks: the callback outbox worker, the reconciler, and housekeeping.

use crate::admin::AdminService;
use crate::auth::AuthLayer;
use crate::body::{self, Body};
use crate::callbacks::{CallbackService, DeliveryWorker};
use crate::config::{Config, ConfigError, EnvLookup};
use crate::error::GatewayError;
use crate::limits::LimitsLayer;
use crate::metrics::Metrics;
use crate::observe::ObserveLayer;
use crate::ops::{self, OpsService, Readiness};
use crate::passthrough::PassthroughLayer;
use crate::quota::layer::QuotaLayer;
use crate::quota::{Clock, Ledger, SqliteStore, Store, SystemClock};
use crate::ratelimit::{RateLimitLayer, RateLimiters};
use crate::reconciler::Reconciler;
use crate::reload::Reloader;
use crate::route::{Route, RouteKind, RouteLayer};
use crate::snapshot::{LiveSnapshot, Snapshot};
use crate::upstream::UpstreamService;
use crate::validate::ValidateLayer;
use http::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};

/// The service hyper runs for every connection.
pub type GatewayService = BoxCloneService<Request<Body>, Response<Body>, Infallible>;
type InnerService = BoxCloneService<Request<Body>, Response<Body>, GatewayError>;

/// Long-lived state of one gateway process: the live config and what outlives reloads.
pub struct Gateway {
    pub live: Arc<LiveSnapshot>,
    pub metrics: Arc<Metrics>,
    pub limiters: Arc<RateLimiters>,
    pub readiness: Arc<Readiness>,
    pub ledger: Arc<Ledger>,
    /// Wakes the outbox worker when a callback was queued.
    outbox_wakeup: Arc<tokio::sync::Notify>,
    /// Present when the config came from a file that can be reloaded.
    pub reloader: Option<Arc<Reloader>>,
    /// Held for the gateway's lifetime: one process per ledger file.
    _ledger_lock: std::fs::File,
}

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the ledger (store.path): {0}")]
    Store(#[from] crate::quota::StoreError),
}

impl Gateway {
    /// Opens the ledger at `store.path` and builds the live snapshot.
    pub fn new(config: Config) -> Result<Gateway, StartError> {
        Gateway::with_clock(config, Arc::new(SystemClock))
    }

    /// As `new`, with the clock the ledger uses for periods and timestamps (tests).
    pub fn with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Gateway, StartError> {
        if let Some(parent) = config.store.path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|err| {
                    crate::quota::StoreError::Database(format!(
                        "cannot create {}: {err}",
                        parent.display()
                    ))
                })?;
            }
        }
        let ledger_lock = lock_ledger(&config.store.path)?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_with(
            &config.store.path,
            config.store.synchronous,
        )?);
        let metrics = Arc::new(Metrics::new());
        metrics.set_config_info(&config.source_hash);
        metrics.init_keys(config.keys.iter().map(|key| key.id.as_str()));
        metrics
            .config_last_reload_success_timestamp_seconds
            .set(chrono::Utc::now().timestamp() as f64);
        let limiters = Arc::new(RateLimiters::new(&config));
        let snapshot = Snapshot::build(config)?;
        let ledger = Arc::new(Ledger {
            store,
            clock,
            metrics: metrics.clone(),
        });
        Ok(Gateway {
            live: Arc::new(LiveSnapshot::from_pointee(snapshot)),
            metrics,
            limiters,
            readiness: Arc::new(Readiness::default()),
            ledger,
            outbox_wakeup: Arc::new(tokio::sync::Notify::new()),
            reloader: None,
            _ledger_lock: ledger_lock,
        })
    }

    /// Reload from `path` on file change, SIGHUP and `POST /admin/reload`.
    pub fn enable_reload(&mut self, path: PathBuf, env: Box<dyn EnvLookup + Send + Sync>) {
        self.reloader = Some(Arc::new(Reloader::new(
            path,
            env,
            self.live.clone(),
            self.limiters.clone(),
            self.metrics.clone(),
        )));
    }

    pub fn reconciler(&self) -> Reconciler {
        Reconciler::new(self.ledger.clone(), self.live.clone())
    }

    pub fn delivery_worker(&self) -> DeliveryWorker {
        DeliveryWorker::new(
            self.ledger.clone(),
            self.live.clone(),
            self.outbox_wakeup.clone(),
        )
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.live.load_full()
    }

    /// The full stack, top to bottom.
    pub fn service(&self) -> GatewayService {
        let proxied: InnerService = BoxCloneService::new(
            ServiceBuilder::new()
                .layer(AuthLayer)
                .layer(RateLimitLayer::new(self.limiters.clone()))
                .layer(ValidateLayer)
                .layer(QuotaLayer::new(self.ledger.clone()))
                .layer(PassthroughLayer::new(self.ledger.clone()))
                .service(UpstreamService::new(self.metrics.clone())),
        );
        let ops: InnerService = BoxCloneService::new(OpsService::new(
            self.metrics.clone(),
            self.readiness.clone(),
            self.ledger.store.clone(),
        ));
        let callbacks: InnerService = BoxCloneService::new(CallbackService::new(
            self.ledger.clone(),
            self.outbox_wakeup.clone(),
        ));
        let admin: InnerService = BoxCloneService::new(AdminService::new(
            self.ledger.clone(),
            self.reloader.clone(),
        ));
        let dispatch = Dispatch {
            proxied,
            ops,
            callbacks,
            admin,
        };
        BoxCloneService::new(
            ServiceBuilder::new()
                .layer(ObserveLayer::new(self.live.clone(), self.metrics.clone()))
                .layer(LimitsLayer)
                .layer(RouteLayer)
                .service(dispatch),
        )
    }

    /// The background tasks: outbox delivery, reconciliation, housekeeping, and the config
    /// watcher and SIGHUP handler when reloading is enabled.
    pub fn spawn_background(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = vec![
            tokio::spawn(self.delivery_worker().run()),
            tokio::spawn(self.reconciler().run()),
            self.spawn_housekeeping(),
        ];
        if let Some(reloader) = &self.reloader {
            match reloader.spawn_watcher() {
                Ok(task) => tasks.push(task),
                Err(err) => {
                    tracing::warn!(error = %err, file = %reloader.path().display(), "cannot watch the config file; reload with SIGHUP or POST /admin/reload")
                }
            }
            #[cfg(unix)]
            match reloader.spawn_sighup() {
                Ok(task) => tasks.push(task),
                Err(err) => tracing::warn!(error = %err, "cannot handle SIGHUP"),
            }
        }
        tasks
    }

    /// Periodic housekeeping: drops idle rate-limiter keys so memory stays bounded.
    fn spawn_housekeeping(&self) -> tokio::task::JoinHandle<()> {
        let limiters = self.limiters.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tick.tick().await;
                limiters.evict_idle();
                metrics
                    .ratelimit_tracked_keys
                    .set(limiters.tracked_keys() as i64);
            }
        })
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests for up to
    /// `server.shutdown_grace_ms`.
    pub async fn serve(
        self,
        listener: TcpListener,
        metrics_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let grace = Duration::from_millis(self.snapshot().config.server.shutdown_grace_ms);
        let background = self.spawn_background();
        let metrics_task = metrics_listener.map(|listener| {
            let metrics = self.metrics.clone();
            let service = tower::service_fn(move |_request: Request<Body>| {
                let response = ops::metrics_response(&metrics);
                async move { Ok::<_, Infallible>(response) }
            });
            tokio::spawn(serve_listener(
                listener,
                BoxCloneService::new(service),
                stop_rx.clone(),
                grace,
            ))
        });
        let readiness = self.readiness.clone();
        let drain_delay = Duration::from_millis(self.snapshot().config.server.drain_delay_ms);
        tokio::spawn(async move {
            shutdown.await;
            readiness.start_draining();
            tracing::info!(
                drain_delay_ms = drain_delay.as_millis() as u64,
                "shutdown requested: /readyz answers 503; then the listener closes and in-flight requests finish"
            );
            tokio::time::sleep(drain_delay).await;
            let _ = stop_tx.send(true);
        });
        serve_listener(listener, self.service(), stop_rx, grace).await;
        if let Some(task) = metrics_task {
            let _ = task.await;
        }
        for task in background {
            task.abort();
        }
        tracing::info!("gateway stopped");
    }
}

/// Two gateways on one SQLite ledger would both run the reconciler and the outbox, and the
/// embedded setup is one process per file: a second one is refused at start. (The lock is
/// advisory and released by the OS when the process dies, even by SIGKILL.)
fn lock_ledger(path: &std::path::Path) -> Result<std::fs::File, StartError> {
    let lock_path = path.with_extension("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|err| {
            crate::quota::StoreError::Database(format!(
                "cannot open {}: {err}",
                lock_path.display()
            ))
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(crate::quota::StoreError::Database(format!(
            "another gatehouse process is using the ledger {} (lock {}); several replicas need a shared store",
            path.display(),
            lock_path.display()
        ))
        .into()),
        Err(std::fs::TryLockError::Error(err)) => Err(crate::quota::StoreError::Database(
            format!("cannot lock {}: {err}", lock_path.display()),
        )
        .into()),
    }
}

/// Accepts connections until told to stop, then waits for open connections to finish.
async fn serve_listener(
    listener: TcpListener,
    service: GatewayService,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Slow or idle clients must not hold a connection's header read open forever.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Typically out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let connection = builder
                    .serve_connection_with_upgrades(
                        TokioIo::new(stream),
                        HyperAdapter(service.clone()),
                    )
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::debug!(error = %err, "connection ended with an error");
                    }
                });
            }
            // The guard `wait_for` returns must not live across an await: drop it inside.
            _ = async { let _ = stop.wait_for(|stopped| *stopped).await; } => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "shutdown grace period over; closing remaining connections");
        }
    }
}

/// Hands hyper's `Incoming` request bodies to the stack as the boxed `Body`.
#[derive(Clone)]
struct HyperAdapter(GatewayService);

impl hyper::service::Service<Request<hyper::body::Incoming>> for HyperAdapter {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, request: Request<hyper::body::Incoming>) -> Self::Future {
        Box::pin(self.0.clone().oneshot(request.map(body::boxed)))
    }
}

/// Sends each routed request to the part of the stack that handles its route kind.
#[derive(Clone)]
struct Dispatch {
    proxied: InnerService,
    ops: InnerService,
    callbacks: InnerService,
    admin: InnerService,
}

impl Service<Request<Body>> for Dispatch {
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, GatewayError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let kind = request.extensions().get::<Route>().map(|r| r.kind.clone());
        let target = match kind {
            Some(kind) if kind.is_proxied() => self.proxied.clone(),
            Some(RouteKind::Health | RouteKind::Ready | RouteKind::Metrics) => self.ops.clone(),
            Some(RouteKind::RunwayCallback { .. }) => self.callbacks.clone(),
            Some(RouteKind::Admin) => self.admin.clone(),
            _ => {
                return Box::pin(async {
                    Err(GatewayError::Internal("request was not routed".into()))
                })
            }
        };
        Box::pin(target.oneshot(request))
    }
}

/// A gateway running in the background on already-bound listeners (tests, `--demo`).
pub struct RunningGateway {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub live: Arc<LiveSnapshot>,
    pub metrics: Arc<Metrics>,
    pub ledger: Arc<Ledger>,
    pub reconciler: Reconciler,
    pub delivery_worker: DeliveryWorker,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningGateway {
    pub async fn start(
        config: Config,
        listener: TcpListener,
        metrics_listener: Option<TcpListener>,
    ) -> Result<RunningGateway, StartError> {
        RunningGateway::start_gateway(Gateway::new(config)?, listener, metrics_listener).await
    }

    pub async fn start_gateway(
        gateway: Gateway,
        listener: TcpListener,
        metrics_listener: Option<TcpListener>,
    ) -> Result<RunningGateway, StartError> {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let metrics_addr = metrics_listener
            .as_ref()
            .map(|l| l.local_addr().expect("a bound listener has an address"));
        let live = gateway.live.clone();
        let metrics = gateway.metrics.clone();
        let ledger = gateway.ledger.clone();
        let reconciler = gateway.reconciler();
        let delivery_worker = gateway.delivery_worker();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(gateway.serve(listener, metrics_listener, async move {
            let _ = stop_rx.await;
        }));
        Ok(RunningGateway {
            addr,
            metrics_addr,
            live,
            metrics,
            ledger,
            reconciler,
            delivery_worker,
            stop: Some(stop_tx),
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts a graceful shutdown without waiting for it (as SIGTERM does).
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Starts a graceful shutdown and waits until the gateway has stopped.
    pub async fn shutdown(mut self) {
        self.begin_shutdown();
        let _ = (&mut self.task).await;
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}
