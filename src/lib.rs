//! cqrsd: a CQRS / event-sourcing backend declared in TOML and served as a REST API.

pub mod log;
pub mod store;
