//! Check-digit schemes of carrier tracking numbers, as named in the public
//! tracking_number_data schema (`validation.checksum.name`). Each takes the serial number and
//! the check character as the carrier's regex captured them (whitespace already removed) and
//! never panics, whatever the input.

use serde::{Deserialize, Serialize};

/// One scheme with its parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum Checksum {
    /// No check digit: the shape alone identifies the format.
    None,
    /// Weighted digit sum, check = (10 - sum % 10) % 10. Positions are 0-based from the left
    /// (from the right with `reverse`): even positions take `evens_multiplier`, odd ones
    /// `odds_multiplier`, as the reference implementation counts. Letters count as
    /// `(ascii - 3) % 10` (UPS).
    Mod10 {
        #[serde(default = "one")]
        odds_multiplier: u32,
        #[serde(default = "one")]
        evens_multiplier: u32,
        #[serde(default)]
        reverse: bool,
        #[serde(default, skip_serializing)]
        modulo: Option<u32>,
    },
    /// The serial as a number, modulo 7 (DHL Express).
    Mod7 {
        #[serde(default, skip_serializing)]
        modulo: Option<u32>,
    },
    /// UPU S10: weights 8 6 4 2 3 5 9 7, 11 - sum % 11, with 10 → 0 and 11 → 5.
    S10 {
        #[serde(default, skip_serializing)]
        weightings: Option<Vec<u32>>,
        #[serde(default, skip_serializing)]
        modulo: Option<u32>,
    },
    /// `sum(digit × weight) % modulo1 % modulo2` (FedEx Express).
    SumProductWithWeightingsAndModulo {
        weightings: Vec<u32>,
        modulo1: u32,
        modulo2: u32,
    },
    /// Luhn, from the right, doubling every second digit starting with the rightmost.
    Luhn {
        #[serde(default, skip_serializing)]
        modulo: Option<u32>,
    },
    /// ISO 7064 MOD 37/36 over digits and letters (DPD).
    #[serde(rename = "mod_37_36")]
    Mod3736 {
        #[serde(default, skip_serializing)]
        modulo: Option<u32>,
        #[serde(default, skip_serializing)]
        alphabet: Option<String>,
    },
}

fn one() -> u32 {
    1
}

impl Checksum {
    /// `true` when `check` is the right check character for `serial`.
    pub fn validates(&self, serial: &str, check: &str) -> bool {
        match self {
            Checksum::None => true,
            Checksum::Mod10 {
                odds_multiplier,
                evens_multiplier,
                reverse,
                ..
            } => mod10(serial, *odds_multiplier, *evens_multiplier, *reverse)
                .is_some_and(|c| digit_is(check, c)),
            Checksum::Mod7 { .. } => serial
                .parse::<u128>()
                .ok()
                .is_some_and(|n| digit_is(check, (n % 7) as u32)),
            Checksum::S10 { .. } => s10(serial).is_some_and(|c| digit_is(check, c)),
            Checksum::SumProductWithWeightingsAndModulo {
                weightings,
                modulo1,
                modulo2,
            } => {
                weighted(serial, weightings, *modulo1, *modulo2).is_some_and(|c| digit_is(check, c))
            }
            Checksum::Luhn { .. } => luhn(serial).is_some_and(|c| digit_is(check, c)),
            Checksum::Mod3736 { .. } => mod_37_36(serial).is_some_and(|c| check == c.to_string()),
        }
    }
}

fn digit_is(check: &str, value: u32) -> bool {
    check.len() == 1 && check.chars().next().and_then(|c| c.to_digit(10)) == Some(value)
}

/// A character's value in mod 10: digits as themselves, letters as UPS maps them.
fn mod10_value(c: char) -> Option<u32> {
    match c {
        '0'..='9' => c.to_digit(10),
        'A'..='Z' => Some((c as u32 - 3) % 10),
        _ => None,
    }
}

fn mod10(serial: &str, odds: u32, evens: u32, reverse: bool) -> Option<u32> {
    let values: Vec<u32> = serial.chars().map(mod10_value).collect::<Option<_>>()?;
    let weigh = |(i, v): (usize, &u32)| v * if i % 2 == 0 { evens } else { odds };
    let total: u32 = if reverse {
        values.iter().rev().enumerate().map(weigh).sum()
    } else {
        values.iter().enumerate().map(weigh).sum()
    };
    Some((10 - total % 10) % 10)
}

fn s10(serial: &str) -> Option<u32> {
    const WEIGHTS: [u32; 8] = [8, 6, 4, 2, 3, 5, 9, 7];
    if serial.len() != WEIGHTS.len() {
        return None;
    }
    let mut total = 0;
    for (c, w) in serial.chars().zip(WEIGHTS) {
        total += c.to_digit(10)? * w;
    }
    Some(match 11 - total % 11 {
        10 => 0,
        11 => 5,
        check => check,
    })
}

fn weighted(serial: &str, weights: &[u32], modulo1: u32, modulo2: u32) -> Option<u32> {
    if modulo1 == 0 || modulo2 == 0 {
        return None;
    }
    // Weights apply from the right: the digit before the check digit gets the last weight.
    let digits: Vec<u32> = serial
        .chars()
        .map(|c| c.to_digit(10))
        .collect::<Option<_>>()?;
    let total: u32 = digits
        .iter()
        .rev()
        .zip(weights.iter().rev())
        .map(|(d, w)| d * w)
        .sum();
    Some(total % modulo1 % modulo2)
}

fn luhn(serial: &str) -> Option<u32> {
    let mut total = 0;
    for (i, c) in serial.chars().rev().enumerate() {
        let mut d = c.to_digit(10)?;
        if i % 2 == 0 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        total += d;
    }
    Some((10 - total % 10) % 10)
}

fn mod_37_36(serial: &str) -> Option<char> {
    const M: u32 = 36;
    let mut cd = M;
    for c in serial.chars() {
        let value = c.to_digit(36)?;
        cd = (cd + value) % M;
        if cd == 0 {
            cd = M;
        }
        cd = (cd * 2) % (M + 1);
    }
    let check = (M + 1 - cd) % M;
    char::from_digit(check, 36).map(|c| c.to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s10_check_digit_by_hand() {
        // RB 1234 5678 ?: 1·8+2·6+3·4+4·2+5·3+6·5+7·9+8·7 = 204; 11 - 204 % 11 = 5.
        assert!(Checksum::S10 {
            weightings: None,
            modulo: None
        }
        .validates("12345678", "5"));
        assert!(!Checksum::S10 {
            weightings: None,
            modulo: None
        }
        .validates("12345678", "6"));
    }

    #[test]
    fn sscc_check_digit_by_hand() {
        // GS1: weights 3,1,3,… from the left of 17 digits (the rightmost takes 3):
        // 0·3+0+0·3+1+2·3+3+4·3+5+0…+2·3 = 33 → 7. 00 0123 4500 0000 002|7.
        let gs1 = Checksum::Mod10 {
            odds_multiplier: 1,
            evens_multiplier: 3,
            reverse: false,
            modulo: None,
        };
        assert!(gs1.validates("00012345000000002", "7"));
        assert!(!gs1.validates("00012345000000002", "8"));
    }

    #[test]
    fn nonsense_is_never_valid_and_never_panics() {
        for scheme in [
            Checksum::Mod7 { modulo: None },
            Checksum::Luhn { modulo: None },
            Checksum::S10 {
                weightings: None,
                modulo: None,
            },
        ] {
            assert!(!scheme.validates("12x4", "1"));
            assert!(!scheme.validates("", ""));
            assert!(!scheme.validates("1234", "12"));
        }
        assert!(!Checksum::SumProductWithWeightingsAndModulo {
            weightings: vec![1],
            modulo1: 0,
            modulo2: 10
        }
        .validates("1", "1"));
    }
}
