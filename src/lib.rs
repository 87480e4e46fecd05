//! cqrsd: a CQRS / event-sourcing backend declared in TOML and served as a REST API.
//!
//! See ARCHITECTURE.md for the map of the modules and their invariants.

pub mod auth;
pub mod bench;
pub mod cli;
pub mod command;
pub mod config;
pub mod daemon;
pub mod domain;
pub mod fuzzing;
pub mod health;
pub mod http;
pub mod kafka;
pub mod log;
pub mod node;
pub mod projection;
pub mod security;
pub mod store;
mod systemd;
pub mod telemetry;
pub mod tls;

// The lib's unit tests run on the daemon's allocator (src/main.rs), so the
// tests of the projections' memory accounting measure what the daemon
// allocates.
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
