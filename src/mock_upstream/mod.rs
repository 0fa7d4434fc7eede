//! A faithful simulator of the paid upstream (see `docs/upstream-api.md`),
//! ugly parts included: errors as HTTP 200 with a non-200 `code`, numbers as
//! strings, `task_not_exist` right after submit, unsigned callbacks on every
//! status change.
//!
//! It serves `POST /runway/pro/generate`, `POST /runway/feed`, a minimal
//! `POST /v1/chat/completions` (whole or streamed, long answers on request) and
//! `GET /v1/models`, Suno (`POST /suno/submit/music`, `GET /suno/fetch/{id}`) and
//! Midjourney (`POST /mj/submit/{action}`, `GET /mj/task/{id}/fetch`); every other
//! path answers a 404 envelope. It is not part of the request path: integration
//! tests start it in-process, and `gatehouse mock-upstream`, `gatehouse serve
//! --demo` and the benchmarks run it as the upstream. Tests drive tasks by hand
//! (`advance`, `set_task_outcome`, `send_callback`, `set_suno_status`,
//! `set_mj_status`), inject faults (`push_submit_fault`, `push_fault`), hold
//! streams (`pause_streams`) and inspect what arrived (`received`,
//! `callbacks_sent`, `open_connections`, `streams`).

mod chat;
mod products;
mod task;
#[cfg(test)]
mod tests;

pub use chat::LONG_PIECE_BYTES;
pub use products::{Product, ProductTask};
pub use task::{mock_price, MockTask, Record};

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};

use crate::body::{self, Body};
use products::{mj_error, mj_submitted, suno_error, suno_submitted};
use task::{error_envelope, ok_envelope, submit_record};

/// Larger request bodies are refused: the mock must not be a memory sink.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// A callback receiver that hangs is given up on after this (the real upstream does not retry).
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Task shards: submits and feeds of different tasks rarely wait for each other.
const SHARDS: usize = 16;

/// How the mock upstream behaves.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// The upstream Bearer token it accepts.
    pub token: String,
    /// `true`: tasks move on by themselves on timers (CLI, demo, benchmarks);
    /// `false`: they stay queued until a test calls `advance` / `set_task_outcome`.
    pub auto_progress: bool,
    /// Time from submit to status `"1"` (generating).
    pub generating_after: Duration,
    /// Time from submit to the terminal status (`"2"` or `"3"`).
    pub task_duration: Duration,
    /// Share of auto-progressed tasks that end failed (`"2"`), 0.0–1.0.
    pub failure_rate: f64,
    /// POST the flat record to the task's `callback_url` on every status change.
    pub send_callbacks: bool,
    /// The first N feeds of every task answer `task_not_exist`.
    pub feed_not_exist_first: u32,
    /// How a failed task reports its refund.
    pub refund_style: RefundStyle,
    /// Added before every answer (a slow upstream).
    pub response_delay: Duration,
    /// Delay before each server-sent event of a streamed chat answer (0: all at once).
    pub stream_chunk_delay: Duration,
    /// How many received requests and sent callbacks are kept for inspection
    /// (the latest ones); 0 keeps none. Bounded so that a long demo or benchmark
    /// does not grow without end.
    pub max_recorded: usize,
}

impl Default for MockConfig {
    /// Demo defaults: tasks generate after 2 s, finish after 8 s, all succeed.
    fn default() -> Self {
        MockConfig {
            token: "mock-upstream-token".to_string(),
            auto_progress: true,
            generating_after: Duration::from_secs(2),
            task_duration: Duration::from_secs(8),
            failure_rate: 0.0,
            send_callbacks: true,
            feed_not_exist_first: 1,
            refund_style: RefundStyle::Amount,
            response_delay: Duration::ZERO,
            stream_chunk_delay: Duration::ZERO,
            max_recorded: 10_000,
        }
    }
}

/// The two ways aggregators report the refund of a failed task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundStyle {
    /// `refund` is a points amount: a failed task refunds its whole `point`.
    Amount,
    /// `refund` is a flag: `"1"` on a failed task.
    Flag,
}

/// A misbehaviour for the next request on a path (`push_submit_fault`: the next
/// `POST /runway/pro/generate`; `push_fault`: any path). Faults are used first in, first out.
#[derive(Debug, Clone, PartialEq)]
pub enum SubmitFault {
    /// Answer this envelope (e.g. HTTP 200 with code 403 "key incorrect"); no task is created.
    ErrorEnvelope {
        http_status: u16,
        code: i64,
        msg: String,
    },
    /// HTTP 500 with a code-500 envelope; no task is created.
    Status500,
    /// Wait, then handle the submit normally: the task is created only after the delay.
    Delay(Duration),
    /// Create the task (or make the answer), then answer only after the delay: the task exists
    /// though the caller may have timed out.
    CreateThenStall(Duration),
    /// Close the connection without an answer; no task is created.
    DropConnection,
}

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl RecordedRequest {
    /// The body as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// What a callback POST carries.
#[derive(Debug, Clone)]
pub enum CallbackBody {
    /// The task's current flat record (what the upstream sends).
    Current,
    /// The current record inside the `{"code":200,"msg":"成功","data":…}` envelope.
    Wrapped,
    /// The record as it would look at this status, without changing the task
    /// (stale or out-of-order callbacks, forged terminal states).
    AsStatus(String),
    /// Any bytes (a malformed body).
    Raw(Bytes),
}

/// One callback POST the mock made.
#[derive(Debug, Clone, PartialEq)]
pub struct CallbackSent {
    pub task_id: String,
    pub url: String,
    /// The `status` the body carried (`None` for a raw body).
    pub status: Option<String>,
    pub body: Bytes,
    /// The receiver's HTTP status, or why the POST failed.
    pub result: Result<u16, String>,
}

/// What the mock's streamed chat answers have done so far (see `MockUpstream::streams`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Streamed answers begun.
    pub started: usize,
    /// Server-sent events handed to their connection, over all streams.
    pub events_sent: usize,
    /// Streams that sent their last event (`data: [DONE]`).
    pub completed: usize,
    /// Streams that stopped early because the client went away.
    pub abandoned: usize,
}

#[derive(Default)]
struct StreamCounters {
    started: AtomicUsize,
    events_sent: AtomicUsize,
    completed: AtomicUsize,
    abandoned: AtomicUsize,
}

/// `advance` / `set_task_outcome` / `send_callback` named a task the mock does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownTask(pub String);

impl std::fmt::Display for UnknownTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the mock upstream has no task with task_id {:?}", self.0)
    }
}

impl std::error::Error for UnknownTask {}

/// A running mock upstream. Dropping it (or `shutdown`) stops the server, its
/// open connections and its task timers.
pub struct MockUpstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
    // Dropping the sender is the stop signal every spawned task watches.
    stop: watch::Sender<()>,
    accept_loop: JoinHandle<()>,
}

impl MockUpstream {
    /// Serves on `listener` (bind port 0 in tests) until dropped.
    pub async fn start(listener: TcpListener, config: MockConfig) -> MockUpstream {
        let addr = listener
            .local_addr()
            .expect("a bound TcpListener has a local address");
        let (stop, stopped) = watch::channel(());
        let shared = Arc::new(Shared {
            expected_auth: format!("Bearer {}", config.token).into_bytes(),
            config,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next_seq: AtomicU64::new(0),
            received: Mutex::new(VecDeque::new()),
            received_total: AtomicUsize::new(0),
            callbacks: Mutex::new(VecDeque::new()),
            callbacks_total: AtomicUsize::new(0),
            activity: Notify::new(),
            waiters: AtomicUsize::new(0),
            faults: Mutex::new(HashMap::new()),
            products: Mutex::new(HashMap::new()),
            // Midjourney ids are long decimal numbers; unique per mock, increasing.
            next_mj_id: AtomicU64::new(unix_millis() * 1000),
            stream_gate: watch::Sender::new(false),
            streams: StreamCounters::default(),
            open_connections: AtomicUsize::new(0),
            client: Client::builder(TokioExecutor::new()).build_http(),
            http: auto::Builder::new(TokioExecutor::new()),
            stopped,
        });
        let accept_loop = tokio::spawn(accept_loop(shared.clone(), listener));
        MockUpstream {
            shared,
            addr,
            stop,
            accept_loop,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, with a wildcard bind address replaced by loopback so it can be dialled.
    pub fn base_url(&self) -> String {
        let mut addr = self.addr;
        match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => addr.set_ip(Ipv4Addr::LOCALHOST.into()),
            IpAddr::V6(ip) if ip.is_unspecified() => addr.set_ip(Ipv6Addr::LOCALHOST.into()),
            _ => {}
        }
        format!("http://{addr}")
    }

    pub fn config(&self) -> &MockConfig {
        &self.shared.config
    }

    /// Every request received (the latest `max_recorded`), in arrival order.
    pub fn received(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.received).iter().cloned().collect()
    }

    /// Returns once `count` requests have arrived since start (no sleeping in tests).
    pub async fn wait_for_requests(&self, count: usize) {
        self.wait_until(|mock| mock.shared.received_total.load(Ordering::Acquire) >= count)
            .await
    }

    /// Returns once `condition` holds. It is checked again whenever something
    /// happens: a request arrives, a task is created or changes, a callback
    /// completes, a connection opens or closes. Wrap it in a timeout in tests.
    pub async fn wait_until(&self, condition: impl Fn(&MockUpstream) -> bool) {
        let _waiting = Waiting::new(&self.shared.waiters);
        loop {
            let notified = self.shared.activity.notified();
            tokio::pin!(notified);
            // Register before checking, so a wake-up between check and await is not lost.
            notified.as_mut().enable();
            // Pairs with the fence in `Shared::notify`: either it sees this waiter or this check sees its change.
            fence(Ordering::SeqCst);
            if condition(self) {
                return;
            }
            notified.await;
        }
    }

    /// All tasks, in submit order.
    pub fn tasks(&self) -> Vec<MockTask> {
        let mut tasks: Vec<MockTask> = self
            .shared
            .shards
            .iter()
            .flat_map(|shard| lock(shard).values().cloned().collect::<Vec<_>>())
            .collect();
        tasks.sort_by_key(|task| task.seq);
        tasks
    }

    pub fn task(&self, task_id: &str) -> Option<MockTask> {
        lock(self.shared.shard(task_id)).get(task_id).cloned()
    }

    /// The next `POST /runway/pro/generate` with a valid token misbehaves this way.
    pub fn push_submit_fault(&self, fault: SubmitFault) {
        self.push_fault("/runway/pro/generate", fault);
    }

    /// The next request on `path` (exact, e.g. `"/suno/submit/music"`) with a valid token
    /// misbehaves this way. An `ErrorEnvelope` or `Status500` answers the aggregator's
    /// generic `{"code":…,"msg":…,"data":null}` envelope, whatever the product.
    pub fn push_fault(&self, path: &str, fault: SubmitFault) {
        lock(&self.shared.faults)
            .entry(path.to_string())
            .or_default()
            .push_back(fault);
    }

    /// Suno and Midjourney tasks, in submit order.
    pub fn product_tasks(&self) -> Vec<ProductTask> {
        let mut tasks: Vec<ProductTask> = lock(&self.shared.products).values().cloned().collect();
        tasks.sort_by_key(|task| task.seq);
        tasks
    }

    pub fn product_task(&self, product: Product, id: &str) -> Option<ProductTask> {
        lock(&self.shared.products)
            .get(&(product, id.to_string()))
            .cloned()
    }

    /// Sets a Suno task's status (`"IN_PROGRESS"`, `"SUCCESS"`, `"FAILURE"`, …): what its
    /// next `GET /suno/fetch/{id}` reports.
    pub fn set_suno_status(&self, id: &str, status: &str) -> Result<(), UnknownTask> {
        self.shared.set_product_status(Product::Suno, id, status)
    }

    /// Sets a Midjourney task's status: what its next `GET /mj/task/{id}/fetch` reports.
    pub fn set_mj_status(&self, id: &str, status: &str) -> Result<(), UnknownTask> {
        self.shared
            .set_product_status(Product::Midjourney, id, status)
    }

    /// Holds every streamed chat answer after its first event until `resume_streams`:
    /// a test can then tell a relaying gateway (the first event arrives) from a buffering
    /// one, or hang up mid-stream, without timing.
    pub fn pause_streams(&self) {
        self.shared.stream_gate.send_replace(true);
    }

    pub fn resume_streams(&self) {
        self.shared.stream_gate.send_replace(false);
    }

    /// What streamed chat answers have done so far.
    pub fn streams(&self) -> StreamStats {
        let counters = &self.shared.streams;
        StreamStats {
            started: counters.started.load(Ordering::Acquire),
            events_sent: counters.events_sent.load(Ordering::Acquire),
            completed: counters.completed.load(Ordering::Acquire),
            abandoned: counters.abandoned.load(Ordering::Acquire),
        }
    }

    /// Moves a task to `status` the way the upstream would (point from the price
    /// table once generating, refund per `RefundStyle`, URLs on success) and, with
    /// `send_callbacks`, POSTs the record to its callback URL. Returns after the
    /// callback was answered.
    pub async fn advance(
        &self,
        task_id: &str,
        status: &str,
    ) -> Result<Option<CallbackSent>, UnknownTask> {
        self.set_task_outcome(task_id, status, None, None).await
    }

    /// Like `advance`, with `point` / `refund` overriding what the upstream would
    /// set (`Some("")` empties the field, `Some("abc")` makes it unparseable).
    pub async fn set_task_outcome(
        &self,
        task_id: &str,
        status: &str,
        point: Option<&str>,
        refund: Option<&str>,
    ) -> Result<Option<CallbackSent>, UnknownTask> {
        let task = self
            .shared
            .update_task(task_id, |task, style| {
                task.apply_status(status, point, refund, style, unix_now());
                true
            })
            .ok_or_else(|| UnknownTask(task_id.to_string()))?;
        if !self.shared.config.send_callbacks {
            return Ok(None);
        }
        Ok(Some(self.shared.send_record(&task).await))
    }

    /// POSTs a callback for `task_id` to its callback URL `repeats` times, one
    /// after another, whatever `send_callbacks` says. Returns the results in order.
    pub async fn send_callback(
        &self,
        task_id: &str,
        body: CallbackBody,
        repeats: usize,
    ) -> Result<Vec<CallbackSent>, UnknownTask> {
        let mut task = self
            .task(task_id)
            .ok_or_else(|| UnknownTask(task_id.to_string()))?;
        let (status, bytes) = match body {
            CallbackBody::Current => (Some(task.status.clone()), json_bytes(&task.record())),
            CallbackBody::Wrapped => (
                Some(task.status.clone()),
                Bytes::from(ok_envelope(task.record(), 0.into())),
            ),
            CallbackBody::AsStatus(status) => {
                task.apply_status(
                    &status,
                    None,
                    None,
                    self.shared.config.refund_style,
                    unix_now(),
                );
                (Some(status), json_bytes(&task.record()))
            }
            CallbackBody::Raw(bytes) => (None, bytes),
        };
        let mut sent = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            sent.push(
                self.shared
                    .post_callback(task_id, &task.callback_url, status.clone(), bytes.clone())
                    .await,
            );
        }
        Ok(sent)
    }

    /// Every callback POST made (the latest `max_recorded`), in order.
    pub fn callbacks_sent(&self) -> Vec<CallbackSent> {
        lock(&self.shared.callbacks).iter().cloned().collect()
    }

    /// Returns once `count` callback POSTs have completed since start.
    pub async fn wait_for_callbacks(&self, count: usize) {
        self.wait_until(|mock| mock.shared.callbacks_total.load(Ordering::Acquire) >= count)
            .await
    }

    /// Client connections currently open (a gateway that drops a request must close its connection).
    pub fn open_connections(&self) -> usize {
        self.shared.open_connections.load(Ordering::Acquire)
    }

    /// Stops accepting, closes open connections and stops task timers; returns
    /// once the listener and every connection are closed.
    pub async fn shutdown(self) {
        let MockUpstream {
            stop, accept_loop, ..
        } = self;
        drop(stop);
        let _ = accept_loop.await;
    }
}

/// Binds `listen`, prints where it serves and serves until Ctrl-C (`gatehouse mock-upstream`).
pub async fn run_cli(listen: SocketAddr, config: MockConfig) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await.map_err(|err| {
        std::io::Error::new(
            err.kind(),
            format!("mock upstream: cannot bind --listen {listen}: {err}"),
        )
    })?;
    let token = config.token.clone();
    let mock = MockUpstream::start(listener, config).await;
    println!(
        "mock upstream listening on http://{} (token: {token})",
        mock.addr()
    );
    tokio::signal::ctrl_c().await?;
    mock.shutdown().await;
    Ok(())
}

struct Shared {
    config: MockConfig,
    /// `Bearer <token>`, compared byte for byte.
    expected_auth: Vec<u8>,
    shards: Box<[Mutex<HashMap<String, MockTask>>]>,
    next_seq: AtomicU64,
    received: Mutex<VecDeque<RecordedRequest>>,
    received_total: AtomicUsize,
    callbacks: Mutex<VecDeque<CallbackSent>>,
    callbacks_total: AtomicUsize,
    /// Woken on every request, task change, callback and connection open/close, for `wait_until`.
    activity: Notify,
    /// `wait_until` calls in progress.
    waiters: AtomicUsize,
    /// Pending faults by request path.
    faults: Mutex<HashMap<String, VecDeque<SubmitFault>>>,
    products: Mutex<HashMap<(Product, String), ProductTask>>,
    next_mj_id: AtomicU64,
    /// `true` while streams are paused (`pause_streams`).
    stream_gate: watch::Sender<bool>,
    streams: StreamCounters,
    open_connections: AtomicUsize,
    client: Client<HttpConnector, Full<Bytes>>,
    http: auto::Builder<TokioExecutor>,
    /// Resolves once the `MockUpstream` is dropped.
    stopped: watch::Receiver<()>,
}

enum Route {
    Generate,
    Feed,
    ChatCompletions,
    Models,
    SunoSubmit,
    SunoFetch(String),
    MjSubmit(String),
    MjFetch(String),
}

impl Route {
    fn of(method: &Method, path: &str) -> Option<Route> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let one = |segment: &str| (!segment.is_empty()).then(|| segment.to_string());
        match (method, segments.as_slice()) {
            (&Method::POST, ["runway", "pro", "generate"]) => Some(Route::Generate),
            (&Method::POST, ["runway", "feed"]) => Some(Route::Feed),
            (&Method::POST, ["v1", "chat", "completions"]) => Some(Route::ChatCompletions),
            (&Method::GET, ["v1", "models"]) => Some(Route::Models),
            (&Method::POST, ["suno", "submit", "music"]) => Some(Route::SunoSubmit),
            (&Method::GET, ["suno", "fetch", id]) => one(id).map(Route::SunoFetch),
            (&Method::POST, ["mj", "submit", action]) => one(action).map(Route::MjSubmit),
            (&Method::GET, ["mj", "task", id, "fetch"]) => one(id).map(Route::MjFetch),
            _ => None,
        }
    }
}

/// Returned by the service to make hyper close the connection without an answer.
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mock upstream dropped the connection on purpose")
    }
}

impl std::error::Error for DropConnection {}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut stopped = shared.stopped.clone();
    // Connection tasks live here so that stopping can abort them and wait for them.
    let mut connections = JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: back off instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = stopped.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = OpenConnection::new(shared.clone());
        connections.spawn(async move {
            let shared = connection.0.clone();
            let service = service_fn({
                let shared = shared.clone();
                move |request| shared.clone().handle(request)
            });
            let _ = shared
                .http
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(connection);
        });
    }
    drop(listener);
    connections.shutdown().await;
}

/// Counts a `wait_until` call as waiting until dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(waiters: &'a AtomicUsize) -> Self {
        waiters.fetch_add(1, Ordering::SeqCst);
        Waiting(waiters)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a client connection as open until dropped.
struct OpenConnection(Arc<Shared>);

impl OpenConnection {
    fn new(shared: Arc<Shared>) -> Self {
        shared.open_connections.fetch_add(1, Ordering::AcqRel);
        shared.notify();
        OpenConnection(shared)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::AcqRel);
        self.0.notify();
    }
}

impl Shared {
    async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<Body>, DropConnection> {
        let started = Instant::now();
        let (parts, incoming) = request.into_parts();
        // Read the whole body first: hyper then notices a client that hangs up
        // while the answer is pending (delays, stalls) and closes the connection.
        let body = match Limited::new(incoming, MAX_BODY_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return Err(DropConnection),
        };
        self.record(&parts, &body);
        if !self.config.response_delay.is_zero() {
            tokio::time::sleep(self.config.response_delay).await;
        }

        let Some(route) = Route::of(&parts.method, parts.uri.path()) else {
            return Ok(json_response(
                StatusCode::NOT_FOUND,
                error_envelope(404, "not found"),
            ));
        };
        let authorized = parts
            .headers
            .get(header::AUTHORIZATION)
            .is_some_and(|value| value.as_bytes() == self.expected_auth.as_slice());
        if !authorized {
            return Ok(json_response(
                StatusCode::FORBIDDEN,
                error_envelope(403, "key incorrect"),
            ));
        }

        let fault = lock(&self.faults)
            .get_mut(parts.uri.path())
            .and_then(VecDeque::pop_front);
        let mut stall = None;
        match fault {
            None => {}
            Some(SubmitFault::ErrorEnvelope {
                http_status,
                code,
                msg,
            }) => {
                let status = StatusCode::from_u16(http_status).unwrap_or(StatusCode::OK);
                return Ok(json_response(status, error_envelope(code, &msg)));
            }
            Some(SubmitFault::Status500) => {
                return Ok(json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    error_envelope(500, "internal server error"),
                ))
            }
            Some(SubmitFault::DropConnection) => return Err(DropConnection),
            Some(SubmitFault::Delay(delay)) => tokio::time::sleep(delay).await,
            Some(SubmitFault::CreateThenStall(delay)) => stall = Some(delay),
        }

        let response = match route {
            // The generate answer's exec_time includes the stall, as the upstream's would.
            Route::Generate => return Ok(self.generate(&body, started, stall).await),
            Route::Feed => self.feed(&body),
            Route::ChatCompletions => chat::completion(&self, &body),
            Route::Models => chat::models(),
            Route::SunoSubmit => self.suno_submit(&body),
            Route::SunoFetch(id) => self.suno_fetch(&id),
            Route::MjSubmit(action) => self.mj_submit(&action, &body),
            Route::MjFetch(id) => self.mj_fetch(&id),
        };
        if let Some(delay) = stall {
            tokio::time::sleep(delay).await;
        }
        Ok(response)
    }

    async fn generate(
        self: &Arc<Self>,
        body: &[u8],
        started: Instant,
        stall: Option<Duration>,
    ) -> Response<Body> {
        let request: Value = match serde_json::from_slice(body) {
            Ok(value) => value,
            Err(_) => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    error_envelope(400, "invalid json body"),
                )
            }
        };
        let callback_url = match request.get("callback_url").and_then(Value::as_str) {
            Some(url) if !url.is_empty() => url.to_string(),
            // The ugly part: a refused submit still answers HTTP 200.
            _ => return json_response(StatusCode::OK, error_envelope(400, "callback_url_empty")),
        };
        let text = |field: &str, default: &str| {
            request
                .get(field)
                .and_then(Value::as_str)
                .filter(|value| !value.is_empty())
                .unwrap_or(default)
                .to_string()
        };
        let seconds = match request.pointer("/options/seconds") {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.parse().ok(),
            _ => None,
        }
        .and_then(|s| u32::try_from(s).ok())
        .unwrap_or(10);
        let now = unix_now();
        let task_id = uuid::Uuid::new_v4().to_string();
        let task = MockTask {
            task_id: task_id.clone(),
            callback_url,
            model: text("model", "gen3"),
            seconds,
            ratio: text("ratio", "16:9"),
            prompt: text("prompt", ""),
            prompt_en: None,
            status: "0".to_string(),
            state: String::new(),
            point: String::new(),
            refund: String::new(),
            video_url: None,
            poster: None,
            last_frame: None,
            msg: None,
            create_time: now,
            update_time: now,
            feeds: 0,
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            request,
        };
        lock(self.shard(&task_id)).insert(task_id.clone(), task);
        self.notify();
        if self.config.auto_progress {
            self.spawn_progress(task_id.clone());
        }
        if let Some(delay) = stall {
            tokio::time::sleep(delay).await;
        }

        // exec_time is a float of seconds, as the upstream reports it.
        let exec_time = (started.elapsed().as_secs_f64() * 1e5).round() / 1e5;
        let exec_time = serde_json::Number::from_f64(exec_time).unwrap_or_else(|| 0.into());
        json_response(
            StatusCode::OK,
            ok_envelope(submit_record(&task_id), exec_time),
        )
    }

    fn feed(&self, body: &[u8]) -> Response<Body> {
        let request: Value = match serde_json::from_slice(body) {
            Ok(value) => value,
            Err(_) => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    error_envelope(400, "invalid json body"),
                )
            }
        };
        let task_id = request
            .get("task_id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let mut shard = lock(self.shard(task_id));
        let answer = match shard.get_mut(task_id) {
            Some(task) => {
                task.feeds = task.feeds.saturating_add(1);
                // Right after submit the upstream does not know its own task yet.
                (task.feeds > self.config.feed_not_exist_first)
                    .then(|| ok_envelope(task.record(), 0.into()))
            }
            None => None,
        };
        drop(shard);
        json_response(
            StatusCode::OK,
            answer.unwrap_or_else(|| error_envelope(400, "task_not_exist")),
        )
    }

    fn suno_submit(self: &Arc<Self>, body: &[u8]) -> Response<Body> {
        let Ok(request) = serde_json::from_slice::<Value>(body) else {
            return json_value(StatusCode::BAD_REQUEST, suno_error("invalid json body"));
        };
        let id = uuid::Uuid::new_v4().to_string();
        self.create_product_task(Product::Suno, &id, "MUSIC", request);
        json_value(StatusCode::OK, suno_submitted(&id))
    }

    fn suno_fetch(&self, id: &str) -> Response<Body> {
        match self.fetch_product_task(Product::Suno, id) {
            Some(answer) => json_value(StatusCode::OK, answer),
            // As `/runway/feed`: an unknown task is an error in an HTTP 200.
            None => json_value(StatusCode::OK, suno_error("task_not_exist")),
        }
    }

    fn mj_submit(self: &Arc<Self>, action: &str, body: &[u8]) -> Response<Body> {
        let Ok(request) = serde_json::from_slice::<Value>(body) else {
            return json_value(StatusCode::BAD_REQUEST, mj_error("invalid json body"));
        };
        let has_prompt = request
            .get("prompt")
            .and_then(Value::as_str)
            .is_some_and(|prompt| !prompt.trim().is_empty());
        if action == "imagine" && !has_prompt {
            // midjourney-proxy refuses with code 4 in an HTTP 200: no task is created.
            return json_value(StatusCode::OK, mj_error("prompt不能为空"));
        }
        let id = self.next_mj_id.fetch_add(1, Ordering::Relaxed).to_string();
        self.create_product_task(
            Product::Midjourney,
            &id,
            &action.to_ascii_uppercase(),
            request,
        );
        json_value(StatusCode::OK, mj_submitted(&id))
    }

    fn mj_fetch(&self, id: &str) -> Response<Body> {
        match self.fetch_product_task(Product::Midjourney, id) {
            Some(answer) => json_value(StatusCode::OK, answer),
            None => json_value(StatusCode::NOT_FOUND, mj_error("任务不存在")),
        }
    }

    fn create_product_task(
        self: &Arc<Self>,
        product: Product,
        id: &str,
        action: &str,
        request: Value,
    ) {
        let task = ProductTask::new(
            product,
            id.to_string(),
            action.to_string(),
            request,
            unix_millis(),
            self.next_seq.fetch_add(1, Ordering::Relaxed),
        );
        lock(&self.products).insert((product, id.to_string()), task);
        self.notify();
        if self.config.auto_progress {
            self.spawn_product_progress(product, id.to_string());
        }
    }

    /// The fetch answer for a task, counting the fetch; `None` if the product has no such task.
    fn fetch_product_task(&self, product: Product, id: &str) -> Option<Value> {
        let mut products = lock(&self.products);
        let task = products.get_mut(&(product, id.to_string()))?;
        task.fetches = task.fetches.saturating_add(1);
        Some(task.fetch_json())
    }

    fn set_product_status(
        &self,
        product: Product,
        id: &str,
        status: &str,
    ) -> Result<(), UnknownTask> {
        let mut products = lock(&self.products);
        let task = products
            .get_mut(&(product, id.to_string()))
            .ok_or_else(|| UnknownTask(id.to_string()))?;
        task.apply_status(status, unix_millis());
        drop(products);
        self.notify();
        Ok(())
    }

    /// Submitted → in progress → success/failure on the same timers as Runway tasks,
    /// unless a test already finished the task.
    fn spawn_product_progress(self: &Arc<Self>, product: Product, id: String) {
        let shared = self.clone();
        let mut stopped = self.stopped.clone();
        let submitted = tokio::time::Instant::now();
        tokio::spawn(async move {
            let progress = async {
                let config = &shared.config;
                let advance = |status: &str| {
                    let mut products = lock(&shared.products);
                    if let Some(task) = products.get_mut(&(product, id.clone())) {
                        if !task.is_terminal() {
                            task.apply_status(status, unix_millis());
                        }
                    }
                    drop(products);
                    shared.notify();
                };
                tokio::time::sleep_until(submitted + config.generating_after).await;
                advance("IN_PROGRESS");
                tokio::time::sleep_until(
                    submitted + config.task_duration.max(config.generating_after),
                )
                .await;
                let failed = rand::random::<f64>() < config.failure_rate;
                advance(if failed { "FAILURE" } else { "SUCCESS" });
            };
            tokio::select! {
                _ = progress => {}
                _ = stopped.changed() => {}
            }
        });
    }

    /// Queued → generating → succeeded/failed on timers measured from submit.
    fn spawn_progress(self: &Arc<Self>, task_id: String) {
        let shared = self.clone();
        let mut stopped = self.stopped.clone();
        let submitted = tokio::time::Instant::now();
        tokio::spawn(async move {
            let progress = async {
                let config = &shared.config;
                tokio::time::sleep_until(submitted + config.generating_after).await;
                shared.auto_transition(&task_id, "1").await;
                let done_after = config.task_duration.max(config.generating_after);
                tokio::time::sleep_until(submitted + done_after).await;
                let failed = rand::random::<f64>() < config.failure_rate;
                shared
                    .auto_transition(&task_id, if failed { "2" } else { "3" })
                    .await;
            };
            tokio::select! {
                _ = progress => {}
                _ = stopped.changed() => {}
            }
        });
    }

    /// Moves a task on unless a test already finished it; sends the callback.
    async fn auto_transition(&self, task_id: &str, status: &str) {
        let changed = self.update_task(task_id, |task, style| {
            if task.is_terminal() || task.status == status {
                return false;
            }
            task.apply_status(status, None, None, style, unix_now());
            true
        });
        if let (Some(task), true) = (changed, self.config.send_callbacks) {
            self.send_record(&task).await;
        }
    }

    /// Applies `change` under the shard lock; returns the task after the change
    /// if `change` reported one.
    fn update_task(
        &self,
        task_id: &str,
        change: impl FnOnce(&mut MockTask, RefundStyle) -> bool,
    ) -> Option<MockTask> {
        let mut shard = lock(self.shard(task_id));
        let task = shard.get_mut(task_id)?;
        let changed = change(task, self.config.refund_style).then(|| task.clone());
        drop(shard);
        self.notify();
        changed
    }

    async fn send_record(&self, task: &MockTask) -> CallbackSent {
        self.post_callback(
            &task.task_id,
            &task.callback_url,
            Some(task.status.clone()),
            json_bytes(&task.record()),
        )
        .await
    }

    /// One unsigned POST, no retries: like the real upstream.
    async fn post_callback(
        &self,
        task_id: &str,
        url: &str,
        status: Option<String>,
        body: Bytes,
    ) -> CallbackSent {
        let result = match url.parse::<http::Uri>() {
            Err(err) => Err(format!("callback_url {url:?} is not a valid URI: {err}")),
            Ok(uri) => {
                let mut request = Request::new(Full::new(body.clone()));
                *request.method_mut() = Method::POST;
                *request.uri_mut() = uri;
                request.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                match tokio::time::timeout(CALLBACK_TIMEOUT, self.client.request(request)).await {
                    Err(_) => Err(format!(
                        "callback to {url} not answered within {CALLBACK_TIMEOUT:?}"
                    )),
                    Ok(Err(err)) => Err(format!("callback to {url} failed: {err}")),
                    Ok(Ok(response)) => {
                        let status = response.status().as_u16();
                        // Drain the answer so the connection goes back to the pool.
                        let _ = response.into_body().collect().await;
                        Ok(status)
                    }
                }
            }
        };
        let sent = CallbackSent {
            task_id: task_id.to_string(),
            url: url.to_string(),
            status,
            body,
            result,
        };
        if self.config.max_recorded > 0 {
            push_bounded(&self.callbacks, sent.clone(), self.config.max_recorded);
        }
        self.callbacks_total.fetch_add(1, Ordering::AcqRel);
        self.notify();
        sent
    }

    fn record(&self, parts: &http::request::Parts, body: &Bytes) {
        if self.config.max_recorded > 0 {
            let request = RecordedRequest {
                method: parts.method.clone(),
                path: parts.uri.path().to_string(),
                query: parts.uri.query().map(str::to_string),
                headers: parts.headers.clone(),
                body: body.clone(),
            };
            push_bounded(&self.received, request, self.config.max_recorded);
        }
        self.received_total.fetch_add(1, Ordering::AcqRel);
        self.notify();
    }

    /// Wakes `wait_until` callers. Without waiters (benchmarks, the demo) it is one
    /// fence and one load: `Notify::notify_waiters` alone would take a lock on every request.
    fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Relaxed) > 0 {
            self.activity.notify_waiters();
        }
    }

    fn shard(&self, task_id: &str) -> &Mutex<HashMap<String, MockTask>> {
        let mut hasher = DefaultHasher::new();
        task_id.hash(&mut hasher);
        &self.shards[(hasher.finish() as usize) % self.shards.len()]
    }
}

fn push_bounded<T>(list: &Mutex<VecDeque<T>>, item: T, max: usize) {
    let mut list = lock(list);
    if list.len() >= max {
        list.pop_front();
    }
    list.push_back(item);
}

/// A poisoned lock only means a test panicked while holding it; the data is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn json_bytes<T: serde::Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("a task record always serializes"))
}

fn json_response(status: StatusCode, bytes: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(body::full(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn json_value(status: StatusCode, value: Value) -> Response<Body> {
    json_response(status, value.to_string().into_bytes())
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}
