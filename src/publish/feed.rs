//! The change feed behind `WatchStatusChanges`: replay the change log from a subscriber's
//! cursor, then follow it live.
//!
//! Invariants:
//! - A subscriber sees each change after its cursor exactly once, in sequence order, so
//!   reconnecting with the last sequence it saw misses nothing and repeats nothing.
//! - Memory per subscriber is bounded: changes are read from RocksDB in chunks at the
//!   subscriber's pace into a small channel; a slow subscriber lags, it is never buffered.
//! - Streams end on shutdown with UNAVAILABLE, so graceful shutdown is never held open.

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::api::pb;
use crate::domain::{Sequence, TrackingNumber};
use crate::store::Store;
use crate::telemetry::metrics as m;

/// Changes read from the store per round trip.
const CHUNK: usize = 512;

#[derive(Clone)]
pub struct Feed {
    store: Store,
    committed: watch::Receiver<Sequence>,
    buffer: usize,
    shutdown: CancellationToken,
}

/// Counts a subscriber in `scand_feed_subscribers` for as long as it lives.
struct SubscriberGauge;

impl SubscriberGauge {
    fn new() -> Self {
        metrics::gauge!(m::FEED_SUBSCRIBERS).increment(1.0);
        SubscriberGauge
    }
}

impl Drop for SubscriberGauge {
    fn drop(&mut self) {
        metrics::gauge!(m::FEED_SUBSCRIBERS).decrement(1.0);
    }
}

impl Feed {
    /// `committed` carries the highest durable sequence, from the store writer.
    pub fn new(
        store: Store,
        committed: watch::Receiver<Sequence>,
        buffer: usize,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            committed,
            buffer,
            shutdown,
        }
    }

    /// Changes with a sequence above `after` (only `only`'s, if given): the log so far, then
    /// live ones as they are committed.
    pub fn subscribe(
        &self,
        after: Sequence,
        only: Option<TrackingNumber>,
    ) -> ReceiverStream<Result<pb::StatusChange, Status>> {
        let (tx, rx) = mpsc::channel(self.buffer);
        let feed = self.clone();
        tokio::spawn(async move {
            let _gauge = SubscriberGauge::new();
            if let Err(status) = feed.pump(after, only, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        ReceiverStream::new(rx)
    }

    /// Runs until the subscriber leaves (Ok) or the feed must end it (Err, sent to it).
    async fn pump(
        mut self,
        after: Sequence,
        only: Option<TrackingNumber>,
        tx: &mpsc::Sender<Result<pb::StatusChange, Status>>,
    ) -> Result<(), Status> {
        let mut cursor = after;
        let shutting_down = |cursor: Sequence| {
            Status::unavailable(format!(
                "scand is shutting down; resume with after_sequence={}",
                cursor.0
            ))
        };
        loop {
            let store = self.store.clone();
            let chunk = tokio::task::spawn_blocking(move || store.changes_after(cursor, CHUNK))
                .await
                .map_err(|e| Status::internal(format!("feed reader failed: {e}")))?
                .map_err(|e| Status::unavailable(format!("change log unreadable: {e}")))?;
            if chunk.is_empty() {
                tokio::select! {
                    () = tx.closed() => return Ok(()),
                    () = self.shutdown.cancelled() => return Err(shutting_down(cursor)),
                    committed = self.committed.wait_for(|s| *s > cursor) => {
                        if committed.is_err() {
                            return Err(shutting_down(cursor));
                        }
                    }
                }
                continue;
            }
            for change in chunk {
                let sequence = Sequence(change.sequence);
                if only
                    .as_ref()
                    .is_none_or(|n| n.as_str() == change.tracking_number)
                {
                    tokio::select! {
                        sent = tx.send(Ok(change)) => if sent.is_err() { return Ok(()) },
                        () = self.shutdown.cancelled() => return Err(shutting_down(cursor)),
                    }
                    metrics::counter!(m::FEED_CHANGES_SENT_TOTAL).increment(1);
                }
                cursor = sequence;
            }
        }
    }
}
