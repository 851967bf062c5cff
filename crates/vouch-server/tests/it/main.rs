//! Endpoint tests: the router driven in-process with `tower::ServiceExt::oneshot`.

mod foundation;
mod support;
