//! The change feed behind `WatchStatusChanges`: replay the change log from a subscriber's
//! cursor, then follow it live.
//!
//! Invariants:
//! - A subscriber sees each change after its cursor exactly once, in sequence order, so
//!   reconnecting with the last sequence it saw misses nothing and repeats nothing.
//! - Memory per subscriber is bounded: changes are read from RocksDB in chunks at the
//!   subscriber's pace into a small channel; a slow subscriber lags, it is never buffered.
//! - A subscriber that takes no change for `feed.stalled_subscriber_timeout` while changes
//!   wait for it is cut off with RESOURCE_EXHAUSTED; its reader task and store reads end at
//!   once. The ending status overtakes buffered changes when there is no room behind them, so
//!   a stream always ends with its status, and the subscriber resumes after the last sequence
//!   it actually received.
//! - Streams end on shutdown with UNAVAILABLE, so graceful shutdown is never held open.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::domain::{Sequence, TrackingNumber};
use crate::proto::pb;
use crate::store::Store;
use crate::telemetry::metrics as m;

/// Changes read from the store per round trip.
const CHUNK: usize = 512;

#[derive(Clone)]
pub struct Feed {
    store: Store,
    committed: watch::Receiver<Sequence>,
    buffer: usize,
    stalled_timeout: Duration,
    shutdown: CancellationToken,
}

/// One subscriber's stream: the changes, unless the feed ended it, in which case that status
/// comes first and last.
pub struct Subscription {
    changes: mpsc::Receiver<Result<pb::StatusChange, Status>>,
    ended: oneshot::Receiver<Status>,
    done: bool,
}

impl Stream for Subscription {
    type Item = Result<pb::StatusChange, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(Ok(status)) = Pin::new(&mut self.ended).poll(cx) {
            self.done = true;
            return Poll::Ready(Some(Err(status)));
        }
        self.changes.poll_recv(cx)
    }
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
        config: &FeedConfig,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            committed,
            buffer: config.subscriber_buffer,
            stalled_timeout: config.stalled_subscriber_timeout,
            shutdown,
        }
    }

    /// Changes with a sequence above `after` (only `only`'s, if given): the log so far, then
    /// live ones as they are committed.
    pub fn subscribe(&self, after: Sequence, only: Option<TrackingNumber>) -> Subscription {
        let (tx, rx) = mpsc::channel(self.buffer);
        let (end_tx, end_rx) = oneshot::channel();
        let feed = self.clone();
        tokio::spawn(async move {
            let _gauge = SubscriberGauge::new();
            if let Err(status) = feed.pump(after, only, &tx).await {
                // After the changes already buffered if there is room, else ahead of them.
                if let Err(mpsc::error::TrySendError::Full(Err(status))) = tx.try_send(Err(status))
                {
                    let _ = end_tx.send(status);
                }
            }
        });
        Subscription {
            changes: rx,
            ended: end_rx,
            done: false,
        }
    }

    /// Runs until the subscriber leaves (Ok) or the feed must end it (Err, sent to it).
    async fn pump(
        mut self,
        after: Sequence,
        only: Option<TrackingNumber>,
        tx: &mpsc::Sender<Result<pb::StatusChange, Status>>,
    ) -> Result<(), Status> {
        let mut cursor = after;
        let shutting_down = |_: Sequence| {
            Status::unavailable(
                "scand is shutting down; resume with after_sequence = the last sequence you received",
            )
        };
        loop {
            let store = self.store.clone();
            let durable = *self.committed.borrow();
            let only = only.clone();
            // One shipment's changes through its record's index, never a scan of the log.
            let chunk = tokio::task::spawn_blocking(move || {
                let chunk = match &only {
                    Some(number) => store.changes_of(number, cursor, durable, CHUNK),
                    None => store.changes(cursor, durable, CHUNK),
                }?;
                // Read after the chunk: a trim that removed part of it moved this first.
                Ok::<_, crate::store::StoreError>((chunk, store.first_sequence()?))
            })
            .await
            .map_err(|e| Status::internal(format!("feed reader failed: {e}")))?
            .map_err(|e| Status::unavailable(format!("change log unreadable: {e}")))?;
            let (chunk, first) = chunk;
            if cursor.0.saturating_add(1) < first.0 {
                return Err(out_of_range(cursor, first));
            }
            if tx.is_closed() {
                return Ok(());
            }
            if chunk.is_empty() {
                // Everything up to `durable` is read (for a filtered subscriber, the log may
                // have moved past its cursor with other shipments' changes).
                tokio::select! {
                    () = tx.closed() => return Ok(()),
                    () = self.shutdown.cancelled() => return Err(shutting_down(cursor)),
                    committed = self.committed.wait_for(|s| *s > durable) => {
                        if committed.is_err() {
                            return Err(shutting_down(cursor));
                        }
                    }
                }
                continue;
            }
            for change in chunk {
                let sequence = Sequence(change.sequence);
                let room = match tx.try_reserve() {
                    Ok(room) => room,
                    Err(mpsc::error::TrySendError::Closed(())) => return Ok(()),
                    Err(mpsc::error::TrySendError::Full(())) => tokio::select! {
                        room = tx.reserve() => match room {
                            Ok(room) => room,
                            Err(_) => return Ok(()),
                        },
                        () = tokio::time::sleep(self.stalled_timeout) => {
                            return Err(self.cut_off(cursor));
                        }
                        () = self.shutdown.cancelled() => return Err(shutting_down(cursor)),
                    },
                };
                room.send(Ok(change));
                metrics::counter!(m::FEED_CHANGES_SENT_TOTAL).increment(1);
                cursor = sequence;
            }
        }
    }

    /// The status ending a subscriber that took nothing for the timeout. `cursor` is the last
    /// change handed to its stream, so resuming after it repeats nothing and misses nothing
    /// once the subscriber has read what was already buffered.
    fn cut_off(&self, cursor: Sequence) -> Status {
        metrics::counter!(m::FEED_SUBSCRIBERS_CUT_OFF_TOTAL).increment(1);
        tracing::info!(
            after_sequence = cursor.0,
            "change feed subscriber took nothing for {:?}; cut off",
            self.stalled_timeout
        );
        Status::resource_exhausted(format!(
            "subscriber took no change for {}s while changes were waiting; cut off to free the \
             server. Resume with after_sequence = the last sequence you received",
            self.stalled_timeout.as_secs_f64()
        ))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedConfig {
    /// Changes a WatchStatusChanges stream holds for a subscriber before waiting on it.
    pub subscriber_buffer: usize,
    /// A subscriber that takes no change for this long while changes wait for it is cut off
    /// (RESOURCE_EXHAUSTED, with the sequence to resume after).
    #[serde(with = "humantime_serde")]
    pub stalled_subscriber_timeout: Duration,
}

impl Default for FeedConfig {
    fn default() -> Self {
        Self {
            subscriber_buffer: 64,
            stalled_subscriber_timeout: Duration::from_secs(30),
        }
    }
}

/// The status of a subscriber resuming before what the change log keeps.
fn out_of_range(after: Sequence, first: Sequence) -> Status {
    Status::out_of_range(format!(
        "changes after sequence {} are no longer all kept (retention.change_log): the oldest \
         kept is {first}, so resume with after_sequence >= {} (`scand ctl tail --from {first}`) \
         and read the shipments' current state with GetShipment",
        after.0,
        first.0 - 1,
        first = first.0,
    ))
}
