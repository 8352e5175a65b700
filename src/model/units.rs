//! Quantities people write as strings: sizes (`512MiB`, `1GiB`) and durations (`90s`, `2m`).
//!
//! Each type parses from the string form, serialises back to a canonical string form, and
//! describes itself to schemars as a string with a pattern so editors can check it.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes, written `512MiB`, `1GiB` (binary), `10G`, `100K` (decimal), `512m`, `2g`
/// (binary, as containers write them) or a bare number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

const SIZE_UNITS: &[(&str, u64)] = &[
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("Ti", 1 << 40),
    ("Gi", 1 << 30),
    ("Mi", 1 << 20),
    ("Ki", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("kB", 1_000),
    ("KB", 1_000),
    ("T", 1_000_000_000_000),
    ("G", 1_000_000_000),
    ("M", 1_000_000),
    ("K", 1_000),
    ("B", 1),
    // As containers write them (`docker run -m 512m`): lower case is binary.
    ("tb", 1 << 40),
    ("gb", 1 << 30),
    ("mb", 1 << 20),
    ("kb", 1 << 10),
    ("t", 1 << 40),
    ("g", 1 << 30),
    ("m", 1 << 20),
    ("k", 1 << 10),
    ("b", 1),
];

impl Size {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

/// Why a text is not a size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("`{0}` is not a size; write a number with a unit, such as `512MiB` or `1GiB`")]
    NoNumber(String),
    #[error(
        "`{input}` has an unknown size unit `{unit}`; use B, KiB, MiB, GiB, TiB (or K, M, G, T, or k, m, g, t as containers write them)"
    )]
    UnknownUnit { input: String, unit: String },
    #[error("`{0}` is not a size; write it like `512MiB` or `1GiB`")]
    BadNumber(String),
    #[error("`{0}` is too large")]
    TooLarge(String),
}

/// Why a text is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("`{0}` is not a duration; write it like `90s`, `2m`, `1h30m` or `500ms`")]
    Malformed(String),
    #[error("`{input}` needs a unit, such as `{n}s` or `{n}m`")]
    NoUnit { input: String, n: u128 },
    #[error("`{input}` has an unknown duration unit `{unit}`; use ms, s, m, h or d")]
    UnknownUnit { input: String, unit: String },
    #[error("`{0}` is too long")]
    TooLong(String),
}

impl FromStr for Size {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, SizeError> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim();
        if num.is_empty() {
            return Err(SizeError::NoNumber(s.into()));
        }
        let mult = if unit.is_empty() {
            1
        } else {
            match SIZE_UNITS.iter().find(|(u, _)| *u == unit) {
                Some((_, m)) => *m,
                None => {
                    return Err(SizeError::UnknownUnit {
                        input: s.into(),
                        unit: unit.into(),
                    });
                }
            }
        };
        let value: f64 = num.parse().map_err(|_| SizeError::BadNumber(s.into()))?;
        let bytes = value * mult as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(SizeError::TooLarge(s.into()));
        }
        Ok(Size(bytes.round() as u64))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, mult) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 >= mult && self.0.is_multiple_of(mult) {
                return write!(f, "{}{unit}", self.0 / mult);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// A span of time, written `90s`, `2m`, `1h30m`, `500ms` or `1d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub fn from_secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }
    pub fn std(self) -> std::time::Duration {
        self.0
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, DurationError> {
        let t = s.trim();
        let bad = || DurationError::Malformed(s.into());
        if t.is_empty() {
            return Err(bad());
        }
        let mut total: u128 = 0;
        let mut rest = t;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(bad());
            }
            let n: u128 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            let ms: u128 = match unit {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                "" => return Err(DurationError::NoUnit { input: s.into(), n }),
                other => {
                    return Err(DurationError::UnknownUnit {
                        input: s.into(),
                        unit: other.into(),
                    });
                }
            };
            total = total
                .checked_add(n.checked_mul(ms).ok_or_else(bad)?)
                .ok_or_else(bad)?;
        }
        let ms = u64::try_from(total).map_err(|_| DurationError::TooLong(s.into()))?;
        Ok(Duration(std::time::Duration::from_millis(ms)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [
            ("d", 86_400_000u128),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
            ("ms", 1),
        ] {
            if ms >= size {
                write!(f, "{}{unit}", ms / size)?;
                ms %= size;
            }
        }
        Ok(())
    }
}

macro_rules! string_quantity {
    ($ty:ty, $name:literal, $pattern:literal, $desc:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($desc)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$ty, E> {
                        v.parse().map_err(E::custom)
                    }
                    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<$ty, E> {
                        v.to_string().parse().map_err(E::custom)
                    }
                    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<$ty, E> {
                        v.to_string().parse().map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }

        impl JsonSchema for $ty {
            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "pattern": $pattern,
                    "description": $desc,
                })
            }
        }
    };
}

string_quantity!(
    Size,
    "Size",
    r"^\s*[0-9]+(\.[0-9]+)?\s*(B|[kKMGT]B?|[KMGT]i|[KMGT]iB|[bkmgt]|[kmgt]b)?\s*$",
    "a size such as `512MiB`, `1GiB`, `10G` (decimal) or `512m` (binary, as containers write it)"
);
string_quantity!(
    Duration,
    "Duration",
    r"^([0-9]+(ms|s|m|h|d))+$",
    "a duration such as `90s`, `2m` or `1h30m`"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_people_write_them() {
        let cases = [
            ("512MiB", 512 << 20),
            ("1GiB", 1 << 30),
            ("1.5GiB", 3 << 29),
            ("10G", 10_000_000_000),
            ("100K", 100_000),
            ("100k", 100 << 10),
            ("512m", 512 << 20),
            ("2g", 2 << 30),
            ("1gb", 1 << 30),
            ("4096", 4096),
            ("2Gi", 2 << 30),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<Size>().map(Size::bytes), Ok(want), "{s}");
        }
        assert!("lots".parse::<Size>().is_err());
        assert!(
            "12 parsecs"
                .parse::<Size>()
                .unwrap_err()
                .to_string()
                .contains("unknown size unit")
        );
        assert_eq!(Size(1 << 30).to_string(), "1GiB");
        assert_eq!(Size(1536 << 20).to_string(), "1536MiB");
        assert_eq!(Size(1000).to_string(), "1000B");
    }

    #[test]
    fn durations_parse_as_people_write_them() {
        let ms = |s: &str| s.parse::<Duration>().map(|d| d.0.as_millis());
        assert_eq!(ms("90s"), Ok(90_000));
        assert_eq!(ms("2m"), Ok(120_000));
        assert_eq!(ms("1h30m"), Ok(5_400_000));
        assert_eq!(ms("500ms"), Ok(500));
        assert_eq!(ms("1d"), Ok(86_400_000));
        assert!(ms("90").unwrap_err().to_string().contains("needs a unit"));
        assert!(ms("2 weeks").is_err());
        assert!(ms("").is_err());
        assert_eq!(
            "1h30m".parse::<Duration>().map(|d| d.to_string()),
            Ok("1h30m".into())
        );
        assert_eq!(
            "90s".parse::<Duration>().map(|d| d.to_string()),
            Ok("1m30s".into())
        );
    }
}
