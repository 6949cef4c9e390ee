//! The shipments merge operator (`store::codec::merge`), which RocksDB runs on the flush thread, in
//! compactions and in reads: on any stored record and deltas it must not panic, and whatever
//! prost's decode-apply-encode merge takes it must take too, into the same record (prost drops
//! fields it does not know, the wire merge keeps them, so the two are compared decoded).
//!
//! Input layout (so seeds are easy to write by hand): byte 0 says whether the first value is
//! the stored record; then up to 16 values, each a length byte and that many bytes.

#![no_main]

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use scand::store::codec::merge::{merge_shipment_records, prost_merge};
use scand::store::codec::ShipmentRecord;

type Values<'a> = (Option<&'a [u8]>, Vec<&'a [u8]>);

fn values(mut u: Unstructured<'_>) -> Result<Values<'_>> {
    let with_record: bool = u.arbitrary()?;
    let mut values = Vec::new();
    while !u.is_empty() && values.len() < 16 {
        let len: u8 = u.arbitrary()?;
        values.push(u.bytes(usize::from(len).min(u.len()))?);
    }
    let record = (with_record && !values.is_empty()).then(|| values.remove(0));
    Ok((record, values))
}

fuzz_target!(|data: &[u8]| {
    let Ok((record, deltas)) = values(Unstructured::new(data)) else {
        return;
    };
    let wire = merge_shipment_records(record, deltas.iter().copied());
    let Some(reference) = prost_merge(record, deltas.iter().copied()) else {
        return;
    };
    let wire = wire.expect("the wire merge takes what prost's merge takes");
    assert_eq!(
        ShipmentRecord::decode(wire.as_slice()).expect("the merge decodes"),
        ShipmentRecord::decode(reference.as_slice()).expect("prost's merge decodes")
    );
});
