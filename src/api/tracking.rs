//! The `Tracking` service: a thin adapter from gRPC to the store (GetShipment) and the change
//! feed (WatchStatusChanges). Tracking numbers are normalized exactly as scans' are.

use tonic::{Request, Response, Status};

use crate::domain::{Sequence, TrackingNumber};
use crate::proto::pb::{self, tracking_server::Tracking};
use crate::publish::feed::Feed;
use crate::store::Store;

pub struct TrackingService {
    store: Store,
    feed: Feed,
}

impl TrackingService {
    pub fn new(store: Store, feed: Feed) -> Self {
        Self { store, feed }
    }
}

fn parse_tracking_number(raw: &str) -> Result<TrackingNumber, Status> {
    TrackingNumber::parse(raw)
        .map_err(|e| Status::invalid_argument(format!("tracking_number: {e}")))
}

#[tonic::async_trait]
impl Tracking for TrackingService {
    async fn get_shipment(
        &self,
        request: Request<pb::GetShipmentRequest>,
    ) -> Result<Response<pb::Shipment>, Status> {
        let request = request.into_inner();
        let number = parse_tracking_number(&request.tracking_number)?;
        let journey = (request.journey != 0).then_some(request.journey);
        let store = self.store.clone();
        let lookup = number.clone();
        let shipment = tokio::task::spawn_blocking(move || store.shipment(&lookup, journey))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(e.to_string()))?;
        shipment.map(Response::new).ok_or_else(|| {
            Status::not_found(match journey {
                None => format!("no scans recorded for tracking number {number}"),
                Some(journey) => {
                    format!("tracking number {number} has no journey {journey} (never seen, or removed by retention)")
                }
            })
        })
    }

    type WatchStatusChangesStream = crate::publish::feed::Subscription;

    async fn watch_status_changes(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStatusChangesStream>, Status> {
        let request = request.into_inner();
        let only = request
            .tracking_number
            .as_deref()
            .map(parse_tracking_number)
            .transpose()?;
        Ok(Response::new(
            self.feed.subscribe(Sequence(request.after_sequence), only),
        ))
    }
}
