//! The `vouch` binary as operators and scripts use it.

mod cli;
