//! `--mode postgres`: what teams build instead of scand, driven with the same workload. The same
//! dedup/order/status logic in PostgreSQL: every batch is one transaction of an
//! `INSERT … ON CONFLICT (scan_id) DO NOTHING` into an events table, then one status upsert per
//! shipment that keeps the latest event's status; committed with `synchronous_commit = on`, so
//! an answer means durable as in scand. Fingerprint dedup and terminal-status rules are left out
//! (they would only make the baseline slower).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use prost::Message;
use tokio_postgres::NoTls;

use crate::workload::Planned;

const SCHEMA: &str = "
DROP TABLE IF EXISTS events, shipments;
CREATE TABLE events (
    scan_id text PRIMARY KEY,
    tracking_number text NOT NULL,
    event_time bigint NOT NULL,
    scan_type int NOT NULL,
    payload bytea NOT NULL
);
CREATE INDEX events_by_shipment ON events (tracking_number, event_time);
CREATE TABLE shipments (
    tracking_number text PRIMARY KEY,
    status int NOT NULL,
    version bigint NOT NULL,
    last_event bigint NOT NULL
);
SET synchronous_commit = on;
";

const INSERT_EVENTS: &str = "
INSERT INTO events (scan_id, tracking_number, event_time, scan_type, payload)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::int[], $5::bytea[])
ON CONFLICT (scan_id) DO NOTHING
RETURNING tracking_number, event_time, scan_type";

const UPSERT_STATUS: &str = "
INSERT INTO shipments (tracking_number, status, version, last_event)
SELECT DISTINCT ON (n) n, t, 1, e FROM unnest($1::text[], $2::bigint[], $3::int[]) AS u(n, e, t)
ORDER BY n, e DESC
ON CONFLICT (tracking_number) DO UPDATE
SET status = EXCLUDED.status, version = shipments.version + 1, last_event = EXCLUDED.last_event
WHERE EXCLUDED.last_event >= shipments.last_event AND EXCLUDED.status <> shipments.status";

pub struct Baseline {
    pub scans: u64,
    pub elapsed: Duration,
    pub latency_ms: [f64; 3],
}

/// Runs the workload with `connections` concurrent sessions in batches of `batch_size`.
pub async fn run(
    url: &str,
    planned: &[Planned],
    batch_size: usize,
    connections: usize,
) -> Result<Baseline, String> {
    let connect = || async {
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .map_err(|e| format!("postgres {url}: {e}"))?;
        tokio::spawn(connection);
        Ok::<_, String>(client)
    };
    connect()
        .await?
        .batch_execute(SCHEMA)
        .await
        .map_err(|e| e.to_string())?;
    let valid: Vec<&Planned> = planned
        .iter()
        .filter(|p| p.expect != scand::proto::pb::Outcome::Rejected)
        .collect();
    let latency = Arc::new(Mutex::new(
        Histogram::<u64>::new(3).map_err(|e| e.to_string())?,
    ));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let connections = connections.max(1);
    for shard in 0..connections {
        let client = connect().await?;
        // One shipment always goes to one session, as in scand's load.
        let mine: Vec<&Planned> = valid
            .iter()
            .copied()
            .filter(|p| crate::fnv(&p.scan.tracking_number) as usize % connections == shard)
            .collect();
        let batches: Vec<Vec<Row>> = mine
            .chunks(batch_size.max(1))
            .map(|chunk| chunk.iter().map(|p| Row::of(p)).collect())
            .collect();
        let latency = latency.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = client;
            for batch in batches {
                let sent = Instant::now();
                write(&mut client, &batch).await?;
                if let Ok(mut h) = latency.lock() {
                    let _ = h.record(sent.elapsed().as_micros() as u64);
                }
            }
            Ok::<_, String>(())
        }));
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    let elapsed = started.elapsed();
    let h = latency.lock().map_err(|e| e.to_string())?;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(Baseline {
        scans: valid.len() as u64,
        elapsed,
        latency_ms: [ms(0.5), ms(0.99), h.max() as f64 / 1000.0],
    })
}

struct Row {
    scan_id: String,
    tracking_number: String,
    event_time: i64,
    scan_type: i32,
    payload: Vec<u8>,
}

impl Row {
    fn of(p: &Planned) -> Row {
        let t = p.scan.event_time.unwrap_or_default();
        Row {
            scan_id: p.scan.scan_id.clone(),
            tracking_number: p.scan.tracking_number.clone(),
            event_time: t.seconds * 1_000_000 + i64::from(t.nanos / 1000),
            scan_type: p.scan.scan_type,
            payload: p.scan.encode_to_vec(),
        }
    }
}

async fn write(client: &mut tokio_postgres::Client, batch: &[Row]) -> Result<(), String> {
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    let ids: Vec<&str> = batch.iter().map(|r| r.scan_id.as_str()).collect();
    let numbers: Vec<&str> = batch.iter().map(|r| r.tracking_number.as_str()).collect();
    let times: Vec<i64> = batch.iter().map(|r| r.event_time).collect();
    let types: Vec<i32> = batch.iter().map(|r| r.scan_type).collect();
    let payloads: Vec<&[u8]> = batch.iter().map(|r| r.payload.as_slice()).collect();
    let inserted = tx
        .query(INSERT_EVENTS, &[&ids, &numbers, &times, &types, &payloads])
        .await
        .map_err(|e| e.to_string())?;
    let n: Vec<String> = inserted.iter().map(|r| r.get(0)).collect();
    let e: Vec<i64> = inserted.iter().map(|r| r.get(1)).collect();
    let t: Vec<i32> = inserted.iter().map(|r| r.get(2)).collect();
    tx.execute(UPSERT_STATUS, &[&n, &e, &t])
        .await
        .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())
}
