//! Value types that settings deserialize into, so that nothing past loading
//! holds an unchecked string.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A duration written the human way: `250ms`, `30s`, `5m`, `1h30m`, `7d`.
///
/// Bare numbers are refused on purpose: `timeout = 30` could mean seconds or
/// milliseconds, and guessing wrong is how monitoring silently stops working.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(std::time::Duration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }

    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }

    pub const fn get(self) -> std::time::Duration {
        self.0
    }

    pub fn as_millis_u64(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }

    pub fn to_chrono(self) -> chrono::Duration {
        chrono::Duration::from_std(self.0).unwrap_or(chrono::Duration::MAX)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("a duration like 30s, 5m or 7d (got an empty value)".into());
        }
        if text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("a duration with a unit, like {text}s or {text}ms (a bare number is ambiguous)"));
        }
        // humantime reads `M` as months: `5M` for five minutes would be a
        // five-month silence or backoff.
        if text.split(|c: char| !c.is_ascii_alphabetic()).any(|unit| unit == "M") {
            return Err(format!(
                "a duration like 30s, 5m or 7d (got {text}: M would be months; m is minutes, and months are written \
                 out, like 2months)"
            ));
        }
        let d = humantime::parse_duration(text).map_err(|e| format!("a duration like 30s, 5m or 7d ({e})"))?;
        // Anything longer means "never" to a person and an overflow to
        // date arithmetic (now plus a duration must stay a date).
        if d > MAX_DURATION {
            return Err(format!("a duration of at most 1000 years (got {text})"));
        }
        Ok(Self(d))
    }
}

/// 1000 of the years durations are written in (`y`: 365.25 days), so
/// that `1000y` itself is allowed.
const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(1000 * 31_557_600);

impl std::str::FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        Self(d)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_zero() {
            return f.write_str("0s");
        }
        // In the largest unit that divides it, as people write them (90d,
        // not humantime's "2months 29days 2h 52m 48s", a month being 30.44
        // days to it); both parse back to the same duration.
        let ms = self.0.as_millis();
        if self.0.subsec_nanos().is_multiple_of(1_000_000) {
            for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)] {
                if ms.is_multiple_of(size) {
                    return write!(f, "{}{unit}", ms / size);
                }
            }
        }
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl fmt::Debug for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like 30s, 5m or 7d")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                Duration::parse(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                self.visit_str(&v.to_string())
            }
        }
        d.deserialize_str(V)
    }
}

/// A secret setting (password, webhook URL, HMAC key). It never prints:
/// `Debug`, `Display` and `Serialize` all show a placeholder, so a stray
/// `tracing::debug!(?settings)` cannot leak it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub const REDACTED: &'static str = "[redacted]";

    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { Self::REDACTED })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { Self::REDACTED })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(Duration::parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(Duration::parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(Duration::parse("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(Duration::parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(Duration::parse("1h30m").unwrap(), Duration::from_secs(5400));
    }

    #[test]
    fn durations_refuse_bare_numbers_and_garbage() {
        assert!(Duration::parse("30").unwrap_err().contains("30s"));
        assert!(Duration::parse("").is_err());
        assert!(Duration::parse("soon").is_err());
        assert!(Duration::parse("-5s").is_err());
        assert!(Duration::parse("300000y").unwrap_err().contains("at most 1000 years"));
        assert!(Duration::parse("1000y").is_ok(), "the limit itself is allowed");
        assert!(Duration::parse("365242d").is_ok());
        assert!(Duration::parse("999y").is_ok());
    }

    #[test]
    fn an_uppercase_m_is_refused_not_read_as_months() {
        for text in ["5M", "1h5M", "5M 3s"] {
            let err = Duration::parse(text).unwrap_err();
            assert!(err.contains("M would be months"), "{text}: {err}");
        }
        assert_eq!(Duration::parse("5m").unwrap(), Duration::from_secs(300));
        assert!(Duration::parse("2months").is_ok(), "written out, months are meant");
    }

    #[test]
    fn durations_print_back_in_the_same_form() {
        assert_eq!(Duration::from_secs(300).to_string(), "5m");
        assert_eq!(Duration::from_secs(0).to_string(), "0s");
        assert_eq!(Duration::parse(&Duration::from_secs(5400).to_string()).unwrap(), Duration::from_secs(5400));
        for (text, shown) in [("90d", "90d"), ("400d", "400d"), ("36h", "36h"), ("90m", "90m"), ("1500ms", "1500ms")] {
            let d = Duration::parse(text).unwrap();
            assert_eq!(d.to_string(), shown);
            assert_eq!(Duration::parse(&d.to_string()).unwrap(), d);
        }
        let odd = Duration::from(std::time::Duration::from_micros(1500));
        assert_eq!(Duration::parse(&odd.to_string()).unwrap(), odd, "{odd}");
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"[redacted]\"");
        assert_eq!(s.expose(), "hunter2");
    }
}
