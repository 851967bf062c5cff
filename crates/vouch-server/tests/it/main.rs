//! Endpoint tests: the router driven in-process with `tower::ServiceExt::oneshot`.

mod admin;
mod attest;
mod attest_bad_input;
mod attest_regressions;
mod audit;
mod auth_scheme;
mod bad_input;
mod body_shape;
mod dvv;
mod enrolment;
mod foundation;
mod iso8583;
mod ledger;
mod offline;
mod ops;
mod registry;
mod session;
mod support;
mod token;
mod tsm;
