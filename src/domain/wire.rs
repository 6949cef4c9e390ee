//! The domain's wire form: its enums as the `scand.v1` enums (same numbering, tested), and a
//! status point as the wire's (status, sub_status, stalled_status) fields.

use super::{EventTime, ScanType, Status, StatusPoint};
use crate::proto::pb;

impl From<Status> for pb::Status {
    fn from(value: Status) -> Self {
        pb::Status::try_from(value.as_i32()).unwrap_or(pb::Status::Unspecified)
    }
}

impl From<ScanType> for pb::ScanType {
    fn from(value: ScanType) -> Self {
        pb::ScanType::try_from(value.as_i32()).unwrap_or(pb::ScanType::Unspecified)
    }
}

pub fn timestamp(t: EventTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.0.div_euclid(1_000_000),
        nanos: (t.0.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

/// The wire pair (status, sub_status) of a status point; absent = UNSPECIFIED.
/// A stalled point reads as STALLED with the sub-status it stalled in.
pub fn status_fields(point: Option<StatusPoint>) -> (i32, i32) {
    match point {
        None => (0, 0),
        Some(p) => (
            if p.stalled {
                Status::Stalled.as_i32()
            } else {
                p.status.as_i32()
            },
            p.sub_status.map_or(0, ScanType::as_i32),
        ),
    }
}

/// The wire `stalled_status`: the status a stalled point stalled in, else UNSPECIFIED.
pub fn stalled_status(point: Option<StatusPoint>) -> i32 {
    point.filter(|p| p.stalled).map_or(0, |p| p.status.as_i32())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_enums_match_the_wire_numbering() {
        for t in ScanType::ALL {
            let wire = pb::ScanType::from(t);
            assert_ne!(wire, pb::ScanType::Unspecified);
            assert_eq!(
                wire.as_str_name().trim_start_matches("SCAN_TYPE_"),
                format!("{t:?}").chars().fold(String::new(), |mut s, c| {
                    if c.is_uppercase() && !s.is_empty() {
                        s.push('_');
                    }
                    s.push(c.to_ascii_uppercase());
                    s
                })
            );
        }
        for n in 1..=10 {
            let status = Status::from_i32(n).expect("known status");
            assert_eq!(pb::Status::from(status) as i32, n);
            assert_eq!(
                pb::Status::from(status).as_str_name(),
                format!("STATUS_{}", status.label().to_uppercase())
            );
        }
    }
}
