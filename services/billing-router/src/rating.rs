//! Rating: the price of an overage quantity under one meter's price, as `refdata.price-plans`
//! documents it, in exact decimals.
//!
//! - PER_UNIT: quantity × unit_price.
//! - GRADUATED: the quantity is split across the tiers in order (tier i covers the quantities
//!   above the previous tier's `up_to`, 0 for the first, up to and including its own), each part
//!   priced at its tier's unit_price, plus the tier's flat_fee once the quantity enters it.
//! - VOLUME: the one tier the whole quantity falls into prices all of it, plus its flat_fee.
//! - PACKAGE: the quantity rounded up to whole packages of package_size, each at unit_price.
//! - The meter's minimum_charge raises a lower amount to it (only when there is overage).
//!
//! Nothing is rounded to the currency here: each step's amount is kept to the six decimal
//! places of the contracts' `decimal(18, 6)` (the only rounding a step can need, and only when
//! a price has more decimals than that), the steps sum exactly to the rated amount, and the
//! charge rounds once, at the end ([`round_to_currency`]).

use rust_decimal::{Decimal, RoundingStrategy};
use tributary_contracts::decimal::{Decimal6, SCALE};
use tributary_contracts::types::{MeterPrice, PriceTier, PricingModel, RatingStep, RoundingMode};

/// The rated price of an overage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rating {
    /// How it was computed, in order; the amounts sum to `amount`.
    pub steps: Vec<RatingStep>,
    /// The price, before rounding to the currency.
    pub amount: Decimal,
    /// Whether the minimum charge raised it.
    pub minimum_applied: bool,
}

/// Why a meter price cannot rate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidPrice(pub String);

fn invalid(reason: impl Into<String>) -> InvalidPrice {
    InvalidPrice(reason.into())
}

/// `value` as a contract decimal, rounded half-even to its six places if it has more.
fn d6(value: Decimal) -> Result<Decimal6, InvalidPrice> {
    Decimal6::new(value.round_dp_with_strategy(SCALE, RoundingStrategy::MidpointNearestEven))
        .map_err(|e| invalid(format!("an amount out of range: {e}")))
}

fn step(
    tier_index: Option<usize>,
    from: Decimal,
    up_to: Option<Decimal6>,
    quantity: Decimal,
    unit_price: Decimal6,
    flat_fee: Option<Decimal6>,
) -> Result<RatingStep, InvalidPrice> {
    let fee = flat_fee.map_or(Decimal::ZERO, Decimal6::value);
    let amount = quantity
        .checked_mul(unit_price.value())
        .and_then(|a| a.checked_add(fee))
        .ok_or_else(|| invalid("an amount overflows"))?;
    Ok(RatingStep {
        tier_index: tier_index.map(|i| i as i32),
        from_quantity: d6(from)?,
        up_to,
        quantity: d6(quantity)?,
        unit_price,
        flat_fee,
        amount: d6(amount)?,
    })
}

/// Checks that `tiers` are usable: at least one, ascending bounds, only the last open-ended.
fn check_tiers(tiers: &[PriceTier]) -> Result<(), InvalidPrice> {
    let Some(last) = tiers.last() else { return Err(invalid("a tiered price without tiers")) };
    if last.up_to.is_some() {
        return Err(invalid("the last tier must be open-ended (up_to null)"));
    }
    let mut previous = Decimal::ZERO;
    for (index, tier) in tiers[..tiers.len() - 1].iter().enumerate() {
        let Some(bound) = tier.up_to else {
            return Err(invalid(format!("tier {index} is open-ended but not the last")));
        };
        if bound.value() <= previous {
            return Err(invalid(format!("tier {index} ends at {bound}, not above the tier before it")));
        }
        previous = bound.value();
    }
    Ok(())
}

/// Rates `overage` (> 0, in the meter's unit) with `price`.
pub fn rate(price: &MeterPrice, overage: Decimal) -> Result<Rating, InvalidPrice> {
    let mut steps = Vec::new();
    match price.model {
        PricingModel::PerUnit => {
            let unit_price = price.unit_price.ok_or_else(|| invalid("PER_UNIT without a unit_price"))?;
            steps.push(step(None, Decimal::ZERO, None, overage, unit_price, None)?);
        }
        PricingModel::Graduated => {
            check_tiers(&price.tiers)?;
            let mut lower = Decimal::ZERO;
            for (index, tier) in price.tiers.iter().enumerate() {
                if overage <= lower {
                    break; // not entered: neither its units nor its flat fee
                }
                let upper = tier.up_to.map_or(overage, |bound| bound.value().min(overage));
                steps.push(step(Some(index), lower, tier.up_to, upper - lower, tier.unit_price, tier.flat_fee)?);
                lower = tier.up_to.map_or(overage, Decimal6::value);
            }
        }
        PricingModel::Volume => {
            check_tiers(&price.tiers)?;
            let mut lower = Decimal::ZERO;
            for (index, tier) in price.tiers.iter().enumerate() {
                // Bounds are inclusive: a quantity equal to a tier's up_to falls in that tier.
                if tier.up_to.is_none_or(|bound| overage <= bound.value()) {
                    steps.push(step(Some(index), lower, tier.up_to, overage, tier.unit_price, tier.flat_fee)?);
                    break;
                }
                lower = tier.up_to.map_or(lower, Decimal6::value);
            }
        }
        PricingModel::Package => {
            let unit_price =
                price.unit_price.ok_or_else(|| invalid("PACKAGE without a unit_price (the price of a package)"))?;
            let size = price.package_size.map(Decimal6::value).filter(|s| *s > Decimal::ZERO);
            let size = size.ok_or_else(|| invalid("PACKAGE without a package_size above 0"))?;
            let packages = (overage / size).ceil();
            steps.push(step(None, Decimal::ZERO, None, packages, unit_price, None)?);
        }
        PricingModel::Unknown => return Err(invalid("a pricing model this release does not know")),
    }
    let mut amount: Decimal = steps.iter().map(|s| s.amount.value()).sum();
    let mut minimum_applied = false;
    if let Some(minimum) = price.minimum_charge
        && amount < minimum.value()
    {
        // The raise is a step of its own, so that the steps still sum to the amount.
        let raise = minimum.value() - amount;
        steps.push(RatingStep {
            tier_index: None,
            from_quantity: d6(overage)?,
            up_to: None,
            quantity: Decimal6::ZERO,
            unit_price: Decimal6::ZERO,
            flat_fee: Some(d6(raise)?),
            amount: d6(raise)?,
        });
        amount = minimum.value();
        minimum_applied = true;
    }
    Ok(Rating { steps, amount, minimum_applied })
}

/// The number of digits of `currency`'s minor unit (its ISO 4217 exponent), from the
/// iso_currency crate; `None` for a code that is not ISO 4217.
pub fn minor_unit_digits(currency: &str) -> Option<u32> {
    let currency = iso_currency::Currency::from_code(currency)?;
    // A currency without minor units (gold, SDR) is rounded to whole units.
    Some(currency.exponent().map_or(0, u32::from))
}

/// The rule a plan's rounding mode names (HALF_EVEN when it names none or one this release
/// does not know).
pub fn effective_mode(mode: Option<RoundingMode>) -> RoundingMode {
    match mode {
        Some(mode @ (RoundingMode::HalfUp | RoundingMode::Up | RoundingMode::Down | RoundingMode::HalfEven)) => mode,
        _ => RoundingMode::HalfEven,
    }
}

/// `amount` rounded to `digits` places by `mode`.
pub fn round_to_currency(amount: Decimal, digits: u32, mode: RoundingMode) -> Decimal {
    let strategy = match effective_mode(Some(mode)) {
        RoundingMode::HalfUp => RoundingStrategy::MidpointAwayFromZero,
        RoundingMode::Up => RoundingStrategy::AwayFromZero,
        RoundingMode::Down => RoundingStrategy::ToZero,
        _ => RoundingStrategy::MidpointNearestEven,
    };
    amount.round_dp_with_strategy(digits, strategy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn dec(text: &str) -> Decimal {
        Decimal::from_str(text).unwrap()
    }

    fn d(text: &str) -> Decimal6 {
        Decimal6::new(dec(text)).unwrap()
    }

    fn tier(up_to: Option<&str>, unit_price: &str, flat_fee: Option<&str>) -> PriceTier {
        PriceTier { up_to: up_to.map(d), unit_price: d(unit_price), flat_fee: flat_fee.map(d) }
    }

    fn price(model: PricingModel) -> MeterPrice {
        MeterPrice {
            meter: "api_calls".into(),
            unit: "request".into(),
            model,
            unit_price: None,
            tiers: Vec::new(),
            package_size: None,
            minimum_charge: None,
        }
    }

    fn graduated() -> MeterPrice {
        let mut price = price(PricingModel::Graduated);
        price.tiers =
            vec![tier(Some("10"), "1.00", None), tier(Some("20"), "0.50", Some("5")), tier(None, "0.25", Some("2"))];
        price
    }

    fn volume() -> MeterPrice {
        let mut price = price(PricingModel::Volume);
        price.tiers = vec![
            tier(Some("100"), "2.00", None),
            tier(Some("1000"), "1.50", Some("10")),
            tier(None, "1.00", Some("50")),
        ];
        price
    }

    /// (overage, rated amount, steps' quantities).
    fn check(price: &MeterPrice, cases: &[(&str, &str, &[&str])]) {
        for (overage, expected, quantities) in cases {
            let rating = rate(price, dec(overage)).unwrap();
            assert_eq!(rating.amount, dec(expected), "{:?} at {overage}", price.model);
            let sum: Decimal = rating.steps.iter().map(|s| s.amount.value()).sum();
            assert_eq!(sum, rating.amount, "the steps sum to the amount at {overage}");
            let got: Vec<Decimal> = rating.steps.iter().map(|s| s.quantity.value()).collect();
            let want: Vec<Decimal> = quantities.iter().map(|q| dec(q)).collect();
            assert_eq!(got, want, "{:?} steps at {overage}", price.model);
        }
    }

    #[test]
    fn per_unit_prices_every_unit_alike() {
        let mut price = price(PricingModel::PerUnit);
        price.unit_price = Some(d("0.000150"));
        check(&price, &[("1", "0.000150", &["1"]), ("1250000", "187.5", &["1250000"]), ("0.5", "0.000075", &["0.5"])]);
    }

    #[test]
    fn graduated_splits_across_tiers_with_inclusive_bounds_and_a_fee_per_tier_entered() {
        check(
            &graduated(),
            &[
                ("5", "5", &["5"]),
                ("10", "10", &["10"]),        // exactly the first bound: tier 2 not entered
                ("11", "15.5", &["10", "1"]), // entering tier 2 costs its fee
                ("20", "20", &["10", "10"]),
                ("25", "23.25", &["10", "10", "5"]), // 10 + (5 + 5) + (2 + 1.25)
            ],
        );
    }

    #[test]
    fn volume_prices_all_units_at_the_tier_the_total_falls_into() {
        check(
            &volume(),
            &[
                ("1", "2", &["1"]),
                ("100", "200", &["100"]),        // the bound belongs to the first tier
                ("100.5", "160.75", &["100.5"]), // 100.5 × 1.50 + 10
                ("1000", "1510", &["1000"]),
                ("5000", "5050", &["5000"]),
            ],
        );
    }

    #[test]
    fn packages_are_rounded_up_to_whole_packages() {
        let mut price = price(PricingModel::Package);
        price.unit_price = Some(d("25"));
        price.package_size = Some(d("1000"));
        check(&price, &[("1", "25", &["1"]), ("1000", "25", &["1"]), ("1001", "50", &["2"]), ("2999.5", "75", &["3"])]);
    }

    #[test]
    fn the_minimum_charge_raises_a_lower_amount_as_a_step_of_its_own() {
        let mut price = price(PricingModel::PerUnit);
        price.unit_price = Some(d("0.01"));
        price.minimum_charge = Some(d("50"));
        let rating = rate(&price, dec("100")).unwrap();
        assert_eq!(rating.amount, dec("50"));
        assert!(rating.minimum_applied);
        assert_eq!(rating.steps.len(), 2);
        assert_eq!(rating.steps[1].amount.value(), dec("49"), "1 rated + 49 raised");
        let rating = rate(&price, dec("10000")).unwrap();
        assert_eq!((rating.amount, rating.minimum_applied), (dec("100"), false), "above the minimum: untouched");
    }

    #[test]
    fn invalid_prices_are_refused_with_a_reason() {
        let mut tiers = graduated();
        tiers.tiers[2].up_to = Some(d("30"));
        assert!(rate(&tiers, dec("1")).unwrap_err().0.contains("open-ended"));
        let mut tiers = graduated();
        tiers.tiers[1].up_to = Some(d("5"));
        assert!(rate(&tiers, dec("1")).unwrap_err().0.contains("not above"));
        assert!(rate(&price(PricingModel::PerUnit), dec("1")).is_err());
        assert!(rate(&price(PricingModel::Package), dec("1")).is_err());
        assert!(rate(&price(PricingModel::Unknown), dec("1")).is_err());
    }

    #[test]
    fn currencies_round_to_their_iso_4217_minor_unit_half_even_by_default() {
        let digits = |code| minor_unit_digits(code).unwrap();
        assert_eq!((digits("EUR"), digits("JPY"), digits("KWD")), (2, 0, 3));
        assert_eq!(minor_unit_digits("XXY"), None);
        let even = RoundingMode::HalfEven;
        assert_eq!(round_to_currency(dec("2.345"), 2, even), dec("2.34"));
        assert_eq!(round_to_currency(dec("2.355"), 2, even), dec("2.36"));
        assert_eq!(round_to_currency(dec("2.345"), 2, RoundingMode::HalfUp), dec("2.35"));
        assert_eq!(round_to_currency(dec("2.341"), 2, RoundingMode::Up), dec("2.35"));
        assert_eq!(round_to_currency(dec("2.349"), 2, RoundingMode::Down), dec("2.34"));
        assert_eq!(round_to_currency(dec("1234.5"), 0, even), dec("1234"), "JPY");
        assert_eq!(round_to_currency(dec("1.2345"), 3, even), dec("1.234"), "KWD");
        assert_eq!(round_to_currency(dec("1.2345"), 3, RoundingMode::Unknown), dec("1.234"), "unknown: half-even");
    }
}
