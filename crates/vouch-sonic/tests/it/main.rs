//! Integration tests for vouch-sonic: one binary, one module per concern.

mod channel;
mod robustness;
mod round_trip;
mod streaming;
mod support;
