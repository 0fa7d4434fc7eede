//! The `Store` trait: the point ledger, the task table and the callback outbox, behind one
//! object-safe async interface (`Arc<dyn Store>`), so SQLite (embedded) and PostgreSQL
//! (replicas) are interchangeable. Also the plain data types that cross it and `StoreError`.
//!
//! Lifecycle of a task row (its `TaskState`):
//!
//! ```text
//! reserve ─► reserved ─attach─► pending ─settle─► settled
//!               │  └───────────settle (callback before attach)──┘
//!               └─release─► released ─settle (late callback)─► settled
//! ```
//!
//! Every state change that moves points writes ledger rows and the key's balance in the
//! same transaction: `reserved = Σ reserve − Σ release` and `charged = Σ charge + Σ adjust`
//! hold per (key, period) at all times; `refund` rows are informative only.

use super::cost::Anomaly;
use super::period::PeriodKey;
use crate::error::GatewayError;
use crate::points::Points;
use std::future::Future;
use std::pin::Pin;

/// What every `Store` method returns: a boxed future, so the trait stays object-safe.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The row id of a task (and of its reservation). Known before the upstream task id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReservationId(pub i64);

impl std::fmt::Display for ReservationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Everything `reserve` needs. `period` is the key's current period (from its
/// `quota_period` and the clock); `quota: None` means unlimited.
#[derive(Debug, Clone)]
pub struct NewReservation {
    pub key_id: String,
    pub period: PeriodKey,
    pub quota: Option<Points>,
    pub price: Points,
    /// The token in the gateway's callback URL (`/callbacks/runway/{token}`); `None` for
    /// requests that get no callback (e.g. priced synchronous routes). Unique.
    pub callback_token: Option<String>,
    /// The caller's own `callback_url`, where the outbox delivers the callback.
    pub caller_callback_url: Option<String>,
    /// The route's name from the route table.
    pub route: String,
    pub model: Option<String>,
    pub seconds: Option<u32>,
    pub now: i64,
}

/// How a caller names a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskRef {
    /// The upstream's `task_id` (known after `attach`).
    TaskId(String),
    /// The token in the gateway's callback URL (known from `reserve` on).
    CallbackToken(String),
    /// The row id `reserve` returned.
    Reservation(ReservationId),
}

/// A terminal task record, as seen in a callback, a `/runway/feed` answer or by the reconciler.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub by: TaskRef,
    /// The upstream `status`; must be terminal (`"2"` or `"3"`, see `cost::is_terminal`).
    pub status: String,
    /// The upstream's `point` and `refund` strings, stored verbatim.
    pub raw_point: String,
    pub raw_refund: String,
    pub now: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleResult {
    /// This call settled the task.
    Settled {
        key_id: String,
        /// What the key was charged (see `cost::task_cost`).
        charged: Points,
        /// Points this settlement removed from the key's `reserved` balance: the
        /// reservation, or 0 when it had already been released (`from == Released`).
        reservation: Points,
        /// The state the task was in: `Reserved` (callback before attach), `Pending`, or
        /// `Released` (a late callback for a task whose submit looked failed).
        from: TaskState,
        anomaly: Option<Anomaly>,
    },
    /// Settled before (a duplicate callback, or a race with the reconciler): nothing changed.
    AlreadySettled,
    NotFound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskState {
    /// Points reserved, request not yet (or not known to be) accepted by the upstream.
    Reserved,
    /// Submitted: the upstream task id is known; waiting for a terminal status.
    Pending,
    /// Charged; final.
    Settled,
    /// Submit failed; the reservation was given back.
    Released,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Reserved => "reserved",
            TaskState::Pending => "pending",
            TaskState::Settled => "settled",
            TaskState::Released => "released",
        }
    }

    pub fn parse(text: &str) -> Option<TaskState> {
        [
            TaskState::Reserved,
            TaskState::Pending,
            TaskState::Settled,
            TaskState::Released,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    /// Reserved or pending: still holding points in `reserved`.
    pub fn is_open(self) -> bool {
        matches!(self, TaskState::Reserved | TaskState::Pending)
    }
}

/// One task row, all columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    pub id: ReservationId,
    /// The owner: the key that submitted the task.
    pub key_id: String,
    /// The period the reservation (and so the charge) belongs to.
    pub period: PeriodKey,
    pub route: String,
    pub model: Option<String>,
    pub seconds: Option<u32>,
    pub callback_token: Option<String>,
    pub caller_callback_url: Option<String>,
    pub task_id: Option<String>,
    pub state: TaskState,
    /// The last upstream `status` seen (informative; empty until one is seen).
    pub status: String,
    pub reserved: Points,
    /// Set when settled.
    pub charged: Option<Points>,
    pub raw_point: Option<String>,
    pub raw_refund: Option<String>,
    pub anomaly: Option<Anomaly>,
    /// Why the reservation was released.
    pub release_reason: Option<String>,
    pub created_at: i64,
    pub attached_at: Option<i64>,
    pub updated_at: i64,
    /// When the task was settled or released.
    pub closed_at: Option<i64>,
}

/// A key's balance in one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub charged: Points,
    pub reserved: Points,
    /// Tasks of this period still reserved or pending.
    pub open_tasks: u64,
}

impl Usage {
    /// What counts against the quota: charged + reserved.
    pub fn committed(&self) -> Points {
        self.charged.saturating_add(self.reserved)
    }

    /// Points left under `quota` (never negative); `None` when unlimited.
    pub fn remaining(&self, quota: Option<Points>) -> Option<Points> {
        quota.map(|q| q.saturating_sub(self.committed()).max(Points::ZERO))
    }
}

/// One row of `usage_all`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    pub key_id: String,
    pub period: PeriodKey,
    pub usage: Usage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LedgerKind {
    /// Points set aside at submit (`reserved` +).
    Reserve,
    /// A reservation given back, on failed submit or replaced by a charge at settle (`reserved` −).
    Release,
    /// What a settled task cost (`charged` +; may be 0).
    Charge,
    /// The upstream's refund for a task; informative, moves no balance.
    Refund,
    /// A manual correction (`charged` ±).
    Adjust,
}

impl LedgerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerKind::Reserve => "reserve",
            LedgerKind::Release => "release",
            LedgerKind::Charge => "charge",
            LedgerKind::Refund => "refund",
            LedgerKind::Adjust => "adjust",
        }
    }

    pub fn parse(text: &str) -> Option<LedgerKind> {
        [
            LedgerKind::Reserve,
            LedgerKind::Release,
            LedgerKind::Charge,
            LedgerKind::Refund,
            LedgerKind::Adjust,
        ]
        .into_iter()
        .find(|k| k.as_str() == text)
    }
}

/// One append-only ledger row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub id: i64,
    pub at: i64,
    pub key_id: String,
    pub period: PeriodKey,
    /// The task row, if the entry belongs to a task (not for `adjust`).
    pub reservation: Option<ReservationId>,
    /// The task's upstream id, if known by now.
    pub task_id: Option<String>,
    pub kind: LedgerKind,
    pub points: Points,
    pub note: String,
}

/// A manual correction of a key's charged points (admin).
#[derive(Debug, Clone)]
pub struct Adjustment {
    pub key_id: String,
    pub period: PeriodKey,
    /// Added to `charged`; negative to credit the key.
    pub points: Points,
    pub note: String,
    pub now: i64,
}

/// A callback body to deliver to the caller's `callback_url`.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub reservation: ReservationId,
    /// Whose callback secret signs the body at delivery time.
    pub key_id: String,
    pub url: String,
    pub body: Vec<u8>,
    /// First attempt not before this (usually `now`).
    pub now: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryState {
    Queued,
    Delivered,
    /// Given up after too many attempts; kept for a human.
    Dead,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Queued => "queued",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
        }
    }

    pub fn parse(text: &str) -> Option<DeliveryState> {
        [
            DeliveryState::Queued,
            DeliveryState::Delivered,
            DeliveryState::Dead,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryId(pub i64);

impl std::fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// One outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: DeliveryId,
    pub reservation: ReservationId,
    pub key_id: String,
    pub url: String,
    pub body: Vec<u8>,
    pub state: DeliveryState,
    /// Attempts made so far (delivered, failed and the final dead one all count).
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    /// When it was delivered or declared dead.
    pub done_at: Option<i64>,
}

/// Gauges for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreCounts {
    pub reserved_tasks: u64,
    pub pending_tasks: u64,
    pub queued_deliveries: u64,
    pub dead_deliveries: u64,
}

/// The ledger. All methods are async (boxed futures) and cancel-safe in the sense that a
/// dropped future either committed its transaction or did not; nothing is half-written.
pub trait Store: Send + Sync {
    /// In one transaction: check `charged + reserved + price <= quota` for the key's
    /// period, then create the task row (state `reserved`), a `reserve` ledger row and bump
    /// `reserved`. Durable when it returns. Errors: `QuotaExceeded`, `Conflict` (the
    /// callback token is already used).
    fn reserve(&self, reservation: NewReservation) -> StoreFuture<'_, ReservationId>;

    /// The upstream accepted the submit: record `task_id`; `reserved` → `pending`. A task
    /// that was settled (callback first) or released meanwhile keeps its state; the task
    /// id is recorded either way. Returns the state after the call. Errors: `NotFound`,
    /// `Conflict` (the row already has a different task id, or the task id is taken).
    fn attach(
        &self,
        reservation: ReservationId,
        task_id: &str,
        now: i64,
    ) -> StoreFuture<'_, TaskState>;

    /// The submit failed: give the reservation back (`release` ledger row, `reserved` −).
    /// Only from state `reserved`; returns whether this call released it (`false`: it was
    /// already pending, settled or released — nothing changed). Errors: `NotFound`.
    fn release(&self, reservation: ReservationId, reason: &str, now: i64) -> StoreFuture<'_, bool>;

    /// Settle a task exactly once (see `SettleResult`). Errors: `NotTerminal` when the
    /// status is not `"2"`/`"3"`.
    fn settle(&self, settlement: Settlement) -> StoreFuture<'_, SettleResult>;

    /// Record a non-terminal status of an open task (informative; also moves the task to
    /// the back of `pending_tasks`). Returns `false` when the task is unknown or closed.
    fn update_status(&self, task: TaskRef, status: &str, now: i64) -> StoreFuture<'_, bool>;

    fn task(&self, task: TaskRef) -> StoreFuture<'_, Option<TaskRecord>>;

    fn task_by_token(&self, token: &str) -> StoreFuture<'_, Option<TaskRecord>> {
        self.task(TaskRef::CallbackToken(token.to_string()))
    }

    fn task_by_id(&self, task_id: &str) -> StoreFuture<'_, Option<TaskRecord>> {
        self.task(TaskRef::TaskId(task_id.to_string()))
    }

    /// The key's balance in `period` (zeros when it has none).
    fn usage(&self, key_id: &str, period: PeriodKey) -> StoreFuture<'_, Usage>;

    /// Charged and reserved points of the key in `period`: `usage` without counting open
    /// tasks, cheap enough for every request (the quota gauge).
    fn committed(&self, key_id: &str, period: PeriodKey) -> StoreFuture<'_, Usage>;

    /// Every key the ledger knows (from a balance or a task row), each with its usage in
    /// the period `period_of(key_id)` names. Keys in the config that never used the
    /// gateway are absent: the caller fills them with `Usage::default()`.
    fn usage_all<'a>(
        &'a self,
        period_of: &'a (dyn Fn(&str) -> PeriodKey + Send + Sync),
    ) -> StoreFuture<'a, Vec<KeyUsage>>;

    /// Tasks in state `pending` (with a task id) created at or before `created_before`,
    /// least recently updated first, for the reconciler.
    fn pending_tasks(&self, created_before: i64, limit: u32) -> StoreFuture<'_, Vec<TaskRecord>>;

    /// Tasks still `reserved` without a task id, created at or before `created_before`:
    /// left behind by a crash between reserve and attach. Repair by `release`.
    fn stale_reservations(
        &self,
        created_before: i64,
        limit: u32,
    ) -> StoreFuture<'_, Vec<TaskRecord>>;

    /// The key's ledger rows in order; only the given task's when `task_id` is set.
    fn ledger_entries(
        &self,
        key_id: &str,
        task_id: Option<&str>,
    ) -> StoreFuture<'_, Vec<LedgerEntry>>;

    /// A manual correction: an `adjust` ledger row and `charged += points`.
    fn adjust(&self, adjustment: Adjustment) -> StoreFuture<'_, ()>;

    /// Queue a callback delivery (state `queued`, due at `now`).
    fn enqueue_delivery(&self, delivery: NewDelivery) -> StoreFuture<'_, DeliveryId>;

    /// Queued deliveries due at `now`, oldest first. Each returned row is leased: its
    /// `next_attempt_at` moves to `lease_until`, so an overlapping poll (or another replica)
    /// does not attempt it too, and a delivery whose attempt died with the process comes
    /// due again at `lease_until`.
    fn due_deliveries(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> StoreFuture<'_, Vec<Delivery>>;

    fn delivery(&self, id: DeliveryId) -> StoreFuture<'_, Option<Delivery>>;

    /// The attempt succeeded: `delivered`, attempts + 1. `false` when it was not queued.
    fn mark_delivered(&self, id: DeliveryId, now: i64) -> StoreFuture<'_, bool>;

    /// The attempt failed; retry at `next_attempt_at`. attempts + 1. `false` when not queued.
    fn mark_attempt_failed(
        &self,
        id: DeliveryId,
        next_attempt_at: i64,
        error: &str,
    ) -> StoreFuture<'_, bool>;

    /// The final attempt failed: `dead`, attempts + 1, kept for a human. `false` when not queued.
    fn mark_dead(&self, id: DeliveryId, error: &str, now: i64) -> StoreFuture<'_, bool>;

    /// Gauges: open tasks by state, queued and dead deliveries.
    fn counts(&self) -> StoreFuture<'_, StoreCounts>;

    /// Readiness: the store answers a trivial query.
    fn ping(&self) -> StoreFuture<'_, ()>;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error(
        "quota exceeded for key {key_id}: used {used} + reserved {reserved} + price {price} > quota {quota} points ({} period {period})",
        period.kind_label()
    )]
    QuotaExceeded {
        key_id: String,
        period: PeriodKey,
        used: Points,
        reserved: Points,
        quota: Points,
        price: Points,
    },
    /// The named row does not exist (a caller bug: e.g. attach on an unknown reservation).
    #[error("not found: {0}")]
    NotFound(String),
    /// A uniqueness rule was broken (callback token or task id used twice).
    #[error("conflict: {0}")]
    Conflict(String),
    /// An argument no caller should pass (e.g. a negative price); names the field.
    #[error("invalid ledger input: {0}")]
    Invalid(String),
    #[error("settle needs a terminal upstream status (\"2\" or \"3\"), got {status:?}")]
    NotTerminal { status: String },
    /// The database file was written by a newer gatehouse.
    #[error("store schema version {found} is newer than this gatehouse understands (up to {known}); upgrade gatehouse or point store.path at another file")]
    SchemaTooNew { found: i64, known: i64 },
    /// The database failed or is unreachable; the text is for operators.
    #[error("ledger database error: {0}")]
    Database(String),
}

impl From<StoreError> for GatewayError {
    fn from(error: StoreError) -> GatewayError {
        match error {
            StoreError::QuotaExceeded { .. } => GatewayError::QuotaExceeded(error.to_string()),
            // The ledger cannot be read or written right now: the request may succeed later.
            StoreError::Database(_) => GatewayError::ServiceUnavailable(error.to_string()),
            StoreError::NotFound(_)
            | StoreError::Conflict(_)
            | StoreError::Invalid(_)
            | StoreError::NotTerminal { .. }
            | StoreError::SchemaTooNew { .. } => GatewayError::Internal(error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn quota_exceeded_names_every_number() {
        let error = StoreError::QuotaExceeded {
            key_id: "alice".into(),
            period: PeriodKey::parse("2026-11-24").unwrap(),
            used: Points::from_whole(600),
            reserved: Points::from_whole(320),
            quota: Points::from_whole(1000),
            price: Points::from_milli(320_500),
        };
        let gateway: GatewayError = error.into();
        assert_eq!(gateway.status(), StatusCode::PAYMENT_REQUIRED);
        assert_eq!(
            gateway.message(),
            "quota exceeded for key alice: used 600 + reserved 320 + price 320.5 > quota 1000 points (daily period 2026-11-24)"
        );
    }

    #[test]
    fn other_errors_are_server_side() {
        let busy: GatewayError = StoreError::Database("database is locked".into()).into();
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        let bug: GatewayError = StoreError::NotFound("reservation 7".into()).into();
        assert_eq!(bug.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn usage_remaining_never_negative() {
        let usage = Usage {
            charged: Points::from_whole(80),
            reserved: Points::from_whole(30),
            open_tasks: 1,
        };
        assert_eq!(usage.committed(), Points::from_whole(110));
        assert_eq!(
            usage.remaining(Some(Points::from_whole(200))),
            Some(Points::from_whole(90))
        );
        assert_eq!(
            usage.remaining(Some(Points::from_whole(100))),
            Some(Points::ZERO)
        );
        assert_eq!(usage.remaining(None), None);
    }
}
