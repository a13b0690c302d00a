//! Builds the two things the agent embeds: the eBPF object (through aya-build, which runs the
//! nightly toolchain with bpf-linker) and the gRPC code plus its descriptor set (from proto/).
use std::{env, path::PathBuf};

fn main() {
    compile_protos();
    build_ebpf();
}

fn compile_protos() {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("protoc-bin-vendored ships protoc");
    // SAFETY: build scripts are single-threaded.
    unsafe { env::set_var("PROTOC", protoc) };
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let proto_dir = PathBuf::from("../proto");
    println!("cargo:rerun-if-changed=../proto");
    let include = protoc_bin_vendored::include_path().expect("protoc-bin-vendored ships includes");
    let proto = proto_dir.join("tcptrace/v1/tcptrace.proto");
    // The messages and the client.
    tonic_prost_build::configure()
        .build_server(false)
        .file_descriptor_set_path(out.join("tcptrace_descriptor.bin"))
        .compile_protos(
            std::slice::from_ref(&proto),
            &[proto_dir.clone(), include.clone()],
        )
        .expect("proto/tcptrace/v1/tcptrace.proto compiles");
    // The server, over the same messages, except that the events it streams are sent already
    // encoded: an event is encoded once however many subscribers it goes to. Its codec answers
    // undecodable requests with INVALID_ARGUMENT (src/api/codec.rs).
    let server_out = out.join("server");
    std::fs::create_dir_all(&server_out).expect("OUT_DIR is writable");
    tonic_prost_build::configure()
        .build_client(false)
        .codec_path("crate::api::codec::Codec")
        .out_dir(&server_out)
        .extern_path(".tcptrace.v1", "crate::proto")
        .extern_path(".tcptrace.v1.Event", "crate::event::EncodedEvent")
        .compile_protos(&[proto], &[proto_dir, include])
        .expect("proto/tcptrace/v1/tcptrace.proto compiles for the server");
}

fn build_ebpf() {
    // aya-build runs `cargo build` for the BPF target, which links with bpf-linker. `cargo xtask
    // setup` builds it into a cache; find it there when it is not already on PATH.
    if which_bpf_linker().is_none() {
        if let Some(dir) = cached_bpf_linker_dir() {
            let path = env::var_os("PATH").unwrap_or_default();
            let mut dirs = vec![dir];
            dirs.extend(env::split_paths(&path));
            let joined = env::join_paths(dirs).expect("PATH entries contain no separator");
            // SAFETY: build scripts are single-threaded.
            unsafe { env::set_var("PATH", joined) };
        } else if env::var_os("AYA_BUILD_SKIP").is_none() {
            panic!(
                "bpf-linker not found: run `cargo xtask setup` once (it builds and caches it), \
                 or use `cargo xtask build`"
            );
        }
    }
    println!("cargo:rerun-if-changed=../tcp-trace-common/src");
    let ebpf = aya_build::Package {
        name: "tcp-trace-ebpf",
        root_dir: "../tcp-trace-ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
        .expect("the eBPF crate builds (nightly + rust-src + bpf-linker; see `cargo xtask setup`)");
}

fn which_bpf_linker() -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}/tcp-trace/bpf-linker-*/bin`, as `cargo xtask setup` lays it out.
fn cached_bpf_linker_dir() -> Option<PathBuf> {
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?
        .join("tcp-trace");
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache)
        .ok()?
        .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
        .filter(|bin| bin.join("bpf-linker").is_file())
        .collect();
    found.sort();
    found.pop()
}
