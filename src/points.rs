//! `Points`: the upstream's billing unit, held exactly.
//!
//! The upstream reports `point` and `refund` as decimal strings ("320", "12.5").
//! Floats would drift when thousands of charges are summed, so gatehouse keeps
//! points as an integer count of thousandths (milli-points) and prints them back
//! as the shortest decimal.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Points(i64);

const SCALE: i64 = 1000;

impl Points {
    pub const ZERO: Points = Points(0);

    pub fn from_milli(milli: i64) -> Points {
        Points(milli)
    }

    pub fn from_whole(whole: i64) -> Points {
        Points(whole.saturating_mul(SCALE))
    }

    pub fn milli(self) -> i64 {
        self.0
    }

    /// For metrics and JSON, where a float is the expected type.
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / SCALE as f64
    }

    pub fn saturating_add(self, other: Points) -> Points {
        Points(self.0.saturating_add(other.0))
    }

    pub fn saturating_sub(self, other: Points) -> Points {
        Points(self.0.saturating_sub(other.0))
    }

    /// Converts a non-negative finite float (from TOML) to points, rounding to a milli-point.
    pub fn from_f64(value: f64) -> Option<Points> {
        if value.is_finite() && value >= 0.0 && value < (i64::MAX / SCALE) as f64 {
            Some(Points((value * SCALE as f64).round() as i64))
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a decimal number of points: {0:?}")]
pub struct ParsePointsError(pub String);

impl FromStr for Points {
    type Err = ParsePointsError;

    /// Parses "320", "12.5", " 7 " (trimmed), "0.125"; rejects empty, signs other than a
    /// leading '-', more than three decimals, exponents and anything else.
    fn from_str(text: &str) -> Result<Points, ParsePointsError> {
        let err = || ParsePointsError(text.to_string());
        let trimmed = text.trim();
        let (negative, digits) = match trimmed.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        let (whole, fraction) = match digits.split_once('.') {
            Some((w, f)) => (w, f),
            None => (digits, ""),
        };
        if whole.is_empty() && fraction.is_empty() {
            return Err(err());
        }
        if !whole.bytes().all(|b| b.is_ascii_digit())
            || !fraction.bytes().all(|b| b.is_ascii_digit())
            || fraction.len() > 3
        {
            return Err(err());
        }
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| err())?
        };
        let mut milli_fraction: i64 = 0;
        for (i, b) in fraction.bytes().enumerate() {
            milli_fraction += i64::from(b - b'0') * 10_i64.pow(2 - i as u32);
        }
        let milli = whole
            .checked_mul(SCALE)
            .and_then(|w| w.checked_add(milli_fraction))
            .ok_or_else(err)?;
        Ok(Points(if negative { -milli } else { milli }))
    }
}

impl fmt::Display for Points {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let whole = abs / SCALE as u64;
        let fraction = abs % SCALE as u64;
        if fraction == 0 {
            write!(f, "{sign}{whole}")
        } else {
            let digits = format!("{fraction:03}");
            write!(f, "{sign}{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

impl Serialize for Points {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.as_f64())
    }
}

/// Config files write points as an integer, a float or a decimal string.
impl<'de> Deserialize<'de> for Points {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Points, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Float(f64),
            Text(String),
        }
        let points = match Raw::deserialize(deserializer)? {
            Raw::Int(n) if n >= 0 => Some(Points::from_whole(n)),
            Raw::Int(_) => None,
            Raw::Float(x) => Points::from_f64(x),
            Raw::Text(s) => s.parse().ok().filter(|p: &Points| p.0 >= 0),
        };
        points.ok_or_else(|| serde::de::Error::custom("expected a non-negative number of points"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstream_strings() {
        assert_eq!("320".parse::<Points>().unwrap(), Points::from_whole(320));
        assert_eq!(
            "12.5".parse::<Points>().unwrap(),
            Points::from_milli(12_500)
        );
        assert_eq!("0.125".parse::<Points>().unwrap(), Points::from_milli(125));
        assert_eq!(" 7 ".parse::<Points>().unwrap(), Points::from_whole(7));
        assert_eq!(".5".parse::<Points>().unwrap(), Points::from_milli(500));
        for bad in [
            "", " ", "abc", "1e3", "1.2345", "+3", "3.", "--1", "1.2.3", ".",
        ] {
            if bad == "3." {
                // "3." is a whole number with an empty fraction: accepted.
                assert_eq!(bad.parse::<Points>().unwrap(), Points::from_whole(3));
                continue;
            }
            assert!(bad.parse::<Points>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn displays_shortest_decimal() {
        assert_eq!(Points::from_whole(320).to_string(), "320");
        assert_eq!(Points::from_milli(12_500).to_string(), "12.5");
        assert_eq!(Points::from_milli(-1_250).to_string(), "-1.25");
        assert_eq!(Points::from_milli(5).to_string(), "0.005");
    }
}
