//! The domain: aggregates, commands, events and projections as declared in a
//! domain file (DESIGN.md §3), compiled once and then run purely. Nothing
//! here does IO, so every other module can rely on it from any thread.

mod aggregate;
mod compiled;
mod error;
mod expr;
mod load;
mod policy;
mod policy_load;
mod projection;

#[cfg(test)]
mod compiled_tests;
#[cfg(test)]
mod keyed_tests;
#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod upcast_tests;

use std::collections::BTreeMap;

pub use aggregate::{
    Aggregate, Command, CommandContext, Decision, EmitShape, EventInput, NewEvent,
};
pub use error::{ApplyError, CommandError, DomainError, DomainErrors, Violation};
pub use expr::{
    MAX_AST_DEPTH, MAX_BRACKET_DEPTH, MAX_CONCAT_LEN, MAX_EXPRESSION_LEN, MAX_ITERATIONS,
    MAX_RESULT_BYTES,
};
pub use policy::{PlannedCommand, Policy};
pub use projection::{
    AggregationDef, AggregationInput, Measure, MeasureKind, Projection, ProjectionKind, SearchDef,
    SearchFieldKind, ViewChange, ViewDef,
};

/// The built-in example: the bank accounts of DESIGN.md §3, with the
/// commands open, deposit, withdraw and close.
pub const EXAMPLE_DOMAIN: &str = include_str!("../../examples/bank.toml");

/// A compiled domain file.
#[derive(Debug)]
pub struct Domain {
    aggregates: BTreeMap<String, Aggregate>,
    projections: BTreeMap<String, Projection>,
    policies: BTreeMap<String, Policy>,
    /// Whether any event type is above version 1: without one, no stored
    /// event needs upcasting and readers skip the per-event lookup.
    versioned: bool,
}

impl Domain {
    /// Parses, validates and compiles a domain file. Returns all problems at
    /// once, each with its place.
    pub fn from_toml_str(source: &str) -> Result<Domain, DomainErrors> {
        let (aggregates, projections, policies) = load::load(source).map_err(DomainErrors)?;
        let versioned = aggregates
            .values()
            .any(|a| a.events.values().any(|e| e.version > 1));
        Ok(Domain {
            aggregates,
            projections,
            policies,
            versioned,
        })
    }

    /// Whether some event type declares a version above 1, so that stored
    /// events may need upcasting.
    pub fn has_versions(&self) -> bool {
        self.versioned
    }

    /// The data of a stored event of `aggregate_type`, written at
    /// `schema_version`, as the current version of its event type has it
    /// (see [`Aggregate::upcast`]); `None` when it is current already or
    /// the domain has no such aggregate or event type.
    pub fn upcast(
        &self,
        aggregate_type: &str,
        event: &EventInput<'_>,
        schema_version: u64,
    ) -> Result<Option<serde_json::Value>, ApplyError> {
        match self.aggregates.get(aggregate_type) {
            Some(aggregate) => aggregate.upcast(event, schema_version),
            None => Ok(None),
        }
    }

    pub fn aggregate(&self, name: &str) -> Option<&Aggregate> {
        self.aggregates.get(name)
    }

    pub fn aggregates(&self) -> impl Iterator<Item = &Aggregate> {
        self.aggregates.values()
    }

    pub fn projection(&self, name: &str) -> Option<&Projection> {
        self.projections.get(name)
    }

    pub fn projections(&self) -> impl Iterator<Item = &Projection> {
        self.projections.values()
    }

    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.get(name)
    }

    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values()
    }
}
