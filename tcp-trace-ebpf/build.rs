//! Rebuild the eBPF object when the linker changes: the link step is not visible to cargo
//! otherwise (the same imperfect fix as aya-template's).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
