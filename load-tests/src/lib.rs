//! Load generator and verifying sink for Herald.

pub mod verify;
