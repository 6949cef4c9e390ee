//! The domain's small types: what a tracking number, a scan id, a scan type, a status, a
//! version and a sequence are. Each is validated once, at the edge, and trusted after.
//!
//! Nothing here knows of RocksDB, tokio or a service; `wire` converts to and from the `scand.v1`
//! wire types, and `scan` is a scan once validated, carrying its wire form.

pub mod clock;
pub mod ownership;
pub mod scan;
pub mod wire;

use std::fmt;

use smol_str::SmolStr;

/// A normalized tracking number: `[A-Z0-9]{8,40}` after removing surrounding whitespace,
/// inner spaces and dashes, and upper-casing letters, so `1z 999-aa1` and `1Z999AA1` are one
/// shipment. Kept inline up to 23 bytes (most carriers' numbers): the writer compares and
/// hashes tracking numbers several times a scan, and a heap string is a cache miss each time.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrackingNumber(SmolStr);

/// Why a raw tracking number is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackingNumberError {
    #[error("tracking number is empty")]
    Empty,
    #[error("tracking number has {0} characters after normalization; allowed 8 to 40")]
    Length(usize),
    #[error("tracking number contains {0:?}; only letters A-Z and digits are allowed")]
    Character(char),
}

impl TrackingNumber {
    pub const MIN_LEN: usize = 8;
    pub const MAX_LEN: usize = 40;

    pub fn parse(raw: &str) -> Result<Self, TrackingNumberError> {
        // Scanners mostly send numbers already normalized: kept as they are, without a copy.
        if (Self::MIN_LEN..=Self::MAX_LEN).contains(&raw.len())
            && raw
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            return Ok(Self(SmolStr::new(raw)));
        }
        let mut normalized = String::with_capacity(raw.len());
        for c in raw.trim().chars() {
            match c {
                ' ' | '-' => {}
                'a'..='z' => normalized.push(c.to_ascii_uppercase()),
                'A'..='Z' | '0'..='9' => normalized.push(c),
                other => return Err(TrackingNumberError::Character(other)),
            }
        }
        match normalized.len() {
            0 => Err(TrackingNumberError::Empty),
            n if !(Self::MIN_LEN..=Self::MAX_LEN).contains(&n) => {
                Err(TrackingNumberError::Length(n))
            }
            _ => Ok(Self(SmolStr::from(normalized))),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrackingNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A scan's identity, minted by the device: unique per physical read. Inline up to 23 bytes,
/// like [`TrackingNumber`]: the engine compares a scan's id with every id of its timeline.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ScanId(SmolStr);

impl ScanId {
    /// Longest accepted scan id, in bytes: it is part of every event key.
    pub const MAX_LEN: usize = 128;

    /// `None` when empty or longer than [`Self::MAX_LEN`].
    pub fn parse(raw: &str) -> Option<Self> {
        (!raw.is_empty() && raw.len() <= Self::MAX_LEN).then(|| Self(SmolStr::new(raw)))
    }

    pub(crate) fn from_stored(raw: &str) -> Self {
        Self(SmolStr::new(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ScanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Event time in microseconds since the Unix epoch (device clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventTime(pub i64);

impl EventTime {
    /// From a protobuf timestamp's parts; `None` when out of the representable range.
    pub fn from_parts(seconds: i64, nanos: i32) -> Option<Self> {
        seconds
            .checked_mul(1_000_000)
            .and_then(|us| us.checked_add(i64::from(nanos / 1000)))
            .map(EventTime)
    }

    /// A server clock reading on the same scale (saturating far outside any real clock).
    pub fn from_system_time(t: std::time::SystemTime) -> Self {
        let micros = |d: std::time::Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        match t.duration_since(std::time::SystemTime::UNIX_EPOCH) {
            Ok(after) => EventTime(micros(after)),
            Err(before) => EventTime(-micros(before.duration())),
        }
    }
}

/// What a scan records. Numbering matches `scand.v1.ScanType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(i32)]
pub enum ScanType {
    LabelCreated = 1,
    Picked = 2,
    Packed = 3,
    PickedUp = 4,
    ArrivedAtFacility = 5,
    Sorted = 6,
    DepartedFacility = 7,
    Loaded = 8,
    Unloaded = 9,
    OutForDelivery = 10,
    DeliveryAttempted = 11,
    HeldAtPickupPoint = 12,
    Delivered = 13,
    Exception = 14,
    ReturnedToSender = 15,
}

impl ScanType {
    pub const ALL: [ScanType; 15] = [
        Self::LabelCreated,
        Self::Picked,
        Self::Packed,
        Self::PickedUp,
        Self::ArrivedAtFacility,
        Self::Sorted,
        Self::DepartedFacility,
        Self::Loaded,
        Self::Unloaded,
        Self::OutForDelivery,
        Self::DeliveryAttempted,
        Self::HeldAtPickupPoint,
        Self::Delivered,
        Self::Exception,
        Self::ReturnedToSender,
    ];

    /// `None` for 0 (unspecified) and for numbers this build does not know.
    pub fn from_i32(value: i32) -> Option<Self> {
        usize::try_from(value)
            .ok()
            .and_then(|v| v.checked_sub(1))
            .and_then(|i| Self::ALL.get(i).copied())
    }

    pub fn as_i32(self) -> i32 {
        self as i32
    }

    /// The normalized status this scan type moves a shipment to, with its sub-status.
    pub fn status(self) -> (Status, Option<ScanType>) {
        use ScanType::*;
        match self {
            LabelCreated => (Status::LabelCreated, None),
            Picked | Packed => (Status::PickedPacked, None),
            PickedUp | ArrivedAtFacility | Sorted | DepartedFacility | Loaded | Unloaded => {
                (Status::InTransit, Some(self))
            }
            OutForDelivery => (Status::OutForDelivery, None),
            DeliveryAttempted => (Status::DeliveryAttempted, None),
            HeldAtPickupPoint => (Status::AvailableForPickup, None),
            Delivered => (Status::Delivered, None),
            Exception => (Status::Exception, None),
            ReturnedToSender => (Status::ReturnedToSender, None),
        }
    }
}

/// Normalized shipment status. Numbering matches `scand.v1.Status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Status {
    LabelCreated = 1,
    PickedPacked = 2,
    InTransit = 3,
    OutForDelivery = 4,
    DeliveryAttempted = 5,
    AvailableForPickup = 6,
    Delivered = 7,
    Exception = 8,
    ReturnedToSender = 9,
    Stalled = 10,
}

impl Status {
    pub const ALL: [Status; 10] = {
        use Status::*;
        [
            LabelCreated,
            PickedPacked,
            InTransit,
            OutForDelivery,
            DeliveryAttempted,
            AvailableForPickup,
            Delivered,
            Exception,
            ReturnedToSender,
            Stalled,
        ]
    };

    pub fn as_i32(self) -> i32 {
        self as i32
    }

    pub fn from_i32(value: i32) -> Option<Self> {
        use Status::*;
        Some(match value {
            1 => LabelCreated,
            2 => PickedPacked,
            3 => InTransit,
            4 => OutForDelivery,
            5 => DeliveryAttempted,
            6 => AvailableForPickup,
            7 => Delivered,
            8 => Exception,
            9 => ReturnedToSender,
            10 => Stalled,
            _ => return None,
        })
    }

    /// A label for metrics: lower snake case, stable.
    pub fn label(self) -> &'static str {
        use Status::*;
        match self {
            LabelCreated => "label_created",
            PickedPacked => "picked_packed",
            InTransit => "in_transit",
            OutForDelivery => "out_for_delivery",
            DeliveryAttempted => "delivery_attempted",
            AvailableForPickup => "available_for_pickup",
            Delivered => "delivered",
            Exception => "exception",
            ReturnedToSender => "returned_to_sender",
            Stalled => "stalled",
        }
    }

    /// Delivered or returned: no scan moves it on (except a return after delivery).
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Delivered | Status::ReturnedToSender)
    }

    /// Position in the forward lifecycle; `None` for statuses outside it (exception, stalled),
    /// which are never a regression to enter or to leave.
    pub fn lifecycle_rank(self) -> Option<u8> {
        use Status::*;
        match self {
            LabelCreated => Some(0),
            PickedPacked => Some(1),
            InTransit => Some(2),
            OutForDelivery => Some(3),
            DeliveryAttempted | AvailableForPickup => Some(4),
            Delivered => Some(5),
            ReturnedToSender => Some(6),
            Exception | Stalled => None,
        }
    }

    /// `true` when moving from `self` to `next` goes backwards in the lifecycle.
    pub fn is_regression_to(self, next: Status) -> bool {
        matches!((self.lifecycle_rank(), next.lifecycle_rank()), (Some(a), Some(b)) if b < a)
    }
}

/// Per-shipment status version: 1 for the first status, +1 per change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u64);

/// Position in the global change log: gapless, strictly increasing, starting at 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sequence(pub u64);

/// A source partition (Kafka): the one that orders the shipments keyed to it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
}

/// A status with the scan type behind it (only IN_TRANSIT carries one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusPoint {
    pub status: Status,
    pub sub_status: Option<ScanType>,
    /// Published as STALLED, with `status` as the status it stalled in.
    pub stalled: bool,
}

/// The carrier recognised from the tracking number, or why it was not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NumberCheck {
    pub carrier: String,
    pub service: String,
    /// Empty when valid or unchecked; else the reason (`tracking_number_check_digit`, ...).
    pub issue: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracking_number_normalization_merges_spellings() {
        let a = TrackingNumber::parse(" 1z 999-aa1 0123 ").expect("valid");
        let b = TrackingNumber::parse("1Z999AA10123").expect("valid");
        assert_eq!(a, b);
        assert_eq!(a.as_str(), "1Z999AA10123");
    }

    proptest::proptest! {
        /// Spaces, dashes and case aside, a number is its characters: whether or not it came
        /// in normalized (kept as sent) or had to be rebuilt.
        #[test]
        fn a_number_parses_as_its_normalized_spelling(
            raw in "[ a-zA-Z0-9-]{0,44}|[A-Z0-9]{0,44}|\\PC{0,44}"
        ) {
            let normalized: String = raw
                .trim()
                .chars()
                .filter(|c| !matches!(c, ' ' | '-'))
                .map(|c| c.to_ascii_uppercase())
                .collect();
            let parsed = TrackingNumber::parse(&raw);
            match TrackingNumber::parse(&normalized) {
                Ok(n) => {
                    proptest::prop_assert_eq!(n.as_str(), normalized.as_str());
                    proptest::prop_assert_eq!(parsed, Ok(n));
                }
                Err(e) => proptest::prop_assert_eq!(parsed.map(|_| ()), Err(e)),
            }
        }
    }

    #[test]
    fn tracking_number_errors_are_precise() {
        assert_eq!(
            TrackingNumber::parse("  - "),
            Err(TrackingNumberError::Empty)
        );
        assert_eq!(
            TrackingNumber::parse("AB12"),
            Err(TrackingNumberError::Length(4))
        );
        assert_eq!(
            TrackingNumber::parse(&"A".repeat(41)),
            Err(TrackingNumberError::Length(41))
        );
        assert_eq!(
            TrackingNumber::parse("1Z999_AA1"),
            Err(TrackingNumberError::Character('_'))
        );
        assert_eq!(
            TrackingNumber::parse("1Z999ÄA10"),
            Err(TrackingNumberError::Character('Ä'))
        );
    }

    #[test]
    fn scan_type_round_trips_and_rejects_unknown() {
        for t in ScanType::ALL {
            assert_eq!(ScanType::from_i32(t.as_i32()), Some(t));
        }
        assert_eq!(ScanType::from_i32(0), None);
        assert_eq!(ScanType::from_i32(16), None);
        assert_eq!(ScanType::from_i32(-3), None);
    }

    #[test]
    fn every_status_is_listed_once_in_wire_order() {
        let numbers: Vec<i32> = Status::ALL.iter().map(|s| s.as_i32()).collect();
        assert_eq!(numbers, (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn regression_is_backwards_in_lifecycle_only() {
        assert!(Status::OutForDelivery.is_regression_to(Status::InTransit));
        assert!(!Status::InTransit.is_regression_to(Status::OutForDelivery));
        assert!(!Status::InTransit.is_regression_to(Status::InTransit));
        assert!(!Status::Exception.is_regression_to(Status::LabelCreated));
        assert!(!Status::OutForDelivery.is_regression_to(Status::Exception));
    }
}
