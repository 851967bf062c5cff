//! The `vouch` binary as operators and scripts use it.

mod cli;
mod iso8583;
mod serve;
mod settlement;
