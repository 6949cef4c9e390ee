//! A scan once validated at the edge: its typed fields, what its shipment learns from it, and
//! its wire form, both as sent (for forwarding and change records) and encoded as it will be
//! stored, so the single store writer spends no time encoding.

use std::sync::Arc;

use super::{EventTime, NumberCheck, Origin, ScanId, ScanType, TrackingNumber};
use crate::proto::pb;

/// A validated scan, with its wire form as it will be stored.
#[derive(Clone, Debug)]
pub struct ValidScan {
    pub tracking_number: TrackingNumber,
    pub scan_id: ScanId,
    pub scan_type: ScanType,
    pub event_time: EventTime,
    pub facility: u64,
    pub wire: pb::Scan,
    /// The source partition that owns this shipment (Kafka source), for the changelog.
    pub origin: Option<Origin>,
    /// Event time far from receipt time (flagged on the shipment, not rejected).
    pub clock_skewed: bool,
    /// Its stored form (the wire form stamped with its receipt time, without what its
    /// timeline entry holds), encoded at the edge so the single writer does not spend its
    /// time encoding.
    pub stored: Vec<u8>,
    /// The carrier check of the tracking number, when the policy checks it.
    pub number_check: Option<Arc<NumberCheck>>,
}
