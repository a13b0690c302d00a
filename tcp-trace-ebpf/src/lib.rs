//! Empty on the host: this crate exists to be built for the BPF target (`src/main.rs`). The
//! library target lets `tcp-trace` name it as a build dependency so cargo rebuilds in the right order.
#![no_std]
