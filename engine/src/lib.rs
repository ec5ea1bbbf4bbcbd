//! Herald: a webhook and event-notification delivery engine.
//!
//! The modules follow the data flow and form a DAG, lowest first: `config`, `model`,
//! `signing`, `payload`, `log`, `metrics`, `catalog`, `tenants`, `devices`, `admission`,
//! `target`, `transport`, `retry`, `topics`, `registry`, `ingest`, `dispatch`, `agent`, `api`,
//! `server`. A lower stage never imports a higher one (a test holds this).

#![warn(missing_docs)]

pub mod admission;
pub mod agent;
pub mod api;
pub mod canonical;
pub mod catalog;
pub mod config;
pub mod devices;
pub mod dispatch;
pub mod event_types;
pub mod history;
pub mod ingest;
pub mod log;
pub mod metrics;
pub mod model;
pub mod payload;
pub mod registry;
pub mod retry;
pub mod server;
pub mod shutdown;
pub mod signing;
pub mod target;
pub mod telemetry;
pub mod tenants;
pub mod topics;
pub mod transport;
