//! Carrier recognition: which carrier's format a tracking number follows, and whether its check
//! digit is right. Formats are the built-ins (`builtin`), custom ones from config (a retailer's
//! own order numbers) and, optionally, definition files in the public tracking_number_data
//! courier schema (`data`), all run by one interpreter: an anchored regex with the named groups
//! `SerialNumber` and `CheckDigit`, a check-digit scheme (`checksum`), and optional lookups
//! that name the service a group encodes. One pass of a `RegexSet` over the number first picks
//! the formats it has the shape of; only those run.
//!
//! Invariants: classification is a pure function of the number and the formats; it never
//! panics on any input; a number is valid when *some* format matches it and its check digit
//! holds, and is a check-digit mismatch only when formats match its shape but none validates.

mod builtin;
pub mod checksum;
mod data;

use std::path::PathBuf;

use fancy_regex::Regex;
use serde::{Deserialize, Serialize};

pub use checksum::Checksum;

/// What to do with a scan whose tracking number is not a valid number of a known carrier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// REJECTED with reason `tracking_number_check_digit` / `tracking_number_unknown_format`.
    Reject,
    /// Accepted, counted and marked on the shipment.
    #[default]
    Flag,
    /// Not checked.
    Off,
}

/// `[ingest.tracking_numbers]` in the config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CarrierConfig {
    pub policy: Policy,
    /// Extra formats, tried before the built-ins.
    pub custom: Vec<CustomFormat>,
    /// Courier files in the tracking_number_data schema (`{"courier_code", "tracking_numbers"}`).
    pub definition_files: Vec<PathBuf>,
}

/// A format defined in config, e.g. a retailer's `ORD` + 9 digits with a Luhn check digit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomFormat {
    pub carrier: String,
    pub name: String,
    /// Matched against the whole normalized number (upper case, no spaces or dashes). Name the
    /// groups `SerialNumber` and `CheckDigit` when there is a check digit.
    pub regex: String,
    #[serde(default = "no_checksum")]
    pub check_digit: Checksum,
}

fn no_checksum() -> Checksum {
    Checksum::None
}

#[derive(Debug, thiserror::Error)]
pub enum CarrierError {
    #[error("tracking number format {format}: bad regex: {reason}")]
    Regex { format: String, reason: String },
    #[error("tracking number format {format}: a check digit scheme needs the named groups SerialNumber and CheckDigit in its regex")]
    Groups { format: String },
    #[error("tracking number definitions {path}: {reason}")]
    File { path: String, reason: String },
}

/// The carrier a number belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Carrier {
    /// Stable lower-case code: "ups", "fedex", "usps", "s10", "dhl", "sscc", "amazon", ...
    pub carrier: String,
    /// The format's id within the carrier, e.g. "fedex_12".
    pub format: String,
    /// The service the number encodes, where the format has one.
    pub service: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Classification {
    Valid(Carrier),
    /// The shape of a known format, with a wrong check digit (the closest match).
    CheckDigitMismatch(Carrier),
    UnknownFormat,
}

impl Classification {
    pub const CHECK_DIGIT_MISMATCH: &'static str = "tracking_number_check_digit";
    pub const UNKNOWN_FORMAT: &'static str = "tracking_number_unknown_format";
    /// Every code `reason` gives.
    pub const REASONS: [&'static str; 2] = [Self::CHECK_DIGIT_MISMATCH, Self::UNKNOWN_FORMAT];

    /// The reason code of a number that is not valid; `None` when valid.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Classification::Valid(_) => None,
            Classification::CheckDigitMismatch(_) => Some(Self::CHECK_DIGIT_MISMATCH),
            Classification::UnknownFormat => Some(Self::UNKNOWN_FORMAT),
        }
    }
}

/// A named group's value → service name.
#[derive(Clone, Debug)]
struct ServiceLookup {
    group: String,
    entries: Vec<(Match, String)>,
}

#[derive(Clone, Debug)]
enum Match {
    Exact(String),
    Pattern(Regex),
}

/// One format, compiled.
#[derive(Clone, Debug)]
struct Format {
    carrier: String,
    id: String,
    regex: Regex,
    checksum: Checksum,
    /// Prepend `content` to the serial when it matches (tracking_number_data `prepend_if`).
    prepend_if: Option<(Regex, String)>,
    service: Option<ServiceLookup>,
    /// A group whose value must appear in this list (S10's country code).
    must_exist: Option<(String, Vec<String>)>,
}

impl Format {
    fn new(carrier: &str, id: &str, regex: &str, checksum: Checksum) -> Result<Self, CarrierError> {
        let compiled = Regex::new(&format!("^(?:{regex})$")).map_err(|e| CarrierError::Regex {
            format: id.to_owned(),
            reason: e.to_string(),
        })?;
        if checksum != Checksum::None {
            let names: Vec<&str> = compiled.capture_names().flatten().collect();
            if !names.contains(&"SerialNumber") || !names.contains(&"CheckDigit") {
                return Err(CarrierError::Groups {
                    format: id.to_owned(),
                });
            }
        }
        Ok(Format {
            carrier: carrier.to_owned(),
            id: id.to_owned(),
            regex: compiled,
            checksum,
            prepend_if: None,
            service: None,
            must_exist: None,
        })
    }

    /// `None` when the shape does not match; else whether the check digit holds.
    fn check(&self, number: &str) -> Option<(bool, Carrier)> {
        let captures = self.regex.captures(number).ok().flatten()?;
        let group = |name: &str| -> Option<String> {
            captures
                .name(name)
                .map(|m| m.as_str().chars().filter(|c| !c.is_whitespace()).collect())
        };
        let mut valid = match (&self.checksum, group("SerialNumber"), group("CheckDigit")) {
            (Checksum::None, _, _) => true,
            (scheme, Some(mut serial), Some(check)) => {
                if let Some((pattern, content)) = &self.prepend_if {
                    if pattern.is_match(&serial).unwrap_or(false) {
                        serial.insert_str(0, content);
                    }
                }
                scheme.validates(&serial, &check)
            }
            _ => false,
        };
        if let Some((name, allowed)) = &self.must_exist {
            valid &= group(name).is_some_and(|v| allowed.contains(&v));
        }
        let service = self.service.as_ref().and_then(|lookup| {
            let value = group(&lookup.group)?;
            lookup.entries.iter().find_map(|(m, name)| {
                let hit = match m {
                    Match::Exact(s) => *s == value,
                    Match::Pattern(r) => r.is_match(&value).unwrap_or(false),
                };
                hit.then(|| name.clone())
            })
        });
        Some((
            valid,
            Carrier {
                carrier: self.carrier.clone(),
                format: self.id.clone(),
                service,
            },
        ))
    }
}

/// The known formats, in the order they are tried.
#[derive(Clone, Debug)]
pub struct CarrierRegistry {
    formats: Vec<Format>,
    shapes: ShapeFilter,
}

/// Which formats a number has the shape of, found in one pass over it: a number is checked
/// (captures, check digit, service) only against those. Without it, every format's regex ran
/// on every number, ~1 µs for one matching no format.
///
/// A format's shape is its regex without lookaround (which the `regex` crate lacks): dropping
/// an assertion only widens what a pattern matches, so the set stays a necessary condition and
/// the format's own regex still decides. A shape `regex` does not compile either (a
/// backreference) leaves its format always tried, in its place in the order.
#[derive(Clone, Debug)]
struct ShapeFilter {
    set: regex::RegexSet,
    /// Each format's pattern index in `set`; `None`: always tried.
    slots: Vec<Option<usize>>,
}

impl ShapeFilter {
    fn new(formats: &[Format]) -> Self {
        let mut patterns = Vec::new();
        let slots: Vec<Option<usize>> = formats
            .iter()
            .map(|format| {
                let shape = without_lookaround(format.regex.as_str());
                regex::Regex::new(&shape).ok().map(|_| {
                    patterns.push(shape);
                    patterns.len() - 1
                })
            })
            .collect();
        match regex::RegexSet::new(&patterns) {
            Ok(set) => ShapeFilter { set, slots },
            // Beyond the set's size limit: every format is tried, as it would be without one.
            Err(_) => ShapeFilter {
                set: regex::RegexSet::empty(),
                slots: vec![None; formats.len()],
            },
        }
    }
}

/// `pattern` with every lookahead and lookbehind group (`(?=`, `(?!`, `(?<=`, `(?<!`) removed,
/// escapes and character classes (nested, or opening with a literal `]`) respected. Should it
/// misread a pattern, what it returns fails to compile, and the format is always tried.
fn without_lookaround(pattern: &str) -> String {
    const ASSERTIONS: [&str; 4] = ["(?=", "(?!", "(?<=", "(?<!"];
    let mut out = String::with_capacity(pattern.len());
    let mut chars = pattern.char_indices().peekable();
    // Parentheses open inside the assertion being dropped (0: none is being dropped).
    let mut dropping = 0usize;
    // Brackets open: `[a-z&&[^x]]` nests.
    let mut class_depth = 0usize;
    while let Some((at, c)) = chars.next() {
        // What a token spans beyond `c`: an escaped character, a class's opening `^` or `]`.
        match c {
            '\\' => {
                chars.next();
            }
            '[' => {
                class_depth += 1;
                // `[]...]` and `[^]...]`: a `]` first in a class is a literal.
                chars.next_if(|&(_, n)| n == '^');
                chars.next_if(|&(_, n)| n == ']');
            }
            ']' if class_depth > 0 => class_depth -= 1,
            '(' if class_depth == 0 && dropping > 0 => dropping += 1,
            '(' if class_depth == 0 && ASSERTIONS.iter().any(|a| pattern[at..].starts_with(a)) => {
                dropping = 1
            }
            ')' if class_depth == 0 && dropping > 0 => {
                dropping -= 1;
                continue;
            }
            _ => {}
        }
        if dropping == 0 {
            let end = chars.peek().map_or(pattern.len(), |&(next, _)| next);
            out.push_str(&pattern[at..end]);
        }
    }
    out
}

impl CarrierRegistry {
    fn with_formats(formats: Vec<Format>) -> Self {
        CarrierRegistry {
            shapes: ShapeFilter::new(&formats),
            formats,
        }
    }

    /// The built-in formats only.
    pub fn builtin() -> Self {
        Self::with_formats(builtin::formats())
    }

    /// Custom formats, then definition files, then the built-ins.
    pub fn new(config: &CarrierConfig) -> Result<Self, CarrierError> {
        let mut formats = Vec::new();
        for custom in &config.custom {
            formats.push(Format::new(
                &custom.carrier,
                &custom.name,
                &custom.regex,
                custom.check_digit.clone(),
            )?);
        }
        for path in &config.definition_files {
            formats.extend(data::load(path)?);
        }
        formats.extend(builtin::formats());
        Ok(Self::with_formats(formats))
    }

    /// Formats from one definition file alone (for tests and tools).
    pub fn from_definition_file(path: &std::path::Path) -> Result<Self, CarrierError> {
        Ok(Self::with_formats(data::load(path)?))
    }

    /// Classifies a normalized tracking number (upper case, no spaces or dashes).
    pub fn classify(&self, number: &str) -> Classification {
        let shaped = self.shapes.set.matches(number);
        let candidates = self
            .formats
            .iter()
            .zip(&self.shapes.slots)
            .filter(|(_, slot)| slot.is_none_or(|i| shaped.matched(i)))
            .map(|(format, _)| format);
        classify_among(candidates, number)
    }
}

/// The first format of `formats` (in order) that `number` is valid in; else the first whose
/// shape it has, as a mismatch.
fn classify_among<'a>(formats: impl Iterator<Item = &'a Format>, number: &str) -> Classification {
    let mut mismatch = None;
    for format in formats {
        match format.check(number) {
            Some((true, carrier)) => return Classification::Valid(carrier),
            Some((false, carrier)) if mismatch.is_none() => mismatch = Some(carrier),
            _ => {}
        }
    }
    mismatch.map_or(
        Classification::UnknownFormat,
        Classification::CheckDigitMismatch,
    )
}

#[cfg(test)]
mod tests;
