//! Herald: a webhook and event-notification delivery engine.

pub mod api;
pub mod config;
pub mod dispatch;
pub mod edge;
pub mod endpoint;
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
pub mod tenants;
pub mod transport;
