//! Backend-neutral event-log types: positions, the partitioner and the record format.
//!
//! Nothing here knows about a storage engine, so the embedded log (in `store`) and the
//! Kafka backend share exactly the same notion of topics, partitions, offsets and records.

mod handle;
mod msgpack;
pub mod partitioner;
pub mod position;
pub mod record;

pub use handle::{AppendFuture, EventLog, LogBackend, LogError};
pub use partitioner::{murmur2, partition_for};
pub use position::{Position, PositionError, topic_name, validate_topic_name};
pub use record::{
    Encoding, Event, EventMetadata, Record, RecordError, decode, decode_current, encode,
};
