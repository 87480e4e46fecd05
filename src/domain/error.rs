//! The errors of the domain module, grouped by when they happen: loading a
//! domain file, running a command, and applying an event.

use std::fmt;

/// One problem found in a domain file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainError {
    /// Where the problem is, as a dotted TOML path such as
    /// `aggregates.account.commands.open.emit[0]`, so an operator can find it
    /// without reading the loader's code.
    pub place: String,
    /// What is wrong there, in words.
    pub reason: String,
}

impl DomainError {
    pub(crate) fn new(place: impl Into<String>, reason: impl Into<String>) -> Self {
        DomainError {
            place: place.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for DomainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.place.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.place, self.reason)
        }
    }
}

/// Every problem found in a domain file. A domain file is checked as a whole,
/// so that an operator fixes all mistakes in one round instead of one per
/// restart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DomainErrors(pub Vec<DomainError>);

impl fmt::Display for DomainErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// One JSON Schema violation in a command body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// A JSON Pointer to the offending value: `/amount`, or `""` for the body
    /// itself.
    pub path: String,
    pub message: String,
}

/// Why a command was not accepted. Each variant maps to one HTTP answer, so
/// the API layer never has to look inside messages.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommandError {
    /// The aggregate has no command of that name.
    #[error("unknown command `{command}`")]
    UnknownCommand { command: String },
    /// The body does not match the command's JSON Schema: every violation.
    #[error("the command body does not match its schema: {}", violations_text(.0))]
    Schema(Vec<Violation>),
    /// A business rule said no: the rule's message.
    #[error("{message}")]
    Rejected { message: String },
    /// An expression failed on this input (missing key, type mismatch,
    /// overflow, too costly, ...).
    #[error("{place}: {reason}")]
    Evaluation { place: String, reason: String },
}

fn violations_text(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| {
            format!(
                "{} {}",
                if v.path.is_empty() { "/" } else { &v.path },
                v.message
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why an event could not be applied to a state or a projection.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApplyError {
    /// No handler exists for this event type.
    #[error("unknown event `{event_type}`")]
    UnknownEvent { event_type: String },
    /// A handler's expression failed on this event.
    #[error("{place}: {reason}")]
    Evaluation { place: String, reason: String },
}
