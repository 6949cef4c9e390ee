//! The `Tracking` service: a thin adapter from gRPC to the store (GetShipment) and the change
//! feed (WatchStatusChanges). Tracking numbers are normalized exactly as scans' are. On a
//! fleet, GetShipment for a number whose partition another instance owns is forwarded there
//! (`scaleout::members`), so any instance answers for any number.
//!
//! Invariant: a forwarded request is answered by its receiver from its own store, never
//! forwarded again, so a directory that is a moment behind a rebalance cannot make a loop.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::domain::{Sequence, TrackingNumber};
use crate::proto::pb::{self, tracking_client::TrackingClient, tracking_server::Tracking};
use crate::publish::feed::Feed;
use crate::scaleout::members::{Route, Router};
use crate::store::Store;

/// Metadata a forwarded request carries: its receiver answers it from its own store.
const FORWARDED: &str = "scand-forwarded";

pub struct TrackingService {
    store: Store,
    feed: Feed,
    forwarding: Option<Forwarding>,
}

impl TrackingService {
    pub fn new(store: Store, feed: Feed, forwarding: Option<Forwarding>) -> Self {
        Self {
            store,
            feed,
            forwarding,
        }
    }
}

/// Forwards queries to the instance owning the number's partition, over one lazily connected
/// channel per instance.
pub struct Forwarding {
    router: Router,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Forwarding {
    pub fn new(router: Router) -> Self {
        Self {
            router,
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn channel(&self, url: &str) -> Result<Channel, Status> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(channel) = channels.get(url) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(url.to_owned())
            .map_err(|e| Status::internal(format!("owner URL {url}: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect_lazy();
        channels.insert(url.to_owned(), channel.clone());
        Ok(channel)
    }

    /// The owner's answer to `request`, the caller's credentials passed on.
    async fn get_shipment(
        &self,
        url: &str,
        metadata: &tonic::metadata::MetadataMap,
        request: pb::GetShipmentRequest,
    ) -> Result<Response<pb::Shipment>, Status> {
        let mut forwarded = Request::new(request);
        if let Some(token) = metadata.get("authorization") {
            forwarded
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        forwarded
            .metadata_mut()
            .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
        let answer = TrackingClient::new(self.channel(url)?)
            .get_shipment(forwarded)
            .await?;
        Ok(Response::new(answer.into_inner()))
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
        let (metadata, _, request) = request.into_parts();
        let number = parse_tracking_number(&request.tracking_number)?;
        if let Some(forwarding) = self
            .forwarding
            .as_ref()
            .filter(|_| metadata.get(FORWARDED).is_none())
        {
            match forwarding.router.route(&number, SystemTime::now()) {
                Route::Here => {}
                Route::At(url) => return forwarding.get_shipment(&url, &metadata, request).await,
                Route::Unowned { topic, partition } => {
                    return Err(Status::unavailable(format!(
                        "tracking number {number} belongs to partition {partition} of {topic}, \
                         which no instance owns at the moment (a rebalance); retry shortly"
                    )))
                }
            }
        }
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
