//! End-to-end flows: a real server on a free port, driven by the device SDK.

mod attest;
mod dvv;
mod enrolment;
mod instances;
mod interop;
mod iso8583;
mod offline;
mod session;
mod support;
mod token;
mod tsm;
