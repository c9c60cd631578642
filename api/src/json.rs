//! Request-body values read exactly as the OpenAPI document (JSON Schema 2020-12) describes
//! them, so that what the schema accepts the code accepts and what it refuses the code
//! refuses:
//!
//! - [`int`]: an `integer` is any JSON number with a zero fractional part: `1000`, `1000.0` and
//!   `1e3` are the same value (JSON Schema 2020-12 §6.1.1; serde would refuse the last two).
//!   It must lie within the interoperable range of I-JSON (RFC 7493 §2.2), ±(2^53 − 1), where
//!   every JSON parser reads it exactly (this crate turns on serde_json's `float_roundtrip`, so
//!   `9007199254740991.0` is read as exactly that, not rounded by one); the documented
//!   `minimum`/`maximum` are checked by the handler, with its own problem code.
//! - [`date_time`]: an RFC 3339 date-time (`format: date-time`) in the one spelling of
//!   [`DATE_TIME_PATTERN`] (upper-case `T` and `Z`, seconds 00..59, at most nanoseconds), so
//!   that the format is asserted by a pattern and not only annotated.

use std::{fmt, marker::PhantomData};

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Deserializer, de};

/// The largest integer every JSON parser reads exactly (RFC 7493 §2.2): 2^53 − 1.
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// [`date_time`]'s grammar as an OpenAPI `pattern`.
pub const DATE_TIME_PATTERN: &str =
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$";

/// `#[serde(deserialize_with = "json::int")]`: an integer field of type `T` (see the module
/// docs).
pub fn int<'de, D: Deserializer<'de>, T: TryFrom<i64>>(d: D) -> Result<T, D::Error> {
    d.deserialize_any(IntVisitor(PhantomData))
}

/// [`int`] for an optional field: `null` is `None` (pair with `#[serde(default)]` for absent).
pub fn opt_int<'de, D: Deserializer<'de>, T: TryFrom<i64>>(d: D) -> Result<Option<T>, D::Error> {
    Ok(Option::<Int<T>>::deserialize(d)?.map(|i| i.0))
}

/// [`date_time`] for an optional field: `null` is `None` (pair with `#[serde(default)]`).
pub fn opt_date_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    match Option::<String>::deserialize(d)? {
        Some(s) => date_time(&s).map(Some),
        None => Ok(None),
    }
}

/// An RFC 3339 date-time in the spelling of [`DATE_TIME_PATTERN`], cut to the microsecond:
/// PostgreSQL keeps no finer, so what is compared while validating is what is stored (two
/// instants apart by less would pass as ordered and be stored equal).
pub fn date_time<E: de::Error>(s: &str) -> Result<DateTime<Utc>, E> {
    let invalid = || {
        E::custom(format!(
            "{s:?} is not an RFC 3339 date-time such as 2026-11-21T10:00:00Z"
        ))
    };
    if !date_time_shape(s) {
        return Err(invalid());
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc).trunc_subsecs(6))
        .map_err(|_| invalid())
}

/// The shape of [`DATE_TIME_PATTERN`], checked by hand.
fn date_time_shape(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |from: usize, to: usize| b.get(from..to).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    if !(digits(0, 4)
        && at(4, b'-')
        && digits(5, 7)
        && at(7, b'-')
        && digits(8, 10)
        && at(10, b'T')
        && digits(11, 13)
        && at(13, b':')
        && digits(14, 16)
        && at(16, b':')
        && b.get(17).is_some_and(|d| (b'0'..=b'5').contains(d))
        && digits(18, 19))
    {
        return false;
    }
    let mut i = 19;
    if at(i, b'.') {
        let n = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if !(1..=9).contains(&n) {
            return false;
        }
        i += 1 + n;
    }
    match b.get(i) {
        Some(b'Z') => b.len() == i + 1,
        Some(b'+' | b'-') => b.len() == i + 6 && digits(i + 1, i + 3) && at(i + 3, b':') && digits(i + 4, i + 6),
        _ => false,
    }
}

/// An integer read as [`int`] reads it.
struct Int<T>(T);

impl<'de, T: TryFrom<i64>> Deserialize<'de> for Int<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        int(d).map(Int)
    }
}

fn int_value<E: de::Error, T: TryFrom<i64>>(v: i128) -> Result<T, E> {
    if v.unsigned_abs() > MAX_SAFE_INTEGER.unsigned_abs().into() {
        return Err(E::custom(format!(
            "{v} is outside the interoperable integer range of ±{MAX_SAFE_INTEGER}"
        )));
    }
    i64::try_from(v)
        .ok()
        .and_then(|v| T::try_from(v).ok())
        .ok_or_else(|| E::custom(format!("{v} is out of range")))
}

struct IntVisitor<T>(PhantomData<T>);

impl<T: TryFrom<i64>> de::Visitor<'_> for IntVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an integer")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        int_value(i128::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        int_value(i128::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        // Exactly an integer, and small enough that the f64 held it exactly.
        if v.is_finite() && v.fract() == 0.0 && v.abs() <= MAX_SAFE_INTEGER as f64 {
            int_value(v as i128)
        } else {
            Err(E::invalid_type(de::Unexpected::Float(v), &"an integer"))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    struct Body {
        #[serde(deserialize_with = "int")]
        n: i32,
        #[serde(default, deserialize_with = "opt_int")]
        id: Option<i64>,
        #[serde(default, deserialize_with = "opt_date_time")]
        at: Option<DateTime<Utc>>,
    }

    fn parse(json: &str) -> Result<Body, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn integers_are_json_schema_integers_within_the_interoperable_range() {
        for (json, n) in [
            (r#"{"n": 1000}"#, 1000),
            (r#"{"n": 1000.0}"#, 1000),
            (r#"{"n": 1e3}"#, 1000),
            (r#"{"n": -0.0}"#, 0),
        ] {
            assert_eq!(parse(json).unwrap().n, n, "{json}");
        }
        for json in [
            r#"{"n": 1000.5}"#,
            r#"{"n": 1e30}"#,
            r#"{"n": 2147483648}"#,
            r#"{"n": "1000"}"#,
            r#"{"n": null}"#,
            r#"{"n": true}"#,
            r#"{"n": 1, "id": 9007199254740992}"#,
            r#"{"n": 1, "id": -9007199254740992}"#,
            r#"{"n": 1, "id": 9223372036854775807}"#,
            r#"{"n": 1, "id": 18446744073709551615}"#,
            r#"{"n": 1, "id": 1.5}"#,
        ] {
            assert!(parse(json).is_err(), "{json}");
        }
        assert_eq!(
            parse(r#"{"n": 1, "id": 9007199254740991}"#).unwrap().id,
            Some(MAX_SAFE_INTEGER)
        );
        assert_eq!(
            parse(r#"{"n": 1, "id": 9007199254740991.0}"#).unwrap().id,
            Some(MAX_SAFE_INTEGER)
        );
        assert_eq!(parse(r#"{"n": 1, "id": null}"#).unwrap().id, None);
        assert_eq!(parse(r#"{"n": 1}"#).unwrap().id, None);
    }

    #[test]
    fn date_times_are_rfc3339_in_one_spelling() {
        let re = regex::Regex::new(DATE_TIME_PATTERN).unwrap();
        for ok in [
            "2026-11-21T10:00:00Z",
            "2026-11-21T10:00:00.123456789Z",
            "2026-11-21T10:00:00.1+09:00",
            "0001-01-01T00:00:00-23:59",
        ] {
            assert!(re.is_match(ok), "{ok}");
            let body = parse(&format!(r#"{{"n": 1, "at": "{ok}"}}"#)).unwrap();
            assert_eq!(
                body.at,
                DateTime::parse_from_rfc3339(ok)
                    .ok()
                    .map(|t| t.with_timezone(&Utc).trunc_subsecs(6))
            );
        }
        // Cut to the microsecond PostgreSQL keeps.
        let body = parse(r#"{"n": 1, "at": "2026-11-21T10:00:00.123456789Z"}"#).unwrap();
        assert_eq!(body.at.map(|t| t.timestamp_subsec_nanos()), Some(123_456_000));
        for bad in [
            "",
            "2026-11-21",
            "2026-11-21 10:00:00Z",
            "2026-11-21t10:00:00Z",
            "2026-11-21T10:00:00z",
            "2026-11-21T10:00:00",
            "2026-11-21T10:00:60Z",
            "2026-11-21T10:00:00.Z",
            "2026-11-21T10:00:00.1234567890Z",
            "2026-11-21T10:00:00+0900",
            "2026-11-21T10:00:00Z ",
            " 2026-11-21T10:00:00Z",
            "+2026-11-21T10:00:00Z",
        ] {
            assert!(!re.is_match(bad), "{bad:?}");
            assert!(parse(&format!(r#"{{"n": 1, "at": "{bad}"}}"#)).is_err(), "{bad:?}");
        }
        // The right shape and still no date: refused (the schema's format says so too).
        for impossible in ["2026-02-30T10:00:00Z", "2026-13-01T10:00:00Z", "2026-11-21T24:00:00Z"] {
            assert!(re.is_match(impossible));
            assert!(
                parse(&format!(r#"{{"n": 1, "at": "{impossible}"}}"#)).is_err(),
                "{impossible}"
            );
        }
    }
}
