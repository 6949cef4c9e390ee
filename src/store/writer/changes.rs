//! A status change as it is published: the change record the writer stores for a change the
//! engine made, by group commit or by the stall write, and the per-label tallies of their
//! metrics.

use crate::domain::scan::ValidScan;
pub(super) use crate::domain::wire::timestamp;
use crate::domain::wire::{stalled_status, status_fields};
use crate::domain::Sequence;
use crate::engine::{Change, ShipmentState};
use crate::store::codec::ChangeRecord;

/// The published form of a change. `cause` is the scan behind it (none for a stall).
pub(super) fn change_record<'a>(
    sequence: Sequence,
    change: &'a Change,
    cause: Option<&'a ValidScan>,
    state: Option<&'a ShipmentState>,
    committed: prost_types::Timestamp,
) -> ChangeRecord<'a> {
    let (previous_status, previous_sub_status) = status_fields(change.previous);
    let (status, sub_status) = status_fields(Some(change.current));
    let number_check = state.map(|s| &s.flags.tracking_number);
    ChangeRecord {
        sequence: sequence.0,
        tracking_number: change.tracking_number.as_str(),
        journey: change.journey,
        version: change.version.0,
        previous_status,
        status,
        sub_status,
        cause_scan_id: cause.map_or("", |c| c.scan_id.as_str()),
        event_time: cause.and_then(|c| c.wire.event_time),
        location: cause.and_then(|c| c.wire.location.as_ref()),
        regression: change.regression,
        previous_sub_status,
        correction: change.correction,
        committed_time: Some(committed),
        stalled_status: stalled_status(Some(change.current)),
        carrier: number_check.map_or("", |c| c.carrier.as_str()),
        carrier_service: number_check.map_or("", |c| c.service.as_str()),
        previous_stalled_status: stalled_status(change.previous),
    }
}

/// Occurrences of each label, in order of first occurrence. Labels are few (a status, a
/// duplicate kind), so a scan of the short list beats hashing.
pub(super) fn tally(labels: impl Iterator<Item = &'static str>) -> Vec<(&'static str, u64)> {
    let mut counts: Vec<(&'static str, u64)> = Vec::new();
    for label in labels {
        match counts.iter_mut().find(|(seen, _)| *seen == label) {
            Some((_, n)) => *n += 1,
            None => counts.push((label, 1)),
        }
    }
    counts
}
