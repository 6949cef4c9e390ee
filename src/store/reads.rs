//! Reads of stored state: one shipment with its timeline, the change log from a sequence,
//! the counters and positions kept in `meta`, and what the writer and the sweep read.
//!
//! Invariant: a shipment's record holds its scans, so one point read gives a consistent
//! shipment; the change log is read only up to the durable sequence its caller passes.

use prost::Message;
use rocksdb::{IteratorMode, ReadOptions};

use super::{codec, keys, Store, StoreError};
use crate::domain::{EventTime, Sequence, TrackingNumber};
use crate::proto::pb;
use crate::proto::storage::SinkFloors;

/// 64 bits unlikely to be drawn twice: the time in nanoseconds mixed with the process id
/// through SplitMix64.
fn fresh_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut z = nanos ^ (u64::from(std::process::id()) << 32);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Store {
    /// Scans stored, as counted by the writes that store and replace them.
    pub fn stored_scans(&self) -> Result<u64, StoreError> {
        Ok(self.meta_u64(keys::META_STORED_SCANS)?.unwrap_or(0))
    }

    /// The highest sequence in the change log (0 when empty).
    pub fn last_sequence(&self) -> Result<Sequence, StoreError> {
        let Some(v) = self
            .db
            .get_cf(self.cf(keys::META), keys::META_LAST_SEQUENCE)?
        else {
            return Ok(Sequence(0));
        };
        keys::decode_change_key(&v).ok_or_else(|| StoreError::Corrupt {
            key: "last_sequence".into(),
            what: format!("{} bytes", v.len()),
        })
    }

    /// The stored state of each shipment (`None` = never seen): what deduplicates and orders a
    /// scan. One batched multi-get; bloom filters make a new shipment's miss cheap.
    pub fn shipment_states(
        &self,
        numbers: &[&TrackingNumber],
    ) -> Result<Vec<Option<crate::engine::ShipmentState>>, StoreError> {
        let keys = numbers.iter().map(|n| keys::shipment_key(n));
        // The writer asks in key order; RocksDB then skips sorting the keys itself.
        let sorted = numbers.is_sorted();
        let mut states = numbers
            .iter()
            .zip(
                self.db
                    .batched_multi_get_cf(self.cf(keys::SHIPMENTS), keys, sorted),
            )
            .map(|(number, value)| match value? {
                Some(bytes) => codec::decode_shipment(keys::shipment_key(number), &bytes).map(Some),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // Numbers without a record: new ones, mostly (the bloom filters answer), or numbers
        // whose every journey expired.
        let absent: Vec<usize> = (0..states.len()).filter(|&i| states[i].is_none()).collect();
        if absent.is_empty() {
            return Ok(states);
        }
        let memories = self.db.batched_multi_get_cf(
            self.cf(keys::EXPIRED),
            absent.iter().map(|&i| keys::shipment_key(numbers[i])),
            sorted,
        );
        for (&i, value) in absent.iter().zip(memories) {
            if let Some(bytes) = value? {
                states[i] = Some(codec::decode_shipment(
                    keys::shipment_key(numbers[i]),
                    &bytes,
                )?);
            }
        }
        Ok(states)
    }

    /// Up to `limit` keys of the deadline index due at `now`, earliest first. Read by the
    /// sweeper, not the writer: an iterator sorts a copy of the index's live (vector) memtable.
    pub fn due_stall_keys(&self, now: EventTime, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut read = ReadOptions::default();
        read.set_iterate_upper_bound(keys::stall_keys_due(now));
        self.db
            .iterator_cf_opt(self.cf(keys::STALL_DEADLINES), read, IteratorMode::Start)
            .take(limit)
            .map(|item| {
                item.map(|(key, _)| key.into_vec())
                    .map_err(StoreError::from)
            })
            .collect()
    }

    /// Shipments currently stalled, as counted by the writes that stall and wake them.
    pub fn stalled_shipments(&self) -> Result<u64, StoreError> {
        Ok(self.meta_u64(keys::META_STALLED_SHIPMENTS)?.unwrap_or(0))
    }

    /// The next offset to consume from a source partition, as stored with the state it produced.
    pub fn source_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        let key = keys::source_offset_key(topic, partition);
        self.db
            .get_cf(self.cf(keys::META), &key)?
            .map(|v| {
                v.as_slice()
                    .try_into()
                    .map(i64::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        key: String::from_utf8_lossy(&key).into_owned(),
                        what: format!("{} bytes", v.len()),
                    })
            })
            .transpose()
    }

    /// The highest sequence `sink` has delivered (0 before its first delivery).
    pub fn sink_cursor(&self, sink: &str) -> Result<Sequence, StoreError> {
        let key = keys::sink_cursor_key(sink);
        match self.db.get_cf(self.cf(keys::META), &key)? {
            None => Ok(Sequence(0)),
            Some(v) => keys::decode_change_key(&v).ok_or_else(|| StoreError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                what: format!("{} bytes", v.len()),
            }),
        }
    }

    /// Records `sink`'s progress with the floors its recovery reads from. Not synced: after a
    /// crash the sink finds what it delivered beyond the stored cursor by reading its
    /// destination from the stored floors.
    pub fn set_sink_position(
        &self,
        sink: &str,
        delivered: Sequence,
        floors: &SinkFloors,
    ) -> Result<(), StoreError> {
        let meta = self.cf(keys::META);
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(
            meta,
            keys::sink_cursor_key(sink),
            keys::change_key(delivered),
        );
        batch.put_cf(meta, keys::sink_floors_key(sink), floors.encode_to_vec());
        self.db.write(batch)?;
        Ok(())
    }

    /// Where `sink`'s recovery starts reading; empty before its first position is stored.
    pub fn sink_floors(&self, sink: &str) -> Result<SinkFloors, StoreError> {
        let key = keys::sink_floors_key(sink);
        match self.db.get_cf(self.cf(keys::META), &key)? {
            None => Ok(SinkFloors::default()),
            Some(v) => SinkFloors::decode(v.as_slice()).map_err(|e| StoreError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                what: e.to_string(),
            }),
        }
    }

    /// This data directory's identity as a publisher, drawn on first use and kept in `meta`
    /// (so a backup restored elsewhere publishes as the instance it replaces).
    pub fn publisher_id(&self) -> Result<u64, StoreError> {
        let meta = self.cf(keys::META);
        if let Some(id) = self.meta_u64(keys::META_PUBLISHER_ID)? {
            return Ok(id);
        }
        let id = fresh_id();
        self.db
            .put_cf(meta, keys::META_PUBLISHER_ID, id.to_be_bytes())?;
        self.db.flush_wal(true)?;
        Ok(id)
    }

    /// The stored scans of one shipment, whole and encoded, in timeline order.
    #[cfg(test)]
    pub fn timeline_values(
        &self,
        tracking_number: &TrackingNumber,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        match self.shipment_record(tracking_number)? {
            Some(bytes) => scans_of(tracking_number, &bytes),
            None => Ok(Vec::new()),
        }
    }

    /// A shipment's stored record as RocksDB holds it (its deltas merged), scans included:
    /// what a changelog snapshot carries.
    pub fn shipment_record(
        &self,
        tracking_number: &TrackingNumber,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(
            self.cf(keys::SHIPMENTS),
            keys::shipment_key(tracking_number),
        )?)
    }

    /// The length of a shipment's stored timeline (0 for one never seen).
    pub(super) fn scans_stored_for(
        &self,
        tracking_number: &TrackingNumber,
    ) -> Result<u64, StoreError> {
        let key = keys::shipment_key(tracking_number);
        Ok(match self.db.get_cf(self.cf(keys::SHIPMENTS), key)? {
            Some(bytes) => codec::decode_shipment_record(key, &bytes)?.timeline.len() as u64,
            None => 0,
        })
    }

    /// A journey of a tracking number (`None`: the latest) with its timeline in order, read
    /// from one snapshot. `None` when the number has no scans or not that journey.
    pub fn shipment(
        &self,
        tracking_number: &TrackingNumber,
        journey: Option<u32>,
    ) -> Result<Option<pb::Shipment>, StoreError> {
        let key = keys::shipment_key(tracking_number);
        let Some(bytes) = self.shipment_record(tracking_number)? else {
            return Ok(None);
        };
        let state = codec::decode_shipment(key, &bytes)?;
        if state.timeline.is_empty() {
            return Ok(None);
        }
        let ranges = state.journey_ranges();
        let wanted = journey.unwrap_or_else(|| state.journey());
        let Some((_, range)) = ranges.iter().find(|(number, _)| *number == wanted) else {
            return Ok(None);
        };
        let mut scans = scans_of(tracking_number, &bytes)?;
        let timeline = scans
            .drain(range.clone())
            .map(|scan| {
                pb::Scan::decode(scan.as_slice()).map_err(|e| StoreError::Corrupt {
                    key: tracking_number.to_string(),
                    what: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        let summaries = ranges
            .iter()
            .map(|(number, range)| journey_summary(&state, *number, range.clone()))
            .collect();
        let latest = state.latest_journey();
        let this = if wanted == state.journey() {
            latest
        } else {
            state
                .earlier
                .iter()
                .find(|j| j.number == wanted)
                .cloned()
                .unwrap_or(latest)
        };
        let point = state.point_of(wanted);
        let (status, sub_status) = crate::domain::wire::status_fields(point);
        let stalled_status = crate::domain::wire::stalled_status(point);
        let check = state.flags.tracking_number;
        Ok(Some(pb::Shipment {
            tracking_number: tracking_number.to_string(),
            status,
            sub_status,
            version: this.version.0,
            timeline,
            scans_after_terminal: this.derived.scans_after_terminal,
            stalled_status,
            regressions: this.regressions,
            clock_skewed_scans: this.clock_skewed_scans,
            carrier: check.carrier,
            carrier_service: check.service,
            tracking_number_issue: check.issue,
            journey: wanted,
            journeys: summaries,
        }))
    }

    /// Up to `limit` of one shipment's changes with a sequence above `after` and at most
    /// `upto`, in order: the sequences its record lists, each read from its block (consecutive
    /// ones from one block). Only this shipment's changes are read, however long the log.
    pub fn changes_of(
        &self,
        tracking_number: &TrackingNumber,
        after: Sequence,
        upto: Sequence,
        limit: usize,
    ) -> Result<Vec<pb::StatusChange>, StoreError> {
        let Some(record) = self.shipment_record(tracking_number)? else {
            return Ok(Vec::new());
        };
        let key = keys::shipment_key(tracking_number);
        // What the change log's retention removed is not read (the feed says OUT_OF_RANGE).
        let first = self.first_sequence()?.0;
        let wanted = codec::change_sequences(key, &record)?
            .into_iter()
            .filter(|&s| s > after.0 && s >= first && s <= upto.0)
            .take(limit);
        let mut blocks = self.db.raw_iterator_cf(self.cf(keys::CHANGES));
        let mut block: Option<codec::ChangeBlock> = None;
        let mut out = Vec::new();
        for sequence in wanted {
            let missing = || StoreError::Corrupt {
                key: tracking_number.to_string(),
                what: format!("change {sequence} listed but not in the log"),
            };
            let in_block =
                |b: &codec::ChangeBlock| b.changes.iter().find(|c| c.sequence == sequence).cloned();
            let change = match block.as_ref().and_then(in_block) {
                Some(change) => change,
                None => {
                    blocks.seek_for_prev(keys::change_key(Sequence(sequence)));
                    let Some((key, value)) = blocks.item() else {
                        blocks.status()?;
                        return Err(missing());
                    };
                    let read = codec::decode_change_block(key, value)?;
                    let change = in_block(&read).ok_or_else(missing)?;
                    block = Some(read);
                    change
                }
            };
            out.push(change);
        }
        Ok(out)
    }

    /// Up to `limit` changes with a sequence above `after` and at most `upto`, in order: from
    /// the block holding `after + 1` (the last block starting at or before it) onwards. Readers
    /// pass the durable sequence (the writer's watch) as `upto`: the log may already hold
    /// changes of a write whose WAL sync is still under way.
    pub fn changes(
        &self,
        after: Sequence,
        upto: Sequence,
        limit: usize,
    ) -> Result<Vec<pb::StatusChange>, StoreError> {
        let Some(start) = after.0.checked_add(1) else {
            return Ok(Vec::new());
        };
        let limit =
            limit.min(usize::try_from(upto.0.saturating_sub(after.0)).unwrap_or(usize::MAX));
        let start_key = keys::change_key(Sequence(start));
        let mut blocks = self.db.raw_iterator_cf(self.cf(keys::CHANGES));
        blocks.seek_for_prev(start_key);
        if !blocks.valid() {
            blocks.status()?;
            blocks.seek(start_key);
        }
        let mut out = Vec::new();
        while out.len() < limit {
            let Some((key, value)) = blocks.item() else {
                blocks.status()?;
                break;
            };
            let block = codec::decode_change_block(key, value)?;
            out.extend(
                block
                    .changes
                    .into_iter()
                    .filter(|c| c.sequence >= start)
                    .take(limit - out.len()),
            );
            blocks.next();
        }
        Ok(out)
    }
}

/// The whole scans of a shipment's record, in timeline order.
fn scans_of(tracking_number: &TrackingNumber, record: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
    let key = keys::shipment_key(tracking_number);
    let record = codec::decode_shipment_record(key, record)?;
    record
        .timeline
        .iter()
        .map(|entry| {
            codec::entry_scan(tracking_number.as_str(), entry).ok_or_else(|| StoreError::Corrupt {
                key: tracking_number.to_string(),
                what: format!("timeline entry {} without its stored scan", entry.scan_id),
            })
        })
        .collect()
}

/// What GetShipment says of each journey of a number.
fn journey_summary(
    state: &crate::engine::ShipmentState,
    number: u32,
    range: std::ops::Range<usize>,
) -> pb::JourneySummary {
    let (status, sub_status) = crate::domain::wire::status_fields(state.point_of(number));
    let version = match state.earlier.iter().find(|j| j.number == number) {
        Some(journey) => journey.version,
        None => state.version,
    };
    let entries = &state.timeline[range];
    let time =
        |e: Option<&crate::engine::Entry>| e.map(|e| crate::domain::wire::timestamp(e.event_time));
    pb::JourneySummary {
        journey: number,
        status,
        sub_status,
        version: version.0,
        scans: entries.len() as u32,
        first_event_time: time(entries.first()),
        last_event_time: time(entries.last()),
    }
}
