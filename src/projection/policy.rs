//! Policies at run time (DESIGN.md §3.2): a policy is a projection whose
//! "storage" is the write side. It runs in the projection pool like any
//! projection — same workers, same shared reads, same positions — and its
//! [`PolicyTarget`] turns each batch into commands, sends them through the
//! write side's own entry point (behind [`CommandSender`]), waits for every
//! answer, and only then commits its new positions (with what it had to
//! quarantine) in one view store batch.
//!
//! Exactly once: every command carries the Idempotency-Key
//! `policy:<name>:<event id>:<n>`, so a batch sent again after a crash is
//! answered with the first answers and changes nothing twice. The write side
//! does not remember rejections (a retry of a rejected command runs again),
//! so a policy that compensates a rejection first writes the rejection
//! durably into its own tree; after a crash it reads it back instead of
//! sending the rejected command again, which could now succeed and leave
//! both the effect and its compensation behind.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::{Value as Json, json};
use tokio_util::sync::CancellationToken;

use super::engine::{BatchStats, Engine, SourceRecord, Target};
use crate::domain::{Domain, PlannedCommand};
use crate::log::Event;
use crate::store::views::{ChangeSet, Generation, Positions, Quarantined};
use crate::store::{StoreError, ViewStore};

/// A command as a policy sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyCommand {
    pub aggregate: String,
    pub id: String,
    pub command: String,
    pub body: Json,
    pub idempotency_key: String,
    /// The correlation id of the event that caused the command, so a chain
    /// of policies can be followed through the log.
    pub correlation_id: Option<String>,
    /// `policy:<name>`, recorded as the events' principal.
    pub principal: String,
}

/// The write side's answer to one command, as a policy acts on it.
#[derive(Debug, Clone, PartialEq)]
pub enum SendAnswer {
    Accepted,
    /// An answer no retry changes: the status the write side gives a client
    /// (422 runs `on_rejected`; 400, 404 and the rest are quarantined).
    Refused {
        status: u16,
        detail: String,
    },
    /// Not now: the log is unavailable, the queue full, no answer in time.
    Retry {
        detail: String,
    },
}

/// The write side's entry point as the read side reaches it: implemented
/// where command failures get their statuses (`http`), so this module
/// knows neither the command side nor HTTP.
pub trait CommandSender: Send + Sync {
    fn send(&self, command: PolicyCommand) -> Pin<Box<dyn Future<Output = SendAnswer> + Send>>;
}

/// The sender of every policy, set once the write side runs (it starts
/// after the projection pool); until then policies wait as for a 503.
#[derive(Clone, Default)]
pub struct PolicySender(Arc<OnceLock<Arc<dyn CommandSender>>>);

impl fmt::Debug for PolicySender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySender")
            .field("set", &self.0.get().is_some())
            .finish()
    }
}

impl PolicySender {
    pub fn set(&self, sender: Arc<dyn CommandSender>) {
        if self.0.set(sender).is_err() {
            tracing::warn!("the policies' command sender was set twice; the first stays");
        }
    }

    fn get(&self) -> Option<&Arc<dyn CommandSender>> {
        self.0.get()
    }
}

/// How policies retry.
#[derive(Debug, Clone)]
pub struct PolicyOptions {
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub sender: PolicySender,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        PolicyOptions {
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
            sender: PolicySender::default(),
        }
    }
}

/// The storage of a policy: its positions, quarantine and remembered
/// rejections in a view-store generation (documents keyed `rejected:<key>`).
pub(super) struct PolicyEngine {
    pub domain: Arc<Domain>,
    pub store: ViewStore,
    pub name: String,
    pub options: PolicyOptions,
    pub cancel: CancellationToken,
    /// An operator's request to move the position: retries give way to it.
    pub moves: super::PendingMove,
}

impl Engine for PolicyEngine {
    fn open_live(&self) -> Result<Box<dyn Target>, StoreError> {
        Ok(Box::new(PolicyTarget {
            domain: self.domain.clone(),
            store: self.store.clone(),
            name: self.name.clone(),
            generation: self.store.live(&self.name)?,
            options: self.options.clone(),
            cancel: self.cancel.clone(),
            moves: self.moves.clone(),
        }))
    }

    fn open_rebuild(&self) -> Result<Box<dyn Target>, StoreError> {
        Err(StoreError::InvalidRequest(format!(
            "{} is a policy: a rebuild would send every command again",
            self.name
        )))
    }
}

struct PolicyTarget {
    domain: Arc<Domain>,
    store: ViewStore,
    name: String,
    generation: Generation,
    options: PolicyOptions,
    cancel: CancellationToken,
    moves: super::PendingMove,
}

/// A command waiting to be sent, and what it answers for.
struct Pending {
    /// The index of its event among the batch's matching events.
    item: usize,
    command: PolicyCommand,
    /// For a `send`: its index, so a rejection can run `on_rejected`
    /// (numbered after it); `None` for an `on_rejected` command.
    send: Option<usize>,
}

/// One matching event of a batch.
struct Item<'r> {
    record: &'r SourceRecord,
    index: usize,
    event: &'r Event,
    /// Why the event is quarantined, when it is.
    failure: Option<String>,
}

fn rejection_key(idempotency_key: &str) -> String {
    format!("rejected:{idempotency_key}")
}

impl PolicyTarget {
    fn key(&self, event: &Event, n: usize) -> String {
        format!("policy:{}:{}:{n}", self.name, event.event_id)
    }

    fn command(&self, event: &Event, n: usize, planned: PlannedCommand) -> PolicyCommand {
        PolicyCommand {
            aggregate: planned.aggregate,
            id: planned.id,
            command: planned.command,
            body: planned.body,
            idempotency_key: self.key(event, n),
            correlation_id: event
                .metadata
                .correlation_id
                .clone()
                .or_else(|| Some(event.event_id.to_string())),
            principal: format!("policy:{}", self.name),
        }
    }

    fn counter(&self, outcome: &'static str, by: u64) {
        if by > 0 {
            metrics::counter!("cqrsd_policy_commands_total", "policy" => self.name.clone(), "outcome" => outcome)
                .increment(by);
        }
    }

    /// Sends a wave of commands at once and waits for every answer, sending
    /// again (same keys) those the write side could not take, with
    /// exponential backoff. Rejections remembered from an earlier try are
    /// answered from the store. Fails only when the pool stops meanwhile:
    /// nothing is committed then, and the next start sends the batch again.
    fn send_wave(
        &self,
        wave: &[Pending],
        compensates: bool,
    ) -> Result<Vec<SendAnswer>, StoreError> {
        let mut answers: Vec<Option<SendAnswer>> = Vec::with_capacity(wave.len());
        for pending in wave {
            // Only a policy with `on_rejected` stores rejections.
            let remembered = match pending.send {
                Some(_) if compensates => self
                    .generation
                    .doc(&rejection_key(&pending.command.idempotency_key))?,
                _ => None,
            };
            answers.push(remembered.map(|rejection| {
                SendAnswer::Refused {
                    status: rejection["status"]
                        .as_u64()
                        .and_then(|s| u16::try_from(s).ok())
                        .unwrap_or(422),
                    detail: rejection["detail"].as_str().unwrap_or_default().to_owned(),
                }
            }));
        }
        let mut backoff = self.options.retry_min;
        loop {
            let todo: Vec<usize> = (0..wave.len()).filter(|i| answers[*i].is_none()).collect();
            if todo.is_empty() {
                break;
            }
            let mut last_reason = String::new();
            match self.options.sender.get() {
                None => last_reason = "the write side is not running yet".to_owned(),
                Some(sender) => {
                    let sends = futures::future::join_all(
                        todo.iter().map(|i| sender.send(wave[*i].command.clone())),
                    );
                    let stopping = std::pin::pin!(self.cancel.cancelled());
                    let outcome =
                        futures::executor::block_on(futures::future::select(sends, stopping));
                    let futures::future::Either::Left((results, _)) = outcome else {
                        return Err(StoreError::Unavailable(
                            "the projection pool is stopping".to_owned(),
                        ));
                    };
                    let mut retried = 0;
                    for (i, answer) in todo.iter().zip(results) {
                        match answer {
                            SendAnswer::Retry { detail } => {
                                retried += 1;
                                last_reason = detail;
                            }
                            answer => answers[*i] = Some(answer),
                        }
                    }
                    self.counter("retried", retried);
                    if retried == 0 {
                        break;
                    }
                }
            }
            tracing::warn!(policy = %self.name, reason = %last_reason, wait_ms = backoff.as_millis() as u64,
                "the write side cannot take the policy's commands now; sending them again");
            if let Some(reason) = self.sleep(backoff) {
                return Err(StoreError::Unavailable(reason.to_owned()));
            }
            backoff = (backoff * 2).min(self.options.retry_max);
        }
        Ok(answers
            .into_iter()
            .map(|a| a.unwrap_or(SendAnswer::Accepted))
            .collect())
    }

    /// Sleeps for `wait` on this (worker) thread, waking early at shutdown
    /// or when an operator asks to move the position (the batch is given up
    /// uncommitted, so the worker can carry the move out: a policy stuck on
    /// an event is what a move is for). Returns why it woke early.
    fn sleep(&self, wait: Duration) -> Option<&'static str> {
        let until = std::time::Instant::now() + wait;
        const SLICE: Duration = Duration::from_millis(20);
        loop {
            if self.cancel.is_cancelled() {
                return Some("the projection pool is stopping");
            }
            let move_waiting = self
                .moves
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_some();
            if move_waiting {
                return Some("retries given up for a request to move the position");
            }
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            std::thread::sleep(left.min(SLICE));
        }
    }
}

impl Target for PolicyTarget {
    fn positions(&self) -> Result<Positions, StoreError> {
        self.generation.positions()
    }

    fn quarantine_count(&self) -> Result<u64, StoreError> {
        self.generation.quarantine_count()
    }

    fn apply(
        &mut self,
        records: &[SourceRecord],
        positions: &Positions,
    ) -> Result<BatchStats, StoreError> {
        let domain = self.domain.clone();
        let policy = domain
            .policy(&self.name)
            .ok_or_else(|| StoreError::InvalidRequest(format!("no policy {}", self.name)))?;
        let mut stats = BatchStats::default();
        let mut quarantined: Vec<Quarantined> = Vec::new();
        let name = self.name.clone();
        let quarantine = |quarantined: &mut Vec<Quarantined>,
                          record: &SourceRecord,
                          index: usize,
                          event: Option<&Event>,
                          reason: String| {
            quarantined.push(super::engine::quarantined(
                &name, record, index, event, reason,
            ));
        };
        let mut items: Vec<Item<'_>> = Vec::new();
        let mut pending: VecDeque<Pending> = VecDeque::new();
        for record in records {
            let events = match &record.events {
                Ok(events) => events,
                Err(reason) => {
                    stats.events += 1;
                    quarantine(&mut quarantined, record, 0, None, reason.clone());
                    continue;
                }
            };
            for (index, event) in events.iter().enumerate() {
                if !policy.handles(&event.event_type) {
                    continue;
                }
                stats.events += 1;
                match policy.plan(&event.as_input(), &event.aggregate_type) {
                    Ok(commands) => {
                        let item = items.len();
                        items.push(Item {
                            record,
                            index,
                            event,
                            failure: None,
                        });
                        for (n, planned) in commands.into_iter().enumerate() {
                            pending.push_back(Pending {
                                item,
                                command: self.command(event, n, planned),
                                send: Some(n),
                            });
                        }
                    }
                    Err(error) => {
                        quarantine(
                            &mut quarantined,
                            record,
                            index,
                            Some(event),
                            error.to_string(),
                        );
                    }
                }
            }
        }
        while !pending.is_empty() {
            // A wave is the longest run of commands to distinct aggregates:
            // they go out together, while commands to one aggregate keep the
            // order of their events.
            let mut targets = HashSet::new();
            let mut wave = Vec::new();
            while let Some(front) = pending.front() {
                if !targets.insert((front.command.aggregate.clone(), front.command.id.clone())) {
                    break;
                }
                wave.extend(pending.pop_front());
            }
            let answers = self.send_wave(&wave, policy.has_on_rejected())?;
            let mut remember = ChangeSet::default();
            let mut compensations: Vec<Pending> = Vec::new();
            let (mut sent, mut rejected) = (0, 0);
            for (done, answer) in wave.into_iter().zip(answers) {
                let item = &mut items[done.item];
                let c = &done.command;
                match answer {
                    SendAnswer::Accepted => sent += 1,
                    SendAnswer::Refused { status, detail } => {
                        rejected += 1;
                        match done.send {
                            Some(i) if status == 422 && policy.has_on_rejected() => {
                                let rejection = json!({
                                    "status": status,
                                    "detail": detail,
                                    "aggregate": c.aggregate,
                                    "id": c.id,
                                    "command": c.command,
                                });
                                match policy.plan_rejected(
                                    &item.event.as_input(),
                                    &item.event.aggregate_type,
                                    &rejection,
                                ) {
                                    Ok(commands) => {
                                        let base = policy.sends() + i * policy.rejected_sends();
                                        for (j, planned) in commands.into_iter().enumerate() {
                                            compensations.push(Pending {
                                                item: done.item,
                                                command: self.command(
                                                    item.event,
                                                    base + j,
                                                    planned,
                                                ),
                                                send: None,
                                            });
                                        }
                                    }
                                    Err(error) => {
                                        item.failure.get_or_insert(error.to_string());
                                    }
                                }
                                remember.docs.insert(
                                    rejection_key(&c.idempotency_key),
                                    (None, Some(rejection)),
                                );
                            }
                            _ => {
                                item.failure.get_or_insert(format!(
                                    "{} {}/{} was refused with {status}: {detail}",
                                    c.command, c.aggregate, c.id
                                ));
                            }
                        }
                    }
                    SendAnswer::Retry { .. } => {}
                }
            }
            self.counter("sent", sent);
            self.counter("rejected", rejected);
            if !remember.docs.is_empty() {
                // Durable before any compensation is sent (see the module doc).
                self.generation.commit(&remember)?;
                self.store.flush()?;
            }
            // A compensation goes before the commands of later events.
            for compensation in compensations.into_iter().rev() {
                pending.push_front(compensation);
            }
        }
        for item in items {
            if let Some(reason) = item.failure {
                quarantine(
                    &mut quarantined,
                    item.record,
                    item.index,
                    Some(item.event),
                    reason,
                );
            }
        }
        stats.quarantined = quarantined.len() as u64;
        self.counter("quarantined", stats.quarantined);
        let changes = ChangeSet {
            quarantined,
            positions: positions.clone(),
            ..ChangeSet::default()
        };
        self.generation.commit(&changes)?;
        Ok(stats)
    }

    fn move_positions(&mut self, positions: &Positions) -> Result<(), StoreError> {
        self.generation.commit(&ChangeSet {
            positions: positions.clone(),
            ..ChangeSet::default()
        })?;
        // An operator's skip is meant to hold across a crash.
        self.store.flush()
    }

    fn promote(self: Box<Self>) -> Result<(), StoreError> {
        Err(StoreError::InvalidRequest(format!(
            "{} is a policy: it is never rebuilt",
            self.name
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    const SHOP: &str = include_str!("../../examples/shop.toml");

    /// A write side that answers from a script (per command name, in turn;
    /// then `Accepted`) and notes every command it is sent.
    #[derive(Default)]
    struct Scripted {
        answers: Mutex<Vec<(String, SendAnswer)>>,
        sent: Mutex<Vec<PolicyCommand>>,
    }

    impl CommandSender for Scripted {
        fn send(&self, command: PolicyCommand) -> Pin<Box<dyn Future<Output = SendAnswer> + Send>> {
            let mut answers = self.answers.lock().unwrap();
            let answer = match answers
                .iter()
                .position(|(name, _)| *name == command.command)
            {
                Some(i) => answers.remove(i).1,
                None => SendAnswer::Accepted,
            };
            self.sent.lock().unwrap().push(command);
            Box::pin(async move { answer })
        }
    }

    fn placed(order: &str) -> SourceRecord {
        let mut event = crate::bench::target::bench_event(
            order,
            1,
            "OrderPlaced",
            0,
            json!({"item": "apple", "qty": 2, "customer": "c"}),
        );
        event.aggregate_type = "order".to_owned();
        SourceRecord {
            topic: "cqrsd.order".to_owned(),
            partition: 0,
            offset: 0,
            events: Ok(vec![event]),
        }
    }

    fn target(
        store: &ViewStore,
        sender: Arc<Scripted>,
        cancel: &CancellationToken,
    ) -> Box<dyn Target> {
        let options = PolicyOptions {
            retry_min: Duration::from_millis(1),
            retry_max: Duration::from_millis(4),
            sender: PolicySender::default(),
        };
        options.sender.set(sender);
        PolicyEngine {
            domain: Arc::new(Domain::from_toml_str(SHOP).unwrap()),
            store: store.clone(),
            name: "reserve_stock".to_owned(),
            options,
            cancel: cancel.clone(),
            moves: Default::default(),
        }
        .open_live()
        .unwrap()
    }

    fn positions(next: u64) -> Positions {
        [(("cqrsd.order".to_owned(), 0), next)]
            .into_iter()
            .collect()
    }

    fn commands(sender: &Scripted) -> Vec<(String, String)> {
        sender
            .sent
            .lock()
            .unwrap()
            .iter()
            .map(|c| (c.command.clone(), c.idempotency_key.clone()))
            .collect()
    }

    /// A rejection runs `on_rejected` and is remembered: the same batch
    /// applied again (a crash before the commit, here a second generation
    /// handle on the same store) does not send the rejected command again,
    /// though the write side would now accept it, and sends the
    /// compensation again with its same key.
    #[test]
    fn a_compensated_rejection_is_remembered_across_a_replay() {
        let dir = tempfile::tempdir().unwrap();
        let store = ViewStore::open(dir.path()).unwrap();
        let cancel = CancellationToken::new();
        let sender = Arc::new(Scripted::default());
        sender.answers.lock().unwrap().push((
            "reserve".to_owned(),
            SendAnswer::Refused {
                status: 422,
                detail: "not enough stock".to_owned(),
            },
        ));
        let record = placed("o-1");
        let mut first = target(&store, sender.clone(), &cancel);
        let stats = first
            .apply(std::slice::from_ref(&record), &positions(1))
            .unwrap();
        assert_eq!((stats.events, stats.quarantined), (1, 0));
        let sent = commands(&sender);
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert_eq!(sent[0].0, "reserve");
        assert!(sent[0].1.ends_with(":0"), "{sent:?}");
        assert_eq!(sent[1].0, "cancel");
        assert!(sent[1].1.ends_with(":1"), "{sent:?}");
        let cancel_body = sender.sent.lock().unwrap()[1].body.clone();
        assert_eq!(cancel_body, json!({"reason": "not enough stock"}));

        let mut replay = target(&store, sender.clone(), &cancel);
        replay
            .apply(std::slice::from_ref(&record), &positions(1))
            .unwrap();
        let sent = commands(&sender);
        assert_eq!(sent.len(), 3, "{sent:?}");
        assert_eq!(sent[2], sent[1], "only the compensation is sent again");
        assert_eq!(replay.positions().unwrap(), positions(1));
    }

    /// A 503 is sent again (same key) until it is answered; a 404 is
    /// quarantined with its reason; the position moves in both cases only
    /// after the answers.
    #[test]
    fn unavailable_is_retried_and_a_refusal_without_compensation_is_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let store = ViewStore::open(dir.path()).unwrap();
        let cancel = CancellationToken::new();
        let sender = Arc::new(Scripted::default());
        for _ in 0..3 {
            sender.answers.lock().unwrap().push((
                "reserve".to_owned(),
                SendAnswer::Retry {
                    detail: "the event log is unavailable".to_owned(),
                },
            ));
        }
        let mut policy = target(&store, sender.clone(), &cancel);
        let stats = policy.apply(&[placed("o-1")], &positions(1)).unwrap();
        assert_eq!(stats.quarantined, 0);
        let sent = commands(&sender);
        assert_eq!(sent.len(), 4, "three tries refused, the fourth answered");
        assert!(sent.iter().all(|c| c == &sent[0]), "same key every time");

        sender.answers.lock().unwrap().push((
            "reserve".to_owned(),
            SendAnswer::Refused {
                status: 404,
                detail: "no such aggregate".to_owned(),
            },
        ));
        // reserve_stock has on_rejected, but only a 422 runs it.
        let stats = policy.apply(&[placed("o-2")], &positions(2)).unwrap();
        assert_eq!(stats.quarantined, 1);
        assert_eq!(policy.quarantine_count().unwrap(), 1);
        assert_eq!(policy.positions().unwrap(), positions(2));
    }

    /// Shutdown while retrying gives the batch up: nothing is committed,
    /// so the next start sends it again.
    #[test]
    fn shutdown_while_retrying_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ViewStore::open(dir.path()).unwrap();
        let cancel = CancellationToken::new();
        let sender = Arc::new(Scripted::default());
        for _ in 0..1000 {
            sender.answers.lock().unwrap().push((
                "reserve".to_owned(),
                SendAnswer::Retry {
                    detail: "full".to_owned(),
                },
            ));
        }
        let mut policy = target(&store, sender.clone(), &cancel);
        let stopper = {
            let cancel = cancel.clone();
            let sender = sender.clone();
            std::thread::spawn(move || {
                while sender.sent.lock().unwrap().len() < 3 {
                    std::thread::yield_now();
                }
                cancel.cancel();
            })
        };
        let result = policy.apply(&[placed("o-1")], &positions(1));
        stopper.join().unwrap();
        assert!(result.is_err());
        assert_eq!(policy.positions().unwrap(), Positions::new());
    }
}
