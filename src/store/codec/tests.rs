use super::*;

fn stored_scan(scan_id: &str) -> pb::Scan {
    pb::Scan {
        scan_id: scan_id.to_owned(),
        tracking_number: "PARCEL0001".to_owned(),
        scan_type: ScanType::DepartedFacility.as_i32(),
        event_time: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 123_456_789,
        }),
        device_id: "dev-1".to_owned(),
        received_time: Some(prost_types::Timestamp {
            seconds: 1_700_000_100,
            nanos: 0,
        }),
        ..Default::default()
    }
}

#[test]
fn a_stored_scan_leaves_out_what_its_entry_holds_and_gives_back_the_same_bytes() {
    // 128 bytes: the longest scan id, whose length takes a two-byte varint.
    for scan_id in ["s-1", "é\u{0}x", &"x".repeat(ScanId::MAX_LEN)] {
        let mut scan = stored_scan(scan_id);
        let whole = scan.encode_to_vec();
        let value = encode_event(&mut scan);
        assert_eq!(scan.encode_to_vec(), whole, "the scan is left as it was");
        let without = pb::Scan {
            scan_id: String::new(),
            tracking_number: String::new(),
            ..scan.clone()
        };
        assert_eq!(value, without.encode_to_vec());
        let entry = EntryRecord {
            scan_id: scan_id.to_owned(),
            event: value.into(),
            ..Default::default()
        };
        assert_eq!(entry_scan("PARCEL0001", &entry), Some(whole));
    }
}

#[test]
fn an_entry_without_its_scan_gives_none() {
    let entry = EntryRecord {
        scan_id: "s-1".to_owned(),
        ..Default::default()
    };
    assert_eq!(entry_scan("PARCEL0001", &entry), None);
}

#[test]
fn shipment_state_round_trips() {
    let state = ShipmentState {
        timeline: vec![
            Entry {
                event_time: EventTime(-3),
                scan_id: ScanId::from_stored("a"),
                scan_type: ScanType::Sorted,
                facility: u64::MAX,
            },
            Entry {
                event_time: EventTime(9),
                scan_id: ScanId::from_stored("b"),
                scan_type: ScanType::Delivered,
                facility: 7,
            },
        ],
        derived: Derived {
            point: Some(StatusPoint {
                status: Status::Delivered,
                sub_status: None,
                stalled: false,
            }),
            scans_after_terminal: 2,
        },
        version: Version(4),
        stalled: true,
        stall_deadline: Some(EventTime(-77)),
        flags: Flags {
            regressions: 1,
            clock_skewed_scans: 3,
            tracking_number: NumberCheck {
                carrier: "ups".into(),
                service: "UPS United States Ground".into(),
                issue: String::new(),
            },
        },
        owner: Some(Origin {
            topic: "scans.raw".into(),
            partition: 3,
        }),
        replaced: vec![ScanId::from_stored("c"), ScanId::from_stored("d")],
        journey: 4,
        closed: Some(EventTime(9)),
        earlier: vec![crate::engine::journey::Journey {
            number: 3,
            entries: 1,
            closed: Some(EventTime(-5)),
            derived: Derived {
                point: Some(StatusPoint {
                    status: Status::ReturnedToSender,
                    sub_status: None,
                    stalled: false,
                }),
                scans_after_terminal: 1,
            },
            version: Version(6),
            regressions: 2,
            clock_skewed_scans: 0,
        }],
        expired: Some(crate::engine::journey::Expired {
            journeys: 2,
            until: EventTime(-100),
        }),
        vanished: vec![(5, Version(2))],
    };
    let bytes = encode_shipment(&state);
    assert_eq!(bytes, shipment_record(&state).encode_to_vec());
    assert_eq!(decode_shipment(b"k", &bytes).expect("decodes"), state);
    let empty = ShipmentState::default();
    assert_eq!(
        encode_shipment(&empty),
        shipment_record(&empty).encode_to_vec()
    );
}

#[test]
fn a_delta_carries_its_stored_scans_as_prost_would_and_the_state_leaves_them_out() {
    let state = ShipmentState {
        version: Version(2),
        ..Default::default()
    };
    let scans: [&[u8]; 2] = [b"first scan", &[7u8; 300]];
    let added = [("a", 5, scans[0]), ("b", 9, scans[1])].map(|(id, time, event)| EntryFields {
        event_time: EventTime(time),
        scan_id: id,
        scan_type: ScanType::Sorted,
        facility: 3,
        event,
    });
    let delta = encode_shipment_delta(&state, added.into_iter(), std::iter::empty(), 0..0);
    let expected = ShipmentRecord {
        version: 2,
        timeline: added
            .iter()
            .map(|e| EntryRecord {
                event_time: e.event_time.0,
                scan_id: e.scan_id.to_owned(),
                scan_type: e.scan_type.as_i32(),
                facility: e.facility,
                event: e.event.to_vec().into(),
            })
            .collect(),
        ..Default::default()
    };
    assert_eq!(delta, expected.encode_to_vec());
    let merged = merge::merge_shipment_records(None, [delta.as_slice()]).expect("merges");
    let record = decode_shipment_record(b"k", &merged).expect("decodes");
    assert_eq!(
        record
            .timeline
            .iter()
            .map(|e| &e.event[..])
            .collect::<Vec<_>>(),
        scans
    );
    let decoded = decode_shipment(b"k", &merged).expect("decodes");
    assert_eq!(decoded.timeline.len(), 2);
    assert_eq!(decoded.version, Version(2));
}

#[test]
fn a_delta_lists_its_change_sequences_as_prost_would_and_they_read_back_and_strip() {
    let state = ShipmentState {
        version: Version(3),
        replaced: vec![ScanId::from_stored("r")],
        ..Default::default()
    };
    let delta = encode_shipment_delta(&state, std::iter::empty(), ["r"].into_iter(), 127..130);
    let expected = ShipmentRecord {
        version: 3,
        replaced_scan_ids: vec!["r".into()],
        change_sequences: vec![127, 128, 129],
        ..Default::default()
    };
    assert_eq!(delta, expected.encode_to_vec());
    let later = encode_shipment_head(&state, 300..301);
    let merged = merge::merge_shipment_records(Some(&delta), [later.as_slice()]).expect("merges");
    assert_eq!(
        change_sequences(b"k", &merged).expect("reads"),
        [127, 128, 129, 300]
    );
    let stripped = without_change_sequences(b"k", &merged).expect("strips");
    assert_eq!(
        change_sequences(b"k", &stripped).expect("reads"),
        Vec::<u64>::new()
    );
    assert_eq!(
        ShipmentRecord {
            change_sequences: Vec::new(),
            ..decode_shipment_record(b"k", &merged).expect("decodes")
        },
        decode_shipment_record(b"k", &stripped).expect("decodes")
    );
    assert!(change_sequences(b"k", &[0xff, 0xff]).is_err());
}

#[test]
fn change_blocks_are_prost_encodings_of_their_changes() {
    let full = pb::StatusChange {
        sequence: 300,
        tracking_number: "1Z999AA10123456784".into(),
        version: 7,
        previous_status: pb::Status::Stalled as i32,
        status: pb::Status::InTransit as i32,
        sub_status: pb::ScanType::Sorted as i32,
        cause_scan_id: "dev7-000123".into(),
        event_time: Some(prost_types::Timestamp {
            seconds: -5,
            nanos: 250,
        }),
        location: Some(pb::Location {
            facility_id: "HUB-FRA-1".into(),
            kind: 2,
            latitude: Some(50.1),
            longitude: Some(0.0),
        }),
        regression: true,
        previous_sub_status: -1,
        correction: true,
        committed_time: Some(prost_types::Timestamp::default()),
        stalled_status: pb::Status::InTransit as i32,
        carrier: "ups".into(),
        carrier_service: "UPS Ground".into(),
        previous_stalled_status: pb::Status::OutForDelivery as i32,
        journey: 3,
    };
    let sparse = pb::StatusChange {
        sequence: 301,
        tracking_number: "PARCEL0001".into(),
        version: 1,
        status: pb::Status::LabelCreated as i32,
        ..Default::default()
    };
    let empty_location = pb::StatusChange {
        location: Some(pb::Location::default()),
        event_time: Some(prost_types::Timestamp {
            seconds: 1 << 40,
            nanos: 999_999_999,
        }),
        ..Default::default()
    };
    let coordinates_only = pb::StatusChange {
        location: Some(pb::Location {
            kind: -3,
            latitude: Some(-0.0),
            ..Default::default()
        }),
        committed_time: Some(prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        }),
        ..Default::default()
    };
    for changes in [
        vec![],
        vec![pb::StatusChange::default()],
        vec![full.clone()],
        vec![sparse, full],
        vec![empty_location, coordinates_only],
    ] {
        let records: Vec<_> = changes.iter().map(ChangeRecord::of).collect();
        let expected = ChangeBlock {
            changes: changes.clone(),
        }
        .encode_to_vec();
        assert_eq!(encode_change_block(&records), expected);
    }
}

#[test]
fn garbage_is_reported_as_corrupt_not_a_panic() {
    let err = decode_shipment(b"PARCEL0001", &[0xff, 0xff, 0xff]).expect_err("corrupt");
    assert!(err.to_string().contains("PARCEL0001"), "{err}");
}
