//! Helpers for read-side tests: appending bank events straight to a daemon's
//! log (the command side is not needed to feed projections), folding them into
//! the expected read models, and waiting for projections to catch up.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cqrsd::log::{Encoding, Event, EventLog, EventMetadata, Position, encode, partition_for};
use serde_json::{Value, json};

/// Appends events of `account` aggregates with consecutive versions.
pub struct Writer {
    log: EventLog,
    versions: HashMap<String, u64>,
    /// Every event appended, in order, for folding.
    pub events: Vec<Event>,
}

pub fn ts(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

impl Writer {
    pub fn new(log: EventLog) -> Self {
        Self {
            log,
            versions: HashMap::new(),
            events: Vec::new(),
        }
    }

    /// Appends one record holding `events` of account `id`; returns its position.
    pub async fn append_at(
        &mut self,
        id: &str,
        events: &[(&str, Value)],
        timestamp: DateTime<Utc>,
    ) -> String {
        let version = self.versions.entry(id.to_owned()).or_insert(0);
        let events: Vec<Event> = events
            .iter()
            .map(|(event_type, data)| {
                *version += 1;
                Event {
                    event_id: uuid::Uuid::now_v7(),
                    aggregate_type: "account".to_owned(),
                    aggregate_id: id.to_owned(),
                    version: *version,
                    event_type: (*event_type).to_owned(),
                    schema_version: 1,
                    timestamp,
                    data: data.clone(),
                    metadata: EventMetadata {
                        command: "test".to_owned(),
                        command_id: uuid::Uuid::now_v7(),
                        idempotency_key: None,
                        correlation_id: None,
                        request_hash: "test".to_owned(),
                        principal: None,
                    },
                }
            })
            .collect();
        let record = encode(&events, Encoding::MessagePack).unwrap();
        self.events.extend(events);
        self.append_record(id, record).await
    }

    pub async fn append(&mut self, id: &str, events: &[(&str, Value)]) -> String {
        self.append_at(id, events, ts("2026-11-26T10:00:00Z")).await
    }

    /// Appends a raw record (e.g. one that does not decode) to `key`'s partition.
    pub async fn append_record(&self, key: &str, record: cqrsd::log::Record) -> String {
        let topic = self.log.topic("account");
        let partition = partition_for(key, self.log.partitions());
        let offsets = self
            .log
            .append(&topic, partition, vec![record])
            .await
            .unwrap();
        Position::new(topic, partition, offsets[0]).to_string()
    }
}

/// The `accounts` view as the bank domain defines it: id → (owner, status, balance).
pub fn fold_accounts(events: &[Event]) -> BTreeMap<String, Value> {
    let mut docs: BTreeMap<String, Value> = BTreeMap::new();
    for event in events {
        let amount = event.data.get("amount").and_then(Value::as_f64);
        let doc = docs.get(&event.aggregate_id).cloned();
        let next = match (event.event_type.as_str(), doc) {
            ("AccountOpened", _) => Some(json!({
                "owner": event.data["owner"], "status": "open", "balance": 0.0,
            })),
            ("MoneyDeposited", Some(mut doc)) => amount.map(|a| {
                doc["balance"] = json!(doc["balance"].as_f64().unwrap() + a);
                doc
            }),
            ("MoneyWithdrawn", Some(mut doc)) => amount.map(|a| {
                doc["balance"] = json!(doc["balance"].as_f64().unwrap() - a);
                doc
            }),
            ("AccountClosed", Some(mut doc)) => {
                doc["status"] = json!("closed");
                Some(doc)
            }
            _ => None,
        };
        if let Some(next) = next {
            docs.insert(event.aggregate_id.clone(), next);
        }
    }
    docs
}

/// The fields of a stored document that the fold knows, with numbers as f64.
pub fn comparable(doc: &Value) -> Value {
    json!({
        "owner": doc["owner"],
        "status": doc["status"],
        "balance": doc["balance"].as_f64().unwrap(),
    })
}

/// Waits until every projection has no lag in any partition.
pub async fn wait_caught_up(http: &reqwest::Client, base: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let report: Value = http
            .get(format!("{base}/admin/projections"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let done = report["projections"].as_array().unwrap().iter().all(|p| {
            p["state"] == "running"
                && p["partitions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|part| part["lag"] == 0)
        });
        if done {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "projections never caught up: {report}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads every page of a list query, returning the items in order.
pub async fn all_pages(http: &reqwest::Client, url: &str) -> Vec<(String, Value)> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page_url = match &cursor {
            Some(cursor) => format!("{url}&cursor={cursor}"),
            None => url.to_owned(),
        };
        let response = http.get(&page_url).send().await.unwrap();
        assert_eq!(response.status(), 200, "{page_url}");
        let page: Value = response.json().await.unwrap();
        for item in page["items"].as_array().unwrap() {
            items.push((
                item["key"].as_str().unwrap().to_owned(),
                item["doc"].clone(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return items,
        }
    }
}
