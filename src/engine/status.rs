//! Status derivation: a shipment's status is a fold over its ordered timeline.
//!
//! Invariant: the result depends only on the timeline (a set ordered by (event_time, scan_id)),
//! never on the order scans arrived in. DELIVERED and RETURNED_TO_SENDER are terminal: scans
//! ordered after them are kept and counted but do not move the status, except that
//! RETURNED_TO_SENDER may follow DELIVERED (a parcel refused at the door goes back).

use crate::domain::{ScanType, Status, StatusPoint};

/// The fold's accumulator: the status so far and how many scans a terminal status ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Derived {
    pub point: Option<StatusPoint>,
    pub scans_after_terminal: u32,
}

impl Derived {
    /// Folds one more scan, the latest so far in timeline order, into the status.
    pub fn step(self, scan_type: ScanType) -> Derived {
        let ignored = match self.point.map(|p| p.status) {
            Some(Status::ReturnedToSender) => true,
            Some(Status::Delivered) => scan_type != ScanType::ReturnedToSender,
            _ => false,
        };
        if ignored {
            return Derived {
                scans_after_terminal: self.scans_after_terminal + 1,
                ..self
            };
        }
        let (status, sub_status) = scan_type.status();
        Derived {
            point: Some(StatusPoint {
                status,
                sub_status,
                stalled: false,
            }),
            ..self
        }
    }

    /// Derives the status of a whole timeline, given its scan types in timeline order.
    pub fn of(scan_types: impl IntoIterator<Item = ScanType>) -> Derived {
        scan_types
            .into_iter()
            .fold(Derived::default(), Derived::step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ScanType::*;

    fn status_of(types: &[ScanType]) -> Derived {
        Derived::of(types.iter().copied())
    }

    #[test]
    fn in_transit_carries_the_scan_type_as_sub_status() {
        let d = status_of(&[LabelCreated, Picked, PickedUp, ArrivedAtFacility, Sorted]);
        assert_eq!(
            d.point,
            Some(StatusPoint {
                status: Status::InTransit,
                sub_status: Some(Sorted),
                stalled: false,
            })
        );
    }

    #[test]
    fn scans_after_delivered_are_counted_not_applied() {
        let d = status_of(&[OutForDelivery, Delivered, ArrivedAtFacility, Exception]);
        assert_eq!(d.point.map(|p| p.status), Some(Status::Delivered));
        assert_eq!(d.scans_after_terminal, 2);
    }

    #[test]
    fn return_to_sender_may_follow_delivered_and_is_final() {
        let d = status_of(&[Delivered, ReturnedToSender, OutForDelivery, Delivered]);
        assert_eq!(d.point.map(|p| p.status), Some(Status::ReturnedToSender));
        assert_eq!(d.scans_after_terminal, 2);
    }

    #[test]
    fn every_scan_type_maps_as_specified() {
        let expect = [
            (LabelCreated, Status::LabelCreated),
            (Picked, Status::PickedPacked),
            (Packed, Status::PickedPacked),
            (PickedUp, Status::InTransit),
            (ArrivedAtFacility, Status::InTransit),
            (Sorted, Status::InTransit),
            (DepartedFacility, Status::InTransit),
            (Loaded, Status::InTransit),
            (Unloaded, Status::InTransit),
            (OutForDelivery, Status::OutForDelivery),
            (DeliveryAttempted, Status::DeliveryAttempted),
            (HeldAtPickupPoint, Status::AvailableForPickup),
            (Delivered, Status::Delivered),
            (Exception, Status::Exception),
            (ReturnedToSender, Status::ReturnedToSender),
        ];
        for (scan_type, status) in expect {
            assert_eq!(scan_type.status().0, status, "{scan_type:?}");
            assert_eq!(
                scan_type.status().1.is_some(),
                status == Status::InTransit,
                "{scan_type:?}"
            );
        }
    }
}
