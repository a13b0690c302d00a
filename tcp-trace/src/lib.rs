//! tcp-trace: TCP connection lifecycles from eBPF, streamed over gRPC.
//!
//! Data flows one way: kernel record (`tcp-trace-ebpf`) -> [`capture`] (load, drain, decode) ->
//! [`lifecycle`] (the connection table) -> [`event`] (clock, conversion, encoding) -> [`bus`]
//! (sequence numbers, filters, fan-out, replay) -> [`api`] (gRPC) -> clients ([`cli`]).
//! [`export`] (Prometheus, OTLP) is fed beside the bus by the same pipeline, once per connection.
pub mod agent;
pub mod api;
pub mod bus;
pub mod capture;
pub mod cli;
pub mod client;
pub mod event;
pub mod export;
pub mod filter;
pub mod json;
pub mod lifecycle;
pub mod model;
pub mod stats;

/// Code generated from `proto/tcptrace/v1/tcptrace.proto` at build time.
pub mod proto {
    tonic::include_proto!("tcptrace.v1");
    include!(concat!(env!("OUT_DIR"), "/server/tcptrace.v1.rs"));

    /// The encoded descriptor set of the proto files: for server reflection and JSON output.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tcptrace_descriptor");
}
