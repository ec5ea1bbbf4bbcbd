//! Load generator and verifying sink for Herald.

pub mod chaos;
pub mod direct;
pub mod generate;
pub mod report;
pub mod scenario;
pub mod sink;
pub mod stages;
pub mod verify;
