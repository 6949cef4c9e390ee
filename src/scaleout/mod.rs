//! Scale-out on Kafka: what lets several scand instances share the work as one consumer group.
//! `gateway` produces gRPC scans to the partitioned scans topic, so each shipment has one
//! owner (the instance consuming its partition); `changelog` replicates each owned shipment's
//! state to a compacted topic after every durable write and restores it on the partition's
//! next owner; `decisions` tracks which of this instance's changes the changelog holds (the
//! Kafka sink publishes those, never the void ones) and `resolve` decides at start what a
//! kill left in doubt; `topics` checks at start that the changelog can do that; `members`
//! keeps the fleet's directory on a topic, so any instance routes a query to the shipment's
//! owner.
//!
//! Invariant: a partition's state is restored before any of its records is consumed, and a new
//! owner resumes at the last offset whose state the changelog holds complete.

pub mod changelog;
mod decisions;
pub mod gateway;
pub mod members;
pub mod resolve;
pub mod topics;
