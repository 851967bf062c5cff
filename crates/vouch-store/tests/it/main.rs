//! The storage conformance suite: every case runs against SQLite and, when
//! `VOUCH_TEST_DATABASE_URL` is set, against PostgreSQL.

mod audit;
mod dvv;
mod harness;
mod ledger;
mod offline;
mod registry;
mod secrets;
mod token;
mod tsm;
