//! tcp-trace's kernel side: capture only. One module per hook family; every map in `maps`.
#![no_std]
#![feature(asm_experimental_arch)]
#![no_main]

mod accept;
mod fields;
mod floor;
mod keepalive;
mod kernel;
mod maps;
mod slots;
mod state;
mod tcp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here, so it is never taken at run time.
    loop {}
}

/// bpf_probe_read_kernel and bpf_ktime_get_ns are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
