//! Invariants shared by the targets that validate scans: what a validated scan must look like,
//! what a rejection must carry, and the fixed clock and validators they run with.

#![allow(dead_code)] // each target uses its own subset

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use prost::Message;
use scand::domain::scan::ValidScan;
use scand::domain::{EventTime, ScanId, TrackingNumber};
use scand::engine::facility_hash;
use scand::ingest::carrier::Policy;
use scand::ingest::validate::{
    Rejection, Validator, MAX_ATTRIBUTES, MAX_ATTRIBUTE_KEY_BYTES, MAX_ATTRIBUTE_VALUE_BYTES,
    MAX_FIELD_BYTES,
};
use scand::ingest::IngestConfig;
use scand::proto::pb;
use scand::store::codec;

/// The server clock of every run: fixed, so a crash reproduces.
pub const NOW_SECS: u64 = 1_800_000_000;

pub fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_SECS)
}

/// The default validator (carrier policy `flag`) and one with policy `reject`, built once.
pub struct Validators {
    pub config: IngestConfig,
    pub flag: Validator,
    pub reject: Validator,
}

pub fn validators() -> &'static Validators {
    static V: OnceLock<Validators> = OnceLock::new();
    V.get_or_init(|| {
        let config = IngestConfig::default();
        let mut strict = IngestConfig::default();
        strict.tracking_numbers.policy = Policy::Reject;
        Validators {
            flag: Validator::new(&config).expect("default config"),
            reject: Validator::new(&strict).expect("default config with policy reject"),
            config,
        }
    })
}

/// `SCAND_FUZZ_DEBUG=1`: print each scan's outcome (run a seed with `-runs=0` to see it).
pub fn debug() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("SCAND_FUZZ_DEBUG").is_some())
}

const NUMBER_CODES: [&str; 2] = [
    "tracking_number_check_digit",
    "tracking_number_unknown_format",
];

/// Validates `scan` under both policies, checks every invariant and returns the default
/// validator's answer.
pub fn check_scan(scan: &pb::Scan) -> Result<ValidScan, Rejection> {
    let v = validators();
    let flagged = v.flag.validate(scan.clone(), now());
    let strict = v.reject.validate(scan.clone(), now());
    if debug() {
        // For checking by hand that a seed gets as far as it should.
        match &flagged {
            Ok(valid) => eprintln!("accepted {} {}", valid.tracking_number, valid.scan_id),
            Err(rejection) => eprintln!("rejected: {}", rejection.reason()),
        }
    }
    match &flagged {
        Ok(valid) => check_valid(scan, valid, &v.config),
        Err(rejection) => check_rejection(rejection),
    }
    match (&flagged, &strict) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.stored, b.stored, "policies disagree on the stored scan");
            assert_eq!(
                (&a.tracking_number, a.event_time, &a.scan_id),
                (&b.tracking_number, b.event_time, &b.scan_id)
            );
            let issue = b.number_check.as_ref().map(|c| c.issue.as_str());
            assert_eq!(issue, Some(""), "policy reject accepted a flagged number");
        }
        (Ok(a), Err(b)) => {
            check_rejection(b);
            let issue = a.number_check.as_ref().map(|c| c.issue.as_str());
            assert_eq!(
                issue,
                Some(b.code()),
                "reject refused what flag did not flag"
            );
        }
        (Err(a), Ok(_)) => panic!("policy reject accepted what flag rejected: {a}"),
        (Err(a), Err(b)) => {
            check_rejection(b);
            // By reason, not `==`: a NaN coordinate makes two equal rejections unequal.
            assert!(
                a.reason() == b.reason() || NUMBER_CODES.contains(&b.code()),
                "policies reject for different reasons: {a} / {b}"
            );
        }
    }
    flagged
}

/// A rejection carries a stable snake_case code, and its reason is `code: message`.
pub fn check_rejection(rejection: &Rejection) {
    let code = rejection.code();
    check_code(code);
    let message = rejection.to_string();
    assert!(!message.is_empty(), "empty message for {code}");
    assert_eq!(rejection.reason(), format!("{code}: {message}"));
}

pub fn check_code(code: &str) {
    assert!(!code.is_empty(), "empty code");
    assert!(
        code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
        "code {code:?} is not snake_case"
    );
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).expect("config durations fit")
}

/// Everything the rest of the daemon trusts about a validated scan.
pub fn check_valid(input: &pb::Scan, v: &ValidScan, config: &IngestConfig) {
    // Identity: the scan id as sent, within its limit; the number normalized and in its limits.
    assert_eq!(v.scan_id.as_str(), input.scan_id);
    assert!(!v.scan_id.as_str().is_empty() && v.scan_id.as_str().len() <= ScanId::MAX_LEN);
    let number = v.tracking_number.as_str();
    assert!(
        (TrackingNumber::MIN_LEN..=TrackingNumber::MAX_LEN).contains(&number.len()),
        "tracking number {number:?} outside its length limits"
    );
    assert!(
        number
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()),
        "tracking number {number:?} not normalized"
    );
    assert_eq!(
        TrackingNumber::parse(&input.tracking_number).as_ref(),
        Ok(&v.tracking_number)
    );
    assert_eq!(v.wire.tracking_number, number);
    assert_eq!(v.wire.scan_id, input.scan_id);
    assert_eq!(v.scan_type.as_i32(), input.scan_type);
    assert_eq!(v.wire.scan_type, input.scan_type);

    // Time: as sent (to the microsecond), inside the accepted window around the server clock.
    let t = input.event_time.expect("a valid scan has an event time");
    assert_eq!(
        EventTime::from_parts(t.seconds, t.nanos),
        Some(v.event_time)
    );
    let now_us = EventTime::from_system_time(now()).0;
    assert!(
        v.event_time.0 >= now_us - micros(config.max_age),
        "too old accepted"
    );
    assert!(
        v.event_time.0 <= now_us + micros(config.max_future_skew),
        "too far ahead accepted"
    );
    let ahead = v.event_time.0 - now_us;
    let skewed = ahead > micros(config.clock_skew_flag_ahead)
        || -ahead > micros(config.clock_skew_flag_behind);
    assert_eq!(v.clock_skewed, skewed);
    assert_eq!(
        v.wire.received_time,
        Some(prost_types::Timestamp::from(now()))
    );
    assert_eq!(v.wire.event_time, input.event_time);

    // Location and sizes within the documented limits.
    let facility_id = v
        .wire
        .location
        .as_ref()
        .map_or("", |l| l.facility_id.as_str());
    assert_eq!(v.facility, facility_hash(facility_id));
    if let Some(l) = &v.wire.location {
        assert!(l.latitude.is_none_or(|x| (-90.0..=90.0).contains(&x)));
        assert!(l.longitude.is_none_or(|x| (-180.0..=180.0).contains(&x)));
        assert!(l.facility_id.len() <= MAX_FIELD_BYTES);
    }
    assert!(v.wire.device_id.len() <= MAX_FIELD_BYTES);
    assert!(v
        .wire
        .exception_code
        .as_ref()
        .is_none_or(|c| c.len() <= MAX_FIELD_BYTES));
    assert!(v.wire.attributes.len() <= MAX_ATTRIBUTES);
    for (key, value) in &v.wire.attributes {
        assert!(key.len() <= MAX_ATTRIBUTE_KEY_BYTES);
        assert!(value.len() <= MAX_ATTRIBUTE_VALUE_BYTES);
    }

    // What is stored: the stamped wire form, less what its timeline entry holds.
    let whole = codec::whole_scan(v.tracking_number.as_str(), v.scan_id.as_str(), &v.stored);
    assert_eq!(whole, v.wire.encode_to_vec());
    assert!(v.origin.is_none());
    let issue = v.number_check.as_ref().map(|c| c.issue.as_str());
    assert!(
        matches!(issue, Some("")) || issue.is_some_and(|i| NUMBER_CODES.contains(&i)),
        "unexpected number check {issue:?}"
    );

    // Normalizing is idempotent: the stored scan validates again to the same record.
    let again = validators()
        .flag
        .validate(v.wire.clone(), now())
        .unwrap_or_else(|r| panic!("a validated scan is rejected when sent again: {r}"));
    assert_eq!(again.tracking_number, v.tracking_number);
    assert_eq!(
        (again.event_time, &again.scan_id),
        (v.event_time, &v.scan_id)
    );
    assert_eq!(again.facility, v.facility);
    assert_eq!(again.clock_skewed, v.clock_skewed);
    assert_eq!(again.wire.tracking_number, v.wire.tracking_number);
}
