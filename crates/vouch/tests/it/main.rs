//! The `vouch` binary as operators and scripts use it.

mod cli;
mod instances;
mod iso8583;
mod relay;
mod serve;
mod settlement;
