//! Readiness of the daemon's components.
//!
//! Every component that must be up before the daemon takes traffic registers
//! here and reports when it is ready; `/readyz` and systemd's `READY=1` both
//! wait for all of them. Liveness needs no registry: a process that answers
//! `/livez` is alive.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

/// What one component says about itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ComponentStatus {
    pub ready: bool,
    /// A short human explanation, e.g. "replaying partition 3".
    pub detail: String,
}

#[derive(Debug, Default)]
struct Registry {
    components: BTreeMap<String, ComponentStatus>,
}

/// The shared registry; cheap to clone.
#[derive(Debug, Clone)]
pub struct Health {
    registry: Arc<Mutex<Registry>>,
    changed: watch::Sender<u64>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Self {
            registry: Arc::default(),
            changed: watch::Sender::new(0),
        }
    }

    /// Adds a component, not ready until it says so.
    pub fn register(&self, name: &str, detail: &str) -> Readiness {
        self.set(
            name,
            ComponentStatus {
                ready: false,
                detail: detail.to_owned(),
            },
        );
        Readiness {
            health: self.clone(),
            name: name.to_owned(),
        }
    }

    fn set(&self, name: &str, status: ComponentStatus) {
        // A panic elsewhere while holding this lock cannot leave the map
        // half-updated (every update is a single insert), so poisoning is ignored.
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .components
            .insert(name.to_owned(), status);
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// Every component's status, by name.
    pub fn snapshot(&self) -> BTreeMap<String, ComponentStatus> {
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .components
            .clone()
    }

    /// True once every registered component is ready (and at least one is registered).
    pub fn is_ready(&self) -> bool {
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        !registry.components.is_empty() && registry.components.values().all(|c| c.ready)
    }

    /// Resolves once every component is ready.
    pub async fn wait_ready(&self) {
        let mut changes = self.changed.subscribe();
        while !self.is_ready() {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}

/// A component's handle for reporting its own readiness.
#[derive(Debug, Clone)]
pub struct Readiness {
    health: Health,
    name: String,
}

impl Readiness {
    pub fn ready(&self) {
        self.health.set(
            &self.name,
            ComponentStatus {
                ready: true,
                detail: "ready".to_owned(),
            },
        );
    }

    pub fn not_ready(&self, detail: &str) {
        self.health.set(
            &self.name,
            ComponentStatus {
                ready: false,
                detail: detail.to_owned(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_only_when_every_component_is() {
        let health = Health::new();
        assert!(!health.is_ready(), "nothing registered is not ready");
        let a = health.register("a", "starting");
        let b = health.register("b", "starting");
        a.ready();
        assert!(!health.is_ready());
        let waiter = tokio::spawn({
            let health = health.clone();
            async move { health.wait_ready().await }
        });
        b.ready();
        waiter.await.unwrap();
        assert!(health.is_ready());
        b.not_ready("catching up");
        assert!(!health.is_ready());
        assert_eq!(health.snapshot()["b"].detail, "catching up");
    }
}
