//! Integration tests: one binary, one module per feature. Every test talks to
//! a real listening server, either the `cqrsd` binary in a child process or a
//! daemon started in-process when the test needs handlers of its own.

mod harness;
mod readside;

mod adversarial;
mod aggregations;
mod auth;
mod bench;
mod cli;
mod commands;
mod console;
mod crash;
mod dispatch;
mod history;
mod kafka;
mod keyed_views;
mod openapi_contract;
mod operations;
mod ownership;
mod policies;
mod priority;
mod projection_admin;
mod projection_crash;
mod protection;
mod provision;
mod rate_limit;
mod readiness;
mod roles;
mod search;
mod segment_log;
mod shutdown;
mod stream;
mod tls;
mod upcast;
mod views;
mod write_model;
