//! Months in minutes: a steady daily intake of whole journeys through scand's real writer, the
//! clock moved on a day at a time and retention swept after each day as the daemon's sweeper
//! does (journeys, then the change log). Reports the data directory's size day by day, which
//! must level off once the first journeys expire, and each day's throughput.

use std::path::Path;
use std::time::Duration;

use scand::domain::clock::Clock;
use scand::ingest::validate::Validator;
use scand::proto::pb;

use crate::store;

/// One simulated day.
pub struct Day {
    pub day: u32,
    /// Bytes of the data directory at the end of the day (after its sweep).
    pub bytes: u64,
    /// Of which write-ahead log files.
    pub wal_bytes: u64,
    pub scans_per_s: f64,
    pub journeys_removed: u32,
}

const DAY: Duration = Duration::from_secs(24 * 3600);

/// A parcel's whole journey, one scan type a step.
const STEPS: [pb::ScanType; 10] = [
    pb::ScanType::LabelCreated,
    pb::ScanType::Picked,
    pb::ScanType::Packed,
    pb::ScanType::PickedUp,
    pb::ScanType::ArrivedAtFacility,
    pb::ScanType::Sorted,
    pb::ScanType::DepartedFacility,
    pb::ScanType::Loaded,
    pb::ScanType::OutForDelivery,
    pb::ScanType::Delivered,
];

/// Every 20th parcel of a day reuses a number first used 60 days before: a new journey.
fn tracking_number(day: u32, parcel: usize) -> String {
    if day >= 60 && parcel % 20 == 0 {
        format!("RT{:04}{parcel:08}", day - 60)
    } else {
        format!("RT{day:04}{parcel:08}")
    }
}

/// Day `day`'s scans: `scans_per_day / 10` parcels, each delivered within the day that ends at
/// `end` (the clock's now).
fn day_of_scans(day: u32, scans_per_day: usize, end: std::time::SystemTime) -> Vec<pb::Scan> {
    let parcels = scans_per_day / STEPS.len();
    let mut scans = Vec::with_capacity(parcels * STEPS.len());
    let start = end - DAY;
    for parcel in 0..parcels {
        let number = tracking_number(day, parcel);
        // Spread over the first 20 hours, five minutes a step.
        let first = start + Duration::from_secs((parcel as u64 * 72_000) / parcels as u64);
        for (step, scan_type) in STEPS.iter().enumerate() {
            let at = first + Duration::from_secs(step as u64 * 300);
            scans.push(pb::Scan {
                scan_id: format!("d{day}p{parcel}s{step}"),
                tracking_number: number.clone(),
                scan_type: *scan_type as i32,
                event_time: Some(prost_types::Timestamp::from(at)),
                location: Some(pb::Location {
                    facility_id: format!("hub-{}", (parcel + step) % 97),
                    ..Default::default()
                }),
                device_id: format!("sorter-{}", parcel % 13),
                source: pb::Source::Sorter as i32,
                ..Default::default()
            });
        }
    }
    scans
}

/// Bytes of the files in `path`: all of them, and the write-ahead logs.
fn directory_bytes(path: &Path) -> (u64, u64) {
    let mut bytes = (0, 0);
    for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
        let len = entry.metadata().map_or(0, |m| m.len());
        bytes.0 += len;
        if entry.path().extension().is_some_and(|e| e == "log") {
            bytes.1 += len;
        }
    }
    bytes
}

pub async fn run(
    path: &Path,
    config: Option<&Path>,
    days: u32,
    scans_per_day: usize,
    batch_size: usize,
    in_flight: usize,
    mut report: impl FnMut(&Day),
) -> Result<Vec<Day>, String> {
    let (config, store, handle, thread) = store::open(path, config)?;
    let clock = Clock::default();
    let validator = Validator::new(&config.ingest)
        .map_err(|e| e.to_string())?
        .with_clock(clock.clone());
    let mut out = Vec::with_capacity(days as usize);
    for day in 0..days {
        clock.advance(DAY);
        let now = clock.now();
        let valid: Vec<_> = day_of_scans(day, scans_per_day, now)
            .into_iter()
            .filter_map(|scan| validator.validate(scan, now).ok())
            .collect();
        if valid.len() != scans_per_day / STEPS.len() * STEPS.len() {
            return Err(format!("day {day}: only {} scans validated", valid.len()));
        }
        let fed = store::feed(&handle, &valid, batch_size, in_flight).await?;
        let mut journeys_removed = 0;
        loop {
            let swept = handle
                .sweep(clock.event_time())
                .await
                .map_err(|e| e.to_string())?;
            journeys_removed += swept.removed.journeys;
            if !swept.more_due {
                break;
            }
        }
        let trim = store.clone();
        let older_than = now - config.retention.change_log;
        tokio::task::spawn_blocking(move || trim.trim_change_log(older_than, &[]))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let (bytes, wal_bytes) = directory_bytes(path);
        let day = Day {
            day: day + 1,
            bytes,
            wal_bytes,
            scans_per_s: fed.scans as f64 / fed.elapsed.as_secs_f64(),
            journeys_removed,
        };
        report(&day);
        out.push(day);
    }
    store::close(handle, thread).await?;
    Ok(out)
}
