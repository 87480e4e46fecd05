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
mod policy_tests;
#[cfg(test)]
mod tests;

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
}

impl Domain {
    /// Parses, validates and compiles a domain file. Returns all problems at
    /// once, each with its place.
    pub fn from_toml_str(source: &str) -> Result<Domain, DomainErrors> {
        let (aggregates, projections, policies) = load::load(source).map_err(DomainErrors)?;
        Ok(Domain {
            aggregates,
            projections,
            policies,
        })
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
