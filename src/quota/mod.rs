//! Point quotas: the storage half of the ledger (design.md §2, §3).
//!
//! This module does nothing to a request by itself and puts nothing into extensions; the
//! quota layer and the callback handler call it. What it offers:
//!
//! - `Store` (`store.rs`): reserve / attach / release / settle of tasks, balances per key
//!   and period, the append-only ledger, and the durable callback outbox; used as
//!   `Arc<dyn Store>`.
//! - `SqliteStore` (`sqlite.rs`): the embedded implementation (WAL, one writer connection).
//! - `task_cost` / `is_terminal` (`cost.rs`): what a finished upstream task costs.
//! - `PeriodKey`, `Clock` (`period.rs`): which quota period a moment belongs to (UTC).
//!
//! Typical use by the request path:
//!
//! ```text
//! let period = PeriodKey::current(policy.quota_period, clock);
//! let id = store.reserve(NewReservation { .., quota: policy.quota_points, price, .. }).await?; // 402 via From
//! match upstream submit {
//!     accepted(task_id) => store.attach(id, &task_id, now).await?,
//!     rejected          => store.release(id, "upstream code 403", now).await?,
//! }
//! // callback / feed / reconciler with a terminal status:
//! store.settle(Settlement { by: TaskRef::CallbackToken(token), status, raw_point, raw_refund, now }).await?
//! ```

pub mod cost;
pub mod layer;
pub mod ledger;
pub mod period;
pub mod sqlite;
pub mod store;

pub use cost::{is_terminal, task_cost, Anomaly};
pub use ledger::{Ledger, ReportOutcome, ReservationRequest, TaskReport};
pub use period::{period_end, Clock, ManualClock, PeriodKey, SystemClock};
pub use sqlite::SqliteStore;
pub use store::{
    Adjustment, Delivery, DeliveryId, DeliveryState, KeyUsage, LedgerEntry, LedgerKind,
    NewDelivery, NewReservation, ReservationId, SettleResult, Settlement, Store, StoreCounts,
    StoreError, StoreFuture, TaskRecord, TaskRef, TaskState, Usage,
};
