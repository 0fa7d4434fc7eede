//! What a finished upstream task costs the key that submitted it.
//!
//! The upstream reports `status`, `point` and `refund` as strings (upstream-api.md,
//! "/runway/feed"). The rule, followed literally:
//!
//! - status `"2"` (failed): the upstream refunds the task, so it costs **0**;
//! - status `"3"` (succeeded): `point − refund` when `refund` parses as an amount smaller
//!   than `point`, else `point`. Consequences of reading it literally: refund `"0"` or
//!   empty → `point`; refund `"1"` with point `"320"` → 319 (the rule has no way to tell
//!   the flag `"1"` from an amount of 1, and an amount is what it names first); a refund
//!   equal to or larger than `point` → `point` (a succeeded task is never free);
//! - an empty or unparseable `point` on a terminal task → the reserved estimate, with an
//!   `Anomaly` for the caller to log and count. A negative `point` counts as unparseable:
//!   a charge must never credit a key.
//!
//! Every other status is not terminal ("0", "1", empty, and unknown values, which the
//! upstream doc says to treat as pending).

use crate::points::Points;

pub const STATUS_FAILED: &str = "2";
pub const STATUS_SUCCEEDED: &str = "3";

/// Something about a terminal task record that the cost rule had to work around.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Anomaly {
    /// `point` was empty on a succeeded task; the estimate was charged.
    MissingPoint,
    /// `point` was not a non-negative decimal; the estimate was charged.
    UnparseablePoint,
    /// `refund` was neither empty nor a non-negative decimal; `point` was charged.
    UnparseableRefund,
}

impl Anomaly {
    /// Fixed label for metrics, logs and the `tasks.anomaly` column.
    pub fn label(self) -> &'static str {
        match self {
            Anomaly::MissingPoint => "missing_point",
            Anomaly::UnparseablePoint => "unparseable_point",
            Anomaly::UnparseableRefund => "unparseable_refund",
        }
    }

    pub fn from_label(label: &str) -> Option<Anomaly> {
        [
            Anomaly::MissingPoint,
            Anomaly::UnparseablePoint,
            Anomaly::UnparseableRefund,
        ]
        .into_iter()
        .find(|a| a.label() == label)
    }
}

impl std::fmt::Display for Anomaly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// `"2"` and `"3"` are final; everything else (including unknown values) is pending.
pub fn is_terminal(status: &str) -> bool {
    matches!(status.trim(), STATUS_FAILED | STATUS_SUCCEEDED)
}

/// The cost of a task in `status` with the upstream's raw `point`/`refund` strings;
/// `estimate` is what was reserved for it. For a non-terminal status (a caller bug: only
/// terminal tasks are settled) the estimate is returned, with no anomaly.
pub fn task_cost(
    status: &str,
    raw_point: &str,
    raw_refund: &str,
    estimate: Points,
) -> (Points, Option<Anomaly>) {
    match status.trim() {
        STATUS_FAILED => (Points::ZERO, None),
        STATUS_SUCCEEDED => {
            let point = match parse_amount(raw_point) {
                Amount::Empty => return (estimate, Some(Anomaly::MissingPoint)),
                Amount::Invalid => return (estimate, Some(Anomaly::UnparseablePoint)),
                Amount::Value(point) => point,
            };
            match parse_amount(raw_refund) {
                Amount::Value(refund) if refund < point => (point.saturating_sub(refund), None),
                Amount::Value(_) | Amount::Empty => (point, None),
                Amount::Invalid => (point, Some(Anomaly::UnparseableRefund)),
            }
        }
        _ => (estimate, None),
    }
}

/// `refund` as a positive amount, for the informative `refund` ledger row.
pub fn refund_amount(raw_refund: &str) -> Option<Points> {
    match parse_amount(raw_refund) {
        Amount::Value(refund) if refund > Points::ZERO => Some(refund),
        _ => None,
    }
}

enum Amount {
    Empty,
    Invalid,
    Value(Points),
}

fn parse_amount(raw: &str) -> Amount {
    if raw.trim().is_empty() {
        return Amount::Empty;
    }
    match raw.parse::<Points>() {
        Ok(points) if points >= Points::ZERO => Amount::Value(points),
        _ => Amount::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Points {
        text.parse().unwrap()
    }

    #[test]
    fn cost_rule_table() {
        let estimate = p("300");
        // (status, point, refund, expected cost, expected anomaly)
        let cases: &[(&str, &str, &str, &str, Option<Anomaly>)] = &[
            // failed tasks are free, whatever the strings say
            ("2", "320", "320", "0", None),
            ("2", "320", "0", "0", None),
            ("2", "", "", "0", None),
            ("2", "garbage", "x", "0", None),
            // succeeded: point − refund when refund < point
            ("3", "320", "0", "320", None),
            ("3", "320", "", "320", None),
            ("3", "320", "20", "300", None),
            ("3", "12.5", "2.25", "10.25", None),
            ("3", " 200 ", " 50 ", "150", None),
            // the literal rule: "1" is an amount of 1 when point > 1
            ("3", "320", "1", "319", None),
            ("3", "1", "1", "1", None),
            ("3", "0.5", "1", "0.5", None),
            // refund ≥ point → point
            ("3", "320", "320", "320", None),
            ("3", "320", "500", "320", None),
            ("3", "0", "0", "0", None),
            // bad refund → point, flagged
            ("3", "320", "yes", "320", Some(Anomaly::UnparseableRefund)),
            ("3", "320", "-20", "320", Some(Anomaly::UnparseableRefund)),
            // bad point → estimate, flagged
            ("3", "", "0", "300", Some(Anomaly::MissingPoint)),
            ("3", "   ", "", "300", Some(Anomaly::MissingPoint)),
            ("3", "abc", "0", "300", Some(Anomaly::UnparseablePoint)),
            ("3", "1e3", "0", "300", Some(Anomaly::UnparseablePoint)),
            ("3", "-320", "0", "300", Some(Anomaly::UnparseablePoint)),
            // status with whitespace is still terminal
            (" 3 ", "320", "0", "320", None),
            // non-terminal: estimate, no anomaly
            ("1", "320", "0", "300", None),
            ("", "", "", "300", None),
            ("7", "320", "0", "300", None),
        ];
        for (status, point, refund, want, anomaly) in cases {
            assert_eq!(
                task_cost(status, point, refund, estimate),
                (p(want), *anomaly),
                "status {status:?} point {point:?} refund {refund:?}"
            );
        }
    }

    #[test]
    fn terminal_statuses() {
        for (status, terminal) in [
            ("2", true),
            ("3", true),
            (" 3", true),
            ("0", false),
            ("1", false),
            ("", false),
            ("4", false),
            ("succeeded", false),
        ] {
            assert_eq!(is_terminal(status), terminal, "{status:?}");
        }
    }

    #[test]
    fn refund_amount_is_positive_or_none() {
        assert_eq!(refund_amount("20"), Some(p("20")));
        assert_eq!(refund_amount("0"), None);
        assert_eq!(refund_amount(""), None);
        assert_eq!(refund_amount("-1"), None);
        assert_eq!(refund_amount("x"), None);
    }

    #[test]
    fn anomaly_labels_roundtrip() {
        for a in [
            Anomaly::MissingPoint,
            Anomaly::UnparseablePoint,
            Anomaly::UnparseableRefund,
        ] {
            assert_eq!(Anomaly::from_label(a.label()), Some(a));
        }
        assert_eq!(Anomaly::from_label("nope"), None);
    }
}
