//! A bare librdkafka producer for `cqrsd bench kafka`: it sends the same
//! encoded records to the same broker with the producer settings the log
//! uses (idempotence, `acks=all`, the configured linger and batch size), one
//! awaited send at a time per caller, so its rate is the limit the write
//! side on Kafka is compared with.

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{Context, KafkaSettings, unavailable};
use crate::log::{LogError, Record};

/// A producer with the log's settings and nothing around it.
pub struct RawProducer {
    producer: FutureProducer<Context>,
}

impl std::fmt::Debug for RawProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawProducer").finish_non_exhaustive()
    }
}

impl RawProducer {
    /// Creates the producer, with the same settings as `KafkaLog::open`'s.
    pub fn new(settings: &KafkaSettings) -> Result<Self, LogError> {
        let config = super::producer_config(settings);
        let producer = config
            .create_with_context(Context)
            .map_err(|e| unavailable("cannot create the producer", e))?;
        Ok(Self { producer })
    }

    /// Sends one record to a partition and waits for its acknowledgement.
    pub async fn send(&self, topic: &str, partition: u32, record: &Record) -> Result<(), LogError> {
        let headers = record.headers.iter().fold(
            OwnedHeaders::new_with_capacity(record.headers.len()),
            |headers, (name, value)| {
                headers.insert(Header {
                    key: name,
                    value: Some(value.as_slice()),
                })
            },
        );
        let message = FutureRecord::to(topic)
            .partition(partition as i32)
            .key(record.key.as_bytes())
            .payload(record.value.as_slice())
            .headers(headers)
            .timestamp(record.timestamp_ms);
        let delivery = self
            .producer
            .send_result(message)
            .map_err(|(error, _)| unavailable("produce", error))?;
        match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((error, _))) => Err(unavailable("produce", error)),
            Err(_) => Err(unavailable("produce", "the delivery report was lost")),
        }
    }
}
