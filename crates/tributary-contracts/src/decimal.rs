//! Avro `decimal(18, 6)`: every amount of money and every usage quantity in the contracts.
//!
//! A fixed scale across all contracts keeps arithmetic exact and comparisons trivial: six
//! decimal places hold the sub-cent unit prices of metered usage (0.000125 USD per API call)
//! and fractional quantities (GB-hours); precision 18 leaves twelve integer digits. On the wire
//! the value is the unscaled integer in big-endian two's complement (Avro spec), written here
//! as 8 bytes; any length up to 16 is read, as other writers may use the minimum.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Digits after the decimal point.
pub const SCALE: u32 = 6;
/// Total significant digits.
pub const PRECISION: u32 = 18;
/// Largest unscaled magnitude: 10^18 - 1.
const MAX_UNSCALED: i128 = 999_999_999_999_999_999;

/// Why a number cannot be a `decimal(18, 6)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    /// More than six decimal places would be lost.
    #[error("{0} has more than {SCALE} decimal places")]
    TooManyPlaces(Decimal),
    /// More than eighteen digits.
    #[error("{0} does not fit decimal({PRECISION}, {SCALE})")]
    OutOfRange(String),
    /// Not a number.
    #[error("not a decimal number: {0:?}")]
    Parse(String),
    /// The wire bytes are empty or longer than 16.
    #[error("a decimal must be 1 to 16 bytes on the wire, got {0}")]
    Length(usize),
}

/// An exact decimal with scale 6 and precision 18.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Decimal6(Decimal);

impl Decimal6 {
    /// Zero.
    pub const ZERO: Self = Self(Decimal::ZERO);

    /// Checks that `value` fits: at most 6 decimal places and 18 digits.
    pub fn new(value: Decimal) -> Result<Self, DecimalError> {
        let mut scaled = value;
        if scaled.scale() > SCALE {
            let rounded = value.round_dp(SCALE);
            if rounded != value {
                return Err(DecimalError::TooManyPlaces(value));
            }
            scaled = rounded;
        }
        scaled.rescale(SCALE);
        if scaled.mantissa().abs() > MAX_UNSCALED {
            return Err(DecimalError::OutOfRange(value.to_string()));
        }
        Ok(Self(scaled))
    }

    /// The value, with scale 6.
    pub fn value(self) -> Decimal {
        self.0
    }

    /// The unscaled integer: the value times 10^6.
    pub fn unscaled(self) -> i64 {
        // `new` keeps the mantissa within ±(10^18 - 1), which fits an i64.
        i64::try_from(self.0.mantissa()).expect("decimal(18, 6) fits in i64")
    }

    /// Reads the Avro wire form: big-endian two's complement of the unscaled value.
    pub fn from_unscaled_bytes(bytes: &[u8]) -> Result<Self, DecimalError> {
        if bytes.is_empty() || bytes.len() > 16 {
            return Err(DecimalError::Length(bytes.len()));
        }
        let fill = if bytes[0] & 0x80 != 0 { 0xFF } else { 0x00 };
        let mut buffer = [fill; 16];
        buffer[16 - bytes.len()..].copy_from_slice(bytes);
        let unscaled = i128::from_be_bytes(buffer);
        if unscaled.abs() > MAX_UNSCALED {
            return Err(DecimalError::OutOfRange(format!("{unscaled}e-{SCALE}")));
        }
        Ok(Self(Decimal::from_i128_with_scale(unscaled, SCALE)))
    }

    /// The Avro wire form, 8 bytes.
    pub fn to_unscaled_bytes(self) -> [u8; 8] {
        self.unscaled().to_be_bytes()
    }
}

impl TryFrom<Decimal> for Decimal6 {
    type Error = DecimalError;
    fn try_from(value: Decimal) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Decimal6> for Decimal {
    fn from(value: Decimal6) -> Self {
        value.0
    }
}

impl From<i64> for Decimal6 {
    /// Whole numbers; panics beyond twelve digits, which no amount or quantity reaches.
    fn from(value: i64) -> Self {
        Self::new(Decimal::from(value)).expect("a whole number of at most 12 digits")
    }
}

impl FromStr for Decimal6 {
    type Err = DecimalError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let value = Decimal::from_str_exact(text.trim()).map_err(|_| DecimalError::Parse(text.to_owned()))?;
        Self::new(value)
    }
}

impl fmt::Display for Decimal6 {
    /// The exact value without trailing zeros: `12.5`, not `12.500000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.normalize(), f)
    }
}

impl fmt::Debug for Decimal6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Decimal6({self})")
    }
}

impl Serialize for Decimal6 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.to_unscaled_bytes())
    }
}

impl<'de> Deserialize<'de> for Decimal6 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BytesVisitor;
        impl<'de> Visitor<'de> for BytesVisitor {
            type Value = Decimal6;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("the bytes of an Avro decimal(18, 6)")
            }
            fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Decimal6, E> {
                Decimal6::from_unscaled_bytes(bytes).map_err(E::custom)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Decimal6, A::Error> {
                let mut bytes = Vec::with_capacity(8);
                while let Some(byte) = seq.next_element::<u8>()? {
                    bytes.push(byte);
                }
                Decimal6::from_unscaled_bytes(&bytes).map_err(de::Error::custom)
            }
        }
        deserializer.deserialize_bytes(BytesVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal6 {
        text.parse().unwrap()
    }

    #[test]
    fn values_round_trip_through_the_wire_form_exactly() {
        for text in ["0", "0.000001", "-0.000001", "12.5", "-1234567.891011", "999999999999.999999"] {
            let value = d(text);
            assert_eq!(Decimal6::from_unscaled_bytes(&value.to_unscaled_bytes()).unwrap(), value, "{text}");
        }
        assert_eq!(d("12.50").to_string(), "12.5");
    }

    #[test]
    fn minimal_length_encodings_from_other_writers_are_read() {
        // 1.5 = 1_500_000 unscaled = 0x16E360; -1 unscaled is 0xFF.
        assert_eq!(Decimal6::from_unscaled_bytes(&[0x16, 0xE3, 0x60]).unwrap(), d("1.5"));
        assert_eq!(Decimal6::from_unscaled_bytes(&[0xFF]).unwrap(), d("-0.000001"));
    }

    #[test]
    fn values_that_do_not_fit_are_refused() {
        assert!(matches!("0.0000001".parse::<Decimal6>(), Err(DecimalError::TooManyPlaces(_))));
        assert!(matches!("1000000000000".parse::<Decimal6>(), Err(DecimalError::OutOfRange(_))));
        assert!(matches!("twelve".parse::<Decimal6>(), Err(DecimalError::Parse(_))));
        assert!(matches!(Decimal6::from_unscaled_bytes(&[]), Err(DecimalError::Length(0))));
        assert!(matches!(Decimal6::from_unscaled_bytes(&[0x7F; 16]), Err(DecimalError::OutOfRange(_))));
        assert_eq!(d("1.500000000"), d("1.5"), "trailing zeros beyond the scale are not a loss");
    }
}
