//! Publish: status changes leave scand from the change log (`change_blocks` column family), which
//! the writer fills in the same atomic write as the state that caused them. Each sink reads
//! the log from its own cursor, so a sink that is slow or away loses nothing.
//!
//! Sinks: the gRPC change feed (`feed`, cursor held by each subscriber) and the Kafka status
//! topic (`kafka`, cursor stored in `meta`, what lies beyond it found again on the topic by
//! `recovery`).

pub mod feed;
pub mod kafka;
pub mod recovery;
