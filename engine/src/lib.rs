//! Herald: a webhook and event-notification delivery engine.

pub mod log;
