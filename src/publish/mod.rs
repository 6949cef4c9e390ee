//! Publish: status changes leave scand from the change log (`changes` column family), which
//! the writer fills in the same atomic write as the state that caused them. Each sink reads
//! the log from its own cursor, so a sink that is slow or away loses nothing.
//!
//! Today's sink is the gRPC change feed (`feed`); a Kafka sink is one more folder here.

pub mod feed;
