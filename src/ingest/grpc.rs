//! gRPC ingest: the `ScanIngest` service. Handhelds stream `ScanBatch`es and get one
//! `BatchAck` per batch, in order, each sent only once its batch is durable.
//!
//! A stream pipelines: while earlier batches wait for their synced write, later ones are
//! validated and queued (so one stream feeds group commit), but at most
//! [`IN_FLIGHT_PER_STREAM`] batches are in flight; beyond that the stream stops reading and
//! HTTP/2 flow control pushes back on the scanner. The same happens while the batches of
//! all callers together fill `ingest.max_in_flight_bytes`; a unary call instead waits up to
//! `ingest.admission_timeout` and then fails with RESOURCE_EXHAUSTED.
//!
//! With device tokens configured, every call is authorized first (see [`super::auth`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::auth::{AllowedDevices, DeviceTokens, Scope};
use super::message_limit;
use super::{Admission, Caller, Ingestor, Pending};
use crate::proto::pb::{self, scan_ingest_server::ScanIngest};

/// Batches of one stream queued or waiting for their write. Enough to keep the writer's
/// group commit fed from a single stream; small enough that a stream holds little memory.
pub const IN_FLIGHT_PER_STREAM: usize = 8;

const SOURCE: &str = "grpc";

pub struct ScanIngestService {
    ingestor: Ingestor,
    tokens: Option<DeviceTokens>,
    admission_timeout: Duration,
    shutdown: CancellationToken,
}

impl ScanIngestService {
    pub fn new(
        ingestor: Ingestor,
        tokens: Option<DeviceTokens>,
        admission_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            ingestor,
            tokens,
            admission_timeout,
            shutdown,
        }
    }

    /// The devices this call may send for (`None`: tokens are not in use).
    fn authorize<T>(&self, request: &Request<T>) -> Result<Option<Arc<AllowedDevices>>, Status> {
        self.tokens
            .as_ref()
            .map(|tokens| tokens.authorize(request.metadata(), Scope::Ingest))
            .transpose()
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<pb::BatchAck, Status>> + Send>>;

#[tonic::async_trait]
impl ScanIngest for ScanIngestService {
    type StreamScansStream = AckStream;

    async fn stream_scans(
        &self,
        request: Request<Streaming<pb::ScanBatch>>,
    ) -> Result<Response<Self::StreamScansStream>, Status> {
        let devices = self.authorize(&request)?;
        let mut inbound = request.into_inner();
        let (pending_tx, mut pending_rx) =
            mpsc::channel::<Result<Pending, Status>>(IN_FLIGHT_PER_STREAM);
        let (ack_tx, ack_rx) = mpsc::channel::<Result<pb::BatchAck, Status>>(IN_FLIGHT_PER_STREAM);

        let ingestor = self.ingestor.clone();
        let shutdown = self.shutdown.clone();
        // Reader: validates and queues batches in arrival order.
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    message = inbound.message() => message,
                };
                let batch = match message {
                    Ok(Some(batch)) => batch,
                    Ok(None) => return,
                    Err(status) => {
                        // An oversized batch is answered; a vanished client reads nothing.
                        tracing::debug!(%status, "scan stream ended with an error");
                        let _ = pending_tx
                            .send(Err(message_limit::map_status(status)))
                            .await;
                        return;
                    }
                };
                let caller = Caller {
                    source: SOURCE,
                    devices: devices.as_deref(),
                    admission: Admission::Wait,
                };
                let queued = ingestor.queue(batch, caller).await.map_err(Status::from);
                let failed = queued.is_err();
                if pending_tx.send(queued).await.is_err() || failed {
                    return;
                }
            }
            // Shutting down: batches already queued are answered; the caller learns that
            // nothing after them was read, so it resends those.
            let _ = pending_tx
                .send(Err(Status::unavailable(
                    "scand is shutting down: batches without an ack were not stored; resend them",
                )))
                .await;
        });
        // Acker: answers in order, each once durable.
        tokio::spawn(async move {
            while let Some(queued) = pending_rx.recv().await {
                let answer = match queued {
                    Ok(pending) => pending.ack().await.map_err(Status::from),
                    Err(status) => Err(status),
                };
                let stop = answer.is_err();
                if ack_tx.send(answer).await.is_err() || stop {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(ack_rx))))
    }

    async fn submit_scans(
        &self,
        request: Request<pb::ScanBatch>,
    ) -> Result<Response<pb::BatchAck>, Status> {
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable(
                "scand is shutting down; retry on another instance or later",
            ));
        }
        let devices = self.authorize(&request)?;
        let caller = Caller {
            source: SOURCE,
            devices: devices.as_deref(),
            admission: Admission::Within(self.admission_timeout),
        };
        let ack = self.ingestor.ingest(request.into_inner(), caller).await?;
        Ok(Response::new(ack))
    }
}
