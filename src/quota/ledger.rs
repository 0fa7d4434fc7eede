//! `Ledger`: the store together with the clock and the metrics every point movement needs,
//! and `TaskReport`, the upstream's task record as it arrives from a callback, a
//! `/runway/feed` answer or the reconciler.
//!
//! All three sources go through `Ledger::apply_report`, so a task is settled by the same
//! code whichever source sees the terminal status first; the store's conditional state
//! change makes the others harmless.

use super::{
    is_terminal, Clock, NewReservation, PeriodKey, ReservationId, SettleResult, Settlement, Store,
    StoreError, TaskRef,
};
use crate::config::KeyPolicy;
use crate::metrics::Metrics;
use crate::points::Points;
use serde_json::Value;
use std::sync::Arc;

/// The fields of an upstream task record that accounting needs, as strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskReport {
    pub task_id: Option<String>,
    pub status: String,
    pub point: String,
    pub refund: String,
}

impl TaskReport {
    /// Reads the flat record (`{"task_id":…,"status":"3",…}`) or the wrapped form
    /// (`{"code":200,"msg":…,"data":{…}}`). Numbers where strings are documented are
    /// accepted and turned into their decimal text: the upstream is not strict about types.
    pub fn from_json(value: &Value) -> Option<TaskReport> {
        let record = match value.get("data") {
            Some(data) if data.is_object() => data,
            _ => value,
        };
        let object = record.as_object()?;
        if !object.contains_key("status") && !object.contains_key("task_id") {
            return None;
        }
        let text = |name: &str| match object.get(name) {
            Some(Value::String(s)) => s.trim().to_string(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        };
        let task_id = text("task_id");
        Some(TaskReport {
            task_id: (!task_id.is_empty()).then_some(task_id),
            status: text("status"),
            point: text("point"),
            refund: text("refund"),
        })
    }

    pub fn is_terminal(&self) -> bool {
        is_terminal(&self.status)
    }

    /// `"0"`–`"3"` and empty are documented; anything else is kept pending and counted.
    pub fn has_known_status(&self) -> bool {
        matches!(self.status.as_str(), "" | "0" | "1" | "2" | "3")
    }
}

/// What the request path knows when it reserves; the ledger adds the period, quota and time.
#[derive(Debug, Clone)]
pub struct ReservationRequest {
    pub key_id: String,
    pub price: Points,
    pub callback_token: Option<String>,
    pub caller_callback_url: Option<String>,
    pub route: String,
    pub model: Option<String>,
    pub seconds: Option<u32>,
}

/// What applying a report did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportOutcome {
    Settled { key_id: String, charged: Points },
    AlreadySettled,
    StillPending,
    UnknownTask,
}

pub struct Ledger {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
}

impl Ledger {
    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// The period a key's usage is counted in right now.
    pub fn current_period(&self, policy: &KeyPolicy) -> PeriodKey {
        PeriodKey::current(policy.quota_period, self.clock.as_ref())
    }

    /// Reserves `price` for a new task (402 when it does not fit) in the key's current
    /// period, against its quota.
    pub async fn reserve(
        &self,
        key_label: &str,
        policy: &KeyPolicy,
        request: ReservationRequest,
    ) -> Result<ReservationId, StoreError> {
        let price = request.price;
        let key_id = request.key_id.clone();
        let id = self
            .store
            .reserve(NewReservation {
                key_id: request.key_id,
                period: self.current_period(policy),
                quota: policy.quota_points,
                price: request.price,
                callback_token: request.callback_token,
                caller_callback_url: request.caller_callback_url,
                route: request.route,
                model: request.model,
                seconds: request.seconds,
                now: self.now(),
            })
            .await?;
        self.metrics
            .points_reserved_total
            .with_label_values(&[key_label])
            .inc_by(price.as_f64());
        self.refresh_remaining(&key_id, key_label, policy).await;
        Ok(id)
    }

    /// The upstream created the task: link its id to the reservation.
    pub async fn attach(&self, reservation: ReservationId, task_id: &str) {
        if let Err(err) = self.store.attach(reservation, task_id, self.now()).await {
            // The task exists upstream; the reconciler cannot find it without its id, so this
            // is worth an operator's attention.
            tracing::error!(%reservation, task_id, error = %err, "could not record the task id of a reservation");
        }
    }

    /// No task was created: give the points back.
    pub async fn release(
        &self,
        reservation: ReservationId,
        reason: &str,
        key_label: &str,
        policy: &KeyPolicy,
    ) {
        match self.store.release(reservation, reason, self.now()).await {
            Ok(true) => {
                if let Ok(Some(task)) = self.store.task(TaskRef::Reservation(reservation)).await {
                    self.metrics
                        .points_released_total
                        .with_label_values(&[key_label])
                        .inc_by(task.reserved.as_f64());
                    self.refresh_remaining(&task.key_id, key_label, policy)
                        .await;
                }
                tracing::info!(%reservation, reason, "reservation released");
            }
            Ok(false) => {}
            Err(err) => {
                // Left reserved; the reconciler releases stale reservations later.
                tracing::error!(%reservation, reason, error = %err, "could not release a reservation");
            }
        }
    }

    /// Applies a task record from `source` (`callback`, `feed`, `reconciler`): settles a
    /// terminal one exactly once, records a non-terminal status.
    pub async fn apply_report(
        &self,
        task: TaskRef,
        report: &TaskReport,
        source: &'static str,
        key_label_of: impl Fn(&str) -> (String, Option<Arc<KeyPolicy>>),
    ) -> Result<ReportOutcome, StoreError> {
        if !report.has_known_status() {
            self.metrics
                .unknown_task_status_total
                .with_label_values(&[source])
                .inc();
            tracing::warn!(status = %report.status, source, "task record with an undocumented status; treated as pending");
        }
        if !report.is_terminal() {
            let known = self
                .store
                .update_status(task, &report.status, self.now())
                .await?;
            return Ok(if known {
                ReportOutcome::StillPending
            } else {
                ReportOutcome::UnknownTask
            });
        }
        let result = self
            .store
            .settle(Settlement {
                by: task,
                status: report.status.clone(),
                raw_point: report.point.clone(),
                raw_refund: report.refund.clone(),
                now: self.now(),
            })
            .await?;
        match result {
            SettleResult::Settled {
                key_id,
                charged,
                anomaly,
                ..
            } => {
                let (key_label, policy) = key_label_of(&key_id);
                let outcome = if report.status == "3" {
                    "succeeded"
                } else {
                    "failed"
                };
                self.metrics
                    .tasks_settled_total
                    .with_label_values(&[outcome])
                    .inc();
                self.metrics
                    .points_charged_total
                    .with_label_values(&[&key_label])
                    .inc_by(charged.as_f64());
                if let Some(refund) = super::cost::refund_amount(&report.refund) {
                    self.metrics
                        .points_refunded_total
                        .with_label_values(&[&key_label])
                        .inc_by(refund.as_f64());
                }
                if let Some(anomaly) = anomaly {
                    self.metrics
                        .settlement_anomalies_total
                        .with_label_values(&[anomaly.label()])
                        .inc();
                    tracing::warn!(key = %key_id, task_id = report.task_id.as_deref().unwrap_or("-"), point = %report.point, refund = %report.refund, anomaly = anomaly.label(), "settled with the reserved estimate");
                }
                tracing::info!(key = %key_id, task_id = report.task_id.as_deref().unwrap_or("-"), status = %report.status, charged = %charged, source, "task settled");
                if let Some(policy) = policy {
                    self.refresh_remaining(&key_id, &key_label, &policy).await;
                }
                Ok(ReportOutcome::Settled { key_id, charged })
            }
            SettleResult::AlreadySettled => Ok(ReportOutcome::AlreadySettled),
            SettleResult::NotFound => Ok(ReportOutcome::UnknownTask),
        }
    }

    /// Sets `gatehouse_quota_remaining_points{key}` from the store.
    pub async fn refresh_remaining(&self, key_id: &str, key_label: &str, policy: &KeyPolicy) {
        let Some(quota) = policy.quota_points else {
            return;
        };
        // Principals without a [[keys]] entry share one label: a per-principal value
        // would overwrite the others', so it is not reported.
        if key_label != key_id || key_label == crate::auth::UNLISTED_JWT_LABEL {
            return;
        }
        // Not `usage`: counting open tasks on every request grows with their number.
        if let Ok(usage) = self
            .store
            .committed(key_id, self.current_period(policy))
            .await
        {
            let remaining = usage.remaining(Some(quota)).unwrap_or(Points::ZERO);
            self.metrics
                .quota_remaining_points
                .with_label_values(&[key_label])
                .set(remaining.as_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_flat_wrapped_and_loosely_typed_records() {
        let flat = json!({"task_id":"t1","status":"3","point":"320","refund":"0"});
        let wrapped = json!({"code":200,"msg":"成功","data":{"task_id":"t1","status":"3","point":"320","refund":"0"}});
        let numbers = json!({"task_id":"t1","status":3,"point":320,"refund":0});
        let expected = TaskReport {
            task_id: Some("t1".into()),
            status: "3".into(),
            point: "320".into(),
            refund: "0".into(),
        };
        assert_eq!(TaskReport::from_json(&flat), Some(expected.clone()));
        assert_eq!(TaskReport::from_json(&wrapped), Some(expected.clone()));
        assert_eq!(TaskReport::from_json(&numbers), Some(expected));
        assert_eq!(TaskReport::from_json(&json!([1])), None);
        assert_eq!(TaskReport::from_json(&json!({"hello":"x"})), None);
        let not_exist = json!({"code":400,"msg":"task_not_exist","data":null});
        assert_eq!(TaskReport::from_json(&not_exist), None);
    }

    #[test]
    fn statuses_outside_the_documented_ones_are_pending() {
        let report = |status: &str| TaskReport {
            task_id: None,
            status: status.into(),
            point: String::new(),
            refund: String::new(),
        };
        assert!(report("3").is_terminal() && report("2").is_terminal());
        assert!(!report("1").is_terminal() && !report("").is_terminal());
        assert!(!report("4").is_terminal() && !report("4").has_known_status());
        assert!(report("0").has_known_status());
    }
}
