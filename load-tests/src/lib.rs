//! Load generator and verifying sink.
