//! Who owns which partition when several command nodes share the aggregate
//! topics (DESIGN.md §7): membership in the consumer group
//! `<topic_prefix>.command-owners`, whose assignment decides it, and the
//! owner map, a one-partition topic every node reads from its start to learn
//! each partition's owner and the URL it is reached at.
//!
//! The group is a classic (eager) one, with the `roundrobin` assignor so the
//! partitions of all aggregate topics are spread over the members together;
//! the test broker supports exactly that (`examples/tansu_consumer_group.rs`,
//! README). Its member never consumes: it only polls, so that librdkafka
//! serves the rebalance callbacks on the member's own thread. Those callbacks
//! call the node's [`OwnershipHandler`] and wait for it: a revocation is
//! handled (commands stopped, answered, checkpointed, the partition
//! released) before this member rejoins, and the coordinator gives the
//! partition to another member only once every member has rejoined (or its
//! session has expired). A member whose session expired while it was stopped
//! may still believe it owns partitions; the group is no fence, which is why
//! a taker fences with `take_partition` before it appends.
//!
//! The owner map's records are keyed by `<topic>:<partition>` and hold the
//! owner's URL. A member publishes only what it has just taken, and only
//! from its assignment callback, which returns (and so lets the member take
//! part in a later rebalance) only after the publication is acknowledged:
//! with one partition, the map's last record for a key is therefore the
//! latest owner's. Nothing is published on a revocation, so a stopped
//! member that wakes up cannot overwrite its successor's entry; until the
//! next owner publishes, the map names the previous owner, which answers
//! that partition's commands with 503 (it no longer owns it).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

use super::{Context, KafkaLog, unavailable};
use crate::log::LogError;

/// How long a member's or a map reader's poll waits, which bounds how long
/// a stop takes to be noticed.
const POLL: Duration = Duration::from_millis(100);

/// A topic and one of its partitions.
pub type TopicPartition = (String, u32);

/// What a node does when the group gives it partitions or takes them away.
/// Called on the member's thread, one call at a time; blocking is expected:
/// the rebalance waits until the call returns.
pub trait OwnershipHandler: Send + Sync + 'static {
    /// The group gave these partitions to this node: fence the previous
    /// owner, restore, accept commands. Returns the partitions it now owns
    /// (those it could not take are left out and not published).
    fn assigned(&self, partitions: &[TopicPartition]) -> Vec<TopicPartition>;
    /// The group took these partitions away: stop taking their commands,
    /// answer those in flight, checkpoint, release. `lost` says the session
    /// had expired, so another node may own them already.
    fn revoked(&self, partitions: &[TopicPartition], lost: bool);
}

/// How this node takes part in the command-owners group.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    /// `<topic_prefix>.command-owners`.
    pub group_id: String,
    /// The aggregate topics whose partitions the group shares out.
    pub topics: Vec<String>,
    /// The owner map's topic, `<topic_prefix>.command-owners.map`.
    pub map_topic: String,
    /// The URL other nodes reach this one at (its `advertise_url`).
    pub url: String,
    /// The group's session timeout: how long a silent member keeps its
    /// partitions before they move.
    pub session_timeout: Duration,
}

/// The group's counters, shown by `/admin/node` and `/metrics`.
#[derive(Debug, Default)]
pub struct GroupStats {
    /// Assignments received (each rebalance gives one to every member).
    pub assignments: AtomicU64,
    /// Revocations received, lost ones included.
    pub revocations: AtomicU64,
    /// Revocations after an expired session.
    pub lost: AtomicU64,
}

/// This node's membership in the command-owners group. Dropping it (or
/// [`Membership::leave`]) leaves the group after the handler has given up
/// every partition.
pub struct Membership {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    stats: Arc<GroupStats>,
}

impl Membership {
    pub fn stats(&self) -> Arc<GroupStats> {
        self.stats.clone()
    }

    /// Leaves the group: the handler's `revoked` runs for what this node
    /// holds, then the member closes. Blocking.
    pub fn leave(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// The member's rebalance callbacks.
struct Member {
    log: KafkaLog,
    handler: Arc<dyn OwnershipHandler>,
    settings: GroupSettings,
    stats: Arc<GroupStats>,
}

impl ClientContext for Member {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        Context.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        Context.error(error, reason);
    }
}

impl ConsumerContext for Member {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let lost = consumer.assignment_lost();
            self.stats.revocations.fetch_add(1, Ordering::Relaxed);
            if lost {
                self.stats.lost.fetch_add(1, Ordering::Relaxed);
            }
            metrics::counter!("cqrsd_command_owners_revocations_total", "lost" => lost.to_string())
                .increment(1);
            let partitions = topic_partitions(list);
            tracing::info!(
                ?partitions,
                lost,
                "command-owners group: partitions revoked"
            );
            self.handler.revoked(&partitions, lost);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                self.stats.assignments.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("cqrsd_command_owners_assignments_total").increment(1);
                let partitions = topic_partitions(list);
                tracing::info!(?partitions, "command-owners group: partitions assigned");
                let taken = self.handler.assigned(&partitions);
                for (topic, partition) in taken {
                    if let Err(error) = self.publish(&topic, partition) {
                        // The map keeps naming the previous owner, which
                        // answers 503: the partition's commands wait for the
                        // next rebalance rather than reach a wrong node.
                        tracing::error!(topic, partition, %error, "cannot publish this node as the partition's owner");
                    }
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => {
                tracing::warn!(%error, "command-owners group: rebalance error");
            }
        }
    }
}

impl Member {
    /// Publishes this node as the partition's owner and waits for the
    /// broker's acknowledgement.
    fn publish(&self, topic: &str, partition: u32) -> Result<(), LogError> {
        let key = map_key(topic, partition);
        let producer = self.log.inner.producer.read().unwrap().clone();
        let record = FutureRecord::to(&self.settings.map_topic)
            .partition(0)
            .key(&key)
            .payload(self.settings.url.as_bytes());
        let timeout = self.log.inner.settings.produce_timeout;
        futures::executor::block_on(producer.send(record, timeout))
            .map(|_| ())
            .map_err(|(e, _)| unavailable("cannot publish to the owner map", e))
    }
}

fn topic_partitions(list: &TopicPartitionList) -> Vec<TopicPartition> {
    let mut partitions: Vec<TopicPartition> = list
        .elements()
        .iter()
        .filter_map(|e| Some((e.topic().to_owned(), u32::try_from(e.partition()).ok()?)))
        .collect();
    partitions.sort();
    partitions
}

fn map_key(topic: &str, partition: u32) -> String {
    format!("{topic}:{partition}")
}

/// Parses an owner map key; topic names cannot hold `:`.
fn parse_map_key(key: &str) -> Option<TopicPartition> {
    let (topic, partition) = key.rsplit_once(':')?;
    Some((topic.to_owned(), partition.parse().ok()?))
}

impl KafkaLog {
    /// Creates the owner map's topic (one partition) unless it exists. Blocking.
    pub fn ensure_owner_map(&self, map_topic: &str) -> Result<(), LogError> {
        self.create_topic(map_topic, 1)
    }

    /// Joins the command-owners group. The handler is called on the
    /// member's own thread as partitions come and go; what it takes is
    /// published to the owner map. Blocking.
    pub fn join_command_owners(
        &self,
        settings: GroupSettings,
        handler: Arc<dyn OwnershipHandler>,
    ) -> Result<Membership, LogError> {
        self.ensure_owner_map(&settings.map_topic)?;
        let session = settings.session_timeout.as_millis().max(1);
        let mut config = ClientConfig::new();
        for (key, value) in &self.inner.settings.consumer {
            config.set(key, value);
        }
        config
            .set("bootstrap.servers", &self.inner.settings.brokers)
            .set("group.id", &settings.group_id)
            .set("group.protocol", "classic")
            .set("partition.assignment.strategy", "roundrobin")
            .set("session.timeout.ms", session.to_string())
            .set("heartbeat.interval.ms", (session / 6).max(1).to_string())
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("allow.auto.create.topics", "false");
        let stats = Arc::new(GroupStats::default());
        let topics = settings.topics.clone();
        let member = Member {
            log: self.clone(),
            handler,
            settings,
            stats: stats.clone(),
        };
        let consumer: BaseConsumer<Member> = config
            .create_with_context(member)
            .map_err(|e| unavailable("cannot create the command-owners member", e))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|e| unavailable("cannot join the command-owners group", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cqrsd-command-owners".to_owned())
            .spawn(move || {
                while !stopping.load(Ordering::Acquire) {
                    // The member consumes nothing: polling serves callbacks.
                    let _ = consumer.poll(POLL);
                }
                // Dropping the consumer closes it: the revocation callback
                // runs for what this node holds, then the member leaves.
                drop(consumer);
            })
            .map_err(|e| unavailable("cannot start the command-owners member", e))?;
        Ok(Membership {
            stop,
            thread: Some(thread),
            stats,
        })
    }

    /// Starts reading the owner map from its start; the reader keeps the
    /// last URL published for every partition. Blocking.
    pub fn watch_owner_map(&self, map_topic: &str) -> Result<OwnerMap, LogError> {
        self.ensure_owner_map(map_topic)?;
        let consumer = Self::consumer(&self.inner.settings)?;
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(map_topic, 0, Offset::Beginning)
            .map_err(|e| unavailable("cannot read the owner map", e))?;
        consumer
            .assign(&assignment)
            .map_err(|e| unavailable("cannot read the owner map", e))?;
        let owners = Arc::new(RwLock::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (writing, stopping) = (owners.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("cqrsd-owner-map".to_owned())
            .spawn(move || {
                while !stopping.load(Ordering::Acquire) {
                    match consumer.poll(POLL) {
                        Some(Ok(message)) => {
                            let entry = message
                                .key()
                                .and_then(|k| std::str::from_utf8(k).ok())
                                .and_then(parse_map_key)
                                .zip(message.payload().and_then(|v| std::str::from_utf8(v).ok()));
                            if let Some((key, url)) = entry {
                                writing.write().unwrap().insert(key, url.to_owned());
                            }
                        }
                        Some(Err(KafkaError::PartitionEOF(_))) | None => {}
                        Some(Err(error)) => {
                            tracing::warn!(%error, "cannot read the owner map");
                        }
                    }
                }
            })
            .map_err(|e| unavailable("cannot start the owner map reader", e))?;
        Ok(OwnerMap {
            owners,
            reader: Arc::new(Reader {
                stop,
                thread: std::sync::Mutex::new(Some(thread)),
            }),
        })
    }
}

/// Every partition's owner as last published; cheap to clone.
#[derive(Clone)]
pub struct OwnerMap {
    owners: Arc<RwLock<HashMap<TopicPartition, String>>>,
    reader: Arc<Reader>,
}

impl std::fmt::Debug for OwnerMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnerMap").finish_non_exhaustive()
    }
}

/// The map's reader thread, stopped when the last handle goes.
struct Reader {
    stop: Arc<AtomicBool>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.lock().unwrap().take() {
            let _ = thread.join();
        }
    }
}

impl crate::node::OwnerLookup for OwnerMap {
    fn owner(&self, topic: &str, partition: u32) -> Option<String> {
        OwnerMap::owner(self, topic, partition)
    }
}

impl OwnerMap {
    /// The URL of the partition's owner, as last published.
    pub fn owner(&self, topic: &str, partition: u32) -> Option<String> {
        self.owners
            .read()
            .unwrap()
            .get(&(topic.to_owned(), partition))
            .cloned()
    }

    /// Every published owner, by topic and partition.
    pub fn all(&self) -> BTreeMap<TopicPartition, String> {
        self.owners
            .read()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Stops the reader now (also done when the last handle is dropped).
    pub fn stop(&self) {
        self.reader.stop.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_keys_round_trip_and_refuse_what_is_not_a_partition() {
        assert_eq!(
            parse_map_key(&map_key("cqrsd.account", 7)),
            Some(("cqrsd.account".to_owned(), 7))
        );
        assert_eq!(parse_map_key("cqrsd.account"), None);
        assert_eq!(parse_map_key("cqrsd.account:x"), None);
        assert_eq!(parse_map_key("cqrsd.account:-1"), None);
    }
}
