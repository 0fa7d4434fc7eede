//! Quota periods and the clock.
//!
//! A key's quota applies to one period at a time. The ledger files every reservation and
//! charge under a `PeriodKey` — `"2026-11-24"` (daily), `"2026-11"` (monthly) or `"all"`
//! (no period) — computed in UTC, so a period rolls over at the same instant for every
//! replica regardless of the host's time zone. Time comes from a `Clock` so tests (and the
//! reconciler's tests) can move it.

use crate::config::QuotaPeriod;
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};

/// The period a balance row belongs to: `YYYY-MM-DD`, `YYYY-MM` or `all`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeriodKey(String);

const ALL: &str = "all";

impl PeriodKey {
    /// The period that contains the unix time `unix_s` (UTC).
    pub fn at(period: QuotaPeriod, unix_s: i64) -> PeriodKey {
        PeriodKey::at_utc(period, utc(unix_s))
    }

    pub fn at_utc(period: QuotaPeriod, time: DateTime<Utc>) -> PeriodKey {
        PeriodKey(match period {
            QuotaPeriod::Daily => time.format("%Y-%m-%d").to_string(),
            QuotaPeriod::Monthly => time.format("%Y-%m").to_string(),
            QuotaPeriod::None => ALL.to_string(),
        })
    }

    /// The current period according to `clock`.
    pub fn current(period: QuotaPeriod, clock: &dyn Clock) -> PeriodKey {
        PeriodKey::at(period, clock.now())
    }

    /// The single period of keys whose quota never resets (`quota_period = "none"`).
    pub fn all() -> PeriodKey {
        PeriodKey(ALL.to_string())
    }

    /// Parses a period key as written by `at` (e.g. from an admin query string).
    pub fn parse(text: &str) -> Result<PeriodKey, String> {
        let valid = text == ALL
            || NaiveDate::parse_from_str(text, "%Y-%m-%d").is_ok() && text.len() == 10
            || NaiveDate::parse_from_str(&format!("{text}-01"), "%Y-%m-%d").is_ok()
                && text.len() == 7;
        if valid {
            Ok(PeriodKey(text.to_string()))
        } else {
            Err(format!(
                "period {text:?}: expected \"YYYY-MM-DD\" (daily), \"YYYY-MM\" (monthly) or \"all\""
            ))
        }
    }

    /// For stores reading a key they wrote themselves.
    pub(crate) fn from_stored(text: String) -> PeriodKey {
        PeriodKey(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `daily`, `monthly` or `none`, like `QuotaPeriod::label`, read off the key's shape.
    pub fn kind_label(&self) -> &'static str {
        match self.0.len() {
            10 => "daily",
            7 => "monthly",
            _ => "none",
        }
    }
}

impl fmt::Display for PeriodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// When the period containing `unix_s` ends (the next reset, unix seconds, UTC);
/// `None` for `QuotaPeriod::None`, whose quota never resets.
pub fn period_end(period: QuotaPeriod, unix_s: i64) -> Option<i64> {
    let date = utc(unix_s).date_naive();
    let next = match period {
        QuotaPeriod::Daily => date.succ_opt()?,
        QuotaPeriod::Monthly => {
            let (year, month) = if date.month() == 12 {
                (date.year() + 1, 1)
            } else {
                (date.year(), date.month() + 1)
            };
            NaiveDate::from_ymd_opt(year, month, 1)?
        }
        QuotaPeriod::None => return None,
    };
    Some(next.and_hms_opt(0, 0, 0)?.and_utc().timestamp())
}

fn utc(unix_s: i64) -> DateTime<Utc> {
    // Only absurd timestamps (beyond year 262000) are out of range; the epoch is a
    // harmless stand-in that cannot panic the request path.
    DateTime::from_timestamp(unix_s, 0).unwrap_or_default()
}

/// Where the ledger gets "now". Injected so tests can cross period boundaries.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Unix seconds.
    fn now(&self) -> i64;

    fn now_utc(&self) -> DateTime<Utc> {
        utc(self.now())
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        Utc::now().timestamp()
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(unix_s: i64) -> ManualClock {
        ManualClock(AtomicI64::new(unix_s))
    }

    pub fn set(&self, unix_s: i64) {
        self.0.store(unix_s, Ordering::SeqCst);
    }

    pub fn advance(&self, seconds: i64) {
        self.0.fetch_add(seconds, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-24T23:59:59Z
    const LATE: i64 = 1_795_564_799;

    #[test]
    fn keys_are_utc_dates() {
        let cases = [
            (QuotaPeriod::Daily, LATE, "2026-11-24"),
            (QuotaPeriod::Daily, LATE + 1, "2026-11-25"),
            (QuotaPeriod::Monthly, LATE, "2026-11"),
            (QuotaPeriod::Monthly, 1_796_083_200, "2026-12"), // 2026-12-01T00:00:00Z
            (QuotaPeriod::None, LATE, "all"),
            (QuotaPeriod::Daily, 0, "1970-01-01"),
        ];
        for (period, at, want) in cases {
            assert_eq!(
                PeriodKey::at(period, at).as_str(),
                want,
                "{period:?} at {at}"
            );
        }
        assert_eq!(
            PeriodKey::at(QuotaPeriod::Daily, LATE).kind_label(),
            "daily"
        );
        assert_eq!(PeriodKey::all().kind_label(), "none");
    }

    #[test]
    fn period_end_is_next_utc_midnight_or_month() {
        assert_eq!(period_end(QuotaPeriod::Daily, LATE), Some(LATE + 1));
        assert_eq!(
            period_end(QuotaPeriod::Daily, LATE + 1),
            Some(LATE + 1 + 86_400)
        );
        assert_eq!(period_end(QuotaPeriod::Monthly, LATE), Some(1_796_083_200));
        // December rolls into January of the next year: 2027-01-01T00:00:00Z.
        assert_eq!(
            period_end(QuotaPeriod::Monthly, 1_796_083_200),
            Some(1_798_761_600)
        );
        assert_eq!(period_end(QuotaPeriod::None, LATE), None);
    }

    #[test]
    fn parse_accepts_only_generated_shapes() {
        for good in ["all", "2026-11-24", "2026-11"] {
            assert_eq!(PeriodKey::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "2026-13",
            "2026-11-31",
            "daily",
            "2026-1-1",
            "2026-11-24x",
        ] {
            assert!(PeriodKey::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(LATE);
        assert_eq!(
            PeriodKey::current(QuotaPeriod::Daily, &clock).as_str(),
            "2026-11-24"
        );
        clock.advance(1);
        assert_eq!(
            PeriodKey::current(QuotaPeriod::Daily, &clock).as_str(),
            "2026-11-25"
        );
        clock.set(0);
        assert_eq!(clock.now_utc().timestamp(), 0);
    }
}
