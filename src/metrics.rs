//! Prometheus metrics: one registry per gateway (so tests can run several gateways in one
//! process), rendered as Prometheus text on `/metrics`.
//!
//! Label values are bounded: route names come from the route table, `key` is a configured
//! key id (JWT principals without a `[[keys]]` entry share `_jwt`), reasons and kinds are
//! fixed strings. Raw paths, tokens and task ids never become label values.

use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    pub upstream_duration_seconds: HistogramVec,
    pub requests_in_flight: IntGauge,
    pub auth_failures_total: IntCounterVec,
    pub rate_limited_total: IntCounterVec,
    pub upstream_errors_total: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub ratelimit_tracked_keys: IntGauge,
    pub points_reserved_total: CounterVec,
    pub points_charged_total: CounterVec,
    pub points_refunded_total: CounterVec,
    pub points_released_total: CounterVec,
    pub quota_remaining_points: GaugeVec,
    pub tasks_pending: IntGauge,
    pub tasks_stuck: IntGauge,
    pub tasks_settled_total: IntCounterVec,
    pub callbacks_received_total: IntCounterVec,
    pub callback_deliveries_total: IntCounterVec,
    pub settlement_anomalies_total: IntCounterVec,
    pub unknown_task_status_total: IntCounterVec,
    pub config_reloads_total: IntCounterVec,
    pub model_requests_total: IntCounterVec,
    pub tokens_total: IntCounterVec,
    pub route_points_charged_total: CounterVec,
    pub config_last_reload_success_timestamp_seconds: Gauge,
}

/// Latency buckets from 0.5 ms (gateway overhead) to 2 min (slow generations).
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let int_counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("metric names and labels are valid literals");
            registry
                .register(Box::new(metric.clone()))
                .expect("each metric is registered once");
            metric
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = CounterVec::new(Opts::new(name, help), labels)
                .expect("metric names and labels are valid literals");
            registry
                .register(Box::new(metric.clone()))
                .expect("each metric is registered once");
            metric
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec());
            let metric =
                HistogramVec::new(opts, labels).expect("metric names and labels are valid");
            registry
                .register(Box::new(metric.clone()))
                .expect("each metric is registered once");
            metric
        };
        let int_gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).expect("valid metric name");
            registry
                .register(Box::new(metric.clone()))
                .expect("each metric is registered once");
            metric
        };

        let requests_total = int_counter(
            "gatehouse_requests_total",
            "Requests answered, by route name, HTTP status and key id.",
            &["route", "status", "key"],
        );
        let request_duration_seconds = histogram(
            "gatehouse_request_duration_seconds",
            "Time from request arrival to response headers, by route.",
            &["route"],
        );
        let upstream_duration_seconds = histogram(
            "gatehouse_upstream_duration_seconds",
            "Time the upstream took to answer (response headers), by route.",
            &["route"],
        );
        let requests_in_flight = int_gauge(
            "gatehouse_requests_in_flight",
            "Requests currently being handled.",
        );
        let auth_failures_total = int_counter(
            "gatehouse_auth_failures_total",
            "Rejected credentials, by reason.",
            &["reason"],
        );
        let rate_limited_total = int_counter(
            "gatehouse_rate_limited_total",
            "Requests refused by a rate limit, by key and scope (key or global).",
            &["key", "scope"],
        );
        let upstream_errors_total = int_counter(
            "gatehouse_upstream_errors_total",
            "Upstream failures, by kind (connect, timeout, protocol, status_5xx, upstream_auth).",
            &["kind"],
        );
        let build_info = IntGaugeVec::new(
            Opts::new(
                "gatehouse_build_info",
                "Always 1; labels say which build and which config are running.",
            ),
            &["version", "config_hash"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(build_info.clone()))
            .expect("registered once");
        let ratelimit_tracked_keys = int_gauge(
            "gatehouse_ratelimit_tracked_keys",
            "JWT principals without a [[keys]] entry currently tracked by the [defaults] limiter (bounded by idle eviction).",
        );
        let points_reserved_total = counter(
            "gatehouse_points_reserved_total",
            "Points reserved at submit, by key.",
            &["key"],
        );
        let points_charged_total = counter(
            "gatehouse_points_charged_total",
            "Points charged at settlement (point - refund), by key.",
            &["key"],
        );
        let points_refunded_total = counter(
            "gatehouse_points_refunded_total",
            "Points the upstream refunded on settled tasks, by key.",
            &["key"],
        );
        let points_released_total = counter(
            "gatehouse_points_released_total",
            "Reserved points released because no task was created, by key.",
            &["key"],
        );
        let quota_remaining_points = GaugeVec::new(
            Opts::new(
                "gatehouse_quota_remaining_points",
                "Quota minus charged minus reserved in the current period, by key.",
            ),
            &["key"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(quota_remaining_points.clone()))
            .expect("registered once");
        let tasks_pending = int_gauge(
            "gatehouse_tasks_pending",
            "Tasks submitted and not yet settled.",
        );
        let tasks_stuck = int_gauge(
            "gatehouse_tasks_stuck",
            "Tasks pending longer than reconciler.max_pending_s; they stay reserved for a human to check.",
        );
        let tasks_settled_total = int_counter(
            "gatehouse_tasks_settled_total",
            "Tasks settled, by outcome (succeeded, failed).",
            &["outcome"],
        );
        let callbacks_received_total = int_counter(
            "gatehouse_callbacks_received_total",
            "Upstream callbacks received, by result.",
            &["result"],
        );
        let callback_deliveries_total = int_counter(
            "gatehouse_callback_deliveries_total",
            "Deliveries to callers' callback URLs, by result (delivered, retry, dead).",
            &["result"],
        );
        let settlement_anomalies_total = int_counter(
            "gatehouse_settlement_anomalies_total",
            "Settlements that could not use the upstream's point/refund as given, by kind.",
            &["kind"],
        );
        let unknown_task_status_total = int_counter(
            "gatehouse_unknown_task_status_total",
            "Task records with a status value the upstream does not document, by source.",
            &["source"],
        );
        let config_reloads_total = int_counter(
            "gatehouse_config_reloads_total",
            "Configuration reloads, by result (success, error).",
            &["result"],
        );
        let config_last_reload_success_timestamp_seconds = Gauge::new(
            "gatehouse_config_last_reload_success_timestamp_seconds",
            "Unix time of the last configuration that was loaded successfully.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(
                config_last_reload_success_timestamp_seconds.clone(),
            ))
            .expect("registered once");

        let model_requests_total = int_counter(
            "gatehouse_model_requests_total",
            "Requests on routes that name a model, by route and model (unlisted models: other).",
            &["route", "model"],
        );
        let tokens_total = int_counter(
            "gatehouse_tokens_total",
            "Tokens reported in the upstream's usage, by route, model and direction (prompt, completion).",
            &["route", "model", "direction"],
        );
        let route_points_charged_total = counter(
            "gatehouse_route_points_charged_total",
            "Points charged on pass-through routes, by route and model.",
            &["route", "model"],
        );

        // Series with fixed label values exist from the start (at 0), so dashboards, alerts
        // and `rate()` see them before the first event rather than a missing series.
        for (metric, values) in [
            (&config_reloads_total, &["success", "error"][..]),
            (
                &upstream_errors_total,
                &[
                    "connect",
                    "timeout",
                    "protocol",
                    "status_5xx",
                    "upstream_auth",
                ][..],
            ),
            (&tasks_settled_total, &["succeeded", "failed"][..]),
            (
                &callbacks_received_total,
                &[
                    "accepted",
                    "accepted_unverified",
                    "unconfirmed",
                    "mismatch",
                    "unknown_token",
                    "malformed",
                    "error",
                ][..],
            ),
            (
                &callback_deliveries_total,
                &["delivered", "retry", "dead"][..],
            ),
            (
                &settlement_anomalies_total,
                &[
                    "missing_point",
                    "unparseable_point",
                    "unparseable_refund",
                    "missing_usage",
                    "stream_incomplete",
                ][..],
            ),
            (
                &unknown_task_status_total,
                &["callback", "feed", "reconciler"][..],
            ),
            (&auth_failures_total, crate::error::AuthFailure::LABELS),
        ] {
            for value in values {
                metric.with_label_values(&[value]);
            }
        }

        Metrics {
            registry,
            requests_total,
            request_duration_seconds,
            upstream_duration_seconds,
            requests_in_flight,
            auth_failures_total,
            rate_limited_total,
            upstream_errors_total,
            build_info,
            ratelimit_tracked_keys,
            points_reserved_total,
            points_charged_total,
            points_refunded_total,
            points_released_total,
            quota_remaining_points,
            tasks_pending,
            tasks_stuck,
            tasks_settled_total,
            callbacks_received_total,
            callback_deliveries_total,
            settlement_anomalies_total,
            unknown_task_status_total,
            config_reloads_total,
            config_last_reload_success_timestamp_seconds,
            model_requests_total,
            tokens_total,
            route_points_charged_total,
        }
    }

    /// Creates the per-key series at 0 for every configured key.
    pub fn init_keys<'a>(&self, key_ids: impl Iterator<Item = &'a str>) {
        for key in key_ids {
            for metric in [
                &self.points_reserved_total,
                &self.points_charged_total,
                &self.points_refunded_total,
                &self.points_released_total,
            ] {
                metric.with_label_values(&[key]);
            }
            for scope in ["key", "global"] {
                self.rate_limited_total.with_label_values(&[key, scope]);
            }
        }
    }

    /// Marks which configuration is live (by a short hash of its text).
    pub fn set_config_info(&self, config_hash: &str) {
        self.build_info.reset();
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), config_hash])
            .set(1);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("encoding gathered metrics into a Vec cannot fail");
        String::from_utf8(buffer).expect("the text encoder writes UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
