//! Herald: a webhook and event-notification delivery engine.

pub mod config;
pub mod log;
pub mod model;
pub mod payload;
pub mod signing;
