//! The built-in formats, written from the carriers' published structures. Order matters only
//! where shapes overlap: the first format whose check digit holds names the carrier.

use fancy_regex::Regex;

use super::{Checksum, Format, Match, ServiceLookup};

const UPS_SERVICES: &[(&str, &str)] = &[
    ("01", "UPS Next Day Air"),
    ("02", "UPS 2nd Day Air"),
    ("03", "UPS Ground"),
    ("12", "UPS 3 Day Select"),
    ("13", "UPS Next Day Air Saver"),
    ("15", "UPS Next Day Air Early"),
    ("22", "UPS Ground Returns"),
    ("42", "UPS Ground, signature required"),
    ("44", "UPS Next Day Air, Saturday delivery"),
    ("66", "UPS Worldwide Express"),
    ("72", "UPS Worldwide Expedited"),
    ("YW", "UPS SurePost"),
];

/// UPU S10 service indicators, by first letter.
const S10_SERVICES: &[(&str, &str)] = &[
    ("^E", "EMS"),
    ("^L", "Letter post express"),
    ("^[CH]", "Parcel post"),
    ("^R", "Registered letter post"),
    ("^V", "Insured letter post"),
    ("^U", "Letter post, tracked"),
];

/// ISO 3166-1 alpha-2: an S10 number ends with its issuing postal operator's country.
const COUNTRIES: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI \
    BJ BL BM BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY \
    CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN \
    GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH \
    KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO \
    MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL \
    PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV \
    SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN \
    VU WF WS YE YT ZA ZM ZW XK";

fn mod10(odds: u32, evens: u32, reverse: bool) -> Checksum {
    Checksum::Mod10 {
        odds_multiplier: odds,
        evens_multiplier: evens,
        reverse,
        modulo: None,
    }
}

fn weighted(weights: &[u32]) -> Checksum {
    Checksum::SumProductWithWeightingsAndModulo {
        weightings: weights.to_vec(),
        modulo1: 11,
        modulo2: 10,
    }
}

fn lookup(group: &str, entries: &[(&str, &str)], exact: bool) -> Option<ServiceLookup> {
    let entries = entries
        .iter()
        .map(|(key, name)| {
            let matcher = if exact {
                Match::Exact((*key).to_owned())
            } else {
                Match::Pattern(Regex::new(key).ok()?)
            };
            Some((matcher, (*name).to_owned()))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(ServiceLookup {
        group: group.to_owned(),
        entries,
    })
}

/// How many built-in formats there are: a test checks that every one compiles.
#[cfg(test)]
pub(super) const BUILTIN_FORMATS: usize = 22;

/// Every built-in format, compiled.
pub(super) fn formats() -> Vec<Format> {
    const FEDEX_12: &[u32] = &[3, 1, 7, 3, 1, 7, 3, 1, 7, 3, 1];
    const FEDEX_34: &[u32] = &[1, 7, 3, 1, 7, 3, 1, 7, 3, 1, 7, 3, 1];
    let defs: Vec<(&str, &str, &str, Checksum)> = vec![
        (
            "ups",
            "ups",
            "1Z(?<SerialNumber>[A-Z0-9]{6}(?<ServiceType>[A-Z0-9]{2})[A-Z0-9]{7})(?<CheckDigit>[0-9])",
            mod10(2, 1, false),
        ),
        (
            "ups",
            "ups_waybill",
            "[AHJKTV](?<SerialNumber>[0-9]{9})(?<CheckDigit>[0-9])",
            mod10(2, 1, false),
        ),
        (
            "amazon",
            "amazon_logistics",
            "TB[ACM][0-9]{12}",
            Checksum::None,
        ),
        (
            "s10",
            "s10",
            "(?<ServiceType>[A-Z]{2})(?<SerialNumber>[0-9]{8})(?<CheckDigit>[0-9])(?<CountryCode>[A-Z]{2})",
            Checksum::S10 {
                weightings: None,
                modulo: None,
            },
        ),
        (
            // Older 20-digit labels: the check digit covers an implied "91" prefix.
            "usps",
            "usps_legacy",
            "(?<SerialNumber>[0-9]{19})(?<CheckDigit>[0-9])",
            mod10(1, 3, false),
        ),
        (
            // Before FedEx's 34-digit formats: 420+ZIP+IMpb labels can fit their shape too.
            "usps",
            "usps_impb",
            "(?:420(?:[0-9]{9}|[0-9]{5}))?(?<SerialNumber>9[1-5](?<ServiceType>[0-9]{3})(?:[0-9]{20}|[0-9]{16}))(?<CheckDigit>[0-9])",
            mod10(1, 3, true),
        ),
        (
            "fedex",
            "fedex_12",
            "(?<SerialNumber>[0-9]{11})(?<CheckDigit>[0-9])",
            weighted(FEDEX_12),
        ),
        (
            "fedex",
            "fedex_ground",
            "(?<SerialNumber>[0-9]{14})(?<CheckDigit>[0-9])",
            mod10(3, 1, false),
        ),
        (
            "fedex",
            "fedex_ground_96",
            "96[0-9]{2}(?<ServiceType>[0-9]{3})(?<SerialNumber>[0-9]{14})(?<CheckDigit>[0-9])",
            mod10(3, 1, false),
        ),
        (
            "fedex",
            "fedex_ground_gsn",
            "96[0-9]{18}(?<SerialNumber>[0-9]{13})(?<CheckDigit>[0-9])",
            weighted(FEDEX_34),
        ),
        (
            "fedex",
            "fedex_34",
            "[0-8][0-9]{19}(?<SerialNumber>[0-9]{13})(?<CheckDigit>[0-9])",
            weighted(FEDEX_34),
        ),
        (
            "fedex",
            "fedex_32",
            "3[0-9]{15}(?<SerialNumber>[0-9]{11})(?<CheckDigit>[0-9])[0-9]{4}",
            weighted(FEDEX_12),
        ),
        (
            "usps",
            "usps_20",
            "(?<SerialNumber>[0-9]{19})(?<CheckDigit>[0-9])",
            mod10(1, 3, false),
        ),
        (
            "sscc",
            "sscc_18",
            "(?<SerialNumber>[0-9]{17})(?<CheckDigit>[0-9])",
            mod10(1, 3, false),
        ),
        (
            "dhl",
            "dhl_express",
            "(?<SerialNumber>[0-9]{9,10})(?<CheckDigit>[0-9])",
            Checksum::Mod7 { modulo: None },
        ),
        (
            "dhl",
            "dhl_ecommerce",
            "(?:GM|LX|RX|UV|CN|SG|TH|IN|HK|MY)(?=[0-9A-Z]*[0-9])[0-9A-Z]{10,39}",
            Checksum::None,
        ),
        (
            "canadapost",
            "canada_post",
            "(?<SerialNumber>[0-9]{15})(?<CheckDigit>[0-9])",
            mod10(1, 3, false),
        ),
        (
            "ontrac",
            "ontrac_c",
            "C(?<SerialNumber>[0-9]{13})(?<CheckDigit>[0-9])",
            mod10(2, 1, false),
        ),
        (
            "ontrac",
            "ontrac_d",
            "D(?<SerialNumber>[0-9]{13})(?<CheckDigit>[0-9])",
            mod10(2, 1, false),
        ),
        (
            "lasership",
            "lasership_lx",
            "L[AIEHNX][1-3][0-9]{7}",
            Checksum::None,
        ),
        (
            "dpd",
            "dpd_28",
            "(?<SerialNumber>[0-9]{7}[0-9]{14}[0-9]{3}[0-9]{3})(?<CheckDigit>[0-9A-Z])",
            Checksum::Mod3736 {
                modulo: None,
                alphabet: None,
            },
        ),
        (
            "dpd",
            "dpd_14",
            "(?<SerialNumber>[0-9]{14})(?<CheckDigit>[A-Z])",
            Checksum::Mod3736 {
                modulo: None,
                alphabet: None,
            },
        ),
    ];
    defs.into_iter()
        .filter_map(|(carrier, id, regex, checksum)| {
            let mut format = Format::new(carrier, id, regex, checksum).ok()?;
            match id {
                "ups" => format.service = lookup("ServiceType", UPS_SERVICES, true),
                "s10" => {
                    format.service = lookup("ServiceType", S10_SERVICES, false);
                    format.must_exist = Some((
                        "CountryCode".to_owned(),
                        COUNTRIES.split_whitespace().map(str::to_owned).collect(),
                    ));
                }
                // OnTrac's check digit covers the serial behind a leading 4 (C) or 5 (D).
                "ontrac_c" => {
                    format.prepend_if = Regex::new("^(?!4)").ok().map(|r| (r, "4".into()))
                }
                "ontrac_d" => {
                    format.prepend_if = Regex::new("^(?!5)").ok().map(|r| (r, "5".into()))
                }
                "usps_legacy" => {
                    format.prepend_if = Regex::new("^(?!91)").ok().map(|r| (r, "91".into()))
                }
                _ => {}
            }
            Some(format)
        })
        .collect()
}
