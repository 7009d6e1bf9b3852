//! Exact money: a decimal with two places that fits the Avro contract's
//! `decimal(10,2)`, so at most 99,999,999.99. Never a float.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The contract's precision: 10 digits, 2 of them after the point.
const PRECISION: u32 = 10;
const SCALE: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("'{0}' is not a decimal amount")]
    NotANumber(String),
    #[error("amount must not be negative")]
    Negative,
    #[error("amount has more than {SCALE} decimal places")]
    TooPrecise,
    #[error("amount exceeds 99999999.99 (decimal(10,2))")]
    OutOfRange,
}

/// A non-negative amount with exactly two decimal places.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(Decimal);

impl Money {
    pub const ZERO: Money = Money(Decimal::ZERO);

    /// Accepts any decimal that fits `decimal(10,2)` without rounding.
    pub fn new(value: Decimal) -> Result<Self, MoneyError> {
        if value.is_sign_negative() && !value.is_zero() {
            return Err(MoneyError::Negative);
        }
        let normalized = value.normalize();
        if normalized.scale() > SCALE {
            return Err(MoneyError::TooPrecise);
        }
        let mut exact = normalized;
        exact.rescale(SCALE);
        if exact > Self::max_value() {
            return Err(MoneyError::OutOfRange);
        }
        Ok(Money(exact))
    }

    /// Whole minor units (cents): `12900.00` is `1_290_000`.
    pub fn from_minor(minor: i64) -> Result<Self, MoneyError> {
        Self::new(Decimal::new(minor, SCALE))
    }

    pub fn max_value() -> Decimal {
        Decimal::new(10_i64.pow(PRECISION) - 1, SCALE)
    }

    pub fn as_decimal(&self) -> Decimal {
        self.0
    }

    /// `self × quantity`, refused when the product leaves `decimal(10,2)`.
    pub fn times(self, quantity: u32) -> Result<Self, MoneyError> {
        let product = self
            .0
            .checked_mul(Decimal::from(quantity))
            .ok_or(MoneyError::OutOfRange)?;
        Self::new(product)
    }

    pub fn checked_add(self, other: Money) -> Result<Self, MoneyError> {
        let sum = self.0.checked_add(other.0).ok_or(MoneyError::OutOfRange)?;
        Self::new(sum)
    }
}

impl FromStr for Money {
    type Err = MoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let value =
            Decimal::from_str_exact(s.trim()).map_err(|_| MoneyError::NotANumber(s.into()))?;
        Money::new(value)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2}", self.0)
    }
}

/// On the wire and in stored events money is a string (`"12900.00"`), so no
/// JSON reader ever turns it into a float.
impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_two_places() {
        let m: Money = "12900".parse().unwrap();
        assert_eq!(m.to_string(), "12900.00");
        assert_eq!("0.5".parse::<Money>().unwrap().to_string(), "0.50");
        assert_eq!(
            Money::from_minor(1_290_000).unwrap(),
            "12900.00".parse().unwrap()
        );
    }

    #[test]
    fn refuses_what_does_not_fit_decimal_10_2() {
        assert_eq!("1.005".parse::<Money>(), Err(MoneyError::TooPrecise));
        assert_eq!("-1".parse::<Money>(), Err(MoneyError::Negative));
        assert_eq!("100000000.00".parse::<Money>(), Err(MoneyError::OutOfRange));
        assert!("99999999.99".parse::<Money>().is_ok());
        assert!(matches!(
            "abc".parse::<Money>(),
            Err(MoneyError::NotANumber(_))
        ));
    }

    #[test]
    fn arithmetic_is_exact_and_bounded() {
        let p: Money = "0.10".parse().unwrap();
        assert_eq!(p.times(3).unwrap().to_string(), "0.30");
        let big: Money = "99999999.99".parse().unwrap();
        assert_eq!(big.times(2), Err(MoneyError::OutOfRange));
        assert_eq!(big.checked_add(p), Err(MoneyError::OutOfRange));
    }

    #[test]
    fn serializes_as_a_string() {
        let m: Money = "1.5".parse().unwrap();
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"1.50\"");
        let back: Money = serde_json::from_str("\"1.50\"").unwrap();
        assert_eq!(back, m);
        assert!(serde_json::from_str::<Money>("\"1.001\"").is_err());
    }
}
