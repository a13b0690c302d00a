//! The integration tests' helpers live in the tcp-trace-test-support crate (tcp-trace/test-support),
//! which the benchmark shares; this module keeps the tests' `support::` paths (`mod support;`).
pub use tcp_trace_test_support::*;
