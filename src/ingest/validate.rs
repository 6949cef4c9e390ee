//! Validation at the edge: a wire `Scan` becomes a [`ValidScan`] (normalized tracking number,
//! typed fields, facility fingerprint) or a [`Rejection`] with a machine-readable code and a
//! human message. Every source calls this; nothing past it checks input again.

use std::time::{Duration, SystemTime};

use std::sync::Arc;

use super::carrier::{CarrierError, CarrierRegistry, Classification, Policy};
use super::IngestConfig;
use crate::domain::clock::Clock;
use crate::domain::scan::ValidScan;
use crate::domain::NumberCheck;
use crate::domain::{EventTime, ScanId, ScanType, TrackingNumber, TrackingNumberError};
use crate::engine::facility_hash;
use crate::proto::pb;
use crate::store::codec;
use crate::telemetry::metrics as m;

/// Longest facility, device or exception code, in bytes.
pub const MAX_FIELD_BYTES: usize = 128;
pub const MAX_ATTRIBUTES: usize = 64;
pub const MAX_ATTRIBUTE_KEY_BYTES: usize = 128;
pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = 1024;

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("scan_id is empty")]
    MissingScanId,
    #[error("scan_id is {0} bytes; the limit is {max}", max = ScanId::MAX_LEN)]
    ScanIdTooLong(usize),
    #[error("tracking_number is empty")]
    MissingTrackingNumber,
    #[error("{0}")]
    InvalidTrackingNumber(TrackingNumberError),
    #[error("tracking_number has the shape of a {0} number but its check digit is wrong")]
    TrackingNumberCheckDigit(String),
    #[error("tracking_number matches no known carrier format")]
    TrackingNumberUnknownFormat,
    #[error("scan_type is SCAN_TYPE_UNSPECIFIED")]
    UnspecifiedScanType,
    #[error("scan_type {0} is not a known ScanType")]
    UnknownScanType(i32),
    #[error("event_time is missing")]
    MissingEventTime,
    #[error("event_time is not a valid timestamp ({0})")]
    InvalidEventTime(String),
    #[error(
        "event_time is {ahead_secs}s ahead of the server clock; at most {limit_secs}s allowed"
    )]
    EventTimeInFuture { ahead_secs: u64, limit_secs: u64 },
    #[error("event_time is {age_secs}s old; at most {limit_secs}s allowed")]
    EventTimeTooOld { age_secs: u64, limit_secs: u64 },
    #[error("latitude {0} is outside -90..=90")]
    LatitudeOutOfRange(f64),
    #[error("longitude {0} is outside -180..=180")]
    LongitudeOutOfRange(f64),
    #[error("device_id {0:?} is not allowed for this bearer token")]
    DeviceNotAllowed(String),
    /// Decided by the engine, not here: the scan belongs to a journey retention removed.
    #[error("the scan belongs to a journey of this tracking number that retention removed")]
    JourneyExpired,
    #[error("{field} is {len} {unit}; the limit is {limit}")]
    Oversized {
        field: &'static str,
        len: usize,
        limit: usize,
        unit: &'static str,
    },
}

impl Rejection {
    /// Stable code: the `reason` label of `scand_scans_rejected_total` and the prefix of the
    /// reason sent back to the scanner.
    /// Every code [`Rejection::code`] gives (tested), for series exported before the first.
    pub const CODES: [&'static str; 18] = [
        "missing_scan_id",
        "scan_id_too_long",
        "missing_tracking_number",
        "tracking_number_length",
        "tracking_number_charset",
        Classification::CHECK_DIGIT_MISMATCH,
        Classification::UNKNOWN_FORMAT,
        "unspecified_scan_type",
        "unknown_scan_type",
        "missing_event_time",
        "invalid_event_time",
        "event_time_in_future",
        "event_time_too_old",
        "latitude_out_of_range",
        "longitude_out_of_range",
        "device_not_allowed",
        "journey_expired",
        "oversized",
    ];

    pub fn code(&self) -> &'static str {
        match self {
            Rejection::MissingScanId => "missing_scan_id",
            Rejection::ScanIdTooLong(_) => "scan_id_too_long",
            Rejection::MissingTrackingNumber => "missing_tracking_number",
            Rejection::InvalidTrackingNumber(TrackingNumberError::Empty) => {
                "missing_tracking_number"
            }
            Rejection::InvalidTrackingNumber(TrackingNumberError::Length(_)) => {
                "tracking_number_length"
            }
            Rejection::InvalidTrackingNumber(TrackingNumberError::Character(_)) => {
                "tracking_number_charset"
            }
            Rejection::TrackingNumberCheckDigit(_) => Classification::CHECK_DIGIT_MISMATCH,
            Rejection::TrackingNumberUnknownFormat => Classification::UNKNOWN_FORMAT,
            Rejection::UnspecifiedScanType => "unspecified_scan_type",
            Rejection::UnknownScanType(_) => "unknown_scan_type",
            Rejection::MissingEventTime => "missing_event_time",
            Rejection::InvalidEventTime(_) => "invalid_event_time",
            Rejection::EventTimeInFuture { .. } => "event_time_in_future",
            Rejection::EventTimeTooOld { .. } => "event_time_too_old",
            Rejection::LatitudeOutOfRange(_) => "latitude_out_of_range",
            Rejection::LongitudeOutOfRange(_) => "longitude_out_of_range",
            Rejection::DeviceNotAllowed(_) => "device_not_allowed",
            Rejection::JourneyExpired => "journey_expired",
            Rejection::Oversized { .. } => "oversized",
        }
    }

    /// `code: message`, as sent in `ScanResult.reason`.
    pub fn reason(&self) -> String {
        format!("{}: {self}", self.code())
    }
}

#[derive(Clone, Debug)]
pub struct Validator {
    max_future_skew: Duration,
    max_age: Duration,
    skew_flag_ahead: Duration,
    skew_flag_behind: Duration,
    carriers: Arc<CarrierRegistry>,
    policy: Policy,
    checked: Arc<CheckedNumbers>,
    /// `scand_tracking_numbers_flagged_total` by reason, looked up once: counted per scan, and
    /// a labelled lookup costs more than the memoized check it counts.
    flagged: [(&'static str, metrics::Counter); 2],
    clock: Clock,
}

/// The outcome of a tracking number's carrier check, as `check_number` returns it.
type NumberVerdict = Result<Option<Arc<NumberCheck>>, Rejection>;

/// Recent carrier checks by tracking number. A parcel is scanned ten times or so in its life,
/// mostly within days, and the check (regexes and check digits over every format) costs ~1 µs
/// against ~0.1 µs for a lookup. Sharded to keep the gRPC threads apart; a full shard is
/// simply emptied, which bounds memory without bookkeeping.
#[derive(Debug)]
struct CheckedNumbers {
    shards: Vec<
        std::sync::Mutex<
            std::collections::HashMap<TrackingNumber, NumberVerdict, crate::engine::Hasher>,
        >,
    >,
    hasher: crate::engine::Hasher,
}

impl CheckedNumbers {
    const SHARDS: usize = 16;
    const PER_SHARD: usize = 4096;

    fn new() -> Self {
        Self {
            shards: (0..Self::SHARDS).map(|_| Default::default()).collect(),
            hasher: Default::default(),
        }
    }

    fn get_or(
        &self,
        number: &TrackingNumber,
        check: impl FnOnce() -> NumberVerdict,
    ) -> NumberVerdict {
        use std::hash::BuildHasher;
        let shard = &self.shards[self.hasher.hash_one(number) as usize % Self::SHARDS];
        if let Some(verdict) = shard.lock().ok().and_then(|map| map.get(number).cloned()) {
            return verdict;
        }
        let verdict = check();
        if let Ok(mut map) = shard.lock() {
            if map.len() >= Self::PER_SHARD {
                map.clear();
            }
            map.insert(number.clone(), verdict.clone());
        }
        verdict
    }
}

impl Validator {
    /// Fails only on a bad carrier format in the config (checked by `check-config` too).
    pub fn new(config: &IngestConfig) -> Result<Self, CarrierError> {
        Ok(Self {
            max_future_skew: config.max_future_skew,
            max_age: config.max_age,
            skew_flag_ahead: config.clock_skew_flag_ahead,
            skew_flag_behind: config.clock_skew_flag_behind,
            carriers: Arc::new(CarrierRegistry::new(&config.tracking_numbers)?),
            checked: Arc::new(CheckedNumbers::new()),
            policy: config.tracking_numbers.policy,
            flagged: Classification::REASONS.map(|reason| {
                let counter =
                    metrics::counter!(m::TRACKING_NUMBERS_FLAGGED_TOTAL, "reason" => reason);
                (reason, counter)
            }),
            clock: Clock::default(),
        })
    }

    /// Reading event times against `clock` (the daemon's one clock).
    pub fn with_clock(self, clock: Clock) -> Self {
        Self { clock, ..self }
    }

    /// The server clock scans are checked against.
    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// The carrier check under the configured policy: `Err` only under `reject`.
    fn check_number(&self, number: &TrackingNumber) -> NumberVerdict {
        if self.policy == Policy::Off {
            return Ok(None);
        }
        let verdict = self.checked.get_or(number, || self.classify(number));
        // Counted per scan, as before the memo.
        if let Ok(Some(check)) = &verdict {
            if let Some((_, counter)) = self.flagged.iter().find(|(r, _)| *r == check.issue) {
                counter.increment(1);
            }
        }
        verdict
    }

    fn classify(&self, number: &TrackingNumber) -> NumberVerdict {
        let classification = self.carriers.classify(number.as_str());
        let carrier = match (&classification, self.policy) {
            (Classification::CheckDigitMismatch(c), Policy::Reject) => {
                return Err(Rejection::TrackingNumberCheckDigit(c.carrier.clone()))
            }
            (Classification::UnknownFormat, Policy::Reject) => {
                return Err(Rejection::TrackingNumberUnknownFormat)
            }
            (Classification::Valid(c) | Classification::CheckDigitMismatch(c), _) => Some(c),
            (Classification::UnknownFormat, _) => None,
        };
        let issue = classification.reason().unwrap_or_default();
        Ok(Some(Arc::new(NumberCheck {
            carrier: carrier.map(|c| c.carrier.clone()).unwrap_or_default(),
            service: carrier.and_then(|c| c.service.clone()).unwrap_or_default(),
            issue: issue.to_owned(),
        })))
    }

    /// Accepted, but far enough from `now` that the device clock (or a very late upload)
    /// deserves a look.
    fn clock_skewed(&self, event_time: EventTime, now: SystemTime) -> bool {
        let now = EventTime::from_system_time(now);
        let ahead = event_time.0.saturating_sub(now.0);
        let limit = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        ahead > limit(self.skew_flag_ahead) || -ahead > limit(self.skew_flag_behind)
    }

    /// Checks and normalizes one scan against the server clock `now`.
    pub fn validate(&self, mut scan: pb::Scan, now: SystemTime) -> Result<ValidScan, Rejection> {
        let scan_id = match scan.scan_id.len() {
            0 => return Err(Rejection::MissingScanId),
            n if n > ScanId::MAX_LEN => return Err(Rejection::ScanIdTooLong(n)),
            _ => ScanId::parse(&scan.scan_id).ok_or(Rejection::MissingScanId)?,
        };
        if scan.tracking_number.is_empty() {
            return Err(Rejection::MissingTrackingNumber);
        }
        let tracking_number = TrackingNumber::parse(&scan.tracking_number)
            .map_err(Rejection::InvalidTrackingNumber)?;
        let number_check = self.check_number(&tracking_number)?;
        let scan_type = match scan.scan_type {
            0 => return Err(Rejection::UnspecifiedScanType),
            n => ScanType::from_i32(n).ok_or(Rejection::UnknownScanType(n))?,
        };
        let event_time = self.event_time(scan.event_time.as_ref(), now)?;
        check_location(scan.location.as_ref())?;
        check_sizes(&scan)?;

        if scan.tracking_number != tracking_number.as_str() {
            scan.tracking_number = tracking_number.to_string();
        }
        scan.received_time = Some(prost_types::Timestamp::from(now));
        let facility = facility_hash(
            scan.location
                .as_ref()
                .map_or("", |l| l.facility_id.as_str()),
        );
        Ok(ValidScan {
            stored: codec::encode_event(&mut scan),
            tracking_number,
            scan_id,
            scan_type,
            event_time,
            facility,
            wire: scan,
            origin: None,
            clock_skewed: self.clock_skewed(event_time, now),
            number_check,
        })
    }

    fn event_time(
        &self,
        t: Option<&prost_types::Timestamp>,
        now: SystemTime,
    ) -> Result<EventTime, Rejection> {
        let t = t.ok_or(Rejection::MissingEventTime)?;
        if !(0..1_000_000_000).contains(&t.nanos) {
            return Err(Rejection::InvalidEventTime(format!(
                "nanos {} outside 0..1e9",
                t.nanos
            )));
        }
        let event_time = EventTime::from_parts(t.seconds, t.nanos).ok_or_else(|| {
            Rejection::InvalidEventTime(format!("seconds {} out of range", t.seconds))
        })?;
        let event =
            SystemTime::try_from(*t).map_err(|e| Rejection::InvalidEventTime(e.to_string()))?;
        match event.duration_since(now) {
            Ok(ahead) if ahead > self.max_future_skew => Err(Rejection::EventTimeInFuture {
                ahead_secs: ahead.as_secs(),
                limit_secs: self.max_future_skew.as_secs(),
            }),
            Ok(_) => Ok(event_time),
            Err(behind) if behind.duration() > self.max_age => Err(Rejection::EventTimeTooOld {
                age_secs: behind.duration().as_secs(),
                limit_secs: self.max_age.as_secs(),
            }),
            Err(_) => Ok(event_time),
        }
    }
}

fn check_location(location: Option<&pb::Location>) -> Result<(), Rejection> {
    let Some(location) = location else {
        return Ok(());
    };
    if let Some(lat) = location.latitude {
        if !(-90.0..=90.0).contains(&lat) {
            return Err(Rejection::LatitudeOutOfRange(lat));
        }
    }
    if let Some(lon) = location.longitude {
        if !(-180.0..=180.0).contains(&lon) {
            return Err(Rejection::LongitudeOutOfRange(lon));
        }
    }
    Ok(())
}

fn check_sizes(scan: &pb::Scan) -> Result<(), Rejection> {
    let limit = |field: &'static str, len: usize, limit: usize| {
        if len > limit {
            let unit = if field == "attributes" {
                "entries"
            } else {
                "bytes"
            };
            Err(Rejection::Oversized {
                field,
                len,
                limit,
                unit,
            })
        } else {
            Ok(())
        }
    };
    let facility = scan.location.as_ref().map_or(0, |l| l.facility_id.len());
    limit("location.facility_id", facility, MAX_FIELD_BYTES)?;
    limit("device_id", scan.device_id.len(), MAX_FIELD_BYTES)?;
    limit(
        "exception_code",
        scan.exception_code.as_ref().map_or(0, String::len),
        MAX_FIELD_BYTES,
    )?;
    limit("attributes", scan.attributes.len(), MAX_ATTRIBUTES)?;
    for (key, value) in &scan.attributes {
        limit("attribute key", key.len(), MAX_ATTRIBUTE_KEY_BYTES)?;
        limit("attribute value", value.len(), MAX_ATTRIBUTE_VALUE_BYTES)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rejection_code_is_listed_once() {
        let every = [
            Rejection::MissingScanId,
            Rejection::ScanIdTooLong(200),
            Rejection::MissingTrackingNumber,
            Rejection::InvalidTrackingNumber(TrackingNumberError::Empty),
            Rejection::InvalidTrackingNumber(TrackingNumberError::Length(3)),
            Rejection::InvalidTrackingNumber(TrackingNumberError::Character('_')),
            Rejection::TrackingNumberCheckDigit("UPS".into()),
            Rejection::TrackingNumberUnknownFormat,
            Rejection::UnspecifiedScanType,
            Rejection::UnknownScanType(99),
            Rejection::MissingEventTime,
            Rejection::InvalidEventTime("x".into()),
            Rejection::EventTimeInFuture {
                ahead_secs: 1,
                limit_secs: 0,
            },
            Rejection::EventTimeTooOld {
                age_secs: 1,
                limit_secs: 0,
            },
            Rejection::LatitudeOutOfRange(91.0),
            Rejection::LongitudeOutOfRange(181.0),
            Rejection::DeviceNotAllowed("d".into()),
            Rejection::JourneyExpired,
            Rejection::Oversized {
                field: "device_id",
                len: 2,
                limit: 1,
                unit: "bytes",
            },
        ];
        let mut produced: Vec<&str> = every.iter().map(Rejection::code).collect();
        produced.sort_unstable();
        produced.dedup();
        let mut listed = Rejection::CODES.to_vec();
        listed.sort_unstable();
        assert_eq!(produced, listed);
    }

    const NOW_SECS: i64 = 1_800_000_000;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_SECS as u64)
    }

    fn validator() -> Validator {
        Validator::new(&IngestConfig::default()).expect("default formats compile")
    }

    fn good() -> pb::Scan {
        pb::Scan {
            scan_id: "scan-1".into(),
            tracking_number: " 1z 999-aa1 0123 ".into(),
            scan_type: pb::ScanType::Sorted as i32,
            event_time: Some(prost_types::Timestamp {
                seconds: NOW_SECS - 60,
                nanos: 5_000,
            }),
            location: Some(pb::Location {
                facility_id: "hub-1".into(),
                kind: pb::LocationKind::SortingFacility as i32,
                latitude: Some(52.5),
                longitude: Some(13.4),
            }),
            ..Default::default()
        }
    }

    fn reject(edit: impl FnOnce(&mut pb::Scan)) -> String {
        let mut scan = good();
        edit(&mut scan);
        validator()
            .validate(scan, now())
            .expect_err("rejected")
            .reason()
    }

    #[test]
    fn remembered_carrier_checks_give_the_same_verdict_and_stay_bounded() {
        let mut config = IngestConfig::default();
        config.tracking_numbers.policy = Policy::Reject;
        let validator = Validator::new(&config).expect("formats compile");
        // A UPS 1Z number with a wrong check digit, then a valid one, each checked twice.
        for _ in 0..2 {
            let mut bad = good();
            bad.tracking_number = "1Z5R89390357567128".into();
            assert_eq!(
                validator
                    .validate(bad, now())
                    .expect_err("check digit")
                    .code(),
                "tracking_number_check_digit"
            );
            let mut valid = good();
            valid.tracking_number = "1Z5R89390357567127".into();
            let stored = validator.validate(valid, now()).expect("valid UPS number");
            let check = stored.number_check.expect("checked");
            assert_eq!(check.carrier, "ups");
        }
        for n in 0..3 * CheckedNumbers::SHARDS * CheckedNumbers::PER_SHARD {
            let number = TrackingNumber::parse(&format!("PARCEL{n:08}")).expect("valid shape");
            let _ = validator.check_number(&number);
        }
        let remembered: usize = validator
            .checked
            .shards
            .iter()
            .map(|shard| shard.lock().expect("lock").len())
            .sum();
        assert!(remembered <= CheckedNumbers::SHARDS * CheckedNumbers::PER_SHARD);
    }

    #[test]
    fn good_scan_is_normalized() {
        let v = validator().validate(good(), now()).expect("valid");
        assert_eq!(v.tracking_number.as_str(), "1Z999AA10123");
        assert_eq!(v.wire.tracking_number, "1Z999AA10123");
        assert_eq!(v.event_time, EventTime((NOW_SECS - 60) * 1_000_000 + 5));
        assert_eq!(v.scan_type, ScanType::Sorted);
        assert_eq!(v.facility, facility_hash("hub-1"));
    }

    #[test]
    fn each_rejection_has_a_precise_reason() {
        assert_eq!(
            reject(|s| s.scan_id.clear()),
            "missing_scan_id: scan_id is empty"
        );
        assert_eq!(
            reject(|s| s.scan_id = "x".repeat(129)),
            "scan_id_too_long: scan_id is 129 bytes; the limit is 128"
        );
        assert_eq!(
            reject(|s| s.tracking_number.clear()),
            "missing_tracking_number: tracking_number is empty"
        );
        assert_eq!(
            reject(|s| s.tracking_number = " - ".into()),
            "missing_tracking_number: tracking number is empty"
        );
        assert_eq!(
            reject(|s| s.tracking_number = "1Z99".into()),
            "tracking_number_length: tracking number has 4 characters after normalization; allowed 8 to 40"
        );
        assert_eq!(
            reject(|s| s.tracking_number = "1Z999/AA10123".into()),
            "tracking_number_charset: tracking number contains '/'; only letters A-Z and digits are allowed"
        );
        assert_eq!(
            reject(|s| s.scan_type = 0),
            "unspecified_scan_type: scan_type is SCAN_TYPE_UNSPECIFIED"
        );
        assert_eq!(
            reject(|s| s.scan_type = 99),
            "unknown_scan_type: scan_type 99 is not a known ScanType"
        );
        assert_eq!(
            reject(|s| s.event_time = None),
            "missing_event_time: event_time is missing"
        );
        assert_eq!(
            reject(|s| s.event_time = Some(prost_types::Timestamp { seconds: NOW_SECS + 301, nanos: 0 })),
            "event_time_in_future: event_time is 301s ahead of the server clock; at most 300s allowed"
        );
        assert_eq!(
            reject(|s| s.event_time = Some(prost_types::Timestamp {
                seconds: NOW_SECS - 91 * 86_400,
                nanos: 0
            })),
            "event_time_too_old: event_time is 7862400s old; at most 7776000s allowed"
        );
        assert_eq!(
            reject(|s| s.event_time = Some(prost_types::Timestamp {
                seconds: NOW_SECS,
                nanos: -1
            })),
            "invalid_event_time: event_time is not a valid timestamp (nanos -1 outside 0..1e9)"
        );
        assert!(reject(|s| s.event_time = Some(prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 0
        }))
        .starts_with("invalid_event_time: "));
        assert_eq!(
            reject(|s| s.location.as_mut().expect("location").latitude = Some(90.5)),
            "latitude_out_of_range: latitude 90.5 is outside -90..=90"
        );
        assert_eq!(
            reject(|s| s.location.as_mut().expect("location").longitude = Some(f64::NAN)),
            "longitude_out_of_range: longitude NaN is outside -180..=180"
        );
        assert_eq!(
            reject(|s| s.device_id = "d".repeat(200)),
            "oversized: device_id is 200 bytes; the limit is 128"
        );
        assert_eq!(
            reject(|s| {
                for i in 0..65 {
                    s.attributes.insert(format!("k{i}"), "v".into());
                }
            }),
            "oversized: attributes is 65 entries; the limit is 64"
        );
    }

    #[test]
    fn scan_within_future_skew_is_accepted() {
        let mut scan = good();
        scan.event_time = Some(prost_types::Timestamp {
            seconds: NOW_SECS + 299,
            nanos: 0,
        });
        assert!(validator().validate(scan, now()).is_ok());
    }
}
