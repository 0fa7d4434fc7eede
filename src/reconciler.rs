//! The reconciler: settles tasks that no callback and no caller's feed reported on.
//!
//! Every `reconciler.interval_s` it
//! 1. releases reservations that never got an upstream answer (the gateway died between
//!    reserve and attach): `reserved` rows older than `stale_reservation_after_s`;
//! 2. polls `POST /runway/feed` with the upstream token for tasks pending longer than
//!    `reconcile_after_s` (at most `concurrency` at once) and settles terminal ones;
//!    `task_not_exist` shortly after submit is normal and leaves the task pending;
//! 3. counts tasks pending longer than `max_pending_s`: they stay reserved, show in
//!    `gatehouse_tasks_stuck` and a warning, for a human to look at.

use crate::body;
use crate::quota::layer::{key_label_and_policy, RUNWAY_PRODUCT};
use crate::quota::{Ledger, TaskRecord, TaskRef, TaskReport};
use crate::snapshot::{LiveSnapshot, Snapshot};
use http::{header, Request};
use std::sync::Arc;
use std::time::Duration;

/// Tasks looked at per round; the rest wait for the next round.
const ROUND_LIMIT: u32 = 500;

/// What one round did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoundSummary {
    pub released_stale: usize,
    pub polled: usize,
    pub settled: usize,
    pub stuck: usize,
}

#[derive(Clone)]
pub struct Reconciler {
    ledger: Arc<Ledger>,
    live: Arc<LiveSnapshot>,
}

impl Reconciler {
    pub fn new(ledger: Arc<Ledger>, live: Arc<LiveSnapshot>) -> Reconciler {
        Reconciler { ledger, live }
    }

    /// Runs rounds forever (until the task is aborted).
    pub async fn run(self) {
        loop {
            let summary = self.run_once().await;
            if summary != RoundSummary::default() {
                tracing::info!(?summary, "reconciler round");
            }
            let interval = self.live.load().config.reconciler.interval_s;
            tokio::time::sleep(Duration::from_secs(interval)).await;
        }
    }

    /// One round; also what tests call directly.
    pub async fn run_once(&self) -> RoundSummary {
        let snapshot = self.live.load_full();
        let settings = &snapshot.config.reconciler;
        let now = self.ledger.now();
        let mut summary = RoundSummary::default();

        let stale_after_s = settings.stale_reservation_after_s(&snapshot.config.upstream) as i64;
        match self
            .ledger
            .store
            .stale_reservations(now - stale_after_s, ROUND_LIMIT)
            .await
        {
            Ok(stale) => {
                for task in stale {
                    let (label, policy) = key_label_and_policy(&snapshot, &task.key_id);
                    let policy = policy.unwrap_or_default();
                    self.ledger
                        .release(
                            task.id,
                            "no upstream answer was recorded (gateway restarted during submit)",
                            &label,
                            &policy,
                        )
                        .await;
                    summary.released_stale += 1;
                }
            }
            Err(err) => tracing::error!(error = %err, "reconciler cannot list stale reservations"),
        }

        let pending = match self
            .ledger
            .store
            .pending_tasks(now - settings.reconcile_after_s as i64, ROUND_LIMIT)
            .await
        {
            Ok(pending) => pending,
            Err(err) => {
                tracing::error!(error = %err, "reconciler cannot list pending tasks");
                return summary;
            }
        };
        let stuck_before = now - settings.max_pending_s as i64;
        summary.stuck = pending
            .iter()
            .filter(|task| task.created_at <= stuck_before)
            .count();
        for task in pending
            .iter()
            .filter(|task| task.created_at <= stuck_before)
        {
            tracing::warn!(key = %task.key_id, task_id = task.task_id.as_deref().unwrap_or("-"), created_at = task.created_at, "task pending past reconciler.max_pending_s; its points stay reserved");
        }

        let semaphore = Arc::new(tokio::sync::Semaphore::new(settings.concurrency.max(1)));
        let mut polls = tokio::task::JoinSet::new();
        for task in pending {
            let permit = semaphore
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let reconciler = self.clone();
            let snapshot = snapshot.clone();
            polls.spawn(async move {
                let settled = reconciler.poll(&snapshot, task).await;
                drop(permit);
                settled
            });
        }
        while let Some(result) = polls.join_next().await {
            summary.polled += 1;
            if matches!(result, Ok(true)) {
                summary.settled += 1;
            }
        }

        self.ledger.metrics.tasks_stuck.set(summary.stuck as i64);
        if let Ok(counts) = self.ledger.store.counts().await {
            self.ledger
                .metrics
                .tasks_pending
                .set((counts.pending_tasks + counts.reserved_tasks) as i64);
        }
        summary
    }

    /// Feeds one task; returns whether it was settled by this call.
    async fn poll(&self, snapshot: &Snapshot, task: TaskRecord) -> bool {
        let Some(task_id) = task.task_id.clone() else {
            return false;
        };
        // Only Runway tasks can be polled through /runway/feed: generate tasks (a bare id) and
        // pass-through Runway submits ("runway:<id>"). Other products' tasks settle when their
        // owner fetches them; they are moved to the back of the queue.
        let feed_id = match task_id.split_once(':') {
            None => task_id.clone(),
            Some((RUNWAY_PRODUCT, id)) => id.to_string(),
            Some(_) => {
                let _ = self
                    .ledger
                    .store
                    .update_status(TaskRef::TaskId(task_id), &task.status, self.ledger.now())
                    .await;
                return false;
            }
        };
        let report = match feed_upstream(snapshot, &feed_id, &self.ledger.metrics).await {
            FeedAnswer::Record(report) => report,
            FeedAnswer::NoRecord(why) => {
                // `task_not_exist` right after submit, or an upstream error: try again next
                // round (moved to the back of the queue).
                tracing::debug!(task_id, why, "reconciler feed: no record yet");
                let _ = self
                    .ledger
                    .store
                    .update_status(TaskRef::TaskId(task_id), &task.status, self.ledger.now())
                    .await;
                return false;
            }
        };
        match self
            .ledger
            .apply_report(
                TaskRef::TaskId(task_id.clone()),
                &report,
                "reconciler",
                |key_id| key_label_and_policy(snapshot, key_id),
            )
            .await
        {
            Ok(crate::quota::ReportOutcome::Settled { .. }) => true,
            Ok(_) => false,
            Err(err) => {
                tracing::error!(task_id, error = %err, "reconciler could not settle a task");
                false
            }
        }
    }
}

/// What `POST /runway/feed` with the upstream token said about one task.
#[derive(Debug)]
pub enum FeedAnswer {
    Record(TaskReport),
    /// No usable record (`task_not_exist`, an error envelope, no answer); the text says which.
    NoRecord(String),
}

/// Asks the upstream for a task's record with the upstream token.
pub async fn feed_upstream(
    snapshot: &Snapshot,
    task_id: &str,
    metrics: &crate::metrics::Metrics,
) -> FeedAnswer {
    let request = Request::post("/runway/feed")
        .header(header::CONTENT_TYPE, "application/json")
        .body(body::full(
            serde_json::json!({ "task_id": task_id }).to_string(),
        ))
        .expect("a literal request is valid");
    let response = match snapshot
        .upstream
        .send(&snapshot.config.upstream, request, metrics)
        .await
    {
        Ok(response) => response,
        Err(err) => return FeedAnswer::NoRecord(err.message()),
    };
    let bytes = match crate::upstream::read_answer(
        response.into_body(),
        1024 * 1024,
        &snapshot.config.upstream,
    )
    .await
    {
        Ok(bytes) => bytes,
        Err(err) => return FeedAnswer::NoRecord(err.message()),
    };
    let value: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(value) => value,
        Err(_) => return FeedAnswer::NoRecord("the feed answer is not JSON".into()),
    };
    if value["code"] != 200 {
        return FeedAnswer::NoRecord(format!("upstream answered {value}"));
    }
    match TaskReport::from_json(&value) {
        Some(report) => FeedAnswer::Record(report),
        None => FeedAnswer::NoRecord("the feed answer holds no task record".into()),
    }
}
